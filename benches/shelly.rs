//! Benchmarks of the Shelly device on loopback. Not pass/fail: each part prints what it
//! measured next to the issue's goal.
//!
//! * `http`  – `hilbench sim shelly`: sequential `POST /rpc` Shelly.GetDeviceInfo calls on one
//!   keep-alive connection (a raw HTTP/1.1 client), p50/p99 and the server's CPU per call
//!   (goal: p50 ≤ 100 µs, ≤ 20 µs CPU).
//! * `ws`    – the same calls as WebSocket frames on `ws://…/rpc` (goal: p50 ≤ 80 µs, ≤ 10 µs CPU).
//! * `scale` – 500 devices in this process (`shelly_host::serve`, each on its own port), every
//!   one answering `GET /shelly`: time to start, RSS added (goal: under 100 MB).
//!
//! The reference's anchor, virtual_shelly3empro (Python FastAPI) measured on this machine
//! with the same call sequence: HTTP p50 405 µs and 320 µs server CPU per request, WebSocket
//! p50 267 µs and 175 µs CPU. It is not on a package registry, so it is not fetched here.
//!
//! Run:   cargo bench --bench shelly                    (all parts; release build)
//!        cargo bench --profile dev --bench shelly -- ws   (one part)
//! Knobs: SHELLY_BENCH_CALLS=2000 (after 100 warm-ups), SHELLY_BENCH_DEVICES=500.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

const SIM: &str = env!("CARGO_BIN_EXE_hilbench");
const CALL: &str = r#"{"id":1,"src":"bench","method":"Shelly.GetDeviceInfo"}"#;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Sim {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sim() -> Sim {
    let mut child = Command::new(SIM).args(["sim", "shelly", "--http", "127.0.0.1:0"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("hilbench starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("a ready line");
    let ready: serde_json::Value = serde_json::from_str(&line).expect("the ready line is JSON");
    let http = ready["endpoints"]["http"].as_str().expect("endpoints.http");
    Sim { child, addr: http.trim_start_matches("http://").parse().unwrap() }
}

fn cpu_seconds(pid: u32) -> f64 {
    hilbench::cli::load::process_cpu_seconds(Some(pid)).unwrap_or(0.0)
}

fn rss_kb() -> u64 {
    hilbench::cli::load::process_rss_kb(std::process::id()).unwrap_or(0)
}

/// One HTTP/1.1 request on a kept-alive connection; the body of the answer.
fn http_call(stream: &mut BufReader<TcpStream>, request: &[u8]) -> Vec<u8> {
    stream.get_mut().write_all(request).unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    body
}

fn report(what: &str, hist: &Histogram<u64>, cpu_s: f64, calls: usize, goal: &str) {
    println!(
        "{what}: {calls} calls, p50 {} µs, p99 {} µs, server CPU {:.1} µs per call ({goal})",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        cpu_s * 1e6 / calls as f64
    );
}

fn http() {
    let calls = knob("SHELLY_BENCH_CALLS", 2000);
    let sim = start_sim();
    let request = format!("POST /rpc HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{CALL}", sim.addr, CALL.len());
    let stream = TcpStream::connect(sim.addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut stream = BufReader::new(stream);
    for _ in 0..100 {
        http_call(&mut stream, request.as_bytes());
    }
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let cpu0 = cpu_seconds(sim.child.id());
    for _ in 0..calls {
        let t = Instant::now();
        let body = http_call(&mut stream, request.as_bytes());
        hist.record(t.elapsed().as_micros() as u64).unwrap();
        assert!(String::from_utf8_lossy(&body).contains("\"id\":1,"), "{}", String::from_utf8_lossy(&body));
    }
    report("http POST /rpc", &hist, cpu_seconds(sim.child.id()) - cpu0, calls, "goal: p50 ≤ 100 µs, ≤ 20 µs CPU; virtual_shelly3empro: 405 µs, 320 µs");
}

fn ws() {
    use tokio_tungstenite::tungstenite::{client, Message};
    let calls = knob("SHELLY_BENCH_CALLS", 2000);
    let sim = start_sim();
    let stream = TcpStream::connect(sim.addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut socket, _) = client(format!("ws://{}/rpc", sim.addr), stream).expect("the WebSocket opens");
    let mut one = || {
        socket.send(Message::text(CALL)).unwrap();
        // Skip notifications; the answer carries the id.
        loop {
            if let Message::Text(t) = socket.read().unwrap() {
                if t.as_str().contains("\"id\":1,") {
                    return;
                }
            }
        }
    };
    for _ in 0..100 {
        one();
    }
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let cpu0 = cpu_seconds(sim.child.id());
    for _ in 0..calls {
        let t = Instant::now();
        one();
        hist.record(t.elapsed().as_micros() as u64).unwrap();
    }
    report("ws /rpc", &hist, cpu_seconds(sim.child.id()) - cpu0, calls, "goal: p50 ≤ 80 µs, ≤ 10 µs CPU; virtual_shelly3empro: 267 µs, 175 µs");
}

fn scale() {
    use hilbench::device::shelly_core::ShellyConfig;
    use hilbench::device::shelly_host::{self, ShellyEndpoints};
    let n = knob("SHELLY_BENCH_DEVICES", 500);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let before = rss_kb();
    let t = Instant::now();
    let devices = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..n {
            let config = ShellyConfig { seed: i as u64 + 1, ..Default::default() };
            let endpoints = ShellyEndpoints { http: "127.0.0.1:0".parse().unwrap(), seed: 0, frame_limit: Some(100), link_name: None, ble: None, connection_faults: None };
            v.push(shelly_host::serve(config, endpoints).await.expect("a device starts"));
        }
        v
    });
    let started = t.elapsed();
    let answered = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut ok = 0;
        for d in &devices {
            let Ok(mut s) = tokio::net::TcpStream::connect(d.http_addr()).await else { continue };
            let _ = s.write_all(b"GET /shelly HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
            let mut text = Vec::new();
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut text)).await {
                ok += usize::from(String::from_utf8_lossy(&text).contains(d.id()));
            }
        }
        ok
    });
    let added = rss_kb().saturating_sub(before);
    println!("scale {n} devices in one process: started in {:.2} s, {answered}/{n} answered GET /shelly, RSS +{:.1} MB (goal: under 100 MB)", started.as_secs_f64(), added as f64 / 1024.0);
    rt.block_on(async {
        for d in devices {
            d.shutdown().await;
        }
    });
}

fn main() {
    let named: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let want = |part: &str| named.is_empty() || named.iter().any(|n| n == part);
    if want("http") {
        http();
    }
    if want("ws") {
        ws();
    }
    if want("scale") {
        scale();
    }
}
