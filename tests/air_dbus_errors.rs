//! A client that calls what BlueZ does not offer gets the errors BlueZ (and
//! D-Bus) would send, and the air keeps serving afterwards.

use hilbench::air::{Air, AirConfig};

async fn call(conn: &zbus::Connection, path: &str, iface: &str, method: &str, body: &(impl serde::Serialize + zbus::zvariant::DynamicType)) -> Result<(), String> {
    conn.call_method(Some("org.bluez"), path, Some(iface), method, body)
        .await
        .map(|_| ())
        .map_err(|e| match e {
            zbus::Error::MethodError(name, detail, _) => format!("{} {}", name.as_str(), detail.unwrap_or_default()),
            // Standard errors come back parsed as zbus::fdo::Error; their text starts with the name.
            zbus::Error::FDO(fdo) => fdo.to_string(),
            other => format!("other: {other}"),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_wrong_arguments_and_missing_objects_get_dbus_errors() {
    let air = Air::start(AirConfig::default()).await.expect("air starts");
    let conn = zbus::connection::Builder::address(air.address()).build().await.unwrap();

    let e = call(&conn, "/org/bluez/hci0", "org.bluez.Adapter1", "Frobnicate", &()).await.unwrap_err();
    assert!(e.starts_with("org.freedesktop.DBus.Error.UnknownMethod"), "{e}");

    // SetDiscoveryFilter takes a{sv}; a string is the wrong signature.
    let e = call(&conn, "/org/bluez/hci0", "org.bluez.Adapter1", "SetDiscoveryFilter", &("le",)).await.unwrap_err();
    assert!(e.starts_with("org.freedesktop.DBus.Error.InvalidArgs"), "{e}");

    // A device that is not in range.
    let e = call(&conn, "/org/bluez/hci0/dev_00_11_22_33_44_55", "org.bluez.Device1", "Connect", &()).await.unwrap_err();
    assert!(
        e.starts_with("org.freedesktop.DBus.Error.UnknownObject") || e.starts_with("org.freedesktop.DBus.Error.UnknownMethod"),
        "{e}"
    );

    // Stopping a discovery this client never started: BlueZ answers org.bluez.Error.Failed ("No discovery started").
    let e = call(&conn, "/org/bluez/hci0", "org.bluez.Adapter1", "StopDiscovery", &()).await.unwrap_err();
    assert!(e.starts_with("org.bluez.Error."), "{e}");

    // Still serving: a valid call works.
    call(&conn, "/org/bluez/hci0", "org.bluez.Adapter1", "StartDiscovery", &()).await.expect("StartDiscovery after errors");
    call(&conn, "/org/bluez/hci0", "org.bluez.Adapter1", "StopDiscovery", &()).await.expect("StopDiscovery");
    air.stop().await;
}
