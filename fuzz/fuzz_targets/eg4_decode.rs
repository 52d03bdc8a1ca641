//! Arbitrary bytes as EG4 registers through every profile. Input format and invariants: the harness
//! `hilbench::fuzzing::eg4_registers_decode_normalized_and_round_trip`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::eg4_registers_decode_normalized_and_round_trip(data);
});
