//! `modbus-master` polls packs over Modbus RTU and publishes readings;
//! `inverter-master` polls the same way, as an inverter on the bus does,
//! making traffic for passive listeners and publishing only its errors.

use actix::Actor;
use futures::future::LocalBoxFuture;

use super::serial_client::{eg4_vocabulary, LinkedClient, SerialKeys};
use super::{decode_keys, Declared, Kind, LinkDecl, Names, Role, Running, StartContext, Vocabulary};
use crate::client::modbus_master::ModbusPoll;
use crate::client::poller::PollerActor;
use crate::link::fault::ChecksumLayout;
use crate::protocol::eg4::RegisterProfile;
use crate::scenario::source::Problem;

pub struct ModbusMaster {
    name: &'static str,
    about: &'static str,
    publishes_readings: bool,
}

pub static MODBUS_MASTER: ModbusMaster = ModbusMaster {
    name: "modbus-master",
    about: "polls packs over Modbus RTU: schedule, timeout, retries, CRC check; publishes readings",
    publishes_readings: true,
};

pub static INVERTER_MASTER: ModbusMaster = ModbusMaster {
    name: "inverter-master",
    about: "an inverter polling packs over Modbus RTU: bus traffic for passive listeners, errors but no readings",
    publishes_readings: false,
};

#[derive(Debug)]
pub struct ModbusMasterDecl {
    keys: SerialKeys,
    kind: &'static str,
    publishes_readings: bool,
}

impl Kind for ModbusMaster {
    fn name(&self) -> &'static str {
        self.name
    }
    fn role(&self) -> Role {
        Role::Client
    }
    fn about(&self) -> &'static str {
        self.about
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(ModbusMasterDecl { keys: decode_keys(entry)?, kind: self.name, publishes_readings: self.publishes_readings }))
    }
    fn vocabulary(&self) -> Option<Vocabulary> {
        let v = eg4_vocabulary();
        // An inverter's readings are not published, but its errors count.
        Some(if self.publishes_readings { v } else { Vocabulary { fields: Vec::new(), flags: Vec::new(), ..v } })
    }
}

impl Declared for ModbusMasterDecl {
    fn name(&self) -> &str {
        &self.keys.name
    }
    fn kind_name(&self) -> &'static str {
        self.kind
    }
    fn check(&self, names: &Names<'_>) -> Result<(), Problem> {
        self.keys.check(names, true)
    }
    fn links(&self) -> Vec<LinkDecl> {
        vec![self.keys.link(ChecksumLayout::ModbusCrc, "Modbus RTU")]
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let profile = self.keys.profile.unwrap_or(RegisterProfile::Lp4V2);
            let cfg = self.keys.poller(cx.vars, cx.seed, self.publishes_readings);
            let actor = PollerActor::open(cfg, ModbusPoll { profile }, cx.log.clone()).map_err(|e| e.to_string())?;
            Ok(Box::new(LinkedClient { addr: actor.start() }) as Box<dyn Running>)
        })
    }
}
