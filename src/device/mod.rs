//! Simulated devices: actors that own a sans-IO protocol core and a model.

pub mod bsc_hub;
pub mod bsc_hub_core;
pub mod driver;
pub mod eg4;
pub mod eg4_core;
pub mod jbd;
pub mod jbd_core;
pub mod replay;
pub mod replay_ble;
pub mod replay_udp;
pub mod replay_ws;
pub mod served;
pub mod replay_core;
pub mod shelly_ble;
pub mod shelly_core;
pub mod shelly_host;
pub mod smp_ble;
pub mod smp_core;
pub mod smp_serial;
pub mod smp_host;
