//! `replay`: a device that answers as a captured one did, from a fixture that
//! `hilbench capture import` wrote. It serves serial fixtures on one of the scenario's
//! RS-485 buses (Modbus RTU, EG4 7E/0D, JBD over UART), BLE fixtures on the virtual
//! air behind the captured kind's GATT table, UDP fixtures on a socket and HTTP/WebSocket
//! ones on a TCP port (`listen`): every request that matches a captured one
//! gets what the device sent after it, faults included; a request that matches none is
//! observed as `device_silent` and gets no answer.

use std::path::PathBuf;

use actix::Actor;
use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::ble::{self, AirLink};
use super::{at_key, decode_keys, Declared, Kind, LinkDecl, LinkHomeDecl, Names, Role, Running, StartContext};
use crate::device::replay::ReplayBusActor;
use crate::device::replay_ble::ReplayBleDevice;
use crate::device::served::Served;
use crate::device::replay_core::ReplayCore;
use crate::link::capture::CaptureFormat;
use crate::link::fault::LinkMedium;
use crate::link::recognise::CaptureTransport;
use crate::link::record::Direction;
use crate::scenario::import::{read_fixture, read_fixture_head};
use crate::scenario::source::Problem;
use crate::transport::bus::{AttachDevice, BusDevice};

pub struct ReplayKind;

/// Its scenario keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayKeys {
    pub name: String,
    /// The bus it answers on (serial fixtures; a BLE fixture is served on the air).
    #[serde(default)]
    pub bus: Option<String>,
    /// A fixture from `hilbench capture import` (relative to the working directory, as
    /// `hilbench run` is started from the repository).
    pub fixture: PathBuf,
    /// A UDP fixture's address (default 127.0.0.1:0, any free port; `{{udp.NAME}}` says
    /// which).
    #[serde(default)]
    pub udp: Option<std::net::SocketAddr>,
    /// An HTTP/WebSocket fixture's address (default 127.0.0.1:0; `{{http.NAME}}`,
    /// `{{ws.NAME}}`, `{{host.NAME}}` and `{{port.NAME}}` say which).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// `compress` (default): every answer at once; `keep`: each answer as long after the
    /// request as in the capture (UDP and BLE fixtures).
    #[serde(default)]
    pub timing: Timing,
}

/// Whether a replay keeps the captured delays of its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Timing {
    #[default]
    Compress,
    Keep,
}

/// A scenario's `replay` entry for `fixture` (on `bus`, or on its own link), one YAML
/// flow mapping (`capture import` writes these).
pub fn scenario_entry(name: &str, bus: Option<&str>, fixture: &std::path::Path) -> String {
    // JSON's string quoting is valid YAML.
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let bus = bus.map_or(String::new(), |b| format!(" bus: {},", q(b)));
    format!("{{ name: {}, kind: {},{bus} fixture: {} }}", q(name), ReplayKind.name(), q(&fixture.to_string_lossy()))
}

/// What a replay on a bus says to `timing: keep`.
const BUS_TIMING: &str = "a replay on a bus answers at once today (the bus takes one reply per request); `timing: keep` serves UDP and BLE fixtures";

/// A declared replay: its keys, and what its fixture's header says (read when the
/// scenario is decoded; a fixture that cannot be read is reported by `check`).
#[derive(Debug, Clone)]
pub struct ReplayDecl {
    keys: ReplayKeys,
    transport: Option<CaptureTransport>,
    /// What the captured kind's clients name it for.
    serves: &'static [&'static str],
    /// UDP: the variable prefix the captured kind publishes its address under.
    udp_var: Option<&'static str>,
}

impl ReplayDecl {
    fn ble(&self) -> bool {
        self.transport == Some(CaptureTransport::BleAtt)
    }
    fn udp(&self) -> bool {
        self.transport == Some(CaptureTransport::Udp)
    }
    fn tcp(&self) -> bool {
        matches!(self.transport, Some(CaptureTransport::Http | CaptureTransport::WebSocket))
    }
}

/// The transports a `listen` replay serves.
const TCP: [CaptureTransport; 2] = [CaptureTransport::Http, CaptureTransport::WebSocket];

impl Kind for ReplayKind {
    fn name(&self) -> &'static str {
        "replay"
    }
    fn role(&self) -> Role {
        Role::Device
    }
    fn about(&self) -> &'static str {
        "a captured device replayed from a `capture import` fixture: answers each request as the capture did (serial fixtures on an RS-485 bus, BLE ones on the air, UDP and HTTP/WebSocket ones on a socket)"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        let keys = decode_keys::<ReplayKeys>(entry)?;
        let header = read_fixture_head(&keys.fixture, 0).ok().map(|(h, _)| h);
        let transport = header.as_ref().map(|h| h.transport);
        let kind = header.and_then(|h| h.kind).and_then(|k| super::find(Role::Device, &k));
        let udp = kind.and_then(|k| k.udp_service());
        let serves = match transport {
            Some(CaptureTransport::BleAtt) => kind.and_then(|k| k.ble_identity()).map_or(&[][..], |i| i.serves),
            Some(CaptureTransport::Udp) => udp.map_or(&[][..], |u| u.serves),
            Some(CaptureTransport::Http | CaptureTransport::WebSocket) => kind.and_then(|k| k.tcp_service()).unwrap_or(&[]),
            _ => &[],
        };
        Ok(Box::new(ReplayDecl { transport, serves, udp_var: udp.map(|u| u.var), keys }))
    }
    fn sim(&self) -> Option<super::KindCommand> {
        Some(super::KindCommand {
            command: || super::subcommand::<ReplaySimArgs>("replay", "Captured serial devices replayed from `capture import` fixtures on a PTY.", SIM_HELP),
            run: |m| super::run_parsed(m, |a| crate::cli::sim::exit_code(sim(a))),
        })
    }
}

const SIM_HELP: &str = "Every fixture is one device on one RS-485 bus whose port is the PTY: each request
that matches a captured one gets what the device sent after it in the capture (bad CRCs,
silences and echoes included); a request that matches none is logged and unanswered.
With --udp ADDR one UDP fixture (an SMP server's) answers datagrams instead; SMP requests
match without their sequence number and get answers carrying it. With --ble one BLE fixture
is served behind its kind's GATT table and advertised name, on a virtual air of its own
(or --bus/--adapter): a write matching a captured one gets the captured notifications.
With --listen ADDR one HTTP/WebSocket fixture (a Shelly's) answers on http://ADDR and
ws://ADDR/…: a WebSocket call matches whatever its id, src and digest auth, and its answers
carry the live id and src; an HTTP request matches by method, target and body and gets the
captured status, headers and body (404 when the capture never saw it). Prints one JSON ready line
with the PTY path, UDP address, WebSocket URL or BLE address (and the air's D-Bus
address); runs until SIGINT/SIGTERM.

Examples:
  hilbench sim replay fixtures/captures/imported/eg4-fault3-bridge.bridge-addr1.jsonl fixtures/captures/imported/eg4-fault3-bridge.bridge-addr2.jsonl --tty /tmp/field
  hilbench capture import fixtures/captures/eg4-fault3-bridge.pcapng --out target/fixtures && hilbench sim replay target/fixtures/eg4-fault3-bridge.bridge-addr2.jsonl
  hilbench sim replay fixtures/captures/imported/jbd-ble-poll.bms.jsonl --ble
  hilbench capture import fixtures/captures/shelly-aioshelly-http-ws.pcapng --out target/fixtures && hilbench sim replay target/fixtures/shelly-aioshelly-http-ws.tcp-127-0-0-1-18081.jsonl --listen 127.0.0.1:0";

/// `hilbench sim replay`.
#[derive(clap::Args, Debug)]
pub struct ReplaySimArgs {
    /// Fixtures (`capture import` output), one device each.
    #[arg(required = true)]
    pub fixtures: Vec<PathBuf>,
    /// A symlink to the PTY at this path (default: only the /dev/pts path in the ready line).
    #[arg(long, value_name = "PATH", conflicts_with = "udp")]
    pub tty: Option<PathBuf>,
    /// Serve one UDP fixture (an SMP server's) on this address instead of a PTY (port 0: any).
    #[arg(long, value_name = "ADDR", conflicts_with = "ble")]
    pub udp: Option<std::net::SocketAddr>,
    /// Serve one HTTP/WebSocket fixture (a Shelly's) on http://ADDR and ws://ADDR/… instead of a PTY (port 0: any).
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["udp", "ble", "tty"])]
    pub listen: Option<std::net::SocketAddr>,
    /// Serve one BLE fixture behind its kind's GATT table: on a virtual air of its own
    /// unless --bus or --adapter says where.
    #[arg(long, conflicts_with = "tty")]
    pub ble: bool,
    #[command(flatten)]
    pub place: crate::cli::ble_place::BlePlaceArgs,
    /// Line speed, for --wire-time.
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    /// Pace bytes at the line speed and answer after the RTU silence, as a real line does.
    #[arg(long)]
    pub wire_time: bool,
    /// compress: every answer at once; keep: each answer as long after the request as in
    /// the capture (--udp and --ble).
    #[arg(long, value_enum, default_value = "compress")]
    pub timing: Timing,
}

fn sim(a: ReplaySimArgs) -> Result<(), String> {
    use crate::observe::ObservationLog;
    if a.ble {
        let [fixture] = &a.fixtures[..] else {
            return Err(format!("--ble serves one fixture; {} given", a.fixtures.len()));
        };
        return sim_ble(fixture, &a.place, a.timing);
    }
    if a.place.given() {
        return Err("--mtu, --bus and --adapter place a BLE replay: give --ble".into());
    }
    if let Some(addr) = a.listen {
        let [fixture] = &a.fixtures[..] else {
            return Err(format!("--listen serves one fixture; {} given", a.fixtures.len()));
        };
        return sim_ws(load(fixture, &TCP, "--listen serves HTTP and WebSocket ones", a.timing)?.alone(), addr);
    }
    if a.timing == Timing::Keep && a.udp.is_none() {
        return Err(format!("--timing keep: {BUS_TIMING}"));
    }
    if let Some(addr) = a.udp {
        let [fixture] = &a.fixtures[..] else {
            return Err(format!("--udp serves one fixture; {} given", a.fixtures.len()));
        };
        return sim_udp(load(fixture, &[CaptureTransport::Udp], "--udp serves UDP ones", a.timing)?.alone(), addr);
    }
    use crate::transport::bus::{BusActor, BusConfig, BusPortSpec};
    // Every fixture is read before anything opens.
    let mut cores = Vec::new();
    for (i, f) in a.fixtures.iter().enumerate() {
        cores.push((format!("replay{}", i + 1), load(f, &[CaptureTransport::Serial], "a PTY serves serial ones (--udp: UDP ones)", Timing::Compress)?));
    }
    let sys = actix::System::new();
    sys.block_on(async move {
        let log = ObservationLog::bounded(std::time::Instant::now(), 10_000);
        let cfg = BusConfig {
            name: "bus1".into(),
            baud: a.baud,
            wire_time: a.wire_time,
            ports: vec![BusPortSpec { name: "tty1".into(), link_path: a.tty.clone() }],
            seed: 1,
            frame_limit: Some(256),
            record: false,
        };
        let bus = BusActor::open(cfg, Vec::new(), log.clone()).map_err(|e| e.to_string())?;
        let tty = bus.port_paths().into_iter().map(|(_, p)| p).next();
        let bus = bus.start();
        let mut devices = Vec::new();
        for (name, core) in cores {
            let addr = ReplayBusActor::new(name.clone(), core, log.clone()).start();
            bus.send(AttachDevice(BusDevice { name, recipient: addr.clone().recipient() })).await.map_err(|e| format!("bus: {e}"))?;
            devices.push(addr);
        }
        let ready = serde_json::json!({
            "ready": true,
            "kind": "replay",
            "endpoints": { "tty": tty },
            "devices": devices.len(),
        });
        let signal = crate::cli::sim::wait_for_signal();
        println!("{ready}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        signal.await;
        let _ = bus.send(crate::transport::bus::Shutdown).await;
        drop(devices);
        Ok(())
    })
}

/// One BLE fixture served where `place` says (an air of its own by default).
fn sim_ble(fixture: &std::path::Path, place: &crate::cli::ble_place::BlePlaceArgs, timing: Timing) -> Result<(), String> {
    use crate::cli::ble_place::BlePlacement;
    let (core, identity) = load_ble(fixture, timing)?;
    let system = actix::System::new();
    system.block_on(async move {
        let placement = BlePlacement::place(place, 1).await?;
        let (adapter, bus) = (placement.adapter().to_string(), placement.bus().to_string());
        let log = crate::observe::ObservationLog::bounded(std::time::Instant::now(), 10_000);
        let device = match ReplayBleDevice::start("replay", core, &identity, &adapter, log).await {
            Ok(d) => d,
            Err(e) => {
                placement.release().await;
                return Err(e);
            }
        };
        let ready = serde_json::json!({
            "ready": true,
            "kind": "replay",
            "name": identity.local_name,
            "address": device.address,
            "adapter": adapter,
            "dbus_system_bus_address": bus,
            "virtual_air": placement.on_air(),
            "endpoints": { "ble": device.address, "dbus_system_bus_address": bus },
            "devices": 1,
        });
        let signal = crate::cli::sim::wait_for_signal();
        println!("{ready}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        signal.await;
        device.stop().await;
        placement.release().await;
        Ok(())
    })
}

/// A fixture's frames and the replay rule of its kind, or why it cannot be replayed by a
/// host that `serves` (says what it serves) frames of `transport`.
fn load(fixture: &std::path::Path, transports: &[CaptureTransport], serves: &str, timing: Timing) -> Result<ReplayCore, String> {
    let (header, frames) = read_fixture(fixture)?;
    if !transports.contains(&header.transport) {
        return Err(format!("{} holds {} frames; {serves}", fixture.display(), header.transport.as_str()));
    }
    let mut out = Vec::with_capacity(frames.len());
    let mut times = Vec::with_capacity(frames.len());
    for (i, f) in frames.into_iter().enumerate() {
        let bytes = crate::scenario::spec::parse_hex(&f.hex).map_err(|e| format!("{}: frame {}: {e}", fixture.display(), i + 1))?;
        out.push((f.dir, bytes));
        times.push(f.t_ns);
    }
    if !out.iter().any(|(d, _)| *d == Direction::Request) {
        return Err(format!("{} has no request to answer", fixture.display()));
    }
    let rule = header.kind.as_deref().and_then(|k| super::find(Role::Device, k)).and_then(|k| k.replay_rule());
    let core = ReplayCore::with_rule(out, rule);
    Ok(if timing == Timing::Keep { core.keep_timing(times) } else { core })
}

impl ReplayKeys {
    /// The fixture's core, or why it cannot be replayed on a bus.
    fn core(&self) -> Result<ReplayCore, String> {
        load(&self.fixture, &[CaptureTransport::Serial], "a scenario's `replay` on a bus serves serial fixtures", Timing::Compress)
    }
}

impl Declared for ReplayDecl {
    fn name(&self) -> &str {
        &self.keys.name
    }
    fn kind_name(&self) -> &'static str {
        "replay"
    }
    fn check(&self, names: &Names<'_>) -> Result<(), Problem> {
        let k = &self.keys;
        if k.udp.is_some() && !self.udp() {
            return Err(at_key("udp", "`udp` serves a UDP fixture; this one is not (or cannot be read)"));
        }
        if k.listen.is_some() && !self.tcp() {
            return Err(at_key("listen", "`listen` serves an HTTP/WebSocket fixture; this one is not (or cannot be read)"));
        }
        if self.tcp() {
            if k.bus.is_some() {
                return Err(at_key("bus", "an HTTP/WebSocket fixture is served on a TCP port, not on a bus: leave `bus` out"));
            }
            load(&k.fixture, &TCP, "", k.timing).map_err(|e| at_key("fixture", e))?;
            return Ok(());
        }
        if self.udp() {
            if k.bus.is_some() {
                return Err(at_key("bus", "a UDP fixture is served on a socket, not on a bus: leave `bus` out"));
            }
            load(&k.fixture, &[CaptureTransport::Udp], "", k.timing).map_err(|e| at_key("fixture", e))?;
            return Ok(());
        }
        if self.ble() {
            if k.bus.is_some() {
                return Err(at_key("bus", "a BLE fixture is served on the air, not on a bus: leave `bus` out"));
            }
            load_ble(&k.fixture, k.timing).map_err(|e| at_key("fixture", e))?;
            return Ok(());
        }
        if k.timing == Timing::Keep && self.transport == Some(CaptureTransport::Serial) {
            return Err(at_key("timing", BUS_TIMING));
        }
        let Some(bus) = &k.bus else {
            // Read the fixture first: a fixture that is not there says so, not "no bus".
            k.core().map_err(|e| at_key("fixture", e))?;
            return Err(Problem::here("a serial fixture is replayed on a bus: give `bus`"));
        };
        if !names.buses.contains(&bus.as_str()) {
            return Err(at_key("bus", format!("bus `{bus}` is not declared under `buses`")));
        }
        k.core().map_err(|e| at_key("fixture", e))?;
        Ok(())
    }
    fn links(&self) -> Vec<LinkDecl> {
        if self.ble() {
            return vec![LinkDecl {
                name: self.keys.name.clone(),
                home: LinkHomeDecl::Own,
                capture: Some(CaptureFormat::BleAtt),
                checksum: None,
                carries: "replayed GATT writes and notifications",
                medium: LinkMedium::Gatt,
            }];
        }
        let Some(bus) = &self.keys.bus else { return Vec::new() };
        vec![LinkDecl {
            name: self.keys.name.clone(),
            home: LinkHomeDecl::Bus(bus.clone()),
            capture: Some(CaptureFormat::ModbusRtu),
            checksum: None,
            carries: "replayed serial frames",
            medium: LinkMedium::Serial,
        }]
    }
    fn bus(&self) -> Option<&str> {
        self.keys.bus.as_deref()
    }
    /// A BLE or UDP replay serves what the captured kind serves there, so that kind's clients find it.
    fn serves(&self) -> &'static [&'static str] {
        self.serves
    }
    fn on_air(&self) -> bool {
        self.ble()
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let k = &self.keys;
            if self.udp() {
                let core = load(&k.fixture, &[CaptureTransport::Udp], "", k.timing)?;
                let addr = k.udp.unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
                let device = crate::device::replay_udp::start(k.name.clone(), core, addr, cx.log.clone()).await?;
                return Ok(Box::new(RunningServedReplay { name: k.name.clone(), tcp: false, var: self.udp_var, device: Some(device) }) as Box<dyn Running>);
            }
            if self.tcp() {
                let core = load(&k.fixture, &TCP, "", k.timing)?.alone();
                let addr = k.listen.unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
                let device = crate::device::replay_ws::start(k.name.clone(), core, addr, cx.log.clone()).await?;
                return Ok(Box::new(RunningServedReplay { name: k.name.clone(), tcp: true, var: None, device: Some(device) }) as Box<dyn Running>);
            }
            if self.ble() {
                let (core, identity) = load_ble(&k.fixture, k.timing)?;
                let air = AirLink::lend(None, None).await?;
                return match ReplayBleDevice::start(k.name.clone(), core, &identity, air.adapter(), cx.log.clone()).await {
                    Ok(device) => Ok(Box::new(ble::OnAir::new(k.name.clone(), device.address.clone(), air, device)) as Box<dyn Running>),
                    Err(e) => {
                        air.give_back().await;
                        Err(e)
                    }
                };
            }
            let core = k.core()?;
            let bus_name = k.bus.as_deref().ok_or("a serial replay needs a bus")?;
            let bus = cx.buses.get(bus_name).ok_or_else(|| format!("bus `{bus_name}` is not running"))?;
            let addr = ReplayBusActor::new(k.name.clone(), core, cx.log.clone()).start();
            bus.send(AttachDevice(BusDevice { name: k.name.clone(), recipient: addr.clone().recipient() }))
                .await
                .map_err(|e| format!("bus `{bus_name}`: {e}"))?;
            Ok(Box::new(RunningReplay { _addr: addr }) as Box<dyn Running>)
        })
    }
}

/// The BLE replay is the device part of its running entity; [`ble::OnAir`] does the rest.
impl ble::AirDevice for ReplayBleDevice {
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin((*self).stop())
    }
}

/// A BLE fixture's core and the GATT table it is served behind (its kind's), or why it
/// cannot be replayed. Only the device's own traffic replays: writes to characteristics
/// (requests) and notifications and indications (answers); discovery, MTU exchange,
/// descriptor writes and write responses are the BLE stack's. A frame's characteristic is
/// the one its capture's discovery or `--gatt` gave its handle; a capture without either
/// (hilbench's own, a log started late) is mapped onto the kind's table where that is
/// unambiguous: the kind's one writable characteristic gets the writes the kind
/// recognised, its one notifying characteristic every notification.
pub fn load_ble(fixture: &std::path::Path, timing: Timing) -> Result<(ReplayCore, crate::transport::gatt::BleIdentity), String> {
    use crate::device::replay_ble::{gatt_frame, NOTIFY, WRITE};
    let (header, frames) = read_fixture(fixture)?;
    if header.transport != CaptureTransport::BleAtt {
        return Err(format!("{} holds {} frames, not BLE ones", fixture.display(), header.transport.as_str()));
    }
    let kind_name = header.kind.clone().ok_or_else(|| format!("{}: no device kind was recognised; a BLE replay serves the GATT table of its kind", fixture.display()))?;
    let identity = super::find(Role::Device, &kind_name)
        .and_then(|k| k.ble_identity())
        .ok_or_else(|| format!("{}: kind {kind_name} serves no GATT table to replay behind", fixture.display()))?;
    let chars: Vec<&crate::transport::gatt::GattChar> = identity.services.iter().flat_map(|s| &s.chars).collect();
    let only = |f: fn(&crate::transport::gatt::Props) -> bool| {
        let mut c = chars.iter().filter(|c| f(&c.props));
        match (c.next(), c.next()) {
            (Some(one), None) => Some(one.uuid),
            _ => None,
        }
    };
    let (writable, notifying) = (only(|p| p.write || p.write_without_response), only(|p| p.notify));
    let mut out = Vec::new();
    let mut times = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let at = || format!("{}: frame {}", fixture.display(), i + 2);
        let pdu = crate::scenario::spec::parse_hex(&f.hex).map_err(|e| format!("{}: {e}", at()))?;
        let (class, dir) = match pdu.first() {
            Some(0x12 | 0x52) => (WRITE, Direction::Request),
            Some(0x1B | 0x1D) => (NOTIFY, Direction::Response),
            _ => continue,
        };
        let Some((handle, value)) = pdu.get(1..3).map(|h| (u16::from_le_bytes([h[0], h[1]]), &pdu[3..])) else {
            return Err(format!("{}: an ATT PDU of {} bytes has no handle", at(), pdu.len()));
        };
        let known = f.uuid.as_deref().or_else(|| header.gatt.get(&handle).map(String::as_str));
        let char = match known {
            Some(u) => uuid::Uuid::parse_str(u).map_err(|e| format!("{}: `{u}`: {e}", at()))?,
            None if class == NOTIFY => notifying.ok_or_else(|| format!("{}: handle 0x{handle:04X} was never discovered and {kind_name} has several notifying characteristics (import with --gatt)", at()))?,
            // A write the kind did not recognise went to a descriptor (a CCCD) or elsewhere.
            None if f.meaning.is_none() => continue,
            None => writable.ok_or_else(|| format!("{}: handle 0x{handle:04X} was never discovered and {kind_name} has several writable characteristics (import with --gatt)", at()))?,
        };
        if !chars.iter().any(|c| c.uuid == char) {
            // A characteristic of another service (the stack's, a vendor's): not the device's traffic.
            continue;
        }
        out.push((dir, gatt_frame(class, char, value)));
        times.push(f.t_ns);
    }
    if !out.iter().any(|(d, _)| *d == Direction::Request) {
        return Err(format!("{} has no write to a {kind_name} characteristic to answer", fixture.display()));
    }
    // The kind's rule reads each value, after the class and characteristic (SMP: the
    // sequence number of a write or notification that starts a message).
    let rule = super::find(Role::Device, &kind_name).and_then(|k| k.replay_rule());
    let core = ReplayCore::with_rule_at(out, rule, crate::device::replay_ble::VALUE_AT);
    Ok((if timing == Timing::Keep { core.keep_timing(times) } else { core }, identity))
}

/// A replay on a socket of its own: UDP, or a TCP port serving HTTP and WebSocket.
struct RunningServedReplay {
    name: String,
    tcp: bool,
    /// The captured kind's variable prefix (`smp`), published beside `udp.NAME`.
    var: Option<&'static str>,
    device: Option<Served>,
}

impl Running for RunningServedReplay {
    fn vars(&self) -> Vec<(String, String)> {
        let Some(d) = &self.device else { return Vec::new() };
        let (name, a) = (&self.name, d.local);
        if self.tcp {
            // As a shelly publishes them, so its clients and a user's process find the replay alike.
            return vec![(format!("http.{name}"), format!("http://{a}")), (format!("ws.{name}"), format!("ws://{a}/rpc")), (format!("host.{name}"), a.to_string()), (format!("port.{name}"), a.port().to_string())];
        }
        let mut vars = vec![(format!("udp.{}", self.name), d.local.to_string())];
        vars.extend(self.var.map(|v| (format!("{v}.{}", self.name), d.local.to_string())));
        vars
    }
    fn stop(mut self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        let device = self.device.take();
        Box::pin(async move {
            if let Some(d) = device {
                d.stop().await;
            }
        })
    }
}

struct RunningReplay {
    _addr: actix::Addr<ReplayBusActor>,
}

impl Running for RunningReplay {
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move { drop(self) })
    }
}

/// One UDP fixture served on `addr` until SIGINT/SIGTERM.
fn sim_udp(core: ReplayCore, addr: std::net::SocketAddr) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async move {
        let log = crate::observe::ObservationLog::bounded(std::time::Instant::now(), 10_000);
        let device = crate::device::replay_udp::start("replay", core, addr, log).await?;
        let signal = crate::cli::sim::wait_for_signal();
        println!("{}", serde_json::json!({ "ready": true, "kind": "replay", "endpoints": { "udp": device.local.to_string() }, "devices": 1 }));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        signal.await;
        device.stop().await;
        Ok(())
    })
}

/// One WebSocket fixture served on `addr` until SIGINT/SIGTERM.
fn sim_ws(core: ReplayCore, addr: std::net::SocketAddr) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async move {
        let log = crate::observe::ObservationLog::bounded(std::time::Instant::now(), 10_000);
        let device = crate::device::replay_ws::start("replay", core, addr, log).await?;
        let signal = crate::cli::sim::wait_for_signal();
        println!("{}", serde_json::json!({ "ready": true, "kind": "replay", "endpoints": { "http": format!("http://{}", device.local), "ws": format!("ws://{}/rpc", device.local) }, "devices": 1 }));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        signal.await;
        device.stop().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::replay_ble::{split_gatt_frame, NOTIFY, WRITE};

    fn fixture(dir: &std::path::Path, header: &str, frames: &[&str]) -> std::path::PathBuf {
        let p = dir.join("f.jsonl");
        let mut text = format!("{header}\n");
        for f in frames {
            text.push_str(f);
            text.push('\n');
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    const JBD_HEADER: &str = r#"{"hilbench_fixture":1,"source":"x","device":"bms","transport":"ble-att","kind":"jbd-bms","confidence":"low","evidence":"","frames":4,"start_unix_ns":0}"#;

    #[test]
    fn a_ble_fixture_without_discovery_maps_onto_the_kinds_table() {
        let dir = tempfile::tempdir().unwrap();
        let p = fixture(
            dir.path(),
            JBD_HEADER,
            &[
                // A CCCD write (not recognised), a recognised write, its notification, a write response.
                r#"{"t_ns":0,"dir":"request","hex":"120d000100","att":"write_req","handle":13}"#,
                r#"{"t_ns":1,"dir":"request","hex":"520f00dda50300fffd77","att":"write_cmd","handle":15,"meaning":"read 0x03"}"#,
                r#"{"t_ns":2,"dir":"response","hex":"1b0c00dd0300","att":"handle_value_ntf","handle":12}"#,
                r#"{"t_ns":3,"dir":"response","hex":"13","att":"write_rsp"}"#,
            ],
        );
        let (core, identity) = load_ble(&p, Timing::Compress).unwrap();
        assert_eq!(identity.local_name, "xiaoxiang BMS");
        assert_eq!(core.requests(), 1, "the CCCD write is the stack's");
        let mut out = Vec::new();
        use crate::sans_io::{Input, Output, Peer, SansIoCore};
        let req = crate::device::replay_ble::gatt_frame(WRITE, crate::device::jbd::WRITE_UUID, &[0xdd, 0xa5, 0x03, 0x00, 0xff, 0xfd, 0x77]);
        let mut core = core.alone();
        core.handle_input(Input::Bytes { from: Peer::ONLY, bytes: &req }, std::time::Duration::ZERO, &mut out).unwrap();
        let Some(Output::Send { bytes, .. }) = out.first() else { panic!("{out:?}") };
        assert_eq!(split_gatt_frame(bytes), Some((NOTIFY, crate::device::jbd::NOTIFY_UUID, &[0xdd, 0x03, 0x00][..])));
    }

    #[test]
    fn ble_fixtures_that_cannot_be_served_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let no_kind = JBD_HEADER.replace(r#""kind":"jbd-bms""#, r#""kind":null"#);
        let p = fixture(dir.path(), &no_kind, &[]);
        assert!(load_ble(&p, Timing::Compress).unwrap_err().contains("no device kind was recognised"));
        let serial = JBD_HEADER.replace("ble-att", "serial");
        let p = fixture(dir.path(), &serial, &[]);
        assert!(load_ble(&p, Timing::Compress).unwrap_err().contains("holds serial frames, not BLE ones"));
        let eg4 = JBD_HEADER.replace("jbd-bms", "eg4-lp4");
        let p = fixture(dir.path(), &eg4, &[]);
        assert!(load_ble(&p, Timing::Compress).unwrap_err().contains("kind eg4-lp4 serves no GATT table"));
        let p = fixture(dir.path(), JBD_HEADER, &[r#"{"t_ns":3,"dir":"response","hex":"13","att":"write_rsp"}"#]);
        assert!(load_ble(&p, Timing::Compress).unwrap_err().contains("has no write to a jbd-bms characteristic"));
        let p = fixture(dir.path(), JBD_HEADER, &[r#"{"t_ns":1,"dir":"request","hex":"52","att":"write_cmd","meaning":"x"}"#]);
        assert!(load_ble(&p, Timing::Compress).unwrap_err().contains("has no handle"));
    }
}
