//! Arbitrary bytes as one Modbus RTU request frame.
//! Invariants: no panic; a decoded request re-encodes to the same bytes; the stream framer
//! agrees on its length; serving it yields a frame that decodes to `serve`'s answer.
#![no_main]

use std::sync::OnceLock;

use hilbench::protocol::eg4::{Eg4Telemetry, RegisterImage, RegisterProfile};
use hilbench::protocol::modbus::{
    decode_request, decode_response, encode_request, request_frame_length, serve, serve_into,
    FrameLength, ModbusRtuFrame,
};
use libfuzzer_sys::fuzz_target;

fn image() -> &'static RegisterImage {
    static IMAGE: OnceLock<RegisterImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        RegisterProfile::Eg4Ll.image(&Eg4Telemetry {
            pack_mv: 53_000,
            cells_mv: vec![3312; 16],
            model: "EG4-LL".into(),
            ..Default::default()
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let framed = request_frame_length(data);
    let Ok(frame) = decode_request(data) else {
        return;
    };

    let encoded = encode_request(&frame).expect("a decoded request must re-encode");
    assert_eq!(encoded, data, "request round trip changed the bytes");

    match frame.pdu.function() {
        0x03 | 0x04 | 0x06 | 0x10 => assert_eq!(framed, FrameLength::Complete(data.len())),
        _ => assert_eq!(framed, FrameLength::Invalid),
    }

    let answer = serve(&frame.pdu, image());
    let mut out = Vec::new();
    serve_into(frame.address, &frame.pdu, image(), &mut out);
    let decoded = decode_response(&out).expect("serve_into must produce a valid frame");
    assert_eq!(
        decoded,
        ModbusRtuFrame {
            address: frame.address,
            pdu: answer
        }
    );
});
