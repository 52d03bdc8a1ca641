//! The adapters: hci0 (the central every client under test uses) and the
//! peripheral adapters simulated devices register on, plus the hilbench
//! control interface that creates them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

use zbus::message::Header;
use zbus::{interface, Connection, ObjectPath, OwnedObjectPath, OwnedVariant, Variant};

use super::central::{Central, DiscoveryFilter};
use super::device;
use super::tree::{export, unexport};
use super::gatt::{self, AppObject};
use super::{AdvData, AirInner, Peripheral, PeripheralAdapterInfo, PeripheralState, Registration, CENTRAL_PATH};

/// The errors BlueZ answers with (`org.bluez.Error.*`).
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.bluez.Error")]
pub enum BluezError {
    #[zbus(error)]
    ZBus(zbus::Error),
    Failed(String),
    InProgress(String),
    NotConnected(String),
    NotReady(String),
    InvalidArguments(String),
    NotPermitted(String),
    NotSupported(String),
    NotAuthorized(String),
    AlreadyExists(String),
    DoesNotExist(String),
    NotAvailable(String),
}

impl BluezError {
    /// The error for an ATT error code, as a central sees it.
    pub fn from_att(code: u8) -> Self {
        let (name, msg) = super::att::att_error_to_central(code);
        match name {
            "org.bluez.Error.NotPermitted" => BluezError::NotPermitted(msg),
            "org.bluez.Error.InvalidArguments" => BluezError::InvalidArguments(msg),
            "org.bluez.Error.NotAuthorized" => BluezError::NotAuthorized(msg),
            "org.bluez.Error.NotSupported" => BluezError::NotSupported(msg),
            _ => BluezError::Failed(msg),
        }
    }
}

pub type Result<T, E = BluezError> = std::result::Result<T, E>;

fn sender_of(hdr: &Header<'_>) -> String {
    hdr.sender().map(|s| s.to_string()).unwrap_or_default()
}

/// A method that takes no arguments called with some: refused as bluetoothd
/// refuses a call whose signature does not match.
pub(crate) fn no_args(hdr: &Header<'_>) -> Result<()> {
    let sig = hdr.signature().to_string();
    if sig.is_empty() {
        Ok(())
    } else {
        Err(BluezError::ZBus(zbus::Error::FDO(Box::new(zbus::fdo::Error::InvalidArgs(format!(
            "Invalid arguments in method call: expected no arguments, got `{sig}`"
        ))))))
    }
}

/// The agent capabilities bluetoothd knows (an empty one means KeyboardDisplay).
const AGENT_CAPABILITIES: &[&str] = &["", "DisplayOnly", "DisplayYesNo", "KeyboardOnly", "NoInputNoOutput", "KeyboardDisplay"];

/// `/org/bluez`: agents are accepted and ignored (nothing pairs on the air).
pub struct BluezRoot;

#[interface(name = "org.bluez.AgentManager1")]
impl BluezRoot {
    fn register_agent(&self, _agent: ObjectPath<'_>, capability: &str) -> Result<()> {
        if AGENT_CAPABILITIES.contains(&capability) {
            Ok(())
        } else {
            Err(BluezError::InvalidArguments(format!("Invalid capability \"{capability}\"; one of {}", AGENT_CAPABILITIES[1..].join(", "))))
        }
    }
    fn unregister_agent(&self, _agent: ObjectPath<'_>) {}
    fn request_default_agent(&self, _agent: ObjectPath<'_>) {}
}

fn adapter_alias(name: &str) -> String {
    format!("hilbench-{name}")
}

/// What an adapter is for: `hci0` of one machine (see [`Central`]), or a
/// peripheral adapter a simulated device advertises and serves GATT on.
pub enum AdapterRole {
    Central { air: Weak<AirInner>, central: Weak<Central> },
    Peripheral(Arc<Peripheral>),
}

/// `org.bluez.Adapter1` for either role: the properties are the same,
/// only discovery (central) and the address differ.
pub struct Adapter1 {
    pub name: String,
    pub role: AdapterRole,
    pub settings: Mutex<AdapterSettings>,
}

/// The writable Adapter1 properties (btleplug powers the adapter on before
/// every scan; tools set Alias, Discoverable, Pairable). Behind a mutex so
/// the setters take `&self`: a `&mut self` setter makes zbus take the
/// interface's write lock, which queues behind a method still running on
/// it and, with the lock being writer-preferring, stalls every reader
/// (GetAll, GetManagedObjects under the object server's root lock) in turn.
pub struct AdapterSettings {
    pub powered: bool,
    pub alias: String,
    pub discoverable: bool,
    pub discoverable_timeout: u32,
    pub pairable: bool,
    pub pairable_timeout: u32,
}

impl AdapterSettings {
    pub fn new(name: &str) -> Self {
        AdapterSettings {
            powered: true,
            alias: adapter_alias(name),
            discoverable: false,
            discoverable_timeout: 180,
            pairable: true,
            pairable_timeout: 0,
        }
    }
}

impl Adapter1 {
    pub fn new(name: &str, role: AdapterRole) -> Self {
        Adapter1 { name: name.to_string(), role, settings: Mutex::new(AdapterSettings::new(name)) }
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, AdapterSettings> {
        self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The central behind a central-role adapter; a peripheral adapter
    /// does not scan, as BlueZ refuses discovery on an adapter without the
    /// central role.
    fn central(&self) -> Result<(Arc<AirInner>, Arc<Central>)> {
        match &self.role {
            AdapterRole::Central { air, central } => match (air.upgrade(), central.upgrade()) {
                (Some(a), Some(c)) => Ok((a, c)),
                _ => Err(BluezError::NotReady("Resource Not Ready".into())),
            },
            AdapterRole::Peripheral(_) => Err(BluezError::NotSupported("a peripheral adapter does not scan; use hci0".into())),
        }
    }
}

const FILTER_KEYS: &[&str] = &["UUIDs", "RSSI", "Pathloss", "Transport", "DuplicateData", "Discoverable", "Pattern"];

#[interface(name = "org.bluez.Adapter1")]
impl Adapter1 {
    async fn start_discovery(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        let (air, central) = self.central()?;
        let client = sender_of(&hdr);
        let started = {
            let mut scan = central.scan();
            if scan.discovering.contains(&client) {
                return Err(BluezError::InProgress("Operation already in progress".into()));
            }
            scan.discovering.insert(client);
            scan.discovering.len() == 1
        };
        if started {
            super::emit_properties_changed(conn, CENTRAL_PATH, "org.bluez.Adapter1", HashMap::from([("Discovering", Variant::from(true))])).await;
        }
        air.advertise_now.notify_one();
        Ok(())
    }

    async fn stop_discovery(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        let (_, central) = self.central()?;
        let client = sender_of(&hdr);
        let stopped = {
            let mut scan = central.scan();
            if !scan.discovering.remove(&client) {
                return Err(BluezError::Failed("No discovery started".into()));
            }
            scan.discovering.is_empty()
        };
        if stopped {
            super::emit_properties_changed(conn, CENTRAL_PATH, "org.bluez.Adapter1", HashMap::from([("Discovering", Variant::from(false))])).await;
        }
        Ok(())
    }

    /// Kept per client until it clears it (an empty dictionary) or leaves;
    /// what a central reports while scanning is the union over its
    /// scanning clients ([`super::central::MergedFilter`]).
    async fn set_discovery_filter(
        &self,
        filter: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<()> {
        let (_, central) = self.central()?;
        let parsed = DiscoveryFilter::parse(&filter)
            .map_err(|e| BluezError::InvalidArguments(format!("Invalid arguments in method call: {e}")))?;
        let client = sender_of(&hdr);
        let mut scan = central.scan();
        if filter.is_empty() {
            scan.filters.remove(&client);
        } else {
            scan.filters.insert(client, parsed);
        }
        Ok(())
    }

    fn get_discovery_filters(&self) -> Vec<String> {
        FILTER_KEYS.iter().map(|s| s.to_string()).collect()
    }

    async fn remove_device(&self, device: OwnedObjectPath) -> Result<()> {
        let (air, central) = self.central()?;
        let found = {
            let mut devices = central.devices();
            let key = devices.iter().find(|(_, d)| d.path == device.as_str()).map(|(k, _)| *k);
            key.and_then(|k| devices.remove(&k))
        };
        let Some(d) = found else {
            return Err(BluezError::DoesNotExist("Does Not Exist".into()));
        };
        d.disconnect(&air, "removed").await;
        d.unpublish().await;
        Ok(())
    }

    #[zbus(property)]
    fn address(&self) -> String {
        match &self.role {
            AdapterRole::Central { central, .. } => central.upgrade().map(|c| c.address_string()).unwrap_or_default(),
            AdapterRole::Peripheral(p) => p.address_string(),
        }
    }
    #[zbus(property)]
    fn address_type(&self) -> &str {
        "public"
    }
    #[zbus(property)]
    fn name(&self) -> String {
        adapter_alias(&self.name)
    }
    #[zbus(property)]
    fn alias(&self) -> String {
        self.settings().alias.clone()
    }
    #[zbus(property)]
    fn set_alias(&self, v: String) {
        self.settings().alias = v;
    }
    #[zbus(property)]
    fn class(&self) -> u32 {
        0
    }
    #[zbus(property)]
    fn powered(&self) -> bool {
        self.settings().powered
    }
    #[zbus(property)]
    fn set_powered(&self, v: bool) {
        self.settings().powered = v;
    }
    #[zbus(property)]
    fn power_state(&self) -> &str {
        if self.settings().powered { "on" } else { "off" }
    }
    #[zbus(property)]
    fn discoverable(&self) -> bool {
        self.settings().discoverable
    }
    #[zbus(property)]
    fn set_discoverable(&self, v: bool) {
        self.settings().discoverable = v;
    }
    #[zbus(property)]
    fn discoverable_timeout(&self) -> u32 {
        self.settings().discoverable_timeout
    }
    #[zbus(property)]
    fn set_discoverable_timeout(&self, v: u32) {
        self.settings().discoverable_timeout = v;
    }
    #[zbus(property)]
    fn pairable(&self) -> bool {
        self.settings().pairable
    }
    #[zbus(property)]
    fn set_pairable(&self, v: bool) {
        self.settings().pairable = v;
    }
    #[zbus(property)]
    fn pairable_timeout(&self) -> u32 {
        self.settings().pairable_timeout
    }
    #[zbus(property)]
    fn set_pairable_timeout(&self, v: u32) {
        self.settings().pairable_timeout = v;
    }
    #[zbus(property)]
    fn discovering(&self) -> bool {
        self.central().is_ok_and(|(_, c)| c.discovering())
    }
    #[zbus(property, name = "UUIDs")]
    fn uuids(&self) -> Vec<String> {
        match self.role {
            // GAP and GATT, as bluetoothd lists for a powered adapter.
            AdapterRole::Central { .. } => vec!["00001800-0000-1000-8000-00805f9b34fb".into(), "00001801-0000-1000-8000-00805f9b34fb".into()],
            AdapterRole::Peripheral(_) => Vec::new(),
        }
    }
    #[zbus(property)]
    fn modalias(&self) -> &str {
        "usb:v1D6Bp0246d0543"
    }
    #[zbus(property)]
    fn roles(&self) -> Vec<String> {
        match self.role {
            AdapterRole::Central { .. } => vec!["central".into()],
            AdapterRole::Peripheral(_) => vec!["peripheral".into()],
        }
    }
    #[zbus(property)]
    fn experimental_features(&self) -> Vec<String> {
        Vec::new()
    }
    #[zbus(property)]
    fn manufacturer(&self) -> u16 {
        0x05F1
    }
    #[zbus(property)]
    fn version(&self) -> u8 {
        0x0C
    }
}

pub struct AdvertisingManager {
    pub p: Arc<Peripheral>,
    pub air: Weak<AirInner>,
}

fn variant_bytes(v: &OwnedVariant) -> Option<Vec<u8>> {
    // ManufacturerData / ServiceData values are variants holding `ay`
    // (sometimes one level deeper).
    let v = v.try_clone().ok()?;
    match Vec::<u8>::try_from(v.try_clone().ok()?) {
        Ok(b) => Some(b),
        Err(_) => match Variant::from(v) {
            Variant::Variant(inner) => Vec::<u8>::try_from(*inner).ok(),
            _ => None,
        },
    }
}

/// Reads an advertisement object's properties into what a scanner hears.
pub(crate) fn parse_advertisement(props: &HashMap<String, OwnedVariant>, adapter_alias_name: &str) -> Result<AdvData, String> {
    let get_str = |k: &str| props.get(k).and_then(|v| String::try_from(v.try_clone().ok()?).ok());
    if let Some(t) = get_str("Type") {
        if t != "peripheral" && t != "broadcast" {
            return Err(format!("advertisement Type must be peripheral or broadcast, got {t}"));
        }
    }
    let discoverable = props.get("Discoverable").and_then(|v| bool::try_from(v.try_clone().ok()?).ok()).unwrap_or(true);
    let mut adv = AdvData { local_name: get_str("LocalName"), discoverable, ..Default::default() };
    if let Some(v) = props.get("ServiceUUIDs") {
        adv.service_uuids = Vec::<String>::try_from(v.try_clone().map_err(|e| e.to_string())?)
            .map_err(|_| "ServiceUUIDs must be as".to_string())?
            .into_iter()
            .map(|u| u.to_ascii_lowercase())
            .collect();
    }
    if let Some(v) = props.get("ManufacturerData") {
        let m = HashMap::<u16, OwnedVariant>::try_from(v.try_clone().map_err(|e| e.to_string())?)
            .map_err(|_| format!("ManufacturerData must be a{{qv}}, got {}", v.value_signature()))?;
        for (k, v) in m {
            let b = variant_bytes(&v).ok_or_else(|| format!("ManufacturerData[0x{k:04x}] must hold ay"))?;
            adv.manufacturer_data.insert(k, b);
        }
    }
    if let Some(v) = props.get("ServiceData") {
        let m = HashMap::<String, OwnedVariant>::try_from(v.try_clone().map_err(|e| e.to_string())?)
            .map_err(|_| format!("ServiceData must be a{{sv}}, got {}", v.value_signature()))?;
        for (k, v) in m {
            let b = variant_bytes(&v).ok_or_else(|| format!("ServiceData[{k}] must hold ay"))?;
            adv.service_data.insert(k.to_ascii_lowercase(), b);
        }
    }
    if let Some(v) = props.get("TxPower") {
        adv.tx_power = i16::try_from(v.try_clone().map_err(|e| e.to_string())?).ok();
    }
    if let Some(v) = props.get("Appearance") {
        adv.appearance = u16::try_from(v.try_clone().map_err(|e| e.to_string())?).ok();
    }
    let includes = props
        .get("Includes")
        .and_then(|v| Vec::<String>::try_from(v.try_clone().ok()?).ok())
        .unwrap_or_default();
    if includes.iter().any(|i| i == "local-name") && adv.local_name.is_none() {
        adv.local_name = Some(adapter_alias_name.to_string());
    }
    if includes.iter().any(|i| i == "tx-power") && adv.tx_power.is_none() {
        adv.tx_power = Some(0);
    }
    Ok(adv)
}

async fn get_all(air: &AirInner, owner: &str, path: &str, iface: &str) -> Result<HashMap<String, OwnedVariant>> {
    let reply = super::call_app_read_only(air, owner, path, "org.freedesktop.DBus.Properties", "GetAll", &(iface,))
        .await
        .map_err(|e| BluezError::Failed(format!("reading {iface} of {path} from {owner}: {e}")))?;
    reply.body().deserialize().map_err(|e| BluezError::Failed(format!("reading {iface} of {path} from {owner}: {e}")))
}

#[interface(name = "org.bluez.LEAdvertisingManager1")]
impl AdvertisingManager {
    async fn register_advertisement(
        &self,
        advertisement: OwnedObjectPath,
        _options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<()> {
        let air = self.air.upgrade().ok_or_else(|| BluezError::NotReady("Resource Not Ready".into()))?;
        let owner = sender_of(&hdr);
        {
            let st = self.p.lock();
            if let Some((reg, _)) = &st.advertisement {
                return Err(if reg.owner == owner && reg.path == advertisement.as_str() {
                    BluezError::AlreadyExists("Already Exists".into())
                } else {
                    BluezError::NotPermitted("Maximum advertisements reached".into())
                });
            }
        }
        let props = get_all(&air, &owner, advertisement.as_str(), "org.bluez.LEAdvertisement1").await?;
        let adv = parse_advertisement(&props, &adapter_alias(&self.p.name)).map_err(BluezError::InvalidArguments)?;
        let reg = Registration { owner, path: advertisement.to_string() };
        {
            let mut st = self.p.lock();
            if st.removed {
                return Err(BluezError::NotReady("Resource Not Ready".into()));
            }
            st.advertisement = Some((reg, adv));
        }
        // Scanning centrals hear it now; a pending connect can go ahead.
        self.p.changed.notify_waiters();
        air.advertise_now.notify_one();
        Ok(())
    }

    async fn unregister_advertisement(
        &self,
        advertisement: OwnedObjectPath,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<()> {
        let air = self.air.upgrade().ok_or_else(|| BluezError::NotReady("Resource Not Ready".into()))?;
        let owner = sender_of(&hdr);
        {
            let st = self.p.lock();
            match &st.advertisement {
                Some((reg, _)) if reg.owner == owner && reg.path == advertisement.as_str() => {}
                _ => return Err(BluezError::DoesNotExist("Does Not Exist".into())),
            }
        }
        stop_advertising(&air, &self.p).await;
        Ok(())
    }

    #[zbus(property)]
    fn active_instances(&self) -> u8 {
        u8::from(self.p.lock().advertisement.is_some())
    }
    #[zbus(property)]
    fn supported_instances(&self) -> u8 {
        u8::from(self.p.lock().advertisement.is_none())
    }
    #[zbus(property)]
    fn supported_includes(&self) -> Vec<String> {
        vec!["tx-power".into(), "appearance".into(), "local-name".into()]
    }
}

/// The advertisement ends: centrals stop hearing the device; they keep it
/// cached until their temporary timeout runs out.
pub(crate) async fn stop_advertising(_air: &Arc<AirInner>, p: &Arc<Peripheral>) {
    p.lock().advertisement = None;
}

pub struct GattManager {
    pub p: Arc<Peripheral>,
    pub air: Weak<AirInner>,
}

fn strings(props: &HashMap<String, OwnedVariant>, key: &str) -> Vec<String> {
    props.get(key).and_then(|v| Vec::<String>::try_from(v.try_clone().ok()?).ok()).unwrap_or_default()
}

fn string(props: &HashMap<String, OwnedVariant>, key: &str) -> Option<String> {
    props.get(key).and_then(|v| String::try_from(v.try_clone().ok()?).ok())
}

fn path_prop(props: &HashMap<String, OwnedVariant>, key: &str) -> Option<String> {
    props.get(key).and_then(|v| OwnedObjectPath::try_from(v.try_clone().ok()?).ok()).map(|p| p.to_string())
}

/// Reduces an application's GetManagedObjects to the objects the layout uses.
pub(crate) fn app_objects(objects: &zbus::fdo::ManagedObjects) -> Result<Vec<AppObject>, String> {
    let mut out = Vec::new();
    for (path, ifaces) in objects {
        for (iface, props) in ifaces {
            let need = |k: &str| string(props, k).ok_or_else(|| format!("{path}: {iface} has no {k}"));
            match iface.as_str() {
                "org.bluez.GattService1" => out.push(AppObject::Service {
                    path: path.to_string(),
                    uuid: need("UUID")?,
                    primary: props.get("Primary").and_then(|v| bool::try_from(v.try_clone().ok()?).ok()).unwrap_or(true),
                }),
                "org.bluez.GattCharacteristic1" => out.push(AppObject::Characteristic {
                    path: path.to_string(),
                    uuid: need("UUID")?,
                    service: path_prop(props, "Service").ok_or_else(|| format!("{path}: characteristic has no Service"))?,
                    flags: strings(props, "Flags"),
                    notify_acquired: props.contains_key("NotifyAcquired"),
                    write_acquired: props.contains_key("WriteAcquired"),
                }),
                "org.bluez.GattDescriptor1" => out.push(AppObject::Descriptor {
                    path: path.to_string(),
                    uuid: need("UUID")?,
                    characteristic: path_prop(props, "Characteristic").ok_or_else(|| format!("{path}: descriptor has no Characteristic"))?,
                    flags: strings(props, "Flags"),
                }),
                _ => {}
            }
        }
    }
    Ok(out)
}

#[interface(name = "org.bluez.GattManager1")]
impl GattManager {
    async fn register_application(
        &self,
        application: OwnedObjectPath,
        _options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<()> {
        let air = self.air.upgrade().ok_or_else(|| BluezError::NotReady("Resource Not Ready".into()))?;
        let owner = sender_of(&hdr);
        if self.p.lock().app.is_some() {
            return Err(BluezError::AlreadyExists("Already Exists".into()));
        }
        let reply = super::call_app_read_only(&air, &owner, application.as_str(), "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", &())
            .await
            .map_err(|e| BluezError::Failed(format!("Failed to read application {application} from {owner}: GetManagedObjects: {e}")))?;
        let objects: zbus::fdo::ManagedObjects =
            reply.body().deserialize().map_err(|e| BluezError::InvalidArguments(format!("Failed to read application: {e}")))?;
        let layout = app_objects(&objects).and_then(|o| gatt::layout(&o)).map_err(BluezError::InvalidArguments)?;
        if layout.is_empty() {
            return Err(BluezError::InvalidArguments("No object received".into()));
        }
        let dev = {
            let mut st = self.p.lock();
            if st.app.is_some() {
                return Err(BluezError::AlreadyExists("Already Exists".into()));
            }
            st.app = Some((Registration { owner, path: application.to_string() }, layout));
            st.connection.clone()
        };
        // A central already connected discovers the new services (BlueZ
        // would send Service Changed).
        if let Some(d) = dev {
            if d.is_connected() {
                d.resolve_services(&air).await;
            }
        }
        Ok(())
    }

    async fn unregister_application(
        &self,
        application: OwnedObjectPath,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<()> {
        let air = self.air.upgrade().ok_or_else(|| BluezError::NotReady("Resource Not Ready".into()))?;
        let owner = sender_of(&hdr);
        let dev = {
            let mut st = self.p.lock();
            match &st.app {
                Some((reg, _)) if reg.owner == owner && reg.path == application.as_str() => {}
                _ => return Err(BluezError::DoesNotExist("Does Not Exist".into())),
            }
            st.app = None;
            st.connection.clone()
        };
        if let Some(d) = dev {
            d.drop_services(&air).await;
        }
        Ok(())
    }
}

/// A client of `central`'s bus left. On the air's own bus that may be a
/// peripheral: whatever it registered goes, and its link drops, as a
/// powered-off device's does (centrals keep the device cached).
pub(crate) async fn owner_gone(air: &Arc<AirInner>, central: &Arc<Central>, owner: &str) {
    let stopped_scan = {
        let mut scan = central.scan();
        let was = !scan.discovering.is_empty();
        scan.discovering.remove(owner);
        scan.filters.remove(owner);
        was && scan.discovering.is_empty()
    };
    if stopped_scan {
        super::emit_properties_changed(&central.conn, CENTRAL_PATH, "org.bluez.Adapter1", HashMap::from([("Discovering", Variant::from(false))])).await;
    }
    device::forget_central(air, central, owner).await;
    if !central.host.is_empty() {
        return;
    }
    let peripherals: Vec<Arc<Peripheral>> = air.registry().peripherals.values().cloned().collect();
    for p in peripherals {
        let (connection, app_gone) = {
            let mut st = p.lock();
            if st.advertisement.as_ref().is_some_and(|(r, _)| r.owner == owner) {
                st.advertisement = None;
            }
            let app_gone = st.app.as_ref().is_some_and(|(r, _)| r.owner == owner);
            if app_gone {
                st.app = None;
            }
            (st.connection.clone(), app_gone)
        };
        if app_gone {
            if let Some(d) = connection {
                d.disconnect(air, "peripheral left").await;
            }
        }
    }
    air.forget_app(owner);
}

pub(crate) async fn add_peripheral_adapter(air: &Arc<AirInner>) -> Result<PeripheralAdapterInfo> {
    let p = {
        let mut r = air.registry();
        let index = r.next_index;
        r.next_index += 1;
        let name = format!("hci{index}");
        let p = Arc::new(Peripheral {
            path: format!("/org/bluez/{name}"),
            address: super::peripheral_address(index),
            link: Arc::new(super::BleLink::new(&format!("ble-{name}"), air.config.seed)),
            name,
            state: Mutex::new(PeripheralState::default()),
            changed: tokio::sync::Notify::new(),
        });
        r.peripherals.insert(index, p.clone());
        p
    };
    let conn = &air.conn;
    export(conn, p.path.as_str(), Adapter1::new(&p.name, AdapterRole::Peripheral(p.clone()))).await?;
    export(conn, p.path.as_str(), AdvertisingManager { p: p.clone(), air: Arc::downgrade(air) }).await?;
    export(conn, p.path.as_str(), GattManager { p: p.clone(), air: Arc::downgrade(air) }).await?;
    Ok(p.info())
}

pub(crate) async fn remove_peripheral_adapter(air: &Arc<AirInner>, which: &str) -> Result<()> {
    let p = {
        let mut r = air.registry();
        let idx = r
            .peripherals
            .iter()
            .find(|(_, p)| p.name == which || p.path == which)
            .map(|(i, _)| *i)
            .ok_or_else(|| BluezError::DoesNotExist(format!("no peripheral adapter {which}")))?;
        r.peripherals.remove(&idx).ok_or_else(|| BluezError::DoesNotExist(which.to_string()))?
    };
    {
        let mut st = p.lock();
        st.removed = true;
        st.advertisement = None;
        st.app = None;
    }
    p.changed.notify_waiters();
    // Removing a peripheral removes it from every central at once.
    for central in air.centrals() {
        let dev = central.devices().remove(&p.address);
        if let Some(d) = dev {
            d.disconnect(air, "adapter removed").await;
            d.unpublish().await;
        }
    }
    let _ = unexport::<GattManager>(&air.conn, p.path.as_str()).await;
    let _ = unexport::<AdvertisingManager>(&air.conn, p.path.as_str()).await;
    let _ = unexport::<Adapter1>(&air.conn, p.path.as_str()).await;
    Ok(())
}

/// `org.hilbench.Air1` at /org/hilbench/air: what a device process (not in
/// hilbench's own process) uses to get an adapter of its own, and a few
/// link controls for scripts.
pub struct AirControl {
    pub air: Weak<AirInner>,
}

impl AirControl {
    fn air(&self) -> Result<Arc<AirInner>> {
        self.air.upgrade().ok_or_else(|| BluezError::NotReady("Resource Not Ready".into()))
    }
    fn peripheral(&self, which: &str) -> Result<Arc<Peripheral>> {
        let air = self.air()?;
        let r = air.registry();
        r.peripherals
            .values()
            .find(|p| p.name == which || p.path == which || p.address_string().eq_ignore_ascii_case(which))
            .cloned()
            .ok_or_else(|| BluezError::DoesNotExist(format!("no peripheral adapter {which}")))
    }
}

#[interface(name = "org.hilbench.Air1")]
impl AirControl {
    /// A new peripheral adapter: (object path, BLE address).
    async fn add_peripheral_adapter(&self) -> Result<(OwnedObjectPath, String)> {
        let air = self.air()?;
        let info = add_peripheral_adapter(&air).await?;
        let path = OwnedObjectPath::try_from(info.path).map_err(BluezError::ZBus)?;
        Ok((path, info.address))
    }

    async fn remove_peripheral_adapter(&self, adapter: OwnedObjectPath) -> Result<()> {
        let air = self.air()?;
        remove_peripheral_adapter(&air, adapter.as_str()).await
    }

    /// Sets the ATT MTU of a peripheral's link; returns the MTU in effect.
    async fn set_mtu(&self, adapter: &str, mtu: u16) -> Result<u16> {
        let p = self.peripheral(adapter)?;
        let m = p.link.set_mtu(mtu);
        let dev = p.lock().connection.clone();
        if let Some(d) = dev {
            d.announce_mtu(m).await;
        }
        Ok(m)
    }

    /// Drops the connection to a peripheral now.
    async fn disconnect(&self, adapter: &str) -> Result<()> {
        let air = self.air()?;
        let p = self.peripheral(adapter)?;
        let dev = p.lock().connection.clone();
        if let Some(d) = dev {
            d.disconnect(&air, "link lost").await;
        }
        Ok(())
    }

    #[zbus(property)]
    fn adapters(&self) -> BTreeMap<String, String> {
        self.air
            .upgrade()
            .map(|a| a.registry().peripherals.values().map(|p| (p.path.clone(), p.address_string())).collect())
            .unwrap_or_default()
    }
}
