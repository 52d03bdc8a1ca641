//! The bodies of the cargo-fuzz targets (`fuzz/fuzz_targets/`), one function each, so the
//! fuzzer and the stable-toolchain corpus replay (`tests/fuzz_corpus.rs`) run the same
//! checks. Each takes arbitrary bytes and panics when an invariant it names is broken; that
//! panic is the finding. [`TARGETS`] maps each cargo-fuzz target (and its corpus folder
//! `fixtures/fuzz/<name>/`) to its function.
//!
//! Each returns true when the input got past decoding to the deeper checks (round trips,
//! framing, replies), so the replay can tell a corpus that exercises them from one that is
//! all noise. The fuzz targets ignore it.

use std::sync::OnceLock;
use std::time::Duration;

use crate::device::jbd_core::{JbdBms, JbdConfig, JbdProfile, JbdQuirk};
use crate::protocol::eg4::{Eg4Telemetry, RegisterImage, RegisterProfile};
use crate::protocol::modbus::FrameLength;
use crate::protocol::{bvlc_sc, dbus, eg4_legacy, jbd, modbus, shelly, smp};

/// A fuzz harness: arbitrary bytes in, panic on a broken invariant.
pub type Harness = fn(&[u8]) -> bool;

/// Every cargo-fuzz target by name (the name of its `fuzz/fuzz_targets/<name>.rs` and of its
/// corpus folder) with its harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("modbus_request", modbus_request_round_trips_and_serves),
    ("modbus_response", modbus_response_round_trips),
    ("modbus_stream", modbus_stream_framers_agree),
    ("eg4_legacy", eg4_legacy_frames_round_trip),
    ("eg4_decode", eg4_registers_decode_normalized_and_round_trip),
    ("bvlc_sc", bvlc_sc_round_trips_and_forwards),
    ("jbd_frame", jbd_frames_round_trip_and_assemble),
    ("jbd_device", jbd_device_replies_are_well_formed),
    ("dbus_wire", dbus_wire_parses_restamps_and_matches),
    ("smp_frame", smp_frames_round_trip),
    ("smp_server", smp_server_answers_are_well_formed),
    ("smp_serial", smp_serial_link_keeps_time_and_bounds),
    ("shelly_frame", shelly_frames_round_trip),
    ("shelly_device", shelly_device_answers_are_well_formed),
    ("capture_file", capture_file_decodes_the_same_in_any_chunking),
    ("ws_capture", ws_capture_reads_reordered_segments_as_the_stream),
    ("http_message", http_messages_read_alike_in_any_pieces),
    ("replay_core", replay_answers_only_what_was_captured),
];

// ---------------------------------------------------------------------------------------
// Modbus RTU
// ---------------------------------------------------------------------------------------

fn modbus_register_image() -> &'static RegisterImage {
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

/// Arbitrary bytes as one Modbus RTU request frame.
/// Invariants: no panic; a decoded request re-encodes to the same bytes; the stream framer
/// agrees on its length; serving it yields a frame that decodes to `serve`'s answer.
pub fn modbus_request_round_trips_and_serves(data: &[u8]) -> bool {
    let framed = modbus::request_frame_length(data);
    let Ok(frame) = modbus::decode_request(data) else {
        return false;
    };

    let encoded = modbus::encode_request(&frame).expect("a decoded request must re-encode");
    assert_eq!(encoded, data, "request round trip changed the bytes");

    match frame.pdu.function() {
        0x03 | 0x04 | 0x06 | 0x10 => assert_eq!(framed, FrameLength::Complete(data.len())),
        _ => assert_eq!(framed, FrameLength::Invalid),
    }

    let image = modbus_register_image();
    let answer = modbus::serve(&frame.pdu, image);
    let mut out = Vec::new();
    modbus::serve_into(frame.address, &frame.pdu, image, &mut out);
    let decoded = modbus::decode_response(&out).expect("serve_into must produce a valid frame");
    assert_eq!(
        decoded,
        modbus::ModbusRtuFrame {
            address: frame.address,
            pdu: answer
        }
    );
    true
}

/// Arbitrary bytes as one Modbus RTU response frame.
/// Invariants: no panic; owned and borrowed decoders agree; a decoded response re-encodes
/// to the same bytes; the stream framer reports exactly the frame's length.
pub fn modbus_response_round_trips(data: &[u8]) -> bool {
    // The fields `capture replay` shows: always a CRC last, registers numbered from the start.
    let fields = modbus::response_fields(data, data.first().map(|b| u16::from(*b) << 8), &|r| (r % 2 == 0).then_some("even"));
    if data.len() >= 2 {
        assert_eq!(fields.last().map(|f| f.0.as_str()), Some("crc"), "{fields:?}");
    }
    let owned = modbus::decode_response(data);
    let borrowed = modbus::decode_response_borrowed(data);
    match (&owned, &borrowed) {
        (Ok(o), Ok(b)) => {
            assert_eq!(o.address, b.address);
            assert_eq!(o.pdu, b.pdu.to_response());
        }
        (Err(e1), Err(e2)) => assert_eq!(e1, e2),
        _ => panic!("owned and borrowed decoders disagree: {owned:?} vs {borrowed:?}"),
    }
    let Ok(frame) = owned else { return false };
    let encoded = modbus::encode_response(&frame).expect("a decoded response must re-encode");
    assert_eq!(encoded, data, "response round trip changed the bytes");
    assert_eq!(
        modbus::response_frame_length(data),
        FrameLength::Complete(data.len())
    );
    true
}

type Framer = fn(&[u8]) -> FrameLength;

/// Splits `data` like a resynchronising reader would; returns how many frames it found.
fn split_stream(data: &[u8], framer: Framer, decode_ok: &dyn Fn(&[u8]) -> bool) -> usize {
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
fn check_framer_monotonic(data: &[u8], framer: Framer) {
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

/// Arbitrary bytes as a raw byte stream (no timing), split with the frame_length functions
/// of Modbus requests, Modbus responses and EG4 legacy replies.
/// Invariants: no panic; `Complete(n)` never exceeds the buffer and is stable as more bytes
/// arrive; decoding every prefix never panics and a successful decode of a prefix matches
/// the framer; the resynchronising splitter always makes progress.
pub fn modbus_stream_framers_agree(data: &[u8]) -> bool {
    for framer in [
        modbus::request_frame_length as Framer,
        modbus::response_frame_length as Framer,
        eg4_legacy::frame_length as Framer,
    ] {
        check_framer_monotonic(data, framer);
    }

    for k in 0..=data.len().min(300) {
        let p = &data[..k];
        if modbus::decode_request(p).is_ok() {
            let f = modbus::request_frame_length(p);
            assert!(
                f == FrameLength::Complete(k) || f == FrameLength::Invalid,
                "decoded request of {k} bytes but framer says {f:?}"
            );
        }
        if modbus::decode_response(p).is_ok() {
            assert_eq!(modbus::response_frame_length(p), FrameLength::Complete(k));
        }
        if eg4_legacy::decode_reply(p).is_ok() {
            assert_eq!(eg4_legacy::frame_length(p), FrameLength::Complete(k));
        }
    }

    let frames = split_stream(data, modbus::request_frame_length, &|f| modbus::decode_request(f).is_ok())
        + split_stream(data, modbus::response_frame_length, &|f| modbus::decode_response(f).is_ok())
        + split_stream(data, eg4_legacy::frame_length, &|f| eg4_legacy::decode_reply(f).is_ok());
    frames > 0
}

// ---------------------------------------------------------------------------------------
// EG4
// ---------------------------------------------------------------------------------------

/// Arbitrary bytes as a legacy 7E/0D frame (request, status reply, version reply).
/// Invariants: no panic; a request with a valid checksum re-encodes to the same bytes; a
/// decoded status/version reply re-encodes and decodes to the same value; framing agrees.
pub fn eg4_legacy_frames_round_trip(data: &[u8]) -> bool {
    use eg4_legacy::{
        decode_reply, decode_request, decode_status_payload, decode_status_reply, decode_version_reply,
        encode_request, encode_status_reply, encode_version_reply, frame_length, LegacyError,
    };

    let framed = frame_length(data);

    let mut request_checked = false;
    if let Ok(req) = decode_request(data) {
        if req.checksum_valid() {
            assert_eq!(encode_request(req.address, req.command), data);
            request_checked = true;
        }
    }

    let Ok(reply) = decode_reply(data) else {
        return request_checked;
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
    true
}

/// Arbitrary registers decoded through every EG4 register profile.
/// Input: 2 bytes start register (big-endian, reduced mod 256) then big-endian u16s.
/// Invariants: no panic; decoded telemetry is normalized; its image decodes back to it;
/// `decode_info` on the same block agrees with `decode` on the string fields.
pub fn eg4_registers_decode_normalized_and_round_trip(data: &[u8]) -> bool {
    let (start, rest) = match data {
        [hi, lo, rest @ ..] => (u16::from_be_bytes([*hi, *lo]) % 256, rest),
        _ => return false,
    };
    let regs: Vec<u16> = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let mut decoded_any = false;
    for profile in RegisterProfile::ALL {
        let info = profile.info_request().map(|(s, c)| {
            let mut t = Default::default();
            let r = profile.decode_info(start, &regs, &mut t);
            (r, t, s, c)
        });
        let Ok(t) = profile.decode(start, &regs) else {
            continue;
        };
        decoded_any = true;
        assert_eq!(
            profile.normalize(&t),
            t,
            "{profile}: decode output not normalized"
        );
        let img = profile.image(&t);
        let back = profile
            .read_map(&img)
            .expect("image must contain every profile block");
        assert_eq!(back, t, "{profile}: image(decode(x)) does not decode back");
        // decode_info on the same block must agree with decode's string fields.
        if let Some((Ok(()), info_t, _, _)) = info {
            assert_eq!(
                (info_t.model, info_t.firmware_str, info_t.serial),
                (t.model, t.firmware_str, t.serial)
            );
        }
    }
    decoded_any
}

// ---------------------------------------------------------------------------------------
// BACnet/SC
// ---------------------------------------------------------------------------------------

/// Arbitrary bytes as one BACnet/SC BVLC message.
/// Invariants: no panic; a decoded message re-encodes and decodes to itself; the hub's
/// forwarding rewrite succeeds exactly on frames whose header is sound, and for decodable
/// frames equals decode -> set originating / drop destination -> encode.
pub fn bvlc_sc_round_trips_and_forwards(data: &[u8]) -> bool {
    const SENDER: bvlc_sc::Vmac = bvlc_sc::Vmac([0x02, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE]);

    let decoded = bvlc_sc::decode(data);
    for keep in [false, true] {
        let mut out = vec![0x5A];
        let rewritten = bvlc_sc::rewrite_for_forwarding(data, SENDER, keep, &mut out);
        if rewritten.is_err() {
            assert_eq!(out, [0x5A], "rewrite must leave the buffer alone on error");
        }
        if let Ok(m) = &decoded {
            assert!(
                rewritten.is_ok(),
                "decodable frame rejected by rewrite: {rewritten:?}"
            );
            let mut fwd = m.clone();
            fwd.originating = Some(SENDER);
            if !keep {
                fwd.destination = None;
            }
            let mut want = vec![0x5A];
            bvlc_sc::encode_into(&fwd, &mut want).expect("forwarded message encodes");
            assert_eq!(out, want);
        }
    }
    let Ok(m) = decoded else { return false };
    let bytes = bvlc_sc::encode(&m).expect("decoded message must re-encode");
    let again = bvlc_sc::decode(&bytes).expect("re-encoded message must decode");
    assert_eq!(again, m);
    true
}

// ---------------------------------------------------------------------------------------
// JBD
// ---------------------------------------------------------------------------------------

/// The typed JBD payload decoders on `d`: whatever decodes re-encodes to the same bytes.
fn check_jbd_payloads(d: &[u8]) {
    use jbd::{decode_string, encode_string, Action, BasicInfo, CellVoltages, ErrorCounters, FactoryCommand};
    use jbd::{HardwareVersion, MosControl};

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

/// Bytes the assembler skipped, and the frames it found, from its events.
fn skipped_and_frames(events: &[jbd::Assembled]) -> (usize, Vec<jbd::Assembled>) {
    let mut skipped = 0;
    let mut frames = Vec::new();
    for e in events {
        match e {
            jbd::Assembled::Skipped { bytes, .. } => skipped += bytes.len(),
            other => frames.push(other.clone()),
        }
    }
    (skipped, frames)
}

/// Input bytes one assembler event stands for.
fn assembled_len(e: &jbd::Assembled) -> usize {
    match e {
        jbd::Assembled::Response(r) | jbd::Assembled::BadChecksum { response: r, .. } => 7 + r.data.len(),
        jbd::Assembled::Pin(p) => 5 + p.data.len(),
        jbd::Assembled::Skipped { bytes, .. } => bytes.len(),
    }
}

/// Arbitrary bytes as a JBD frame (request, response, PIN frame, typed payloads) and as a
/// notification stream for the client-side assembler.
/// Invariants: no panic; whatever decodes re-encodes to the same bytes; the assembler
/// accounts for every byte (frames + skipped + pending = input) and finds the same frames
/// however the stream is chunked.
pub fn jbd_frames_round_trip_and_assemble(data: &[u8]) -> bool {
    use jbd::{
        decode_request, decode_response_unchecked, encode_request, encode_response, frame_length, malform,
        pin_frame_length, FrameLength, JbdResponseAssembler, Malformation, PinFrame,
    };

    let mut decoded = false;
    if let Ok(r) = decode_request(data) {
        assert_eq!(encode_request(r.op, r.reg, &r.data).unwrap(), data);
        assert_eq!(frame_length(data), FrameLength::Complete(data.len()));
        decoded = true;
    }
    let fields = jbd::response_fields(data);
    if let Ok((r, bad)) = decode_response_unchecked(data) {
        assert_eq!(fields.first().map(|f| f.0.as_str()), Some("register"));
        assert_eq!(fields.last().map(|f| f.0.as_str()), Some("checksum"));
        assert_eq!(frame_length(data), FrameLength::Complete(data.len()));
        if bad.is_none() {
            assert_eq!(encode_response(r.reg, r.status, &r.data).unwrap(), data);
        }
        check_jbd_payloads(&r.data);
        decoded = true;
    }
    if let Ok(p) = PinFrame::decode(data) {
        assert_eq!(p.encode().unwrap(), data);
        assert_eq!(pin_frame_length(data), FrameLength::Complete(data.len()));
        decoded = true;
    }
    check_jbd_payloads(data);
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
    let accounted: usize = all.iter().map(assembled_len).sum();
    assert_eq!(accounted + whole.pending(), data.len(), "every byte accounted for");
    assert!(whole.pending() <= 262 + 1, "pending {}", whole.pending());

    let chunk = 1 + data.first().copied().unwrap_or(0) as usize % 20;
    let mut chunked = JbdResponseAssembler::new();
    let mut parts = Vec::new();
    for c in data.chunks(chunk) {
        parts.extend(chunked.push(c));
        assert!(chunked.pending() <= 262 + chunk);
    }
    let (s1, f1) = skipped_and_frames(&all);
    let (s2, f2) = skipped_and_frames(&parts);
    assert_eq!(f1, f2, "chunking changed the frames");
    assert_eq!((s1, whole.pending()), (s2, chunked.pending()));
    decoded || !f1.is_empty()
}

/// Arbitrary writes to a simulated JBD BMS. Byte 0 picks the profile and quirks; the rest
/// is a sequence of `len, bytes…` writes, 50 ms apart (len 0xFF = disconnect and reconnect).
/// Invariants: no panic; the receive buffer stays bounded; without the frame-breaking
/// quirks every reply is a well-formed response (or PIN reply) with a good checksum.
pub fn jbd_device_replies_are_well_formed(data: &[u8]) -> bool {
    let Some((&sel, mut rest)) = data.split_first() else { return false };
    let profile = [JbdProfile::Standard, JbdProfile::RejectsWriteRequest, JbdProfile::Chins, JbdProfile::Pin]
        [usize::from(sel & 3)];
    let breaking = sel & 0x80 != 0;
    let mut quirks = [JbdQuirk::SilentAfterFirstAnswer, JbdQuirk::FactoryEnterNoReply]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| sel & (4 << i) != 0)
        .map(|(_, q)| q)
        .collect::<Vec<_>>();
    if sel & 0x10 != 0 {
        quirks.push(JbdQuirk::BalanceBitsMsbFirst);
    }
    if breaking {
        quirks.extend([JbdQuirk::ForeignFrames, JbdQuirk::TruncatedCellVoltages, JbdQuirk::CorruptedData]);
    }
    let mut cfg = JbdConfig { profile, quirks, ..Default::default() };
    cfg.pack.cells = 4 + usize::from(sel >> 5) * 2; // 4..=18
    let mut bms = JbdBms::new(cfg).expect("valid config");
    bms.connected(Duration::ZERO);
    let mut now = Duration::ZERO;
    let mut replied = false;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (write, next) = tail.split_at(n);
        rest = next;
        now += Duration::from_millis(50);
        if len == 0xFF {
            bms.disconnected(now);
            bms.connected(now);
            continue;
        }
        for frame in bms.handle_write(write, now) {
            replied = true;
            if !breaking {
                assert!(
                    jbd::decode_response(&frame).is_ok() || jbd::PinFrame::decode(&frame).is_ok(),
                    "malformed reply {frame:02X?}"
                );
            }
        }
        assert!(bms.pending_input() <= jbd::MAX_FRAME + n, "pending {}", bms.pending_input());
        let _ = bms.take_events();
    }
    replied
}

// ---------------------------------------------------------------------------------------
// D-Bus (the air's message bus)
// ---------------------------------------------------------------------------------------

/// Arbitrary bytes as what a bus client sends: a D-Bus message, a match rule's text, SASL
/// lines. Invariants: no panic; a message whose header parses takes a new sender and parses
/// again with the same fields and the same body; a parsed match rule can be tested against
/// it.
pub fn dbus_wire_parses_restamps_and_matches(data: &[u8]) -> bool {
    let mut sasl = dbus::SaslServer::default();
    let _ = sasl.feed(data, "00000000000000000000000000000000");
    let rule = dbus::MatchRule::parse(&String::from_utf8_lossy(data));
    let Ok(Some(total)) = dbus::frame_len(data) else { return false };
    let Some(msg) = data.get(..total) else { return false };
    let Ok(h) = dbus::parse_header(msg) else { return false };
    let args = dbus::leading_string_args(msg, &h);
    let _ = dbus::bus_call_args(msg, &h);
    if let Ok(r) = &rule {
        let _ = r.matches(&h, &args, |s| Some(s) == h.sender.as_deref());
    }
    let stamped = dbus::with_sender(msg, &h, ":1.7").expect("a parsed message takes a sender");
    let again = dbus::parse_header(&stamped).expect("a stamped message parses");
    assert_eq!(again.sender.as_deref(), Some(":1.7"));
    assert_eq!(
        (&again.path, &again.interface, &again.member, &again.destination, &again.signature, again.serial, again.kind),
        (&h.path, &h.interface, &h.member, &h.destination, &h.signature, h.serial, h.kind),
        "stamping the sender changed another field"
    );
    assert_eq!(stamped.get(again.body_offset..), msg.get(h.body_offset..), "stamping the sender changed the body");
    true
}

// ---------------------------------------------------------------------------------------
// MCUmgr SMP
// ---------------------------------------------------------------------------------------

/// Arbitrary bytes as an SMP message (UDP datagram, reassembled BLE writes, raw serial), as
/// serial console lines and as an MCUboot image in a slot. Invariants: no panic; a parsed header encodes back to the same
/// eight bytes; a whole frame encodes back to the same bytes; a payload that decodes to a
/// map re-encodes to CBOR that decodes to a map again; the bytes as console lines (ours and
/// Zephyr's layout) are never over the line length and decode back to themselves; a receiver fed the bytes as lines
/// never holds more than the packet length allows.
pub fn smp_frames_round_trip(data: &[u8]) -> bool {
    let fields = smp::message_fields(data);
    assert!(fields.len() <= 7 + 1024 + 1, "message fields are bounded");
    if smp::SmpFrame::parse(data).is_ok() {
        assert_eq!(fields[0].0, "version");
    }
    if let Ok(img) = crate::protocol::mcuboot::McubootImage::parse(data) {
        assert!(img.total_len <= data.len(), "an image longer than its bytes");
    }
    let mut rx = smp::serial::Receiver::new();
    for line in data.split_inclusive(|b| *b == b'\n') {
        let _ = rx.push_line(line);
    }
    if data.len() + 2 <= usize::from(u16::MAX) {
        // 7 ..= 127: the receiver drops longer lines, as firmware does.
        let max_line = 7 + usize::from(data.first().copied().unwrap_or(0)) % (smp::serial::MAX_LINE - 6);
        let lines = smp::serial::encode(data, max_line);
        let mut rx = smp::serial::Receiver::new();
        let mut got = None;
        for line in lines.split_inclusive(|b| *b == b'\n') {
            assert!(line.len() <= max_line, "a {}-byte line with a {max_line}-byte limit", line.len());
            if let smp::serial::LineOutcome::Message(m) = rx.push_line(line) {
                got = Some(m);
            }
        }
        assert_eq!(got.as_deref(), Some(data), "serial lines did not decode to what was encoded");
        if !data.is_empty() {
            let mut rx = smp::serial::Receiver::new();
            let mut got = None;
            for line in smp::serial::encode_as_zephyr(data).split_inclusive(|b| *b == b'\n') {
                assert!(line.len() <= smp::serial::MAX_LINE, "a {}-byte line in Zephyr's layout", line.len());
                if let smp::serial::LineOutcome::Message(m) = rx.push_line(line) {
                    got = Some(m);
                }
            }
            assert_eq!(got.as_deref(), Some(data), "Zephyr's serial lines did not decode to what was encoded");
        }
    }
    ble_reassembly_holds(data);
    let Some(header) = smp::SmpHeader::parse(data) else { return false };
    assert_eq!(&header.encode()[..], &data[..smp::HEADER_LEN], "a header did not encode back to its bytes");
    let Ok(frame) = smp::SmpFrame::parse(data) else { return false };
    assert_eq!(frame.encode(), data, "a frame did not encode back to its bytes");
    let Ok(m) = smp::decode_map(&frame.payload) else { return false };
    let again = smp::encode_value(&ciborium::Value::Map(m));
    assert!(smp::decode_map(&again).is_ok(), "a decoded map did not survive re-encoding");
    true
}

/// The bytes as BLE writes of 1..=64 bytes (the first byte picks the size) into a
/// reassembly with a net buffer of 64..=575 bytes: it never holds more than the buffer,
/// and every message it gives is one whole SMP message by its header's length.
fn ble_reassembly_holds(data: &[u8]) {
    let size = 1 + usize::from(data.first().copied().unwrap_or(0)) % 64;
    let net_buf = 64 + usize::from(data.get(1).copied().unwrap_or(0)) * 2;
    let mut r = smp::ble::Reassembly::new(net_buf);
    for piece in data.chunks(size) {
        if let Ok(Some(m)) = r.push(piece) {
            assert!(m.len() <= net_buf, "a {}-byte message through a {net_buf}-byte buffer", m.len());
            assert_eq!(smp::frame_len(&m), Some(m.len()), "a message that is not whole by its header");
        }
    }
}

/// Arbitrary bytes as datagrams to a simulated SMP server/// Arbitrary bytes as datagrams to a simulated SMP server, through the path its host uses
/// (`handle_input`, timeouts when it asks): split at every 0xC0 byte, 20 ms apart, each
/// datagram holding any number of messages; its flash is slow (10 ms a 1 KiB page), so an
/// erase keeps it busy while later datagrams wait in its net buffers, and resets and reboots
/// happen; an odd first byte makes it MCUboot's serial recovery. Invariants: no panic and no hang (the server's wake-ups move on); every answer is
/// one whole SMP message whose payload is a CBOR map, a response op of a request's group, seq
/// and command, in its version (a reserved one: v2); no slot holds more than its size, the
/// filesystem no more than its capacity.
pub fn smp_server_answers_are_well_formed(data: &[u8]) -> bool {
    use crate::device::smp_core::{FlashTiming, SmpServer, SmpServerConfig};
    use crate::sans_io::{Input, Output, Peer, SansIoCore};
    let config = SmpServerConfig {
        slot_size: 4096,
        fs_capacity: 4096,
        files: vec![("/lfs1/etc/motd".into(), b"hello".to_vec())],
        settings: Some([("app/mode".to_string(), b"eco".to_vec())].into()),
        shell: vec![("bms status".into(), "ok".into())],
        flash: FlashTiming { page_size: 1024, page_erase: Duration::from_millis(10), write_bytes_per_s: Some(1_000_000), progressive_erase: false },
        // An odd first byte: the bootloader's serial recovery answers instead.
        profiles: if data.first().is_some_and(|b| b & 1 == 1) { vec![crate::device::smp_core::SmpProfile::SerialRecovery] } else { Vec::new() },
        ..Default::default()
    };
    let mut server = SmpServer::new(config).expect("the default image fits 4 KiB");
    let mut requests: Vec<smp::SmpHeader> = Vec::new();
    let mut answered = false;
    let mut out = Vec::new();
    let mut check = |out: &mut Vec<Output<_>>, requests: &[smp::SmpHeader]| {
        for o in out.drain(..) {
            let Output::Send { bytes: answer, .. } = o else { continue };
            let frame = smp::SmpFrame::parse(&answer).expect("an answer is one whole message");
            let h = frame.header;
            assert!(h.op == 1 || h.op == 3, "answer op {}", h.op);
            assert!(
                requests.iter().any(|r| r.group == h.group && r.seq == h.seq && r.command == h.command && (r.version == h.version || (r.version > 1 && h.version == 1)) && r.op + 1 == h.op),
                "an answer to no request: {h:?}"
            );
            smp::decode_map(&frame.payload).expect("an answer's payload is a map");
            answered = true;
        }
    };
    // Wake-ups due by `until`, each at its time; a server that keeps asking for the same past
    // time would hang its host.
    let wake_until = |server: &mut SmpServer, out: &mut Vec<Output<_>>, until: Duration| {
        for _ in 0..10_000 {
            match server.next_wakeup() {
                Some(t) if t <= until => server.handle_input(Input::Timeout, t, out).expect("a timeout is taken"),
                _ => return,
            }
        }
        panic!("the server's wake-ups do not move on");
    };
    for (i, datagram) in data.split(|b| *b == 0xc0).enumerate() {
        let now = Duration::from_millis(20 * i as u64);
        wake_until(&mut server, &mut out, now);
        let mut rest = datagram;
        while let Some(h) = smp::SmpHeader::parse(rest) {
            requests.push(h);
            rest = rest.get(smp::HEADER_LEN + usize::from(h.len)..).unwrap_or(&[]);
        }
        let _ = server.handle_input(Input::Bytes { from: Peer(0), bytes: datagram }, now, &mut out);
        check(&mut out, &requests);
        for slot in 0..2 {
            assert!(server.firmware().contents(slot).len() <= 4096, "slot {slot} holds more than its size");
        }
        assert!(server.filesystem().files().map(|(_, c)| c.len()).sum::<usize>() <= 4096, "the filesystem holds more than its capacity");
    }
    wake_until(&mut server, &mut out, Duration::from_secs(3600));
    check(&mut out, &requests);
    answered
}

/// Arbitrary bytes into the SMP server's serial port and its answers back out. The first
/// byte picks the framing (bit 0: raw), flow control (bit 1), a work-queue time per line
/// (bits 2-4, 0..35 ms), wire time (bit 5, 115200 baud) and MCUboot's answer lines (bit 6); the rest is cut at every 0xC0
/// byte into writes 7 ms apart. Invariants: no panic; arrivals come in time order, never
/// before their bytes were written; a message fits the net buffer (raw: exactly its
/// header's length); every message's answer goes out and the link ends with nothing left.
pub fn smp_serial_link_keeps_time_and_bounds(data: &[u8]) -> bool {
    use crate::device::smp_core::{SmpServer, SmpServerConfig};
    use crate::device::smp_serial::{SerialArrival, SerialFraming, SerialLink, SerialLinkConfig};
    let Some((&mode, rest)) = data.split_first() else { return false };
    let cfg = SerialLinkConfig {
        framing: if mode & 1 == 1 { SerialFraming::Raw } else { SerialFraming::Console },
        pause_when_full: mode & 2 == 2,
        line_work: Duration::from_millis(5 * u64::from((mode >> 2) & 7)),
        baud: (mode & 0x20 != 0).then_some(115_200),
        net_buf: 384,
        mcuboot_lines: mode & 0x40 != 0,
        ..Default::default()
    };
    let raw = cfg.framing == SerialFraming::Raw;
    let mut link = SerialLink::new(cfg);
    let mut server = SmpServer::new(SmpServerConfig { slot_size: 4096, ..Default::default() }).expect("the default image fits 4 KiB");
    let mut last = Duration::ZERO;
    let mut messages = 0;
    let mut step = |link: &mut SerialLink, server: &mut SmpServer, now: Duration, last: &mut Duration| {
        while let Some(at) = link.next_due().filter(|at| *at <= now) {
            assert!(at >= *last, "an arrival at {at:?} after one at {last:?}");
            *last = at;
            for a in link.take_arrivals(at) {
                if let SerialArrival::Message(m) = a {
                    assert!(m.len() <= 384, "a {}-byte message through a 384-byte net buffer", m.len());
                    if raw {
                        assert_eq!(smp::frame_len(&m), Some(m.len()), "a raw message is not its header's length");
                    }
                    messages += 1;
                    for answer in server.handle_bytes(&m, at) {
                        link.send_message(&answer, at);
                    }
                }
            }
            let _ = link.take_writes(at);
        }
    };
    for (i, write) in rest.split(|b| *b == 0xc0).enumerate() {
        let now = Duration::from_millis(7 * i as u64);
        step(&mut link, &mut server, now, &mut last);
        link.receive(write, now);
    }
    step(&mut link, &mut server, Duration::from_secs(3600), &mut last);
    assert_eq!(link.next_due(), None, "something left on the link after an hour");
    let _ = server.take_events();
    messages > 0
}

// ---------------------------------------------------------------------------------------
// Shelly RPC
// ---------------------------------------------------------------------------------------

/// Arbitrary bytes as a Shelly RPC frame, as an HTTP `Authorization` header and as an RPC
/// `auth` object. Invariants: no panic; a decoded call or response encodes back to a frame
/// that decodes to the same call or response; a decoded object's status delta against `{}`
/// merges back into the object; a digest answer never authenticates against a device whose
/// password the input cannot know.
pub fn shelly_frames_round_trip(data: &[u8]) -> bool {
    use shelly::digest::{AuthMode, DigestAnswer, DigestAuth};
    shelly_ble_channel_holds(data);
    let text = String::from_utf8_lossy(data);
    let mut auth = DigestAuth::new(AuthMode::V2, "dev", "a password no input has", 0, 1);
    if let Some(a) = DigestAnswer::from_http(&text, "GET") {
        assert!(auth.check(Some(&a), Duration::ZERO).is_err(), "a guessed HTTP digest authenticated");
    }
    let Ok(frame) = shelly::decode_frame(data) else { return false };
    let again = match &frame {
        shelly::RpcFrame::Call(c) => {
            if let Some(a) = c.auth.as_ref().and_then(DigestAnswer::from_rpc) {
                assert!(auth.check(Some(&a), Duration::ZERO).is_err(), "a guessed RPC digest authenticated");
            }
            match &c.id {
                Some(id) => shelly::encode_request(id, c.src.as_deref(), &c.method, &c.params, c.auth.as_ref()),
                None => shelly::encode_notification(c.src.as_deref().unwrap_or(""), c.dst.as_deref(), &c.method, &c.params),
            }
        }
        shelly::RpcFrame::Response(r) => shelly::encode_response(r.id.as_ref(), r.src.as_deref().unwrap_or(""), r.dst.as_deref(), &r.outcome),
    };
    let decoded = shelly::decode_frame(&again).expect("an encoded frame did not decode");
    match (&frame, &decoded) {
        (shelly::RpcFrame::Call(a), shelly::RpcFrame::Call(b)) => {
            // A notification carries no auth.
            let auth = |c: &shelly::RpcCall| c.id.as_ref().and(c.auth.clone());
            assert_eq!((&a.id, &a.method, &a.params, auth(a)), (&b.id, &b.method, &b.params, auth(b)), "a call changed in a round trip");
        }
        (shelly::RpcFrame::Response(a), shelly::RpcFrame::Response(b)) => {
            assert_eq!((&a.id, &a.outcome), (&b.id, &b.outcome), "a response changed in a round trip");
        }
        _ => panic!("a frame changed kind in a round trip"),
    }
    if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_slice::<serde_json::Value>(data) {
        let mut merged = serde_json::json!({});
        if let Some(delta) = shelly::status_delta(&merged, &v) {
            shelly::merge_status(&mut merged, &delta);
        }
        // A null in the input is a removal in a delta, so compare without them.
        assert_eq!(merged, without_nulls(&v), "a status delta did not merge back");
    }
    true
}

/// The bytes as one BLE RPC request written in chunks of 1..=64 bytes (the first byte
/// picks the size), then answered and read back at an MTU of 23..=278: the request
/// arrives whole exactly when it fits the limits, and the reads give the answer back.
fn shelly_ble_channel_holds(data: &[u8]) {
    use shelly::ble::{BleRpcChannel, MAX_FRAME};
    let Some((&first, body)) = data.split_first() else { return };
    let mut ch = BleRpcChannel::new();
    let fits = !body.is_empty() && body.len() <= MAX_FRAME as usize;
    assert_eq!(ch.tx_ctl_write(&(body.len() as u32).to_be_bytes()).is_ok(), fits, "a length of {} taken or refused wrongly", body.len());
    if !fits {
        return;
    }
    let mut got = None;
    for c in body.chunks(1 + usize::from(first) % 64) {
        got = ch.data_write(c).expect("a write within the announced length was refused");
    }
    assert_eq!(got.as_deref(), Some(body), "the request did not arrive whole");
    assert!(ch.data_write(b"x").is_err(), "data past a finished request was taken");
    ch.respond(body.to_vec());
    assert_eq!(ch.rx_ctl_read(), (body.len() as u32).to_be_bytes());
    let mtu = 23 + u16::from(first);
    let mut back = Vec::new();
    loop {
        let c = ch.data_read(mtu);
        assert!(c.len() <= usize::from(mtu) - 2, "a read longer than MTU - 2");
        if c.is_empty() {
            break;
        }
        back.extend(c);
    }
    assert_eq!(back, body, "the reads did not give the answer back");
}

fn without_nulls(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            serde_json::Value::Object(m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), without_nulls(v))).collect())
        }
        other => other.clone(),
    }
}

/// Arbitrary bytes as newline-separated frames from two WebSocket peers to a simulated
/// Shelly device (the first byte picks the model, whether auth is on and the time step).
/// Invariants: no panic; every output is a frame that decodes; each frame that decodes to a
/// call with an id gets exactly one response carrying that id (or none while the device is
/// rebooting); every notification has a method and no id.
pub fn shelly_device_answers_are_well_formed(data: &[u8]) -> bool {
    use crate::device::shelly_core::{ShellyConfig, ShellyDevice, MODELS};
    use crate::sans_io::{Input, Output, Peer, SansIoCore};
    let Some((&first, rest)) = data.split_first() else { return false };
    let model = MODELS[usize::from(first) % MODELS.len()].name;
    let password = (first & 0x10 != 0).then(|| "pw".to_string());
    let mut dev = ShellyDevice::new(ShellyConfig { model: model.into(), password, ..ShellyConfig::default() }).expect("a known model");
    let step = Duration::from_millis(u64::from(first >> 5) * 700);
    let mut now = Duration::ZERO;
    let mut out = Vec::new();
    for p in [Peer(1), Peer(2)] {
        let _ = dev.handle_input(Input::Connected(p), now, &mut out);
    }
    let mut reached = false;
    for (i, line) in rest.split(|b| *b == b'\n').enumerate() {
        now += step;
        let from = Peer(1 + (i as u64 % 2));
        out.clear();
        let _ = dev.handle_input(Input::Bytes { from, bytes: line }, now, &mut out);
        let asked = match shelly::decode_frame(line) {
            Ok(shelly::RpcFrame::Call(c)) => c.id,
            _ => None,
        };
        let mut answers = 0;
        for o in &out {
            let Output::Send { to, bytes } = o else { continue };
            match shelly::decode_frame(bytes).expect("the device sent bytes that are not a frame") {
                shelly::RpcFrame::Response(r) => {
                    assert_eq!(*to, from, "a response went to another peer");
                    assert_eq!(r.id, asked, "a response with another id");
                    answers += 1;
                    reached = true;
                }
                shelly::RpcFrame::Call(n) => assert!(n.id.is_none(), "a notification with an id"),
            }
        }
        assert!(answers <= 1, "{answers} answers to one frame");
        // Only a device that is down for its reboot leaves a call unanswered (slow_ms,
        // which delays answers, is a scenario key the input cannot set).
        assert!(asked.is_none() || answers == 1 || dev.is_down(), "a call went unanswered");
        if let Some(w) = dev.next_wakeup().filter(|w| *w <= now) {
            out.clear();
            let _ = dev.handle_input(Input::Timeout, w, &mut out);
        }
    }
    reached
}

// ---------------------------------------------------------------------------------------
// Capture files (capture import)
// ---------------------------------------------------------------------------------------

/// Arbitrary bytes as a capture file (pcapng, pcap or btsnoop; the magic decides), every
/// Bluetooth packet in it through the ACL → L2CAP → ATT extractor and every IP packet down
/// to UDP.
/// Invariants: no panic; fed one byte at a time or all at once, the decoder yields the same
/// packets and the same final error; every error's offset lies inside the input; every
/// packet's bytes fit its record and lie inside the input; ATT PDUs are never empty.
pub fn capture_file_decodes_the_same_in_any_chunking(data: &[u8]) -> bool {
    use crate::protocol::capture_file::decode_all;
    use crate::protocol::hci::{AttExtractor, HciOutput, HciPacket};

    let whole = decode_all(data, data.len().max(1));
    let bytewise = decode_all(data, 1);
    assert_eq!(whole, bytewise, "chunking changed what the decoder read");
    let (packets, err) = whole;
    if let Some(e) = &err {
        assert!(e.offset <= data.len() as u64, "error offset {} past the input's {} bytes", e.offset, data.len());
    }
    let mut att = AttExtractor::new();
    let mut out = Vec::new();
    for p in &packets {
        assert!(p.offset + p.data.len() as u64 <= data.len() as u64, "a packet's bytes run past the input");
        if let Some(hp) = HciPacket::from_capture(p.encapsulation, &p.data) {
            att.push(&hp, &mut out);
        }
        if let crate::protocol::capture_file::Encapsulation::Pcap(lt) = p.encapsulation {
            if let Ok(d) = crate::protocol::ip::udp_datagram(lt, &p.data) {
                assert!(d.payload.len() + 8 <= p.data.len(), "a UDP payload longer than its packet");
            }
        }
    }
    for o in &out {
        if let HciOutput::Att(a) = o {
            assert!(!a.pdu.is_empty(), "an empty ATT PDU");
        }
    }
    !packets.is_empty()
}

/// Arbitrary bytes as one direction of an HTTP/1.1 connection: the first byte sets the
/// piece size (1..=64), the rest is the stream. Invariants: no panic; read in pieces or in
/// one go it gives the same messages; each message is in the normal form (read again
/// alone it is that one message) and parses as a request or a response.
pub fn http_messages_read_alike_in_any_pieces(data: &[u8]) -> bool {
    use crate::protocol::http_message::{request_parts, response_parts, HttpOutput, HttpReader};
    let Some((&k, stream)) = data.split_first() else { return false };
    let read = |piece: usize, stream: &[u8]| {
        let (mut r, mut buf, mut out) = (HttpReader::default(), Vec::new(), Vec::new());
        for p in stream.chunks(piece.max(1)) {
            buf.extend_from_slice(p);
            let used = r.read(&buf, &mut out);
            buf.drain(..used);
            if matches!(out.last(), Some(HttpOutput::Upgraded | HttpOutput::NotHttp { .. })) {
                break;
            }
        }
        out
    };
    let whole = read(stream.len(), stream);
    assert_eq!(read(usize::from(k % 64) + 1, stream), whole, "pieces read differently");
    for o in &whole {
        if let HttpOutput::Message(m) = o {
            assert!(request_parts(m).is_some() || response_parts(m).is_some(), "a message that does not parse: {:?}", String::from_utf8_lossy(m));
            assert_eq!(read(m.len(), m), vec![HttpOutput::Message(m.clone())], "not in the normal form: {:?}", String::from_utf8_lossy(m));
        }
    }
    whole.iter().any(|o| matches!(o, HttpOutput::Message(_)))
}

/// Arbitrary bytes as one direction of a captured TCP connection carrying WebSocket: the
/// first byte sets the segment size (1..=64), the rest follows a `101` head as the stream.
/// Invariants: no panic; the segments pushed in order, with every pair swapped, or each
/// one twice (a retransmission) all read as the same messages and gaps; no message is past
/// the limit.
pub fn ws_capture_reads_reordered_segments_as_the_stream(data: &[u8]) -> bool {
    use crate::protocol::tcp_stream::{TcpDirection, TcpOutput};
    use crate::protocol::ws_capture::{WsDirection, WsOutput};
    let Some((&k, body)) = data.split_first() else { return false };
    let size = usize::from(k % 64) + 1;
    let mut stream = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
    stream.extend_from_slice(body);
    let isn = (u32::MAX - 40).wrapping_add(u32::from(k)); // across the sequence wrap for some inputs
    let segments: Vec<(u32, &[u8])> = stream.chunks(size).enumerate().map(|(i, c)| (isn.wrapping_add(1).wrapping_add((i * size) as u32), c)).collect();
    let read = |order: &[(u32, &[u8])]| {
        let (mut tcp, mut ws, mut out, mut bytes) = (TcpDirection::default(), WsDirection::default(), Vec::new(), Vec::new());
        tcp.push(isn, true, &[], &mut bytes);
        for (seq, p) in order {
            tcp.push(*seq, false, p, &mut bytes);
        }
        tcp.finish(&mut bytes);
        for b in bytes {
            match b {
                TcpOutput::Bytes(b) => ws.push(&b, &mut out),
                TcpOutput::Missing(n) => ws.missing(n, &mut out),
            }
        }
        out
    };
    let in_order = read(&segments);
    let mut swapped = segments.clone();
    swapped.chunks_mut(2).for_each(|p| p.reverse());
    assert_eq!(read(&swapped), in_order, "reordered segments read differently");
    let twice: Vec<(u32, &[u8])> = segments.iter().flat_map(|s| [*s, *s]).collect();
    assert_eq!(read(&twice), in_order, "retransmitted segments read differently");
    for o in &in_order {
        if let WsOutput::Message { payload, .. } = o {
            assert!(payload.len() <= 4 << 20, "a message past the limit");
        }
    }
    in_order.iter().any(|o| matches!(o, WsOutput::Message { .. }))
}

// ---------------------------------------------------------------------------------------
// Replay (the `replay` device kind)
// ---------------------------------------------------------------------------------------

/// Arbitrary bytes as a capture and the requests put to its replay: frames are separated by
/// 0xFF, each one's first byte's low bit says request (0) or response (1), the rest is the
/// frame; the first half of the frames is the capture, every frame of the second half a
/// request. Invariants: no panic; every answer is one of the captured responses; an
/// answered request matched a captured request of the same bytes; nothing is sent for a
/// request no captured one equals.
pub fn replay_answers_only_what_was_captured(data: &[u8]) -> bool {
    use crate::device::replay_core::{ReplayCore, ReplayEvent};
    use crate::link::record::Direction;
    use crate::sans_io::{Input, Output, Peer, SansIoCore};

    let frames: Vec<(Direction, Vec<u8>)> = data
        .split(|b| *b == 0xFF)
        .filter_map(|f| f.split_first())
        .map(|(tag, rest)| (if tag & 1 == 0 { Direction::Request } else { Direction::Response }, rest.to_vec()))
        .collect();
    let (captured, asked) = frames.split_at(frames.len() / 2);
    let mut core = ReplayCore::new(captured.to_vec());
    let mut reached = false;
    for (_, req) in asked {
        let mut out = Vec::new();
        core.handle_input(Input::Bytes { from: Peer::ONLY, bytes: req }, Duration::ZERO, &mut out).expect("bytes are never refused");
        let mut sent = 0;
        for o in &out {
            match o {
                Output::Send { bytes, .. } => {
                    assert!(captured.iter().any(|(d, b)| *d == Direction::Response && b == bytes), "sent bytes nobody captured");
                    sent += 1;
                }
                Output::Event(ReplayEvent::Answered { index, answers }) => {
                    assert_eq!(captured[*index], (Direction::Request, req.clone()), "matched another request");
                    assert_eq!(*answers, sent);
                    reached = true;
                }
                Output::Event(ReplayEvent::Unmatched { .. }) => assert_eq!(sent, 0, "answered an unmatched request"),
                Output::Close(_) => panic!("a replay closed its peer"),
            }
        }
    }
    // The same capture with its timing kept (times from the bytes, not in order): every
    // answer still comes, when its time does, and only once.
    let times: Vec<u64> = captured.iter().map(|(_, b)| u64::from(b.first().copied().unwrap_or(0)) * 1_000_000).collect();
    let mut timed = ReplayCore::new(captured.to_vec()).keep_timing(times);
    let (mut promised, mut delivered) = (0usize, 0usize);
    for (k, (_, req)) in asked.iter().enumerate() {
        let now = Duration::from_millis(k as u64 * 50);
        let mut out = Vec::new();
        timed.handle_input(Input::Timeout, now, &mut out).expect("a timeout is never refused");
        timed.handle_input(Input::Bytes { from: Peer::ONLY, bytes: req }, now, &mut out).expect("bytes are never refused");
        for o in &out {
            match o {
                Output::Send { bytes, .. } => {
                    assert!(captured.iter().any(|(d, b)| *d == Direction::Response && b == bytes), "sent bytes nobody captured");
                    delivered += 1;
                }
                Output::Event(ReplayEvent::Answered { answers, .. }) => promised += answers,
                _ => {}
            }
        }
        if let Some(w) = timed.next_wakeup() {
            assert!(w >= now, "a wake-up in the past");
        }
    }
    let mut out = Vec::new();
    timed.handle_input(Input::Timeout, Duration::from_secs(1_000), &mut out).expect("a timeout is never refused");
    delivered += out.iter().filter(|o| matches!(o, Output::Send { .. })).count();
    assert_eq!(delivered, promised, "every answer comes once its time does");
    assert_eq!(timed.next_wakeup(), None);
    reached
}
