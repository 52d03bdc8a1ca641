//! `modbus-master` and `inverter-master`: poll packs over Modbus RTU.
//!
//! The master is the instrument scenarios assert on: every reading and every
//! failed attempt (timeout, bad CRC, exception, echo, framing) becomes an
//! observation. The inverter role makes the same traffic but publishes only
//! errors, so a passive listener on the bus has something to decode.

use std::collections::BTreeMap;

use super::poller::PollProtocol;
use super::{telemetry_fields, TransactionError};
use crate::protocol::eg4::RegisterProfile;
use crate::protocol::modbus::{self, FrameLength, ModbusRequest, ModbusResponse, ModbusRtuFrame};

/// Modbus RTU polling of an EG4 register profile.
pub struct ModbusPoll {
    pub profile: RegisterProfile,
}

/// Read one address once: the request a production bridge sends.
pub fn poll_request(address: u8, profile: RegisterProfile) -> Vec<u8> {
    let (start, count) = profile.poll_request();
    modbus::encode_request(&ModbusRtuFrame {
        address,
        pdu: ModbusRequest::ReadHolding { start, count },
    })
    .expect("a read of a profile's own register range always encodes")
}

impl PollProtocol for ModbusPoll {
    fn request(&self, address: u8) -> Vec<u8> {
        poll_request(address, self.profile)
    }

    fn frame_length(&self, buf: &[u8]) -> FrameLength {
        modbus::response_frame_length(buf)
    }

    fn decode(&self, address: u8, frame: &[u8]) -> Result<(BTreeMap<String, f64>, Vec<String>), TransactionError> {
        decode_reply(self.profile, address, frame)
    }

    fn retry_helps(&self, e: &TransactionError) -> bool {
        // An exception is an answer: retrying cannot change it.
        e.kind != "exception"
    }
}

/// Decode a poll reply from `address` into scenario fields.
pub fn decode_reply(
    profile: RegisterProfile,
    address: u8,
    frame: &[u8],
) -> Result<(BTreeMap<String, f64>, Vec<String>), TransactionError> {
    let frame = modbus::decode_response(frame).map_err(|e| match e {
        modbus::ModbusError::BadCrc { .. } => TransactionError::new("crc", e.to_string()),
        _ => TransactionError::new("malformed", e.to_string()),
    })?;
    if frame.address != address {
        return Err(TransactionError::new(
            "malformed",
            format!("reply from address {} to a request for {}", frame.address, address),
        ));
    }
    match frame.pdu {
        ModbusResponse::ReadHolding(values) => {
            let (start, _) = profile.poll_request();
            let t = profile
                .decode(start, &values)
                .map_err(|e| TransactionError::new("malformed", e.to_string()))?;
            Ok(telemetry_fields(&t))
        }
        ModbusResponse::Exception { function, code } => Err(TransactionError::new(
            "exception",
            format!("exception {:02X} ({:?}) to function {:02X}", code.code(), code, function),
        )),
        other => Err(TransactionError::new("malformed", format!("unexpected reply {other:?}"))),
    }
}
