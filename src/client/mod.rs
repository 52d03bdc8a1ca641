//! Client actors: the other side of each protocol. In simulation they prove
//! the devices; on a bench they are the instrument that validates a real one.
//!
//! Every serial client follows the same transaction shape (flush stale
//! input, send the request through the client's link, read until a frame is
//! complete or the deadline passes), so that lives here once.

pub mod ble_central;
pub mod bsc_node;
pub mod bsc_node_core;
pub mod bsc_raw;
pub mod conformance;
pub mod jbd_client;
pub mod jbd_validate;
pub mod legacy;
pub mod modbus_master;
pub mod smp_client;
pub mod smp_validate;
pub mod poller;
pub mod replay_client;
pub mod shelly_ble_rpc;
pub mod shelly_client;
pub mod shelly_rpc;
pub mod shelly_validate;
pub mod sniffer;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::SerialStream;

use crate::link::fault::LinkEngine;
use crate::link::record::Direction;
use crate::protocol::eg4::{self, Eg4Telemetry};
use crate::protocol::modbus::FrameLength;


/// A failed transaction, classified the way a report wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct TransactionError {
    /// timeout | crc | exception | malformed | framing | io
    pub kind: &'static str,
    pub detail: String,
}

impl TransactionError {
    pub fn new(kind: &'static str, detail: impl Into<String>) -> Self {
        TransactionError {
            kind,
            detail: detail.into(),
        }
    }
}

/// A serial port plus the client's link: one request, one reply.
pub struct SerialSession {
    pub port: SerialStream,
    pub link: Rc<RefCell<LinkEngine>>,
    epoch: Instant,
    wall_epoch_ns: u64,
}

/// What `transact` got back.
pub struct Reply {
    pub frame: Vec<u8>,
    /// The request came back in front of the reply (adapter echo).
    pub echoed: bool,
}

impl SerialSession {
    /// `epoch` is the run's start, the time base of the link's stalls.
    pub fn new(port: SerialStream, link: Rc<RefCell<LinkEngine>>, epoch: Instant) -> Self {
        SerialSession {
            port,
            link,
            epoch,
            // Wall time at `epoch`, so captures line up with the bus's.
            wall_epoch_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                .saturating_sub(epoch.elapsed().as_nanos() as u64),
        }
    }

    fn times(&self) -> (u64, u64) {
        let n = self.epoch.elapsed().as_nanos() as u64;
        (n, self.wall_epoch_ns + n)
    }

    /// Discards bytes that arrived after a previous transaction gave up, as
    /// clients do before a new request.
    async fn drain(&mut self) {
        let mut tmp = [0u8; 512];
        // Bounded: a line that never goes quiet must not stall the poll.
        for _ in 0..64 {
            match tokio::time::timeout(Duration::from_micros(1), self.port.read(&mut tmp)).await {
                Ok(Ok(n)) if n > 0 => continue,
                _ => break,
            }
        }
    }

    /// Sends `request` and reads until `frame_len` says a frame is complete
    /// or `timeout` passes. The reply frame passes the link on the way in.
    pub async fn transact(
        &mut self,
        request: &[u8],
        timeout: Duration,
        frame_len: impl Fn(&[u8]) -> FrameLength,
    ) -> Result<Reply, TransactionError> {
        self.drain().await;
        let (now_ns, wall_ns) = self.times();
        let emissions = self.link.borrow_mut().process(Direction::Request, request, now_ns, wall_ns);
        let mut buf: Vec<u8> = Vec::with_capacity(256);
        let start = tokio::time::Instant::now();
        for e in emissions {
            if e.toward == Direction::Response {
                buf.extend_from_slice(&e.bytes); // our own echo
                continue;
            }
            let due = start + e.after;
            if due > tokio::time::Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            self.port
                .write_all(&e.bytes)
                .await
                .map_err(|e| TransactionError::new("io", format!("write failed: {e}")))?;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut echoed = false;
        let mut tmp = [0u8; 512];
        loop {
            // Echo detection assumes the reply differs from the request,
            // true for the reads our pollers send; a Modbus 05/06 reply is
            // a byte-for-byte copy of its request and would be taken for an
            // echo.
            if !echoed && buf.len() >= request.len() && buf.starts_with(request) {
                // RS-485 adapter echo: our request in front of the reply.
                buf.drain(..request.len());
                echoed = true;
            }
            let maybe_echo = !echoed && request.starts_with(&buf) && !buf.is_empty();
            if !maybe_echo {
                match frame_len(&buf) {
                    FrameLength::Complete(n) if buf.len() >= n => {
                        let frame: Vec<u8> = buf.drain(..n).collect();
                        let (now_ns, wall_ns) = self.times();
                        let em = self.link.borrow_mut().process(Direction::Response, &frame, now_ns, wall_ns);
                        // Client-side faults on the reply: take what survives.
                        let mut got: Vec<u8> = Vec::new();
                        for e in em.into_iter().filter(|e| e.toward == Direction::Response) {
                            got.extend(e.bytes);
                        }
                        if got.is_empty() {
                            buf.clear();
                        } else {
                            return Ok(Reply { frame: got, echoed });
                        }
                    }
                    FrameLength::Invalid => {
                        // Not a frame start: a real client reads until its
                        // timeout and reports what it got.
                    }
                    _ => {}
                }
            }
            let r = tokio::time::timeout_at(deadline, self.port.read(&mut tmp)).await;
            match r {
                Err(_) => {
                    return Err(if buf.is_empty() {
                        TransactionError::new("timeout", format!("no reply within {} ms", timeout.as_millis()))
                    } else {
                        TransactionError::new(
                            "framing",
                            format!("incomplete or unrecognised reply after {} ms: {}", timeout.as_millis(), hex(&buf)),
                        )
                    })
                }
                Ok(Ok(0)) => return Err(TransactionError::new("io", "port closed")),
                Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
                Ok(Err(e)) => return Err(TransactionError::new("io", format!("read failed: {e}"))),
            }
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 3);
    for (i, x) in b.iter().take(64).enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!("{x:02X}"));
    }
    if b.len() > 64 {
        s.push_str(&format!(" … ({} bytes)", b.len()));
    }
    s
}

/// A decoded EG4 reading as scenario fields (`soc_pct`, `cell3_mv`, …) and
/// flags (`warning:cell_ov`, `protection:charge_ot`).
pub fn telemetry_fields(t: &Eg4Telemetry) -> (BTreeMap<String, f64>, Vec<String>) {
    let mut v = BTreeMap::new();
    v.insert("pack_v".into(), f64::from(t.pack_mv) / 1000.0);
    v.insert("current_a".into(), f64::from(t.current_ca) / 100.0);
    v.insert("soc_pct".into(), f64::from(t.soc_pct));
    v.insert("soh_pct".into(), f64::from(t.soh_pct));
    v.insert("pcb_temp_c".into(), f64::from(t.pcb_temp_c));
    v.insert("capacity_ah".into(), f64::from(t.capacity_dah) / 10.0);
    v.insert("remaining_ah".into(), f64::from(t.remaining_cah) / 100.0);
    v.insert("cycles".into(), f64::from(t.cycles));
    v.insert("uptime".into(), f64::from(t.uptime));
    v.insert("warnings".into(), f64::from(t.warnings));
    v.insert("protections".into(), f64::from(t.protections));
    v.insert("cell_count".into(), t.cells_mv.len() as f64);
    for (i, c) in t.cells_mv.iter().enumerate() {
        v.insert(format!("cell{}_mv", i + 1), f64::from(*c));
    }
    for (i, c) in t.temps_c.iter().enumerate() {
        v.insert(format!("temp{}_c", i + 1), f64::from(*c));
    }
    let mut flags: Vec<String> = eg4::warning_names(t.warnings)
        .into_iter()
        .map(|n| format!("warning:{n}"))
        .collect();
    flags.extend(eg4::protection_names(t.protections).into_iter().map(|n| format!("protection:{n}")));
    (v, flags)
}
