//! Human-readable decoded transcripts of captured frames: what a reviewer
//! reads in a snapshot diff. Timestamps are left out so runs compare.

use crate::link::record::{Direction, FrameRecord};
use crate::protocol::{eg4_legacy, modbus};

/// One line per frame: link, direction, decoded summary.
pub fn render(frames: &[FrameRecord]) -> String {
    let mut s = String::new();
    for f in frames {
        let dir = match f.direction {
            Direction::Request => "->",
            Direction::Response => "<-",
        };
        s.push_str(&format!("{:<10} {dir} {}\n", f.link, describe(f.direction, &f.bytes)));
    }
    s
}

pub fn describe(direction: Direction, bytes: &[u8]) -> String {
    if bytes.first() == Some(&0x7E) {
        if direction == Direction::Request {
            if let Ok(r) = eg4_legacy::decode_request(bytes) {
                return format!("legacy addr={} {:?}", r.address, r.command);
            }
        } else if let Ok(s) = eg4_legacy::decode_status_reply(bytes) {
            return format!(
                "legacy status cells={} soc={} current_ca={} flagged={}",
                s.cells_mv.len(),
                s.soc_centi,
                s.current_ca,
                s.cell_ov_flags.iter().filter(|f| **f).count()
            );
        }
    }
    let decoded = match direction {
        Direction::Request => modbus::decode_request(bytes).map(|f| format!("addr={} {:?}", f.address, f.pdu)),
        Direction::Response => modbus::decode_response(bytes).map(|f| match f.pdu {
            modbus::ModbusResponse::ReadHolding(v) => {
                format!("addr={} read-holding {} regs {:?}", f.address, v.len(), &v[..v.len().min(8)])
            }
            other => format!("addr={} {:?}", f.address, other),
        }),
    };
    if direction == Direction::Response && decoded.is_err() {
        // A request travelling back to its sender: an adapter echo.
        if let Ok(f) = modbus::decode_request(bytes) {
            return format!("echo of request addr={} {:?}", f.address, f.pdu);
        }
    }
    match decoded {
        Ok(d) => d,
        Err(e) => format!("undecodable ({e}): {}", crate::client::hex(bytes)),
    }
}
