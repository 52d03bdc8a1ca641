//! Arbitrary bytes as one direction of a captured TCP connection carrying WebSocket. Input
//! format and invariants: the harness `hilbench::fuzzing::ws_capture_reads_reordered_segments_as_the_stream`,
//! which tests/fuzz_corpus.rs also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::ws_capture_reads_reordered_segments_as_the_stream(data);
});
