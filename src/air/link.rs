//! The radio link between hci0 and one peripheral adapter: the ATT MTU, the
//! BLE-only controls (refuse a connection, stop advertising while
//! connected, reject a write type) and the shared fault engine every
//! notification and write goes through.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::link::fault::{Emission, LinkCounters};
use crate::link::{Direction, FaultRule, FrameRecord, LinkEngine};

use super::att::{DEFAULT_ATT_MTU, MAX_ATT_MTU};

/// A write procedure a scenario can make the peripheral reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteKind {
    /// Write request: the central gets org.bluez.Error.NotPermitted.
    Request,
    /// Write command: silently lost, as a server drops a command it refuses.
    Command,
}

#[derive(Debug)]
struct LinkState {
    engine: LinkEngine,
    mtu: u16,
    refuse_connections: bool,
    stop_advertising_while_connected: bool,
    rejected_write: Option<WriteKind>,
    att_timeout: Duration,
}

/// One peripheral's link. Cheap to lock: nothing awaits under the lock.
#[derive(Debug)]
pub struct BleLink {
    epoch: Instant,
    state: Mutex<LinkState>,
}

impl BleLink {
    pub fn new(name: &str, seed: u64) -> Self {
        let mut engine = LinkEngine::new(name, seed);
        // A long-running air keeps the most recent frames only.
        engine.set_log_limit(Some(100_000));
        BleLink {
            epoch: Instant::now(),
            state: Mutex::new(LinkState {
                engine,
                mtu: DEFAULT_ATT_MTU,
                refuse_connections: false,
                stop_advertising_while_connected: false,
                rejected_write: None,
                att_timeout: Duration::from_secs(30),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        // A panic elsewhere must not take the radio down with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Passes one ATT payload through the fault engine.
    pub fn process(&self, direction: Direction, bytes: &[u8]) -> Vec<Emission> {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        self.lock().engine.process(direction, bytes, now, wall)
    }

    pub fn mtu(&self) -> u16 {
        self.lock().mtu
    }

    /// Sets the ATT MTU, clamped to what ATT allows (23..=517).
    pub fn set_mtu(&self, mtu: u16) -> u16 {
        let m = mtu.clamp(DEFAULT_ATT_MTU, MAX_ATT_MTU);
        self.lock().mtu = m;
        m
    }

    pub fn add_fault(&self, rule: FaultRule) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.lock().engine.add_rule(rule, now);
    }

    pub fn clear_faults(&self) {
        self.lock().engine.clear();
    }

    pub fn frames(&self) -> Vec<FrameRecord> {
        self.lock().engine.frames().cloned().collect()
    }

    pub fn take_frames(&self) -> Vec<FrameRecord> {
        self.lock().engine.take_frames()
    }

    pub fn counters(&self) -> LinkCounters {
        self.lock().engine.counters.clone()
    }

    pub fn refuses_connections(&self) -> bool {
        self.lock().refuse_connections
    }

    pub fn set_refuse_connections(&self, on: bool) {
        self.lock().refuse_connections = on;
    }

    pub fn stops_advertising_while_connected(&self) -> bool {
        self.lock().stop_advertising_while_connected
    }

    pub fn set_stop_advertising_while_connected(&self, on: bool) {
        self.lock().stop_advertising_while_connected = on;
    }

    pub fn rejected_write(&self) -> Option<WriteKind> {
        self.lock().rejected_write
    }

    pub fn set_rejected_write(&self, kind: Option<WriteKind>) {
        self.lock().rejected_write = kind;
    }

    /// How long a request whose answer the link lost waits before it fails
    /// (ATT's transaction timeout is 30 s).
    pub fn att_timeout(&self) -> Duration {
        self.lock().att_timeout
    }

    pub fn set_att_timeout(&self, t: Duration) {
        self.lock().att_timeout = t;
    }
}
