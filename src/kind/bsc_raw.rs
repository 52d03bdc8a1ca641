//! `bsc-raw`: a raw BACnet/SC peer that sends scripted bytes (malformed,
//! TEXT, oversize) with the `send_raw` step and reports what comes back.

use actix::prelude::*;
use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::bsc_hub::BACNET_SC_HUB;
use super::{at_key, bsc_peer, decode_keys, step_body, Declared, Kind, Names, Role, Running, StartContext, StepContext, StepDoc};
use crate::client::bsc_raw::{BscRawConfig, BscRawPeer, SendRaw};
use crate::scenario::source::Problem;
use crate::scenario::spec::{parse_hex, Dur};

pub struct BscRawKind;

fn yes() -> bool {
    true
}

/// Its scenario keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BscRawKeys {
    pub name: String,
    pub hub: String,
    /// Subprotocol to offer; default `hub.bsc.bacnet.org`, `""` offers none.
    #[serde(default)]
    pub subprotocol: Option<String>,
    /// Send a Connect-Request after the upgrade (default true).
    #[serde(default = "yes")]
    pub handshake: bool,
    #[serde(default)]
    pub vmac: Option<String>,
    #[serde(default)]
    pub uuid: Option<String>,
    /// Read the socket (default true); `false` is a consumer that stopped reading.
    #[serde(default = "yes")]
    pub read: bool,
    /// Wait this long before connecting (e.g. until a node holds the VMAC to clash with).
    #[serde(default)]
    pub delay: Option<Dur>,
}

/// `send_raw`: the peer sends one WebSocket message, `count` times.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRawStep {
    pub client: String,
    /// Bytes in hex (spaces allowed).
    #[serde(default)]
    pub hex: Option<String>,
    /// Zero bytes appended until the message is this long (oversize tests).
    #[serde(default)]
    pub pad_to: Option<usize>,
    /// Send as a TEXT message instead of BINARY.
    #[serde(default)]
    pub text: bool,
    #[serde(default)]
    pub count: Option<u32>,
}

static STEPS: &[StepDoc] = &[StepDoc {
    name: "send_raw",
    target: "client",
    about: "a bsc-raw peer sends one WebSocket message",
    keys: "client, hex, pad_to, text, count",
}];

impl Kind for BscRawKind {
    fn name(&self) -> &'static str {
        "bsc-raw"
    }
    fn role(&self) -> Role {
        Role::Client
    }
    fn about(&self) -> &'static str {
        "a raw BACnet/SC peer: sends scripted bytes (malformed, TEXT, oversize), reports what comes back"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<BscRawKeys>(entry)?))
    }
    fn steps(&self) -> &'static [StepDoc] {
        STEPS
    }
}

impl Declared for BscRawKeys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "bsc-raw"
    }
    fn check(&self, names: &Names<'_>) -> Result<(), Problem> {
        bsc_peer::check_hub("hub", &self.hub, names)?;
        bsc_peer::check_identity(self.vmac.as_deref(), self.uuid.as_deref())
    }
    fn client_of(&self) -> Option<&'static str> {
        Some(BACNET_SC_HUB)
    }
    fn check_step(&self, _step: &str, body: &yaml_serde::Value, _names: &Names<'_>) -> Result<(), Problem> {
        let s: SendRawStep = step_body(body)?;
        if s.hex.is_none() && s.pad_to.is_none() {
            return Err(Problem::here("give `hex` and/or `pad_to`"));
        }
        if let Some(h) = &s.hex {
            parse_hex(h).map_err(|m| at_key("hex", m))?;
        }
        if s.pad_to.is_some_and(|n| n > 16 * 1024 * 1024) {
            return Err(at_key("pad_to", "pad_to is capped at 16 MiB"));
        }
        Ok(())
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let index = bsc_peer::peer_index(cx.names, &self.name);
            let url = bsc_peer::hub_url(cx.vars, &self.hub)?;
            let (mut ws, cert_uuid) = bsc_peer::ws_options(&url, index, &cx.tmp.join("pki"))?;
            if let Some(p) = &self.subprotocol {
                ws.subprotocol = (!p.is_empty()).then(|| p.clone());
            }
            let vmac = bsc_peer::vmac(self.vmac.as_deref(), index);
            let cfg = BscRawConfig {
                name: self.name.clone(),
                url,
                ws,
                handshake: self.handshake,
                vmac,
                uuid: bsc_peer::uuid(self.uuid.as_deref(), vmac, cert_uuid),
                read: self.read,
                delay: self.delay.map(|d| d.0).unwrap_or_default(),
            };
            Ok(Box::new(RunningRaw { name: self.name.clone(), addr: BscRawPeer::new(cfg, cx.log.clone()).start() }) as Box<dyn Running>)
        })
    }
}

struct RunningRaw {
    name: String,
    addr: Addr<BscRawPeer>,
}

impl Running for RunningRaw {
    fn step<'a>(&'a mut self, _step: &'a str, body: &'a yaml_serde::Value, _cx: StepContext<'a>) -> LocalBoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let s: SendRawStep = step_body(body).map_err(|p| p.message)?;
            let mut bytes = match &s.hex {
                Some(h) => parse_hex(h)?,
                None => vec![],
            };
            if let Some(n) = s.pad_to {
                if bytes.len() < n {
                    bytes.resize(n, 0);
                }
            }
            let count = s.count.unwrap_or(1);
            for _ in 0..count {
                self.addr.send(SendRaw { bytes: bytes.clone(), text: s.text }).await.map_err(|err| err.to_string())?;
            }
            Ok(format!("`{}` sent {count} {} message(s) of {} bytes", self.name, if s.text { "TEXT" } else { "binary" }, bytes.len()))
        })
    }
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move { drop(self) })
    }
}
