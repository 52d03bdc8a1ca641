use super::*;

/// An H4-with-pseudo-header ACL packet carrying `l2cap` bytes in one fragment.
fn acl(dir_rx: bool, handle: u16, boundary: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = u32::from(dir_rx).to_be_bytes().to_vec();
    v.push(2);
    v.extend_from_slice(&(handle | (boundary << 12)).to_le_bytes());
    v.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

fn l2cap_att(att: &[u8]) -> Vec<u8> {
    let mut v = (att.len() as u16).to_le_bytes().to_vec();
    v.extend_from_slice(&4u16.to_le_bytes());
    v.extend_from_slice(att);
    v
}

fn run(packets: &[Vec<u8>]) -> (AttExtractor, Vec<HciOutput>) {
    let mut x = AttExtractor::new();
    let mut out = Vec::new();
    for p in packets {
        let hp = HciPacket::from_capture(Encapsulation::Pcap(LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR), p).unwrap();
        x.push(&hp, &mut out);
    }
    (x, out)
}

fn att_of(out: &[HciOutput]) -> Vec<(bool, Vec<u8>)> {
    out.iter()
        .filter_map(|o| match o {
            HciOutput::Att(a) => Some((a.from_client, a.pdu.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn fragments_reassemble_into_att_and_the_peer_comes_from_the_connection_event() {
    // LE Connection Complete: status 0, handle 0x0040, role 0, addr type 0, A4:C1:38:12:34:56.
    let mut ev = vec![0, 0, 0, 1, 4, 0x3E, 19, 0x01, 0x00, 0x40, 0x00, 0x00, 0x00];
    ev.extend_from_slice(&[0x56, 0x34, 0x12, 0x38, 0xC1, 0xA4]);
    ev.extend_from_slice(&[0; 7]);
    // A notification of 20 bytes split into a start and a continuation.
    let mut ntf = vec![0x1B, 0x11, 0x00];
    ntf.extend(0..20u8);
    let whole = l2cap_att(&ntf);
    let (a, b) = whole.split_at(9);
    let (_, out) = run(&[ev, acl(true, 0x40, 0b10, a), acl(true, 0x40, 0b01, b), acl(false, 0x40, 0b00, &l2cap_att(&[0x52, 0x15, 0x00, 0xDD, 0xA5, 0x03]))]);
    let att: Vec<&AttPdu> = out
        .iter()
        .filter_map(|o| if let HciOutput::Att(a) = o { Some(a) } else { None })
        .collect();
    assert_eq!(att.len(), 2);
    assert_eq!(att[0].pdu, ntf);
    assert!(!att[0].from_client);
    assert_eq!(att[0].peer.as_deref(), Some("A4:C1:38:12:34:56"));
    assert_eq!(att[1].pdu, [0x52, 0x15, 0x00, 0xDD, 0xA5, 0x03]);
    assert!(att[1].from_client);
}

#[test]
fn discovery_maps_value_handles_to_uuids() {
    let packets = [
        // Read By Group Type Request 0x0001-0xffff, primary service.
        acl(false, 0x40, 0, &l2cap_att(&[0x10, 0x01, 0x00, 0xFF, 0xFF, 0x00, 0x28])),
        acl(true, 0x40, 0b10, &l2cap_att(&[0x11, 0x06, 0x10, 0x00, 0x1F, 0x00, 0x00, 0xFF])),
        // Read By Type Request, characteristic declaration.
        acl(false, 0x40, 0, &l2cap_att(&[0x08, 0x10, 0x00, 0x1F, 0x00, 0x03, 0x28])),
        acl(true, 0x40, 0b10, &l2cap_att(&[0x09, 0x07, 0x11, 0x00, 0x10, 0x12, 0x00, 0x01, 0xFF, 0x14, 0x00, 0x0C, 0x15, 0x00, 0x02, 0xFF])),
        // Find Information: the CCCD of FF01.
        acl(false, 0x40, 0, &l2cap_att(&[0x04, 0x13, 0x00, 0x13, 0x00])),
        acl(true, 0x40, 0b10, &l2cap_att(&[0x05, 0x01, 0x13, 0x00, 0x02, 0x29])),
    ];
    let (x, out) = run(&packets);
    assert_eq!(att_of(&out).len(), 6);
    let t = x.table(0, 0x40).unwrap();
    let short = |u: &uuid::Uuid| (u.as_u128() >> 96) as u16;
    assert_eq!(t.handles.iter().map(|(h, u)| (*h, short(u))).collect::<Vec<_>>(), [(0x12, 0xFF01), (0x13, 0x2902), (0x15, 0xFF02)]);
    assert_eq!(t.services.len(), 1);
    assert_eq!(t.handles[&0x12].to_string(), "0000ff01-0000-1000-8000-00805f9b34fb");
}

#[test]
fn gaps_are_reported_not_panicked_on() {
    let ntf = l2cap_att(&[0x1B, 0x11, 0x00, 1, 2, 3, 4, 5]);
    let (_, out) = run(&[
        acl(true, 0x40, 0b01, &ntf[4..]),
        acl(true, 0x40, 0b10, &ntf[..6]),
        acl(true, 0x40, 0b10, &ntf),
        vec![0, 0, 0, 1, 2, 0x40],
    ]);
    assert!(matches!(out[0], HciOutput::Gap(HciGap::ContinuationWithoutStart { connection: 0x40 })));
    assert!(matches!(out[1], HciOutput::Gap(HciGap::IncompletePdu { have: 6, need: 12, .. })));
    assert!(matches!(&out[2], HciOutput::Att(a) if a.pdu.len() == 8));
    assert!(matches!(out[3], HciOutput::Gap(HciGap::ShortAcl { connection: None, len: 1 })));
    assert_eq!(
        HciGap::ContinuationWithoutStart { connection: 0x40 }.to_string(),
        "ACL continuation fragment on connection 0x040 with no start fragment (log started mid-PDU?)"
    );
}

#[test]
fn every_encapsulation_yields_the_same_packet() {
    let acl_bytes = [0x40, 0x20, 0x01, 0x00, 0xAA];
    let mut h4 = vec![2];
    h4.extend_from_slice(&acl_bytes);
    let mut monitor = vec![0, 1, 0, 5];
    monitor.extend_from_slice(&acl_bytes);
    let cases = [
        (Encapsulation::Btsnoop { datalink: BTSNOOP_HCI_UART, flags: 1 }, h4.clone(), 0),
        (Encapsulation::Btsnoop { datalink: BTSNOOP_HCI_UNENCAPSULATED, flags: 1 }, acl_bytes.to_vec(), 0),
        (Encapsulation::Btsnoop { datalink: BTSNOOP_LINUX_MONITOR, flags: (1 << 16) | 5 }, acl_bytes.to_vec(), 1),
        (Encapsulation::Pcap(LINKTYPE_BLUETOOTH_LINUX_MONITOR), monitor, 1),
    ];
    for (enc, data, adapter) in cases {
        let p = HciPacket::from_capture(enc, &data).unwrap_or_else(|| panic!("{enc:?}"));
        assert_eq!((p.adapter, p.kind, p.direction, p.bytes), (adapter, HciPacketType::Acl, Some(HciDirection::ControllerToHost), &acl_bytes[..]), "{enc:?}");
    }
    // A monitor "new index" record is not HCI traffic.
    assert_eq!(HciPacket::from_capture(Encapsulation::Btsnoop { datalink: BTSNOOP_LINUX_MONITOR, flags: 0 }, &[0; 16]), None);
}

#[test]
fn seeded_random_hci_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x4C1);
    let mut x = AttExtractor::new();
    let mut out = Vec::new();
    for _ in 0..20_000 {
        let n = rng.gen_range(0..40);
        let mut p: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        if rng.gen_bool(0.7) && p.len() > 9 {
            // Mostly ACL on a few handles, with plausible lengths, so reassembly runs.
            p[4] = 2;
            p[5] = rng.gen_range(0x40..0x43);
            p[6] = rng.gen_range(0..4) << 4;
            p[7] = (n - 9) as u8;
            p[8] = 0;
        }
        let enc = match rng.gen_range(0..4) {
            0 => Encapsulation::Pcap(LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR),
            1 => Encapsulation::Pcap(LINKTYPE_BLUETOOTH_HCI_H4),
            2 => Encapsulation::Btsnoop { datalink: BTSNOOP_LINUX_MONITOR, flags: rng.gen() },
            _ => Encapsulation::Btsnoop { datalink: BTSNOOP_HCI_UNENCAPSULATED, flags: rng.gen() },
        };
        if let Some(hp) = HciPacket::from_capture(enc, &p) {
            x.push(&hp, &mut out);
        }
        out.clear();
    }
}
