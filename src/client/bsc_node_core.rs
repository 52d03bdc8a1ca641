//! The BACnet/SC node side of a hub connection (ASHRAE 135 Annex AB) as sans-IO state
//! machines: [`NodeSession`] for one WebSocket (Connect-Request/Accept, heartbeat,
//! Disconnect, message IDs, NAKs) and [`FailoverPlan`] for which hub to try next.
//!
//! Bytes and the current monotonic time go in, [`SessionOutput`]s come out. No tokio, no
//! sockets, no clocks: the connection task in `bsc_node.rs` feeds every binary message to
//! [`NodeSession::receive`] and calls [`NodeSession::tick`] at
//! [`NodeSession::poll_timeout`]. The load generator and the validator drive the same
//! session, so what they measure is what the node actor does.
//!
//! # Choices where the reference is silent
//!
//! * **Heartbeat**: the node (the initiating side) sends a Heartbeat-Request when nothing
//!   was received *or* nothing was sent for `heartbeat_interval`. Sent-idle matters because
//!   a node that only listens would otherwise look silent to the hub, which drops peers
//!   after 2 × its heartbeat timeout. Any frame received while a heartbeat is outstanding
//!   proves the hub alive; only total silence for `heartbeat_ack_wait` is a timeout.
//! * **Hub-bound messages carry no originating VMAC** (the standard form; the hub inserts
//!   it on forwarding).
//! * **Message IDs** count up from a caller-chosen start, wrapping at 65535.
//! * **Byte order of MaxBVLC/MaxNPDU** in Connect-Accept is judged by
//!   [`limits_byte_order`]: values only plausible once byte-swapped are reported, never
//!   silently corrected.

use std::time::Duration;

use crate::protocol::bvlc_sc::{
    decode, encode, encode_into, error_code, function, is_node_duplicate_vmac, is_response, nak, nak_for_option,
    peek_header, unknown_must_understand, BvlcMessage, BvlcPayload, BvlcResult, DeviceUuid, Vmac,
    ERROR_CLASS_COMMUNICATION,
};

/// Session timers and identity.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub vmac: Vmac,
    pub uuid: DeviceUuid,
    pub max_bvlc: u16,
    pub max_npdu: u16,
    /// Time the hub has to answer the Connect-Request.
    pub connect_wait: Duration,
    /// Idle time (no frame sent or no frame received) before a Heartbeat-Request.
    pub heartbeat_interval: Duration,
    /// Silence after a Heartbeat-Request before the hub counts as gone.
    pub heartbeat_ack_wait: Duration,
    /// Time the hub has to answer a Disconnect-Request.
    pub disconnect_wait: Duration,
}

impl NodeConfig {
    /// Defaults at the short end of the timers seen in the field (connect-wait 10 s,
    /// heartbeat 60 s), MaxBVLC 1600 / MaxNPDU 1497 like the hub.
    pub fn new(vmac: Vmac, uuid: DeviceUuid) -> Self {
        NodeConfig {
            vmac,
            uuid,
            max_bvlc: 1600,
            max_npdu: 1497,
            connect_wait: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(60),
            heartbeat_ack_wait: Duration::from_secs(10),
            disconnect_wait: Duration::from_secs(5),
        }
    }
}

/// A random locally administered unicast VMAC (`x2:…`) and a random v4 Device UUID from
/// the given bytes (the caller owns the randomness so runs can be replayed).
pub fn identity_from_seed(seed: [u8; 22]) -> (Vmac, DeviceUuid) {
    let mut v = [0u8; 6];
    v.copy_from_slice(&seed[..6]);
    v[0] = (v[0] & 0xFC) | 0x02;
    let mut u = [0u8; 16];
    u.copy_from_slice(&seed[6..22]);
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    let vmac = Vmac(v);
    // The all-ones and all-zero VMACs cannot come out of the masking above; keep it so.
    debug_assert!(!vmac.is_broadcast() && !vmac.is_reserved());
    (vmac, DeviceUuid(u))
}

/// How MaxBVLC/MaxNPDU in a Connect-Accept look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitsByteOrder {
    /// Plausible as sent (big-endian, the standard).
    BigEndian,
    /// Only plausible once byte-swapped: the hub wrote host (little-endian) order.
    LittleEndian,
    /// Neither reading is plausible.
    Implausible,
}

/// Smallest and largest plausible MaxBVLC/MaxNPDU. The standard's floor for MaxNPDU is the
/// 1497-octet NPDU a hub must carry; values from 480 up are accepted so small stacks pass.
const PLAUSIBLE_LIMIT: std::ops::RangeInclusive<u16> = 480..=16384;

/// Judges the byte order of a Connect-Accept's limits: 1500 sent little-endian reads as
/// 56325, far outside anything advertised, while its swap is exactly plausible.
pub fn limits_byte_order(max_bvlc: u16, max_npdu: u16) -> LimitsByteOrder {
    let ok = |v: u16| PLAUSIBLE_LIMIT.contains(&v);
    if ok(max_bvlc) && ok(max_npdu) {
        LimitsByteOrder::BigEndian
    } else if ok(max_bvlc.swap_bytes()) && ok(max_npdu.swap_bytes()) {
        LimitsByteOrder::LittleEndian
    } else {
        LimitsByteOrder::Implausible
    }
}

/// What the hub said about itself in its Connect-Accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubLimits {
    pub vmac: Vmac,
    pub uuid: DeviceUuid,
    /// As read (big-endian).
    pub max_bvlc: u16,
    pub max_npdu: u16,
    pub byte_order: LimitsByteOrder,
}

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Not started: [`NodeSession::start`] sends the Connect-Request.
    Idle,
    AwaitingAccept { since: Duration },
    Connected,
    Disconnecting { since: Duration },
    /// Over; the WebSocket should be closed.
    Closed,
}

/// A BVLC-Result NAK as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedNak {
    pub message_id: u16,
    pub for_function: u8,
    pub header_marker: u8,
    pub error_class: u16,
    pub error_code: u16,
    pub details: String,
}

impl ReceivedNak {
    /// node-duplicate-vmac in any form seen on the wire (151, 113, byte-swapped).
    pub fn is_duplicate_vmac(&self) -> bool {
        is_node_duplicate_vmac(self.error_code)
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// No Connect-Accept within `connect_wait`.
    ConnectTimeout,
    /// The hub NAKed the Connect-Request.
    ConnectRejected(ReceivedNak),
    /// Silence for `heartbeat_ack_wait` after a Heartbeat-Request.
    HeartbeatTimeout,
    /// The hub sent a Disconnect-Request (ACKed).
    HubDisconnected,
    /// Our Disconnect-Request was ACKed, or its wait ran out.
    LocalDisconnect { acked: bool },
}

impl EndReason {
    pub fn describe(&self) -> String {
        match self {
            EndReason::ConnectTimeout => "no Connect-Accept in time".into(),
            EndReason::ConnectRejected(n) => {
                format!("Connect-Request NAKed: class {} code {} {:?}", n.error_class, n.error_code, n.details)
            }
            EndReason::HeartbeatTimeout => "no answer to Heartbeat-Request".into(),
            EndReason::HubDisconnected => "hub sent Disconnect-Request".into(),
            EndReason::LocalDisconnect { acked: true } => "disconnected (ACKed)".into(),
            EndReason::LocalDisconnect { acked: false } => "disconnected (no Disconnect-ACK)".into(),
        }
    }
}

/// Something the owner may want to observe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Accepted(HubLimits),
    Nak(ReceivedNak),
    /// An Encapsulated-NPDU. `from` is the originating VMAC the hub inserted (None when it
    /// did not); `broadcast` when the destination VMAC was kept as FF×6.
    Npdu {
        from: Option<Vmac>,
        broadcast: bool,
        npdu: Vec<u8>,
    },
    /// `echoed_id` is false when the ACK's message ID is not the request's.
    HeartbeatAck { echoed_id: bool, rtt: Duration },
    /// A frame that could not be decoded (NAKed where the rules allow).
    Malformed { function: Option<u8>, error: String },
    /// A well-formed message this node has no use for (dropped, NAKed if a request).
    Unexpected { function: u8 },
    /// The session is over; close the WebSocket.
    Ended(EndReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOutput {
    Send(Vec<u8>),
    Event(SessionEvent),
}

/// Refusals of [`NodeSession::encode_npdu`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("not connected to a hub")]
    NotConnected,
    #[error("NPDU of {len} bytes exceeds the hub's MaxNPDU {max}")]
    TooLong { len: usize, max: u16 },
    #[error("destination VMAC {0} is reserved")]
    ReservedDestination(Vmac),
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// One node's session with one hub.
#[derive(Debug)]
pub struct NodeSession {
    cfg: NodeConfig,
    state: SessionState,
    next_id: u16,
    connect_id: u16,
    last_rx: Duration,
    last_tx: Duration,
    /// Outstanding Heartbeat-Request: (message ID, sent at).
    heartbeat: Option<(u16, Duration)>,
    /// The last Heartbeat-Request sent, to check the ACK's echoed ID.
    last_heartbeat: Option<(u16, Duration)>,
    hub: Option<HubLimits>,
}

impl NodeSession {
    /// `first_message_id` lets the owner vary IDs across sessions.
    pub fn new(cfg: NodeConfig, first_message_id: u16) -> Self {
        NodeSession {
            cfg,
            state: SessionState::Idle,
            next_id: first_message_id,
            connect_id: 0,
            last_rx: Duration::ZERO,
            last_tx: Duration::ZERO,
            heartbeat: None,
            last_heartbeat: None,
            hub: None,
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    pub fn state(&self) -> SessionState {
        self.state
    }

    pub fn is_connected(&self) -> bool {
        self.state == SessionState::Connected
    }

    /// The hub's Connect-Accept, once connected.
    pub fn hub(&self) -> Option<&HubLimits> {
        self.hub.as_ref()
    }

    /// The next message ID (wrapping).
    pub fn allocate_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// The Connect-Request that opens the session.
    pub fn start(&mut self, now: Duration) -> Vec<u8> {
        let id = self.allocate_id();
        self.connect_id = id;
        self.state = SessionState::AwaitingAccept { since: now };
        self.last_tx = now;
        self.last_rx = now;
        self.encode_own(BvlcMessage::new(
            id,
            BvlcPayload::ConnectRequest {
                vmac: self.cfg.vmac,
                uuid: self.cfg.uuid,
                max_bvlc: self.cfg.max_bvlc,
                max_npdu: self.cfg.max_npdu,
            },
        ))
    }

    /// The Disconnect-Request that ends a connected session gracefully. `None` when not
    /// connected (then there is nothing to say to the hub).
    pub fn disconnect(&mut self, now: Duration) -> Option<Vec<u8>> {
        if self.state != SessionState::Connected {
            self.state = SessionState::Closed;
            return None;
        }
        let id = self.allocate_id();
        self.state = SessionState::Disconnecting { since: now };
        self.last_tx = now;
        Some(self.encode_own(BvlcMessage::new(id, BvlcPayload::DisconnectRequest)))
    }

    /// Appends an Encapsulated-NPDU for `dest` (a VMAC or [`Vmac::BROADCAST`]) to `out` and
    /// returns its message ID. On error `out` is unchanged.
    pub fn encode_npdu(&mut self, dest: Vmac, npdu: &[u8], now: Duration, out: &mut Vec<u8>) -> Result<u16, SendError> {
        if self.state != SessionState::Connected {
            return Err(SendError::NotConnected);
        }
        if dest.is_reserved() {
            return Err(SendError::ReservedDestination(dest));
        }
        let max = self.hub.as_ref().map_or(self.cfg.max_npdu, |h| effective_limit(h.max_npdu, h.byte_order));
        if npdu.len() > usize::from(max) {
            return Err(SendError::TooLong { len: npdu.len(), max });
        }
        let id = self.allocate_id();
        let mut msg = BvlcMessage::new(id, BvlcPayload::EncapsulatedNpdu(npdu.to_vec()));
        msg.destination = Some(dest);
        encode_into(&msg, out).map_err(|e| SendError::Encode(e.to_string()))?;
        self.last_tx = now;
        Ok(id)
    }

    /// Tells the session that the owner sent a frame it built itself (the validator's
    /// probes), so idle timing stays right.
    pub fn note_sent(&mut self, now: Duration) {
        self.last_tx = now;
    }

    /// One binary WebSocket message from the hub.
    pub fn receive(&mut self, frame: &[u8], now: Duration) -> Vec<SessionOutput> {
        let mut out = Vec::new();
        self.last_rx = now;
        // Any traffic proves the hub alive.
        self.heartbeat = None;
        let Some((func, _, id)) = peek_header(frame) else {
            // Shorter than the fixed header: dropped silently (the general rule).
            out.push(SessionOutput::Event(SessionEvent::Malformed {
                function: frame.first().copied(),
                error: format!("{} bytes, shorter than the 4-byte header", frame.len()),
            }));
            return out;
        };
        let msg = match decode(frame) {
            Ok(m) => m,
            Err(e) => {
                out.push(SessionOutput::Event(SessionEvent::Malformed {
                    function: Some(func),
                    error: e.to_string(),
                }));
                if !is_response(func) && self.state == SessionState::Connected {
                    let req = BvlcMessage::new(id, BvlcPayload::Unknown { function: func, data: Vec::new() });
                    let mut n = nak(&req, ERROR_CLASS_COMMUNICATION, e.nak_code(), &e.to_string());
                    if let BvlcPayload::Result { for_function, .. } = &mut n.payload {
                        *for_function = func;
                    }
                    self.send(&mut out, n, now);
                }
                return out;
            }
        };
        self.handle(msg, now, &mut out);
        out
    }

    fn handle(&mut self, msg: BvlcMessage, now: Duration, out: &mut Vec<SessionOutput>) {
        let id = msg.message_id;
        // A consumed request with an unknown must-understand option is NAKed, never acted on.
        if !is_response(msg.function()) {
            if let Some(opt) = unknown_must_understand(&msg) {
                let n = nak_for_option(&msg, opt, "header option not understood");
                self.send(out, n, now);
                return;
            }
        }
        match (&msg.payload, self.state) {
            (BvlcPayload::ConnectAccept { vmac, uuid, max_bvlc, max_npdu }, SessionState::AwaitingAccept { .. }) => {
                let limits = HubLimits {
                    vmac: *vmac,
                    uuid: *uuid,
                    max_bvlc: *max_bvlc,
                    max_npdu: *max_npdu,
                    byte_order: limits_byte_order(*max_bvlc, *max_npdu),
                };
                self.hub = Some(limits.clone());
                self.state = SessionState::Connected;
                out.push(SessionOutput::Event(SessionEvent::Accepted(limits)));
            }
            (BvlcPayload::Result { for_function, result }, state) => match result {
                BvlcResult::Ack => {}
                BvlcResult::Nak { header_marker, error_class, error_code, details } => {
                    let n = ReceivedNak {
                        message_id: id,
                        for_function: *for_function,
                        header_marker: *header_marker,
                        error_class: *error_class,
                        error_code: *error_code,
                        details: details.clone(),
                    };
                    out.push(SessionOutput::Event(SessionEvent::Nak(n.clone())));
                    if matches!(state, SessionState::AwaitingAccept { .. })
                        && *for_function == function::CONNECT_REQUEST
                    {
                        self.end(out, EndReason::ConnectRejected(n));
                    }
                }
            },
            (BvlcPayload::EncapsulatedNpdu(npdu), SessionState::Connected) => {
                out.push(SessionOutput::Event(SessionEvent::Npdu {
                    from: msg.originating,
                    broadcast: msg.destination.is_some_and(|d| d.is_broadcast()),
                    npdu: npdu.clone(),
                }));
            }
            (BvlcPayload::HeartbeatRequest, SessionState::Connected | SessionState::Disconnecting { .. }) => {
                self.send(out, BvlcMessage::new(id, BvlcPayload::HeartbeatAck), now);
            }
            (BvlcPayload::HeartbeatAck, _) => {
                // `self.heartbeat` was cleared on receipt; judge the echo against the last one sent.
                out.push(SessionOutput::Event(SessionEvent::HeartbeatAck {
                    echoed_id: self.last_heartbeat.is_some_and(|(h, _)| h == id),
                    rtt: self.last_heartbeat.map_or(Duration::ZERO, |(_, t)| now.saturating_sub(t)),
                }));
            }
            (BvlcPayload::DisconnectRequest, SessionState::Connected | SessionState::Disconnecting { .. }) => {
                self.send(out, BvlcMessage::new(id, BvlcPayload::DisconnectAck), now);
                self.end(out, EndReason::HubDisconnected);
            }
            (BvlcPayload::DisconnectAck, SessionState::Disconnecting { .. }) => {
                self.end(out, EndReason::LocalDisconnect { acked: true });
            }
            (BvlcPayload::AddressResolution, SessionState::Connected) if msg.originating.is_some() => {
                // Another node asks for our direct-connect URIs: we accept none.
                let mut ack = BvlcMessage::new(id, BvlcPayload::AddressResolutionAck(Vec::new()));
                ack.destination = msg.originating;
                self.send(out, ack, now);
            }
            (BvlcPayload::Unknown { function: f, .. }, _) => {
                let n = nak(&msg, ERROR_CLASS_COMMUNICATION, error_code::BVLC_FUNCTION_UNKNOWN, "unknown BVLC function");
                out.push(SessionOutput::Event(SessionEvent::Unexpected { function: *f }));
                self.send(out, n, now);
            }
            (BvlcPayload::Proprietary { .. }, _) => {
                let n = nak(
                    &msg,
                    ERROR_CLASS_COMMUNICATION,
                    error_code::BVLC_PROPRIETARY_FUNCTION_UNKNOWN,
                    "no proprietary functions",
                );
                out.push(SessionOutput::Event(SessionEvent::Unexpected { function: msg.function() }));
                self.send(out, n, now);
            }
            _ => out.push(SessionOutput::Event(SessionEvent::Unexpected { function: msg.function() })),
        }
    }

    /// Timers: connect-wait, heartbeat, disconnect-wait.
    pub fn tick(&mut self, now: Duration) -> Vec<SessionOutput> {
        let mut out = Vec::new();
        match self.state {
            SessionState::AwaitingAccept { since } if now.saturating_sub(since) >= self.cfg.connect_wait => {
                self.end(&mut out, EndReason::ConnectTimeout);
            }
            SessionState::Disconnecting { since } if now.saturating_sub(since) >= self.cfg.disconnect_wait => {
                self.end(&mut out, EndReason::LocalDisconnect { acked: false });
            }
            SessionState::Connected => match self.heartbeat {
                Some((_, sent)) if now.saturating_sub(sent) >= self.cfg.heartbeat_ack_wait => {
                    self.end(&mut out, EndReason::HeartbeatTimeout);
                }
                None if self.idle_since() + self.cfg.heartbeat_interval <= now => {
                    let id = self.allocate_id();
                    self.heartbeat = Some((id, now));
                    self.last_heartbeat = Some((id, now));
                    self.send(&mut out, BvlcMessage::new(id, BvlcPayload::HeartbeatRequest), now);
                }
                _ => {}
            },
            _ => {}
        }
        out
    }

    /// When [`NodeSession::tick`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.state {
            SessionState::AwaitingAccept { since } => Some(since + self.cfg.connect_wait),
            SessionState::Disconnecting { since } => Some(since + self.cfg.disconnect_wait),
            SessionState::Connected => Some(match self.heartbeat {
                Some((_, sent)) => sent + self.cfg.heartbeat_ack_wait,
                None => self.idle_since() + self.cfg.heartbeat_interval,
            }),
            SessionState::Idle | SessionState::Closed => None,
        }
    }

    /// The older of last-received and last-sent: idle in either direction counts.
    fn idle_since(&self) -> Duration {
        self.last_rx.min(self.last_tx)
    }

    fn end(&mut self, out: &mut Vec<SessionOutput>, reason: EndReason) {
        self.state = SessionState::Closed;
        self.heartbeat = None;
        out.push(SessionOutput::Event(SessionEvent::Ended(reason)));
    }

    fn send(&mut self, out: &mut Vec<SessionOutput>, msg: BvlcMessage, now: Duration) {
        self.last_tx = now;
        out.push(SessionOutput::Send(self.encode_own(msg)));
    }

    fn encode_own(&self, msg: BvlcMessage) -> Vec<u8> {
        // Every message this session builds is well-formed by construction (no options,
        // payloads within limits); an encode failure is a bug, reported loudly in debug.
        match encode(&msg) {
            Ok(b) => b,
            Err(e) => {
                debug_assert!(false, "node built an unencodable message: {e}");
                Vec::new()
            }
        }
    }
}

/// MaxNPDU as the hub meant it: a little-endian advertisement is read swapped so a node
/// keeps working against it (the validator reports the quirk).
fn effective_limit(v: u16, order: LimitsByteOrder) -> u16 {
    match order {
        LimitsByteOrder::LittleEndian => v.swap_bytes(),
        _ => v,
    }
}

/// Exponential backoff between `min` and `max`, doubling per failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff { min, max: max.max(min), current: min }
    }

    /// The wait before the next attempt; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// Which hub a node is on or should try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HubChoice {
    Primary,
    Failover,
}

impl HubChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            HubChoice::Primary => "primary",
            HubChoice::Failover => "failover",
        }
    }
}

/// The failover rule (AB.5.3): connect to the primary; when it cannot be reached, use the
/// failover hub, and while on the failover keep retrying the primary with backoff, going
/// back to it as soon as it accepts.
#[derive(Debug, Clone)]
pub struct FailoverPlan {
    has_failover: bool,
    primary_backoff: Backoff,
    failover_backoff: Backoff,
    next_primary: Duration,
    next_failover: Duration,
}

/// What the owner should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanStep {
    /// Attempt this hub now.
    Try(HubChoice),
    /// Nothing to attempt before this time.
    WaitUntil(Duration),
}

impl FailoverPlan {
    pub fn new(has_failover: bool, backoff_min: Duration, backoff_max: Duration) -> Self {
        FailoverPlan {
            has_failover,
            primary_backoff: Backoff::new(backoff_min, backoff_max),
            failover_backoff: Backoff::new(backoff_min, backoff_max),
            next_primary: Duration::ZERO,
            next_failover: Duration::ZERO,
        }
    }

    /// While not connected: the primary first whenever it is due, else the failover.
    pub fn next_step(&self, now: Duration) -> PlanStep {
        if now >= self.next_primary {
            PlanStep::Try(HubChoice::Primary)
        } else if self.has_failover && now >= self.next_failover {
            PlanStep::Try(HubChoice::Failover)
        } else if self.has_failover {
            PlanStep::WaitUntil(self.next_primary.min(self.next_failover))
        } else {
            PlanStep::WaitUntil(self.next_primary)
        }
    }

    /// While on the failover: when to probe the primary again.
    pub fn primary_due(&self) -> Duration {
        self.next_primary
    }

    pub fn attempt_failed(&mut self, hub: HubChoice, now: Duration) {
        match hub {
            HubChoice::Primary => self.next_primary = now + self.primary_backoff.next_delay(),
            HubChoice::Failover => self.next_failover = now + self.failover_backoff.next_delay(),
        }
    }

    pub fn connected(&mut self, hub: HubChoice) {
        match hub {
            HubChoice::Primary => self.primary_backoff.reset(),
            HubChoice::Failover => self.failover_backoff.reset(),
        }
    }

    /// A connection that was up ended. Losing the primary makes the failover due at once
    /// and the primary due after a backoff; losing the failover retries the primary first.
    pub fn lost(&mut self, hub: HubChoice, now: Duration) {
        match hub {
            HubChoice::Primary => {
                self.next_failover = now;
                self.next_primary = now + self.primary_backoff.next_delay();
            }
            HubChoice::Failover => {
                self.next_primary = self.next_primary.min(now);
                self.next_failover = now + self.failover_backoff.next_delay();
            }
        }
    }
}


/// One peer, the hub. `Connected` is the WebSocket opening: the session sends
/// its Connect-Request. The node actor keeps its own select loop (failover
/// probes, commands); this is the shape tests, the fuzzer and replays use.
impl crate::sans_io::SansIoCore for NodeSession {
    type Event = SessionEvent;

    fn handle_input(&mut self, input: crate::sans_io::Input<'_>, now: Duration, out: &mut Vec<crate::sans_io::Output<SessionEvent>>) -> Result<(), String> {
        use crate::sans_io::{Input, Output, Peer};
        let session = |v: Vec<SessionOutput>, to: Peer, out: &mut Vec<Output<SessionEvent>>| {
            out.extend(v.into_iter().map(|o| match o {
                SessionOutput::Send(bytes) => Output::Send { to, bytes },
                SessionOutput::Event(e) => Output::Event(e),
            }))
        };
        match input {
            Input::Connected(p) => out.push(Output::Send { to: p, bytes: self.start(now) }),
            Input::Disconnected(_) => {}
            Input::Bytes { from, bytes } => session(self.receive(bytes, now), from, out),
            Input::Timeout => session(self.tick(now), Peer::ONLY, out),
            Input::Set { key, .. } => return Err(format!("a node session has no state key `{key}`")),
        }
        Ok(())
    }

    fn next_wakeup(&self) -> Option<Duration> {
        self.poll_timeout()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::bvlc_sc::{HeaderOption, HeaderOptionKind};

    const ME: Vmac = Vmac([0x02, 0, 0, 0, 0, 0x01]);
    const OTHER: Vmac = Vmac([0x02, 0, 0, 0, 0, 0x02]);
    const HUB: Vmac = Vmac([0x02, 0x68, 0x75, 0x62, 0, 1]);
    const UUID: DeviceUuid = DeviceUuid([7; 16]);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg() -> NodeConfig {
        let mut c = NodeConfig::new(ME, UUID);
        c.connect_wait = ms(1000);
        c.heartbeat_interval = ms(5000);
        c.heartbeat_ack_wait = ms(1000);
        c.disconnect_wait = ms(500);
        c
    }

    fn accept(id: u16, max_bvlc: u16, max_npdu: u16) -> Vec<u8> {
        encode(&BvlcMessage::new(
            id,
            BvlcPayload::ConnectAccept { vmac: HUB, uuid: DeviceUuid([9; 16]), max_bvlc, max_npdu },
        ))
        .unwrap()
    }

    fn sends(out: &[SessionOutput]) -> Vec<BvlcMessage> {
        out.iter()
            .filter_map(|o| match o {
                SessionOutput::Send(b) => Some(decode(b).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn events(out: &[SessionOutput]) -> Vec<SessionEvent> {
        out.iter()
            .filter_map(|o| match o {
                SessionOutput::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    fn connected() -> NodeSession {
        let mut s = NodeSession::new(cfg(), 100);
        let req = s.start(ms(0));
        let m = decode(&req).unwrap();
        assert_eq!(m.message_id, 100);
        assert_eq!(m.originating, None, "hub-bound messages carry no originating VMAC");
        assert_eq!(
            m.payload,
            BvlcPayload::ConnectRequest { vmac: ME, uuid: UUID, max_bvlc: 1600, max_npdu: 1497 }
        );
        let out = s.receive(&accept(100, 1600, 1497), ms(10));
        assert!(matches!(&events(&out)[..], [SessionEvent::Accepted(h)] if h.byte_order == LimitsByteOrder::BigEndian));
        assert!(s.is_connected());
        s
    }

    #[test]
    fn connect_accept_connects_and_reports_limits() {
        let s = connected();
        assert_eq!(s.hub().unwrap().max_bvlc, 1600);
        assert_eq!(s.hub().unwrap().vmac, HUB);
    }

    #[test]
    fn little_endian_limits_are_flagged_and_read_swapped() {
        // 1500 written little-endian reads as 56325.
        assert_eq!(limits_byte_order(56325, 1497u16.swap_bytes()), LimitsByteOrder::LittleEndian);
        assert_eq!(limits_byte_order(1500, 1497), LimitsByteOrder::BigEndian);
        assert_eq!(limits_byte_order(0, 0), LimitsByteOrder::Implausible);
        let mut s = NodeSession::new(cfg(), 1);
        s.start(ms(0));
        let out = s.receive(&accept(1, 1500u16.swap_bytes(), 1497u16.swap_bytes()), ms(1));
        assert!(matches!(&events(&out)[..], [SessionEvent::Accepted(h)] if h.byte_order == LimitsByteOrder::LittleEndian && h.max_bvlc == 56325));
        // The node still honours the limit the hub meant.
        let mut buf = Vec::new();
        assert!(s.encode_npdu(OTHER, &[0u8; 1497], ms(2), &mut buf).is_ok());
        assert_eq!(
            s.encode_npdu(OTHER, &[0u8; 1498], ms(2), &mut buf),
            Err(SendError::TooLong { len: 1498, max: 1497 })
        );
    }

    #[test]
    fn connect_timeout_ends_the_session() {
        let mut s = NodeSession::new(cfg(), 1);
        s.start(ms(0));
        assert_eq!(s.poll_timeout(), Some(ms(1000)));
        assert!(s.tick(ms(999)).is_empty());
        assert_eq!(events(&s.tick(ms(1000))), vec![SessionEvent::Ended(EndReason::ConnectTimeout)]);
        assert_eq!(s.state(), SessionState::Closed);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn duplicate_vmac_nak_rejects_the_connect() {
        for code in [151u16, 113] {
            let mut s = NodeSession::new(cfg(), 5);
            let req = decode(&s.start(ms(0))).unwrap();
            let n = nak(&req, ERROR_CLASS_COMMUNICATION, code, "VMAC in use");
            let out = s.receive(&encode(&n).unwrap(), ms(3));
            let ev = events(&out);
            match &ev[..] {
                [SessionEvent::Nak(nk), SessionEvent::Ended(EndReason::ConnectRejected(_))] => {
                    assert!(nk.is_duplicate_vmac());
                    assert_eq!(nk.for_function, function::CONNECT_REQUEST);
                    assert_eq!(nk.message_id, 5);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(s.state(), SessionState::Closed);
        }
    }

    #[test]
    fn npdu_unicast_and_broadcast_encode_with_destination_and_fresh_ids() {
        let mut s = connected();
        let mut buf = Vec::new();
        let id1 = s.encode_npdu(OTHER, b"abc", ms(20), &mut buf).unwrap();
        let m1 = decode(&buf).unwrap();
        assert_eq!(m1.destination, Some(OTHER));
        assert_eq!(m1.originating, None);
        assert_eq!(m1.payload, BvlcPayload::EncapsulatedNpdu(b"abc".to_vec()));
        buf.clear();
        let id2 = s.encode_npdu(Vmac::BROADCAST, b"x", ms(21), &mut buf).unwrap();
        assert_eq!(decode(&buf).unwrap().destination, Some(Vmac::BROADCAST));
        assert_eq!(id2, id1.wrapping_add(1));
        assert_eq!(s.encode_npdu(Vmac::RESERVED, b"x", ms(21), &mut buf), Err(SendError::ReservedDestination(Vmac::RESERVED)));
        let mut idle = NodeSession::new(cfg(), 0);
        assert_eq!(idle.encode_npdu(OTHER, b"x", ms(0), &mut buf), Err(SendError::NotConnected));
    }

    #[test]
    fn message_ids_wrap() {
        let mut s = NodeSession::new(cfg(), u16::MAX);
        assert_eq!(s.allocate_id(), u16::MAX);
        assert_eq!(s.allocate_id(), 0);
    }

    #[test]
    fn received_npdu_reports_originating_vmac() {
        let mut s = connected();
        let mut m = BvlcMessage::new(9, BvlcPayload::EncapsulatedNpdu(vec![1, 2, 3]));
        m.originating = Some(OTHER);
        m.destination = Some(Vmac::BROADCAST);
        let out = s.receive(&encode(&m).unwrap(), ms(30));
        assert_eq!(
            events(&out),
            vec![SessionEvent::Npdu { from: Some(OTHER), broadcast: true, npdu: vec![1, 2, 3] }]
        );
        assert!(sends(&out).is_empty(), "an NPDU is never answered");
    }

    #[test]
    fn heartbeat_when_idle_and_timeout_when_silent() {
        let mut s = connected();
        assert_eq!(s.poll_timeout(), Some(ms(5000)), "idle since the Connect-Request was sent at 0");
        assert!(s.tick(ms(4999)).is_empty());
        let out = s.tick(ms(5000));
        let hb = sends(&out);
        assert_eq!(hb.len(), 1);
        assert_eq!(hb[0].payload, BvlcPayload::HeartbeatRequest);
        assert_eq!(s.poll_timeout(), Some(ms(6000)));
        assert_eq!(events(&s.tick(ms(6000))), vec![SessionEvent::Ended(EndReason::HeartbeatTimeout)]);
    }

    #[test]
    fn heartbeat_ack_checks_the_echoed_id() {
        let mut s = connected();
        let hb = sends(&s.tick(ms(5000))).remove(0);
        let ack = encode(&BvlcMessage::new(hb.message_id, BvlcPayload::HeartbeatAck)).unwrap();
        assert_eq!(
            events(&s.receive(&ack, ms(5003))),
            vec![SessionEvent::HeartbeatAck { echoed_id: true, rtt: ms(3) }]
        );
        // No timeout after the ACK; the next heartbeat is an interval after the last send.
        assert!(s.tick(ms(6500)).is_empty());
        assert_eq!(s.poll_timeout(), Some(ms(10000)));
        let hb2 = sends(&s.tick(ms(10000))).remove(0);
        let wrong = encode(&BvlcMessage::new(hb2.message_id.wrapping_add(7), BvlcPayload::HeartbeatAck)).unwrap();
        assert!(matches!(events(&s.receive(&wrong, ms(10001)))[..], [SessionEvent::HeartbeatAck { echoed_id: false, .. }]));
    }

    #[test]
    fn a_node_that_only_sends_still_heartbeats_to_detect_a_dead_hub() {
        let mut s = connected();
        let mut buf = Vec::new();
        for t in (1000..=5000).step_by(1000) {
            buf.clear();
            s.encode_npdu(OTHER, b"x", ms(t), &mut buf).unwrap();
        }
        // Nothing received since 10 ms: heartbeat due at 5010.
        assert_eq!(s.poll_timeout(), Some(ms(5010)));
        assert_eq!(sends(&s.tick(ms(5010)))[0].payload, BvlcPayload::HeartbeatRequest);
    }

    #[test]
    fn hub_heartbeat_request_is_acked_with_its_id() {
        let mut s = connected();
        let out = s.receive(&encode(&BvlcMessage::new(777, BvlcPayload::HeartbeatRequest)).unwrap(), ms(40));
        let m = sends(&out);
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].message_id, &m[0].payload), (777, &BvlcPayload::HeartbeatAck));
    }

    #[test]
    fn disconnect_both_ways() {
        let mut s = connected();
        let req = decode(&s.disconnect(ms(50)).unwrap()).unwrap();
        assert_eq!(req.payload, BvlcPayload::DisconnectRequest);
        let ack = encode(&BvlcMessage::new(req.message_id, BvlcPayload::DisconnectAck)).unwrap();
        assert_eq!(
            events(&s.receive(&ack, ms(51))),
            vec![SessionEvent::Ended(EndReason::LocalDisconnect { acked: true })]
        );

        let mut s = connected();
        s.disconnect(ms(50));
        assert_eq!(
            events(&s.tick(ms(550))),
            vec![SessionEvent::Ended(EndReason::LocalDisconnect { acked: false })]
        );

        let mut s = connected();
        let out = s.receive(&encode(&BvlcMessage::new(3, BvlcPayload::DisconnectRequest)).unwrap(), ms(60));
        assert_eq!(sends(&out)[0].payload, BvlcPayload::DisconnectAck);
        assert_eq!(sends(&out)[0].message_id, 3);
        assert_eq!(events(&out), vec![SessionEvent::Ended(EndReason::HubDisconnected)]);
    }

    #[test]
    fn unknown_must_understand_option_is_naked_and_not_delivered() {
        let mut s = connected();
        let mut m = BvlcMessage::new(44, BvlcPayload::EncapsulatedNpdu(vec![1]));
        m.originating = Some(OTHER);
        m.data_options = vec![HeaderOption {
            must_understand: true,
            kind: HeaderOptionKind::Unknown { option_type: 5, data: None },
        }];
        let out = s.receive(&encode(&m).unwrap(), ms(70));
        assert!(events(&out).is_empty());
        let n = sends(&out).remove(0);
        assert_eq!(n.message_id, 44);
        assert_eq!(n.destination, Some(OTHER));
        assert!(matches!(n.payload, BvlcPayload::Result { result: BvlcResult::Nak { error_code: 146, .. }, .. }));
    }

    #[test]
    fn garbage_never_panics_and_is_reported() {
        let mut s = connected();
        for f in [&[][..], &[1], &[1, 0, 0], &[0x06, 0x00, 0, 1, 2], &[0x01, 0xF0, 0, 0], &[0xFF; 40]] {
            let out = s.receive(f, ms(80));
            assert!(!events(&out).is_empty(), "{f:?}");
        }
        // A truncated request gets a NAK; a truncated response does not.
        let out = s.receive(&[function::CONNECT_REQUEST, 0, 0, 9, 1], ms(81));
        assert_eq!(sends(&out).len(), 1);
        let out = s.receive(&[function::HEARTBEAT_ACK, 0, 0, 9, 1], ms(81));
        assert!(sends(&out).is_empty());
    }

    #[test]
    fn identity_is_local_unicast_and_v4() {
        let (v, u) = identity_from_seed([0xFF; 22]);
        assert!(v.is_local_unicast());
        assert!(!v.is_broadcast());
        assert_eq!(u.0[6] >> 4, 4);
        let (v, _) = identity_from_seed([0; 22]);
        assert!(!v.is_reserved());
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(ms(100), ms(350));
        assert_eq!([b.next_delay(), b.next_delay(), b.next_delay(), b.next_delay()], [ms(100), ms(200), ms(350), ms(350)]);
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
    }

    #[test]
    fn failover_plan_moves_to_failover_and_keeps_retrying_primary() {
        let mut p = FailoverPlan::new(true, ms(100), ms(1000));
        assert_eq!(p.next_step(ms(0)), PlanStep::Try(HubChoice::Primary));
        p.attempt_failed(HubChoice::Primary, ms(0));
        assert_eq!(p.next_step(ms(0)), PlanStep::Try(HubChoice::Failover));
        p.connected(HubChoice::Failover);
        assert_eq!(p.primary_due(), ms(100));
        p.attempt_failed(HubChoice::Primary, ms(100));
        assert_eq!(p.primary_due(), ms(300), "backoff doubles");
        p.connected(HubChoice::Primary);
        // Losing the primary: failover at once, primary after the (reset) backoff.
        p.lost(HubChoice::Primary, ms(1000));
        assert_eq!(p.next_step(ms(1000)), PlanStep::Try(HubChoice::Failover));
        assert_eq!(p.primary_due(), ms(1100));
        // Losing the failover too: primary when due, then wait.
        p.lost(HubChoice::Failover, ms(1050));
        assert_eq!(p.next_step(ms(1050)), PlanStep::Try(HubChoice::Primary));
    }

    #[test]
    fn without_failover_the_plan_only_waits_for_the_primary() {
        let mut p = FailoverPlan::new(false, ms(100), ms(1000));
        p.attempt_failed(HubChoice::Primary, ms(0));
        assert_eq!(p.next_step(ms(50)), PlanStep::WaitUntil(ms(100)));
        assert_eq!(p.next_step(ms(100)), PlanStep::Try(HubChoice::Primary));
    }
}
