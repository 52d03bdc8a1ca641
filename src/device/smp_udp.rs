//! The SMP server over UDP, as Zephyr's UDP transport serves it: one SMP
//! message per datagram (or several back to back), the answer to the
//! sender's address, and a datagram larger than the net buffer dropped
//! unread. The host is a task around the sans-IO [`SmpServer`]: datagrams
//! and wake-ups in, answers out. UDP has no connections, so a reset only
//! makes the server silent for the boot time.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::{broadcast, watch};

use super::smp_core::{SmpEvent, SmpServer, SmpServerConfig};
use crate::sans_io::{Input, Output, Peer, SansIoCore};

/// A running UDP SMP server; dropping it (or [`SmpUdpHandle::shutdown`]) stops it.
pub struct SmpUdpHandle {
    local_addr: SocketAddr,
    events: broadcast::Sender<SmpEvent>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SmpUdpHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn subscribe(&self) -> broadcast::Receiver<SmpEvent> {
        self.events.subscribe()
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SmpUdpHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Binds `bind` and serves `config` there until shut down.
pub async fn serve(config: SmpServerConfig, bind: SocketAddr) -> Result<SmpUdpHandle, String> {
    let netbuf = usize::from(config.buf_size);
    let core = SmpServer::new(config)?;
    let socket = UdpSocket::bind(bind).await.map_err(|e| format!("cannot bind UDP {bind}: {e}"))?;
    let local_addr = socket.local_addr().map_err(|e| e.to_string())?;
    let (events, _) = broadcast::channel(1024);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(core, socket, netbuf, events.clone(), stop_rx));
    Ok(SmpUdpHandle { local_addr, events, stop, task: Some(task) })
}

async fn run(mut core: SmpServer, socket: UdpSocket, netbuf: usize, events: broadcast::Sender<SmpEvent>, mut stop: watch::Receiver<bool>) {
    let epoch = Instant::now();
    // The largest datagram, so one past the net buffer is seen whole and dropped, not cut.
    let mut buf = vec![0u8; 65_536];
    let mut dropped_oversize = crate::limits::LogEvery::new(crate::limits::REFUSAL_LOG_PERIOD);
    loop {
        let wake = core.next_wakeup().map(|d| tokio::time::Instant::from_std(epoch + d));
        let mut out = Vec::new();
        tokio::select! {
            _ = stop.changed() => return,
            _ = async { tokio::time::sleep_until(wake.expect("guarded")).await }, if wake.is_some() => {
                let _ = core.handle_input(Input::Timeout, epoch.elapsed(), &mut out);
            }
            r = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                if n > netbuf {
                    if let Some(more) = dropped_oversize.check(Instant::now()) {
                        tracing::warn!("smp udp: dropped a {n}-byte datagram from {from}, larger than the {netbuf}-byte net buffer ({more} more since the last line)");
                    }
                    let _ = events.send(SmpEvent::Silent { reason: format!("{n}-byte datagram is larger than the {netbuf}-byte net buffer") });
                    continue;
                }
                let _ = core.handle_input(Input::Bytes { from: Peer::ONLY, bytes: &buf[..n] }, epoch.elapsed(), &mut out);
                for o in out.drain(..) {
                    match o {
                        Output::Send { bytes, .. } => {
                            let _ = socket.send_to(&bytes, from).await;
                        }
                        Output::Event(e) => {
                            let _ = events.send(e);
                        }
                        Output::Close(_) => {}
                    }
                }
            }
        }
        for o in out {
            if let Output::Event(e) = o {
                let _ = events.send(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::smp::{SmpHeader, SmpOp, SmpVersion};

    #[tokio::test]
    async fn a_reset_over_udp_reboots_and_comes_back() {
        let server = serve(SmpServerConfig { boot_time: std::time::Duration::from_millis(100), ..Default::default() }, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut events = server.subscribe();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut reset = SmpHeader::new(SmpVersion::V2, SmpOp::Write, 0, 5, 1, 1).encode().to_vec();
        reset.push(0xa0);
        client.send_to(&reset, server.local_addr()).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(n, 9, "an empty map answers the reset");
        let mut seen = Vec::new();
        while !seen.contains(&SmpEvent::Up) {
            seen.push(tokio::time::timeout(std::time::Duration::from_secs(5), events.recv()).await.expect("events keep coming").unwrap());
        }
        assert!(seen.iter().any(|e| matches!(e, SmpEvent::Rebooted { .. })), "{seen:?}");
        server.shutdown().await;
    }

    /// Zephyr drops a datagram larger than its net buffer unread: smpclient's
    /// 1472-byte upload chunks against a 384-byte device get no answer.
    #[tokio::test]
    async fn a_datagram_past_the_net_buffer_is_dropped_unanswered() {
        let server = serve(SmpServerConfig { buf_size: 384, ..Default::default() }, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut events = server.subscribe();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo = |text: &str| {
            let body = crate::protocol::smp::encode_map(vec![("d", ciborium::Value::Text(text.into()))]);
            let mut b = SmpHeader::new(SmpVersion::V2, SmpOp::Write, 0, 0, 1, body.len() as u16).encode().to_vec();
            b.extend(body);
            b
        };
        client.send_to(&echo(&"x".repeat(400)), server.local_addr()).await.unwrap();
        let dropped = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
        assert!(matches!(&dropped, SmpEvent::Silent { reason } if reason.contains("larger than the 384-byte net buffer")), "{dropped:?}");
        // One that fits is answered, and it is the only answer that comes.
        client.send_to(&echo("fits"), server.local_addr()).await.unwrap();
        let mut buf = [0u8; 1024];
        let (n, _) = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv_from(&mut buf)).await.unwrap().unwrap();
        let m = crate::protocol::smp::decode_map(&buf[8..n]).unwrap();
        assert_eq!(crate::protocol::smp::get(&m, "r"), Some(&ciborium::Value::Text("fits".into())));
        server.shutdown().await;
    }
}
