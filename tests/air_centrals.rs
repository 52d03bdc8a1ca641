//! What centrals hear and how they compete, checked over plain D-Bus (zbus
//! on both sides, so each test can have an air of its own):
//! discovery filters decide which devices a scan reports; a central keeps a
//! device it stopped hearing until its temporary timeout; a Connect to a
//! device that is not connectable waits for it; and a second machine (its
//! own bus, its own hci0) competes for a single-connection peripheral's one
//! link.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use hilbench::air::{Air, AirConfig};
use tokio::time::timeout;
use zbus::{OwnedObjectPath, OwnedVariant as OwnedValue, Variant as Value};

const T: Duration = Duration::from_secs(10);
const JBD_SERVICE: &str = "0000ff00-0000-1000-8000-00805f9b34fb";

/// A minimal LEAdvertisement1, as a peripheral library exports it.
struct Advert {
    name: String,
    uuids: Vec<String>,
}

#[zbus::interface(name = "org.bluez.LEAdvertisement1")]
impl Advert {
    fn release(&self) {}
    #[zbus(property, name = "Type")]
    fn kind(&self) -> String {
        "peripheral".into()
    }
    #[zbus(property, name = "LocalName")]
    fn local_name(&self) -> String {
        self.name.clone()
    }
    #[zbus(property, name = "ServiceUUIDs")]
    fn service_uuids(&self) -> Vec<String> {
        self.uuids.clone()
    }
}

async fn air(config: AirConfig) -> Air {
    Air::start(AirConfig { advertise_interval: Duration::from_millis(50), ..config }).await.expect("air starts")
}

async fn connect(address: &str) -> zbus::Connection {
    zbus::connection::Builder::address(address).build().await.unwrap()
}

async fn call(conn: &zbus::Connection, path: &str, iface: &str, method: &str, body: &(impl serde::Serialize + zbus::zvariant::DynamicType)) -> Result<(), String> {
    conn.call_method(Some("org.bluez"), path, Some(iface), method, body).await.map(|_| ()).map_err(|e| match e {
        zbus::Error::MethodError(name, detail, _) => format!("{} {}", name.as_str(), detail.unwrap_or_default()),
        zbus::Error::FDO(fdo) => fdo.to_string(),
        other => format!("other: {other}"),
    })
}

/// A peripheral on its own adapter of `air`: its advertisement registered.
/// Returns its connection (dropping it takes the peripheral off the air),
/// adapter path and address.
async fn advertise(air: &Air, name: &str, uuids: &[&str]) -> (zbus::Connection, String, String) {
    let info = air.add_peripheral_adapter().await.unwrap();
    let conn = zbus::connection::Builder::address(air.address())
        .serve_at("/adv0", Advert { name: name.into(), uuids: uuids.iter().map(|u| u.to_string()).collect() })
        .build()
        .await
        .unwrap();
    let path = OwnedObjectPath::try_from("/adv0").unwrap();
    call(&conn, &info.path, "org.bluez.LEAdvertisingManager1", "RegisterAdvertisement", &(path, HashMap::<String, Value>::new()))
        .await
        .expect("advertisement registered");
    (conn, info.path, info.address)
}

fn device_path(address: &str) -> String {
    format!("/org/bluez/hci0/dev_{}", address.replace(':', "_"))
}

/// The Device1 objects a central's bus shows.
async fn devices(conn: &zbus::Connection) -> Vec<String> {
    let om = zbus::fdo::ObjectManagerProxy::builder(conn).destination("org.bluez").path("/").build().await.unwrap();
    let mut out: Vec<String> = om
        .get_managed_objects()
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, ifaces)| ifaces.keys().any(|i| i.as_str() == "org.bluez.Device1"))
        .map(|(p, _)| p.to_string())
        .collect();
    out.sort();
    out
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    timeout(T, async {
        while !f().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

async fn scan(conn: &zbus::Connection, filter: HashMap<&str, Value<'_>>) {
    call(conn, "/org/bluez/hci0", "org.bluez.Adapter1", "SetDiscoveryFilter", &(filter,)).await.expect("filter accepted");
    call(conn, "/org/bluez/hci0", "org.bluez.Adapter1", "StartDiscovery", &()).await.expect("scan starts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_filters_decide_what_a_scan_reports() {
    let air = air(AirConfig::default()).await;
    let (_bms, _, bms_addr) = advertise(&air, "xiaoxiang BMS", &[JBD_SERVICE]).await;
    let (_relay, _, relay_addr) = advertise(&air, "shellyplus1", &["0000fff0-0000-1000-8000-00805f9b34fb"]).await;

    // Nothing is reported before anyone scans.
    let central = connect(air.address()).await;
    assert!(devices(&central).await.is_empty());

    // A UUID filter (16-bit form) reports the BMS only.
    scan(&central, HashMap::from([("UUIDs", Value::from(vec!["ff00"])), ("Transport", Value::from("le"))])).await;
    wait_until("the BMS is reported", || async { devices(&central).await.contains(&device_path(&bms_addr)) }).await;
    timeout(T, air.full_round_heard()).await.expect("a round of advertisements");
    assert_eq!(devices(&central).await, vec![device_path(&bms_addr)], "the relay does not pass the UUID filter");

    // A second client scanning with a name pattern: the union is reported.
    let other = connect(air.address()).await;
    scan(&other, HashMap::from([("Pattern", Value::from("shelly"))])).await;
    wait_until("the relay is reported", || async { devices(&central).await.contains(&device_path(&relay_addr)) }).await;

    // An RSSI floor above what the BMS is heard at hides it from a new central host.
    air.link(&bms_addr).unwrap().set_rssi(Some(-90));
    air.link(&relay_addr).unwrap().set_rssi(Some(-40));
    let host = air.add_host("phone").await.unwrap();
    let phone = connect(&host.dbus_system_bus_address).await;
    scan(&phone, HashMap::from([("RSSI", Value::from(-70i16))])).await;
    wait_until("the phone hears the near relay", || async { devices(&phone).await.contains(&device_path(&relay_addr)) }).await;
    timeout(T, air.full_round_heard()).await.expect("a round of advertisements");
    assert_eq!(devices(&phone).await, vec![device_path(&relay_addr)], "the far BMS is below the RSSI floor");

    // Bad filters are refused with the reason.
    let e = call(&phone, "/org/bluez/hci0", "org.bluez.Adapter1", "SetDiscoveryFilter", &(HashMap::from([("UUIDs", Value::from(vec!["nope"]))]),))
        .await
        .unwrap_err();
    assert!(e.starts_with("org.bluez.Error.InvalidArguments") && e.contains("nope"), "{e}");
    air.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_keeps_a_silent_device_cached_until_its_temporary_timeout() {
    let air = air(AirConfig { temporary_timeout: Duration::from_millis(1500), ..Default::default() }).await;
    let (bms, adapter, addr) = advertise(&air, "xiaoxiang BMS", &[JBD_SERVICE]).await;
    let central = connect(air.address()).await;
    let path = device_path(&addr);
    let om = zbus::fdo::ObjectManagerProxy::builder(&central).destination("org.bluez").path("/").build().await.unwrap();
    let mut removed = om.receive_interfaces_removed().await.unwrap();
    scan(&central, HashMap::new()).await;
    wait_until("the BMS is reported", || async { devices(&central).await.contains(&path) }).await;
    call(&central, "/org/bluez/hci0", "org.bluez.Adapter1", "StopDiscovery", &()).await.unwrap();

    // It stops advertising: still cached a while later.
    let adv = OwnedObjectPath::try_from("/adv0").unwrap();
    call(&bms, &adapter, "org.bluez.LEAdvertisingManager1", "UnregisterAdvertisement", &(adv,)).await.unwrap();
    timeout(T, air.full_round_heard()).await.expect("a silent round");
    assert!(devices(&central).await.contains(&path), "cached after its advertising stopped");

    // A Connect to it now waits for it to advertise again, and connects then.
    let connecting = {
        let central = central.clone();
        let path = path.clone();
        tokio::spawn(async move { call(&central, &path, "org.bluez.Device1", "Connect", &()).await })
    };
    let link = air.link(&addr).unwrap();
    wait_until("the Connect is pending", || async { link.connect_pending() }).await;
    timeout(T, air.full_round_heard()).await.expect("a silent round");
    assert!(!connecting.is_finished(), "Connect waits for the device to become connectable");
    assert!(link.connect_pending());
    let adv = OwnedObjectPath::try_from("/adv0").unwrap();
    call(&bms, &adapter, "org.bluez.LEAdvertisingManager1", "RegisterAdvertisement", &(adv, HashMap::<String, Value>::new())).await.unwrap();
    timeout(T, connecting).await.unwrap().unwrap().expect("connected once it advertised");
    call(&central, &path, "org.bluez.Device1", "Disconnect", &()).await.unwrap();

    // Gone for good: the cache lets go after the temporary timeout.
    drop(bms);
    let gone = timeout(T, async {
        while let Some(sig) = removed.next().await {
            if sig.args().unwrap().object_path.as_str() == path {
                return;
            }
        }
    })
    .await;
    assert!(gone.is_ok(), "InterfacesRemoved after the temporary timeout");
    assert!(!devices(&central).await.contains(&path));
    air.stop().await;
}

async fn connected(conn: &zbus::Connection, path: &str) -> bool {
    let p = zbus::fdo::PropertiesProxy::builder(conn).destination("org.bluez").path(path).build().await.unwrap();
    let v: OwnedValue = p.get("org.bluez.Device1".try_into().unwrap(), "Connected").await.unwrap();
    bool::try_from(v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_machine_competes_for_the_one_link() {
    let air = air(AirConfig { connect_timeout: Duration::from_millis(800), ..Default::default() }).await;
    let (_bms, _, addr) = advertise(&air, "xiaoxiang BMS", &[JBD_SERVICE]).await;
    let path = device_path(&addr);
    let gateway = connect(air.address()).await;
    let host = air.add_host("phone").await.unwrap();
    assert_ne!(host.dbus_system_bus_address, air.address());
    assert_ne!(host.address, air.central_address());
    let phone = connect(&host.dbus_system_bus_address).await;
    scan(&gateway, HashMap::new()).await;
    scan(&phone, HashMap::new()).await;
    wait_until("both machines hear the BMS", || async { devices(&gateway).await.contains(&path) && devices(&phone).await.contains(&path) }).await;

    // The phone takes the link; the gateway's Connect waits, then fails as
    // the kernel's LE connection attempt does.
    call(&phone, &path, "org.bluez.Device1", "Connect", &()).await.expect("the phone connects");
    let link = air.link(&addr).unwrap();
    assert_eq!(link.connected_host().as_deref(), Some("phone"));
    let started = std::time::Instant::now();
    let e = call(&gateway, &path, "org.bluez.Device1", "Connect", &()).await.unwrap_err();
    assert!(e.starts_with("org.bluez.Error.Failed") && e.contains("le-connection-abort-by-local"), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(700), "failed only after the connect timeout");
    assert!(!connected(&gateway, &path).await);

    // A Connect the gateway gives up on (Disconnect) ends at once.
    let pending = {
        let gateway = gateway.clone();
        let path = path.clone();
        tokio::spawn(async move { call(&gateway, &path, "org.bluez.Device1", "Connect", &()).await })
    };
    wait_until("the gateway's Connect is pending", || async { link.connect_pending() }).await;
    call(&gateway, &path, "org.bluez.Device1", "Disconnect", &()).await.unwrap();
    let e = timeout(Duration::from_millis(500), pending).await.expect("cancelled at once").unwrap().unwrap_err();
    assert!(e.contains("le-connection-abort-by-local"), "{e}");

    // The phone lets go: the gateway connects.
    call(&phone, &path, "org.bluez.Device1", "Disconnect", &()).await.unwrap();
    call(&gateway, &path, "org.bluez.Device1", "Connect", &()).await.expect("the gateway connects once the link is free");
    assert_eq!(link.connected_host().as_deref(), Some(""));
    assert!(connected(&gateway, &path).await && !connected(&phone, &path).await);

    // Removing the host drops its bus; the air keeps serving the gateway.
    air.remove_host("phone").await.unwrap();
    assert!(air.hosts().is_empty());
    assert!(connected(&gateway, &path).await);
    air.stop().await;
}

/// Calls bluetoothd refuses, refused the same way: an agent with a
/// capability BlueZ does not know, and Connect or Disconnect with arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_agent_capabilities_and_extra_arguments_are_refused() {
    let air = air(AirConfig::default()).await;
    let (_bms, _, addr) = advertise(&air, "xiaoxiang BMS", &[JBD_SERVICE]).await;
    let central = connect(air.address()).await;
    let agent = OwnedObjectPath::try_from("/agent").unwrap();
    let e = call(&central, "/org/bluez", "org.bluez.AgentManager1", "RegisterAgent", &(agent.clone(), "Telepathic")).await.unwrap_err();
    assert!(e.starts_with("org.bluez.Error.InvalidArguments") && e.contains("Telepathic"), "{e}");
    call(&central, "/org/bluez", "org.bluez.AgentManager1", "RegisterAgent", &(agent, "NoInputNoOutput")).await.expect("a known capability");

    let path = device_path(&addr);
    scan(&central, HashMap::new()).await;
    wait_until("the BMS is reported", || async { devices(&central).await.contains(&path) }).await;
    for method in ["Connect", "Disconnect"] {
        let e = call(&central, &path, "org.bluez.Device1", method, &("extra",)).await.unwrap_err();
        assert!(e.starts_with("org.freedesktop.DBus.Error.InvalidArgs"), "{method}: {e}");
    }
    call(&central, &path, "org.bluez.Device1", "Connect", &()).await.expect("Connect without arguments");
    assert!(connected(&central, &path).await);
    air.stop().await;
}

/// Properties.Set answers as bluetoothd's gdbus does: a read-only property
/// gives PropertyReadOnly, a property nobody has UnknownProperty, and a
/// writable one takes the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_a_read_only_property_is_refused_as_bluetoothd_refuses_it() {
    let air = air(AirConfig::default()).await;
    let (_bms, _, addr) = advertise(&air, "xiaoxiang BMS", &[JBD_SERVICE]).await;
    let central = connect(air.address()).await;
    let set = |path: String, iface: &'static str, name: &'static str, value: Value<'static>| {
        let central = central.clone();
        async move { call(&central, &path, "org.freedesktop.DBus.Properties", "Set", &(iface, name, value)).await }
    };
    let e = set("/org/bluez/hci0".into(), "org.bluez.Adapter1", "Address", Value::from("00:11:22:33:44:55")).await.unwrap_err();
    assert_eq!(e, "org.freedesktop.DBus.Error.PropertyReadOnly: Property 'Address' is not writable");
    let e = set("/org/bluez/hci0".into(), "org.bluez.Adapter1", "Colour", Value::from("red")).await.unwrap_err();
    assert!(e.starts_with("org.freedesktop.DBus.Error.UnknownProperty"), "{e}");
    set("/org/bluez/hci0".into(), "org.bluez.Adapter1", "Alias", Value::from("bench")).await.expect("Alias is writable");
    let alias = central
        .call_method(Some("org.bluez"), "/org/bluez/hci0", Some("org.freedesktop.DBus.Properties"), "Get", &("org.bluez.Adapter1", "Alias"))
        .await
        .unwrap();
    let alias: String = alias.body().deserialize::<OwnedValue>().unwrap().try_into().unwrap();
    assert_eq!(alias, "bench");

    let path = device_path(&addr);
    scan(&central, HashMap::new()).await;
    wait_until("the BMS is reported", || async { devices(&central).await.contains(&path) }).await;
    for name in ["Address", "Name", "RSSI", "Connected", "UUIDs", "Blocked"] {
        let e = set(path.clone(), "org.bluez.Device1", name, Value::from(true)).await.unwrap_err();
        assert_eq!(e, format!("org.freedesktop.DBus.Error.PropertyReadOnly: Property '{name}' is not writable"));
    }
    // Trusted and Alias are a client's to set, as on bluetoothd; an empty alias is the name again.
    let get = |name: &'static str| {
        let (central, path) = (central.clone(), path.clone());
        async move {
            let m = central.call_method(Some("org.bluez"), path.as_str(), Some("org.freedesktop.DBus.Properties"), "Get", &("org.bluez.Device1", name)).await.unwrap();
            m.body().deserialize::<OwnedValue>().unwrap()
        }
    };
    set(path.clone(), "org.bluez.Device1", "Trusted", Value::from(true)).await.expect("Trusted is writable");
    assert!(bool::try_from(get("Trusted").await).unwrap());
    set(path.clone(), "org.bluez.Device1", "Alias", Value::from("pack 3")).await.expect("Alias is writable");
    assert_eq!(String::try_from(get("Alias").await).unwrap(), "pack 3");
    set(path.clone(), "org.bluez.Device1", "Alias", Value::from("")).await.unwrap();
    assert_eq!(String::try_from(get("Alias").await).unwrap(), "xiaoxiang BMS");
    air.stop().await;
}
