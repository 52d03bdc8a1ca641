//! The `eg4-lp4` device actor: the transport shell around an [`Eg4Pack`]
//! core on the generic [`CoreDriver`]. The bus hands it frames; the core's
//! answer goes back as the frame's reply.

use std::time::Instant;

use actix::prelude::*;

use super::driver::{feed, CoreDriver, CoreHost};
use super::eg4_core::{Eg4Event, Eg4Pack};
use crate::model::PackSnapshot;
use crate::observe::{ObservationKind, ObservationLog};
use crate::sans_io::{Input, Output, Peer};
use crate::transport::bus::BusFrame;

pub struct Eg4PackActor {
    name: String,
    driver: CoreDriver<Eg4Pack>,
    log: ObservationLog,
}

impl Eg4PackActor {
    pub fn new(name: impl Into<String>, core: Eg4Pack, log: ObservationLog) -> Self {
        let epoch: Instant = log.start();
        Eg4PackActor { name: name.into(), driver: CoreDriver::new(core, epoch), log }
    }

    fn observe(&self, e: Eg4Event) {
        match e {
            Eg4Event::Silent { reason } => self.log.push(&self.name, ObservationKind::DeviceSilent { reason }),
        }
    }
}

impl Actor for Eg4PackActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The physics start now; after that they catch up on every input.
        if let Ok(out) = feed(self, Input::Timeout, ctx) {
            self.deliver(out, ctx);
        }
    }
}

impl CoreHost for Eg4PackActor {
    type Core = Eg4Pack;

    fn driver(&mut self) -> &mut CoreDriver<Eg4Pack> {
        &mut self.driver
    }

    fn deliver(&mut self, outputs: Vec<Output<Eg4Event>>, _ctx: &mut Context<Self>) {
        for o in outputs {
            match o {
                Output::Event(e) => self.observe(e),
                // A pack on a bus speaks only when asked: its answers go back with the request.
                Output::Send { .. } | Output::Close(_) => tracing::warn!(device = %self.name, "unasked output dropped"),
            }
        }
    }
}

impl Handler<BusFrame> for Eg4PackActor {
    type Result = Option<Vec<u8>>;

    fn handle(&mut self, msg: BusFrame, ctx: &mut Context<Self>) -> Self::Result {
        let out = feed(self, Input::Bytes { from: Peer::ONLY, bytes: &msg.bytes }, ctx).ok()?;
        let mut reply = None;
        for o in out {
            match o {
                Output::Send { bytes, .. } => reply = Some(bytes),
                Output::Event(e) => self.observe(e),
                Output::Close(_) => {}
            }
        }
        reply
    }
}

/// Set one state key (see `hilbench sim eg4-lp4 --help`).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct SetState {
    pub key: String,
    pub value: f64,
}

impl Handler<SetState> for Eg4PackActor {
    type Result = Result<(), String>;
    fn handle(&mut self, msg: SetState, ctx: &mut Context<Self>) -> Self::Result {
        let out = feed(self, Input::Set { key: &msg.key, value: msg.value }, ctx)?;
        self.deliver(out, ctx);
        Ok(())
    }
}

#[derive(Message)]
#[rtype(result = "PackSnapshot")]
pub struct GetSnapshot;

impl Handler<GetSnapshot> for Eg4PackActor {
    type Result = MessageResult<GetSnapshot>;
    fn handle(&mut self, _msg: GetSnapshot, ctx: &mut Context<Self>) -> Self::Result {
        // Bring the physics up to now before reading them.
        if let Ok(out) = feed(self, Input::Timeout, ctx) {
            self.deliver(out, ctx);
        }
        MessageResult(self.driver.core().snapshot())
    }
}
