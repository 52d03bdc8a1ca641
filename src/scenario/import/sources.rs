//! The inputs `capture import` reads, each turned into [`SourceFrame`]s as a stream.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{BufRead, BufReader, Read};

use super::ImportGap;
use crate::link::capture::{
    DEVICE_PORT, EXP_PDU_TAG_DISSECTOR_NAME, EXP_PDU_TAG_DST_PORT, EXP_PDU_TAG_END_OF_OPT, EXP_PDU_TAG_SRC_PORT, LINKTYPE_WIRESHARK_UPPER_PDU,
    MBRTU_DISSECTOR,
};
use crate::link::recognise::CaptureTransport;
use crate::link::record::Direction;
use crate::protocol::capture_file::{self, CaptureFileDecoder, CaptureFileProblem, CapturedPacket, Encapsulation};
use crate::protocol::hci::{self, AttExtractor, HciOutput, HciPacket};
use crate::protocol::ip;

/// Endpoint pairs whose server is remembered.
const MAX_UDP_PAIRS: usize = 65_536;

/// Longest text line read; a longer one is skipped and reported.
const MAX_LINE: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Capture(capture_file::CaptureContainer),
    JsonLines,
    HexDump,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKind::Capture(c) => c.fmt(f),
            SourceKind::JsonLines => f.write_str("JSON Lines"),
            SourceKind::HexDump => f.write_str("hex dump"),
        }
    }
}

/// One frame as a source read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFrame {
    /// The link it travelled on: an interface, a BLE connection, a text source's link.
    pub link: String,
    pub transport: CaptureTransport,
    pub direction: Direction,
    pub t_ns: Option<u64>,
    /// The whole frame (for BLE the ATT PDU).
    pub bytes: Vec<u8>,
    /// Where the protocol bytes start (an ATT value after opcode and handle; else 0).
    pub value_at: usize,
    pub att_opcode: Option<u8>,
    pub handle: Option<u16>,
    /// Handle → UUID pairs the discovery in this frame taught.
    pub learnt: Vec<(u16, uuid::Uuid)>,
}

pub enum SourceError {
    Io(std::io::Error),
    /// The file could not be read past here: what and where.
    Located(String),
}

impl From<std::io::Error> for SourceError {
    fn from(e: std::io::Error) -> Self {
        SourceError::Io(e)
    }
}

/// The source a file's first bytes name.
pub fn sniff(head: &[u8]) -> Option<SourceKind> {
    if let Some(c) = capture_file::sniff_container(head) {
        return Some(SourceKind::Capture(c));
    }
    let text = head.iter().all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    if !text || head.is_empty() {
        return None;
    }
    match head.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Some(SourceKind::JsonLines),
        _ => Some(SourceKind::HexDump),
    }
}

type OnFrame<'a> = dyn FnMut(SourceFrame) -> std::io::Result<()> + 'a;
type OnGap<'a> = dyn FnMut(ImportGap) + 'a;

/// Reads the whole source, frame by frame.
pub fn read(kind: SourceKind, reader: impl Read, on_frame: &mut OnFrame<'_>, on_gap: &mut OnGap<'_>) -> Result<(), SourceError> {
    match kind {
        SourceKind::Capture(_) => read_capture(reader, on_frame, on_gap),
        SourceKind::JsonLines | SourceKind::HexDump => read_text(kind, reader, on_frame, on_gap),
    }
}

fn read_capture(mut reader: impl Read, on_frame: &mut OnFrame<'_>, on_gap: &mut OnGap<'_>) -> Result<(), SourceError> {
    let mut decoder = CaptureFileDecoder::new();
    let mut packets = PacketFrames::default();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        decoder.feed(&chunk[..n]);
        loop {
            match decoder.next_packet() {
                Ok(Some(p)) => packets.packet(&decoder, &p, on_frame, on_gap)?,
                Ok(None) => break,
                Err(e) => return Err(SourceError::Located(e.to_string())),
            }
        }
    }
    packets.finish(on_frame, on_gap)?;
    match decoder.finish() {
        Ok(()) => Ok(()),
        // A log cut short (the phone's snoop buffer, a killed tcpdump) keeps what it has.
        Err(e) if matches!(e.what, CaptureFileProblem::TruncatedRecord { .. }) => {
            on_gap(ImportGap { at: format!("byte {} (record {})", e.offset, e.record), what: e.what.to_string() });
            Ok(())
        }
        Err(e) => Err(SourceError::Located(e.to_string())),
    }
}

/// Turns capture packets into frames: exported PDUs and Bluetooth HCI.
#[derive(Default)]
struct PacketFrames {
    att: AttExtractor,
    /// Link types already reported as not imported.
    skipped: HashSet<u32>,
    /// Per (adapter, connection): the handle table size already passed on.
    taught: HashMap<(u16, u16), usize>,
    /// UDP: per endpoint pair, the server (where the first datagram went).
    servers: HashMap<(std::net::SocketAddr, std::net::SocketAddr), std::net::SocketAddr>,
    /// TCP: per endpoint pair, the connection's two streams, while it is open.
    tcp: HashMap<(std::net::SocketAddr, std::net::SocketAddr), TcpConn>,
    /// The connection limit was reported.
    tcp_full: bool,
}

/// A captured TCP connection read as HTTP and WebSocket: per direction (0: client to server) the
/// byte stream put in order and the messages in it.
struct TcpConn {
    client: std::net::SocketAddr,
    server: std::net::SocketAddr,
    streams: [crate::protocol::tcp_stream::TcpDirection; 2],
    ws: [crate::protocol::ws_capture::WsDirection; 2],
    /// A stream that is neither HTTP nor WebSocket was reported (once a connection).
    told: bool,
    /// Each direction sent its FIN.
    fin: [bool; 2],
}

impl TcpConn {
    /// The side that sent a SYN alone is the client; in a capture that starts later, the
    /// side with the higher port (an ephemeral one).
    fn new(s: &ip::TcpSegment<'_>) -> TcpConn {
        let src_client = if s.syn { !s.ack } else { s.src.port() > s.dst.port() };
        let (client, server) = if src_client { (s.src, s.dst) } else { (s.dst, s.src) };
        TcpConn { client, server, streams: Default::default(), ws: Default::default(), told: false, fin: [false; 2] }
    }

    /// Bytes held behind a hole in either direction come out after it.
    fn finish(&mut self, t_ns: Option<u64>, at: &str, on_frame: &mut OnFrame<'_>, on_gap: &mut OnGap<'_>) -> std::io::Result<()> {
        for i in 0..2 {
            let mut out = Vec::new();
            self.streams[i].finish(&mut out);
            if !out.is_empty() {
                self.read(i, out, t_ns, at, on_frame, on_gap)?;
            }
        }
        Ok(())
    }

    /// Moves stream `i`'s bytes into its WebSocket reader and passes on what it read.
    fn read(&mut self, i: usize, tcp: Vec<crate::protocol::tcp_stream::TcpOutput>, t_ns: Option<u64>, at: &str, on_frame: &mut OnFrame<'_>, on_gap: &mut OnGap<'_>) -> std::io::Result<()> {
        use crate::protocol::tcp_stream::TcpOutput;
        use crate::protocol::ws_capture::WsOutput;
        let mut out = Vec::new();
        for t in tcp {
            match t {
                TcpOutput::Bytes(b) => self.ws[i].push(&b, &mut out),
                TcpOutput::Missing(n) => self.ws[i].missing(n, &mut out),
            }
        }
        let link = format!("tcp:{}", self.server);
        for o in out {
            let transport = if matches!(o, WsOutput::Http(_)) { CaptureTransport::Http } else { CaptureTransport::WebSocket };
            match o {
                WsOutput::Message { payload: bytes, .. } | WsOutput::Http(bytes) => on_frame(SourceFrame {
                    link: link.clone(),
                    transport,
                    direction: if i == 0 { Direction::Request } else { Direction::Response },
                    t_ns,
                    bytes,
                    value_at: 0,
                    att_opcode: None,
                    handle: None,
                    learnt: Vec::new(),
                })?,
                WsOutput::Gap { what, .. } => on_gap(ImportGap { at: at.to_string(), what: format!("{link} ({} → {}): {what}", if i == 0 { self.client } else { self.server }, if i == 0 { self.server } else { self.client }) }),
                WsOutput::NotHttp { what } if !std::mem::replace(&mut self.told, true) => {
                    on_gap(ImportGap { at: at.to_string(), what: format!("{link} ({} → {}): a TCP connection that is not read: {what}; HTTP/1.1 and WebSocket over TCP are imported", self.client, self.server) })
                }
                WsOutput::NotHttp { .. } => {}
            }
        }
        Ok(())
    }
}

impl PacketFrames {
    fn packet(&mut self, d: &CaptureFileDecoder, p: &CapturedPacket, on_frame: &mut OnFrame<'_>, on_gap: &mut OnGap<'_>) -> std::io::Result<()> {
        let at = || format!("byte {} (record {})", p.offset, p.record);
        let if_name = d.interfaces().get(p.interface as usize).and_then(|i| i.name.clone());
        if p.encapsulation == Encapsulation::Pcap(LINKTYPE_WIRESHARK_UPPER_PDU) {
            return match exported_pdu(p) {
                Ok(Some((direction, bytes))) => on_frame(SourceFrame {
                    link: if_name.unwrap_or_else(|| format!("if{}", p.interface)),
                    transport: CaptureTransport::Serial,
                    direction,
                    t_ns: p.timestamp_ns,
                    bytes,
                    value_at: 0,
                    att_opcode: None,
                    handle: None,
                    learnt: Vec::new(),
                }),
                Ok(None) => Ok(()),
                Err(what) => {
                    on_gap(ImportGap { at: at(), what });
                    Ok(())
                }
            };
        }
        if let Encapsulation::Pcap(lt) = p.encapsulation {
            if ip::is_ip_linktype(lt) {
                return match ip::tcp_segment(lt, &p.data) {
                    Ok(seg) => self.tcp(&seg, p, on_frame, on_gap),
                    Err(_) => self.udp(lt, p, on_frame, on_gap),
                };
            }
        }
        let Some(hp) = HciPacket::from_capture(p.encapsulation, &p.data) else {
            if let Encapsulation::Pcap(lt) = p.encapsulation {
                if self.skipped.insert(lt) {
                    on_gap(ImportGap { at: at(), what: format!("link type {lt} is not imported (Modbus RTU exported PDUs, Bluetooth HCI, UDP and WebSocket over IP are)") });
                }
            }
            return Ok(());
        };
        let mut out = Vec::new();
        self.att.push(&hp, &mut out);
        for o in out {
            match o {
                HciOutput::Att(a) => {
                    let learnt = self.learnt(a.adapter, a.connection);
                    let link = match (&if_name, &a.peer) {
                        (Some(n), _) => n.clone(),
                        (None, Some(peer)) => peer.clone(),
                        (None, None) => format!("hci{}-conn{:#06x}", a.adapter, a.connection),
                    };
                    let op = a.pdu[0];
                    let handle = hci::att_handle(&a.pdu);
                    let value_at = if handle.is_some() { 3 } else { a.pdu.len() };
                    on_frame(SourceFrame {
                        link,
                        transport: CaptureTransport::BleAtt,
                        direction: if a.from_client { Direction::Request } else { Direction::Response },
                        t_ns: p.timestamp_ns,
                        bytes: a.pdu,
                        value_at,
                        att_opcode: Some(op),
                        handle,
                        learnt,
                    })?;
                }
                HciOutput::Gap(g) => on_gap(ImportGap { at: at(), what: g.to_string() }),
                HciOutput::Disconnected { .. } => {}
            }
        }
        Ok(())
    }

    /// A TCP segment into its connection's stream; the WebSocket messages it completes
    /// become frames of the link named after the server (`tcp:ADDR`).
    fn tcp(&mut self, seg: &ip::TcpSegment<'_>, p: &CapturedPacket, on_frame: &mut OnFrame<'_>, on_gap: &mut OnGap<'_>) -> std::io::Result<()> {
        let pair = if seg.src < seg.dst { (seg.src, seg.dst) } else { (seg.dst, seg.src) };
        let at = || format!("byte {} (record {})", p.offset, p.record);
        if !self.tcp.contains_key(&pair) {
            if seg.payload.is_empty() && !seg.syn {
                return Ok(()); // an ACK, FIN or RST of a connection not followed
            }
            // Bounded as the UDP pairs are (connections that end are forgotten): past the
            // limit a new connection is reported and not followed.
            if self.tcp.len() >= MAX_UDP_PAIRS {
                if !std::mem::replace(&mut self.tcp_full, true) {
                    on_gap(ImportGap { at: at(), what: format!("{MAX_UDP_PAIRS} TCP connections open at once: the ones that open after this are not read") });
                }
                return Ok(());
            }
            self.tcp.insert(pair, TcpConn::new(seg));
        }
        let Some(conn) = self.tcp.get_mut(&pair) else { return Ok(()) };
        let i = usize::from(seg.src != conn.client);
        let mut out = Vec::new();
        conn.streams[i].push(seg.seq, seg.syn, seg.payload, &mut out);
        if !out.is_empty() {
            conn.read(i, out, p.timestamp_ns, &at(), on_frame, on_gap)?;
        }
        conn.fin[i] |= seg.fin;
        // A connection that ended (reset, or closed both ways) gives what it held and goes.
        if seg.rst || conn.fin == [true, true] {
            if let Some(mut conn) = self.tcp.remove(&pair) {
                conn.finish(p.timestamp_ns, &at(), on_frame, on_gap)?;
            }
        }
        Ok(())
    }

    /// The end of the capture: bytes held behind a hole come out after it.
    fn finish(&mut self, on_frame: &mut OnFrame<'_>, on_gap: &mut OnGap<'_>) -> std::io::Result<()> {
        for conn in self.tcp.values_mut() {
            conn.finish(None, "the end of the capture", on_frame, on_gap)?;
        }
        Ok(())
    }

    /// A UDP datagram as a frame of the link named after its server: the side the first
    /// datagram between two endpoints went to (a client speaks first).
    fn udp(&mut self, lt: u32, p: &CapturedPacket, on_frame: &mut OnFrame<'_>, on_gap: &mut OnGap<'_>) -> std::io::Result<()> {
        let d = match ip::udp_datagram(lt, &p.data) {
            Ok(d) => d,
            Err(ip::IpSkip::Other) => return Ok(()),
            Err(e) => {
                on_gap(ImportGap { at: format!("byte {} (record {})", p.offset, p.record), what: e.to_string() });
                return Ok(());
            }
        };
        let pair = if d.src < d.dst { (d.src, d.dst) } else { (d.dst, d.src) };
        // Bounded: past the limit a new pair's server is its first datagram's destination,
        // unremembered (the importer stops following new links long before).
        let server = match self.servers.get(&pair) {
            Some(s) => *s,
            None if self.servers.len() < MAX_UDP_PAIRS => *self.servers.entry(pair).or_insert(d.dst),
            None => d.dst,
        };
        on_frame(SourceFrame {
            link: format!("udp:{server}"),
            transport: CaptureTransport::Udp,
            direction: if d.dst == server { Direction::Request } else { Direction::Response },
            t_ns: p.timestamp_ns,
            bytes: d.payload.to_vec(),
            value_at: 0,
            att_opcode: None,
            handle: None,
            learnt: Vec::new(),
        })
    }

    /// Handle → UUID pairs learnt since the last frame of this connection.
    fn learnt(&mut self, adapter: u16, connection: u16) -> Vec<(u16, uuid::Uuid)> {
        let Some(t) = self.att.table(adapter, connection) else { return Vec::new() };
        let seen = self.taught.entry((adapter, connection)).or_default();
        if t.handles.len() == *seen {
            return Vec::new();
        }
        *seen = t.handles.len();
        t.handles.iter().map(|(h, u)| (*h, *u)).collect()
    }
}

/// A Wireshark exported PDU: the Modbus RTU frame and its direction; None for a
/// dissector this importer does not read.
fn exported_pdu(p: &CapturedPacket) -> Result<Option<(Direction, Vec<u8>)>, String> {
    let mut rest = &p.data[..];
    let mut dissector = None;
    let (mut src, mut dst) = (None, None);
    loop {
        let Some((tl, after)) = rest.split_first_chunk::<4>() else {
            return Err("exported PDU ends inside its tag list".into());
        };
        let tag = u16::from_be_bytes([tl[0], tl[1]]);
        let len = usize::from(u16::from_be_bytes([tl[2], tl[3]]));
        if tag == EXP_PDU_TAG_END_OF_OPT {
            rest = after;
            break;
        }
        let Some(value) = after.get(..len) else {
            return Err(format!("exported PDU tag {tag} claims {len} bytes, {} remain", after.len()));
        };
        let u32_value = || value.get(..4).map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        match tag {
            // The dissector name, or the heuristic one (11) or a dissector table's (14).
            EXP_PDU_TAG_DISSECTOR_NAME | 11 | 14 => dissector = Some(String::from_utf8_lossy(value).trim_end_matches('\0').to_string()),
            EXP_PDU_TAG_SRC_PORT => src = u32_value(),
            EXP_PDU_TAG_DST_PORT => dst = u32_value(),
            _ => {}
        }
        rest = &after[len..];
    }
    match dissector.as_deref() {
        Some(MBRTU_DISSECTOR) => {}
        Some(other) => return Err(format!("exported PDU for dissector `{other}` is not imported (only `mbrtu`)")),
        None => return Err("exported PDU names no dissector".into()),
    }
    let direction = match (p.comment.as_deref(), src, dst) {
        (Some("request"), _, _) => Direction::Request,
        (Some("response"), _, _) => Direction::Response,
        (_, _, Some(DEVICE_PORT)) => Direction::Request,
        (_, Some(DEVICE_PORT), _) => Direction::Response,
        // Wireshark's own heuristic: an 8-byte read is a request.
        _ if rest.len() == 8 && matches!(rest.get(1), Some(1..=4)) => Direction::Request,
        _ => Direction::Response,
    };
    Ok(Some((direction, rest.to_vec())))
}

fn read_text(kind: SourceKind, reader: impl Read, on_frame: &mut OnFrame<'_>, on_gap: &mut OnGap<'_>) -> Result<(), SourceError> {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    let mut number = 0u64;
    let mut text = TextState { link: "text".into(), transport: CaptureTransport::Serial };
    // A file whose first lines are all unreadable is not this format: say so once
    // instead of reporting every line.
    let mut frames = 0u64;
    let mut first_bad: Option<(u64, String)> = None;
    let mut bad = 0u64;
    loop {
        line.clear();
        number += 1;
        if frames == 0 && bad >= GIVE_UP_AFTER {
            return Err(not_this_format(kind, first_bad));
        }
        let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
        if n == 0 {
            if frames == 0 && bad > 0 {
                return Err(not_this_format(kind, first_bad));
            }
            return Ok(());
        }
        if line.last() != Some(&b'\n') && n as u64 == MAX_LINE {
            // Skip the rest of an over-long line without holding it.
            let mut skip = Vec::new();
            while (&mut reader).take(MAX_LINE).read_until(b'\n', &mut skip)? > 0 && skip.last() != Some(&b'\n') {
                skip.clear();
            }
            on_gap(ImportGap { at: format!("line {number}"), what: format!("longer than {MAX_LINE} bytes; skipped") });
            continue;
        }
        let Ok(s) = std::str::from_utf8(&line) else {
            on_gap(ImportGap { at: format!("line {number}"), what: "not UTF-8 text; skipped".into() });
            continue;
        };
        let parsed = match kind {
            SourceKind::JsonLines => text.json_line(s),
            _ => text.hex_line(s),
        };
        match parsed {
            Ok(got) => {
                for f in got {
                    frames += 1;
                    on_frame(f)?;
                }
            }
            Err(what) => {
                bad += 1;
                first_bad.get_or_insert((number, what.clone()));
                on_gap(ImportGap { at: format!("line {number}"), what });
            }
        }
    }
}

/// Unreadable lines, with no frame before them, after which a text file is refused.
const GIVE_UP_AFTER: u64 = 20;

fn not_this_format(kind: SourceKind, first_bad: Option<(u64, String)>) -> SourceError {
    let (line, what) = first_bad.unwrap_or((1, "unreadable".into()));
    SourceError::Located(format!("line {line}: {what}: no frame in the first lines, so this is not a {kind} hilbench reads"))
}

struct TextState {
    link: String,
    transport: CaptureTransport,
}

impl TextState {
    fn frame(&self, direction: Direction, t_ns: Option<u64>, bytes: Vec<u8>) -> SourceFrame {
        let ble = self.transport == CaptureTransport::BleAtt;
        let handle = if ble { hci::att_handle(&bytes) } else { None };
        SourceFrame {
            link: self.link.clone(),
            transport: self.transport,
            direction,
            t_ns,
            value_at: if !ble { 0 } else if handle.is_some() { 3 } else { bytes.len() },
            att_opcode: if ble { bytes.first().copied() } else { None },
            handle,
            bytes,
            learnt: Vec::new(),
        }
    }

    /// A JSON object per line: hilbench's frame records (`link`, `direction`,
    /// `timestamp_ns`, `bytes`), fixture lines (`dir`, `t_ns`, `hex`; the header sets
    /// link and transport), or anything with those keys.
    fn json_line(&mut self, s: &str) -> Result<Vec<SourceFrame>, String> {
        if s.trim().is_empty() {
            return Ok(Vec::new());
        }
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
        let obj = v.as_object().ok_or("not a JSON object")?;
        if obj.contains_key("hilbench_fixture") {
            let h: super::FixtureHeader = serde_json::from_value(v.clone()).map_err(|e| format!("fixture header: {e}"))?;
            self.link = h.device;
            self.transport = h.transport;
            return Ok(Vec::new());
        }
        if let Some(l) = obj.get("link").and_then(|l| l.as_str()) {
            self.link = l.to_string();
        }
        if let Some(t) = obj.get("transport") {
            self.transport = serde_json::from_value(t.clone()).map_err(|e| format!("transport: {e}"))?;
        }
        let dir = obj.get("direction").or_else(|| obj.get("dir")).ok_or("no `direction` (or `dir`)")?;
        let direction: Direction = serde_json::from_value(dir.clone()).map_err(|e| format!("direction: {e}"))?;
        let t_ns = obj.get("timestamp_ns").or_else(|| obj.get("t_ns")).and_then(|t| t.as_u64());
        let bytes = match (obj.get("bytes"), obj.get("hex")) {
            (Some(b), _) => serde_json::from_value::<Vec<u8>>(b.clone()).map_err(|e| format!("bytes: {e}"))?,
            (None, Some(h)) => crate::scenario::spec::parse_hex(h.as_str().ok_or("`hex` is not a string")?)?,
            (None, None) => return Err("no `bytes` or `hex`".into()),
        };
        Ok(vec![self.frame(direction, t_ns, bytes)])
    }

    /// `[time] [direction] hex…`, or a trace line with `tx=HEX` and `rx=HEX` (the EG4
    /// bridge's `pack 0x01 tx=… rx=…`). `#` starts a comment. Time: seconds (`12.5`) or
    /// `HH:MM:SS.ffffff`; direction: `>`, `->`, `tx`, `req`, `request` or `<`, `<-`, `rx`,
    /// `rsp`, `response`; without one a line is a request and the next a response.
    fn hex_line(&mut self, s: &str) -> Result<Vec<SourceFrame>, String> {
        let s = s.split('#').next().unwrap_or("").trim();
        if s.is_empty() {
            return Ok(Vec::new());
        }
        let mut tokens: Vec<&str> = s.split_whitespace().collect();
        let t_ns = tokens.first().and_then(|t| parse_time(t));
        if t_ns.is_some() {
            tokens.remove(0);
        }
        if tokens.iter().any(|t| t.starts_with("tx=") || t.starts_with("rx=")) {
            let mut out = Vec::new();
            for t in tokens {
                let (dir, hex) = match t.split_once('=') {
                    Some(("tx", h)) => (Direction::Request, h),
                    Some(("rx", h)) => (Direction::Response, h),
                    _ => continue,
                };
                if !hex.is_empty() && hex != "-" {
                    out.push(self.frame(dir, t_ns, crate::scenario::spec::parse_hex(hex)?));
                }
            }
            return Ok(out);
        }
        let direction = match tokens.first().map(|t| t.to_ascii_lowercase()) {
            Some(d) if matches!(d.as_str(), ">" | "->" | "tx" | "req" | "request" | "w" | "write") => Some(Direction::Request),
            Some(d) if matches!(d.as_str(), "<" | "<-" | "rx" | "rsp" | "resp" | "response" | "n" | "notify") => Some(Direction::Response),
            _ => None,
        };
        if direction.is_some() {
            tokens.remove(0);
        }
        let bytes = crate::scenario::spec::parse_hex(&tokens.concat())?;
        if bytes.is_empty() {
            return Err("no bytes on the line".into());
        }
        Ok(vec![self.frame(direction.unwrap_or(Direction::Request), t_ns, bytes)])
    }
}

fn parse_time(t: &str) -> Option<u64> {
    let t = t.trim_start_matches('[').trim_end_matches(']');
    if let Some((hms, frac)) = t.split_once('.').filter(|_| t.contains(':')) {
        let parts: Vec<u64> = hms.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
        let secs = parts.iter().try_fold(0u64, |a, p| a.checked_mul(60)?.checked_add(*p))?;
        let digits = frac.len().min(9);
        let ns: u64 = frac.get(..digits)?.parse().ok()?;
        return secs.checked_mul(1_000_000_000)?.checked_add(ns.checked_mul(10u64.pow(9 - digits as u32))?);
    }
    if !t.contains('.') {
        return None;
    }
    let secs: f64 = t.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| (secs * 1e9) as u64)
}
