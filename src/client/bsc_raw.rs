//! `bsc-raw`: a BACnet/SC peer that sends exactly the bytes a scenario scripts.
//!
//! A conforming node ([`super::bsc_node`]) cannot send a malformed frame, a TEXT frame, an
//! oversize message, an unknown must-understand option, or skip its handshake; a hub's
//! reaction to those is what the fault scenarios assert. This peer opens one WebSocket
//! (optionally without the subprotocol), optionally sends a Connect-Request, then sends
//! whatever [`SendRaw`] gives it and reports what comes back as observations. It never
//! reconnects and never heartbeats, so a hub's silence and connect-wait timeouts can be
//! tested with it. With `read: false` it never reads its socket: a slow consumer.

use std::time::Duration;

use actix::prelude::*;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::observe::{ObservationKind, ObservationLog};
use crate::protocol::bvlc_sc::{self, BvlcMessage, BvlcPayload, BvlcResult, DeviceUuid, Vmac};
use crate::transport::ws_client::{connect_ws, WsConnectOptions};

#[derive(Debug, Clone)]
pub struct BscRawConfig {
    /// Observation source.
    pub name: String,
    pub url: String,
    /// Subprotocol and TLS; `ws.subprotocol = None` offers none.
    pub ws: WsConnectOptions,
    /// Send a Connect-Request with `vmac`/`uuid` right after the upgrade.
    pub handshake: bool,
    pub vmac: Vmac,
    pub uuid: DeviceUuid,
    /// Read the socket; `false` models a consumer that stopped reading.
    pub read: bool,
    /// Wait before connecting.
    pub delay: Duration,
}

/// Send one WebSocket message as is.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct SendRaw {
    pub bytes: Vec<u8>,
    /// A TEXT message (bytes as UTF-8, lossily) instead of BINARY.
    pub text: bool,
}

pub struct BscRawPeer {
    cfg: BscRawConfig,
    log: ObservationLog,
    commands: Option<mpsc::UnboundedSender<SendRaw>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl BscRawPeer {
    pub fn new(cfg: BscRawConfig, log: ObservationLog) -> Self {
        BscRawPeer { cfg, log, commands: None, task: None }
    }
}

impl Actor for BscRawPeer {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.commands = Some(tx);
        self.task = Some(actix::spawn(run(self.cfg.clone(), self.log.clone(), rx)));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Handler<SendRaw> for BscRawPeer {
    type Result = ();
    fn handle(&mut self, msg: SendRaw, _ctx: &mut Context<Self>) {
        if let Some(c) = &self.commands {
            let _ = c.send(msg);
        }
    }
}

/// What a received binary message looks like in an observation. Undecodable bytes are
/// still reported (function from the first byte, if any).
fn frame_observation(data: &[u8]) -> ObservationKind {
    let function = data.first().copied().unwrap_or(0xFF);
    let (result, error_code) = match bvlc_sc::decode(data) {
        Ok(BvlcMessage { payload: BvlcPayload::Result { result, .. }, .. }) => match result {
            BvlcResult::Ack => (Some("ack".to_string()), None),
            BvlcResult::Nak { error_code, .. } => (Some("nak".to_string()), Some(error_code)),
        },
        Ok(_) => (None, None),
        Err(e) => (Some(format!("undecodable: {e}")), None),
    };
    ObservationKind::BscRawFrame {
        function,
        name: bvlc_sc::function_name(function).to_string(),
        len: data.len(),
        result,
        error_code,
    }
}

async fn run(cfg: BscRawConfig, log: ObservationLog, mut commands: mpsc::UnboundedReceiver<SendRaw>) {
    tokio::time::sleep(cfg.delay).await;
    let mut ws = match connect_ws(&cfg.url, &cfg.ws).await {
        Ok(ws) => ws,
        Err(e) => {
            log.push(
                &cfg.name,
                ObservationKind::BscRawRefused { http_status: e.http_status(), error: e.to_string() },
            );
            return;
        }
    };
    if cfg.handshake {
        let req = BvlcMessage::new(
            1,
            BvlcPayload::ConnectRequest { vmac: cfg.vmac, uuid: cfg.uuid, max_bvlc: 1600, max_npdu: 1497 },
        );
        match bvlc_sc::encode(&req) {
            Ok(bytes) => {
                if let Err(e) = ws.send(WsMessage::Binary(bytes.into())).await {
                    log.push(&cfg.name, ObservationKind::BscRawClosed { code: None, reason: e.to_string() });
                    return;
                }
            }
            Err(e) => tracing::error!(peer = %cfg.name, "cannot encode the Connect-Request: {e}"),
        }
    }
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                let msg = if cmd.text {
                    WsMessage::Text(String::from_utf8_lossy(&cmd.bytes).into_owned().into())
                } else {
                    WsMessage::Binary(cmd.bytes.into())
                };
                if let Err(e) = ws.send(msg).await {
                    log.push(&cfg.name, ObservationKind::BscRawClosed { code: None, reason: format!("send failed: {e}") });
                    return;
                }
            }
            msg = ws.next(), if cfg.read => match msg {
                Some(Ok(WsMessage::Binary(data))) => log.push(&cfg.name, frame_observation(&data)),
                Some(Ok(WsMessage::Close(frame))) => {
                    let (code, reason) = frame.map_or((None, String::new()), |f| (Some(u16::from(f.code)), f.reason.to_string()));
                    log.push(&cfg.name, ObservationKind::BscRawClosed { code, reason });
                    // Let tungstenite answer the close, boundedly.
                    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    log.push(&cfg.name, ObservationKind::BscRawClosed { code: None, reason: e.to_string() });
                    return;
                }
                None => {
                    log.push(&cfg.name, ObservationKind::BscRawClosed { code: None, reason: "end of stream".into() });
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_become_observations_even_when_undecodable() {
        let nak = bvlc_sc::encode(&bvlc_sc::nak(
            &BvlcMessage::new(7, BvlcPayload::AddressResolution),
            7,
            151,
            "dup",
        ))
        .unwrap();
        match frame_observation(&nak) {
            ObservationKind::BscRawFrame { function: 0, result, error_code: Some(151), .. } => {
                assert_eq!(result.as_deref(), Some("nak"))
            }
            other => panic!("{other:?}"),
        }
        match frame_observation(&[0x01, 0x08]) {
            ObservationKind::BscRawFrame { len: 2, result: Some(r), .. } => assert!(r.starts_with("undecodable"), "{r}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(frame_observation(&[]), ObservationKind::BscRawFrame { len: 0, .. }));
    }
}
