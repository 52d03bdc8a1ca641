//! An SMP client connection over UDP or a serial port (console framing):
//! one request out, its answer back, with the header checks a strict client
//! makes. What the answer means is the caller's (`smp_validate`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

use crate::protocol::smp::{self, SmpFrame, SmpHeader, SmpOp, SmpVersion};

/// Where the SMP server is.
#[derive(Debug, Clone)]
pub enum SmpTarget {
    Udp(SocketAddr),
    /// A serial port with Zephyr's console framing.
    Tty { path: PathBuf, baud: u32 },
}

impl std::fmt::Display for SmpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SmpTarget::Udp(a) => write!(f, "udp {a}"),
            SmpTarget::Tty { path, baud } => write!(f, "serial {} at {baud} baud", path.display()),
        }
    }
}

/// Why an exchange gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeError {
    /// Nothing came in time.
    Timeout(Duration),
    /// The transport failed (socket, port).
    Io(String),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Timeout(d) => write!(f, "no answer within {} ms", d.as_millis()),
            ExchangeError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// One request and what came back for it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub request: SmpHeader,
    pub answer: SmpFrame,
    pub rtt: Duration,
    /// Answers with another seq that came first (late ones), skipped.
    pub skipped: usize,
}

impl Exchange {
    /// The version bits the request was sent with.
    pub fn request_version(&self) -> u8 {
        self.request.version
    }

    /// What is wrong with the answer's header for this request, if anything:
    /// version, op, group, seq, command and length must all match.
    pub fn header_problem(&self) -> Option<String> {
        self.problem(false)
    }

    /// [`Exchange::header_problem`], except a v2 request answered in v1,
    /// which firmware from before SMP v2 does and clients accept.
    pub fn header_problem_besides_v1(&self) -> Option<String> {
        self.problem(true)
    }

    fn problem(&self, v1_answer_ok: bool) -> Option<String> {
        let (q, a) = (&self.request, &self.answer.header);
        let want_op = q.smp_op().and_then(SmpOp::response).map(SmpOp::bits);
        let mut wrong = Vec::new();
        if a.version != q.version && !(v1_answer_ok && (q.version, a.version) == (1, 0)) {
            wrong.push(format!("version {} (asked in {})", a.version, q.version));
        }
        if Some(a.op) != want_op {
            wrong.push(format!("op {} (want {})", a.op, want_op.unwrap_or(0)));
        }
        if a.group != q.group {
            wrong.push(format!("group {} (asked {})", a.group, q.group));
        }
        if a.command != q.command {
            wrong.push(format!("command {} (asked {})", a.command, q.command));
        }
        if usize::from(a.len) != self.answer.payload.len() {
            wrong.push(format!("length {} for {} payload bytes", a.len, self.answer.payload.len()));
        }
        (!wrong.is_empty()).then(|| wrong.join(", "))
    }
}

enum Io {
    Udp { sock: UdpSocket, to: SocketAddr },
    Serial { port: tokio_serial::SerialStream, rx: smp::serial::Receiver, line: Vec<u8>, text: Vec<String> },
}

/// A connection to one SMP server.
pub struct SmpConn {
    io: Io,
    seq: u8,
    pub timeout: Duration,
}

/// Console text lines kept for the report (a serial console also prints logs).
const TEXT_KEPT: usize = 64;

impl SmpConn {
    pub async fn connect(target: &SmpTarget, timeout: Duration) -> Result<SmpConn, String> {
        let io = match target {
            SmpTarget::Udp(to) => {
                let local: SocketAddr = if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
                let sock = UdpSocket::bind(local).await.map_err(|e| format!("cannot open a UDP socket: {e}"))?;
                Io::Udp { sock, to: *to }
            }
            SmpTarget::Tty { path, baud } => {
                let port = crate::transport::serial::open_serial(path, *baud).map_err(|e| e.to_string())?;
                Io::Serial { port, rx: smp::serial::Receiver::new(), line: Vec::new(), text: Vec::new() }
            }
        };
        Ok(SmpConn { io, seq: 0, timeout })
    }

    /// Console text lines seen on a serial port (not SMP), oldest first.
    pub fn console_text(&self) -> &[String] {
        match &self.io {
            Io::Serial { text, .. } => text,
            Io::Udp { .. } => &[],
        }
    }

    /// Sends one request and waits for the answer with its seq (answers
    /// with another seq are late ones: skipped and counted).
    pub async fn exchange(&mut self, version: SmpVersion, op: SmpOp, group: u16, command: u8, payload: Vec<u8>) -> Result<Exchange, ExchangeError> {
        self.seq = self.seq.wrapping_add(1);
        let request = SmpHeader::new(version, op, group, command, self.seq, payload.len() as u16);
        let mut msg = request.encode().to_vec();
        msg.extend_from_slice(&payload);
        let started = Instant::now();
        self.send(&msg).await?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut skipped = 0;
        loop {
            let got = tokio::time::timeout_at(deadline, self.receive()).await.map_err(|_| ExchangeError::Timeout(self.timeout))??;
            let Ok(answer) = SmpFrame::parse(&got) else { continue };
            if answer.header.seq != request.seq {
                skipped += 1;
                continue;
            }
            return Ok(Exchange { request, answer, rtt: started.elapsed(), skipped });
        }
    }

    async fn send(&mut self, msg: &[u8]) -> Result<(), ExchangeError> {
        match &mut self.io {
            Io::Udp { sock, to } => sock.send_to(msg, *to).await.map(|_| ()).map_err(|e| ExchangeError::Io(format!("sending to {to}: {e}"))),
            Io::Serial { port, .. } => {
                let lines = smp::serial::encode(msg, smp::serial::MAX_LINE);
                port.write_all(&lines).await.map_err(|e| ExchangeError::Io(format!("writing the serial port: {e}")))
            }
        }
    }

    /// The next whole SMP message from the server.
    async fn receive(&mut self) -> Result<Vec<u8>, ExchangeError> {
        match &mut self.io {
            Io::Udp { sock, .. } => {
                let mut buf = vec![0u8; 65_536];
                let (n, _) = sock.recv_from(&mut buf).await.map_err(|e| ExchangeError::Io(format!("receiving: {e}")))?;
                buf.truncate(n);
                Ok(buf)
            }
            Io::Serial { port, rx, line, text } => loop {
                while let Some(end) = line.iter().position(|b| *b == b'\n') {
                    let l: Vec<u8> = line.drain(..=end).collect();
                    match rx.push_line(&l) {
                        smp::serial::LineOutcome::Message(m) => return Ok(m),
                        smp::serial::LineOutcome::Text if text.len() < TEXT_KEPT => text.push(String::from_utf8_lossy(&l).trim_end().to_string()),
                        _ => {}
                    }
                }
                let mut buf = [0u8; 512];
                let n = port.read(&mut buf).await.map_err(|e| ExchangeError::Io(format!("reading the serial port: {e}")))?;
                if n == 0 {
                    return Err(ExchangeError::Io("the serial port closed".into()));
                }
                line.extend_from_slice(&buf[..n]);
                // A line that never ends is not SMP; keep memory bounded.
                if line.len() > 4096 {
                    line.clear();
                }
            },
        }
    }
}
