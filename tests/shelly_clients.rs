//! `hilbench sim shelly` against clients nobody here wrote, run unchanged: aioshelly (Home
//! Assistant's library; tests/py/aioshelly_ws.py) over WebSocket as Home Assistant sets a
//! device up (get_info, initialize with auth and paged GetComponents, firmware check, a switch
//! turned on and its NotifyStatus merged, a cover opened), in both auth modes and with a wrong
//! password; and curl over HTTP (its digest auth with SHA-256). Needs the venv that
//! `ci/test.sh` creates (or HILBENCH_PYTHON pointing at a Python with aioshelly).

mod common;

use std::path::Path;
use std::process::Command;

fn steps(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn step<'a>(all: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    all.iter().find(|s| s["step"] == name).unwrap_or_else(|| panic!("no step {name} in {all:#?}"))
}

fn port(sim: &common::Sim) -> String {
    let http = sim.ready["endpoints"]["http"].as_str().expect("endpoints.http");
    http.rsplit(':').next().unwrap().to_string()
}

/// Runs aioshelly_ws.py against a simulator started with `sim_args`.
fn aioshelly(sim_args: &[&str], script_args: &[&str]) -> Vec<serde_json::Value> {
    let py = hilbench::python_with("aioshelly").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["shelly", "--http", "127.0.0.1:0"];
    args.extend(sim_args);
    let sim = common::start_sim(&args, dir.path());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/aioshelly_ws.py");
    let out = Command::new("timeout").args(["60", &py]).arg(&script).args(["127.0.0.1", &port(&sim)]).args(script_args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "aioshelly_ws.py {script_args:?} against {sim_args:?} failed\nstdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sim.stop(), 0);
    steps(&stdout)
}

fn accepted<'a>(all: &'a [serde_json::Value], model: &str, gen: u64) -> &'a serde_json::Value {
    let init = step(all, "initialized");
    assert_eq!((init["initialized"].as_bool(), init["firmware_supported"].as_bool()), (Some(true), Some(true)), "{init}");
    assert_eq!((init["model"].as_str(), init["gen"].as_u64()), (Some(model), Some(gen)), "{init}");
    step(all, "done");
    init
}

#[test]
fn aioshelly_sets_up_a_plus_1pm_and_hears_its_switch() {
    let all = aioshelly(&["--set", "switch0_load_w=60"], &[]);
    let init = accepted(&all, "SNSW-001P16EU", 2);
    assert_eq!(init["requires_auth"], false);
    assert_eq!(step(&all, "get_info")["auth_en"], false);
    let on = step(&all, "switch_on_notified");
    assert_eq!((on["output"].as_bool(), on["apower"].as_f64()), (Some(true), Some(60.0)));
    assert_eq!(step(&all, "methods")["has_switch_set"], true);
}

#[test]
fn aioshelly_authenticates_with_firmware_1x_nonces() {
    let all = aioshelly(&["--password", "s3cret"], &["--password", "s3cret"]);
    assert_eq!(accepted(&all, "SNSW-001P16EU", 2)["requires_auth"], true);
    step(&all, "switch_on_notified");
}

#[test]
fn aioshelly_authenticates_with_firmware_2_0_nonces() {
    let all = aioshelly(&["--password", "s3cret", "--auth-mode", "2.0"], &["--password", "s3cret"]);
    assert_eq!(accepted(&all, "SNSW-001P16EU", 2)["requires_auth"], true);
    step(&all, "switch_on_notified");
}

#[test]
fn aioshelly_refuses_a_wrong_password_with_invalid_auth() {
    for mode in ["1.x", "2.0"] {
        let all = aioshelly(&["--password", "s3cret", "--auth-mode", mode], &["--password", "s3cret", "--wrong-password"]);
        assert!(step(&all, "invalid_auth")["error"].as_str().unwrap().contains("\"auth_type\": \"digest\""), "{all:?}");
    }
}

#[test]
fn aioshelly_opens_a_plus_2pm_cover() {
    let all = aioshelly(&["--model", "plus2pm-cover", "--set", "cover0_pos=0"], &["--cover"]);
    accepted(&all, "SNSW-102P16EU", 2);
    assert_eq!(step(&all, "cover_opening")["state"], "opening");
}

#[test]
fn aioshelly_pages_a_gen3_devices_dynamic_components() {
    let all = aioshelly(&["--model", "1pmg3"], &[]);
    let init = accepted(&all, "S3SW-001P16EU", 3);
    let comps = init["components"].as_array().unwrap();
    // 13 dynamic components in two GetComponents pages, merged into the status.
    assert_eq!(comps.iter().filter(|c| c.as_str().unwrap().starts_with("bthome")).count(), 13, "{init}");
}

#[test]
fn curl_digest_auth_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let sim = common::start_sim(&["shelly", "--http", "127.0.0.1:0", "--password", "s3cret", "--auth-mode", "2.0"], dir.path());
    let base = sim.ready["endpoints"]["http"].as_str().unwrap().to_string();
    let curl = |args: &[&str]| {
        let out = Command::new("timeout").args(["20", "curl", "-s", "-w", "\n%{http_code}"]).args(args).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (body.to_string(), code.to_string())
    };
    // /shelly stays open; RPC without credentials is 401.
    let (body, code) = curl(&[&format!("{base}/shelly")]);
    assert_eq!(code, "200");
    assert!(body.contains("\"auth_en\":true"), "{body}");
    assert_eq!(curl(&[&format!("{base}/rpc/Shelly.GetStatus")]).1, "401");
    // curl's own digest (RFC 7616, SHA-256 from the challenge); a wrong password is 401 again.
    let url = format!("{base}/rpc/Switch.Set?id=0&on=true");
    let (body, code) = curl(&["--digest", "-u", "admin:s3cret", &url]);
    assert_eq!((code.as_str(), body.as_str()), ("200", "{\"was_on\":false}"));
    let (body, code) = curl(&["--digest", "-u", "admin:wrong", &format!("{base}/rpc/Shelly.GetStatus")]);
    assert_eq!(code, "401", "{body}");
    assert_eq!(sim.stop(), 0);
}

/// Runs aioshelly_ble.py against `sim shelly --ble` with `sim_args`, on the sim's own air.
fn aioshelly_ble(sim_args: &[&str], script_args: &[&str]) -> Vec<serde_json::Value> {
    let py = hilbench::python_with("aioshelly, bleak").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["shelly", "--http", "127.0.0.1:0", "--ble"];
    args.extend(sim_args);
    let sim = common::start_sim(&args, dir.path());
    let ble = &sim.ready["endpoints"]["ble"];
    let (address, bus) = (ble["address"].as_str().unwrap(), ble["dbus_system_bus_address"].as_str().unwrap());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/aioshelly_ble.py");
    let out = Command::new("timeout").args(["90", &py]).arg(&script).arg(address).args(script_args).env("DBUS_SYSTEM_BUS_ADDRESS", bus).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "aioshelly_ble.py {script_args:?} against {sim_args:?} failed\nstdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sim.stop(), 0);
    steps(&stdout)
}

fn ble_session_works(all: &[serde_json::Value]) {
    let adv = step(all, "advertisement");
    assert_eq!(adv["rpc_over_ble"], true, "{adv}");
    // aioshelly's own parser: flags (discoverable | RPC), the BLE MAC (primary + 2), Plus 1PM's model id.
    assert_eq!(adv["parsed"], serde_json::json!({"flags": 5, "mac": "44:17:93:00:00:03", "model_id": 0x1001}));
    assert_eq!(adv["name"], "ShellyPlus1PM-441793000001");
    assert_eq!(step(all, "device_info")["id"], "shellyplus1pm-441793000001");
    assert_eq!(step(all, "wifi_scan")["ssids"].as_array().unwrap().len(), 2);
    assert_eq!(step(all, "switch_set")["was_on"], false);
    let st = step(all, "status");
    assert_eq!(st["output"], true);
    assert!(st["bytes"].as_u64().unwrap() > 500, "an answer over many reads: {st}");
    step(all, "done");
}

#[test]
fn aioshelly_ble_rpc_at_mtu_23_and_185() {
    ble_session_works(&aioshelly_ble(&[], &[]));
    ble_session_works(&aioshelly_ble(&["--mtu", "185"], &[]));
}

#[test]
fn aioshelly_ble_survives_empty_reads_and_a_long_rx_ctl_length_but_not_a_short_one() {
    // Data reads that return nothing until the device is ready: aioshelly retries them.
    ble_session_works(&aioshelly_ble(&["--ble-empty-reads", "3"], &[]));
    // RX-ctl says 9 bytes more than the JSON has: aioshelly's workaround takes the whole JSON.
    ble_session_works(&aioshelly_ble(&["--ble-length-skew", "9"], &[]));
    // 9 bytes fewer: it reads that many, and the cut JSON fails to parse.
    let all = aioshelly_ble(&["--ble-length-skew", "-9"], &["--expect-error", "Invalid JSON"]);
    assert!(step(&all, "error")["error"].as_str().unwrap().starts_with("DeviceConnectionError"), "{all:?}");
}
