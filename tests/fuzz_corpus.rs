//! Replays the fuzz regression corpus (fixtures/fuzz/) through every
//! decoder on the stable toolchain, so CI keeps it green without nightly
//! cargo-fuzz. Valid seed frames must also survive a decode/encode round
//! trip.

use std::path::Path;

use std::time::Duration;

use hilbench::device::jbd_core::{JbdBms, JbdConfig, JbdProfile, JbdQuirk};
use hilbench::protocol::{bvlc_sc, eg4::RegisterProfile, eg4_legacy, jbd, modbus};

#[test]
fn every_corpus_input_decodes_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fuzz");
    let mut inputs = 0;
    let mut round_trips = 0;
    for target in std::fs::read_dir(&root).unwrap() {
        for file in std::fs::read_dir(target.unwrap().path()).unwrap() {
            let data = std::fs::read(file.unwrap().path()).unwrap();
            inputs += 1;
            if let Ok(f) = modbus::decode_request(&data) {
                if let Ok(again) = modbus::encode_request(&f) {
                    assert_eq!(modbus::decode_request(&again).unwrap(), f);
                    round_trips += 1;
                }
            }
            if let Ok(f) = modbus::decode_response(&data) {
                if let Ok(again) = modbus::encode_response(&f) {
                    assert_eq!(again, data, "response re-encodes byte for byte");
                    round_trips += 1;
                }
            }
            let _ = modbus::request_frame_length(&data);
            let _ = modbus::response_frame_length(&data);
            let _ = eg4_legacy::frame_length(&data);
            let _ = eg4_legacy::decode_request(&data);
            let _ = eg4_legacy::decode_status_reply(&data);
            let _ = eg4_legacy::decode_version_reply(&data);
            let regs: Vec<u16> = data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])).collect();
            for p in RegisterProfile::ALL {
                let _ = p.decode(0, &regs);
            }
            if let Ok(m) = bvlc_sc::decode(&data) {
                assert_eq!(bvlc_sc::decode(&bvlc_sc::encode(&m).unwrap()).unwrap(), m);
                round_trips += 1;
            }
            let mut out = Vec::new();
            let _ = bvlc_sc::rewrite_for_forwarding(&data, bvlc_sc::Vmac([2, 0, 0, 0, 0, 1]), true, &mut out);
            round_trips += jbd_round_trips(&data);
        }
    }
    assert!(inputs >= 30, "corpus has only {inputs} inputs");
    assert!(round_trips >= 5, "only {round_trips} valid frames in the corpus");
}

/// JBD decoders on one input; counts the valid frames that re-encode byte for byte.
fn jbd_round_trips(data: &[u8]) -> usize {
    let mut n = 0;
    if let Ok(r) = jbd::decode_request(data) {
        assert_eq!(jbd::encode_request(r.op, r.reg, &r.data).unwrap(), data);
        n += 1;
    }
    if let Ok(r) = jbd::decode_response(data) {
        assert_eq!(jbd::encode_response(r.reg, r.status, &r.data).unwrap(), data);
        n += 1;
        if let Ok(b) = jbd::BasicInfo::decode(&r.data) {
            assert_eq!(b.encode().unwrap(), r.data);
        }
        if let Ok(c) = jbd::CellVoltages::decode(&r.data) {
            assert_eq!(c.encode().unwrap(), r.data);
        }
    }
    if let Ok(p) = jbd::PinFrame::decode(data) {
        assert_eq!(p.encode().unwrap(), data);
        n += 1;
    }
    let mut a = jbd::JbdResponseAssembler::new();
    let _ = a.push(data);
    n
}

/// The `jbd_device` corpus through the device, read as the fuzz target reads it:
/// byte 0 picks profile and quirks, then `len, bytes…` writes 50 ms apart (len 0xFF =
/// reconnect).
#[test]
fn jbd_device_corpus_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fuzz/jbd_device");
    let mut replies = 0;
    let mut inputs = 0;
    for file in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(file.unwrap().path()).unwrap();
        let Some((&sel, mut rest)) = data.split_first() else { continue };
        inputs += 1;
        let profile = [JbdProfile::Standard, JbdProfile::RejectsWriteRequest, JbdProfile::Chins, JbdProfile::Pin]
            [usize::from(sel & 3)];
        let breaking = sel & 0x80 != 0;
        let mut quirks: Vec<JbdQuirk> = [JbdQuirk::SilentAfterFirstAnswer, JbdQuirk::FactoryEnterNoReply]
            .into_iter()
            .enumerate()
            .filter(|(i, _)| sel & (4 << i) != 0)
            .map(|(_, q)| q)
            .collect();
        if sel & 0x10 != 0 {
            quirks.push(JbdQuirk::BalanceBitsMsbFirst);
        }
        if breaking {
            quirks.extend([JbdQuirk::ForeignFrames, JbdQuirk::TruncatedCellVoltages, JbdQuirk::CorruptedData]);
        }
        let mut cfg = JbdConfig { profile, quirks, ..Default::default() };
        cfg.pack.cells = 4 + usize::from(sel >> 5) * 2; // 4..=18
        let mut bms = JbdBms::new(cfg).unwrap();
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
                replies += 1;
                if !breaking {
                    assert!(
                        jbd::decode_response(&frame).is_ok() || jbd::PinFrame::decode(&frame).is_ok(),
                        "malformed reply {frame:02X?}"
                    );
                }
            }
            assert!(bms.pending_input() <= jbd::MAX_FRAME + n);
        }
    }
    assert!(inputs >= 8, "jbd_device corpus has only {inputs} inputs");
    assert!(replies >= 10, "the seeds should draw replies, got {replies}");
}
