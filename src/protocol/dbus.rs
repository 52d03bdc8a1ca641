//! The D-Bus wire format as a message bus broker needs it (sans-IO): the
//! SASL handshake, message framing, the header fields, the sender stamp a
//! bus puts on every message, match rules, and the few message bodies a
//! bus writes itself. Bodies pass through untouched; only their leading
//! basic-typed arguments are read, for `argN` match rules.
//!
//! Reference: the D-Bus specification, "Message Protocol", "Authentication
//! Protocol" and "Message Bus Specification" (match rules).

use std::fmt;

/// Message types (header byte 1).
pub const METHOD_CALL: u8 = 1;
pub const METHOD_RETURN: u8 = 2;
pub const ERROR: u8 = 3;
pub const SIGNAL: u8 = 4;

/// Header flags.
pub const NO_REPLY_EXPECTED: u8 = 0x1;

/// The specification's limits.
pub const MAX_MESSAGE: usize = 128 * 1024 * 1024;
const MAX_FIELDS: usize = 64 * 1024 * 1024;
const FIXED_HEADER: usize = 16;

/// Why bytes are not a D-Bus message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

fn err<T>(m: impl Into<String>) -> Result<T, WireError> {
    Err(WireError(m.into()))
}

fn pad(n: usize, align: usize) -> usize {
    (align - n % align) % align
}

fn read_u32(b: &[u8], at: usize, little: bool) -> Option<u32> {
    let s: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if little { u32::from_le_bytes(s) } else { u32::from_be_bytes(s) })
}

/// How many bytes the message starting at `buf` takes, once its fixed
/// header is there (`None`: need more bytes to tell).
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < FIXED_HEADER {
        return Ok(None);
    }
    let little = match buf[0] {
        b'l' => true,
        b'B' => false,
        e => return err(format!("endianness byte 0x{e:02x} is neither 'l' nor 'B'")),
    };
    if buf[3] != 1 {
        return err(format!("protocol version {} (only 1 exists)", buf[3]));
    }
    let body = read_u32(buf, 4, little).unwrap_or(0) as usize;
    let fields = read_u32(buf, 12, little).unwrap_or(0) as usize;
    if fields > MAX_FIELDS {
        return err(format!("header fields of {fields} bytes (limit {MAX_FIELDS})"));
    }
    let header = FIXED_HEADER + fields;
    let total = header + pad(header, 8) + body;
    if total > MAX_MESSAGE {
        return err(format!("a message of {total} bytes (limit {MAX_MESSAGE})"));
    }
    Ok(Some(total))
}

/// A message's header, as read from its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    pub little_endian: bool,
    pub kind: u8,
    pub flags: u8,
    pub serial: u32,
    pub path: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
    pub error_name: Option<String>,
    pub reply_serial: Option<u32>,
    pub destination: Option<String>,
    pub sender: Option<String>,
    pub signature: String,
    pub unix_fds: u32,
    /// Where the body starts in the message.
    pub body_offset: usize,
}

impl Header {
    pub fn expects_reply(&self) -> bool {
        self.kind == METHOD_CALL && self.flags & NO_REPLY_EXPECTED == 0
    }
}

/// A cursor over a message's bytes with D-Bus alignment (relative to the
/// message start).
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    little: bool,
}

impl<'a> Reader<'a> {
    fn align(&mut self, n: usize) -> Result<(), WireError> {
        let to = self.at + pad(self.at, n);
        if to > self.b.len() {
            return err("truncated (alignment padding)");
        }
        self.at = to;
        Ok(())
    }
    fn byte(&mut self) -> Result<u8, WireError> {
        let v = *self.b.get(self.at).ok_or_else(|| WireError("truncated (byte)".into()))?;
        self.at += 1;
        Ok(v)
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.align(4)?;
        let v = read_u32(self.b, self.at, self.little).ok_or_else(|| WireError("truncated (uint32)".into()))?;
        self.at += 4;
        Ok(v)
    }
    fn skip(&mut self, n: usize) -> Result<(), WireError> {
        let to = self.at.checked_add(n).filter(|t| *t <= self.b.len()).ok_or_else(|| WireError("truncated".into()))?;
        self.at = to;
        Ok(())
    }
    /// `s` or `o`: u32 length, bytes, NUL.
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        let bytes = self.b.get(self.at..self.at.saturating_add(n)).ok_or_else(|| WireError("truncated (string)".into()))?;
        let s = std::str::from_utf8(bytes).map_err(|_| WireError("a string is not UTF-8".into()))?.to_string();
        self.skip(n)?;
        if self.byte()? != 0 {
            return err("a string is not NUL-terminated");
        }
        Ok(s)
    }
    /// `g`: u8 length, bytes, NUL.
    fn signature(&mut self) -> Result<String, WireError> {
        let n = self.byte()? as usize;
        let bytes = self.b.get(self.at..self.at + n).ok_or_else(|| WireError("truncated (signature)".into()))?;
        let s = std::str::from_utf8(bytes).map_err(|_| WireError("a signature is not ASCII".into()))?.to_string();
        self.skip(n)?;
        if self.byte()? != 0 {
            return err("a signature is not NUL-terminated");
        }
        Ok(s)
    }
    /// Skips one value of a basic type; containers are refused.
    fn skip_basic(&mut self, t: u8) -> Result<(), WireError> {
        match t {
            b'y' => self.skip(1),
            b'n' | b'q' => {
                self.align(2)?;
                self.skip(2)
            }
            b'b' | b'i' | b'u' | b'h' => {
                self.align(4)?;
                self.skip(4)
            }
            b'x' | b't' | b'd' => {
                self.align(8)?;
                self.skip(8)
            }
            b's' | b'o' => self.string().map(drop),
            b'g' => self.signature().map(drop),
            other => err(format!("header field of type `{}`", other as char)),
        }
    }
}

/// Reads a whole message's header. `msg` must be exactly one message (see
/// [`frame_len`]).
pub fn parse_header(msg: &[u8]) -> Result<Header, WireError> {
    let total = frame_len(msg)?.ok_or_else(|| WireError("shorter than the fixed header".into()))?;
    if total != msg.len() {
        return err(format!("message is {} bytes, its header says {total}", msg.len()));
    }
    let little = msg[0] == b'l';
    let mut h = Header {
        little_endian: little,
        kind: msg[1],
        flags: msg[2],
        serial: read_u32(msg, 8, little).unwrap_or(0),
        ..Default::default()
    };
    if !(METHOD_CALL..=SIGNAL).contains(&h.kind) {
        return err(format!("message type {}", h.kind));
    }
    if h.serial == 0 {
        return err("serial 0");
    }
    let fields_len = read_u32(msg, 12, little).unwrap_or(0) as usize;
    let end = FIXED_HEADER + fields_len;
    let mut r = Reader { b: msg.get(..end).ok_or_else(|| WireError("truncated header fields".into()))?, at: FIXED_HEADER, little };
    while r.at < end {
        r.align(8)?;
        if r.at >= end {
            break;
        }
        let code = r.byte()?;
        let sig = r.signature()?;
        let one = |want: &str| -> Result<(), WireError> {
            if sig == want {
                Ok(())
            } else {
                err(format!("header field {code} has signature `{sig}`, not `{want}`"))
            }
        };
        match code {
            1 => {
                one("o")?;
                h.path = Some(r.string()?);
            }
            2 => {
                one("s")?;
                h.interface = Some(r.string()?);
            }
            3 => {
                one("s")?;
                h.member = Some(r.string()?);
            }
            4 => {
                one("s")?;
                h.error_name = Some(r.string()?);
            }
            5 => {
                one("u")?;
                h.reply_serial = Some(r.u32()?);
            }
            6 => {
                one("s")?;
                h.destination = Some(r.string()?);
            }
            7 => {
                one("s")?;
                h.sender = Some(r.string()?);
            }
            8 => {
                one("g")?;
                h.signature = r.signature()?;
            }
            9 => {
                one("u")?;
                h.unix_fds = r.u32()?;
            }
            _ => {
                // Unknown fields are ignored, as the specification asks.
                let [t] = sig.as_bytes() else { return err(format!("header field {code} of container type `{sig}`")) };
                r.skip_basic(*t)?;
            }
        }
    }
    if r.at != end {
        return err("header fields overrun their array");
    }
    h.body_offset = end + pad(end, 8);
    let required: &[(&str, bool)] = match h.kind {
        METHOD_CALL => &[("PATH", h.path.is_some()), ("MEMBER", h.member.is_some())],
        METHOD_RETURN => &[("REPLY_SERIAL", h.reply_serial.is_some())],
        ERROR => &[("ERROR_NAME", h.error_name.is_some()), ("REPLY_SERIAL", h.reply_serial.is_some())],
        _ => &[("PATH", h.path.is_some()), ("INTERFACE", h.interface.is_some()), ("MEMBER", h.member.is_some())],
    };
    if let Some((name, _)) = required.iter().find(|(_, present)| !present) {
        return err(format!("a type {} message without the {name} header field", h.kind));
    }
    Ok(h)
}

/// The values of the body's leading basic-typed arguments (strings, object
/// paths and signatures as text; numbers as `None`), stopping at the first
/// container: what `argN` match rules look at.
pub fn leading_string_args(msg: &[u8], h: &Header) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let mut r = Reader { b: msg, at: h.body_offset, little: h.little_endian };
    for t in h.signature.bytes() {
        let v = match t {
            b's' | b'o' => r.string().map(Some),
            b'g' => r.signature().map(Some),
            b'y' | b'n' | b'q' | b'b' | b'i' | b'u' | b'h' | b'x' | b't' | b'd' => r.skip_basic(t).map(|_| None),
            _ => break,
        };
        match v {
            Ok(v) => out.push(v),
            Err(_) => break,
        }
        if out.len() >= 64 {
            break;
        }
    }
    out
}

/// The header fields of `h` serialized, with SENDER set to `sender`.
fn write_fields(out: &mut Vec<u8>, h: &Header, sender: &str) {
    let mut w = Writer { b: out, little: h.little_endian };
    let start = w.b.len();
    w.u32(0); // array length, patched below
    let fields_start = w.b.len();
    let field = |w: &mut Writer<'_>, code: u8, sig: &str, v: FieldValue<'_>| {
        w.align(8);
        w.b.push(code);
        w.signature(sig);
        match v {
            FieldValue::Str(s) => w.string(s),
            FieldValue::Sig(s) => w.signature(s),
            FieldValue::U32(n) => w.u32(n),
        }
    };
    if let Some(v) = &h.path {
        field(&mut w, 1, "o", FieldValue::Str(v));
    }
    if let Some(v) = &h.interface {
        field(&mut w, 2, "s", FieldValue::Str(v));
    }
    if let Some(v) = &h.member {
        field(&mut w, 3, "s", FieldValue::Str(v));
    }
    if let Some(v) = &h.error_name {
        field(&mut w, 4, "s", FieldValue::Str(v));
    }
    if let Some(v) = h.reply_serial {
        field(&mut w, 5, "u", FieldValue::U32(v));
    }
    if let Some(v) = &h.destination {
        field(&mut w, 6, "s", FieldValue::Str(v));
    }
    field(&mut w, 7, "s", FieldValue::Str(sender));
    if !h.signature.is_empty() {
        field(&mut w, 8, "g", FieldValue::Sig(&h.signature));
    }
    if h.unix_fds > 0 {
        field(&mut w, 9, "u", FieldValue::U32(h.unix_fds));
    }
    let len = (w.b.len() - fields_start) as u32;
    let bytes = if h.little_endian { len.to_le_bytes() } else { len.to_be_bytes() };
    w.b[start..start + 4].copy_from_slice(&bytes);
    w.align(8);
}

enum FieldValue<'a> {
    Str(&'a str),
    Sig(&'a str),
    U32(u32),
}

/// `msg` with its SENDER header field set to `sender`, as a bus stamps
/// every message it passes on (whatever the client put there). Unknown
/// header fields are dropped; the body is copied as is.
pub fn with_sender(msg: &[u8], h: &Header, sender: &str) -> Result<Vec<u8>, WireError> {
    let body = msg.get(h.body_offset..).ok_or_else(|| WireError("body offset beyond the message".into()))?;
    let mut out = Vec::with_capacity(msg.len() + sender.len() + 16);
    out.extend_from_slice(msg.get(..12).ok_or_else(|| WireError("truncated".into()))?);
    write_fields(&mut out, h, sender);
    out.extend_from_slice(body);
    Ok(out)
}

/// Appends D-Bus-aligned values (alignment relative to the buffer start,
/// which is the message start).
struct Writer<'a> {
    b: &'a mut Vec<u8>,
    little: bool,
}

impl Writer<'_> {
    fn align(&mut self, n: usize) {
        let p = pad(self.b.len(), n);
        self.b.resize(self.b.len() + p, 0);
    }
    fn u32(&mut self, v: u32) {
        self.align(4);
        self.b.extend_from_slice(&if self.little { v.to_le_bytes() } else { v.to_be_bytes() });
    }
    fn string(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.b.extend_from_slice(s.as_bytes());
        self.b.push(0);
    }
    fn signature(&mut self, s: &str) {
        self.b.push(s.len().min(255) as u8);
        self.b.extend_from_slice(s.as_bytes().get(..s.len().min(255)).unwrap_or_default());
        self.b.push(0);
    }
}

/// A value in a body the bus writes itself.
#[derive(Debug, Clone, PartialEq)]
pub enum BusValue {
    Str(String),
    Bool(bool),
    U32(u32),
    StrArray(Vec<String>),
    /// `a{sv}` whose values are all `u`.
    U32Dict(Vec<(String, u32)>),
}

impl BusValue {
    fn signature(&self) -> &'static str {
        match self {
            BusValue::Str(_) => "s",
            BusValue::Bool(_) => "b",
            BusValue::U32(_) => "u",
            BusValue::StrArray(_) => "as",
            BusValue::U32Dict(_) => "a{sv}",
        }
    }
    fn write(&self, w: &mut Writer<'_>) {
        match self {
            BusValue::Str(s) => w.string(s),
            BusValue::Bool(b) => w.u32(u32::from(*b)),
            BusValue::U32(n) => w.u32(*n),
            BusValue::StrArray(v) => {
                w.u32(0);
                let len_at = w.b.len() - 4;
                let start = w.b.len();
                for s in v {
                    w.string(s);
                }
                let n = (w.b.len() - start) as u32;
                w.b[len_at..len_at + 4].copy_from_slice(&n.to_le_bytes());
            }
            BusValue::U32Dict(v) => {
                w.u32(0);
                let len_at = w.b.len() - 4;
                w.align(8);
                let start = w.b.len();
                for (k, n) in v {
                    w.align(8);
                    w.string(k);
                    w.signature("u");
                    w.u32(*n);
                }
                let n = (w.b.len() - start) as u32;
                w.b[len_at..len_at + 4].copy_from_slice(&n.to_le_bytes());
            }
        }
    }
}

/// A message the bus itself sends (little-endian; sender `org.freedesktop.DBus`).
#[derive(Debug, Clone, Default)]
pub struct BusMessage {
    pub kind: u8,
    pub serial: u32,
    pub reply_serial: Option<u32>,
    pub destination: Option<String>,
    pub path: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
    pub error_name: Option<String>,
    pub body: Vec<BusValue>,
}

/// The bus's own name.
pub const BUS_NAME: &str = "org.freedesktop.DBus";

impl BusMessage {
    pub fn method_return(serial: u32, to: &Header, body: Vec<BusValue>) -> Self {
        BusMessage { kind: METHOD_RETURN, serial, reply_serial: Some(to.serial), destination: to.sender.clone(), body, ..Default::default() }
    }
    pub fn error(serial: u32, to: &Header, name: &str, text: &str) -> Self {
        BusMessage {
            kind: ERROR,
            serial,
            reply_serial: Some(to.serial),
            destination: to.sender.clone(),
            error_name: Some(name.to_string()),
            body: vec![BusValue::Str(text.to_string())],
            ..Default::default()
        }
    }
    pub fn signal(serial: u32, member: &str, destination: Option<&str>, body: Vec<BusValue>) -> Self {
        BusMessage {
            kind: SIGNAL,
            serial,
            destination: destination.map(str::to_string),
            path: Some("/org/freedesktop/DBus".into()),
            interface: Some(BUS_NAME.into()),
            member: Some(member.into()),
            body,
            ..Default::default()
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![b'l', self.kind, if self.kind == METHOD_CALL { 0 } else { NO_REPLY_EXPECTED }, 1, 0, 0, 0, 0];
        out.extend_from_slice(&self.serial.max(1).to_le_bytes());
        let signature: String = self.body.iter().map(BusValue::signature).collect();
        let h = Header {
            little_endian: true,
            kind: self.kind,
            serial: self.serial,
            path: self.path.clone(),
            interface: self.interface.clone(),
            member: self.member.clone(),
            error_name: self.error_name.clone(),
            reply_serial: self.reply_serial,
            destination: self.destination.clone(),
            signature,
            ..Default::default()
        };
        write_fields(&mut out, &h, BUS_NAME);
        let body_start = out.len();
        {
            let mut w = Writer { b: &mut out, little: true };
            for v in &self.body {
                v.write(&mut w);
            }
        }
        let body_len = (out.len() - body_start) as u32;
        out[4..8].copy_from_slice(&body_len.to_le_bytes());
        out
    }
}

/// Reads the arguments of a call to the bus: strings and `u` numbers.
pub fn bus_call_args(msg: &[u8], h: &Header) -> Result<Vec<BusValue>, WireError> {
    let mut r = Reader { b: msg, at: h.body_offset, little: h.little_endian };
    let mut out = Vec::new();
    for t in h.signature.bytes() {
        out.push(match t {
            b's' | b'o' => BusValue::Str(r.string()?),
            b'u' => BusValue::U32(r.u32()?),
            other => return err(format!("argument of type `{}`", other as char)),
        });
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------
// Match rules
// ------------------------------------------------------------------------------------

/// Names as the D-Bus specification's "Valid Names" has them (at most 255
/// bytes; elements of ASCII letters, digits and `_`, not starting with a
/// digit; bus names also allow `-`, and unique names digits first).
pub mod names {
    const MAX: usize = 255;

    fn elements(n: &str, min: usize, hyphen: bool, digit_first: bool) -> bool {
        let ok = |e: &str| {
            !e.is_empty()
                && e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || (hyphen && b == b'-'))
                && (digit_first || !e.as_bytes()[0].is_ascii_digit())
        };
        n.len() <= MAX && n.split('.').count() >= min && n.split('.').all(ok)
    }

    /// A unique (`:1.42`) or well-known (`org.bluez`) bus name.
    pub fn is_bus_name(n: &str) -> bool {
        match n.strip_prefix(':') {
            Some(unique) => n.len() <= MAX && elements(unique, 2, true, true),
            None => elements(n, 2, true, false),
        }
    }

    pub fn is_interface(n: &str) -> bool {
        elements(n, 2, false, false)
    }

    pub fn is_member(n: &str) -> bool {
        !n.contains('.') && elements(n, 1, false, false)
    }

    /// A namespace of bus or interface names (`arg0namespace`): one element is enough.
    pub fn is_namespace(n: &str) -> bool {
        elements(n, 1, true, false)
    }

    pub fn is_object_path(p: &str) -> bool {
        p == "/"
            || (p.starts_with('/')
                && !p.ends_with('/')
                && p[1..].split('/').all(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')))
    }
}

/// One `AddMatch` rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MatchRule {
    pub kind: Option<u8>,
    pub sender: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
    pub path: Option<String>,
    pub path_namespace: Option<String>,
    pub destination: Option<String>,
    pub args: Vec<(u8, String)>,
    pub arg_paths: Vec<(u8, String)>,
    pub arg0_namespace: Option<String>,
}

/// `value` when `ok` says it is well formed, else what it should have been.
fn valid(key: &str, value: String, ok: fn(&str) -> bool, what: &str) -> Result<String, WireError> {
    if ok(&value) {
        Ok(value)
    } else {
        err(format!("match rule `{key}='{value}'` is not {what}"))
    }
}

impl MatchRule {
    /// Parses `type='signal',interface='…',arg0path='/org/bluez/'`.
    pub fn parse(text: &str) -> Result<MatchRule, WireError> {
        let mut rule = MatchRule::default();
        let mut seen: Vec<String> = Vec::new();
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            while i < b.len() && (b[i] == b',' || b[i] == b' ') {
                i += 1;
            }
            if i >= b.len() {
                break;
            }
            let key_start = i;
            while i < b.len() && b[i] != b'=' {
                i += 1;
            }
            let key = text.get(key_start..i).unwrap_or_default().trim();
            if i >= b.len() {
                return err(format!("match rule key `{key}` has no value"));
            }
            i += 1; // '='
            // A value: quoted parts and unquoted characters up to a comma; \' is a quote outside quotes.
            let mut value = String::new();
            loop {
                match b.get(i) {
                    None | Some(b',') => break,
                    Some(b'\'') => {
                        i += 1;
                        let start = i;
                        while i < b.len() && b[i] != b'\'' {
                            i += 1;
                        }
                        if i >= b.len() {
                            return err(format!("match rule value of `{key}` has no closing quote"));
                        }
                        value.push_str(text.get(start..i).unwrap_or_default());
                        i += 1;
                    }
                    Some(b'\\') if b.get(i + 1) == Some(&b'\'') => {
                        value.push('\'');
                        i += 2;
                    }
                    Some(_) => {
                        let start = i;
                        while i < b.len() && b[i] != b',' && b[i] != b'\'' && !(b[i] == b'\\' && b.get(i + 1) == Some(&b'\'')) {
                            i += 1;
                        }
                        value.push_str(text.get(start..i).unwrap_or_default());
                    }
                }
            }
            if seen.iter().any(|k| k == key) {
                return err(format!("key `{key}` specified twice in match rule"));
            }
            seen.push(key.to_string());
            rule.set(key, value)?;
        }
        Ok(rule)
    }

    fn set(&mut self, key: &str, value: String) -> Result<(), WireError> {
        match key {
            "type" => {
                self.kind = Some(match value.as_str() {
                    "method_call" => METHOD_CALL,
                    "method_return" => METHOD_RETURN,
                    "error" => ERROR,
                    "signal" => SIGNAL,
                    other => return err(format!("match rule type `{other}`")),
                })
            }
            "sender" => self.sender = Some(valid(key, value, names::is_bus_name, "a bus name")?),
            "interface" => self.interface = Some(valid(key, value, names::is_interface, "an interface name")?),
            "member" => self.member = Some(valid(key, value, names::is_member, "a member name")?),
            "path" => self.path = Some(valid(key, value, names::is_object_path, "an object path")?),
            "path_namespace" => self.path_namespace = Some(valid(key, value, names::is_object_path, "an object path")?),
            "destination" => self.destination = Some(valid(key, value, names::is_bus_name, "a bus name")?),
            "arg0namespace" => self.arg0_namespace = Some(valid(key, value, names::is_namespace, "a name namespace")?),
            "eavesdrop" => {}
            k if k.starts_with("arg") => {
                let rest = &k[3..];
                let (digits, is_path) = match rest.strip_suffix("path") {
                    Some(d) => (d, true),
                    None => (rest, false),
                };
                let n: u8 = digits.parse().ok().filter(|n| *n < 64).ok_or_else(|| WireError(format!("match rule key `{k}`")))?;
                if is_path {
                    self.arg_paths.push((n, value));
                } else {
                    self.args.push((n, value));
                }
            }
            other => return err(format!("match rule key `{other}`")),
        }
        if self.path.is_some() && self.path_namespace.is_some() {
            return err("match rule has both path and path_namespace");
        }
        Ok(())
    }

    /// Whether the message matches. `sender_is` says whether a rule's
    /// `sender` (a unique or well-known name) is the message's sender.
    pub fn matches(&self, h: &Header, args: &[Option<String>], sender_is: impl Fn(&str) -> bool) -> bool {
        if self.kind.is_some_and(|k| k != h.kind) {
            return false;
        }
        if let Some(s) = &self.sender {
            if !sender_is(s) {
                return false;
            }
        }
        let eq = |rule: &Option<String>, v: &Option<String>| rule.as_ref().is_none_or(|r| v.as_deref() == Some(r.as_str()));
        if !eq(&self.interface, &h.interface) || !eq(&self.member, &h.member) || !eq(&self.path, &h.path) || !eq(&self.destination, &h.destination) {
            return false;
        }
        if let Some(ns) = &self.path_namespace {
            let Some(p) = &h.path else { return false };
            let inside = ns == "/" || p == ns || p.strip_prefix(ns.as_str()).is_some_and(|rest| rest.starts_with('/'));
            if !inside {
                return false;
            }
        }
        let arg = |n: u8| args.get(usize::from(n)).and_then(|a| a.as_deref());
        for (n, want) in &self.args {
            if arg(*n) != Some(want.as_str()) {
                return false;
            }
        }
        for (n, want) in &self.arg_paths {
            let Some(a) = arg(*n) else { return false };
            let ok = a == want || (want.ends_with('/') && a.starts_with(want.as_str())) || (a.ends_with('/') && want.starts_with(a));
            if !ok {
                return false;
            }
        }
        if let Some(ns) = &self.arg0_namespace {
            let Some(a) = arg(0) else { return false };
            if !(a == ns || a.strip_prefix(ns.as_str()).is_some_and(|r| r.starts_with('.'))) {
                return false;
            }
        }
        true
    }
}

// ------------------------------------------------------------------------------------
// Authentication
// ------------------------------------------------------------------------------------

/// The server side of the SASL handshake (EXTERNAL, the socket's peer
/// credentials being the proof; ANONYMOUS also accepted).
#[derive(Debug, Default)]
pub struct SaslServer {
    buf: Vec<u8>,
    saw_nul: bool,
    /// AUTH EXTERNAL without an initial response: DATA comes next.
    awaiting_data: bool,
    authed: bool,
    pub unix_fds: bool,
    /// The socket peer's uid (SO_PEERCRED): EXTERNAL must claim this one,
    /// as dbus-daemon checks. None accepts any claim (no credentials known).
    peer_uid: Option<u32>,
}

/// What the handshake wants next.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslStep {
    /// Send these lines (may be empty) and read more.
    Reply(Vec<u8>),
    /// BEGIN: send `reply`, then the rest of the input is messages.
    Begin { reply: Vec<u8>, rest: Vec<u8> },
}

/// The uid an EXTERNAL response claims: hex of its decimal digits
/// (`31303030` is uid 1000). None when it is not that.
fn claimed_uid(hex: &str) -> Option<u32> {
    if hex.len() % 2 != 0 || hex.len() > 20 {
        return None;
    }
    let digits: Option<String> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok().map(char::from)).collect();
    let digits = digits?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl SaslServer {
    /// A handshake with a peer whose uid the socket reports.
    pub fn for_peer(uid: Option<u32>) -> Self {
        SaslServer { peer_uid: uid, ..Default::default() }
    }

    /// Whether an EXTERNAL response (`None`: empty, meaning "my socket
    /// credentials") names the peer.
    fn external_ok(&self, response: Option<&str>) -> bool {
        match (response.filter(|r| !r.is_empty()), self.peer_uid) {
            (None, _) => true,
            (Some(r), None) => claimed_uid(r).is_some(),
            (Some(r), Some(uid)) => claimed_uid(r) == Some(uid),
        }
    }

    /// Feeds bytes from the client; `guid` is the bus's id.
    pub fn feed(&mut self, input: &[u8], guid: &str) -> Result<SaslStep, WireError> {
        self.buf.extend_from_slice(input);
        if self.buf.len() > 16 * 1024 {
            return err("authentication lines longer than 16 KiB");
        }
        let mut reply = Vec::new();
        if !self.saw_nul {
            match self.buf.first() {
                None => return Ok(SaslStep::Reply(reply)),
                Some(0) => {
                    self.buf.remove(0);
                    self.saw_nul = true;
                }
                Some(b) => return err(format!("the first byte is 0x{b:02x}, not NUL")),
            }
        }
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = self.buf.drain(..end + 2).collect();
            let line = String::from_utf8_lossy(&line[..end]).to_string();
            let mut words = line.split(' ');
            match (words.next().unwrap_or(""), words.next(), words.next()) {
                ("AUTH", Some("EXTERNAL"), Some(claim)) if !self.external_ok(Some(claim)) => {
                    self.authed = false;
                    reply.extend_from_slice(b"REJECTED EXTERNAL ANONYMOUS\r\n");
                }
                ("AUTH", Some("EXTERNAL"), Some(_)) | ("AUTH", Some("ANONYMOUS"), _) => {
                    self.authed = true;
                    reply.extend_from_slice(format!("OK {guid}\r\n").as_bytes());
                }
                ("AUTH", Some("EXTERNAL"), None) => {
                    self.awaiting_data = true;
                    reply.extend_from_slice(b"DATA\r\n");
                }
                ("DATA", claim, _) if self.awaiting_data => {
                    self.awaiting_data = false;
                    if self.external_ok(claim) {
                        self.authed = true;
                        reply.extend_from_slice(format!("OK {guid}\r\n").as_bytes());
                    } else {
                        reply.extend_from_slice(b"REJECTED EXTERNAL ANONYMOUS\r\n");
                    }
                }
                ("AUTH", _, _) | ("CANCEL", _, _) | ("ERROR", _, _) => {
                    self.authed = false;
                    self.awaiting_data = false;
                    reply.extend_from_slice(b"REJECTED EXTERNAL ANONYMOUS\r\n");
                }
                ("NEGOTIATE_UNIX_FD", None, None) if self.authed => {
                    self.unix_fds = true;
                    reply.extend_from_slice(b"AGREE_UNIX_FD\r\n");
                }
                ("BEGIN", None, None) if self.authed => {
                    return Ok(SaslStep::Begin { reply, rest: std::mem::take(&mut self.buf) });
                }
                _ => reply.extend_from_slice(b"ERROR \"unexpected command\"\r\n"),
            }
        }
        Ok(SaslStep::Reply(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(dest: &str, path: &str, iface: &str, member: &str, arg: &str) -> Vec<u8> {
        // Built by the bus's own encoder, then re-typed as a call.
        let m = BusMessage {
            kind: METHOD_CALL,
            serial: 7,
            destination: Some(dest.into()),
            path: Some(path.into()),
            interface: Some(iface.into()),
            member: Some(member.into()),
            body: vec![BusValue::Str(arg.into()), BusValue::U32(4)],
            ..Default::default()
        };
        m.encode()
    }

    #[test]
    fn a_message_reads_back_and_takes_a_new_sender() {
        let msg = call("org.bluez", "/org/bluez/hci0", "org.bluez.Adapter1", "SetDiscoveryFilter", "le");
        assert_eq!(frame_len(&msg).unwrap(), Some(msg.len()));
        assert_eq!(frame_len(&msg[..10]).unwrap(), None);
        let h = parse_header(&msg).unwrap();
        assert_eq!(h.kind, METHOD_CALL);
        assert_eq!(h.serial, 7);
        assert_eq!(h.destination.as_deref(), Some("org.bluez"));
        assert_eq!(h.member.as_deref(), Some("SetDiscoveryFilter"));
        assert_eq!(h.signature, "su");
        assert_eq!(leading_string_args(&msg, &h), vec![Some("le".to_string()), None]);
        assert_eq!(bus_call_args(&msg, &h).unwrap(), vec![BusValue::Str("le".into()), BusValue::U32(4)]);

        let stamped = with_sender(&msg, &h, ":1.42").unwrap();
        let h2 = parse_header(&stamped).unwrap();
        assert_eq!(h2.sender.as_deref(), Some(":1.42"));
        assert_eq!(Header { sender: None, body_offset: 0, ..h2.clone() }, Header { sender: None, body_offset: 0, ..h.clone() });
        assert_eq!(&stamped[h2.body_offset..], &msg[h.body_offset..]);
        // Stamping again replaces, never duplicates.
        let again = with_sender(&stamped, &h2, ":1.7").unwrap();
        let h3 = parse_header(&again).unwrap();
        assert_eq!(h3.sender.as_deref(), Some(":1.7"));
        assert_eq!(again.windows(5).filter(|w| *w == b":1.42").count(), 0);
        assert_eq!(&again[h3.body_offset..], &msg[h.body_offset..]);
    }

    #[test]
    fn bad_headers_are_errors_not_panics() {
        assert!(frame_len(b"xXXXXXXXXXXXXXXXXX").is_err());
        let mut msg = call("a.b", "/", "a.b", "M", "x");
        msg[3] = 2;
        assert!(frame_len(&msg).is_err());
        let msg = call("a.b", "/", "a.b", "M", "x");
        assert!(parse_header(&msg[..msg.len() - 1]).is_err());
        let mut zero = msg.clone();
        zero[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(parse_header(&zero).unwrap_err().0.contains("serial 0"));
    }

    #[test]
    fn match_rules_as_bleak_btleplug_and_zbus_write_them() {
        let r = MatchRule::parse("type='signal',sender='org.bluez',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',arg0path='/org/bluez/'").unwrap();
        assert_eq!(r.kind, Some(SIGNAL));
        assert_eq!(r.arg_paths, vec![(0, "/org/bluez/".to_string())]);
        let h = Header { kind: SIGNAL, interface: Some("org.freedesktop.DBus.Properties".into()), member: Some("PropertiesChanged".into()), path: Some("/x".into()), ..Default::default() };
        assert!(r.matches(&h, &[Some("/org/bluez/hci0/dev_1".into())], |s| s == "org.bluez"));
        assert!(!r.matches(&h, &[Some("/org/bluezz".into())], |s| s == "org.bluez"));
        assert!(!r.matches(&h, &[Some("/org/bluez/hci0".into())], |_| false), "another sender");

        let ns = MatchRule::parse("type='signal',path_namespace='/org/bluez'").unwrap();
        let at = |p: &str| Header { kind: SIGNAL, path: Some(p.into()), ..Default::default() };
        assert!(ns.matches(&at("/org/bluez"), &[], |_| true));
        assert!(ns.matches(&at("/org/bluez/hci0"), &[], |_| true));
        assert!(!ns.matches(&at("/org/bluezz"), &[], |_| true));

        let owner = MatchRule::parse("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='org.bluez'").unwrap();
        let noc = Header { kind: SIGNAL, member: Some("NameOwnerChanged".into()), ..Default::default() };
        assert!(owner.matches(&noc, &[Some("org.bluez".into())], |_| true));
        assert!(!owner.matches(&noc, &[Some("org.bluez2".into())], |_| true));

        let quoted = MatchRule::parse("arg0='it'\\''s'").unwrap();
        assert_eq!(quoted.args, vec![(0, "it's".to_string())]);
        assert!(MatchRule::parse("type='telepathy'").is_err());
        assert!(MatchRule::parse("arg64='x'").is_err());
        assert!(MatchRule::parse("path='/a',path_namespace='/b'").is_err());
        assert!(MatchRule::parse("member='unterminated").is_err());
    }

    #[test]
    fn sasl_external_with_unix_fds_and_pipelined_hello() {
        let mut s = SaslServer::default();
        let step = s.feed(b"\0AUTH EXTERNAL 30\r\nNEGOTIATE_UNIX_FD\r\n", "0123").unwrap();
        assert_eq!(step, SaslStep::Reply(b"OK 0123\r\nAGREE_UNIX_FD\r\n".to_vec()));
        let step = s.feed(b"BEGIN\r\nlHELLO", "0123").unwrap();
        assert_eq!(step, SaslStep::Begin { reply: Vec::new(), rest: b"lHELLO".to_vec() });
        assert!(s.unix_fds);

        let mut s = SaslServer::default();
        assert_eq!(s.feed(b"\0AUTH EXTERNAL\r\n", "g").unwrap(), SaslStep::Reply(b"DATA\r\n".to_vec()));
        assert_eq!(s.feed(b"DATA\r\n", "g").unwrap(), SaslStep::Reply(b"OK g\r\n".to_vec()));
        assert!(SaslServer::default().feed(b"AUTH", "g").is_err(), "no leading NUL");
        let mut s = SaslServer::default();
        assert_eq!(s.feed(b"\0AUTH\r\n", "g").unwrap(), SaslStep::Reply(b"REJECTED EXTERNAL ANONYMOUS\r\n".to_vec()));
        // DATA without AUTH EXTERNAL first, or BEGIN unauthenticated, gets nowhere.
        let mut s = SaslServer::default();
        assert_eq!(s.feed(b"\0DATA\r\nBEGIN\r\n", "g").unwrap(), SaslStep::Reply(b"ERROR \"unexpected command\"\r\nERROR \"unexpected command\"\r\n".to_vec()));
    }

    #[test]
    fn sasl_external_must_claim_the_peers_own_uid() {
        // uid 1000 is hex of "1000".
        let mut s = SaslServer::for_peer(Some(1000));
        assert_eq!(s.feed(b"\0AUTH EXTERNAL 31303030\r\n", "g").unwrap(), SaslStep::Reply(b"OK g\r\n".to_vec()));
        // Another uid, non-hex, odd length, not digits: refused, and BEGIN gets nowhere.
        for claim in ["393939393939", "30", "zz", "3", "2d31"] {
            let mut s = SaslServer::for_peer(Some(1000));
            let line = format!("\0AUTH EXTERNAL {claim}\r\nBEGIN\r\n");
            let want = b"REJECTED EXTERNAL ANONYMOUS\r\nERROR \"unexpected command\"\r\n".to_vec();
            assert_eq!(s.feed(line.as_bytes(), "g").unwrap(), SaslStep::Reply(want), "claim `{claim}`");
        }
        // The same check after DATA; an empty DATA means "my socket credentials".
        let mut s = SaslServer::for_peer(Some(0));
        s.feed(b"\0AUTH EXTERNAL\r\n", "g").unwrap();
        assert_eq!(s.feed(b"DATA 31\r\n", "g").unwrap(), SaslStep::Reply(b"REJECTED EXTERNAL ANONYMOUS\r\n".to_vec()));
        let mut s = SaslServer::for_peer(Some(0));
        s.feed(b"\0AUTH EXTERNAL\r\n", "g").unwrap();
        assert_eq!(s.feed(b"DATA 30\r\n", "g").unwrap(), SaslStep::Reply(b"OK g\r\n".to_vec()));
    }

    #[test]
    fn bus_replies_decode_with_zbus() {
        let hello = call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello", "");
        let h = Header { sender: Some(":1.3".into()), ..parse_header(&hello).unwrap() };
        let reply = BusMessage::method_return(9, &h, vec![BusValue::Str(":1.3".into())]).encode();
        let rh = parse_header(&reply).unwrap();
        assert_eq!((rh.kind, rh.reply_serial, rh.destination.as_deref(), rh.sender.as_deref()), (METHOD_RETURN, Some(7), Some(":1.3"), Some(BUS_NAME)));
        let creds = BusMessage::method_return(10, &h, vec![BusValue::U32Dict(vec![("UnixUserID".into(), 0), ("ProcessID".into(), 42)])]).encode();
        let names = BusMessage::method_return(11, &h, vec![BusValue::StrArray(vec!["org.freedesktop.DBus".into(), ":1.3".into()])]).encode();
        // zvariant (an independent implementation) reads the bodies back.
        let body = |bytes: &[u8]| {
            let h = parse_header(bytes).unwrap();
            (h.body_offset, bytes[h.body_offset..].to_vec(), h.signature)
        };
        let ctx = |at: usize| zbus::wire::serialized::Context::new(zbus::wire::LE, at);
        let (at, b, sig) = body(&creds);
        assert_eq!(sig, "a{sv}");
        let (d, _): (std::collections::HashMap<String, zbus::OwnedVariant>, _) =
            zbus::wire::serialized::Data::new(b, ctx(at)).deserialize().unwrap();
        assert_eq!(u32::try_from(&d["ProcessID"]).unwrap(), 42);
        let (at, b, sig) = body(&names);
        assert_eq!(sig, "as");
        let (v, _): (Vec<String>, _) = zbus::wire::serialized::Data::new(b, ctx(at)).deserialize().unwrap();
        assert_eq!(v, vec!["org.freedesktop.DBus".to_string(), ":1.3".to_string()]);
    }

    #[test]
    fn names_follow_the_specification() {
        use super::names::*;
        assert!(is_bus_name("org.bluez") && is_bus_name(":1.42") && is_bus_name("org.example.my-app"));
        assert!(!is_bus_name("bluez") && !is_bus_name("org..bluez") && !is_bus_name("org.1bluez") && !is_bus_name("not a name") && !is_bus_name(""));
        assert!(!is_bus_name(&format!("org.{}", "a".repeat(300))));
        assert!(is_interface("org.bluez.Device1") && !is_interface("org.bluez-x.Device1") && !is_interface("Device1"));
        assert!(is_member("PropertiesChanged") && !is_member("Properties.Changed") && !is_member("1x") && !is_member(""));
        assert!(is_object_path("/") && is_object_path("/org/bluez/hci0") && !is_object_path("/org/") && !is_object_path("org") && !is_object_path("/a//b") && !is_object_path("/a-b"));
    }

    #[test]
    fn malformed_match_rules_are_refused_with_what_is_wrong() {
        let e = MatchRule::parse("interface='not valid'").unwrap_err().0;
        assert!(e.contains("is not an interface name"), "{e}");
        let e = MatchRule::parse("member='a.b'").unwrap_err().0;
        assert!(e.contains("is not a member name"), "{e}");
        let e = MatchRule::parse("path='/org/'").unwrap_err().0;
        assert!(e.contains("is not an object path"), "{e}");
        let e = MatchRule::parse("sender='x'").unwrap_err().0;
        assert!(e.contains("is not a bus name"), "{e}");
        let e = MatchRule::parse("type='signal',type='error'").unwrap_err().0;
        assert!(e.contains("specified twice"), "{e}");
        // What bleak, zbus and libdbus send still parses.
        for ok in [
            "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',arg0='org.bluez.Device1',path_namespace='/org/bluez'",
            "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged',arg0=':1.3'",
            "type='signal',arg0path='/org/bluez/',eavesdrop='true'",
            "type='signal',arg0namespace='org.bluez',destination=':1.7'",
        ] {
            MatchRule::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e:?}"));
        }
    }
}
