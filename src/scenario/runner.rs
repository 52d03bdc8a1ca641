//! Executes one scenario: builds its buses, devices, clients and processes,
//! walks the timeline, and always tears everything down (no PTY, symlink or
//! process survives a run, whether it passed, failed or could not start).
//!
//! The runner never names a kind: devices and clients are [`Running`]
//! handles from `crate::kind`, links are found through their declarations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use serde::Serialize;

use super::expect::{self, count_check, within, POLL};
use super::process::{ProcessReport, RunningProcess};
use super::spec::*;
use crate::kind::{ble, LinkDecl, LinkHomeDecl, Running, StartContext, StepContext};
use crate::link::capture::{CaptureFormat, PcapngCapture};
use crate::link::record::FrameRecord;
use crate::observe::{Observation, ObservationLog};
use crate::transport::bus::{BusActor, BusConfig, BusFrames, BusPortSpec, ClearFaults, InjectFault};


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
/// A started device or client, under its scenario name.
struct RunningEntity {
    name: String,
    running: Box<dyn Running>,
}

/// Where a named link's faults are applied and its frames recorded.
#[derive(Debug, Clone)]
enum LinkOwner {
    /// A scenario bus: every port and device link on it.
    Bus(String),
    /// The entity that brings it (a client actor's link, a device's air link).
    Entity(String),
}

/// Everything a running scenario owns. `teardown` releases it.
struct World {
    log: ObservationLog,
    wall_start_ns: u64,
    buses: BTreeMap<String, Addr<BusActor>>,
    /// Devices then clients, in scenario order.
    entities: Vec<RunningEntity>,
    links: Vec<(LinkDecl, LinkOwner)>,
    /// `ble_hosts`: scenario name → the host's name on the shared air.
    ble_hosts: BTreeMap<String, String>,
    processes: Vec<RunningProcess>,
    vars: BTreeMap<String, String>,
    _tmp: tempfile::TempDir,
}

impl World {
    fn entity(&self, name: &str) -> Result<&RunningEntity, String> {
        self.entities.iter().find(|e| e.name == name).ok_or_else(|| format!("`{name}` is not running"))
    }

    fn entity_mut(&mut self, name: &str) -> Result<&mut RunningEntity, String> {
        self.entities.iter_mut().find(|e| e.name == name).ok_or_else(|| format!("`{name}` is not running"))
    }

    fn link(&self, name: &str) -> Result<&(LinkDecl, LinkOwner), String> {
        self.links.iter().find(|(l, _)| l.name == name).ok_or_else(|| format!("no link `{name}`"))
    }

    async fn add_fault(&self, link: &str, rule: crate::link::FaultRule) -> Result<(), String> {
        match &self.link(link)?.1 {
            LinkOwner::Bus(bus) => {
                let bus = self.buses.get(bus).ok_or_else(|| format!("bus `{bus}` is not running"))?;
                bus.send(InjectFault { link: link.to_string(), rule }).await.map_err(|e| e.to_string())?
            }
            LinkOwner::Entity(owner) => self.entity(owner)?.running.add_fault(link, rule).await,
        }
    }

    async fn clear_faults(&self, link: &str, name: Option<&str>) -> Result<(), String> {
        match &self.link(link)?.1 {
            LinkOwner::Bus(bus) => {
                let bus = self.buses.get(bus).ok_or_else(|| format!("bus `{bus}` is not running"))?;
                let msg = ClearFaults { link: link.to_string(), name: name.map(str::to_string) };
                bus.send(msg).await.map_err(|e| e.to_string())?
            }
            LinkOwner::Entity(owner) => self.entity(owner)?.running.clear_faults(link, name).await,
        }
    }
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
    let timeline = tokio::time::timeout(limit, run_steps(&scenario, &mut world, &mut report));
    let ended = tokio::select! {
        r = timeline => r.map_err(|_| ("timeout", format!("scenario exceeded its timeout of {}", humantime::format_duration(limit)))),
        sig = super::interrupt::interrupted() => {
            Err(("interrupted", format!("interrupted by {}: its processes were stopped and its folder removed", super::interrupt::name(sig))))
        }
    };
    if let Err((step, message)) = ended {
        report.steps.push(StepReport { index: report.steps.len() + 1, step, passed: false, message, t_ms: world.log.now_ms() });
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

type Partial = (String, Option<World>);

async fn build_world(scenario: &Scenario, seed: u64, base_dir: &Path) -> Result<World, Partial> {
    let tmp = tempfile::Builder::new()
        .prefix(&super::interrupt::folder_prefix())
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
        buses: BTreeMap::new(),
        entities: vec![],
        links: link_owners(scenario),
        ble_hosts: BTreeMap::new(),
        processes: vec![],
        vars: BTreeMap::new(),
        _tmp: tmp,
    };
    world.vars.insert("scenario_dir".into(), base_dir.display().to_string());
    world.vars.insert("python".into(), crate::python_path());
    world.vars.insert("seed".into(), seed.to_string());
    if let Err(e) = open_buses(scenario, seed, &mut world) {
        return Err((e, Some(world)));
    }
    if let Err(e) = start_entities(scenario, seed, &mut world).await {
        return Err((e, Some(world)));
    }
    for name in &scenario.ble_hosts {
        match ble::add_host(name).await {
            Ok(info) => {
                world.vars.insert(format!("ble_host.{name}.bus"), info.dbus_system_bus_address.clone());
                world.vars.insert(format!("ble_host.{name}.address"), info.address.clone());
                world.ble_hosts.insert(name.clone(), info.name);
            }
            Err(e) => return Err((format!("ble host `{name}`: {e}"), Some(world))),
        }
    }
    for p in &scenario.processes {
        match RunningProcess::start(p, &world.vars, base_dir).await {
            Ok(proc) => world.processes.push(proc),
            Err(e) => return Err((e, Some(world))),
        }
        if let Some(ready) = &p.ready {
            let proc = world.processes.last_mut().expect("just pushed");
            if let Err(e) = wait_ready(proc, ready, p.ready_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(10))).await {
                return Err((e, Some(world)));
            }
        }
    }
    Ok(world)
}

/// Who applies each link's faults, from the scenario's link declarations.
fn link_owners(scenario: &Scenario) -> Vec<(LinkDecl, LinkOwner)> {
    let mut owners: Vec<(LinkDecl, LinkOwner)> = Vec::new();
    for l in scenario.links() {
        let owner = match &l.home {
            LinkHomeDecl::Bus(b) => LinkOwner::Bus(b.clone()),
            LinkHomeDecl::Own => LinkOwner::Entity(
                scenario
                    .devices
                    .iter()
                    .chain(&scenario.clients)
                    .find(|e| e.decl.links().iter().any(|d| d.name == l.name))
                    .map(|e| e.name().to_string())
                    .unwrap_or_default(),
            ),
        };
        owners.push((l, owner));
    }
    owners
}

fn open_buses(scenario: &Scenario, seed: u64, world: &mut World) -> Result<(), String> {
    for bus in &scenario.buses {
        let cfg = BusConfig {
            name: bus.name.clone(),
            baud: bus.baud,
            wire_time: bus.wire_time,
            ports: bus
                .ports
                .iter()
                .map(|p| BusPortSpec { name: p.clone(), link_path: Some(world._tmp.path().join(format!("{p}.tty"))) })
                .collect(),
            seed,
            frame_limit: None,
            record: true,
        };
        let actor = BusActor::open(cfg, Vec::new(), world.log.clone()).map_err(|e| format!("bus `{}`: {e}", bus.name))?;
        for (name, path) in actor.port_paths() {
            world.vars.insert(format!("port.{name}"), path.display().to_string());
        }
        world.buses.insert(bus.name.clone(), actor.start());
    }
    Ok(())
}

/// Devices first (clients read their URLs and addresses from the
/// variables devices publish), then clients.
async fn start_entities(scenario: &Scenario, seed: u64, world: &mut World) -> Result<(), String> {
    let names = scenario.names();
    let faulted_links: std::collections::BTreeSet<String> = scenario
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Fault(f) => f.link.clone(),
            _ => None,
        })
        .collect();
    for e in scenario.devices.iter().chain(&scenario.clients) {
        let mut cx = StartContext {
            faulted_links: &faulted_links,
            log: world.log.clone(),
            seed,
            tmp: world._tmp.path(),
            vars: &mut world.vars,
            names: &names,
            buses: &world.buses,
        };
        let running = e.decl.start(&mut cx).await.map_err(|err| format!("{} `{}`: {err}", e.kind.role().noun(), e.name()))?;
        world.vars.extend(running.vars());
        world.entities.push(RunningEntity { name: e.name().to_string(), running });
    }
    Ok(())
}

async fn wait_ready(proc: &mut RunningProcess, ready: &str, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if proc.has_line(ready) {
            return Ok(());
        }
        if let Some(code) = proc.poll_exit() {
            return Err(format!(
                "process `{}` exited with code {code} before printing its ready line `{ready}`; last output:\n  {}",
                proc.name,
                proc.tail(10).join("\n  ")
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "process `{}` did not print its ready line `{ready}` within {}; last output:\n  {}",
                proc.name,
                humantime::format_duration(limit),
                proc.tail(10).join("\n  ")
            ));
        }
        tokio::time::sleep(POLL).await;
    }
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
        report.steps.push(StepReport { index: i + 1, step: step.label(), passed, message, t_ms });
        if !passed {
            break;
        }
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
        Step::Set(s) => {
            let e = world.entity(&s.device)?;
            for (k, v) in &s.state {
                e.running.set(k, *v).await.map_err(|err| format!("{}: {err}", s.device))?;
            }
            Ok(format!("{}: {:?}", s.device, s.state))
        }
        Step::Fault(f) => {
            let link = f.link.clone().unwrap_or_default();
            let rule = f.clone().into_rule(world.link(&link)?.0.checksum)?;
            let desc = format!("{} on {}", rule.fault.name(), link);
            world.add_fault(&link, rule).await?;
            Ok(desc)
        }
        Step::ClearFaults(c) => {
            world.clear_faults(&c.link, c.name.as_deref()).await?;
            Ok(match &c.name {
                Some(n) => format!("cleared `{n}` on {}", c.link),
                None => format!("cleared {}", c.link),
            })
        }
        Step::ExpectReading(e) => expect::reading(e, &log, step_start).await,
        Step::ExpectFlag(e) => expect::flag(e, &log, step_start).await,
        Step::ExpectErrors(e) => expect::errors(e, &log, step_start).await,
        Step::ExpectObservation(e) => expect::observation(e, &log, step_start).await,
        Step::ExpectFrames(e) => expect_frames(e, world, step_start).await,
        Step::ExpectOutput(e) => expect::output(e, &mut world.processes).await,
        Step::ExpectExit(e) => expect::exit(e, &mut world.processes).await,
        Step::Stop(d) => world.entity_mut(&d.device)?.running.pause().await,
        Step::Start(d) => world.entity_mut(&d.device)?.running.resume(&log).await,
        Step::Kind(k) => {
            let World { entities, vars, .. } = world;
            let e = entities.iter_mut().find(|e| e.name == k.target).ok_or_else(|| format!("`{}` is not running", k.target))?;
            e.running.step(k.doc.name, &k.body, StepContext { log: &log, vars }).await
        }
    }
}

async fn expect_frames(e: &ExpectFrames, world: &World, step_start: f64) -> Result<String, String> {
    let since_ns = world.wall_start_ns + (step_start * 1e6) as u64;
    let what = format!("frames on `{}`", e.link);
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

/// Every frame the run's links carried, oldest first, each under its link's
/// scenario name. A bus or an entity with several links is asked once.
async fn collect_frames(world: &World) -> Vec<FrameRecord> {
    let mut all = Vec::new();
    let mut asked: Vec<String> = Vec::new();
    for (_, owner) in &world.links {
        let key = format!("{owner:?}");
        let frames = match owner {
            _ if asked.contains(&key) => continue,
            LinkOwner::Bus(b) => match world.buses.get(b) {
                Some(bus) => bus.send(BusFrames).await.unwrap_or_default(),
                None => continue,
            },
            LinkOwner::Entity(n) => match world.entity(n) {
                Ok(e) => e.running.frames().await,
                Err(_) => continue,
            },
        };
        asked.push(key);
        all.extend(frames);
    }
    all.sort_by_key(|f| f.timestamp_ns);
    all
}

/// What each link with a capture format carried, in that format: a bus's
/// frames as they crossed the bus, an entity's as its `capture` gives them.
async fn capture_frames(world: &World, frames: &[FrameRecord]) -> Vec<(CaptureFormat, Vec<FrameRecord>)> {
    let mut out: Vec<(CaptureFormat, Vec<FrameRecord>)> = Vec::new();
    for (decl, owner) in &world.links {
        let Some(format) = decl.capture else { continue };
        let recs = match owner {
            LinkOwner::Bus(_) => frames.iter().filter(|f| f.link == decl.name).cloned().collect(),
            LinkOwner::Entity(n) => match world.entity(n) {
                Ok(e) => e.running.capture(&decl.name).await,
                Err(_) => continue,
            },
        };
        match out.iter_mut().find(|(f, _)| *f == format) {
            Some((_, all)) => all.extend(recs),
            None => out.push((format, recs)),
        }
    }
    out
}

async fn teardown(world: World, report: &mut ScenarioReport, options: &RunOptions, scenario: &Scenario) {
    let frames = collect_frames(&world).await;
    let captures = if options.capture_dir.is_some() { capture_frames(&world, &frames).await } else { Vec::new() };
    let World { log, buses, entities, ble_hosts, processes, .. } = world;
    for p in processes {
        report.processes.push(p.stop().await);
    }
    // Clients go before the devices they talk to.
    for e in entities.into_iter().rev() {
        e.running.stop().await;
    }
    for (_, host) in ble_hosts {
        ble::remove_host(host).await;
    }
    for bus in buses.values() {
        // Stopped now, so its PTY symlinks are gone when the run returns.
        let _ = bus.send(crate::transport::bus::Shutdown).await;
    }
    drop(buses);
    if let Some(dir) = &options.capture_dir {
        let written = captures.iter().try_fold(Vec::new(), |mut files, (format, recs)| {
            files.extend(write_captures(dir, &scenario.name, recs, *format)?);
            Ok::<_, String>(files)
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

