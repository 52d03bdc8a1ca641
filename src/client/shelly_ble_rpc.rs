//! A Gen2+ Shelly's RPC over BLE GATT as a central meets it (btleplug on BlueZ: the
//! virtual air in CI, hci0 on a bench): the request's length (u32 BE) to TX-ctl, the
//! frame in data writes, the answer's length polled on RX-ctl, the answer in data reads
//! of MTU − 2 bytes, empty reads retried, as aioshelly's BleRPC does it. Used by
//! `hilbench validate shelly --ble`.

use std::time::Duration;

use btleplug::api::{Characteristic, Peripheral as _, PeripheralProperties, WriteType};
use btleplug::platform::Peripheral;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::device::shelly_ble::{DATA_UUID, RPC_SERVICE_UUID, RX_CTL_UUID, TX_CTL_UUID};

/// RX-ctl polls for an answer's length, and data reads that may come back empty, as
/// aioshelly makes them (50, 100 ms apart).
const POLLS: u32 = 50;
const POLL_PAUSE: Duration = Duration::from_millis(100);
/// The largest write BlueZ takes (the attribute maximum; a long write up to it).
pub const MAX_WRITE: usize = 512;
/// The longest answer read: a device announcing more on RX-ctl is refused, not read.
const MAX_ANSWER: usize = 1 << 20;

/// A connected device's RPC characteristics.
pub struct ShellyBleRpc {
    peripheral: Peripheral,
    data: Characteristic,
    tx_ctl: Characteristic,
    rx_ctl: Characteristic,
    next_id: u64,
    /// Data reads the last answer took.
    pub last_reads: u32,
}

/// What the central found: the advertisement and the characteristics' properties.
pub struct ShellyBleFound {
    pub properties: PeripheralProperties,
    /// (characteristic, read, write, notify) for each of data, TX-ctl, RX-ctl; `None` when missing.
    pub chars: Vec<(Uuid, Option<(bool, bool, bool)>)>,
}

impl ShellyBleRpc {
    /// Finds `address` on `adapter` (or the first), connects and discovers the RPC service.
    pub async fn connect(adapter: Option<&str>, address: &str, within: Duration) -> Result<(ShellyBleRpc, ShellyBleFound), String> {
        let central = super::ble_central::central_adapter(adapter).await.map_err(|e| e.detail)?;
        let peripheral = super::ble_central::find_peripheral(&central, |p| p.address.to_string().eq_ignore_ascii_case(address), address, within).await.map_err(|e| e.detail)?;
        super::ble_central::connect_and_discover(&peripheral, within).await.map_err(|(what, e)| format!("{what}: {e}"))?;
        let properties = peripheral.properties().await.ok().flatten().unwrap_or_default();
        let all = peripheral.characteristics();
        let find = |u: Uuid| all.iter().find(|c| c.uuid == u && c.service_uuid == RPC_SERVICE_UUID).cloned();
        let chars = [DATA_UUID, TX_CTL_UUID, RX_CTL_UUID]
            .into_iter()
            .map(|u| {
                let props = find(u).map(|c| {
                    use btleplug::api::CharPropFlags as P;
                    (c.properties.contains(P::READ), c.properties.contains(P::WRITE), c.properties.contains(P::NOTIFY))
                });
                (u, props)
            })
            .collect();
        let found = ShellyBleFound { properties, chars };
        let (Some(data), Some(tx_ctl), Some(rx_ctl)) = (find(DATA_UUID), find(TX_CTL_UUID), find(RX_CTL_UUID)) else {
            let _ = peripheral.disconnect().await;
            return Err(format!("{address} has no Shelly RPC service {RPC_SERVICE_UUID} with its data, TX-ctl and RX-ctl characteristics"));
        };
        Ok((ShellyBleRpc { peripheral, data, tx_ctl, rx_ctl, next_id: 0, last_reads: 0 }, found))
    }

    /// A call as aioshelly sends one over BLE (no `src`, no auth): its whole answer frame,
    /// after the id was checked. The frame goes in data writes of `chunk` bytes.
    pub async fn call(&mut self, method: &str, params: Value, chunk: usize) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut frame = json!({"id": id, "method": method});
        if !params.is_null() {
            frame["params"] = params;
        }
        let answer = self.exchange(frame.to_string().as_bytes(), chunk).await?;
        let v: Value = serde_json::from_slice(&answer).map_err(|e| format!("{method}: an answer that is not JSON ({e}): {}", String::from_utf8_lossy(&answer)))?;
        if v["id"] != id {
            return Err(format!("{method}: the answer's id is {}, not {id}", v["id"]));
        }
        Ok(v)
    }

    /// One request's bytes out and one answer's bytes back.
    pub async fn exchange(&mut self, frame: &[u8], chunk: usize) -> Result<Vec<u8>, String> {
        self.announce(frame.len()).await?;
        for piece in frame.chunks(chunk.clamp(1, MAX_WRITE)) {
            self.write_data(piece).await?;
        }
        self.read_answer().await
    }

    /// The length of the request to come, on TX-ctl (which drops a half-written one).
    pub async fn announce(&self, len: usize) -> Result<(), String> {
        let n = u32::try_from(len).map_err(|_| format!("a {len}-byte request"))?;
        self.peripheral.write(&self.tx_ctl, &n.to_be_bytes(), WriteType::WithResponse).await.map_err(|e| format!("TX-ctl write: {e}"))
    }

    /// One data write (with response: a refusal comes back as an error).
    pub async fn write_data(&self, piece: &[u8]) -> Result<(), String> {
        self.peripheral.write(&self.data, piece, WriteType::WithResponse).await.map_err(|e| format!("data write of {} bytes: {e}", piece.len()))
    }

    /// Polls RX-ctl for the answer's length, then reads data until it is all in (empty
    /// reads retried; a short answer that already parses as JSON is taken, as aioshelly
    /// takes it).
    pub async fn read_answer(&mut self) -> Result<Vec<u8>, String> {
        let mut len = 0usize;
        for _ in 0..POLLS {
            let v = self.peripheral.read(&self.rx_ctl).await.map_err(|e| format!("RX-ctl read: {e}"))?;
            let Ok(b) = <[u8; 4]>::try_from(v.as_slice()) else { return Err(format!("RX-ctl gave {} bytes, not a u32 length", v.len())) };
            len = u32::from_be_bytes(b) as usize;
            if len > 0 {
                break;
            }
            tokio::time::sleep(POLL_PAUSE).await;
        }
        if len == 0 {
            return Err(format!("RX-ctl announced no answer within {} ms", u128::from(POLLS) * POLL_PAUSE.as_millis()));
        }
        if len > MAX_ANSWER {
            return Err(format!("RX-ctl announced a {len}-byte answer, past the {MAX_ANSWER}-byte limit"));
        }
        let (mut answer, mut reads, mut empty) = (Vec::with_capacity(len), 0u32, 0u32);
        while answer.len() < len {
            let piece = self.peripheral.read(&self.data).await.map_err(|e| format!("data read: {e}"))?;
            reads += 1;
            if piece.is_empty() {
                empty += 1;
                if empty >= POLLS {
                    return Err(format!("data reads stayed empty ({empty} in a row) with {} of {len} bytes read", answer.len()));
                }
                if serde_json::from_slice::<Value>(&answer).is_ok() {
                    break;
                }
                tokio::time::sleep(POLL_PAUSE).await;
                continue;
            }
            answer.extend_from_slice(&piece);
        }
        self.last_reads = reads;
        Ok(answer)
    }

    pub async fn disconnect(self) {
        let _ = self.peripheral.disconnect().await;
    }
}
