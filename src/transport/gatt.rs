//! GATT servers declared as data. A device writes its GATT table as a list
//! of services and characteristics (UUID, properties, what a read returns),
//! and [`GattServer::serve`] registers it through bluer on a BlueZ adapter:
//! the virtual air's in CI, `hci0` of a Raspberry Pi on a bench, unchanged.
//! What centrals do comes back as [`GattEvent`]s on one channel, so the
//! device's actor (or any core) sees writes, subscriptions and connections
//! in order; notifications go out through [`GattServer::notify`], split at
//! ATT_MTU − 3 as a notification must be.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bluer::gatt::local::{
    Application, ApplicationHandle, Characteristic, CharacteristicNotifier, CharacteristicNotify, CharacteristicNotifyMethod,
    CharacteristicRead, CharacteristicWrite, CharacteristicWriteMethod, ReqError, Service,
};
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::air::att::DEFAULT_ATT_MTU;

/// A characteristic's properties.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Props {
    pub read: bool,
    pub write: bool,
    pub write_without_response: bool,
    pub notify: bool,
}

impl Props {
    pub const READ: Props = Props { read: true, write: false, write_without_response: false, notify: false };
    pub const WRITE: Props = Props { read: false, write: true, write_without_response: false, notify: false };
    pub const WRITE_WITHOUT_RESPONSE: Props = Props { read: false, write: false, write_without_response: true, notify: false };
    pub const NOTIFY: Props = Props { read: false, write: false, write_without_response: false, notify: true };
}

impl std::ops::BitOr for Props {
    type Output = Props;
    fn bitor(self, o: Props) -> Props {
        Props {
            read: self.read || o.read,
            write: self.write || o.write,
            write_without_response: self.write_without_response || o.write_without_response,
            notify: self.notify || o.notify,
        }
    }
}

/// What a read of a characteristic returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadValue {
    /// Always these bytes.
    Fixed(Vec<u8>),
    /// The last notification sent on it (empty before the first).
    LastNotified,
    /// Each read goes to the device as a [`GattEvent::Read`], which answers
    /// it (a value that depends on who reads and when: a length, a chunk).
    Device,
}

/// One characteristic of a declared service.
#[derive(Debug, Clone)]
pub struct GattChar {
    pub uuid: Uuid,
    pub props: Props,
    pub read: ReadValue,
}

/// One service of a GATT table.
#[derive(Debug, Clone)]
pub struct GattService {
    pub uuid: Uuid,
    pub primary: bool,
    pub chars: Vec<GattChar>,
}

impl GattService {
    pub fn primary(uuid: Uuid) -> Self {
        GattService { uuid, primary: true, chars: Vec::new() }
    }

    /// Adds a characteristic.
    pub fn characteristic(mut self, uuid: Uuid, props: Props, read: ReadValue) -> Self {
        self.chars.push(GattChar { uuid, props, read });
        self
    }
}

pub use crate::protocol::hci::uuid16;

/// How a device kind appears on BLE: its GATT table and the name it advertises (a
/// replay of its captures serves the same, so its clients find it as they find the kind).
#[derive(Debug, Clone)]
pub struct BleIdentity {
    pub services: Vec<GattService>,
    pub local_name: String,
    /// The scenario services its clients name it for (`jbd-gatt`).
    pub serves: &'static [&'static str],
}

/// A write as a central sent it. Answer `reply` to accept or refuse it
/// (a write command's refusal reaches nobody, as on a real link).
#[derive(Debug)]
pub struct GattWrite {
    pub char: Uuid,
    pub value: Vec<u8>,
    /// The central's BLE address.
    pub central: String,
    pub mtu: u16,
    /// A write request (acknowledged), not a write command.
    pub request: bool,
    pub reply: oneshot::Sender<Result<(), GattRefusal>>,
}

/// A read the device answers ([`ReadValue::Device`]): reply with the value
/// or a refusal.
#[derive(Debug)]
pub struct GattRead {
    pub char: Uuid,
    /// The central's BLE address.
    pub central: String,
    pub mtu: u16,
    /// The ATT offset asked for (a long read's blob).
    pub offset: u16,
    pub reply: oneshot::Sender<Result<Vec<u8>, GattRefusal>>,
}

/// Why a write was refused, as ATT says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GattRefusal {
    /// ATT "Write Not Permitted".
    NotPermitted,
    /// ATT "Unlikely Error": the device could not take it.
    Failed,
}

/// What centrals do to the server, in the order it happened.
#[derive(Debug)]
pub enum GattEvent {
    Write(GattWrite),
    Read(GattRead),
    /// A central subscribed to notifications on `char`.
    Subscribed { char: Uuid },
    /// The notification session on `char` ended (unsubscribed or the link went).
    Unsubscribed { char: Uuid },
    /// BlueZ reports a central connected to our adapter (real BlueZ; the
    /// virtual air has no such objects, a subscription marks it there).
    Connected { central: String },
    Disconnected { central: String },
}

enum NotifyCmd {
    Session(Uuid, CharacteristicNotifier),
    Send(Uuid, Vec<Vec<u8>>),
}

/// A registered GATT table. Dropping it unregisters the application.
pub struct GattServer {
    adapter: bluer::Adapter,
    _app: ApplicationHandle,
    notify_tx: mpsc::UnboundedSender<NotifyCmd>,
}

impl GattServer {
    /// Registers `services` on `adapter` and starts following its centrals.
    /// Call within a tokio runtime.
    pub async fn serve(adapter: &bluer::Adapter, services: &[GattService]) -> bluer::Result<(GattServer, mpsc::UnboundedReceiver<GattEvent>)> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (notify_tx, notify_rx) = mpsc::unbounded_channel();
        let last: Arc<Mutex<HashMap<Uuid, Vec<u8>>>> = Arc::default();
        let app = Application {
            services: services.iter().map(|s| bluer_service(s, &events_tx, &notify_tx, &last)).collect(),
            ..Default::default()
        };
        let app = adapter.serve_gatt_application(app).await?;
        tokio::spawn(notify_pump(notify_rx, events_tx.clone(), last));
        follow_centrals(adapter.clone(), events_tx);
        Ok((GattServer { adapter: adapter.clone(), _app: app, notify_tx }, events_rx))
    }

    /// Sends `value` as notifications on `char`, in pieces of at most
    /// `mtu − 3` bytes, in order. Without a subscriber it goes nowhere (logged).
    pub fn notify(&self, char: Uuid, value: &[u8], mtu: u16) {
        let chunks = split_for_mtu(value, mtu);
        if !chunks.is_empty() {
            let _ = self.notify_tx.send(NotifyCmd::Send(char, chunks));
        }
    }

    /// Drops a central's link (real BlueZ; on the air a central's link is
    /// the air's, and only [`GattServer::disconnect_all`] asks it).
    pub fn disconnect(&self, central: &str) {
        let Ok(a) = central.parse::<bluer::Address>() else { return };
        if let Ok(d) = self.adapter.device(a) {
            tokio::spawn(async move {
                let _ = d.disconnect().await;
            });
        }
    }
}

/// A GATT table served on one BlueZ adapter with its advertisement: the BLE
/// side of a device (the virtual air's adapter in CI, `hci0` on a bench).
pub struct GattPeripheral {
    _session: bluer::Session,
    adapter: bluer::Adapter,
    address: String,
    gatt: GattServer,
    advertisement: bluer::adv::Advertisement,
    adv: Option<bluer::adv::AdvertisementHandle>,
}

impl GattPeripheral {
    /// Registers `services` on the adapter called `adapter` and starts
    /// advertising; what centrals do comes on the receiver.
    pub async fn open(adapter: &str, services: &[GattService], advertisement: bluer::adv::Advertisement) -> Result<(GattPeripheral, mpsc::UnboundedReceiver<GattEvent>), String> {
        let session = bluer::Session::new().await.map_err(|e| format!("connecting to BlueZ (org.bluez on the system bus): {e}"))?;
        let bz = session.adapter(adapter).map_err(|e| format!("adapter {adapter}: {e}"))?;
        let address = bz.address().await.map_err(|e| format!("reading the address of {adapter}: {e}"))?.to_string();
        if !bz.is_powered().await.unwrap_or(true) {
            bz.set_powered(true).await.map_err(|e| format!("powering {adapter} on: {e}"))?;
        }
        let (gatt, events) = GattServer::serve(&bz, services).await.map_err(|e| format!("registering the GATT service on {adapter}: {e}"))?;
        let mut p = GattPeripheral { _session: session, adapter: bz, address, gatt, advertisement, adv: None };
        p.advertise(true).await?;
        Ok((p, events))
    }

    /// The adapter's BLE address, where centrals find the device.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn gatt(&self) -> &GattServer {
        &self.gatt
    }

    /// Advertises (true) or withdraws the advertisement (false).
    pub async fn advertise(&mut self, on: bool) -> Result<(), String> {
        if !on {
            // Dropping the handle unregisters it.
            self.adv = None;
            return Ok(());
        }
        if self.adv.is_some() {
            return Ok(());
        }
        let name = self.adapter.name().to_string();
        // The host waits for this; a BlueZ that does not answer must not hold it.
        let registered = tokio::time::timeout(std::time::Duration::from_secs(5), self.adapter.advertise(self.advertisement.clone()))
            .await
            .map_err(|_| format!("advertising on {name}: BlueZ did not answer within 5 s"))?;
        self.adv = Some(registered.map_err(|e| format!("advertising on {name}: {e}"))?);
        Ok(())
    }

    /// The device resets: every link drops and the advertisement goes
    /// (until [`GattPeripheral::advertise`] once it is up).
    pub fn reset(&mut self) {
        self.gatt.disconnect_all();
        self.adv = None;
    }
}

impl GattServer {
    /// Drops every central's link, as a device that resets: each connected
    /// device on real BlueZ; on the virtual air (no device objects on a
    /// peripheral's adapter) the air's link.
    pub fn disconnect_all(&self) {
        let adapter = self.adapter.clone();
        tokio::spawn(async move {
            let mut dropped = false;
            for a in adapter.device_addresses().await.unwrap_or_default() {
                let Ok(d) = adapter.device(a) else { continue };
                if d.is_connected().await.unwrap_or(false) {
                    dropped |= d.disconnect().await.is_ok();
                }
            }
            if !dropped {
                if let Err(e) = ask_the_air_to_disconnect(adapter.name()).await {
                    tracing::debug!("dropping the links on {}: {e}", adapter.name());
                }
            }
        });
    }
}

/// Drops the link of the peripheral on `adapter` through the virtual air's
/// control interface on the system bus (fails on real BlueZ, which has none).
async fn ask_the_air_to_disconnect(adapter: &str) -> zbus::Result<()> {
    let conn = zbus::Connection::system().await?;
    conn.call_method(Some(crate::air::BLUEZ), crate::air::CONTROL_PATH, Some("org.hilbench.Air1"), "Disconnect", &(adapter,)).await?;
    Ok(())
}

/// Splits one value into notification payloads of at most `mtu − 3` bytes
/// (ATT's notification header is 3 bytes): 41 bytes at MTU 23 are 20 + 20 + 1.
pub fn split_for_mtu(value: &[u8], mtu: u16) -> Vec<Vec<u8>> {
    let room = usize::from(mtu.max(DEFAULT_ATT_MTU)) - 3;
    value.chunks(room).map(<[u8]>::to_vec).collect()
}

fn bluer_service(
    s: &GattService,
    events: &mpsc::UnboundedSender<GattEvent>,
    notify: &mpsc::UnboundedSender<NotifyCmd>,
    last: &Arc<Mutex<HashMap<Uuid, Vec<u8>>>>,
) -> Service {
    Service {
        uuid: s.uuid,
        primary: s.primary,
        characteristics: s.chars.iter().map(|c| bluer_characteristic(c, events, notify, last)).collect(),
        ..Default::default()
    }
}

fn bluer_characteristic(
    c: &GattChar,
    events: &mpsc::UnboundedSender<GattEvent>,
    notify: &mpsc::UnboundedSender<NotifyCmd>,
    last: &Arc<Mutex<HashMap<Uuid, Vec<u8>>>>,
) -> Characteristic {
    let uuid = c.uuid;
    let read = c.props.read.then(|| {
        let value = c.read.clone();
        let last = last.clone();
        let events = events.clone();
        CharacteristicRead {
            read: true,
            fun: Box::new(move |req| {
                let v = match &value {
                    ReadValue::Fixed(v) => Ok(v.clone()),
                    ReadValue::LastNotified => Ok(last.lock().ok().and_then(|l| l.get(&uuid).cloned()).unwrap_or_default()),
                    ReadValue::Device => Err(events.clone()),
                };
                async move {
                    let events = match v {
                        Ok(v) => return Ok(v),
                        Err(events) => events,
                    };
                    let (reply, answer) = oneshot::channel();
                    let r = GattRead { char: uuid, central: req.device_address.to_string(), mtu: req.mtu, offset: req.offset, reply };
                    events.send(GattEvent::Read(r)).map_err(|_| ReqError::Failed)?;
                    match answer.await {
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(GattRefusal::NotPermitted)) => Err(ReqError::NotPermitted),
                        Ok(Err(GattRefusal::Failed)) | Err(_) => Err(ReqError::Failed),
                    }
                }
                .boxed()
            }),
            ..Default::default()
        }
    });
    let write = (c.props.write || c.props.write_without_response).then(|| {
        let events = events.clone();
        CharacteristicWrite {
            write: c.props.write,
            write_without_response: c.props.write_without_response,
            // With either write flag BlueZ lets both write types through;
            // the device decides (a firmware that refuses requests, say).
            method: CharacteristicWriteMethod::Fun(Box::new(move |value, req| {
                let events = events.clone();
                async move {
                    let (reply, answer) = oneshot::channel();
                    let w = GattWrite {
                        char: uuid,
                        value,
                        central: req.device_address.to_string(),
                        mtu: req.mtu,
                        request: req.op_type != bluer::gatt::WriteOp::Command,
                        reply,
                    };
                    events.send(GattEvent::Write(w)).map_err(|_| ReqError::Failed)?;
                    match answer.await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(GattRefusal::NotPermitted)) => Err(ReqError::NotPermitted),
                        Ok(Err(GattRefusal::Failed)) | Err(_) => Err(ReqError::Failed),
                    }
                }
                .boxed()
            })),
            ..Default::default()
        }
    });
    let notify_ = c.props.notify.then(|| {
        let notify = notify.clone();
        let events = events.clone();
        CharacteristicNotify {
            notify: true,
            method: CharacteristicNotifyMethod::Fun(Box::new(move |notifier| {
                let notify = notify.clone();
                let events = events.clone();
                async move {
                    let _ = notify.send(NotifyCmd::Session(uuid, notifier));
                    let _ = events.send(GattEvent::Subscribed { char: uuid });
                }
                .boxed()
            })),
            ..Default::default()
        }
    });
    Characteristic { uuid, read, write, notify: notify_, ..Default::default() }
}

/// Owns the notification sessions: sends pieces in order, remembers the
/// last one for reads, reports when a session ends.
async fn notify_pump(
    mut rx: mpsc::UnboundedReceiver<NotifyCmd>,
    events: mpsc::UnboundedSender<GattEvent>,
    last: Arc<Mutex<HashMap<Uuid, Vec<u8>>>>,
) {
    let mut sessions: HashMap<Uuid, CharacteristicNotifier> = HashMap::new();
    loop {
        // The first session to end, if any.
        let ended = async {
            if sessions.is_empty() {
                return futures::future::pending().await;
            }
            let waits = sessions.iter().map(|(u, n)| {
                let u = *u;
                async move {
                    n.stopped().await;
                    u
                }
                .boxed()
            });
            futures::future::select_all(waits).await.0
        };
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => return,
                Some(NotifyCmd::Session(u, n)) => {
                    sessions.insert(u, n);
                }
                Some(NotifyCmd::Send(u, chunks)) => {
                    let Some(n) = sessions.get_mut(&u) else {
                        tracing::debug!(%u, "notification dropped: no central subscribed");
                        continue;
                    };
                    for c in chunks {
                        if let Ok(mut l) = last.lock() {
                            l.insert(u, c.clone());
                        }
                        if n.notify(c).await.is_err() {
                            break;
                        }
                    }
                }
            },
            u = ended => {
                sessions.remove(&u);
                let _ = events.send(GattEvent::Unsubscribed { char: u });
            }
        }
    }
}

/// Real BlueZ publishes a Device1 for each central connected to our
/// adapter: follow their Connected property.
fn follow_centrals(adapter: bluer::Adapter, events: mpsc::UnboundedSender<GattEvent>) {
    tokio::spawn(async move {
        let Ok(mut adapter_events) = adapter.events().await else { return };
        while let Some(ev) = adapter_events.next().await {
            let bluer::AdapterEvent::DeviceAdded(a) = ev else { continue };
            let Ok(device) = adapter.device(a) else { continue };
            let events = events.clone();
            tokio::spawn(async move {
                let Ok(mut dev_events) = device.events().await else { return };
                let central = a.to_string();
                if device.is_connected().await.unwrap_or(false) && events.send(GattEvent::Connected { central: central.clone() }).is_err() {
                    return;
                }
                while let Some(bluer::DeviceEvent::PropertyChanged(p)) = dev_events.next().await {
                    if let bluer::DeviceProperty::Connected(c) = p {
                        let ev = if c { GattEvent::Connected { central: central.clone() } } else { GattEvent::Disconnected { central: central.clone() } };
                        if events.send(ev).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_split_at_mtu_minus_three() {
        let frame: Vec<u8> = (0..41u8).collect();
        let chunks = split_for_mtu(&frame, 23);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![20, 20, 1]);
        assert_eq!(chunks.concat(), frame);
        assert_eq!(split_for_mtu(&frame, 247).len(), 1);
        // Below the ATT minimum the minimum applies.
        assert_eq!(split_for_mtu(&frame, 5)[0].len(), 20);
        assert!(split_for_mtu(&[], 23).is_empty());
    }

    #[test]
    fn short_uuids_expand_to_the_sig_base() {
        assert_eq!(uuid16(0xFF01).to_string(), "0000ff01-0000-1000-8000-00805f9b34fb");
        let p = Props::READ | Props::NOTIFY;
        assert!(p.read && p.notify && !p.write && !p.write_without_response);
    }
}
