//! The `hilbench sim eg4-lp4` contract: one JSON ready line, packs that
//! answer a plain client as a real pack would (replies, exceptions,
//! silence), clean exit on SIGTERM, clear errors on bad input.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{start_sim, with_crc, RawPort};
use hilbench::protocol::eg4::RegisterProfile;
use hilbench::protocol::modbus::{self, ExceptionCode, ModbusResponse};

fn poll(port: &mut RawPort, address: u8) -> Vec<u8> {
    port.send(&with_crc(vec![address, 3, 0, 0, 0, 47]));
    port.read_up_to(99, Duration::from_secs(2))
}

#[test]
fn serves_a_raw_client_and_cleans_up_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("eg4");
    let sim = start_sim(
        &[
            "eg4-lp4",
            "--tty",
            link.to_str().unwrap(),
            "--address",
            "1",
            "--address",
            "2",
            "--set",
            "soc=55",
            "--set",
            "cell3_mv=3400",
        ],
        dir.path(),
    );
    assert_eq!(sim.ready["ready"], true);
    assert_eq!(sim.ready["kind"], "eg4-lp4");
    assert_eq!(sim.tty(), link);
    assert!(std::fs::read_link(&link).unwrap().starts_with("/dev/pts"));

    let mut port = RawPort::open(&link);
    for address in [1u8, 2] {
        let reply = poll(&mut port, address);
        assert_eq!(reply.len(), 99, "address {address}: {reply:02X?}");
        let frame = modbus::decode_response(&reply).unwrap();
        assert_eq!(frame.address, address);
        let ModbusResponse::ReadHolding(regs) = frame.pdu else { panic!("{:?}", frame.pdu) };
        let t = RegisterProfile::Lp4V2.decode(0, &regs).unwrap();
        assert_eq!(t.soc_pct, 55);
        assert_eq!(t.cells_mv[2], 3400);
        assert_eq!(t.cells_mv.len(), 16);
        // Pack voltage (V×100) is the sum of the cells it reports.
        let sum: u32 = t.cells_mv.iter().map(|&c| u32::from(c)).sum();
        assert!((i64::from(t.pack_mv) - i64::from(sum)).abs() <= 10, "{} vs {sum}", t.pack_mv);
    }

    // Nobody at address 9: silence, as on a real bus.
    assert!(poll(&mut port, 9).is_empty());

    // Unsupported function → exception 01; out-of-range read → 02; bad count → 03.
    for (req, code) in [
        (vec![1, 0x05, 0, 0, 0xFF, 0], ExceptionCode::IllegalFunction),
        (vec![1, 0x03, 0, 100, 0, 1], ExceptionCode::IllegalDataAddress),
        (vec![1, 0x03, 0, 0, 0, 0], ExceptionCode::IllegalDataValue),
        (vec![1, 0x06, 0, 22, 0, 99], ExceptionCode::IllegalDataAddress),
    ] {
        port.send(&with_crc(req.clone()));
        let reply = port.read_up_to(5, Duration::from_secs(2));
        let f = modbus::decode_response(&reply).unwrap_or_else(|e| panic!("{req:02X?}: {e} {reply:02X?}"));
        match f.pdu {
            ModbusResponse::Exception { code: got, .. } => assert_eq!(got, code, "{req:02X?}"),
            other => panic!("{req:02X?}: expected exception, got {other:?}"),
        }
    }

    // Garbage, a bad CRC and a truncated request get silence; the pack then
    // answers the next good request normally (after the line went quiet).
    for junk in [vec![0x55, 0xAA, 0x13], vec![1, 3, 0, 0, 0, 47, 0, 0], vec![1, 3, 0]] {
        port.send(&junk);
        assert!(port.read_up_to(1, Duration::from_millis(150)).is_empty(), "{junk:02X?}");
    }
    assert_eq!(poll(&mut port, 1).len(), 99);

    // Two requests back to back (one still in flight): both answered, in order.
    port.send(&with_crc(vec![1, 3, 0, 0, 0, 47]));
    port.send(&with_crc(vec![2, 3, 0, 0, 0, 47]));
    let both = port.read_up_to(198, Duration::from_secs(2));
    assert_eq!(both.len(), 198);
    assert_eq!(both[0], 1);
    assert_eq!(both[99], 2);

    drop(port);
    assert_eq!(sim.stop(), 0);
    assert!(link.symlink_metadata().is_err(), "symlink left behind");
}

#[test]
fn legacy_protocol_and_one_pty_per_pack() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let sim = start_sim(
        &[
            "eg4-lp4", "--protocol", "legacy", "--tty", a.to_str().unwrap(), "--tty", b.to_str().unwrap(),
            "--address", "1", "--address", "2", "--set", "soc=42",
        ],
        dir.path(),
    );
    assert_eq!(sim.ready["endpoints"]["ttys"].as_array().unwrap().len(), 2);
    let mut pb = RawPort::open(&b);
    pb.send(&hilbench::protocol::eg4_legacy::encode_request(
        2,
        hilbench::protocol::eg4_legacy::LegacyCommand::GeneralStatus,
    ));
    let reply = pb.read_up_to(4096, Duration::from_millis(500));
    let s = hilbench::protocol::eg4_legacy::decode_status_reply(&reply).unwrap();
    assert_eq!(s.soc_centi, 4200);
    assert_eq!(s.cells_mv.len(), 16);
    // Pack 1 is on the other PTY: nothing answers address 1 here.
    pb.send(&hilbench::protocol::eg4_legacy::encode_request(
        1,
        hilbench::protocol::eg4_legacy::LegacyCommand::GeneralStatus,
    ));
    assert!(pb.read_up_to(1, Duration::from_millis(200)).is_empty());
    drop(pb);
    assert_eq!(sim.stop(), 0);
    assert!(a.symlink_metadata().is_err() && b.symlink_metadata().is_err());
}

/// Runs a simulator that must refuse its input: a clear error on stderr,
/// never a panic before or after it.
fn sim_error(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench"))
        .arg("sim")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "sim {args:?} panicked:\n{err}");
    assert!(err.trim_start().starts_with("error: "), "sim {args:?}: the error comes first:\n{err}");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

#[test]
fn bad_input_gets_clear_errors_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = sim_error(&["eg4-lp4", "--tty", "/nonexistent-dir/eg4"]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "no ready line on error: {out}");
    assert!(err.contains("/nonexistent-dir") && err.contains("does not exist"), "{err}");

    let (code, out, err) = sim_error(&["smp-server", "--mtu", "100"]);
    assert_ne!(code, 0);
    assert!(out.is_empty() && err.contains("give --ble too"), "{out}{err}");

    let file = dir.path().join("taken");
    std::fs::write(&file, b"mine").unwrap();
    let (code, _, err) = sim_error(&["eg4-lp4", "--tty", file.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("not a symlink"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"mine");

    let (code, _, err) = sim_error(&["eg4-lp4", "--set", "bogus=1"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown state key `bogus`") && err.contains("soc"), "{err}");

    let (code, _, err) = sim_error(&["eg4-lp4", "--set", "soc=150"]);
    assert_ne!(code, 0);
    assert!(err.contains("soc"), "{err}");

    // Second of two PTY paths is unusable: the first must not be left behind.
    let ok = dir.path().join("first");
    let (code, _, err) = sim_error(&[
        "eg4-lp4", "--tty", ok.to_str().unwrap(), "--tty", "/nonexistent-dir/second", "--address", "1", "--address", "2",
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(ok.symlink_metadata().is_err(), "first symlink left behind");

    let (code, _, err) = sim_error(&["eg4-lp4", "--profile", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("lp4-v2"), "{err}");
}

#[test]
fn busy_tty_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("eg4");
    let sim = start_sim(&["eg4-lp4", "--tty", link.to_str().unwrap()], dir.path());
    let (code, _, err) = sim_error(&["eg4-lp4", "--tty", link.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("already in use"), "{err}");
    // The first simulator still owns its link.
    assert!(link.exists());
    assert_eq!(sim.stop(), 0);
}

#[test]
fn wire_time_half_duplex_and_the_eg4_ll_profile() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("eg4");
    let sim = start_sim(
        &["eg4-lp4", "--tty", link.to_str().unwrap(), "--wire-time", "--baud", "9600", "--profile", "eg4-ll", "--set", "soc=71"],
        dir.path(),
    );
    let mut port = RawPort::open(&link);
    // eg4-ll: 39 registers at 0, then the ASCII identity block at 105.
    port.send(&with_crc(vec![1, 3, 0, 0, 0, 39]));
    let reply = port.read_up_to(5 + 78, Duration::from_secs(2));
    let f = modbus::decode_response(&reply).unwrap_or_else(|e| panic!("{e}: {reply:02X?}"));
    let ModbusResponse::ReadHolding(regs) = f.pdu else { panic!() };
    let t = RegisterProfile::Eg4Ll.decode(0, &regs).unwrap();
    assert_eq!(t.soc_pct, 71);
    port.send(&with_crc(vec![1, 3, 0, 105, 0, 23]));
    let reply = port.read_up_to(5 + 46, Duration::from_secs(2));
    let f = modbus::decode_response(&reply).unwrap();
    let ModbusResponse::ReadHolding(regs) = f.pdu else { panic!() };
    let ascii: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
    assert!(String::from_utf8_lossy(&ascii).contains("LifePower4"), "{ascii:?}");
    // Registers 39..=104 do not exist on this map.
    port.send(&with_crc(vec![1, 3, 0, 50, 0, 1]));
    let reply = port.read_up_to(5, Duration::from_secs(2));
    assert!(matches!(
        modbus::decode_response(&reply).unwrap().pdu,
        ModbusResponse::Exception { code: ExceptionCode::IllegalDataAddress, .. }
    ));
    // A second request sent while the first reply is still on the wire
    // reaches no pack (half-duplex): exactly one reply comes back.
    port.send(&with_crc(vec![1, 3, 0, 0, 0, 39]));
    // At 9600 baud the reply occupies the line from about 12 ms to 98 ms.
    std::thread::sleep(Duration::from_millis(40));
    port.send(&with_crc(vec![1, 3, 0, 0, 0, 39]));
    let both = port.read_up_to(2 * 83, Duration::from_millis(1200));
    assert_eq!(both.len(), 83, "{both:02X?}");
    drop(port);
    assert_eq!(sim.stop(), 0);
}

/// A SIGTERM the moment the ready line is out shuts every simulator down
/// cleanly: the handlers are in place before the line is printed, so the
/// symlink goes with the process (it used to be installed on the first poll
/// after the line, and a fast SIGTERM killed the process with its link left).
#[test]
fn a_sigterm_right_after_the_ready_line_removes_the_links() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("port");
    let l = link.to_str().unwrap();
    for args in [vec!["smp-server", "--tty", l], vec!["eg4-lp4", "--tty", l]] {
        for _ in 0..10 {
            let sim = common::start_sim(&args, dir.path());
            assert_eq!(sim.stop(), 0, "{args:?}");
            assert!(link.symlink_metadata().is_err(), "{args:?} left {}", link.display());
        }
    }
}
