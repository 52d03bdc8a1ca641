//! `hilbench validate smp-server` against the simulator: the full run (upload with forced
//! resumes, test, reset, confirm, reset) passes over UDP, serial and BLE; firmware variants show
//! as the warnings a user needs (legacy `rc: 0`, v1-only answers); a silent target and a
//! device that drops every upload answer fail, with the exit code saying so.

mod common;

use std::process::Command;

fn validate(args: &[&str]) -> (i32, serde_json::Value) {
    validate_on(args, None)
}

/// With `bus` as the D-Bus system bus (a virtual air's).
fn validate_on(args: &[&str], bus: Option<&str>) -> (i32, serde_json::Value) {
    let mut cmd = Command::new("timeout");
    cmd.arg("120").arg(env!("CARGO_BIN_EXE_hilbench")).args(["validate", "smp-server", "--json"]).args(args);
    if let Some(b) = bus {
        cmd.env("DBUS_SYSTEM_BUS_ADDRESS", b);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), report)
}

/// name → verdict of every check.
fn verdicts(report: &serde_json::Value) -> Vec<(String, String)> {
    report["checks"].as_array().unwrap().iter().map(|c| (c["name"].as_str().unwrap().to_string(), c["verdict"].as_str().unwrap().to_string())).collect()
}

fn verdict(report: &serde_json::Value, name: &str) -> String {
    verdicts(report).into_iter().find(|(n, _)| n == name).map(|(_, v)| v).unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

const FULL_RUN: &[&str] = &[
    "params", "echo", "echo_v1", "unknown_group", "bootloader_info", "state_read", "resume_same_sha", "resume_wrong_offset", "upload", "state_after_upload", "test",
    "reset_after_test", "state_after_test_boot", "swap_test", "confirm", "reset_after_confirm", "state_after_confirm_boot", "swap_confirmed", "headers", "payloads",
];

fn full_run_passes(sim_args: &[&str], target: impl Fn(&serde_json::Value) -> Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["smp-server", "--boot-time", "300ms", "--buf-size", "384"];
    args.extend(sim_args);
    let sim = common::start_sim(&args, dir.path());
    let t = target(&sim.ready["endpoints"]);
    let bus = sim.ready["endpoints"]["dbus_system_bus_address"].as_str().map(str::to_string);
    let (code, report) = validate_on(&t.iter().map(String::as_str).collect::<Vec<_>>(), bus.as_deref());
    let all = verdicts(&report);
    assert_eq!(all.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), FULL_RUN, "{report:#}");
    assert!(all.iter().all(|(_, v)| v == "pass"), "{report:#}");
    assert_eq!(code, 0);
    assert_eq!(report["buf_size"], 384);
    assert!(report["upload_bytes_per_s"].as_f64().unwrap() > 0.0);
    // The device's own account: two reboots, a test swap and no revert.
    assert!(sim.wait_line("\"rebooted\"", std::time::Duration::from_secs(5)).contains("\"swap\":\"test\""));
    assert!(sim.wait_line("\"rebooted\"", std::time::Duration::from_secs(5)).contains("\"swap\":\"none\""));
    assert_eq!(sim.stop(), 0);
}

#[test]
fn the_full_run_passes_over_udp() {
    full_run_passes(&["--udp", "127.0.0.1:0"], |e| vec!["--udp".into(), e["udp"].as_str().unwrap().into()]);
}

#[test]
fn the_full_run_passes_over_serial_lines() {
    full_run_passes(&["--tty", "auto"], |e| vec!["--tty".into(), e["tty"].as_str().unwrap().into()]);
}

/// Over BLE on the simulator's own air: 20-byte writes at MTU 23, answers from
/// notifications, and each reset's dropped link reconnected once it advertises again.
#[test]
fn the_full_run_passes_over_ble() {
    full_run_passes(&["--ble"], |e| vec!["--ble".into(), e["ble"].as_str().unwrap().into()]);
}

#[test]
fn firmware_variants_are_warnings_and_a_silent_device_fails() {
    let dir = tempfile::tempdir().unwrap();
    for (profile, warning) in [("legacy-rc", "success_form"), ("v1-only", "v1_answers")] {
        let sim = common::start_sim(&["smp-server", "--udp", "127.0.0.1:0", "--profile", profile], dir.path());
        let (code, report) = validate(&["--udp", sim.ready["endpoints"]["udp"].as_str().unwrap(), "--read-only"]);
        assert_eq!(verdict(&report, warning), "warn", "{profile}: {report:#}");
        assert_eq!(code, 0, "{profile}: warnings only: {report:#}");
        assert_eq!(sim.stop(), 0);
    }
    // Nobody at the address: the first request fails, and so does the run.
    let nobody = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = nobody.local_addr().unwrap().to_string();
    drop(nobody);
    let (code, report) = validate(&["--udp", &addr, "--timeout", "300ms"]);
    assert_eq!(verdicts(&report), vec![("params".to_string(), "fail".to_string()), ("headers".into(), "pass".into()), ("payloads".into(), "pass".into())], "{report:#}");
    assert_eq!(code, 1);
}

/// Bad arguments are refused before anything is sent.
#[test]
fn bad_arguments_exit_2() {
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_hilbench")).args(["validate", "smp-server"]).args(args).output().unwrap();
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--udp"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["--udp", "127.0.0.1", "--image", "/nonexistent/app.bin"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/app.bin"));
    let out = run(&["--udp", "no such host!"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A firmware whose work queue takes 20 ms a line, with Zephyr's two line buffers, drops the
/// rest of a burst: chunks that fill the 384-byte buffer (five lines) never arrive whole and
/// the upload times out; with `--line-buffers 2` each chunk fits two lines and it passes.
#[test]
fn line_buffers_size_serial_chunks_for_a_slow_work_queue() {
    let dir = tempfile::tempdir().unwrap();
    let sim = common::start_sim(&["smp-server", "--tty", "auto", "--buf-size", "384", "--line-work", "20ms", "--line-buffers", "2", "--boot-time", "300ms"], dir.path());
    let tty = sim.ready["endpoints"]["tty"].as_str().unwrap().to_string();
    let (code, report) = validate(&["--tty", &tty, "--timeout", "1s", "--erase-timeout", "2s"]);
    assert_eq!((verdict(&report, "upload"), code), ("fail".to_string(), 1), "{report:#}");
    let (code, report) = validate(&["--tty", &tty, "--line-buffers", "2"]);
    assert!(verdicts(&report).iter().all(|(_, v)| v == "pass"), "{report:#}");
    assert_eq!(code, 0);
    assert_eq!(sim.stop(), 0);
}
