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

/// One JBD frame (BLE 0xFF02 write or 0xFF01 response), decoded for a transcript.
pub fn describe_jbd(direction: Direction, bytes: &[u8]) -> String {
    use crate::protocol::jbd::{self, reg, Op};
    if bytes.first() == Some(&jbd::PIN_START[0]) {
        return match jbd::PinFrame::decode(bytes) {
            Ok(p) => format!("PIN cmd=0x{:02X} data={}", p.cmd, crate::client::hex(&p.data)),
            Err(e) => format!("undecodable ({e}): {}", crate::client::hex(bytes)),
        };
    }
    let name = |r: u8| match r {
        reg::BASIC_INFO => "basic info",
        reg::CELL_VOLTAGES => "cell voltages",
        reg::HARDWARE_VERSION => "hardware version",
        reg::MOS_CONTROL => "MOS control",
        reg::FACTORY_ENTER => "factory enter",
        reg::FACTORY_EXIT => "factory exit",
        reg::ACTION => "action",
        reg::ERROR_COUNTERS => "error counters",
        r if reg::is_eeprom(r) => "EEPROM parameter",
        r if reg::is_string(r) => "string",
        _ => "unknown register",
    };
    if direction == Direction::Request {
        return match jbd::decode_request(bytes) {
            Ok(r) if r.op == Op::Read => format!("read 0x{:02X} ({})", r.reg, name(r.reg)),
            Ok(r) => format!("write 0x{:02X} ({}) data={}", r.reg, name(r.reg), crate::client::hex(&r.data)),
            Err(e) => format!("undecodable ({e}): {}", crate::client::hex(bytes)),
        };
    }
    let (r, bad) = match jbd::decode_response_unchecked(bytes) {
        Ok(x) => x,
        Err(e) => return format!("undecodable ({e}): {}", crate::client::hex(bytes)),
    };
    let suffix = if bad.is_some() { " (bad checksum)" } else { "" };
    if !r.is_ok() {
        return format!("0x{:02X} ({}) error status 0x{:02X}{suffix}", r.reg, name(r.reg), r.status);
    }
    let body = match r.reg {
        reg::BASIC_INFO => jbd::BasicInfo::decode(&r.data).map(|b| {
            format!(
                "{:.2} V {:.2} A soc={}% {:.2}/{:.2} Ah cycles={} fet={}{} cells={} temps_c={:?} balancing={:?} protections={:?} date={} sw=0x{:02X}{}",
                f64::from(b.voltage_10mv) / 100.0,
                f64::from(b.current_10ma) / 100.0,
                b.rsoc_pct,
                f64::from(b.remaining_10mah) / 100.0,
                f64::from(b.nominal_10mah) / 100.0,
                b.cycles,
                if b.fet & jbd::FET_CHARGE != 0 { "C" } else { "-" },
                if b.fet & jbd::FET_DISCHARGE != 0 { "D" } else { "-" },
                b.cell_count,
                b.temps_c(),
                b.balancing_cells(),
                b.protection_names(),
                b.date(),
                b.software_version,
                if b.extra.is_empty() { String::new() } else { format!(" extra={}", crate::client::hex(&b.extra)) },
            )
        }),
        reg::CELL_VOLTAGES => jbd::CellVoltages::decode(&r.data).map(|c| format!("mV {:?}", c.cells_mv)),
        reg::HARDWARE_VERSION => jbd::HardwareVersion::decode(&r.data).map(|h| format!("{:?}", h.model)),
        _ if r.data.is_empty() => Ok("ack".into()),
        _ => Ok(format!("data={}", crate::client::hex(&r.data))),
    };
    match body {
        Ok(b) => format!("0x{:02X} ({}) {b}{suffix}", r.reg, name(r.reg)),
        Err(e) => format!("0x{:02X} ({}) undecodable payload ({e}){suffix}", r.reg, name(r.reg)),
    }
}
