//! The `replay` device on BLE: a [`ReplayCore`] behind the captured kind's GATT table
//! (the same services and advertised name, through the GATT builder), so the kind's
//! clients find and use it as they would the captured device. A central's write is
//! matched against the captured writes to that characteristic; the notifications the
//! device sent after it in the capture go out again, as captured, split further only if
//! the live MTU is smaller. The core sees every GATT operation as one frame: a class
//! byte, the characteristic's UUID, the value ([`gatt_frame`]).

use std::time::{Duration, Instant};

use actix::prelude::*;
use uuid::Uuid;

use super::driver::{feed, CoreDriver, CoreHost};
use super::replay_core::{ReplayCore, ReplayEvent};
use crate::observe::{ObservationKind, ObservationLog};
use crate::sans_io::{Input, Output, Peer};
use crate::transport::gatt::{BleIdentity, GattEvent, GattPeripheral, GattRefusal};

/// A write to a characteristic (a request).
pub const WRITE: u8 = b'W';
/// A notification or indication (an answer).
pub const NOTIFY: u8 = b'N';

/// Where a [`gatt_frame`]'s value starts.
pub const VALUE_AT: usize = 17;

/// One GATT operation as the replay core matches it.
pub fn gatt_frame(class: u8, char: Uuid, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(17 + value.len());
    b.push(class);
    b.extend_from_slice(char.as_bytes());
    b.extend_from_slice(value);
    b
}

/// The class, characteristic and value of a [`gatt_frame`].
pub fn split_gatt_frame(b: &[u8]) -> Option<(u8, Uuid, &[u8])> {
    let (&class, rest) = b.split_first()?;
    let (uuid, value) = rest.split_first_chunk::<16>()?;
    Some((class, Uuid::from_bytes(*uuid), value))
}

pub struct ReplayBleActor {
    name: String,
    driver: CoreDriver<ReplayCore>,
    log: ObservationLog,
    /// The registered GATT table and advertisement; dropped on shutdown.
    peripheral: Option<GattPeripheral>,
    /// The ATT MTU the last write came with.
    mtu: u16,
    /// Unmatched writes reach the terminal a line per period, not one each.
    unmatched_log: crate::limits::LogEvery,
}

/// A running BLE replay. Stop it with [`ReplayBleDevice::stop`].
pub struct ReplayBleDevice {
    pub addr: Addr<ReplayBleActor>,
    /// The adapter's BLE address, where centrals find it.
    pub address: String,
}

impl ReplayBleDevice {
    /// Registers `identity` on `adapter` and starts the actor. Call inside an actix system.
    pub async fn start(name: impl Into<String>, core: ReplayCore, identity: &BleIdentity, adapter: &str, log: ObservationLog) -> Result<Self, String> {
        let adv = bluer::adv::Advertisement {
            service_uuids: identity.services.iter().filter(|s| s.primary).map(|s| s.uuid).collect(),
            local_name: Some(identity.local_name.clone()),
            discoverable: Some(true),
            ..Default::default()
        };
        let (peripheral, events) = GattPeripheral::open(adapter, &identity.services, adv).await?;
        let address = peripheral.address().to_string();
        let epoch: Instant = log.start();
        let actor = ReplayBleActor {
            name: name.into(),
            driver: CoreDriver::new(core.alone(), epoch),
            log,
            peripheral: Some(peripheral),
            mtu: crate::air::att::DEFAULT_ATT_MTU,
            unmatched_log: Default::default(),
        };
        let events = futures::stream::unfold(events, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
        let addr = ReplayBleActor::create(|ctx| {
            ctx.add_stream(events);
            actor
        });
        Ok(ReplayBleDevice { addr, address })
    }

    /// Unregisters the GATT table and the advertisement and stops the actor.
    pub async fn stop(self) {
        let _ = self.addr.send(Shutdown).await;
        // bluer unregisters from a spawned task when the handles drop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Shutdown;

impl Handler<Shutdown> for ReplayBleActor {
    type Result = ();
    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        self.peripheral = None;
        ctx.stop();
    }
}

impl Actor for ReplayBleActor {
    type Context = Context<Self>;
}

impl CoreHost for ReplayBleActor {
    type Core = ReplayCore;

    fn driver(&mut self) -> &mut CoreDriver<ReplayCore> {
        &mut self.driver
    }

    fn deliver(&mut self, outputs: Vec<Output<ReplayEvent>>, _ctx: &mut Context<Self>) {
        for o in outputs {
            match o {
                Output::Send { bytes, .. } => self.send(&bytes),
                Output::Event(e) => self.observe(e),
                Output::Close(_) => {}
            }
        }
    }
}

impl ReplayBleActor {
    fn send(&self, frame: &[u8]) {
        let (Some(p), Some((NOTIFY, char, value))) = (&self.peripheral, split_gatt_frame(frame)) else { return };
        p.gatt().notify(char, value, self.mtu);
    }

    fn observe(&mut self, e: ReplayEvent) {
        match e {
            ReplayEvent::Unmatched { bytes } => {
                let what = match split_gatt_frame(&bytes) {
                    Some((_, char, value)) => format!("a write of {} to {char}", crate::client::hex(value)),
                    None => crate::client::hex(&bytes),
                };
                let reason = format!("no captured request is {what}");
                if let Some(more) = self.unmatched_log.check(Instant::now()) {
                    tracing::info!(device = %self.name, "{reason} ({more} more unmatched since the last line)");
                }
                self.log.push(&self.name, ObservationKind::DeviceSilent { reason });
            }
            ReplayEvent::Answered { index, answers } => tracing::debug!(device = %self.name, index, answers, "replayed"),
        }
    }
}

impl StreamHandler<GattEvent> for ReplayBleActor {
    fn handle(&mut self, ev: GattEvent, ctx: &mut Context<Self>) {
        match ev {
            GattEvent::Write(w) => {
                // The captured device took the write; whether it answered is the capture's.
                let _ = w.reply.send(Ok(()));
                self.mtu = w.mtu;
                let frame = gatt_frame(WRITE, w.char, &w.value);
                match feed(self, Input::Bytes { from: Peer::ONLY, bytes: &frame }, ctx) {
                    Ok(out) => self.deliver(out, ctx),
                    Err(e) => tracing::warn!(device = %self.name, "replay: {e}"),
                }
            }
            GattEvent::Read(r) => {
                let _ = r.reply.send(Err(GattRefusal::NotPermitted));
            }
            GattEvent::Subscribed { .. } | GattEvent::Unsubscribed { .. } | GattEvent::Connected { .. } | GattEvent::Disconnected { .. } => {}
        }
    }

    /// The events end only when the GATT server goes, which shutdown does.
    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gatt_frames_round_trip_and_short_ones_are_none() {
        let u = crate::transport::gatt::uuid16(0xFF02);
        let f = gatt_frame(WRITE, u, &[0xDD, 0xA5]);
        assert_eq!(split_gatt_frame(&f), Some((WRITE, u, &[0xDD, 0xA5][..])));
        assert_eq!(split_gatt_frame(&f[..10]), None);
        assert_eq!(split_gatt_frame(&[]), None);
    }
}
