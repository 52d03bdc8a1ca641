//! The `expect_*` steps that read the run's observations and processes.
//! Each waits for the event it checks, up to its `within`.

use std::time::{Duration, Instant};

use super::process::RunningProcess;
use super::spec::*;
use crate::observe::{Observation, ObservationKind, ObservationLog};

pub const DEFAULT_WITHIN: Duration = Duration::from_secs(5);
pub const POLL: Duration = Duration::from_millis(10);

pub fn within(d: Option<Dur>) -> Duration {
    d.map(|d| d.0).unwrap_or(DEFAULT_WITHIN)
}

/// Checks `count()` against `at_least`/`at_most` over a window: passes as
/// soon as `at_least` is met (when there is no `at_most`), otherwise waits
/// the window out.
pub async fn count_check<F: std::future::Future<Output = usize>>(
    at_least: Option<usize>,
    at_most: Option<usize>,
    window: Duration,
    what: &str,
    count: impl Fn() -> F,
) -> Result<String, String> {
    let deadline = Instant::now() + window;
    loop {
        let n = count().await;
        if let Some(max) = at_most {
            if n > max {
                return Err(format!("{n} {what}, expected at most {max}"));
            }
        }
        if at_most.is_none() && at_least.is_none_or(|m| n >= m) {
            return Ok(format!("{n} {what}"));
        }
        if Instant::now() >= deadline {
            return match at_least {
                Some(m) if n < m => Err(format!(
                    "{n} {what} within {}, expected at least {m}",
                    humantime::format_duration(window)
                )),
                _ => Ok(format!("{n} {what}")),
            };
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn reading(e: &ExpectReading, log: &ObservationLog, step_start: f64) -> Result<String, String> {
    let window = within(e.within);
    let deadline = Instant::now() + window;
    let tol = e.tolerance.unwrap_or(0.0);
    let ok = |v: f64| {
        e.equals.is_none_or(|x| (v - x).abs() <= tol)
            && e.min.is_none_or(|m| v >= m)
            && e.max.is_none_or(|m| v <= m)
    };
    let mut last: Option<f64> = None;
    loop {
        let found = log.find_since(step_start, |o| {
            o.source == e.client
                && matches!(&o.kind, ObservationKind::Reading { address, values, .. }
                    if e.address.is_none_or(|a| a == *address) && values.contains_key(&e.field))
        });
        if let Some(Observation {
            kind: ObservationKind::Reading { values, .. },
            t_ms,
            ..
        }) = found
        {
            let v = values[&e.field];
            last = Some(v);
            if ok(v) {
                return Ok(format!("{} = {v} at {:.0} ms", e.field, t_ms));
            }
        }
        if Instant::now() >= deadline {
            let want = describe_bounds(e);
            return Err(match last {
                Some(v) => format!(
                    "{} from `{}` was {v}, expected {want} (waited {})",
                    e.field,
                    e.client,
                    humantime::format_duration(window)
                ),
                None => {
                    let errs = log.count_since(step_start, |o| {
                        o.source == e.client && matches!(o.kind, ObservationKind::Error { .. })
                    });
                    format!(
                        "no reading with `{}` from `{}` within {} ({errs} errors meanwhile)",
                        e.field,
                        e.client,
                        humantime::format_duration(window)
                    )
                }
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn flag(e: &ExpectFlag, log: &ObservationLog, step_start: f64) -> Result<String, String> {
    let window = within(e.within);
    let deadline = Instant::now() + window;
    loop {
        let found = log.find_since(step_start, |o| {
            o.source == e.client
                && matches!(&o.kind, ObservationKind::Reading { address, .. }
                    if e.address.is_none_or(|a| a == *address))
        });
        let mut seen_flags = None;
        if let Some(Observation {
            kind: ObservationKind::Reading { flags, .. },
            ..
        }) = found
        {
            if flags.contains(&e.flag) == e.present {
                return Ok(format!("flag {} {}", e.flag, if e.present { "present" } else { "absent" }));
            }
            seen_flags = Some(flags);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "flag `{}` expected {} in readings from `{}` within {}; last flags: {}",
                e.flag,
                if e.present { "present" } else { "absent" },
                e.client,
                humantime::format_duration(window),
                seen_flags.map_or("(no reading)".to_string(), |f| format!("{f:?}"))
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn errors(e: &ExpectErrors, log: &ObservationLog, step_start: f64) -> Result<String, String> {
    let since = if e.since_start { 0.0 } else { step_start };
    let what = format!("{} errors from `{}`", e.kind.as_deref().unwrap_or("any"), e.client);
    count_check(e.at_least, e.at_most, within(e.within), &what, || {
        std::future::ready(log.count_since(since, |o| {
            o.source == e.client
                && match &o.kind {
                    ObservationKind::Error { address, kind, .. } => {
                        e.address.is_none_or(|a| a == *address)
                            && e.kind.as_deref().is_none_or(|k| k == kind)
                    }
                    ObservationKind::GaveUp { address, .. } => {
                        e.address.is_none_or(|a| a == *address) && e.kind.as_deref() == Some("gave_up")
                    }
                    _ => false,
                }
        }))
    })
    .await
}

pub async fn observation(e: &ExpectObservation, log: &ObservationLog, step_start: f64) -> Result<String, String> {
    let since = if e.since_start { 0.0 } else { step_start };
    let what = match &e.contains {
        Some(c) => format!("{} observations containing `{c}`", e.kind),
        None => format!("{} observations", e.kind),
    };
    let result = count_check(e.at_least, e.at_most, within(e.within), &what, || {
        std::future::ready(log.count_since(since, |o| {
            e.source.as_deref().is_none_or(|s| s == o.source)
                && o.kind.name() == e.kind
                && e.contains.as_deref().is_none_or(|c| {
                    serde_json::to_string(&o.kind).is_ok_and(|j| j.contains(c))
                })
        }))
    })
    .await;
    result.map_err(|m| {
        // Show what did arrive of that kind: the usual reason is a detail mismatch.
        let seen: Vec<String> = log
            .snapshot()
            .iter()
            .filter(|o| o.t_ms >= since && o.kind.name() == e.kind)
            .rev()
            .take(3)
            .map(|o| serde_json::to_string(o).unwrap_or_default())
            .collect();
        if seen.is_empty() { m } else { format!("{m}; latest of that kind: {}", seen.join(" | ")) }
    })
}

pub async fn output(e: &ExpectOutput, processes: &mut [RunningProcess]) -> Result<String, String> {
    let window = within(e.within);
    let deadline = Instant::now() + window;
    let p = processes
        .iter_mut()
        .find(|p| p.name == e.process)
        .ok_or_else(|| format!("no process `{}`", e.process))?;
    let mut exited_polls = 0;
    loop {
        if e.absent {
            if p.has_line(&e.contains) {
                return Err(format!("`{}` printed `{}`; last output:\n  {}", e.process, e.contains, p.tail(10).join("\n  ")));
            }
            // After the exit, a few more polls let its last output be read.
            if p.poll_exit().is_some() {
                exited_polls += 1;
            }
            if exited_polls > 3 || Instant::now() >= deadline {
                return Ok(format!("`{}` did not print `{}`", e.process, e.contains));
            }
            tokio::time::sleep(POLL).await;
            continue;
        }
        if p.has_line(&e.contains) {
            return Ok(format!("`{}` printed `{}`", e.process, e.contains));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "`{}` did not print `{}` within {}; last output:\n  {}",
                e.process,
                e.contains,
                humantime::format_duration(window),
                p.tail(10).join("\n  ")
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn exit(e: &ExpectExit, processes: &mut [RunningProcess]) -> Result<String, String> {
    let window = within(e.within);
    let deadline = Instant::now() + window;
    let p = processes
        .iter_mut()
        .find(|p| p.name == e.process)
        .ok_or_else(|| format!("no process `{}`", e.process))?;
    loop {
        if let Some(code) = p.poll_exit() {
            return match e.code {
                Some(want) if want != code => Err(format!(
                    "`{}` exited with {code}, expected {want}; last output:\n  {}",
                    e.process,
                    p.tail(10).join("\n  ")
                )),
                _ => Ok(format!("`{}` exited with {code}", e.process)),
            };
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "`{}` still running after {}",
                e.process,
                humantime::format_duration(window)
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn describe_bounds(e: &ExpectReading) -> String {
    let mut parts = vec![];
    if let Some(x) = e.equals {
        parts.push(format!("{x} ± {}", e.tolerance.unwrap_or(0.0)));
    }
    if let Some(m) = e.min {
        parts.push(format!(">= {m}"));
    }
    if let Some(m) = e.max {
        parts.push(format!("<= {m}"));
    }
    parts.join(" and ")
}
