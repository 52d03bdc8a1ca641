//! `bsc-hub`: a BACnet/SC hub (ASHRAE 135 Annex AB) on loopback, ws:// or
//! wss:// with a test PKI the run makes. Its URL is `{{hub.NAME}}`; with
//! `tls: true`, `{{pki_dir}}` names the PKI. It can be stopped and started
//! again on the same address (a hub restart).

use std::path::Path;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::{at_key, decode_keys, Declared, Kind, Names, Role, Running, StartContext};
use crate::device::bsc_hub::{HubHandle, HubServer, HubServerConfig, HubServerEvent};
use crate::device::bsc_hub_core::{HubConfig, HubEvent, HubRole};
use crate::link::fault::LinkMedium;
use crate::link::stream::ConnFaults;
use crate::link::FaultRule;
use crate::observe::{ObservationKind, ObservationLog};
use crate::scenario::source::Problem;
use crate::scenario::spec::Dur;
use crate::transport::tls::{ClientCertPolicy, TlsDir};

pub struct BscHubKind;

/// The service bsc-node and bsc-raw clients name a hub for.
pub const BACNET_SC_HUB: &str = "bacnet-sc-hub";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BscHubRole {
    #[default]
    Primary,
    Failover,
}

/// Its scenario keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BscHubKeys {
    pub name: String,
    #[serde(default)]
    pub tls: bool,
    /// With `tls`: accept node certificates without clientAuth in their EKU.
    #[serde(default)]
    pub allow_client_cert_without_eku: bool,
    /// With `tls` (on unless `false`): a node's Device UUID must be its
    /// certificate's, and only the same device may replace a connection.
    #[serde(default)]
    pub cert_binding: Option<bool>,
    #[serde(default)]
    pub role: BscHubRole,
    /// A connected node silent for twice this long is dropped.
    #[serde(default)]
    pub heartbeat_timeout: Option<Dur>,
    /// Time a new WebSocket has to send its Connect-Request.
    #[serde(default)]
    pub connect_wait: Option<Dur>,
    #[serde(default)]
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub max_bvlc: Option<u16>,
    /// Largest WebSocket message read before BVLC parsing (close 1009 above).
    #[serde(default)]
    pub max_message: Option<usize>,
    /// Frames queued per receiver before drops start.
    #[serde(default)]
    pub queue_depth: Option<usize>,
    #[serde(default)]
    pub slow_consumer_close_after: Option<Dur>,
    /// Broadcasts per second per sending node.
    #[serde(default)]
    pub broadcast_rate_limit: Option<u32>,
}

impl Kind for BscHubKind {
    /// BVLC-SC messages in WebSocket BINARY messages (a plaintext ws:// capture): a message
    /// of a known function that decodes whole. Decisive for the connection handshake
    /// (Connect-Request/Accept carry a VMAC and a Device UUID), not for the rest.
    fn recognise(&self, f: &crate::link::recognise::CapturedFrameView<'_>) -> Option<crate::link::recognise::FrameVerdict> {
        use crate::protocol::bvlc_sc::{self, BvlcPayload};
        if f.transport != crate::link::recognise::CaptureTransport::WebSocket {
            return None;
        }
        let m = bvlc_sc::decode(f.bytes).ok()?;
        if matches!(m.payload, BvlcPayload::Unknown { .. }) {
            return None;
        }
        let decisive = matches!(m.payload, BvlcPayload::ConnectRequest { .. } | BvlcPayload::ConnectAccept { .. });
        let code = f.bytes.first().copied().unwrap_or_default();
        Some(crate::link::recognise::FrameVerdict { decisive, meaning: format!("{} id={}", bvlc_sc::function_name(code), m.message_id), unit: None })
    }
    fn sim(&self) -> Option<super::KindCommand> {
        Some(super::KindCommand {
            command: || {
                super::subcommand::<crate::cli::sim::BscHubSimArgs>(
                    "bsc-hub",
                    "BACnet/SC hub (Annex AB): ws:// or wss:// with TLS 1.3 mutual authentication.",
                    crate::cli::sim::BSC_HUB_SIM_HELP,
                )
            },
            run: |m| super::run_parsed(m, crate::cli::sim::bsc_hub_main),
        })
    }
    fn validate(&self) -> Option<super::KindCommand> {
        Some(super::KindCommand {
            command: || {
                super::subcommand::<crate::cli::validate::BscHubArgs>(
                    "bsc-hub",
                    "Conformance checks against a BACnet/SC hub (uses three nodes of its own).",
                    crate::cli::validate::BSC_HUB_VALIDATE_HELP,
                )
            },
            run: |m| super::run_parsed(m, crate::cli::validate::run_bsc_hub),
        })
    }
    fn name(&self) -> &'static str {
        "bsc-hub"
    }
    fn role(&self) -> Role {
        Role::Device
    }
    fn about(&self) -> &'static str {
        "BACnet/SC hub (ASHRAE 135 Annex AB): ws:// or wss:// (TLS 1.3, client certificates), hub function"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<BscHubKeys>(entry)?))
    }
}

impl BscHubKeys {
    fn config(&self, pki_dir: &Path) -> HubServerConfig {
        let mut core = HubConfig {
            hub_status: match self.role {
                BscHubRole::Primary => HubRole::Primary,
                BscHubRole::Failover => HubRole::Failover,
            },
            broadcast_rate_limit: self.broadcast_rate_limit,
            bind_identity: self.cert_binding.unwrap_or(true),
            ..HubConfig::default()
        };
        if let Some(d) = self.heartbeat_timeout {
            core.heartbeat_timeout = d.0;
        }
        if let Some(d) = self.connect_wait {
            core.connect_wait = d.0;
        }
        if let Some(b) = self.max_bvlc {
            core.max_bvlc = b;
        }
        let mut cfg = HubServerConfig {
            tls: self.tls.then(|| TlsDir::hub(pki_dir)),
            client_certs: ClientCertPolicy { require_client_auth_eku: !self.allow_client_cert_without_eku },
            core,
            // Two runtime threads per hub are plenty for a scenario and keep many hubs cheap.
            worker_threads: 2,
            ..HubServerConfig::default()
        };
        if let Some(n) = self.max_connections {
            cfg.max_connections = n;
            cfg.core.max_connections = n;
        }
        if let Some(m) = self.max_message {
            cfg.max_message = m;
        }
        cfg.max_message = cfg.max_message.max(cfg.core.max_bvlc as usize);
        if let Some(q) = self.queue_depth {
            cfg.queue_depth = q;
        }
        if let Some(d) = self.slow_consumer_close_after {
            cfg.slow_consumer_close_after = Some(d.0);
        }
        cfg
    }
}

impl Declared for BscHubKeys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "bsc-hub"
    }
    fn check(&self, _names: &Names<'_>) -> Result<(), Problem> {
        if self.cert_binding == Some(true) && !self.tls {
            return Err(at_key("cert_binding", "cert_binding needs `tls: true` (a plaintext node has no certificate)"));
        }
        if self.allow_client_cert_without_eku && !self.tls {
            return Err(at_key("allow_client_cert_without_eku", "allow_client_cert_without_eku needs `tls: true`"));
        }
        if self.max_bvlc.is_some_and(|b| b < 600) {
            return Err(at_key("max_bvlc", "max_bvlc below 600 cannot carry a Connect-Request and an NPDU"));
        }
        if self.queue_depth == Some(0) {
            return Err(at_key("queue_depth", "queue_depth must be at least 1"));
        }
        if self.max_connections == Some(0) {
            return Err(at_key("max_connections", "max_connections must be at least 1"));
        }
        Ok(())
    }
    fn serves(&self) -> &'static [&'static str] {
        &[BACNET_SC_HUB]
    }
    fn links(&self) -> Vec<super::LinkDecl> {
        vec![super::LinkDecl {
            name: self.name.clone(),
            home: super::LinkHomeDecl::Own,
            capture: None,
            checksum: None,
            carries: "the BACnet/SC connections it accepts",
            medium: LinkMedium::Server,
        }]
    }
    fn restartable(&self) -> bool {
        true
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let pki_dir = cx.tmp.join("pki");
            if self.tls && !pki_dir.exists() {
                // One node certificate per BACnet/SC client, in client order (node-1, node-2, …).
                let nodes = cx.names.clients_of(BACNET_SC_HUB).len().max(1);
                crate::cli::pki::generate(&pki_dir, nodes, &[], 1, false).map_err(|e| format!("test PKI: {e}"))?;
                cx.vars.insert("pki_dir".into(), pki_dir.display().to_string());
            }
            let mut config = self.config(&pki_dir);
            // Kept across a stop and start: faults stay on the hub's link.
            let faults = ConnFaults::new(self.name.clone(), cx.seed);
            // The pump copies every byte and buffers ahead of the hub's own queues (which
            // would hide a slow consumer): only a hub whose link gets faults has one.
            if cx.faulted_links.contains(&self.name) {
                config.connection_faults = Some(faults.clone());
            }
            let hub = RunningHub::start(&self.name, config, faults, &cx.log).await?;
            Ok(Box::new(hub) as Box<dyn Running>)
        })
    }
}

/// A running hub. `handle` is `None` while stopped; a restart binds the
/// same address, so nodes find it where they left it.
struct RunningHub {
    name: String,
    config: HubServerConfig,
    faults: std::sync::Arc<ConnFaults>,
    url: String,
    handle: Option<HubHandle>,
    events: Option<tokio::task::JoinHandle<()>>,
    log: ObservationLog,
}

impl RunningHub {
    async fn start(name: &str, config: HubServerConfig, faults: std::sync::Arc<ConnFaults>, log: &ObservationLog) -> Result<RunningHub, String> {
        let mut hub = RunningHub { name: name.to_string(), config, faults, url: String::new(), handle: None, events: None, log: log.clone() };
        hub.serve(log).await?;
        Ok(hub)
    }

    async fn serve(&mut self, log: &ObservationLog) -> Result<(), String> {
        let handle = HubServer::start(self.config.clone()).await.map_err(|e| format!("hub `{}`: {e}", self.name))?;
        self.config.listen = handle.local_addr();
        self.url = handle.url();
        let mut rx = handle.subscribe();
        let (log, source) = (log.clone(), self.name.clone());
        self.events = Some(actix::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match rx.recv().await {
                    Ok(ev) => log.push(&source, hub_observation(&ev)),
                    Err(RecvError::Lagged(n)) => log.push(
                        &source,
                        ObservationKind::Hub { event: "events_lost".into(), detail: format!("{n} events not observed") },
                    ),
                    Err(RecvError::Closed) => break,
                }
            }
        }));
        self.handle = Some(handle);
        Ok(())
    }

    async fn shut(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
        if let Some(t) = self.events.take() {
            // Events already queued are delivered before the channel reports closed.
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
    }
}

impl Running for RunningHub {
    fn vars(&self) -> Vec<(String, String)> {
        vec![(format!("hub.{}", self.name), self.url.clone())]
    }
    fn add_fault<'a>(&'a self, _link: &'a str, rule: FaultRule) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if !rule.fault.is_connection_level() {
                // Validation refuses these; a hub's link sees connections, not frames.
                return Err(format!("`{}` takes connection faults only, not `{}`", self.name, rule.fault.name()));
            }
            self.faults.add_rule(rule);
            Ok(())
        })
    }
    fn clear_faults<'a>(&'a self, _link: &'a str, name: Option<&'a str>) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            match name {
                None => self.faults.clear(),
                Some(n) if !self.faults.clear_named(n) => return Err(format!("no fault named `{n}` on `{}`", self.name)),
                Some(_) => {}
            }
            Ok(())
        })
    }
    fn pause(&mut self) -> LocalBoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            if self.handle.is_none() {
                return Err(format!("hub `{}` is already stopped", self.name));
            }
            self.shut().await;
            self.log.push(&self.name, ObservationKind::Hub { event: "stopped".into(), detail: String::new() });
            Ok(format!("stopped `{}`", self.name))
        })
    }
    fn resume<'a>(&'a mut self, log: &'a ObservationLog) -> LocalBoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            if self.handle.is_some() {
                return Err(format!("hub `{}` is already running", self.name));
            }
            self.serve(log).await?;
            log.push(&self.name, ObservationKind::Hub { event: "started".into(), detail: String::new() });
            Ok(format!("started `{}` again on its address", self.name))
        })
    }
    fn stop(mut self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move { self.shut().await })
    }
}

/// A hub event as an observation: `event` is a stable snake-case name scenarios
/// match on; `detail` is the event's debug form (connection, VMAC, reason).
fn hub_observation(ev: &HubServerEvent) -> ObservationKind {
    let event = match ev {
        HubServerEvent::Accepted { .. } => "accepted",
        HubServerEvent::Refused { .. } => "refused",
        HubServerEvent::Core(c) => match c {
            HubEvent::Connected { .. } => "connected",
            HubEvent::Replaced { .. } => "replaced",
            HubEvent::DuplicateVmac { .. } => "duplicate_vmac",
            HubEvent::IdentityRefused { .. } => "identity_refused",
            HubEvent::SilentPeerDropped { .. } => "silent_peer_dropped",
            HubEvent::ConnectWaitExpired { .. } => "connect_wait_expired",
            HubEvent::Disconnected { .. } => "disconnected",
            HubEvent::PeerClosed { .. } => "peer_closed",
            HubEvent::NakSent { .. } => "nak_sent",
            HubEvent::Dropped { .. } => "dropped",
            HubEvent::OriginatingVmacPresent { .. } => "originating_vmac_present",
        },
        HubServerEvent::ClosedByHub { .. } => "closed_by_hub",
        HubServerEvent::ClosedByShell { .. } => "closed_by_shell",
        HubServerEvent::SlowConsumer { .. } => "slow_consumer",
        HubServerEvent::SlowConsumerRecovered { .. } => "slow_consumer_recovered",
        HubServerEvent::Ended { .. } => "ended",
    };
    let detail = match ev {
        HubServerEvent::Core(c) => format!("{c:?}"),
        other => format!("{other:?}"),
    };
    ObservationKind::Hub { event: event.into(), detail }
}
