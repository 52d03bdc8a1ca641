//! `bsc-node`: a BACnet/SC node on a hub (with an optional failover hub):
//! heartbeats, reconnects, and the `send_npdu` step.

use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::bsc_hub::BACNET_SC_HUB;
use super::serial_client::LinkedClient;
use super::{at_key, bsc_peer, decode_keys, step_body, Declared, Kind, LinkDecl, LinkHomeDecl, Names, Role, Running, StartContext, StepContext, StepDoc};
use crate::client::bsc_node::{BscNodeActor, BscNodeConfig, SendNpdu};
use crate::client::bsc_node_core::NodeConfig;
use crate::link::fault::LinkMedium;
use crate::link::{FaultRule, FrameRecord};
use crate::observe::{ObservationKind, ObservationLog};
use crate::protocol::bvlc_sc::Vmac;
use crate::scenario::source::Problem;
use crate::scenario::spec::{parse_hex, Dur};

pub struct BscNodeKind;

/// Its scenario keys. `hub` and `failover` name hub devices (or are
/// `ws://`/`wss://` URLs in real-hardware mode).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BscNodeKeys {
    pub name: String,
    pub hub: String,
    #[serde(default)]
    pub failover: Option<String>,
    /// `02:00:00:00:00:01` form; default: a locally administered VMAC from the client's index.
    #[serde(default)]
    pub vmac: Option<String>,
    /// Device UUID (hyphenated); default: derived from the VMAC.
    #[serde(default)]
    pub uuid: Option<String>,
    /// Idle time before a Heartbeat-Request.
    #[serde(default)]
    pub heartbeat: Option<Dur>,
    /// How long an unanswered Heartbeat-Request may wait before the hub counts as gone.
    #[serde(default)]
    pub heartbeat_ack_wait: Option<Dur>,
    /// First reconnect delay (doubles up to 10x).
    #[serde(default)]
    pub reconnect: Option<Dur>,
}

/// `send_npdu`: the node sends Encapsulated-NPDUs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendNpduStep {
    pub client: String,
    /// `broadcast` (default), a VMAC, or the name of another bsc-node.
    #[serde(default)]
    pub to: Option<String>,
    /// NPDU bytes in hex (spaces allowed); default `01 00` (an empty NPDU header).
    #[serde(default)]
    pub npdu: Option<String>,
    /// Zero bytes appended until the NPDU is this long.
    #[serde(default)]
    pub pad_to: Option<usize>,
    #[serde(default)]
    pub count: Option<u32>,
    /// Another bsc-node whose receipts pace the sends: at most `window`
    /// NPDUs of this step are on their way to it at any time, so a fast
    /// reader never falls behind on a busy machine (`bsc-slow-consumer`).
    #[serde(default)]
    pub paced_by: Option<String>,
    /// With `paced_by`: NPDUs in flight (default 64).
    #[serde(default)]
    pub window: Option<u32>,
}

/// `window` when a step gives none: well under a hub's usual queue (256).
const DEFAULT_PACING_WINDOW: u32 = 64;

static STEPS: &[StepDoc] = &[StepDoc {
    name: "send_npdu",
    target: "client",
    about: "a bsc-node sends Encapsulated-NPDUs",
    keys: "client, to (broadcast | VMAC | bsc-node), npdu (hex), pad_to, count, paced_by (bsc-node), window",
}];

impl Kind for BscNodeKind {
    fn name(&self) -> &'static str {
        "bsc-node"
    }
    fn role(&self) -> Role {
        Role::Client
    }
    fn about(&self) -> &'static str {
        "a BACnet/SC node: primary/failover hub connection, heartbeats, sends and receives NPDUs"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<BscNodeKeys>(entry)?))
    }
    fn steps(&self) -> &'static [StepDoc] {
        STEPS
    }
}

impl Declared for BscNodeKeys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "bsc-node"
    }
    fn check(&self, names: &Names<'_>) -> Result<(), Problem> {
        bsc_peer::check_hub("hub", &self.hub, names)?;
        if let Some(f) = &self.failover {
            bsc_peer::check_hub("failover", f, names)?;
        }
        bsc_peer::check_identity(self.vmac.as_deref(), self.uuid.as_deref())
    }
    fn links(&self) -> Vec<LinkDecl> {
        vec![LinkDecl { name: self.name.clone(), home: LinkHomeDecl::Own, capture: None, checksum: None, carries: "BVLC-SC over WebSocket", medium: LinkMedium::WebSocket }]
    }
    fn client_of(&self) -> Option<&'static str> {
        Some(BACNET_SC_HUB)
    }
    fn check_step(&self, _step: &str, body: &yaml_serde::Value, names: &Names<'_>) -> Result<(), Problem> {
        let s: SendNpduStep = step_body(body)?;
        if let Some(to) = s.to.as_deref().filter(|t| *t != "broadcast") {
            let node = names.client(to).is_some_and(|c| c.kind_name() == "bsc-node");
            if !node && to.parse::<Vmac>().is_err() {
                return Err(at_key("to", format!("`to: {to}` is neither `broadcast`, a VMAC (02:00:00:00:00:01) nor a bsc-node")));
            }
        }
        if let Some(h) = &s.npdu {
            parse_hex(h).map_err(|m| at_key("npdu", m))?;
        }
        if s.pad_to.is_some_and(|n| n > 65_535) {
            return Err(at_key("pad_to", "pad_to is capped at 65535 (the largest BVLC payload)"));
        }
        if let Some(reader) = &s.paced_by {
            if !names.client(reader).is_some_and(|c| c.kind_name() == "bsc-node") || *reader == self.name {
                return Err(at_key("paced_by", format!("`paced_by: {reader}` must name another bsc-node, whose receipts pace the sends")));
            }
        }
        match (s.window, &s.paced_by) {
            (Some(0), _) => Err(at_key("window", "window must be at least 1")),
            (Some(_), None) => Err(at_key("window", "window needs `paced_by` (the node whose receipts it counts)")),
            _ => Ok(()),
        }
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let index = bsc_peer::peer_index(cx.names, &self.name);
            let primary = bsc_peer::hub_url(cx.vars, &self.hub)?;
            let vmac = bsc_peer::vmac(self.vmac.as_deref(), index);
            let (ws, cert_uuid) = bsc_peer::ws_options(&primary, index, &cx.tmp.join("pki"))?;
            let mut session = NodeConfig::new(vmac, bsc_peer::uuid(self.uuid.as_deref(), vmac, cert_uuid));
            if let Some(h) = self.heartbeat {
                session.heartbeat_interval = h.0;
            }
            if let Some(w) = self.heartbeat_ack_wait {
                session.heartbeat_ack_wait = w.0;
            }
            let mut cfg = BscNodeConfig::new(self.name.clone(), primary.clone(), session);
            cfg.ws = ws;
            if let Some(f) = &self.failover {
                cfg.failover_url = Some(bsc_peer::hub_url(cx.vars, f)?);
            }
            // Scenarios run in seconds: reconnect quickly unless told otherwise.
            let first = self.reconnect.map(|r| r.0).unwrap_or(Duration::from_millis(200));
            cfg.backoff_min = first;
            cfg.backoff_max = if self.reconnect.is_some() { first * 10 } else { Duration::from_secs(2) };
            cfg.seed = cx.seed.wrapping_add(index as u64);
            cfg.connection_faults = true;
            let addr = BscNodeActor::new(cfg, cx.log.clone()).start();
            Ok(Box::new(RunningNode { name: self.name.clone(), vmac, node: LinkedClient { addr } }) as Box<dyn Running>)
        })
    }
}

struct RunningNode {
    name: String,
    vmac: Vmac,
    node: LinkedClient<BscNodeActor>,
}

impl RunningNode {
    async fn send_npdu(&self, s: SendNpduStep, vars: &std::collections::BTreeMap<String, String>, log: &ObservationLog) -> Result<String, String> {
        let dest = match s.to.as_deref() {
            None | Some("broadcast") => Vmac::BROADCAST,
            Some(to) => match vars.get(&format!("bsc_node.{to}.vmac")) {
                Some(v) => v.parse().map_err(|err| format!("to `{to}`: {err}"))?,
                None => to.parse().map_err(|err| format!("to `{to}`: {err}"))?,
            },
        };
        let mut npdu = match &s.npdu {
            Some(h) => parse_hex(h)?,
            None => vec![0x01, 0x00],
        };
        if let Some(n) = s.pad_to {
            if npdu.len() < n {
                npdu.resize(n, 0);
            }
        }
        let count = s.count.unwrap_or(1);
        let pacing = s.paced_by.as_deref().map(|reader| Pacing {
            reader,
            from: self.vmac.to_string(),
            window: s.window.unwrap_or(DEFAULT_PACING_WINDOW),
            since_ms: log.now_ms(),
        });
        // A node that is (re)connecting refuses sends: wait for it, boundedly.
        let deadline = Instant::now() + crate::scenario::expect::DEFAULT_WITHIN;
        let mut sent = 0;
        while sent < count {
            if let Some(p) = &pacing {
                p.wait_for_room(sent, log).await.map_err(|err| format!("`{}` sent {sent} of {count}: {err}", self.name))?;
            }
            match self.node.addr.send(SendNpdu { dest, npdu: npdu.clone() }).await.map_err(|err| err.to_string())? {
                Ok(()) => sent += 1,
                Err(err) if Instant::now() < deadline => {
                    tracing::debug!(client = %self.name, "send refused, retrying: {err}");
                    tokio::time::sleep(crate::scenario::expect::POLL).await;
                }
                Err(err) => return Err(format!("`{}` sent {sent} of {count}: {err}", self.name)),
            }
        }
        Ok(format!("`{}` sent {count} NPDU(s) to {dest}", self.name))
    }
}

/// `paced_by`: the reader's receipts of this step's NPDUs open the window.
struct Pacing<'s> {
    reader: &'s str,
    /// The sender's VMAC as the reader reports it (`from`).
    from: String,
    window: u32,
    since_ms: f64,
}

impl Pacing<'_> {
    /// How long the reader may receive nothing before the step fails.
    const STALL: Duration = crate::scenario::expect::DEFAULT_WITHIN;

    fn received(&self, log: &ObservationLog) -> u32 {
        let n = log.count_since(self.since_ms, |o| {
            o.source == self.reader && matches!(&o.kind, ObservationKind::BscNpdu { from: Some(f), .. } if *f == self.from)
        });
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Returns once fewer than `window` NPDUs are in flight to the reader.
    async fn wait_for_room(&self, sent: u32, log: &ObservationLog) -> Result<(), String> {
        let mut received = self.received(log);
        let mut progress_at = Instant::now();
        while sent.saturating_sub(received) >= self.window {
            if progress_at.elapsed() >= Self::STALL {
                return Err(format!(
                    "`{}` received {received} and nothing more for {}",
                    self.reader,
                    humantime::format_duration(Self::STALL)
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            let now = self.received(log);
            if now > received {
                received = now;
                progress_at = Instant::now();
            }
        }
        Ok(())
    }
}

impl Running for RunningNode {
    fn vars(&self) -> Vec<(String, String)> {
        vec![(format!("bsc_node.{}.vmac", self.name), self.vmac.to_string())]
    }
    fn step<'a>(&'a mut self, _step: &'a str, body: &'a yaml_serde::Value, cx: StepContext<'a>) -> LocalBoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let s: SendNpduStep = step_body(body).map_err(|p| p.message)?;
            self.send_npdu(s, cx.vars, cx.log).await
        })
    }
    fn add_fault<'a>(&'a self, link: &'a str, rule: FaultRule) -> LocalBoxFuture<'a, Result<(), String>> {
        self.node.add_fault(link, rule)
    }
    fn clear_faults<'a>(&'a self, link: &'a str, name: Option<&'a str>) -> LocalBoxFuture<'a, Result<(), String>> {
        self.node.clear_faults(link, name)
    }
    fn frames(&self) -> LocalBoxFuture<'_, Vec<FrameRecord>> {
        self.node.frames()
    }
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move { drop(self) })
    }
}
