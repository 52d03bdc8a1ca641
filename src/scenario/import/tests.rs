use super::*;
use crate::link::capture::{CaptureFormat, PcapngCapture};
use crate::link::record::FrameRecord;
use crate::protocol::modbus;

fn opts(dir: &Path) -> ImportOptions {
    ImportOptions { out_dir: dir.join("out"), ..Default::default() }
}

fn read_request(addr: u8) -> Vec<u8> {
    let mut f = vec![addr, 0x03, 0x00, 0x00, 0x00, 0x02];
    modbus::append_crc(&mut f);
    f
}

fn read_reply(addr: u8, regs: [u16; 2]) -> Vec<u8> {
    let mut f = vec![addr, 0x03, 4];
    for r in regs {
        f.extend_from_slice(&r.to_be_bytes());
    }
    modbus::append_crc(&mut f);
    f
}

#[test]
fn a_modbus_bus_capture_splits_into_one_fixture_per_address_with_its_kind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.pcapng");
    let mut cap = PcapngCapture::create(&path, "bus0").unwrap();
    let mut bad = read_reply(2, [7, 8]);
    *bad.last_mut().unwrap() ^= 0xFF; // a reply with a broken CRC still belongs to pack 2
    let frames = [
        (Direction::Request, read_request(1)),
        (Direction::Response, read_reply(1, [1, 2])),
        (Direction::Request, read_request(2)),
        (Direction::Response, bad.clone()),
    ];
    for (i, (d, b)) in frames.iter().enumerate() {
        cap.write(&FrameRecord::new("bus0", *d, 1_700_000_000_000_000_000 + i as u64 * 1_000_000, b.clone())).unwrap();
    }
    cap.close().unwrap();

    let report = import_file(&path, &opts(dir.path())).unwrap();
    assert_eq!(report.error, None);
    assert_eq!(report.frames, 4);
    let names: Vec<&str> = report.devices.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(names, ["bus0/addr1", "bus0/addr2"]);
    let (h, f) = read_fixture(&report.devices[1].fixture).unwrap();
    assert_eq!(h.kind.as_deref(), Some("eg4-lp4"));
    assert_eq!(h.transport, CaptureTransport::Serial);
    assert_eq!(h.frames, 2);
    assert_eq!(h.start_unix_ns, 1_700_000_000_002_000_000);
    assert_eq!(f[1].t_ns, 1_000_000);
    assert_eq!(f[1].hex, crate::protocol::lower_hex(&bad));
    assert_eq!(f[1].meaning, None, "a reply with a bad CRC is not recognised");
    assert!(f[0].meaning.as_deref().unwrap().contains("addr=2"), "{:?}", f[0].meaning);
    assert_eq!(h.confidence, Confidence::Medium, "{}", h.evidence);
    assert_eq!(report.devices[0].confidence, Confidence::High);
    assert_eq!((report.devices[1].link.as_str(), report.devices[1].unit.as_deref()), ("bus0", Some("addr2")));
    // A read of 2 registers is no profile's poll: the modbus-master would not send it.
    let sc = &report.scenarios[0];
    assert_eq!((sc.link.as_str(), &sc.scenario), ("bus0", &None));
    assert_eq!(
        sc.skipped.as_deref(),
        Some("the captured master reads 2 registers from 0, which no register profile polls (lp4-v2 47 from 0, eg4-ll 39 from 0)")
    );
}

#[test]
fn a_btsnoop_log_becomes_att_frames_of_the_peer_with_its_characteristics() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fuzz/capture_file/btsnoop_h4_jbd_session");
    let report = import_file(&src, &opts(dir.path())).unwrap();
    assert_eq!(report.format, "btsnoop (datalink 1002)");
    assert_eq!(report.devices.len(), 1);
    let d = &report.devices[0];
    assert_eq!(d.device, "A4:C1:38:12:34:56");
    assert_eq!(d.kind.as_deref(), Some("jbd-bms"));
    // The log repeats a continuation fragment after its PDU was complete.
    assert_eq!(report.gaps.len(), 1, "{:?}", report.gaps);
    assert!(report.gaps[0].what.contains("no start fragment"), "{:?}", report.gaps);
    assert!(report.gaps[0].at.starts_with("byte "), "{:?}", report.gaps);
    let (h, f) = read_fixture(&d.fixture).unwrap();
    assert_eq!(h.gatt.get(&0x12).map(String::as_str), Some("0000ff01-0000-1000-8000-00805f9b34fb"));
    let write = f.iter().find(|f| f.att.as_deref() == Some("write_cmd")).unwrap();
    assert_eq!(write.dir, Direction::Request);
    assert_eq!(write.uuid.as_deref(), Some("0000ff02-0000-1000-8000-00805f9b34fb"));
    assert!(write.meaning.as_deref().unwrap().contains("read 0x03 (basic info)"), "{:?}", write.meaning);
    let ntf = f.iter().find(|f| f.att.as_deref() == Some("handle_value_ntf")).unwrap();
    assert_eq!(ntf.dir, Direction::Response);
}

#[test]
fn the_monitor_form_of_the_same_log_imports_the_same_frames() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fuzz/capture_file");
    let a = import_file(&root.join("btsnoop_h4_jbd_session"), &opts(&dir.path().join("a"))).unwrap();
    let b = import_file(&root.join("btsnoop_monitor_jbd_session"), &opts(&dir.path().join("b"))).unwrap();
    assert_eq!(read_fixture(&a.devices[0].fixture).unwrap().1, read_fixture(&b.devices[0].fixture).unwrap().1);
}

#[test]
fn a_hex_trace_with_tx_and_rx_imports_as_a_bus() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bridge.log");
    let text = format!(
        "# EG4 bridge --trace\n12:00:01.250 pack 0x01 tx={} rx={}\n12:00:01.500 pack 0x02 tx={} rx=-\n> {}\n",
        crate::protocol::lower_hex(&read_request(1)),
        crate::protocol::lower_hex(&read_reply(1, [5, 6])),
        crate::protocol::lower_hex(&read_request(2)),
        "01 03 00 00 00 02 c4 0b",
    );
    std::fs::write(&path, text).unwrap();
    let report = import_file(&path, &opts(dir.path())).unwrap();
    assert_eq!(report.format, "hex dump");
    assert_eq!(report.frames, 4, "{:?}", report.gaps);
    let (h, f) = read_fixture(&report.devices[0].fixture).unwrap();
    assert_eq!(h.device, "text/addr1");
    assert_eq!(h.kind.as_deref(), Some("eg4-lp4"));
    assert_eq!(f.len(), 3);
    assert_eq!(h.start_unix_ns, (12 * 3600 + 1) * 1_000_000_000 + 250_000_000);
}

#[test]
fn json_lines_of_frame_records_import_and_bad_lines_are_located() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frames.jsonl");
    let good = serde_json::to_string(&FrameRecord::new("pty", Direction::Request, 5, read_request(1))).unwrap();
    std::fs::write(&path, format!("{good}\n{{\"direction\": \"sideways\", \"hex\": \"00\"}}\nnot json\n")).unwrap();
    let report = import_file(&path, &opts(dir.path())).unwrap();
    assert_eq!(report.frames, 1);
    assert_eq!(report.gaps.iter().map(|g| g.at.as_str()).collect::<Vec<_>>(), ["line 2", "line 3"]);
    assert!(report.gaps[0].what.starts_with("direction:"), "{:?}", report.gaps);
}

#[test]
fn unreadable_inputs_are_refused_with_what_and_where() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("x.bin");
    std::fs::write(&bin, [0x7F, b'E', b'L', b'F', 0, 1, 2]).unwrap();
    let e = import_file(&bin, &opts(dir.path())).unwrap_err().to_string();
    assert!(e.contains("not a capture this importer reads: starts with 7f454c46"), "{e}");

    let e = import_file(&dir.path().join("missing.pcapng"), &opts(dir.path())).unwrap_err().to_string();
    assert!(e.contains("missing.pcapng"), "{e}");

    let e = import_file(&bin, &ImportOptions { kind: Some("toaster".into()), ..opts(dir.path()) }).unwrap_err().to_string();
    assert!(e.contains("--kind toaster: no device kind has that name (known: eg4-lp4"), "{e}");

    // A corrupt block after good ones: the frames before it are kept, the error located.
    let path = dir.path().join("corrupt.pcapng");
    let mut cap = PcapngCapture::create_as(&path, "bus0", CaptureFormat::ModbusRtu).unwrap();
    cap.write(&FrameRecord::new("bus0", Direction::Request, 1, read_request(1))).unwrap();
    cap.write(&FrameRecord::new("bus0", Direction::Request, 2, read_request(1))).unwrap();
    cap.close().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    bytes[len - 4] ^= 0x55; // the last block's trailing length
    std::fs::write(&path, &bytes).unwrap();
    let report = import_file(&path, &opts(dir.path())).unwrap();
    assert_eq!(report.frames, 1);
    let err = report.error.unwrap();
    assert!(err.starts_with("byte ") && err.contains("(record 4)") && err.contains("trailing length"), "{err}");
}

#[test]
fn the_committed_fixtures_are_what_importing_their_capture_gives() {
    // Scenarios replay these; they must not drift from their capture.
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new("fixtures/captures/eg4-fault3-bridge.pcapng");
    let report = import_file(src, &ImportOptions { out_dir: dir.path().to_owned(), ..Default::default() }).unwrap();
    assert_eq!(report.devices.len(), 2);
    for d in &report.devices {
        let name = d.fixture.file_name().unwrap();
        let committed = Path::new("fixtures/captures/imported").join(name);
        assert_eq!(
            std::fs::read_to_string(&d.fixture).unwrap(),
            std::fs::read_to_string(&committed).unwrap_or_else(|e| panic!("{}: {e}", committed.display())),
            "re-import {} into fixtures/captures/imported/",
            src.display()
        );
    }
    // And the scenario that replays them to a modbus-master, with what the capture proves.
    let [sc] = &report.scenarios[..] else { panic!("{:?}", report.scenarios) };
    let text = std::fs::read_to_string(sc.scenario.as_ref().unwrap()).unwrap();
    insta::assert_snapshot!("eg4_fault3_capture_scenario", text.replace(&dir.path().display().to_string(), "OUT"));

    // The ATT capture of jbd-healthy-poll.yaml, which the BLE replay scenarios serve.
    let src = Path::new("fixtures/captures/jbd-ble-poll.pcapng");
    let report = import_file(src, &ImportOptions { out_dir: dir.path().to_owned(), ..Default::default() }).unwrap();
    let [d] = &report.devices[..] else { panic!("{:?}", report.devices) };
    assert_eq!(d.kind.as_deref(), Some("jbd-bms"));
    let committed = Path::new("fixtures/captures/imported").join(d.fixture.file_name().unwrap());
    assert_eq!(std::fs::read_to_string(&d.fixture).unwrap(), std::fs::read_to_string(&committed).unwrap(), "re-import {}", src.display());
    // dumpcap's capture of smpclient updating the SMP simulator over UDP.
    let src = Path::new("fixtures/captures/smp-dfu-udp.pcapng");
    let smp = import_file(src, &ImportOptions { out_dir: dir.path().to_owned(), ..Default::default() }).unwrap();
    let [s] = &smp.devices[..] else { panic!("{:?}", smp.devices) };
    assert_eq!((s.kind.as_deref(), s.confidence, s.frames), (Some("smp-server"), Confidence::High, 130));
    let committed = Path::new("fixtures/captures/imported").join(s.fixture.file_name().unwrap());
    assert_eq!(std::fs::read_to_string(&s.fixture).unwrap(), std::fs::read_to_string(&committed).unwrap(), "re-import {}", src.display());
    // Its scenario: the replay on the air, a jbd-client, the last reading of the capture.
    let [sc] = &report.scenarios[..] else { panic!("{:?}", report.scenarios) };
    let text = std::fs::read_to_string(sc.scenario.as_ref().unwrap()).unwrap();
    insta::assert_snapshot!("jbd_ble_capture_scenario", text.replace(&dir.path().display().to_string(), "OUT"));
}

#[test]
fn seeded_random_text_lines_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7E47);
    let pieces = [
        "99999999999999999999:00:00.1", "18446744073709551615:59:59.999999999", "12:00:01.250", "1e308", "-3.5", "[0.5]",
        "tx=", "rx=-", "tx=0x0", "rx=zz", ">", "<-", "notify", "0x01", "01:03", "é1", "#", "{", "}", "\"dir\"", ":", ".", "\u{0}",
        "{\"direction\":\"request\",\"bytes\":[1,2,300]}", "{\"hilbench_fixture\":1}", "{\"dir\":\"response\",\"hex\":\"0g\"}",
    ];
    for i in 0..400 {
        let mut text = String::new();
        for _ in 0..rng.gen_range(1..20) {
            let n = rng.gen_range(0..6);
            let line: Vec<&str> = (0..n).map(|_| pieces[rng.gen_range(0..pieces.len())]).collect();
            text.push_str(&line.join(" "));
            text.push('\n');
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(if i % 2 == 0 { "t.txt" } else { "t.jsonl" });
        let body = if i % 2 == 0 { text } else { format!("{{}}\n{text}") };
        std::fs::write(&path, body).unwrap();
        let _ = import_file(&path, &opts(dir.path()));
    }
}

#[test]
fn devices_whose_names_make_one_file_name_get_two_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.jsonl");
    let rec = |link: &str| serde_json::to_string(&FrameRecord::new(link, Direction::Request, 1, vec![0xAB])).unwrap();
    std::fs::write(&path, format!("{}\n{}\n", rec("bus a"), rec("bus/a"))).unwrap();
    let report = import_file(&path, &opts(dir.path())).unwrap();
    let files: Vec<String> = report.devices.iter().map(|d| d.fixture.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(files, ["two.bus-a.jsonl", "two.bus-a-2.jsonl"]);
    for d in &report.devices {
        assert_eq!(read_fixture(&d.fixture).unwrap().0.device, d.device);
    }
}
