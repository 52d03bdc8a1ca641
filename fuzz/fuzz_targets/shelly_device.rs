//! Arbitrary bytes as frames to a simulated Shelly device. Input format and invariants:
//! the harness `hilbench::fuzzing::shelly_device_answers_are_well_formed`, which
//! tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::shelly_device_answers_are_well_formed(data);
});
