//! A device's filesystem as Zephyr's VFS shows it over littlefs, in memory:
//! mount points (`/lfs1`), directories and files. Errors are the errno a
//! Zephyr `fs_*` call returns, so each caller maps them as its firmware
//! does. What a write handle writes is [`MemFs::commit`]ted on close, as
//! littlefs makes it visible only then; the caller holds it until.

use std::collections::{BTreeMap, BTreeSet};

/// What a Zephyr `fs_*` call fails with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsErrno {
    /// -EINVAL: not an absolute path, or `/` where a file is meant.
    Inval,
    /// -ENOENT: no mount point, no such file, no parent directory.
    NoEnt,
    /// -EISDIR: a directory where a file is meant.
    IsDir,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsEntry {
    File { size: usize },
    Dir,
}

#[derive(Debug, Clone)]
pub struct MemFs {
    mounts: Vec<String>,
    files: BTreeMap<String, Vec<u8>>,
    dirs: BTreeSet<String>,
}

/// Where a path lands: `/` itself, or a mount and the names under it.
enum Resolved {
    Root,
    InMount { mount: usize, names: Vec<String> },
}

impl MemFs {
    /// Mount points are absolute (`/lfs1`); the first one wins a tie.
    pub fn new(mounts: &[&str]) -> MemFs {
        MemFs { mounts: mounts.iter().map(|m| m.trim_end_matches('/').to_string()).collect(), files: BTreeMap::new(), dirs: BTreeSet::new() }
    }

    /// The longest mount point that is `path` or a parent of it, as
    /// fs_get_mnt_point matches.
    fn resolve(&self, path: &str) -> Result<Resolved, FsErrno> {
        if !path.starts_with('/') {
            return Err(FsErrno::Inval);
        }
        if path.trim_end_matches('/').is_empty() {
            return Ok(Resolved::Root);
        }
        let mount = self
            .mounts
            .iter()
            .enumerate()
            .filter(|(_, m)| path == m.as_str() || path.strip_prefix(m.as_str()).is_some_and(|r| r.starts_with('/')))
            .max_by_key(|(_, m)| m.len())
            .map(|(i, _)| i)
            .ok_or(FsErrno::NoEnt)?;
        let names = path[self.mounts[mount].len()..].split('/').filter(|n| !n.is_empty()).map(str::to_string).collect();
        Ok(Resolved::InMount { mount, names })
    }

    fn key(&self, mount: usize, names: &[String]) -> String {
        let mut k = self.mounts[mount].clone();
        for n in names {
            k.push('/');
            k.push_str(n);
        }
        k
    }

    fn is_dir(&self, mount: usize, names: &[String]) -> bool {
        names.is_empty() || self.dirs.contains(&self.key(mount, names))
    }

    /// fs_stat: `/` and mount roots are directories.
    pub fn stat(&self, path: &str) -> Result<FsEntry, FsErrno> {
        match self.resolve(path)? {
            Resolved::Root => Ok(FsEntry::Dir),
            Resolved::InMount { mount, names } => {
                if let Some(f) = self.files.get(&self.key(mount, &names)) {
                    Ok(FsEntry::File { size: f.len() })
                } else if self.is_dir(mount, &names) {
                    Ok(FsEntry::Dir)
                } else {
                    Err(FsErrno::NoEnt)
                }
            }
        }
    }

    /// A file's committed contents.
    pub fn read(&self, path: &str) -> Result<&[u8], FsErrno> {
        match self.resolve(path)? {
            Resolved::Root => Err(FsErrno::IsDir),
            Resolved::InMount { mount, names } => match self.files.get(&self.key(mount, &names)) {
                Some(f) => Ok(f),
                None if self.is_dir(mount, &names) => Err(FsErrno::IsDir),
                None => Err(FsErrno::NoEnt),
            },
        }
    }

    /// fs_open with FS_O_CREATE | FS_O_WRITE: the file's contents, an empty
    /// file made if there was none (its directory must exist).
    pub fn open_for_write(&mut self, path: &str) -> Result<Vec<u8>, FsErrno> {
        let (mount, names) = match self.resolve(path)? {
            Resolved::Root => return Err(FsErrno::Inval),
            Resolved::InMount { mount, names } => (mount, names),
        };
        if self.is_dir(mount, &names) {
            return Err(FsErrno::IsDir);
        }
        if !self.is_dir(mount, &names[..names.len() - 1]) {
            return Err(FsErrno::NoEnt);
        }
        let key = self.key(mount, &names);
        Ok(self.files.entry(key).or_default().clone())
    }

    /// What a write handle holds becomes the file's contents (close or sync).
    pub fn commit(&mut self, path: &str, contents: Vec<u8>) {
        if let Ok(Resolved::InMount { mount, names }) = self.resolve(path) {
            if !names.is_empty() {
                let key = self.key(mount, &names);
                self.files.insert(key, contents);
            }
        }
    }

    /// A file a scenario puts on the device, its directories made as needed.
    pub fn seed(&mut self, path: &str, contents: Vec<u8>) -> Result<(), String> {
        let (mount, names) = match self.resolve(path) {
            Ok(Resolved::InMount { mount, names }) if !names.is_empty() => (mount, names),
            _ => return Err(format!("`{path}` is not a file path under a mount point ({})", self.mounts.join(", "))),
        };
        for depth in 1..names.len() {
            let dir = self.key(mount, &names[..depth]);
            if self.files.contains_key(&dir) {
                return Err(format!("`{dir}` is a file, so `{path}` cannot be under it"));
            }
            self.dirs.insert(dir);
        }
        let key = self.key(mount, &names);
        if self.dirs.contains(&key) {
            return Err(format!("`{key}` is a directory"));
        }
        self.files.insert(key, contents);
        Ok(())
    }

    pub fn files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_as_zephyrs_vfs_does() {
        let mut fs = MemFs::new(&["/lfs1"]);
        fs.seed("/lfs1/etc/config.txt", b"x=1".to_vec()).unwrap();
        assert_eq!(fs.stat("/"), Ok(FsEntry::Dir));
        assert_eq!(fs.stat("/lfs1"), Ok(FsEntry::Dir));
        assert_eq!(fs.stat("/lfs1/"), Ok(FsEntry::Dir));
        assert_eq!(fs.stat("/lfs1/etc"), Ok(FsEntry::Dir));
        assert_eq!(fs.stat("/lfs1//etc/config.txt"), Ok(FsEntry::File { size: 3 }));
        assert_eq!(fs.stat("/lfs1/nope"), Err(FsErrno::NoEnt));
        assert_eq!(fs.stat("/lfs10/x"), Err(FsErrno::NoEnt));
        assert_eq!(fs.stat("/nope"), Err(FsErrno::NoEnt));
        assert_eq!(fs.stat("lfs1/etc"), Err(FsErrno::Inval));
        assert_eq!(fs.open_for_write("/"), Err(FsErrno::Inval));
        assert_eq!(fs.open_for_write("/lfs1"), Err(FsErrno::IsDir));
        assert_eq!(fs.open_for_write("/lfs1/etc"), Err(FsErrno::IsDir));
        assert_eq!(fs.open_for_write("/lfs1/no/x"), Err(FsErrno::NoEnt));
        assert_eq!(fs.open_for_write("/lfs2/x"), Err(FsErrno::NoEnt));
        assert_eq!(fs.open_for_write("/lfs1/etc/config.txt"), Ok(b"x=1".to_vec()));
        assert_eq!(fs.open_for_write("/lfs1/new"), Ok(Vec::new()));
        assert_eq!(fs.stat("/lfs1/new"), Ok(FsEntry::File { size: 0 }));
        fs.commit("/lfs1/new", b"abc".to_vec());
        assert_eq!(fs.read("/lfs1/new"), Ok(&b"abc"[..]));
        assert!(fs.seed("/lfs1/etc/config.txt/x", vec![]).is_err());
        assert!(fs.seed("/lfs1/etc", vec![]).is_err());
        assert!(fs.seed("/data/x", vec![]).is_err());
    }
}
