//! Arbitrary bytes as what a client sends the air's message bus. Input format and
//! invariants: the harness `hilbench::fuzzing::dbus_wire_parses_restamps_and_matches`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::dbus_wire_parses_restamps_and_matches(data);
});
