//! Arbitrary bytes as an EG4 legacy 7E/0D frame. Input format and invariants: the harness
//! `hilbench::fuzzing::eg4_legacy_frames_round_trip`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::eg4_legacy_frames_round_trip(data);
});
