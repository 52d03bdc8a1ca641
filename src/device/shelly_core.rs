//! A Shelly Gen2+ device as its firmware answers RPC, sans-IO: frames (a
//! WebSocket message, a BLE frame) or HTTP calls and the time in; answers,
//! notifications and closes out. Facts from `../shared/reference/shelly.md`;
//! each model is a real device's dump ([`models`]) kept live by the relay,
//! cover and meter models (`model::relay`).
//!
//! * Every component has `GetConfig`, `SetConfig`, `GetStatus`; Shelly.*
//!   has GetDeviceInfo, GetStatus, GetConfig, ListMethods, GetComponents
//!   (paged, `dynamic_only`), Reboot, Update, CheckForUpdate, SetAuth;
//!   Switch Set/Toggle/ResetCounters, Cover Open/Close/Stop/GoToPosition/
//!   Calibrate, Input Trigger, WiFi Scan, KVS Set/Get/GetMany/List/Delete.
//!   ListMethods lists exactly what the model answers.
//! * An unknown method is `404 "No handler for X"` (mongoose-os), or the
//!   `-114` dialect when configured.
//! * With a password, every call but `Shelly.GetDeviceInfo` needs digest
//!   auth ([`digest`]); a 401's message is the JSON challenge.
//! * Notifications go to each connected peer that has sent a request with
//!   a `src` (as WebSocket firmware does): `NotifyStatus` with only the
//!   changed keys (`null` for one that went away), `NotifyEvent` for input
//!   pushes and a scheduled restart. Energy counters move once a minute.
//! * `Shelly.Reboot {delay_ms}` answers `null`; until the delay ends calls
//!   get `-109 "shutting down in N ms"`, then every peer is closed and the
//!   device is gone for its boot time (bytes dropped, peers refused); it
//!   comes back with uptime 0, new nonces and the relays' `initial_state`.
//!
//! Choices where the reference is silent (each a guess a capture could
//! overturn): a call without an `id` is answered without one; an invalid
//! frame is dropped in silence (mg_rpc logs and drops it); unknown keys in
//! `SetConfig` are ignored; GetComponents pages hold 10 components;
//! `Shelly.Update` with nothing to install is `-106`.

mod methods;
pub mod models;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::model::relay::{CoverModel, Phase, RelayMeter};
use crate::protocol::shelly::digest::{AuthFailure, AuthMode, DigestAnswer, DigestAuth, NONCE_LIFETIME};
use crate::protocol::shelly::{self, RpcCall, RpcError, RpcFrame};
use crate::sans_io::{Input, Output, Peer, SansIoCore};

pub use models::{ModelSpec, MODELS};

/// The longest reboot delay and boot time a device accepts.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// How firmware answers a method it does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownMethod {
    /// `404 "No handler for X"` (mongoose-os, current firmware).
    #[default]
    NoHandler,
    /// `-114 "Method X failed: Method not found!"`.
    MethodFailed,
}

/// How a device is made.
#[derive(Debug, Clone)]
pub struct ShellyConfig {
    pub model: String,
    /// Primary MAC; `None`: the model's vendor prefix and bytes from `seed`.
    pub mac: Option<String>,
    pub name: Option<String>,
    /// `Some`: authentication is on.
    pub password: Option<String>,
    pub auth_mode: AuthMode,
    pub unknown_method: UnknownMethod,
    /// The unix time at `now` zero.
    pub unix_at_zero: u64,
    /// Seeds the nonces, the MAC and the Wi-Fi scan.
    pub seed: u64,
    pub boot_time: Duration,
    /// How long a digest nonce is good for (firmware: an hour).
    pub nonce_lifetime: Duration,
    /// HTTP status per RPC error code, over the defaults (which status firmware gives
    /// each is not certain: a user sets what theirs does).
    pub http_status: BTreeMap<i64, u16>,
}

impl Default for ShellyConfig {
    fn default() -> ShellyConfig {
        ShellyConfig {
            model: "plus1pm".into(),
            mac: None,
            name: None,
            password: None,
            auth_mode: AuthMode::V1,
            unknown_method: UnknownMethod::NoHandler,
            unix_at_zero: 1_767_225_600,
            seed: 1,
            boot_time: Duration::from_secs(2),
            nonce_lifetime: NONCE_LIFETIME,
            http_status: BTreeMap::new(),
        }
    }
}

/// What a device reports to observers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ShellyEvent {
    /// A call was answered (`code` 0: a result).
    Call { method: String, code: i64 },
    /// Bytes that are not a frame were dropped.
    Invalid { reason: String },
    Notify { method: String },
    /// The device went down for its reboot.
    Rebooted,
    /// It is back.
    Up,
}

/// An HTTP RPC's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpAnswer {
    pub status: u16,
    /// How long the answer waits before it goes (`slow_ms`), as the WebSocket and BLE
    /// answers do.
    pub delay: Duration,
    pub body: Vec<u8>,
    pub www_authenticate: Option<String>,
}

/// State keys `Input::Set` takes (`N` an index).
pub const STATE_KEYS: &[(&str, &str)] = &[
    ("switchN_on", "switch N's relay (0 off, 1 on)"),
    ("switchN_load_w", "watts the load on switch N draws while on"),
    ("switchN_temperature_c", "switch N's temperature"),
    ("voltage", "mains voltage on every channel and phase"),
    ("inputN", "input N's state (0/1); switches in follow/flip mode follow it"),
    ("inputN_event", "an input N event: 1 single_push, 2 double_push, 3 long_push, 4 triple_push"),
    ("coverN_pos", "cover N's position, 0 closed … 100 open"),
    ("phase_a_current", "phase a/b/c current (A) of the energy meter; also _voltage, _pf"),
    ("auth", "1: authentication on with the configured password, 0: off"),
    ("reboot", "reboot after this many ms (as Shelly.Reboot)"),
    ("slow_ms", "answer every call this many ms late"),
];

/// One Shelly device.
#[derive(Debug)]
pub struct ShellyDevice {
    spec: &'static ModelSpec,
    id: String,
    shelly: Value,
    config: Map<String, Value>,
    template_status: Map<String, Value>,
    dynamic: Vec<Value>,
    cfg_rev: u64,
    switches: BTreeMap<u32, RelayMeter>,
    covers: BTreeMap<u32, CoverModel>,
    inputs: BTreeMap<u32, bool>,
    phases: Vec<Phase>,
    password: Option<String>,
    auth_mode: AuthMode,
    auth: Option<DigestAuth>,
    kvs: BTreeMap<String, Value>,
    kvs_rev: u64,
    /// Connected peers and the `src` each gave (notifications go to those with one).
    peers: BTreeMap<Peer, Option<String>>,
    reported: Value,
    pending_events: Vec<Value>,
    delayed: Vec<(Duration, Output<ShellyEvent>)>,
    slow: Duration,
    last_tick: Duration,
    booted_at: Duration,
    reboot_at: Option<Duration>,
    up_at: Option<Duration>,
    unknown_method: UnknownMethod,
    /// HTTP status per error code, over [`http_status`]'s.
    http_status: BTreeMap<i64, u16>,
    unix_at_zero: u64,
    seed: u64,
    boot_time: Duration,
    nonce_lifetime: Duration,
    events: Vec<ShellyEvent>,
    /// What a switch or cover reports as the `source` of a change the
    /// current call makes (`WS_in`, `HTTP_in`).
    call_source: &'static str,
    /// Something may have changed since the last report (so the status is
    /// rendered and diffed only then, not after every read-only call).
    dirty: bool,
}

fn component_index(key: &str) -> Option<(&str, u32)> {
    let (kind, id) = key.split_once(':')?;
    Some((kind, id.parse().ok()?))
}

impl ShellyDevice {
    pub fn new(config: ShellyConfig) -> Result<ShellyDevice, String> {
        let spec = models::find(&config.model)?;
        let mac = match &config.mac {
            Some(m) => models::normalize_mac(m)?,
            None => spec.default_mac(config.seed),
        };
        if config.boot_time > MAX_DELAY {
            return Err(format!("boot time {:?} is over {:?}", config.boot_time, MAX_DELAY));
        }
        let dump = spec.load(&mac);
        let id = dump.shelly["id"].as_str().unwrap_or_default().to_string();
        let unix = config.unix_at_zero;
        let mut dev = ShellyDevice {
            spec,
            id,
            shelly: dump.shelly,
            config: dump.config.as_object().cloned().unwrap_or_default(),
            template_status: dump.status.as_object().cloned().unwrap_or_default(),
            dynamic: dump.components,
            cfg_rev: 0,
            switches: BTreeMap::new(),
            covers: BTreeMap::new(),
            inputs: BTreeMap::new(),
            phases: Vec::new(),
            password: None,
            auth_mode: config.auth_mode,
            auth: None,
            kvs: BTreeMap::new(),
            kvs_rev: 0,
            peers: BTreeMap::new(),
            reported: Value::Null,
            pending_events: Vec::new(),
            delayed: Vec::new(),
            slow: Duration::ZERO,
            last_tick: Duration::ZERO,
            booted_at: Duration::ZERO,
            reboot_at: None,
            up_at: None,
            unknown_method: config.unknown_method,
            http_status: config.http_status.clone(),
            unix_at_zero: unix,
            seed: config.seed,
            boot_time: config.boot_time,
            nonce_lifetime: config.nonce_lifetime,
            events: Vec::new(),
            call_source: "WS_in",
            dirty: false,
        };
        dev.cfg_rev = dev.config.get("sys").and_then(|s| s["cfg_rev"].as_u64()).unwrap_or(1);
        if let Some(name) = &config.name {
            dev.shelly["name"] = Value::from(name.as_str());
            if let Some(sys) = dev.config.get_mut("sys") {
                sys["device"]["name"] = Value::from(name.as_str());
            }
        }
        dev.build_models(unix);
        dev.set_password(config.password.clone());
        dev.reported = dev.notify_snapshot(Duration::ZERO);
        Ok(dev)
    }

    /// The models behind the dump's components, started from its values.
    fn build_models(&mut self, unix: u64) {
        for (key, status) in self.template_status.clone() {
            let Some((kind, n)) = component_index(&key) else { continue };
            let cfg = self.config.get(&key).cloned().unwrap_or(Value::Null);
            let f = |k: &str, d: f64| status[k].as_f64().unwrap_or(d);
            match kind {
                "switch" => {
                    let mut r = RelayMeter::new(unix);
                    r.voltage = f("voltage", 230.0);
                    r.freq = f("freq", 50.0);
                    r.temperature_c = status["temperature"]["tC"].as_f64().unwrap_or(45.0);
                    r.energy.total_wh = status["aenergy"]["total"].as_f64().unwrap_or(0.0);
                    r.output = status["output"].as_bool().unwrap_or(false);
                    r.load_w = if r.output { f("apower", 0.0) } else { 0.0 };
                    r.pf = if r.load_w > 0.0 && r.voltage > 0.0 { (r.load_w / (r.voltage * f("current", 0.0).max(1e-9))).clamp(0.05, 1.0) } else { 1.0 };
                    apply_switch_limits(&mut r, &cfg);
                    self.switches.insert(n, r);
                }
                "cover" => {
                    let mut c = CoverModel::new(unix);
                    c.voltage = f("voltage", 230.0);
                    c.freq = f("freq", 50.0);
                    c.position = f("current_pos", 0.0);
                    c.temperature_c = status["temperature"]["tC"].as_f64().unwrap_or(45.0);
                    c.energy.total_wh = status["aenergy"]["total"].as_f64().unwrap_or(0.0);
                    c.state = match status["state"].as_str() {
                        Some("open") => crate::model::relay::CoverState::Open,
                        Some("closed") => crate::model::relay::CoverState::Closed,
                        _ => crate::model::relay::CoverState::Stopped,
                    };
                    apply_cover_limits(&mut c, &cfg);
                    self.covers.insert(n, c);
                }
                "input" => {
                    self.inputs.insert(n, status["state"].as_bool().unwrap_or(false));
                }
                "em" => {
                    for p in ["a", "b", "c"] {
                        let mut ph = Phase::new(unix);
                        ph.voltage = status[format!("{p}_voltage")].as_f64().unwrap_or(230.0);
                        ph.current = status[format!("{p}_current")].as_f64().unwrap_or(0.0);
                        ph.pf = status[format!("{p}_pf")].as_f64().unwrap_or(1.0);
                        ph.freq = status[format!("{p}_freq")].as_f64().unwrap_or(50.0);
                        let data = &self.template_status["emdata:0"];
                        ph.act_energy.total_wh = data[format!("{p}_total_act_energy")].as_f64().unwrap_or(0.0);
                        ph.ret_energy.total_wh = data[format!("{p}_total_act_ret_energy")].as_f64().unwrap_or(0.0);
                        self.phases.push(ph);
                    }
                }
                "em1" => {
                    let mut ph = Phase::new(unix);
                    ph.voltage = f("voltage", 230.0);
                    ph.current = f("current", 0.0);
                    ph.pf = f("pf", 1.0);
                    ph.freq = f("freq", 50.0);
                    let data = &self.template_status[&format!("em1data:{n}")];
                    ph.act_energy.total_wh = data["total_act_energy"].as_f64().unwrap_or(0.0);
                    ph.ret_energy.total_wh = data["total_act_ret_energy"].as_f64().unwrap_or(0.0);
                    self.phases.push(ph);
                }
                _ => {}
            }
        }
    }

    fn set_password(&mut self, password: Option<String>) {
        self.password = password;
        self.auth = self.password.clone().map(|p| self.new_auth(&p));
    }

    /// Digest state for `password` with this device's mode, realm and nonce lifetime.
    fn new_auth(&self, password: &str) -> DigestAuth {
        DigestAuth::new(self.auth_mode, &self.id, password, self.unix_at_zero, self.seed).with_nonce_lifetime(self.nonce_lifetime)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn spec(&self) -> &'static ModelSpec {
        self.spec
    }

    /// The name it goes by on BLE and mDNS: `ShellyPlus1PM-441793D69718`,
    /// `Shelly1PMG3-34B7DAC68344` (app `S1PMG3`).
    pub fn host_name(&self) -> String {
        let app = self.shelly["app"].as_str().unwrap_or("Device");
        let app = match app.strip_prefix('S') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => rest,
            _ => app,
        };
        format!("Shelly{app}-{}", self.shelly["mac"].as_str().unwrap_or_default())
    }

    /// The primary MAC, 12 upper-case hex digits.
    pub fn mac(&self) -> &str {
        self.shelly["mac"].as_str().unwrap_or_default()
    }

    pub fn auth_enabled(&self) -> bool {
        self.auth.is_some()
    }

    pub fn take_events(&mut self) -> Vec<ShellyEvent> {
        std::mem::take(&mut self.events)
    }

    fn unix(&self, now: Duration) -> f64 {
        self.unix_at_zero as f64 + now.as_secs_f64()
    }

    /// Between a reboot and the end of its boot time.
    pub fn is_down(&self) -> bool {
        self.up_at.is_some()
    }

    /// `GET /shelly` and `Shelly.GetDeviceInfo`: open without auth.
    pub fn device_info(&self) -> Value {
        let mut info = self.shelly.clone();
        info["auth_en"] = Value::from(self.auth.is_some());
        info["auth_domain"] = Value::Null;
        info
    }

    /// Advances the models to `now`.
    fn advance(&mut self, now: Duration) {
        let dt = now.saturating_sub(self.last_tick);
        if dt.is_zero() && now != Duration::ZERO {
            return;
        }
        self.last_tick = self.last_tick.max(now);
        let unix = self.unix(now) as u64;
        let mut changed = false;
        for r in self.switches.values_mut() {
            changed |= r.advance(dt, now, unix);
        }
        for c in self.covers.values_mut() {
            changed |= c.advance(dt, unix);
        }
        for p in &mut self.phases {
            changed |= p.advance(dt, unix);
        }
        self.dirty |= changed;
    }

    fn check_auth(&mut self, method: &str, answer: Option<DigestAnswer>, now: Duration) -> Result<(), RpcError> {
        if method.eq_ignore_ascii_case("Shelly.GetDeviceInfo") {
            return Ok(());
        }
        let Some(auth) = self.auth.as_mut() else { return Ok(()) };
        match auth.check(answer.as_ref(), now) {
            Ok(()) => Ok(()),
            Err(AuthFailure::Challenge(c)) => Err(RpcError::unauthorized(&c)),
            Err(AuthFailure::Throttled) => Err(RpcError::too_many_requests()),
        }
    }

    /// One call, authenticated by `answer` (from the frame or the HTTP header).
    fn call(&mut self, method: &str, params: &Value, answer: Option<DigestAnswer>, now: Duration) -> Result<Value, RpcError> {
        if let Some(at) = self.reboot_at {
            return Err(RpcError::shutting_down(at.saturating_sub(now).as_millis() as u64));
        }
        self.check_auth(method, answer, now)?;
        // Reads change nothing a notification reports; anything else may.
        let verb = method.rsplit('.').next().unwrap_or_default().to_ascii_lowercase();
        if !(verb.starts_with("get") || verb.starts_with("list") || verb == "checkforupdate") {
            self.dirty = true;
        }
        self.dispatch(method, params, now)
    }

    fn emit(&mut self, to: Peer, bytes: Vec<u8>, now: Duration, out: &mut Vec<Output<ShellyEvent>>) {
        let o = Output::Send { to, bytes };
        if self.slow.is_zero() {
            out.push(o);
        } else {
            self.delayed.push((now + self.slow, o));
        }
    }

    /// A frame from a peer (a WebSocket message, a BLE frame).
    fn on_frame(&mut self, from: Peer, bytes: &[u8], now: Duration, out: &mut Vec<Output<ShellyEvent>>) {
        let call = match shelly::decode_frame(bytes) {
            Ok(RpcFrame::Call(c)) => c,
            Ok(RpcFrame::Response(_)) => return,
            Err(e) => {
                self.events.push(ShellyEvent::Invalid { reason: e.to_string() });
                return;
            }
        };
        if let (Some(src), Some(slot)) = (&call.src, self.peers.get_mut(&from)) {
            *slot = Some(src.clone());
        }
        let RpcCall { id, src, method, params, auth, .. } = call;
        let answer = auth.as_ref().and_then(DigestAnswer::from_rpc);
        self.call_source = "WS_in";
        let outcome = self.call(&method, &params, answer, now);
        self.events.push(ShellyEvent::Call { method: method.clone(), code: outcome.as_ref().err().map_or(0, |e| e.code) });
        let bytes = shelly::encode_response(id.as_ref(), &self.id, src.as_deref(), &outcome);
        self.emit(from, bytes, now, out);
    }

    /// An HTTP RPC (`GET /rpc/M?…`, `POST /rpc/M`, or `POST /rpc` unpacked
    /// by the host): the result as the body, or the error object with an
    /// HTTP status; a 401 carries the `WWW-Authenticate` challenge.
    pub fn http_call(&mut self, method: &str, params: &Value, authorization: Option<&str>, http_method: &str, now: Duration) -> Option<HttpAnswer> {
        self.advance(now);
        if self.is_down() {
            return None;
        }
        let answer = authorization.and_then(|h| DigestAnswer::from_http(h, http_method));
        self.call_source = "HTTP_in";
        let outcome = self.call(method, params, answer, now);
        self.events.push(ShellyEvent::Call { method: method.to_string(), code: outcome.as_ref().err().map_or(0, |e| e.code) });
        Some(match outcome {
            Ok(v) => HttpAnswer { status: 200, delay: self.slow, body: serde_json::to_vec(&v).unwrap_or_default(), www_authenticate: None },
            Err(e) => {
                let www = (e.code == shelly::code::UNAUTHORIZED)
                    .then(|| serde_json::from_str::<Value>(&e.message).ok())
                    .flatten()
                    .map(|c| challenge_header(&c));
                let status = self.http_status.get(&e.code).copied().unwrap_or_else(|| http_status(e.code));
                HttpAnswer { status, delay: self.slow, body: serde_json::to_vec(&json!({"code": e.code, "message": e.message})).unwrap_or_default(), www_authenticate: www }
            }
        })
    }

    /// Sends what changed since the last report to the peers that asked.
    fn notify(&mut self, now: Duration, out: &mut Vec<Output<ShellyEvent>>) {
        if self.is_down() || (!self.dirty && self.pending_events.is_empty()) {
            return;
        }
        let ts = (self.unix(now) * 100.0).round() / 100.0;
        let delta = if std::mem::take(&mut self.dirty) {
            let snapshot = self.notify_snapshot(now);
            let delta = shelly::status_delta(&self.reported, &snapshot);
            self.reported = snapshot;
            delta
        } else {
            None
        };
        let mut frames = Vec::new();
        if let Some(Value::Object(mut d)) = delta {
            d.insert("ts".into(), Value::from(ts));
            frames.push(("NotifyStatus", Value::Object(d)));
        }
        if !self.pending_events.is_empty() {
            let events = std::mem::take(&mut self.pending_events);
            frames.push(("NotifyEvent", json!({"ts": ts, "events": events})));
        }
        for (method, params) in frames {
            let listeners: Vec<(Peer, String)> = self.peers.iter().filter_map(|(p, s)| s.clone().map(|s| (*p, s))).collect();
            for (peer, dst) in listeners {
                let bytes = shelly::encode_notification(&self.id, Some(&dst), method, &params);
                out.push(Output::Send { to: peer, bytes });
            }
            self.events.push(ShellyEvent::Notify { method: method.to_string() });
        }
    }

    fn release_delayed(&mut self, now: Duration, out: &mut Vec<Output<ShellyEvent>>) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.delayed).into_iter().partition(|(at, _)| *at <= now);
        self.delayed = later;
        out.extend(due.into_iter().map(|(_, o)| o));
    }

    /// Reboot and boot when their times come.
    fn run_power(&mut self, now: Duration, out: &mut Vec<Output<ShellyEvent>>) {
        if self.reboot_at.is_some_and(|at| now >= at) {
            self.reboot_at = None;
            for peer in std::mem::take(&mut self.peers).into_keys() {
                out.push(Output::Close(peer));
            }
            self.delayed.clear();
            self.up_at = Some(now + self.boot_time);
            self.events.push(ShellyEvent::Rebooted);
        }
        if let Some(at) = self.up_at.filter(|at| now >= *at) {
            self.up_at = None;
            // Up at its time, even when nothing woke the core then.
            self.booted_at = at;
            if let Some(a) = self.auth.as_mut() {
                a.forget_nonces();
            }
            self.apply_initial_states(now);
            self.reported = self.notify_snapshot(now);
            self.dirty = false;
            self.events.push(ShellyEvent::Up);
        }
    }

    fn apply_initial_states(&mut self, now: Duration) {
        let keys: Vec<u32> = self.switches.keys().copied().collect();
        for n in keys {
            let initial = self.config.get(&format!("switch:{n}")).and_then(|c| c["initial_state"].as_str().map(str::to_string));
            let input = self.inputs.get(&n).copied().unwrap_or(false);
            if let Some(r) = self.switches.get_mut(&n) {
                let on = match initial.as_deref() {
                    Some("on") => true,
                    Some("restore_last") => r.output,
                    Some("match_input") => input,
                    _ => false,
                };
                r.set(on, "init", None, now);
            }
        }
        for c in self.covers.values_mut() {
            c.stop("init");
        }
    }

    /// A state change from a scenario or `--set`.
    pub fn set_state(&mut self, key: &str, value: f64, now: Duration) -> Result<(), String> {
        self.dirty = true;
        let bad = || format!("value {value} for `{key}` is out of range");
        if !value.is_finite() {
            return Err(bad());
        }
        let nth = |prefix: &str, suffix: &str| -> Option<u32> { key.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok() };
        let on = value != 0.0;
        if let Some(n) = nth("switch", "_on") {
            let r = self.switches.get_mut(&n).ok_or_else(|| format!("this model has no switch:{n}"))?;
            r.set(on, "init", None, now);
        } else if let Some(n) = nth("switch", "_load_w") {
            let r = self.switches.get_mut(&n).ok_or_else(|| format!("this model has no switch:{n}"))?;
            if value < 0.0 {
                return Err(bad());
            }
            r.load_w = value;
            r.protect();
        } else if let Some(n) = nth("switch", "_temperature_c") {
            self.switches.get_mut(&n).ok_or_else(|| format!("this model has no switch:{n}"))?.temperature_c = value;
        } else if key == "voltage" {
            if value < 0.0 {
                return Err(bad());
            }
            for r in self.switches.values_mut() {
                r.voltage = value;
                r.protect();
            }
            for c in self.covers.values_mut() {
                c.voltage = value;
            }
            for p in &mut self.phases {
                p.voltage = value;
            }
        } else if let Some(n) = nth("input", "_event") {
            let event = match value as u32 {
                1 => "single_push",
                2 => "double_push",
                3 => "long_push",
                4 => "triple_push",
                _ => return Err(bad()),
            };
            self.input_event(n, event, now).map_err(|e| e.message)?;
        } else if let Some(n) = nth("input", "") {
            self.set_input(n, on, now)?;
        } else if let Some(n) = nth("cover", "_pos") {
            let c = self.covers.get_mut(&n).ok_or_else(|| format!("this model has no cover:{n}"))?;
            if !(0.0..=100.0).contains(&value) {
                return Err(bad());
            }
            c.position = value;
            c.stop("init");
        } else if let Some(rest) = key.strip_prefix("phase_") {
            let (p, field) = rest.split_once('_').ok_or_else(|| format!("unknown state key `{key}`"))?;
            let i = ["a", "b", "c"].iter().position(|x| *x == p).ok_or_else(|| format!("unknown phase `{p}` (a, b or c)"))?;
            let ph = self.phases.get_mut(i).ok_or_else(|| "this model has no energy meter".to_string())?;
            match field {
                "current" => ph.current = value,
                "voltage" => ph.voltage = value,
                "pf" if (-1.0..=1.0).contains(&value) => ph.pf = value,
                "pf" => return Err(bad()),
                _ => return Err(format!("unknown state key `{key}`")),
            }
        } else if key == "auth" {
            if on {
                let pw = self.password.clone().ok_or("`auth: 1` needs a password in the device's config")?;
                self.auth = Some(self.new_auth(&pw));
            } else {
                self.auth = None;
            }
        } else if key == "reboot" {
            let delay = Duration::from_millis(value.max(0.0) as u64);
            if delay > MAX_DELAY {
                return Err(bad());
            }
            self.schedule_reboot(delay, now);
        } else if key == "slow_ms" {
            if value < 0.0 || value > MAX_DELAY.as_millis() as f64 {
                return Err(bad());
            }
            self.slow = Duration::from_millis(value as u64);
        } else {
            let keys: Vec<_> = STATE_KEYS.iter().map(|(k, _)| *k).collect();
            return Err(format!("unknown state key `{key}` (known: {})", keys.join(", ")));
        }
        Ok(())
    }

    fn set_input(&mut self, n: u32, on: bool, now: Duration) -> Result<(), String> {
        let old = *self.inputs.get(&n).ok_or_else(|| format!("this model has no input:{n}"))?;
        self.inputs.insert(n, on);
        if old == on {
            return Ok(());
        }
        let mode = self.config.get(&format!("switch:{n}")).and_then(|c| c["in_mode"].as_str().map(str::to_string));
        if let Some(r) = self.switches.get_mut(&n) {
            match mode.as_deref() {
                Some("follow") => {
                    r.set(on, "switch", None, now);
                }
                Some("flip") => {
                    let to = !r.output;
                    r.set(to, "switch", None, now);
                }
                Some("momentary") if on => {
                    let to = !r.output;
                    r.set(to, "switch", None, now);
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn schedule_reboot(&mut self, delay: Duration, now: Duration) {
        self.reboot_at = Some(now + delay);
        let ts = self.unix(now);
        self.pending_events.push(json!({"component": "sys", "event": "scheduled_restart", "time_ms": delay.as_millis() as u64, "ts": ts}));
    }

    fn input_event(&mut self, n: u32, event: &str, now: Duration) -> Result<(), RpcError> {
        if !self.inputs.contains_key(&n) {
            return Err(RpcError::id_not_found("id", &Value::from(n)));
        }
        let ts = self.unix(now);
        self.pending_events.push(json!({"component": format!("input:{n}"), "id": n, "event": event, "ts": ts}));
        Ok(())
    }

    /// The status notifications are diffed over: volatile `sys` counters
    /// (uptime, clock, memory) left out, as firmware does not push them.
    fn notify_snapshot(&self, now: Duration) -> Value {
        let mut s = self.full_status(now);
        if let Some(sys) = s.get_mut("sys").and_then(Value::as_object_mut) {
            sys.retain(|k, _| matches!(k.as_str(), "restart_required" | "cfg_rev" | "kvs_rev" | "available_updates"));
        }
        s
    }

    fn next_minute(&self, now: Duration) -> Duration {
        let unix_ms = self.unix_at_zero as u128 * 1000 + now.as_millis();
        let to_next = 60_000 - (unix_ms % 60_000) as u64;
        now + Duration::from_millis(to_next)
    }
}

fn apply_switch_limits(r: &mut RelayMeter, cfg: &Value) {
    r.power_limit = cfg["power_limit"].as_f64().unwrap_or(r.power_limit);
    r.voltage_limit = cfg["voltage_limit"].as_f64().unwrap_or(r.voltage_limit);
    r.current_limit = cfg["current_limit"].as_f64().unwrap_or(r.current_limit);
}

fn apply_cover_limits(c: &mut CoverModel, cfg: &Value) {
    c.maxtime_open = cfg["maxtime_open"].as_f64().unwrap_or(c.maxtime_open);
    c.maxtime_close = cfg["maxtime_close"].as_f64().unwrap_or(c.maxtime_close);
}

/// The HTTP status firmware pairs with an RPC error code.
fn http_status(code: i64) -> u16 {
    match code {
        shelly::code::UNAUTHORIZED => 401,
        shelly::code::NO_HANDLER => 404,
        shelly::code::TOO_MANY_REQUESTS => 429,
        shelly::code::INVALID_ARGUMENT => 400,
        shelly::code::NOT_FOUND => 404,
        shelly::code::UNAVAILABLE => 503,
        _ => 500,
    }
}

/// The `WWW-Authenticate` value from a 401 message's challenge object.
fn challenge_header(c: &Value) -> String {
    let nonce = match &c["nonce"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let stale = if c["stale"].as_bool() == Some(true) { ", stale=true" } else { "" };
    format!("Digest qop=\"auth\", realm=\"{}\", nonce=\"{nonce}\", algorithm=SHA-256{stale}", c["realm"].as_str().unwrap_or_default())
}

impl SansIoCore for ShellyDevice {
    type Event = ShellyEvent;

    fn handle_input(&mut self, input: Input<'_>, now: Duration, out: &mut Vec<Output<ShellyEvent>>) -> Result<(), String> {
        self.advance(now);
        self.run_power(now, out);
        let mut result = Ok(());
        match input {
            Input::Connected(peer) if self.is_down() => out.push(Output::Close(peer)),
            Input::Connected(peer) => {
                self.peers.insert(peer, None);
            }
            Input::Disconnected(peer) => {
                self.peers.remove(&peer);
            }
            Input::Bytes { .. } if self.is_down() => {}
            Input::Bytes { from, bytes } => self.on_frame(from, bytes, now, out),
            Input::Set { key, value } => result = self.set_state(key, value, now),
            Input::Timeout => {}
        }
        self.release_delayed(now, out);
        self.notify(now, out);
        result
    }

    fn next_wakeup(&self) -> Option<Duration> {
        let now = self.last_tick;
        [
            self.reboot_at,
            self.up_at,
            self.delayed.iter().map(|(at, _)| *at).min(),
            self.switches.values().filter_map(RelayMeter::next_wakeup).min(),
            self.covers.values().filter_map(|c| c.next_wakeup(now)).min(),
            Some(self.next_minute(now)),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

#[cfg(test)]
mod tests;
