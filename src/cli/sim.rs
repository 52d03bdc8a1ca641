//! `hilbench sim KIND`: serve simulated devices until SIGINT/SIGTERM.
//!
//! The contract every device kind follows: when serving, print exactly one
//! JSON line on stdout (`{"ready":true,"kind":…,"endpoints":{…}}`); on
//! SIGINT/SIGTERM, clean up (symlinks, PTYs) and exit 0. Errors go to
//! stderr with a non-zero exit and nothing left behind.

use std::path::PathBuf;
use std::time::Instant;

use actix::Actor;
use clap::Args;

use crate::device::eg4::Eg4PackActor;
use crate::device::eg4_core::{Eg4Pack, Eg4Protocol, Eg4Quirk};
use crate::model::PackConfig;
use crate::observe::ObservationLog;
use crate::protocol::eg4::RegisterProfile;
use crate::transport::bus::{AttachDevice, BusActor, BusConfig, BusDevice, BusPortSpec};

/// `hilbench sim eg4-lp4 --help` after the options.
pub const EG4_SIM_HELP: &str = "State keys for --set (KEY=VALUE):
  address          Modbus address (DIP switches), 1..=247 (only with one --address)
  soc              state of charge, % (0..100)
  soh              state of health, % (1..100)
  current_a        pack current, A (+ = charging)
  temp_c           all NTC temperatures, °C;  tempN_c: NTC N
  mos_temp_c       MOSFET/PCB temperature, °C
  cell_mv          every cell's voltage, mV;  cellN_mv: cell N (1-based)
  cycles           cycle count
  capacity_ah      nominal capacity, Ah
  charge_fet, discharge_fet   commanded FETs (0/1)
  (`hilbench list` shows every key with its range.)

Examples:
  # two packs on one bus (multi-drop), at addresses 1 and 2
  hilbench sim eg4-lp4 --tty /tmp/eg4 --address 1 --address 2 --set soc=55
  # one PTY per pack
  hilbench sim eg4-lp4 --tty /tmp/eg4-a --tty /tmp/eg4-b --address 1 --address 2
  # legacy 7E/0D protocol with 9600-baud wire timing
  hilbench sim eg4-lp4 --tty /tmp/eg4 --protocol legacy --wire-time
  # 1000 packs, one PTY each, for scale tests
  mkdir -p /tmp/packs && hilbench sim eg4-lp4 --packs 1000 --tty-dir /tmp/packs

Then poll it, e.g. with mbpoll:  mbpoll -m rtu -b 9600 -P none -a 1 -r 1 -c 47 /tmp/eg4";

/// `hilbench sim bsc-hub --help` after the options.
pub const BSC_HUB_SIM_HELP: &str = "Examples:
  # TLS 1.3, client certificates from the test CA required
  hilbench pki --out pki && hilbench sim bsc-hub --listen 127.0.0.1:4443 --tls-dir pki
  # a vendor's node certificates lack the clientAuth extended key usage
  hilbench sim bsc-hub --listen 127.0.0.1:4443 --tls-dir pki --allow-client-cert-without-eku
  # plaintext ws:// on a free port (see the ready line for the URL)
  hilbench sim bsc-hub --listen 127.0.0.1:0 --plaintext
  # a failover hub with short timers for tests
  hilbench sim bsc-hub --listen 127.0.0.1:4444 --plaintext --role failover --heartbeat-timeout 5s

Prints one JSON line when listening:
  {\"ready\":true,\"kind\":\"bsc-hub\",\"url\":\"wss://127.0.0.1:4443\",\"role\":\"primary\",…}
then serves until SIGINT/SIGTERM and prints its counters as JSON on stderr.
Logs (connects, NAKs, refusals, slow consumers): RUST_LOG=hilbench=info";

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("security").required(true).args(["plaintext", "tls_dir"])))]
pub struct BscHubSimArgs {
    /// Address to listen on (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// Serve ws:// without TLS.
    #[arg(long)]
    pub plaintext: bool,
    /// Serve wss:// with ca.pem, hub.pem and hub.key from this directory (`hilbench pki`).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Accept client certificates whose extended key usage lacks clientAuth
    /// (some vendors' node certificates); by default they are refused.
    #[arg(long, requires = "tls_dir")]
    pub allow_client_cert_without_eku: bool,
    /// Do not bind a node's identity to its client certificate. By default a
    /// Connect-Request must name the Device UUID in the certificate's
    /// urn:uuid SAN (if it has one), and only the same device may replace a
    /// connection.
    #[arg(long, requires = "tls_dir")]
    pub no_cert_binding: bool,
    /// Hub status in Advertisements.
    #[arg(long, default_value = "primary", value_parser = ["primary", "failover"])]
    pub role: String,
    /// WebSockets open at once (more get HTTP 503).
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// TLS/WebSocket handshakes in progress at once (more are closed at once).
    #[arg(long, default_value_t = 64)]
    pub max_handshakes: usize,
    /// Handshakes one source address may hold once fewer than
    /// --reserved-handshakes slots are free, or after one of its handshakes timed out.
    #[arg(long, default_value_t = 8)]
    pub max_handshakes_per_source: usize,
    /// Handshake slots kept for sources within their share.
    #[arg(long, default_value_t = 16)]
    pub reserved_handshakes: usize,
    /// Time from TCP accept to the first byte (ClientHello or HTTP request).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub first_byte_timeout: std::time::Duration,
    /// Frames queued per receiver before its frames are dropped.
    #[arg(long, default_value_t = 1024)]
    pub queue_depth: usize,
    /// Largest WebSocket message accepted, bytes.
    #[arg(long, default_value_t = 8192)]
    pub max_message: usize,
    /// MaxBVLC advertised and enforced.
    #[arg(long, default_value_t = 1600)]
    pub max_bvlc: u16,
    /// Silence after which a node is dropped is twice this.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: std::time::Duration,
    /// Time a new WebSocket has to send Connect-Request.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_wait: std::time::Duration,
    /// Broadcasts per second allowed per node.
    #[arg(long, value_name = "N")]
    pub broadcast_rate_limit: Option<u32>,
    /// The hub's VMAC (xx:xx:xx:xx:xx:xx).
    #[arg(long)]
    pub vmac: Option<crate::protocol::bvlc_sc::Vmac>,
}

#[derive(Args, Debug)]
pub struct Eg4SimArgs {
    /// Path for the slave side (a symlink to /dev/pts/N). Repeat for one PTY
    /// per pack (as many as --address). Without it the /dev/pts path is used.
    #[arg(long, value_name = "PATH")]
    pub tty: Vec<PathBuf>,
    /// Pack address; repeat for several packs.
    #[arg(long = "address", value_name = "N")]
    pub addresses: Vec<u8>,
    /// Register profile: lp4-v2 (47 registers, default) or eg4-ll.
    #[arg(long, default_value = "lp4-v2")]
    pub profile: RegisterProfile,
    /// modbus or legacy (7E/0D).
    #[arg(long, default_value = "modbus")]
    pub protocol: Eg4Protocol,
    /// Line rate for wire-time emulation and RTU silence.
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    /// Emulate wire time at --baud (10 bit-times per byte, RTU silence).
    #[arg(long)]
    pub wire_time: bool,
    /// Cells in series (4..=24).
    #[arg(long, default_value_t = 16)]
    pub cells: usize,
    /// Set a state key on every pack (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Reproduce firmware quirks: address1_zeros, wrong_protocol_ff.
    #[arg(long = "quirk")]
    pub quirks: Vec<String>,
    /// Scale mode: this many packs, each on its own PTY under --tty-dir.
    #[arg(long, requires = "tty_dir", conflicts_with = "tty")]
    pub packs: Option<usize>,
    /// Folder for the scale mode's PTY links (pack-1.tty, pack-2.tty, …).
    #[arg(long, value_name = "DIR")]
    pub tty_dir: Option<PathBuf>,
}

/// A simulator's outcome as an exit code: 0, or 1 with the error on stderr.
pub fn exit_code(r: Result<(), String>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `hilbench sim eg4-lp4`.
pub fn eg4_main(a: Eg4SimArgs) -> i32 {
    exit_code(eg4(a))
}

/// `hilbench sim bsc-hub`.
pub fn bsc_hub_main(a: BscHubSimArgs) -> i32 {
    exit_code(bsc_hub(a))
}

fn bsc_hub(a: BscHubSimArgs) -> Result<(), String> {
    use crate::device::bsc_hub::{HubServer, HubServerConfig};
    use crate::device::bsc_hub_core::{HubConfig, HubRole};
    let role = if a.role == "failover" { HubRole::Failover } else { HubRole::Primary };
    let mut core = HubConfig {
        hub_status: role,
        max_bvlc: a.max_bvlc,
        heartbeat_timeout: a.heartbeat_timeout,
        connect_wait: a.connect_wait,
        broadcast_rate_limit: a.broadcast_rate_limit,
        bind_identity: !a.no_cert_binding,
        ..HubConfig::default()
    };
    if let Some(v) = a.vmac {
        core.vmac = v;
    }
    let cfg = HubServerConfig {
        listen: a.listen,
        tls: a.tls_dir.as_ref().map(crate::transport::tls::TlsDir::hub),
        client_certs: crate::transport::tls::ClientCertPolicy { require_client_auth_eku: !a.allow_client_cert_without_eku },
        core,
        max_message: a.max_message,
        max_connections: a.max_connections,
        max_handshakes: a.max_handshakes,
        max_handshakes_per_source: a.max_handshakes_per_source,
        reserved_handshakes: a.reserved_handshakes,
        first_byte_timeout: a.first_byte_timeout,
        queue_depth: a.queue_depth,
        ..HubServerConfig::default()
    };
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async move {
        let hub = HubServer::start(cfg).await.map_err(|e| e.to_string())?;
        let ready = serde_json::json!({
            "ready": true,
            "kind": "bsc-hub",
            "url": hub.url(),
            "endpoints": { "url": hub.url() },
            "role": a.role,
            "tls": hub.is_tls(),
            "subprotocol": crate::device::bsc_hub::HUB_SUBPROTOCOL,
        });
        let signal = wait_for_signal();
        println!("{ready}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        signal.await;
        tracing::info!("shutting down");
        let stats = hub.stats();
        hub.shutdown().await;
        eprintln!("{}", serde_json::json!({ "stats": stats }));
        Ok(())
    })
}

struct PackPlan {
    name: String,
    address: u8,
}

struct BusPlan {
    link: Option<PathBuf>,
    packs: Vec<PackPlan>,
}

fn parse_sets(sets: &[String]) -> Result<Vec<(String, f64)>, String> {
    sets.iter()
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| format!("--set `{s}`: expected KEY=VALUE"))?;
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| format!("--set `{s}`: `{v}` is not a number"))?;
            crate::model::check_state_key(k.trim())?;
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

fn plan(a: &Eg4SimArgs) -> Result<Vec<BusPlan>, String> {
    let addresses = if a.addresses.is_empty() { vec![1] } else { a.addresses.clone() };
    for &ad in &addresses {
        if ad == 0 || ad > 247 {
            return Err(format!("--address {ad}: must be 1..=247"));
        }
    }
    if let Some(n) = a.packs {
        let dir = a.tty_dir.as_ref().expect("clap requires tty_dir");
        if !dir.is_dir() {
            return Err(format!("--tty-dir {}: no such directory", dir.display()));
        }
        if n == 0 {
            return Err("--packs must be at least 1".into());
        }
        return Ok((1..=n)
            .map(|i| BusPlan {
                link: Some(dir.join(format!("pack-{i}.tty"))),
                packs: vec![PackPlan {
                    name: format!("pack{i}"),
                    address: addresses[0],
                }],
            })
            .collect());
    }
    let mut seen = std::collections::BTreeSet::new();
    for &ad in &addresses {
        if !seen.insert(ad) && a.tty.len() <= 1 {
            // Deliberately allowed: two packs on one address is field fault 1.
            tracing::warn!(address = ad, "two packs share address {ad}: their replies will collide");
        }
    }
    let named = |i: usize, ad: u8| PackPlan {
        name: format!("pack{}", i + 1),
        address: ad,
    };
    match a.tty.len() {
        0 | 1 => Ok(vec![BusPlan {
            link: a.tty.first().cloned(),
            packs: addresses.iter().enumerate().map(|(i, &ad)| named(i, ad)).collect(),
        }]),
        n if n == addresses.len() => Ok(a
            .tty
            .iter()
            .zip(addresses.iter().enumerate())
            .map(|(t, (i, &ad))| BusPlan {
                link: Some(t.clone()),
                packs: vec![named(i, ad)],
            })
            .collect()),
        n => Err(format!(
            "{n} --tty paths but {} --address values: give one --tty (all packs on one bus) or one per address",
            addresses.len()
        )),
    }
}

/// Lets one process hold thousands of PTYs.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn eg4(a: Eg4SimArgs) -> Result<(), String> {
    let sets = parse_sets(&a.set)?;
    let quirks: Vec<Eg4Quirk> = a
        .quirks
        .iter()
        .map(|q| {
            serde_json::from_value(serde_json::Value::String(q.clone())).map_err(|_| {
                let names: Vec<_> = Eg4Quirk::ALL.iter().map(|x| x.0).collect();
                format!("--quirk `{q}`: unknown (known: {})", names.join(", "))
            })
        })
        .collect::<Result<_, _>>()?;
    let plans = plan(&a)?;
    if a.cells < 4 || a.cells > 24 {
        return Err(format!("--cells {}: must be 4..=24", a.cells));
    }
    raise_fd_limit();
    let sys = actix::System::new();
    let result: Result<(), String> = sys.block_on(async move {
        let log = ObservationLog::bounded(Instant::now(), 10_000);
        // Everything that can fail (a pack's settings, a PTY path) comes
        // before any actor starts: an actor that never ran would otherwise
        // be dropped with the runtime and panic on its way out.
        let mut opened = Vec::new();
        for (bi, bp) in plans.into_iter().enumerate() {
            let mut cores = Vec::new();
            for p in &bp.packs {
                let cfg = PackConfig {
                    cells: a.cells,
                    ..PackConfig::default()
                };
                let mut pack = Eg4Pack::new(p.address, cfg)?;
                pack.profile = a.profile;
                pack.protocol = a.protocol;
                pack.quirks = quirks.clone();
                for (k, v) in &sets {
                    pack.set(k, *v).map_err(|e| format!("--set {k}={v}: {e}"))?;
                }
                cores.push((p.name.clone(), pack));
            }
            let cfg = BusConfig {
                name: format!("bus{}", bi + 1),
                baud: a.baud,
                wire_time: a.wire_time,
                ports: vec![BusPortSpec {
                    name: format!("tty{}", bi + 1),
                    link_path: bp.link.clone(),
                }],
                seed: 1,
                frame_limit: Some(256),
                record: false,
            };
            let bus = BusActor::open(cfg, Vec::new(), log.clone()).map_err(|e| e.to_string())?;
            opened.push((bus, cores));
        }
        let mut buses = Vec::new();
        let mut ttys = Vec::new();
        let mut packs = Vec::new();
        for (bus, cores) in opened {
            ttys.extend(bus.port_paths().into_iter().map(|(_, p)| p));
            let bus = bus.start();
            for (name, pack) in cores {
                let addr = Eg4PackActor::new(name.clone(), pack, log.clone()).start();
                // Attached before the ready line, so the first request finds it.
                bus.send(AttachDevice(BusDevice {
                    name,
                    recipient: addr.clone().recipient(),
                }))
                .await
                .map_err(|e| format!("bus: {e}"))?;
                packs.push(addr);
            }
            buses.push(bus);
        }
        let mut endpoints = serde_json::json!({ "tty": ttys[0] });
        if ttys.len() > 1 {
            endpoints["ttys"] = serde_json::json!(ttys);
        }
        let ready = serde_json::json!({
            "ready": true,
            "kind": "eg4-lp4",
            "endpoints": endpoints,
            "profile": a.profile.name(),
            "protocol": a.protocol,
            "packs": packs.len(),
        });
        let signal = wait_for_signal();
        println!("{ready}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        signal.await;
        tracing::info!("shutting down");
        for b in &buses {
            // Stop the bus so its `stopped` removes the symlinks now.
            let _ = b.send(crate::transport::bus::Shutdown).await;
        }
        drop(buses);
        drop(packs);
        Ok(())
    });
    result
}

pub(crate) fn wait_for_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed now, not when first polled: a SIGTERM that comes right
    // after the ready line must shut down cleanly, not kill the process
    // with its symlinks left behind.
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without signal handlers we cannot shut down cleanly: wait forever
            // on ctrl-c via the portable API instead.
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
}
