//! The JBD / Xiaoxiang smart-BMS protocol (BLE service 0xFF00, also the UART protocol).
//!
//! ```text
//! request:  DD op  reg    len <data> chk_hi chk_lo 77     op A5 = read, 5A = write
//! response: DD reg status len <data> chk_hi chk_lo 77     status 00 = ok, 80 = error
//! chk = 0x10000 − sum(bytes 2 ..= 3+len), 16-bit big-endian
//! ```
//!
//! The checksum covers `reg len data` of a request and `status len data` of a response
//! (byte 2 up to the last data byte in both), so a zero-length ACK `DD E1 00 00 00 00 77`
//! carries checksum 0 and an error reply `DD 03 80 00 FF 80 77`.
//!
//! Newer Bluetooth modules put a PIN handshake in front ([`PinFrame`]):
//! `FF AA cmd len <data> sum8`, sum8 = low byte of `cmd + len + data`.
//!
//! Everything here is sans-IO and never panics on any input. Decoders are strict and say
//! what was wrong and where; [`JbdResponseAssembler`] is the client-side reassembler for
//! BLE notifications and reports checksum failures separately, so a client can be
//! lenient like the Home Assistant integrations that never check it. [`malform`] makes
//! the deliberately broken frames the field faults need.

use std::fmt;

use serde::Serialize;

pub use super::modbus::FrameLength;

/// First byte of every frame.
pub const START: u8 = 0xDD;
/// Last byte of every frame.
pub const END: u8 = 0x77;
/// Request op: read a register.
pub const OP_READ: u8 = 0xA5;
/// Request op: write a register.
pub const OP_WRITE: u8 = 0x5A;
/// Response status: ok.
pub const STATUS_OK: u8 = 0x00;
/// Response status: error (sent with no data).
pub const STATUS_ERROR: u8 = 0x80;
/// `DD` + op/reg + reg/status + len + chk_hi + chk_lo + `77`.
pub const OVERHEAD: usize = 7;
/// Longest frame the one-byte length allows.
pub const MAX_FRAME: usize = OVERHEAD + 255;

/// GATT service and characteristics (16-bit UUIDs in the Bluetooth base UUID).
pub const SERVICE_UUID16: u16 = 0xFF00;
/// Notify (+ read): the BMS answers here.
pub const NOTIFY_UUID16: u16 = 0xFF01;
/// Write-without-response (+ read): clients write requests here.
pub const WRITE_UUID16: u16 = 0xFF02;

/// Register numbers.
pub mod reg {
    /// Write `56 78`: enter factory mode.
    pub const FACTORY_ENTER: u8 = 0x00;
    /// Write `00 00`: exit; `28 28`: exit, save and clear the error counters.
    pub const FACTORY_EXIT: u8 = 0x01;
    pub const BASIC_INFO: u8 = 0x03;
    pub const CELL_VOLTAGES: u8 = 0x04;
    pub const HARDWARE_VERSION: u8 = 0x05;
    /// Control actions (reset SoC, clear alarm, auto-balance).
    pub const ACTION: u8 = 0x0A;
    /// First and last EEPROM parameter register (factory mode).
    pub const EEPROM_FIRST: u8 = 0x10;
    pub const EEPROM_LAST: u8 = 0x3F;
    /// EEPROM: function config (bit 2 balance enable, bit 3 charge-balance enable).
    pub const FUNC_CONFIG: u8 = 0x2D;
    /// EEPROM: NTC enable mask.
    pub const NTC_CONFIG: u8 = 0x2E;
    /// EEPROM: cell count.
    pub const CELL_COUNT: u8 = 0x2F;
    /// Length-prefixed strings (factory mode).
    pub const MANUFACTURER: u8 = 0xA0;
    pub const BARCODE: u8 = 0xA1;
    pub const MODEL: u8 = 0xA2;
    /// Protection event counters (factory mode).
    pub const ERROR_COUNTERS: u8 = 0xAA;
    /// MOS control, data `00 XX`.
    pub const MOS_CONTROL: u8 = 0xE1;

    /// Is `r` an EEPROM parameter register?
    pub fn is_eeprom(r: u8) -> bool {
        (EEPROM_FIRST..=EEPROM_LAST).contains(&r)
    }
    /// Is `r` one of the string registers?
    pub fn is_string(r: u8) -> bool {
        (MANUFACTURER..=MODEL).contains(&r)
    }
}

/// Data of the factory-mode writes.
pub const FACTORY_ENTER_DATA: [u8; 2] = [0x56, 0x78];
pub const FACTORY_EXIT_DATA: [u8; 2] = [0x00, 0x00];
pub const FACTORY_EXIT_SAVE_DATA: [u8; 2] = [0x28, 0x28];

/// Protection bits of [`BasicInfo::protection`] (bits 0..=12).
pub mod protection {
    pub const CELL_OV: u16 = 1 << 0;
    pub const CELL_UV: u16 = 1 << 1;
    pub const PACK_OV: u16 = 1 << 2;
    pub const PACK_UV: u16 = 1 << 3;
    pub const CHARGE_OT: u16 = 1 << 4;
    pub const CHARGE_UT: u16 = 1 << 5;
    pub const DISCHARGE_OT: u16 = 1 << 6;
    pub const DISCHARGE_UT: u16 = 1 << 7;
    pub const CHARGE_OC: u16 = 1 << 8;
    pub const DISCHARGE_OC: u16 = 1 << 9;
    pub const SHORT_CIRCUIT: u16 = 1 << 10;
    pub const FRONT_END_IC: u16 = 1 << 11;
    /// MOS switched off by software (MOS control command).
    pub const SOFTWARE_LOCK: u16 = 1 << 12;
    /// Every named bit with its name, in bit order.
    pub const ALL: &[(u16, &str)] = &[
        (CELL_OV, "cell_ov"),
        (CELL_UV, "cell_uv"),
        (PACK_OV, "pack_ov"),
        (PACK_UV, "pack_uv"),
        (CHARGE_OT, "charge_ot"),
        (CHARGE_UT, "charge_ut"),
        (DISCHARGE_OT, "discharge_ot"),
        (DISCHARGE_UT, "discharge_ut"),
        (CHARGE_OC, "charge_oc"),
        (DISCHARGE_OC, "discharge_oc"),
        (SHORT_CIRCUIT, "short_circuit"),
        (FRONT_END_IC, "front_end_ic_error"),
        (SOFTWARE_LOCK, "software_lock"),
    ];
}

/// Names of the set protection bits; unnamed bits come out as `bitN`.
pub fn protection_names(bits: u16) -> Vec<String> {
    (0..16)
        .filter(|b| bits & (1 << b) != 0)
        .map(
            |b| match protection::ALL.iter().find(|(m, _)| *m == 1 << b) {
                Some((_, n)) => (*n).to_string(),
                None => format!("bit{b}"),
            },
        )
        .collect()
}

/// FET bits of [`BasicInfo::fet`].
pub const FET_CHARGE: u8 = 1 << 0;
pub const FET_DISCHARGE: u8 = 1 << 1;

/// 0 °C in the NTC unit (0.1 K).
pub const ZERO_C_DECI_KELVIN: u16 = 2731;
/// The NTC count the decoders allow.
pub const MAX_NTC: usize = 6;
/// The cell count the decoders allow.
pub const MAX_CELLS: usize = 32;
/// Bytes of [`BasicInfo`] before the temperatures.
pub const BASIC_FIXED: usize = 23;
/// Extra bytes Chins packs append to basic info.
pub const CHINS_EXTRA: usize = 7;
/// Longest hardware-version string.
pub const MAX_MODEL_LEN: usize = 31;

/// Everything that can be wrong with a frame or a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JbdError {
    #[error("frame is {len} bytes, shorter than the {min} a frame needs")]
    TooShort { len: usize, min: usize },
    #[error("byte 0 is 0x{found:02X}, a frame starts with 0xDD")]
    BadStart { found: u8 },
    #[error("byte 1 is 0x{found:02X}, not a request op (0xA5 read, 0x5A write)")]
    BadOp { found: u8 },
    #[error(
        "length byte says {declared} data bytes, so the frame is {expected} bytes, but it is {len}"
    )]
    LengthMismatch {
        declared: u8,
        expected: usize,
        len: usize,
    },
    #[error("byte {at} is 0x{found:02X}, a frame ends with 0x77")]
    BadEnd { at: usize, found: u8 },
    #[error("register 0x{reg:02X}: checksum is 0x{found:04X}, the bytes sum to 0x{expected:04X}")]
    BadChecksum { reg: u8, expected: u16, found: u16 },
    #[error("{what}: data is {len} bytes, {need}")]
    PayloadLength {
        what: &'static str,
        len: usize,
        need: String,
    },
    #[error("{what}: {count} is more than the {max} allowed")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{what}: value 0x{value:04X} is not one of {allowed}")]
    BadValue {
        what: &'static str,
        value: u16,
        allowed: &'static str,
    },
    #[error("{what}: data is {len} bytes, at most 255 fit in a frame")]
    DataTooLong { what: &'static str, len: usize },
    #[error("{what}: byte {at} is 0x{found:02X}, not printable ASCII")]
    NotAscii {
        what: &'static str,
        at: usize,
        found: u8,
    },
    #[error("PIN frame: {0}")]
    Pin(String),
}

/// `0x10000 − sum(bytes)`, 16-bit (a zero sum gives 0).
pub fn checksum(bytes: &[u8]) -> u16 {
    let sum = bytes
        .iter()
        .fold(0u16, |a, &b| a.wrapping_add(u16::from(b)));
    0u16.wrapping_sub(sum)
}

/// Length of the JBD frame (request or response) at the start of `buf`: `Invalid` unless
/// it starts with `DD`, `NeedMore` until `4 + len + 3` bytes are there. The trailing `77`
/// is the decoder's business.
pub fn frame_length(buf: &[u8]) -> FrameLength {
    match (buf.first(), buf.get(3)) {
        (Some(&b), _) if b != START => FrameLength::Invalid,
        (None, _) | (_, None) => FrameLength::NeedMore,
        (_, Some(&len)) => {
            let n = OVERHEAD + usize::from(len);
            if buf.len() >= n {
                FrameLength::Complete(n)
            } else {
                FrameLength::NeedMore
            }
        }
    }
}

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Op {
    Read,
    Write,
}

impl Op {
    pub fn code(self) -> u8 {
        match self {
            Op::Read => OP_READ,
            Op::Write => OP_WRITE,
        }
    }
}

/// A request frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JbdRequest {
    pub op: Op,
    pub reg: u8,
    pub data: Vec<u8>,
}

/// A response frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JbdResponse {
    pub reg: u8,
    pub status: u8,
    pub data: Vec<u8>,
}

impl JbdResponse {
    pub fn is_ok(&self) -> bool {
        self.status == STATUS_OK
    }
}

/// Checks start, length, end byte; returns (byte1, byte2, data, checksum field, computed).
fn split_frame(frame: &[u8]) -> Result<(u8, u8, &[u8], u16, u16), JbdError> {
    let len = frame.len();
    let (Some(&start), Some(&b1), Some(&b2), Some(&declared)) =
        (frame.first(), frame.get(1), frame.get(2), frame.get(3))
    else {
        return Err(JbdError::TooShort { len, min: OVERHEAD });
    };
    if start != START {
        return Err(JbdError::BadStart { found: start });
    }
    let expected = OVERHEAD + usize::from(declared);
    if len < OVERHEAD {
        return Err(JbdError::TooShort { len, min: OVERHEAD });
    }
    if len != expected {
        return Err(JbdError::LengthMismatch {
            declared,
            expected,
            len,
        });
    }
    let end = frame[len - 1];
    if end != END {
        return Err(JbdError::BadEnd {
            at: len - 1,
            found: end,
        });
    }
    let data = &frame[4..len - 3];
    let found = u16::from_be_bytes([frame[len - 3], frame[len - 2]]);
    let computed = checksum(&frame[2..len - 3]);
    Ok((b1, b2, data, found, computed))
}

/// A request frame, checksum verified.
pub fn decode_request(frame: &[u8]) -> Result<JbdRequest, JbdError> {
    let (op, reg, data, found, expected) = split_frame(frame)?;
    let op = match op {
        OP_READ => Op::Read,
        OP_WRITE => Op::Write,
        found => return Err(JbdError::BadOp { found }),
    };
    if found != expected {
        return Err(JbdError::BadChecksum {
            reg,
            expected,
            found,
        });
    }
    Ok(JbdRequest {
        op,
        reg,
        data: data.to_vec(),
    })
}

/// A response frame, checksum verified.
pub fn decode_response(frame: &[u8]) -> Result<JbdResponse, JbdError> {
    match decode_response_unchecked(frame)? {
        (r, None) => Ok(r),
        (r, Some((expected, found))) => Err(JbdError::BadChecksum {
            reg: r.reg,
            expected,
            found,
        }),
    }
}

/// A response frame whose framing is right; a checksum mismatch comes back as
/// `Some((expected, found))` with the frame, for clients that do not check it.
pub fn decode_response_unchecked(
    frame: &[u8],
) -> Result<(JbdResponse, Option<(u16, u16)>), JbdError> {
    let (reg, status, data, found, expected) = split_frame(frame)?;
    let r = JbdResponse {
        reg,
        status,
        data: data.to_vec(),
    };
    Ok((r, (found != expected).then_some((expected, found))))
}

fn frame(b1: u8, b2: u8, data: &[u8], what: &'static str) -> Result<Vec<u8>, JbdError> {
    let len = u8::try_from(data.len()).map_err(|_| JbdError::DataTooLong {
        what,
        len: data.len(),
    })?;
    let mut f = Vec::with_capacity(OVERHEAD + data.len());
    f.extend_from_slice(&[START, b1, b2, len]);
    f.extend_from_slice(data);
    let chk = checksum(&f[2..]);
    f.extend_from_slice(&chk.to_be_bytes());
    f.push(END);
    Ok(f)
}

/// A request frame; fails only for data over 255 bytes.
pub fn encode_request(op: Op, reg: u8, data: &[u8]) -> Result<Vec<u8>, JbdError> {
    frame(op.code(), reg, data, "request")
}

/// `DD A5 reg 00 chk 77`.
pub fn encode_read(reg: u8) -> Vec<u8> {
    let chk = checksum(&[reg, 0]).to_be_bytes();
    vec![START, OP_READ, reg, 0, chk[0], chk[1], END]
}

/// A response frame; fails only for data over 255 bytes.
pub fn encode_response(reg: u8, status: u8, data: &[u8]) -> Result<Vec<u8>, JbdError> {
    frame(reg, status, data, "response")
}

/// The zero-length OK reply to a write, e.g. `DD E1 00 00 00 00 77`.
pub fn encode_ack(reg: u8) -> Vec<u8> {
    vec![START, reg, STATUS_OK, 0, 0, 0, END]
}

/// The error reply, `DD reg 80 00 FF 80 77`.
pub fn encode_error(reg: u8) -> Vec<u8> {
    let chk = checksum(&[STATUS_ERROR, 0]).to_be_bytes();
    vec![START, reg, STATUS_ERROR, 0, chk[0], chk[1], END]
}

/// Ways to break a well-formed frame on purpose (field faults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Malformation {
    /// Checksum field inverted (data intact).
    BadChecksum,
    /// Only the first `keep` data bytes are sent; length byte and checksum are those of
    /// the whole frame, and it still ends in `77` (reference fault 2).
    Truncated { keep: usize },
    /// The length byte says `len`; data and end unchanged, checksum recomputed over
    /// what is sent (the firmware got the count wrong, not the sum).
    WrongLength { len: u8 },
    /// Data byte `index` is XORed with `mask`, checksum left as it was (the frame got
    /// garbled after the checksum was computed; reference fault 3).
    CorruptData { index: usize, mask: u8 },
}

/// Applies `m` to a well-formed frame. A frame too short to hold the part `m` touches
/// comes back unchanged.
pub fn malform(frame: &[u8], m: Malformation) -> Vec<u8> {
    let n = frame.len();
    if n < OVERHEAD {
        return frame.to_vec();
    }
    let data_len = n - OVERHEAD;
    let mut out = frame.to_vec();
    match m {
        Malformation::BadChecksum => {
            out[n - 3] ^= 0xFF;
            out[n - 2] ^= 0xFF;
        }
        Malformation::Truncated { keep } => {
            let keep = keep.min(data_len);
            out.drain(4 + keep..n - 3);
        }
        Malformation::WrongLength { len } => {
            out[3] = len;
            let chk = checksum(&out[2..n - 3]).to_be_bytes();
            out[n - 3] = chk[0];
            out[n - 2] = chk[1];
        }
        Malformation::CorruptData { index, mask } => {
            if index < data_len {
                out[4 + index] ^= mask;
            }
        }
    }
    out
}

fn be16(d: &[u8], at: usize) -> u16 {
    match (d.get(at), d.get(at + 1)) {
        (Some(&h), Some(&l)) => u16::from_be_bytes([h, l]),
        _ => 0,
    }
}

/// Production date, `(year − 2000) << 9 | month << 5 | day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProductionDate {
    pub year: u16,
    pub month: u8,
    pub day: u8,
}

impl ProductionDate {
    pub fn from_raw(raw: u16) -> Self {
        ProductionDate {
            year: 2000 + (raw >> 9),
            month: ((raw >> 5) & 0x0F) as u8,
            day: (raw & 0x1F) as u8,
        }
    }
    /// The packed form; fields out of range (year 2000..=2127, month ≤ 15, day ≤ 31) are
    /// clamped so the packing cannot spill into a neighbour field.
    pub fn raw(self) -> u16 {
        (self.year.clamp(2000, 2127) - 2000) << 9
            | u16::from(self.month.min(15)) << 5
            | u16::from(self.day.min(31))
    }
}

impl fmt::Display for ProductionDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// Register 0x03, big-endian fields in the wire units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BasicInfo {
    /// Pack voltage, 10 mV.
    pub voltage_10mv: u16,
    /// Current, 10 mA, + = charging.
    pub current_10ma: i16,
    /// Remaining capacity, 10 mAh.
    pub remaining_10mah: u16,
    /// Nominal capacity, 10 mAh.
    pub nominal_10mah: u16,
    pub cycles: u16,
    /// Raw production date (see [`ProductionDate`]).
    pub production_date: u16,
    /// Bit i = cell i+1 balancing: bytes 12-13 are cells 1-16, bytes 14-15 cells 17-32.
    pub balance: u32,
    /// See [`protection`].
    pub protection: u16,
    pub software_version: u8,
    /// Relative state of charge, %.
    pub rsoc_pct: u8,
    /// See [`FET_CHARGE`], [`FET_DISCHARGE`].
    pub fet: u8,
    pub cell_count: u8,
    /// NTC temperatures, 0.1 K (2731 = 0 °C); the count byte is their number.
    pub ntc_deci_kelvin: Vec<u16>,
    /// Bytes after the temperatures: 7 on Chins packs (length 0x22 with 2 NTCs), empty on
    /// standard firmware. Kept raw so nothing on the wire is lost.
    pub extra: Vec<u8>,
}

impl BasicInfo {
    pub fn date(&self) -> ProductionDate {
        ProductionDate::from_raw(self.production_date)
    }
    /// NTC temperatures in °C.
    pub fn temps_c(&self) -> Vec<f64> {
        self.ntc_deci_kelvin
            .iter()
            .map(|&t| (f64::from(t) - f64::from(ZERO_C_DECI_KELVIN)) / 10.0)
            .collect()
    }
    /// Cells being balanced, 1-based.
    pub fn balancing_cells(&self) -> Vec<u8> {
        (0..32u8)
            .filter(|i| self.balance & (1 << i) != 0)
            .map(|i| i + 1)
            .collect()
    }
    pub fn protection_names(&self) -> Vec<String> {
        protection_names(self.protection)
    }

    pub fn decode(d: &[u8]) -> Result<Self, JbdError> {
        let what = "basic info (0x03)";
        if d.len() < BASIC_FIXED {
            return Err(JbdError::PayloadLength {
                what,
                len: d.len(),
                need: format!("need at least {BASIC_FIXED}"),
            });
        }
        let ntc = usize::from(d[22]);
        if ntc > MAX_NTC {
            return Err(JbdError::TooMany {
                what: "basic info (0x03) NTC count (byte 22)",
                count: ntc,
                max: MAX_NTC,
            });
        }
        let temps_end = BASIC_FIXED + 2 * ntc;
        if d.len() < temps_end {
            return Err(JbdError::PayloadLength {
                what,
                len: d.len(),
                need: format!("byte 22 says {ntc} NTCs, so at least {temps_end}"),
            });
        }
        Ok(BasicInfo {
            voltage_10mv: be16(d, 0),
            current_10ma: be16(d, 2) as i16,
            remaining_10mah: be16(d, 4),
            nominal_10mah: be16(d, 6),
            cycles: be16(d, 8),
            production_date: be16(d, 10),
            balance: u32::from(be16(d, 12)) | u32::from(be16(d, 14)) << 16,
            protection: be16(d, 16),
            software_version: d[18],
            rsoc_pct: d[19],
            fet: d[20],
            cell_count: d[21],
            ntc_deci_kelvin: (0..ntc).map(|i| be16(d, BASIC_FIXED + 2 * i)).collect(),
            extra: d[temps_end..].to_vec(),
        })
    }

    /// The payload; fails when more than [`MAX_NTC`] temperatures or the whole is over 255.
    pub fn encode(&self) -> Result<Vec<u8>, JbdError> {
        let ntc = self.ntc_deci_kelvin.len();
        if ntc > MAX_NTC {
            return Err(JbdError::TooMany {
                what: "basic info NTC count",
                count: ntc,
                max: MAX_NTC,
            });
        }
        let mut d = Vec::with_capacity(BASIC_FIXED + 2 * ntc + self.extra.len());
        for w in [
            self.voltage_10mv,
            self.current_10ma as u16,
            self.remaining_10mah,
            self.nominal_10mah,
            self.cycles,
            self.production_date,
            self.balance as u16,
            (self.balance >> 16) as u16,
            self.protection,
        ] {
            d.extend_from_slice(&w.to_be_bytes());
        }
        d.extend_from_slice(&[
            self.software_version,
            self.rsoc_pct,
            self.fet,
            self.cell_count,
            ntc as u8,
        ]);
        for t in &self.ntc_deci_kelvin {
            d.extend_from_slice(&t.to_be_bytes());
        }
        d.extend_from_slice(&self.extra);
        if d.len() > 255 {
            return Err(JbdError::DataTooLong {
                what: "basic info",
                len: d.len(),
            });
        }
        Ok(d)
    }
}

/// Register 0x04: one u16 mV per cell, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CellVoltages {
    pub cells_mv: Vec<u16>,
}

impl CellVoltages {
    pub fn decode(d: &[u8]) -> Result<Self, JbdError> {
        if !d.len().is_multiple_of(2) {
            return Err(JbdError::PayloadLength {
                what: "cell voltages (0x04)",
                len: d.len(),
                need: "need an even count (2 per cell)".into(),
            });
        }
        let cells = d.len() / 2;
        if cells > MAX_CELLS {
            return Err(JbdError::TooMany {
                what: "cell voltages (0x04) cells",
                count: cells,
                max: MAX_CELLS,
            });
        }
        Ok(CellVoltages {
            cells_mv: d
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect(),
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>, JbdError> {
        if self.cells_mv.len() > MAX_CELLS {
            return Err(JbdError::TooMany {
                what: "cell voltages cells",
                count: self.cells_mv.len(),
                max: MAX_CELLS,
            });
        }
        Ok(self.cells_mv.iter().flat_map(|c| c.to_be_bytes()).collect())
    }
}

fn check_ascii(what: &'static str, b: &[u8]) -> Result<(), JbdError> {
    match b.iter().position(|c| !(0x20..0x7F).contains(c)) {
        Some(at) => Err(JbdError::NotAscii {
            what,
            at,
            found: b[at],
        }),
        None => Ok(()),
    }
}

/// Register 0x05: the ASCII model string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HardwareVersion {
    pub model: String,
}

impl HardwareVersion {
    /// Printable ASCII, at most [`MAX_MODEL_LEN`] characters.
    pub fn decode(d: &[u8]) -> Result<Self, JbdError> {
        let what = "hardware version (0x05)";
        if d.len() > MAX_MODEL_LEN {
            return Err(JbdError::PayloadLength {
                what,
                len: d.len(),
                need: format!("at most {MAX_MODEL_LEN}"),
            });
        }
        check_ascii(what, d)?;
        Ok(HardwareVersion {
            model: d.iter().map(|&c| char::from(c)).collect(),
        })
    }
    pub fn encode(&self) -> Result<Vec<u8>, JbdError> {
        let b = self.model.as_bytes();
        Self::decode(b)?;
        Ok(b.to_vec())
    }
}

/// A length-prefixed string register (0xA0..=0xA2): `n` then `n` ASCII bytes.
pub fn decode_string(d: &[u8]) -> Result<String, JbdError> {
    let what = "string register";
    let Some((&n, rest)) = d.split_first() else {
        return Err(JbdError::PayloadLength {
            what,
            len: 0,
            need: "need a length byte".into(),
        });
    };
    if rest.len() != usize::from(n) {
        return Err(JbdError::PayloadLength {
            what,
            len: d.len(),
            need: format!("length byte says {n} + 1"),
        });
    }
    check_ascii(what, rest)?;
    Ok(rest.iter().map(|&c| char::from(c)).collect())
}

pub fn encode_string(s: &str) -> Result<Vec<u8>, JbdError> {
    let b = s.as_bytes();
    if b.len() > 254 {
        return Err(JbdError::DataTooLong {
            what: "string register",
            len: b.len() + 1,
        });
    }
    check_ascii("string register", b)?;
    let mut d = vec![b.len() as u8];
    d.extend_from_slice(b);
    Ok(d)
}

/// Names of the 0xAA counters, in wire order (bms-tools register map); the device sends
/// one more, reserved word (the protocol document's example frame has 12).
pub const ERROR_COUNTER_NAMES: [&str; 11] = [
    "short_circuit",
    "charge_oc",
    "discharge_oc",
    "cell_ov",
    "cell_uv",
    "charge_ot",
    "charge_ut",
    "discharge_ot",
    "discharge_ut",
    "pack_ov",
    "pack_uv",
];
/// Words the device sends in 0xAA.
pub const ERROR_COUNTER_WORDS: usize = 12;

/// Register 0xAA: u16 counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorCounters {
    pub counts: Vec<u16>,
}

impl ErrorCounters {
    pub fn decode(d: &[u8]) -> Result<Self, JbdError> {
        if !d.len().is_multiple_of(2) {
            return Err(JbdError::PayloadLength {
                what: "error counters (0xAA)",
                len: d.len(),
                need: "need an even count".into(),
            });
        }
        Ok(ErrorCounters {
            counts: d
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect(),
        })
    }
    pub fn encode(&self) -> Result<Vec<u8>, JbdError> {
        if self.counts.len() > 127 {
            return Err(JbdError::DataTooLong {
                what: "error counters",
                len: self.counts.len() * 2,
            });
        }
        Ok(self.counts.iter().flat_map(|c| c.to_be_bytes()).collect())
    }
    /// The counter for `name` (see [`ERROR_COUNTER_NAMES`]).
    pub fn get(&self, name: &str) -> Option<u16> {
        let i = ERROR_COUNTER_NAMES.iter().position(|n| *n == name)?;
        self.counts.get(i).copied()
    }
}

/// MOS control (0xE1) data `00 XX`: bit 0 = charge off, bit 1 = discharge off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MosControl {
    pub charge_off: bool,
    pub discharge_off: bool,
}

impl MosControl {
    /// Data must be two bytes with XX ≤ 3; the first byte (a priority level in newer
    /// documents) is not checked.
    pub fn decode(d: &[u8]) -> Result<Self, JbdError> {
        let [_, x] = d else {
            return Err(JbdError::PayloadLength {
                what: "MOS control (0xE1)",
                len: d.len(),
                need: "need 2".into(),
            });
        };
        if *x > 3 {
            return Err(JbdError::BadValue {
                what: "MOS control (0xE1) byte 1",
                value: u16::from(*x),
                allowed: "0 both on, 1 charge off, 2 discharge off, 3 both off",
            });
        }
        Ok(MosControl {
            charge_off: x & 1 != 0,
            discharge_off: x & 2 != 0,
        })
    }
    pub fn encode(self) -> [u8; 2] {
        [
            0,
            u8::from(self.charge_off) | u8::from(self.discharge_off) << 1,
        ]
    }
    /// The write request frame.
    pub fn request(self) -> Vec<u8> {
        let d = self.encode();
        let chk = checksum(&[reg::MOS_CONTROL, 2, d[0], d[1]]).to_be_bytes();
        vec![
            START,
            OP_WRITE,
            reg::MOS_CONTROL,
            2,
            d[0],
            d[1],
            chk[0],
            chk[1],
            END,
        ]
    }
}

/// Factory-mode writes (registers 0x00 and 0x01).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FactoryCommand {
    Enter,
    Exit,
    /// Exit, save, clear the error counters.
    ExitSave,
}

impl FactoryCommand {
    pub fn decode(reg: u8, d: &[u8]) -> Result<Self, JbdError> {
        match (reg, d) {
            (reg::FACTORY_ENTER, [0x56, 0x78]) => Ok(FactoryCommand::Enter),
            (reg::FACTORY_EXIT, [0x00, 0x00]) => Ok(FactoryCommand::Exit),
            (reg::FACTORY_EXIT, [0x28, 0x28]) => Ok(FactoryCommand::ExitSave),
            (reg::FACTORY_ENTER | reg::FACTORY_EXIT, _) => Err(JbdError::BadValue {
                what: "factory mode write",
                value: be16(d, 0),
                allowed: "56 78 (enter, reg 0x00), 00 00 or 28 28 (exit, reg 0x01)",
            }),
            _ => Err(JbdError::BadValue {
                what: "factory mode register",
                value: u16::from(reg),
                allowed: "0x00, 0x01",
            }),
        }
    }
    /// The write request frame.
    pub fn request(self) -> Vec<u8> {
        let (r, d) = match self {
            FactoryCommand::Enter => (reg::FACTORY_ENTER, FACTORY_ENTER_DATA),
            FactoryCommand::Exit => (reg::FACTORY_EXIT, FACTORY_EXIT_DATA),
            FactoryCommand::ExitSave => (reg::FACTORY_EXIT, FACTORY_EXIT_SAVE_DATA),
        };
        let chk = checksum(&[r, 2, d[0], d[1]]).to_be_bytes();
        vec![START, OP_WRITE, r, 2, d[0], d[1], chk[0], chk[1], END]
    }
}

/// Register 0x0A actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Action {
    /// `01 00`
    ResetSoc,
    /// `04 00`
    ClearAlarm,
    /// `07 00`
    AutoBalance,
}

impl Action {
    pub fn decode(d: &[u8]) -> Result<Self, JbdError> {
        match d {
            [0x01, 0x00] => Ok(Action::ResetSoc),
            [0x04, 0x00] => Ok(Action::ClearAlarm),
            [0x07, 0x00] => Ok(Action::AutoBalance),
            [_, _] => Err(JbdError::BadValue {
                what: "action (0x0A)",
                value: be16(d, 0),
                allowed: "01 00 reset SoC, 04 00 clear alarm, 07 00 auto-balance",
            }),
            _ => Err(JbdError::PayloadLength {
                what: "action (0x0A)",
                len: d.len(),
                need: "need 2".into(),
            }),
        }
    }
    pub fn encode(self) -> [u8; 2] {
        match self {
            Action::ResetSoc => [0x01, 0],
            Action::ClearAlarm => [0x04, 0],
            Action::AutoBalance => [0x07, 0],
        }
    }
    pub fn request(self) -> Vec<u8> {
        let d = self.encode();
        let chk = checksum(&[reg::ACTION, 2, d[0], d[1]]).to_be_bytes();
        vec![
            START,
            OP_WRITE,
            reg::ACTION,
            2,
            d[0],
            d[1],
            chk[0],
            chk[1],
            END,
        ]
    }
}

/// An EEPROM parameter value (0x10..=0x3F): one u16.
pub fn decode_param(d: &[u8]) -> Result<u16, JbdError> {
    match d {
        [h, l] => Ok(u16::from_be_bytes([*h, *l])),
        _ => Err(JbdError::PayloadLength {
            what: "EEPROM parameter",
            len: d.len(),
            need: "need 2".into(),
        }),
    }
}

// ---------------------------------------------------------------- PIN handshake

/// First two bytes of a PIN handshake frame.
pub const PIN_START: [u8; 2] = [0xFF, 0xAA];
/// Send the app key (ASCII, e.g. "000000").
pub const PIN_APP_KEY: u8 = 0x15;
/// Ask for the random byte (request has no data; the reply carries one byte).
pub const PIN_RANDOM: u8 = 0x17;
/// Send the user password, encrypted with [`pin_encrypt_password`].
pub const PIN_PASSWORD: u8 = 0x18;
/// Reply data: accepted.
pub const PIN_OK: u8 = 0x00;
/// Reply data: refused. The value is ours: no capture of a refusal was available.
pub const PIN_REFUSED: u8 = 0x01;

/// `FF AA cmd len <data> sum8`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PinFrame {
    pub cmd: u8,
    pub data: Vec<u8>,
}

/// Low byte of `cmd + len + data`.
pub fn pin_sum(cmd: u8, data: &[u8]) -> u8 {
    data.iter()
        .fold(cmd.wrapping_add(data.len() as u8), |a, &b| {
            a.wrapping_add(b)
        })
}

/// Length of the PIN frame at the start of `buf` (`5 + len`).
pub fn pin_frame_length(buf: &[u8]) -> FrameLength {
    match (buf.first(), buf.get(1), buf.get(3)) {
        (Some(&a), _, _) if a != PIN_START[0] => FrameLength::Invalid,
        (_, Some(&b), _) if b != PIN_START[1] => FrameLength::Invalid,
        (_, _, Some(&len)) if buf.len() >= 5 + usize::from(len) => {
            FrameLength::Complete(5 + usize::from(len))
        }
        _ => FrameLength::NeedMore,
    }
}

impl PinFrame {
    pub fn decode(frame: &[u8]) -> Result<Self, JbdError> {
        let (Some(&a), Some(&b), Some(&cmd), Some(&len)) =
            (frame.first(), frame.get(1), frame.get(2), frame.get(3))
        else {
            return Err(JbdError::Pin(format!(
                "{} bytes, need at least 5",
                frame.len()
            )));
        };
        if [a, b] != PIN_START {
            return Err(JbdError::Pin(format!(
                "starts {a:02X} {b:02X}, expected FF AA"
            )));
        }
        let n = 5 + usize::from(len);
        if frame.len() != n {
            return Err(JbdError::Pin(format!(
                "length byte says {len} data bytes, so {n} bytes, but it is {}",
                frame.len()
            )));
        }
        let data = &frame[4..n - 1];
        let expected = pin_sum(cmd, data);
        let found = frame[n - 1];
        if found != expected {
            return Err(JbdError::Pin(format!(
                "sum byte is 0x{found:02X}, expected 0x{expected:02X}"
            )));
        }
        Ok(PinFrame {
            cmd,
            data: data.to_vec(),
        })
    }

    /// The frame; fails only for data over 255 bytes.
    pub fn encode(&self) -> Result<Vec<u8>, JbdError> {
        let len = u8::try_from(self.data.len()).map_err(|_| JbdError::DataTooLong {
            what: "PIN frame",
            len: self.data.len(),
        })?;
        let mut f = vec![PIN_START[0], PIN_START[1], self.cmd, len];
        f.extend_from_slice(&self.data);
        f.push(pin_sum(self.cmd, &self.data));
        Ok(f)
    }
}

/// The user password as the module expects it: byte i = `(mac[i] ^ password[i]) +
/// random` (wrapping), `mac` being the BMS's own Bluetooth address as printed
/// (most significant byte first). Passwords are 6 characters; extra ones are dropped.
pub fn pin_encrypt_password(password: &[u8], mac: [u8; 6], random: u8) -> Vec<u8> {
    password
        .iter()
        .zip(mac)
        .map(|(&p, m)| (m ^ p).wrapping_add(random))
        .collect()
}

// ---------------------------------------------------------------- client reassembly

/// Why the assembler dropped bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SkipReason {
    /// Bytes before a `DD` / `FF AA` (noise, the tail of a lost frame, foreign frames).
    NoStart,
    /// A `DD` whose frame did not end in `77` at `4 + len + 2`: not a frame start.
    BadEnd,
    /// An `FF AA` frame whose sum byte is wrong.
    BadPinSum,
}

/// What [`JbdResponseAssembler::push`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Assembled {
    /// A whole response with a good checksum (any status).
    Response(JbdResponse),
    /// A whole, well-framed response whose checksum is wrong. Strict clients drop it;
    /// many real ones use it anyway.
    BadChecksum {
        response: JbdResponse,
        expected: u16,
        found: u16,
    },
    /// A PIN handshake reply.
    Pin(PinFrame),
    /// Dropped bytes.
    Skipped { bytes: Vec<u8>, reason: SkipReason },
}

/// Client-side reassembly of responses from notification chunks: drops bytes until
/// `DD` (or `FF AA`), waits for `4 + len + 3` bytes, checks the trailing `77`, then the
/// checksum. Memory is bounded by one frame (≤ 262 bytes) plus the last chunk.
#[derive(Debug, Default, Clone)]
pub struct JbdResponseAssembler {
    buf: Vec<u8>,
}

impl JbdResponseAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held waiting for the rest of a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Gives up on a partial frame (call on a response timeout); returns what was held.
    pub fn reset(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Feeds one notification's bytes; returns every frame (and every skip) completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Assembled> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut skipped: Vec<u8> = Vec::new();
        let mut pos = 0;
        let flush = |skipped: &mut Vec<u8>, out: &mut Vec<Assembled>, reason| {
            if !skipped.is_empty() {
                out.push(Assembled::Skipped {
                    bytes: std::mem::take(skipped),
                    reason,
                });
            }
        };
        while let Some(rest) = self.buf.get(pos..).filter(|r| !r.is_empty()) {
            if rest[0] == START {
                match frame_length(rest) {
                    FrameLength::Complete(n) => {
                        let f = &rest[..n];
                        match decode_response_unchecked(f) {
                            Ok((response, bad)) => {
                                flush(&mut skipped, &mut out, SkipReason::NoStart);
                                out.push(match bad {
                                    None => Assembled::Response(response),
                                    Some((expected, found)) => Assembled::BadChecksum {
                                        response,
                                        expected,
                                        found,
                                    },
                                });
                                pos += n;
                            }
                            Err(_) => {
                                // Not a frame start after all: drop the DD and resync.
                                flush(&mut skipped, &mut out, SkipReason::NoStart);
                                out.push(Assembled::Skipped {
                                    bytes: vec![START],
                                    reason: SkipReason::BadEnd,
                                });
                                pos += 1;
                            }
                        }
                    }
                    _ => break,
                }
            } else if rest[0] == PIN_START[0] && rest.get(1).is_none_or(|&b| b == PIN_START[1]) {
                match pin_frame_length(rest) {
                    FrameLength::Complete(n) => match PinFrame::decode(&rest[..n]) {
                        Ok(p) => {
                            flush(&mut skipped, &mut out, SkipReason::NoStart);
                            out.push(Assembled::Pin(p));
                            pos += n;
                        }
                        Err(_) => {
                            flush(&mut skipped, &mut out, SkipReason::NoStart);
                            out.push(Assembled::Skipped {
                                bytes: rest[..2].to_vec(),
                                reason: SkipReason::BadPinSum,
                            });
                            pos += 2;
                        }
                    },
                    _ => break,
                }
            } else {
                skipped.push(rest[0]);
                pos += 1;
            }
        }
        flush(&mut skipped, &mut out, SkipReason::NoStart);
        self.buf.drain(..pos.min(self.buf.len()));
        out
    }
}


/// A response frame as named fields in wire order (register, status, length, the basic
/// info or cell voltages field by field, other data as hex, the checksum), for showing
/// where two answers differ. A bad checksum still shows the fields and says so; a frame
/// that is no response gives a `frame` field saying why.
pub fn response_fields(frame: &[u8]) -> Vec<(String, String)> {
    let (r, bad) = match decode_response_unchecked(frame) {
        Ok(x) => x,
        Err(e) => return vec![("frame".into(), format!("no JBD response: {e}"))],
    };
    let mut out = vec![
        ("register".to_string(), format!("0x{:02X}", r.reg)),
        ("status".to_string(), format!("0x{:02X}", r.status)),
        ("length".to_string(), r.data.len().to_string()),
    ];
    let mut push = |name: &str, value: String| out.push((name.to_string(), value));
    let decoded = match r.reg {
        _ if !r.is_ok() => false,
        reg::BASIC_INFO => match BasicInfo::decode(&r.data) {
            Ok(b) => {
                push("voltage, 10 mV", b.voltage_10mv.to_string());
                push("current, 10 mA", b.current_10ma.to_string());
                push("remaining, 10 mAh", b.remaining_10mah.to_string());
                push("nominal, 10 mAh", b.nominal_10mah.to_string());
                push("cycles", b.cycles.to_string());
                push("production date", b.date().to_string());
                push("balancing", format!("0x{:08X}", b.balance));
                push("protection", format!("0x{:04X}", b.protection));
                push("software version", format!("0x{:02X}", b.software_version));
                push("RSOC, %", b.rsoc_pct.to_string());
                push("FET", format!("0x{:02X}", b.fet));
                push("cell count", b.cell_count.to_string());
                push("NTC count", b.ntc_deci_kelvin.len().to_string());
                for (i, t) in b.ntc_deci_kelvin.iter().enumerate() {
                    out.push((format!("NTC {}, 0.1 K", i + 1), t.to_string()));
                }
                if !b.extra.is_empty() {
                    out.push(("extra".into(), super::lower_hex(&b.extra)));
                }
                true
            }
            Err(_) => false,
        },
        reg::CELL_VOLTAGES => match CellVoltages::decode(&r.data) {
            Ok(c) => {
                out.extend(c.cells_mv.iter().enumerate().map(|(i, mv)| (format!("cell {}, mV", i + 1), mv.to_string())));
                true
            }
            Err(_) => false,
        },
        _ => false,
    };
    if !decoded {
        out.push(("data".into(), super::lower_hex(&r.data)));
    }
    let checksum = match bad {
        None => match frame.len().checked_sub(3).and_then(|at| frame.get(at..at + 2)) {
            Some(&[hi, lo]) => format!("0x{:04X}", u16::from_be_bytes([hi, lo])),
            _ => "right".to_string(),
        },
        Some((expected, found)) => format!("0x{found:04X} (bad: its bytes give 0x{expected:04X})"),
    };
    out.push(("checksum".into(), checksum));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split([' ', ':'])
            .filter(|t| !t.is_empty())
            .map(|t| u8::from_str_radix(t, 16).unwrap())
            .collect()
    }

    #[test]
    fn reference_example_frames() {
        assert_eq!(encode_read(reg::BASIC_INFO), hex("DD A5 03 00 FF FD 77"));
        assert_eq!(
            encode_request(Op::Read, 3, &[]).unwrap(),
            hex("DD A5 03 00 FF FD 77")
        );
        let mos = MosControl {
            charge_off: false,
            discharge_off: true,
        };
        assert_eq!(mos.request(), hex("DD 5A E1 02 00 02 FF 1B 77"));
        let req = decode_request(&hex("DD 5A E1 02 00 02 FF 1B 77")).unwrap();
        assert_eq!((req.op, req.reg), (Op::Write, reg::MOS_CONTROL));
        assert_eq!(MosControl::decode(&req.data).unwrap(), mos);
        assert_eq!(encode_ack(reg::MOS_CONTROL), hex("DD E1 00 00 00 00 77"));
        let ack = decode_response(&hex("DD E1 00 00 00 00 77")).unwrap();
        assert_eq!(
            ack,
            JbdResponse {
                reg: 0xE1,
                status: 0,
                data: vec![]
            }
        );
        assert_eq!(encode_response(0xE1, 0, &[]).unwrap(), encode_ack(0xE1));
        assert_eq!(
            FactoryCommand::Enter.request(),
            hex("dd:5a:00:02:56:78:ff:30:77")
        );
        assert_eq!(encode_read(4), hex("DD A5 04 00 FF FC 77"));
        assert_eq!(encode_read(5), hex("DD A5 05 00 FF FB 77"));
        assert_eq!(encode_read(0xAA), hex("DD A5 AA 00 FF 56 77"));
        assert_eq!(encode_error(3), hex("DD 03 80 00 FF 80 77"));
        assert_eq!(
            decode_response(&encode_error(3)).unwrap().status,
            STATUS_ERROR
        );
    }

    #[test]
    fn captured_responses_decode() {
        // 4S, 3 NTCs (from a public capture of a real pack).
        let f = hex("dd:03:00:1d:05:71:00:00:4e:17:4e:20:00:02:31:1a:00:00:00:00:00:00:44:64:03:04:03:0b:c9:0b:c3:0b:c4:fb:2a:77");
        let r = decode_response(&f).unwrap();
        let b = BasicInfo::decode(&r.data).unwrap();
        assert_eq!(b.voltage_10mv, 0x0571);
        assert_eq!(
            (b.remaining_10mah, b.nominal_10mah, b.cycles),
            (19991, 20000, 2)
        );
        assert_eq!((b.rsoc_pct, b.fet, b.cell_count), (100, 3, 4));
        assert_eq!(b.ntc_deci_kelvin, vec![3017, 3011, 3012]);
        assert!((b.temps_c()[0] - 28.6).abs() < 1e-9);
        assert_eq!(b.date().to_string(), "2024-08-26");
        assert!(b.extra.is_empty());
        assert_eq!(encode_response(3, 0, &b.encode().unwrap()).unwrap(), f);

        let f = hex("dd:04:00:08:0d:87:0d:c1:0d:ca:0d:59:fd:59:77");
        let c = CellVoltages::decode(&decode_response(&f).unwrap().data).unwrap();
        assert_eq!(c.cells_mv, vec![3463, 3521, 3530, 3417]);

        // Protocol document V13 examples (15 cells, 2 NTCs; model "0123456789").
        let f = hex("DD 03 00 1B 17 00 00 00 02 D0 03 E8 00 00 20 78 00 00 00 00 00 00 10 48 03 0F 02 0B 76 0B 82 FB FF 77");
        let b = BasicInfo::decode(&decode_response(&f).unwrap().data).unwrap();
        assert_eq!(
            (b.cell_count, b.date().to_string()),
            (15, "2016-03-24".to_string())
        );
        let f = hex("DD 04 00 1E 0F 66 0F 63 0F 63 0F 64 0F 3E 0F 63 0F 37 0F 5B 0F 65 0F 3B 0F 63 0F 63 0F 3C 0F 66 0F 3D F9 F9 77");
        assert_eq!(
            CellVoltages::decode(&decode_response(&f).unwrap().data)
                .unwrap()
                .cells_mv
                .len(),
            15
        );
        let f = hex("DD 05 00 0A 30 31 32 33 34 35 36 37 38 39 FD E9 77");
        assert_eq!(
            HardwareVersion::decode(&decode_response(&f).unwrap().data)
                .unwrap()
                .model,
            "0123456789"
        );
        // The document's 0xAA example declares 24 bytes but shows 20; its checksum (0xFFE8)
        // is what 24 zero bytes give.
        let f = encode_response(0xAA, 0, &[0; 24]).unwrap();
        assert_eq!(&f[f.len() - 3..], &[0xFF, 0xE8, END]);
        assert_eq!(
            ErrorCounters::decode(&decode_response(&f).unwrap().data)
                .unwrap()
                .counts,
            vec![0; 12]
        );
    }

    #[test]
    fn decode_errors_say_what_and_where() {
        assert_eq!(
            decode_request(&[]),
            Err(JbdError::TooShort { len: 0, min: 7 })
        );
        assert_eq!(
            decode_request(&hex("DE A5 03 00 FF FD 77")),
            Err(JbdError::BadStart { found: 0xDE })
        );
        assert_eq!(
            decode_request(&hex("DD A6 03 00 FF FD 77")),
            Err(JbdError::BadOp { found: 0xA6 })
        );
        assert_eq!(
            decode_request(&hex("DD A5 03 00 FF FC 77")),
            Err(JbdError::BadChecksum {
                reg: 3,
                expected: 0xFFFD,
                found: 0xFFFC
            })
        );
        assert_eq!(
            decode_request(&hex("DD A5 03 00 FF FD 78")),
            Err(JbdError::BadEnd { at: 6, found: 0x78 })
        );
        assert_eq!(
            decode_request(&hex("DD A5 03 01 FF FD 77")),
            Err(JbdError::LengthMismatch {
                declared: 1,
                expected: 8,
                len: 7
            })
        );
        let e = decode_response(&hex("DD 03 00 00 FF FF 77")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "register 0x03: checksum is 0xFFFF, the bytes sum to 0x0000"
        );
        let e = BasicInfo::decode(&[0; 22]).unwrap_err();
        assert!(e.to_string().contains("at least 23"), "{e}");
        let mut d = vec![0; 23];
        d[22] = 7;
        assert!(matches!(
            BasicInfo::decode(&d),
            Err(JbdError::TooMany { count: 7, .. })
        ));
        d[22] = 2;
        assert!(BasicInfo::decode(&d)
            .unwrap_err()
            .to_string()
            .contains("2 NTCs"));
        assert!(CellVoltages::decode(&[1, 2, 3]).is_err());
        assert!(CellVoltages::decode(&[0; 66]).is_err());
        assert!(HardwareVersion::decode(b"JBD\x01")
            .unwrap_err()
            .to_string()
            .contains("byte 3"));
        assert!(MosControl::decode(&[0, 4]).is_err());
        assert!(Action::decode(&[2, 0]).is_err());
        assert!(FactoryCommand::decode(0, &[0x56, 0x79]).is_err());
        assert!(decode_string(&[3, b'a']).is_err());
        assert!(encode_response(3, 0, &[0; 256]).is_err());
    }

    #[test]
    fn basic_info_round_trip_and_chins_extra() {
        let b = BasicInfo {
            voltage_10mv: 5312,
            current_10ma: -1234,
            remaining_10mah: 8000,
            nominal_10mah: 10000,
            cycles: 42,
            production_date: ProductionDate {
                year: 2024,
                month: 3,
                day: 15,
            }
            .raw(),
            balance: 0x0002_8001,
            protection: protection::CELL_OV | protection::SOFTWARE_LOCK,
            software_version: 0x80,
            rsoc_pct: 80,
            fet: FET_DISCHARGE,
            cell_count: 18,
            ntc_deci_kelvin: vec![2981, 2631],
            extra: vec![1, 2, 3, 4, 5, 6, 7],
        };
        let d = b.encode().unwrap();
        assert_eq!(d.len(), 0x22, "Chins: 23 + 2 NTCs + 7");
        assert_eq!(
            &d[12..16],
            &[0x80, 0x01, 0x00, 0x02],
            "cells 1-16 first, then 17-32"
        );
        let back = BasicInfo::decode(&d).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.balancing_cells(), vec![1, 16, 18]);
        assert_eq!(back.protection_names(), vec!["cell_ov", "software_lock"]);
        assert_eq!(back.temps_c(), vec![25.0, -10.0]);
        assert_eq!(back.date().to_string(), "2024-03-15");
        assert_eq!(protection_names(1 << 14), vec!["bit14"]);
    }

    #[test]
    fn strings_counters_params_actions() {
        let d = encode_string("JBD").unwrap();
        assert_eq!(d, vec![3, b'J', b'B', b'D']);
        assert_eq!(decode_string(&d).unwrap(), "JBD");
        let c = ErrorCounters {
            counts: (1..=12).collect(),
        };
        let back = ErrorCounters::decode(&c.encode().unwrap()).unwrap();
        assert_eq!(
            (
                back.get("short_circuit"),
                back.get("pack_uv"),
                back.get("x")
            ),
            (Some(1), Some(11), None)
        );
        assert_eq!(decode_param(&[0x0C, 0xE4]).unwrap(), 3300);
        for a in [Action::ResetSoc, Action::ClearAlarm, Action::AutoBalance] {
            let r = decode_request(&a.request()).unwrap();
            assert_eq!((r.reg, Action::decode(&r.data).unwrap()), (reg::ACTION, a));
        }
        for f in [
            FactoryCommand::Enter,
            FactoryCommand::Exit,
            FactoryCommand::ExitSave,
        ] {
            let r = decode_request(&f.request()).unwrap();
            assert_eq!(FactoryCommand::decode(r.reg, &r.data).unwrap(), f);
        }
    }

    #[test]
    fn pin_frames_and_password_encryption() {
        // Captures from public traces of PIN-protected modules.
        let app = PinFrame {
            cmd: PIN_APP_KEY,
            data: b"000000".to_vec(),
        };
        assert_eq!(
            app.encode().unwrap(),
            hex("ff:aa:15:06:30:30:30:30:30:30:3b")
        );
        assert_eq!(
            PinFrame::decode(&hex("ff:aa:15:01:00:16")).unwrap(),
            PinFrame {
                cmd: 0x15,
                data: vec![0]
            }
        );
        assert_eq!(
            PinFrame {
                cmd: PIN_RANDOM,
                data: vec![]
            }
            .encode()
            .unwrap(),
            hex("ff:aa:17:00:17")
        );
        assert_eq!(
            PinFrame::decode(&hex("ff:aa:17:01:24:3c")).unwrap().data,
            vec![0x24]
        );
        let mac = [0x10, 0xa5, 0x62, 0x32, 0x75, 0x36];
        let enc = pin_encrypt_password(b"123456", mac, 0x24);
        assert_eq!(enc, hex("45 bb 75 2a 64 24"));
        assert_eq!(
            PinFrame {
                cmd: PIN_PASSWORD,
                data: enc
            }
            .encode()
            .unwrap(),
            hex("ff:aa:18:06:45:bb:75:2a:64:24:45")
        );
        let mac = [0xa4, 0xc1, 0x37, 0x04, 0x2d, 0xbe];
        assert_eq!(
            pin_encrypt_password(b"123412", mac, 0x61),
            hex("f6 54 65 91 7d ed")
        );
        assert!(PinFrame::decode(&hex("ff:aa:17:01:24:3d"))
            .unwrap_err()
            .to_string()
            .contains("sum byte"));
        assert!(PinFrame::decode(&hex("ff:aa:17:02:24:3d")).is_err());
        assert_eq!(pin_frame_length(&hex("ff aa 17")), FrameLength::NeedMore);
        assert_eq!(pin_frame_length(&hex("ff ab")), FrameLength::Invalid);
    }

    #[test]
    fn malformations() {
        let good =
            encode_response(4, 0, &[0x0C, 0xE4, 0x0C, 0xE5, 0x0C, 0xE6, 0x0C, 0xE7]).unwrap();
        let bad = malform(&good, Malformation::BadChecksum);
        assert!(matches!(
            decode_response(&bad),
            Err(JbdError::BadChecksum { .. })
        ));
        assert_eq!(
            decode_response_unchecked(&bad).unwrap().0,
            decode_response(&good).unwrap()
        );

        let t = malform(&good, Malformation::Truncated { keep: 3 });
        assert_eq!(t.len(), 10);
        assert_eq!(
            (t[3], t[t.len() - 1]),
            (8, END),
            "length byte kept, still ends in 77"
        );
        assert!(matches!(
            decode_response(&t),
            Err(JbdError::LengthMismatch { declared: 8, .. })
        ));

        let w = malform(&good, Malformation::WrongLength { len: 6 });
        assert!(matches!(
            decode_response(&w),
            Err(JbdError::LengthMismatch {
                declared: 6,
                expected: 13,
                len: 15
            })
        ));

        let c = malform(
            &good,
            Malformation::CorruptData {
                index: 0,
                mask: 0x80,
            },
        );
        let (r, bad) = decode_response_unchecked(&c).unwrap();
        assert_eq!(r.data[0], 0x8C);
        assert!(bad.is_some());
        assert_eq!(malform(&[1, 2], Malformation::BadChecksum), vec![1, 2]);
    }

    #[test]
    fn assembler_handles_split_noise_foreign_and_bad_checksums() {
        let f03 = hex("dd:03:00:1d:05:71:00:00:4e:17:4e:20:00:02:31:1a:00:00:00:00:00:00:44:64:03:04:03:0b:c9:0b:c3:0b:c4:fb:2a:77");
        let mut a = JbdResponseAssembler::new();
        // 20 + 16 byte notifications, then a lone 77 case.
        assert!(a.push(&f03[..20]).is_empty());
        assert_eq!(a.pending(), 20);
        let out = a.push(&f03[20..]);
        assert!(matches!(&out[..], [Assembled::Response(r)] if r.reg == 3));
        assert!(a.push(&f03[..f03.len() - 1]).is_empty());
        assert!(matches!(&a.push(&[END])[..], [Assembled::Response(_)]));

        // Foreign frame and noise before, two frames in one chunk.
        let f04 = hex("dd:04:00:08:0d:87:0d:c1:0d:ca:0d:59:fd:59:77");
        let mut chunk = hex("FE 01 02 03 77");
        chunk.extend_from_slice(&f04);
        chunk.extend_from_slice(&f03);
        let out = a.push(&chunk);
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(
            out[0],
            Assembled::Skipped {
                bytes: hex("FE 01 02 03 77"),
                reason: SkipReason::NoStart
            }
        );
        assert!(matches!(&out[1], Assembled::Response(r) if r.reg == 4));
        assert_eq!(a.pending(), 0);

        // Bad checksum is reported with the frame.
        let bad = malform(&f04, Malformation::BadChecksum);
        assert!(
            matches!(&a.push(&bad)[..], [Assembled::BadChecksum { response, .. }] if response.data.len() == 8)
        );

        // Truncated-but-ends-in-77 followed by a good frame: the truncated one is skipped
        // once the next frame's bytes show it cannot end where its length says.
        let t = malform(&f04, Malformation::Truncated { keep: 4 });
        assert!(
            a.push(&t).is_empty(),
            "waits for the bytes the length promises"
        );
        let out = a.push(&f03);
        assert!(
            matches!(out.last(), Some(Assembled::Response(r)) if r.reg == 3),
            "{out:?}"
        );
        assert!(out.iter().any(|o| matches!(
            o,
            Assembled::Skipped {
                reason: SkipReason::BadEnd,
                ..
            }
        )));
        assert_eq!(a.pending(), 0);

        // A timeout reset gives back the partial frame.
        a.push(&f03[..10]);
        assert_eq!(a.reset(), f03[..10].to_vec());

        // PIN replies come through too.
        assert_eq!(
            a.push(&hex("ff:aa:17:01:24:3c")),
            vec![Assembled::Pin(PinFrame {
                cmd: 0x17,
                data: vec![0x24]
            })]
        );
        assert!(matches!(
            &a.push(&hex("ff:aa:17:01:24:3d"))[0],
            Assembled::Skipped {
                reason: SkipReason::BadPinSum,
                ..
            }
        ));
    }

    #[test]
    fn frame_length_waits_for_length_byte() {
        assert_eq!(frame_length(&[]), FrameLength::NeedMore);
        assert_eq!(frame_length(&[0xDD, 3, 0]), FrameLength::NeedMore);
        assert_eq!(
            frame_length(&[0xDD, 3, 0, 2, 0, 0, 0, 0]),
            FrameLength::NeedMore
        );
        assert_eq!(
            frame_length(&[0xDD, 3, 0, 2, 0, 0, 0, 0, 0]),
            FrameLength::Complete(9)
        );
        assert_eq!(frame_length(&[0xFE]), FrameLength::Invalid);
    }
}
