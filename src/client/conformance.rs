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
