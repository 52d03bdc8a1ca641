//! Simulated devices: actors that own a sans-IO protocol core and a model.

pub mod bsc_hub;
pub mod bsc_hub_core;
pub mod eg4;
pub mod eg4_core;
pub mod jbd;
pub mod jbd_core;

/// Device kinds `hilbench` can simulate, for `hilbench list`.
pub const DEVICE_KINDS: &[(&str, &str)] = &[
    (
        "eg4-lp4",
        "EG4 LifePower4 v2 battery pack: Modbus RTU slave (or legacy 7E/0D) on an RS-485 bus of PTYs",
    ),
    (
        "jbd-bms",
        "JBD / Xiaoxiang smart BMS: GATT service 0xFF00 through bluer, on the virtual BLE air or real BlueZ",
    ),
    (
        "bsc-hub",
        "BACnet/SC hub (ASHRAE 135 Annex AB): ws:// or wss:// (TLS 1.3, client certificates), hub function",
    ),
];
