//! An MCUmgr SMP server as Zephyr's mcumgr with MCUboot runs it, sans-IO:
//! one SMP message (a UDP datagram, reassembled BLE writes, a decoded
//! serial packet) and the time in, answers out. Facts from
//! `../shared/reference/smp.md`; the firmware's slots are [`Firmware`].
//!
//! Groups: OS (echo as read and write, taskstat, datetime, reset, mcumgr
//! params, OS info, bootloader info), Image (state read and write,
//! upload, erase, slot info), Statistics, Settings, File system, Shell
//! and Enumeration. Any other group or command, or an op a command has no
//! handler for, gets `{"rc": 8}` as Zephyr answers. An answer that would
//! not fit `buf_size` is `{"rc": 7}` instead (EMSGSIZE, as zcbor runs out
//! of buffer).
//!
//! Answers carry the request's version, group, seq and command. A reserved
//! version gets `{"rc": 13}`. Group errors are `err {group, rc}` under v2
//! and Zephyr's translation to an `rc` under v1.
//!
//! Reset answers `{}`, and 250 ms later the device reboots: every peer is
//! closed, MCUboot runs its swap ([`Firmware::boot`]), and for the boot
//! time nothing answers.
//!
//! Choices where the reference is silent (each a guess a capture could
//! overturn): a message whose header says more bytes than follow is
//! dropped in silence, and so is a response op; a payload that is not one
//! CBOR map gets `{"rc": 3}`; datetime read before any write gets OS error
//! 4 (RTC not set); an upload chunk at off > 0 with no session answers
//! `{"off": 0}`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ciborium::Value;
use serde::Serialize;

use crate::model::filesystem::MemFs;
use crate::model::firmware::{Firmware, Pending, SwapType, PRIMARY, SECONDARY};
use crate::model::settings::Settings;
use crate::protocol::mcuboot::{self, ImageHeader, ImageVersion};
use crate::protocol::smp::{self, group, map, MgmtErr, SmpHeader, SmpOp, SmpVersion, HEADER_LEN};
use crate::sans_io::{Input, Output, Peer, SansIoCore};

mod args;
mod fs_group;
mod recovery;
mod settings_group;
mod shell_group;

/// The longest page erase and boot time a device may be given.
const MAX_PAGE_ERASE: Duration = Duration::from_secs(10);
const MAX_BOOT_TIME: Duration = Duration::from_secs(3600);

/// How long after its answer a reset takes effect (Zephyr's default).
pub const RESET_DELAY: Duration = Duration::from_millis(250);

/// Image group errors (Zephyr's `IMG_MGMT_ERR_*`).
pub mod img_err {
    pub const HASH_NOT_FOUND: u16 = 8;
    pub const NO_FREE_SLOT: u16 = 9;
    pub const FLASH_WRITE_FAILED: u16 = 12;
    pub const INVALID_SLOT: u16 = 14;
    pub const INVALID_OFFSET: u16 = 20;
    pub const INVALID_LENGTH: u16 = 21;
    pub const INVALID_IMAGE_HEADER: u16 = 22;
    pub const INVALID_IMAGE_HEADER_MAGIC: u16 = 23;
    pub const INVALID_HASH: u16 = 24;
    pub const CURRENT_VERSION_IS_NEWER: u16 = 27;
    pub const IMAGE_ALREADY_PENDING: u16 = 28;
    pub const INVALID_IMAGE_TOO_LARGE: u16 = 30;
    pub const INVALID_IMAGE_DATA_OVERRUN: u16 = 31;
    pub const SETTING_TEST_TO_ACTIVE_DENIED: u16 = 33;
}

/// OS group errors (Zephyr's `OS_MGMT_ERR_*`).
pub mod os_err {
    pub const INVALID_FORMAT: u16 = 2;
    pub const QUERY_YIELDS_NO_ANSWER: u16 = 3;
    pub const RTC_NOT_SET: u16 = 4;
}

/// Enumeration group error numbers (enum_mgmt.h).
mod enum_err {
    pub const TOO_MANY_GROUP_ENTRIES: u16 = 2;
    pub const INDEX_TOO_LARGE: u16 = 4;
}

/// The groups this server registers, in the order Zephyr's enumeration
/// group lists them (handlers are registered sorted by handler name:
/// enum_mgmt, fs_mgmt, img_mgmt, os_mgmt, settings_mgmt, shell_mgmt,
/// stat_mgmt), with the names and handler counts it reports (a group's
/// handler table is indexed by command id, so the count is the highest
/// id + 1).
const GROUPS: [(u16, &str, u64); 7] = [
    (group::ENUM, "enum mgmt", 4),
    (group::FS, "fs mgmt", 5),
    (group::IMAGE, "img mgmt", 7),
    (group::OS, "os mgmt", 9),
    (group::SETTINGS, "settings mgmt", 4),
    (group::SHELL, "shell mgmt", 1),
    (group::STAT, "stat mgmt", 2),
];

/// Statistics group error numbers (stat_mgmt.h).
mod stat_err {
    pub const INVALID_STAT_NAME: u16 = 3;
}

/// A group error as v1 sees it (Zephyr's `*_translate_error_code`).
fn v1_rc(group_id: u16, rc: u16) -> MgmtErr {
    match (group_id, rc) {
        (group::IMAGE, 3 | 4) => MgmtErr::NoEnt,
        (group::IMAGE, 9 | 27 | 28) => MgmtErr::BadState,
        (group::IMAGE, 15) => MgmtErr::NoMem,
        (group::IMAGE, 14 | 19 | 20 | 21 | 22 | 24 | 25) => MgmtErr::Inval,
        (group::OS, os_err::INVALID_FORMAT) => MgmtErr::Inval,
        (group::OS, os_err::QUERY_YIELDS_NO_ANSWER | os_err::RTC_NOT_SET) => MgmtErr::NoEnt,
        (group::ENUM, enum_err::TOO_MANY_GROUP_ENTRIES) => MgmtErr::Inval,
        (group::STAT, 2 | stat_err::INVALID_STAT_NAME) => MgmtErr::NoEnt,
        (group::STAT, 4) => MgmtErr::Inval,
        (group::SETTINGS, 2) => MgmtErr::Inval,
        (group::SETTINGS, 3 | 4) => MgmtErr::NoEnt,
        (group::FS, 2 | 13) => MgmtErr::Inval,
        (group::FS, 3 | 14) => MgmtErr::NoEnt,
        (group::SHELL, 2 | 3) => MgmtErr::Inval,
        _ => MgmtErr::Unknown,
    }
}

#[derive(Debug, Clone)]
pub struct SmpServerConfig {
    /// Node name (OS info `n`).
    pub name: String,
    /// mcumgr params: the largest message, header included, and how many buffers.
    pub buf_size: u16,
    pub buf_count: u16,
    pub slot_size: usize,
    /// MCUboot mode reported by bootloader info (3: swap using move).
    pub boot_mode: u8,
    pub no_downgrade: bool,
    /// What slot 0 holds at start; `None`: a generated valid image, version 1.0.0.
    pub image: Option<Vec<u8>>,
    /// What slot 1 holds and the swap state at start (default: slot 1 erased, slot 0
    /// confirmed).
    pub slots: crate::model::firmware::SlotState,
    /// How long the device is gone after a reset.
    pub boot_time: Duration,
    /// Files on the device's filesystem (mounted at `/lfs1`) at start.
    pub files: Vec<(String, Vec<u8>)>,
    /// Bytes the filesystem holds; a write past them fails.
    pub fs_capacity: usize,
    /// Settings on flash at start, each root a handler. `None`: no settings
    /// handlers and no storage backend, as Zephyr's smp_svr sample.
    pub settings: Option<BTreeMap<String, Vec<u8>>>,
    /// Shell commands besides Zephyr's `kernel …`: the command line and its output.
    pub shell: Vec<(String, String)>,
    /// Firmware variants and known bugs (`--profile`).
    pub profiles: Vec<SmpProfile>,
    /// Flash write alignment: an upload chunk is accepted up to the last
    /// multiple of it (the image's last chunk whole), and `off` says so.
    /// 1: every byte.
    pub flash_align: usize,
    /// How long the flash takes, which the answers wait for.
    pub flash: FlashTiming,
}

/// Flash timing. The SMP work queue handles one request at a time, so a
/// slow erase delays its answer and every request behind it; requests that
/// come meanwhile wait in the net buffers (`buf_count`; more are dropped).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashTiming {
    pub page_size: usize,
    /// Per page erased (about 85 ms for a 4 KiB page on an nRF52); zero: instant.
    pub page_erase: Duration,
    /// Bytes written a second; `None`: instant.
    pub write_bytes_per_s: Option<u64>,
    /// Erase each page as the upload reaches it (CONFIG_IMG_ERASE_PROGRESSIVELY)
    /// instead of the whole slot at the first chunk.
    pub progressive_erase: bool,
}

impl Default for FlashTiming {
    fn default() -> Self {
        FlashTiming { page_size: 4096, page_erase: Duration::ZERO, write_bytes_per_s: None, progressive_erase: false }
    }
}

impl FlashTiming {
    /// Time to erase the pages that hold `bytes` bytes.
    fn erase(&self, bytes: usize) -> Duration {
        let pages = u32::try_from(bytes.div_ceil(self.page_size.max(1))).unwrap_or(u32::MAX);
        self.page_erase.saturating_mul(pages)
    }

    fn write(&self, bytes: usize) -> Duration {
        match self.write_bytes_per_s {
            Some(rate) if rate > 0 => Duration::from_secs_f64(bytes as f64 / rate as f64),
            _ => Duration::ZERO,
        }
    }
}

/// A firmware variant or a known bug the device reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SmpProfile {
    /// Firmware from before SMP v2: the header's version bits are not
    /// read, every answer is v1 and every error an `rc`.
    V1Only,
    /// `"rc": 0` in every success (CONFIG_MCUMGR_SMP_LEGACY_RC_BEHAVIOUR).
    LegacyRc,
    /// Older img_mgmt: an image erase leaves the upload session, so an
    /// upload resumed by its `sha` continues at the offset from before the
    /// erase over an erased slot (the image ends up corrupt).
    StaleOffsetAfterErase,
    /// MCUboot's serial recovery: the bootloader answering, with its few
    /// commands and `rc` in every answer; uploads go straight to the
    /// primary slot (device/smp_core/recovery.rs).
    SerialRecovery,
    /// The application's reset hook (CONFIG_MCUMGR_GRP_OS_RESET_HOOK)
    /// refuses a reset that is not forced: `{"rc": 10}` (MGMT_ERR_EBUSY);
    /// `"force": true` resets (os_mgmt reads it as a bool: an integer 1 does not force).
    ResetBusy,
}

impl SmpProfile {
    pub const ALL: [SmpProfile; 5] = [SmpProfile::V1Only, SmpProfile::LegacyRc, SmpProfile::StaleOffsetAfterErase, SmpProfile::SerialRecovery, SmpProfile::ResetBusy];

    pub fn name(self) -> &'static str {
        match self {
            SmpProfile::V1Only => "v1-only",
            SmpProfile::LegacyRc => "legacy-rc",
            SmpProfile::StaleOffsetAfterErase => "stale-offset-after-erase",
            SmpProfile::SerialRecovery => "serial-recovery",
            SmpProfile::ResetBusy => "reset-busy",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            SmpProfile::V1Only => "firmware from before SMP v2: every answer v1, every error an rc",
            SmpProfile::LegacyRc => "\"rc\": 0 in every success (strict clients such as smpclient refuse it)",
            SmpProfile::StaleOffsetAfterErase => "an image erase keeps the upload session: a resume by sha goes on at the old offset over an erased slot",
            SmpProfile::SerialRecovery => "MCUboot serial recovery: the bootloader's few commands, rc in every answer, uploads straight into the primary slot",
            SmpProfile::ResetBusy => "the application refuses a reset without force: {\"rc\": 10} (EBUSY); \"force\": true resets (an integer 1 does not: os_mgmt decodes a bool)",
        }
    }
}

/// Where the filesystem is mounted (littlefs in Zephyr's samples).
pub const FS_MOUNT: &str = "/lfs1";

impl Default for SmpServerConfig {
    fn default() -> Self {
        SmpServerConfig {
            name: "hilbench-smp".into(),
            buf_size: 384,
            buf_count: 4,
            slot_size: 0x40000,
            boot_mode: 3,
            no_downgrade: false,
            image: None,
            slots: Default::default(),
            boot_time: Duration::from_millis(500),
            files: Vec::new(),
            fs_capacity: 256 * 1024,
            settings: None,
            shell: Vec::new(),
            profiles: Vec::new(),
            flash_align: 1,
            flash: FlashTiming::default(),
        }
    }
}

/// What the server reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SmpEvent {
    /// A message got no answer, and why.
    Silent { reason: String },
    UploadStarted { len: usize },
    UploadDone { len: usize, matched: Option<bool> },
    /// The secondary was asked for at the next boot.
    Pending { permanent: bool },
    Confirmed,
    Erased { slot: usize },
    ResetRequested,
    /// The application's reset hook refused a reset that was not forced.
    ResetRefused,
    /// The device rebooted and MCUboot ran this swap.
    Rebooted { swap: SwapType },
    /// The boot time passed: the device answers again.
    Up,
}

#[derive(Debug, Clone)]
struct UploadSession {
    sha: Option<Vec<u8>>,
    len: usize,
    off: usize,
    /// How far the slot is erased (progressive erase).
    erased_to: usize,
}

/// Answers whose work is not done yet, and for whom.
#[derive(Debug, Clone)]
struct Deferred {
    due: Duration,
    to: Peer,
    answers: Vec<Vec<u8>>,
}

/// A command's handler: the request's map and the time in, the answer out.
type Handler = fn(&mut SmpServer, &[(Value, Value)], Duration) -> Reply;

/// An answer body, or an error in one of the two forms.
enum Reply {
    Body(Vec<(&'static str, Value)>),
    Rc(MgmtErr),
    Group(u16, u16),
    /// A group error and more keys after it (v1 sees only the translated rc).
    GroupWith(u16, u16, Vec<(&'static str, Value)>),
}

pub struct SmpServer {
    config: SmpServerConfig,
    fw: Firmware,
    upload: Option<UploadSession>,
    /// The serial-recovery profile's upload session.
    recovery: Option<recovery::RecoveryUpload>,
    peers: BTreeSet<Peer>,
    reset_at: Option<Duration>,
    down_until: Option<Duration>,
    /// Seconds since the epoch the RTC was set to, and when.
    rtc: Option<(i64, Duration)>,
    /// When the running image started (stat counters count from here).
    booted_at: Duration,
    fs: MemFs,
    file: Option<fs_group::FileTransfer>,
    settings: Settings,
    /// Flash time the message being handled costs.
    work: Duration,
    /// Until when the work queue is busy, and the answers that wait for it.
    busy_until: Option<Duration>,
    deferred: Vec<Deferred>,
    /// Requests that came while it was busy, oldest first.
    waiting: std::collections::VecDeque<(Peer, Vec<u8>)>,
    events: Vec<SmpEvent>,
}

impl SmpServer {
    pub fn new(config: SmpServerConfig) -> Result<SmpServer, String> {
        let image = match &config.image {
            Some(i) => {
                mcuboot::McubootImage::parse(i).map_err(|e| format!("the image for slot 0 is not an MCUboot image: {e}"))?;
                i.clone()
            }
            None => mcuboot::build_image(ImageVersion { major: 1, ..Default::default() }, b"hilbench smp-server generated image"),
        };
        if image.len() > config.slot_size {
            return Err(format!("the image ({} bytes) does not fit the {}-byte slot", image.len(), config.slot_size));
        }
        if config.buf_size < 64 {
            return Err(format!("buf_size {} is under 64 bytes", config.buf_size));
        }
        if !(1..=4096).contains(&config.flash_align) || !config.flash_align.is_power_of_two() {
            return Err(format!("flash_align {} is not a power of two from 1 to 4096", config.flash_align));
        }
        // Times past these only overflow the clock; no flash or boot is that slow.
        if config.flash.page_erase > MAX_PAGE_ERASE {
            return Err(format!("a page erase of {:?} is more than {MAX_PAGE_ERASE:?}", config.flash.page_erase));
        }
        if config.boot_time > MAX_BOOT_TIME {
            return Err(format!("a boot time of {:?} is more than {MAX_BOOT_TIME:?}", config.boot_time));
        }
        let seeded: usize = config.files.iter().map(|(_, c)| c.len()).sum();
        if seeded > config.fs_capacity {
            return Err(format!("the files given ({seeded} bytes) do not fit the {}-byte filesystem", config.fs_capacity));
        }
        let mut fs = MemFs::new(&[FS_MOUNT]);
        for (path, contents) in &config.files {
            fs.seed(path, contents.clone())?;
        }
        let settings = config.settings.clone().map_or_else(Settings::none, Settings::with_stored);
        let fw = Firmware::with_state(config.slot_size, image, config.slots.clone())?;
        Ok(SmpServer {
            fw,
            config,
            upload: None,
            recovery: None,
            peers: BTreeSet::new(),
            reset_at: None,
            down_until: None,
            rtc: None,
            booted_at: Duration::ZERO,
            fs,
            file: None,
            settings,
            work: Duration::ZERO,
            busy_until: None,
            deferred: Vec::new(),
            waiting: std::collections::VecDeque::new(),
            events: Vec::new(),
        })
    }

    /// The node name (OS info `n`; the UDP link is named after it).
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn firmware(&self) -> &Firmware {
        &self.fw
    }

    pub fn filesystem(&self) -> &MemFs {
        &self.fs
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn take_events(&mut self) -> Vec<SmpEvent> {
        std::mem::take(&mut self.events)
    }

    fn has(&self, p: SmpProfile) -> bool {
        self.config.profiles.contains(&p)
    }

    fn silent(&mut self, reason: impl Into<String>) {
        self.events.push(SmpEvent::Silent { reason: reason.into() });
    }

    /// Every SMP message in `bytes` (one datagram or packet may hold several), answered.
    pub fn handle_bytes(&mut self, bytes: &[u8], now: Duration) -> Vec<Vec<u8>> {
        self.tick(now);
        if self.down_until.is_some() {
            self.silent("rebooting");
            return Vec::new();
        }
        let mut answers = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let Some(header) = SmpHeader::parse(rest) else {
                self.silent(format!("{} bytes are fewer than a header", rest.len()));
                break;
            };
            let end = HEADER_LEN + usize::from(header.len);
            let Some(payload) = rest.get(HEADER_LEN..end) else {
                self.silent(format!("the header says {} payload bytes, {} follow", header.len, rest.len() - HEADER_LEN));
                break;
            };
            rest = &rest[end..];
            if let Some(a) = self.answer(header, payload, now) {
                answers.push(a);
            }
        }
        answers
    }

    fn answer(&mut self, header: SmpHeader, payload: &[u8], now: Duration) -> Option<Vec<u8>> {
        let Some(response) = header.response(0) else {
            self.silent(format!("op {} is not a request", header.op));
            return None;
        };
        // Firmware from before v2 never reads the version bits.
        let version = if self.has(SmpProfile::V1Only) { Some(SmpVersion::V1) } else { header.smp_version() };
        if self.has(SmpProfile::SerialRecovery) {
            // MCUboot only increments the op: the version bits stay as sent.
            let reply = self.recovery_dispatch(&header, payload, now);
            let Reply::Body(entries) = reply else { return None };
            let body = smp::encode_map(entries);
            let mut out = SmpHeader { len: body.len() as u16, ..response }.encode().to_vec();
            out.extend(body);
            return Some(out);
        }
        let reply = match version {
            None => Reply::Rc(MgmtErr::UnsupportedTooNew),
            Some(_) => self.dispatch(&header, payload, now),
        };
        // A reserved version gets its rc 13 in a v2 header, as Zephyr answers.
        let version = version.unwrap_or(SmpVersion::V2);
        let response = SmpHeader { version: version.bits(), ..response };
        let body = match reply {
            Reply::Body(mut entries) => {
                if self.has(SmpProfile::LegacyRc) {
                    entries.push(("rc", Value::from(0)));
                }
                smp::encode_map(entries)
            }
            Reply::Rc(rc) => smp::rc_payload(rc),
            Reply::Group(g, rc) => smp::group_error_payload(version, g, rc, v1_rc(g, rc)),
            Reply::GroupWith(g, rc, more) => match version {
                SmpVersion::V2 => {
                    let mut entries = vec![("err", map(vec![("group", Value::from(g)), ("rc", Value::from(rc))]))];
                    entries.extend(more);
                    smp::encode_map(entries)
                }
                SmpVersion::V1 => smp::rc_payload(v1_rc(g, rc)),
            },
        };
        let body = if HEADER_LEN + body.len() > usize::from(self.config.buf_size) { smp::rc_payload(MgmtErr::MsgSize) } else { body };
        let mut out = SmpHeader { len: body.len() as u16, ..response }.encode().to_vec();
        out.extend(body);
        Some(out)
    }

    fn dispatch(&mut self, h: &SmpHeader, payload: &[u8], now: Duration) -> Reply {
        let read = h.smp_op() == Some(SmpOp::Read);
        let handler: Option<Handler> = match (h.group, h.command, read) {
            (group::OS, 0, _) => Some(Self::echo),
            (group::OS, 2, true) => Some(Self::taskstat),
            (group::OS, 4, true) => Some(Self::datetime_read),
            (group::OS, 4, false) => Some(Self::datetime_write),
            (group::OS, 5, false) => Some(Self::reset),
            (group::OS, 6, true) => Some(Self::params),
            (group::OS, 7, true) => Some(Self::os_info),
            (group::OS, 8, true) => Some(Self::bootloader_info),
            (group::IMAGE, 0, true) => Some(Self::state_read),
            (group::IMAGE, 0, false) => Some(Self::state_write),
            (group::IMAGE, 1, false) => Some(Self::upload),
            (group::IMAGE, 5, false) => Some(Self::erase),
            (group::IMAGE, 6, true) => Some(Self::slot_info),
            (group::STAT, 0, true) => Some(Self::stat_show),
            (group::STAT, 1, true) => Some(Self::stat_list),
            (group::ENUM, 0, true) => Some(Self::enum_count),
            (group::ENUM, 1, true) => Some(Self::enum_list),
            (group::ENUM, 2, true) => Some(Self::enum_single),
            (group::ENUM, 3, true) => Some(Self::enum_details),
            (group::SETTINGS, 0, true) => Some(Self::settings_read),
            (group::SETTINGS, 0, false) => Some(Self::settings_write),
            (group::SETTINGS, 1, false) => Some(Self::settings_delete),
            (group::SETTINGS, 2, false) => Some(Self::settings_commit),
            (group::SETTINGS, 3, true) => Some(Self::settings_load),
            (group::SETTINGS, 3, false) => Some(Self::settings_save),
            (group::FS, 0, true) => Some(Self::fs_download),
            (group::FS, 0, false) => Some(Self::fs_upload),
            (group::FS, 1, true) => Some(Self::fs_status),
            (group::FS, 2, true) => Some(Self::fs_hash),
            (group::FS, 3, true) => Some(Self::fs_types),
            (group::FS, 4, false) => Some(Self::fs_close),
            (group::SHELL, 0, false) => Some(Self::shell_exec),
            _ => None,
        };
        let Some(handler) = handler else { return Reply::Rc(MgmtErr::NotSup) };
        match smp::decode_map(payload) {
            Ok(m) => handler(self, &m, now),
            // Zephyr's handlers that take no arguments never decode the
            // payload: params answers whatever follows the header.
            Err(_) if Self::takes_no_arguments(handler) => handler(self, &[], now),
            Err(_) => Reply::Rc(MgmtErr::Inval),
        }
    }

    fn takes_no_arguments(h: Handler) -> bool {
        let none: [Handler; 13] = [
            Self::taskstat,
            Self::datetime_read,
            Self::params,
            Self::state_read,
            Self::slot_info,
            Self::enum_count,
            Self::enum_list,
            Self::stat_list,
            Self::settings_commit,
            Self::settings_load,
            Self::settings_save,
            Self::fs_types,
            Self::fs_close,
        ];
        none.iter().any(|f| std::ptr::fn_addr_eq(*f, h))
    }

    // --- OS group -------------------------------------------------------------------------

    /// No `d` echoes an empty text, as Zephyr does (its bulk decoder leaves
    /// the string empty); a `d` that is not text is EINVAL.
    fn echo(&mut self, m: &[(Value, Value)], _: Duration) -> Reply {
        match smp::get(m, "d") {
            Some(Value::Text(d)) => Reply::Body(vec![("r", Value::Text(d.clone()))]),
            None => Reply::Body(vec![("r", Value::Text(String::new()))]),
            _ => Reply::Rc(MgmtErr::Inval),
        }
    }

    fn taskstat(&mut self, _: &[(Value, Value)], _: Duration) -> Reply {
        let task = |prio: i64, tid: u64, stkuse: u64, stksiz: u64| {
            map(vec![
                ("prio", Value::from(prio)),
                ("tid", Value::from(tid)),
                ("state", Value::from(0)),
                ("stkuse", Value::from(stkuse)),
                ("stksiz", Value::from(stksiz)),
                ("cswcnt", Value::from(0)),
                ("runtime", Value::from(0)),
                ("last_checkin", Value::from(0)),
                ("next_checkin", Value::from(0)),
            ])
        };
        Reply::Body(vec![("tasks", map(vec![("idle", task(15, 1, 64, 320)), ("main", task(0, 2, 412, 2048)), ("smp_work", task(-2, 3, 780, 2304))]))])
    }

    fn datetime_read(&mut self, _: &[(Value, Value)], now: Duration) -> Reply {
        match self.rtc {
            Some((secs, at)) => Reply::Body(vec![("datetime", Value::Text(format_datetime(secs + now.saturating_sub(at).as_secs() as i64)))]),
            None => Reply::Group(group::OS, os_err::RTC_NOT_SET),
        }
    }

    fn datetime_write(&mut self, m: &[(Value, Value)], now: Duration) -> Reply {
        match smp::get(m, "datetime") {
            Some(Value::Text(t)) => match parse_datetime(t) {
                Some(secs) => {
                    self.rtc = Some((secs, now));
                    Reply::Body(vec![])
                }
                None => Reply::Rc(MgmtErr::Inval),
            },
            _ => Reply::Rc(MgmtErr::Inval),
        }
    }

    fn reset(&mut self, m: &[(Value, Value)], now: Duration) -> Reply {
        // os_mgmt decodes `force` with zcbor_bool_decode and `boot_mode` as a u32 and
        // ignores a failure: any other type (smpclient's integer 1 included) leaves the
        // default and the reset goes ahead, as Zephyr 4.4's own server answers
        // (tests/smp_zephyr_differential.rs).
        let forced = matches!(smp::get(m, "force"), Some(Value::Bool(true)));
        if self.has(SmpProfile::ResetBusy) && !forced {
            self.events.push(SmpEvent::ResetRefused);
            return Reply::Rc(MgmtErr::Busy);
        }
        self.reset_at = Some(now + RESET_DELAY);
        self.events.push(SmpEvent::ResetRequested);
        Reply::Body(vec![])
    }

    fn params(&mut self, _: &[(Value, Value)], _: Duration) -> Reply {
        Reply::Body(vec![("buf_size", Value::from(self.config.buf_size)), ("buf_count", Value::from(self.config.buf_count))])
    }

    fn os_info(&mut self, m: &[(Value, Value)], _: Duration) -> Reply {
        let format = match smp::get(m, "format") {
            None => "s".to_string(),
            Some(Value::Text(f)) => f.clone(),
            Some(_) => return Reply::Rc(MgmtErr::Inval),
        };
        let fields: [(char, &str); 9] = [
            ('s', "Zephyr"),
            ('n', &self.config.name),
            ('r', "v4.4.0-hilbench"),
            ('v', "4.4.0"),
            ('b', "Mon Dec  7 00:00:00 2026"),
            ('m', "arm"),
            ('p', "cortex-m4"),
            ('i', "hilbench_sim/nrf52840"),
            ('o', "Zephyr"),
        ];
        if format.chars().any(|c| c != 'a' && !fields.iter().any(|(f, _)| *f == c)) {
            return Reply::Group(group::OS, os_err::INVALID_FORMAT);
        }
        let all = format.contains('a');
        let output: Vec<&str> = fields.iter().filter(|(c, _)| all || format.contains(*c)).map(|(_, v)| *v).collect();
        Reply::Body(vec![("output", Value::Text(output.join(" ")))])
    }

    fn bootloader_info(&mut self, m: &[(Value, Value)], _: Duration) -> Reply {
        match smp::get(m, "query") {
            None => Reply::Body(vec![("bootloader", Value::Text("MCUboot".into()))]),
            Some(Value::Text(q)) if q == "mode" => {
                let mut body = vec![("mode", Value::from(self.config.boot_mode))];
                if self.config.no_downgrade {
                    body.push(("no-downgrade", Value::Bool(true)));
                }
                Reply::Body(body)
            }
            Some(Value::Text(_)) => Reply::Group(group::OS, os_err::QUERY_YIELDS_NO_ANSWER),
            Some(_) => Reply::Rc(MgmtErr::Inval),
        }
    }

    // --- Image group ----------------------------------------------------------------------

    fn state_body(&self) -> Vec<(&'static str, Value)> {
        let mut images = Vec::new();
        for slot in [PRIMARY, SECONDARY] {
            let Some(img) = self.fw.image(slot) else { continue };
            let f = self.fw.flags(slot);
            images.push(map(vec![
                ("slot", Value::from(slot as u64)),
                ("version", Value::Text(img.header.version.to_string())),
                ("hash", Value::Bytes(img.hash.to_vec())),
                ("bootable", Value::Bool(f.bootable)),
                ("pending", Value::Bool(f.pending)),
                ("confirmed", Value::Bool(f.confirmed)),
                ("active", Value::Bool(f.active)),
                ("permanent", Value::Bool(f.permanent)),
            ]));
        }
        vec![("images", Value::Array(images)), ("splitStatus", Value::from(0))]
    }

    fn state_read(&mut self, _: &[(Value, Value)], _: Duration) -> Reply {
        Reply::Body(self.state_body())
    }

    fn state_write(&mut self, m: &[(Value, Value)], _: Duration) -> Reply {
        let confirm = match smp::get(m, "confirm") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Reply::Rc(MgmtErr::Inval),
        };
        let hash = match smp::get(m, "hash") {
            None => None,
            Some(Value::Bytes(h)) => Some(h.clone()),
            Some(_) => return Reply::Rc(MgmtErr::Inval),
        };
        let slot = match hash {
            None if confirm => PRIMARY,
            None => return Reply::Group(group::IMAGE, img_err::INVALID_HASH),
            Some(h) if h.len() != 32 => return Reply::Group(group::IMAGE, img_err::INVALID_HASH),
            Some(h) => match self.fw.slot_with_hash(&h) {
                Some(s) => s,
                None => return Reply::Group(group::IMAGE, img_err::HASH_NOT_FOUND),
            },
        };
        if slot == PRIMARY {
            if !confirm {
                return Reply::Group(group::IMAGE, img_err::SETTING_TEST_TO_ACTIVE_DENIED);
            }
            if !self.fw.confirmed() {
                self.fw.confirm();
                self.events.push(SmpEvent::Confirmed);
            }
        } else if self.fw.pending().is_some() {
            // Asking again for what is already pending changes nothing, confirm or not.
        } else if !self.fw.confirmed() {
            // Running a test image: the secondary is the revert target.
            return Reply::Group(group::IMAGE, img_err::IMAGE_ALREADY_PENDING);
        } else {
            self.fw.set_pending(if confirm { Pending::Perm } else { Pending::Test });
            self.events.push(SmpEvent::Pending { permanent: confirm });
        }
        Reply::Body(self.state_body())
    }

    fn upload(&mut self, m: &[(Value, Value)], _: Duration) -> Reply {
        let image = smp::get(m, "image").map(smp::as_u64).unwrap_or(Some(0));
        let data = match smp::get(m, "data") {
            Some(Value::Bytes(d)) => d.as_slice(),
            None => &[],
            Some(_) => return Reply::Rc(MgmtErr::Inval),
        };
        let Some(off) = smp::get(m, "off").and_then(smp::as_u64).map(|o| o as usize) else {
            return Reply::Group(group::IMAGE, img_err::INVALID_OFFSET);
        };
        if image != Some(0) {
            return Reply::Group(group::IMAGE, img_err::INVALID_SLOT);
        }
        if off == 0 {
            if let Err(r) = self.start_upload(m, data) {
                return r;
            }
        } else {
            let expected = self.upload.as_ref().map(|u| u.off).unwrap_or(0);
            if off != expected {
                return Reply::Body(vec![("off", Value::from(expected as u64))]);
            }
        }
        let Some(session) = self.upload.as_mut() else { return Reply::Body(vec![("off", Value::from(0))]) };
        if off == 0 && session.off > 0 {
            // Resumed: the same sha, nothing written.
            return Reply::Body(vec![("off", Value::from(session.off as u64))]);
        }
        if off + data.len() > session.len {
            self.upload = None;
            return Reply::Group(group::IMAGE, img_err::INVALID_IMAGE_DATA_OVERRUN);
        }
        // Only whole flash write blocks are written, but the image's end.
        let align = self.config.flash_align;
        let data = if off + data.len() == session.len { data } else { &data[..((off + data.len()) / align * align).saturating_sub(off).min(data.len())] };
        let flash = self.config.flash;
        let end = off + data.len();
        if end > session.erased_to {
            let from = session.erased_to / flash.page_size.max(1) * flash.page_size.max(1);
            self.work += flash.erase(end - from);
            session.erased_to = end.div_ceil(flash.page_size.max(1)) * flash.page_size.max(1);
        }
        self.work += flash.write(data.len());
        if self.fw.write(SECONDARY, off, data).is_err() {
            self.upload = None;
            return Reply::Group(group::IMAGE, img_err::FLASH_WRITE_FAILED);
        }
        session.off = off + data.len();
        let next = session.off;
        let mut body = vec![("off", Value::from(next as u64))];
        if next == session.len {
            let matched = session.sha.as_ref().filter(|s| s.len() == 32).map(|s| mcuboot::sha256(&self.fw.contents(SECONDARY)[..next]) == s.as_slice());
            if let Some(ok) = matched {
                body.push(("match", Value::Bool(ok)));
            }
            self.events.push(SmpEvent::UploadDone { len: next, matched });
            self.upload = None;
        }
        Reply::Body(body)
    }

    /// The first chunk: checks, resume by `sha`, or a new session on an erased secondary.
    fn start_upload(&mut self, m: &[(Value, Value)], data: &[u8]) -> Result<(), Reply> {
        let err = |rc| Err(Reply::Group(group::IMAGE, rc));
        if data.len() < 32 {
            return err(img_err::INVALID_IMAGE_HEADER);
        }
        let Some(len) = smp::get(m, "len").and_then(smp::as_u64).map(|l| l as usize) else { return err(img_err::INVALID_LENGTH) };
        let header = match ImageHeader::parse(data) {
            Ok(h) => h,
            Err(_) => return err(img_err::INVALID_IMAGE_HEADER_MAGIC),
        };
        let sha = match smp::get(m, "sha") {
            None => None,
            Some(Value::Bytes(s)) if s.len() <= 32 => Some(s.clone()),
            Some(_) => return err(img_err::INVALID_HASH),
        };
        if let Some(session) = &self.upload {
            if sha.is_some() && session.sha == sha && session.len == len {
                return Ok(());
            }
        }
        if !self.fw.secondary_free() {
            return err(img_err::NO_FREE_SLOT);
        }
        if len > self.fw.slot_size() {
            return err(img_err::INVALID_IMAGE_TOO_LARGE);
        }
        if smp::get(m, "upgrade") == Some(&Value::Bool(true)) {
            let running = self.fw.image(PRIMARY).map(|i| i.header.version).unwrap_or_default();
            if header.version <= running {
                return err(img_err::CURRENT_VERSION_IS_NEWER);
            }
        }
        self.fw.erase(SECONDARY);
        let flash = self.config.flash;
        let erased_to = if flash.progressive_erase { 0 } else { self.config.slot_size };
        if !flash.progressive_erase {
            self.work += flash.erase(self.config.slot_size);
        }
        self.upload = Some(UploadSession { sha, len, off: 0, erased_to });
        self.events.push(SmpEvent::UploadStarted { len });
        Ok(())
    }

    fn erase(&mut self, m: &[(Value, Value)], _: Duration) -> Reply {
        let slot = match smp::get(m, "slot") {
            None => SECONDARY,
            Some(v) => match smp::as_u64(v) {
                Some(s) if s <= 1 => s as usize,
                Some(_) => return Reply::Group(group::IMAGE, img_err::INVALID_SLOT),
                None => return Reply::Rc(MgmtErr::Inval),
            },
        };
        if slot == PRIMARY || !self.fw.secondary_free() {
            return Reply::Group(group::IMAGE, img_err::NO_FREE_SLOT);
        }
        self.fw.erase(slot);
        self.work += self.config.flash.erase(self.config.slot_size);
        if !self.has(SmpProfile::StaleOffsetAfterErase) {
            self.upload = None;
        }
        self.events.push(SmpEvent::Erased { slot });
        Reply::Body(vec![])
    }

    fn slot_info(&mut self, _: &[(Value, Value)], _: Duration) -> Reply {
        let size = self.fw.slot_size() as u64;
        let slots = Value::Array(vec![
            map(vec![("slot", Value::from(0)), ("size", Value::from(size))]),
            map(vec![("slot", Value::from(1)), ("size", Value::from(size)), ("upload_image_id", Value::from(0))]),
        ]);
        Reply::Body(vec![("images", Value::Array(vec![map(vec![("image", Value::from(0)), ("slots", slots), ("max_image_size", Value::from(size))])]))])
    }

    // --- Statistics group -----------------------------------------------------------------

    /// smp_svr's statistics: `ticks` counts seconds since boot (its main
    /// loop increments it once a second).
    fn stats(&self, now: Duration) -> Vec<(&'static str, Vec<(&'static str, u64)>)> {
        let ticks = now.saturating_sub(self.booted_at).as_secs() & u64::from(u32::MAX);
        vec![("smp_svr_stats", vec![("ticks", ticks)])]
    }

    fn stat_list(&mut self, _: &[(Value, Value)], now: Duration) -> Reply {
        Reply::Body(vec![("stat_list", Value::Array(self.stats(now).into_iter().map(|(n, _)| Value::Text(n.into())).collect()))])
    }

    /// `{"name"}` → `{"name", "fields"}`; an unknown name is group error 3,
    /// a missing or empty one EINVAL (as Zephyr 4.4's native_sim answers).
    fn stat_show(&mut self, m: &[(Value, Value)], now: Duration) -> Reply {
        let name = match smp::get(m, "name") {
            Some(Value::Text(n)) if !n.is_empty() && n.len() < 32 => n.clone(),
            _ => return Reply::Rc(MgmtErr::Inval),
        };
        match self.stats(now).into_iter().find(|(n, _)| *n == name) {
            Some((_, fields)) => Reply::Body(vec![("name", Value::Text(name)), ("fields", map(fields.into_iter().map(|(k, v)| (k, Value::from(v))).collect()))]),
            None => Reply::Group(group::STAT, stat_err::INVALID_STAT_NAME),
        }
    }

    // --- Enumeration group ----------------------------------------------------------------

    fn enum_count(&mut self, _: &[(Value, Value)], _: Duration) -> Reply {
        Reply::Body(vec![("count", Value::from(GROUPS.len() as u64))])
    }

    fn enum_list(&mut self, _: &[(Value, Value)], _: Duration) -> Reply {
        Reply::Body(vec![("groups", Value::Array(GROUPS.iter().map(|g| Value::from(g.0)).collect()))])
    }

    /// `{"index": n}` (0 when absent) → that group's id, and `"end": true` on the last.
    fn enum_single(&mut self, m: &[(Value, Value)], _: Duration) -> Reply {
        let index = match smp::get(m, "index") {
            None => 0,
            Some(v) => match smp::as_u64(v) {
                Some(i) if i <= 65_535 => i as usize,
                _ => return Reply::Rc(MgmtErr::Inval),
            },
        };
        match GROUPS.get(index) {
            None => Reply::Group(group::ENUM, enum_err::INDEX_TOO_LARGE),
            Some(g) if index + 1 == GROUPS.len() => Reply::Body(vec![("group", Value::from(g.0)), ("end", Value::Bool(true))]),
            Some(g) => Reply::Body(vec![("group", Value::from(g.0))]),
        }
    }

    /// `{"groups": [ids]}` selects (an empty or absent list: all, and a
    /// `groups` that is not a list is ignored, as zcbor's bulk decoder skips
    /// it); an entry that is not an unsigned integer is refused.
    fn enum_details(&mut self, m: &[(Value, Value)], _: Duration) -> Reply {
        let wanted: Option<Vec<u64>> = match smp::get(m, "groups") {
            Some(Value::Array(ids)) if !ids.is_empty() => match ids.iter().map(|v| smp::as_u64(v).filter(|x| *x <= u64::from(u32::MAX))).collect::<Option<Vec<u64>>>() {
                Some(v) => Some(v),
                None => return Reply::Rc(MgmtErr::Inval),
            },
            _ => None,
        };
        let groups = GROUPS
            .iter()
            .filter(|g| wanted.as_ref().is_none_or(|w| w.contains(&u64::from(g.0))))
            .map(|&(id, name, handlers)| map(vec![("group", Value::from(id)), ("name", Value::Text(name.into())), ("handlers", Value::from(handlers))]))
            .collect();
        Reply::Body(vec![("groups", Value::Array(groups))])
    }

    // --- Time -----------------------------------------------------------------------------

    /// The device resets by itself now (a watchdog, a brown-out): nothing
    /// answers from here on, and it boots as after an SMP reset. Ignored
    /// while it is already down.
    pub fn reboot_now(&mut self, now: Duration) {
        if self.down_until.is_none() {
            self.reset_at = Some(now);
        }
    }

    /// Runs a due reset or the end of the boot time; returns peers to close.
    pub fn tick(&mut self, now: Duration) -> Vec<Peer> {
        let mut closed = Vec::new();
        if self.reset_at.is_some_and(|t| now >= t) {
            self.reset_at = None;
            closed = std::mem::take(&mut self.peers).into_iter().collect();
            self.upload = None;
            self.recovery = None;
            // An open file was never closed: littlefs keeps what it had.
            self.file = None;
            self.settings.reboot();
            // The work queue and its buffers are gone with the old run.
            self.busy_until = None;
            self.deferred.clear();
            self.waiting.clear();
            let swap = self.fw.boot();
            self.events.push(SmpEvent::Rebooted { swap });
            self.down_until = Some(now + self.config.boot_time);
        }
        if self.down_until.is_some_and(|t| now >= t) {
            self.down_until = None;
            self.booted_at = now;
            self.events.push(SmpEvent::Up);
        }
        closed
    }

    pub fn poll_timeout(&self) -> Option<Duration> {
        [self.reset_at, self.down_until, self.busy_until].into_iter().flatten().min()
    }

    // --- The work queue -------------------------------------------------------------------

    /// Bytes from `from` as the work queue takes them: at once when idle;
    /// when busy, in a net buffer until the work in hand is done (dropped
    /// when every buffer is taken).
    fn receive(&mut self, from: Peer, bytes: &[u8], now: Duration, out: &mut Vec<Output<SmpEvent>>) {
        if self.busy_until.is_some() {
            // One buffer holds the request in work.
            if self.waiting.len() + 1 >= usize::from(self.config.buf_count.max(2)) {
                self.silent("every net buffer holds a request waiting for the flash");
            } else {
                self.waiting.push_back((from, bytes.to_vec()));
            }
            return;
        }
        self.process(from, bytes, now, out);
    }

    /// Handles bytes at `start`; their answers leave when their flash work is done.
    fn process(&mut self, from: Peer, bytes: &[u8], start: Duration, out: &mut Vec<Output<SmpEvent>>) {
        self.work = Duration::ZERO;
        let answers = self.handle_bytes(bytes, start);
        if self.work.is_zero() {
            out.extend(answers.into_iter().map(|b| Output::Send { to: from, bytes: b }));
        } else {
            let due = start.saturating_add(self.work);
            self.busy_until = Some(due);
            self.deferred.push(Deferred { due, to: from, answers });
        }
    }

    /// Answers whose work is done by `now` go out, and waiting requests
    /// are taken in turn, each from the moment the one before finished.
    fn run_queue(&mut self, now: Duration, out: &mut Vec<Output<SmpEvent>>) {
        let mut cursor = now;
        loop {
            match self.busy_until {
                Some(t) if t <= now => {
                    self.busy_until = None;
                    cursor = t;
                    let (done, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred).into_iter().partition(|d| d.due <= now);
                    self.deferred = later;
                    for d in done {
                        out.extend(d.answers.into_iter().map(|b| Output::Send { to: d.to, bytes: b }));
                    }
                }
                Some(_) => break,
                None => {}
            }
            let Some((from, bytes)) = self.waiting.pop_front() else { break };
            self.process(from, &bytes, cursor, out);
        }
    }
}

impl SansIoCore for SmpServer {
    type Event = SmpEvent;

    fn handle_input(&mut self, input: Input<'_>, now: Duration, out: &mut Vec<Output<SmpEvent>>) -> Result<(), String> {
        self.run_queue(now, out);
        let result = match input {
            Input::Bytes { from, bytes } => {
                self.receive(from, bytes, now, out);
                Ok(())
            }
            Input::Connected(p) => {
                if self.down_until.is_some() {
                    out.push(Output::Close(p));
                } else {
                    self.peers.insert(p);
                }
                Ok(())
            }
            Input::Disconnected(p) => {
                self.peers.remove(&p);
                Ok(())
            }
            Input::Set { key, .. } => Err(format!("smp-server has no state key `{key}`")),
            Input::Timeout => Ok(()),
        };
        out.extend(self.tick(now).into_iter().map(Output::Close));
        self.run_queue(now, out);
        out.extend(self.take_events().into_iter().map(Output::Event));
        result
    }

    fn next_wakeup(&self) -> Option<Duration> {
        self.poll_timeout()
    }
}

/// `YYYY-MM-DDTHH:MM:SS` with optional `.fff` and a `Z` or `±HH:MM` zone,
/// as seconds since the epoch (UTC).
fn parse_datetime(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| t.get(r).filter(|s| s.bytes().all(|c| c.is_ascii_digit())).and_then(|s| s.parse::<i64>().ok());
    let (y, mo, d, h, mi, s) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let mut rest = &t[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "" | "Z" => 0,
        z if z.len() == 6 && (z.starts_with('+') || z.starts_with('-')) && z.as_bytes()[3] == b':' => {
            let (zh, zm) = (num_in(z, 1..3)?, num_in(z, 4..6)?);
            let sign = if z.starts_with('-') { -1 } else { 1 };
            sign * (zh * 3600 + zm * 60)
        }
        _ => return None,
    };
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - offset)
}

fn num_in(t: &str, r: std::ops::Range<usize>) -> Option<i64> {
    t.get(r).filter(|s| s.bytes().all(|c| c.is_ascii_digit())).and_then(|s| s.parse().ok())
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC), as Zephyr's datetime read writes it.
fn format_datetime(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::mcuboot::build_image;

    const T0: Duration = Duration::ZERO;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn server() -> SmpServer {
        SmpServer::new(SmpServerConfig::default()).unwrap()
    }

    fn request(version: SmpVersion, op: SmpOp, g: u16, cmd: u8, seq: u8, body: Vec<(&str, Value)>) -> Vec<u8> {
        let payload = smp::encode_map(body);
        let mut b = SmpHeader::new(version, op, g, cmd, seq, payload.len() as u16).encode().to_vec();
        b.extend(payload);
        b
    }

    /// One request, exactly one answer: its header and decoded map.
    fn ask_v(s: &mut SmpServer, version: SmpVersion, op: SmpOp, g: u16, cmd: u8, body: Vec<(&str, Value)>) -> (SmpHeader, Vec<(Value, Value)>) {
        let answers = s.handle_bytes(&request(version, op, g, cmd, 42, body), ms(1));
        assert_eq!(answers.len(), 1, "{answers:?}");
        let f = smp::SmpFrame::parse(&answers[0]).expect("an answer frames exactly");
        (f.header, smp::decode_map(&f.payload).expect("an answer is a map"))
    }

    fn ask(s: &mut SmpServer, op: SmpOp, g: u16, cmd: u8, body: Vec<(&str, Value)>) -> Vec<(Value, Value)> {
        ask_v(s, SmpVersion::V2, op, g, cmd, body).1
    }

    fn rc(m: &[(Value, Value)]) -> Option<u64> {
        smp::get(m, "rc").and_then(smp::as_u64)
    }

    fn group_rc(m: &[(Value, Value)]) -> Option<(u64, u64)> {
        match smp::get(m, "err") {
            Some(Value::Map(e)) => Some((smp::get(e, "group").and_then(smp::as_u64)?, smp::get(e, "rc").and_then(smp::as_u64)?)),
            _ => None,
        }
    }

    fn u(m: &[(Value, Value)], k: &str) -> Option<u64> {
        smp::get(m, k).and_then(smp::as_u64)
    }

    /// Slots in a state answer: (slot, version, pending, confirmed, active, permanent).
    fn slots(m: &[(Value, Value)]) -> Vec<(u64, String, bool, bool, bool, bool)> {
        let Some(Value::Array(images)) = smp::get(m, "images") else { panic!("no images in {m:?}") };
        images
            .iter()
            .map(|i| {
                let Value::Map(i) = i else { panic!("{i:?}") };
                let b = |k: &str| smp::get(i, k) == Some(&Value::Bool(true));
                let Some(Value::Text(v)) = smp::get(i, "version") else { panic!("{i:?}") };
                (u(i, "slot").unwrap(), v.clone(), b("pending"), b("confirmed"), b("active"), b("permanent"))
            })
            .collect()
    }

    fn upload_all(s: &mut SmpServer, image: &[u8], chunk: usize) {
        let sha = mcuboot::sha256(image).to_vec();
        let mut off = 0;
        while off < image.len() {
            let end = (off + chunk).min(image.len());
            let mut body = vec![("off", Value::from(off as u64)), ("data", Value::Bytes(image[off..end].to_vec()))];
            if off == 0 {
                body.extend([("len", Value::from(image.len() as u64)), ("sha", Value::Bytes(sha.clone()))]);
            }
            let a = ask(s, SmpOp::Write, group::IMAGE, 1, body);
            assert_eq!(u(&a, "off"), Some(end as u64), "{a:?}");
            if end == image.len() {
                assert_eq!(smp::get(&a, "match"), Some(&Value::Bool(true)));
            }
            off = end;
        }
    }

    fn reset_and_boot(s: &mut SmpServer, at: Duration) -> SwapType {
        assert!(ask(s, SmpOp::Write, group::OS, 5, vec![]).is_empty());
        s.take_events();
        let closed = s.tick(at + RESET_DELAY);
        let _ = closed;
        let swap = s.take_events().into_iter().find_map(|e| match e {
            SmpEvent::Rebooted { swap } => Some(swap),
            _ => None,
        });
        assert!(s.handle_bytes(&request(SmpVersion::V2, SmpOp::Read, 0, 6, 1, vec![]), at + RESET_DELAY + ms(1)).is_empty(), "silent while booting");
        s.tick(at + Duration::from_secs(5));
        swap.expect("a reboot")
    }

    /// The enumeration group as enum_mgmt.c answers: groups in registration
    /// order, `end` on the last index, a group error past it, and details
    /// filtered by id (an empty list meaning all).
    #[test]
    fn the_enumeration_group_lists_what_is_registered() {
        let mut s = server();
        assert_eq!(u(&ask(&mut s, SmpOp::Read, group::ENUM, 0, vec![]), "count"), Some(7));
        let Some(Value::Array(ids)) = smp::get(&ask(&mut s, SmpOp::Read, group::ENUM, 1, vec![]), "groups").cloned() else { panic!() };
        assert_eq!(ids.iter().filter_map(smp::as_u64).collect::<Vec<_>>(), vec![10, 8, 1, 0, 3, 9, 2]);
        let first = ask(&mut s, SmpOp::Read, group::ENUM, 2, vec![]);
        assert_eq!((u(&first, "group"), smp::get(&first, "end")), (Some(10), None), "no index: index 0");
        let last = ask(&mut s, SmpOp::Read, group::ENUM, 2, vec![("index", Value::from(6))]);
        assert_eq!((u(&last, "group"), smp::get(&last, "end")), (Some(2), Some(&Value::Bool(true))));
        assert_eq!(group_rc(&ask(&mut s, SmpOp::Read, group::ENUM, 2, vec![("index", Value::from(7))])), Some((10, 4)));
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, group::ENUM, 2, vec![("index", Value::from(70_000))])), Some(3));
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, group::ENUM, 2, vec![("index", Value::from(-1))])), Some(3));
        // v1 sees the group error as EUNKNOWN (enum_mgmt_translate_error_code).
        assert_eq!(rc(&ask_v(&mut s, SmpVersion::V1, SmpOp::Read, group::ENUM, 2, vec![("index", Value::from(9))]).1), Some(1));
        let details = |s: &mut SmpServer, body| {
            let Some(Value::Array(g)) = smp::get(&ask(s, SmpOp::Read, group::ENUM, 3, body), "groups").cloned() else { panic!() };
            g.iter()
                .map(|g| {
                    let Value::Map(g) = g else { panic!() };
                    let Some(Value::Text(name)) = smp::get(g, "name") else { panic!() };
                    (u(g, "group").unwrap(), name.clone(), u(g, "handlers").unwrap())
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            details(&mut s, vec![]),
            vec![
                (10, "enum mgmt".into(), 4),
                (8, "fs mgmt".into(), 5),
                (1, "img mgmt".into(), 7),
                (0, "os mgmt".into(), 9),
                (3, "settings mgmt".into(), 4),
                (9, "shell mgmt".into(), 1),
                (2, "stat mgmt".into(), 2)
            ]
        );
        assert_eq!(details(&mut s, vec![("groups", Value::Array(vec![]))]).len(), 7);
        assert_eq!(details(&mut s, vec![("groups", Value::Array(vec![Value::from(0), Value::from(10), Value::from(77)]))]).iter().map(|g| g.0).collect::<Vec<_>>(), vec![10, 0]);
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, group::ENUM, 3, vec![("groups", Value::Array(vec![Value::Text("os".into())]))])), Some(3));
        // Writes and unknown commands are not registered.
        assert_eq!(rc(&ask(&mut s, SmpOp::Write, group::ENUM, 0, vec![])), Some(8));
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, group::ENUM, 4, vec![])), Some(8));
    }

    fn at(s: &mut SmpServer, now: Duration, op: SmpOp, g: u16, cmd: u8, body: Vec<(&str, Value)>) -> Vec<(Value, Value)> {
        let answers = s.handle_bytes(&request(SmpVersion::V2, op, g, cmd, 7, body), now);
        assert_eq!(answers.len(), 1, "{answers:?}");
        smp::decode_map(&smp::SmpFrame::parse(&answers[0]).unwrap().payload).unwrap()
    }

    fn file_chunk(name: &str, off: u64, data: &[u8], len: Option<u64>) -> Vec<(&'static str, Value)> {
        let mut b = vec![("name", Value::Text(name.into())), ("off", Value::from(off)), ("data", Value::Bytes(data.to_vec()))];
        b.extend(len.map(|l| ("len", Value::from(l))));
        b
    }

    fn name(n: &str) -> Vec<(&'static str, Value)> {
        vec![("name", Value::Text(n.into()))]
    }

    /// The file system group as Zephyr 4.4's fs_mgmt answers on native_sim
    /// (each answer here was seen there): an upload is visible to status and
    /// hash once its file closes, a wrong offset closes it and says the
    /// length, a resume appends at the committed size, downloads come in
    /// buf_size − 44 byte chunks.
    #[test]
    fn the_file_system_group_uploads_downloads_and_hashes() {
        let mut s = SmpServer::new(SmpServerConfig { buf_size: 384, files: vec![("/lfs1/etc/motd".into(), b"hi".to_vec())], ..Default::default() }).unwrap();
        let (r, w) = (SmpOp::Read, SmpOp::Write);
        let fs = group::FS;
        assert_eq!(u(&ask(&mut s, w, fs, 0, file_chunk("/lfs1/h.txt", 0, b"hello", Some(11))), "off"), Some(5));
        assert_eq!(u(&ask(&mut s, r, fs, 1, name("/lfs1/h.txt")), "len"), Some(0), "not committed while open");
        let a = ask(&mut s, w, fs, 0, file_chunk("/lfs1/h.txt", 7, b"xx", None));
        assert_eq!((group_rc(&a), u(&a, "len")), (Some((8, 11)), Some(5)));
        assert_eq!(u(&ask(&mut s, r, fs, 1, name("/lfs1/h.txt")), "len"), Some(5), "the mismatch closed it");
        assert_eq!(u(&ask(&mut s, w, fs, 0, file_chunk("/lfs1/h.txt", 5, b" world", None)), "off"), Some(11), "resumed at the committed size");
        let h = ask(&mut s, r, fs, 2, name("/lfs1/h.txt"));
        assert_eq!((smp::get(&h, "type"), u(&h, "len"), u(&h, "output")), (Some(&Value::Text("crc32".into())), Some(5), Some(0x3610_a686)), "crc32 of the committed \"hello\"");
        let d = ask(&mut s, r, fs, 0, vec![("name", Value::Text("/lfs1/h.txt".into())), ("off", Value::from(0))]);
        assert_eq!((smp::get(&d, "data"), u(&d, "len")), (Some(&Value::Bytes(b"hello world".to_vec())), Some(11)), "a download closes the upload");
        let d = ask(&mut s, r, fs, 0, vec![("name", Value::Text("/lfs1/h.txt".into())), ("off", Value::from(20))]);
        assert_eq!((smp::get(&d, "data"), u(&d, "len")), (Some(&Value::Bytes(vec![])), None));
        let h = ask(&mut s, r, fs, 2, vec![("name", Value::Text("/lfs1/h.txt".into())), ("type", Value::Text("sha256".into())), ("off", Value::from(6))]);
        assert_eq!((u(&h, "off"), u(&h, "len"), smp::get(&h, "output")), (Some(6), Some(5), Some(&Value::Bytes(mcuboot::sha256(b"world").to_vec()))));
        // Errors as fs_mgmt gives them.
        assert_eq!(group_rc(&ask(&mut s, r, fs, 2, vec![("name", Value::Text("/lfs1/h.txt".into())), ("type", Value::Text("md5".into()))])), Some((8, 13)));
        assert_eq!(group_rc(&ask(&mut s, r, fs, 2, vec![("name", Value::Text("/lfs1/h.txt".into())), ("off", Value::from(11))])), Some((8, 12)));
        assert_eq!(rc(&ask(&mut s, r, fs, 2, vec![("name", Value::Text("/lfs1/h.txt".into())), ("len", Value::from(0))])), Some(3));
        assert_eq!(group_rc(&ask(&mut s, r, fs, 1, name("/lfs1/nope"))), Some((8, 3)));
        assert_eq!(group_rc(&ask(&mut s, r, fs, 1, name("/lfs1/etc"))), Some((8, 4)));
        assert_eq!(group_rc(&ask(&mut s, r, fs, 1, name("lfs1/x"))), Some((8, 2)));
        assert_eq!(group_rc(&ask(&mut s, w, fs, 0, file_chunk("/lfs2/x", 0, b"a", Some(1)))), Some((8, 14)));
        assert_eq!(group_rc(&ask(&mut s, w, fs, 0, file_chunk("/lfs1/etc", 0, b"a", Some(1)))), Some((8, 1)));
        assert_eq!(rc(&ask(&mut s, w, fs, 0, file_chunk("/lfs1/x", 0, b"a", None))), Some(3), "off 0 needs len");
        assert_eq!(rc(&ask(&mut s, w, fs, 0, file_chunk(&format!("/lfs1/{}", "a".repeat(59)), 0, b"a", Some(1)))), Some(3), "65-byte path");
        assert_eq!(rc(&ask_v(&mut s, SmpVersion::V1, w, fs, 0, file_chunk("/lfs2/x", 0, b"a", Some(1))).1), Some(5), "v1: ENOENT");
        assert!(group_rc(&ask(&mut s, r, fs, 2, name("/lfs1/etc/motd"))).is_none());
        // A multi-chunk download: buf_size 384 → 340-byte chunks.
        let big: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut off = 0;
        while off < big.len() {
            let end = (off + 300).min(big.len());
            let len = (off == 0).then_some(big.len() as u64);
            assert_eq!(u(&ask(&mut s, w, fs, 0, file_chunk("/lfs1/big", off as u64, &big[off..end], len)), "off"), Some(end as u64));
            off = end;
        }
        assert_eq!(u(&ask(&mut s, r, fs, 1, name("/lfs1/big")), "len"), Some(1000), "the last chunk closed it");
        let mut got: Vec<u8> = Vec::new();
        while got.len() < big.len() {
            let d = ask(&mut s, r, fs, 0, vec![("name", Value::Text("/lfs1/big".into())), ("off", Value::from(got.len() as u64))]);
            let Some(Value::Bytes(b)) = smp::get(&d, "data") else { panic!("{d:?}") };
            assert!(b.len() == 340 || got.len() + b.len() == 1000, "{}", b.len());
            got.extend(b);
        }
        assert_eq!(got, big);
        let Some(Value::Map(types)) = smp::get(&ask(&mut s, r, fs, 3, vec![]), "types").cloned() else { panic!() };
        assert_eq!(types.len(), 2);
        assert!(ask(&mut s, w, fs, 4, vec![]).is_empty());
        assert_eq!(rc(&ask(&mut s, r, fs, 4, vec![])), Some(8));
    }

    /// What a write handle holds is lost when the device resets before the
    /// file closes, and closed by itself after 4 s idle.
    #[test]
    fn an_open_upload_is_lost_at_reset_and_closed_when_idle() {
        let mut s = server();
        let (r, w, fs) = (SmpOp::Read, SmpOp::Write, group::FS);
        assert_eq!(u(&at(&mut s, ms(1), w, fs, 0, file_chunk("/lfs1/a", 0, b"abc", Some(10))), "off"), Some(3));
        assert_eq!(u(&at(&mut s, ms(4000), r, fs, 1, name("/lfs1/a")), "len"), Some(0));
        assert_eq!(u(&at(&mut s, ms(4002), r, fs, 1, name("/lfs1/a")), "len"), Some(3), "idle for 4 s: closed");
        assert_eq!(u(&at(&mut s, ms(4003), w, fs, 0, file_chunk("/lfs1/b", 0, b"xyz", Some(10))), "off"), Some(3));
        reset_and_boot(&mut s, ms(4004));
        assert_eq!(u(&at(&mut s, Duration::from_secs(6), r, fs, 1, name("/lfs1/b")), "len"), Some(0), "created, but its bytes were never committed");
    }

    /// The settings group: without storage (Zephyr's smp_svr), every name is
    /// under an unknown root; with settings, values written but not saved
    /// are gone after a reset.
    #[test]
    fn the_settings_group_reads_writes_and_saves() {
        let (r, w, g) = (SmpOp::Read, SmpOp::Write, group::SETTINGS);
        let mut bare = server();
        assert_eq!(group_rc(&ask(&mut bare, r, g, 0, name("foo/bar"))), Some((3, 5)));
        assert_eq!(group_rc(&ask(&mut bare, w, g, 1, name("foo/bar"))), Some((3, 3)));
        assert_eq!(group_rc(&ask(&mut bare, w, g, 3, vec![])), Some((3, 8)));
        assert!(ask(&mut bare, w, g, 2, vec![]).is_empty());
        assert!(ask(&mut bare, r, g, 3, vec![]).is_empty());
        let stored = [("app/mode".to_string(), b"eco".to_vec())].into();
        let mut s = SmpServer::new(SmpServerConfig { settings: Some(stored), ..Default::default() }).unwrap();
        assert_eq!(smp::get(&ask(&mut s, r, g, 0, name("app/mode")), "val"), Some(&Value::Bytes(b"eco".to_vec())));
        assert_eq!(group_rc(&ask(&mut s, r, g, 0, name("app/none"))), Some((3, 3)));
        assert_eq!(group_rc(&ask(&mut s, r, g, 0, name(&"a".repeat(32)))), Some((3, 2)));
        assert_eq!(rc(&ask(&mut s, r, g, 0, name(""))), Some(3));
        assert_eq!(rc(&ask_v(&mut s, SmpVersion::V1, r, g, 0, name("app/none")).1), Some(5));
        assert!(ask(&mut s, w, g, 0, vec![("name", Value::Text("app/mode".into())), ("val", Value::Bytes(vec![7; 40]))]).is_empty());
        let a = ask(&mut s, r, g, 0, vec![("name", Value::Text("app/mode".into())), ("max_size", Value::from(100))]);
        assert_eq!((smp::get(&a, "val"), u(&a, "max_size")), (Some(&Value::Bytes(vec![7; 32])), Some(32)));
        reset_and_boot(&mut s, ms(10));
        assert_eq!(smp::get(&ask(&mut s, r, g, 0, name("app/mode")), "val"), Some(&Value::Bytes(b"eco".to_vec())), "not saved: lost");
        assert!(ask(&mut s, w, g, 0, vec![("name", Value::Text("app/mode".into())), ("val", Value::Bytes(b"boost".to_vec()))]).is_empty());
        assert!(ask(&mut s, w, g, 3, vec![]).is_empty());
        reset_and_boot(&mut s, Duration::from_secs(10));
        assert_eq!(smp::get(&ask(&mut s, r, g, 0, name("app/mode")), "val"), Some(&Value::Bytes(b"boost".to_vec())), "saved: kept");
    }

    /// The shell group: Zephyr's `kernel` commands and the device's own, with
    /// the dummy backend's output, and the line limits shell_mgmt applies.
    #[test]
    fn the_shell_group_runs_commands() {
        let mut s = SmpServer::new(SmpServerConfig { shell: vec![("bms status".into(), "soc 80%\nok\n".into())], ..Default::default() }).unwrap();
        let exec = |s: &mut SmpServer, argv: Vec<Value>| ask(s, SmpOp::Write, group::SHELL, 0, vec![("argv", Value::Array(argv))]);
        let words = |w: &[&str]| w.iter().map(|w| Value::Text(w.to_string())).collect::<Vec<_>>();
        let out = |m: &[(Value, Value)]| (smp::get(m, "o").cloned(), smp::get(m, "ret").and_then(smp::as_i64));
        assert_eq!(out(&exec(&mut s, words(&["kernel", "version"]))), (Some(Value::Text("\r\nZephyr version 4.4.0\r\n".into())), Some(0)));
        assert_eq!(out(&exec(&mut s, words(&["bms", "status"]))), (Some(Value::Text("\r\nsoc 80%\r\nok\r\n".into())), Some(0)));
        assert_eq!(out(&exec(&mut s, words(&["nope"]))), (Some(Value::Text("\r\n\x1b[1;31mnope: command not found\r\n\x1b[m".into())), Some(-8)));
        assert_eq!(out(&exec(&mut s, words(&[""]))), (Some(Value::Text("\r\n".into())), Some(-8)));
        assert_eq!(out(&exec(&mut s, words(&["kernel", "foo"]))).1, Some(1), "help");
        assert_eq!(out(&exec(&mut s, vec![Value::Text("kernel".into()), Value::from(5), Value::Text("version".into())])).1, Some(1), "argv stops at a non-text word");
        assert_eq!(group_rc(&exec(&mut s, vec![])), Some((9, 3)));
        assert_eq!(group_rc(&exec(&mut s, words(&[&"a".repeat(256)]))), Some((9, 2)));
        assert_eq!(group_rc(&exec(&mut s, words(&[&"a".repeat(127), &"b".repeat(128)]))), Some((9, 2)));
        assert_eq!(out(&exec(&mut s, words(&[&"a".repeat(127), &"b".repeat(127)]))).1, Some(-8));
        assert_eq!(rc(&ask(&mut s, SmpOp::Write, group::SHELL, 0, vec![])), Some(3));
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, group::SHELL, 0, vec![("argv", Value::Array(words(&["kernel"])))])), Some(8));
        assert_eq!(rc(&ask_v(&mut s, SmpVersion::V1, SmpOp::Write, group::SHELL, 0, vec![("argv", Value::Array(vec![]))]).1), Some(3));
    }

    /// v1-only firmware answers every request in v1 with `rc` errors;
    /// legacy-rc adds `rc: 0` to successes.
    #[test]
    fn v1_only_and_legacy_rc_profiles() {
        let mut s = SmpServer::new(SmpServerConfig { profiles: vec![SmpProfile::V1Only, SmpProfile::LegacyRc], ..Default::default() }).unwrap();
        let (h, m) = ask_v(&mut s, SmpVersion::V2, SmpOp::Read, group::OS, 6, vec![]);
        assert_eq!((h.version, rc(&m), u(&m, "buf_size")), (0, Some(0), Some(384)));
        let (h, m) = ask_v(&mut s, SmpVersion::V2, SmpOp::Write, group::IMAGE, 0, vec![("hash", Value::Bytes(vec![1; 32]))]);
        assert_eq!((h.version, rc(&m), group_rc(&m)), (0, Some(MgmtErr::Unknown.code()), None), "a group error as v1 sees it");
        let answers = s.handle_bytes(&[0x10, 0, 0, 1, 0, 0, 3, 0, 0xa0], ms(2));
        let f = smp::SmpFrame::parse(&answers[0]).unwrap();
        assert_eq!((f.header.version, f.header.command), (0, 0), "reserved version bits are not read: an echo");
    }

    /// With flash alignment 8, a chunk is written up to the last whole block
    /// and `off` says where to go on; the image's last chunk is written whole.
    #[test]
    fn flash_alignment_truncates_what_a_chunk_writes() {
        let mut s = SmpServer::new(SmpServerConfig { flash_align: 8, ..Default::default() }).unwrap();
        let image = build_image("2.0.0".parse().unwrap(), &[7; 1000]);
        let a = ask(&mut s, SmpOp::Write, group::IMAGE, 1, vec![("off", Value::from(0)), ("data", Value::Bytes(image[..101].to_vec())), ("len", Value::from(image.len() as u64))]);
        assert_eq!(u(&a, "off"), Some(96));
        let a = ask(&mut s, SmpOp::Write, group::IMAGE, 1, vec![("off", Value::from(96)), ("data", Value::Bytes(image[96..].to_vec()))]);
        assert_eq!(u(&a, "off"), Some(image.len() as u64), "the last chunk whole");
        assert_eq!(&s.firmware().contents(SECONDARY)[..image.len()], &image[..]);
        assert!(SmpServer::new(SmpServerConfig { flash_align: 6, ..Default::default() }).is_err());
    }

    /// The stale-offset bug: an erase leaves the session, so the client's
    /// resume (same sha) goes on at the old offset over an erased slot and
    /// the finished upload does not match its sha.
    #[test]
    fn stale_offset_after_erase_corrupts_the_resumed_upload() {
        for (profiles, matches) in [(vec![], true), (vec![SmpProfile::StaleOffsetAfterErase], false)] {
            let mut s = SmpServer::new(SmpServerConfig { profiles, ..Default::default() }).unwrap();
            let image = build_image("2.0.0".parse().unwrap(), &[7; 2000]);
            let sha = Value::Bytes(mcuboot::sha256(&image).to_vec());
            let first = |s: &mut SmpServer| ask(s, SmpOp::Write, group::IMAGE, 1, vec![("off", Value::from(0)), ("data", Value::Bytes(image[..512].to_vec())), ("len", Value::from(image.len() as u64)), ("sha", sha.clone())]);
            assert_eq!(u(&first(&mut s), "off"), Some(512));
            assert!(ask(&mut s, SmpOp::Write, group::IMAGE, 5, vec![]).is_empty());
            assert_eq!(u(&first(&mut s), "off"), Some(512), "a new session, or the stale one resumed");
            let last = ask(&mut s, SmpOp::Write, group::IMAGE, 1, vec![("off", Value::from(512)), ("data", Value::Bytes(image[512..].to_vec()))]);
            assert_eq!(smp::get(&last, "match"), Some(&Value::Bool(matches)));
        }
    }

    /// A slow up-front erase: the first chunk's answer waits for the whole
    /// slot's pages, requests behind it wait in the net buffers and are
    /// answered in turn, and one past the buffers is dropped.
    #[test]
    fn a_slow_erase_delays_the_answer_and_every_request_behind_it() {
        let flash = FlashTiming { page_erase: ms(10), write_bytes_per_s: Some(100_000), ..Default::default() };
        let mut s = SmpServer::new(SmpServerConfig { slot_size: 16 * 4096, buf_count: 3, flash, ..Default::default() }).unwrap();
        let image = build_image("2.0.0".parse().unwrap(), &[7; 1000]);
        let chunk = request(SmpVersion::V2, SmpOp::Write, group::IMAGE, 1, 1, vec![("off", Value::from(0)), ("data", Value::Bytes(image[..500].to_vec())), ("len", Value::from(image.len() as u64))]);
        let echo = |seq| request(SmpVersion::V2, SmpOp::Write, group::OS, 0, seq, vec![("d", Value::Text("hi".into()))]);
        let sent = |out: &[Output<SmpEvent>]| out.iter().filter_map(|o| if let Output::Send { bytes, .. } = o { Some(SmpHeader::parse(bytes).unwrap().seq) } else { None }).collect::<Vec<_>>();
        let mut out = Vec::new();
        s.handle_input(Input::Bytes { from: Peer(0), bytes: &chunk }, ms(0), &mut out).unwrap();
        assert_eq!(sent(&out), Vec::<u8>::new(), "16 pages at 10 ms, then 500 bytes at 100 kB/s");
        assert_eq!(s.next_wakeup(), Some(ms(165)));
        for (seq, at) in [(2, 10), (3, 20), (4, 30)] {
            s.handle_input(Input::Bytes { from: Peer(0), bytes: &echo(seq) }, ms(at), &mut out).unwrap();
        }
        assert!(out.iter().any(|o| matches!(o, Output::Event(SmpEvent::Silent { reason }) if reason.contains("net buffer"))), "the third request finds no buffer");
        out.clear();
        s.handle_input(Input::Timeout, ms(164), &mut out).unwrap();
        assert!(sent(&out).is_empty());
        s.handle_input(Input::Timeout, ms(165), &mut out).unwrap();
        assert_eq!(sent(&out), vec![1, 2, 3], "the chunk, then the two echoes that waited");
    }

    /// Progressive erase: each chunk pays for the pages it reaches first.
    #[test]
    fn progressive_erase_spreads_the_erase_over_the_chunks() {
        let flash = FlashTiming { page_erase: ms(10), progressive_erase: true, ..Default::default() };
        let mut s = SmpServer::new(SmpServerConfig { slot_size: 16 * 4096, flash, ..Default::default() }).unwrap();
        let image = build_image("2.0.0".parse().unwrap(), &[7; 9000]);
        let mut out = Vec::new();
        let mut at = ms(0);
        for (off, end, pages) in [(0usize, 4000usize, 1u64), (4000, 4100, 1), (4100, 8000, 0), (8000, image.len(), 1)] {
            let mut body = vec![("off", Value::from(off as u64)), ("data", Value::Bytes(image[off..end].to_vec()))];
            if off == 0 {
                body.push(("len", Value::from(image.len() as u64)));
            }
            s.handle_input(Input::Bytes { from: Peer(0), bytes: &request(SmpVersion::V2, SmpOp::Write, group::IMAGE, 1, 1, body) }, at, &mut out).unwrap();
            let due = s.next_wakeup();
            assert_eq!(due, (pages > 0).then(|| at + ms(10 * pages)), "chunk at {off}");
            at = due.unwrap_or(at);
            s.handle_input(Input::Timeout, at, &mut out).unwrap();
        }
        assert_eq!(out.iter().filter(|o| matches!(o, Output::Send { .. })).count(), 4);
    }

    /// An answer that does not fit buf_size is EMSGSIZE, as Zephyr answers
    /// `help` on a 384-byte build.
    #[test]
    fn an_answer_too_big_for_the_buffer_is_rc_7() {
        let mut s = SmpServer::new(SmpServerConfig { buf_size: 384, shell: vec![("long".into(), "x".repeat(400))], ..Default::default() }).unwrap();
        let a = ask(&mut s, SmpOp::Write, group::SHELL, 0, vec![("argv", Value::Array(vec![Value::Text("long".into())]))]);
        assert_eq!(rc(&a), Some(7));
    }

    /// The statistics group as Zephyr 4.4's smp_svr answers on native_sim
    /// (no `rc` on success; an unknown name is group error 3, ENOENT in v1).
    #[test]
    fn the_statistics_group_counts_ticks_since_boot() {
        let mut s = SmpServer::new(SmpServerConfig { boot_time: ms(100), ..Default::default() }).unwrap();
        let list = ask(&mut s, SmpOp::Read, group::STAT, 1, vec![]);
        assert_eq!(list, vec![(Value::Text("stat_list".into()), Value::Array(vec![Value::Text("smp_svr_stats".into())]))]);
        let show = |s: &mut SmpServer, at: Duration| {
            let a = s.handle_bytes(&request(SmpVersion::V2, SmpOp::Read, group::STAT, 0, 1, vec![("name", Value::Text("smp_svr_stats".into()))]), at);
            let m = smp::decode_map(&smp::SmpFrame::parse(&a[0]).unwrap().payload).unwrap();
            assert_eq!(smp::get(&m, "name"), Some(&Value::Text("smp_svr_stats".into())));
            let Some(Value::Map(f)) = smp::get(&m, "fields").cloned() else { panic!("{m:?}") };
            u(&f, "ticks").unwrap()
        };
        assert_eq!(show(&mut s, ms(7_500)), 7);
        // A reset starts the count again when the device is back.
        s.handle_bytes(&request(SmpVersion::V2, SmpOp::Write, group::OS, 5, 2, vec![]), ms(8_000));
        s.tick(ms(8_300));
        s.tick(ms(8_500));
        assert_eq!(show(&mut s, ms(10_600)), 2);
        assert_eq!(group_rc(&ask(&mut s, SmpOp::Read, group::STAT, 0, vec![("name", Value::Text("nope".into()))])), Some((2, 3)));
        assert_eq!(rc(&ask_v(&mut s, SmpVersion::V1, SmpOp::Read, group::STAT, 0, vec![("name", Value::Text("nope".into()))]).1), Some(5));
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, group::STAT, 0, vec![])), Some(3));
    }

    #[test]
    fn answers_echo_the_request_header_and_version() {
        let mut s = server();
        let (h, m) = ask_v(&mut s, SmpVersion::V2, SmpOp::Write, group::OS, 0, vec![("d", Value::Text("hi".into()))]);
        assert_eq!((h.version, h.op, h.group, h.seq, h.command), (1, 3, 0, 42, 0));
        assert_eq!(smp::get(&m, "r"), Some(&Value::Text("hi".into())));
        // Echo as a read, v1: a v1 read response.
        let (h, m) = ask_v(&mut s, SmpVersion::V1, SmpOp::Read, group::OS, 0, vec![("d", Value::Text("x".into()))]);
        assert_eq!((h.version, h.op), (0, 1));
        assert_eq!(smp::get(&m, "r"), Some(&Value::Text("x".into())));
        let m = ask(&mut s, SmpOp::Read, group::OS, 6, vec![]);
        assert_eq!((u(&m, "buf_size"), u(&m, "buf_count")), (Some(384), Some(4)));
    }

    #[test]
    fn unknown_groups_commands_and_ops_get_rc_8() {
        let mut s = server();
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, 77, 0, vec![])), Some(8));
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, group::OS, 99, vec![])), Some(8));
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, group::OS, 5, vec![])), Some(8), "reset has no read handler");
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, group::OS, 3, vec![])), Some(8), "no mpstat in Zephyr");
        // A reserved version: rc 13 in a v2 header (Zephyr 4.4 does not echo the version).
        let mut req = request(SmpVersion::V2, SmpOp::Read, group::OS, 6, 1, vec![]);
        req[0] = 2 << 3;
        let a = s.handle_bytes(&req, T0);
        let f = smp::SmpFrame::parse(&a[0]).unwrap();
        assert_eq!((f.header.version, f.header.op), (1, 1));
        assert_eq!(rc(&smp::decode_map(&f.payload).unwrap()), Some(13));
    }

    #[test]
    fn bad_messages_are_answered_or_dropped_as_firmware_does() {
        let mut s = server();
        assert!(s.handle_bytes(&[0, 0, 0], T0).is_empty());
        assert!(s.handle_bytes(&[0, 0, 0, 9, 0, 0, 0, 0, 0xa0], T0).is_empty(), "length past the datagram");
        assert!(s.handle_bytes(&request(SmpVersion::V2, SmpOp::ReadResponse, 0, 0, 0, vec![]), T0).is_empty(), "a response is not answered");
        let mut not_a_map = SmpHeader::new(SmpVersion::V2, SmpOp::Write, 0, 0, 1, 1).encode().to_vec();
        not_a_map.push(0x01);
        let a = s.handle_bytes(&not_a_map, T0);
        assert_eq!(rc(&smp::decode_map(&a[0][8..]).unwrap()), Some(3));
        // Two messages in one datagram: two answers.
        let mut two = request(SmpVersion::V2, SmpOp::Read, 0, 6, 1, vec![]);
        two.extend(request(SmpVersion::V2, SmpOp::Read, 0, 6, 2, vec![]));
        assert_eq!(s.handle_bytes(&two, T0).len(), 2);
        assert!(s.take_events().iter().filter(|e| matches!(e, SmpEvent::Silent { .. })).count() >= 3);
    }

    #[test]
    fn test_reset_confirm_keeps_the_new_image() {
        let mut s = server();
        assert_eq!(slots(&ask(&mut s, SmpOp::Read, group::IMAGE, 0, vec![])), vec![(0, "1.0.0".into(), false, true, true, false)]);
        let new = build_image("2.0.0".parse().unwrap(), &[0x5a; 3000]);
        upload_all(&mut s, &new, 700);
        assert_eq!(slots(&ask(&mut s, SmpOp::Read, group::IMAGE, 0, vec![]))[1], (1, "2.0.0".into(), false, false, false, false));
        let hash = mcuboot::McubootImage::parse(&new).unwrap().hash.to_vec();
        let m = ask(&mut s, SmpOp::Write, group::IMAGE, 0, vec![("hash", Value::Bytes(hash.clone())), ("confirm", Value::Bool(false))]);
        assert_eq!(slots(&m)[1], (1, "2.0.0".into(), true, false, false, false), "state write answers with the state");
        assert_eq!(reset_and_boot(&mut s, ms(10)), SwapType::Test);
        assert_eq!(
            slots(&ask(&mut s, SmpOp::Read, group::IMAGE, 0, vec![])),
            vec![(0, "2.0.0".into(), false, false, true, false), (1, "1.0.0".into(), false, true, false, false)]
        );
        let m = ask(&mut s, SmpOp::Write, group::IMAGE, 0, vec![("confirm", Value::Bool(true))]);
        assert_eq!(slots(&m)[0], (0, "2.0.0".into(), false, true, true, false));
        assert_eq!(reset_and_boot(&mut s, ms(10_000)), SwapType::None);
        assert_eq!(slots(&ask(&mut s, SmpOp::Read, group::IMAGE, 0, vec![]))[0].1, "2.0.0");
    }

    #[test]
    fn an_unconfirmed_test_image_reverts() {
        let mut s = server();
        let new = build_image("1.1.0".parse().unwrap(), b"new");
        upload_all(&mut s, &new, 1000);
        let hash = mcuboot::McubootImage::parse(&new).unwrap().hash.to_vec();
        ask(&mut s, SmpOp::Write, group::IMAGE, 0, vec![("hash", Value::Bytes(hash.clone()))]);
        assert_eq!(reset_and_boot(&mut s, ms(10)), SwapType::Test);
        // Running the test image: testing the revert target again is refused.
        let revert_target = mcuboot::McubootImage::parse(s.firmware().contents(SECONDARY)).unwrap().hash.to_vec();
        assert_eq!(group_rc(&ask(&mut s, SmpOp::Write, group::IMAGE, 0, vec![("hash", Value::Bytes(revert_target))])), Some((1, 28)));
        assert_eq!(reset_and_boot(&mut s, ms(10_000)), SwapType::Revert);
        assert_eq!(slots(&ask(&mut s, SmpOp::Read, group::IMAGE, 0, vec![]))[0], (0, "1.0.0".into(), false, true, true, false));
    }

    #[test]
    fn upload_rules() {
        let mut s = server();
        let img = build_image("2.0.0".parse().unwrap(), &[1; 500]);
        let sha = mcuboot::sha256(&img).to_vec();
        let first = |extra: Vec<(&'static str, Value)>| {
            let mut b = vec![("off", Value::from(0)), ("data", Value::Bytes(img[..100].to_vec())), ("len", Value::from(img.len() as u64)), ("sha", Value::Bytes(sha.clone()))];
            for (k, v) in extra {
                b.retain(|(key, _)| *key != k);
                if v != Value::Null {
                    b.push((k, v));
                }
            }
            b
        };
        let err = |s: &mut SmpServer, body| group_rc(&ask(s, SmpOp::Write, group::IMAGE, 1, body));
        assert_eq!(err(&mut s, first(vec![("off", Value::Null)])), Some((1, 20)));
        assert_eq!(err(&mut s, first(vec![("data", Value::Bytes(img[..31].to_vec()))])), Some((1, 22)));
        assert_eq!(err(&mut s, first(vec![("len", Value::Null)])), Some((1, 21)));
        assert_eq!(err(&mut s, first(vec![("data", Value::Bytes(vec![0; 100]))])), Some((1, 23)));
        assert_eq!(err(&mut s, first(vec![("sha", Value::Bytes(vec![0; 33]))])), Some((1, 24)));
        assert_eq!(err(&mut s, first(vec![("len", Value::from(0x40001))])), Some((1, 30)));
        assert_eq!(err(&mut s, first(vec![("upgrade", Value::Bool(true)), ("data", Value::Bytes(build_image("1.0.0".parse().unwrap(), &[1; 500])[..100].to_vec()))])), Some((1, 27)));
        // v1: the group error becomes an rc (INVALID_OFFSET → EINVAL).
        let (_, m) = ask_v(&mut s, SmpVersion::V1, SmpOp::Write, group::IMAGE, 1, first(vec![("off", Value::Null)]));
        assert_eq!(rc(&m), Some(3));

        assert_eq!(u(&ask(&mut s, SmpOp::Write, group::IMAGE, 1, first(vec![])), "off"), Some(100));
        // A chunk at the wrong offset: success with the expected one, nothing written.
        let m = ask(&mut s, SmpOp::Write, group::IMAGE, 1, vec![("off", Value::from(300)), ("data", Value::Bytes(vec![9; 10]))]);
        assert_eq!((u(&m, "off"), rc(&m), group_rc(&m)), (Some(100), None, None));
        // The same sha at off 0 resumes.
        assert_eq!(u(&ask(&mut s, SmpOp::Write, group::IMAGE, 1, first(vec![])), "off"), Some(100));
        // Past len: overrun, and the session is gone.
        assert_eq!(err(&mut s, vec![("off", Value::from(100)), ("data", Value::Bytes(vec![0; img.len()]))]), Some((1, 31)));
        assert_eq!(u(&ask(&mut s, SmpOp::Write, group::IMAGE, 1, vec![("off", Value::from(100)), ("data", Value::Bytes(vec![0; 4]))]), "off"), Some(0));
        // No free slot while the secondary is pending.
        upload_all(&mut s, &img, 256);
        ask(&mut s, SmpOp::Write, group::IMAGE, 0, vec![("hash", Value::Bytes(mcuboot::McubootImage::parse(&img).unwrap().hash.to_vec()))]);
        assert_eq!(err(&mut s, first(vec![("sha", Value::Bytes(vec![7; 32]))])), Some((1, 9)));
        assert_eq!(group_rc(&ask(&mut s, SmpOp::Write, group::IMAGE, 5, vec![])), Some((1, 9)), "erase of a pending slot");
    }

    #[test]
    fn state_write_rules() {
        let mut s = server();
        let active = mcuboot::McubootImage::parse(s.firmware().contents(PRIMARY)).unwrap().hash.to_vec();
        let w = |s: &mut SmpServer, body| group_rc(&ask(s, SmpOp::Write, group::IMAGE, 0, body));
        assert_eq!(w(&mut s, vec![]), Some((1, 24)));
        assert_eq!(w(&mut s, vec![("hash", Value::Bytes(vec![1; 31]))]), Some((1, 24)));
        assert_eq!(w(&mut s, vec![("hash", Value::Bytes(vec![1; 32]))]), Some((1, 8)));
        assert_eq!(w(&mut s, vec![("hash", Value::Bytes(active.clone()))]), Some((1, 33)));
        assert_eq!(w(&mut s, vec![("hash", Value::Bytes(active)), ("confirm", Value::Bool(true))]), None);
        // Test, then confirm of the same pending slot: a no-op, still TEST.
        let img = build_image("2.0.0".parse().unwrap(), b"two");
        upload_all(&mut s, &img, 1000);
        let hash = mcuboot::McubootImage::parse(&img).unwrap().hash.to_vec();
        ask(&mut s, SmpOp::Write, group::IMAGE, 0, vec![("hash", Value::Bytes(hash.clone()))]);
        let m = ask(&mut s, SmpOp::Write, group::IMAGE, 0, vec![("hash", Value::Bytes(hash)), ("confirm", Value::Bool(true))]);
        assert_eq!(slots(&m)[1], (1, "2.0.0".into(), true, false, false, false));
    }

    #[test]
    fn os_group_answers() {
        let mut s = server();
        assert_eq!(group_rc(&ask(&mut s, SmpOp::Read, group::OS, 4, vec![])), Some((0, 4)), "RTC not set");
        assert!(ask(&mut s, SmpOp::Write, group::OS, 4, vec![("datetime", Value::Text("2026-12-07T03:30:00.123+01:00".into()))]).is_empty());
        assert_eq!(smp::get(&ask(&mut s, SmpOp::Read, group::OS, 4, vec![]), "datetime"), Some(&Value::Text("2026-12-07T02:30:00".into())));
        assert_eq!(rc(&ask(&mut s, SmpOp::Write, group::OS, 4, vec![("datetime", Value::Text("yesterday".into()))])), Some(3));
        let out = |s: &mut SmpServer, f: &str| smp::get(&ask(s, SmpOp::Read, group::OS, 7, vec![("format", Value::Text(f.into()))]), "output").cloned();
        assert_eq!(out(&mut s, "s"), Some(Value::Text("Zephyr".into())));
        assert_eq!(out(&mut s, "a").map(|v| matches!(v, Value::Text(t) if t.starts_with("Zephyr hilbench-smp "))), Some(true));
        assert_eq!(group_rc(&ask(&mut s, SmpOp::Read, group::OS, 7, vec![("format", Value::Text("q".into()))])), Some((0, 2)));
        assert_eq!(smp::get(&ask(&mut s, SmpOp::Read, group::OS, 8, vec![]), "bootloader"), Some(&Value::Text("MCUboot".into())));
        assert_eq!(u(&ask(&mut s, SmpOp::Read, group::OS, 8, vec![("query", Value::Text("mode".into()))]), "mode"), Some(3));
        assert_eq!(group_rc(&ask(&mut s, SmpOp::Read, group::OS, 8, vec![("query", Value::Text("colour".into()))])), Some((0, 3)));
        let (_, m) = ask_v(&mut s, SmpVersion::V1, SmpOp::Read, group::OS, 8, vec![("query", Value::Text("colour".into()))]);
        assert_eq!(rc(&m), Some(5), "v1: QUERY_YIELDS_NO_ANSWER → ENOENT");
        assert!(smp::get(&ask(&mut s, SmpOp::Read, group::OS, 2, vec![]), "tasks").is_some());
    }

    #[test]
    fn legacy_rc_adds_rc_0_to_successes() {
        let mut s = SmpServer::new(SmpServerConfig { profiles: vec![SmpProfile::LegacyRc], ..Default::default() }).unwrap();
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, group::OS, 6, vec![])), Some(0));
        assert_eq!(rc(&ask(&mut s, SmpOp::Read, 77, 0, vec![])), Some(8));
    }

    #[test]
    fn a_reset_closes_every_peer() {
        let mut s = server();
        let mut out = Vec::new();
        s.handle_input(Input::Connected(Peer(1)), T0, &mut out).unwrap();
        s.handle_input(Input::Bytes { from: Peer(1), bytes: &request(SmpVersion::V2, SmpOp::Write, 0, 5, 1, vec![]) }, T0, &mut out).unwrap();
        assert!(out.iter().any(|o| matches!(o, Output::Send { to: Peer(1), .. })));
        assert_eq!(s.next_wakeup(), Some(RESET_DELAY));
        out.clear();
        s.handle_input(Input::Timeout, RESET_DELAY, &mut out).unwrap();
        assert!(out.contains(&Output::Close(Peer(1))));
        assert!(out.contains(&Output::Event(SmpEvent::Rebooted { swap: SwapType::None })));
        out.clear();
        s.handle_input(Input::Connected(Peer(2)), RESET_DELAY + ms(1), &mut out).unwrap();
        assert_eq!(out, vec![Output::Close(Peer(2))], "nothing accepts a connection while booting");
    }

    #[test]
    fn datetimes_round_trip() {
        for t in ["1970-01-01T00:00:00", "2000-02-29T12:34:56", "2026-12-31T23:59:59"] {
            assert_eq!(format_datetime(parse_datetime(t).unwrap()), t);
        }
        assert_eq!(parse_datetime("2026-13-01T00:00:00"), None);
        assert_eq!(parse_datetime("2026-01-01T00:00:00+1"), None);
        // Not ASCII where the zone's colon goes: refused, not a panic on a char boundary.
        assert_eq!(parse_datetime("2026-01-01T00:00:00+0\u{e9}00"), None);
    }

    /// Seeded random datagrams through the fuzz harness (no nightly here):
    /// requests to every handler with random keys and values, mixed with noise.
    #[test]
    fn seeded_random_datagrams_keep_the_invariants() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5350_0002);
        let handlers = [(0u16, 0u8), (0, 2), (0, 4), (0, 5), (0, 6), (0, 7), (0, 8), (1, 0), (1, 1), (1, 5), (1, 6), (9, 0)];
        let keys = ["d", "off", "len", "data", "sha", "hash", "confirm", "image", "upgrade", "slot", "format", "query", "datetime", "force"];
        let img = build_image("3.0.0".parse().unwrap(), &[7; 100]);
        let mut reached = 0;
        for _ in 0..300 {
            let mut data = Vec::new();
            for seq in 0..rng.gen_range(1..20u8) {
                let (g, cmd) = handlers[rng.gen_range(0..handlers.len())];
                let body: Vec<(&str, Value)> = (0..rng.gen_range(0..4))
                    .map(|_| {
                        let v = match rng.gen_range(0..6) {
                            0 => Value::from(rng.gen_range(0..700u64)),
                            1 => Value::Bool(rng.gen()),
                            2 => Value::Text("mode".into()),
                            3 => Value::Bytes(img[..rng.gen_range(0..img.len())].to_vec()),
                            4 => Value::Bytes(mcuboot::McubootImage::parse(&img).unwrap().hash.to_vec()),
                            _ => Value::Bytes((0..rng.gen_range(0..40)).map(|_| rng.gen()).collect()),
                        };
                        (keys[rng.gen_range(0..keys.len())], v)
                    })
                    .collect();
                let version = if rng.gen() { SmpVersion::V2 } else { SmpVersion::V1 };
                let op = if rng.gen() { SmpOp::Read } else { SmpOp::Write };
                data.extend(request(version, op, g, cmd, seq, body));
                if rng.gen_bool(0.1) {
                    data.extend((0..rng.gen_range(0..20)).map(|_| rng.gen::<u8>()));
                }
                if rng.gen_bool(0.5) {
                    data.push(0xc0);
                }
            }
            reached += usize::from(crate::fuzzing::smp_server_answers_are_well_formed(&data));
        }
        assert!(reached > 200, "only {reached} sequences got answers");
    }

    /// reset-busy: the application's reset hook answers EBUSY until the reset is forced.
    #[test]
    fn a_busy_application_refuses_an_unforced_reset() {
        let mut s = SmpServer::new(SmpServerConfig { profiles: vec![SmpProfile::ResetBusy], ..Default::default() }).unwrap();
        // os_mgmt decodes a bool: an integer force (smpclient's 1) does not force.
        for body in [vec![], vec![("force", Value::from(0))], vec![("force", Value::Bool(false))], vec![("force", Value::from(1))]] {
            assert_eq!(rc(&ask(&mut s, SmpOp::Write, group::OS, 5, body)), Some(10));
        }
        assert!(s.take_events().iter().all(|e| *e == SmpEvent::ResetRefused));
        let m = ask(&mut s, SmpOp::Write, group::OS, 5, vec![("force", Value::Bool(true))]);
        assert!(m.is_empty(), "{m:?}");
        assert_eq!(s.take_events(), vec![SmpEvent::ResetRequested]);
    }
}
