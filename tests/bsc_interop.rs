//! BACnet/SC interoperability with an independent stack: rusty-bacnet (PyPI,
//! a Rust implementation with Python bindings, driven by tests/py/bsc_peer.py).
//! Its nodes talk through its own hub (the baseline that proves the harness),
//! and a wire tap (tests/py/bsc_tap.py) shows what each side put in the
//! frames, so the assertions pin the standard's values (big-endian fields,
//! node-duplicate-vmac = 151, no originating VMAC on hub-bound messages, the
//! hub inserting it on the way out).
//!
//! The stack speaks TLS 1.3 with mutual authentication only, so every run
//! uses certificates from `hilbench pki`.
//!
//! Needs the venv that `ci/test.sh` creates (or HILBENCH_PYTHON pointing at a
//! Python with `pip install -r ci/requirements.txt`): without it every test
//! here fails and says so.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous: two cores shared with other builds, TLS handshakes in debug code.
const STEP: Duration = Duration::from_secs(30);

const HUB_VMAC: &str = "02:00:00:00:00:01";
const INITIATOR_VMAC: &str = "02:00:00:00:00:11";
const RESPONDER_VMAC: &str = "02:00:00:00:00:22";
const RESPONDER_DEVICE: u32 = 2002;

fn python() -> String {
    hilbench::python_with("rusty_bacnet").unwrap_or_else(|e| panic!("{e}"))
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
        .display()
        .to_string()
}

/// `hilbench pki` into DIR: ca.pem, hub.pem/key, node-1..4.pem/key.
fn pki(dir: &Path) -> PathBuf {
    let out_dir = dir.join("pki");
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench"))
        .args([
            "pki",
            "--out",
            out_dir.to_str().unwrap(),
            "--nodes",
            "4",
            "--days",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hilbench pki: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out_dir
}

/// A child that prints JSON lines; killed when dropped.
struct Proc {
    name: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<Value>,
    stderr_path: PathBuf,
}

impl Proc {
    fn spawn(name: &str, program: &str, args: &[String], dir: &Path) -> Proc {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({program}): {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            name: name.into(),
            child,
            lines,
            seen: Vec::new(),
            stderr_path,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The next line that is JSON with `event` == EVENT, within TIMEOUT.
    fn wait_event(&mut self, event: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line:?}", self.name));
                    self.seen.push(v.clone());
                    if v["event"] == event {
                        return v;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no {event:?} line within {timeout:?}; lines {:?}; stderr: {}",
                    self.name,
                    self.seen,
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: exited before a {event:?} line; lines {:?}; stderr: {}",
                    self.name,
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    /// Waits for exit (TIMEOUT at most) and returns the exit code and every JSON line.
    fn finish(mut self, timeout: Duration) -> (i32, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let code = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{}: still running after {timeout:?}; stderr: {}",
                    self.name,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.drain(Duration::from_secs(5));
        (code, std::mem::take(&mut self.seen))
    }

    /// SIGTERM, then every JSON line it printed.
    fn stop(mut self) -> Vec<Value> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.drain(Duration::from_secs(5));
        std::mem::take(&mut self.seen)
    }

    fn drain(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                self.seen.push(v);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

struct Peer {
    py: String,
    pki: PathBuf,
    dir: PathBuf,
}

impl Peer {
    fn new(dir: &Path) -> Peer {
        Peer {
            py: python(),
            pki: pki(dir),
            dir: dir.to_path_buf(),
        }
    }

    fn run(&self, name: &str, script_name: &str, args: &[&str]) -> Proc {
        let mut all = vec![script(script_name)];
        all.extend(strings(args));
        all.extend(["--pki".to_string(), self.pki.display().to_string()]);
        Proc::spawn(name, &self.py, &all, &self.dir)
    }

    /// The Device UUID in node-N's certificate (hex), which that node sends:
    /// a hub that binds identities to certificates refuses any other.
    fn cert_uuid(&self, node: &str) -> String {
        let uuid = hilbench::transport::tls::device_uuid_in_file(&self.pki.join(format!("node-{node}.pem")))
            .unwrap_or_else(|| panic!("node-{node}.pem carries no urn:uuid SAN"));
        uuid.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The peer's hub; returns it and its wss:// URL.
    fn hub(&self) -> (Proc, String) {
        let mut hub = self.run("peer-hub", "bsc_peer.py", &["hub", "--vmac", HUB_VMAC]);
        let ready = hub.wait_event("ready", STEP);
        let url = ready["url"]
            .as_str()
            .expect("ready line has a url")
            .to_string();
        (hub, url)
    }

    /// A wire tap in front of UPSTREAM; returns it and the URL to dial instead.
    fn tap(&self, upstream: &str, node: u32) -> (Proc, String) {
        let node = node.to_string();
        let mut tap = self.run(
            "tap",
            "bsc_tap.py",
            &["--upstream", upstream, "--node", &node],
        );
        let ready = tap.wait_event("ready", STEP);
        let url = ready["url"]
            .as_str()
            .expect("tap ready line has a url")
            .to_string();
        (tap, url)
    }

    fn responder(&self, hub_url: &str) -> Proc {
        let device = RESPONDER_DEVICE.to_string();
        let uuid = self.cert_uuid("2");
        let mut r = self.run(
            "peer-responder",
            "bsc_peer.py",
            &[
                "responder",
                "--hub",
                hub_url,
                "--node",
                "2",
                "--vmac",
                RESPONDER_VMAC,
                "--uuid",
                &uuid,
                "--device",
                &device,
            ],
        );
        r.wait_event("started", STEP);
        r
    }

    /// Who-Is broadcast, I-Am back, ReadProperty unicast; returns (exit code, lines).
    fn initiator(&self, hub_url: &str, extra: &[&str]) -> (i32, Vec<Value>) {
        let device = RESPONDER_DEVICE.to_string();
        let uuid = self.cert_uuid("1");
        let mut args = vec![
            "initiator",
            "--hub",
            hub_url,
            "--node",
            "1",
            "--vmac",
            INITIATOR_VMAC,
            "--uuid",
            &uuid,
            "--target-device",
            &device,
            "--timeout",
            "30",
        ];
        args.extend_from_slice(extra);
        self.run("peer-initiator", "bsc_peer.py", &args)
            .finish(Duration::from_secs(120))
    }

    /// Connects with VMAC and UUID and reports the hub's answer; returns the decisive line.
    fn connect_as(&self, name: &str, hub_url: &str, vmac: &str, uuid: &str, node: &str) -> Proc {
        self.run(
            name,
            "bsc_peer.py",
            &[
                "initiator",
                "--hub",
                hub_url,
                "--node",
                node,
                "--vmac",
                vmac,
                "--uuid",
                uuid,
                "--connect-only",
                "--timeout",
                "30",
            ],
        )
    }
}

fn event<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["event"] == name)
        .unwrap_or_else(|| panic!("no {name:?} line in {lines:?}"))
}

/// The tap's BVLC frames in direction DIR ("node>hub" / "hub>node").
fn frames<'a>(tap: &'a [Value], dir: &str) -> Vec<&'a Value> {
    tap.iter()
        .filter(|l| l["event"] == "frame" && l["dir"] == dir && l["opcode"] == 2)
        .collect()
}

fn function_is(f: &Value, name: &str) -> bool {
    f["bvlc"]["function"] == name
}

/// The checks every conforming pair passes, on the initiator's side of the hub:
/// what it sent (hub-bound, no originating VMAC) and what it got (originating
/// VMAC inserted, broadcast destination kept, unicast destination removed).
fn assert_initiator_wire(tap: &[Value], hub_max_npdu_at_least: u64) {
    let up = frames(tap, "node>hub");
    let down = frames(tap, "hub>node");

    let req = up
        .iter()
        .find(|f| function_is(f, "Connect-Request"))
        .expect("a Connect-Request");
    assert_eq!(req["bvlc"]["vmac"], INITIATOR_VMAC, "{req}");
    let acc = down
        .iter()
        .find(|f| function_is(f, "Connect-Accept"))
        .expect("a Connect-Accept");
    assert_eq!(
        acc["bvlc"]["message_id"], req["bvlc"]["message_id"],
        "the accept echoes the request's id"
    );
    // Annex AB: multi-byte fields are big-endian. The BE reading is the hub's real limit.
    let max_npdu = acc["bvlc"]["max_npdu"]["be"].as_u64().unwrap();
    assert!(
        max_npdu >= hub_max_npdu_at_least && max_npdu <= 65535,
        "MaxNPDU (BE) {max_npdu}: {acc}"
    );
    let max_bvlc = acc["bvlc"]["max_bvlc"]["be"].as_u64().unwrap();
    assert!(
        max_bvlc >= max_npdu,
        "MaxBVLC (BE) {max_bvlc} below MaxNPDU {max_npdu}: {acc}"
    );

    let npdus_up: Vec<_> = up
        .iter()
        .filter(|f| function_is(f, "Encapsulated-NPDU"))
        .collect();
    assert!(!npdus_up.is_empty(), "the initiator sent no NPDU: {tap:?}");
    for f in &npdus_up {
        assert!(
            f["bvlc"].get("orig_vmac").is_none(),
            "hub-bound message carries an originating VMAC: {f}"
        );
    }
    let who_is = npdus_up
        .iter()
        .find(|f| f["bvlc"]["dest_vmac"] == "ff:ff:ff:ff:ff:ff")
        .expect("a broadcast (Who-Is) to FF*6");
    assert_eq!(who_is["bvlc"]["control"], "0x04", "{who_is}");
    assert!(
        npdus_up
            .iter()
            .any(|f| f["bvlc"]["dest_vmac"] == RESPONDER_VMAC),
        "a unicast (ReadProperty) to the responder's VMAC: {npdus_up:?}"
    );

    let npdus_down: Vec<_> = down
        .iter()
        .filter(|f| function_is(f, "Encapsulated-NPDU"))
        .collect();
    let from_responder: Vec<_> = npdus_down
        .iter()
        .filter(|f| f["bvlc"]["orig_vmac"] == RESPONDER_VMAC)
        .collect();
    assert!(
        !from_responder.is_empty(),
        "nothing reached the initiator with the responder's VMAC as origin: {npdus_down:?}"
    );
    for f in &npdus_down {
        let dest = &f["bvlc"]["dest_vmac"];
        assert!(
            dest.is_null() || dest == "ff:ff:ff:ff:ff:ff",
            "a forwarded unicast keeps no destination VMAC, a broadcast keeps FF*6: {f}"
        );
        assert_ne!(
            f["bvlc"]["orig_vmac"], INITIATOR_VMAC,
            "the hub echoed the initiator's own message: {f}"
        );
    }
    // The ReadProperty-ACK (a unicast, so no destination VMAC) carries the responder's object name.
    let name_hex: String = "rusty-bacnet responder"
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        from_responder
            .iter()
            .any(|f| f["bvlc"]["dest_vmac"].is_null()
                && f["bvlc"]["payload"].as_str().unwrap().contains(&name_hex)),
        "no unicast from the responder carrying its Object_Name: {from_responder:?}"
    );
}

fn assert_delivered(lines: &[Value]) {
    let i_am = event(lines, "i-am");
    assert_eq!(i_am["device"], RESPONDER_DEVICE, "{i_am}");
    // The VMAC the I-Am came from is the originating VMAC the hub inserted.
    assert_eq!(i_am["from_vmac"], RESPONDER_VMAC, "{i_am}");
    let ack = event(lines, "read-property-ack");
    assert_eq!(ack["from_vmac"], RESPONDER_VMAC, "{ack}");
    assert_eq!(ack["object_name"], "rusty-bacnet responder", "{ack}");
}

/// The baseline: the peer against itself, so a failure against our side is
/// ours or a real difference, not the harness.
#[test]
fn peer_nodes_talk_through_the_peer_hub_broadcast_and_unicast() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::new(dir.path());
    let (hub, url) = peer.hub();
    let responder = peer.responder(&url);
    let (tap, tap_url) = peer.tap(&url, 3);
    let (code, lines) = peer.initiator(&tap_url, &[]);
    let tap_lines = tap.stop();
    drop(responder);
    drop(hub);
    assert_eq!(code, 0, "initiator failed: {lines:?}");
    assert_eq!(event(&lines, "connected")["hub_vmac"], HUB_VMAC);
    assert_delivered(&lines);
    let up = tap_lines
        .iter()
        .find(|l| l["event"] == "upgrade" && l["dir"] == "node>hub")
        .unwrap();
    assert_eq!(up["subprotocol"], "hub.bsc.bacnet.org", "{up}");
    // The standard asks a hub to carry a 1497-octet NPDU.
    assert_initiator_wire(&tap_lines, 1497);
}

/// A second node with RESPONDER_VMAC and another Device UUID connects to the hub at
/// `hub_url` (through a tap) while a first node holds that VMAC. The hub must NAK it
/// with error class communication (7) and node-duplicate-vmac, which the standard
/// numbers 151: as the node decodes it, and big-endian in the BVLC-Result on the wire.
fn assert_duplicate_vmac_is_naked_with_the_standard_code(peer: &Peer, hub_url: &str) {
    let mut first = peer.connect_as("first", hub_url, RESPONDER_VMAC, &peer.cert_uuid("1"), "1");
    first.wait_event("connected", STEP);
    // The tap ends TLS: the hub sees its certificate, so it presents the
    // second node's (whose UUID that node sends).
    let (tap, tap_url) = peer.tap(hub_url, 2);
    let second = peer.connect_as("second", &tap_url, RESPONDER_VMAC, &peer.cert_uuid("2"), "2");
    let (code, lines) = second.finish(Duration::from_secs(60));
    let tap_lines = tap.stop();
    drop(first);
    assert_eq!(code, 3, "expected a NAK: {lines:?}");
    let nak = event(&lines, "nak");
    assert_eq!(
        (nak["error_class"].as_u64(), nak["error_code"].as_u64()),
        (Some(7), Some(151)),
        "{nak}"
    );
    let result = frames(&tap_lines, "hub>node")
        .into_iter()
        .find(|f| function_is(f, "BVLC-Result"))
        .unwrap_or_else(|| panic!("no BVLC-Result on the wire: {tap_lines:?}"));
    assert_eq!(
        result["bvlc"]["for_function"], "Connect-Request",
        "{result}"
    );
    assert_eq!(result["bvlc"]["result"], "NAK", "{result}");
    assert_eq!(result["bvlc"]["error_class"]["be"], 7, "{result}");
    assert_eq!(result["bvlc"]["error_code"]["be"], 151, "{result}");
}

/// The peer hub's duplicate-VMAC NAK: class 7, code 151, big-endian on the wire.
#[test]
fn peer_hub_naks_a_duplicate_vmac_with_the_standard_code() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::new(dir.path());
    let (hub, url) = peer.hub();
    assert_duplicate_vmac_is_naked_with_the_standard_code(&peer, &url);
    drop(hub);
}

// ---------------------------------------------------------------------------
// Our side: `hilbench sim bsc-hub`, our node (`BscNodeActor`) and
// `hilbench validate bsc-hub` against the peer.
// ---------------------------------------------------------------------------

const OUR_NODE_VMAC: &str = "02:00:00:00:00:44";

/// `hilbench sim bsc-hub --listen 127.0.0.1:0 --tls-dir PKI`; returns it and its URL.
fn our_hub(peer: &Peer) -> (Proc, String) {
    let args = strings(&[
        "sim",
        "bsc-hub",
        "--listen",
        "127.0.0.1:0",
        "--tls-dir",
        peer.pki.to_str().unwrap(),
    ]);
    let hub = Proc::spawn("our-hub", env!("CARGO_BIN_EXE_hilbench"), &args, &peer.dir);
    let ready = hub
        .lines
        .recv_timeout(STEP)
        .unwrap_or_else(|_| panic!("our hub printed no ready line; stderr: {}", hub.stderr()));
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["tls"], true, "{ready}");
    let url = ready["url"]
        .as_str()
        .expect("ready line has a url")
        .to_string();
    (hub, url)
}

/// Rusty-bacnet nodes through our hub: its Who-Is broadcast reaches its
/// device, the I-Am and the ReadProperty exchange come back, and on the wire
/// our hub inserted the originating VMAC, kept FF*6 on the broadcast and
/// removed the destination from unicasts.
#[test]
fn peer_nodes_talk_through_our_hub_broadcast_and_unicast() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::new(dir.path());
    let (hub, url) = our_hub(&peer);
    let responder = peer.responder(&url);
    // The tap ends TLS and presents the initiator's certificate (node 1), the
    // one whose Device UUID the initiator sends: our hub binds the two.
    let (tap, tap_url) = peer.tap(&url, 1);
    let (code, lines) = peer.initiator(&tap_url, &[]);
    let tap_lines = tap.stop();
    drop(responder);
    let hub_lines = hub.stop();
    assert_eq!(
        code, 0,
        "initiator failed through our hub: {lines:?}; hub said {hub_lines:?}"
    );
    assert!(
        event(&lines, "connected")["hub_vmac"].is_string(),
        "{lines:?}"
    );
    assert_delivered(&lines);
    let up = tap_lines
        .iter()
        .find(|l| l["event"] == "upgrade" && l["dir"] == "hub>node")
        .unwrap();
    assert_eq!(up["subprotocol"], "hub.bsc.bacnet.org", "{up}");
    assert_initiator_wire(&tap_lines, 1497);
}

/// Our hub's duplicate-VMAC NAK as the peer decodes it: class 7, code 151.
#[test]
fn our_hub_naks_the_peers_duplicate_vmac_with_the_standard_code() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::new(dir.path());
    let (hub, url) = our_hub(&peer);
    assert_duplicate_vmac_is_naked_with_the_standard_code(&peer, &url);
    drop(hub);
}

/// NPDU of a local Who-Is for device 2002 (low = high = 2002).
const WHO_IS_2002: [u8; 10] = [0x01, 0x00, 0x10, 0x08, 0x0a, 0x07, 0xd2, 0x1a, 0x07, 0xd2];
/// NPDU of a confirmed ReadProperty (invoke ID 7) of device 2002's Object_Name (77).
const READ_NAME_2002: [u8; 13] = [
    0x01, 0x04, 0x02, 0x05, 0x07, 0x0c, 0x0c, 0x02, 0x00, 0x07, 0xd2, 0x19, 0x4d,
];

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Our node (the `bsc-node` actor) on HUB_URL talks to the peer's device:
/// Who-Is broadcast → I-Am, then ReadProperty unicast to its VMAC → the ACK
/// with its Object_Name. Returns the NPDUs received from the responder.
fn our_node_talks_to_the_peer_device(
    hub_url: &str,
    pki: &Path,
    reset_between: bool,
) -> Vec<hilbench::client::bsc_node::ReceivedNpdu> {
    use actix::Actor;
    use hilbench::client::bsc_node::{
        BscNodeActor, BscNodeConfig, DisconnectNode, GetNodeStatus, SendNpdu, TakeReceived,
    };
    use hilbench::client::bsc_node_core::NodeConfig;
    use hilbench::protocol::bvlc_sc::Vmac;
    use hilbench::transport::tls::TlsDir;
    use hilbench::transport::ws_client::WsConnectOptions;

    let responder: Vmac = RESPONDER_VMAC.parse().unwrap();
    let files = TlsDir::node(pki, "node-4");
    let tls = files.client_config().expect("node-4 TLS config");
    // The Device UUID node-4's certificate carries: our hub binds the two.
    let uuid = files.device_uuid().expect("node-4.pem has a urn:uuid SAN");
    let session = NodeConfig::new(
        OUR_NODE_VMAC.parse().unwrap(),
        hilbench::protocol::bvlc_sc::DeviceUuid(uuid),
    );
    let mut cfg = BscNodeConfig::new("our-node", hub_url, session);
    cfg.ws = WsConnectOptions::hub(Some(tls));
    cfg.connection_faults = reset_between;
    cfg.backoff_min = Duration::from_millis(200);
    if reset_between {
        // A half-open connection is found out by the heartbeat.
        cfg.session.heartbeat_interval = Duration::from_millis(300);
        cfg.session.heartbeat_ack_wait = Duration::from_millis(500);
    }
    let sys = actix::System::new();
    sys.block_on(async move {
        let node = BscNodeActor::new(
            cfg,
            hilbench::observe::ObservationLog::new(std::time::Instant::now()),
        )
        .start();
        let deadline = Instant::now() + STEP;
        loop {
            let st = node.send(GetNodeStatus).await.unwrap();
            if st.connected_to.is_some() {
                assert_eq!(
                    st.hub_max_npdu,
                    Some(1497),
                    "the peer hub's MaxNPDU, read big-endian: {st:?}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "our node did not connect to {hub_url}: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut from_responder = Vec::new();
        let await_reply = |what: &'static str, needle: Vec<u8>, resend: (Vmac, Vec<u8>)| {
            let node = node.clone();
            let mut got = Vec::new();
            async move {
                let deadline = Instant::now() + STEP;
                loop {
                    // The device may still be connecting: repeat the request until it answers.
                    let _ = node
                        .send(SendNpdu {
                            dest: resend.0,
                            npdu: resend.1.clone(),
                        })
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let rx = node.send(TakeReceived).await.unwrap();
                    let hit = rx
                        .iter()
                        .any(|r| r.from == Some(responder) && contains(&r.npdu, &needle));
                    got.extend(rx);
                    if hit {
                        return got;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "no {what} from the peer device; received {got:?}"
                    );
                }
            }
        };
        // I-Am (unconfirmed service 0) carrying Object_Identifier device 2002.
        from_responder.extend(
            await_reply(
                "I-Am",
                vec![0xc4, 0x02, 0x00, 0x07, 0xd2],
                (Vmac::BROADCAST, WHO_IS_2002.to_vec()),
            )
            .await,
        );
        if reset_between {
            every_connection_fault(&node).await;
        }
        // ReadProperty-ACK: complex ACK, invoke ID 7, service 12, then the name.
        let mut ack = vec![0x30, 0x07, 0x0c];
        ack.extend_from_slice(&[
            0x0c, 0x02, 0x00, 0x07, 0xd2, 0x19, 0x4d, 0x3e, 0x75, 0x17, 0x00,
        ]);
        ack.extend_from_slice(b"rusty-bacnet responder");
        from_responder.extend(
            await_reply(
                "ReadProperty-ACK",
                ack,
                (responder, READ_NAME_2002.to_vec()),
            )
            .await,
        );
        node.send(DisconnectNode).await.unwrap();
        from_responder.retain(|r| r.from == Some(responder));
        from_responder
    })
}

/// Every connection fault on the node's link, on its way to the peer's hub
/// (under TLS): each ends the node's connection in its own way, the node
/// reports it and connects again, and the hub takes it back with the same
/// VMAC and UUID (after a half-open, while it may still hold the stale one).
/// Latency and bandwidth stay on for the exchange that follows.
async fn every_connection_fault(node: &actix::Addr<hilbench::client::bsc_node::BscNodeActor>) {
    use hilbench::link::fault::{FaultTrigger, LinkFault};
    let once = FaultTrigger::default();
    let always = FaultTrigger { always: true, ..Default::default() };
    let reset = (LinkFault::Reset { bytes: None }, once.clone());
    let cases: Vec<(&str, Vec<(LinkFault, FaultTrigger)>)> = vec![
        ("reset", vec![reset.clone()]),
        // The last error is the failed connect.
        ("fault refuse", vec![(LinkFault::Refuse, once.clone()), reset.clone()]),
        ("TLS handshake failed", vec![(LinkFault::AcceptClose, once.clone()), reset.clone()]),
        ("", vec![(LinkFault::SlowClose { ms: 300 }, once.clone()), (LinkFault::CloseAfter { bytes: 0 }, once.clone())]),
        ("no answer to Heartbeat-Request", vec![(LinkFault::HalfOpen, once.clone())]),
    ];
    for (error, rules) in cases {
        let names: Vec<&str> = rules.iter().map(|r| r.0.name()).collect();
        fault_and_reconnect(node, rules, error, &names.join(" + ")).await;
    }
    for (fault, trigger) in [(LinkFault::Latency { ms: 100 }, always.clone()), (LinkFault::Bandwidth { bytes_per_s: 4000 }, always)] {
        add(node, fault, trigger).await;
    }
}

async fn add(node: &actix::Addr<hilbench::client::bsc_node::BscNodeActor>, fault: hilbench::link::fault::LinkFault, trigger: hilbench::link::fault::FaultTrigger) {
    use hilbench::client::poller::ClientFault;
    use hilbench::link::fault::FaultRule;
    node.send(ClientFault(FaultRule { fault, trigger, name: None })).await.unwrap();
}

/// Adds the faults and waits until the node has lost its connection (its
/// last error containing `error`) and connected again.
async fn fault_and_reconnect(
    node: &actix::Addr<hilbench::client::bsc_node::BscNodeActor>,
    rules: Vec<(hilbench::link::fault::LinkFault, hilbench::link::fault::FaultTrigger)>,
    error: &str,
    what: &str,
) {
    use hilbench::client::bsc_node::GetNodeStatus;
    let before = node.send(GetNodeStatus).await.unwrap().connects_primary;
    for (fault, trigger) in rules {
        add(node, fault, trigger).await;
    }
    let deadline = Instant::now() + STEP;
    loop {
        let st = node.send(GetNodeStatus).await.unwrap();
        if st.connects_primary > before && st.connected_to.is_some() {
            assert!(st.last_error.as_deref().is_some_and(|e| e.contains(error)), "{what}: {st:?}");
            return;
        }
        assert!(Instant::now() < deadline, "{what}: our node did not reconnect: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The peer's device on the hub at `hub_url` and our node talking to it there (see
/// `our_node_talks_to_the_peer_device`); the ReadProperty-ACK must come as a unicast.
fn assert_our_node_talks_to_the_peer_device(peer: &Peer, hub_url: &str) {
    assert_our_node_talks_to_the_peer_device_with(peer, hub_url, false)
}

fn assert_our_node_talks_to_the_peer_device_with(peer: &Peer, hub_url: &str, reset_between: bool) {
    let responder = peer.responder(hub_url);
    let got = our_node_talks_to_the_peer_device(hub_url, &peer.pki, reset_between);
    drop(responder);
    assert!(
        got.iter().any(|r| !r.broadcast),
        "the ReadProperty-ACK came as a unicast: {got:?}"
    );
}

/// Our node through the peer's hub to the peer's device.
#[test]
fn our_node_talks_to_the_peer_device_through_the_peer_hub() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::new(dir.path());
    let (hub, url) = peer.hub();
    assert_our_node_talks_to_the_peer_device(&peer, &url);
    drop(hub);
}

/// Every connection fault on our node's link between the I-Am and the
/// ReadProperty (see `every_connection_fault`): the peer's hub lets the node
/// back in each time, and the unicast exchange works on the last connection,
/// slowed by latency and a bandwidth limit.
#[test]
fn our_node_reconnects_to_the_peer_hub_after_every_connection_fault() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::new(dir.path());
    let (hub, url) = peer.hub();
    assert_our_node_talks_to_the_peer_device_with(&peer, &url, true);
    drop(hub);
}

/// Our node and the peer's device on our hub.
#[test]
fn our_node_talks_to_the_peer_device_through_our_hub() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::new(dir.path());
    let (hub, url) = our_hub(&peer);
    assert_our_node_talks_to_the_peer_device(&peer, &url);
    drop(hub);
}

/// `hilbench validate bsc-hub` against the peer hub: every required check
/// passes except the ones the peer really differs on, which are flagged: it
/// drops hub-bound messages that carry an originating VMAC (a warning, since
/// nodes that send it cannot talk through that hub). Its values are the
/// standard's: big-endian limits, NAK 7/151 for a duplicate VMAC.
#[test]
fn validate_flags_how_the_peer_hub_differs() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::new(dir.path());
    let (hub, url) = peer.hub();
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench"))
        .args([
            "validate",
            "bsc-hub",
            "--url",
            &url,
            "--tls-dir",
            peer.pki.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    drop(hub);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "report is not JSON ({e}): {stdout}; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let check = |name: &str| -> &Value {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name:?} in {report}"))
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "no required check may fail against the peer: {report}"
    );
    for name in [
        "connect",
        "limits_byte_order",
        "unicast_forwarding",
        "broadcast_forwarding",
        "heartbeat_ack_echo",
        "duplicate_vmac_nak",
        "duplicate_vmac_keeps_original",
        "subprotocol_wrong",
        "text_frame_closes",
    ] {
        assert_eq!(check(name)["outcome"], "pass", "{}", check(name));
    }
    assert!(
        check("duplicate_vmac_nak")["detail"]
            .as_str()
            .unwrap()
            .contains("151"),
        "{}",
        check("duplicate_vmac_nak")
    );
    assert!(
        check("connect")["detail"]
            .as_str()
            .unwrap()
            .contains("MaxNPDU 1497"),
        "{}",
        check("connect")
    );
    // The peer's difference, flagged.
    let orig = check("originating_vmac_on_hub_bound");
    assert_eq!(orig["outcome"], "warn", "{orig}");
    assert!(
        orig["detail"].as_str().unwrap().contains("not forwarded"),
        "{orig}"
    );
    // And the peer hub does not bind identities to certificates (it checks
    // no client certificates): node 2's certificate takes node 1's place.
    let bound = check("certificate_bound_identity");
    assert_eq!(bound["outcome"], "warn", "{bound}");
    assert!(
        bound["detail"].as_str().unwrap().contains("receives its unicasts"),
        "{bound}"
    );
    let flagged: Vec<&Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["outcome"] != "pass")
        .collect();
    assert_eq!(
        flagged.len(),
        2,
        "only the originating-VMAC and identity differences are flagged: {flagged:?}"
    );
}
