//! Where a `hilbench sim` BLE device registers: on a virtual air of its
//! own (the default), on an air already running (`--bus`), or on real
//! BlueZ (`--adapter hci0`); and what to undo when it stops. Every sim
//! kind on BLE flattens [`BlePlaceArgs`] and calls [`BlePlacement::place`].

use clap::Args;

use crate::air::att::DEFAULT_ATT_MTU;

/// The options that say where a simulated BLE device goes.
#[derive(Args, Debug, Clone, Default)]
pub struct BlePlaceArgs {
    /// ATT MTU of the link on the virtual air (23..=517; default 23). Real BlueZ negotiates its own.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(23..=517))]
    pub mtu: Option<u16>,
    /// Join the virtual air on this D-Bus address instead of starting one.
    #[arg(long, value_name = "ADDRESS")]
    pub bus: Option<String>,
    /// Register on this BlueZ adapter (real BlueZ: hci0; on an air: an adapter it already has).
    #[arg(long, value_name = "hciN")]
    pub adapter: Option<String>,
}

impl BlePlaceArgs {
    pub fn mtu(&self) -> u16 {
        self.mtu.unwrap_or(DEFAULT_ATT_MTU)
    }

    /// Any of the options was given.
    pub fn given(&self) -> bool {
        self.mtu.is_some() || self.bus.is_some() || self.adapter.is_some()
    }
}

enum Place {
    OwnAir(crate::air::Air),
    JoinedAir { adapter_path: String },
    BlueZ,
}

/// A device's place, held while it serves; [`BlePlacement::release`] undoes it.
pub struct BlePlacement {
    place: Place,
    adapter: String,
    bus: String,
}

impl BlePlacement {
    /// Starts or joins an air (or takes real BlueZ) and picks the adapter,
    /// then points this process's D-Bus system bus at it. `seed` seeds an
    /// air of its own.
    pub async fn place(a: &BlePlaceArgs, seed: u64) -> Result<BlePlacement, String> {
        let (place, adapter, bus) = match (&a.bus, &a.adapter) {
            (None, Some(adapter)) => {
                let bus = std::env::var("DBUS_SYSTEM_BUS_ADDRESS").unwrap_or_else(|_| "unix:path=/run/dbus/system_bus_socket".into());
                (Place::BlueZ, adapter.clone(), bus)
            }
            (None, None) => {
                let air = crate::air::Air::start(crate::air::AirConfig { seed, ..Default::default() })
                    .await
                    .map_err(|e| format!("the virtual air did not start: {e:#}"))?;
                let info = air.add_peripheral_adapter().await.map_err(|e| format!("{e:#}"))?;
                if let Some(link) = air.link(&info.name) {
                    link.set_mtu(a.mtu()).await;
                }
                let bus = air.address().to_string();
                (Place::OwnAir(air), info.name, bus)
            }
            (Some(bus), Some(adapter)) => (Place::JoinedAir { adapter_path: String::new() }, adapter.clone(), bus.clone()),
            (Some(bus), None) => {
                let (path, name) = join_air(bus, a.mtu()).await?;
                (Place::JoinedAir { adapter_path: path }, name, bus.clone())
            }
        };
        // libdbus (under bluer) reads this once, at the first connection.
        std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &bus);
        Ok(BlePlacement { place, adapter, bus })
    }

    /// The adapter to register on (`hciN`).
    pub fn adapter(&self) -> &str {
        &self.adapter
    }

    /// The D-Bus address centrals use as their system bus.
    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// On a virtual air (its own or a joined one), not real BlueZ.
    pub fn on_air(&self) -> bool {
        !matches!(self.place, Place::BlueZ)
    }

    /// Stops an air of its own; gives a joined air its adapter back, so
    /// the air's view does not keep a dead device.
    pub async fn release(self) {
        match self.place {
            Place::OwnAir(air) => air.stop().await,
            Place::JoinedAir { adapter_path } if !adapter_path.is_empty() => {
                if let Ok(conn) = zbus::connection::Builder::address(self.bus.as_str()).build().await {
                    if let Ok(path) = zbus::ObjectPath::try_from(adapter_path.as_str()) {
                        let _ = conn
                            .call_method(Some(crate::air::BLUEZ), crate::air::CONTROL_PATH, Some("org.hilbench.Air1"), "RemovePeripheralAdapter", &(path,))
                            .await;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Asks a running air for a peripheral adapter at `mtu`: its object path and name.
async fn join_air(bus: &str, mtu: u16) -> Result<(String, String), String> {
    let conn = zbus::connection::Builder::address(bus).build().await.map_err(|e| format!("--bus {bus}: cannot connect: {e}"))?;
    let reply = conn
        .call_method(Some(crate::air::BLUEZ), crate::air::CONTROL_PATH, Some("org.hilbench.Air1"), "AddPeripheralAdapter", &())
        .await
        .map_err(|e| format!("--bus {bus}: no hilbench air there to give an adapter (org.hilbench.Air1: {e}); pass --adapter"))?;
    let (path, _address): (zbus::OwnedObjectPath, String) = reply.body().deserialize().map_err(|e| format!("org.hilbench.Air1.AddPeripheralAdapter answered oddly: {e}"))?;
    let name = path.as_str().rsplit('/').next().unwrap_or_default().to_string();
    let set: Result<zbus::Message, _> = conn.call_method(Some(crate::air::BLUEZ), crate::air::CONTROL_PATH, Some("org.hilbench.Air1"), "SetMtu", &(name.as_str(), mtu)).await;
    if let Err(e) = set {
        tracing::warn!("setting the MTU on the air: {e}");
    }
    Ok((path.to_string(), name))
}
