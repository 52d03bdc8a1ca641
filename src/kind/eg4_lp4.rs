//! `eg4-lp4`: an EG4 LifePower4 pack, a Modbus RTU (or legacy 7E/0D) slave
//! on one of the scenario's RS-485 buses.

use std::collections::BTreeMap;

use actix::Actor;
use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::{at_key, decode_keys, Declared, Kind, LinkDecl, LinkHomeDecl, ListSection, Names, Role, Running, StartContext};
use crate::device::eg4::{Eg4PackActor, SetState};
use crate::device::eg4_core::{Eg4Pack, Eg4Protocol, Eg4Quirk};
use crate::link::capture::CaptureFormat;
use crate::link::fault::{ChecksumLayout, LinkMedium};
use crate::model::PackConfig;
use crate::protocol::eg4::RegisterProfile;
use crate::scenario::source::{Problem, YamlPath};
use crate::transport::bus::{AttachDevice, BusDevice};

pub struct Eg4Lp4;

/// Its scenario keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eg4Keys {
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
    /// Initial state: any pack state key (`hilbench list`).
    #[serde(default)]
    pub state: BTreeMap<String, f64>,
}

impl Kind for Eg4Lp4 {
    fn sim(&self) -> Option<super::KindCommand> {
        Some(super::KindCommand {
            command: || {
                super::subcommand::<crate::cli::sim::Eg4SimArgs>(
                    "eg4-lp4",
                    "EG4 LifePower4 v2 packs as Modbus RTU (or legacy 7E/0D) slaves on PTYs.",
                    crate::cli::sim::EG4_SIM_HELP,
                )
            },
            run: |m| super::run_parsed(m, crate::cli::sim::eg4_main),
        })
    }
    fn name(&self) -> &'static str {
        "eg4-lp4"
    }
    fn role(&self) -> Role {
        Role::Device
    }
    fn about(&self) -> &'static str {
        "EG4 LifePower4 v2 battery pack: Modbus RTU slave (or legacy 7E/0D) on an RS-485 bus of PTYs"
    }
    /// Modbus RTU frames whose CRC-16 checks (a request, a reply, or a request echoed back
    /// by the adapter), and legacy 7E … 0D frames whose checksum checks.
    fn recognise(&self, f: &crate::link::recognise::CapturedFrameView<'_>) -> Option<crate::link::recognise::FrameVerdict> {
        use crate::link::record::Direction;
        use crate::protocol::{eg4_legacy, modbus};
        if f.transport != crate::link::recognise::CaptureTransport::Serial {
            return None;
        }
        let b = f.bytes;
        let ok = if b.first() == Some(&0x7E) {
            eg4_legacy::decode_request(b).is_ok() || eg4_legacy::decode_reply(b).is_ok()
        } else {
            match f.direction {
                Direction::Request => modbus::decode_request(b).is_ok(),
                Direction::Response => modbus::decode_response(b).is_ok() || modbus::decode_request(b).is_ok(),
            }
        };
        // Modbus frames and legacy requests carry the pack's address first / after 7E.
        let unit = if b.first() == Some(&0x7E) {
            eg4_legacy::decode_request(b).map(|r| r.address).ok()
        } else {
            b.first().copied()
        };
        ok.then(|| crate::link::recognise::FrameVerdict {
            decisive: true,
            meaning: crate::scenario::transcript::describe(f.direction, b),
            unit: unit.map(|a| format!("addr{a}")),
        })
    }
    fn capture_client(&self, port: Option<&str>, devices: &[crate::link::recognise::CapturedDevice]) -> Result<crate::link::recognise::CaptureClient, String> {
        if devices.iter().any(|d| d.frames.iter().find(|(dir, _)| *dir == crate::link::record::Direction::Request).is_some_and(|(_, b)| b.first() == Some(&0x7E))) {
            return legacy_capture(port.ok_or("EG4 packs are replayed on a bus")?, devices);
        }
        modbus_capture(port.ok_or("EG4 packs are replayed on a bus")?, devices, false).map(|(c, _)| c)
    }
    fn capture_model(&self, port: Option<&str>, devices: &[crate::link::recognise::CapturedDevice]) -> Result<super::CaptureModel, String> {
        let (client, devices) = modbus_capture(port.ok_or("EG4 packs are simulated on a bus")?, devices, true)?;
        Ok(super::CaptureModel { devices, client })
    }
    fn fields(&self, f: &crate::link::recognise::CapturedFrameView<'_>, request: Option<&[u8]>) -> Vec<(String, String)> {
        use crate::protocol::modbus::{self, ModbusRequest};
        if f.transport != crate::link::recognise::CaptureTransport::Serial || f.bytes.first() == Some(&0x7E) {
            return Vec::new();
        }
        // A read's start numbers the registers; a poll's size names them by its profile.
        let read = request.and_then(|r| modbus::decode_request(r).ok()).and_then(|r| match r.pdu {
            ModbusRequest::ReadHolding { start, count } | ModbusRequest::ReadInput { start, count } => Some((start, count)),
            _ => None,
        });
        let profile = read.and_then(|(s, c)| RegisterProfile::of_read(s, c)).unwrap_or(RegisterProfile::Lp4V2);
        modbus::response_fields(f.bytes, read.map(|r| r.0), &|r| profile.register_name(r))
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<Eg4Keys>(entry)?))
    }
    fn list(&self) -> Vec<ListSection> {
        let rows = |all: &[(&str, &str)]| all.iter().map(|(k, d)| (k.to_string(), d.to_string())).collect();
        vec![
            ListSection {
                title: "EG4 register profiles (eg4-lp4 `profile`)".into(),
                rows: RegisterProfile::ALL.iter().map(|p| (p.name().to_string(), p.description().to_string())).collect(),
            },
            ListSection {
                title: "EG4 protocols (eg4-lp4 `protocol`)".into(),
                rows: rows(&[("modbus", "Modbus RTU (fn 03/04/06/16)"), ("legacy", "EG4 7E/0D binary (commands 0x01, 0x33, 0x42)")]),
            },
            ListSection { title: "EG4 quirks (eg4-lp4 `quirks`)".into(), rows: rows(Eg4Quirk::ALL) },
            ListSection {
                title: "Pack state keys (eg4-lp4 and jbd-bms `state`, `set`, sim --set)".into(),
                rows: std::iter::once(("address".to_string(), "Modbus address (the DIP switches), 1..=247; eg4-lp4 only".to_string()))
                    .chain(crate::model::STATE_KEYS.iter().map(|(k, d)| (k.to_string(), d.to_string())))
                    .collect(),
            },
        ]
    }
}

impl Eg4Keys {
    fn pack(&self) -> Result<Eg4Pack, String> {
        let mut cfg = PackConfig::default();
        if let Some(c) = self.cells {
            cfg.cells = c;
        }
        if let Some(n) = self.ntc {
            cfg.ntc = n;
        }
        let mut pack = Eg4Pack::new(self.address, cfg)?;
        if let Some(p) = self.profile {
            pack.profile = p;
        }
        if let Some(p) = self.protocol {
            pack.protocol = p;
        }
        pack.quirks = self.quirks.clone();
        for (k, v) in &self.state {
            pack.set(k, *v).map_err(|e| format!("state {k}: {e}"))?;
        }
        Ok(pack)
    }
}

impl Declared for Eg4Keys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "eg4-lp4"
    }
    fn check(&self, names: &Names<'_>) -> Result<(), Problem> {
        if !names.buses.contains(&self.bus.as_str()) {
            return Err(at_key("bus", format!("bus `{}` is not declared under `buses` (buses: {})", self.bus, list(&names.buses))));
        }
        if self.address == 0 || self.address > 247 {
            return Err(at_key("address", format!("address {} is outside 1..=247", self.address)));
        }
        if let Some(c) = self.cells.filter(|c| !(4..=24).contains(c)) {
            return Err(at_key("cells", format!("cells {c} is outside 4..=24")));
        }
        for k in self.state.keys() {
            crate::model::check_state_key(k).map_err(|e| Problem::at(YamlPath::key("state").then_key(k), e))?;
        }
        // The model checks ranges (a cell index past `cells`, a SoC of 140).
        self.pack().map_err(|e| at_key("state", e))?;
        Ok(())
    }
    fn links(&self) -> Vec<LinkDecl> {
        let (checksum, carries) = match self.protocol.unwrap_or_default() {
            Eg4Protocol::Modbus => (ChecksumLayout::ModbusCrc, "Modbus RTU"),
            Eg4Protocol::Legacy => (ChecksumLayout::Eg4Legacy, "EG4 7E/0D"),
        };
        vec![LinkDecl {
            name: self.name.clone(),
            home: LinkHomeDecl::Bus(self.bus.clone()),
            capture: Some(CaptureFormat::ModbusRtu),
            checksum: Some(checksum),
            carries,
            medium: LinkMedium::Serial,
        }]
    }
    fn bus(&self) -> Option<&str> {
        Some(&self.bus)
    }
    fn check_state_key(&self, key: &str) -> Result<(), String> {
        crate::model::check_state_key(key)
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let pack = self.pack()?;
            let bus = cx.buses.get(&self.bus).ok_or_else(|| format!("bus `{}` is not running", self.bus))?;
            let addr = Eg4PackActor::new(self.name.clone(), pack, cx.log.clone()).start();
            bus.send(AttachDevice(BusDevice { name: self.name.clone(), recipient: addr.clone().recipient() }))
                .await
                .map_err(|e| format!("bus `{}`: {e}", self.bus))?;
            Ok(Box::new(RunningPack { addr }) as Box<dyn Running>)
        })
    }
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

struct RunningPack {
    addr: actix::Addr<Eg4PackActor>,
}

impl Running for RunningPack {
    fn set<'a>(&'a self, key: &'a str, value: f64) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.addr.send(SetState { key: key.to_string(), value }).await.map_err(|e| e.to_string())?
        })
    }
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move { drop(self) })
    }
}

/// What one captured pack did with the polls it was sent.
#[derive(Debug, Default)]
struct PollOutcomes {
    exchanges: usize,
    silent: usize,
    bad_crc: usize,
    exceptions: usize,
    /// Answers that are no read response (a torn frame, noise).
    other: usize,
    /// Answers that began with the request echoed back.
    echo: usize,
    /// The registers of the last good answer.
    last: Option<Vec<u16>>,
}

/// A `modbus-master` that sends what the captured master sent (every request the
/// profile's poll, one address after another, no retries: each poll walks the replay one
/// captured exchange on), and what it must meet: per pack, the bad CRCs, exceptions,
/// silences and other bad answers of the capture, and the last good reading's SoC and
/// voltage. Err when a captured request is not a profile's poll (the client would send
/// something the replay never saw) or a device is not one Modbus address.
///
/// With `model`, the packs are simulated instead (`capture import --as-state`): each in the
/// state of its last good answer (SoC, SoH, current, temperatures, cycles, capacity; its
/// cells pinned by a `set` step, as `state` sets SoC after them), with the faults of the
/// shared vocabulary that give the client what the capture shows (bad_checksum and drop
/// on its responses, at the captured share of the polls); also returns the device entries.
fn modbus_capture(port: &str, devices: &[crate::link::recognise::CapturedDevice], model: bool) -> Result<(crate::link::recognise::CaptureClient, Vec<String>), String> {
    use crate::protocol::modbus::{self, ModbusError, ModbusRequest, ModbusResponse};
    let mut poll: Option<(u16, u16)> = None;
    let mut packs = Vec::new();
    for d in devices {
        let address: u8 = d
            .unit
            .as_deref()
            .and_then(|u| u.strip_prefix("addr")?.parse().ok())
            .ok_or_else(|| format!("{} is not one Modbus address on a bus (EG4 7E/0D captures get no scenario yet)", d.name))?;
        let (exchanges, _) = crate::scenario::against::exchanges(d.frames.clone());
        let mut o = PollOutcomes { exchanges: exchanges.len(), ..PollOutcomes::default() };
        for ex in &exchanges {
            let not_a_poll = || format!("{}: fixture frame {} is not a read the modbus-master polls with: {}", d.name, ex.frame, crate::scenario::transcript::describe(crate::link::record::Direction::Request, &ex.request));
            let read = match modbus::decode_request(&ex.request).map_err(|_| not_a_poll())?.pdu {
                ModbusRequest::ReadHolding { start, count } => (start, count),
                _ => return Err(not_a_poll()),
            };
            if *poll.get_or_insert(read) != read {
                return Err(format!("{}: fixture frame {} reads {} registers from {}, another read than the first (one client polls one read)", d.name, ex.frame, read.1, read.0));
            }
            let mut answer = ex.answers.concat();
            // The master's own request heard back first: an adapter's echo (field fault 6).
            if answer.len() >= ex.request.len() && answer.starts_with(&ex.request) {
                o.echo += 1;
                answer.drain(..ex.request.len());
            }
            if answer.is_empty() {
                o.silent += 1;
                continue;
            }
            match modbus::decode_response(&answer) {
                Ok(f) => match f.pdu {
                    ModbusResponse::ReadHolding(regs) => o.last = Some(regs),
                    ModbusResponse::Exception { .. } => o.exceptions += 1,
                    _ => o.other += 1,
                },
                Err(ModbusError::BadCrc { .. }) => o.bad_crc += 1,
                Err(_) => o.other += 1,
            }
        }
        packs.push((address, d.name.clone(), o));
    }
    let (start, count) = poll.ok_or("the capture holds no request")?;
    let profile = RegisterProfile::ALL.into_iter().find(|p| p.poll_request() == (start, count)).ok_or_else(|| {
        let polls: Vec<String> = RegisterProfile::ALL.iter().map(|p| format!("{} {} from {}", p.name(), p.poll_request().1, p.poll_request().0)).collect();
        format!("the captured master reads {count} registers from {start}, which no register profile polls ({})", polls.join(", "))
    })?;
    // One pass through the longest capture: each exchange costs a poll interval, and every
    // address's answer or timeout.
    let (interval_ms, timeout_ms) = (100u64, 150u64);
    let longest = packs.iter().map(|(_, _, o)| o.exchanges).max().unwrap_or(0) as u64;
    let pass_ms = longest * (interval_ms + packs.len() as u64 * timeout_ms);
    let within = format!("{}ms", (2 * pass_ms + 1000).max(3000));
    let addresses: Vec<String> = packs.iter().map(|(a, _, _)| a.to_string()).collect();
    let client = format!(
        "{{ name: master, kind: {}, port: {port}, profile: {}, addresses: [{}], interval: {interval_ms}ms, timeout: {timeout_ms}ms, retries: 0 }}",
        super::modbus_master::MODBUS_MASTER.name(),
        profile.name(),
        addresses.join(", ")
    );
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    let mut entries = Vec::new();
    let mut setup = Vec::new();
    for (a, name, o) in &packs {
        let errors = |kind: &str| format!("expect_errors: {{ client: master, address: {a}, kind: {kind}, at_least: 1, within: {within} }}");
        let mut seen = Vec::new();
        if model {
            let (entry, set, faults) = pack_model(name, *a, profile, start, o);
            entries.push(entry);
            setup.extend(set);
            setup.extend(faults);
        }
        for (n, kind, what) in [(o.echo, Some("echo"), "requests echoed back"), (o.bad_crc, Some("crc"), "answers with a bad CRC"), (o.exceptions, Some("exception"), "exceptions"), (o.silent, Some("timeout"), "silences"), (o.other, None, "answers that are no read response")] {
            if n == 0 {
                continue;
            }
            seen.push(format!("{n} {what}"));
            // A simulated pack raises no exception and sends no torn frame.
            if model && matches!(kind, None | Some("exception")) {
                continue;
            }
            steps.push(match kind {
                Some(k) => errors(k),
                None => format!("expect_errors: {{ client: master, address: {a}, at_least: 1, within: {within} }}"),
            });
        }
        if let Some(t) = o.last.as_ref().and_then(|regs| profile.decode(start, regs).ok()) {
            seen.push(format!("last reading SoC {} %, {} mV", t.soc_pct, t.pack_mv));
            steps.push(format!("expect_reading: {{ client: master, address: {a}, field: soc_pct, equals: {}, within: {within} }}", t.soc_pct));
            // A simulated pack's voltage is its cells' sum, which the captured one need not be.
            if !model {
                steps.push(format!(
                    "expect_reading: {{ client: master, address: {a}, field: pack_v, equals: {}, tolerance: 0.005, within: {within} }}",
                    f64::from(t.pack_mv) / 1000.0
                ));
            }
        }
        if model && (o.exceptions > 0 || o.other > 0) {
            seen.push("its exceptions and undecodable answers are not reproduced".into());
        }
        notes.push(format!("address {a}: {} polls; {}", o.exchanges, if seen.is_empty() { "no answer decoded".into() } else { seen.join(", ") }));
    }
    // An echo is the adapter's, on the master's port: one fault at the captured share.
    let (echoed, polls) = packs.iter().fold((0, 0), |(e, n), (_, _, o)| (e + o.echo, n + o.exchanges));
    if model && echoed > 0 {
        let how = if echoed >= polls { "always: true".to_string() } else { format!("probability: {:.2}", echoed as f64 / polls as f64) };
        setup.push(format!("fault: {{ link: {port}, kind: echo, direction: request, {how} }}"));
    }
    setup.extend(steps);
    Ok((crate::link::recognise::CaptureClient { client, steps: setup, notes }, entries))
}

/// A `legacy-client` that polls the captured 7E/0D packs as the captured bridge did
/// (general status, command 0x01, one address after another, no retries), and what it
/// must meet: per pack, the silences and undecodable answers, the last good status's
/// SoC, voltage and cell count, and its over-voltage cell and alarm flags.
fn legacy_capture(port: &str, devices: &[crate::link::recognise::CapturedDevice]) -> Result<crate::link::recognise::CaptureClient, String> {
    use crate::protocol::eg4_legacy::{self, LegacyCommand};
    let mut packs = Vec::new();
    for d in devices {
        let address: u8 = d.unit.as_deref().and_then(|u| u.strip_prefix("addr")?.parse().ok()).ok_or_else(|| format!("{} is not one pack address on a bus", d.name))?;
        let (exchanges, _) = crate::scenario::against::exchanges(d.frames.clone());
        let (mut silent, mut other, mut last) = (0usize, 0usize, None);
        for ex in &exchanges {
            match eg4_legacy::decode_request(&ex.request) {
                Ok(r) if r.command == LegacyCommand::GeneralStatus => {}
                _ => {
                    let what = crate::scenario::transcript::describe(crate::link::record::Direction::Request, &ex.request);
                    return Err(format!("{}: fixture frame {} is not the general status read the legacy-client polls with: {what}", d.name, ex.frame));
                }
            }
            let answer = ex.answers.concat();
            if answer.is_empty() {
                silent += 1;
            } else if let Ok(s) = eg4_legacy::decode_status_reply(&answer) {
                last = Some(s);
            } else {
                other += 1;
            }
        }
        packs.push((address, d.name.clone(), exchanges.len(), silent, other, last));
    }
    let (interval_ms, timeout_ms) = (100u64, 150u64);
    let longest = packs.iter().map(|p| p.2).max().unwrap_or(0) as u64;
    let within = format!("{}ms", (2 * longest * (interval_ms + packs.len() as u64 * timeout_ms) + 1000).max(3000));
    let addresses: Vec<String> = packs.iter().map(|p| p.0.to_string()).collect();
    let client = format!(
        "{{ name: master, kind: {}, port: {port}, addresses: [{}], interval: {interval_ms}ms, timeout: {timeout_ms}ms, retries: 0 }}",
        super::legacy_client::LegacyClient.name(),
        addresses.join(", ")
    );
    let (mut steps, mut notes) = (Vec::new(), Vec::new());
    for (a, _, polls, silent, other, last) in &packs {
        let mut seen = Vec::new();
        if *silent > 0 {
            seen.push(format!("{silent} silences"));
            steps.push(format!("expect_errors: {{ client: master, address: {a}, kind: timeout, at_least: 1, within: {within} }}"));
        }
        if *other > 0 {
            seen.push(format!("{other} answers that are no status"));
            steps.push(format!("expect_errors: {{ client: master, address: {a}, at_least: 1, within: {within} }}"));
        }
        if let Some(s) = last {
            let (values, flags) = crate::client::legacy::legacy_fields(s);
            for (field, tolerance) in [("soc_pct", Some(0.005)), ("pack_v", Some(0.005)), ("cell_count", None)] {
                if let Some(v) = values.get(field) {
                    let tol = tolerance.map_or(String::new(), |t| format!(" tolerance: {t},"));
                    steps.push(format!("expect_reading: {{ client: master, address: {a}, field: {field}, equals: {v},{tol} within: {within} }}"));
                }
            }
            for f in &flags {
                steps.push(format!("expect_flag: {{ client: master, flag: {}, within: {within} }}", serde_json::to_string(f).unwrap_or_default()));
                // A cell in over-voltage alarm has its top bit set on the wire: the client
                // must read it masked (field fault 7).
                let cell = f.strip_prefix("cell_ov_flag:").map(|n| format!("cell{n}_mv"));
                if let Some((field, v)) = cell.as_ref().and_then(|c| Some((c, values.get(c)?))) {
                    steps.push(format!("expect_reading: {{ client: master, address: {a}, field: {field}, equals: {v}, within: {within} }}"));
                }
            }
            seen.push(format!("last status SoC {} %, {} cells{}", values.get("soc_pct").copied().unwrap_or(0.0), s.cells_mv.len(), if flags.is_empty() { String::new() } else { format!(", flags {}", flags.join(", ")) }));
        }
        notes.push(format!("address {a}: {polls} polls; {}", if seen.is_empty() { "no answer decoded".into() } else { seen.join(", ") }));
    }
    Ok(crate::link::recognise::CaptureClient { client, steps, notes })
}

/// One captured pack as a simulated one: its entry, the `set` step pinning its cells, and
/// the fault steps that reproduce its bad CRCs and silences.
fn pack_model(name: &str, address: u8, profile: RegisterProfile, start: u16, o: &PollOutcomes) -> (String, Vec<String>, Vec<String>) {
    let t = o.last.as_ref().and_then(|regs| profile.decode(start, regs).ok());
    let mut keys = Vec::new();
    let mut set = Vec::new();
    let mut extra = String::new();
    if let Some(t) = &t {
        keys.push(format!("soc: {}", t.soc_pct));
        keys.push(format!("soh: {}", t.soh_pct.max(1)));
        keys.push(format!("current_a: {}", f64::from(t.current_ca) / 100.0));
        keys.push(format!("mos_temp_c: {}", t.pcb_temp_c));
        keys.extend(t.temps_c.iter().enumerate().map(|(i, c)| format!("temp{}_c: {c}", i + 1)));
        keys.push(format!("cycles: {}", t.cycles));
        if t.capacity_dah > 0 {
            keys.push(format!("capacity_ah: {}", f64::from(t.capacity_dah) / 10.0));
        }
        extra = format!(", cells: {}, ntc: {}", t.cells_mv.len().max(4), t.temps_c.len());
        let cells: Vec<String> = t.cells_mv.iter().enumerate().map(|(i, mv)| format!("cell{}_mv: {mv}", i + 1)).collect();
        if !cells.is_empty() {
            set.push(format!("set: {{ device: {name}, state: {{ {} }} }}", cells.join(", ")));
        }
    }
    let state = if keys.is_empty() { String::new() } else { format!(", state: {{ {} }}", keys.join(", ")) };
    let entry = format!("{{ name: {name}, kind: {}, bus: field, address: {address}, profile: {}{extra}{state} }}", Eg4Lp4.name(), profile.name());
    let share = |n: usize| n as f64 / o.exchanges.max(1) as f64;
    let mut faults = Vec::new();
    for (n, kind) in [(o.bad_crc, "bad_checksum"), (o.silent, "drop")] {
        if n == 0 {
            continue;
        }
        let how = if n >= o.exchanges { "always: true".to_string() } else { format!("probability: {:.2}", share(n)) };
        faults.push(format!("fault: {{ link: {name}, kind: {kind}, direction: response, {how} }}"));
    }
    (entry, set, faults)
}
