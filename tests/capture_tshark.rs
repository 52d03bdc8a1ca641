//! Checks with the real tshark that `PcapngCapture` files decode as Modbus RTU
//! with no Wireshark configuration: unit id, function code, all 47 register
//! values, query/response classification and nanosecond timestamps.
//!
//! tshark is required: without it these tests fail (CI installs it).

use std::path::Path;
use std::process::Command;

use hilbench::link::capture::PcapngCapture;
use hilbench::link::record::{Direction, FrameRecord};

const INSTALL_HINT: &str = "tshark is required by this test but was not found. Install it, e.g. \
     `sudo DEBIAN_FRONTEND=noninteractive apt-get install -y tshark` (CI installs it), \
     or set TSHARK to the path of a tshark binary.";

/// Appends the Modbus CRC-16 (low byte first) to `frame`.
fn with_crc(frame: &[u8]) -> Vec<u8> {
    let crc = crc::Crc::<u16>::new(&crc::CRC_16_MODBUS).checksum(frame);
    let mut v = frame.to_vec();
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// The 47 register values the sample response carries.
fn register_values() -> Vec<u16> {
    (0..47u16)
        .map(|i| 0x0C80u16.wrapping_add(i.wrapping_mul(257)))
        .collect()
}

/// Runs tshark on `capture` with an empty configuration directory (so no user
/// preference can help the decoding) and returns its stdout.
fn tshark(config_dir: &Path, capture: &Path, extra: &[&str]) -> String {
    let exe = std::env::var_os("TSHARK").unwrap_or_else(|| "tshark".into());
    let out = Command::new(&exe)
        .env("WIRESHARK_CONFIG_DIR", config_dir)
        .arg("-n")
        .arg("-r")
        .arg(capture)
        .args(extra)
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{INSTALL_HINT} ({exe:?}: {e})")
        }
        Err(e) => panic!("could not run {exe:?}: {e}. {INSTALL_HINT}"),
    };
    assert!(
        out.status.success(),
        "tshark failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tshark output is UTF-8")
}

/// `-T fields` arguments: one tab-separated line per frame, repeated fields joined by ','.
fn field_args<'a>(fields: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "-T",
        "fields",
        "-E",
        "separator=/t",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
    ];
    for f in fields {
        args.push("-e");
        args.push(f);
    }
    args
}

/// The Info column of every frame (where the mbrtu dissector writes "Query"/"Response"),
/// via the summary output with an Info-only column layout; that works on every tshark
/// version, unlike the `_ws.col.*` column fields, whose names differ between versions.
fn info_column(config_dir: &Path, capture: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["-o", r#"gui.column.format:"No.","%m","Info","%i""#];
    args.extend_from_slice(extra);
    let out = tshark(config_dir, capture, &args);
    out.lines()
        .enumerate()
        .map(|(i, line)| {
            let (num, info) = line
                .trim_start()
                .split_once(' ')
                .unwrap_or((line.trim(), ""));
            assert_eq!(num, (i + 1).to_string(), "summary line {line:?}");
            info.trim().to_string()
        })
        .collect()
}

/// Parses tshark's `frame.time_epoch` ("1700000000.123456789") into nanoseconds.
fn epoch_ns(s: &str) -> u64 {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    assert!(frac.len() <= 9, "unexpected time format {s:?}");
    let frac = format!("{frac:0<9}");
    secs.parse::<u64>().unwrap() * 1_000_000_000 + frac.parse::<u64>().unwrap()
}

#[test]
fn capture_decodes_as_modbus_rtu_without_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("wireshark-config");
    std::fs::create_dir(&config_dir).unwrap();
    let path = dir.path().join("lifepower4.pcapng");
    let link = "/dev/pts/hilbench-0";

    let request = with_crc(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x2F]);
    let mut reply = vec![0x01, 0x03, 94];
    for r in register_values() {
        reply.extend_from_slice(&r.to_be_bytes());
    }
    let reply = with_crc(&reply);
    assert_eq!(reply.len(), 99);
    let exception = with_crc(&[0x01, 0x83, 0x02]);

    // Odd nanosecond values, so that any rounding to µs would show.
    let t0: u64 = 1_700_000_000_123_456_789;
    let frames = [
        (Direction::Request, t0, request.clone()),
        (Direction::Response, t0 + 100_000_001, reply),
        (Direction::Request, t0 + 1_000_000_007, request),
        (Direction::Response, t0 + 1_050_000_003, exception),
    ];

    let mut cap = PcapngCapture::create(&path, link).unwrap();
    for (direction, ts, bytes) in &frames {
        cap.write(&FrameRecord {
            link: link.to_string(),
            direction: *direction,
            timestamp_ns: *ts,
            bytes: bytes.clone(),
        })
        .unwrap();
    }
    cap.close().unwrap();

    let out = tshark(
        &config_dir,
        &path,
        &field_args(&[
            "frame.number",
            "frame.time_epoch",
            "frame.interface_name",
            "frame.comment",
            "frame.protocols",
            "mbrtu.unit_id",
            "modbus.func_code",
            "modbus.reference_num",
            "modbus.word_cnt",
            "modbus.byte_cnt",
            "modbus.regval_uint16",
            "modbus.exception_code",
            "modbus.request_frame",
        ]),
    );
    let infos = info_column(&config_dir, &path, &[]);
    assert_eq!(infos.len(), 4, "{infos:?}");
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 4, "tshark output:\n{out}");

    let registers = register_values()
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for (i, (row, (direction, ts, _))) in rows.iter().zip(&frames).enumerate() {
        assert_eq!(row.len(), 13, "frame {}: {row:?}", i + 1);
        let [num, epoch, iface, comment, protocols, unit, func, reference, words, byte_cnt, regs, exc, req_frame] =
            row[..]
        else {
            unreachable!()
        };
        let info = infos[i].as_str();
        assert_eq!(num, (i + 1).to_string());
        assert_eq!(epoch_ns(epoch), *ts, "frame {num}: time {epoch}");
        assert_eq!(iface, link, "frame {num}");
        assert_eq!(comment, direction.as_str(), "frame {num}");
        assert_eq!(protocols, "exported_pdu:mbrtu:modbus", "frame {num}");
        assert_eq!(unit, "1", "frame {num}");
        assert_eq!(func, "3", "frame {num}");
        match direction {
            Direction::Request => {
                assert!(
                    info.starts_with("Query: Unit:   1, Func:   3: Read Holding Registers"),
                    "frame {num}: {info:?}"
                );
                assert_eq!((reference, words), ("0", "47"), "frame {num}");
                assert_eq!((byte_cnt, regs, exc), ("", "", ""), "frame {num}");
            }
            Direction::Response => {
                assert!(
                    info.starts_with("Response: Unit:   1, Func:   3"),
                    "frame {num}: {info:?}"
                );
                assert_eq!((reference, words), ("", ""), "frame {num}");
            }
        }
        match num {
            "2" => {
                assert_eq!(byte_cnt, "94");
                assert_eq!(regs, registers, "register values");
                assert_eq!(exc, "");
                assert_eq!(req_frame, "1", "reply matched to its request");
            }
            "4" => {
                assert!(info.contains("Exception returned"), "{info:?}");
                assert_eq!(exc, "2", "exception code");
                assert_eq!((byte_cnt, regs), ("", ""));
            }
            _ => {}
        }
    }

    // The detailed view carries the interface, the 47 registers and the timestamp.
    let verbose = tshark(&config_dir, &path, &["-V", "-Y", "frame.number == 2"]);
    assert!(
        verbose.contains("Interface name: /dev/pts/hilbench-0"),
        "{verbose}"
    );
    assert!(
        verbose.contains("Epoch Time: 1700000000.223456790 seconds"),
        "{verbose}"
    );
    assert!(verbose.contains("Unit ID: 1"), "{verbose}");
    assert!(verbose.contains("Byte Count: 94"), "{verbose}");
    for (n, r) in register_values().iter().enumerate() {
        let line = format!("Register {n} (UINT16): {r}");
        assert!(verbose.contains(&line), "missing {line:?} in\n{verbose}");
    }
}

/// The exported-PDU ports carry the direction for function codes whose request and
/// reply look alike (FC 6 echoes the request): Wireshark uses them once the Modbus RTU
/// port preference names the device port. Also checks that records for a second
/// link land on their own interface.
#[test]
fn ports_carry_direction_and_links_get_their_own_interface() {
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("wireshark-config");
    std::fs::create_dir(&config_dir).unwrap();
    let path = dir.path().join("write.pcapng");

    let write = with_crc(&[0x02, 0x06, 0x00, 0x10, 0x12, 0x34]);
    let t0: u64 = 1_700_000_100_000_000_001;
    let mut cap = PcapngCapture::create(&path, "bus-a").unwrap();
    cap.write(&FrameRecord {
        link: "bus-b".into(),
        direction: Direction::Request,
        timestamp_ns: t0,
        bytes: write.clone(),
    })
    .unwrap();
    cap.write(&FrameRecord {
        link: "bus-b".into(),
        direction: Direction::Response,
        timestamp_ns: t0 + 9_999,
        bytes: write,
    })
    .unwrap();
    cap.close().unwrap();

    let out = tshark(
        &config_dir,
        &path,
        &[
            &["-o", "mbrtu.tcp.port:502"][..],
            &field_args(&[
                "frame.interface_id",
                "frame.interface_name",
                "frame.time_epoch",
                "exported_pdu.src_port",
                "exported_pdu.dst_port",
                "mbrtu.unit_id",
                "modbus.func_code",
            ]),
        ]
        .concat(),
    );
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 2, "tshark output:\n{out}");
    for (row, ts) in rows.iter().zip([t0, t0 + 9_999]) {
        assert_eq!(row.len(), 7, "{out}");
        assert_eq!(epoch_ns(row[2]), ts, "{out}");
    }
    fn pick<'a>(r: &[&'a str]) -> [&'a str; 6] {
        [r[0], r[1], r[3], r[4], r[5], r[6]]
    }
    assert_eq!(
        pick(&rows[0]),
        ["1", "bus-b", "50200", "502", "2", "6"],
        "{out}"
    );
    assert_eq!(
        pick(&rows[1]),
        ["1", "bus-b", "502", "50200", "2", "6"],
        "{out}"
    );
    let infos = info_column(&config_dir, &path, &["-o", "mbrtu.tcp.port:502"]);
    assert_eq!(infos.len(), 2, "{infos:?}");
    assert!(
        infos[0].starts_with("Query: Unit:   2, Func:   6: Write Single Register"),
        "{infos:?}"
    );
    assert!(
        infos[1].starts_with("Response: Unit:   2, Func:   6: Write Single Register"),
        "{infos:?}"
    );
}
