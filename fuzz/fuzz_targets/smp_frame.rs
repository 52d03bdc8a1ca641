//! Arbitrary bytes as an SMP message and as serial console lines. Input format and
//! invariants: the harness `hilbench::fuzzing::smp_frames_round_trip`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::smp_frames_round_trip(data);
});
