//! `hilbench validate bsc-hub`: conformance checks against a BACnet/SC hub, run with the
//! node's own session code plus hand-built probe frames. Each check passes, fails or
//! warns (a difference from common practice that is not a violation) with details; the
//! exit code is non-zero when a required check fails.

use std::path::PathBuf;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rand::RngCore;
use serde::Serialize;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::client::bsc_node::{connect_node, NodeConnectError};
use crate::client::bsc_node_core::{identity_from_seed, limits_byte_order, HubLimits, LimitsByteOrder, NodeConfig, NodeSession};
use crate::protocol::bvlc_sc::{
    decode, encode, error_code, function, swap_quirk, BvlcMessage, BvlcPayload, BvlcResult, DeviceUuid, HeaderOption,
    HeaderOptionKind, Vmac, ERROR_CLASS_COMMUNICATION, ERROR_CLASS_SECURITY,
};
use crate::transport::tls::{device_uuid_in_file, node_client_config, TlsDir};
use crate::transport::ws_client::{connect_ws, HubUrl, WsConnectError, WsConnectOptions, WsStream};

/// `hilbench validate bsc-hub --help` after the options.
pub const BSC_HUB_VALIDATE_HELP: &str = "Examples:
  hilbench validate bsc-hub --url ws://127.0.0.1:4443
  hilbench validate bsc-hub --url wss://127.0.0.1:4443 --tls-dir target/pki
  hilbench validate bsc-hub --url wss://hub.lab:443 --ca ca.pem --cert node.pem --key node.key --json

Checks: connect/accept, byte order of MaxBVLC/MaxNPDU, unicast and broadcast forwarding
(originating VMAC inserted, destination removed or kept, no echo to the sender), hub-bound
messages carrying an originating VMAC, NAK for an unknown must-understand header option,
NAK for a duplicate VMAC with another UUID (151 is the standard's node-duplicate-vmac; 113 is
read but flagged), same UUID replacing a connection, Heartbeat-ACK echoing the message ID,
missing and wrong subprotocol, oversize messages, TEXT frames; with TLS and two node
certificates, whether one certificate can take over another's VMAC and Device UUID
(certificate_bound_identity; a warning when it can). Each probe sends the Device UUID in
its certificate's urn:uuid SAN, if it has one.
Exit 0 when every required check passes, 1 when one fails, 2 on bad arguments.";

#[derive(clap::Args, Debug, Clone)]
pub struct BscHubArgs {
    /// Hub URL, ws:// or wss://.
    #[arg(long)]
    pub url: String,
    /// CA certificate the hub's certificate must chain to.
    #[arg(long, requires = "cert")]
    pub ca: Option<PathBuf>,
    /// Client certificate to present.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    #[arg(long, requires = "ca")]
    pub key: Option<PathBuf>,
    /// A `hilbench pki` directory (ca.pem, node-1.pem/key …) instead of --ca/--cert/--key.
    #[arg(long, conflicts_with_all = ["ca", "cert", "key"])]
    pub tls_dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for each expected answer.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub wait: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub required: bool,
    pub outcome: Outcome,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    pub url: String,
    pub checks: Vec<CheckResult>,
    pub passed: bool,
}

impl ValidationReport {
    pub fn check(&self, name: &str) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// `hilbench validate bsc-hub`.
pub fn run_bsc_hub(a: BscHubArgs) -> i32 {
    let opts = match ws_options(&a) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return 2;
        }
    };
    let report = rt.block_on(validate_bsc_hub(&a.url, &opts, a.wait));
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        }
    } else {
        println!("BACnet/SC hub {}", report.url);
        for c in &report.checks {
            let o = match c.outcome {
                Outcome::Pass => "pass",
                Outcome::Warn => "WARN",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "skip",
            };
            println!("  {o:<4} {:<34}{} {}", c.name, if c.required { "" } else { " (advisory)" }, c.detail);
        }
        let fails = report.checks.iter().filter(|c| c.outcome == Outcome::Fail && c.required).count();
        let warns = report.checks.iter().filter(|c| c.outcome == Outcome::Warn).count();
        println!("{} checks, {fails} required failed, {warns} warnings", report.checks.len());
    }
    i32::from(!report.passed)
}

/// TLS settings from the arguments: per-node options (node-1.., or one
/// certificate for all), each with the Device UUID its certificate carries.
pub fn ws_options(a: &BscHubArgs) -> Result<Vec<(WsConnectOptions, Option<DeviceUuid>)>, String> {
    let url = HubUrl::parse(&a.url).map_err(|e| e.to_string())?;
    let configs = match (&a.tls_dir, &a.ca, &a.cert, &a.key) {
        (Some(dir), ..) => {
            let mut v = Vec::new();
            for k in 1..=4 {
                let d = TlsDir::node(dir, &format!("node-{k}"));
                if d.check().is_ok() {
                    v.push(Some((d.client_config().map_err(|e| e.to_string())?, d.device_uuid().map(DeviceUuid))));
                }
            }
            if v.is_empty() {
                return Err(format!("{}: no node-1.pem/node-1.key (make them with `hilbench pki`)", dir.display()));
            }
            v
        }
        (None, Some(ca), cert, key) => {
            let client = match (cert, key) {
                (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                _ => None,
            };
            let uuid = cert.as_deref().and_then(device_uuid_in_file).map(DeviceUuid);
            vec![Some((node_client_config(ca, client).map_err(|e| e.to_string())?, uuid))]
        }
        _ => vec![None],
    };
    if url.tls && configs.iter().any(|c| c.is_none()) {
        return Err(format!("{}: wss:// needs --tls-dir or --ca/--cert/--key", a.url));
    }
    if !url.tls && configs.iter().any(|c| c.is_some()) {
        return Err(format!("{}: TLS options given for a plaintext ws:// URL", a.url));
    }
    Ok(configs
        .into_iter()
        .map(|c| match c {
            Some((tls, uuid)) => (WsConnectOptions::hub(Some(tls)), uuid),
            None => (WsConnectOptions::hub(None), None),
        })
        .collect())
}

/// What came back on a probe connection.
#[derive(Debug)]
enum Heard {
    Msg(BvlcMessage),
    Undecodable(String),
    Text,
    Closed(Option<u16>, String),
    Silence,
}

/// A node of the validator's own: the session's identity plus raw access to the socket.
struct ProbeNode {
    ws: WsStream,
    session: NodeSession,
    vmac: Vmac,
    uuid: DeviceUuid,
    hub: HubLimits,
    epoch: Instant,
}

impl ProbeNode {
    async fn connect(url: &str, opts: &WsConnectOptions, vmac: Vmac, uuid: DeviceUuid) -> Result<ProbeNode, NodeConnectError> {
        let mut cfg = NodeConfig::new(vmac, uuid);
        cfg.connect_wait = Duration::from_secs(5);
        let epoch = Instant::now();
        let (ws, session) = connect_node(url, opts, cfg, rand::random(), epoch).await?;
        let hub = session.hub().cloned().ok_or_else(|| NodeConnectError::Closed("no Connect-Accept recorded".into()))?;
        Ok(ProbeNode { ws, session, vmac, uuid, hub, epoch })
    }

    async fn send(&mut self, frame: Vec<u8>) -> Result<(), String> {
        self.session.note_sent(self.epoch.elapsed());
        self.ws.send(WsMessage::Binary(frame.into())).await.map_err(|e| e.to_string())
    }

    fn id(&mut self) -> u16 {
        self.session.allocate_id()
    }

    /// The next message within `wait`; Heartbeat-Requests from the hub are answered and
    /// skipped.
    async fn hear(&mut self, wait: Duration) -> Heard {
        let until = Instant::now() + wait;
        loop {
            let m = match tokio::time::timeout_at(until, self.ws.next()).await {
                Err(_) => return Heard::Silence,
                Ok(None) => return Heard::Closed(None, "stream ended".into()),
                Ok(Some(Err(e))) => return Heard::Closed(None, e.to_string()),
                Ok(Some(Ok(m))) => m,
            };
            match m {
                WsMessage::Binary(b) => match decode(&b) {
                    Ok(msg) if msg.payload == BvlcPayload::HeartbeatRequest => {
                        let ack = BvlcMessage::new(msg.message_id, BvlcPayload::HeartbeatAck);
                        if let Ok(f) = encode(&ack) {
                            let _ = self.send(f).await;
                        }
                    }
                    Ok(msg) => return Heard::Msg(msg),
                    Err(e) => return Heard::Undecodable(e.to_string()),
                },
                WsMessage::Text(_) => return Heard::Text,
                WsMessage::Close(f) => {
                    return Heard::Closed(f.as_ref().map(|f| u16::from(f.code)), f.map(|f| f.reason.to_string()).unwrap_or_default())
                }
                _ => {}
            }
        }
    }

    /// Waits for an Encapsulated-NPDU carrying `npdu`, skipping others.
    async fn hear_npdu(&mut self, npdu: &[u8], wait: Duration) -> Option<BvlcMessage> {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.hear(left).await {
                Heard::Msg(m) if m.payload == BvlcPayload::EncapsulatedNpdu(npdu.to_vec()) => return Some(m),
                Heard::Msg(_) | Heard::Undecodable(_) | Heard::Text => continue,
                Heard::Closed(..) | Heard::Silence => return None,
            }
        }
    }

    /// Whether the hub still answers a heartbeat on this connection.
    async fn alive(&mut self, wait: Duration) -> bool {
        let id = self.id();
        let Ok(f) = encode(&BvlcMessage::new(id, BvlcPayload::HeartbeatRequest)) else { return false };
        if self.send(f).await.is_err() {
            return false;
        }
        let until = Instant::now() + wait;
        loop {
            match self.hear(until.saturating_duration_since(Instant::now())).await {
                Heard::Msg(m) if m.payload == BvlcPayload::HeartbeatAck => return true,
                Heard::Msg(_) | Heard::Undecodable(_) | Heard::Text => continue,
                _ => return false,
            }
        }
    }
}

fn random_identity() -> (Vmac, DeviceUuid) {
    let mut seed = [0u8; 22];
    rand::thread_rng().fill_bytes(&mut seed);
    identity_from_seed(seed)
}

fn npdu_frame(id: u16, dest: Vmac, npdu: &[u8], originating: Option<Vmac>) -> Vec<u8> {
    let mut m = BvlcMessage::new(id, BvlcPayload::EncapsulatedNpdu(npdu.to_vec()));
    m.destination = Some(dest);
    m.originating = originating;
    encode(&m).unwrap_or_default()
}

fn describe_nak(m: &BvlcMessage) -> Option<(u8, u8, u16, u16, String)> {
    match &m.payload {
        BvlcPayload::Result { for_function, result: BvlcResult::Nak { header_marker, error_class, error_code, details } } => {
            Some((*for_function, *header_marker, *error_class, *error_code, details.clone()))
        }
        _ => None,
    }
}

struct Checks {
    list: Vec<CheckResult>,
}

impl Checks {
    fn add(&mut self, name: &'static str, required: bool, outcome: Outcome, detail: impl Into<String>) {
        self.list.push(CheckResult { name, required, outcome, detail: detail.into() });
    }
}

/// Runs every check. Each waits at most `wait` for an answer, so the whole run is bounded.
///
/// Each probe connects with `opts[i]` and, where its certificate carries a
/// Device UUID, sends that one (a hub may bind identities to certificates).
pub async fn validate_bsc_hub(url: &str, opts: &[(WsConnectOptions, Option<DeviceUuid>)], wait: Duration) -> ValidationReport {
    let mut c = Checks { list: Vec::new() };
    let opt = |i: usize| opts[i % opts.len().max(1)].0.clone();
    // A random VMAC, and the UUID of probe i's certificate if it has one.
    let identity = |i: usize| {
        let (v, u) = random_identity();
        (v, opts.get(i % opts.len().max(1)).and_then(|o| o.1).unwrap_or(u))
    };
    let (va, ua) = identity(0);
    let (vb, ub) = identity(1);
    let (vc, uc) = identity(2);

    // --- connect ---
    let mut a = match ProbeNode::connect(url, &opt(0), va, ua).await {
        Ok(n) => n,
        Err(e) => {
            c.add("connect", true, Outcome::Fail, e.to_string());
            return finish(url, c);
        }
    };
    c.add(
        "connect",
        true,
        Outcome::Pass,
        format!("hub VMAC {} UUID {}, MaxBVLC {}, MaxNPDU {}", a.hub.vmac, a.hub.uuid, a.hub.max_bvlc, a.hub.max_npdu),
    );
    match limits_byte_order(a.hub.max_bvlc, a.hub.max_npdu) {
        LimitsByteOrder::BigEndian => c.add("limits_byte_order", true, Outcome::Pass, "MaxBVLC/MaxNPDU big-endian"),
        LimitsByteOrder::LittleEndian => c.add(
            "limits_byte_order",
            true,
            Outcome::Fail,
            format!(
                "MaxBVLC/MaxNPDU sent little-endian: read {} / {}, meant {} / {}",
                a.hub.max_bvlc,
                a.hub.max_npdu,
                swap_quirk(a.hub.max_bvlc),
                swap_quirk(a.hub.max_npdu)
            ),
        ),
        LimitsByteOrder::Implausible => c.add(
            "limits_byte_order",
            true,
            Outcome::Fail,
            format!("MaxBVLC {} / MaxNPDU {} are implausible either way", a.hub.max_bvlc, a.hub.max_npdu),
        ),
    }
    let npdu_max = match a.hub.byte_order {
        LimitsByteOrder::LittleEndian => swap_quirk(a.hub.max_npdu),
        _ => a.hub.max_npdu,
    };
    if npdu_max >= 1497 {
        c.add("max_npdu_1497", false, Outcome::Pass, format!("MaxNPDU {npdu_max}"));
    } else {
        c.add("max_npdu_1497", false, Outcome::Warn, format!("MaxNPDU {npdu_max} is below the 1497 octets a hub must carry"));
    }

    // --- forwarding (needs three nodes) ---
    let b = ProbeNode::connect(url, &opt(1), vb, ub).await;
    let cn = ProbeNode::connect(url, &opt(2), vc, uc).await;
    let (mut b, mut cn) = match (b, cn) {
        (Ok(b), Ok(cn)) => (b, cn),
        (Err(e), _) | (_, Err(e)) => {
            c.add("unicast_forwarding", true, Outcome::Fail, format!("second/third node could not connect: {e}"));
            return finish(url, c);
        }
    };
    {
        let npdu = b"hilbench-unicast".to_vec();
        let id = a.id();
        let _ = a.send(npdu_frame(id, vb, &npdu, None)).await;
        match b.hear_npdu(&npdu, wait).await {
            Some(m) if m.originating == Some(va) && m.destination.is_none() && m.message_id == id => {
                c.add("unicast_forwarding", true, Outcome::Pass, "originating VMAC inserted, destination removed, message ID kept")
            }
            Some(m) if m.originating == Some(va) && m.destination.is_none() => c.add(
                "unicast_forwarding",
                true,
                Outcome::Warn,
                format!("forwarded, but message ID {} became {}", id, m.message_id),
            ),
            Some(m) => c.add(
                "unicast_forwarding",
                true,
                Outcome::Fail,
                format!("forwarded with originating {:?} (expected {va}), destination {:?} (expected none)", m.originating.map(|v| v.to_string()), m.destination.map(|v| v.to_string())),
            ),
            None => c.add("unicast_forwarding", true, Outcome::Fail, format!("node B did not receive the unicast within {} ms", wait.as_millis())),
        }
    }
    {
        let npdu = b"hilbench-broadcast".to_vec();
        let id = a.id();
        let _ = a.send(npdu_frame(id, Vmac::BROADCAST, &npdu, None)).await;
        let rb = b.hear_npdu(&npdu, wait).await;
        let rc = cn.hear_npdu(&npdu, wait).await;
        let echo = a.hear_npdu(&npdu, Duration::from_millis(200).min(wait)).await;
        let ok = |m: &Option<BvlcMessage>| m.as_ref().is_some_and(|m| m.originating == Some(va) && m.destination == Some(Vmac::BROADCAST));
        if ok(&rb) && ok(&rc) && echo.is_none() {
            c.add("broadcast_forwarding", true, Outcome::Pass, "both receivers got it with the originating VMAC and the broadcast destination; not echoed to the sender");
        } else {
            let show = |m: &Option<BvlcMessage>| match m {
                None => "nothing".to_string(),
                Some(m) => format!("originating {:?} destination {:?}", m.originating.map(|v| v.to_string()), m.destination.map(|v| v.to_string())),
            };
            c.add(
                "broadcast_forwarding",
                true,
                Outcome::Fail,
                format!("B got {}, C got {}, sender got {}", show(&rb), show(&rc), if echo.is_some() { "its own broadcast back" } else { "nothing (right)" }),
            );
        }
    }
    {
        // Hub-bound messages should carry no originating VMAC; some nodes send one anyway.
        let npdu = b"hilbench-spoofed-origin".to_vec();
        let id = a.id();
        let fake = Vmac([0x02, 0xBA, 0xD0, 0, 0, 1]);
        let _ = a.send(npdu_frame(id, vb, &npdu, Some(fake))).await;
        let got = b.hear_npdu(&npdu, wait).await;
        match got {
            Some(m) if m.originating == Some(va) => c.add(
                "originating_vmac_on_hub_bound",
                true,
                Outcome::Pass,
                "a unicast that carried an originating VMAC was forwarded with the sender's real VMAC",
            ),
            Some(m) => c.add(
                "originating_vmac_on_hub_bound",
                true,
                Outcome::Fail,
                format!("forwarded with originating {:?}: a node can spoof its VMAC through this hub", m.originating.map(|v| v.to_string())),
            ),
            None => {
                let nak = match a.hear(Duration::from_millis(300)).await {
                    Heard::Msg(m) => describe_nak(&m).map(|n| format!(" (NAK code {})", n.3)),
                    _ => None,
                };
                c.add(
                    "originating_vmac_on_hub_bound",
                    true,
                    Outcome::Warn,
                    format!("not forwarded{}: nodes that set the originating VMAC (common in Python stacks) cannot talk through this hub", nak.unwrap_or_default()),
                )
            }
        }
    }

    // --- header options ---
    {
        let id = a.id();
        let mut m = BvlcMessage::new(id, BvlcPayload::HeartbeatRequest);
        let opt = HeaderOption { must_understand: true, kind: HeaderOptionKind::Unknown { option_type: 7, data: None } };
        let marker = opt.marker();
        m.destination_options = vec![opt];
        let _ = a.send(encode(&m).unwrap_or_default()).await;
        let mut outcome = None;
        let until = Instant::now() + wait;
        while outcome.is_none() {
            match a.hear(until.saturating_duration_since(Instant::now())).await {
                Heard::Msg(r) if r.message_id == id => {
                    outcome = Some(match describe_nak(&r) {
                        Some((f, hm, cl, code, _)) if f == function::HEARTBEAT_REQUEST && code == error_code::HEADER_NOT_UNDERSTOOD && cl == ERROR_CLASS_COMMUNICATION => {
                            if hm == marker {
                                (Outcome::Pass, format!("NAK header-not-understood (146), error header marker 0x{hm:02X}"))
                            } else {
                                (Outcome::Warn, format!("NAK 146, but error header marker 0x{hm:02X} instead of the option's 0x{marker:02X}"))
                            }
                        }
                        Some((_, _, cl, code, d)) if code == swap_quirk(error_code::HEADER_NOT_UNDERSTOOD) || cl == swap_quirk(ERROR_CLASS_COMMUNICATION) => {
                            (Outcome::Fail, format!("NAK with class {cl} code {code} {d:?}: little-endian error class/code"))
                        }
                        Some((_, _, cl, code, d)) => (Outcome::Fail, format!("NAK class {cl} code {code} {d:?}, expected class 7 code 146")),
                        None if r.payload == BvlcPayload::HeartbeatAck => {
                            (Outcome::Fail, "the hub acted on a message with an unknown must-understand option (Heartbeat-ACK)".into())
                        }
                        None => (Outcome::Fail, format!("answered with {:?}", r.payload)),
                    })
                }
                Heard::Msg(_) | Heard::Undecodable(_) | Heard::Text => continue,
                Heard::Silence => outcome = Some((Outcome::Fail, format!("no NAK within {} ms", wait.as_millis()))),
                Heard::Closed(code, why) => outcome = Some((Outcome::Fail, format!("hub closed the connection ({code:?} {why})"))),
            }
        }
        let (o, d) = outcome.unwrap_or((Outcome::Fail, "no answer".into()));
        c.add("unknown_must_understand_option", true, o, d);
    }

    // --- heartbeat ---
    {
        let id = 0xBEEF;
        let _ = a.send(encode(&BvlcMessage::new(id, BvlcPayload::HeartbeatRequest)).unwrap_or_default()).await;
        let until = Instant::now() + wait;
        let mut result = (Outcome::Fail, format!("no Heartbeat-ACK within {} ms", wait.as_millis()));
        loop {
            match a.hear(until.saturating_duration_since(Instant::now())).await {
                Heard::Msg(r) if r.payload == BvlcPayload::HeartbeatAck => {
                    result = if r.message_id == id {
                        (Outcome::Pass, "Heartbeat-ACK echoes message ID 0xBEEF".into())
                    } else {
                        (Outcome::Fail, format!("Heartbeat-ACK has message ID 0x{:04X}, request had 0xBEEF", r.message_id))
                    };
                    break;
                }
                Heard::Msg(_) | Heard::Undecodable(_) | Heard::Text => continue,
                _ => break,
            }
        }
        c.add("heartbeat_ack_echo", true, result.0, result.1);
    }

    // --- duplicate VMAC ---
    {
        // Another UUID: that of a certificate other than A's, so a hub that
        // binds identities to certificates sees a genuine second device.
        let other = (1..opts.len()).find_map(|j| opts[j].1.filter(|u| *u != ua).map(|u| (j, u)));
        let (probe, other_uuid) = match other {
            Some((j, u)) => (opt(j), u),
            None => (opt(3), random_identity().1),
        };
        match ProbeNode::connect(url, &probe, va, other_uuid).await {
            Ok(_) => c.add("duplicate_vmac_nak", true, Outcome::Fail, "a second node with the same VMAC and another UUID was accepted"),
            Err(NodeConnectError::Rejected(n)) => {
                let (o, d) = match (n.error_class, n.error_code) {
                    (ERROR_CLASS_SECURITY, error_code::AUTHENTICATION_FAILED) if other.is_none() => (
                        Outcome::Warn,
                        "NAK authentication-failed: the hub binds Device UUIDs to certificates, and with one certificate no second device could be tried (give --tls-dir with two or more node certificates)".to_string(),
                    ),
                    (ERROR_CLASS_COMMUNICATION, error_code::NODE_DUPLICATE_VMAC) => (Outcome::Pass, "NAK class 7 code 151 (node-duplicate-vmac)".to_string()),
                    (ERROR_CLASS_COMMUNICATION, error_code::MESSAGE_TOO_LONG) => (
                        Outcome::Warn,
                        "NAK code 113: non-standard (113 is message-too-long; node-duplicate-vmac is 151). Nodes that check for 151 will not recognise it".to_string(),
                    ),
                    (cl, code) if cl == swap_quirk(ERROR_CLASS_COMMUNICATION) => {
                        (Outcome::Fail, format!("NAK class {cl} code {code}: little-endian error class/code (meant {} / {})", swap_quirk(cl), swap_quirk(code)))
                    }
                    (cl, code) => (Outcome::Fail, format!("NAK class {cl} code {code} {:?}, expected class 7 code 151", n.details)),
                };
                c.add("duplicate_vmac_nak", true, o, d);
            }
            Err(e) => c.add("duplicate_vmac_nak", true, Outcome::Fail, format!("expected a NAK, got: {e}")),
        }
        if a.alive(wait).await {
            c.add("duplicate_vmac_keeps_original", true, Outcome::Pass, "the original connection still answers");
        } else {
            c.add("duplicate_vmac_keeps_original", true, Outcome::Fail, "the original connection was dropped by a duplicate with another UUID");
        }
    }

    // --- subprotocol ---
    {
        let mut o = opt(0);
        o.subprotocol = None;
        let (out, d) = match connect_ws(url, &o).await {
            Err(WsConnectError::Refused { status, .. }) => (Outcome::Pass, format!("refused with HTTP {status}")),
            Ok(_) => (Outcome::Warn, "accepted a WebSocket with no subprotocol (one implementation does; the standard asks for hub.bsc.bacnet.org)".into()),
            Err(WsConnectError::Upgrade { reason, .. }) if reason.to_lowercase().contains("subprotocol") => {
                (Outcome::Warn, format!("upgraded without a requested subprotocol ({reason})"))
            }
            Err(e) => (Outcome::Fail, format!("unexpected: {e}")),
        };
        c.add("subprotocol_missing", false, out, d);
        let mut o = opt(0);
        o.subprotocol = Some("wrong.example.org".into());
        let (out, d) = match connect_ws(url, &o).await {
            Err(WsConnectError::Refused { status, .. }) => (Outcome::Pass, format!("refused with HTTP {status}")),
            Ok(_) => (Outcome::Fail, "accepted subprotocol wrong.example.org".into()),
            Err(WsConnectError::Upgrade { reason, .. }) if reason.to_lowercase().contains("subprotocol") => {
                (Outcome::Fail, format!("upgraded for a wrong subprotocol ({reason})"))
            }
            Err(e) => (Outcome::Fail, format!("unexpected: {e}")),
        };
        c.add("subprotocol_wrong", true, out, d);
    }

    // --- oversize ---
    {
        let max_bvlc = match a.hub.byte_order {
            LimitsByteOrder::LittleEndian => swap_quirk(a.hub.max_bvlc),
            _ => a.hub.max_bvlc,
        };
        // Over MaxBVLC but a normal WebSocket message: a BVLC-level refusal is expected.
        let id = cn.id();
        let big = vec![0x55u8; usize::from(max_bvlc) + 16];
        let _ = cn.send(npdu_frame(id, vb, &big, None)).await;
        let mut result = (Outcome::Warn, format!("no NAK within {} ms (dropped silently?)", wait.as_millis()));
        let until = Instant::now() + wait;
        loop {
            match cn.hear(until.saturating_duration_since(Instant::now())).await {
                Heard::Msg(r) if r.message_id == id => {
                    result = match describe_nak(&r) {
                        Some((_, _, _, code, _)) if code == error_code::MESSAGE_TOO_LONG => {
                            (Outcome::Pass, format!("a {}-byte message over MaxBVLC {max_bvlc}: NAK message-too-long (113)", big.len() + 10))
                        }
                        Some((_, _, cl, code, d)) => (Outcome::Warn, format!("NAK class {cl} code {code} {d:?}, expected 113 message-too-long")),
                        None => (Outcome::Fail, format!("answered with {:?}", r.payload)),
                    };
                    break;
                }
                Heard::Undecodable(e) => {
                    result = (Outcome::Fail, format!("answered with an undecodable frame: {e}"));
                    break;
                }
                Heard::Msg(_) | Heard::Text => continue,
                Heard::Closed(code, why) => {
                    result = (Outcome::Pass, format!("connection closed ({code:?} {why})"));
                    break;
                }
                Heard::Silence => break,
            }
        }
        if b.hear_npdu(&big, Duration::from_millis(200)).await.is_some() {
            result = (Outcome::Fail, format!("a {}-byte NPDU over MaxBVLC {max_bvlc} was forwarded", big.len()));
        }
        c.add("oversize_bvlc", true, result.0, result.1);

        // 1 MiB in one WebSocket message: the hub must refuse it without falling over.
        let (vd, ud) = identity(3);
        match ProbeNode::connect(url, &opt(3), vd, ud).await {
            Ok(mut d) => {
                let id = d.id();
                let _ = d.send(npdu_frame(id, vb, &vec![0xAA; 1 << 20], None)).await;
                let (o, det) = match d.hear(wait).await {
                    Heard::Closed(code, why) => (Outcome::Pass, format!("closed ({code:?} {why})")),
                    Heard::Msg(r) if describe_nak(&r).is_some() => (Outcome::Pass, "NAKed".to_string()),
                    Heard::Silence => (Outcome::Warn, "no reaction to a 1 MiB message".to_string()),
                    other => (Outcome::Warn, format!("answered {other:?}")),
                };
                let alive = b.alive(wait).await;
                if alive {
                    c.add("oversize_websocket_message", true, o, det);
                } else {
                    c.add("oversize_websocket_message", true, Outcome::Fail, format!("{det}; another node's connection stopped answering afterwards"));
                }
            }
            Err(e) => c.add("oversize_websocket_message", true, Outcome::Fail, format!("could not connect a probe: {e}")),
        }
    }

    // --- TEXT frame ---
    {
        let (ve, ue) = identity(3);
        match ProbeNode::connect(url, &opt(3), ve, ue).await {
            Ok(mut e) => {
                let _ = e.ws.send(WsMessage::Text("hello hub".into())).await;
                let (o, d) = match e.hear(wait).await {
                    Heard::Closed(Some(1003), why) => (Outcome::Pass, format!("closed with 1003 {why}")),
                    Heard::Closed(code, why) => (Outcome::Warn, format!("closed with {code:?} {why}; 1003 (unsupported data) expected")),
                    Heard::Silence => {
                        if e.alive(wait).await {
                            (Outcome::Fail, "TEXT frame ignored: the connection stays up".to_string())
                        } else {
                            (Outcome::Warn, "connection went quiet without a close frame".to_string())
                        }
                    }
                    other => (Outcome::Fail, format!("answered {other:?}")),
                };
                c.add("text_frame_closes", true, o, d);
            }
            Err(e) => c.add("text_frame_closes", true, Outcome::Fail, format!("could not connect a probe: {e}")),
        }
    }

    // --- same UUID replaces (near the end: it takes A's VMAC) ---
    let mut holder = None;
    {
        match ProbeNode::connect(url, &opt(0), a.vmac, a.uuid).await {
            Ok(new) => {
                holder = Some(new);
                let old_closed = !a.alive(wait).await;
                if old_closed {
                    c.add("same_uuid_replaces", false, Outcome::Pass, "reconnect with the same VMAC and UUID accepted; the old connection closed");
                } else {
                    c.add("same_uuid_replaces", false, Outcome::Warn, "reconnect accepted but the old connection still answers");
                }
            }
            Err(e) => c.add("same_uuid_replaces", false, Outcome::Warn, format!("reconnect with the same VMAC and UUID refused: {e}")),
        }
    }

    // --- impersonation (last: if the hub allows it, A's VMAC is taken) ---
    // (Plaintext nodes have no certificate to bind to.)
    let tls = url.starts_with("wss://");
    match (1..opts.len()).find(|&j| opts[j].1.is_some_and(|u| u != a.uuid)) {
        None if !tls => {}
        None => c.add(
            "certificate_bound_identity",
            false,
            Outcome::Warn,
            "not tried: needs two node certificates that carry different urn:uuid SANs (--tls-dir with node-1 and node-2)",
        ),
        Some(j) => match ProbeNode::connect(url, &opt(j), a.vmac, a.uuid).await {
            Ok(_) => c.add(
                "certificate_bound_identity",
                false,
                Outcome::Warn,
                format!("a node presenting certificate {} was accepted as {} / {}, another certificate's device: it takes that node's place and receives its unicasts", j + 1, a.vmac, a.uuid),
            ),
            Err(NodeConnectError::Rejected(n)) => c.add(
                "certificate_bound_identity",
                false,
                Outcome::Pass,
                format!("another certificate naming this node's VMAC and UUID was refused: NAK class {} code {} {:?}", n.error_class, n.error_code, n.details),
            ),
            Err(e) => c.add("certificate_bound_identity", false, Outcome::Warn, format!("could not try: {e}")),
        },
    }
    drop(holder);
    finish(url, c)
}

fn finish(url: &str, c: Checks) -> ValidationReport {
    let passed = !c.list.iter().any(|x| x.required && x.outcome == Outcome::Fail);
    ValidationReport { url: url.to_string(), checks: c.list, passed }
}
