//! The virtual BLE air: hilbench's own BlueZ on its own D-Bus broker.
//!
//! Unmodified BLE libraries talk to it exactly as to `bluetoothd`: centrals
//! (bleak, btleplug, a bluer central) see `hci0` (Roles `["central"]`) and
//! remote `Device1` objects with their GATT trees under it; peripherals (a
//! bluer peripheral, the JBD BMS device) register advertisements and GATT
//! applications on peripheral adapters `hci1…` (Roles `["peripheral"]`),
//! one adapter — one BLE address — per simulated device.
//!
//! ```text
//! central ──D-Bus──▶ /org/bluez/hci0/dev_X/serviceA/charB  ──┐
//!                                                           BleLink (MTU, faults, capture)
//! peripheral app ◀──D-Bus── ReadValue/WriteValue/Acquire* ◀─┘
//! ```
//!
//! In-process API: [`Air::start`], [`Air::add_peripheral_adapter`] (what a
//! device actor calls to get its own adapter and address), and
//! [`Air::link`] for scenario controls on one peripheral's link.

pub mod att;
pub mod broker;
mod adapter;
pub mod bus;
mod central;
mod device;
pub mod gatt;
pub mod link;
pub mod shared;
mod tree;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::{FutureExt, StreamExt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zbus::{Connection, Variant};

pub use link::{BleLink, WriteKind};

use crate::link::{FaultRule, FrameRecord};
use central::Central;
use device::RemoteDevice;

/// The BlueZ well-known name the air owns.
pub const BLUEZ: &str = "org.bluez";
/// The central adapter every client under test uses.
pub const CENTRAL_PATH: &str = "/org/bluez/hci0";
/// Where the hilbench control interface lives.
pub const CONTROL_PATH: &str = "/org/hilbench/air";

/// How an air is started.
#[derive(Debug, Clone)]
pub struct AirConfig {
    /// Seeds RSSI values and every link's fault engine.
    pub seed: u64,
    /// Peripheral adapters created at start (more can be added at any time).
    pub peripheral_adapters: usize,
    /// How often an advertising device is heard again while hci0 scans.
    pub advertise_interval: Duration,
    /// Bound on every call the air forwards to a peripheral's application.
    pub call_timeout: Duration,
    /// Use this bus instead of starting our own broker.
    pub bus_address: Option<String>,
    /// How long a central keeps a device it no longer hears (and is not
    /// connected to) before removing its Device1, as BlueZ's
    /// `TemporaryTimeout` (30 s by default).
    pub temporary_timeout: Duration,
    /// How long `Device1.Connect` waits for a device that is not
    /// connectable now (not advertising, or its one link taken) before
    /// failing, as the kernel's LE connection attempt does (20 s).
    pub connect_timeout: Duration,
    /// Which broker to start when `bus_address` is None.
    pub broker: broker::BrokerKind,
}

impl Default for AirConfig {
    fn default() -> Self {
        AirConfig {
            seed: 1,
            peripheral_adapters: 0,
            advertise_interval: Duration::from_millis(250),
            call_timeout: Duration::from_secs(10),
            bus_address: None,
            temporary_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(20),
            broker: broker::BrokerKind::default(),
        }
    }
}

/// A peripheral adapter as a device actor sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeripheralAdapterInfo {
    /// `hci1`, for `bluer::Session::adapter`.
    pub name: String,
    /// `/org/bluez/hci1`
    pub path: String,
    /// The BLE address centrals see the device at, `C0:DE:00:00:00:01`.
    pub address: String,
}

/// What an advertisement says, as read from the peripheral's object.
#[derive(Debug, Clone, Default)]
pub(crate) struct AdvData {
    pub local_name: Option<String>,
    pub service_uuids: Vec<String>,
    pub manufacturer_data: BTreeMap<u16, Vec<u8>>,
    pub service_data: BTreeMap<String, Vec<u8>>,
    pub tx_power: Option<i16>,
    pub appearance: Option<u16>,
    /// General discoverable (the advertisement's `Discoverable`, true unless it says false).
    pub discoverable: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub owner: String,
    pub path: String,
}

#[derive(Default)]
pub(crate) struct PeripheralState {
    pub advertisement: Option<(Registration, AdvData)>,
    pub app: Option<(Registration, Vec<gatt::ServiceLayout>)>,
    /// The one link: the device object of the central connected to it.
    pub connection: Option<Arc<RemoteDevice>>,
    pub removed: bool,
    /// Fixed RSSI centrals hear (a scenario moved the device); else seeded random.
    pub rssi: Option<i16>,
}

/// One peripheral adapter: an address on the air and its one link.
pub(crate) struct Peripheral {
    pub name: String,
    pub path: String,
    pub address: [u8; 6],
    pub link: Arc<BleLink>,
    pub state: Mutex<PeripheralState>,
    /// Wakes connects waiting for this peripheral to become connectable.
    pub changed: tokio::sync::Notify,
}

impl Peripheral {
    pub fn address_string(&self) -> String {
        format_address(&self.address)
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, PeripheralState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn info(&self) -> PeripheralAdapterInfo {
        PeripheralAdapterInfo { name: self.name.clone(), path: self.path.clone(), address: self.address_string() }
    }
}

#[derive(Default)]
pub(crate) struct Registry {
    pub next_index: u32,
    pub peripherals: BTreeMap<u32, Arc<Peripheral>>,
    /// hci0 of the air's bus first, then hci0 of each added host.
    pub centrals: Vec<Arc<Central>>,
    /// Brokers of added hosts, by host name (dropped with the host).
    pub host_brokers: BTreeMap<String, broker::Broker>,
    pub next_host: u8,
}

pub(crate) struct AirInner {
    /// The air's own bus: peripherals' applications and the first central.
    pub conn: Connection,
    pub config: AirConfig,
    pub registry: Mutex<Registry>,
    pub rssi_rng: Mutex<ChaCha8Rng>,
    /// Wakes the advertiser at once (a scan started).
    pub advertise_now: tokio::sync::Notify,
    /// Rounds of advertisements every central has heard so far.
    pub rounds_heard: tokio::sync::watch::Sender<u64>,
    /// App characteristics (owner, path) whose PropertiesChanged are notifications.
    pub notify_routes: Mutex<HashMap<(String, String), Weak<device::RemoteChar>>>,
    /// One listener per application owner that sends notifications as
    /// PropertiesChanged: its match rule names the sender, so the bus does
    /// not hand the air back its own PropertiesChanged on hci0's
    /// characteristics (a rule for any sender would: two wasted messages
    /// per notification).
    pub notify_listeners: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl AirInner {
    pub fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a central hears from `p` now: its fixed RSSI with a little
    /// fading, or a seeded value between −78 and −42 dBm.
    pub fn next_rssi(&self, p: &Peripheral) -> i16 {
        let fixed = p.lock().rssi;
        let mut rng = self.rssi_rng.lock().unwrap_or_else(|p| p.into_inner());
        match fixed {
            Some(r) => r.saturating_add(rng.gen_range(-2..=2)).clamp(-127, 20),
            None => rng.gen_range(-78..=-42),
        }
    }

    /// The object path the peripheral's application is told the central has
    /// (`device` option): the central as a device on that peripheral adapter.
    pub fn central_as_seen_by(&self, p: &Peripheral, central: &Central) -> String {
        format!("{}/dev_{}", p.path, format_address(&central.address).replace(':', "_"))
    }

    pub fn centrals(&self) -> Vec<Arc<Central>> {
        self.registry().centrals.clone()
    }

    /// The central on the air's own bus.
    pub fn main_central(&self) -> Option<Arc<Central>> {
        self.registry().centrals.first().cloned()
    }
}

/// The running air. Dropping it stops the broker it started.
pub struct Air {
    inner: Arc<AirInner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    address: String,
    // Declared last: the connection closes before the broker goes.
    broker: Option<broker::Broker>,
}

pub use crate::protocol::hci::format_address;

fn peripheral_address(index: u32) -> [u8; 6] {
    let b = index.to_be_bytes();
    [0xC0, 0xDE, b[0], b[1], b[2], b[3]]
}

pub(crate) async fn emit_properties_changed(
    conn: &Connection,
    path: &str,
    interface: &str,
    changed: HashMap<&str, Variant<'_>>,
) {
    let invalidated: Vec<&str> = Vec::new();
    if let Err(e) = conn
        .emit_signal(
            None::<&str>,
            path,
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
            &(interface, changed, invalidated),
        )
        .await
    {
        tracing::debug!("PropertiesChanged on {path}: {e}");
    }
}

/// How a read-only call to a peripheral's application ended without an answer.
#[derive(Debug)]
pub(crate) enum AppCallError {
    /// The application answered with an error (or the bus did for it).
    Failed(zbus::Error),
    /// No answer within the air's call timeout, although asked `attempts` times.
    NoAnswer { waited: Duration, attempts: u32 },
}

impl std::fmt::Display for AppCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppCallError::Failed(e) => write!(f, "{e}"),
            AppCallError::NoAnswer { waited, attempts } => {
                write!(f, "no answer in {:.1} s (asked {attempts} times)", waited.as_secs_f64())
            }
        }
    }
}

/// The first resend of an unanswered read-only call, doubled up to
/// [`RESEND_MAX`] while the call timeout lasts.
const RESEND_FIRST: Duration = Duration::from_millis(100);
const RESEND_MAX: Duration = Duration::from_millis(1600);

/// Calls a read-only method (GetAll, GetManagedObjects) on a peripheral's
/// application, asking again while no answer comes; the first answer wins.
///
/// Why: these are the first calls the air makes to a fresh application,
/// and bluer (0.17.4, and upstream at 2e52bd4) installs its method-call
/// handler in a task that `Session::new` spawns but does not wait for;
/// until that task first runs, dbus-rs's filter swallows incoming method
/// calls without an answer. On a loaded machine the peripheral's
/// RegisterAdvertisement reaches the air, and the air's GetAll reaches
/// bluer, before that, and the call is lost for good. Both methods only
/// read, so asking twice is harmless.
pub(crate) async fn call_app_read_only<B>(
    air: &AirInner,
    owner: &str,
    path: &str,
    interface: &str,
    method: &str,
    body: &B,
) -> std::result::Result<zbus::Message, AppCallError>
where
    B: serde::Serialize + zbus::DynamicType,
{
    let started = tokio::time::Instant::now();
    let deadline = started + air.config.call_timeout;
    let mut pending = futures::stream::FuturesUnordered::new();
    let ask = |n: u32| air.conn.call_method(Some(owner), path, Some(interface), method, body).map(move |r| (n, r));
    pending.push(ask(1));
    let mut attempts = 1u32;
    let mut wait = RESEND_FIRST;
    loop {
        let resend_at = (tokio::time::Instant::now() + wait).min(deadline);
        tokio::select! {
            Some((answered, reply)) = pending.next() => {
                if attempts > 1 {
                    tracing::warn!(
                        "{owner} answered {method} on {path} after {} ms, only when asked again (call {answered} of {attempts} answered first)",
                        started.elapsed().as_millis()
                    );
                }
                return reply.map_err(AppCallError::Failed);
            }
            _ = tokio::time::sleep_until(resend_at) => {
                if resend_at >= deadline {
                    return Err(AppCallError::NoAnswer { waited: started.elapsed(), attempts });
                }
                tracing::debug!("{owner} has not answered {method} on {path} in {} ms; asking again", started.elapsed().as_millis());
                attempts += 1;
                pending.push(ask(attempts));
                wait = (wait * 2).min(RESEND_MAX);
            }
        }
    }
}

impl Air {
    /// Starts the broker (unless `config.bus_address` names one), takes
    /// `org.bluez` on it and serves hci0 plus `config.peripheral_adapters`
    /// peripheral adapters. Call from inside a Tokio runtime.
    pub async fn start(config: AirConfig) -> Result<Air> {
        let broker = match &config.bus_address {
            Some(_) => None,
            None => {
                let kind = config.broker;
                Some(tokio::task::spawn_blocking(move || broker::Broker::start(kind)).await??)
            }
        };
        let address = match (&broker, &config.bus_address) {
            (Some(b), _) => b.address().to_string(),
            (None, Some(a)) => a.clone(),
            (None, None) => unreachable!("one of the two is set above"),
        };
        let conn = zbus::connection::Builder::address(address.as_str())
            .serve_at("/", tree::AirObjectManager::default())
            .build()
            .await
            .with_context(|| format!("connecting the air to {address}"))?;
        let inner = Arc::new(AirInner {
            conn: conn.clone(),
            registry: Mutex::new(Registry { next_index: 1, next_host: 1, ..Default::default() }),
            rssi_rng: Mutex::new(ChaCha8Rng::seed_from_u64(config.seed ^ 0x5251_5349)),
            advertise_now: tokio::sync::Notify::new(),
            rounds_heard: tokio::sync::watch::Sender::new(0),
            notify_routes: Mutex::new(HashMap::new()),
            notify_listeners: Mutex::new(HashMap::new()),
            config: config.clone(),
        });
        tree::export(&conn, CONTROL_PATH, adapter::AirControl { air: Arc::downgrade(&inner) }).await?;
        // Listen before taking the name, so no app can register and vanish unseen.
        let main = serve_central(&inner, conn.clone(), "", &address, 0).await?;
        let tasks = vec![tokio::spawn(advertise(inner.clone()))];
        let air = Air { inner, tasks, address, broker };
        for _ in 0..config.peripheral_adapters {
            air.add_peripheral_adapter().await?;
        }
        take_bluez(&conn).await.context("taking org.bluez on the air's bus")?;
        drop(main);
        Ok(air)
    }

    /// Another machine near the devices (a phone, a second gateway): its
    /// own bus, from a broker of its own, with its own `hci0`. A BLE
    /// library there (`DBUS_SYSTEM_BUS_ADDRESS` = the returned bus) sees
    /// the same peripherals and competes for their links.
    pub async fn add_host(&self, name: &str) -> Result<HostInfo> {
        if name.is_empty() || self.inner.centrals().iter().any(|c| c.host == name) {
            anyhow::bail!("a host needs a new, non-empty name (`{name}` is taken or empty)");
        }
        let kind = self.inner.config.broker;
        let broker = tokio::task::spawn_blocking(move || broker::Broker::start(kind)).await??;
        let address = broker.address().to_string();
        let conn = zbus::connection::Builder::address(address.as_str())
            .serve_at("/", tree::AirObjectManager::default())
            .build()
            .await
            .with_context(|| format!("connecting the air to host {name}'s bus {address}"))?;
        let index = {
            let mut r = self.inner.registry();
            let i = r.next_host;
            r.next_host = r.next_host.wrapping_add(1);
            r.host_brokers.insert(name.to_string(), broker);
            i
        };
        let served = async {
            let central = serve_central(&self.inner, conn.clone(), name, &address, index).await?;
            take_bluez(&conn).await.with_context(|| format!("taking org.bluez on host {name}'s bus"))?;
            Ok::<_, anyhow::Error>(central)
        }
        .await;
        let central = match served {
            Ok(c) => c,
            Err(e) => {
                // Nothing half-made stays: no central, no broker.
                let _ = self.remove_host(name).await;
                let broker = self.inner.registry().host_brokers.remove(name);
                if let Some(b) = broker {
                    let _ = tokio::task::spawn_blocking(move || drop(b)).await;
                }
                return Err(e);
            }
        };
        self.inner.advertise_now.notify_one();
        Ok(host_info(&central))
    }

    /// Removes a host added with [`Air::add_host`]: its links drop, its bus goes.
    pub async fn remove_host(&self, name: &str) -> Result<()> {
        let central = {
            let mut r = self.inner.registry();
            let i = r.centrals.iter().position(|c| !c.host.is_empty() && c.host == name).ok_or_else(|| anyhow::anyhow!("no host `{name}`"))?;
            r.centrals.remove(i)
        };
        let devices: Vec<Arc<RemoteDevice>> = std::mem::take(&mut *central.devices()).into_values().collect();
        for d in devices {
            d.disconnect(&self.inner, "host removed").await;
            d.unpublish().await;
        }
        central.stop();
        let _ = central.conn.release_name(BLUEZ).await;
        drop(central);
        let broker = self.inner.registry().host_brokers.remove(name);
        if let Some(b) = broker {
            let _ = tokio::task::spawn_blocking(move || drop(b)).await;
        }
        Ok(())
    }

    /// The added hosts (not the air's own bus).
    pub fn hosts(&self) -> Vec<HostInfo> {
        self.inner.centrals().iter().filter(|c| !c.host.is_empty()).map(|c| host_info(c)).collect()
    }

    /// The bus address, for `DBUS_SYSTEM_BUS_ADDRESS`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The air's own central adapter's address (what peripherals see connecting).
    pub fn central_address(&self) -> String {
        self.inner.main_central().map(|c| c.address_string()).unwrap_or_default()
    }

    /// A new peripheral adapter with an address of its own; a device actor
    /// registers its advertisement and GATT application on it.
    pub async fn add_peripheral_adapter(&self) -> Result<PeripheralAdapterInfo> {
        adapter::add_peripheral_adapter(&self.inner).await.map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Removes a peripheral adapter (`hci3` or `/org/bluez/hci3`): its
    /// device disconnects and disappears from hci0.
    pub async fn remove_peripheral_adapter(&self, name: &str) -> Result<()> {
        adapter::remove_peripheral_adapter(&self.inner, name).await.map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn peripheral_adapters(&self) -> Vec<PeripheralAdapterInfo> {
        self.inner.registry().peripherals.values().map(|p| p.info()).collect()
    }

    /// Controls for the link to one peripheral, by adapter name, adapter
    /// path or BLE address.
    pub fn link(&self, which: &str) -> Option<LinkControl> {
        let p = self
            .inner
            .registry()
            .peripherals
            .values()
            .find(|p| p.name == which || p.path == which || p.address_string().eq_ignore_ascii_case(which))
            .cloned()?;
        Some(LinkControl { air: Arc::downgrade(&self.inner), peripheral: p })
    }

    /// Returns once every central has heard a whole round of advertisements
    /// that began after the call (the next round is started at once): what
    /// a scan has not reported by then, its filters did not let through,
    /// and what a central still caches then, it kept past a silent round.
    pub async fn full_round_heard(&self) {
        let mut rounds = self.inner.rounds_heard.subscribe();
        // The round under way may have begun before the call: wait for the one after it.
        let target = *rounds.borrow_and_update() + 2;
        while *rounds.borrow_and_update() < target {
            self.inner.advertise_now.notify_one();
            if rounds.changed().await.is_err() {
                return;
            }
        }
    }

    /// Stops serving; the broker (if ours) goes with the Air.
    pub async fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.inner.stop_listeners();
        for h in self.hosts() {
            let _ = self.remove_host(&h.name).await;
        }
        for c in self.inner.centrals() {
            c.stop();
        }
        let _ = self.inner.conn.release_name(BLUEZ).await;
        let conn = self.inner.conn.clone();
        let _ = conn.close().await;
        if let Some(b) = self.broker.take() {
            let _ = tokio::task::spawn_blocking(move || drop(b)).await;
        }
    }
}

impl Drop for Air {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.inner.stop_listeners();
        let centrals = std::mem::take(&mut self.inner.registry().centrals);
        for c in centrals {
            c.stop();
            c.devices().clear();
        }
    }
}

/// Where another machine's BLE library finds its own BlueZ.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostInfo {
    pub name: String,
    /// For that machine's `DBUS_SYSTEM_BUS_ADDRESS`.
    pub dbus_system_bus_address: String,
    /// Always `hci0`: the only adapter on that bus.
    pub adapter: String,
    /// What peripherals see connecting from that machine.
    pub address: String,
}

fn host_info(c: &Central) -> HostInfo {
    HostInfo { name: c.host.clone(), dbus_system_bus_address: c.bus_address.clone(), adapter: "hci0".into(), address: c.address_string() }
}

/// Serves `hci0` (and `/org/bluez`) on `conn` as one machine's central
/// and follows its clients leaving.
async fn serve_central(air: &Arc<AirInner>, conn: Connection, host: &str, bus_address: &str, index: u8) -> Result<Arc<Central>> {
    let central = Arc::new(Central {
        host: host.to_string(),
        conn: conn.clone(),
        bus_address: bus_address.to_string(),
        address: [0xC0, 0xDE, 0xC0, 0xDE, 0x00, index],
        scan: Mutex::new(Default::default()),
        devices: Mutex::new(BTreeMap::new()),
        tasks: Mutex::new(Vec::new()),
    });
    tree::export(&conn, "/org/bluez", adapter::BluezRoot).await?;
    tree::export(
            &conn,
            CENTRAL_PATH,
            adapter::Adapter1::new("hci0", adapter::AdapterRole::Central { air: Arc::downgrade(air), central: Arc::downgrade(&central) }),
        )
        .await?;
    let watcher = watch_owners(Arc::downgrade(air), Arc::downgrade(&central), conn).await?;
    central.add_task(tokio::spawn(watcher));
    air.registry().centrals.push(central.clone());
    Ok(central)
}

/// Scenario controls for one peripheral's link. Faults use the project's
/// fault vocabulary: `Direction::Request` is central → peripheral (writes),
/// `Direction::Response` peripheral → central (notifications, read values).
#[derive(Clone)]
pub struct LinkControl {
    air: Weak<AirInner>,
    peripheral: Arc<Peripheral>,
}

impl LinkControl {
    pub fn link(&self) -> &BleLink {
        &self.peripheral.link
    }
    pub fn add_fault(&self, rule: FaultRule) {
        self.peripheral.link.add_fault(rule)
    }
    pub fn clear_faults(&self) {
        self.peripheral.link.clear_faults()
    }
    /// Sets the ATT MTU (clamped to 23..=517) and updates the MTU property
    /// of a connected device's characteristics.
    pub async fn set_mtu(&self, mtu: u16) -> u16 {
        let m = self.peripheral.link.set_mtu(mtu);
        let dev = self.peripheral.lock().connection.clone();
        if let Some(dev) = dev {
            dev.announce_mtu(m).await;
        }
        m
    }
    /// Moves the device: centrals hear it at about this RSSI (dBm), or at
    /// a seeded random one again with `None`.
    pub fn set_rssi(&self, rssi: Option<i16>) {
        self.peripheral.lock().rssi = rssi.map(|r| r.clamp(-127, 20));
    }
    pub fn refuse_connections(&self, on: bool) {
        self.peripheral.link.set_refuse_connections(on)
    }
    pub fn stop_advertising_while_connected(&self, on: bool) {
        self.peripheral.link.set_stop_advertising_while_connected(on)
    }
    pub fn reject_write(&self, kind: Option<WriteKind>) {
        self.peripheral.link.set_rejected_write(kind)
    }
    pub fn set_att_timeout(&self, t: Duration) {
        self.peripheral.link.set_att_timeout(t)
    }
    /// Drops the connection now, as a peripheral going out of range does.
    pub async fn disconnect_now(&self) {
        let dev = self.peripheral.lock().connection.clone();
        if let (Some(air), Some(dev)) = (self.air.upgrade(), dev) {
            dev.disconnect(&air, "link lost").await;
        }
    }
    pub fn is_connected(&self) -> bool {
        self.peripheral.lock().connection.as_ref().is_some_and(|d| d.is_connected())
    }
    /// Whether some central's Device1.Connect to this device is waiting:
    /// what a test waits for before it checks that the Connect waits.
    pub fn connect_pending(&self) -> bool {
        let Some(air) = self.air.upgrade() else { return false };
        let pending = air.centrals().iter().any(|c| c.device(&self.peripheral.address).is_some_and(|d| d.is_connecting()));
        pending
    }
    /// The host holding the link: `""` for the air's own bus, a host name, or None.
    pub fn connected_host(&self) -> Option<String> {
        self.peripheral.lock().connection.as_ref().filter(|d| d.is_connected()).map(|d| d.central.host.clone())
    }
    pub fn frames(&self) -> Vec<FrameRecord> {
        self.peripheral.link.frames()
    }
    /// The ATT PDUs that went over this link (after faults), oldest first,
    /// for [`crate::link::capture::PcapngCapture`] ([`crate::link::capture::CaptureFormat::BleAtt`]).
    pub fn att_frames(&self) -> Vec<FrameRecord> {
        self.peripheral.link.att_frames()
    }
    pub fn info(&self) -> PeripheralAdapterInfo {
        self.peripheral.info()
    }
}

/// Clean up after a client of `central`'s bus that left: its discovery
/// session and notification sessions, and on the air's own bus whatever a
/// peripheral registered.
async fn watch_owners(air: Weak<AirInner>, central: Weak<Central>, conn: Connection) -> Result<impl std::future::Future<Output = ()>> {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.freedesktop.DBus")
        .interface("org.freedesktop.DBus")
        .member("NameOwnerChanged")
        .build()?;
    let mut stream = zbus::MessageStream::for_match_rule(rule, &conn, None).await?;
    Ok(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let Ok((name, _old, new)) = msg.body().deserialize::<(String, String, String)>() else { continue };
            if !name.starts_with(':') || !new.is_empty() {
                continue;
            }
            let (Some(air), Some(central)) = (air.upgrade(), central.upgrade()) else { return };
            // Cleaning up calls the applications (StopNotify): done aside,
            // so this stream keeps draining and zbus's reader (which waits
            // for room in every stream) keeps delivering those answers.
            tokio::spawn(async move { adapter::owner_gone(&air, &central, &name).await });
        }
    })
}

impl AirInner {
    /// Listens to `owner`'s PropertiesChanged on its characteristics (once
    /// per owner); returns when the bus has the match rule, so nothing the
    /// application sends after this is missed.
    pub(crate) async fn listen_to_app(self: &Arc<Self>, owner: &str) -> zbus::Result<()> {
        let listening = |l: &HashMap<String, tokio::task::JoinHandle<()>>| l.get(owner).is_some_and(|t| !t.is_finished());
        if listening(&self.listeners()) {
            return Ok(());
        }
        let route = route_notifications(Arc::downgrade(self), self.conn.clone(), owner).await?;
        let mut listeners = self.listeners();
        // Another subscriber's call got there first: zbus counts the rule
        // twice, and this stream's drop takes one back.
        if !listening(&listeners) {
            listeners.insert(owner.to_string(), tokio::spawn(route));
        }
        Ok(())
    }

    /// The owner left: its listener (and its match rule) goes.
    pub(crate) fn forget_app(&self, owner: &str) {
        if let Some(t) = self.listeners().remove(owner) {
            t.abort();
        }
    }

    fn listeners(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::JoinHandle<()>>> {
        self.notify_listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops every listener (their streams hold the connection open).
    fn stop_listeners(&self) {
        for (_, t) in self.listeners().drain() {
            t.abort();
        }
    }
}

/// Every PropertiesChanged(Value) an application emits on a characteristic
/// is a notification, if a central subscribed to it.
async fn route_notifications(air: Weak<AirInner>, conn: Connection, owner: &str) -> zbus::Result<impl std::future::Future<Output = ()>> {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(owner)
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .arg(0, "org.bluez.GattCharacteristic1")
        .build()?;
    let mut stream = zbus::MessageStream::for_match_rule(rule, &conn, None).await?;
    Ok(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let header = msg.header();
            let (Some(sender), Some(path)) = (header.sender(), header.path()) else { continue };
            let Some(air) = air.upgrade() else { return };
            let target = air
                .notify_routes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(sender.to_string(), path.to_string()))
                .and_then(Weak::upgrade);
            let Some(ch) = target else { continue };
            let Ok((_iface, changed, _inv)) =
                msg.body().deserialize::<(String, HashMap<String, zbus::OwnedVariant>, Vec<String>)>()
            else {
                continue;
            };
            let Some(value): Option<Vec<u8>> = changed.get("Value").and_then(|v| Vec::<u8>::try_from(v.try_clone().ok()?).ok()) else {
                continue;
            };
            ch.notify_from_app(&air, &value).await;
        }
    })
}

/// Takes `org.bluez` for good: no replacement allowed (zbus's default
/// flags allow it, and any client could then take the name and leave the
/// air unreachable), and no queueing behind someone who holds it already.
async fn take_bluez(conn: &Connection) -> Result<()> {
    use zbus::fdo::{RequestNameFlags, RequestNameReply};
    match conn.request_name_with_flags(BLUEZ, RequestNameFlags::DO_NOT_QUEUE).await? {
        RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner => Ok(()),
        other => anyhow::bail!("{BLUEZ} is held by another connection ({other:?})"),
    }
}

/// While a central scans, every advertising device its clients' filters
/// let through is heard again every `advertise_interval` (RSSI varies,
/// seeded), so a scanner that started late still sees it; a new scan hears
/// everyone at once. Devices no one has heard for the temporary timeout
/// leave their central's cache.
async fn advertise(air: Arc<AirInner>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(air.config.advertise_interval) => {}
            _ = air.advertise_now.notified() => {}
        }
        for central in air.centrals() {
            expire_devices(&central, air.config.temporary_timeout).await;
            hear(&air, &central).await;
        }
        air.rounds_heard.send_modify(|n| *n += 1);
    }
}

async fn expire_devices(central: &Central, timeout: Duration) {
    let expired: Vec<Arc<RemoteDevice>> = {
        let mut devices = central.devices();
        let keys: Vec<[u8; 6]> = devices.iter().filter(|(_, d)| d.expired(timeout)).map(|(k, _)| *k).collect();
        keys.iter().filter_map(|k| devices.remove(k)).collect()
    };
    for d in expired {
        tracing::debug!("{}: not heard for {:?}, removed from host `{}`", d.path, timeout, central.host);
        d.unpublish().await;
    }
}

/// One round of advertisements as `central` hears them.
async fn hear(air: &Arc<AirInner>, central: &Arc<Central>) {
    let Some(filter) = central.scan().merged() else { return };
    let peripherals: Vec<Arc<Peripheral>> = air.registry().peripherals.values().cloned().collect();
    for p in peripherals {
        let (adv, connected) = {
            let st = p.lock();
            (st.advertisement.as_ref().map(|(_, a)| a.clone()), st.connection.is_some())
        };
        let Some(adv) = adv else { continue };
        if connected && p.link.stops_advertising_while_connected() {
            continue;
        }
        let rssi = air.next_rssi(&p);
        if !filter.matches(&adv, &p.address_string(), rssi) {
            continue;
        }
        match central.device(&p.address) {
            Some(d) => d.heard(adv, rssi, filter.duplicate_data()).await,
            None => {
                let d = RemoteDevice::new(central, p.clone(), adv, rssi);
                central.devices().insert(p.address, d.clone());
                if let Err(e) = d.publish(air).await {
                    tracing::warn!("{}: cannot publish on host `{}`: {e}", d.path, central.host);
                }
            }
        }
    }
}
