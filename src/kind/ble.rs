//! BLE as a transport for GATT kinds: a device's place on the virtual air
//! (a lent peripheral adapter with its MTU and RSSI), the `ble` step, link
//! faults and frames on its air link, ATT capture, and the other machines
//! of `ble_hosts`. A GATT kind holds an [`AirLink`] and forwards its
//! `Running` methods to it; nothing here knows which device it carries.

use serde::Deserialize;

use futures::future::LocalBoxFuture;

use super::{at_key, step_body, Running, StepContext, StepDoc};
use crate::air::att::{DEFAULT_ATT_MTU, MAX_ATT_MTU};
use crate::air::shared;
use crate::air::WriteKind;
use crate::link::{FaultRule, FrameRecord};
use crate::scenario::source::Problem;

/// The `ble` step: controls on a BLE device's link, the air's side of it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BleStep {
    pub device: String,
    /// Renegotiated ATT MTU (23..=517).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Refuse (true) or accept again (false) connection attempts.
    #[serde(default)]
    pub refuse_connections: Option<bool>,
    /// Drop the connection now, as a device going out of range.
    #[serde(default)]
    pub disconnect: bool,
    /// Make the characteristic reject this write type (`none` accepts both again).
    #[serde(default)]
    pub reject_write: Option<String>,
    /// The air withdraws the device's advertising while a central is connected
    /// (single-connection modules), whatever the device itself does.
    #[serde(default)]
    pub stop_advertising_while_connected: Option<bool>,
    /// Move the device: centrals hear it at about this RSSI in dBm
    /// (−127..=20), so RSSI discovery filters can leave it out.
    #[serde(default)]
    pub rssi: Option<i16>,
}

/// What a GATT kind lists among its steps.
pub const BLE_STEP: StepDoc = StepDoc {
    name: "ble",
    target: "device",
    about: "the device's link on the air",
    keys: "device, mtu, refuse_connections, disconnect, reject_write (request | command | none), stop_advertising_while_connected, rssi",
};

/// The BLE link settings a device or a `ble` step may give: an ATT MTU and
/// an RSSI a central can hear. Problems are at the key.
pub fn check_link_settings(mtu: Option<u16>, rssi: Option<i16>) -> Result<(), Problem> {
    if let Some(m) = mtu.filter(|m| !(DEFAULT_ATT_MTU..=MAX_ATT_MTU).contains(m)) {
        return Err(at_key("mtu", format!("mtu {m} is outside {DEFAULT_ATT_MTU}..={MAX_ATT_MTU} (ATT)")));
    }
    if let Some(r) = rssi.filter(|r| !(-127..=20).contains(r)) {
        return Err(at_key("rssi", format!("rssi {r} is outside -127..=20 dBm")));
    }
    Ok(())
}

/// Checks a `ble` step's body; problems are relative to it.
pub fn check_step(body: &yaml_serde::Value) -> Result<(), Problem> {
    let b: BleStep = step_body(body)?;
    check_link_settings(b.mtu, b.rssi)?;
    if let Some(w) = &b.reject_write {
        if write_kind(w).is_err() {
            return Err(at_key("reject_write", format!("reject_write must be request, command or none, not `{w}`")));
        }
    }
    let nothing = b.mtu.is_none()
        && b.refuse_connections.is_none()
        && !b.disconnect
        && b.reject_write.is_none()
        && b.stop_advertising_while_connected.is_none()
        && b.rssi.is_none();
    if nothing {
        return Err(Problem::here("give at least one of mtu, refuse_connections, disconnect, reject_write, stop_advertising_while_connected, rssi"));
    }
    Ok(())
}

fn write_kind(w: &str) -> Result<Option<WriteKind>, ()> {
    match w {
        "request" => Ok(Some(WriteKind::Request)),
        "command" => Ok(Some(WriteKind::Command)),
        "none" => Ok(None),
        _ => Err(()),
    }
}

/// A GATT device's link on the process's air: the peripheral adapter lent
/// to it for the run. Give it back with [`AirLink::give_back`].
pub struct AirLink {
    adapter: String,
}

/// The name of a device's BLE link: `NAME.ble`.
pub fn link_name(device: &str) -> String {
    format!("{device}.ble")
}

impl AirLink {
    /// `air` when `link` is the BLE link of `device` (`NAME.ble`).
    pub fn named<'a>(air: Option<&'a AirLink>, device: &str, link: &str) -> Option<&'a AirLink> {
        air.filter(|_| link == link_name(device))
    }

    /// A fresh peripheral adapter, its link at `mtu` (default 23) and heard at `rssi`.
    pub async fn lend(mtu: Option<u16>, rssi: Option<i16>) -> Result<AirLink, String> {
        let adapter = shared::lend_adapter(mtu.unwrap_or(DEFAULT_ATT_MTU), rssi).await?;
        Ok(AirLink { adapter })
    }

    /// The adapter (`hciN`) the device registers on.
    pub fn adapter(&self) -> &str {
        &self.adapter
    }

    /// Removes the adapter, so later scans never see the device.
    pub async fn give_back(self) {
        shared::return_adapter(&self.adapter).await;
    }

    /// Template variables: `air.bus`, the bus centrals join.
    pub fn vars(&self) -> Vec<(String, String)> {
        shared::shared().map(|air| vec![("air.bus".to_string(), air.address().to_string())]).unwrap_or_default()
    }

    pub async fn add_fault(&self, rule: FaultRule) -> Result<(), String> {
        shared::with_link(&self.adapter, move |l| async move { l.add_fault(rule) }).await
    }

    /// Clears every fault, or the one called `name`.
    pub async fn clear_faults(&self, link: &str, name: Option<&str>) -> Result<(), String> {
        let name = name.map(str::to_string);
        let wanted = name.clone();
        let found = shared::with_link(&self.adapter, move |l| async move {
            match wanted {
                None => {
                    l.clear_faults();
                    true
                }
                Some(n) => l.link().clear_fault(&n),
            }
        })
        .await?;
        match (found, name) {
            (false, Some(n)) => Err(format!("no fault named `{n}` on `{link}`")),
            _ => Ok(()),
        }
    }

    /// The device's frames as its link carried them, under the link's name.
    pub async fn frames(&self, link: &str) -> Vec<FrameRecord> {
        let recs = shared::with_link(&self.adapter, |l| async move { l.frames() }).await.unwrap_or_default();
        named(recs, link)
    }

    /// The same traffic as ATT PDUs, for the capture.
    pub async fn att_frames(&self, link: &str) -> Vec<FrameRecord> {
        let recs = shared::with_link(&self.adapter, |l| async move { l.att_frames() }).await.unwrap_or_default();
        named(recs, link)
    }

    /// Carries out a `ble` step (already checked by [`check_step`]).
    pub async fn apply(&self, body: &yaml_serde::Value) -> Result<String, String> {
        let b: BleStep = step_body(body).map_err(|p| p.message)?;
        let reject = b.reject_write.as_deref().map(|w| write_kind(w).map_err(|()| format!("reject_write `{w}`"))).transpose()?;
        let device = b.device.clone();
        let done = shared::with_link(&self.adapter, move |l| async move {
            let mut done = Vec::new();
            if let Some(on) = b.refuse_connections {
                l.refuse_connections(on);
                done.push(format!("refuse_connections={on}"));
            }
            if let Some(on) = b.stop_advertising_while_connected {
                l.stop_advertising_while_connected(on);
                done.push(format!("stop_advertising_while_connected={on}"));
            }
            if let Some(r) = b.rssi {
                l.set_rssi(Some(r));
                done.push(format!("rssi={r} dBm"));
            }
            if let (Some(kind), Some(w)) = (reject, &b.reject_write) {
                l.reject_write(kind);
                done.push(format!("reject_write={w}"));
            }
            if let Some(m) = b.mtu {
                done.push(format!("mtu={}", l.set_mtu(m).await));
            }
            if b.disconnect {
                let was = l.is_connected();
                l.disconnect_now().await;
                done.push(if was { "disconnected".to_string() } else { "disconnect (was not connected)".to_string() });
            }
            done
        })
        .await?;
        Ok(format!("{device}: {}", done.join(", ")))
    }
}

fn named(mut recs: Vec<FrameRecord>, link: &str) -> Vec<FrameRecord> {
    for r in &mut recs {
        r.link = link.to_string();
    }
    recs
}

/// Another machine near the BLE devices (`ble_hosts`): its own bus and hci0
/// on the process's air, under a name no other scenario uses.
pub async fn add_host(name: &str) -> Result<crate::air::HostInfo, String> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let unique = format!("{name}-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let air = shared::shared()?;
    air.run(move |air| async move { air.add_host(&unique).await.map_err(|e| format!("{e:#}")) }).await?
}

/// Takes a `ble_hosts` machine off the air.
pub async fn remove_host(host: String) {
    if let Ok(air) = shared::shared() {
        let _ = air.run(move |air| async move { air.remove_host(&host).await }).await;
    }
}

/// A GATT device's own part of a running entity: its state and its
/// teardown. Everything else a GATT kind does in a scenario (template
/// variables, the `ble` step, link faults, frames, ATT capture) is the same
/// for every kind and lives in [`OnAir`].
pub trait AirDevice: 'static {
    /// A `set` step or `state` key.
    fn set<'a>(&'a self, key: &'a str, value: f64) -> LocalBoxFuture<'a, Result<(), String>> {
        let _ = value;
        Box::pin(async move { Err(format!("no state key `{key}` to set")) })
    }
    /// Unregisters what it registered on its adapter.
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()>;
}

/// A running GATT device: an [`AirDevice`] on its [`AirLink`], under the
/// name and BLE address scenarios use (`{{ble.NAME}}`).
pub struct OnAir {
    name: String,
    address: String,
    air: AirLink,
    device: Box<dyn AirDevice>,
}

impl OnAir {
    pub fn new(name: impl Into<String>, address: impl Into<String>, air: AirLink, device: impl AirDevice) -> Self {
        OnAir { name: name.into(), address: address.into(), air, device: Box::new(device) }
    }
}

impl Running for OnAir {
    fn vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![(format!("ble.{}", self.name), self.address.clone())];
        vars.extend(self.air.vars());
        vars
    }
    fn step<'a>(&'a mut self, _step: &'a str, body: &'a yaml_serde::Value, _cx: StepContext<'a>) -> LocalBoxFuture<'a, Result<String, String>> {
        Box::pin(self.air.apply(body))
    }
    fn add_fault<'a>(&'a self, _link: &'a str, rule: FaultRule) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(self.air.add_fault(rule))
    }
    fn clear_faults<'a>(&'a self, link: &'a str, name: Option<&'a str>) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(self.air.clear_faults(link, name))
    }
    fn frames(&self) -> LocalBoxFuture<'_, Vec<FrameRecord>> {
        Box::pin(self.air.frames(&self.name))
    }
    fn capture<'a>(&'a self, link: &'a str) -> LocalBoxFuture<'a, Vec<FrameRecord>> {
        Box::pin(self.air.att_frames(link))
    }
    fn set<'a>(&'a self, key: &'a str, value: f64) -> LocalBoxFuture<'a, Result<(), String>> {
        self.device.set(key, value)
    }
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            let OnAir { device, air, .. } = *self;
            device.stop().await;
            // Given back, so the next scenario's scans never see it.
            air.give_back().await;
        })
    }
}
