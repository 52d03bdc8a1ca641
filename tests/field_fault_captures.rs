//! Every field fault of ../shared/reference that has a scenario has a capture under
//! fixtures/captures/faults/ (fixtures/captures/faults/make.sh runs the scenario with
//! --capture and keeps the client's link). Each imports with one command into a
//! scenario that replays the device to its client; that scenario asserts the point of
//! the fault's own scenario, and passes. The JBD captures are also btsnoop files written
//! by Wireshark's editcap, which import as the same ATT frames.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A fault's capture (its scenario's file stem) and what its imported scenario must and
/// must not assert.
struct FieldFault {
    stem: &'static str,
    asserts: &'static [&'static str],
    refutes: &'static [&'static str],
}

const fn fault(stem: &'static str, asserts: &'static [&'static str], refutes: &'static [&'static str]) -> FieldFault {
    FieldFault { stem, asserts, refutes }
}

const EG4: &[FieldFault] = &[
    fault("eg4-fault1-address-collision", &["address: 1, kind: crc", "address: 1, field: soc_pct, equals: 90"], &[]),
    fault("eg4-fault2-no-reply", &["address: 3, kind: timeout", "address: 2, kind: timeout", "address: 2, field: soc_pct, equals: 80"], &[]),
    fault("eg4-fault3-address1-zeros", &["address: 1, kind: crc", "address: 2, kind: timeout", "address: 2, field: soc_pct, equals: 66"], &[]),
    fault("eg4-fault4-wrong-protocol", &["expect_errors: { client: master, address: 1, at_least: 1"], &["expect_reading"]),
    // A CRC 60 ms late still completes its answer; one 700 ms late lands after the
    // master's next poll: it reads the early answers and fails the late ones.
    fault("eg4-fault5-late-crc", &["address: 1, field: soc_pct, equals: 58", "expect_errors: { client: master, address: 1, at_least: 1"], &[]),
    fault("eg4-fault6-adapter-echo", &["address: 1, kind: echo", "address: 1, field: soc_pct, equals: 77"], &[]),
    fault("eg4-fault7-legacy-cell-msb", &["kind: legacy-client", "address: 1, field: soc_pct, equals: 60,", "flag: \"cell_ov_flag:5\"", "field: cell5_mv, equals: 3720,", "flag: \"alarm:voltage_high\""], &[]),
    // The bridge is captured on the wire: the polls the stalled adapter swallowed never
    // reached it, so the capture holds the readings and no timeout.
    fault("eg4-fault8-adapter-warmup", &["address: 1, field: soc_pct, equals: 47"], &[]),
];

const JBD: &[FieldFault] = &[
    fault("jbd-fault1-lone-77", &["field: soc_pct, equals: 64", "field: cell_count, equals: 8"], &["expect_errors"]),
    fault("jbd-fault2-truncated-cells", &["expect_errors: { client: app, at_least: 1", "field: soc_pct, equals: 80"], &[]),
    fault("jbd-fault3-bad-checksum", &["kind: checksum"], &["expect_reading"]),
    fault("jbd-fault4-duplicate-request", &["field: cell_count, equals: 16", "field: soc_pct, equals: 81"], &[]),
    fault("jbd-fault5-goes-silent", &["kind: timeout", "field: soc_pct, equals: 40"], &[]),
    fault("jbd-fault7-write-request-rejected", &["expect_errors"], &["expect_reading"]),
    fault("jbd-fault9-balance-bit-order", &["flag: \"balancing:cell14\""], &[]),
    fault("jbd-fault10-pin-required", &["kind: timeout"], &["expect_reading"]),
    fault("jbd-fault11-foreign-frames", &["field: soc_pct, equals: 47", "field: cell_count, equals: 16"], &["expect_errors"]),
];

fn hilbench(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(args).current_dir(dir).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/captures/faults").join(name)
}

/// Imports every fault's capture (`ext`) at once, checks each written scenario against
/// its fault, and runs them all; returns the folder.
fn import_and_replay(faults: &[FieldFault], ext: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["capture".to_string(), "import".into(), "--out".into(), "fx".into(), "--json".into()];
    for f in faults {
        let name = format!("{}.{ext}", f.stem);
        std::fs::copy(fixture(&name), dir.path().join(&name)).unwrap_or_else(|e| panic!("{name}: {e} (bash fixtures/captures/faults/make.sh writes it)"));
        args.push(name);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = hilbench(dir.path(), &args);
    assert!(ok, "{stderr}");
    let reports: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let mut scenarios = Vec::new();
    for (f, r) in faults.iter().zip(reports.as_array().unwrap()) {
        let s = &r["scenarios"][0];
        let path = s["scenario"].as_str().unwrap_or_else(|| panic!("{}: no scenario: {r}", f.stem)).to_string();
        let yaml = std::fs::read_to_string(dir.path().join(&path)).unwrap();
        for want in f.asserts {
            assert!(yaml.contains(want), "{}: no `{want}` in\n{yaml}", f.stem);
        }
        for unwanted in f.refutes {
            assert!(!yaml.contains(unwanted), "{}: `{unwanted}` in\n{yaml}", f.stem);
        }
        scenarios.push(path);
    }
    let mut run = vec!["run"];
    run.extend(scenarios.iter().map(String::as_str));
    let (passed, stdout, stderr) = hilbench(dir.path(), &run);
    assert!(passed && stdout.contains(&format!("{} passed, 0 failed", scenarios.len())), "{stdout}{stderr}");
    dir
}

#[test]
fn eg4_field_fault_captures_replay_to_a_master_that_meets_the_fault() {
    import_and_replay(EG4, "pcapng");
}

// In two halves, so that the runner overlaps their waits on the air.
#[test]
fn jbd_field_fault_captures_replay_to_a_client_that_meets_the_fault() {
    import_and_replay(&JBD[..4], "pcapng");
}

#[test]
fn more_jbd_field_fault_captures_replay_to_a_client_that_meets_the_fault() {
    import_and_replay(&JBD[4..], "pcapng");
}

/// The fixture's frames, direction and bytes, without times.
fn frames(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().skip(1).map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).map(|v| (v["dir"].as_str().unwrap().to_string(), v["hex"].as_str().unwrap().to_string())).collect()
}

/// editcap's btsnoop of each JBD fault capture imports as the same ATT frames as the
/// pcapng it was converted from.
#[test]
fn jbd_field_fault_btsnoop_files_import_as_their_pcapng_frames() {
    for f in JBD {
        let dir = tempfile::tempdir().unwrap();
        let mut fixtures = Vec::new();
        for ext in ["pcapng", "btsnoop"] {
            let out = dir.path().join(ext);
            let (ok, stdout, stderr) = hilbench(dir.path(), &["capture", "import", fixture(&format!("{}.{ext}", f.stem)).to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]);
            assert!(ok, "{}.{ext}: {stderr}", f.stem);
            let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            let devices = r[0]["devices"].as_array().unwrap();
            assert_eq!(devices.len(), 1, "{}.{ext}: {r}", f.stem);
            assert_eq!(devices[0]["kind"], "jbd-bms", "{}.{ext}: {r}", f.stem);
            fixtures.push(frames(Path::new(devices[0]["fixture"].as_str().unwrap())));
        }
        assert!(!fixtures[0].is_empty() && fixtures[0] == fixtures[1], "{}: the btsnoop's frames differ from the pcapng's", f.stem);
    }
}
