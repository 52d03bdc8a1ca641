//! How `capture import` asks each device kind whether a captured frame is its
//! protocol: the importer shows every frame to every device kind
//! ([`crate::kind::Kind::recognise`]) and keeps, per device, the kind that
//! recognised the most frames. The importer never names a kind.

use super::record::Direction;

/// The medium a captured frame came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureTransport {
    /// Bytes on a serial line (RS-485, a console PTY): one frame per record.
    Serial,
    /// One ATT PDU of a BLE connection.
    BleAtt,
    /// One UDP datagram.
    Udp,
    /// One WebSocket message.
    WebSocket,
    /// One HTTP/1.1 request or response ([`crate::protocol::http_message`]'s normal form).
    Http,
}

impl CaptureTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureTransport::Serial => "serial",
            CaptureTransport::BleAtt => "ble-att",
            CaptureTransport::Udp => "udp",
            CaptureTransport::WebSocket => "websocket",
            CaptureTransport::Http => "http",
        }
    }
}

/// One captured frame as a kind sees it.
#[derive(Debug, Clone, Copy)]
pub struct CapturedFrameView<'a> {
    pub transport: CaptureTransport,
    /// `Request`: from the client (bus master, GATT client); `Response`: from the device.
    pub direction: Direction,
    /// The protocol bytes: the whole frame, or for ATT the attribute value.
    pub bytes: &'a [u8],
    /// ATT: the characteristic the handle belongs to, when the discovery was seen.
    pub uuid: Option<uuid::Uuid>,
    /// ATT: the opcode (write, notification, …).
    pub att_opcode: Option<u8>,
}

/// A kind's answer for a frame it recognises as its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameVerdict {
    /// Proof rather than likeness: the frame is on the kind's own characteristic, or
    /// carries a checksum that only its protocol computes this way.
    pub decisive: bool,
    /// The decoded meaning, one line.
    pub meaning: String,
    /// On a shared medium, which device the frame is for or from (a Modbus slave
    /// address): the importer writes one fixture per unit.
    pub unit: Option<String>,
}

/// How a replay matches and answers a kind's protocol: the bytes that identify a request
/// (with the fields a client changes from run to run blanked: a sequence number, a
/// transaction id), and the captured answer fitted to the live request (those fields
/// echoed). A kind without one is matched byte for byte.
#[derive(Debug, Clone, Copy)]
pub struct ReplayRule {
    pub key: fn(&[u8]) -> Vec<u8>,
    pub answer: fn(request: &[u8], answer: &mut Vec<u8>),
}

/// One imported device as a scenario that replays it sees it (`capture import` writes
/// such a scenario next to the fixtures).
#[derive(Debug, Clone)]
pub struct CapturedDevice {
    /// Its name in the scenario (a `replay` device).
    pub name: String,
    /// Its unit on a shared medium (`addr1`), as the kind's verdicts named it.
    pub unit: Option<String>,
    pub transport: CaptureTransport,
    /// The first frames of its fixture, in captured order.
    pub frames: Vec<(Direction, Vec<u8>)>,
}

/// What a device kind adds to a scenario that replays its captured devices on a bus: a
/// client of its protocol on the bus port, and the steps the capture proves (what that
/// client must meet: the errors and the readings the captured device gave).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureClient {
    /// The client entry, one YAML flow mapping (`{ name: master, kind: …, port: … }`).
    pub client: String,
    /// Steps, each one line of YAML (`expect_errors: { … }`).
    pub steps: Vec<String>,
    /// What the steps were derived from, for the scenario's description.
    pub notes: Vec<String>,
}
