//! hilbench's own D-Bus message bus, in-process: the air's default broker.
//!
//! Why not dbus-daemon: a separate process is one more wake-up on every hop
//! of a GATT round trip (central → bus → air → bus → peripheral and back).
//! Why not busd: its match-rule parser refuses bleak's
//! `arg0path='/org/bluez/'` (see `broker.rs`).
//!
//! What it does is what a client of the system bus relies on: SASL
//! EXTERNAL (the socket's peer credentials are the proof) with Unix fd
//! passing, Hello and unique names, well-known names with queueing and
//! replacement, NameOwnerChanged / NameAcquired / NameLost, match rules
//! (including argNpath namespaces), unicast routing with ServiceUnknown for
//! names nobody owns, NoReply for callers whose callee left, and the bus's
//! own methods. Everyone may do everything: it is a test bus on loopback.
//! The wire format is `protocol::dbus`; this is the socket side.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

use crate::protocol::dbus::{self as wire, BusMessage, BusValue, Header, MatchRule, SaslServer, SaslStep, BUS_NAME};

// A connection with more than MAX_QUEUED_BYTES waiting to be written is not
// reading: it is dropped, so one stuck client cannot take the bus's memory.
// A connection gets AUTH_TIMEOUT to authenticate, and at most MAX_INCOMPLETE
// may be authenticating at once (a newcomer closes the oldest), so idle
// sockets can neither take every descriptor nor lock out real clients.
use crate::limits::air_bus::{self as limits, AUTH_TIMEOUT, LIGHT_CALLER_PENDING, MAX_INCOMPLETE, MAX_PENDING_PER_CALLEE, MAX_PENDING_REPLIES, MAX_QUEUED_BYTES, MAX_QUEUED_BYTES_ALL, QUEUED_OVERHEAD};
use crate::limits::{LogEvery, REFUSAL_LOG_PERIOD};

/// One message on its way to a connection; `written` bytes of it are out.
struct Outgoing {
    bytes: Arc<Vec<u8>>,
    fds: Vec<OwnedFd>,
    written: usize,
    /// What of it still counts against the limits: its allocation (not
    /// just its length: an encoded message has room to spare) and
    /// [`QUEUED_OVERHEAD`], less what is written.
    counted: usize,
}

impl Outgoing {
    fn new(bytes: Arc<Vec<u8>>, fds: Vec<OwnedFd>, written: usize) -> Self {
        let counted = bytes.capacity() - written + QUEUED_OVERHEAD;
        Outgoing { bytes, fds, written, counted }
    }
}

/// What a connection has not been able to take yet. While it is not
/// empty only the connection's writer task writes to the socket.
struct OutQueue {
    queue: VecDeque<Outgoing>,
    /// What the queue holds, counted as [`MAX_QUEUED_BYTES`] counts it.
    bytes: usize,
    /// What every connection's queue holds ([`MAX_QUEUED_BYTES_ALL`]).
    all: Arc<AtomicUsize>,
}

impl OutQueue {
    fn new(all: Arc<AtomicUsize>) -> Self {
        OutQueue { queue: VecDeque::new(), bytes: 0, all }
    }

    fn push(&mut self, m: Outgoing) {
        self.bytes += m.counted;
        self.all.fetch_add(m.counted, Ordering::Relaxed);
        self.queue.push_back(m);
    }

    /// `n` more bytes of the front message went out.
    fn wrote(&mut self, n: usize) {
        let Some(m) = self.queue.front_mut() else { return };
        m.written += n;
        let mut gone = n.min(m.counted);
        m.counted -= gone;
        if m.written >= m.bytes.len() {
            gone += m.counted;
            self.queue.pop_front();
        }
        self.bytes -= gone;
        self.all.fetch_sub(gone, Ordering::Relaxed);
    }
}

impl OutQueue {
    /// Forgets what waits: the connection is being dropped for not reading.
    fn clear(&mut self) {
        self.queue.clear();
        self.all.fetch_sub(std::mem::take(&mut self.bytes), Ordering::Relaxed);
    }
}

impl Drop for OutQueue {
    fn drop(&mut self) {
        self.all.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

struct Conn {
    out: Arc<Mutex<OutQueue>>,
    /// Wakes the writer when the queue gets its first message.
    wake: Arc<tokio::sync::Notify>,
    /// To write directly, and to shut the socket when the connection stops reading.
    stream: Arc<UnixStream>,
    stuck: bool,
    rules: Vec<(String, MatchRule)>,
    uid: u32,
    pid: u32,
}

impl Conn {
    /// Drops a connection that does not read: nothing more is queued for it
    /// and what waits is freed now; its reader sees the end and cleans up
    /// as for any departure.
    fn cut_off(&mut self) {
        self.stuck = true;
        self.out.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let _ = nix::sys::socket::shutdown(self.stream.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

#[derive(Default)]
struct State {
    guid: String,
    serial: u32,
    next_unique: u64,
    conns: HashMap<String, Conn>,
    /// Well-known name → owner first, then the queue: (unique name, flags).
    names: BTreeMap<String, VecDeque<(String, u32)>>,
    /// Calls awaiting a reply: (callee, caller, serial).
    pending: HashSet<(String, String, u32)>,
    /// How many of `pending` each caller has (capped at MAX_PENDING_REPLIES).
    pending_by_caller: HashMap<String, usize>,
    /// How many of `pending` each callee owes (capped at MAX_PENDING_PER_CALLEE).
    /// A call whose caller left stays owed until the callee answers it.
    owed_by_callee: HashMap<String, usize>,
    /// Names only their first owner may hold (the air's `org.bluez`), as
    /// dbus-daemon's system policy keeps `org.bluez` for bluetoothd: that
    /// owner, once it has taken one.
    reserved: BTreeMap<&'static str, Option<String>>,
    /// Bytes queued for all connections together.
    queued_all: Arc<AtomicUsize>,
    /// Lines about connections dropped for not reading, at most one per period.
    cut_off_log: LogEvery,
}

/// What a client of the air's bus may not take from the air.
const RESERVED_NAMES: &[&str] = &["org.bluez"];

const ALLOW_REPLACEMENT: u32 = 0x1;
const REPLACE_EXISTING: u32 = 0x2;
const DO_NOT_QUEUE: u32 = 0x4;

impl State {
    fn next_serial(&mut self) -> u32 {
        self.serial = self.serial.wrapping_add(1).max(1);
        self.serial
    }

    fn owner<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if name.starts_with(':') {
            return self.conns.contains_key(name).then_some(name);
        }
        self.names.get(name).and_then(|q| q.front()).map(|(u, _)| u.as_str())
    }

    /// Sends `bytes` to `to`: written at once when nothing of its is
    /// waiting (so connections get messages in the order the bus routed
    /// them, as with dbus-daemon: bleak expects a device's Connected
    /// signal on one connection before the Connect reply on another),
    /// else queued for its writer. False when `to` is gone or stuck.
    fn send_to(&mut self, to: &str, bytes: Arc<Vec<u8>>, fds: Vec<OwnedFd>) -> bool {
        let Some(c) = self.conns.get_mut(to) else { return false };
        if c.stuck {
            return false;
        }
        let mut out = c.out.lock().unwrap_or_else(|p| p.into_inner());
        if out.queue.is_empty() {
            match send_with_fds(c.stream.as_raw_fd(), &bytes, &fds) {
                Ok(n) if n == bytes.len() => return true,
                Ok(n) => out.push(Outgoing::new(bytes, Vec::new(), n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => out.push(Outgoing::new(bytes, fds, 0)),
                // Gone: its reader sees the end and cleans up.
                Err(_) => return false,
            }
            c.wake.notify_one();
            return true;
        }
        if out.bytes + bytes.capacity() + QUEUED_OVERHEAD > MAX_QUEUED_BYTES {
            if let Some(more) = self.cut_off_log.check(std::time::Instant::now()) {
                tracing::warn!("air bus: {to} has {} bytes in {} messages unread; disconnecting it ({more} more cut off since the last line)", out.bytes, out.queue.len());
            }
            drop(out);
            c.cut_off();
            return false;
        }
        out.push(Outgoing::new(bytes, fds, 0));
        drop(out);
        if self.queued_all.load(Ordering::Relaxed) > MAX_QUEUED_BYTES_ALL {
            self.drop_the_most_behind();
        }
        true
    }

    /// Past [`MAX_QUEUED_BYTES_ALL`]: drops the connection with the most
    /// bytes waiting, the air excepted.
    fn drop_the_most_behind(&mut self) {
        let air: Vec<&str> = self.reserved.values().flatten().map(String::as_str).collect();
        let behind: Vec<(usize, &String)> = self
            .conns
            .iter()
            .filter(|(u, c)| !c.stuck && !air.contains(&u.as_str()))
            .map(|(u, c)| (c.out.lock().unwrap_or_else(|p| p.into_inner()).bytes, u))
            .collect();
        // The air's own queue counts in the total but is never dropped: only
        // what the others have waiting can put them over the cap.
        let theirs: usize = behind.iter().map(|(b, _)| b).sum();
        if theirs <= MAX_QUEUED_BYTES_ALL {
            return;
        }
        let Some((bytes, unique)) = behind.into_iter().max() else { return };
        let unique = unique.clone();
        if let Some(more) = self.cut_off_log.check(std::time::Instant::now()) {
            tracing::warn!("air bus: {theirs} bytes unread across connections; disconnecting {unique}, which has {bytes} of them ({more} more cut off since the last line)");
        }
        if let Some(c) = self.conns.get_mut(&unique) {
            c.cut_off();
        }
    }

    fn send_bus(&mut self, to: &str, m: BusMessage) {
        self.send_to(to, Arc::new(m.encode()), Vec::new());
    }

    /// A signal (from anyone, the bus included) to every connection with a
    /// matching rule, once each.
    fn broadcast(&mut self, bytes: &Arc<Vec<u8>>, h: &Header, fds: &[OwnedFd]) {
        let args = wire::leading_string_args(bytes, h);
        let sender = h.sender.clone().unwrap_or_default();
        let targets: Vec<String> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.rules.iter().any(|(_, r)| {
                    r.matches(h, &args, |s| s == sender || (!s.starts_with(':') && self.owner(s) == Some(sender.as_str())) || (s == BUS_NAME && sender == BUS_NAME))
                })
            })
            .map(|(u, _)| u.clone())
            .collect();
        for t in targets {
            let copies: Vec<OwnedFd> = fds.iter().filter_map(|f| f.try_clone().ok()).collect();
            self.send_to(&t, bytes.clone(), copies);
        }
    }

    fn emit(&mut self, member: &str, destination: Option<&str>, body: Vec<BusValue>) {
        let serial = self.next_serial();
        let m = BusMessage::signal(serial, member, destination, body);
        match destination {
            Some(d) => {
                let d = d.to_string();
                self.send_bus(&d, m);
            }
            None => {
                let bytes = Arc::new(m.encode());
                if let Ok(h) = wire::parse_header(&bytes) {
                    self.broadcast(&bytes, &h, &[]);
                }
            }
        }
    }

    fn owner_changed(&mut self, name: &str, old: &str, new: &str) {
        self.emit("NameOwnerChanged", None, vec![BusValue::Str(name.into()), BusValue::Str(old.into()), BusValue::Str(new.into())]);
        if !old.is_empty() && !name.starts_with(':') {
            self.emit("NameLost", Some(old), vec![BusValue::Str(name.into())]);
        }
        if !new.is_empty() {
            self.emit("NameAcquired", Some(new), vec![BusValue::Str(name.into())]);
        }
    }

    /// Whether `who` may own `name`: a reserved name belongs to the first
    /// connection that took it, for good.
    fn may_own(&mut self, name: &str, who: &str) -> bool {
        match self.reserved.iter_mut().find(|(n, _)| **n == name) {
            None => true,
            Some((_, first @ None)) => {
                *first = Some(who.to_string());
                true
            }
            Some((_, Some(first))) => first == who,
        }
    }

    /// RequestName's answer: 1 primary owner, 2 in queue, 3 exists, 4 already owner.
    fn request_name(&mut self, name: &str, who: &str, flags: u32) -> u32 {
        let q = self.names.entry(name.to_string()).or_default();
        match q.front().cloned() {
            None => {
                q.push_back((who.to_string(), flags));
                self.owner_changed(name, "", who);
                1
            }
            Some((owner, _)) if owner == who => {
                if let Some(f) = q.front_mut() {
                    f.1 = flags;
                }
                4
            }
            Some((owner, owner_flags)) => {
                q.retain(|(u, _)| u != who);
                if flags & REPLACE_EXISTING != 0 && owner_flags & ALLOW_REPLACEMENT != 0 {
                    let old = q.pop_front();
                    q.push_front((who.to_string(), flags));
                    // The replaced owner queues again unless it asked not to.
                    if let Some((o, f)) = old {
                        if f & DO_NOT_QUEUE == 0 {
                            q.insert(1, (o, f));
                        }
                    }
                    self.owner_changed(name, &owner, who);
                    1
                } else if flags & DO_NOT_QUEUE != 0 {
                    3
                } else {
                    q.push_back((who.to_string(), flags));
                    2
                }
            }
        }
    }

    /// ReleaseName's answer: 1 released, 2 non-existent, 3 not owner.
    fn release_name(&mut self, name: &str, who: &str) -> u32 {
        let Some(q) = self.names.get_mut(name) else { return 2 };
        let was_owner = q.front().is_some_and(|(u, _)| u == who);
        let before = q.len();
        q.retain(|(u, _)| u != who);
        if q.len() == before {
            return 3;
        }
        let next = q.front().map(|(u, _)| u.clone());
        if q.is_empty() {
            self.names.remove(name);
        }
        if was_owner {
            self.owner_changed(name, who, next.as_deref().unwrap_or(""));
        }
        1
    }

    fn forget_pending(&mut self, p: &(String, String, u32)) {
        if self.pending.remove(p) {
            count_down(&mut self.pending_by_caller, &p.1);
            count_down(&mut self.owed_by_callee, &p.0);
        }
    }

    /// A connection left: its names go (to the next in queue), callers
    /// waiting on it get NoReply, and everyone hears it is gone.
    fn disconnect(&mut self, unique: &str) {
        if self.conns.remove(unique).is_none() {
            return;
        }
        let owned: Vec<String> = self.names.iter().filter(|(_, q)| q.iter().any(|(u, _)| u == unique)).map(|(n, _)| n.clone()).collect();
        for n in owned {
            self.release_name(&n, unique);
        }
        // Calls it made stay owed by their callees (which are still working
        // on them) until answered; only its own count goes.
        self.pending_by_caller.remove(unique);
        let waiting: Vec<(String, String, u32)> = self.pending.iter().filter(|(callee, _, _)| callee == unique).cloned().collect();
        for p in waiting {
            self.forget_pending(&p);
            let (callee, caller, serial) = p;
            if callee == unique {
                let h = Header { serial, sender: Some(caller.clone()), ..Default::default() };
                let s = self.next_serial();
                let mut m = BusMessage::error(s, &h, "org.freedesktop.DBus.Error.NoReply", "Message recipient disconnected from message bus without replying");
                m.destination = Some(caller.clone());
                self.send_bus(&caller, m);
            }
        }
        self.owner_changed(unique, unique, "");
    }
}

fn count_down(counts: &mut HashMap<String, usize>, key: &str) {
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// The running bus. Dropping it stops it and drops every connection.
pub struct InProcessBus {
    address: String,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessBus {
    /// Starts the bus listening on a fresh abstract socket and returns once
    /// it accepts connections. Inside a Tokio runtime it runs on that
    /// runtime, next to the air (a message between them then often needs no
    /// thread to wake up); elsewhere on a thread of its own.
    pub fn start() -> Result<InProcessBus> {
        let name = format!("/tmp/hilbench-air-{:016x}/system_bus_socket", rand::random::<u64>());
        let guid = format!("{:032x}", rand::random::<u128>());
        let addr = <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes())
            .context("abstract socket name")?;
        let std_listener = std::os::unix::net::UnixListener::bind_addr(&addr).with_context(|| format!("binding the air bus to @{name}"))?;
        std_listener.set_nonblocking(true)?;
        let address = format!("unix:abstract={name},guid={guid}");
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let listener = {
                let _guard = handle.enter();
                UnixListener::from_std(std_listener)?
            };
            handle.spawn(accept(listener, guid, stop_rx));
            return Ok(InProcessBus { address, stop, thread: None });
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name("air-bus".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    match UnixListener::from_std(std_listener) {
                        Ok(l) => {
                            let _ = ready_tx.send(Ok(()));
                            accept(l, guid, stop_rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                        }
                    }
                });
                rt.shutdown_timeout(std::time::Duration::from_millis(100));
            })
            .context("spawning the air bus thread")?;
        ready_rx.recv().map_err(|_| anyhow::anyhow!("the air bus thread ended before it listened"))??;
        Ok(InProcessBus { address, stop, thread: Some(thread) })
    }

    pub fn address(&self) -> &str {
        &self.address
    }
}

impl Drop for InProcessBus {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Returns once the bus is told to stop (or its owner is gone).
async fn until_stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Accepts connections until told to stop; then every connection ends.
async fn accept(listener: UnixListener, guid: String, stop: tokio::sync::watch::Receiver<bool>) {
    let state = Arc::new(Mutex::new(State { guid, reserved: RESERVED_NAMES.iter().map(|n| (*n, None)).collect(), ..Default::default() }));
    let stopped = stop.clone();
    let authenticating = Arc::new(Mutex::new(Authenticating::default()));
    let mut refused_log = LogEvery::new(REFUSAL_LOG_PERIOD);
    let mut accept_log = LogEvery::new(REFUSAL_LOG_PERIOD);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (incomplete, evicted, made_room) = Incomplete::admit(&authenticating);
                    if made_room {
                        if let Some(more) = refused_log.check(std::time::Instant::now()) {
                            tracing::warn!("air bus: {MAX_INCOMPLETE} connections are still authenticating; closing the oldest to make room ({more} more since the last line)");
                        }
                    }
                    let state = state.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            r = serve(stream, state, incomplete) => if let Err(e) = r {
                                tracing::debug!("air bus connection ended: {e:#}");
                            },
                            Ok(()) = evicted => tracing::debug!("air bus: closed a connection still authenticating, the oldest of {MAX_INCOMPLETE}"),
                            _ = until_stopped(stop.clone()) => {}
                        }
                    });
                }
                Err(e) => {
                    if let Some(more) = accept_log.check(std::time::Instant::now()) {
                        tracing::warn!("air bus: accept failed: {e} ({more} more since the last line)");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = until_stopped(stopped.clone()) => break,
        }
    }
    // Dropping the writers' senders ends them and closes every socket.
    lock(&state).conns.clear();
}

/// The connections still authenticating, oldest first, each with the way
/// to close it. Past MAX_INCOMPLETE the oldest is closed to make room, as
/// dbus-daemon drops its oldest incomplete connection: closing the newest
/// instead let a flood of silent sockets lock out every client, even one
/// that authenticates at once.
#[derive(Default)]
struct Authenticating {
    next: u64,
    waiting: VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
}

/// One connection that has not authenticated yet; listed until dropped.
struct Incomplete {
    id: u64,
    list: Arc<Mutex<Authenticating>>,
}

impl Incomplete {
    /// Lists a new connection; returns it, the signal that it was evicted,
    /// and whether the oldest had to be evicted to make room.
    fn admit(list: &Arc<Mutex<Authenticating>>) -> (Self, tokio::sync::oneshot::Receiver<()>, bool) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut l = list.lock().unwrap_or_else(|p| p.into_inner());
        let made_room = l.waiting.len() >= MAX_INCOMPLETE;
        if made_room {
            if let Some((_, evict)) = l.waiting.pop_front() {
                let _ = evict.send(());
            }
        }
        let id = l.next;
        l.next += 1;
        l.waiting.push_back((id, tx));
        (Incomplete { id, list: list.clone() }, rx, made_room)
    }
}

impl Drop for Incomplete {
    fn drop(&mut self) {
        let mut l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        l.waiting.retain(|(id, _)| *id != self.id);
    }
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads what is there, with any file descriptors passed along.
fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut VecDeque<OwnedFd>) -> std::io::Result<usize> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 253]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT).map_err(std::io::Error::from)?;
    let n = msg.bytes;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just gave us these descriptors; nothing else owns them.
                fds.extend(received.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
    }
    Ok(n)
}

fn send_with_fds(fd: RawFd, bytes: &[u8], fds: &[OwnedFd]) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL, None).map_err(std::io::Error::from)
}

async fn write_all(stream: &UnixStream, mut bytes: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    let mut fds = fds;
    while !bytes.is_empty() {
        let n = stream.async_io(Interest::WRITABLE, || send_with_fds(stream.as_raw_fd(), bytes, fds)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
        fds = &[];
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes what a connection could not take at once, in order, as its
/// socket drains.
async fn writer(stream: Arc<UnixStream>, out: Arc<Mutex<OutQueue>>, wake: Arc<tokio::sync::Notify>) {
    let lock_out = || out.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let front = {
            let mut o = lock_out();
            o.queue.front_mut().map(|m| (m.bytes.clone(), m.written, std::mem::take(&mut m.fds)))
        };
        let Some((bytes, written, fds)) = front else {
            wake.notified().await;
            continue;
        };
        let rest = &bytes[written..];
        let n = match stream.async_io(Interest::WRITABLE, || send_with_fds(stream.as_raw_fd(), rest, &fds)).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        lock_out().wrote(n);
    }
}

async fn serve(stream: UnixStream, state: Arc<Mutex<State>>, incomplete: Incomplete) -> Result<()> {
    let cred = stream.peer_cred().ok();
    let (uid, pid) = (cred.map(|c| c.uid()).unwrap_or(0), cred.and_then(|c| c.pid()).unwrap_or(0).max(0) as u32);
    let guid = lock(&state).guid.clone();
    let stream = Arc::new(stream);
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
    // Per connection: small, as a thousand peripherals may each have one.
    let mut buf = vec![0u8; 16 * 1024];
    let mut sasl = SaslServer::for_peer(cred.map(|c| c.uid()));
    let authenticated = tokio::time::timeout(AUTH_TIMEOUT, async {
        loop {
            let n = stream.async_io(Interest::READABLE, || recv_with_fds(stream.as_raw_fd(), &mut buf, &mut fds)).await?;
            if n == 0 {
                return Ok(None);
            }
            match sasl.feed(&buf[..n], &guid).map_err(|e| anyhow::anyhow!("authentication: {e}"))? {
                SaslStep::Reply(r) => write_all(&stream, &r, &[]).await?,
                SaslStep::Begin { reply, rest } => {
                    write_all(&stream, &reply, &[]).await?;
                    return Ok::<_, anyhow::Error>(Some(rest));
                }
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("not authenticated within {AUTH_TIMEOUT:?}: closed"))??;
    drop(incomplete);
    let Some(mut pending) = authenticated else { return Ok(()) };
    let out = Arc::new(Mutex::new(OutQueue::new(lock(&state).queued_all.clone())));
    let wake = Arc::new(tokio::sync::Notify::new());
    // Ends with this function, however it ends (the bus stopping drops it mid-await).
    let _writer = AbortOnDrop(tokio::spawn(writer(stream.clone(), out.clone(), wake.clone())));
    let mut conn = Some(Conn { out, wake, stream: stream.clone(), stuck: false, rules: Vec::new(), uid, pid });
    let mut unique: Option<String> = None;
    let result = async {
        loop {
            while let Some(total) = wire::frame_len(&pending).map_err(|e| anyhow::anyhow!("{e}"))? {
                if pending.len() < total {
                    break;
                }
                let msg: Vec<u8> = pending.drain(..total).collect();
                let h = wire::parse_header(&msg).map_err(|e| anyhow::anyhow!("{e}"))?;
                let n = h.unix_fds as usize;
                if n > fds.len() {
                    anyhow::bail!("a message says it carries {n} descriptors, {} arrived", fds.len());
                }
                let carried: Vec<OwnedFd> = fds.drain(..n).collect();
                match &unique {
                    None => unique = Some(hello(&state, &msg, &h, &mut conn)?),
                    Some(u) => route(&state, u, &msg, h, carried)?,
                }
            }
            // Descriptors belong to the message whose bytes carried them; any
            // left once every message is read were sent without a UNIX_FDS count.
            if pending.is_empty() && !fds.is_empty() {
                anyhow::bail!("{} file descriptors arrived with no message declaring them", fds.len());
            }
            if pending.capacity() > 1024 * 1024 && pending.len() < 64 * 1024 {
                pending.shrink_to(64 * 1024);
            }
            let n = stream.async_io(Interest::READABLE, || recv_with_fds(stream.as_raw_fd(), &mut buf, &mut fds)).await?;
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&buf[..n]);
        }
    }
    .await;
    if let Some(u) = unique {
        lock(&state).disconnect(&u);
    }
    result
}

/// The first message must be Hello: the connection gets its unique name.
fn hello(state: &Mutex<State>, _msg: &[u8], h: &Header, conn: &mut Option<Conn>) -> Result<String> {
    if h.kind != wire::METHOD_CALL || h.destination.as_deref() != Some(BUS_NAME) || h.member.as_deref() != Some("Hello") {
        anyhow::bail!("the first message is not Hello to {BUS_NAME}");
    }
    let mut st = lock(state);
    st.next_unique += 1;
    let unique = format!(":1.{}", st.next_unique);
    let c = conn.take().ok_or_else(|| anyhow::anyhow!("Hello twice"))?;
    st.conns.insert(unique.clone(), c);
    let serial = st.next_serial();
    let to = Header { sender: Some(unique.clone()), ..h.clone() };
    st.send_bus(&unique, BusMessage::method_return(serial, &to, vec![BusValue::Str(unique.clone())]));
    st.owner_changed(&unique, "", &unique);
    Ok(unique)
}

fn route(state: &Mutex<State>, from: &str, msg: &[u8], mut h: Header, fds: Vec<OwnedFd>) -> Result<()> {
    let stamped = Arc::new(wire::with_sender(msg, &h, from).map_err(|e| anyhow::anyhow!("{e}"))?);
    h.sender = Some(from.to_string());
    // The stamp moved the body; the header's offsets must follow.
    let h = wire::parse_header(&stamped).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut st = lock(state);
    match h.destination.clone() {
        Some(d) if d == BUS_NAME => {
            if h.kind == wire::METHOD_CALL {
                bus_method(&mut st, from, &stamped, &h);
            }
        }
        Some(d) => match st.owner(&d).map(str::to_string) {
            Some(to) => {
                if h.expects_reply() {
                    // A caller that never waits for its answers cannot pile
                    // calls up on the callee (dbus-daemon's max_replies_per_connection):
                    // without this, calls flooding org.bluez filled the air's
                    // own queue and the bus dropped the air.
                    // The air itself (owner of a reserved name) is exempt: its one
                    // connection carries every simulated central's GATT calls to the
                    // device apps, and a refusal there would be a fault no real
                    // device shows.
                    let waiting = st.pending_by_caller.get(from).copied().unwrap_or(0);
                    let system_service = st.reserved.values().any(|owner| owner.as_deref() == Some(from));
                    if waiting >= MAX_PENDING_REPLIES && !system_service {
                        let s = st.next_serial();
                        let m = BusMessage::error(s, &h, "org.freedesktop.DBus.Error.LimitsExceeded", "The maximum number of pending replies per connection has been reached");
                        st.send_bus(from, m);
                        return Ok(());
                    }
                    // However many callers come and go, a callee has at most
                    // MAX_PENDING_PER_CALLEE calls to answer (dbus-daemon refuses a
                    // call when its destination's queue is full): the air reads
                    // every call at once, so calls from callers that were cut off
                    // and came back piled up inside it without this.
                    // A caller with only a few calls out still gets through up to
                    // twice that, so callers that flood cannot lock out one that
                    // asks one thing at a time.
                    let owed = st.owed_by_callee.get(&to).copied().unwrap_or(0);
                    let light = waiting < LIGHT_CALLER_PENDING;
                    if !system_service && (owed >= 2 * MAX_PENDING_PER_CALLEE || (owed >= MAX_PENDING_PER_CALLEE && !light)) {
                        let s = st.next_serial();
                        let m = BusMessage::error(s, &h, "org.freedesktop.DBus.Error.LimitsExceeded", &format!("The destination {d} has {MAX_PENDING_PER_CALLEE} calls to answer already"));
                        st.send_bus(from, m);
                        return Ok(());
                    }
                    if st.pending.insert((to.clone(), from.to_string(), h.serial)) {
                        *st.pending_by_caller.entry(from.to_string()).or_default() += 1;
                        *st.owed_by_callee.entry(to.clone()).or_default() += 1;
                    }
                }
                if let (wire::METHOD_RETURN | wire::ERROR, Some(rs)) = (h.kind, h.reply_serial) {
                    st.forget_pending(&(from.to_string(), to.clone(), rs));
                }
                st.send_to(&to, stamped, fds);
            }
            None if h.expects_reply() => {
                let s = st.next_serial();
                let m = BusMessage::error(s, &h, "org.freedesktop.DBus.Error.ServiceUnknown", &format!("The name {d} was not provided by any .service files"));
                st.send_bus(from, m);
            }
            None => {
                // An answer to a caller that left: the call is no longer owed.
                if let (wire::METHOD_RETURN | wire::ERROR, Some(rs)) = (h.kind, h.reply_serial) {
                    st.forget_pending(&(from.to_string(), d, rs));
                }
            }
        },
        None if h.kind == wire::SIGNAL => st.broadcast(&stamped, &h, &fds),
        None => {
            if h.expects_reply() {
                let s = st.next_serial();
                let m = BusMessage::error(s, &h, "org.freedesktop.DBus.Error.InvalidArgs", "a method call on a bus needs a destination");
                st.send_bus(from, m);
            }
        }
    }
    Ok(())
}

/// Methods of `org.freedesktop.DBus` (and Peer, Introspectable) on the bus itself.
fn bus_method(st: &mut State, from: &str, msg: &[u8], h: &Header) {
    let args = wire::bus_call_args(msg, h).unwrap_or_default();
    let s = |i: usize| match args.get(i) {
        Some(BusValue::Str(v)) => Some(v.clone()),
        _ => None,
    };
    let u = |i: usize| match args.get(i) {
        Some(BusValue::U32(v)) => Some(*v),
        _ => None,
    };
    let member = h.member.clone().unwrap_or_default();
    let iface = h.interface.clone().unwrap_or_else(|| BUS_NAME.to_string());
    let bad_args = || Err(("org.freedesktop.DBus.Error.InvalidArgs".to_string(), format!("{member}: wrong arguments (signature `{}`)", h.signature)));
    let reply: Result<Vec<BusValue>, (String, String)> = match (iface.as_str(), member.as_str()) {
        ("org.freedesktop.DBus.Peer", "Ping") => Ok(vec![]),
        ("org.freedesktop.DBus.Peer", "GetMachineId") => Ok(vec![BusValue::Str(st.guid.clone())]),
        ("org.freedesktop.DBus.Introspectable", "Introspect") => Ok(vec![BusValue::Str(INTROSPECTION.into())]),
        (BUS_NAME, "Hello") => Err(("org.freedesktop.DBus.Error.Failed".into(), "Already handled an Hello message".into())),
        (BUS_NAME, "RequestName") => match (s(0), u(1)) {
            (Some(name), Some(_)) if !wire::names::is_bus_name(&name) => {
                Err(("org.freedesktop.DBus.Error.InvalidArgs".into(), format!("Requested bus name \"{name}\" is not valid")))
            }
            (Some(name), Some(_)) if !name.starts_with(':') && name != BUS_NAME && !name.is_empty() && !st.may_own(&name, from) => {
                Err(("org.freedesktop.DBus.Error.AccessDenied".into(), format!("Connection \"{from}\" is not allowed to own the service \"{name}\": it belongs to the virtual air")))
            }
            (Some(name), Some(flags)) if !name.starts_with(':') && name != BUS_NAME && !name.is_empty() => Ok(vec![BusValue::U32(st.request_name(&name, from, flags))]),
            (Some(name), Some(_)) => Err(("org.freedesktop.DBus.Error.InvalidArgs".into(), format!("cannot request the name {name}"))),
            _ => bad_args(),
        },
        (BUS_NAME, "ReleaseName") => match s(0) {
            Some(name) => Ok(vec![BusValue::U32(st.release_name(&name, from))]),
            None => bad_args(),
        },
        (BUS_NAME, "GetNameOwner") => match s(0) {
            Some(n) if n == BUS_NAME => Ok(vec![BusValue::Str(BUS_NAME.into())]),
            Some(n) => match st.owner(&n) {
                Some(o) => Ok(vec![BusValue::Str(o.to_string())]),
                None => Err(("org.freedesktop.DBus.Error.NameHasNoOwner".into(), format!("Could not get owner of name '{n}': no such name"))),
            },
            None => bad_args(),
        },
        (BUS_NAME, "NameHasOwner") => match s(0) {
            Some(n) => Ok(vec![BusValue::Bool(n == BUS_NAME || st.owner(&n).is_some())]),
            None => bad_args(),
        },
        (BUS_NAME, "ListNames") => {
            let mut names = vec![BUS_NAME.to_string()];
            names.extend(st.conns.keys().cloned());
            names.extend(st.names.keys().cloned());
            Ok(vec![BusValue::StrArray(names)])
        }
        (BUS_NAME, "ListActivatableNames") => Ok(vec![BusValue::StrArray(vec![BUS_NAME.into()])]),
        (BUS_NAME, "ListQueuedOwners") => match s(0) {
            Some(n) => Ok(vec![BusValue::StrArray(st.names.get(&n).map(|q| q.iter().map(|(u, _)| u.clone()).collect()).unwrap_or_default())]),
            None => bad_args(),
        },
        (BUS_NAME, "AddMatch") => match s(0) {
            Some(text) if text.len() > limits::MAX_MATCH_RULE_LENGTH => Err((
                "org.freedesktop.DBus.Error.LimitsExceeded".into(),
                format!("Match rule text is {} bytes, maximum is {}", text.len(), limits::MAX_MATCH_RULE_LENGTH),
            )),
            Some(text) => match MatchRule::parse(&text) {
                Ok(rule) => match st.conns.get_mut(from) {
                    Some(c) if c.rules.len() >= limits::MAX_MATCH_RULES => Err((
                        "org.freedesktop.DBus.Error.LimitsExceeded".into(),
                        format!("Connection \"{from}\" is trying to add too many match rules (at most {})", limits::MAX_MATCH_RULES),
                    )),
                    Some(c) => {
                        c.rules.push((text, rule));
                        Ok(vec![])
                    }
                    None => Ok(vec![]),
                },
                Err(e) => Err(("org.freedesktop.DBus.Error.MatchRuleInvalid".into(), format!("{text}: {e}"))),
            },
            None => bad_args(),
        },
        (BUS_NAME, "RemoveMatch") => match s(0) {
            Some(text) => {
                let parsed = MatchRule::parse(&text).ok();
                let removed = st.conns.get_mut(from).is_some_and(|c| {
                    let at = c.rules.iter().position(|(t, r)| *t == text || Some(r) == parsed.as_ref());
                    at.map(|i| c.rules.remove(i)).is_some()
                });
                if removed {
                    Ok(vec![])
                } else {
                    Err(("org.freedesktop.DBus.Error.MatchRuleNotFound".into(), "The given match rule wasn't found and can't be removed".into()))
                }
            }
            None => bad_args(),
        },
        (BUS_NAME, "GetConnectionUnixUser" | "GetConnectionUnixProcessID" | "GetConnectionCredentials") => match s(0) {
            Some(n) => match st.owner(&n).and_then(|o| st.conns.get(o)) {
                Some(c) => Ok(match member.as_str() {
                    "GetConnectionUnixUser" => vec![BusValue::U32(c.uid)],
                    "GetConnectionUnixProcessID" => vec![BusValue::U32(c.pid)],
                    _ => vec![BusValue::U32Dict(vec![("UnixUserID".into(), c.uid), ("ProcessID".into(), c.pid)])],
                }),
                None => Err(("org.freedesktop.DBus.Error.NameHasNoOwner".into(), format!("Could not get credentials of '{n}': no such name"))),
            },
            None => bad_args(),
        },
        (BUS_NAME, "GetId") => Ok(vec![BusValue::Str(st.guid.clone())]),
        (BUS_NAME, "StartServiceByName") => match s(0) {
            Some(n) if st.owner(&n).is_some() => Ok(vec![BusValue::U32(2)]),
            Some(n) => Err(("org.freedesktop.DBus.Error.ServiceUnknown".into(), format!("The name {n} was not provided by any .service files"))),
            None => bad_args(),
        },
        (BUS_NAME, "UpdateActivationEnvironment") => Err(("org.freedesktop.DBus.Error.AccessDenied".into(), "not on this bus".into())),
        _ => Err(("org.freedesktop.DBus.Error.UnknownMethod".into(), format!("{iface}.{member} does not exist on the air bus"))),
    };
    if !h.expects_reply() {
        return;
    }
    let serial = st.next_serial();
    let m = match reply {
        Ok(body) => BusMessage::method_return(serial, h, body),
        Err((name, text)) => BusMessage::error(serial, h, &name, &text),
    };
    st.send_bus(from, m);
}

const INTROSPECTION: &str = r#"<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
  <interface name="org.freedesktop.DBus">
    <method name="Hello"><arg direction="out" type="s"/></method>
    <method name="RequestName"><arg direction="in" type="s"/><arg direction="in" type="u"/><arg direction="out" type="u"/></method>
    <method name="ReleaseName"><arg direction="in" type="s"/><arg direction="out" type="u"/></method>
    <method name="GetNameOwner"><arg direction="in" type="s"/><arg direction="out" type="s"/></method>
    <method name="NameHasOwner"><arg direction="in" type="s"/><arg direction="out" type="b"/></method>
    <method name="ListNames"><arg direction="out" type="as"/></method>
    <method name="AddMatch"><arg direction="in" type="s"/></method>
    <method name="RemoveMatch"><arg direction="in" type="s"/></method>
    <method name="GetId"><arg direction="out" type="s"/></method>
    <signal name="NameOwnerChanged"><arg type="s"/><arg type="s"/><arg type="s"/></signal>
    <signal name="NameLost"><arg type="s"/></signal>
    <signal name="NameAcquired"><arg type="s"/></signal>
  </interface>
  <interface name="org.freedesktop.DBus.Peer"><method name="Ping"/></interface>
</node>
"#;
