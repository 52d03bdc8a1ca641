//! The `eg4-lp4` device actor: a thin shell that owns an [`Eg4Pack`] core,
//! keeps its physics running on a clock, and answers frames from the bus.

use std::time::{Duration, Instant};

use actix::prelude::*;

use super::eg4_core::{Eg4Pack, Eg4Silence};
use crate::model::PackSnapshot;
use crate::observe::{ObservationKind, ObservationLog};
use crate::transport::bus::BusFrame;

/// How often the model advances when nobody is polling, so SoC and
/// protections evolve between scenario steps.
const MODEL_TICK: Duration = Duration::from_millis(100);

pub struct Eg4PackActor {
    name: String,
    core: Eg4Pack,
    epoch: Instant,
    log: ObservationLog,
}

impl Eg4PackActor {
    pub fn new(name: impl Into<String>, core: Eg4Pack, log: ObservationLog) -> Self {
        Eg4PackActor {
            name: name.into(),
            core,
            epoch: log.start(),
            log,
        }
    }
}

impl Actor for Eg4PackActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.core.tick(self.epoch.elapsed());
        ctx.run_interval(MODEL_TICK, |act, _| act.core.tick(act.epoch.elapsed()));
    }
}

impl Handler<BusFrame> for Eg4PackActor {
    type Result = Option<Vec<u8>>;

    fn handle(&mut self, msg: BusFrame, _ctx: &mut Context<Self>) -> Self::Result {
        match self.core.handle_frame(&msg.bytes, self.epoch.elapsed()) {
            Ok(reply) => Some(reply),
            Err(Eg4Silence::OtherAddress(_)) => None,
            Err(Eg4Silence::Undecodable(reason)) => {
                self.log.push(&self.name, ObservationKind::DeviceSilent { reason });
                None
            }
        }
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
    fn handle(&mut self, msg: SetState, _ctx: &mut Context<Self>) -> Self::Result {
        self.core.tick(self.epoch.elapsed());
        self.core.set(&msg.key, msg.value)
    }
}

#[derive(Message)]
#[rtype(result = "PackSnapshot")]
pub struct GetSnapshot;

impl Handler<GetSnapshot> for Eg4PackActor {
    type Result = MessageResult<GetSnapshot>;
    fn handle(&mut self, _msg: GetSnapshot, _ctx: &mut Context<Self>) -> Self::Result {
        self.core.tick(self.epoch.elapsed());
        MessageResult(self.core.snapshot())
    }
}
