//! The BLE central side shared by the client actors (btleplug on BlueZ:
//! the virtual air's in CI, hci0 on a bench): picking an adapter and
//! finding a peripheral by address, name or service.

use std::time::Duration;

use btleplug::api::{Central, Manager as _, Peripheral as _, PeripheralProperties, ScanFilter};
use btleplug::platform::{Adapter, Manager, Peripheral};

use super::TransactionError;

/// btleplug's adapter by name (`hci0`), or the first one.
pub async fn central_adapter(name: Option<&str>) -> Result<Adapter, TransactionError> {
    let manager = Manager::new().await.map_err(|e| TransactionError::new("io", format!("BlueZ not reachable on the system bus: {e}")))?;
    let adapters = manager.adapters().await.map_err(|e| TransactionError::new("io", format!("listing adapters: {e}")))?;
    let mut names = Vec::new();
    for a in adapters {
        let info = a.adapter_info().await.unwrap_or_default();
        let adapter_name = info.split_whitespace().next().unwrap_or_default().to_string();
        match name {
            None => return Ok(a),
            Some(n) if n == adapter_name => return Ok(a),
            Some(_) => names.push(adapter_name),
        }
    }
    Err(TransactionError::new(
        "io",
        format!("no adapter {} (BlueZ has: {})", name.unwrap_or("at all"), if names.is_empty() { "none".into() } else { names.join(", ") }),
    ))
}

/// Scans until a peripheral whose properties `wanted` accepts shows up;
/// `what` names it in the error.
pub async fn find_peripheral(central: &Adapter, wanted: impl Fn(&PeripheralProperties) -> bool, what: &str, within: Duration) -> Result<Peripheral, TransactionError> {
    central
        .start_scan(ScanFilter::default())
        .await
        .map_err(|e| TransactionError::new("io", format!("starting a scan: {e}")))?;
    let found = tokio::time::timeout(within, async {
        loop {
            for p in central.peripherals().await.unwrap_or_default() {
                let Ok(Some(props)) = p.properties().await else { continue };
                if wanted(&props) {
                    return p;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let _ = central.stop_scan().await;
    found.map_err(|_| TransactionError::new("not_found", format!("{what} not seen within {} s of scanning", within.as_secs_f64())))
}

/// Connects and discovers the services, each within `within`. A connection
/// that does not come in time is cancelled: BlueZ would go on trying after
/// the caller stopped waiting and connect later to no one's use (holding a
/// single-connection device). The error names the step that failed.
pub async fn connect_and_discover(peripheral: &Peripheral, within: Duration) -> Result<(), (&'static str, String)> {
    match tokio::time::timeout(within, peripheral.connect()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(("connect", e.to_string())),
        Err(_) => {
            let _ = tokio::time::timeout(Duration::from_secs(5), peripheral.disconnect()).await;
            return Err(("connect", format!("no connection within {} ms", within.as_millis())));
        }
    }
    let discovered = match tokio::time::timeout(within, peripheral.discover_services()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(("service discovery", e.to_string())),
        Err(_) => Err(("service discovery", "timed out".to_string())),
    };
    if discovered.is_err() {
        let _ = peripheral.disconnect().await;
    }
    discovered
}
