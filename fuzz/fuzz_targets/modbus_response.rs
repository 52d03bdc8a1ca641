//! Arbitrary bytes as one Modbus RTU response frame. Input format and invariants: the harness
//! `hilbench::fuzzing::modbus_response_round_trips`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::modbus_response_round_trips(data);
});
