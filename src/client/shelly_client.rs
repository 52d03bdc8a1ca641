//! The `shelly-client` actor's polling, as Home Assistant's coordinator polls a Gen2+
//! device: `Shelly.GetStatus` over the WebSocket (digest auth answered when the device
//! asks), read into numbered fields and flags a scenario can assert, the notifications
//! heard in between, and a reconnect when the socket drops.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::shelly_rpc::{RpcFailure, ShellyRpc};

/// The `src` the client's calls carry.
pub const SRC: &str = "hilbench-shelly-client";

/// One poll's reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShellyReading {
    /// `switch0_output`, `switch0_apower`, `switch0_aenergy_total`, `sys_uptime`, `rtt_ms`…
    pub values: BTreeMap<String, f64>,
    /// `switch0:on`, `switch0:overpower` (an entry of a component's `errors`), `cover0:open`.
    pub flags: Vec<String>,
}

/// Why a poll failed: the kind (`timeout`, `io`, `auth`, `rpc_error`, `malformed`) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellyPollError {
    pub kind: &'static str,
    pub detail: String,
}

/// Every error kind a poll reports.
pub const ERROR_KINDS: [&str; 5] = ["timeout", "io", "auth", "rpc_error", "malformed"];

/// One `Shelly.GetStatus`, answered (after a 401, once more with auth).
pub async fn poll_once(rpc: &mut ShellyRpc) -> Result<ShellyReading, ShellyPollError> {
    let asked = Instant::now();
    let status = rpc.result("Shelly.GetStatus", Value::Null).await.map_err(classify)?;
    let mut r = reading(&status).map_err(|detail| ShellyPollError { kind: "malformed", detail })?;
    r.values.insert("rtt_ms".into(), asked.elapsed().as_secs_f64() * 1000.0);
    Ok(r)
}

fn classify(e: RpcFailure) -> ShellyPollError {
    let kind = match &e {
        RpcFailure::Timeout(_) => "timeout",
        RpcFailure::Io(_) => "io",
        RpcFailure::Rpc { code: 401, .. } => "auth",
        RpcFailure::Rpc { .. } => "rpc_error",
        RpcFailure::Malformed(_) => "malformed",
    };
    ShellyPollError { kind, detail: e.to_string() }
}

/// A `Shelly.GetStatus` result as fields and flags: each component `type:N` gives
/// `typeN_KEY` for its numbers and booleans (1/0), one level of objects joined with `_`
/// (`switch0_aenergy_total`, `switch0_temperature_tC`); `sys` gives `sys_KEY`. Flags: an
/// output that is on (`switch0:on`), each entry of `errors` (`switch0:overpower`), a
/// cover's `state` (`cover0:open`).
pub fn reading(status: &Value) -> Result<ShellyReading, String> {
    let Value::Object(components) = status else { return Err(format!("Shelly.GetStatus gave {status}, not an object")) };
    let mut r = ShellyReading::default();
    for (key, c) in components {
        let Value::Object(fields) = c else { continue };
        let prefix = key.replace(':', "");
        for (k, v) in fields {
            match v {
                Value::Object(inner) => {
                    for (k2, v2) in inner {
                        if let Some(x) = number(v2) {
                            r.values.insert(format!("{prefix}_{k}_{k2}"), x);
                        }
                    }
                }
                Value::Array(errors) if k == "errors" => r.flags.extend(errors.iter().filter_map(Value::as_str).map(|e| format!("{prefix}:{e}"))),
                Value::String(state) if k == "state" => r.flags.push(format!("{prefix}:{state}")),
                _ => {
                    if let Some(x) = number(v) {
                        r.values.insert(format!("{prefix}_{k}"), x);
                    }
                }
            }
        }
        if fields.get("output") == Some(&Value::Bool(true)) {
            r.flags.push(format!("{prefix}:on"));
        }
    }
    Ok(r)
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

/// A notification heard, as `(event, detail)` for an observation: `notify_event` with
/// `input:0 single_push` per event, `notify_status` with the changed keys.
pub fn notification(note: &Value) -> Vec<(String, String)> {
    match note["method"].as_str() {
        Some("NotifyEvent") => note["params"]["events"]
            .as_array()
            .map(|events| events.iter().map(|e| ("notify_event".to_string(), format!("{} {}", e["component"].as_str().unwrap_or("?"), e["event"].as_str().unwrap_or("?")))).collect())
            .unwrap_or_default(),
        Some("NotifyStatus") => {
            let params = note["params"].as_object().map(|p| p.iter().filter(|(k, _)| *k != "ts").map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")).unwrap_or_default();
            vec![("notify_status".to_string(), params)]
        }
        Some(other) => vec![(other.to_ascii_lowercase(), note["params"].to_string())],
        None => Vec::new(),
    }
}

/// How long a reconnect waits between attempts.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_status_becomes_fields_and_flags() {
        let status = json!({
            "switch:0": {"id": 0, "source": "WS_in", "output": true, "apower": 60.5, "voltage": 230.1, "aenergy": {"total": 12.25, "by_minute": [1, 2, 3]}, "temperature": {"tC": 41.0, "tF": 105.8}, "errors": ["overpower"]},
            "cover:0": {"state": "open", "current_pos": 100},
            "input:0": {"id": 0, "state": false},
            "sys": {"uptime": 42, "mac": "441793000001"},
        });
        let r = reading(&status).unwrap();
        for (k, v) in [("switch0_output", 1.0), ("switch0_apower", 60.5), ("switch0_aenergy_total", 12.25), ("switch0_temperature_tC", 41.0), ("cover0_current_pos", 100.0), ("input0_state", 0.0), ("sys_uptime", 42.0)] {
            assert_eq!(r.values.get(k), Some(&v), "{k}: {:?}", r.values);
        }
        assert!(!r.values.contains_key("switch0_aenergy_by_minute") && !r.values.contains_key("sys_mac"));
        let mut flags = r.flags.clone();
        flags.sort();
        assert_eq!(flags, ["cover0:open", "switch0:on", "switch0:overpower"]);
        assert!(reading(&json!([1])).is_err());
    }

    #[test]
    fn notifications_become_observations() {
        let e = json!({"method": "NotifyEvent", "params": {"ts": 1.0, "events": [{"component": "input:0", "event": "single_push"}]}});
        assert_eq!(notification(&e), vec![("notify_event".to_string(), "input:0 single_push".to_string())]);
        let s = json!({"method": "NotifyStatus", "params": {"ts": 1.0, "switch:0": {"output": true}}});
        assert_eq!(notification(&s), vec![("notify_status".to_string(), "switch:0 {\"output\":true}".to_string())]);
    }

    #[test]
    fn errors_are_classified_by_kind_not_by_their_text() {
        assert_eq!(classify(RpcFailure::Timeout("Shelly.GetStatus: no answer within 1s".into())).kind, "timeout");
        assert_eq!(classify(RpcFailure::Rpc { code: 401, error: "…".into() }).kind, "auth");
        // An error whose message reads like a timeout is still the device's error.
        assert_eq!(classify(RpcFailure::Rpc { code: -109, error: "error: no answer within 5 s, shutting down".into() }).kind, "rpc_error");
        assert_eq!(classify(RpcFailure::Io("the WebSocket closed".into())).kind, "io");
        assert_eq!(classify(RpcFailure::Malformed("not JSON".into())).kind, "malformed");
    }
}
