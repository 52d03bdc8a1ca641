//! MCUboot's serial recovery (boot_serial.c), the `serial-recovery`
//! profile: the bootloader itself answering on the console, with its
//! limited command set. What differs from Zephyr's mcumgr:
//! - every error is `{"rc": n}`, an upload answer is `{"rc": 0, "off"}`,
//!   a reset answer `{"rc": 0}`; echo answers `{"r"}` alone (and a missing
//!   `d` is rc 3, not an empty echo);
//! - image upload writes straight into the primary slot (keys `image`,
//!   `data`, `len`, `off`; no `sha`, no resume: off 0 starts over and
//!   erases), and the next boot runs what was written, no swap;
//! - state read lists the slots holding a valid image as `{"slot", "hash",
//!   "version"}` (no flags: BOOT_SERIAL_IMG_GRP_IMAGE_STATE is off by
//!   default), and state write is rc 8;
//! - params is `{"buf_size": receive buffer, "buf_count": 1}`; console echo
//!   control (OS 1) is `{"rc": 0}`; everything else is rc 8.
//!
//! The answer keeps the request's header but for its op (MCUboot only
//! increments it), so a v2 request gets a v2 header with v1-style errors.

use std::time::Duration;

use ciborium::Value;

use super::{Reply, SmpEvent, SmpServer, RESET_DELAY};
use crate::model::firmware::PRIMARY;
use crate::protocol::smp::{self, group, MgmtErr, SmpHeader, SmpOp};

/// The upload session boot_serial keeps in statics.
#[derive(Debug, Clone, Default)]
pub(super) struct RecoveryUpload {
    len: usize,
    off: usize,
}

fn rc(code: MgmtErr) -> Reply {
    Reply::Body(vec![("rc", Value::from(code.code()))])
}

impl SmpServer {
    /// A request to the bootloader.
    pub(super) fn recovery_dispatch(&mut self, h: &SmpHeader, payload: &[u8], now: Duration) -> Reply {
        let read = h.smp_op() == Some(SmpOp::Read);
        let m = smp::decode_map(payload).ok();
        match (h.group, h.command, read) {
            (group::OS, 0, _) => match m.as_deref().and_then(|m| smp::get(m, "d")) {
                Some(Value::Text(d)) => Reply::Body(vec![("r", Value::Text(d.clone()))]),
                _ => rc(MgmtErr::Inval),
            },
            (group::OS, 1, _) => rc(MgmtErr::Ok),
            (group::OS, 5, _) => {
                self.reset_at = Some(now + RESET_DELAY);
                self.events.push(SmpEvent::ResetRequested);
                rc(MgmtErr::Ok)
            }
            (group::OS, 6, _) => Reply::Body(vec![("buf_size", Value::from(self.config.buf_size)), ("buf_count", Value::from(1))]),
            (group::IMAGE, 0, true) => self.recovery_list(),
            (group::IMAGE, 1, _) => match m {
                Some(m) => self.recovery_upload(&m),
                None => rc(MgmtErr::Inval),
            },
            _ => rc(MgmtErr::NotSup),
        }
    }

    /// The slots that hold a valid image.
    fn recovery_list(&self) -> Reply {
        let images = (0..2)
            .filter_map(|slot| {
                let img = self.fw.image(slot).filter(|i| i.hash_matches)?;
                Some(smp::map(vec![
                    ("slot", Value::from(slot as u64)),
                    ("hash", Value::Bytes(img.hash.to_vec())),
                    ("version", Value::Text(img.header.version.to_string())),
                ]))
            })
            .collect();
        Reply::Body(vec![("images", Value::Array(images))])
    }

    /// bs_upload: into the primary slot, stop-and-wait, no resume.
    fn recovery_upload(&mut self, m: &[(Value, Value)]) -> Reply {
        let off = smp::get(m, "off").and_then(smp::as_u64).map(|o| o as usize);
        let data = match smp::get(m, "data") {
            Some(Value::Bytes(d)) => d.clone(),
            _ => return rc(MgmtErr::Inval),
        };
        let Some(off) = off else { return rc(MgmtErr::Inval) };
        let slot_size = self.fw.slot_size();
        let mut session = self.recovery.take().unwrap_or_default();
        if off == 0 {
            // A chunk at 0 starts over: the slot is erased whole.
            let Some(len) = smp::get(m, "len").and_then(smp::as_u64).map(|l| l as usize).filter(|l| *l <= slot_size) else {
                self.recovery = Some(session);
                return rc(MgmtErr::Inval);
            };
            self.work += self.config.flash.erase(slot_size);
            self.fw.erase(PRIMARY);
            session = RecoveryUpload { len, off: 0 };
            self.events.push(SmpEvent::UploadStarted { len });
        } else if off != session.off {
            // Success with the offset it wants: the data is dropped.
            let want = session.off;
            self.recovery = Some(session);
            return Reply::Body(vec![("rc", Value::from(0)), ("off", Value::from(want as u64))]);
        } else if session.off + data.len() > session.len {
            self.recovery = Some(session);
            return rc(MgmtErr::Inval);
        }
        // Whole write blocks only, but the image's last bytes.
        let align = self.config.flash_align.max(1);
        let mut take = data.len() - data.len() % align;
        if session.off + data.len() >= session.len {
            take = data.len();
        }
        self.work += self.config.flash.write(take);
        if self.fw.write(PRIMARY, session.off, &data[..take]).is_err() {
            self.recovery = Some(session);
            return rc(MgmtErr::Inval);
        }
        session.off += take;
        let off = session.off;
        if off == session.len {
            let matched = self.fw.image(PRIMARY).map(|i| i.hash_matches);
            self.events.push(SmpEvent::UploadDone { len: off, matched });
        }
        self.recovery = Some(session);
        Reply::Body(vec![("rc", Value::from(0)), ("off", Value::from(off as u64))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::smp_core::{SmpProfile, SmpServerConfig};
    use crate::protocol::mcuboot::{build_image, ImageVersion};
    use crate::protocol::smp::{SmpVersion, HEADER_LEN};

    fn bootloader() -> SmpServer {
        SmpServer::new(SmpServerConfig { profiles: vec![SmpProfile::SerialRecovery], buf_size: 1024, ..Default::default() }).unwrap()
    }

    /// One request; the answer's header and map.
    fn ask(s: &mut SmpServer, version: SmpVersion, op: SmpOp, grp: u16, cmd: u8, body: Vec<(&str, Value)>) -> (SmpHeader, Vec<(Value, Value)>) {
        let payload = smp::encode_map(body);
        let mut m = SmpHeader::new(version, op, grp, cmd, 7, payload.len() as u16).encode().to_vec();
        m.extend(payload);
        let out = s.handle_bytes(&m, Duration::ZERO).pop().expect("an answer");
        (SmpHeader::parse(&out).unwrap(), smp::decode_map(&out[HEADER_LEN..]).unwrap())
    }

    fn rc_of(m: &[(Value, Value)]) -> Option<u64> {
        smp::get(m, "rc").and_then(smp::as_u64)
    }

    #[test]
    fn the_bootloader_answers_its_few_commands_with_rc() {
        let mut s = bootloader();
        // A v2 request keeps its v2 header; errors are bare rc.
        let (h, m) = ask(&mut s, SmpVersion::V2, SmpOp::Write, group::OS, 0, vec![("d", Value::Text("hi".into()))]);
        assert_eq!((h.version, h.op, h.seq), (1, 3, 7));
        assert_eq!(m, vec![(Value::Text("r".into()), Value::Text("hi".into()))], "echo answers r alone");
        assert_eq!(rc_of(&ask(&mut s, SmpVersion::V1, SmpOp::Write, group::OS, 0, vec![]).1), Some(3), "no d: EINVAL");
        assert_eq!(rc_of(&ask(&mut s, SmpVersion::V1, SmpOp::Write, group::OS, 1, vec![]).1), Some(0));
        assert_eq!(rc_of(&ask(&mut s, SmpVersion::V2, SmpOp::Read, group::OS, 8, vec![]).1), Some(8), "no bootloader info");
        assert_eq!(rc_of(&ask(&mut s, SmpVersion::V2, SmpOp::Write, group::IMAGE, 0, vec![("confirm", Value::Bool(true))]).1), Some(8), "no state write");
        assert_eq!(rc_of(&ask(&mut s, SmpVersion::V2, SmpOp::Read, group::STAT, 1, vec![]).1), Some(8));
        let (_, p) = ask(&mut s, SmpVersion::V2, SmpOp::Read, group::OS, 6, vec![]);
        assert_eq!((smp::get(&p, "buf_size").and_then(smp::as_u64), smp::get(&p, "buf_count").and_then(smp::as_u64)), (Some(1024), Some(1)));
        // State read: the valid image's slot, hash and version, no flags.
        let (_, m) = ask(&mut s, SmpVersion::V2, SmpOp::Read, group::IMAGE, 0, vec![]);
        let Some(Value::Array(images)) = smp::get(&m, "images") else { panic!("{m:?}") };
        let Value::Map(e) = &images[0] else { panic!() };
        let keys: Vec<&str> = e.iter().filter_map(|(k, _)| k.as_text()).collect();
        assert_eq!(keys, ["slot", "hash", "version"]);
        assert_eq!(images.len(), 1);
    }

    #[test]
    fn uploads_go_straight_into_the_primary_slot() {
        let mut s = bootloader();
        let image = build_image(ImageVersion { major: 3, ..Default::default() }, &[0x5a; 700]);
        let up = |s: &mut SmpServer, off: usize, data: &[u8], len: Option<usize>| {
            let mut body = vec![("off", Value::from(off as u64)), ("data", Value::Bytes(data.to_vec()))];
            body.extend(len.map(|l| ("len", Value::from(l as u64))));
            let (_, m) = ask(s, SmpVersion::V2, SmpOp::Write, group::IMAGE, 1, body);
            (rc_of(&m), smp::get(&m, "off").and_then(smp::as_u64))
        };
        assert_eq!(up(&mut s, 0, &image[..200], None), (Some(3), None), "no len at offset 0");
        assert_eq!(up(&mut s, 0, &image[..200], Some(image.len())), (Some(0), Some(200)));
        assert_eq!(up(&mut s, 500, &image[500..600], None), (Some(0), Some(200)), "a wrong offset: success with the one it wants");
        assert_eq!(up(&mut s, 200, &image[200..], None), (Some(0), Some(image.len() as u64)));
        assert_eq!(up(&mut s, image.len(), &[1, 2, 3], None), (Some(3), None), "past the announced length: EINVAL");
        // The next boot runs it, no swap.
        assert_eq!(s.firmware().image(PRIMARY).map(|i| i.header.version.major), Some(3));
        let (_, m) = ask(&mut s, SmpVersion::V2, SmpOp::Write, group::OS, 5, vec![]);
        assert_eq!(rc_of(&m), Some(0));
        // Past the data the image announced.
        let mut s = bootloader();
        assert_eq!(up(&mut s, 0, &image[..200], Some(300)), (Some(0), Some(200)));
        assert_eq!(up(&mut s, 200, &image[200..400], None), (Some(3), None), "past len: EINVAL");
    }
}
