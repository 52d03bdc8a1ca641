//! The `jbd-bms` device actor: a [`JbdBms`] core behind the JBD GATT service,
//! served through the GATT builder on a BlueZ adapter — the virtual air's in
//! CI, `hci0` of a Raspberry Pi on a bench. The code is the same for both.
//!
//! One central at a time, as the modules do: the first central that writes (or
//! that BlueZ reports connected on our adapter) owns the session; the
//! advertisement is withdrawn until it leaves (its notification session ends,
//! or BlueZ reports it disconnected), so other centrals neither see nor reach
//! the BMS. Writes from another central meanwhile are refused, and on real
//! BlueZ a second link is dropped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bluer::adv::{Advertisement, AdvertisementHandle};
use serde::Serialize;

use super::driver::{feed, CoreDriver, CoreHost};
use super::eg4::{GetSnapshot, SetState};
use super::jbd_core::{JbdBms, JbdEvent};
use crate::observe::{ObservationKind, ObservationLog};
use crate::sans_io::{Input, Output, Peer};
use crate::transport::gatt::{uuid16, GattEvent, GattRefusal, GattServer, GattService, Props, ReadValue};

pub use crate::air::att::DEFAULT_ATT_MTU;
pub use crate::transport::gatt::split_for_mtu;

pub const SERVICE_UUID: uuid::Uuid = uuid16(0xFF00);
/// Notifications from the BMS (its "RX" in the JBD app's naming).
pub const NOTIFY_UUID: uuid::Uuid = uuid16(0xFF01);
/// Requests to the BMS.
pub const WRITE_UUID: uuid::Uuid = uuid16(0xFF02);

/// The JBD service, as the module's GATT table has it.
pub fn jbd_gatt() -> Vec<GattService> {
    vec![GattService::primary(SERVICE_UUID)
        // Responses, in ATT_MTU − 3 notifications; a read gives the last one.
        .characteristic(NOTIFY_UUID, Props::READ | Props::NOTIFY, ReadValue::LastNotified)
        // Requests. Properties 0x06 (read + write-without-response); BlueZ
        // still lets a write request through, and the profile decides.
        .characteristic(WRITE_UUID, Props::READ | Props::WRITE_WITHOUT_RESPONSE, ReadValue::Fixed(Vec::new()))]
}

/// How the BMS appears on a BlueZ adapter.
#[derive(Debug, Clone)]
pub struct JbdGattConfig {
    /// The adapter to register on: `hci1` from the air, `hci0` on a Pi.
    pub adapter: String,
    /// Advertised LocalName. Modules ship as `xiaoxiang BMS` or a model-like
    /// name (`SP04S034…`); clients match on either.
    pub local_name: String,
    /// Advertised ManufacturerData (company id → bytes); empty by default.
    pub manufacturer_data: BTreeMap<u16, Vec<u8>>,
    /// Withdraw the advertisement while a central is connected (the modules do).
    pub stop_advertising_while_connected: bool,
}

impl Default for JbdGattConfig {
    fn default() -> Self {
        JbdGattConfig {
            adapter: "hci0".into(),
            local_name: "xiaoxiang BMS".into(),
            manufacturer_data: BTreeMap::new(),
            stop_advertising_while_connected: true,
        }
    }
}

/// What the BMS's link looks like now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JbdLinkState {
    /// The central holding the session (its BLE address), if any.
    pub central: Option<String>,
    pub advertising: bool,
    /// A central is subscribed to 0xFF01.
    pub subscribed: bool,
    /// The ATT MTU the last write came with.
    pub mtu: u16,
}

#[derive(Message)]
#[rtype(result = "JbdLinkState")]
pub struct GetLinkState;

#[derive(Message)]
#[rtype(result = "()")]
struct AdvertisementRegistered(Result<AdvertisementHandle, String>);

pub struct JbdBmsActor {
    name: String,
    driver: CoreDriver<JbdBms>,
    cfg: JbdGattConfig,
    log: ObservationLog,
    adapter: bluer::Adapter,
    /// The registered JBD service; dropped (unregistered) on shutdown.
    gatt: Option<GattServer>,
    adv: Option<AdvertisementHandle>,
    advertising_wanted: bool,
    adv_in_flight: bool,
    central: Option<String>,
    subscribed: bool,
    mtu: u16,
}

/// A running BMS: the actor and what it registered. Stop it with
/// [`JbdBmsDevice::stop`] (or drop it: the registrations go with the actor).
pub struct JbdBmsDevice {
    pub addr: Addr<JbdBmsActor>,
    /// The adapter's BLE address, where centrals find the BMS.
    pub address: String,
    pub adapter: String,
}

impl JbdBmsDevice {
    /// Registers the GATT application and the advertisement on
    /// `cfg.adapter` through the system bus (`DBUS_SYSTEM_BUS_ADDRESS`) and
    /// starts the actor. Call inside an actix system.
    pub async fn start(name: impl Into<String>, core: JbdBms, cfg: JbdGattConfig, log: ObservationLog) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let session = bluer::Session::new().await.context("connecting to BlueZ (org.bluez on the system bus)")?;
        Self::start_on(&session, name, core, cfg, log).await
    }

    /// [`JbdBmsDevice::start`] on an existing bluer session: many BMSes in
    /// one process share one bus connection (and its tasks) instead of
    /// opening one each.
    pub async fn start_on(session: &bluer::Session, name: impl Into<String>, core: JbdBms, cfg: JbdGattConfig, log: ObservationLog) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let adapter = session.adapter(&cfg.adapter).with_context(|| format!("adapter {}", cfg.adapter))?;
        let address = adapter.address().await.with_context(|| format!("reading the address of {}", cfg.adapter))?.to_string();
        if !adapter.is_powered().await.unwrap_or(true) {
            adapter.set_powered(true).await.with_context(|| format!("powering {} on", cfg.adapter))?;
        }
        let adapter_name = cfg.adapter.clone();
        let (gatt, events) = GattServer::serve(&adapter, &jbd_gatt())
            .await
            .with_context(|| format!("registering the JBD GATT application on {adapter_name}"))?;
        let epoch: Instant = log.start();
        let actor = JbdBmsActor {
            name: name.into(),
            driver: CoreDriver::new(core, epoch),
            log,
            adapter,
            gatt: Some(gatt),
            adv: None,
            advertising_wanted: true,
            adv_in_flight: false,
            central: None,
            subscribed: false,
            mtu: DEFAULT_ATT_MTU,
            cfg,
        };
        let events = futures::stream::unfold(events, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
        let addr = JbdBmsActor::create(|ctx| {
            ctx.add_stream(events);
            actor
        });
        Ok(JbdBmsDevice { addr, address, adapter: adapter_name })
    }

    /// Unregisters the application and the advertisement and stops the actor.
    pub async fn stop(self) {
        let _ = self.addr.send(Shutdown).await;
        // bluer unregisters from a spawned task when the handles drop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Shutdown;

impl CoreHost for JbdBmsActor {
    type Core = JbdBms;

    fn driver(&mut self) -> &mut CoreDriver<JbdBms> {
        &mut self.driver
    }

    /// Answers go out as notifications on 0xFF01, in ATT_MTU − 3 pieces.
    fn deliver(&mut self, outputs: Vec<Output<JbdEvent>>, _ctx: &mut Context<Self>) {
        for o in outputs {
            match o {
                Output::Send { bytes, .. } => {
                    if let Some(gatt) = &self.gatt {
                        gatt.notify(NOTIFY_UUID, &bytes, self.mtu);
                    }
                }
                Output::Event(JbdEvent::Silent { reason }) => self.log.push(&self.name, ObservationKind::DeviceSilent { reason }),
                Output::Event(other) => tracing::info!(device = %self.name, event = ?other, "jbd"),
                Output::Close(_) => {}
            }
        }
    }
}

impl JbdBmsActor {
    /// Feeds the core and carries out its answer at once.
    fn input(&mut self, input: Input<'_>, ctx: &mut Context<Self>) -> Result<(), String> {
        let out = feed(self, input, ctx)?;
        self.deliver(out, ctx);
        Ok(())
    }

    fn begin_session(&mut self, central: &str, ctx: &mut Context<Self>) {
        tracing::info!(device = %self.name, central, "central connected");
        self.central = Some(central.to_string());
        let _ = self.input(Input::Connected(Peer::ONLY), ctx);
        if self.cfg.stop_advertising_while_connected {
            self.advertising_wanted = false;
            self.update_advertising(ctx);
        }
    }

    fn end_session(&mut self, ctx: &mut Context<Self>) {
        if let Some(c) = self.central.take() {
            tracing::info!(device = %self.name, central = %c, "central gone");
        }
        self.subscribed = false;
        self.mtu = DEFAULT_ATT_MTU;
        let _ = self.input(Input::Disconnected(Peer::ONLY), ctx);
        self.advertising_wanted = true;
        self.update_advertising(ctx);
    }

    /// Brings the registered advertisement in line with `advertising_wanted`.
    fn update_advertising(&mut self, ctx: &mut Context<Self>) {
        if !self.advertising_wanted {
            // Dropping the handle unregisters it.
            self.adv = None;
            return;
        }
        if self.adv.is_some() || self.adv_in_flight || self.gatt.is_none() {
            return;
        }
        self.adv_in_flight = true;
        let adv = Advertisement {
            service_uuids: [SERVICE_UUID].into_iter().collect(),
            manufacturer_data: self.cfg.manufacturer_data.clone(),
            local_name: Some(self.cfg.local_name.clone()),
            discoverable: Some(true),
            ..Default::default()
        };
        let adapter = self.adapter.clone();
        let addr = ctx.address();
        tokio::spawn(async move {
            let r = adapter.advertise(adv).await.map_err(|e| e.to_string());
            addr.do_send(AdvertisementRegistered(r));
        });
    }
}

impl Actor for JbdBmsActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The physics start now; the core asks for the wake-ups it needs (a partial request's timeout).
        let _ = self.input(Input::Timeout, ctx);
        self.update_advertising(ctx);
    }
}

impl Handler<Shutdown> for JbdBmsActor {
    type Result = ();
    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) {
        self.advertising_wanted = false;
        self.adv = None;
        self.gatt = None;
        ctx.stop();
    }
}

impl Handler<AdvertisementRegistered> for JbdBmsActor {
    type Result = ();
    fn handle(&mut self, msg: AdvertisementRegistered, ctx: &mut Context<Self>) {
        self.adv_in_flight = false;
        match msg.0 {
            // A central came while the registration was in flight: withdraw at once.
            Ok(h) if self.advertising_wanted => self.adv = Some(h),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(device = %self.name, "advertising failed: {e}");
                // Retry later; the adapter may be busy or out of instances.
                ctx.run_later(Duration::from_secs(1), |act, ctx| act.update_advertising(ctx));
            }
        }
    }
}

impl JbdBmsActor {
    /// A write on 0xFF02: the session's central, the profile's write rule,
    /// then the core; its answers go out as notifications on 0xFF01.
    fn on_write(&mut self, central: &str, request: bool, mtu: u16, value: &[u8], ctx: &mut Context<Self>) -> Result<(), GattRefusal> {
        match &self.central {
            Some(c) if c != central => {
                tracing::info!(device = %self.name, central, holder = %c, "write from a second central refused");
                return Err(GattRefusal::NotPermitted);
            }
            Some(_) => {}
            None => self.begin_session(central, ctx),
        }
        if request && self.driver.core().rejects_write_request() {
            // The firmware only takes write commands: ATT Write Not Permitted.
            return Err(GattRefusal::NotPermitted);
        }
        self.mtu = mtu.max(DEFAULT_ATT_MTU);
        if let Err(e) = self.input(Input::Bytes { from: Peer::ONLY, bytes: value }, ctx) {
            tracing::warn!(device = %self.name, "write not taken: {e}");
        }
        Ok(())
    }
}

impl StreamHandler<GattEvent> for JbdBmsActor {
    fn handle(&mut self, ev: GattEvent, ctx: &mut Context<Self>) {
        match ev {
            GattEvent::Write(w) if w.char == WRITE_UUID => {
                let r = self.on_write(&w.central, w.request, w.mtu, &w.value, ctx);
                let _ = w.reply.send(r);
            }
            GattEvent::Write(w) => {
                let _ = w.reply.send(Err(GattRefusal::NotPermitted));
            }
            GattEvent::Read(r) => {
                let _ = r.reply.send(Err(GattRefusal::NotPermitted));
            }
            GattEvent::Subscribed { .. } => self.subscribed = true,
            GattEvent::Unsubscribed { .. } => {
                self.subscribed = false;
                if self.central.is_some() {
                    self.end_session(ctx);
                }
            }
            GattEvent::Connected { central } => match &self.central {
                None => self.begin_session(&central, ctx),
                Some(holder) if *holder != central => {
                    tracing::info!(device = %self.name, %central, "second central connected: dropping it");
                    if let Some(g) = &self.gatt {
                        g.disconnect(&central);
                    }
                }
                Some(_) => {}
            },
            GattEvent::Disconnected { central } => {
                if self.central.as_deref() == Some(central.as_str()) {
                    self.end_session(ctx);
                }
            }
        }
    }

    /// The events end only when the GATT server goes, which shutdown does.
    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl Handler<SetState> for JbdBmsActor {
    type Result = Result<(), String>;
    fn handle(&mut self, msg: SetState, ctx: &mut Context<Self>) -> Self::Result {
        self.input(Input::Set { key: &msg.key, value: msg.value }, ctx)
    }
}

impl Handler<GetSnapshot> for JbdBmsActor {
    type Result = MessageResult<GetSnapshot>;
    fn handle(&mut self, _msg: GetSnapshot, ctx: &mut Context<Self>) -> Self::Result {
        // Bring the physics up to now before reading them.
        let _ = self.input(Input::Timeout, ctx);
        MessageResult(self.driver.core().snapshot())
    }
}

impl Handler<GetLinkState> for JbdBmsActor {
    type Result = MessageResult<GetLinkState>;
    fn handle(&mut self, _msg: GetLinkState, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(JbdLinkState {
            central: self.central.clone(),
            advertising: self.adv.is_some(),
            subscribed: self.subscribed,
            mtu: self.mtu,
        })
    }
}
