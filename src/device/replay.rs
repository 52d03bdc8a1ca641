//! The `replay` device actor on an RS-485 bus: the transport shell around a
//! [`ReplayCore`]. The bus hands it frames; what the capture answered goes back as the
//! frame's reply (several captured frames after one request are sent back to back).

use std::time::Instant;

use actix::prelude::*;

use super::driver::{feed, CoreDriver, CoreHost};
use super::replay_core::{ReplayCore, ReplayEvent};
use crate::observe::{ObservationKind, ObservationLog};
use crate::sans_io::{Input, Output, Peer};
use crate::transport::bus::BusFrame;

pub struct ReplayBusActor {
    name: String,
    driver: CoreDriver<ReplayCore>,
    log: ObservationLog,    /// Unmatched requests reach the terminal a line per period, not one each.
    unmatched_log: crate::limits::LogEvery,
}

impl ReplayBusActor {
    pub fn new(name: impl Into<String>, core: ReplayCore, log: ObservationLog) -> Self {
        let epoch: Instant = log.start();
        ReplayBusActor { name: name.into(), driver: CoreDriver::new(core, epoch), log, unmatched_log: Default::default() }
    }

    fn observe(&mut self, e: ReplayEvent) {
        match e {
            ReplayEvent::Unmatched { bytes } => {
                let reason = format!("no captured request is {}", crate::client::hex(&bytes));
                if let Some(more) = self.unmatched_log.check(Instant::now()) {
                    tracing::info!(device = %self.name, "{reason} ({more} more unmatched since the last line)");
                }
                self.log.push(&self.name, ObservationKind::DeviceSilent { reason });
            }
            ReplayEvent::Answered { index, answers } => {
                tracing::debug!(device = %self.name, index, answers, "replayed");
            }
        }
    }
}

impl Actor for ReplayBusActor {
    type Context = Context<Self>;
}

impl CoreHost for ReplayBusActor {
    type Core = ReplayCore;

    fn driver(&mut self) -> &mut CoreDriver<ReplayCore> {
        &mut self.driver
    }

    fn deliver(&mut self, outputs: Vec<Output<ReplayEvent>>, _ctx: &mut Context<Self>) {
        for o in outputs {
            if let Output::Event(e) = o {
                self.observe(e);
            }
        }
    }
}

impl Handler<BusFrame> for ReplayBusActor {
    type Result = Option<Vec<u8>>;

    fn handle(&mut self, msg: BusFrame, ctx: &mut Context<Self>) -> Self::Result {
        let out = feed(self, Input::Bytes { from: Peer::ONLY, bytes: &msg.bytes }, ctx).ok()?;
        let mut reply: Option<Vec<u8>> = None;
        for o in out {
            match o {
                Output::Send { bytes, .. } => reply.get_or_insert_with(Vec::new).extend_from_slice(&bytes),
                Output::Event(e) => self.observe(e),
                Output::Close(_) => {}
            }
        }
        reply
    }
}
