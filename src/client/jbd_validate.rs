//! `hilbench validate jbd-bms`: the jbd-client's conformance checks against
//! one BMS, real or simulated. Each check says pass, warn (works, but some
//! clients will trip) or fail (breaks the protocol as documented).

use std::time::{Duration, Instant};

use btleplug::api::{CharPropFlags, Peripheral as _, WriteType};
use serde::Serialize;

use super::jbd_client::{central_adapter, find_bms, Exchange, JbdSession, JbdTarget};
use crate::protocol::jbd::{self, reg, BasicInfo, CellVoltages, HardwareVersion, BASIC_FIXED, CHINS_EXTRA, STATUS_ERROR};

pub use super::conformance::{Check, Verdict};
use super::conformance::check;

#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    pub target: String,
    pub address: Option<String>,
    pub name: Option<String>,
    pub mtu: Option<u16>,
    pub checks: Vec<Check>,
}

impl ValidationReport {
    pub fn count(&self, v: Verdict) -> usize {
        super::conformance::count(&self.checks, v)
    }
    pub fn passed(&self) -> bool {
        self.count(Verdict::Fail) == 0
    }
}

#[derive(Debug, Clone)]
pub struct ValidateConfig {
    pub target: JbdTarget,
    pub adapter: Option<String>,
    pub timeout: Duration,
    pub scan_timeout: Duration,
}

/// Notification sizes against the MTU: none over MTU − 3 (BlueZ would cut
/// them), and every chunk but the last of a frame full (clients that do not
/// reassemble by the length byte count on it).
fn split_verdict(what: &str, sizes: &[usize], mtu: u16) -> Check {
    let room = usize::from(mtu.max(23)) - 3;
    let shown = format!("{what}: {sizes:?} at MTU {mtu}");
    if sizes.iter().any(|&s| s > room) {
        return check("notification_sizes", Verdict::Fail, format!("{shown}: a notification over MTU − 3 = {room}"));
    }
    let (_, head) = sizes.split_last().unwrap_or((&0, &[]));
    if head.iter().any(|&s| s != room) {
        return check("notification_sizes", Verdict::Warn, format!("{shown}: a chunk before the last is short of {room} bytes"));
    }
    check("notification_sizes", Verdict::Pass, shown)
}

/// Runs every check; connection problems end the run with a failed check.
pub async fn validate(cfg: &ValidateConfig) -> ValidationReport {
    let mut report = ValidationReport {
        target: cfg.target.to_string(),
        address: None,
        name: None,
        mtu: None,
        checks: Vec::new(),
    };
    let central = match central_adapter(cfg.adapter.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            report.checks.push(check("adapter", Verdict::Fail, e.detail));
            return report;
        }
    };
    let peripheral = match find_bms(&central, &cfg.target, cfg.scan_timeout).await {
        Ok(p) => p,
        Err(e) => {
            report.checks.push(check("discovery", Verdict::Fail, e.detail));
            return report;
        }
    };
    if let Ok(Some(props)) = peripheral.properties().await {
        report.address = Some(props.address.to_string());
        report.name = props.local_name.clone();
        let adv = if props.services.contains(&crate::device::jbd::SERVICE_UUID) {
            check("advertisement", Verdict::Pass, format!("name {:?}, advertises service 0xFF00", props.local_name))
        } else {
            check("advertisement", Verdict::Warn, format!("name {:?}, 0xFF00 not in the advertised services: clients that filter on it will not find the BMS", props.local_name))
        };
        report.checks.push(adv);
    }
    let mut session = match JbdSession::open(peripheral, cfg.timeout.max(Duration::from_secs(5)), Duration::from_millis(100), None, Instant::now()).await {
        Ok(s) => s,
        Err(e) => {
            report.checks.push(check("gatt", Verdict::Fail, e.detail));
            return report;
        }
    };
    let mtu = session.mtu();
    report.mtu = Some(mtu);
    {
        let (n, w) = session.characteristics();
        let mut problems = Vec::new();
        if !n.properties.contains(CharPropFlags::NOTIFY) {
            problems.push(format!("0xFF01 does not notify ({:?})", n.properties));
        }
        if !w.properties.contains(CharPropFlags::WRITE_WITHOUT_RESPONSE) {
            problems.push(format!("0xFF02 has no write-without-response ({:?})", w.properties));
        }
        report.checks.push(if problems.is_empty() {
            check("gatt", Verdict::Pass, format!("0xFF01 {:?}, 0xFF02 {:?}", n.properties, w.properties))
        } else {
            check("gatt", Verdict::Fail, problems.join("; "))
        });
    }
    let mut splits = Vec::new();
    let mut skips: Vec<(&'static str, usize)> = Vec::new();
    let mut exchange = |name: &'static str, r: Result<Exchange, super::TransactionError>, checks: &mut Vec<Check>| -> Option<Exchange> {
        match r {
            Err(e) => {
                checks.push(check(name, Verdict::Fail, format!("{}: {}", e.kind, e.detail)));
                None
            }
            Ok(x) => {
                if let Some((expected, found)) = x.bad_checksum {
                    checks.push(check(name, Verdict::Fail, format!("checksum {found:04X}, expected {expected:04X}")));
                    return None;
                }
                if !x.response.is_ok() {
                    checks.push(check(name, Verdict::Fail, format!("status 0x{:02X}", x.response.status)));
                    return None;
                }
                if x.skipped > 0 {
                    skips.push((name, x.skipped));
                }
                splits.push((name, x.notification_sizes.clone()));
                Some(x)
            }
        }
    };
    let t = cfg.timeout;
    let mut cell_count = None;
    let r = session.transact(&jbd::encode_read(reg::BASIC_INFO), reg::BASIC_INFO, WriteType::WithoutResponse, t, false).await;
    if let Some(x) = exchange("basic_info_0x03", r, &mut report.checks) {
        match BasicInfo::decode(&x.response.data) {
            Err(e) => report.checks.push(check("basic_info_0x03", Verdict::Fail, e.to_string())),
            Ok(b) => {
                cell_count = Some(b.cell_count);
                let standard = BASIC_FIXED + 2 * b.ntc_deci_kelvin.len();
                let summary = format!(
                    "{:.2} V, {:.2} A, SoC {} %, {} cells, {} NTC, payload {} bytes",
                    f64::from(b.voltage_10mv) / 100.0,
                    f64::from(b.current_10ma) / 100.0,
                    b.rsoc_pct,
                    b.cell_count,
                    b.ntc_deci_kelvin.len(),
                    x.response.data.len()
                );
                let len = x.response.data.len();
                report.checks.push(if len == standard {
                    check("basic_info_0x03", Verdict::Pass, summary)
                } else if len == standard + CHINS_EXTRA {
                    check("basic_info_0x03", Verdict::Warn, format!("{summary}: {CHINS_EXTRA} extra bytes after the temperatures (Chins): parsers with a fixed length trip"))
                } else {
                    check("basic_info_0x03", Verdict::Warn, format!("{summary}: {} bytes after the temperatures", len.saturating_sub(standard)))
                });
            }
        }
    }
    let r = session.transact(&jbd::encode_read(reg::CELL_VOLTAGES), reg::CELL_VOLTAGES, WriteType::WithoutResponse, t, false).await;
    if let Some(x) = exchange("cell_voltages_0x04", r, &mut report.checks) {
        match CellVoltages::decode(&x.response.data) {
            Err(e) => report.checks.push(check("cell_voltages_0x04", Verdict::Fail, e.to_string())),
            Ok(c) => {
                let n = c.cells_mv.len();
                let zeros = c.cells_mv.iter().filter(|&&v| v == 0).count();
                let shown = format!("{n} cells, {:?} mV", c.cells_mv);
                report.checks.push(match cell_count {
                    Some(cc) if usize::from(cc) != n => check("cell_voltages_0x04", Verdict::Fail, format!("{shown}: 0x03 says {cc} cells")),
                    _ if zeros > 0 => check("cell_voltages_0x04", Verdict::Warn, format!("{shown}: {zeros} cells at 0 mV")),
                    _ => check("cell_voltages_0x04", Verdict::Pass, shown),
                });
            }
        }
    }
    let r = session.transact(&jbd::encode_read(reg::HARDWARE_VERSION), reg::HARDWARE_VERSION, WriteType::WithoutResponse, t, false).await;
    if let Some(x) = exchange("hardware_version_0x05", r, &mut report.checks) {
        report.checks.push(match HardwareVersion::decode(&x.response.data) {
            Ok(h) => check("hardware_version_0x05", Verdict::Pass, format!("model {:?}", h.model)),
            Err(e) => check("hardware_version_0x05", Verdict::Fail, e.to_string()),
        });
    }
    if !skips.is_empty() {
        let shown: Vec<String> = skips.iter().map(|(n, b)| format!("{n}: {b}")).collect();
        report.checks.push(check("framing", Verdict::Warn, format!("bytes before the frame (foreign frames or noise), clients must skip to DD: {}", shown.join(", "))));
    }
    for (what, sizes) in &splits {
        report.checks.push(split_verdict(what, sizes, mtu));
    }
    // A read of 0x03 with the checksum off by one.
    let mut bad = jbd::encode_read(reg::BASIC_INFO);
    if let Some(b) = bad.get_mut(5) {
        *b = b.wrapping_sub(1);
    }
    let r = session.transact(&bad, reg::BASIC_INFO, WriteType::WithoutResponse, t, false).await;
    report.checks.push(match r {
        Ok(x) if x.response.status == STATUS_ERROR => check("bad_checksum_request", Verdict::Pass, "answered with status 0x80"),
        Ok(x) => check("bad_checksum_request", Verdict::Warn, format!("answered with status 0x{:02X} and {} data bytes: the checksum is not checked", x.response.status, x.response.data.len())),
        Err(e) if e.kind == "timeout" => check("bad_checksum_request", Verdict::Pass, "no answer (allowed: the request is dropped)"),
        Err(e) => check("bad_checksum_request", Verdict::Fail, format!("{}: {}", e.kind, e.detail)),
    });
    let r = session.transact(&jbd::encode_read(reg::BASIC_INFO), reg::BASIC_INFO, WriteType::WithResponse, t, false).await;
    report.checks.push(match r {
        Ok(_) => check("write_with_response", Verdict::Pass, "accepted and answered"),
        Err(e) if e.kind == "io" => check("write_with_response", Verdict::Warn, format!("rejected ({}): clients that write with response must fall back to without", e.detail)),
        Err(e) => check("write_with_response", Verdict::Warn, format!("accepted but not answered ({}: {})", e.kind, e.detail)),
    });
    session.close().await;
    report
}

/// The report as a table for a terminal.
pub fn render(report: &ValidationReport) -> String {
    let mut s = format!(
        "JBD BMS {} ({}), MTU {}\n",
        report.address.as_deref().unwrap_or(&report.target),
        report.name.as_deref().unwrap_or("no name"),
        report.mtu.map(|m| m.to_string()).unwrap_or_else(|| "?".into())
    );
    s.push_str(&super::conformance::render_checks(&report.checks));
    s
}
