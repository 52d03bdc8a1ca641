//! Modbus RTU codec: frame decoding/encoding, stream framing and a register-map server.
//!
//! Sans-IO: every function takes bytes or typed values and returns bytes, typed values or
//! a [`ModbusError`]. Nothing here reads a clock or a port.
//!
//! Wire format (RTU ADU): `address | function | data... | crc_lo | crc_hi`, CRC-16/MODBUS
//! (reflected poly 0xA001, init 0xFFFF) over everything before the CRC, low byte first.
//!
//! Robustness contract: no function in this module panics on any input. Slices are only
//! accessed through patterns or `get`, and arithmetic on input-derived values is done in
//! widened or checked form.
//!
//! `*_into` functions *append* to `out` (they never clear it), so a caller that reuses a
//! buffer calls `out.clear()` first. On error they leave `out` as it was.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crc::{Crc, Table, CRC_16_MODBUS};
use serde::{Deserialize, Serialize};

/// Slice-by-16 table-driven CRC-16/MODBUS (8 KiB of tables, computed at compile time).
/// A `static`, not a `const`, so the tables exist once instead of per use site.
static CRC16: Crc<u16, Table<16>> = Crc::<u16, Table<16>>::new(&CRC_16_MODBUS);

/// Largest Modbus RTU frame (ADU): address + 253-byte PDU + 2 CRC bytes.
pub const MAX_FRAME_LEN: usize = 256;
/// Most registers one read (function 0x03/0x04) may ask for or return.
pub const MAX_READ_REGISTERS: u16 = 125;
/// Most registers one write-multiple (function 0x10) may carry.
pub const MAX_WRITE_REGISTERS: u16 = 123;

/// Function codes this codec models.
pub mod function {
    /// Read holding registers.
    pub const READ_HOLDING: u8 = 0x03;
    /// Read input registers.
    pub const READ_INPUT: u8 = 0x04;
    /// Write single register.
    pub const WRITE_SINGLE: u8 = 0x06;
    /// Write multiple registers.
    pub const WRITE_MULTIPLE: u8 = 0x10;
    /// Set on the function byte of an exception response.
    pub const EXCEPTION_FLAG: u8 = 0x80;
}

use function::{EXCEPTION_FLAG, READ_HOLDING, READ_INPUT, WRITE_MULTIPLE, WRITE_SINGLE};

/// CRC-16/MODBUS of `data`.
pub fn crc16(data: &[u8]) -> u16 {
    CRC16.checksum(data)
}

/// Appends the CRC-16/MODBUS of the whole of `frame` to it, low byte first.
pub fn append_crc(frame: &mut Vec<u8>) {
    let crc = crc16(frame);
    frame.extend_from_slice(&crc.to_le_bytes());
}

/// Appends the CRC of `out[start..]` (the frame being built) to `out`.
fn finish_frame(out: &mut Vec<u8>, start: usize) {
    let crc = crc16(out.get(start..).unwrap_or(&[]));
    out.extend_from_slice(&crc.to_le_bytes());
}

// ---------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------

/// One RTU frame: the slave address and a PDU (request or response).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModbusRtuFrame<T> {
    /// Slave address (0 = broadcast, 1..=247 unicast; other values are carried as is).
    pub address: u8,
    /// The protocol data unit.
    pub pdu: T,
}

/// A request PDU (master → slave).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModbusRequest {
    /// 0x03: read `count` holding registers from `start`. `count` is not range-checked by
    /// the decoder (a server must answer 0 or >125 with exception 03, see [`serve`]).
    ReadHolding { start: u16, count: u16 },
    /// 0x04: read `count` input registers from `start` (same rules as `ReadHolding`).
    ReadInput { start: u16, count: u16 },
    /// 0x06: write `value` to `register`.
    WriteSingle { register: u16, value: u16 },
    /// 0x10: write `values` from `start` (quantity = `values.len()`, byte count = 2×that).
    /// The decoder accepts quantity 0 (the server answers exception 03).
    WriteMultiple { start: u16, values: Vec<u16> },
    /// Any function code this codec does not model, *or* a 0x10 request whose byte count
    /// disagrees with its quantity field. `data` is the PDU after the function byte.
    Other { function: u8, data: Vec<u8> },
}

impl ModbusRequest {
    /// The function code byte of this request.
    pub fn function(&self) -> u8 {
        match self {
            ModbusRequest::ReadHolding { .. } => READ_HOLDING,
            ModbusRequest::ReadInput { .. } => READ_INPUT,
            ModbusRequest::WriteSingle { .. } => WRITE_SINGLE,
            ModbusRequest::WriteMultiple { .. } => WRITE_MULTIPLE,
            ModbusRequest::Other { function, .. } => *function,
        }
    }
}

/// A response PDU (slave → master).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModbusResponse {
    /// 0x03 response: register values (1..=125 of them).
    ReadHolding(Vec<u16>),
    /// 0x04 response: register values (1..=125 of them).
    ReadInput(Vec<u16>),
    /// 0x06 response: echo of the write.
    WriteSingle { register: u16, value: u16 },
    /// 0x10 response: start register and quantity written (1..=123).
    WriteMultiple { start: u16, count: u16 },
    /// Exception response. `function` is the *request's* function code (bit 7 clear); the
    /// wire byte is `function | 0x80`.
    Exception { function: u8, code: ExceptionCode },
}

impl ModbusResponse {
    /// The function code byte as it appears on the wire (with 0x80 set for exceptions).
    pub fn function(&self) -> u8 {
        match self {
            ModbusResponse::ReadHolding(_) => READ_HOLDING,
            ModbusResponse::ReadInput(_) => READ_INPUT,
            ModbusResponse::WriteSingle { .. } => WRITE_SINGLE,
            ModbusResponse::WriteMultiple { .. } => WRITE_MULTIPLE,
            ModbusResponse::Exception { function, .. } => function | EXCEPTION_FLAG,
        }
    }
}

/// Modbus exception codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExceptionCode {
    /// 01: function code not supported by the server.
    IllegalFunction,
    /// 02: register address (or part of the range) not served.
    IllegalDataAddress,
    /// 03: a value in the request (quantity, byte count) is out of range.
    IllegalDataValue,
    /// 04: unrecoverable error while serving.
    ServerDeviceFailure,
    /// Any other code byte. `from_u8` never produces `Other(1..=4)`.
    Other(u8),
}

impl ExceptionCode {
    /// The code byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            ExceptionCode::IllegalFunction => 0x01,
            ExceptionCode::IllegalDataAddress => 0x02,
            ExceptionCode::IllegalDataValue => 0x03,
            ExceptionCode::ServerDeviceFailure => 0x04,
            ExceptionCode::Other(c) => c,
        }
    }

    /// The variant for a code byte (1..=4 map to the named variants).
    pub fn from_u8(code: u8) -> Self {
        match code {
            0x01 => ExceptionCode::IllegalFunction,
            0x02 => ExceptionCode::IllegalDataAddress,
            0x03 => ExceptionCode::IllegalDataValue,
            0x04 => ExceptionCode::ServerDeviceFailure,
            c => ExceptionCode::Other(c),
        }
    }
}

impl fmt::Display for ExceptionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ExceptionCode::IllegalFunction => "illegal function",
            ExceptionCode::IllegalDataAddress => "illegal data address",
            ExceptionCode::IllegalDataValue => "illegal data value",
            ExceptionCode::ServerDeviceFailure => "server device failure",
            ExceptionCode::Other(_) => "exception",
        };
        write!(f, "{name} ({:02X})", self.code())
    }
}

/// Why a frame could not be decoded (or a PDU could not be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModbusError {
    /// Too few bytes to be a frame of this kind at all.
    #[error("frame too short: {len} byte(s), this kind of Modbus RTU frame needs at least {min}")]
    TooShort { len: usize, min: usize },
    /// More bytes than a Modbus RTU frame may have.
    #[error("frame too long: {len} bytes, a Modbus RTU frame has at most {max}")]
    TooLong { len: usize, max: usize },
    /// The CRC bytes do not match the frame contents.
    #[error("CRC mismatch: frame carries 0x{received:04X} but its bytes give 0x{computed:04X} (corrupted or collided frame)")]
    BadCrc { computed: u16, received: u16 },
    /// The frame length disagrees with what its function code / byte count field implies.
    #[error("length mismatch for function 0x{function:02X}: the function code and byte count field imply a {expected}-byte frame, got {got} bytes")]
    LengthMismatch {
        function: u8,
        expected: usize,
        got: usize,
    },
    /// A read response's byte count is odd, zero, or more than 125 registers.
    #[error("bad byte count {byte_count} in function 0x{function:02X} response: must be even and 2..=250 (1..=125 registers)")]
    BadByteCount { function: u8, byte_count: u8 },
    /// A register quantity outside the range the function allows.
    #[error(
        "register quantity {count} out of range for function 0x{function:02X}: must be 1..={max}"
    )]
    BadQuantity {
        function: u8,
        count: usize,
        max: u16,
    },
    /// A response function code the decoder does not model.
    #[error("unsupported function code 0x{function:02X} in response (decoded are 0x03, 0x04, 0x06, 0x10 and exceptions 0x80|fn)")]
    UnsupportedFunction { function: u8 },
}

// ---------------------------------------------------------------------------------------
// Small byte helpers (no panics)
// ---------------------------------------------------------------------------------------

#[inline]
fn be(hi: u8, lo: u8) -> u16 {
    u16::from_be_bytes([hi, lo])
}

/// Checks the trailing CRC of `frame` and returns the bytes before it.
#[inline]
fn check_crc(frame: &[u8]) -> Result<&[u8], ModbusError> {
    let Some((body, crc_bytes)) = frame.split_last_chunk::<2>() else {
        return Err(ModbusError::TooShort {
            len: frame.len(),
            min: 4,
        });
    };
    let received = u16::from_le_bytes(*crc_bytes);
    let computed = crc16(body);
    if computed != received {
        return Err(ModbusError::BadCrc { computed, received });
    }
    Ok(body)
}

/// Register values from an even-length big-endian byte slice.
fn words(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| match c {
            [hi, lo] => be(*hi, *lo),
            _ => 0,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Request decode / encode
// ---------------------------------------------------------------------------------------

/// Decodes one complete request frame (address, PDU, CRC).
///
/// Framing errors (length, CRC) are errors; range problems a server must answer with an
/// exception (read quantity 0 or >125, write quantity 0) are decoded and left to [`serve`].
/// A 0x10 frame whose byte count is not 2×quantity decodes as `Other { function: 0x10 }`.
pub fn decode_request(frame: &[u8]) -> Result<ModbusRtuFrame<ModbusRequest>, ModbusError> {
    let len = frame.len();
    if len > MAX_FRAME_LEN {
        return Err(ModbusError::TooLong {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let (address, function) = match frame {
        [a, f, _, _, ..] => (*a, *f),
        _ => return Err(ModbusError::TooShort { len, min: 4 }),
    };
    let expected = match function {
        READ_HOLDING | READ_INPUT | WRITE_SINGLE => Some(8),
        WRITE_MULTIPLE => match frame.get(6) {
            Some(&byte_count) if len >= 9 => Some(9 + usize::from(byte_count)),
            _ => return Err(ModbusError::TooShort { len, min: 9 }),
        },
        _ => None,
    };
    if let Some(expected) = expected {
        if len != expected {
            return Err(ModbusError::LengthMismatch {
                function,
                expected,
                got: len,
            });
        }
    }
    let body = check_crc(frame)?;
    let pdu = match body {
        [_, READ_HOLDING, sh, sl, ch, cl] => ModbusRequest::ReadHolding {
            start: be(*sh, *sl),
            count: be(*ch, *cl),
        },
        [_, READ_INPUT, sh, sl, ch, cl] => ModbusRequest::ReadInput {
            start: be(*sh, *sl),
            count: be(*ch, *cl),
        },
        [_, WRITE_SINGLE, rh, rl, vh, vl] => ModbusRequest::WriteSingle {
            register: be(*rh, *rl),
            value: be(*vh, *vl),
        },
        [_, WRITE_MULTIPLE, sh, sl, qh, ql, byte_count, data @ ..]
            if usize::from(*byte_count) == 2 * usize::from(be(*qh, *ql)) =>
        {
            ModbusRequest::WriteMultiple {
                start: be(*sh, *sl),
                values: words(data),
            }
        }
        [_, f, data @ ..] => ModbusRequest::Other {
            function: *f,
            data: data.to_vec(),
        },
        // Unreachable: `check_crc` leaves at least two bytes. Reported rather than panicking.
        _ => return Err(ModbusError::TooShort { len, min: 4 }),
    };
    Ok(ModbusRtuFrame { address, pdu })
}

/// Appends the encoded request frame (with CRC) to `out`.
///
/// Errors: the frame would exceed 256 bytes (`TooLong`, e.g. more than 123 write values).
pub fn encode_request_into(
    frame: &ModbusRtuFrame<ModbusRequest>,
    out: &mut Vec<u8>,
) -> Result<(), ModbusError> {
    let data_len = match &frame.pdu {
        ModbusRequest::ReadHolding { .. }
        | ModbusRequest::ReadInput { .. }
        | ModbusRequest::WriteSingle { .. } => 4,
        ModbusRequest::WriteMultiple { values, .. } => {
            values.len().saturating_mul(2).saturating_add(5)
        }
        ModbusRequest::Other { data, .. } => data.len(),
    };
    let total = data_len.saturating_add(4);
    if total > MAX_FRAME_LEN {
        return Err(ModbusError::TooLong {
            len: total,
            max: MAX_FRAME_LEN,
        });
    }
    let start_len = out.len();
    out.reserve(total);
    out.push(frame.address);
    out.push(frame.pdu.function());
    match &frame.pdu {
        ModbusRequest::ReadHolding { start, count } | ModbusRequest::ReadInput { start, count } => {
            out.extend_from_slice(&start.to_be_bytes());
            out.extend_from_slice(&count.to_be_bytes());
        }
        ModbusRequest::WriteSingle { register, value } => {
            out.extend_from_slice(&register.to_be_bytes());
            out.extend_from_slice(&value.to_be_bytes());
        }
        ModbusRequest::WriteMultiple { start, values } => {
            // total <= 256 guarantees values.len() <= 123, so both casts are exact.
            let quantity = values.len() as u16;
            out.extend_from_slice(&start.to_be_bytes());
            out.extend_from_slice(&quantity.to_be_bytes());
            out.push((values.len() * 2) as u8);
            for v in values {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        ModbusRequest::Other { data, .. } => out.extend_from_slice(data),
    }
    finish_frame(out, start_len);
    Ok(())
}

/// Encodes a request frame (with CRC). See [`encode_request_into`] for the errors.
pub fn encode_request(frame: &ModbusRtuFrame<ModbusRequest>) -> Result<Vec<u8>, ModbusError> {
    let mut out = Vec::with_capacity(16);
    encode_request_into(frame, &mut out)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Response decode (borrowed fast path + owned)
// ---------------------------------------------------------------------------------------

/// Register values of a read response, borrowed from the frame (big-endian byte pairs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Registers<'a> {
    bytes: &'a [u8],
}

impl<'a> Registers<'a> {
    /// Number of registers.
    pub fn len(&self) -> usize {
        self.bytes.len() / 2
    }

    /// True when there are no registers (never the case for a decoded response).
    pub fn is_empty(&self) -> bool {
        self.bytes.len() < 2
    }

    /// The `index`-th register value.
    pub fn get(&self, index: usize) -> Option<u16> {
        let i = index.checked_mul(2)?;
        match (self.bytes.get(i), self.bytes.get(i.checked_add(1)?)) {
            (Some(hi), Some(lo)) => Some(be(*hi, *lo)),
            _ => None,
        }
    }

    /// The raw data bytes (2 per register, big-endian).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Iterator over the register values.
    pub fn iter(&self) -> RegisterIter<'a> {
        RegisterIter {
            chunks: self.bytes.chunks_exact(2),
        }
    }

    /// Copies the values into `dest`; returns how many were copied (the shorter length).
    pub fn copy_to(&self, dest: &mut [u16]) -> usize {
        let mut n = 0;
        for (d, v) in dest.iter_mut().zip(self.iter()) {
            *d = v;
            n += 1;
        }
        n
    }

    /// The values as an owned vector.
    pub fn to_vec(&self) -> Vec<u16> {
        words(self.bytes)
    }
}

impl<'a> IntoIterator for Registers<'a> {
    type Item = u16;
    type IntoIter = RegisterIter<'a>;
    fn into_iter(self) -> RegisterIter<'a> {
        self.iter()
    }
}

/// Iterator over borrowed register values.
#[derive(Debug, Clone)]
pub struct RegisterIter<'a> {
    chunks: std::slice::ChunksExact<'a, u8>,
}

impl Iterator for RegisterIter<'_> {
    type Item = u16;
    #[inline]
    fn next(&mut self) -> Option<u16> {
        match self.chunks.next()? {
            [hi, lo] => Some(be(*hi, *lo)),
            _ => None,
        }
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.chunks.size_hint()
    }
}

impl ExactSizeIterator for RegisterIter<'_> {}

/// A decoded response that borrows its register data from the frame (no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseRef<'a> {
    /// 0x03 response.
    ReadHolding(Registers<'a>),
    /// 0x04 response.
    ReadInput(Registers<'a>),
    /// 0x06 response.
    WriteSingle { register: u16, value: u16 },
    /// 0x10 response.
    WriteMultiple { start: u16, count: u16 },
    /// Exception; `function` has bit 7 clear.
    Exception { function: u8, code: ExceptionCode },
}

impl ResponseRef<'_> {
    /// The owned equivalent.
    pub fn to_response(&self) -> ModbusResponse {
        match *self {
            ResponseRef::ReadHolding(r) => ModbusResponse::ReadHolding(r.to_vec()),
            ResponseRef::ReadInput(r) => ModbusResponse::ReadInput(r.to_vec()),
            ResponseRef::WriteSingle { register, value } => {
                ModbusResponse::WriteSingle { register, value }
            }
            ResponseRef::WriteMultiple { start, count } => {
                ModbusResponse::WriteMultiple { start, count }
            }
            ResponseRef::Exception { function, code } => {
                ModbusResponse::Exception { function, code }
            }
        }
    }
}

/// Decodes one complete response frame without allocating; register data stays borrowed.
///
/// Order of checks: length (so a truncated frame reports what was expected), then CRC,
/// then field ranges.
pub fn decode_response_borrowed(
    frame: &[u8],
) -> Result<ModbusRtuFrame<ResponseRef<'_>>, ModbusError> {
    let len = frame.len();
    if len > MAX_FRAME_LEN {
        return Err(ModbusError::TooLong {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let (address, function, third) = match frame {
        [a, f, b, _, _, ..] => (*a, *f, *b),
        _ => return Err(ModbusError::TooShort { len, min: 5 }),
    };
    let expected = match function {
        READ_HOLDING | READ_INPUT => 5 + usize::from(third),
        WRITE_SINGLE | WRITE_MULTIPLE => 8,
        f if f & EXCEPTION_FLAG != 0 => 5,
        f => {
            // Unknown length: report a CRC failure first if the bytes are noise.
            check_crc(frame)?;
            return Err(ModbusError::UnsupportedFunction { function: f });
        }
    };
    if len != expected {
        return Err(ModbusError::LengthMismatch {
            function,
            expected,
            got: len,
        });
    }
    let body = check_crc(frame)?;
    let pdu = match body {
        [_, f @ (READ_HOLDING | READ_INPUT), byte_count, data @ ..] => {
            if *byte_count == 0 || byte_count % 2 != 0 || *byte_count > 250 {
                return Err(ModbusError::BadByteCount {
                    function: *f,
                    byte_count: *byte_count,
                });
            }
            let regs = Registers { bytes: data };
            if *f == READ_HOLDING {
                ResponseRef::ReadHolding(regs)
            } else {
                ResponseRef::ReadInput(regs)
            }
        }
        [_, WRITE_SINGLE, rh, rl, vh, vl] => ResponseRef::WriteSingle {
            register: be(*rh, *rl),
            value: be(*vh, *vl),
        },
        [_, WRITE_MULTIPLE, sh, sl, ch, cl] => {
            let count = be(*ch, *cl);
            if count == 0 || count > MAX_WRITE_REGISTERS {
                return Err(ModbusError::BadQuantity {
                    function: WRITE_MULTIPLE,
                    count: usize::from(count),
                    max: MAX_WRITE_REGISTERS,
                });
            }
            ResponseRef::WriteMultiple {
                start: be(*sh, *sl),
                count,
            }
        }
        [_, f, code] => ResponseRef::Exception {
            function: f & !EXCEPTION_FLAG,
            code: ExceptionCode::from_u8(*code),
        },
        // Unreachable given the length check above; reported rather than panicking.
        _ => {
            return Err(ModbusError::LengthMismatch {
                function,
                expected,
                got: len,
            })
        }
    };
    Ok(ModbusRtuFrame { address, pdu })
}

/// Decodes one complete response frame into owned values.
/// See [`decode_response_borrowed`] for the allocation-free variant.
pub fn decode_response(frame: &[u8]) -> Result<ModbusRtuFrame<ModbusResponse>, ModbusError> {
    let f = decode_response_borrowed(frame)?;
    Ok(ModbusRtuFrame {
        address: f.address,
        pdu: f.pdu.to_response(),
    })
}

/// A response frame as named fields in wire order (address, function, each register by
/// number, the CRC), for showing where two answers differ. `start`: the first register
/// the request asked for (register fields are then numbered from it); `name` names a
/// register. A frame with a bad CRC still shows its fields (decoded as if the CRC were
/// right) and says so in `crc`; one that is no response gives a `frame` field saying why.
pub fn response_fields(frame: &[u8], start: Option<u16>, name: &dyn Fn(u16) -> Option<&'static str>) -> Vec<(String, String)> {
    let Some((body, crc_bytes)) = frame.split_last_chunk::<2>() else {
        return vec![("frame".into(), format!("{} byte(s): too short for a Modbus RTU frame", frame.len()))];
    };
    let received = u16::from_le_bytes(*crc_bytes);
    let computed = crc16(body);
    let mut mended = body.to_vec();
    mended.extend_from_slice(&computed.to_le_bytes());
    let mut out = Vec::new();
    match decode_response_borrowed(&mended) {
        Ok(f) => {
            out.push(("address".into(), f.address.to_string()));
            out.push(("function".into(), format!("0x{:02X}", mended.get(1).copied().unwrap_or(0))));
            match f.pdu {
                ResponseRef::ReadHolding(regs) | ResponseRef::ReadInput(regs) => {
                    out.push(("byte count".into(), (regs.len() * 2).to_string()));
                    for (i, v) in regs.iter().enumerate() {
                        let field = match start.and_then(|s| s.checked_add(u16::try_from(i).ok()?)) {
                            Some(r) => match name(r) {
                                Some(n) => format!("register {r} ({n})"),
                                None => format!("register {r}"),
                            },
                            None => format!("register +{i}"),
                        };
                        out.push((field, format!("{v} (0x{v:04X})")));
                    }
                }
                ResponseRef::WriteSingle { register, value } => {
                    out.push(("register".into(), register.to_string()));
                    out.push(("value".into(), value.to_string()));
                }
                ResponseRef::WriteMultiple { start, count } => {
                    out.push(("start".into(), start.to_string()));
                    out.push(("count".into(), count.to_string()));
                }
                ResponseRef::Exception { code, .. } => out.push(("exception".into(), code.to_string())),
            }
        }
        // A request coming back (an adapter's echo) or noise.
        Err(e) => match decode_request(&mended) {
            Ok(r) => out.push(("frame".into(), format!("a request (echo?): addr={} {:?}", r.address, r.pdu))),
            Err(_) => out.push(("frame".into(), format!("no Modbus response: {e}"))),
        },
    }
    let crc = if received == computed { format!("0x{received:04X}") } else { format!("0x{received:04X} (bad: its bytes give 0x{computed:04X})") };
    out.push(("crc".into(), crc));
    out
}

// ---------------------------------------------------------------------------------------
// Response encode
// ---------------------------------------------------------------------------------------

/// Appends a read response frame (`address function byte_count data crc`) to `out`.
///
/// `function` is written as given (normally 0x03 or 0x04). Does not allocate when `out`
/// has room for `5 + 2 × values.len()` more bytes.
/// Errors: `values` empty or longer than 125 (`BadQuantity`); `out` is then unchanged.
pub fn encode_read_response_into(
    address: u8,
    function: u8,
    values: &[u16],
    out: &mut Vec<u8>,
) -> Result<(), ModbusError> {
    if values.is_empty() || values.len() > usize::from(MAX_READ_REGISTERS) {
        return Err(ModbusError::BadQuantity {
            function,
            count: values.len(),
            max: MAX_READ_REGISTERS,
        });
    }
    let start = out.len();
    out.reserve(5 + 2 * values.len());
    // values.len() <= 125, so the byte count fits in a u8.
    out.extend_from_slice(&[address, function, (values.len() * 2) as u8]);
    for v in values {
        out.extend_from_slice(&v.to_be_bytes());
    }
    finish_frame(out, start);
    Ok(())
}

/// Appends an exception response frame (5 bytes) to `out`. `function` is the request's
/// function code; 0x80 is set on the wire.
pub fn encode_exception_into(address: u8, function: u8, code: ExceptionCode, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[address, function | EXCEPTION_FLAG, code.code()]);
    finish_frame(out, start);
}

/// Appends the encoded response frame (with CRC) to `out`.
///
/// Errors (`out` unchanged): a read response with 0 or more than 125 values, or a
/// write-multiple response with count 0 or more than 123 (`BadQuantity`).
pub fn encode_response_into(
    frame: &ModbusRtuFrame<ModbusResponse>,
    out: &mut Vec<u8>,
) -> Result<(), ModbusError> {
    let address = frame.address;
    match &frame.pdu {
        ModbusResponse::ReadHolding(values) => {
            encode_read_response_into(address, READ_HOLDING, values, out)
        }
        ModbusResponse::ReadInput(values) => {
            encode_read_response_into(address, READ_INPUT, values, out)
        }
        ModbusResponse::WriteSingle { register, value } => {
            let start = out.len();
            out.extend_from_slice(&[address, WRITE_SINGLE]);
            out.extend_from_slice(&register.to_be_bytes());
            out.extend_from_slice(&value.to_be_bytes());
            finish_frame(out, start);
            Ok(())
        }
        ModbusResponse::WriteMultiple { start: reg, count } => {
            if *count == 0 || *count > MAX_WRITE_REGISTERS {
                return Err(ModbusError::BadQuantity {
                    function: WRITE_MULTIPLE,
                    count: usize::from(*count),
                    max: MAX_WRITE_REGISTERS,
                });
            }
            let start = out.len();
            out.extend_from_slice(&[address, WRITE_MULTIPLE]);
            out.extend_from_slice(&reg.to_be_bytes());
            out.extend_from_slice(&count.to_be_bytes());
            finish_frame(out, start);
            Ok(())
        }
        ModbusResponse::Exception { function, code } => {
            encode_exception_into(address, *function, *code, out);
            Ok(())
        }
    }
}

/// Encodes a response frame (with CRC). See [`encode_response_into`] for the errors.
pub fn encode_response(frame: &ModbusRtuFrame<ModbusResponse>) -> Result<Vec<u8>, ModbusError> {
    let mut out = Vec::with_capacity(match &frame.pdu {
        ModbusResponse::ReadHolding(v) | ModbusResponse::ReadInput(v) => v
            .len()
            .saturating_mul(2)
            .saturating_add(5)
            .min(MAX_FRAME_LEN),
        _ => 8,
    });
    encode_response_into(frame, &mut out)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Stream framing
// ---------------------------------------------------------------------------------------

/// Result of looking for a frame boundary at the start of a byte buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameLength {
    /// `buf[..n]` is one whole frame candidate (`buf.len() >= n`). It may still fail to
    /// decode (CRC, ranges); the caller consumes `n` bytes either way.
    Complete(usize),
    /// The buffer is a valid-looking prefix; wait for more bytes.
    NeedMore,
    /// No frame of this kind starts here (unknown function code / start byte); a caller
    /// resynchronising drops one byte and tries again.
    Invalid,
}

#[inline]
fn complete_if(buf: &[u8], n: usize) -> FrameLength {
    if buf.len() >= n {
        FrameLength::Complete(n)
    } else {
        FrameLength::NeedMore
    }
}

/// Length of the request frame at the start of `buf`, judged from its function code:
/// 0x03/0x04/0x06 → 8 bytes; 0x10 → 9 + byte count; anything else → `Invalid`.
pub fn request_frame_length(buf: &[u8]) -> FrameLength {
    match buf {
        [] | [_] => FrameLength::NeedMore,
        [_, READ_HOLDING | READ_INPUT | WRITE_SINGLE, ..] => complete_if(buf, 8),
        [_, WRITE_MULTIPLE, _, _, _, _, byte_count, ..] => {
            complete_if(buf, 9 + usize::from(*byte_count))
        }
        [_, WRITE_MULTIPLE, ..] => FrameLength::NeedMore,
        _ => FrameLength::Invalid,
    }
}

/// Length of the response frame at the start of `buf`, judged from its function code:
/// 0x03/0x04 → 5 + byte count; 0x06/0x10 → 8; exception (0x80|fn) → 5; else `Invalid`.
pub fn response_frame_length(buf: &[u8]) -> FrameLength {
    match buf {
        [] | [_] => FrameLength::NeedMore,
        [_, READ_HOLDING | READ_INPUT, byte_count, ..] => {
            complete_if(buf, 5 + usize::from(*byte_count))
        }
        [_, READ_HOLDING | READ_INPUT] => FrameLength::NeedMore,
        [_, WRITE_SINGLE | WRITE_MULTIPLE, ..] => complete_if(buf, 8),
        [_, f, ..] if f & EXCEPTION_FLAG != 0 => complete_if(buf, 5),
        _ => FrameLength::Invalid,
    }
}

// ---------------------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------------------

/// A read-only register space. `None` means "no such register" (→ exception 02).
pub trait RegisterMap {
    /// The value of `register`, or `None` if it is not served.
    fn read(&self, register: u16) -> Option<u16>;
}

impl<T: RegisterMap + ?Sized> RegisterMap for &T {
    fn read(&self, register: u16) -> Option<u16> {
        (**self).read(register)
    }
}

impl RegisterMap for BTreeMap<u16, u16> {
    fn read(&self, register: u16) -> Option<u16> {
        self.get(&register).copied()
    }
}

impl<S: std::hash::BuildHasher> RegisterMap for HashMap<u16, u16, S> {
    fn read(&self, register: u16) -> Option<u16> {
        self.get(&register).copied()
    }
}

/// Validates a read's quantity and address range.
fn check_read(start: u16, count: u16) -> Result<(), ExceptionCode> {
    if count == 0 || count > MAX_READ_REGISTERS {
        return Err(ExceptionCode::IllegalDataValue);
    }
    if u32::from(start) + u32::from(count) > 0x1_0000 {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(())
}

/// The exception a non-read request gets on this (read-only) server.
fn non_read_exception(req: &ModbusRequest) -> (u8, ExceptionCode) {
    match req {
        ModbusRequest::WriteSingle { .. } => (WRITE_SINGLE, ExceptionCode::IllegalDataAddress),
        ModbusRequest::WriteMultiple { values, .. } => {
            let code = if values.is_empty() || values.len() > usize::from(MAX_WRITE_REGISTERS) {
                ExceptionCode::IllegalDataValue
            } else {
                ExceptionCode::IllegalDataAddress
            };
            (WRITE_MULTIPLE, code)
        }
        ModbusRequest::Other { function, .. } => {
            let f = function & !EXCEPTION_FLAG;
            let code = match *function {
                // A modelled function whose PDU is malformed (e.g. 0x10 byte count != 2×qty).
                READ_HOLDING | READ_INPUT | WRITE_SINGLE | WRITE_MULTIPLE => {
                    ExceptionCode::IllegalDataValue
                }
                _ => ExceptionCode::IllegalFunction,
            };
            (f, code)
        }
        // Reads are handled by the callers; kept total for safety.
        ModbusRequest::ReadHolding { .. } => (READ_HOLDING, ExceptionCode::ServerDeviceFailure),
        ModbusRequest::ReadInput { .. } => (READ_INPUT, ExceptionCode::ServerDeviceFailure),
    }
}

/// Answers `req` from `map` the way the EG4 pack does:
///
/// * 0x03 and 0x04 read the same map; quantity 0 or >125 → exception 03; any register of
///   the range absent (or the range running past 0xFFFF) → exception 02.
/// * 0x06 → exception 02 (registers are read-only on this pack).
/// * 0x10 → exception 03 if quantity is 0 or >123 (or byte count ≠ 2×quantity, which
///   decodes as `Other{0x10}`), else 02.
/// * any other function → exception 01.
pub fn serve(req: &ModbusRequest, map: &impl RegisterMap) -> ModbusResponse {
    let (function, start, count) = match req {
        ModbusRequest::ReadHolding { start, count } => (READ_HOLDING, *start, *count),
        ModbusRequest::ReadInput { start, count } => (READ_INPUT, *start, *count),
        other => {
            let (function, code) = non_read_exception(other);
            return ModbusResponse::Exception { function, code };
        }
    };
    let values = check_read(start, count).and_then(|()| {
        (0..count)
            .map(|i| {
                map.read(start.wrapping_add(i))
                    .ok_or(ExceptionCode::IllegalDataAddress)
            })
            .collect::<Result<Vec<u16>, ExceptionCode>>()
    });
    match values {
        Ok(v) if function == READ_HOLDING => ModbusResponse::ReadHolding(v),
        Ok(v) => ModbusResponse::ReadInput(v),
        Err(code) => ModbusResponse::Exception { function, code },
    }
}

/// Like [`serve`], but appends the complete RTU response frame for slave `address` to
/// `out` without building an intermediate response (no allocation when `out` has room for
/// `5 + 2 × count` more bytes).
pub fn serve_into(address: u8, req: &ModbusRequest, map: &impl RegisterMap, out: &mut Vec<u8>) {
    let (function, start, count) = match req {
        ModbusRequest::ReadHolding { start, count } => (READ_HOLDING, *start, *count),
        ModbusRequest::ReadInput { start, count } => (READ_INPUT, *start, *count),
        other => {
            let (function, code) = non_read_exception(other);
            encode_exception_into(address, function, code, out);
            return;
        }
    };
    if let Err(code) = check_read(start, count) {
        encode_exception_into(address, function, code, out);
        return;
    }
    let frame_start = out.len();
    out.reserve(5 + 2 * usize::from(count));
    // count <= 125 after check_read, so 2×count fits in a u8.
    out.extend_from_slice(&[address, function, (count * 2) as u8]);
    for i in 0..count {
        match map.read(start.wrapping_add(i)) {
            Some(v) => out.extend_from_slice(&v.to_be_bytes()),
            None => {
                out.truncate(frame_start);
                encode_exception_into(address, function, ExceptionCode::IllegalDataAddress, out);
                return;
            }
        }
    }
    finish_frame(out, frame_start);
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    /// Bit-by-bit CRC-16/MODBUS, independent of the `crc` crate.
    fn crc_reference(data: &[u8]) -> u16 {
        let mut crc: u16 = 0xFFFF;
        for &b in data {
            crc ^= u16::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xA001
                } else {
                    crc >> 1
                };
            }
        }
        crc
    }

    fn map_0_to_46() -> BTreeMap<u16, u16> {
        (0..47u16).map(|r| (r, r * 3 + 1)).collect()
    }

    #[test]
    fn crc_check_value_and_reference() {
        assert_eq!(crc16(b"123456789"), 0x4B37);
        let mut x: u32 = 12345;
        for len in 0..300 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            assert_eq!(crc16(&data), crc_reference(&data), "len {len}");
        }
    }

    /// Request frames captured from public tools / the reference (CRC bytes as seen on
    /// the wire), cross-checked with a Python bit-by-bit CRC.
    #[test]
    fn known_request_frames() {
        let cases = [
            ("01 03 00 00 00 2F 04 16", 0x01, 0x0000, 0x2F), // lp4-v2 poll (reference)
            ("01 03 00 00 00 27 05 D0", 0x01, 0x0000, 0x27), // EG4-LL runtime poll
            ("01 03 00 69 00 23 D4 0F", 0x01, 0x0069, 0x23), // EG4-LL info read (PC tool)
            ("40 03 00 69 00 17 DA C9", 0x40, 0x0069, 0x17), // EG4 BMS Tools capture
            ("01 03 00 2D 00 5B 94 38", 0x01, 0x002D, 0x5B), // EG4-LL config read
        ];
        for (text, addr, start, count) in cases {
            let bytes = hex(text);
            let f = decode_request(&bytes).unwrap();
            assert_eq!(f.address, addr);
            assert_eq!(f.pdu, ModbusRequest::ReadHolding { start, count });
            assert_eq!(encode_request(&f).unwrap(), bytes, "{text}");
        }
    }

    #[test]
    fn append_crc_low_byte_first() {
        let mut v = hex("01 03 00 00 00 2F");
        append_crc(&mut v);
        assert_eq!(v, hex("01 03 00 00 00 2F 04 16"));
        assert_eq!(crc16(&v[..6]), 0x1604);
    }

    #[test]
    fn request_round_trips() {
        let reqs = vec![
            ModbusRequest::ReadHolding {
                start: 0,
                count: 47,
            },
            ModbusRequest::ReadInput {
                start: 105,
                count: 23,
            },
            ModbusRequest::ReadHolding { start: 0, count: 0 },
            ModbusRequest::WriteSingle {
                register: 7,
                value: 0xBEEF,
            },
            ModbusRequest::WriteMultiple {
                start: 3,
                values: vec![1, 2, 0xFFFF],
            },
            ModbusRequest::WriteMultiple {
                start: 3,
                values: vec![],
            },
            ModbusRequest::WriteMultiple {
                start: 0,
                values: vec![9; 123],
            },
            ModbusRequest::Other {
                function: 0x2B,
                data: vec![0x0E, 0x01, 0x00],
            },
            ModbusRequest::Other {
                function: 0x11,
                data: vec![],
            },
            ModbusRequest::Other {
                function: 0x10,
                data: vec![0, 0, 0, 2, 2, 0, 1],
            },
        ];
        for pdu in reqs {
            let frame = ModbusRtuFrame { address: 0x10, pdu };
            let bytes = encode_request(&frame).unwrap();
            assert_eq!(decode_request(&bytes).unwrap(), frame);
            assert_eq!(
                request_frame_length(&bytes),
                match frame.pdu.function() {
                    0x03 | 0x04 | 0x06 | 0x10 => FrameLength::Complete(bytes.len()),
                    _ => FrameLength::Invalid,
                }
            );
        }
    }

    #[test]
    fn write_multiple_byte_count_disagreeing_with_quantity_is_other() {
        // quantity 2 but byte count 2 (should be 4)
        let mut f = hex("01 10 00 00 00 02 02 00 01");
        append_crc(&mut f);
        let d = decode_request(&f).unwrap();
        assert_eq!(
            d.pdu,
            ModbusRequest::Other {
                function: 0x10,
                data: hex("00 00 00 02 02 00 01")
            }
        );
        assert_eq!(
            serve(&d.pdu, &map_0_to_46()),
            ModbusResponse::Exception {
                function: 0x10,
                code: ExceptionCode::IllegalDataValue
            }
        );
        assert_eq!(encode_request(&d).unwrap(), f);
    }

    #[test]
    fn request_errors() {
        // too short
        assert_eq!(
            decode_request(&[]),
            Err(ModbusError::TooShort { len: 0, min: 4 })
        );
        assert_eq!(
            decode_request(&[1, 3, 0]),
            Err(ModbusError::TooShort { len: 3, min: 4 })
        );
        // truncated fixed-length request
        let full = hex("01 03 00 00 00 2F 04 16");
        for n in 4..8 {
            assert_eq!(
                decode_request(&full[..n]),
                Err(ModbusError::LengthMismatch {
                    function: 3,
                    expected: 8,
                    got: n
                })
            );
        }
        // extra byte
        let mut long = full.clone();
        long.push(0);
        assert_eq!(
            decode_request(&long),
            Err(ModbusError::LengthMismatch {
                function: 3,
                expected: 8,
                got: 9
            })
        );
        // bad CRC
        let mut bad = full.clone();
        bad[7] ^= 0xFF;
        assert_eq!(
            decode_request(&bad),
            Err(ModbusError::BadCrc {
                computed: 0x1604,
                received: 0xE904
            })
        );
        // 0x10 too short to read the byte count
        assert_eq!(
            decode_request(&hex("01 10 00 00 00 01 02 00")),
            Err(ModbusError::TooShort { len: 8, min: 9 })
        );
        // 0x10 byte count says 4 data bytes, frame has 2
        let mut wm = hex("01 10 00 00 00 02 04 00 01");
        append_crc(&mut wm);
        assert_eq!(
            decode_request(&wm),
            Err(ModbusError::LengthMismatch {
                function: 0x10,
                expected: 13,
                got: 11
            })
        );
        // too long
        let huge = vec![0u8; 257];
        assert_eq!(
            decode_request(&huge),
            Err(ModbusError::TooLong { len: 257, max: 256 })
        );
    }

    #[test]
    fn encode_request_errors() {
        let f = ModbusRtuFrame {
            address: 1,
            pdu: ModbusRequest::WriteMultiple {
                start: 0,
                values: vec![0; 124],
            },
        };
        assert_eq!(
            encode_request(&f),
            Err(ModbusError::TooLong { len: 257, max: 256 })
        );
        let f = ModbusRtuFrame {
            address: 1,
            pdu: ModbusRequest::Other {
                function: 0x41,
                data: vec![0; 253],
            },
        };
        assert_eq!(
            encode_request(&f),
            Err(ModbusError::TooLong { len: 257, max: 256 })
        );
        let mut out = vec![0xAA];
        assert!(encode_request_into(&f, &mut out).is_err());
        assert_eq!(out, vec![0xAA], "out untouched on error");
    }

    #[test]
    fn known_response_frame_47_registers() {
        let values: Vec<u16> = (0..47u16).map(|i| i * 1000 + 7).collect();
        let mut expected = vec![0x01, 0x03, 0x5E];
        for v in &values {
            expected.extend_from_slice(&v.to_be_bytes());
        }
        let crc = crc_reference(&expected);
        expected.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(expected.len(), 99);

        let frame = ModbusRtuFrame {
            address: 1,
            pdu: ModbusResponse::ReadHolding(values.clone()),
        };
        assert_eq!(encode_response(&frame).unwrap(), expected);
        assert_eq!(decode_response(&expected).unwrap(), frame);
        let b = decode_response_borrowed(&expected).unwrap();
        match b.pdu {
            ResponseRef::ReadHolding(r) => {
                assert_eq!(r.len(), 47);
                assert!(!r.is_empty());
                assert_eq!(r.iter().len(), 47);
                assert_eq!(r.iter().collect::<Vec<_>>(), values);
                assert_eq!(r.get(46), Some(46_007));
                assert_eq!(r.get(47), None);
                assert_eq!(r.get(usize::MAX), None);
                let mut buf = [0u16; 50];
                assert_eq!(r.copy_to(&mut buf), 47);
                assert_eq!(&buf[..47], &values[..]);
                assert_eq!(r.as_bytes().len(), 94);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(response_frame_length(&expected), FrameLength::Complete(99));
        assert_eq!(
            response_frame_length(&expected[..98]),
            FrameLength::NeedMore
        );
    }

    #[test]
    fn known_exception_frames() {
        // 01 83 02 C0 F1 is the textbook "illegal data address" answer to fn 03 at addr 1.
        let f = hex("01 83 02 C0 F1");
        let d = decode_response(&f).unwrap();
        assert_eq!(
            d.pdu,
            ModbusResponse::Exception {
                function: 3,
                code: ExceptionCode::IllegalDataAddress
            }
        );
        assert_eq!(encode_response(&d).unwrap(), f);
        assert_eq!(response_frame_length(&f), FrameLength::Complete(5));
        // 01 81 01 81 90: illegal function for fn 01.
        let f = hex("01 81 01 81 90");
        assert_eq!(
            decode_response(&f).unwrap().pdu,
            ModbusResponse::Exception {
                function: 1,
                code: ExceptionCode::IllegalFunction
            }
        );
    }

    #[test]
    fn exception_codes() {
        for c in 0..=255u8 {
            assert_eq!(ExceptionCode::from_u8(c).code(), c);
        }
        assert_eq!(ExceptionCode::from_u8(3), ExceptionCode::IllegalDataValue);
        assert_eq!(
            ExceptionCode::from_u8(4),
            ExceptionCode::ServerDeviceFailure
        );
        assert_eq!(ExceptionCode::from_u8(0x0B), ExceptionCode::Other(0x0B));
        assert_eq!(
            ExceptionCode::IllegalDataAddress.to_string(),
            "illegal data address (02)"
        );
    }

    #[test]
    fn response_round_trips() {
        let resps = vec![
            ModbusResponse::ReadHolding(vec![1]),
            ModbusResponse::ReadInput(vec![0xFFFF; 125]),
            ModbusResponse::WriteSingle {
                register: 1,
                value: 2,
            },
            ModbusResponse::WriteMultiple {
                start: 100,
                count: 123,
            },
            ModbusResponse::Exception {
                function: 0x10,
                code: ExceptionCode::Other(0x0B),
            },
            ModbusResponse::Exception {
                function: 0x03,
                code: ExceptionCode::ServerDeviceFailure,
            },
        ];
        for pdu in resps {
            let frame = ModbusRtuFrame { address: 247, pdu };
            let bytes = encode_response(&frame).unwrap();
            assert_eq!(decode_response(&bytes).unwrap(), frame);
            assert_eq!(
                response_frame_length(&bytes),
                FrameLength::Complete(bytes.len())
            );
            assert_eq!(bytes[1], frame.pdu.function());
        }
    }

    #[test]
    fn response_errors() {
        assert_eq!(
            decode_response(&[1, 3, 2, 0]),
            Err(ModbusError::TooShort { len: 4, min: 5 })
        );
        // byte count says 94 bytes, frame was cut
        let full = encode_response(&ModbusRtuFrame {
            address: 1,
            pdu: ModbusResponse::ReadHolding(vec![5; 47]),
        })
        .unwrap();
        assert_eq!(
            decode_response(&full[..50]),
            Err(ModbusError::LengthMismatch {
                function: 3,
                expected: 99,
                got: 50
            })
        );
        // corrupt a data byte
        let mut bad = full.clone();
        bad[10] ^= 1;
        assert!(matches!(
            decode_response(&bad),
            Err(ModbusError::BadCrc { .. })
        ));
        // odd byte count
        let mut odd = hex("01 03 03 00 01 02");
        append_crc(&mut odd);
        assert_eq!(
            decode_response(&odd),
            Err(ModbusError::BadByteCount {
                function: 3,
                byte_count: 3
            })
        );
        // zero byte count
        let mut zero = hex("01 04 00");
        append_crc(&mut zero);
        assert_eq!(
            decode_response(&zero),
            Err(ModbusError::BadByteCount {
                function: 4,
                byte_count: 0
            })
        );
        // write-multiple response with quantity 0
        let mut wm = hex("01 10 00 00 00 00");
        append_crc(&mut wm);
        assert_eq!(
            decode_response(&wm),
            Err(ModbusError::BadQuantity {
                function: 0x10,
                count: 0,
                max: 123
            })
        );
        // unsupported function with a good CRC
        let mut f1 = hex("01 01 01 05");
        append_crc(&mut f1);
        assert_eq!(
            decode_response(&f1),
            Err(ModbusError::UnsupportedFunction { function: 1 })
        );
        // fault 4: pack answering 0xFF bytes → exception-shaped, bad CRC
        assert!(matches!(
            decode_response(&[0xFF; 5]),
            Err(ModbusError::BadCrc { .. })
        ));
        assert!(matches!(
            decode_response(&[0xFF; 99]),
            Err(ModbusError::LengthMismatch {
                function: 0xFF,
                expected: 5,
                got: 99
            })
        ));
        // fault 3: zeros with a bad CRC
        let mut zeros = vec![1, 3, 0x5E];
        zeros.extend_from_slice(&[0; 94]);
        zeros.extend_from_slice(&[0x12, 0x34]);
        assert!(matches!(
            decode_response(&zeros),
            Err(ModbusError::BadCrc { .. })
        ));
        assert_eq!(
            decode_response(&vec![0; 300]),
            Err(ModbusError::TooLong { len: 300, max: 256 })
        );
    }

    #[test]
    fn encode_response_errors() {
        let mut out = Vec::new();
        assert_eq!(
            encode_read_response_into(1, 3, &[], &mut out),
            Err(ModbusError::BadQuantity {
                function: 3,
                count: 0,
                max: 125
            })
        );
        assert_eq!(
            encode_read_response_into(1, 4, &[0; 126], &mut out),
            Err(ModbusError::BadQuantity {
                function: 4,
                count: 126,
                max: 125
            })
        );
        assert!(out.is_empty());
        let f = ModbusRtuFrame {
            address: 1,
            pdu: ModbusResponse::WriteMultiple {
                start: 0,
                count: 124,
            },
        };
        assert_eq!(
            encode_response(&f),
            Err(ModbusError::BadQuantity {
                function: 0x10,
                count: 124,
                max: 123
            })
        );
    }

    #[test]
    fn error_messages_say_what_was_wrong() {
        let msg = ModbusError::BadCrc {
            computed: 0x1604,
            received: 0x1234,
        }
        .to_string();
        assert!(msg.contains("0x1234") && msg.contains("0x1604"), "{msg}");
        let msg = ModbusError::LengthMismatch {
            function: 3,
            expected: 99,
            got: 50,
        }
        .to_string();
        assert!(
            msg.contains("99") && msg.contains("50") && msg.contains("0x03"),
            "{msg}"
        );
        let msg = ModbusError::TooShort { len: 3, min: 4 }.to_string();
        assert!(msg.contains('3') && msg.contains('4'), "{msg}");
        let msg = ModbusError::BadByteCount {
            function: 3,
            byte_count: 7,
        }
        .to_string();
        assert!(msg.contains('7') && msg.contains("even"), "{msg}");
        let msg = ModbusError::BadQuantity {
            function: 3,
            count: 200,
            max: 125,
        }
        .to_string();
        assert!(msg.contains("200") && msg.contains("125"), "{msg}");
        let msg = ModbusError::UnsupportedFunction { function: 0x2B }.to_string();
        assert!(msg.contains("0x2B"), "{msg}");
        let msg = ModbusError::TooLong { len: 300, max: 256 }.to_string();
        assert!(msg.contains("300") && msg.contains("256"), "{msg}");
    }

    #[test]
    fn stream_framing() {
        use FrameLength::*;
        assert_eq!(request_frame_length(&[]), NeedMore);
        assert_eq!(request_frame_length(&[1]), NeedMore);
        assert_eq!(request_frame_length(&[1, 3, 0]), NeedMore);
        assert_eq!(
            request_frame_length(&[1, 3, 0, 0, 0, 0x2F, 5, 0xDE, 1]),
            Complete(8)
        );
        assert_eq!(request_frame_length(&[1, 6, 0, 0, 0, 0, 0, 0]), Complete(8));
        assert_eq!(request_frame_length(&[1, 0x10, 0, 0, 0, 1]), NeedMore);
        assert_eq!(
            request_frame_length(&[1, 0x10, 0, 0, 0, 1, 2, 0, 1, 0]),
            NeedMore
        );
        assert_eq!(
            request_frame_length(&[1, 0x10, 0, 0, 0, 1, 2, 0, 1, 0, 0]),
            Complete(11)
        );
        assert_eq!(request_frame_length(&[1, 0x01]), Invalid);
        assert_eq!(request_frame_length(&[1, 0x83, 2]), Invalid);
        assert_eq!(response_frame_length(&[1, 3]), NeedMore);
        assert_eq!(response_frame_length(&[1, 3, 2, 0, 0, 0]), NeedMore);
        assert_eq!(response_frame_length(&[1, 3, 2, 0, 0, 0, 0]), Complete(7));
        assert_eq!(response_frame_length(&[1, 4, 0, 0, 0]), Complete(5));
        assert_eq!(
            response_frame_length(&[1, 6, 0, 0, 0, 0, 0, 0]),
            Complete(8)
        );
        assert_eq!(response_frame_length(&[1, 0x10, 0, 0]), NeedMore);
        assert_eq!(response_frame_length(&[1, 0x83, 2, 0, 0]), Complete(5));
        assert_eq!(response_frame_length(&[1, 0x01, 1]), Invalid);
    }

    #[test]
    fn stream_resync_over_echo_and_garbage() {
        // fault 6: the request echoed in front of the reply, plus a noise byte.
        let map = map_0_to_46();
        let req = hex("01 03 00 00 00 2F 04 16");
        let mut reply = Vec::new();
        serve_into(1, &decode_request(&req).unwrap().pdu, &map, &mut reply);
        let mut stream = vec![0x00];
        stream.extend_from_slice(&req);
        stream.extend_from_slice(&reply);
        let mut pos = 0;
        let mut got = Vec::new();
        while pos < stream.len() {
            match response_frame_length(&stream[pos..]) {
                FrameLength::Complete(n) => match decode_response(&stream[pos..pos + n]) {
                    Ok(f) => {
                        got.push(f);
                        pos += n;
                    }
                    Err(_) => pos += 1,
                },
                FrameLength::Invalid => pos += 1,
                FrameLength::NeedMore => break,
            }
        }
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].pdu,
            ModbusResponse::ReadHolding((0..47).map(|r| r * 3 + 1).collect())
        );
    }

    #[test]
    fn serve_rules() {
        let map = map_0_to_46();
        let ex = |function, code| ModbusResponse::Exception { function, code };
        use ExceptionCode::*;
        let all: Vec<u16> = (0..47).map(|r| r * 3 + 1).collect();
        assert_eq!(
            serve(
                &ModbusRequest::ReadHolding {
                    start: 0,
                    count: 47
                },
                &map
            ),
            ModbusResponse::ReadHolding(all.clone())
        );
        assert_eq!(
            serve(
                &ModbusRequest::ReadInput {
                    start: 0,
                    count: 47
                },
                &map
            ),
            ModbusResponse::ReadInput(all)
        );
        assert_eq!(
            serve(&ModbusRequest::ReadHolding { start: 0, count: 0 }, &map),
            ex(3, IllegalDataValue)
        );
        assert_eq!(
            serve(
                &ModbusRequest::ReadInput {
                    start: 0,
                    count: 126
                },
                &map
            ),
            ex(4, IllegalDataValue)
        );
        assert_eq!(
            serve(
                &ModbusRequest::ReadHolding {
                    start: 0,
                    count: 48
                },
                &map
            ),
            ex(3, IllegalDataAddress)
        );
        assert_eq!(
            serve(
                &ModbusRequest::ReadHolding {
                    start: 46,
                    count: 1
                },
                &map
            ),
            ModbusResponse::ReadHolding(vec![139])
        );
        assert_eq!(
            serve(
                &ModbusRequest::ReadHolding {
                    start: 0xFFFF,
                    count: 2
                },
                &map
            ),
            ex(3, IllegalDataAddress)
        );
        assert_eq!(
            serve(
                &ModbusRequest::WriteSingle {
                    register: 0,
                    value: 1
                },
                &map
            ),
            ex(6, IllegalDataAddress)
        );
        assert_eq!(
            serve(
                &ModbusRequest::WriteMultiple {
                    start: 0,
                    values: vec![1, 2]
                },
                &map
            ),
            ex(0x10, IllegalDataAddress)
        );
        assert_eq!(
            serve(
                &ModbusRequest::WriteMultiple {
                    start: 0,
                    values: vec![]
                },
                &map
            ),
            ex(0x10, IllegalDataValue)
        );
        assert_eq!(
            serve(
                &ModbusRequest::WriteMultiple {
                    start: 0,
                    values: vec![0; 124]
                },
                &map
            ),
            ex(0x10, IllegalDataValue)
        );
        assert_eq!(
            serve(
                &ModbusRequest::Other {
                    function: 0x01,
                    data: vec![]
                },
                &map
            ),
            ex(1, IllegalFunction)
        );
        assert_eq!(
            serve(
                &ModbusRequest::Other {
                    function: 0x2B,
                    data: vec![]
                },
                &map
            ),
            ex(0x2B, IllegalFunction)
        );
        assert_eq!(
            serve(
                &ModbusRequest::Other {
                    function: 0x90,
                    data: vec![]
                },
                &map
            ),
            ex(0x10, IllegalFunction)
        );
    }

    #[test]
    fn serve_into_matches_serve() {
        let map = map_0_to_46();
        let reqs = [
            ModbusRequest::ReadHolding {
                start: 0,
                count: 47,
            },
            ModbusRequest::ReadInput {
                start: 10,
                count: 5,
            },
            ModbusRequest::ReadHolding { start: 0, count: 0 },
            ModbusRequest::ReadHolding {
                start: 40,
                count: 10,
            },
            ModbusRequest::ReadHolding {
                start: 0xFFF0,
                count: 125,
            },
            ModbusRequest::WriteSingle {
                register: 0,
                value: 0,
            },
            ModbusRequest::WriteMultiple {
                start: 0,
                values: vec![1],
            },
            ModbusRequest::WriteMultiple {
                start: 0,
                values: vec![],
            },
            ModbusRequest::Other {
                function: 0x07,
                data: vec![],
            },
            ModbusRequest::Other {
                function: 0x10,
                data: vec![1, 2, 3],
            },
        ];
        for req in reqs {
            let mut out = vec![0xEE]; // appends after existing content
            serve_into(9, &req, &map, &mut out);
            let expected = encode_response(&ModbusRtuFrame {
                address: 9,
                pdu: serve(&req, &map),
            })
            .unwrap();
            assert_eq!(&out[1..], &expected[..], "{req:?}");
            assert_eq!(out[0], 0xEE);
        }
    }

    #[test]
    fn serve_into_does_not_allocate_with_capacity() {
        let map = map_0_to_46();
        let mut out = Vec::with_capacity(128);
        let ptr = out.as_ptr();
        for _ in 0..10 {
            out.clear();
            serve_into(
                1,
                &ModbusRequest::ReadHolding {
                    start: 0,
                    count: 47,
                },
                &map,
                &mut out,
            );
            assert_eq!(out.len(), 99);
            assert_eq!(out.as_ptr(), ptr);
            out.clear();
            encode_read_response_into(1, 3, &[1; 47], &mut out).unwrap();
            assert_eq!(out.as_ptr(), ptr);
        }
    }

    #[test]
    fn hashmap_and_ref_maps() {
        let mut hm = HashMap::new();
        hm.insert(5u16, 55u16);
        let r = &hm;
        assert_eq!(
            serve(&ModbusRequest::ReadHolding { start: 5, count: 1 }, &r),
            ModbusResponse::ReadHolding(vec![55])
        );
    }

    /// Every truncation and every single-bit flip of valid frames must be rejected or
    /// decode to something that re-encodes to the same bytes; nothing may panic.
    #[test]
    fn truncations_and_bit_flips_never_panic() {
        let map = map_0_to_46();
        let mut frames = vec![hex("01 03 00 00 00 2F 04 16")];
        let mut r = Vec::new();
        serve_into(
            1,
            &ModbusRequest::ReadHolding {
                start: 0,
                count: 47,
            },
            &map,
            &mut r,
        );
        frames.push(r);
        frames.push(hex("01 83 02 C0 F1"));
        frames.push(
            encode_request(&ModbusRtuFrame {
                address: 2,
                pdu: ModbusRequest::WriteMultiple {
                    start: 1,
                    values: vec![1, 2, 3],
                },
            })
            .unwrap(),
        );
        for f in &frames {
            for n in 0..=f.len() {
                let p = &f[..n];
                let _ = request_frame_length(p);
                let _ = response_frame_length(p);
                if let Ok(d) = decode_request(p) {
                    assert_eq!(encode_request(&d).unwrap(), p);
                }
                if let Ok(d) = decode_response(p) {
                    assert_eq!(encode_response(&d).unwrap(), p);
                }
            }
            let is_req = decode_request(f).is_ok();
            let is_resp = decode_response(f).is_ok();
            assert!(is_req || is_resp);
            for bit in 0..f.len() * 8 {
                let mut g = f.clone();
                g[bit / 8] ^= 1 << (bit % 8);
                // CRC-16 catches every single-bit error; framing catches the rest.
                if is_req {
                    assert!(decode_request(&g).is_err(), "request flip {bit} accepted");
                }
                if is_resp {
                    assert!(decode_response(&g).is_err(), "response flip {bit} accepted");
                }
            }
        }
    }
}
