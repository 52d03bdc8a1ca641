//! `hilbench validate shelly` against `hilbench sim shelly`: every check passes on the
//! simulator in each auth mode and on a Gen3 with paged dynamic components, and each
//! deliberate deviation is flagged: the -114 dialect (a warning), a wrong password, a device
//! that wants one, an address where nothing listens (failures), bad arguments (exit 2).

mod common;

use std::process::Command;

fn validate(args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(["validate", "shelly", "--json"]).args(args).output().unwrap();
    let code = out.status.code().unwrap_or(-1);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (code, report)
}

fn verdict<'a>(report: &'a serde_json::Value, name: &str) -> &'a str {
    report["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no check {name} in {report:#}"))["verdict"].as_str().unwrap()
}

fn against(sim_args: &[&str], validate_args: &[&str]) -> (i32, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["shelly", "--http", "127.0.0.1:0"];
    args.extend(sim_args);
    let sim = common::start_sim(&args, dir.path());
    let url = sim.ready["endpoints"]["http"].as_str().unwrap().to_string();
    let mut v = vec!["--http", url.as_str()];
    v.extend(validate_args);
    let r = validate(&v);
    assert_eq!(sim.stop(), 0);
    r
}

#[test]
fn the_simulator_passes_every_check() {
    for (sim, val) in [(vec![], vec![]), (vec!["--password", "pw"], vec!["--password", "pw"]), (vec!["--password", "pw", "--auth-mode", "2.0"], vec!["--password", "pw"])] {
        let (code, report) = against(&sim, &val);
        assert_eq!(code, 0, "{report:#}");
        assert!(report["checks"].as_array().unwrap().iter().all(|c| c["verdict"] == "pass"), "{report:#}");
        assert_eq!(verdict(&report, "notify_status"), "pass");
        assert!(report["rtt_p50_us"].as_u64().is_some());
    }
    let (code, report) = against(&["--model", "1pmg3"], &["--read-only"]);
    assert_eq!(code, 0, "{report:#}");
    assert!(report["checks"].as_array().unwrap().iter().all(|c| c["name"] != "notify_status"), "--read-only toggles nothing");
    let comps = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "get_components").unwrap();
    assert!(comps["detail"].as_str().unwrap().starts_with("13 dynamic components in 2 page(s)"), "{comps}");
}

#[test]
fn deviations_are_flagged() {
    let (code, report) = against(&["--unknown-method", "-114"], &[]);
    assert_eq!((code, verdict(&report, "unknown_method")), (0, "warn"), "{report:#}");
    let (code, report) = against(&["--password", "pw"], &["--password", "wrong"]);
    assert_eq!((code, verdict(&report, "auth_answer")), (1, "fail"), "{report:#}");
    let (code, report) = against(&["--password", "pw", "--auth-mode", "2.0"], &[]);
    assert_eq!((code, verdict(&report, "auth_challenge"), verdict(&report, "auth_answer")), (1, "pass", "fail"), "{report:#}");
    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (code, report) = validate(&["--http", &format!("127.0.0.1:{port}")]);
    assert_eq!((code, verdict(&report, "http_shelly")), (1, "fail"), "{report:#}");
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(["validate", "shelly", "--http", "https://x/rpc"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--http"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn several_devices_in_one_sim_each_on_its_own_address() {
    let dir = tempfile::tempdir().unwrap();
    let sim = common::start_sim(&["shelly", "--http", "127.0.0.1:0", "--count", "3", "--mac", "AA:BB:CC:00:00:10"], dir.path());
    let devices = sim.ready["devices"].as_array().expect("a devices list").clone();
    assert_eq!(devices.len(), 3, "{}", sim.ready);
    for (i, d) in devices.iter().enumerate() {
        let url = d["endpoints"]["http"].as_str().unwrap();
        assert!(url.starts_with(&format!("http://127.0.0.{}:", i + 1)), "{url}");
        assert_eq!(d["id"], format!("shellyplus1pm-aabbcc0000{:02x}", 0x10 + i));
        let (code, report) = validate(&["--http", url, "--read-only"]);
        assert_eq!(code, 0, "{report:#}");
    }
    assert_eq!(sim.stop(), 0);
    for bad in [vec!["--count", "2", "--ble"], vec!["--count", "0"], vec!["--http", "[::1]:0", "--count", "2"], vec!["--http", "127.0.0.250:0", "--count", "9"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(["sim", "shelly"]).args(&bad).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--"), "{bad:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `--ble` against the simulator on its own virtual air, as aioshelly's BleRPC meets it at
/// MTU 23: every BLE check passes, with the empty-read field fault too (reads retried);
/// an RX-ctl length cut short is caught (exit 1).
#[test]
fn the_simulator_passes_every_ble_check_and_a_short_length_fails() {
    let ble_validate = |sim_args: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["shelly", "--http", "127.0.0.1:0", "--ble"];
        args.extend(sim_args);
        let sim = common::start_sim(&args, dir.path());
        let ble = &sim.ready["endpoints"]["ble"];
        let out = Command::new(env!("CARGO_BIN_EXE_hilbench"))
            .args(["validate", "shelly", "--json", "--ble", ble["address"].as_str().unwrap()])
            .env("DBUS_SYSTEM_BUS_ADDRESS", ble["dbus_system_bus_address"].as_str().unwrap())
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(sim.stop(), 0);
        (out.status.code().unwrap_or(-1), report)
    };
    for sim in [&[][..], &["--ble-empty-reads", "2"][..]] {
        let (code, report) = ble_validate(sim);
        let names: Vec<&str> = report["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["ble_connect", "ble_advert", "ble_gatt", "ble_device_info", "ble_chunked_write", "ble_tx_reset", "ble_overrun", "ble_unknown_method"], "{report:#}");
        assert!(report["checks"].as_array().unwrap().iter().all(|c| c["verdict"] == "pass"), "{sim:?}: {report:#}");
        assert_eq!(code, 0);
        assert!(report["rtt_p50_us"].as_u64().is_some_and(|us| us > 0), "{report:#}");
    }
    let (code, report) = ble_validate(&["--ble-length-skew", "-10"]);
    assert_eq!(code, 1, "{report:#}");
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(["validate", "shelly", "--http", "127.0.0.1:1", "--ble", "AA:BB:CC:DD:EE:FF"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "--http and --ble together");
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(["validate", "shelly", "--ble", "AA:BB:CC:DD:EE:FF", "--password", "pw"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "--password with --ble: BLE RPC has no auth");
}
