//! Arbitrary bytes as writes to a simulated JBD BMS. Input format and invariants: the harness
//! `hilbench::fuzzing::jbd_device_replies_are_well_formed`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::jbd_device_replies_are_well_formed(data);
});
