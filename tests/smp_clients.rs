//! `hilbench sim smp-server` over UDP, serial console lines and raw serial on a PTY against
//! clients nobody here wrote, run unchanged: smpclient (PyPI; tests/py/smp_dfu.py), the
//! mcumgr-toolkit wheel (Rust, strict header checks; tests/py/mcumgr_toolkit_dfu.py) and the
//! smpmgr command line. The scripts do the same: params, echo, state read, a multi-chunk upload of an
//! MCUboot image, test + reset + confirm + reset (the new image stays), and a second update
//! tested and not confirmed (the next reset reverts it). Needs the venv that `ci/test.sh`
//! creates (or HILBENCH_PYTHON pointing at a Python with smpclient).

mod common;

use std::path::Path;
use std::process::Command;

use hilbench::protocol::mcuboot::build_image;

fn steps(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn step<'a>(all: &'a [serde_json::Value], name: &str, nth: usize) -> &'a serde_json::Value {
    all.iter().filter(|s| s["step"] == name).nth(nth).unwrap_or_else(|| panic!("no step {name} #{nth} in {all:#?}"))
}

/// (slot, version, pending, confirmed, active, permanent) of each reported slot.
fn slots(s: &serde_json::Value) -> Vec<(u64, String, bool, bool, bool, bool)> {
    s["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            let b = |k: &str| x[k].as_bool().unwrap();
            (x["slot"].as_u64().unwrap(), x["version"].as_str().unwrap().to_string(), b("pending"), b("confirmed"), b("active"), b("permanent"))
        })
        .collect()
}

/// Runs `script` (smp_dfu.py or mcumgr_toolkit_dfu.py) against a simulator started with
/// `sim_args`; `target` makes its TARGET argument from the ready line. Asserts every image
/// state the client reports.
fn dfu(script: &str, sim_args: &[&str], target: impl Fn(&serde_json::Value) -> String) -> Vec<serde_json::Value> {
    let py = hilbench::python_with("smpclient, mcumgr_toolkit").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["smp-server", "--boot-time", "300ms"];
    args.extend(sim_args);
    let sim = common::start_sim(&args, dir.path());
    let target = target(&sim.ready["endpoints"]);
    let (first, second) = (dir.path().join("v2.bin"), dir.path().join("v3.bin"));
    std::fs::write(&first, build_image("2.0.0".parse().unwrap(), &[0x5a; 20_000])).unwrap();
    std::fs::write(&second, build_image("3.0.0".parse().unwrap(), &[0xa5; 9_000])).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(script);
    let out = Command::new("timeout").args(["120", &py]).arg(&script).arg(&target).args([&first, &second]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{} {target} failed\nstdout:\n{stdout}\nstderr:\n{}", script.display(), String::from_utf8_lossy(&out.stderr));
    let all = steps(&stdout);
    assert_eq!(step(&all, "params", 0)["buf_size"].as_u64(), sim_args.iter().position(|a| *a == "--buf-size").map(|i| sim_args[i + 1].parse().unwrap()).or(Some(2048)));
    assert_eq!(step(&all, "echo", 0)["r"], "hello smp");
    let s = |v: &str, p, c, a, perm| (0u64, v.to_string(), p, c, a, perm);
    let t = |v: &str, p, c, a, perm| (1u64, v.to_string(), p, c, a, perm);
    assert_eq!(slots(step(&all, "state_at_start", 0)), vec![s("1.0.0", false, true, true, false)]);
    assert!(step(&all, "upload", 0)["chunks"].as_u64().unwrap() > 10, "a multi-chunk upload");
    assert_eq!(slots(step(&all, "test", 0))[1], t("2.0.0", true, false, false, false));
    assert_eq!(slots(step(&all, "after_test_reset", 0)), vec![s("2.0.0", false, false, true, false), t("1.0.0", false, true, false, false)]);
    assert_eq!(slots(step(&all, "confirm", 0))[0], s("2.0.0", false, true, true, false));
    assert_eq!(slots(step(&all, "after_second_reset", 0))[0], s("2.0.0", false, true, true, false));
    // The second update, not confirmed: the reset after the test run reverts it.
    assert_eq!(slots(step(&all, "after_test_reset", 1))[0], s("3.0.0", false, false, true, false));
    assert_eq!(slots(step(&all, "after_second_reset", 1))[0], s("2.0.0", false, true, true, false));
    step(&all, "done", 0);
    assert_eq!(sim.stop(), 0);
    all
}

/// What mcumgr-toolkit reads besides images: OS/app info, bootloader info, tasks, the RTC.
fn toolkit_extras(all: &[serde_json::Value]) {
    assert!(step(all, "app_info", 0)["output"].as_str().unwrap().starts_with("Zephyr"), "{all:?}");
    assert!(step(all, "bootloader", 0)["info"].as_str().unwrap().contains("'name': 'MCUboot', 'mode': 3"), "{all:?}");
    assert!(step(all, "tasks", 0)["names"].as_array().unwrap().iter().any(|n| n == "main"), "{all:?}");
    assert_eq!(step(all, "datetime", 0)["ok"], true, "{all:?}");
}

#[test]
fn smpclient_updates_tests_confirms_and_reverts_over_udp() {
    let _ = dfu("smp_dfu.py", &["--udp", "127.0.0.1:0"], |e| e["udp"].as_str().expect("endpoints.udp").to_string());
}

/// Console framing: smpclient's lines in, Zephyr's line layout and a boot banner after each
/// reboot out, 384-byte buffers (5-line requests through the 2-buffer line pool).
#[test]
fn smpclient_updates_tests_confirms_and_reverts_over_serial_lines() {
    let _ = dfu("smp_dfu.py", &["--tty", "auto", "--buf-size", "384"], |e| format!("serial:{}", e["tty"].as_str().expect("endpoints.tty")));
}

#[test]
fn smpclient_updates_tests_confirms_and_reverts_over_raw_serial() {
    let _ = dfu("smp_dfu.py", &["--tty", "auto", "--framing", "raw", "--buf-size", "384"], |e| format!("raw:{}", e["tty"].as_str().expect("endpoints.tty")));
}

/// mcumgr-toolkit fails on any answer whose group, command, op or length does not match its
/// request, so a whole update through it checks every header we send.
#[test]
fn mcumgr_toolkit_updates_tests_confirms_and_reverts_over_udp() {
    toolkit_extras(&dfu("mcumgr_toolkit_dfu.py", &["--udp", "127.0.0.1:0", "--buf-size", "384"], |e| e["udp"].as_str().expect("endpoints.udp").to_string()));
}

#[test]
fn mcumgr_toolkit_updates_tests_confirms_and_reverts_over_serial_lines() {
    toolkit_extras(&dfu("mcumgr_toolkit_dfu.py", &["--tty", "auto", "--buf-size", "384"], |e| format!("serial:{}", e["tty"].as_str().expect("endpoints.tty"))));
}

#[test]
fn mcumgr_toolkit_updates_tests_confirms_and_reverts_over_raw_serial() {
    toolkit_extras(&dfu("mcumgr_toolkit_dfu.py", &["--tty", "auto", "--framing", "raw", "--buf-size", "384"], |e| format!("raw:{}", e["tty"].as_str().expect("endpoints.tty"))));
}
