//! The `replay` device on a TCP port: a [`ReplayCore`] behind HTTP/1.1 and `ws://ADDR/…`,
//! as a Shelly answers `GET /shelly`, `/rpc/<Method>` and RPC on the WebSocket `/rpc`.
//! Each connection is a peer of its own. A WebSocket message is a request; the answers
//! the capture holds after a matched one go back on that connection as TEXT (the captured
//! kind's rule applied: Shelly's live `id` and `src`), at once or, with the timing kept,
//! as late as they came in the capture. An HTTP request is a request in
//! [`http_message`]'s form (matched by method, target and body) and gets the captured
//! response's status, headers and body; one the capture does not hold gets `404` with a
//! body that says so (and is reported), one the capture left unanswered has its
//! connection closed.

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
use crate::protocol::http_message;
use crate::sans_io::{Input, Output, Peer, SansIoCore};

/// Connections open at once, and from one address; more are dropped at accept.
const MAX_CONNECTIONS: usize = 1024;
const MAX_PER_SOURCE: usize = 64;
/// The largest message a client may send (RPC calls are small; an HTTP body has the
/// Shelly device's limit, the same).
const MAX_MESSAGE: usize = super::shelly_host::MAX_BODY;
/// Messages on their way to the core, from all connections: a full queue holds the
/// senders back (each connection waits), so at most this many × MAX_MESSAGE bytes.
const INBOUND_QUEUE: usize = 256;
/// Answers queued for one connection, in bytes: a client that stops reading past it is
/// dropped, not buffered for.
const MAX_QUEUED_BYTES: usize = 4 << 20;
/// A connection silent this long is dropped (as Shelly firmware drops one).
const IDLE: std::time::Duration = crate::device::shelly_host::WS_IDLE;

/// How long an HTTP request waits for its captured answer (which may come late when the
/// timing is kept).
const HTTP_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What the core has for a connection.
enum Outgoing {
    Bytes(Vec<u8>),
    /// The last request matched nothing captured.
    Unmatched,
    /// The last request was answered by silence in the capture.
    Silent,
}

/// A connection's outgoing queue and the bytes in it.
struct Outbox {
    tx: mpsc::UnboundedSender<Outgoing>,
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
                    // An HTTP request waits for exactly one answer: say when none is coming.
                    let none = out.iter().find_map(|o| match o {
                        Output::Event(ReplayEvent::Unmatched { .. }) => Some(Outgoing::Unmatched),
                        Output::Event(ReplayEvent::Answered { answers: 0, .. }) => Some(Outgoing::Silent),
                        _ => None,
                    });
                    if let (Some(none), Some(o)) = (none, conns.get(&id)) {
                        let _ = o.tx.send(none);
                    }
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
                    let _ = o.tx.send(Outgoing::Bytes(bytes));
                }
                Output::Event(ReplayEvent::Unmatched { bytes }) => {
                    let reason = match http_message::request_parts(&bytes) {
                        Some((method, target, body)) => format!("no captured HTTP request is {method} {target} {}", String::from_utf8_lossy(body)).trim_end().to_string(),
                        None => format!("no captured message is {}", String::from_utf8_lossy(&bytes)),
                    };
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

/// One client, for as long as its connection lasts: HTTP requests, each answered as the
/// capture did, until one upgrades the connection to a WebSocket (any path); then
/// [`Conn::websocket`]. Its requests' heads must come within [`HEADER_WAIT`] (an idle
/// keep-alive connection is closed then too), their bodies within the Shelly device's
/// body timeout.
async fn connection(stream: tokio::net::TcpStream, id: u64, to_core: mpsc::Sender<FromConn>) {
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    if to_core.send(FromConn::Open(id, Outbox { tx, queued: queued.clone() })).await.is_err() {
        return;
    }
    let conn = std::sync::Arc::new(Conn { id, to_core: to_core.clone(), rx: tokio::sync::Mutex::new(rx), queued, ws: std::sync::Mutex::new(None) });
    let served = conn.clone();
    let service = hyper::service::service_fn(move |req| served.clone().request(req));
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_WAIT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    let ws = conn.ws.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(ws) = ws {
        let _ = ws.await;
    }
    let _ = to_core.send(FromConn::Closed(id)).await;
}

/// A request head must arrive within this (an idle keep-alive connection is closed then).
const HEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// One connection's side of the core.
struct Conn {
    id: u64,
    to_core: mpsc::Sender<FromConn>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Outgoing>>,
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The WebSocket the connection became, served on its own task.
    ws: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

type HttpReply = Result<hyper::Response<http_body_util::Full<hyper::body::Bytes>>, std::io::Error>;

fn reply(status: u16, body: Vec<u8>) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    let mut r = hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    r
}

impl Conn {
    async fn request(self: std::sync::Arc<Self>, req: hyper::Request<hyper::body::Incoming>) -> HttpReply {
        if req.headers().get(hyper::header::UPGRADE).is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket")) {
            return Ok(self.upgrade(req));
        }
        let (head, body) = req.into_parts();
        // A body past the limit gets 413, one that does not come in time 408 (a client
        // that sends a length and stalls holds no connection).
        let body = match super::shelly_host::read_body(body).await {
            Ok(b) => b,
            Err(refusal) => return Ok(refusal),
        };
        let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
        let headers = head.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
        let message = http_message::request_message(head.method.as_str(), target, headers, &body);
        let mut rx = self.rx.lock().await;
        // Answers to an earlier request past its first (a capture with two) are not this one's.
        while let Ok(stale) = rx.try_recv() {
            self.unqueue(&stale);
        }
        self.to_core.send(FromConn::Message(self.id, message)).await.map_err(|_| gone())?;
        match tokio::time::timeout(HTTP_ANSWER_WAIT, rx.recv()).await {
            Ok(Some(Outgoing::Bytes(b))) => {
                self.queued.fetch_sub(b.len(), std::sync::atomic::Ordering::Relaxed);
                let Some((status, headers, body)) = http_message::response_parts(&b) else {
                    return Ok(reply(502, format!("the captured answer is not an HTTP response: {}", String::from_utf8_lossy(&b[..b.len().min(80)])).into_bytes()));
                };
                let mut r = reply(status, body.to_vec());
                for (name, value) in headers {
                    if let (Ok(n), Ok(v)) = (hyper::header::HeaderName::from_bytes(name.as_bytes()), hyper::header::HeaderValue::from_bytes(&value)) {
                        r.headers_mut().append(n, v);
                    }
                }
                Ok(r)
            }
            Ok(Some(Outgoing::Unmatched)) => Ok(reply(404, format!("hilbench replay: no captured request is {} {target}", head.method).into_bytes())),
            // Silent in the capture (or no answer in time): the connection closes unanswered.
            Ok(Some(Outgoing::Silent) | None) | Err(_) => Err(gone()),
        }
    }

    fn unqueue(&self, o: &Outgoing) {
        if let Outgoing::Bytes(b) = o {
            self.queued.fetch_sub(b.len(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Answers the WebSocket handshake and serves the socket on its own task.
    fn upgrade(self: std::sync::Arc<Self>, mut req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
        let Some(key) = req.headers().get(hyper::header::SEC_WEBSOCKET_KEY).map(|k| k.as_bytes().to_vec()) else {
            return reply(400, Vec::new());
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
        let on_upgrade = hyper::upgrade::on(&mut req);
        let conn = self.clone();
        let task = tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else { return };
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE));
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(hyper_util::rt::TokioIo::new(upgraded), tokio_tungstenite::tungstenite::protocol::Role::Server, Some(config)).await;
            conn.websocket(ws).await;
        });
        *self.ws.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        let mut r = reply(101, Vec::new());
        let h = r.headers_mut();
        h.insert(hyper::header::UPGRADE, hyper::header::HeaderValue::from_static("websocket"));
        h.insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("Upgrade"));
        if let Ok(v) = hyper::header::HeaderValue::from_str(&accept) {
            h.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, v);
        }
        r
    }

    /// The WebSocket: its messages to the core and the core's answers back as TEXT
    /// (BINARY when they are not UTF-8), until it closes, goes silent for [`IDLE`], or its
    /// answers pile up unread (the core drops its outbox).
    async fn websocket<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(&self, ws: tokio_tungstenite::WebSocketStream<S>) {
        let (mut sink, mut source) = ws.split();
        let mut rx = self.rx.lock().await;
        loop {
            tokio::select! {
                m = tokio::time::timeout(IDLE, source.next()) => match m {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        if self.to_core.send(FromConn::Message(self.id, t.as_bytes().to_vec())).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(Ok(Message::Binary(b)))) => {
                        if self.to_core.send(FromConn::Message(self.id, b.to_vec())).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(Ok(_))) => {} // pings are answered by tungstenite
                    Ok(Some(Err(_)) | None) | Err(_) => break,
                },
                next = rx.recv() => {
                    // None: the core dropped this connection's outbox (unread answers).
                    let bytes = match next {
                        Some(Outgoing::Bytes(b)) => b,
                        Some(Outgoing::Unmatched | Outgoing::Silent) => continue,
                        None => break,
                    };
                    self.queued.fetch_sub(bytes.len(), std::sync::atomic::Ordering::Relaxed);
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
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "no answer")
}
