//! The JBD / Xiaoxiang smart BMS as a sans-IO state machine: bytes a central wrote to
//! characteristic 0xFF02 and the current time in, whole response frames out (the GATT
//! layer splits them into ATT_MTU − 3 notifications on 0xFF01). The battery behind it is
//! the shared [`PackModel`]; MOS control, factory mode, EEPROM reads, 0x0A actions and
//! the PIN handshake are the firmware's.
//!
//! The GATT shell calls [`JbdBms::connected`] / [`JbdBms::disconnected`] around a link,
//! [`JbdBms::handle_write`] for every write, and [`JbdBms::tick`] at
//! [`JbdBms::poll_timeout`] (or on its own clock) so the physics run and a half-received
//! request times out. [`JbdBms::rejects_write_request`] says whether write-with-response
//! must be refused. [`JbdBms::take_events`] explains silences and state changes.
//!
//! Input handling, like the firmware's UART receiver: bytes are buffered across writes
//! until `4 + len + 3` bytes of a `DD` frame are there; bytes before a `DD` (or, with the
//! PIN profile, `FF AA`) are dropped; a frame that does not end in `77` or has a bad op is
//! dropped in silence; a partial frame older than [`RX_TIMEOUT`] is dropped. A request
//! arriving while an earlier one is still partial is read as the rest of that one (the
//! firmware has no way to tell), which garbles both. A well-framed request with a bad
//! checksum gets the error reply (status 0x80).
//!
//! Choices where the reference is silent (each a guess a capture could overturn):
//! unknown registers, writes to read registers, EEPROM writes and factory-mode reads
//! outside factory mode get the error reply; "clear alarm" (0x0A `04 00`) zeroes the
//! error counters; "reset SoC" re-estimates SoC from the rest voltage on the OCV curve;
//! "auto-balance" sets the EEPROM balance-enable bits (the model balances regardless);
//! Chins' 7 extra bytes are sent as zeros (their meaning is not in the reference);
//! EEPROM registers the model has no value for (0x30, 0x31, 0x36..=0x39) read 0.

use std::collections::VecDeque;
use std::str::FromStr;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::{PackConfig, PackModel, PackSnapshot};
use crate::protocol::jbd::{
    self, protection, reg, Action, BasicInfo, CellVoltages, ErrorCounters, FactoryCommand,
    FrameLength, HardwareVersion, JbdError, Malformation, MosControl, Op, PinFrame, ProductionDate,
};

/// A partial request older than this is dropped (the firmware's receive timeout).
pub const RX_TIMEOUT: Duration = Duration::from_secs(1);
/// Events kept for [`JbdBms::take_events`]; older ones are dropped first.
const MAX_EVENTS: usize = 1024;

/// Firmware variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JbdProfile {
    #[default]
    Standard,
    /// Write-with-response to 0xFF02 is rejected (the GATT layer reads
    /// [`JbdBms::rejects_write_request`]); write-without-response works.
    RejectsWriteRequest,
    /// Chins packs: 7 extra bytes after the temperatures in 0x03.
    Chins,
    /// Newer Bluetooth module: nothing answers until the PIN handshake succeeded.
    Pin,
}

impl JbdProfile {
    pub const ALL: &'static [(&'static str, &'static str)] = &[
        ("standard", "JBD firmware as documented"),
        ("rejects-write-request", "write-with-response to 0xFF02 is rejected (field fault 7)"),
        ("chins", "Chins packs: 0x03 carries 7 extra bytes (length 0x22 with 2 NTCs)"),
        ("pin", "PIN-protected module: FF AA handshake (app key, random byte, password) first (field fault 10)"),
    ];
}

impl FromStr for JbdProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "standard" => Ok(JbdProfile::Standard),
            "rejects-write-request" => Ok(JbdProfile::RejectsWriteRequest),
            "chins" => Ok(JbdProfile::Chins),
            "pin" => Ok(JbdProfile::Pin),
            o => {
                let names: Vec<_> = Self::ALL.iter().map(|p| p.0).collect();
                Err(format!(
                    "unknown JBD profile `{o}` (known: {})",
                    names.join(", ")
                ))
            }
        }
    }
}

/// Device-side misbehaviour seen in the field, reproduced on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JbdQuirk {
    /// Field fault 5: one answer per connection, then silence until the next connection.
    SilentAfterFirstAnswer,
    /// Field fault 8: factory-mode enter is acted on but never acknowledged.
    FactoryEnterNoReply,
    /// Field fault 9: balance bits MSB first (bit 15 of each word = its first cell).
    BalanceBitsMsbFirst,
    /// Field fault 9: the two balance words swapped (cells 17-32 in bytes 12-13).
    BalanceWordsSwapped,
    /// Field fault 11: a foreign `FE …` frame goes out before every response.
    ForeignFrames,
    /// Field fault 2: 0x04 replies lose the second half of their data but keep the
    /// length byte and still end in `77`.
    TruncatedCellVoltages,
    /// Field fault 3: the first data byte of 0x03/0x04 replies is garbled after the
    /// checksum was computed (garbage values for clients that do not check).
    CorruptedData,
}

impl JbdQuirk {
    pub const ALL: &'static [(&'static str, &'static str)] = &[
        (
            "silent_after_first_answer",
            "one answer per connection, then silence (field fault 5)",
        ),
        (
            "factory_enter_no_reply",
            "factory-mode enter acted on but never acknowledged (field fault 8)",
        ),
        (
            "balance_bits_msb_first",
            "balance bits MSB first within each word (field fault 9)",
        ),
        (
            "balance_words_swapped",
            "balance words swapped: cells 17-32 first (field fault 9)",
        ),
        (
            "foreign_frames",
            "a foreign FE… frame before every response (field fault 11)",
        ),
        (
            "truncated_cell_voltages",
            "0x04 replies truncated but still ending in 77 (field fault 2)",
        ),
        (
            "corrupted_data",
            "first data byte of 0x03/0x04 garbled, checksum not updated (field fault 3)",
        ),
    ];
}

impl FromStr for JbdQuirk {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| {
            let names: Vec<_> = Self::ALL.iter().map(|q| q.0).collect();
            format!("unknown JBD quirk `{s}` (known: {})", names.join(", "))
        })
    }
}

/// What the BMS says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JbdIdentity {
    /// 0x05 and 0xA2; at most 31 printable ASCII characters. None: a JBD-style name
    /// for the pack's cell count, e.g. `JBD-SP16S020-L16S-200A-B-U`.
    pub model: Option<String>,
    /// 0xA0.
    pub manufacturer: String,
    /// 0xA1.
    pub barcode: String,
    pub production_date: (u16, u8, u8),
    pub software_version: u8,
    /// EEPROM 0x16.
    pub serial: u16,
}

impl Default for JbdIdentity {
    fn default() -> Self {
        JbdIdentity {
            model: None,
            manufacturer: "JBD".into(),
            barcode: "JBD0000000001".into(),
            production_date: (2024, 3, 15),
            software_version: 0x80,
            serial: 1,
        }
    }
}

/// Construction parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JbdConfig {
    pub pack: PackConfig,
    pub profile: JbdProfile,
    pub quirks: Vec<JbdQuirk>,
    pub identity: JbdIdentity,
    /// The module's Bluetooth address as printed (MSB first); the PIN password is
    /// encrypted with it.
    pub ble_address: [u8; 6],
    /// PIN profile: app key (cmd 0x15) and user password (cmd 0x18), ASCII.
    pub app_key: String,
    pub password: String,
    /// Seeds the PIN random byte, so runs replay exactly.
    pub seed: u64,
}

impl Default for JbdConfig {
    fn default() -> Self {
        JbdConfig {
            pack: PackConfig::default(),
            profile: JbdProfile::Standard,
            quirks: Vec::new(),
            identity: JbdIdentity::default(),
            ble_address: [0xA4, 0xC1, 0x38, 0x00, 0x00, 0x01],
            app_key: "000000".into(),
            password: "123456".into(),
            seed: 0,
        }
    }
}

/// JBD-specific state keys for [`JbdBms::set`] (the model's keys work too).
pub const JBD_STATE_KEYS: &[(&str, &str)] = &[
    ("factory_mode", "0 = normal, 1 = factory mode (EEPROM, strings and 0xAA readable)"),
    ("software_version", "0x03 byte 18, 0..=255"),
    ("production_date", "production date as YYYYMMDD (2000..=2127)"),
    ("afe_error", "front-end IC error, protection bit 11: 0 or 1"),
    ("silent", "1 = the BMS stops answering (field fault 5 after minutes of good reads), 0 = answers again"),
];

/// What happened inside, for observation logs. Never sent on the air.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum JbdEvent {
    /// A request got no answer, and why.
    Silent {
        reason: String,
    },
    /// Bytes that could not start a frame were dropped.
    Garbage {
        bytes: usize,
    },
    /// A partial request timed out.
    PartialDropped {
        bytes: usize,
    },
    FactoryMode {
        on: bool,
    },
    /// Factory mode left with `28 28`: saved, error counters cleared.
    Saved,
    Mos {
        charge_off: bool,
        discharge_off: bool,
    },
    Action(Action),
    PinAccepted,
    PinRefused {
        cmd: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PinState {
    NeedAppKey,
    AppKeyOk,
    Authenticated,
}

/// The model's fault names → 0xAA counter index.
fn counter_index(fault: &str) -> Option<usize> {
    let name = if fault == "discharge_sc" {
        "short_circuit"
    } else {
        fault
    };
    jbd::ERROR_COUNTER_NAMES.iter().position(|n| *n == name)
}

/// The model's fault names → protection bits (mos_ot has no JBD bit).
fn protection_bit(fault: &str) -> u16 {
    match fault {
        "cell_ov" => protection::CELL_OV,
        "cell_uv" => protection::CELL_UV,
        "pack_ov" => protection::PACK_OV,
        "pack_uv" => protection::PACK_UV,
        "charge_ot" => protection::CHARGE_OT,
        "charge_ut" => protection::CHARGE_UT,
        "discharge_ot" => protection::DISCHARGE_OT,
        "discharge_ut" => protection::DISCHARGE_UT,
        "charge_oc" => protection::CHARGE_OC,
        "discharge_oc" => protection::DISCHARGE_OC,
        "discharge_sc" => protection::SHORT_CIRCUIT,
        _ => 0,
    }
}

fn sat_u16(x: f64) -> u16 {
    if x.is_nan() {
        0
    } else {
        x.round().clamp(0.0, f64::from(u16::MAX)) as u16
    }
}

fn sat_i16(x: f64) -> i16 {
    if x.is_nan() {
        0
    } else {
        x.round().clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16
    }
}

fn deci_kelvin(c: f64) -> u16 {
    sat_u16(c * 10.0 + f64::from(jbd::ZERO_C_DECI_KELVIN))
}

pub struct JbdBms {
    /// What 0x05 and 0xA2 say.
    pub model_name: String,
    pub profile: JbdProfile,
    pub quirks: Vec<JbdQuirk>,
    pub identity: JbdIdentity,
    ble_address: [u8; 6],
    app_key: Vec<u8>,
    password: Vec<u8>,
    model: PackModel,
    clock: Option<Duration>,
    rx: Vec<u8>,
    /// When the oldest byte of a partial frame in `rx` arrived.
    rx_since: Option<Duration>,
    factory_mode: bool,
    afe_error: bool,
    silent: bool,
    func_config: u16,
    counters: [u16; jbd::ERROR_COUNTER_WORDS],
    /// Protections at the last counter update (rising edges count).
    seen_protections: Vec<&'static str>,
    answers_this_connection: u32,
    pin: PinState,
    pin_random: Option<u8>,
    rng: ChaCha8Rng,
    events: VecDeque<JbdEvent>,
}

impl JbdBms {
    pub fn new(config: JbdConfig) -> Result<Self, String> {
        let JbdConfig {
            pack,
            profile,
            quirks,
            mut identity,
            ble_address,
            app_key,
            password,
            seed,
        } = config;
        let model_name = identity
            .model
            .take()
            .unwrap_or_else(|| format!("JBD-SP{c:02}S020-L{c}S-200A-B-U", c = pack.cells));
        HardwareVersion {
            model: model_name.clone(),
        }
        .encode()
        .map_err(|e| format!("identity.model `{model_name}`: {e}"))?;
        identity.model = Some(model_name.clone());
        for (what, s) in [
            ("manufacturer", &identity.manufacturer),
            ("barcode", &identity.barcode),
        ] {
            jbd::encode_string(s).map_err(|e| format!("identity.{what} `{s}`: {e}"))?;
        }
        if password.len() != 6 {
            return Err(format!(
                "password must be 6 characters (the module encrypts 6), got {}",
                password.len()
            ));
        }
        let model = PackModel::new(pack).map_err(|e| e.to_string())?;
        let mut bms = JbdBms {
            model_name,
            profile,
            quirks,
            identity,
            ble_address,
            app_key: app_key.into_bytes(),
            password: password.into_bytes(),
            model,
            clock: None,
            rx: Vec::with_capacity(jbd::MAX_FRAME),
            rx_since: None,
            factory_mode: false,
            afe_error: false,
            silent: false,
            // bit 2 balance enable, bit 3 charge-balance enable: on from the factory.
            func_config: 0b1100,
            counters: [0; jbd::ERROR_COUNTER_WORDS],
            seen_protections: Vec::new(),
            answers_this_connection: 0,
            pin: PinState::NeedAppKey,
            pin_random: None,
            rng: ChaCha8Rng::seed_from_u64(seed),
            events: VecDeque::new(),
        };
        bms.count_protections();
        Ok(bms)
    }

    pub fn model(&self) -> &PackModel {
        &self.model
    }
    pub fn snapshot(&self) -> PackSnapshot {
        self.model.snapshot()
    }
    pub fn factory_mode(&self) -> bool {
        self.factory_mode
    }
    pub fn error_counters(&self) -> &[u16] {
        &self.counters
    }
    /// Bytes of a partial request held across writes.
    pub fn pending_input(&self) -> usize {
        self.rx.len()
    }
    /// The GATT layer refuses write-with-response on 0xFF02 when this is true.
    pub fn rejects_write_request(&self) -> bool {
        self.profile == JbdProfile::RejectsWriteRequest
    }
    /// True once the PIN handshake succeeded (always true without the PIN profile).
    pub fn authenticated(&self) -> bool {
        self.profile != JbdProfile::Pin || self.pin == PinState::Authenticated
    }
    fn has(&self, q: JbdQuirk) -> bool {
        self.quirks.contains(&q)
    }

    /// Drains what happened since the last call.
    pub fn take_events(&mut self) -> Vec<JbdEvent> {
        self.events.drain(..).collect()
    }

    fn event(&mut self, e: JbdEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// A central connected: a new session (PIN state, silence quirk, receive buffer).
    pub fn connected(&mut self, now: Duration) {
        self.tick(now);
        self.new_session();
    }

    /// The central went away.
    pub fn disconnected(&mut self, now: Duration) {
        self.tick(now);
        self.new_session();
    }

    fn new_session(&mut self) {
        self.rx.clear();
        self.rx_since = None;
        self.answers_this_connection = 0;
        self.pin = PinState::NeedAppKey;
        self.pin_random = None;
    }

    /// When [`tick`](Self::tick) must run next for a partial request to time out.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.rx_since.map(|t| t.saturating_add(RX_TIMEOUT))
    }

    /// Lets the physics run up to `now` and drops a timed-out partial request.
    pub fn tick(&mut self, now: Duration) {
        if let Some(last) = self.clock {
            if now > last {
                self.model.advance(now - last);
                self.count_protections();
            }
        }
        self.clock = Some(now.max(self.clock.unwrap_or_default()));
        if let Some(since) = self.rx_since {
            if now.saturating_sub(since) >= RX_TIMEOUT {
                let bytes = self.rx.len();
                self.rx.clear();
                self.rx_since = None;
                self.event(JbdEvent::PartialDropped { bytes });
            }
        }
    }

    /// Rising edges of protections count in 0xAA.
    fn count_protections(&mut self) {
        let now = self.model.snapshot().protections;
        for f in &now {
            if !self.seen_protections.contains(f) {
                if let Some(i) = counter_index(f) {
                    self.counters[i] = self.counters[i].saturating_add(1);
                }
            }
        }
        self.seen_protections = now;
    }

    /// Sets a state key: [`JBD_STATE_KEYS`] or any of the model's.
    pub fn set(&mut self, key: &str, value: f64) -> Result<(), String> {
        let flag = |v: f64| {
            if v == 0.0 || v == 1.0 {
                Ok(v == 1.0)
            } else {
                Err(format!("`{key}` = {value}: allowed 0 or 1"))
            }
        };
        match key {
            "factory_mode" => self.factory_mode = flag(value)?,
            "afe_error" => self.afe_error = flag(value)?,
            "silent" => self.silent = flag(value)?,
            "software_version" => {
                if !(0.0..=255.0).contains(&value) || value.fract() != 0.0 {
                    return Err(format!("`{key}` = {value}: allowed an integer 0..=255"));
                }
                self.identity.software_version = value as u8;
            }
            "production_date" => {
                let bad = || format!("`{key}` = {value}: allowed YYYYMMDD with year 2000..=2127");
                if !(20_000_101.0..=21_271_231.0).contains(&value) || value.fract() != 0.0 {
                    return Err(bad());
                }
                let v = value as u32;
                let (y, m, d) = ((v / 10_000) as u16, (v / 100 % 100) as u8, (v % 100) as u8);
                if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
                    return Err(bad());
                }
                self.identity.production_date = (y, m, d);
            }
            _ => {
                self.model.set(key, value).map_err(|e| e.to_string())?;
                self.count_protections();
            }
        }
        Ok(())
    }

    /// Bytes a central wrote to 0xFF02 at `now`; returns the whole frames to notify on
    /// 0xFF01, in order (often none: waiting for more bytes, or silence).
    pub fn handle_write(&mut self, bytes: &[u8], now: Duration) -> Vec<Vec<u8>> {
        self.tick(now);
        self.rx.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut garbage = 0;
        while let Some(&first) = self.rx.first() {
            let pin_start = self.profile == JbdProfile::Pin
                && first == jbd::PIN_START[0]
                && self.rx.get(1).is_none_or(|&b| b == jbd::PIN_START[1]);
            let length = if first == jbd::START {
                jbd::frame_length(&self.rx)
            } else if pin_start {
                jbd::pin_frame_length(&self.rx)
            } else {
                self.rx.remove(0);
                garbage += 1;
                continue;
            };
            let FrameLength::Complete(n) = length else {
                break;
            };
            let frame: Vec<u8> = self.rx.drain(..n).collect();
            if pin_start {
                self.handle_pin(&frame, &mut out);
            } else {
                self.handle_frame(&frame, &mut out);
            }
        }
        if garbage > 0 {
            self.event(JbdEvent::Garbage { bytes: garbage });
        }
        self.rx_since = if self.rx.is_empty() {
            None
        } else {
            Some(self.rx_since.unwrap_or(now))
        };
        out
    }

    fn silent_because(&mut self, reason: impl Into<String>) {
        self.event(JbdEvent::Silent {
            reason: reason.into(),
        });
    }

    fn handle_frame(&mut self, frame: &[u8], out: &mut Vec<Vec<u8>>) {
        if !self.authenticated() {
            return self.silent_because("PIN handshake not done");
        }
        if self.silent {
            return self.silent_because("`silent` is set");
        }
        if self.has(JbdQuirk::SilentAfterFirstAnswer) && self.answers_this_connection > 0 {
            return self.silent_because(
                "quirk silent_after_first_answer: already answered on this connection",
            );
        }
        let reply = match jbd::decode_request(frame) {
            Ok(req) => self.answer(&req),
            Err(JbdError::BadChecksum { reg, .. }) => Some(jbd::encode_error(reg)),
            Err(e) => return self.silent_because(format!("undecodable request: {e}")),
        };
        let Some(reply) = reply else { return };
        if self.has(JbdQuirk::ForeignFrames) {
            let t = (self.model.uptime_s() as u32).to_be_bytes();
            out.push(vec![0xFE, 0x01, 0x04, t[0], t[1], t[2], t[3], jbd::END]);
        }
        out.push(reply);
        self.answers_this_connection = self.answers_this_connection.saturating_add(1);
    }

    /// The reply to a decoded request, or None for a deliberate silence.
    fn answer(&mut self, req: &jbd::JbdRequest) -> Option<Vec<u8>> {
        let r = req.reg;
        let error = Some(jbd::encode_error(r));
        let ok = |data: Result<Vec<u8>, JbdError>| match data {
            Ok(d) => Some(
                jbd::encode_response(r, jbd::STATUS_OK, &d)
                    .unwrap_or_else(|_| jbd::encode_error(r)),
            ),
            Err(_) => Some(jbd::encode_error(r)),
        };
        match (req.op, r) {
            (Op::Read, reg::BASIC_INFO) => {
                let f = ok(self.basic_info().encode())?;
                Some(self.garble(f))
            }
            (Op::Read, reg::CELL_VOLTAGES) => {
                let f = ok(CellVoltages {
                    cells_mv: self.model.snapshot().cells_mv,
                }
                .encode())?;
                let f = if self.has(JbdQuirk::TruncatedCellVoltages) {
                    let keep = (f.len() - jbd::OVERHEAD) / 2;
                    jbd::malform(&f, Malformation::Truncated { keep })
                } else {
                    f
                };
                Some(self.garble(f))
            }
            (Op::Read, reg::HARDWARE_VERSION) => ok(HardwareVersion {
                model: self.model_name.clone(),
            }
            .encode()),
            (Op::Write, reg::MOS_CONTROL) => {
                let Ok(m) = MosControl::decode(&req.data) else {
                    return error;
                };
                self.model.set_fet_command(!m.charge_off, !m.discharge_off);
                self.count_protections();
                self.event(JbdEvent::Mos {
                    charge_off: m.charge_off,
                    discharge_off: m.discharge_off,
                });
                Some(jbd::encode_ack(r))
            }
            (Op::Write, reg::FACTORY_ENTER | reg::FACTORY_EXIT) => {
                let Ok(cmd) = FactoryCommand::decode(r, &req.data) else {
                    return error;
                };
                match cmd {
                    FactoryCommand::Enter => {
                        self.factory_mode = true;
                        self.event(JbdEvent::FactoryMode { on: true });
                        if self.has(JbdQuirk::FactoryEnterNoReply) {
                            self.silent_because("quirk factory_enter_no_reply");
                            return None;
                        }
                    }
                    FactoryCommand::Exit => {
                        self.factory_mode = false;
                        self.event(JbdEvent::FactoryMode { on: false });
                    }
                    FactoryCommand::ExitSave => {
                        self.factory_mode = false;
                        self.counters = [0; jbd::ERROR_COUNTER_WORDS];
                        self.event(JbdEvent::FactoryMode { on: false });
                        self.event(JbdEvent::Saved);
                    }
                }
                Some(jbd::encode_ack(r))
            }
            (Op::Write, reg::ACTION) => {
                let Ok(a) = Action::decode(&req.data) else {
                    return error;
                };
                match a {
                    Action::ResetSoc => {
                        let soc = self.rest_soc_estimate();
                        // In range by construction; an error would leave the SoC as it was.
                        let _ = self.model.set("soc", soc);
                        self.count_protections();
                    }
                    Action::ClearAlarm => self.counters = [0; jbd::ERROR_COUNTER_WORDS],
                    Action::AutoBalance => self.func_config |= 0b1100,
                }
                self.event(JbdEvent::Action(a));
                Some(jbd::encode_ack(r))
            }
            (Op::Read, r) if reg::is_eeprom(r) && self.factory_mode => {
                ok(Ok(self.eeprom(r).to_be_bytes().to_vec()))
            }
            (Op::Read, r) if reg::is_string(r) && self.factory_mode => {
                let s = match r {
                    reg::MANUFACTURER => &self.identity.manufacturer,
                    reg::BARCODE => &self.identity.barcode,
                    _ => &self.model_name,
                };
                ok(jbd::encode_string(s))
            }
            (Op::Read, reg::ERROR_COUNTERS) if self.factory_mode => ok(ErrorCounters {
                counts: self.counters.to_vec(),
            }
            .encode()),
            _ => error,
        }
    }

    fn garble(&self, f: Vec<u8>) -> Vec<u8> {
        if self.has(JbdQuirk::CorruptedData) {
            jbd::malform(
                &f,
                Malformation::CorruptData {
                    index: 0,
                    mask: 0x80,
                },
            )
        } else {
            f
        }
    }

    /// What 0x03 carries right now.
    pub fn basic_info(&self) -> BasicInfo {
        let s = self.model.snapshot();
        let mut prot = s.protections.iter().fold(0, |a, f| a | protection_bit(f));
        if self.afe_error {
            prot |= protection::FRONT_END_IC;
        }
        if self.model.fet_command() != (true, true) {
            prot |= protection::SOFTWARE_LOCK;
        }
        let (mut lo, mut hi) = (s.balancing as u16, (s.balancing >> 16) as u16);
        if self.has(JbdQuirk::BalanceBitsMsbFirst) {
            (lo, hi) = (lo.reverse_bits(), hi.reverse_bits());
        }
        if self.has(JbdQuirk::BalanceWordsSwapped) {
            (lo, hi) = (hi, lo);
        }
        let (y, m, d) = self.identity.production_date;
        BasicInfo {
            voltage_10mv: (s.pack_mv / 10).min(u32::from(u16::MAX)) as u16,
            current_10ma: sat_i16(s.current_a * 100.0),
            remaining_10mah: sat_u16(s.remaining_ah * 100.0),
            nominal_10mah: sat_u16(s.capacity_ah * 100.0),
            cycles: s.cycles.min(u32::from(u16::MAX)) as u16,
            production_date: ProductionDate {
                year: y,
                month: m,
                day: d,
            }
            .raw(),
            balance: u32::from(lo) | u32::from(hi) << 16,
            protection: prot,
            software_version: self.identity.software_version,
            rsoc_pct: s.soc_pct.round().clamp(0.0, 100.0) as u8,
            fet: (u8::from(s.charge_fet) * jbd::FET_CHARGE)
                | (u8::from(s.discharge_fet) * jbd::FET_DISCHARGE),
            cell_count: s.cells_mv.len() as u8,
            ntc_deci_kelvin: s.temps_c.iter().map(|&t| deci_kelvin(t)).collect(),
            extra: if self.profile == JbdProfile::Chins {
                vec![0; jbd::CHINS_EXTRA]
            } else {
                Vec::new()
            },
        }
    }

    /// SoC whose open-circuit voltage matches the mean cell voltage minus I·R.
    fn rest_soc_estimate(&self) -> f64 {
        let cfg = self.model.config();
        let v = self.model.cell_voltages_v();
        let rest = v.iter().sum::<f64>() / v.len().max(1) as f64
            - self.model.current_a() * cfg.cell_resistance_mohm / 1000.0;
        let (mut lo, mut hi) = (0.0, 100.0);
        for _ in 0..40 {
            let mid = (lo + hi) / 2.0;
            if cfg.chemistry.ocv_v(mid) < rest {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        ((lo + hi) / 2.0).clamp(0.0, 100.0)
    }

    /// An EEPROM parameter (0x10..=0x3F), from the model's configuration.
    pub fn eeprom(&self, r: u8) -> u16 {
        let cfg = self.model.config();
        let t = &cfg.thresholds;
        let cells = cfg.cells as f64;
        let mv = |v: f64| sat_u16(v * 1000.0);
        let pack_10mv = |per_cell: f64| sat_u16(per_cell * cells * 100.0);
        let ocv = |soc: f64| mv(cfg.chemistry.ocv_v(soc));
        let (y, m, d) = self.identity.production_date;
        match r {
            0x10 => sat_u16(self.model.capacity_ah() * 100.0),
            0x11 => sat_u16(self.model.full_capacity_ah() * 100.0),
            0x12 => ocv(100.0),
            0x32 => ocv(80.0),
            0x33 => ocv(60.0),
            0x34 => ocv(40.0),
            0x35 => ocv(20.0),
            0x13 => ocv(0.0),
            0x15 => ProductionDate {
                year: y,
                month: m,
                day: d,
            }
            .raw(),
            0x16 => self.identity.serial,
            0x17 => self.model.cycles().min(u32::from(u16::MAX)) as u16,
            0x18 => deci_kelvin(t.charge_ot.protection.trip),
            0x19 => deci_kelvin(t.charge_ot.protection.release),
            0x1A => deci_kelvin(t.charge_ut.protection.trip),
            0x1B => deci_kelvin(t.charge_ut.protection.release),
            0x1C => deci_kelvin(t.discharge_ot.protection.trip),
            0x1D => deci_kelvin(t.discharge_ot.protection.release),
            0x1E => deci_kelvin(t.discharge_ut.protection.trip),
            0x1F => deci_kelvin(t.discharge_ut.protection.release),
            0x20 => pack_10mv(t.pack_ov.protection.trip),
            0x21 => pack_10mv(t.pack_ov.protection.release),
            0x22 => pack_10mv(t.pack_uv.protection.trip),
            0x23 => pack_10mv(t.pack_uv.protection.release),
            0x24 => mv(t.cell_ov.protection.trip),
            0x25 => mv(t.cell_ov.protection.release),
            0x26 => mv(t.cell_uv.protection.trip),
            0x27 => mv(t.cell_uv.protection.release),
            0x28 => sat_i16(t.charge_oc.protection.trip * 100.0) as u16,
            0x29 => sat_i16(-t.discharge_oc.protection.trip * 100.0) as u16,
            0x2A => mv(t.balance_start_v),
            0x2B => mv(t.balance_delta_v),
            // Shunt 1 mΩ in 0.1 mΩ.
            0x2C => 10,
            reg::FUNC_CONFIG => self.func_config,
            reg::NTC_CONFIG => (1u16 << cfg.ntc.min(15)) - 1,
            reg::CELL_COUNT => cfg.cells as u16,
            // Release delays, s: byte 0 under-, byte 1 over-condition.
            0x3A..=0x3D => 0x0202,
            // Over-current: byte 0 delay, byte 1 release, s.
            0x3E | 0x3F => 0x0220,
            _ => 0,
        }
    }

    fn handle_pin(&mut self, frame: &[u8], out: &mut Vec<Vec<u8>>) {
        let f = match PinFrame::decode(frame) {
            Ok(f) => f,
            Err(e) => return self.silent_because(format!("undecodable PIN frame: {e}")),
        };
        let reply = |cmd, data: Vec<u8>| PinFrame { cmd, data }.encode().unwrap_or_default();
        match f.cmd {
            jbd::PIN_APP_KEY => {
                let ok = f.data == self.app_key;
                if ok {
                    self.pin = self.pin.max_with(PinState::AppKeyOk);
                } else {
                    self.event(JbdEvent::PinRefused { cmd: f.cmd });
                }
                out.push(reply(
                    f.cmd,
                    vec![if ok { jbd::PIN_OK } else { jbd::PIN_REFUSED }],
                ));
            }
            jbd::PIN_RANDOM => {
                let r: u8 = self.rng.gen();
                self.pin_random = Some(r);
                out.push(reply(f.cmd, vec![r]));
            }
            jbd::PIN_PASSWORD => {
                let expected = self
                    .pin_random
                    .map(|r| jbd::pin_encrypt_password(&self.password, self.ble_address, r));
                let ok =
                    self.pin != PinState::NeedAppKey && expected.as_deref() == Some(&f.data[..]);
                if ok {
                    self.pin = PinState::Authenticated;
                    self.event(JbdEvent::PinAccepted);
                } else {
                    self.event(JbdEvent::PinRefused { cmd: f.cmd });
                }
                out.push(reply(
                    f.cmd,
                    vec![if ok { jbd::PIN_OK } else { jbd::PIN_REFUSED }],
                ));
            }
            other => self.silent_because(format!("PIN command 0x{other:02X} not supported")),
        }
    }
}

impl PinState {
    /// Never step back (a repeated app key after authentication keeps the session).
    fn max_with(self, other: PinState) -> PinState {
        if self == PinState::Authenticated {
            self
        } else {
            other
        }
    }
}


impl crate::sans_io::SansIoCore for JbdBms {
    type Event = JbdEvent;

    fn handle_input(&mut self, input: crate::sans_io::Input<'_>, now: Duration, out: &mut Vec<crate::sans_io::Output<JbdEvent>>) -> Result<(), String> {
        use crate::sans_io::{Input, Output};
        let result = match input {
            Input::Bytes { from, bytes } => {
                out.extend(self.handle_write(bytes, now).into_iter().map(|f| Output::Send { to: from, bytes: f }));
                Ok(())
            }
            Input::Connected(_) => Ok(self.connected(now)),
            Input::Disconnected(_) => Ok(self.disconnected(now)),
            Input::Set { key, value } => {
                self.tick(now);
                self.set(key, value)
            }
            Input::Timeout => Ok(self.tick(now)),
        };
        out.extend(self.take_events().into_iter().map(Output::Event));
        result
    }

    /// When a partial request times out; the physics catch up on every input.
    fn next_wakeup(&self) -> Option<Duration> {
        self.poll_timeout()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::jbd::{decode_response, encode_read, Assembled, JbdResponseAssembler};

    const T0: Duration = Duration::ZERO;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn bms_with(f: impl FnOnce(&mut JbdConfig)) -> JbdBms {
        let mut c = JbdConfig::default();
        f(&mut c);
        let mut b = JbdBms::new(c).unwrap();
        b.connected(T0);
        b
    }

    fn bms() -> JbdBms {
        bms_with(|_| {})
    }

    /// One request, exactly one reply frame, decoded (checksum checked).
    fn ask(b: &mut JbdBms, req: &[u8]) -> jbd::JbdResponse {
        let out = b.handle_write(req, ms(10));
        assert_eq!(out.len(), 1, "{out:02X?}");
        decode_response(&out[0]).unwrap()
    }

    fn read(b: &mut JbdBms, r: u8) -> jbd::JbdResponse {
        ask(b, &encode_read(r))
    }

    #[test]
    fn poll_cycle_renders_the_model_for_every_pack_size() {
        for cells in [4, 8, 13, 16, 24] {
            for ntc in 1..=6 {
                let mut b = bms_with(|c| {
                    c.pack.cells = cells;
                    c.pack.ntc = ntc;
                });
                b.set("temp1_c", 4.56).unwrap(); // warning band only: FETs stay on
                b.set("current_a", -12.34).unwrap();
                let s = b.snapshot();
                let r = read(&mut b, reg::BASIC_INFO);
                assert_eq!((r.reg, r.status, r.data.len()), (3, 0, 23 + 2 * ntc));
                let i = BasicInfo::decode(&r.data).unwrap();
                assert_eq!(u32::from(i.voltage_10mv), s.pack_mv / 10);
                assert_eq!(i.current_10ma, -1234);
                assert_eq!((i.cell_count as usize, i.rsoc_pct), (cells, 80));
                assert_eq!((i.nominal_10mah, i.remaining_10mah), (10_000, 8_000));
                assert_eq!(i.fet, jbd::FET_CHARGE | jbd::FET_DISCHARGE);
                let want: Vec<f64> = s
                    .temps_c
                    .iter()
                    .map(|t| (t * 10.0).round() / 10.0)
                    .collect();
                assert_eq!(i.temps_c(), want);
                assert_eq!(i.date().to_string(), "2024-03-15");
                let c = CellVoltages::decode(&read(&mut b, reg::CELL_VOLTAGES).data).unwrap();
                assert_eq!(c.cells_mv, s.cells_mv);
                let h = HardwareVersion::decode(&read(&mut b, reg::HARDWARE_VERSION).data).unwrap();
                assert_eq!(h.model, format!("JBD-SP{cells:02}S020-L{cells}S-200A-B-U"));
            }
        }
    }

    #[test]
    fn mos_control_switches_fets_and_stops_current() {
        let mut b = bms();
        b.set("current_a", -20.0).unwrap();
        let out = b.handle_write(
            &[0xDD, 0x5A, 0xE1, 0x02, 0x00, 0x02, 0xFF, 0x1B, 0x77],
            ms(1),
        );
        assert_eq!(out, vec![vec![0xDD, 0xE1, 0x00, 0x00, 0x00, 0x00, 0x77]]);
        assert_eq!(
            b.snapshot().current_a,
            0.0,
            "discharge FET off: no discharge current"
        );
        let i = b.basic_info();
        assert_eq!(i.fet, jbd::FET_CHARGE);
        assert_eq!(i.protection, protection::SOFTWARE_LOCK);
        let soc = b.snapshot().soc_pct;
        b.tick(Duration::from_secs(600));
        assert_eq!(b.snapshot().soc_pct, soc);
        b.set("current_a", 5.0).unwrap();
        assert_eq!(b.snapshot().current_a, 5.0, "charging still allowed");
        ask(
            &mut b,
            &MosControl {
                charge_off: true,
                discharge_off: true,
            }
            .request(),
        );
        assert_eq!((b.basic_info().fet, b.snapshot().current_a), (0, 0.0));
        ask(
            &mut b,
            &MosControl {
                charge_off: false,
                discharge_off: false,
            }
            .request(),
        );
        assert_eq!((b.basic_info().fet, b.basic_info().protection), (3, 0));
        assert_eq!(b.snapshot().current_a, 5.0);
        // Out-of-range MOS value: error reply, nothing changes.
        let bad = jbd::encode_request(Op::Write, reg::MOS_CONTROL, &[0, 7]).unwrap();
        assert_eq!(ask(&mut b, &bad).status, jbd::STATUS_ERROR);
        assert_eq!(b.basic_info().fet, 3);
        assert!(b.take_events().contains(&JbdEvent::Mos {
            charge_off: true,
            discharge_off: true
        }));
    }

    #[test]
    fn protections_and_balancing_come_from_the_model() {
        let mut b = bms();
        b.set("cell3_mv", 3700.0).unwrap();
        let i = BasicInfo::decode(&read(&mut b, 3).data).unwrap();
        assert_eq!(i.protection_names(), vec!["cell_ov"]);
        assert_eq!(i.fet, jbd::FET_DISCHARGE, "cell OV opens the charge FET");
        b.set("afe_error", 1.0).unwrap();
        assert_eq!(
            b.basic_info().protection,
            protection::CELL_OV | protection::FRONT_END_IC
        );

        let mut b = bms_with(|c| c.pack.cells = 20);
        b.set("soc", 98.5).unwrap();
        b.set("current_a", 5.0).unwrap();
        let mask = b.snapshot().balancing;
        assert!(
            mask != 0 && mask >> 16 != 0,
            "cells above 16 balance too: {mask:#x}"
        );
        let i = BasicInfo::decode(&read(&mut b, 3).data).unwrap();
        assert_eq!(i.balance, mask);
    }

    #[test]
    fn bad_checksum_gets_error_status() {
        let mut b = bms();
        let out = b.handle_write(&[0xDD, 0xA5, 0x03, 0x00, 0xFF, 0xFC, 0x77], T0);
        assert_eq!(out, vec![vec![0xDD, 0x03, 0x80, 0x00, 0xFF, 0x80, 0x77]]);
        // Unknown register and a write to a read register: error too.
        assert_eq!(read(&mut b, 0x77).status, jbd::STATUS_ERROR);
        let w = jbd::encode_request(Op::Write, 3, &[1, 2]).unwrap();
        assert_eq!(ask(&mut b, &w).status, jbd::STATUS_ERROR);
    }

    #[test]
    fn input_is_buffered_across_writes_garbage_is_silent() {
        let mut b = bms();
        let req = encode_read(4);
        assert!(b.handle_write(&req[..3], ms(0)).is_empty());
        assert_eq!(b.poll_timeout(), Some(ms(0) + RX_TIMEOUT));
        assert!(b.handle_write(&req[3..5], ms(100)).is_empty());
        let out = b.handle_write(&req[5..], ms(200));
        assert_eq!(out.len(), 1);
        assert_eq!(b.poll_timeout(), None);

        // Garbage alone: silence; garbage then a request: the request is answered.
        assert!(b
            .handle_write(&[0x01, 0x02, 0x77, 0xFE], ms(300))
            .is_empty());
        let mut noisy = vec![0x00, 0x13];
        noisy.extend_from_slice(&req);
        assert_eq!(b.handle_write(&noisy, ms(300)).len(), 1);
        assert!(b
            .take_events()
            .iter()
            .any(|e| matches!(e, JbdEvent::Garbage { bytes: 4 })));

        // A DD frame that does not end in 77: silence, and the buffer is free again.
        assert!(b
            .handle_write(&[0xDD, 0xA5, 0x03, 0x00, 0xFF, 0xFD, 0x78], ms(400))
            .is_empty());
        assert_eq!(b.handle_write(&req, ms(400)).len(), 1);

        // Two requests in one write: two answers in order.
        let mut two = encode_read(3);
        two.extend_from_slice(&encode_read(5));
        let out = b.handle_write(&two, ms(500));
        assert_eq!(out.iter().map(|f| f[1]).collect::<Vec<_>>(), vec![3, 5]);

        // Half a request, then (too late) a whole one: the half is dropped by the timeout.
        assert!(b.handle_write(&req[..4], ms(1000)).is_empty());
        b.tick(ms(1000) + RX_TIMEOUT);
        assert!(b
            .take_events()
            .contains(&JbdEvent::PartialDropped { bytes: 4 }));
        assert_eq!(b.handle_write(&req, ms(2500)).len(), 1);

        // Half a request, then a whole one before the timeout: read as one garbled frame
        // (the length byte of the first says 0, so DD A5 04 00 DD A5 04 → bad end, silent),
        // and the rest resynchronises on nothing; the next whole request is answered.
        assert!(b.handle_write(&req[..4], ms(3000)).is_empty());
        let out = b.handle_write(&req, ms(3100));
        assert!(out.is_empty(), "{out:02X?}");
        assert_eq!(b.handle_write(&req, ms(3200)).len(), 1);
    }

    #[test]
    fn factory_mode_eeprom_strings_and_counters() {
        let mut b = bms_with(|c| {
            c.pack.cells = 8;
            c.pack.ntc = 3;
        });
        for r in [
            0x10,
            reg::CELL_COUNT,
            reg::MANUFACTURER,
            reg::ERROR_COUNTERS,
        ] {
            assert_eq!(
                read(&mut b, r).status,
                jbd::STATUS_ERROR,
                "0x{r:02X} outside factory mode"
            );
        }
        let out = b.handle_write(&FactoryCommand::Enter.request(), T0);
        assert_eq!(out, vec![jbd::encode_ack(0)]);
        assert_eq!(out[0], vec![0xDD, 0x00, 0x00, 0x00, 0x00, 0x00, 0x77]);
        assert!(b.factory_mode());
        let param = |b: &mut JbdBms, r| jbd::decode_param(&read(b, r).data).unwrap();
        assert_eq!(param(&mut b, reg::CELL_COUNT), 8);
        assert_eq!(param(&mut b, reg::NTC_CONFIG), 0b111);
        assert_eq!(param(&mut b, reg::FUNC_CONFIG) & 0b1100, 0b1100);
        assert_eq!(param(&mut b, 0x24), 3650, "cell OV protection, mV");
        assert_eq!(param(&mut b, 0x20), 8 * 360, "pack OV, 10 mV");
        assert_eq!(param(&mut b, 0x18), 2731 + 550, "charge OT, 0.1 K");
        assert_eq!(
            param(&mut b, 0x29) as i16,
            -15000,
            "discharge OC, 10 mA, negative"
        );
        assert_eq!(param(&mut b, 0x10), 10_000);
        let s = |b: &mut JbdBms, r| jbd::decode_string(&read(b, r).data).unwrap();
        assert_eq!(s(&mut b, reg::MANUFACTURER), "JBD");
        assert_eq!(s(&mut b, reg::BARCODE), "JBD0000000001");
        assert_eq!(s(&mut b, reg::MODEL), "JBD-SP08S020-L8S-200A-B-U");

        // Two cell-OV events and one short circuit are counted.
        for _ in 0..2 {
            b.set("cell1_mv", 3700.0).unwrap();
            b.set("unpin_cell", 1.0).unwrap();
        }
        b.set("current_a", -600.0).unwrap();
        let c = ErrorCounters::decode(&read(&mut b, reg::ERROR_COUNTERS).data).unwrap();
        assert_eq!(c.counts.len(), jbd::ERROR_COUNTER_WORDS);
        assert_eq!(
            (c.get("cell_ov"), c.get("short_circuit"), c.get("pack_ov")),
            (Some(2), Some(1), Some(0))
        );

        // Plain exit keeps the counters; exit with 28 28 clears them.
        ask(&mut b, &FactoryCommand::Exit.request());
        assert!(!b.factory_mode());
        assert_eq!(b.error_counters()[3], 2);
        ask(&mut b, &FactoryCommand::Enter.request());
        assert_eq!(
            ask(&mut b, &FactoryCommand::ExitSave.request()),
            decode_response(&jbd::encode_ack(1)).unwrap()
        );
        assert!(b.error_counters().iter().all(|&c| c == 0));
        assert!(b.take_events().contains(&JbdEvent::Saved));
        // Wrong factory data: error.
        let w = jbd::encode_request(Op::Write, 0, &[0x12, 0x34]).unwrap();
        assert_eq!(ask(&mut b, &w).status, jbd::STATUS_ERROR);
        assert!(!b.factory_mode());
    }

    #[test]
    fn actions_reset_soc_clear_alarm_auto_balance() {
        let mut b = bms();
        b.set("soc", 30.0).unwrap();
        b.set("cell_mv", 3400.0).unwrap(); // the pack says 30 %, the cells say ~95 %
        ask(&mut b, &Action::ResetSoc.request());
        let soc = b.snapshot().soc_pct;
        assert!((soc - 95.0).abs() < 0.01, "{soc}");

        b.set("cell2_mv", 3700.0).unwrap();
        assert_eq!(b.error_counters()[3], 1);
        ask(&mut b, &Action::ClearAlarm.request());
        assert_eq!(b.error_counters()[3], 0);

        b.func_config = 0;
        ask(&mut b, &Action::AutoBalance.request());
        assert_eq!(b.eeprom(reg::FUNC_CONFIG), 0b1100);
        let bad = jbd::encode_request(Op::Write, reg::ACTION, &[9, 0]).unwrap();
        assert_eq!(ask(&mut b, &bad).status, jbd::STATUS_ERROR);
    }

    #[test]
    fn profiles() {
        let mut b = bms_with(|c| {
            c.profile = JbdProfile::Chins;
            c.pack.ntc = 2;
        });
        let f = &b.handle_write(&encode_read(3), T0)[0];
        assert_eq!((f[3], f.len()), (0x22, 41), "20 + 20 + lone 77 at MTU 23");
        assert_eq!(
            BasicInfo::decode(&decode_response(f).unwrap().data)
                .unwrap()
                .extra,
            vec![0; 7]
        );
        assert!(!b.rejects_write_request());
        assert!(bms_with(|c| c.profile = JbdProfile::RejectsWriteRequest).rejects_write_request());
        assert_eq!("chins".parse::<JbdProfile>(), Ok(JbdProfile::Chins));
        assert!("nope"
            .parse::<JbdProfile>()
            .unwrap_err()
            .contains("rejects-write-request"));
        for (name, _) in JbdProfile::ALL {
            assert!(name.parse::<JbdProfile>().is_ok());
        }
    }

    #[test]
    fn pin_handshake_gates_everything() {
        let mac = [0x10, 0xa5, 0x62, 0x32, 0x75, 0x36];
        let mut b = bms_with(|c| {
            c.profile = JbdProfile::Pin;
            c.ble_address = mac;
            c.seed = 7;
        });
        let pin = |cmd, data: &[u8]| {
            PinFrame {
                cmd,
                data: data.to_vec(),
            }
            .encode()
            .unwrap()
        };
        assert!(
            b.handle_write(&encode_read(3), T0).is_empty(),
            "silent before the handshake"
        );
        assert!(!b.authenticated());
        // Wrong app key refused.
        let out = b.handle_write(&pin(jbd::PIN_APP_KEY, b"999999"), T0);
        assert_eq!(
            PinFrame::decode(&out[0]).unwrap().data,
            vec![jbd::PIN_REFUSED]
        );
        let out = b.handle_write(&pin(jbd::PIN_APP_KEY, b"000000"), T0);
        assert_eq!(out, vec![vec![0xff, 0xaa, 0x15, 0x01, 0x00, 0x16]]);
        let out = b.handle_write(&pin(jbd::PIN_RANDOM, &[]), T0);
        let random = PinFrame::decode(&out[0]).unwrap().data[0];
        // Wrong password (encrypted with the wrong address) refused.
        let wrong = jbd::pin_encrypt_password(b"123456", [0; 6], random);
        let out = b.handle_write(&pin(jbd::PIN_PASSWORD, &wrong), T0);
        assert_eq!(
            PinFrame::decode(&out[0]).unwrap().data,
            vec![jbd::PIN_REFUSED]
        );
        assert!(b.handle_write(&encode_read(3), T0).is_empty());
        let good = jbd::pin_encrypt_password(b"123456", mac, random);
        let out = b.handle_write(&pin(jbd::PIN_PASSWORD, &good), T0);
        assert_eq!(out, vec![vec![0xff, 0xaa, 0x18, 0x01, 0x00, 0x19]]);
        assert!(b.authenticated());
        assert_eq!(read(&mut b, 3).reg, 3);
        // A new connection must authenticate again.
        b.disconnected(ms(100));
        b.connected(ms(200));
        assert!(b.handle_write(&encode_read(3), ms(300)).is_empty());
        // Without the PIN profile, FF AA bytes are garbage.
        let mut plain = bms();
        assert!(plain
            .handle_write(&pin(jbd::PIN_RANDOM, &[]), T0)
            .is_empty());
    }

    #[test]
    fn quirk_silent_after_first_answer_and_silent_key() {
        let mut b = bms_with(|c| c.quirks = vec![JbdQuirk::SilentAfterFirstAnswer]);
        assert_eq!(b.handle_write(&encode_read(3), T0).len(), 1);
        assert!(b.handle_write(&encode_read(4), T0).is_empty());
        assert!(b.handle_write(&encode_read(3), ms(5000)).is_empty());
        b.disconnected(ms(6000));
        b.connected(ms(7000));
        assert_eq!(b.handle_write(&encode_read(3), ms(7000)).len(), 1);

        let mut b = bms();
        b.set("silent", 1.0).unwrap();
        assert!(b.handle_write(&encode_read(3), T0).is_empty());
        b.set("silent", 0.0).unwrap();
        assert_eq!(b.handle_write(&encode_read(3), T0).len(), 1);
        assert!(b.set("silent", 2.0).is_err());
    }

    #[test]
    fn quirk_factory_enter_no_reply() {
        let mut b = bms_with(|c| c.quirks = vec![JbdQuirk::FactoryEnterNoReply]);
        for _ in 0..3 {
            assert!(b
                .handle_write(&FactoryCommand::Enter.request(), T0)
                .is_empty());
        }
        assert!(b.factory_mode(), "acted on, only the ACK is missing");
        assert_eq!(read(&mut b, reg::CELL_COUNT).status, jbd::STATUS_OK);
    }

    #[test]
    fn quirk_balance_bit_orders() {
        let run = |q: Vec<JbdQuirk>| {
            let mut b = bms_with(|c| {
                c.pack.cells = 20;
                c.quirks = q;
            });
            b.set("soc", 60.0).unwrap();
            b.set("cell_mv", 3300.0).unwrap();
            b.set("cell1_mv", 3450.0).unwrap();
            b.set("cell18_mv", 3450.0).unwrap();
            b.set("current_a", 2.0).unwrap();
            BasicInfo::decode(&read(&mut b, 3).data).unwrap().balance
        };
        assert_eq!(run(vec![]), 1 | 1 << 17);
        assert_eq!(
            run(vec![JbdQuirk::BalanceBitsMsbFirst]),
            1 << 15 | 1 << (16 + 14)
        );
        assert_eq!(run(vec![JbdQuirk::BalanceWordsSwapped]), 1 << 1 | 1 << 16);
    }

    #[test]
    fn quirk_foreign_frames_truncation_corruption() {
        let mut b = bms_with(|c| c.quirks = vec![JbdQuirk::ForeignFrames]);
        let out = b.handle_write(&encode_read(3), T0);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0][0], 0xFE);
        let mut a = JbdResponseAssembler::new();
        let got: Vec<_> = out.iter().flat_map(|f| a.push(f)).collect();
        assert!(
            matches!(&got[..], [Assembled::Skipped { .. }, Assembled::Response(r)] if r.reg == 3),
            "{got:?}"
        );

        let mut b = bms_with(|c| c.quirks = vec![JbdQuirk::TruncatedCellVoltages]);
        let f = &b.handle_write(&encode_read(4), T0)[0];
        assert_eq!((f[3], f.len(), *f.last().unwrap()), (32, 7 + 16, jbd::END));
        assert!(decode_response(f).is_err());

        let mut b = bms_with(|c| c.quirks = vec![JbdQuirk::CorruptedData]);
        let f = &b.handle_write(&encode_read(4), T0)[0];
        let (r, bad) = jbd::decode_response_unchecked(f).unwrap();
        assert!(bad.is_some());
        assert_eq!(
            u16::from_be_bytes([r.data[0], r.data[1]]),
            b.snapshot().cells_mv[0] ^ 0x8000
        );

        assert_eq!(
            "foreign_frames".parse::<JbdQuirk>(),
            Ok(JbdQuirk::ForeignFrames)
        );
        assert!("x"
            .parse::<JbdQuirk>()
            .unwrap_err()
            .contains("silent_after_first_answer"));
        for (name, _) in JbdQuirk::ALL {
            assert!(name.parse::<JbdQuirk>().is_ok(), "{name}");
        }
    }

    #[test]
    fn set_keys_and_config_errors() {
        let mut b = bms();
        b.set("software_version", 0x27 as f64).unwrap();
        b.set("production_date", 20230704.0).unwrap();
        let i = b.basic_info();
        assert_eq!(
            (i.software_version, i.date().to_string()),
            (0x27, "2023-07-04".into())
        );
        assert!(b.set("production_date", 20231304.0).is_err());
        assert!(b.set("software_version", 256.0).is_err());
        b.set("factory_mode", 1.0).unwrap();
        assert!(b.factory_mode());
        assert!(b
            .set("nope", 1.0)
            .unwrap_err()
            .contains("unknown state key"));
        let e = JbdBms::new(JbdConfig {
            password: "123".into(),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.contains("6 characters"), "{e}");
        let mut c = JbdConfig::default();
        c.identity.model = Some("x".repeat(32));
        assert!(JbdBms::new(c).err().unwrap().contains("identity.model"));
        let mut c = JbdConfig::default();
        c.pack.cells = 25;
        assert!(JbdBms::new(c).is_err());
    }

    #[test]
    fn arbitrary_writes_never_panic_and_buffer_stays_bounded() {
        use rand::RngCore;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for profile in [JbdProfile::Standard, JbdProfile::Pin, JbdProfile::Chins] {
            let mut b = bms_with(|c| {
                c.profile = profile;
                c.quirks = vec![JbdQuirk::ForeignFrames, JbdQuirk::CorruptedData];
            });
            for i in 0..5000u64 {
                let mut buf = vec![0u8; (rng.next_u32() % 40) as usize];
                rng.fill_bytes(&mut buf);
                if rng.next_u32() % 3 == 0 && !buf.is_empty() {
                    buf[0] = 0xDD;
                }
                b.handle_write(&buf, ms(i));
                assert!(b.rx.len() <= jbd::MAX_FRAME + 40);
            }
        }
    }
}
