//! The scenario file format. Every struct denies unknown keys: a typo in a
//! regression suite must fail loudly, not be skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::device::eg4_core::{Eg4Protocol, Eg4Quirk};
use crate::device::jbd_core::{JbdProfile, JbdQuirk};
use crate::link::fault::FaultSpec;
use crate::link::record::Direction;
use crate::observe::ObservationKind;
use crate::protocol::bvlc_sc::{DeviceUuid, Vmac};
use crate::protocol::eg4::RegisterProfile;

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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Seeds every random choice (probabilistic faults, jitter).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Hard limit for the whole scenario.
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub buses: Vec<BusSpec>,
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
    #[serde(default)]
    pub clients: Vec<ClientSpec>,
    #[serde(default)]
    pub processes: Vec<ProcessSpec>,
    /// Other machines near the BLE devices (a phone, a second gateway): each
    /// gets a bus of its own with its own hci0, competing with this
    /// machine's centrals for a device's one link. A process runs there with
    /// `DBUS_SYSTEM_BUS_ADDRESS: "{{ble_host.NAME.bus}}"`.
    #[serde(default)]
    pub ble_hosts: Vec<String>,
    /// Each step is a one-key map (`- wait: 1s`), not a YAML tag.
    #[serde(with = "yaml_serde::with::singleton_map_recursive")]
    pub steps: Vec<Step>,
}

/// The BLE link settings a device or a `ble` step may give: an ATT MTU and
/// an RSSI a central can hear.
fn check_ble_link(mtu: Option<u16>, rssi: Option<i16>) -> Result<(), String> {
    use crate::air::att::{DEFAULT_ATT_MTU, MAX_ATT_MTU};
    if let Some(m) = mtu.filter(|m| !(DEFAULT_ATT_MTU..=MAX_ATT_MTU).contains(m)) {
        return Err(format!("mtu {m} is outside {DEFAULT_ATT_MTU}..={MAX_ATT_MTU} (ATT)"));
    }
    if let Some(r) = rssi.filter(|r| !(-127..=20).contains(r)) {
        return Err(format!("rssi {r} is outside -127..=20 dBm"));
    }
    Ok(())
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

/// A simulated device. `kind` picks the variant; each variant rejects keys it
/// does not know, so a key meant for another kind is an error, not ignored.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum DeviceSpec {
    #[serde(rename = "eg4-lp4")]
    Eg4Lp4(Eg4DeviceSpec),
    #[serde(rename = "bsc-hub")]
    BscHub(BscHubSpec),
    #[serde(rename = "jbd-bms")]
    JbdBms(JbdDeviceSpec),
}

impl DeviceSpec {
    pub fn name(&self) -> &str {
        match self {
            DeviceSpec::Eg4Lp4(d) => &d.name,
            DeviceSpec::BscHub(d) => &d.name,
            DeviceSpec::JbdBms(d) => &d.name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DeviceSpec::Eg4Lp4(_) => "eg4-lp4",
            DeviceSpec::BscHub(_) => "bsc-hub",
            DeviceSpec::JbdBms(_) => "jbd-bms",
        }
    }

    /// Initial state keys, checked against the model before anything runs.
    pub fn state(&self) -> Option<&BTreeMap<String, f64>> {
        match self {
            DeviceSpec::Eg4Lp4(d) => Some(&d.state),
            DeviceSpec::JbdBms(d) => Some(&d.state),
            DeviceSpec::BscHub(_) => None,
        }
    }
}

/// A JBD BMS: a GATT peripheral on the run's virtual BLE air (its own
/// peripheral adapter and BLE address, `{{ble.NAME}}` in templates).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JbdDeviceSpec {
    pub name: String,
    /// Advertised LocalName (default `xiaoxiang BMS`).
    #[serde(default)]
    pub local_name: Option<String>,
    #[serde(default)]
    pub cells: Option<usize>,
    #[serde(default)]
    pub ntc: Option<usize>,
    #[serde(default)]
    pub capacity_ah: Option<f64>,
    #[serde(default)]
    pub profile: Option<JbdProfile>,
    #[serde(default)]
    pub quirks: Vec<JbdQuirk>,
    /// ATT MTU of the link (default 23: 20-byte notifications).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Where the BMS is: centrals hear it at about this RSSI in dBm
    /// (default: a seeded value between -78 and -42).
    #[serde(default)]
    pub rssi: Option<i16>,
    /// Initial state: the pack model's keys plus the JBD ones (`hilbench list`).
    #[serde(default)]
    pub state: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BscHubRole {
    #[default]
    Primary,
    Failover,
}

/// A BACnet/SC hub on loopback. Its URL is `{{hub.NAME}}` in templates; with
/// `tls: true` the run makes a test PKI and `{{pki_dir}}` names it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BscHubSpec {
    pub name: String,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub role: BscHubRole,
    /// A connected node silent for twice this long is dropped.
    #[serde(default)]
    pub heartbeat_timeout: Option<Dur>,
    /// Time a new WebSocket has to send its Connect-Request.
    #[serde(default)]
    pub connect_wait: Option<Dur>,
    #[serde(default)]
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub max_bvlc: Option<u16>,
    /// Largest WebSocket message read before BVLC parsing (close 1009 above).
    #[serde(default)]
    pub max_message: Option<usize>,
    /// Frames queued per receiver before drops start.
    #[serde(default)]
    pub queue_depth: Option<usize>,
    #[serde(default)]
    pub slow_consumer_close_after: Option<Dur>,
    /// Broadcasts per second per sending node.
    #[serde(default)]
    pub broadcast_rate_limit: Option<u32>,
}

/// An EG4 pack on an RS-485 bus.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Eg4DeviceSpec {
    pub name: String,
    pub bus: String,
    pub address: u8,
    #[serde(default)]
    pub profile: Option<RegisterProfile>,
    #[serde(default)]
    pub protocol: Option<Eg4Protocol>,
    #[serde(default)]
    pub cells: Option<usize>,
    #[serde(default)]
    pub ntc: Option<usize>,
    #[serde(default)]
    pub quirks: Vec<Eg4Quirk>,
    /// Initial state: any key `hilbench sim eg4-lp4 --help` lists.
    #[serde(default)]
    pub state: BTreeMap<String, f64>,
}

/// A built-in client actor. `kind` picks the variant, as for devices.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum ClientSpec {
    /// Polls packs over Modbus RTU and publishes readings.
    #[serde(rename = "modbus-master")]
    ModbusMaster(SerialClientSpec),
    /// Polls like an inverter: bus traffic for passive listeners, no readings.
    #[serde(rename = "inverter-master")]
    InverterMaster(SerialClientSpec),
    /// Listens on a bus port; never transmits.
    #[serde(rename = "modbus-sniffer")]
    ModbusSniffer(SerialClientSpec),
    /// Polls with the legacy EG4 7E/0D protocol.
    #[serde(rename = "legacy-client")]
    LegacyClient(SerialClientSpec),
    /// A BACnet/SC node on a hub (with optional failover hub).
    #[serde(rename = "bsc-node")]
    BscNode(BscNodeSpec),
    /// A raw BACnet/SC peer that sends scripted bytes.
    #[serde(rename = "bsc-raw")]
    BscRaw(BscRawSpec),
    /// Polls a JBD BMS over BLE (btleplug), as the Home Assistant integrations do.
    #[serde(rename = "jbd-client")]
    JbdClient(JbdClientSpec),
}

impl ClientSpec {
    pub fn name(&self) -> &str {
        match self {
            ClientSpec::ModbusMaster(c)
            | ClientSpec::InverterMaster(c)
            | ClientSpec::ModbusSniffer(c)
            | ClientSpec::LegacyClient(c) => &c.name,
            ClientSpec::BscNode(c) => &c.name,
            ClientSpec::BscRaw(c) => &c.name,
            ClientSpec::JbdClient(c) => &c.name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ClientSpec::ModbusMaster(_) => "modbus-master",
            ClientSpec::InverterMaster(_) => "inverter-master",
            ClientSpec::ModbusSniffer(_) => "modbus-sniffer",
            ClientSpec::LegacyClient(_) => "legacy-client",
            ClientSpec::BscNode(_) => "bsc-node",
            ClientSpec::BscRaw(_) => "bsc-raw",
            ClientSpec::JbdClient(_) => "jbd-client",
        }
    }

    /// Whether the client transmits through a link of its own (faults,
    /// frames). A passive sniffer does not.
    pub fn has_link(&self) -> bool {
        !matches!(self, ClientSpec::ModbusSniffer(_) | ClientSpec::BscRaw(_))
    }
}

/// A BACnet/SC node. `hub` and `failover` name `bsc-hub` devices (or are
/// `ws://`/`wss://` URLs in real-hardware mode).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BscNodeSpec {
    pub name: String,
    pub hub: String,
    #[serde(default)]
    pub failover: Option<String>,
    /// `02:00:00:00:00:01` form; default: a locally administered VMAC from the client's index.
    #[serde(default)]
    pub vmac: Option<String>,
    /// Device UUID (hyphenated); default: derived from the VMAC.
    #[serde(default)]
    pub uuid: Option<String>,
    /// Idle time before a Heartbeat-Request.
    #[serde(default)]
    pub heartbeat: Option<Dur>,
    /// How long an unanswered Heartbeat-Request may wait before the hub counts as gone.
    #[serde(default)]
    pub heartbeat_ack_wait: Option<Dur>,
    /// First reconnect delay (doubles up to 10x).
    #[serde(default)]
    pub reconnect: Option<Dur>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BleWriteType {
    /// Write-without-response (what JBD firmware expects).
    Command,
    /// Write-with-response.
    Request,
}

/// A BLE central polling a JBD BMS: connect, subscribe, 0x03/0x04 (0x05
/// once), disconnect, every `interval`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JbdClientSpec {
    pub name: String,
    /// A jbd-bms device of the scenario (or, in real-hardware mode, a BLE address).
    pub device: String,
    #[serde(default)]
    pub interval: Option<Dur>,
    /// Per-request answer timeout.
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub retries: Option<u32>,
    /// Drop frames with a bad checksum (default true; many real clients do not check).
    #[serde(default)]
    pub verify_checksum: Option<bool>,
    /// Write type for requests (default `command`).
    #[serde(default)]
    pub write: Option<BleWriteType>,
}

/// BLE link controls on a jbd-bms device's link (the air's side of it).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BleStep {
    pub device: String,
    /// Renegotiated ATT MTU (23..=517).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Refuse (true) or accept again (false) connection attempts.
    #[serde(default)]
    pub refuse_connections: Option<bool>,
    /// Drop the connection now, as a device going out of range.
    #[serde(default)]
    pub disconnect: bool,
    /// Make the characteristic reject this write type (`none` accepts both again).
    #[serde(default)]
    pub reject_write: Option<String>,
    /// The air withdraws the device's advertising while a central is connected
    /// (single-connection modules), whatever the device itself does.
    #[serde(default)]
    pub stop_advertising_while_connected: Option<bool>,
    /// Move the device: centrals hear it at about this RSSI in dBm
    /// (−127..=20), so RSSI discovery filters can leave it out.
    #[serde(default)]
    pub rssi: Option<i16>,
}

/// A raw BACnet/SC peer (see `send_raw`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BscRawSpec {
    pub name: String,
    pub hub: String,
    /// Subprotocol to offer; default `hub.bsc.bacnet.org`, `""` offers none.
    #[serde(default)]
    pub subprotocol: Option<String>,
    /// Send a Connect-Request after the upgrade (default true).
    #[serde(default = "yes")]
    pub handshake: bool,
    #[serde(default)]
    pub vmac: Option<String>,
    #[serde(default)]
    pub uuid: Option<String>,
    /// Read the socket (default true); `false` is a consumer that stopped reading.
    #[serde(default = "yes")]
    pub read: bool,
    /// Wait this long before connecting (e.g. until a node holds the VMAC to clash with).
    #[serde(default)]
    pub delay: Option<Dur>,
}

/// A client on a serial line: a bus port or, in real-hardware mode, a tty.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SerialClientSpec {
    pub name: String,
    /// A bus port (`PORT`) or, in real-hardware mode, a tty path.
    pub port: String,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default)]
    pub addresses: Vec<u8>,
    #[serde(default)]
    pub profile: Option<RegisterProfile>,
    #[serde(default)]
    pub interval: Option<Dur>,
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub retries: Option<u32>,
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
}

/// A bsc-node sends Encapsulated-NPDUs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SendNpduStep {
    pub client: String,
    /// `broadcast` (default), a VMAC, or the name of another bsc-node.
    #[serde(default)]
    pub to: Option<String>,
    /// NPDU bytes in hex (spaces allowed); default `01 00` (an empty NPDU header).
    #[serde(default)]
    pub npdu: Option<String>,
    /// Zero bytes appended until the NPDU is this long.
    #[serde(default)]
    pub pad_to: Option<usize>,
    #[serde(default)]
    pub count: Option<u32>,
}

/// A bsc-raw peer sends one WebSocket message.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SendRawStep {
    pub client: String,
    /// Bytes in hex (spaces allowed).
    #[serde(default)]
    pub hex: Option<String>,
    /// Zero bytes appended until the message is this long (oversize tests).
    #[serde(default)]
    pub pad_to: Option<usize>,
    /// Send as a TEXT message instead of BINARY.
    #[serde(default)]
    pub text: bool,
    #[serde(default)]
    pub count: Option<u32>,
}

/// Stop or start a device (a hub restart: `stop`, then `start` on the same port).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStep {
    pub device: String,
}

/// One timeline step: a map with exactly one of these keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
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
    SendNpdu(SendNpduStep),
    SendRaw(SendRawStep),
    Stop(DeviceStep),
    Start(DeviceStep),
    Ble(BleStep),
}

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
            Step::SendNpdu(_) => "send_npdu",
            Step::SendRaw(_) => "send_raw",
            Step::Stop(_) => "stop",
            Step::Start(_) => "start",
            Step::Ble(_) => "ble",
        }
    }
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
    #[error("{file}: {reason}")]
    Invalid { file: PathBuf, reason: String },
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
        let s: Scenario = yaml_serde::from_str(text).map_err(|e| {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
            ScenarioError::Parse {
                file: path.to_path_buf(),
                line,
                column,
                reason: e.to_string(),
            }
        })?;
        s.validate().map_err(|reason| ScenarioError::Invalid {
            file: path.to_path_buf(),
            reason,
        })?;
        Ok(s)
    }

    /// Cross-references a parser cannot check: names that must exist,
    /// names that must be unique, fault parameters, state keys.
    pub fn validate(&self) -> Result<(), String> {
        let mut links: Vec<&str> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut unique = |kind: &str, n: &str| -> Result<(), String> {
            if !seen.insert(n.to_string()) {
                return Err(format!("{kind} name `{n}` is used twice (names of buses, ports, devices, clients and processes must be unique)"));
            }
            Ok(())
        };
        for b in &self.buses {
            unique("bus", &b.name)?;
            if b.ports.is_empty() {
                return Err(format!("bus `{}` has no ports: a bus needs at least one PTY port", b.name));
            }
            for p in &b.ports {
                unique("port", p)?;
                links.push(p);
            }
        }
        let ports: Vec<&str> = self.buses.iter().flat_map(|b| b.ports.iter().map(String::as_str)).collect();
        for h in &self.ble_hosts {
            unique("ble host", h)?;
            if h.is_empty() || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(format!("ble host `{h}`: use letters, digits, `-` and `_` only"));
            }
        }
        if !self.ble_hosts.is_empty() && !self.devices.iter().any(|d| matches!(d, DeviceSpec::JbdBms(_))) {
            return Err("`ble_hosts` needs at least one BLE device (jbd-bms) to be near".into());
        }
        for d in &self.devices {
            unique("device", d.name())?;
            links.push(d.name());
            match d {
                DeviceSpec::Eg4Lp4(d) => {
                    if !self.buses.iter().any(|b| b.name == d.bus) {
                        return Err(format!("device `{}` is on bus `{}`, which is not declared under `buses`", d.name, d.bus));
                    }
                    if d.address == 0 || d.address > 247 {
                        return Err(format!("device `{}`: address {} is outside 1..=247", d.name, d.address));
                    }
                }
                DeviceSpec::JbdBms(j) => {
                    if let Some(c) = j.cells {
                        if !(4..=24).contains(&c) {
                            return Err(format!("device `{}`: cells {c} is outside 4..=24 (the pack sizes JBD BMSes come in)", j.name));
                        }
                    }
                    if let Some(n) = j.ntc {
                        if !(1..=6).contains(&n) {
                            return Err(format!("device `{}`: ntc {n} is outside 1..=6", j.name));
                        }
                    }
                    check_ble_link(j.mtu, j.rssi).map_err(|e| format!("device `{}`: {e}", j.name))?;
                }
                DeviceSpec::BscHub(h) => {
                    if h.max_bvlc.is_some_and(|b| b < 600) {
                        return Err(format!("device `{}`: max_bvlc below 600 cannot carry a Connect-Request and an NPDU", h.name));
                    }
                    if h.queue_depth == Some(0) || h.max_connections == Some(0) {
                        return Err(format!("device `{}`: queue_depth and max_connections must be at least 1", h.name));
                    }
                }
            }
        }
        let hubs: Vec<&str> = self
            .devices
            .iter()
            .filter(|d| matches!(d, DeviceSpec::BscHub(_)))
            .map(|d| d.name())
            .collect();
        let hub_ref = |who: &str, h: &str| -> Result<(), String> {
            if hubs.contains(&h) || h.starts_with("ws://") || h.starts_with("wss://") {
                Ok(())
            } else {
                Err(format!(
                    "client `{who}`: hub `{h}` is neither a bsc-hub device ({}) nor a ws:// or wss:// URL",
                    if hubs.is_empty() { "none declared".to_string() } else { hubs.join(", ") }
                ))
            }
        };
        for client in &self.clients {
            unique("client", client.name())?;
            if client.has_link() {
                links.push(client.name());
            }
            match client {
                ClientSpec::ModbusMaster(c)
                | ClientSpec::InverterMaster(c)
                | ClientSpec::ModbusSniffer(c)
                | ClientSpec::LegacyClient(c) => {
                    if !ports.contains(&c.port.as_str()) && !c.port.starts_with('/') {
                        return Err(format!(
                            "client `{}`: port `{}` is neither a bus port ({}) nor a tty path",
                            c.name,
                            c.port,
                            ports.join(", ")
                        ));
                    }
                    if client.has_link() && c.addresses.is_empty() {
                        return Err(format!("client `{}` has no `addresses` to poll", c.name));
                    }
                }
                ClientSpec::BscNode(c) => {
                    hub_ref(&c.name, &c.hub)?;
                    if let Some(f) = &c.failover {
                        hub_ref(&c.name, f)?;
                    }
                    check_vmac_uuid(&c.name, c.vmac.as_deref(), c.uuid.as_deref())?;
                }
                ClientSpec::BscRaw(c) => {
                    hub_ref(&c.name, &c.hub)?;
                    check_vmac_uuid(&c.name, c.vmac.as_deref(), c.uuid.as_deref())?;
                }
                ClientSpec::JbdClient(c) => {
                    let known = self.devices.iter().any(|d| matches!(d, DeviceSpec::JbdBms(j) if j.name == c.device));
                    if !known && c.device.len() != 17 {
                        return Err(format!(
                            "client `{}`: device `{}` is neither a jbd-bms device of this scenario nor a BLE address (AA:BB:CC:DD:EE:FF)",
                            c.name, c.device
                        ));
                    }
                }
            }
        }
        for p in &self.processes {
            unique("process", &p.name)?;
        }
        let client = |n: &str| self.clients.iter().any(|c| c.name() == n);
        let process = |n: &str| self.processes.iter().any(|p| p.name == n);
        let client_kind = |n: &str| self.clients.iter().find(|c| c.name() == n).map(|c| c.kind());
        let device_kind = |n: &str| self.devices.iter().find(|d| d.name() == n).map(|d| d.kind());
        let link = |n: &str| links.contains(&n);
        for (i, step) in self.steps.iter().enumerate() {
            let at = format!("step {} ({})", i + 1, step.label());
            let missing = |what: &str, n: &str| format!("{at}: no {what} named `{n}`");
            match step {
                Step::Wait(_) => {}
                Step::Set(s) => {
                    match device_kind(&s.device) {
                        None => return Err(missing("device", &s.device)),
                        Some("bsc-hub") => return Err(format!("{at}: `{}` is a bsc-hub: it has no state to set", s.device)),
                        Some(kind) => {
                            for k in s.state.keys() {
                                check_device_key(kind, k).map_err(|e| format!("{at}: {e}"))?;
                            }
                        }
                    }
                }
                Step::Fault(f) => {
                    let l = f.link.as_deref().ok_or_else(|| format!("{at}: give the `link` to put the fault on"))?;
                    if !link(l) {
                        return Err(format!("{at}: no link `{l}` (links: {})", links.join(", ")));
                    }
                    f.clone().into_rule().map_err(|e| format!("{at}: {e}"))?;
                }
                Step::ClearFaults(c) => {
                    if !link(&c.link) {
                        return Err(format!("{at}: no link `{}` (links: {})", c.link, links.join(", ")));
                    }
                }
                Step::ExpectReading(e) => {
                    if !client(&e.client) {
                        return Err(missing("client", &e.client));
                    }
                    if e.equals.is_none() && e.min.is_none() && e.max.is_none() {
                        return Err(format!("{at}: give `equals`, `min` or `max`"));
                    }
                }
                Step::ExpectFlag(e) => {
                    if !client(&e.client) {
                        return Err(missing("client", &e.client));
                    }
                }
                Step::ExpectErrors(e) => {
                    if !client(&e.client) {
                        return Err(missing("client", &e.client));
                    }
                    if e.at_least.is_none() && e.at_most.is_none() {
                        return Err(format!("{at}: give `at_least` and/or `at_most`"));
                    }
                }
                Step::ExpectObservation(e) => {
                    if !ObservationKind::NAMES.contains(&e.kind.as_str()) {
                        return Err(format!("{at}: unknown observation kind `{}` (known: {})", e.kind, ObservationKind::NAMES.join(", ")));
                    }
                    if e.at_least.is_none() && e.at_most.is_none() {
                        return Err(format!("{at}: give `at_least` and/or `at_most`"));
                    }
                }
                Step::ExpectFrames(e) => {
                    if !link(&e.link) {
                        return Err(format!("{at}: no link `{}` (links: {})", e.link, links.join(", ")));
                    }
                    if e.at_least.is_none() && e.at_most.is_none() {
                        return Err(format!("{at}: give `at_least` and/or `at_most`"));
                    }
                }
                Step::ExpectOutput(e) => {
                    if !process(&e.process) {
                        return Err(missing("process", &e.process));
                    }
                }
                Step::ExpectExit(e) => {
                    if !process(&e.process) {
                        return Err(missing("process", &e.process));
                    }
                }
                Step::SendNpdu(e) => {
                    match client_kind(&e.client) {
                        Some("bsc-node") => {}
                        Some(k) => return Err(format!("{at}: `{}` is a {k}; only a bsc-node sends NPDUs", e.client)),
                        None => return Err(missing("client", &e.client)),
                    }
                    if let Some(to) = e.to.as_deref().filter(|t| *t != "broadcast") {
                        if client_kind(to) != Some("bsc-node") && to.parse::<Vmac>().is_err() {
                            return Err(format!("{at}: `to: {to}` is neither `broadcast`, a VMAC (02:00:00:00:00:01) nor a bsc-node"));
                        }
                    }
                    if let Some(h) = &e.npdu {
                        parse_hex(h).map_err(|m| format!("{at}: npdu: {m}"))?;
                    }
                    if e.pad_to.is_some_and(|n| n > 65_535) {
                        return Err(format!("{at}: pad_to is capped at 65535 (the largest BVLC payload)"));
                    }
                }
                Step::SendRaw(e) => {
                    match client_kind(&e.client) {
                        Some("bsc-raw") => {}
                        Some(k) => return Err(format!("{at}: `{}` is a {k}; only a bsc-raw peer sends raw bytes", e.client)),
                        None => return Err(missing("client", &e.client)),
                    }
                    if e.hex.is_none() && e.pad_to.is_none() {
                        return Err(format!("{at}: give `hex` and/or `pad_to`"));
                    }
                    if let Some(h) = &e.hex {
                        parse_hex(h).map_err(|m| format!("{at}: hex: {m}"))?;
                    }
                    if e.pad_to.is_some_and(|n| n > 16 * 1024 * 1024) {
                        return Err(format!("{at}: pad_to is capped at 16 MiB"));
                    }
                }
                Step::Ble(b) => {
                    match device_kind(&b.device) {
                        Some("jbd-bms") => {}
                        Some(k) => return Err(format!("{at}: `{}` is a {k}, not a BLE device", b.device)),
                        None => return Err(missing("device", &b.device)),
                    }
                    check_ble_link(b.mtu, b.rssi).map_err(|e| format!("{at}: {e}"))?;
                    if let Some(w) = &b.reject_write {
                        if !["request", "command", "none"].contains(&w.as_str()) {
                            return Err(format!("{at}: reject_write must be request, command or none, not `{w}`"));
                        }
                    }
                    if b.mtu.is_none()
                        && b.refuse_connections.is_none()
                        && !b.disconnect
                        && b.reject_write.is_none()
                        && b.stop_advertising_while_connected.is_none()
                        && b.rssi.is_none()
                    {
                        return Err(format!(
                            "{at}: give at least one of mtu, refuse_connections, disconnect, reject_write, stop_advertising_while_connected, rssi"
                        ));
                    }
                }
                Step::Stop(d) | Step::Start(d) => match device_kind(&d.device) {
                    Some("bsc-hub") => {}
                    Some(k) => return Err(format!("{at}: a {k} cannot be stopped or started; only a bsc-hub can")),
                    None => return Err(missing("device", &d.device)),
                },
            }
        }
        for d in &self.devices {
            for k in d.state().into_iter().flat_map(|s| s.keys()) {
                check_device_key(d.kind(), k).map_err(|e| format!("device `{}`: {e}", d.name()))?;
            }
        }
        Ok(())
    }
}

fn check_vmac_uuid(who: &str, vmac: Option<&str>, uuid: Option<&str>) -> Result<(), String> {
    if let Some(v) = vmac {
        let parsed: Vmac = v.parse().map_err(|e| format!("client `{who}`: vmac `{v}`: {e}"))?;
        if parsed.is_broadcast() || parsed.is_reserved() {
            return Err(format!("client `{who}`: vmac `{v}` is the broadcast or reserved address"));
        }
    }
    if let Some(u) = uuid {
        u.parse::<DeviceUuid>().map_err(|e| format!("client `{who}`: uuid `{u}`: {e}"))?;
    }
    Ok(())
}

/// Hex bytes with optional spaces, colons or `0x` prefixes: `01 00`, `0x01,0x00`.
pub fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: String = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == ':')
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

/// A state key a device kind understands.
pub fn check_device_key(kind: &str, key: &str) -> Result<(), String> {
    if kind == "jbd-bms" {
        if crate::device::jbd_core::JBD_STATE_KEYS.iter().any(|(k, _)| *k == key) {
            return Ok(());
        }
        if key == "address" {
            return Err("`address` is an RS-485 setting; a jbd-bms has none".into());
        }
    }
    check_state_key(key).map_err(|e| {
        if kind == "jbd-bms" {
            let extra: Vec<_> = crate::device::jbd_core::JBD_STATE_KEYS.iter().map(|(k, _)| *k).collect();
            format!("{e}; a jbd-bms also knows {}", extra.join(", "))
        } else {
            e
        }
    })
}

/// A key the pack understands: the model's keys (with `N` for an index)
/// plus `address`.
pub fn check_state_key(key: &str) -> Result<(), String> {
    if key == "address" {
        return Ok(());
    }
    // `cell12_mv` → `cellN_mv`: every run of digits is one index.
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
    if crate::model::STATE_KEYS.iter().any(|(k, _)| *k == key || *k == generic) {
        Ok(())
    } else {
        let keys: Vec<_> = crate::model::STATE_KEYS.iter().map(|(k, _)| *k).collect();
        Err(format!("unknown state key `{key}` (known: address, {})", keys.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_an_error_with_location() {
        let y = "name: x\nsteps:\n  - wait: 1s\nbogus: 3\n";
        let e = Scenario::parse(Path::new("s.yaml"), y).unwrap_err().to_string();
        assert!(e.starts_with("s.yaml:4:"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_duration_and_step() {
        let e = Scenario::parse(Path::new("s.yaml"), "name: x\nsteps:\n  - wait: soon\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid duration"), "{e}");
        let e = Scenario::parse(Path::new("s.yaml"), "name: x\nsteps:\n  - jump: 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("s.yaml:3:"), "{e}");
    }

    #[test]
    fn a_sniffer_has_no_link_to_fault() {
        let y = "name: x\nbuses: [{name: b, ports: [p]}]\nclients:\n  - {name: s, kind: modbus-sniffer, port: p}\nsteps:\n  - fault: {link: s, kind: drop}\n";
        let e = Scenario::parse(Path::new("s.yaml"), y).unwrap_err().to_string();
        assert!(e.contains("no link `s`") && e.contains("links: p"), "{e}");
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
    fn bsc_cross_references() {
        let base = "name: x\ndevices:\n  - {name: hub, kind: bsc-hub}\nclients:\n  - {name: a, kind: bsc-node, hub: hub}\n  - {name: r, kind: bsc-raw, hub: hub}\n";
        let ok = format!("{base}steps:\n  - send_npdu: {{client: a, to: a}}\n  - send_raw: {{client: r, hex: '01 00'}}\n  - stop: {{device: hub}}\n  - expect_observation: {{kind: hub, contains: nak_sent, at_least: 1}}\n");
        Scenario::parse(Path::new("s.yaml"), &ok).unwrap();
        for (steps, want) in [
            ("  - send_npdu: {client: r}\n", "only a bsc-node"),
            ("  - send_raw: {client: a, hex: '01'}\n", "only a bsc-raw"),
            ("  - send_npdu: {client: a, to: nobody}\n", "neither `broadcast`"),
            ("  - send_raw: {client: r, hex: '0'}\n", "odd number"),
            ("  - stop: {device: nope}\n", "no device named `nope`"),
            ("  - expect_observation: {kind: bogus, at_least: 1}\n", "unknown observation kind"),
        ] {
            let y = format!("{base}steps:\n{steps}");
            let e = Scenario::parse(Path::new("s.yaml"), &y).unwrap_err().to_string();
            assert!(e.contains(want), "{steps}: {e}");
        }
        let y = "name: x\nclients:\n  - {name: a, kind: bsc-node, hub: nohub}\nsteps: []\n";
        let e = Scenario::parse(Path::new("s.yaml"), y).unwrap_err().to_string();
        assert!(e.contains("hub `nohub` is neither"), "{e}");
        let y = "name: x\ndevices:\n  - {name: hub, kind: bsc-hub}\nclients:\n  - {name: a, kind: bsc-node, hub: hub, vmac: 'ff:ff:ff:ff:ff:ff'}\nsteps: []\n";
        let e = Scenario::parse(Path::new("s.yaml"), y).unwrap_err().to_string();
        assert!(e.contains("broadcast or reserved"), "{e}");
    }

    #[test]
    fn indexed_state_keys() {
        assert!(check_state_key("cell3_mv").is_ok());
        assert!(check_state_key("cell123_mv").is_ok(), "range is the model's to check");
        assert!(check_state_key("temp2_c").is_ok());
        assert!(check_state_key("cellx_mv").is_err());
    }

    #[test]
    fn cross_references_checked() {
        let y = "name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: d, kind: eg4-lp4, bus: nope, address: 1}\nsteps: []\n";
        let e = Scenario::parse(Path::new("s.yaml"), y).unwrap_err().to_string();
        assert!(e.contains("bus `nope`"), "{e}");
        let y = "name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: d, kind: jbd, bus: b, address: 1}\nsteps: []\n";
        let e = Scenario::parse(Path::new("s.yaml"), y).unwrap_err().to_string();
        assert!(e.starts_with("s.yaml:4:") && e.contains("unknown variant `jbd`"), "{e}");
        let y = "name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: d, kind: eg4-lp4, bus: b, address: 1, mtu: 23}\nsteps: []\n";
        let e = Scenario::parse(Path::new("s.yaml"), y).unwrap_err().to_string();
        assert!(e.contains("unknown field `mtu`"), "a key of another kind is rejected: {e}");
    }
}
