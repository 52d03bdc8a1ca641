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
//!
//! [`export`] also wraps each interface in [`Exported`], so that setting a
//! read-only property answers `PropertyReadOnly` as bluetoothd does; zbus
//! alone answers `UnknownProperty` for a property without a setter.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::ser::{Serialize, SerializeMap, Serializer};
use zbus::message::{Header, Message};
use zbus::names::{InterfaceName, MemberName};
use zbus::object_server::{DispatchResult, Interface, SignalEmitter};
use zbus::{fdo, interface, BoxDBusError, Connection, ObjectServer, OwnedObjectPath, OwnedVariant, Signature, Type, Variant};

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
            let iface = server.interface::<_, Exported<I>>(path.as_ref()).await.map_err(|e| fdo::Error::UnknownObject(format!("{path}: {e}")))?;
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
    if server.at(path, Exported::new(iface)).await?.is_none() {
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
    server.remove::<Exported<I>, _>(path).await
}

/// An interface as the air serves it: `I` itself, except that setting one
/// of its read-only properties answers `org.freedesktop.DBus.Error.PropertyReadOnly`
/// ("Property 'X' is not writable", bluez's gdbus wording) where zbus would
/// answer UnknownProperty. Which properties are read-only comes from `I`'s
/// own introspection, so the two never disagree.
pub(crate) struct Exported<I> {
    inner: I,
    read_only: BTreeSet<String>,
}

impl<I: Interface> Exported<I> {
    fn new(inner: I) -> Self {
        let mut xml = String::new();
        inner.introspect_to_writer(&mut xml, 0);
        Exported { read_only: read_only_properties(&xml), inner }
    }
}

/// The names of the properties with `access="read"` in introspection XML.
fn read_only_properties(xml: &str) -> BTreeSet<String> {
    let attribute = |element: &str, name: &str| {
        let at = element.find(&format!(" {name}=\""))? + name.len() + 3;
        element[at..].split('"').next().map(str::to_string)
    };
    xml.split("<property")
        .skip(1)
        .filter_map(|rest| {
            let element = rest.split('>').next()?;
            (attribute(element, "access")? == "read").then(|| attribute(element, "name")).flatten()
        })
        .collect()
}

#[async_trait::async_trait]
impl<I: Interface> Interface for Exported<I> {
    fn name() -> InterfaceName<'static> {
        I::name()
    }

    fn spawn_tasks_for_methods(&self) -> bool {
        self.inner.spawn_tasks_for_methods()
    }

    async fn get(
        &self,
        property_name: &str,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> Option<Result<OwnedVariant, BoxDBusError>> {
        self.inner.get(property_name, server, connection, header, emitter).await
    }

    async fn get_all(
        &self,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> fdo::Result<HashMap<String, OwnedVariant>> {
        self.inner.get_all(server, connection, header, emitter).await
    }

    fn set<'call>(
        &'call self,
        property_name: &'call str,
        value: &'call Variant<'_>,
        server: &'call ObjectServer,
        connection: &'call Connection,
        header: Option<&'call Header<'_>>,
        emitter: &'call SignalEmitter<'_>,
    ) -> DispatchResult<'call> {
        match self.inner.set(property_name, value, server, connection, header, emitter) {
            DispatchResult::NotFound if self.read_only.contains(property_name) => DispatchResult::Async(Box::pin(async move {
                Err(Box::new(fdo::Error::PropertyReadOnly(format!("Property '{property_name}' is not writable"))) as BoxDBusError)
            })),
            other => other,
        }
    }

    async fn set_mut(
        &mut self,
        property_name: &str,
        value: &Variant<'_>,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> Option<Result<(), BoxDBusError>> {
        self.inner.set_mut(property_name, value, server, connection, header, emitter).await
    }

    fn call<'call>(&'call self, server: &'call ObjectServer, connection: &'call Connection, msg: &'call Message, name: MemberName<'call>) -> DispatchResult<'call> {
        self.inner.call(server, connection, msg, name)
    }

    fn call_mut<'call>(
        &'call mut self,
        server: &'call ObjectServer,
        connection: &'call Connection,
        msg: &'call Message,
        name: MemberName<'call>,
    ) -> DispatchResult<'call> {
        self.inner.call_mut(server, connection, msg, name)
    }

    fn introspect_to_writer(&self, writer: &mut dyn std::fmt::Write, level: usize) {
        self.inner.introspect_to_writer(writer, level)
    }
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
    fn read_only_properties_come_from_introspection() {
        let xml = r#"<interface name="org.bluez.Adapter1">
  <property name="Address" type="s" access="read"/>
  <property name="Powered" type="b" access="readwrite"/>
  <!-- a comment with access="read" -->
  <property type="s" name="Name" access="read">
    <annotation name="x" value="y"/>
  </property>
  <property name="Token" type="ay" access="write"/>
</interface>"#;
        assert_eq!(read_only_properties(xml), BTreeSet::from(["Address".to_string(), "Name".to_string()]));
    }

    #[test]
    fn ordered_dict_signature_is_a_dict() {
        assert_eq!(OrderedObjects::SIGNATURE.to_string(), "a{oa{sa{sv}}}");
    }
}
