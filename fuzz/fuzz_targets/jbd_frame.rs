//! Arbitrary bytes as a JBD frame (request, response, PIN frame, typed payloads) and as a
//! notification stream for the client-side assembler.
//! Invariants: no panic; whatever decodes re-encodes to the same bytes; the assembler
//! accounts for every byte (frames + skipped + pending = input) and finds the same frames
//! however the stream is chunked.
#![no_main]

use hilbench::protocol::jbd::{
    decode_request, decode_response_unchecked, decode_string, encode_request, encode_response,
    encode_string, frame_length, malform, pin_frame_length, Action, Assembled, BasicInfo,
    CellVoltages, ErrorCounters, FactoryCommand, FrameLength, HardwareVersion, JbdResponseAssembler,
    Malformation, MosControl, PinFrame,
};
use libfuzzer_sys::fuzz_target;

fn payloads(d: &[u8]) {
    if let Ok(b) = BasicInfo::decode(d) {
        // Raw fuzz input can be longer than a frame's 255 data bytes.
        if d.len() <= 255 {
            assert_eq!(b.encode().as_deref(), Ok(d), "basic info round trip");
        }
        let _ = (b.temps_c(), b.date(), b.balancing_cells(), b.protection_names());
    }
    if let Ok(c) = CellVoltages::decode(d) {
        assert_eq!(c.encode().as_deref(), Ok(d));
    }
    if let Ok(h) = HardwareVersion::decode(d) {
        assert_eq!(h.encode().as_deref(), Ok(d));
    }
    if let Ok(e) = ErrorCounters::decode(d) {
        if d.len() <= 254 {
            assert_eq!(e.encode().as_deref(), Ok(d));
        }
    }
    if let Ok(s) = decode_string(d) {
        assert_eq!(encode_string(&s).as_deref(), Ok(d));
    }
    if let Ok(m) = MosControl::decode(d) {
        assert_eq!(m.encode()[1], d[1]);
    }
    if let Ok(a) = Action::decode(d) {
        assert_eq!(&a.encode()[..], d);
    }
    for reg in [0u8, 1] {
        let _ = FactoryCommand::decode(reg, d);
    }
}

fn stream_bytes(events: &[Assembled]) -> (usize, Vec<Assembled>) {
    let mut skipped = 0;
    let mut frames = Vec::new();
    for e in events {
        match e {
            Assembled::Skipped { bytes, .. } => skipped += bytes.len(),
            other => frames.push(other.clone()),
        }
    }
    (skipped, frames)
}

fn frame_bytes(e: &Assembled) -> usize {
    match e {
        Assembled::Response(r) | Assembled::BadChecksum { response: r, .. } => 7 + r.data.len(),
        Assembled::Pin(p) => 5 + p.data.len(),
        Assembled::Skipped { bytes, .. } => bytes.len(),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = decode_request(data) {
        assert_eq!(encode_request(r.op, r.reg, &r.data).unwrap(), data);
        assert_eq!(frame_length(data), FrameLength::Complete(data.len()));
    }
    if let Ok((r, bad)) = decode_response_unchecked(data) {
        assert_eq!(frame_length(data), FrameLength::Complete(data.len()));
        if bad.is_none() {
            assert_eq!(encode_response(r.reg, r.status, &r.data).unwrap(), data);
        }
        payloads(&r.data);
    }
    if let Ok(p) = PinFrame::decode(data) {
        assert_eq!(p.encode().unwrap(), data);
        assert_eq!(pin_frame_length(data), FrameLength::Complete(data.len()));
    }
    payloads(data);
    for m in [
        Malformation::BadChecksum,
        Malformation::Truncated { keep: data.first().copied().unwrap_or(0) as usize },
        Malformation::WrongLength { len: data.get(1).copied().unwrap_or(0) },
        Malformation::CorruptData { index: data.get(2).copied().unwrap_or(0) as usize, mask: 0x80 },
    ] {
        let _ = malform(data, m);
    }

    // Whole stream at once vs. chunks of a size taken from the input.
    let mut whole = JbdResponseAssembler::new();
    let all = whole.push(data);
    let accounted: usize = all.iter().map(frame_bytes).sum();
    assert_eq!(accounted + whole.pending(), data.len(), "every byte accounted for");
    assert!(whole.pending() <= 262 + 1, "pending {}", whole.pending());

    let chunk = 1 + data.first().copied().unwrap_or(0) as usize % 20;
    let mut chunked = JbdResponseAssembler::new();
    let mut parts = Vec::new();
    for c in data.chunks(chunk) {
        parts.extend(chunked.push(c));
        assert!(chunked.pending() <= 262 + chunk);
    }
    let (s1, f1) = stream_bytes(&all);
    let (s2, f2) = stream_bytes(&parts);
    assert_eq!(f1, f2, "chunking changed the frames");
    assert_eq!((s1, whole.pending()), (s2, chunked.pending()));
});
