//! The `jbd-client` actor: a btleplug central polling a JBD BMS the way the
//! Home Assistant integrations do — find it by address or name, connect,
//! subscribe to 0xFF01, write 0x03 and 0x04 (0x05 once) without response,
//! reassemble the notifications with [`JbdResponseAssembler`], verify the
//! checksum, disconnect so the phone app can get in between polls. Each
//! request has a timeout and retries; readings and errors go to the
//! [`ObservationLog`].
//!
//! [`JbdSession`] is the reusable part: `hilbench validate jbd-bms` drives
//! the same session through its conformance checks.
//!
//! Reading fields: `pack_v`, `current_a`, `soc_pct`, `remaining_ah`,
//! `capacity_ah`, `cycles`, `cell_count`, `ntc_count`, `tempN_c`,
//! `software_version`, `protections` (raw bits), `balance_bits`,
//! `charge_fet`/`discharge_fet` (0/1), `cellN_mv`, `cell_min_mv`,
//! `cell_max_mv`, `cell_delta_mv`. Flags: `protection:<name>`,
//! `balancing:cellN`, `fet:charge_off`, `fet:discharge_off`, `model:<0x05 string>`.
//! Error kinds: `not_found`, `connect_failed`, `timeout`, `checksum`,
//! `malformed`, `status` (the BMS answered 0x80), `io`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use btleplug::api::{Characteristic, Peripheral as _, ValueNotification, WriteType};
use btleplug::platform::{Adapter, Peripheral};
use futures::{FutureExt, Stream, StreamExt};

use super::poller::{ClientClearFault, ClientClearFaults, ClientFault, ClientFrames};
use super::{hex, TransactionError};
use crate::device::jbd::{NOTIFY_UUID, SERVICE_UUID, WRITE_UUID};
use crate::link::fault::LinkEngine;
use crate::link::record::{Direction, FrameRecord};
use crate::observe::{ObservationKind, ObservationLog};
use crate::protocol::jbd::{
    self, reg, Assembled, BasicInfo, CellVoltages, HardwareVersion, JbdResponse, JbdResponseAssembler, FET_CHARGE,
    FET_DISCHARGE,
};

/// Which BMS to talk to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JbdTarget {
    /// BLE address, `A4:C1:38:…` (case does not matter).
    pub address: Option<String>,
    /// Advertised name (exact).
    pub name: Option<String>,
}

impl std::fmt::Display for JbdTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.address, &self.name) {
            (Some(a), _) => write!(f, "{a}"),
            (None, Some(n)) => write!(f, "`{n}`"),
            (None, None) => write!(f, "any JBD BMS (service 0xFF00)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct JbdClientConfig {
    /// Source name in the observation log.
    pub name: String,
    pub target: JbdTarget,
    /// Central adapter (`hci0`); None: the first adapter btleplug lists.
    pub adapter: Option<String>,
    /// Time between poll cycles (from the start of one to the next).
    pub interval: Duration,
    /// Per-request answer timeout.
    pub timeout: Duration,
    /// Extra attempts per request (and per connection).
    pub retries: u32,
    /// How long a scan may take to find the BMS.
    pub scan_timeout: Duration,
    /// Pause after subscribing before the first write (the integrations wait a moment).
    pub settle: Duration,
    /// Write type for requests (BMS firmware takes write-without-response).
    pub write_type: WriteType,
    /// Drop frames with a bad checksum (many real clients do not).
    pub verify_checksum: bool,
    /// Seeds the client-side link faults.
    pub seed: u64,
}

impl Default for JbdClientConfig {
    fn default() -> Self {
        JbdClientConfig {
            name: "jbd-client".into(),
            target: JbdTarget::default(),
            adapter: Some("hci0".into()),
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(3),
            retries: 2,
            scan_timeout: Duration::from_secs(15),
            settle: Duration::from_millis(100),
            write_type: WriteType::WithoutResponse,
            verify_checksum: true,
            seed: 0,
        }
    }
}

pub use super::ble_central::central_adapter;

/// Scans until a peripheral matching `target` shows up.
pub async fn find_bms(central: &Adapter, target: &JbdTarget, within: Duration) -> Result<Peripheral, TransactionError> {
    let wanted = |props: &btleplug::api::PeripheralProperties| match (&target.address, &target.name) {
        (Some(a), _) => props.address.to_string().eq_ignore_ascii_case(a),
        (None, Some(n)) => props.local_name.as_deref() == Some(n.as_str()),
        (None, None) => props.services.contains(&SERVICE_UUID),
    };
    super::ble_central::find_peripheral(central, wanted, &target.to_string(), within).await
}

type Notifications = Pin<Box<dyn Stream<Item = ValueNotification> + Send>>;

/// One request's outcome, with what the air showed of it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub response: JbdResponse,
    /// `Some((expected, found))` when the checksum was wrong (only with
    /// `verify_checksum` off; otherwise that is an error).
    pub bad_checksum: Option<(u16, u16)>,
    /// Sizes of the notifications the frame came in.
    pub notification_sizes: Vec<usize>,
    /// Bytes skipped before the frame (foreign frames, noise).
    pub skipped: usize,
}

/// A connected, subscribed BMS.
pub struct JbdSession {
    pub peripheral: Peripheral,
    notify: Characteristic,
    write: Characteristic,
    notifications: Notifications,
    assembler: JbdResponseAssembler,
    link: Option<Arc<Mutex<LinkEngine>>>,
    epoch: Instant,
    wall_epoch_ns: u64,
}

fn link_times(epoch: Instant, wall_epoch_ns: u64) -> (u64, u64) {
    let n = epoch.elapsed().as_nanos() as u64;
    (n, wall_epoch_ns + n)
}

impl JbdSession {
    /// Connects, finds 0xFF01/0xFF02, subscribes, waits `settle`.
    pub async fn open(peripheral: Peripheral, timeout: Duration, settle: Duration, link: Option<Arc<Mutex<LinkEngine>>>, epoch: Instant) -> Result<Self, TransactionError> {
        let failed = |what: &str, e: String| TransactionError::new("connect_failed", format!("{what}: {e}"));
        super::ble_central::connect_and_discover(&peripheral, timeout).await.map_err(|(what, e)| failed(what, e))?;
        let session = async {
            let chars = peripheral.characteristics();
            let find = |u: uuid::Uuid| chars.iter().find(|c| c.uuid == u && c.service_uuid == SERVICE_UUID).cloned();
            let notify = find(NOTIFY_UUID).ok_or_else(|| failed("GATT", "no characteristic 0xFF01 in service 0xFF00".into()))?;
            let write = find(WRITE_UUID).ok_or_else(|| failed("GATT", "no characteristic 0xFF02 in service 0xFF00".into()))?;
            let notifications = peripheral.notifications().await.map_err(|e| failed("notifications", e.to_string()))?;
            tokio::time::timeout(timeout, peripheral.subscribe(&notify))
                .await
                .map_err(|_| failed("subscribe to 0xFF01", "timed out".into()))?
                .map_err(|e| failed("subscribe to 0xFF01", e.to_string()))?;
            Ok::<_, TransactionError>((notify, write, notifications))
        }
        .await;
        let (notify, write, notifications) = match session {
            Ok(s) => s,
            Err(e) => {
                let _ = peripheral.disconnect().await;
                return Err(e);
            }
        };
        if !settle.is_zero() {
            tokio::time::sleep(settle).await;
        }
        let wall_epoch_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            .saturating_sub(epoch.elapsed().as_nanos() as u64);
        Ok(JbdSession { peripheral, notify, write, notifications, assembler: JbdResponseAssembler::new(), link, epoch, wall_epoch_ns })
    }

    /// 0xFF01 and 0xFF02 as discovered (properties included).
    pub fn characteristics(&self) -> (&Characteristic, &Characteristic) {
        (&self.notify, &self.write)
    }

    /// The ATT MTU BlueZ reports for the link (23 when it does not say).
    pub fn mtu(&self) -> u16 {
        self.peripheral.mtu()
    }

    /// Writes raw bytes to 0xFF02 (through the client's link faults).
    pub async fn write_raw(&mut self, bytes: &[u8], write_type: WriteType) -> Result<(), TransactionError> {
        let emissions = match &self.link {
            None => vec![(Duration::ZERO, bytes.to_vec())],
            Some(l) => {
                let (n, w) = link_times(self.epoch, self.wall_epoch_ns);
                let em = l.lock().unwrap_or_else(|p| p.into_inner()).process(Direction::Request, bytes, n, w);
                em.into_iter().filter(|e| e.toward == Direction::Request).map(|e| (e.after, e.bytes)).collect()
            }
        };
        let start = tokio::time::Instant::now();
        for (after, b) in emissions {
            tokio::time::sleep_until(start + after).await;
            self.peripheral
                .write(&self.write, &b, write_type)
                .await
                .map_err(|e| TransactionError::new("io", format!("write to 0xFF02 ({write_type:?}) failed: {e}")))?;
        }
        Ok(())
    }

    /// Sends `request` and waits up to `timeout` for the response to `reg`.
    /// Frames for other registers (late answers to earlier requests) are skipped.
    pub async fn transact(&mut self, request: &[u8], expect_reg: u8, write_type: WriteType, timeout: Duration, verify_checksum: bool) -> Result<Exchange, TransactionError> {
        // Stale chunks from an earlier, abandoned answer must not start this one.
        while let Some(Some(_)) = self.notifications.next().now_or_never() {}
        self.assembler.reset();
        self.write_raw(request, write_type).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut sizes = Vec::new();
        let mut skipped = 0;
        loop {
            let note = match tokio::time::timeout_at(deadline, self.notifications.next()).await {
                Err(_) => {
                    let held = self.assembler.reset();
                    return Err(if held.is_empty() && sizes.is_empty() {
                        TransactionError::new("timeout", format!("no answer to 0x{expect_reg:02X} within {} ms", timeout.as_millis()))
                    } else {
                        TransactionError::new(
                            "timeout",
                            format!("incomplete answer to 0x{expect_reg:02X} after {} ms: {}", timeout.as_millis(), hex(&held)),
                        )
                    });
                }
                Ok(None) => return Err(TransactionError::new("io", "notification stream ended (disconnected)")),
                Ok(Some(n)) => n,
            };
            if note.uuid != NOTIFY_UUID {
                continue;
            }
            let chunks: Vec<Vec<u8>> = match &self.link {
                None => vec![note.value],
                Some(l) => {
                    let (n, w) = link_times(self.epoch, self.wall_epoch_ns);
                    let em = l.lock().unwrap_or_else(|p| p.into_inner()).process(Direction::Response, &note.value, n, w);
                    em.into_iter().filter(|e| e.toward == Direction::Response).map(|e| e.bytes).collect()
                }
            };
            for chunk in chunks {
                sizes.push(chunk.len());
                for a in self.assembler.push(&chunk) {
                    match a {
                        Assembled::Response(r) if r.reg == expect_reg => {
                            return Ok(Exchange { response: r, bad_checksum: None, notification_sizes: sizes, skipped });
                        }
                        Assembled::BadChecksum { response, expected, found } if response.reg == expect_reg => {
                            if verify_checksum {
                                self.assembler.reset();
                                return Err(TransactionError::new(
                                    "checksum",
                                    format!("answer to 0x{expect_reg:02X}: checksum {found:04X}, expected {expected:04X}"),
                                ));
                            }
                            return Ok(Exchange { response, bad_checksum: Some((expected, found)), notification_sizes: sizes, skipped });
                        }
                        Assembled::Skipped { bytes, .. } => skipped += bytes.len(),
                        // An answer to something else (a late reply, a PIN frame): not ours.
                        _ => {}
                    }
                }
            }
        }
    }

    /// Unsubscribes and disconnects (errors ignored: the link may be gone).
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.peripheral.unsubscribe(&self.notify)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.peripheral.disconnect()).await;
    }
}

/// A decoded 0x03 (and 0x04) as scenario fields and flags (see the module docs).
pub fn reading_fields(basic: Option<&BasicInfo>, cells: Option<&CellVoltages>) -> (BTreeMap<String, f64>, Vec<String>) {
    let mut v = BTreeMap::new();
    let mut flags = Vec::new();
    if let Some(b) = basic {
        v.insert("pack_v".into(), f64::from(b.voltage_10mv) / 100.0);
        v.insert("current_a".into(), f64::from(b.current_10ma) / 100.0);
        v.insert("soc_pct".into(), f64::from(b.rsoc_pct));
        v.insert("remaining_ah".into(), f64::from(b.remaining_10mah) / 100.0);
        v.insert("capacity_ah".into(), f64::from(b.nominal_10mah) / 100.0);
        v.insert("cycles".into(), f64::from(b.cycles));
        v.insert("cell_count".into(), f64::from(b.cell_count));
        v.insert("ntc_count".into(), b.ntc_deci_kelvin.len() as f64);
        v.insert("software_version".into(), f64::from(b.software_version));
        v.insert("protections".into(), f64::from(b.protection));
        v.insert("balance_bits".into(), f64::from(b.balance));
        v.insert("charge_fet".into(), f64::from(u8::from(b.fet & FET_CHARGE != 0)));
        v.insert("discharge_fet".into(), f64::from(u8::from(b.fet & FET_DISCHARGE != 0)));
        for (i, t) in b.temps_c().iter().enumerate() {
            v.insert(format!("temp{}_c", i + 1), *t);
        }
        flags.extend(b.protection_names().into_iter().map(|n| format!("protection:{n}")));
        flags.extend(b.balancing_cells().into_iter().map(|c| format!("balancing:cell{c}")));
        if b.fet & FET_CHARGE == 0 {
            flags.push("fet:charge_off".into());
        }
        if b.fet & FET_DISCHARGE == 0 {
            flags.push("fet:discharge_off".into());
        }
    }
    if let Some(c) = cells {
        for (i, mv) in c.cells_mv.iter().enumerate() {
            v.insert(format!("cell{}_mv", i + 1), f64::from(*mv));
        }
        if let (Some(min), Some(max)) = (c.cells_mv.iter().min(), c.cells_mv.iter().max()) {
            v.insert("cell_min_mv".into(), f64::from(*min));
            v.insert("cell_max_mv".into(), f64::from(*max));
            v.insert("cell_delta_mv".into(), f64::from(max - min));
        }
        if basic.is_none() {
            v.insert("cell_count".into(), c.cells_mv.len() as f64);
        }
    }
    (v, flags)
}

/// Decodes a response's payload, classifying what is wrong.
fn decode_payload<T>(r: &JbdResponse, decode: impl Fn(&[u8]) -> Result<T, jbd::JbdError>) -> Result<T, TransactionError> {
    if !r.is_ok() {
        return Err(TransactionError::new("status", format!("0x{:02X} answered with status 0x{:02X}", r.reg, r.status)));
    }
    decode(&r.data).map_err(|e| TransactionError::new("malformed", format!("0x{:02X}: {e}", r.reg)))
}

pub struct JbdClientActor {
    cfg: JbdClientConfig,
    log: ObservationLog,
    link: Arc<Mutex<LinkEngine>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl JbdClientActor {
    pub fn new(cfg: JbdClientConfig, log: ObservationLog) -> Self {
        let link = Arc::new(Mutex::new(LinkEngine::new(cfg.name.clone(), cfg.seed)));
        JbdClientActor { cfg, log, link, task: None }
    }
}

impl Actor for JbdClientActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        self.task = Some(tokio::spawn(poll_loop(self.cfg.clone(), self.log.clone(), self.link.clone())));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Handler<ClientFault> for JbdClientActor {
    type Result = ();
    fn handle(&mut self, msg: ClientFault, _ctx: &mut Context<Self>) {
        let now = self.log.start().elapsed().as_nanos() as u64;
        self.link.lock().unwrap_or_else(|p| p.into_inner()).add_rule(msg.0, now);
    }
}

impl Handler<ClientClearFaults> for JbdClientActor {
    type Result = ();
    fn handle(&mut self, _msg: ClientClearFaults, _ctx: &mut Context<Self>) {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Handler<ClientClearFault> for JbdClientActor {
    type Result = bool;
    fn handle(&mut self, msg: ClientClearFault, _ctx: &mut Context<Self>) -> bool {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clear_named(&msg.0)
    }
}

impl Handler<ClientFrames> for JbdClientActor {
    type Result = MessageResult<ClientFrames>;
    fn handle(&mut self, _msg: ClientFrames, _ctx: &mut Context<Self>) -> Self::Result {
        let frames: Vec<FrameRecord> = self.link.lock().unwrap_or_else(|p| p.into_inner()).frames().cloned().collect();
        MessageResult(frames)
    }
}

/// BLE has no bus address; readings carry 0.
const NO_ADDRESS: u8 = 0;

fn log_error(log: &ObservationLog, name: &str, e: TransactionError, attempt: u32) {
    log.push(name, ObservationKind::Error { address: NO_ADDRESS, kind: e.kind.into(), detail: e.detail, attempt });
}

async fn poll_loop(cfg: JbdClientConfig, log: ObservationLog, link: Arc<Mutex<LinkEngine>>) {
    let central = loop {
        match central_adapter(cfg.adapter.as_deref()).await {
            Ok(c) => break c,
            Err(e) => {
                log_error(&log, &cfg.name, e, 1);
                tokio::time::sleep(cfg.interval).await;
            }
        }
    };
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut model: Option<String> = None;
    loop {
        tick.tick().await;
        let Some(mut session) = connect_with_retries(&central, &cfg, &log, &link).await else { continue };
        let basic = request(&mut session, &cfg, &log, reg::BASIC_INFO, BasicInfo::decode).await;
        let cells = request(&mut session, &cfg, &log, reg::CELL_VOLTAGES, CellVoltages::decode).await;
        if model.is_none() {
            model = request(&mut session, &cfg, &log, reg::HARDWARE_VERSION, HardwareVersion::decode).await.map(|h| h.model);
        }
        session.close().await;
        if basic.is_some() || cells.is_some() {
            let (values, mut flags) = reading_fields(basic.as_ref(), cells.as_ref());
            if let Some(m) = &model {
                flags.push(format!("model:{m}"));
            }
            log.push(&cfg.name, ObservationKind::Reading { address: NO_ADDRESS, values, flags });
        }
    }
}

async fn connect_with_retries(central: &Adapter, cfg: &JbdClientConfig, log: &ObservationLog, link: &Arc<Mutex<LinkEngine>>) -> Option<JbdSession> {
    for attempt in 1..=cfg.retries + 1 {
        let opened = match find_bms(central, &cfg.target, cfg.scan_timeout).await {
            Ok(p) => JbdSession::open(p, cfg.timeout.max(Duration::from_secs(5)), cfg.settle, Some(link.clone()), log.start()).await,
            Err(e) => Err(e),
        };
        match opened {
            Ok(s) => return Some(s),
            Err(e) => log_error(log, &cfg.name, e, attempt),
        }
    }
    log.push(&cfg.name, ObservationKind::GaveUp { address: NO_ADDRESS, attempts: cfg.retries + 1 });
    None
}

async fn request<T>(session: &mut JbdSession, cfg: &JbdClientConfig, log: &ObservationLog, register: u8, decode: impl Fn(&[u8]) -> Result<T, jbd::JbdError>) -> Option<T> {
    let req = jbd::encode_read(register);
    for attempt in 1..=cfg.retries + 1 {
        let r = session
            .transact(&req, register, cfg.write_type, cfg.timeout, cfg.verify_checksum)
            .await
            .and_then(|x| decode_payload(&x.response, &decode));
        match r {
            Ok(v) => return Some(v),
            Err(e) => {
                let gone = e.kind == "io";
                log_error(log, &cfg.name, e, attempt);
                if gone {
                    return None;
                }
            }
        }
    }
    None
}
