//! `jbd-bms`: a JBD / Xiaoxiang smart BMS, a GATT peripheral (0xFF00) on
//! the run's virtual BLE air, with its own peripheral adapter and address.

use std::collections::BTreeMap;

use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::ble::{self, AirLink};
use super::{at_key, decode_keys, Declared, Kind, LinkDecl, LinkHomeDecl, ListSection, Names, Role, Running, StartContext, StepDoc};
use crate::device::eg4::SetState;
use crate::device::jbd::{JbdBmsDevice, JbdGattConfig};
use crate::device::jbd_core::{JbdBms, JbdConfig, JbdProfile, JbdQuirk, JBD_STATE_KEYS};
use crate::link::capture::CaptureFormat;
use crate::link::fault::{ChecksumLayout, LinkMedium};
use crate::model::PackConfig;
use crate::scenario::source::{Problem, YamlPath};

pub struct JbdBmsKind;

/// Its scenario keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JbdKeys {
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

/// The service a `jbd-client` names a device for.
pub const JBD_GATT: &str = "jbd-gatt";

impl Kind for JbdBmsKind {
    fn sim(&self) -> Option<super::KindCommand> {
        Some(super::KindCommand {
            command: || {
                super::subcommand::<crate::cli::jbd::JbdSimArgs>(
                    "jbd-bms",
                    "JBD / Xiaoxiang smart BMS over BLE (GATT 0xFF00), on the virtual air or real BlueZ.",
                    crate::cli::jbd::SIM_HELP,
                )
            },
            run: |m| super::run_parsed(m, |a| crate::cli::sim::exit_code(crate::cli::jbd::sim(a))),
        })
    }
    fn validate(&self) -> Option<super::KindCommand> {
        Some(super::KindCommand {
            command: || {
                super::subcommand::<crate::cli::jbd::JbdValidateArgs>(
                    "jbd-bms",
                    "A JBD / Xiaoxiang BMS over BLE: framing, checksums, MTU splits, write types.",
                    crate::cli::jbd::VALIDATE_HELP,
                )
            },
            run: |m| super::run_parsed(m, crate::cli::jbd::validate),
        })
    }
    fn name(&self) -> &'static str {
        "jbd-bms"
    }
    fn role(&self) -> Role {
        Role::Device
    }
    fn about(&self) -> &'static str {
        "JBD / Xiaoxiang smart BMS: GATT service 0xFF00 through bluer, on the virtual BLE air or real BlueZ"
    }
    /// Values written to 0xFF02 or notified on 0xFF01 (decisive), and anywhere else
    /// DD … 77 frames whose checksum checks; over a serial line the same frames.
    fn recognise(&self, f: &crate::link::recognise::CapturedFrameView<'_>) -> Option<crate::link::recognise::FrameVerdict> {
        use crate::link::recognise::{CaptureTransport, FrameVerdict};
        use crate::link::record::Direction;
        use crate::protocol::jbd;
        if !matches!(f.transport, CaptureTransport::BleAtt | CaptureTransport::Serial) {
            return None;
        }
        let b = f.bytes;
        let own_uuid = f.uuid.is_some_and(|u| u == crate::device::jbd::NOTIFY_UUID || u == crate::device::jbd::WRITE_UUID);
        let whole = match f.direction {
            Direction::Request => jbd::decode_request(b).is_ok() || jbd::PinFrame::decode(b).is_ok(),
            Direction::Response => jbd::decode_response(b).is_ok(),
        };
        if whole {
            return Some(FrameVerdict { decisive: true, meaning: crate::scenario::transcript::describe_jbd(f.direction, b), unit: None });
        }
        own_uuid.then(|| FrameVerdict {
            decisive: true,
            meaning: match b.first() {
                Some(&jbd::START) => format!("start of a JBD frame ({} bytes)", b.len()),
                _ => format!("JBD frame piece ({} bytes)", b.len()),
            },
            unit: None,
        })
    }
    fn capture_client(&self, port: Option<&str>, devices: &[crate::link::recognise::CapturedDevice]) -> Result<crate::link::recognise::CaptureClient, String> {
        if port.is_some() {
            return Err("JBD over a UART has no built-in client yet (a scenario replays BLE JBD captures)".into());
        }
        jbd_capture_client(devices)
    }
    fn capture_model(&self, port: Option<&str>, devices: &[crate::link::recognise::CapturedDevice]) -> Result<super::CaptureModel, String> {
        if port.is_some() {
            return Err("JBD over a UART has no built-in client yet (a scenario simulates BLE JBD captures)".into());
        }
        jbd_capture_model(devices)
    }
    fn ble_identity(&self) -> Option<crate::transport::gatt::BleIdentity> {
        Some(crate::transport::gatt::BleIdentity { services: crate::device::jbd::jbd_gatt(), local_name: crate::device::jbd::JbdGattConfig::default().local_name, serves: &[JBD_GATT] })
    }
    fn fields(&self, f: &crate::link::recognise::CapturedFrameView<'_>, _request: Option<&[u8]>) -> Vec<(String, String)> {
        if f.direction != crate::link::record::Direction::Response || f.bytes.first() != Some(&crate::protocol::jbd::START) {
            return Vec::new();
        }
        crate::protocol::jbd::response_fields(f.bytes)
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<JbdKeys>(entry)?))
    }
    fn steps(&self) -> &'static [StepDoc] {
        std::slice::from_ref(&ble::BLE_STEP)
    }
    fn list(&self) -> Vec<ListSection> {
        let rows = |all: &[(&str, &str)]| all.iter().map(|(k, d)| (k.to_string(), d.to_string())).collect();
        vec![
            ListSection { title: "JBD profiles (jbd-bms `profile`)".into(), rows: rows(JbdProfile::ALL) },
            ListSection { title: "JBD quirks (jbd-bms `quirks`)".into(), rows: rows(JbdQuirk::ALL) },
            ListSection { title: "JBD state keys (besides the pack's; no `address`)".into(), rows: rows(JBD_STATE_KEYS) },
        ]
    }
}

impl JbdKeys {
    fn core(&self, seed: u64) -> Result<JbdBms, String> {
        let mut pack = PackConfig::default();
        if let Some(c) = self.cells {
            pack.cells = c;
        }
        if let Some(n) = self.ntc {
            pack.ntc = n;
        }
        if let Some(a) = self.capacity_ah {
            pack.capacity_ah = a;
        }
        let cfg = JbdConfig { pack, profile: self.profile.unwrap_or_default(), quirks: self.quirks.clone(), seed, ..JbdConfig::default() };
        let mut core = JbdBms::new(cfg)?;
        for (k, v) in &self.state {
            core.set(k, *v).map_err(|e| format!("state {k}: {e}"))?;
        }
        Ok(core)
    }
}

/// A key a JBD BMS understands: its own, or the pack model's.
fn jbd_state_key(key: &str) -> Result<(), String> {
    if JBD_STATE_KEYS.iter().any(|(k, _)| *k == key) {
        return Ok(());
    }
    if key == "address" {
        return Err("`address` is an RS-485 setting; a jbd-bms has none".into());
    }
    crate::model::check_state_key(key).map_err(|e| {
        let extra: Vec<_> = JBD_STATE_KEYS.iter().map(|(k, _)| *k).collect();
        format!("{e}; a jbd-bms also knows {}", extra.join(", "))
    })
}

impl Declared for JbdKeys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "jbd-bms"
    }
    fn check(&self, _names: &Names<'_>) -> Result<(), Problem> {
        if let Some(c) = self.cells.filter(|c| !(4..=24).contains(c)) {
            return Err(at_key("cells", format!("cells {c} is outside 4..=24 (the pack sizes JBD BMSes come in)")));
        }
        if let Some(n) = self.ntc.filter(|n| !(1..=6).contains(n)) {
            return Err(at_key("ntc", format!("ntc {n} is outside 1..=6")));
        }
        ble::check_link_settings(self.mtu, self.rssi)?;
        for k in self.state.keys() {
            jbd_state_key(k).map_err(|e| Problem::at(YamlPath::key("state").then_key(k), e))?;
        }
        self.core(1).map_err(|e| at_key("state", e))?;
        Ok(())
    }
    fn links(&self) -> Vec<LinkDecl> {
        vec![LinkDecl {
            name: self.name.clone(),
            home: LinkHomeDecl::Own,
            capture: Some(CaptureFormat::BleAtt),
            checksum: Some(ChecksumLayout::JbdSum),
            carries: "JBD frames in BLE notifications",
            medium: LinkMedium::Gatt,
        }]
    }
    fn serves(&self) -> &'static [&'static str] {
        &[JBD_GATT]
    }
    fn on_air(&self) -> bool {
        true
    }
    fn check_step(&self, _step: &str, body: &yaml_serde::Value, _names: &Names<'_>) -> Result<(), Problem> {
        ble::check_step(body)
    }
    fn check_state_key(&self, key: &str) -> Result<(), String> {
        jbd_state_key(key)
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let core = self.core(cx.seed)?;
            let air = AirLink::lend(self.mtu, self.rssi).await?;
            let gatt = JbdGattConfig {
                adapter: air.adapter().to_string(),
                local_name: self.local_name.clone().unwrap_or_else(|| JbdGattConfig::default().local_name),
                ..JbdGattConfig::default()
            };
            match JbdBmsDevice::start(self.name.clone(), core, gatt, cx.log.clone()).await {
                Ok(device) => Ok(Box::new(ble::OnAir::new(self.name.clone(), device.address.clone(), air, device)) as Box<dyn Running>),
                Err(e) => {
                    air.give_back().await;
                    Err(format!("{e:#}"))
                }
            }
        })
    }
}

/// The BMS actor is the jbd-bms part of its running entity; [`ble::OnAir`] does the rest.
impl ble::AirDevice for JbdBmsDevice {
    fn set<'a>(&'a self, key: &'a str, value: f64) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.addr.send(SetState { key: key.to_string(), value }).await.map_err(|e| e.to_string())? })
    }
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin((*self).stop())
    }
}

/// What a captured BMS answered a central's 0x03/0x04 requests: the counts of each way
/// an answer failed, and the last good basic info and cell voltages.
#[derive(Default)]
struct JbdPolls {
    requests: u64,
    silent: usize,
    bad: usize,
    status: usize,
    /// Answers with no whole frame in them, or a cell answer that disagrees with the
    /// basic info's cell count.
    torn: usize,
    /// Answers with foreign bytes before the frame.
    foreign: usize,
    basic: Option<crate::protocol::jbd::BasicInfo>,
    cells: Option<crate::protocol::jbd::CellVoltages>,
}

impl JbdPolls {
    fn of(d: &crate::link::recognise::CapturedDevice) -> Self {
        use crate::protocol::jbd;
        let (exchanges, _) = crate::scenario::against::exchanges(d.frames.clone());
        let mut p = JbdPolls::default();
        for ex in &exchanges {
            // Only the requests to the BMS: the ATT PDU's value after opcode and handle.
            let Some(req) = ex.request.get(3..).and_then(|v| jbd::decode_request(v).ok()) else { continue };
            p.requests += 1;
            let answer: Vec<u8> = ex.answers.iter().filter(|a| matches!(a.first(), Some(0x1B | 0x1D))).flat_map(|a| a.get(3..).unwrap_or(&[]).to_vec()).collect();
            if answer.is_empty() {
                p.silent += 1;
                continue;
            }
            // The first whole frame in the notifications: foreign frames before it (custom
            // firmware, field fault 11) are skipped, as a client skips them.
            let framed = answer.iter().enumerate().filter(|&(_, &b)| b == jbd::START).find_map(|(i, _)| {
                let len = jbd::OVERHEAD + usize::from(*answer.get(i + 3)?);
                Some((i, jbd::decode_response_unchecked(answer.get(i..i + len)?).ok()?))
            });
            let Some((skipped, decoded)) = framed else {
                p.torn += 1;
                continue;
            };
            p.foreign += usize::from(skipped > 0);
            match decoded {
                (_, Some(_)) => p.bad += 1,
                (r, None) if !r.is_ok() => p.status += 1,
                (r, None) if r.reg == req.reg && r.reg == jbd::reg::BASIC_INFO => p.basic = jbd::BasicInfo::decode(&r.data).ok().or(p.basic.take()),
                (r, None) if r.reg == req.reg && r.reg == jbd::reg::CELL_VOLTAGES => match jbd::CellVoltages::decode(&r.data) {
                    Ok(c) if p.basic.as_ref().is_none_or(|b| usize::from(b.cell_count) == c.cells_mv.len()) => p.cells = Some(c),
                    // Fewer cells than the basic info counts (field fault 2): the client fails it.
                    _ => p.torn += 1,
                },
                _ => {}
            }
        }
        p
    }

    /// A poll cycle (connect, subscribe, two requests) takes about a second on the air.
    fn within(&self) -> String {
        format!("{}s", (self.requests + 20).min(120))
    }

    /// The jbd-client's `expect_errors` steps for the failures seen, and what they were.
    fn error_steps(&self, steps: &mut Vec<String>, seen: &mut Vec<String>) {
        let within = self.within();
        for (n, kind, what) in [(self.bad, Some("checksum"), "answers with a bad checksum"), (self.status, Some("status"), "error statuses"), (self.silent, Some("timeout"), "unanswered requests"), (self.torn, None, "answers no client can use")] {
            if n > 0 {
                seen.push(format!("{n} {what}"));
                let kind = kind.map_or(String::new(), |k| format!(" kind: {k},"));
                steps.push(format!("expect_errors: {{ client: app,{kind} at_least: 1, within: {within} }}"));
            }
        }
        if self.foreign > 0 {
            seen.push(format!("{} answers behind foreign frames", self.foreign));
        }
    }

    /// `expect_reading` steps for the last good answers' `fields` (with their tolerances).
    fn reading_steps(&self, fields: &[(&str, Option<f64>)], steps: &mut Vec<String>, seen: &mut Vec<String>) {
        let within = self.within();
        let (values, _) = crate::client::jbd_client::reading_fields(self.basic.as_ref(), self.cells.as_ref());
        for (field, tolerance) in fields {
            if let Some(v) = values.get(*field) {
                let tol = tolerance.map_or(String::new(), |t| format!(" tolerance: {t},"));
                steps.push(format!("expect_reading: {{ client: app, field: {field}, equals: {v},{tol} within: {within} }}"));
            }
        }
        if let Some(b) = &self.basic {
            seen.push(format!("last basic info SoC {} %, {} cells", b.rsoc_pct, b.cell_count));
        }
    }

    /// `expect_flag` steps for the protections and balancing the last basic info reports.
    fn flag_steps(&self, steps: &mut Vec<String>, seen: &mut Vec<String>) {
        let within = self.within();
        let (_, flags) = crate::client::jbd_client::reading_fields(self.basic.as_ref(), None);
        let shown: Vec<&String> = flags.iter().filter(|f| f.starts_with("protection:") || f.starts_with("balancing:")).collect();
        for f in &shown {
            steps.push(format!("expect_flag: {{ client: app, flag: {}, within: {within} }}", serde_json::to_string(f).unwrap_or_default()));
        }
        if !shown.is_empty() {
            seen.push(format!("flags {}", shown.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(", ")));
        }
        if let Some(c) = &self.cells {
            seen.push(format!("last cell voltages {:?} mV", c.cells_mv));
        }
    }
}

fn one_bms(devices: &[crate::link::recognise::CapturedDevice]) -> Result<&crate::link::recognise::CapturedDevice, String> {
    match devices {
        [d] => Ok(d),
        _ => Err(format!("{} BLE devices on one link; a jbd-client polls one", devices.len())),
    }
}

fn jbd_client_entry(device: &str) -> String {
    format!("{{ name: app, kind: {}, device: {device}, interval: 500ms }}", super::jbd_client::JbdClientKind.name())
}

fn capture_note(name: &str, p: &JbdPolls, seen: &[String]) -> String {
    format!("{name}: {} requests; {}", p.requests, if seen.is_empty() { "no answer decoded".into() } else { seen.join(", ") })
}

/// A `jbd-client` that polls the captured BMS as a Home Assistant integration does, and
/// what it must meet: the answers with a bad checksum or an error status, the silences,
/// and the last good basic info and cell voltages of the capture. The captured central
/// need not have been a jbd-client: the replay answers each request wherever it is in
/// the capture, so the client's 0x03/0x04 find their captured answers.
fn jbd_capture_client(devices: &[crate::link::recognise::CapturedDevice]) -> Result<crate::link::recognise::CaptureClient, String> {
    let d = one_bms(devices)?;
    let p = JbdPolls::of(d);
    let (mut steps, mut seen) = (Vec::new(), Vec::new());
    p.error_steps(&mut steps, &mut seen);
    let fields = [("soc_pct", None), ("pack_v", Some(0.005)), ("current_a", Some(0.005)), ("cell_count", None), ("cell_min_mv", None), ("cell_max_mv", None), ("temp1_c", Some(0.05))];
    p.reading_steps(&fields, &mut steps, &mut seen);
    p.flag_steps(&mut steps, &mut seen);
    let notes = vec![capture_note(&d.name, &p, &seen)];
    Ok(crate::link::recognise::CaptureClient { client: jbd_client_entry(&d.name), steps, notes })
}

/// The captured BMS as a simulated jbd-bms (`capture import --as-state`): its pack size,
/// capacity, firmware identity and profile from the last good basic info, its SoC,
/// current, temperatures, cycles and FETs as state, its cells pinned by a set step, and
/// bad_checksum and drop faults on its answers at the captured share of the requests.
/// Error statuses and protection flags are noted, not reproduced (the model raises its
/// own protections from its state).
fn jbd_capture_model(devices: &[crate::link::recognise::CapturedDevice]) -> Result<super::CaptureModel, String> {
    let d = one_bms(devices)?;
    let p = JbdPolls::of(d);
    let (mut steps, mut seen) = (Vec::new(), Vec::new());
    let (entry, set) = bms_model_entry(&d.name, &p)?;
    steps.extend(set);
    let share = |n: usize| n as f64 / (p.requests as f64).max(1.0);
    for (n, kind) in [(p.bad, "bad_checksum"), (p.silent, "drop")] {
        if n > 0 {
            let how = if n as u64 >= p.requests { "always: true".to_string() } else { format!("probability: {:.2}", share(n)) };
            steps.push(format!("fault: {{ link: {}, kind: {kind}, direction: response, {how} }}", d.name));
        }
    }
    let mut checks = Vec::new();
    p.error_steps(&mut checks, &mut seen);
    // The cells are pinned and the temperatures and current set; the pack voltage is the
    // cells' sum, so it is checked only where the captured one was too.
    let sums = match (&p.basic, &p.cells) {
        (Some(b), Some(c)) => c.cells_mv.iter().map(|&mv| u32::from(mv)).sum::<u32>().abs_diff(u32::from(b.voltage_10mv) * 10) < 10,
        _ => false,
    };
    let mut fields = vec![("soc_pct", None), ("current_a", Some(0.005)), ("cell_count", None), ("cell_min_mv", None), ("cell_max_mv", None), ("temp1_c", Some(0.05))];
    if sums {
        fields.insert(1, ("pack_v", Some(0.005)));
    }
    p.reading_steps(&fields, &mut checks, &mut seen);
    // The faults reproduce the bad checksums and the silences, nothing else.
    steps.extend(checks.into_iter().filter(|s| !s.starts_with("expect_errors") || s.contains("kind: checksum") || s.contains("kind: timeout")));
    if p.status + p.torn > 0 {
        seen.push("its error statuses and unusable answers are not reproduced".into());
    }
    if let Some(b) = p.basic.as_ref().filter(|b| b.protection != 0) {
        seen.push(format!("its protection flags ({}) are not pinned: the model raises its own", b.protection_names().join(", ")));
    }
    let client = crate::link::recognise::CaptureClient { client: jbd_client_entry(&d.name), steps, notes: vec![capture_note(&d.name, &p, &seen)] };
    Ok(super::CaptureModel { devices: vec![entry], client })
}

/// A jbd-bms entry in the state of the last good basic info, and the step pinning the
/// last good cell voltages.
fn bms_model_entry(name: &str, p: &JbdPolls) -> Result<(String, Vec<String>), String> {
    let mut keys = Vec::new();
    let mut extra = String::new();
    if let Some(b) = &p.basic {
        let cells = usize::from(b.cell_count);
        if !(4..=24).contains(&cells) || !(1..=6).contains(&b.ntc_deci_kelvin.len()) {
            return Err(format!("{name}: the captured pack has {cells} cells and {} NTCs; a jbd-bms has 4..=24 and 1..=6", b.ntc_deci_kelvin.len()));
        }
        extra = format!(", cells: {cells}, ntc: {}", b.ntc_deci_kelvin.len());
        if b.nominal_10mah > 0 {
            extra.push_str(&format!(", capacity_ah: {}", f64::from(b.nominal_10mah) / 100.0));
        }
        if !b.extra.is_empty() {
            extra.push_str(", profile: chins");
        }
        keys.push(format!("soc: {}", b.rsoc_pct.min(100)));
        keys.push(format!("current_a: {}", f64::from(b.current_10ma) / 100.0));
        keys.extend(b.temps_c().iter().enumerate().map(|(i, c)| format!("temp{}_c: {}", i + 1, c.clamp(-40.0, 120.0))));
        keys.push(format!("cycles: {}", b.cycles));
        keys.push(format!("software_version: {}", b.software_version));
        let date = b.date();
        keys.push(format!("production_date: {:04}{:02}{:02}", date.year, date.month.clamp(1, 12), date.day.clamp(1, 31)));
        keys.push(format!("charge_fet: {}", u8::from(b.fet & crate::protocol::jbd::FET_CHARGE != 0)));
        keys.push(format!("discharge_fet: {}", u8::from(b.fet & crate::protocol::jbd::FET_DISCHARGE != 0)));
    }
    // Without a basic info the cell answer sizes the pack; with one, it pins its cells.
    let count = p.basic.as_ref().map(|b| usize::from(b.cell_count));
    if let (None, Some(c)) = (count, &p.cells) {
        if !(4..=24).contains(&c.cells_mv.len()) {
            return Err(format!("{name}: the captured pack has {} cells; a jbd-bms has 4..=24", c.cells_mv.len()));
        }
        extra = format!(", cells: {}", c.cells_mv.len());
    }
    let set = p
        .cells
        .as_ref()
        .filter(|c| !c.cells_mv.is_empty())
        .map(|c| {
            let pinned = c.cells_mv.iter().take(count.unwrap_or(usize::MAX)).enumerate();
            let pins: Vec<String> = pinned.map(|(i, mv)| format!("cell{}_mv: {}", i + 1, mv.min(&5000))).collect();
            format!("set: {{ device: {name}, state: {{ {} }} }}", pins.join(", "))
        })
        .into_iter()
        .collect();
    let state = if keys.is_empty() { String::new() } else { format!(", state: {{ {} }}", keys.join(", ")) };
    Ok((format!("{{ name: {name}, kind: {}{extra}{state} }}", JbdBmsKind.name()), set))
}
