//! The `jbd-bms` device actor: a [`JbdBms`] core behind the JBD GATT service,
//! registered through `bluer` on a BlueZ adapter — the virtual air's in CI,
//! `hci0` of a Raspberry Pi on a bench. The code is the same for both.
//!
//! ```text
//! service 0xFF00
//!   0xFF01  read, notify                 responses, split into ATT_MTU − 3 notifications
//!   0xFF02  read, write-without-response requests (write requests too, unless the
//!                                         profile rejects them: ATT "Write Not Permitted")
//! advertisement: LocalName, ServiceUUIDs [0xFF00], optional ManufacturerData
//! ```
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
use bluer::gatt::local::{
    Application, ApplicationHandle, Characteristic, CharacteristicNotifier, CharacteristicNotify,
    CharacteristicNotifyMethod, CharacteristicRead, CharacteristicWrite, CharacteristicWriteMethod, ReqError, Service,
};
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use super::eg4::{GetSnapshot, SetState};
use super::jbd_core::{JbdBms, JbdEvent};
use crate::observe::{ObservationKind, ObservationLog};

pub const SERVICE_UUID: uuid::Uuid = uuid::Uuid::from_u128(0x0000ff00_0000_1000_8000_00805f9b34fb);
/// Notifications from the BMS (its "RX" in the JBD app's naming).
pub const NOTIFY_UUID: uuid::Uuid = uuid::Uuid::from_u128(0x0000ff01_0000_1000_8000_00805f9b34fb);
/// Requests to the BMS.
pub const WRITE_UUID: uuid::Uuid = uuid::Uuid::from_u128(0x0000ff02_0000_1000_8000_00805f9b34fb);
/// What the ATT MTU is until a central negotiates more.
pub const DEFAULT_ATT_MTU: u16 = 23;

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
    /// How often the pack model runs when nobody writes.
    pub tick: Duration,
}

impl Default for JbdGattConfig {
    fn default() -> Self {
        JbdGattConfig {
            adapter: "hci0".into(),
            local_name: "xiaoxiang BMS".into(),
            manufacturer_data: BTreeMap::new(),
            stop_advertising_while_connected: true,
            tick: Duration::from_millis(100),
        }
    }
}

/// Splits one response frame into notification payloads of at most
/// `mtu − 3` bytes (ATT's notification header is 3 bytes), as the module's
/// UART bridge does: a 0x22-byte-payload frame at MTU 23 is 20 + 20 + 1.
pub fn split_for_mtu(frame: &[u8], mtu: u16) -> Vec<Vec<u8>> {
    let room = usize::from(mtu.max(DEFAULT_ATT_MTU)) - 3;
    frame.chunks(room).map(<[u8]>::to_vec).collect()
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

/// Commands to the task that owns the notification session.
enum NotifyCmd {
    Session(CharacteristicNotifier),
    Send(Vec<Vec<u8>>),
}

/// A write on 0xFF02, as bluer hands it over.
#[derive(Message)]
#[rtype(result = "Result<(), ReqError>")]
struct GattWrite {
    value: Vec<u8>,
    central: String,
    mtu: u16,
    request: bool,
}

#[derive(Message)]
#[rtype(result = "()")]
enum SessionEvent {
    Subscribed,
    NotifyStopped,
    /// BlueZ reports a device on our adapter (dis)connected (real BlueZ only).
    Connected(String),
    Disconnected(String),
}

#[derive(Message)]
#[rtype(result = "()")]
struct AdvertisementRegistered(Result<AdvertisementHandle, String>);

pub struct JbdBmsActor {
    name: String,
    core: JbdBms,
    cfg: JbdGattConfig,
    epoch: Instant,
    log: ObservationLog,
    adapter: bluer::Adapter,
    notify_tx: mpsc::UnboundedSender<NotifyCmd>,
    notify_rx: Option<mpsc::UnboundedReceiver<NotifyCmd>>,
    app: Option<ApplicationHandle>,
    adv: Option<AdvertisementHandle>,
    advertising_wanted: bool,
    adv_in_flight: bool,
    central: Option<String>,
    subscribed: bool,
    mtu: u16,
    last_notified: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
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
        let (notify_tx, notify_rx) = mpsc::unbounded_channel();
        let adapter_name = cfg.adapter.clone();
        let actor = JbdBmsActor {
            name: name.into(),
            core,
            epoch: log.start(),
            log,
            adapter: adapter.clone(),
            notify_tx,
            notify_rx: Some(notify_rx),
            app: None,
            adv: None,
            advertising_wanted: true,
            adv_in_flight: false,
            central: None,
            subscribed: false,
            mtu: DEFAULT_ATT_MTU,
            last_notified: Default::default(),
            cfg,
        };
        let last = actor.last_notified.clone();
        let notify_tx = actor.notify_tx.clone();
        let addr = actor.start();
        let app = adapter
            .serve_gatt_application(jbd_application(addr.clone(), notify_tx, last))
            .await
            .with_context(|| format!("registering the JBD GATT application on {adapter_name}"))?;
        addr.send(AttachApplication(app)).await.context("the JBD actor stopped")?;
        watch_adapter(adapter, addr.clone());
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
struct AttachApplication(ApplicationHandle);

#[derive(Message)]
#[rtype(result = "()")]
struct Shutdown;

/// The JBD service, as the module's GATT table has it.
fn jbd_application(
    addr: Addr<JbdBmsActor>,
    notify_tx: mpsc::UnboundedSender<NotifyCmd>,
    last_notified: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) -> Application {
    let write_addr = addr.clone();
    let subscribe_addr = addr;
    Application {
        services: vec![Service {
            uuid: SERVICE_UUID,
            primary: true,
            characteristics: vec![
                Characteristic {
                    uuid: NOTIFY_UUID,
                    read: Some(CharacteristicRead {
                        read: true,
                        fun: Box::new(move |_req| {
                            let v = last_notified.lock().map(|v| v.clone()).unwrap_or_default();
                            async move { Ok(v) }.boxed()
                        }),
                        ..Default::default()
                    }),
                    notify: Some(CharacteristicNotify {
                        notify: true,
                        method: CharacteristicNotifyMethod::Fun(Box::new(move |notifier| {
                            let tx = notify_tx.clone();
                            let addr = subscribe_addr.clone();
                            async move {
                                let _ = tx.send(NotifyCmd::Session(notifier));
                                addr.do_send(SessionEvent::Subscribed);
                            }
                            .boxed()
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Characteristic {
                    uuid: WRITE_UUID,
                    read: Some(CharacteristicRead {
                        read: true,
                        fun: Box::new(|_req| async { Ok(Vec::new()) }.boxed()),
                        ..Default::default()
                    }),
                    // Properties 0x06: read + write-without-response. BlueZ's
                    // server still lets an explicit write request through (any
                    // write flag grants write permission); the actor decides.
                    write: Some(CharacteristicWrite {
                        write_without_response: true,
                        method: CharacteristicWriteMethod::Fun(Box::new(move |value, req| {
                            let addr = write_addr.clone();
                            async move {
                                let msg = GattWrite {
                                    value,
                                    central: req.device_address.to_string(),
                                    mtu: req.mtu,
                                    request: req.op_type != bluer::gatt::WriteOp::Command,
                                };
                                addr.send(msg).await.map_err(|_| ReqError::Failed)?
                            }
                            .boxed()
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Real BlueZ publishes a Device1 for each central connected to our
/// adapter; follow their Connected property. (The virtual air has no such
/// objects; there the notification session marks the connection.)
fn watch_adapter(adapter: bluer::Adapter, addr: Addr<JbdBmsActor>) {
    tokio::spawn(async move {
        let Ok(mut events) = adapter.events().await else { return };
        while let Some(ev) = events.next().await {
            let bluer::AdapterEvent::DeviceAdded(a) = ev else { continue };
            let Ok(device) = adapter.device(a) else { continue };
            let addr = addr.clone();
            tokio::spawn(async move {
                let Ok(mut dev_events) = device.events().await else { return };
                if device.is_connected().await.unwrap_or(false) {
                    addr.do_send(SessionEvent::Connected(a.to_string()));
                }
                while let Some(bluer::DeviceEvent::PropertyChanged(p)) = dev_events.next().await {
                    if let bluer::DeviceProperty::Connected(c) = p {
                        if !addr.connected() {
                            return;
                        }
                        addr.do_send(if c { SessionEvent::Connected(a.to_string()) } else { SessionEvent::Disconnected(a.to_string()) });
                    }
                }
            });
        }
    });
}

/// Owns the notification session: sends chunks in order, reports when the
/// central unsubscribes or the link goes.
async fn notify_pump(mut rx: mpsc::UnboundedReceiver<NotifyCmd>, addr: Addr<JbdBmsActor>, last: std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let mut notifier: Option<CharacteristicNotifier> = None;
    loop {
        let stopped = async {
            match &notifier {
                Some(n) => n.stopped().await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => return,
                Some(NotifyCmd::Session(n)) => notifier = Some(n),
                Some(NotifyCmd::Send(chunks)) => {
                    let Some(n) = notifier.as_mut() else {
                        tracing::debug!("response dropped: no central subscribed to 0xFF01");
                        continue;
                    };
                    for c in chunks {
                        if let Ok(mut l) = last.lock() {
                            l.clone_from(&c);
                        }
                        if n.notify(c).await.is_err() {
                            break;
                        }
                    }
                }
            },
            _ = stopped => {
                notifier = None;
                addr.do_send(SessionEvent::NotifyStopped);
            }
        }
    }
}

impl JbdBmsActor {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn drain_events(&mut self) {
        for e in self.core.take_events() {
            match e {
                JbdEvent::Silent { reason } => self.log.push(&self.name, ObservationKind::DeviceSilent { reason }),
                other => tracing::info!(device = %self.name, event = ?other, "jbd"),
            }
        }
    }

    fn begin_session(&mut self, central: &str, ctx: &mut Context<Self>) {
        tracing::info!(device = %self.name, central, "central connected");
        self.central = Some(central.to_string());
        let now = self.now();
        self.core.connected(now);
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
        let now = self.now();
        self.core.disconnected(now);
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
        if self.adv.is_some() || self.adv_in_flight || self.app.is_none() {
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
        self.core.tick(self.now());
        if let Some(rx) = self.notify_rx.take() {
            tokio::spawn(notify_pump(rx, ctx.address(), self.last_notified.clone()));
        }
        ctx.run_interval(self.cfg.tick, |act, _| {
            act.core.tick(act.now());
            act.drain_events();
        });
    }
}

impl Handler<AttachApplication> for JbdBmsActor {
    type Result = ();
    fn handle(&mut self, msg: AttachApplication, ctx: &mut Context<Self>) {
        self.app = Some(msg.0);
        self.update_advertising(ctx);
    }
}

impl Handler<Shutdown> for JbdBmsActor {
    type Result = ();
    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) {
        self.advertising_wanted = false;
        self.adv = None;
        self.app = None;
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

impl Handler<GattWrite> for JbdBmsActor {
    type Result = Result<(), ReqError>;

    fn handle(&mut self, msg: GattWrite, ctx: &mut Context<Self>) -> Self::Result {
        match &self.central {
            Some(c) if *c != msg.central => {
                tracing::info!(device = %self.name, central = %msg.central, holder = %c, "write from a second central refused");
                return Err(ReqError::NotPermitted);
            }
            Some(_) => {}
            None => self.begin_session(&msg.central, ctx),
        }
        if msg.request && self.core.rejects_write_request() {
            // The firmware only takes write commands: ATT Write Not Permitted.
            return Err(ReqError::NotPermitted);
        }
        self.mtu = msg.mtu.max(DEFAULT_ATT_MTU);
        let frames = self.core.handle_write(&msg.value, self.now());
        self.drain_events();
        let chunks: Vec<Vec<u8>> = frames.iter().flat_map(|f| split_for_mtu(f, self.mtu)).collect();
        if !chunks.is_empty() {
            let _ = self.notify_tx.send(NotifyCmd::Send(chunks));
        }
        Ok(())
    }
}

impl Handler<SessionEvent> for JbdBmsActor {
    type Result = ();
    fn handle(&mut self, msg: SessionEvent, ctx: &mut Context<Self>) {
        match msg {
            SessionEvent::Subscribed => self.subscribed = true,
            SessionEvent::NotifyStopped => {
                self.subscribed = false;
                if self.central.is_some() {
                    self.end_session(ctx);
                }
            }
            SessionEvent::Connected(c) => match &self.central {
                None => self.begin_session(&c, ctx),
                Some(holder) if *holder != c => {
                    tracing::info!(device = %self.name, central = %c, "second central connected: dropping it");
                    if let Ok(a) = c.parse::<bluer::Address>() {
                        if let Ok(d) = self.adapter.device(a) {
                            tokio::spawn(async move {
                                let _ = d.disconnect().await;
                            });
                        }
                    }
                }
                Some(_) => {}
            },
            SessionEvent::Disconnected(c) => {
                if self.central.as_deref() == Some(c.as_str()) {
                    self.end_session(ctx);
                }
            }
        }
    }
}

impl Handler<SetState> for JbdBmsActor {
    type Result = Result<(), String>;
    fn handle(&mut self, msg: SetState, _ctx: &mut Context<Self>) -> Self::Result {
        self.core.tick(self.now());
        self.core.set(&msg.key, msg.value)
    }
}

impl Handler<GetSnapshot> for JbdBmsActor {
    type Result = MessageResult<GetSnapshot>;
    fn handle(&mut self, _msg: GetSnapshot, _ctx: &mut Context<Self>) -> Self::Result {
        self.core.tick(self.now());
        MessageResult(self.core.snapshot())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_at_mtu_minus_three() {
        let frame: Vec<u8> = (0..41u8).collect(); // 0x22 payload + 7 framing bytes
        let chunks = split_for_mtu(&frame, 23);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![20, 20, 1]);
        assert_eq!(chunks.concat(), frame);
        assert_eq!(split_for_mtu(&frame, 247).len(), 1);
        // Below the ATT minimum the minimum applies.
        assert_eq!(split_for_mtu(&frame, 5)[0].len(), 20);
        assert!(split_for_mtu(&[], 23).is_empty());
    }
}
