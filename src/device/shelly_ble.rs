//! The Shelly device's BLE side: the RPC service with its data, TX-ctl and
//! RX-ctl characteristics (framing in `protocol::shelly::ble`), one
//! channel per central, and the advertisement Home Assistant's discovery
//! recognises (manufacturer data of company 0x0BA9: flags with RPC over BLE,
//! the BLE MAC, the model id). Declared with the GATT builder, so it
//! registers on the virtual air in CI and on `hci0` of a bench alike. A
//! reboot drops the links and the advertisement until the device is up.

use std::collections::HashMap;

use bluer::adv::Advertisement;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::protocol::shelly::ble::BleRpcChannel;
use crate::sans_io::Peer;
use crate::transport::gatt::{GattEvent, GattPeripheral, GattRefusal, GattService, Props, ReadValue};

pub const RPC_SERVICE_UUID: Uuid = Uuid::from_u128(0x5f6d4f53_5f52_5043_5f53_56435f49445f);
pub const DATA_UUID: Uuid = Uuid::from_u128(0x5f6d4f53_5f52_5043_5f64_6174615f5f5f);
pub const TX_CTL_UUID: Uuid = Uuid::from_u128(0x5f6d4f53_5f52_5043_5f74_785f63746c5f);
pub const RX_CTL_UUID: Uuid = Uuid::from_u128(0x5f6d4f53_5f52_5043_5f72_785f63746c5f);
/// Allterco (Shelly)'s Bluetooth SIG company id.
pub const SHELLY_COMPANY_ID: u16 = 0x0BA9;

/// The RPC service as the firmware declares it.
pub fn shelly_gatt() -> Vec<GattService> {
    vec![GattService::primary(RPC_SERVICE_UUID)
        .characteristic(DATA_UUID, Props::READ | Props::WRITE, ReadValue::Device)
        .characteristic(TX_CTL_UUID, Props::WRITE, ReadValue::Fixed(Vec::new()))
        .characteristic(RX_CTL_UUID, Props::READ | Props::NOTIFY, ReadValue::Device)]
}

/// Manufacturer data blocks: 0x01 flags (u16 LE: bit 0 discoverable, bit 1
/// auth, bit 2 RPC over BLE), 0x0A the BLE MAC (reversed), 0x0B the model id (u16 LE).
pub fn manufacturer_data(ble_mac: [u8; 6], model_id: u16, auth: bool) -> Vec<u8> {
    let flags: u16 = 0b001 | (u16::from(auth) << 1) | 0b100;
    let mut d = vec![0x01];
    d.extend(flags.to_le_bytes());
    d.push(0x0A);
    d.extend(ble_mac.iter().rev());
    d.push(0x0B);
    d.extend(model_id.to_le_bytes());
    d
}

/// The BLE MAC: the primary MAC + 2, as firmware derives it.
pub fn ble_mac(primary: &str) -> [u8; 6] {
    let n = u64::from_str_radix(primary, 16).unwrap_or(0).wrapping_add(2) & 0xFFFF_FFFF_FFFF;
    let b = n.to_be_bytes();
    [b[2], b[3], b[4], b[5], b[6], b[7]]
}

/// Where and how the device appears on BLE.
#[derive(Debug, Clone)]
pub struct ShellyBle {
    /// The BlueZ adapter to register on: one lent by the virtual air, or `hci0`.
    pub adapter: String,
    pub local_name: String,
    pub manufacturer_data: Vec<u8>,
    /// Field faults: RX-ctl's length off by this much; empty data reads per answer.
    pub length_skew: i64,
    pub empty_reads: u32,
}

/// The registered service, its advertisement and each central's channel.
pub struct ShellyBleSide {
    cfg: ShellyBle,
    peripheral: GattPeripheral,
    /// Each central's peer, channel and MTU.
    centrals: HashMap<String, (Peer, BleRpcChannel, u16)>,
}

impl ShellyBleSide {
    pub async fn open(cfg: ShellyBle) -> Result<(ShellyBleSide, mpsc::UnboundedReceiver<GattEvent>), String> {
        let adv = Advertisement {
            service_uuids: [RPC_SERVICE_UUID].into_iter().collect(),
            manufacturer_data: [(SHELLY_COMPANY_ID, cfg.manufacturer_data.clone())].into_iter().collect(),
            local_name: Some(cfg.local_name.clone()),
            discoverable: Some(true),
            ..Default::default()
        };
        let (peripheral, events) = GattPeripheral::open(&cfg.adapter, &shelly_gatt(), adv).await?;
        Ok((ShellyBleSide { cfg, peripheral, centrals: HashMap::new() }, events))
    }

    pub fn address(&self) -> &str {
        self.peripheral.address()
    }

    /// Advertises (true) or withdraws the advertisement (false).
    pub async fn advertise(&mut self, on: bool) -> Result<(), String> {
        self.peripheral.advertise(on).await
    }

    fn channel(&mut self, central: &str, mtu: u16, new_peer: impl FnOnce() -> Peer) -> &mut (Peer, BleRpcChannel, u16) {
        let (skew, empty) = (self.cfg.length_skew, self.cfg.empty_reads);
        let entry = self.centrals.entry(central.to_string()).or_insert_with(|| (new_peer(), BleRpcChannel::with_faults(skew, empty), mtu));
        entry.2 = mtu;
        entry
    }

    /// A GATT event: writes build a request (the whole one is returned with
    /// its central's peer); reads are answered from the channel.
    pub fn on_event(&mut self, ev: GattEvent, new_peer: impl FnOnce() -> Peer) -> Option<(Peer, Vec<u8>)> {
        match ev {
            GattEvent::Write(w) if w.char == TX_CTL_UUID || w.char == DATA_UUID => {
                let (peer, ch, _) = self.channel(&w.central, w.mtu, new_peer);
                let peer = *peer;
                let r = if w.char == TX_CTL_UUID { ch.tx_ctl_write(&w.value).map(|()| None) } else { ch.data_write(&w.value) };
                match r {
                    Ok(frame) => {
                        let _ = w.reply.send(Ok(()));
                        frame.map(|f| (peer, f))
                    }
                    Err(e) => {
                        tracing::debug!("shelly ble: write refused ({e:?})");
                        let _ = w.reply.send(Err(GattRefusal::Failed));
                        None
                    }
                }
            }
            GattEvent::Write(w) => {
                let _ = w.reply.send(Err(GattRefusal::NotPermitted));
                None
            }
            GattEvent::Read(r) if r.char == RX_CTL_UUID || r.char == DATA_UUID => {
                let (_, ch, _) = self.channel(&r.central, r.mtu, new_peer);
                let value = if r.char == RX_CTL_UUID { ch.rx_ctl_read().to_vec() } else { ch.data_read(r.mtu) };
                let _ = r.reply.send(Ok(value));
                None
            }
            GattEvent::Read(r) => {
                let _ = r.reply.send(Err(GattRefusal::NotPermitted));
                None
            }
            GattEvent::Disconnected { central } => {
                self.centrals.remove(&central);
                None
            }
            GattEvent::Subscribed { .. } | GattEvent::Unsubscribed { .. } | GattEvent::Connected { .. } => None,
        }
    }

    /// Whether this peer is a BLE central's.
    pub fn serves(&self, peer: Peer) -> bool {
        self.centrals.values().any(|(p, _, _)| *p == peer)
    }

    /// The device's answer to `peer`: RX-ctl says its length (notified to a
    /// subscriber), the data reads give it out.
    pub fn respond(&mut self, peer: Peer, bytes: Vec<u8>) {
        if let Some((_, ch, mtu)) = self.centrals.values_mut().find(|(p, _, _)| *p == peer) {
            let len = ch.respond(bytes);
            self.peripheral.gatt().notify(RX_CTL_UUID, &len, *mtu);
        }
    }

    /// The device reboots: links drop, the advertisement goes.
    pub fn reset(&mut self) {
        self.peripheral.reset();
        self.centrals.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_blocks_as_home_assistant_parses_them() {
        let mac = ble_mac("441793D69718");
        assert_eq!(mac, [0x44, 0x17, 0x93, 0xD6, 0x97, 0x1A]);
        let d = manufacturer_data(mac, 0x1001, false);
        assert_eq!(d, vec![0x01, 0x05, 0x00, 0x0A, 0x1A, 0x97, 0xD6, 0x93, 0x17, 0x44, 0x0B, 0x01, 0x10]);
        assert_eq!(manufacturer_data(mac, 0x1001, true)[1], 0x07);
    }
}
