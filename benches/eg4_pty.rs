//! End-to-end benchmarks of `hilbench sim eg4-lp4` over real PTYs.
//!
//! The release binary is spawned as a child process and driven by a plain
//! client: a raw file descriptor on the PTY path, termios raw mode,
//! poll(2) + read(2)/write(2), no Modbus library. Three parts:
//!
//! * `roundtrip` – request → 99-byte reply latency without wire time
//!   (p50/p90/p99/max) and the simulator's CPU time per request;
//! * `wiretime`  – `--wire-time --baud 9600`: first→last reply byte span and
//!   request-end → first-byte gap, against the theoretical byte times;
//! * `scale`     – `--packs 1000 --tty-dir DIR`: time to ready, RSS, and one
//!   poll of every pack's PTY.
//!
//! Run:   cargo bench --bench eg4_pty                       (all parts)
//!        cargo bench --bench eg4_pty -- roundtrip          (one part; several may be named)
//! Knobs (environment):
//!   EG4_BENCH_PARTS=roundtrip,wiretime,scale   parts, if none are named as arguments
//!   EG4_BENCH_REQUESTS=20000     measured requests in `roundtrip` (warm-up: EG4_BENCH_WARMUP=2000)
//!   EG4_BENCH_WIRE_REQUESTS=20   requests in `wiretime`;  EG4_BENCH_BAUD=9600
//!   EG4_BENCH_PACKS=1000         packs in `scale`
//!   EG4_BENCH_STRICT=1           exit 1 when a target is missed (default: report only)
//!   EG4_BENCH_SIM=PATH           simulator binary to run instead of the one cargo built
//!   EG4_BENCH_PERF=FILE          `perf record` the sim during the measured `roundtrip` loop
//!                                (EG4_BENCH_PERF_FREQ=999 samples/s; DWARF call graphs)
//! Hard failures (bad replies, timeouts, the simulator not exiting 0 on
//! SIGTERM, symlinks left behind) always exit 1.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::sys::termios::{self, SetArg};

const SIM_BUILT: &str = env!("CARGO_BIN_EXE_hilbench");
const REPLY_LEN: usize = 99; // 01 03 5E + 94 data bytes + CRC

/// The simulator binary: the one cargo built, or EG4_BENCH_SIM (A/B runs
/// against another build).
fn sim_bin() -> String {
    std::env::var("EG4_BENCH_SIM")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| SIM_BUILT.to_string())
}

type Res<T> = Result<T, String>;

// ───────────────────────────── Modbus bits ─────────────────────────────

fn crc16_modbus(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
        }
    }
    crc
}

/// Read holding registers: address 1, function 3, start 0, count 47.
fn request() -> [u8; 8] {
    let mut r = [0x01, 0x03, 0x00, 0x00, 0x00, 0x2F, 0, 0];
    let crc = crc16_modbus(&r[..6]).to_le_bytes();
    r[6] = crc[0];
    r[7] = crc[1];
    r
}

fn check_reply(b: &[u8]) -> Res<()> {
    if b.len() != REPLY_LEN {
        return Err(format!("reply is {} bytes, expected {REPLY_LEN}", b.len()));
    }
    if b[..3] != [0x01, 0x03, 0x5E] {
        return Err(format!("reply header {:02X?}, expected [01, 03, 5E]", &b[..3]));
    }
    let crc = crc16_modbus(&b[..REPLY_LEN - 2]).to_le_bytes();
    if crc != [b[REPLY_LEN - 2], b[REPLY_LEN - 1]] {
        return Err(format!(
            "bad CRC: got {:02X?}, computed {:02X?}",
            &b[REPLY_LEN - 2..],
            crc
        ));
    }
    Ok(())
}

// ───────────────────────────── the client ─────────────────────────────

/// The client side of a PTY: raw mode, non-blocking fd, poll for timeouts.
struct Client {
    f: File,
}

impl Client {
    fn open(path: &Path) -> Res<Client> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        let mut t = termios::tcgetattr(f.as_fd()).map_err(|e| format!("tcgetattr {}: {e}", path.display()))?;
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(f.as_fd(), SetArg::TCSANOW, &t).map_err(|e| format!("tcsetattr {}: {e}", path.display()))?;
        let c = Client { f };
        c.flush_input();
        Ok(c)
    }

    fn flush_input(&self) {
        // SAFETY: a valid open fd owned by `self.f`.
        unsafe { libc::tcflush(self.f.as_raw_fd(), libc::TCIFLUSH) };
    }

    fn send(&mut self, bytes: &[u8]) -> Res<()> {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut off = 0;
        while off < bytes.len() {
            match self.f.write(&bytes[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.wait(libc::POLLOUT, deadline)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        Ok(())
    }

    /// poll(2) for `events` until `deadline`; Err on timeout.
    fn wait(&self, events: libc::c_short, deadline: Instant) -> Res<()> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timeout".into());
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            let mut p = libc::pollfd {
                fd: self.f.as_raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r > 0 {
                let failed = p.revents & libc::POLLNVAL != 0
                    || (p.revents & (libc::POLLERR | libc::POLLHUP) != 0 && p.revents & events == 0);
                if failed {
                    return Err(format!("poll revents {:#x}", p.revents));
                }
                return Ok(());
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(format!("poll: {e}"));
                }
            }
        }
    }

    /// One read that waits (bounded) for data; returns (bytes, when).
    fn read_some(&mut self, buf: &mut [u8], deadline: Instant) -> Res<(usize, Instant)> {
        loop {
            match self.f.read(buf) {
                Ok(0) => return Err("end of file on the PTY".into()),
                Ok(n) => return Ok((n, Instant::now())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.wait(libc::POLLIN, deadline)?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Send `req`, read until `want` bytes (more than `want` is an error:
    /// the reply was too long or a stale byte was waiting).
    fn transact(&mut self, req: &[u8], buf: &mut [u8], want: usize, timeout: Duration) -> Res<usize> {
        self.send(req)?;
        let deadline = Instant::now() + timeout;
        let mut got = 0;
        while got < want {
            let (n, _) = self
                .read_some(&mut buf[got..], deadline)
                .map_err(|e| format!("{e} after {got} of {want} reply bytes"))?;
            got += n;
        }
        if got > want {
            return Err(format!("{got} bytes, expected {want}"));
        }
        Ok(got)
    }
}

// ───────────────────────────── the simulator ─────────────────────────────

struct Sim {
    child: Option<Child>,
    pid: i32,
    ready: serde_json::Value,
    spawn_to_ready: Duration,
    stderr_path: PathBuf,
    links: Vec<PathBuf>,
}

impl Sim {
    fn spawn(args: &[String], stderr_path: &Path, ready_timeout: Duration) -> Res<Sim> {
        let stderr = File::create(stderr_path).map_err(|e| format!("create {}: {e}", stderr_path.display()))?;
        let t0 = Instant::now();
        let mut child = Command::new(sim_bin())
            .arg("sim")
            .arg("eg4-lp4")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", sim_bin()))?;
        let pid = child.id() as i32;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let first = r.read_line(&mut line).map(|_| line.clone());
            let _ = tx.send(first);
            // Keep draining so the sim never blocks on a full pipe; anything
            // beyond the one ready line breaks the contract: say so.
            let mut rest = String::new();
            while let Ok(n) = r.read_line(&mut rest) {
                if n == 0 {
                    break;
                }
                eprintln!("!! sim printed a second stdout line: {}", rest.trim_end());
                rest.clear();
            }
        });
        let mut sim = Sim {
            child: Some(child),
            pid,
            ready: serde_json::Value::Null,
            spawn_to_ready: Duration::ZERO,
            stderr_path: stderr_path.to_path_buf(),
            links: Vec::new(),
        };
        let line = match rx.recv_timeout(ready_timeout) {
            Ok(Ok(l)) if !l.is_empty() => l,
            Ok(Ok(_)) => return Err(format!("sim exited without a ready line{}", sim.stderr_tail())),
            Ok(Err(e)) => return Err(format!("reading the ready line: {e}")),
            Err(_) => return Err(format!("no ready line within {ready_timeout:?}{}", sim.stderr_tail())),
        };
        sim.spawn_to_ready = t0.elapsed();
        let v: serde_json::Value =
            serde_json::from_str(line.trim()).map_err(|e| format!("ready line is not JSON ({e}): {line}"))?;
        if v["ready"] != serde_json::Value::Bool(true) || v["kind"] != "eg4-lp4" {
            return Err(format!("unexpected ready line: {line}"));
        }
        let tty = v["endpoints"]["tty"]
            .as_str()
            .ok_or("ready line has no endpoints.tty")?;
        sim.links = match v["endpoints"]["ttys"].as_array() {
            Some(a) => a.iter().filter_map(|x| x.as_str().map(PathBuf::from)).collect(),
            None => vec![PathBuf::from(tty)],
        };
        sim.ready = v;
        Ok(sim)
    }

    fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        if lines.is_empty() {
            return String::new();
        }
        let from = lines.len().saturating_sub(15);
        format!(
            "\n   sim stderr (last {} lines):\n     {}",
            lines.len() - from,
            lines[from..].join("\n     ")
        )
    }

    /// utime+stime from /proc/<pid>/stat, in clock ticks.
    fn cpu_ticks(&self) -> Res<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).map_err(|e| format!("/proc stat: {e}"))?;
        let rest = &s[s.rfind(')').ok_or("malformed /proc/pid/stat")? + 2..];
        // After "comm)": field 3 (state) is rest[0]; utime = field 14, stime = 15.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ut: u64 = f[11].parse().map_err(|_| "utime")?;
        let st: u64 = f[12].parse().map_err(|_| "stime")?;
        Ok(ut + st)
    }

    /// The process CPU clock (all threads) in ns, for a finer cross-check.
    fn cpu_ns(&self) -> Option<u64> {
        let mut clk: libc::clockid_t = 0;
        // SAFETY: plain libc calls with valid out-pointers.
        unsafe {
            if libc::clock_getcpuclockid(self.pid, &mut clk) != 0 {
                return None;
            }
            let mut ts: libc::timespec = std::mem::zeroed();
            if libc::clock_gettime(clk, &mut ts) != 0 {
                return None;
            }
            Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
        }
    }

    fn cpu(&self) -> Res<CpuSample> {
        Ok(CpuSample {
            ctxt: (
                self.status_num("voluntary_ctxt_switches").unwrap_or(0),
                self.status_num("nonvoluntary_ctxt_switches").unwrap_or(0),
            ),
            ticks: self.cpu_ticks()?,
            ns: self.cpu_ns(),
            at: Instant::now(),
        })
    }

    /// The number in a `Key:` line of /proc/<pid>/status (VmRSS is in kB).
    fn status_num(&self, key: &str) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        s.lines()
            .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    fn open_fds(&self) -> Option<usize> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .ok()
            .map(|d| d.count())
    }

    fn threads(&self) -> Option<usize> {
        std::fs::read_dir(format!("/proc/{}/task", self.pid))
            .ok()
            .map(|d| d.count())
    }

    /// SIGTERM, wait (bounded) for exit 0, check every symlink is gone.
    fn terminate(mut self, timeout: Duration) -> Res<Duration> {
        let mut child = self.child.take().expect("not yet terminated");
        let t0 = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if t0.elapsed() < timeout => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "sim did not exit within {timeout:?} of SIGTERM (killed){}",
                        self.stderr_tail()
                    ));
                }
                Err(e) => return Err(format!("wait: {e}")),
            }
        };
        let took = t0.elapsed();
        if status.code() != Some(0) {
            return Err(format!("sim exited with {status} after SIGTERM{}", self.stderr_tail()));
        }
        let left: Vec<_> = self.links.iter().filter(|l| l.symlink_metadata().is_ok()).collect();
        if !left.is_empty() {
            return Err(format!(
                "{} of {} symlinks left after exit, e.g. {}",
                left.len(),
                self.links.len(),
                left[0].display()
            ));
        }
        Ok(took)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        // Error paths: never leave a simulator running.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Clone, Copy)]
struct CpuSample {
    /// voluntary + involuntary context switches (/proc/<pid>/status: main thread)
    ctxt: (u64, u64),
    ticks: u64,
    ns: Option<u64>,
    at: Instant,
}

fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// (µs by the tick counter, µs by the ns clock) between two samples.
fn cpu_us(a: CpuSample, b: CpuSample) -> (f64, Option<f64>) {
    let ticks_us = (b.ticks - a.ticks) as f64 * 1e6 / clk_tck() as f64;
    let ns_us = match (a.ns, b.ns) {
        (Some(x), Some(y)) => Some((y - x) as f64 / 1e3),
        _ => None,
    };
    (ticks_us, ns_us)
}

// ───────────────────────────── report helpers ─────────────────────────────

struct Verdicts {
    missed: Vec<String>,
}

impl Verdicts {
    fn check(&mut self, what: &str, ok: bool, detail: String) {
        println!("   [{}] {what}: {detail}", if ok { "PASS" } else { "MISS" });
        if !ok {
            self.missed.push(format!("{what}: {detail}"));
        }
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn print_hist(label: &str, h: &Histogram<u64>) {
    println!(
        "   {label}: n={}  min {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}  (µs)",
        h.len(),
        us(h.min()),
        us(h.value_at_quantile(0.50)),
        us(h.value_at_quantile(0.90)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max()),
        h.mean() / 1e3
    );
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

// ───────────────────────────── part 1: round trip ─────────────────────────────

/// The floor: the same client against an in-process PTY whose master is
/// answered by a thread doing nothing but read 8 / write 99. What the sim
/// adds on top of this is the simulator's own cost.
fn pty_floor(n: usize) -> Res<Histogram<u64>> {
    let pty = nix::pty::openpty(None, None).map_err(|e| format!("openpty: {e}"))?;
    for fd in [pty.master.as_fd(), pty.slave.as_fd()] {
        let mut t = termios::tcgetattr(fd).map_err(|e| e.to_string())?;
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(fd, SetArg::TCSANOW, &t).map_err(|e| e.to_string())?;
    }
    let slave_path = nix::unistd::ttyname(&pty.slave).map_err(|e| e.to_string())?;
    let master = File::from(pty.master);
    let _slave_keepalive = pty.slave;
    let mut reply = vec![0x01u8, 0x03, 0x5E];
    reply.extend([0u8; 94]);
    let crc = crc16_modbus(&reply).to_le_bytes();
    reply.extend(crc);
    let total = n + 500;
    let echo = std::thread::spawn(move || {
        let mut m = master;
        let mut buf = [0u8; 64];
        let mut pending = 0usize;
        let mut served = 0;
        while served < total {
            match m.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    pending += k;
                    while pending >= 8 {
                        pending -= 8;
                        if m.write_all(&reply).is_err() {
                            return m;
                        }
                        served += 1;
                    }
                }
            }
        }
        // Handed back so the master outlives the client's last read.
        m
    });
    let mut c = Client::open(&slave_path)?;
    let req = request();
    let mut buf = [0u8; 256];
    let mut h = new_hist();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..total {
        if Instant::now() > deadline {
            break;
        }
        let t = Instant::now();
        c.transact(&req, &mut buf, REPLY_LEN, Duration::from_secs(1))
            .map_err(|e| format!("floor request {i}: {e}"))?;
        if i >= 500 {
            h.record(t.elapsed().as_nanos() as u64).ok();
        }
    }
    drop(c);
    let _ = echo.join();
    Ok(h)
}

/// `perf record` attached to the sim (EG4_BENCH_PERF=FILE); software clock
/// so it works in VMs without hardware counters; DWARF call graphs.
fn start_perf(pid: i32, out: &str) -> Res<(Child, String)> {
    let freq = std::env::var("EG4_BENCH_PERF_FREQ").unwrap_or_else(|_| "999".into());
    let child = Command::new("perf")
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            &freq,
            "--call-graph",
            "dwarf,16384",
            "-o",
            out,
            "-p",
        ])
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("perf: {e}"))?;
    std::thread::sleep(Duration::from_millis(500)); // let it attach
    println!("   perf record attached to the sim (pid {pid}) → {out}; figures below are distorted by it");
    Ok((child, out.to_string()))
}

fn stop_perf((mut child, out): (Child, String)) -> Res<()> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if t0.elapsed() < Duration::from_secs(60) => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("perf did not stop within 60 s".into());
            }
        }
    }
    println!("   profile written: perf report -i {out} --children --sort sym");
    Ok(())
}

fn part_roundtrip(v: &mut Verdicts) -> Res<()> {
    let n = env_usize("EG4_BENCH_REQUESTS", 20_000);
    let warm = env_usize("EG4_BENCH_WARMUP", 2_000);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let link = dir.path().join("eg4.tty");
    let args = vec!["--tty".to_string(), link.display().to_string()];
    println!("── roundtrip: PTY round trip, no wire time ─────────────────────────────");
    println!("   sim: {} sim eg4-lp4 {}", sim_bin(), args.join(" "));
    println!(
        "   request {:02X?}, reply {REPLY_LEN} bytes; warm-up {warm}, measured {n}",
        request()
    );
    let sim = Sim::spawn(&args, &dir.path().join("sim.stderr"), Duration::from_secs(30))?;
    println!(
        "   ready after {:.1} ms: {}",
        sim.spawn_to_ready.as_secs_f64() * 1e3,
        sim.ready
    );
    let mut c = Client::open(&sim.links[0])?;
    let req = request();
    let mut buf = [0u8; 256];

    // Idle CPU (the packs' 100 ms model tick), to separate it from the per-request cost.
    let idle0 = sim.cpu()?;
    std::thread::sleep(Duration::from_secs(1));
    let idle1 = sim.cpu()?;
    let idle_rate = cpu_us(idle0, idle1);

    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..warm {
        if Instant::now() > deadline {
            return Err(format!("warm-up took over 30 s ({i} requests)"));
        }
        let k = c.transact(&req, &mut buf, REPLY_LEN, Duration::from_secs(1))?;
        check_reply(&buf[..k]).map_err(|e| format!("warm-up request {i}: {e}"))?;
    }

    // Optional: profile the sim during the measured loop (perf distorts the figures).
    let perf = match std::env::var("EG4_BENCH_PERF") {
        Ok(out) if !out.is_empty() => Some(start_perf(sim.pid, &out)?),
        _ => None,
    };

    let mut h = new_hist();
    let mut bad = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    let before = sim.cpu()?;
    let t_loop = Instant::now();
    let mut done = 0usize;
    for i in 0..n {
        if Instant::now() > deadline {
            println!("   !! stopped after 120 s at request {i}");
            break;
        }
        let t = Instant::now();
        let k = c
            .transact(&req, &mut buf, REPLY_LEN, Duration::from_secs(1))
            .map_err(|e| format!("request {i}: {e}"))?;
        let dt = t.elapsed().as_nanos() as u64;
        h.record(dt.max(1)).ok();
        if check_reply(&buf[..k]).is_err() {
            bad += 1;
        }
        done += 1;
    }
    let wall = t_loop.elapsed();
    let after = sim.cpu()?;
    drop(c);
    if let Some(p) = perf {
        stop_perf(p)?;
    }
    let (cpu_ticks_us, cpu_ns_us) = cpu_us(before, after);
    let idle_per_s_ticks = idle_rate.0 / (idle1.at - idle0.at).as_secs_f64();
    let idle_per_s_ns = idle_rate.1.map(|x| x / (idle1.at - idle0.at).as_secs_f64());

    println!("   results:");
    print_hist("latency", &h);
    println!(
        "   throughput: {done} requests in {:.3} s = {:.0} req/s; bad replies: {bad}",
        wall.as_secs_f64(),
        done as f64 / wall.as_secs_f64()
    );
    let per_req_ticks = cpu_ticks_us / done.max(1) as f64;
    println!(
        "   sim CPU (utime+stime, /proc/{}/stat, CLK_TCK={}): {:.0} µs total over the loop = {:.2} µs/request",
        sim.pid,
        clk_tck(),
        cpu_ticks_us,
        per_req_ticks
    );
    if let Some(x) = cpu_ns_us {
        println!(
            "   sim CPU (process CPU clock, ns resolution):    {:.0} µs total = {:.2} µs/request; sim busy {:.0}% of the loop's wall time",
            x,
            x / done.max(1) as f64,
            100.0 * x / (wall.as_secs_f64() * 1e6)
        );
    }
    println!(
        "   sim context switches: {:.2} voluntary + {:.3} involuntary per request",
        (after.ctxt.0 - before.ctxt.0) as f64 / done.max(1) as f64,
        (after.ctxt.1 - before.ctxt.1) as f64 / done.max(1) as f64
    );
    println!(
        "   sim idle CPU (1 pack, before the loop): {:.0} µs/s by ticks{}",
        idle_per_s_ticks,
        idle_per_s_ns
            .map(|x| format!(", {x:.0} µs/s by the CPU clock"))
            .unwrap_or_default()
    );

    let floor_n = 20_000.min(n);
    match pty_floor(floor_n) {
        Ok(f) => {
            print_hist("floor  ", &f);
            println!("     (floor = same client, in-process PTY answered by a bare read-8/write-99 thread: kernel PTY + wake-ups only)");
        }
        Err(e) => println!("   floor measurement failed: {e}"),
    }

    let took = sim.terminate(Duration::from_secs(10))?;
    println!(
        "   SIGTERM → exit 0 in {:.1} ms, symlink removed",
        took.as_secs_f64() * 1e3
    );
    println!("   targets:");
    if bad > 0 {
        return Err(format!("{bad} bad replies"));
    }
    let p50 = us(h.value_at_quantile(0.50));
    let p99 = us(h.value_at_quantile(0.99));
    v.check("roundtrip p50 ≤ 60 µs", p50 <= 60.0, format!("{p50:.1} µs"));
    v.check("roundtrip p99 ≤ 200 µs", p99 <= 200.0, format!("{p99:.1} µs"));
    v.check(
        "sim CPU ≤ 10 µs/request",
        per_req_ticks <= 10.0,
        format!(
            "{per_req_ticks:.2} µs/request (ticks){}",
            cpu_ns_us
                .map(|x| format!(", {:.2} µs/request (CPU clock)", x / done.max(1) as f64))
                .unwrap_or_default()
        ),
    );
    Ok(())
}

// ───────────────────────────── part 2: wire time ─────────────────────────────

fn part_wiretime(v: &mut Verdicts) -> Res<()> {
    let n = env_usize("EG4_BENCH_WIRE_REQUESTS", 20);
    let baud = env_usize("EG4_BENCH_BAUD", 9600) as u32;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let link = dir.path().join("eg4.tty");
    let args = vec![
        "--tty".to_string(),
        link.display().to_string(),
        "--wire-time".into(),
        "--baud".into(),
        baud.to_string(),
    ];
    println!("── wiretime: wire-time emulation at {baud} baud ─────────────────────────");
    println!("   sim: {} sim eg4-lp4 {}", sim_bin(), args.join(" "));
    let sim = Sim::spawn(&args, &dir.path().join("sim.stderr"), Duration::from_secs(30))?;
    println!("   ready after {:.1} ms", sim.spawn_to_ready.as_secs_f64() * 1e3);

    let bt = 10.0 / f64::from(baud); // s per byte
    let silence = if baud <= 19_200 { 3.5 * bt } else { 1.75e-3 };
    let theory_span = (REPLY_LEN - 1) as f64 * bt;
    let theory_gap = 8.0 * bt + silence + bt;
    println!(
        "   byte time {:.4} ms; theory: first→last = 98 × {:.4} = {:.2} ms; request-end → first byte = 8 bytes {:.2} + 3.5-char silence {:.2} + 1 byte {:.2} = {:.2} ms",
        bt * 1e3,
        bt * 1e3,
        theory_span * 1e3,
        8.0 * bt * 1e3,
        silence * 1e3,
        bt * 1e3,
        theory_gap * 1e3
    );

    let mut c = Client::open(&sim.links[0])?;
    let req = request();
    let mut spans = Vec::new();
    let mut gaps = Vec::new();
    let mut reads_per_reply = Vec::new();
    let mut lateness: Vec<f64> = Vec::new();
    let mut max_step: f64 = 0.0;
    let mut min_step = f64::MAX;
    let timeout = Duration::from_secs_f64((theory_span + theory_gap) * 3.0 + 1.0);
    let total_deadline = Instant::now() + Duration::from_secs(120);
    // Warm-up request (not measured).
    let mut buf = [0u8; 256];
    let k = c.transact(&req, &mut buf, REPLY_LEN, timeout)?;
    check_reply(&buf[..k])?;
    for i in 0..n {
        if Instant::now() > total_deadline {
            println!("   !! stopped after 120 s at request {i}");
            break;
        }
        // Line idle (the sim's line is free after the previous reply) and no stale input.
        std::thread::sleep(Duration::from_millis(20));
        c.flush_input();
        c.send(&req)?;
        let t_req_end = Instant::now();
        let deadline = t_req_end + timeout;
        let mut got = 0;
        let mut stamps: Vec<(Instant, usize)> = Vec::with_capacity(REPLY_LEN);
        while got < REPLY_LEN {
            // Small reads: at most the bytes still missing, typically 1 per read.
            let (k, at) = c
                .read_some(&mut buf[got..REPLY_LEN], deadline)
                .map_err(|e| format!("request {i}: {e} after {got} bytes"))?;
            got += k;
            stamps.push((at, k));
        }
        check_reply(&buf[..REPLY_LEN]).map_err(|e| format!("request {i}: {e}"))?;
        let first = stamps[0].0;
        let last = stamps.last().unwrap().0;
        // Lateness of every byte against the ideal schedule anchored at the
        // request's end: byte k due at gap + k byte-times.
        let mut k0 = 0usize;
        for &(at, k) in &stamps {
            for j in k0..k0 + k {
                let ideal = theory_gap + j as f64 * bt;
                lateness.push((at - t_req_end).as_secs_f64() - ideal);
            }
            k0 += k;
        }
        spans.push((last - first).as_secs_f64());
        gaps.push((first - t_req_end).as_secs_f64());
        reads_per_reply.push(stamps.len());
        for w in stamps.windows(2) {
            let d = (w[1].0 - w[0].0).as_secs_f64() / w[1].1 as f64;
            max_step = max_step.max((w[1].0 - w[0].0).as_secs_f64());
            min_step = min_step.min(d);
        }
    }
    // Nothing more must arrive.
    std::thread::sleep(Duration::from_millis(50));
    let mut extra = [0u8; 64];
    let stray = match c.read_some(&mut extra, Instant::now() + Duration::from_millis(1)) {
        Ok((k, _)) => k,
        Err(_) => 0,
    };
    drop(c);
    let took = sim.terminate(Duration::from_secs(10))?;

    let stats = |xs: &[f64]| {
        let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        let min = xs.iter().cloned().fold(f64::MAX, f64::min);
        let max = xs.iter().cloned().fold(f64::MIN, f64::max);
        (mean, min, max)
    };
    let (sm, smin, smax) = stats(&spans);
    let (gm, gmin, gmax) = stats(&gaps);
    let err = |m: f64, t: f64| 100.0 * (m - t) / t;
    println!("   results over {} replies:", spans.len());
    println!(
        "   first→last reply byte: mean {:.3} ms (min {:.3}, max {:.3}) vs theory {:.3} ms → error {:+.2}% (worst {:+.2}%)",
        sm * 1e3,
        smin * 1e3,
        smax * 1e3,
        theory_span * 1e3,
        err(sm, theory_span),
        if (smax - theory_span).abs() > (smin - theory_span).abs() { err(smax, theory_span) } else { err(smin, theory_span) }
    );
    println!(
        "   request-end → first byte: mean {:.3} ms (min {:.3}, max {:.3}) vs theory {:.3} ms → error {:+.2}% (worst {:+.2}%)",
        gm * 1e3,
        gmin * 1e3,
        gmax * 1e3,
        theory_gap * 1e3,
        err(gm, theory_gap),
        if (gmax - theory_gap).abs() > (gmin - theory_gap).abs() { err(gmax, theory_gap) } else { err(gmin, theory_gap) }
    );
    let (tm, ..) = stats(&spans.iter().zip(&gaps).map(|(s, g)| s + g).collect::<Vec<_>>());
    println!(
        "   request-end → last byte: mean {:.3} ms vs theory {:.3} ms → error {:+.2}%",
        tm * 1e3,
        (theory_span + theory_gap) * 1e3,
        err(tm, theory_span + theory_gap)
    );
    let rpr = reads_per_reply.iter().sum::<usize>() as f64 / reads_per_reply.len().max(1) as f64;
    println!(
        "   reads per reply: {rpr:.1} (of {REPLY_LEN} bytes); per-byte step min {:.3} ms, largest gap between reads {:.3} ms",
        min_step * 1e3,
        max_step * 1e3
    );
    let mut ls = lateness.clone();
    ls.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if !ls.is_empty() {
        let q = |f: f64| ls[((ls.len() - 1) as f64 * f).round() as usize] * 1e3;
        println!(
            "   per-byte lateness vs the ideal schedule (request end + gap + k byte-times), {} bytes: min {:+.3}  p50 {:+.3}  p90 {:+.3}  p99 {:+.3}  max {:+.3} ms",
            ls.len(),
            q(0.0),
            q(0.5),
            q(0.9),
            q(0.99),
            q(1.0)
        );
    }
    println!(
        "   gaps per reply (ms): {}",
        gaps.iter()
            .map(|g| format!("{:.2}", g * 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("   stray bytes after the last reply: {stray}");
    println!(
        "   SIGTERM → exit 0 in {:.1} ms, symlink removed",
        took.as_secs_f64() * 1e3
    );
    println!("   targets:");
    if stray > 0 {
        return Err(format!("{stray} stray bytes after the replies"));
    }
    let worst_span = spans.iter().map(|s| err(*s, theory_span).abs()).fold(0.0, f64::max);
    let worst_gap = gaps.iter().map(|g| err(*g, theory_gap).abs()).fold(0.0, f64::max);
    v.check(
        "wire time: first→last byte within 5%",
        err(sm, theory_span).abs() <= 5.0 && worst_span <= 5.0,
        format!(
            "mean {:+.2}%, worst single reply {:.2}%",
            err(sm, theory_span),
            worst_span
        ),
    );
    v.check(
        "wire time: request-end → first byte within 5%",
        err(gm, theory_gap).abs() <= 5.0,
        format!(
            "mean {:+.2}%, worst single reply {:.2}%",
            err(gm, theory_gap),
            worst_gap
        ),
    );
    Ok(())
}

// ───────────────────────────── part 3: scale ─────────────────────────────

fn part_scale(v: &mut Verdicts) -> Res<()> {
    let n = env_usize("EG4_BENCH_PACKS", 1000);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ttydir = dir.path().join("packs");
    std::fs::create_dir(&ttydir).map_err(|e| e.to_string())?;
    let args = vec![
        "--packs".to_string(),
        n.to_string(),
        "--tty-dir".into(),
        ttydir.display().to_string(),
    ];
    println!("── scale: {n} packs, one PTY each, one process ─────────────────────────");
    println!("   sim: {} sim eg4-lp4 {}", sim_bin(), args.join(" "));
    let sim = Sim::spawn(&args, &dir.path().join("sim.stderr"), Duration::from_secs(120))?;
    let ready = sim.spawn_to_ready;
    let packs = sim.ready["packs"].as_u64().unwrap_or(0);
    println!(
        "   ready after {:.1} ms; ready line says packs={packs}, {} tty paths",
        ready.as_secs_f64() * 1e3,
        sim.links.len()
    );
    if sim.links.len() != n || packs != n as u64 {
        return Err(format!(
            "expected {n} packs/ttys in the ready line, got packs={packs}, {} ttys",
            sim.links.len()
        ));
    }
    for (i, l) in sim.links.iter().enumerate() {
        let want = ttydir.join(format!("pack-{}.tty", i + 1));
        if *l != want {
            return Err(format!("ttys[{i}] = {}, expected {}", l.display(), want.display()));
        }
    }
    let rss_ready = sim.status_num("VmRSS").unwrap_or(0);
    println!(
        "   at ready: VmRSS {:.1} MB, VmHWM {:.1} MB, threads {}, open fds {}",
        rss_ready as f64 / 1024.0,
        sim.status_num("VmHWM").unwrap_or(0) as f64 / 1024.0,
        sim.threads().unwrap_or(0),
        sim.open_fds().unwrap_or(0)
    );
    let i0 = sim.cpu()?;
    std::thread::sleep(Duration::from_secs(2));
    let i1 = sim.cpu()?;
    let (idle_t, idle_ns) = cpu_us(i0, i1);
    let secs = (i1.at - i0.at).as_secs_f64();
    println!(
        "   idle CPU with {n} packs: {:.1}% of one core by ticks{}",
        idle_t / secs / 1e4,
        idle_ns
            .map(|x| format!(", {:.1}% by the CPU clock", x / secs / 1e4))
            .unwrap_or_default()
    );

    // One at a time: open, request, check, close (no fd limit trouble).
    let req = request();
    let mut buf = [0u8; 256];
    let mut h = new_hist();
    let mut ok = 0usize;
    let mut failures: Vec<String> = Vec::new();
    let c0 = sim.cpu()?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(300);
    for (i, l) in sim.links.iter().enumerate() {
        if Instant::now() > deadline {
            failures.push(format!("stopped after 300 s at pack {}", i + 1));
            break;
        }
        let t = Instant::now();
        let r = Client::open(l).and_then(|mut c| {
            let k = c.transact(&req, &mut buf, REPLY_LEN, Duration::from_secs(2))?;
            check_reply(&buf[..k])
        });
        match r {
            Ok(()) => {
                ok += 1;
                h.record(t.elapsed().as_nanos() as u64).ok();
            }
            Err(e) => failures.push(format!("pack {} ({}): {e}", i + 1, l.display())),
        }
    }
    let total = t0.elapsed();
    let c1 = sim.cpu()?;
    let (poll_cpu_t, poll_cpu_ns) = cpu_us(c0, c1);
    let rss_after = sim.status_num("VmRSS").unwrap_or(0);
    let hwm = sim.status_num("VmHWM").unwrap_or(0);
    println!("   results:");
    println!(
        "   polled {} PTYs once each: {ok} answered with a valid 99-byte reply, {} failed; total {:.1} ms ({:.0} µs/pack incl. open+termios+close)",
        sim.links.len(),
        failures.len(),
        total.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e6 / sim.links.len().max(1) as f64
    );
    print_hist("per-pack open→reply", &h);
    for f in failures.iter().take(10) {
        println!("   !! {f}");
    }
    println!(
        "   sim CPU during the poll sweep: {:.0} ms by ticks{}",
        poll_cpu_t / 1e3,
        poll_cpu_ns
            .map(|x| format!(", {:.0} ms by the CPU clock", x / 1e3))
            .unwrap_or_default()
    );
    println!(
        "   after polling: VmRSS {:.1} MB, VmHWM {:.1} MB ({:.1} kB/pack)",
        rss_after as f64 / 1024.0,
        hwm as f64 / 1024.0,
        rss_after as f64 / n as f64
    );
    let took = sim.terminate(Duration::from_secs(60))?;
    let left = std::fs::read_dir(&ttydir).map(|d| d.count()).unwrap_or(0);
    println!(
        "   SIGTERM → exit 0 in {:.1} ms, {left} entries left in the tty dir",
        took.as_secs_f64() * 1e3
    );
    if left != 0 {
        return Err(format!("{left} entries left in {}", ttydir.display()));
    }
    println!("   targets:");
    let rss_max = rss_after.max(hwm).max(rss_ready);
    v.check(
        "scale: RSS < 200 MB",
        (rss_max as f64 / 1024.0) < 200.0,
        format!("peak {:.1} MB (VmHWM)", rss_max as f64 / 1024.0),
    );
    v.check(
        &format!("scale: all {n} packs answer"),
        ok == n,
        format!(
            "{ok}/{n} in {:.2} s, time to ready {:.2} s",
            total.as_secs_f64(),
            ready.as_secs_f64()
        ),
    );
    Ok(())
}

// ───────────────────────────── main ─────────────────────────────

fn main() {
    const PARTS: [&str; 3] = ["roundtrip", "wiretime", "scale"];
    // `cargo bench` passes `--bench`; anything starting with `-` is ignored.
    let mut parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .flat_map(|a| a.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|a| !a.is_empty())
        .collect();
    if parts.is_empty() {
        if let Ok(p) = std::env::var("EG4_BENCH_PARTS") {
            parts = p
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
    }
    if parts.is_empty() || parts.iter().any(|p| p == "all") {
        parts = PARTS.iter().map(|s| s.to_string()).collect();
    }
    if let Some(bad) = parts.iter().find(|p| !PARTS.contains(&p.as_str())) {
        eprintln!("unknown part `{bad}`; parts: {} (or all)", PARTS.join(", "));
        std::process::exit(2);
    }
    println!("eg4_pty benchmark — simulator {}", sim_bin());
    println!("   parts: {}", parts.join(", "));
    println!(
        "   host: {} CPUs, load average {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut v = Verdicts { missed: Vec::new() };
    let mut failed = Vec::new();
    for p in &parts {
        let r = match p.as_str() {
            "roundtrip" => part_roundtrip(&mut v),
            "wiretime" => part_wiretime(&mut v),
            "scale" => part_scale(&mut v),
            _ => unreachable!(),
        };
        if let Err(e) = r {
            println!("   !! {p} FAILED: {e}");
            failed.push(format!("{p}: {e}"));
        }
        println!();
    }
    println!("── summary ────────────────────────────────────────────────────────────");
    if failed.is_empty() && v.missed.is_empty() {
        println!("   all targets met");
    }
    for m in &v.missed {
        println!("   target missed — {m}");
    }
    for f in &failed {
        println!("   FAILED — {f}");
    }
    let strict = std::env::var("EG4_BENCH_STRICT").map(|s| s == "1").unwrap_or(false);
    if !failed.is_empty() || (strict && !v.missed.is_empty()) {
        std::process::exit(1);
    }
}
