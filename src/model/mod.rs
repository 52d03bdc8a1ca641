//! Physics models behind the simulated devices.
//!
//! [`pack`] is the battery pack model (cells, SoC, temperatures, protections,
//! FETs, balancing) shared by every simulated BMS: the EG4 LifePower4 Modbus
//! device renders it into registers, the JBD BLE BMS will render the same
//! state into its frames. The model is pure: no I/O and no clock, time only
//! moves when the caller passes a `Duration` to [`PackModel::advance`], so
//! scenarios and tests are deterministic.

pub mod pack;
pub use pack::*;
