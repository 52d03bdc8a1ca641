//! The SMP server's host: one sans-IO [`SmpServer`] behind every transport
//! it serves, so a reset over one is a reboot on all.
//!
//! - UDP, as Zephyr's UDP transport serves it: one SMP message per datagram
//!   (or several back to back), the answer to the sender's address, and a
//!   datagram larger than the net buffer dropped unread. UDP has no
//!   connections, so a reset only makes the server silent for the boot time.
//!   Every datagram both ways crosses the device's [`LinkEngine`] (named as
//!   the device): faults (a dropped answer, a late duplicate) and capture.
//! - A serial port on a PTY, through the [`SerialLink`] model (console or raw
//!   framing, the line-buffer pool, wire time). The PTY stays through a
//!   reset; nothing answers until the device is up, and with console
//!   framing the boot banner comes first. The serial line is a link of its
//!   own, `NAME.tty`: its frames are console lines toward the device (raw
//!   framing: each read) and each answer's framed bytes toward the client.
//! - BLE GATT ([`super::smp_ble`]): writes reassembled, answers notified;
//!   a reset drops the links and the advertisement until the device is up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{broadcast, watch};

use super::smp_ble::{BleArrival, SmpBle, SmpBleSide};
use super::smp_core::{SmpEvent, SmpServer, SmpServerConfig};
use super::smp_serial::{SerialArrival, SerialFraming, SerialLink, SerialLinkConfig};
use crate::limits::{LogEvery, REFUSAL_LOG_PERIOD};
use crate::link::{Direction, FaultRule, FrameRecord, LinkEngine};
use crate::sans_io::{Input, Output, Peer, SansIoCore};
use crate::transport::pty::PtyPort;

/// What Zephyr prints on its console at every boot.
pub const BOOT_BANNER: &str = "*** Booting Zephyr OS build v4.4.0 ***\r\n";

/// Where the server is reached; at least one.
#[derive(Debug, Clone, Default)]
pub struct SmpEndpoints {
    pub udp: Option<SocketAddr>,
    pub tty: Option<SmpTty>,
    pub ble: Option<SmpBle>,
    /// The UDP link's fault randomness (the scenario seed).
    pub seed: u64,
    /// How many frames the UDP link keeps for capture (`None`: all; a
    /// long-running `sim` keeps the last few).
    pub frame_limit: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct SmpTty {
    /// A symlink to the PTY's slave side (`None`: only the /dev/pts path).
    pub link: Option<PathBuf>,
    pub serial: SerialLinkConfig,
    /// Print the boot banner on the line after each reboot (console framing only).
    pub banner: bool,
}

/// A running SMP server; dropping it (or [`SmpHandle::shutdown`]) stops it.
pub struct SmpHandle {
    udp: Option<SocketAddr>,
    udp_link: Option<Arc<Mutex<LinkEngine>>>,
    tty_link: Option<Arc<Mutex<LinkEngine>>>,
    epoch: Instant,
    tty: Option<PathBuf>,
    ble: Option<String>,
    events: broadcast::Sender<SmpEvent>,
    stop: watch::Sender<bool>,
    reboot: tokio::sync::mpsc::UnboundedSender<()>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SmpHandle {
    /// The device resets by itself now (a watchdog): no answer, then a boot.
    pub fn reboot(&self) -> Result<(), String> {
        self.reboot.send(()).map_err(|_| "the device has stopped".to_string())
    }

    /// The UDP address served, if any.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp
    }

    /// The path a serial client opens, if a PTY is served.
    pub fn tty_path(&self) -> Option<&Path> {
        self.tty.as_deref()
    }

    /// The BLE address centrals connect to, if served on BLE.
    pub fn ble_address(&self) -> Option<&str> {
        self.ble.as_deref()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<SmpEvent> {
        self.events.subscribe()
    }

    /// The link called `link`: the UDP one (named as the device) or the serial one (`NAME.tty`).
    fn link(&self, link: &str) -> Result<std::sync::MutexGuard<'_, LinkEngine>, String> {
        let engine = [&self.udp_link, &self.tty_link]
            .into_iter()
            .flatten()
            .find(|l| l.lock().unwrap_or_else(|p| p.into_inner()).name() == link)
            .ok_or_else(|| format!("it has no link `{link}`"))?;
        Ok(engine.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A fault on a link, from now.
    pub fn add_fault(&self, link: &str, rule: FaultRule) -> Result<(), String> {
        let now_ns = self.epoch.elapsed().as_nanos() as u64;
        self.link(link)?.add_rule(rule, now_ns);
        Ok(())
    }

    /// Clears a link's faults: all, or those called `name` (false: none was).
    pub fn clear_faults(&self, link: &str, name: Option<&str>) -> Result<bool, String> {
        let mut link = self.link(link)?;
        Ok(match name {
            None => {
                link.clear();
                true
            }
            Some(n) => link.clear_named(n),
        })
    }

    /// What its links carried (datagrams; lines and answers), as they went on the wire.
    pub fn frames(&self) -> Vec<FrameRecord> {
        [&self.udp_link, &self.tty_link].into_iter().flatten().flat_map(|l| l.lock().unwrap_or_else(|p| p.into_inner()).frames().cloned().collect::<Vec<_>>()).collect()
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SmpHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The serial port, as the core sees it; each UDP sender and each BLE
/// central is a peer of its own from [`FIRST_UDP_PEER`] on, so an answer
/// that waits for the flash still finds its way.
const TTY_PEER: Peer = Peer(1);
const FIRST_UDP_PEER: u64 = 2;
/// Datagrams up to this size are read whole whatever the net buffer, so the
/// dropped ones are reported by their size (smpclient sends 1472 bytes).
const DATAGRAM_SEEN: usize = 2048;
/// Events a slow subscriber may fall behind by before it is told it lost some.
const EVENTS_QUEUED: usize = 256;
/// UDP senders remembered; past it the table starts over (answers still in
/// work for a forgotten sender are dropped, as a datagram may be).
const UDP_PEERS_KEPT: usize = 4096;

/// Opens every endpoint and serves `config` there until shut down.
pub async fn serve(config: SmpServerConfig, endpoints: SmpEndpoints) -> Result<SmpHandle, String> {
    if endpoints.udp.is_none() && endpoints.tty.is_none() && endpoints.ble.is_none() {
        return Err("an SMP server needs at least one endpoint (UDP, a PTY or BLE)".into());
    }
    let netbuf = usize::from(config.buf_size);
    let mcuboot_lines = config.profiles.contains(&super::smp_core::SmpProfile::SerialRecovery);
    let core = SmpServer::new(config)?;
    let udp = match endpoints.udp {
        Some(bind) => Some(UdpSocket::bind(bind).await.map_err(|e| format!("cannot bind UDP {bind}: {e}"))?),
        None => None,
    };
    let udp_addr = udp.as_ref().map(|s| s.local_addr().map_err(|e| e.to_string())).transpose()?;
    let engine = |name: String| {
        let mut link = LinkEngine::new(name, endpoints.seed);
        link.set_log_limit(endpoints.frame_limit);
        Arc::new(Mutex::new(link))
    };
    let udp_link = udp.as_ref().map(|_| engine(core.name().to_string()));
    let tty_link = endpoints.tty.as_ref().map(|_| engine(format!("{}.tty", core.name())));
    let tty = match endpoints.tty {
        Some(t) => {
            let pty = PtyPort::open(t.link.as_deref()).map_err(|e| e.to_string())?;
            let banner = t.banner && t.serial.framing == SerialFraming::Console;
            Some(Tty { link: SerialLink::new(SerialLinkConfig { net_buf: netbuf, mcuboot_lines, ..t.serial }), pty, banner })
        }
        None => None,
    };
    let tty_path = tty.as_ref().map(|t| t.pty.path().to_path_buf());
    let (ble, ble_events) = match endpoints.ble {
        Some(b) => {
            let (side, events) = SmpBleSide::open(b, netbuf).await?;
            (Some(side), Some(events))
        }
        None => (None, None),
    };
    let ble_address = ble.as_ref().map(|b| b.address().to_string());
    let (events, _) = broadcast::channel(EVENTS_QUEUED);
    let (stop, stop_rx) = watch::channel(false);
    let (reboot, reboot_rx) = tokio::sync::mpsc::unbounded_channel();
    let epoch = Instant::now();
    let host = Host {
        core,
        epoch,
        udp,
        udp_link: udp_link.clone(),
        tty_link: tty_link.clone(),
        tty_in: Vec::new(),
        in_flight: Vec::new(),
        udp_peers: Default::default(),
        udp_addrs: Default::default(),
        next_peer: FIRST_UDP_PEER,
        netbuf,
        tty,
        ble,
        events: events.clone(),
        dropped: LogEvery::new(REFUSAL_LOG_PERIOD),
    };
    let task = tokio::spawn(host.run(stop_rx, reboot_rx, ble_events));
    Ok(SmpHandle { udp: udp_addr, udp_link, tty_link, epoch, tty: tty_path, ble: ble_address, events, stop, reboot, task: Some(task) })
}

struct Tty {
    link: SerialLink,
    pty: PtyPort,
    banner: bool,
}

/// Bytes a fault holds back (a delay, a duplicate's second copy), and the link they are on.
struct InFlight {
    due: Duration,
    toward: Direction,
    bytes: Vec<u8>,
    via: Via,
}

#[derive(Clone, Copy)]
enum Via {
    /// A datagram to or from this UDP peer.
    Udp(SocketAddr),
    Tty,
}

/// The longest console line kept while waiting for its newline; past it, it goes on as it is.
const TTY_LINE_HELD: usize = 4096;
/// Frames a fault may hold back at once (a long `delay` under a flood); more are dropped.
const HELD_FRAMES: usize = 4096;

struct Host {
    core: SmpServer,
    epoch: Instant,
    udp: Option<UdpSocket>,
    udp_link: Option<Arc<Mutex<LinkEngine>>>,
    tty_link: Option<Arc<Mutex<LinkEngine>>>,
    /// Serial bytes toward the device up to the next newline (console framing).
    tty_in: Vec<u8>,
    in_flight: Vec<InFlight>,
    udp_peers: std::collections::HashMap<SocketAddr, Peer>,
    udp_addrs: std::collections::HashMap<Peer, SocketAddr>,
    /// The next UDP or BLE peer id: never reused, so an answer still in
    /// work for a forgotten sender cannot reach a new one.
    next_peer: u64,
    netbuf: usize,
    tty: Option<Tty>,
    ble: Option<SmpBleSide>,
    events: broadcast::Sender<SmpEvent>,
    dropped: LogEvery,
}

/// What woke the host.
enum Wake {
    Stop,
    Timer,
    Reboot,
    Datagram(std::io::Result<(usize, SocketAddr)>),
    Serial(std::io::Result<usize>),
    Gatt(Option<crate::transport::gatt::GattEvent>),
}

impl Host {
    async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
        mut reboot: tokio::sync::mpsc::UnboundedReceiver<()>,
        mut gatt: Option<tokio::sync::mpsc::UnboundedReceiver<crate::transport::gatt::GattEvent>>,
    ) {
        // Room for one byte past the net buffer (and for the 1472-byte
        // datagrams clients send whatever the buffer), so an oversized one is
        // seen and dropped; a thousand servers in one process stay small.
        let mut dgram = vec![0u8; self.netbuf.max(DATAGRAM_SEEN) + 1];
        let mut serial = vec![0u8; 1024];
        loop {
            let wake = self.next_wakeup().map(|d| tokio::time::Instant::from_std(self.epoch + d));
            let woke = tokio::select! {
                _ = stop.changed() => Wake::Stop,
                Some(()) = reboot.recv() => Wake::Reboot,
                _ = async { tokio::time::sleep_until(wake.expect("guarded")).await }, if wake.is_some() => Wake::Timer,
                r = async { self.udp.as_ref().expect("guarded").recv_from(&mut dgram).await }, if self.udp.is_some() => Wake::Datagram(r),
                r = async { self.tty.as_ref().expect("guarded").pty.read(&mut serial).await }, if self.tty.is_some() => Wake::Serial(r),
                e = async { gatt.as_mut().expect("guarded").recv().await }, if gatt.is_some() => Wake::Gatt(e),
            };
            let now = self.epoch.elapsed();
            match woke {
                Wake::Stop => return,
                Wake::Reboot => {
                    self.core.reboot_now(now);
                    self.feed(Input::Timeout, now).await
                }
                Wake::Timer => {
                    self.deliver_due(now).await;
                    self.feed(Input::Timeout, now).await
                }
                Wake::Datagram(Ok((n, from))) => {
                    let bytes = dgram[..n].to_vec();
                    self.through_link(Direction::Request, &bytes, Via::Udp(from), now).await
                }
                Wake::Datagram(Err(_)) => {}
                Wake::Serial(Ok(n)) => {
                    let bytes = serial[..n].to_vec();
                    self.serial_in(&bytes, now).await
                }
                Wake::Serial(Err(e)) => {
                    tracing::warn!("smp serial: the PTY failed ({e}); serving the other transports");
                    self.tty = None;
                    if self.udp.is_none() && self.ble.is_none() {
                        return;
                    }
                }
                Wake::Gatt(Some(ev)) => self.gatt_event(ev, now).await,
                Wake::Gatt(None) => {
                    tracing::warn!("smp ble: the GATT service went; serving the other transports");
                    gatt = None;
                    self.ble = None;
                    if self.udp.is_none() && self.tty.is_none() {
                        return;
                    }
                }
            }
            self.pump_serial(now).await;
        }
    }

    fn next_wakeup(&self) -> Option<Duration> {
        let serial = self.tty.as_ref().and_then(|t| t.link.next_due());
        let held = self.in_flight.iter().map(|d| d.due).min();
        [self.core.next_wakeup(), serial, held].into_iter().flatten().min()
    }

    /// Bytes through their link: what comes out now goes on (to the core,
    /// or to the peer or the serial line); what a fault holds back waits in
    /// `in_flight`.
    async fn through_link(&mut self, direction: Direction, bytes: &[u8], via: Via, now: Duration) {
        let link = match via {
            Via::Udp(_) => &self.udp_link,
            Via::Tty => &self.tty_link,
        };
        let emissions = match link {
            Some(link) => {
                let wall_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
                link.lock().unwrap_or_else(|p| p.into_inner()).process(direction, bytes, now.as_nanos() as u64, wall_ns)
            }
            None => return,
        };
        for e in emissions {
            if e.after.is_zero() {
                self.emit(e.toward, e.bytes, via, now).await;
            } else if self.in_flight.len() < HELD_FRAMES {
                self.in_flight.push(InFlight { due: now + e.after, toward: e.toward, bytes: e.bytes, via });
            } else {
                if let Some(more) = self.dropped.check(Instant::now()) {
                    tracing::warn!("smp: a fault holds {HELD_FRAMES} frames back already; dropped one ({more} more since the last line)");
                }
                let _ = self.events.send(SmpEvent::Silent { reason: format!("a fault holds {HELD_FRAMES} frames back already; one more was dropped") });
            }
        }
    }

    /// Serial bytes toward the device: console lines go through the link one
    /// by one (a line without its newline waits for it); raw reads as they come.
    async fn serial_in(&mut self, bytes: &[u8], now: Duration) {
        let Some(framing) = self.tty.as_ref().map(|t| t.link.framing()) else { return };
        if framing == SerialFraming::Raw {
            return self.through_link(Direction::Request, bytes, Via::Tty, now).await;
        }
        self.tty_in.extend_from_slice(bytes);
        while let Some(end) = self.tty_in.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.tty_in.drain(..=end).collect();
            self.through_link(Direction::Request, &line, Via::Tty, now).await;
        }
        if self.tty_in.len() > TTY_LINE_HELD {
            let held = std::mem::take(&mut self.tty_in);
            self.through_link(Direction::Request, &held, Via::Tty, now).await;
        }
    }

    async fn deliver_due(&mut self, now: Duration) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight).into_iter().partition(|d| d.due <= now);
        self.in_flight = later;
        for d in due {
            self.emit(d.toward, d.bytes, d.via, now).await;
        }
    }

    /// Bytes past their link: a request to the device, an answer to its peer or the line.
    async fn emit(&mut self, toward: Direction, bytes: Vec<u8>, via: Via, now: Duration) {
        match (toward, via) {
            (Direction::Request, Via::Udp(peer)) => self.datagram(&bytes, peer, now).await,
            (Direction::Response, Via::Udp(peer)) => {
                if let Some(sock) = &self.udp {
                    let _ = sock.send_to(&bytes, peer).await;
                }
            }
            (Direction::Request, Via::Tty) => {
                if let Some(t) = &mut self.tty {
                    t.link.receive(&bytes, now);
                }
            }
            (Direction::Response, Via::Tty) => {
                if let Some(t) = &mut self.tty {
                    t.link.send_wire(&bytes, now);
                }
            }
        }
    }

    async fn datagram(&mut self, bytes: &[u8], from: SocketAddr, now: Duration) {
        if bytes.len() > self.netbuf {
            // Past the receive buffer only "more than" is known.
            let size = if bytes.len() > self.netbuf.max(DATAGRAM_SEEN) { format!("{}+", bytes.len() - 1) } else { bytes.len().to_string() };
            if let Some(more) = self.dropped.check(Instant::now()) {
                tracing::warn!("smp udp: dropped a {size}-byte datagram from {from}, larger than the {}-byte net buffer ({more} more since the last line)", self.netbuf);
            }
            let _ = self.events.send(SmpEvent::Silent { reason: format!("{size}-byte datagram is larger than the {}-byte net buffer", self.netbuf) });
            return;
        }
        let peer = self.udp_peer(from);
        self.feed(Input::Bytes { from: peer, bytes }, now).await;
    }

    /// Feeds the core and carries out what it says: answers to the peer they
    /// are for, events to subscribers (and a reboot to the serial line).
    fn udp_peer(&mut self, addr: SocketAddr) -> Peer {
        if let Some(p) = self.udp_peers.get(&addr) {
            return *p;
        }
        if self.udp_peers.len() >= UDP_PEERS_KEPT {
            self.udp_peers.clear();
            self.udp_addrs.clear();
        }
        let peer = self.new_peer();
        self.udp_peers.insert(addr, peer);
        self.udp_addrs.insert(peer, addr);
        peer
    }

    fn new_peer(&mut self) -> Peer {
        let peer = Peer(self.next_peer);
        self.next_peer += 1;
        peer
    }

    /// A central's write: a whole request goes to the core.
    async fn gatt_event(&mut self, ev: crate::transport::gatt::GattEvent, now: Duration) {
        let Some(mut ble) = self.ble.take() else { return };
        let arrival = ble.on_event(ev, || self.new_peer());
        self.ble = Some(ble);
        match arrival {
            BleArrival::Message(peer, m) => self.feed(Input::Bytes { from: peer, bytes: &m }, now).await,
            BleArrival::Dropped(reason) => {
                if let Some(more) = self.dropped.check(Instant::now()) {
                    tracing::warn!("smp {reason} ({more} more since the last line)");
                }
                let _ = self.events.send(SmpEvent::Silent { reason });
            }
            BleArrival::Nothing => {}
        }
    }

    async fn feed(&mut self, input: Input<'_>, now: Duration) {
        let mut out = Vec::new();
        let _ = self.core.handle_input(input, now, &mut out);
        for o in out {
            match o {
                Output::Send { to, bytes } if to == TTY_PEER => {
                    if let Some(wire) = self.tty.as_ref().map(|t| t.link.frame(&bytes)) {
                        Box::pin(self.through_link(Direction::Response, &wire, Via::Tty, now)).await;
                    }
                }
                Output::Send { to, bytes } if self.ble.as_ref().is_some_and(|b| b.serves(to)) => {
                    if let Some(b) = &self.ble {
                        b.send(to, &bytes);
                    }
                }
                Output::Send { to, bytes } => {
                    if let Some(addr) = self.udp_addrs.get(&to).copied() {
                        Box::pin(self.through_link(Direction::Response, &bytes, Via::Udp(addr), now)).await;
                    }
                }
                Output::Event(e) => {
                    self.ble_follows(&e).await;
                    if let Some(t) = &mut self.tty {
                        match e {
                            SmpEvent::Rebooted { .. } => {
                                t.link.reset_rx();
                                self.tty_in.clear();
                            }
                            SmpEvent::Up if t.banner => t.link.send_text(BOOT_BANNER.as_bytes(), now),
                            _ => {}
                        }
                    }
                    let _ = self.events.send(e);
                }
                Output::Close(_) => {}
            }
        }
    }

    /// BLE follows the device's power: a reset drops the links and the
    /// advertisement, which comes back once the device is up.
    async fn ble_follows(&mut self, e: &SmpEvent) {
        let Some(b) = &mut self.ble else { return };
        let r = match e {
            SmpEvent::Rebooted { .. } => {
                b.reset();
                Ok(())
            }
            SmpEvent::Up => b.advertise(true).await,
            _ => Ok(()),
        };
        if let Err(err) = r {
            tracing::warn!("smp ble: {err}");
        }
    }

    /// Hands the core what the serial line has delivered by `now` and writes
    /// what is due on the line.
    async fn pump_serial(&mut self, now: Duration) {
        let arrivals = match &mut self.tty {
            Some(t) => t.link.take_arrivals(now),
            None => return,
        };
        for a in arrivals {
            match a {
                SerialArrival::Message(m) => self.feed(Input::Bytes { from: TTY_PEER, bytes: &m }, now).await,
                SerialArrival::Dropped(reason) => {
                    if let Some(more) = self.dropped.check(Instant::now()) {
                        tracing::warn!("smp {reason} ({more} more since the last line)");
                    }
                    let _ = self.events.send(SmpEvent::Silent { reason });
                }
            }
        }
        if let Some(t) = &mut self.tty {
            let bytes = t.link.take_writes(now);
            // Nobody reading the port fills the PTY; a UART with nobody
            // listening loses what it sends, and so does this one.
            if !bytes.is_empty() {
                let _ = t.pty.try_write(&bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::smp::{SmpHeader, SmpOp, SmpVersion};

    fn udp_only() -> SmpEndpoints {
        SmpEndpoints { udp: Some("127.0.0.1:0".parse().unwrap()), ..Default::default() }
    }

    #[tokio::test]
    async fn a_reset_over_udp_reboots_and_comes_back() {
        let server = serve(SmpServerConfig { boot_time: std::time::Duration::from_millis(100), ..Default::default() }, udp_only()).await.unwrap();
        let mut events = server.subscribe();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut reset = SmpHeader::new(SmpVersion::V2, SmpOp::Write, 0, 5, 1, 1).encode().to_vec();
        reset.push(0xa0);
        client.send_to(&reset, server.udp_addr().unwrap()).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(n, 10, "an empty map (bf ff) answers the reset");
        let mut seen = Vec::new();
        while !seen.contains(&SmpEvent::Up) {
            seen.push(tokio::time::timeout(std::time::Duration::from_secs(5), events.recv()).await.expect("events keep coming").unwrap());
        }
        assert!(seen.iter().any(|e| matches!(e, SmpEvent::Rebooted { .. })), "{seen:?}");
        server.shutdown().await;
    }

    /// A datagram's length, if one comes within 300 ms.
    async fn recv_within(sock: &UdpSocket, buf: &mut [u8]) -> Option<usize> {
        tokio::time::timeout(Duration::from_millis(300), sock.recv_from(buf)).await.ok().map(|r| r.unwrap().0)
    }

    /// Every datagram crosses the UDP link: a dropped answer never leaves, a
    /// duplicated one leaves twice, and the link records both directions.
    #[tokio::test]
    async fn answers_cross_the_udp_link_and_its_faults() {
        use crate::link::fault::FaultTrigger;
        let server = serve(SmpServerConfig::default(), udp_only()).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let params = |seq: u8| {
            let mut b = SmpHeader::new(SmpVersion::V2, SmpOp::Read, 0, 6, seq, 1).encode().to_vec();
            b.push(0xa0);
            b
        };
        let rule = |fault| FaultRule { fault, trigger: FaultTrigger { direction: Some(Direction::Response), ..Default::default() }, name: None };
        let mut buf = [0u8; 256];
        server.add_fault("hilbench-smp", rule(crate::link::LinkFault::Drop)).unwrap();
        client.send_to(&params(1), server.udp_addr().unwrap()).await.unwrap();
        assert_eq!(recv_within(&client, &mut buf).await, None, "the answer was dropped");
        server.add_fault("hilbench-smp", rule(crate::link::LinkFault::Duplicate { gap_ms: 20 })).unwrap();
        client.send_to(&params(2), server.udp_addr().unwrap()).await.unwrap();
        for copy in 0..2 {
            let n = recv_within(&client, &mut buf).await.unwrap_or_else(|| panic!("copy {copy} of the answer"));
            assert_eq!(SmpHeader::parse(&buf[..n]).unwrap().seq, 2);
        }
        assert_eq!(recv_within(&client, &mut buf).await, None, "the fault was used up");
        let frames = server.frames();
        let count = |d| frames.iter().filter(|f| f.direction == d).count();
        assert_eq!((count(Direction::Request), count(Direction::Response)), (2, 2), "{frames:?}");
        assert!(frames.iter().all(|f| f.link == "hilbench-smp"));
        server.shutdown().await;
    }

    /// The serial line is the link `NAME.tty`: a console line toward the
    /// device can be dropped there, and lines and answers are recorded.
    #[tokio::test]
    async fn console_lines_cross_the_serial_link_and_its_faults() {
        use crate::link::fault::FaultTrigger;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let endpoints = SmpEndpoints { tty: Some(SmpTty { link: None, serial: SerialLinkConfig::default(), banner: false }), ..Default::default() };
        let server = serve(SmpServerConfig::default(), endpoints).await.unwrap();
        assert!(server.add_fault("hilbench-smp", FaultRule { fault: crate::link::LinkFault::Drop, trigger: FaultTrigger::default(), name: None }).is_err(), "no UDP link");
        let drop_request = FaultRule { fault: crate::link::LinkFault::Drop, trigger: FaultTrigger { direction: Some(Direction::Request), ..Default::default() }, name: None };
        server.add_fault("hilbench-smp.tty", drop_request).unwrap();
        let mut port = crate::transport::serial::open_serial(server.tty_path().unwrap(), 115_200).unwrap();
        let mut params = SmpHeader::new(SmpVersion::V2, SmpOp::Read, 0, 6, 4, 1).encode().to_vec();
        params.push(0xa0);
        let line = crate::protocol::smp::serial::encode(&params, 127);
        port.write_all(&line).await.unwrap();
        let mut buf = [0u8; 256];
        assert!(tokio::time::timeout(Duration::from_millis(300), port.read(&mut buf)).await.is_err(), "the line was dropped");
        port.write_all(&line).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), port.read(&mut buf)).await.expect("answered").unwrap();
        assert!(buf[..n].starts_with(&crate::protocol::smp::serial::START));
        let frames = server.frames();
        assert_eq!(frames.iter().filter(|f| f.direction == Direction::Request).count(), 1, "the dropped line is not on the wire");
        assert!(frames.iter().all(|f| f.link == "hilbench-smp.tty"));
        server.shutdown().await;
    }

    /// Zephyr drops a datagram larger than its net buffer unread: smpclient's
    /// 1472-byte upload chunks against a 384-byte device get no answer.
    #[tokio::test]
    async fn a_datagram_past_the_net_buffer_is_dropped_unanswered() {
        let server = serve(SmpServerConfig { buf_size: 384, ..Default::default() }, udp_only()).await.unwrap();
        let mut events = server.subscribe();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo = |text: &str| {
            let body = crate::protocol::smp::encode_map(vec![("d", ciborium::Value::Text(text.into()))]);
            let mut b = SmpHeader::new(SmpVersion::V2, SmpOp::Write, 0, 0, 1, body.len() as u16).encode().to_vec();
            b.extend(body);
            b
        };
        client.send_to(&echo(&"x".repeat(400)), server.udp_addr().unwrap()).await.unwrap();
        let dropped = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
        assert!(matches!(&dropped, SmpEvent::Silent { reason } if reason.contains("larger than the 384-byte net buffer")), "{dropped:?}");
        // One that fits is answered, and it is the only answer that comes.
        client.send_to(&echo("fits"), server.udp_addr().unwrap()).await.unwrap();
        let mut buf = [0u8; 1024];
        let (n, _) = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv_from(&mut buf)).await.unwrap().unwrap();
        let m = crate::protocol::smp::decode_map(&buf[8..n]).unwrap();
        assert_eq!(crate::protocol::smp::get(&m, "r"), Some(&ciborium::Value::Text("fits".into())));
        server.shutdown().await;
    }

    /// One device behind both transports: a reset asked over serial reboots it
    /// for UDP too, the serial line shows the boot banner after the answer,
    /// and both answer again once it is up.
    #[tokio::test]
    async fn a_reset_over_serial_reboots_the_device_on_every_transport() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let endpoints = SmpEndpoints { udp: Some("127.0.0.1:0".parse().unwrap()), tty: Some(SmpTty { link: None, serial: SerialLinkConfig::default(), banner: true }), ..Default::default() };
        let server = serve(SmpServerConfig { boot_time: std::time::Duration::from_millis(100), ..Default::default() }, endpoints).await.unwrap();
        let mut events = server.subscribe();
        let mut port = crate::transport::serial::open_serial(server.tty_path().unwrap(), 115_200).unwrap();
        let mut reset = SmpHeader::new(SmpVersion::V2, SmpOp::Write, 0, 5, 9, 1).encode().to_vec();
        reset.push(0xa0);
        port.write_all(&crate::protocol::smp::serial::encode(&reset, 127)).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains(BOOT_BANNER) {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), port.read(&mut buf)).await.expect("the banner comes").unwrap();
            seen.extend(&buf[..n]);
        }
        let answer_end = seen.iter().position(|b| *b == b'\n').unwrap() + 1;
        let mut rx = crate::protocol::smp::serial::Receiver::new();
        let crate::protocol::smp::serial::LineOutcome::Message(m) = rx.push_line(&seen[..answer_end]) else { panic!("{seen:?}") };
        assert_eq!(&m[..8], SmpHeader::new(SmpVersion::V2, SmpOp::WriteResponse, 0, 5, 9, 2).encode(), "the answer (an empty map, bf ff) comes before the banner");
        assert_eq!(&seen[answer_end..], BOOT_BANNER.as_bytes());
        let mut rebooted = false;
        while let Ok(Ok(e)) = tokio::time::timeout(std::time::Duration::from_millis(200), events.recv()).await {
            rebooted |= matches!(e, SmpEvent::Rebooted { .. });
        }
        assert!(rebooted);
        // Up again on UDP as well.
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut params = SmpHeader::new(SmpVersion::V2, SmpOp::Read, 0, 6, 2, 1).encode().to_vec();
        params.push(0xa0);
        client.send_to(&params, server.udp_addr().unwrap()).await.unwrap();
        let (n, _) = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv_from(&mut buf)).await.unwrap().unwrap();
        assert!(n > 8);
        server.shutdown().await;
    }
}
