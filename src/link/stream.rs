//! Connection faults carried out on TCP: the I/O half of [`super::conn`].
//!
//! A link with connection faults opens its TCP connections through
//! [`FaultedConnector`]. Each open connection is carried by a pump between the
//! socket and an in-memory pipe the client reads and writes (TLS and the
//! WebSocket run on the pipe, unchanged), one reader and one writer per
//! direction, so a held-back direction never blocks the other. The pump asks
//! the engine before every read and write; a fault added while a connection
//! is idle wakes it through a generation counter.
//!
//! A reset is a real RST (SO_LINGER 0, no FIN first), and the client sees
//! ECONNRESET, as after a peer's reset. A close is a FIN both ways.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::conn::{Budget, ConnFaultEngine, ConnId, Opening};
use super::fault::FaultRule;
use super::record::Direction;
use crate::transport::ws_client::{ByteStream, StreamConnector};

/// Bytes read from one side in one go.
const CHUNK: usize = 16 * 1024;
/// The pipe between the pump and the client: about a socket buffer.
const PIPE: usize = 64 * 1024;

/// The connection faults of one link, shared by its owner (which adds and
/// clears rules) and the pumps of its connections.
#[derive(Debug)]
pub struct ConnFaults {
    link: String,
    engine: Mutex<ConnFaultEngine>,
    changed: watch::Sender<u64>,
    stopped: AtomicBool,
}

impl ConnFaults {
    pub fn new(link: impl Into<String>, seed: u64) -> Arc<Self> {
        Arc::new(ConnFaults {
            link: link.into(),
            engine: Mutex::new(ConnFaultEngine::new(seed)),
            changed: watch::channel(0).0,
            stopped: AtomicBool::new(false),
        })
    }

    fn engine(&self) -> MutexGuard<'_, ConnFaultEngine> {
        // The engine never panics while held; a poisoned lock still holds a sound engine.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn add_rule(&self, rule: FaultRule) {
        tracing::debug!(link = %self.link, ?rule, "connection fault added");
        self.engine().add_rule(rule);
        self.bump();
    }

    pub fn clear(&self) {
        self.engine().clear();
        self.bump();
    }

    pub fn clear_named(&self, name: &str) -> bool {
        let found = self.engine().clear_named(name);
        self.bump();
        found
    }

    /// Ends every connection the link carries (its owner is stopping).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.bump();
    }

    fn budget(&self, conn: ConnId, direction: Direction) -> Option<Budget> {
        if self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        Some(self.engine().budget(conn, direction))
    }

    async fn connect(self: Arc<Self>, host: String, port: u16) -> io::Result<Box<dyn ByteStream>> {
        let opening = self.engine().open();
        match opening {
            Opening::Refuse => {
                tracing::info!(link = %self.link, "link fault refuse: connection refused");
                Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("connection refused (link `{}`: fault refuse)", self.link)))
            }
            Opening::AcceptClose => {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tracing::info!(link = %self.link, "link fault accept_close: connection closed at once");
                drop(tcp);
                Ok(Box::new(ClosedStream))
            }
            Opening::Open(id) => {
                // Until the pump owns the connection (a connect timeout drops this future).
                let guard = OpenGuard { faults: self.clone(), id: Some(id) };
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                let (app, pump) = tokio::io::duplex(PIPE);
                let state = Arc::new(StreamState::default());
                let id = guard.disarm();
                tokio::spawn(carry_connection(self.clone(), id, tcp, pump, state.clone(), Side::Client));
                Ok(Box::new(LinkStream { inner: app, state }))
            }
        }
    }

    /// A server accepted `tcp`. `None` when a fault ends it at once: `refuse`
    /// resets it (a listening server cannot answer a SYN with a refusal; the
    /// client sees ECONNRESET), `accept_close` closes it (a FIN). Otherwise the
    /// stream the server reads and writes, carried through the link.
    pub async fn accepted(self: &Arc<Self>, mut tcp: TcpStream) -> Option<Box<dyn ByteStream>> {
        let opening = self.engine().open();
        match opening {
            Opening::Refuse => {
                tracing::info!(link = %self.link, "link fault refuse: accepted connection reset");
                let _ = tcp.set_zero_linger();
                None
            }
            Opening::AcceptClose => {
                tracing::info!(link = %self.link, "link fault accept_close: accepted connection closed");
                // A FIN first, and what the client already sent read away: closing a socket
                // with unread bytes would send an RST instead of the close.
                let _ = tcp.shutdown().await;
                // Bounded: a client that keeps sending gets an RST after 64 KiB instead of a FIN.
                let mut sink = [0u8; 4096];
                for _ in 0..16 {
                    if !matches!(tcp.try_read(&mut sink), Ok(n) if n > 0) {
                        break;
                    }
                }
                None
            }
            Opening::Open(id) => {
                let (app, pump) = tokio::io::duplex(PIPE);
                let state = Arc::new(StreamState::default());
                tokio::spawn(carry_connection(self.clone(), id, tcp, pump, state.clone(), Side::Server));
                Some(Box::new(LinkStream { inner: app, state }))
            }
        }
    }
}

/// Which end of its connections a link's owner is: a client's writes are
/// requests, a server's writes are responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// Opens the TCP connections of a link through its [`ConnFaults`].
#[derive(Clone)]
pub struct FaultedConnector(pub Arc<ConnFaults>);

impl StreamConnector for FaultedConnector {
    fn connect(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Box<dyn ByteStream>>> {
        Box::pin(self.0.clone().connect(host.to_string(), port))
    }
}

struct OpenGuard {
    faults: Arc<ConnFaults>,
    id: Option<ConnId>,
}

impl OpenGuard {
    fn disarm(mut self) -> ConnId {
        self.id.take().expect("armed")
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.faults.engine().closed(id);
        }
    }
}

/// What the client's end learns of how the connection ended.
#[derive(Default)]
struct StreamState {
    reset: AtomicBool,
}

/// The client's end of a carried connection.
struct LinkStream {
    inner: DuplexStream,
    state: Arc<StreamState>,
}

impl LinkStream {
    fn reset_error(&self) -> Option<io::Error> {
        self.state.reset.load(Ordering::SeqCst).then(|| io::Error::new(io::ErrorKind::ConnectionReset, "connection reset by peer"))
    }
}

impl AsyncRead for LinkStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.reset_error() {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        // A reset discards what was on its way.
        match (r, self.reset_error()) {
            (Poll::Ready(_), Some(e)) => Poll::Ready(Err(e)),
            (r, _) => r,
        }
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(e) = self.reset_error() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection the peer accepted and closed: writes vanish, reads end.
struct ClosedStream;

impl AsyncRead for ClosedStream {
    fn poll_read(self: Pin<&mut Self>, _cx: &mut Context<'_>, _buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClosedStream {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Where a direction's bytes go, and how that end is finished.
trait Sink: AsyncWrite + Unpin + Send {
    /// `reset`: abortively (RST / ECONNRESET); otherwise a FIN.
    fn finish(self, reset: bool) -> BoxFuture<'static, ()>;
}

struct TcpSink(tokio::net::tcp::OwnedWriteHalf);

impl Sink for TcpSink {
    fn finish(mut self, reset: bool) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if reset {
                // No FIN: the socket closes with an RST once its read half is gone too.
                let _ = self.0.as_ref().set_zero_linger();
                self.0.forget();
            } else {
                let _ = self.0.shutdown().await;
            }
        })
    }
}

impl AsyncWrite for TcpSink {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

struct AppSink {
    half: tokio::io::WriteHalf<DuplexStream>,
    state: Arc<StreamState>,
}

impl Sink for AppSink {
    fn finish(mut self, reset: bool) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if reset {
                self.state.reset.store(true, Ordering::SeqCst);
            }
            // Wakes a client blocked in a read: it then sees the end (or the reset).
            let _ = self.half.shutdown().await;
        })
    }
}

impl AsyncWrite for AppSink {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.half).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.half).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.half).poll_shutdown(cx)
    }
}

/// Bytes read from one side, stamped with when.
enum Carried {
    Bytes(Instant, Vec<u8>),
    /// The source ended (EOF, or a close fault): finish the sink with a FIN.
    End,
    /// The source failed with a reset: pass the reset on.
    Reset,
}

/// One connection from connect to close: both directions, then the engine forgets it.
async fn carry_connection(faults: Arc<ConnFaults>, id: ConnId, tcp: TcpStream, app: DuplexStream, state: Arc<StreamState>, side: Side) {
    let (tcp_r, tcp_w) = tcp.into_split();
    let (app_r, app_w) = tokio::io::split(app);
    let (out_tx, out_rx) = mpsc::channel(16);
    let (in_tx, in_rx) = mpsc::channel(16);
    let one = |d| OneWay::new(faults.clone(), id, d);
    // What the owner writes goes out; what the peer writes comes in.
    let (outward, inward) = match side {
        Side::Client => (Direction::Request, Direction::Response),
        Side::Server => (Direction::Response, Direction::Request),
    };
    tokio::join!(
        one(outward).read(app_r, out_tx),
        one(outward).write(out_rx, TcpSink(tcp_w)),
        one(inward).read(tcp_r, in_tx),
        one(inward).write(in_rx, AppSink { half: app_w, state }),
    );
    faults.engine().closed(id);
    tracing::debug!(link = %faults.link, conn = id, "connection carried to its end");
}

/// One direction of one connection: the client's writes are requests, the peer's are responses.
struct OneWay {
    faults: Arc<ConnFaults>,
    id: ConnId,
    direction: Direction,
    changed: watch::Receiver<u64>,
}

/// What a wait for the engine ended with.
enum Verdict {
    Go(Budget),
    Reset,
    Close,
    Stopped,
}

impl OneWay {
    fn new(faults: Arc<ConnFaults>, id: ConnId, direction: Direction) -> Self {
        let changed = faults.changed.subscribe();
        OneWay { faults, id, direction, changed }
    }

    /// The budget, once bytes may move (waits out a half-open).
    async fn verdict(&mut self) -> Verdict {
        loop {
            self.changed.borrow_and_update();
            let Some(b) = self.faults.budget(self.id, self.direction) else { return Verdict::Stopped };
            if b.reset_in == Some(0) {
                tracing::debug!(link = %self.faults.link, conn = self.id, direction = ?self.direction, "reset");
                return Verdict::Reset;
            }
            if b.hold {
                if self.changed.changed().await.is_err() {
                    return Verdict::Stopped;
                }
                continue;
            }
            if b.close_in == Some(0) {
                return Verdict::Close;
            }
            return Verdict::Go(b);
        }
    }

    /// Reads from `src` as the budget allows and queues what it read.
    async fn read(mut self, mut src: impl AsyncRead + Unpin, tx: mpsc::Sender<Carried>) {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let b = match self.verdict().await {
                Verdict::Go(b) => b,
                Verdict::Stopped => return,
                Verdict::Reset => {
                    let _ = tx.send(Carried::Reset).await;
                    return;
                }
                Verdict::Close => {
                    let _ = tx.send(Carried::End).await;
                    return;
                }
            };
            let max = [b.reset_in, b.close_in].into_iter().flatten().fold(CHUNK as u64, u64::min) as usize;
            let n = tokio::select! {
                // A fault added since the budget was read must win over bytes that arrived with it.
                biased;
                _ = self.changed.changed() => continue,
                r = src.read(&mut buf[..max]) => match r {
                    Ok(0) => {
                        let _ = tx.send(Carried::End).await;
                        return;
                    }
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!(link = %self.faults.link, conn = self.id, direction = ?self.direction, "read failed: {e}");
                        let reset = e.kind() == io::ErrorKind::ConnectionReset;
                        let _ = tx.send(if reset { Carried::Reset } else { Carried::End }).await;
                        return;
                    }
                },
            };
            let ends = {
                let mut e = self.faults.engine();
                e.moved(self.id, self.direction, n as u64);
                let b = e.budget(self.id, self.direction);
                b.reset_in == Some(0) || b.close_in == Some(0)
            };
            if tx.send(Carried::Bytes(Instant::now(), buf[..n].to_vec())).await.is_err() {
                return;
            }
            // The other direction may be waiting for bytes: it must hear the end too.
            if ends {
                self.faults.bump();
            }
        }
    }

    /// Writes what the reader queued, late or slowly as the budget says.
    async fn write(mut self, mut rx: mpsc::Receiver<Carried>, mut sink: impl Sink + 'static) {
        loop {
            let item = tokio::select! {
                // What the reader queued comes first: it was read before any reset.
                biased;
                item = rx.recv() => item,
                // A reset (or stop) must not wait for the next bytes.
                v = self.verdict_changes() => match v {
                    Verdict::Reset => return sink.finish(true).await,
                    _ => return,
                },
            };
            let (at, bytes) = match item {
                Some(Carried::Bytes(at, bytes)) => (at, bytes),
                Some(Carried::Reset) => return sink.finish(true).await,
                Some(Carried::End) | None => {
                    // A reader that stopped for a reset leaves the verdict behind.
                    match self.verdict().await {
                        Verdict::Reset => return sink.finish(true).await,
                        Verdict::Stopped => return,
                        Verdict::Go(b) => tokio::time::sleep(b.slow_close).await,
                        Verdict::Close => {
                            let b = self.faults.budget(self.id, self.direction).unwrap_or_default();
                            tokio::time::sleep(b.slow_close).await;
                        }
                    }
                    return sink.finish(false).await;
                }
            };
            match self.pass(at, &bytes, &mut sink).await {
                Ok(()) => {}
                Err(Verdict::Reset) => return sink.finish(true).await,
                Err(_) => return,
            }
        }
    }

    /// Returns only when the connection must end without more bytes (reset or stop).
    async fn verdict_changes(&mut self) -> Verdict {
        loop {
            if self.changed.changed().await.is_err() {
                return Verdict::Stopped;
            }
            match self.faults.budget(self.id, self.direction) {
                None => return Verdict::Stopped,
                Some(b) if b.reset_in == Some(0) => return Verdict::Reset,
                Some(_) => {}
            }
        }
    }

    /// Waits until bytes read `at` are due. False when the faults changed
    /// meanwhile (the caller looks again: a cleared latency ends the wait).
    async fn wait_latency(&mut self, at: Instant, latency: Duration) -> Result<bool, Verdict> {
        let due = at + latency;
        if Instant::now() >= due {
            return Ok(true);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due) => Ok(true),
            r = self.changed.changed() => match r {
                Err(_) => Err(Verdict::Stopped),
                Ok(()) => match self.faults.budget(self.id, self.direction) {
                    None => Err(Verdict::Stopped),
                    Some(b) if b.reset_in == Some(0) => Err(Verdict::Reset),
                    Some(_) => Ok(false),
                },
            },
        }
    }

    /// Sends one chunk after its latency, at the bandwidth in force.
    async fn pass(&mut self, at: Instant, bytes: &[u8], sink: &mut (impl Sink + 'static)) -> Result<(), Verdict> {
        let mut sent = 0;
        while sent < bytes.len() {
            // Bytes read before a reset or a close still go out; the reader queues the end after them.
            let b = match self.verdict().await {
                Verdict::Go(b) => b,
                Verdict::Close | Verdict::Reset => self.faults.budget(self.id, self.direction).unwrap_or_default(),
                Verdict::Stopped => return Err(Verdict::Stopped),
            };
            if !self.wait_latency(at, b.latency).await? {
                continue;
            }
            // A twentieth of a second's worth at a time, so a limit changes quickly.
            let slice = b.bandwidth.map_or(bytes.len() - sent, |r| (r / 20).max(1) as usize).min(bytes.len() - sent);
            if sink.write_all(&bytes[sent..sent + slice]).await.is_err() {
                return Err(Verdict::Stopped);
            }
            sent += slice;
            if let Some(rate) = b.bandwidth {
                let pause = Duration::from_secs_f64(slice as f64 / rate as f64);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    v = self.verdict_changes() => return Err(v),
                }
            }
        }
        Ok(())
    }
}
