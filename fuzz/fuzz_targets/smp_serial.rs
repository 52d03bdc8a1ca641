//! Arbitrary bytes into the SMP server's serial port (console or raw framing, line pool,
//! wire time) and its answers back out. Input format and invariants: the harness
//! `hilbench::fuzzing::smp_serial_link_keeps_time_and_bounds`, which tests/fuzz_corpus.rs
//! also replays over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hilbench::fuzzing::smp_serial_link_keeps_time_and_bounds(data);
});
