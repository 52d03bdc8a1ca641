//! Arbitrary bytes as one BACnet/SC BVLC message. Input format and invariants: the harness
//! `hilbench::fuzzing::bvlc_sc_round_trips_and_forwards`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::bvlc_sc_round_trips_and_forwards(data);
});
