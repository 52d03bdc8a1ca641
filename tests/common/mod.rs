//! Helpers shared by the integration tests: run `hilbench sim`, talk raw
//! Modbus to a PTY.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sim {
    pub child: Child,
    pub ready: serde_json::Value,
    pub stderr_path: PathBuf,
    /// The lines it printed after the ready line.
    pub lines: std::sync::mpsc::Receiver<String>,
}

/// Starts `hilbench sim ARGS…` and waits (10 s at most) for its ready line.
pub fn start_sim(args: &[&str], dir: &Path) -> Sim {
    let stderr_path = dir.join("sim.stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hilbench"))
        .arg("sim")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("start hilbench sim");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            panic!("no ready line within 10 s; stderr: {}", std::fs::read_to_string(&stderr_path).unwrap_or_default());
        }
    };
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        let _ = child.kill();
        panic!(
            "ready line is not JSON ({e}): {line:?}; stderr: {}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        )
    });
    Sim {
        child,
        ready,
        stderr_path,
        lines: rx,
    }
}

impl Sim {
    /// Waits (`within` at most) for a printed line containing `needle`; earlier lines are skipped.
    pub fn wait_line(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line with {needle:?} within {within:?}"),
            }
        }
    }

    pub fn tty(&self) -> PathBuf {
        PathBuf::from(self.ready["endpoints"]["tty"].as_str().expect("endpoints.tty"))
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(mut self) -> i32 {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("sim did not exit within 5 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw serial client on the PTY (no Modbus library).
pub struct RawPort {
    port: Box<dyn tokio_serial::SerialPort>,
}

impl RawPort {
    pub fn open(path: &Path) -> RawPort {
        let port = tokio_serial::new(path.to_string_lossy(), 9600)
            .timeout(Duration::from_millis(50))
            .open()
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        RawPort { port }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.port.write_all(bytes).unwrap();
    }

    /// Reads until `want` bytes arrived or `timeout` passed.
    pub fn read_up_to(&mut self, want: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        while out.len() < want && Instant::now() < deadline {
            match self.port.read(&mut buf) {
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        out
    }
}

pub fn with_crc(mut v: Vec<u8>) -> Vec<u8> {
    hilbench::protocol::modbus::append_crc(&mut v);
    v
}
