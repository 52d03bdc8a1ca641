//! Benchmark of the latency a replay adds over the simulator it was captured from. Not
//! pass/fail: it prints what it measured.
//!
//! * `udp` – `hilbench sim smp-server --udp` and `hilbench sim replay --udp` of
//!   fixtures/captures/imported/smp-dfu-udp…jsonl (dumpcap's capture of smpclient updating
//!   that simulator) answer the same captured echo request (`{"d": "hello smp"}`, the live
//!   sequence number each time) from a raw UDP client, one after another: p50/p99 round
//!   trip and each server's CPU per request, and the difference. The replay matches every
//!   request against the whole 130-frame capture from where the last match ended, so its
//!   cost grows with the capture's length; the simulator decodes, runs the command and
//!   encodes.
//!
//! Run:   cargo bench --bench replay_latency           (release build)
//! Knobs: REPLAY_BENCH_REQUESTS=5000 (after 200 warm-ups).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

const BIN: &str = env!("CARGO_BIN_EXE_hilbench");
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/captures/imported/smp-dfu-udp.udp-127-0-0-1-1337.jsonl");

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
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

fn start(args: &[&str]) -> Server {
    let mut child = Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("hilbench starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("a ready line");
    let ready: serde_json::Value = serde_json::from_str(&line).expect("the ready line is JSON");
    let addr = ready["endpoints"]["udp"].as_str().expect("endpoints.udp").parse().unwrap();
    Server { child, addr }
}

/// The captured echo request: its bytes, from the fixture.
fn captured_echo() -> Vec<u8> {
    let text = std::fs::read_to_string(FIXTURE).expect("the fixture");
    for line in text.lines().skip(1) {
        let f: serde_json::Value = serde_json::from_str(line).unwrap();
        let hex = f["hex"].as_str().unwrap();
        // v2 write, group 0, command 0, {"d": "hello smp"}.
        if f["dir"] == "request" && hex.starts_with("0a00") && hex.contains(&hilbench::protocol::lower_hex(b"hello smp")) {
            return hilbench::scenario::spec::parse_hex(hex).unwrap();
        }
    }
    panic!("no echo of `hello smp` in {FIXTURE}");
}

/// Round trips of `request` (seq varied): p50, p99 (µs) and the server's CPU per request (µs).
fn rtts(server: &Server, request: &[u8], n: usize) -> (u64, u64, f64) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut req = request.to_vec();
    let mut once = |i: usize, req: &mut Vec<u8>| -> Duration {
        req[6] = i as u8;
        let t = Instant::now();
        sock.send_to(req, server.addr).unwrap();
        loop {
            let (k, _) = sock.recv_from(&mut buf).expect("an answer");
            if k > 6 && buf[6] == req[6] {
                return t.elapsed();
            }
        }
    };
    for i in 0..200 {
        once(i, &mut req);
    }
    let cpu0 = hilbench::cli::load::process_cpu_seconds(Some(server.child.id())).unwrap_or(0.0);
    let mut h = Histogram::<u64>::new(3).unwrap();
    for i in 0..n {
        let _ = h.record(once(i, &mut req).as_micros() as u64);
    }
    let cpu = hilbench::cli::load::process_cpu_seconds(Some(server.child.id())).unwrap_or(0.0) - cpu0;
    (h.value_at_quantile(0.5), h.value_at_quantile(0.99), cpu * 1e6 / n as f64)
}

fn main() {
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if !only.is_empty() && !only.iter().any(|o| o == "udp") {
        return;
    }
    let n = knob("REPLAY_BENCH_REQUESTS", 5000);
    let echo = captured_echo();
    let sim = start(&["sim", "smp-server", "--udp", "127.0.0.1:0"]);
    let (s50, s99, scpu) = rtts(&sim, &echo, n);
    drop(sim);
    let replay = start(&["sim", "replay", FIXTURE, "--udp", "127.0.0.1:0"]);
    let (r50, r99, rcpu) = rtts(&replay, &echo, n);
    drop(replay);
    println!("replay latency, UDP echo, {n} sequential requests:");
    println!("  sim smp-server     p50 {s50:>5} µs  p99 {s99:>5} µs  server CPU {scpu:.1} µs/request");
    println!("  sim replay         p50 {r50:>5} µs  p99 {r99:>5} µs  server CPU {rcpu:.1} µs/request");
    println!("  replay - simulator p50 {:>+5} µs  p99 {:>+5} µs", r50 as i64 - s50 as i64, r99 as i64 - s99 as i64);
}
