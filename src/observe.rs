//! Observations: what actors saw, timestamped, for scenarios to assert on
//! and reports to show. Shared by every actor of one run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ObservationKind {
    /// A client decoded a reading from a device.
    Reading {
        address: u8,
        values: BTreeMap<String, f64>,
        flags: Vec<String>,
    },
    /// A client's request failed (one attempt); `kind` is one of
    /// timeout, crc, exception, malformed, echo, framing, io.
    Error {
        address: u8,
        kind: String,
        detail: String,
        attempt: u32,
    },
    /// A client gave up on an address after its retries.
    GaveUp { address: u8, attempts: u32 },
    /// A device stayed silent on a frame it could not use.
    DeviceSilent { reason: String },
    /// Two or more devices transmitted at once.
    Collision { devices: Vec<String> },
    /// Bytes that could not be delivered (a port nobody reads).
    Overflow { bytes: usize, reason: String },
    /// A BACnet/SC node's hub accepted it; `hub` is `primary` or `failover`.
    BscConnected {
        hub: String,
        url: String,
        hub_vmac: String,
        max_bvlc: u16,
        max_npdu: u16,
    },
    /// A BACnet/SC node could not connect to a hub (one attempt).
    BscConnectFailed { hub: String, url: String, error: String },
    /// A BACnet/SC node's hub connection ended.
    BscDisconnected { hub: String, reason: String },
    /// A BACnet/SC node received a BVLC-Result NAK.
    BscNak {
        for_function: u8,
        error_class: u16,
        error_code: u16,
        details: String,
    },
    /// A BACnet/SC node received an Encapsulated-NPDU.
    BscNpdu {
        from: Option<String>,
        broadcast: bool,
        len: usize,
    },
    /// A BACnet/SC node's Heartbeat-Request went unanswered.
    BscHeartbeatTimeout { hub: String },
    /// A raw BACnet/SC peer received a binary message; `result` and `error_code` are
    /// set for a BVLC-Result (`ack` / `nak`).
    BscRawFrame {
        function: u8,
        name: String,
        len: usize,
        result: Option<String>,
        error_code: Option<u16>,
    },
    /// A raw BACnet/SC peer's WebSocket was closed by the hub (close code if one came).
    BscRawClosed { code: Option<u16>, reason: String },
    /// A raw BACnet/SC peer could not open its WebSocket (HTTP status if the hub sent one).
    BscRawRefused { http_status: Option<u16>, error: String },
    /// Something a hub reported: `event` is its snake-case name (accepted, refused,
    /// connected, nak_sent, dropped, slow_consumer, closed_by_hub, …).
    Hub { event: String, detail: String },
    /// Something an SMP server reported: `event` is its snake-case name
    /// (upload_started, upload_done, pending, confirmed, reset_requested, rebooted, …);
    /// or an smp-client's validation check (check_pass, check_warn, check_fail; `detail`
    /// is `NAME: what was seen`).
    Smp { event: String, detail: String },
    /// A Shelly device's event: `call` (detail `{"method", "code"}`, code 0 a
    /// result), `invalid` (a frame dropped), `notify`, `rebooted`, `up`.
    Shelly { event: String, detail: String },
}

impl ObservationKind {
    /// Every `type` name, for scenario validation.
    pub const NAMES: &'static [&'static str] = &[
        "reading",
        "error",
        "gave_up",
        "device_silent",
        "collision",
        "overflow",
        "bsc_connected",
        "bsc_connect_failed",
        "bsc_disconnected",
        "bsc_nak",
        "bsc_npdu",
        "bsc_heartbeat_timeout",
        "bsc_raw_frame",
        "bsc_raw_closed",
        "bsc_raw_refused",
        "hub",
        "smp",
        "shelly",
    ];

    /// The serialized `type` tag.
    pub fn name(&self) -> &'static str {
        match self {
            ObservationKind::Reading { .. } => "reading",
            ObservationKind::Error { .. } => "error",
            ObservationKind::GaveUp { .. } => "gave_up",
            ObservationKind::DeviceSilent { .. } => "device_silent",
            ObservationKind::Collision { .. } => "collision",
            ObservationKind::Overflow { .. } => "overflow",
            ObservationKind::BscConnected { .. } => "bsc_connected",
            ObservationKind::BscConnectFailed { .. } => "bsc_connect_failed",
            ObservationKind::BscDisconnected { .. } => "bsc_disconnected",
            ObservationKind::BscNak { .. } => "bsc_nak",
            ObservationKind::BscNpdu { .. } => "bsc_npdu",
            ObservationKind::BscHeartbeatTimeout { .. } => "bsc_heartbeat_timeout",
            ObservationKind::BscRawFrame { .. } => "bsc_raw_frame",
            ObservationKind::BscRawClosed { .. } => "bsc_raw_closed",
            ObservationKind::BscRawRefused { .. } => "bsc_raw_refused",
            ObservationKind::Hub { .. } => "hub",
            ObservationKind::Smp { .. } => "smp",
            ObservationKind::Shelly { .. } => "shelly",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Observation {
    /// Milliseconds since the run started.
    pub t_ms: f64,
    pub source: String,
    #[serde(flatten)]
    pub kind: ObservationKind,
}

/// The run's observation log. A mutex, not an actor, because every actor
/// only appends and the runner only reads: no ordering to negotiate.
#[derive(Clone, Debug)]
pub struct ObservationLog {
    start: Instant,
    inner: Arc<Mutex<Vec<Observation>>>,
    limit: Option<usize>,
}

impl ObservationLog {
    pub fn new(start: Instant) -> Self {
        ObservationLog {
            start,
            inner: Arc::new(Mutex::new(Vec::new())),
            limit: None,
        }
    }

    /// A log that keeps only the newest `limit` entries (for `sim`, which
    /// runs for hours).
    pub fn bounded(start: Instant, limit: usize) -> Self {
        ObservationLog {
            limit: Some(limit),
            ..Self::new(start)
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    pub fn push(&self, source: &str, kind: ObservationKind) {
        let t_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        tracing::debug!(source, ?kind, "observation");
        let mut v = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = self.limit {
            if v.len() >= l {
                let excess = v.len() + 1 - l;
                v.drain(..excess);
            }
        }
        v.push(Observation {
            t_ms,
            source: source.to_string(),
            kind,
        });
    }

    pub fn snapshot(&self) -> Vec<Observation> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Observations at or after `since_ms` matching `f`.
    pub fn count_since(&self, since_ms: f64, f: impl Fn(&Observation) -> bool) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|o| o.t_ms >= since_ms && f(o))
            .count()
    }

    pub fn find_since(&self, since_ms: f64, f: impl Fn(&Observation) -> bool) -> Option<Observation> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .take_while(|o| o.t_ms >= since_ms)
            .find(|o| f(o))
            .cloned()
    }

    pub fn now_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_serialized_tags() {
        let kinds = [
            ObservationKind::GaveUp { address: 1, attempts: 2 },
            ObservationKind::BscRawClosed { code: Some(1003), reason: String::new() },
            ObservationKind::Hub { event: "accepted".into(), detail: String::new() },
            ObservationKind::Smp { event: "rebooted".into(), detail: String::new() },
            ObservationKind::Shelly { event: "up".into(), detail: String::new() },
        ];
        for k in kinds {
            let v = serde_json::to_value(&k).unwrap();
            assert_eq!(v["type"], k.name());
            assert!(ObservationKind::NAMES.contains(&k.name()));
        }
    }
}
