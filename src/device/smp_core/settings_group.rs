//! The settings group (3) as Zephyr 4.4's settings_mgmt answers, over the
//! device's [`Settings`](crate::model::settings::Settings): read and write
//! (command 0), delete (1), commit (2), load and save (3). Names are at
//! most 31 bytes, values read at most 32 (the Kconfig defaults).

use std::time::Duration;

use ciborium::Value;

use super::args::{bytes, text, uint};
use super::{Reply, SmpServer};
use crate::model::settings::SettingsErrno;
use crate::protocol::smp::{group, MgmtErr};

/// settings_mgmt's error numbers (settings_mgmt.h).
pub(super) mod settings_err {
    pub const KEY_TOO_LONG: u16 = 2;
    pub const KEY_NOT_FOUND: u16 = 3;
    pub const ROOT_KEY_NOT_FOUND: u16 = 5;
    /// What Zephyr 4.4 answers when settings_save fails (no storage backend).
    pub const SAVE_FAILED: u16 = 8;
}

/// CONFIG_MCUMGR_GRP_SETTINGS_NAME_LEN: a name must be shorter.
const NAME_LEN: usize = 32;
/// CONFIG_MCUMGR_GRP_SETTINGS_VALUE_LEN: the most a read returns.
const VALUE_LEN: u64 = 32;

fn settings(rc: u16) -> Reply {
    Reply::Group(group::SETTINGS, rc)
}

fn errno(e: SettingsErrno) -> Reply {
    settings(match e {
        SettingsErrno::Inval => settings_err::ROOT_KEY_NOT_FOUND,
        SettingsErrno::NoEnt => settings_err::KEY_NOT_FOUND,
        SettingsErrno::NoStorage => settings_err::SAVE_FAILED,
    })
}

/// The `name` every command needs: text, not empty (else EINVAL), shorter
/// than NAME_LEN (else group error 2).
fn name(m: &[(Value, Value)]) -> Result<&str, Reply> {
    match text(m, "name") {
        Ok(Some(n)) if !n.is_empty() && n.len() < NAME_LEN => Ok(n),
        Ok(Some(n)) if !n.is_empty() => Err(settings(settings_err::KEY_TOO_LONG)),
        _ => Err(Reply::Rc(MgmtErr::Inval)),
    }
}

impl SmpServer {
    /// `{"name", "max_size"}` → `{"val"}` (and `"max_size": 32` when more was asked).
    pub(super) fn settings_read(&mut self, m: &[(Value, Value)], _: Duration) -> Reply {
        let max = match uint(m, "max_size") {
            Ok(x) if x.is_none_or(|x| x <= u64::from(u32::MAX)) => x.unwrap_or(VALUE_LEN),
            _ => return Reply::Rc(MgmtErr::Inval),
        };
        let name = match name(m) {
            Ok(n) => n,
            Err(r) => return r,
        };
        let limited = max > VALUE_LEN;
        match self.settings.get(name) {
            Ok(v) => {
                let v = v[..v.len().min(max.min(VALUE_LEN) as usize)].to_vec();
                let mut body = vec![("val", Value::Bytes(v))];
                if limited {
                    body.push(("max_size", Value::from(VALUE_LEN)));
                }
                Reply::Body(body)
            }
            Err(e) => errno(e),
        }
    }

    /// `{"name", "val"}` → `{}`.
    pub(super) fn settings_write(&mut self, m: &[(Value, Value)], _: Duration) -> Reply {
        let Ok(value) = bytes(m, "val") else { return Reply::Rc(MgmtErr::Inval) };
        let name = match name(m) {
            Ok(n) => n.to_string(),
            Err(r) => return r,
        };
        match self.settings.set(&name, value.unwrap_or_default()) {
            Ok(()) => Reply::Body(vec![]),
            Err(e) => errno(e),
        }
    }

    pub(super) fn settings_delete(&mut self, m: &[(Value, Value)], _: Duration) -> Reply {
        let name = match name(m) {
            Ok(n) => n.to_string(),
            Err(r) => return r,
        };
        match self.settings.delete(&name) {
            Ok(()) => Reply::Body(vec![]),
            Err(e) => errno(e),
        }
    }

    pub(super) fn settings_commit(&mut self, _: &[(Value, Value)], _: Duration) -> Reply {
        Reply::Body(vec![])
    }

    pub(super) fn settings_load(&mut self, _: &[(Value, Value)], _: Duration) -> Reply {
        self.settings.load();
        Reply::Body(vec![])
    }

    pub(super) fn settings_save(&mut self, _: &[(Value, Value)], _: Duration) -> Reply {
        match self.settings.save() {
            Ok(()) => Reply::Body(vec![]),
            Err(e) => errno(e),
        }
    }
}
