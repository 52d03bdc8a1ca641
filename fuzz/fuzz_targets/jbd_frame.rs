//! Arbitrary bytes as a JBD frame and notification stream. Input format and invariants: the harness
//! `hilbench::fuzzing::jbd_frames_round_trip_and_assemble`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::jbd_frames_round_trip_and_assemble(data);
});
