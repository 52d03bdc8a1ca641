//! Soak: the air (`hilbench air`) and a BACnet/SC hub (`hilbench sim
//! bsc-hub --plaintext`) as separate processes, each under abusive clients
//! for a fixed time, while a legitimate client keeps using them. Reports,
//! every 10 s, each server's RSS and open descriptors and how many of the
//! legitimate client's attempts in that window succeeded (and the slowest).
//! Not a pass/fail test: it shows whether the limits of `src/limits.rs` hold
//! over time (memory flat, descriptors bounded, legitimate clients served).
//!
//! Abuse, all on this machine's loopback and abstract sockets:
//! * air: 4 connections that authenticate and then only write Introspect
//!   calls, never reading a reply (the bus cuts each off at its byte limit;
//!   they reconnect), and up to 200 connections that never authenticate
//!   (closed after the auth timeout; reopened);
//! * hub: 200 slowloris sockets from one address that connect and send
//!   nothing (closed after the first-byte timeout; reopened).
//!
//! Legitimate clients, one attempt every 2 s each: `dbus-send`
//! GetManagedObjects on the air's bus (5 s timeout), and a WebSocket node
//! from 127.0.0.2 (the slowloris sockets come from 127.0.0.1) that upgrades
//! with the hub subprotocol and sends a Connect-Request, counted when the
//! Connect-Accept arrives within 5 s.
//!
//! Run:   cargo bench --bench soak                 (600 s)
//!        SOAK_SECS=60 cargo bench --bench soak    (shorter)
//! Knobs: SOAK_UNREAD_CALLERS=4, SOAK_UNAUTHENTICATED=200, SOAK_SLOWLORIS=200 (0 turns one off).
//! Prints one line per 10 s and a JSON summary at the end.

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hilbench::protocol::bvlc_sc::{encode, BvlcMessage, BvlcPayload, DeviceUuid, Vmac};
use hilbench::protocol::dbus::{BusMessage, METHOD_CALL};

const SAMPLE: Duration = Duration::from_secs(10);
const ATTEMPT_EVERY: Duration = Duration::from_secs(2);
fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A legitimate client's attempts in the current window.
#[derive(Default)]
struct Window {
    tried: u64,
    ok: u64,
    slowest: Duration,
}

impl Window {
    fn record(&mut self, ok: bool, took: Duration) {
        self.tried += 1;
        if ok {
            self.ok += 1;
        }
        self.slowest = self.slowest.max(took);
    }
}

struct Server {
    child: Child,
    ready: serde_json::Value,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hilbench"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hilbench");
    let mut out = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).map(|n| n == 1).unwrap_or(false) && b[0] != b'\n' {
        line.push(b[0]);
    }
    let ready = serde_json::from_slice(&line).unwrap_or_else(|e| panic!("{args:?}: no ready line ({e})"));
    Server { child, ready }
}

/// (RSS in MiB, open descriptors) of a process.
fn usage(pid: u32) -> (f64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0.0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (kb / 1024.0, fds)
}

fn bus_socket(address: &str) -> std::io::Result<UnixStream> {
    let spec = address.strip_prefix("unix:").unwrap_or(address);
    let value = |key: &str| spec.split(',').find_map(|kv| kv.strip_prefix(key).map(str::to_string));
    match (value("abstract="), value("path=")) {
        (Some(a), _) => UnixStream::connect_addr(&SocketAddr::from_abstract_name(a.as_bytes())?),
        (_, Some(p)) => UnixStream::connect(p),
        _ => Err(std::io::Error::other(format!("no socket in {address}"))),
    }
}

fn call(serial: u32, destination: &str, path: &str, interface: &str, member: &str) -> Vec<u8> {
    BusMessage {
        kind: METHOD_CALL,
        serial,
        destination: Some(destination.into()),
        path: Some(path.into()),
        interface: Some(interface.into()),
        member: Some(member.into()),
        ..Default::default()
    }
    .encode()
}

/// Authenticates, says Hello, then writes Introspect calls and never reads.
fn unread_caller(address: &str, stop: &AtomicBool, cut_off: &AtomicU64) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = bus_socket(address) else { std::thread::sleep(Duration::from_millis(100)); continue };
        let uid: String = unsafe { libc::getuid() }.to_string().bytes().map(|b| format!("{b:02x}")).collect();
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        let mut hello = format!("\0AUTH EXTERNAL {uid}\r\n").into_bytes();
        let mut line = [0u8; 64];
        if s.write_all(&hello).is_err() || s.read(&mut line).unwrap_or(0) == 0 {
            continue;
        }
        hello = b"BEGIN\r\n".to_vec();
        hello.extend(call(1, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello"));
        if s.write_all(&hello).is_err() {
            continue;
        }
        let mut serial = 2u32;
        while !stop.load(Ordering::Relaxed) {
            let batch: Vec<u8> = (0..64)
                .flat_map(|i| call(serial + i, "org.bluez", "/", "org.freedesktop.DBus.Introspectable", "Introspect"))
                .collect();
            serial = serial.wrapping_add(64);
            match s.write_all(&batch) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => {
                    cut_off.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

/// Keeps `n` sockets open that connect and never send (a bus's SASL or a
/// hub's ClientHello never comes); reopens what the server closes.
fn silent_sockets(n: usize, open: impl Fn() -> std::io::Result<Box<dyn Read + Send>>, stop: &AtomicBool, closed: &AtomicU64) {
    let mut socks: Vec<Box<dyn Read + Send>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        while socks.len() < n {
            match open() {
                Ok(s) => socks.push(s),
                Err(_) => break,
            }
        }
        // A server close shows as EOF or an error; a live silent socket as WouldBlock.
        let before = socks.len();
        socks.retain_mut(|s| {
            let mut b = [0u8; 256];
            match s.read(&mut b) {
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                Ok(n) => n > 0,
            }
        });
        closed.fetch_add((before - socks.len()) as u64, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn legit_air(address: &str) -> (bool, Duration) {
    let t = Instant::now();
    let ok = Command::new("dbus-send")
        .arg(format!("--bus={address}"))
        .args(["--print-reply", "--reply-timeout=5000", "--dest=org.bluez", "/", "org.freedesktop.DBus.ObjectManager.GetManagedObjects"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (ok, t.elapsed())
}

async fn legit_hub(addr: std::net::SocketAddr, n: u64) -> (bool, Duration) {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let t = Instant::now();
    let attempt = async {
        // From another loopback address than the slowloris sockets, as a
        // legitimate node on another host would come.
        let sock = tokio::net::TcpSocket::new_v4().ok()?;
        sock.bind("127.0.0.2:0".parse().ok()?).ok()?;
        let tcp = sock.connect(addr).await.ok()?;
        let mut req = format!("ws://{addr}/").into_client_request().ok()?;
        req.headers_mut().insert("Sec-WebSocket-Protocol", "hub.bsc.bacnet.org".parse().ok()?);
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.ok()?;
        let b = (n as u32).to_be_bytes();
        let vmac = Vmac([0x02, 0x50, b[0], b[1], b[2], b[3]]);
        let mut u = [0x50; 16];
        u[12..].copy_from_slice(&b);
        let msg = BvlcMessage::new(1, BvlcPayload::ConnectRequest { vmac, uuid: DeviceUuid(u), max_bvlc: 1600, max_npdu: 1497 });
        ws.send(Message::Binary(encode(&msg).ok()?.into())).await.ok()?;
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Binary(b) = m {
                let accepted = matches!(hilbench::protocol::bvlc_sc::decode(&b), Ok(BvlcMessage { payload: BvlcPayload::ConnectAccept { .. }, .. }));
                let _ = ws.close(None).await;
                return Some(accepted);
            }
        }
        None
    };
    let ok = tokio::time::timeout(Duration::from_secs(5), attempt).await.ok().flatten().unwrap_or(false);
    (ok, t.elapsed())
}

fn main() {
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let air = start(&["air"]);
    let hub = start(&["sim", "bsc-hub", "--listen", "127.0.0.1:0", "--plaintext"]);
    let bus = air.ready["dbus_system_bus_address"].as_str().expect("air ready line has the bus").to_string();
    let hub_addr: std::net::SocketAddr =
        hub.ready["url"].as_str().expect("hub ready line has a url").trim_start_matches("ws://").trim_end_matches('/').parse().expect("hub address");
    let stop = Arc::new(AtomicBool::new(false));
    let counters: Arc<[AtomicU64; 3]> = Arc::new(Default::default()); // cut off, air closed, hub closed
    let mut threads = Vec::new();
    for _ in 0..knob("SOAK_UNREAD_CALLERS", 4) {
        let (bus, stop, c) = (bus.clone(), stop.clone(), counters.clone());
        threads.push(std::thread::spawn(move || unread_caller(&bus, &stop, &c[0])));
    }
    {
        let (bus, stop, c) = (bus.clone(), stop.clone(), counters.clone());
        threads.push(std::thread::spawn(move || {
            let open = || -> std::io::Result<Box<dyn Read + Send>> {
                let s = bus_socket(&bus)?;
                s.set_nonblocking(true)?;
                Ok(Box::new(s))
            };
            silent_sockets(knob("SOAK_UNAUTHENTICATED", 200), open, &stop, &c[1])
        }));
    }
    {
        let (stop, c) = (stop.clone(), counters.clone());
        threads.push(std::thread::spawn(move || {
            let open = || -> std::io::Result<Box<dyn Read + Send>> {
                let s = std::net::TcpStream::connect_timeout(&hub_addr, Duration::from_secs(1))?;
                s.set_nonblocking(true)?;
                Ok(Box::new(s))
            };
            silent_sockets(knob("SOAK_SLOWLORIS", 200), open, &stop, &c[2])
        }));
    }
    let air_window = Arc::new(Mutex::new(Window::default()));
    {
        let (bus, stop, w) = (bus.clone(), stop.clone(), air_window.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let (ok, took) = legit_air(&bus);
                w.lock().unwrap().record(ok, took);
                std::thread::sleep(ATTEMPT_EVERY.saturating_sub(took));
            }
        }));
    }
    let hub_window = Arc::new(Mutex::new(Window::default()));
    {
        let (stop, w) = (stop.clone(), hub_window.clone());
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let (ok, took) = rt.block_on(legit_hub(hub_addr, n));
                w.lock().unwrap().record(ok, took);
                std::thread::sleep(ATTEMPT_EVERY.saturating_sub(took));
            }
        }));
    }

    println!("soak: {secs} s; air pid {} on {bus}, hub pid {} on {hub_addr}", air.child.id(), hub.child.id());
    println!("{:>6}  {:>9} {:>6} {:>10} {:>8}  {:>9} {:>6} {:>10} {:>8}", "t_s", "air_MiB", "fds", "legit_ok", "slowest", "hub_MiB", "fds", "legit_ok", "slowest");
    let started = Instant::now();
    let mut rows = Vec::new();
    let (mut air_ok, mut air_tried, mut hub_ok, mut hub_tried) = (0, 0, 0, 0);
    let (mut air_peak, mut hub_peak, mut air_fd_peak, mut hub_fd_peak) = (0.0f64, 0.0f64, 0, 0);
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(SAMPLE.min(Duration::from_secs(secs).saturating_sub(started.elapsed())).max(Duration::from_millis(100)));
        let (a_mib, a_fds) = usage(air.child.id());
        let (h_mib, h_fds) = usage(hub.child.id());
        let a = std::mem::take(&mut *air_window.lock().unwrap());
        let h = std::mem::take(&mut *hub_window.lock().unwrap());
        (air_ok, air_tried, hub_ok, hub_tried) = (air_ok + a.ok, air_tried + a.tried, hub_ok + h.ok, hub_tried + h.tried);
        (air_peak, hub_peak) = (air_peak.max(a_mib), hub_peak.max(h_mib));
        (air_fd_peak, hub_fd_peak) = (air_fd_peak.max(a_fds), hub_fd_peak.max(h_fds));
        let t = started.elapsed().as_secs();
        println!(
            "{t:>6}  {a_mib:>9.1} {a_fds:>6} {:>10} {:>6}ms  {h_mib:>9.1} {h_fds:>6} {:>10} {:>6}ms",
            format!("{}/{}", a.ok, a.tried),
            a.slowest.as_millis(),
            format!("{}/{}", h.ok, h.tried),
            h.slowest.as_millis()
        );
        rows.push(serde_json::json!({"t_s": t, "air_rss_mib": a_mib, "air_fds": a_fds, "air_ok": a.ok, "air_tried": a.tried,
            "hub_rss_mib": h_mib, "hub_fds": h_fds, "hub_ok": h.ok, "hub_tried": h.tried}));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let summary = serde_json::json!({
        "secs": secs,
        "air": {"rss_peak_mib": air_peak, "fds_peak": air_fd_peak, "legit_ok": air_ok, "legit_tried": air_tried,
                "unread_callers_cut_off": counters[0].load(Ordering::Relaxed), "unauthenticated_closed": counters[1].load(Ordering::Relaxed)},
        "hub": {"rss_peak_mib": hub_peak, "fds_peak": hub_fd_peak, "legit_ok": hub_ok, "legit_tried": hub_tried,
                "slowloris_closed": counters[2].load(Ordering::Relaxed)},
        "samples": rows,
    });
    println!("{summary}");
}
