//! The polling client actor shared by every request/reply serial protocol:
//! a schedule, a timeout, retries, and an observation for every reading and
//! every failed attempt. The protocol (Modbus RTU, EG4 7E/0D) is a
//! [`PollProtocol`]; the transport is a [`SerialSession`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;

use super::{SerialSession, TransactionError};
use crate::link::fault::{FaultRule, LinkEngine};
use crate::link::record::FrameRecord;
use crate::observe::{ObservationKind, ObservationLog};
use crate::protocol::modbus::FrameLength;
use crate::transport::serial::{open_serial, rtu_silence};
use crate::transport::TransportError;

pub trait PollProtocol: Unpin + 'static {
    fn request(&self, address: u8) -> Vec<u8>;
    fn frame_length(&self, buf: &[u8]) -> FrameLength;
    fn decode(&self, address: u8, frame: &[u8]) -> Result<(BTreeMap<String, f64>, Vec<String>), TransactionError>;
    fn retry_helps(&self, _e: &TransactionError) -> bool {
        true
    }
}

#[derive(Debug, Clone)]
pub struct PollerConfig {
    pub name: String,
    pub port: PathBuf,
    pub baud: u32,
    pub addresses: Vec<u8>,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    /// Publish readings (a monitor) or only errors (an inverter making
    /// traffic for others).
    pub publish_readings: bool,
    pub seed: u64,
}

pub struct PollerActor<P: PollProtocol> {
    cfg: PollerConfig,
    protocol: Option<P>,
    session: Option<SerialSession>,
    link: Rc<RefCell<LinkEngine>>,
    log: ObservationLog,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl<P: PollProtocol> PollerActor<P> {
    /// Opens the port now, so a missing tty fails the setup with a clear
    /// error instead of a silent actor.
    pub fn open(cfg: PollerConfig, protocol: P, log: ObservationLog) -> Result<Self, TransportError> {
        let port = open_serial(&cfg.port, cfg.baud)?;
        let link = Rc::new(RefCell::new(LinkEngine::new(cfg.name.clone(), cfg.seed)));
        Ok(PollerActor {
            session: Some(SerialSession::new(port, link.clone(), log.start())),
            protocol: Some(protocol),
            cfg,
            link,
            log,
            task: None,
        })
    }
}

impl<P: PollProtocol> Actor for PollerActor<P> {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        if let (Some(session), Some(protocol)) = (self.session.take(), self.protocol.take()) {
            self.task = Some(actix::spawn(poll_loop(session, protocol, self.cfg.clone(), self.log.clone())));
        }
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn poll_loop<P: PollProtocol>(mut session: SerialSession, protocol: P, cfg: PollerConfig, log: ObservationLog) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let silence = rtu_silence(cfg.baud);
    loop {
        tick.tick().await;
        for &address in &cfg.addresses {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let req = protocol.request(address);
                let result = match session
                    .transact(&req, cfg.timeout, |b| protocol.frame_length(b))
                    .await
                {
                    Ok(reply) => protocol.decode(address, &reply.frame).map(|d| (d, reply.echoed)),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(((values, flags), echoed)) => {
                        if echoed {
                            log.push(
                                &cfg.name,
                                ObservationKind::Error {
                                    address,
                                    kind: "echo".into(),
                                    detail: "the request came back in front of the reply (adapter echo)".into(),
                                    attempt,
                                },
                            );
                        }
                        if cfg.publish_readings {
                            log.push(&cfg.name, ObservationKind::Reading { address, values, flags });
                        }
                        break;
                    }
                    Err(e) => {
                        let retry = protocol.retry_helps(&e) && attempt <= cfg.retries;
                        let give_up = protocol.retry_helps(&e) && !retry;
                        log.push(
                            &cfg.name,
                            ObservationKind::Error {
                                address,
                                kind: e.kind.into(),
                                detail: e.detail,
                                attempt,
                            },
                        );
                        if give_up {
                            log.push(&cfg.name, ObservationKind::GaveUp { address, attempts: attempt });
                        }
                        if !retry {
                            break;
                        }
                    }
                }
                tokio::time::sleep(silence).await;
            }
            tokio::time::sleep(silence).await;
        }
    }
}

/// Add a fault to this client's own link (between it and its port).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClientFault(pub FaultRule);

#[derive(Message)]
#[rtype(result = "()")]
pub struct ClientClearFaults;

/// Remove the fault rules called this from the client's link; false when
/// none had the name.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct ClientClearFault(pub String);

#[derive(Message)]
#[rtype(result = "Vec<FrameRecord>")]
pub struct ClientFrames;

impl<P: PollProtocol> Handler<ClientFault> for PollerActor<P> {
    type Result = ();
    fn handle(&mut self, msg: ClientFault, _ctx: &mut Context<Self>) {
        let now = self.log.start().elapsed().as_nanos() as u64;
        self.link.borrow_mut().add_rule(msg.0, now);
    }
}

impl<P: PollProtocol> Handler<ClientClearFaults> for PollerActor<P> {
    type Result = ();
    fn handle(&mut self, _msg: ClientClearFaults, _ctx: &mut Context<Self>) {
        self.link.borrow_mut().clear();
    }
}

impl<P: PollProtocol> Handler<ClientClearFault> for PollerActor<P> {
    type Result = bool;
    fn handle(&mut self, msg: ClientClearFault, _ctx: &mut Context<Self>) -> bool {
        self.link.borrow_mut().clear_named(&msg.0)
    }
}

impl<P: PollProtocol> Handler<ClientFrames> for PollerActor<P> {
    type Result = MessageResult<ClientFrames>;
    fn handle(&mut self, _msg: ClientFrames, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.link.borrow().frames().cloned().collect())
    }
}
