//! The radio link between hci0 and one peripheral adapter: the ATT MTU, the
//! BLE-only controls (refuse a connection, stop advertising while
//! connected, reject a write type) and the shared fault engine every
//! notification and write goes through.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::link::fault::{Emission, LinkCounters};
use crate::link::{Direction, FaultRule, FrameRecord, LinkEngine};

use super::att::{self, DEFAULT_ATT_MTU, MAX_ATT_MTU};

/// A write procedure a scenario can make the peripheral reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteKind {
    /// Write request: the central gets org.bluez.Error.NotPermitted.
    Request,
    /// Write command: silently lost, as a server drops a command it refuses.
    Command,
}

/// How many ATT PDUs a link keeps for its capture (the most recent).
const ATT_LOG_LIMIT: usize = 100_000;

#[derive(Debug)]
struct LinkState {
    engine: LinkEngine,
    /// What went over the air after the faults, as whole ATT PDUs
    /// (opcode, handle, value), for the ATT capture.
    att_log: std::collections::VecDeque<FrameRecord>,
    mtu: u16,
    refuse_connections: bool,
    stop_advertising_while_connected: bool,
    rejected_write: Option<WriteKind>,
    att_timeout: Duration,
}

/// One peripheral's link. Cheap to lock: nothing awaits under the lock.
#[derive(Debug)]
pub struct BleLink {
    name: String,
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
            name: name.to_string(),
            state: Mutex::new(LinkState {
                engine,
                att_log: std::collections::VecDeque::new(),
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

    /// Records one ATT PDU as it went over the air: `Request` is central →
    /// peripheral. [`crate::link::capture::CaptureFormat::BleAtt`] captures write these.
    pub fn record_att(&self, direction: Direction, pdu: Vec<u8>) {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let rec = FrameRecord::new(self.name.as_str(), direction, wall, pdu);
        let mut st = self.lock();
        if st.att_log.len() >= ATT_LOG_LIMIT {
            st.att_log.pop_front();
        }
        st.att_log.push_back(rec);
    }

    /// The ATT PDUs recorded so far (oldest first), each a [`FrameRecord`]
    /// whose bytes are one whole PDU.
    pub fn att_frames(&self) -> Vec<FrameRecord> {
        self.lock().att_log.iter().cloned().collect()
    }

    pub fn mtu(&self) -> u16 {
        self.lock().mtu
    }

    /// Sets the ATT MTU, clamped to what ATT allows (23..=517).
    pub fn set_mtu(&self, mtu: u16) -> u16 {
        let m = mtu.clamp(DEFAULT_ATT_MTU, MAX_ATT_MTU);
        let was = std::mem::replace(&mut self.lock().mtu, m);
        if was != m {
            // On air an MTU is what an exchange agrees on.
            self.record_att(Direction::Request, att::exchange_mtu(att::opcode::EXCHANGE_MTU_REQ, m));
            self.record_att(Direction::Response, att::exchange_mtu(att::opcode::EXCHANGE_MTU_RSP, m));
        }
        m
    }

    pub fn add_fault(&self, rule: FaultRule) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.lock().engine.add_rule(rule, now);
    }

    pub fn clear_faults(&self) {
        self.lock().engine.clear();
    }

    /// Removes the fault rules called `name`; false when none had it.
    pub fn clear_fault(&self, name: &str) -> bool {
        self.lock().engine.clear_named(name)
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
