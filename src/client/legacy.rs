//! `legacy-client`: polls packs with the EG4 7E/0D binary protocol
//! (command 0x01, general status), as the bridge's `active` mode does.

use std::collections::BTreeMap;

use super::poller::PollProtocol;
use super::TransactionError;
use crate::protocol::eg4_legacy;
use crate::protocol::modbus::FrameLength;

pub struct LegacyPoll;

impl PollProtocol for LegacyPoll {
    fn request(&self, address: u8) -> Vec<u8> {
        eg4_legacy::encode_request(address, eg4_legacy::LegacyCommand::GeneralStatus).to_vec()
    }

    fn frame_length(&self, buf: &[u8]) -> FrameLength {
        eg4_legacy::frame_length(buf)
    }

    fn decode(&self, address: u8, frame: &[u8]) -> Result<(BTreeMap<String, f64>, Vec<String>), TransactionError> {
        if frame.get(1) != Some(&address) {
            return Err(TransactionError::new(
                "malformed",
                format!("reply from address {:?} to a request for {address}", frame.get(1)),
            ));
        }
        let s = eg4_legacy::decode_status_reply(frame).map_err(|e| TransactionError::new("malformed", e.to_string()))?;
        Ok(legacy_fields(&s))
    }
}

/// Fields as the bridge reports them: cell voltages masked with 0x7FFF (the
/// top bit is the over-voltage flag, reported separately as a flag).
pub fn legacy_fields(s: &eg4_legacy::LegacyStatus) -> (BTreeMap<String, f64>, Vec<String>) {
    let mut v = BTreeMap::new();
    let mut flags = Vec::new();
    for (i, c) in s.cells_mv.iter().enumerate() {
        v.insert(format!("cell{}_mv", i + 1), f64::from(*c & 0x7FFF));
        if s.cell_ov_flags.get(i).copied().unwrap_or(false) {
            flags.push(format!("cell_ov_flag:{}", i + 1));
        }
    }
    v.insert("cell_count".into(), s.cells_mv.len() as f64);
    v.insert("current_a".into(), f64::from(s.current_ca) / 100.0);
    v.insert("soc_pct".into(), f64::from(s.soc_centi) / 100.0);
    v.insert("remaining_ah".into(), f64::from(s.capacity_cah) / 100.0);
    v.insert("cycles".into(), f64::from(s.cycles));
    v.insert("pack_v".into(), f64::from(s.pack_cv) / 100.0);
    for (i, t) in s.temps_c.iter().enumerate() {
        v.insert(format!("temp{}_c", i + 1), f64::from(*t));
    }
    let a2 = s.alarms.get(1).copied().unwrap_or(0);
    for (bit, name) in [
        (3, "over_current"),
        (4, "voltage_high"),
        (5, "voltage_low"),
        (6, "charge_temp_high"),
        (7, "charge_temp_low"),
    ] {
        if a2 & (1 << bit) != 0 {
            flags.push(format!("alarm:{name}"));
        }
    }
    (v, flags)
}
