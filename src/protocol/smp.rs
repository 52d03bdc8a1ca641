//! MCUmgr SMP (Simple Management Protocol) as Zephyr and MCUboot devices
//! speak it: the 8-byte header, CBOR payloads, both error forms, and the
//! serial console framing. Facts from `../shared/reference/smp.md`.
//!
//! Sans-IO: bytes in, typed values out, and back. Nothing here panics on
//! any input; `fuzzing::smp_frames_round_trip` checks it.
//!
//! * [`SmpHeader`]: `res(3) ver(2) op(3)`, flags, length (CBOR bytes only),
//!   group, seq, command, big-endian. A response carries the request's
//!   version, group, seq and command.
//! * Payloads are CBOR maps ([`decode_map`]); Zephyr often writes
//!   indefinite-length maps, which are accepted. Trailing bytes after the
//!   map, or a payload that is not a map, are [`PayloadError`]s.
//! * Errors: `{"rc": n}` ([`MgmtErr`]) in both versions; group errors as
//!   `{"err": {"group", "rc"}}` under v2, translated to an `rc` under v1.
//! * [`serial`]: the console transport's `06 09` / `04 14` base64 lines
//!   with a length and a CRC-16/XMODEM.

use ciborium::Value;

/// Header length in bytes.
pub const HEADER_LEN: usize = 8;

/// SMP groups (Zephyr's `MGMT_GROUP_ID_*`).
pub mod group {
    pub const OS: u16 = 0;
    pub const IMAGE: u16 = 1;
    pub const STAT: u16 = 2;
    pub const SETTINGS: u16 = 3;
    pub const LOG: u16 = 4;
    pub const CRASH: u16 = 5;
    pub const SPLIT: u16 = 6;
    pub const RUN: u16 = 7;
    pub const FS: u16 = 8;
    pub const SHELL: u16 = 9;
    pub const ENUM: u16 = 10;
    pub const ZEPHYR: u16 = 63;
}

/// The operation in a header's low three bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SmpOp {
    Read,
    ReadResponse,
    Write,
    WriteResponse,
}

impl SmpOp {
    pub fn from_bits(op: u8) -> Option<SmpOp> {
        match op {
            0 => Some(SmpOp::Read),
            1 => Some(SmpOp::ReadResponse),
            2 => Some(SmpOp::Write),
            3 => Some(SmpOp::WriteResponse),
            _ => None,
        }
    }

    pub fn bits(self) -> u8 {
        match self {
            SmpOp::Read => 0,
            SmpOp::ReadResponse => 1,
            SmpOp::Write => 2,
            SmpOp::WriteResponse => 3,
        }
    }

    /// The answer to a request op; `None` for a response op.
    pub fn response(self) -> Option<SmpOp> {
        match self {
            SmpOp::Read => Some(SmpOp::ReadResponse),
            SmpOp::Write => Some(SmpOp::WriteResponse),
            _ => None,
        }
    }
}

/// SMP protocol versions in the header's `ver` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SmpVersion {
    /// 0: `rc` errors only.
    V1,
    /// 1: group errors as `err {group, rc}`.
    V2,
}

/// The 8-byte SMP header, every field kept as it came (a simulator must be
/// able to send what a library would refuse to produce).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SmpHeader {
    /// The top three bits of byte 0, zero in every real message.
    pub reserved: u8,
    /// 0 = v1, 1 = v2, 2 and 3 reserved.
    pub version: u8,
    /// 0..=7; only 0..=3 are defined.
    pub op: u8,
    pub flags: u8,
    /// Payload length (the CBOR bytes, without this header).
    pub len: u16,
    pub group: u16,
    pub seq: u8,
    pub command: u8,
}

impl SmpHeader {
    /// A header for `op` on `group`/`command` with the given version, seq and length.
    pub fn new(version: SmpVersion, op: SmpOp, group: u16, command: u8, seq: u8, len: u16) -> SmpHeader {
        SmpHeader { reserved: 0, version: version.bits(), op: op.bits(), flags: 0, len, group, seq, command }
    }

    /// The header at the start of `b`, if `b` has eight bytes.
    pub fn parse(b: &[u8]) -> Option<SmpHeader> {
        let b: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        Some(SmpHeader {
            reserved: b[0] >> 5,
            version: (b[0] >> 3) & 0x3,
            op: b[0] & 0x7,
            flags: b[1],
            len: u16::from_be_bytes([b[2], b[3]]),
            group: u16::from_be_bytes([b[4], b[5]]),
            seq: b[6],
            command: b[7],
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let [l0, l1] = self.len.to_be_bytes();
        let [g0, g1] = self.group.to_be_bytes();
        [(self.reserved & 0x7) << 5 | (self.version & 0x3) << 3 | (self.op & 0x7), self.flags, l0, l1, g0, g1, self.seq, self.command]
    }

    pub fn smp_op(&self) -> Option<SmpOp> {
        SmpOp::from_bits(self.op)
    }

    /// The version, when it is one this side speaks (v1 or v2).
    pub fn smp_version(&self) -> Option<SmpVersion> {
        match self.version {
            0 => Some(SmpVersion::V1),
            1 => Some(SmpVersion::V2),
            _ => None,
        }
    }

    /// The header of the answer to this request: the response op, and the
    /// request's version, group, seq and command (a v1 request gets a v1
    /// answer). `None` when this is not a request.
    pub fn response(&self, len: u16) -> Option<SmpHeader> {
        let op = self.smp_op()?.response()?;
        Some(SmpHeader { reserved: 0, op: op.bits(), flags: 0, len, ..*self })
    }
}

impl SmpVersion {
    pub fn bits(self) -> u8 {
        match self {
            SmpVersion::V1 => 0,
            SmpVersion::V2 => 1,
        }
    }
}

/// One SMP message: header and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmpFrame {
    pub header: SmpHeader,
    pub payload: Vec<u8>,
}

/// Why a buffer does not hold one whole SMP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("{0} bytes are fewer than the 8-byte header")]
    Truncated(usize),
    #[error("the header says {said} payload bytes, {got} follow")]
    LengthMismatch { said: usize, got: usize },
}

impl SmpFrame {
    /// One whole message, exactly: the header's length must match what follows.
    pub fn parse(b: &[u8]) -> Result<SmpFrame, FrameError> {
        let header = SmpHeader::parse(b).ok_or(FrameError::Truncated(b.len()))?;
        let got = b.len() - HEADER_LEN;
        if got != header.len as usize {
            return Err(FrameError::LengthMismatch { said: header.len as usize, got });
        }
        Ok(SmpFrame { header, payload: b[HEADER_LEN..].to_vec() })
    }

    /// Header (with its length set to the payload's) and payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        let header = SmpHeader { len: u16::try_from(self.payload.len()).unwrap_or(u16::MAX), ..self.header };
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// How many bytes the message at the front of a stream takes (header plus
/// its stated length), once its header is in: how BLE and raw serial
/// reassemble requests that arrive in pieces.
pub fn frame_len(b: &[u8]) -> Option<usize> {
    SmpHeader::parse(b).map(|h| HEADER_LEN + h.len as usize)
}

/// What a payload is when it is not one CBOR map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("the payload is not CBOR: {0}")]
    NotCbor(String),
    #[error("the payload is CBOR but not a map")]
    NotAMap,
    #[error("{0} bytes follow the CBOR map")]
    TrailingBytes(usize),
}

/// Deepest nesting [`decode_map`] accepts; SMP payloads nest two or three
/// levels, and a bound keeps hostile input from recursing deep.
const MAX_NESTING: usize = 16;

/// The CBOR map a payload is (definite or indefinite length). An empty
/// payload is an empty map, as Zephyr reads it.
pub fn decode_map(payload: &[u8]) -> Result<Vec<(Value, Value)>, PayloadError> {
    if payload.is_empty() {
        return Ok(Vec::new());
    }
    let mut reader = payload;
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut reader, MAX_NESTING).map_err(|e| PayloadError::NotCbor(e.to_string()))?;
    if !reader.is_empty() {
        return Err(PayloadError::TrailingBytes(reader.len()));
    }
    match value {
        Value::Map(m) => Ok(m),
        _ => Err(PayloadError::NotAMap),
    }
}

/// At most this many fields from one message's payload (a hostile map stays bounded).
const MAX_FIELDS: usize = 1024;

/// A message as named fields in wire order: the header's, then every CBOR value under its
/// path (`images[0].hash`), for showing where two answers differ. A message that does not
/// parse gives a `message` field saying why.
pub fn message_fields(b: &[u8]) -> Vec<(String, String)> {
    let m = match SmpFrame::parse(b) {
        Ok(m) => m,
        Err(e) => return vec![("message".into(), format!("no SMP message: {e}"))],
    };
    let h = &m.header;
    let mut out = vec![
        ("version".to_string(), format!("v{}", h.version + 1)),
        ("op".to_string(), h.op.to_string()),
        ("flags".to_string(), format!("0x{:02X}", h.flags)),
        ("length".to_string(), h.len.to_string()),
        ("group".to_string(), h.group.to_string()),
        ("seq".to_string(), h.seq.to_string()),
        ("command".to_string(), h.command.to_string()),
    ];
    match decode_map(&m.payload) {
        Ok(entries) => flatten_map(&entries, "", &mut out),
        Err(e) => out.push(("payload".into(), e.to_string())),
    }
    out
}

fn flatten_map(entries: &[(Value, Value)], path: &str, out: &mut Vec<(String, String)>) {
    for (k, v) in entries {
        let key = match k {
            Value::Text(t) => t.clone(),
            other => value_text(other),
        };
        let p = if path.is_empty() { key } else { format!("{path}.{key}") };
        flatten_value(v, p, out);
    }
}

fn flatten_value(v: &Value, path: String, out: &mut Vec<(String, String)>) {
    if out.len() >= MAX_FIELDS {
        return;
    }
    match v {
        Value::Map(m) => flatten_map(m, &path, out),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                flatten_value(x, format!("{path}[{i}]"), out);
            }
        }
        other => out.push((path, value_text(other))),
    }
}

/// A scalar CBOR value as text (byte strings as hex, cut at 64 bytes).
fn value_text(v: &Value) -> String {
    match v {
        Value::Integer(i) => i128::from(*i).to_string(),
        Value::Text(t) => format!("{t:?}"),
        Value::Bytes(b) if b.len() > 64 => format!("{}… ({} bytes)", super::lower_hex(&b[..64]), b.len()),
        Value::Bytes(b) => super::lower_hex(b),
        Value::Bool(x) => x.to_string(),
        Value::Null => "null".into(),
        Value::Float(f) => f.to_string(),
        Value::Tag(t, inner) => format!("tag {t} {}", value_text(inner)),
        Value::Map(_) | Value::Array(_) => "(nested)".into(),
        _ => format!("{v:?}"),
    }
}

/// CBOR bytes of `value` (definite lengths).
/// CBOR bytes of `value` as Zephyr's zcbor writes them: every map and
/// array indefinite-length (`bf … ff`, `9f … ff`), everything else in its
/// shortest form. Checked byte for byte against Zephyr 4.4's smp_svr
/// (tests/smp_zephyr_differential.rs).
pub fn encode_value(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_indefinite(value, &mut out);
    out
}

fn write_indefinite(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Map(entries) => {
            out.push(0xbf);
            for (k, v) in entries {
                write_indefinite(k, out);
                write_indefinite(v, out);
            }
            out.push(0xff);
        }
        Value::Array(items) => {
            out.push(0x9f);
            for v in items {
                write_indefinite(v, out);
            }
            out.push(0xff);
        }
        Value::Tag(tag, inner) => {
            write_head(6, *tag, out);
            write_indefinite(inner, out);
        }
        // Scalars: ciborium writes them in their shortest form. Writing to a
        // Vec fails only if a value cannot be encoded, which a scalar always can.
        scalar => {
            let _ = ciborium::ser::into_writer(scalar, &mut *out);
        }
    }
}

/// A CBOR head: major type and argument, shortest form.
fn write_head(major: u8, n: u64, out: &mut Vec<u8>) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend([m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend((n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend((n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend(n.to_be_bytes());
        }
    }
}

/// CBOR bytes of a map with text keys, in the order given.
pub fn encode_map(entries: Vec<(&str, Value)>) -> Vec<u8> {
    encode_value(&map(entries))
}

/// A map value with text keys, in the order given.
pub fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (Value::Text(k.to_string()), v)).collect())
}

/// The value under text key `key`.
pub fn get<'a>(m: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    m.iter().find(|(k, _)| matches!(k, Value::Text(t) if t == key)).map(|(_, v)| v)
}

/// An unsigned integer value, if `v` is one that fits `u64`.
pub fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(i128::from(*i)).ok(),
        _ => None,
    }
}

/// A signed integer value, if `v` is one that fits `i64`.
pub fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => i64::try_from(i128::from(*i)).ok(),
        _ => None,
    }
}

/// SMP-level error codes (Zephyr's `MGMT_ERR_*`), the `rc` of both versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MgmtErr {
    Ok = 0,
    Unknown = 1,
    NoMem = 2,
    Inval = 3,
    Timeout = 4,
    NoEnt = 5,
    BadState = 6,
    MsgSize = 7,
    NotSup = 8,
    Corrupt = 9,
    Busy = 10,
    AccessDenied = 11,
    UnsupportedTooOld = 12,
    UnsupportedTooNew = 13,
    PerUser = 256,
}

impl MgmtErr {
    pub fn code(self) -> u64 {
        self as u64
    }

    pub fn from_code(n: u64) -> Option<MgmtErr> {
        use MgmtErr::*;
        Some(match n {
            0 => Ok,
            1 => Unknown,
            2 => NoMem,
            3 => Inval,
            4 => Timeout,
            5 => NoEnt,
            6 => BadState,
            7 => MsgSize,
            8 => NotSup,
            9 => Corrupt,
            10 => Busy,
            11 => AccessDenied,
            12 => UnsupportedTooOld,
            13 => UnsupportedTooNew,
            256 => PerUser,
            _ => return None,
        })
    }
}

/// `{"rc": n}`: an SMP-level error, the same in both versions.
pub fn rc_payload(rc: MgmtErr) -> Vec<u8> {
    encode_map(vec![("rc", Value::from(rc.code()))])
}

/// A group error: `{"err": {"group", "rc"}}` under v2; under v1 the
/// firmware's translation to an SMP-level `rc` (`v1_rc`).
pub fn group_error_payload(version: SmpVersion, group: u16, rc: u16, v1_rc: MgmtErr) -> Vec<u8> {
    match version {
        SmpVersion::V2 => encode_map(vec![("err", map(vec![("group", Value::from(group)), ("rc", Value::from(rc))]))]),
        SmpVersion::V1 => rc_payload(v1_rc),
    }
}

/// The serial console transport: an SMP message as base64 lines.
///
/// Packet = `u16 BE length` (message bytes + 2) + message + `u16 BE
/// CRC-16/XMODEM` over the message. Its base64 is cut into lines of at
/// most [`MAX_LINE`] bytes with the newline: the first starts `06 09`, the
/// others `04 14`. The receiver decodes each line on its own, so a line's
/// base64 is a whole number of 4-character groups.
pub mod serial {
    use base64::Engine as _;
    use crc::{Crc, CRC_16_XMODEM};

    static CRC: Crc<u16> = Crc::<u16>::new(&CRC_16_XMODEM);
    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    /// Longest line, newline included (Zephyr's MCUMGR_SERIAL_MAX_FRAME).
    pub const MAX_LINE: usize = 127;
    pub const START: [u8; 2] = [0x06, 0x09];
    pub const CONTINUATION: [u8; 2] = [0x04, 0x14];

    pub fn crc16(b: &[u8]) -> u16 {
        CRC.checksum(b)
    }

    /// `message` as console lines of at most `max_line` bytes (at least 7:
    /// a marker, one base64 group and the newline), the packet's base64 cut
    /// at 4-character boundaries, as smpclient writes requests.
    pub fn encode(message: &[u8], max_line: usize) -> Vec<u8> {
        let mut packet = Vec::with_capacity(message.len() + 4);
        packet.extend_from_slice(&u16::try_from(message.len() + 2).unwrap_or(u16::MAX).to_be_bytes());
        packet.extend_from_slice(message);
        packet.extend_from_slice(&crc16(message).to_be_bytes());
        let text = B64.encode(&packet);
        let per_line = (max_line.max(7) - 3) / 4 * 4;
        let mut out = Vec::with_capacity(text.len() + text.len() / per_line * 3 + 3);
        for (i, chunk) in text.as_bytes().chunks(per_line).enumerate() {
            out.extend_from_slice(if i == 0 { &START } else { &CONTINUATION });
            out.extend_from_slice(chunk);
            out.push(b'\n');
        }
        out
    }

    /// `message` as Zephyr's serial transport writes it (`mcumgr_serial_tx_pkt`):
    /// each 3-byte group encoded on its own, at most 93 raw bytes a line, and
    /// the CRC never split across lines, so a line may end short and the
    /// 3-byte grouping restart on the next. Clients that decode the whole
    /// text at once, not line by line, meet this layout only on firmware.
    pub fn encode_as_zephyr(message: &[u8]) -> Vec<u8> {
        let crc = crc16(message).to_be_bytes();
        let mut out = Vec::with_capacity(message.len() * 4 / 3 + message.len() / 31 + 12);
        let mut rest = message;
        let mut first = true;
        while !rest.is_empty() {
            let taken = zephyr_line(&mut out, rest, first, message.len(), crc);
            rest = &rest[taken..];
            first = false;
        }
        out
    }

    /// One line of [`encode_as_zephyr`]; returns how many message bytes it carried.
    fn zephyr_line(out: &mut Vec<u8>, rest: &[u8], first: bool, total: usize, crc: [u8; 2]) -> usize {
        fn group(out: &mut Vec<u8>, raw: &[u8]) {
            let mut b = [0u8; 4];
            let n = B64.encode_slice(raw, &mut b).unwrap_or(0);
            out.extend_from_slice(&b[..n]);
        }
        // Raw bytes a line holds: whole base64 groups between the marker and the newline.
        let mut max_input = ((MAX_LINE - 3) / 4 * 3) as isize;
        let mut off = 0;
        out.extend_from_slice(if first { &START } else { &CONTINUATION });
        if first {
            // The length (CRC included) shares the first group with the first byte.
            let len = u16::try_from(total + 2).unwrap_or(u16::MAX).to_be_bytes();
            group(out, &[len[0], len[1], rest[0]]);
            off = 1;
            max_input -= 3;
        }
        let left = (rest.len() - off) as isize;
        let mut to_process = max_input.min(left);
        let reminder = max_input - left;
        let mut last = false;
        if reminder == 0 || reminder == 1 {
            // The CRC would not fit whole: hold a byte back for the next line.
            to_process -= 1;
        } else if reminder >= 2 {
            last = true;
        }
        while to_process >= 3 {
            group(out, &rest[off..off + 3]);
            off += 3;
            to_process -= 3;
        }
        if last {
            match &rest[off..] {
                [] => group(out, &crc),
                [a] => group(out, &[*a, crc[0], crc[1]]),
                [a, b] => {
                    group(out, &[*a, *b, crc[0]]);
                    group(out, &crc[1..]);
                }
                // Unreachable: under three bytes are left when the line is the last.
                _ => {}
            }
            off = rest.len();
        }
        out.push(b'\n');
        off
    }

    /// What [`Receiver::push_line`] made of a line.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum LineOutcome {
        /// A whole message, its CRC good.
        Message(Vec<u8>),
        /// Part of a message; more lines must follow.
        Partial,
        /// Console text (a shell or log line), not SMP.
        Text,
        /// Dropped: longer than the receive buffer, bad base64, a bad CRC,
        /// a continuation with no start, or a length that cannot be.
        Dropped(&'static str),
    }

    /// Longest line a receiver takes, newline included: Zephyr's UART
    /// receive buffer (CONFIG_UART_MCUMGR_RX_BUF_SIZE, 128) holds one line.
    pub const MAX_RX_LINE: usize = 128;

    /// The firmware's receiver: decodes each line on its own and keeps the
    /// packet being assembled, which must fit the net buffer.
    #[derive(Debug)]
    pub struct Receiver {
        packet: Vec<u8>,
        assembling: bool,
        max_line: usize,
        max_packet: usize,
    }

    impl Default for Receiver {
        fn default() -> Self {
            Receiver::with_limits(MAX_RX_LINE, usize::from(u16::MAX) + 2)
        }
    }

    impl Receiver {
        pub fn new() -> Receiver {
            Receiver::default()
        }

        /// Lines over `max_line` bytes are dropped; so is a packet (length,
        /// message and CRC) that outgrows `max_packet`, the net buffer it is
        /// decoded into (Zephyr's CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE).
        pub fn with_limits(max_line: usize, max_packet: usize) -> Receiver {
            Receiver { packet: Vec::new(), assembling: false, max_line, max_packet }
        }

        /// One line, with or without its `\n` (and an optional `\r`).
        pub fn push_line(&mut self, line: &[u8]) -> LineOutcome {
            if line.len() > self.max_line {
                // A real receiver never sees the end of an over-long line's
                // packet, so the packet is lost with it.
                self.reset();
                return LineOutcome::Dropped("line longer than the receive buffer");
            }
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            let body = body.strip_suffix(b"\r").unwrap_or(body);
            let (start, text) = match body {
                [0x06, 0x09, rest @ ..] => (true, rest),
                [0x04, 0x14, rest @ ..] => (false, rest),
                _ => return LineOutcome::Text,
            };
            if !start && !self.assembling {
                return LineOutcome::Dropped("continuation line with no start line");
            }
            let Ok(bytes) = B64.decode(text) else {
                self.reset();
                return LineOutcome::Dropped("line is not base64");
            };
            if start {
                self.packet.clear();
            }
            if self.packet.len() + bytes.len() > self.max_packet {
                self.reset();
                return LineOutcome::Dropped("packet larger than the net buffer");
            }
            self.assembling = true;
            self.packet.extend_from_slice(&bytes);
            self.complete()
        }

        fn complete(&mut self) -> LineOutcome {
            let Some(len) = self.packet.get(..2).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize) else {
                return LineOutcome::Partial;
            };
            if len < 2 {
                self.reset();
                return LineOutcome::Dropped("packet length under 2");
            }
            let have = self.packet.len() - 2;
            if have < len {
                return LineOutcome::Partial;
            }
            if have > len {
                self.reset();
                return LineOutcome::Dropped("more bytes than the packet length");
            }
            let packet = std::mem::take(&mut self.packet);
            self.assembling = false;
            let message = &packet[2..packet.len() - 2];
            let crc = u16::from_be_bytes([packet[packet.len() - 2], packet[packet.len() - 1]]);
            if crc16(message) != crc {
                return LineOutcome::Dropped("bad CRC");
            }
            LineOutcome::Message(message.to_vec())
        }

        fn reset(&mut self) {
            self.packet.clear();
            self.assembling = false;
        }
    }
}

/// The BLE transport's request reassembly, as Zephyr's `smp_reassembly`
/// does it (CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY): a central writes a
/// request in pieces of at most MTU − 3 bytes; the first piece's header
/// says how many bytes the whole takes. One reassembly per transport, as
/// in Zephyr: a piece that cannot belong drops what was collected.
pub mod ble {
    use super::HEADER_LEN;

    /// Why a write was refused (Zephyr answers ATT "Value Not Allowed";
    /// the partial request is gone).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ReassemblyError {
        /// A first piece shorter than the header (-ENODATA).
        NoHeader { len: usize },
        /// The message (or the piece) is larger than the net buffer (-ENOSR).
        TooLarge { expected: usize, net_buf: usize },
        /// The piece runs past the message's stated length (-EOVERFLOW).
        Overflow { len: usize, remaining: usize },
    }

    impl std::fmt::Display for ReassemblyError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Self::NoHeader { len } => write!(f, "a {len}-byte first write, shorter than the 8-byte header"),
                Self::TooLarge { expected, net_buf } => write!(f, "a {expected}-byte request, larger than the {net_buf}-byte net buffer"),
                Self::Overflow { len, remaining } => write!(f, "a {len}-byte write where {remaining} bytes were left of the request"),
            }
        }
    }

    /// Collects one request at a time; never holds more than the net buffer.
    #[derive(Debug, Clone)]
    pub struct Reassembly {
        net_buf: usize,
        buf: Vec<u8>,
        /// Bytes still to come; `None` between requests.
        remaining: Option<usize>,
    }

    impl Reassembly {
        pub fn new(net_buf: usize) -> Self {
            Reassembly { net_buf, buf: Vec::new(), remaining: None }
        }

        /// A request is partly collected.
        pub fn in_progress(&self) -> bool {
            self.remaining.is_some()
        }

        /// Drops a partial request (its central went).
        pub fn drop_partial(&mut self) {
            self.buf.clear();
            self.remaining = None;
        }

        /// One written value: `Ok(Some(message))` when it completes a
        /// request, `Ok(None)` while more is expected.
        pub fn push(&mut self, piece: &[u8]) -> Result<Option<Vec<u8>>, ReassemblyError> {
            let remaining = match self.remaining {
                Some(r) => r,
                None => {
                    if piece.len() < HEADER_LEN {
                        return Err(ReassemblyError::NoHeader { len: piece.len() });
                    }
                    let expected = HEADER_LEN + usize::from(u16::from_be_bytes([piece[2], piece[3]]));
                    if piece.len() > self.net_buf || expected > self.net_buf {
                        return Err(ReassemblyError::TooLarge { expected: expected.max(piece.len()), net_buf: self.net_buf });
                    }
                    expected
                }
            };
            if piece.len() > remaining {
                self.drop_partial();
                return Err(ReassemblyError::Overflow { len: piece.len(), remaining });
            }
            self.buf.extend_from_slice(piece);
            let left = remaining - piece.len();
            if left > 0 {
                self.remaining = Some(left);
                return Ok(None);
            }
            self.remaining = None;
            Ok(Some(std::mem::take(&mut self.buf)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_round_trip() {
        // A v2 write to image upload (group 1, command 1), seq 7, 300 payload bytes.
        let h = SmpHeader::new(SmpVersion::V2, SmpOp::Write, group::IMAGE, 1, 7, 300);
        let b = h.encode();
        assert_eq!(b, [0x0a, 0, 0x01, 0x2c, 0, 1, 7, 1]);
        assert_eq!(SmpHeader::parse(&b), Some(h));
        assert_eq!(h.response(2).unwrap().encode(), [0x0b, 0, 0, 2, 0, 1, 7, 1]);
        // A v1 read gets a v1 read response.
        let v1 = SmpHeader::parse(&[0x00, 0, 0, 0, 0, 0, 3, 6]).unwrap();
        assert_eq!(v1.response(0).unwrap().encode(), [0x01, 0, 0, 0, 0, 0, 3, 6]);
        assert_eq!(SmpHeader::parse(&[0x01, 0, 0, 0, 0, 0, 0, 0]).unwrap().response(0), None, "a response is not answered");
        assert_eq!(SmpHeader::parse(&[0u8; 7]), None);
        let reserved = SmpHeader::parse(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).unwrap();
        assert_eq!((reserved.reserved, reserved.version, reserved.op), (7, 3, 7));
        assert_eq!(reserved.encode(), [0xff; 8]);
        assert_eq!(reserved.smp_version(), None);
    }

    #[test]
    fn frames_need_the_stated_length() {
        let f = SmpFrame { header: SmpHeader::new(SmpVersion::V1, SmpOp::Read, 0, 0, 0, 0), payload: vec![0xa0] };
        let b = f.encode();
        assert_eq!(SmpFrame::parse(&b).unwrap().payload, vec![0xa0]);
        assert_eq!(SmpFrame::parse(&b[..8]), Err(FrameError::LengthMismatch { said: 1, got: 0 }));
        assert_eq!(SmpFrame::parse(&[1, 2]), Err(FrameError::Truncated(2)));
        assert_eq!(frame_len(&b[..8]), Some(9));
    }

    #[test]
    fn payloads_must_be_one_map() {
        // {"d": "hi"} definite, and the same indefinite (bf ... ff), as zcbor writes it.
        assert_eq!(decode_map(&[0xa1, 0x61, b'd', 0x62, b'h', b'i']).unwrap().len(), 1);
        let m = decode_map(&[0xbf, 0x61, b'd', 0x62, b'h', b'i', 0xff]).unwrap();
        assert_eq!(get(&m, "d"), Some(&Value::Text("hi".into())));
        assert_eq!(decode_map(&[]).unwrap(), vec![]);
        assert_eq!(decode_map(&[0x01]), Err(PayloadError::NotAMap));
        assert_eq!(decode_map(&[0xa0, 0x00]), Err(PayloadError::TrailingBytes(1)));
        assert!(matches!(decode_map(&[0xa1, 0x61]), Err(PayloadError::NotCbor(_))));
        // Deep nesting is refused, not recursed into.
        let deep: Vec<u8> = std::iter::repeat_n(0x81u8, 10_000).chain([0x00]).collect();
        assert!(decode_map(&deep).is_err());
    }

    #[test]
    fn error_payloads_in_both_versions() {
        assert_eq!(rc_payload(MgmtErr::NotSup), [0xbf, 0x62, b'r', b'c', 0x08, 0xff], "indefinite, as zcbor writes it");
        let v2 = decode_map(&group_error_payload(SmpVersion::V2, group::IMAGE, 9, MgmtErr::BadState)).unwrap();
        let err = match get(&v2, "err") {
            Some(Value::Map(m)) => m.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(get(&err, "group").and_then(as_u64), Some(1));
        assert_eq!(get(&err, "rc").and_then(as_u64), Some(9));
        assert_eq!(group_error_payload(SmpVersion::V1, group::IMAGE, 9, MgmtErr::BadState), rc_payload(MgmtErr::BadState));
    }

    #[test]
    fn serial_lines_round_trip_at_127_bytes() {
        // An echo request as smpclient frames it, and a 2 KiB message spanning lines.
        for message in [vec![0x02, 0, 0, 6, 0, 0, 1, 0, 0xa1, 0x61, b'd', 0x61, b'x'], (0..2048u32).map(|i| i as u8).collect()] {
            let lines = serial::encode(&message, serial::MAX_LINE);
            let mut rx = serial::Receiver::new();
            let mut got = None;
            let split: Vec<&[u8]> = lines.split_inclusive(|b| *b == b'\n').collect();
            for (i, line) in split.iter().enumerate() {
                assert!(line.len() <= serial::MAX_LINE, "line {i} is {} bytes", line.len());
                assert_eq!(&line[..2], if i == 0 { &serial::START } else { &serial::CONTINUATION });
                assert_eq!((line.len() - 3) % 4, 0, "line {i} splits a base64 group");
                match rx.push_line(line) {
                    serial::LineOutcome::Message(m) => got = Some(m),
                    serial::LineOutcome::Partial => {}
                    other => panic!("line {i}: {other:?}"),
                }
            }
            assert_eq!(got, Some(message));
        }
    }

    /// Zephyr's layout: short messages look like one base64 text, longer ones
    /// restart the 3-byte grouping on each line and keep the CRC on the last.
    #[test]
    fn zephyr_lines_keep_the_crc_whole_and_decode_line_by_line() {
        let echo = [0x02, 0, 0, 6, 0, 0, 1, 0, 0xa1, 0x61, b'd', 0x61, b'x'];
        assert_eq!(serial::encode_as_zephyr(&echo), serial::encode(&echo, serial::MAX_LINE));
        for n in [1usize, 2, 3, 88, 89, 90, 91, 92, 93, 94, 181, 182, 183, 184, 185, 300, 2044] {
            let message: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let text = serial::encode_as_zephyr(&message);
            let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
            let mut rx = serial::Receiver::new();
            for (i, line) in lines.iter().enumerate() {
                assert!(line.len() <= serial::MAX_LINE, "{n}: line {i} is {} bytes", line.len());
                assert_eq!((line.len() - 3) % 4, 0, "{n}: line {i} splits a base64 group");
                let pad = line.iter().position(|b| *b == b'=');
                assert!(pad.is_none() || (i == lines.len() - 1 && pad >= Some(line.len() - 3)), "{n}: padding inside line {i}");
                let outcome = rx.push_line(line);
                if i + 1 < lines.len() {
                    assert_eq!(outcome, serial::LineOutcome::Partial, "{n}: line {i}");
                } else {
                    assert_eq!(outcome, serial::LineOutcome::Message(message.clone()), "{n}: last line");
                }
            }
            // The CRC's two bytes are on the last line.
            let last = lines[lines.len() - 1];
            use base64::Engine as _;
            let raw = base64::engine::general_purpose::STANDARD.decode(&last[2..last.len() - 1]).unwrap();
            assert!(raw.len() >= 2, "{n}: the last line has no whole CRC");
        }
        // 90 bytes: one whole-text base64 would put the CRC's first byte on the
        // first line; Zephyr holds two message bytes back so the CRC stays whole.
        let m = vec![0u8; 90];
        let lines = serial::encode_as_zephyr(&m);
        assert_eq!(lines.split_inclusive(|b| *b == b'\n').map(<[u8]>::len).collect::<Vec<_>>(), vec![123, 11]);
        assert_ne!(lines, serial::encode(&m, serial::MAX_LINE));
    }

    #[test]
    fn a_packet_past_the_net_buffer_is_dropped() {
        let mut rx = serial::Receiver::with_limits(serial::MAX_RX_LINE, 384);
        let fits = vec![1u8; 380];
        assert_eq!(serial::encode_as_zephyr(&fits).split_inclusive(|b| *b == b'\n').map(|l| rx.push_line(l)).last(), Some(serial::LineOutcome::Message(fits)));
        let over = vec![1u8; 381];
        let outcomes: Vec<_> = serial::encode_as_zephyr(&over).split_inclusive(|b| *b == b'\n').map(|l| rx.push_line(l)).collect();
        assert!(outcomes.contains(&serial::LineOutcome::Dropped("packet larger than the net buffer")), "{outcomes:?}");
        // A 128-byte line fits Zephyr's receive buffer; 129 does not.
        let mut rx = serial::Receiver::new();
        // (Its packet says 2 bytes and brings 91: decoded, then refused for that.)
        let mut line = b"\x06\x09AAIA".to_vec();
        line.extend(std::iter::repeat_n(b'A', 120));
        line.extend(b"\r\n");
        assert_eq!(rx.push_line(&line), serial::LineOutcome::Dropped("more bytes than the packet length"));
        line.insert(2, b'A');
        assert_eq!(rx.push_line(&line), serial::LineOutcome::Dropped("line longer than the receive buffer"));
    }

    #[test]
    fn serial_receiver_drops_what_firmware_drops() {
        let mut rx = serial::Receiver::new();
        assert_eq!(rx.push_line(b"uart:~$ help\n"), serial::LineOutcome::Text);
        assert!(matches!(rx.push_line(&[0x04, 0x14, b'A', b'A', b'A', b'A', b'\n']), serial::LineOutcome::Dropped(_)));
        let mut long = vec![0x06, 0x09];
        long.extend(std::iter::repeat_n(b'A', 128));
        assert!(matches!(rx.push_line(&long), serial::LineOutcome::Dropped(_)));
        assert!(matches!(rx.push_line(b"\x06\x09!!!!\n"), serial::LineOutcome::Dropped(_)));
        // A flipped bit in the message fails the CRC.
        // (Character 5 of the base64 is in message bytes 1..3; the length stays.)
        let mut lines = serial::encode(&[0u8; 8], serial::MAX_LINE);
        lines[7] = if lines[7] == b'B' { b'C' } else { b'B' };
        assert_eq!(rx.push_line(&lines), serial::LineOutcome::Dropped("bad CRC"));
        // CRC-16/XMODEM check value.
        assert_eq!(serial::crc16(b"123456789"), 0x31c3);
    }

    /// Seeded random inputs through the fuzz harness (no nightly here):
    /// half are headers with a matching length over random CBOR-ish bytes,
    /// so decoding gets past the header.
    #[test]
    fn seeded_random_inputs_keep_the_invariants() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5350_0001);
        let mut reached = 0;
        for i in 0..4000 {
            let n = rng.gen_range(0..300);
            let mut data: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if i % 2 == 0 {
                let payload: Vec<u8> = if rng.gen_bool(0.5) {
                    // A small map of text keys to small values, sometimes cut short.
                    let mut p = vec![0xa0 | rng.gen_range(0..4u8)];
                    for _ in 0..(p[0] & 0x0f) {
                        p.extend([0x61, rng.gen_range(b'a'..=b'z'), rng.gen_range(0..0x40u8)]);
                    }
                    p.truncate(rng.gen_range(0..=p.len()));
                    p
                } else {
                    data.clone()
                };
                let h = SmpHeader::new(SmpVersion::V2, SmpOp::Write, rng.gen_range(0..12), rng.gen(), rng.gen(), payload.len() as u16);
                data = h.encode().to_vec();
                data.extend(payload);
            }
            reached += usize::from(crate::fuzzing::smp_frames_round_trip(&data));
        }
        assert!(reached > 300, "only {reached} inputs got past decoding");
    }

    #[test]
    fn ble_writes_reassemble_by_the_header_length() {
        use ble::{Reassembly, ReassemblyError};
        let body = encode_map(vec![("d", Value::Text("x".repeat(40)))]);
        let mut msg = SmpHeader::new(SmpVersion::V2, SmpOp::Write, group::OS, 0, 1, body.len() as u16).encode().to_vec();
        msg.extend(&body);
        let mut r = Reassembly::new(384);
        // MTU 23: 20-byte writes.
        let mut got = None;
        for piece in msg.chunks(20) {
            assert!(got.is_none(), "complete before the last piece");
            got = r.push(piece).unwrap();
        }
        assert_eq!(got.as_deref(), Some(&msg[..]));
        assert!(!r.in_progress());
        // A piece past the stated length drops what was collected.
        assert_eq!(r.push(&msg[..20]), Ok(None));
        let mut long = msg[20..].to_vec();
        long.push(0);
        assert_eq!(r.push(&long), Err(ReassemblyError::Overflow { len: long.len(), remaining: msg.len() - 20 }));
        assert!(!r.in_progress());
        assert_eq!(r.push(&msg[..5]), Err(ReassemblyError::NoHeader { len: 5 }));
        // Larger than the net buffer: refused at its first piece.
        let mut small = Reassembly::new(40);
        assert_eq!(small.push(&msg[..20]), Err(ReassemblyError::TooLarge { expected: msg.len(), net_buf: 40 }));
        // A header alone with length 0 is a whole message.
        let empty = SmpHeader::new(SmpVersion::V2, SmpOp::Read, group::OS, 6, 2, 0).encode();
        assert_eq!(r.push(&empty), Ok(Some(empty.to_vec())));
    }
}
