//! `smp-server`: a Zephyr/MCUboot device's MCUmgr SMP server (OS, Image,
//! Statistics, Settings, File system, Shell and Enumeration groups; two
//! image slots that test, swap, confirm and revert; a filesystem, settings
//! and shell commands a scenario can give it) over UDP and a serial port on
//! a PTY and BLE GATT on the virtual air, one device behind all. Its UDP
//! address is `{{smp.NAME}}`, its serial port `{{smp.NAME.tty}}`, its BLE
//! address `{{ble.NAME}}`. `hilbench sim smp-server` serves one from the
//! command line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use futures::future::LocalBoxFuture;
use serde::Deserialize;

use super::ble::{self, AirLink};
use super::{at_key, decode_keys, Declared, Kind, Names, Role, Running, StartContext};
use crate::device::smp_ble::SmpBle;
use crate::device::smp_core::{FlashTiming, SmpEvent, SmpProfile, SmpServerConfig, FS_MOUNT};
use crate::device::smp_host::{self, SmpEndpoints, SmpHandle, SmpTty};
use crate::device::smp_serial::{SerialFraming, SerialLinkConfig};
use crate::link::fault::LinkMedium;
use crate::link::{FaultRule, FrameRecord};
use crate::observe::ObservationKind;
use crate::scenario::source::Problem;
use crate::scenario::spec::Dur;

pub struct SmpServerKind;

static STEPS: &[super::StepDoc] = &[
    super::StepDoc {
        name: "reboot",
        target: "device",
        about: "an smp-server resets by itself now (a watchdog, a brown-out): no answer, MCUboot runs its swap, it is back after boot_time",
        keys: "device",
    },
    ble::BLE_STEP,
];

/// Its scenario keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmpServerKeys {
    pub name: String,
    /// UDP address to serve on (port 0: any free port; default 127.0.0.1:0
    /// unless only `tty` is given).
    #[serde(default)]
    pub udp: Option<SocketAddr>,
    /// A serial port on a PTY: `auto` (its /dev/pts path) or the path of a
    /// symlink to make.
    #[serde(default)]
    pub tty: Option<PathBuf>,
    /// Serve SMP over BLE GATT on the virtual air too (link `NAME.ble`).
    #[serde(default)]
    pub ble: bool,
    /// BLE: advertised LocalName (default "Zephyr", as smp_svr).
    #[serde(default)]
    pub local_name: Option<String>,
    /// BLE: the ATT MTU centrals get (23..=517; default 23).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// BLE: the RSSI centrals hear it at, in dBm.
    #[serde(default)]
    pub rssi: Option<i16>,
    #[serde(flatten)]
    pub serial: SerialKeys,
    #[serde(flatten)]
    pub flash: FlashKeys,
    /// mcumgr params: largest message with its header (also the UDP net
    /// buffer; default 2048, Zephyr's smp_svr UDP configuration).
    #[serde(default)]
    pub buf_size: Option<u16>,
    #[serde(default)]
    pub buf_count: Option<u16>,
    /// Bytes per image slot.
    #[serde(default)]
    pub slot_size: Option<usize>,
    /// An MCUboot image file for slot 0 (default: a generated 1.0.0 image).
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// How long the device is gone after a reset.
    #[serde(default)]
    pub boot_time: Option<Dur>,
    /// Firmware variants and known bugs: v1-only, legacy-rc (`"rc": 0` in
    /// successes), stale-offset-after-erase.
    #[serde(default)]
    pub profile: Vec<SmpProfile>,
    /// Flash write alignment in bytes (a power of two): upload chunks are
    /// written up to the last whole block.
    #[serde(default)]
    pub flash_align: Option<usize>,
    /// Files on the device at start (littlefs at /lfs1): path → text.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Settings on the device's flash at start: name → text. Given (even
    /// empty), the device has a storage backend and a handler for each
    /// name's root (`app` for `app/mode`); absent, it has neither, as
    /// Zephyr's smp_svr sample.
    #[serde(default)]
    pub settings: Option<BTreeMap<String, String>>,
    /// Shell commands besides Zephyr's `kernel …`: command line → output.
    #[serde(default)]
    pub shell: BTreeMap<String, String>,
    /// Version of the generated image in slot 0 (default 1.0.0; not with `image`).
    #[serde(default)]
    pub image_version: Option<String>,
    /// A generated image of this version in slot 1: an update uploaded, or the image a
    /// revert brings back.
    #[serde(default)]
    pub secondary_version: Option<String>,
    /// Slot 1 asked of the next boot: `test` (once, reverted unless confirmed) or
    /// `permanent`.
    #[serde(default)]
    pub pending: Option<PendingKey>,
    /// false: the running image is on test, unconfirmed, and the next reset reverts to
    /// slot 1's (default true).
    #[serde(default)]
    pub confirmed: Option<bool>,
}

/// The `pending` key.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PendingKey {
    Test,
    Permanent,
}

impl SmpServerKeys {
    /// Slot 0's generated image (with `image_version`) and what the slots hold besides.
    fn slots(&self) -> Result<(Option<Vec<u8>>, crate::model::firmware::SlotState), String> {
        use crate::model::firmware::{Pending, SlotState};
        use crate::protocol::mcuboot::{build_image, ImageVersion};
        let version = |key: &str, v: &str| v.parse::<ImageVersion>().map_err(|e| format!("{key} `{v}`: {e}"));
        let primary = match (&self.image_version, &self.image) {
            (Some(_), Some(_)) => return Err("image_version names the generated image: give it or `image`, not both".into()),
            (Some(v), None) => Some(build_image(version("image_version", v)?, b"hilbench smp-server generated image")),
            (None, _) => None,
        };
        let secondary = self.secondary_version.as_deref().map(|v| version("secondary_version", v).map(|v| build_image(v, b"hilbench smp-server generated secondary image"))).transpose()?;
        let pending = self.pending.map(|p| match p {
            PendingKey::Test => Pending::Test,
            PendingKey::Permanent => Pending::Perm,
        });
        Ok((primary, SlotState { secondary, pending, confirmed: self.confirmed.unwrap_or(true) }))
    }
}

/// A settings name as settings_mgmt takes it.
fn check_setting_name(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() >= 32 || n.starts_with('/') {
        return Err(format!("setting `{n}`: a name is 1 to 31 bytes and starts with its root (e.g. app/mode)"));
    }
    Ok(())
}

/// A device file path: under the mount point, not the mount point itself.
fn check_file_path(p: &str) -> Result<(), String> {
    let mut fs = crate::model::filesystem::MemFs::new(&[FS_MOUNT]);
    fs.seed(p, Vec::new())
}

/// `KEY=VALUE` from the command line.
fn key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

/// The serial port's keys (scenario) and options (`sim`).
#[derive(Debug, Clone, Default, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct SerialKeys {
    /// Serial: pace both directions at this baud rate (8N1), as the wire would.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(300..))]
    #[serde(default)]
    pub baud: Option<u32>,
    /// Serial: console lines (base64, CRC; the default) or raw header + payload.
    #[arg(long, value_enum)]
    #[serde(default)]
    pub framing: Option<SerialFraming>,
    /// Serial: line buffers in the receive pool (CONFIG_UART_MCUMGR_RX_BUF_COUNT; default 2).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    #[serde(default)]
    pub line_buffers: Option<u16>,
    /// Serial: how long the firmware's work queue takes per line; lines that
    /// come while every buffer waits are dropped (or paused, with --flow-control). Default 0.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_dur")]
    pub line_work: Option<Duration>,
    /// Serial: pause the sender while no line buffer is free, as drivers with
    /// flow control do, instead of dropping lines.
    #[arg(long)]
    #[serde(default)]
    pub flow_control: bool,
    /// Serial: no boot banner on the console after a reboot.
    #[arg(long)]
    #[serde(default)]
    pub no_banner: bool,
}

/// The flash's timing (scenario keys and `sim` options); by default instant.
#[derive(Debug, Clone, Default, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct FlashKeys {
    /// Flash: time to erase one page (about 85ms for 4 KiB on an nRF52). An upload's
    /// first chunk erases the whole slot first, so its answer waits pages × this.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_dur")]
    pub page_erase: Option<Duration>,
    /// Flash: page size in bytes (default 4096).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    #[serde(default)]
    pub page_size: Option<u32>,
    /// Flash: write speed in KiB/s (default instant).
    #[arg(long, value_name = "KIB_S", value_parser = clap::value_parser!(u32).range(1..))]
    #[serde(default)]
    pub write_kib_s: Option<u32>,
    /// Flash: erase each page as the upload reaches it, not the whole slot at the
    /// first chunk (CONFIG_IMG_ERASE_PROGRESSIVELY).
    #[arg(long)]
    #[serde(default)]
    pub progressive_erase: bool,
}

impl FlashKeys {
    fn timing(&self) -> FlashTiming {
        let d = FlashTiming::default();
        FlashTiming {
            page_size: self.page_size.map_or(d.page_size, |p| p as usize),
            page_erase: self.page_erase.unwrap_or(d.page_erase),
            write_bytes_per_s: self.write_kib_s.map(|k| u64::from(k) * 1024),
            progressive_erase: self.progressive_erase,
        }
    }
}

/// A duration key as `Dur` spells it (`300ms`, `2s`).
mod opt_dur {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<std::time::Duration>, D::Error> {
        Ok(Option::<crate::scenario::spec::Dur>::deserialize(d)?.map(|x| x.0))
    }
}

impl SerialKeys {
    fn tty(&self, link: Option<PathBuf>) -> SmpTty {
        let d = SerialLinkConfig::default();
        SmpTty {
            link,
            serial: SerialLinkConfig {
                framing: self.framing.unwrap_or(d.framing),
                baud: self.baud,
                line_buffers: self.line_buffers.map_or(d.line_buffers, usize::from),
                line_work: self.line_work.unwrap_or(d.line_work),
                pause_when_full: self.flow_control,
                ..d
            },
            banner: !self.no_banner,
        }
    }
}

/// `auto` is the PTY's own path; anything else is a symlink to make.
fn tty_link(p: &std::path::Path) -> Option<PathBuf> {
    (p != std::path::Path::new("auto")).then(|| p.to_path_buf())
}

/// `hilbench sim smp-server --help` after the options.
pub const SIM_HELP: &str = "Examples:
  # the SMP UDP port Zephyr uses, on loopback
  hilbench sim smp-server --udp 127.0.0.1:1337
  # any free port, Zephyr's default 384-byte buffers (see the ready line for the address)
  hilbench sim smp-server --udp 127.0.0.1:0 --buf-size 384
  # a serial port at /tmp/smp (a symlink to the PTY), paced at 115200 baud
  hilbench sim smp-server --tty /tmp/smp --baud 115200 --buf-size 384
  # the same device over UDP and serial at once
  hilbench sim smp-server --udp 127.0.0.1:1337 --tty /tmp/smp
  # over BLE on a virtual air of its own (centrals use the ready line's dbus_system_bus_address)
  hilbench sim smp-server --ble --buf-size 384 --mtu 247
  # a file on its filesystem, a saved setting and a shell command of its own
  hilbench sim smp-server --file /lfs1/hosts=/etc/hosts --setting app/mode=eco --shell 'bms status=soc 80%'

Then, e.g. with smpmgr from PyPI:  smpmgr --ip 127.0.0.1 image state-read
                              or:  smpmgr --port /tmp/smp image state-read
                              or:  smpmgr --ip 127.0.0.1 file download /lfs1/hosts hosts
                              or:  DBUS_SYSTEM_BUS_ADDRESS=… smpmgr --ble C0:DE:00:00:00:01 image state-read

Prints one JSON line when serving, with every endpoint it serves:
  {\"ready\":true,\"kind\":\"smp-server\",\"endpoints\":{\"udp\":\"127.0.0.1:1337\",\"tty\":\"/tmp/smp\"}}
with --ble also \"ble\" (the address) and \"dbus_system_bus_address\" among the endpoints.
then serves until SIGINT/SIGTERM, printing what the device does (uploads,
test/confirm, resets and the swap MCUboot ran) as JSON lines on stdout.";

#[derive(Args, Debug)]
pub struct SmpServerSimArgs {
    /// UDP address to serve on (port 0: any free port). Default 127.0.0.1:1337
    /// unless --tty is given alone.
    #[arg(long, value_name = "ADDR")]
    pub udp: Option<SocketAddr>,
    /// Serve a serial port on a PTY: `auto` (see the ready line) or a symlink path to make.
    #[arg(long, value_name = "PATH")]
    pub tty: Option<PathBuf>,
    /// Serve SMP over BLE GATT: on a virtual air of its own unless --bus or --adapter says where.
    #[arg(long)]
    pub ble: bool,
    /// BLE: advertised LocalName.
    #[arg(long, default_value = crate::device::smp_ble::SMP_LOCAL_NAME)]
    pub local_name: String,
    #[command(flatten)]
    pub place: crate::cli::ble_place::BlePlaceArgs,
    #[command(flatten)]
    pub serial: SerialKeys,
    #[command(flatten)]
    pub flash: FlashKeys,
    /// Node name (OS info).
    #[arg(long, default_value = "hilbench-smp")]
    pub name: String,
    /// mcumgr params buf_size: largest message with its header; larger datagrams are
    /// dropped unread. 2048 is Zephyr's smp_svr UDP configuration; smpclient sends
    /// 1472-byte datagrams whatever the device says, so below that its uploads time out.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u16).range(64..))]
    pub buf_size: u16,
    #[arg(long, default_value_t = 4)]
    pub buf_count: u16,
    /// Bytes per image slot.
    #[arg(long, default_value_t = 0x40000)]
    pub slot_size: usize,
    /// An MCUboot image for slot 0 (e.g. from `imgtool sign`); default: a generated 1.0.0 image.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// How long the device is gone after a reset.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub boot_time: Duration,
    /// A firmware variant or known bug to reproduce; repeatable. legacy-rc adds
    /// "rc": 0 to successes (strict clients reject it).
    #[arg(long = "profile", value_name = "NAME", value_enum)]
    pub profiles: Vec<SmpProfile>,
    /// Flash write alignment in bytes (a power of two): upload chunks are written
    /// up to the last whole block, and the answer's `off` says so.
    #[arg(long, default_value_t = 1, value_name = "BYTES")]
    pub flash_align: usize,
    /// A file on the device (littlefs at /lfs1), from a file here; repeatable.
    #[arg(long = "file", value_name = "DEVICE_PATH=FILE", value_parser = key_value)]
    pub files: Vec<(String, String)>,
    /// A setting on the device's flash (this gives it a settings backend); repeatable.
    #[arg(long = "setting", value_name = "NAME=VALUE", value_parser = key_value)]
    pub settings: Vec<(String, String)>,
    /// A shell command and its output, besides Zephyr's `kernel …`; repeatable.
    #[arg(long = "shell", value_name = "COMMAND=OUTPUT", value_parser = key_value)]
    pub shell: Vec<(String, String)>,
}

fn endpoints_json(h: &SmpHandle) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    if let Some(a) = h.udp_addr() {
        m.insert("udp".into(), a.to_string().into());
    }
    if let Some(p) = h.tty_path() {
        m.insert("tty".into(), p.display().to_string().into());
    }
    if let Some(a) = h.ble_address() {
        m.insert("ble".into(), a.into());
    }
    m.into()
}

fn read_image(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the image {}: {e}", path.display()))
}

/// Datagrams `sim` keeps for the record (it prints none; the bound keeps memory flat).
const SIM_FRAMES_KEPT: usize = 10_000;

fn sim_main(a: SmpServerSimArgs) -> i32 {
    crate::cli::sim::exit_code(sim(a))
}

fn sim(a: SmpServerSimArgs) -> Result<(), String> {
    let mut files = Vec::new();
    for (device_path, host_path) in &a.files {
        check_file_path(device_path).map_err(|e| format!("--file: {e}"))?;
        files.push((device_path.clone(), std::fs::read(host_path).map_err(|e| format!("--file {device_path}: cannot read {host_path}: {e}"))?));
    }
    for (n, _) in &a.settings {
        check_setting_name(n).map_err(|e| format!("--setting: {e}"))?;
    }
    if !a.ble && a.place.given() {
        return Err("--mtu, --bus and --adapter place a BLE device: give --ble too".into());
    }
    let config = SmpServerConfig {
        name: a.name,
        buf_size: a.buf_size,
        buf_count: a.buf_count,
        slot_size: a.slot_size,
        image: a.image.as_deref().map(read_image).transpose()?,
        boot_time: a.boot_time,
        profiles: a.profiles,
        flash_align: a.flash_align,
        flash: a.flash.timing(),
        files,
        settings: (!a.settings.is_empty()).then(|| a.settings.iter().map(|(k, v)| (k.clone(), v.as_bytes().to_vec())).collect()),
        shell: a.shell,
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async move {
        let udp = match (a.udp, &a.tty, a.ble) {
            (None, None, false) => Some(SocketAddr::from(([127, 0, 0, 1], 1337))),
            (udp, _, _) => udp,
        };
        let tty = a.tty.as_deref().map(|p| a.serial.tty(tty_link(p)));
        let placement = match a.ble {
            true => Some(crate::cli::ble_place::BlePlacement::place(&a.place, 1).await?),
            false => None,
        };
        let ble = placement.as_ref().map(|p| SmpBle { adapter: p.adapter().to_string(), local_name: a.local_name.clone() });
        let server = match smp_host::serve(config, SmpEndpoints { udp, tty, ble, seed: 0, frame_limit: Some(SIM_FRAMES_KEPT) }).await {
            Ok(s) => s,
            Err(e) => {
                if let Some(p) = placement {
                    p.release().await;
                }
                return Err(e);
            }
        };
        let mut events = server.subscribe();
        let signal = crate::cli::sim::wait_for_signal();
        let mut endpoints = endpoints_json(&server);
        if let (Some(p), Some(m)) = (&placement, endpoints.as_object_mut()) {
            m.insert("dbus_system_bus_address".into(), p.bus().into());
        }
        println!("{}", serde_json::json!({ "ready": true, "kind": "smp-server", "endpoints": endpoints }));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                _ = &mut signal => break,
                ev = events.recv() => match ev {
                    Ok(SmpEvent::Silent { reason }) => tracing::debug!("silent: {reason}"),
                    Ok(e) => {
                        // Whoever started us may have stopped reading (it had the
                        // ready line); the device goes on serving regardless.
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{}", serde_json::to_string(&e).unwrap_or_default()).and_then(|_| out.flush());
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => tracing::warn!("{n} events not printed"),
                    Err(_) => break,
                },
            }
        }
        server.shutdown().await;
        if let Some(p) = placement {
            p.release().await;
        }
        Ok(())
    })
}

/// `hilbench validate smp-server --help` after the options.
pub const VALIDATE_HELP: &str = "Over UDP, serial console lines or BLE (writes of MTU − 3 bytes, answers reassembled from
notifications; the link a reset drops is reconnected once the device advertises again).
Checks: params; echo in v2 and in v1 (a v1 request gets a v1 answer); an unknown group
({\"rc\": 8}); bootloader info and its mode; image state read (keys, types, the flag rules);
then, unless --read-only, an upload of a test image (generated, one major version up, or
--image) with two forced resumes (a new start with the same sha resumes at the current
offset; a chunk past the expected offset is answered with the expected one), test, reset
(gone, then back), the test boot (new image running unconfirmed), confirm, reset, the
confirmed boot. Every answer's header (version, op, group, seq, command, length) and
payload (one CBOR map) are checked; \"rc\": 0 in successes and late answers are warnings.
The upload's throughput is in the report. Exits 0 when no check fails, 1 when one does.

The full run replaces the device's firmware with the uploaded image: on real hardware use
--read-only, or --image with a build of your own firmware.

Examples:
  hilbench validate smp-server --udp 192.168.1.20 --read-only
  hilbench validate smp-server --tty /dev/ttyACM0 --baud 115200 --line-buffers 2 --image app.signed.bin --json
  hilbench validate smp-server --ble C0:DE:00:00:00:01 --adapter hci1 --read-only
  # against the simulator (any free UDP port):
  hilbench sim smp-server --udp 127.0.0.1:0 --buf-size 384 > smp.json & sim=$!
  until [ -s smp.json ] || ! kill -0 $sim; do sleep 0.1; done
  hilbench validate smp-server --udp $(jq -r .endpoints.udp smp.json)
  kill $sim
  # over BLE, on the simulator's own virtual air:
  hilbench sim smp-server --ble --buf-size 384 > ble.json & sim=$!
  until [ -s ble.json ] || ! kill -0 $sim; do sleep 0.1; done
  DBUS_SYSTEM_BUS_ADDRESS=$(jq -r .endpoints.dbus_system_bus_address ble.json) hilbench validate smp-server --ble $(jq -r .endpoints.ble ble.json)
  kill $sim";

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["udp", "tty", "ble"])))]
pub struct SmpValidateArgs {
    /// The server's UDP address, HOST or HOST:PORT (port 1337 when not given).
    #[arg(long, value_name = "HOST[:PORT]")]
    pub udp: Option<String>,
    /// A serial port with the SMP console framing.
    #[arg(long, value_name = "PATH")]
    pub tty: Option<PathBuf>,
    #[arg(long, default_value_t = 115_200, requires = "tty")]
    pub baud: u32,
    /// Serial: the device's receive line buffers (CONFIG_UART_MCUMGR_RX_BUF_COUNT, Zephyr's
    /// default 2): upload chunks are sized to fit that many console lines, so a firmware
    /// whose work queue is behind does not drop the rest of a burst.
    #[arg(long, value_name = "N", requires = "tty", value_parser = clap::value_parser!(u16).range(1..))]
    pub line_buffers: Option<u16>,
    /// The server's BLE address (BlueZ on the system bus, DBUS_SYSTEM_BUS_ADDRESS).
    #[arg(long, value_name = "ADDRESS")]
    pub ble: Option<String>,
    /// BLE: the central adapter.
    #[arg(long, value_name = "hciN", default_value = "hci0")]
    pub adapter: String,
    /// How long to wait for each answer (the first upload chunk, which erases, gets 40 s).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// How long a reset may keep the device away.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub boot_timeout: Duration,
    /// How long the first upload chunk may take (its answer waits for the slot's erase).
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    pub erase_timeout: Duration,
    /// Only read: no upload, test, confirm or reset.
    #[arg(long)]
    pub read_only: bool,
    /// The MCUboot image to upload (default: a generated one, one major version up).
    #[arg(long, value_name = "FILE", conflicts_with = "read_only")]
    pub image: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// HOST or HOST:PORT, port 1337 by default, resolved.
fn udp_target(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 1337));
    }
    let with_port = if s.contains(':') { s.to_string() } else { format!("{s}:1337") };
    with_port.to_socket_addrs().map_err(|e| format!("--udp {s}: {e}"))?.next().ok_or_else(|| format!("--udp {s}: no address"))
}

fn validate_main(a: SmpValidateArgs) -> i32 {
    use crate::client::smp_client::SmpTarget;
    use crate::client::smp_validate::{self, SmpValidateConfig};
    let target = match (&a.udp, &a.tty, &a.ble) {
        (Some(u), _, _) => match udp_target(u) {
            Ok(addr) => SmpTarget::Udp(addr),
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        },
        (None, Some(p), _) => SmpTarget::Tty { path: p.clone(), baud: a.baud },
        (None, None, Some(address)) => SmpTarget::Ble { address: address.clone(), adapter: Some(a.adapter.clone()) },
        (None, None, None) => unreachable!("clap requires --udp, --tty or --ble"),
    };
    let image = match a.image.as_deref().map(read_image).transpose() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let cfg = SmpValidateConfig { target, timeout: a.timeout, boot_timeout: a.boot_timeout, erase_timeout: a.erase_timeout, read_only: a.read_only, image, line_buffers: a.line_buffers.map(usize::from) };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start a runtime: {e}");
            return 2;
        }
    };
    let report = rt.block_on(smp_validate::validate(&cfg));
    if a.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")));
    } else {
        print!("{}", smp_validate::render(&report));
    }
    i32::from(!report.passed())
}

impl Kind for SmpServerKind {
    fn name(&self) -> &'static str {
        "smp-server"
    }
    fn role(&self) -> Role {
        Role::Device
    }
    fn about(&self) -> &'static str {
        "Zephyr/MCUboot MCUmgr SMP server over UDP and serial: OS, Image, Statistics, Settings, File system, Shell and Enumeration groups, two slots that test, swap, confirm and revert"
    }
    /// A client numbers its requests (header byte 6, seq) from wherever it starts: match
    /// without it and answer with the live request's.
    fn replay_rule(&self) -> Option<crate::link::recognise::ReplayRule> {
        Some(crate::link::recognise::ReplayRule {
            key: |b| {
                let mut k = b.to_vec();
                if let Some(seq) = k.get_mut(6).filter(|_| b.len() >= crate::protocol::smp::HEADER_LEN) {
                    *seq = 0;
                }
                k
            },
            // Only an answer that starts a reply to this request (its group and command, a
            // response op): a later BLE notification of a long reply is payload.
            answer: |req, ans| {
                let starts_reply = req.len() >= crate::protocol::smp::HEADER_LEN
                    && ans.len() >= crate::protocol::smp::HEADER_LEN
                    && ans[4..6] == req[4..6]
                    && ans[7] == req[7]
                    && ans[0] & 0x07 == (req[0] & 0x07) + 1;
                if starts_reply {
                    ans[6] = req[6];
                }
            },
        })
    }
    /// On BLE, values on the SMP characteristic (decisive) or whole SMP messages; over
    /// UDP, datagrams that are one SMP message with a CBOR map and an op that fits their
    /// direction; over serial, console lines with the 06 09 / 04 14 markers.
    fn recognise(&self, f: &crate::link::recognise::CapturedFrameView<'_>) -> Option<crate::link::recognise::FrameVerdict> {
        use crate::link::recognise::{CaptureTransport, FrameVerdict};
        use crate::protocol::smp;
        let b = f.bytes;
        if f.transport == CaptureTransport::Serial {
            let marker = b.get(..2)?;
            let what = if marker == smp::serial::START {
                "start"
            } else if marker == smp::serial::CONTINUATION {
                "continuation"
            } else {
                return None;
            };
            return Some(FrameVerdict { decisive: true, meaning: format!("SMP console line ({what}, {} bytes)", b.len()), unit: None });
        }
        let own_uuid = f.uuid == Some(crate::device::smp_ble::SMP_CHARACTERISTIC_UUID);
        let message = smp::SmpFrame::parse(b).ok().filter(|m| smp::decode_map(&m.payload).is_ok());
        let fits = message.as_ref().is_some_and(|m| {
            let request = matches!(m.header.smp_op(), Some(smp::SmpOp::Read | smp::SmpOp::Write));
            request == (f.direction == crate::link::record::Direction::Request)
        });
        match f.transport {
            CaptureTransport::BleAtt if own_uuid || fits => {}
            CaptureTransport::Udp if fits => {}
            _ => return None,
        }
        let meaning = match &message {
            Some(m) => describe_smp(m),
            None => format!("SMP message piece ({} bytes)", b.len()),
        };
        Some(FrameVerdict { decisive: own_uuid || f.transport == CaptureTransport::Udp, meaning, unit: None })
    }
    fn udp_service(&self) -> Option<super::UdpService> {
        Some(super::UdpService { serves: &[super::smp_client::SMP_UDP], var: "smp" })
    }
    fn capture_client(&self, port: Option<&str>, devices: &[crate::link::recognise::CapturedDevice]) -> Result<crate::link::recognise::CaptureClient, String> {
        smp_capture_client(port, devices)
    }
    fn capture_model(&self, port: Option<&str>, devices: &[crate::link::recognise::CapturedDevice]) -> Result<super::CaptureModel, String> {
        smp_capture_model(port, devices)
    }
    fn ble_identity(&self) -> Option<crate::transport::gatt::BleIdentity> {
        Some(crate::transport::gatt::BleIdentity { services: crate::device::smp_ble::smp_gatt(), local_name: crate::device::smp_ble::SMP_LOCAL_NAME.into(), serves: &[super::smp_client::SMP_BLE] })
    }
    fn fields(&self, f: &crate::link::recognise::CapturedFrameView<'_>, _request: Option<&[u8]>) -> Vec<(String, String)> {
        // Console lines are base64 pieces of a message; UDP datagrams and BLE messages are whole.
        if f.transport == crate::link::recognise::CaptureTransport::Serial {
            return Vec::new();
        }
        crate::protocol::smp::message_fields(f.bytes)
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<SmpServerKeys>(entry)?))
    }
    fn steps(&self) -> &'static [super::StepDoc] {
        STEPS
    }
    fn list(&self) -> Vec<super::ListSection> {
        vec![super::ListSection {
            title: "SMP firmware profiles (smp-server `profile`, sim --profile)".into(),
            rows: SmpProfile::ALL.iter().map(|p| (p.name().to_string(), p.description().to_string())).collect(),
        }]
    }
    fn sim(&self) -> Option<super::KindCommand> {
        Some(super::KindCommand {
            command: || super::subcommand::<SmpServerSimArgs>("smp-server", "MCUmgr SMP server (Zephyr with MCUboot) over UDP and serial.", SIM_HELP),
            run: |m| super::run_parsed(m, sim_main),
        })
    }
    fn validate(&self) -> Option<super::KindCommand> {
        Some(super::KindCommand {
            command: || super::subcommand::<SmpValidateArgs>("smp-server", "An MCUmgr SMP server over UDP or serial: headers, error forms, image states, upload rules, test/confirm across resets.", VALIDATE_HELP),
            run: |m| super::run_parsed(m, validate_main),
        })
    }
}

impl SmpServerKeys {
    /// UDP is served when asked for, or when no other transport is.
    fn serves_udp(&self) -> bool {
        self.udp.is_some() || (self.tty.is_none() && !self.ble)
    }

    fn ble_link(&self) -> String {
        ble::link_name(&self.name)
    }

    fn serial_keys_given(&self) -> bool {
        let k = &self.serial;
        k.baud.is_some() || k.framing.is_some() || k.line_buffers.is_some() || k.line_work.is_some() || k.flow_control || k.no_banner
    }

    fn config(&self) -> Result<SmpServerConfig, String> {
        let mut c = SmpServerConfig { name: self.name.clone(), profiles: self.profile.clone(), buf_size: 2048, ..Default::default() };
        if let Some(a) = self.flash_align {
            c.flash_align = a;
        }
        c.flash = self.flash.timing();
        if let Some(b) = self.buf_size {
            c.buf_size = b;
        }
        if let Some(b) = self.buf_count {
            c.buf_count = b;
        }
        if let Some(s) = self.slot_size {
            c.slot_size = s;
        }
        if let Some(d) = self.boot_time {
            c.boot_time = d.0;
        }
        let (generated, slots) = self.slots()?;
        c.image = match generated {
            Some(g) => Some(g),
            None => self.image.as_deref().map(read_image).transpose()?,
        };
        c.slots = slots;
        c.files = self.files.iter().map(|(p, t)| (p.clone(), t.as_bytes().to_vec())).collect();
        c.settings = self.settings.as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_bytes().to_vec())).collect());
        c.shell = self.shell.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Ok(c)
    }
}

impl Declared for SmpServerKeys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "smp-server"
    }
    fn check(&self, _names: &Names<'_>) -> Result<(), Problem> {
        if self.buf_size.is_some_and(|b| b < 64) {
            return Err(at_key("buf_size", "buf_size must be at least 64 bytes"));
        }
        if self.flash.page_size.is_some_and(|p| !(64..=1_048_576).contains(&p)) {
            return Err(at_key("page_size", "page_size must be 64 bytes to 1 MiB"));
        }
        if self.flash.write_kib_s == Some(0) {
            return Err(at_key("write_kib_s", "write_kib_s must be at least 1"));
        }
        if self.flash_align.is_some_and(|a| !(1..=4096).contains(&a) || !a.is_power_of_two()) {
            return Err(at_key("flash_align", "flash_align must be a power of two from 1 to 4096"));
        }
        if let Some(t) = self.tty.as_deref().and_then(tty_link) {
            if let Some(dir) = t.parent().filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
                return Err(at_key("tty", format!("directory {} does not exist", dir.display())));
            }
        }
        if self.serial.line_buffers == Some(0) {
            return Err(at_key("line_buffers", "line_buffers must be at least 1"));
        }
        if self.serial.baud.is_some_and(|b| b < 300) {
            return Err(at_key("baud", "baud must be at least 300"));
        }
        if !self.ble && (self.local_name.is_some() || self.mtu.is_some() || self.rssi.is_some()) {
            return Err(at_key("ble", "BLE keys (local_name, mtu, rssi) need `ble: true`"));
        }
        ble::check_link_settings(self.mtu, self.rssi)?;
        if self.tty.is_none() && self.serial_keys_given() {
            return Err(at_key("tty", "serial keys (baud, framing, line_buffers, line_work, flow_control, no_banner) need `tty`"));
        }
        if let Some(p) = &self.image {
            if !p.is_file() {
                return Err(at_key("image", format!("no image file at {}", p.display())));
            }
        }
        for p in self.files.keys() {
            check_file_path(p).map_err(|e| at_key("files", e))?;
        }
        for n in self.settings.iter().flat_map(|m| m.keys()) {
            check_setting_name(n).map_err(|e| at_key("settings", e))?;
        }
        if let Some(c) = self.shell.keys().find(|c| c.split_whitespace().next().is_none_or(|w| w == "kernel")) {
            return Err(at_key("shell", format!("shell command `{c}`: empty, or under `kernel`, which the device's own shell has")));
        }
        let version_key = if self.image_version.is_some() && self.image.is_some() { "image_version" } else { "secondary_version" };
        self.slots().map_err(|e| at_key(if e.starts_with("image_version") { "image_version" } else { version_key }, e))?;
        // What only the whole device can judge (times, the image, files against capacity).
        let config = self.config().map_err(Problem::here)?;
        crate::device::smp_core::SmpServer::new(config).map(|_| ()).map_err(Problem::here)
    }
    fn check_step(&self, step: &str, body: &yaml_serde::Value, _names: &Names<'_>) -> Result<(), Problem> {
        match step {
            "reboot" => super::step_body::<RebootStep>(body).map(|_| ()),
            "ble" if self.ble => ble::check_step(body),
            "ble" => Err(Problem::here(format!("`{}` is not on BLE: give it `ble: true`", self.name))),
            _ => Err(Problem::here(format!("an smp-server takes no `{step}` step"))),
        }
    }
    fn on_air(&self) -> bool {
        self.ble
    }
    /// One service per transport, so an smp-client's `transport` is checked before anything runs.
    fn serves(&self) -> &'static [&'static str] {
        use super::smp_client::{SMP_BLE, SMP_TTY, SMP_UDP};
        const ALL: [&[&str]; 8] = [&[], &[SMP_UDP], &[SMP_TTY], &[SMP_UDP, SMP_TTY], &[SMP_BLE], &[SMP_UDP, SMP_BLE], &[SMP_TTY, SMP_BLE], &[SMP_UDP, SMP_TTY, SMP_BLE]];
        ALL[usize::from(self.serves_udp()) | usize::from(self.tty.is_some()) << 1 | usize::from(self.ble) << 2]
    }
    /// Its UDP datagrams, both ways, are the link `NAME`; its serial line
    /// (console lines toward it, each answer's framed bytes back) `NAME.tty`;
    /// its BLE link (ATT writes and notifications) `NAME.ble`.
    fn links(&self) -> Vec<super::LinkDecl> {
        let mut links = Vec::new();
        if self.serves_udp() {
            links.push(super::LinkDecl { name: self.name.clone(), home: super::LinkHomeDecl::Own, capture: None, checksum: None, carries: "SMP over UDP", medium: LinkMedium::Datagram });
        }
        if self.tty.is_some() {
            let carries = if self.serial.framing == Some(SerialFraming::Raw) { "raw SMP on a serial line" } else { "SMP console lines on a serial line" };
            links.push(super::LinkDecl { name: format!("{}.tty", self.name), home: super::LinkHomeDecl::Own, capture: None, checksum: None, carries, medium: LinkMedium::Serial });
        }
        if self.ble {
            links.push(super::LinkDecl {
                name: self.ble_link(),
                home: super::LinkHomeDecl::Own,
                capture: Some(crate::link::capture::CaptureFormat::BleAtt),
                checksum: None,
                carries: "SMP in BLE writes and notifications",
                medium: LinkMedium::Gatt,
            });
        }
        links
    }
    fn start<'a>(&'a self, cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let config = self.config().map_err(|e| format!("`{}`: {e}", self.name))?;
            let udp = self.udp.or_else(|| self.serves_udp().then(|| SocketAddr::from(([127, 0, 0, 1], 0))));
            let tty = self.tty.as_deref().map(|p| self.serial.tty(tty_link(p)));
            let air = match self.ble {
                true => Some(AirLink::lend(self.mtu, self.rssi).await?),
                false => None,
            };
            let ble = air.as_ref().map(|a| SmpBle { adapter: a.adapter().to_string(), local_name: self.local_name.clone().unwrap_or_else(|| crate::device::smp_ble::SMP_LOCAL_NAME.into()) });
            let handle = match smp_host::serve(config, SmpEndpoints { udp, tty, ble, seed: cx.seed, frame_limit: None }).await {
                Ok(h) => h,
                Err(e) => {
                    if let Some(a) = air {
                        a.give_back().await;
                    }
                    return Err(format!("`{}`: {e}", self.name));
                }
            };
            let events = super::forward_events(handle.subscribe(), cx.log.clone(), self.name.clone(), |event, detail| ObservationKind::Smp { event, detail });
            Ok(Box::new(RunningSmp { name: self.name.clone(), handle: Some(handle), events: Some(events), air }) as Box<dyn Running>)
        })
    }
}

struct RunningSmp {
    name: String,
    handle: Option<SmpHandle>,
    events: Option<tokio::task::JoinHandle<()>>,
    /// Its place on the virtual air, when served on BLE.
    air: Option<AirLink>,
}

impl RunningSmp {
    fn handle(&self) -> Result<&SmpHandle, String> {
        self.handle.as_ref().ok_or_else(|| format!("`{}` has stopped", self.name))
    }

    /// The air link when `link` names it (`NAME.ble`).
    fn air_link(&self, link: &str) -> Option<&AirLink> {
        AirLink::named(self.air.as_ref(), &self.name, link)
    }
}

/// `reboot: {device: NAME}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RebootStep {
    #[allow(dead_code)]
    device: String,
}

impl Running for RunningSmp {
    fn step<'a>(&'a mut self, step: &'a str, body: &'a yaml_serde::Value, _cx: super::StepContext<'a>) -> LocalBoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            match step {
                "reboot" => {
                    self.handle()?.reboot()?;
                    Ok(format!("`{}` resets by itself", self.name))
                }
                "ble" => match &self.air {
                    Some(air) => air.apply(body).await,
                    None => Err(format!("`{}` is not on BLE", self.name)),
                },
                _ => Err(format!("no `{step}` step here")),
            }
        })
    }
    fn add_fault<'a>(&'a self, link: &'a str, rule: FaultRule) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if let Some(air) = self.air_link(link) {
                return air.add_fault(rule).await;
            }
            self.handle()?.add_fault(link, rule).map_err(|e| format!("`{}`: {e}", self.name))
        })
    }
    fn clear_faults<'a>(&'a self, link: &'a str, name: Option<&'a str>) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if let Some(air) = self.air_link(link) {
                return air.clear_faults(link, name).await;
            }
            match self.handle()?.clear_faults(link, name)? {
                true => Ok(()),
                false => Err(format!("no fault named `{}` on `{link}`", name.unwrap_or_default())),
            }
        })
    }
    fn frames(&self) -> LocalBoxFuture<'_, Vec<FrameRecord>> {
        Box::pin(async move {
            let mut frames = self.handle.as_ref().map(SmpHandle::frames).unwrap_or_default();
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
    fn vars(&self) -> Vec<(String, String)> {
        let Some(h) = &self.handle else { return Vec::new() };
        let mut vars = Vec::new();
        if let Some(a) = h.udp_addr() {
            vars.push((format!("smp.{}", self.name), a.to_string()));
        }
        if let Some(p) = h.tty_path() {
            vars.push((format!("smp.{}.tty", self.name), p.display().to_string()));
        }
        if let (Some(a), Some(air)) = (h.ble_address(), &self.air) {
            vars.push((format!("ble.{}", self.name), a.to_string()));
            vars.extend(air.vars());
        }
        vars
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
                // Given back, so the next scenario's scans never see it.
                air.give_back().await;
            }
        })
    }
}

/// One SMP message as a line: version, op, group, command, seq and the payload's keys.
fn describe_smp(m: &crate::protocol::smp::SmpFrame) -> String {
    use crate::protocol::smp;
    let h = &m.header;
    let op = match h.smp_op() {
        Some(smp::SmpOp::Read) => "read",
        Some(smp::SmpOp::ReadResponse) => "read-rsp",
        Some(smp::SmpOp::Write) => "write",
        Some(smp::SmpOp::WriteResponse) => "write-rsp",
        None => "op?",
    };
    let keys: Vec<String> = smp::decode_map(&m.payload)
        .map(|entries| entries.iter().filter_map(|(k, _)| k.as_text().map(str::to_string)).collect())
        .unwrap_or_default();
    format!("v{} {op} group {} command {} seq {} keys [{}]", h.version + 1, h.group, h.command, h.seq, keys.join(", "))
}

/// An `smp-client` that polls the captured server as it polls any (params, then the image
/// state; both with an empty map, as smpclient and smpmgr send them, so the replay finds
/// them in the capture), and what it must meet. The poller walks the capture in its own
/// order (a replay answers each request with the next captured one like it), so the steps
/// are what its first poll is sure to get (the first answered params read and the image
/// state read after it: the buffer size and the running image) and, where the capture
/// has a params read unanswered (a reboot), a timeout; the last running image is noted.
fn smp_capture_client(port: Option<&str>, devices: &[crate::link::recognise::CapturedDevice]) -> Result<crate::link::recognise::CaptureClient, String> {
    let (d, p) = SmpPolls::of_udp(port, devices)?;
    // Every poll walks the replay one params and one state read on.
    let within = p.within();
    let mut steps = Vec::new();
    let mut seen = vec![format!("{} params and image state reads", p.polls)];
    if let Some(b) = p.buf_size {
        steps.push(format!("expect_reading: {{ client: mgr, field: buf_size, equals: {b}, within: {within} }}"));
        seen.push(format!("buf_size {b}"));
    }
    if let Some(v) = &p.first_active {
        steps.push(format!("expect_flag: {{ client: mgr, flag: 'active:{v}', within: {within} }}"));
        seen.push(format!("running image {v} at first"));
    }
    if let Some(v) = p.active().filter(|v| Some(*v) != p.first_active.as_ref()) {
        seen.push(format!("{v} at last"));
    }
    if p.silent > 0 && p.buf_size.is_some() {
        steps.push(format!("expect_errors: {{ client: mgr, kind: timeout, at_least: 1, within: {within} }}"));
        seen.push(format!("{} unanswered (the device rebooting)", p.silent));
    }
    Ok(crate::link::recognise::CaptureClient { client: smp_client_entry(&d.name), steps, notes: vec![format!("{}: {}", d.name, seen.join(", "))] })
}

fn smp_client_entry(device: &str) -> String {
    format!("{{ name: mgr, kind: {}, device: {device}, interval: 200ms }}", super::smp_client::SmpClientKind.name())
}

/// One slot of a captured image state answer.
#[derive(Debug, Clone)]
struct CapturedSlot {
    slot: u64,
    version: String,
    active: bool,
    confirmed: bool,
    pending: bool,
    permanent: bool,
}

/// What a captured SMP server answered the params and image state reads a poller sends:
/// how many and how many went unanswered, the first params' buffers, the first answered
/// state's running image (after a params read: what a poll's first round gets) and the
/// last state's slots.
#[derive(Default)]
struct SmpPolls {
    polls: u64,
    silent: usize,
    buf_size: Option<u64>,
    buf_count: Option<u64>,
    first_active: Option<String>,
    last_slots: Vec<CapturedSlot>,
}

impl SmpPolls {
    /// The one UDP server of a link and its polls; Err for what no scenario replays.
    fn of_udp<'a>(port: Option<&str>, devices: &'a [crate::link::recognise::CapturedDevice]) -> Result<(&'a crate::link::recognise::CapturedDevice, SmpPolls), String> {
        let [d] = devices else {
            return Err(format!("{} SMP servers on one link; an smp-client polls one", devices.len()));
        };
        if port.is_some() || d.transport != crate::link::recognise::CaptureTransport::Udp {
            return Err(format!("SMP {} captures get no scenario yet (console lines and BLE writes are pieces of messages)", d.transport.as_str()));
        }
        Ok((d, SmpPolls::of(d)))
    }

    fn of(d: &crate::link::recognise::CapturedDevice) -> SmpPolls {
        use crate::protocol::smp::{self, SmpFrame, SmpOp};
        let (exchanges, _) = crate::scenario::against::exchanges(d.frames.clone());
        let mut p = SmpPolls::default();
        for ex in &exchanges {
            let Ok(req) = SmpFrame::parse(&ex.request) else { continue };
            let h = &req.header;
            let read = h.smp_op() == Some(SmpOp::Read);
            let params = read && h.group == smp::group::OS && h.command == 6;
            let state = read && h.group == smp::group::IMAGE && h.command == 0;
            if !(params || state) {
                continue;
            }
            p.polls += 1;
            let Some(answer) = ex.answers.iter().find_map(|a| SmpFrame::parse(a).ok()) else {
                p.silent += 1;
                continue;
            };
            let Ok(map) = smp::decode_map(&answer.payload) else { continue };
            if params {
                p.buf_size = p.buf_size.or_else(|| smp::get(&map, "buf_size").and_then(smp::as_u64));
                p.buf_count = p.buf_count.or_else(|| smp::get(&map, "buf_count").and_then(smp::as_u64));
            } else if let Some(ciborium::Value::Array(images)) = smp::get(&map, "images") {
                p.last_slots = images.iter().filter_map(CapturedSlot::of).collect();
                if p.buf_size.is_some() && p.first_active.is_none() {
                    p.first_active = p.active().cloned();
                }
            }
        }
        p
    }

    fn active(&self) -> Option<&String> {
        self.last_slots.iter().find(|s| s.active).map(|s| &s.version)
    }

    fn within(&self) -> String {
        format!("{}s", (self.polls / 2 + 10).min(120))
    }
}

impl CapturedSlot {
    fn of(img: &ciborium::Value) -> Option<CapturedSlot> {
        use crate::protocol::smp;
        let ciborium::Value::Map(e) = img else { return None };
        let flag = |k: &str| matches!(smp::get(e, k), Some(ciborium::Value::Bool(true)));
        let ciborium::Value::Text(version) = smp::get(e, "version")? else { return None };
        Some(CapturedSlot {
            slot: smp::get(e, "slot").and_then(smp::as_u64).unwrap_or(0),
            version: version.clone(),
            active: flag("active"),
            confirmed: flag("confirmed"),
            pending: flag("pending"),
            permanent: flag("permanent"),
        })
    }
}

/// The captured server as a simulated smp-server (`capture import --as-state`): its
/// buffers from the first params answer, its slots as the last image state answer shows
/// them (the running image's version, the other slot's, a pending test or permanent
/// swap, an unconfirmed test image), and an smp-client that polls it and must see that
/// state. Uploads, resets and silences are noted, not reproduced: the scenario starts
/// where the capture ended.
fn smp_capture_model(port: Option<&str>, devices: &[crate::link::recognise::CapturedDevice]) -> Result<super::CaptureModel, String> {
    let (d, p) = SmpPolls::of_udp(port, devices)?;
    let within = p.within();
    let mut keys = Vec::new();
    let (mut steps, mut seen) = (Vec::new(), vec![format!("{} params and image state reads", p.polls)]);
    if let Some(b) = p.buf_size {
        keys.push(format!("buf_size: {b}"));
        steps.push(format!("expect_reading: {{ client: mgr, field: buf_size, equals: {b}, within: {within} }}"));
    }
    if let Some(c) = p.buf_count {
        keys.push(format!("buf_count: {c}"));
    }
    // Image 0's slots only: a second image's are not simulated.
    if let Some(s) = p.last_slots.iter().find(|s| s.slot == 0) {
        keys.push(format!("image_version: {}", quoted_version(&s.version)?));
        steps.push(format!("expect_flag: {{ client: mgr, flag: 'active:{}', within: {within} }}", s.version));
        steps.push(format!("expect_reading: {{ client: mgr, field: active_confirmed, equals: {}, within: {within} }}", u8::from(s.confirmed)));
        if !s.confirmed {
            keys.push("confirmed: false".into());
        }
        seen.push(format!("last state: running {}{}", s.version, if s.confirmed { "" } else { " on test, unconfirmed" }));
    }
    if let Some(s) = p.last_slots.iter().find(|s| s.slot == 1) {
        keys.push(format!("secondary_version: {}", quoted_version(&s.version)?));
        if s.pending {
            keys.push(format!("pending: {}", if s.permanent { "permanent" } else { "test" }));
        }
        steps.push(format!("expect_reading: {{ client: mgr, field: pending, equals: {}, within: {within} }}", u8::from(s.pending)));
        let how = match (s.pending, s.permanent) {
            (true, true) => " pending for good",
            (true, false) => " pending a test",
            _ => "",
        };
        seen.push(format!("slot 1 {}{how}", s.version));
    }
    if p.last_slots.iter().any(|s| s.slot > 1) {
        seen.push("slots of a second image are not simulated".into());
    }
    if p.silent > 0 {
        seen.push(format!("{} unanswered (reboots) not reproduced", p.silent));
    }
    if steps.is_empty() {
        return Err("the capture holds no answered params or image state read".into());
    }
    let entry = format!("{{ name: {}, kind: {}, {} }}", d.name, SmpServerKind.name(), keys.join(", "));
    let client = crate::link::recognise::CaptureClient { client: smp_client_entry(&d.name), steps, notes: vec![format!("{}: {}", d.name, seen.join(", "))] };
    Ok(super::CaptureModel { devices: vec![entry], client })
}

/// A captured version as a scenario value, when the server can build an image of it.
fn quoted_version(v: &str) -> Result<String, String> {
    v.parse::<crate::protocol::mcuboot::ImageVersion>().map_err(|e| format!("captured image version `{v}`: {e}"))?;
    Ok(format!("\"{v}\""))
}
