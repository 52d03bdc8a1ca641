//! `hilbench sim jbd-bms` as a user runs it: one ready line with the bus
//! to export and the BMS's address; Python's bleak (pinned in
//! ci/requirements.txt) polls it like the Home Assistant integrations and
//! decodes the pack state set on the command line; `hilbench validate
//! jbd-bms` passes against it and flags the rejects-write-request profile;
//! SIGTERM ends it cleanly.

mod common;

use std::path::Path;
use std::process::Command;

use common::start_sim;

fn python() -> String {
    hilbench::python_with("bleak").unwrap_or_else(|e| panic!("{e}"))
}

fn validate(ready: &serde_json::Value) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench"))
        .args(["validate", "jbd-bms", "--json", "--timeout", "5s", "--address"])
        .arg(ready["address"].as_str().unwrap())
        .env("DBUS_SYSTEM_BUS_ADDRESS", ready["dbus_system_bus_address"].as_str().unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("validate output is not JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

fn verdict<'a>(report: &'a serde_json::Value, name: &str) -> &'a str {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report}"))["verdict"]
        .as_str()
        .unwrap()
}

#[test]
fn bleak_polls_the_simulated_bms() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(
        &[
            "jbd-bms",
            "--name",
            "xiaoxiang BMS",
            "--set",
            "soc=55",
            "--set",
            "current_a=12.5",
            // Pinned cells and temperatures hold still while the pack charges.
            "--set",
            "cell_mv=3300",
            "--set",
            "cell5_mv=3400",
            "--set",
            "temp_c=31.5",
        ],
        dir.path(),
    );
    assert_eq!(sim.ready["kind"], "jbd-bms");
    assert_eq!(sim.ready["name"], "xiaoxiang BMS");
    let address = sim.ready["address"].as_str().unwrap().to_string();
    let bus = sim.ready["dbus_system_bus_address"].as_str().unwrap().to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/bleak_jbd_poll.py");
    let out = Command::new(py).arg(script).args(["--address", &address]).env("DBUS_SYSTEM_BUS_ADDRESS", &bus).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bleak failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["name"], "xiaoxiang BMS");
    assert_eq!(v["address"], address.as_str());
    let mut cells = vec![3300; 16];
    cells[4] = 3400;
    assert_eq!(v["cells_mv"], serde_json::json!(cells));
    assert_eq!(v["pack_v"], 52.9, "sum of the cells");
    assert_eq!(v["current_a"], 12.5);
    assert_eq!(v["soc_pct"], 55);
    assert_eq!(v["cell_count"], 16);
    assert_eq!(v["temps_c"], serde_json::json!([31.5, 31.5, 31.5, 31.5]));
    assert_eq!(v["fet"], 3, "both FETs on");
    // 0x03 with 4 NTCs: 31 data bytes, 38 on the air: 20 + 18 at MTU 23.
    assert_eq!(v["notification_sizes"]["basic"], serde_json::json!([20, 18]));
    assert_eq!(v["notification_sizes"]["cells"], serde_json::json!([20, 19]));

    // The same BMS passes hilbench's own conformance checks.
    let (code, report) = validate(&sim.ready);
    assert_eq!(code, 0, "{report:#}");
    for check in ["advertisement", "gatt", "basic_info_0x03", "cell_voltages_0x04", "hardware_version_0x05", "bad_checksum_request", "write_with_response"] {
        assert_eq!(verdict(&report, check), "pass", "{check}: {report:#}");
    }
    assert_eq!(report["mtu"], 23);
    assert_eq!(sim.stop(), 0, "clean exit on SIGTERM");
}

#[test]
fn validate_flags_rejected_write_requests_and_fails_on_a_missing_bms() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(&["jbd-bms", "--profile", "rejects-write-request", "--cells", "4", "--ntc", "2", "--mtu", "30"], dir.path());
    assert_eq!(sim.ready["mtu"], 30);
    let (code, report) = validate(&sim.ready);
    assert_eq!(code, 0, "a warning is not a failure: {report:#}");
    assert_eq!(verdict(&report, "write_with_response"), "warn");
    assert_eq!(verdict(&report, "notification_sizes"), "pass");
    // 4 cells at MTU 30: the 0x04 answer (15 bytes) fits one notification.
    assert_eq!(report["mtu"], 30);
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench"))
        .args(["validate", "jbd-bms", "--json", "--scan-timeout", "1s", "--address", "C0:DE:00:00:99:99"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", sim.ready["dbus_system_bus_address"].as_str().unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict(&v, "discovery"), "fail");
    assert_eq!(sim.stop(), 0);
}

#[test]
fn bad_arguments_are_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(["sim", "jbd-bms", "--profile", "bogus"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown JBD profile `bogus`"));
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(["sim", "jbd-bms", "--set", "nonsense=1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nonsense"), "{err}");
}
