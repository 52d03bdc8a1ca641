//! `hilbench validate shelly`: checks a Gen2+ Shelly device (real or
//! simulated) the way Home Assistant's aioshelly meets it, over `GET /shelly`
//! and the WebSocket at `/rpc`: the identity aioshelly needs, frame fields,
//! the error forms, the digest challenge and a digest answer, GetComponents
//! paging, ListMethods, and (unless read-only) the NotifyStatus a switch
//! change sends. Facts from `../shared/reference/shelly.md`.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::conformance::{check, Check, Verdict};
use super::shelly_rpc::{get_shelly, ShellyRpc};

const SRC: &str = "hilbench-validate";
const TIMEOUT: Duration = Duration::from_secs(5);
/// The oldest firmware date Home Assistant accepts, by generation.
const MIN_FW_DATE: [(u64, u32); 3] = [(2, 2023_08_03), (3, 2023_11_02), (4, 2024_09_02)];

/// What to check.
#[derive(Debug, Clone)]
pub struct ShellyTarget {
    /// `host:port`.
    pub host: String,
    pub password: Option<String>,
    /// No state changes (no switch toggled).
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShellyReport {
    pub target: String,
    pub checks: Vec<Check>,
    /// p50 of GetDeviceInfo round trips over the WebSocket.
    pub rtt_p50_us: Option<u64>,
}

impl ShellyReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.verdict != Verdict::Fail)
    }
}

pub fn render(r: &ShellyReport) -> String {
    let mut s = format!("Shelly device at {}\n", r.target);
    if let Some(p) = r.rtt_p50_us {
        s.push_str(&format!("  RPC round trip p50: {p} µs\n"));
    }
    s.push_str(&super::conformance::render_checks(&r.checks));
    s
}

fn identity_checks(info: &Value, out: &mut Vec<Check>) {
    let mac_ok = info["mac"].as_str().is_some_and(|m| m.len() == 12 && m.chars().all(|c| c.is_ascii_hexdigit()));
    out.push(check("identity_mac", if mac_ok { Verdict::Pass } else { Verdict::Fail }, format!("mac {} (aioshelly crashes without one)", info["mac"])));
    let gen = info["gen"].as_u64();
    out.push(check("identity_gen", if gen.is_some_and(|g| g >= 2) { Verdict::Pass } else { Verdict::Fail }, format!("gen {} (missing means Gen1 to aioshelly)", info["gen"])));
    let fw = info["fw_id"].as_str().unwrap_or_default();
    let date: Option<u32> = fw.get(..8).and_then(|d| d.parse().ok());
    let min = MIN_FW_DATE.iter().rev().find(|(g, _)| gen.is_some_and(|x| x >= *g)).map(|(_, d)| *d).unwrap_or(2023_08_03);
    let v = match date {
        Some(d) if d >= min => Verdict::Pass,
        _ => Verdict::Fail,
    };
    out.push(check("identity_fw_id", v, format!("fw_id {fw:?}: Home Assistant needs a date ≥ {min} first")));
    let fields = ["id", "model", "auth_en"].iter().filter(|k| info.get(**k).is_none()).copied().collect::<Vec<_>>();
    out.push(check("identity_fields", if fields.is_empty() { Verdict::Pass } else { Verdict::Fail }, if fields.is_empty() { "id, model, auth_en present".to_string() } else { format!("missing {}", fields.join(", ")) }));
}

/// Runs every check; an unreachable device is one failed check.
pub async fn validate(target: &ShellyTarget) -> ShellyReport {
    let mut checks = Vec::new();
    let mut report = ShellyReport { target: target.host.clone(), checks: Vec::new(), rtt_p50_us: None };
    let info = match get_shelly(&target.host, TIMEOUT).await {
        Ok(i) => i,
        Err(e) => {
            checks.push(check("http_shelly", Verdict::Fail, e));
            report.checks = checks;
            return report;
        }
    };
    checks.push(check("http_shelly", Verdict::Pass, "GET /shelly answers JSON"));
    identity_checks(&info, &mut checks);
    if let Err(e) = ws_checks(target, &info, &mut checks, &mut report).await {
        checks.push(check("websocket", Verdict::Fail, e));
    }
    report.checks = checks;
    report
}

async fn ws_checks(target: &ShellyTarget, info: &Value, out: &mut Vec<Check>, report: &mut ShellyReport) -> Result<(), String> {
    let mut s = ShellyRpc::connect(&target.host, target.password.clone(), SRC, TIMEOUT).await?;
    let id = info["id"].as_str().unwrap_or_default().to_string();

    // Frame fields, and GetDeviceInfo open without auth.
    let v = s.call("Shelly.GetDeviceInfo", Value::Null, false).await?;
    let fields_ok = v["src"] == id.as_str() && v["dst"] == SRC && v["result"]["auth_en"].is_boolean();
    out.push(check("frame_fields", if fields_ok { Verdict::Pass } else { Verdict::Fail }, format!("src {}, dst {}, result.auth_en {} (want {id}, {SRC}, a bool)", v["src"], v["dst"], v["result"]["auth_en"])));
    let mut rtts = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        s.call("Shelly.GetDeviceInfo", Value::Null, false).await?;
        rtts.push(t.elapsed().as_micros() as u64);
    }
    rtts.sort_unstable();
    report.rtt_p50_us = rtts.get(rtts.len() / 2).copied();

    // Authentication.
    let auth_en = info["auth_en"].as_bool() == Some(true);
    if auth_en {
        let v = s.call("Shelly.GetStatus", Value::Null, false).await?;
        if v["error"]["code"] != 401 {
            out.push(check("auth_challenge", Verdict::Fail, format!("auth_en is true but an unauthenticated call got {v}")));
        } else {
            match s.learn_challenge(&v) {
                Ok(c) => {
                    let realm_ok = c["realm"] == info["auth_domain"] || c["realm"] == id.as_str();
                    let ok = c["auth_type"] == "digest" && c["algorithm"] == "SHA-256" && realm_ok;
                    out.push(check("auth_challenge", if ok { Verdict::Pass } else { Verdict::Fail }, format!("401 challenge {c}")));
                }
                Err(e) => out.push(check("auth_challenge", Verdict::Fail, e)),
            }
        }
        if target.password.is_none() {
            out.push(check("auth_answer", Verdict::Fail, "the device needs a password: give --password"));
            return Ok(());
        }
        let v = s.call("Shelly.GetStatus", Value::Null, true).await?;
        let v = if v["error"]["code"] == 401 {
            // A stale or used nonce: learn the new one and answer once more.
            s.learn_challenge(&v)?;
            s.call("Shelly.GetStatus", Value::Null, true).await?
        } else {
            v
        };
        let ok = v["result"]["sys"].is_object();
        out.push(check("auth_answer", if ok { Verdict::Pass } else { Verdict::Fail }, if ok { "a digest answer is taken".to_string() } else { format!("the digest answer was refused: {}", v["error"]) }));
    } else {
        out.push(check("auth_challenge", Verdict::Pass, "auth is off (auth_en false); nothing to challenge"));
    }

    // The init calls aioshelly makes.
    let config = s.result("Shelly.GetConfig", Value::Null).await?;
    let named = config["sys"]["device"].get("name").is_some();
    out.push(check("config_sys_name", if named { Verdict::Pass } else { Verdict::Fail }, format!("sys.device.name {}", config["sys"]["device"]["name"])));
    let status = s.result("Shelly.GetStatus", Value::Null).await?;
    out.push(check("status_sys", if status["sys"].is_object() { Verdict::Pass } else { Verdict::Fail }, "Shelly.GetStatus has sys"));
    components_check(&mut s, out).await;
    let methods = s.result("Shelly.ListMethods", Value::Null).await?;
    let listed: Vec<String> = methods["methods"].as_array().map(|a| a.iter().filter_map(|m| m.as_str().map(str::to_lowercase)).collect()).unwrap_or_default();
    let missing: Vec<String> = status
        .as_object()
        .map(|o| o.keys().filter_map(|k| k.split(':').next()).filter(|t| !listed.iter().any(|m| m.starts_with(&format!("{t}.")))).map(str::to_string).collect())
        .unwrap_or_default();
    out.push(check("list_methods", if missing.is_empty() { Verdict::Pass } else { Verdict::Warn }, if missing.is_empty() { format!("{} methods, every status component among them", listed.len()) } else { format!("no methods listed for {}", missing.join(", ")) }));

    // Error forms.
    let v = s.call("HilbenchValidate.Nothing", Value::Null, true).await?;
    let (code, msg) = (v["error"]["code"].as_i64(), v["error"]["message"].as_str().unwrap_or_default());
    let verdict = match code {
        Some(404) if msg.starts_with("No handler for") => Verdict::Pass,
        Some(-114) => Verdict::Warn,
        _ => Verdict::Fail,
    };
    out.push(check("unknown_method", verdict, format!("error {} (mongoose-os: 404 \"No handler for …\"; -114 is another dialect)", v["error"])));
    if let Some(indexed) = status.as_object().and_then(|o| o.keys().find(|k| k.starts_with("switch:") || k.starts_with("input:")).cloned()) {
        let method = if indexed.starts_with("switch") { "Switch.GetStatus" } else { "Input.GetStatus" };
        let v = s.call(method, json!({}), true).await?;
        let ok = v["error"]["code"] == -103;
        out.push(check("missing_id", if ok { Verdict::Pass } else { Verdict::Warn }, format!("{method} without id: {}", v["error"])));
    }

    if status.get("switch:0").is_some() && !target.read_only {
        notify_check(&mut s, out).await?;
    }
    Ok(())
}

async fn components_check(s: &mut ShellyRpc, out: &mut Vec<Check>) {
    let first = match s.result("Shelly.GetComponents", json!({"dynamic_only": true})).await {
        Ok(f) => f,
        Err(e) => {
            out.push(check("get_components", Verdict::Fail, format!("{e} (any error here fails aioshelly's init)")));
            return;
        }
    };
    let total = first["total"].as_u64();
    let mut got = first["components"].as_array().cloned().unwrap_or_default();
    let mut pages = 1;
    while total.is_some_and(|t| (got.len() as u64) < t) && pages < 100 {
        match s.result("Shelly.GetComponents", json!({"dynamic_only": true, "offset": got.len()})).await {
            Ok(p) => {
                let more = p["components"].as_array().cloned().unwrap_or_default();
                if more.is_empty() {
                    break;
                }
                got.extend(more);
                pages += 1;
            }
            Err(_) => break,
        }
    }
    let shaped = got.iter().all(|c| c["key"].is_string() && c["config"].is_object());
    let ok = total == Some(got.len() as u64) && shaped && first["offset"] == 0;
    out.push(check("get_components", if ok { Verdict::Pass } else { Verdict::Fail }, format!("{} dynamic components in {pages} page(s), total {} (each needs key and config)", got.len(), first["total"])));
}

async fn notify_check(s: &mut ShellyRpc, out: &mut Vec<Check>) -> Result<(), String> {
    s.notes.clear();
    let before = s.result("Switch.GetStatus", json!({"id": 0})).await?;
    let was = before["output"].as_bool().unwrap_or(false);
    s.result("Switch.Set", json!({"id": 0, "on": !was})).await?;
    // Wait for the notification (a ping-pong call gives it time to come).
    let deadline = Instant::now() + TIMEOUT;
    let mut heard = None;
    while Instant::now() < deadline && heard.is_none() {
        heard = s.notes.iter().find(|n| n["method"] == "NotifyStatus" && n["params"]["switch:0"]["output"] == !was).cloned();
        if heard.is_none() {
            let _ = s.call("Shelly.GetDeviceInfo", Value::Null, false).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    s.result("Switch.Set", json!({"id": 0, "on": was})).await?;
    let v = match &heard {
        Some(n) if n["params"]["ts"].is_number() && n["dst"] == SRC => Verdict::Pass,
        Some(_) => Verdict::Warn,
        None => Verdict::Fail,
    };
    out.push(check("notify_status", v, match heard {
        Some(n) => format!("NotifyStatus after Switch.Set: {}", n["params"]),
        None => "no NotifyStatus with switch:0's new output within 5 s".into(),
    }));
    Ok(())
}

/// `validate shelly --ble ADDRESS`: the device over BLE GATT as aioshelly's BleRPC meets
/// it: its advertisement (Shelly's manufacturer data with the RPC flag, MAC and model
/// blocks), the RPC service's characteristics, GetDeviceInfo in one long write, the same
/// in 20-byte writes, a long answer read in pieces, TX-ctl dropping a half-written
/// frame, a write past the announced length refused, and the unknown-method error.
pub async fn validate_ble(address: &str, adapter: Option<&str>) -> ShellyReport {
    use super::shelly_ble_rpc::ShellyBleRpc;
    let mut report = ShellyReport { target: format!("ble {address}"), checks: Vec::new(), rtt_p50_us: None };
    let (mut rpc, found) = match ShellyBleRpc::connect(adapter, address, Duration::from_secs(10)).await {
        Ok(x) => x,
        Err(e) => {
            report.checks.push(check("ble_connect", Verdict::Fail, e));
            return report;
        }
    };
    report.checks.push(check("ble_connect", Verdict::Pass, format!("connected; the RPC service found ({})", found.properties.local_name.clone().unwrap_or_default())));
    advert_check(&found.properties, &mut report.checks);
    gatt_check(&found.chars, &mut report.checks);
    if let Err(e) = ble_calls(&mut rpc, &mut report).await {
        report.checks.push(check("ble_rpc", Verdict::Fail, e));
    }
    rpc.disconnect().await;
    report
}

/// Shelly's manufacturer data (company 0x0BA9): flags with the RPC bit, the MAC, the model.
fn advert_check(p: &btleplug::api::PeripheralProperties, out: &mut Vec<Check>) {
    let Some(data) = p.manufacturer_data.get(&0x0BA9) else {
        out.push(check("ble_advert", Verdict::Fail, format!("no manufacturer data of company 0x0BA9 (Allterco) in the advertisement (companies: {:?})", p.manufacturer_data.keys().collect::<Vec<_>>())));
        return;
    };
    let (mut flags, mut mac, mut model) = (None, None, None);
    let mut i = 0;
    while i < data.len() {
        let (tag, rest) = (data[i], &data[i + 1..]);
        let n = match tag {
            0x01 => 2,
            0x0A => 6,
            0x0B => 2,
            _ => break,
        };
        let Some(v) = rest.get(..n) else { break };
        match tag {
            0x01 => flags = Some(u16::from_le_bytes([v[0], v[1]])),
            0x0A => mac = Some(v.iter().rev().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")),
            _ => model = Some(u16::from_le_bytes([v[0], v[1]])),
        }
        i += 1 + n;
    }
    let Some(f) = flags else {
        out.push(check("ble_advert", Verdict::Fail, format!("manufacturer data {} has no flags block", hex(data))));
        return;
    };
    let rpc = f & 0b100 != 0;
    let verdict = match (rpc, mac.is_some() && model.is_some()) {
        (false, _) => Verdict::Fail,
        (true, false) => Verdict::Warn,
        (true, true) => Verdict::Pass,
    };
    let model = model.map_or("none".to_string(), |m| format!("{m:#06x}"));
    out.push(check("ble_advert", verdict, format!("flags {f:#06b} (RPC over BLE {}; Home Assistant provisions over BLE only with it; auth {}), MAC {}, model {model}", if rpc { "on" } else { "off" }, f & 0b10 != 0, mac.as_deref().unwrap_or("none"))));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Data (read, write), TX-ctl (write), RX-ctl (read, notify).
fn gatt_check(chars: &[(uuid::Uuid, Option<(bool, bool, bool)>)], out: &mut Vec<Check>) {
    use crate::device::shelly_ble::{DATA_UUID, RX_CTL_UUID, TX_CTL_UUID};
    let want = |u: uuid::Uuid| match u {
        u if u == DATA_UUID => ("data", (true, true, false)),
        u if u == TX_CTL_UUID => ("TX-ctl", (false, true, false)),
        u if u == RX_CTL_UUID => ("RX-ctl", (true, false, true)),
        _ => ("?", (false, false, false)),
    };
    let mut wrong = Vec::new();
    for (u, props) in chars {
        let (name, (r, w, n)) = want(*u);
        match props {
            None => wrong.push(format!("{name} missing")),
            // A property more than needed does no harm; one missing breaks the client.
            Some((pr, pw, pn)) if (r && !pr) || (w && !pw) || (n && !pn) => wrong.push(format!("{name} read {pr} write {pw} notify {pn}")),
            Some(_) => {}
        }
    }
    out.push(check("ble_gatt", if wrong.is_empty() { Verdict::Pass } else { Verdict::Fail }, if wrong.is_empty() { "data (read, write), TX-ctl (write), RX-ctl (read, notify)".to_string() } else { wrong.join("; ") }));
}

async fn ble_calls(rpc: &mut super::shelly_ble_rpc::ShellyBleRpc, report: &mut ShellyReport) -> Result<(), String> {
    use super::shelly_ble_rpc::MAX_WRITE;
    let out = &mut report.checks;
    // One long write, as aioshelly writes a request.
    let v = rpc.call("Shelly.GetDeviceInfo", Value::Null, MAX_WRITE).await?;
    let r = &v["result"];
    let ok = r["id"].is_string() && r["gen"].as_u64().is_some_and(|g| g >= 2) && r["auth_en"].is_boolean();
    out.push(check("ble_device_info", if ok { Verdict::Pass } else { Verdict::Fail }, format!("id {}, gen {}, auth_en {} ({} bytes in {} data reads)", r["id"], r["gen"], r["auth_en"], v.to_string().len(), rpc.last_reads)));
    let mut rtts = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        rpc.call("Shelly.GetDeviceInfo", Value::Null, MAX_WRITE).await?;
        rtts.push(t.elapsed().as_micros() as u64);
    }
    rtts.sort_unstable();
    report.rtt_p50_us = rtts.get(rtts.len() / 2).copied();
    let out = &mut report.checks;
    // The same frame in 20-byte writes (a central at MTU 23 without long writes).
    let chunked = rpc.call("Sys.GetStatus", Value::Null, 20).await;
    out.push(match chunked {
        Ok(v) if v.get("result").is_some() || v.get("error").is_some() => check("ble_chunked_write", Verdict::Pass, "a request in 20-byte data writes is answered"),
        Ok(v) => check("ble_chunked_write", Verdict::Fail, format!("neither result nor error: {v}")),
        Err(e) => check("ble_chunked_write", Verdict::Fail, e),
    });
    // TX-ctl drops a half-written frame: a new length, then a whole frame.
    let half = br#"{"id":900,"method":"Shelly.GetDeviceInfo"}"#;
    rpc.announce(half.len()).await?;
    rpc.write_data(&half[..half.len() / 2]).await?;
    let v = rpc.call("Sys.GetStatus", Value::Null, MAX_WRITE).await;
    out.push(match v {
        Ok(_) => check("ble_tx_reset", Verdict::Pass, "a new TX-ctl length dropped the half-written frame"),
        Err(e) => check("ble_tx_reset", Verdict::Fail, format!("after a half-written frame and a new TX-ctl length: {e}")),
    });
    // A data write past the announced length is refused, and the device still answers after.
    rpc.announce(4).await?;
    let refused = rpc.write_data(b"0123456789").await.is_err();
    let after = rpc.call("Sys.GetStatus", Value::Null, MAX_WRITE).await.is_ok();
    out.push(check("ble_overrun", if refused && after { Verdict::Pass } else { Verdict::Fail }, format!("a 10-byte write after a 4-byte length: {}; the next call: {}", if refused { "refused" } else { "accepted" }, if after { "answered" } else { "unanswered" })));
    let v = rpc.call("HilbenchValidate.Nothing", Value::Null, MAX_WRITE).await?;
    let (code, msg) = (v["error"]["code"].as_i64(), v["error"]["message"].as_str().unwrap_or_default());
    let verdict = match code {
        Some(404) if msg.starts_with("No handler for") => Verdict::Pass,
        Some(-114) => Verdict::Warn,
        _ => Verdict::Fail,
    };
    out.push(check("ble_unknown_method", verdict, format!("error {}", v["error"])));
    Ok(())
}
