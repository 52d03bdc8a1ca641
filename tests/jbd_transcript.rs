//! Decoded transcript of a JBD poll cycle as an insta snapshot: what a Home Assistant
//! integration asks (0x05 once, then 0x03 and 0x04) and what the simulated BMS answers,
//! frame by frame. A change in what goes over the air shows up as a reviewed diff.

use std::time::Duration;

use hilbench::device::jbd_core::{JbdBms, JbdConfig, JbdProfile, JbdQuirk};
use hilbench::link::record::Direction;
use hilbench::protocol::jbd::{encode_read, reg, MosControl};
use hilbench::scenario::transcript::describe_jbd;

/// Sends each request at 100 ms steps and renders both directions.
fn transcript(bms: &mut JbdBms, requests: &[Vec<u8>]) -> String {
    let mut lines = Vec::new();
    for (i, req) in requests.iter().enumerate() {
        let now = Duration::from_millis(100 * (i as u64 + 1));
        lines.push(format!(
            "central -> {}",
            describe_jbd(Direction::Request, req)
        ));
        let replies = bms.handle_write(req, now);
        if replies.is_empty() {
            lines.push("bms     <- (silent)".into());
        }
        for r in replies {
            lines.push(format!(
                "bms     <- {}",
                describe_jbd(Direction::Response, &r)
            ));
        }
    }
    lines.join("\n")
}

fn pack(profile: JbdProfile, quirks: Vec<JbdQuirk>) -> JbdBms {
    let mut cfg = JbdConfig {
        profile,
        quirks,
        ..Default::default()
    };
    cfg.pack.cells = 8;
    cfg.pack.ntc = 2;
    let mut bms = JbdBms::new(cfg).unwrap();
    bms.connected(Duration::ZERO);
    bms.set("soc", 65.0).unwrap();
    bms.set("current_a", -12.5).unwrap();
    bms.set("temp2_c", 31.4).unwrap();
    bms
}

fn poll() -> Vec<Vec<u8>> {
    vec![
        encode_read(reg::HARDWARE_VERSION),
        encode_read(reg::BASIC_INFO),
        encode_read(reg::CELL_VOLTAGES),
    ]
}

#[test]
fn jbd_poll_cycle() {
    let mut bms = pack(JbdProfile::Standard, vec![]);
    let mut reqs = poll();
    reqs.push(
        MosControl {
            charge_off: false,
            discharge_off: true,
        }
        .request(),
    );
    reqs.push(encode_read(reg::BASIC_INFO));
    reqs.push(vec![0xDD, 0xA5, 0x04, 0x00, 0xFF, 0xFB, 0x77]); // bad checksum
    insta::assert_snapshot!(transcript(&mut bms, &reqs));
}

#[test]
fn jbd_chins_and_field_quirks() {
    let mut bms = pack(
        JbdProfile::Chins,
        vec![JbdQuirk::ForeignFrames, JbdQuirk::TruncatedCellVoltages],
    );
    insta::assert_snapshot!(transcript(&mut bms, &poll()));
}
