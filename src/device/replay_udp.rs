//! The `replay` device on UDP: a [`ReplayCore`] behind a socket, one datagram per
//! frame, as an SMP server answers on its port. Each sender is a peer of its own; the
//! answers the capture holds after a matched request go back to that sender, with the
//! captured kind's rule applied (SMP: the live sequence number echoed), at once or, with
//! the timing kept, as late as they came in the capture.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::sync::oneshot;

use super::replay_core::{ReplayCore, ReplayEvent};
use super::served::Served;
use crate::limits::LogEvery;
use crate::observe::{ObservationKind, ObservationLog};
use crate::sans_io::{Input, Output, Peer, SansIoCore};

/// Senders remembered at once; a flood of sources forgets the oldest (and the answers
/// still waiting for it, which must not reach whoever comes next).
const MAX_PEERS: usize = 4096;

/// Binds `addr` (port 0: any) and serves the core there until stopped.
pub async fn start(name: impl Into<String>, core: ReplayCore, addr: SocketAddr, log: ObservationLog) -> Result<Served, String> {
    let sock = tokio::net::UdpSocket::bind(addr).await.map_err(|e| format!("udp {addr}: {e}"))?;
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    let name = name.into();
    Ok(Served::spawn(local, move |stopped| serve(sock, core.alone(), name, log, stopped)))
}

async fn serve(sock: tokio::net::UdpSocket, mut core: ReplayCore, name: String, log: ObservationLog, mut stopped: oneshot::Receiver<()>) {
    let start = Instant::now();
    // Every sender gets an id of its own, never reused: a queued answer goes to its asker or nowhere.
    let mut peers: std::collections::VecDeque<(u64, SocketAddr)> = std::collections::VecDeque::new();
    let mut next_id = 0u64;
    // A flood of bad datagrams, failing sends or strangers writes a line per period, not per datagram.
    let (mut recv_log, mut send_log, mut unmatched_log) = (LogEvery::default(), LogEvery::default(), LogEvery::default());
    let mut buf = vec![0u8; 65_536];
    loop {
        // Answers the capture sent late (kept timing) wait for their time.
        let wake = core.next_wakeup().map(|at| tokio::time::Instant::from_std(start + at));
        let mut out = Vec::new();
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {
                let _ = core.handle_input(Input::Timeout, start.elapsed(), &mut out);
            }
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    let peer = match peers.iter().find(|(_, a)| *a == from) {
                        Some((id, _)) => *id,
                        None => {
                            if peers.len() >= MAX_PEERS {
                                if let Some((old, _)) = peers.pop_front() {
                                    let _ = core.handle_input(Input::Disconnected(Peer(old)), start.elapsed(), &mut out);
                                }
                            }
                            next_id += 1;
                            peers.push_back((next_id, from));
                            next_id
                        }
                    };
                    let _ = core.handle_input(Input::Bytes { from: Peer(peer), bytes: &buf[..n] }, start.elapsed(), &mut out);
                }
                Err(e) => {
                    if let Some(more) = recv_log.check(Instant::now()) {
                        tracing::warn!(device = %name, "udp receive: {e} ({more} more since the last line)");
                    }
                }
            },
        }
        for o in out {
            match o {
                Output::Send { to, bytes } => {
                    let Some(&(_, dest)) = peers.iter().find(|(id, _)| *id == to.0) else { continue };
                    if let Err(e) = sock.send_to(&bytes, dest).await {
                        if let Some(more) = send_log.check(Instant::now()) {
                            tracing::warn!(device = %name, "udp send to {dest}: {e} ({more} more since the last line)");
                        }
                    }
                }
                Output::Event(ReplayEvent::Unmatched { bytes }) => {
                    let reason = format!("no captured request is {}", crate::client::hex(&bytes));
                    if let Some(more) = unmatched_log.check(Instant::now()) {
                        tracing::info!(device = %name, "{reason} ({more} more unmatched since the last line)");
                    }
                    log.push(&name, ObservationKind::DeviceSilent { reason });
                }
                Output::Event(ReplayEvent::Answered { index, answers }) => tracing::debug!(device = %name, index, answers, "replayed"),
                Output::Close(_) => {}
            }
        }
    }
}
