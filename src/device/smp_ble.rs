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
    centrals: SmpBleCentrals,
}

/// One central as the device sees it: its peer, the MTU its last write
/// came with, and its own partly written request (Zephyr's smp_bt
/// reassembles per connection, so two centrals never mix their pieces).
struct SmpBleCentral {
    peer: Peer,
    mtu: u16,
    reassembly: Reassembly,
}

/// Centrals served at once (Zephyr builds allow a handful of connections).
const MAX_CENTRALS: usize = 32;

/// The centrals that wrote to the SMP characteristic, keyed by address.
pub struct SmpBleCentrals {
    net_buf: usize,
    by_address: HashMap<String, SmpBleCentral>,
}

impl SmpBleCentrals {
    pub fn new(net_buf: usize) -> Self {
        SmpBleCentrals { net_buf, by_address: HashMap::new() }
    }

    /// A value `central` wrote: its whole request once the last piece is
    /// in, nothing before; an error drops that central's partial request
    /// and no other's. `new_peer` gives a central its peer on its first write.
    pub fn write(&mut self, central: &str, mtu: u16, value: &[u8], new_peer: impl FnOnce() -> Peer) -> Result<Option<(Peer, Vec<u8>)>, String> {
        let net_buf = self.net_buf;
        if !self.by_address.contains_key(central) && self.by_address.len() >= MAX_CENTRALS {
            // Each holds up to a net buffer: centrals that never disconnect cannot pile up.
            return Err(format!("{MAX_CENTRALS} centrals hold requests already; {central}'s write is refused"));
        }
        let c = self.by_address.entry(central.to_string()).or_insert_with(|| SmpBleCentral { peer: new_peer(), mtu, reassembly: Reassembly::new(net_buf) });
        c.mtu = mtu;
        match c.reassembly.push(value) {
            Ok(done) => Ok(done.map(|m| (c.peer, m))),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A central went, and its partial request with it.
    pub fn forget(&mut self, central: &str) {
        self.by_address.remove(central);
    }

    pub fn forget_all(&mut self) {
        self.by_address.clear();
    }

    /// The MTU of the central with this peer, if it is still here.
    pub fn mtu_of(&self, peer: Peer) -> Option<u16> {
        self.by_address.values().find(|c| c.peer == peer).map(|c| c.mtu)
    }
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
        Ok((SmpBleSide { peripheral, centrals: SmpBleCentrals::new(net_buf) }, events))
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
            GattEvent::Write(w) if w.char == SMP_CHARACTERISTIC_UUID => match self.centrals.write(&w.central, w.mtu, &w.value, new_peer) {
                Ok(done) => {
                    let _ = w.reply.send(Ok(()));
                    done.map_or(BleArrival::Nothing, |(peer, m)| BleArrival::Message(peer, m))
                }
                Err(e) => {
                    // ATT "Value Not Allowed" in Zephyr; a write command's refusal reaches nobody.
                    let _ = w.reply.send(Err(GattRefusal::Failed));
                    BleArrival::Dropped(format!("ble: {e}; the request was dropped"))
                }
            },
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
                self.centrals.forget_all();
                BleArrival::Nothing
            }
            GattEvent::Disconnected { central } => {
                self.centrals.forget(&central);
                BleArrival::Nothing
            }
            GattEvent::Subscribed { .. } | GattEvent::Connected { .. } => BleArrival::Nothing,
        }
    }

    /// Whether this peer is a BLE central's.
    pub fn serves(&self, peer: Peer) -> bool {
        self.centrals.mtu_of(peer).is_some()
    }

    /// An answer to `peer` as notifications of at most MTU − 3 bytes; a
    /// central that went gets nothing.
    pub fn send(&self, peer: Peer, bytes: &[u8]) {
        if let Some(mtu) = self.centrals.mtu_of(peer) {
            self.peripheral.gatt().notify(SMP_CHARACTERISTIC_UUID, bytes, mtu);
        }
    }

    /// The device resets: links drop, the advertisement goes, partial
    /// requests are lost.
    pub fn reset(&mut self) {
        self.peripheral.reset();
        self.centrals.forget_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request of `body_len` body bytes (the header names the length).
    fn request(seq: u8, body_len: usize) -> Vec<u8> {
        let mut r = vec![0x08, 0x00, (body_len >> 8) as u8, body_len as u8, 0x00, 0x00, seq, 0x00];
        r.extend((0..body_len).map(|i| (i as u8) ^ seq));
        r
    }

    #[test]
    fn two_centrals_writing_pieces_at_once_each_get_their_own_request() {
        let mut centrals = SmpBleCentrals::new(256);
        let (a, b) = (request(1, 40), request(2, 60));
        let mut next = 10;
        let mut peer = || {
            next += 1;
            Peer(next)
        };
        assert_eq!(centrals.write("AA:00:00:00:00:01", 23, &a[..20], &mut peer), Ok(None));
        assert_eq!(centrals.write("AA:00:00:00:00:02", 50, &b[..20], &mut peer), Ok(None));
        assert_eq!(centrals.write("AA:00:00:00:00:01", 23, &a[20..], &mut peer), Ok(Some((Peer(11), a.clone()))));
        assert_eq!(centrals.write("AA:00:00:00:00:02", 50, &b[20..40], &mut peer), Ok(None));
        assert_eq!(centrals.write("AA:00:00:00:00:02", 50, &b[40..], &mut peer), Ok(Some((Peer(12), b.clone()))));
        assert_eq!((centrals.mtu_of(Peer(11)), centrals.mtu_of(Peer(12))), (Some(23), Some(50)));
    }

    #[test]
    fn a_central_that_goes_or_errs_loses_only_its_own_partial_request() {
        let mut centrals = SmpBleCentrals::new(64);
        let (a, b) = (request(1, 40), request(2, 30));
        let mut next = 0;
        let mut peer = || {
            next += 1;
            Peer(next)
        };
        centrals.write("A", 23, &a[..10], &mut peer).unwrap();
        centrals.write("B", 23, &b[..10], &mut peer).unwrap();
        // A writes past its request's length: its piece is refused, B's stays.
        assert!(centrals.write("A", 23, &[0u8; 60], &mut peer).is_err());
        assert_eq!(centrals.write("B", 23, &b[10..], &mut peer), Ok(Some((Peer(2), b.clone()))));
        // A starts over and is whole again; then it goes mid-request.
        assert_eq!(centrals.write("A", 23, &a, &mut peer), Ok(Some((Peer(1), a.clone()))));
        centrals.write("A", 23, &a[..10], &mut peer).unwrap();
        centrals.forget("A");
        assert_eq!(centrals.mtu_of(Peer(1)), None);
        // A back: a new peer, and its old half request is gone.
        assert_eq!(centrals.write("A", 23, &a, &mut peer), Ok(Some((Peer(3), a.clone()))));
        // Past MAX_CENTRALS a new central is refused; one already known still writes.
        for i in 0..MAX_CENTRALS {
            let _ = centrals.write(&format!("C{i}"), 23, &a[..5], &mut peer);
        }
        assert!(centrals.write("new", 23, &a, &mut peer).unwrap_err().contains("refused"));
        assert_eq!(centrals.write("B", 23, &b, &mut peer), Ok(Some((Peer(2), b.clone()))));
    }
}
