//! The RS-485 bus: one shared medium joining PTY ports (where masters,
//! sniffers and the client under test plug in) and simulated packs.
//!
//! What one port transmits, every device and every other port hears; what a
//! device transmits, every port hears. Each port and each device reaches the
//! bus through its own [`LinkEngine`], so faults can sit on one pack or on
//! one adapter. Two devices answering the same request at once collide.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;

use super::framer::{StreamFramer, StreamRole};
use super::pty::PtyPort;
use super::serial::{byte_time, rtu_silence};
use super::TransportError;
use crate::link::fault::{FaultRule, LinkCounters, LinkEngine};
use crate::link::record::{Direction, FrameRecord};
use crate::observe::{ObservationKind, ObservationLog};

/// A frame delivered to a device on the bus. The device answers with the
/// bytes it transmits, or `None` to stay silent.
#[derive(Message)]
#[rtype(result = "Option<Vec<u8>>")]
pub struct BusFrame {
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct BusPortSpec {
    pub name: String,
    /// Where the slave side appears; `None` = only the /dev/pts path.
    pub link_path: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct BusConfig {
    pub name: String,
    pub baud: u32,
    /// Pace bytes at 10 bit-times each and answer only after the request
    /// has finished arriving plus the RTU silence interval.
    pub wire_time: bool,
    pub ports: Vec<BusPortSpec>,
    pub seed: u64,
    /// Keep at most this many frames per link (None = all).
    pub frame_limit: Option<usize>,
    /// Record frames at all (scenarios do; `sim` has nobody to read them).
    pub record: bool,
}

/// What each asked device answered (by index), or why it could not.
type DeviceReplies = Vec<(usize, Result<Option<Vec<u8>>, MailboxError>)>;

pub struct BusDevice {
    pub name: String,
    pub recipient: Recipient<BusFrame>,
}

struct Port {
    name: String,
    pty: Rc<PtyPort>,
    link: LinkEngine,
    framer: StreamFramer,
    /// With wire time: when the line is free for the next frame.
    line_free_at: Instant,
    silence: Option<SpawnHandle>,
}

struct Device {
    name: String,
    recipient: Recipient<BusFrame>,
    link: LinkEngine,
}

impl Device {
    /// A device on the bus, with its own link (its faults, its frames).
    fn on(cfg: &BusConfig, d: BusDevice) -> Device {
        let mut link = LinkEngine::new(d.name.clone(), cfg.seed);
        link.set_log_limit(cfg.frame_limit);
        link.set_recording(cfg.record);
        Device { name: d.name, recipient: d.recipient, link }
    }
}

pub struct BusActor {
    cfg: BusConfig,
    ports: Vec<Port>,
    devices: Vec<Device>,
    epoch: Instant,
    wall_epoch_ns: u64,
    log: ObservationLog,
}

impl BusActor {
    /// Opens the bus's PTYs. Fails (and leaves nothing behind) if a port
    /// path is unusable.
    pub fn open(cfg: BusConfig, devices: Vec<BusDevice>, log: ObservationLog) -> Result<Self, TransportError> {
        let mut ports = Vec::new();
        for spec in &cfg.ports {
            // On error, the ports opened so far drop here and remove their links.
            let pty = Rc::new(PtyPort::open(spec.link_path.as_deref())?);
            let mut link = LinkEngine::new(spec.name.clone(), cfg.seed);
            link.set_log_limit(cfg.frame_limit);
            link.set_recording(cfg.record);
            ports.push(Port {
                name: spec.name.clone(),
                pty,
                link,
                framer: StreamFramer::new(StreamRole::Requests),
                line_free_at: Instant::now(),
                silence: None,
            });
        }
        let devices = devices.into_iter().map(|d| Device::on(&cfg, d)).collect();
        let wall_epoch_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Ok(BusActor {
            cfg,
            ports,
            devices,
            epoch: Instant::now(),
            wall_epoch_ns,
            log,
        })
    }

    /// (name, path a client opens) for each port.
    pub fn port_paths(&self) -> Vec<(String, PathBuf)> {
        self.ports
            .iter()
            .map(|p| (p.name.clone(), p.pty.path().to_path_buf()))
            .collect()
    }

    fn times(&self) -> (u64, u64) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        (now, self.wall_epoch_ns + now)
    }

    fn on_silence(&mut self, idx: usize, ctx: &mut Context<Self>) {
        self.ports[idx].silence = None;
        if let Some(frame) = self.ports[idx].framer.flush() {
            tracing::debug!(port = %self.ports[idx].name, len = frame.len(), "undelimited bytes flushed at silence");
            self.on_port_frame(idx, frame, ctx);
        }
    }

    /// A frame a port's master transmitted.
    fn on_port_frame(&mut self, idx: usize, frame: Vec<u8>, ctx: &mut Context<Self>) {
        let (now_ns, wall_ns) = self.times();
        let emissions = self.ports[idx].link.process(Direction::Request, &frame, now_ns, wall_ns);
        for e in emissions {
            if e.toward == Direction::Response {
                // The adapter's own echo: back to the sender only.
                self.write_port(idx, e.bytes, e.after, ctx);
            } else if e.after.is_zero() {
                self.broadcast_request(idx, e.bytes, ctx);
            } else {
                ctx.run_later(e.after, move |act, ctx| act.broadcast_request(idx, e.bytes, ctx));
            }
        }
    }

    fn broadcast_request(&mut self, from: usize, bytes: Vec<u8>, ctx: &mut Context<Self>) {
        // Every other port hears the request (a sniffer on the bus).
        for i in 0..self.ports.len() {
            if i != from {
                self.deliver_to_port(i, Direction::Request, &bytes, Duration::ZERO, ctx);
            }
        }
        if self.cfg.wire_time {
            let busy_until = self.ports.iter().map(|p| p.line_free_at).max();
            if busy_until.is_some_and(|t| Instant::now() < t) {
                // Half-duplex transceivers do not listen while they drive the
                // line: a request sent over a reply reaches no pack.
                self.log.push(
                    &self.cfg.name,
                    ObservationKind::DeviceSilent {
                        reason: "request arrived while a reply was on the line (half-duplex): ignored".into(),
                    },
                );
                return;
            }
        }
        let (now_ns, wall_ns) = self.times();
        let reply_delay = if self.cfg.wire_time {
            byte_time(self.cfg.baud) * bytes.len() as u32 + rtu_silence(self.cfg.baud)
        } else {
            Duration::ZERO
        };
        let mut asked = Vec::new();
        for i in 0..self.devices.len() {
            let em = self.devices[i].link.process(Direction::Request, &bytes, now_ns, wall_ns);
            for e in em {
                if e.toward == Direction::Response {
                    self.transmit(vec![(i, e.bytes)], e.after, ctx);
                } else if e.after.is_zero() {
                    asked.push((i, self.devices[i].recipient.send(BusFrame { bytes: e.bytes })));
                } else {
                    let after = e.after;
                    ctx.run_later(after, move |act, ctx| {
                        let fut = act.devices[i].recipient.send(BusFrame { bytes: e.bytes });
                        ctx.spawn(fut.into_actor(act).map(move |r, act, ctx| {
                            act.on_replies(vec![(i, r)], reply_delay, ctx)
                        }));
                    });
                }
            }
        }
        if asked.is_empty() {
            return;
        }
        let (idx, futs): (Vec<usize>, Vec<_>) = asked.into_iter().unzip();
        ctx.spawn(
            futures::future::join_all(futs)
                .into_actor(self)
                .map(move |results, act, ctx| {
                    let results = idx.into_iter().zip(results).collect();
                    act.on_replies(results, reply_delay, ctx)
                }),
        );
    }

    fn on_replies(
        &mut self,
        results: DeviceReplies,
        delay: Duration,
        ctx: &mut Context<Self>,
    ) {
        let (now_ns, wall_ns) = self.times();
        let mut at_once: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, r) in results {
            let reply = match r {
                Ok(Some(reply)) => reply,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(device = %self.devices[i].name, "device did not answer the bus: {e}");
                    continue;
                }
            };
            for e in self.devices[i].link.process(Direction::Response, &reply, now_ns, wall_ns) {
                if e.toward != Direction::Response {
                    continue; // an echo of a reply goes back into the device: nobody hears it
                }
                if e.after.is_zero() {
                    at_once.push((i, e.bytes));
                } else {
                    self.transmit(vec![(i, e.bytes)], delay + e.after, ctx);
                }
            }
        }
        if !at_once.is_empty() {
            self.transmit(at_once, delay, ctx);
        }
    }

    /// Devices put bytes on the line at the same moment. More than one
    /// device means a collision: the drivers fight and the line carries the
    /// wired-AND of their bytes, which no CRC survives.
    fn transmit(&mut self, mut sends: Vec<(usize, Vec<u8>)>, after: Duration, ctx: &mut Context<Self>) {
        let mut talkers: Vec<usize> = sends.iter().map(|(i, _)| *i).collect();
        talkers.sort_unstable();
        talkers.dedup();
        let frames: Vec<Vec<u8>> = if talkers.len() > 1 {
            let names: Vec<String> = talkers.iter().map(|&i| self.devices[i].name.clone()).collect();
            self.log.push(&self.cfg.name, ObservationKind::Collision { devices: names });
            let len = sends.iter().map(|(_, b)| b.len()).max().unwrap_or(0);
            let mut merged = vec![0xFFu8; len];
            for (_, b) in &sends {
                for (m, x) in merged.iter_mut().zip(b) {
                    *m &= *x;
                }
            }
            vec![merged]
        } else {
            sends.drain(..).map(|(_, b)| b).collect()
        };
        for f in frames {
            for p in 0..self.ports.len() {
                self.deliver_to_port(p, Direction::Response, &f, after, ctx);
            }
        }
    }

    /// Through the port's link, onto its PTY. The link sees the bytes when they reach the
    /// port, `after` from now (a late piece of a split answer is recorded, and meets a
    /// stall, then: not when it left the device).
    fn deliver_to_port(&mut self, idx: usize, dir: Direction, bytes: &[u8], after: Duration, ctx: &mut Context<Self>) {
        let (now_ns, wall_ns) = self.times();
        let later = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
        let em = self.ports[idx].link.process(dir, bytes, now_ns.saturating_add(later), wall_ns.saturating_add(later));
        for e in em {
            if e.toward == dir {
                self.write_port(idx, e.bytes, after + e.after, ctx);
            }
        }
    }

    /// Puts bytes on a port's PTY `after` from now. Without wire time each
    /// write is scheduled on its own, so a delayed piece never holds back
    /// an earlier-due one. With wire time the line is serial: a frame starts
    /// when the previous one has left the wire.
    fn write_port(&mut self, idx: usize, bytes: Vec<u8>, after: Duration, _ctx: &mut Context<Self>) {
        let now = Instant::now();
        let log = self.log.clone();
        let port = &mut self.ports[idx];
        if !self.cfg.wire_time {
            if after.is_zero() {
                write_now(&port.pty, &bytes, &port.name, &log);
            } else {
                let (pty, name) = (port.pty.clone(), port.name.clone());
                actix::spawn(async move {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(now + after)).await;
                    write_now(&pty, &bytes, &name, &log);
                });
            }
            return;
        }
        let bt = byte_time(self.cfg.baud);
        let start = (now + after).max(port.line_free_at);
        port.line_free_at = start + bt * bytes.len() as u32;
        let (pty, name) = (port.pty.clone(), port.name.clone());
        actix::spawn(write_paced(pty, bytes, start, bt, name, log));
    }
}

fn write_now(pty: &PtyPort, bytes: &[u8], port: &str, log: &ObservationLog) {
    match pty.try_write(bytes) {
        Ok(n) if n == bytes.len() => {}
        Ok(n) => {
            // Nobody is reading this port and its buffer is full: a real
            // adapter's FIFO overflows the same way. Counted, not silent.
            tracing::warn!(port, dropped = bytes.len() - n, "port buffer full (nobody reading?): bytes dropped");
            log.push(
                port,
                ObservationKind::Overflow {
                    bytes: bytes.len() - n,
                    reason: "PTY buffer full: nobody is reading this port".into(),
                },
            );
        }
        Err(e) => {
            tracing::warn!(port, "write failed: {e}");
            log.push(
                port,
                ObservationKind::Overflow {
                    bytes: bytes.len(),
                    reason: format!("write failed: {e}"),
                },
            );
        }
    }
}

/// Byte k leaves the wire at start + (k+1)·byte_time: an absolute
/// schedule, so timer error does not accumulate. The waits use a timerfd
/// because tokio's timer rounds every deadline up to a whole millisecond,
/// which at 9600 baud is a byte time.
async fn write_paced(pty: Rc<PtyPort>, bytes: Vec<u8>, start: Instant, bt: Duration, name: String, log: ObservationLog) {
    let timer = PreciseTimer::new();
    for (k, b) in bytes.iter().enumerate() {
        let due = start + bt * (k as u32 + 1);
        match &timer {
            Ok(t) => {
                if let Err(e) = t.sleep_until(due).await {
                    tracing::warn!(port = %name, "timerfd failed ({e}); falling back to the coarse timer");
                    tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                }
            }
            Err(_) => tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await,
        }
        write_now(&pty, std::slice::from_ref(b), &name, &log);
    }
}

/// A sub-millisecond sleep on a non-blocking timerfd.
struct PreciseTimer {
    fd: tokio::io::unix::AsyncFd<TimerFdHandle>,
}

/// TimerFd exposes only `AsFd`; AsyncFd wants `AsRawFd`.
struct TimerFdHandle(nix::sys::timerfd::TimerFd);

impl std::os::fd::AsRawFd for TimerFdHandle {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl PreciseTimer {
    fn new() -> std::io::Result<Self> {
        use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
        let t = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)?;
        // SAFETY: the TimerFd is owned by the AsyncFd until drop; nothing
        // else closes its descriptor.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(TimerFdHandle(t), tokio::io::Interest::READABLE) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(PreciseTimer { fd })
    }

    async fn sleep_until(&self, deadline: Instant) -> std::io::Result<()> {
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
        use std::os::fd::AsRawFd;
        let now = Instant::now();
        if deadline <= now {
            return Ok(());
        }
        self.fd
            .get_ref()
            .0
            .set(Expiration::OneShot(TimeSpec::from_duration(deadline - now)), TimerSetTimeFlags::empty())?;
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), &mut expirations).map_err(std::io::Error::from)
            }) {
                Ok(r) => return r.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }
}

struct PortInput {
    port: usize,
    bytes: Vec<u8>,
}

impl Actor for BusActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        for (idx, p) in self.ports.iter().enumerate() {
            let pty = p.pty.clone();
            let name = p.name.clone();
            let stream = futures::stream::unfold((pty, name), move |(pty, name)| async move {
                let mut buf = [0u8; 1024];
                loop {
                    match pty.read(&mut buf).await {
                        Ok(0) => continue,
                        Ok(n) => {
                            let bytes = buf[..n].to_vec();
                            return Some((PortInput { port: idx, bytes }, (pty, name)));
                        }
                        Err(e) => {
                            tracing::warn!(port = %name, "read failed: {e}; port closed");
                            return None;
                        }
                    }
                }
            });
            ctx.add_stream(stream);
        }
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        for p in &self.ports {
            p.pty.remove_link();
        }
    }
}

impl StreamHandler<PortInput> for BusActor {
    fn handle(&mut self, msg: PortInput, ctx: &mut Context<Self>) {
        let idx = msg.port;
        let frames = self.ports[idx].framer.push(&msg.bytes);
        if let Some(h) = self.ports[idx].silence.take() {
            ctx.cancel_future(h);
        }
        if self.ports[idx].framer.pending() > 0 {
            let h = ctx.run_later(rtu_silence(self.cfg.baud), move |act, ctx| act.on_silence(idx, ctx));
            self.ports[idx].silence = Some(h);
        }
        for f in frames {
            self.on_port_frame(idx, f, ctx);
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        // One port failing must not take the bus down.
    }
}

/// Apply a fault to the link named `link` (a port or device name).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct InjectFault {
    pub link: String,
    pub rule: FaultRule,
}

#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct ClearFaults {
    pub link: String,
    /// Only the rules of this name (all rules without one).
    pub name: Option<String>,
}

/// Every frame recorded on this bus's links so far, oldest first.
#[derive(Message)]
#[rtype(result = "Vec<FrameRecord>")]
pub struct BusFrames;

#[derive(Message)]
#[rtype(result = "Vec<(String, LinkCounters)>")]
pub struct BusLinkCounters;

impl BusActor {
    fn link_mut(&mut self, name: &str) -> Option<&mut LinkEngine> {
        if let Some(p) = self.ports.iter_mut().find(|p| p.name == name) {
            return Some(&mut p.link);
        }
        self.devices.iter_mut().find(|d| d.name == name).map(|d| &mut d.link)
    }

    pub fn link_names(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| p.name.clone())
            .chain(self.devices.iter().map(|d| d.name.clone()))
            .collect()
    }
}

impl Handler<InjectFault> for BusActor {
    type Result = Result<(), String>;
    fn handle(&mut self, msg: InjectFault, _ctx: &mut Context<Self>) -> Self::Result {
        let (now_ns, _) = self.times();
        let names = self.link_names();
        let link = self
            .link_mut(&msg.link)
            .ok_or_else(|| format!("no link `{}` on bus {} (links: {})", msg.link, "this", names.join(", ")))?;
        link.add_rule(msg.rule, now_ns);
        Ok(())
    }
}

impl Handler<ClearFaults> for BusActor {
    type Result = Result<(), String>;
    fn handle(&mut self, msg: ClearFaults, _ctx: &mut Context<Self>) -> Self::Result {
        let names = self.link_names();
        let link = self
            .link_mut(&msg.link)
            .ok_or_else(|| format!("no link `{}` (links: {})", msg.link, names.join(", ")))?;
        match &msg.name {
            None => link.clear(),
            Some(n) if link.clear_named(n) => {}
            Some(n) => return Err(format!("no fault named `{n}` on `{}`", msg.link)),
        }
        Ok(())
    }
}

impl Handler<BusFrames> for BusActor {
    type Result = MessageResult<BusFrames>;
    fn handle(&mut self, _msg: BusFrames, _ctx: &mut Context<Self>) -> Self::Result {
        let mut all: Vec<FrameRecord> = self
            .ports
            .iter()
            .flat_map(|p| p.link.frames().cloned())
            .chain(self.devices.iter().flat_map(|d| d.link.frames().cloned()))
            .collect();
        all.sort_by_key(|r| r.timestamp_ns);
        MessageResult(all)
    }
}

impl Handler<BusLinkCounters> for BusActor {
    type Result = MessageResult<BusLinkCounters>;
    fn handle(&mut self, _msg: BusLinkCounters, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.ports
                .iter()
                .map(|p| (p.name.clone(), p.link.counters.clone()))
                .chain(self.devices.iter().map(|d| (d.name.clone(), d.link.counters.clone())))
                .collect(),
        )
    }
}

/// Stop the bus now: its ports' symlinks are removed before this returns.
/// A device joins a running bus (a scenario's devices start after its buses).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachDevice(pub BusDevice);

impl Handler<AttachDevice> for BusActor {
    type Result = ();
    fn handle(&mut self, msg: AttachDevice, _ctx: &mut Context<Self>) {
        let device = Device::on(&self.cfg, msg.0);
        self.devices.push(device);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for BusActor {
    type Result = ();
    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) {
        for p in &self.ports {
            p.pty.remove_link();
        }
        ctx.stop();
    }
}
