//! Shelly Gen2+ RPC as the firmware's mongoose-os RPC layer speaks it:
//! JSON-RPC 2.0 frames with `src`/`dst`, results and errors, notifications,
//! the error forms firmware sends, and digest authentication ([`digest`]).
//! Facts from `../shared/reference/shelly.md`.
//!
//! Sans-IO: bytes in, a typed [`RpcFrame`] out, and back. Nothing here
//! panics on any input; `fuzzing::shelly_frames_round_trip` checks it.
//!
//! * A frame with a `method` is a call: a request when it has an `id`, a
//!   notification when it has none. mg_rpc makes `id`, `src`, `params` and
//!   `jsonrpc` optional; ids are numbers or strings.
//! * A frame with `result` or `error` (and no `method`) is a response;
//!   `result: null` is a result.
//! * Anything else (not JSON, not an object, neither a method nor an
//!   outcome, a field of the wrong type) is a [`FrameError`], which a
//!   device drops as mg_rpc drops an invalid frame.

pub mod ble;
pub mod digest;

use serde_json::{json, Map, Value};

/// A frame's `id`: a number or a string (mg_rpc keeps it and echoes it).
pub type RpcId = Value;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum RpcFrame {
    Call(RpcCall),
    Response(RpcResponse),
}

/// A request (`id` set) or a notification (`id` absent).
#[derive(Debug, Clone, PartialEq)]
pub struct RpcCall {
    pub id: Option<RpcId>,
    pub src: Option<String>,
    pub dst: Option<String>,
    pub method: String,
    /// `params` (or mg_rpc's older `args`); `Value::Null` when absent.
    pub params: Value,
    /// The digest answer a client attaches after a 401.
    pub auth: Option<Value>,
}

/// An answer to a request.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcResponse {
    pub id: Option<RpcId>,
    pub src: Option<String>,
    pub dst: Option<String>,
    pub outcome: Result<Value, RpcError>,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("field `{field}` is not {expected}")]
    BadField { field: &'static str, expected: &'static str },
    #[error("neither `method` nor `result`/`error`")]
    Neither,
}

/// An RPC error as firmware sends it: `{code, message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

/// Error codes firmware uses.
pub mod code {
    pub const INVALID_ARGUMENT: i64 = -103;
    pub const DEADLINE_EXCEEDED: i64 = -104;
    pub const NOT_FOUND: i64 = -105;
    pub const FAILED_PRECONDITION: i64 = -106;
    pub const RESOURCE_EXHAUSTED: i64 = -108;
    pub const UNAVAILABLE: i64 = -109;
    pub const METHOD_FAILED: i64 = -114;
    pub const UNAUTHORIZED: i64 = 401;
    pub const NO_HANDLER: i64 = 404;
    pub const TOO_MANY_REQUESTS: i64 = 429;
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into() }
    }

    pub fn missing_argument(name: &str) -> RpcError {
        RpcError::new(code::INVALID_ARGUMENT, format!("Argument '{name}' is missing"))
    }

    /// An argument of the wrong type or out of range (the wording is a
    /// guess; the code is what clients check).
    pub fn invalid_argument(name: &str, why: &str) -> RpcError {
        RpcError::new(code::INVALID_ARGUMENT, format!("Invalid argument '{name}': {why}"))
    }

    /// `"Argument 'id', value 7 not found!"`
    pub fn id_not_found(name: &str, value: &Value) -> RpcError {
        RpcError::new(code::NOT_FOUND, format!("Argument '{name}', value {value} not found!"))
    }

    pub fn deadline_exceeded() -> RpcError {
        RpcError::new(code::DEADLINE_EXCEEDED, "Deadline exceeded")
    }

    pub fn failed_precondition(why: &str) -> RpcError {
        RpcError::new(code::FAILED_PRECONDITION, why)
    }

    pub fn resource_exhausted(what: &str) -> RpcError {
        RpcError::new(code::RESOURCE_EXHAUSTED, what)
    }

    /// A request while a reboot is pending.
    pub fn shutting_down(in_ms: u64) -> RpcError {
        RpcError::new(code::UNAVAILABLE, format!("shutting down in {in_ms} ms"))
    }

    /// mongoose-os's answer to an unknown method.
    pub fn no_handler(method: &str) -> RpcError {
        RpcError::new(code::NO_HANDLER, format!("No handler for {method}"))
    }

    /// The other firmware dialect for an unknown method.
    pub fn method_not_found(method: &str) -> RpcError {
        RpcError::new(code::METHOD_FAILED, format!("Method {method} failed: Method not found!"))
    }

    /// 401 whose message is the JSON challenge ([`digest::Challenge::to_message`]).
    pub fn unauthorized(challenge: &digest::Challenge) -> RpcError {
        RpcError::new(code::UNAUTHORIZED, challenge.to_message())
    }

    pub fn too_many_requests() -> RpcError {
        RpcError::new(code::TOO_MANY_REQUESTS, "Too many failed authentication attempts")
    }

    fn to_json(&self) -> Value {
        json!({"code": self.code, "message": self.message})
    }
}

fn opt_string(obj: &Map<String, Value>, field: &'static str) -> Result<Option<String>, FrameError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(FrameError::BadField { field, expected: "a string" }),
    }
}

fn opt_id(obj: &Map<String, Value>) -> Result<Option<RpcId>, FrameError> {
    match obj.get("id") {
        None | Some(Value::Null) => Ok(None),
        Some(v @ (Value::Number(_) | Value::String(_))) => Ok(Some(v.clone())),
        Some(_) => Err(FrameError::BadField { field: "id", expected: "a number or a string" }),
    }
}

fn decode_error(v: &Value) -> Result<RpcError, FrameError> {
    const BAD: FrameError = FrameError::BadField { field: "error", expected: "an object with an integer code" };
    let code = v.get("code").and_then(Value::as_i64).ok_or(BAD)?;
    let message = match v.get("message") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(FrameError::BadField { field: "error.message", expected: "a string" }),
    };
    Ok(RpcError { code, message })
}

/// Decodes one frame (a WebSocket message, an HTTP body, a BLE frame).
pub fn decode_frame(bytes: &[u8]) -> Result<RpcFrame, FrameError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| FrameError::NotJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(FrameError::NotObject);
    };
    let id = opt_id(&obj)?;
    let src = opt_string(&obj, "src")?;
    let dst = opt_string(&obj, "dst")?;
    if let Some(method) = obj.get("method") {
        let Value::String(method) = method else {
            return Err(FrameError::BadField { field: "method", expected: "a string" });
        };
        let params = obj.get("params").or_else(|| obj.get("args")).cloned().unwrap_or(Value::Null);
        let auth = obj.get("auth").filter(|a| !a.is_null()).cloned();
        return Ok(RpcFrame::Call(RpcCall { id, src, dst, method: method.clone(), params, auth }));
    }
    let outcome = match (obj.get("error"), obj.get("result")) {
        (Some(e), _) if !e.is_null() => Err(decode_error(e)?),
        (_, Some(r)) => Ok(r.clone()),
        _ => return Err(FrameError::Neither),
    };
    Ok(RpcFrame::Response(RpcResponse { id, src, dst, outcome }))
}

fn with_ends(mut frame: Map<String, Value>, src: &str, dst: Option<&str>) -> Map<String, Value> {
    frame.insert("src".into(), Value::from(src));
    if let Some(dst) = dst {
        frame.insert("dst".into(), Value::from(dst));
    }
    frame
}

/// A response: `{id, src, dst, result}` or `{id, src, dst, error}`. `dst` is
/// the requester's `src` (absent when it sent none); `id` is left out when
/// the request had none.
pub fn encode_response(id: Option<&RpcId>, src: &str, dst: Option<&str>, outcome: &Result<Value, RpcError>) -> Vec<u8> {
    let mut frame = Map::new();
    if let Some(id) = id {
        frame.insert("id".into(), id.clone());
    }
    match outcome {
        Ok(result) => frame.insert("result".into(), result.clone()),
        Err(e) => frame.insert("error".into(), e.to_json()),
    };
    serde_json::to_vec(&with_ends(frame, src, dst)).unwrap_or_default()
}

/// A notification: `{src, dst, method, params}`.
pub fn encode_notification(src: &str, dst: Option<&str>, method: &str, params: &Value) -> Vec<u8> {
    let mut frame = Map::new();
    frame.insert("method".into(), Value::from(method));
    frame.insert("params".into(), params.clone());
    serde_json::to_vec(&with_ends(frame, src, dst)).unwrap_or_default()
}

/// A request as a client sends it (`src` and `auth` optional).
pub fn encode_request(id: &RpcId, src: Option<&str>, method: &str, params: &Value, auth: Option<&Value>) -> Vec<u8> {
    let mut frame = Map::new();
    frame.insert("id".into(), id.clone());
    if let Some(src) = src {
        frame.insert("src".into(), Value::from(src));
    }
    frame.insert("method".into(), Value::from(method));
    if !params.is_null() {
        frame.insert("params".into(), params.clone());
    }
    if let Some(auth) = auth {
        frame.insert("auth".into(), auth.clone());
    }
    serde_json::to_vec(&Value::Object(frame)).unwrap_or_default()
}

/// Deep-merges a partial status (`NotifyStatus` params) into a full one as
/// clients do: objects merge key by key, `null` removes a key, anything
/// else replaces.
pub fn merge_status(into: &mut Value, partial: &Value) {
    match (into, partial) {
        (Value::Object(base), Value::Object(part)) => {
            for (k, v) in part {
                if v.is_null() {
                    base.remove(k);
                } else if let Some(slot) = base.get_mut(k) {
                    merge_status(slot, v);
                } else {
                    // A new object still drops its nulls.
                    let mut fresh = if v.is_object() { Value::Object(Map::new()) } else { Value::Null };
                    merge_status(&mut fresh, v);
                    base.insert(k.clone(), fresh);
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// The changed keys from `old` to `new` as a `NotifyStatus` partial: only
/// keys whose value changed, nested objects diffed, `null` for a key that
/// went away; `None` when nothing changed.
pub fn status_delta(old: &Value, new: &Value) -> Option<Value> {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut delta = Map::new();
            for (k, nv) in b {
                match a.get(k) {
                    Some(ov) => {
                        if let Some(d) = status_delta(ov, nv) {
                            delta.insert(k.clone(), d);
                        }
                    }
                    None => {
                        delta.insert(k.clone(), nv.clone());
                    }
                }
            }
            for k in a.keys().filter(|k| !b.contains_key(*k)) {
                delta.insert(k.clone(), Value::Null);
            }
            (!delta.is_empty()).then_some(Value::Object(delta))
        }
        (a, b) if a == b => None,
        (_, b) => Some(b.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_with_and_without_id_src_and_params() {
        let f = decode_frame(br#"{"id":1,"src":"ha","method":"Shelly.GetStatus"}"#).unwrap();
        let RpcFrame::Call(c) = f else { panic!() };
        assert_eq!((c.id, c.src.as_deref(), c.method.as_str(), c.params), (Some(json!(1)), Some("ha"), "Shelly.GetStatus", Value::Null));

        // aioshelly over BLE: no src; shellies-ng: jsonrpc and string ids.
        let RpcFrame::Call(c) = decode_frame(br#"{"id":"a7","method":"Switch.Set","params":{"id":0,"on":true}}"#).unwrap() else { panic!() };
        assert_eq!((c.id, c.src, c.params["on"].clone()), (Some(json!("a7")), None, json!(true)));
        let RpcFrame::Call(c) = decode_frame(br#"{"jsonrpc":"2.0","id":5,"src":"x","method":"M","args":{"a":1}}"#).unwrap() else { panic!() };
        assert_eq!(c.params, json!({"a": 1}));

        // A notification has no id.
        let RpcFrame::Call(n) = decode_frame(br#"{"src":"shellyplus1pm-1","dst":"ha","method":"NotifyStatus","params":{"ts":1.5}}"#).unwrap() else { panic!() };
        assert_eq!(n.id, None);
    }

    #[test]
    fn responses_results_null_and_errors() {
        let RpcFrame::Response(r) = decode_frame(br#"{"id":3,"src":"d","dst":"c","result":null}"#).unwrap() else { panic!() };
        assert_eq!(r.outcome, Ok(Value::Null));
        let RpcFrame::Response(r) = decode_frame(br#"{"id":3,"src":"d","error":{"code":404,"message":"No handler for X.Y"}}"#).unwrap() else { panic!() };
        assert_eq!(r.outcome, Err(RpcError::no_handler("X.Y")));
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(matches!(decode_frame(b"{\"id\":"), Err(FrameError::NotJson(_))));
        assert_eq!(decode_frame(b"[1,2]"), Err(FrameError::NotObject));
        assert_eq!(decode_frame(br#"{"id":1}"#), Err(FrameError::Neither));
        assert_eq!(decode_frame(br#"{"id":[1],"method":"M"}"#), Err(FrameError::BadField { field: "id", expected: "a number or a string" }));
        assert_eq!(decode_frame(br#"{"id":1,"method":7}"#), Err(FrameError::BadField { field: "method", expected: "a string" }));
        assert!(decode_frame(br#"{"id":1,"error":{"message":"x"}}"#).is_err());
        let deep = "[".repeat(100_000);
        assert!(decode_frame(deep.as_bytes()).is_err());
    }

    #[test]
    fn encoders_round_trip() {
        let e = RpcError::shutting_down(952);
        let bytes = encode_response(Some(&json!(9)), "shellyplus1pm-aa", Some("ha"), &Err(e.clone()));
        let RpcFrame::Response(r) = decode_frame(&bytes).unwrap() else { panic!() };
        assert_eq!((r.id, r.src.as_deref(), r.dst.as_deref(), r.outcome), (Some(json!(9)), Some("shellyplus1pm-aa"), Some("ha"), Err(e)));
        let bytes = encode_notification("dev", Some("ha"), "NotifyStatus", &json!({"ts": 1.0}));
        let RpcFrame::Call(c) = decode_frame(&bytes).unwrap() else { panic!() };
        assert_eq!((c.id, c.method.as_str()), (None, "NotifyStatus"));
        let bytes = encode_request(&json!(2), None, "Shelly.GetDeviceInfo", &Value::Null, None);
        assert_eq!(bytes, br#"{"id":2,"method":"Shelly.GetDeviceInfo"}"#);
    }

    #[test]
    fn status_deltas_merge_back() {
        let old = json!({"switch:0": {"output": false, "apower": 0.0, "errors": ["overpower"]}, "sys": {"uptime": 5}});
        let new = json!({"switch:0": {"output": true, "apower": 0.0}, "sys": {"uptime": 6}});
        let delta = status_delta(&old, &new).unwrap();
        assert_eq!(delta, json!({"switch:0": {"output": true, "errors": null}, "sys": {"uptime": 6}}));
        let mut merged = old.clone();
        merge_status(&mut merged, &delta);
        assert_eq!(merged, new);
        assert_eq!(status_delta(&new, &new), None);
    }

    /// Seeded random inputs through the fuzz harness: raw bytes, and JSON
    /// objects built from frame-like keys with random values (some cut
    /// short), so decoding gets past the parser.
    #[test]
    fn seeded_random_inputs_keep_the_invariants() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5348_0001);
        const KEYS: [&str; 9] = ["id", "src", "dst", "method", "params", "result", "error", "auth", "code"];
        fn value(rng: &mut impl Rng, depth: u32) -> Value {
            match rng.gen_range(0..if depth > 2 { 5 } else { 7 }) {
                0 => Value::Null,
                1 => Value::from(rng.gen::<bool>()),
                2 => Value::from(rng.gen_range(-500i64..500)),
                3 => Value::from(rng.gen::<f64>() * 1e6),
                4 => Value::from(["Shelly.GetStatus", "x", "", "admin", "SHA-256"][rng.gen_range(0..5)]),
                5 => Value::Array((0..rng.gen_range(0..3)).map(|_| value(rng, depth + 1)).collect()),
                _ => Value::Object((0..rng.gen_range(0..4)).map(|_| (KEYS[rng.gen_range(0..KEYS.len())].to_string(), value(rng, depth + 1))).collect()),
            }
        }
        let mut reached = 0;
        for i in 0..4000 {
            let data: Vec<u8> = if i % 3 == 0 {
                (0..rng.gen_range(0..200)).map(|_| rng.gen()).collect()
            } else {
                let mut obj = Map::new();
                if rng.gen_bool(0.5) {
                    obj.insert("method".into(), Value::from("Switch.Set"));
                    obj.insert("id".into(), Value::from(rng.gen_range(0..9)));
                }
                for _ in 0..rng.gen_range(0..6) {
                    obj.insert(KEYS[rng.gen_range(0..KEYS.len())].to_string(), value(&mut rng, 0));
                }
                let mut bytes = serde_json::to_vec(&Value::Object(obj)).unwrap();
                if rng.gen_bool(0.1) {
                    bytes.truncate(rng.gen_range(0..=bytes.len()));
                }
                bytes
            };
            reached += usize::from(crate::fuzzing::shelly_frames_round_trip(&data));
        }
        assert!(reached > 500, "only {reached} inputs got past decoding");
    }
}
