//! Python's bleak (pinned in ci/requirements.txt) as the central on the air,
//! run as an external process with DBUS_SYSTEM_BUS_ADDRESS pointing at the
//! air: it finds an already-advertising bluer peripheral (a late scanner),
//! picks hci0 although several adapters exist, connects, subscribes, writes
//! without response and gets the answer in MTU−3 notifications.

mod air_support;

use std::path::Path;
use std::process::Command;

use air_support::*;

fn python() -> String {
    hilbench::python_with("bleak").unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bleak_scans_connects_subscribes_and_writes() {
    let py = python();
    let shared = shared_air();
    // More adapters than one: bleak must still pick hci0 (the only central).
    let _other = shared.adapter().await;
    let adapter = shared.adapter().await;
    let periph = start_peripheral(&adapter.name).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/bleak_echo.py");
    let address = adapter.address.clone();
    let bus = shared.air.address().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(script)
            .args(["--address", &address])
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bleak failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["name"], NAME);
    assert_eq!(v["path"], format!("/org/bluez/hci0/dev_{}", adapter.address.replace(':', "_")));
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let want: Vec<String> = answer_for(b"hi").iter().map(|c| hex(c)).collect();
    assert_eq!(v["notifications"], serde_json::json!(want));
    assert_eq!(v["long"], hex(&(0u8..20).collect::<Vec<u8>>()), "cut to MTU−3");
    assert_eq!(v["mtu"], 23);
    let w = periph.writes.lock().unwrap();
    assert!(w.iter().any(|s| s.value == b"hi" && s.command));
    assert!(w.iter().any(|s| s.value == b"LONG" && !s.command));
}
