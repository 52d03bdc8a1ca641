//! `hilbench air`: the virtual BLE air on its own, for a client under test
//! started by hand. Prints one JSON line when ready; export its
//! `dbus_system_bus_address` as DBUS_SYSTEM_BUS_ADDRESS for the client.
//! SIGTERM / SIGINT stop it and remove the bus socket.

use std::time::Duration;

use crate::air::{Air, AirConfig};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  hilbench air --adapters 2
  hilbench air --host phone     # a second machine: its own bus and hci0 (see `hosts` in the ready line)
  # clients on this shell's system bus, while it runs; then stop it:
  hilbench air > air.json & air=$!
  until [ -s air.json ] || ! kill -0 $air; do sleep 0.1; done
  export DBUS_SYSTEM_BUS_ADDRESS=$(jq -r .dbus_system_bus_address air.json)
  busctl --system tree org.bluez; kill $air")]
pub struct AirArgs {
    /// Peripheral adapters (hci1…) to create at start; devices can add more
    /// through org.hilbench.Air1.AddPeripheralAdapter.
    #[arg(long, default_value_t = 1)]
    pub adapters: usize,
    /// Seeds RSSI values and link faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How often an advertising device is heard again while hci0 scans.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub advertise_interval: Duration,
    /// Another machine near the devices (repeatable): it gets a bus of its
    /// own with its own hci0, and competes with the main bus's centrals for
    /// each device's one link.
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
    /// How long a central keeps a device it no longer hears (BlueZ's TemporaryTimeout).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub temporary_timeout: Duration,
    /// Serve on this existing bus instead of starting our own broker.
    #[arg(long)]
    pub bus: Option<String>,
    /// The broker to start: in-process (hilbench's own bus, every client),
    /// dbus-daemon (a separate process), or busd (in-process; not for bleak).
    #[arg(long, value_enum, default_value = "in-process")]
    pub broker: crate::air::broker::BrokerKind,
    /// Threads serving the air (1: everything on the starting thread).
    /// Measured with benches/air.rs on a loaded 2-core machine, 2 answered
    /// a btleplug round trip faster than 1.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
}

pub fn run(a: AirArgs) -> i32 {
    let built = if a.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(usize::from(a.threads)).enable_all().build()
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async {
        let config = AirConfig {
            seed: a.seed,
            peripheral_adapters: a.adapters,
            advertise_interval: a.advertise_interval,
            bus_address: a.bus.clone(),
            broker: a.broker,
            temporary_timeout: a.temporary_timeout,
            ..Default::default()
        };
        let air = match Air::start(config).await {
            Ok(air) => air,
            Err(e) => {
                eprintln!("error: the air did not start: {e:#}");
                return 1;
            }
        };
        for h in &a.hosts {
            if let Err(e) = air.add_host(h).await {
                eprintln!("error: host {h}: {e:#}");
                air.stop().await;
                return 1;
            }
        }
        let ready = serde_json::json!({
            "ready": true,
            "kind": "air",
            "dbus_system_bus_address": air.address(),
            "central": { "name": "hci0", "path": crate::air::CENTRAL_PATH, "address": air.central_address() },
            "adapters": air.peripheral_adapters(),
            "hosts": air.hosts(),
        });
        let signal = super::sim::wait_for_signal();
        println!("{ready}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        signal.await;
        tracing::info!("shutting down");
        air.stop().await;
        0
    })
}
