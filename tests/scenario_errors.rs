//! Broken scenario files and misbehaving processes: clear errors naming the
//! file, line and column (or step), and nothing left running afterwards.

use std::path::Path;
use std::process::Command;

use hilbench::scenario::{run_file_blocking, Scenario};

fn parse(y: &str) -> String {
    Scenario::parse(Path::new("bad.yaml"), y).unwrap_err().to_string()
}

const BUS: &str = "buses: [{name: b, ports: [p]}]\ndevices:\n  - {name: d, kind: eg4-lp4, bus: b, address: 1}\n";

#[test]
fn malformed_files_name_line_column_and_what_was_expected() {
    let e = parse("name: x\nsteps:\n  - wait: 1s\n    oops: [\n");
    assert!(e.starts_with("bad.yaml:"), "{e}");
    let e = parse(&format!("name: x\n{BUS}steps:\n  - expect_reading: {{client: c, field: soc_pct, equals: 1, colour: red}}\n"));
    assert!(e.starts_with("bad.yaml:6:"), "{e}");
    assert!(e.contains("unknown field `colour`"), "{e}");
    let e = parse("name: x\nsteps:\n  - teleport: 1\n");
    assert!(e.contains("bad.yaml:3:") && e.contains("teleport") && e.contains("wait"), "{e}");
    let e = parse("steps: []\n");
    assert!(e.contains("missing field `name`"), "{e}");
    let e = parse(&format!("name: x\n{BUS}steps:\n  - set: {{device: d, state: {{soc: 10, warp: 9}}}}\n"));
    assert!(e.starts_with("bad.yaml:6:") && e.contains("steps[0].set.state.warp") && e.contains("unknown state key `warp`"), "{e}");
    let e = parse(&format!("name: x\n{BUS}steps:\n  - fault: {{link: d, kind: delay}}\n"));
    assert!(e.starts_with("bad.yaml:6:") && e.contains("steps[0].fault") && e.contains("needs `ms`"), "{e}");
    let e = parse(&format!("name: x\n{BUS}steps:\n  - fault: {{link: d, kind: reset}}\n"));
    assert!(e.contains("steps[0].fault.kind") && e.contains("is a serial link") && e.contains("only acts on websocket and server links"), "{e}");
    let e = parse(&format!("name: x\n{BUS}steps:\n  - fault: {{link: nowhere, kind: drop}}\n"));
    assert!(e.contains("no link `nowhere`") && e.contains("links: p, d"), "{e}");
    let e = parse("name: x\nbuses: [{name: b, ports: [p]}]\nclients:\n  - {name: m, kind: modbus-master, port: q, addresses: [1]}\nsteps: []\n");
    assert!(e.contains("port `q`"), "{e}");
    let ble = "devices:\n  - {name: bms, kind: jbd-bms}\n";
    let e = parse(&format!("name: x\nble_hosts: [phone, phone]\n{ble}steps: []\n"));
    assert!(e.contains("ble host name `phone` is used twice"), "{e}");
    let e = parse(&format!("name: x\nble_hosts: [\"my phone\"]\n{ble}steps: []\n"));
    assert!(e.contains("ble host `my phone`"), "{e}");
    let e = parse("name: x\nble_hosts: [phone]\nsteps: []\n");
    assert!(e.contains("needs at least one BLE device"), "{e}");
    let e = parse(&format!("name: x\n{ble}steps:\n  - ble: {{device: bms, rssi: -200}}\n"));
    assert!(e.starts_with("bad.yaml:5:") && e.contains("steps[0].ble.rssi") && e.contains("rssi -200"), "{e}");
}

/// Every file under scenarios/ (and its subfolders) parses and passes
/// validation, so a typo in the suite fails `cargo test`, not CI's run.
#[test]
fn every_scenario_file_is_valid() {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios"), &mut files);
    assert!(files.len() >= 40, "found only {} scenario files", files.len());
    let bad: Vec<String> = files.iter().filter_map(|f| Scenario::load(f).err().map(|e| e.to_string())).collect();
    assert!(bad.is_empty(), "invalid scenarios:\n{}", bad.join("\n"));
}

/// Selectors that could only pass vacuously are located errors.
#[test]
fn typos_in_selectors_are_located_errors() {
    let serial = "buses: [{name: b, ports: [p]}]\ndevices:\n  - {name: d, kind: eg4-lp4, bus: b, address: 1}\nclients:\n  - {name: m, kind: modbus-master, port: p, addresses: [1]}\nsteps:\n";
    let at = |steps: &str| parse(&format!("name: x\n{serial}{steps}"));
    let e = at("  - expect_errors: {client: m, kind: timout, at_most: 0}\n");
    assert!(e.starts_with("bad.yaml:8:32:") && e.contains("no error kind `timout`") && e.contains("timeout"), "{e}");
    let e = at("  - expect_flag: {client: m, flag: 'protection:cel_ov'}\n");
    assert!(e.starts_with("bad.yaml:8:") && e.contains("no flag `protection:cel_ov`"), "{e}");
    assert!(Scenario::parse(Path::new("ok.yaml"), &format!("name: x\n{serial}  - expect_flag: {{client: m, flag: 'protection:cell_ov', present: false}}\n")).is_ok());
    let e = at("  - expect_reading: {client: m, field: soc, min: 1}\n");
    assert!(e.contains("no field `soc`") && e.contains("soc_pct"), "{e}");
    assert!(Scenario::parse(Path::new("ok.yaml"), &format!("name: x\n{serial}  - expect_reading: {{client: m, field: cell16_mv, min: 1}}\n")).is_ok());
    let e = at("  - expect_observation: {kind: collision, source: buss, at_least: 1}\n");
    assert!(e.contains("no device, client or bus named `buss`"), "{e}");
    let e = at("  - expect_frames: {link: p, at_least: 3, at_most: 1}\n");
    assert!(e.contains("nothing can pass"), "{e}");
    let e = at("  - fault: {link: m, kind: drop, name: a}\n  - clear_faults: {link: m, name: b}\n");
    assert!(e.starts_with("bad.yaml:9:") && e.contains("no earlier `fault` on `m` is named `b`"), "{e}");
    let e = at("  - send_npdu: {client: m}\n");
    assert!(e.contains("`m` is a modbus-master; only a bsc-node takes `send_npdu`"), "{e}");
    let e = at("  - expect_errors: {client: d, at_least: 1}\n");
    assert!(e.contains("no client named `d`"), "{e}");

    // A Shelly's link takes frame faults and connection faults, not an RS-485 echo.
    let e = parse("name: x\ndevices:\n  - {name: s, kind: shelly}\nsteps:\n  - fault: {link: s, kind: echo}\n");
    assert!(e.contains("`s` is a websocket link (Shelly RPC over HTTP and WebSocket); `echo` only acts on serial links"), "{e}");
    assert!(Scenario::parse(Path::new("ok.yaml"), "name: x\ndevices:\n  - {name: s, kind: shelly}\nsteps:\n  - fault: {link: s, kind: reset}\n").is_ok());
    assert!(Scenario::parse(Path::new("ok.yaml"), "name: x\ndevices:\n  - {name: s, kind: shelly}\nsteps:\n  - fault: {link: s, kind: drop, direction: response}\n").is_ok());

    let e = parse("name: x\ndevices:\n  - {name: s, kind: shelly, nonce_lifetime: 500ms}\nsteps: []\n");
    assert!(e.starts_with("bad.yaml:3:") && e.contains("nonce_lifetime 500ms is under a second"), "{e}");

    // A Shelly's HTTP status overrides are error statuses.
    let e = parse("name: x\ndevices:\n  - {name: s, kind: shelly, http_status: {-103: 200}}\nsteps: []\n");
    assert!(e.starts_with("bad.yaml:3:") && e.contains("http_status for -103: 200 is not an error status"), "{e}");
    assert!(Scenario::parse(Path::new("ok.yaml"), "name: x\ndevices:\n  - {name: s, kind: shelly, http_status: {-103: 500, 404: 400}}\nsteps: []\n").is_ok());

    // An smp-server's slots must be a state MCUboot can be in.
    let e = parse("name: x\ndevices:\n  - {name: s, kind: smp-server, pending: test}\nsteps: []\n");
    assert!(e.starts_with("bad.yaml:3:") && e.contains("needs an image in slot 1"), "{e}");
    let e = parse("name: x\ndevices:\n  - {name: s, kind: smp-server, secondary_version: 1.0.0, pending: test, confirmed: false}\nsteps: []\n");
    assert!(e.contains("cannot have another image pending"), "{e}");
    let e = parse("name: x\ndevices:\n  - {name: s, kind: smp-server, secondary_version: 1.x}\nsteps: []\n");
    assert!(e.contains("secondary_version `1.x`"), "{e}");
    let e = parse("name: x\ndevices:\n  - {name: s, kind: smp-server, pending: later}\nsteps: []\n");
    assert!(e.contains("later"), "{e}");

    // BLE keys and the `ble` step on an smp-server need `ble: true`.
    let e = parse("name: x\ndevices:\n  - {name: s, kind: smp-server, mtu: 247}\nsteps: []\n");
    assert!(e.starts_with("bad.yaml:3:") && e.contains("need `ble: true`"), "{e}");
    let e = parse("name: x\ndevices:\n  - {name: s, kind: smp-server, ble: true, mtu: 600}\nsteps: []\n");
    assert!(e.contains("mtu 600 is outside 23..=517"), "{e}");
    let e = parse("name: x\ndevices:\n  - {name: s, kind: smp-server}\nsteps:\n  - ble: {device: s, mtu: 100}\n");
    assert!(e.starts_with("bad.yaml:5:") && e.contains("`s` is not on BLE"), "{e}");
    let e = parse("name: x\ndevices:\n  - {name: s, kind: smp-server, ble: true}\nsteps:\n  - fault: {link: s, kind: drop}\n");
    assert!(e.contains("no link `s` (links: s.ble)"), "the UDP link is not served when only BLE is: {e}");
    assert!(Scenario::parse(Path::new("ok.yaml"), "name: x\ndevices:\n  - {name: s, kind: smp-server, ble: true}\nsteps:\n  - fault: {link: s.ble, kind: drop, direction: response}\n  - ble: {device: s, mtu: 100}\n").is_ok());

    // A replayed device's fixture is read before anything runs: missing, or not serial.
    let e = parse("name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: f, kind: replay, bus: b, fixture: fixtures/captures/none.jsonl}\nsteps: []\n");
    assert!(e.starts_with("bad.yaml:4:") && e.contains("fixture") && e.contains("fixtures/captures/none.jsonl"), "{e}");
    let ble = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ble.path(), "{\"hilbench_fixture\":1,\"source\":\"s\",\"device\":\"d\",\"transport\":\"ble-att\",\"kind\":null,\"confidence\":\"none\",\"evidence\":\"\",\"frames\":0,\"start_unix_ns\":0}\n").unwrap();
    let e = parse(&format!("name: x\nbuses: [{{name: b, ports: [p]}}]\ndevices:\n  - {{name: f, kind: replay, bus: b, fixture: {}}}\nsteps: []\n", ble.path().display()));
    assert!(e.contains("a BLE fixture is served on the air, not on a bus: leave `bus` out"), "{e}");
    let e = parse(&format!("name: x\ndevices:\n  - {{name: f, kind: replay, fixture: {}}}\nsteps: []\n", ble.path().display()));
    assert!(e.contains("no device kind was recognised; a BLE replay serves the GATT table of its kind"), "{e}");
    let e = parse("name: x\ndevices:\n  - {name: f, kind: replay, fixture: fixtures/captures/imported/eg4-fault3-bridge.bridge-addr1.jsonl}\nsteps: []\n");
    assert!(e.contains("a serial fixture is replayed on a bus: give `bus`"), "{e}");
    let e = parse("name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: f, kind: replay, bus: b, fixture: fixtures/captures/imported/smp-dfu-udp.udp-127-0-0-1-1337.jsonl}\nsteps: []\n");
    assert!(e.contains("a UDP fixture is served on a socket, not on a bus: leave `bus` out"), "{e}");
    let e = parse("name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: f, kind: replay, bus: b, udp: 127.0.0.1:0, fixture: fixtures/captures/imported/eg4-fault3-bridge.bridge-addr1.jsonl}\nsteps: []\n");
    assert!(e.contains("`udp` serves a UDP fixture"), "{e}");
    let e = parse("name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: f, kind: replay, bus: b, listen: 127.0.0.1:0, fixture: fixtures/captures/imported/eg4-fault3-bridge.bridge-addr1.jsonl}\nsteps: []\n");
    assert!(e.contains("`listen` serves an HTTP/WebSocket fixture"), "{e}");
    let e = parse("name: x\nbuses: [{name: b, ports: [p]}]\ndevices:\n  - {name: f, kind: replay, bus: b, timing: keep, fixture: fixtures/captures/imported/eg4-fault3-bridge.bridge-addr1.jsonl}\nsteps: []\n");
    assert!(e.contains("timing") && e.contains("a replay on a bus answers at once today"), "{e}");
    // A BLE replay serves what its kind serves: the jbd-client finds it.
    assert!(Scenario::parse(
        Path::new("ok.yaml"),
        "name: x\ndevices:\n  - {name: f, kind: replay, fixture: fixtures/captures/imported/jbd-ble-poll.bms.jsonl}\nclients:\n  - {name: c, kind: jbd-client, device: f}\nsteps: []\n"
    )
    .is_ok());

    // An smp-client names an smp-server that serves its transport, and checks it can fail.
    let smp = "devices:\n  - {name: s, kind: smp-server}\n  - {name: bms, kind: jbd-bms}\nclients:\n";
    let e = parse(&format!("name: x\n{smp}  - {{name: c, kind: smp-client, device: s, transport: ble}}\nsteps: []\n"));
    assert!(e.starts_with("bad.yaml:6:") && e.contains("smp-server `s` does not serve BLE"), "{e}");
    let e = parse(&format!("name: x\n{smp}  - {{name: c, kind: smp-client, device: bms}}\nsteps: []\n"));
    assert!(e.contains("device `bms` is not an smp-server of this scenario (s)"), "{e}");
    let e = parse(&format!("name: x\n{smp}  - {{name: c, kind: smp-client, device: s}}\nsteps:\n  - smp_validate: {{client: c, fails: [param]}}\n"));
    assert!(e.starts_with("bad.yaml:8:") && e.contains("no check `param`") && e.contains("params"), "{e}");

    let hub = "devices:\n  - {name: hub, kind: bsc-hub}\nclients:\n  - {name: a, kind: bsc-node, hub: hub}\n  - {name: s, kind: bsc-raw, hub: hub}\nsteps:\n";
    let e = parse(&format!("name: x\n{hub}  - fault: {{link: hub, kind: drop}}\n"));
    assert!(e.starts_with("bad.yaml:8:") && e.contains("`hub` is a server link") && e.contains("`drop` only acts on serial, ble-gatt, websocket and udp links"), "{e}");
    let e = parse(&format!("name: x\n{hub}  - fault: {{link: a, kind: echo}}\n"));
    assert!(e.starts_with("bad.yaml:8:") && e.contains("steps[0].fault.kind") && e.contains("websocket link") && e.contains("only acts on serial links"), "{e}");
    let e = parse(&format!("name: x\n{hub}  - fault: {{link: a, kind: close_after}}\n"));
    assert!(e.contains("fault `close_after` needs `bytes`"), "{e}");
    let e = parse(&format!("name: x\n{hub}  - fault: {{link: a, kind: bandwidth, bytes_per_s: 0}}\n"));
    assert!(e.contains("at least 1"), "{e}");
    let e = parse(&format!("name: x\n{hub}  - fault: {{link: a, kind: half_open, ms: 3}}\n"));
    assert!(e.contains("does not take `ms`"), "{e}");
    let e = parse(&format!("name: x\n{hub}  - send_npdu: {{client: a, count: 10, paced_by: s}}\n"));
    assert!(e.starts_with("bad.yaml:8:") && e.contains("steps[0].send_npdu.paced_by") && e.contains("must name another bsc-node"), "{e}");
    let e = parse(&format!("name: x\n{hub}  - send_npdu: {{client: a, count: 10, window: 8}}\n"));
    assert!(e.contains("window needs `paced_by`"), "{e}");
    let e = parse(&format!("name: x\n{hub}  - fault: {{link: a, kind: bad_checksum}}\n"));
    assert!(e.contains("carries BVLC-SC over WebSocket") && e.contains("no checksum"), "{e}");
    let e = parse(&format!("name: x\n{hub}  - expect_reading: {{client: a, field: soc_pct, min: 1}}\n"));
    assert!(e.contains("bsc-node, which publishes no readings"), "{e}");
    let e = parse(&format!("name: x\n{hub}  - set: {{device: hub, state: {{soc: 1}}}}\n"));
    assert!(e.contains("no state to set"), "{e}");
    let e = parse(&format!("name: x\n{hub}  - ble: {{device: hub, mtu: 100}}\n"));
    assert!(e.starts_with("bad.yaml:8:") && e.contains("`hub` is a bsc-hub") && e.contains("takes `ble`"), "{e}");
    let e = parse("name: x\ndevices:\n  - {name: hub, kind: bsc-hub, allow_client_cert_without_eku: true}\nsteps: []\n");
    assert!(e.starts_with("bad.yaml:3:") && e.contains("allow_client_cert_without_eku needs `tls: true`"), "{e}");
    let e = parse("name: x\ndevices:\n  - {name: hub, kind: bsc-hub, cert_binding: true}\nsteps: []\n");
    assert!(e.starts_with("bad.yaml:3:") && e.contains("cert_binding needs `tls: true`"), "{e}");
    let e = parse("name: x\ndevices:\n  - {name: d, kind: modbus-master}\nsteps: []\n");
    assert!(e.starts_with("bad.yaml:3:") && e.contains("that is a client kind"), "{e}");
}

#[test]
fn cli_rejects_a_broken_file_before_running_anything() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("broken.yaml");
    std::fs::write(&f, "name: x\nsteps:\n  - wait: soon\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(["run", f.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.yaml:3:") && err.contains("invalid duration `soon`"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(["run", "/no/such/dir"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn run_yaml(dir: &Path, y: &str) -> hilbench::scenario::ScenarioReport {
    let f = dir.join("s.yaml");
    std::fs::write(&f, y).unwrap();
    let s = Scenario::load(&f).unwrap();
    run_file_blocking(s, f, Default::default())
}

/// No live process has `marker` in its command line (read from /proc, so
/// the test needs no procps).
fn no_process_with(marker: &str) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .all(|cmd| !String::from_utf8_lossy(&cmd).contains(marker))
}

#[test]
fn a_process_that_cannot_start_fails_setup_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_yaml(
        dir.path(),
        &format!("name: x\n{BUS}processes:\n  - {{name: ghost, command: /no/such/binary-hilbench}}\nsteps: []\n"),
    );
    assert!(!r.passed);
    let e = r.error.unwrap();
    assert!(e.contains("ghost") && e.contains("/no/such/binary-hilbench"), "{e}");
}

#[test]
fn a_process_without_its_ready_line_is_killed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let marker = "hilbench-never-ready-7731";
    let r = run_yaml(
        dir.path(),
        &format!(
            "name: x\n{BUS}processes:\n  - name: slow\n    command: sh\n    args: ['-c', 'echo starting {marker}; sleep 60']\n    ready: listening\n    ready_timeout: 500ms\nsteps: []\n"
        ),
    );
    assert!(!r.passed);
    let e = r.error.unwrap();
    assert!(e.contains("did not print its ready line `listening`") && e.contains("starting"), "{e}");
    assert!(r.processes[0].killed);
    assert!(no_process_with(marker), "process survived the scenario");
}

#[test]
fn a_failing_expectation_fails_the_run_and_processes_are_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let marker = "hilbench-reaped-4410";
    let r = run_yaml(
        dir.path(),
        &format!(
            "name: x\n{BUS}clients:\n  - {{name: m, kind: modbus-master, port: p, addresses: [1], interval: 100ms}}\nprocesses:\n  - {{name: bg, command: sh, args: ['-c', 'echo up; exec sleep 60 # {marker}'], ready: up}}\nsteps:\n  - expect_reading: {{client: m, field: soc_pct, equals: 12, within: 500ms}}\n"
        ),
    );
    assert!(!r.passed);
    let f = r.failure().unwrap();
    assert!(f.contains("soc_pct from `m` was 80, expected 12"), "{f}");
    assert!(no_process_with(marker));
    assert_eq!(r.processes[0].exit_code.map(|c| c < 0), Some(true), "killed by a signal");
}

#[test]
fn exit_code_and_output_expectations() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_yaml(
        dir.path(),
        &format!(
            "name: x\n{BUS}processes:\n  - {{name: client, command: sh, args: ['-c', 'test -e {{{{port.p}}}} && echo port-ok; exit 3']}}\nsteps:\n  - expect_output: {{process: client, contains: port-ok}}\n  - expect_exit: {{process: client, code: 3}}\n"
        ),
    );
    assert!(r.passed, "{:?}", r.failure());
}

#[test]
fn a_process_past_its_timeout_is_killed_and_fails_the_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let marker = "hilbench-hangs-5521";
    let r = run_yaml(
        dir.path(),
        &format!(
            "name: x\n{BUS}processes:\n  - {{name: hang, command: sh, args: ['-c', 'echo hello; exec sleep 60 # {marker}'], timeout: 300ms}}\nsteps:\n  - expect_output: {{process: hang, contains: hello}}\n  - wait: 600ms\n"
        ),
    );
    assert!(!r.passed);
    let f = r.failure().unwrap();
    assert!(f.contains("ran longer than its timeout of 300ms"), "{f}");
    assert!(r.processes[0].timed_out);
    assert!(no_process_with(marker));
}

#[test]
fn junit_and_exit_code_report_each_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("a-ok.yaml");
    let bad = dir.path().join("b-bad.yaml");
    let body = |name: &str, soc: u32| {
        format!(
            "name: {name}\n{BUS}clients:\n  - {{name: m, kind: modbus-master, port: p, addresses: [1], interval: 100ms}}\nsteps:\n  - expect_reading: {{client: m, field: soc_pct, equals: {soc}, within: 1s}}\n"
        )
    };
    std::fs::write(&ok, body("reads eighty", 80)).unwrap();
    std::fs::write(&bad, body("expects twelve", 12)).unwrap();
    let junit = dir.path().join("junit.xml");
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench"))
        .args(["run", dir.path().to_str().unwrap(), "--junit", junit.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "one failure → exit 1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PASS reads eighty") && stdout.contains("FAIL expects twelve"), "{stdout}");
    assert!(stdout.contains("1 passed, 1 failed"), "{stdout}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains(r#"tests="2""#) && xml.contains(r#"failures="1""#), "{xml}");
    assert!(xml.contains(r#"<testcase name="expects twelve""#), "{xml}");
    assert!(xml.contains("soc_pct from `m` was 80, expected 12"), "{xml}");
}

/// Every kind in the registry has a minimal scenario entry that parses, and
/// every entry here is a kind the registry knows: a new kind adds its row.
#[test]
fn the_registry_lists_every_kind_and_a_minimal_entry_of_each_parses() {
    use hilbench::kind::{Role, REGISTRY};
    let minimal: &[(&str, Role, &str)] = &[
        ("eg4-lp4", Role::Device, "{name: pack, kind: eg4-lp4, bus: b, address: 1}"),
        ("jbd-bms", Role::Device, "{name: bms, kind: jbd-bms}"),
        ("bsc-hub", Role::Device, "{name: hub, kind: bsc-hub}"),
        ("smp-server", Role::Device, "{name: dut, kind: smp-server}"),
        ("shelly", Role::Device, "{name: relay, kind: shelly}"),
        ("replay", Role::Device, "{name: field, kind: replay, bus: b, fixture: fixtures/captures/imported/eg4-fault3-bridge.bridge-addr1.jsonl}"),
        ("modbus-master", Role::Client, "{name: c, kind: modbus-master, port: p, addresses: [1]}"),
        ("inverter-master", Role::Client, "{name: c, kind: inverter-master, port: p, addresses: [1]}"),
        ("modbus-sniffer", Role::Client, "{name: c, kind: modbus-sniffer, port: p}"),
        ("legacy-client", Role::Client, "{name: c, kind: legacy-client, port: p, addresses: [1]}"),
        ("jbd-client", Role::Client, "{name: c, kind: jbd-client, device: bms}"),
        ("bsc-node", Role::Client, "{name: c, kind: bsc-node, hub: hub}"),
        ("bsc-raw", Role::Client, "{name: c, kind: bsc-raw, hub: hub}"),
        ("smp-client", Role::Client, "{name: c, kind: smp-client, device: smp}"),
        ("shelly-client", Role::Client, "{name: c, kind: shelly-client, device: relay}"),
    ];
    let mut registered: Vec<(&str, Role)> = REGISTRY.iter().map(|k| (k.name(), k.role())).collect();
    let mut listed: Vec<(&str, Role)> = minimal.iter().map(|(n, r, _)| (*n, *r)).collect();
    registered.sort_by_key(|k| k.0);
    listed.sort_by_key(|k| k.0);
    assert_eq!(registered, listed, "the registry's kinds and this test's rows differ");
    assert!(REGISTRY.iter().all(|k| !k.about().is_empty()), "every kind has a one-line summary");

    // The smallest world every entry can live in: a bus port, a BMS, a hub, an SMP server, a Shelly.
    for (name, role, entry) in minimal {
        let mut devices = vec!["{name: bms, kind: jbd-bms}", "{name: hub, kind: bsc-hub}", "{name: smp, kind: smp-server}", "{name: relay, kind: shelly}"];
        let mut clients = Vec::new();
        match role {
            Role::Device if !devices.iter().any(|d| d.contains(&format!("kind: {name}}}"))) => devices.push(entry),
            Role::Device => {}
            Role::Client => clients.push(*entry),
        }
        let list = |v: &[&str]| v.iter().map(|e| format!("  - {e}\n")).collect::<String>();
        let text = format!(
            "name: x\nbuses: [{{name: b, ports: [p]}}]\ndevices:\n{}clients:\n{}steps: []\n",
            list(&devices),
            if clients.is_empty() { "  []\n".to_string() } else { list(&clients) }
        );
        if let Err(e) = Scenario::parse(Path::new("k.yaml"), &text) {
            panic!("{name}: its minimal entry is refused: {e}\n{text}");
        }
    }

    // A misspelled kind: located, with the kinds there are.
    let e = parse("name: x\nclients:\n  - {name: c, kind: modbus-mastr, port: p}\nsteps: []\n");
    assert!(e.starts_with("bad.yaml:3:") && e.contains("unknown client kind `modbus-mastr`"), "{e}");
    for (name, role, _) in minimal.iter().filter(|(_, r, _)| *r == Role::Client) {
        assert!(e.contains(name), "{role:?} kind {name} missing from: {e}");
    }
    let e = parse("name: x\ndevices:\n  - {name: d, kind: eg4-lp5}\nsteps: []\n");
    assert!(e.starts_with("bad.yaml:3:") && e.contains("unknown device kind `eg4-lp5`") && e.contains("eg4-lp4, jbd-bms, bsc-hub"), "{e}");
}

/// `hilbench run` told to stop (issue 13): on SIGTERM or SIGINT the running
/// scenario fails as interrupted, its process group is stopped, its folder
/// (PTYs included) removed, no further scenario starts, the JUnit report is
/// written and the exit status is 128 + the signal. On SIGKILL the
/// scenario's processes die with the run, and the next run removes the
/// folder it left.
#[test]
fn a_run_stopped_by_a_signal_leaves_no_process_and_no_folder() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let pidfile = dir.path().join("sleeper.pid");
    let long = format!(
        "name: long\n{BUS}processes:\n  - {{name: sleeper, command: sh, args: ['-c', 'echo $$ > {}; echo up; exec sleep 90'], ready: up}}\nsteps:\n  - wait: 60s\n",
        pidfile.display()
    );
    std::fs::write(dir.path().join("a-long.yaml"), &long).unwrap();
    std::fs::write(dir.path().join("b-next.yaml"), "name: next\nsteps:\n  - wait: 10ms\n").unwrap();
    let run_folders = || std::fs::read_dir(&tmp).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("hilbench-run-")).count();
    let start = || {
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new(env!("CARGO_BIN_EXE_hilbench"))
            .args(["run", dir.path().to_str().unwrap(), "--junit"])
            .arg(dir.path().join("junit.xml"))
            .env("TMPDIR", &tmp)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The sleeper is up once it has written its pid.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let pid = loop {
            if let Some(p) = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
                break Pid::from_raw(p);
            }
            assert!(std::time::Instant::now() < deadline, "the scenario's process never started");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(run_folders(), 1);
        (child, pid)
    };
    let gone = |pid: Pid| {
        (0..250).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            kill(pid, None).is_err()
        })
    };

    for (sig, code) in [(Signal::SIGTERM, 143), (Signal::SIGINT, 130)] {
        let (mut child, sleeper) = start();
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{sig}");
        assert!(gone(sleeper), "{sig}: the scenario's process outlived the run");
        assert_eq!(run_folders(), 0, "{sig}: the scenario's folder is still there");
        let junit = std::fs::read_to_string(dir.path().join("junit.xml")).unwrap();
        assert!(junit.contains(&format!("interrupted by {sig}")) && !junit.contains("next"), "{sig}: {junit}");
    }

    let (mut child, sleeper) = start();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(gone(sleeper), "SIGKILL: the scenario's process outlived the run");
    assert_eq!(run_folders(), 1, "a killed run cannot clean up itself");
    std::fs::remove_file(dir.path().join("a-long.yaml")).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_hilbench"))
        .args(["run", dir.path().to_str().unwrap()])
        .env("TMPDIR", &tmp)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(run_folders(), 0, "the next run removes what the killed one left");
}
