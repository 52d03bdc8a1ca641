//! `hilbench sim jbd-bms` and `hilbench validate jbd-bms`.

use std::time::{Duration, Instant};

use clap::Args;

use super::ble_place::{BlePlaceArgs, BlePlacement};
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
    /// Set a state key at start (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub place: BlePlaceArgs,
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
        let placement = BlePlacement::place(&a.place, a.seed).await?;
        let (adapter, bus) = (placement.adapter().to_string(), placement.bus().to_string());
        let log = ObservationLog::bounded(Instant::now(), 10_000);
        let gatt = JbdGattConfig { adapter: adapter.clone(), local_name: a.name.clone(), ..JbdGattConfig::default() };
        let device = match JbdBmsDevice::start("jbd-bms", core, gatt, log).await {
            Ok(d) => d,
            Err(e) => {
                placement.release().await;
                return Err(format!("{e:#}"));
            }
        };
        let on_air = placement.on_air();
        let ready = serde_json::json!({
            "ready": true,
            "kind": "jbd-bms",
            "name": a.name,
            "address": device.address,
            "adapter": adapter,
            "dbus_system_bus_address": bus,
            "virtual_air": on_air,
            "mtu": if on_air { Some(a.place.mtu()) } else { None },
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
        placement.release().await;
        Ok(())
    })
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
