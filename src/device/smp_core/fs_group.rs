//! The file system group (8) as Zephyr 4.4's fs_mgmt answers, over the
//! device's [`MemFs`]: upload and download in chunks, status, hash and
//! checksum (crc32, sha256), the supported types, close.
//!
//! One transfer is open at a time, as fs_mgmt has one file context: a
//! request for another file or direction closes it first. An upload's
//! bytes become visible to status and hash only when its file closes (the
//! last chunk, a close, another transfer, or 4 s idle), as littlefs
//! commits on close; a reset before that loses them. Measured against the
//! native_sim smp_svr (tests/smp_zephyr_differential.rs).

use std::time::Duration;

use ciborium::Value;
use crc::{Crc, CRC_32_ISO_HDLC};

use super::args::{bytes, text, uint};
use super::{Reply, SmpServer};
use crate::model::filesystem::{FsEntry, FsErrno};
use crate::protocol::mcuboot;
use crate::protocol::smp::{group, MgmtErr};

/// fs_mgmt's error numbers (fs_mgmt.h).
pub(super) mod fs_err {
    pub const UNKNOWN: u16 = 1;
    pub const FILE_INVALID_NAME: u16 = 2;
    pub const FILE_NOT_FOUND: u16 = 3;
    pub const FILE_IS_DIRECTORY: u16 = 4;
    pub const FILE_WRITE_FAILED: u16 = 10;
    pub const FILE_OFFSET_NOT_VALID: u16 = 11;
    pub const FILE_OFFSET_LARGER_THAN_FILE: u16 = 12;
    pub const CHECKSUM_HASH_NOT_FOUND: u16 = 13;
    pub const MOUNT_POINT_NOT_FOUND: u16 = 14;
    pub const FILE_EMPTY: u16 = 16;
}

/// CONFIG_MCUMGR_GRP_FS_PATH_LEN.
const PATH_LEN: usize = 64;
/// CONFIG_MCUMGR_GRP_FS_FILE_AUTOMATIC_IDLE_CLOSE_TIME.
const IDLE_CLOSE: Duration = Duration::from_secs(4);
/// What a download answer needs besides its data (fs_mgmt_config.h with
/// 64 KB files: header 8, map 10, "off" 7, "data" 8, "rc" 4, "len" 7).
const DOWNLOAD_OVERHEAD: usize = 44;
/// Longest hash/checksum type name.
const TYPE_LEN: usize = 8;

static CRC32: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// The one open file.
#[derive(Debug, Clone)]
pub(super) struct FileTransfer {
    path: String,
    direction: Direction,
    /// The offset the next request is expected at.
    off: u64,
    /// The whole length (uploads: as the first chunk said; 0 unknown).
    len: u64,
    last: Duration,
}

#[derive(Debug, Clone)]
enum Direction {
    /// What the write handle holds, committed on close.
    Upload(Vec<u8>),
    Download,
}

/// fs_mgmt_filelen's answer to a stat error.
fn stat_err(e: FsErrno) -> u16 {
    match e {
        FsErrno::Inval => fs_err::FILE_INVALID_NAME,
        FsErrno::NoEnt => fs_err::FILE_NOT_FOUND,
        FsErrno::IsDir => fs_err::FILE_IS_DIRECTORY,
    }
}

fn einval() -> Reply {
    Reply::Rc(MgmtErr::Inval)
}

fn fs(rc: u16) -> Reply {
    Reply::Group(group::FS, rc)
}

/// A `name` as fs_mgmt takes it: present, not empty, at most PATH_LEN bytes.
fn path_ok(name: Option<&str>) -> Option<&str> {
    name.filter(|n| !n.is_empty() && n.len() <= PATH_LEN)
}

impl SmpServer {
    /// Closes the open file (committing an upload).
    pub(super) fn close_file(&mut self) {
        if let Some(FileTransfer { path, direction: Direction::Upload(data), .. }) = self.file.take() {
            self.fs.commit(&path, data);
        }
    }

    /// The idle close fs_mgmt's work queue would have run by `now`.
    fn expire_file(&mut self, now: Duration) {
        if self.file.as_ref().is_some_and(|f| now >= f.last + IDLE_CLOSE) {
            self.close_file();
        }
    }

    /// The file's size as fs_stat reports it (committed bytes only).
    fn file_len(&self, path: &str) -> Result<u64, u16> {
        match self.fs.stat(path) {
            Ok(FsEntry::File { size }) => Ok(size as u64),
            Ok(FsEntry::Dir) => Err(fs_err::FILE_IS_DIRECTORY),
            Err(e) => Err(stat_err(e)),
        }
    }

    /// Done when the whole length has passed; otherwise the idle clock restarts.
    fn finish_check(&mut self, now: Duration) {
        if let Some(f) = self.file.as_mut() {
            if f.len > 0 && f.off >= f.len {
                self.close_file();
            } else {
                f.last = now;
            }
        }
    }

    /// `{"off", "name", "data", "len" (at off 0)}` → `{"off": next}`.
    pub(super) fn fs_upload(&mut self, m: &[(Value, Value)], now: Duration) -> Reply {
        let (Ok(off), Ok(name), Ok(data), Ok(len)) = (uint(m, "off"), text(m, "name"), bytes(m, "data"), uint(m, "len")) else { return einval() };
        let (Some(off), Some(name)) = (off, path_ok(name)) else { return einval() };
        if off == 0 && len.is_none() {
            return einval();
        }
        let data = data.unwrap_or_default();
        self.expire_file(now);
        if !matches!(&self.file, Some(f) if f.path == name && matches!(f.direction, Direction::Upload(_))) {
            self.close_file();
        }
        if self.file.is_none() {
            let contents = match self.fs.open_for_write(name) {
                Ok(c) => c,
                Err(FsErrno::Inval) => return fs(fs_err::FILE_INVALID_NAME),
                Err(FsErrno::NoEnt) => return fs(fs_err::MOUNT_POINT_NOT_FOUND),
                Err(FsErrno::IsDir) => return fs(fs_err::UNKNOWN),
            };
            self.file = Some(FileTransfer { path: name.to_string(), direction: Direction::Upload(contents), off: 0, len: 0, last: now });
        }
        let mut existing = 0;
        if off == 0 {
            match self.file_len(name) {
                Ok(l) => existing = l,
                Err(rc) => return self.fail(rc),
            }
            if let Some(f) = self.file.as_mut() {
                f.len = len.unwrap_or(0);
            }
        } else if self.file.as_ref().is_some_and(|f| f.off == 0) {
            match self.file_len(name) {
                Ok(l) => self.file.as_mut().into_iter().for_each(|f| f.off = l),
                Err(rc) => return self.fail(rc),
            }
        }
        let expected = self.file.as_ref().map_or(0, |f| f.off);
        if off > 0 && off != expected {
            // The file closes (what was written stays) so the client can start over.
            self.close_file();
            return Reply::GroupWith(group::FS, fs_err::FILE_OFFSET_NOT_VALID, vec![("len", Value::from(expected))]);
        }
        if !data.is_empty() {
            let capacity = self.config.fs_capacity;
            let used: usize = self.fs.files().filter(|(p, _)| *p != name).map(|(_, c)| c.len()).sum();
            let Some(FileTransfer { direction: Direction::Upload(held), off: at, .. }) = self.file.as_mut() else { return fs(fs_err::UNKNOWN) };
            // Zephyr truncates only a file that already had bytes at
            // open, and otherwise writes at the end of what it holds.
            if off == 0 && existing != 0 {
                held.clear();
            }
            if used + held.len() + data.len() > capacity {
                return self.fail(fs_err::FILE_WRITE_FAILED);
            }
            held.extend_from_slice(data);
            *at += data.len() as u64;
        }
        let next = self.file.as_ref().map_or(0, |f| f.off);
        self.finish_check(now);
        Reply::Body(vec![("off", Value::from(next))])
    }

    /// A failed transfer step closes the file, as fs_mgmt_cleanup does.
    fn fail(&mut self, rc: u16) -> Reply {
        self.close_file();
        fs(rc)
    }

    /// `{"off", "name"}` → `{"off", "data", "len" (at off 0)}`; past the end, no data.
    pub(super) fn fs_download(&mut self, m: &[(Value, Value)], now: Duration) -> Reply {
        let (Ok(off), Ok(name)) = (uint(m, "off"), text(m, "name")) else { return einval() };
        let (Some(off), Some(name)) = (off, path_ok(name)) else { return einval() };
        self.expire_file(now);
        if !matches!(&self.file, Some(f) if f.path == name && matches!(f.direction, Direction::Download)) {
            self.close_file();
        }
        if self.file.is_none() {
            let len = match self.file_len(name) {
                Ok(l) => l,
                Err(rc) => return fs(rc),
            };
            self.file = Some(FileTransfer { path: name.to_string(), direction: Direction::Download, off: 0, len, last: now });
        }
        let chunk = usize::from(self.config.buf_size).saturating_sub(DOWNLOAD_OVERHEAD);
        let contents = self.fs.read(name).unwrap_or_default();
        let start = usize::try_from(off).unwrap_or(usize::MAX).min(contents.len());
        let data = contents[start..(start + chunk).min(contents.len())].to_vec();
        let mut body = vec![("off", Value::from(off)), ("data", Value::Bytes(data.clone()))];
        if let Some(f) = self.file.as_mut() {
            f.off = off + data.len() as u64;
            if off == 0 {
                body.push(("len", Value::from(f.len)));
            }
        }
        self.finish_check(now);
        Reply::Body(body)
    }

    /// `{"name"}` → `{"len"}` of what the file holds committed.
    pub(super) fn fs_status(&mut self, m: &[(Value, Value)], now: Duration) -> Reply {
        let Ok(name) = text(m, "name") else { return einval() };
        let Some(name) = path_ok(name) else { return einval() };
        self.expire_file(now);
        match self.file_len(name) {
            Ok(len) => Reply::Body(vec![("len", Value::from(len))]),
            Err(rc) => fs(rc),
        }
    }

    /// `{"name", "type", "off", "len"}` → `{"type", "off" (if not 0), "len", "output"}`.
    pub(super) fn fs_hash(&mut self, m: &[(Value, Value)], now: Duration) -> Reply {
        let (Ok(kind), Ok(name), Ok(off), Ok(len)) = (text(m, "type"), text(m, "name"), uint(m, "off"), uint(m, "len")) else { return einval() };
        let (off, len) = (off.unwrap_or(0), len.unwrap_or(u64::MAX));
        let kind = kind.unwrap_or_default();
        let Some(name) = path_ok(name).filter(|_| kind.len() <= TYPE_LEN && len > 0) else { return einval() };
        let kind = if kind.is_empty() { "crc32" } else { kind };
        if kind != "crc32" && kind != "sha256" {
            return fs(fs_err::CHECKSUM_HASH_NOT_FOUND);
        }
        self.expire_file(now);
        let file_len = match self.file_len(name) {
            Ok(l) => l,
            Err(rc) => return fs(rc),
        };
        if file_len <= off {
            return fs(if file_len == 0 { fs_err::FILE_EMPTY } else { fs_err::FILE_OFFSET_LARGER_THAN_FILE });
        }
        let contents = self.fs.read(name).unwrap_or_default();
        let n = len.min(file_len - off) as usize;
        let part = &contents[off as usize..off as usize + n];
        let output = match kind {
            "crc32" => Value::from(CRC32.checksum(part)),
            _ => Value::Bytes(mcuboot::sha256(part).to_vec()),
        };
        let mut body = vec![("type", Value::Text(kind.to_string()))];
        if off != 0 {
            body.push(("off", Value::from(off)));
        }
        body.extend([("len", Value::from(n as u64)), ("output", output)]);
        Reply::Body(body)
    }

    /// The types this build supports: format 0 a number, 1 bytes.
    pub(super) fn fs_types(&mut self, _: &[(Value, Value)], _: Duration) -> Reply {
        let t = |format: u64, size: u64| super::map(vec![("format", Value::from(format)), ("size", Value::from(size))]);
        Reply::Body(vec![("types", super::map(vec![("crc32", t(0, 4)), ("sha256", t(1, 32))]))])
    }

    pub(super) fn fs_close(&mut self, _: &[(Value, Value)], _: Duration) -> Reply {
        self.close_file();
        Reply::Body(vec![])
    }
}
