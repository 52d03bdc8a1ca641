//! What `hilbench run` does when it is told to stop. On SIGTERM or SIGINT
//! the running scenario ends as a failure marked interrupted, its teardown
//! stops every process group it started and removes its PTYs and folder,
//! no further scenario starts, and the partial report is written. Against
//! SIGKILL, which nothing can catch, children die with the run
//! (PR_SET_PDEATHSIG) and the next run removes the folders a killed run
//! left behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// The signal that asked the run to stop, or 0.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: nothing else is safe in a signal handler.
    INTERRUPTED.store(sig, Ordering::SeqCst);
}

/// Catches SIGTERM and SIGINT for the rest of the process.
pub fn install() -> Result<(), String> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.map_err(|e| format!("cannot catch {sig}: {e}"))?;
    }
    Ok(())
}

/// The signal that interrupted the run, if one did.
pub fn signal() -> Option<i32> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The signal's name, for reports.
pub fn name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str().to_string()).unwrap_or_else(|_| format!("signal {sig}"))
}

/// Resolves once the run is interrupted (checked every 50 ms: a handler
/// can only set a flag).
pub async fn interrupted() -> i32 {
    loop {
        if let Some(s) = signal() {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where a run keeps its per-scenario folders: `hilbench-run-<pid>-…` in
/// the temporary directory, so a later run can tell whose they are.
pub fn folder_prefix() -> String {
    format!("hilbench-run-{}-", std::process::id())
}

/// Removes the folders of runs whose process is gone (killed with
/// SIGKILL); returns what it removed.
pub fn remove_stale_folders(tmp: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(tmp) else { return Vec::new() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix("hilbench-run-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = pid == std::process::id() as i32 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive && std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_folders_of_dead_runs_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        // A pid that cannot exist (above pid_max), this process's, and an unrelated folder.
        let dead = tmp.path().join("hilbench-run-2147483646-abc");
        let mine = tmp.path().join(format!("{}abc", folder_prefix()));
        let other = tmp.path().join("hilbench-air-123");
        for d in [&dead, &mine, &other] {
            std::fs::create_dir_all(d.join("inner")).unwrap();
        }
        assert_eq!(remove_stale_folders(tmp.path()), vec![dead.clone()]);
        assert!(!dead.exists() && mine.exists() && other.exists());
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
    }
}
