//! The BACnet/SC node client (`bsc-node`): an actix actor that holds a hub connection
//! with failover, sends and receives Encapsulated-NPDUs, and reports what it sees.
//!
//! The protocol lives in the sans-IO [`NodeSession`] and [`FailoverPlan`]; this module is
//! the shell: the WebSocket ([`connect_ws`]), the node's link (faults and capture,
//! node → hub is [`Direction::Request`]), and observations.
//!
//! While on the failover hub the task keeps probing the primary (with backoff); a probe
//! that gets a Connect-Accept replaces the failover connection, which is then closed with
//! a Disconnect-Request.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::bsc_node_core::{
    EndReason, FailoverPlan, HubChoice, HubLimits, NodeConfig, NodeSession, PlanStep, ReceivedNak, SendError,
    SessionEvent, SessionOutput,
};
use super::poller::{ClientClearFault, ClientClearFaults, ClientFault, ClientFrames};
use crate::link::fault::LinkEngine;
use crate::link::stream::{ConnFaults, FaultedConnector};
use crate::link::record::{Direction, FrameRecord};
use crate::observe::{ObservationKind, ObservationLog};
use crate::protocol::bvlc_sc::Vmac;
use crate::transport::ws_client::{connect_ws, WsConnectError, WsConnectOptions, WsStream};

/// Why opening a node session failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeConnectError {
    #[error(transparent)]
    Ws(#[from] WsConnectError),
    #[error("hub NAKed the Connect-Request: class {} code {} {:?}", .0.error_class, .0.error_code, .0.details)]
    Rejected(ReceivedNak),
    #[error("no Connect-Accept within {} ms", .0.as_millis())]
    NoAccept(Duration),
    #[error("hub closed the WebSocket before accepting: {0}")]
    Closed(String),
}

/// Opens a WebSocket and runs Connect-Request/Accept. `epoch` is the session's clock.
/// Bounded by the WebSocket timeout plus the session's connect-wait.
pub async fn connect_node(
    url: &str,
    opts: &WsConnectOptions,
    cfg: NodeConfig,
    first_message_id: u16,
    epoch: Instant,
) -> Result<(WsStream, NodeSession), NodeConnectError> {
    let mut ws = connect_ws(url, opts).await?;
    let mut session = NodeSession::new(cfg, first_message_id);
    let wait = session.config().connect_wait;
    let req = session.start(epoch.elapsed());
    ws.send(WsMessage::Binary(req.into()))
        .await
        .map_err(|e| NodeConnectError::Closed(e.to_string()))?;
    let deadline = Instant::now() + wait;
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(NodeConnectError::NoAccept(wait)),
            Ok(None) => return Err(NodeConnectError::Closed("end of stream".into())),
            Ok(Some(Err(e))) => return Err(NodeConnectError::Closed(e.to_string())),
            Ok(Some(Ok(m))) => m,
        };
        let data = match msg {
            WsMessage::Binary(b) => b,
            WsMessage::Close(f) => {
                return Err(NodeConnectError::Closed(f.map_or_else(|| "close frame".into(), |f| format!("close {}: {}", f.code, f.reason))))
            }
            _ => continue,
        };
        for o in session.receive(&data, epoch.elapsed()) {
            match o {
                SessionOutput::Send(b) => {
                    ws.send(WsMessage::Binary(b.into()))
                        .await
                        .map_err(|e| NodeConnectError::Closed(e.to_string()))?;
                }
                SessionOutput::Event(SessionEvent::Accepted(_)) => return Ok((ws, session)),
                SessionOutput::Event(SessionEvent::Ended(EndReason::ConnectRejected(n))) => {
                    return Err(NodeConnectError::Rejected(n))
                }
                SessionOutput::Event(_) => {}
            }
        }
    }
}

/// The node actor's configuration.
#[derive(Debug, Clone)]
pub struct BscNodeConfig {
    /// Observation source and link name.
    pub name: String,
    pub primary_url: String,
    pub failover_url: Option<String>,
    pub ws: WsConnectOptions,
    pub session: NodeConfig,
    /// Backoff between attempts, and between probes of the primary while on the failover.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Received NPDUs kept for [`TakeReceived`] (oldest dropped first).
    pub inbox_limit: usize,
    pub seed: u64,
    /// Carry the node's connections through a pump that can reset, refuse,
    /// hold, slow or close them (link faults `reset`, `half_open`, …).
    /// Off for load tests: the pump costs a copy each way.
    pub connection_faults: bool,
}

impl BscNodeConfig {
    pub fn new(name: impl Into<String>, primary_url: impl Into<String>, session: NodeConfig) -> Self {
        BscNodeConfig {
            name: name.into(),
            primary_url: primary_url.into(),
            failover_url: None,
            ws: WsConnectOptions::hub(None),
            session,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            inbox_limit: 10_000,
            seed: 0,
            connection_faults: false,
        }
    }

    fn url(&self, hub: HubChoice) -> &str {
        match hub {
            HubChoice::Primary => &self.primary_url,
            HubChoice::Failover => self.failover_url.as_deref().unwrap_or(&self.primary_url),
        }
    }
}

/// What a node reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeStatus {
    pub vmac: Vmac,
    /// The hub the node is connected to, if any.
    pub connected_to: Option<HubChoice>,
    pub hub_max_bvlc: Option<u16>,
    pub hub_max_npdu: Option<u16>,
    pub connects_primary: u64,
    pub connects_failover: u64,
    pub npdus_sent: u64,
    pub npdus_received: u64,
    pub naks_received: u64,
    pub last_error: Option<String>,
}

/// One Encapsulated-NPDU as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedNpdu {
    pub from: Option<Vmac>,
    pub broadcast: bool,
    pub npdu: Vec<u8>,
    pub via: HubChoice,
}

/// Send an NPDU to a VMAC or [`Vmac::BROADCAST`]. Refused with [`SendError::NotConnected`]
/// while no hub is connected (a node does not queue for later).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(), SendError>")]
pub struct SendNpdu {
    pub dest: Vmac,
    pub npdu: Vec<u8>,
}

#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "NodeStatus")]
pub struct GetNodeStatus;

/// Drain the NPDUs received so far.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Vec<ReceivedNpdu>")]
pub struct TakeReceived;

/// Disconnect gracefully (Disconnect-Request) and stop reconnecting.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct DisconnectNode;

enum NodeCommand {
    Send { dest: Vmac, npdu: Vec<u8> },
    Disconnect,
}

struct Shared {
    status: NodeStatus,
    inbox: VecDeque<ReceivedNpdu>,
}

pub struct BscNodeActor {
    cfg: BscNodeConfig,
    link: Rc<RefCell<LinkEngine>>,
    /// The node's connection faults, when its config asks for them.
    conn_faults: Option<Arc<ConnFaults>>,
    log: ObservationLog,
    shared: Rc<RefCell<Shared>>,
    commands: Option<mpsc::UnboundedSender<NodeCommand>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl BscNodeActor {
    pub fn new(mut cfg: BscNodeConfig, log: ObservationLog) -> Self {
        let link = Rc::new(RefCell::new(LinkEngine::new(cfg.name.clone(), cfg.seed)));
        let conn_faults = cfg.connection_faults.then(|| ConnFaults::new(cfg.name.clone(), cfg.seed));
        if let Some(f) = &conn_faults {
            cfg.ws.connector = Some(Arc::new(FaultedConnector(f.clone())));
        }
        let status = NodeStatus {
            vmac: cfg.session.vmac,
            connected_to: None,
            hub_max_bvlc: None,
            hub_max_npdu: None,
            connects_primary: 0,
            connects_failover: 0,
            npdus_sent: 0,
            npdus_received: 0,
            naks_received: 0,
            last_error: None,
        };
        BscNodeActor {
            cfg,
            link,
            conn_faults,
            log,
            shared: Rc::new(RefCell::new(Shared { status, inbox: VecDeque::new() })),
            commands: None,
            task: None,
        }
    }
}

impl Actor for BscNodeActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.commands = Some(tx);
        let task = NodeTask {
            cfg: self.cfg.clone(),
            link: self.link.clone(),
            log: self.log.clone(),
            shared: self.shared.clone(),
            commands: rx,
            epoch: Instant::now(),
            next_id: (self.cfg.seed as u16).wrapping_mul(7919),
            delayed: Vec::new(),
        };
        self.task = Some(actix::spawn(task.run()));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(f) = &self.conn_faults {
            f.stop();
        }
    }
}

impl Handler<SendNpdu> for BscNodeActor {
    type Result = Result<(), SendError>;
    fn handle(&mut self, msg: SendNpdu, _ctx: &mut Context<Self>) -> Self::Result {
        if self.shared.borrow().status.connected_to.is_none() {
            return Err(SendError::NotConnected);
        }
        if msg.dest.is_reserved() {
            return Err(SendError::ReservedDestination(msg.dest));
        }
        self.commands
            .as_ref()
            .and_then(|c| c.send(NodeCommand::Send { dest: msg.dest, npdu: msg.npdu }).ok())
            .ok_or(SendError::NotConnected)
    }
}

impl Handler<GetNodeStatus> for BscNodeActor {
    type Result = MessageResult<GetNodeStatus>;
    fn handle(&mut self, _msg: GetNodeStatus, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.shared.borrow().status.clone())
    }
}

impl Handler<TakeReceived> for BscNodeActor {
    type Result = MessageResult<TakeReceived>;
    fn handle(&mut self, _msg: TakeReceived, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.shared.borrow_mut().inbox.drain(..).collect())
    }
}

impl Handler<DisconnectNode> for BscNodeActor {
    type Result = ();
    fn handle(&mut self, _msg: DisconnectNode, _ctx: &mut Context<Self>) {
        if let Some(c) = &self.commands {
            let _ = c.send(NodeCommand::Disconnect);
        }
    }
}

impl Handler<ClientFault> for BscNodeActor {
    type Result = ();
    fn handle(&mut self, msg: ClientFault, _ctx: &mut Context<Self>) {
        if msg.0.fault.is_connection_level() {
            match &self.conn_faults {
                Some(f) => f.add_rule(msg.0),
                None => tracing::warn!(node = %self.cfg.name, fault = msg.0.fault.name(), "connection fault on a node without connection faults; ignored"),
            }
            return;
        }
        let now = self.log.start().elapsed().as_nanos() as u64;
        self.link.borrow_mut().add_rule(msg.0, now);
    }
}

impl Handler<ClientClearFaults> for BscNodeActor {
    type Result = ();
    fn handle(&mut self, _msg: ClientClearFaults, _ctx: &mut Context<Self>) {
        self.link.borrow_mut().clear();
        if let Some(f) = &self.conn_faults {
            f.clear();
        }
    }
}

impl Handler<ClientClearFault> for BscNodeActor {
    type Result = bool;
    fn handle(&mut self, msg: ClientClearFault, _ctx: &mut Context<Self>) -> bool {
        let frames = self.link.borrow_mut().clear_named(&msg.0);
        let conns = self.conn_faults.as_ref().is_some_and(|f| f.clear_named(&msg.0));
        frames || conns
    }
}

impl Handler<ClientFrames> for BscNodeActor {
    type Result = MessageResult<ClientFrames>;
    fn handle(&mut self, _msg: ClientFrames, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.link.borrow().frames().cloned().collect::<Vec<FrameRecord>>())
    }
}

/// A connection that got its Connect-Accept.
struct Live {
    hub: HubChoice,
    ws: WsStream,
    session: NodeSession,
}

/// How a live connection ended.
enum LiveEnd {
    /// Gone; the reason for the report.
    Lost(String),
    /// A probe of the primary succeeded while on the failover.
    BackToPrimary(Box<Live>),
    /// The actor asked to disconnect, or went away.
    Shutdown,
}

type Probe = Pin<Box<dyn Future<Output = Result<(WsStream, NodeSession), NodeConnectError>>>>;

struct NodeTask {
    cfg: BscNodeConfig,
    link: Rc<RefCell<LinkEngine>>,
    log: ObservationLog,
    shared: Rc<RefCell<Shared>>,
    commands: mpsc::UnboundedReceiver<NodeCommand>,
    epoch: Instant,
    next_id: u16,
    /// Frames held back by a delay fault: (due, direction, bytes), in arrival order.
    delayed: Vec<(Instant, Direction, Vec<u8>)>,
}

impl NodeTask {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn link_times(&self) -> (u64, u64) {
        let n = self.log.start().elapsed().as_nanos() as u64;
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        (n, wall)
    }

    fn attempt(&mut self, hub: HubChoice) -> Probe {
        let url = self.cfg.url(hub).to_string();
        let ws = self.cfg.ws.clone();
        let session = self.cfg.session.clone();
        let id = self.next_id;
        // Each session starts its IDs well apart from the last one's.
        self.next_id = self.next_id.wrapping_add(0x1000);
        let epoch = self.epoch;
        Box::pin(async move { connect_node(&url, &ws, session, id, epoch).await })
    }

    async fn run(mut self) {
        let has_failover = self.cfg.failover_url.is_some();
        let mut plan = FailoverPlan::new(has_failover, self.cfg.backoff_min, self.cfg.backoff_max);
        let mut live: Option<Live> = None;
        loop {
            let Some(mut l) = live.take() else {
                match plan.next_step(self.now()) {
                    PlanStep::Try(hub) => {
                        let attempt = self.attempt(hub).await;
                        match attempt {
                            Ok((ws, session)) => {
                                plan.connected(hub);
                                live = Some(self.on_connected(hub, ws, session));
                            }
                            Err(e) => {
                                plan.attempt_failed(hub, self.now());
                                self.on_connect_failed(hub, &e);
                            }
                        }
                    }
                    PlanStep::WaitUntil(t) => {
                        let until = self.epoch + t;
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => {}
                            cmd = self.commands.recv() => match cmd {
                                None | Some(NodeCommand::Disconnect) => return,
                                // Refused by the actor while disconnected; one can slip
                                // through a connection ending: not delivered.
                                Some(NodeCommand::Send { .. }) => {}
                            },
                        }
                    }
                }
                continue;
            };
            let hub = l.hub;
            match self.serve(&mut l, &mut plan).await {
                LiveEnd::Lost(reason) => {
                    plan.lost(hub, self.now());
                    self.on_lost(hub, reason);
                }
                LiveEnd::BackToPrimary(primary) => {
                    let now = self.now();
                    if let Some(bye) = l.session.disconnect(now) {
                        let _ = l.ws.send(WsMessage::Binary(bye.into())).await;
                    }
                    let _ = l.ws.close(None).await;
                    self.on_lost(hub, "left for the primary hub".into());
                    live = Some(*primary);
                }
                LiveEnd::Shutdown => {
                    self.on_lost(hub, "disconnected on request".into());
                    return;
                }
            }
        }
    }

    fn on_connected(&mut self, hub: HubChoice, ws: WsStream, session: NodeSession) -> Live {
        let limits: Option<HubLimits> = session.hub().cloned();
        {
            let mut sh = self.shared.borrow_mut();
            let st = &mut sh.status;
            st.connected_to = Some(hub);
            st.hub_max_bvlc = limits.as_ref().map(|l| l.max_bvlc);
            st.hub_max_npdu = limits.as_ref().map(|l| l.max_npdu);
            match hub {
                HubChoice::Primary => st.connects_primary += 1,
                HubChoice::Failover => st.connects_failover += 1,
            }
        }
        self.log.push(
            &self.cfg.name,
            ObservationKind::BscConnected {
                hub: hub.as_str().into(),
                url: self.cfg.url(hub).into(),
                hub_vmac: limits.as_ref().map(|l| l.vmac.to_string()).unwrap_or_default(),
                max_bvlc: limits.as_ref().map_or(0, |l| l.max_bvlc),
                max_npdu: limits.as_ref().map_or(0, |l| l.max_npdu),
            },
        );
        Live { hub, ws, session }
    }

    fn on_connect_failed(&mut self, hub: HubChoice, e: &NodeConnectError) {
        self.shared.borrow_mut().status.last_error = Some(e.to_string());
        if let NodeConnectError::Rejected(n) = e {
            self.observe_nak(n);
        }
        self.log.push(
            &self.cfg.name,
            ObservationKind::BscConnectFailed { hub: hub.as_str().into(), url: self.cfg.url(hub).into(), error: e.to_string() },
        );
    }

    fn on_lost(&mut self, hub: HubChoice, reason: String) {
        {
            let mut sh = self.shared.borrow_mut();
            // Leaving the failover for the primary: the primary is already recorded.
            if sh.status.connected_to == Some(hub) {
                sh.status.connected_to = None;
            }
            sh.status.last_error = Some(reason.clone());
        }
        self.log.push(&self.cfg.name, ObservationKind::BscDisconnected { hub: hub.as_str().into(), reason });
    }

    fn observe_nak(&self, n: &ReceivedNak) {
        self.shared.borrow_mut().status.naks_received += 1;
        self.log.push(
            &self.cfg.name,
            ObservationKind::BscNak {
                for_function: n.for_function,
                error_class: n.error_class,
                error_code: n.error_code,
                details: n.details.clone(),
            },
        );
    }

    /// Passes a frame through the link. Returns what goes out now; delayed pieces are
    /// queued.
    fn through_link(&mut self, direction: Direction, frame: &[u8]) -> Vec<Vec<u8>> {
        let (now_ns, wall_ns) = self.link_times();
        let emissions = self.link.borrow_mut().process(direction, frame, now_ns, wall_ns);
        let mut now_out = Vec::new();
        let start = Instant::now();
        for e in emissions {
            // An echo would reflect toward the sender: meaningless on a WebSocket; ignored.
            if e.toward != direction {
                continue;
            }
            if e.after.is_zero() {
                now_out.push(e.bytes);
            } else {
                self.delayed.push((start + e.after, direction, e.bytes));
            }
        }
        now_out
    }

    /// Handles session outputs: sends go through the link, events become observations.
    /// Returns the end reason when the session ended.
    async fn apply(&mut self, live: &mut Live, outputs: Vec<SessionOutput>) -> Option<String> {
        let mut ended = None;
        for o in outputs {
            match o {
                SessionOutput::Send(bytes) => {
                    for b in self.through_link(Direction::Request, &bytes) {
                        if let Err(e) = live.ws.send(WsMessage::Binary(b.into())).await {
                            return Some(format!("send failed: {e}"));
                        }
                    }
                }
                SessionOutput::Event(ev) => match ev {
                    SessionEvent::Nak(n) => self.observe_nak(&n),
                    SessionEvent::Npdu { from, broadcast, npdu } => {
                        self.log.push(
                            &self.cfg.name,
                            ObservationKind::BscNpdu { from: from.map(|v| v.to_string()), broadcast, len: npdu.len() },
                        );
                        let mut sh = self.shared.borrow_mut();
                        sh.status.npdus_received += 1;
                        if sh.inbox.len() >= self.cfg.inbox_limit.max(1) {
                            sh.inbox.pop_front();
                        }
                        sh.inbox.push_back(ReceivedNpdu { from, broadcast, npdu, via: live.hub });
                    }
                    SessionEvent::Ended(reason) => {
                        if reason == EndReason::HeartbeatTimeout {
                            self.log.push(
                                &self.cfg.name,
                                ObservationKind::BscHeartbeatTimeout { hub: live.hub.as_str().into() },
                            );
                        }
                        ended = Some(reason.describe());
                    }
                    SessionEvent::Malformed { function, error } => {
                        tracing::debug!(node = %self.cfg.name, ?function, %error, "malformed frame from hub");
                    }
                    SessionEvent::Accepted(_) | SessionEvent::HeartbeatAck { .. } | SessionEvent::Unexpected { .. } => {}
                },
            }
        }
        ended
    }

    async fn deliver(&mut self, live: &mut Live, frame: &[u8]) -> Option<String> {
        let now = self.now();
        let out = live.session.receive(frame, now);
        self.apply(live, out).await
    }

    /// Serves one live connection until it ends, switches to the primary, or shuts down.
    async fn serve(&mut self, live: &mut Live, plan: &mut FailoverPlan) -> LiveEnd {
        let mut probe: Option<Probe> = None;
        loop {
            let mut wake = live.session.poll_timeout().map(|t| self.epoch + t);
            if let Some(due) = self.delayed.iter().map(|d| d.0).min() {
                wake = Some(wake.map_or(due, |w| w.min(due)));
            }
            let probe_at = (live.hub == HubChoice::Failover && probe.is_none()).then(|| self.epoch + plan.primary_due());
            if let Some(p) = probe_at {
                wake = Some(wake.map_or(p, |w| w.min(p)));
            }
            let wake = wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                msg = live.ws.next() => {
                    let data = match msg {
                        Some(Ok(WsMessage::Binary(b))) => b,
                        Some(Ok(WsMessage::Close(f))) => {
                            return LiveEnd::Lost(f.map_or_else(|| "hub closed the WebSocket".into(), |f| format!("hub closed the WebSocket: {} {}", f.code, f.reason)));
                        }
                        Some(Ok(WsMessage::Text(_))) => {
                            let _ = live.ws.close(None).await;
                            return LiveEnd::Lost("hub sent a TEXT frame (protocol error)".into());
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return LiveEnd::Lost(format!("WebSocket error: {e}")),
                        None => return LiveEnd::Lost("hub connection closed".into()),
                    };
                    for f in self.through_link(Direction::Response, &data) {
                        if let Some(r) = self.deliver(live, &f).await {
                            return LiveEnd::Lost(r);
                        }
                    }
                }
                cmd = self.commands.recv() => match cmd {
                    Some(NodeCommand::Send { dest, npdu }) => {
                        let mut buf = Vec::with_capacity(npdu.len() + 16);
                        match live.session.encode_npdu(dest, &npdu, self.now(), &mut buf) {
                            Ok(_) => {
                                self.shared.borrow_mut().status.npdus_sent += 1;
                                if let Some(r) = self.apply(live, vec![SessionOutput::Send(buf)]).await {
                                    return LiveEnd::Lost(r);
                                }
                            }
                            Err(e) => self.shared.borrow_mut().status.last_error = Some(e.to_string()),
                        }
                    }
                    Some(NodeCommand::Disconnect) | None => {
                        if let Some(bye) = live.session.disconnect(self.now()) {
                            let _ = self.apply(live, vec![SessionOutput::Send(bye)]).await;
                            // Wait (bounded by disconnect-wait) for the ACK.
                            let until = Instant::now() + live.session.config().disconnect_wait;
                            while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, live.ws.next()).await {
                                if let WsMessage::Binary(b) = m {
                                    if self.deliver(live, &b).await.is_some() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = live.ws.close(None).await;
                        return LiveEnd::Shutdown;
                    }
                },
                r = async { match probe.as_mut() { Some(p) => p.await, None => std::future::pending().await } } => {
                    probe = None;
                    match r {
                        Ok((ws, session)) => {
                            plan.connected(HubChoice::Primary);
                            return LiveEnd::BackToPrimary(Box::new(self.on_connected(HubChoice::Primary, ws, session)));
                        }
                        Err(e) => {
                            plan.attempt_failed(HubChoice::Primary, self.now());
                            self.on_connect_failed(HubChoice::Primary, &e);
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    let now_i = Instant::now();
                    // Delayed frames that are due, in arrival order.
                    let mut due = Vec::new();
                    self.delayed.retain(|d| {
                        if d.0 <= now_i {
                            due.push((d.1, d.2.clone()));
                            false
                        } else {
                            true
                        }
                    });
                    for (dir, bytes) in due {
                        let r = match dir {
                            Direction::Request => live.ws.send(WsMessage::Binary(bytes.into())).await.err().map(|e| format!("send failed: {e}")),
                            Direction::Response => self.deliver(live, &bytes).await,
                        };
                        if let Some(r) = r {
                            return LiveEnd::Lost(r);
                        }
                    }
                    let out = live.session.tick(self.now());
                    if let Some(r) = self.apply(live, out).await {
                        let _ = live.ws.close(None).await;
                        return LiveEnd::Lost(r);
                    }
                    if probe.is_none() && live.hub == HubChoice::Failover && self.now() >= plan.primary_due() {
                        probe = Some(self.attempt(HubChoice::Primary));
                    }
                }
            }
        }
    }
}
