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
use std::time::Duration;

use hilbench::protocol::mcuboot::{build_image, McubootImage};

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

/// What mcumgr-toolkit reads besides images: OS/app info, bootloader info, tasks, the RTC,
/// the enumeration group (all at once, one index at a time until `end`, details), statistics.
fn toolkit_extras(all: &[serde_json::Value]) {
    assert!(step(all, "app_info", 0)["output"].as_str().unwrap().starts_with("Zephyr"), "{all:?}");
    assert!(step(all, "bootloader", 0)["info"].as_str().unwrap().contains("'name': 'MCUboot', 'mode': 3"), "{all:?}");
    assert!(step(all, "tasks", 0)["names"].as_array().unwrap().iter().any(|n| n == "main"), "{all:?}");
    assert_eq!(step(all, "datetime", 0)["ok"], true, "{all:?}");
    let e = step(all, "enum", 0);
    assert_eq!(e["ids"], serde_json::json!([10, 8, 1, 0, 3, 9, 2]), "{e}");
    assert_eq!(e["one_by_one"], e["ids"], "{e}");
    let details = serde_json::json!([[10, "enum mgmt", 4], [8, "fs mgmt", 5], [1, "img mgmt", 7], [0, "os mgmt", 9], [3, "settings mgmt", 4], [9, "shell mgmt", 1], [2, "stat mgmt", 2]]);
    assert_eq!(e["details"], details, "{e}");
    let st = step(all, "stats", 0);
    assert_eq!(st["groups"], serde_json::json!(["smp_svr_stats"]), "{st}");
    assert!(st["data"]["smp_svr_stats"]["ticks"].is_u64(), "{st}");
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

/// Runs the smpmgr command line (from the venv, next to its Python) with `args`; smpmgr exits 0
/// even when the device answers with an error, so callers read its output.
fn smpmgr(py: &str, connection: &[&str], args: &[&str]) -> String {
    let bin = Path::new(py).with_file_name("smpmgr");
    let out = Command::new("timeout")
        .arg("60")
        .arg(&bin)
        .args(connection)
        .args(args)
        .env("NO_COLOR", "1")
        .env("COLUMNS", "200")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "smpmgr {args:?} exited {:?}:\n{text}", out.status);
    text
}

/// (slot, version, pending, confirmed, active, permanent) from smpmgr's `image state-read`.
fn smpmgr_slots(text: &str) -> Vec<(u64, String, bool, bool, bool, bool)> {
    let flat: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    flat.split("ImageState(")
        .skip(1)
        .map(|s| {
            let field = |k: &str| s.split(&format!("{k}=")).nth(1).and_then(|v| v.split([',', ')']).next()).unwrap_or_else(|| panic!("no {k} in {s}")).to_string();
            let b = |k: &str| field(k) == "True";
            (field("slot").parse().unwrap(), field("version").trim_matches('\'').to_string(), b("pending"), b("confirmed"), b("active"), b("permanent"))
        })
        .collect()
}

/// smpmgr as users type it: echo; `upgrade`, which uploads to image 0 and resets without
/// marking a test (on a Zephyr application nothing swaps: its `--slot 0` path is meant for
/// MCUboot's serial recovery); `image state-write HASH` + `os reset` (TEST swap);
/// `state-write --confirm`; then `upgrade --confirm` (PERM swap in one go).
fn smpmgr_session(sim_args: &[&str], connection: impl Fn(&serde_json::Value) -> Vec<String>) {
    let py = hilbench::python_with("smpmgr").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["smp-server", "--boot-time", "300ms"];
    args.extend(sim_args);
    let sim = common::start_sim(&args, dir.path());
    let connection = connection(&sim.ready["endpoints"]);
    let c: Vec<&str> = connection.iter().map(String::as_str).collect();
    let (v2, v3) = (build_image("2.0.0".parse().unwrap(), &[0x5a; 20_000]), build_image("3.0.0".parse().unwrap(), &[0xa5; 9_000]));
    let (first, second) = (dir.path().join("v2.bin"), dir.path().join("v3.bin"));
    std::fs::write(&first, &v2).unwrap();
    std::fs::write(&second, &v3).unwrap();
    let hash: String = McubootImage::parse(&v2).unwrap().hash.iter().map(|b| format!("{b:02X}")).collect();

    assert!(smpmgr(&py, &c, &["os", "echo", "hello"]).contains("r='hello'"));
    let up = smpmgr(&py, &c, &["upgrade", first.to_str().unwrap()]);
    assert!(up.contains("Upgrade complete"), "{up}");
    assert!(sim.wait_line("\"rebooted\"", Duration::from_secs(10)).contains("\"swap\":\"none\""), "nothing was marked for the next boot");
    sim.wait_line("\"up\"", Duration::from_secs(10));
    let s = |v: &str, p, c, a, perm| (0u64, v.to_string(), p, c, a, perm);
    let t = |v: &str, p, c, a, perm| (1u64, v.to_string(), p, c, a, perm);
    assert_eq!(smpmgr_slots(&smpmgr(&py, &c, &["image", "state-read"])), vec![s("1.0.0", false, true, true, false), t("2.0.0", false, false, false, false)], "uploaded, not tested");
    // (state-write prints only errors: read the state back.)
    smpmgr(&py, &c, &["image", "state-write", &hash]);
    assert_eq!(smpmgr_slots(&smpmgr(&py, &c, &["image", "state-read"]))[1], t("2.0.0", true, false, false, false));
    smpmgr(&py, &c, &["os", "reset"]);
    // The device's own account: it rebooted with a TEST swap and is up again.
    assert!(sim.wait_line("\"rebooted\"", Duration::from_secs(10)).contains("\"swap\":\"test\""));
    sim.wait_line("\"up\"", Duration::from_secs(10));
    assert_eq!(smpmgr_slots(&smpmgr(&py, &c, &["image", "state-read"]))[0], s("2.0.0", false, false, true, false), "the test swap ran");
    smpmgr(&py, &c, &["image", "state-write", "--confirm"]);
    assert_eq!(smpmgr_slots(&smpmgr(&py, &c, &["image", "state-read"]))[0], s("2.0.0", false, true, true, false));
    let up = smpmgr(&py, &c, &["upgrade", "--confirm", second.to_str().unwrap()]);
    assert!(up.contains("Upgrade complete"), "{up}");
    assert!(sim.wait_line("\"rebooted\"", Duration::from_secs(10)).contains("\"swap\":\"perm\""));
    sim.wait_line("\"up\"", Duration::from_secs(10));
    assert_eq!(smpmgr_slots(&smpmgr(&py, &c, &["image", "state-read"]))[0], s("3.0.0", false, true, true, false), "a permanent swap, confirmed");
    // A bad hash gets the group error, which smpmgr prints (and exits 0).
    assert!(smpmgr(&py, &c, &["image", "state-write", "00"]).contains("INVALID_HASH"));
    assert_eq!(sim.stop(), 0);
}

/// smpmgr always uses port 1337, so this server has a loopback address of its own. The
/// default 2048-byte buffer: smpmgr's UDP datagrams are 1472 bytes whatever the device says.
#[test]
fn smpmgr_upgrades_tests_and_confirms_over_udp() {
    smpmgr_session(&["--udp", "127.0.0.31:1337"], |_| vec!["--ip".into(), "127.0.0.31".into()]);
}

#[test]
fn smpmgr_upgrades_tests_and_confirms_over_serial_lines() {
    smpmgr_session(&["--tty", "auto", "--buf-size", "384"], |e| vec!["--port".into(), e["tty"].as_str().expect("endpoints.tty").into()]);
}

/// Over BLE on the simulator's own virtual air: smpmgr (bleak under smpclient) on the air's
/// BlueZ, found by address, 20-byte writes at MTU 23; each reset drops the link and smpmgr
/// connects anew for its next command once the device advertises again.
#[test]
fn smpmgr_upgrades_tests_and_confirms_over_ble() {
    smpmgr_session(&["--ble", "--buf-size", "384"], |e| {
        // Every smpmgr process joins the air as its system bus.
        std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", e["dbus_system_bus_address"].as_str().expect("endpoints.dbus_system_bus_address"));
        vec!["--ble".into(), e["ble"].as_str().expect("endpoints.ble").into()]
    });
}

/// MCUboot's serial recovery (`--profile serial-recovery`): smpmgr's `upgrade --slot 0` writes
/// the image straight into the primary slot and resets; the bootloader boots it with no swap.
/// Its state read has no flags, and it has no state write (rc 8, which smpmgr prints).
#[test]
fn smpmgr_recovers_a_device_through_mcuboot_serial_recovery() {
    let py = hilbench::python_with("smpmgr").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let sim = common::start_sim(&["smp-server", "--tty", "auto", "--profile", "serial-recovery", "--buf-size", "1024", "--boot-time", "300ms"], dir.path());
    let tty = sim.ready["endpoints"]["tty"].as_str().unwrap().to_string();
    let c = ["--port", tty.as_str()];
    let v3 = build_image("3.0.0".parse().unwrap(), &[0xa5; 9_000]);
    let file = dir.path().join("v3.bin");
    std::fs::write(&file, &v3).unwrap();
    assert_eq!(smpmgr_slots(&smpmgr(&py, &c, &["image", "state-read"])), vec![(0, "1.0.0".to_string(), false, false, false, false)]);
    let up = smpmgr(&py, &c, &["upgrade", "--slot", "0", file.to_str().unwrap()]);
    assert!(up.contains("Upgrade complete"), "{up}");
    assert!(sim.wait_line("\"upload_done\"", Duration::from_secs(10)).contains("\"matched\":true"));
    assert!(sim.wait_line("\"rebooted\"", Duration::from_secs(10)).contains("\"swap\":\"none\""), "the bootloader boots what it wrote");
    sim.wait_line("\"up\"", Duration::from_secs(10));
    assert_eq!(smpmgr_slots(&smpmgr(&py, &c, &["image", "state-read"])), vec![(0, "3.0.0".to_string(), false, false, false, false)]);
    let hash: String = McubootImage::parse(&v3).unwrap().hash.iter().map(|b| format!("{b:02X}")).collect();
    assert!(smpmgr(&py, &c, &["image", "state-write", &hash]).contains("MGMT_ERR.ENOTSUP: 8"), "no state write in the bootloader");
    assert_eq!(sim.stop(), 0);
}

/// The file system, settings and shell groups with mcumgr-toolkit (tests/py/mcumgr_toolkit_groups.py):
/// a 5000-byte file up and down in chunks, its status, crc32 and sha256; a stored setting read,
/// written, saved and deleted; Zephyr's `kernel version` and a command of the device's own.
fn toolkit_groups(sim_args: &[&str], target: impl Fn(&serde_json::Value) -> String) {
    let py = hilbench::python_with("mcumgr_toolkit").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["smp-server", "--setting", "app/mode=eco", "--shell", "bms status=soc 80%"];
    args.extend(sim_args);
    let sim = common::start_sim(&args, dir.path());
    let target = target(&sim.ready["endpoints"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/mcumgr_toolkit_groups.py");
    let out = Command::new("timeout").args(["120", &py]).arg(&script).arg(&target).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{} {target} failed\nstdout:\n{stdout}\nstderr:\n{}", script.display(), String::from_utf8_lossy(&out.stderr));
    let all = steps(&stdout);
    for s in ["fs download", "fs crc32", "fs sha256 of 1000 bytes at 100", "settings read back", "shell bms status", "done"] {
        assert_eq!(step(&all, s, 0)["ok"], true, "{s}");
    }
    assert_eq!(sim.stop(), 0);
}

#[test]
fn mcumgr_toolkit_uses_files_settings_and_shell_over_udp() {
    toolkit_groups(&["--udp", "127.0.0.1:0"], |e| e["udp"].as_str().expect("endpoints.udp").to_string());
}

#[test]
fn mcumgr_toolkit_uses_files_settings_and_shell_over_serial_lines() {
    toolkit_groups(&["--tty", "auto", "--buf-size", "384"], |e| format!("serial:{}", e["tty"].as_str().expect("endpoints.tty")));
}

/// smpmgr's file and shell commands as users type them: upload, read-size, get-hash, download
/// (the same bytes back), and `shell`.
#[test]
fn smpmgr_moves_files_and_runs_shell_commands_over_udp() {
    let py = hilbench::python_with("smpmgr").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let sim = common::start_sim(&["smp-server", "--udp", "127.0.0.32:1337", "--shell", "bms status=soc 80%"], dir.path());
    let c = ["--ip", "127.0.0.32"];
    let data: Vec<u8> = (0..7000u32).map(|i| (i * 13 % 256) as u8).collect();
    let (src, back) = (dir.path().join("src.bin"), dir.path().join("back.bin"));
    std::fs::write(&src, &data).unwrap();
    smpmgr(&py, &c, &["file", "upload", src.to_str().unwrap(), "/lfs1/src.bin"]);
    let size = smpmgr(&py, &c, &["file", "read-size", "/lfs1/src.bin"]);
    assert!(size.contains("7000"), "{size}");
    let hash = smpmgr(&py, &c, &["file", "get-hash", "/lfs1/src.bin"]);
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(&data);
    assert!(hash.contains(&crc.to_string()) || hash.to_lowercase().contains(&format!("{crc:08x}")), "crc32 {crc:08x} in {hash}");
    smpmgr(&py, &c, &["file", "download", "/lfs1/src.bin", back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), data);
    assert!(smpmgr(&py, &c, &["shell", "kernel version"]).contains("Zephyr version 4.4.0"));
    assert!(smpmgr(&py, &c, &["shell", "bms status"]).contains("soc 80%"));
    assert_eq!(sim.stop(), 0);
}
