//! `hilbench sim jbd-bms` and `hilbench validate jbd-bms`.

use std::time::{Duration, Instant};

use clap::Args;

use crate::client::jbd_client::JbdTarget;
use crate::client::jbd_validate::{self, ValidateConfig};
use crate::device::jbd::{JbdBmsDevice, JbdGattConfig};
use crate::device::jbd_core::{JbdBms, JbdConfig, JbdProfile, JbdQuirk};
use crate::model::PackConfig;
use crate::observe::ObservationLog;

pub const SIM_HELP: &str = "State keys for --set (KEY=VALUE): the pack model's (soc, current_a, temp_c, tempN_c,
cell_mv, cellN_mv, cycles, capacity_ah, charge_fet, discharge_fet, …) and the BMS's
(factory_mode, software_version, production_date, afe_error, silent); `hilbench list` shows all.

Where it runs:
  (default)          starts hilbench's virtual BLE air (its own BlueZ on its own D-Bus bus)
                     and registers the BMS on a peripheral adapter of it
  --bus ADDRESS      joins an air that is already running (`hilbench air`), asking it for
                     an adapter through org.hilbench.Air1
  --adapter hci0     real BlueZ on the system bus (a Raspberry Pi with bluetoothd running)

Examples:
  hilbench sim jbd-bms --name 'xiaoxiang BMS' --cells 16 --ntc 4 --set soc=55 --set current_a=-12.5
  hilbench sim jbd-bms --profile rejects-write-request --quirk foreign_frames
  hilbench sim jbd-bms --adapter hci0                      # on a Raspberry Pi
  # point a client at the simulated one (bleak, btleplug, bluer, bluetoothctl), then stop it:
  hilbench sim jbd-bms > bms.json & sim=$!
  until [ -s bms.json ] || ! kill -0 $sim; do sleep 0.1; done
  export DBUS_SYSTEM_BUS_ADDRESS=$(jq -r .dbus_system_bus_address bms.json)
  busctl --system tree org.bluez; kill $sim

Prints one JSON line when advertising:
  {\"ready\":true,\"kind\":\"jbd-bms\",\"name\":\"xiaoxiang BMS\",\"address\":\"C0:DE:00:00:00:01\",
   \"adapter\":\"hci1\",\"dbus_system_bus_address\":\"unix:abstract=…\",…}
then serves until SIGINT/SIGTERM. Logs: RUST_LOG=hilbench=info";

#[derive(Args, Debug)]
pub struct JbdSimArgs {
    /// Advertised LocalName.
    #[arg(long, default_value = "xiaoxiang BMS")]
    pub name: String,
    /// Cells in series (4..=24).
    #[arg(long, default_value_t = 16)]
    pub cells: usize,
    /// Temperature sensors (1..=6).
    #[arg(long, default_value_t = 4)]
    pub ntc: usize,
    /// Nominal capacity, Ah.
    #[arg(long, default_value_t = 100.0)]
    pub capacity_ah: f64,
    /// Firmware variant: standard, rejects-write-request, chins, pin.
    #[arg(long, default_value = "standard")]
    pub profile: JbdProfile,
    /// Field faults of the firmware (repeatable): silent_after_first_answer,
    /// factory_enter_no_reply, balance_bits_msb_first, balance_words_swapped,
    /// foreign_frames, truncated_cell_voltages, corrupted_data.
    #[arg(long = "quirk")]
    pub quirks: Vec<JbdQuirk>,
    /// ATT MTU of the link on the virtual air (23..=517). Real BlueZ negotiates its own.
    #[arg(long, default_value_t = 23)]
    pub mtu: u16,
    /// Set a state key at start (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Join the virtual air on this D-Bus address instead of starting one.
    #[arg(long, value_name = "ADDRESS")]
    pub bus: Option<String>,
    /// Register on this BlueZ adapter (real BlueZ: hci0; on an air: an adapter it already has).
    #[arg(long, value_name = "hciN")]
    pub adapter: Option<String>,
    /// Seeds the PIN profile's random byte and the air's RSSI.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `hilbench validate jbd-bms --help` after the options.
pub const VALIDATE_HELP: &str = "Checks: advertisement (0xFF00), GATT properties of 0xFF01/0xFF02, 0x03/0x04/0x05 decode
and checksums, cell count agreement, notification sizes against MTU − 3, the answer to a
request with a bad checksum (status 0x80 or silence), whether write-with-response is accepted.
Exits 1 when a check fails.

Examples:
  hilbench validate jbd-bms --address A4:C1:38:12:34:56              # a real pack, from a Pi's hci0
  hilbench validate jbd-bms --name 'xiaoxiang BMS' --json
  # against the simulator, on its own bus:
  hilbench sim jbd-bms > bms.json & sim=$!
  until [ -s bms.json ] || ! kill -0 $sim; do sleep 0.1; done
  DBUS_SYSTEM_BUS_ADDRESS=$(jq -r .dbus_system_bus_address bms.json) hilbench validate jbd-bms --name 'xiaoxiang BMS'
  kill $sim";

#[derive(Args, Debug)]
pub struct JbdValidateArgs {
    /// The BMS's BLE address.
    #[arg(long, required_unless_present = "name")]
    pub address: Option<String>,
    /// The BMS's advertised name (when the address is not known).
    #[arg(long)]
    pub name: Option<String>,
    /// Central adapter.
    #[arg(long, default_value = "hci0")]
    pub adapter: String,
    /// Per-request answer timeout.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// How long to scan for the BMS.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub scan_timeout: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_set(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("--set `{s}`: expected KEY=VALUE"))?;
    let v: f64 = v.trim().parse().map_err(|_| format!("--set `{s}`: `{}` is not a number", v.trim()))?;
    Ok((k.trim().to_string(), v))
}

/// Where the BMS registers, and what to undo at the end.
enum Placement {
    OwnAir(crate::air::Air),
    JoinedAir { bus: String, adapter_path: String },
    BlueZ,
}

pub fn sim(a: JbdSimArgs) -> Result<(), String> {
    let sets: Vec<(String, f64)> = a.set.iter().map(|s| parse_set(s)).collect::<Result<_, _>>()?;
    let cfg = JbdConfig {
        pack: PackConfig { cells: a.cells, ntc: a.ntc, capacity_ah: a.capacity_ah, ..PackConfig::default() },
        profile: a.profile,
        quirks: a.quirks.clone(),
        seed: a.seed,
        ..JbdConfig::default()
    };
    let mut core = JbdBms::new(cfg).map_err(|e| format!("BMS configuration: {e}"))?;
    for (k, v) in &sets {
        core.set(k, *v).map_err(|e| format!("--set {k}={v}: {e}"))?;
    }
    let system = actix::System::new();
    system.block_on(async move {
        let (placement, adapter) = place(&a).await?;
        let bus = match &placement {
            Placement::OwnAir(air) => air.address().to_string(),
            Placement::JoinedAir { bus, .. } => bus.clone(),
            Placement::BlueZ => std::env::var("DBUS_SYSTEM_BUS_ADDRESS").unwrap_or_else(|_| "unix:path=/run/dbus/system_bus_socket".into()),
        };
        // libdbus (under bluer) reads this once, at the first connection.
        std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &bus);
        let log = ObservationLog::bounded(Instant::now(), 10_000);
        let gatt = JbdGattConfig { adapter: adapter.clone(), local_name: a.name.clone(), ..JbdGattConfig::default() };
        let device = match JbdBmsDevice::start("jbd-bms", core, gatt, log).await {
            Ok(d) => d,
            Err(e) => {
                unplace(placement).await;
                return Err(format!("{e:#}"));
            }
        };
        let on_air = !matches!(placement, Placement::BlueZ);
        let ready = serde_json::json!({
            "ready": true,
            "kind": "jbd-bms",
            "name": a.name,
            "address": device.address,
            "adapter": adapter,
            "dbus_system_bus_address": bus,
            "virtual_air": on_air,
            "mtu": if on_air { Some(a.mtu) } else { None },
            "profile": a.profile,
            "endpoints": { "address": device.address, "dbus_system_bus_address": bus },
        });
        let signal = super::sim::wait_for_signal();
        println!("{ready}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        signal.await;
        tracing::info!("shutting down");
        device.stop().await;
        unplace(placement).await;
        Ok(())
    })
}

async fn place(a: &JbdSimArgs) -> Result<(Placement, String), String> {
    match (&a.bus, &a.adapter) {
        (None, Some(adapter)) => Ok((Placement::BlueZ, adapter.clone())),
        (None, None) => {
            let air = crate::air::Air::start(crate::air::AirConfig { seed: a.seed, ..Default::default() })
                .await
                .map_err(|e| format!("the virtual air did not start: {e:#}"))?;
            let info = air.add_peripheral_adapter().await.map_err(|e| format!("{e:#}"))?;
            if let Some(link) = air.link(&info.name) {
                link.set_mtu(a.mtu).await;
            }
            Ok((Placement::OwnAir(air), info.name))
        }
        (Some(bus), Some(adapter)) => Ok((Placement::JoinedAir { bus: bus.clone(), adapter_path: String::new() }, adapter.clone())),
        (Some(bus), None) => {
            let conn = zbus::connection::Builder::address(bus.as_str())
                .build()
                .await
                .map_err(|e| format!("--bus {bus}: cannot connect: {e}"))?;
            let reply = conn
                .call_method(Some(crate::air::BLUEZ), crate::air::CONTROL_PATH, Some("org.hilbench.Air1"), "AddPeripheralAdapter", &())
                .await
                .map_err(|e| format!("--bus {bus}: no hilbench air there to give an adapter (org.hilbench.Air1: {e}); pass --adapter"))?;
            let (path, _address): (zbus::OwnedObjectPath, String) =
                reply.body().deserialize().map_err(|e| format!("org.hilbench.Air1.AddPeripheralAdapter answered oddly: {e}"))?;
            let name = path.as_str().rsplit('/').next().unwrap_or_default().to_string();
            let mtu: Result<zbus::Message, _> = conn
                .call_method(Some(crate::air::BLUEZ), crate::air::CONTROL_PATH, Some("org.hilbench.Air1"), "SetMtu", &(name.as_str(), a.mtu))
                .await;
            if let Err(e) = mtu {
                tracing::warn!("setting the MTU on the air: {e}");
            }
            Ok((Placement::JoinedAir { bus: bus.clone(), adapter_path: path.to_string() }, name))
        }
    }
}

async fn unplace(p: Placement) {
    match p {
        Placement::OwnAir(air) => air.stop().await,
        Placement::JoinedAir { bus, adapter_path } if !adapter_path.is_empty() => {
            // Give the adapter back, so the air's view does not keep a dead device.
            if let Ok(conn) = zbus::connection::Builder::address(bus.as_str()).build().await {
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

pub fn validate(a: JbdValidateArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start a runtime: {e}");
            return 2;
        }
    };
    let cfg = ValidateConfig {
        target: JbdTarget { address: a.address.clone(), name: a.name.clone() },
        adapter: Some(a.adapter.clone()),
        timeout: a.timeout,
        scan_timeout: a.scan_timeout,
    };
    let report = rt.block_on(jbd_validate::validate(&cfg));
    if a.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")));
    } else {
        print!("{}", jbd_validate::render(&report));
    }
    if report.passed() {
        0
    } else {
        1
    }
}
