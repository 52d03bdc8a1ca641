//! A Zephyr device's settings subsystem: the handlers the application
//! registered (a root name each, e.g. `app` for `app/mode`), their values
//! in RAM, and the values on flash that `settings_load` restores at boot.
//! Each handler here keeps whatever is set under its root, as a plain
//! application's handler does. Errors are the errno Zephyr's
//! `settings_runtime_*` and `settings_delete` return.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingsErrno {
    /// -EINVAL: no handler for the name's root.
    Inval,
    /// -ENOENT: the handler has no such key, or there is no storage.
    NoEnt,
    /// Saving failed: there is no storage backend.
    NoStorage,
}

#[derive(Debug, Clone, Default)]
pub struct Settings {
    roots: BTreeSet<String>,
    ram: BTreeMap<String, Vec<u8>>,
    /// None: the firmware was built without a storage backend.
    flash: Option<BTreeMap<String, Vec<u8>>>,
}

impl Settings {
    /// No handlers and no storage, as Zephyr's smp_svr sample is built.
    pub fn none() -> Settings {
        Settings::default()
    }

    /// Handlers for the roots of `stored`'s names, with those values on
    /// flash and loaded, as after a boot.
    pub fn with_stored(stored: BTreeMap<String, Vec<u8>>) -> Settings {
        let roots = stored.keys().map(|k| root(k).to_string()).collect();
        let mut s = Settings { roots, ram: BTreeMap::new(), flash: Some(stored) };
        s.load();
        s
    }

    fn handled(&self, name: &str) -> bool {
        self.roots.contains(root(name))
    }

    pub fn get(&self, name: &str) -> Result<&[u8], SettingsErrno> {
        if !self.handled(name) {
            return Err(SettingsErrno::Inval);
        }
        self.ram.get(name).map(Vec::as_slice).ok_or(SettingsErrno::NoEnt)
    }

    pub fn set(&mut self, name: &str, value: &[u8]) -> Result<(), SettingsErrno> {
        if !self.handled(name) {
            return Err(SettingsErrno::Inval);
        }
        self.ram.insert(name.to_string(), value.to_vec());
        Ok(())
    }

    /// settings_delete: removes the name from flash (RAM keeps its value
    /// until the next boot).
    pub fn delete(&mut self, name: &str) -> Result<(), SettingsErrno> {
        let flash = self.flash.as_mut().ok_or(SettingsErrno::NoEnt)?;
        flash.remove(name);
        Ok(())
    }

    /// settings_save: every handler's values to flash.
    pub fn save(&mut self) -> Result<(), SettingsErrno> {
        let flash = self.flash.as_mut().ok_or(SettingsErrno::NoStorage)?;
        flash.extend(self.ram.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(())
    }

    /// settings_load: flash values to the handlers that take them.
    pub fn load(&mut self) {
        let Some(flash) = &self.flash else { return };
        let loaded: Vec<_> = flash.iter().filter(|(k, _)| self.roots.contains(root(k))).map(|(k, v)| (k.clone(), v.clone())).collect();
        self.ram.extend(loaded);
    }

    /// A reboot: RAM is lost, then the application loads from flash.
    pub fn reboot(&mut self) {
        self.ram.clear();
        self.load();
    }

    pub fn stored(&self) -> Option<&BTreeMap<String, Vec<u8>>> {
        self.flash.as_ref()
    }
}

/// The handler a name belongs to: its first path element.
fn root(name: &str) -> &str {
    name.split(['/', '=']).next().unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_set_but_not_saved_are_lost_at_reboot() {
        let mut s = Settings::with_stored([("app/mode".to_string(), b"eco".to_vec())].into());
        assert_eq!(s.get("app/mode"), Ok(&b"eco"[..]));
        assert_eq!(s.get("app/other"), Err(SettingsErrno::NoEnt));
        assert_eq!(s.get("bt/name"), Err(SettingsErrno::Inval));
        assert_eq!(s.set("bt/name", b"x"), Err(SettingsErrno::Inval));
        s.set("app/mode", b"boost").unwrap();
        s.set("app/level", b"3").unwrap();
        s.reboot();
        assert_eq!(s.get("app/mode"), Ok(&b"eco"[..]));
        assert_eq!(s.get("app/level"), Err(SettingsErrno::NoEnt));
        s.set("app/level", b"3").unwrap();
        s.save().unwrap();
        s.delete("app/mode").unwrap();
        assert_eq!(s.get("app/mode"), Ok(&b"eco"[..]), "deleting touches flash only");
        s.reboot();
        assert_eq!((s.get("app/mode"), s.get("app/level")), (Err(SettingsErrno::NoEnt), Ok(&b"3"[..])));
    }

    #[test]
    fn without_storage_nothing_is_handled_or_saved() {
        let mut s = Settings::none();
        assert_eq!(s.get("app/x"), Err(SettingsErrno::Inval));
        assert_eq!(s.delete("app/x"), Err(SettingsErrno::NoEnt));
        assert_eq!(s.save(), Err(SettingsErrno::NoStorage));
    }
}
