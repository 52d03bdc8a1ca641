use super::*;
use serde_json::json;

const T: Duration = Duration::from_millis(10);
const WS: Peer = Peer(1);
const QUIET: Peer = Peer(2);

fn device(model: &str) -> ShellyDevice {
    ShellyDevice::new(ShellyConfig { model: model.into(), mac: Some("A1B2C3D4E5F6".into()), ..ShellyConfig::default() }).unwrap()
}

/// Sends a frame and returns everything the device sent, decoded.
fn send(d: &mut ShellyDevice, from: Peer, frame: Value, now: Duration) -> Vec<(Peer, Value)> {
    let bytes = serde_json::to_vec(&frame).unwrap();
    run(d, Input::Bytes { from, bytes: &bytes }, now)
}

fn run(d: &mut ShellyDevice, input: Input<'_>, now: Duration) -> Vec<(Peer, Value)> {
    let mut out = Vec::new();
    d.handle_input(input, now, &mut out).unwrap();
    out.into_iter()
        .filter_map(|o| match o {
            Output::Send { to, bytes } => Some((to, serde_json::from_slice(&bytes).unwrap())),
            Output::Close(p) => Some((p, json!("closed"))),
            Output::Event(_) => None,
        })
        .collect()
}

fn rpc(d: &mut ShellyDevice, method: &str, params: Value, now: Duration) -> Value {
    let out = send(d, WS, json!({"id": 7, "src": "ha", "method": method, "params": params}), now);
    out.into_iter().find(|(_, v)| v["id"] == 7).map(|(_, v)| v).expect("no answer")
}

fn connect(d: &mut ShellyDevice, peer: Peer, now: Duration) {
    run(d, Input::Connected(peer), now);
}

#[test]
fn identity_and_the_init_calls_aioshelly_makes() {
    let mut d = device("plus1pm");
    let info = rpc(&mut d, "Shelly.GetDeviceInfo", Value::Null, T);
    assert_eq!(info["src"], "shellyplus1pm-a1b2c3d4e5f6");
    assert_eq!(info["dst"], "ha");
    let r = &info["result"];
    assert_eq!((r["mac"].as_str(), r["gen"].as_u64(), r["auth_en"].as_bool(), r["model"].as_str()), (Some("A1B2C3D4E5F6"), Some(2), Some(false), Some("SNSW-001P16EU")));
    assert!(r["fw_id"].as_str().unwrap().starts_with("2026"));
    let cfg = rpc(&mut d, "Shelly.GetConfig", Value::Null, T)["result"].clone();
    assert!(cfg["sys"]["device"]["name"].is_string());
    let st = rpc(&mut d, "Shelly.GetStatus", Value::Null, T)["result"].clone();
    assert_eq!(st["sys"]["mac"], "A1B2C3D4E5F6");
    assert_eq!(st["switch:0"]["output"], false);
    let comps = rpc(&mut d, "Shelly.GetComponents", json!({"dynamic_only": true}), T)["result"].clone();
    assert_eq!((comps["total"].as_u64(), comps["components"].as_array().map(Vec::len)), (Some(0), Some(0)));
}

#[test]
fn list_methods_is_exactly_what_answers() {
    for m in MODELS {
        let mut d = device(m.name);
        let methods = rpc(&mut d, "Shelly.ListMethods", Value::Null, T)["result"]["methods"].clone();
        for name in methods.as_array().unwrap() {
            let name = name.as_str().unwrap();
            if name == "Shelly.Reboot" {
                continue;
            }
            let a = rpc(&mut d, name, json!({"id": 0}), T);
            let code = a["error"]["code"].as_i64();
            assert!(code != Some(404) && code != Some(-114), "{}: {name} is listed but answers {a}", m.name);
        }
        let a = rpc(&mut d, "Foo.Bar", Value::Null, T);
        assert_eq!(a["error"], json!({"code": 404, "message": "No handler for Foo.Bar"}), "{}", m.name);
    }
    let mut d = ShellyDevice::new(ShellyConfig { unknown_method: UnknownMethod::MethodFailed, ..ShellyConfig::default() }).unwrap();
    assert_eq!(rpc(&mut d, "Cover.Open", json!({"id": 0}), T)["error"]["code"], -114);
}

#[test]
fn switch_set_answers_was_on_and_notifies_only_peers_with_a_src() {
    let mut d = device("plus1pm");
    connect(&mut d, WS, T);
    connect(&mut d, QUIET, T);
    send(&mut d, QUIET, json!({"id": 1, "method": "Shelly.GetStatus"}), T);
    run(&mut d, Input::Set { key: "switch0_load_w", value: 100.0 }, T);
    let out = send(&mut d, WS, json!({"id": 3, "src": "ha", "method": "Switch.Set", "params": {"id": 0, "on": true}}), T);
    assert_eq!(out[0], (WS, json!({"id": 3, "src": "shellyplus1pm-a1b2c3d4e5f6", "dst": "ha", "result": {"was_on": false}})));
    let notes: Vec<_> = out.iter().filter(|(_, v)| v["method"] == "NotifyStatus").collect();
    assert_eq!(notes.len(), 1, "{out:?}");
    let (to, n) = notes[0];
    assert_eq!(*to, WS);
    let sw = &n["params"]["switch:0"];
    assert_eq!((sw["output"].as_bool(), sw["apower"].as_f64(), sw["source"].as_str()), (Some(true), Some(100.0), Some("WS_in")));
    assert!(sw.get("voltage").is_none(), "only changed keys: {sw}");
    assert!(n["params"]["ts"].is_f64());
    let again = rpc(&mut d, "Switch.Set", json!({"id": 0, "on": true}), T);
    assert_eq!(again["result"]["was_on"], true);
}

#[test]
fn argument_errors_as_firmware_words_them() {
    let mut d = device("plus2pm-switch");
    assert_eq!(rpc(&mut d, "Switch.Set", json!({"on": true}), T)["error"], json!({"code": -103, "message": "Argument 'id' is missing"}));
    assert_eq!(rpc(&mut d, "Switch.Set", json!({"id": 7, "on": true}), T)["error"], json!({"code": -105, "message": "Argument 'id', value 7 not found!"}));
    assert_eq!(rpc(&mut d, "Switch.Set", json!({"id": 1, "on": "yes"}), T)["error"]["code"], -103);
    assert_eq!(rpc(&mut d, "Switch.Set", json!({"id": 1}), T)["error"]["code"], -103);
    assert_eq!(rpc(&mut d, "Switch.GetStatus", json!([1]), T)["error"]["code"], -103);
    assert_eq!(rpc(&mut d, "Switch.Toggle", json!({"id": 1}), T)["result"]["was_on"], false);
    // Not frames: dropped, with an event.
    assert!(run(&mut d, Input::Bytes { from: WS, bytes: b"{not json" }, T).is_empty());
    assert!(run(&mut d, Input::Bytes { from: WS, bytes: b"{\"id\":1}" }, T).is_empty());
    assert!(d.take_events().iter().any(|e| matches!(e, ShellyEvent::Invalid { .. })));
}

#[test]
fn digest_auth_guards_all_but_device_info() {
    let mut d = ShellyDevice::new(ShellyConfig { password: Some("pw".into()), mac: Some("A1B2C3D4E5F6".into()), ..ShellyConfig::default() }).unwrap();
    assert_eq!(rpc(&mut d, "Shelly.GetDeviceInfo", Value::Null, T)["result"]["auth_en"], true);
    let e = rpc(&mut d, "Shelly.GetStatus", Value::Null, T)["error"].clone();
    assert_eq!(e["code"], 401);
    let ch: Value = serde_json::from_str(e["message"].as_str().unwrap()).unwrap();
    assert_eq!((ch["realm"].as_str(), ch["algorithm"].as_str()), (Some("shellyplus1pm-a1b2c3d4e5f6"), Some("SHA-256")));
    use crate::protocol::shelly::digest::{ha1, response, rpc_ha2};
    let nonce = ch["nonce"].to_string();
    let h = response(&ha1("shellyplus1pm-a1b2c3d4e5f6", "pw"), &nonce, "1", "99", &rpc_ha2());
    let auth = json!({"realm": ch["realm"], "username": "admin", "nonce": ch["nonce"], "cnonce": 99, "response": h, "algorithm": "SHA-256"});
    let out = send(&mut d, WS, json!({"id": 8, "src": "ha", "method": "Shelly.GetStatus", "auth": auth}), T);
    assert!(out[0].1["result"]["sys"].is_object(), "{out:?}");
    // HTTP: the standard challenge header.
    let a = d.http_call("Shelly.GetStatus", &Value::Null, None, "GET", T).unwrap();
    assert_eq!(a.status, 401);
    assert!(a.www_authenticate.unwrap().starts_with("Digest qop=\"auth\", realm=\"shellyplus1pm-a1b2c3d4e5f6\", nonce=\""));
    // Auth switched off by a scenario; then on again.
    run(&mut d, Input::Set { key: "auth", value: 0.0 }, T);
    assert_eq!(d.http_call("Shelly.GetStatus", &Value::Null, None, "GET", T).unwrap().status, 200);
    run(&mut d, Input::Set { key: "auth", value: 1.0 }, T);
    assert_eq!(rpc(&mut d, "Switch.Toggle", json!({"id": 0}), T)["error"]["code"], 401);
}

#[test]
fn reboot_refuses_then_drops_everyone_then_comes_back_fresh() {
    let mut d = device("plus1pm");
    connect(&mut d, WS, T);
    let t1 = Duration::from_secs(100);
    let out = send(&mut d, WS, json!({"id": 1, "src": "ha", "method": "Shelly.Reboot", "params": {"delay_ms": 500}}), t1);
    assert_eq!(out[0].1["result"], Value::Null);
    let ev = out.iter().find(|(_, v)| v["method"] == "NotifyEvent").expect("scheduled_restart").1.clone();
    assert_eq!(ev["params"]["events"][0]["event"], "scheduled_restart");
    let a = rpc(&mut d, "Shelly.GetStatus", Value::Null, t1 + Duration::from_millis(48));
    assert_eq!(a["error"], json!({"code": -109, "message": "shutting down in 452 ms"}));
    assert_eq!(d.next_wakeup(), Some(t1 + Duration::from_millis(500)));
    let out = run(&mut d, Input::Timeout, t1 + Duration::from_millis(500));
    assert_eq!(out, vec![(WS, json!("closed"))]);
    assert!(send(&mut d, WS, json!({"id": 2, "method": "Shelly.GetStatus"}), t1 + Duration::from_secs(1)).is_empty());
    assert_eq!(run(&mut d, Input::Connected(Peer(9)), t1 + Duration::from_secs(1)), vec![(Peer(9), json!("closed"))]);
    let up = t1 + Duration::from_millis(2500);
    let st = rpc(&mut d, "Shelly.GetStatus", Value::Null, up + Duration::from_secs(3));
    assert_eq!(st["result"]["sys"]["uptime"], 3);
    assert!(d.take_events().contains(&ShellyEvent::Up));
}

#[test]
fn energy_counts_once_a_minute_and_overpower_trips() {
    let mut d = ShellyDevice::new(ShellyConfig { unix_at_zero: 1_800_000_000 - 5, ..ShellyConfig::default() }).unwrap();
    connect(&mut d, WS, T);
    rpc(&mut d, "Shelly.GetStatus", Value::Null, T);
    run(&mut d, Input::Set { key: "switch0_load_w", value: 600.0 }, T);
    rpc(&mut d, "Switch.Set", json!({"id": 0, "on": true}), T);
    let before = rpc(&mut d, "Switch.GetStatus", json!({"id": 0}), T)["result"]["aenergy"].clone();
    // The minute the clock started in ends 5 s in (unix 1_800_000_000 is a whole minute).
    assert_eq!(d.next_wakeup(), Some(Duration::from_secs(5)));
    run(&mut d, Input::Timeout, Duration::from_secs(5));
    let minute = Duration::from_secs(65);
    let out = run(&mut d, Input::Timeout, minute);
    let n = out.iter().find(|(_, v)| v["method"] == "NotifyStatus").expect("a minute's counters are notified").1.clone();
    let e = &n["params"]["switch:0"]["aenergy"];
    assert_eq!(e["by_minute"][0].as_f64(), Some(10000.0), "600 W for a minute is 10 Wh: {e}");
    assert_eq!(e["minute_ts"].as_u64(), Some(1_800_000_060));
    assert!(e["total"].as_f64().unwrap() > before["total"].as_f64().unwrap());
    // Over the 4480 W limit the relay opens with an error.
    run(&mut d, Input::Set { key: "switch0_load_w", value: 5000.0 }, minute);
    let sw = rpc(&mut d, "Switch.GetStatus", json!({"id": 0}), minute)["result"].clone();
    assert_eq!(sw["output"].as_bool(), Some(false));
    assert!(sw["errors"].as_array().unwrap().contains(&json!("overpower")), "{sw}");
}

#[test]
fn toggle_after_and_cover_motion() {
    let mut d = device("plus1pm");
    rpc(&mut d, "Switch.Set", json!({"id": 0, "on": true, "toggle_after": 2}), T);
    let st = rpc(&mut d, "Switch.GetStatus", json!({"id": 0}), T)["result"].clone();
    assert_eq!(st["timer_duration"].as_f64(), Some(2.0));
    run(&mut d, Input::Timeout, T + Duration::from_secs(2));
    let st = rpc(&mut d, "Switch.GetStatus", json!({"id": 0}), T + Duration::from_secs(2))["result"].clone();
    assert_eq!((st["output"].as_bool(), st["source"].as_str(), st.get("timer_duration")), (Some(false), Some("timer"), None));

    let mut c = device("plus2pm-cover");
    run(&mut c, Input::Set { key: "cover0_pos", value: 0.0 }, T);
    rpc(&mut c, "Cover.Open", json!({"id": 0}), T);
    let st = rpc(&mut c, "Cover.GetStatus", json!({"id": 0}), T)["result"].clone();
    assert_eq!((st["state"].as_str(), st["target_pos"].as_u64()), (Some("opening"), Some(100)));
    let mut t = T;
    while let Some(w) = c.next_wakeup().filter(|w| *w <= T + Duration::from_secs(61)) {
        t = w;
        run(&mut c, Input::Timeout, t);
    }
    let st = rpc(&mut c, "Cover.GetStatus", json!({"id": 0}), t)["result"].clone();
    assert_eq!((st["state"].as_str(), st["current_pos"].as_u64(), st.get("target_pos")), (Some("open"), Some(100), None), "{st}");
    assert_eq!(rpc(&mut c, "Cover.GoToPosition", json!({"id": 0, "pos": 150}), t)["error"]["code"], -103);
}

#[test]
fn dynamic_components_page_and_inputs_raise_events() {
    let mut d = device("1pmg3");
    let p1 = rpc(&mut d, "Shelly.GetComponents", json!({"dynamic_only": true}), T)["result"].clone();
    assert_eq!((p1["total"].as_u64(), p1["components"].as_array().unwrap().len()), (Some(13), 10));
    assert!(p1["components"][0]["config"].is_object() && p1["components"][0]["attrs"].is_object());
    let p2 = rpc(&mut d, "Shelly.GetComponents", json!({"dynamic_only": true, "offset": 10}), T)["result"].clone();
    assert_eq!(p2["components"].as_array().unwrap().len(), 3);
    assert_eq!(rpc(&mut d, "Shelly.GetDeviceInfo", Value::Null, T)["result"]["gen"], 3);
    connect(&mut d, WS, T);
    rpc(&mut d, "Shelly.GetStatus", Value::Null, T);
    let out = run(&mut d, Input::Set { key: "input0_event", value: 2.0 }, T);
    let ev = out.iter().find(|(_, v)| v["method"] == "NotifyEvent").unwrap().1.clone();
    assert_eq!((ev["params"]["events"][0]["component"].as_str(), ev["params"]["events"][0]["event"].as_str()), (Some("input:0"), Some("double_push")));
}

#[test]
fn meters_follow_their_phases() {
    let mut d = device("pro3em-triphase");
    run(&mut d, Input::Set { key: "phase_a_current", value: 2.0 }, T);
    run(&mut d, Input::Set { key: "phase_a_voltage", value: 230.0 }, T);
    run(&mut d, Input::Set { key: "phase_a_pf", value: 0.5 }, T);
    let em = rpc(&mut d, "EM.GetStatus", json!({"id": 0}), T)["result"].clone();
    assert_eq!((em["a_act_power"].as_f64(), em["a_aprt_power"].as_f64()), (Some(230.0), Some(460.0)));
    let mut m = device("pro3em-monophase");
    run(&mut m, Input::Set { key: "phase_b_current", value: 1.0 }, T);
    run(&mut m, Input::Set { key: "phase_b_pf", value: 1.0 }, T);
    run(&mut m, Input::Set { key: "phase_b_voltage", value: 230.0 }, T);
    let em1 = rpc(&mut m, "EM1.GetStatus", json!({"id": 1}), T)["result"].clone();
    assert_eq!(em1["act_power"].as_f64(), Some(230.0), "{em1}");
}

#[test]
fn scenario_keys_are_checked() {
    let mut d = device("plus1pm");
    let mut out = Vec::new();
    assert!(d.handle_input(Input::Set { key: "switch3_on", value: 1.0 }, T, &mut out).unwrap_err().contains("switch:3"));
    assert!(d.handle_input(Input::Set { key: "bogus", value: 1.0 }, T, &mut out).unwrap_err().contains("known:"));
    assert!(d.handle_input(Input::Set { key: "voltage", value: f64::NAN }, T, &mut out).is_err());
    assert!(d.handle_input(Input::Set { key: "auth", value: 1.0 }, T, &mut out).unwrap_err().contains("password"));
    assert!(ShellyDevice::new(ShellyConfig { model: "plus9".into(), ..ShellyConfig::default() }).unwrap_err().contains("known:"));
    assert!(ShellyDevice::new(ShellyConfig { mac: Some("zz".into()), ..ShellyConfig::default() }).is_err());
}

#[test]
fn slow_answers_come_late() {
    let mut d = device("plus1pm");
    run(&mut d, Input::Set { key: "slow_ms", value: 3000.0 }, T);
    assert!(send(&mut d, WS, json!({"id": 1, "method": "Shelly.GetStatus"}), T).is_empty());
    assert_eq!(d.next_wakeup(), Some(T + Duration::from_secs(3)));
    let out = run(&mut d, Input::Timeout, T + Duration::from_secs(3));
    assert_eq!(out[0].1["id"], 1);
}

#[test]
fn kvs_and_set_config() {
    let mut d = device("plus1pm");
    let set = rpc(&mut d, "KVS.Set", json!({"key": "k", "value": {"a": 1}}), T)["result"].clone();
    assert_eq!(set["rev"], 1);
    assert_eq!(rpc(&mut d, "KVS.Get", json!({"key": "k"}), T)["result"]["value"], json!({"a": 1}));
    assert_eq!(rpc(&mut d, "KVS.Get", json!({"key": "x"}), T)["error"]["code"], -105);
    let r = rpc(&mut d, "Switch.SetConfig", json!({"id": 0, "config": {"power_limit": 50, "bogus": 1}}), T);
    assert_eq!(r["result"], json!({"restart_required": false}));
    let cfg = rpc(&mut d, "Switch.GetConfig", json!({"id": 0}), T)["result"].clone();
    assert_eq!((cfg["power_limit"].as_u64(), cfg.get("bogus")), (Some(50), None));
    run(&mut d, Input::Set { key: "switch0_load_w", value: 60.0 }, T);
    assert_eq!(rpc(&mut d, "Switch.Set", json!({"id": 0, "on": true}), T)["result"]["was_on"], false);
    assert_eq!(rpc(&mut d, "Switch.GetStatus", json!({"id": 0}), T)["result"]["errors"], json!(["overpower"]));
    rpc(&mut d, "Sys.SetConfig", json!({"config": {"device": {"name": "Boiler"}}}), T);
    assert_eq!(rpc(&mut d, "Shelly.GetDeviceInfo", Value::Null, T)["result"]["name"], "Boiler");
    assert_eq!(rpc(&mut d, "WiFi.Scan", Value::Null, T)["result"]["results"].as_array().unwrap().len(), 2);
}

/// Seeded random calls through the fuzz harness: methods from every model's
/// ListMethods (and some unknown), params with random ids, types and values.
#[test]
fn seeded_random_calls_keep_the_invariants() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5348_0002);
    let mut names: Vec<String> = MODELS.iter().flat_map(|m| device(m.name).methods()).collect();
    names.extend(["Foo.Bar".to_string(), "Shelly".to_string(), String::new()]);
    let values = [json!(0), json!(1), json!(7), json!(-1), json!("0"), json!(true), json!(null), json!([1]), json!({"a": 1}), json!(1e300), json!(50.5)];
    let keys = ["id", "on", "toggle_after", "pos", "rel", "delay_ms", "offset", "dynamic_only", "config", "key", "value", "event_type", "include", "ha1", "user", "realm"];
    let mut reached = 0;
    for _ in 0..300 {
        let mut data = vec![rng.gen::<u8>()];
        for j in 0..rng.gen_range(1..12) {
            let mut params = serde_json::Map::new();
            for _ in 0..rng.gen_range(0..4) {
                params.insert(keys[rng.gen_range(0..keys.len())].into(), values[rng.gen_range(0..values.len())].clone());
            }
            let frame = json!({"id": j, "src": "r", "method": names[rng.gen_range(0..names.len())], "params": params});
            if j > 0 {
                data.push(b'\n');
            }
            data.extend(serde_json::to_vec(&frame).unwrap());
        }
        reached += usize::from(crate::fuzzing::shelly_device_answers_are_well_formed(&data));
    }
    assert!(reached > 250, "only {reached} inputs were answered");
}
