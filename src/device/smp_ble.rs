//! The SMP server's BLE side, as Zephyr's `smp_bt` serves it: one service
//! with one characteristic (write without response + notify), requests
//! reassembled from writes by the header's length, answers notified in
//! pieces of at most MTU − 3 bytes to the central that asked. Declared with
//! the GATT builder, so it registers on the virtual air's adapter in CI and
//! on `hci0` of a bench machine alike; faults and capture are the air
//! link's. A reset drops the connections and withdraws the advertisement
//! until the device is up again.

use std::collections::HashMap;

use bluer::adv::Advertisement;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::protocol::smp::ble::Reassembly;
use crate::sans_io::Peer;
use crate::transport::gatt::{GattEvent, GattPeripheral, GattRefusal, GattService, Props, ReadValue};

pub const SMP_SERVICE_UUID: Uuid = Uuid::from_u128(0x8D53DC1D_1DB7_4CD3_868B_8A527460AA84);
pub const SMP_CHARACTERISTIC_UUID: Uuid = Uuid::from_u128(0xDA2E7828_FBCE_4E01_AE9E_261174997C48);
/// What smp_svr advertises (CONFIG_BT_DEVICE_NAME).
pub const SMP_LOCAL_NAME: &str = "Zephyr";

/// The SMP service as Zephyr declares it (`smp_bt_attrs`).
pub fn smp_gatt() -> Vec<GattService> {
    vec![GattService::primary(SMP_SERVICE_UUID).characteristic(SMP_CHARACTERISTIC_UUID, Props::WRITE_WITHOUT_RESPONSE | Props::NOTIFY, ReadValue::Fixed(Vec::new()))]
}

/// Where and how the device appears on BLE.
#[derive(Debug, Clone)]
pub struct SmpBle {
    /// The BlueZ adapter to register on: one lent by the virtual air, or `hci0`.
    pub adapter: String,
    /// Advertised LocalName (Zephyr's smp_svr: CONFIG_BT_DEVICE_NAME, "Zephyr").
    pub local_name: String,
}

/// What the host does after a GATT event.
#[derive(Debug, PartialEq, Eq)]
pub enum BleArrival {
    /// A whole request from this central's peer.
    Message(Peer, Vec<u8>),
    /// A write refused and the partial request dropped, and why.
    Dropped(String),
    Nothing,
}

/// The registered service, its advertisement and the centrals it serves.
pub struct SmpBleSide {
    peripheral: GattPeripheral,
    reassembly: Reassembly,
    /// Each central's peer and the MTU its last write came with.
    centrals: HashMap<String, (Peer, u16)>,
}

impl SmpBleSide {
    /// Registers the service and starts advertising on `cfg.adapter`; what
    /// centrals do comes on the receiver, for [`SmpBleSide::on_event`].
    pub async fn open(cfg: SmpBle, net_buf: usize) -> Result<(SmpBleSide, mpsc::UnboundedReceiver<GattEvent>), String> {
        let adv = Advertisement {
            service_uuids: [SMP_SERVICE_UUID].into_iter().collect(),
            local_name: Some(cfg.local_name.clone()),
            discoverable: Some(true),
            ..Default::default()
        };
        let (peripheral, events) = GattPeripheral::open(&cfg.adapter, &smp_gatt(), adv).await?;
        Ok((SmpBleSide { peripheral, reassembly: Reassembly::new(net_buf), centrals: HashMap::new() }, events))
    }

    /// The adapter's BLE address, where centrals find the device.
    pub fn address(&self) -> &str {
        self.peripheral.address()
    }

    /// Advertises (true) or withdraws the advertisement (false).
    pub async fn advertise(&mut self, on: bool) -> Result<(), String> {
        self.peripheral.advertise(on).await
    }

    /// A GATT event: a write goes into the reassembly (and is answered);
    /// a central that goes takes its partial request and its peer with it.
    /// `new_peer` gives a central its peer the first time it writes.
    pub fn on_event(&mut self, ev: GattEvent, new_peer: impl FnOnce() -> Peer) -> BleArrival {
        match ev {
            GattEvent::Write(w) if w.char == SMP_CHARACTERISTIC_UUID => {
                let peer = match self.centrals.get_mut(&w.central) {
                    Some((p, mtu)) => {
                        *mtu = w.mtu;
                        *p
                    }
                    None => {
                        let p = new_peer();
                        self.centrals.insert(w.central.clone(), (p, w.mtu));
                        p
                    }
                };
                match self.reassembly.push(&w.value) {
                    Ok(done) => {
                        let _ = w.reply.send(Ok(()));
                        done.map_or(BleArrival::Nothing, |m| BleArrival::Message(peer, m))
                    }
                    Err(e) => {
                        // ATT "Value Not Allowed" in Zephyr; a write command's refusal reaches nobody.
                        let _ = w.reply.send(Err(GattRefusal::Failed));
                        BleArrival::Dropped(format!("ble: {e}; the request was dropped"))
                    }
                }
            }
            GattEvent::Write(w) => {
                let _ = w.reply.send(Err(GattRefusal::NotPermitted));
                BleArrival::Nothing
            }
            GattEvent::Read(r) => {
                let _ = r.reply.send(Err(GattRefusal::NotPermitted));
                BleArrival::Nothing
            }
            GattEvent::Unsubscribed { .. } => {
                // On the air a notification session ending is the link going.
                self.forget_centrals();
                BleArrival::Nothing
            }
            GattEvent::Disconnected { central } => {
                self.centrals.remove(&central);
                self.reassembly.drop_partial();
                BleArrival::Nothing
            }
            GattEvent::Subscribed { .. } | GattEvent::Connected { .. } => BleArrival::Nothing,
        }
    }

    /// Whether this peer is a BLE central's.
    pub fn serves(&self, peer: Peer) -> bool {
        self.centrals.values().any(|(p, _)| *p == peer)
    }

    /// An answer to `peer` as notifications of at most MTU − 3 bytes; a
    /// central that went gets nothing.
    pub fn send(&self, peer: Peer, bytes: &[u8]) {
        if let Some((_, mtu)) = self.centrals.values().find(|(p, _)| *p == peer) {
            self.peripheral.gatt().notify(SMP_CHARACTERISTIC_UUID, bytes, *mtu);
        }
    }

    /// The device resets: links drop, the advertisement goes, partial
    /// requests are lost.
    pub fn reset(&mut self) {
        self.peripheral.reset();
        self.forget_centrals();
    }

    fn forget_centrals(&mut self) {
        self.centrals.clear();
        self.reassembly.drop_partial();
    }
}
