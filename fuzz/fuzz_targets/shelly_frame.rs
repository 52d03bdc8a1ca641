//! Arbitrary bytes as a Shelly RPC frame and digest answer. Input format and invariants:
//! the harness `hilbench::fuzzing::shelly_frames_round_trip`, which tests/fuzz_corpus.rs
//! also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::shelly_frames_round_trip(data);
});
