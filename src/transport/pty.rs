//! A pseudo-terminal pair in raw mode. The simulator owns the master side;
//! the slave side is what a client opens, exposed at a stable path (a
//! symlink the user names) because `/dev/pts/N` changes every run.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::termios::{self, SetArg};
use tokio::io::unix::AsyncFd;

use super::TransportError;

/// One PTY pair. Dropping it closes both sides and removes the symlink.
#[derive(Debug)]
pub struct PtyPort {
    master: AsyncFd<OwnedFd>,
    /// Held open so the master never sees EIO/HUP between two clients: a
    /// real serial adapter does not vanish when a program closes it.
    _slave: OwnedFd,
    slave_path: PathBuf,
    link: Option<PathBuf>,
}

impl PtyPort {
    /// Opens a PTY pair; with `link`, makes `link` a symlink to the slave.
    /// A `link` that exists and is not a dangling symlink is refused (it is
    /// someone else's file or a live simulator's port).
    pub fn open(link: Option<&Path>) -> Result<Self, TransportError> {
        if let Some(l) = link {
            check_link_path(l)?;
        }
        let pty = nix::pty::openpty(None, None).map_err(|e| TransportError::Pty(e.to_string()))?;
        let mut t = termios::tcgetattr(&pty.slave).map_err(|e| TransportError::Pty(e.to_string()))?;
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &t)
            .map_err(|e| TransportError::Pty(e.to_string()))?;
        let mut mt = termios::tcgetattr(&pty.master).map_err(|e| TransportError::Pty(e.to_string()))?;
        termios::cfmakeraw(&mut mt);
        termios::tcsetattr(&pty.master, SetArg::TCSANOW, &mt)
            .map_err(|e| TransportError::Pty(e.to_string()))?;
        let flags = fcntl(pty.master.as_raw_fd(), FcntlArg::F_GETFL)
            .map_err(|e| TransportError::Pty(e.to_string()))?;
        fcntl(
            pty.master.as_raw_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(|e| TransportError::Pty(e.to_string()))?;
        let slave_path = nix::unistd::ttyname(&pty.slave).map_err(|e| TransportError::Pty(e.to_string()))?;
        if let Some(l) = link {
            if l.symlink_metadata().is_ok() {
                // Dangling symlink left by a killed run: replace it.
                let _ = std::fs::remove_file(l);
            }
            std::os::unix::fs::symlink(&slave_path, l).map_err(|e| TransportError::Path {
                path: l.to_path_buf(),
                reason: format!("cannot create symlink: {e}"),
            })?;
        }
        // SAFETY: `pty.master` is an OwnedFd created above and moved into the
        // AsyncFd, which is its only owner until drop; nothing else closes it.
        // Readable only: writes never wait (try_write), and an EPOLLOUT
        // wake-up each time the client drains its side costs a context
        // switch per request.
        let master = unsafe { AsyncFd::register_with_interest(pty.master, tokio::io::Interest::READABLE) }
            .map_err(|e| TransportError::Pty(format!("cannot register the PTY with the reactor: {e}")))?;
        Ok(PtyPort {
            master,
            _slave: pty.slave,
            slave_path,
            link: link.map(Path::to_path_buf),
        })
    }

    /// The path a client opens: the symlink if one was asked for.
    pub fn path(&self) -> &Path {
        self.link.as_deref().unwrap_or(&self.slave_path)
    }

    pub fn slave_path(&self) -> &Path {
        &self.slave_path
    }

    /// Reads what a client wrote. Never returns 0 bytes: the slave is held
    /// open, so the master does not see end-of-file.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => {
                    // A short read drained the PTY: skip the extra read that
                    // would only return EAGAIN.
                    if n < buf.len() {
                        guard.clear_ready();
                    }
                    return Ok(n);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes without waiting. Returns how many bytes the PTY took; fewer
    /// than asked means its buffer is full (nobody is reading the slave).
    pub fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        match nix::unistd::write(self.master.get_ref(), bytes) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}

impl PtyPort {
    /// Removes the symlink now (also done on drop), for shutdown paths
    /// where other holders of the port may outlive the owner.
    pub fn remove_link(&self) {
        if let Some(l) = &self.link {
            if std::fs::read_link(l).ok().as_deref() == Some(self.slave_path.as_path()) {
                let _ = std::fs::remove_file(l);
            }
        }
    }
}

impl Drop for PtyPort {
    fn drop(&mut self) {
        if let Some(l) = &self.link {
            // Only remove the link if it still points at our slave, so a
            // second simulator that took the name over keeps its link.
            if std::fs::read_link(l).ok().as_deref() == Some(self.slave_path.as_path()) {
                let _ = std::fs::remove_file(l);
            }
        }
    }
}

fn check_link_path(l: &Path) -> Result<(), TransportError> {
    let err = |reason: String| TransportError::Path {
        path: l.to_path_buf(),
        reason,
    };
    match l.parent() {
        Some(p) if !p.as_os_str().is_empty() && !p.is_dir() => {
            return Err(err(format!("directory {} does not exist", p.display())));
        }
        _ => {}
    }
    match l.symlink_metadata() {
        Err(_) => Ok(()),
        Ok(m) if m.file_type().is_symlink() => {
            if l.exists() && !outlived_its_target(&m, l) {
                Err(err(format!(
                    "already in use: it links to {} (is another simulator running?)",
                    std::fs::read_link(l).map(|p| p.display().to_string()).unwrap_or_default()
                )))
            } else {
                Ok(())
            }
        }
        Ok(_) => Err(err("already exists and is not a symlink; refusing to replace it".into())),
    }
}

/// A link left by a simulator that was killed (SIGKILL, a crash) can point
/// at a `/dev/pts/N` that another program has opened since: the target
/// exists, but the link is older than it. A live simulator makes its link
/// after opening its PTY, so its link is never older than the PTY node.
fn outlived_its_target(link: &std::fs::Metadata, path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(target) = std::fs::metadata(path) else { return false };
    let made = (link.mtime(), link.mtime_nsec());
    let target_made = (target.ctime(), target.ctime_nsec());
    target.file_type().is_char_device() && made < target_made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn symlink_created_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let l = dir.path().join("tty");
        let p = PtyPort::open(Some(&l)).unwrap();
        assert!(std::fs::read_link(&l).unwrap().starts_with("/dev/pts"));
        assert!(matches!(PtyPort::open(Some(&l)), Err(TransportError::Path { .. })));
        drop(p);
        assert!(l.symlink_metadata().is_err());
    }

    #[tokio::test]
    async fn a_stale_link_to_a_reused_pts_is_replaced() {
        use nix::sys::stat::{utimensat, UtimensatFlags};
        use nix::sys::time::TimeSpec;
        let dir = tempfile::tempdir().unwrap();
        let l = dir.path().join("tty");
        // Another program's terminal now holds the pts the link names.
        let other = nix::pty::openpty(None, None).unwrap();
        let pts = nix::unistd::ttyname(&other.slave).unwrap();
        std::os::unix::fs::symlink(&pts, &l).unwrap();
        // The link was left before that pts was opened (a killed simulator's).
        let old = TimeSpec::new(1_000_000, 0);
        utimensat(None, &l, &old, &old, UtimensatFlags::NoFollowSymlink).unwrap();
        let p = PtyPort::open(Some(&l)).expect("a stale link is replaced");
        assert_ne!(std::fs::read_link(&l).unwrap(), pts, "the link names the new PTY");
        // A live simulator's link (made after its PTY) is still refused.
        assert!(matches!(PtyPort::open(Some(&l)), Err(TransportError::Path { .. })));
        drop(p);
    }

    #[tokio::test]
    async fn refuses_missing_dir_and_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(PtyPort::open(Some(&dir.path().join("nope/tty"))).is_err());
        let f = dir.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        let e = PtyPort::open(Some(&f)).unwrap_err().to_string();
        assert!(e.contains("not a symlink"), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
    }
}
