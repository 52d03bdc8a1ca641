//! Central-role adapters and what they have heard.
//!
//! Each machine near the devices is one [`Central`]: `hci0` on a bus of its
//! own. The client under test's machine uses the air's bus; another machine
//! (a phone, a second gateway) gets a bus of its own from
//! [`Air::add_host`](super::Air::add_host), because bleak and btleplug pick
//! an adapter in hash order when a bus shows two central adapters.
//!
//! As in BlueZ, a central's `Device1` objects come from what it hears while
//! scanning, filtered by its clients' discovery filters, and stay cached
//! for [`AirConfig::temporary_timeout`](super::AirConfig) after the device
//! was last heard or disconnected.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use zbus::{Connection, OwnedVariant};

use super::device::RemoteDevice;
use super::AdvData;

/// One client's `SetDiscoveryFilter`, parsed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DiscoveryFilter {
    /// Full 128-bit, lower case; empty: any.
    pub uuids: Vec<String>,
    pub rssi: Option<i16>,
    pub pathloss: Option<u16>,
    /// `auto`, `le` or `bredr` (the air only has LE devices).
    pub transport: String,
    /// Report ManufacturerData/ServiceData each time heard (BlueZ's default).
    pub duplicate_data: bool,
    /// Only devices advertising as discoverable.
    pub discoverable: bool,
    /// Prefix of the address or the name; empty: any.
    pub pattern: String,
}

impl Default for DiscoveryFilter {
    fn default() -> Self {
        DiscoveryFilter {
            uuids: Vec::new(),
            rssi: None,
            pathloss: None,
            transport: "auto".into(),
            duplicate_data: true,
            discoverable: false,
            pattern: String::new(),
        }
    }
}

/// `180a` → `0000180a-0000-1000-8000-00805f9b34fb`: BlueZ accepts 16- and
/// 32-bit UUIDs in filters and compares them as 128-bit.
pub(crate) fn full_uuid(u: &str) -> String {
    let u = u.to_ascii_lowercase();
    match u.len() {
        4 => format!("0000{u}-0000-1000-8000-00805f9b34fb"),
        8 => format!("{u}-0000-1000-8000-00805f9b34fb"),
        _ => u,
    }
}

fn uuid_is_valid(u: &str) -> bool {
    let full = full_uuid(u);
    uuid::Uuid::parse_str(&full).is_ok() && full.len() == 36
}

impl DiscoveryFilter {
    /// Parses SetDiscoveryFilter's dictionary the way BlueZ checks it:
    /// unknown keys, wrong types and bad values are InvalidArguments.
    pub fn parse(dict: &HashMap<String, OwnedVariant>) -> Result<DiscoveryFilter, String> {
        let mut f = DiscoveryFilter::default();
        for (k, v) in dict {
            let sig = v.value_signature().to_string();
            let want = match k.as_str() {
                "UUIDs" => "as",
                "RSSI" => "n",
                "Pathloss" => "q",
                "Transport" | "Pattern" => "s",
                "DuplicateData" | "Discoverable" => "b",
                _ => return Err(format!("unknown filter key {k}")),
            };
            if sig != want {
                return Err(format!("{k} must be {want}, got {sig}"));
            }
            let v = v.try_clone().map_err(|e| e.to_string())?;
            match k.as_str() {
                "UUIDs" => {
                    let uuids = Vec::<String>::try_from(v).map_err(|e| e.to_string())?;
                    for u in &uuids {
                        if !uuid_is_valid(u) {
                            return Err(format!("UUIDs: {u} is not a UUID"));
                        }
                    }
                    f.uuids = uuids.iter().map(|u| full_uuid(u)).collect();
                }
                "RSSI" => {
                    let r = i16::try_from(v).map_err(|e| e.to_string())?;
                    if !(-127..=20).contains(&r) {
                        return Err(format!("RSSI {r} is outside -127..=20"));
                    }
                    f.rssi = Some(r);
                }
                "Pathloss" => {
                    let p = u16::try_from(v).map_err(|e| e.to_string())?;
                    if p > 137 {
                        return Err(format!("Pathloss {p} is above 137"));
                    }
                    f.pathloss = Some(p);
                }
                "Transport" => {
                    let t = String::try_from(v).map_err(|e| e.to_string())?;
                    if !matches!(t.as_str(), "auto" | "bredr" | "le") {
                        return Err(format!("Transport {t}"));
                    }
                    f.transport = t;
                }
                "DuplicateData" => f.duplicate_data = bool::try_from(v).map_err(|e| e.to_string())?,
                "Discoverable" => f.discoverable = bool::try_from(v).map_err(|e| e.to_string())?,
                "Pattern" => f.pattern = String::try_from(v).map_err(|e| e.to_string())?,
                _ => {}
            }
        }
        // BlueZ refuses RSSI and Pathloss together.
        if f.rssi.is_some() && f.pathloss.is_some() {
            return Err("RSSI and Pathloss cannot both be set".into());
        }
        Ok(f)
    }

    /// Whether a device heard with `adv` at `rssi` passes this filter.
    pub fn matches(&self, adv: &AdvData, address: &str, rssi: i16) -> bool {
        if self.transport == "bredr" {
            return false;
        }
        if let Some(min) = self.rssi {
            if rssi < min {
                return false;
            }
        }
        if let Some(max) = self.pathloss {
            // Path loss needs the advertised TX power; without it BlueZ
            // cannot tell and does not report the device.
            match adv.tx_power {
                Some(tx) if i32::from(tx) - i32::from(rssi) <= i32::from(max) => {}
                _ => return false,
            }
        }
        if !self.uuids.is_empty() && !adv.service_uuids.iter().any(|u| self.uuids.contains(&full_uuid(u))) {
            return false;
        }
        if self.discoverable && !adv.discoverable {
            return false;
        }
        if !self.pattern.is_empty() {
            let name = adv.local_name.as_deref().unwrap_or("");
            if !address.starts_with(&self.pattern) && !name.starts_with(&self.pattern) {
                return false;
            }
        }
        true
    }
}

/// Who is scanning on a central, and with which filters.
#[derive(Default)]
pub(crate) struct ScanState {
    pub discovering: BTreeSet<String>,
    /// Set by clients, kept until they clear it or leave (as BlueZ does).
    pub filters: HashMap<String, DiscoveryFilter>,
}

/// What a central's controller listens for: the union of its scanning
/// clients' filters, as BlueZ merges them.
pub(crate) struct MergedFilter(Vec<DiscoveryFilter>);

impl MergedFilter {
    pub fn matches(&self, adv: &AdvData, address: &str, rssi: i16) -> bool {
        self.0.iter().any(|f| f.matches(adv, address, rssi))
    }
    /// ManufacturerData/ServiceData go out each time a device is heard
    /// unless every scanning client asked for duplicates to be filtered.
    pub fn duplicate_data(&self) -> bool {
        self.0.iter().any(|f| f.duplicate_data)
    }
}

impl ScanState {
    pub fn merged(&self) -> Option<MergedFilter> {
        if self.discovering.is_empty() {
            return None;
        }
        Some(MergedFilter(self.discovering.iter().map(|c| self.filters.get(c).cloned().unwrap_or_default()).collect()))
    }
}

/// One central-role adapter (`hci0` of one machine).
pub(crate) struct Central {
    /// `""` for the air's own bus, else the host's name.
    pub host: String,
    pub conn: Connection,
    pub bus_address: String,
    pub address: [u8; 6],
    pub scan: Mutex<ScanState>,
    /// Remote devices this central knows, by peripheral address.
    pub devices: Mutex<BTreeMap<[u8; 6], Arc<RemoteDevice>>>,
    /// What serves this central (its bus watcher).
    pub tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Central {
    pub fn scan(&self) -> std::sync::MutexGuard<'_, ScanState> {
        lock(&self.scan)
    }
    pub fn devices(&self) -> std::sync::MutexGuard<'_, BTreeMap<[u8; 6], Arc<RemoteDevice>>> {
        lock(&self.devices)
    }
    pub fn device(&self, address: &[u8; 6]) -> Option<Arc<RemoteDevice>> {
        self.devices().get(address).cloned()
    }
    pub fn address_string(&self) -> String {
        super::format_address(&self.address)
    }
    pub fn discovering(&self) -> bool {
        !self.scan().discovering.is_empty()
    }
    pub fn add_task(&self, t: tokio::task::JoinHandle<()>) {
        lock(&self.tasks).push(t);
    }
    pub fn stop(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(entries: Vec<(&str, zbus::Variant<'static>)>) -> HashMap<String, OwnedVariant> {
        entries.into_iter().map(|(k, v)| (k.to_string(), OwnedVariant::try_from(v).unwrap())).collect()
    }

    fn bms() -> AdvData {
        AdvData {
            local_name: Some("xiaoxiang BMS".into()),
            service_uuids: vec!["0000ff00-0000-1000-8000-00805f9b34fb".into()],
            discoverable: true,
            ..Default::default()
        }
    }

    #[test]
    fn uuid_rssi_pattern_and_transport_filter_what_is_reported() {
        let adv = bms();
        let by_uuid = DiscoveryFilter::parse(&dict(vec![("UUIDs", vec!["ff00".to_string()].into())])).unwrap();
        assert!(by_uuid.matches(&adv, "C0:DE:00:00:00:01", -60));
        let other = DiscoveryFilter::parse(&dict(vec![("UUIDs", vec!["180a".to_string()].into())])).unwrap();
        assert!(!other.matches(&adv, "C0:DE:00:00:00:01", -60));

        let near = DiscoveryFilter::parse(&dict(vec![("RSSI", (-50i16).into())])).unwrap();
        assert!(near.matches(&adv, "C0:DE:00:00:00:01", -45));
        assert!(!near.matches(&adv, "C0:DE:00:00:00:01", -70));

        let by_name = DiscoveryFilter::parse(&dict(vec![("Pattern", "xiao".into())])).unwrap();
        assert!(by_name.matches(&adv, "C0:DE:00:00:00:01", -60));
        let by_addr = DiscoveryFilter::parse(&dict(vec![("Pattern", "C0:DE".into())])).unwrap();
        assert!(by_addr.matches(&adv, "C0:DE:00:00:00:01", -60));
        let neither = DiscoveryFilter::parse(&dict(vec![("Pattern", "JBD".into())])).unwrap();
        assert!(!neither.matches(&adv, "C0:DE:00:00:00:01", -60));

        let classic = DiscoveryFilter::parse(&dict(vec![("Transport", "bredr".into())])).unwrap();
        assert!(!classic.matches(&adv, "C0:DE:00:00:00:01", -60));

        // Path loss needs TX power in the advertisement.
        let pl = DiscoveryFilter::parse(&dict(vec![("Pathloss", 60u16.into())])).unwrap();
        assert!(!pl.matches(&adv, "C0:DE:00:00:00:01", -50));
        let with_tx = AdvData { tx_power: Some(4), ..bms() };
        assert!(pl.matches(&with_tx, "C0:DE:00:00:00:01", -50));
        assert!(!pl.matches(&with_tx, "C0:DE:00:00:00:01", -70));
    }

    #[test]
    fn bad_filters_are_refused_with_the_reason() {
        let e = DiscoveryFilter::parse(&dict(vec![("UUIDs", vec!["not-a-uuid".to_string()].into())])).unwrap_err();
        assert!(e.contains("not-a-uuid"), "{e}");
        let e = DiscoveryFilter::parse(&dict(vec![("RSSI", (-40i16).into()), ("Pathloss", 10u16.into())])).unwrap_err();
        assert!(e.contains("both"), "{e}");
        let e = DiscoveryFilter::parse(&dict(vec![("RSSI", 100i16.into())])).unwrap_err();
        assert!(e.contains("RSSI"), "{e}");
        let e = DiscoveryFilter::parse(&dict(vec![("Colour", "red".into())])).unwrap_err();
        assert!(e.contains("Colour"), "{e}");
    }

    #[test]
    fn merged_filter_is_the_union_of_scanning_clients() {
        let mut s = ScanState::default();
        assert!(s.merged().is_none(), "nobody scanning hears nothing");
        s.filters.insert(":1.1".into(), DiscoveryFilter { uuids: vec![full_uuid("180a")], duplicate_data: false, ..Default::default() });
        s.discovering.insert(":1.1".into());
        let m = s.merged().unwrap();
        assert!(!m.matches(&bms(), "C0:DE:00:00:00:01", -60));
        assert!(!m.duplicate_data());
        // A second client with no filter hears everything.
        s.discovering.insert(":1.2".into());
        let m = s.merged().unwrap();
        assert!(m.matches(&bms(), "C0:DE:00:00:00:01", -60));
        assert!(m.duplicate_data());
    }
}
