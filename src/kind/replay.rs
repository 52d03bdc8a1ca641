//! `replay`: a device that answers as a captured one did, from a fixture that
//! `hilbench capture import` wrote. Today it serves serial fixtures on one of the
//! scenario's RS-485 buses (Modbus RTU, EG4 7E/0D, JBD over UART): every request that
//! matches a captured one gets what the device sent after it, faults included; a
//! request that matches none is observed as `device_silent` and gets no answer.

use std::path::PathBuf;

use actix::Actor;
use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::{at_key, decode_keys, Declared, Kind, LinkDecl, LinkHomeDecl, Names, Role, Running, StartContext};
use crate::device::replay::ReplayBusActor;
use crate::device::replay_core::ReplayCore;
use crate::link::capture::CaptureFormat;
use crate::link::fault::LinkMedium;
use crate::link::recognise::CaptureTransport;
use crate::limits::LogEvery;
use crate::link::record::Direction;
use crate::scenario::import::read_fixture;
use crate::scenario::source::Problem;
use crate::transport::bus::{AttachDevice, BusDevice};

pub struct ReplayKind;

/// Its scenario keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayKeys {
    pub name: String,
    /// The bus it answers on.
    pub bus: String,
    /// A fixture from `hilbench capture import` (relative to the working directory, as
    /// `hilbench run` is started from the repository).
    pub fixture: PathBuf,
}

impl Kind for ReplayKind {
    fn name(&self) -> &'static str {
        "replay"
    }
    fn role(&self) -> Role {
        Role::Device
    }
    fn about(&self) -> &'static str {
        "a captured device replayed from a `capture import` fixture: answers each request as the capture did (serial fixtures on an RS-485 bus)"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<ReplayKeys>(entry)?))
    }
    fn sim(&self) -> Option<super::KindCommand> {
        Some(super::KindCommand {
            command: || super::subcommand::<ReplaySimArgs>("replay", "Captured serial devices replayed from `capture import` fixtures on a PTY.", SIM_HELP),
            run: |m| super::run_parsed(m, |a| crate::cli::sim::exit_code(sim(a))),
        })
    }
}

const SIM_HELP: &str = "Every fixture is one device on one RS-485 bus whose port is the PTY: each request
that matches a captured one gets what the device sent after it in the capture (bad CRCs,
silences and echoes included); a request that matches none is logged and unanswered.
With --udp ADDR one UDP fixture (an SMP server's) answers datagrams instead; SMP requests
match without their sequence number and get answers carrying it.
Prints one JSON ready line with the PTY path or UDP address; runs until SIGINT/SIGTERM.

Examples:
  hilbench sim replay fixtures/captures/imported/eg4-fault3-bridge.bridge-addr1.jsonl fixtures/captures/imported/eg4-fault3-bridge.bridge-addr2.jsonl --tty /tmp/field
  hilbench capture import fixtures/captures/eg4-fault3-bridge.pcapng --out target/fixtures && hilbench sim replay target/fixtures/eg4-fault3-bridge.bridge-addr2.jsonl";

/// `hilbench sim replay`.
#[derive(clap::Args, Debug)]
pub struct ReplaySimArgs {
    /// Fixtures (`capture import` output), one device each.
    #[arg(required = true)]
    pub fixtures: Vec<PathBuf>,
    /// A symlink to the PTY at this path (default: only the /dev/pts path in the ready line).
    #[arg(long, value_name = "PATH", conflicts_with = "udp")]
    pub tty: Option<PathBuf>,
    /// Serve one UDP fixture (an SMP server's) on this address instead of a PTY (port 0: any).
    #[arg(long, value_name = "ADDR")]
    pub udp: Option<std::net::SocketAddr>,
    /// Line speed, for --wire-time.
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    /// Pace bytes at the line speed and answer after the RTU silence, as a real line does.
    #[arg(long)]
    pub wire_time: bool,
}

fn sim(a: ReplaySimArgs) -> Result<(), String> {
    use crate::observe::ObservationLog;
    if let Some(addr) = a.udp {
        let [fixture] = &a.fixtures[..] else {
            return Err(format!("--udp serves one fixture; {} given", a.fixtures.len()));
        };
        return sim_udp(load(fixture, CaptureTransport::Udp, "--udp serves UDP ones")?.alone(), addr);
    }
    use crate::transport::bus::{BusActor, BusConfig, BusPortSpec};
    // Every fixture is read before anything opens.
    let mut cores = Vec::new();
    for (i, f) in a.fixtures.iter().enumerate() {
        cores.push((format!("replay{}", i + 1), load(f, CaptureTransport::Serial, "a PTY serves serial ones (--udp: UDP ones)")?));
    }
    let sys = actix::System::new();
    sys.block_on(async move {
        let log = ObservationLog::bounded(std::time::Instant::now(), 10_000);
        let cfg = BusConfig {
            name: "bus1".into(),
            baud: a.baud,
            wire_time: a.wire_time,
            ports: vec![BusPortSpec { name: "tty1".into(), link_path: a.tty.clone() }],
            seed: 1,
            frame_limit: Some(256),
            record: false,
        };
        let bus = BusActor::open(cfg, Vec::new(), log.clone()).map_err(|e| e.to_string())?;
        let tty = bus.port_paths().into_iter().map(|(_, p)| p).next();
        let bus = bus.start();
        let mut devices = Vec::new();
        for (name, core) in cores {
            let addr = ReplayBusActor::new(name.clone(), core, log.clone()).start();
            bus.send(AttachDevice(BusDevice { name, recipient: addr.clone().recipient() })).await.map_err(|e| format!("bus: {e}"))?;
            devices.push(addr);
        }
        let ready = serde_json::json!({
            "ready": true,
            "kind": "replay",
            "endpoints": { "tty": tty },
            "devices": devices.len(),
        });
        let signal = crate::cli::sim::wait_for_signal();
        println!("{ready}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        signal.await;
        let _ = bus.send(crate::transport::bus::Shutdown).await;
        drop(devices);
        Ok(())
    })
}

/// A fixture's frames and the replay rule of its kind, or why it cannot be replayed by a
/// host that `serves` (says what it serves) frames of `transport`.
fn load(fixture: &std::path::Path, transport: CaptureTransport, serves: &str) -> Result<ReplayCore, String> {
    let (header, frames) = read_fixture(fixture)?;
    if header.transport != transport {
        return Err(format!("{} holds {} frames; {serves}", fixture.display(), header.transport.as_str()));
    }
    let mut out = Vec::with_capacity(frames.len());
    for (i, f) in frames.into_iter().enumerate() {
        let bytes = crate::scenario::spec::parse_hex(&f.hex).map_err(|e| format!("{}: frame {}: {e}", fixture.display(), i + 1))?;
        out.push((f.dir, bytes));
    }
    if !out.iter().any(|(d, _)| *d == Direction::Request) {
        return Err(format!("{} has no request to answer", fixture.display()));
    }
    let rule = header.kind.as_deref().and_then(|k| super::find(Role::Device, k)).and_then(|k| k.replay_rule());
    Ok(ReplayCore::with_rule(out, rule))
}

impl ReplayKeys {
    /// The fixture's core, or why it cannot be replayed on a bus.
    fn core(&self) -> Result<ReplayCore, String> {
        load(&self.fixture, CaptureTransport::Serial, "a scenario's `replay` serves serial fixtures on a bus today")
    }
}

impl Declared for ReplayKeys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "replay"
    }
    fn check(&self, names: &Names<'_>) -> Result<(), Problem> {
        if !names.buses.contains(&self.bus.as_str()) {
            return Err(at_key("bus", format!("bus `{}` is not declared under `buses`", self.bus)));
        }
        self.core().map_err(|e| at_key("fixture", e))?;
        Ok(())
    }
    fn links(&self) -> Vec<LinkDecl> {
        vec![LinkDecl {
            name: self.name.clone(),
            home: LinkHomeDecl::Bus(self.bus.clone()),
            capture: Some(CaptureFormat::ModbusRtu),
            checksum: None,
            carries: "replayed serial frames",
            medium: LinkMedium::Serial,
        }]
    }
    fn bus(&self) -> Option<&str> {
        Some(&self.bus)
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let core = self.core()?;
            let bus = cx.buses.get(&self.bus).ok_or_else(|| format!("bus `{}` is not running", self.bus))?;
            let addr = ReplayBusActor::new(self.name.clone(), core, cx.log.clone()).start();
            bus.send(AttachDevice(BusDevice { name: self.name.clone(), recipient: addr.clone().recipient() }))
                .await
                .map_err(|e| format!("bus `{}`: {e}", self.bus))?;
            Ok(Box::new(RunningReplay { _addr: addr }) as Box<dyn Running>)
        })
    }
}

struct RunningReplay {
    _addr: actix::Addr<ReplayBusActor>,
}

impl Running for RunningReplay {
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move { drop(self) })
    }
}

/// One UDP fixture served on `addr`: every datagram goes through the core, its answers go
/// back to the sender.
fn sim_udp(mut core: ReplayCore, addr: std::net::SocketAddr) -> Result<(), String> {
    use crate::sans_io::{Input, Output, Peer, SansIoCore};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async move {
        let sock = tokio::net::UdpSocket::bind(addr).await.map_err(|e| format!("--udp {addr}: {e}"))?;
        let local = sock.local_addr().map_err(|e| e.to_string())?;
        let signal = crate::cli::sim::wait_for_signal();
        println!("{}", serde_json::json!({ "ready": true, "kind": "replay", "endpoints": { "udp": local.to_string() }, "devices": 1 }));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::pin!(signal);
        let start = std::time::Instant::now();
        let mut peers: Vec<std::net::SocketAddr> = Vec::new();
        // A flood of bad datagrams or failing sends writes a line per period, not per datagram.
        let (mut recv_log, mut send_log, mut unmatched_log) = (LogEvery::default(), LogEvery::default(), LogEvery::default());
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, from) = tokio::select! {
                _ = &mut signal => return Ok(()),
                r = sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        if let Some(more) = recv_log.check(std::time::Instant::now()) {
                            tracing::warn!("udp receive: {e} ({more} more since the last line)");
                        }
                        continue;
                    }
                },
            };
            let peer = match peers.iter().position(|p| *p == from) {
                Some(i) => i,
                None => {
                    // Bounded: a flood of sources forgets the oldest.
                    if peers.len() >= 4096 {
                        peers.clear();
                    }
                    peers.push(from);
                    peers.len() - 1
                }
            };
            let mut out = Vec::new();
            let _ = core.handle_input(Input::Bytes { from: Peer(peer as u64), bytes: &buf[..n] }, start.elapsed(), &mut out);
            for o in out {
                match o {
                    Output::Send { to, bytes } => {
                        if let Some(dest) = peers.get(to.0 as usize) {
                            if let Err(e) = sock.send_to(&bytes, dest).await {
                                if let Some(more) = send_log.check(std::time::Instant::now()) {
                                    tracing::warn!("udp send to {dest}: {e} ({more} more since the last line)");
                                }
                            }
                        }
                    }
                    Output::Event(crate::device::replay_core::ReplayEvent::Unmatched { bytes }) => {
                        if let Some(more) = unmatched_log.check(std::time::Instant::now()) {
                            tracing::info!("no captured request is {} ({more} more unmatched since the last line)", crate::client::hex(&bytes));
                        }
                    }
                    Output::Event(_) | Output::Close(_) => {}
                }
            }
        }
    })
}
