//! The `replay` device on a WebSocket: a [`ReplayCore`] behind `ws://ADDR/…`, one message
//! per frame, as a Shelly answers RPC on `/rpc`. Each connection is a peer of its own; the
//! answers the capture holds after a matched message go back on that connection as TEXT
//! (the captured kind's rule applied: Shelly's live `id` and `src`), at once or, with the
//! timing kept, as late as they came in the capture.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::replay_core::{ReplayCore, ReplayEvent};
use super::served::Served;
use crate::limits::LogEvery;
use crate::observe::{ObservationKind, ObservationLog};
use crate::sans_io::{Input, Output, Peer, SansIoCore};

/// Connections open at once, and from one address; more are dropped at accept.
const MAX_CONNECTIONS: usize = 1024;
const MAX_PER_SOURCE: usize = 64;
/// The largest message a client may send (RPC calls are small).
const MAX_MESSAGE: usize = 64 * 1024;
/// Messages on their way to the core, from all connections: a full queue holds the
/// senders back (each connection waits), so at most this many × MAX_MESSAGE bytes.
const INBOUND_QUEUE: usize = 256;
/// Answers queued for one connection, in bytes: a client that stops reading past it is
/// dropped, not buffered for.
const MAX_QUEUED_BYTES: usize = 4 << 20;
/// A connection silent this long is dropped (as Shelly firmware drops one).
const IDLE: std::time::Duration = crate::device::shelly_host::WS_IDLE;

/// A connection's outgoing queue and the bytes in it.
struct Outbox {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

enum FromConn {
    Open(u64, Outbox),
    Message(u64, Vec<u8>),
    Closed(u64),
}

/// Listens on `addr` (port 0: any) and serves the core there until stopped.
pub async fn start(name: impl Into<String>, core: ReplayCore, addr: SocketAddr, log: ObservationLog) -> Result<Served, String> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("listen {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let name = name.into();
    Ok(Served::spawn(local, move |stopped| serve(listener, core.alone(), name, log, stopped)))
}

async fn serve(listener: tokio::net::TcpListener, mut core: ReplayCore, name: String, log: ObservationLog, mut stopped: oneshot::Receiver<()>) {
    let start = Instant::now();
    let (to_core, mut from_conns) = mpsc::channel::<FromConn>(INBOUND_QUEUE);
    let mut conns: HashMap<u64, Outbox> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    // Each connection's source address, to bound what one source holds.
    let mut sources: HashMap<u64, std::net::IpAddr> = HashMap::new();
    let mut next_id = 0u64;
    let (mut accept_log, mut unmatched_log) = (LogEvery::default(), LogEvery::default());
    loop {
        let wake = core.next_wakeup().map(|at| tokio::time::Instant::from_std(start + at));
        let mut out = Vec::new();
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {
                let _ = core.handle_input(Input::Timeout, start.elapsed(), &mut out);
            }
            a = listener.accept() => match a {
                Ok((stream, from)) if tasks.len() < MAX_CONNECTIONS && sources.values().filter(|ip| **ip == from.ip()).count() < MAX_PER_SOURCE => {
                    next_id += 1;
                    sources.insert(next_id, from.ip());
                    let (id, tx) = (next_id, to_core.clone());
                    tasks.spawn(async move {
                        connection(stream, id, tx).await;
                        id
                    });
                }
                Ok((_, from)) => {
                    // Over a bound: dropped at once.
                    if let Some(more) = accept_log.check(Instant::now()) {
                        tracing::warn!(device = %name, %from, "a connection over the limits dropped ({more} more since the last line)");
                    }
                }
                Err(e) => {
                    if let Some(more) = accept_log.check(Instant::now()) {
                        tracing::warn!(device = %name, "accept: {e} ({more} more since the last line)");
                    }
                }
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(id) = done {
                    sources.remove(&id);
                }
            }
            Some(m) = from_conns.recv() => match m {
                FromConn::Open(id, tx) => {
                    conns.insert(id, tx);
                    let _ = core.handle_input(Input::Connected(Peer(id)), start.elapsed(), &mut out);
                }
                FromConn::Message(id, bytes) => {
                    let _ = core.handle_input(Input::Bytes { from: Peer(id), bytes: &bytes }, start.elapsed(), &mut out);
                }
                FromConn::Closed(id) => {
                    conns.remove(&id);
                    let _ = core.handle_input(Input::Disconnected(Peer(id)), start.elapsed(), &mut out);
                }
            },
        }
        for o in out {
            match o {
                Output::Send { to, bytes } => {
                    let Some(o) = conns.get(&to.0) else { continue };
                    let n = bytes.len();
                    if o.queued.load(std::sync::atomic::Ordering::Relaxed) + n > MAX_QUEUED_BYTES {
                        // A client that does not read its answers: drop it rather than buffer.
                        tracing::info!(device = %name, "a WebSocket client over {MAX_QUEUED_BYTES} bytes of unread answers dropped");
                        conns.remove(&to.0);
                        continue;
                    }
                    o.queued.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    let _ = o.tx.send(bytes);
                }
                Output::Event(ReplayEvent::Unmatched { bytes }) => {
                    let reason = format!("no captured message is {}", String::from_utf8_lossy(&bytes));
                    if let Some(more) = unmatched_log.check(Instant::now()) {
                        tracing::info!(device = %name, "{reason} ({more} more unmatched since the last line)");
                    }
                    log.push(&name, ObservationKind::DeviceSilent { reason });
                }
                Output::Event(ReplayEvent::Answered { index, answers }) => tracing::debug!(device = %name, index, answers, "replayed"),
                Output::Close(_) => {}
            }
        }
    }
}

/// One client: the handshake (any path), then its messages to the core and the core's
/// answers back as TEXT (BINARY when they are not UTF-8).
/// One client: the handshake (any path, 5 s at most), then its messages to the core and
/// the core's answers back as TEXT (BINARY when they are not UTF-8), until it closes, goes
/// silent for [`IDLE`], or its answers pile up unread (the core drops its outbox).
async fn connection(stream: tokio::net::TcpStream, id: u64, to_core: mpsc::Sender<FromConn>) {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE));
    let handshake = tokio::time::timeout(std::time::Duration::from_secs(5), tokio_tungstenite::accept_async_with_config(stream, Some(config))).await;
    let Ok(Ok(ws)) = handshake else { return };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    if to_core.send(FromConn::Open(id, Outbox { tx, queued: queued.clone() })).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            m = tokio::time::timeout(IDLE, source.next()) => match m {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if to_core.send(FromConn::Message(id, t.as_bytes().to_vec())).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Ok(Message::Binary(b)))) => {
                    if to_core.send(FromConn::Message(id, b.to_vec())).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Ok(_))) => {} // pings are answered by tungstenite
                Ok(Some(Err(_)) | None) | Err(_) => break,
            },
            next = rx.recv() => {
                // None: the core dropped this connection's outbox (unread answers).
                let Some(bytes) = next else { break };
                queued.fetch_sub(bytes.len(), std::sync::atomic::Ordering::Relaxed);
                let msg = match String::from_utf8(bytes) {
                    Ok(t) => Message::text(t),
                    Err(e) => Message::binary(e.into_bytes()),
                };
                if sink.send(msg).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to_core.send(FromConn::Closed(id)).await;
}
