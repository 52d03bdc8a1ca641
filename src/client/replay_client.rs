//! `capture replay`'s I/O half: a fixture's captured requests sent, one exchange at a
//! time, to a live device (a real one on a serial adapter or the network, or a
//! simulator), and what comes back collected for [`crate::scenario::against`] to hold
//! against the capture.
//!
//! An answer is complete when as many bytes (serial) or datagrams (UDP) as the capture
//! holds have come and the line then stays quiet for the quiet time (so trailing extra
//! bytes are caught), or when the answer timeout passes. An exchange the captured device
//! left unanswered therefore takes the whole timeout: silence is proved by waiting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::link::recognise::CaptureTransport;
use crate::scenario::against::{cut_like, Exchange, ReplayClientReport, ReplayScript};

/// Where the requests go.
#[derive(Debug, Clone)]
pub enum ReplayTarget {
    /// A serial port or one of our PTYs.
    Tty { path: PathBuf, baud: u32 },
    /// A UDP server (an SMP server's port).
    Udp(SocketAddr),
}

impl ReplayTarget {
    /// The transport a fixture must hold to be sent here.
    pub fn transport(&self) -> CaptureTransport {
        match self {
            ReplayTarget::Tty { .. } => CaptureTransport::Serial,
            ReplayTarget::Udp(_) => CaptureTransport::Udp,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ReplayTarget::Tty { path, baud } => format!("{} ({baud} baud)", path.display()),
            ReplayTarget::Udp(a) => format!("udp {a}"),
        }
    }
}

/// How long an answer is waited for.
#[derive(Debug, Clone, Copy)]
pub struct AnswerWindow {
    /// From the request sent to the answer's end, at most.
    pub timeout: Duration,
    /// Silence that ends an answer once the captured amount has come.
    pub quiet: Duration,
}

/// Most bytes kept from one answer (a device that never stops talking is cut here).
const MAX_ANSWER: usize = 65_536;

/// Sends every exchange of `script` to `target` in order and records each answer in
/// `report`; `progress` is told after each exchange. Errors: the target cannot be opened,
/// or a request cannot be sent.
pub fn run(script: &ReplayScript, target: &ReplayTarget, window: AnswerWindow, report: &mut ReplayClientReport, mut progress: impl FnMut(usize)) -> Result<(), String> {
    if script.transport != target.transport() {
        return Err(format!(
            "the fixture holds {} frames; {} takes {} ones{}",
            script.transport.as_str(),
            target.describe(),
            target.transport().as_str(),
            match script.transport {
                CaptureTransport::BleAtt | CaptureTransport::WebSocket | CaptureTransport::Http => " (BLE, HTTP and WebSocket fixtures cannot be replayed as the client yet)",
                _ => "",
            }
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async {
        let mut line = Line::open(target).await?;
        for (i, ex) in script.exchanges.iter().enumerate() {
            let live = line.exchange(ex, window).await?;
            report.record(script, i, &live);
            progress(i + 1);
        }
        Ok(())
    })
}

/// An open target.
enum Line {
    Serial(tokio_serial::SerialStream),
    Udp(tokio::net::UdpSocket),
}

impl Line {
    async fn open(target: &ReplayTarget) -> Result<Line, String> {
        match target {
            ReplayTarget::Tty { path, baud } => crate::transport::serial::open_serial(path, *baud).map(Line::Serial).map_err(|e| e.to_string()),
            ReplayTarget::Udp(addr) => {
                let any: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
                let sock = tokio::net::UdpSocket::bind(any).await.map_err(|e| format!("udp: cannot bind a local port: {e}"))?;
                sock.connect(addr).await.map_err(|e| format!("udp {addr}: {e}"))?;
                Ok(Line::Udp(sock))
            }
        }
    }

    /// Sends `ex`'s request and returns the answer, one entry per frame.
    async fn exchange(&mut self, ex: &Exchange, w: AnswerWindow) -> Result<Vec<Vec<u8>>, String> {
        let sent = Instant::now();
        let deadline = sent + w.timeout;
        match self {
            Line::Serial(port) => {
                port.write_all(&ex.request).await.map_err(|e| format!("cannot send fixture frame {}: {e}", ex.frame))?;
                let expected = ex.answer_len();
                let mut got = Vec::new();
                let mut last = sent;
                let mut buf = [0u8; 1024];
                while got.len() < MAX_ANSWER {
                    let until = if expected > 0 && got.len() >= expected { (last + w.quiet).min(deadline) } else { deadline };
                    match tokio::time::timeout_at(until, port.read(&mut buf)).await {
                        Err(_) | Ok(Ok(0)) => break,
                        Ok(Ok(n)) => {
                            got.extend_from_slice(&buf[..n]);
                            last = Instant::now();
                        }
                        // A PTY whose other side closed reads EIO: the device is gone.
                        Ok(Err(e)) => return Err(format!("reading the answer to fixture frame {}: {e}", ex.frame)),
                    }
                }
                Ok(cut_like(&ex.answers, &got))
            }
            Line::Udp(sock) => {
                sock.send(&ex.request).await.map_err(|e| format!("cannot send fixture frame {}: {e}", ex.frame))?;
                let mut got = Vec::new();
                let mut last = sent;
                let mut buf = vec![0u8; 65_536];
                while got.len() < 1024 {
                    let until = if !ex.answers.is_empty() && got.len() >= ex.answers.len() { (last + w.quiet).min(deadline) } else { deadline };
                    match tokio::time::timeout_at(until, sock.recv(&mut buf)).await {
                        Err(_) => break,
                        Ok(Ok(n)) => {
                            got.push(buf[..n].to_vec());
                            last = Instant::now();
                        }
                        // ICMP port unreachable: nothing listens there; the answer is silence.
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            tracing::warn!("fixture frame {}: the target refused the datagram (nothing listens there?)", ex.frame);
                            break;
                        }
                        Ok(Err(e)) => return Err(format!("reading the answer to fixture frame {}: {e}", ex.frame)),
                    }
                }
                Ok(got)
            }
        }
    }
}
