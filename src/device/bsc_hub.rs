//! The BACnet/SC hub server: WebSocket (`ws://`) or WebSocket over TLS 1.3 with mutual
//! authentication (`wss://`) around the sans-IO [`BscHubCore`].
//!
//! # Shape
//!
//! * **Own runtime, own thread.** [`HubServer::start`] spawns a thread running a
//!   multi-thread tokio runtime. The hub then behaves the same under actix (whose arbiters
//!   are single-threaded: fan-out would compete with every actor on one thread), under a
//!   plain `#[tokio::test]` (current-thread), and in `hilbench sim`; and its CPU time can be
//!   measured on its own ([`HubHandle::cpu_time`]), which is the figure that matters for a
//!   hub (a load generator on the same machine costs as much again).
//! * **One task owns the core.** Connection tasks send every binary message to it through
//!   one bounded channel (which is also the backpressure on a sender faster than the hub);
//!   it drains that channel in batches (`recv_many`), so a burst costs one wake-up.
//! * **Per-connection outbox** instead of a channel per connection: a mutex-guarded `Vec`
//!   of frames and a `Notify`. The hub task stages frames per connection during a batch
//!   (no lock) and, at the end of the batch, moves them into each touched outbox with one
//!   lock and wakes its writer once; the connection's writer swaps the whole `Vec`
//!   out, feeds every frame to tungstenite and flushes once, so one write (one TLS record
//!   run) carries everything queued. No allocation per delivery in steady state: the core's
//!   `Arc<[u8]>` is wrapped once per distinct frame into a `Bytes` (what tungstenite sends),
//!   and every receiver gets a reference-count bump of it. The writer is a task of its own,
//!   so waking it does not also poll the connection's reader.
//! * **Small idle connections** (7 kB with `ws://`, 18 kB with `wss://` at 10,000 held):
//!   handshake futures are boxed and freed when done, tungstenite's buffers are 2 KiB (read)
//!   and 8 KiB (write threshold) instead of 128 KiB, and nothing is preallocated per
//!   connection for bursts it may never get.
//! * **Slow consumers**: the outbox holds at most `queue_depth` frames. Past that, frames
//!   for that receiver only are dropped, counted (`drops.slow_consumer`), logged at the start
//!   of each episode and reported as [`HubServerEvent::SlowConsumer`]; a receiver that stays
//!   full for `slow_consumer_close_after` is closed (1008). Nobody else waits for it.
//! * **Admission**: at most `max_handshakes` TLS/WebSocket handshakes in flight (excess TCP
//!   connections are closed at once: refusing must be cheaper than a handshake), at most
//!   `max_connections` WebSockets (HTTP 503 in the handshake), the subprotocol
//!   `hub.bsc.bacnet.org` required (HTTP 400). Every refusal is counted, logged and reported.
//! * **Size caps** before parsing: tungstenite's message and frame limits are set to
//!   `max_message` (default 8 KiB, MaxBVLC up to 6000 plus headroom; the library default is
//!   64 MiB), so an oversized message closes the connection (1009) without buffering it.
//!   Messages between MaxBVLC and `max_message` reach the core, which NAKs them.
//! * **Timers**: the hub task sleeps until [`BscHubCore::poll_timeout`] and calls `tick`.
//!   `poll_timeout` scans every connection, so under load it is recomputed at most every
//!   [`TIMER_SLACK`] (a deadline can only come earlier through a connect, and the slack bounds
//!   how late that is noticed).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify, Semaphore};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::device::bsc_hub_core::{
    BscHubCore, CertIdentity, CloseReason, ConnId, DropReason, HubConfig, HubEvent, HubOutput, HubRole,
};
use crate::protocol::bvlc_sc::{DeviceUuid, Vmac};
use crate::limits::{LogEvery, REFUSAL_LOG_PERIOD};
use crate::link::stream::ConnFaults;
use crate::transport::tls::{TlsDir, TlsError};

/// The WebSocket subprotocol a node uses towards a hub (Annex AB).
pub const HUB_SUBPROTOCOL: &str = "hub.bsc.bacnet.org";
/// Longest a recomputed timer deadline can be stale (see the module docs).
pub const TIMER_SLACK: Duration = Duration::from_millis(50);
/// Most inbound messages the hub task takes per wake-up.
const BATCH: usize = 512;
/// Time a closing connection gets to finish the close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// tungstenite's read buffer per connection (its default is 128 KiB).
const READ_BUFFER: usize = 2 * 1024;
/// Bytes tungstenite gathers before writing to the socket; a flush writes the rest.
const WRITE_BUFFER: usize = 8 * 1024;

/// The hub's certificate, key and the CA client certificates must chain to.
pub type HubTls = TlsDir;
pub use crate::transport::tls::ClientCertPolicy;

/// Everything [`HubServer::start`] needs.
#[derive(Debug, Clone)]
pub struct HubServerConfig {
    /// Address to listen on; port 0 picks a free port ([`HubHandle::local_addr`]).
    pub listen: SocketAddr,
    /// `None`: plaintext `ws://` (tests, captures). `Some`: `wss://`, TLS 1.3, client
    /// certificate required and checked against `ca` only.
    pub tls: Option<HubTls>,
    /// What a client certificate needs beyond a chain to the CA (with `tls`).
    pub client_certs: ClientCertPolicy,
    /// The hub function. Its `max_connections` is replaced by [`Self::max_connections`].
    pub core: HubConfig,
    /// Largest WebSocket message and frame accepted, bytes (must be ≥ `core.max_bvlc`).
    pub max_message: usize,
    /// WebSockets open at once; more get HTTP 503.
    pub max_connections: usize,
    /// TLS + WebSocket handshakes in progress at once; more TCP connections are closed.
    pub max_handshakes: usize,
    /// Of those, how many one source address may hold once the hub is
    /// busy (no more than `reserved_handshakes` free), and always for a
    /// source whose handshake timed out in the last minute: a few slow or
    /// hostile peers cannot take every slot (slowloris).
    pub max_handshakes_per_source: usize,
    /// Slots kept for sources holding fewer than `max_handshakes_per_source`.
    pub reserved_handshakes: usize,
    /// Time from accepting a TCP connection to its first byte (a ClientHello
    /// or an HTTP request line).
    pub first_byte_timeout: Duration,
    /// Time for each handshake phase after that: TLS, then the WebSocket upgrade.
    pub handshake_timeout: Duration,
    /// Frames queued per receiver before its frames are dropped.
    pub queue_depth: usize,
    /// A receiver whose queue stays full this long is closed; `None`: drop only.
    pub slow_consumer_close_after: Option<Duration>,
    /// Worker threads of the hub's runtime.
    pub worker_threads: usize,
    /// Events buffered per subscriber before it lags (see [`HubHandle::subscribe`]).
    pub event_capacity: usize,
    /// Carry every accepted connection through these connection faults (a
    /// scenario hub's link); `None` for `sim` and load tests.
    pub connection_faults: Option<Arc<ConnFaults>>,
}

impl Default for HubServerConfig {
    fn default() -> Self {
        HubServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            client_certs: ClientCertPolicy::default(),
            core: HubConfig::default(),
            max_message: 8 * 1024,
            max_connections: 1024,
            max_handshakes: 64,
            max_handshakes_per_source: 8,
            reserved_handshakes: 16,
            first_byte_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            queue_depth: 1024,
            slow_consumer_close_after: Some(Duration::from_secs(30)),
            worker_threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            event_capacity: 4096,
            connection_faults: None,
        }
    }
}

/// Why a connection attempt did not become a hub connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefuseReason {
    /// `max_handshakes` handshakes already in progress (TCP closed at once).
    HandshakesBusy,
    /// Its source address already holds `max_handshakes_per_source` of them.
    SourceBusy,
    /// `max_connections` WebSockets open (HTTP 503).
    AtCapacity,
    /// Subprotocol missing or not `hub.bsc.bacnet.org` (HTTP 400); what was offered.
    Subprotocol { offered: Option<String> },
    /// TLS handshake failed (no client certificate, unknown CA, not TLS 1.3, …).
    Tls(String),
    /// Not a valid WebSocket upgrade.
    Handshake(String),
    /// Handshake not done within `handshake_timeout`.
    HandshakeTimeout,
}

impl RefuseReason {
    /// Its place among the kinds of refusal (each kind logs on its own).
    fn kind_index(&self) -> usize {
        match self {
            RefuseReason::HandshakesBusy => 0,
            RefuseReason::AtCapacity => 1,
            RefuseReason::Subprotocol { .. } => 2,
            RefuseReason::Tls(_) => 3,
            RefuseReason::Handshake(_) => 4,
            RefuseReason::HandshakeTimeout => 5,
            RefuseReason::SourceBusy => 6,
        }
    }
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefuseReason::HandshakesBusy => write!(f, "too many handshakes in progress"),
            RefuseReason::SourceBusy => write!(f, "too many handshakes in progress from this address"),
            RefuseReason::AtCapacity => write!(f, "hub full (HTTP 503)"),
            RefuseReason::Subprotocol { offered: None } => {
                write!(f, "no subprotocol offered, {HUB_SUBPROTOCOL} required (HTTP 400)")
            }
            RefuseReason::Subprotocol { offered: Some(o) } => {
                write!(f, "subprotocol {o:?} offered, {HUB_SUBPROTOCOL} required (HTTP 400)")
            }
            RefuseReason::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            RefuseReason::Handshake(e) => write!(f, "WebSocket handshake failed: {e}"),
            RefuseReason::HandshakeTimeout => write!(f, "handshake timed out"),
        }
    }
}

/// Why the shell (not the core) ended a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellCloseReason {
    /// A TEXT message (close 1003).
    TextFrame,
    /// A message or frame over `max_message` (close 1009).
    Oversize,
    /// Queue full for `slow_consumer_close_after` (close 1008).
    SlowConsumer,
    /// Core refused admission although the shell admitted it (close 1013).
    CoreRefused(String),
    /// The hub is shutting down (close 1001).
    Shutdown,
}

/// What the hub observed; subscribe with [`HubHandle::subscribe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubServerEvent {
    /// A WebSocket was admitted and handed to the core.
    Accepted { conn: ConnId, peer: SocketAddr },
    Refused { peer: SocketAddr, reason: RefuseReason },
    /// Everything the hub function reports: connects, NAKs, drops, timeouts, closes.
    Core(HubEvent),
    /// The hub closed a connection (core decision).
    ClosedByHub { conn: ConnId, reason: CloseReason },
    /// The shell closed a connection.
    ClosedByShell { conn: ConnId, reason: ShellCloseReason },
    /// A receiver's queue overflowed: the first drop of an episode.
    SlowConsumer { conn: ConnId, vmac: Option<Vmac>, queue_depth: usize },
    /// A slow receiver caught up; `dropped` frames were lost meanwhile.
    SlowConsumerRecovered { conn: ConnId, dropped: u64 },
    /// The socket is gone (any cause); `error` if it ended on an I/O or protocol error.
    Ended { conn: ConnId, peer: SocketAddr, error: Option<String> },
}

/// Frames not delivered, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DropCounts {
    /// Receiver's queue full.
    pub slow_consumer: u64,
    pub unknown_destination: u64,
    pub no_receivers: u64,
    pub rate_limited: u64,
    pub exceeds_peer_max_bvlc: u64,
    /// Other drops by the core (too short, unsolicited, malformed responses, …).
    pub other: u64,
}

/// Connection attempts refused, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RefusedCounts {
    pub handshakes_busy: u64,
    pub source_busy: u64,
    pub at_capacity: u64,
    pub subprotocol: u64,
    pub tls: u64,
    pub handshake: u64,
    pub timeout: u64,
}

/// Running totals, read without involving the hub task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HubServerStats {
    /// WebSockets open now.
    pub connections: u64,
    /// WebSockets admitted since start.
    pub accepted: u64,
    /// Binary messages received.
    pub frames_in: u64,
    /// Frames queued to receivers (forwarded copies and the hub's own replies).
    pub deliveries: u64,
    pub broadcast_deliveries: u64,
    pub unicast_forwarded: u64,
    /// Frames written to sockets, and the flushes that carried them (batching factor).
    pub frames_written: u64,
    pub flushes: u64,
    pub naks_sent: u64,
    /// Connections the core closed (timeouts, duplicates, disconnects, replacements).
    pub closed_by_hub: u64,
    pub closed_text_frame: u64,
    pub closed_oversize: u64,
    pub closed_slow_consumer: u64,
    pub drops: DropCounts,
    pub refused: RefusedCounts,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    accepted: AtomicU64,
    frames_in: AtomicU64,
    deliveries: AtomicU64,
    broadcast_deliveries: AtomicU64,
    unicast_forwarded: AtomicU64,
    frames_written: AtomicU64,
    flushes: AtomicU64,
    naks_sent: AtomicU64,
    closed_by_hub: AtomicU64,
    closed_text_frame: AtomicU64,
    closed_oversize: AtomicU64,
    closed_slow_consumer: AtomicU64,
    drop_slow_consumer: AtomicU64,
    drop_unknown_destination: AtomicU64,
    drop_no_receivers: AtomicU64,
    drop_rate_limited: AtomicU64,
    drop_exceeds_peer_max_bvlc: AtomicU64,
    drop_other: AtomicU64,
    refused_handshakes_busy: AtomicU64,
    refused_source_busy: AtomicU64,
    refused_at_capacity: AtomicU64,
    refused_subprotocol: AtomicU64,
    refused_tls: AtomicU64,
    refused_handshake: AtomicU64,
    refused_timeout: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> HubServerStats {
        let g = |a: &AtomicU64| a.load(Relaxed);
        HubServerStats {
            connections: g(&self.connections),
            accepted: g(&self.accepted),
            frames_in: g(&self.frames_in),
            deliveries: g(&self.deliveries),
            broadcast_deliveries: g(&self.broadcast_deliveries),
            unicast_forwarded: g(&self.unicast_forwarded),
            frames_written: g(&self.frames_written),
            flushes: g(&self.flushes),
            naks_sent: g(&self.naks_sent),
            closed_by_hub: g(&self.closed_by_hub),
            closed_text_frame: g(&self.closed_text_frame),
            closed_oversize: g(&self.closed_oversize),
            closed_slow_consumer: g(&self.closed_slow_consumer),
            drops: DropCounts {
                slow_consumer: g(&self.drop_slow_consumer),
                unknown_destination: g(&self.drop_unknown_destination),
                no_receivers: g(&self.drop_no_receivers),
                rate_limited: g(&self.drop_rate_limited),
                exceeds_peer_max_bvlc: g(&self.drop_exceeds_peer_max_bvlc),
                other: g(&self.drop_other),
            },
            refused: RefusedCounts {
                handshakes_busy: g(&self.refused_handshakes_busy),
                source_busy: g(&self.refused_source_busy),
                at_capacity: g(&self.refused_at_capacity),
                subprotocol: g(&self.refused_subprotocol),
                tls: g(&self.refused_tls),
                handshake: g(&self.refused_handshake),
                timeout: g(&self.refused_timeout),
            },
        }
    }

    fn refused(&self, r: &RefuseReason) -> &AtomicU64 {
        match r {
            RefuseReason::HandshakesBusy => &self.refused_handshakes_busy,
            RefuseReason::SourceBusy => &self.refused_source_busy,
            RefuseReason::AtCapacity => &self.refused_at_capacity,
            RefuseReason::Subprotocol { .. } => &self.refused_subprotocol,
            RefuseReason::Tls(_) => &self.refused_tls,
            RefuseReason::Handshake(_) => &self.refused_handshake,
            RefuseReason::HandshakeTimeout => &self.refused_timeout,
        }
    }
}

/// State shared by the listener, the hub task and the connection tasks.
struct Shared {
    counters: Counters,
    events: broadcast::Sender<HubServerEvent>,
    /// OS thread ids of the runtime's threads, for [`HubHandle::cpu_time`].
    tids: Mutex<Vec<i32>>,
    /// One line per kind of refusal per period, with a count, however many
    /// peers are refused (a flood wrote 176,258 lines in two minutes).
    refuse_logs: Mutex<[LogEvery; 7]>,
    /// Handshakes in progress per source address.
    handshaking: Mutex<HashMap<IpAddr, usize>>,
    /// Sources whose handshake timed out, and when it last did.
    misbehaving: Mutex<HashMap<IpAddr, Instant>>,
}

/// How long a source whose handshake timed out is held to its share.
const MISBEHAVING_FOR: Duration = Duration::from_secs(60);
/// Sources remembered as misbehaving, at most (oldest forgotten first).
const MAX_MISBEHAVING: usize = 10_000;

/// A handshake in progress: one of `max_handshakes`, one of its source's
/// `max_handshakes_per_source`. Both free when it is dropped.
struct HandshakeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    source: IpAddr,
    shared: Arc<Shared>,
}

impl Shared {
    /// Counts a handshake for `source`, unless it must keep to its share
    /// (`strict`: the hub is busy, or the source misbehaved) and holds it.
    fn enter_source(&self, source: IpAddr, share: usize, busy: bool) -> bool {
        let strict = busy || self.misbehaved(source);
        let mut h = self.handshaking.lock().unwrap_or_else(|p| p.into_inner());
        let n = h.entry(source).or_insert(0);
        if strict && *n >= share {
            return false;
        }
        *n += 1;
        true
    }

    fn misbehaved(&self, source: IpAddr) -> bool {
        let m = self.misbehaving.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&source).is_some_and(|t| t.elapsed() < MISBEHAVING_FOR)
    }

    /// A handshake from `source` timed out: hold it to its share for a while.
    fn misbehaves(&self, source: IpAddr) {
        let mut m = self.misbehaving.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_MISBEHAVING {
            m.retain(|_, t| t.elapsed() < MISBEHAVING_FOR);
            if m.len() >= MAX_MISBEHAVING {
                if let Some(oldest) = m.iter().min_by_key(|(_, t)| **t).map(|(ip, _)| *ip) {
                    m.remove(&oldest);
                }
            }
        }
        m.insert(source, Instant::now());
    }

    fn leave_source(&self, source: IpAddr) {
        let mut h = self.handshaking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = h.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                h.remove(&source);
            }
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.shared.leave_source(self.source);
    }
}

impl Shared {
    fn emit(&self, ev: impl FnOnce() -> HubServerEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(ev());
        }
    }

    fn refuse(&self, peer: SocketAddr, reason: RefuseReason) {
        self.counters.refused(&reason).fetch_add(1, Relaxed);
        if matches!(reason, RefuseReason::HandshakeTimeout) {
            self.misbehaves(peer.ip());
        }
        let logged = self.refuse_logs.lock().map(|mut l| l[reason.kind_index()].check(Instant::now()));
        match logged {
            Ok(Some(0)) => tracing::warn!(%peer, "refused: {reason}"),
            Ok(Some(more)) => tracing::warn!(%peer, "refused: {reason} (and {more} more of this kind since the last such line)"),
            Ok(None) | Err(_) => tracing::debug!(%peer, "refused: {reason}"),
        }
        self.emit(|| HubServerEvent::Refused { peer, reason });
    }
}

/// Frames waiting for one connection's writer.
struct OutQueue {
    frames: Vec<Bytes>,
    close: Option<CloseFrame>,
    /// No more frames are accepted (closing or gone).
    shut: bool,
    /// Current overflow episode: when it began and frames dropped since.
    full_since: Option<Instant>,
    dropped: u64,
}

struct Outbox {
    queue: Mutex<OutQueue>,
    /// Frames or a close were queued.
    notify: Notify,
    /// A close was queued: the connection gets [`CLOSE_GRACE`] to finish, then is dropped
    /// (a writer stuck on a peer that stopped reading never gets the close frame out).
    closing: Notify,
}

impl Outbox {
    fn new() -> Self {
        Outbox {
            queue: Mutex::new(OutQueue { frames: Vec::new(), close: None, shut: false, full_since: None, dropped: 0 }),
            notify: Notify::new(),
            closing: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutQueue> {
        // A panicking writer cannot leave the queue inconsistent (plain Vec/Option moves).
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a close frame after whatever is queued; later frames are refused.
    fn close(&self, code: CloseCode, reason: &str) {
        let mut q = self.lock();
        if !q.shut {
            q.shut = true;
            q.close = Some(CloseFrame { code, reason: reason.to_owned().into() });
        }
        drop(q);
        self.notify.notify_one();
        self.closing.notify_one();
    }

    /// Stop the writer without a close frame (the socket is finished).
    fn finish(&self) {
        self.lock().shut = true;
        self.notify.notify_one();
    }
}

/// Multiplicative hash for sequential [`ConnId`]s (SipHash is needless work per delivery).
#[derive(Default)]
struct ConnIdHasher(u64);

impl Hasher for ConnIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ConnMap<V> = HashMap<ConnId, V, BuildHasherDefault<ConnIdHasher>>;

enum Inbound {
    Open { conn: ConnId, outbox: Arc<Outbox>, peer: SocketAddr, cert: Option<CertIdentity> },
    Frame(ConnId, Bytes),
    Closed(ConnId),
}

/// Starts hub servers.
pub struct HubServer;

/// A running hub. Dropping it shuts the hub down (without waiting).
pub struct HubHandle {
    local_addr: SocketAddr,
    tls: bool,
    role: HubRole,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    done: Option<oneshot::Receiver<()>>,
}

/// Why [`HubServer::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum HubStartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("invalid hub configuration: {0}")]
    Config(String),
    #[error("cannot start the hub runtime: {0}")]
    Runtime(std::io::Error),
}

impl HubServer {
    /// Bind, load TLS material, and serve on a dedicated thread. Returns once the hub is
    /// listening. Callable from any async context (tokio, actix).
    pub async fn start(cfg: HubServerConfig) -> Result<HubHandle, HubStartError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        Self::spawn(cfg, ready_tx)?;
        ready_rx.await.map_err(|_| HubStartError::Config("hub thread ended during start".into()))?
    }

    /// [`start`](Self::start) for synchronous callers (not from inside an async task).
    pub fn start_blocking(cfg: HubServerConfig) -> Result<HubHandle, HubStartError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        Self::spawn(cfg, ready_tx)?;
        ready_rx
            .blocking_recv()
            .map_err(|_| HubStartError::Config("hub thread ended during start".into()))?
    }

    fn spawn(
        mut cfg: HubServerConfig,
        ready: oneshot::Sender<Result<HubHandle, HubStartError>>,
    ) -> Result<(), HubStartError> {
        if cfg.max_message < usize::from(cfg.core.max_bvlc) {
            return Err(HubStartError::Config(format!(
                "max_message {} is below MaxBVLC {}: the hub could not receive what it advertises",
                cfg.max_message, cfg.core.max_bvlc
            )));
        }
        for (name, v) in [
            ("max_connections", cfg.max_connections),
            ("max_handshakes", cfg.max_handshakes),
            ("max_handshakes_per_source", cfg.max_handshakes_per_source),
            ("queue_depth", cfg.queue_depth),
            ("worker_threads", cfg.worker_threads),
            ("event_capacity", cfg.event_capacity),
        ] {
            if v == 0 {
                return Err(HubStartError::Config(format!("{name} must be at least 1")));
            }
        }
        cfg.core.max_connections = cfg.max_connections;
        let tls = match &cfg.tls {
            Some(dir) => Some(tokio_rustls::TlsAcceptor::from(dir.server_config_with(cfg.client_certs)?)),
            None => None,
        };
        let (events, _) = broadcast::channel(cfg.event_capacity);
        let refuse_logs = Mutex::new(std::array::from_fn(|_| LogEvery::new(REFUSAL_LOG_PERIOD)));
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            events,
            tids: Mutex::new(Vec::new()),
            refuse_logs,
            handshaking: Mutex::new(HashMap::new()),
            misbehaving: Mutex::new(HashMap::new()),
        });
        let tids = shared.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.worker_threads)
            .thread_name("bsc-hub")
            .enable_all()
            .on_thread_start(move || {
                let tid = nix::unistd::gettid().as_raw();
                tids.tids.lock().unwrap_or_else(|p| p.into_inner()).push(tid);
            })
            .build()
            .map_err(HubStartError::Runtime)?;
        std::thread::Builder::new()
            .name("bsc-hub-main".into())
            .spawn(move || {
                let main_tid = nix::unistd::gettid().as_raw();
                shared.tids.lock().unwrap_or_else(|p| p.into_inner()).push(main_tid);
                rt.block_on(serve(cfg, tls, shared, ready));
                rt.shutdown_timeout(CLOSE_GRACE);
            })
            .map_err(HubStartError::Runtime)?;
        Ok(())
    }
}

impl HubHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `ws://IP:PORT` or `wss://IP:PORT`; an unspecified listen address becomes loopback
    /// (the test hub certificate's SAN is `IP:127.0.0.1`).
    pub fn url(&self) -> String {
        let ip = match self.local_addr.ip() {
            IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}", SocketAddr::new(ip, self.local_addr.port()))
    }

    pub fn role(&self) -> HubRole {
        self.role
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn stats(&self) -> HubServerStats {
        self.shared.counters.snapshot()
    }

    /// Events from now on. A subscriber more than `event_capacity` events behind loses
    /// the oldest (`RecvError::Lagged`); the hub never waits for subscribers.
    pub fn subscribe(&self) -> broadcast::Receiver<HubServerEvent> {
        self.shared.events.subscribe()
    }

    /// CPU time (user + system) used by the hub's threads so far; `None` where
    /// `/proc/self/task` is unavailable.
    pub fn cpu_time(&self) -> Option<Duration> {
        let tids = self.shared.tids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut total = Duration::ZERO;
        for tid in tids {
            // schedstat: nanoseconds on CPU; a thread that has exited simply counts no more.
            if let Ok(s) = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")) {
                total += Duration::from_nanos(s.split_whitespace().next()?.parse().ok()?);
            }
        }
        Some(total)
    }

    /// Close every connection (1001), stop listening and wait for the hub thread's runtime
    /// to finish.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }

    /// [`shutdown`](Self::shutdown) for synchronous callers.
    pub fn shutdown_blocking(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(done) = self.done.take() {
            let _ = done.blocking_recv();
        }
    }
}

impl Drop for HubHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn serve(
    cfg: HubServerConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    ready: oneshot::Sender<Result<HubHandle, HubStartError>>,
) {
    let listener = match TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(source) => {
            let _ = ready.send(Err(HubStartError::Listen { addr: cfg.listen, source }));
            return;
        }
    };
    let local_addr = match listener.local_addr() {
        Ok(a) => a,
        Err(source) => {
            let _ = ready.send(Err(HubStartError::Listen { addr: cfg.listen, source }));
            return;
        }
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (done_tx, done_rx) = oneshot::channel();
    let handle = HubHandle {
        local_addr,
        tls: tls.is_some(),
        role: cfg.core.hub_status,
        shared: shared.clone(),
        shutdown: shutdown_tx,
        done: Some(done_rx),
    };
    tracing::info!(url = %handle.url(), role = ?cfg.core.hub_status, "BACnet/SC hub listening");
    if ready.send(Ok(handle)).is_err() {
        return;
    }
    let (in_tx, in_rx) = mpsc::channel(BATCH * 8);
    let hub = tokio::spawn(hub_task(cfg.clone(), in_rx, shared.clone(), shutdown_rx.clone()));
    accept_loop(listener, tls, cfg, in_tx, shared, shutdown_rx).await;
    let _ = hub.await;
    // The runtime is shut down by the thread once this returns; `done` fires when `serve`
    // ends, so a caller awaiting `shutdown()` knows connections were closed.
    let _ = done_tx.send(());
}

struct ConnSettings {
    ws: WebSocketConfig,
    first_byte_timeout: Duration,
    handshake_timeout: Duration,
    max_connections: u64,
    queue_depth: usize,
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cfg: HubServerConfig,
    in_tx: mpsc::Sender<Inbound>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let handshakes = Arc::new(Semaphore::new(cfg.max_handshakes));
    let mut accept_log = LogEvery::new(REFUSAL_LOG_PERIOD);
    let next_id = Arc::new(AtomicU64::new(1));
    // Small buffers: an idle connection holds its read buffer (tungstenite zero-fills it
    // on every read attempt, so it is resident) and the high-water mark of its write
    // buffer. SC frames are small; a larger message reserves what it needs.
    let ws = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        // Bounded: a peer that stops reading cannot grow tungstenite's buffer past this.
        .max_write_buffer_size(WRITE_BUFFER + cfg.queue_depth.saturating_mul(cfg.max_message + 14))
        .max_message_size(Some(cfg.max_message))
        .max_frame_size(Some(cfg.max_message));
    let settings = Arc::new(ConnSettings {
        ws,
        first_byte_timeout: cfg.first_byte_timeout,
        handshake_timeout: cfg.handshake_timeout,
        max_connections: cfg.max_connections as u64,
        queue_depth: cfg.queue_depth,
    });
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    if let Some(more) = accept_log.check(Instant::now()) {
                        tracing::warn!("accept failed: {e} ({more} more since the last line)");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let source = peer.ip();
        let busy = handshakes.available_permits() <= cfg.reserved_handshakes;
        if !shared.enter_source(source, cfg.max_handshakes_per_source, busy) {
            shared.refuse(peer, RefuseReason::SourceBusy);
            drop(tcp);
            continue;
        }
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            shared.leave_source(source);
            shared.refuse(peer, RefuseReason::HandshakesBusy);
            drop(tcp);
            continue;
        };
        let permit = HandshakeSlot { _permit: permit, source, shared: shared.clone() };
        let _ = tcp.set_nodelay(true);
        let conn = ConnId(next_id.fetch_add(1, Relaxed));
        let (tls, in_tx, shared, settings) = (tls.clone(), in_tx.clone(), shared.clone(), settings.clone());
        let faults = cfg.connection_faults.clone();
        // Handshake futures are boxed and freed once done: a task is as large as the
        // largest state of its future, and inline TLS and WebSocket handshake state made
        // every idle connection's task 13 kB.
        tokio::spawn(async move {
            // Phase one: a first byte soon, or the slot goes back.
            let mut first = [0u8; 1];
            match tokio::time::timeout(settings.first_byte_timeout, tcp.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return,
                Err(_) => return shared.refuse(peer, RefuseReason::HandshakeTimeout),
            }
            let conn = Accepted { conn, peer, cert: None, permit, settings, in_tx, shared };
            match &faults {
                Some(f) => {
                    if let Some(stream) = f.accepted(tcp).await {
                        conn.serve(stream, tls).await;
                    }
                }
                None => conn.serve(tcp, tls).await,
            }
        });
    }
    tracing::debug!("listener closed");
}

/// A TCP connection past its first byte, before TLS and the upgrade.
struct Accepted {
    conn: ConnId,
    peer: SocketAddr,
    /// The client certificate, once TLS has verified it.
    cert: Option<CertIdentity>,
    permit: HandshakeSlot,
    settings: Arc<ConnSettings>,
    in_tx: mpsc::Sender<Inbound>,
    shared: Arc<Shared>,
}

impl Accepted {
    async fn serve<S>(self, stream: S, tls: Option<tokio_rustls::TlsAcceptor>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match tls {
            Some(acceptor) => {
                let hs = Box::pin(tokio::time::timeout(self.settings.handshake_timeout, acceptor.accept(stream))).await;
                let stream = match hs {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return self.shared.refuse(self.peer, RefuseReason::Tls(e.to_string())),
                    Err(_) => return self.shared.refuse(self.peer, RefuseReason::HandshakeTimeout),
                };
                let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|der| CertIdentity {
                    uuid: crate::transport::tls::device_uuid_in_cert(der).map(DeviceUuid),
                    der: Arc::from(der.as_ref()),
                });
                Box::pin(connection(stream, Accepted { cert, ..self })).await;
            }
            None => Box::pin(connection(stream, self)).await,
        }
    }
}

/// The requested subprotocols, comma-separated over any number of header lines.
fn offered_subprotocols(req: &Request) -> Vec<String> {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn error_response(status: StatusCode, body: String) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(body));
    *r.status_mut() = status;
    r
}

/// Decrements the open-connection count when the connection task ends, however it ends.
struct Slot<'a>(&'a Counters);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

async fn connection<S>(stream: S, accepted: Accepted)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted { conn, peer, cert, permit, settings, in_tx, shared } = accepted;
    let counters = &shared.counters;
    // Reserve a connection slot before the upgrade so the answer can be 503.
    let admitted = counters
        .connections
        .fetch_update(Relaxed, Relaxed, |n| (n < settings.max_connections).then_some(n + 1))
        .is_ok();
    let slot = admitted.then(|| Slot(counters));
    // The error type is tungstenite's, fixed by its `Callback` trait.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, mut resp: Response| {
        let offered = offered_subprotocols(req);
        if !offered.iter().any(|p| p == HUB_SUBPROTOCOL) {
            let what = if offered.is_empty() { "none".to_owned() } else { offered.join(", ") };
            return Err(error_response(
                StatusCode::BAD_REQUEST,
                format!("BACnet/SC hub: subprotocol {HUB_SUBPROTOCOL} required (offered: {what})\n"),
            ));
        }
        if !admitted {
            return Err(error_response(StatusCode::SERVICE_UNAVAILABLE, "BACnet/SC hub: full\n".into()));
        }
        resp.headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(HUB_SUBPROTOCOL));
        Ok(resp)
    };
    let hs = Box::pin(tokio::time::timeout(
        settings.handshake_timeout,
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(settings.ws)),
    ))
    .await;
    drop(permit);
    let ws = match hs {
        Ok(Ok(ws)) => ws,
        Ok(Err(WsError::Http(resp))) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let reason = match resp.status() {
                StatusCode::SERVICE_UNAVAILABLE => RefuseReason::AtCapacity,
                StatusCode::BAD_REQUEST if body.contains("subprotocol") => {
                    let offered = body.split("(offered: ").nth(1).map(|s| s.trim_end().trim_end_matches(')'));
                    RefuseReason::Subprotocol { offered: offered.filter(|o| *o != "none").map(str::to_owned) }
                }
                s => RefuseReason::Handshake(format!("HTTP {s}")),
            };
            return shared.refuse(peer, reason);
        }
        Ok(Err(e)) => return shared.refuse(peer, RefuseReason::Handshake(e.to_string())),
        Err(_) => return shared.refuse(peer, RefuseReason::HandshakeTimeout),
    };
    let Some(_slot) = slot else {
        // Unreachable in practice: the callback refuses when not admitted.
        return shared.refuse(peer, RefuseReason::AtCapacity);
    };
    counters.accepted.fetch_add(1, Relaxed);
    tracing::debug!(%conn, %peer, "WebSocket accepted");
    shared.emit(|| HubServerEvent::Accepted { conn, peer });
    // Split first: the halves share one heap allocation, and the WebSocket (with the TLS
    // session) is then not also kept inline in this future.
    let (sink, stream) = ws.split();
    let outbox = Arc::new(Outbox::new());
    if in_tx.send(Inbound::Open { conn, outbox: outbox.clone(), peer, cert }).await.is_err() {
        return; // hub stopped
    }
    // The writer is its own task: a wake-up for frames to send then polls only the writer,
    // not the reader as well (which costs a read attempt each time).
    let mut writer = tokio::spawn(write_loop(sink, conn, outbox.clone(), shared.clone(), settings.queue_depth));
    let reader = std::pin::pin!(read_loop(stream, conn, &in_tx, &outbox, &shared));
    let io = async {
        match futures::future::select(reader, &mut writer).await {
            futures::future::Either::Left((read_end, _)) => {
                // Peer closed, errored or violated the protocol: let the writer send any
                // close frame the reader queued, then stop it.
                outbox.finish();
                if tokio::time::timeout(CLOSE_GRACE, &mut writer).await.is_err() {
                    writer.abort();
                }
                read_end.err()
            }
            futures::future::Either::Right((write_end, reader)) => {
                // Close frame sent (hub decision) or the socket failed: wait briefly for
                // the peer's close so the close handshake completes.
                let _ = tokio::time::timeout(CLOSE_GRACE, reader).await;
                match write_end {
                    Ok(r) => r.err(),
                    Err(e) => Some(format!("writer task failed: {e}")),
                }
            }
        }
    };
    let give_up = async {
        outbox.closing.notified().await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    let error = tokio::select! {
        e = io => e,
        _ = give_up => Some("close not completed in time; connection dropped".to_owned()),
    };
    // However the connection ended, its writer (and socket half) goes with it.
    writer.abort();
    // The core hears of the close before the slot is released: a later Open cannot find
    // the core fuller than the shell.
    let _ = in_tx.send(Inbound::Closed(conn)).await;
    tracing::debug!(%conn, %peer, error = error.as_deref().unwrap_or(""), "connection ended");
    shared.emit(|| HubServerEvent::Ended { conn, peer, error });
}

async fn read_loop<S>(
    mut stream: futures::stream::SplitStream<WebSocketStream<S>>,
    conn: ConnId,
    in_tx: &mpsc::Sender<Inbound>,
    outbox: &Outbox,
    shared: &Shared,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let shell_close = |reason: ShellCloseReason, code: CloseCode, text: &str| {
        tracing::info!(%conn, "closing: {text}");
        outbox.close(code, text);
        shared.emit(|| HubServerEvent::ClosedByShell { conn, reason });
    };
    loop {
        match stream.next().await {
            None => return Ok(()),
            Some(Ok(Message::Binary(b))) => {
                if in_tx.send(Inbound::Frame(conn, b)).await.is_err() {
                    return Ok(());
                }
            }
            Some(Ok(Message::Text(_))) => {
                shared.counters.closed_text_frame.fetch_add(1, Relaxed);
                shell_close(ShellCloseReason::TextFrame, CloseCode::Unsupported, "BACnet/SC uses binary frames only");
                return Ok(());
            }
            // Pings are answered by tungstenite; the peer's close is answered likewise and
            // the stream then ends.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_))) => {}
            Some(Err(WsError::Capacity(e))) => {
                shared.counters.closed_oversize.fetch_add(1, Relaxed);
                shell_close(ShellCloseReason::Oversize, CloseCode::Size, &format!("message too big: {e}"));
                return Ok(());
            }
            Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return Ok(()),
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
}

async fn write_loop<S>(
    mut sink: futures::stream::SplitSink<WebSocketStream<S>, Message>,
    conn: ConnId,
    outbox: Arc<Outbox>,
    shared: Arc<Shared>,
    queue_depth: usize,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let counters = &shared.counters;
    // Grows with the bursts this receiver actually gets (an idle one holds nothing).
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        outbox.notify.notified().await;
        let (close, shut, recovered) = {
            let mut q = outbox.lock();
            std::mem::swap(&mut q.frames, &mut batch);
            let recovered = if q.full_since.take().is_some() { std::mem::take(&mut q.dropped) } else { 0 };
            (q.close.take(), q.shut, recovered)
        };
        if recovered > 0 {
            tracing::warn!(%conn, dropped = recovered, "slow consumer caught up after {recovered} dropped frames");
            shared.emit(|| HubServerEvent::SlowConsumerRecovered { conn, dropped: recovered });
        }
        let n = batch.len() as u64;
        for frame in batch.drain(..) {
            sink.feed(Message::Binary(frame)).await.map_err(|e| e.to_string())?;
        }
        if let Some(cf) = close {
            // `send` flushes the queued frames and the close frame together.
            sink.send(Message::Close(Some(cf))).await.map_err(|e| e.to_string())?;
            counters.frames_written.fetch_add(n, Relaxed);
            counters.flushes.fetch_add(1, Relaxed);
            return Ok(());
        }
        if n > 0 {
            sink.flush().await.map_err(|e| e.to_string())?;
            counters.frames_written.fetch_add(n, Relaxed);
            counters.flushes.fetch_add(1, Relaxed);
        }
        if shut {
            return Ok(());
        }
        // Keep the buffer's capacity bounded after a burst.
        if batch.capacity() > 4 * queue_depth.min(256) {
            batch = Vec::new();
        }
    }
}

struct Peer {
    outbox: Arc<Outbox>,
    peer: SocketAddr,
    /// Frames for this connection in the current batch, moved into the outbox with one
    /// lock at the end of the batch (not one lock per frame).
    staged: Vec<Bytes>,
}

/// Staging capacity a connection keeps between batches; a burst beyond it is freed.
const STAGED_KEEP: usize = 64;

/// The one task that owns the core.
struct HubTask {
    core: BscHubCore,
    start: Instant,
    conns: ConnMap<Peer>,
    /// Connections given frames in this batch, handed them and woken once at its end.
    dirty: Vec<ConnId>,
    /// The last core frame wrapped for tungstenite, so broadcast copies share it.
    /// Keyed by the core buffer's address, which the cached `Bytes` keeps alive.
    wrapped: Option<(usize, Bytes)>,
    deliveries: u64,
    queue_depth: usize,
    slow_close_after: Option<Duration>,
    shared: Arc<Shared>,
}

async fn hub_task(
    cfg: HubServerConfig,
    mut rx: mpsc::Receiver<Inbound>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut hub = HubTask {
        core: BscHubCore::new(cfg.core.clone()),
        start: Instant::now(),
        conns: ConnMap::default(),
        dirty: Vec::new(),
        wrapped: None,
        deliveries: 0,
        queue_depth: cfg.queue_depth,
        slow_close_after: cfg.slow_consumer_close_after,
        shared,
    };
    let mut batch = Vec::with_capacity(BATCH);
    let sleep = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(sleep);
    let mut armed: Option<tokio::time::Instant> = None;
    let mut timers_checked = Instant::now();
    let mut recheck = true;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break,
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break;
                }
                let now = hub.now();
                for m in batch.drain(..) {
                    recheck |= matches!(m, Inbound::Open { .. });
                    hub.handle(m, now);
                }
            }
            _ = &mut sleep, if armed.is_some() => {
                let now = hub.now();
                let out = hub.core.tick(now);
                hub.dispatch(out);
                armed = None;
                recheck = true;
            }
        }
        hub.end_batch();
        // Re-arm the timer: exact after ticks and opens, else at most TIMER_SLACK stale.
        let wall = Instant::now();
        let deadline = if recheck || wall.duration_since(timers_checked) >= TIMER_SLACK {
            timers_checked = wall;
            recheck = false;
            hub.core.poll_timeout().map(|d| tokio::time::Instant::from_std(hub.start + d))
        } else {
            let stale_by = tokio::time::Instant::from_std(timers_checked + TIMER_SLACK);
            armed.map(|a| a.min(stale_by)).or(Some(stale_by))
        };
        if deadline != armed {
            if let Some(d) = deadline {
                sleep.as_mut().reset(d);
            }
            armed = deadline;
        }
    }
    hub.close_all();
    // Give connections a moment to send their close frames and see the peers' replies.
    let until = Instant::now() + CLOSE_GRACE;
    while hub.shared.counters.connections.load(Relaxed) > 0 && Instant::now() < until {
        // Keep draining so connection tasks never block on a full channel while closing.
        tokio::select! {
            m = rx.recv() => if m.is_none() { break },
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
}

impl HubTask {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn handle(&mut self, m: Inbound, now: Duration) {
        match m {
            Inbound::Frame(conn, bytes) => {
                let out = self.core.receive(conn, &bytes, now);
                self.dispatch(out);
            }
            Inbound::Open { conn, outbox, peer, cert } => match self.core.accept(conn, now) {
                Ok(()) => {
                    if let Some(cert) = cert {
                        self.core.bind_certificate(conn, cert);
                    }
                    self.conns.insert(conn, Peer { outbox, peer, staged: Vec::new() });
                }
                Err(e) => {
                    tracing::warn!(%conn, %peer, "core refused admission: {e}");
                    outbox.close(CloseCode::Again, "hub full");
                    self.shared.emit(|| HubServerEvent::ClosedByShell {
                        conn,
                        reason: ShellCloseReason::CoreRefused(e.to_string()),
                    });
                }
            },
            Inbound::Closed(conn) => {
                self.conns.remove(&conn);
                let out = self.core.closed(conn, now);
                self.dispatch(out);
            }
        }
    }

    fn dispatch(&mut self, out: Vec<HubOutput>) {
        for o in out {
            match o {
                HubOutput::Send { to, frame } => self.deliver(to, frame),
                HubOutput::Close { conn, reason } => {
                    // What the core sent before closing (a NAK, say) goes out before the
                    // close frame.
                    self.hand_over(conn, Instant::now());
                    if let Some(p) = self.conns.remove(&conn) {
                        let code = match reason {
                            CloseReason::DuplicateVmac | CloseReason::InvalidVmac | CloseReason::IdentityMismatch => CloseCode::Policy,
                            CloseReason::NotConnected { .. } => CloseCode::Protocol,
                            _ => CloseCode::Normal,
                        };
                        tracing::info!(%conn, peer = %p.peer, ?reason, "hub closes connection");
                        p.outbox.close(code, &format!("{reason:?}"));
                    }
                    self.shared.emit(|| HubServerEvent::ClosedByHub { conn, reason });
                }
                HubOutput::Event(e) => self.observe(e),
            }
        }
    }

    fn deliver(&mut self, to: ConnId, frame: Arc<[u8]>) {
        let key = frame.as_ptr() as usize;
        let bytes = match &self.wrapped {
            Some((k, b)) if *k == key => b.clone(),
            _ => {
                let b = Bytes::from_owner(frame);
                self.wrapped = Some((key, b.clone()));
                b
            }
        };
        let Some(p) = self.conns.get_mut(&to) else { return };
        if p.staged.is_empty() {
            self.dirty.push(to);
        }
        p.staged.push(bytes);
    }

    /// Moves one connection's staged frames into its outbox and wakes its writer. Past
    /// `queue_depth` queued frames, the rest are dropped for this receiver only: counted,
    /// reported at the start of an overflow episode, and the receiver closed when it stays
    /// full for `slow_close_after`.
    fn hand_over(&mut self, conn: ConnId, now: Instant) {
        let Some(p) = self.conns.get_mut(&conn) else { return };
        if p.staged.is_empty() {
            return;
        }
        let mut q = p.outbox.lock();
        if q.shut {
            drop(q);
            p.staged.clear();
            return;
        }
        let take = self.queue_depth.saturating_sub(q.frames.len()).min(p.staged.len());
        q.frames.extend(p.staged.drain(..take));
        self.deliveries += take as u64;
        let excess = p.staged.len() as u64;
        p.staged.clear();
        if p.staged.capacity() > STAGED_KEEP {
            p.staged = Vec::new();
        }
        if excess == 0 {
            drop(q);
            p.outbox.notify.notify_one();
            return;
        }
        // Overflow: this receiver loses the frames, nobody else waits.
        self.shared.counters.drop_slow_consumer.fetch_add(excess, Relaxed);
        let first = q.dropped == 0;
        q.dropped += excess;
        let since = *q.full_since.get_or_insert(now);
        drop(q);
        p.outbox.notify.notify_one();
        let (outbox, peer) = (p.outbox.clone(), p.peer);
        if first {
            let vmac = self.core.vmac_of(conn);
            let depth = self.queue_depth;
            tracing::warn!(%conn, %peer, ?vmac, depth, "slow consumer: queue full, dropping its frames");
            self.shared.emit(|| HubServerEvent::SlowConsumer { conn, vmac, queue_depth: depth });
        }
        if self.slow_close_after.is_some_and(|limit| now.duration_since(since) >= limit) {
            self.shared.counters.closed_slow_consumer.fetch_add(1, Relaxed);
            tracing::warn!(%conn, %peer, "slow consumer: queue full too long, closing");
            outbox.close(CloseCode::Policy, "slow consumer");
            self.conns.remove(&conn);
            self.shared.emit(|| HubServerEvent::ClosedByShell { conn, reason: ShellCloseReason::SlowConsumer });
            let at = self.now();
            let out = self.core.closed(conn, at);
            self.dispatch(out);
        }
    }

    fn observe(&mut self, e: HubEvent) {
        let c = &self.shared.counters;
        match &e {
            HubEvent::Dropped { conn, reason, .. } => {
                let counter = match reason {
                    DropReason::UnknownDestination(_) => &c.drop_unknown_destination,
                    DropReason::NoReceivers => &c.drop_no_receivers,
                    DropReason::RateLimited { .. } => &c.drop_rate_limited,
                    DropReason::ExceedsPeerMaxBvlc { .. } => &c.drop_exceeds_peer_max_bvlc,
                    _ => &c.drop_other,
                };
                counter.fetch_add(1, Relaxed);
                tracing::debug!(%conn, ?reason, "dropped");
            }
            HubEvent::NakSent { conn, function, error_code, reason, .. } => {
                tracing::info!(%conn, function, error_code, "NAK: {reason}");
            }
            HubEvent::Connected { conn, vmac, .. } => tracing::info!(%conn, %vmac, "node connected"),
            HubEvent::OriginatingVmacPresent { .. } => tracing::debug!("{e:?}"),
            other => tracing::info!("{other:?}"),
        }
        self.shared.emit(|| HubServerEvent::Core(e));
    }

    /// Wake every connection that got frames, publish counters.
    fn end_batch(&mut self) {
        let now = Instant::now();
        // A slow-consumer close can dispatch more output, so pop rather than iterate.
        while let Some(conn) = self.dirty.pop() {
            self.hand_over(conn, now);
        }
        // Do not keep the last frame alive past the batch.
        self.wrapped = None;
        let s = self.core.stats();
        let c = &self.shared.counters;
        c.frames_in.store(s.frames_in, Relaxed);
        c.broadcast_deliveries.store(s.broadcast_deliveries, Relaxed);
        c.unicast_forwarded.store(s.unicast_forwarded, Relaxed);
        c.naks_sent.store(s.naks_sent, Relaxed);
        c.closed_by_hub.store(s.closed_by_hub, Relaxed);
        c.deliveries.store(self.deliveries, Relaxed);
    }

    fn close_all(&mut self) {
        let now = Instant::now();
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.hand_over(conn, now);
        }
        for (conn, p) in self.conns.drain() {
            p.outbox.close(CloseCode::Away, "hub shutting down");
            self.shared.emit(|| HubServerEvent::ClosedByShell { conn, reason: ShellCloseReason::Shutdown });
        }
    }
}
