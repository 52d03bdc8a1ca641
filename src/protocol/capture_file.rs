//! Capture containers, read as a stream: pcapng, classic pcap and btsnoop (Android's HCI
//! snoop log and btmon's monitor log).
//!
//! [`CaptureFileDecoder`] is sans-IO: bytes go in with [`CaptureFileDecoder::feed`] in
//! chunks of any size, packets come out of [`CaptureFileDecoder::next_packet`], and
//! [`CaptureFileDecoder::finish`] tells a file that ends mid-record from one that ends
//! cleanly. It holds at most one record (bounded by [`MAX_RECORD_LEN`]) plus the chunk
//! being fed, so a reader's memory stays flat in the file's size. Every error carries the
//! byte offset and the number of the record it is about; nothing panics on any input.
//!
//! Facts used (the formats' public specifications):
//! * pcapng: blocks of `type u32, total length u32, body, total length u32`, lengths a
//!   multiple of 4, byte order set per section by the Section Header Block's magic
//!   0x1A2B3C4D. Interface Description (type 1): link type, snap length, options
//!   (`if_name` 2, `if_tsresol` 9, `if_tsoffset` 14). Enhanced Packet (6), Simple Packet
//!   (3) and the obsolete Packet block (2); options `opt_comment` 1 and `epb_flags` 2
//!   (bits 0–1: 1 inbound, 2 outbound). Other block types are skipped.
//! * pcap: a 24-byte header, magic 0xA1B2C3D4 (microseconds) or 0xA1B23C4D
//!   (nanoseconds) in either byte order, link type in the low 28 bits of the last field;
//!   records of `seconds, fraction, captured length, original length`.
//! * btsnoop: `"btsnoop\0"`, version 1, datalink (1001 HCI without type byte, 1002 HCI
//!   UART/H4, 2001 Linux monitor), all big-endian; records of `original length, included
//!   length, flags, drops, timestamp i64` in microseconds since 0000-01-01, which is
//!   [`BTSNOOP_UNIX_EPOCH_US`] before the Unix epoch.

use std::fmt;

/// The largest record (pcapng block, pcap or btsnoop packet) accepted: a longer one is
/// reported as an error instead of being buffered.
pub const MAX_RECORD_LEN: usize = 16 << 20;

/// Microseconds from btsnoop's epoch (0000-01-01) to the Unix epoch.
pub const BTSNOOP_UNIX_EPOCH_US: i64 = 0x00dc_ddb3_0f2f_8000;

/// btsnoop datalink: HCI packets without the H4 type byte (flags tell the type).
pub const BTSNOOP_HCI_UNENCAPSULATED: u32 = 1001;
/// btsnoop datalink: HCI UART (H4), a type byte before each packet.
pub const BTSNOOP_HCI_UART: u32 = 1002;
/// btsnoop datalink: the Linux monitor (btmon): flags carry adapter index and opcode.
pub const BTSNOOP_LINUX_MONITOR: u32 = 2001;

const PCAPNG_SHB: u32 = 0x0A0D_0D0A;
const PCAPNG_IDB: u32 = 1;
const PCAPNG_OPB: u32 = 2;
const PCAPNG_SPB: u32 = 3;
const PCAPNG_EPB: u32 = 6;
const PCAPNG_BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;
const BTSNOOP_MAGIC: &[u8; 8] = b"btsnoop\0";

/// Which container a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureContainer {
    Pcapng,
    Pcap { nanoseconds: bool },
    Btsnoop { datalink: u32 },
}

impl fmt::Display for CaptureContainer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaptureContainer::Pcapng => f.write_str("pcapng"),
            CaptureContainer::Pcap { .. } => f.write_str("pcap"),
            CaptureContainer::Btsnoop { datalink } => write!(f, "btsnoop (datalink {datalink})"),
        }
    }
}

/// How a packet's bytes are framed, and so which decoder reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encapsulation {
    /// A pcap `LINKTYPE_*` number (pcap and pcapng files).
    Pcap(u32),
    /// A btsnoop record of the file's datalink, with the record's flags.
    Btsnoop { datalink: u32, flags: u32 },
}

/// Which way a packet went, where the container says so (pcapng `epb_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketDirection {
    Inbound,
    Outbound,
}

/// One packet out of a capture file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedPacket {
    /// 1-based number of the record (every pcapng block counts, the header does not).
    pub record: u64,
    /// Byte offset of the record's start in the file.
    pub offset: u64,
    pub encapsulation: Encapsulation,
    /// Interface (pcapng: numbered across sections in the order they appear; others: 0).
    pub interface: u32,
    /// Nanoseconds since the Unix epoch, when the record has a time (a pcapng Simple
    /// Packet has none; a time before 1970 clamps to 0).
    pub timestamp_ns: Option<u64>,
    pub data: Vec<u8>,
    /// The packet's length on the wire; more than `data.len()` when the capture cut it.
    pub original_len: u32,
    pub direction: Option<PacketDirection>,
    /// pcapng `opt_comment` (hilbench writes "request"/"response" there).
    pub comment: Option<String>,
}

/// A pcapng interface, as its description block declared it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureInterface {
    pub linktype: u32,
    pub name: Option<String>,
    /// Timestamp units per second, from `if_tsresol` (default 10^6).
    pub units_per_second: u64,
    pub offset_seconds: i64,
    pub snaplen: u32,
}

/// What is wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("byte {offset} (record {record}): {what}")]
pub struct CaptureFileError {
    pub offset: u64,
    pub record: u64,
    pub what: CaptureFileProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureFileProblem {
    #[error("not a capture file: starts with {0} (known: pcapng, pcap, btsnoop)")]
    UnknownMagic(String),
    #[error("the file ends inside the header ({have} of {need} bytes)")]
    TruncatedHeader { have: usize, need: usize },
    #[error("the file ends inside a record ({have} of {need} bytes): it was cut short")]
    TruncatedRecord { have: usize, need: usize },
    #[error("record length {0} is out of bounds (at least 12 and a multiple of 4 for pcapng, at most {MAX_RECORD_LEN})")]
    BadLength(u64),
    #[error("pcapng block's trailing length {trailer} differs from its leading length {leading}")]
    LengthMismatch { leading: u32, trailer: u32 },
    #[error("pcapng section header has byte-order magic {0:#010x}, not 0x1a2b3c4d")]
    BadByteOrder(u32),
    #[error("pcapng packet block before any section header")]
    NoSection,
    #[error("packet on interface {0}, which no interface description declared")]
    UnknownInterface(u32),
    #[error("{field} of {value} does not fit in the {room}-byte block")]
    FieldPastBlock { field: &'static str, value: u64, room: usize },
    #[error("btsnoop version {0} (only version 1 exists)")]
    BtsnoopVersion(u32),
    #[error("btsnoop datalink {0} (known: 1001 HCI, 1002 HCI UART/H4, 2001 Linux monitor)")]
    BtsnoopDatalink(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endian {
    Little,
    Big,
}

impl Endian {
    fn u16(self, b: &[u8]) -> u16 {
        let a = [b[0], b[1]];
        match self {
            Endian::Little => u16::from_le_bytes(a),
            Endian::Big => u16::from_be_bytes(a),
        }
    }

    fn u32(self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        match self {
            Endian::Little => u32::from_le_bytes(a),
            Endian::Big => u32::from_be_bytes(a),
        }
    }

    fn i64(self, b: &[u8]) -> i64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        match self {
            Endian::Little => i64::from_le_bytes(a),
            Endian::Big => i64::from_be_bytes(a),
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    /// Nothing read yet: the magic decides the container.
    Start,
    Pcapng {
        endian: Option<Endian>,
        /// Interfaces of the current section: (global id, description).
        section: Vec<u32>,
    },
    Pcap {
        endian: Endian,
        nanoseconds: bool,
        linktype: u32,
    },
    Btsnoop {
        datalink: u32,
    },
}

/// The streaming decoder (see the module docs).
#[derive(Debug, Clone)]
pub struct CaptureFileDecoder {
    buf: Vec<u8>,
    /// Where in `buf` the next unread byte is.
    start: usize,
    /// File offset of `buf[start]`.
    offset: u64,
    records: u64,
    state: State,
    interfaces: Vec<CaptureInterface>,
    container: Option<CaptureContainer>,
    /// Set once an error was returned: the stream cannot be resynchronised.
    failed: Option<CaptureFileError>,
}

impl Default for CaptureFileDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Looks at a file's first bytes: the container, if they name one.
pub fn sniff_container(head: &[u8]) -> Option<CaptureContainer> {
    if head.len() >= 8 && &head[..8] == BTSNOOP_MAGIC {
        let datalink = head.get(12..16).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        return Some(CaptureContainer::Btsnoop { datalink: datalink.unwrap_or(0) });
    }
    let magic = head.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))?;
    match magic {
        PCAPNG_SHB => Some(CaptureContainer::Pcapng),
        0xA1B2_C3D4 | 0xD4C3_B2A1 => Some(CaptureContainer::Pcap { nanoseconds: false }),
        0xA1B2_3C4D | 0x4D3C_B2A1 => Some(CaptureContainer::Pcap { nanoseconds: true }),
        _ => None,
    }
}

impl CaptureFileDecoder {
    pub fn new() -> Self {
        CaptureFileDecoder {
            buf: Vec::new(),
            start: 0,
            offset: 0,
            records: 0,
            state: State::Start,
            interfaces: Vec::new(),
            container: None,
            failed: None,
        }
    }

    /// Appends the next bytes of the file.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && (self.start >= self.buf.len() / 2 || self.buf.len() + bytes.len() > self.buf.capacity()) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The container, once its header has been read.
    pub fn container(&self) -> Option<CaptureContainer> {
        self.container
    }

    /// Every interface declared so far (pcapng), by global id.
    pub fn interfaces(&self) -> &[CaptureInterface] {
        &self.interfaces
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// The next packet: `Ok(None)` when more bytes are needed. After an error every call
    /// returns that error again.
    pub fn next_packet(&mut self) -> Result<Option<CapturedPacket>, CaptureFileError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.step();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    /// Called at the end of the file: an error when it ends inside the header or a record.
    pub fn finish(&self) -> Result<(), CaptureFileError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let have = self.avail().len();
        if have == 0 && self.container.is_some() {
            return Ok(());
        }
        let (need, header) = match (&self.state, self.container) {
            (State::Start, _) if have == 0 => (4, true),
            (State::Start, _) => (self.header_len().unwrap_or(24), true),
            (State::Pcapng { .. }, _) => (self.block_len_hint().unwrap_or(12), false),
            (State::Pcap { .. }, _) => (self.pcap_record_len_hint().unwrap_or(16), false),
            (State::Btsnoop { .. }, _) => (self.btsnoop_record_len_hint().unwrap_or(24), false),
        };
        let what = if header {
            CaptureFileProblem::TruncatedHeader { have, need }
        } else {
            CaptureFileProblem::TruncatedRecord { have, need }
        };
        Err(self.error_at(self.offset, self.records + u64::from(!header), what))
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }

    fn error_at(&self, offset: u64, record: u64, what: CaptureFileProblem) -> CaptureFileError {
        CaptureFileError { offset, record, what }
    }

    fn header_len(&self) -> Option<usize> {
        match sniff_container(self.avail())? {
            CaptureContainer::Pcapng => None,
            CaptureContainer::Pcap { .. } => Some(24),
            CaptureContainer::Btsnoop { .. } => Some(16),
        }
    }

    fn step(&mut self) -> Result<Option<CapturedPacket>, CaptureFileError> {
        loop {
            let progressed = match self.state {
                State::Start => self.read_file_header()?,
                State::Pcapng { .. } => return self.read_pcapng_block(),
                State::Pcap { .. } => return self.read_pcap_record(),
                State::Btsnoop { .. } => return self.read_btsnoop_record(),
            };
            if !progressed {
                return Ok(None);
            }
        }
    }

    /// Reads the container's header; false when more bytes are needed.
    fn read_file_header(&mut self) -> Result<bool, CaptureFileError> {
        let head = self.avail();
        if head.len() < 8 {
            // Enough to name a pcap or pcapng file, not btsnoop: wait unless it is
            // already clear the magic is unknown.
            if head.len() >= 4 && sniff_container(head).is_none() && !BTSNOOP_MAGIC.starts_with(head) {
                return Err(self.unknown_magic());
            }
            return Ok(false);
        }
        let Some(container) = sniff_container(head) else {
            return Err(self.unknown_magic());
        };
        match container {
            CaptureContainer::Pcapng => {
                // The section header is an ordinary block: read_pcapng_block handles it.
                self.state = State::Pcapng { endian: None, section: Vec::new() };
            }
            CaptureContainer::Pcap { nanoseconds } => {
                if head.len() < 24 {
                    return Ok(false);
                }
                let endian = if u32::from_le_bytes([head[0], head[1], head[2], head[3]]) >> 16 == 0xA1B2 {
                    Endian::Little
                } else {
                    Endian::Big
                };
                let linktype = endian.u32(&head[20..24]) & 0x0FFF_FFFF;
                let snaplen = endian.u32(&head[16..20]);
                self.interfaces.push(CaptureInterface {
                    linktype,
                    name: None,
                    units_per_second: if nanoseconds { 1_000_000_000 } else { 1_000_000 },
                    offset_seconds: 0,
                    snaplen,
                });
                self.state = State::Pcap { endian, nanoseconds, linktype };
                self.consume(24);
            }
            CaptureContainer::Btsnoop { .. } => {
                if head.len() < 16 {
                    return Ok(false);
                }
                let version = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
                let datalink = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
                if version != 1 {
                    return Err(self.error_at(8, 0, CaptureFileProblem::BtsnoopVersion(version)));
                }
                if !matches!(datalink, BTSNOOP_HCI_UNENCAPSULATED | BTSNOOP_HCI_UART | BTSNOOP_LINUX_MONITOR) {
                    return Err(self.error_at(12, 0, CaptureFileProblem::BtsnoopDatalink(datalink)));
                }
                self.state = State::Btsnoop { datalink };
                self.consume(16);
            }
        }
        self.container = Some(container);
        Ok(true)
    }

    fn unknown_magic(&self) -> CaptureFileError {
        let head = self.avail();
        let shown = crate::protocol::lower_hex(&head[..head.len().min(4)]);
        self.error_at(self.offset, 0, CaptureFileProblem::UnknownMagic(shown))
    }

    /// The endianness a pcapng block at the read position is in: a section header sets
    /// it from its own magic.
    fn pcapng_block_endian(&self) -> Result<Option<Endian>, CaptureFileError> {
        let head = self.avail();
        let State::Pcapng { endian, .. } = &self.state else { return Ok(None) };
        if head.len() >= 4 && u32::from_le_bytes([head[0], head[1], head[2], head[3]]) == PCAPNG_SHB {
            if head.len() < 12 {
                return Ok(None);
            }
            let magic = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
            return match magic {
                PCAPNG_BYTE_ORDER_MAGIC => Ok(Some(Endian::Little)),
                m if m.swap_bytes() == PCAPNG_BYTE_ORDER_MAGIC => Ok(Some(Endian::Big)),
                m => Err(self.error_at(self.offset + 8, self.records + 1, CaptureFileProblem::BadByteOrder(m))),
            };
        }
        match endian {
            Some(e) => Ok(Some(*e)),
            None if head.len() >= 4 => Err(self.error_at(self.offset, self.records + 1, CaptureFileProblem::NoSection)),
            None => Ok(None),
        }
    }

    fn block_len_hint(&self) -> Option<usize> {
        let e = self.pcapng_block_endian().ok()??;
        let head = self.avail();
        (head.len() >= 8).then(|| e.u32(&head[4..8]) as usize)
    }

    fn read_pcapng_block(&mut self) -> Result<Option<CapturedPacket>, CaptureFileError> {
        loop {
            let Some(endian) = self.pcapng_block_endian()? else { return Ok(None) };
            let head = self.avail();
            if head.len() < 8 {
                return Ok(None);
            }
            let record = self.records + 1;
            let block_type = endian.u32(&head[..4]);
            let total = endian.u32(&head[4..8]);
            if total < 12 || total % 4 != 0 || total as usize > MAX_RECORD_LEN {
                return Err(self.error_at(self.offset + 4, record, CaptureFileProblem::BadLength(total.into())));
            }
            let total = total as usize;
            if head.len() < total {
                return Ok(None);
            }
            let trailer = endian.u32(&head[total - 4..total]);
            if trailer != total as u32 {
                let at = self.offset + total as u64 - 4;
                return Err(self.error_at(at, record, CaptureFileProblem::LengthMismatch { leading: total as u32, trailer }));
            }
            let body = head[8..total - 4].to_vec();
            let block_offset = self.offset;
            self.records = record;
            self.consume(total);
            let at = |what| CaptureFileError { offset: block_offset, record, what };
            match block_type {
                PCAPNG_SHB => {
                    if body.len() < 16 {
                        return Err(at(CaptureFileProblem::FieldPastBlock { field: "section header", value: 16, room: body.len() }));
                    }
                    self.state = State::Pcapng { endian: Some(endian), section: Vec::new() };
                }
                PCAPNG_IDB => {
                    let idb = parse_idb(endian, &body).map_err(at)?;
                    self.interfaces.push(idb);
                    let id = (self.interfaces.len() - 1) as u32;
                    if let State::Pcapng { section, .. } = &mut self.state {
                        section.push(id);
                    }
                }
                PCAPNG_EPB | PCAPNG_OPB | PCAPNG_SPB => {
                    let packet = self.parse_packet_block(endian, block_type, &body, block_offset, record)?;
                    return Ok(Some(packet));
                }
                _ => {}
            }
        }
    }

    fn parse_packet_block(
        &self,
        endian: Endian,
        block_type: u32,
        body: &[u8],
        offset: u64,
        record: u64,
    ) -> Result<CapturedPacket, CaptureFileError> {
        let at = |what| CaptureFileError { offset, record, what };
        let past = |field, value: u64| at(CaptureFileProblem::FieldPastBlock { field, value, room: body.len() });
        let State::Pcapng { section, .. } = &self.state else {
            return Err(at(CaptureFileProblem::NoSection));
        };
        let (local_if, ts, caplen, origlen, data_at) = match block_type {
            PCAPNG_EPB => {
                if body.len() < 20 {
                    return Err(past("enhanced packet header", 20));
                }
                let ts = (u64::from(endian.u32(&body[4..8])) << 32) | u64::from(endian.u32(&body[8..12]));
                (endian.u32(&body[..4]), Some(ts), endian.u32(&body[12..16]), endian.u32(&body[16..20]), 20)
            }
            PCAPNG_OPB => {
                if body.len() < 20 {
                    return Err(past("packet block header", 20));
                }
                let ts = (u64::from(endian.u32(&body[4..8])) << 32) | u64::from(endian.u32(&body[8..12]));
                (u32::from(endian.u16(&body[..2])), Some(ts), endian.u32(&body[12..16]), endian.u32(&body[16..20]), 20)
            }
            _ => {
                if body.len() < 4 {
                    return Err(past("simple packet header", 4));
                }
                let origlen = endian.u32(&body[..4]);
                let snap = section
                    .first()
                    .and_then(|g| self.interfaces.get(*g as usize))
                    .map_or(0, |i| i.snaplen);
                let room = (body.len() - 4) as u32;
                let caplen = if snap == 0 { origlen.min(room) } else { origlen.min(snap).min(room) };
                (0, None, caplen, origlen, 4)
            }
        };
        let Some(&global) = section.get(local_if as usize) else {
            return Err(at(CaptureFileProblem::UnknownInterface(local_if)));
        };
        let iface = &self.interfaces[global as usize];
        let data_end = data_at + caplen as usize;
        if data_end > body.len() {
            return Err(past("captured length", caplen.into()));
        }
        let data = body[data_at..data_end].to_vec();
        let mut comment = None;
        let mut direction = None;
        if block_type == PCAPNG_EPB {
            let opts_at = data_at + (caplen as usize).div_ceil(4) * 4;
            for (code, value) in Options::new(endian, body.get(opts_at..).unwrap_or(&[])) {
                match code {
                    1 => comment = Some(String::from_utf8_lossy(value).into_owned()),
                    2 if value.len() >= 4 => {
                        direction = match endian.u32(value) & 3 {
                            1 => Some(PacketDirection::Inbound),
                            2 => Some(PacketDirection::Outbound),
                            _ => None,
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(CapturedPacket {
            record,
            offset,
            encapsulation: Encapsulation::Pcap(iface.linktype),
            interface: global,
            timestamp_ns: ts.map(|t| to_unix_ns(t, iface.units_per_second, iface.offset_seconds)),
            data,
            original_len: origlen,
            direction,
            comment,
        })
    }

    fn pcap_record_len_hint(&self) -> Option<usize> {
        let State::Pcap { endian, .. } = self.state else { return None };
        let head = self.avail();
        (head.len() >= 16).then(|| 16 + endian.u32(&head[8..12]) as usize)
    }

    fn read_pcap_record(&mut self) -> Result<Option<CapturedPacket>, CaptureFileError> {
        let State::Pcap { endian, nanoseconds, linktype } = self.state else { return Ok(None) };
        let head = self.avail();
        if head.len() < 16 {
            return Ok(None);
        }
        let record = self.records + 1;
        let caplen = endian.u32(&head[8..12]);
        if caplen as usize > MAX_RECORD_LEN {
            return Err(self.error_at(self.offset + 8, record, CaptureFileProblem::BadLength(caplen.into())));
        }
        let total = 16 + caplen as usize;
        if head.len() < total {
            return Ok(None);
        }
        let secs = u64::from(endian.u32(&head[..4]));
        let frac = u64::from(endian.u32(&head[4..8]));
        let frac_ns = if nanoseconds { frac } else { frac.saturating_mul(1000) };
        let packet = CapturedPacket {
            record,
            offset: self.offset,
            encapsulation: Encapsulation::Pcap(linktype),
            interface: 0,
            timestamp_ns: Some(secs.saturating_mul(1_000_000_000).saturating_add(frac_ns)),
            data: head[16..total].to_vec(),
            original_len: endian.u32(&head[12..16]),
            direction: None,
            comment: None,
        };
        self.records = record;
        self.consume(total);
        Ok(Some(packet))
    }

    fn btsnoop_record_len_hint(&self) -> Option<usize> {
        let head = self.avail();
        (head.len() >= 8).then(|| 24 + u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize)
    }

    fn read_btsnoop_record(&mut self) -> Result<Option<CapturedPacket>, CaptureFileError> {
        let State::Btsnoop { datalink } = self.state else { return Ok(None) };
        let head = self.avail();
        if head.len() < 24 {
            return Ok(None);
        }
        let be = Endian::Big;
        let record = self.records + 1;
        let included = be.u32(&head[4..8]);
        if included as usize > MAX_RECORD_LEN {
            return Err(self.error_at(self.offset + 4, record, CaptureFileProblem::BadLength(included.into())));
        }
        let total = 24 + included as usize;
        if head.len() < total {
            return Ok(None);
        }
        let flags = be.u32(&head[8..12]);
        let micros = be.i64(&head[16..24]).saturating_sub(BTSNOOP_UNIX_EPOCH_US);
        let packet = CapturedPacket {
            record,
            offset: self.offset,
            encapsulation: Encapsulation::Btsnoop { datalink, flags },
            interface: 0,
            timestamp_ns: Some((micros.max(0) as u64).saturating_mul(1000)),
            data: head[24..total].to_vec(),
            original_len: be.u32(&head[..4]),
            direction: None,
            comment: None,
        };
        self.records = record;
        self.consume(total);
        Ok(Some(packet))
    }
}

fn to_unix_ns(ts: u64, units_per_second: u64, offset_seconds: i64) -> u64 {
    let units = units_per_second.max(1);
    let secs = ts / units;
    let frac = ts % units;
    // frac < units <= 10^19: widen so the product cannot overflow.
    let frac_ns = (u128::from(frac) * 1_000_000_000 / u128::from(units)) as u64;
    let secs = (secs as i128 + i128::from(offset_seconds)).clamp(0, i128::from(u64::MAX / 1_000_000_000)) as u64;
    secs * 1_000_000_000 + frac_ns
}

fn parse_idb(endian: Endian, body: &[u8]) -> Result<CaptureInterface, CaptureFileProblem> {
    if body.len() < 8 {
        return Err(CaptureFileProblem::FieldPastBlock { field: "interface description", value: 8, room: body.len() });
    }
    let mut idb = CaptureInterface {
        linktype: u32::from(endian.u16(&body[..2])),
        name: None,
        units_per_second: 1_000_000,
        offset_seconds: 0,
        snaplen: endian.u32(&body[4..8]),
    };
    for (code, value) in Options::new(endian, &body[8..]) {
        match code {
            2 => idb.name = Some(String::from_utf8_lossy(value).into_owned()),
            9 if !value.is_empty() => {
                let r = value[0];
                let exp = u32::from(r & 0x7F);
                idb.units_per_second = if r & 0x80 == 0 {
                    10u64.checked_pow(exp).unwrap_or(u64::MAX)
                } else {
                    1u64.checked_shl(exp).unwrap_or(u64::MAX)
                };
            }
            14 if value.len() >= 8 => idb.offset_seconds = endian.i64(value),
            _ => {}
        }
    }
    Ok(idb)
}

/// pcapng options: `code u16, length u16, value padded to 4`, ending at code 0 or at the
/// end of the block. A length past the block ends the list.
struct Options<'a> {
    endian: Endian,
    rest: &'a [u8],
}

impl<'a> Options<'a> {
    fn new(endian: Endian, rest: &'a [u8]) -> Self {
        Options { endian, rest }
    }
}

impl<'a> Iterator for Options<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < 4 {
            return None;
        }
        let code = self.endian.u16(&self.rest[..2]);
        let len = self.endian.u16(&self.rest[2..4]) as usize;
        if code == 0 || 4 + len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let value = &self.rest[4..4 + len];
        let padded = (4 + len.div_ceil(4) * 4).min(self.rest.len());
        self.rest = &self.rest[padded..];
        Some((code, value))
    }
}

/// Decodes a whole in-memory file (tests and the fuzz target): the packets read, and the
/// error that stopped it, if any (a file cut short ends in `TruncatedRecord`).
pub fn decode_all(bytes: &[u8], chunk: usize) -> (Vec<CapturedPacket>, Option<CaptureFileError>) {
    let mut d = CaptureFileDecoder::new();
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        d.feed(piece);
        loop {
            match d.next_packet() {
                Ok(Some(p)) => out.push(p),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, d.finish().err())
}

#[cfg(test)]
mod tests;
