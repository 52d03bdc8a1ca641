//! Arbitrary bytes as a capture file (pcapng, pcap, btsnoop) down to ATT. Input format and invariants:
//! the harness `hilbench::fuzzing::capture_file_decodes_the_same_in_any_chunking`, which tests/fuzz_corpus.rs
//! also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::capture_file_decodes_the_same_in_any_chunking(data);
});
