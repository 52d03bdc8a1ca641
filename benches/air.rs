//! End-to-end benchmarks of the virtual BLE air, run as its own process
//! (`hilbench air`, the release binary cargo built) with unmodified BLE
//! libraries on its bus:
//!
//! * `rtt`   – write (without response) → first notification round trip
//!   through the air: a bluer echo peripheral (tests/air_support) and a
//!   btleplug central in this process, a bluer central on AcquireWrite /
//!   AcquireNotify sockets, then Python's bleak
//!   (tests/py/bleak_echo.py) as the central; p50/p90/p99/max and the CPU
//!   the air and dbus-daemon spend per round;
//! * `scale` – `hilbench air --adapters N`, one advertisement per adapter
//!   from one bluer session, then one bleak scan (tests/py/bleak_scan.py)
//!   and one btleplug scan, each timed until it has heard all N; the RSS of
//!   the air process and of its dbus-daemon, measured separately;
//! * `jbd`   – N simulated JBD BMS peripherals (`JbdBmsDevice`, one per
//!   peripheral adapter, sharing one bluer session in this process), one
//!   btleplug scan timed until it has heard all N, then a 0x03 poll of each
//!   (connect, subscribe, write, reassemble with the checksum checked,
//!   disconnect): successes, per-poll p50/p99, air and dbus-daemon RSS.
//!
//! Run:   cargo bench --bench air                  (both parts)
//!        cargo bench --bench air -- rtt           (one part: rtt, scale or jbd)
//! Knobs (environment):
//!   AIR_BENCH_ROUNDS=2000   measured rounds per central in `rtt` (warm-up AIR_BENCH_WARMUP=200)
//!   AIR_BENCH_DEVICES=1000  peripherals in `scale`
//!   AIR_BENCH_JBD_DEVICES=1000  BMSes in `jbd`;
//!   AIR_BENCH_JBD_DEADLINE_S=900 bound on the whole `jbd` part's polling;
//!   AIR_BENCH_JBD_OWN_SESSIONS=1 one bluer session (bus connection) per BMS instead of one shared
//!   AIR_BENCH_STRICT=1      exit 1 when a target is missed (default: report only)
//!   AIR_BENCH_AIR_BIN=PATH  the hilbench binary to run as the air (A/B runs against another build)
//!   AIR_BENCH_AIR_ARGS      more arguments for `hilbench air` (e.g. `--threads 2` for A/B runs)
//!   HILBENCH_PYTHON         a Python with bleak (ci/requirements.txt); without it the bleak
//!                           measurements are skipped with a note
//! Each part runs in a child process of this bench (libdbus reads
//! DBUS_SYSTEM_BUS_ADDRESS once per process). Every wait is bounded.

#[path = "../tests/air_support/mod.rs"]
mod air_support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use btleplug::api::{Central, CentralEvent, Manager as _, Peripheral as _, ScanFilter, WriteType};
use futures::StreamExt;
use hdrhistogram::Histogram;

const HILBENCH: &str = env!("CARGO_BIN_EXE_hilbench");
const PART_ENV: &str = "AIR_BENCH_CHILD_PART";
const WAIT: Duration = Duration::from_secs(30);

type Res<T> = Result<T, String>;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// `hilbench air` as a child process, and the dbus-daemon it started.
struct AirProcess {
    child: Child,
    address: String,
    daemon_pid: Option<u32>,
    ready_after: Duration,
}

impl AirProcess {
    fn start(adapters: usize) -> Res<AirProcess> {
        let t0 = Instant::now();
        let extra: Vec<String> = std::env::var("AIR_BENCH_AIR_ARGS").unwrap_or_default().split_whitespace().map(str::to_string).collect();
        let bin = std::env::var("AIR_BENCH_AIR_BIN").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| HILBENCH.to_string());
        let mut child = Command::new(&bin)
            .args(["air", "--adapters", &adapters.to_string()])
            .args(&extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning {bin} air: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| "hilbench air did not print its ready line within 60 s".to_string())?
            .map_err(|e| format!("reading hilbench air's ready line: {e}"))?;
        let ready_after = t0.elapsed();
        let v: serde_json::Value = serde_json::from_str(line.trim()).map_err(|e| format!("ready line {line:?}: {e}"))?;
        let address = v["dbus_system_bus_address"].as_str().ok_or("no bus address in the ready line")?.to_string();
        let daemon_pid = child_pids(child.id()).into_iter().find(|p| comm(*p).as_deref() == Some("dbus-daemon"));
        Ok(AirProcess { child, address, daemon_pid, ready_after })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AirProcess {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat_fields(*pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(parent))
        .collect()
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_string())
}

/// /proc/PID/stat fields after the command name: [0] state, [1] ppid, … [11] utime, [12] stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// CPU time (user + system) of a process.
fn cpu(pid: u32) -> Duration {
    // SAFETY: sysconf reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let t = stat_fields(pid)
        .map(|f| f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0))
        .unwrap_or(0);
    Duration::from_millis(t * 1000 / ticks.max(1))
}

/// A `Key:` line of /proc/PID/status, in kB.
fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn memory_line(what: &str, air: &AirProcess) -> (u64, u64) {
    let a = status_kb(air.pid(), "VmRSS");
    let d = air.daemon_pid.map(|p| status_kb(p, "VmRSS")).unwrap_or(0);
    println!(
        "   {what}: air VmRSS {:.1} MB (VmHWM {:.1} MB), dbus-daemon VmRSS {:.1} MB",
        mb(a),
        mb(status_kb(air.pid(), "VmHWM")),
        mb(d)
    );
    (a, d)
}

/// Target bookkeeping: every line says met/missed; strict mode fails on a miss.
#[derive(Default)]
struct Targets {
    missed: Vec<String>,
}

impl Targets {
    fn check(&mut self, what: &str, value: f64, limit: f64, unit: &str) {
        let ok = value <= limit;
        println!("   target {what} ≤ {limit} {unit}: {value:.3} {unit} — {}", if ok { "met" } else { "MISSED" });
        if !ok {
            self.missed.push(format!("{what}: {value:.3} {unit} > {limit} {unit}"));
        }
    }
}

fn print_hist(name: &str, h: &Histogram<u64>) {
    println!(
        "   {name}: n={} p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.9) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.max() as f64 / 1e3
    );
}

fn python() -> Option<String> {
    hilbench::python_with("bleak").ok()
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(name).display().to_string()
}

/// Runs a Python script with a bound on its run time; its stdout's last line as JSON.
fn run_python(py: &str, args: &[String], bus: &str, limit: Duration) -> Res<serde_json::Value> {
    let mut child = Command::new(py)
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {py}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{args:?} did not finish within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).map_err(|e| format!("{args:?}: {e}; stdout {stdout:?}; stderr {}", String::from_utf8_lossy(&out.stderr)))
}

async fn btleplug_adapter() -> Res<btleplug::platform::Adapter> {
    let manager = btleplug::platform::Manager::new().await.map_err(|e| e.to_string())?;
    for a in manager.adapters().await.map_err(|e| e.to_string())? {
        if a.adapter_info().await.map_err(|e| e.to_string())?.starts_with("hci0") {
            return Ok(a);
        }
    }
    Err("btleplug does not see hci0".into())
}

/// One btleplug scan on `central` until it has heard `n` devices (`what` names them in the
/// error), bounded by WAIT; prints and returns how long it took.
async fn scan_until_all_heard(central: &btleplug::platform::Adapter, n: usize, what: &str) -> Res<Duration> {
    let mut events = central.events().await.map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    central.start_scan(ScanFilter::default()).await.map_err(|e| e.to_string())?;
    let mut seen = HashSet::new();
    let r = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if let CentralEvent::DeviceDiscovered(id) | CentralEvent::DeviceUpdated(id) = ev {
                seen.insert(id);
                if seen.len() >= n {
                    return;
                }
            }
        }
    })
    .await;
    let took = t0.elapsed();
    central.stop_scan().await.map_err(|e| e.to_string())?;
    println!("   btleplug scan: heard {} of {n} in {took:?}", seen.len());
    if r.is_err() {
        return Err(format!("btleplug heard only {} of {n} {what} in {WAIT:?}", seen.len()));
    }
    Ok(took)
}

// ───────────────────────────── rtt ─────────────────────────────

fn part_rtt(t: &mut Targets) -> Res<()> {
    let rounds = env_num("AIR_BENCH_ROUNDS", 2000);
    let warmup = env_num("AIR_BENCH_WARMUP", 200);
    let air = AirProcess::start(1)?;
    std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &air.address);
    println!("rtt: hilbench air pid {} (dbus-daemon pid {:?}), ready in {:?}", air.pid(), air.daemon_pid, air.ready_after);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
    let (periph, address) = rt.block_on(async {
        let periph = tokio::time::timeout(WAIT, air_support::start_peripheral("hci1")).await.map_err(|_| "the peripheral did not register")?;
        let session = bluer::Session::new().await.map_err(|e| e.to_string())?;
        let address = session.adapter("hci1").map_err(|e| e.to_string())?.address().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((periph, address.to_string()))
    })?;

    // btleplug central in this process.
    let h = rt.block_on(async {
        let central = btleplug_adapter().await?;
        central.start_scan(ScanFilter::default()).await.map_err(|e| e.to_string())?;
        let p = tokio::time::timeout(WAIT, async {
            loop {
                for p in central.peripherals().await.map_err(|e| e.to_string())? {
                    if p.address().to_string() == address {
                        return Ok::<_, String>(p);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .map_err(|_| "btleplug did not find the peripheral")??;
        central.stop_scan().await.map_err(|e| e.to_string())?;
        tokio::time::timeout(WAIT, p.connect()).await.map_err(|_| "connect timed out")?.map_err(|e| e.to_string())?;
        tokio::time::timeout(WAIT, p.discover_services()).await.map_err(|_| "discovery timed out")?.map_err(|e| e.to_string())?;
        let chars = p.characteristics();
        let notify = chars.iter().find(|c| c.uuid == air_support::NOTIFY).ok_or("no notify characteristic")?.clone();
        let write = chars.iter().find(|c| c.uuid == air_support::WRITE).ok_or("no write characteristic")?.clone();
        let mut notes = p.notifications().await.map_err(|e| e.to_string())?;
        p.subscribe(&notify).await.map_err(|e| e.to_string())?;
        let mut h = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).map_err(|e| e.to_string())?;
        let mut cpu0 = (Duration::ZERO, Duration::ZERO);
        let bound = Instant::now() + Duration::from_secs(120);
        for i in 0..warmup + rounds {
            if i == warmup {
                cpu0 = (cpu(air.pid()), air.daemon_pid.map(cpu).unwrap_or_default());
            }
            if Instant::now() > bound {
                return Err(format!("btleplug rounds took over 120 s (at round {i})"));
            }
            let t0 = Instant::now();
            p.write(&write, b"ab", WriteType::WithoutResponse).await.map_err(|e| e.to_string())?;
            let n = tokio::time::timeout(Duration::from_secs(5), notes.next()).await.map_err(|_| format!("round {i}: no notification in 5 s"))?;
            let rtt = t0.elapsed();
            let n = n.ok_or("notification stream ended")?;
            if n.value.len() != 20 {
                return Err(format!("round {i}: first notification of {} bytes, want 20", n.value.len()));
            }
            // The second chunk (14 bytes) of the same answer.
            tokio::time::timeout(Duration::from_secs(5), notes.next()).await.map_err(|_| format!("round {i}: no second notification"))?;
            if i >= warmup {
                h.record(rtt.as_nanos() as u64).map_err(|e| e.to_string())?;
            }
        }
        let per = |d: Duration| d.as_secs_f64() * 1e6 / rounds.max(1) as f64;
        println!(
            "   CPU per round: air {:.1} µs, dbus-daemon {:.1} µs (each round: 1 write command, 2 notifications)",
            per(cpu(air.pid()).saturating_sub(cpu0.0)),
            per(air.daemon_pid.map(cpu).unwrap_or_default().saturating_sub(cpu0.1))
        );
        p.unsubscribe(&notify).await.map_err(|e| e.to_string())?;
        p.disconnect().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(h)
    })?;
    print_hist("btleplug write→notification", &h);
    t.check("btleplug p50", h.value_at_quantile(0.5) as f64 / 1e6, 0.15, "ms");

    // A bluer central on AcquireWrite/AcquireNotify sockets: the central's
    // side of the round trip skips the bus (the peripheral's side still
    // uses it), which shows what the bus hops cost.
    let h = rt.block_on(async {
        let session = bluer::Session::new().await.map_err(|e| e.to_string())?;
        let adapter = session.default_adapter().await.map_err(|e| e.to_string())?;
        let addr: bluer::Address = address.parse().map_err(|e| format!("{e}"))?;
        let device = adapter.device(addr).map_err(|e| e.to_string())?;
        tokio::time::timeout(WAIT, device.connect()).await.map_err(|_| "connect timed out")?.map_err(|e| e.to_string())?;
        let (notify, write) = air_support::echo_characteristics(&device).await?;
        let reader = notify.notify_io().await.map_err(|e| format!("AcquireNotify: {e}"))?;
        let writer = write.write_io().await.map_err(|e| format!("AcquireWrite: {e}"))?;
        let mut h = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).map_err(|e| e.to_string())?;
        let bound = Instant::now() + Duration::from_secs(120);
        for i in 0..warmup + rounds {
            if Instant::now() > bound {
                return Err(format!("bluer rounds took over 120 s (at round {i})"));
            }
            let t0 = Instant::now();
            writer.send(b"ab").await.map_err(|e| e.to_string())?;
            let first = tokio::time::timeout(Duration::from_secs(5), reader.recv()).await.map_err(|_| format!("round {i}: no notification in 5 s"))?;
            let rtt = t0.elapsed();
            if first.map_err(|e| e.to_string())?.len() != 20 {
                return Err(format!("round {i}: first notification is not 20 bytes"));
            }
            tokio::time::timeout(Duration::from_secs(5), reader.recv()).await.map_err(|_| format!("round {i}: no second notification"))?.map_err(|e| e.to_string())?;
            if i >= warmup {
                h.record(rtt.as_nanos() as u64).map_err(|e| e.to_string())?;
            }
        }
        drop(writer);
        drop(reader);
        device.disconnect().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(h)
    })?;
    print_hist("bluer (AcquireWrite/AcquireNotify) write→notification", &h);

    match python() {
        None => println!("   bleak: skipped (no Python with bleak; set HILBENCH_PYTHON)"),
        Some(py) => {
            let c0 = (cpu(air.pid()), air.daemon_pid.map(cpu).unwrap_or_default());
            let v = run_python(
                &py,
                &[script("bleak_echo.py"), "--address".into(), address.clone(), "--rounds".into(), rounds.to_string(), "--warmup".into(), warmup.to_string()],
                &air.address,
                Duration::from_secs(180),
            )?;
            let r = &v["rtt_us"];
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "   bleak write→notification: n={} p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
                r["n"],
                f("p50"),
                f("p90"),
                f("p99"),
                f("max")
            );
            let per = |d: Duration| d.as_secs_f64() * 1e6 / (rounds + warmup).max(1) as f64;
            println!(
                "   CPU per round (incl. bleak's connect and discovery): air {:.1} µs, dbus-daemon {:.1} µs",
                per(cpu(air.pid()).saturating_sub(c0.0)),
                per(air.daemon_pid.map(cpu).unwrap_or_default().saturating_sub(c0.1))
            );
            t.check("bleak p50", f("p50") / 1e3, 0.3, "ms");
            t.check("bleak p99", f("p99") / 1e3, 0.5, "ms");
        }
    }
    drop(periph);
    drop(rt);
    Ok(())
}

// ───────────────────────────── scale ─────────────────────────────

fn part_scale(t: &mut Targets) -> Res<()> {
    let n = env_num("AIR_BENCH_DEVICES", 1000) as usize;
    let air = AirProcess::start(n)?;
    std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &air.address);
    println!("scale: {n} peripheral adapters; hilbench air pid {} ready in {:?}", air.pid(), air.ready_after);
    memory_line("at ready", &air);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
    let (session, handles) = rt.block_on(async {
        let session = bluer::Session::new().await.map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let handles: Vec<Result<bluer::adv::AdvertisementHandle, String>> = futures::stream::iter(1..=n)
            .map(|i| {
                let session = session.clone();
                async move {
                    let adapter = session.adapter(&format!("hci{i}")).map_err(|e| e.to_string())?;
                    let adv = bluer::adv::Advertisement {
                        service_uuids: [air_support::SERVICE].into_iter().collect(),
                        manufacturer_data: [(0x02E5u16, (i as u32).to_le_bytes().to_vec())].into_iter().collect(),
                        local_name: Some(format!("bench-{i}")),
                        discoverable: Some(true),
                        ..Default::default()
                    };
                    tokio::time::timeout(WAIT, adapter.advertise(adv))
                        .await
                        .map_err(|_| format!("hci{i}: RegisterAdvertisement timed out"))?
                        .map_err(|e| format!("hci{i}: {e}"))
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let handles: Vec<_> = handles.into_iter().collect::<Result<_, _>>()?;
        println!("   {n} advertisements registered in {:?}", t0.elapsed());
        Ok::<_, String>((session, handles))
    })?;
    let (rss_air, rss_daemon) = memory_line("advertising", &air);
    t.check("air RSS with all advertising", mb(rss_air), 50.0, "MB");
    let _ = rss_daemon;

    match python() {
        None => println!("   bleak scan: skipped (no Python with bleak; set HILBENCH_PYTHON)"),
        Some(py) => {
            let c0 = cpu(air.pid());
            let v = run_python(&py, &[script("bleak_scan.py"), "--count".into(), n.to_string()], &air.address, Duration::from_secs(90))?;
            println!(
                "   bleak scan: found {} of {n}; StartDiscovery answered after {:.1} ms, first device at {:.1} ms, all at {:.1} ms (air CPU {:?})",
                v["found"],
                v["start_ms"].as_f64().unwrap_or(f64::NAN),
                v["first_ms"].as_f64().unwrap_or(f64::NAN),
                v["all_ms"].as_f64().unwrap_or(f64::NAN),
                cpu(air.pid()).saturating_sub(c0)
            );
            if v["ok"] != true {
                return Err(format!("bleak did not hear all {n} devices: {v}"));
            }
            t.check("bleak scan hears all", v["all_ms"].as_f64().unwrap_or(f64::INFINITY) / 1e3, 1.0, "s");
        }
    }

    rt.block_on(async {
        let central = btleplug_adapter().await?;
        let took = scan_until_all_heard(&central, n, "devices").await?;
        t.check("btleplug scan hears all", took.as_secs_f64(), 1.0, "s");
        Ok::<_, String>(())
    })?;
    memory_line("after the scans", &air);
    drop(handles);
    drop(session);
    drop(rt);
    Ok(())
}

// ───────────────────────────── jbd ─────────────────────────────

/// The target: N simulated JBD BMS peripherals (the real GATT
/// shell, `JbdBmsDevice`, one per peripheral adapter, all on one bluer
/// session in this process), one btleplug central that scans until it has
/// heard all N, then polls each one in turn as jbd-client does (connect,
/// discover, subscribe 0xFF01, 0x03 as a write command, reassemble with the
/// checksum checked, unsubscribe, disconnect).
fn part_jbd(t: &mut Targets) -> Res<()> {
    use hilbench::client::jbd_client::{central_adapter, JbdSession};
    use hilbench::device::jbd::{JbdBmsDevice, JbdGattConfig, SERVICE_UUID};
    use hilbench::device::jbd_core::{JbdBms, JbdConfig};
    use hilbench::protocol::jbd::{encode_read, reg};

    let n = env_num("AIR_BENCH_JBD_DEVICES", 1000) as usize;
    let deadline = Instant::now() + Duration::from_secs(env_num("AIR_BENCH_JBD_DEADLINE_S", 900));
    // 1: each BMS opens its own bluer session (its own bus connection), as `JbdBmsDevice::start` does.
    let own_sessions = env_num("AIR_BENCH_JBD_OWN_SESSIONS", 0) == 1;
    let air = AirProcess::start(n)?;
    std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &air.address);
    println!("jbd: {n} JBD BMS peripherals (no ticks: a core wakes only when it asks, {}); hilbench air pid {} ready in {:?}", if own_sessions { "one bluer session each" } else { "one shared bluer session" }, air.pid(), air.ready_after);
    memory_line("at ready", &air);
    let log = hilbench::observe::ObservationLog::bounded(Instant::now(), 10_000);
    actix_rt::System::new().block_on(async move {
        let session = bluer::Session::new().await.map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let started: Vec<Result<JbdBmsDevice, String>> = futures::stream::iter(1..=n)
            .map(|i| {
                let (session, log) = (session.clone(), log.clone());
                async move {
                    let core = JbdBms::new(JbdConfig::default()).map_err(|e| format!("JBD model: {e}"))?;
                    let cfg = JbdGattConfig { adapter: format!("hci{i}"), ..JbdGattConfig::default() };
                    let start = async {
                        if own_sessions {
                            JbdBmsDevice::start(format!("bms-{i}"), core, cfg, log).await
                        } else {
                            JbdBmsDevice::start_on(&session, format!("bms-{i}"), core, cfg, log).await
                        }
                    };
                    tokio::time::timeout(WAIT, start)
                        .await
                        .map_err(|_| format!("hci{i}: the BMS did not register within {WAIT:?}"))?
                        .map_err(|e| format!("hci{i}: {e:#}"))
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let devices: Vec<JbdBmsDevice> = started.into_iter().collect::<Result<_, _>>()?;
        println!("   {n} BMS GATT applications registered in {:?}", t0.elapsed());
        // Advertisements are registered by each actor after its application; wait for them.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss_air, _) = memory_line("all BMSes up", &air);
        println!("   bench process (the {n} BMSes + central) VmRSS {:.1} MB", mb(status_kb(std::process::id(), "VmRSS")));

        let central = central_adapter(Some("hci0")).await.map_err(|e| format!("{}: {}", e.kind, e.detail))?;
        let scan_took = scan_until_all_heard(&central, n, "BMSes").await?;
        let peripherals = central.peripherals().await.map_err(|e| e.to_string())?;
        let mut bms = Vec::new();
        for p in peripherals {
            if let Ok(Some(props)) = p.properties().await {
                if props.services.contains(&SERVICE_UUID) {
                    bms.push(p);
                }
            }
        }
        println!("   {} of them advertise the JBD service 0xFF00", bms.len());

        let c0 = (cpu(air.pid()), air.daemon_pid.map(cpu).unwrap_or_default());
        let mut h = Histogram::<u64>::new_with_bounds(1_000, 600_000_000_000, 3).map_err(|e| e.to_string())?;
        let (mut ok, mut failures, mut attempted) = (0usize, Vec::new(), 0usize);
        let t_polls = Instant::now();
        let limit = Duration::from_secs(10);
        for p in bms.iter().cloned() {
            if Instant::now() > deadline {
                println!("   overall deadline reached after {attempted} polls");
                break;
            }
            attempted += 1;
            let t0 = Instant::now();
            let r = async {
                let mut s = JbdSession::open(p, limit, Duration::ZERO, None, Instant::now()).await?;
                let x = s.transact(&encode_read(reg::BASIC_INFO), reg::BASIC_INFO, WriteType::WithoutResponse, limit, true).await;
                s.close().await;
                x
            }
            .await;
            match r {
                Ok(x) if x.bad_checksum.is_none() && x.response.reg == reg::BASIC_INFO => {
                    ok += 1;
                    h.record(t0.elapsed().as_nanos() as u64).map_err(|e| e.to_string())?;
                }
                Ok(x) => failures.push(format!("unexpected answer {:?}", x.response)),
                Err(e) => failures.push(format!("{}: {}", e.kind, e.detail)),
            }
        }
        let polls_took = t_polls.elapsed();
        println!("   polls: {ok} of {attempted} answered 0x03 with a good checksum in {polls_took:?} ({} BMSes found)", bms.len());
        for f in failures.iter().take(5) {
            println!("     failure: {f}");
        }
        if !h.is_empty() {
            println!(
                "   per poll (connect → 0x03 answer → disconnect): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                h.value_at_quantile(0.5) as f64 / 1e6,
                h.value_at_quantile(0.9) as f64 / 1e6,
                h.value_at_quantile(0.99) as f64 / 1e6,
                h.max() as f64 / 1e6
            );
        }
        println!(
            "   CPU per poll: air {:.0} µs, dbus-daemon {:.0} µs",
            cpu(air.pid()).saturating_sub(c0.0).as_secs_f64() * 1e6 / attempted.max(1) as f64,
            air.daemon_pid.map(cpu).unwrap_or_default().saturating_sub(c0.1).as_secs_f64() * 1e6 / attempted.max(1) as f64
        );
        let (rss_after, _) = memory_line("after the polls", &air);
        t.check("btleplug scan hears all BMSes", scan_took.as_secs_f64(), 1.0, "s");
        t.check("BMSes not answering a poll", (n - ok) as f64, 0.0, "");
        t.check("air RSS with all BMSes up", mb(rss_air), 50.0, "MB");
        t.check("air RSS after the polls", mb(rss_after), 50.0, "MB");
        for d in devices {
            d.stop().await;
        }
        drop(session);
        Ok::<_, String>(())
    })?;
    Ok(())
}

fn main() {
    // In the child: run one part, report on stdout, exit 2 on a hard failure.
    if let Ok(part) = std::env::var(PART_ENV) {
        let mut t = Targets::default();
        let r = match part.as_str() {
            "rtt" => part_rtt(&mut t),
            "scale" => part_scale(&mut t),
            "jbd" => part_jbd(&mut t),
            other => Err(format!("unknown part {other}")),
        };
        if let Err(e) = r {
            eprintln!("{part}: FAILED: {e}");
            std::process::exit(2);
        }
        std::process::exit(if t.missed.is_empty() { 0 } else { 1 });
    }
    let all = ["rtt", "scale", "jbd"];
    let named: Vec<String> = std::env::args().skip(1).filter(|a| all.contains(&a.as_str())).collect();
    let parts: Vec<&str> = if named.is_empty() { all.to_vec() } else { named.iter().map(String::as_str).collect() };
    let strict = std::env::var("AIR_BENCH_STRICT").map(|s| s == "1").unwrap_or(false);
    let exe = std::env::current_exe().expect("own path");
    let mut hard = false;
    let mut missed = false;
    for part in parts {
        let status = Command::new(&exe).env(PART_ENV, part).status().expect("re-running the bench for one part");
        match status.code() {
            Some(0) => {}
            Some(1) => missed = true,
            _ => hard = true,
        }
    }
    if hard || (strict && missed) {
        std::process::exit(1);
    }
}
