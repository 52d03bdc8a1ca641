//! What the serial client kinds share: their scenario keys (a bus port or
//! a tty, addresses, timing), the check of those keys, and the running
//! handle of a client actor that owns a link.

use std::path::PathBuf;
use std::time::Duration;

use actix::prelude::*;
use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::{at_key, LinkDecl, LinkHomeDecl, Names, Running, Vocabulary};
use crate::client::poller::{ClientClearFault, ClientClearFaults, ClientFault, ClientFrames, PollerConfig};
use crate::link::capture::CaptureFormat;
use crate::link::fault::{ChecksumLayout, LinkMedium};
use crate::link::{FaultRule, FrameRecord};
use crate::protocol::eg4::RegisterProfile;
use crate::scenario::source::Problem;

fn default_baud() -> u32 {
    9600
}

/// A client on a serial line: a bus port or, in real-hardware mode, a tty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialKeys {
    pub name: String,
    /// A bus port (`PORT`) or, in real-hardware mode, a tty path.
    pub port: String,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default)]
    pub addresses: Vec<u8>,
    #[serde(default)]
    pub profile: Option<RegisterProfile>,
    #[serde(default)]
    pub interval: Option<crate::scenario::spec::Dur>,
    #[serde(default)]
    pub timeout: Option<crate::scenario::spec::Dur>,
    #[serde(default)]
    pub retries: Option<u32>,
}

impl SerialKeys {
    /// The port is a bus port of the scenario or a tty path; a polling
    /// client needs addresses.
    pub fn check(&self, names: &Names<'_>, polls: bool) -> Result<(), Problem> {
        if !names.ports.contains(&self.port.as_str()) && !self.port.starts_with('/') {
            return Err(at_key("port", format!("port `{}` is neither a bus port ({}) nor a tty path", self.port, names.ports.join(", "))));
        }
        if polls && self.addresses.is_empty() {
            return Err(at_key("addresses", "give the `addresses` to poll"));
        }
        if let Some(bad) = self.addresses.iter().find(|a| **a == 0 || **a > 247) {
            return Err(at_key("addresses", format!("address {bad} is outside 1..=247")));
        }
        Ok(())
    }

    /// The path to open: the bus port's PTY, or the tty as given.
    pub fn port_path(&self, vars: &std::collections::BTreeMap<String, String>) -> PathBuf {
        vars.get(&format!("port.{}", self.port)).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(&self.port))
    }

    pub fn poller(&self, vars: &std::collections::BTreeMap<String, String>, seed: u64, publish_readings: bool) -> PollerConfig {
        PollerConfig {
            name: self.name.clone(),
            port: self.port_path(vars),
            baud: self.baud,
            addresses: self.addresses.clone(),
            interval: self.interval.map(|d| d.0).unwrap_or(Duration::from_millis(200)),
            timeout: self.timeout.map(|d| d.0).unwrap_or(Duration::from_millis(500)),
            retries: self.retries.unwrap_or(2),
            publish_readings,
            seed,
        }
    }

    /// The client's own link, between it and its port.
    pub fn link(&self, checksum: ChecksumLayout, carries: &'static str) -> LinkDecl {
        LinkDecl { name: self.name.clone(), home: LinkHomeDecl::Own, capture: Some(CaptureFormat::ModbusRtu), checksum: Some(checksum), carries, medium: LinkMedium::Serial }
    }
}

/// The error kinds every serial poller reports.
pub const SERIAL_ERRORS: &[&str] = &["timeout", "crc", "exception", "malformed", "framing", "echo", "io", "gave_up"];

/// What an EG4 reading carries (`telemetry_fields`).
pub fn eg4_vocabulary() -> Vocabulary {
    let fields = [
        "pack_v", "current_a", "soc_pct", "soh_pct", "pcb_temp_c", "capacity_ah", "remaining_ah", "cycles", "uptime", "warnings",
        "protections", "cell_count", "cellN_mv", "tempN_c",
    ];
    let mut flags: Vec<String> = crate::protocol::eg4::warning::ALL.iter().map(|(_, n)| format!("warning:{n}")).collect();
    flags.extend(crate::protocol::eg4::protection::ALL.iter().map(|(_, n)| format!("protection:{n}")));
    for bit in ["unknown_bit14", "unknown_bit15"] {
        flags.push(format!("warning:{bit}"));
        flags.push(format!("protection:{bit}"));
    }
    Vocabulary {
        fields: fields.iter().map(|s| s.to_string()).collect(),
        flags,
        errors: SERIAL_ERRORS.iter().map(|s| s.to_string()).collect(),
    }
}

/// A client actor that owns a link (faults, clearing, frames go to it).
pub struct LinkedClient<A: Actor> {
    pub addr: Addr<A>,
}

impl<A> Running for LinkedClient<A>
where
    A: Actor<Context = Context<A>> + Handler<ClientFault> + Handler<ClientClearFaults> + Handler<ClientClearFault> + Handler<ClientFrames>,
{
    fn add_fault<'a>(&'a self, _link: &'a str, rule: FaultRule) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.addr.send(ClientFault(rule)).await.map_err(|e| e.to_string()) })
    }
    fn clear_faults<'a>(&'a self, link: &'a str, name: Option<&'a str>) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            match name {
                None => self.addr.send(ClientClearFaults).await.map_err(|e| e.to_string()),
                Some(n) => match self.addr.send(ClientClearFault(n.to_string())).await.map_err(|e| e.to_string())? {
                    true => Ok(()),
                    false => Err(format!("no fault named `{n}` on `{link}`")),
                },
            }
        })
    }
    fn frames(&self) -> LocalBoxFuture<'_, Vec<FrameRecord>> {
        Box::pin(async move { self.addr.send(ClientFrames).await.unwrap_or_default() })
    }
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move { drop(self) })
    }
}

/// A client actor with no link of its own (a passive listener).
pub struct UnlinkedClient<A: Actor> {
    /// Held so the actor lives until `stop` drops it.
    pub _addr: Addr<A>,
}

impl<A: Actor> Running for UnlinkedClient<A> {
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move { drop(self) })
    }
}
