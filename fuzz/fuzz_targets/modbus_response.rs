//! Arbitrary bytes as one Modbus RTU response frame.
//! Invariants: no panic; owned and borrowed decoders agree; a decoded response re-encodes
//! to the same bytes; the stream framer reports exactly the frame's length.
#![no_main]

use hilbench::protocol::modbus::{
    decode_response, decode_response_borrowed, encode_response, response_frame_length, FrameLength,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let owned = decode_response(data);
    let borrowed = decode_response_borrowed(data);
    match (&owned, &borrowed) {
        (Ok(o), Ok(b)) => {
            assert_eq!(o.address, b.address);
            assert_eq!(o.pdu, b.pdu.to_response());
        }
        (Err(e1), Err(e2)) => assert_eq!(e1, e2),
        _ => panic!("owned and borrowed decoders disagree: {owned:?} vs {borrowed:?}"),
    }
    let Ok(frame) = owned else { return };
    let encoded = encode_response(&frame).expect("a decoded response must re-encode");
    assert_eq!(encoded, data, "response round trip changed the bytes");
    assert_eq!(
        response_frame_length(data),
        FrameLength::Complete(data.len())
    );
});
