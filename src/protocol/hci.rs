//! Bluetooth HCI as capture files carry it, down to ATT: what `capture import` needs to
//! turn a phone's HCI snoop log or a btmon log into the ATT PDUs of each connection.
//!
//! Sans-IO. [`HciPacket::from_capture`] normalises the encapsulations (pcap
//! `LINKTYPE_BLUETOOTH_HCI_H4` 187 and `_WITH_PHDR` 201, `LINKTYPE_BLUETOOTH_LINUX_MONITOR`
//! 254, btsnoop datalinks 1001/1002/2001); [`AttExtractor`] reassembles ACL fragments into
//! L2CAP PDUs per connection and direction, keeps the ATT channel (CID 4), learns each
//! connection's peer address from the LE connection-complete events, and maps attribute
//! handles to UUIDs from the GATT discovery it sees (primary services by group type,
//! characteristic declarations by type, descriptors by find information). What it cannot
//! use (a continuation fragment with no start, a PDU cut short by the next start) it
//! reports as a [`HciGap`], never a panic.
//!
//! Facts: Bluetooth Core 5.4 Vol 4 Part E §5.4 (HCI packets: ACL handle 12 bits, packet
//! boundary flag bits 12–13: 0b00/0b10 start, 0b01 continuation), Vol 3 Part A §3.1
//! (L2CAP basic header: length, CID), Vol 3 Part F §3.4 (ATT opcodes), Vol 4 Part E
//! §7.7.65.1/.10 (LE Connection Complete / Enhanced Connection Complete), §7.7.5
//! (Disconnection Complete); BlueZ's `monitor/bt.h` for the monitor opcodes.

use std::collections::HashMap;

use super::capture_file::{Encapsulation, BTSNOOP_HCI_UART, BTSNOOP_HCI_UNENCAPSULATED, BTSNOOP_LINUX_MONITOR};

pub const LINKTYPE_BLUETOOTH_HCI_H4: u32 = 187;
pub const LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR: u32 = 201;
pub const LINKTYPE_BLUETOOTH_LINUX_MONITOR: u32 = 254;

/// An L2CAP PDU longer than this is refused (ATT's largest is 517 bytes; other channels
/// are read only to be skipped).
const MAX_L2CAP_LEN: usize = 65_535;

/// Which way a packet crossed the HCI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HciDirection {
    HostToController,
    ControllerToHost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HciPacketType {
    Command,
    Acl,
    Sco,
    Event,
    Iso,
}

/// One HCI packet, its H4 type byte (or monitor header) taken off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HciPacket<'a> {
    /// The controller (monitor logs carry several; others: 0).
    pub adapter: u16,
    pub kind: HciPacketType,
    /// None where the encapsulation does not say (H4 without a pseudo-header, for ACL).
    pub direction: Option<HciDirection>,
    pub bytes: &'a [u8],
}

fn h4_type(b: u8) -> Option<HciPacketType> {
    Some(match b {
        1 => HciPacketType::Command,
        2 => HciPacketType::Acl,
        3 => HciPacketType::Sco,
        4 => HciPacketType::Event,
        5 => HciPacketType::Iso,
        _ => return None,
    })
}

fn implied_direction(kind: HciPacketType) -> Option<HciDirection> {
    match kind {
        HciPacketType::Command => Some(HciDirection::HostToController),
        HciPacketType::Event => Some(HciDirection::ControllerToHost),
        _ => None,
    }
}

/// A monitor opcode (BlueZ `monitor/bt.h`) as a packet type and direction; None for the
/// opcodes that are not HCI traffic (index added/removed, notes, logging, …).
fn monitor_opcode(op: u16) -> Option<(HciPacketType, HciDirection)> {
    use HciDirection::*;
    Some(match op {
        2 => (HciPacketType::Command, HostToController),
        3 => (HciPacketType::Event, ControllerToHost),
        4 => (HciPacketType::Acl, HostToController),
        5 => (HciPacketType::Acl, ControllerToHost),
        6 => (HciPacketType::Sco, HostToController),
        7 => (HciPacketType::Sco, ControllerToHost),
        18 => (HciPacketType::Iso, HostToController),
        19 => (HciPacketType::Iso, ControllerToHost),
        _ => return None,
    })
}

impl<'a> HciPacket<'a> {
    /// The HCI packet in a captured record; None when the encapsulation is not HCI, the
    /// record is not HCI traffic (a monitor note), or it is too short to have a type.
    pub fn from_capture(enc: Encapsulation, data: &'a [u8]) -> Option<HciPacket<'a>> {
        match enc {
            Encapsulation::Pcap(LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR) => {
                let (dir, rest) = data.split_first_chunk::<4>()?;
                let direction = if u32::from_be_bytes(*dir) & 1 == 0 {
                    HciDirection::HostToController
                } else {
                    HciDirection::ControllerToHost
                };
                let (&t, bytes) = rest.split_first()?;
                Some(HciPacket { adapter: 0, kind: h4_type(t)?, direction: Some(direction), bytes })
            }
            Encapsulation::Pcap(LINKTYPE_BLUETOOTH_HCI_H4) => {
                let (&t, bytes) = data.split_first()?;
                let kind = h4_type(t)?;
                Some(HciPacket { adapter: 0, kind, direction: implied_direction(kind), bytes })
            }
            Encapsulation::Pcap(LINKTYPE_BLUETOOTH_LINUX_MONITOR) => {
                let (head, bytes) = data.split_first_chunk::<4>()?;
                let adapter = u16::from_be_bytes([head[0], head[1]]);
                let (kind, direction) = monitor_opcode(u16::from_be_bytes([head[2], head[3]]))?;
                Some(HciPacket { adapter, kind, direction: Some(direction), bytes })
            }
            Encapsulation::Btsnoop { datalink: BTSNOOP_HCI_UART, flags } => {
                let (&t, bytes) = data.split_first()?;
                Some(HciPacket { adapter: 0, kind: h4_type(t)?, direction: Some(btsnoop_direction(flags)), bytes })
            }
            Encapsulation::Btsnoop { datalink: BTSNOOP_HCI_UNENCAPSULATED, flags } => {
                let direction = btsnoop_direction(flags);
                let kind = match (flags & 2 != 0, direction) {
                    (false, _) => HciPacketType::Acl,
                    (true, HciDirection::HostToController) => HciPacketType::Command,
                    (true, HciDirection::ControllerToHost) => HciPacketType::Event,
                };
                Some(HciPacket { adapter: 0, kind, direction: Some(direction), bytes: data })
            }
            Encapsulation::Btsnoop { datalink: BTSNOOP_LINUX_MONITOR, flags } => {
                let (kind, direction) = monitor_opcode((flags & 0xFFFF) as u16)?;
                Some(HciPacket { adapter: (flags >> 16) as u16, kind, direction: Some(direction), bytes: data })
            }
            _ => None,
        }
    }
}

/// btsnoop flags bit 0: 0 sent (host → controller), 1 received.
fn btsnoop_direction(flags: u32) -> HciDirection {
    if flags & 1 == 0 {
        HciDirection::HostToController
    } else {
        HciDirection::ControllerToHost
    }
}

/// A Bluetooth device address as printed, bytes in the order given (most significant first).
pub fn format_address(a: &[u8; 6]) -> String {
    format!("{:02X}:{:02X}:{:02X}:{:02X}:{:02X}:{:02X}", a[0], a[1], a[2], a[3], a[4], a[5])
}

/// A Bluetooth device address as HCI carries it (least significant byte first), printed.
pub fn format_bdaddr(le: &[u8; 6]) -> String {
    let mut a = *le;
    a.reverse();
    format_address(&a)
}

/// A 16-bit Bluetooth SIG UUID (`0xFF00`) in its 128-bit form (the Bluetooth base UUID).
pub const fn uuid16(short: u16) -> uuid::Uuid {
    uuid::Uuid::from_u128(((short as u128) << 96) | 0x0000_0000_0000_1000_8000_0080_5f9b_34fb)
}

/// A UUID from ATT's little-endian 2- or 16-byte form, as the 128-bit string.
pub fn att_uuid(le: &[u8]) -> Option<uuid::Uuid> {
    match le.len() {
        2 => Some(uuid16(u16::from_le_bytes([le[0], le[1]]))),
        16 => {
            let mut be = [0u8; 16];
            for (i, b) in le.iter().enumerate() {
                be[15 - i] = *b;
            }
            Some(uuid::Uuid::from_bytes(be))
        }
        _ => None,
    }
}

/// Which side of GATT sent an ATT PDU, from its opcode: requests, commands and
/// confirmations come from the client; responses, notifications and indications from
/// the server.
pub fn att_from_client(opcode: u8) -> bool {
    match opcode & 0x3F {
        0x01 | 0x03 | 0x05 | 0x07 | 0x09 | 0x0B | 0x0D | 0x0F | 0x11 | 0x13 | 0x17 | 0x19 | 0x1B | 0x1D | 0x21
        | 0x23 | 0x25 => false,
        _ => true,
    }
}

/// The name of an ATT opcode (Core Vol 3 Part F §3.4.8).
pub fn att_opcode_name(opcode: u8) -> &'static str {
    match opcode {
        0x01 => "error_rsp",
        0x02 => "exchange_mtu_req",
        0x03 => "exchange_mtu_rsp",
        0x04 => "find_information_req",
        0x05 => "find_information_rsp",
        0x06 => "find_by_type_value_req",
        0x07 => "find_by_type_value_rsp",
        0x08 => "read_by_type_req",
        0x09 => "read_by_type_rsp",
        0x0A => "read_req",
        0x0B => "read_rsp",
        0x0C => "read_blob_req",
        0x0D => "read_blob_rsp",
        0x0E => "read_multiple_req",
        0x0F => "read_multiple_rsp",
        0x10 => "read_by_group_type_req",
        0x11 => "read_by_group_type_rsp",
        0x12 => "write_req",
        0x13 => "write_rsp",
        0x16 => "prepare_write_req",
        0x17 => "prepare_write_rsp",
        0x18 => "execute_write_req",
        0x19 => "execute_write_rsp",
        0x1B => "handle_value_ntf",
        0x1D => "handle_value_ind",
        0x1E => "handle_value_cfm",
        0x52 => "write_cmd",
        0xD2 => "signed_write_cmd",
        _ => "unknown",
    }
}

/// The attribute handle an ATT PDU is about, for the opcodes that name one.
pub fn att_handle(pdu: &[u8]) -> Option<u16> {
    let (&op, rest) = pdu.split_first()?;
    match op {
        0x0A | 0x0C | 0x12 | 0x16 | 0x1B | 0x1D | 0x52 | 0xD2 => rest.get(..2).map(|h| u16::from_le_bytes([h[0], h[1]])),
        _ => None,
    }
}

/// One ATT PDU of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttPdu {
    pub adapter: u16,
    pub connection: u16,
    /// The peer's address, when the log saw the connection being made.
    pub peer: Option<String>,
    /// True when the GATT client (usually the phone or host that made the log) sent it.
    pub from_client: bool,
    pub pdu: Vec<u8>,
}

/// Something in the log that could not be turned into ATT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HciGap {
    /// A continuation fragment arrived with no start fragment before it.
    ContinuationWithoutStart { connection: u16 },
    /// A start fragment arrived while the previous L2CAP PDU still missed bytes.
    IncompletePdu { connection: u16, have: usize, need: usize },
    /// An ACL packet shorter than its header or its own length field.
    ShortAcl { connection: Option<u16>, len: usize },
    /// An L2CAP length past the limit.
    OversizedPdu { connection: u16, len: usize },
}

impl std::fmt::Display for HciGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HciGap::ContinuationWithoutStart { connection } => {
                write!(f, "ACL continuation fragment on connection {connection:#05x} with no start fragment (log started mid-PDU?)")
            }
            HciGap::IncompletePdu { connection, have, need } => write!(
                f,
                "L2CAP PDU on connection {connection:#05x} cut short: {have} of {need} bytes before the next start fragment"
            ),
            HciGap::ShortAcl { connection: Some(c), len } => write!(f, "ACL packet on connection {c:#05x} of {len} bytes is shorter than its header says"),
            HciGap::ShortAcl { connection: None, len } => write!(f, "ACL packet of {len} bytes is shorter than its 4-byte header"),
            HciGap::OversizedPdu { connection, len } => write!(f, "L2CAP PDU of {len} bytes on connection {connection:#05x} is past the limit"),
        }
    }
}

/// What one HCI packet produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HciOutput {
    Att(AttPdu),
    Gap(HciGap),
    /// A connection ended (Disconnection Complete).
    Disconnected { adapter: u16, connection: u16 },
}

#[derive(Debug, Default, Clone)]
struct Reassembly {
    buf: Vec<u8>,
    /// Total L2CAP PDU length (header included) once the header is in.
    need: Option<usize>,
    active: bool,
}

/// The attribute table learnt from discovery, per (adapter, connection).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GattTable {
    /// Characteristic value handles and descriptor handles → UUID.
    pub handles: std::collections::BTreeMap<u16, uuid::Uuid>,
    /// Primary services: (start handle, end handle, UUID).
    pub services: Vec<(u16, u16, uuid::Uuid)>,
}

/// Reassembles ACL into ATT (see the module docs).
#[derive(Debug, Default)]
pub struct AttExtractor {
    /// Keyed by (adapter, connection, packet went host → controller).
    fragments: HashMap<(u16, u16, bool), Reassembly>,
    peers: HashMap<(u16, u16), String>,
    tables: HashMap<(u16, u16), GattTable>,
    /// The client's last discovery request per connection: opcode and the UUID asked for.
    pending: HashMap<(u16, u16), (u8, Vec<u8>)>,
}

impl AttExtractor {
    pub fn new() -> Self {
        Self::default()
    }

    /// The table learnt for a connection.
    pub fn table(&self, adapter: u16, connection: u16) -> Option<&GattTable> {
        self.tables.get(&(adapter, connection))
    }

    /// Adds handle → UUID entries for a connection (`--gatt`, for a log that starts after
    /// the discovery).
    pub fn seed_table(&mut self, adapter: u16, connection: u16, handles: impl IntoIterator<Item = (u16, uuid::Uuid)>) {
        self.tables.entry((adapter, connection)).or_default().handles.extend(handles);
    }

    /// Feeds one HCI packet.
    pub fn push(&mut self, p: &HciPacket<'_>, out: &mut Vec<HciOutput>) {
        match p.kind {
            HciPacketType::Event => self.event(p.adapter, p.bytes, out),
            HciPacketType::Acl => self.acl(p, out),
            _ => {}
        }
    }

    fn event(&mut self, adapter: u16, ev: &[u8], out: &mut Vec<HciOutput>) {
        let Some((&code, rest)) = ev.split_first() else { return };
        let params = rest.get(1..).unwrap_or(&[]);
        match code {
            // Disconnection Complete: status, handle, reason.
            0x05 if params.len() >= 3 && params[0] == 0 => {
                let connection = u16::from_le_bytes([params[1], params[2]]) & 0x0FFF;
                self.fragments.retain(|k, _| (k.0, k.1) != (adapter, connection));
                self.pending.remove(&(adapter, connection));
                out.push(HciOutput::Disconnected { adapter, connection });
            }
            // LE Meta: (Enhanced) Connection Complete: subevent, status, handle, role,
            // peer address type, peer address.
            0x3E if params.len() >= 12 && matches!(params[0], 0x01 | 0x0A) && params[1] == 0 => {
                let connection = u16::from_le_bytes([params[2], params[3]]) & 0x0FFF;
                let mut addr = [0u8; 6];
                addr.copy_from_slice(&params[6..12]);
                self.peers.insert((adapter, connection), format_bdaddr(&addr));
                // A new connection on a reused handle starts a new table.
                self.tables.remove(&(adapter, connection));
            }
            _ => {}
        }
    }

    fn acl(&mut self, p: &HciPacket<'_>, out: &mut Vec<HciOutput>) {
        let b = p.bytes;
        if b.len() < 4 {
            out.push(HciOutput::Gap(HciGap::ShortAcl { connection: None, len: b.len() }));
            return;
        }
        let hf = u16::from_le_bytes([b[0], b[1]]);
        let connection = hf & 0x0FFF;
        let boundary = (hf >> 12) & 3;
        let len = usize::from(u16::from_le_bytes([b[2], b[3]]));
        let Some(data) = b.get(4..4 + len) else {
            out.push(HciOutput::Gap(HciGap::ShortAcl { connection: Some(connection), len: b.len() }));
            return;
        };
        // Without a direction (H4 with no pseudo-header) both ways share one buffer.
        let to_controller = p.direction != Some(HciDirection::ControllerToHost);
        let key = (p.adapter, connection, to_controller);
        let r = self.fragments.entry(key).or_default();
        if boundary == 0b01 {
            if !r.active {
                out.push(HciOutput::Gap(HciGap::ContinuationWithoutStart { connection }));
                return;
            }
        } else {
            if r.active {
                let have = r.buf.len();
                let need = r.need.unwrap_or(4);
                out.push(HciOutput::Gap(HciGap::IncompletePdu { connection, have, need }));
            }
            *r = Reassembly { buf: Vec::new(), need: None, active: true };
        }
        r.buf.extend_from_slice(data);
        if r.need.is_none() && r.buf.len() >= 4 {
            let l2len = usize::from(u16::from_le_bytes([r.buf[0], r.buf[1]]));
            if l2len > MAX_L2CAP_LEN {
                out.push(HciOutput::Gap(HciGap::OversizedPdu { connection, len: l2len }));
                *r = Reassembly::default();
                return;
            }
            r.need = Some(4 + l2len);
        }
        let Some(need) = r.need else { return };
        if r.buf.len() < need {
            return;
        }
        let mut pdu = std::mem::take(&mut r.buf);
        *r = Reassembly::default();
        // Bytes past the PDU in the last fragment are padding; drop them.
        pdu.truncate(need);
        let cid = u16::from_le_bytes([pdu[2], pdu[3]]);
        if cid != 0x0004 || pdu.len() < 5 {
            return;
        }
        let att = pdu.split_off(4);
        self.learn(p.adapter, connection, &att);
        out.push(HciOutput::Att(AttPdu {
            adapter: p.adapter,
            connection,
            peer: self.peers.get(&(p.adapter, connection)).cloned(),
            from_client: att_from_client(att[0]),
            pdu: att,
        }));
    }

    /// Learns handles from discovery requests and their responses.
    fn learn(&mut self, adapter: u16, connection: u16, att: &[u8]) {
        let key = (adapter, connection);
        let op = att[0];
        match op {
            // Read By Type / Read By Group Type requests: start, end, UUID.
            0x08 | 0x10 if att.len() >= 7 => {
                self.pending.insert(key, (op, att[5..].to_vec()));
            }
            0x04 => {
                self.pending.insert(key, (op, Vec::new()));
            }
            0x09 => {
                let asked = self.pending.get(&key).cloned();
                if let Some((0x08, uuid)) = asked {
                    if att_uuid(&uuid).map(|u| u.as_u128() >> 96) == Some(0x2803) {
                        self.learn_characteristics(key, &att[1..]);
                    }
                }
            }
            0x11 => {
                if let Some((0x10, uuid)) = self.pending.get(&key).cloned() {
                    if att_uuid(&uuid).map(|u| u.as_u128() >> 96) == Some(0x2800) {
                        self.learn_services(key, &att[1..]);
                    }
                }
            }
            0x05 => self.learn_descriptors(key, &att[1..]),
            _ => {}
        }
    }

    fn learn_characteristics(&mut self, key: (u16, u16), body: &[u8]) {
        let Some((&each, entries)) = body.split_first() else { return };
        let each = usize::from(each);
        if each != 7 && each != 21 {
            return;
        }
        let table = self.tables.entry(key).or_default();
        for e in entries.chunks_exact(each) {
            // declaration handle, properties, value handle, UUID
            let value_handle = u16::from_le_bytes([e[3], e[4]]);
            if let Some(u) = att_uuid(&e[5..]) {
                table.handles.insert(value_handle, u);
            }
        }
    }

    fn learn_services(&mut self, key: (u16, u16), body: &[u8]) {
        let Some((&each, entries)) = body.split_first() else { return };
        let each = usize::from(each);
        if each != 6 && each != 20 {
            return;
        }
        let table = self.tables.entry(key).or_default();
        for e in entries.chunks_exact(each) {
            if let Some(u) = att_uuid(&e[4..]) {
                table.services.push((u16::from_le_bytes([e[0], e[1]]), u16::from_le_bytes([e[2], e[3]]), u));
            }
        }
    }

    fn learn_descriptors(&mut self, key: (u16, u16), body: &[u8]) {
        let Some((&format, entries)) = body.split_first() else { return };
        let each = match format {
            1 => 4,
            2 => 18,
            _ => return,
        };
        let table = self.tables.entry(key).or_default();
        for e in entries.chunks_exact(each) {
            let handle = u16::from_le_bytes([e[0], e[1]]);
            if let Some(u) = att_uuid(&e[2..]) {
                // A characteristic value handle found by type keeps its UUID.
                table.handles.entry(handle).or_insert(u);
            }
        }
    }
}

#[cfg(test)]
mod tests;
