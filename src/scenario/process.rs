//! External processes: the production client under test. Started with
//! templated arguments, watched for a ready line, its output kept for the
//! report, and always killed and reaped when the scenario ends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::spec::ProcessSpec;

#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    pub name: String,
    pub command: String,
    pub exit_code: Option<i32>,
    /// Killed by us at the end of the scenario (it was still running).
    pub killed: bool,
    /// Killed because it outlived its `timeout`.
    pub timed_out: bool,
    pub output: Vec<String>,
}

pub struct RunningProcess {
    pub name: String,
    pub command_line: String,
    child: Child,
    pub output: Arc<Mutex<Vec<String>>>,
    exit: Option<i32>,
    timed_out: Arc<std::sync::atomic::AtomicBool>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
}

/// Replaces `{{key}}` placeholders; an unknown placeholder is an error that
/// lists the known ones.
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed `{{{{` in `{template}`"))?;
        let key = after[..end].trim();
        let val = vars.get(key).ok_or_else(|| {
            format!(
                "unknown placeholder `{{{{{key}}}}}` in `{template}` (known: {})",
                vars.keys().map(|k| format!("{{{{{k}}}}}")).collect::<Vec<_>>().join(", ")
            )
        })?;
        out.push_str(val);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

impl RunningProcess {
    pub async fn start(spec: &ProcessSpec, vars: &BTreeMap<String, String>, base_dir: &Path) -> Result<Self, String> {
        let command = render(&spec.command, vars)?;
        let args = spec
            .args
            .iter()
            .map(|a| render(a, vars))
            .collect::<Result<Vec<_>, _>>()?;
        let mut cmd = Command::new(&command);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group, so we can kill what it spawns too.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches nothing of ours.
        // It dies with the run even when the run is killed with SIGKILL.
        let run_pid = std::process::id();
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // The run died before prctl took effect: nobody will signal us.
                if libc::getppid() as u32 != run_pid {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let cwd: PathBuf = match &spec.cwd {
            Some(c) => base_dir.join(render(&c.to_string_lossy(), vars)?),
            None => std::env::current_dir().map_err(|e| e.to_string())?,
        };
        cmd.current_dir(&cwd);
        for (k, v) in &spec.env {
            cmd.env(k, render(v, vars)?);
        }
        let command_line = std::iter::once(command.clone()).chain(args.iter().cloned()).collect::<Vec<_>>().join(" ");
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("process `{}`: cannot start `{}` in {}: {e}", spec.name, command, cwd.display()))?;
        let output = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let o = output.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    o.lock().unwrap_or_else(|p| p.into_inner()).push(l);
                }
            });
        }
        if let Some(err) = child.stderr.take() {
            let o = output.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    o.lock().unwrap_or_else(|p| p.into_inner()).push(format!("[stderr] {l}"));
                }
            });
        }
        let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchdog = match (spec.timeout, child.id()) {
            (Some(limit), Some(pid)) => {
                let flag = timed_out.clone();
                Some(tokio::spawn(async move {
                    tokio::time::sleep(limit.0).await;
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    let pgid = nix::unistd::Pid::from_raw(-(pid as i32));
                    let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
                }))
            }
            _ => None,
        };
        Ok(RunningProcess {
            name: spec.name.clone(),
            command_line,
            child,
            output,
            exit: None,
            timed_out,
            watchdog,
        })
    }

    pub fn has_line(&self, needle: &str) -> bool {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Exit code if it has exited (signals count as -signal).
    pub fn poll_exit(&mut self) -> Option<i32> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                use std::os::unix::process::ExitStatusExt;
                self.exit = Some(status.code().unwrap_or_else(|| -status.signal().unwrap_or(0)));
            }
        }
        self.exit
    }

    pub fn tail(&self, n: usize) -> Vec<String> {
        let o = self.output.lock().unwrap_or_else(|p| p.into_inner());
        o[o.len().saturating_sub(n)..].to_vec()
    }

    pub fn timed_out(&self) -> bool {
        self.timed_out.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// SIGTERM to the group, a grace period, then SIGKILL; always reaped.
    pub async fn stop(mut self) -> ProcessReport {
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
        let mut killed = false;
        if self.poll_exit().is_none() {
            killed = true;
            if let Some(pid) = self.child.id() {
                let pgid = nix::unistd::Pid::from_raw(-(pid as i32));
                let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGTERM);
                if tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await.is_err() {
                    let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
                    let _ = self.child.wait().await;
                }
            }
            let _ = self.child.wait().await;
            self.poll_exit();
        }
        // Let the reader tasks drain what the process wrote last.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let output = self.output.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let timed_out = self.timed_out();
        ProcessReport {
            name: self.name,
            command: self.command_line,
            exit_code: self.exit,
            killed: killed || timed_out,
            timed_out,
            output,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let mut v = BTreeMap::new();
        v.insert("port.a".to_string(), "/tmp/a".to_string());
        assert_eq!(render("--port={{port.a}}", &v).unwrap(), "--port=/tmp/a");
        assert!(render("{{port.b}}", &v).unwrap_err().contains("{{port.a}}"));
        assert!(render("{{port.a", &v).is_err());
    }
}
