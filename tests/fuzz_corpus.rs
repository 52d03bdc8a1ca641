//! Replays the fuzz regression corpus (fixtures/fuzz/) through every
//! decoder on the stable toolchain, so CI keeps it green without nightly
//! cargo-fuzz. Valid seed frames must also survive a decode/encode round
//! trip.

use std::path::Path;

use hilbench::protocol::{bvlc_sc, eg4::RegisterProfile, eg4_legacy, modbus};

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
        }
    }
    assert!(inputs >= 30, "corpus has only {inputs} inputs");
    assert!(round_trips >= 5, "only {round_trips} valid frames in the corpus");
}
