//! A peripheral as hci0 sees it: the remote `Device1` and, once connected,
//! its GATT tree, every call on which is bridged to the peripheral's
//! application through the peripheral's [`BleLink`](super::BleLink).

use std::collections::{BTreeSet, HashMap};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, Weak};

use tokio::net::UnixDatagram;
use tokio::sync::mpsc;
use zbus::message::Header;
use zbus::{interface, Connection, ObjectPath, OwnedObjectPath, OwnedVariant, Variant};

use super::adapter::{BluezError, Result};
use super::tree::{export, unexport};
use super::att::{self, WriteProcedure, WriteRefusal};
use super::gatt::{CharacteristicLayout, DescriptorLayout};
use super::central::Central;
use super::{emit_properties_changed, AdvData, AirInner, Peripheral, CENTRAL_PATH};
use crate::link::Direction;

const DEVICE_IFACE: &str = "org.bluez.Device1";
const CHAR_IFACE: &str = "org.bluez.GattCharacteristic1";

struct DeviceState {
    adv: AdvData,
    rssi: i16,
    connected: bool,
    connecting: bool,
    /// Device1.Disconnect while connecting: the pending Connect gives up.
    cancel_connect: bool,
    services_resolved: bool,
    published: bool,
    /// Last heard, or last disconnected: the cache timeout counts from here.
    last_seen: std::time::Instant,
    service_paths: Vec<String>,
    chars: Vec<Arc<RemoteChar>>,
    descs: Vec<String>,
    /// Set by a client (Device1.Trusted): kept past the cache timeout, as
    /// bluetoothd makes a trusted device non-temporary.
    trusted: bool,
    /// Set by a client (Device1.Alias); `None` falls back to the name.
    alias: Option<String>,
}

/// A peripheral as one central knows it: `/org/bluez/hci0/dev_…` on that
/// central's bus.
pub(crate) struct RemoteDevice {
    pub path: String,
    pub peripheral: Arc<Peripheral>,
    pub central: Arc<Central>,
    st: Mutex<DeviceState>,
    /// Wakes a pending Connect that is being cancelled.
    cancelled: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bytes_variant(b: &[u8]) -> Variant<'static> {
    Variant::from(b.to_vec())
}

impl RemoteDevice {
    pub fn new(central: &Arc<Central>, p: Arc<Peripheral>, adv: AdvData, rssi: i16) -> Arc<Self> {
        Arc::new(RemoteDevice {
            path: format!("{CENTRAL_PATH}/dev_{}", p.address_string().replace(':', "_")),
            peripheral: p,
            central: central.clone(),
            st: Mutex::new(DeviceState {
                adv,
                rssi,
                connected: false,
                connecting: false,
                cancel_connect: false,
                services_resolved: false,
                published: false,
                last_seen: std::time::Instant::now(),
                service_paths: Vec::new(),
                chars: Vec::new(),
                descs: Vec::new(),
                trusted: false,
                alias: None,
            }),
            cancelled: tokio::sync::Notify::new(),
        })
    }

    fn conn(&self) -> &Connection {
        &self.central.conn
    }

    pub fn is_connected(&self) -> bool {
        lock(&self.st).connected
    }

    /// A Device1.Connect is waiting (for the device to advertise, or its link to come free).
    pub fn is_connecting(&self) -> bool {
        lock(&self.st).connecting
    }

    /// Not connected, not connecting, and unheard for longer than `timeout`.
    pub fn expired(&self, timeout: std::time::Duration) -> bool {
        let st = lock(&self.st);
        !st.connected && !st.connecting && !st.trusted && st.last_seen.elapsed() > timeout
    }

    /// Exports Device1 (InterfacesAdded on the central's bus).
    pub async fn publish(self: &Arc<Self>, air: &Arc<AirInner>) -> zbus::Result<()> {
        lock(&self.st).published = true;
        export(self.conn(), self.path.as_str(), Device1 { d: self.clone(), air: Arc::downgrade(air) }).await?;
        Ok(())
    }

    /// Removes the Device1 object (InterfacesRemoved) if it is still there.
    pub async fn unpublish(&self) {
        let was = std::mem::replace(&mut lock(&self.st).published, false);
        if was {
            let _ = unexport::<Device1>(self.conn(), self.path.as_str()).await;
        }
    }

    /// Heard again while its central scans: a fresh RSSI, the advertised
    /// data when it changed (or every time, when a scanning client wants
    /// duplicates).
    pub async fn heard(&self, adv: AdvData, rssi: i16, duplicate_data: bool) {
        let changed_adv = {
            let mut st = lock(&self.st);
            if !st.published {
                return;
            }
            st.rssi = rssi;
            st.last_seen = std::time::Instant::now();
            let changed = !same_advertisement(&st.adv, &adv);
            if changed {
                st.adv = adv.clone();
            }
            changed
        };
        let mut changed: HashMap<&str, Variant<'_>> = HashMap::from([("RSSI", Variant::from(rssi))]);
        if changed_adv {
            let name = adv.local_name.clone().unwrap_or_else(|| self.peripheral.address_string().replace(':', "-"));
            changed.insert("Name", Variant::from(name.clone()));
            changed.insert("Alias", Variant::from(name));
            changed.insert("UUIDs", Variant::from(adv.service_uuids.clone()));
        }
        if changed_adv || duplicate_data {
            if !adv.manufacturer_data.is_empty() {
                changed.insert("ManufacturerData", manufacturer_variant(&adv.manufacturer_data));
            }
            if !adv.service_data.is_empty() {
                changed.insert("ServiceData", service_data_variant(&adv.service_data));
            }
        }
        emit_properties_changed(self.conn(), &self.path, DEVICE_IFACE, changed).await;
    }

    pub async fn announce_mtu(&self, mtu: u16) {
        let chars = lock(&self.st).chars.clone();
        for c in chars {
            emit_properties_changed(self.conn(), &c.path, CHAR_IFACE, HashMap::from([("MTU", Variant::from(mtu))])).await;
        }
    }

    /// Builds the GATT tree from the registered application (if any) and
    /// announces ServicesResolved.
    pub async fn resolve_services(self: &Arc<Self>, air: &Arc<AirInner>) {
        self.drop_services(air).await;
        let app = self.peripheral.lock().app.clone();
        let conn = self.conn();
        if let Some((reg, layout)) = app {
            let mut service_paths = Vec::new();
            let mut chars = Vec::new();
            let mut descs = Vec::new();
            for s in &layout {
                let spath = format!("{}/service{:04x}", self.path, s.handle);
                let _ = export(conn, spath.as_str(), GattService { uuid: s.uuid.clone(), device: self.path.clone(), primary: s.primary, handle: s.handle }).await;
                for c in &s.characteristics {
                    let cpath = format!("{spath}/char{:04x}", c.handle);
                    let ch = RemoteChar::new(air, self, &reg.owner, &spath, &cpath, c.clone());
                    let _ = export(conn, cpath.as_str(), GattCharacteristic { c: ch.clone(), air: Arc::downgrade(air) }).await;
                    lock(&air.notify_routes).insert((reg.owner.clone(), c.app_path.clone()), Arc::downgrade(&ch));
                    for d in &c.descriptors {
                        let dpath = format!("{cpath}/desc{:04x}", d.handle);
                        let _ = export(conn, dpath.as_str(), GattDescriptor { d: d.clone(), characteristic: ch.clone(), air: Arc::downgrade(air) }).await;
                        descs.push(dpath);
                    }
                    chars.push(ch);
                }
                service_paths.push(spath);
            }
            let mut st = lock(&self.st);
            st.service_paths = service_paths;
            st.chars = chars;
            st.descs = descs;
        }
        lock(&self.st).services_resolved = true;
        emit_properties_changed(self.conn(), &self.path, DEVICE_IFACE, HashMap::from([("ServicesResolved", Variant::from(true))])).await;
    }

    /// Removes the GATT tree (a disconnect, or the app went away).
    pub async fn drop_services(&self, air: &Arc<AirInner>) {
        let (services, chars, descs, was_resolved) = {
            let mut st = lock(&self.st);
            let was = std::mem::replace(&mut st.services_resolved, false);
            (std::mem::take(&mut st.service_paths), std::mem::take(&mut st.chars), std::mem::take(&mut st.descs), was)
        };
        let conn = self.conn();
        for c in &chars {
            lock(&air.notify_routes).remove(&(c.owner.clone(), c.layout.app_path.clone()));
            c.shut(air).await;
        }
        for d in descs {
            let _ = unexport::<GattDescriptor>(conn, d.as_str()).await;
        }
        for c in &chars {
            let _ = unexport::<GattCharacteristic>(conn, c.path.as_str()).await;
        }
        for s in services {
            let _ = unexport::<GattService>(conn, s.as_str()).await;
        }
        if was_resolved && self.is_connected() {
            emit_properties_changed(self.conn(), &self.path, DEVICE_IFACE, HashMap::from([("ServicesResolved", Variant::from(false))])).await;
        }
    }

    /// Takes the peripheral's one link if it is connectable now: advertising
    /// and not connected to anyone.
    fn try_take_link(self: &Arc<Self>) -> std::result::Result<bool, BluezError> {
        let mut pst = self.peripheral.lock();
        if pst.removed {
            return Err(BluezError::Failed("le-connection-abort-by-local".into()));
        }
        if pst.advertisement.is_none() || pst.connection.is_some() {
            return Ok(false);
        }
        pst.connection = Some(self.clone());
        Ok(true)
    }

    /// Connects as the kernel does: an LE connection attempt waits until
    /// the device advertises connectably (its one link free), for at most
    /// the air's connect timeout; Device1.Disconnect cancels it.
    pub async fn connect(self: &Arc<Self>, air: &Arc<AirInner>) -> Result<()> {
        {
            let mut st = lock(&self.st);
            if st.connected {
                return Ok(());
            }
            if st.connecting {
                return Err(BluezError::InProgress("In Progress".into()));
            }
            if !st.published {
                return Err(BluezError::DoesNotExist("Does Not Exist".into()));
            }
            st.connecting = true;
            st.cancel_connect = false;
        }
        let deadline = tokio::time::Instant::now() + air.config.connect_timeout;
        let outcome = loop {
            let changed = self.peripheral.changed.notified();
            let cancelled = self.cancelled.notified();
            tokio::pin!(changed, cancelled);
            changed.as_mut().enable();
            cancelled.as_mut().enable();
            if lock(&self.st).cancel_connect {
                break Err(BluezError::Failed("le-connection-abort-by-local".into()));
            }
            match self.try_take_link() {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
            tokio::select! {
                _ = changed => {}
                _ = cancelled => {}
                _ = tokio::time::sleep_until(deadline) => break Err(BluezError::Failed("le-connection-abort-by-local".into())),
            }
        };
        let cancelled_after_taking = {
            let mut st = lock(&self.st);
            st.connecting = false;
            let cancelled = outcome.is_ok() && st.cancel_connect;
            if outcome.is_err() || cancelled {
                st.last_seen = std::time::Instant::now();
            } else {
                st.connected = true;
            }
            cancelled
        };
        if cancelled_after_taking {
            // Disconnect came as the link was taken: give it back.
            let mut pst = self.peripheral.lock();
            if pst.connection.as_ref().is_some_and(|d| Arc::ptr_eq(d, self)) {
                pst.connection = None;
            }
            drop(pst);
            self.peripheral.changed.notify_waiters();
            return Err(BluezError::Failed("le-connection-abort-by-local".into()));
        }
        outcome?;
        emit_properties_changed(self.conn(), &self.path, DEVICE_IFACE, HashMap::from([("Connected", Variant::from(true))])).await;
        if self.peripheral.link.refuses_connections() {
            // The peripheral takes the connection and terminates it at once.
            self.disconnect(air, "refused by the peripheral").await;
            return Err(BluezError::Failed("le-connection-abort-by-remote".into()));
        }
        self.resolve_services(air).await;
        Ok(())
    }

    /// Drops the link (or cancels a pending connect). The central keeps
    /// the device cached.
    pub async fn disconnect(self: &Arc<Self>, air: &Arc<AirInner>, why: &str) {
        {
            let mut st = lock(&self.st);
            st.last_seen = std::time::Instant::now();
            if st.connecting {
                st.cancel_connect = true;
                self.cancelled.notify_waiters();
            }
            if !st.connected {
                return;
            }
            st.connected = false;
        }
        tracing::debug!("{}: disconnected ({why})", self.path);
        self.drop_services(air).await;
        emit_properties_changed(
            self.conn(),
            &self.path,
            DEVICE_IFACE,
            HashMap::from([("ServicesResolved", Variant::from(false)), ("Connected", Variant::from(false))]),
        )
        .await;
        {
            let mut pst = self.peripheral.lock();
            if pst.connection.as_ref().is_some_and(|d| Arc::ptr_eq(d, self)) {
                pst.connection = None;
            }
        }
        self.peripheral.changed.notify_waiters();
    }
}

fn same_advertisement(a: &AdvData, b: &AdvData) -> bool {
    a.local_name == b.local_name
        && a.service_uuids == b.service_uuids
        && a.manufacturer_data == b.manufacturer_data
        && a.service_data == b.service_data
        && a.tx_power == b.tx_power
        && a.appearance == b.appearance
}

fn manufacturer_variant(m: &std::collections::BTreeMap<u16, Vec<u8>>) -> Variant<'static> {
    let map: HashMap<u16, Variant<'static>> = m.iter().map(|(k, v)| (*k, bytes_variant(v))).collect();
    Variant::from(map)
}

fn service_data_variant(m: &std::collections::BTreeMap<String, Vec<u8>>) -> Variant<'static> {
    let map: HashMap<String, Variant<'static>> = m.iter().map(|(k, v)| (k.clone(), bytes_variant(v))).collect();
    Variant::from(map)
}

pub struct Device1 {
    d: Arc<RemoteDevice>,
    air: Weak<AirInner>,
}

impl Device1 {
    fn air(&self) -> Result<Arc<AirInner>> {
        self.air.upgrade().ok_or_else(|| BluezError::NotReady("Resource Not Ready".into()))
    }
    fn adv(&self) -> AdvData {
        lock(&self.d.st).adv.clone()
    }
}

#[interface(name = "org.bluez.Device1")]
impl Device1 {
    async fn connect(&self, #[zbus(header)] hdr: Header<'_>) -> Result<()> {
        super::adapter::no_args(&hdr)?;
        let air = self.air()?;
        self.d.connect(&air).await
    }
    async fn disconnect(&self, #[zbus(header)] hdr: Header<'_>) -> Result<()> {
        super::adapter::no_args(&hdr)?;
        let air = self.air()?;
        self.d.disconnect(&air, "central asked").await;
        Ok(())
    }
    fn connect_profile(&self, _uuid: &str) -> Result<()> {
        Err(BluezError::NotSupported("Operation is not supported".into()))
    }
    fn disconnect_profile(&self, _uuid: &str) -> Result<()> {
        Err(BluezError::NotSupported("Operation is not supported".into()))
    }
    fn pair(&self) -> Result<()> {
        Err(BluezError::NotSupported("pairing is not simulated by the air".into()))
    }
    fn cancel_pairing(&self) -> Result<()> {
        Err(BluezError::DoesNotExist("Does Not Exist".into()))
    }

    #[zbus(property)]
    fn address(&self) -> String {
        self.d.peripheral.address_string()
    }
    #[zbus(property)]
    fn address_type(&self) -> &str {
        "public"
    }
    #[zbus(property)]
    fn name(&self) -> String {
        self.adv().local_name.unwrap_or_else(|| self.d.peripheral.address_string().replace(':', "-"))
    }
    #[zbus(property)]
    fn alias(&self) -> String {
        // The guard must be gone before name() locks the state again.
        let alias = lock(&self.d.st).alias.clone();
        alias.unwrap_or_else(|| self.name())
    }
    /// An empty alias goes back to the name (bluez's set_alias).
    #[zbus(property)]
    fn set_alias(&self, v: String) {
        lock(&self.d.st).alias = (!v.is_empty()).then_some(v);
    }
    #[zbus(property)]
    fn appearance(&self) -> u16 {
        self.adv().appearance.unwrap_or(0)
    }
    #[zbus(property)]
    fn paired(&self) -> bool {
        false
    }
    #[zbus(property)]
    fn bonded(&self) -> bool {
        false
    }
    #[zbus(property)]
    fn trusted(&self) -> bool {
        lock(&self.d.st).trusted
    }
    #[zbus(property)]
    fn set_trusted(&self, v: bool) {
        lock(&self.d.st).trusted = v;
    }
    #[zbus(property)]
    fn blocked(&self) -> bool {
        false
    }
    #[zbus(property)]
    fn legacy_pairing(&self) -> bool {
        false
    }
    #[zbus(property, name = "RSSI")]
    fn rssi(&self) -> i16 {
        lock(&self.d.st).rssi
    }
    #[zbus(property)]
    fn tx_power(&self) -> i16 {
        self.adv().tx_power.unwrap_or(0)
    }
    #[zbus(property)]
    fn connected(&self) -> bool {
        self.d.is_connected()
    }
    #[zbus(property, name = "UUIDs")]
    fn uuids(&self) -> Vec<String> {
        self.adv().service_uuids
    }
    #[zbus(property)]
    fn adapter(&self) -> OwnedObjectPath {
        OwnedObjectPath::from(ObjectPath::from_static_str_unchecked(CENTRAL_PATH))
    }
    #[zbus(property)]
    fn manufacturer_data(&self) -> HashMap<u16, Variant<'static>> {
        self.adv().manufacturer_data.iter().map(|(k, v)| (*k, bytes_variant(v))).collect()
    }
    #[zbus(property)]
    fn service_data(&self) -> HashMap<String, Variant<'static>> {
        self.adv().service_data.iter().map(|(k, v)| (k.clone(), bytes_variant(v))).collect()
    }
    #[zbus(property)]
    fn services_resolved(&self) -> bool {
        lock(&self.d.st).services_resolved
    }
}

pub struct GattService {
    uuid: String,
    device: String,
    primary: bool,
    handle: u16,
}

#[interface(name = "org.bluez.GattService1")]
impl GattService {
    #[zbus(property, name = "UUID")]
    fn uuid(&self) -> String {
        self.uuid.clone()
    }
    #[zbus(property)]
    fn device(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(self.device.clone()).unwrap_or_else(|_| OwnedObjectPath::from(ObjectPath::from_static_str_unchecked("/")))
    }
    #[zbus(property)]
    fn primary(&self) -> bool {
        self.primary
    }
    #[zbus(property)]
    fn includes(&self) -> Vec<OwnedObjectPath> {
        Vec::new()
    }
    #[zbus(property)]
    fn handle(&self) -> u16 {
        self.handle
    }
}

/// How the peripheral's application is currently sending notifications.
enum AppNotify {
    Off,
    /// StartNotify was called: values come as PropertiesChanged.
    Started,
    /// AcquireNotify: values come on a socket; the task reads it.
    Acquired(tokio::task::JoinHandle<()>),
}

struct CharState {
    value: Vec<u8>,
    notify_clients: BTreeSet<String>,
    notify_socket: Option<Arc<UnixDatagram>>,
    notify_socket_task: Option<tokio::task::JoinHandle<()>>,
    write_socket_task: Option<tokio::task::JoinHandle<()>>,
    app_notify: AppNotify,
    app_write_socket: Option<Arc<UnixDatagram>>,
    request_busy: bool,
    read_busy: bool,
}

pub(crate) struct RemoteChar {
    pub path: String,
    service_path: String,
    pub owner: String,
    pub layout: CharacteristicLayout,
    device: Weak<RemoteDevice>,
    peripheral: Arc<Peripheral>,
    central: Arc<Central>,
    commands: mpsc::UnboundedSender<Vec<u8>>,
    command_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    st: Mutex<CharState>,
}

fn socket_pair() -> std::io::Result<(OwnedFd, Arc<UnixDatagram>)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (theirs, ours) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let ours = std::os::unix::net::UnixDatagram::from(ours);
    ours.set_nonblocking(true)?;
    Ok((theirs, Arc::new(UnixDatagram::from_std(ours)?)))
}

fn socket_from(fd: OwnedFd) -> std::io::Result<Arc<UnixDatagram>> {
    let s = std::os::unix::net::UnixDatagram::from(fd);
    s.set_nonblocking(true)?;
    Ok(Arc::new(UnixDatagram::from_std(s)?))
}

/// The central's error for an application's answer (via the ATT error the
/// peripheral's server would send).
fn app_error(e: zbus::Error, permission: u8) -> BluezError {
    tracing::debug!("application answered {e}");
    BluezError::from_att(app_error_code(&e, permission))
}

/// The ATT error code the peripheral's server sends for an application's error.
fn app_error_code(e: &zbus::Error, permission: u8) -> u8 {
    match e {
        zbus::Error::MethodError(name, detail, _) => att::app_error_to_att(name.as_str(), detail.as_deref().unwrap_or(""), permission),
        _ => att::UNLIKELY,
    }
}

/// A write that did not reach the application: the ATT error the server
/// answers with, and the error the central gets.
struct WriteFailure {
    att: u8,
    error: BluezError,
}

impl WriteFailure {
    fn app(e: zbus::Error) -> Self {
        let att = app_error_code(&e, att::WRITE_NOT_PERMITTED);
        WriteFailure { att, error: app_error(e, att::WRITE_NOT_PERMITTED) }
    }
    fn local(error: BluezError) -> Self {
        WriteFailure { att: att::UNLIKELY, error }
    }
}

impl RemoteChar {
    fn new(air: &Arc<AirInner>, dev: &Arc<RemoteDevice>, owner: &str, service_path: &str, path: &str, layout: CharacteristicLayout) -> Arc<Self> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let ch = Arc::new(RemoteChar {
            path: path.to_string(),
            service_path: service_path.to_string(),
            owner: owner.to_string(),
            layout,
            device: Arc::downgrade(dev),
            peripheral: dev.peripheral.clone(),
            central: dev.central.clone(),
            commands: tx,
            command_task: Mutex::new(None),
            st: Mutex::new(CharState {
                value: Vec::new(),
                notify_clients: BTreeSet::new(),
                notify_socket: None,
                notify_socket_task: None,
                write_socket_task: None,
                app_notify: AppNotify::Off,
                app_write_socket: None,
                request_busy: false,
                read_busy: false,
            }),
        });
        // Write commands reach the application in the order they were sent.
        let weak = Arc::downgrade(&ch);
        let air_w = Arc::downgrade(air);
        let task = tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                let (Some(ch), Some(air)) = (weak.upgrade(), air_w.upgrade()) else { return };
                if let Err(f) = ch.forward_write(&air, &bytes, WriteProcedure::Command, 0).await {
                    tracing::debug!("{}: write command lost: {}", ch.path, f.error);
                }
            }
        });
        *lock(&ch.command_task) = Some(task);
        ch
    }

    fn connected(&self) -> bool {
        self.device.upgrade().is_some_and(|d| d.is_connected())
    }

    fn options(&self, air: &AirInner, extra: &[(&'static str, Variant<'static>)]) -> HashMap<&'static str, Variant<'static>> {
        let device = air.central_as_seen_by(&self.peripheral, &self.central);
        let mut o: HashMap<&'static str, Variant<'static>> = HashMap::from([
            ("device", Variant::from(ObjectPath::try_from(device).unwrap_or_else(|_| ObjectPath::from_static_str_unchecked("/")))),
            ("mtu", Variant::from(self.peripheral.link.mtu())),
            ("link", Variant::from("LE".to_string())),
        ]);
        for (k, v) in extra {
            o.insert(k, v.try_clone().unwrap_or_else(|_| Variant::from(0u8)));
        }
        o
    }

    async fn call_app(&self, air: &AirInner, method: &str, body: &(impl serde::Serialize + zbus::DynamicType)) -> zbus::Result<zbus::Message> {
        let call = air.conn.call_method(Some(self.owner.as_str()), self.layout.app_path.as_str(), Some(CHAR_IFACE), method, body);
        match tokio::time::timeout(air.config.call_timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(zbus::Error::Failure(format!("{method} on {}: the application did not answer in time", self.layout.app_path))),
        }
    }

    /// Stops everything this characteristic runs (disconnect or app gone).
    async fn shut(&self, air: &AirInner) {
        if let Some(t) = lock(&self.command_task).take() {
            t.abort();
        }
        let app_notify = {
            let mut st = lock(&self.st);
            st.notify_clients.clear();
            st.notify_socket = None;
            st.app_write_socket = None;
            if let Some(t) = st.notify_socket_task.take() {
                t.abort();
            }
            if let Some(t) = st.write_socket_task.take() {
                t.abort();
            }
            std::mem::replace(&mut st.app_notify, AppNotify::Off)
        };
        self.end_app_notify(air, app_notify).await;
    }

    async fn end_app_notify(&self, air: &AirInner, state: AppNotify) {
        if !matches!(state, AppNotify::Off) && self.connected() {
            self.record_ccc_write(false);
        }
        match state {
            AppNotify::Off => {}
            AppNotify::Started => {
                if let Err(e) = self.call_app(air, "StopNotify", &()).await {
                    tracing::debug!("{}: StopNotify: {e}", self.layout.app_path);
                }
            }
            // Closing our end tells the application the session is over.
            AppNotify::Acquired(t) => t.abort(),
        }
    }

    /// The first subscriber turns the application's notifications on.
    async fn start_app_notify(self: &Arc<Self>, air: &Arc<AirInner>) -> Result<()> {
        {
            let mut st = lock(&self.st);
            if !matches!(st.app_notify, AppNotify::Off) {
                return Ok(());
            }
            // Set before the call: the app may notify before it answers.
            st.app_notify = AppNotify::Started;
        }
        // The server answers the CCC write itself, then tells the app.
        self.record_ccc_write(true);
        if self.layout.notify_acquired {
            let reply = self.call_app(air, "AcquireNotify", &(self.options(air, &[]),)).await;
            let fd = reply.and_then(|m| m.body().deserialize::<(zbus::OwnedFd, u16)>());
            match fd {
                Ok((fd, _mtu)) => {
                    let sock = socket_from(OwnedFd::from(fd)).map_err(|e| BluezError::Failed(e.to_string()))?;
                    let weak = Arc::downgrade(self);
                    let air_w = Arc::downgrade(air);
                    let task = tokio::spawn(async move {
                        let mut buf = vec![0u8; 1024];
                        loop {
                            let n = match sock.recv(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let (Some(ch), Some(air)) = (weak.upgrade(), air_w.upgrade()) else { return };
                            ch.notify_from_app(&air, &buf[..n]).await;
                        }
                    });
                    lock(&self.st).app_notify = AppNotify::Acquired(task);
                    Ok(())
                }
                Err(e) => {
                    lock(&self.st).app_notify = AppNotify::Off;
                    Err(app_error(e, att::WRITE_NOT_PERMITTED))
                }
            }
        } else {
            if let Err(e) = air.listen_to_app(&self.owner).await {
                lock(&self.st).app_notify = AppNotify::Off;
                return Err(BluezError::Failed(format!("cannot listen to {}: {e}", self.owner)));
            }
            match self.call_app(air, "StartNotify", &()).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    lock(&self.st).app_notify = AppNotify::Off;
                    Err(app_error(e, att::WRITE_NOT_PERMITTED))
                }
            }
        }
    }

    /// The central writes the Client Characteristic Configuration when the
    /// first subscriber comes and the last goes: on air, a Write Request.
    fn record_ccc_write(&self, on: bool) {
        let Some(ccc) = self.layout.descriptors.iter().find(|d| d.uuid == super::gatt::CCC_UUID) else { return };
        let indicates = !self.layout.flags.iter().any(|f| f == "notify");
        let value: [u8; 2] = match (on, indicates) {
            (false, _) => [0, 0],
            (true, false) => [1, 0],
            (true, true) => [2, 0],
        };
        let link = &self.peripheral.link;
        link.record_att(Direction::Request, att::pdu_with_handle(att::opcode::WRITE_REQ, ccc.handle, &value));
        link.record_att(Direction::Response, att::pdu(att::opcode::WRITE_RSP, &[]));
    }

    /// The last subscriber gone: the application may stop.
    async fn maybe_stop_app_notify(&self, air: &AirInner) {
        let state = {
            let mut st = lock(&self.st);
            if !st.notify_clients.is_empty() || st.notify_socket.is_some() {
                return;
            }
            std::mem::replace(&mut st.app_notify, AppNotify::Off)
        };
        self.end_app_notify(air, state).await;
    }

    /// A value the application sent: cut to MTU − 3 as BlueZ's server does,
    /// through the link, to every subscriber.
    pub async fn notify_from_app(self: &Arc<Self>, air: &Arc<AirInner>, value: &[u8]) {
        if !self.connected() || matches!(lock(&self.st).app_notify, AppNotify::Off) {
            return;
        }
        let payload = att::notification_payload(value, self.peripheral.link.mtu());
        for e in self.peripheral.link.process(Direction::Response, payload) {
            if e.after.is_zero() {
                self.deliver(air, e.bytes).await;
            } else {
                let ch = self.clone();
                let air = air.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(e.after).await;
                    ch.deliver(&air, e.bytes).await;
                });
            }
        }
    }

    async fn deliver(&self, air: &AirInner, bytes: Vec<u8>) {
        if !self.connected() {
            return;
        }
        let (signal, socket) = {
            let mut st = lock(&self.st);
            st.value.clone_from(&bytes);
            (!st.notify_clients.is_empty(), st.notify_socket.clone())
        };
        let indicates = self.layout.flags.iter().any(|f| f == "indicate") && !self.layout.flags.iter().any(|f| f == "notify");
        let op = if indicates { att::opcode::HANDLE_VALUE_IND } else { att::opcode::HANDLE_VALUE_NTF };
        self.peripheral.link.record_att(Direction::Response, att::pdu_with_handle(op, self.layout.value_handle, &bytes));
        if indicates {
            self.peripheral.link.record_att(Direction::Request, att::pdu(att::opcode::HANDLE_VALUE_CFM, &[]));
        }
        if let Some(s) = socket {
            // A full socket loses the notification, as a busy link would.
            let _ = s.try_send(&bytes);
        }
        if signal {
            emit_properties_changed(&self.central.conn, &self.path, CHAR_IFACE, HashMap::from([("Value", bytes_variant(&bytes))])).await;
        }
        if indicates {
            // The central confirmed the indication. Not awaited here: this
            // runs on the stream of the app's signals, which must keep
            // draining for the answer to arrive.
            let conn = air.conn.clone();
            let (owner, path, timeout) = (self.owner.clone(), self.layout.app_path.clone(), air.config.call_timeout);
            tokio::spawn(async move {
                let call = conn.call_method(Some(owner.as_str()), path.as_str(), Some(CHAR_IFACE), "Confirm", &());
                if let Ok(Err(e)) = tokio::time::timeout(timeout, call).await {
                    tracing::debug!("{path}: Confirm: {e}");
                }
            });
        }
    }

    /// One write as it reaches the peripheral's application.
    async fn forward_write(&self, air: &AirInner, bytes: &[u8], procedure: WriteProcedure, offset: u16) -> std::result::Result<(), WriteFailure> {
        if self.layout.write_acquired {
            let existing = lock(&self.st).app_write_socket.clone();
            let sock = match existing {
                Some(s) => s,
                None => {
                    let reply = self.call_app(air, "AcquireWrite", &(self.options(air, &[]),)).await;
                    let (fd, _mtu) = reply.and_then(|m| m.body().deserialize::<(zbus::OwnedFd, u16)>()).map_err(WriteFailure::app)?;
                    let s = socket_from(OwnedFd::from(fd)).map_err(|e| WriteFailure::local(BluezError::Failed(e.to_string())))?;
                    lock(&self.st).app_write_socket = Some(s.clone());
                    s
                }
            };
            return match sock.send(bytes).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    lock(&self.st).app_write_socket = None;
                    Err(WriteFailure::local(BluezError::Failed(format!("Unable to write: {e}"))))
                }
            };
        }
        let opts = self.options(air, &[("type", Variant::from(procedure.app_type().to_string())), ("offset", Variant::from(offset))]);
        if procedure == WriteProcedure::Command {
            // As BlueZ sends it (send_write in src/gatt-database.c passes no
            // reply callback for a command): no answer is asked for, so
            // none comes back over the bus, and commands go out in order
            // without waiting for one another.
            let msg = zbus::Message::method_call(self.layout.app_path.as_str(), "WriteValue")
                .destination(self.owner.as_str())
                .interface(CHAR_IFACE)
                .with_flags(zbus::message::Flags::NO_REPLY_EXPECTED)
                .build(&(bytes, opts))
                .map_err(|e| WriteFailure::local(BluezError::Failed(e.to_string())))?;
            return air.conn.send(&msg).await.map_err(|e| WriteFailure::local(BluezError::Failed(e.to_string())));
        }
        self.call_app(air, "WriteValue", &(bytes, opts)).await.map(|_| ()).map_err(WriteFailure::app)
    }

    /// A write command from the central: through the link, then queued for
    /// the application in order. Refused commands vanish silently.
    fn send_command(self: &Arc<Self>, bytes: &[u8]) {
        let emissions = self.peripheral.link.process(Direction::Request, bytes);
        let refused = !att::server_accepts_write(&self.layout.flags)
            || self.peripheral.link.rejected_write() == Some(super::WriteKind::Command);
        if refused {
            // On air all the same; the server drops it without a word.
            for e in emissions {
                self.peripheral.link.record_att(Direction::Request, att::pdu_with_handle(att::opcode::WRITE_CMD, self.layout.value_handle, &e.bytes));
            }
            return;
        }
        let handle = self.layout.value_handle;
        for e in emissions {
            if e.after.is_zero() {
                self.peripheral.link.record_att(Direction::Request, att::pdu_with_handle(att::opcode::WRITE_CMD, handle, &e.bytes));
                let _ = self.commands.send(e.bytes);
            } else {
                let tx = self.commands.clone();
                let link = self.peripheral.link.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(e.after).await;
                    link.record_att(Direction::Request, att::pdu_with_handle(att::opcode::WRITE_CMD, handle, &e.bytes));
                    let _ = tx.send(e.bytes);
                });
            }
        }
    }

    async fn write_request(&self, air: &AirInner, bytes: &[u8], procedure: WriteProcedure, offset: u16) -> Result<()> {
        let link = &self.peripheral.link;
        let handle = self.layout.value_handle;
        if !att::server_accepts_write(&self.layout.flags) || link.rejected_write() == Some(super::WriteKind::Request) {
            for e in link.process(Direction::Request, bytes) {
                link.record_att(Direction::Request, att::pdu_with_handle(att::opcode::WRITE_REQ, handle, &e.bytes));
                link.record_att(Direction::Response, att::error_rsp(att::opcode::WRITE_REQ, handle, att::WRITE_NOT_PERMITTED));
            }
            return Err(BluezError::from_att(att::WRITE_NOT_PERMITTED));
        }
        let emissions = self.peripheral.link.process(Direction::Request, bytes);
        if emissions.is_empty() {
            tokio::time::sleep(self.peripheral.link.att_timeout()).await;
            return Err(BluezError::Failed("Operation failed with ATT error: timeout".into()));
        }
        let mut result = Ok(());
        for e in emissions {
            if !e.after.is_zero() {
                tokio::time::sleep(e.after).await;
            }
            link.record_att(Direction::Request, att::pdu_with_handle(att::opcode::WRITE_REQ, handle, &e.bytes));
            result = match self.forward_write(air, &e.bytes, procedure, offset).await {
                Ok(()) => {
                    link.record_att(Direction::Response, att::pdu(att::opcode::WRITE_RSP, &[]));
                    Ok(())
                }
                Err(f) => {
                    link.record_att(Direction::Response, att::error_rsp(att::opcode::WRITE_REQ, handle, f.att));
                    Err(f.error)
                }
            };
        }
        result
    }
}

pub struct GattCharacteristic {
    c: Arc<RemoteChar>,
    air: Weak<AirInner>,
}

impl GattCharacteristic {
    fn air(&self) -> Result<Arc<AirInner>> {
        self.air.upgrade().ok_or_else(|| BluezError::NotReady("Resource Not Ready".into()))
    }
    fn need_connected(&self) -> Result<()> {
        if self.c.connected() {
            Ok(())
        } else {
            Err(BluezError::Failed("Not connected".into()))
        }
    }
    fn notifies(&self) -> Result<()> {
        if self.c.layout.notifies() {
            Ok(())
        } else {
            Err(BluezError::NotSupported("Operation is not supported".into()))
        }
    }
}

fn offset_of(options: &HashMap<String, OwnedVariant>) -> Result<u16> {
    match options.get("offset") {
        None => Ok(0),
        Some(v) => u16::try_from(v.try_clone().map_err(BluezError::ZBus)?).map_err(|_| BluezError::InvalidArguments("Invalid arguments in method call".into())),
    }
}

struct BusyGuard<'a> {
    st: &'a Mutex<CharState>,
    read: bool,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut st = lock(self.st);
        if self.read {
            st.read_busy = false;
        } else {
            st.request_busy = false;
        }
    }
}

#[interface(name = "org.bluez.GattCharacteristic1")]
impl GattCharacteristic {
    async fn read_value(&self, options: HashMap<String, OwnedVariant>) -> Result<Vec<u8>> {
        let air = self.air()?;
        self.need_connected()?;
        let offset = offset_of(&options)?;
        {
            let mut st = lock(&self.c.st);
            if st.read_busy {
                return Err(BluezError::InProgress("In Progress".into()));
            }
            st.read_busy = true;
        }
        let _busy = BusyGuard { st: &self.c.st, read: true };
        let link = &self.c.peripheral.link;
        let handle = self.c.layout.value_handle;
        link.record_att(Direction::Request, att::pdu_with_handle(att::opcode::READ_REQ, handle, &[]));
        if !att::server_accepts_read(&self.c.layout.flags) {
            link.record_att(Direction::Response, att::error_rsp(att::opcode::READ_REQ, handle, att::READ_NOT_PERMITTED));
            return Err(BluezError::from_att(att::READ_NOT_PERMITTED));
        }
        let opts = self.c.options(&air, &[("offset", Variant::from(offset))]);
        let reply = match self.c.call_app(&air, "ReadValue", &(opts,)).await {
            Ok(r) => r,
            Err(e) => {
                link.record_att(Direction::Response, att::error_rsp(att::opcode::READ_REQ, handle, app_error_code(&e, att::READ_NOT_PERMITTED)));
                return Err(app_error(e, att::READ_NOT_PERMITTED));
            }
        };
        let value: Vec<u8> = reply.body().deserialize().map_err(|e| BluezError::Failed(e.to_string()))?;
        let emissions = self.c.peripheral.link.process(Direction::Response, &value);
        if emissions.is_empty() {
            tokio::time::sleep(self.c.peripheral.link.att_timeout()).await;
            return Err(BluezError::Failed("Operation failed with ATT error: timeout".into()));
        }
        let mut out = Vec::new();
        for e in emissions {
            if !e.after.is_zero() {
                tokio::time::sleep(e.after).await;
            }
            out.extend_from_slice(&e.bytes);
        }
        link.record_att(Direction::Response, att::pdu(att::opcode::READ_RSP, &out));
        lock(&self.c.st).value.clone_from(&out);
        Ok(out)
    }

    async fn write_value(&self, value: Vec<u8>, options: HashMap<String, OwnedVariant>) -> Result<()> {
        let air = self.air()?;
        self.need_connected()?;
        if lock(&self.c.st).write_socket_task.is_some() {
            return Err(BluezError::NotPermitted("Write acquired".into()));
        }
        let offset = offset_of(&options)?;
        let requested = match options.get("type") {
            None => None,
            Some(v) => Some(String::try_from(v.try_clone().map_err(BluezError::ZBus)?).map_err(|_| BluezError::InvalidArguments("Invalid arguments in method call".into()))?),
        };
        let procedure = att::write_procedure(requested.as_deref(), &self.c.layout.flags, offset, value.len(), self.c.peripheral.link.mtu())
            .map_err(|r| match r {
                WriteRefusal::NotSupported => BluezError::NotSupported("Operation is not supported".into()),
                WriteRefusal::FailedToInitiate => BluezError::Failed("Failed to initiate write".into()),
            })?;
        match procedure {
            WriteProcedure::Command => {
                self.c.send_command(&value);
                Ok(())
            }
            WriteProcedure::Request | WriteProcedure::Reliable => {
                {
                    let mut st = lock(&self.c.st);
                    if st.request_busy {
                        return Err(BluezError::InProgress("In Progress".into()));
                    }
                    st.request_busy = true;
                }
                let _busy = BusyGuard { st: &self.c.st, read: false };
                self.c.write_request(&air, &value, procedure, offset).await
            }
        }
    }

    async fn start_notify(&self, #[zbus(header)] hdr: Header<'_>, #[zbus(connection)] conn: &Connection) -> Result<()> {
        let air = self.air()?;
        self.need_connected()?;
        self.notifies()?;
        let client = hdr.sender().map(|s| s.to_string()).unwrap_or_default();
        let first = {
            let mut st = lock(&self.c.st);
            if st.notify_socket.is_some() {
                return Err(BluezError::NotPermitted("Notify acquired".into()));
            }
            if st.notify_clients.contains(&client) {
                return Ok(());
            }
            st.notify_clients.insert(client.clone());
            st.notify_clients.len() == 1
        };
        if let Err(e) = self.c.start_app_notify(&air).await {
            lock(&self.c.st).notify_clients.remove(&client);
            return Err(e);
        }
        if first {
            emit_properties_changed(conn, &self.c.path, CHAR_IFACE, HashMap::from([("Notifying", Variant::from(true))])).await;
        }
        Ok(())
    }

    async fn stop_notify(&self, #[zbus(header)] hdr: Header<'_>, #[zbus(connection)] conn: &Connection) -> Result<()> {
        let air = self.air()?;
        let client = hdr.sender().map(|s| s.to_string()).unwrap_or_default();
        let last = {
            let mut st = lock(&self.c.st);
            if !st.notify_clients.remove(&client) {
                return Err(BluezError::Failed("No notify session started".into()));
            }
            st.notify_clients.is_empty()
        };
        if last {
            emit_properties_changed(conn, &self.c.path, CHAR_IFACE, HashMap::from([("Notifying", Variant::from(false))])).await;
        }
        self.c.maybe_stop_app_notify(&air).await;
        Ok(())
    }

    async fn acquire_write(&self, _options: HashMap<String, OwnedVariant>, #[zbus(connection)] conn: &Connection) -> Result<(zbus::OwnedFd, u16)> {
        self.air()?;
        self.need_connected()?;
        if !self.c.layout.flags.iter().any(|f| f == "write-without-response") {
            return Err(BluezError::NotSupported("Operation is not supported".into()));
        }
        if lock(&self.c.st).write_socket_task.is_some() {
            return Err(BluezError::NotPermitted("Write acquired".into()));
        }
        let (theirs, ours) = socket_pair().map_err(|e| BluezError::Failed(e.to_string()))?;
        let ch = self.c.clone();
        let path = self.c.path.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            loop {
                match ours.recv(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => ch.send_command(&buf[..n]),
                }
            }
            lock(&ch.st).write_socket_task = None;
            emit_properties_changed(&ch.central.conn, &path, CHAR_IFACE, HashMap::from([("WriteAcquired", Variant::from(false))])).await;
        });
        lock(&self.c.st).write_socket_task = Some(task);
        emit_properties_changed(conn, &self.c.path, CHAR_IFACE, HashMap::from([("WriteAcquired", Variant::from(true))])).await;
        Ok((zbus::OwnedFd::from(theirs), self.c.peripheral.link.mtu()))
    }

    async fn acquire_notify(&self, _options: HashMap<String, OwnedVariant>, #[zbus(connection)] conn: &Connection) -> Result<(zbus::OwnedFd, u16)> {
        let air = self.air()?;
        self.need_connected()?;
        self.notifies()?;
        {
            let st = lock(&self.c.st);
            if st.notify_socket.is_some() {
                return Err(BluezError::NotPermitted("Notify acquired".into()));
            }
            if !st.notify_clients.is_empty() {
                return Err(BluezError::InProgress("Notify already started".into()));
            }
        }
        let (theirs, ours) = socket_pair().map_err(|e| BluezError::Failed(e.to_string()))?;
        lock(&self.c.st).notify_socket = Some(ours.clone());
        if let Err(e) = self.c.start_app_notify(&air).await {
            lock(&self.c.st).notify_socket = None;
            return Err(e);
        }
        // The central closing its end ends the session.
        let ch = self.c.clone();
        let air_w = Arc::downgrade(&air);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            loop {
                match ours.recv(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            lock(&ch.st).notify_socket = None;
            if let Some(air) = air_w.upgrade() {
                emit_properties_changed(
                    &ch.central.conn,
                    &ch.path,
                    CHAR_IFACE,
                    HashMap::from([("NotifyAcquired", Variant::from(false)), ("Notifying", Variant::from(false))]),
                )
                .await;
                ch.maybe_stop_app_notify(&air).await;
            }
        });
        lock(&self.c.st).notify_socket_task = Some(task);
        emit_properties_changed(
            conn,
            &self.c.path,
            CHAR_IFACE,
            HashMap::from([("NotifyAcquired", Variant::from(true)), ("Notifying", Variant::from(true))]),
        )
        .await;
        Ok((zbus::OwnedFd::from(theirs), self.c.peripheral.link.mtu()))
    }

    #[zbus(property, name = "UUID")]
    fn uuid(&self) -> String {
        self.c.layout.uuid.clone()
    }
    #[zbus(property)]
    fn service(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(self.c.service_path.clone()).unwrap_or_else(|_| OwnedObjectPath::from(ObjectPath::from_static_str_unchecked("/")))
    }
    #[zbus(property)]
    fn value(&self) -> Vec<u8> {
        lock(&self.c.st).value.clone()
    }
    #[zbus(property)]
    fn notifying(&self) -> bool {
        let st = lock(&self.c.st);
        !st.notify_clients.is_empty() || st.notify_socket.is_some()
    }
    #[zbus(property)]
    fn flags(&self) -> Vec<String> {
        self.c.layout.flags.clone()
    }
    #[zbus(property, name = "MTU")]
    fn mtu(&self) -> u16 {
        self.c.peripheral.link.mtu()
    }
    // BlueZ's Handle of a characteristic is its value handle.
    #[allow(clippy::misnamed_getters)]
    #[zbus(property)]
    fn handle(&self) -> u16 {
        self.c.layout.value_handle
    }
    #[zbus(property)]
    fn write_acquired(&self) -> bool {
        lock(&self.c.st).write_socket_task.is_some()
    }
    #[zbus(property)]
    fn notify_acquired(&self) -> bool {
        lock(&self.c.st).notify_socket.is_some()
    }
}

pub struct GattDescriptor {
    d: DescriptorLayout,
    characteristic: Arc<RemoteChar>,
    air: Weak<AirInner>,
}

#[interface(name = "org.bluez.GattDescriptor1")]
impl GattDescriptor {
    async fn read_value(&self, options: HashMap<String, OwnedVariant>) -> Result<Vec<u8>> {
        let air = self.air.upgrade().ok_or_else(|| BluezError::NotReady("Resource Not Ready".into()))?;
        if !self.characteristic.connected() {
            return Err(BluezError::Failed("Not connected".into()));
        }
        let Some(app_path) = &self.d.app_path else {
            // The server's own CCC: notifications on (bit 0) or off.
            let st = lock(&self.characteristic.st);
            let on = !st.notify_clients.is_empty() || st.notify_socket.is_some();
            return Ok(vec![u8::from(on), 0]);
        };
        let offset = offset_of(&options)?;
        let opts = self.characteristic.options(&air, &[("offset", Variant::from(offset))]);
        let body = (opts,);
        let call = air.conn.call_method(Some(self.characteristic.owner.as_str()), app_path.as_str(), Some("org.bluez.GattDescriptor1"), "ReadValue", &body);
        let reply = tokio::time::timeout(air.config.call_timeout, call)
            .await
            .map_err(|_| BluezError::from_att(att::UNLIKELY))?
            .map_err(|e| app_error(e, att::READ_NOT_PERMITTED))?;
        reply.body().deserialize().map_err(|e| BluezError::Failed(e.to_string()))
    }

    async fn write_value(&self, value: Vec<u8>, options: HashMap<String, OwnedVariant>) -> Result<()> {
        let air = self.air.upgrade().ok_or_else(|| BluezError::NotReady("Resource Not Ready".into()))?;
        if !self.characteristic.connected() {
            return Err(BluezError::Failed("Not connected".into()));
        }
        let Some(app_path) = &self.d.app_path else {
            // BlueZ keeps the CCC to itself: StartNotify is the way.
            return Err(BluezError::from_att(att::WRITE_NOT_PERMITTED));
        };
        let offset = offset_of(&options)?;
        let opts = self.characteristic.options(&air, &[("offset", Variant::from(offset)), ("type", Variant::from("request".to_string()))]);
        let body = (value, opts);
        let call = air.conn.call_method(Some(self.characteristic.owner.as_str()), app_path.as_str(), Some("org.bluez.GattDescriptor1"), "WriteValue", &body);
        tokio::time::timeout(air.config.call_timeout, call)
            .await
            .map_err(|_| BluezError::from_att(att::UNLIKELY))?
            .map_err(|e| app_error(e, att::WRITE_NOT_PERMITTED))?;
        Ok(())
    }

    #[zbus(property, name = "UUID")]
    fn uuid(&self) -> String {
        self.d.uuid.clone()
    }
    #[zbus(property)]
    fn characteristic(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(self.characteristic.path.clone()).unwrap_or_else(|_| OwnedObjectPath::from(ObjectPath::from_static_str_unchecked("/")))
    }
    #[zbus(property)]
    fn value(&self) -> Vec<u8> {
        Vec::new()
    }
    #[zbus(property)]
    fn handle(&self) -> u16 {
        self.d.handle
    }
}

/// A client of `central` left its bus: its notification sessions end.
pub(crate) async fn forget_central(air: &Arc<AirInner>, central: &Central, client: &str) {
    let chars: Vec<Arc<RemoteChar>> = central.devices().values().flat_map(|d| lock(&d.st).chars.clone()).collect();
    for c in chars {
        let (had, last) = {
            let mut st = lock(&c.st);
            let had = st.notify_clients.remove(client);
            (had, st.notify_clients.is_empty() && st.notify_socket.is_none())
        };
        if had {
            if last {
                emit_properties_changed(&central.conn, &c.path, CHAR_IFACE, HashMap::from([("Notifying", Variant::from(false))])).await;
            }
            c.maybe_stop_app_notify(air).await;
        }
    }
}
