//! BACnet/SC (ASHRAE 135 Annex AB) BVLC message codec.
//!
//! Sans-IO: this module only turns byte slices into [`BvlcMessage`]s and back. It knows
//! nothing about WebSockets, TLS, timers or connections; the caller hands it the payload
//! of one binary WebSocket message and gets bytes back to send.
//!
//! Wire layout (every multi-byte field is **big-endian**, network order):
//!
//! ```text
//! Function(1) | Control(1) | MessageID(2) | [Originating VMAC(6)] | [Destination VMAC(6)]
//!   | [Destination options] | [Data options] | payload
//! ```
//!
//! Control bits: `0x08` originating VMAC present, `0x04` destination VMAC present, `0x02`
//! destination options present, `0x01` data options present; the high nibble is reserved
//! and must be zero. A header option starts with a marker octet: `0x80` more options follow,
//! `0x40` must-understand, `0x20` has data (then Length(2) + data), low 5 bits the type
//! (1 Secure Path, no data; 31 Proprietary, data = VendorID(2) + type(1) + bytes).
//!
//! Byte-order quirk: one open C implementation writes MaxBVLC, MaxNPDU and the BVLC-Result
//! error class/code in host order, i.e. little-endian on x86. A big-endian reader then sees
//! MaxBVLC 1500 (`05 DC`) as 56325 (`DC 05`), and error class 7 as 1792. This codec always
//! writes and reads big-endian; [`swap_quirk`] and [`is_node_duplicate_vmac`] help a test
//! bench recognise (and report) the swapped form instead of silently accepting it.
//!
//! Decoding never panics: every read is bounds-checked and all errors are typed
//! ([`BvlcError`]). `decode(encode(m)) == m` holds for every message `encode` accepts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------
// Function codes, control bits, option bits
// ---------------------------------------------------------------------------------------

/// BVLC-SC function codes (Annex AB.2).
pub mod function {
    pub const RESULT: u8 = 0x00;
    pub const ENCAPSULATED_NPDU: u8 = 0x01;
    pub const ADDRESS_RESOLUTION: u8 = 0x02;
    pub const ADDRESS_RESOLUTION_ACK: u8 = 0x03;
    pub const ADVERTISEMENT: u8 = 0x04;
    pub const ADVERTISEMENT_SOLICITATION: u8 = 0x05;
    pub const CONNECT_REQUEST: u8 = 0x06;
    pub const CONNECT_ACCEPT: u8 = 0x07;
    pub const DISCONNECT_REQUEST: u8 = 0x08;
    pub const DISCONNECT_ACK: u8 = 0x09;
    pub const HEARTBEAT_REQUEST: u8 = 0x0A;
    pub const HEARTBEAT_ACK: u8 = 0x0B;
    pub const PROPRIETARY_MESSAGE: u8 = 0x0C;
}

/// Control octet bits.
pub mod control {
    pub const ORIGINATING_VMAC: u8 = 0x08;
    pub const DESTINATION_VMAC: u8 = 0x04;
    pub const DESTINATION_OPTIONS: u8 = 0x02;
    pub const DATA_OPTIONS: u8 = 0x01;
    pub const RESERVED: u8 = 0xF0;
}

/// Header option marker bits and types.
pub mod option {
    pub const MORE_FOLLOWS: u8 = 0x80;
    pub const MUST_UNDERSTAND: u8 = 0x40;
    pub const HAS_DATA: u8 = 0x20;
    pub const TYPE_MASK: u8 = 0x1F;
    pub const TYPE_SECURE_PATH: u8 = 1;
    pub const TYPE_PROPRIETARY: u8 = 31;
}

/// Fixed header length (function, control, message ID).
pub const FIXED_HEADER_LEN: usize = 4;

// ---------------------------------------------------------------------------------------
// Error classes and codes (BACnetErrorClass / BACnetErrorCode, ASHRAE 135 clause 21)
// ---------------------------------------------------------------------------------------

/// BACnetErrorClass `communication`.
pub const ERROR_CLASS_COMMUNICATION: u16 = 7;

/// BACnetErrorClass `security`.
pub const ERROR_CLASS_SECURITY: u16 = 4;

/// BACnetErrorCode values a hub or node needs in BVLC-Result NAKs.
pub mod error_code {
    pub const OTHER: u16 = 0;
    /// `authentication-failed` (class security): a node's Connect-Request
    /// names a Device UUID its certificate does not carry.
    pub const AUTHENTICATION_FAILED: u16 = 1;
    pub const OPTIONAL_FUNCTIONALITY_NOT_SUPPORTED: u16 = 45;
    /// `message-too-long`. Note: one implementation wrongly sends this value (113) for
    /// node-duplicate-vmac.
    pub const MESSAGE_TOO_LONG: u16 = 113;
    pub const BVLC_FUNCTION_UNKNOWN: u16 = 143;
    pub const BVLC_PROPRIETARY_FUNCTION_UNKNOWN: u16 = 144;
    pub const HEADER_ENCODING_ERROR: u16 = 145;
    pub const HEADER_NOT_UNDERSTOOD: u16 = 146;
    pub const MESSAGE_INCOMPLETE: u16 = 147;
    pub const NOT_A_BACNET_SC_HUB: u16 = 148;
    pub const PAYLOAD_EXPECTED: u16 = 149;
    pub const UNEXPECTED_DATA: u16 = 150;
    /// `node-duplicate-vmac`, the standard's value.
    pub const NODE_DUPLICATE_VMAC: u16 = 151;
}

/// Byte-swap a 16-bit field, to recognise values written in little-endian host order.
pub const fn swap_quirk(v: u16) -> u16 {
    v.swap_bytes()
}

/// True for every form of node-duplicate-vmac seen on the wire: the standard's 151, the
/// 113 one implementation sends, and both byte-swapped.
pub fn is_node_duplicate_vmac(code: u16) -> bool {
    [
        error_code::NODE_DUPLICATE_VMAC,
        error_code::MESSAGE_TOO_LONG,
    ]
    .iter()
    .any(|&c| code == c || code == swap_quirk(c))
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Which header-option list an error refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptionList {
    Destination,
    Data,
}

impl fmt::Display for OptionList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptionList::Destination => "destination",
            OptionList::Data => "data",
        })
    }
}

/// Every way decoding or encoding can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BvlcError {
    #[error("BVLC-SC message too short: {len} bytes, the fixed header needs 4")]
    TooShort { len: usize },
    #[error("reserved control bits set: control octet 0x{control:02X}")]
    ReservedControlBits { control: u8 },
    #[error("message truncated in {field}: needs {needed} bytes at offset {offset}, {available} available")]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("{list} option list truncated: option marker expected at offset {offset}")]
    TruncatedOption { list: OptionList, offset: usize },
    #[error("{list} option at offset {offset}: data length field truncated")]
    TruncatedOptionLength { list: OptionList, offset: usize },
    #[error("{list} option at offset {offset}: data length {declared} overruns the message ({available} bytes left)")]
    OptionDataOverrun {
        list: OptionList,
        offset: usize,
        declared: usize,
        available: usize,
    },
    #[error("{list} option at offset {offset}: Secure Path option must not carry data")]
    SecurePathWithData { list: OptionList, offset: usize },
    #[error("{list} option at offset {offset}: proprietary option needs data of at least 3 bytes (vendor ID, type), got {len}")]
    ProprietaryOptionTooShort {
        list: OptionList,
        offset: usize,
        len: usize,
    },
    #[error("data options present on function 0x{function:02X}; they are only allowed on Encapsulated-NPDU")]
    DataOptionsNotAllowed { function: u8 },
    #[error("invalid UTF-8 in {field}")]
    InvalidUtf8 { field: &'static str },
    #[error("payload length {actual} is wrong for function 0x{function:02X} ({name}): expected {expected}")]
    PayloadLength {
        function: u8,
        name: &'static str,
        expected: &'static str,
        actual: usize,
    },
    #[error(
        "Address-Resolution-ACK URI list has an empty entry (leading, trailing or doubled space)"
    )]
    EmptyUri,
    #[error("BVLC-Result code {0} is neither 0 (ACK) nor 1 (NAK)")]
    InvalidResultCode(u8),
    #[error("Advertisement hub connection status {0} is not 0, 1 or 2")]
    InvalidHubStatus(u8),
    #[error("Advertisement accept-direct-connections {0} is not 0 or 1")]
    InvalidAcceptDirect(u8),
    // --- encode-only ---
    #[error("cannot encode: header option type {0} does not fit in 5 bits")]
    OptionTypeOutOfRange(u8),
    #[error("cannot encode: Unknown header option uses reserved known type {0} (use SecurePath/Proprietary)")]
    OptionTypeIsKnown(u8),
    #[error("cannot encode: header option data of {len} bytes exceeds 65535")]
    OptionDataTooLong { len: usize },
    #[error("cannot encode: Unknown function 0x{0:02X} is a known function code")]
    FunctionIsKnown(u8),
    #[error("cannot encode: address-resolution URI {0:?} is empty or contains a space")]
    InvalidUri(String),
}

impl BvlcError {
    /// The BACnetErrorCode (class communication) a receiver should put in a NAK for this
    /// decode failure.
    pub fn nak_code(&self) -> u16 {
        use error_code::*;
        match self {
            BvlcError::TooShort { .. }
            | BvlcError::Truncated { .. }
            | BvlcError::TruncatedOption { .. }
            | BvlcError::TruncatedOptionLength { .. }
            | BvlcError::OptionDataOverrun { .. } => MESSAGE_INCOMPLETE,
            BvlcError::ReservedControlBits { .. }
            | BvlcError::SecurePathWithData { .. }
            | BvlcError::ProprietaryOptionTooShort { .. }
            | BvlcError::DataOptionsNotAllowed { .. } => HEADER_ENCODING_ERROR,
            BvlcError::EmptyUri | BvlcError::InvalidUtf8 { .. } => OTHER,
            BvlcError::PayloadLength { actual: 0, .. } => PAYLOAD_EXPECTED,
            BvlcError::PayloadLength { .. } => UNEXPECTED_DATA,
            _ => OTHER,
        }
    }
}

// ---------------------------------------------------------------------------------------
// VMAC and Device UUID
// ---------------------------------------------------------------------------------------

/// Error parsing a [`Vmac`] or [`DeviceUuid`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: {text:?}")]
pub struct ParseIdError {
    pub what: &'static str,
    pub text: String,
}

/// 6-octet BACnet/SC virtual MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Vmac(pub [u8; 6]);

impl Vmac {
    /// Local broadcast FF:FF:FF:FF:FF:FF.
    pub const BROADCAST: Vmac = Vmac([0xFF; 6]);
    /// Reserved all-zero VMAC.
    pub const RESERVED: Vmac = Vmac([0; 6]);

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }
    pub fn is_reserved(&self) -> bool {
        *self == Self::RESERVED
    }
    /// Locally administered unicast (how random VMACs are generated).
    pub fn is_local_unicast(&self) -> bool {
        self.0[0] & 0x03 == 0x02
    }
}

impl fmt::Display for Vmac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

fn hex_nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex_byte(s: &[u8]) -> Option<u8> {
    match s {
        [h, l] => Some(hex_nibble(*h)? << 4 | hex_nibble(*l)?),
        _ => None,
    }
}

impl FromStr for Vmac {
    type Err = ParseIdError;
    /// Accepts `aa:bb:cc:dd:ee:ff` (or `-` separated), case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIdError {
            what: "VMAC",
            text: s.to_string(),
        };
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for slot in out.iter_mut() {
            *slot = hex_byte(parts.next().ok_or_else(err)?.as_bytes()).ok_or_else(err)?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Vmac(out))
    }
}

/// 16-octet device UUID, persistent across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceUuid(pub [u8; 16]);

impl fmt::Display for DeviceUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for DeviceUuid {
    type Err = ParseIdError;
    /// Accepts the 8-4-4-4-12 hyphenated form, case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIdError {
            what: "device UUID",
            text: s.to_string(),
        };
        let b = s.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b.get(i) != Some(&b'-')) {
            return Err(err());
        }
        let mut out = [0u8; 16];
        let mut hex = b.iter().copied().filter(|&c| c != b'-');
        for slot in out.iter_mut() {
            let (h, l) = (hex.next().ok_or_else(err)?, hex.next().ok_or_else(err)?);
            *slot = hex_byte(&[h, l]).ok_or_else(err)?;
        }
        if hex.next().is_some() {
            return Err(err());
        }
        Ok(DeviceUuid(out))
    }
}

// ---------------------------------------------------------------------------------------
// Header options
// ---------------------------------------------------------------------------------------

/// What a header option is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeaderOptionKind {
    /// Type 1, no data.
    SecurePath,
    /// Type 31: VendorID(2) + type(1) + data.
    Proprietary {
        vendor_id: u16,
        option_type: u8,
        data: Vec<u8>,
    },
    /// Any other type (5 bits, not 1 or 31); `data` is `Some` when the has-data bit is set.
    Unknown {
        option_type: u8,
        data: Option<Vec<u8>>,
    },
}

/// One header option (destination or data option).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderOption {
    pub must_understand: bool,
    pub kind: HeaderOptionKind,
}

impl HeaderOption {
    pub fn secure_path() -> Self {
        HeaderOption {
            must_understand: true,
            kind: HeaderOptionKind::SecurePath,
        }
    }

    /// The 5-bit option type.
    pub fn option_type(&self) -> u8 {
        match &self.kind {
            HeaderOptionKind::SecurePath => option::TYPE_SECURE_PATH,
            HeaderOptionKind::Proprietary { .. } => option::TYPE_PROPRIETARY,
            HeaderOptionKind::Unknown { option_type, .. } => *option_type,
        }
    }

    /// The marker octet as it is encoded without the more-follows bit (this is the value
    /// a NAK's error header marker carries).
    pub fn marker(&self) -> u8 {
        let mut m = self.option_type() & option::TYPE_MASK;
        if self.must_understand {
            m |= option::MUST_UNDERSTAND;
        }
        let has_data = match &self.kind {
            HeaderOptionKind::SecurePath => false,
            HeaderOptionKind::Proprietary { .. } => true,
            HeaderOptionKind::Unknown { data, .. } => data.is_some(),
        };
        if has_data {
            m |= option::HAS_DATA;
        }
        m
    }
}

// ---------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------

/// BVLC-Result outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BvlcResult {
    Ack,
    Nak {
        header_marker: u8,
        error_class: u16,
        error_code: u16,
        details: String,
    },
}

/// Hub connection status carried in an Advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubStatus {
    NoHubConnection = 0,
    ConnectedToPrimary = 1,
    ConnectedToFailover = 2,
}

/// Payload of every BVLC-SC message, one variant per function code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BvlcPayload {
    Result {
        for_function: u8,
        result: BvlcResult,
    },
    EncapsulatedNpdu(Vec<u8>),
    AddressResolution,
    AddressResolutionAck(Vec<String>),
    Advertisement {
        hub_status: HubStatus,
        accept_direct: bool,
        max_bvlc: u16,
        max_npdu: u16,
    },
    AdvertisementSolicitation,
    ConnectRequest {
        vmac: Vmac,
        uuid: DeviceUuid,
        max_bvlc: u16,
        max_npdu: u16,
    },
    ConnectAccept {
        vmac: Vmac,
        uuid: DeviceUuid,
        max_bvlc: u16,
        max_npdu: u16,
    },
    DisconnectRequest,
    DisconnectAck,
    HeartbeatRequest,
    HeartbeatAck,
    Proprietary {
        vendor_id: u16,
        function: u8,
        data: Vec<u8>,
    },
    /// A function code this codec does not know (0x0D..=0xFF), kept so a hub can NAK it
    /// with bvlc-function-unknown.
    Unknown {
        function: u8,
        data: Vec<u8>,
    },
}

impl BvlcPayload {
    /// The function code of this payload.
    pub fn function(&self) -> u8 {
        use function::*;
        match self {
            BvlcPayload::Result { .. } => RESULT,
            BvlcPayload::EncapsulatedNpdu(_) => ENCAPSULATED_NPDU,
            BvlcPayload::AddressResolution => ADDRESS_RESOLUTION,
            BvlcPayload::AddressResolutionAck(_) => ADDRESS_RESOLUTION_ACK,
            BvlcPayload::Advertisement { .. } => ADVERTISEMENT,
            BvlcPayload::AdvertisementSolicitation => ADVERTISEMENT_SOLICITATION,
            BvlcPayload::ConnectRequest { .. } => CONNECT_REQUEST,
            BvlcPayload::ConnectAccept { .. } => CONNECT_ACCEPT,
            BvlcPayload::DisconnectRequest => DISCONNECT_REQUEST,
            BvlcPayload::DisconnectAck => DISCONNECT_ACK,
            BvlcPayload::HeartbeatRequest => HEARTBEAT_REQUEST,
            BvlcPayload::HeartbeatAck => HEARTBEAT_ACK,
            BvlcPayload::Proprietary { .. } => PROPRIETARY_MESSAGE,
            BvlcPayload::Unknown { function, .. } => *function,
        }
    }
}

/// Human-readable name of a function code.
pub fn function_name(function: u8) -> &'static str {
    use function::*;
    match function {
        RESULT => "BVLC-Result",
        ENCAPSULATED_NPDU => "Encapsulated-NPDU",
        ADDRESS_RESOLUTION => "Address-Resolution",
        ADDRESS_RESOLUTION_ACK => "Address-Resolution-ACK",
        ADVERTISEMENT => "Advertisement",
        ADVERTISEMENT_SOLICITATION => "Advertisement-Solicitation",
        CONNECT_REQUEST => "Connect-Request",
        CONNECT_ACCEPT => "Connect-Accept",
        DISCONNECT_REQUEST => "Disconnect-Request",
        DISCONNECT_ACK => "Disconnect-ACK",
        HEARTBEAT_REQUEST => "Heartbeat-Request",
        HEARTBEAT_ACK => "Heartbeat-ACK",
        PROPRIETARY_MESSAGE => "Proprietary-Message",
        _ => "unknown",
    }
}

/// One BVLC-SC message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BvlcMessage {
    pub message_id: u16,
    pub originating: Option<Vmac>,
    pub destination: Option<Vmac>,
    pub destination_options: Vec<HeaderOption>,
    /// Only allowed on Encapsulated-NPDU (and passed through on unknown functions).
    pub data_options: Vec<HeaderOption>,
    pub payload: BvlcPayload,
}

impl BvlcMessage {
    /// A message with no addresses and no options.
    pub fn new(message_id: u16, payload: BvlcPayload) -> Self {
        BvlcMessage {
            message_id,
            originating: None,
            destination: None,
            destination_options: Vec::new(),
            data_options: Vec::new(),
            payload,
        }
    }

    /// The function code.
    pub fn function(&self) -> u8 {
        self.payload.function()
    }
}

/// True for functions that are themselves responses and must never be answered with a
/// BVLC-Result: Result, Address-Resolution-ACK, Connect-Accept, Disconnect-ACK, Heartbeat-ACK.
pub fn is_response(function: u8) -> bool {
    matches!(
        function,
        function::RESULT
            | function::ADDRESS_RESOLUTION_ACK
            | function::CONNECT_ACCEPT
            | function::DISCONNECT_ACK
            | function::HEARTBEAT_ACK
    )
}

/// The first must-understand header option (destination options first, then data options)
/// this codec does not understand, i.e. anything other than Secure Path. The receiver that
/// consumes a message must NAK it with header-not-understood; a hub merely relaying a
/// message does not process its options.
pub fn unknown_must_understand(msg: &BvlcMessage) -> Option<&HeaderOption> {
    msg.destination_options
        .iter()
        .chain(msg.data_options.iter())
        .find(|o| o.must_understand && !matches!(o.kind, HeaderOptionKind::SecurePath))
}

/// Build the BVLC-Result NAK answering `request`: same message ID, `for_function` = the
/// request's function, destination = the request's originating VMAC (if it came through a
/// hub), error header marker 0 (use [`nak_for_option`] when an option caused it).
pub fn nak(request: &BvlcMessage, error_class: u16, error_code: u16, details: &str) -> BvlcMessage {
    nak_with_marker(request, 0, error_class, error_code, details)
}

/// NAK for a must-understand option that was not understood (header-not-understood), with
/// the option's marker octet as error header marker.
pub fn nak_for_option(request: &BvlcMessage, opt: &HeaderOption, details: &str) -> BvlcMessage {
    nak_with_marker(
        request,
        opt.marker(),
        ERROR_CLASS_COMMUNICATION,
        error_code::HEADER_NOT_UNDERSTOOD,
        details,
    )
}

fn nak_with_marker(
    request: &BvlcMessage,
    header_marker: u8,
    error_class: u16,
    error_code: u16,
    details: &str,
) -> BvlcMessage {
    BvlcMessage {
        message_id: request.message_id,
        originating: None,
        destination: request.originating,
        destination_options: Vec::new(),
        data_options: Vec::new(),
        payload: BvlcPayload::Result {
            for_function: request.function(),
            result: BvlcResult::Nak {
                header_marker,
                error_class,
                error_code,
                details: details.to_string(),
            },
        },
    }
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], BvlcError> {
        let rest = self.buf.get(self.pos..).unwrap_or(&[]);
        match rest.get(..n) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(BvlcError::Truncated {
                field,
                offset: self.pos,
                needed: n,
                available: rest.len(),
            }),
        }
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], BvlcError> {
        let s = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, BvlcError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, BvlcError> {
        Ok(u16::from_be_bytes(self.array::<2>(field)?))
    }
    fn rest(&mut self) -> &'a [u8] {
        let r = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        r
    }
}

/// Walks one option list starting at `pos`, calling `f(marker, data, offset)` per option;
/// returns the offset just past the list.
fn walk_options<'a>(
    buf: &'a [u8],
    mut pos: usize,
    list: OptionList,
    mut f: impl FnMut(u8, Option<&'a [u8]>, usize) -> Result<(), BvlcError>,
) -> Result<usize, BvlcError> {
    loop {
        let at = pos;
        let marker = *buf
            .get(pos)
            .ok_or(BvlcError::TruncatedOption { list, offset: pos })?;
        pos += 1;
        let data = if marker & option::HAS_DATA != 0 {
            let len_bytes = buf
                .get(pos..pos.saturating_add(2))
                .ok_or(BvlcError::TruncatedOptionLength { list, offset: at })?;
            let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
            pos += 2;
            let available = buf.len().saturating_sub(pos);
            let d = buf
                .get(pos..pos.saturating_add(len))
                .ok_or(BvlcError::OptionDataOverrun {
                    list,
                    offset: at,
                    declared: len,
                    available,
                })?;
            pos += len;
            Some(d)
        } else {
            None
        };
        f(marker, data, at)?;
        if marker & option::MORE_FOLLOWS == 0 {
            return Ok(pos);
        }
    }
}

fn check_option(
    marker: u8,
    data: Option<&[u8]>,
    list: OptionList,
    offset: usize,
) -> Result<(), BvlcError> {
    match (marker & option::TYPE_MASK, data) {
        (option::TYPE_SECURE_PATH, Some(_)) => Err(BvlcError::SecurePathWithData { list, offset }),
        (option::TYPE_PROPRIETARY, d) => {
            let len = d.map_or(0, <[u8]>::len);
            if len < 3 {
                Err(BvlcError::ProprietaryOptionTooShort { list, offset, len })
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

fn decode_options(r: &mut Reader<'_>, list: OptionList) -> Result<Vec<HeaderOption>, BvlcError> {
    let mut out = Vec::new();
    let end = walk_options(r.buf, r.pos, list, |marker, data, offset| {
        check_option(marker, data, list, offset)?;
        let kind = match (marker & option::TYPE_MASK, data) {
            (option::TYPE_SECURE_PATH, _) => HeaderOptionKind::SecurePath,
            (option::TYPE_PROPRIETARY, Some(d)) => match d {
                [v0, v1, t, rest @ ..] => HeaderOptionKind::Proprietary {
                    vendor_id: u16::from_be_bytes([*v0, *v1]),
                    option_type: *t,
                    data: rest.to_vec(),
                },
                _ => {
                    return Err(BvlcError::ProprietaryOptionTooShort {
                        list,
                        offset,
                        len: d.len(),
                    })
                }
            },
            (t, d) => HeaderOptionKind::Unknown {
                option_type: t,
                data: d.map(<[u8]>::to_vec),
            },
        };
        out.push(HeaderOption {
            must_understand: marker & option::MUST_UNDERSTAND != 0,
            kind,
        });
        Ok(())
    })?;
    r.pos = end;
    Ok(out)
}

fn expect_len(
    function: u8,
    payload: &[u8],
    want: usize,
    expected: &'static str,
) -> Result<(), BvlcError> {
    if payload.len() == want {
        Ok(())
    } else {
        Err(BvlcError::PayloadLength {
            function,
            name: function_name(function),
            expected,
            actual: payload.len(),
        })
    }
}

fn utf8(bytes: &[u8], field: &'static str) -> Result<String, BvlcError> {
    std::str::from_utf8(bytes)
        .map(str::to_string)
        .map_err(|_| BvlcError::InvalidUtf8 { field })
}

/// Decode one BVLC-SC message (the whole payload of one binary WebSocket message).
pub fn decode(frame: &[u8]) -> Result<BvlcMessage, BvlcError> {
    if frame.len() < FIXED_HEADER_LEN {
        return Err(BvlcError::TooShort { len: frame.len() });
    }
    let mut r = Reader { buf: frame, pos: 0 };
    let func = r.u8("function")?;
    let ctrl = r.u8("control")?;
    let message_id = r.u16("message ID")?;
    if ctrl & control::RESERVED != 0 {
        return Err(BvlcError::ReservedControlBits { control: ctrl });
    }
    let originating = if ctrl & control::ORIGINATING_VMAC != 0 {
        Some(Vmac(r.array("originating VMAC")?))
    } else {
        None
    };
    let destination = if ctrl & control::DESTINATION_VMAC != 0 {
        Some(Vmac(r.array("destination VMAC")?))
    } else {
        None
    };
    let destination_options = if ctrl & control::DESTINATION_OPTIONS != 0 {
        decode_options(&mut r, OptionList::Destination)?
    } else {
        Vec::new()
    };
    if ctrl & control::DATA_OPTIONS != 0 && !data_options_allowed(func) {
        return Err(BvlcError::DataOptionsNotAllowed { function: func });
    }
    let data_options = if ctrl & control::DATA_OPTIONS != 0 {
        decode_options(&mut r, OptionList::Data)?
    } else {
        Vec::new()
    };
    let p = r.rest();
    let payload = decode_payload(func, p)?;
    Ok(BvlcMessage {
        message_id,
        originating,
        destination,
        destination_options,
        data_options,
        payload,
    })
}

fn data_options_allowed(func: u8) -> bool {
    func == function::ENCAPSULATED_NPDU || func > function::PROPRIETARY_MESSAGE
}

fn decode_payload(func: u8, p: &[u8]) -> Result<BvlcPayload, BvlcError> {
    use function::*;
    let empty = |payload| expect_len(func, p, 0, "no payload").map(|_| payload);
    Ok(match func {
        RESULT => {
            let mut r = Reader { buf: p, pos: 0 };
            let short = |_| BvlcError::PayloadLength {
                function: func,
                name: function_name(func),
                expected: "2 (ACK) or at least 7 (NAK)",
                actual: p.len(),
            };
            let for_function = r.u8("result for-function").map_err(short)?;
            let code = r.u8("result code").map_err(short)?;
            let result = match code {
                0 => {
                    expect_len(func, p, 2, "2 (ACK)")?;
                    BvlcResult::Ack
                }
                1 => {
                    let header_marker = r.u8("error header marker").map_err(short)?;
                    let error_class = r.u16("error class").map_err(short)?;
                    let error_code = r.u16("error code").map_err(short)?;
                    let details = utf8(r.rest(), "BVLC-Result error details")?;
                    BvlcResult::Nak {
                        header_marker,
                        error_class,
                        error_code,
                        details,
                    }
                }
                c => return Err(BvlcError::InvalidResultCode(c)),
            };
            BvlcPayload::Result {
                for_function,
                result,
            }
        }
        ENCAPSULATED_NPDU => {
            if p.is_empty() {
                return Err(BvlcError::PayloadLength {
                    function: func,
                    name: function_name(func),
                    expected: "at least 1 (an NPDU)",
                    actual: 0,
                });
            }
            BvlcPayload::EncapsulatedNpdu(p.to_vec())
        }
        ADDRESS_RESOLUTION => empty(BvlcPayload::AddressResolution)?,
        ADDRESS_RESOLUTION_ACK => {
            let s = std::str::from_utf8(p).map_err(|_| BvlcError::InvalidUtf8 {
                field: "Address-Resolution-ACK URIs",
            })?;
            if s.is_empty() {
                BvlcPayload::AddressResolutionAck(Vec::new())
            } else {
                let uris: Vec<String> = s.split(' ').map(str::to_string).collect();
                if uris.iter().any(String::is_empty) {
                    return Err(BvlcError::EmptyUri);
                }
                BvlcPayload::AddressResolutionAck(uris)
            }
        }
        ADVERTISEMENT => {
            expect_len(func, p, 6, "6")?;
            let hub_status = match p[0] {
                0 => HubStatus::NoHubConnection,
                1 => HubStatus::ConnectedToPrimary,
                2 => HubStatus::ConnectedToFailover,
                s => return Err(BvlcError::InvalidHubStatus(s)),
            };
            let accept_direct = match p[1] {
                0 => false,
                1 => true,
                a => return Err(BvlcError::InvalidAcceptDirect(a)),
            };
            BvlcPayload::Advertisement {
                hub_status,
                accept_direct,
                max_bvlc: u16::from_be_bytes([p[2], p[3]]),
                max_npdu: u16::from_be_bytes([p[4], p[5]]),
            }
        }
        ADVERTISEMENT_SOLICITATION => empty(BvlcPayload::AdvertisementSolicitation)?,
        CONNECT_REQUEST | CONNECT_ACCEPT => {
            expect_len(func, p, 26, "26")?;
            let mut r = Reader { buf: p, pos: 0 };
            let vmac = Vmac(r.array("VMAC")?);
            let uuid = DeviceUuid(r.array("device UUID")?);
            let max_bvlc = r.u16("max BVLC length")?;
            let max_npdu = r.u16("max NPDU length")?;
            if func == CONNECT_REQUEST {
                BvlcPayload::ConnectRequest {
                    vmac,
                    uuid,
                    max_bvlc,
                    max_npdu,
                }
            } else {
                BvlcPayload::ConnectAccept {
                    vmac,
                    uuid,
                    max_bvlc,
                    max_npdu,
                }
            }
        }
        DISCONNECT_REQUEST => empty(BvlcPayload::DisconnectRequest)?,
        DISCONNECT_ACK => empty(BvlcPayload::DisconnectAck)?,
        HEARTBEAT_REQUEST => empty(BvlcPayload::HeartbeatRequest)?,
        HEARTBEAT_ACK => empty(BvlcPayload::HeartbeatAck)?,
        PROPRIETARY_MESSAGE => match p {
            [v0, v1, f, data @ ..] => BvlcPayload::Proprietary {
                vendor_id: u16::from_be_bytes([*v0, *v1]),
                function: *f,
                data: data.to_vec(),
            },
            _ => {
                return Err(BvlcError::PayloadLength {
                    function: func,
                    name: function_name(func),
                    expected: "at least 3 (vendor ID, function)",
                    actual: p.len(),
                })
            }
        },
        _ => BvlcPayload::Unknown {
            function: func,
            data: p.to_vec(),
        },
    })
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

fn encode_options(opts: &[HeaderOption], out: &mut Vec<u8>) -> Result<(), BvlcError> {
    let n = opts.len();
    for (i, o) in opts.iter().enumerate() {
        let mut marker = o.marker();
        if i + 1 < n {
            marker |= option::MORE_FOLLOWS;
        }
        match &o.kind {
            HeaderOptionKind::SecurePath => out.push(marker),
            HeaderOptionKind::Proprietary {
                vendor_id,
                option_type,
                data,
            } => {
                let len =
                    u16::try_from(data.len() + 3).map_err(|_| BvlcError::OptionDataTooLong {
                        len: data.len() + 3,
                    })?;
                out.push(marker);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&vendor_id.to_be_bytes());
                out.push(*option_type);
                out.extend_from_slice(data);
            }
            HeaderOptionKind::Unknown { option_type, data } => {
                if *option_type > option::TYPE_MASK {
                    return Err(BvlcError::OptionTypeOutOfRange(*option_type));
                }
                if *option_type == option::TYPE_SECURE_PATH
                    || *option_type == option::TYPE_PROPRIETARY
                {
                    return Err(BvlcError::OptionTypeIsKnown(*option_type));
                }
                out.push(marker);
                if let Some(d) = data {
                    let len = u16::try_from(d.len())
                        .map_err(|_| BvlcError::OptionDataTooLong { len: d.len() })?;
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(d);
                }
            }
        }
    }
    Ok(())
}

/// Encode `msg`, appending to `out`. On error `out` is restored to its previous length.
pub fn encode_into(msg: &BvlcMessage, out: &mut Vec<u8>) -> Result<(), BvlcError> {
    let start = out.len();
    let r = encode_inner(msg, out);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// Encode `msg` into a new buffer.
pub fn encode(msg: &BvlcMessage) -> Result<Vec<u8>, BvlcError> {
    let mut out = Vec::with_capacity(64);
    encode_into(msg, &mut out)?;
    Ok(out)
}

fn encode_inner(msg: &BvlcMessage, out: &mut Vec<u8>) -> Result<(), BvlcError> {
    use function::*;
    let func = msg.function();
    if let BvlcPayload::Unknown { function, .. } = &msg.payload {
        if *function <= PROPRIETARY_MESSAGE {
            return Err(BvlcError::FunctionIsKnown(*function));
        }
    }
    if !msg.data_options.is_empty() && !data_options_allowed(func) {
        return Err(BvlcError::DataOptionsNotAllowed { function: func });
    }
    let mut ctrl = 0u8;
    if msg.originating.is_some() {
        ctrl |= control::ORIGINATING_VMAC;
    }
    if msg.destination.is_some() {
        ctrl |= control::DESTINATION_VMAC;
    }
    if !msg.destination_options.is_empty() {
        ctrl |= control::DESTINATION_OPTIONS;
    }
    if !msg.data_options.is_empty() {
        ctrl |= control::DATA_OPTIONS;
    }
    out.push(func);
    out.push(ctrl);
    out.extend_from_slice(&msg.message_id.to_be_bytes());
    if let Some(v) = &msg.originating {
        out.extend_from_slice(&v.0);
    }
    if let Some(v) = &msg.destination {
        out.extend_from_slice(&v.0);
    }
    encode_options(&msg.destination_options, out)?;
    encode_options(&msg.data_options, out)?;
    match &msg.payload {
        BvlcPayload::Result {
            for_function,
            result,
        } => {
            out.push(*for_function);
            match result {
                BvlcResult::Ack => out.push(0),
                BvlcResult::Nak {
                    header_marker,
                    error_class,
                    error_code,
                    details,
                } => {
                    out.push(1);
                    out.push(*header_marker);
                    out.extend_from_slice(&error_class.to_be_bytes());
                    out.extend_from_slice(&error_code.to_be_bytes());
                    out.extend_from_slice(details.as_bytes());
                }
            }
        }
        BvlcPayload::EncapsulatedNpdu(npdu) => {
            if npdu.is_empty() {
                return Err(BvlcError::PayloadLength {
                    function: func,
                    name: function_name(func),
                    expected: "at least 1 (an NPDU)",
                    actual: 0,
                });
            }
            out.extend_from_slice(npdu);
        }
        BvlcPayload::AddressResolutionAck(uris) => {
            for (i, u) in uris.iter().enumerate() {
                if u.is_empty() || u.contains(' ') {
                    return Err(BvlcError::InvalidUri(u.clone()));
                }
                if i > 0 {
                    out.push(b' ');
                }
                out.extend_from_slice(u.as_bytes());
            }
        }
        BvlcPayload::Advertisement {
            hub_status,
            accept_direct,
            max_bvlc,
            max_npdu,
        } => {
            out.push(*hub_status as u8);
            out.push(u8::from(*accept_direct));
            out.extend_from_slice(&max_bvlc.to_be_bytes());
            out.extend_from_slice(&max_npdu.to_be_bytes());
        }
        BvlcPayload::ConnectRequest {
            vmac,
            uuid,
            max_bvlc,
            max_npdu,
        }
        | BvlcPayload::ConnectAccept {
            vmac,
            uuid,
            max_bvlc,
            max_npdu,
        } => {
            out.extend_from_slice(&vmac.0);
            out.extend_from_slice(&uuid.0);
            out.extend_from_slice(&max_bvlc.to_be_bytes());
            out.extend_from_slice(&max_npdu.to_be_bytes());
        }
        BvlcPayload::Proprietary {
            vendor_id,
            function,
            data,
        } => {
            out.extend_from_slice(&vendor_id.to_be_bytes());
            out.push(*function);
            out.extend_from_slice(data);
        }
        BvlcPayload::Unknown { data, .. } => out.extend_from_slice(data),
        BvlcPayload::AddressResolution
        | BvlcPayload::AdvertisementSolicitation
        | BvlcPayload::DisconnectRequest
        | BvlcPayload::DisconnectAck
        | BvlcPayload::HeartbeatRequest
        | BvlcPayload::HeartbeatAck => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Hub fast path
// ---------------------------------------------------------------------------------------

/// Rewrite a frame for forwarding by a hub without a full decode: the originating VMAC is
/// inserted (or replaced) with `originating`; the destination VMAC is removed, or kept as is
/// when `keep_destination` (broadcast fan-out). Header options and payload are copied
/// verbatim. The header (control bits, VMACs, option list structure) is validated; the
/// payload is not. The result is appended to `out`; on error `out` is left unchanged.
///
/// For every frame `decode` accepts, the output equals `encode` of the decoded message with
/// `originating = Some(originating)` and `destination` cleared unless `keep_destination`.
pub fn rewrite_for_forwarding(
    frame: &[u8],
    originating: Vmac,
    keep_destination: bool,
    out: &mut Vec<u8>,
) -> Result<(), BvlcError> {
    if frame.len() < FIXED_HEADER_LEN {
        return Err(BvlcError::TooShort { len: frame.len() });
    }
    let func = frame[0];
    let ctrl = frame[1];
    if ctrl & control::RESERVED != 0 {
        return Err(BvlcError::ReservedControlBits { control: ctrl });
    }
    let mut r = Reader {
        buf: frame,
        pos: FIXED_HEADER_LEN,
    };
    if ctrl & control::ORIGINATING_VMAC != 0 {
        r.take(6, "originating VMAC")?;
    }
    let dest = if ctrl & control::DESTINATION_VMAC != 0 {
        Some(r.take(6, "destination VMAC")?)
    } else {
        None
    };
    let opts_start = r.pos;
    let mut pos = opts_start;
    if ctrl & control::DESTINATION_OPTIONS != 0 {
        pos = walk_options(frame, pos, OptionList::Destination, |m, d, at| {
            check_option(m, d, OptionList::Destination, at)
        })?;
    }
    if ctrl & control::DATA_OPTIONS != 0 {
        if !data_options_allowed(func) {
            return Err(BvlcError::DataOptionsNotAllowed { function: func });
        }
        walk_options(frame, pos, OptionList::Data, |m, d, at| {
            check_option(m, d, OptionList::Data, at)
        })?;
    }
    let dest = if keep_destination { dest } else { None };
    let mut new_ctrl =
        (ctrl & (control::DESTINATION_OPTIONS | control::DATA_OPTIONS)) | control::ORIGINATING_VMAC;
    if dest.is_some() {
        new_ctrl |= control::DESTINATION_VMAC;
    }
    let tail = frame.get(opts_start..).unwrap_or(&[]);
    out.reserve(FIXED_HEADER_LEN + 12 + tail.len());
    out.push(func);
    out.push(new_ctrl);
    out.extend_from_slice(&frame[2..4]);
    out.extend_from_slice(&originating.0);
    if let Some(d) = dest {
        out.extend_from_slice(d);
    }
    out.extend_from_slice(tail);
    Ok(())
}

/// Peek the function code, control octet and message ID without decoding the rest.
pub fn peek_header(frame: &[u8]) -> Option<(u8, u8, u16)> {
    match frame {
        [f, c, m0, m1, ..] => Some((*f, *c, u16::from_be_bytes([*m0, *m1]))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: Vmac = Vmac([0x02, 0, 0, 0, 0, 0x01]);
    const V2: Vmac = Vmac([0x02, 0, 0, 0, 0, 0x02]);
    const UUID: DeviceUuid = DeviceUuid([
        0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e,
        0x1f,
    ]);

    fn rt(m: &BvlcMessage) -> Vec<u8> {
        let bytes = encode(m).expect("encode");
        assert_eq!(&decode(&bytes).expect("decode"), m, "bytes {bytes:02X?}");
        bytes
    }

    fn all_payloads() -> Vec<BvlcPayload> {
        vec![
            BvlcPayload::Result {
                for_function: 1,
                result: BvlcResult::Ack,
            },
            BvlcPayload::Result {
                for_function: 6,
                result: BvlcResult::Nak {
                    header_marker: 0,
                    error_class: ERROR_CLASS_COMMUNICATION,
                    error_code: error_code::NODE_DUPLICATE_VMAC,
                    details: "VMAC in use — ü".into(),
                },
            },
            BvlcPayload::EncapsulatedNpdu(vec![1, 0x20, 0xFF, 0xFF, 0, 0xFF, 0x10, 0x08]),
            BvlcPayload::AddressResolution,
            BvlcPayload::AddressResolutionAck(vec![]),
            BvlcPayload::AddressResolutionAck(vec!["wss://a:4443".into(), "wss://[::1]/x".into()]),
            BvlcPayload::Advertisement {
                hub_status: HubStatus::ConnectedToFailover,
                accept_direct: true,
                max_bvlc: 1500,
                max_npdu: 1497,
            },
            BvlcPayload::AdvertisementSolicitation,
            BvlcPayload::ConnectRequest {
                vmac: V1,
                uuid: UUID,
                max_bvlc: 6000,
                max_npdu: 1497,
            },
            BvlcPayload::ConnectAccept {
                vmac: V2,
                uuid: UUID,
                max_bvlc: 1500,
                max_npdu: 1497,
            },
            BvlcPayload::DisconnectRequest,
            BvlcPayload::DisconnectAck,
            BvlcPayload::HeartbeatRequest,
            BvlcPayload::HeartbeatAck,
            BvlcPayload::Proprietary {
                vendor_id: 555,
                function: 9,
                data: vec![1, 2, 3],
            },
            BvlcPayload::Proprietary {
                vendor_id: 0xFFFF,
                function: 0,
                data: vec![],
            },
            BvlcPayload::Unknown {
                function: 0x0D,
                data: vec![],
            },
            BvlcPayload::Unknown {
                function: 0xFF,
                data: vec![9; 40],
            },
        ]
    }

    fn opts() -> Vec<HeaderOption> {
        vec![
            HeaderOption::secure_path(),
            HeaderOption {
                must_understand: false,
                kind: HeaderOptionKind::Proprietary {
                    vendor_id: 300,
                    option_type: 7,
                    data: vec![0xAA, 0xBB],
                },
            },
            HeaderOption {
                must_understand: true,
                kind: HeaderOptionKind::Unknown {
                    option_type: 5,
                    data: None,
                },
            },
            HeaderOption {
                must_understand: false,
                kind: HeaderOptionKind::Unknown {
                    option_type: 0,
                    data: Some(vec![]),
                },
            },
        ]
    }

    #[test]
    fn every_message_type_round_trips() {
        for p in all_payloads() {
            for (orig, dest) in [
                (None, None),
                (Some(V1), None),
                (None, Some(Vmac::BROADCAST)),
                (Some(V1), Some(V2)),
            ] {
                let mut m = BvlcMessage::new(0xBEEF, p.clone());
                m.originating = orig;
                m.destination = dest;
                rt(&m);
                m.destination_options = opts();
                rt(&m);
                if data_options_allowed(m.function()) {
                    m.data_options = opts();
                    rt(&m);
                    m.destination_options.clear();
                    rt(&m);
                }
            }
        }
    }

    #[test]
    fn connect_request_known_bytes() {
        let bytes = [
            0x06, 0x00, 0x12, 0x34, // Connect-Request, no header fields, msg ID 0x1234
            0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // VMAC
            0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d,
            0x1e, 0x1f, 0x05, 0xDC, // MaxBVLC 1500
            0x05, 0xD9, // MaxNPDU 1497
        ];
        let m = BvlcMessage::new(
            0x1234,
            BvlcPayload::ConnectRequest {
                vmac: V1,
                uuid: UUID,
                max_bvlc: 1500,
                max_npdu: 1497,
            },
        );
        assert_eq!(decode(&bytes).unwrap(), m);
        assert_eq!(encode(&m).unwrap(), bytes);
        // The little-endian quirk: 1500 read as 56325.
        let mut le = bytes;
        le[26..28].copy_from_slice(&1500u16.to_le_bytes());
        match decode(&le).unwrap().payload {
            BvlcPayload::ConnectRequest { max_bvlc, .. } => {
                assert_eq!(max_bvlc, 56325);
                assert_eq!(swap_quirk(max_bvlc), 1500);
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn broadcast_npdu_with_secure_path_known_bytes() {
        let bytes = [
            0x01, 0x0E, 0x00, 0x07, // Encapsulated-NPDU, orig+dest+dest-options, msg ID 7
            0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // originating
            0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // destination broadcast
            0x41, // last option, must-understand, no data, type 1 Secure Path
            0x01, 0x20, 0xFF, 0xFF, 0x00, 0xFF, 0x10, 0x08, // NPDU: global Who-Is
        ];
        let m = BvlcMessage {
            message_id: 7,
            originating: Some(V1),
            destination: Some(Vmac::BROADCAST),
            destination_options: vec![HeaderOption::secure_path()],
            data_options: vec![],
            payload: BvlcPayload::EncapsulatedNpdu(bytes[17..].to_vec()),
        };
        assert_eq!(decode(&bytes).unwrap(), m);
        assert_eq!(encode(&m).unwrap(), bytes);
        assert!(m.destination.unwrap().is_broadcast());
        assert!(unknown_must_understand(&m).is_none());
    }

    #[test]
    fn option_list_more_follows_known_bytes() {
        let bytes = [
            0x01, 0x03, 0x00, 0x01, // NPDU, dest options + data options
            0xC1, // more follows, must-understand, Secure Path
            0x3F, 0x00, 0x05, 0x01, 0x2C, 0x07, 0xAA,
            0xBB, // last, proprietary, len 5, vendor 300, type 7, data
            0x65, 0x00, 0x01, 0x99, // data option: must-understand + has-data, type 5, len 1
            0x01, 0x00, // NPDU
        ];
        let m = decode(&bytes).unwrap();
        assert_eq!(m.destination_options[0], HeaderOption::secure_path());
        assert_eq!(
            m.destination_options[1],
            HeaderOption {
                must_understand: false,
                kind: HeaderOptionKind::Proprietary {
                    vendor_id: 300,
                    option_type: 7,
                    data: vec![0xAA, 0xBB]
                }
            }
        );
        let unk = HeaderOption {
            must_understand: true,
            kind: HeaderOptionKind::Unknown {
                option_type: 5,
                data: Some(vec![0x99]),
            },
        };
        assert_eq!(m.data_options, vec![unk.clone()]);
        assert_eq!(encode(&m).unwrap(), bytes);
        assert_eq!(unknown_must_understand(&m), Some(&unk));
        let n = nak_for_option(&m, &unk, "");
        match n.payload {
            BvlcPayload::Result {
                result:
                    BvlcResult::Nak {
                        header_marker,
                        error_code,
                        ..
                    },
                ..
            } => {
                assert_eq!(header_marker, 0x65);
                assert_eq!(error_code, error_code::HEADER_NOT_UNDERSTOOD);
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn nak_known_bytes() {
        let req = BvlcMessage {
            originating: Some(V2),
            ..BvlcMessage::new(
                0x1234,
                BvlcPayload::ConnectRequest {
                    vmac: V1,
                    uuid: UUID,
                    max_bvlc: 1500,
                    max_npdu: 1497,
                },
            )
        };
        let n = nak(
            &req,
            ERROR_CLASS_COMMUNICATION,
            error_code::NODE_DUPLICATE_VMAC,
            "dup",
        );
        let bytes = [
            0x00, 0x04, 0x12, 0x34, // BVLC-Result, destination present, echoed msg ID
            0x02, 0x00, 0x00, 0x00, 0x00, 0x02, // destination = request's originating
            0x06, 0x01, 0x00, // for Connect-Request, NAK, header marker 0
            0x00, 0x07, 0x00, 0x97, // class 7, code 151
            b'd', b'u', b'p',
        ];
        assert_eq!(encode(&n).unwrap(), bytes);
        assert_eq!(decode(&bytes).unwrap(), n);
        let ack = [0x00, 0x00, 0x00, 0x05, 0x0A, 0x00];
        assert_eq!(
            decode(&ack).unwrap(),
            BvlcMessage::new(
                5,
                BvlcPayload::Result {
                    for_function: 0x0A,
                    result: BvlcResult::Ack
                }
            )
        );
    }

    #[test]
    fn duplicate_vmac_codes() {
        for c in [151u16, 113, 0x9700, 0x7100] {
            assert!(is_node_duplicate_vmac(c), "{c}");
        }
        assert!(!is_node_duplicate_vmac(150));
        assert_eq!(swap_quirk(ERROR_CLASS_COMMUNICATION), 1792);
    }

    #[test]
    fn is_response_set() {
        let resp: Vec<u8> = (0..=255u8).filter(|&f| is_response(f)).collect();
        assert_eq!(resp, vec![0x00, 0x03, 0x07, 0x09, 0x0B]);
    }

    fn err(bytes: &[u8]) -> BvlcError {
        decode(bytes).expect_err("should fail")
    }

    #[test]
    fn decode_errors() {
        use BvlcError::*;
        assert_eq!(err(&[]), TooShort { len: 0 });
        assert_eq!(err(&[1, 0, 0]), TooShort { len: 3 });
        assert_eq!(
            err(&[1, 0x10, 0, 0, 1]),
            ReservedControlBits { control: 0x10 }
        );
        assert_eq!(
            err(&[1, 0x08, 0, 0, 1, 2]),
            Truncated {
                field: "originating VMAC",
                offset: 4,
                needed: 6,
                available: 2
            }
        );
        assert!(matches!(
            err(&[1, 0x04, 0, 0]),
            Truncated {
                field: "destination VMAC",
                ..
            }
        ));
        assert_eq!(
            err(&[1, 0x02, 0, 0]),
            TruncatedOption {
                list: OptionList::Destination,
                offset: 4
            }
        );
        assert_eq!(
            err(&[1, 0x02, 0, 0, 0x81]),
            TruncatedOption {
                list: OptionList::Destination,
                offset: 5
            }
        );
        assert_eq!(
            err(&[1, 0x01, 0, 0, 0x25, 0]),
            TruncatedOptionLength {
                list: OptionList::Data,
                offset: 4
            }
        );
        assert_eq!(
            err(&[1, 0x01, 0, 0, 0x25, 0, 4, 1, 2]),
            OptionDataOverrun {
                list: OptionList::Data,
                offset: 4,
                declared: 4,
                available: 2
            }
        );
        assert_eq!(
            err(&[1, 0x02, 0, 0, 0x21, 0, 0, 1]),
            SecurePathWithData {
                list: OptionList::Destination,
                offset: 4
            }
        );
        assert_eq!(
            err(&[1, 0x02, 0, 0, 0x3F, 0, 2, 1, 2, 1]),
            ProprietaryOptionTooShort {
                list: OptionList::Destination,
                offset: 4,
                len: 2
            }
        );
        assert_eq!(
            err(&[1, 0x02, 0, 0, 0x1F, 1]),
            ProprietaryOptionTooShort {
                list: OptionList::Destination,
                offset: 4,
                len: 0
            }
        );
        assert_eq!(
            err(&[0x0A, 0x01, 0, 0, 0x01]),
            DataOptionsNotAllowed { function: 0x0A }
        );
        assert_eq!(
            err(&[0, 0, 0, 0, 1, 1, 0, 0, 7, 0, 1, 0xFF]),
            InvalidUtf8 {
                field: "BVLC-Result error details"
            }
        );
        assert_eq!(
            err(&[3, 0, 0, 0, 0xC3, 0x28]),
            InvalidUtf8 {
                field: "Address-Resolution-ACK URIs"
            }
        );
        assert!(matches!(
            err(&[0x0A, 0, 0, 0, 1]),
            PayloadLength {
                function: 0x0A,
                actual: 1,
                ..
            }
        ));
        assert!(matches!(
            err(&[1, 0, 0, 0]),
            PayloadLength {
                function: 1,
                actual: 0,
                ..
            }
        ));
        assert!(matches!(
            err(&[6, 0, 0, 0, 1, 2]),
            PayloadLength {
                function: 6,
                actual: 2,
                ..
            }
        ));
        assert!(matches!(
            err(&[4, 0, 0, 0, 0, 0, 0]),
            PayloadLength {
                function: 4,
                actual: 3,
                ..
            }
        ));
        assert!(matches!(
            err(&[0x0C, 0, 0, 0, 0, 1]),
            PayloadLength {
                function: 0x0C,
                actual: 2,
                ..
            }
        ));
        assert!(matches!(
            err(&[0, 0, 0, 0, 1]),
            PayloadLength {
                function: 0,
                actual: 1,
                ..
            }
        ));
        assert!(matches!(
            err(&[0, 0, 0, 0, 1, 0, 9]),
            PayloadLength {
                function: 0,
                actual: 3,
                ..
            }
        ));
        assert!(matches!(
            err(&[0, 0, 0, 0, 1, 1, 0, 0, 7, 0]),
            PayloadLength {
                function: 0,
                actual: 6,
                ..
            }
        ));
        assert_eq!(err(&[0, 0, 0, 0, 1, 2]), InvalidResultCode(2));
        assert_eq!(err(&[3, 0, 0, 0, b' ', b'a']), EmptyUri);
        assert_eq!(err(&[3, 0, 0, 0, b'a', b' ']), EmptyUri);
        assert_eq!(err(&[3, 0, 0, 0, b'a', b' ', b' ', b'b']), EmptyUri);
        assert_eq!(err(&[3, 0, 0, 0, b' ']), EmptyUri);
        assert_eq!(err(&[4, 0, 0, 0, 3, 0, 0, 0, 0, 0]), InvalidHubStatus(3));
        assert_eq!(err(&[4, 0, 0, 0, 0, 2, 0, 0, 0, 0]), InvalidAcceptDirect(2));
        // Error messages are precise and human readable.
        assert_eq!(
            err(&[1, 0x01, 0, 0, 0x25, 0, 4, 1, 2]).to_string(),
            "data option at offset 4: data length 4 overruns the message (2 bytes left)"
        );
        assert_eq!(
            err(&[0x0A, 0, 0, 0, 1]).to_string(),
            "payload length 1 is wrong for function 0x0A (Heartbeat-Request): expected no payload"
        );
        assert_eq!(err(&[1, 0, 0, 0]).nak_code(), error_code::PAYLOAD_EXPECTED);
        assert_eq!(
            err(&[0x0A, 0, 0, 0, 1]).nak_code(),
            error_code::UNEXPECTED_DATA
        );
        assert_eq!(
            err(&[1, 0x02, 0, 0]).nak_code(),
            error_code::MESSAGE_INCOMPLETE
        );
        assert_eq!(
            err(&[1, 0x10, 0, 0, 1]).nak_code(),
            error_code::HEADER_ENCODING_ERROR
        );
    }

    #[test]
    fn encode_errors() {
        use BvlcError::*;
        let mut m = BvlcMessage::new(1, BvlcPayload::EncapsulatedNpdu(vec![1]));
        let unk = |t, d| HeaderOption {
            must_understand: false,
            kind: HeaderOptionKind::Unknown {
                option_type: t,
                data: d,
            },
        };
        m.destination_options = vec![unk(32, None)];
        assert_eq!(encode(&m), Err(OptionTypeOutOfRange(32)));
        m.destination_options = vec![unk(1, None)];
        assert_eq!(encode(&m), Err(OptionTypeIsKnown(1)));
        m.destination_options = vec![unk(31, Some(vec![0; 3]))];
        assert_eq!(encode(&m), Err(OptionTypeIsKnown(31)));
        m.destination_options = vec![unk(3, Some(vec![0; 65536]))];
        assert_eq!(encode(&m), Err(OptionDataTooLong { len: 65536 }));
        m.destination_options = vec![HeaderOption {
            must_understand: false,
            kind: HeaderOptionKind::Proprietary {
                vendor_id: 1,
                option_type: 1,
                data: vec![0; 65533],
            },
        }];
        assert_eq!(encode(&m), Err(OptionDataTooLong { len: 65536 }));
        let mut buf = vec![0xAB];
        assert!(encode_into(&m, &mut buf).is_err());
        assert_eq!(buf, vec![0xAB], "encode_into restores the buffer on error");
        m.destination_options.clear();
        m.payload = BvlcPayload::EncapsulatedNpdu(vec![]);
        assert!(matches!(
            encode(&m),
            Err(PayloadLength {
                function: 1,
                actual: 0,
                ..
            })
        ));
        m.payload = BvlcPayload::Unknown {
            function: 0x0C,
            data: vec![],
        };
        assert_eq!(encode(&m), Err(FunctionIsKnown(0x0C)));
        m.payload = BvlcPayload::AddressResolutionAck(vec!["a b".into()]);
        assert_eq!(encode(&m), Err(InvalidUri("a b".into())));
        m.payload = BvlcPayload::AddressResolutionAck(vec!["".into()]);
        assert_eq!(encode(&m), Err(InvalidUri("".into())));
        m.payload = BvlcPayload::HeartbeatRequest;
        m.data_options = vec![HeaderOption::secure_path()];
        assert_eq!(encode(&m), Err(DataOptionsNotAllowed { function: 0x0A }));
    }

    #[test]
    fn ids_display_and_parse() {
        assert_eq!(V1.to_string(), "02:00:00:00:00:01");
        assert_eq!("02:00:00:00:00:01".parse::<Vmac>().unwrap(), V1);
        assert_eq!(
            "FF-FF-FF-FF-FF-FF".parse::<Vmac>().unwrap(),
            Vmac::BROADCAST
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "2:00:00:00:00:01",
            "g2:00:00:00:00:01",
        ] {
            assert!(bad.parse::<Vmac>().is_err(), "{bad}");
        }
        assert!(Vmac::RESERVED.is_reserved() && !V1.is_reserved());
        assert!(Vmac::BROADCAST.is_broadcast() && !V1.is_broadcast());
        assert!(V1.is_local_unicast());
        let s = UUID.to_string();
        assert_eq!(s, "10111213-1415-1617-1819-1a1b1c1d1e1f");
        assert_eq!(s.parse::<DeviceUuid>().unwrap(), UUID);
        assert_eq!(s.to_uppercase().parse::<DeviceUuid>().unwrap(), UUID);
        for bad in [
            "",
            "10111213141516171819-1a1b1c1d1e1f0",
            "10111213-1415-1617-1819-1a1b1c1d1e1",
            "1011121-31415-1617-1819-1a1b1c1d1e1f",
        ] {
            assert!(bad.parse::<DeviceUuid>().is_err(), "{bad}");
        }
    }

    /// Tiny deterministic PRNG for generated messages.
    struct Rng(rand_chacha::ChaCha8Rng);
    impl Rng {
        fn next(&mut self) -> u64 {
            rand::RngCore::next_u64(&mut self.0)
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
        fn bytes(&mut self, max: usize) -> Vec<u8> {
            let n = (self.next() as usize) % (max + 1);
            (0..n).map(|_| self.byte()).collect()
        }
        fn vmac(&mut self) -> Option<Vmac> {
            match self.next() % 3 {
                0 => None,
                1 => Some(Vmac::BROADCAST),
                _ => Some(Vmac([
                    self.byte(),
                    self.byte(),
                    self.byte(),
                    self.byte(),
                    self.byte(),
                    self.byte(),
                ])),
            }
        }
        fn options(&mut self) -> Vec<HeaderOption> {
            let n = self.next() % 4;
            (0..n)
                .map(|_| HeaderOption {
                    must_understand: self.next() & 1 == 0,
                    kind: match self.next() % 3 {
                        0 => HeaderOptionKind::SecurePath,
                        1 => HeaderOptionKind::Proprietary {
                            vendor_id: self.next() as u16,
                            option_type: self.byte(),
                            data: self.bytes(5),
                        },
                        _ => HeaderOptionKind::Unknown {
                            option_type: [0u8, 2, 3, 17, 30][(self.next() % 5) as usize],
                            data: if self.next() & 1 == 0 {
                                None
                            } else {
                                Some(self.bytes(4))
                            },
                        },
                    },
                })
                .collect()
        }
    }

    #[test]
    fn forwarding_rewrite_matches_decode_modify_encode() {
        let mut rng = Rng(rand::SeedableRng::seed_from_u64(0x9E37_79B9_7F4A_7C15));
        let payloads = all_payloads();
        let mut checked = 0;
        for i in 0..5000 {
            let mut payload = payloads[(rng.next() as usize) % payloads.len()].clone();
            if let BvlcPayload::EncapsulatedNpdu(n) = &mut payload {
                n.extend(rng.bytes(30));
            }
            let mut m = BvlcMessage {
                message_id: rng.next() as u16,
                originating: rng.vmac(),
                destination: rng.vmac(),
                destination_options: rng.options(),
                data_options: vec![],
                payload,
            };
            if data_options_allowed(m.function()) {
                m.data_options = rng.options();
            }
            let frame = rt(&m);
            let orig = Vmac([0x02, 9, 8, 7, 6, i as u8]);
            for keep in [false, true] {
                let mut out = vec![0xEE]; // appends, does not clear
                rewrite_for_forwarding(&frame, orig, keep, &mut out).unwrap();
                let mut expect = decode(&frame).unwrap();
                expect.originating = Some(orig);
                if !keep {
                    expect.destination = None;
                }
                let mut want = vec![0xEE];
                encode_into(&expect, &mut want).unwrap();
                assert_eq!(out, want, "frame {frame:02X?} keep {keep}");
                checked += 1;
            }
        }
        assert_eq!(checked, 10000);
    }

    #[test]
    fn forwarding_rewrite_rejects_bad_headers() {
        let mut out = Vec::new();
        let o = V1;
        assert_eq!(
            rewrite_for_forwarding(&[1, 0], o, true, &mut out),
            Err(BvlcError::TooShort { len: 2 })
        );
        assert!(rewrite_for_forwarding(&[1, 0x20, 0, 0, 1], o, true, &mut out).is_err());
        assert!(rewrite_for_forwarding(&[1, 0x04, 0, 0, 1], o, true, &mut out).is_err());
        assert!(rewrite_for_forwarding(&[1, 0x02, 0, 0, 0xA0, 0, 9], o, true, &mut out).is_err());
        assert!(rewrite_for_forwarding(&[0x0A, 0x01, 0, 0, 0x01], o, true, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn decode_never_panics_on_truncations_and_flips() {
        let mut rng = Rng(rand::SeedableRng::seed_from_u64(12345));
        for p in all_payloads() {
            let mut m = BvlcMessage::new(3, p);
            m.originating = Some(V1);
            m.destination = Some(V2);
            m.destination_options = opts();
            if data_options_allowed(m.function()) {
                m.data_options = opts();
            }
            let bytes = rt(&m);
            for cut in 0..bytes.len() {
                let _ = decode(&bytes[..cut]);
                let _ = rewrite_for_forwarding(&bytes[..cut], V1, true, &mut Vec::new());
            }
            for _ in 0..500 {
                let mut b = bytes.clone();
                let i = (rng.next() as usize) % b.len();
                b[i] ^= 1 << (rng.next() % 8);
                if let Ok(m2) = decode(&b) {
                    assert_eq!(decode(&encode(&m2).unwrap()).unwrap(), m2);
                }
                let _ = rewrite_for_forwarding(&b, V1, false, &mut Vec::new());
            }
        }
    }
}
