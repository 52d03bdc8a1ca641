//! The methods a Shelly device answers and the status it renders from its
//! models.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{apply_cover_limits, apply_switch_limits, component_index, ShellyDevice, UnknownMethod, MAX_DELAY};
use crate::model::relay::{CoverModel, EnergyCounter, RelayMeter};
use crate::protocol::shelly::RpcError;

/// GetComponents page size (a guess; aioshelly pages by `offset` and `total`).
const COMPONENTS_PAGE: usize = 10;
const KVS_MAX_KEYS: usize = 50;

/// Method prefixes as firmware spells them, by component type.
const TYPE_NAMES: &[(&str, &str)] = &[
    ("ble", "BLE"),
    ("bthome", "BTHome"),
    ("bthomedevice", "BTHomeDevice"),
    ("bthomesensor", "BTHomeSensor"),
    ("cloud", "Cloud"),
    ("cover", "Cover"),
    ("em", "EM"),
    ("em1", "EM1"),
    ("em1data", "EM1Data"),
    ("emdata", "EMData"),
    ("eth", "Eth"),
    ("input", "Input"),
    ("knx", "KNX"),
    ("matter", "Matter"),
    ("modbus", "Modbus"),
    ("mqtt", "MQTT"),
    ("plugs_ui", "PLUGS_UI"),
    ("switch", "Switch"),
    ("sys", "Sys"),
    ("temperature", "Temperature"),
    ("wifi", "WiFi"),
    ("ws", "Ws"),
];

/// Methods beyond Get/SetConfig and GetStatus, by component type.
const EXTRA_METHODS: &[(&str, &[&str])] = &[
    ("switch", &["Set", "Toggle", "ResetCounters"]),
    ("cover", &["Open", "Close", "Stop", "GoToPosition", "Calibrate", "ResetCounters"]),
    ("input", &["Trigger"]),
    ("wifi", &["Scan"]),
];

const SHELLY_METHODS: &[&str] = &["GetDeviceInfo", "GetStatus", "GetConfig", "ListMethods", "GetComponents", "Reboot", "Update", "CheckForUpdate", "SetAuth"];
const KVS_METHODS: &[&str] = &["Set", "Get", "GetMany", "List", "Delete"];

fn type_name(kind: &str) -> String {
    TYPE_NAMES.iter().find(|(k, _)| *k == kind).map_or_else(|| kind.to_string(), |(_, n)| n.to_string())
}

fn round(x: f64, digits: i32) -> Value {
    let m = 10f64.powi(digits);
    Value::from((x * m).round() / m)
}

fn energy_json(e: &EnergyCounter) -> Value {
    json!({"total": round(e.total_wh, 3), "by_minute": e.by_minute.iter().map(|m| round(*m, 3)).collect::<Vec<_>>(), "minute_ts": e.minute_ts})
}

fn temperature_json(c: f64) -> Value {
    json!({"tC": round(c, 1), "tF": round(c * 9.0 / 5.0 + 32.0, 1)})
}

/// Deep-merges `patch` into `into`, only over keys `into` already has.
fn merge_known(into: &mut Value, patch: &Value) {
    if let (Value::Object(base), Value::Object(p)) = (&mut *into, patch) {
        for (k, v) in p {
            if let Some(slot) = base.get_mut(k) {
                if slot.is_object() && v.is_object() {
                    merge_known(slot, v);
                } else {
                    *slot = v.clone();
                }
            }
        }
    }
}

fn param<'a>(params: &'a Value, name: &str) -> Option<&'a Value> {
    params.get(name).filter(|v| !v.is_null())
}

fn bool_param(params: &Value, name: &str) -> Result<Option<bool>, RpcError> {
    match param(params, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(RpcError::invalid_argument(name, "expected boolean")),
    }
}

fn number_param(params: &Value, name: &str) -> Result<Option<f64>, RpcError> {
    match param(params, name) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| RpcError::invalid_argument(name, "expected number")),
    }
}

fn string_param<'a>(params: &'a Value, name: &str) -> Result<Option<&'a str>, RpcError> {
    match param(params, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RpcError::invalid_argument(name, "expected string")),
    }
}

impl ShellyDevice {
    fn unknown(&self, method: &str) -> RpcError {
        match self.unknown_method {
            UnknownMethod::NoHandler => RpcError::no_handler(method),
            UnknownMethod::MethodFailed => RpcError::method_not_found(method),
        }
    }

    /// Every component key, static then dynamic.
    fn component_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.config.keys().cloned().collect();
        keys.extend(self.dynamic.iter().filter_map(|c| c["key"].as_str().map(str::to_string)));
        keys
    }

    /// The component a `Type.Verb` call means: the only one of its type,
    /// or the one `params.id` names.
    fn resolve(&self, kind: &str, params: &Value, method: &str) -> Result<String, RpcError> {
        let keys: Vec<String> = self.component_keys().into_iter().filter(|k| k.split(':').next() == Some(kind)).collect();
        if keys.is_empty() {
            return Err(self.unknown(method));
        }
        if keys.len() == 1 && !keys[0].contains(':') {
            return Ok(keys[0].clone());
        }
        let id = param(params, "id").ok_or_else(|| RpcError::missing_argument("id"))?;
        let n = id.as_u64().ok_or_else(|| RpcError::invalid_argument("id", "expected number"))?;
        let key = format!("{kind}:{n}");
        if keys.contains(&key) {
            Ok(key)
        } else {
            Err(RpcError::id_not_found("id", id))
        }
    }

    pub(super) fn dispatch(&mut self, method: &str, params: &Value, now: Duration) -> Result<Value, RpcError> {
        if !params.is_null() && !params.is_object() {
            return Err(RpcError::invalid_argument("params", "expected object"));
        }
        let Some((prefix, verb)) = method.split_once('.') else { return Err(self.unknown(method)) };
        let prefix = prefix.to_ascii_lowercase();
        let verb_l = verb.to_ascii_lowercase();
        match prefix.as_str() {
            "shelly" => return self.shelly_method(&verb_l, method, params, now),
            "kvs" => return self.kvs_method(&verb_l, method, params),
            _ => {}
        }
        let key = self.resolve(&prefix, params, method)?;
        match verb_l.as_str() {
            "getstatus" => Ok(self.status_of(&key, now)),
            "getconfig" => Ok(self.config_of(&key)),
            "setconfig" => self.set_config(&key, params),
            _ => match (prefix.as_str(), verb_l.as_str()) {
                ("switch", v) => self.switch_method(&key, v, method, params, now),
                ("cover", v) => self.cover_method(&key, v, method, params, now),
                ("input", "trigger") => {
                    let event = string_param(params, "event_type")?.ok_or_else(|| RpcError::missing_argument("event_type"))?;
                    let n = component_index(&key).map_or(0, |(_, n)| n);
                    self.input_event(n, event, now)?;
                    Ok(Value::Null)
                }
                ("wifi", "scan") => Ok(self.wifi_scan()),
                _ => Err(self.unknown(method)),
            },
        }
    }

    fn shelly_method(&mut self, verb: &str, method: &str, params: &Value, now: Duration) -> Result<Value, RpcError> {
        match verb {
            "getdeviceinfo" => Ok(self.device_info()),
            "getstatus" => Ok(self.full_status(now)),
            "getconfig" => Ok(self.full_config()),
            "listmethods" => Ok(json!({"methods": self.methods()})),
            "getcomponents" => self.get_components(params, now),
            "reboot" => {
                let ms = number_param(params, "delay_ms")?.unwrap_or(1000.0);
                if !(0.0..=MAX_DELAY.as_millis() as f64).contains(&ms) {
                    return Err(RpcError::invalid_argument("delay_ms", "out of range"));
                }
                self.schedule_reboot(Duration::from_millis(ms as u64), now);
                Ok(Value::Null)
            }
            "checkforupdate" => Ok(json!({})),
            "update" => Err(RpcError::failed_precondition("No update info!")),
            "setauth" => self.set_auth(params),
            _ => Err(self.unknown(method)),
        }
    }

    /// `Shelly.SetAuth {user, realm, ha1}`: `ha1: null` turns auth off.
    fn set_auth(&mut self, params: &Value) -> Result<Value, RpcError> {
        let user = string_param(params, "user")?.ok_or_else(|| RpcError::missing_argument("user"))?;
        if user != crate::protocol::shelly::digest::USERNAME {
            return Err(RpcError::invalid_argument("user", "must be admin"));
        }
        let realm = string_param(params, "realm")?.ok_or_else(|| RpcError::missing_argument("realm"))?;
        if realm != self.id {
            return Err(RpcError::invalid_argument("realm", "must be the device id"));
        }
        match string_param(params, "ha1")? {
            None => self.set_password(None),
            Some(ha1) => {
                let mut auth = self.new_auth("");
                auth.set_ha1(ha1);
                self.auth = Some(auth);
            }
        }
        Ok(Value::Null)
    }

    pub(super) fn methods(&self) -> Vec<String> {
        let mut out: Vec<String> = SHELLY_METHODS.iter().map(|m| format!("Shelly.{m}")).collect();
        out.extend(KVS_METHODS.iter().map(|m| format!("KVS.{m}")));
        let mut kinds: Vec<String> = self.component_keys().iter().filter_map(|k| k.split(':').next().map(str::to_string)).collect();
        kinds.dedup();
        kinds.sort();
        kinds.dedup();
        for kind in kinds {
            let name = type_name(&kind);
            for verb in ["GetConfig", "SetConfig", "GetStatus"] {
                out.push(format!("{name}.{verb}"));
            }
            if let Some((_, extra)) = EXTRA_METHODS.iter().find(|(k, _)| *k == kind) {
                out.extend(extra.iter().map(|v| format!("{name}.{v}")));
            }
        }
        out
    }

    fn get_components(&self, params: &Value, now: Duration) -> Result<Value, RpcError> {
        let offset = number_param(params, "offset")?.unwrap_or(0.0);
        if offset < 0.0 {
            return Err(RpcError::invalid_argument("offset", "out of range"));
        }
        let dynamic_only = bool_param(params, "dynamic_only")?.unwrap_or(false);
        let include: Option<Vec<String>> = match param(params, "include") {
            None => None,
            Some(Value::Array(a)) => Some(a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()),
            Some(_) => return Err(RpcError::invalid_argument("include", "expected array")),
        };
        let wants = |what: &str| include.as_ref().is_none_or(|i| i.iter().any(|x| x == what));
        let keys: Vec<String> = if dynamic_only { self.dynamic.iter().filter_map(|c| c["key"].as_str().map(str::to_string)).collect() } else { self.component_keys() };
        let total = keys.len();
        let page: Vec<Value> = keys
            .iter()
            .skip(offset as usize)
            .take(COMPONENTS_PAGE)
            .map(|key| {
                let mut c = Map::new();
                c.insert("key".into(), Value::from(key.as_str()));
                if wants("status") {
                    c.insert("status".into(), self.status_of(key, now));
                }
                if wants("config") {
                    c.insert("config".into(), self.config_of(key));
                }
                if let Some(attrs) = self.dynamic.iter().find(|d| d["key"] == key.as_str()).and_then(|d| d.get("attrs")) {
                    if wants("attrs") {
                        c.insert("attrs".into(), attrs.clone());
                    }
                }
                Value::Object(c)
            })
            .collect();
        Ok(json!({"components": page, "cfg_rev": self.cfg_rev, "offset": offset as u64, "total": total}))
    }

    fn config_of(&self, key: &str) -> Value {
        if let Some(c) = self.config.get(key) {
            let mut c = c.clone();
            if key == "sys" {
                c["cfg_rev"] = Value::from(self.cfg_rev);
            }
            return c;
        }
        self.dynamic.iter().find(|d| d["key"] == key).map_or(Value::Null, |d| d["config"].clone())
    }

    fn set_config(&mut self, key: &str, params: &Value) -> Result<Value, RpcError> {
        let patch = param(params, "config").ok_or_else(|| RpcError::missing_argument("config"))?;
        if !patch.is_object() {
            return Err(RpcError::invalid_argument("config", "expected object"));
        }
        let Some(current) = self.config.get_mut(key) else {
            let d = self.dynamic.iter_mut().find(|d| d["key"] == key).ok_or_else(|| RpcError::id_not_found("id", &params["id"]))?;
            merge_known(&mut d["config"], patch);
            self.cfg_rev += 1;
            return Ok(json!({"restart_required": false}));
        };
        merge_known(current, patch);
        let cfg = current.clone();
        if let Some((kind, n)) = component_index(key) {
            match kind {
                "switch" => {
                    if let Some(r) = self.switches.get_mut(&n) {
                        apply_switch_limits(r, &cfg);
                        r.protect();
                    }
                }
                "cover" => {
                    if let Some(c) = self.covers.get_mut(&n) {
                        apply_cover_limits(c, &cfg);
                    }
                }
                _ => {}
            }
        }
        if key == "sys" {
            if let Some(name) = cfg["device"]["name"].as_str() {
                self.shelly["name"] = Value::from(name);
            }
        }
        self.cfg_rev += 1;
        Ok(json!({"restart_required": false}))
    }

    fn switch_method(&mut self, key: &str, verb: &str, method: &str, params: &Value, now: Duration) -> Result<Value, RpcError> {
        let n = component_index(key).map_or(0, |(_, n)| n);
        let Some(r) = self.switches.get_mut(&n) else { return Err(self.unknown(method)) };
        match verb {
            "set" => {
                let on = bool_param(params, "on")?.ok_or_else(|| RpcError::missing_argument("on"))?;
                let after = number_param(params, "toggle_after")?;
                if after.is_some_and(|a| !(0.0..=MAX_DELAY.as_secs_f64()).contains(&a)) {
                    return Err(RpcError::invalid_argument("toggle_after", "out of range"));
                }
                let was_on = r.set(on, self.call_source, after.map(Duration::from_secs_f64), now);
                Ok(json!({"was_on": was_on}))
            }
            "toggle" => {
                let to = !r.output;
                let was_on = r.set(to, self.call_source, None, now);
                Ok(json!({"was_on": was_on}))
            }
            "resetcounters" => {
                r.energy.reset();
                Ok(json!({"aenergy": {"total": 0.0}}))
            }
            _ => Err(self.unknown(method)),
        }
    }

    fn cover_method(&mut self, key: &str, verb: &str, method: &str, params: &Value, now: Duration) -> Result<Value, RpcError> {
        let n = component_index(key).map_or(0, |(_, n)| n);
        let unix = self.unix(now);
        let source = self.call_source;
        let Some(c) = self.covers.get_mut(&n) else { return Err(self.unknown(method)) };
        match verb {
            "open" => c.go_to(100.0, source, unix),
            "close" => c.go_to(0.0, source, unix),
            "stop" => c.stop(source),
            "calibrate" => c.calibrate(source, unix),
            "gotoposition" => {
                let target = match (number_param(params, "pos")?, number_param(params, "rel")?) {
                    (Some(p), _) => p,
                    (None, Some(rel)) => c.position + rel,
                    (None, None) => return Err(RpcError::missing_argument("pos")),
                };
                if !(0.0..=100.0).contains(&target) {
                    return Err(RpcError::invalid_argument("pos", "out of range"));
                }
                c.go_to(target, source, unix);
            }
            "resetcounters" => c.energy.reset(),
            _ => return Err(self.unknown(method)),
        }
        Ok(Value::Null)
    }

    fn kvs_method(&mut self, verb: &str, method: &str, params: &Value) -> Result<Value, RpcError> {
        let etag = |v: &Value| crate::protocol::lower_hex(&crate::protocol::mcuboot::sha256(v.to_string().as_bytes())[..16]);
        let key = || string_param(params, "key")?.ok_or_else(|| RpcError::missing_argument("key"));
        match verb {
            "set" => {
                let k = key()?.to_string();
                let v = params.get("value").cloned().ok_or_else(|| RpcError::missing_argument("value"))?;
                if !self.kvs.contains_key(&k) && self.kvs.len() >= KVS_MAX_KEYS {
                    return Err(RpcError::resource_exhausted("Too many keys"));
                }
                let tag = etag(&v);
                self.kvs.insert(k, v);
                self.kvs_rev += 1;
                Ok(json!({"etag": tag, "rev": self.kvs_rev}))
            }
            "get" => {
                let k = key()?;
                let v = self.kvs.get(k).ok_or_else(|| RpcError::id_not_found("key", &Value::from(k)))?;
                Ok(json!({"etag": etag(v), "value": v}))
            }
            "getmany" | "list" => {
                let m: Map<String, Value> = self.kvs.iter().map(|(k, v)| (k.clone(), if verb == "list" { json!({"etag": etag(v)}) } else { json!({"etag": etag(v), "value": v}) })).collect();
                Ok(json!({"items": m, "rev": self.kvs_rev}))
            }
            "delete" => {
                let k = key()?;
                self.kvs.remove(k).ok_or_else(|| RpcError::id_not_found("key", &Value::from(k)))?;
                self.kvs_rev += 1;
                Ok(json!({"rev": self.kvs_rev}))
            }
            _ => Err(self.unknown(method)),
        }
    }

    fn wifi_scan(&self) -> Value {
        let b = self.seed.to_be_bytes();
        json!({"results": [
            {"ssid": "hilbench-lab", "bssid": format!("02:00:{:02x}:{:02x}:{:02x}:01", b[5], b[6], b[7]), "auth": 3, "channel": 6, "rssi": -52},
            {"ssid": "hilbench-guest", "bssid": format!("02:00:{:02x}:{:02x}:{:02x}:02", b[5], b[6], b[7]), "auth": 0, "channel": 11, "rssi": -71},
        ]})
    }

    pub(super) fn full_config(&self) -> Value {
        Value::Object(self.component_keys().into_iter().map(|k| {
            let c = self.config_of(&k);
            (k, c)
        }).collect())
    }

    pub(super) fn full_status(&self, now: Duration) -> Value {
        Value::Object(self.component_keys().into_iter().map(|k| {
            let s = self.status_of(&k, now);
            (k, s)
        }).collect())
    }

    /// A component's status: the dump's, with the models' live values.
    pub(super) fn status_of(&self, key: &str, now: Duration) -> Value {
        let mut s = self
            .template_status
            .get(key)
            .cloned()
            .or_else(|| self.dynamic.iter().find(|d| d["key"] == key).map(|d| d["status"].clone()))
            .unwrap_or(Value::Null);
        let n = component_index(key).map(|(_, n)| n);
        match component_index(key).map(|(k, _)| k).unwrap_or(key) {
            "sys" => self.sys_status(&mut s, now),
            "switch" => {
                if let Some(r) = n.and_then(|n| self.switches.get(&n)) {
                    render_switch(&mut s, r, self.unix_at_zero);
                }
            }
            "cover" => {
                if let Some(c) = n.and_then(|n| self.covers.get(&n)) {
                    render_cover(&mut s, c);
                }
            }
            "input" => {
                if let Some(on) = n.and_then(|n| self.inputs.get(&n)) {
                    s["state"] = Value::from(*on);
                }
            }
            "em" => self.render_em(&mut s),
            "emdata" => self.render_emdata(&mut s),
            "em1" => {
                if let Some(p) = n.and_then(|n| self.phases.get(n as usize)) {
                    s["voltage"] = round(p.voltage, 1);
                    s["current"] = round(p.current, 3);
                    s["act_power"] = round(p.act_power(), 1);
                    s["aprt_power"] = round(p.aprt_power(), 1);
                    s["pf"] = round(p.pf, 2);
                    s["freq"] = round(p.freq, 1);
                }
            }
            "em1data" => {
                if let Some(p) = n.and_then(|n| self.phases.get(n as usize)) {
                    s["total_act_energy"] = round(p.act_energy.total_wh, 2);
                    s["total_act_ret_energy"] = round(p.ret_energy.total_wh, 2);
                }
            }
            _ => {}
        }
        s
    }

    fn sys_status(&self, s: &mut Value, now: Duration) {
        let unix = self.unix(now) as u64;
        s["unixtime"] = Value::from(unix);
        s["uptime"] = Value::from(now.saturating_sub(self.booted_at).as_secs());
        s["time"] = Value::from(format!("{:02}:{:02}", unix / 3600 % 24, unix / 60 % 60));
        s["cfg_rev"] = Value::from(self.cfg_rev);
        s["kvs_rev"] = Value::from(self.kvs_rev);
        s["restart_required"] = Value::from(false);
    }

    fn render_em(&self, s: &mut Value) {
        let (mut total_i, mut total_p, mut total_s) = (0.0, 0.0, 0.0);
        for (p, ph) in ["a", "b", "c"].iter().zip(&self.phases) {
            s[format!("{p}_voltage")] = round(ph.voltage, 1);
            s[format!("{p}_current")] = round(ph.current, 3);
            s[format!("{p}_act_power")] = round(ph.act_power(), 1);
            s[format!("{p}_aprt_power")] = round(ph.aprt_power(), 1);
            s[format!("{p}_pf")] = round(ph.pf, 2);
            s[format!("{p}_freq")] = round(ph.freq, 1);
            total_i += ph.current;
            total_p += ph.act_power();
            total_s += ph.aprt_power();
        }
        s["total_current"] = round(total_i, 3);
        s["total_act_power"] = round(total_p, 3);
        s["total_aprt_power"] = round(total_s, 3);
    }

    fn render_emdata(&self, s: &mut Value) {
        let (mut act, mut ret) = (0.0, 0.0);
        for (p, ph) in ["a", "b", "c"].iter().zip(&self.phases) {
            s[format!("{p}_total_act_energy")] = round(ph.act_energy.total_wh, 2);
            s[format!("{p}_total_act_ret_energy")] = round(ph.ret_energy.total_wh, 2);
            act += ph.act_energy.total_wh;
            ret += ph.ret_energy.total_wh;
        }
        s["total_act"] = round(act, 2);
        s["total_act_ret"] = round(ret, 2);
    }
}

fn render_switch(s: &mut Value, r: &RelayMeter, unix_at_zero: u64) {
    s["output"] = Value::from(r.output);
    s["source"] = Value::from(r.source.as_str());
    s["apower"] = round(r.apower(), 1);
    s["voltage"] = round(r.voltage, 1);
    s["current"] = round(r.current(), 3);
    if s.get("freq").is_some() {
        s["freq"] = round(r.freq, 1);
    }
    if s.get("pf").is_some() {
        s["pf"] = round(if r.apower() > 0.0 { r.pf } else { 0.0 }, 2);
    }
    s["aenergy"] = energy_json(&r.energy);
    s["temperature"] = temperature_json(r.temperature_c);
    if let Some(obj) = s.as_object_mut() {
        if r.errors.is_empty() {
            obj.remove("errors");
        } else {
            obj.insert("errors".into(), json!(r.errors));
        }
        if let Some((at, _)) = r.timer {
            let started = unix_at_zero as f64 + at.saturating_sub(r.timer_len).as_secs_f64();
            obj.insert("timer_started_at".into(), round(started, 2));
            obj.insert("timer_duration".into(), round(r.timer_len.as_secs_f64(), 2));
        } else {
            obj.remove("timer_duration");
            obj.remove("timer_started_at");
        }
    }
}

fn render_cover(s: &mut Value, c: &CoverModel) {
    s["state"] = Value::from(c.state.name());
    s["source"] = Value::from(c.source.as_str());
    s["apower"] = round(c.apower(), 1);
    s["voltage"] = round(c.voltage, 1);
    s["current"] = round(if c.voltage > 0.0 { c.apower() / c.voltage } else { 0.0 }, 3);
    s["freq"] = round(c.freq, 1);
    s["aenergy"] = energy_json(&c.energy);
    s["temperature"] = temperature_json(c.temperature_c);
    s["pos_control"] = Value::from(c.pos_control);
    s["last_direction"] = c.last_direction.map_or(Value::Null, Value::from);
    s["current_pos"] = Value::from(c.position.round() as u64);
    if let Some(obj) = s.as_object_mut() {
        match c.target {
            Some(t) => {
                obj.insert("target_pos".into(), Value::from(t.round() as u64));
                obj.insert("move_started_at".into(), c.move_started_at.map_or(Value::Null, |t| round(t, 2)));
                let max = if t > c.position { c.maxtime_open } else { c.maxtime_close };
                obj.insert("move_timeout".into(), round(max, 2));
            }
            None => {
                obj.remove("target_pos");
                obj.remove("move_started_at");
                obj.remove("move_timeout");
            }
        }
    }
}
