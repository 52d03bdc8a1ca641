//! Arbitrary bytes as one direction of an HTTP/1.1 connection. Input format and
//! invariants: the harness `hilbench::fuzzing::http_messages_read_alike_in_any_pieces`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::http_messages_read_alike_in_any_pieces(data);
});
