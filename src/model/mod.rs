//! Physics models behind the simulated devices.
//!
//! [`pack`] is the battery pack model (cells, SoC, temperatures, protections,
//! FETs, balancing) shared by every simulated BMS: the EG4 LifePower4 Modbus
//! device renders it into registers, the JBD BLE BMS will render the same
//! state into its frames. The model is pure: no I/O and no clock, time only
//! moves when the caller passes a `Duration` to [`PackModel::advance`], so
//! scenarios and tests are deterministic.
//!
//! [`firmware`] is an MCUboot device's two image slots and the swap it runs
//! at each boot, behind the SMP server, with its [`filesystem`] and
//! [`settings`].

pub mod filesystem;
pub mod firmware;
pub mod pack;
pub mod relay;
pub mod settings;
pub use pack::*;

/// A key the pack model understands (`N` stands for an index: `cell12_mv`
/// is `cellN_mv`), plus `address`, the devices' bus address.
pub fn check_state_key(key: &str) -> Result<(), String> {
    if key == "address" {
        return Ok(());
    }
    let generic = crate::kind::numbers_as_n(key);
    if STATE_KEYS.iter().any(|(k, _)| *k == key || *k == generic) {
        Ok(())
    } else {
        let keys: Vec<_> = STATE_KEYS.iter().map(|(k, _)| *k).collect();
        Err(format!("unknown state key `{key}` (known: address, {})", keys.join(", ")))
    }
}
