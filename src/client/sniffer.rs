//! `modbus-sniffer`: the bridge's `passive` mode. It never transmits; it
//! listens on a bus port where another master (an inverter) polls the packs,
//! pairs each request with its reply, and decodes the registers.

use std::path::PathBuf;
use std::time::Duration;

use actix::prelude::*;
use tokio::io::AsyncReadExt;
use tokio_serial::SerialStream;

use super::telemetry_fields;
use crate::observe::{ObservationKind, ObservationLog};
use crate::protocol::eg4::RegisterProfile;
use crate::protocol::modbus::{self, ModbusRequest, ModbusResponse};
use crate::transport::framer::{StreamFramer, StreamRole};

use crate::transport::serial::{open_serial, rtu_silence};
use crate::transport::TransportError;

#[derive(Debug, Clone)]
pub struct SnifferConfig {
    pub name: String,
    pub port: PathBuf,
    pub baud: u32,
    pub profile: RegisterProfile,
}

pub struct SnifferActor {
    cfg: SnifferConfig,
    port: Option<SerialStream>,
    log: ObservationLog,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SnifferActor {
    pub fn open(cfg: SnifferConfig, log: ObservationLog) -> Result<Self, TransportError> {
        let port = open_serial(&cfg.port, cfg.baud)?;
        Ok(SnifferActor {
            cfg,
            port: Some(port),
            log,
            task: None,
        })
    }
}

impl Actor for SnifferActor {
    type Context = Context<Self>;
    fn started(&mut self, _ctx: &mut Context<Self>) {
        if let Some(port) = self.port.take() {
            self.task = Some(actix::spawn(listen(port, self.cfg.clone(), self.log.clone())));
        }
    }
    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Request/reply pairing state: the request tells us which registers the
/// reply carries.
struct Pending {
    address: u8,
    start: u16,
}

async fn listen(mut port: SerialStream, cfg: SnifferConfig, log: ObservationLog) {
    let mut framer = StreamFramer::new(StreamRole::Either);
    let mut pending: Option<Pending> = None;
    let silence = rtu_silence(cfg.baud);
    let mut buf = [0u8; 1024];
    loop {
        let read = if framer.pending() > 0 {
            tokio::time::timeout(silence.max(Duration::from_millis(5)), port.read(&mut buf)).await
        } else {
            Ok(port.read(&mut buf).await)
        };
        let frames = match read {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => framer.push(&buf[..n]),
            Err(_) => {
                // Silence with a partial frame: line noise, resynchronise.
                if let Some(junk) = framer.flush() {
                    log.push(
                        &cfg.name,
                        ObservationKind::Error {
                            address: pending.as_ref().map_or(0, |p| p.address),
                            kind: "framing".into(),
                            detail: format!("undecodable bytes on the bus: {}", super::hex(&junk)),
                            attempt: 1,
                        },
                    );
                }
                pending = None;
                continue;
            }
        };
        for f in frames {
            // A reply to the pending request, or a new request (a reply
            // that went missing leaves the request unanswered).
            if let Some(p) = pending.take() {
                if let Ok(resp) = modbus::decode_response(&f) {
                    if resp.address == p.address {
                        if let ModbusResponse::ReadHolding(values) | ModbusResponse::ReadInput(values) = resp.pdu {
                            if let Ok(t) = cfg.profile.decode(p.start, &values) {
                                let (values, flags) = telemetry_fields(&t);
                                log.push(
                                    &cfg.name,
                                    ObservationKind::Reading {
                                        address: p.address,
                                        values,
                                        flags,
                                    },
                                );
                            }
                        }
                        continue;
                    }
                }
            }
            if let Ok(req) = modbus::decode_request(&f) {
                if let ModbusRequest::ReadHolding { start, .. } | ModbusRequest::ReadInput { start, .. } = req.pdu {
                    pending = Some(Pending {
                        address: req.address,
                        start,
                    });
                }
            }
        }
    }
}
