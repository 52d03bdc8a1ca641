//! `hilbench capture import`: a capture from the field (pcapng, pcap, btsnoop, a hex
//! dump, JSON Lines) becomes one normalized fixture per device.
//!
//! The file is read as a stream ([`crate::protocol::capture_file`] for the binary
//! containers, line by line for text), turned into frames (Modbus RTU from Wireshark's
//! exported-PDU records, ATT PDUs from Bluetooth HCI through [`crate::protocol::hci`],
//! bytes from text), and grouped by link: an interface, a BLE connection, a text source.
//! Each link's first [`IDENTIFY_WINDOW`] frames are shown to every device kind
//! ([`crate::kind::Kind::recognise`]); the kind that recognises most of them (decisive
//! proof counting first) is the link's kind, and its verdicts then split the link into
//! devices (a Modbus bus into slave addresses) and give every frame its meaning. Frames
//! stream to a temporary file per device; the fixture is its header line then its frames,
//! so memory stays flat in the capture's size.
//!
//! Fixture format (JSON Lines): the first line is a [`FixtureHeader`], every other line a
//! [`FixtureFrame`]. Times are nanoseconds since the device's first frame; the header
//! keeps the absolute start.

mod skeleton;
mod sources;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::kind::{self, Role};
use crate::link::recognise::{CaptureTransport, CapturedFrameView, FrameVerdict};
use crate::link::record::Direction;

pub use skeleton::ScenarioReport;
pub use sources::{SourceFrame, SourceKind};

/// How many frames of a link decide its kind before the rest stream through.
pub const IDENTIFY_WINDOW: usize = 256;

/// The fixture format's version, in every header.
pub const FIXTURE_VERSION: u32 = 1;

/// Links one import follows; frames of further links are counted as a gap (each link
/// holds up to [`IDENTIFY_WINDOW`] frames while its kind is decided).
pub const MAX_LINKS: usize = 4096;
/// Devices one import writes; each holds an open temporary file until the end.
pub const MAX_DEVICES: usize = 1024;

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Where fixtures go (created if missing).
    pub out_dir: PathBuf,
    /// Forces the kind of every link instead of identifying it.
    pub kind: Option<String>,
    /// Handle → UUID for BLE logs that start after the GATT discovery.
    pub gatt: Vec<(u16, uuid::Uuid)>,
    /// The scenarios simulate the devices in the captured state instead of replaying them.
    pub as_state: bool,
}

/// How sure the importer is of a device's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    /// No kind recognised the frames.
    None,
    Low,
    Medium,
    High,
    /// `--kind` said so.
    Given,
}

/// Something the importer skipped or could not use, and where.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportGap {
    /// `byte N (record M)` or `line N`.
    pub at: String,
    pub what: String,
}

/// The first line of a fixture.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FixtureHeader {
    pub hilbench_fixture: u32,
    /// The capture it came from.
    pub source: String,
    /// The device: link, and unit on a shared medium.
    pub device: String,
    pub transport: CaptureTransport,
    pub kind: Option<String>,
    pub confidence: Confidence,
    /// Why: how many frames the kind recognised, how many by proof.
    pub evidence: String,
    pub frames: u64,
    /// Unix time of the first frame, in nanoseconds (0 when the source has no times).
    pub start_unix_ns: u64,
    /// BLE: attribute handle → characteristic UUID, as learnt from the discovery.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gatt: BTreeMap<u16, String>,
}

/// One frame of a fixture.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FixtureFrame {
    /// Nanoseconds since the device's first frame.
    pub t_ns: u64,
    /// `request`: from the client (bus master, GATT client); `response`: from the device.
    pub dir: Direction,
    /// The frame as it was on the wire (for BLE the whole ATT PDU).
    pub hex: String,
    /// BLE: the ATT opcode's name and the handle and UUID it is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub att: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// What the device kind decoded, when it recognised the frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meaning: Option<String>,
}

/// What one import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub source: PathBuf,
    /// pcapng, pcap, btsnoop (datalink N), hex dump, JSON Lines.
    pub format: String,
    pub frames: u64,
    pub devices: Vec<DeviceReport>,
    pub gaps: Vec<ImportGap>,
    /// Set when the file could not be read to its end: what and where.
    pub error: Option<String>,
    /// The scenario written per link, or why none was.
    pub scenarios: Vec<ScenarioReport>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceReport {
    pub device: String,
    /// The link it was captured on, and its unit there when the link is shared.
    pub link: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub transport: CaptureTransport,
    pub frames: u64,
    pub kind: Option<String>,
    pub confidence: Confidence,
    pub evidence: String,
    pub fixture: PathBuf,
}

/// Why an import could not start.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
    #[error("--kind {0}: no device kind has that name (known: {1})")]
    UnknownKind(String, String),
}

/// Checks a `--kind` before anything is read.
pub fn check_kind(name: &str) -> Result<(), ImportError> {
    if kind::find(Role::Device, name).is_some() {
        return Ok(());
    }
    Err(ImportError::UnknownKind(name.to_string(), kind::names(Role::Device).join(", ")))
}

/// Imports one file (see the module docs).
pub fn import_file(path: &Path, opts: &ImportOptions) -> Result<ImportReport, ImportError> {
    if let Some(k) = &opts.kind {
        check_kind(k)?;
    }
    let io = |source| ImportError::Io { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(io)?;
    let mut head = [0u8; 16];
    let n = read_up_to(&mut file, &mut head).map_err(io)?;
    let source_kind = sources::sniff(&head[..n]).ok_or_else(|| ImportError::Format {
        path: path.to_owned(),
        what: format!(
            "not a capture this importer reads: starts with {} (pcapng, pcap, btsnoop, a hex dump or JSON Lines)",
            crate::protocol::lower_hex(&head[..n.min(8)])
        ),
    })?;
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| ImportError::Io { path: opts.out_dir.clone(), source })?;
    let reader = std::io::Read::chain(std::io::Cursor::new(head[..n].to_vec()), file);
    let stem = path.file_stem().map_or_else(|| "capture".to_string(), |s| s.to_string_lossy().into_owned());
    let mut importer = Importer::new(path, &stem, opts);
    let mut gaps = Vec::new();
    let outcome = sources::read(source_kind, reader, &mut |f| importer.frame(f), &mut |g| gaps.push(g));
    importer.gaps = gaps;
    let error = match outcome {
        Ok(()) => None,
        Err(sources::SourceError::Io(e)) => return Err(io(e)),
        Err(sources::SourceError::Located(e)) => Some(e),
    };
    let (devices, gaps, frames) = importer.finish().map_err(io)?;
    if let (0, Some(what)) = (frames, &error) {
        // Nothing came out before the error: the file is refused, not imported.
        return Err(ImportError::Format { path: path.to_owned(), what: what.clone() });
    }
    let scenarios = skeleton::write_all(&stem, path, &opts.out_dir, &devices, opts.as_state);
    Ok(ImportReport { source: path.to_owned(), format: source_kind.to_string(), frames, devices, gaps, error, scenarios })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// One link's frames while its kind is being decided, then the kind.
struct LinkState {
    transport: CaptureTransport,
    pending: Vec<SourceFrame>,
    kind: Option<&'static dyn kind::Kind>,
    decided: bool,
    evidence: (usize, usize, usize),
    /// The unit the last request went to (a reply that no kind recognises belongs there).
    last_unit: Option<String>,
    gatt: BTreeMap<u16, uuid::Uuid>,
}

struct DeviceSink {
    device: String,
    transport: CaptureTransport,
    kind: Option<&'static dyn kind::Kind>,
    link_evidence: (usize, usize, usize),
    writer: BufWriter<tempfile::NamedTempFile>,
    frames: u64,
    /// Frames with protocol bytes (not ATT discovery or MTU exchange).
    payload_frames: u64,
    recognised: u64,
    decisive: u64,
    start_ns: Option<u64>,
    /// The link it is on (whose GATT table its header gets).
    link: String,
}

struct Importer<'o> {
    opts: &'o ImportOptions,
    source: String,
    stem: String,
    links: HashMap<String, LinkState>,
    devices: BTreeMap<String, DeviceSink>,
    gaps: Vec<ImportGap>,
    frames: u64,
    forced: Option<&'static dyn kind::Kind>,
    /// Frames left out past [`MAX_LINKS`] and [`MAX_DEVICES`].
    skipped_links: u64,
    skipped_devices: u64,
}

impl<'o> Importer<'o> {
    fn new(path: &Path, stem: &str, opts: &'o ImportOptions) -> Self {
        let forced = opts.kind.as_deref().and_then(|k| kind::find(Role::Device, k));
        Importer {
            opts,
            source: path.display().to_string(),
            stem: stem.to_string(),
            links: HashMap::new(),
            devices: BTreeMap::new(),
            gaps: Vec::new(),
            frames: 0,
            forced,
            skipped_links: 0,
            skipped_devices: 0,
        }
    }

    fn frame(&mut self, f: SourceFrame) -> std::io::Result<()> {
        self.frames += 1;
        if !self.links.contains_key(&f.link) && self.links.len() >= MAX_LINKS {
            self.skipped_links += 1;
            return Ok(());
        }
        let given = &self.opts.gatt;
        let link = self.links.entry(f.link.clone()).or_insert_with(|| LinkState {
            transport: f.transport,
            pending: Vec::new(),
            kind: None,
            decided: false,
            evidence: (0, 0, 0),
            last_unit: None,
            gatt: if f.transport == CaptureTransport::BleAtt { given.iter().copied().collect() } else { BTreeMap::new() },
        });
        link.gatt.extend(f.learnt.iter().copied());
        if link.decided {
            let name = f.link.clone();
            return self.emit(&name, f);
        }
        link.pending.push(f);
        if link.pending.len() >= IDENTIFY_WINDOW {
            let name = link.pending[0].link.clone();
            self.decide(&name)?;
        }
        Ok(())
    }

    /// Picks the link's kind from its pending frames and writes them out.
    fn decide(&mut self, name: &str) -> std::io::Result<()> {
        let Some(link) = self.links.get_mut(name) else { return Ok(()) };
        let pending = std::mem::take(&mut link.pending);
        let (kind, evidence) = match self.forced {
            Some(k) => (Some(k), score(k, &pending, &link.gatt)),
            None => best_kind(&pending, &link.gatt),
        };
        link.kind = kind;
        link.evidence = evidence;
        link.decided = true;
        for f in pending {
            self.emit(name, f)?;
        }
        Ok(())
    }

    fn emit(&mut self, link_name: &str, f: SourceFrame) -> std::io::Result<()> {
        let Some(link) = self.links.get_mut(link_name) else { return Ok(()) };
        let view = f.view(&link.gatt);
        let verdict = link.kind.and_then(|k| k.recognise(&view));
        let unit = match (&verdict, f.direction) {
            (Some(FrameVerdict { unit: Some(u), .. }), _) => Some(u.clone()),
            (_, Direction::Response) => link.last_unit.clone(),
            _ => None,
        };
        if f.direction == Direction::Request && unit.is_some() {
            link.last_unit = unit.clone();
        }
        let device = match &unit {
            Some(u) => format!("{link_name}/{u}"),
            None => link_name.to_string(),
        };
        let uuid = view.uuid;
        let has_payload = !view.bytes.is_empty();
        let (kind, evidence, transport) = (link.kind, link.evidence, link.transport);
        if !self.devices.contains_key(&device) {
            if self.devices.len() >= MAX_DEVICES {
                self.skipped_devices += 1;
                return Ok(());
            }
            let tmp = tempfile::NamedTempFile::new_in(&self.opts.out_dir)?;
            self.devices.insert(
                device.clone(),
                DeviceSink {
                    device: device.clone(),
                    transport,
                    kind,
                    link_evidence: evidence,
                    writer: BufWriter::new(tmp),
                    frames: 0,
                    payload_frames: 0,
                    recognised: 0,
                    decisive: 0,
                    start_ns: None,
                    link: link_name.to_string(),
                },
            );
        }
        let Some(sink) = self.devices.get_mut(&device) else { return Ok(()) };
        let start = *sink.start_ns.get_or_insert(f.t_ns.unwrap_or(0));
        sink.frames += 1;
        sink.payload_frames += u64::from(has_payload);
        if let Some(v) = &verdict {
            sink.recognised += 1;
            sink.decisive += u64::from(v.decisive);
        }
        let line = FixtureFrame {
            t_ns: f.t_ns.unwrap_or(0).saturating_sub(start),
            dir: f.direction,
            hex: crate::protocol::lower_hex(&f.bytes),
            att: f.att_opcode.map(|op| crate::protocol::hci::att_opcode_name(op).to_string()),
            handle: f.handle,
            uuid: uuid.map(|u| u.to_string()),
            meaning: verdict.map(|v| v.meaning),
        };
        serde_json::to_writer(&mut sink.writer, &line)?;
        sink.writer.write_all(b"\n")
    }

    fn finish(mut self) -> std::io::Result<(Vec<DeviceReport>, Vec<ImportGap>, u64)> {
        let mut names: Vec<String> = self.links.iter().filter(|(_, l)| !l.decided).map(|(n, _)| n.clone()).collect();
        names.sort();
        for n in names {
            self.decide(&n)?;
        }
        let mut reports = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (_, sink) in std::mem::take(&mut self.devices) {
            reports.push(self.write_fixture(sink, &mut names)?);
        }
        for (n, what) in [(self.skipped_links, format!("more than {MAX_LINKS} links")), (self.skipped_devices, format!("more than {MAX_DEVICES} devices"))] {
            if n > 0 {
                self.gaps.push(ImportGap { at: "the whole file".into(), what: format!("{what}: {n} frames of the later ones were left out") });
            }
        }
        Ok((reports, self.gaps, self.frames))
    }

    /// Writes one device's fixture under a name no other device of this import took (two
    /// devices whose names differ only in punctuation would otherwise overwrite each other).
    fn write_fixture(&self, sink: DeviceSink, taken: &mut std::collections::HashSet<String>) -> std::io::Result<DeviceReport> {
        let (confidence, evidence) = judge(&sink, self.forced.is_some());
        let header = FixtureHeader {
            hilbench_fixture: FIXTURE_VERSION,
            source: self.source.clone(),
            device: sink.device.clone(),
            transport: sink.transport,
            kind: sink.kind.map(|k| k.name().to_string()),
            confidence,
            evidence: evidence.clone(),
            frames: sink.frames,
            start_unix_ns: sink.start_ns.unwrap_or(0),
            gatt: self.links.get(&sink.link).map(|l| l.gatt.iter().map(|(h, u)| (*h, u.to_string())).collect()).unwrap_or_default(),
        };
        let base = slug(&sink.device);
        let name = (1..).map(|i| if i == 1 { base.clone() } else { format!("{base}-{i}") }).find(|n| taken.insert(n.clone())).unwrap_or(base);
        let path = self.opts.out_dir.join(format!("{}.{name}.jsonl", self.stem));
        let frames = sink.writer.into_inner().map_err(|e| e.into_error())?;
        let mut out = BufWriter::new(File::create(&path)?);
        serde_json::to_writer(&mut out, &header)?;
        out.write_all(b"\n")?;
        let mut reader = frames.reopen()?;
        std::io::copy(&mut reader, &mut out)?;
        out.flush()?;
        let unit = sink.device.strip_prefix(&sink.link).and_then(|u| u.strip_prefix('/')).map(str::to_string);
        Ok(DeviceReport {
            link: sink.link,
            unit,
            device: sink.device,
            transport: sink.transport,
            frames: sink.frames,
            kind: header.kind,
            confidence,
            evidence,
            fixture: path,
        })
    }
}

/// (frames recognised, of them by proof, frames shown) for one kind.
fn score(k: &dyn kind::Kind, frames: &[SourceFrame], gatt: &BTreeMap<u16, uuid::Uuid>) -> (usize, usize, usize) {
    let mut recognised = 0;
    let mut decisive = 0;
    for f in frames {
        if let Some(v) = k.recognise(&f.view(gatt)) {
            recognised += 1;
            decisive += usize::from(v.decisive);
        }
    }
    (recognised, decisive, frames.len())
}

/// The device kind that recognises the most frames, proof first; None when none does.
fn best_kind(frames: &[SourceFrame], gatt: &BTreeMap<u16, uuid::Uuid>) -> (Option<&'static dyn kind::Kind>, (usize, usize, usize)) {
    let mut best: Option<(&'static dyn kind::Kind, (usize, usize, usize))> = None;
    for k in kind::all().into_iter().filter(|k| k.role() == Role::Device) {
        let s = score(k, frames, gatt);
        if s.0 == 0 {
            continue;
        }
        if best.is_none_or(|(_, b)| (s.1, s.0) > (b.1, b.0)) {
            best = Some((k, s));
        }
    }
    match best {
        Some((k, s)) => (Some(k), s),
        None => (None, (0, 0, frames.len())),
    }
}

fn judge(sink: &DeviceSink, forced: bool) -> (Confidence, String) {
    let Some(k) = sink.kind else {
        return (Confidence::None, format!("no device kind recognised any of the link's {} frames", sink.link_evidence.2));
    };
    let share = sink.recognised as f64 / sink.payload_frames.max(1) as f64;
    let evidence = format!(
        "{} recognised {} of {} frames with a payload ({} by checksum or characteristic; {} frames in all)",
        k.name(),
        sink.recognised,
        sink.payload_frames,
        sink.decisive,
        sink.frames
    );
    let confidence = if forced {
        Confidence::Given
    } else if sink.decisive > 0 && share >= 0.8 {
        Confidence::High
    } else if share >= 0.5 {
        Confidence::Medium
    } else {
        Confidence::Low
    };
    (confidence, evidence)
}

/// A device name as a file-name part.
fn slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        out.push(if c.is_ascii_alphanumeric() || c == '_' { c.to_ascii_lowercase() } else { '-' });
    }
    out.trim_matches('-').to_string()
}

impl SourceFrame {
    fn view<'a>(&'a self, gatt: &BTreeMap<u16, uuid::Uuid>) -> CapturedFrameView<'a> {
        CapturedFrameView {
            transport: self.transport,
            direction: self.direction,
            bytes: &self.bytes[self.value_at.min(self.bytes.len())..],
            uuid: self.handle.and_then(|h| gatt.get(&h).copied()),
            att_opcode: self.att_opcode,
        }
    }
}

/// Reads a fixture back: its header and frames (tests, replay).
pub fn read_fixture(path: &Path) -> Result<(FixtureHeader, Vec<FixtureFrame>), String> {
    read_fixture_head(path, usize::MAX)
}

/// A fixture's header and its first `max` frames, read line by line.
pub fn read_fixture_head(path: &Path, max: usize) -> Result<(FixtureHeader, Vec<FixtureFrame>), String> {
    use std::io::BufRead;
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = std::io::BufReader::new(file).lines().enumerate();
    let first = match lines.next() {
        Some((_, l)) => l.map_err(|e| format!("{}:1: {e}", path.display()))?,
        None => return Err(format!("{}: empty fixture", path.display())),
    };
    let header: FixtureHeader = serde_json::from_str(&first).map_err(|e| format!("{}:1: {e}", path.display()))?;
    let mut frames = Vec::new();
    for (i, l) in lines.take(max) {
        let l = l.map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        frames.push(serde_json::from_str(&l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?);
    }
    Ok((header, frames))
}

#[cfg(test)]
mod tests;
