//! Benchmarks of the SMP server over UDP on loopback. Not pass/fail: each part prints what it
//! measured (and, where the issue names one, the goal next to it).
//!
//! * `echo`   – `hilbench sim smp-server`: sequential echo round trips from a raw UDP client,
//!   p50/p99 and the server's CPU per request; then the same against Zephyr 4.4's own smp_svr
//!   (native_sim, UDP) when its binary is there (`ci/test.sh` keeps the smpclient 7.3.0 sdist
//!   in target/zephyr-smp; this extracts the UDP build from it). That binary binds
//!   0.0.0.0:1337, so nothing else may hold port 1337.
//! * `upload` – 255 KiB images one after another, stop-and-wait chunks filling the default 2048-byte buffer:
//!   MB/s and the server's CPU per KiB (goal: the server is never the limit).
//! * `serial` – an upload over the PTY with wire-time pacing at 115200 baud (8N1, console
//!   framing, 384-byte buffers, stop-and-wait): the time it took against the ceiling its own
//!   wire bytes set (requests and answers, after base64, line and CRC overhead; goal: within 5%).
//! * `scale`  – 1,000 servers in this process (`smp_host::serve`, each on its own UDP port),
//!   every one answering an echo: time to start, RSS added (goal: under 100 MB).
//! * `ble`    – `hilbench sim smp-server --ble` on its own virtual air, hilbench's SMP client
//!   (btleplug) as the central: echo round trips and a 64 KiB upload at one MTU (knob; run it
//!   again for another, one air per process). The air has
//!   no radio timing (no connection interval, no PHY rate): these are the costs of the air and
//!   the BlueZ D-Bus path itself, the floor under any radio model (a real 1M PHY link at MTU
//!   23 and a 30 ms interval carries about 1-3 kB/s; MTU 247 with DLE 40-100 kB/s).
//!
//! Run:   cargo bench --bench smp                  (all parts; release build)
//!        cargo bench --profile dev --bench smp -- echo   (one part, the dev profile)
//!        parts: echo, upload, serial, scale, ble
//! Knobs: SMP_BENCH_REQUESTS=2000 (echo, after 100 warm-ups), SMP_BENCH_UPLOADS=20 (upload),
//!        SMP_BENCH_SERVERS=1000 (scale), SMP_BENCH_BLE_REQUESTS=300 (ble echo),
//!        SMP_BENCH_BLE_MTU=247 (ble).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ciborium::Value;
use hdrhistogram::Histogram;
use hilbench::protocol::mcuboot::{self, ImageVersion};
use hilbench::protocol::smp::{self, SmpHeader, SmpOp, SmpVersion};

const SIM: &str = env!("CARGO_BIN_EXE_hilbench");
const ZEPHYR_UDP: &str = "zephyr_4.4.0_smp_server_0eae053d_native_sim_udp.exe";

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn message(op: SmpOp, group: u16, command: u8, seq: u8, body: Vec<(&str, Value)>) -> Vec<u8> {
    let payload = smp::encode_map(body);
    let mut m = SmpHeader::new(SmpVersion::V2, op, group, command, seq, payload.len() as u16).encode().to_vec();
    m.extend(payload);
    m
}

/// One request, its answer's payload (the seq must match; stale answers are skipped).
fn ask(sock: &UdpSocket, to: SocketAddr, request: &[u8], buf: &mut [u8]) -> Result<Vec<(Value, Value)>, String> {
    sock.send_to(request, to).map_err(|e| e.to_string())?;
    let seq = request[6];
    loop {
        let (n, _) = sock.recv_from(buf).map_err(|e| format!("no answer: {e}"))?;
        let f = smp::SmpFrame::parse(&buf[..n]).map_err(|e| format!("{e:?}"))?;
        if f.header.seq == seq {
            return smp::decode_map(&f.payload).map_err(|e| format!("{e:?}"));
        }
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    hilbench::cli::load::process_cpu_seconds(Some(pid)).unwrap_or(0.0)
}

fn rss_kb() -> u64 {
    hilbench::cli::load::process_rss_kb(std::process::id()).unwrap_or(0)
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `hilbench sim smp-server ARGS…` and its ready line (its endpoints).
fn sim_ready(args: &[&str]) -> (Child, serde_json::Value) {
    let mut child = Command::new(SIM).args(["sim", "smp-server"]).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("hilbench starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("a ready line");
    let ready: serde_json::Value = serde_json::from_str(&line).expect("the ready line is JSON");
    (child, ready["endpoints"].clone())
}

fn start_sim(args: &[&str]) -> Server {
    let mut all = vec!["--udp", "127.0.0.1:0"];
    all.extend(args);
    let (child, endpoints) = sim_ready(&all);
    let addr = endpoints["udp"].as_str().expect("endpoints.udp").parse().unwrap();
    Server { child, addr }
}

/// Zephyr's UDP smp_svr, extracted from the sdist ci/test.sh downloaded, or None.
fn zephyr_udp() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/zephyr-smp");
    let exe = dir.join(ZEPHYR_UDP);
    if !exe.is_file() {
        let sdist = dir.join("smpclient-7.3.0.tar.gz");
        let member = format!("smpclient-7.3.0/tests/fixtures/smp-server/{ZEPHYR_UDP}");
        let ok = sdist.is_file() && Command::new("tar").arg("-xzf").arg(&sdist).arg("-C").arg(&dir).args(["--strip-components=4", &member]).status().is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
    }
    Some(exe)
}

/// Echo round trips: p50, p99 (µs) and CPU per request (µs) of `pid`.
fn echo_loop(to: SocketAddr, pid: u32, requests: usize) -> Result<(u64, u64, f64), String> {
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let body = || vec![("d", Value::Text("hilbench echo".into()))];
    for i in 0..100 {
        ask(&sock, to, &message(SmpOp::Write, 0, 0, i as u8, body()), &mut buf)?;
    }
    let mut h = Histogram::<u64>::new(3).unwrap();
    let cpu0 = cpu_seconds(pid);
    for i in 0..requests {
        let m = message(SmpOp::Write, 0, 0, i as u8, body());
        let t = Instant::now();
        ask(&sock, to, &m, &mut buf)?;
        h.record(t.elapsed().as_micros() as u64).unwrap();
    }
    let cpu = (cpu_seconds(pid) - cpu0) / requests as f64 * 1e6;
    Ok((h.value_at_quantile(0.5), h.value_at_quantile(0.99), cpu))
}

fn echo() {
    let requests = knob("SMP_BENCH_REQUESTS", 2000);
    let ours = start_sim(&[]);
    match echo_loop(ours.addr, ours.child.id(), requests) {
        Ok((p50, p99, cpu)) => println!("echo  hilbench      {requests} requests: p50 {p50} µs, p99 {p99} µs, server CPU {cpu:.1} µs/request (goal: p50 ≤ 50 µs, ≤ 10 µs CPU)"),
        Err(e) => println!("echo  hilbench      FAILED: {e}"),
    }
    drop(ours);
    let Some(exe) = zephyr_udp() else {
        println!("echo  zephyr        skipped: no target/zephyr-smp/smpclient-7.3.0.tar.gz (run ci/test.sh once)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(&exe).arg("-stop_at=600").current_dir(dir.path()).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
    let Ok(child) = child else {
        println!("echo  zephyr        skipped: {} does not start", exe.display());
        return;
    };
    let zephyr = Server { child, addr: "127.0.0.1:1337".parse().unwrap() };
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = vec![0u8; 4096];
    let up = (0..50).any(|i| ask(&sock, zephyr.addr, &message(SmpOp::Read, 0, 6, i, vec![]), &mut buf).is_ok());
    if !up {
        println!("echo  zephyr        skipped: no answer on 127.0.0.1:1337 (is the port taken?)");
        return;
    }
    match echo_loop(zephyr.addr, zephyr.child.id(), requests) {
        Ok((p50, p99, cpu)) => println!("echo  zephyr 4.4.0  {requests} requests: p50 {p50} µs, p99 {p99} µs, server CPU {cpu:.1} µs/request (native_sim answers on its 10 ms tick)"),
        Err(e) => println!("echo  zephyr 4.4.0  FAILED: {e}"),
    }
}

fn upload() {
    let server = start_sim(&[]);
    let rounds = knob("SMP_BENCH_UPLOADS", 20);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 4096];
    // 2048-byte buffer: header, map and keys take under 100 bytes.
    let chunk = 1900;
    let (cpu0, t) = (cpu_seconds(server.child.id()), Instant::now());
    let (mut seq, mut bytes, mut chunks) = (0u8, 0usize, 0usize);
    for round in 0..rounds {
        // Each image differs, so each upload is a new session over the old one.
        let image = mcuboot::build_image(ImageVersion { major: 2, revision: round as u16, ..Default::default() }, &vec![0x5a; 255 * 1024]);
        let sha = Value::Bytes(mcuboot::sha256(&image).to_vec());
        let mut off = 0;
        while off < image.len() {
            let end = (off + chunk).min(image.len());
            let mut body = vec![("off", Value::from(off as u64)), ("data", Value::Bytes(image[off..end].to_vec()))];
            if off == 0 {
                body.extend([("len", Value::from(image.len() as u64)), ("sha", sha.clone())]);
            }
            seq = seq.wrapping_add(1);
            let m = match ask(&sock, server.addr, &message(SmpOp::Write, 1, 1, seq, body), &mut buf) {
                Ok(m) => m,
                Err(e) => return println!("upload FAILED at {off}: {e}"),
            };
            let Some(next) = smp::get(&m, "off").and_then(smp::as_u64) else { return println!("upload FAILED at {off}: {m:?}") };
            off = next as usize;
            chunks += 1;
        }
        bytes += image.len();
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server.child.id()) - cpu0;
    println!(
        "upload {rounds} images, {bytes} bytes in {chunks} chunks of {chunk}: {:.1} MB/s, {:.0} µs a chunk; server CPU {:.2} µs/KiB, {:.0}% of the wall time (the rest: client and loopback)",
        bytes as f64 / secs / 1e6,
        secs / chunks as f64 * 1e6,
        cpu / (bytes as f64 / 1024.0) * 1e6,
        cpu / secs * 100.0
    );
}

fn serial() {
    use hilbench::protocol::smp::serial;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let baud = 115_200u32;
    let (child, endpoints) = sim_ready(&["--tty", "auto", "--baud", "115200", "--buf-size", "384", "--no-banner"]);
    let tty = PathBuf::from(endpoints["tty"].as_str().expect("endpoints.tty"));
    let server = Server { child, addr: "127.0.0.1:0".parse().unwrap() };
    let image = mcuboot::build_image(ImageVersion { major: 2, ..Default::default() }, &vec![0x5a; 32 * 1024]);
    let sha = Value::Bytes(mcuboot::sha256(&image).to_vec());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let result: Result<(usize, usize, f64), String> = rt.block_on(async {
        let mut port = hilbench::transport::serial::open_serial(&tty, baud).map_err(|e| e.to_string())?;
        let (mut wire, mut chunks, mut off, mut seq) = (0usize, 0usize, 0usize, 0u8);
        let mut rx = serial::Receiver::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = [0u8; 1024];
        let t = Instant::now();
        while off < image.len() {
            // What fits 384 bytes with the header, the keys and (first) len and sha.
            let end = (off + if off == 0 { 250 } else { 320 }).min(image.len());
            let mut body = vec![("off", Value::from(off as u64)), ("data", Value::Bytes(image[off..end].to_vec()))];
            if off == 0 {
                body.extend([("len", Value::from(image.len() as u64)), ("sha", sha.clone())]);
            }
            seq = seq.wrapping_add(1);
            let lines = serial::encode(&message(SmpOp::Write, 1, 1, seq, body), serial::MAX_LINE);
            port.write_all(&lines).await.map_err(|e| e.to_string())?;
            wire += lines.len();
            let answer = loop {
                if let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                    let l: Vec<u8> = pending.drain(..=nl).collect();
                    wire += l.len();
                    if let serial::LineOutcome::Message(m) = rx.push_line(&l) {
                        break m;
                    }
                    continue;
                }
                let n = tokio::time::timeout(Duration::from_secs(5), port.read(&mut buf)).await.map_err(|_| format!("no answer at {off}"))?.map_err(|e| e.to_string())?;
                pending.extend_from_slice(&buf[..n]);
            };
            let f = smp::SmpFrame::parse(&answer).map_err(|e| format!("{e:?}"))?;
            let m = smp::decode_map(&f.payload).map_err(|e| format!("{e:?}"))?;
            off = smp::get(&m, "off").and_then(smp::as_u64).ok_or_else(|| format!("no off at {off}: {m:?}"))? as usize;
            chunks += 1;
        }
        Ok((wire, chunks, t.elapsed().as_secs_f64()))
    });
    drop(server);
    match result {
        Ok((wire, chunks, secs)) => {
            let ceiling = wire as f64 * 10.0 / f64::from(baud);
            println!(
                "serial {} bytes in {chunks} chunks at {baud} baud: {:.2} s, {:.0} SMP bytes/s; its {wire} wire bytes both ways need {:.2} s at line rate: {:.1}% of the ceiling (goal: ≥ 95%)",
                image.len(),
                secs,
                image.len() as f64 / secs,
                ceiling,
                ceiling / secs * 100.0
            );
        }
        Err(e) => println!("serial FAILED: {e}"),
    }
}

fn scale() {
    use hilbench::device::smp_core::SmpServerConfig;
    use hilbench::device::smp_host::{self, SmpEndpoints};
    let n = knob("SMP_BENCH_SERVERS", 1000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let before = rss_kb();
    let t = Instant::now();
    let servers = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..n {
            let config = SmpServerConfig { name: format!("s{i}"), buf_size: 2048, ..Default::default() };
            let endpoints = SmpEndpoints { udp: Some("127.0.0.1:0".parse().unwrap()), frame_limit: Some(100), ..Default::default() };
            v.push(smp_host::serve(config, endpoints).await.expect("a server starts"));
        }
        v
    });
    let started = t.elapsed();
    let answered = rt.block_on(async {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 512];
        let mut ok = 0;
        for (i, s) in servers.iter().enumerate() {
            let m = message(SmpOp::Write, 0, 0, i as u8, vec![("d", Value::Text("hi".into()))]);
            sock.send_to(&m, s.udp_addr().unwrap()).await.unwrap();
            if let Ok(Ok((n, _))) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await {
                ok += usize::from(smp::SmpFrame::parse(&buf[..n]).is_ok_and(|f| f.header.seq == i as u8));
            }
        }
        ok
    });
    let added = rss_kb().saturating_sub(before);
    println!("scale {n} servers in one process: started in {:.2} s, {answered}/{n} answered an echo, RSS +{:.1} MB (goal: under 100 MB)", started.as_secs_f64(), added as f64 / 1024.0);
    rt.block_on(async {
        for s in servers {
            s.shutdown().await;
        }
    });
}

/// The sim on its own air, at `mtu`: the process, its BLE address and the air's bus.
fn start_ble_sim(mtu: u16) -> (Child, String, String) {
    let (child, e) = sim_ready(&["--ble", "--buf-size", "2048", "--mtu", &mtu.to_string()]);
    (child, e["ble"].as_str().expect("endpoints.ble").to_string(), e["dbus_system_bus_address"].as_str().expect("the air's bus").to_string())
}

fn ble() {
    use hilbench::client::smp_client::{SmpConn, SmpTarget};
    let requests = knob("SMP_BENCH_BLE_REQUESTS", 300);
    // One air per process: libdbus reads the system bus address once.
    let mtu = knob("SMP_BENCH_BLE_MTU", 247) as u16;
    {
        let (mut child, address, bus) = start_ble_sim(mtu);
        // btleplug (through bluer) reads the system bus address at its first connection.
        std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &bus);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let outcome = rt.block_on(async {
            let target = SmpTarget::Ble { address, adapter: Some("hci0".into()) };
            let mut conn = SmpConn::connect(&target, Duration::from_secs(5)).await?;
            let echo = smp::encode_map(vec![("d", Value::Text("hilbench echo".into()))]);
            for _ in 0..20 {
                conn.exchange(SmpVersion::V2, SmpOp::Write, 0, 0, echo.clone()).await.map_err(|e| e.to_string())?;
            }
            let mut h = Histogram::<u64>::new(3).unwrap();
            for _ in 0..requests {
                let ex = conn.exchange(SmpVersion::V2, SmpOp::Write, 0, 0, echo.clone()).await.map_err(|e| e.to_string())?;
                h.record(ex.rtt.as_micros() as u64).unwrap();
            }
            // 64 KiB in stop-and-wait chunks that fill the 2048-byte buffer.
            let image = mcuboot::build_image(ImageVersion { major: 2, ..Default::default() }, &vec![0x5a; 64 * 1024]);
            let sha = Value::Bytes(mcuboot::sha256(&image).to_vec());
            let (t, mut off, mut chunks) = (Instant::now(), 0usize, 0usize);
            while off < image.len() {
                let end = (off + 1900).min(image.len());
                let mut body = vec![("off", Value::from(off as u64)), ("data", Value::Bytes(image[off..end].to_vec()))];
                if off == 0 {
                    body.extend([("len", Value::from(image.len() as u64)), ("sha", sha.clone())]);
                }
                let ex = conn.exchange(SmpVersion::V2, SmpOp::Write, 1, 1, smp::encode_map(body)).await.map_err(|e| e.to_string())?;
                let m = smp::decode_map(&ex.answer.payload).map_err(|e| e.to_string())?;
                off = smp::get(&m, "off").and_then(smp::as_u64).ok_or_else(|| format!("no off in {m:?}"))? as usize;
                chunks += 1;
            }
            Ok::<_, String>((h.value_at_quantile(0.5), h.value_at_quantile(0.99), image.len() as f64 / t.elapsed().as_secs_f64(), chunks))
        });
        match outcome {
            Ok((p50, p99, rate, chunks)) => println!(
                "ble   MTU {mtu:>3}  echo {requests} requests: p50 {p50} µs, p99 {p99} µs; upload 64 KiB in {chunks} chunks ({} writes each): {:.0} kB/s (no radio timing: the air's own cost)",
                1900usize.div_ceil(usize::from(mtu) - 3),
                rate / 1000.0
            ),
            Err(e) => println!("ble   MTU {mtu:>3}  FAILED: {e}"),
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn main() {
    let named: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let want = |part: &str| named.is_empty() || named.iter().any(|n| n == part);
    if want("echo") {
        echo();
    }
    if want("upload") {
        upload();
    }
    if want("serial") {
        serial();
    }
    if want("scale") {
        scale();
    }
    if want("ble") {
        ble();
    }
}
