//! pcapng captures of link traffic that Wireshark/tshark decode without any
//! user configuration: one writer, [`PcapngCapture`], and one
//! [`CaptureFormat`] per transport: Modbus RTU (below) and BLE ATT (see
//! [`CaptureFormat::BleAtt`]).
//!
//! # File layout
//!
//! * One Section Header Block (`shb_userappl` = "hilbench").
//! * One Interface Description Block per link, with link type
//!   `LINKTYPE_WIRESHARK_UPPER_PDU` (252), `if_name` = the link name and
//!   `if_tsresol` = 9, so timestamps are stored in nanoseconds. The link given to
//!   [`PcapngCapture::create`] is interface 0; a record for another link gets its own
//!   interface, added the first time that link is seen.
//! * One Enhanced Packet Block per frame, with `opt_comment` = `"request"` or
//!   `"response"`. Its packet data is an "exported PDU" header followed by the raw
//!   RTU frame (address byte through CRC, exactly as it was on the wire).
//!
//! # Exported-PDU header
//!
//! A list of TLVs (2-byte tag, 2-byte length, both big-endian; the value is padded
//! with zero bytes to a multiple of 4 and the length counts the padding), ending with
//! tag 0 / length 0. Tag numbers are from Wireshark's `wsutil/exported_pdu_tlvs.h`:
//!
//! | tag | name                      | value                                         |
//! |-----|---------------------------|-----------------------------------------------|
//! | 12  | EXP_PDU_TAG_DISSECTOR_NAME| `"mbrtu"` (the registered Modbus RTU dissector)|
//! | 24  | EXP_PDU_TAG_PORT_TYPE     | u32 2 (EXP_PDU_PT_TCP)                        |
//! | 25  | EXP_PDU_TAG_SRC_PORT      | u32: [`MASTER_PORT`] for requests, [`DEVICE_PORT`] for responses |
//! | 26  | EXP_PDU_TAG_DST_PORT      | u32: the other one                            |
//! | 0   | EXP_PDU_TAG_END_OF_OPT    | (empty)                                       |
//!
//! # How Wireshark tells a query from a response
//!
//! The `mbrtu` dissector (`classify_mbrtu_packet` in `packet-mbtcp.c`) first
//! compares the packet's source/destination ports with the Modbus RTU port range
//! preference (`mbrtu.tcp.port`): destination in range → query, source in range →
//! response. That range is **empty by default**, so with no configuration the ports
//! decide nothing and Wireshark falls back to a heuristic on the frame itself: a
//! function code with bit 7 set is a response (exception); FC 3/4 are queries when
//! the frame is 8 bytes long and responses otherwise; FC 1/2 are queries when 8 bytes
//! long unless byte 2 is 3; FC 15/16 are responses when 8 bytes long; FC 5/6 (and any
//! other function) cannot be classified. For the read-holding-registers traffic of
//! the battery packs (FC 3 + exceptions) the heuristic is always right.
//!
//! The port tags carry the real direction: requests go from [`MASTER_PORT`] to
//! [`DEVICE_PORT`], replies the other way. Opening the capture with
//! `-o mbrtu.tcp.port:502` makes Wireshark classify *every* function code from them,
//! and the fields `exported_pdu.dst_port == 502` (requests) /
//! `exported_pdu.src_port == 502` (replies) filter by direction in any case, as does
//! `frame.comment == "request"`.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::{DataLink, Endianness, PcapError};

use super::record::{Direction, FrameRecord};

/// `LINKTYPE_WIRESHARK_UPPER_PDU`.
pub const LINKTYPE_WIRESHARK_UPPER_PDU: u32 = 252;

/// Exported-PDU tag: end of the TLV list.
pub const EXP_PDU_TAG_END_OF_OPT: u16 = 0;
/// Exported-PDU tag: name of the registered dissector to hand the payload to.
pub const EXP_PDU_TAG_DISSECTOR_NAME: u16 = 12;
/// Exported-PDU tag: port type (u32, an `EXP_PDU_PT_*` value).
pub const EXP_PDU_TAG_PORT_TYPE: u16 = 24;
/// Exported-PDU tag: source port (u32).
pub const EXP_PDU_TAG_SRC_PORT: u16 = 25;
/// Exported-PDU tag: destination port (u32).
pub const EXP_PDU_TAG_DST_PORT: u16 = 26;
/// `EXP_PDU_PT_TCP`: the `mbrtu` port preference is its "TCP port" range.
pub const EXP_PDU_PT_TCP: u32 = 2;

/// Wireshark's dissector for Modbus RTU frames (address, PDU, CRC-16).
pub const MBRTU_DISSECTOR: &str = "mbrtu";
/// Pseudo port of the device (slave) side of every link: the Modbus port number.
pub const DEVICE_PORT: u32 = 502;
/// Pseudo port of the master side of every link (any number not in the Modbus range).
pub const MASTER_PORT: u32 = 50_200;

/// Interface names longer than this are refused (pcapng option lengths are 16-bit).
const MAX_LINK_NAME_LEN: usize = 4096;

/// Errors from writing a capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("capture file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("capture file {path}: pcapng write failed: {source}")]
    Pcap {
        path: PathBuf,
        #[source]
        source: PcapError,
    },
    #[error("link name is {len} bytes long; at most {MAX_LINK_NAME_LEN} are allowed")]
    LinkNameTooLong { len: usize },
    #[error("frame of {len} bytes is too large for a pcapng packet block")]
    FrameTooLarge { len: usize },
}

/// What a capture's packets are, and so how Wireshark decodes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureFormat {
    /// Modbus RTU frames behind an exported-PDU header naming the `mbrtu`
    /// dissector (link type `LINKTYPE_WIRESHARK_UPPER_PDU`, see the module docs).
    ModbusRtu,
    /// BLE ATT PDUs (each [`FrameRecord`]'s bytes are one whole PDU:
    /// opcode, handle, value; [`crate::air::LinkControl::att_frames`] gives
    /// them), which Wireshark decodes as HCI ACL → L2CAP → ATT.
    ///
    /// Link type `LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR` (201), one interface per
    /// link, nanosecond timestamps. Each packet is seen from the central's host
    /// (hci0): the pseudo-header's direction (big-endian u32) is 0 "sent" for
    /// `Request` (central → peripheral: writes, reads, confirmations) and 1
    /// "received" for `Response` (notifications, responses). Then H4 type 0x02,
    /// the ACL header (connection handle [`ACL_CONNECTION_HANDLE`], packet
    /// boundary "first non-flushable" host → controller and "first flushable"
    /// controller → host, little-endian), the L2CAP basic header (length, CID
    /// 0x0004) and the PDU. `btatt.opcode`, `btatt.handle` and `btatt.value`
    /// are the fields to filter on.
    BleAtt,
}

impl CaptureFormat {
    fn linktype(self) -> u32 {
        match self {
            CaptureFormat::ModbusRtu => LINKTYPE_WIRESHARK_UPPER_PDU,
            CaptureFormat::BleAtt => LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR,
        }
    }

    fn description(self) -> &'static str {
        match self {
            CaptureFormat::ModbusRtu => "Modbus RTU (RS-485), simulated by hilbench",
            CaptureFormat::BleAtt => "BLE ATT over the virtual air, seen from hci0, simulated by hilbench",
        }
    }

    /// One record's packet data; None when it cannot be one packet.
    fn encode(self, out: &mut Vec<u8>, rec: &FrameRecord) -> Option<()> {
        match self {
            CaptureFormat::ModbusRtu => {
                encode_exported_pdu_header(out, rec.direction);
                out.extend_from_slice(&rec.bytes);
                // Keep the block (and so its 32-bit total length) well inside u32.
                (out.len() <= (u32::MAX / 2) as usize).then_some(())
            }
            CaptureFormat::BleAtt => encode_h4_att(out, rec.direction, &rec.bytes),
        }
    }
}

/// Writes [`FrameRecord`]s to a pcapng file in one [`CaptureFormat`].
///
/// ```no_run
/// # use std::path::Path;
/// # use hilbench::link::capture::PcapngCapture;
/// # use hilbench::link::record::{Direction, FrameRecord};
/// let mut cap = PcapngCapture::create(Path::new("bus.pcapng"), "bus0")?;
/// cap.write(&FrameRecord::new("bus0", Direction::Request, 1_700_000_000_000_000_000,
///                             vec![0x01, 0x03, 0x00, 0x00, 0x00, 0x2F, 0x04, 0x1E]))?;
/// cap.close()?; // or cap.finish(), which logs a failure instead of returning it
/// # Ok::<(), hilbench::link::capture::CaptureError>(())
/// ```
pub struct PcapngCapture {
    writer: PcapNgWriter<BufWriter<File>>,
    path: PathBuf,
    format: CaptureFormat,
    /// Link name of each interface, indexed by interface id.
    links: Vec<String>,
    /// Scratch buffer for one packet (headers + frame).
    packet: Vec<u8>,
}

impl std::fmt::Debug for PcapngCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcapngCapture")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("links", &self.links)
            .finish()
    }
}

impl PcapngCapture {
    /// A Modbus RTU capture: creates (truncating) `path` and writes the
    /// section header and the interface of `link_name`.
    pub fn create(path: &Path, link_name: &str) -> Result<Self, CaptureError> {
        Self::create_as(path, link_name, CaptureFormat::ModbusRtu)
    }

    /// Creates (truncating) `path` for `format` with the interface of `link_name`.
    pub fn create_as(path: &Path, link_name: &str, format: CaptureFormat) -> Result<Self, CaptureError> {
        check_link_name(link_name)?;
        let file = File::create(path).map_err(|source| CaptureError::Io {
            path: path.to_owned(),
            source,
        })?;
        let section = SectionHeaderBlock {
            endianness: Endianness::native(),
            options: vec![SectionHeaderOption::UserApplication(Cow::Borrowed(
                "hilbench",
            ))],
            ..Default::default()
        };
        let writer = PcapNgWriter::with_section_header(BufWriter::new(file), section)
            .map_err(|source| pcap_err(path, source))?;
        let mut capture = PcapngCapture {
            writer,
            path: path.to_owned(),
            format,
            links: Vec::new(),
            packet: Vec::with_capacity(600),
        };
        capture.add_interface(link_name)?;
        Ok(capture)
    }

    /// Path of the capture file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one frame. The record's timestamp is kept to the nanosecond.
    pub fn write(&mut self, rec: &FrameRecord) -> Result<(), CaptureError> {
        let interface_id = match self.links.iter().position(|l| *l == rec.link) {
            Some(id) => id as u32,
            None => self.add_interface(&rec.link)?,
        };

        self.packet.clear();
        self.format
            .encode(&mut self.packet, rec)
            .ok_or(CaptureError::FrameTooLarge { len: rec.bytes.len() })?;

        let block = EnhancedPacketBlock {
            interface_id,
            timestamp: Duration::from_nanos(rec.timestamp_ns),
            original_len: self.packet.len() as u32,
            data: Cow::Borrowed(&self.packet[..]),
            options: vec![EnhancedPacketOption::Comment(Cow::Borrowed(
                rec.direction.as_str(),
            ))],
        };
        let path = &self.path;
        self.writer
            .write_pcapng_block(block)
            .map_err(|source| pcap_err(path, source))?;
        Ok(())
    }

    /// Pushes buffered blocks to the file, so that a reader sees every frame written so far.
    pub fn flush(&mut self) -> Result<(), CaptureError> {
        let path = &self.path;
        self.writer
            .get_mut()
            .flush()
            .map_err(|source| CaptureError::Io {
                path: path.clone(),
                source,
            })
    }

    /// Flushes and closes the file. A failure (disk full, ...) is logged, not
    /// returned; use [`PcapngCapture::close`] to handle it.
    pub fn finish(self) {
        let path = self.path.clone();
        if let Err(e) = self.close() {
            tracing::warn!(path = %path.display(), "capture not written completely: {e}");
        }
    }

    /// Flushes and closes the file, reporting a failure to write the buffered blocks.
    pub fn close(self) -> Result<(), CaptureError> {
        let path = self.path;
        let file = self
            .writer
            .into_inner()
            .into_inner()
            .map_err(|e| CaptureError::Io {
                path: path.clone(),
                source: e.into_error(),
            })?;
        drop(file);
        Ok(())
    }

    fn add_interface(&mut self, link_name: &str) -> Result<u32, CaptureError> {
        check_link_name(link_name)?;
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::from(self.format.linktype()),
            snaplen: 0, // no limit
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Owned(link_name.to_owned())),
                InterfaceDescriptionOption::IfDescription(Cow::Borrowed(self.format.description())),
                // pcap-file writes EPB timestamps as nanoseconds; tell readers so.
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        };
        let path = &self.path;
        self.writer
            .write_pcapng_block(idb)
            .map_err(|source| pcap_err(path, source))?;
        self.links.push(link_name.to_owned());
        Ok((self.links.len() - 1) as u32)
    }
}

/// `LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR`: a 4-byte direction, then an H4 packet.
pub const LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR: u32 = 201;
/// H4 packet type of HCI ACL data.
pub const H4_ACL: u8 = 0x02;
/// The L2CAP fixed channel of ATT on LE.
pub const L2CAP_CID_ATT: u16 = 0x0004;
/// The connection handle every synthesized ACL packet carries (one link per interface).
pub const ACL_CONNECTION_HANDLE: u16 = 0x0040;

/// Appends the direction pseudo-header, H4 type, ACL and L2CAP headers and
/// the ATT PDU. None when the PDU does not fit one ACL packet (65531 bytes;
/// an ATT PDU is at most 517).
pub fn encode_h4_att(out: &mut Vec<u8>, direction: Direction, pdu: &[u8]) -> Option<()> {
    let l2cap_len = u16::try_from(pdu.len()).ok()?;
    let acl_len = l2cap_len.checked_add(4)?;
    let (sent, boundary) = match direction {
        Direction::Request => (0u32, 0b00u16),
        Direction::Response => (1u32, 0b10u16),
    };
    out.extend_from_slice(&sent.to_be_bytes());
    out.push(H4_ACL);
    out.extend_from_slice(&(ACL_CONNECTION_HANDLE | (boundary << 12)).to_le_bytes());
    out.extend_from_slice(&acl_len.to_le_bytes());
    out.extend_from_slice(&l2cap_len.to_le_bytes());
    out.extend_from_slice(&L2CAP_CID_ATT.to_le_bytes());
    out.extend_from_slice(pdu);
    Some(())
}

fn check_link_name(name: &str) -> Result<(), CaptureError> {
    if name.len() > MAX_LINK_NAME_LEN {
        return Err(CaptureError::LinkNameTooLong { len: name.len() });
    }
    Ok(())
}

fn pcap_err(path: &Path, source: PcapError) -> CaptureError {
    match source {
        PcapError::IoError(source) => CaptureError::Io {
            path: path.to_owned(),
            source,
        },
        source => CaptureError::Pcap {
            path: path.to_owned(),
            source,
        },
    }
}

/// Appends one exported-PDU TLV; the value is zero-padded to 4 bytes and the
/// length field includes the padding (as Wireshark's own exporter does).
fn push_tlv(out: &mut Vec<u8>, tag: u16, value: &[u8]) {
    let padded = value.len().div_ceil(4) * 4;
    debug_assert!(padded <= u16::MAX as usize);
    out.extend_from_slice(&tag.to_be_bytes());
    out.extend_from_slice(&(padded as u16).to_be_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + (padded - value.len()), 0);
}

/// Writes the exported-PDU TLV header that routes the frame to `mbrtu`.
pub fn encode_exported_pdu_header(out: &mut Vec<u8>, direction: Direction) {
    let (src, dst) = match direction {
        Direction::Request => (MASTER_PORT, DEVICE_PORT),
        Direction::Response => (DEVICE_PORT, MASTER_PORT),
    };
    push_tlv(out, EXP_PDU_TAG_DISSECTOR_NAME, MBRTU_DISSECTOR.as_bytes());
    push_tlv(out, EXP_PDU_TAG_PORT_TYPE, &EXP_PDU_PT_TCP.to_be_bytes());
    push_tlv(out, EXP_PDU_TAG_SRC_PORT, &src.to_be_bytes());
    push_tlv(out, EXP_PDU_TAG_DST_PORT, &dst.to_be_bytes());
    out.extend_from_slice(&EXP_PDU_TAG_END_OF_OPT.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcapng::{Block, PcapNgReader};

    #[test]
    fn exported_pdu_header_layout() {
        let mut h = Vec::new();
        encode_exported_pdu_header(&mut h, Direction::Request);
        #[rustfmt::skip]
        let want: &[u8] = &[
            0, 12, 0, 8, b'm', b'b', b'r', b't', b'u', 0, 0, 0,
            0, 24, 0, 4, 0, 0, 0, 2,
            0, 25, 0, 4, 0, 0, 0xC4, 0x18, // 50200
            0, 26, 0, 4, 0, 0, 0x01, 0xF6, // 502
            0, 0, 0, 0,
        ];
        assert_eq!(h, want);

        let mut r = Vec::new();
        encode_exported_pdu_header(&mut r, Direction::Response);
        assert_eq!(
            &r[20..36],
            &[0, 25, 0, 4, 0, 0, 0x01, 0xF6, 0, 26, 0, 4, 0, 0, 0xC4, 0x18]
        );
    }

    #[test]
    fn file_round_trips_through_pcap_file_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.pcapng");
        let mut cap = PcapngCapture::create(&path, "bus0").unwrap();
        let req = FrameRecord::new(
            "bus0",
            Direction::Request,
            1_700_000_000_123_456_789,
            vec![1, 3, 0, 0, 0, 0x2F, 0x04, 0x1E],
        );
        let rsp = FrameRecord::new(
            "bus1",
            Direction::Response,
            1_700_000_000_223_456_789,
            vec![1, 0x83, 2, 0xC0, 0xF1],
        );
        cap.write(&req).unwrap();
        cap.write(&rsp).unwrap();
        cap.finish(); // what the scenario runner calls; the file must be complete after it

        let mut reader = PcapNgReader::new(File::open(&path).unwrap()).unwrap();
        let mut idbs = Vec::new();
        let mut epbs = Vec::new();
        while let Some(block) = reader.next_block() {
            match block.unwrap() {
                Block::InterfaceDescription(i) => idbs.push(i.into_owned()),
                Block::EnhancedPacket(p) => epbs.push(p.into_owned()),
                other => panic!("unexpected block {other:?}"),
            }
        }
        assert_eq!(idbs.len(), 2);
        for (idb, name) in idbs.iter().zip(["bus0", "bus1"]) {
            assert_eq!(idb.linktype, DataLink::WIRESHARK_UPPER_PDU);
            assert!(idb
                .options
                .contains(&InterfaceDescriptionOption::IfTsResol(9)));
            assert!(idb
                .options
                .contains(&InterfaceDescriptionOption::IfName(Cow::Borrowed(name))));
        }
        assert_eq!(epbs.len(), 2);
        for (epb, (rec, id)) in epbs.iter().zip([(&req, 0u32), (&rsp, 1)]) {
            assert_eq!(epb.interface_id, id);
            assert_eq!(epb.timestamp, Duration::from_nanos(rec.timestamp_ns));
            assert!(epb.data.ends_with(&rec.bytes));
            assert_eq!(epb.data.len(), 40 + rec.bytes.len());
            assert_eq!(epb.original_len as usize, epb.data.len());
            assert_eq!(
                epb.options,
                vec![EnhancedPacketOption::Comment(Cow::Borrowed(
                    rec.direction.as_str()
                ))]
            );
        }
    }

    #[test]
    fn att_pdu_is_wrapped_in_h4_acl_and_l2cap() {
        let mut out = Vec::new();
        encode_h4_att(&mut out, Direction::Response, &[0x1B, 0x0C, 0x00, 0xAA]).unwrap();
        #[rustfmt::skip]
        let want: &[u8] = &[
            0, 0, 0, 1,        // received by hci0
            0x02,              // H4 ACL
            0x40, 0x20,        // handle 0x040, first flushable
            0x08, 0x00,        // ACL length
            0x04, 0x00,        // L2CAP length
            0x04, 0x00,        // CID 4: ATT
            0x1B, 0x0C, 0x00, 0xAA,
        ];
        assert_eq!(out, want);
        out.clear();
        encode_h4_att(&mut out, Direction::Request, &[0x52, 0x0F, 0x00]).unwrap();
        assert_eq!(&out[..7], &[0, 0, 0, 0, 0x02, 0x40, 0x00]);
        assert!(encode_h4_att(&mut Vec::new(), Direction::Request, &vec![0; 70_000]).is_none());
    }

    #[test]
    fn overlong_link_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            PcapngCapture::create(&dir.path().join("x.pcapng"), &"x".repeat(5000)).unwrap_err();
        assert!(
            matches!(err, CaptureError::LinkNameTooLong { len: 5000 }),
            "{err}"
        );
    }
}
