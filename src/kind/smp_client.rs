//! `smp-client`: a strict SMP client (client/smp_client.rs) on one of a
//! scenario's smp-servers, over its UDP address, its serial port or BLE.
//! It polls params and the image state every `interval` (readings, flags
//! and errors for `expect_reading`, `expect_flag`, `expect_errors`), and
//! its step `smp_validate` runs `hilbench validate smp-server`'s checks on
//! the same connection, polling paused meanwhile.

use std::sync::Arc;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::{at_key, decode_keys, step_body, Declared, Kind, Names, Role, Running, StartContext, StepContext, StepDoc, Vocabulary};
use crate::client::conformance::step_outcome;
use crate::client::smp_client::{poll_once, SmpConn, SmpTarget};
use crate::client::smp_validate::{validate_on, SmpValidateConfig, SmpValidationReport};
use crate::observe::{ObservationKind, ObservationLog};
use crate::scenario::source::Problem;
use crate::scenario::spec::Dur;

pub struct SmpClientKind;

/// Which of the device's transports the client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmpTransportKey {
    #[default]
    Udp,
    Tty,
    Ble,
}

impl SmpTransportKey {
    fn label(self) -> &'static str {
        match self {
            SmpTransportKey::Udp => "UDP",
            SmpTransportKey::Tty => "a serial port",
            SmpTransportKey::Ble => "BLE",
        }
    }

    /// What an smp-server serving this transport says it serves.
    pub fn service(self) -> &'static str {
        match self {
            SmpTransportKey::Udp => SMP_UDP,
            SmpTransportKey::Tty => SMP_TTY,
            SmpTransportKey::Ble => SMP_BLE,
        }
    }
}

/// Services an smp-server offers, one per transport.
pub const SMP_UDP: &str = "smp-udp";
pub const SMP_TTY: &str = "smp-tty";
pub const SMP_BLE: &str = "smp-ble";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmpClientKeys {
    pub name: String,
    /// An smp-server of the scenario.
    pub device: String,
    /// udp (default), tty or ble: which of the device's transports.
    #[serde(default)]
    pub transport: SmpTransportKey,
    /// Time between polls (default 1s).
    #[serde(default)]
    pub interval: Option<Dur>,
    /// Per-request answer timeout (default 1s).
    #[serde(default)]
    pub timeout: Option<Dur>,
}

/// `smp_validate: {client, read_only, fails, boot_timeout}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateStep {
    #[allow(dead_code)]
    client: String,
    /// Only read: no upload, test, confirm or reset.
    #[serde(default)]
    read_only: bool,
    /// The checks that must fail (default none); any other failure fails the step.
    #[serde(default)]
    fails: Vec<String>,
    /// How long a reset may keep the device away (default 30s).
    #[serde(default)]
    boot_timeout: Option<Dur>,
}

/// Every check `smp_validate` may report, for `fails`.
const CHECK_NAMES: &[&str] = &[
    "connect", "params", "echo", "echo_v1", "unknown_group", "bootloader_info", "state_read", "resume_same_sha", "resume_wrong_offset", "upload",
    "state_after_upload", "test", "reset_after_test", "state_after_test_boot", "swap_test", "confirm", "reset_after_confirm", "state_after_confirm_boot",
    "swap_confirmed", "headers", "payloads", "success_form", "v1_answers", "late_answers",
];

static STEPS: &[StepDoc] = &[StepDoc {
    name: "smp_validate",
    target: "client",
    about: "runs hilbench validate smp-server's checks on the client's connection (polling paused); each check is an `smp` observation of the client (check_pass, check_warn, check_fail)",
    keys: "client, read_only, fails (the checks that must fail), boot_timeout",
}];

impl Kind for SmpClientKind {
    fn name(&self) -> &'static str {
        "smp-client"
    }
    fn role(&self) -> Role {
        Role::Client
    }
    fn about(&self) -> &'static str {
        "a strict MCUmgr SMP client on an smp-server (UDP, serial or BLE): polls params and image state, runs the validate checks as a step"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<SmpClientKeys>(entry)?))
    }
    fn steps(&self) -> &'static [StepDoc] {
        STEPS
    }
    fn vocabulary(&self) -> Option<Vocabulary> {
        let fields = ["rtt_ms", "buf_size", "buf_count", "slots", "active_major", "active_minor", "active_revision", "active_confirmed", "pending"];
        let flags = ["active:*", "slotN:active", "slotN:confirmed", "slotN:pending", "slotN:permanent"];
        let errors = ["timeout", "io", "header", "malformed", "smp_error"];
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Some(Vocabulary { fields: s(&fields), flags: s(&flags), errors: s(&errors) })
    }
}

impl Declared for SmpClientKeys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "smp-client"
    }
    fn check(&self, names: &Names<'_>) -> Result<(), Problem> {
        let serving = names.devices_serving(self.transport.service());
        if !serving.contains(&self.device.as_str()) {
            let any: Vec<&str> = [SMP_UDP, SMP_TTY, SMP_BLE].iter().flat_map(|s| names.devices_serving(s)).collect();
            let msg = if any.contains(&self.device.as_str()) {
                format!("smp-server `{}` does not serve {} (give it `udp`, `tty` or `ble: true`, or pick another transport)", self.device, self.transport.label())
            } else {
                format!("device `{}` is not an smp-server of this scenario ({})", self.device, if any.is_empty() { "none".into() } else { any.join(", ") })
            };
            return Err(at_key("device", msg));
        }
        Ok(())
    }
    fn check_step(&self, step: &str, body: &yaml_serde::Value, _names: &Names<'_>) -> Result<(), Problem> {
        if step != "smp_validate" {
            return Err(Problem::here(format!("an smp-client takes no `{step}` step")));
        }
        let s: ValidateStep = step_body(body)?;
        super::check_fails(&s.fails, CHECK_NAMES)
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let var = |k: String| cx.vars.get(&k).cloned().ok_or_else(|| format!("`{}`: the device `{}` publishes no {k}", self.name, self.device));
            let target = match self.transport {
                SmpTransportKey::Udp => SmpTarget::Udp(var(format!("smp.{}", self.device))?.parse().map_err(|e| format!("`{}`: {e}", self.name))?),
                SmpTransportKey::Tty => SmpTarget::Tty { path: var(format!("smp.{}.tty", self.device))?.into(), baud: 115_200 },
                SmpTransportKey::Ble => SmpTarget::Ble { address: var(format!("ble.{}", self.device))?, adapter: Some("hci0".into()) },
            };
            let timeout = self.timeout.map_or(Duration::from_secs(1), |d| d.0);
            let conn = SmpConn::connect(&target, timeout).await.map_err(|e| format!("`{}`: {e}", self.name))?;
            let conn = Arc::new(tokio::sync::Mutex::new(conn));
            let interval = self.interval.map_or(Duration::from_secs(1), |d| d.0);
            let poller = actix::spawn(poll(conn.clone(), interval, cx.log.clone(), self.name.clone()));
            Ok(Box::new(RunningSmpClient { name: self.name.clone(), target, conn, poller }) as Box<dyn Running>)
        })
    }
}

/// Polls until stopped; each poll is a reading or an error observation.
async fn poll(conn: Arc<tokio::sync::Mutex<SmpConn>>, interval: Duration, log: ObservationLog, name: String) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let got = poll_once(&mut *conn.lock().await).await;
        match got {
            Ok(r) => log.push(&name, ObservationKind::Reading { address: 0, values: r.values, flags: r.flags }),
            Err(e) => log.push(&name, ObservationKind::Error { address: 0, kind: e.kind.into(), detail: e.detail, attempt: 1 }),
        }
    }
}

struct RunningSmpClient {
    name: String,
    target: SmpTarget,
    conn: Arc<tokio::sync::Mutex<SmpConn>>,
    poller: tokio::task::JoinHandle<()>,
}

impl RunningSmpClient {
    async fn validate(&self, s: ValidateStep, log: &ObservationLog) -> Result<String, String> {
        let mut conn = self.conn.lock().await;
        let cfg = SmpValidateConfig {
            target: self.target.clone(),
            timeout: conn.timeout,
            boot_timeout: s.boot_timeout.map_or(Duration::from_secs(30), |d| d.0),
            erase_timeout: Duration::from_secs(40),
            read_only: s.read_only,
            image: None,
            line_buffers: None,
        };
        let report = validate_on(&mut conn, &cfg, SmpValidationReport::new(&self.target)).await;
        drop(conn);
        step_outcome(&report.checks, &s.fails, |event, detail| log.push(&self.name, ObservationKind::Smp { event: event.into(), detail }))
    }
}

impl Running for RunningSmpClient {
    fn step<'a>(&'a mut self, step: &'a str, body: &'a yaml_serde::Value, cx: StepContext<'a>) -> LocalBoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            match step {
                "smp_validate" => {
                    let s: ValidateStep = step_body(body).map_err(|p| p.message)?;
                    self.validate(s, cx.log).await
                }
                _ => Err(format!("no `{step}` step here")),
            }
        })
    }
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        self.poller.abort();
        Box::pin(async {})
    }
}
