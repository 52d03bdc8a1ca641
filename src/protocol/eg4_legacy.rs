//! The legacy EG4 LifePower4 binary protocol (`7E … 0D`), the bridge's `active` mode.
//!
//! ```text
//! request: 7E addr cmd 00 chk 0D                 chk = (0x100 - (addr + cmd + len)) & 0xFF
//! reply:   7E addr cmd len <len payload bytes> chk 0D
//! ```
//!
//! Commands: 0x01 general status, 0x33 firmware version, 0x42 hardware version.
//!
//! The status payload (0x01) is ten groups `id count <count × u16 BE>`, ids 0x01..=0x0A in
//! this order; clients take them **by position** (ids are not checked):
//!
//! | # | content                                                                    | field            |
//! |---|----------------------------------------------------------------------------|------------------|
//! | 1 | cell mV; bit 15 set = cell in over-voltage alarm (clients mask 0x7FFF)     | `cells_mv`, `cell_ov_flags` |
//! | 2 | current, `30000 − A×100` (so charging (+) reads below 30000)               | `current_ca`     |
//! | 3 | SoC × 100                                                                  | `soc_centi`      |
//! | 4 | capacity, Ah × 100                                                         | `capacity_cah`   |
//! | 5 | temperatures, low byte − 50 = °C                                           | `temps_c`        |
//! | 6 | alarm words (second word: see [`alarm`])                                   | `alarms`         |
//! | 7 | cycle count                                                                | `cycles`         |
//! | 8 | pack voltage, V × 100                                                      | `pack_cv`        |
//! | 9, 10 | undecoded (encoded empty; may be absent when decoding)                 | —                |
//!
//! Clients validate framing but not the reply checksum (its algorithm is unknown and
//! 0x00 is tolerated), so [`decode_reply`] does not check it; our encoder writes the
//! request-style checksum over `addr + cmd + len + payload`.
//!
//! Request checksums: public clients send `7E 01 33 00 FE 0D` and `7E 01 42 00 FC 0D` for
//! the version commands, which do *not* match the formula (it gives 0xCC and 0xBD), and real
//! packs answer them. [`decode_request`] therefore reports the checksum
//! ([`LegacyRequest::checksum_valid`]) instead of rejecting the frame; the simulator
//! decides what to do with a mismatch.
//!
//! Never panics on any input.

use serde::{Deserialize, Serialize};

use super::modbus::FrameLength;

/// First byte of every frame.
pub const START: u8 = 0x7E;
/// Last byte of every frame.
pub const END: u8 = 0x0D;
/// Request frame length.
pub const REQUEST_LEN: usize = 6;
/// Largest payload the one-byte length field allows.
pub const MAX_PAYLOAD: usize = 255;
/// Offset of the current encoding: raw = `CURRENT_OFFSET − current_ca`.
pub const CURRENT_OFFSET: i32 = 30_000;
/// Offset of the temperature encoding: raw low byte = °C + 50.
pub const TEMP_OFFSET: i16 = 50;
/// Cell word flag: cell in over-voltage alarm.
pub const CELL_OV_FLAG: u16 = 0x8000;

/// Bits of the *second* alarm word (group 6, index 1).
pub mod alarm {
    /// Over-current protection.
    pub const OVER_CURRENT: u16 = 1 << 3;
    /// Over-voltage protection.
    pub const VOLTAGE_HIGH: u16 = 1 << 4;
    /// Under-voltage protection.
    pub const VOLTAGE_LOW: u16 = 1 << 5;
    /// Charge over-temperature protection.
    pub const CHARGE_TEMP_HIGH: u16 = 1 << 6;
    /// Charge under-temperature protection.
    pub const CHARGE_TEMP_LOW: u16 = 1 << 7;
    /// Every known bit with its name.
    pub const ALL: &[(u16, &str)] = &[
        (OVER_CURRENT, "over_current"),
        (VOLTAGE_HIGH, "voltage_high"),
        (VOLTAGE_LOW, "voltage_low"),
        (CHARGE_TEMP_HIGH, "charge_temp_high"),
        (CHARGE_TEMP_LOW, "charge_temp_low"),
    ];
}

/// Names of the known bits set in the second alarm word.
pub fn alarm_names(second_word: u16) -> Vec<&'static str> {
    alarm::ALL
        .iter()
        .filter(|(mask, _)| second_word & mask != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// A legacy command byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LegacyCommand {
    /// 0x01: general status (cells, current, SoC, ...).
    GeneralStatus,
    /// 0x33: firmware version (ASCII).
    FirmwareVersion,
    /// 0x42: hardware version (ASCII).
    HardwareVersion,
    /// Any other byte (`from_u8` never produces `Other(0x01 | 0x33 | 0x42)`).
    Other(u8),
}

impl LegacyCommand {
    /// The command byte.
    pub fn code(self) -> u8 {
        match self {
            LegacyCommand::GeneralStatus => 0x01,
            LegacyCommand::FirmwareVersion => 0x33,
            LegacyCommand::HardwareVersion => 0x42,
            LegacyCommand::Other(c) => c,
        }
    }

    /// The command for a byte.
    pub fn from_u8(code: u8) -> Self {
        match code {
            0x01 => LegacyCommand::GeneralStatus,
            0x33 => LegacyCommand::FirmwareVersion,
            0x42 => LegacyCommand::HardwareVersion,
            c => LegacyCommand::Other(c),
        }
    }
}

/// Why a legacy frame could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegacyError {
    /// Fewer bytes than the smallest frame.
    #[error("legacy frame too short: {len} byte(s), need at least {min}")]
    TooShort { len: usize, min: usize },
    /// First byte is not 0x7E.
    #[error("legacy frame must start with 0x7E, found 0x{found:02X}")]
    BadStart { found: u8 },
    /// Last byte is not 0x0D.
    #[error("legacy frame must end with 0x0D, found 0x{found:02X}")]
    BadEnd { found: u8 },
    /// Frame length disagrees with the length byte.
    #[error("legacy frame length mismatch: length byte implies {expected} bytes, got {got}")]
    LengthMismatch { expected: usize, got: usize },
    /// A request whose length byte is not 0.
    #[error("legacy request must have length byte 0, found {len}")]
    RequestHasPayload { len: u8 },
    /// Reply to a different command than the decoder expects.
    #[error("expected a reply to command 0x{expected:02X}, got command 0x{got:02X}")]
    UnexpectedCommand { expected: u8, got: u8 },
    /// A status group runs past the end of the payload.
    #[error("status group {group} is truncated: it needs {needed} bytes, only {available} left in the payload")]
    TruncatedGroup {
        group: usize,
        needed: usize,
        available: usize,
    },
    /// Fewer status groups than clients read.
    #[error("status payload has {found} group(s), clients read at least {needed}")]
    TooFewGroups { found: usize, needed: usize },
    /// Bytes after the tenth group.
    #[error("status payload has {count} unexpected byte(s) after group 10")]
    TrailingBytes { count: usize },
    /// A group whose first value clients read is empty.
    #[error("status group {group} ({name}) is empty, clients read its first value")]
    EmptyGroup { group: usize, name: &'static str },
    /// Payload longer than the length byte can express.
    #[error("payload of {len} bytes does not fit the one-byte length field (max {max})")]
    PayloadTooLong { len: usize, max: usize },
    /// A group with more values than its one-byte count can express.
    #[error("{group} has {count} values, a group holds at most {max}")]
    TooManyValues {
        group: &'static str,
        count: usize,
        max: usize,
    },
    /// A value outside what its wire encoding can carry.
    #[error("{field} = {value} cannot be encoded: allowed range is {min}..={max}")]
    ValueOutOfRange {
        field: &'static str,
        value: i64,
        min: i64,
        max: i64,
    },
    /// `cell_ov_flags` and `cells_mv` differ in length.
    #[error("{flags} over-voltage flags for {cells} cells: need one flag per cell")]
    FlagCountMismatch { cells: usize, flags: usize },
}

/// The checksum of the request formula applied to `bytes` (addr, cmd, len, payload...):
/// `(0x100 − sum) & 0xFF`.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

// ---------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------

/// A decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LegacyRequest {
    /// Pack address.
    pub address: u8,
    /// Command.
    pub command: LegacyCommand,
    /// The checksum byte as received.
    pub checksum: u8,
}

impl LegacyRequest {
    /// The checksum the formula gives for this address and command.
    pub fn expected_checksum(&self) -> u8 {
        checksum(&[self.address, self.command.code(), 0])
    }

    /// Whether the received checksum matches the formula (real clients get it wrong for
    /// 0x33/0x42, see the module docs).
    pub fn checksum_valid(&self) -> bool {
        self.checksum == self.expected_checksum()
    }
}

/// Encodes a request: `7E addr cmd 00 chk 0D`.
pub fn encode_request(address: u8, command: LegacyCommand) -> [u8; REQUEST_LEN] {
    let cmd = command.code();
    [START, address, cmd, 0, checksum(&[address, cmd, 0]), END]
}

/// Decodes a request frame (framing and length byte checked; checksum reported, not
/// enforced — see [`LegacyRequest::checksum_valid`]).
pub fn decode_request(frame: &[u8]) -> Result<LegacyRequest, LegacyError> {
    let reply = decode_reply(frame)?;
    if !reply.payload.is_empty() {
        return Err(LegacyError::RequestHasPayload {
            len: u8::try_from(reply.payload.len()).unwrap_or(u8::MAX),
        });
    }
    Ok(LegacyRequest {
        address: reply.address,
        command: reply.command,
        checksum: reply.checksum,
    })
}

// ---------------------------------------------------------------------------------------
// Replies: generic framing
// ---------------------------------------------------------------------------------------

/// A reply frame with its payload borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LegacyReply<'a> {
    /// Pack address.
    pub address: u8,
    /// Command being answered.
    pub command: LegacyCommand,
    /// Payload bytes (`len` of them).
    pub payload: &'a [u8],
    /// Checksum byte as received (not verified).
    pub checksum: u8,
}

/// Validates the framing of one complete frame (`7E`, length byte, `0D`) and splits it.
/// The checksum is returned, not verified.
pub fn decode_reply(frame: &[u8]) -> Result<LegacyReply<'_>, LegacyError> {
    let [start, address, command, len, rest @ ..] = frame else {
        return Err(LegacyError::TooShort {
            len: frame.len(),
            min: REQUEST_LEN,
        });
    };
    if *start != START {
        return Err(LegacyError::BadStart { found: *start });
    }
    let expected = REQUEST_LEN + usize::from(*len);
    if frame.len() != expected {
        if frame.len() < REQUEST_LEN {
            return Err(LegacyError::TooShort {
                len: frame.len(),
                min: REQUEST_LEN,
            });
        }
        return Err(LegacyError::LengthMismatch {
            expected,
            got: frame.len(),
        });
    }
    let Some((payload, [chk, end])) = rest.split_last_chunk::<2>() else {
        return Err(LegacyError::TooShort {
            len: frame.len(),
            min: REQUEST_LEN,
        });
    };
    if *end != END {
        return Err(LegacyError::BadEnd { found: *end });
    }
    Ok(LegacyReply {
        address: *address,
        command: LegacyCommand::from_u8(*command),
        payload,
        checksum: *chk,
    })
}

/// Encodes a reply frame around `payload` (checksum over addr, cmd, len, payload).
/// Errors if the payload is longer than 255 bytes.
pub fn encode_reply(
    address: u8,
    command: LegacyCommand,
    payload: &[u8],
) -> Result<Vec<u8>, LegacyError> {
    let len = u8::try_from(payload.len()).map_err(|_| LegacyError::PayloadTooLong {
        len: payload.len(),
        max: MAX_PAYLOAD,
    })?;
    let cmd = command.code();
    let mut out = Vec::with_capacity(REQUEST_LEN + payload.len());
    out.extend_from_slice(&[START, address, cmd, len]);
    out.extend_from_slice(payload);
    let chk = checksum(out.get(1..).unwrap_or(&[]));
    out.extend_from_slice(&[chk, END]);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Status reply (0x01)
// ---------------------------------------------------------------------------------------

/// The general-status reply, in the protocol's own units.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LegacyStatus {
    /// Cell voltages in mV (each ≤ 0x7FFF), cell 1 first.
    pub cells_mv: Vec<u16>,
    /// Per cell: over-voltage alarm flag (bit 15 of the cell word). Same length as
    /// `cells_mv`.
    pub cell_ov_flags: Vec<bool>,
    /// Pack current in centiamps, + = charging. Wire: `30000 − current_ca`, so the
    /// encodable range is −35535..=30000.
    pub current_ca: i32,
    /// State of charge × 100 (8750 = 87.5 %).
    pub soc_centi: u16,
    /// Capacity in Ah × 100 (one 16-bit word on the wire).
    pub capacity_cah: u32,
    /// Temperatures in °C (wire: low byte = °C + 50, so −50..=205).
    pub temps_c: Vec<i16>,
    /// Alarm words as sent; the second one carries the [`alarm`] bits.
    pub alarms: Vec<u16>,
    /// Cycle count.
    pub cycles: u16,
    /// Pack voltage in V × 100 (one 16-bit word on the wire).
    pub pack_cv: u32,
}

/// Groups a status payload must have (1..=8 are decoded).
const REQUIRED_GROUPS: usize = 8;
/// Groups a status payload has at most.
const MAX_GROUPS: usize = 10;

fn group_count(name: &'static str, len: usize) -> Result<u8, LegacyError> {
    u8::try_from(len).map_err(|_| LegacyError::TooManyValues {
        group: name,
        count: len,
        max: usize::from(u8::MAX),
    })
}

fn out_of_range(field: &'static str, value: i64, min: i64, max: i64) -> LegacyError {
    LegacyError::ValueOutOfRange {
        field,
        value,
        min,
        max,
    }
}

fn word(field: &'static str, value: u32) -> Result<u16, LegacyError> {
    u16::try_from(value).map_err(|_| out_of_range(field, i64::from(value), 0, 0xFFFF))
}

fn push_group(
    out: &mut Vec<u8>,
    id: u8,
    name: &'static str,
    values: &[u16],
) -> Result<(), LegacyError> {
    out.push(id);
    out.push(group_count(name, values.len())?);
    for v in values {
        out.extend_from_slice(&v.to_be_bytes());
    }
    Ok(())
}

/// Encodes the ten-group status payload (without framing).
pub fn encode_status_payload(status: &LegacyStatus) -> Result<Vec<u8>, LegacyError> {
    if status.cell_ov_flags.len() != status.cells_mv.len() {
        return Err(LegacyError::FlagCountMismatch {
            cells: status.cells_mv.len(),
            flags: status.cell_ov_flags.len(),
        });
    }
    let cells = status
        .cells_mv
        .iter()
        .zip(&status.cell_ov_flags)
        .map(|(&mv, &ov)| {
            if mv & CELL_OV_FLAG != 0 {
                Err(out_of_range("cells_mv", i64::from(mv), 0, 0x7FFF))
            } else {
                Ok(mv | if ov { CELL_OV_FLAG } else { 0 })
            }
        })
        .collect::<Result<Vec<u16>, _>>()?;
    let current_raw = CURRENT_OFFSET
        .checked_sub(status.current_ca)
        .and_then(|raw| u16::try_from(raw).ok())
        .ok_or_else(|| {
            out_of_range(
                "current_ca",
                i64::from(status.current_ca),
                i64::from(CURRENT_OFFSET) - 0xFFFF,
                i64::from(CURRENT_OFFSET),
            )
        })?;
    let temps = status
        .temps_c
        .iter()
        .map(|&c| {
            c.checked_add(TEMP_OFFSET)
                .and_then(|raw| u8::try_from(raw).ok())
                .map(u16::from)
                .ok_or_else(|| {
                    out_of_range(
                        "temps_c",
                        i64::from(c),
                        -i64::from(TEMP_OFFSET),
                        255 - i64::from(TEMP_OFFSET),
                    )
                })
        })
        .collect::<Result<Vec<u16>, _>>()?;
    let capacity = word("capacity_cah", status.capacity_cah)?;
    let pack = word("pack_cv", status.pack_cv)?;

    let mut out = Vec::with_capacity(MAX_PAYLOAD);
    push_group(&mut out, 0x01, "cells_mv", &cells)?;
    push_group(&mut out, 0x02, "current", &[current_raw])?;
    push_group(&mut out, 0x03, "soc", &[status.soc_centi])?;
    push_group(&mut out, 0x04, "capacity", &[capacity])?;
    push_group(&mut out, 0x05, "temps_c", &temps)?;
    push_group(&mut out, 0x06, "alarms", &status.alarms)?;
    push_group(&mut out, 0x07, "cycles", &[status.cycles])?;
    push_group(&mut out, 0x08, "pack_voltage", &[pack])?;
    push_group(&mut out, 0x09, "group9", &[])?;
    push_group(&mut out, 0x0A, "group10", &[])?;
    if out.len() > MAX_PAYLOAD {
        return Err(LegacyError::PayloadTooLong {
            len: out.len(),
            max: MAX_PAYLOAD,
        });
    }
    Ok(out)
}

/// Encodes a complete status reply frame for pack `address`.
///
/// Errors (never truncates): flag/cell count mismatch, a value outside its wire range,
/// a group over 255 values, or a payload over 255 bytes.
pub fn encode_status_reply(address: u8, status: &LegacyStatus) -> Result<Vec<u8>, LegacyError> {
    let payload = encode_status_payload(status)?;
    encode_reply(address, LegacyCommand::GeneralStatus, &payload)
}

fn words(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes.chunks_exact(2).map(|c| match c {
        [hi, lo] => u16::from_be_bytes([*hi, *lo]),
        _ => 0,
    })
}

fn first_word(groups: &[&[u8]], index: usize, name: &'static str) -> Result<u16, LegacyError> {
    groups
        .get(index)
        .and_then(|g| words(g).next())
        .ok_or(LegacyError::EmptyGroup {
            group: index + 1,
            name,
        })
}

/// Decodes a status payload (the bytes between the length byte and the checksum).
/// Groups are taken by position; ids are ignored. Groups 9 and 10 may be absent.
pub fn decode_status_payload(payload: &[u8]) -> Result<LegacyStatus, LegacyError> {
    let mut groups: Vec<&[u8]> = Vec::with_capacity(MAX_GROUPS);
    let mut rest = payload;
    while !rest.is_empty() && groups.len() < MAX_GROUPS {
        let group = groups.len() + 1;
        let [_id, count, tail @ ..] = rest else {
            return Err(LegacyError::TruncatedGroup {
                group,
                needed: 2,
                available: rest.len(),
            });
        };
        let data_len = 2 * usize::from(*count);
        let Some((data, after)) = tail.split_at_checked(data_len) else {
            return Err(LegacyError::TruncatedGroup {
                group,
                needed: 2 + data_len,
                available: rest.len(),
            });
        };
        groups.push(data);
        rest = after;
    }
    if !rest.is_empty() {
        return Err(LegacyError::TrailingBytes { count: rest.len() });
    }
    if groups.len() < REQUIRED_GROUPS {
        return Err(LegacyError::TooFewGroups {
            found: groups.len(),
            needed: REQUIRED_GROUPS,
        });
    }
    let group = |i: usize| groups.get(i).copied().unwrap_or(&[]);
    let cell_words: Vec<u16> = words(group(0)).collect();
    Ok(LegacyStatus {
        cells_mv: cell_words.iter().map(|w| w & !CELL_OV_FLAG).collect(),
        cell_ov_flags: cell_words.iter().map(|w| w & CELL_OV_FLAG != 0).collect(),
        current_ca: CURRENT_OFFSET - i32::from(first_word(&groups, 1, "current")?),
        soc_centi: first_word(&groups, 2, "soc")?,
        capacity_cah: u32::from(first_word(&groups, 3, "capacity")?),
        temps_c: words(group(4))
            .map(|w| i16::from(w.to_be_bytes()[1]) - TEMP_OFFSET)
            .collect(),
        alarms: words(group(5)).collect(),
        cycles: first_word(&groups, 6, "cycles")?,
        pack_cv: u32::from(first_word(&groups, 7, "pack_voltage")?),
    })
}

/// Decodes a complete status reply frame (framing checked, checksum not checked, command
/// must be 0x01). Use [`decode_reply`] + [`decode_status_payload`] to also get the address.
pub fn decode_status_reply(frame: &[u8]) -> Result<LegacyStatus, LegacyError> {
    let reply = decode_reply(frame)?;
    if reply.command != LegacyCommand::GeneralStatus {
        return Err(LegacyError::UnexpectedCommand {
            expected: LegacyCommand::GeneralStatus.code(),
            got: reply.command.code(),
        });
    }
    decode_status_payload(reply.payload)
}

// ---------------------------------------------------------------------------------------
// Version replies (0x33, 0x42)
// ---------------------------------------------------------------------------------------

/// A decoded version reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LegacyVersion {
    /// Pack address.
    pub address: u8,
    /// Command answered (normally 0x33 or 0x42).
    pub command: LegacyCommand,
    /// The payload as text (invalid UTF-8 replaced by U+FFFD).
    pub text: String,
}

/// Encodes a version reply whose payload is `text` (its bytes as is; ASCII expected).
/// Errors if `text` is longer than 255 bytes.
pub fn encode_version_reply(
    address: u8,
    command: LegacyCommand,
    text: &str,
) -> Result<Vec<u8>, LegacyError> {
    encode_reply(address, command, text.as_bytes())
}

/// Decodes a version reply (any command except 0x01 general status).
pub fn decode_version_reply(frame: &[u8]) -> Result<LegacyVersion, LegacyError> {
    let reply = decode_reply(frame)?;
    if reply.command == LegacyCommand::GeneralStatus {
        return Err(LegacyError::UnexpectedCommand {
            expected: LegacyCommand::FirmwareVersion.code(),
            got: reply.command.code(),
        });
    }
    Ok(LegacyVersion {
        address: reply.address,
        command: reply.command,
        text: String::from_utf8_lossy(reply.payload).into_owned(),
    })
}

// ---------------------------------------------------------------------------------------
// Stream framing
// ---------------------------------------------------------------------------------------

/// Length of the frame (request or reply) at the start of `buf`: `6 + len byte`.
/// `Invalid` if `buf` does not start with 0x7E, or the byte where 0x0D belongs is not 0x0D.
pub fn frame_length(buf: &[u8]) -> FrameLength {
    match buf {
        [] => FrameLength::NeedMore,
        [first, ..] if *first != START => FrameLength::Invalid,
        [_, _, _, len, ..] => {
            let n = REQUEST_LEN + usize::from(*len);
            match buf.get(n - 1) {
                None => FrameLength::NeedMore,
                Some(&END) => FrameLength::Complete(n),
                Some(_) => FrameLength::Invalid,
            }
        }
        _ => FrameLength::NeedMore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LegacyStatus {
        LegacyStatus {
            cells_mv: (0..16).map(|i| 3300 + i).collect(),
            cell_ov_flags: (0..16).map(|i| i == 3).collect(),
            current_ca: 1234,
            soc_centi: 8750,
            capacity_cah: 10_000,
            temps_c: vec![21, 22, 23, 24, -5, 30],
            alarms: vec![0, alarm::OVER_CURRENT | alarm::CHARGE_TEMP_LOW],
            cycles: 42,
            pack_cv: 5312,
        }
    }

    #[test]
    fn request_bytes() {
        assert_eq!(
            encode_request(1, LegacyCommand::GeneralStatus),
            [0x7E, 0x01, 0x01, 0x00, 0xFE, 0x0D]
        );
        assert_eq!(
            encode_request(1, LegacyCommand::FirmwareVersion),
            [0x7E, 0x01, 0x33, 0x00, 0xCC, 0x0D]
        );
        assert_eq!(
            encode_request(1, LegacyCommand::HardwareVersion),
            [0x7E, 0x01, 0x42, 0x00, 0xBD, 0x0D]
        );
        assert_eq!(
            encode_request(0x10, LegacyCommand::GeneralStatus),
            [0x7E, 0x10, 0x01, 0x00, 0xEF, 0x0D]
        );
        assert_eq!(
            encode_request(0, LegacyCommand::Other(0)),
            [0x7E, 0, 0, 0, 0, 0x0D]
        );
        for addr in 0..=255u8 {
            for cmd in [0x01u8, 0x33, 0x42, 0x00, 0xFF] {
                let f = encode_request(addr, LegacyCommand::from_u8(cmd));
                let r = decode_request(&f).unwrap();
                assert_eq!((r.address, r.command.code()), (addr, cmd));
                assert!(r.checksum_valid());
                assert_eq!(frame_length(&f), FrameLength::Complete(6));
            }
        }
    }

    #[test]
    fn requests_with_client_checksums_are_tolerated() {
        // As sent by public clients for the version commands.
        let r = decode_request(&[0x7E, 0x01, 0x33, 0x00, 0xFE, 0x0D]).unwrap();
        assert_eq!(r.command, LegacyCommand::FirmwareVersion);
        assert!(!r.checksum_valid());
        assert_eq!(r.expected_checksum(), 0xCC);
        let r = decode_request(&[0x7E, 0x01, 0x42, 0x00, 0xFC, 0x0D]).unwrap();
        assert_eq!(r.command, LegacyCommand::HardwareVersion);
        assert!(!r.checksum_valid());
    }

    #[test]
    fn request_errors() {
        assert_eq!(
            decode_request(&[]),
            Err(LegacyError::TooShort { len: 0, min: 6 })
        );
        assert_eq!(
            decode_request(&[0x7E, 1, 1, 0, 0xFE]),
            Err(LegacyError::TooShort { len: 5, min: 6 })
        );
        assert_eq!(
            decode_request(&[0x7F, 1, 1, 0, 0xFE, 0x0D]),
            Err(LegacyError::BadStart { found: 0x7F })
        );
        assert_eq!(
            decode_request(&[0x7E, 1, 1, 0, 0xFE, 0x0A]),
            Err(LegacyError::BadEnd { found: 0x0A })
        );
        assert_eq!(
            decode_request(&[0x7E, 1, 1, 0, 0xFE, 0x0D, 0x00]),
            Err(LegacyError::LengthMismatch {
                expected: 6,
                got: 7
            })
        );
        assert_eq!(
            decode_request(&[0x7E, 1, 1, 2, 0xAA, 0xBB, 0x00, 0x0D]),
            Err(LegacyError::RequestHasPayload { len: 2 })
        );
        assert_eq!(
            decode_request(&[0x7E, 1, 1, 5, 0xFE, 0x0D]),
            Err(LegacyError::LengthMismatch {
                expected: 11,
                got: 6
            })
        );
    }

    #[test]
    fn status_reply_known_bytes() {
        let s = LegacyStatus {
            cells_mv: vec![3300, 3301],
            cell_ov_flags: vec![false, true],
            current_ca: -150, // discharging 1.5 A
            soc_centi: 5000,
            capacity_cah: 10_000,
            temps_c: vec![25],
            alarms: vec![0, alarm::VOLTAGE_HIGH],
            cycles: 7,
            pack_cv: 5300,
        };
        let f = encode_status_reply(2, &s).unwrap();
        let payload: Vec<u8> = vec![
            0x01, 0x02, 0x0C, 0xE4, 0x8C, 0xE5, // cells, second flagged
            0x02, 0x01, 0x75, 0xC6, // 30000 + 150 = 30150 = 0x75C6
            0x03, 0x01, 0x13, 0x88, // 5000
            0x04, 0x01, 0x27, 0x10, // 10000
            0x05, 0x01, 0x00, 0x4B, // 25 + 50 = 75
            0x06, 0x02, 0x00, 0x00, 0x00, 0x10, // alarms
            0x07, 0x01, 0x00, 0x07, // cycles
            0x08, 0x01, 0x14, 0xB4, // 5300
            0x09, 0x00, 0x0A, 0x00,
        ];
        let mut expected = vec![0x7E, 0x02, 0x01, payload.len() as u8];
        expected.extend_from_slice(&payload);
        let sum: u32 = expected[1..].iter().map(|&b| u32::from(b)).sum();
        expected.push(((0x100 - (sum % 256)) % 256) as u8);
        expected.push(0x0D);
        assert_eq!(f, expected);
        assert_eq!(decode_status_reply(&f).unwrap(), s);
        assert_eq!(frame_length(&f), FrameLength::Complete(f.len()));
        // charging current encodes below 30000
        let c = LegacyStatus {
            current_ca: 2500,
            ..s
        };
        let p = encode_status_payload(&c).unwrap();
        assert_eq!(&p[6..10], &[0x02, 0x01, 0x6B, 0x6C]); // 27500
    }

    #[test]
    fn status_round_trip_and_extremes() {
        let s = sample();
        let f = encode_status_reply(9, &s).unwrap();
        assert_eq!(decode_status_reply(&f).unwrap(), s);
        let r = decode_reply(&f).unwrap();
        assert_eq!(r.address, 9);
        assert_eq!(decode_status_payload(r.payload).unwrap(), s);
        assert_eq!(
            alarm_names(s.alarms[1]),
            vec!["over_current", "charge_temp_low"]
        );
        let ext = LegacyStatus {
            cells_mv: vec![0x7FFF, 0],
            cell_ov_flags: vec![true, true],
            current_ca: -35_535,
            temps_c: vec![-50, 205],
            capacity_cah: 65_535,
            pack_cv: 65_535,
            ..Default::default()
        };
        assert_eq!(
            decode_status_reply(&encode_status_reply(0, &ext).unwrap()).unwrap(),
            ext
        );
        let ext2 = LegacyStatus {
            current_ca: 30_000,
            ..ext
        };
        assert_eq!(
            decode_status_reply(&encode_status_reply(0, &ext2).unwrap()).unwrap(),
            ext2
        );
        assert_eq!(
            decode_status_reply(&encode_status_reply(0, &LegacyStatus::default()).unwrap())
                .unwrap(),
            LegacyStatus {
                current_ca: 0,
                ..Default::default()
            }
        );
    }

    #[test]
    fn encode_errors_never_truncate() {
        let s = sample();
        let e = |s: LegacyStatus| encode_status_reply(1, &s).unwrap_err();
        assert_eq!(
            e(LegacyStatus {
                current_ca: 30_001,
                ..s.clone()
            }),
            LegacyError::ValueOutOfRange {
                field: "current_ca",
                value: 30_001,
                min: -35_535,
                max: 30_000
            }
        );
        assert!(matches!(
            e(LegacyStatus {
                current_ca: i32::MIN,
                ..s.clone()
            }),
            LegacyError::ValueOutOfRange {
                field: "current_ca",
                ..
            }
        ));
        assert_eq!(
            e(LegacyStatus {
                temps_c: vec![206],
                ..s.clone()
            }),
            LegacyError::ValueOutOfRange {
                field: "temps_c",
                value: 206,
                min: -50,
                max: 205
            }
        );
        assert!(matches!(
            e(LegacyStatus {
                temps_c: vec![i16::MAX],
                ..s.clone()
            }),
            LegacyError::ValueOutOfRange { .. }
        ));
        assert!(matches!(
            e(LegacyStatus {
                temps_c: vec![-51],
                ..s.clone()
            }),
            LegacyError::ValueOutOfRange { .. }
        ));
        assert!(matches!(
            e(LegacyStatus {
                capacity_cah: 65_536,
                ..s.clone()
            }),
            LegacyError::ValueOutOfRange {
                field: "capacity_cah",
                ..
            }
        ));
        assert!(matches!(
            e(LegacyStatus {
                pack_cv: 70_000,
                ..s.clone()
            }),
            LegacyError::ValueOutOfRange {
                field: "pack_cv",
                ..
            }
        ));
        assert!(matches!(
            e(LegacyStatus {
                cells_mv: vec![0x8000],
                cell_ov_flags: vec![false],
                ..s.clone()
            }),
            LegacyError::ValueOutOfRange {
                field: "cells_mv",
                ..
            }
        ));
        assert_eq!(
            e(LegacyStatus {
                cell_ov_flags: vec![],
                ..s.clone()
            }),
            LegacyError::FlagCountMismatch {
                cells: 16,
                flags: 0
            }
        );
        // 100 alarm words: the group fits its count byte but the payload exceeds 255 bytes
        assert!(matches!(
            e(LegacyStatus {
                alarms: vec![0; 100],
                ..s.clone()
            }),
            LegacyError::PayloadTooLong { max: 255, .. }
        ));
        assert_eq!(
            e(LegacyStatus {
                alarms: vec![0; 256],
                ..s.clone()
            }),
            LegacyError::TooManyValues {
                group: "alarms",
                count: 256,
                max: 255
            }
        );
        assert_eq!(
            encode_version_reply(1, LegacyCommand::FirmwareVersion, &"x".repeat(256)),
            Err(LegacyError::PayloadTooLong { len: 256, max: 255 })
        );
        assert!(encode_version_reply(1, LegacyCommand::FirmwareVersion, &"x".repeat(255)).is_ok());
    }

    #[test]
    fn status_decode_errors() {
        let good = encode_status_payload(&sample()).unwrap();
        // truncated inside the cell group
        assert_eq!(
            decode_status_payload(&good[..10]),
            Err(LegacyError::TruncatedGroup {
                group: 1,
                needed: 34,
                available: 10
            })
        );
        // a lone id byte
        let mut p = good.clone();
        p.truncate(good.len() - 4);
        p.push(0x09);
        assert_eq!(
            decode_status_payload(&p),
            Err(LegacyError::TruncatedGroup {
                group: 9,
                needed: 2,
                available: 1
            })
        );
        // groups 9 and 10 may be absent
        let eight = &good[..good.len() - 4];
        assert_eq!(decode_status_payload(eight).unwrap(), sample());
        // fewer than 8
        let seven_len = eight.len() - 4;
        assert_eq!(
            decode_status_payload(&good[..seven_len]),
            Err(LegacyError::TooFewGroups {
                found: 7,
                needed: 8
            })
        );
        assert_eq!(
            decode_status_payload(&[]),
            Err(LegacyError::TooFewGroups {
                found: 0,
                needed: 8
            })
        );
        // trailing bytes after group 10
        let mut t = good.clone();
        t.extend_from_slice(&[0x0B, 0x00]);
        assert_eq!(
            decode_status_payload(&t),
            Err(LegacyError::TrailingBytes { count: 2 })
        );
        // empty current group
        let mut e = Vec::new();
        e.extend_from_slice(&[1, 0, 2, 0]);
        for id in 3..=8 {
            e.extend_from_slice(&[id, 1, 0, 0]);
        }
        assert_eq!(
            decode_status_payload(&e),
            Err(LegacyError::EmptyGroup {
                group: 2,
                name: "current"
            })
        );
        // ids are ignored (position counts)
        let mut ids = good.clone();
        ids[0] = 0x55;
        assert_eq!(decode_status_payload(&ids).unwrap(), sample());
        // wrong command
        let v = encode_version_reply(1, LegacyCommand::FirmwareVersion, "V1").unwrap();
        assert_eq!(
            decode_status_reply(&v),
            Err(LegacyError::UnexpectedCommand {
                expected: 1,
                got: 0x33
            })
        );
        // reply checksum is not verified: 0x00 tolerated
        let mut f = encode_status_reply(1, &sample()).unwrap();
        let n = f.len();
        f[n - 2] = 0;
        assert_eq!(decode_status_reply(&f).unwrap(), sample());
        // temperature high byte ignored, value-50
        let mut hb = good.clone();
        let temps_at = 34 + 4 + 4 + 4 + 2; // start of temp words
        hb[temps_at] = 0xFF;
        assert_eq!(decode_status_payload(&hb).unwrap().temps_c[0], 21);
    }

    #[test]
    fn eight_group_payload_near_limit_decodes_but_cannot_re_encode() {
        // 8 groups, 252 bytes: decodes (groups 9/10 absent), but our encoder always writes
        // the two empty groups, which would need 256 bytes: an error, not a truncation.
        let mut p = vec![0x01, 111];
        p.extend(std::iter::repeat_n([0x0C, 0xE4], 111).flatten());
        for id in 2..=8u8 {
            p.extend_from_slice(&[id, 1, 0x75, 0x30]);
        }
        assert_eq!(p.len(), 252);
        let s = decode_status_payload(&p).unwrap();
        assert_eq!(s.cells_mv.len(), 111);
        assert_eq!(
            encode_status_payload(&s),
            Err(LegacyError::PayloadTooLong { len: 256, max: 255 })
        );
    }

    #[test]
    fn version_replies() {
        for cmd in [
            LegacyCommand::FirmwareVersion,
            LegacyCommand::HardwareVersion,
        ] {
            let f = encode_version_reply(3, cmd, "LFP4-V2.1").unwrap();
            assert_eq!(&f[..4], &[0x7E, 3, cmd.code(), 9]);
            assert_eq!(&f[4..13], b"LFP4-V2.1");
            assert_eq!(f[14], 0x0D);
            let v = decode_version_reply(&f).unwrap();
            assert_eq!(
                v,
                LegacyVersion {
                    address: 3,
                    command: cmd,
                    text: "LFP4-V2.1".into()
                }
            );
        }
        let s = encode_status_reply(1, &sample()).unwrap();
        assert!(matches!(
            decode_version_reply(&s),
            Err(LegacyError::UnexpectedCommand { got: 1, .. })
        ));
        let raw = encode_reply(1, LegacyCommand::FirmwareVersion, &[b'A', 0xFF]).unwrap();
        assert_eq!(decode_version_reply(&raw).unwrap().text, "A\u{FFFD}");
    }

    #[test]
    fn stream_framing() {
        use FrameLength::*;
        assert_eq!(frame_length(&[]), NeedMore);
        assert_eq!(frame_length(&[0x7E]), NeedMore);
        assert_eq!(frame_length(&[0x7E, 1, 1]), NeedMore);
        assert_eq!(frame_length(&[0x7E, 1, 1, 0, 0xFE]), NeedMore);
        assert_eq!(
            frame_length(&[0x7E, 1, 1, 0, 0xFE, 0x0D, 0x7E]),
            Complete(6)
        );
        assert_eq!(frame_length(&[0x7E, 1, 1, 0, 0xFE, 0x0C]), Invalid);
        assert_eq!(frame_length(&[0x01, 0x03]), Invalid);
        assert_eq!(frame_length(&[0x7E, 1, 1, 255]), NeedMore);
        let f = encode_status_reply(1, &sample()).unwrap();
        for n in 0..f.len() {
            assert_eq!(frame_length(&f[..n]), NeedMore, "prefix {n}");
            assert!(decode_status_reply(&f[..n]).is_err());
        }
        assert_eq!(frame_length(&f), Complete(f.len()));
    }

    #[test]
    fn error_messages() {
        let m = LegacyError::ValueOutOfRange {
            field: "temps_c",
            value: 300,
            min: -50,
            max: 205,
        }
        .to_string();
        assert_eq!(
            m,
            "temps_c = 300 cannot be encoded: allowed range is -50..=205"
        );
        let m = LegacyError::TruncatedGroup {
            group: 5,
            needed: 14,
            available: 3,
        }
        .to_string();
        assert!(m.contains("group 5") && m.contains("14") && m.contains('3'));
        assert_eq!(
            LegacyError::BadStart { found: 1 }.to_string(),
            "legacy frame must start with 0x7E, found 0x01"
        );
        assert!(LegacyError::PayloadTooLong { len: 300, max: 255 }
            .to_string()
            .contains("300"));
    }

    #[test]
    fn commands() {
        for c in 0..=255u8 {
            assert_eq!(LegacyCommand::from_u8(c).code(), c);
        }
        assert_eq!(checksum(&[1, 1, 0]), 0xFE);
        assert_eq!(checksum(&[]), 0);
    }
}
