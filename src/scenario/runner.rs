//! Executes one scenario: builds its devices, buses, clients and processes,
//! walks the timeline, and always tears everything down (no PTY, symlink or
//! process survives a run, whether it passed, failed or could not start).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use serde::Serialize;

use super::process::{ProcessReport, RunningProcess};
use super::spec::*;
use crate::client::bsc_node::{BscNodeActor, BscNodeConfig, SendNpdu};
use crate::client::bsc_node_core::NodeConfig;
use crate::client::bsc_raw::{BscRawConfig, BscRawPeer, SendRaw};
use crate::client::legacy::LegacyPoll;
use crate::client::modbus_master::ModbusPoll;
use crate::client::poller::{ClientClearFaults, ClientFault, ClientFrames, PollerActor, PollerConfig};
use crate::client::sniffer::{SnifferActor, SnifferConfig};
use crate::device::bsc_hub::{HubHandle, HubServer, HubServerConfig, HubServerEvent};
use crate::device::bsc_hub_core::{HubConfig, HubEvent, HubRole};
use crate::device::eg4::{Eg4PackActor, SetState};
use crate::device::jbd::{JbdBmsDevice, JbdGattConfig};
use crate::device::jbd_core::{JbdBms, JbdConfig};
use crate::client::jbd_client::{JbdClientActor, JbdClientConfig, JbdTarget};
use crate::device::eg4_core::Eg4Pack;
use crate::link::capture::{CaptureFormat, PcapngCapture};
use crate::link::record::FrameRecord;
use crate::model::PackConfig;
use crate::observe::{Observation, ObservationKind, ObservationLog};
use crate::protocol::bvlc_sc::{DeviceUuid, Vmac};
use crate::protocol::eg4::RegisterProfile;
use crate::transport::tls::TlsDir;
use crate::transport::ws_client::WsConnectOptions;
use crate::transport::bus::{BusActor, BusConfig, BusDevice, BusFrames, BusPortSpec, ClearFaults, InjectFault};

const DEFAULT_WITHIN: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides the scenario's seed.
    pub seed: Option<u64>,
    /// Write one pcapng per link here.
    pub capture_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub index: usize,
    pub step: &'static str,
    pub passed: bool,
    pub message: String,
    pub t_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub file: PathBuf,
    pub passed: bool,
    pub seed: u64,
    pub duration_ms: f64,
    /// Why the scenario could not run at all (setup failed).
    pub error: Option<String>,
    pub steps: Vec<StepReport>,
    pub processes: Vec<ProcessReport>,
    pub captures: Vec<PathBuf>,
    /// The last observations before the run ended (what a failure shows).
    pub recent_observations: Vec<Observation>,
    #[serde(skip)]
    pub frames: Vec<FrameRecord>,
    #[serde(skip)]
    pub observations: Vec<Observation>,
}

impl ScenarioReport {
    pub fn failure(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(e.clone());
        }
        self.steps
            .iter()
            .find(|s| !s.passed)
            .map(|s| format!("step {} ({}): {}", s.index, s.step, s.message))
    }
}

/// The runner actor: one scenario per message, each in the System the
/// caller started.
pub struct ScenarioRunner;

impl Actor for ScenarioRunner {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "ScenarioReport")]
pub struct RunScenario {
    pub scenario: Scenario,
    pub file: PathBuf,
    pub options: RunOptions,
}

impl Handler<RunScenario> for ScenarioRunner {
    type Result = ResponseFuture<ScenarioReport>;
    fn handle(&mut self, msg: RunScenario, _ctx: &mut Context<Self>) -> Self::Result {
        Box::pin(run_scenario(msg.scenario, msg.file, msg.options))
    }
}

/// Runs a scenario file in a fresh actor system on this thread.
pub fn run_file_blocking(scenario: Scenario, file: PathBuf, options: RunOptions) -> ScenarioReport {
    let sys = actix::System::new();
    sys.block_on(async move {
        let runner = ScenarioRunner.start();
        match runner.send(RunScenario { scenario, file: file.clone(), options }).await {
            Ok(r) => r,
            Err(e) => ScenarioReport {
                name: file.display().to_string(),
                file,
                passed: false,
                seed: 0,
                duration_ms: 0.0,
                error: Some(format!("runner failed: {e}")),
                steps: vec![],
                processes: vec![],
                captures: vec![],
                recent_observations: vec![],
                frames: vec![],
                observations: vec![],
            },
        }
    })
}

/// A running client. Pollers own a link (faults, frames); a passive sniffer
/// has none. `_actor` keeps the actor alive until teardown drops it.
struct ClientHandle {
    link: Option<ClientLinkControl>,
    _actor: Box<dyn std::any::Any>,
}

struct ClientLinkControl {
    fault: Recipient<ClientFault>,
    clear: Recipient<ClientClearFaults>,
    frames: Recipient<ClientFrames>,
}

/// A client actor that owns a link: faults, clearing and frames go to it.
fn linked_handle<A>(a: Addr<A>) -> ClientHandle
where
    A: Actor<Context = Context<A>> + Handler<ClientFault> + Handler<ClientClearFaults> + Handler<ClientFrames>,
{
    ClientHandle {
        link: Some(ClientLinkControl {
            fault: a.clone().recipient(),
            clear: a.clone().recipient(),
            frames: a.clone().recipient(),
        }),
        _actor: Box::new(a),
    }
}

/// Everything a running scenario owns. Dropping it stops the actors.
struct World {
    log: ObservationLog,
    wall_start_ns: u64,
    buses: Vec<(Vec<String>, Addr<BusActor>)>,
    packs: BTreeMap<String, Addr<Eg4PackActor>>,
    clients: BTreeMap<String, ClientHandle>,
    hubs: BTreeMap<String, RunningHub>,
    bsc_nodes: BTreeMap<String, (Addr<BscNodeActor>, Vmac)>,
    bsc_raw: BTreeMap<String, Addr<BscRawPeer>>,
    /// JBD BMSes on the process's air, with the peripheral adapter each holds.
    jbd: BTreeMap<String, BleDevice>,
    /// `ble_hosts`: scenario name → the host's name on the shared air.
    ble_hosts: BTreeMap<String, String>,
    processes: Vec<RunningProcess>,
    vars: BTreeMap<String, String>,
    _tmp: tempfile::TempDir,
}

/// A BLE device of the scenario: its actor and the peripheral adapter (hciN)
/// the shared air lent it for this run.
struct BleDevice {
    device: Option<JbdBmsDevice>,
    adapter: String,
}

/// A BLE device's link on the air, by the adapter the device holds.
async fn ble_link<F, Fut, T>(adapter: &str, f: F) -> Result<T, String>
where
    F: FnOnce(crate::air::LinkControl) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let air = crate::air::shared::shared()?;
    let adapter = adapter.to_string();
    air.run(move |air| async move {
        match air.link(&adapter) {
            Some(link) => Ok(f(link).await),
            None => Err(format!("the air has no link for {adapter}")),
        }
    })
    .await?
}

/// Where a named link's fault engine lives. `fault`, `clear_faults` and
/// frame collection go through this, whatever the transport.
enum LinkHome<'w> {
    /// A client actor's own link.
    Client(&'w ClientLinkControl),
    /// Every port and device link on one simulated RS-485 bus.
    Bus(&'w Addr<BusActor>),
    /// A BLE device's link on the air: (device name, peripheral adapter).
    Ble(String, String),
}

impl World {
    /// The home of the link called `name`.
    fn link_home(&self, name: &str) -> Result<LinkHome<'_>, String> {
        if let Some(c) = self.clients.get(name) {
            return c
                .link
                .as_ref()
                .map(LinkHome::Client)
                .ok_or_else(|| format!("`{name}` is a passive sniffer: it has no link to fault; fault its bus port instead"));
        }
        if let Some(d) = self.jbd.get(name) {
            return Ok(LinkHome::Ble(name.to_string(), d.adapter.clone()));
        }
        self.buses
            .iter()
            .find(|(names, _)| names.iter().any(|n| n == name))
            .map(|(_, bus)| LinkHome::Bus(bus))
            .ok_or_else(|| format!("no link `{name}`"))
    }

    /// Every link home once (a bus once for all its links).
    fn link_homes(&self) -> Vec<LinkHome<'_>> {
        let clients = self.clients.values().filter_map(|c| c.link.as_ref().map(LinkHome::Client));
        let buses = self.buses.iter().map(|(_, bus)| LinkHome::Bus(bus));
        let ble = self.jbd.iter().map(|(name, d)| LinkHome::Ble(name.clone(), d.adapter.clone()));
        clients.chain(buses).chain(ble).collect()
    }
}

impl LinkHome<'_> {
    async fn add_fault(&self, link: &str, rule: crate::link::FaultRule) -> Result<(), String> {
        match self {
            LinkHome::Client(ctl) => ctl.fault.send(ClientFault(rule)).await.map_err(|e| e.to_string()),
            LinkHome::Bus(bus) => bus.send(InjectFault { link: link.to_string(), rule }).await.map_err(|e| e.to_string())?,
            LinkHome::Ble(_, adapter) => ble_link(adapter, move |l| async move { l.add_fault(rule) }).await,
        }
    }

    async fn clear_faults(&self, link: &str) -> Result<(), String> {
        match self {
            LinkHome::Client(ctl) => ctl.clear.send(ClientClearFaults).await.map_err(|e| e.to_string()),
            LinkHome::Bus(bus) => bus.send(ClearFaults { link: link.to_string() }).await.map_err(|e| e.to_string())?,
            LinkHome::Ble(_, adapter) => ble_link(adapter, |l| async move { l.clear_faults() }).await,
        }
    }

    /// The frames its links carried, each under the link's scenario name
    /// (BLE links record under their adapter's name).
    async fn frames(&self) -> Vec<FrameRecord> {
        match self {
            LinkHome::Client(ctl) => ctl.frames.send(ClientFrames).await.unwrap_or_default(),
            LinkHome::Bus(bus) => bus.send(BusFrames).await.unwrap_or_default(),
            LinkHome::Ble(name, adapter) => {
                let mut recs = ble_link(adapter, |l| async move { l.frames() }).await.unwrap_or_default();
                for r in &mut recs {
                    r.link.clone_from(name);
                }
                recs
            }
        }
    }
}

/// A BACnet/SC hub of the scenario. `handle` is `None` while stopped; a restart
/// binds the same address, so nodes find it where they left it.
struct RunningHub {
    config: HubServerConfig,
    handle: Option<HubHandle>,
    events: Option<tokio::task::JoinHandle<()>>,
}

impl RunningHub {
    async fn start(name: &str, mut config: HubServerConfig, log: &ObservationLog) -> Result<RunningHub, String> {
        let handle = HubServer::start(config.clone()).await.map_err(|e| format!("hub `{name}`: {e}"))?;
        config.listen = handle.local_addr();
        let mut rx = handle.subscribe();
        let (log, source) = (log.clone(), name.to_string());
        let events = actix::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match rx.recv().await {
                    Ok(ev) => log.push(&source, hub_observation(&ev)),
                    Err(RecvError::Lagged(n)) => log.push(
                        &source,
                        ObservationKind::Hub { event: "events_lost".into(), detail: format!("{n} events not observed") },
                    ),
                    Err(RecvError::Closed) => break,
                }
            }
        });
        Ok(RunningHub { config, handle: Some(handle), events: Some(events) })
    }

    async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
        if let Some(t) = self.events.take() {
            // Events already queued are delivered before the channel reports closed.
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
    }
}

/// A hub event as an observation: `event` is a stable snake-case name scenarios
/// match on; `detail` is the event's debug form (connection, VMAC, reason).
fn hub_observation(ev: &HubServerEvent) -> ObservationKind {
    let event = match ev {
        HubServerEvent::Accepted { .. } => "accepted",
        HubServerEvent::Refused { .. } => "refused",
        HubServerEvent::Core(c) => match c {
            HubEvent::Connected { .. } => "connected",
            HubEvent::Replaced { .. } => "replaced",
            HubEvent::DuplicateVmac { .. } => "duplicate_vmac",
            HubEvent::SilentPeerDropped { .. } => "silent_peer_dropped",
            HubEvent::ConnectWaitExpired { .. } => "connect_wait_expired",
            HubEvent::Disconnected { .. } => "disconnected",
            HubEvent::PeerClosed { .. } => "peer_closed",
            HubEvent::NakSent { .. } => "nak_sent",
            HubEvent::Dropped { .. } => "dropped",
            HubEvent::OriginatingVmacPresent { .. } => "originating_vmac_present",
        },
        HubServerEvent::ClosedByHub { .. } => "closed_by_hub",
        HubServerEvent::ClosedByShell { .. } => "closed_by_shell",
        HubServerEvent::SlowConsumer { .. } => "slow_consumer",
        HubServerEvent::SlowConsumerRecovered { .. } => "slow_consumer_recovered",
        HubServerEvent::Ended { .. } => "ended",
    };
    let detail = match ev {
        HubServerEvent::Core(c) => format!("{c:?}"),
        other => format!("{other:?}"),
    };
    ObservationKind::Hub { event: event.into(), detail }
}

async fn run_scenario(scenario: Scenario, file: PathBuf, options: RunOptions) -> ScenarioReport {
    let started = Instant::now();
    let seed = options.seed.unwrap_or(scenario.seed);
    let mut report = ScenarioReport {
        name: scenario.name.clone(),
        file: file.clone(),
        passed: false,
        seed,
        duration_ms: 0.0,
        error: None,
        steps: vec![],
        processes: vec![],
        captures: vec![],
        recent_observations: vec![],
        frames: vec![],
        observations: vec![],
    };
    let base_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut world = match build_world(&scenario, seed, &base_dir).await {
        Ok(w) => w,
        Err((e, partial)) => {
            report.error = Some(e);
            if let Some(w) = partial {
                teardown(w, &mut report, &options, &scenario).await;
            }
            report.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            return report;
        }
    };
    let limit = scenario.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(120));
    let timeline = run_steps(&scenario, &mut world, &mut report);
    if tokio::time::timeout(limit, timeline).await.is_err() {
        report.steps.push(StepReport {
            index: report.steps.len() + 1,
            step: "timeout",
            passed: false,
            message: format!("scenario exceeded its timeout of {}", humantime::format_duration(limit)),
            t_ms: world.log.now_ms(),
        });
    }
    for (p, spec) in world.processes.iter().zip(&scenario.processes) {
        if p.timed_out() {
            let limit = spec.timeout.map(|d| d.0).unwrap_or_default();
            report.steps.push(StepReport {
                index: report.steps.len() + 1,
                step: "process_timeout",
                passed: false,
                message: format!(
                    "process `{}` ran longer than its timeout of {} and was killed; last output:\n  {}",
                    p.name,
                    humantime::format_duration(limit),
                    p.tail(10).join("\n  ")
                ),
                t_ms: world.log.now_ms(),
            });
        }
    }
    report.passed = report.steps.iter().all(|s| s.passed);
    teardown(world, &mut report, &options, &scenario).await;
    report.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    report
}

async fn build_world(scenario: &Scenario, seed: u64, base_dir: &Path) -> Result<World, (String, Option<World>)> {
    let tmp = tempfile::Builder::new()
        .prefix("hilbench-")
        .tempdir()
        .map_err(|e| (format!("cannot create a temporary directory: {e}"), None))?;
    let log = ObservationLog::new(Instant::now());
    let wall_start_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut world = World {
        log: log.clone(),
        wall_start_ns,
        buses: vec![],
        packs: BTreeMap::new(),
        clients: BTreeMap::new(),
        hubs: BTreeMap::new(),
        bsc_nodes: BTreeMap::new(),
        bsc_raw: BTreeMap::new(),
        jbd: BTreeMap::new(),
        ble_hosts: BTreeMap::new(),
        processes: vec![],
        vars: BTreeMap::new(),
        _tmp: tmp,
    };
    world.vars.insert("scenario_dir".into(), base_dir.display().to_string());
    world.vars.insert("python".into(), crate::python_path());
    world.vars.insert("seed".into(), seed.to_string());

    for bus in &scenario.buses {
        let mut devices = Vec::new();
        let on_bus = scenario.devices.iter().filter_map(|d| match d {
            DeviceSpec::Eg4Lp4(d) if d.bus == bus.name => Some(d),
            _ => None,
        });
        for d in on_bus {
            let pack = match make_pack(d) {
                Ok(p) => p,
                Err(e) => return Err((format!("device `{}`: {e}", d.name), Some(world))),
            };
            let addr = Eg4PackActor::new(d.name.clone(), pack, log.clone()).start();
            devices.push(BusDevice {
                name: d.name.clone(),
                recipient: addr.clone().recipient(),
            });
            world.packs.insert(d.name.clone(), addr);
        }
        let cfg = BusConfig {
            name: bus.name.clone(),
            baud: bus.baud,
            wire_time: bus.wire_time,
            ports: bus
                .ports
                .iter()
                .map(|p| BusPortSpec {
                    name: p.clone(),
                    link_path: Some(world._tmp.path().join(format!("{p}.tty"))),
                })
                .collect(),
            seed,
            frame_limit: None,
            record: true,
        };
        let actor = match BusActor::open(cfg, devices, log.clone()) {
            Ok(a) => a,
            Err(e) => return Err((format!("bus `{}`: {e}", bus.name), Some(world))),
        };
        for (name, path) in actor.port_paths() {
            world.vars.insert(format!("port.{name}"), path.display().to_string());
        }
        let names = actor.link_names();
        world.buses.push((names, actor.start()));
    }

    let bsc_clients: Vec<&str> = scenario
        .clients
        .iter()
        .filter(|c| matches!(c, ClientSpec::BscNode(_) | ClientSpec::BscRaw(_)))
        .map(|c| c.name())
        .collect();
    let pki_dir = world._tmp.path().join("pki");
    if scenario.devices.iter().any(|d| matches!(d, DeviceSpec::BscHub(h) if h.tls)) {
        // One node certificate per BACnet/SC client, in client order (node-1, node-2, …).
        if let Err(e) = crate::cli::pki::generate(&pki_dir, bsc_clients.len().max(1), &[], 1, false) {
            return Err((format!("test PKI: {e}"), Some(world)));
        }
        world.vars.insert("pki_dir".into(), pki_dir.display().to_string());
    }
    for d in &scenario.devices {
        let DeviceSpec::BscHub(h) = d else { continue };
        let config = hub_config(h, &pki_dir);
        match RunningHub::start(&h.name, config, &log).await {
            Ok(hub) => {
                if let Some(handle) = &hub.handle {
                    world.vars.insert(format!("hub.{}", h.name), handle.url());
                }
                world.hubs.insert(h.name.clone(), hub);
            }
            Err(e) => return Err((e, Some(world))),
        }
    }

    for d in &scenario.devices {
        let DeviceSpec::JbdBms(j) = d else { continue };
        match start_jbd(j, seed, &log).await {
            Ok(dev) => {
                world.vars.insert("air.bus".into(), crate::air::shared::shared().map(|a| a.address().to_string()).unwrap_or_default());
                if let Some(device) = &dev.device {
                    world.vars.insert(format!("ble.{}", j.name), device.address.clone());
                }
                world.jbd.insert(j.name.clone(), dev);
            }
            Err(e) => return Err((format!("device `{}`: {e}", j.name), Some(world))),
        }
    }

    for name in &scenario.ble_hosts {
        match add_ble_host(name).await {
            Ok(info) => {
                world.vars.insert(format!("ble_host.{name}.bus"), info.dbus_system_bus_address.clone());
                world.vars.insert(format!("ble_host.{name}.address"), info.address.clone());
                world.ble_hosts.insert(name.clone(), info.name);
            }
            Err(e) => return Err((format!("ble host `{name}`: {e}"), Some(world))),
        }
    }

    for spec in &scenario.clients {
        let started = match spec {
            ClientSpec::ModbusMaster(c)
            | ClientSpec::InverterMaster(c)
            | ClientSpec::ModbusSniffer(c)
            | ClientSpec::LegacyClient(c) => start_serial_client(spec, c, &world.vars, seed, &log),
            ClientSpec::BscNode(c) => {
                let index = bsc_clients.iter().position(|n| *n == c.name).unwrap_or(0);
                match bsc_node_config(c, index, &world, &pki_dir, seed) {
                    Ok((cfg, vmac)) => {
                        let addr = BscNodeActor::new(cfg, log.clone()).start();
                        world.bsc_nodes.insert(c.name.clone(), (addr.clone(), vmac));
                        Ok(linked_handle(addr))
                    }
                    Err(e) => Err(e),
                }
            }
            ClientSpec::JbdClient(c) => {
                let address = world.vars.get(&format!("ble.{}", c.device)).cloned().unwrap_or_else(|| c.device.clone());
                let defaults = JbdClientConfig::default();
                let cfg = JbdClientConfig {
                    name: c.name.clone(),
                    target: JbdTarget { address: Some(address), name: None },
                    interval: c.interval.map(|d| d.0).unwrap_or(Duration::from_secs(1)),
                    timeout: c.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(1)),
                    retries: c.retries.unwrap_or(defaults.retries),
                    scan_timeout: Duration::from_secs(5),
                    verify_checksum: c.verify_checksum.unwrap_or(true),
                    write_type: match c.write {
                        Some(BleWriteType::Request) => btleplug::api::WriteType::WithResponse,
                        _ => btleplug::api::WriteType::WithoutResponse,
                    },
                    seed,
                    ..defaults
                };
                Ok(linked_handle(JbdClientActor::new(cfg, log.clone()).start()))
            }
            ClientSpec::BscRaw(c) => {
                let index = bsc_clients.iter().position(|n| *n == c.name).unwrap_or(0);
                bsc_raw_config(c, index, &world, &pki_dir).map(|cfg| {
                    let addr = BscRawPeer::new(cfg, log.clone()).start();
                    world.bsc_raw.insert(c.name.clone(), addr.clone());
                    ClientHandle { link: None, _actor: Box::new(addr) }
                })
            }
        };
        match started {
            Ok(a) => {
                world.clients.insert(spec.name().to_string(), a);
            }
            Err(e) => return Err((format!("client `{}`: {e}", spec.name()), Some(world))),
        }
    }

    for p in &scenario.processes {
        let proc = match RunningProcess::start(p, &world.vars, base_dir).await {
            Ok(p) => p,
            Err(e) => return Err((e, Some(world))),
        };
        world.processes.push(proc);
        if let Some(ready) = &p.ready {
            let limit = p.ready_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(10));
            let deadline = Instant::now() + limit;
            let proc = world.processes.last_mut().expect("just pushed");
            loop {
                if proc.has_line(ready) {
                    break;
                }
                if let Some(code) = proc.poll_exit() {
                    let tail = proc.tail(10).join("\n  ");
                    return Err((
                        format!(
                            "process `{}` exited with code {code} before printing its ready line `{ready}`; last output:\n  {tail}",
                            p.name
                        ),
                        Some(world),
                    ));
                }
                if Instant::now() > deadline {
                    let tail = proc.tail(10).join("\n  ");
                    return Err((
                        format!(
                            "process `{}` did not print its ready line `{ready}` within {}; last output:\n  {tail}",
                            p.name,
                            humantime::format_duration(limit)
                        ),
                        Some(world),
                    ));
                }
                tokio::time::sleep(POLL).await;
            }
        }
    }
    Ok(world)
}

fn start_serial_client(
    spec: &ClientSpec,
    c: &SerialClientSpec,
    vars: &BTreeMap<String, String>,
    seed: u64,
    log: &ObservationLog,
) -> Result<ClientHandle, String> {
    let port = match vars.get(&format!("port.{}", c.port)) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(&c.port),
    };
    let profile = c.profile.unwrap_or(RegisterProfile::Lp4V2);
    let poller = PollerConfig {
        name: c.name.clone(),
        port: port.clone(),
        baud: c.baud,
        addresses: c.addresses.clone(),
        interval: c.interval.map(|d| d.0).unwrap_or(Duration::from_millis(200)),
        timeout: c.timeout.map(|d| d.0).unwrap_or(Duration::from_millis(500)),
        retries: c.retries.unwrap_or(2),
        publish_readings: !matches!(spec, ClientSpec::InverterMaster(_)),
        seed,
    };
    let started = match spec {
        ClientSpec::ModbusMaster(_) | ClientSpec::InverterMaster(_) => {
            PollerActor::open(poller, ModbusPoll { profile }, log.clone()).map(|a| linked_handle(a.start()))
        }
        ClientSpec::LegacyClient(_) => PollerActor::open(poller, LegacyPoll, log.clone()).map(|a| linked_handle(a.start())),
        ClientSpec::ModbusSniffer(_) => SnifferActor::open(
            SnifferConfig {
                name: c.name.clone(),
                port,
                baud: c.baud,
                profile,
            },
            log.clone(),
        )
        .map(|a| ClientHandle {
            link: None,
            _actor: Box::new(a.start()),
        }),
        ClientSpec::BscNode(_) | ClientSpec::BscRaw(_) | ClientSpec::JbdClient(_) => {
            return Err(format!("`{}` is not a serial client", c.name))
        }
    };
    started.map_err(|e| e.to_string())
}

/// Another machine on the process's air, under a name no other scenario
/// in this process has used (hosts outlive nothing: teardown removes them).
async fn add_ble_host(name: &str) -> Result<crate::air::HostInfo, String> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let unique = format!("{name}-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let air = crate::air::shared::shared()?;
    air.run(move |air| async move { air.add_host(&unique).await.map_err(|e| format!("{e:#}")) }).await?
}

/// A JBD BMS on a fresh peripheral adapter of the process's air.
async fn start_jbd(j: &JbdDeviceSpec, seed: u64, log: &ObservationLog) -> Result<BleDevice, String> {
    let mut pack = PackConfig::default();
    if let Some(c) = j.cells {
        pack.cells = c;
    }
    if let Some(n) = j.ntc {
        pack.ntc = n;
    }
    if let Some(a) = j.capacity_ah {
        pack.capacity_ah = a;
    }
    let cfg = JbdConfig {
        pack,
        profile: j.profile.unwrap_or_default(),
        quirks: j.quirks.clone(),
        seed,
        ..JbdConfig::default()
    };
    let mut core = JbdBms::new(cfg)?;
    for (k, v) in &j.state {
        core.set(k, *v).map_err(|e| format!("state {k}: {e}"))?;
    }
    let air = crate::air::shared::shared()?;
    let info = air
        .run(|air| async move { air.add_peripheral_adapter().await.map_err(|e| format!("{e:#}")) })
        .await??;
    let mtu = j.mtu.unwrap_or(crate::device::jbd::DEFAULT_ATT_MTU);
    let rssi = j.rssi;
    ble_link(&info.name, move |l| async move {
        l.set_rssi(rssi);
        l.set_mtu(mtu).await
    })
    .await?;
    let gatt = JbdGattConfig {
        adapter: info.name.clone(),
        local_name: j.local_name.clone().unwrap_or_else(|| JbdGattConfig::default().local_name),
        ..JbdGattConfig::default()
    };
    let mut dev = BleDevice { device: None, adapter: info.name.clone() };
    match JbdBmsDevice::start(j.name.clone(), core, gatt, log.clone()).await {
        Ok(d) => {
            dev.device = Some(d);
            Ok(dev)
        }
        Err(e) => {
            dev.release().await;
            Err(format!("{e:#}"))
        }
    }
}

impl BleDevice {
    /// Stops the device and gives its adapter back to the air, so the next
    /// scenario's scans never see it.
    async fn release(&mut self) {
        if let Some(d) = self.device.take() {
            d.stop().await;
        }
        if let Ok(air) = crate::air::shared::shared() {
            let adapter = self.adapter.clone();
            let _ = air.run(move |air| async move { air.remove_peripheral_adapter(&adapter).await }).await;
        }
    }
}

fn hub_config(h: &BscHubSpec, pki_dir: &Path) -> HubServerConfig {
    let mut core = HubConfig {
        hub_status: match h.role {
            BscHubRole::Primary => HubRole::Primary,
            BscHubRole::Failover => HubRole::Failover,
        },
        broadcast_rate_limit: h.broadcast_rate_limit,
        ..HubConfig::default()
    };
    if let Some(d) = h.heartbeat_timeout {
        core.heartbeat_timeout = d.0;
    }
    if let Some(d) = h.connect_wait {
        core.connect_wait = d.0;
    }
    if let Some(b) = h.max_bvlc {
        core.max_bvlc = b;
    }
    let mut cfg = HubServerConfig {
        tls: h.tls.then(|| TlsDir::hub(pki_dir)),
        core,
        // Two runtime threads per hub are plenty for a scenario and keep many hubs cheap.
        worker_threads: 2,
        ..HubServerConfig::default()
    };
    if let Some(n) = h.max_connections {
        cfg.max_connections = n;
        cfg.core.max_connections = n;
    }
    if let Some(m) = h.max_message {
        cfg.max_message = m;
    }
    cfg.max_message = cfg.max_message.max(cfg.core.max_bvlc as usize);
    if let Some(q) = h.queue_depth {
        cfg.queue_depth = q;
    }
    if let Some(d) = h.slow_consumer_close_after {
        cfg.slow_consumer_close_after = Some(d.0);
    }
    cfg
}

/// The URL for a node's `hub:` (a hub device's URL, or a URL as given) and
/// whether it is TLS.
fn hub_url(world: &World, hub: &str) -> Result<String, String> {
    if hub.starts_with("ws://") || hub.starts_with("wss://") {
        return Ok(hub.to_string());
    }
    world.vars.get(&format!("hub.{hub}")).cloned().ok_or_else(|| format!("no hub `{hub}`"))
}

/// TLS for a client of the scenario's hubs: its own node certificate from the run's PKI.
fn client_ws_options(url: &str, index: usize, pki_dir: &Path) -> Result<WsConnectOptions, String> {
    if !url.starts_with("wss://") {
        return Ok(WsConnectOptions::hub(None));
    }
    let tls = TlsDir::node(pki_dir, &format!("node-{}", index + 1)).client_config().map_err(|e| e.to_string())?;
    Ok(WsConnectOptions::hub(Some(tls)))
}

/// `02:00:00:00:NN:NN` from the client's index, unless the scenario gives one.
fn client_vmac(given: Option<&str>, index: usize) -> Vmac {
    given
        .and_then(|v| v.parse().ok())
        .unwrap_or(Vmac([0x02, 0, 0, 0, (index >> 8) as u8, (index as u8).wrapping_add(1)]))
}

fn client_uuid(given: Option<&str>, vmac: Vmac) -> DeviceUuid {
    given.and_then(|u| u.parse().ok()).unwrap_or_else(|| {
        let mut u = [0u8; 16];
        u[..8].copy_from_slice(b"hilbench");
        u[10..].copy_from_slice(&vmac.0);
        DeviceUuid(u)
    })
}

fn bsc_node_config(
    c: &BscNodeSpec,
    index: usize,
    world: &World,
    pki_dir: &Path,
    seed: u64,
) -> Result<(BscNodeConfig, Vmac), String> {
    let primary = hub_url(world, &c.hub)?;
    let vmac = client_vmac(c.vmac.as_deref(), index);
    let mut session = NodeConfig::new(vmac, client_uuid(c.uuid.as_deref(), vmac));
    if let Some(h) = c.heartbeat {
        session.heartbeat_interval = h.0;
    }
    if let Some(w) = c.heartbeat_ack_wait {
        session.heartbeat_ack_wait = w.0;
    }
    let mut cfg = BscNodeConfig::new(c.name.clone(), primary.clone(), session);
    cfg.ws = client_ws_options(&primary, index, pki_dir)?;
    if let Some(f) = &c.failover {
        cfg.failover_url = Some(hub_url(world, f)?);
    }
    if let Some(r) = c.reconnect {
        cfg.backoff_min = r.0;
        cfg.backoff_max = r.0 * 10;
    } else {
        // Scenarios run in seconds: reconnect quickly.
        cfg.backoff_min = Duration::from_millis(200);
        cfg.backoff_max = Duration::from_secs(2);
    }
    cfg.seed = seed.wrapping_add(index as u64);
    Ok((cfg, vmac))
}

fn bsc_raw_config(c: &BscRawSpec, index: usize, world: &World, pki_dir: &Path) -> Result<BscRawConfig, String> {
    let url = hub_url(world, &c.hub)?;
    let mut ws = client_ws_options(&url, index, pki_dir)?;
    if let Some(p) = &c.subprotocol {
        ws.subprotocol = (!p.is_empty()).then(|| p.clone());
    }
    let vmac = client_vmac(c.vmac.as_deref(), index);
    Ok(BscRawConfig {
        name: c.name.clone(),
        url,
        ws,
        handshake: c.handshake,
        vmac,
        uuid: client_uuid(c.uuid.as_deref(), vmac),
        read: c.read,
        delay: c.delay.map(|d| d.0).unwrap_or_default(),
    })
}

fn make_pack(d: &Eg4DeviceSpec) -> Result<Eg4Pack, String> {
    let mut cfg = PackConfig::default();
    if let Some(c) = d.cells {
        cfg.cells = c;
    }
    if let Some(n) = d.ntc {
        cfg.ntc = n;
    }
    let mut pack = Eg4Pack::new(d.address, cfg)?;
    if let Some(p) = d.profile {
        pack.profile = p;
    }
    if let Some(p) = d.protocol {
        pack.protocol = p;
    }
    pack.quirks = d.quirks.clone();
    for (k, v) in &d.state {
        pack.set(k, *v)?;
    }
    Ok(pack)
}

async fn run_steps(scenario: &Scenario, world: &mut World, report: &mut ScenarioReport) {
    for (i, step) in scenario.steps.iter().enumerate() {
        let t_ms = world.log.now_ms();
        let result = run_step(step, world).await;
        let passed = result.is_ok();
        let message = match result {
            Ok(m) => m,
            Err(m) => m,
        };
        tracing::info!(step = i + 1, kind = step.label(), passed, "{message}");
        report.steps.push(StepReport {
            index: i + 1,
            step: step.label(),
            passed,
            message,
            t_ms,
        });
        if !passed {
            break;
        }
    }
}

fn within(d: Option<Dur>) -> Duration {
    d.map(|d| d.0).unwrap_or(DEFAULT_WITHIN)
}

/// Checks `count()` against `at_least`/`at_most` over a window: passes as
/// soon as `at_least` is met (when there is no `at_most`), otherwise waits
/// the window out.
async fn count_check<F: std::future::Future<Output = usize>>(
    at_least: Option<usize>,
    at_most: Option<usize>,
    window: Duration,
    what: &str,
    count: impl Fn() -> F,
) -> Result<String, String> {
    let deadline = Instant::now() + window;
    loop {
        let n = count().await;
        if let Some(max) = at_most {
            if n > max {
                return Err(format!("{n} {what}, expected at most {max}"));
            }
        }
        if at_most.is_none() && at_least.is_none_or(|m| n >= m) {
            return Ok(format!("{n} {what}"));
        }
        if Instant::now() >= deadline {
            return match at_least {
                Some(m) if n < m => Err(format!(
                    "{n} {what} within {}, expected at least {m}",
                    humantime::format_duration(window)
                )),
                _ => Ok(format!("{n} {what}")),
            };
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn run_step(step: &Step, world: &mut World) -> Result<String, String> {
    let log = world.log.clone();
    let step_start = log.now_ms();
    match step {
        Step::Wait(d) => {
            tokio::time::sleep(d.0).await;
            Ok(format!("waited {}", humantime::format_duration(d.0)))
        }
        Step::Set(s) if world.jbd.contains_key(&s.device) => {
            let dev = world.jbd.get(&s.device).and_then(|d| d.device.as_ref()).ok_or_else(|| format!("`{}` is not running", s.device))?;
            for (k, v) in &s.state {
                dev.addr
                    .send(SetState { key: k.clone(), value: *v })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("{}: {e}", s.device))?;
            }
            Ok(format!("{}: {:?}", s.device, s.state))
        }
        Step::Set(s) => {
            let pack = world.packs.get(&s.device).ok_or_else(|| format!("no device `{}`", s.device))?;
            for (k, v) in &s.state {
                pack.send(SetState { key: k.clone(), value: *v })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("{}: {e}", s.device))?;
            }
            Ok(format!("{}: {:?}", s.device, s.state))
        }
        Step::Ble(b) => {
            let adapter = world.jbd.get(&b.device).map(|d| d.adapter.clone()).ok_or_else(|| format!("no BLE device `{}`", b.device))?;
            let b2 = b.clone();
            let done = ble_link(&adapter, move |l| async move {
                let mut done = Vec::new();
                if let Some(on) = b2.refuse_connections {
                    l.refuse_connections(on);
                    done.push(format!("refuse_connections={on}"));
                }
                if let Some(on) = b2.stop_advertising_while_connected {
                    l.stop_advertising_while_connected(on);
                    done.push(format!("stop_advertising_while_connected={on}"));
                }
                if let Some(r) = b2.rssi {
                    l.set_rssi(Some(r));
                    done.push(format!("rssi={r} dBm"));
                }
                if let Some(w) = &b2.reject_write {
                    let kind = match w.as_str() {
                        "request" => Some(crate::air::WriteKind::Request),
                        "command" => Some(crate::air::WriteKind::Command),
                        _ => None,
                    };
                    l.reject_write(kind);
                    done.push(format!("reject_write={w}"));
                }
                if let Some(m) = b2.mtu {
                    done.push(format!("mtu={}", l.set_mtu(m).await));
                }
                if b2.disconnect {
                    let was = l.is_connected();
                    l.disconnect_now().await;
                    done.push(if was { "disconnected".to_string() } else { "disconnect (was not connected)".to_string() });
                }
                done
            })
            .await?;
            Ok(format!("{}: {}", b.device, done.join(", ")))
        }
        Step::Fault(f) => {
            let link = f.link.clone().unwrap_or_default();
            let rule = f.clone().into_rule()?;
            let desc = format!("{} on {}", rule.fault.name(), link);
            world.link_home(&link)?.add_fault(&link, rule).await?;
            Ok(desc)
        }
        Step::ClearFaults(c) => {
            world.link_home(&c.link)?.clear_faults(&c.link).await?;
            Ok(format!("cleared {}", c.link))
        }
        Step::ExpectReading(e) => {
            let window = within(e.within);
            let deadline = Instant::now() + window;
            let tol = e.tolerance.unwrap_or(0.0);
            let ok = |v: f64| {
                e.equals.is_none_or(|x| (v - x).abs() <= tol)
                    && e.min.is_none_or(|m| v >= m)
                    && e.max.is_none_or(|m| v <= m)
            };
            let mut last: Option<f64> = None;
            loop {
                let found = log.find_since(step_start, |o| {
                    o.source == e.client
                        && matches!(&o.kind, ObservationKind::Reading { address, values, .. }
                            if e.address.is_none_or(|a| a == *address) && values.contains_key(&e.field))
                });
                if let Some(Observation {
                    kind: ObservationKind::Reading { values, .. },
                    t_ms,
                    ..
                }) = found
                {
                    let v = values[&e.field];
                    last = Some(v);
                    if ok(v) {
                        return Ok(format!("{} = {v} at {:.0} ms", e.field, t_ms));
                    }
                }
                if Instant::now() >= deadline {
                    let want = describe_bounds(e);
                    return Err(match last {
                        Some(v) => format!(
                            "{} from `{}` was {v}, expected {want} (waited {})",
                            e.field,
                            e.client,
                            humantime::format_duration(window)
                        ),
                        None => {
                            let errs = log.count_since(step_start, |o| {
                                o.source == e.client && matches!(o.kind, ObservationKind::Error { .. })
                            });
                            format!(
                                "no reading with `{}` from `{}` within {} ({errs} errors meanwhile)",
                                e.field,
                                e.client,
                                humantime::format_duration(window)
                            )
                        }
                    });
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Step::ExpectFlag(e) => {
            let window = within(e.within);
            let deadline = Instant::now() + window;
            loop {
                let found = log.find_since(step_start, |o| {
                    o.source == e.client
                        && matches!(&o.kind, ObservationKind::Reading { address, .. }
                            if e.address.is_none_or(|a| a == *address))
                });
                let mut seen_flags = None;
                if let Some(Observation {
                    kind: ObservationKind::Reading { flags, .. },
                    ..
                }) = found
                {
                    if flags.contains(&e.flag) == e.present {
                        return Ok(format!("flag {} {}", e.flag, if e.present { "present" } else { "absent" }));
                    }
                    seen_flags = Some(flags);
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "flag `{}` expected {} in readings from `{}` within {}; last flags: {}",
                        e.flag,
                        if e.present { "present" } else { "absent" },
                        e.client,
                        humantime::format_duration(window),
                        seen_flags.map_or("(no reading)".to_string(), |f| format!("{f:?}"))
                    ));
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Step::ExpectErrors(e) => {
            let since = if e.since_start { 0.0 } else { step_start };
            let what = format!("{} errors from `{}`", e.kind.as_deref().unwrap_or("any"), e.client);
            count_check(e.at_least, e.at_most, within(e.within), &what, || {
                std::future::ready(log.count_since(since, |o| {
                    o.source == e.client
                        && match &o.kind {
                            ObservationKind::Error { address, kind, .. } => {
                                e.address.is_none_or(|a| a == *address)
                                    && e.kind.as_deref().is_none_or(|k| k == kind)
                            }
                            ObservationKind::GaveUp { address, .. } => {
                                e.address.is_none_or(|a| a == *address) && e.kind.as_deref() == Some("gave_up")
                            }
                            _ => false,
                        }
                }))
            })
            .await
        }
        Step::ExpectObservation(e) => {
            let since = if e.since_start { 0.0 } else { step_start };
            let what = match &e.contains {
                Some(c) => format!("{} observations containing `{c}`", e.kind),
                None => format!("{} observations", e.kind),
            };
            let result = count_check(e.at_least, e.at_most, within(e.within), &what, || {
                std::future::ready(log.count_since(since, |o| {
                    e.source.as_deref().is_none_or(|s| s == o.source)
                        && o.kind.name() == e.kind
                        && e.contains.as_deref().is_none_or(|c| {
                            serde_json::to_string(&o.kind).is_ok_and(|j| j.contains(c))
                        })
                }))
            })
            .await;
            result.map_err(|m| {
                // Show what did arrive of that kind: the usual reason is a detail mismatch.
                let seen: Vec<String> = log
                    .snapshot()
                    .iter()
                    .filter(|o| o.t_ms >= since && o.kind.name() == e.kind)
                    .rev()
                    .take(3)
                    .map(|o| serde_json::to_string(o).unwrap_or_default())
                    .collect();
                if seen.is_empty() { m } else { format!("{m}; latest of that kind: {}", seen.join(" | ")) }
            })
        }
        Step::SendNpdu(e) => {
            let (node, _) = world.bsc_nodes.get(&e.client).ok_or_else(|| format!("no bsc-node `{}`", e.client))?;
            let dest = match e.to.as_deref() {
                None | Some("broadcast") => Vmac::BROADCAST,
                Some(to) => match world.bsc_nodes.get(to) {
                    Some((_, v)) => *v,
                    None => to.parse().map_err(|err| format!("to `{to}`: {err}"))?,
                },
            };
            let mut npdu = match &e.npdu {
                Some(h) => parse_hex(h)?,
                None => vec![0x01, 0x00],
            };
            if let Some(n) = e.pad_to {
                if npdu.len() < n {
                    npdu.resize(n, 0);
                }
            }
            let count = e.count.unwrap_or(1);
            // A node that is (re)connecting refuses sends: wait for it, boundedly.
            let deadline = Instant::now() + DEFAULT_WITHIN;
            let mut sent = 0;
            while sent < count {
                match node.send(SendNpdu { dest, npdu: npdu.clone() }).await.map_err(|err| err.to_string())? {
                    Ok(()) => sent += 1,
                    Err(err) if Instant::now() < deadline => {
                        tracing::debug!(client = %e.client, "send refused, retrying: {err}");
                        tokio::time::sleep(POLL).await;
                    }
                    Err(err) => return Err(format!("`{}` sent {sent} of {count}: {err}", e.client)),
                }
            }
            Ok(format!("`{}` sent {count} NPDU(s) to {dest}", e.client))
        }
        Step::SendRaw(e) => {
            let peer = world.bsc_raw.get(&e.client).ok_or_else(|| format!("no bsc-raw `{}`", e.client))?;
            let mut bytes = match &e.hex {
                Some(h) => parse_hex(h)?,
                None => vec![],
            };
            if let Some(n) = e.pad_to {
                if bytes.len() < n {
                    bytes.resize(n, 0);
                }
            }
            let count = e.count.unwrap_or(1);
            for _ in 0..count {
                peer.send(SendRaw { bytes: bytes.clone(), text: e.text }).await.map_err(|err| err.to_string())?;
            }
            Ok(format!("`{}` sent {count} {} message(s) of {} bytes", e.client, if e.text { "TEXT" } else { "binary" }, bytes.len()))
        }
        Step::Stop(d) => {
            let hub = world.hubs.get_mut(&d.device).ok_or_else(|| format!("no hub `{}`", d.device))?;
            if hub.handle.is_none() {
                return Err(format!("hub `{}` is already stopped", d.device));
            }
            hub.stop().await;
            log.push(&d.device, ObservationKind::Hub { event: "stopped".into(), detail: String::new() });
            Ok(format!("stopped `{}`", d.device))
        }
        Step::Start(d) => {
            let hub = world.hubs.get(&d.device).ok_or_else(|| format!("no hub `{}`", d.device))?;
            if hub.handle.is_some() {
                return Err(format!("hub `{}` is already running", d.device));
            }
            let config = hub.config.clone();
            let started = RunningHub::start(&d.device, config, &log).await?;
            log.push(&d.device, ObservationKind::Hub { event: "started".into(), detail: String::new() });
            world.hubs.insert(d.device.clone(), started);
            Ok(format!("started `{}` again on its address", d.device))
        }
        Step::ExpectFrames(e) => {
            let since_ns = world.wall_start_ns + (step_start * 1e6) as u64;
            let what = format!("frames on `{}`", e.link);
            let world = &*world;
            count_check(e.at_least, e.at_most, within(e.within), &what, || async move {
                collect_frames(world)
                    .await
                    .iter()
                    .filter(|f| {
                        f.link == e.link
                            && f.timestamp_ns >= since_ns
                            && e.direction.is_none_or(|d| d == f.direction)
                            && e.length.is_none_or(|n| n == f.bytes.len())
                    })
                    .count()
            })
            .await
        }
        Step::ExpectOutput(e) => {
            let window = within(e.within);
            let deadline = Instant::now() + window;
            let p = world
                .processes
                .iter_mut()
                .find(|p| p.name == e.process)
                .ok_or_else(|| format!("no process `{}`", e.process))?;
            let mut exited_polls = 0;
            loop {
                if e.absent {
                    if p.has_line(&e.contains) {
                        return Err(format!("`{}` printed `{}`; last output:\n  {}", e.process, e.contains, p.tail(10).join("\n  ")));
                    }
                    // After the exit, a few more polls let its last output be read.
                    if p.poll_exit().is_some() {
                        exited_polls += 1;
                    }
                    if exited_polls > 3 || Instant::now() >= deadline {
                        return Ok(format!("`{}` did not print `{}`", e.process, e.contains));
                    }
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                if p.has_line(&e.contains) {
                    return Ok(format!("`{}` printed `{}`", e.process, e.contains));
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "`{}` did not print `{}` within {}; last output:\n  {}",
                        e.process,
                        e.contains,
                        humantime::format_duration(window),
                        p.tail(10).join("\n  ")
                    ));
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Step::ExpectExit(e) => {
            let window = within(e.within);
            let deadline = Instant::now() + window;
            let p = world
                .processes
                .iter_mut()
                .find(|p| p.name == e.process)
                .ok_or_else(|| format!("no process `{}`", e.process))?;
            loop {
                if let Some(code) = p.poll_exit() {
                    return match e.code {
                        Some(want) if want != code => Err(format!(
                            "`{}` exited with {code}, expected {want}; last output:\n  {}",
                            e.process,
                            p.tail(10).join("\n  ")
                        )),
                        _ => Ok(format!("`{}` exited with {code}", e.process)),
                    };
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "`{}` still running after {}",
                        e.process,
                        humantime::format_duration(window)
                    ));
                }
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

fn describe_bounds(e: &ExpectReading) -> String {
    let mut parts = vec![];
    if let Some(x) = e.equals {
        parts.push(format!("{x} ± {}", e.tolerance.unwrap_or(0.0)));
    }
    if let Some(m) = e.min {
        parts.push(format!(">= {m}"));
    }
    if let Some(m) = e.max {
        parts.push(format!("<= {m}"));
    }
    parts.join(" and ")
}

async fn collect_frames(world: &World) -> Vec<FrameRecord> {
    let mut all = Vec::new();
    for home in world.link_homes() {
        all.extend(home.frames().await);
    }
    all.sort_by_key(|f| f.timestamp_ns);
    all
}

async fn teardown(world: World, report: &mut ScenarioReport, options: &RunOptions, scenario: &Scenario) {
    let frames = collect_frames(&world).await;
    // Serial links are captured as Modbus RTU; BLE links as ATT (their own format).
    let serial_links: Vec<String> = world
        .buses
        .iter()
        .flat_map(|(names, _)| names.iter().cloned())
        .chain(scenario.clients.iter().filter(|c| matches!(c, ClientSpec::ModbusMaster(_) | ClientSpec::InverterMaster(_) | ClientSpec::LegacyClient(_))).map(|c| c.name().to_string()))
        .collect();
    let mut att: Vec<FrameRecord> = Vec::new();
    if options.capture_dir.is_some() {
        for (name, dev) in &world.jbd {
            let adapter = dev.adapter.clone();
            if let Ok(mut recs) = ble_link(&adapter, |l| async move { l.att_frames() }).await {
                for r in &mut recs {
                    r.link = name.clone();
                }
                att.extend(recs);
            }
        }
    }
    let World {
        log,
        buses,
        packs,
        clients,
        hubs,
        bsc_nodes,
        bsc_raw,
        jbd,
        ble_hosts,
        processes,
        ..
    } = world;
    for p in processes {
        report.processes.push(p.stop().await);
    }
    drop(clients);
    drop(bsc_nodes);
    drop(bsc_raw);
    for (_, mut dev) in jbd {
        dev.release().await;
    }
    if let (false, Ok(air)) = (ble_hosts.is_empty(), crate::air::shared::shared()) {
        for (_, host) in ble_hosts {
            let _ = air.run(move |air| async move { air.remove_host(&host).await }).await;
        }
    }
    for (_, mut hub) in hubs {
        hub.stop().await;
    }
    drop(buses);
    drop(packs);
    if let Some(dir) = &options.capture_dir {
        let serial: Vec<FrameRecord> = frames.iter().filter(|f| serial_links.contains(&f.link)).cloned().collect();
        let written = write_captures(dir, &scenario.name, &serial, CaptureFormat::ModbusRtu).and_then(|mut files| {
            files.extend(write_captures(dir, &scenario.name, &att, CaptureFormat::BleAtt)?);
            Ok(files)
        });
        match written {
            Ok(files) => report.captures = files,
            Err(e) => {
                report.passed = false;
                report.error.get_or_insert(format!("capture: {e}"));
            }
        }
    }
    report.frames = frames;
    report.observations = log.snapshot();
    let n = report.observations.len();
    report.recent_observations = report.observations[n.saturating_sub(12)..].to_vec();
}

pub fn slug(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// One pcapng per link under `dir/<scenario>/`: `<link>.pcapng` for Modbus
/// RTU, `<device>-att.pcapng` for BLE ATT. A file that cannot be written
/// completely (disk full) is an error, not a short capture.
fn write_captures(dir: &Path, scenario: &str, frames: &[FrameRecord], format: CaptureFormat) -> Result<Vec<PathBuf>, String> {
    let sdir = dir.join(slug(scenario));
    let mut by_link: BTreeMap<&str, Vec<&FrameRecord>> = BTreeMap::new();
    for f in frames {
        by_link.entry(&f.link).or_default().push(f);
    }
    let suffix = match format {
        CaptureFormat::ModbusRtu => "",
        CaptureFormat::BleAtt => "-att",
    };
    let mut files = vec![];
    for (link, recs) in by_link {
        std::fs::create_dir_all(&sdir).map_err(|e| format!("{}: {e}", sdir.display()))?;
        let path = sdir.join(format!("{}{suffix}.pcapng", slug(link)));
        let mut cap = PcapngCapture::create_as(&path, link, format).map_err(|e| format!("{}: {e}", path.display()))?;
        for r in recs {
            cap.write(r).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        cap.close().map_err(|e| format!("{}: {e}", path.display()))?;
        files.push(path);
    }
    Ok(files)
}
