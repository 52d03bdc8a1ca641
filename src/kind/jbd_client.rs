//! `jbd-client`: a BLE central (btleplug) polling a JBD BMS the way the
//! Home Assistant integrations do: connect, subscribe, 0x03/0x04 (0x05
//! once), disconnect, every `interval`.

use std::time::Duration;

use actix::Actor;
use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::jbd_bms::JBD_GATT;
use super::serial_client::LinkedClient;
use super::{at_key, decode_keys, Declared, Kind, LinkDecl, LinkHomeDecl, Names, Role, Running, StartContext, Vocabulary};
use crate::client::jbd_client::{JbdClientActor, JbdClientConfig, JbdTarget};
use crate::link::fault::{ChecksumLayout, LinkMedium};
use crate::scenario::source::Problem;
use crate::scenario::spec::Dur;

pub struct JbdClientKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BleWriteType {
    /// Write-without-response (what JBD firmware expects).
    Command,
    /// Write-with-response.
    Request,
}

/// Its scenario keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JbdClientKeys {
    pub name: String,
    /// A jbd-bms device of the scenario (or, in real-hardware mode, a BLE address).
    pub device: String,
    #[serde(default)]
    pub interval: Option<Dur>,
    /// Per-request answer timeout.
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub retries: Option<u32>,
    /// Drop frames with a bad checksum (default true; many real clients do not check).
    #[serde(default)]
    pub verify_checksum: Option<bool>,
    /// Write type for requests (default `command`).
    #[serde(default)]
    pub write: Option<BleWriteType>,
}

impl Kind for JbdClientKind {
    fn name(&self) -> &'static str {
        "jbd-client"
    }
    fn role(&self) -> Role {
        Role::Client
    }
    fn about(&self) -> &'static str {
        "polls a JBD BMS over BLE (btleplug): 0x03/0x04/0x05 without response, reassembly, checksum; publishes readings"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<JbdClientKeys>(entry)?))
    }
    fn vocabulary(&self) -> Option<Vocabulary> {
        // What `reading_fields` publishes, and the session's error kinds.
        let fields = [
            "pack_v", "current_a", "soc_pct", "remaining_ah", "capacity_ah", "cycles", "cell_count", "ntc_count", "tempN_c",
            "software_version", "protections", "balance_bits", "charge_fet", "discharge_fet", "cellN_mv", "cell_min_mv",
            "cell_max_mv", "cell_delta_mv",
        ];
        let mut flags: Vec<String> = crate::protocol::jbd::protection::ALL.iter().map(|(_, n)| format!("protection:{n}")).collect();
        flags.extend(["protection:bitN", "balancing:cellN", "fet:charge_off", "fet:discharge_off", "model:*"].map(String::from));
        let errors = ["not_found", "connect_failed", "timeout", "checksum", "malformed", "status", "io", "gave_up"];
        Some(Vocabulary {
            fields: fields.iter().map(|s| s.to_string()).collect(),
            flags,
            errors: errors.iter().map(|s| s.to_string()).collect(),
        })
    }
}

impl Declared for JbdClientKeys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "jbd-client"
    }
    fn check(&self, names: &Names<'_>) -> Result<(), Problem> {
        let bmses = names.devices_serving(JBD_GATT);
        let is_address = self.device.len() == 17 && self.device.split(':').all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok());
        if !bmses.contains(&self.device.as_str()) && !is_address {
            return Err(at_key(
                "device",
                format!(
                    "device `{}` is neither a JBD BMS of this scenario ({}) nor a BLE address (AA:BB:CC:DD:EE:FF)",
                    self.device,
                    if bmses.is_empty() { "none".to_string() } else { bmses.join(", ") }
                ),
            ));
        }
        Ok(())
    }
    fn links(&self) -> Vec<LinkDecl> {
        vec![LinkDecl {
            name: self.name.clone(),
            home: LinkHomeDecl::Own,
            capture: None,
            checksum: Some(ChecksumLayout::JbdSum),
            carries: "JBD frames in BLE notifications",
            medium: LinkMedium::Gatt,
        }]
    }
    fn client_of(&self) -> Option<&'static str> {
        Some(JBD_GATT)
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let address = cx.vars.get(&format!("ble.{}", self.device)).cloned().unwrap_or_else(|| self.device.clone());
            let defaults = JbdClientConfig::default();
            let cfg = JbdClientConfig {
                name: self.name.clone(),
                target: JbdTarget { address: Some(address), name: None },
                interval: self.interval.map(|d| d.0).unwrap_or(Duration::from_secs(1)),
                timeout: self.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(1)),
                retries: self.retries.unwrap_or(defaults.retries),
                scan_timeout: Duration::from_secs(5),
                verify_checksum: self.verify_checksum.unwrap_or(true),
                write_type: match self.write {
                    Some(BleWriteType::Request) => btleplug::api::WriteType::WithResponse,
                    _ => btleplug::api::WriteType::WithoutResponse,
                },
                seed: cx.seed,
                ..defaults
            };
            Ok(Box::new(LinkedClient { addr: JbdClientActor::new(cfg, cx.log.clone()).start() }) as Box<dyn Running>)
        })
    }
}
