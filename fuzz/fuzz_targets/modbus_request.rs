//! Arbitrary bytes as one Modbus RTU request frame. Input format and invariants: the harness
//! `hilbench::fuzzing::modbus_request_round_trips_and_serves`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::modbus_request_round_trips_and_serves(data);
});
