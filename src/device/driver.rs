//! The one actor driver for sans-IO cores ([`SansIoCore`]): it feeds inputs
//! at the actor's clock, keeps exactly one timer armed for the wake-up the
//! core asks for (none when it asks for none), and hands what the core wants
//! done to its host, the actor that owns the transport (a bus port, a GATT
//! service). Device actors hold a [`CoreDriver`] and implement [`CoreHost`].

use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::sans_io::{Input, Output, SansIoCore};

/// A core, its clock, and the wake-up armed for it.
pub struct CoreDriver<C> {
    core: C,
    epoch: Instant,
    /// The wake-up time armed, and its timer.
    armed: Option<(Duration, SpawnHandle)>,
}

/// An actor that hosts a core: it owns the transport the core's outputs go to.
pub trait CoreHost: Actor<Context = Context<Self>> {
    type Core: SansIoCore;

    fn driver(&mut self) -> &mut CoreDriver<Self::Core>;

    /// Carries out what the core asked for on a wake-up (inputs the host
    /// feeds itself return their outputs to it instead).
    fn deliver(&mut self, outputs: Vec<Output<<Self::Core as SansIoCore>::Event>>, ctx: &mut Context<Self>);
}

impl<C: SansIoCore> CoreDriver<C> {
    /// `epoch` is the time every `now` the core sees counts from.
    pub fn new(core: C, epoch: Instant) -> Self {
        CoreDriver { core, epoch, armed: None }
    }

    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The core, to read (snapshots, status); feed inputs with [`feed`].
    pub fn core(&self) -> &C {
        &self.core
    }

    /// When the armed wake-up is due, if one is armed.
    pub fn armed(&self) -> Option<Duration> {
        self.armed.as_ref().map(|a| a.0)
    }
}

/// Feeds one input now, re-arms the wake-up, and returns the outputs for the
/// host to carry out (the reply to a bus request goes back as the request's answer).
pub fn feed<A: CoreHost>(act: &mut A, input: Input<'_>, ctx: &mut Context<A>) -> Result<Vec<Output<<A::Core as SansIoCore>::Event>>, String> {
    let d = act.driver();
    let now = d.now();
    let mut out = Vec::new();
    let r = d.core.handle_input(input, now, &mut out);
    rearm(act, ctx);
    r.map(|()| out)
}

/// Arms one timer for the core's next wake-up, replacing one armed for another time.
fn rearm<A: CoreHost>(act: &mut A, ctx: &mut Context<A>) {
    let d = act.driver();
    let want = d.core.next_wakeup();
    if want == d.armed() {
        return;
    }
    if let Some((_, h)) = d.armed.take() {
        ctx.cancel_future(h);
    }
    if let Some(at) = want {
        let delay = at.saturating_sub(d.now());
        let h = ctx.run_later(delay, |act: &mut A, ctx| {
            act.driver().armed = None;
            match feed(act, Input::Timeout, ctx) {
                Ok(out) => act.deliver(out, ctx),
                Err(e) => tracing::warn!("a core refused its own wake-up: {e}"),
            }
        });
        act.driver().armed = Some((at, h));
    }
}
