//! The EG4 LifePower4 pack as a sans-IO state machine: a request frame and
//! the current time in, the reply frame (or silence) out. The actor in
//! `device::eg4` is a thin shell around it; fuzzers, benches and replays of
//! captured traffic drive it directly.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{PackConfig, PackModel, PackSnapshot};
use crate::protocol::eg4::{Eg4Telemetry, RegisterProfile};
use crate::protocol::eg4_legacy::{self, LegacyCommand, LegacyStatus};
use crate::protocol::modbus::{self, ModbusError};

/// Which protocol the pack's DIP switches select.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Eg4Protocol {
    #[default]
    Modbus,
    Legacy,
}

impl FromStr for Eg4Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "modbus" => Ok(Eg4Protocol::Modbus),
            "legacy" => Ok(Eg4Protocol::Legacy),
            o => Err(format!("unknown protocol `{o}`, expected modbus or legacy")),
        }
    }
}

/// Firmware misbehaviour seen in the field, reproduced on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Eg4Quirk {
    /// At address 1 the pack answers with all-zero data and a bad CRC
    /// (moving it to address 2 fixes it).
    Address1Zeros,
    /// DIP switches on the wrong protocol: every reply is 0xFF bytes.
    WrongProtocolFf,
}

impl Eg4Quirk {
    pub const ALL: &'static [(&'static str, &'static str)] = &[
        ("address1_zeros", "at address 1, replies carry all-zero data and a bad CRC"),
        ("wrong_protocol_ff", "wrong DIP protocol setting: replies are 0xFF bytes"),
    ];
}

/// Why the pack stayed silent (what a real pack does with a frame it
/// cannot use). Reported as observations, never sent on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Eg4Silence {
    /// Addressed to another pack.
    OtherAddress(u8),
    /// Did not decode (bad CRC, truncated, garbage).
    Undecodable(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eg4Identity {
    pub model: String,
    pub firmware: String,
    pub serial: String,
    pub hardware: String,
    pub firmware_words: (u16, u16),
}

impl Default for Eg4Identity {
    fn default() -> Self {
        Eg4Identity {
            model: "LifePower4 48V 100Ah".into(),
            firmware: "V2.17".into(),
            serial: "HB0000000001".into(),
            hardware: "LP4-V2-HW1.0".into(),
            firmware_words: (2, 17),
        }
    }
}

/// How often the pack refreshes its registers from its measurements. A real
/// BMS samples on a cycle of this order; polls in between read the same
/// values (and cost the simulator almost nothing).
pub const REGISTER_REFRESH: Duration = Duration::from_millis(100);

pub struct Eg4Pack {
    pub address: u8,
    pub profile: RegisterProfile,
    pub protocol: Eg4Protocol,
    pub quirks: Vec<Eg4Quirk>,
    pub identity: Eg4Identity,
    model: PackModel,
    /// Time the model was last advanced to (monotonic, from the owner).
    clock: Option<Duration>,
    /// Register image and when it was built; dropped by `set`.
    image: Option<(Duration, crate::protocol::eg4::RegisterImage)>,
}

impl Eg4Pack {
    pub fn new(address: u8, config: PackConfig) -> Result<Self, String> {
        Ok(Eg4Pack {
            address,
            profile: RegisterProfile::Lp4V2,
            protocol: Eg4Protocol::Modbus,
            quirks: Vec::new(),
            identity: Eg4Identity::default(),
            model: PackModel::new(config).map_err(|e| e.to_string())?,
            clock: None,
            image: None,
        })
    }

    pub fn model(&self) -> &PackModel {
        &self.model
    }

    /// Let the physics run up to `now`.
    pub fn tick(&mut self, now: Duration) {
        if let Some(last) = self.clock {
            if now > last {
                self.model.advance(now - last);
            }
        }
        self.clock = Some(now.max(self.clock.unwrap_or_default()));
    }

    /// Set a state key: the model's keys, plus `address` (the DIP switches).
    pub fn set(&mut self, key: &str, value: f64) -> Result<(), String> {
        self.image = None;
        if key == "address" {
            if !(1.0..=247.0).contains(&value) || value.fract() != 0.0 {
                return Err(format!("address must be an integer 1..=247, got {value}"));
            }
            self.address = value as u8;
            return Ok(());
        }
        self.model.set(key, value).map_err(|e| e.to_string())
    }

    pub fn snapshot(&self) -> PackSnapshot {
        self.model.snapshot()
    }

    /// What the registers carry right now.
    pub fn telemetry(&self) -> Eg4Telemetry {
        telemetry_from(&self.model.snapshot(), &self.identity)
    }

    /// One frame from the bus, complete as the framer delimited it.
    /// `Ok(Some(reply))` to transmit, `Ok(None)` when the frame was for
    /// another pack, `Err` when a real pack would stay silent on bad input.
    pub fn handle_frame(&mut self, frame: &[u8], now: Duration) -> Result<Vec<u8>, Eg4Silence> {
        let mut reply = match self.protocol {
            Eg4Protocol::Modbus => self.handle_modbus(frame, now)?,
            Eg4Protocol::Legacy => {
                self.tick(now);
                self.handle_legacy(frame)?
            }
        };
        if self.quirks.contains(&Eg4Quirk::WrongProtocolFf) {
            reply.iter_mut().for_each(|b| *b = 0xFF);
        }
        Ok(reply)
    }

    fn handle_modbus(&mut self, frame: &[u8], now: Duration) -> Result<Vec<u8>, Eg4Silence> {
        let req = modbus::decode_request(frame).map_err(|e: ModbusError| Eg4Silence::Undecodable(e.to_string()))?;
        // Address 0 is broadcast: a pack acts on writes but never answers.
        if req.address != self.address {
            return Err(Eg4Silence::OtherAddress(req.address));
        }
        let fresh = matches!(&self.image, Some((at, _)) if now.saturating_sub(*at) < REGISTER_REFRESH);
        if !fresh {
            self.tick(now);
            self.image = Some((now, self.profile.image(&self.telemetry())));
        }
        let Some((_, image)) = &self.image else { unreachable!("image built above") };
        let mut out = Vec::with_capacity(256);
        modbus::serve_into(self.address, &req.pdu, image, &mut out);
        if self.address == 1 && self.quirks.contains(&Eg4Quirk::Address1Zeros) && out.len() > 5 {
            let n = out.len();
            out[3..n - 2].iter_mut().for_each(|b| *b = 0);
            // The firmware computes the CRC over the real data, not the
            // zeros it sends, so the CRC is wrong.
            out[n - 1] ^= 0xA5;
        }
        Ok(out)
    }

    fn handle_legacy(&mut self, frame: &[u8]) -> Result<Vec<u8>, Eg4Silence> {
        let req = eg4_legacy::decode_request(frame).map_err(|e| Eg4Silence::Undecodable(e.to_string()))?;
        if req.address != self.address {
            return Err(Eg4Silence::OtherAddress(req.address));
        }
        let r = match req.command {
            LegacyCommand::GeneralStatus => {
                eg4_legacy::encode_status_reply(self.address, &legacy_status_from(&self.model.snapshot()))
            }
            LegacyCommand::FirmwareVersion => {
                eg4_legacy::encode_version_reply(self.address, LegacyCommand::FirmwareVersion, &self.identity.firmware)
            }
            LegacyCommand::HardwareVersion => {
                eg4_legacy::encode_version_reply(self.address, LegacyCommand::HardwareVersion, &self.identity.hardware)
            }
            LegacyCommand::Other(c) => {
                return Err(Eg4Silence::Undecodable(format!("unsupported legacy command 0x{c:02X}")))
            }
        };
        r.map_err(|e| Eg4Silence::Undecodable(e.to_string()))
    }
}

fn clamp_u16(v: f64) -> u16 {
    if v.is_nan() {
        0
    } else {
        v.round().clamp(0.0, f64::from(u16::MAX)) as u16
    }
}

fn clamp_i16(v: f64) -> i16 {
    if v.is_nan() {
        0
    } else {
        v.round().clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16
    }
}

/// The EG4 warning/protection bit positions, by the model's fault names.
/// Bits 0..11 are shared; 12 and 13 differ between the two words.
fn eg4_bit(name: &str, protection: bool) -> Option<u16> {
    let bit = match name {
        "pack_ov" => 0,
        "cell_ov" => 1,
        "pack_uv" => 2,
        "cell_uv" => 3,
        "charge_oc" => 4,
        "discharge_oc" => 5,
        "temp_anomaly" => 6,
        "mos_ot" => 7,
        "charge_ot" => 8,
        "discharge_ot" => 9,
        "charge_ut" => 10,
        "discharge_ut" => 11,
        "low_capacity" if !protection => 12,
        "short_circuit" | "discharge_sc" if protection => 13,
        _ => return None,
    };
    Some(1 << bit)
}

pub fn telemetry_from(s: &PackSnapshot, id: &Eg4Identity) -> Eg4Telemetry {
    let warnings = s
        .warnings
        .iter()
        .filter_map(|n| eg4_bit(n, false))
        .fold(0, |a, b| a | b);
    let protections = s
        .protections
        .iter()
        .filter_map(|n| eg4_bit(n, true))
        .fold(0, |a, b| a | b);
    Eg4Telemetry {
        pack_mv: s.pack_mv,
        current_ca: (s.current_a * 100.0).round().clamp(-3.0e6, 3.0e6) as i32,
        cells_mv: s.cells_mv.clone(),
        temps_c: s.temps_c.iter().map(|t| clamp_i16(*t)).collect(),
        pcb_temp_c: clamp_i16(s.mos_temp_c),
        soc_pct: clamp_u16(s.soc_pct),
        soh_pct: clamp_u16(s.soh_pct),
        heater_on: true,
        current_limit_ca: 10_000,
        warnings,
        protections,
        error_code: if protections != 0 { 1 } else { 0 },
        capacity_dah: clamp_u16(s.capacity_ah * 10.0),
        remaining_cah: (s.remaining_ah * 100.0).round().clamp(0.0, 4.0e9) as u32,
        cycles: s.cycles,
        battery_mode: if s.current_a > 0.05 {
            1
        } else if s.current_a < -0.05 {
            2
        } else {
            0
        },
        firmware: id.firmware_words,
        uptime: s.uptime_ticks,
        model: id.model.clone(),
        firmware_str: id.firmware.clone(),
        serial: id.serial.clone(),
    }
}

pub fn legacy_status_from(s: &PackSnapshot) -> LegacyStatus {
    let ov = s.protections.iter().chain(&s.warnings).any(|n| *n == "cell_ov");
    // The over-voltage flag is set on the cells that are in alarm, i.e. the
    // ones at or above the highest cell (the firmware flags the culprit).
    let max = s.cells_mv.iter().copied().max().unwrap_or(0);
    let flags: Vec<bool> = s.cells_mv.iter().map(|&c| ov && c == max).collect();
    let mut alarm2: u16 = 0;
    let has = |n: &str| s.protections.iter().chain(&s.warnings).any(|p| *p == n);
    if has("charge_oc") || has("discharge_oc") {
        alarm2 |= 1 << 3;
    }
    if has("cell_ov") || has("pack_ov") {
        alarm2 |= 1 << 4;
    }
    if has("cell_uv") || has("pack_uv") {
        alarm2 |= 1 << 5;
    }
    if has("charge_ot") {
        alarm2 |= 1 << 6;
    }
    if has("charge_ut") {
        alarm2 |= 1 << 7;
    }
    LegacyStatus {
        cells_mv: s.cells_mv.clone(),
        cell_ov_flags: flags,
        current_ca: (s.current_a * 100.0).round().clamp(-30000.0, 30000.0) as i32,
        soc_centi: clamp_u16(s.soc_pct * 100.0),
        // One 16-bit word on the wire each: saturate rather than fail.
        capacity_cah: u32::from(clamp_u16(s.remaining_ah * 100.0)),
        temps_c: s.temps_c.iter().map(|t| clamp_i16(t.clamp(-50.0, 205.0))).collect(),
        alarms: vec![0, alarm2],
        cycles: s.cycles.min(u32::from(u16::MAX)) as u16,
        pack_cv: (s.pack_mv / 10).min(u32::from(u16::MAX)),
    }
}

/// What a pack reports through [`SansIoCore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eg4Event {
    /// A frame a real pack would not answer (bad CRC, truncated, garbage).
    Silent { reason: String },
}

impl crate::sans_io::SansIoCore for Eg4Pack {
    type Event = Eg4Event;

    fn handle_input(&mut self, input: crate::sans_io::Input<'_>, now: Duration, out: &mut Vec<crate::sans_io::Output<Eg4Event>>) -> Result<(), String> {
        use crate::sans_io::{Input, Output};
        match input {
            Input::Bytes { from, bytes } => match self.handle_frame(bytes, now) {
                Ok(reply) => out.push(Output::Send { to: from, bytes: reply }),
                Err(Eg4Silence::OtherAddress(_)) => {}
                Err(Eg4Silence::Undecodable(reason)) => out.push(Output::Event(Eg4Event::Silent { reason })),
            },
            Input::Set { key, value } => {
                self.tick(now);
                self.set(key, value)?;
            }
            Input::Timeout | Input::Connected(_) | Input::Disconnected(_) => self.tick(now),
        }
        Ok(())
    }

    /// None: the physics catch up on every input, and a pack says nothing unasked.
    fn next_wakeup(&self) -> Option<Duration> {
        None
    }
}
