//! What a `hilbench validate KIND` run reports: checks that pass, warn (it
//! works, but some clients will trip) or fail (it breaks the protocol as
//! documented), each with what was seen.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

pub fn check(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check { name, verdict, detail: detail.into() }
}

pub fn count(checks: &[Check], v: Verdict) -> usize {
    checks.iter().filter(|c| c.verdict == v).count()
}

/// One line per check and a line of totals.
pub fn render_checks(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let v = match c.verdict {
            Verdict::Pass => "pass",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        s.push_str(&format!("  {v}  {:<24} {}\n", c.name, c.detail));
    }
    s.push_str(&format!("{} passed, {} warnings, {} failed\n", count(checks, Verdict::Pass), count(checks, Verdict::Warn), count(checks, Verdict::Fail)));
    s
}

/// A scenario step's outcome from a validate run: every check an observation event
/// (`check_pass`, `check_warn`, `check_fail`, with `name: detail`) through `observe`; Ok
/// with a summary when exactly the checks in `fails` failed, Err naming an unexpected
/// failure or an expected one that passed.
pub fn step_outcome(checks: &[Check], fails: &[String], mut observe: impl FnMut(&'static str, String)) -> Result<String, String> {
    for c in checks {
        let event = match c.verdict {
            Verdict::Pass => "check_pass",
            Verdict::Warn => "check_warn",
            Verdict::Fail => "check_fail",
        };
        observe(event, format!("{}: {}", c.name, c.detail));
    }
    let failed: Vec<&str> = checks.iter().filter(|c| c.verdict == Verdict::Fail).map(|c| c.name).collect();
    let unexpected: Vec<String> = checks.iter().filter(|c| c.verdict == Verdict::Fail && !fails.iter().any(|f| f == c.name)).map(|c| format!("{}: {}", c.name, c.detail)).collect();
    let missing: Vec<&String> = fails.iter().filter(|f| !failed.contains(&f.as_str())).collect();
    let summary = format!("{} checks, failed: [{}]", checks.len(), failed.join(", "));
    match (unexpected.is_empty(), missing.is_empty()) {
        (true, true) => Ok(summary),
        (false, _) => Err(format!("{summary}; unexpected failures: {}", unexpected.join("; "))),
        (true, false) => Err(format!("{summary}; expected to fail but did not: {missing:?}")),
    }
}
