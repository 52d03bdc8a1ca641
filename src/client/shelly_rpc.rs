//! A Gen2+ Shelly's RPC as a client meets it: `GET /shelly` and a WebSocket session on
//! `/rpc` (calls by id, notifications, digest auth learnt from a 401 and answered as
//! aioshelly answers it). Shared by `hilbench validate shelly` and the `shelly-client`
//! actor.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::protocol::shelly::digest::{ha1, response, rpc_ha2, USERNAME};

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket RPC session with a Gen2+ device, as aioshelly holds one: calls by id,
/// notifications kept as they come between answers, digest auth learnt from a 401.
pub struct ShellyRpc {
    ws: Ws,
    next_id: u64,
    src: String,
    timeout: Duration,
    /// Notifications heard while waiting for answers.
    pub notes: Vec<Value>,
    /// The digest answer's inputs once a challenge came.
    auth: Option<(String, String, u64)>,
    password: Option<String>,
}

/// Notifications kept between reads of [`ShellyRpc::notes`]; a chattier device loses the
/// oldest past it rather than grow the client.
const MAX_NOTES: usize = 1024;

/// Why a call failed, by kind (a client reports the kind; the text says what).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcFailure {
    /// No answer within the timeout.
    Timeout(String),
    /// The socket failed or closed.
    Io(String),
    /// The device answered with an error object: its code and the whole error.
    Rpc { code: i64, error: String },
    /// An answer that is not a frame this client can read.
    Malformed(String),
}

impl std::fmt::Display for RpcFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcFailure::Timeout(s) | RpcFailure::Io(s) | RpcFailure::Malformed(s) | RpcFailure::Rpc { error: s, .. } => f.write_str(s),
        }
    }
}

impl From<RpcFailure> for String {
    fn from(e: RpcFailure) -> String {
        e.to_string()
    }
}

impl ShellyRpc {
    /// Opens `ws://HOST/rpc`; calls carry `src` and wait `timeout` for their answer.
    pub async fn connect(host: &str, password: Option<String>, src: &str, timeout: Duration) -> Result<ShellyRpc, String> {
        let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(host)).await.map_err(|_| format!("cannot connect to {host}: no answer within {timeout:?}"))?.map_err(|e| format!("cannot connect to {host}: {e}"))?;
        let open = tokio::time::timeout(timeout, tokio_tungstenite::client_async(format!("ws://{host}/rpc"), stream)).await.map_err(|_| "the WebSocket at /rpc did not open in time".to_string())?;
        let (ws, _) = open.map_err(|e| format!("the WebSocket at /rpc did not open: {e}"))?;
        Ok(ShellyRpc { ws, next_id: 0, src: src.to_string(), timeout, notes: Vec::new(), auth: None, password })
    }

    /// One call; its whole response frame. `authed`: attach digest auth once a challenge is known.
    pub async fn call(&mut self, method: &str, params: Value, authed: bool) -> Result<Value, RpcFailure> {
        self.next_id += 1;
        let id = self.next_id;
        let mut frame = json!({"id": id, "src": self.src, "method": method});
        if !params.is_null() {
            frame["params"] = params;
        }
        if let (true, Some((realm, nonce, nc)), Some(pw)) = (authed, self.auth.as_mut(), &self.password) {
            let cnonce = format!("{:x}", Instant::now().elapsed().as_nanos() ^ u128::from(id));
            let r = response(&ha1(realm, pw), nonce, &nc.to_string(), &cnonce, &rpc_ha2());
            frame["auth"] = json!({"realm": realm, "username": USERNAME, "nonce": serde_json::from_str::<Value>(nonce).unwrap_or_else(|_| Value::from(nonce.as_str())), "cnonce": cnonce, "response": r, "algorithm": "SHA-256", "nc": *nc});
            *nc += 1;
        }
        self.ws.send(Message::text(frame.to_string())).await.map_err(|e| RpcFailure::Io(format!("send: {e}")))?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next()).await.map_err(|_| RpcFailure::Timeout(format!("{method}: no answer within {:?}", self.timeout)))?;
            let m = m.ok_or_else(|| RpcFailure::Io("the WebSocket closed".into()))?.map_err(|e| RpcFailure::Io(format!("receive: {e}")))?;
            let text = match m {
                Message::Text(t) => t.as_str().to_string(),
                Message::Binary(_) => return Err(RpcFailure::Malformed(format!("{method}: a binary frame (aioshelly 13.35 mishandles it)"))),
                _ => continue,
            };
            let v: Value = serde_json::from_str(&text).map_err(|e| RpcFailure::Malformed(format!("{method}: an answer that is not JSON ({e}): {text}")))?;
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                return Ok(v);
            }
            if v.get("method").is_some() && v.get("id").is_none() {
                if self.notes.len() >= MAX_NOTES {
                    self.notes.remove(0);
                }
                self.notes.push(v);
            }
        }
    }

    /// A call that must succeed; retries once with auth after a 401, as aioshelly does.
    pub async fn result(&mut self, method: &str, params: Value) -> Result<Value, RpcFailure> {
        let mut v = self.call(method, params.clone(), true).await?;
        if v["error"]["code"] == 401 && self.password.is_some() {
            self.learn_challenge(&v).map_err(RpcFailure::Malformed)?;
            v = self.call(method, params, true).await?;
        }
        match (v.get("result"), v.get("error")) {
            (Some(r), None) => Ok(r.clone()),
            (_, Some(e)) => Err(RpcFailure::Rpc { code: e["code"].as_i64().unwrap_or(0), error: format!("{method}: error {e}") }),
            _ => Err(RpcFailure::Malformed(format!("{method}: neither result nor error: {v}"))),
        }
    }

    /// Takes the JSON challenge of a 401 answer for the next authed calls; the challenge.
    pub fn learn_challenge(&mut self, v: &Value) -> Result<Value, String> {
        let msg = v["error"]["message"].as_str().ok_or("a 401 without a message")?;
        let c: Value = serde_json::from_str(msg).map_err(|e| format!("the 401 message is not the JSON challenge ({e}): {msg}"))?;
        let realm = c["realm"].as_str().ok_or("the challenge has no realm")?.to_string();
        let nonce = match &c["nonce"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => return Err(format!("the challenge's nonce is {other}")),
        };
        self.auth = Some((realm, nonce, c["nc"].as_u64().unwrap_or(1)));
        Ok(c)
    }
}

/// `GET /shelly`: the device info, open without auth.
pub async fn get_shelly(host: &str, timeout: Duration) -> Result<Value, String> {
    let mut s = tokio::net::TcpStream::connect(host).await.map_err(|e| format!("cannot connect to {host}: {e}"))?;
    s.write_all(format!("GET /shelly HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    // A device info is a few hundred bytes; a megabyte is not one.
    tokio::time::timeout(timeout, (&mut s).take(1 << 20).read_to_end(&mut text)).await.map_err(|_| "GET /shelly: no answer".to_string())?.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&text);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("GET /shelly: not an HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("GET /shelly: {}", head.lines().next().unwrap_or_default()));
    }
    // A chunked body would need decoding; firmware sends a length.
    serde_json::from_str(body.trim()).map_err(|e| format!("GET /shelly: not JSON ({e})"))
}

