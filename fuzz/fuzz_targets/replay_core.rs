//! Arbitrary bytes as a capture and the requests put to its replay. Input format and invariants:
//! the harness `hilbench::fuzzing::replay_answers_only_what_was_captured`, which tests/fuzz_corpus.rs
//! also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::replay_answers_only_what_was_captured(data);
});
