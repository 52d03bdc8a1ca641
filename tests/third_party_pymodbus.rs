//! An independent Modbus RTU master (pymodbus, from PyPI) drives the PTY
//! simulator: the registers it reads must be the pack's state, and under a
//! CRC fault and a stall it reports what it reports on a real line.
//!
//! Needs the venv that `ci/test.sh` creates (or HILBENCH_PYTHON pointing at
//! a Python with pymodbus): without it the test fails and says so.

mod common;

use std::path::Path;
use std::process::Command;

use common::start_sim;

fn python() -> String {
    hilbench::python_with("pymodbus, serial").unwrap_or_else(|e| panic!("{e}"))
}

fn poll_script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py/pymodbus_poll.py")
        .display()
        .to_string()
}

#[test]
fn pymodbus_reads_the_47_registers_of_the_pack_state() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("eg4");
    let sim = start_sim(
        &[
            "eg4-lp4", "--tty", link.to_str().unwrap(), "--address", "1", "--address", "4",
            "--set", "soc=63", "--set", "soh=97", "--set", "current_a=-12.5", "--set", "temp_c=31",
            "--set", "cycles=77", "--set", "cell5_mv=3401", "--set", "capacity_ah=105",
        ],
        dir.path(),
    );
    let out = Command::new(&py)
        .args([&poll_script(), "--port", link.to_str().unwrap(), "--address", "1", "--address", "4", "--count", "47", "--timeout", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pymodbus_poll failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, address) in lines.iter().zip([1, 4]) {
        assert_eq!(line["address"], address);
        assert_eq!(line["ok"], true, "{line}");
        let r: Vec<u16> = line["registers"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u16).collect();
        assert_eq!(r.len(), 47);
        assert_eq!(r[22], 63, "SoC");
        assert_eq!(r[23], 97, "SoH");
        assert_eq!(r[1] as i16, -1250, "current ×100, signed");
        assert_eq!(&r[18..22], &[31, 31, 31, 31], "temperatures");
        assert_eq!(r[39], 77, "cycles");
        assert_eq!(r[6], 3401, "cell 5");
        assert_eq!(r[36], 16, "cell count");
        assert_eq!(r[37], 1050, "capacity Ah×10");
        assert_eq!(r[32], 10752);
        assert_eq!(r[30] & 1, 1, "heater bit");
        assert_eq!(r[34], 0, "no protections");
        let cells: u32 = r[2..18].iter().map(|&c| u32::from(c)).sum();
        assert!((i64::from(r[0]) * 10 - i64::from(cells)).abs() <= 10, "pack V {} vs cells {cells}", r[0]);
        // Remaining capacity follows SoC × usable capacity.
        let expect_rem = 0.63 * 105.0 * 0.97 * 100.0;
        assert!((f64::from(r[38]) - expect_rem).abs() < 150.0, "remaining {} vs {expect_rem}", r[38]);
    }
    assert_eq!(sim.stop(), 0);
}

#[test]
fn pymodbus_reports_crc_errors_and_stalls_as_on_a_real_line() {
    let py = python();
    std::env::set_var("HILBENCH_PYTHON", &py);
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/third-party/pymodbus-faults.yaml");
    let s = hilbench::scenario::Scenario::load(&file).unwrap();
    let r = hilbench::scenario::run_file_blocking(s, file, Default::default());
    assert!(r.passed, "{}", hilbench::scenario::report::summary_line(&r));
    let p = &r.processes[0];
    let crc: Vec<&String> = p.output.iter().filter(|l| l.contains(r#""error_kind": "crc""#)).collect();
    assert_eq!(crc.len(), 3, "three corrupted replies, three CRC errors: {crc:?}");
    assert!(crc.iter().all(|l| l.contains("No response received")), "{crc:?}");
    assert!(p.output.iter().any(|l| l.contains(r#""error_kind": "timeout""#)));
}
