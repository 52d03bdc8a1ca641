//! `legacy-client`: polls packs with the legacy EG4 7E/0D protocol
//! (command 0x01), as the EG4 bridges of older packs do.

use actix::Actor;
use futures::future::LocalBoxFuture;

use super::serial_client::{LinkedClient, SerialKeys, SERIAL_ERRORS};
use super::{decode_keys, Declared, Kind, LinkDecl, Names, Role, Running, StartContext, Vocabulary};
use crate::client::legacy::LegacyPoll;
use crate::client::poller::PollerActor;
use crate::link::fault::ChecksumLayout;
use crate::scenario::source::Problem;

pub struct LegacyClient;

#[derive(Debug)]
pub struct LegacyClientDecl(SerialKeys);

impl Kind for LegacyClient {
    fn name(&self) -> &'static str {
        "legacy-client"
    }
    fn role(&self) -> Role {
        Role::Client
    }
    fn about(&self) -> &'static str {
        "polls packs with the legacy EG4 7E/0D protocol (command 0x01)"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(LegacyClientDecl(decode_keys(entry)?)))
    }
    fn vocabulary(&self) -> Option<Vocabulary> {
        // What `legacy_fields` publishes.
        let fields = ["cell_count", "cellN_mv", "current_a", "soc_pct", "remaining_ah", "cycles", "pack_v", "tempN_c"];
        let mut flags = vec!["cell_ov_flag:N".to_string()];
        flags.extend(["over_current", "voltage_high", "voltage_low", "charge_temp_high", "charge_temp_low"].iter().map(|n| format!("alarm:{n}")));
        Some(Vocabulary {
            fields: fields.iter().map(|s| s.to_string()).collect(),
            flags,
            errors: SERIAL_ERRORS.iter().map(|s| s.to_string()).collect(),
        })
    }
}

impl Declared for LegacyClientDecl {
    fn name(&self) -> &str {
        &self.0.name
    }
    fn kind_name(&self) -> &'static str {
        "legacy-client"
    }
    fn check(&self, names: &Names<'_>) -> Result<(), Problem> {
        self.0.check(names, true)
    }
    fn links(&self) -> Vec<LinkDecl> {
        vec![self.0.link(ChecksumLayout::Eg4Legacy, "EG4 7E/0D")]
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let actor = PollerActor::open(self.0.poller(cx.vars, cx.seed, true), LegacyPoll, cx.log.clone()).map_err(|e| e.to_string())?;
            Ok(Box::new(LinkedClient { addr: actor.start() }) as Box<dyn Running>)
        })
    }
}
