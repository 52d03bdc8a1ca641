//! `modbus-sniffer`: listens on a bus port and decodes other masters'
//! request/response pairs into readings. It never transmits, so it has no
//! link of its own: fault its bus port instead.

use actix::Actor;
use futures::future::LocalBoxFuture;

use super::serial_client::{eg4_vocabulary, SerialKeys, UnlinkedClient};
use super::{decode_keys, Declared, Kind, Names, Role, Running, StartContext, Vocabulary};
use crate::client::sniffer::{SnifferActor, SnifferConfig};
use crate::protocol::eg4::RegisterProfile;
use crate::scenario::source::Problem;

pub struct ModbusSniffer;

#[derive(Debug)]
pub struct ModbusSnifferDecl(SerialKeys);

impl Kind for ModbusSniffer {
    fn name(&self) -> &'static str {
        "modbus-sniffer"
    }
    fn role(&self) -> Role {
        Role::Client
    }
    fn about(&self) -> &'static str {
        "listens on a bus port and decodes other masters' request/response pairs"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(ModbusSnifferDecl(decode_keys(entry)?)))
    }
    fn vocabulary(&self) -> Option<Vocabulary> {
        // It only reports undecodable bytes as errors.
        Some(Vocabulary { errors: vec!["framing".into()], ..eg4_vocabulary() })
    }
}

impl Declared for ModbusSnifferDecl {
    fn name(&self) -> &str {
        &self.0.name
    }
    fn kind_name(&self) -> &'static str {
        "modbus-sniffer"
    }
    fn check(&self, names: &Names<'_>) -> Result<(), Problem> {
        self.0.check(names, false)
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let cfg = SnifferConfig {
                name: self.0.name.clone(),
                port: self.0.port_path(cx.vars),
                baud: self.0.baud,
                profile: self.0.profile.unwrap_or(RegisterProfile::Lp4V2),
            };
            let actor = SnifferActor::open(cfg, cx.log.clone()).map_err(|e| e.to_string())?;
            Ok(Box::new(UnlinkedClient { _addr: actor.start() }) as Box<dyn Running>)
        })
    }
}
