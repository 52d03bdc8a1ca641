//! Arbitrary writes to a simulated JBD BMS. Byte 0 picks the profile and quirks; the rest
//! is a sequence of `len, bytes…` writes, 50 ms apart.
//! Invariants: no panic; the receive buffer stays bounded; without the frame-breaking
//! quirks every reply is a well-formed response (or PIN reply) with a good checksum.
#![no_main]

use std::time::Duration;

use hilbench::device::jbd_core::{JbdBms, JbdConfig, JbdProfile, JbdQuirk};
use hilbench::protocol::jbd::{decode_response, PinFrame, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mut rest)) = data.split_first() else { return };
    let profile = [JbdProfile::Standard, JbdProfile::RejectsWriteRequest, JbdProfile::Chins, JbdProfile::Pin]
        [usize::from(sel & 3)];
    let breaking = sel & 0x80 != 0;
    let mut quirks = vec![JbdQuirk::SilentAfterFirstAnswer, JbdQuirk::FactoryEnterNoReply]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| sel & (4 << i) != 0)
        .map(|(_, q)| q)
        .collect::<Vec<_>>();
    if sel & 0x10 != 0 {
        quirks.push(JbdQuirk::BalanceBitsMsbFirst);
    }
    if breaking {
        quirks.extend([JbdQuirk::ForeignFrames, JbdQuirk::TruncatedCellVoltages, JbdQuirk::CorruptedData]);
    }
    let mut cfg = JbdConfig { profile, quirks, ..Default::default() };
    cfg.pack.cells = 4 + usize::from(sel >> 5) * 2; // 4..=18
    let mut bms = JbdBms::new(cfg).expect("valid config");
    bms.connected(Duration::ZERO);
    let mut now = Duration::ZERO;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (write, next) = tail.split_at(n);
        rest = next;
        now += Duration::from_millis(50);
        if len == 0xFF {
            bms.disconnected(now);
            bms.connected(now);
            continue;
        }
        for frame in bms.handle_write(write, now) {
            if !breaking {
                assert!(
                    decode_response(&frame).is_ok() || PinFrame::decode(&frame).is_ok(),
                    "malformed reply {frame:02X?}"
                );
            }
        }
        assert!(bms.pending_input() <= MAX_FRAME + n, "pending {}", bms.pending_input());
        let _ = bms.take_events();
    }
});
