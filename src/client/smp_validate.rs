//! `hilbench validate smp-server`: a strict SMP client's checks against one
//! server, real or simulated. It reads params, echoes (v2 and v1), asks an
//! unknown group, reads bootloader info and the image state, then (unless
//! read-only) uploads a generated test image with two forced resumes,
//! marks it for test, resets, confirms and resets again, checking the image
//! state MCUboot should leave after each boot. Every answer's header and
//! payload are checked too, and the upload's throughput is measured.

use std::time::{Duration, Instant};

use ciborium::Value;
use serde::Serialize;

use super::conformance::{check, count, Check, Verdict};
use super::smp_client::{ExchangeError, SmpConn, SmpTarget};
use crate::protocol::mcuboot::{build_image, McubootImage};
use crate::protocol::smp::{self, group, SmpOp, SmpVersion};

#[derive(Debug, Clone)]
pub struct SmpValidateConfig {
    pub target: SmpTarget,
    /// Per-request answer timeout (the first upload chunk, which erases the slot, gets `erase_timeout`).
    pub timeout: Duration,
    /// How long a reset may keep the device away.
    pub boot_timeout: Duration,
    /// How long the first upload chunk may take: its answer waits for the slot's erase.
    pub erase_timeout: Duration,
    /// Only read: no upload, no test, no reset.
    pub read_only: bool,
    /// The image to upload (default: a generated one, one major version up).
    pub image: Option<Vec<u8>>,
    /// Serial: the device's receive line buffers; each request must fit in
    /// this many console lines, or a firmware whose work queue is behind
    /// drops the rest of the burst (smpclient's `line_buffers`).
    pub line_buffers: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SmpValidationReport {
    pub target: String,
    pub buf_size: Option<u64>,
    pub buf_count: Option<u64>,
    /// Image bytes per second after the first chunk (whose answer waits for the erase).
    pub upload_bytes_per_s: Option<f64>,
    pub checks: Vec<Check>,
}

impl SmpValidationReport {
    pub fn new(target: &SmpTarget) -> Self {
        SmpValidationReport { target: target.to_string(), buf_size: None, buf_count: None, upload_bytes_per_s: None, checks: Vec::new() }
    }

    pub fn passed(&self) -> bool {
        count(&self.checks, Verdict::Fail) == 0
    }
}

pub fn render(r: &SmpValidationReport) -> String {
    let mut s = format!("SMP server, {}", r.target);
    if let (Some(b), Some(c)) = (r.buf_size, r.buf_count) {
        s.push_str(&format!(", buf_size {b} × {c}"));
    }
    if let Some(t) = r.upload_bytes_per_s {
        s.push_str(&format!(", upload {t:.0} B/s"));
    }
    s.push('\n');
    s.push_str(&super::conformance::render_checks(&r.checks));
    s
}

type Map = Vec<(Value, Value)>;

/// The session: the connection and what every answer showed.
struct Session<'c> {
    conn: &'c mut SmpConn,
    checks: Vec<Check>,
    answers: usize,
    header_problems: Vec<String>,
    payload_problems: Vec<String>,
    rc_zero: usize,
    skipped: usize,
    /// v2 requests answered in v1.
    v1_answers: usize,
}

/// The first `n` problems, and how many more.
fn first_few(p: &[String], n: usize) -> String {
    let mut s = p.iter().take(n).cloned().collect::<Vec<_>>().join("; ");
    if p.len() > n {
        s.push_str(&format!("; {} more", p.len() - n));
    }
    s
}

/// A group or SMP error in an answer: `{"rc": n}` (n ≠ 0) or `{"err": {"group", "rc"}}`.
fn error_of(m: &Map) -> Option<String> {
    if let Some(Value::Map(e)) = smp::get(m, "err") {
        let g = smp::get(e, "group").and_then(smp::as_u64);
        let rc = smp::get(e, "rc").and_then(smp::as_u64);
        return Some(format!("group error {} of group {}", rc.map_or("?".into(), |r| r.to_string()), g.map_or("?".into(), |g| g.to_string())));
    }
    match smp::get(m, "rc").and_then(smp::as_i64) {
        Some(0) | None => None,
        Some(rc) => {
            let name = u64::try_from(rc).ok().and_then(smp::MgmtErr::from_code).map(|e| format!(" ({e:?})")).unwrap_or_default();
            let hint = if rc == 8 { ": the device does not have this group or command" } else { "" };
            Some(format!("rc {rc}{name}{hint}"))
        }
    }
}

fn text<'a>(m: &'a Map, key: &str) -> Option<&'a str> {
    match smp::get(m, key) {
        Some(Value::Text(t)) => Some(t),
        _ => None,
    }
}

impl Session<'_> {
    fn add(&mut self, name: &'static str, verdict: Verdict, detail: impl Into<String>) {
        self.checks.push(check(name, verdict, detail));
    }

    /// One request; its answer's header and payload go into the tallies.
    async fn ask(&mut self, version: SmpVersion, op: SmpOp, grp: u16, command: u8, body: Vec<(&str, Value)>) -> Result<Map, String> {
        let payload = smp::encode_map(body);
        let what = format!("group {grp} command {command}");
        let ex = match self.conn.exchange(version, op, grp, command, payload).await {
            Ok(ex) => ex,
            Err(ExchangeError::Timeout(d)) => return Err(format!("{what}: no answer within {} ms", d.as_millis())),
            Err(ExchangeError::Malformed(e)) => {
                self.answers += 1;
                self.header_problems.push(format!("{what}: {e}"));
                return Err(format!("{what}: {e}"));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        };
        self.answers += 1;
        self.skipped += ex.skipped;
        let (q, a) = (ex.request_version(), ex.answer.header.version);
        if (q, a) == (1, 0) {
            // Firmware from before SMP v2 answers everything in v1; clients accept it.
            self.v1_answers += 1;
        }
        if let Some(p) = ex.header_problem_besides_v1() {
            self.header_problems.push(format!("{what}: {p}"));
        }
        let m = match smp::decode_map(&ex.answer.payload) {
            Ok(m) => m,
            Err(e) => {
                self.payload_problems.push(format!("{what}: {e}"));
                return Err(format!("{what}: {e}"));
            }
        };
        if smp::get(&m, "rc").and_then(smp::as_i64) == Some(0) {
            self.rc_zero += 1;
        }
        Ok(m)
    }

    async fn read(&mut self, grp: u16, command: u8, body: Vec<(&str, Value)>) -> Result<Map, String> {
        self.ask(SmpVersion::V2, SmpOp::Read, grp, command, body).await
    }

    async fn write(&mut self, grp: u16, command: u8, body: Vec<(&str, Value)>) -> Result<Map, String> {
        self.ask(SmpVersion::V2, SmpOp::Write, grp, command, body).await
    }

    /// An answer that must be a success: an error or no answer fails `name`.
    fn success(&mut self, name: &'static str, r: Result<Map, String>) -> Option<Map> {
        match r {
            Ok(m) => match error_of(&m) {
                None => Some(m),
                Some(e) => {
                    self.add(name, Verdict::Fail, e);
                    None
                }
            },
            Err(e) => {
                self.add(name, Verdict::Fail, e);
                None
            }
        }
    }
}

/// Runs every check; a server that does not answer at all ends the run early.
pub async fn validate(cfg: &SmpValidateConfig) -> SmpValidationReport {
    let mut report = SmpValidationReport::new(&cfg.target);
    let mut conn = match SmpConn::connect(&cfg.target, cfg.timeout).await {
        Ok(c) => c,
        Err(e) => {
            report.checks.push(check("connect", Verdict::Fail, e));
            return report;
        }
    };
    validate_on(&mut conn, cfg, report).await
}

/// [`validate`] on a connection already open (a scenario's smp-client's).
pub async fn validate_on(conn: &mut SmpConn, cfg: &SmpValidateConfig, mut report: SmpValidationReport) -> SmpValidationReport {
    let mut s = Session { conn, checks: Vec::new(), answers: 0, header_problems: Vec::new(), payload_problems: Vec::new(), rc_zero: 0, skipped: 0, v1_answers: 0 };
    let buf_size = params(&mut s, &mut report).await;
    if s.answers > 0 {
        echo(&mut s).await;
        unknown_group(&mut s).await;
        bootloader_info(&mut s).await;
        let states = state_read(&mut s, "state_read").await;
        if !cfg.read_only {
            if let Some(states) = states {
                update(&mut s, cfg, buf_size.unwrap_or(384), &states, &mut report).await;
            }
        }
    }
    answers_checks(&mut s);
    report.checks = s.checks;
    report
}

async fn params(s: &mut Session<'_>, report: &mut SmpValidationReport) -> Option<usize> {
    let m = s.read(group::OS, 6, vec![]).await;
    let m = s.success("params", m)?;
    let size = smp::get(&m, "buf_size").and_then(smp::as_u64);
    let count = smp::get(&m, "buf_count").and_then(smp::as_u64);
    match (size, count) {
        (Some(b), Some(c)) if b >= 64 => {
            report.buf_size = Some(b);
            report.buf_count = Some(c);
            s.add("params", Verdict::Pass, format!("buf_size {b}, buf_count {c}"));
            Some(b as usize)
        }
        _ => {
            s.add("params", Verdict::Fail, format!("buf_size and buf_count must be unsigned integers (buf_size ≥ 64): {m:?}"));
            None
        }
    }
}

async fn echo(s: &mut Session<'_>) {
    let said = "hilbench validate";
    let m = s.write(group::OS, 0, vec![("d", Value::Text(said.into()))]).await;
    if let Some(m) = s.success("echo", m) {
        match text(&m, "r") {
            Some(r) if r == said => s.add("echo", Verdict::Pass, "v2 echo answered with the same text"),
            other => s.add("echo", Verdict::Fail, format!("`r` is {other:?}, not {said:?}")),
        }
    }
    // A v1 request gets a v1 answer; a header check on it says so.
    let before = s.header_problems.len();
    let m = s.ask(SmpVersion::V1, SmpOp::Write, group::OS, 0, vec![("d", Value::Text("v1".into()))]).await;
    if let Some(m) = s.success("echo_v1", m) {
        match (text(&m, "r"), s.header_problems.len() == before) {
            (Some("v1"), true) => s.add("echo_v1", Verdict::Pass, "a v1 request got a v1 answer"),
            (_, false) => {
                let p = s.header_problems[before].clone();
                s.add("echo_v1", Verdict::Fail, p)
            }
            (r, true) => s.add("echo_v1", Verdict::Fail, format!("`r` is {r:?}, not \"v1\"")),
        }
    }
}

/// Zephyr answers a group it does not have with `{"rc": 8}` (MGMT_ERR_ENOTSUP).
async fn unknown_group(s: &mut Session<'_>) {
    const NOBODY: u16 = 0x7fe0;
    match s.read(NOBODY, 0, vec![]).await {
        Ok(m) => match (smp::get(&m, "rc").and_then(smp::as_i64), error_of(&m)) {
            (Some(8), _) => s.add("unknown_group", Verdict::Pass, "group 32736 answered {\"rc\": 8} (not supported), as Zephyr does"),
            (_, Some(e)) => s.add("unknown_group", Verdict::Warn, format!("group 32736 answered {e}; Zephyr answers rc 8 and clients look for it")),
            (_, None) => s.add("unknown_group", Verdict::Fail, "group 32736, which nobody has, answered a success"),
        },
        Err(e) => s.add("unknown_group", Verdict::Warn, format!("{e}; Zephyr answers {{\"rc\": 8}}")),
    }
}

async fn bootloader_info(s: &mut Session<'_>) {
    let m = match s.read(group::OS, 8, vec![]).await {
        Ok(m) => m,
        Err(e) => return s.add("bootloader_info", Verdict::Fail, e),
    };
    if smp::get(&m, "rc").and_then(smp::as_i64) == Some(8) {
        return s.add("bootloader_info", Verdict::Warn, "not supported (rc 8): older firmware; clients cannot tell the swap mode");
    }
    let Some(name) = text(&m, "bootloader").map(str::to_string) else {
        return s.add("bootloader_info", Verdict::Fail, format!("no `bootloader` text: {}", error_of(&m).unwrap_or_else(|| format!("{m:?}"))));
    };
    let mode = match s.read(group::OS, 8, vec![("query", Value::Text("mode".into()))]).await {
        Ok(m) => smp::get(&m, "mode").and_then(smp::as_i64),
        Err(_) => None,
    };
    match (name.as_str(), mode) {
        ("MCUboot", Some(m)) if (0..=9).contains(&m) => s.add("bootloader_info", Verdict::Pass, format!("MCUboot, mode {m}")),
        ("MCUboot", m) => s.add("bootloader_info", Verdict::Fail, format!("MCUboot, but the mode query gave {m:?} (0..=9 expected)")),
        (other, _) => s.add("bootloader_info", Verdict::Warn, format!("bootloader {other:?}, not MCUboot")),
    }
}

/// One slot as state read reports it.
#[derive(Debug, Clone, PartialEq)]
struct SlotState {
    image: u64,
    slot: u64,
    version: String,
    hash: Vec<u8>,
    pending: bool,
    confirmed: bool,
    active: bool,
    permanent: bool,
}

fn slot_states(m: &Map) -> Result<Vec<SlotState>, String> {
    let Some(Value::Array(images)) = smp::get(m, "images") else { return Err("no `images` array".into()) };
    let mut out = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let Value::Map(e) = img else { return Err(format!("images[{i}] is not a map")) };
        let flag = |k: &str| -> Result<bool, String> {
            match smp::get(e, k) {
                None => Ok(false), // a frugal list omits false flags
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(format!("images[{i}].{k} is {v:?}, not a bool")),
            }
        };
        let slot = smp::get(e, "slot").and_then(smp::as_u64).ok_or_else(|| format!("images[{i}] has no unsigned `slot`"))?;
        let version = text(e, "version").ok_or_else(|| format!("images[{i}] has no `version` text"))?.to_string();
        let parts: Vec<_> = version.split('.').collect();
        if !(3..=4).contains(&parts.len()) || parts.iter().any(|p| p.parse::<u64>().is_err()) {
            return Err(format!("images[{i}].version {version:?} is not maj.min.rev[.build]"));
        }
        let hash = match smp::get(e, "hash") {
            Some(Value::Bytes(h)) if h.len() == 32 => h.clone(),
            other => return Err(format!("images[{i}].hash is {other:?}, not 32 bytes")),
        };
        out.push(SlotState {
            image: smp::get(e, "image").and_then(smp::as_u64).unwrap_or(0),
            slot,
            version,
            hash,
            pending: flag("pending")?,
            confirmed: flag("confirmed")?,
            active: flag("active")?,
            permanent: flag("permanent")?,
        });
    }
    Ok(out)
}

/// The flag rules of the reference: one active slot per image; a permanent
/// slot is pending; the active slot is not pending.
fn flag_problem(states: &[SlotState]) -> Option<String> {
    let mut images: Vec<u64> = states.iter().map(|s| s.image).collect();
    images.dedup();
    for img in images {
        let active = states.iter().filter(|s| s.image == img && s.active).count();
        if active != 1 {
            return Some(format!("image {img} has {active} active slots"));
        }
    }
    if let Some(s) = states.iter().find(|s| s.permanent && !s.pending) {
        return Some(format!("slot {} is permanent but not pending", s.slot));
    }
    if let Some(s) = states.iter().find(|s| s.active && s.pending) {
        return Some(format!("slot {} is active and pending", s.slot));
    }
    None
}

fn show(states: &[SlotState]) -> String {
    let flags = |s: &SlotState| {
        let f: Vec<&str> = [(s.active, "active"), (s.confirmed, "confirmed"), (s.pending, "pending"), (s.permanent, "permanent")].into_iter().filter(|(on, _)| *on).map(|(_, n)| n).collect();
        f.join("+")
    };
    states.iter().map(|s| format!("slot {} {} [{}]", s.slot, s.version, flags(s))).collect::<Vec<_>>().join(", ")
}

/// A state read, checked: its shape and its flags.
async fn state_read(s: &mut Session<'_>, name: &'static str) -> Option<Vec<SlotState>> {
    let m = s.read(group::IMAGE, 0, vec![]).await;
    let m = s.success(name, m)?;
    judge_states(s, name, &m)
}

fn judge_states(s: &mut Session<'_>, name: &'static str, m: &Map) -> Option<Vec<SlotState>> {
    match slot_states(m) {
        Err(e) => {
            s.add(name, Verdict::Fail, e);
            None
        }
        Ok(states) => {
            match flag_problem(&states) {
                Some(p) => s.add(name, Verdict::Fail, format!("{p}: {}", show(&states))),
                None => s.add(name, Verdict::Pass, show(&states)),
            }
            Some(states)
        }
    }
}

/// Bytes of image data per upload chunk that fit `buf_size` with the
/// header and the first chunk's other keys (`image`, `len`, `off`, `sha`),
/// exactly as they encode; a serial packet's length and CRC take 4 more
/// (taken on UDP too: slightly smaller chunks there do no harm).
fn chunk_room(buf_size: usize, image_len: usize, sha: &[u8]) -> usize {
    let keys = smp::encode_map(vec![
        ("image", Value::Integer(0.into())),
        ("len", Value::Integer(image_len.into())),
        ("off", Value::Integer(0.into())),
        ("sha", Value::Bytes(sha.to_vec())),
        ("data", Value::Bytes(Vec::new())),
    ]);
    // The data's length grows its CBOR head from 1 byte to at most 3 (up to 65535 bytes).
    buf_size.saturating_sub(smp::HEADER_LEN + 4 + keys.len() + 2).max(32)
}

/// The upload, test, reset, confirm and reset, each checked.
async fn update(s: &mut Session<'_>, cfg: &SmpValidateConfig, buf_size: usize, before: &[SlotState], report: &mut SmpValidationReport) {
    let image = cfg.image.clone().unwrap_or_else(|| generated_image(before));
    let Ok(parsed) = McubootImage::parse(&image) else {
        return s.add("upload", Verdict::Fail, "the image to upload is not an MCUboot image");
    };
    let version = parsed.header.version.to_string();
    // A console line carries 93 bytes of the packet (124 base64 characters).
    let limit = cfg.line_buffers.map_or(buf_size, |n| buf_size.min(93 * n.max(1)));
    if !upload(s, &image, limit, cfg.erase_timeout, report).await {
        return;
    }
    let Some(after) = state_read(s, "state_after_upload").await else { return };
    match after.iter().find(|x| x.slot == 1 && x.image == 0) {
        Some(x) if x.hash == parsed.hash && x.version == version => {}
        other => return s.add("state_after_upload", Verdict::Fail, format!("slot 1 should hold {version} with the image's hash; it is {other:?}")),
    }
    // Test: the secondary is pending, not permanent.
    let m = s.write(group::IMAGE, 0, vec![("hash", Value::Bytes(parsed.hash.to_vec())), ("confirm", Value::Bool(false))]).await;
    let Some(m) = s.success("test", m) else { return };
    match slot_states(&m) {
        Ok(st) if st.iter().any(|x| x.slot == 1 && x.pending && !x.permanent) => s.add("test", Verdict::Pass, show(&st)),
        Ok(st) => return s.add("test", Verdict::Fail, format!("slot 1 should be pending (test): {}", show(&st))),
        Err(e) => return s.add("test", Verdict::Fail, format!("the answer is not a state: {e}")),
    }
    if !reset(s, cfg, "reset_after_test").await {
        return;
    }
    let Some(st) = state_read(s, "state_after_test_boot").await else { return };
    let running = st.iter().find(|x| x.active);
    if !running.is_some_and(|x| x.version == version && !x.confirmed) {
        return s.add("swap_test", Verdict::Fail, format!("after the test boot {version} should run unconfirmed: {}", show(&st)));
    }
    s.add("swap_test", Verdict::Pass, format!("{version} runs unconfirmed; the next boot would revert it"));
    let m = s.write(group::IMAGE, 0, vec![("confirm", Value::Bool(true))]).await;
    let Some(m) = s.success("confirm", m) else { return };
    match slot_states(&m) {
        Ok(st) if st.iter().any(|x| x.active && x.confirmed && x.version == version) => s.add("confirm", Verdict::Pass, show(&st)),
        Ok(st) => return s.add("confirm", Verdict::Fail, format!("{version} should be active and confirmed: {}", show(&st))),
        Err(e) => return s.add("confirm", Verdict::Fail, format!("the answer is not a state: {e}")),
    }
    if !reset(s, cfg, "reset_after_confirm").await {
        return;
    }
    let Some(st) = state_read(s, "state_after_confirm_boot").await else { return };
    match st.iter().find(|x| x.active) {
        Some(x) if x.version == version && x.confirmed => s.add("swap_confirmed", Verdict::Pass, format!("{version} stays, confirmed")),
        _ => s.add("swap_confirmed", Verdict::Fail, format!("{version} should stay after the confirmed boot: {}", show(&st))),
    }
}

/// One major version above the running image, 12 KiB of patterned body.
fn generated_image(before: &[SlotState]) -> Vec<u8> {
    let major = before.iter().find(|s| s.active).and_then(|s| s.version.split('.').next()?.parse::<u8>().ok()).unwrap_or(1);
    let body: Vec<u8> = (0..12_288u32).map(|i| (i % 251) as u8).collect();
    build_image(format!("{}.0.0", major.wrapping_add(1).max(1)).parse().expect("a version"), &body)
}

/// The upload with two forced resumes: a fresh start with the same `sha`
/// (the server must answer its current `off`, writing nothing) and a chunk
/// past the expected offset (success with the expected `off`, data dropped).
async fn upload(s: &mut Session<'_>, image: &[u8], buf_size: usize, erase_timeout: Duration, report: &mut SmpValidationReport) -> bool {
    let sha = crate::protocol::mcuboot::sha256(image).to_vec();
    let room = chunk_room(buf_size, image.len(), &sha);
    let chunk = |off: usize| Value::Bytes(image[off..(off + room).min(image.len())].to_vec());
    let first = vec![("image", Value::Integer(0.into())), ("len", Value::Integer(image.len().into())), ("off", Value::Integer(0.into())), ("sha", Value::Bytes(sha.clone())), ("data", chunk(0))];
    // The first chunk erases the slot: clients wait up to 40 s for it.
    let normal = s.conn.timeout;
    s.conn.timeout = normal.max(erase_timeout);
    let m = s.write(group::IMAGE, 1, first).await;
    s.conn.timeout = normal;
    let Some(m) = s.success("upload", m) else { return false };
    let Some(mut off) = smp::get(&m, "off").and_then(smp::as_u64).map(|o| o as usize) else {
        s.add("upload", Verdict::Fail, format!("the first chunk's answer has no `off`: {m:?}"));
        return false;
    };
    if off == 0 || off > image.len() {
        s.add("upload", Verdict::Fail, format!("the first chunk was answered with `off` {off}: no progress or past the {}-byte image", image.len()));
        return false;
    }
    let started = Instant::now();
    let (mut chunks, mut resumed) = (1usize, false);
    while off < image.len() {
        if chunks == 3 && !resumed {
            resumed = true;
            match forced_resumes(s, image, &sha, off, room).await {
                Some(now) => off = now,
                None => return false,
            }
        }
        let m = s.write(group::IMAGE, 1, vec![("image", Value::Integer(0.into())), ("off", Value::Integer(off.into())), ("data", chunk(off))]).await;
        let Some(m) = s.success("upload", m) else { return false };
        let Some(next) = smp::get(&m, "off").and_then(smp::as_u64).map(|o| o as usize) else {
            s.add("upload", Verdict::Fail, format!("a chunk's answer at offset {off} has no `off`"));
            return false;
        };
        if next <= off || next > image.len() {
            s.add("upload", Verdict::Fail, format!("a chunk at offset {off} was answered with `off` {next}: no progress or past the image"));
            return false;
        }
        if next == image.len() {
            if let Some(Value::Bool(false)) = smp::get(&m, "match") {
                s.add("upload", Verdict::Fail, "the last chunk's answer says \"match\": false (the SHA-256 of the upload differs)");
                return false;
            }
        }
        off = next;
        chunks += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = (image.len() as f64 / secs.max(1e-6)).round();
    report.upload_bytes_per_s = Some(rate);
    s.add("upload", Verdict::Pass, format!("{} bytes in {chunks} chunks of up to {room}, {rate:.0} B/s after the first chunk", image.len()));
    true
}

/// Returns the offset the server stands at afterwards.
async fn forced_resumes(s: &mut Session<'_>, image: &[u8], sha: &[u8], off: usize, room: usize) -> Option<usize> {
    // The same session key again from offset 0: resume, not restart.
    let again = vec![
        ("image", Value::Integer(0.into())),
        ("len", Value::Integer(image.len().into())),
        ("off", Value::Integer(0.into())),
        ("sha", Value::Bytes(sha.to_vec())),
        ("data", Value::Bytes(image[..room.min(image.len())].to_vec())),
    ];
    let now = match s.write(group::IMAGE, 1, again).await.map(|m| (error_of(&m), smp::get(&m, "off").and_then(smp::as_u64))) {
        Ok((None, Some(o))) if o as usize == off => {
            s.add("resume_same_sha", Verdict::Pass, format!("a new start with the same sha was answered with the current offset {off}"));
            off
        }
        Ok((None, Some(o))) if (o as usize) < off => {
            s.add("resume_same_sha", Verdict::Warn, format!("a new start with the same sha restarted at {o} instead of resuming at {off} (older servers)"));
            o as usize
        }
        other => {
            s.add("resume_same_sha", Verdict::Fail, format!("a new start with the same sha at offset {off}: {other:?}"));
            return None;
        }
    };
    // A chunk past the expected offset: success with the expected offset, its data dropped.
    let ahead = (now + 64).min(image.len().saturating_sub(1));
    let m = s.write(group::IMAGE, 1, vec![("image", Value::Integer(0.into())), ("off", Value::Integer(ahead.into())), ("data", Value::Bytes(image[ahead..(ahead + 32).min(image.len())].to_vec()))]).await;
    match m.map(|m| (error_of(&m), smp::get(&m, "off").and_then(smp::as_u64))) {
        Ok((None, Some(o))) if o as usize == now => s.add("resume_wrong_offset", Verdict::Pass, format!("a chunk at {ahead} was answered with the expected offset {now}, its data dropped")),
        other => s.add("resume_wrong_offset", Verdict::Fail, format!("a chunk at {ahead} (expected {now}) was answered {other:?}")),
    }
    Some(now)
}

/// Resets and waits until the device has gone and answers again.
async fn reset(s: &mut Session<'_>, cfg: &SmpValidateConfig, name: &'static str) -> bool {
    let m = s.write(group::OS, 5, vec![]).await;
    if s.success(name, m).is_none() {
        return false;
    }
    let asked = Instant::now();
    let normal = s.conn.timeout;
    s.conn.timeout = Duration::from_millis(200);
    // It answers for a moment after the reply (Zephyr resets 250 ms later); then it is gone.
    // Over BLE the link drops at the reset, and the next request connects again.
    let links = s.conn.reconnects();
    let mut gone = false;
    while asked.elapsed() < Duration::from_secs(3) {
        if s.read(group::OS, 6, vec![]).await.is_err() || s.conn.reconnects() > links {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut back = None;
    while gone && asked.elapsed() < cfg.boot_timeout {
        if s.read(group::OS, 6, vec![]).await.is_ok() {
            back = Some(asked.elapsed());
            break;
        }
    }
    s.conn.timeout = normal;
    match (gone, back) {
        (false, _) => {
            s.add(name, Verdict::Fail, "it kept answering 3 s after the reset: no reboot");
            false
        }
        (true, None) => {
            s.add(name, Verdict::Fail, format!("gone after the reset, and not back within {} s", cfg.boot_timeout.as_secs()));
            false
        }
        (true, Some(t)) => {
            s.add(name, Verdict::Pass, format!("gone after the reset, answering again {} ms after it", t.as_millis()));
            true
        }
    }
}

/// The checks over every answer of the run.
fn answers_checks(s: &mut Session<'_>) {
    let n = s.answers;
    let h = std::mem::take(&mut s.header_problems);
    match h.is_empty() {
        true => s.add("headers", Verdict::Pass, format!("{n} answers: version, op, group, seq, command and length as asked")),
        false => s.add("headers", Verdict::Fail, format!("{} of {n} answers: {}", h.len(), first_few(&h, 3))),
    }
    let p = std::mem::take(&mut s.payload_problems);
    match p.is_empty() {
        true => s.add("payloads", Verdict::Pass, format!("{n} answers: one CBOR map each")),
        false => s.add("payloads", Verdict::Fail, format!("{} of {n} answers: {}", p.len(), first_few(&p, 3))),
    }
    if s.rc_zero > 0 {
        let z = s.rc_zero;
        s.add("success_form", Verdict::Warn, format!("{z} successes carry \"rc\": 0 (legacy); strict clients (smpclient) reject them"));
    }
    if s.v1_answers > 0 {
        let v = s.v1_answers;
        s.add("v1_answers", Verdict::Warn, format!("{v} v2 requests were answered in v1 (firmware without SMP v2): group errors arrive as a bare rc, losing which group failed"));
    }
    if s.skipped > 0 {
        let k = s.skipped;
        s.add("late_answers", Verdict::Warn, format!("{k} answers came with another request's seq (late or duplicated)"));
    }
}
