//! The scenario file format. Every struct denies unknown keys: a typo in a
//! regression suite must fail loudly, not be skipped. Devices and clients
//! are read by their kind's module (`crate::kind`); every name a step uses
//! is checked before anything runs, and every error says file:line:col.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::source::{Problem, SourceMap, YamlPath};
use crate::kind::{self, Declared, Kind, LinkDecl, Names, Role, StepDoc};
use crate::link::fault::FaultSpec;
use crate::link::record::Direction;
use crate::observe::ObservationKind;


/// A duration written as `500ms`, `2s`, `1m 30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration `{s}` ({e}); write e.g. 500ms, 2s, 1m")))
    }
}

fn default_seed() -> u64 {
    1
}


fn default_baud() -> u32 {
    9600
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BusSpec {
    pub name: String,
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Emulate wire time at `baud` (10 bit-times per byte, RTU silence).
    #[serde(default)]
    pub wire_time: bool,
    /// PTY ports on this bus. Each is a link (faults apply per port) and a
    /// path that clients and processes open: `{{port.NAME}}` in templates.
    pub ports: Vec<String>,
}


#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub name: String,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Wait for a line containing this before the timeline starts.
    #[serde(default)]
    pub ready: Option<String>,
    /// How long to wait for `ready` (default 10s).
    #[serde(default)]
    pub ready_timeout: Option<Dur>,
    /// Longest the process may run: past it, it is killed and the scenario
    /// fails (a client under test that hangs must not hang the suite).
    #[serde(default)]
    pub timeout: Option<Dur>,
}

/// What to count or compare a reading against.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExpectReading {
    pub client: String,
    #[serde(default)]
    pub address: Option<u8>,
    pub field: String,
    #[serde(default)]
    pub equals: Option<f64>,
    #[serde(default)]
    pub tolerance: Option<f64>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub within: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectFlag {
    pub client: String,
    #[serde(default)]
    pub address: Option<u8>,
    /// e.g. `protection:cell_ov`, `warning:charge_ot`, `cell_ov_flag:3`.
    pub flag: String,
    #[serde(default = "yes")]
    pub present: bool,
    #[serde(default)]
    pub within: Option<Dur>,
}

fn yes() -> bool {
    true
}

/// Counts observations from the moment the step starts (or from the start
/// of the run with `since_start: true`). With `at_most`, the whole `within`
/// window is waited out.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectErrors {
    pub client: String,
    #[serde(default)]
    pub address: Option<u8>,
    /// timeout | crc | exception | malformed | framing | echo | io | gave_up
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub at_least: Option<usize>,
    #[serde(default)]
    pub at_most: Option<usize>,
    #[serde(default)]
    pub within: Option<Dur>,
    #[serde(default)]
    pub since_start: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectObservation {
    /// An observation type: collision, device_silent, overflow, bsc_npdu, hub, …
    /// (`hilbench list` shows them all).
    pub kind: String,
    #[serde(default)]
    pub source: Option<String>,
    /// Only observations whose JSON contains this text (e.g. `"error_code":151`).
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub at_least: Option<usize>,
    #[serde(default)]
    pub at_most: Option<usize>,
    #[serde(default)]
    pub within: Option<Dur>,
    #[serde(default)]
    pub since_start: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectFrames {
    pub link: String,
    #[serde(default)]
    pub direction: Option<Direction>,
    /// Only frames of exactly this many bytes (e.g. a lone `77` notification: 1).
    #[serde(default)]
    pub length: Option<usize>,
    #[serde(default)]
    pub at_least: Option<usize>,
    #[serde(default)]
    pub at_most: Option<usize>,
    #[serde(default)]
    pub within: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectOutput {
    pub process: String,
    pub contains: String,
    #[serde(default)]
    pub within: Option<Dur>,
    /// The text must NOT appear: checked once the process has exited (or
    /// at the end of `within`, whichever comes first).
    #[serde(default)]
    pub absent: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectExit {
    pub process: String,
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub within: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetStep {
    pub device: String,
    pub state: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClearStep {
    pub link: String,
    /// Only the fault of this name (a `fault` step's `name`); all without it.
    #[serde(default)]
    pub name: Option<String>,
}


/// Stop or start a device (a hub restart: `stop`, then `start` on the same port).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStep {
    pub device: String,
}


/// Hex bytes with optional spaces, colons, dashes or `0x` prefixes: `01 00`, `0x01,0x00`,
/// `01-00`.
pub fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: String = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == ':' || c == '-')
        .map(|t| t.trim_start_matches("0x").trim_start_matches("0X"))
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits in `{text}`"));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            digits
                .get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("`{}` is not a hex byte", digits.get(i..i + 2).unwrap_or("?")))
        })
        .collect()
}


/// A scenario, read and checked: its devices and clients decoded by their
/// kinds, every cross-reference resolved.
#[derive(Debug)]
pub struct Scenario {
    pub name: String,
    pub description: Option<String>,
    /// Seeds every random choice (probabilistic faults, jitter).
    pub seed: u64,
    /// Hard limit for the whole scenario.
    pub timeout: Option<Dur>,
    pub buses: Vec<BusSpec>,
    pub devices: Vec<Entity>,
    pub clients: Vec<Entity>,
    pub processes: Vec<ProcessSpec>,
    /// Other machines near the BLE devices (a phone, a second gateway): each
    /// gets a bus of its own with its own hci0, competing with this
    /// machine's centrals for a device's one link. A process runs there with
    /// `DBUS_SYSTEM_BUS_ADDRESS: "{{ble_host.NAME.bus}}"`.
    pub ble_hosts: Vec<String>,
    pub steps: Vec<Step>,
}

/// A device or client of the scenario: its kind and what the kind decoded.
pub struct Entity {
    pub kind: &'static dyn Kind,
    pub decl: Box<dyn Declared>,
}

impl std::fmt::Debug for Entity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entity").field("kind", &self.kind.name()).field("decl", &self.decl).finish()
    }
}

impl Entity {
    pub fn name(&self) -> &str {
        self.decl.name()
    }
}

/// The file as serde reads it: devices, clients and steps stay YAML until
/// their kinds read them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default)]
    timeout: Option<Dur>,
    #[serde(default)]
    buses: Vec<BusSpec>,
    #[serde(default)]
    devices: Vec<yaml_serde::Value>,
    #[serde(default)]
    clients: Vec<yaml_serde::Value>,
    #[serde(default)]
    processes: Vec<ProcessSpec>,
    #[serde(default)]
    ble_hosts: Vec<String>,
    steps: Vec<yaml_serde::Value>,
}

/// One timeline step: a map with exactly one key.
#[derive(Debug, Clone)]
pub enum Step {
    Wait(Dur),
    Set(SetStep),
    Fault(FaultSpec),
    ClearFaults(ClearStep),
    ExpectReading(ExpectReading),
    ExpectFlag(ExpectFlag),
    ExpectErrors(ExpectErrors),
    ExpectObservation(ExpectObservation),
    ExpectFrames(ExpectFrames),
    ExpectOutput(ExpectOutput),
    ExpectExit(ExpectExit),
    Stop(DeviceStep),
    Start(DeviceStep),
    /// A step of some kinds only (`send_npdu`), for the entity it names.
    Kind(KindStep),
}

/// A kind's own step: its name, the device or client it acts on, and its
/// body for that kind to read.
#[derive(Debug, Clone)]
pub struct KindStep {
    pub doc: &'static StepDoc,
    pub target: String,
    pub body: yaml_serde::Value,
}

/// The steps every scenario has, with what they do (for `hilbench list`).
pub const COMMON_STEPS: &[(&str, &str)] = &[
    ("wait", "a duration: `wait: 500ms`"),
    ("set", "device, state: {KEY: VALUE}"),
    ("fault", "link, kind, name, direction, count | probability | always, and the fault's parameters"),
    ("clear_faults", "link, name (only that fault)"),
    ("expect_reading", "client, field, address, equals ± tolerance | min | max, within"),
    ("expect_flag", "client, flag, address, present, within"),
    ("expect_errors", "client, kind, address, at_least | at_most, within, since_start"),
    ("expect_observation", "kind, source, contains, at_least | at_most, within, since_start"),
    ("expect_frames", "link, direction, length, at_least | at_most, within"),
    ("expect_output", "process, contains, absent, within"),
    ("expect_exit", "process, code, within"),
    ("stop", "device (one that can restart)"),
    ("start", "device, after `stop`"),
];

impl Step {
    pub fn label(&self) -> &'static str {
        match self {
            Step::Wait(_) => "wait",
            Step::Set(_) => "set",
            Step::Fault(_) => "fault",
            Step::ClearFaults(_) => "clear_faults",
            Step::ExpectReading(_) => "expect_reading",
            Step::ExpectFlag(_) => "expect_flag",
            Step::ExpectErrors(_) => "expect_errors",
            Step::ExpectObservation(_) => "expect_observation",
            Step::ExpectFrames(_) => "expect_frames",
            Step::ExpectOutput(_) => "expect_output",
            Step::ExpectExit(_) => "expect_exit",
            Step::Stop(_) => "stop",
            Step::Start(_) => "start",
            Step::Kind(k) => k.doc.name,
        }
    }

    /// Reads one step, `{NAME: BODY}`; problems are relative to the step.
    fn decode(v: yaml_serde::Value) -> Result<Step, Problem> {
        let yaml_serde::Value::Mapping(m) = v else {
            return Err(Problem::here(format!("a step is a map with one key, e.g. `- wait: 1s` (known steps: {})", step_names().join(", "))));
        };
        if m.len() != 1 {
            return Err(Problem::here(format!("a step has exactly one key, this one has {}", m.len())));
        }
        let Some((yaml_serde::Value::String(name), body)) = m.into_iter().next() else {
            return Err(Problem::here("a step's key is its name, e.g. `wait`"));
        };
        let at = YamlPath::key(&name);
        let typed = |body| -> Result<Step, Problem> {
            fn d<T: serde::de::DeserializeOwned>(b: yaml_serde::Value) -> Result<T, Problem> {
                kind::decode_keys(b)
            }
            Ok(match name.as_str() {
                "wait" => Step::Wait(d(body)?),
                "set" => Step::Set(d(body)?),
                "fault" => Step::Fault(d(body)?),
                "clear_faults" => Step::ClearFaults(d(body)?),
                "expect_reading" => Step::ExpectReading(d(body)?),
                "expect_flag" => Step::ExpectFlag(d(body)?),
                "expect_errors" => Step::ExpectErrors(d(body)?),
                "expect_observation" => Step::ExpectObservation(d(body)?),
                "expect_frames" => Step::ExpectFrames(d(body)?),
                "expect_output" => Step::ExpectOutput(d(body)?),
                "expect_exit" => Step::ExpectExit(d(body)?),
                "stop" => Step::Stop(d(body)?),
                "start" => Step::Start(d(body)?),
                _ => unreachable!("only common names come here"),
            })
        };
        if COMMON_STEPS.iter().any(|(n, _)| *n == name) {
            return typed(body).map_err(|p| p.under(&at));
        }
        let Some((doc, _)) = kind::kind_steps().into_iter().find(|(d, _)| d.name == name) else {
            return Err(Problem::here(format!("unknown step `{name}` (known steps: {})", step_names().join(", "))));
        };
        let target = match body.get(doc.target) {
            Some(yaml_serde::Value::String(t)) => t.clone(),
            _ => return Err(Problem::at(at, format!("`{name}` needs `{}`: the name of the {} it acts on", doc.target, doc.target))),
        };
        Ok(Step::Kind(KindStep { doc, target, body }))
    }
}

fn step_names() -> Vec<&'static str> {
    let mut v: Vec<&str> = COMMON_STEPS.iter().map(|(n, _)| *n).collect();
    for (d, _) in kind::kind_steps() {
        if !v.contains(&d.name) {
            v.push(d.name);
        }
    }
    v
}

/// A scenario file that could not be read, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{file}: {reason}")]
    Io { file: PathBuf, reason: String },
    #[error("{file}:{line}:{column}: {reason}")]
    Parse {
        file: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError::Io {
            file: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
        let f: ScenarioFile = yaml_serde::from_str(text).map_err(|e| {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
            ScenarioError::Parse {
                file: path.to_path_buf(),
                line,
                column,
                reason: e.to_string(),
            }
        })?;
        let located = |p: Problem| {
            let (line, column) = SourceMap::of(text).locate(&p.at);
            let reason = if p.at.0.is_empty() { p.message } else { format!("{}: {}", p.at, p.message) };
            ScenarioError::Parse { file: path.to_path_buf(), line, column, reason }
        };
        let s = Scenario::from_file(f).map_err(located)?;
        s.validate().map_err(located)?;
        Ok(s)
    }

    fn from_file(f: ScenarioFile) -> Result<Scenario, Problem> {
        let entities = |list: Vec<yaml_serde::Value>, role: Role, key: &str| -> Result<Vec<Entity>, Problem> {
            list.into_iter()
                .enumerate()
                .map(|(i, v)| decode_entity(v, role).map_err(|p| p.under(&YamlPath::key(key).then_index(i))))
                .collect()
        };
        let devices = entities(f.devices, Role::Device, "devices")?;
        let clients = entities(f.clients, Role::Client, "clients")?;
        let steps = f
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, v)| Step::decode(v).map_err(|p| p.under(&YamlPath::key("steps").then_index(i))))
            .collect::<Result<_, _>>()?;
        Ok(Scenario {
            name: f.name,
            description: f.description,
            seed: f.seed,
            timeout: f.timeout,
            buses: f.buses,
            devices,
            clients,
            processes: f.processes,
            ble_hosts: f.ble_hosts,
            steps,
        })
    }

    /// The scenario's names, for cross-references.
    pub fn names(&self) -> Names<'_> {
        fn entities(v: &[Entity]) -> Vec<(&str, &'static str, &dyn Declared)> {
            v.iter().map(|e| (e.name(), e.kind.name(), e.decl.as_ref())).collect()
        }
        Names {
            buses: self.buses.iter().map(|b| b.name.as_str()).collect(),
            ports: self.buses.iter().flat_map(|b| b.ports.iter().map(String::as_str)).collect(),
            devices: entities(&self.devices),
            clients: entities(&self.clients),
            processes: self.processes.iter().map(|p| p.name.as_str()).collect(),
        }
    }

    /// Every link a scenario can name: bus ports, then what devices and
    /// clients bring.
    pub fn links(&self) -> Vec<LinkDecl> {
        let mut links = Vec::new();
        for b in &self.buses {
            let layouts: Vec<_> = self
                .devices
                .iter()
                .filter(|d| d.decl.bus() == Some(b.name.as_str()))
                .flat_map(|d| d.decl.links())
                .filter_map(|l| l.checksum)
                .collect();
            // A port carries what the bus's devices speak; a bus of both
            // protocols tells them apart frame by frame.
            let checksum = match layouts.first() {
                None => Some(crate::link::fault::ChecksumLayout::ModbusCrc),
                Some(first) if layouts.iter().all(|l| l == first) => Some(*first),
                Some(_) => Some(crate::link::fault::ChecksumLayout::ModbusOrEg4Legacy),
            };
            for p in &b.ports {
                links.push(LinkDecl {
                    name: p.clone(),
                    home: kind::LinkHomeDecl::Bus(b.name.clone()),
                    capture: Some(crate::link::capture::CaptureFormat::ModbusRtu),
                    checksum,
                    carries: "RS-485 (a bus port)",
                    medium: crate::link::fault::LinkMedium::Serial,
                });
            }
        }
        for e in self.devices.iter().chain(&self.clients) {
            links.extend(e.decl.links());
        }
        links
    }

    /// Cross-references a parser cannot check: names that must exist,
    /// names that must be unique, what each step may name.
    pub fn validate(&self) -> Result<(), Problem> {
        self.check_unique_names()?;
        let names = self.names();
        for (i, b) in self.buses.iter().enumerate() {
            if b.ports.is_empty() {
                return Err(Problem::at(YamlPath::key("buses").then_index(i), format!("bus `{}` has no ports: a bus needs at least one PTY port", b.name)));
            }
        }
        for (i, h) in self.ble_hosts.iter().enumerate() {
            if h.is_empty() || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(Problem::at(YamlPath::key("ble_hosts").then_index(i), format!("ble host `{h}`: use letters, digits, `-` and `_` only")));
            }
        }
        if !self.ble_hosts.is_empty() && !self.devices.iter().any(|d| d.decl.on_air()) {
            return Err(Problem::at(YamlPath::key("ble_hosts"), "`ble_hosts` needs at least one BLE device to be near"));
        }
        for (key, list) in [("devices", &self.devices), ("clients", &self.clients)] {
            for (i, e) in list.iter().enumerate() {
                e.decl.check(&names).map_err(|p| p.under(&YamlPath::key(key).then_index(i)))?;
            }
        }
        let checker = StepChecker { scenario: self, names: &names, links: self.links() };
        for (i, step) in self.steps.iter().enumerate() {
            let at = YamlPath::key("steps").then_index(i).then_key(step.label());
            checker.check(i, step).map_err(|p| p.under(&at))?;
        }
        Ok(())
    }

    fn check_unique_names(&self) -> Result<(), Problem> {
        let mut seen = std::collections::BTreeSet::new();
        let mut named: Vec<(YamlPath, &str, &str)> = Vec::new();
        for (i, b) in self.buses.iter().enumerate() {
            let at = YamlPath::key("buses").then_index(i);
            named.push((at.clone().then_key("name"), "bus", &b.name));
            for (j, p) in b.ports.iter().enumerate() {
                named.push((at.clone().then_key("ports").then_index(j), "port", p));
            }
        }
        for (key, what, list) in [("devices", "device", &self.devices), ("clients", "client", &self.clients)] {
            for (i, e) in list.iter().enumerate() {
                named.push((YamlPath::key(key).then_index(i).then_key("name"), what, e.name()));
            }
        }
        for (i, p) in self.processes.iter().enumerate() {
            named.push((YamlPath::key("processes").then_index(i).then_key("name"), "process", &p.name));
        }
        for (i, h) in self.ble_hosts.iter().enumerate() {
            named.push((YamlPath::key("ble_hosts").then_index(i), "ble host", h));
        }
        for (at, what, n) in named {
            if !seen.insert(n) {
                return Err(Problem::at(
                    at,
                    format!("{what} name `{n}` is used twice (names of buses, ports, devices, clients, processes and ble hosts must be unique)"),
                ));
            }
        }
        Ok(())
    }
}

/// Reads one device or client entry through its kind.
fn decode_entity(v: yaml_serde::Value, role: Role) -> Result<Entity, Problem> {
    let known = || kind::names(role).join(", ");
    let yaml_serde::Value::Mapping(mut m) = v else {
        return Err(Problem::here(format!("a {} is a map with a `kind` ({})", role.noun(), known())));
    };
    let kind_name = match m.remove("kind") {
        Some(yaml_serde::Value::String(k)) => k,
        Some(_) => return Err(Problem::at(YamlPath::key("kind"), format!("`kind` is a name ({})", known()))),
        None => return Err(Problem::here(format!("give the {}'s `kind` ({})", role.noun(), known()))),
    };
    let Some(kind) = kind::find(role, &kind_name) else {
        let other = match role {
            Role::Device => kind::find(Role::Client, &kind_name).map(|_| " (that is a client kind: put it under `clients`)"),
            Role::Client => kind::find(Role::Device, &kind_name).map(|_| " (that is a device kind: put it under `devices`)"),
        };
        return Err(Problem::at(
            YamlPath::key("kind"),
            format!("unknown {} kind `{kind_name}`{} (known: {})", role.noun(), other.unwrap_or(""), known()),
        ));
    };
    let decl = kind.decode(yaml_serde::Value::Mapping(m))?;
    Ok(Entity { kind, decl })
}

/// Checks what each step names against the scenario.
struct StepChecker<'s> {
    scenario: &'s Scenario,
    names: &'s Names<'s>,
    links: Vec<LinkDecl>,
}

fn list_or_none(v: &[&str]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

impl StepChecker<'_> {
    fn link(&self, name: &str) -> Result<&LinkDecl, Problem> {
        self.links.iter().find(|l| l.name == name).ok_or_else(|| {
            let all: Vec<&str> = self.links.iter().map(|l| l.name.as_str()).collect();
            let why = match (self.names.client(name), self.names.device(name)) {
                (Some(c), _) => format!("; `{name}` is a {}, which has no link of its own to fault", c.kind_name()),
                (_, Some(d)) => format!("; `{name}` is a {}, which has no link of its own to fault", d.kind_name()),
                _ => String::new(),
            };
            Problem::at(YamlPath::key("link"), format!("no link `{name}` (links: {}){why}", list_or_none(&all)))
        })
    }

    fn device(&self, name: &str) -> Result<&dyn Declared, Problem> {
        self.names.device(name).ok_or_else(|| {
            let all: Vec<&str> = self.names.devices.iter().map(|(n, _, _)| *n).collect();
            Problem::at(YamlPath::key("device"), format!("no device named `{name}` (devices: {})", list_or_none(&all)))
        })
    }

    fn process(&self, name: &str) -> Result<(), Problem> {
        if self.names.processes.contains(&name) {
            return Ok(());
        }
        Err(Problem::at(YamlPath::key("process"), format!("no process named `{name}` (processes: {})", list_or_none(&self.names.processes))))
    }

    /// A client whose readings and errors a step selects from.
    fn reporting_client(&self, name: &str) -> Result<kind::Vocabulary, Problem> {
        let at = YamlPath::key("client");
        let Some((_, kind_name, _)) = self.names.clients.iter().find(|(n, _, _)| *n == name) else {
            let all: Vec<&str> = self.names.clients.iter().map(|(n, _, _)| *n).collect();
            return Err(Problem::at(at, format!("no client named `{name}` (clients: {})", list_or_none(&all))));
        };
        kind::find(Role::Client, kind_name)
            .and_then(|k| k.vocabulary())
            .ok_or_else(|| Problem::at(at, format!("`{name}` is a {kind_name}, which publishes no readings or errors")))
    }

    fn bounds(at_least: Option<usize>, at_most: Option<usize>) -> Result<(), Problem> {
        match (at_least, at_most) {
            (None, None) => Err(Problem::here("give `at_least` and/or `at_most`")),
            (Some(l), Some(m)) if l > m => Err(Problem::at(YamlPath::key("at_least"), format!("at_least {l} is more than at_most {m}: nothing can pass"))),
            _ => Ok(()),
        }
    }

    fn check(&self, index: usize, step: &Step) -> Result<(), Problem> {
        match step {
            Step::Wait(_) => Ok(()),
            Step::Set(s) => {
                let d = self.device(&s.device)?;
                if s.state.is_empty() {
                    return Err(Problem::at(YamlPath::key("state"), "give at least one KEY: VALUE to set"));
                }
                for k in s.state.keys() {
                    d.check_state_key(k).map_err(|e| Problem::at(YamlPath::key("state").then_key(k), format!("`{}`: {e}", s.device)))?;
                }
                Ok(())
            }
            Step::Fault(f) => {
                let name = f.link.as_deref().ok_or_else(|| Problem::here("give the `link` to put the fault on"))?;
                let link = self.link(name)?;
                f.clone().into_rule(link.checksum).map_err(|e| {
                    let at = if e.contains("checksum") || e.contains("fault kind") { YamlPath::key("kind") } else { YamlPath::default() };
                    Problem::at(at, if e.contains("no checksum") { format!("`{name}` carries {}: {e}", link.carries) } else { e })
                })?;
                // A fault the link is not made for is refused, not ignored at run time.
                if let Some(doc) = crate::link::LinkFault::doc(&f.kind).filter(|d| !d.media.contains(&link.medium)) {
                    let takes: Vec<&str> = doc.media.iter().map(|m| m.name()).collect();
                    return Err(Problem::at(
                        YamlPath::key("kind"),
                        format!("`{name}` is a {} link ({}); `{}` only acts on {} links", link.medium.name(), link.carries, doc.name, and_list(&takes)),
                    ));
                }
                Ok(())
            }
            Step::ClearFaults(c) => {
                self.link(&c.link)?;
                if let Some(n) = &c.name {
                    let named_before = self.scenario.steps[..index].iter().any(|s| {
                        matches!(s, Step::Fault(f) if f.link.as_deref() == Some(c.link.as_str()) && f.name.as_deref() == Some(n.as_str()))
                    });
                    if !named_before {
                        return Err(Problem::at(YamlPath::key("name"), format!("no earlier `fault` on `{}` is named `{n}`", c.link)));
                    }
                }
                Ok(())
            }
            Step::ExpectReading(e) => {
                let vocab = self.reporting_client(&e.client)?;
                if !kind::Vocabulary::matches(&vocab.fields, &e.field) {
                    return Err(Problem::at(
                        YamlPath::key("field"),
                        format!("`{}` publishes no field `{}` (fields: {})", e.client, e.field, vocab.fields.join(", ")),
                    ));
                }
                if e.equals.is_none() && e.min.is_none() && e.max.is_none() {
                    return Err(Problem::here("give `equals`, `min` or `max`"));
                }
                Ok(())
            }
            Step::ExpectFlag(e) => {
                let vocab = self.reporting_client(&e.client)?;
                if !kind::Vocabulary::matches(&vocab.flags, &e.flag) {
                    return Err(Problem::at(
                        YamlPath::key("flag"),
                        format!("`{}` raises no flag `{}` (flags: {})", e.client, e.flag, vocab.flags.join(", ")),
                    ));
                }
                Ok(())
            }
            Step::ExpectErrors(e) => {
                let vocab = self.reporting_client(&e.client)?;
                if let Some(k) = &e.kind {
                    if !vocab.errors.iter().any(|x| x == k) {
                        return Err(Problem::at(
                            YamlPath::key("kind"),
                            format!("`{}` reports no error kind `{k}` (kinds: {})", e.client, vocab.errors.join(", ")),
                        ));
                    }
                }
                Self::bounds(e.at_least, e.at_most)
            }
            Step::ExpectObservation(e) => {
                if !ObservationKind::NAMES.contains(&e.kind.as_str()) {
                    return Err(Problem::at(
                        YamlPath::key("kind"),
                        format!("unknown observation kind `{}` (known: {})", e.kind, ObservationKind::NAMES.join(", ")),
                    ));
                }
                if let Some(src) = &e.source {
                    let n = self.names;
                    let known = n.devices.iter().map(|d| d.0).chain(n.clients.iter().map(|c| c.0)).chain(n.buses.iter().copied()).chain(n.ports.iter().copied());
                    let known: Vec<&str> = known.collect();
                    if !known.contains(&src.as_str()) {
                        return Err(Problem::at(YamlPath::key("source"), format!("no device, client or bus named `{src}` (sources: {})", list_or_none(&known))));
                    }
                }
                Self::bounds(e.at_least, e.at_most)
            }
            Step::ExpectFrames(e) => {
                self.link(&e.link)?;
                Self::bounds(e.at_least, e.at_most)
            }
            Step::ExpectOutput(e) => self.process(&e.process),
            Step::ExpectExit(e) => self.process(&e.process),
            Step::Stop(d) | Step::Start(d) => {
                let dev = self.device(&d.device)?;
                if !dev.restartable() {
                    return Err(Problem::at(YamlPath::key("device"), format!("a {} cannot be stopped and started", dev.kind_name())));
                }
                Ok(())
            }
            Step::Kind(k) => self.check_kind_step(k),
        }
    }

    fn check_kind_step(&self, k: &KindStep) -> Result<(), Problem> {
        let at = YamlPath::key(k.doc.target);
        let target = self.names.client(&k.target).or_else(|| self.names.device(&k.target)).ok_or_else(|| {
            Problem::at(at.clone(), format!("no {} named `{}`", k.doc.target, k.target))
        })?;
        let takes = kind::kind_steps().iter().any(|(d, kd)| d.name == k.doc.name && kd.name() == target.kind_name());
        if !takes {
            let kinds: Vec<&str> = kind::kind_steps().iter().filter(|(d, _)| d.name == k.doc.name).map(|(_, kd)| kd.name()).collect();
            return Err(Problem::at(at, format!("`{}` is a {}; only a {} takes `{}`", k.target, target.kind_name(), kinds.join(" or "), k.doc.name)));
        }
        target.check_step(k.doc.name, &k.body, self.names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(y: &str) -> String {
        Scenario::parse(Path::new("s.yaml"), y).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_is_an_error_with_location() {
        let e = err("name: x\nsteps:\n  - wait: 1s\nbogus: 3\n");
        assert!(e.starts_with("s.yaml:4:"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_duration_and_step() {
        let e = err("name: x\nsteps:\n  - wait: soon\n");
        assert!(e.starts_with("s.yaml:3:") && e.contains("invalid duration"), "{e}");
        let e = err("name: x\nsteps:\n  - jump: 1\n");
        assert!(e.starts_with("s.yaml:3:") && e.contains("unknown step `jump`"), "{e}");
        let e = err("name: x\nsteps:\n  - {wait: 1s, set: {}}\n");
        assert!(e.contains("exactly one key"), "{e}");
    }

    #[test]
    fn a_sniffer_has_no_link_to_fault() {
        let y = "name: x\nbuses: [{name: b, ports: [p]}]\nclients:\n  - {name: s, kind: modbus-sniffer, port: p}\nsteps:\n  - fault: {link: s, kind: drop}\n";
        let e = err(y);
        assert!(e.starts_with("s.yaml:6:") && e.contains("no link `s`") && e.contains("links: p"), "{e}");
        assert!(e.contains("modbus-sniffer, which has no link of its own"), "{e}");
    }

    #[test]
    fn bsc_cross_references() {
        let base = "name: x\ndevices:\n  - {name: hub, kind: bsc-hub}\nclients:\n  - {name: a, kind: bsc-node, hub: hub}\n  - {name: r, kind: bsc-raw, hub: hub}\n";
        let ok = format!("{base}steps:\n  - send_npdu: {{client: a, to: a}}\n  - send_raw: {{client: r, hex: '01 00'}}\n  - stop: {{device: hub}}\n  - expect_observation: {{kind: hub, contains: nak_sent, at_least: 1}}\n");
        Scenario::parse(Path::new("s.yaml"), &ok).unwrap();
        for (steps, want) in [
            ("  - send_npdu: {client: r}\n", "only a bsc-node"),
            ("  - send_raw: {client: a, hex: '01'}\n", "only a bsc-raw"),
            ("  - send_npdu: {client: a, to: nobody}\n", "neither `broadcast`"),
            ("  - send_raw: {client: r, hex: '0'}\n", "odd number"),
            ("  - send_raw: {client: r, hexx: '00'}\n", "unknown field `hexx`"),
            ("  - stop: {device: nope}\n", "no device named `nope`"),
            ("  - expect_observation: {kind: bogus, at_least: 1}\n", "unknown observation kind"),
        ] {
            let e = err(&format!("{base}steps:\n{steps}"));
            assert!(e.starts_with("s.yaml:8:") && e.contains(want), "{steps}: {e}");
        }
        let e = err("name: x\nclients:\n  - {name: a, kind: bsc-node, hub: nohub}\nsteps: []\n");
        assert!(e.starts_with("s.yaml:3:") && e.contains("hub `nohub` is neither"), "{e}");
        let e = err("name: x\ndevices:\n  - {name: hub, kind: bsc-hub}\nclients:\n  - {name: a, kind: bsc-node, hub: hub, vmac: 'ff:ff:ff:ff:ff:ff'}\nsteps: []\n");
        assert!(e.contains("broadcast or reserved"), "{e}");
    }

    #[test]
    fn cross_references_checked() {
        let e = err("name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: d, kind: eg4-lp4, bus: nope, address: 1}\nsteps: []\n");
        assert!(e.starts_with("s.yaml:4:") && e.contains("bus `nope`"), "{e}");
        let e = err("name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: d, kind: jbd, bus: b, address: 1}\nsteps: []\n");
        assert!(e.starts_with("s.yaml:4:") && e.contains("unknown device kind `jbd`") && e.contains("jbd-bms"), "{e}");
        let e = err("name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: d, kind: eg4-lp4, bus: b, address: 1, mtu: 23}\nsteps: []\n");
        assert!(e.starts_with("s.yaml:4:") && e.contains("unknown field `mtu`"), "a key of another kind is rejected: {e}");
        let e = err("name: x\ndevices:\n  - name: bms\n    kind: jbd-bms\n    cells: 40\nsteps: []\n");
        assert!(e.starts_with("s.yaml:5:") && e.contains("devices[0].cells"), "located at the key: {e}");
        let e = err("name: x\ndevices:\n  - {name: bms, kind: jbd-bms, state: {address: 3}}\nsteps: []\n");
        assert!(e.contains("RS-485 setting"), "{e}");
    }

    #[test]
    fn names_are_unique_across_kinds() {
        let e = err("name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: p, kind: eg4-lp4, bus: b, address: 1}\nsteps: []\n");
        assert!(e.starts_with("s.yaml:4:") && e.contains("name `p` is used twice"), "{e}");
    }

    #[test]
    fn bus_ports_take_their_devices_checksum() {
        let y = "name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: d, kind: eg4-lp4, bus: b, address: 1, protocol: legacy}\nsteps: []\n";
        let s = Scenario::parse(Path::new("s.yaml"), y).unwrap();
        let p = s.links().into_iter().find(|l| l.name == "p").unwrap();
        assert_eq!(p.checksum, Some(crate::link::fault::ChecksumLayout::Eg4Legacy));
    }

    #[test]
    fn hex_parsing() {
        assert_eq!(parse_hex("01 00").unwrap(), vec![1, 0]);
        assert_eq!(parse_hex("0x01,0xff").unwrap(), vec![1, 0xff]);
        assert_eq!(parse_hex("").unwrap(), Vec::<u8>::new());
        assert!(parse_hex("0").unwrap_err().contains("odd"));
        assert!(parse_hex("zz").unwrap_err().contains("`zz`"));
        assert!(parse_hex("é1").is_err(), "multi-byte chars are an error, not a panic");
    }

    #[test]
    fn indexed_state_keys() {
        use crate::model::check_state_key;
        assert!(check_state_key("cell3_mv").is_ok());
        assert!(check_state_key("cell123_mv").is_ok(), "range is the model's to check");
        assert!(check_state_key("temp2_c").is_ok());
        assert!(check_state_key("cellx_mv").is_err());
    }
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_string(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}
