//! Renders scenario results: a terminal summary, JSON for scripts, JUnit
//! XML for CI.

use std::path::Path;
use std::time::Duration;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use super::runner::ScenarioReport;

pub fn summary_line(r: &ScenarioReport) -> String {
    let status = if r.passed { "PASS" } else { "FAIL" };
    let mut s = format!("{status} {} ({:.1}s, {})", r.name, r.duration_ms / 1000.0, r.file.display());
    if let Some(f) = r.failure() {
        s.push_str(&format!("\n     {}", f.replace('\n', "\n     ")));
        if !r.recent_observations.is_empty() {
            s.push_str("\n     last observations:");
            for o in &r.recent_observations {
                s.push_str(&format!("\n       {:>9.1} ms {:<10} {}", o.t_ms, o.source, describe(&o.kind)));
            }
        }
    }
    s
}

pub fn to_json(reports: &[ScenarioReport]) -> serde_json::Value {
    let passed = reports.iter().filter(|r| r.passed).count();
    serde_json::json!({
        "passed": passed,
        "failed": reports.len() - passed,
        "scenarios": reports,
    })
}

pub fn write_junit(path: &Path, reports: &[ScenarioReport]) -> Result<(), String> {
    let mut report = Report::new("hilbench");
    let mut suite = TestSuite::new("scenarios");
    for r in reports {
        let status = if r.passed {
            TestCaseStatus::success()
        } else {
            let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
            s.set_message(r.failure().unwrap_or_default());
            s
        };
        let mut case = TestCase::new(r.name.clone(), status);
        case.set_classname(r.file.display().to_string());
        case.set_time(Duration::from_secs_f64(r.duration_ms / 1000.0));
        let mut out = String::new();
        for s in &r.steps {
            out.push_str(&format!(
                "[{:>8.1} ms] step {} {} {}: {}\n",
                s.t_ms,
                s.index,
                s.step,
                if s.passed { "ok" } else { "FAILED" },
                s.message
            ));
        }
        for p in &r.processes {
            out.push_str(&format!("--- process {} ({}) exit {:?}\n", p.name, p.command, p.exit_code));
            for l in &p.output {
                out.push_str(l);
                out.push('\n');
            }
        }
        case.set_system_out(out);
        suite.add_test_case(case);
    }
    report.add_test_suite(suite);
    let xml = report.to_string().map_err(|e| e.to_string())?;
    std::fs::write(path, xml).map_err(|e| format!("{}: {e}", path.display()))
}

fn describe(k: &crate::observe::ObservationKind) -> String {
    use crate::observe::ObservationKind as K;
    match k {
        K::Reading { address, values, flags } => format!(
            "reading addr={address} soc={:?} {}",
            values.get("soc_pct"),
            if flags.is_empty() { String::new() } else { format!("flags={flags:?}") }
        ),
        K::Error { address, kind, detail, attempt } => format!("error addr={address} {kind} (attempt {attempt}): {detail}"),
        K::GaveUp { address, attempts } => format!("gave up on addr={address} after {attempts} attempts"),
        K::DeviceSilent { reason } => format!("device silent: {reason}"),
        K::Collision { devices } => format!("collision: {}", devices.join(" + ")),
        K::Overflow { bytes, reason } => format!("overflow of {bytes} bytes: {reason}"),
        K::BscConnected { hub, url, max_bvlc, max_npdu, .. } => {
            format!("connected to {hub} hub {url} (MaxBVLC {max_bvlc}, MaxNPDU {max_npdu})")
        }
        K::BscConnectFailed { hub, error, .. } => format!("connect to {hub} hub failed: {error}"),
        K::BscDisconnected { hub, reason } => format!("left {hub} hub: {reason}"),
        K::BscNak { for_function, error_class, error_code, details } => {
            format!("NAK for function 0x{for_function:02X}: class {error_class} code {error_code} {details:?}")
        }
        K::BscNpdu { from, broadcast, len } => format!(
            "NPDU of {len} bytes from {} ({})",
            from.as_deref().unwrap_or("?"),
            if *broadcast { "broadcast" } else { "unicast" }
        ),
        K::BscHeartbeatTimeout { hub } => format!("heartbeat timeout on {hub} hub"),
        K::BscRawFrame { name, len, result, error_code, .. } => match (result, error_code) {
            (Some(r), Some(c)) => format!("received {name} ({len} bytes): {r} code {c}"),
            (Some(r), None) => format!("received {name} ({len} bytes): {r}"),
            _ => format!("received {name} ({len} bytes)"),
        },
        K::BscRawClosed { code, reason } => match code {
            Some(c) => format!("closed by the hub: {c} {reason}"),
            None => format!("closed by the hub: {reason}"),
        },
        K::BscRawRefused { http_status, error } => match http_status {
            Some(s) => format!("refused with HTTP {s}: {error}"),
            None => format!("refused: {error}"),
        },
        K::Hub { event, detail } | K::Smp { event, detail } | K::Shelly { event, detail } => format!("{event}: {detail}"),
    }
}
