//! The seam every device kind and client kind plugs into.
//!
//! A kind is one module: it reads its scenario keys ([`Kind::decode`]),
//! checks them against the rest of the scenario ([`Declared::check`]),
//! names the links it brings ([`Declared::links`]) and what its
//! observations carry ([`Kind::vocabulary`]), and starts ([`Declared::start`])
//! into a [`Running`] handle the runner drives without knowing the kind:
//! template variables, `set`, its own steps, link faults, frames, stop.
//! [`REGISTRY`] lists every kind once; scenario parsing and `hilbench list`
//! come from it.

pub mod ble;
pub mod bsc_hub;
pub mod bsc_node;
pub mod bsc_raw;
pub mod eg4_lp4;
pub mod jbd_bms;
pub mod jbd_client;
pub mod legacy_client;
pub mod modbus_master;
pub mod modbus_sniffer;
pub mod replay;
pub mod shelly;
pub mod shelly_client;
pub mod smp_client;
pub mod smp_server;
mod bsc_peer;
mod serial_client;

use std::collections::BTreeMap;
use std::path::Path;

use futures::future::LocalBoxFuture;

use crate::link::capture::CaptureFormat;
use crate::link::fault::{ChecksumLayout, LinkMedium};
use crate::link::recognise::{CaptureClient, CapturedDevice, CapturedFrameView, FrameVerdict, ReplayRule};
use crate::link::{FaultRule, FrameRecord};
use crate::observe::ObservationLog;
use crate::scenario::source::{Problem, YamlPath};

/// Every kind, once. A new kind is one module and one line here.
pub static REGISTRY: &[&dyn Kind] = &[
    &eg4_lp4::Eg4Lp4,
    &jbd_bms::JbdBmsKind,
    &bsc_hub::BscHubKind,
    &modbus_master::MODBUS_MASTER,
    &modbus_master::INVERTER_MASTER,
    &modbus_sniffer::ModbusSniffer,
    &legacy_client::LegacyClient,
    &jbd_client::JbdClientKind,
    &bsc_node::BscNodeKind,
    &bsc_raw::BscRawKind,
    &smp_server::SmpServerKind,
    &smp_client::SmpClientKind,
    &shelly::ShellyKind,
    &shelly_client::ShellyClientKind,
    &replay::ReplayKind,
];

/// Kinds a program using hilbench as a library added with [`register`].
static ADDED: std::sync::RwLock<Vec<&'static dyn Kind>> = std::sync::RwLock::new(Vec::new());

/// Adds a kind defined outside this crate (a test's own device, an
/// embedder's): scenarios then take it like a built-in one. A name already
/// taken in its role is refused.
pub fn register(kind: &'static dyn Kind) -> Result<(), String> {
    if find(kind.role(), kind.name()).is_some() {
        return Err(format!("a {} kind `{}` already exists", kind.role().noun(), kind.name()));
    }
    ADDED.write().unwrap_or_else(|p| p.into_inner()).push(kind);
    Ok(())
}

/// The built-in kinds, then the added ones.
pub fn all() -> Vec<&'static dyn Kind> {
    let added = ADDED.read().unwrap_or_else(|p| p.into_inner());
    REGISTRY.iter().copied().chain(added.iter().copied()).collect()
}

/// The kind called `name` in that role.
pub fn find(role: Role, name: &str) -> Option<&'static dyn Kind> {
    all().into_iter().find(|k| k.role() == role && k.name() == name)
}

/// Names of the kinds in a role, for error messages and `hilbench list`.
pub fn names(role: Role) -> Vec<&'static str> {
    all().into_iter().filter(|k| k.role() == role).map(|k| k.name()).collect()
}

/// Every kind step (`send_npdu`, …) with the kinds that take it.
pub fn kind_steps() -> Vec<(&'static StepDoc, &'static dyn Kind)> {
    all().into_iter().flat_map(|k| k.steps().iter().map(move |s| (s, k))).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Device,
    Client,
}

impl Role {
    pub fn noun(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Client => "client",
        }
    }
}

/// A step only some kinds take, e.g. `send_npdu: {client: a, …}`.
#[derive(Debug)]
pub struct StepDoc {
    pub name: &'static str,
    /// The key naming the device or client it acts on (`client`, `device`).
    pub target: &'static str,
    pub about: &'static str,
    /// Its keys, for `hilbench list`.
    pub keys: &'static str,
}

/// A section of `hilbench list` a kind adds (its profiles, quirks, state keys).
pub struct ListSection {
    pub title: String,
    pub rows: Vec<(String, String)>,
}

/// What a client's observations carry, so a scenario's selectors can be
/// checked before anything runs. Patterns: `N` stands for a number
/// (`cellN_mv`), a trailing `*` for any text (`model:*`).
#[derive(Debug, Clone, Default)]
pub struct Vocabulary {
    pub fields: Vec<String>,
    pub flags: Vec<String>,
    pub errors: Vec<String>,
}

impl Vocabulary {
    /// Whether `name` matches one of `patterns`.
    pub fn matches(patterns: &[String], name: &str) -> bool {
        let generic = numbers_as_n(name);
        patterns.iter().any(|p| {
            if let Some(prefix) = p.strip_suffix('*') {
                return name.starts_with(prefix) && name.len() > prefix.len();
            }
            *p == name || *p == generic
        })
    }
}

/// `cell12_mv` → `cellN_mv`: every run of digits becomes one `N`.
pub fn numbers_as_n(key: &str) -> String {
    let mut generic = String::with_capacity(key.len());
    let mut in_digits = false;
    for c in key.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                generic.push('N');
            }
            in_digits = true;
        } else {
            generic.push(c);
            in_digits = false;
        }
    }
    generic
}

/// One device or client kind.
pub trait Kind: Sync {
    fn name(&self) -> &'static str;
    fn role(&self) -> Role;
    /// One line for `hilbench list`.
    fn about(&self) -> &'static str;
    /// Reads the kind's scenario keys (the entry without `kind`). Problems
    /// are relative to the entry.
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem>;
    /// Steps only this kind takes.
    fn steps(&self) -> &'static [StepDoc] {
        &[]
    }
    /// What its readings and errors carry (clients that publish readings).
    fn vocabulary(&self) -> Option<Vocabulary> {
        None
    }
    /// Its sections of `hilbench list`.
    fn list(&self) -> Vec<ListSection> {
        Vec::new()
    }
    /// Its `hilbench sim KIND` command (devices that run on their own).
    fn sim(&self) -> Option<KindCommand> {
        None
    }
    /// Its `hilbench validate KIND` command (checks of a real device of the kind).
    fn validate(&self) -> Option<KindCommand> {
        None
    }
    /// A device kind's verdict on a captured frame (`capture import` identifies devices
    /// with it): `Some` when the frame is its protocol, with the decoded meaning.
    fn recognise(&self, _frame: &CapturedFrameView<'_>) -> Option<FrameVerdict> {
        None
    }
    /// How a `replay` of this kind's captures matches requests and fits answers.
    fn replay_rule(&self) -> Option<ReplayRule> {
        None
    }
    /// A client of this kind's protocol for a scenario that replays the captured `devices`
    /// (`capture import` writes it), on bus port `port` (serial captures) or naming the
    /// devices (`None`: they are on the air), with the steps the capture proves.
    /// Err: why no client of the kind would send the captured requests.
    fn capture_client(&self, _port: Option<&str>, _devices: &[CapturedDevice]) -> Result<CaptureClient, String> {
        Err(format!("{} has no built-in client for a scenario of its captures yet", self.name()))
    }
    /// Its GATT table and advertised name, for a kind that serves GATT (a BLE replay of
    /// its captures serves them).
    fn ble_identity(&self) -> Option<crate::transport::gatt::BleIdentity> {
        None
    }
    /// Simulated devices of this kind in the captured devices' state, with a client and
    /// steps (and the faults that reproduce what the capture shows), for a scenario that
    /// gives the field device back interactive (`capture import --as-state`).
    fn capture_model(&self, _port: Option<&str>, _devices: &[CapturedDevice]) -> Result<CaptureModel, String> {
        Err(format!("{} derives no simulator state from captures yet", self.name()))
    }
    /// For a kind that serves UDP: the scenario services its clients name it for, and the
    /// template variable prefix its address is published under (`smp` for `{{smp.NAME}}`),
    /// so a UDP replay of its captures is found as the kind is.
    fn udp_service(&self) -> Option<UdpService> {
        None
    }
    /// For a kind served over HTTP/WebSocket: the scenario services its clients name it
    /// for, so a replay of its TCP captures (`listen`) is found as the kind is.
    fn tcp_service(&self) -> Option<&'static [&'static str]> {
        None
    }
    /// A frame of this kind as named fields in wire order, for showing where a device's
    /// answer departs from a captured one (`capture replay`); `request` is the request it
    /// answers. Empty (the default): the two are compared byte by byte.
    fn fields(&self, _frame: &CapturedFrameView<'_>, _request: Option<&[u8]>) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// Simulated devices in a capture's state ([`Kind::capture_model`]): their entries (one
/// YAML flow mapping each) and the client with the steps.
#[derive(Debug, Clone)]
pub struct CaptureModel {
    pub devices: Vec<String>,
    pub client: CaptureClient,
}

/// How a kind's UDP endpoint is named in a scenario ([`Kind::udp_service`]).
#[derive(Debug, Clone, Copy)]
pub struct UdpService {
    pub serves: &'static [&'static str],
    pub var: &'static str,
}

/// A command a kind contributes under `hilbench sim` or `hilbench validate`.
#[derive(Clone, Copy)]
pub struct KindCommand {
    /// The subcommand, named after the kind, with its arguments and help.
    pub command: fn() -> clap::Command,
    /// Runs it with what clap parsed; returns the exit code.
    pub run: fn(&clap::ArgMatches) -> i32,
}

/// The subcommand `name` taking the arguments `A`.
pub fn subcommand<A: clap::Args>(name: &'static str, about: &'static str, after_help: &'static str) -> clap::Command {
    A::augment_args(clap::Command::new(name).about(about).after_help(after_help))
}

/// Runs `body` with the arguments clap parsed into `A`.
pub fn run_parsed<A: clap::FromArgMatches>(m: &clap::ArgMatches, body: fn(A) -> i32) -> i32 {
    match A::from_arg_matches(m) {
        Ok(a) => body(a),
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

/// The subcommands kinds contribute under one command, and the chosen one.
pub fn commands(of: fn(&dyn Kind) -> Option<KindCommand>) -> impl Iterator<Item = (&'static str, KindCommand)> {
    REGISTRY.iter().filter_map(move |k| of(*k).map(|c| (k.name(), c)))
}

/// Decodes a kind's keys with serde, locating a problem at the key it is
/// about (`cells`, `state.soc`) rather than at the entry.
pub fn decode_keys<T: serde::de::DeserializeOwned>(entry: yaml_serde::Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(entry).map_err(|e| Problem::from_serde(e.path(), &e.inner().to_string()))
}

/// Where a link's faults are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkHomeDecl {
    /// The entity's own link (a client actor's, a device's connection).
    Own,
    /// A link on a scenario bus: the bus applies its faults.
    Bus(String),
}

/// A link an entity brings into the scenario.
#[derive(Debug, Clone)]
pub struct LinkDecl {
    pub name: String,
    pub home: LinkHomeDecl,
    /// How its frames are captured (`--capture`), if at all.
    pub capture: Option<CaptureFormat>,
    /// Where its protocol keeps the checksum (`bad_checksum`), if it has one.
    pub checksum: Option<ChecksumLayout>,
    /// What it carries, for messages ("Modbus RTU", "BVLC-SC over WebSocket").
    pub carries: &'static str,
    /// What it is made of: which faults it can take.
    pub medium: LinkMedium,
}

/// The scenario's names, for cross-references while checking.
pub struct Names<'s> {
    pub buses: Vec<&'s str>,
    pub ports: Vec<&'s str>,
    pub devices: Vec<(&'s str, &'static str, &'s dyn Declared)>,
    pub clients: Vec<(&'s str, &'static str, &'s dyn Declared)>,
    pub processes: Vec<&'s str>,
}

impl<'s> Names<'s> {
    pub fn device(&self, name: &str) -> Option<&'s dyn Declared> {
        self.devices.iter().find(|(n, _, _)| *n == name).map(|(_, _, d)| *d)
    }

    pub fn client(&self, name: &str) -> Option<&'s dyn Declared> {
        self.clients.iter().find(|(n, _, _)| *n == name).map(|(_, _, d)| *d)
    }

    /// Devices offering `service` (e.g. `bacnet-sc-hub`).
    pub fn devices_serving(&self, service: &str) -> Vec<&'s str> {
        self.devices.iter().filter(|(_, _, d)| d.serves().contains(&service)).map(|(n, _, _)| *n).collect()
    }

    /// Clients of `service`, in scenario order (their index picks a
    /// certificate or an address).
    pub fn clients_of(&self, service: &str) -> Vec<&'s str> {
        self.clients.iter().filter(|(_, _, c)| c.client_of() == Some(service)).map(|(n, _, _)| *n).collect()
    }
}

/// A device or client as the scenario declares it: checked, not started.
pub trait Declared: std::fmt::Debug + Send + Sync {
    fn name(&self) -> &str;
    /// Cross-references and ranges. Problems are relative to the entry.
    fn check(&self, _names: &Names<'_>) -> Result<(), Problem> {
        Ok(())
    }
    fn links(&self) -> Vec<LinkDecl> {
        Vec::new()
    }
    /// Services other entities can name it for (`bacnet-sc-hub`, `jbd-gatt`).
    fn serves(&self) -> &'static [&'static str] {
        &[]
    }
    /// The service this client talks to, if it is another entity's.
    fn client_of(&self) -> Option<&'static str> {
        None
    }
    /// The bus this device sits on, if any.
    fn bus(&self) -> Option<&str> {
        None
    }
    /// A key `set` may change, or why not.
    fn check_state_key(&self, key: &str) -> Result<(), String> {
        let _ = key;
        Err("it has no state to set".into())
    }
    /// Checks a kind step's body (`steps()` of its kind); relative to the body.
    fn check_step(&self, step: &str, body: &yaml_serde::Value, names: &Names<'_>) -> Result<(), Problem> {
        let _ = (body, names);
        Err(Problem::here(format!("a {} takes no `{step}` step", self.kind_name())))
    }
    /// Whether `stop` and `start` steps may restart it.
    fn restartable(&self) -> bool {
        false
    }
    /// Whether it sits on the BLE air (the `ble` step, `ble_hosts`, ATT capture).
    fn on_air(&self) -> bool {
        false
    }
    fn kind_name(&self) -> &'static str;
    /// Starts it. The context carries what the run has built so far.
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>>;
}

/// What a kind's `start` can use: the run's log, seed, folder, the
/// template variables so far (a client reads its hub's URL there), the
/// scenario's names, and the buses.
pub struct StartContext<'w> {
    pub log: ObservationLog,
    pub seed: u64,
    pub tmp: &'w Path,
    pub vars: &'w mut BTreeMap<String, String>,
    pub names: &'w Names<'w>,
    pub buses: &'w BTreeMap<String, actix::Addr<crate::transport::bus::BusActor>>,
    /// Links some `fault` step of the scenario acts on: a link whose faults
    /// cost something when idle (a hub carrying every connection through a
    /// pump) arms them only then.
    pub faulted_links: &'w std::collections::BTreeSet<String>,
}

/// What a kind step may read of the run while it acts.
pub struct StepContext<'w> {
    pub log: &'w ObservationLog,
    pub vars: &'w BTreeMap<String, String>,
}

/// A started device or client. Dropping it (after `stop`) releases it.
pub trait Running {
    /// Template variables it publishes (`hub.NAME`, `ble.NAME`).
    fn vars(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Sets one state key (`set` steps).
    fn set<'a>(&'a self, key: &'a str, value: f64) -> LocalBoxFuture<'a, Result<(), String>> {
        let _ = value;
        Box::pin(async move { Err(format!("no state key `{key}` to set")) })
    }
    /// Runs one of its kind's steps.
    fn step<'a>(&'a mut self, step: &'a str, body: &'a yaml_serde::Value, cx: StepContext<'a>) -> LocalBoxFuture<'a, Result<String, String>> {
        let _ = (body, cx);
        Box::pin(async move { Err(format!("no `{step}` step here")) })
    }
    /// Faults on its own links (`LinkHomeDecl::Own`).
    fn add_fault<'a>(&'a self, link: &'a str, rule: FaultRule) -> LocalBoxFuture<'a, Result<(), String>> {
        let _ = rule;
        Box::pin(async move { Err(format!("`{link}` has no fault engine")) })
    }
    /// Clears faults on its own link: all, or the one called `name`.
    fn clear_faults<'a>(&'a self, link: &'a str, name: Option<&'a str>) -> LocalBoxFuture<'a, Result<(), String>> {
        let _ = name;
        Box::pin(async move { Err(format!("`{link}` has no fault engine")) })
    }
    /// Frames its own links carried.
    fn frames(&self) -> LocalBoxFuture<'_, Vec<FrameRecord>> {
        Box::pin(async { Vec::new() })
    }
    /// What its link `link` carried, in the capture format the link
    /// declares (`--capture`): by default its frames as they are.
    fn capture<'a>(&'a self, link: &'a str) -> LocalBoxFuture<'a, Vec<FrameRecord>> {
        Box::pin(async move { self.frames().await.into_iter().filter(|f| f.link == link).collect() })
    }
    /// `stop` step: stop serving, keeping what a restart needs.
    fn pause(&mut self) -> LocalBoxFuture<'_, Result<String, String>> {
        Box::pin(async { Err("it cannot be stopped".to_string()) })
    }
    /// `start` step after `stop`.
    fn resume<'a>(&'a mut self, log: &'a ObservationLog) -> LocalBoxFuture<'a, Result<String, String>> {
        let _ = log;
        Box::pin(async { Err("it cannot be started".to_string()) })
    }
    /// Teardown: stop and release everything it holds.
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()>;
}

/// A step body's own keys, decoded and located relative to the body.
pub fn step_body<T: serde::de::DeserializeOwned>(body: &yaml_serde::Value) -> Result<T, Problem> {
    decode_keys(body.clone())
}

/// A validate step's `fails`: each must name one of `checks`.
pub fn check_fails(fails: &[String], checks: &[&str]) -> Result<(), Problem> {
    match fails.iter().find(|f| !checks.contains(&f.as_str())) {
        Some(bad) => Err(at_key("fails", format!("no check `{bad}`; the checks are {}", checks.join(", ")))),
        None => Ok(()),
    }
}

/// Forwards a device's events into the run's log as observations: `wrap`
/// makes one of the event's snake-case `event` tag and its other fields as
/// JSON (`detail`, empty when it has none); events lost to a slow reader
/// become one `events_lost` observation.
pub fn forward_events<E>(mut rx: tokio::sync::broadcast::Receiver<E>, log: ObservationLog, source: String, wrap: fn(String, String) -> crate::observe::ObservationKind) -> tokio::task::JoinHandle<()>
where
    E: serde::Serialize + Clone + Send + 'static,
{
    actix::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let mut v = serde_json::to_value(&ev).unwrap_or_default();
                    let event = v.get("event").and_then(|e| e.as_str()).unwrap_or("unknown").to_string();
                    if let Some(m) = v.as_object_mut() {
                        m.remove("event");
                    }
                    let detail = if v.as_object().is_some_and(|m| m.is_empty()) { String::new() } else { v.to_string() };
                    log.push(&source, wrap(event, detail));
                }
                Err(RecvError::Lagged(n)) => log.push(&source, wrap("events_lost".into(), format!("{n} events not observed"))),
                Err(RecvError::Closed) => break,
            }
        }
    })
}

/// Shorthand for a problem at a key of an entry.
pub fn at_key(key: &str, message: impl Into<String>) -> Problem {
    Problem::at(YamlPath::key(key), message)
}
