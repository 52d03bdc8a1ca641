//! The fault vocabulary shared by every transport, and the sans-IO engine
//! that applies it to frames.
//!
//! A link sits between an actor and its transport. Every frame that crosses
//! it goes through [`LinkEngine::process`], which records it and returns the
//! emissions that should actually reach the other side (possibly none,
//! possibly several, possibly later). The engine never sleeps and never does
//! I/O: the owning actor schedules the emissions. All randomness comes from a
//! seeded ChaCha RNG, so a scenario run replays exactly.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};


use super::record::{Direction, FrameRecord};

/// What a link can do to a frame. Orthogonal and composable: several rules
/// can be active on one link, and they apply in the order they were added.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LinkFault {
    /// The frame vanishes.
    Drop,
    /// The frame arrives late, by `ms` plus a uniform random `0..=jitter_ms`.
    Delay {
        ms: u64,
        #[serde(default)]
        jitter_ms: u64,
    },
    /// Bytes are damaged: XOR `mask` at the given offsets, or at `count`
    /// random offsets; with `fill`, every byte is replaced by that value
    /// (a pack on the wrong protocol answering 0xFF).
    Corrupt {
        #[serde(default)]
        offsets: Vec<usize>,
        #[serde(default)]
        count: Option<usize>,
        mask: u8,
        #[serde(default)]
        fill: Option<u8>,
    },
    /// The protocol's checksum is wrong but everything else is intact.
    /// Where the checksum is comes from the link's owner (CRC-16 for Modbus
    /// RTU, the check byte for EG4 7E/0D, the two-byte sum for JBD); a frame
    /// that holds no checksum (a middle BLE notification) passes untouched
    /// and does not use the fault up.
    BadChecksum { layout: ChecksumLayout },
    /// The frame is sent twice, `gap_ms` apart.
    Duplicate {
        #[serde(default)]
        gap_ms: u64,
    },
    /// The frame is cut into pieces, at `offsets` or every `chunk` bytes,
    /// with `gap_ms` of silence between pieces.
    Split {
        #[serde(default)]
        offsets: Vec<usize>,
        #[serde(default)]
        chunk: Option<usize>,
        #[serde(default)]
        gap_ms: u64,
    },
    /// Only the first `keep` bytes arrive.
    Truncate { keep: usize },
    /// Noise on the line before and/or after the frame.
    Garbage {
        #[serde(default)]
        before: Vec<u8>,
        #[serde(default)]
        after: Vec<u8>,
    },
    /// The frame is also reflected back to its sender (an RS-485 adapter
    /// that hears its own transmission).
    Echo,
    /// Nothing passes for `ms` from the moment the fault is applied.
    Stall { ms: u64 },
    /// The link is cut until the fault is cleared.
    Cut,
    // Connection-level faults, for stream links ([`super::conn`] decides, [`super::stream`] acts).
    /// The connection is reset (RST): at once, or after `bytes` more bytes.
    Reset { bytes: Option<u64> },
    /// A new connection is accepted at TCP and closed at once.
    AcceptClose,
    /// A new connection is refused.
    Refuse,
    /// Nothing moves either way and nothing closes (a Wi-Fi drop).
    HalfOpen,
    /// Every byte arrives `ms` late, in order.
    Latency { ms: u64 },
    /// At most `bytes_per_s` bytes a second.
    Bandwidth { bytes_per_s: u64 },
    /// The connection is closed gracefully (FIN both ways) after `bytes` more bytes.
    CloseAfter { bytes: u64 },
    /// A close, from either end, goes out `ms` late.
    SlowClose { ms: u64 },
}

/// What a link is made of, which decides the faults it can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMedium {
    /// A serial line or an RS-485 bus: bytes on a wire.
    Serial,
    /// A BLE GATT link: writes and notifications.
    Gatt,
    /// A WebSocket: messages on a TCP (or TLS) connection.
    WebSocket,
    /// UDP: datagrams, no connections.
    Datagram,
    /// The connections a server accepts (a hub's listener): whole
    /// connections, not frames.
    Server,
}

impl LinkMedium {
    pub const ALL: [LinkMedium; 5] = [LinkMedium::Serial, LinkMedium::Gatt, LinkMedium::WebSocket, LinkMedium::Datagram, LinkMedium::Server];

    pub fn name(self) -> &'static str {
        match self {
            LinkMedium::Serial => "serial",
            LinkMedium::Gatt => "ble-gatt",
            LinkMedium::WebSocket => "websocket",
            LinkMedium::Datagram => "udp",
            LinkMedium::Server => "server",
        }
    }
}

/// One fault of the vocabulary: its name, what it does, and the links that can take it.
pub struct FaultDoc {
    pub name: &'static str,
    pub about: &'static str,
    pub media: &'static [LinkMedium],
}

/// Frame faults: every link that sees frames.
const ANY_LINK: &[LinkMedium] = &[LinkMedium::Serial, LinkMedium::Gatt, LinkMedium::WebSocket, LinkMedium::Datagram];
/// Links with connections (TCP: WebSocket, and a Shelly's HTTP too).
const STREAM_LINK: &[LinkMedium] = &[LinkMedium::WebSocket, LinkMedium::Server];

impl LinkFault {
    /// Every fault, for `hilbench list` and for validation.
    pub const CATALOG: &'static [FaultDoc] = &[
        FaultDoc { name: "drop", about: "the frame vanishes", media: ANY_LINK },
        FaultDoc { name: "delay", about: "the frame arrives late: ms, jitter_ms", media: ANY_LINK },
        FaultDoc {
            name: "corrupt",
            about: "bytes damaged: offsets | count_bytes (random), mask (XOR, default 0xFF), or fill (every byte)",
            media: ANY_LINK,
        },
        FaultDoc {
            name: "bad_checksum",
            about: "the link's own checksum is wrong: CRC-16 (Modbus), check byte (7E/0D), two-byte sum (JBD)",
            media: ANY_LINK,
        },
        FaultDoc { name: "duplicate", about: "the frame is sent twice: gap_ms", media: ANY_LINK },
        FaultDoc { name: "split", about: "the frame arrives in pieces: offsets | chunk, gap_ms", media: ANY_LINK },
        FaultDoc { name: "truncate", about: "only the first `keep` bytes arrive", media: ANY_LINK },
        FaultDoc { name: "garbage", about: "noise before and/or after the frame: before, after (bytes)", media: ANY_LINK },
        // A reflection needs a shared wire: a GATT or TCP peer never hears itself.
        FaultDoc { name: "echo", about: "the frame is reflected back to its sender (RS-485 adapter echo)", media: &[LinkMedium::Serial] },
        FaultDoc { name: "stall", about: "nothing passes for ms", media: ANY_LINK },
        FaultDoc { name: "cut", about: "nothing passes until the fault is cleared", media: ANY_LINK },
        // Connection-level: `count` counts connections, not frames.
        FaultDoc { name: "reset", about: "the connection is reset (RST) now, or after `bytes` more bytes", media: STREAM_LINK },
        FaultDoc { name: "accept_close", about: "a new connection is accepted and closed at once", media: STREAM_LINK },
        FaultDoc { name: "refuse", about: "a new connection is refused", media: STREAM_LINK },
        FaultDoc { name: "half_open", about: "nothing moves either way and nothing closes (until cleared)", media: STREAM_LINK },
        FaultDoc { name: "latency", about: "every byte arrives late, in order: ms", media: STREAM_LINK },
        FaultDoc { name: "bandwidth", about: "bytes a second per direction: bytes_per_s", media: STREAM_LINK },
        FaultDoc { name: "close_after", about: "the connection is closed (FIN) after `bytes` more bytes", media: STREAM_LINK },
        FaultDoc { name: "slow_close", about: "a close from either end goes out late: ms", media: STREAM_LINK },
    ];

    /// The catalog entry of the fault called `name`.
    pub fn doc(name: &str) -> Option<&'static FaultDoc> {
        Self::CATALOG.iter().find(|d| d.name == name)
    }

    pub fn name(&self) -> &'static str {
        match self {
            LinkFault::Drop => "drop",
            LinkFault::Delay { .. } => "delay",
            LinkFault::Corrupt { .. } => "corrupt",
            LinkFault::BadChecksum { .. } => "bad_checksum",
            LinkFault::Duplicate { .. } => "duplicate",
            LinkFault::Split { .. } => "split",
            LinkFault::Truncate { .. } => "truncate",
            LinkFault::Garbage { .. } => "garbage",
            LinkFault::Echo => "echo",
            LinkFault::Stall { .. } => "stall",
            LinkFault::Cut => "cut",
            LinkFault::Reset { .. } => "reset",
            LinkFault::AcceptClose => "accept_close",
            LinkFault::Refuse => "refuse",
            LinkFault::HalfOpen => "half_open",
            LinkFault::Latency { .. } => "latency",
            LinkFault::Bandwidth { .. } => "bandwidth",
            LinkFault::CloseAfter { .. } => "close_after",
            LinkFault::SlowClose { .. } => "slow_close",
        }
    }

    /// Whether the fault acts on a connection rather than on frames.
    pub fn is_connection_level(&self) -> bool {
        matches!(
            self,
            LinkFault::Reset { .. }
                | LinkFault::AcceptClose
                | LinkFault::Refuse
                | LinkFault::HalfOpen
                | LinkFault::Latency { .. }
                | LinkFault::Bandwidth { .. }
                | LinkFault::CloseAfter { .. }
                | LinkFault::SlowClose { .. }
        )
    }

    /// Whether the fault can act on this frame (a checksum fault needs a
    /// frame that holds the checksum).
    pub fn fits(&self, frame: &[u8]) -> bool {
        match self {
            LinkFault::BadChecksum { layout } => layout.holds_checksum(frame),
            _ => true,
        }
    }

    /// Checks parameters a YAML file can get wrong; the message says what.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            LinkFault::Split { offsets, chunk, .. } => match (offsets.is_empty(), chunk) {
                (true, None) => Err("split needs `offsets` or `chunk`".into()),
                (false, Some(_)) => Err("split takes `offsets` or `chunk`, not both".into()),
                (_, Some(0)) => Err("split `chunk` must be at least 1".into()),
                _ => Ok(()),
            },
            LinkFault::Corrupt {
                offsets,
                count,
                fill,
                ..
            } => {
                if offsets.is_empty() && count.is_none() && fill.is_none() {
                    Err("corrupt needs `offsets`, `count` or `fill`".into())
                } else {
                    Ok(())
                }
            }
            LinkFault::Garbage { before, after } if before.is_empty() && after.is_empty() => {
                Err("garbage needs `before` or `after` bytes".into())
            }
            LinkFault::Bandwidth { bytes_per_s: 0 } => Err("bandwidth `bytes_per_s` must be at least 1 (use half_open to stop the bytes)".into()),
            _ => Ok(()),
        }
    }
}

/// How the checksum of a frame is laid out, so `bad_checksum` can break just
/// that and nothing else. The link's owner knows which one its protocol uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumLayout {
    /// Modbus RTU: CRC-16 in the last two bytes.
    ModbusCrc,
    /// EG4 7E/0D: one check byte before the trailing 0x0D.
    Eg4Legacy,
    /// A bus carrying both: a 7E…0D frame is 7E/0D, anything else Modbus.
    ModbusOrEg4Legacy,
    /// JBD: a two-byte sum before the trailing 0x77 (only the last piece of
    /// a frame split into notifications holds it).
    JbdSum,
}

impl ChecksumLayout {
    fn is_eg4_legacy(frame: &[u8]) -> bool {
        frame.len() >= 6 && frame[0] == 0x7E && frame[frame.len() - 1] == 0x0D
    }

    /// Whether `frame` holds this layout's checksum at all.
    pub fn holds_checksum(self, frame: &[u8]) -> bool {
        match self {
            ChecksumLayout::ModbusCrc | ChecksumLayout::ModbusOrEg4Legacy => frame.len() >= 3,
            ChecksumLayout::Eg4Legacy => Self::is_eg4_legacy(frame),
            ChecksumLayout::JbdSum => frame.len() >= 3 && frame.last() == Some(&0x77),
        }
    }

    fn break_checksum(self, frame: &mut [u8]) {
        let n = frame.len();
        match self {
            ChecksumLayout::ModbusOrEg4Legacy if Self::is_eg4_legacy(frame) => ChecksumLayout::Eg4Legacy.break_checksum(frame),
            ChecksumLayout::ModbusCrc | ChecksumLayout::ModbusOrEg4Legacy => {
                if let Some(b) = frame.last_mut() {
                    *b ^= 0x5A;
                }
            }
            ChecksumLayout::Eg4Legacy => {
                if n >= 2 {
                    frame[n - 2] = frame[n - 2].wrapping_add(0x33);
                }
            }
            ChecksumLayout::JbdSum => {
                // The sum's low byte, just before the 0x77 end marker.
                if n >= 3 {
                    frame[n - 2] ^= 0x5A;
                }
            }
        }
    }
}

/// When a rule fires. Without `count` and `probability` a rule applies to the
/// next matching frame only.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct FaultTrigger {
    /// Which frames: `request` (toward the device), `response` (from it), or
    /// both when absent.
    #[serde(default)]
    pub direction: Option<Direction>,
    /// Apply to the next N matching frames.
    #[serde(default)]
    pub count: Option<u32>,
    /// Apply to each matching frame with this probability (seeded). With no
    /// `count` it stays active until cleared.
    #[serde(default)]
    pub probability: Option<f64>,
    /// Apply to every matching frame until cleared.
    #[serde(default)]
    pub always: bool,
}

impl FaultTrigger {
    /// How many frames (or connections) the rule may act on: `None` until
    /// cleared (`always`, or a probability with no count), else the count,
    /// and one by default.
    pub fn uses(&self) -> Option<u32> {
        if self.always {
            return None;
        }
        match (self.count, self.probability) {
            (Some(n), _) => Some(n),
            (None, Some(_)) => None,
            (None, None) => Some(1),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(p) = self.probability {
            if !(0.0..=1.0).contains(&p) || p.is_nan() {
                return Err(format!("probability must be between 0 and 1, got {p}"));
            }
        }
        if self.count == Some(0) {
            return Err("count must be at least 1".into());
        }
        if self.always && self.count.is_some() {
            return Err("`always` and `count` contradict each other".into());
        }
        Ok(())
    }
}

/// A fault plus when it fires. A named rule can be cleared on its own.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultRule {
    pub fault: LinkFault,
    pub trigger: FaultTrigger,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The flat YAML form of a fault: `{kind: split, offsets: [97], gap_ms: 30,
/// direction: response, count: 2}`. Parsed strictly (unknown keys are
/// errors) and checked by [`FaultSpec::into_rule`], which names what is
/// missing or wrong.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// Which link the fault goes on (scenario steps; ignored elsewhere).
    #[serde(default)]
    pub link: Option<String>,
    /// A name `clear_faults: {link, name}` can remove it by.
    #[serde(default)]
    pub name: Option<String>,
    pub kind: String,
    #[serde(default)]
    pub ms: Option<u64>,
    #[serde(default)]
    pub jitter_ms: Option<u64>,
    #[serde(default)]
    pub offsets: Option<Vec<usize>>,
    #[serde(default)]
    pub count_bytes: Option<usize>,
    #[serde(default)]
    pub mask: Option<u8>,
    #[serde(default)]
    pub fill: Option<u8>,
    #[serde(default)]
    pub gap_ms: Option<u64>,
    #[serde(default)]
    pub chunk: Option<usize>,
    #[serde(default)]
    pub keep: Option<usize>,
    #[serde(default)]
    pub before: Option<Vec<u8>>,
    #[serde(default)]
    pub after: Option<Vec<u8>>,
    /// reset, close_after: bytes that pass first.
    #[serde(default)]
    pub bytes: Option<u64>,
    #[serde(default)]
    pub bytes_per_s: Option<u64>,
    #[serde(default)]
    pub direction: Option<Direction>,
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub probability: Option<f64>,
    #[serde(default)]
    pub always: bool,
}

impl FaultSpec {
    /// The rule, for a link whose protocol keeps its checksum as `checksum`
    /// says (`None`: it has none, so `bad_checksum` is refused).
    pub fn into_rule(self, checksum: Option<ChecksumLayout>) -> Result<FaultRule, String> {
        let FaultSpec {
            link: _,
            name,
            kind,
            ms,
            jitter_ms,
            offsets,
            count_bytes,
            mask,
            fill,
            gap_ms,
            chunk,
            keep,
            before,
            after,
            bytes,
            bytes_per_s,
            direction,
            count,
            probability,
            always,
        } = self;
        let mut used: Vec<&str> = Vec::new();
        let mut take = |name: &'static str, present: bool| {
            if present {
                used.push(name)
            }
        };
        take("ms", ms.is_some());
        take("jitter_ms", jitter_ms.is_some());
        take("offsets", offsets.is_some());
        take("count_bytes", count_bytes.is_some());
        take("mask", mask.is_some());
        take("fill", fill.is_some());
        take("gap_ms", gap_ms.is_some());
        take("chunk", chunk.is_some());
        take("keep", keep.is_some());
        take("before", before.is_some());
        take("after", after.is_some());
        take("bytes", bytes.is_some());
        take("bytes_per_s", bytes_per_s.is_some());
        let allowed: &[&str] = match kind.as_str() {
            "drop" | "bad_checksum" | "echo" | "cut" => &[],
            "delay" => &["ms", "jitter_ms"],
            "corrupt" => &["offsets", "count_bytes", "mask", "fill"],
            "duplicate" => &["gap_ms"],
            "split" => &["offsets", "chunk", "gap_ms"],
            "truncate" => &["keep"],
            "garbage" => &["before", "after"],
            "stall" | "latency" | "slow_close" => &["ms"],
            "accept_close" | "refuse" | "half_open" => &[],
            "reset" | "close_after" => &["bytes"],
            "bandwidth" => &["bytes_per_s"],
            other => {
                let names: Vec<_> = LinkFault::CATALOG.iter().map(|d| d.name).collect();
                return Err(format!(
                    "unknown fault kind `{other}`, expected one of: {}",
                    names.join(", ")
                ));
            }
        };
        if let Some(bad) = used.iter().find(|u| !allowed.contains(u)) {
            return Err(format!(
                "fault `{kind}` does not take `{bad}` (it takes: {})",
                if allowed.is_empty() { "no parameters".to_string() } else { allowed.join(", ") }
            ));
        }
        let need = |v: Option<u64>, name: &str| v.ok_or_else(|| format!("fault `{kind}` needs `{name}`"));
        let fault = match kind.as_str() {
            "drop" => LinkFault::Drop,
            "bad_checksum" => LinkFault::BadChecksum {
                layout: checksum.ok_or_else(|| "this link's protocol has no checksum for `bad_checksum` to break".to_string())?,
            },
            "echo" => LinkFault::Echo,
            "cut" => LinkFault::Cut,
            "delay" => LinkFault::Delay {
                ms: need(ms, "ms")?,
                jitter_ms: jitter_ms.unwrap_or(0),
            },
            "corrupt" => LinkFault::Corrupt {
                offsets: offsets.unwrap_or_default(),
                count: count_bytes,
                mask: mask.unwrap_or(0xFF),
                fill,
            },
            "duplicate" => LinkFault::Duplicate {
                gap_ms: gap_ms.unwrap_or(0),
            },
            "split" => LinkFault::Split {
                offsets: offsets.unwrap_or_default(),
                chunk,
                gap_ms: gap_ms.unwrap_or(0),
            },
            "truncate" => LinkFault::Truncate {
                keep: keep.ok_or_else(|| "fault `truncate` needs `keep`".to_string())?,
            },
            "garbage" => LinkFault::Garbage {
                before: before.unwrap_or_default(),
                after: after.unwrap_or_default(),
            },
            "stall" => LinkFault::Stall { ms: need(ms, "ms")? },
            "reset" => LinkFault::Reset { bytes },
            "accept_close" => LinkFault::AcceptClose,
            "refuse" => LinkFault::Refuse,
            "half_open" => LinkFault::HalfOpen,
            "latency" => LinkFault::Latency { ms: need(ms, "ms")? },
            "bandwidth" => LinkFault::Bandwidth { bytes_per_s: need(bytes_per_s, "bytes_per_s")? },
            "close_after" => LinkFault::CloseAfter { bytes: need(bytes, "bytes")? },
            "slow_close" => LinkFault::SlowClose { ms: need(ms, "ms")? },
            _ => unreachable!("kind checked above"),
        };
        fault.validate()?;
        let trigger = FaultTrigger {
            direction,
            count,
            probability,
            always,
        };
        trigger.validate()?;
        Ok(FaultRule { fault, trigger, name })
    }
}

#[derive(Debug)]
struct ActiveRule {
    rule: FaultRule,
    /// Frames it may still apply to; None = unlimited.
    remaining: Option<u32>,
}

/// Bytes the link lets through, `after` this long from the moment the frame
/// entered the link. `toward` is the direction of travel: an echo travels
/// back toward the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emission {
    pub after: Duration,
    pub toward: Direction,
    pub bytes: Vec<u8>,
}

/// Where recorded frames go. Bounded so a long-running `sim` never grows
/// without limit; scenarios use an unbounded log.
#[derive(Debug, Default)]
pub struct FrameLog {
    pub frames: std::collections::VecDeque<FrameRecord>,
    pub limit: Option<usize>,
    pub dropped: u64,
}

impl FrameLog {
    pub fn push(&mut self, rec: FrameRecord) {
        if let Some(limit) = self.limit {
            if self.frames.len() >= limit {
                self.frames.pop_front();
                self.dropped += 1;
            }
        }
        self.frames.push_back(rec);
    }
}

/// What happened to one frame, for counters and the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LinkCounters {
    pub frames_in: u64,
    pub frames_out: u64,
    pub faults_applied: u64,
    pub dropped: u64,
}

/// The sans-IO link: recording plus fault application.
#[derive(Debug)]
pub struct LinkEngine {
    name: String,
    rules: Vec<ActiveRule>,
    rng: ChaCha8Rng,
    /// Monotonic time (ns since the owner's epoch) until which nothing passes.
    stalled_until_ns: u64,
    cut: bool,
    /// Names of the stall and cut in force, for `clear_named`.
    state_names: Vec<(String, LinkState)>,
    record: bool,
    log: FrameLog,
    pub counters: LinkCounters,
}

/// A fault that is a state of the link rather than a per-frame change.
#[derive(Debug, Clone, Copy)]
enum LinkState {
    Stall,
    Cut,
}

impl LinkEngine {
    pub fn new(name: impl Into<String>, seed: u64) -> Self {
        let name = name.into();
        // Every link gets its own stream derived from the scenario seed and
        // its name, so adding a link does not change the others' choices.
        let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
        for b in name.bytes() {
            s = s.rotate_left(5) ^ u64::from(b);
            s = s.wrapping_mul(0x100_0000_01B3);
        }
        LinkEngine {
            name,
            rules: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(s),
            stalled_until_ns: 0,
            cut: false,
            state_names: Vec::new(),
            record: true,
            log: FrameLog::default(),
            counters: LinkCounters::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keep at most `limit` frames (oldest dropped first).
    pub fn set_log_limit(&mut self, limit: Option<usize>) {
        self.log.limit = limit;
    }

    pub fn set_recording(&mut self, on: bool) {
        self.record = on;
    }

    pub fn frames(&self) -> impl ExactSizeIterator<Item = &FrameRecord> + '_ {
        self.log.frames.iter()
    }

    pub fn take_frames(&mut self) -> Vec<FrameRecord> {
        std::mem::take(&mut self.log.frames).into()
    }

    /// Add a rule. `Stall` and `Cut` take effect at once (they are states of
    /// the link, not per-frame transformations).
    pub fn add_rule(&mut self, rule: FaultRule, now_ns: u64) {
        match rule.fault {
            ref f if f.is_connection_level() => {
                tracing::warn!(link = %self.name, fault = f.name(), "a connection fault reached a frame link; ignored");
            }
            LinkFault::Stall { ms } => {
                self.stalled_until_ns = now_ns.saturating_add(ms.saturating_mul(1_000_000));
                if let Some(n) = rule.name {
                    self.state_names.push((n, LinkState::Stall));
                }
            }
            LinkFault::Cut => {
                self.cut = true;
                if let Some(n) = rule.name {
                    self.state_names.push((n, LinkState::Cut));
                }
            }
            _ => {
                let remaining = rule.trigger.uses();
                self.rules.push(ActiveRule { rule, remaining });
            }
        }
    }

    /// Remove every rule and end any stall or cut.
    pub fn clear(&mut self) {
        self.rules.clear();
        self.stalled_until_ns = 0;
        self.cut = false;
        self.state_names.clear();
    }

    /// Remove the rules called `name` (ending a stall or cut of that name);
    /// false when none had it.
    pub fn clear_named(&mut self, name: &str) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r.rule.name.as_deref() != Some(name));
        let mut found = self.rules.len() != before;
        if let Some(pos) = self.state_names.iter().position(|(n, _)| n == name) {
            match self.state_names.remove(pos).1 {
                LinkState::Stall => self.stalled_until_ns = 0,
                LinkState::Cut => self.cut = false,
            }
            found = true;
        }
        found
    }

    pub fn is_blocked(&self, now_ns: u64) -> bool {
        self.cut || now_ns < self.stalled_until_ns
    }

    /// Record a frame as it appears on the wire (after faults), for captures.
    fn record(&mut self, direction: Direction, wall_ns: u64, bytes: &[u8]) {
        if self.record {
            self.log.push(FrameRecord {
                link: self.name.clone(),
                direction,
                timestamp_ns: wall_ns,
                bytes: bytes.to_vec(),
            });
        }
    }

    /// Pass one frame travelling in `direction` through the link.
    /// `now_ns` is monotonic time (for stalls); `wall_ns` is the capture
    /// timestamp.
    pub fn process(
        &mut self,
        direction: Direction,
        frame: &[u8],
        now_ns: u64,
        wall_ns: u64,
    ) -> Vec<Emission> {
        self.counters.frames_in += 1;
        if self.is_blocked(now_ns) {
            self.counters.dropped += 1;
            return Vec::new();
        }
        if self.rules.is_empty() {
            // The common case stays cheap: no clones beyond the record.
            self.record(direction, wall_ns, frame);
            self.counters.frames_out += 1;
            return vec![Emission {
                after: Duration::ZERO,
                toward: direction,
                bytes: frame.to_vec(),
            }];
        }

        let mut pieces: Vec<Emission> = vec![Emission {
            after: Duration::ZERO,
            toward: direction,
            bytes: frame.to_vec(),
        }];
        let mut echo = false;
        let mut i = 0;
        while i < self.rules.len() {
            let applies = {
                let r = &self.rules[i].rule;
                let dir_ok = r.trigger.direction.is_none_or(|d| d == direction) && r.fault.fits(frame);
                dir_ok
                    && match r.trigger.probability {
                        Some(p) => self.rng.gen_bool(p.clamp(0.0, 1.0)),
                        None => true,
                    }
            };
            let dir_ok = self.rules[i]
                .rule
                .trigger
                .direction
                .is_none_or(|d| d == direction)
                && self.rules[i].rule.fault.fits(frame);
            if dir_ok {
                // A counted rule is consumed by every matching frame, fired
                // or not, so `count: 10, probability: 0.5` means "about half
                // of the next ten".
                if let Some(rem) = self.rules[i].remaining.as_mut() {
                    *rem = rem.saturating_sub(1);
                }
            }
            if applies {
                self.counters.faults_applied += 1;
                let fault = self.rules[i].rule.fault.clone();
                if matches!(fault, LinkFault::Echo) {
                    echo = true;
                } else {
                    pieces = self.apply(&fault, pieces);
                }
            }
            if self.rules[i].remaining == Some(0) {
                self.rules.remove(i);
            } else {
                i += 1;
            }
        }

        if pieces.is_empty() {
            self.counters.dropped += 1;
        }
        for p in &pieces {
            self.record(direction, wall_ns + p.after.as_nanos() as u64, &p.bytes);
        }
        self.counters.frames_out += pieces.len() as u64;
        if echo {
            // The reflected copy is traffic too: the capture shows what the
            // sender heard.
            self.record(direction.reverse(), wall_ns, frame);
            pieces.insert(
                0,
                Emission {
                    after: Duration::ZERO,
                    toward: direction.reverse(),
                    bytes: frame.to_vec(),
                },
            );
        }
        pieces
    }

    fn apply(&mut self, fault: &LinkFault, pieces: Vec<Emission>) -> Vec<Emission> {
        let ms = |m: u64| Duration::from_millis(m);
        match fault {
            LinkFault::Drop => Vec::new(),
            LinkFault::Delay { ms: d, jitter_ms } => {
                let j = if *jitter_ms > 0 {
                    self.rng.gen_range(0..=*jitter_ms)
                } else {
                    0
                };
                pieces
                    .into_iter()
                    .map(|mut p| {
                        p.after += ms(d.saturating_add(j));
                        p
                    })
                    .collect()
            }
            LinkFault::Corrupt {
                offsets,
                count,
                mask,
                fill,
            } => pieces
                .into_iter()
                .map(|mut p| {
                    if let Some(f) = fill {
                        p.bytes.iter_mut().for_each(|b| *b = *f);
                    }
                    for &o in offsets {
                        if let Some(b) = p.bytes.get_mut(o) {
                            *b ^= *mask;
                        }
                    }
                    if let Some(n) = count {
                        let len = p.bytes.len();
                        for _ in 0..(*n).min(len) {
                            let o = self.rng.gen_range(0..len);
                            p.bytes[o] ^= *mask;
                        }
                    }
                    p
                })
                .collect(),
            LinkFault::BadChecksum { layout } => pieces
                .into_iter()
                .map(|mut p| {
                    if layout.holds_checksum(&p.bytes) {
                        layout.break_checksum(&mut p.bytes);
                    }
                    p
                })
                .collect(),
            LinkFault::Duplicate { gap_ms } => pieces
                .into_iter()
                .flat_map(|p| {
                    let mut second = p.clone();
                    second.after += ms(*gap_ms);
                    [p, second]
                })
                .collect(),
            LinkFault::Split {
                offsets,
                chunk,
                gap_ms,
            } => {
                let mut out = Vec::new();
                for p in pieces {
                    let mut cuts: Vec<usize> = match chunk {
                        Some(c) if *c > 0 => (1..).map(|k| k * c).take_while(|&o| o < p.bytes.len()).collect(),
                        _ => offsets.iter().copied().filter(|&o| o > 0 && o < p.bytes.len()).collect(),
                    };
                    cuts.sort_unstable();
                    cuts.dedup();
                    let mut start = 0;
                    let mut after = p.after;
                    for cut in cuts.into_iter().chain(std::iter::once(p.bytes.len())) {
                        if cut > start {
                            out.push(Emission {
                                after,
                                toward: p.toward,
                                bytes: p.bytes[start..cut].to_vec(),
                            });
                            after += ms(*gap_ms);
                        }
                        start = cut;
                    }
                }
                out
            }
            LinkFault::Truncate { keep } => pieces
                .into_iter()
                .map(|mut p| {
                    p.bytes.truncate(*keep);
                    p
                })
                .filter(|p| !p.bytes.is_empty())
                .collect(),
            LinkFault::Garbage { before, after } => pieces
                .into_iter()
                .map(|mut p| {
                    let mut b = before.clone();
                    b.extend_from_slice(&p.bytes);
                    b.extend_from_slice(after);
                    p.bytes = b;
                    p
                })
                .collect(),
            // Echo is handled by the caller; stall and cut are link states; connection
            // faults never reach a frame engine (their link's owner routes them).
            _ => pieces,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(fault: LinkFault) -> FaultRule {
        FaultRule {
            fault,
            trigger: FaultTrigger::default(),
            name: None,
        }
    }

    const FRAME: &[u8] = &[1, 3, 0, 0, 0, 0x2F, 0x04, 0x16];

    #[test]
    fn clean_link_passes_frame_and_records_it() {
        let mut l = LinkEngine::new("a", 1);
        let out = l.process(Direction::Request, FRAME, 0, 5);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bytes, FRAME);
        assert_eq!(l.frames().len(), 1);
        assert_eq!(l.frames().next().unwrap().timestamp_ns, 5);
    }

    #[test]
    fn one_shot_applies_once() {
        let mut l = LinkEngine::new("a", 1);
        l.add_rule(rule(LinkFault::Drop), 0);
        assert!(l.process(Direction::Request, FRAME, 0, 0).is_empty());
        assert_eq!(l.process(Direction::Request, FRAME, 0, 0).len(), 1);
    }

    #[test]
    fn counted_and_directional() {
        let mut l = LinkEngine::new("a", 1);
        l.add_rule(
            FaultRule {
                fault: LinkFault::Drop,
                trigger: FaultTrigger {
                    direction: Some(Direction::Response),
                    count: Some(2),
                    ..Default::default()
                },
                name: None,
            },
            0,
        );
        assert_eq!(l.process(Direction::Request, FRAME, 0, 0).len(), 1);
        assert!(l.process(Direction::Response, FRAME, 0, 0).is_empty());
        assert!(l.process(Direction::Response, FRAME, 0, 0).is_empty());
        assert_eq!(l.process(Direction::Response, FRAME, 0, 0).len(), 1);
    }

    #[test]
    fn split_at_offsets_with_gaps() {
        let mut l = LinkEngine::new("a", 1);
        l.add_rule(
            rule(LinkFault::Split {
                offsets: vec![6],
                chunk: None,
                gap_ms: 20,
            }),
            0,
        );
        let out = l.process(Direction::Response, FRAME, 0, 0);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].bytes, &FRAME[..6]);
        assert_eq!(out[1].bytes, &FRAME[6..]);
        assert_eq!(out[1].after, Duration::from_millis(20));
    }

    #[test]
    fn split_into_chunks() {
        let mut l = LinkEngine::new("a", 1);
        l.add_rule(
            rule(LinkFault::Split {
                offsets: vec![],
                chunk: Some(3),
                gap_ms: 1,
            }),
            0,
        );
        let out = l.process(Direction::Response, FRAME, 0, 0);
        let lens: Vec<_> = out.iter().map(|e| e.bytes.len()).collect();
        assert_eq!(lens, vec![3, 3, 2]);
    }

    #[test]
    fn bad_checksum_touches_only_the_crc() {
        let mut l = LinkEngine::new("a", 1);
        l.add_rule(rule(LinkFault::BadChecksum { layout: ChecksumLayout::ModbusCrc }), 0);
        let out = l.process(Direction::Response, FRAME, 0, 0);
        assert_eq!(&out[0].bytes[..7], &FRAME[..7]);
        assert_ne!(out[0].bytes[7], FRAME[7]);
    }

    #[test]
    fn jbd_bad_checksum_waits_for_the_piece_with_the_sum() {
        let mut l = LinkEngine::new("bms", 1);
        l.add_rule(rule(LinkFault::BadChecksum { layout: ChecksumLayout::JbdSum }), 0);
        // A middle notification has no checksum: it passes and the fault stays armed.
        let middle = [0xDD, 0x03, 0x00, 0x1B, 0x01, 0x02];
        assert_eq!(l.process(Direction::Response, &middle, 0, 0)[0].bytes, middle);
        let last = [0x05, 0x06, 0xFF, 0xF2, 0x77];
        let out = l.process(Direction::Response, &last, 0, 0);
        assert_eq!(out[0].bytes[4], 0x77, "the end marker stays");
        assert_ne!(out[0].bytes[3], 0xF2, "the sum's low byte is broken");
        assert_eq!(&out[0].bytes[..3], &last[..3]);
        assert_eq!(l.process(Direction::Response, &last, 0, 0)[0].bytes, last, "one-shot");
    }

    #[test]
    fn named_rules_clear_alone() {
        let mut l = LinkEngine::new("a", 1);
        let named = |fault, name: &str| FaultRule { name: Some(name.into()), ..rule(fault) };
        l.add_rule(FaultRule { trigger: FaultTrigger { always: true, ..Default::default() }, ..named(LinkFault::Truncate { keep: 2 }, "short") }, 0);
        l.add_rule(named(LinkFault::Cut, "gone"), 0);
        assert!(l.process(Direction::Request, FRAME, 0, 0).is_empty());
        assert!(l.clear_named("gone"));
        assert_eq!(l.process(Direction::Request, FRAME, 0, 0)[0].bytes.len(), 2, "the other rule stays");
        assert!(!l.clear_named("gone"), "already cleared");
        assert!(l.clear_named("short"));
        assert_eq!(l.process(Direction::Request, FRAME, 0, 0)[0].bytes, FRAME);
    }

    #[test]
    fn bad_checksum_needs_a_link_with_one() {
        let spec: FaultSpec = yaml_serde::from_str("kind: bad_checksum\n").unwrap();
        assert!(spec.clone().into_rule(None).unwrap_err().contains("no checksum"));
        let r = spec.into_rule(Some(ChecksumLayout::Eg4Legacy)).unwrap();
        assert_eq!(r.fault, LinkFault::BadChecksum { layout: ChecksumLayout::Eg4Legacy });
    }

    #[test]
    fn echo_reflects_to_sender_first() {
        let mut l = LinkEngine::new("a", 1);
        l.add_rule(rule(LinkFault::Echo), 0);
        let out = l.process(Direction::Request, FRAME, 0, 0);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].toward, Direction::Response);
        assert_eq!(out[1].toward, Direction::Request);
    }

    #[test]
    fn stall_blocks_for_its_duration() {
        let mut l = LinkEngine::new("a", 1);
        l.add_rule(rule(LinkFault::Stall { ms: 10 }), 1_000);
        assert!(l.process(Direction::Request, FRAME, 5_000_000, 0).is_empty());
        assert_eq!(l.process(Direction::Request, FRAME, 11_000_001, 0).len(), 1);
    }

    #[test]
    fn cut_until_cleared() {
        let mut l = LinkEngine::new("a", 1);
        l.add_rule(rule(LinkFault::Cut), 0);
        assert!(l.process(Direction::Request, FRAME, u64::MAX / 2, 0).is_empty());
        l.clear();
        assert_eq!(l.process(Direction::Request, FRAME, 0, 0).len(), 1);
    }

    #[test]
    fn probabilistic_faults_replay_with_the_same_seed() {
        let run = |seed| {
            let mut l = LinkEngine::new("a", seed);
            l.add_rule(
                FaultRule {
                    fault: LinkFault::Drop,
                    trigger: FaultTrigger {
                        probability: Some(0.5),
                        ..Default::default()
                    },
                    name: None,
                },
                0,
            );
            (0..64)
                .map(|_| l.process(Direction::Request, FRAME, 0, 0).is_empty())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let dropped = run(7).iter().filter(|d| **d).count();
        assert!((16..48).contains(&dropped), "{dropped}");
    }

    #[test]
    fn garbage_truncate_duplicate_corrupt_fill() {
        let mut l = LinkEngine::new("a", 1);
        l.add_rule(
            rule(LinkFault::Garbage {
                before: vec![0xAA],
                after: vec![0xBB],
            }),
            0,
        );
        let out = l.process(Direction::Response, FRAME, 0, 0);
        assert_eq!(out[0].bytes.len(), FRAME.len() + 2);
        l.add_rule(rule(LinkFault::Truncate { keep: 3 }), 0);
        assert_eq!(l.process(Direction::Response, FRAME, 0, 0)[0].bytes, &FRAME[..3]);
        l.add_rule(rule(LinkFault::Duplicate { gap_ms: 0 }), 0);
        assert_eq!(l.process(Direction::Response, FRAME, 0, 0).len(), 2);
        l.add_rule(
            rule(LinkFault::Corrupt {
                offsets: vec![],
                count: None,
                mask: 0xFF,
                fill: Some(0xFF),
            }),
            0,
        );
        assert!(l.process(Direction::Response, FRAME, 0, 0)[0]
            .bytes
            .iter()
            .all(|&b| b == 0xFF));
    }

    #[test]
    fn yaml_shape() {
        let s: FaultSpec =
            yaml_serde::from_str("kind: split\noffsets: [97]\ngap_ms: 30\ndirection: response\ncount: 2\n")
                .unwrap();
        let r = s.into_rule(None).unwrap();
        assert_eq!(r.trigger.count, Some(2));
        assert!(matches!(r.fault, LinkFault::Split { .. }));
    }

    #[test]
    fn spec_errors_say_what_is_wrong() {
        let e = |y: &str| yaml_serde::from_str::<FaultSpec>(y).unwrap().into_rule(None).unwrap_err();
        assert!(e("kind: delay\n").contains("needs `ms`"));
        assert!(e("kind: drop\nms: 3\n").contains("does not take `ms`"));
        assert!(e("kind: frobnicate\n").contains("unknown fault kind"));
        assert!(e("kind: split\n").contains("offsets"));
        assert!(e("kind: drop\nprobability: 2\n").contains("probability"));
        assert!(yaml_serde::from_str::<FaultSpec>("kind: drop\nbogus: 1\n").is_err());
    }
}

#[cfg(test)]
mod probability_tests {
    use super::*;

    #[test]
    fn directional_probability_drops_about_p() {
        let spec: FaultSpec =
            yaml_serde::from_str("kind: drop\ndirection: response\nprobability: 0.35\n").unwrap();
        let mut l = LinkEngine::new("pack2", 42);
        l.add_rule(spec.into_rule(None).unwrap(), 0);
        let mut dropped = 0;
        for _ in 0..200 {
            assert_eq!(l.process(Direction::Request, &[1, 2, 3], 0, 0).len(), 1);
            if l.process(Direction::Response, &[1, 2, 3], 0, 0).is_empty() {
                dropped += 1;
            }
        }
        assert!((40..100).contains(&dropped), "{dropped}");
    }
}
