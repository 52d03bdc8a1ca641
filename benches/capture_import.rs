//! Benchmark of `hilbench capture import` on large captures. Not pass/fail: it prints the
//! import speed (MB/s of capture, frames/s) and the importer's peak RSS for a small and a
//! large file of each kind, so a reader sees that memory stays flat in the file's size.
//!
//! * `modbus` – a pcapng of Modbus RTU frames on one bus (requests and 47-register replies
//!   of three packs) written with hilbench's own capture writer.
//! * `btsnoop` – an Android-style btsnoop (H4) log of one BLE connection: the GATT
//!   discovery, then JBD writes and their answers as 20-byte notifications.
//!
//! Each file is written under target/bench-captures/ (deleted afterwards with its
//! fixtures), then imported by the built binary as a child process; peak RSS is the
//! child's `ru_maxrss`.
//!
//! Run:   cargo bench --bench capture_import              (release build)
//!        cargo bench --bench capture_import -- modbus    (one part)
//! Knobs: CAPTURE_BENCH_MB=1024 (the large file; the small one is 1/16 of it).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use hilbench::link::capture::PcapngCapture;
use hilbench::link::record::{Direction, FrameRecord};

const BIN: &str = env!("CARGO_BIN_EXE_hilbench");

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn crc(frame: &mut Vec<u8>) {
    hilbench::protocol::modbus::append_crc(frame);
}

/// A Modbus bus capture of at least `bytes`; returns the frame count.
fn write_modbus(path: &Path, bytes: u64) -> u64 {
    let mut cap = PcapngCapture::create(path, "bus0").unwrap();
    let mut t = 1_700_000_000_000_000_000u64;
    let mut frames = 0;
    let mut addr = 1u8;
    while std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) < bytes || frames == 0 {
        for _ in 0..10_000 {
            let mut req = vec![addr, 0x03, 0x00, 0x00, 0x00, 0x2F];
            crc(&mut req);
            let mut rsp = vec![addr, 0x03, 94];
            rsp.extend((0..47u16).flat_map(|r| (3300 + r + u16::from(addr)).to_be_bytes()));
            crc(&mut rsp);
            cap.write(&FrameRecord::new("bus0", Direction::Request, t, req)).unwrap();
            cap.write(&FrameRecord::new("bus0", Direction::Response, t + 90_000_000, rsp)).unwrap();
            t += 200_000_000;
            frames += 2;
            addr = addr % 3 + 1;
        }
        cap.flush().unwrap();
    }
    cap.close().unwrap();
    frames
}

/// A btsnoop H4 log of one JBD connection of at least `bytes`; returns the ATT PDU count.
fn write_btsnoop(path: &Path, bytes: u64) -> u64 {
    const EPOCH: i64 = hilbench::protocol::capture_file::BTSNOOP_UNIX_EPOCH_US;
    let mut f = BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(b"btsnoop\0").unwrap();
    f.write_all(&1u32.to_be_bytes()).unwrap();
    f.write_all(&1002u32.to_be_bytes()).unwrap();
    let mut written = 16u64;
    let mut us = 1_700_000_000_000_000i64;
    let mut rec = |f: &mut BufWriter<std::fs::File>, flags: u32, data: &[u8], written: &mut u64| {
        for v in [data.len() as u32, data.len() as u32, flags, 0] {
            f.write_all(&v.to_be_bytes()).unwrap();
        }
        f.write_all(&(us + EPOCH).to_be_bytes()).unwrap();
        f.write_all(data).unwrap();
        us += 1000;
        *written += 24 + data.len() as u64;
    };
    let acl = |pb: u16, att: &[u8], first: bool| {
        let mut v = vec![2u8];
        let l2: Vec<u8> = if first {
            let mut l = (att.len() as u16).to_le_bytes().to_vec();
            l.extend_from_slice(&4u16.to_le_bytes());
            l.extend_from_slice(att);
            l
        } else {
            att.to_vec()
        };
        v.extend_from_slice(&(0x0040 | (pb << 12)).to_le_bytes());
        v.extend_from_slice(&(l2.len() as u16).to_le_bytes());
        v.extend_from_slice(&l2);
        v
    };
    let mut conn = vec![0x04, 0x3E, 19, 0x01, 0x00, 0x40, 0x00, 0x00, 0x00, 0x56, 0x34, 0x12, 0x38, 0xC1, 0xA4];
    conn.extend_from_slice(&[0; 7]);
    rec(&mut f, 3, &conn, &mut written);
    rec(&mut f, 0, &acl(0, &[0x08, 0x10, 0, 0x1f, 0, 3, 0x28], true), &mut written);
    rec(&mut f, 1, &acl(2, &[0x09, 7, 0x11, 0, 0x10, 0x12, 0, 0x01, 0xff, 0x14, 0, 0x0c, 0x15, 0, 0x02, 0xff], true), &mut written);
    let mut pdus = 2;
    // Basic info answer: DD 03 00 1B, 27 data bytes, checksum, 77 (34 bytes) in two notifications.
    let mut answer = vec![0xDD, 0x03, 0x00, 0x1B];
    answer.extend(0..27u8);
    let sum: u16 = answer[2..].iter().map(|b| u16::from(*b)).sum();
    answer.extend_from_slice(&(0u16.wrapping_sub(sum)).to_be_bytes());
    answer.push(0x77);
    while written < bytes {
        rec(&mut f, 0, &acl(0, &[0x52, 0x15, 0x00, 0xDD, 0xA5, 0x03, 0x00, 0xFF, 0xFD, 0x77], true), &mut written);
        let mut n1 = vec![0x1B, 0x12, 0x00];
        n1.extend_from_slice(&answer[..20]);
        let mut n2 = vec![0x1B, 0x12, 0x00];
        n2.extend_from_slice(&answer[20..]);
        rec(&mut f, 1, &acl(2, &n1, true), &mut written);
        rec(&mut f, 1, &acl(2, &n2, true), &mut written);
        pdus += 3;
    }
    f.flush().unwrap();
    pdus
}

/// Imports `file`; prints speed and the child's peak RSS.
fn import(what: &str, file: &Path, frames: u64, out: &Path) {
    let size = std::fs::metadata(file).unwrap().len();
    let start = Instant::now();
    let status = Command::new(BIN)
        .args(["capture", "import"])
        .arg(file)
        .arg("--out")
        .arg(out)
        .arg("--json")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(status.success(), "import of {} failed", file.display());
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let written: u64 = std::fs::read_dir(out).unwrap().flatten().map(|e| e.metadata().map(|m| m.len()).unwrap_or(0)).sum();
    println!(
        "{what:<8} {:>7.1} MB in {secs:>6.2} s: {:>6.1} MB/s, {:>9.0} frames/s; peak RSS of all imports so far {:>6.1} MB; fixtures {:.1} MB",
        size as f64 / 1e6,
        size as f64 / 1e6 / secs,
        frames as f64 / secs,
        usage.max_rss() as f64 / 1024.0,
        written as f64 / 1e6,
    );
    let _ = std::fs::remove_dir_all(out);
}

fn main() {
    let named: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let want = |part: &str| named.is_empty() || named.iter().any(|n| n == part);
    let large = knob("CAPTURE_BENCH_MB", 1024) * 1_000_000;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-captures");
    std::fs::create_dir_all(&dir).unwrap();
    // Small first: ru_maxrss only grows, so the large line shows whether it had to.
    for bytes in [large / 16, large] {
        if want("modbus") {
            let f = dir.join("modbus.pcapng");
            let frames = write_modbus(&f, bytes);
            import("modbus", &f, frames, &dir.join("out"));
            let _ = std::fs::remove_file(&f);
        }
        if want("btsnoop") {
            let f = dir.join("jbd.btsnoop");
            let frames = write_btsnoop(&f, bytes);
            import("btsnoop", &f, frames, &dir.join("out"));
            let _ = std::fs::remove_file(&f);
        }
    }
}
