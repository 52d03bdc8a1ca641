//! Arbitrary bytes as a raw byte stream (no timing), split with the frame_length functions.
//! Invariants: no panic; `Complete(n)` never exceeds the buffer and is stable as more bytes
//! arrive; decoding every prefix never panics and a successful decode of a prefix matches
//! the framer; the resynchronising splitter always makes progress.
#![no_main]

use hilbench::protocol::eg4_legacy;
use hilbench::protocol::modbus::{
    decode_request, decode_response, request_frame_length, response_frame_length, FrameLength,
};
use libfuzzer_sys::fuzz_target;

type Framer = fn(&[u8]) -> FrameLength;

/// Splits `data` like a resynchronising reader would; returns how many frames it found.
fn split(data: &[u8], framer: Framer, decode_ok: &dyn Fn(&[u8]) -> bool) -> usize {
    let mut pos = 0;
    let mut frames = 0;
    while let Some(buf) = data.get(pos..) {
        if buf.is_empty() {
            break;
        }
        match framer(buf) {
            FrameLength::Complete(n) => {
                assert!(
                    n > 0 && n <= buf.len(),
                    "Complete({n}) for {} buffered bytes",
                    buf.len()
                );
                if decode_ok(&buf[..n]) {
                    frames += 1;
                    pos += n;
                } else {
                    pos += 1;
                }
            }
            FrameLength::Invalid => pos += 1,
            FrameLength::NeedMore => break,
        }
    }
    frames
}

/// Once a prefix is `Complete(n)`, every longer prefix must say the same.
fn check_monotonic(data: &[u8], framer: Framer) {
    let mut seen: Option<usize> = None;
    for k in 0..=data.len().min(300) {
        let r = framer(&data[..k]);
        if let Some(n) = seen {
            assert_eq!(r, FrameLength::Complete(n), "prefix {k} changed its mind");
        } else if let FrameLength::Complete(n) = r {
            assert!(n <= k);
            seen = Some(n);
        } else if r == FrameLength::Invalid {
            // Invalid must also be stable for longer prefixes.
            for j in k..=data.len().min(300) {
                assert_eq!(
                    framer(&data[..j]),
                    FrameLength::Invalid,
                    "Invalid then not at {j}"
                );
            }
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    for framer in [
        request_frame_length as Framer,
        response_frame_length as Framer,
        eg4_legacy::frame_length as Framer,
    ] {
        check_monotonic(data, framer);
    }

    for k in 0..=data.len().min(300) {
        let p = &data[..k];
        if decode_request(p).is_ok() {
            let f = request_frame_length(p);
            assert!(
                f == FrameLength::Complete(k) || f == FrameLength::Invalid,
                "decoded request of {k} bytes but framer says {f:?}"
            );
        }
        if decode_response(p).is_ok() {
            assert_eq!(response_frame_length(p), FrameLength::Complete(k));
        }
        if eg4_legacy::decode_reply(p).is_ok() {
            assert_eq!(eg4_legacy::frame_length(p), FrameLength::Complete(k));
        }
    }

    split(data, request_frame_length, &|f| decode_request(f).is_ok());
    split(data, response_frame_length, &|f| decode_response(f).is_ok());
    split(data, eg4_legacy::frame_length, &|f| {
        eg4_legacy::decode_reply(f).is_ok()
    });
});
