//! `shelly-client`: a Gen2+ RPC client (client/shelly_client.rs) on one of a scenario's
//! shelly devices, over its WebSocket, as Home Assistant keeps one: it polls
//! `Shelly.GetStatus` every `interval` (readings and flags for `expect_reading` and
//! `expect_flag`, failures for `expect_errors`), answers the digest challenge with its
//! `password`, reports the notifications it hears as `shelly` observations
//! (`notify_event`, `notify_status`), and reconnects when the socket drops (an
//! `io` error, then `shelly` `reconnected`). Its step `shelly_validate` runs `hilbench
//! validate shelly`'s checks on the device (each a `shelly` observation of the client).

use std::time::Duration;

use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::{at_key, decode_keys, step_body, Declared, Kind, Names, Role, Running, StartContext, StepContext, StepDoc, Vocabulary};
use crate::client::conformance::step_outcome;
use crate::client::shelly_validate::{validate, ShellyTarget};
use crate::client::shelly_client::{notification, poll_once, ERROR_KINDS, RECONNECT_PAUSE, SRC};
use crate::client::shelly_rpc::ShellyRpc;
use crate::observe::{ObservationKind, ObservationLog};
use crate::scenario::source::Problem;
use crate::scenario::spec::Dur;

pub struct ShellyClientKind;

/// What a shelly device serves: RPC over HTTP and its WebSocket.
pub const SHELLY_RPC: &str = "shelly-rpc";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellyClientKeys {
    pub name: String,
    /// A shelly of the scenario.
    pub device: String,
    /// The device's password (user admin), answered to its digest challenge.
    #[serde(default)]
    pub password: Option<String>,
    /// Time between polls (default 1s).
    #[serde(default)]
    pub interval: Option<Dur>,
    /// Per-call answer timeout (default 1s).
    #[serde(default)]
    pub timeout: Option<Dur>,
}

/// `shelly_validate: {client, read_only, fails}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateStep {
    #[allow(dead_code)]
    client: String,
    /// Change nothing (no switch toggled for the notification check).
    #[serde(default)]
    read_only: bool,
    /// The checks that must fail (default none); any other failure fails the step.
    #[serde(default)]
    fails: Vec<String>,
}

/// Every check `shelly_validate` may report (over HTTP and the WebSocket), for `fails`.
const CHECK_NAMES: &[&str] = &[
    "http_shelly", "identity_gen", "identity_mac", "identity_fw_id", "identity_fields", "websocket", "frame_fields", "auth_challenge", "auth_answer", "config_sys_name", "status_sys",
    "get_components", "list_methods", "unknown_method", "missing_id", "notify_status",
];

static STEPS: &[StepDoc] = &[StepDoc {
    name: "shelly_validate",
    target: "client",
    about: "runs hilbench validate shelly's checks on the client's device with its password; each check is a `shelly` observation of the client (check_pass, check_warn, check_fail)",
    keys: "client, read_only, fails (the checks that must fail)",
}];

impl Kind for ShellyClientKind {
    fn name(&self) -> &'static str {
        "shelly-client"
    }
    fn role(&self) -> Role {
        Role::Client
    }
    fn about(&self) -> &'static str {
        "a Gen2+ Shelly RPC client on a shelly's WebSocket, as Home Assistant keeps one: polls Shelly.GetStatus with digest auth, hears notifications, reconnects"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<ShellyClientKeys>(entry)?))
    }
    fn steps(&self) -> &'static [StepDoc] {
        STEPS
    }
    fn vocabulary(&self) -> Option<Vocabulary> {
        let fields = ["rtt_ms", "sys_uptime", "switchN_output", "switchN_apower", "switchN_voltage", "switchN_current", "switchN_freq", "switchN_pf", "switchN_aenergy_total", "switchN_temperature_tC", "inputN_state", "coverN_current_pos", "emN_total_act_power"];
        let flags = ["switchN:on", "switchN:overpower", "switchN:overvoltage", "switchN:overtemp", "coverN:open", "coverN:closed", "coverN:opening", "coverN:closing", "coverN:stopped"];
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Some(Vocabulary { fields: s(&fields), flags: s(&flags), errors: s(&ERROR_KINDS) })
    }
}

impl Declared for ShellyClientKeys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "shelly-client"
    }
    fn client_of(&self) -> Option<&'static str> {
        Some(SHELLY_RPC)
    }
    fn check(&self, names: &Names<'_>) -> Result<(), Problem> {
        let shellies = names.devices_serving(SHELLY_RPC);
        if !shellies.contains(&self.device.as_str()) {
            let have = if shellies.is_empty() { "none".to_string() } else { shellies.join(", ") };
            return Err(at_key("device", format!("device `{}` is not a shelly of this scenario ({have})", self.device)));
        }
        Ok(())
    }
    fn check_step(&self, step: &str, body: &yaml_serde::Value, _names: &Names<'_>) -> Result<(), Problem> {
        if step != "shelly_validate" {
            return Err(Problem::here(format!("a shelly-client takes no `{step}` step")));
        }
        let s: ValidateStep = step_body(body)?;
        super::check_fails(&s.fails, CHECK_NAMES)
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let key = format!("host.{}", self.device);
            let host = cx.vars.get(&key).cloned().ok_or_else(|| format!("`{}`: the device `{}` publishes no {key}", self.name, self.device))?;
            let timeout = self.timeout.map_or(Duration::from_secs(1), |d| d.0);
            // The first connection is part of starting: a device that is not there fails the start.
            let rpc = ShellyRpc::connect(&host, self.password.clone(), SRC, timeout).await.map_err(|e| format!("`{}`: {e}", self.name))?;
            let interval = self.interval.map_or(Duration::from_secs(1), |d| d.0);
            let session = Session { host: host.clone(), password: self.password.clone(), timeout, log: cx.log.clone(), name: self.name.clone() };
            let poller = actix::spawn(session.poll(rpc, interval));
            Ok(Box::new(RunningShellyClient { name: self.name.clone(), host, password: self.password.clone(), poller }) as Box<dyn Running>)
        })
    }
}

/// What the poller needs to reconnect and report.
struct Session {
    host: String,
    password: Option<String>,
    timeout: Duration,
    log: ObservationLog,
    name: String,
}

impl Session {
    /// Polls until stopped: each poll a reading or an error, then what was heard; a
    /// dropped socket is opened again (every [`RECONNECT_PAUSE`] until it opens).
    async fn poll(self, rpc: ShellyRpc, interval: Duration) {
        let mut rpc = Some(rpc);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(conn) = rpc.as_mut() else {
                rpc = self.reconnect().await;
                continue;
            };
            let got = poll_once(conn).await;
            for note in std::mem::take(&mut conn.notes) {
                for (event, detail) in notification(&note) {
                    self.log.push(&self.name, ObservationKind::Shelly { event, detail });
                }
            }
            match got {
                Ok(r) => self.log.push(&self.name, ObservationKind::Reading { address: 0, values: r.values, flags: r.flags }),
                Err(e) => {
                    // A socket that failed is not used again; a late answer would pair with the next call.
                    if matches!(e.kind, "io" | "timeout") {
                        rpc = None;
                    }
                    self.log.push(&self.name, ObservationKind::Error { address: 0, kind: e.kind.into(), detail: e.detail, attempt: 1 });
                }
            }
        }
    }

    async fn reconnect(&self) -> Option<ShellyRpc> {
        match ShellyRpc::connect(&self.host, self.password.clone(), SRC, self.timeout).await {
            Ok(c) => {
                self.log.push(&self.name, ObservationKind::Shelly { event: "reconnected".into(), detail: self.host.clone() });
                Some(c)
            }
            Err(_) => {
                tokio::time::sleep(RECONNECT_PAUSE).await;
                None
            }
        }
    }
}

struct RunningShellyClient {
    name: String,
    host: String,
    password: Option<String>,
    poller: tokio::task::JoinHandle<()>,
}

impl Running for RunningShellyClient {
    fn step<'a>(&'a mut self, step: &'a str, body: &'a yaml_serde::Value, cx: StepContext<'a>) -> LocalBoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            if step != "shelly_validate" {
                return Err(format!("no `{step}` step here"));
            }
            let s: ValidateStep = step_body(body).map_err(|p| p.message)?;
            let report = validate(&ShellyTarget { host: self.host.clone(), password: self.password.clone(), read_only: s.read_only }).await;
            step_outcome(&report.checks, &s.fails, |event, detail| cx.log.push(&self.name, ObservationKind::Shelly { event: event.into(), detail }))
        })
    }
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        self.poller.abort();
        Box::pin(async {})
    }
}
