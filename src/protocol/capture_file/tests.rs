use super::*;

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

/// A little-endian pcapng section with one interface and the given EPBs (link type 147).
fn pcapng_file(packets: &[(&[u8], u64, Option<&str>)]) -> Vec<u8> {
    let mut f = Vec::new();
    // SHB: magic, v1.0, section length -1, no options.
    let mut body = Vec::new();
    body.extend_from_slice(&le32(PCAPNG_BYTE_ORDER_MAGIC));
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&(-1i64).to_le_bytes());
    block(&mut f, PCAPNG_SHB, &body);
    // IDB: link type 147, snaplen 0, if_name "bus0", if_tsresol 9.
    let mut body = Vec::new();
    body.extend_from_slice(&147u16.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&le32(0));
    option(&mut body, 2, b"bus0");
    option(&mut body, 9, &[9]);
    option(&mut body, 0, b"");
    block(&mut f, PCAPNG_IDB, &body);
    for (data, ts, comment) in packets {
        let mut body = Vec::new();
        body.extend_from_slice(&le32(0));
        body.extend_from_slice(&le32((ts >> 32) as u32));
        body.extend_from_slice(&le32(*ts as u32));
        body.extend_from_slice(&le32(data.len() as u32));
        body.extend_from_slice(&le32(data.len() as u32));
        body.extend_from_slice(data);
        while body.len() % 4 != 0 {
            body.push(0);
        }
        if let Some(c) = comment {
            option(&mut body, 1, c.as_bytes());
        }
        option(&mut body, 2, &le32(2));
        block(&mut f, PCAPNG_EPB, &body);
    }
    f
}

fn option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

fn block(out: &mut Vec<u8>, kind: u32, body: &[u8]) {
    let total = (12 + body.len()) as u32;
    out.extend_from_slice(&le32(kind));
    out.extend_from_slice(&le32(total));
    out.extend_from_slice(body);
    out.extend_from_slice(&le32(total));
}

fn btsnoop_file(datalink: u32, records: &[(u32, i64, &[u8])]) -> Vec<u8> {
    let mut f = b"btsnoop\0".to_vec();
    f.extend_from_slice(&1u32.to_be_bytes());
    f.extend_from_slice(&datalink.to_be_bytes());
    for (flags, unix_us, data) in records {
        f.extend_from_slice(&(data.len() as u32).to_be_bytes());
        f.extend_from_slice(&(data.len() as u32).to_be_bytes());
        f.extend_from_slice(&flags.to_be_bytes());
        f.extend_from_slice(&0u32.to_be_bytes());
        f.extend_from_slice(&(unix_us + BTSNOOP_UNIX_EPOCH_US).to_be_bytes());
        f.extend_from_slice(data);
    }
    f
}

#[test]
fn pcapng_packets_come_out_with_time_comment_direction_and_interface() {
    let f = pcapng_file(&[(b"\x01\x03\x00", 1_700_000_000_123_456_789, Some("request")), (b"\x01", 5, None)]);
    let (packets, err) = decode_all(&f, 4096);
    assert_eq!(err, None);
    assert_eq!(packets.len(), 2);
    let p = &packets[0];
    assert_eq!(p.data, b"\x01\x03\x00");
    assert_eq!(p.timestamp_ns, Some(1_700_000_000_123_456_789));
    assert_eq!(p.comment.as_deref(), Some("request"));
    assert_eq!(p.direction, Some(PacketDirection::Outbound));
    assert_eq!(p.encapsulation, Encapsulation::Pcap(147));
    assert_eq!(p.record, 3, "SHB and IDB are records 1 and 2");
    assert_eq!(packets[1].timestamp_ns, Some(5));
}

#[test]
fn every_chunking_gives_the_same_packets() {
    let f = pcapng_file(&[(b"abcde", 1, Some("response")), (b"", 2, None), (b"xyz", 3, None)]);
    let whole = decode_all(&f, f.len());
    for chunk in 1..=9 {
        assert_eq!(decode_all(&f, chunk), whole, "chunk {chunk}");
    }
}

#[test]
fn a_file_cut_anywhere_keeps_the_whole_records_and_says_where_it_ends() {
    let f = pcapng_file(&[(b"abcde", 1, None), (b"fgh", 2, None)]);
    let (all, _) = decode_all(&f, 4096);
    // A cut between blocks is a shorter valid file: SHB (28) + IDB (40), then each EPB.
    let epb = |n: usize| 12 + 20 + n.div_ceil(4) * 4 + 8; // header, data, epb_flags
    let boundaries = [28, 68, 68 + epb(5), 68 + epb(5) + epb(3)];
    for cut in 0..f.len() {
        let (packets, err) = decode_all(&f[..cut], 3);
        if boundaries.contains(&cut) {
            assert_eq!(err, None, "cut at {cut} is between blocks");
            assert_eq!(packets[..], all[..packets.len()]);
            continue;
        }
        let err = err.unwrap_or_else(|| panic!("cut at {cut} must be reported"));
        assert!(
            matches!(err.what, CaptureFileProblem::TruncatedRecord { .. } | CaptureFileProblem::TruncatedHeader { .. }),
            "cut at {cut}: {err}"
        );
        assert!(err.offset <= cut as u64);
        assert_eq!(packets[..], all[..packets.len()]);
    }
}

#[test]
fn big_endian_pcapng_and_both_pcap_byte_orders_decode() {
    // A big-endian pcapng: SHB + IDB (link type 1, tsresol default µs) + EPB.
    let mut f = Vec::new();
    let be_block = |f: &mut Vec<u8>, kind: u32, body: &[u8]| {
        let total = (12 + body.len()) as u32;
        f.extend_from_slice(&kind.to_be_bytes());
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(body);
        f.extend_from_slice(&total.to_be_bytes());
    };
    let mut shb = PCAPNG_BYTE_ORDER_MAGIC.to_be_bytes().to_vec();
    shb.extend_from_slice(&[0, 1, 0, 0]);
    shb.extend_from_slice(&(-1i64).to_be_bytes());
    be_block(&mut f, PCAPNG_SHB, &shb);
    be_block(&mut f, PCAPNG_IDB, &[0, 1, 0, 0, 0, 0, 0xff, 0xff]);
    let mut epb = Vec::new();
    for v in [0u32, 0, 2_000_001, 2, 2] {
        epb.extend_from_slice(&v.to_be_bytes());
    }
    epb.extend_from_slice(&[0xaa, 0xbb, 0, 0]);
    be_block(&mut f, PCAPNG_EPB, &epb);
    let (p, err) = decode_all(&f, 5);
    assert_eq!(err, None);
    assert_eq!(p[0].data, [0xaa, 0xbb]);
    assert_eq!(p[0].timestamp_ns, Some(2_000_001_000), "microsecond units by default");
    assert_eq!(p[0].encapsulation, Encapsulation::Pcap(1));

    for (magic, ns) in [(0xA1B2_C3D4u32, false), (0xA1B2_3C4D, true)] {
        for big in [false, true] {
            let w = |v: u32| if big { v.to_be_bytes() } else { v.to_le_bytes() };
            let mut f = w(magic).to_vec();
            f.extend_from_slice(&[0; 12]);
            f.extend_from_slice(&w(65535));
            f.extend_from_slice(&w(0x1000_00C9)); // FCS bits above link type 201
            for v in [10, 20, 3, 3] {
                f.extend_from_slice(&w(v));
            }
            f.extend_from_slice(b"abc");
            let (p, err) = decode_all(&f, 7);
            assert_eq!(err, None, "magic {magic:x} big {big}");
            assert_eq!(p[0].encapsulation, Encapsulation::Pcap(201));
            assert_eq!(p[0].timestamp_ns, Some(10_000_000_000 + if ns { 20 } else { 20_000 }));
            assert_eq!(p[0].data, b"abc");
        }
    }
}

#[test]
fn btsnoop_records_carry_flags_and_unix_time() {
    let f = btsnoop_file(BTSNOOP_HCI_UART, &[(0, 1_700_000_000_000_001, b"\x02\x40\x00"), (1, 0, b"\x04")]);
    let (p, err) = decode_all(&f, 3);
    assert_eq!(err, None);
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].encapsulation, Encapsulation::Btsnoop { datalink: 1002, flags: 0 });
    assert_eq!(p[0].timestamp_ns, Some(1_700_000_000_000_001_000));
    assert_eq!(p[1].encapsulation, Encapsulation::Btsnoop { datalink: 1002, flags: 1 });
    assert_eq!(p[1].offset, 16 + 24 + 3);
}

#[test]
fn bad_files_get_located_errors() {
    let (_, err) = decode_all(b"GIF89a\x01\x02\x03", 4096);
    assert!(matches!(err.unwrap().what, CaptureFileProblem::UnknownMagic(_)));

    let (_, err) = decode_all(b"", 4096);
    assert!(matches!(err.unwrap().what, CaptureFileProblem::TruncatedHeader { have: 0, .. }));

    let mut f = btsnoop_file(1002, &[]);
    f[15] = 7;
    let err = decode_all(&f, 4096).1.unwrap();
    assert_eq!((err.offset, &err.what), (12, &CaptureFileProblem::BtsnoopDatalink(0x307)));

    // A block length that is not a multiple of 4, in the third block.
    let mut f = pcapng_file(&[(b"abcd", 1, None)]);
    let third = 28 + 40; // SHB (28) + IDB (40)
    assert_eq!(u32::from_le_bytes(f[third..third + 4].try_into().unwrap()), PCAPNG_EPB);
    f[third + 4] = 0x31;
    let err = decode_all(&f, 4096).1.unwrap();
    assert_eq!(err.record, 3);
    assert_eq!(err.offset, third as u64 + 4);
    assert!(matches!(err.what, CaptureFileProblem::BadLength(_)), "{err}");

    // A packet on an interface nobody declared.
    let mut f = pcapng_file(&[(b"abcd", 1, None)]);
    f[third + 8] = 3;
    let err = decode_all(&f, 4096).1.unwrap();
    assert_eq!(err.what, CaptureFileProblem::UnknownInterface(3));
    assert_eq!(err.to_string(), "byte 68 (record 3): packet on interface 3, which no interface description declared");

    // A huge btsnoop record length is refused before anything is buffered.
    let mut f = btsnoop_file(1002, &[(0, 0, b"x")]);
    f[16 + 4..16 + 8].copy_from_slice(&u32::MAX.to_be_bytes());
    let err = decode_all(&f, 4096).1.unwrap();
    assert!(matches!(err.what, CaptureFileProblem::BadLength(_)), "{err}");
}

#[test]
fn seeded_random_and_mutated_inputs_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xCA97);
    let seeds = [
        pcapng_file(&[(b"\x01\x03\x00\x00\x00\x01\x84\x0a", 1, Some("request"))]),
        btsnoop_file(2001, &[(0x0002_0004, 0, b"\x40\x00\x05\x00\x01\x00\x04\x00\x0a")]),
        {
            let mut f = 0xA1B2_C3D4u32.to_le_bytes().to_vec();
            f.extend_from_slice(&[0; 16]);
            f.extend_from_slice(&201u32.to_le_bytes());
            f
        },
    ];
    for i in 0..3000 {
        let mut f = seeds[i % seeds.len()].clone();
        for _ in 0..rng.gen_range(1..6) {
            match rng.gen_range(0..3) {
                0 if !f.is_empty() => {
                    let at = rng.gen_range(0..f.len());
                    f[at] = rng.gen();
                }
                1 => {
                    let at = rng.gen_range(0..=f.len());
                    f.insert(at, rng.gen());
                }
                _ => f.truncate(rng.gen_range(0..=f.len())),
            }
        }
        let chunk = rng.gen_range(1..64);
        let _ = decode_all(&f, chunk);
    }
}
