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

/// `bad_checksum` on a jbd-bms link, with the checksum layout the jbd-bms kind
/// declares for its link: the BMS's 0x03 reply goes out in 20-byte
/// notifications (MTU 23), the middle ones pass untouched, and in the last one
/// the sum changes while the 0x77 end marker stays.
#[test]
fn jbd_bad_checksum_breaks_the_sum_and_keeps_the_end_marker() {
    use hilbench::kind::{find, Role};
    use hilbench::link::{FaultSpec, LinkEngine};

    let entry: yaml_serde::Value = yaml_serde::from_str("{name: bms}").unwrap();
    let declared = find(Role::Device, "jbd-bms").unwrap().decode(entry).unwrap();
    let link = declared.links().into_iter().next().expect("jbd-bms has a link");
    let spec = FaultSpec { kind: "bad_checksum".into(), direction: Some(Direction::Response), ..Default::default() };
    let mut engine = LinkEngine::new("bms", 1);
    engine.add_rule(spec.into_rule(link.checksum).unwrap(), 0);

    let mut bms = pack(JbdProfile::Standard, vec![]);
    let reply = bms.handle_write(&encode_read(reg::BASIC_INFO), Duration::from_millis(100)).remove(0);
    let mut lines = vec![format!("as sent:     {}", hilbench::client::hex(&reply))];
    let mut received = Vec::new();
    for piece in reply.chunks(20) {
        for e in engine.process(Direction::Response, piece, 0, 0) {
            lines.push(format!("notification {}", hilbench::client::hex(&e.bytes)));
            received.extend_from_slice(&e.bytes);
        }
    }
    lines.push(format!("as received: {}", hilbench::client::hex(&received)));
    lines.push(format!("decoded:     {}", describe_jbd(Direction::Response, &received)));
    let n = reply.len();
    assert_eq!(received[..n - 3], reply[..n - 3], "only the checksum changes");
    assert_ne!(received[n - 3..n - 1], reply[n - 3..n - 1], "the sum is broken");
    assert_eq!(received[n - 1], 0x77, "the end marker stays");
    insta::assert_snapshot!(lines.join("\n"));
}
