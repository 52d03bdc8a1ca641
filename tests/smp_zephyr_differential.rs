//! A differential test against Zephyr's own SMP server: the prebuilt Zephyr 4.4.0 `smp_svr`
//! native_sim binary (serial transport, 384-byte buffers, no MCUboot) from the smpclient 7.3.0
//! source package on PyPI, which `ci/test.sh` fetches into target/zephyr-smp/ at test time
//! (never committed; it needs libc6:i386). The same requests go to it and to `hilbench sim
//! smp-server` over their serial ports, and the answers are compared: byte for byte where
//! both devices have the same thing to say, field by field where the firmware differs by
//! configuration (its build, its tasks, the groups it was built with; this build has no
//! datetime command and no image group, so those are not compared). The OS, Statistics,
//! Enumeration, Shell, Settings and File system groups are compared, the last through one
//! file's life (upload, a wrong offset, resume, hashes, downloads in chunks).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ciborium::Value;
use hilbench::protocol::smp::{self, serial, SmpHeader, SmpOp, SmpVersion};

const ZEPHYR_SERIAL: &str = "zephyr_4.4.0_smp_server_0eae053d_native_sim_serial.exe";
/// The UDP build: buffers 2048 × 2, bound to 0.0.0.0:1337 (tests that use port 1337 run
/// one at a time: .config/nextest.toml).
const ZEPHYR_UDP: &str = "zephyr_4.4.0_smp_server_0eae053d_native_sim_udp.exe";

fn zephyr_binary() -> PathBuf {
    zephyr_exe(ZEPHYR_SERIAL)
}

fn zephyr_exe(name: &str) -> PathBuf {
    let dir = std::env::var_os("HILBENCH_ZEPHYR_SMP_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/zephyr-smp"));
    let exe = dir.join(name);
    assert!(
        exe.is_file(),
        "{} is missing: run ci/test.sh once (it fetches the smpclient 7.3.0 sdist from PyPI and installs libc6:i386), or set HILBENCH_ZEPHYR_SMP_DIR",
        exe.display()
    );
    exe
}

/// The Zephyr binary, running, and the pseudotty its UART is on.
struct Zephyr {
    child: Child,
    tty: PathBuf,
}

impl Drop for Zephyr {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs in `dir` (native_sim keeps its flash in ./flash.bin) and stops by itself after two
/// simulated minutes should the test die without killing it.
fn start_zephyr(dir: &std::path::Path) -> Zephyr {
    let mut child = Command::new(zephyr_binary())
        .arg("-stop_at=120")
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the Zephyr binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(p) = line.strip_prefix("uart connected to pseudotty: ") {
                let _ = tx.send(PathBuf::from(p.trim()));
            }
        }
    });
    let tty = rx.recv_timeout(Duration::from_secs(10)).expect("Zephyr names its pseudotty within 10 s");
    Zephyr { child, tty }
}

/// A serial SMP client: requests as smpclient frames them, answers decoded line by line.
struct Client {
    port: common::RawPort,
    rx: serial::Receiver,
    pending: Vec<u8>,
}

impl Client {
    fn open(path: &std::path::Path) -> Client {
        Client { port: common::RawPort::open(path), rx: serial::Receiver::new(), pending: Vec::new() }
    }

    /// One request; the one SMP message that answers it (console text between is skipped).
    fn ask(&mut self, version: SmpVersion, op: SmpOp, group: u16, command: u8, seq: u8, body: &[u8]) -> Vec<u8> {
        let mut m = SmpHeader::new(version, op, group, command, seq, body.len() as u16).encode().to_vec();
        m.extend(body);
        self.send_paced(&m);
        self.next_message().unwrap_or_else(|| panic!("no answer to group {group} command {command} within 5 s"))
    }

    /// One line at a time, 30 ms apart: native_sim polls its UART every 20 ms into two
    /// line buffers, and drops the lines of a burst that find none free (as hilbench does
    /// with `--line-work 20ms`).
    fn send_paced(&mut self, message: &[u8]) {
        for line in serial::encode(message, serial::MAX_LINE).split_inclusive(|b| *b == b'\n') {
            self.port.send(line);
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    fn next_message(&mut self) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                if let serial::LineOutcome::Message(answer) = self.rx.push_line(&line) {
                    return Some(answer);
                }
            }
            self.pending.extend(self.port.read_up_to(1, Duration::from_millis(100)));
        }
        None
    }

    /// Asks for the params until the device answers (Zephyr takes a moment to boot).
    fn wait_ready(&mut self) {
        for seq in 0..20 {
            let mut m = SmpHeader::new(SmpVersion::V2, SmpOp::Read, 0, 6, seq, 1).encode().to_vec();
            m.push(0xa0);
            self.send_paced(&m);
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                self.pending.extend(self.port.read_up_to(1, Duration::from_millis(50)));
                while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.pending.drain(..=end).collect();
                    if let serial::LineOutcome::Message(_) = self.rx.push_line(&line) {
                        return;
                    }
                }
            }
        }
        panic!("the device never answered its params");
    }
}

/// What a request is called, and its header fields and payload.
type Request<'a> = (&'a str, SmpVersion, SmpOp, u16, u8, Vec<u8>);

fn cbor(v: Vec<(&str, Value)>) -> Vec<u8> {
    smp::encode_map(v)
}

fn decoded(answer: &[u8]) -> (SmpHeader, Vec<(Value, Value)>) {
    let f = smp::SmpFrame::parse(answer).unwrap_or_else(|e| panic!("{e:?}: {answer:02x?}"));
    (f.header, smp::decode_map(&f.payload).unwrap_or_else(|e| panic!("{e:?}: {answer:02x?}")))
}

fn keys(m: &[(Value, Value)]) -> Vec<String> {
    m.iter().map(|(k, _)| format!("{k:?}")).collect()
}

/// A client of either transport: one request, its answer; or raw bytes, the answer.
trait Asker {
    fn ask(&mut self, version: SmpVersion, op: SmpOp, group: u16, command: u8, seq: u8, body: &[u8]) -> Vec<u8>;
    fn raw(&mut self, message: &[u8]) -> Vec<u8>;
}

impl Asker for Client {
    fn ask(&mut self, version: SmpVersion, op: SmpOp, group: u16, command: u8, seq: u8, body: &[u8]) -> Vec<u8> {
        Client::ask(self, version, op, group, command, seq, body)
    }
    fn raw(&mut self, message: &[u8]) -> Vec<u8> {
        self.send_paced(message);
        self.next_message().expect("an answer to a raw message")
    }
}

/// A UDP SMP client: one datagram out, the answer datagram back.
struct UdpClient {
    sock: std::net::UdpSocket,
    to: std::net::SocketAddr,
}

impl UdpClient {
    fn open(to: std::net::SocketAddr) -> UdpClient {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        UdpClient { sock, to }
    }

    /// Asks for the params until the server answers (Zephyr takes a moment to boot).
    fn wait_ready(&mut self) {
        self.sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let ready = (0..30u8).any(|seq| {
            let mut m = SmpHeader::new(SmpVersion::V2, SmpOp::Read, 0, 6, seq, 1).encode().to_vec();
            m.push(0xa0);
            let _ = self.sock.send_to(&m, self.to);
            let mut buf = [0u8; 64];
            self.sock.recv_from(&mut buf).is_ok()
        });
        assert!(ready, "the server at {} never answered its params", self.to);
        self.sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Late answers to the polls must not be read as answers to what follows.
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 64];
        self.sock.set_nonblocking(true).unwrap();
        while self.sock.recv_from(&mut buf).is_ok() {}
        self.sock.set_nonblocking(false).unwrap();
    }
}

impl Asker for UdpClient {
    fn ask(&mut self, version: SmpVersion, op: SmpOp, group: u16, command: u8, seq: u8, body: &[u8]) -> Vec<u8> {
        let mut m = SmpHeader::new(version, op, group, command, seq, body.len() as u16).encode().to_vec();
        m.extend(body);
        self.raw(&m)
    }
    fn raw(&mut self, message: &[u8]) -> Vec<u8> {
        self.sock.send_to(message, self.to).unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = self.sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("no answer from {}: {e}", self.to));
        buf.truncate(n);
        buf
    }
}

/// Each request to both; the ones whose answers differ, shown.
fn compare(z: &mut dyn Asker, h: &mut dyn Asker, requests: &[Request]) -> Vec<String> {
    let mut differ = Vec::new();
    for (i, (what, version, op, group, command, body)) in requests.iter().enumerate() {
        let seq = (100 + i) as u8;
        // The reserved version: version bits 2 (0x10) in byte 0, sent as built here.
        let (za, ha) = if *what == "reserved version" {
            let m = [0x10, 0, 0, 1, 0, 0, seq, 0, 0xa0];
            (z.raw(&m), h.raw(&m))
        } else {
            (z.ask(*version, *op, *group, *command, seq, body), h.ask(*version, *op, *group, *command, seq, body))
        };
        if za != ha {
            differ.push(format!("{what}:\n  zephyr   {:02x?}\n  hilbench {:02x?}\n  zephyr   {:?}\n  hilbench {:?}", za, ha, decoded(&za), decoded(&ha)));
        }
    }
    differ
}

/// Requests whose answers must be the same bytes from both servers, in order (the
/// file's life depends on it).
fn same_requests() -> Vec<Request<'static>> {
    use SmpOp::{Read, Write};
    use SmpVersion::{V1, V2};
    let name = |n: &str| cbor(vec![("name", Value::Text(n.into()))]);
    let argv = |words: &[&str]| cbor(vec![("argv", Value::Array(words.iter().map(|w| Value::Text(w.to_string())).collect()))]);
    let chunk = |path: &str, off: u64, data: &[u8], len: Option<u64>| {
        let mut b = vec![("name", Value::Text(path.into())), ("off", Value::from(off)), ("data", Value::Bytes(data.to_vec()))];
        b.extend(len.map(|l| ("len", Value::from(l))));
        cbor(b)
    };
    const BIG: [u8; 1000] = {
        let mut b = [0u8; 1000];
        let mut i = 0;
        while i < 1000 {
            b[i] = (i * 7 % 251) as u8;
            i += 1;
        }
        b
    };
    vec![
        ("echo v2", V2, Write, 0, 0, cbor(vec![("d", Value::Text("hilbench".into()))])),
        ("echo v1 as a read", V1, Read, 0, 0, cbor(vec![("d", Value::Text("x".repeat(200)))])),
        ("echo without d", V2, Write, 0, 0, cbor(vec![])),
        ("params", V2, Read, 0, 6, cbor(vec![])),
        ("mpstat (not built)", V2, Read, 0, 3, cbor(vec![])),
        ("os info", V2, Read, 0, 7, cbor(vec![])),
        ("os info, an unknown format letter", V2, Read, 0, 7, cbor(vec![("format", Value::Text("q".into()))])),
        ("unknown OS command", V2, Read, 0, 30, cbor(vec![])),
        ("unknown group", V2, Read, 77, 0, cbor(vec![])),
        ("unknown group, v1", V1, Write, 77, 3, cbor(vec![])),
        ("reserved version", SmpVersion::V2, Read, 0, 0, vec![]),
        ("payload that is not a map", V2, Read, 0, 6, vec![0x01]),
        ("stat list has smp_svr_stats", V2, Read, 2, 0, name("smp_svr_stats")),
        ("stat show, unknown name", V2, Read, 2, 0, name("nope")),
        ("stat show, unknown name, v1", V1, Read, 2, 0, name("nope")),
        ("stat show, no name", V2, Read, 2, 0, cbor(vec![])),
        ("enum single past the end", V2, Read, 10, 2, cbor(vec![("index", Value::from(99))])),
        ("enum single, a negative index", V2, Read, 10, 2, cbor(vec![("index", Value::from(-1))])),
        ("echo, d not text", V2, Write, 0, 0, cbor(vec![("d", Value::from(5))])),
        ("enum single, no index", V2, Read, 10, 2, cbor(vec![])),
        // Shell (9).
        ("shell: kernel version", V2, Write, 9, 0, argv(&["kernel", "version"])),
        ("shell: kernel version, v1", V1, Write, 9, 0, argv(&["kernel", "version", "x"])),
        ("shell: an unknown command", V2, Write, 9, 0, argv(&["nope", "x"])),
        ("shell: an empty word", V2, Write, 9, 0, argv(&[""])),
        ("shell: kernel uptime, an unknown option", V2, Write, 9, 0, argv(&["kernel", "uptime", "x"])),
        ("shell: no words", V2, Write, 9, 0, argv(&[])),
        ("shell: no words, v1", V1, Write, 9, 0, argv(&[])),
        ("shell: a 256-byte line", V2, Write, 9, 0, argv(&[&"a".repeat(128), &"b".repeat(127)])),
        ("shell: a 255-byte line", V2, Write, 9, 0, argv(&[&"a".repeat(127), &"b".repeat(127)])),
        ("shell: no argv", V2, Write, 9, 0, cbor(vec![])),
        ("shell: as a read", V2, Read, 9, 0, argv(&["kernel", "version"])),
        ("shell: not a map", V2, Write, 9, 0, vec![0x01]),
        // Settings (3): smp_svr has no handlers and no storage backend, as hilbench by default.
        ("settings: read, an unknown root", V2, Read, 3, 0, name("foo/bar")),
        ("settings: read, an unknown root, v1", V1, Read, 3, 0, name("foo/bar")),
        ("settings: read, a 32-byte name", V2, Read, 3, 0, name(&"a".repeat(32))),
        ("settings: read, no name", V2, Read, 3, 0, cbor(vec![])),
        ("settings: write, an unknown root", V2, Write, 3, 0, cbor(vec![("name", Value::Text("foo/bar".into())), ("val", Value::Bytes(b"x".to_vec()))])),
        ("settings: delete without storage", V2, Write, 3, 1, name("foo/bar")),
        ("settings: delete without storage, v1", V1, Write, 3, 1, name("foo/bar")),
        ("settings: commit", V2, Write, 3, 2, cbor(vec![])),
        ("settings: load, not a map", V2, Read, 3, 3, vec![0x01]),
        ("settings: save without storage", V2, Write, 3, 3, cbor(vec![])),
        ("settings: save without storage, v1", V1, Write, 3, 3, cbor(vec![])),
        // File system (8) on /lfs1.
        ("fs: supported types", V2, Read, 8, 3, cbor(vec![])),
        ("fs: status, no such file", V2, Read, 8, 1, name("/lfs1/nope")),
        ("fs: status, no mount point", V2, Read, 8, 1, name("/nope/x")),
        ("fs: status, a relative path", V2, Read, 8, 1, name("x")),
        ("fs: status, the mount point", V2, Read, 8, 1, name("/lfs1")),
        ("fs: status, /", V2, Read, 8, 1, name("/")),
        ("fs: status, v1", V1, Read, 8, 1, name("/lfs1/nope")),
        ("fs: upload, no mount point", V2, Write, 8, 0, chunk("/lfs2/x", 0, b"a", Some(1))),
        ("fs: upload, no directory", V2, Write, 8, 0, chunk("/lfs1/no/x", 0, b"a", Some(1))),
        ("fs: upload, no mount point, v1", V1, Write, 8, 0, chunk("/lfs2/x", 0, b"a", Some(1))),
        ("fs: upload, a relative path", V2, Write, 8, 0, chunk("x", 0, b"a", Some(1))),
        ("fs: upload, onto a directory", V2, Write, 8, 0, chunk("/lfs1", 0, b"a", Some(1))),
        ("fs: upload at 0 without len", V2, Write, 8, 0, chunk("/lfs1/x", 0, b"a", None)),
        ("fs: upload, a 65-byte path", V2, Write, 8, 0, chunk(&format!("/lfs1/{}", "a".repeat(59)), 0, b"a", Some(1))),
        ("fs: hash, an unknown type", V2, Read, 8, 2, cbor(vec![("name", Value::Text("/lfs1/nope".into())), ("type", Value::Text("md5".into()))])),
        ("fs: close", V2, Write, 8, 4, cbor(vec![])),
        ("fs: close as a read", V2, Read, 8, 4, cbor(vec![])),
        // One file's life: in order, each step depending on the last.
        ("fs: upload the first chunk", V2, Write, 8, 0, chunk("/lfs1/h.txt", 0, b"hello", Some(11))),
        ("fs: status while open", V2, Read, 8, 1, name("/lfs1/h.txt")),
        ("fs: a wrong offset", V2, Write, 8, 0, chunk("/lfs1/h.txt", 7, b"xx", None)),
        ("fs: status after the mismatch", V2, Read, 8, 1, name("/lfs1/h.txt")),
        ("fs: resume at the committed size", V2, Write, 8, 0, chunk("/lfs1/h.txt", 5, b" world", None)),
        ("fs: crc32 of what is committed", V2, Read, 8, 2, name("/lfs1/h.txt")),
        ("fs: sha256 of what is committed", V2, Read, 8, 2, cbor(vec![("name", Value::Text("/lfs1/h.txt".into())), ("type", Value::Text("sha256".into()))])),
        ("fs: hash past the end", V2, Read, 8, 2, cbor(vec![("name", Value::Text("/lfs1/h.txt".into())), ("off", Value::from(5))])),
        ("fs: download closes the upload", V2, Read, 8, 0, cbor(vec![("name", Value::Text("/lfs1/h.txt".into())), ("off", Value::from(0))])),
        ("fs: download further on", V2, Read, 8, 0, cbor(vec![("name", Value::Text("/lfs1/h.txt".into())), ("off", Value::from(4))])),
        ("fs: download past the end", V2, Read, 8, 0, cbor(vec![("name", Value::Text("/lfs1/h.txt".into())), ("off", Value::from(20))])),
        ("fs: sha256 from an offset", V2, Read, 8, 2, cbor(vec![("name", Value::Text("/lfs1/h.txt".into())), ("type", Value::Text("sha256".into())), ("off", Value::from(6)), ("len", Value::from(3))])),
        ("fs: an empty file", V2, Write, 8, 0, chunk("/lfs1/e", 0, b"", Some(0))),
        ("fs: hash of an empty file", V2, Read, 8, 2, name("/lfs1/e")),
        ("fs: a new file at an offset", V2, Write, 8, 0, chunk("/lfs1/n", 3, b"xx", None)),
        ("fs: 1000 bytes, 1", V2, Write, 8, 0, chunk("/lfs1/big", 0, &BIG[..300], Some(1000))),
        ("fs: 1000 bytes, 2", V2, Write, 8, 0, chunk("/lfs1/big", 300, &BIG[300..600], None)),
        ("fs: 1000 bytes, 3", V2, Write, 8, 0, chunk("/lfs1/big", 600, &BIG[600..900], None)),
        ("fs: 1000 bytes, 4", V2, Write, 8, 0, chunk("/lfs1/big", 900, &BIG[900..], None)),
        ("fs: 1000 bytes, status", V2, Read, 8, 1, name("/lfs1/big")),
        ("fs: 1000 bytes, download 1", V2, Read, 8, 0, cbor(vec![("name", Value::Text("/lfs1/big".into())), ("off", Value::from(0))])),
        ("fs: 1000 bytes, download 2", V2, Read, 8, 0, cbor(vec![("name", Value::Text("/lfs1/big".into())), ("off", Value::from(340))])),
        ("fs: 1000 bytes, download 3", V2, Read, 8, 0, cbor(vec![("name", Value::Text("/lfs1/big".into())), ("off", Value::from(680))])),
    ]
}

/// Zephyr's serial server and hilbench's, as it is built (384-byte buffers × 4), each
/// with a client that has seen it answer.
fn both_serial(dir: &std::path::Path) -> (Zephyr, common::Sim, Client, Client) {
    let zephyr = start_zephyr(dir);
    let sim = common::start_sim(&["smp-server", "--tty", "auto", "--buf-size", "384", "--buf-count", "4", "--no-banner"], dir);
    let mut z = Client::open(&zephyr.tty);
    let mut h = Client::open(&sim.tty());
    z.wait_ready();
    h.wait_ready();
    (zephyr, sim, z, h)
}

#[test]
fn hilbench_answers_as_zephyrs_own_smp_server_does() {
    let dir = tempfile::tempdir().unwrap();
    let (zephyr, sim, mut z, mut h) = both_serial(dir.path());
    use SmpOp::Read;
    use SmpVersion::V2;
    let same = same_requests();
    let differ = compare(&mut z, &mut h, &same);
    // Configuration differs (build, tasks, groups built in): the same shape, not the same bytes.
    let (zh, zm) = decoded(&z.ask(V2, Read, 0, 2, 1, &cbor(vec![])));
    let (hh, hm) = decoded(&h.ask(V2, Read, 0, 2, 1, &cbor(vec![])));
    assert_eq!((zh.op, zh.group, zh.command), (hh.op, hh.group, hh.command));
    assert_eq!(keys(&zm), keys(&hm), "taskstat");
    // A handler that takes no arguments answers whatever payload follows the header
    // (native_sim also lists its flash simulator's statistics).
    let (_, zm) = decoded(&z.ask(V2, Read, 2, 1, 3, &[0x82, 0x01]));
    let (_, hm) = decoded(&h.ask(V2, Read, 2, 1, 3, &[0x82, 0x01]));
    assert_eq!((keys(&zm), keys(&hm)), (vec!["Text(\"stat_list\")".to_string()], vec!["Text(\"stat_list\")".to_string()]));
    let (_, zm) = decoded(&z.ask(V2, Read, 10, 1, 2, &cbor(vec![])));
    let (_, hm) = decoded(&h.ask(V2, Read, 10, 1, 2, &cbor(vec![])));
    let ids = |m: &[(Value, Value)]| match smp::get(m, "groups") {
        Some(Value::Array(a)) => a.iter().filter_map(smp::as_u64).collect::<Vec<_>>(),
        _ => panic!("{m:?}"),
    };
    let ours = ids(&hm);
    let theirs: Vec<u64> = ids(&zm).into_iter().filter(|g| ours.contains(g)).collect();
    assert_eq!(theirs, ours.iter().copied().filter(|g| *g != 1).collect::<Vec<_>>(), "the groups both have, in the same order (Zephyr's has no image group)");
    assert!(differ.is_empty(), "{} answers differ from Zephyr's:\n{}", differ.len(), differ.join("\n"));
    drop(zephyr);
    assert_eq!(sim.stop(), 0);
}


/// `hilbench validate smp-server --read-only` against Zephyr's own server: its OS group and
/// every answer's header and payload pass; it has no bootloader info (a warning) and no
/// image group (state read fails with rc 8, so the run fails).
#[test]
fn validate_reads_zephyrs_own_server() {
    let dir = tempfile::tempdir().unwrap();
    let zephyr = start_zephyr(dir.path());
    Client::open(&zephyr.tty).wait_ready();
    let out = Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_hilbench"))
        .args(["validate", "smp-server", "--read-only", "--json", "--tty"])
        .arg(&zephyr.tty)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let verdicts: Vec<(String, String)> =
        report["checks"].as_array().unwrap().iter().map(|c| (c["name"].as_str().unwrap().to_string(), c["verdict"].as_str().unwrap().to_string())).collect();
    let want = [
        ("params", "pass"),
        ("echo", "pass"),
        ("echo_v1", "pass"),
        ("unknown_group", "pass"),
        ("bootloader_info", "warn"),
        ("state_read", "fail"),
        ("headers", "pass"),
        ("payloads", "pass"),
    ];
    assert_eq!(verdicts, want.map(|(n, v)| (n.to_string(), v.to_string())), "{report:#}");
    assert!(report["checks"][5]["detail"].as_str().unwrap().contains("rc 8"), "{report:#}");
    assert_eq!(out.status.code(), Some(1));
    drop(zephyr);
}

/// The same requests over UDP, against the UDP build of Zephyr's smp_svr (native_sim's
/// offloaded sockets on the host's 0.0.0.0:1337) and `hilbench sim smp-server` with the same
/// buffers: the same bytes back, datagram for datagram.
#[test]
fn hilbench_answers_as_zephyrs_own_udp_server_does() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(zephyr_exe(ZEPHYR_UDP)).arg("-stop_at=120").current_dir(dir.path()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("the Zephyr UDP binary starts");
    let _zephyr = Zephyr { child, tty: PathBuf::new() };
    let mut z = UdpClient::open("127.0.0.1:1337".parse().unwrap());
    z.wait_ready();
    // The one answering on port 1337 is Zephyr (not a leftover simulator): its OS info says so.
    let (_, info) = decoded(&z.ask(SmpVersion::V2, SmpOp::Read, 0, 7, 1, &cbor(vec![("format", Value::Text("a".into()))])));
    assert!(matches!(smp::get(&info, "output"), Some(Value::Text(o)) if o.contains("native_sim")), "not Zephyr on 127.0.0.1:1337: {info:?}");
    let sim = common::start_sim(&["smp-server", "--udp", "127.0.0.1:0", "--buf-size", "2048", "--buf-count", "2"], dir.path());
    let mut h = UdpClient::open(sim.ready["endpoints"]["udp"].as_str().unwrap().parse().unwrap());
    h.wait_ready();
    let differ = compare(&mut z, &mut h, &same_requests());
    assert!(differ.is_empty(), "{} answers differ from Zephyr's over UDP:\n{}", differ.len(), differ.join("\n"));
    assert_eq!(sim.stop(), 0);
}

/// A reset whose `force` or `boot_mode` has a type os_mgmt does not expect answers as Zephyr's
/// own server answers it (each on a fresh device: an accepted reset takes it away).
#[test]
fn a_reset_with_odd_argument_types_answers_as_zephyrs_own_server() {
    use SmpOp::Write;
    use SmpVersion::V2;
    let cases: Vec<(&str, Vec<(&str, Value)>)> = vec![
        ("force text", vec![("force", Value::Text("yes".into()))]),
        ("force float", vec![("force", Value::Float(1.5))]),
        ("force null", vec![("force", Value::Null)]),
        ("force array", vec![("force", Value::Array(vec![Value::Bool(true)]))]),
        ("force bytes", vec![("force", Value::Bytes(vec![1]))]),
        ("boot_mode text", vec![("boot_mode", Value::Text("1".into()))]),
        ("boot_mode negative", vec![("boot_mode", Value::from(-1))]),
    ];
    let mut differ = Vec::new();
    for (what, body) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (zephyr, sim, mut z, mut h) = both_serial(dir.path());
        let body = cbor(body);
        let (za, ha) = (z.ask(V2, Write, 0, 5, 7, &body), h.ask(V2, Write, 0, 5, 7, &body));
        if za != ha {
            differ.push(format!("{what}:\n  zephyr   {:?}\n  hilbench {:?}", decoded(&za), decoded(&ha)));
        }
        drop(zephyr);
        assert_eq!(sim.stop(), 0);
    }
    assert!(differ.is_empty(), "{} answers differ from Zephyr's:\n{}", differ.len(), differ.join("\n"));
}
