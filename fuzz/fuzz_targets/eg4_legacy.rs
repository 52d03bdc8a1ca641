//! Arbitrary bytes as a legacy 7E/0D frame (request, status reply, version reply).
//! Invariants: no panic; a request with a valid checksum re-encodes to the same bytes; a
//! decoded status/version reply re-encodes and decodes to the same value; framing agrees.
#![no_main]

use hilbench::protocol::eg4_legacy::{
    decode_reply, decode_request, decode_status_payload, decode_status_reply, decode_version_reply,
    encode_request, encode_status_reply, encode_version_reply, frame_length, LegacyError,
};
use hilbench::protocol::modbus::FrameLength;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let framed = frame_length(data);

    if let Ok(req) = decode_request(data) {
        if req.checksum_valid() {
            assert_eq!(encode_request(req.address, req.command), data);
        }
    }

    let Ok(reply) = decode_reply(data) else {
        return;
    };
    assert_eq!(framed, FrameLength::Complete(data.len()));

    if let Ok(status) = decode_status_reply(data) {
        assert_eq!(decode_status_payload(reply.payload).as_ref(), Ok(&status));
        // Decoded values are always in range. Re-encoding drops extra words and groups 9/10
        // contents but always writes groups 9 and 10 (4 bytes), so only an 8- or 9-group
        // payload within 4 bytes of the limit may fail, and only for its length.
        match encode_status_reply(reply.address, &status) {
            Ok(again) => assert_eq!(
                decode_status_reply(&again).expect("re-encoded status must decode"),
                status
            ),
            Err(LegacyError::PayloadTooLong { len, .. }) => {
                assert!(
                    reply.payload.len() > 251 && len <= reply.payload.len() + 4,
                    "{len}"
                )
            }
            Err(e) => panic!("a decoded status must re-encode: {e}"),
        }
    }

    if let Ok(version) = decode_version_reply(data) {
        let again = encode_version_reply(version.address, version.command, &version.text);
        // Lossy UTF-8 replacement can grow the text past 255 bytes; otherwise it must
        // round-trip.
        if let Ok(again) = again {
            assert_eq!(
                decode_version_reply(&again).expect("re-encoded version must decode"),
                version
            );
        }
    }
});
