//! The Shelly device's host: one sans-IO [`ShellyDevice`] behind its HTTP
//! server and WebSocket, as Gen2+ firmware serves them on port 80.
//!
//! - `GET /shelly`: the device info, open without auth.
//! - `GET /rpc/<Method>?k=v&…` (each value JSON when it parses, else a
//!   string, as firmware reads query parameters) and `POST /rpc/<Method>`
//!   (params as the JSON body): the result as the body, an error as
//!   `{code, message}` with an HTTP status; digest auth by the standard
//!   `Authorization` header, a 401 carrying `WWW-Authenticate`.
//! - `POST /rpc`: one frame in the body, the response frame back.
//! - `ws://…/rpc`: frames both ways as TEXT messages, notifications to a
//!   peer once it has sent a request with a `src`; pings answered. Every
//!   WebSocket message crosses the device's [`LinkEngine`] (named as the
//!   device): faults and capture.
//!
//! - BLE GATT ([`super::shelly_ble`]): the RPC service's TX-ctl, data and
//!   RX-ctl characteristics, one channel per central, on the virtual air or
//!   real BlueZ.
//!
//! A reboot drops every WebSocket without a close frame (the client sees
//! 1006) and every BLE link, and withdraws the advertisement; while the
//! device is down, connections are accepted and closed at once and HTTP
//! requests get no answer.
//!
//! Limits, so no client can hold the device: HTTP bodies past [`MAX_BODY`]
//! get 413 unread; a request's headers must come within
//! [`HEADER_TIMEOUT`] and its body within [`BODY_TIMEOUT`] (408); at most
//! [`MAX_CONNECTIONS`] connections at once (more are closed at accept); a
//! WebSocket silent for [`WS_IDLE`] is dropped, and so is one whose reader
//! lets more than [`WS_QUEUED_BYTES`] of answers and notifications pile up;
//! requests queue toward the device in a bounded channel, so a flooding
//! socket waits for the device. Refusals are logged at most once per period.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::protocol::{Message, Role};

use super::shelly_ble::{ShellyBle, ShellyBleSide};
use super::shelly_core::{HttpAnswer, ShellyConfig, ShellyDevice, ShellyEvent};
use crate::transport::gatt::GattEvent;
use crate::limits::{LogEvery, REFUSAL_LOG_PERIOD};
use crate::link::stream::ConnFaults;
use crate::link::{Direction, FaultRule, FrameRecord, LinkEngine};
use crate::transport::ws_client::ByteStream;
use crate::sans_io::{Input, Output, Peer, SansIoCore};

/// The largest HTTP body read (a 1 MB body gets 413 unread).
pub const MAX_BODY: usize = 64 * 1024;
const EVENTS_QUEUED: usize = 1024;
/// Frames a fault may hold back at once; more are dropped.
const HELD_FRAMES: usize = 4096;
/// WebSocket messages past this size are refused (the connection closes).
const MAX_WS_MESSAGE: usize = 64 * 1024;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CONNECTIONS: usize = 64;
pub const WS_IDLE: Duration = Duration::from_secs(300);
pub const WS_QUEUED_BYTES: usize = 256 * 1024;
/// Requests (and socket events) waiting for the device.
const COMMANDS_QUEUED: usize = 1024;

/// Where the device is reached.
#[derive(Debug, Clone)]
pub struct ShellyEndpoints {
    /// HTTP and WebSocket (port 0: any free port).
    pub http: SocketAddr,
    /// The link's fault randomness (the scenario seed).
    pub seed: u64,
    /// How many frames the link keeps for capture (`None`: all).
    pub frame_limit: Option<usize>,
    /// The link's name (a scenario's device name; default the device id).
    pub link_name: Option<String>,
    /// RPC over BLE GATT too.
    pub ble: Option<ShellyBle>,
    /// Connection faults on its TCP connections (HTTP and WebSocket alike,
    /// as a Wi-Fi device loses them); `None` carries them unpumped.
    pub connection_faults: Option<Arc<ConnFaults>>,
}

/// A running device; dropping it (or [`ShellyHandle::shutdown`]) stops it.
pub struct ShellyHandle {
    http: SocketAddr,
    ble: Option<String>,
    epoch: Instant,
    id: String,
    link: Arc<Mutex<LinkEngine>>,
    connection_faults: Option<Arc<ConnFaults>>,
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<ShellyEvent>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

enum WsOut {
    Frame(Vec<u8>),
    /// Drop the connection without a close frame.
    Drop,
}

enum Command {
    Set { key: String, value: f64, reply: oneshot::Sender<Result<(), String>> },
    WsOpen { tx: mpsc::UnboundedSender<WsOut>, queued: Arc<AtomicUsize>, reply: oneshot::Sender<Option<Peer>> },
    WsIn { peer: Peer, bytes: Vec<u8> },
    WsClosed { peer: Peer },
    Http { method: String, params: Value, authorization: Option<String>, http_method: String, reply: oneshot::Sender<Option<HttpAnswer>> },
    Frame { bytes: Vec<u8>, reply: oneshot::Sender<Option<Vec<u8>>> },
    DeviceInfo { reply: oneshot::Sender<Option<Value>> },
}

impl ShellyHandle {
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The BLE address centrals find it at, when it serves BLE.
    pub fn ble_address(&self) -> Option<&str> {
        self.ble.as_deref()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ShellyEvent> {
        self.events.subscribe()
    }

    /// Sets a state key ([`super::shelly_core::STATE_KEYS`]).
    pub async fn set(&self, key: &str, value: f64) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Set { key: key.to_string(), value, reply }).await.map_err(|_| "the device has stopped".to_string())?;
        rx.await.map_err(|_| "the device has stopped".to_string())?
    }

    fn link(&self) -> std::sync::MutexGuard<'_, LinkEngine> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fault on its link, from now: a connection fault on its TCP
    /// connections (when served with [`ShellyEndpoints::connection_faults`]),
    /// any other on its WebSocket messages.
    pub fn add_fault(&self, rule: FaultRule) -> Result<(), String> {
        if rule.fault.is_connection_level() {
            let Some(f) = &self.connection_faults else {
                return Err(format!("`{}` carries its connections without a pump, so it takes no `{}`", self.id, rule.fault.name()));
            };
            f.add_rule(rule);
            return Ok(());
        }
        let now_ns = self.epoch.elapsed().as_nanos() as u64;
        self.link().add_rule(rule, now_ns);
        Ok(())
    }

    /// Clears the faults named `name` (or all) from messages and connections;
    /// false when nothing had that name.
    pub fn clear_faults(&self, name: Option<&str>) -> bool {
        match name {
            Some(n) => {
                let on_messages = self.link().clear_named(n);
                let on_connections = self.connection_faults.as_ref().is_some_and(|f| f.clear_named(n));
                on_messages || on_connections
            }
            None => {
                self.link().clear();
                if let Some(f) = &self.connection_faults {
                    f.clear();
                }
                true
            }
        }
    }

    pub fn frames(&self) -> Vec<FrameRecord> {
        self.link().frames().cloned().collect()
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(f) = &self.connection_faults {
            f.stop();
        }
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for ShellyHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(f) = &self.connection_faults {
            f.stop();
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds the HTTP port and serves `config` there until shut down.
pub async fn serve(config: ShellyConfig, endpoints: ShellyEndpoints) -> Result<ShellyHandle, String> {
    let core = ShellyDevice::new(config)?;
    let id = core.id().to_string();
    let listener = TcpListener::bind(endpoints.http).await.map_err(|e| format!("cannot listen on {}: {e}", endpoints.http))?;
    let http = listener.local_addr().map_err(|e| e.to_string())?;
    let mut engine = LinkEngine::new(endpoints.link_name.clone().unwrap_or_else(|| id.clone()), endpoints.seed);
    engine.set_log_limit(endpoints.frame_limit);
    let link = Arc::new(Mutex::new(engine));
    let (events, _) = broadcast::channel(EVENTS_QUEUED);
    let (stop, stop_rx) = watch::channel(false);
    let (commands, commands_rx) = mpsc::channel(COMMANDS_QUEUED);
    let (ble, gatt_events) = match endpoints.ble {
        Some(b) => {
            let (side, events) = ShellyBleSide::open(b).await?;
            (Some(side), Some(events))
        }
        None => (None, None),
    };
    let ble_address = ble.as_ref().map(|b| b.address().to_string());
    let epoch = Instant::now();
    let host = Host {
        core,
        epoch,
        link: link.clone(),
        ws: HashMap::new(),
        pending_frames: HashMap::new(),
        in_flight: Vec::new(),
        next_peer: 1,
        events: events.clone(),
        ble,
        readvertise: false,
        slow_readers: LogEvery::new(REFUSAL_LOG_PERIOD),
    };
    let connection_faults = endpoints.connection_faults;
    let accept = tokio::spawn(accept_loop(listener, commands.clone(), stop_rx.clone(), connection_faults.clone()));
    let run = tokio::spawn(host.run(commands_rx, stop_rx, gatt_events));
    Ok(ShellyHandle { http, ble: ble_address, epoch, id, link, connection_faults, commands, events, stop, tasks: vec![run, accept] })
}

/// A connection's place among [`MAX_CONNECTIONS`]; freed when its last holder (the
/// HTTP connection, or the WebSocket it became) goes.
struct ConnSlot(Arc<AtomicUsize>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(listener: TcpListener, commands: mpsc::Sender<Command>, mut stop: watch::Receiver<bool>, faults: Option<Arc<ConnFaults>>) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut refused = LogEvery::new(REFUSAL_LOG_PERIOD);
    loop {
        let conn = tokio::select! {
            _ = stop.changed() => return,
            c = listener.accept() => c,
        };
        let Ok((stream, from)) = conn else { continue };
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            if let Some(more) = refused.check(Instant::now()) {
                tracing::warn!("shelly: {MAX_CONNECTIONS} connections open; closed one from {from} ({more} more since the last line)");
            }
            continue;
        }
        let slot = Arc::new(ConnSlot(open.clone()));
        let _ = stream.set_nodelay(true);
        let commands = commands.clone();
        let faults = faults.clone();
        tokio::spawn(async move {
            let stream: Box<dyn ByteStream> = match faults {
                // A `refuse` or `accept_close` ends it here (RST or FIN).
                Some(f) => match f.accepted(stream).await {
                    Some(s) => s,
                    None => return,
                },
                None => Box::new(stream),
            };
            let service = hyper::service::service_fn(move |req| handle_request(req, commands.clone(), slot.clone()));
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(io, service)
                .with_upgrades()
                .await;
        });
    }
}

type HttpResult = Result<Response<Full<Bytes>>, std::io::Error>;

fn respond(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

/// No answer: the device is down; the connection closes.
fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the device is rebooting")
}

async fn ask<T>(commands: &mpsc::Sender<Command>, make: impl FnOnce(oneshot::Sender<Option<T>>) -> Command) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    commands.send(make(tx)).await.ok()?;
    rx.await.ok().flatten()
}

/// `k=v&…` as params: each value JSON when it parses, else a string.
fn query_params(query: &str) -> Value {
    let map: serde_json::Map<String, Value> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| {
            let value = serde_json::from_str(&v).unwrap_or_else(|_| Value::from(v.as_ref()));
            (k.into_owned(), value)
        })
        .collect();
    if map.is_empty() {
        Value::Null
    } else {
        Value::Object(map)
    }
}

/// A request's body, at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`]; else the 413 or
/// 408 to answer (shared with the HTTP replay, which has the same limits).
pub(crate) async fn read_body(body: Incoming) -> Result<Bytes, Response<Full<Bytes>>> {
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(_)) => Err(respond(StatusCode::PAYLOAD_TOO_LARGE, Vec::new())),
        Err(_) => Err(respond(StatusCode::REQUEST_TIMEOUT, Vec::new())),
    }
}

async fn handle_request(req: Request<Incoming>, commands: mpsc::Sender<Command>, slot: Arc<ConnSlot>) -> HttpResult {
    let path = req.uri().path().to_string();
    if path == "/rpc" && req.headers().get(hyper::header::UPGRADE).is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket")) {
        return Ok(upgrade(req, commands, slot).await);
    }
    let too_large = req.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok()).is_some_and(|n| n > MAX_BODY);
    if too_large {
        return Ok(respond(StatusCode::PAYLOAD_TOO_LARGE, Vec::new()));
    }
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/shelly") => {
            let info = ask(&commands, |reply| Command::DeviceInfo { reply }).await.ok_or_else(gone)?;
            Ok(respond(StatusCode::OK, serde_json::to_vec(&info).unwrap_or_default()))
        }
        (Method::POST, "/rpc") => {
            let body = match read_body(req.into_body()).await {
                Ok(b) => b,
                Err(r) => return Ok(r),
            };
            match ask(&commands, |reply| Command::Frame { bytes: body.to_vec(), reply }).await {
                Some(answer) => Ok(respond(StatusCode::OK, answer)),
                None => Ok(respond(StatusCode::BAD_REQUEST, Vec::new())),
            }
        }
        (m @ (Method::GET | Method::POST), p) if p.starts_with("/rpc/") => {
            let method = p["/rpc/".len()..].to_string();
            let authorization = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
            let http_method = m.as_str().to_string();
            let params = if m == Method::GET {
                query_params(req.uri().query().unwrap_or_default())
            } else {
                let body = match read_body(req.into_body()).await {
                    Ok(b) => b,
                    Err(r) => return Ok(r),
                };
                if body.iter().all(u8::is_ascii_whitespace) {
                    Value::Null
                } else {
                    match serde_json::from_slice(&body) {
                        Ok(v) => v,
                        Err(_) => return Ok(respond(StatusCode::BAD_REQUEST, br#"{"code":-103,"message":"Invalid JSON body"}"#.to_vec())),
                    }
                }
            };
            let answer = ask(&commands, |reply| Command::Http { method, params, authorization, http_method, reply }).await.ok_or_else(gone)?;
            if !answer.delay.is_zero() {
                tokio::time::sleep(answer.delay).await;
            }
            let mut r = respond(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), answer.body);
            if let Some(www) = answer.www_authenticate.and_then(|w| hyper::header::HeaderValue::from_str(&w).ok()) {
                r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, www);
            }
            Ok(r)
        }
        _ => Ok(respond(StatusCode::NOT_FOUND, Vec::new())),
    }
}

/// Answers the WebSocket handshake and serves the socket on its own task.
async fn upgrade(mut req: Request<Incoming>, commands: mpsc::Sender<Command>, slot: Arc<ConnSlot>) -> Response<Full<Bytes>> {
    let Some(key) = req.headers().get(hyper::header::SEC_WEBSOCKET_KEY).map(|k| k.as_bytes().to_vec()) else {
        return respond(StatusCode::BAD_REQUEST, Vec::new());
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().max_message_size(Some(MAX_WS_MESSAGE)).max_frame_size(Some(MAX_WS_MESSAGE));
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        serve_ws(ws, commands).await;
        drop(slot);
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(hyper::header::UPGRADE, hyper::header::HeaderValue::from_static("websocket"));
    h.insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("Upgrade"));
    if let Ok(v) = hyper::header::HeaderValue::from_str(&accept) {
        h.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

async fn serve_ws<S>(mut ws: tokio_tungstenite::WebSocketStream<S>, commands: mpsc::Sender<Command>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let q = queued.clone();
    let Some(peer) = ask(&commands, |reply| Command::WsOpen { tx, queued: q, reply }).await else {
        return; // down: dropped without a close frame
    };
    loop {
        tokio::select! {
            m = tokio::time::timeout(WS_IDLE, ws.next()) => match m {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if commands.send(Command::WsIn { peer, bytes: t.as_bytes().to_vec() }).await.is_err() {
                        return;
                    }
                }
                Ok(Some(Ok(Message::Binary(b)))) => {
                    if commands.send(Command::WsIn { peer, bytes: b.to_vec() }).await.is_err() {
                        return;
                    }
                }
                Ok(Some(Ok(_))) => {} // pings are answered by tungstenite
                Ok(Some(Err(_)) | None) => break,
                Err(_) => {
                    tracing::debug!("shelly: a WebSocket silent for {WS_IDLE:?} dropped");
                    break;
                }
            },
            o = rx.recv() => match o {
                Some(WsOut::Frame(bytes)) => {
                    let n = bytes.len();
                    let text = String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                    let sent = ws.send(Message::text(text)).await;
                    queued.fetch_sub(n, Ordering::Relaxed);
                    if sent.is_err() {
                        break;
                    }
                }
                Some(WsOut::Drop) | None => {
                    let _ = commands.send(Command::WsClosed { peer }).await;
                    return; // no close frame: the client sees 1006
                }
            },
        }
    }
    let _ = commands.send(Command::WsClosed { peer }).await;
}

struct InFlight {
    due: Duration,
    toward: Direction,
    bytes: Vec<u8>,
    peer: Peer,
}

struct Host {
    core: ShellyDevice,
    epoch: Instant,
    link: Arc<Mutex<LinkEngine>>,
    /// Each WebSocket's outgoing queue and the bytes waiting in it.
    ws: HashMap<Peer, (mpsc::UnboundedSender<WsOut>, Arc<AtomicUsize>)>,
    slow_readers: LogEvery,
    /// `POST /rpc` frames waiting for their answer, by the peer made for each.
    pending_frames: HashMap<Peer, oneshot::Sender<Option<Vec<u8>>>>,
    in_flight: Vec<InFlight>,
    next_peer: u64,
    events: broadcast::Sender<ShellyEvent>,
    ble: Option<ShellyBleSide>,
    /// The device came up: advertise again (async, so done in the loop).
    readvertise: bool,
}

impl Host {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, mut stop: watch::Receiver<bool>, mut gatt: Option<mpsc::UnboundedReceiver<GattEvent>>) {
        loop {
            let wake = self.next_wakeup().map(|d| tokio::time::Instant::from_std(self.epoch + d));
            tokio::select! {
                _ = stop.changed() => return,
                c = commands.recv() => match c {
                    Some(c) => self.command(c),
                    None => return,
                },
                e = async { gatt.as_mut().expect("guarded").recv().await }, if gatt.is_some() => match e {
                    Some(e) => self.gatt_event(e),
                    None => {
                        tracing::warn!("shelly ble: the GATT service went; serving HTTP and WebSocket only");
                        gatt = None;
                        self.ble = None;
                    }
                },
                _ = async { tokio::time::sleep_until(wake.expect("guarded")).await }, if wake.is_some() => {
                    let now = self.epoch.elapsed();
                    self.deliver_due(now);
                    let _ = self.feed(Input::Timeout, now);
                }
            }
            if std::mem::take(&mut self.readvertise) {
                if let Some(b) = &mut self.ble {
                    if let Err(e) = b.advertise(true).await {
                        tracing::warn!("shelly ble: {e}");
                    }
                }
            }
        }
    }

    /// A central's write or read; a whole request goes to the core.
    fn gatt_event(&mut self, e: GattEvent) {
        let Some(mut ble) = self.ble.take() else { return };
        let next = &mut self.next_peer;
        let frame = ble.on_event(e, || {
            *next += 1;
            Peer(*next)
        });
        self.ble = Some(ble);
        if let Some((peer, bytes)) = frame {
            let now = self.epoch.elapsed();
            if !self.core.is_down() {
                let _ = self.feed(Input::Bytes { from: peer, bytes: &bytes }, now);
            }
        }
    }

    fn next_wakeup(&self) -> Option<Duration> {
        [self.core.next_wakeup(), self.in_flight.iter().map(|f| f.due).min()].into_iter().flatten().min()
    }

    fn new_peer(&mut self) -> Peer {
        self.next_peer += 1;
        Peer(self.next_peer)
    }

    fn command(&mut self, c: Command) {
        let now = self.epoch.elapsed();
        match c {
            Command::Set { key, value, reply } => {
                let r = self.feed(Input::Set { key: &key, value }, now);
                let _ = reply.send(r);
            }
            Command::WsOpen { tx, queued, reply } => {
                if self.core.is_down() {
                    let _ = reply.send(None);
                    return;
                }
                let peer = self.new_peer();
                self.ws.insert(peer, (tx, queued));
                let _ = self.feed(Input::Connected(peer), now);
                let _ = reply.send(Some(peer));
            }
            Command::WsIn { peer, bytes } => self.through_link(Direction::Request, bytes, peer, now),
            Command::WsClosed { peer } => {
                if self.ws.remove(&peer).is_some() {
                    let _ = self.feed(Input::Disconnected(peer), now);
                }
            }
            Command::Http { method, params, authorization, http_method, reply } => {
                let answer = self.core.http_call(&method, &params, authorization.as_deref(), &http_method, now);
                self.publish_events();
                let _ = reply.send(answer);
            }
            Command::Frame { bytes, reply } => {
                let peer = self.new_peer();
                self.pending_frames.insert(peer, reply);
                let _ = self.feed(Input::Bytes { from: peer, bytes: &bytes }, now);
                // An invalid frame (or a device that is down) gets no answer, now or later.
                let answered_later = matches!(crate::protocol::shelly::decode_frame(&bytes), Ok(crate::protocol::shelly::RpcFrame::Call(_))) && !self.core.is_down();
                if !answered_later {
                    if let Some(r) = self.pending_frames.remove(&peer) {
                        let _ = r.send(None);
                    }
                }
            }
            Command::DeviceInfo { reply } => {
                let _ = reply.send((!self.core.is_down()).then(|| self.core.device_info()));
            }
        }
    }

    /// A WebSocket message through the link: what comes out now goes on,
    /// what a fault holds back waits.
    fn through_link(&mut self, direction: Direction, bytes: Vec<u8>, peer: Peer, now: Duration) {
        let wall_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let emissions = self.link.lock().unwrap_or_else(|p| p.into_inner()).process(direction, &bytes, now.as_nanos() as u64, wall_ns);
        for e in emissions {
            if e.after.is_zero() {
                self.emit(e.toward, e.bytes, peer, now);
            } else if self.in_flight.len() < HELD_FRAMES {
                self.in_flight.push(InFlight { due: now + e.after, toward: e.toward, bytes: e.bytes, peer });
            }
        }
    }

    fn deliver_due(&mut self, now: Duration) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight).into_iter().partition(|f| f.due <= now);
        self.in_flight = later;
        for f in due {
            self.emit(f.toward, f.bytes, f.peer, now);
        }
    }

    fn emit(&mut self, toward: Direction, bytes: Vec<u8>, peer: Peer, now: Duration) {
        match toward {
            Direction::Request => {
                let _ = self.feed(Input::Bytes { from: peer, bytes: &bytes }, now);
            }
            Direction::Response => self.to_socket(peer, bytes, now),
        }
    }

    /// A frame for a WebSocket; a reader that lets [`WS_QUEUED_BYTES`] pile up is dropped.
    fn to_socket(&mut self, peer: Peer, bytes: Vec<u8>, now: Duration) {
        let Some((tx, queued)) = self.ws.get(&peer) else { return };
        if queued.fetch_add(bytes.len(), Ordering::Relaxed) + bytes.len() <= WS_QUEUED_BYTES {
            let _ = tx.send(WsOut::Frame(bytes));
            return;
        }
        let _ = tx.send(WsOut::Drop);
        self.ws.remove(&peer);
        if let Some(more) = self.slow_readers.check(Instant::now()) {
            tracing::warn!("shelly: dropped a WebSocket with {WS_QUEUED_BYTES} bytes unread ({more} more since the last line)");
        }
        let _ = self.feed(Input::Disconnected(peer), now);
    }

    fn feed(&mut self, input: Input<'_>, now: Duration) -> Result<(), String> {
        let mut out = Vec::new();
        let r = self.core.handle_input(input, now, &mut out);
        for o in out {
            match o {
                Output::Send { to, bytes } => {
                    if let Some(reply) = self.pending_frames.remove(&to) {
                        let _ = reply.send(Some(bytes));
                    } else if let Some(b) = self.ble.as_mut().filter(|b| b.serves(to)) {
                        b.respond(to, bytes);
                    } else if self.ws.contains_key(&to) {
                        self.through_link(Direction::Response, bytes, to, now);
                    }
                }
                Output::Close(peer) => {
                    if let Some((tx, _)) = self.ws.remove(&peer) {
                        let _ = tx.send(WsOut::Drop);
                    }
                }
                Output::Event(e) => {
                    let _ = self.events.send(e);
                }
            }
        }
        if self.core.is_down() {
            // Held answers die with the device.
            self.in_flight.clear();
            for (_, reply) in self.pending_frames.drain() {
                let _ = reply.send(None);
            }
        }
        self.publish_events();
        r
    }

    fn publish_events(&mut self) {
        for e in self.core.take_events() {
            match (&e, &mut self.ble) {
                (ShellyEvent::Rebooted, Some(b)) => b.reset(),
                (ShellyEvent::Up, Some(_)) => self.readvertise = true,
                _ => {}
            }
            let _ = self.events.send(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_json_when_they_parse() {
        assert_eq!(query_params("id=0&on=true&name=%22x%20y%22&raw=abc"), serde_json::json!({"id": 0, "on": true, "name": "x y", "raw": "abc"}));
        assert_eq!(query_params(""), Value::Null);
    }
}
