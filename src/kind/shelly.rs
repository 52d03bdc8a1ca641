//! `shelly`: a Shelly Gen2+ device (a model from a real device's dump: Plus
//! 1PM, Plus 2PM, Pro 3EM, Plus Plug S, 1PM Gen3/Gen4) answering RPC over
//! HTTP, WebSocket and BLE GATT, with digest auth, notifications, its relay, cover and
//! meter models and reboots. Its base URL is `{{http.NAME}}`, its WebSocket
//! `{{ws.NAME}}`, its `host:port` `{{host.NAME}}` and its port `{{port.NAME}}`;
//! with `ble: true` its BLE address is `{{ble.NAME}}` (link `NAME.ble`). `hilbench sim shelly`
//! serves one from the command line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::ble::{self, AirLink};
use super::{at_key, decode_keys, Declared, Kind, Names, Role, Running, StartContext};
use crate::device::shelly_ble::{ble_mac, manufacturer_data, ShellyBle};
use crate::device::shelly_core::{self, ShellyConfig, ShellyDevice, ShellyEvent, UnknownMethod, MODELS, STATE_KEYS};
use crate::device::shelly_host::{self, ShellyEndpoints, ShellyHandle};
use crate::link::fault::LinkMedium;
use crate::link::stream::ConnFaults;
use crate::link::{FaultRule, FrameRecord};
use crate::observe::ObservationKind;
use crate::protocol::shelly::digest::{AuthMode, NONCE_LIFETIME};
use crate::scenario::source::Problem;
use crate::scenario::spec::Dur;

pub struct ShellyKind;

fn parse_nonce_lifetime(s: &str) -> Result<Duration, String> {
    checked_nonce_lifetime(humantime::parse_duration(s).map_err(|e| e.to_string())?)
}

/// Whole seconds: 1.x nonces are unix times, so a shorter life could not be told.
fn checked_nonce_lifetime(d: Duration) -> Result<Duration, String> {
    if d < Duration::from_secs(1) {
        return Err(format!("nonce_lifetime {} is under a second (nonces are stamped in whole seconds)", humantime::format_duration(d)));
    }
    Ok(d)
}

fn parse_auth_mode(s: &str) -> Result<AuthMode, String> {
    s.parse()
}

fn parse_unknown_method(s: &str) -> Result<UnknownMethod, String> {
    match s {
        "404" => Ok(UnknownMethod::NoHandler),
        "-114" => Ok(UnknownMethod::MethodFailed),
        _ => Err(format!("unknown-method dialect `{s}` (known: 404, -114)")),
    }
}

fn code_status(s: &str) -> Result<(i64, u16), String> {
    let (c, st) = s.split_once('=').ok_or_else(|| format!("`{s}` is not CODE=STATUS"))?;
    let code = c.parse().map_err(|_| format!("`{c}` is not an RPC error code"))?;
    let status = st.parse().map_err(|_| format!("`{st}` is not an HTTP status"))?;
    Ok((code, status))
}

/// The HTTP status overrides, each a status a server may send for an error (400..=599).
fn checked_statuses(pairs: impl Iterator<Item = (i64, u16)>) -> Result<BTreeMap<i64, u16>, String> {
    pairs
        .map(|(c, s)| if (400..=599).contains(&s) { Ok((c, s)) } else { Err(format!("http_status for {c}: {s} is not an error status (400..=599)")) })
        .collect()
}

fn key_number(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    let v: f64 = v.parse().map_err(|_| format!("`{v}` is not a number"))?;
    Ok((k.to_string(), v))
}

/// `hilbench sim shelly --help` after the options.
pub const SIM_HELP: &str = "Examples:
  # a Plus 1PM on any free port (see the ready line for its URLs)
  hilbench sim shelly --model plus1pm --http 127.0.0.1:0
  # a Pro 3EM with a password, firmware 2.0's nonce rules
  hilbench sim shelly --model pro3em-triphase --http 127.0.0.1:0 --password secret --auth-mode 2.0
  # a Plus Plug S drawing 60 W, switched on
  hilbench sim shelly --model plusplugs --http 127.0.0.1:0 --set switch0_load_w=60 --set switch0_on=1
  # three Plus 1PMs on port 80 of 127.0.0.1, .2 and .3, for clients that take an IP only
  hilbench sim shelly --http 127.0.0.1:80 --count 3
  # RPC over BLE too, on a virtual air of its own (centrals use the ready line's dbus_system_bus_address)
  hilbench sim shelly --http 127.0.0.1:0 --ble --mtu 185
  # a whole session: start one, switch it on over HTTP, stop it
  hilbench sim shelly --http 127.0.0.1:0 > shelly.json & sim=$!
  until [ -s shelly.json ] || ! kill -0 $sim; do sleep 0.1; done
  curl -sf \"$(jq -r .endpoints.http shelly.json)/rpc/Switch.Set?id=0&on=true\"
  kill $sim

Then, e.g.:  curl http://127.0.0.1:PORT/shelly
             curl 'http://127.0.0.1:PORT/rpc/Switch.Set?id=0&on=true'
             curl --digest -u admin:secret http://127.0.0.1:PORT/rpc/Shelly.GetStatus
or aioshelly's RpcDevice over ws://127.0.0.1:PORT/rpc.

Prints one JSON line when serving:
  {\"ready\":true,\"kind\":\"shelly\",\"model\":\"plus1pm\",\"id\":\"shellyplus1pm-…\",\"endpoints\":{\"http\":\"http://127.0.0.1:8080\",\"ws\":\"ws://127.0.0.1:8080/rpc\"}}
with --ble also \"ble\": {\"address\", \"dbus_system_bus_address\"} among the endpoints;
with --count N over 1, \"devices\": [{\"id\", \"endpoints\"}, …] instead of id and endpoints,
and each event line carries the device's \"id\";
then serves until SIGINT/SIGTERM, printing what the device does (invalid
frames dropped, reboots) as JSON lines on stdout.";

#[derive(Args, Debug)]
pub struct ShellySimArgs {
    /// The device model (hilbench list shows them).
    #[arg(long, default_value = "plus1pm")]
    pub model: String,
    /// HTTP and WebSocket address (port 0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Primary MAC (12 hex digits, colons optional); default from the model's vendor prefix.
    #[arg(long)]
    pub mac: Option<String>,
    /// Device name (sys.device.name).
    #[arg(long)]
    pub name: Option<String>,
    /// Turns authentication on (user admin).
    #[arg(long)]
    pub password: Option<String>,
    /// Nonce rules: 1.x (unix-time nonces) or 2.0 (opaque nonces, nc, 32 slots, 429 throttle).
    #[arg(long, default_value = "1.x", value_parser = parse_auth_mode)]
    pub auth_mode: AuthMode,
    /// How unknown methods are answered: 404 ("No handler for X") or -114.
    #[arg(long, default_value = "404", value_parser = parse_unknown_method, allow_hyphen_values = true)]
    pub unknown_method: UnknownMethod,
    /// How long the device is gone after a reboot.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub boot_time: Duration,
    /// How long a digest nonce is good for (firmware: 1h); shorter lets a client meet a stale one.
    #[arg(long, default_value = "1h", value_parser = parse_nonce_lifetime)]
    pub nonce_lifetime: Duration,
    /// A state key at start (hilbench list shows them); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = key_number)]
    pub set: Vec<(String, f64)>,
    /// Serve RPC over BLE GATT too: on a virtual air of its own unless --bus or --adapter says where.
    #[arg(long)]
    pub ble: bool,
    #[command(flatten)]
    pub place: crate::cli::ble_place::BlePlaceArgs,
    /// BLE field fault: RX-ctl reports the answer's length off by this many bytes.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub ble_length_skew: i64,
    /// BLE field fault: the first N data reads of each answer return no bytes.
    #[arg(long, default_value_t = 0)]
    pub ble_empty_reads: u32,
    /// HTTP status for an RPC error code: CODE=STATUS (e.g. -103=500), over the defaults
    /// (400 for -103, 404 for -105 and 404, 503 for -109, 401, 429; 500 otherwise).
    #[arg(long = "http-status", value_name = "CODE=STATUS", value_parser = code_status, allow_hyphen_values = true)]
    pub http_status: Vec<(i64, u16)>,
    /// Serve this many devices: device i on the --http address's last octet + i, the same
    /// port (127.0.0.1:80, 127.0.0.2:80, … for clients that take an IP only), MAC + i.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
}

/// How the device appears on BLE: its name and Shelly's manufacturer data.
fn ble_side(probe: &ShellyDevice, adapter: &str, length_skew: i64, empty_reads: u32) -> ShellyBle {
    ShellyBle {
        adapter: adapter.to_string(),
        local_name: probe.host_name(),
        manufacturer_data: manufacturer_data(ble_mac(probe.mac()), probe.spec().ble_model_id, probe.auth_enabled()),
        length_skew,
        empty_reads,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn sim_main(a: ShellySimArgs) -> i32 {
    crate::cli::sim::exit_code(sim(a))
}

/// The most devices one `sim` serves.
const MAX_SIM_DEVICES: usize = 1000;

/// Device `i`'s address: the IPv4 address's last octet plus `i`, the same port
/// (127.0.0.1:80, 127.0.0.2:80, … for clients that cannot choose a port).
fn nth_addr(base: SocketAddr, i: usize) -> Result<SocketAddr, String> {
    let SocketAddr::V4(v4) = base else {
        return Err("--count needs an IPv4 --http address (device i gets its last octet + i)".into());
    };
    let last = usize::from(v4.ip().octets()[3]) + i;
    if last > 254 {
        return Err(format!("--count {}: {} + {i} runs past the last address of the /24", i + 1, v4.ip()));
    }
    let o = v4.ip().octets();
    Ok(SocketAddr::from(([o[0], o[1], o[2], last as u8], v4.port())))
}

/// The MAC of device `i`: the given one plus `i`.
fn nth_mac(mac: &str, i: usize) -> Result<String, String> {
    let m = crate::device::shelly_core::models::normalize_mac(mac)?;
    let n = u64::from_str_radix(&m, 16).map_err(|e| e.to_string())?.wrapping_add(i as u64) & 0xFFFF_FFFF_FFFF;
    Ok(format!("{n:012X}"))
}

fn sim(a: ShellySimArgs) -> Result<(), String> {
    if a.count == 0 || a.count > MAX_SIM_DEVICES {
        return Err(format!("--count must be 1 to {MAX_SIM_DEVICES}"));
    }
    if a.count > 1 && a.ble {
        return Err("--ble serves one device: give --count 1".into());
    }
    if !a.ble && (a.place.given() || a.ble_length_skew != 0 || a.ble_empty_reads != 0) {
        return Err("--mtu, --bus, --adapter and the --ble-… faults are BLE options: give --ble too".into());
    }
    let mut devices = Vec::new();
    for i in 0..a.count {
        let config = ShellyConfig {
            model: a.model.clone(),
            mac: a.mac.as_deref().map(|m| nth_mac(m, i)).transpose()?,
            name: a.name.clone(),
            password: a.password.clone(),
            auth_mode: a.auth_mode,
            unknown_method: a.unknown_method,
            unix_at_zero: unix_now(),
            seed: i as u64 + 1,
            boot_time: a.boot_time,
            nonce_lifetime: a.nonce_lifetime,
            http_status: checked_statuses(a.http_status.iter().copied())?,
        };
        devices.push((config, nth_addr(a.http, i).or_else(|e| if a.count == 1 { Ok(a.http) } else { Err(e) })?));
    }
    // Every --set is checked on a throwaway device before anything binds.
    let mut probe = ShellyDevice::new(devices[0].0.clone())?;
    for (k, v) in &a.set {
        probe.set_state(k, *v, Duration::ZERO).map_err(|e| format!("--set {k}: {e}"))?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async move {
        let placement = match a.ble {
            true => Some(crate::cli::ble_place::BlePlacement::place(&a.place, 1).await?),
            false => None,
        };
        let mut servers = Vec::new();
        for (config, http) in devices {
            let ble = placement.as_ref().map(|p| ble_side(&probe, p.adapter(), a.ble_length_skew, a.ble_empty_reads));
            match shelly_host::serve(config, ShellyEndpoints { http, seed: 0, frame_limit: Some(SIM_FRAMES_KEPT), link_name: None, ble, connection_faults: None }).await {
                Ok(s) => servers.push(s),
                Err(e) => {
                    for s in servers {
                        s.shutdown().await;
                    }
                    if let Some(p) = placement {
                        p.release().await;
                    }
                    return Err(e);
                }
            }
        }
        for server in &servers {
            for (k, v) in &a.set {
                server.set(k, *v).await?;
            }
        }
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        for server in &servers {
            let mut rx = server.subscribe();
            let (tx, id) = (events_tx.clone(), server.id().to_string());
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(e) => {
                            if tx.send((id.clone(), e)).is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => tracing::warn!("{id}: {n} events not printed"),
                        Err(_) => return,
                    }
                }
            });
        }
        let signal = crate::cli::sim::wait_for_signal();
        let described: Vec<serde_json::Value> = servers
            .iter()
            .map(|server| {
                let addr = server.http_addr();
                let mut endpoints = serde_json::json!({"http": format!("http://{addr}"), "ws": format!("ws://{addr}/rpc")});
                if let (Some(p), Some(address)) = (&placement, server.ble_address()) {
                    endpoints["ble"] = serde_json::json!({"address": address, "dbus_system_bus_address": p.bus()});
                }
                serde_json::json!({"id": server.id(), "endpoints": endpoints})
            })
            .collect();
        let ready = match described.as_slice() {
            [one] => serde_json::json!({"ready": true, "kind": "shelly", "model": a.model, "id": one["id"], "endpoints": one["endpoints"]}),
            many => serde_json::json!({"ready": true, "kind": "shelly", "model": a.model, "devices": many}),
        };
        println!("{ready}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::pin!(signal);
        let several = servers.len() > 1;
        loop {
            tokio::select! {
                _ = &mut signal => break,
                ev = events.recv() => match ev {
                    Some((_, ShellyEvent::Call { method, code })) => tracing::debug!("{method}: {code}"),
                    Some((_, ShellyEvent::Notify { method })) => tracing::debug!("sent {method}"),
                    Some((id, e)) => {
                        let mut line = serde_json::to_value(&e).unwrap_or_default();
                        if several {
                            line["id"] = serde_json::Value::from(id);
                        }
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{line}").and_then(|_| out.flush());
                    }
                    None => break,
                },
            }
        }
        for server in servers {
            server.shutdown().await;
        }
        if let Some(p) = placement {
            p.release().await;
        }
        Ok(())
    })
}

/// `hilbench validate shelly --help` after the options.
pub const VALIDATE_HELP: &str = "Checks what Home Assistant's aioshelly needs and what firmware does:
GET /shelly (mac, gen, fw_id with a date new enough, id, model, auth_en), then over
ws://HOST/rpc: frame fields (id echoed, src the device id, dst ours), GetDeviceInfo open
without auth, the 401 digest challenge (a JSON message: digest, SHA-256, the realm) and a
digest answer (--password), GetConfig's sys.device.name, GetStatus's sys, GetComponents
{dynamic_only} paged to its total, ListMethods covering every component, 404 \"No handler
for\" for an unknown method (-114 is a warning), -103 for a missing id, and, unless
--read-only, the NotifyStatus a Switch.Set sends (the switch is set back). With --ble ADDRESS instead,
over BLE GATT as aioshelly's BleRPC: the advertisement (Shelly's manufacturer data with the
RPC flag, MAC and model), the RPC service's data, TX-ctl and RX-ctl characteristics,
GetDeviceInfo in one long write and in 20-byte writes, answers read in MTU-2 pieces,
TX-ctl dropping a half-written frame, a write past the length refused, the unknown-method
error. Exits 0 when no check fails, 1 when one does, 2 on bad arguments.

Examples:
  hilbench validate shelly --http 192.168.1.40 --password secret --read-only
  # against the simulator (any free port):
  hilbench sim shelly --http 127.0.0.1:0 --password secret --auth-mode 2.0 > shelly.json & sim=$!
  until [ -s shelly.json ] || ! kill -0 $sim; do sleep 0.1; done
  hilbench validate shelly --http $(jq -r .endpoints.http shelly.json) --password secret
  kill $sim";

#[derive(Args, Debug)]
pub struct ShellyValidateArgs {
    /// The device: HOST, HOST:PORT or http://HOST[:PORT] (port 80 when not given).
    #[arg(long, value_name = "URL", required_unless_present = "ble", conflicts_with = "ble")]
    pub http: Option<String>,
    /// The device over BLE GATT instead, by its BLE address (its RPC service, as aioshelly's BleRPC).
    #[arg(long, value_name = "ADDRESS")]
    pub ble: Option<String>,
    /// The BlueZ adapter the BLE checks use.
    #[arg(long, requires = "ble", default_value = "hci0")]
    pub adapter: String,
    /// The device's password (user admin), when auth is on (HTTP and WebSocket: RPC over
    /// BLE carries no auth, so --ble refuses it rather than ignore it).
    #[arg(long, conflicts_with = "ble")]
    pub password: Option<String>,
    /// Change nothing (no switch is toggled for the notification check).
    #[arg(long)]
    pub read_only: bool,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `host:port` from `--http`.
fn http_target(s: &str) -> Result<String, String> {
    let rest = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || s.starts_with("https://") {
        return Err(format!("--http {s}: give HOST, HOST:PORT or http://HOST[:PORT]"));
    }
    Ok(if rest.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) { rest.to_string() } else { format!("{rest}:80") })
}

fn validate_main(a: ShellyValidateArgs) -> i32 {
    use crate::client::shelly_validate::{self, ShellyTarget};
    let http = match a.http.as_deref().map(http_target).transpose() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start a runtime: {e}");
            return 2;
        }
    };
    let report = match (http, &a.ble) {
        (Some(host), _) => rt.block_on(shelly_validate::validate(&ShellyTarget { host, password: a.password, read_only: a.read_only })),
        (None, Some(address)) => rt.block_on(shelly_validate::validate_ble(address, Some(&a.adapter))),
        (None, None) => {
            eprintln!("error: give --http URL or --ble ADDRESS");
            return 2;
        }
    };
    if a.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")));
    } else {
        print!("{}", shelly_validate::render(&report));
    }
    i32::from(!report.passed())
}

/// Frames `sim` keeps for the record (the bound keeps memory flat).
const SIM_FRAMES_KEPT: usize = 10_000;

/// Its scenario keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellyKeys {
    pub name: String,
    /// The model (`plus1pm`, `plus2pm-cover`, `pro3em-triphase`, …).
    #[serde(default = "default_model")]
    pub model: String,
    /// HTTP and WebSocket address (default 127.0.0.1:0, any free port).
    #[serde(default)]
    pub http: Option<SocketAddr>,
    #[serde(default)]
    pub mac: Option<String>,
    /// sys.device.name.
    #[serde(default)]
    pub device_name: Option<String>,
    /// Authentication on, with this password (user admin).
    #[serde(default)]
    pub password: Option<String>,
    /// `1.x` (default) or `2.0` nonce rules.
    #[serde(default)]
    pub auth_mode: Option<String>,
    /// `404` (default) or `-114`.
    #[serde(default)]
    pub unknown_method: Option<String>,
    #[serde(default)]
    pub boot_time: Option<Dur>,
    /// How long a digest nonce is good for (firmware: an hour), so a
    /// scenario can make one go stale.
    #[serde(default)]
    pub nonce_lifetime: Option<Dur>,
    /// State keys at start.
    #[serde(default)]
    pub state: BTreeMap<String, f64>,
    /// Serve RPC over BLE GATT on the virtual air too (link `NAME.ble`).
    #[serde(default)]
    pub ble: bool,
    /// BLE: the ATT MTU centrals get (23..=517; default 23).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// BLE: the RSSI centrals hear it at, in dBm.
    #[serde(default)]
    pub rssi: Option<i16>,
    /// BLE field fault: RX-ctl reports the answer's length off by this much.
    #[serde(default)]
    pub ble_length_skew: i64,
    /// BLE field fault: the first N data reads of each answer return nothing.
    #[serde(default)]
    pub ble_empty_reads: u32,
    /// HTTP status per RPC error code (`{ -103: 500 }`), over the defaults.
    #[serde(default)]
    pub http_status: BTreeMap<i64, u16>,
}

fn default_model() -> String {
    "plus1pm".into()
}

impl ShellyKeys {
    fn config(&self, seed: u64) -> Result<ShellyConfig, String> {
        Ok(ShellyConfig {
            model: self.model.clone(),
            mac: self.mac.clone(),
            name: self.device_name.clone(),
            password: self.password.clone(),
            auth_mode: self.auth_mode.as_deref().map(parse_auth_mode).transpose()?.unwrap_or(AuthMode::V1),
            unknown_method: self.unknown_method.as_deref().map(parse_unknown_method).transpose()?.unwrap_or_default(),
            unix_at_zero: unix_now(),
            seed,
            boot_time: self.boot_time.map_or(Duration::from_secs(2), |d| d.0),
            nonce_lifetime: self.nonce_lifetime.map_or(Ok(NONCE_LIFETIME), |d| checked_nonce_lifetime(d.0))?,
            http_status: checked_statuses(self.http_status.iter().map(|(c, s)| (*c, *s)))?,
        })
    }

    /// A throwaway device, to check keys against the model.
    fn probe(&self) -> Result<ShellyDevice, Problem> {
        let config = self.config(1).map_err(Problem::here)?;
        ShellyDevice::new(config).map_err(|e| if e.contains("model") { at_key("model", e) } else { Problem::here(e) })
    }
}

/// What a Shelly capture shows of its device: the device info, the first full status
/// (GetStatus's answer; GetConfig's has the components too, but no uptime), and the
/// nonce of a digest challenge (numbers are 1.x's, text 2.0's).
struct ShellyCaptured {
    name: String,
    info: Option<serde_json::Value>,
    status: serde_json::Value,
    challenge_nonce: Option<serde_json::Value>,
}

impl ShellyCaptured {
    fn of(devices: &[crate::link::recognise::CapturedDevice]) -> Result<ShellyCaptured, String> {
        use crate::link::record::Direction;
        let d = devices.first().ok_or("no captured device")?;
        let bodies = d.frames.iter().filter(|(dir, _)| *dir == Direction::Response).filter_map(|(_, b)| {
            let body = crate::protocol::http_message::response_parts(b).map_or(&b[..], |(_, _, body)| body);
            serde_json::from_slice::<serde_json::Value>(body).ok()
        });
        let (mut info, mut status, mut challenge_nonce) = (None, None, None);
        for v in bodies {
            let body = if v.get("result").is_some() { &v["result"] } else { &v };
            if info.is_none() && body["gen"].is_number() && body["mac"].is_string() && body["model"].is_string() {
                info = Some(body.clone());
            }
            if status.is_none() && body["sys"]["uptime"].is_number() && body.as_object().is_some_and(|o| o.keys().any(|k| k.contains(':'))) {
                status = Some(body.clone());
            }
            let message = if v["error"]["code"] == 401 { v["error"]["message"].as_str() } else if v["code"] == 401 { v["message"].as_str() } else { None };
            if let Some(c) = message.and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok()) {
                challenge_nonce.get_or_insert(c["nonce"].clone());
            }
        }
        let status = status.ok_or("the capture holds no Shelly.GetStatus answer a client could check")?;
        Ok(ShellyCaptured { name: d.name.clone(), info, status, challenge_nonce })
    }

    /// A shelly-client on the device, with a password when the capture was challenged
    /// (a replay takes any; a simulated device in the captured state gets the same).
    fn client_entry(&self) -> String {
        let password = if self.challenge_nonce.is_some() { ", password: captured" } else { "" };
        format!("{{ name: client, kind: shelly-client, device: {}, interval: 200ms{password} }}", quoted(&self.name))
    }

    /// Steps: the readings and flags of the captured status a client can check.
    fn steps(&self) -> Result<Vec<String>, String> {
        let r = crate::client::shelly_client::reading(&self.status)?;
        let wanted = |k: &str| ["_output", "_apower", "_current_pos"].iter().any(|s| k.ends_with(s)) || (k.starts_with("input") && k.ends_with("_state"));
        let mut steps: Vec<String> = r.values.iter().filter(|(k, _)| wanted(k)).map(|(k, v)| format!("expect_reading: {{ client: client, field: {k}, equals: {v}, tolerance: 0.01, within: 5s }}")).collect();
        steps.extend(r.flags.iter().map(|f| format!("expect_flag: {{ client: client, flag: {}, within: 5s }}", quoted(f))));
        Ok(steps)
    }

    fn components(&self) -> String {
        self.status.as_object().map(|o| o.keys().filter(|k| k.contains(':')).cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default()
    }
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// A `shelly-client` on the first captured device, and the readings its first captured
/// `Shelly.GetStatus` answer gives (outputs, power, inputs, cover positions): a replay
/// answers the client's polls with the captured answers in turn.
fn shelly_capture_client(devices: &[crate::link::recognise::CapturedDevice]) -> Result<crate::link::recognise::CaptureClient, String> {
    let c = ShellyCaptured::of(devices)?;
    Ok(crate::link::recognise::CaptureClient {
        client: c.client_entry(),
        steps: c.steps()?,
        notes: vec![format!("A shelly-client polls Shelly.GetStatus as Home Assistant does and must read what the device answered in the field: {}", c.components())],
    })
}

/// A simulated shelly in the captured state (`capture import --as-state`): the model the
/// device info names (its profile from the status's components), its MAC and name, auth
/// with the captured mode when the capture was challenged, and each switch's relay, load
/// (the power it drew while on), temperature, each input and cover position; the same
/// client and steps as a replay's.
fn shelly_capture_model(devices: &[crate::link::recognise::CapturedDevice]) -> Result<super::CaptureModel, String> {
    let c = ShellyCaptured::of(devices)?;
    let info = c.info.as_ref().ok_or("the capture holds no device info (GET /shelly or Shelly.GetDeviceInfo) naming the model")?;
    let model_id = info["model"].as_str().unwrap_or_default();
    let has = |k: &str| c.status.get(k).is_some();
    let candidates: Vec<&shelly_core::models::ModelSpec> = MODELS.iter().filter(|m| m.description.contains(&format!("{model_id})")) || m.description.contains(&format!("{model_id},"))).collect();
    let model = candidates
        .iter()
        .find(|m| match m.name {
            n if n.ends_with("-cover") => has("cover:0"),
            n if n.ends_with("-switch") => !has("cover:0"),
            n if n.ends_with("-monophase") => has("em1:0"),
            n if n.ends_with("-triphase") => has("em:0"),
            _ => true,
        })
        .or(candidates.first())
        .ok_or_else(|| format!("model {model_id} is not one of the simulated models ({})", MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")))?;
    let mut keys = vec![format!("model: {}", model.name)];
    if let Some(mac) = info["mac"].as_str() {
        keys.push(format!("mac: {}", quoted(mac)));
    }
    if let Some(name) = info["name"].as_str() {
        keys.push(format!("device_name: {}", quoted(name)));
    }
    let mut seen = vec![format!("{} ({model_id}) at {}", model.name, c.components())];
    if let Some(nonce) = &c.challenge_nonce {
        let mode = if nonce.is_number() { "1.x" } else { "2.0" };
        keys.push(format!("password: captured, auth_mode: \"{mode}\""));
        seen.push(format!("digest auth ({mode} nonces; the password is not in a capture: `captured` on both sides)"));
    }
    let mut state = Vec::new();
    for (key, comp) in c.status.as_object().into_iter().flatten() {
        let Some((kind, n)) = key.split_once(':') else { continue };
        match kind {
            "switch" => {
                let on = comp["output"].as_bool() == Some(true);
                state.push(format!("switch{n}_on: {}", u8::from(on)));
                if let Some(w) = comp["apower"].as_f64().filter(|w| on && *w > 0.0) {
                    state.push(format!("switch{n}_load_w: {w}"));
                }
                if let Some(t) = comp["temperature"]["tC"].as_f64() {
                    state.push(format!("switch{n}_temperature_c: {t}"));
                }
            }
            "input" => state.extend(comp["state"].as_bool().map(|b| format!("input{n}: {}", u8::from(b)))),
            "cover" => state.extend(comp["current_pos"].as_f64().map(|p| format!("cover{n}_pos: {p}"))),
            _ => {}
        }
    }
    if !state.is_empty() {
        keys.push(format!("state: {{ {} }}", state.join(", ")));
    }
    let entry = format!("{{ name: {}, kind: shelly, {} }}", quoted(&c.name), keys.join(", "));
    Ok(super::CaptureModel {
        devices: vec![entry],
        client: crate::link::recognise::CaptureClient { client: c.client_entry(), steps: c.steps()?, notes: vec![format!("{}: {}", c.name, seen.join("; "))] },
    })
}

/// Gen2+ over HTTP: `GET /shelly`, `/rpc/<Method>`, `POST /rpc`, and answers whose body is
/// the device info, a result or an error object. Decisive for the device info and for a
/// request on Shelly's paths.
fn recognise_http(bytes: &[u8]) -> Option<crate::link::recognise::FrameVerdict> {
    use crate::protocol::http_message;
    let verdict = |decisive, meaning: String| Some(crate::link::recognise::FrameVerdict { decisive, meaning, unit: None });
    if let Some((method, target, body)) = http_message::request_parts(bytes) {
        let path = target.split('?').next().unwrap_or_default();
        return match path.strip_prefix("/rpc") {
            _ if path == "/shelly" => verdict(true, format!("{method} /shelly (device info)")),
            Some(m) if m.len() > 1 && m[1..].contains('.') => verdict(true, format!("call {} over HTTP", &m[1..])),
            Some("") if method == "POST" => match crate::protocol::shelly::decode_frame(body).ok()? {
                crate::protocol::shelly::RpcFrame::Call(c) => verdict(true, format!("call {} over HTTP POST /rpc", c.method)),
                crate::protocol::shelly::RpcFrame::Response(_) => None,
            },
            _ => None,
        };
    }
    let (status, _, body) = http_message::response_parts(bytes)?;
    let serde_json::Value::Object(m) = serde_json::from_slice::<serde_json::Value>(body).ok()? else { return None };
    if m.contains_key("gen") && m.contains_key("mac") {
        return verdict(true, format!("{status} device info {}", m.get("model").and_then(|v| v.as_str()).unwrap_or_default()));
    }
    match (m.get("code"), m.get("message")) {
        (Some(code), Some(_)) => verdict(false, format!("{status} error {code}")),
        _ => verdict(false, format!("{status} result")),
    }
}

impl Kind for ShellyKind {
    fn name(&self) -> &'static str {
        "shelly"
    }
    fn role(&self) -> Role {
        Role::Device
    }
    fn about(&self) -> &'static str {
        "Shelly Gen2/Gen3/Gen4 device (Plus 1PM, Plus 2PM, Pro 3EM, Plus Plug S, 1PM Gen3/Gen4) over HTTP and WebSocket RPC, digest auth, notifications, relay/cover/meter models, reboots"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<ShellyKeys>(entry)?))
    }
    /// A call matches a captured one whatever its `id` and `src` (each client picks its
    /// own); the captured answer then carries the live call's `id`, and its `src` as
    /// `dst`. An answer already right is sent byte for byte.
    fn replay_rule(&self) -> Option<crate::link::recognise::ReplayRule> {
        Some(crate::link::recognise::ReplayRule {
            key: |b| match serde_json::from_slice::<serde_json::Value>(b) {
                Ok(serde_json::Value::Object(mut m)) => {
                    // A digest answer's cnonce is new each run, and `dst` is optional: a call
                    // matches with or without either.
                    m.remove("id");
                    m.remove("src");
                    m.remove("dst");
                    m.remove("auth");
                    serde_json::to_vec(&m).unwrap_or_else(|_| b.to_vec())
                }
                _ => b.to_vec(),
            },
            answer: |req, ans| {
                let (Ok(serde_json::Value::Object(q)), Ok(serde_json::Value::Object(mut a))) = (serde_json::from_slice::<serde_json::Value>(req), serde_json::from_slice::<serde_json::Value>(ans)) else { return };
                let mut changed = false;
                for (from, to) in [("id", "id"), ("src", "dst")] {
                    if let (Some(v), Some(slot)) = (q.get(from), a.get_mut(to)) {
                        if slot != v {
                            *slot = v.clone();
                            changed = true;
                        }
                    }
                }
                if changed {
                    if let Ok(bytes) = serde_json::to_vec(&a) {
                        *ans = bytes;
                    }
                }
            },
        })
    }
    /// Gen2+ JSON-RPC over a WebSocket: calls with a `Component.Method` name, answers
    /// with an `id` and a result or error, notifications (`NotifyStatus`…). Decisive when
    /// the frame carries Shelly's `src`/`dst` addressing.
    fn capture_client(&self, _port: Option<&str>, devices: &[crate::link::recognise::CapturedDevice]) -> Result<crate::link::recognise::CaptureClient, String> {
        shelly_capture_client(devices)
    }
    fn capture_model(&self, _port: Option<&str>, devices: &[crate::link::recognise::CapturedDevice]) -> Result<super::CaptureModel, String> {
        shelly_capture_model(devices)
    }
    fn tcp_service(&self) -> Option<&'static [&'static str]> {
        Some(&[super::shelly_client::SHELLY_RPC])
    }
    fn recognise(&self, f: &crate::link::recognise::CapturedFrameView<'_>) -> Option<crate::link::recognise::FrameVerdict> {
        use crate::protocol::shelly::{self, RpcFrame};
        if f.transport == crate::link::recognise::CaptureTransport::Http {
            return recognise_http(f.bytes);
        }
        if f.transport != crate::link::recognise::CaptureTransport::WebSocket {
            return None;
        }
        let id = |id: &Option<shelly::RpcId>| id.as_ref().map_or(String::new(), |i| format!(" id={}", serde_json::to_string(i).unwrap_or_default()));
        let (addressed, meaning) = match shelly::decode_frame(f.bytes).ok()? {
            RpcFrame::Call(c) => {
                if !c.method.contains('.') && !c.method.starts_with("Notify") {
                    return None;
                }
                let what = if c.id.is_some() { "call" } else { "notification" };
                (c.src.is_some() || c.dst.is_some(), format!("{what} {}{}", c.method, id(&c.id)))
            }
            RpcFrame::Response(r) => {
                let outcome = match &r.outcome {
                    Ok(_) => "result".to_string(),
                    Err(e) => format!("error {} {:?}", e.code, e.message),
                };
                (r.src.is_some() || r.dst.is_some(), format!("{outcome}{}", id(&r.id)))
            }
        };
        Some(crate::link::recognise::FrameVerdict { decisive: addressed, meaning, unit: None })
    }
    fn list(&self) -> Vec<super::ListSection> {
        vec![
            super::ListSection { title: "Shelly models (shelly `model`, sim --model)".into(), rows: MODELS.iter().map(|m| (m.name.to_string(), m.description.to_string())).collect() },
            super::ListSection { title: "Shelly state keys (set steps, sim --set)".into(), rows: STATE_KEYS.iter().map(|(k, d)| (k.to_string(), d.to_string())).collect() },
        ]
    }
    fn sim(&self) -> Option<super::KindCommand> {
        Some(super::KindCommand {
            command: || super::subcommand::<ShellySimArgs>("shelly", "Shelly Gen2+ device over HTTP, WebSocket and BLE RPC.", SIM_HELP),
            run: |m| super::run_parsed(m, sim_main),
        })
    }
    fn validate(&self) -> Option<super::KindCommand> {
        Some(super::KindCommand {
            command: || super::subcommand::<ShellyValidateArgs>("shelly", "A Shelly Gen2+ device over HTTP and WebSocket: identity, frames, error forms, digest auth, components, notifications.", VALIDATE_HELP),
            run: |m| super::run_parsed(m, validate_main),
        })
    }
}

impl Declared for ShellyKeys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "shelly"
    }
    fn check(&self, _names: &Names<'_>) -> Result<(), Problem> {
        if let Some(m) = &self.auth_mode {
            parse_auth_mode(m).map_err(|e| at_key("auth_mode", e))?;
        }
        if let Some(m) = &self.unknown_method {
            parse_unknown_method(m).map_err(|e| at_key("unknown_method", e))?;
        }
        if let Some(d) = &self.nonce_lifetime {
            checked_nonce_lifetime(d.0).map_err(|e| at_key("nonce_lifetime", e))?;
        }
        if let Some(m) = &self.mac {
            shelly_core::models::normalize_mac(m).map_err(|e| at_key("mac", e))?;
        }
        if !self.ble && (self.mtu.is_some() || self.rssi.is_some() || self.ble_length_skew != 0 || self.ble_empty_reads != 0) {
            return Err(at_key("ble", "BLE keys (mtu, rssi, ble_length_skew, ble_empty_reads) need `ble: true`"));
        }
        ble::check_link_settings(self.mtu, self.rssi)?;
        let mut probe = self.probe()?;
        for (k, v) in &self.state {
            probe.set_state(k, *v, Duration::ZERO).map_err(|e| at_key("state", format!("{k}: {e}")))?;
        }
        Ok(())
    }
    fn check_step(&self, step: &str, body: &yaml_serde::Value, _names: &Names<'_>) -> Result<(), Problem> {
        match step {
            "ble" if self.ble => ble::check_step(body),
            "ble" => Err(Problem::here(format!("`{}` is not on BLE: give it `ble: true`", self.name))),
            _ => Err(Problem::here(format!("a shelly takes no `{step}` step"))),
        }
    }
    fn on_air(&self) -> bool {
        self.ble
    }
    fn serves(&self) -> &'static [&'static str] {
        &[super::shelly_client::SHELLY_RPC]
    }
    fn check_state_key(&self, key: &str) -> Result<(), String> {
        // Against the model: unknown keys and components it lacks are refused.
        let mut probe = self.probe().map_err(|p| p.message)?;
        let value = if key.ends_with("_event") { 1.0 } else { 0.0 };
        probe.set_state(key, value, Duration::ZERO)
    }
    /// Its WebSocket messages, both ways, are the link `NAME`.
    /// With `ble`, its BLE link (ATT writes, reads, notifications) is `NAME.ble`.
    fn links(&self) -> Vec<super::LinkDecl> {
        let mut links = vec![super::LinkDecl { name: self.name.clone(), home: super::LinkHomeDecl::Own, capture: None, checksum: None, carries: "Shelly RPC over HTTP and WebSocket", medium: LinkMedium::WebSocket }];
        if self.ble {
            links.push(super::LinkDecl {
                name: ble::link_name(&self.name),
                home: super::LinkHomeDecl::Own,
                capture: Some(crate::link::capture::CaptureFormat::BleAtt),
                checksum: None,
                carries: "Shelly RPC in BLE writes and reads",
                medium: LinkMedium::Gatt,
            });
        }
        links
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let config = self.config(cx.seed).map_err(|e| format!("`{}`: {e}", self.name))?;
            let http = self.http.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            let probe = ShellyDevice::new(config.clone()).map_err(|e| format!("`{}`: {e}", self.name))?;
            let air = match self.ble {
                true => Some(AirLink::lend(self.mtu, self.rssi).await?),
                false => None,
            };
            let ble = air.as_ref().map(|a| ble_side(&probe, a.adapter(), self.ble_length_skew, self.ble_empty_reads));
            // The pump copies every byte: only a device whose link gets faults has one.
            let connection_faults = cx.faulted_links.contains(&self.name).then(|| ConnFaults::new(self.name.clone(), cx.seed));
            let endpoints = ShellyEndpoints { http, seed: cx.seed, frame_limit: None, link_name: Some(self.name.clone()), ble, connection_faults };
            let handle = match shelly_host::serve(config, endpoints).await {
                Ok(h) => h,
                Err(e) => {
                    if let Some(a) = air {
                        a.give_back().await;
                    }
                    return Err(format!("`{}`: {e}", self.name));
                }
            };
            for (k, v) in &self.state {
                handle.set(k, *v).await.map_err(|e| format!("`{}` state {k}: {e}", self.name))?;
            }
            let events = super::forward_events(handle.subscribe(), cx.log.clone(), self.name.clone(), |event, detail| ObservationKind::Shelly { event, detail });
            Ok(Box::new(RunningShelly { name: self.name.clone(), handle: Some(handle), events: Some(events), air }) as Box<dyn Running>)
        })
    }
}

struct RunningShelly {
    name: String,
    handle: Option<ShellyHandle>,
    events: Option<tokio::task::JoinHandle<()>>,
    /// Its place on the virtual air, when served on BLE.
    air: Option<AirLink>,
}

impl RunningShelly {
    fn handle(&self) -> Result<&ShellyHandle, String> {
        self.handle.as_ref().ok_or_else(|| format!("`{}` has stopped", self.name))
    }

    /// The air link when `link` names it (`NAME.ble`).
    fn air_link(&self, link: &str) -> Option<&AirLink> {
        AirLink::named(self.air.as_ref(), &self.name, link)
    }

    fn own_link(&self, link: &str) -> Result<&ShellyHandle, String> {
        if link != self.name {
            return Err(format!("`{}` has no link `{link}`", self.name));
        }
        self.handle()
    }
}

impl Running for RunningShelly {
    fn vars(&self) -> Vec<(String, String)> {
        let Some(h) = &self.handle else { return Vec::new() };
        let a = h.http_addr();
        let mut vars = vec![
            (format!("http.{}", self.name), format!("http://{a}")),
            (format!("ws.{}", self.name), format!("ws://{a}/rpc")),
            (format!("host.{}", self.name), a.to_string()),
            (format!("port.{}", self.name), a.port().to_string()),
        ];
        if let (Some(address), Some(air)) = (h.ble_address(), &self.air) {
            vars.push((format!("ble.{}", self.name), address.to_string()));
            vars.extend(air.vars());
        }
        vars
    }
    fn step<'a>(&'a mut self, step: &'a str, body: &'a yaml_serde::Value, _cx: super::StepContext<'a>) -> LocalBoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            match (step, &self.air) {
                ("ble", Some(air)) => air.apply(body).await,
                ("ble", None) => Err(format!("`{}` is not on BLE", self.name)),
                _ => Err(format!("no `{step}` step here")),
            }
        })
    }
    fn set<'a>(&'a self, key: &'a str, value: f64) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.handle()?.set(key, value).await })
    }
    fn add_fault<'a>(&'a self, link: &'a str, rule: FaultRule) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if let Some(air) = self.air_link(link) {
                return air.add_fault(rule).await;
            }
            self.own_link(link)?.add_fault(rule)
        })
    }
    fn clear_faults<'a>(&'a self, link: &'a str, name: Option<&'a str>) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if let Some(air) = self.air_link(link) {
                return air.clear_faults(link, name).await;
            }
            match self.own_link(link)?.clear_faults(name) {
                true => Ok(()),
                false => Err(format!("no fault named `{}` on `{link}`", name.unwrap_or_default())),
            }
        })
    }
    fn frames(&self) -> LocalBoxFuture<'_, Vec<FrameRecord>> {
        Box::pin(async move {
            let mut frames = self.handle.as_ref().map(ShellyHandle::frames).unwrap_or_default();
            if let Some(air) = &self.air {
                frames.extend(air.frames(&ble::link_name(&self.name)).await);
            }
            frames
        })
    }
    fn capture<'a>(&'a self, link: &'a str) -> LocalBoxFuture<'a, Vec<FrameRecord>> {
        Box::pin(async move {
            match self.air_link(link) {
                Some(air) => air.att_frames(link).await,
                None => self.frames().await.into_iter().filter(|f| f.link == link).collect(),
            }
        })
    }
    fn stop(mut self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            if let Some(h) = self.handle.take() {
                h.shutdown().await;
            }
            if let Some(t) = self.events.take() {
                let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
            }
            if let Some(air) = self.air.take() {
                air.give_back().await;
            }
        })
    }
}
