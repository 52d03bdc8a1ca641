//! An SMP client connection over UDP, a serial port (console framing) or
//! BLE (btleplug on BlueZ): one request out, its answer back, with the
//! header checks a strict client makes. What the answer means is the
//! caller's (`smp_validate`). Over BLE a dropped link (a reset) is
//! reconnected at the next request, once the device advertises again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use btleplug::api::{Characteristic, Peripheral as _, ValueNotification, WriteType};
use btleplug::platform::{Adapter, Peripheral};
use futures::{Stream, StreamExt};
use tokio::net::UdpSocket;

use crate::protocol::smp::{self, SmpFrame, SmpHeader, SmpOp, SmpVersion};

/// Where the SMP server is.
#[derive(Debug, Clone)]
pub enum SmpTarget {
    Udp(SocketAddr),
    /// A serial port with Zephyr's console framing.
    Tty { path: PathBuf, baud: u32 },
    /// A BLE peripheral by address, through a central adapter (`None`: the first).
    Ble { address: String, adapter: Option<String> },
}

impl std::fmt::Display for SmpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SmpTarget::Udp(a) => write!(f, "udp {a}"),
            SmpTarget::Tty { path, baud } => write!(f, "serial {} at {baud} baud", path.display()),
            SmpTarget::Ble { address, .. } => write!(f, "ble {address}"),
        }
    }
}

/// Why an exchange gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeError {
    /// Nothing came in time.
    Timeout(Duration),
    /// The transport failed (socket, port).
    Io(String),
    /// An answer with this request's seq that is not a whole SMP message.
    Malformed(String),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Timeout(d) => write!(f, "no answer within {} ms", d.as_millis()),
            ExchangeError::Io(e) | ExchangeError::Malformed(e) => write!(f, "{e}"),
        }
    }
}

/// One request and what came back for it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub request: SmpHeader,
    pub answer: SmpFrame,
    pub rtt: Duration,
    /// Answers with another seq that came first (late ones), skipped.
    pub skipped: usize,
}

impl Exchange {
    /// The version bits the request was sent with.
    pub fn request_version(&self) -> u8 {
        self.request.version
    }

    /// What is wrong with the answer's header for this request, if anything:
    /// version, op, group, seq, command and length must all match.
    pub fn header_problem(&self) -> Option<String> {
        self.problem(false)
    }

    /// [`Exchange::header_problem`], except a v2 request answered in v1,
    /// which firmware from before SMP v2 does and clients accept.
    pub fn header_problem_besides_v1(&self) -> Option<String> {
        self.problem(true)
    }

    fn problem(&self, v1_answer_ok: bool) -> Option<String> {
        let (q, a) = (&self.request, &self.answer.header);
        let want_op = q.smp_op().and_then(SmpOp::response).map(SmpOp::bits);
        let mut wrong = Vec::new();
        if a.version != q.version && !(v1_answer_ok && (q.version, a.version) == (1, 0)) {
            wrong.push(format!("version {} (asked in {})", a.version, q.version));
        }
        if Some(a.op) != want_op {
            wrong.push(format!("op {} (want {})", a.op, want_op.unwrap_or(0)));
        }
        if a.group != q.group {
            wrong.push(format!("group {} (asked {})", a.group, q.group));
        }
        if a.command != q.command {
            wrong.push(format!("command {} (asked {})", a.command, q.command));
        }
        if usize::from(a.len) != self.answer.payload.len() {
            wrong.push(format!("length {} for {} payload bytes", a.len, self.answer.payload.len()));
        }
        (!wrong.is_empty()).then(|| wrong.join(", "))
    }
}

enum Io {
    Udp { sock: UdpSocket, to: SocketAddr },
    Serial { port: tokio_serial::SerialStream, rx: smp::serial::Receiver, line: Vec<u8>, text: Vec<String> },
    Ble(BleIo),
}

type Notifications = Pin<Box<dyn Stream<Item = ValueNotification> + Send>>;

/// The central and, while connected, the session with the server.
struct BleIo {
    central: Adapter,
    address: String,
    session: Option<BleSession>,
    /// Connections made after the first (the link went in between).
    reconnects: usize,
    opened_once: bool,
}

struct BleSession {
    peripheral: Peripheral,
    smp: Characteristic,
    notifications: Notifications,
    /// Notified bytes not yet a whole message.
    buf: Vec<u8>,
}

/// How long a BLE (re)connection may scan for the device.
const BLE_SCAN: Duration = Duration::from_secs(3);

impl BleIo {
    /// The session, connecting (again) when there is none or its link went.
    async fn session(&mut self, timeout: Duration) -> Result<&mut BleSession, ExchangeError> {
        let alive = match &self.session {
            Some(s) => s.peripheral.is_connected().await.unwrap_or(false),
            None => false,
        };
        if !alive {
            self.session = None;
            self.session = Some(self.open(timeout).await?);
            if self.opened_once {
                self.reconnects += 1;
            }
            self.opened_once = true;
        }
        Ok(self.session.as_mut().expect("just opened"))
    }

    async fn open(&self, timeout: Duration) -> Result<BleSession, ExchangeError> {
        use crate::device::smp_ble::SMP_CHARACTERISTIC_UUID;
        let io = |what: &str, e: String| ExchangeError::Io(format!("{what}: {e}"));
        let address = self.address.clone();
        let peripheral = super::ble_central::find_peripheral(&self.central, |p| p.address.to_string().eq_ignore_ascii_case(&address), &self.address, BLE_SCAN.max(timeout))
            .await
            .map_err(|e| ExchangeError::Io(e.detail))?;
        let within = timeout.max(Duration::from_secs(5));
        super::ble_central::connect_and_discover(&peripheral, within).await.map_err(|(what, e)| io(what, e))?;
        let opened = async {
            let smp = peripheral.characteristics().into_iter().find(|c| c.uuid == SMP_CHARACTERISTIC_UUID).ok_or_else(|| io("GATT", "no SMP characteristic (DA2E7828-…)".into()))?;
            let notifications = peripheral.notifications().await.map_err(|e| io("notifications", e.to_string()))?;
            tokio::time::timeout(within, peripheral.subscribe(&smp)).await.map_err(|_| io("subscribe", "timed out".into()))?.map_err(|e| io("subscribe", e.to_string()))?;
            Ok::<_, ExchangeError>((smp, notifications))
        }
        .await;
        match opened {
            Ok((smp, notifications)) => Ok(BleSession { peripheral, smp, notifications, buf: Vec::new() }),
            Err(e) => {
                let _ = peripheral.disconnect().await;
                Err(e)
            }
        }
    }
}

/// A connection to one SMP server.
pub struct SmpConn {
    io: Io,
    seq: u8,
    pub timeout: Duration,
}

/// Console text lines kept for the report (a serial console also prints logs).
const TEXT_KEPT: usize = 64;

impl SmpConn {
    pub async fn connect(target: &SmpTarget, timeout: Duration) -> Result<SmpConn, String> {
        let io = match target {
            SmpTarget::Udp(to) => {
                let local: SocketAddr = if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
                let sock = UdpSocket::bind(local).await.map_err(|e| format!("cannot open a UDP socket: {e}"))?;
                Io::Udp { sock, to: *to }
            }
            SmpTarget::Tty { path, baud } => {
                let port = crate::transport::serial::open_serial(path, *baud).map_err(|e| e.to_string())?;
                Io::Serial { port, rx: smp::serial::Receiver::new(), line: Vec::new(), text: Vec::new() }
            }
            SmpTarget::Ble { address, adapter } => {
                let central = super::ble_central::central_adapter(adapter.as_deref()).await.map_err(|e| e.detail)?;
                let mut ble = BleIo { central, address: address.clone(), session: None, reconnects: 0, opened_once: false };
                ble.session(timeout).await.map_err(|e| e.to_string())?;
                Io::Ble(ble)
            }
        };
        Ok(SmpConn { io, seq: 0, timeout })
    }

    /// How often the link went and was connected again (BLE; 0 elsewhere).
    pub fn reconnects(&self) -> usize {
        match &self.io {
            Io::Ble(b) => b.reconnects,
            _ => 0,
        }
    }

    /// Console text lines seen on a serial port (not SMP), oldest first.
    pub fn console_text(&self) -> &[String] {
        match &self.io {
            Io::Serial { text, .. } => text,
            Io::Udp { .. } | Io::Ble(_) => &[],
        }
    }

    /// Sends one request and waits for the answer with its seq (answers
    /// with another seq are late ones: skipped and counted).
    pub async fn exchange(&mut self, version: SmpVersion, op: SmpOp, group: u16, command: u8, payload: Vec<u8>) -> Result<Exchange, ExchangeError> {
        self.seq = self.seq.wrapping_add(1);
        let request = SmpHeader::new(version, op, group, command, self.seq, payload.len() as u16);
        let mut msg = request.encode().to_vec();
        msg.extend_from_slice(&payload);
        let started = Instant::now();
        self.send(&msg).await?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timeout = self.timeout;
        let mut skipped = 0;
        loop {
            let got = tokio::time::timeout_at(deadline, self.receive()).await.map_err(|_| ExchangeError::Timeout(timeout))??;
            let answer = match SmpFrame::parse(&got) {
                Ok(a) => a,
                Err(_) => match SmpHeader::parse(&got) {
                    Some(h) if h.seq == request.seq => {
                        let after = got.len() - smp::HEADER_LEN;
                        return Err(ExchangeError::Malformed(format!("an answer with {after} bytes after its header, which says {}", h.len)));
                    }
                    // Not ours, or not SMP at all.
                    _ => continue,
                },
            };
            if answer.header.seq != request.seq {
                skipped += 1;
                continue;
            }
            return Ok(Exchange { request, answer, rtt: started.elapsed(), skipped });
        }
    }

    async fn send(&mut self, msg: &[u8]) -> Result<(), ExchangeError> {
        match &mut self.io {
            Io::Udp { sock, to } => sock.send_to(msg, *to).await.map(|_| ()).map_err(|e| ExchangeError::Io(format!("sending to {to}: {e}"))),
            Io::Serial { port, .. } => {
                let lines = smp::serial::encode(msg, smp::serial::MAX_LINE);
                port.write_all(&lines).await.map_err(|e| ExchangeError::Io(format!("writing the serial port: {e}")))
            }
            Io::Ble(ble) => {
                let s = ble.session(self.timeout).await?;
                // Stale notifications of an abandoned answer must not start this one.
                while let Some(Some(_)) = futures::FutureExt::now_or_never(s.notifications.next()) {}
                s.buf.clear();
                // Writes of at most MTU − 3 bytes, reassembled by the server.
                let room = usize::from(s.peripheral.mtu().max(23)) - 3;
                for piece in msg.chunks(room) {
                    s.peripheral.write(&s.smp, piece, WriteType::WithoutResponse).await.map_err(|e| ExchangeError::Io(format!("write: {e}")))?;
                }
                Ok(())
            }
        }
    }

    /// The next whole SMP message from the server.
    async fn receive(&mut self) -> Result<Vec<u8>, ExchangeError> {
        match &mut self.io {
            Io::Udp { sock, .. } => {
                let mut buf = vec![0u8; 65_536];
                let (n, _) = sock.recv_from(&mut buf).await.map_err(|e| ExchangeError::Io(format!("receiving: {e}")))?;
                buf.truncate(n);
                Ok(buf)
            }
            Io::Serial { port, rx, line, text } => loop {
                while let Some(end) = line.iter().position(|b| *b == b'\n') {
                    let l: Vec<u8> = line.drain(..=end).collect();
                    match rx.push_line(&l) {
                        smp::serial::LineOutcome::Message(m) => return Ok(m),
                        smp::serial::LineOutcome::Text if text.len() < TEXT_KEPT => text.push(String::from_utf8_lossy(&l).trim_end().to_string()),
                        _ => {}
                    }
                }
                let mut buf = [0u8; 512];
                let n = port.read(&mut buf).await.map_err(|e| ExchangeError::Io(format!("reading the serial port: {e}")))?;
                if n == 0 {
                    return Err(ExchangeError::Io("the serial port closed".into()));
                }
                line.extend_from_slice(&buf[..n]);
                // A line that never ends is not SMP; keep memory bounded.
                if line.len() > 4096 {
                    line.clear();
                }
            },
            Io::Ble(ble) => {
                let Some(s) = ble.session.as_mut() else { return Err(ExchangeError::Io("not connected".into())) };
                loop {
                    if let Some(n) = smp::frame_len(&s.buf).filter(|n| *n <= s.buf.len()) {
                        return Ok(s.buf.drain(..n).collect());
                    }
                    match s.notifications.next().await {
                        Some(v) if v.uuid == s.smp.uuid => s.buf.extend_from_slice(&v.value),
                        Some(_) => {}
                        None => {
                            ble.session = None;
                            return Err(ExchangeError::Io("the BLE link went".into()));
                        }
                    }
                }
            }
        }
    }
}

/// One poll's account of the device: what a scenario's `expect_reading`
/// and `expect_flag` read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SmpReading {
    pub values: std::collections::BTreeMap<String, f64>,
    pub flags: Vec<String>,
}

/// A poll that went wrong, classified for `expect_errors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollError {
    /// timeout | io | header | malformed | smp_error
    pub kind: &'static str,
    pub detail: String,
}

/// What a poll reads: params, then the image state. Readings: `rtt_ms`
/// (params), `buf_size`, `buf_count`, `slots`, the running image's
/// `active_major`/`active_minor`/`active_revision` and `active_confirmed`
/// (0/1), `pending` (1 when a slot is pending). Flags: `active:VERSION` and
/// `slotN:active|confirmed|pending|permanent`.
pub async fn poll_once(conn: &mut SmpConn) -> Result<SmpReading, PollError> {
    let mut r = SmpReading::default();
    let params = ask_map(conn, SmpOp::Read, smp::group::OS, 6).await?;
    r.values.insert("rtt_ms".into(), params.1.as_secs_f64() * 1000.0);
    for key in ["buf_size", "buf_count"] {
        if let Some(v) = smp::get(&params.0, key).and_then(smp::as_u64) {
            r.values.insert(key.into(), v as f64);
        }
    }
    let (state, _) = ask_map(conn, SmpOp::Read, smp::group::IMAGE, 0).await?;
    let Some(ciborium::Value::Array(images)) = smp::get(&state, "images") else {
        return Err(PollError { kind: "malformed", detail: "image state without an `images` array".into() });
    };
    r.values.insert("slots".into(), images.len() as f64);
    let mut pending = false;
    for img in images {
        let ciborium::Value::Map(e) = img else { continue };
        let slot = smp::get(e, "slot").and_then(smp::as_u64).unwrap_or(0);
        let flag = |k: &str| matches!(smp::get(e, k), Some(ciborium::Value::Bool(true)));
        for f in ["active", "confirmed", "pending", "permanent"] {
            if flag(f) {
                r.flags.push(format!("slot{slot}:{f}"));
            }
        }
        pending |= flag("pending");
        if flag("active") {
            if let Some(ciborium::Value::Text(v)) = smp::get(e, "version") {
                r.flags.push(format!("active:{v}"));
                for (k, part) in ["active_major", "active_minor", "active_revision"].iter().zip(v.split('.')) {
                    if let Ok(n) = part.parse::<f64>() {
                        r.values.insert((*k).into(), n);
                    }
                }
            }
            r.values.insert("active_confirmed".into(), f64::from(u8::from(flag("confirmed"))));
        }
    }
    r.values.insert("pending".into(), f64::from(u8::from(pending)));
    Ok(r)
}

/// One empty-bodied request whose answer must be a success map, and its round trip.
async fn ask_map(conn: &mut SmpConn, op: SmpOp, group: u16, command: u8) -> Result<(Vec<(ciborium::Value, ciborium::Value)>, Duration), PollError> {
    let ex = conn.exchange(SmpVersion::V2, op, group, command, vec![0xa0]).await.map_err(|e| match e {
        ExchangeError::Timeout(_) => PollError { kind: "timeout", detail: format!("group {group} command {command}: {e}") },
        ExchangeError::Io(_) => PollError { kind: "io", detail: format!("group {group} command {command}: {e}") },
        ExchangeError::Malformed(_) => PollError { kind: "malformed", detail: format!("group {group} command {command}: {e}") },
    })?;
    if let Some(p) = ex.header_problem_besides_v1() {
        return Err(PollError { kind: "header", detail: format!("group {group} command {command}: {p}") });
    }
    let m = smp::decode_map(&ex.answer.payload).map_err(|e| PollError { kind: "malformed", detail: format!("group {group} command {command}: {e}") })?;
    let rc = smp::get(&m, "rc").and_then(smp::as_i64).filter(|rc| *rc != 0);
    if rc.is_some() || smp::get(&m, "err").is_some() {
        return Err(PollError { kind: "smp_error", detail: format!("group {group} command {command}: {m:?}") });
    }
    Ok((m, ex.rtt))
}
