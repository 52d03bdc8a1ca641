//! The air's object tree as bluetoothd exports it: `org.freedesktop.DBus.ObjectManager`
//! at `/` answering GetManagedObjects in one stable order.
//!
//! zbus's own ObjectManager answers from hash maps, so objects and the
//! interfaces within an object come in a different order on each call.
//! bluetoothctl (bluez 5.66) builds its controller list from that order: it
//! takes the first adapter it meets as the default controller, and when an
//! adapter's LEAdvertisingManager1 comes before its Adapter1 it keeps a
//! controller with no proxy and crashes on the next lookup. bluetoothd lists
//! `/org/bluez`, then the adapters in index order, then everything under
//! them; within an object the main interface (Adapter1, Device1, Gatt*1)
//! comes first. This module answers the same way.
//!
//! Every object the air exports goes through [`export`] and [`unexport`],
//! which keep an index beside zbus's tree; the interface registered here
//! carries the ObjectManager name, so zbus still sends InterfacesAdded and
//! InterfacesRemoved for each change, from `/`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::ser::{Serialize, SerializeMap, Serializer};
use zbus::object_server::{Interface, SignalEmitter};
use zbus::{fdo, interface, Connection, ObjectServer, OwnedObjectPath, OwnedVariant, Signature, Type};

type Properties = HashMap<String, OwnedVariant>;
type PropsFuture<'a> = Pin<Box<dyn Future<Output = fdo::Result<Properties>> + Send + 'a>>;
/// Reads one interface's properties at one path (zbus's GetAll for that interface).
type Getter = Arc<dyn for<'a> Fn(&'a ObjectServer, &'a Connection, &'a OwnedObjectPath) -> PropsFuture<'a> + Send + Sync>;

/// The ObjectManager at `/` of a bus the air serves `org.bluez` on.
#[derive(Default)]
pub struct AirObjectManager {
    /// path → interface name → how to read its properties.
    objects: Mutex<BTreeMap<String, BTreeMap<String, Getter>>>,
}

fn getter<I: Interface>() -> Getter {
    Arc::new(|server, conn, path| {
        Box::pin(async move {
            let iface = server.interface::<_, I>(path.as_ref()).await.map_err(|e| fdo::Error::UnknownObject(format!("{path}: {e}")))?;
            let emitter = SignalEmitter::new(conn, path.as_ref()).map_err(|e| fdo::Error::Failed(e.to_string()))?;
            let guard = iface.get().await;
            guard.get_all(server, conn, None, &emitter).await
        })
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves `iface` at `path` on `conn` and lists it in GetManagedObjects.
/// When `path` already has an `I`, that one stays (as `ObjectServer::at` does).
pub(crate) async fn export<I: Interface>(conn: &Connection, path: &str, iface: I) -> zbus::Result<()> {
    let server = conn.object_server();
    if server.at(path, iface).await?.is_none() {
        let manager = server.interface::<_, AirObjectManager>("/").await?;
        lock(&manager.get().await.objects).entry(path.to_string()).or_default().insert(I::name().to_string(), getter::<I>());
    }
    Ok(())
}

/// Stops serving `I` at `path` (InterfacesRemoved) and drops it from the list.
pub(crate) async fn unexport<I: Interface>(conn: &Connection, path: &str) -> zbus::Result<bool> {
    let server = conn.object_server();
    if let Ok(manager) = server.interface::<_, AirObjectManager>("/").await {
        let manager = manager.get().await;
        let mut objects = lock(&manager.objects);
        if let Some(ifaces) = objects.get_mut(path) {
            ifaces.remove(I::name().as_str());
            if ifaces.is_empty() {
                objects.remove(path);
            }
        }
    }
    server.remove::<I, _>(path).await
}

/// Where a path stands in bluetoothd's order: `/org/bluez`, the adapters by
/// index, then the rest by path (with `hciN` compared by number).
fn order_key(path: &str) -> (u8, Vec<(&str, u64)>) {
    let parts: Vec<(&str, u64)> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .map(|p| match p.strip_prefix("hci").and_then(|n| n.parse::<u64>().ok()) {
            Some(n) => ("hci", n),
            None => (p, 0),
        })
        .collect();
    let rank = match parts.as_slice() {
        [("org", _), ("bluez", _)] => 0,
        [("org", _), ("bluez", _), ("hci", _)] => 1,
        [("org", _), ("bluez", _), ..] => 2,
        _ => 3,
    };
    (rank, parts)
}

/// The object's main interface first, as bluetoothd registers it first;
/// then the others by name.
fn interface_rank(name: &str) -> u8 {
    match name {
        "org.bluez.Adapter1" | "org.bluez.Device1" | "org.bluez.GattService1" | "org.bluez.GattCharacteristic1" | "org.bluez.GattDescriptor1" => 0,
        _ => 1,
    }
}

/// A D-Bus dict (`a{KV}`) sent in the order its entries are in.
pub struct OrderedDict<K, V>(pub Vec<(K, V)>);

impl<K: zbus::wire::Basic, V: Type> Type for OrderedDict<K, V> {
    const SIGNATURE: &'static Signature = &Signature::static_dict(K::SIGNATURE, V::SIGNATURE);
}

impl<K: Serialize, V: Serialize> Serialize for OrderedDict<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

pub type OrderedObjects = OrderedDict<OwnedObjectPath, OrderedDict<String, OrderedDict<String, OwnedVariant>>>;

impl AirObjectManager {
    /// The listed objects in bluetoothd's order, each with its interfaces' properties.
    async fn ordered(&self, server: &ObjectServer, conn: &Connection) -> fdo::Result<OrderedObjects> {
        let mut objects: Vec<(String, Vec<(String, Getter)>)> = lock(&self.objects)
            .iter()
            .map(|(path, ifaces)| {
                let mut ifaces: Vec<(String, Getter)> = ifaces.iter().map(|(n, g)| (n.clone(), g.clone())).collect();
                ifaces.sort_by(|a, b| (interface_rank(&a.0), &a.0).cmp(&(interface_rank(&b.0), &b.0)));
                (path.clone(), ifaces)
            })
            .collect();
        objects.sort_by(|a, b| order_key(&a.0).cmp(&order_key(&b.0)));
        let mut out = Vec::with_capacity(objects.len());
        for (path, ifaces) in objects {
            let Ok(path) = OwnedObjectPath::try_from(path) else { continue };
            let mut listed = Vec::with_capacity(ifaces.len());
            for (name, get) in ifaces {
                // An object removed while this answer is built is left out, as if it had gone first.
                let Ok(props) = get(server, conn, &path).await else { continue };
                let mut props: Vec<(String, OwnedVariant)> = props.into_iter().collect();
                props.sort_by(|a, b| a.0.cmp(&b.0));
                listed.push((name, OrderedDict(props)));
            }
            if !listed.is_empty() {
                out.push((path, OrderedDict(listed)));
            }
        }
        Ok(OrderedDict(out))
    }
}

#[interface(name = "org.freedesktop.DBus.ObjectManager")]
impl AirObjectManager {
    async fn get_managed_objects(
        &self,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(connection)] conn: &Connection,
    ) -> fdo::Result<OrderedObjects> {
        self.ordered(server, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bluetoothd_order() {
        let mut paths = vec![
            "/org/bluez/hci10",
            "/org/bluez/hci0/dev_C0_DE_00_00_00_01/service000c/char000d",
            "/org/hilbench/air",
            "/org/bluez/hci2",
            "/org/bluez/hci0/dev_C0_DE_00_00_00_01",
            "/org/bluez/hci0",
            "/org/bluez",
        ];
        paths.sort_by_key(|p| order_key(p));
        assert_eq!(
            paths,
            [
                "/org/bluez",
                "/org/bluez/hci0",
                "/org/bluez/hci2",
                "/org/bluez/hci10",
                "/org/bluez/hci0/dev_C0_DE_00_00_00_01",
                "/org/bluez/hci0/dev_C0_DE_00_00_00_01/service000c/char000d",
                "/org/hilbench/air",
            ]
        );
    }

    #[test]
    fn ordered_dict_signature_is_a_dict() {
        assert_eq!(OrderedObjects::SIGNATURE.to_string(), "a{oa{sa{sv}}}");
    }
}
