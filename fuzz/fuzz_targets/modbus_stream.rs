//! Arbitrary bytes as a raw Modbus / EG4 legacy byte stream. Input format and invariants: the harness
//! `hilbench::fuzzing::modbus_stream_framers_agree`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::modbus_stream_framers_agree(data);
});
