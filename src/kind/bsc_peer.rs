//! What the two BACnet/SC client kinds (`bsc-node`, `bsc-raw`) share: how
//! they name a hub, their identity (VMAC, Device UUID) and their TLS
//! certificate from the run's PKI.

use std::collections::BTreeMap;
use std::path::Path;

use super::bsc_hub::BACNET_SC_HUB;
use super::{at_key, Names};
use crate::protocol::bvlc_sc::{DeviceUuid, Vmac};
use crate::scenario::source::Problem;
use crate::transport::tls::TlsDir;
use crate::transport::ws_client::WsConnectOptions;

/// `hub` names a hub device of the scenario or is a ws:// / wss:// URL.
pub fn check_hub(key: &str, hub: &str, names: &Names<'_>) -> Result<(), Problem> {
    let hubs = names.devices_serving(BACNET_SC_HUB);
    if hubs.contains(&hub) || hub.starts_with("ws://") || hub.starts_with("wss://") {
        return Ok(());
    }
    Err(at_key(
        key,
        format!(
            "hub `{hub}` is neither a bsc-hub device ({}) nor a ws:// or wss:// URL",
            if hubs.is_empty() { "none declared".to_string() } else { hubs.join(", ") }
        ),
    ))
}

pub fn check_identity(vmac: Option<&str>, uuid: Option<&str>) -> Result<(), Problem> {
    if let Some(v) = vmac {
        let parsed: Vmac = v.parse().map_err(|e| at_key("vmac", format!("vmac `{v}`: {e}")))?;
        if parsed.is_broadcast() || parsed.is_reserved() {
            return Err(at_key("vmac", format!("vmac `{v}` is the broadcast or reserved address")));
        }
    }
    if let Some(u) = uuid {
        u.parse::<DeviceUuid>().map_err(|e| at_key("uuid", format!("uuid `{u}`: {e}")))?;
    }
    Ok(())
}

/// The URL for a `hub:` (a hub device's URL, or a URL as given).
pub fn hub_url(vars: &BTreeMap<String, String>, hub: &str) -> Result<String, String> {
    if hub.starts_with("ws://") || hub.starts_with("wss://") {
        return Ok(hub.to_string());
    }
    vars.get(&format!("hub.{hub}")).cloned().ok_or_else(|| format!("no hub `{hub}`"))
}

/// The client's place among the scenario's BACnet/SC clients, which picks
/// its default VMAC and its certificate (node-1, node-2, …).
pub fn peer_index(names: &Names<'_>, me: &str) -> usize {
    names.clients_of(BACNET_SC_HUB).iter().position(|n| *n == me).unwrap_or(0)
}

/// TLS for a client of the scenario's hubs: its own node certificate from the run's PKI.
/// How the client connects, and (with TLS) the Device UUID its certificate
/// carries, which it sends unless the scenario names another.
pub fn ws_options(url: &str, index: usize, pki_dir: &Path) -> Result<(WsConnectOptions, Option<DeviceUuid>), String> {
    if !url.starts_with("wss://") {
        return Ok((WsConnectOptions::hub(None), None));
    }
    let dir = TlsDir::node(pki_dir, &format!("node-{}", index + 1));
    let tls = dir.client_config().map_err(|e| e.to_string())?;
    Ok((WsConnectOptions::hub(Some(tls)), dir.device_uuid().map(DeviceUuid)))
}

/// `02:00:00:00:NN:NN` from the client's index, unless the scenario gives one.
pub fn vmac(given: Option<&str>, index: usize) -> Vmac {
    given
        .and_then(|v| v.parse().ok())
        .unwrap_or(Vmac([0x02, 0, 0, 0, (index >> 8) as u8, (index as u8).wrapping_add(1)]))
}

/// The scenario's UUID, else the certificate's, else one made from the VMAC.
pub fn uuid(given: Option<&str>, vmac: Vmac, from_cert: Option<DeviceUuid>) -> DeviceUuid {
    given.and_then(|u| u.parse().ok()).or(from_cert).unwrap_or_else(|| {
        let mut u = [0u8; 16];
        u[..8].copy_from_slice(b"hilbench");
        u[10..].copy_from_slice(&vmac.0);
        DeviceUuid(u)
    })
}
