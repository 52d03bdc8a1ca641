//! The BACnet/SC hub function (ASHRAE 135 Annex AB) as a sans-IO state machine.
//!
//! Bytes and the current (monotonic) time go in, [`HubOutput`]s come out: frames to send on
//! a connection, connections to close, and [`HubEvent`]s for observation. No tokio, no
//! sockets, no clocks: the owner (a WebSocket/TLS shell, a fuzzer, a replay of captured
//! traffic) assigns a [`ConnId`] per WebSocket, feeds every binary message to
//! [`BscHubCore::receive`], reports closes with [`BscHubCore::closed`] and calls
//! [`BscHubCore::tick`] at [`BscHubCore::poll_timeout`].
//!
//! Frames are parsed and built only with [`crate::protocol::bvlc_sc`].
//!
//! # Choices where the reference is silent
//!
//! * **Before Connect-Request** any other message closes the WebSocket
//!   ([`CloseReason::NotConnected`]) with no NAK: the peer has no VMAC yet, and a hub should
//!   not talk BVLC to an unidentified peer. Frames shorter than 4 bytes are still only
//!   dropped (the general rule), and a malformed Connect-Request is NAKed like any request.
//! * **Relayed vs. hub-bound**: connection-control messages (Connect-*, Disconnect-*,
//!   Heartbeat-*) are always consumed by the hub. Every other known message that carries a
//!   destination VMAC is relayed (unicast or broadcast), so node-to-node BVLC-Results,
//!   Address-Resolution(-ACK) and Advertisements pass through the hub. Messages with no
//!   destination are hub-bound.
//! * **Header options** are checked for unknown must-understand options only on messages
//!   the hub consumes; relayed messages keep their options untouched (the codec's rule: a
//!   relay does not process options).
//! * **Hub-bound Address-Resolution** is answered with an Address-Resolution-ACK carrying an
//!   empty URI list (this hub accepts no direct connections, and the Advertisement says so).
//! * **Hub-bound Encapsulated-NPDU** (no destination): the hub function has no network
//!   layer behind it, so it is dropped with [`DropReason::NoDestination`].
//! * **Hub-bound responses** (BVLC-Result, ACKs, Connect-Accept, Advertisement): the hub
//!   never sends requests, so they are dropped with [`DropReason::Unsolicited`] (never NAKed).
//! * **Unknown function codes** are NAKed with bvlc-function-unknown even when they carry a
//!   destination (the hub cannot know their semantics); hub-bound Proprietary-Messages get
//!   bvlc-proprietary-function-unknown.
//! * **Originating VMAC on hub-bound messages** is accepted (Python nodes send it) and
//!   reported as [`HubEvent::OriginatingVmacPresent`]; forwarding always overwrites it with
//!   the sender's connection VMAC, so it can never be spoofed through the hub.
//! * **Sizes**: a frame longer than `max_bvlc`, or an NPDU longer than `max_npdu`, is NAKed
//!   with message-too-long (dropped if it is a response). A relayed copy longer than the
//!   receiver's advertised MaxBVLC is dropped for that receiver only.
//! * **Connect-Request VMAC** broadcast or all-zero: NAK (class communication, code other)
//!   and close. The hub's own VMAC counts as taken (node-duplicate-vmac). A second
//!   Connect-Request on an established connection is dropped with an event.
//! * **Duplicate VMAC, same UUID**: the old connection is closed
//!   ([`CloseReason::Replaced`]) and the new one accepted. Admission
//!   ([`BscHubCore::accept`]) counts WebSockets, so at the limit a reconnecting node whose
//!   stale connection is still open is refused until that one closes or times out.
//! * **Broadcast rate limit** is a fixed one-second window per sending connection (one VMAC
//!   per connection); the window restarts when a node reconnects.
//! * **Heartbeat**: any received frame (even a malformed one) counts as traffic; a connected
//!   peer silent for `2 × heartbeat_timeout` is closed. The hub never sends
//!   Heartbeat-Requests itself (the initiating side does).
//! * **Fan-out**: [`HubOutput::Send`] carries an `Arc<[u8]>`; a broadcast is rewritten once
//!   and every receiver gets a clone of the same `Arc` (a reference-count bump, no copy).
//!   `Arc` rather than `Rc` so outputs can cross to other tasks/threads.
//! * **State after a hub-initiated close** is dropped immediately: a later
//!   [`BscHubCore::closed`] for that id returns nothing, and frames still arriving on it are
//!   dropped with [`DropReason::UnknownConnection`].
//! * Broadcast delivery order is ascending [`ConnId`] (deterministic, for replays).
//! * `tick`/`poll_timeout` scan all connections (O(n)); fine for the thousands of
//!   connections a bench holds, call them once per I/O batch rather than per frame.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::bvlc_sc::{
    decode, encode_into, error_code, function, is_response, nak, nak_for_option, peek_header, rewrite_for_forwarding,
    unknown_must_understand, BvlcError, BvlcMessage, BvlcPayload, DeviceUuid, HubStatus, Vmac,
    ERROR_CLASS_COMMUNICATION, ERROR_CLASS_SECURITY, FIXED_HEADER_LEN,
};

/// Opaque id the I/O layer assigns to each WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// Whether this hub is the primary or the failover hub (reported in Advertisements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HubRole {
    #[default]
    Primary,
    Failover,
}

/// Hub configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    /// The hub function's own VMAC (sent in Connect-Accept; nodes may not use it).
    pub vmac: Vmac,
    /// The hub's device UUID (sent in Connect-Accept).
    pub uuid: DeviceUuid,
    /// WebSockets admitted at once (connected or awaiting Connect-Request).
    pub max_connections: usize,
    /// Largest BVLC message accepted and advertised.
    pub max_bvlc: u16,
    /// Largest NPDU accepted and advertised.
    pub max_npdu: u16,
    /// Time a new WebSocket has to send its Connect-Request.
    pub connect_wait: Duration,
    /// A connected peer silent for twice this long is dropped.
    pub heartbeat_timeout: Duration,
    pub hub_status: HubRole,
    /// Broadcasts per second allowed per sending VMAC; `None` = unlimited.
    pub broadcast_rate_limit: Option<u32>,
    /// For connections with a client certificate ([`BscHubCore::bind_certificate`]):
    /// a Connect-Request must name the Device UUID the certificate carries,
    /// and only the same device may replace a connection. On by default; it
    /// changes nothing for connections without a certificate (plaintext).
    pub bind_identity: bool,
}

impl Default for HubConfig {
    /// MaxNPDU 1497 (the standard's requirement), MaxBVLC 1600 (1497 + header and room for
    /// header options; inside the 1500-6000 seen advertised), connect-wait 10 s and
    /// heartbeat 300 s (the generous ends of the timers seen, so a node heartbeating every
    /// 60-300 s is never dropped), 1024 connections, no rate limit.
    fn default() -> Self {
        HubConfig {
            vmac: Vmac([0x02, 0x68, 0x75, 0x62, 0x00, 0x01]),
            uuid: DeviceUuid([
                0x68, 0x69, 0x6c, 0x62, 0x65, 0x6e, 0x63, 0x68, 0x2d, 0x62, 0x73, 0x63, 0x2d, 0x68, 0x75, 0x62,
            ]),
            max_connections: 1024,
            max_bvlc: 1600,
            max_npdu: 1497,
            connect_wait: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(300),
            hub_status: HubRole::Primary,
            broadcast_rate_limit: None,
            bind_identity: true,
        }
    }
}

/// Why [`BscHubCore::accept`] refused a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("hub full: {limit} connections")]
    AtCapacity { limit: usize },
    #[error("{0} is already in use")]
    DuplicateConnId(ConnId),
}

/// Why the hub closes a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// No Connect-Request within `connect_wait`.
    ConnectWaitTimeout,
    /// Connected peer silent for `2 × heartbeat_timeout`.
    HeartbeatTimeout,
    /// Connect-Request VMAC held by a different UUID (after the NAK).
    DuplicateVmac,
    /// Connect-Request VMAC is broadcast or reserved (after the NAK).
    InvalidVmac,
    /// Connect-Request for an identity the client certificate does not carry (after the NAK).
    IdentityMismatch,
    /// The same VMAC and UUID connected again on `by`.
    Replaced { by: ConnId },
    /// Peer sent Disconnect-Request (after the ACK).
    PeerDisconnected,
    /// A message other than Connect-Request before the connection was established.
    NotConnected { function: u8 },
}

/// Why a frame (or one copy of it) was not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than the 4-byte fixed header: dropped silently on the wire.
    TooShort { len: usize },
    /// A malformed response: responses are never NAKed.
    MalformedResponse { function: u8, error: String },
    /// Unicast to a VMAC with no connection.
    UnknownDestination(Vmac),
    /// Hub-bound Encapsulated-NPDU: nothing behind the hub function consumes it.
    NoDestination,
    /// A response or Advertisement the hub never asked for.
    Unsolicited { function: u8 },
    /// Something other than Connect-Request before connecting (the connection is closed).
    NotConnected { function: u8 },
    /// A second Connect-Request on an established connection.
    AlreadyConnected,
    /// Broadcast with no other connected peer to receive it.
    NoReceivers,
    /// Broadcast over the per-VMAC rate limit.
    RateLimited { vmac: Vmac, limit: u32 },
    /// The relayed copy exceeds the receiver's MaxBVLC.
    ExceedsPeerMaxBvlc { to: ConnId, len: usize, max: u16 },
    /// Frame on a connection the core does not know (already closed).
    UnknownConnection,
    /// Message too long, but a response, so not NAKed.
    TooLongResponse { function: u8, len: usize },
}

/// Observations; every NAK, drop and close is reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    Connected {
        conn: ConnId,
        vmac: Vmac,
        uuid: DeviceUuid,
        max_bvlc: u16,
        max_npdu: u16,
    },
    /// Same VMAC and UUID reconnected: `old` is closed, `new` takes over.
    Replaced {
        old: ConnId,
        new: ConnId,
        vmac: Vmac,
        uuid: DeviceUuid,
    },
    /// Connect-Request for a VMAC held by another UUID (NAKed and closed).
    DuplicateVmac {
        conn: ConnId,
        vmac: Vmac,
        uuid: DeviceUuid,
        holder: Option<ConnId>,
    },
    /// A Connect-Request refused because the client certificate names
    /// another device: its UUID differs, or the VMAC is held by another
    /// certificate (NAKed and closed).
    IdentityRefused {
        conn: ConnId,
        vmac: Vmac,
        uuid: DeviceUuid,
        reason: String,
    },
    /// A connected peer went silent and was closed.
    SilentPeerDropped {
        conn: ConnId,
        vmac: Vmac,
        silent_for: Duration,
    },
    /// No Connect-Request in time.
    ConnectWaitExpired { conn: ConnId },
    /// Peer sent Disconnect-Request.
    Disconnected { conn: ConnId, vmac: Vmac },
    /// The I/O layer reported the WebSocket closed.
    PeerClosed { conn: ConnId, vmac: Option<Vmac> },
    NakSent {
        conn: ConnId,
        function: u8,
        message_id: u16,
        error_code: u16,
        reason: String,
    },
    Dropped {
        conn: ConnId,
        function: Option<u8>,
        reason: DropReason,
    },
    /// A node put an originating VMAC on a hub-bound message (the standard says none);
    /// accepted, reported for validation.
    OriginatingVmacPresent {
        conn: ConnId,
        function: u8,
        carried: Vmac,
        sender: Option<Vmac>,
    },
}

/// What the owner must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubOutput {
    /// Send one binary WebSocket message. Broadcast copies share one buffer.
    Send {
        to: ConnId,
        frame: Arc<[u8]>,
    },
    /// Close the WebSocket (the core has already forgotten it).
    Close {
        conn: ConnId,
        reason: CloseReason,
    },
    Event(HubEvent),
}

/// Running counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    pub frames_in: u64,
    pub unicast_forwarded: u64,
    pub broadcast_deliveries: u64,
    pub naks_sent: u64,
    pub dropped: u64,
    pub closed_by_hub: u64,
}

#[derive(Debug, Clone)]
struct Peer {
    vmac: Vmac,
    uuid: DeviceUuid,
    max_bvlc: u16,
}

#[derive(Debug, Clone)]
struct Conn {
    accepted_at: Duration,
    last_rx: Duration,
    peer: Option<Peer>,
    /// The client certificate the connection came with (TLS).
    cert: Option<CertIdentity>,
    /// Broadcast rate window: (start, count).
    window: (Duration, u32),
}

/// Who a client certificate says a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// The Device UUID of its `urn:uuid:` SAN, if it has one.
    pub uuid: Option<DeviceUuid>,
    /// The certificate (DER).
    pub der: Arc<[u8]>,
}

impl CertIdentity {
    /// The same device: the same UUID where both certificates carry one
    /// (a renewed certificate), otherwise the same certificate.
    fn same_device(&self, other: &CertIdentity) -> bool {
        match (self.uuid, other.uuid) {
            (Some(a), Some(b)) => a == b,
            _ => self.der == other.der,
        }
    }
}

/// The hub core. See the module docs.
#[derive(Debug)]
pub struct BscHubCore {
    config: HubConfig,
    conns: BTreeMap<ConnId, Conn>,
    by_vmac: HashMap<Vmac, ConnId>,
    stats: HubStats,
    scratch: Vec<u8>,
}

impl BscHubCore {
    pub fn new(config: HubConfig) -> Self {
        BscHubCore {
            config,
            conns: BTreeMap::new(),
            by_vmac: HashMap::new(),
            stats: HubStats::default(),
            scratch: Vec::new(),
        }
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    pub fn stats(&self) -> HubStats {
        self.stats
    }

    /// WebSockets held (connected or awaiting Connect-Request).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The connection currently holding `vmac`.
    pub fn connection_of(&self, vmac: Vmac) -> Option<ConnId> {
        self.by_vmac.get(&vmac).copied()
    }

    /// The VMAC a connection registered, once connected.
    pub fn vmac_of(&self, conn: ConnId) -> Option<Vmac> {
        self.conns.get(&conn)?.peer.as_ref().map(|p| p.vmac)
    }

    /// A new WebSocket was opened (after TLS and the subprotocol check).
    pub fn accept(&mut self, conn: ConnId, now: Duration) -> Result<(), Refusal> {
        if self.conns.contains_key(&conn) {
            return Err(Refusal::DuplicateConnId(conn));
        }
        if self.conns.len() >= self.config.max_connections {
            return Err(Refusal::AtCapacity {
                limit: self.config.max_connections,
            });
        }
        self.conns.insert(
            conn,
            Conn {
                accepted_at: now,
                last_rx: now,
                peer: None,
                cert: None,
                window: (now, 0),
            },
        );
        Ok(())
    }

    /// The client certificate `conn` presented in its TLS handshake, before
    /// its Connect-Request (see [`HubConfig::bind_identity`]).
    pub fn bind_certificate(&mut self, conn: ConnId, cert: CertIdentity) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.cert = Some(cert);
        }
    }

    /// The WebSocket closed (peer close, I/O error). Forgets the connection.
    pub fn closed(&mut self, conn: ConnId, _now: Duration) -> Vec<HubOutput> {
        match self.forget(conn) {
            Some(c) => vec![HubOutput::Event(HubEvent::PeerClosed {
                conn,
                vmac: c.peer.map(|p| p.vmac),
            })],
            None => Vec::new(),
        }
    }

    /// The next time [`tick`](Self::tick) has work to do.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.conns.values().map(|c| self.deadline(c)).min()
    }

    /// Expire connect-wait and heartbeat timeouts due at `now`.
    pub fn tick(&mut self, now: Duration) -> Vec<HubOutput> {
        let due: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| now >= self.deadline(c))
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for conn in due {
            let Some(c) = self.forget(conn) else { continue };
            match c.peer {
                Some(p) => {
                    out.push(HubOutput::Event(HubEvent::SilentPeerDropped {
                        conn,
                        vmac: p.vmac,
                        silent_for: now.saturating_sub(c.last_rx),
                    }));
                    self.close(&mut out, conn, CloseReason::HeartbeatTimeout);
                }
                None => {
                    out.push(HubOutput::Event(HubEvent::ConnectWaitExpired { conn }));
                    self.close(&mut out, conn, CloseReason::ConnectWaitTimeout);
                }
            }
        }
        out
    }

    /// One binary WebSocket message from `conn`.
    pub fn receive(&mut self, conn: ConnId, frame: &[u8], now: Duration) -> Vec<HubOutput> {
        let mut out = Vec::new();
        self.stats.frames_in += 1;
        let fn_code = frame.first().copied();
        let Some(c) = self.conns.get_mut(&conn) else {
            self.drop_frame(&mut out, conn, fn_code, DropReason::UnknownConnection);
            return out;
        };
        c.last_rx = c.last_rx.max(now);
        let sender = c.peer.as_ref().map(|p| p.vmac);
        if frame.len() < FIXED_HEADER_LEN {
            self.drop_frame(&mut out, conn, fn_code, DropReason::TooShort { len: frame.len() });
            return out;
        }
        let func = frame[0];
        if sender.is_none() && func != function::CONNECT_REQUEST {
            self.drop_frame(&mut out, conn, Some(func), DropReason::NotConnected { function: func });
            self.forget(conn);
            self.close(&mut out, conn, CloseReason::NotConnected { function: func });
            return out;
        }
        let msg = match decode(frame) {
            Ok(m) => m,
            Err(e) => {
                self.malformed(&mut out, conn, frame, &e);
                return out;
            }
        };
        if frame.len() > usize::from(self.config.max_bvlc) {
            self.too_long(&mut out, conn, &msg, frame.len(), "BVLC message");
            return out;
        }
        if let BvlcPayload::EncapsulatedNpdu(n) = &msg.payload {
            if n.len() > usize::from(self.config.max_npdu) {
                self.too_long(&mut out, conn, &msg, n.len(), "NPDU");
                return out;
            }
        }
        let control = matches!(
            func,
            function::CONNECT_REQUEST
                | function::CONNECT_ACCEPT
                | function::DISCONNECT_REQUEST
                | function::DISCONNECT_ACK
                | function::HEARTBEAT_REQUEST
                | function::HEARTBEAT_ACK
        );
        if let BvlcPayload::Unknown { .. } = msg.payload {
            self.send_nak(
                &mut out,
                conn,
                &msg,
                error_code::BVLC_FUNCTION_UNKNOWN,
                "unknown BVLC function",
            );
            return out;
        }
        match (control, msg.destination) {
            (false, Some(dest)) => {
                // sender is Some: not-connected peers were closed above.
                let sender = sender.unwrap_or(self.config.vmac);
                if let Some(carried) = msg.originating {
                    out.push(HubOutput::Event(HubEvent::OriginatingVmacPresent {
                        conn,
                        function: func,
                        carried,
                        sender: Some(sender),
                    }));
                }
                if dest.is_broadcast() {
                    self.broadcast(&mut out, conn, sender, frame, func, now);
                } else {
                    self.unicast(&mut out, conn, sender, dest, frame, func);
                }
            }
            _ => self.hub_bound(&mut out, conn, sender, msg, now),
        }
        out
    }

    // ---------------------------------------------------------------------------------

    fn deadline(&self, c: &Conn) -> Duration {
        match c.peer {
            None => c.accepted_at.saturating_add(self.config.connect_wait),
            Some(_) => c
                .last_rx
                .saturating_add(self.config.heartbeat_timeout.saturating_mul(2)),
        }
    }

    fn forget(&mut self, conn: ConnId) -> Option<Conn> {
        let c = self.conns.remove(&conn)?;
        if let Some(p) = &c.peer {
            if self.by_vmac.get(&p.vmac) == Some(&conn) {
                self.by_vmac.remove(&p.vmac);
            }
        }
        Some(c)
    }

    fn close(&mut self, out: &mut Vec<HubOutput>, conn: ConnId, reason: CloseReason) {
        self.stats.closed_by_hub += 1;
        out.push(HubOutput::Close { conn, reason });
    }

    fn drop_frame(&mut self, out: &mut Vec<HubOutput>, conn: ConnId, function: Option<u8>, reason: DropReason) {
        self.stats.dropped += 1;
        out.push(HubOutput::Event(HubEvent::Dropped { conn, function, reason }));
    }

    fn send_msg(&mut self, out: &mut Vec<HubOutput>, to: ConnId, msg: &BvlcMessage) {
        self.scratch.clear();
        match encode_into(msg, &mut self.scratch) {
            Ok(()) => out.push(HubOutput::Send {
                to,
                frame: Arc::from(&self.scratch[..]),
            }),
            // Unreachable for the messages the hub builds; reported rather than panicking.
            Err(e) => self.drop_frame(
                out,
                to,
                Some(msg.function()),
                DropReason::MalformedResponse {
                    function: msg.function(),
                    error: e.to_string(),
                },
            ),
        }
    }

    /// Reply on the requester's own connection: never addressed.
    fn reply(&mut self, out: &mut Vec<HubOutput>, to: ConnId, mut msg: BvlcMessage) {
        msg.destination = None;
        msg.originating = None;
        self.send_msg(out, to, &msg);
    }

    fn nak_event(&mut self, out: &mut Vec<HubOutput>, conn: ConnId, req: &BvlcMessage, code: u16, reason: &str) {
        self.stats.naks_sent += 1;
        out.push(HubOutput::Event(HubEvent::NakSent {
            conn,
            function: req.function(),
            message_id: req.message_id,
            error_code: code,
            reason: reason.to_string(),
        }));
    }

    /// Why `conn`'s certificate does not let it connect as `uuid` in place
    /// of `holder`, when identities are bound to certificates.
    fn identity_problem(&self, conn: ConnId, uuid: DeviceUuid, holder: Option<ConnId>) -> Option<String> {
        if !self.config.bind_identity {
            return None;
        }
        let cert = self.conns.get(&conn)?.cert.as_ref()?;
        if let Some(own) = cert.uuid {
            if own != uuid {
                return Some(format!("Device UUID {uuid} is not the one in the client certificate ({own})"));
            }
        }
        // A holder with another UUID is a duplicate VMAC (the standard's NAK,
        // below); with the same UUID, this would replace it.
        let holder = holder.and_then(|h| self.conns.get(&h))?;
        let held = holder.cert.as_ref()?;
        if holder.peer.as_ref().is_some_and(|p| p.uuid == uuid) && !cert.same_device(held) {
            return Some(format!("Device UUID {uuid} is connected with another client certificate, which this one may not replace"));
        }
        None
    }

    fn send_nak(&mut self, out: &mut Vec<HubOutput>, conn: ConnId, req: &BvlcMessage, code: u16, reason: &str) {
        let n = nak(req, ERROR_CLASS_COMMUNICATION, code, reason);
        self.reply(out, conn, n);
        self.nak_event(out, conn, req, code, reason);
    }

    fn malformed(&mut self, out: &mut Vec<HubOutput>, conn: ConnId, frame: &[u8], e: &BvlcError) {
        let Some((func, _, id)) = peek_header(frame) else {
            self.drop_frame(
                out,
                conn,
                frame.first().copied(),
                DropReason::TooShort { len: frame.len() },
            );
            return;
        };
        if is_response(func) {
            self.drop_frame(
                out,
                conn,
                Some(func),
                DropReason::MalformedResponse {
                    function: func,
                    error: e.to_string(),
                },
            );
            return;
        }
        // `nak` only needs the request's function and message ID.
        let stub = BvlcMessage::new(
            id,
            BvlcPayload::Unknown {
                function: func,
                data: Vec::new(),
            },
        );
        self.send_nak(out, conn, &stub, e.nak_code(), &e.to_string());
    }

    fn too_long(&mut self, out: &mut Vec<HubOutput>, conn: ConnId, msg: &BvlcMessage, len: usize, what: &str) {
        let func = msg.function();
        if is_response(func) {
            self.drop_frame(
                out,
                conn,
                Some(func),
                DropReason::TooLongResponse { function: func, len },
            );
        } else {
            let max = if what == "NPDU" {
                self.config.max_npdu
            } else {
                self.config.max_bvlc
            };
            let reason = format!("{what} of {len} bytes exceeds {max}");
            self.send_nak(out, conn, msg, error_code::MESSAGE_TOO_LONG, &reason);
        }
    }

    fn unicast(&mut self, out: &mut Vec<HubOutput>, conn: ConnId, sender: Vmac, dest: Vmac, frame: &[u8], func: u8) {
        let Some(&to) = self.by_vmac.get(&dest) else {
            self.drop_frame(out, conn, Some(func), DropReason::UnknownDestination(dest));
            return;
        };
        self.scratch.clear();
        if let Err(e) = rewrite_for_forwarding(frame, sender, false, &mut self.scratch) {
            // decode() accepted the frame, so this cannot happen; report, don't panic.
            self.malformed(out, conn, frame, &e);
            return;
        }
        let max = self
            .conns
            .get(&to)
            .and_then(|c| c.peer.as_ref())
            .map_or(0, |p| p.max_bvlc);
        let len = self.scratch.len();
        if len > usize::from(max) {
            self.drop_frame(out, conn, Some(func), DropReason::ExceedsPeerMaxBvlc { to, len, max });
            return;
        }
        self.stats.unicast_forwarded += 1;
        out.push(HubOutput::Send {
            to,
            frame: Arc::from(&self.scratch[..]),
        });
    }

    fn broadcast(
        &mut self,
        out: &mut Vec<HubOutput>,
        conn: ConnId,
        sender: Vmac,
        frame: &[u8],
        func: u8,
        now: Duration,
    ) {
        if let Some(limit) = self.config.broadcast_rate_limit {
            if let Some(c) = self.conns.get_mut(&conn) {
                let (start, count) = &mut c.window;
                if now.saturating_sub(*start) >= Duration::from_secs(1) {
                    *start = now;
                    *count = 0;
                }
                if *count >= limit {
                    self.drop_frame(out, conn, Some(func), DropReason::RateLimited { vmac: sender, limit });
                    return;
                }
                *count += 1;
            }
        }
        self.scratch.clear();
        if let Err(e) = rewrite_for_forwarding(frame, sender, true, &mut self.scratch) {
            self.malformed(out, conn, frame, &e);
            return;
        }
        let shared: Arc<[u8]> = Arc::from(&self.scratch[..]);
        let len = shared.len();
        let mut too_big = Vec::new();
        let mut candidates = 0usize;
        for (&to, c) in &self.conns {
            let Some(p) = &c.peer else { continue };
            if to == conn {
                continue;
            }
            candidates += 1;
            if len > usize::from(p.max_bvlc) {
                too_big.push((to, p.max_bvlc));
                continue;
            }
            out.push(HubOutput::Send {
                to,
                frame: Arc::clone(&shared),
            });
            self.stats.broadcast_deliveries += 1;
        }
        for (to, max) in too_big {
            self.drop_frame(out, conn, Some(func), DropReason::ExceedsPeerMaxBvlc { to, len, max });
        }
        if candidates == 0 {
            self.drop_frame(out, conn, Some(func), DropReason::NoReceivers);
        }
    }

    fn hub_bound(
        &mut self,
        out: &mut Vec<HubOutput>,
        conn: ConnId,
        sender: Option<Vmac>,
        msg: BvlcMessage,
        now: Duration,
    ) {
        let func = msg.function();
        if is_response(func) || func == function::ADVERTISEMENT {
            self.drop_frame(out, conn, Some(func), DropReason::Unsolicited { function: func });
            return;
        }
        if let Some(carried) = msg.originating {
            out.push(HubOutput::Event(HubEvent::OriginatingVmacPresent {
                conn,
                function: func,
                carried,
                sender,
            }));
        }
        if let Some(opt) = unknown_must_understand(&msg) {
            let reason = format!(
                "must-understand header option type {} not understood",
                opt.option_type()
            );
            let n = nak_for_option(&msg, opt, &reason);
            self.reply(out, conn, n);
            self.nak_event(out, conn, &msg, error_code::HEADER_NOT_UNDERSTOOD, &reason);
            return;
        }
        let id = msg.message_id;
        match &msg.payload {
            BvlcPayload::ConnectRequest {
                vmac, uuid, max_bvlc, ..
            } => self.connect(out, conn, &msg, *vmac, *uuid, *max_bvlc, now),
            BvlcPayload::HeartbeatRequest => self.reply(out, conn, BvlcMessage::new(id, BvlcPayload::HeartbeatAck)),
            BvlcPayload::DisconnectRequest => {
                self.reply(out, conn, BvlcMessage::new(id, BvlcPayload::DisconnectAck));
                if let Some(c) = self.forget(conn) {
                    if let Some(p) = c.peer {
                        out.push(HubOutput::Event(HubEvent::Disconnected { conn, vmac: p.vmac }));
                    }
                }
                self.close(out, conn, CloseReason::PeerDisconnected);
            }
            BvlcPayload::AddressResolution => self.reply(
                out,
                conn,
                BvlcMessage::new(id, BvlcPayload::AddressResolutionAck(Vec::new())),
            ),
            BvlcPayload::AdvertisementSolicitation => {
                let adv = BvlcPayload::Advertisement {
                    hub_status: match self.config.hub_status {
                        HubRole::Primary => HubStatus::ConnectedToPrimary,
                        HubRole::Failover => HubStatus::ConnectedToFailover,
                    },
                    accept_direct: false,
                    max_bvlc: self.config.max_bvlc,
                    max_npdu: self.config.max_npdu,
                };
                self.reply(out, conn, BvlcMessage::new(id, adv));
            }
            BvlcPayload::Proprietary { .. } => self.send_nak(
                out,
                conn,
                &msg,
                error_code::BVLC_PROPRIETARY_FUNCTION_UNKNOWN,
                "hub supports no proprietary messages",
            ),
            BvlcPayload::EncapsulatedNpdu(_) => self.drop_frame(out, conn, Some(func), DropReason::NoDestination),
            // Responses, Advertisement and Unknown were handled above.
            _ => self.drop_frame(out, conn, Some(func), DropReason::Unsolicited { function: func }),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn connect(
        &mut self,
        out: &mut Vec<HubOutput>,
        conn: ConnId,
        req: &BvlcMessage,
        vmac: Vmac,
        uuid: DeviceUuid,
        max_bvlc: u16,
        _now: Duration,
    ) {
        let func = function::CONNECT_REQUEST;
        if self.conns.get(&conn).is_some_and(|c| c.peer.is_some()) {
            self.drop_frame(out, conn, Some(func), DropReason::AlreadyConnected);
            return;
        }
        if vmac.is_broadcast() || vmac.is_reserved() {
            self.send_nak(
                out,
                conn,
                req,
                error_code::OTHER,
                &format!("VMAC {vmac} is not a unicast VMAC"),
            );
            self.forget(conn);
            self.close(out, conn, CloseReason::InvalidVmac);
            return;
        }
        let holder = self.by_vmac.get(&vmac).copied();
        let holder_uuid = holder
            .and_then(|h| self.conns.get(&h))
            .and_then(|c| c.peer.as_ref())
            .map(|p| p.uuid);
        if let Some(reason) = self.identity_problem(conn, uuid, holder) {
            let n = nak(req, ERROR_CLASS_SECURITY, error_code::AUTHENTICATION_FAILED, &reason);
            self.reply(out, conn, n);
            self.nak_event(out, conn, req, error_code::AUTHENTICATION_FAILED, &reason);
            out.push(HubOutput::Event(HubEvent::IdentityRefused { conn, vmac, uuid, reason }));
            self.forget(conn);
            self.close(out, conn, CloseReason::IdentityMismatch);
            return;
        }
        let hub_own = vmac == self.config.vmac;
        if hub_own || (holder.is_some() && holder_uuid != Some(uuid)) {
            let reason = format!("VMAC {vmac} is in use by another device");
            self.send_nak(out, conn, req, error_code::NODE_DUPLICATE_VMAC, &reason);
            out.push(HubOutput::Event(HubEvent::DuplicateVmac {
                conn,
                vmac,
                uuid,
                holder,
            }));
            self.forget(conn);
            self.close(out, conn, CloseReason::DuplicateVmac);
            return;
        }
        if let Some(old) = holder {
            self.forget(old);
            out.push(HubOutput::Event(HubEvent::Replaced {
                old,
                new: conn,
                vmac,
                uuid,
            }));
            self.close(out, old, CloseReason::Replaced { by: conn });
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.peer = Some(Peer { vmac, uuid, max_bvlc });
        }
        self.by_vmac.insert(vmac, conn);
        let accept = BvlcMessage::new(
            req.message_id,
            BvlcPayload::ConnectAccept {
                vmac: self.config.vmac,
                uuid: self.config.uuid,
                max_bvlc: self.config.max_bvlc,
                max_npdu: self.config.max_npdu,
            },
        );
        self.reply(out, conn, accept);
        let max_npdu = match req.payload {
            BvlcPayload::ConnectRequest { max_npdu, .. } => max_npdu,
            _ => 0,
        };
        out.push(HubOutput::Event(HubEvent::Connected {
            conn,
            vmac,
            uuid,
            max_bvlc,
            max_npdu,
        }));
    }
}


/// What the hub core reports through [`SansIoCore`](crate::sans_io::SansIoCore).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubCoreEvent {
    Hub(HubEvent),
    /// A connection the core would not take (it is closed).
    Refused { conn: ConnId, refusal: Refusal },
    /// The core closed a connection, and why.
    Closed { conn: ConnId, reason: CloseReason },
}

impl BscHubCore {
    fn outputs(v: Vec<HubOutput>, out: &mut Vec<crate::sans_io::Output<HubCoreEvent>>) {
        use crate::sans_io::{Output, Peer};
        for o in v {
            match o {
                // A copy per receiver: the hub's own driver shares broadcast buffers instead.
                HubOutput::Send { to, frame } => out.push(Output::Send { to: Peer(to.0), bytes: frame.to_vec() }),
                HubOutput::Close { conn, reason } => {
                    out.push(Output::Event(HubCoreEvent::Closed { conn, reason }));
                    out.push(Output::Close(Peer(conn.0)));
                }
                HubOutput::Event(e) => out.push(Output::Event(HubCoreEvent::Hub(e))),
            }
        }
    }
}

/// Peers are connections ([`ConnId`]). The hub's server keeps its own batched
/// driver; this is the shape the fuzzer, tests and replays use.
impl crate::sans_io::SansIoCore for BscHubCore {
    type Event = HubCoreEvent;

    fn handle_input(&mut self, input: crate::sans_io::Input<'_>, now: Duration, out: &mut Vec<crate::sans_io::Output<HubCoreEvent>>) -> Result<(), String> {
        use crate::sans_io::{Input, Output};
        match input {
            Input::Connected(p) => {
                if let Err(refusal) = self.accept(ConnId(p.0), now) {
                    out.push(Output::Event(HubCoreEvent::Refused { conn: ConnId(p.0), refusal }));
                    out.push(Output::Close(p));
                }
            }
            Input::Disconnected(p) => Self::outputs(self.closed(ConnId(p.0), now), out),
            Input::Bytes { from, bytes } => Self::outputs(self.receive(ConnId(from.0), bytes, now), out),
            Input::Timeout => Self::outputs(self.tick(now), out),
            Input::Set { key, .. } => return Err(format!("a hub has no state key `{key}`")),
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
    use crate::protocol::bvlc_sc::{encode, BvlcResult, HeaderOption, HeaderOptionKind};

    const A: ConnId = ConnId(1);
    const B: ConnId = ConnId(2);
    const C: ConnId = ConnId(3);
    const VA: Vmac = Vmac([0x02, 0, 0, 0, 0, 0xA]);
    const VB: Vmac = Vmac([0x02, 0, 0, 0, 0, 0xB]);
    const VC: Vmac = Vmac([0x02, 0, 0, 0, 0, 0xC]);
    const UA: DeviceUuid = DeviceUuid([0xA; 16]);
    const UB: DeviceUuid = DeviceUuid([0xB; 16]);
    const UC: DeviceUuid = DeviceUuid([0xC; 16]);
    const NPDU: &[u8] = &[0x01, 0x20, 0xFF, 0xFF, 0x00, 0xFF, 0x10, 0x08];

    fn t(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn enc(m: &BvlcMessage) -> Vec<u8> {
        encode(m).expect("encode")
    }

    fn connect_req(id: u16, vmac: Vmac, uuid: DeviceUuid) -> Vec<u8> {
        enc(&BvlcMessage::new(
            id,
            BvlcPayload::ConnectRequest {
                vmac,
                uuid,
                max_bvlc: 1600,
                max_npdu: 1497,
            },
        ))
    }

    fn npdu_to(id: u16, dest: Option<Vmac>) -> Vec<u8> {
        let mut m = BvlcMessage::new(id, BvlcPayload::EncapsulatedNpdu(NPDU.to_vec()));
        m.destination = dest;
        enc(&m)
    }

    /// Decoded frames sent to `to`.
    fn sent(out: &[HubOutput], to: ConnId) -> Vec<BvlcMessage> {
        out.iter()
            .filter_map(|o| match o {
                HubOutput::Send { to: t, frame } if *t == to => Some(decode(frame).expect("hub sent a valid frame")),
                _ => None,
            })
            .collect()
    }

    fn sends(out: &[HubOutput]) -> usize {
        out.iter().filter(|o| matches!(o, HubOutput::Send { .. })).count()
    }

    fn closes(out: &[HubOutput]) -> Vec<(ConnId, CloseReason)> {
        out.iter()
            .filter_map(|o| match o {
                HubOutput::Close { conn, reason } => Some((*conn, reason.clone())),
                _ => None,
            })
            .collect()
    }

    fn events(out: &[HubOutput]) -> Vec<HubEvent> {
        out.iter()
            .filter_map(|o| match o {
                HubOutput::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    fn drops(out: &[HubOutput]) -> Vec<DropReason> {
        events(out)
            .into_iter()
            .filter_map(|e| match e {
                HubEvent::Dropped { reason, .. } => Some(reason),
                _ => None,
            })
            .collect()
    }

    fn nak_code(m: &BvlcMessage) -> Option<(u8, u16, u16)> {
        match &m.payload {
            BvlcPayload::Result {
                for_function,
                result:
                    BvlcResult::Nak {
                        error_class,
                        error_code,
                        ..
                    },
            } => Some((*for_function, *error_class, *error_code)),
            _ => None,
        }
    }

    fn join(hub: &mut BscHubCore, conn: ConnId, vmac: Vmac, uuid: DeviceUuid, now: Duration) -> Vec<HubOutput> {
        hub.accept(conn, now).expect("accept");
        hub.receive(conn, &connect_req(7, vmac, uuid), now)
    }

    fn hub3() -> BscHubCore {
        let mut hub = BscHubCore::new(HubConfig::default());
        for (c, v, u) in [(A, VA, UA), (B, VB, UB), (C, VC, UC)] {
            join(&mut hub, c, v, u, t(0));
        }
        hub
    }

    #[test]
    fn connect_accept_echoes_id_and_hub_sizes() {
        let mut hub = BscHubCore::new(HubConfig::default());
        hub.accept(A, t(0)).unwrap();
        let out = hub.receive(A, &connect_req(0x1234, VA, UA), t(1));
        let r = sent(&out, A);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].message_id, 0x1234);
        assert_eq!(
            r[0].payload,
            BvlcPayload::ConnectAccept {
                vmac: hub.config().vmac,
                uuid: hub.config().uuid,
                max_bvlc: 1600,
                max_npdu: 1497
            }
        );
        assert_eq!(r[0].originating, None);
        assert_eq!(r[0].destination, None);
        assert!(events(&out).contains(&HubEvent::Connected {
            conn: A,
            vmac: VA,
            uuid: UA,
            max_bvlc: 1600,
            max_npdu: 1497
        }));
        assert_eq!(hub.connection_of(VA), Some(A));
        assert_eq!(hub.vmac_of(A), Some(VA));
    }

    #[test]
    fn admission_limit() {
        let mut hub = BscHubCore::new(HubConfig {
            max_connections: 2,
            ..HubConfig::default()
        });
        hub.accept(A, t(0)).unwrap();
        assert_eq!(hub.accept(A, t(0)), Err(Refusal::DuplicateConnId(A)));
        hub.accept(B, t(0)).unwrap();
        assert_eq!(hub.accept(C, t(0)), Err(Refusal::AtCapacity { limit: 2 }));
        assert_eq!(
            hub.closed(B, t(1)),
            vec![HubOutput::Event(HubEvent::PeerClosed { conn: B, vmac: None })]
        );
        hub.accept(C, t(1)).unwrap();
        assert!(
            hub.closed(B, t(1)).is_empty(),
            "second close of an unknown conn is a no-op"
        );
    }

    #[test]
    fn anything_but_connect_request_before_connect_closes() {
        let mut hub = BscHubCore::new(HubConfig::default());
        hub.accept(A, t(0)).unwrap();
        let hb = enc(&BvlcMessage::new(5, BvlcPayload::HeartbeatRequest));
        let out = hub.receive(A, &hb, t(1));
        assert_eq!(sends(&out), 0, "no NAK to an unidentified peer");
        assert_eq!(
            closes(&out),
            vec![(
                A,
                CloseReason::NotConnected {
                    function: function::HEARTBEAT_REQUEST
                }
            )]
        );
        assert_eq!(
            drops(&out),
            vec![DropReason::NotConnected {
                function: function::HEARTBEAT_REQUEST
            }]
        );
        assert_eq!(hub.connection_count(), 0);
        // Frames still in flight on the closed connection are reported, not processed.
        let out = hub.receive(A, &hb, t(1));
        assert_eq!(drops(&out), vec![DropReason::UnknownConnection]);
        assert_eq!(hub.stats().dropped, 2);
    }

    #[test]
    fn duplicate_vmac_different_uuid_is_nakked_and_closed() {
        let mut hub = BscHubCore::new(HubConfig::default());
        join(&mut hub, A, VA, UA, t(0));
        let out = join(&mut hub, B, VA, UB, t(1));
        let r = sent(&out, B);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].message_id, 7);
        assert_eq!(
            nak_code(&r[0]),
            Some((
                function::CONNECT_REQUEST,
                ERROR_CLASS_COMMUNICATION,
                error_code::NODE_DUPLICATE_VMAC
            ))
        );
        assert_eq!(closes(&out), vec![(B, CloseReason::DuplicateVmac)]);
        assert!(events(&out).contains(&HubEvent::DuplicateVmac {
            conn: B,
            vmac: VA,
            uuid: UB,
            holder: Some(A)
        }));
        assert_eq!(hub.connection_of(VA), Some(A), "the original holder keeps its VMAC");
        assert_eq!(sends(&out), 1, "nothing sent to the holder");
        // The hub's own VMAC is taken too.
        let hv = hub.config().vmac;
        let out = join(&mut hub, C, hv, UC, t(2));
        assert_eq!(
            nak_code(&sent(&out, C)[0]).map(|n| n.2),
            Some(error_code::NODE_DUPLICATE_VMAC)
        );
        assert_eq!(closes(&out), vec![(C, CloseReason::DuplicateVmac)]);
    }

    fn cert(uuid: Option<DeviceUuid>, der: &[u8]) -> CertIdentity {
        CertIdentity { uuid, der: Arc::from(der) }
    }

    /// Accepts `conn` with `cert`, then sends its Connect-Request.
    fn join_with(hub: &mut BscHubCore, conn: ConnId, cert: CertIdentity, vmac: Vmac, uuid: DeviceUuid, now: Duration) -> Vec<HubOutput> {
        hub.accept(conn, now).unwrap();
        hub.bind_certificate(conn, cert);
        hub.receive(conn, &connect_req(7, vmac, uuid), now)
    }

    fn refused_for_identity(out: &[HubOutput], conn: ConnId) -> bool {
        nak_code(&sent(out, conn)[0]) == Some((function::CONNECT_REQUEST, ERROR_CLASS_SECURITY, error_code::AUTHENTICATION_FAILED))
            && closes(out) == vec![(conn, CloseReason::IdentityMismatch)]
            && events(out).iter().any(|e| matches!(e, HubEvent::IdentityRefused { conn: c, .. } if *c == conn))
    }

    #[test]
    fn a_certificate_binds_the_device_uuid_and_who_may_replace() {
        let mut hub = BscHubCore::new(HubConfig::default());
        // A's certificate carries UA: connecting as UA works, as UB does not.
        let out = join_with(&mut hub, A, cert(Some(UA), b"cert-a"), VA, UA, t(0));
        assert!(closes(&out).is_empty(), "{out:?}");
        let out = join_with(&mut hub, B, cert(Some(UA), b"cert-a"), VB, UB, t(1));
        assert!(refused_for_identity(&out, B), "{out:?}");
        assert_eq!(hub.connection_of(VB), None);
        // B's certificate (UB) claiming A's VMAC and UUID: refused, A keeps them.
        let out = join_with(&mut hub, C, cert(Some(UB), b"cert-b"), VA, UA, t(2));
        assert!(refused_for_identity(&out, C), "{out:?}");
        assert_eq!(hub.connection_of(VA), Some(A));
        // A renewed certificate with the same UUID replaces A's connection.
        let out = join_with(&mut hub, ConnId(4), cert(Some(UA), b"cert-a-renewed"), VA, UA, t(3));
        assert_eq!(closes(&out), vec![(A, CloseReason::Replaced { by: ConnId(4) })]);
    }

    #[test]
    fn without_a_uuid_in_the_certificate_only_that_certificate_may_replace() {
        let mut hub = BscHubCore::new(HubConfig::default());
        join_with(&mut hub, A, cert(None, b"vendor-1"), VA, UA, t(0));
        let out = join_with(&mut hub, B, cert(None, b"vendor-2"), VA, UA, t(1));
        assert!(refused_for_identity(&out, B), "{out:?}");
        assert_eq!(hub.connection_of(VA), Some(A));
        // Another UUID on A's VMAC is still the standard's duplicate VMAC.
        let out = join_with(&mut hub, C, cert(None, b"vendor-2"), VA, UB, t(2));
        assert_eq!(closes(&out), vec![(C, CloseReason::DuplicateVmac)]);
        let out = join_with(&mut hub, ConnId(4), cert(None, b"vendor-1"), VA, UA, t(3));
        assert_eq!(closes(&out), vec![(A, CloseReason::Replaced { by: ConnId(4) })]);
    }

    #[test]
    fn identity_binding_can_be_turned_off() {
        let mut hub = BscHubCore::new(HubConfig { bind_identity: false, ..HubConfig::default() });
        join_with(&mut hub, A, cert(Some(UA), b"cert-a"), VA, UA, t(0));
        // The old behaviour: B's certificate takes A's place by naming A's VMAC and UUID.
        let out = join_with(&mut hub, B, cert(Some(UB), b"cert-b"), VA, UA, t(1));
        assert_eq!(closes(&out), vec![(A, CloseReason::Replaced { by: B })]);
    }

    #[test]
    fn duplicate_vmac_same_uuid_replaces_old_connection() {
        let mut hub = BscHubCore::new(HubConfig::default());
        join(&mut hub, A, VA, UA, t(0));
        join(&mut hub, C, VC, UC, t(0));
        let out = join(&mut hub, B, VA, UA, t(1));
        assert_eq!(closes(&out), vec![(A, CloseReason::Replaced { by: B })]);
        assert!(events(&out).contains(&HubEvent::Replaced {
            old: A,
            new: B,
            vmac: VA,
            uuid: UA
        }));
        assert!(matches!(sent(&out, B)[0].payload, BvlcPayload::ConnectAccept { .. }));
        assert_eq!(hub.connection_of(VA), Some(B));
        assert_eq!(hub.connection_count(), 2);
        // Traffic for VA now goes to B; the late close of A does not unmap VA.
        assert!(hub.closed(A, t(2)).is_empty());
        let out = hub.receive(C, &npdu_to(1, Some(VA)), t(2));
        assert_eq!(sent(&out, B).len(), 1);
        assert_eq!(sent(&out, A).len(), 0);
    }

    #[test]
    fn invalid_connect_vmac() {
        let mut hub = BscHubCore::new(HubConfig::default());
        for (conn, v) in [(A, Vmac::BROADCAST), (B, Vmac::RESERVED)] {
            let out = join(&mut hub, conn, v, UA, t(0));
            assert_eq!(nak_code(&sent(&out, conn)[0]).map(|n| n.2), Some(error_code::OTHER));
            assert_eq!(closes(&out), vec![(conn, CloseReason::InvalidVmac)]);
        }
        assert_eq!(hub.connection_count(), 0);
    }

    #[test]
    fn heartbeat_and_disconnect() {
        let mut hub = hub3();
        let out = hub.receive(A, &enc(&BvlcMessage::new(0xBEEF, BvlcPayload::HeartbeatRequest)), t(1));
        assert_eq!(sent(&out, A), vec![BvlcMessage::new(0xBEEF, BvlcPayload::HeartbeatAck)]);
        assert_eq!(out.len(), 1);
        let out = hub.receive(A, &enc(&BvlcMessage::new(0x0102, BvlcPayload::DisconnectRequest)), t(2));
        assert_eq!(
            sent(&out, A),
            vec![BvlcMessage::new(0x0102, BvlcPayload::DisconnectAck)]
        );
        assert!(matches!(out[0], HubOutput::Send { .. }), "ACK before close");
        assert_eq!(closes(&out), vec![(A, CloseReason::PeerDisconnected)]);
        assert!(events(&out).contains(&HubEvent::Disconnected { conn: A, vmac: VA }));
        assert_eq!(hub.connection_of(VA), None);
        // Unsolicited heartbeat ACK: dropped, not NAKed.
        let out = hub.receive(B, &enc(&BvlcMessage::new(3, BvlcPayload::HeartbeatAck)), t(3));
        assert_eq!(sends(&out), 0);
        assert_eq!(
            drops(&out),
            vec![DropReason::Unsolicited {
                function: function::HEARTBEAT_ACK
            }]
        );
    }

    #[test]
    fn three_node_unicast_and_broadcast() {
        let mut hub = hub3();
        // Unicast A -> B: destination removed, originating = A.
        let out = hub.receive(A, &npdu_to(0x11, Some(VB)), t(1));
        assert_eq!(sends(&out), 1);
        let mut want = BvlcMessage::new(0x11, BvlcPayload::EncapsulatedNpdu(NPDU.to_vec()));
        want.originating = Some(VA);
        assert_eq!(sent(&out, B), vec![want]);
        // Broadcast from B: A and C get it, B does not; destination kept, one shared buffer.
        let out = hub.receive(B, &npdu_to(0x22, Some(Vmac::BROADCAST)), t(2));
        let mut want = BvlcMessage::new(0x22, BvlcPayload::EncapsulatedNpdu(NPDU.to_vec()));
        want.originating = Some(VB);
        want.destination = Some(Vmac::BROADCAST);
        assert_eq!(sent(&out, A), vec![want.clone()]);
        assert_eq!(sent(&out, C), vec![want]);
        assert!(sent(&out, B).is_empty());
        let bufs: Vec<&Arc<[u8]>> = out
            .iter()
            .filter_map(|o| match o {
                HubOutput::Send { frame, .. } => Some(frame),
                _ => None,
            })
            .collect();
        assert_eq!(bufs.len(), 2);
        assert!(Arc::ptr_eq(bufs[0], bufs[1]), "fan-out shares one buffer");
        // A node still awaiting Connect-Request gets no broadcasts.
        hub.accept(ConnId(9), t(2)).unwrap();
        let out = hub.receive(C, &npdu_to(0x33, Some(Vmac::BROADCAST)), t(3));
        assert_eq!(sends(&out), 2);
        assert!(sent(&out, ConnId(9)).is_empty());
        // Unknown destination: dropped with an event.
        let ghost = Vmac([0x02, 9, 9, 9, 9, 9]);
        let out = hub.receive(A, &npdu_to(0x44, Some(ghost)), t(4));
        assert_eq!(sends(&out), 0);
        assert_eq!(drops(&out), vec![DropReason::UnknownDestination(ghost)]);
        let s = hub.stats();
        assert_eq!((s.unicast_forwarded, s.broadcast_deliveries, s.dropped), (1, 4, 1));
        // Hub-bound NPDU (no destination): dropped with an event.
        let out = hub.receive(A, &npdu_to(0x55, None), t(5));
        assert_eq!(drops(&out), vec![DropReason::NoDestination]);
    }

    #[test]
    fn node_to_node_nak_is_relayed_not_consumed() {
        let mut hub = hub3();
        let mut req = BvlcMessage::new(9, BvlcPayload::EncapsulatedNpdu(NPDU.to_vec()));
        req.originating = Some(VA);
        let n = nak(&req, ERROR_CLASS_COMMUNICATION, error_code::OTHER, "no");
        assert_eq!(n.destination, Some(VA));
        let out = hub.receive(B, &enc(&n), t(1));
        let r = sent(&out, A);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].originating, Some(VB));
        assert_eq!(r[0].destination, None);
    }

    #[test]
    fn originating_vmac_on_hub_bound_is_accepted_and_reported() {
        let mut hub = hub3();
        let spoof = Vmac([0x02, 6, 6, 6, 6, 6]);
        let mut m = BvlcMessage::new(1, BvlcPayload::EncapsulatedNpdu(NPDU.to_vec()));
        m.originating = Some(spoof);
        m.destination = Some(VB);
        let out = hub.receive(A, &enc(&m), t(1));
        assert_eq!(
            sent(&out, B)[0].originating,
            Some(VA),
            "hub overwrites it with the sender's VMAC"
        );
        assert!(events(&out).contains(&HubEvent::OriginatingVmacPresent {
            conn: A,
            function: function::ENCAPSULATED_NPDU,
            carried: spoof,
            sender: Some(VA)
        }));
        let mut hb = BvlcMessage::new(2, BvlcPayload::HeartbeatRequest);
        hb.originating = Some(VA);
        let out = hub.receive(A, &enc(&hb), t(2));
        assert_eq!(sent(&out, A), vec![BvlcMessage::new(2, BvlcPayload::HeartbeatAck)]);
        assert_eq!(events(&out).len(), 1);
    }

    #[test]
    fn address_resolution_and_advertisement() {
        let mut hub = BscHubCore::new(HubConfig {
            hub_status: HubRole::Failover,
            ..HubConfig::default()
        });
        join(&mut hub, A, VA, UA, t(0));
        let out = hub.receive(A, &enc(&BvlcMessage::new(4, BvlcPayload::AddressResolution)), t(1));
        assert_eq!(
            sent(&out, A),
            vec![BvlcMessage::new(4, BvlcPayload::AddressResolutionAck(vec![]))]
        );
        let out = hub.receive(
            A,
            &enc(&BvlcMessage::new(5, BvlcPayload::AdvertisementSolicitation)),
            t(1),
        );
        assert_eq!(
            sent(&out, A),
            vec![BvlcMessage::new(
                5,
                BvlcPayload::Advertisement {
                    hub_status: HubStatus::ConnectedToFailover,
                    accept_direct: false,
                    max_bvlc: 1600,
                    max_npdu: 1497
                }
            )]
        );
        // Proprietary and unknown functions are NAKed.
        let p = BvlcPayload::Proprietary {
            vendor_id: 555,
            function: 1,
            data: vec![],
        };
        let out = hub.receive(A, &enc(&BvlcMessage::new(6, p)), t(1));
        assert_eq!(
            nak_code(&sent(&out, A)[0]).map(|n| n.2),
            Some(error_code::BVLC_PROPRIETARY_FUNCTION_UNKNOWN)
        );
        let out = hub.receive(A, &[0x42, 0, 0, 6, 1, 2], t(1));
        let r = sent(&out, A);
        assert_eq!(r[0].message_id, 6);
        assert_eq!(
            nak_code(&r[0]),
            Some((0x42, ERROR_CLASS_COMMUNICATION, error_code::BVLC_FUNCTION_UNKNOWN))
        );
    }

    #[test]
    fn malformed_frames() {
        let mut hub = hub3();
        // Shorter than 4 bytes: nothing on the wire, but an event.
        let out = hub.receive(A, &[0x0A, 0], t(1));
        assert_eq!(sends(&out), 0);
        assert_eq!(drops(&out), vec![DropReason::TooShort { len: 2 }]);
        // Heartbeat-Request with a payload: NAK unexpected-data, ID echoed.
        let out = hub.receive(A, &[0x0A, 0, 0x12, 0x34, 0xFF], t(1));
        let r = sent(&out, A);
        assert_eq!(r[0].message_id, 0x1234);
        assert_eq!(nak_code(&r[0]), Some((0x0A, 7, error_code::UNEXPECTED_DATA)));
        assert!(matches!(events(&out)[0], HubEvent::NakSent { error_code: 150, .. }));
        // Truncated destination VMAC: message-incomplete.
        let out = hub.receive(A, &[0x01, 0x04, 0, 1, 2, 3], t(1));
        assert_eq!(
            nak_code(&sent(&out, A)[0]).map(|n| n.2),
            Some(error_code::MESSAGE_INCOMPLETE)
        );
        // Reserved control bits: header-encoding-error.
        let out = hub.receive(A, &[0x01, 0x10, 0, 1, 1], t(1));
        assert_eq!(
            nak_code(&sent(&out, A)[0]).map(|n| n.2),
            Some(error_code::HEADER_ENCODING_ERROR)
        );
        // A malformed response is never NAKed.
        let out = hub.receive(A, &[0x0B, 0, 0, 1, 0xFF], t(1));
        assert_eq!(sends(&out), 0);
        assert!(matches!(
            drops(&out)[0],
            DropReason::MalformedResponse { function: 0x0B, .. }
        ));
        let out = hub.receive(A, &[0x00, 0, 0, 1, 1, 9], t(1));
        assert_eq!(sends(&out), 0);
        assert_eq!(drops(&out).len(), 1);
        // A malformed Connect-Request before connecting is NAKed (connection stays).
        hub.accept(ConnId(9), t(1)).unwrap();
        let out = hub.receive(ConnId(9), &[0x06, 0, 0, 3, 1, 2], t(1));
        assert_eq!(
            nak_code(&sent(&out, ConnId(9))[0]).map(|n| n.2),
            Some(error_code::UNEXPECTED_DATA)
        );
        assert!(closes(&out).is_empty());
    }

    #[test]
    fn unknown_must_understand_option_is_nakked() {
        let mut hub = hub3();
        let opt = HeaderOption {
            must_understand: true,
            kind: HeaderOptionKind::Unknown {
                option_type: 5,
                data: None,
            },
        };
        let mut m = BvlcMessage::new(0x77, BvlcPayload::HeartbeatRequest);
        m.destination_options = vec![opt.clone()];
        let out = hub.receive(A, &enc(&m), t(1));
        let r = sent(&out, A);
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0],
            nak_for_option(
                &BvlcMessage {
                    destination: None,
                    ..m.clone()
                },
                &opt,
                match &r[0].payload {
                    BvlcPayload::Result {
                        result: BvlcResult::Nak { details, .. },
                        ..
                    } => details,
                    _ => panic!("not a NAK"),
                }
            )
        );
        assert_eq!(nak_code(&r[0]).map(|n| n.2), Some(error_code::HEADER_NOT_UNDERSTOOD));
        // Secure Path and non-must-understand options are fine.
        m.destination_options = vec![
            HeaderOption::secure_path(),
            HeaderOption {
                must_understand: false,
                kind: HeaderOptionKind::Unknown {
                    option_type: 5,
                    data: None,
                },
            },
        ];
        let out = hub.receive(A, &enc(&m), t(1));
        assert_eq!(sent(&out, A), vec![BvlcMessage::new(0x77, BvlcPayload::HeartbeatAck)]);
        // A relayed message keeps its options; the destination node judges them.
        let mut n = BvlcMessage::new(1, BvlcPayload::EncapsulatedNpdu(NPDU.to_vec()));
        n.destination = Some(VB);
        n.data_options = vec![opt];
        let out = hub.receive(A, &enc(&n), t(1));
        assert_eq!(sent(&out, B)[0].data_options, n.data_options);
    }

    #[test]
    fn connect_wait_timeout() {
        let mut hub = BscHubCore::new(HubConfig::default());
        assert_eq!(hub.poll_timeout(), None);
        hub.accept(A, t(100)).unwrap();
        assert_eq!(hub.poll_timeout(), Some(t(110)));
        assert!(hub.tick(t(109)).is_empty());
        let out = hub.tick(t(110));
        assert_eq!(closes(&out), vec![(A, CloseReason::ConnectWaitTimeout)]);
        assert!(events(&out).contains(&HubEvent::ConnectWaitExpired { conn: A }));
        assert_eq!(hub.poll_timeout(), None);
    }

    #[test]
    fn heartbeat_timeout_drops_silent_peer() {
        let cfg = HubConfig {
            heartbeat_timeout: t(60),
            ..HubConfig::default()
        };
        let mut hub = BscHubCore::new(cfg);
        join(&mut hub, A, VA, UA, t(0));
        join(&mut hub, B, VB, UB, t(0));
        assert_eq!(hub.poll_timeout(), Some(t(120)));
        // B keeps talking, A goes silent.
        hub.receive(B, &enc(&BvlcMessage::new(1, BvlcPayload::HeartbeatRequest)), t(100));
        assert!(hub.tick(t(119)).is_empty());
        let out = hub.tick(t(120));
        assert_eq!(closes(&out), vec![(A, CloseReason::HeartbeatTimeout)]);
        assert!(events(&out).contains(&HubEvent::SilentPeerDropped {
            conn: A,
            vmac: VA,
            silent_for: t(120)
        }));
        assert_eq!(hub.connection_of(VA), None);
        assert_eq!(hub.poll_timeout(), Some(t(220)));
        // A's VMAC is free again for anyone.
        let out = join(&mut hub, C, VA, UC, t(130));
        assert!(matches!(sent(&out, C)[0].payload, BvlcPayload::ConnectAccept { .. }));
    }

    #[test]
    fn broadcast_rate_limit() {
        let mut hub = BscHubCore::new(HubConfig {
            broadcast_rate_limit: Some(2),
            ..HubConfig::default()
        });
        join(&mut hub, A, VA, UA, t(0));
        join(&mut hub, B, VB, UB, t(0));
        let bc = npdu_to(1, Some(Vmac::BROADCAST));
        let now = Duration::from_millis(1500);
        assert_eq!(sends(&hub.receive(A, &bc, now)), 1);
        assert_eq!(sends(&hub.receive(A, &bc, now)), 1);
        let out = hub.receive(A, &bc, now + Duration::from_millis(999));
        assert_eq!(sends(&out), 0);
        assert_eq!(drops(&out), vec![DropReason::RateLimited { vmac: VA, limit: 2 }]);
        // Per VMAC: B is unaffected; unicast is not limited; the window resets.
        assert_eq!(sends(&hub.receive(B, &bc, now)), 1);
        assert_eq!(sends(&hub.receive(A, &npdu_to(2, Some(VB)), now)), 1);
        assert_eq!(sends(&hub.receive(A, &bc, now + t(1))), 1);
    }

    #[test]
    fn size_limits() {
        let mut hub = BscHubCore::new(HubConfig {
            max_npdu: 10,
            ..HubConfig::default()
        });
        join(&mut hub, A, VA, UA, t(0));
        // B advertises a tiny MaxBVLC.
        hub.accept(B, t(0)).unwrap();
        let small = BvlcPayload::ConnectRequest {
            vmac: VB,
            uuid: UB,
            max_bvlc: 20,
            max_npdu: 10,
        };
        hub.receive(B, &enc(&BvlcMessage::new(1, small)), t(0));
        let mut m = BvlcMessage::new(3, BvlcPayload::EncapsulatedNpdu(vec![1; 11]));
        m.destination = Some(VB);
        let out = hub.receive(A, &enc(&m), t(1));
        assert_eq!(
            nak_code(&sent(&out, A)[0]).map(|n| n.2),
            Some(error_code::MESSAGE_TOO_LONG)
        );
        m.payload = BvlcPayload::EncapsulatedNpdu(vec![1; 9]);
        // 4 + 6 + 9 = 19 bytes fits; after forwarding 4 + 6 + 9 = 19 still fits.
        assert_eq!(sent(&hub.receive(A, &enc(&m), t(1)), B).len(), 1);
        // Broadcast grows by the kept destination: 4 + 12 + 9 = 25 > 20.
        m.destination = Some(Vmac::BROADCAST);
        let out = hub.receive(A, &enc(&m), t(1));
        assert_eq!(sends(&out), 0);
        assert_eq!(
            drops(&out),
            vec![DropReason::ExceedsPeerMaxBvlc {
                to: B,
                len: 25,
                max: 20
            }]
        );
    }

    #[test]
    fn second_connect_request_is_dropped() {
        let mut hub = hub3();
        let out = hub.receive(A, &connect_req(8, VA, UA), t(1));
        assert_eq!(sends(&out), 0);
        assert_eq!(drops(&out), vec![DropReason::AlreadyConnected]);
    }

    /// Deterministic xorshift.
    struct Rng(rand_chacha::ChaCha8Rng);
    impl Rng {
        fn next(&mut self) -> u64 {
            rand::RngCore::next_u64(&mut self.0)
        }
    }

    #[test]
    fn random_bytes_never_panic_and_every_frame_is_answered_or_reported() {
        let mut rng = Rng(rand::SeedableRng::seed_from_u64(0xDEAD_BEEF_CAFE_F00D));
        let mut hub = BscHubCore::new(HubConfig {
            broadcast_rate_limit: Some(50),
            ..HubConfig::default()
        });
        let node = |k: u64| Vmac([0x02, 0, 0, 0, 0, k as u8]);
        let mut now = Duration::ZERO;
        for _ in 0..50_000u64 {
            now += Duration::from_millis(rng.next() % 50);
            let conn = ConnId(rng.next() % 8);
            match rng.next() % 32 {
                0 => {
                    hub.closed(conn, now);
                    continue;
                }
                1 => {
                    hub.tick(now);
                    continue;
                }
                _ => {}
            }
            if hub.vmac_of(conn).is_none() && !rng.next().is_multiple_of(4) {
                let _ = hub.accept(conn, now);
                let (v, u) = (node(rng.next() % 4), DeviceUuid([(rng.next() % 5) as u8; 16]));
                if !rng.next().is_multiple_of(4) {
                    hub.receive(conn, &connect_req(1, v, u), now);
                }
            }
            let mut frame = match rng.next() % 8 {
                0 => connect_req(1, node(rng.next() % 4), DeviceUuid([(rng.next() % 5) as u8; 16])),
                1 => npdu_to(2, Some(node(rng.next() % 5))),
                2 => npdu_to(3, Some(Vmac::BROADCAST)),
                3 => enc(&BvlcMessage::new(4, BvlcPayload::HeartbeatRequest)),
                4 if rng.next().is_multiple_of(8) => enc(&BvlcMessage::new(5, BvlcPayload::DisconnectRequest)),
                _ => {
                    let n = (rng.next() % 40) as usize;
                    (0..n).map(|_| rng.next() as u8).collect()
                }
            };
            if !frame.is_empty() && rng.next().is_multiple_of(4) {
                let j = (rng.next() as usize) % frame.len();
                frame[j] ^= 1 << (rng.next() % 8);
                frame.truncate((rng.next() as usize) % (frame.len() + 1));
            }
            let out = hub.receive(conn, &frame, now);
            // Never silent: every frame gives at least one output.
            assert!(!out.is_empty(), "frame {frame:02X?} produced nothing");
            for o in &out {
                if let HubOutput::Send { frame, .. } = o {
                    let m = decode(frame).expect("hub only sends valid frames");
                    if let Some(n) = nak_code(&m) {
                        assert!(!is_response(n.0), "NAKed a response: {m:?}");
                    }
                }
            }
            // Invariant: the VMAC map points at live, connected connections.
            for (v, c) in &hub.by_vmac {
                assert_eq!(hub.vmac_of(*c), Some(*v));
            }
        }
        let s = hub.stats();
        assert!(s.frames_in > 40_000);
        assert!(s.naks_sent > 0 && s.dropped > 0 && s.closed_by_hub > 0);
        assert!(
            s.unicast_forwarded > 1000 && s.broadcast_deliveries > 1000,
            "fuzz reached forwarding"
        );
    }
}
