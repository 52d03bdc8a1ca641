//! `hilbench load`: load generators. `load bsc` drives a BACnet/SC hub with many nodes
//! and measures delivery rate, latency (HDR histogram), loss and duplication, connect
//! time, and CPU (its own, and the hub's per delivery when the hub runs here). `load merge`
//! combines the `--json` summaries of several shards.
//!
//! Payload of every NPDU: sender id (u32 BE) | sequence (u64 BE) | send time (u64 BE, ns
//! since the Unix epoch) | padding. Wall time, so shards on different machines can measure
//! latency when their clocks are synchronised.
//!
//! Loss accounting: a hub forwards one sender's messages to one receiver over one
//! WebSocket, so they arrive in order; a receiver counts a sequence below the next expected
//! one as a duplicate. Each (receiver, sender) pair is expected to deliver every message
//! from the first sequence it saw (a receiver in another shard may connect after a sender
//! started), so expected = receivers × sent − Σ first sequence seen. A loss of a sender's
//! very first messages before a receiver sees anything is therefore not counted.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::client::bsc_node::connect_node;
use crate::client::bsc_node_core::{NodeConfig, SessionEvent, SessionOutput};
use crate::protocol::bvlc_sc::{DeviceUuid, Vmac};
use crate::transport::tls::TlsDir;
use crate::transport::ws_client::{HubUrl, WsConnectOptions};

/// Longest `--duration` / `--hold`.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Most nodes one shard connects.
pub const MAX_NODES: usize = 100_000;
/// Bytes of the payload header (sender, sequence, send time).
pub const PAYLOAD_HEADER: usize = 20;

#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    #[command(subcommand)]
    pub what: LoadCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum LoadCommand {
    /// Load a BACnet/SC hub with N nodes, K of them sending.
    #[command(after_help = "Examples:
  hilbench load bsc --hub ws://127.0.0.1:4443 --nodes 100 --senders 1 --window 16 --duration 10s
  hilbench load bsc --hub wss://127.0.0.1:4443 --tls-dir target/pki --nodes 50 --senders 5 --rate 1000 --duration 30s --json
  hilbench load bsc --hub ws://127.0.0.1:4443 --nodes 20 --senders 10 --unicast --duration 5s
  hilbench load bsc --hub ws://127.0.0.1:4443 --connect-only 10000 --hold 60s --hub-pid 1234
  hilbench load bsc --hub ws://hub:4443 --nodes 2000 --senders 4 --duration 60s --shard 0/4 --json > s0.json

Broadcast by default: every message reaches every other node. --unicast sends each
message to one receiver. --window W keeps W messages per sender in flight (counted at one
receiver in the same shard); --rate R sends R messages/s per sender. Neither: --window 16.
With --shard I/N this process runs the nodes whose global index g has g % N == I; nodes
with g < --senders send. Merge shard outputs with `hilbench load merge`.
With --tls-dir (a `hilbench pki` directory) node g presents node-(g % C + 1).pem, where C
is the number of node certificates there.

Exit status: 0 passed; 1 failed: no node connected, or a message was lost, duplicated or
misrouted (with --shard, loss may stay unknown: `load merge` computes it); 2 bad arguments
or setup error.")]
    Bsc(BscLoadArgs),
    /// Merge the --json summaries of several `load bsc` shards into one.
    #[command(after_help = "Example:
  hilbench load merge s0.json s1.json s2.json s3.json --json

Exit status: 0 passed; 1 failed: no node connected, a message was lost, duplicated or
misrouted, or loss cannot be computed (a sender's shard is missing); 2 unreadable input.")]
    Merge(MergeArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct BscLoadArgs {
    /// Hub URL, ws:// or wss://.
    #[arg(long, env = "HUB_URL")]
    pub hub: String,
    /// Nodes in the whole run (all shards together).
    #[arg(long, default_value_t = 10)]
    pub nodes: usize,
    /// Nodes that send (global indices 0..K).
    #[arg(long, default_value_t = 1)]
    pub senders: usize,
    /// Messages in flight per sender.
    #[arg(long, conflicts_with = "rate")]
    pub window: Option<u32>,
    /// Messages per second per sender.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long senders send (e.g. 10s, 2m).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// NPDU size in bytes (at least 20: sender, sequence, send time).
    #[arg(long, default_value_t = 20)]
    pub payload: usize,
    /// Unicast to one receiver instead of broadcast.
    #[arg(long)]
    pub unicast: bool,
    /// `hilbench pki` directory: ca.pem and node-N.pem/node-N.key.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Print a JSON summary (with serialized histograms) instead of the human one.
    #[arg(long)]
    pub json: bool,
    /// Only connect this many nodes and hold them (no traffic but heartbeats).
    #[arg(long, value_name = "N")]
    pub connect_only: Option<usize>,
    /// With --connect-only: how long to hold the connections.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub hold: Duration,
    /// This process's shard, I/N (0-based).
    #[arg(long, value_parser = parse_shard, env = "HILBENCH_SHARD")]
    pub shard: Option<(usize, usize)>,
    /// The hub's process id, for its CPU time per delivery (loopback hubs only).
    #[arg(long)]
    pub hub_pid: Option<u32>,
    /// Per-connection timeout (TCP, TLS, upgrade, Connect-Accept).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub connect_timeout: Duration,
    /// Connections opened at once. A hub holds one source to 8 handshakes
    /// once fewer than 16 of its 64 slots are free (slowloris defence), so
    /// from one address more than 48 at once get refused.
    #[arg(long, default_value_t = 32)]
    pub connect_concurrency: usize,
    /// Heartbeat interval of every node.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub heartbeat: Duration,
}

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// Shard summaries written by `load bsc --json`.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print the merged summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s.split_once('/').ok_or_else(|| format!("shard {s:?}: expected I/N, e.g. 0/4"))?;
    let i: usize = i.trim().parse().map_err(|_| format!("shard {s:?}: I is not a number"))?;
    let n: usize = n.trim().parse().map_err(|_| format!("shard {s:?}: N is not a number"))?;
    if n == 0 || i >= n {
        return Err(format!("shard {s:?}: need 0 <= I < N"));
    }
    Ok((i, n))
}

pub fn run(a: LoadArgs) -> i32 {
    match a.what {
        LoadCommand::Bsc(b) => run_bsc(b),
        LoadCommand::Merge(m) => run_merge(m),
    }
}

// ---------------------------------------------------------------------------------------
// Identities and payload
// ---------------------------------------------------------------------------------------

/// The VMAC of global node `g`: locally administered, distinct for every g < 2^32.
pub fn node_vmac(g: usize) -> Vmac {
    let b = (g as u32).to_be_bytes();
    Vmac([0x02, 0x4C, b[0], b[1], b[2], b[3]])
}

fn node_uuid(g: usize) -> DeviceUuid {
    let b = (g as u32).to_be_bytes();
    let mut u = [0x68, 0x69, 0x6c, 0x62, 0x6c, 0x6f, 0x40, 0x64, 0x80, 0, 0, 0, b[0], b[1], b[2], b[3]];
    u[9] = 0x4c;
    DeviceUuid(u)
}

fn wall_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Writes the payload header into `buf` (at least [`PAYLOAD_HEADER`] bytes).
pub fn write_payload(buf: &mut [u8], sender: u32, seq: u64, sent_ns: u64) {
    if let Some(h) = buf.get_mut(..PAYLOAD_HEADER) {
        h[..4].copy_from_slice(&sender.to_be_bytes());
        h[4..12].copy_from_slice(&seq.to_be_bytes());
        h[12..20].copy_from_slice(&sent_ns.to_be_bytes());
    }
}

/// (sender, sequence, send time) from a payload; None when too short.
pub fn read_payload(p: &[u8]) -> Option<(u32, u64, u64)> {
    let s = u32::from_be_bytes(p.get(0..4)?.try_into().ok()?);
    let q = u64::from_be_bytes(p.get(4..12)?.try_into().ok()?);
    let t = u64::from_be_bytes(p.get(12..20)?.try_into().ok()?);
    Some((s, q, t))
}

/// One receiver's view of one sender.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SequenceTrack {
    pub next: u64,
    pub first: Option<u64>,
    pub unique: u64,
    pub duplicates: u64,
}

impl SequenceTrack {
    /// Counts one arrival; returns false for a duplicate.
    pub fn arrive(&mut self, seq: u64) -> bool {
        if self.first.is_none() {
            self.first = Some(seq);
            self.next = seq + 1;
            self.unique = 1;
            return true;
        }
        if seq >= self.next {
            self.unique += 1;
            self.next = seq + 1;
            true
        } else {
            self.duplicates += 1;
            false
        }
    }
}

// ---------------------------------------------------------------------------------------
// Summary (the --json form, also the input of `merge`)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SenderSummary {
    /// Messages sent (only in the shard that runs the sender).
    pub sent: Option<u64>,
    /// Receivers of this sender in the shard(s).
    pub receivers: u64,
    pub delivered: u64,
    pub duplicates: u64,
    /// Σ over receivers of the first sequence each one saw.
    pub first_seen_sum: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Quantiles {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Quantiles {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Quantiles::default();
        }
        Quantiles {
            count: h.len(),
            min: h.min(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuSummary {
    /// Seconds of CPU this generator used while measuring.
    pub generator_s: f64,
    /// generator_s / wall time.
    pub generator_cores_used: f64,
    pub cores_available: usize,
    /// At or above 90 % of the available cores: the numbers measure the generator.
    pub generator_saturated: bool,
    pub hub_s: Option<f64>,
    pub hub_us_per_delivery: Option<f64>,
    /// Cores busy on the whole machine while measuring (/proc/stat), and the part of
    /// them neither this generator nor the hub used (other processes).
    #[serde(default)]
    pub machine_busy_cores: Option<f64>,
    #[serde(default)]
    pub others_cores: Option<f64>,
}

/// The hub's resident memory (loopback hubs, from /proc/PID/status VmRSS).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HubMemory {
    /// Before this generator connected anything.
    pub rss_before_kb: u64,
    /// At the end of the send or hold phase, every connection still open.
    pub rss_loaded_kb: u64,
    /// (loaded − before) / connected nodes.
    pub per_connection_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadSummary {
    pub kind: String,
    pub hub: String,
    pub mode: String,
    /// Shards merged into this summary (1 for one process).
    pub shards: usize,
    pub shard: Option<(usize, usize)>,
    pub nodes_total: usize,
    pub senders_total: usize,
    pub window: Option<u32>,
    pub rate: Option<f64>,
    pub payload: usize,
    /// Nodes this summary covers that connected.
    pub connected: u64,
    pub connect_failures: u64,
    pub first_connect_error: Option<String>,
    /// Connections that ended before the run did.
    pub disconnects: u64,
    pub connect_ms: Quantiles,
    pub duration_s: f64,
    pub sent: u64,
    pub delivered: u64,
    pub duplicates: u64,
    /// None when a sender ran in another shard: `merge` computes it.
    pub expected: Option<u64>,
    pub lost: Option<i64>,
    /// Messages whose originating VMAC was not the sender's, or that reached a node they
    /// were not addressed to.
    pub misrouted: u64,
    pub deliveries_per_s: f64,
    pub latency_us: Quantiles,
    pub per_sender: BTreeMap<u32, SenderSummary>,
    pub cpu: CpuSummary,
    /// With --hub-pid: the hub's RSS before and under the load.
    #[serde(default)]
    pub hub_memory: Option<HubMemory>,
    /// base64 of the HDR histogram, V2 serialization (µs).
    pub latency_histogram: String,
    /// base64 of the HDR histogram, V2 serialization (ms).
    pub connect_histogram: String,
    pub warnings: Vec<String>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant figures; bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("3 sig figs"))
}

pub fn histogram_to_base64(h: &Histogram<u64>) -> String {
    let mut v = Vec::new();
    match V2Serializer::new().serialize(h, &mut v) {
        Ok(_) => base64::engine::general_purpose::STANDARD.encode(v),
        Err(_) => String::new(),
    }
}

pub fn histogram_from_base64(s: &str) -> Result<Histogram<u64>, String> {
    if s.is_empty() {
        return Ok(new_histogram());
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).map_err(|e| format!("histogram is not base64: {e}"))?;
    Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .map_err(|e| format!("histogram does not deserialize: {e:?}"))
}

/// Loss accounting over per-sender counts: expected = receivers × sent − Σ first seen.
fn account(per_sender: &BTreeMap<u32, SenderSummary>) -> Option<(u64, i64)> {
    let mut expected: u64 = 0;
    let mut delivered: u64 = 0;
    for s in per_sender.values() {
        let sent = s.sent?;
        expected += (s.receivers * sent).saturating_sub(s.first_seen_sum);
        delivered += s.delivered;
    }
    Some((expected, expected as i64 - delivered as i64))
}

/// Merges shard summaries: sums counts, merges histograms, recomputes loss and rates.
pub fn merge_summaries(parts: &[LoadSummary]) -> Result<LoadSummary, String> {
    let first = parts.first().ok_or("nothing to merge")?;
    let mut out = LoadSummary {
        kind: first.kind.clone(),
        hub: first.hub.clone(),
        mode: first.mode.clone(),
        nodes_total: first.nodes_total,
        senders_total: first.senders_total,
        window: first.window,
        rate: first.rate,
        payload: first.payload,
        ..Default::default()
    };
    let mut lat = new_histogram();
    let mut con = new_histogram();
    let mut seen_shards = std::collections::BTreeSet::new();
    for (i, p) in parts.iter().enumerate() {
        if p.mode != first.mode || p.payload != first.payload || p.nodes_total != first.nodes_total {
            out.warnings.push(format!(
                "part {i} ran a different load (mode {}, payload {}, nodes {}) than part 0",
                p.mode, p.payload, p.nodes_total
            ));
        }
        if let Some(s) = p.shard {
            if !seen_shards.insert(s) {
                out.warnings.push(format!("shard {}/{} appears twice", s.0, s.1));
            }
        }
        out.shards += p.shards.max(1);
        out.connected += p.connected;
        out.connect_failures += p.connect_failures;
        out.first_connect_error = out.first_connect_error.take().or_else(|| p.first_connect_error.clone());
        out.disconnects += p.disconnects;
        out.sent += p.sent;
        out.delivered += p.delivered;
        out.duplicates += p.duplicates;
        out.misrouted += p.misrouted;
        out.duration_s = out.duration_s.max(p.duration_s);
        out.cpu.generator_s += p.cpu.generator_s;
        out.cpu.cores_available += p.cpu.cores_available;
        out.cpu.generator_saturated |= p.cpu.generator_saturated;
        for (g, s) in &p.per_sender {
            let e = out.per_sender.entry(*g).or_default();
            e.sent = match (e.sent, s.sent) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
            e.receivers += s.receivers;
            e.delivered += s.delivered;
            e.duplicates += s.duplicates;
            e.first_seen_sum += s.first_seen_sum;
        }
        lat.add(histogram_from_base64(&p.latency_histogram).map_err(|e| format!("part {i}: latency: {e}"))?)
            .map_err(|e| format!("part {i}: latency histogram: {e:?}"))?;
        con.add(histogram_from_base64(&p.connect_histogram).map_err(|e| format!("part {i}: connect: {e}"))?)
            .map_err(|e| format!("part {i}: connect histogram: {e:?}"))?;
        out.warnings.extend(p.warnings.iter().map(|w| format!("part {i}: {w}")));
    }
    if let Some((_, n)) = parts.iter().filter_map(|p| p.shard).next() {
        if seen_shards.len() < n {
            out.warnings.push(format!("only {} of {n} shards merged", seen_shards.len()));
        }
    }
    if let Some((e, l)) = account(&out.per_sender) {
        out.expected = Some(e);
        out.lost = Some(l);
    } else {
        out.warnings.push("a sender's shard is missing: loss cannot be computed".into());
    }
    out.deliveries_per_s = if out.duration_s > 0.0 { out.delivered as f64 / out.duration_s } else { 0.0 };
    out.cpu.generator_cores_used = if out.duration_s > 0.0 { out.cpu.generator_s / out.duration_s } else { 0.0 };
    out.latency_us = Quantiles::of(&lat);
    out.connect_ms = Quantiles::of(&con);
    out.latency_histogram = histogram_to_base64(&lat);
    out.connect_histogram = histogram_to_base64(&con);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// CPU from /proc
// ---------------------------------------------------------------------------------------

/// utime + stime of a process in seconds, from `/proc/<pid>/stat`.
pub fn process_cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    stat_cpu_seconds(&std::fs::read_to_string(path).ok()?)
}

/// utime + stime in seconds from the text of a /proc stat file.
fn stat_cpu_seconds(text: &str) -> Option<f64> {
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' the fields start at #3 (state); utime is #14, stime #15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        v if v > 0 => v as f64,
        _ => 100.0,
    };
    Some((utime + stime) / hz)
}

/// VmRSS of a process in kB, from `/proc/<pid>/status`.
pub fn process_rss_kb(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Busy CPU seconds of the whole machine (all cores; everything but idle and iowait).
pub fn machine_busy_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = text.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = cpu.split_whitespace().filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let busy: u64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        v if v > 0 => v as f64,
        _ => 100.0,
    };
    Some(busy as f64 / hz)
}

/// CPU seconds of each of this process's threads, by thread id.
fn thread_cpu_seconds() -> BTreeMap<u32, f64> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return BTreeMap::new() };
    dir.filter_map(|e| {
        let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        // /proc/self/task/TID/stat has the same layout as /proc/PID/stat.
        let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        Some((tid, stat_cpu_seconds(&text)?))
    })
    .collect()
}

/// What [`account_cpu`] needs, all over the measured phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSamples {
    pub measured_s: f64,
    pub cores: usize,
    pub generator_s: Option<f64>,
    /// CPU of the generator's busiest thread.
    pub busiest_thread_s: Option<f64>,
    pub hub_s: Option<f64>,
    /// `--hub-pid` was given (a missing reading is then worth a warning).
    pub hub_expected: bool,
    /// Busy CPU of the whole machine.
    pub machine_s: Option<f64>,
    pub delivered: u64,
}

/// The CPU summary and the warnings that say when the figures measure the generator or
/// the machine rather than the hub: the generator near all cores, one of its threads near
/// one full core (a hot sender task), or every core busy.
pub fn account_cpu(c: CpuSamples) -> (CpuSummary, Vec<String>) {
    let t = c.measured_s.max(1e-6);
    let cores = c.cores.max(1);
    let mut s = CpuSummary { cores_available: cores, ..Default::default() };
    let mut w = Vec::new();
    if let Some(g) = c.generator_s {
        s.generator_s = g;
        s.generator_cores_used = g / t;
        s.generator_saturated = s.generator_cores_used >= 0.9 * cores as f64;
        if s.generator_saturated {
            w.push(format!(
                "generator saturated: it used {:.2} of {cores} cores; it, not the hub, may be the bottleneck",
                s.generator_cores_used
            ));
        }
    }
    if let Some(b) = c.busiest_thread_s {
        if !s.generator_saturated && b / t >= 0.9 {
            s.generator_saturated = true;
            w.push(format!(
                "generator saturated: one of its threads was busy {:.0} % of the run (a sender task on one core); \
                 it, not the hub, may be the bottleneck",
                100.0 * b / t
            ));
        }
    }
    match c.hub_s {
        Some(h) => {
            s.hub_s = Some(h);
            if c.delivered > 0 {
                s.hub_us_per_delivery = Some(h * 1e6 / c.delivered as f64);
            }
        }
        None if c.hub_expected => w.push("could not read the hub's /proc/PID/stat".into()),
        None => {}
    }
    if let Some(m) = c.machine_s {
        let busy = m / t;
        let hub_cores = s.hub_s.map(|h| h / t);
        let others = (busy - s.generator_cores_used - hub_cores.unwrap_or(0.0)).max(0.0);
        s.machine_busy_cores = Some(busy);
        s.others_cores = Some(others);
        if busy >= 0.9 * cores as f64 {
            w.push(format!(
                "the machine was CPU-bound ({busy:.2} of {cores} cores busy: generator {:.2}, hub {}, other processes {others:.2}): \
                 rates measure the machine; compare the hub's CPU per delivery",
                s.generator_cores_used,
                hub_cores.map_or("not measured".to_owned(), |h| format!("{h:.2}")),
            ));
        }
    }
    (s, w)
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Sending,
    Draining,
    Stop,
}

/// Shared between node tasks.
struct Shared {
    delivered: AtomicU64,
    sent: AtomicU64,
    /// Per local sender: deliveries counted at its window tracker.
    acked: Vec<AtomicU64>,
    wake: Vec<Notify>,
    last_delivery: AtomicU64,
}

struct NodePlan {
    global: usize,
    /// Index among local senders, when this node sends.
    sender_slot: Option<usize>,
    /// (local sender slot, its global id) this node counts window acknowledgements for.
    tracks: Vec<(usize, u32)>,
    /// Unicast target VMAC (senders only).
    target: Option<Vmac>,
}

struct NodeResult {
    connect_ms: Option<u64>,
    connect_error: Option<String>,
    disconnected: bool,
    /// Made on the first delivery: a held connection (10,000 of them) needs none.
    latency: Option<Histogram<u64>>,
    tracks: BTreeMap<u32, SequenceTrack>,
    sent: u64,
    misrouted: u64,
    /// This node's global id when it sends.
    sender: Option<u32>,
}

#[derive(Clone)]
struct RunParams {
    url: String,
    ws: Vec<(WsConnectOptions, Option<DeviceUuid>)>,
    payload: usize,
    window: Option<u32>,
    rate: Option<f64>,
    unicast: bool,
    heartbeat: Duration,
    connect_timeout: Duration,
    connect_concurrency: usize,
    senders_total: usize,
}

pub fn run_bsc(a: BscLoadArgs) -> i32 {
    match run_bsc_inner(&a) {
        Ok(s) => report(&s, a.json),
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

/// Checks the arguments and runs the load; the summary covers this shard.
pub fn run_bsc_inner(a: &BscLoadArgs) -> Result<LoadSummary, String> {
    let url = HubUrl::parse(&a.hub).map_err(|e| e.to_string())?;
    if a.duration > MAX_DURATION || a.hold > MAX_DURATION {
        return Err(format!("--duration and --hold are capped at {} s", MAX_DURATION.as_secs()));
    }
    if a.payload < PAYLOAD_HEADER || a.payload > 1497 {
        return Err(format!("--payload {} must be between {PAYLOAD_HEADER} and 1497 bytes", a.payload));
    }
    let total = a.connect_only.unwrap_or(a.nodes);
    if total == 0 || total > MAX_NODES * 64 {
        return Err(format!("--nodes must be between 1 and {}", MAX_NODES * 64));
    }
    let senders = if a.connect_only.is_some() { 0 } else { a.senders };
    if senders > total {
        return Err(format!("--senders {senders} exceeds --nodes {total}"));
    }
    if a.connect_only.is_none() && (senders == 0 || total < 2) {
        return Err("a load run needs at least one sender and two nodes".into());
    }
    if let Some(r) = a.rate {
        if !(r > 0.0 && r <= 10_000_000.0) {
            return Err(format!("--rate {r} must be above 0 and at most 10000000"));
        }
    }
    if a.window == Some(0) {
        return Err("--window must be at least 1".into());
    }
    if a.connect_concurrency == 0 {
        return Err("--connect-concurrency must be at least 1".into());
    }
    let (shard_i, shard_n) = a.shard.unwrap_or((0, 1));
    let globals: Vec<usize> = (0..total).filter(|g| g % shard_n == shard_i).collect();
    if globals.len() > MAX_NODES {
        return Err(format!("{} nodes in one shard; at most {MAX_NODES}", globals.len()));
    }
    let window = if a.rate.is_none() && a.connect_only.is_none() { Some(a.window.unwrap_or(16)) } else { None };

    // Plan who sends, who tracks windows, who receives unicasts.
    let local_senders: Vec<usize> = globals.iter().copied().filter(|g| *g < senders).collect();
    let local_receivers: Vec<usize> = globals.iter().copied().filter(|g| *g >= senders).collect();
    let mut plans: Vec<NodePlan> = globals
        .iter()
        .map(|&g| NodePlan { global: g, sender_slot: None, tracks: Vec::new(), target: None })
        .collect();
    let pos = |g: usize| globals.iter().position(|x| *x == g);
    for (slot, &g) in local_senders.iter().enumerate() {
        let tracker = if local_receivers.is_empty() {
            // Only senders here: another local sender tracks (broadcast reaches it).
            local_senders.get((slot + 1) % local_senders.len()).copied().filter(|t| *t != g)
        } else {
            Some(local_receivers[slot % local_receivers.len()])
        };
        if (a.unicast || window.is_some()) && tracker.is_none() {
            return Err(format!(
                "sender {g} has no receiver in this shard (needed for {}); use more nodes per shard",
                if a.unicast { "--unicast targets" } else { "--window" }
            ));
        }
        if let Some(i) = pos(g) {
            plans[i].sender_slot = Some(slot);
            plans[i].target = if a.unicast { tracker.map(node_vmac) } else { None };
        }
        if let (Some(t), true) = (tracker.and_then(pos), window.is_some()) {
            plans[t].tracks.push((slot, g as u32));
        }
    }

    // TLS: node g presents node-(g % C + 1) and sends the Device UUID in it
    // (a hub may bind identities to certificates).
    let ws_opts: Vec<(WsConnectOptions, Option<DeviceUuid>)> = match (&a.tls_dir, url.tls) {
        (Some(dir), true) => {
            let mut certs = 0;
            while dir.join(format!("node-{}.pem", certs + 1)).is_file() && certs < 100_000 {
                certs += 1;
            }
            if certs == 0 {
                return Err(format!("{}: no node-1.pem (make one with `hilbench pki --out {}`)", dir.display(), dir.display()));
            }
            let n = certs.min(globals.len()).max(1);
            (1..=n)
                .map(|k| {
                    let files = TlsDir::node(dir, &format!("node-{k}"));
                    files
                        .client_config()
                        .map(|c| {
                            let mut o = WsConnectOptions::hub(Some(c));
                            o.timeout = a.connect_timeout;
                            (o, files.device_uuid().map(DeviceUuid))
                        })
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<_, _>>()?
        }
        (None, true) => return Err(format!("{}: wss:// needs --tls-dir", a.hub)),
        (Some(_), false) => return Err(format!("{}: --tls-dir given for a plaintext ws:// URL", a.hub)),
        (None, false) => {
            let mut o = WsConnectOptions::hub(None);
            o.timeout = a.connect_timeout;
            vec![(o, None)]
        }
    };
    let hub_pid = match (a.hub_pid, url.is_loopback()) {
        (Some(p), true) => Some(p),
        (Some(_), false) => return Err("--hub-pid needs a loopback hub URL (the hub's CPU is read from /proc)".into()),
        _ => None,
    };

    let params = RunParams {
        url: a.hub.clone(),
        ws: ws_opts,
        payload: a.payload,
        window,
        rate: a.rate,
        unicast: a.unicast,
        heartbeat: a.heartbeat,
        connect_timeout: a.connect_timeout,
        connect_concurrency: a.connect_concurrency,
        senders_total: senders,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let phase_len = if a.connect_only.is_some() { a.hold } else { a.duration };
    let mut summary = rt.block_on(drive(params, plans, local_senders.len(), phase_len, hub_pid, !a.json, cores));
    summary.hub = a.hub.clone();
    summary.mode = if a.connect_only.is_some() {
        "connect_only".into()
    } else if a.unicast {
        "unicast".into()
    } else {
        "broadcast".into()
    };
    summary.shard = a.shard;
    summary.nodes_total = total;
    summary.senders_total = senders;
    summary.window = window;
    summary.rate = a.rate;
    summary.payload = a.payload;
    // Receivers per sender in this shard, for loss accounting; every sender gets an entry
    // so a sender nobody here heard from still counts.
    let connected_receivers = summary.connected;
    for g in 0..senders {
        summary.per_sender.entry(g as u32).or_default();
    }
    for (g, s) in summary.per_sender.iter_mut() {
        let local = (*g as usize) % shard_n == shard_i;
        s.receivers = if a.unicast {
            u64::from(local)
        } else {
            // Every connected node of this shard except the sender itself.
            connected_receivers.saturating_sub(u64::from(local))
        };
    }
    if let Some((e, l)) = account(&summary.per_sender) {
        summary.expected = Some(e);
        summary.lost = Some(l);
    }
    Ok(summary)
}

async fn drive(
    params: RunParams,
    plans: Vec<NodePlan>,
    local_senders: usize,
    phase_len: Duration,
    hub_pid: Option<u32>,
    progress: bool,
    cores: usize,
) -> LoadSummary {
    let shared = Arc::new(Shared {
        delivered: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        acked: (0..local_senders).map(|_| AtomicU64::new(0)).collect(),
        wake: (0..local_senders).map(|_| Notify::new()).collect(),
        last_delivery: AtomicU64::new(0),
    });
    let rss_before = hub_pid.and_then(process_rss_kb);
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    let gate = Arc::new(Semaphore::new(params.connect_concurrency));
    let connected = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let n = plans.len();
    let bar = if progress && std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(n as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_prefix("connecting");
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut handles = Vec::with_capacity(n);
    for (i, plan) in plans.into_iter().enumerate() {
        let p = params.clone();
        let sh = shared.clone();
        let rx = phase_rx.clone();
        let gate = gate.clone();
        let connected = connected.clone();
        let ws = p.ws[i % p.ws.len()].clone();
        handles.push(tokio::spawn(node_task(p, ws, plan, sh, rx, gate, connected, epoch)));
    }
    // Connect phase: every attempt is bounded by the connect timeout, so this ends.
    let rounds = (n / params.connect_concurrency.max(1)) as u32;
    let connect_cap = params.connect_timeout * (2 + rounds.min(1000)) + Duration::from_secs(5);
    let connect_deadline = Instant::now() + connect_cap;
    loop {
        let c = connected.load(Ordering::Relaxed);
        // Tasks that finished during the connect phase are failed connections.
        let done = handles.iter().filter(|h| h.is_finished()).count() as u64;
        bar.set_position(c);
        if c + done >= n as u64 || Instant::now() >= connect_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Receivers are up before anyone sends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cpu0 = process_cpu_seconds(None);
    let hub0 = hub_pid.and_then(|p| process_cpu_seconds(Some(p)));
    let machine0 = machine_busy_seconds();
    let threads0 = thread_cpu_seconds();
    let start = Instant::now();
    let _ = phase_tx.send(Phase::Sending);
    bar.set_prefix(if local_senders > 0 { "sending" } else { "holding" });
    bar.set_length(phase_len.as_millis() as u64);
    bar.set_position(0);
    while start.elapsed() < phase_len {
        bar.set_position(start.elapsed().as_millis() as u64);
        bar.set_message(format!(
            "{} sent, {} delivered",
            shared.sent.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed)
        ));
        tokio::time::sleep(Duration::from_millis(100).min(phase_len.saturating_sub(start.elapsed()).max(Duration::from_millis(1)))).await;
    }
    let send_end = start.elapsed();
    let _ = phase_tx.send(Phase::Draining);
    // Drain: until 300 ms pass with no delivery, at most 3 s.
    if local_senders > 0 || params.senders_total > 0 {
        bar.set_prefix("draining");
        let drain_end = Instant::now() + Duration::from_secs(3);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let last = shared.last_delivery.load(Ordering::Relaxed);
            let quiet = epoch.elapsed().as_millis() as u64 >= last + 300;
            if quiet || Instant::now() >= drain_end {
                break;
            }
        }
    }
    let last_ms = shared.last_delivery.load(Ordering::Relaxed);
    let wall = if local_senders > 0 || params.senders_total > 0 {
        Duration::from_millis(last_ms).saturating_sub(start.duration_since(epoch)).max(send_end)
    } else {
        send_end
    };
    let cpu1 = process_cpu_seconds(None);
    let hub1 = hub_pid.and_then(|p| process_cpu_seconds(Some(p)));
    let machine1 = machine_busy_seconds();
    let rss_loaded = hub_pid.and_then(process_rss_kb);
    let _ = phase_tx.send(Phase::Stop);
    bar.finish_and_clear();

    let mut s = LoadSummary { kind: "bsc-load".into(), shards: 1, ..Default::default() };
    let mut lat = new_histogram();
    let mut con = new_histogram();
    for h in handles {
        // Each task ends within its disconnect wait once told to stop; bound it anyway.
        let r = match tokio::time::timeout(Duration::from_secs(10), h).await {
            Ok(Ok(r)) => r,
            _ => {
                s.warnings.push("a node task did not stop in time".into());
                continue;
            }
        };
        match r.connect_ms {
            Some(ms) => {
                s.connected += 1;
                let _ = con.record(ms.max(1));
            }
            None => {
                s.connect_failures += 1;
                if s.first_connect_error.is_none() {
                    s.first_connect_error = r.connect_error.clone();
                }
            }
        }
        s.disconnects += u64::from(r.disconnected);
        if let Some(h) = &r.latency {
            let _ = lat.add(h);
        }
        s.sent += r.sent;
        s.misrouted += r.misrouted;
        for (g, t) in &r.tracks {
            let e = s.per_sender.entry(*g).or_default();
            e.delivered += t.unique;
            e.duplicates += t.duplicates;
            e.first_seen_sum += t.first.unwrap_or(0);
            s.delivered += t.unique;
            s.duplicates += t.duplicates;
        }
        if let Some(slot_sent) = r.sender_global_and_sent() {
            s.per_sender.entry(slot_sent.0).or_default().sent = Some(slot_sent.1);
        }
    }
    s.duration_s = wall.as_secs_f64();
    s.deliveries_per_s = if s.duration_s > 0.0 { s.delivered as f64 / s.duration_s } else { 0.0 };
    s.latency_us = Quantiles::of(&lat);
    s.connect_ms = Quantiles::of(&con);
    s.latency_histogram = histogram_to_base64(&lat);
    s.connect_histogram = histogram_to_base64(&con);
    let measured = (start.elapsed()).as_secs_f64().max(1e-6);
    let threads1 = thread_cpu_seconds();
    let busiest = threads1
        .iter()
        .map(|(tid, t)| t - threads0.get(tid).copied().unwrap_or(0.0))
        .fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.max(d))));
    let (cpu, warnings) = account_cpu(CpuSamples {
        measured_s: measured,
        cores,
        generator_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
        busiest_thread_s: busiest,
        hub_s: hub0.zip(hub1).map(|(a, b)| b - a),
        hub_expected: hub_pid.is_some(),
        machine_s: machine0.zip(machine1).map(|(a, b)| b - a),
        delivered: s.delivered,
    });
    s.cpu = cpu;
    s.warnings.extend(warnings);
    if let (Some(before), Some(loaded)) = (rss_before, rss_loaded) {
        s.hub_memory = Some(HubMemory {
            rss_before_kb: before,
            rss_loaded_kb: loaded,
            per_connection_bytes: (s.connected > 0).then(|| loaded.saturating_sub(before) * 1024 / s.connected),
        });
    }
    s
}

impl NodeResult {
    fn sender_global_and_sent(&self) -> Option<(u32, u64)> {
        self.sender.map(|g| (g, self.sent))
    }
}

#[allow(clippy::too_many_arguments)]
async fn node_task(
    p: RunParams,
    (ws_opts, cert_uuid): (WsConnectOptions, Option<DeviceUuid>),
    plan: NodePlan,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    gate: Arc<Semaphore>,
    connected: Arc<AtomicU64>,
    epoch: Instant,
) -> NodeResult {
    let mut res = NodeResult {
        connect_ms: None,
        connect_error: None,
        disconnected: false,
        latency: None,
        tracks: BTreeMap::new(),
        sent: 0,
        misrouted: 0,
        sender: plan.sender_slot.map(|_| plan.global as u32),
    };
    let mut cfg = NodeConfig::new(node_vmac(plan.global), cert_uuid.unwrap_or_else(|| node_uuid(plan.global)));
    cfg.heartbeat_interval = p.heartbeat;
    cfg.connect_wait = p.connect_timeout;
    let t0 = Instant::now();
    let conn = {
        let _permit = gate.acquire().await;
        connect_node(&p.url, &ws_opts, cfg, (plan.global as u16).wrapping_mul(31), epoch).await
    };
    let (ws, mut session) = match conn {
        Ok(c) => c,
        Err(e) => {
            res.connect_error = Some(e.to_string());
            return res;
        }
    };
    res.connect_ms = Some(t0.elapsed().as_millis() as u64);
    connected.fetch_add(1, Ordering::Relaxed);
    let (mut sink, stream) = ws.split();
    let mut batches = stream.ready_chunks(256);
    let dest = plan.target.unwrap_or(Vmac::BROADCAST);
    let mut seq: u64 = 0;
    let mut npdu = vec![0u8; p.payload];
    let mut frame = Vec::with_capacity(p.payload + 32);
    let mut sending = false;
    let mut send_start = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_millis(1));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let wake = plan.sender_slot.and_then(|s| shared.wake.get(s));
    loop {
        let can_send = sending && plan.sender_slot.is_some();
        let window_open = match (p.window, plan.sender_slot) {
            (Some(w), Some(slot)) => {
                let acked = shared.acked.get(slot).map_or(0, |a| a.load(Ordering::Acquire));
                seq.saturating_sub(acked) < u64::from(w)
            }
            _ => false,
        };
        let hb = session.poll_timeout().map(|t| epoch + t).unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        // Unbiased: a sender that also receives heavy traffic must still get to send.
        tokio::select! {
            ch = phase.changed() => {
                if ch.is_err() {
                    break;
                }
                match *phase.borrow() {
                    Phase::Sending => {
                        sending = true;
                        send_start = Instant::now();
                    }
                    Phase::Draining => sending = false,
                    Phase::Stop => break,
                    Phase::Connecting => {}
                }
            }
            batch = batches.next() => {
                let Some(batch) = batch else {
                    res.disconnected = true;
                    break;
                };
                let now_ns = wall_ns();
                let mut got = 0u64;
                let mut fed = false;
                for m in batch {
                    let data = match m {
                        Ok(WsMessage::Binary(b)) => b,
                        Ok(WsMessage::Close(_)) | Err(_) => {
                            res.disconnected = true;
                            break;
                        }
                        Ok(_) => continue,
                    };
                    for o in session.receive(&data, epoch.elapsed()) {
                        match o {
                            SessionOutput::Event(SessionEvent::Npdu { from, broadcast, npdu }) => {
                                let Some((sender, s, ts)) = read_payload(&npdu) else {
                                    res.misrouted += 1;
                                    continue;
                                };
                                if from != Some(node_vmac(sender as usize)) || (broadcast == p.unicast) {
                                    res.misrouted += 1;
                                }
                                if res.tracks.entry(sender).or_default().arrive(s) {
                                    got += 1;
                                    let _ = res
                                        .latency
                                        .get_or_insert_with(new_histogram)
                                        .record((now_ns.saturating_sub(ts) / 1000).max(1));
                                    if let Some((slot, _)) = plan.tracks.iter().find(|(_, g)| *g == sender) {
                                        if let (Some(a), Some(w)) = (shared.acked.get(*slot), shared.wake.get(*slot)) {
                                            a.fetch_max(s + 1, Ordering::AcqRel);
                                            w.notify_one();
                                        }
                                    }
                                }
                            }
                            SessionOutput::Send(b) => {
                                let _ = sink.feed(WsMessage::Binary(b.into())).await;
                                fed = true;
                            }
                            SessionOutput::Event(SessionEvent::Ended(_)) => res.disconnected = true,
                            SessionOutput::Event(_) => {}
                        }
                    }
                    if res.disconnected {
                        break;
                    }
                }
                if res.disconnected {
                    break;
                }
                if got > 0 {
                    shared.delivered.fetch_add(got, Ordering::Relaxed);
                    shared.last_delivery.fetch_max(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                if fed {
                    let _ = sink.flush().await;
                }
            }
            _ = async { match wake { Some(w) => w.notified().await, None => std::future::pending().await } }, if can_send && p.window.is_some() && !window_open => {}
            _ = async { if p.rate.is_some() { pace.tick().await; } }, if can_send && (p.rate.is_some() || window_open) => {
                // Window: fill it. Rate: catch up to rate × elapsed, at most 1000 per tick.
                let goal = match (p.window, p.rate) {
                    (Some(w), _) => {
                        let acked = plan.sender_slot.and_then(|s| shared.acked.get(s)).map_or(0, |a| a.load(Ordering::Acquire));
                        acked + u64::from(w)
                    }
                    (None, Some(r)) => (send_start.elapsed().as_secs_f64() * r) as u64,
                    _ => seq,
                };
                let burst = goal.saturating_sub(seq).min(1000);
                let mut n = 0;
                for _ in 0..burst {
                    write_payload(&mut npdu, plan.global as u32, seq, wall_ns());
                    frame.clear();
                    if session.encode_npdu(dest, &npdu, epoch.elapsed(), &mut frame).is_err() {
                        break;
                    }
                    if sink.feed(WsMessage::Binary(frame.clone().into())).await.is_err() {
                        res.disconnected = true;
                        break;
                    }
                    seq += 1;
                    n += 1;
                }
                if sink.flush().await.is_err() {
                    res.disconnected = true;
                    break;
                }
                res.sent = seq;
                shared.sent.fetch_add(n, Ordering::Relaxed);
            }
            _ = tokio::time::sleep_until(hb) => {
                for o in session.tick(epoch.elapsed()) {
                    match o {
                        SessionOutput::Send(b) => {
                            let _ = sink.send(WsMessage::Binary(b.into())).await;
                        }
                        SessionOutput::Event(SessionEvent::Ended(_)) => res.disconnected = true,
                        SessionOutput::Event(_) => {}
                    }
                }
                if res.disconnected {
                    break;
                }
            }
        }
    }
    res.sent = seq;
    if let Some(bye) = session.disconnect(epoch.elapsed()) {
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(WsMessage::Binary(bye.into()))).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    res
}

/// Whether a load run failed: exit status 1 of both `load bsc` and `load merge`.
///
/// It failed when no node connected, or a message was lost, duplicated or misrouted, or
/// loss is unknown where it should be known. Only one shard's own summary (`load bsc
/// --shard`) may leave loss unknown: a sender in another shard holds the counts, and `load
/// merge` computes it. In an unsharded run or a merged summary, unknown loss means some
/// sender's counts are missing (a shard was not merged), so nothing proves delivery.
pub fn run_failed(s: &LoadSummary) -> bool {
    let loss_failed = match s.lost {
        Some(lost) => lost > 0,
        None => s.shard.is_none(),
    };
    s.connected == 0 || loss_failed || s.duplicates > 0 || s.misrouted > 0
}

/// Prints a summary, as JSON (the form `load merge` reads) or for people, and returns the
/// exit status: 0 passed, 1 failed ([`run_failed`]), 2 when it cannot be serialized.
fn report(s: &LoadSummary, json: bool) -> i32 {
    if json {
        match serde_json::to_string_pretty(s) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        }
    } else {
        print_human(s);
    }
    i32::from(run_failed(s))
}

fn print_human(s: &LoadSummary) {
    let shard = match s.shard {
        Some((i, n)) => format!(" (shard {i}/{n})"),
        None if s.shards > 1 => format!(" ({} shards merged)", s.shards),
        None => String::new(),
    };
    println!("BACnet/SC load on {}{shard}: {}", s.hub, s.mode);
    println!(
        "  nodes       {} connected, {} failed{}; {} disconnected during the run",
        s.connected,
        s.connect_failures,
        s.first_connect_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default(),
        s.disconnects
    );
    println!(
        "  connect     p50 {} ms, p99 {} ms, max {} ms",
        s.connect_ms.p50, s.connect_ms.p99, s.connect_ms.max
    );
    if s.mode != "connect_only" {
        println!(
            "  traffic     {} senders, {} payload bytes, {}",
            s.senders_total,
            s.payload,
            match (s.window, s.rate) {
                (Some(w), _) => format!("window {w}"),
                (_, Some(r)) => format!("{r} msg/s per sender"),
                _ => "unpaced".into(),
            }
        );
        println!(
            "  sent        {} in {:.2} s; delivered {} ({:.0}/s)",
            s.sent, s.duration_s, s.delivered, s.deliveries_per_s
        );
        match (s.expected, s.lost) {
            (Some(e), Some(l)) => println!("  loss        expected {e}, lost {l}, duplicated {}, misrouted {}", s.duplicates, s.misrouted),
            _ if s.shard.is_some() => {
                println!("  loss        computed by `load merge` (senders in other shards); duplicated {}", s.duplicates)
            }
            _ => println!("  loss        unknown (a sender's counts are missing); duplicated {}", s.duplicates),
        }
        let l = &s.latency_us;
        println!(
            "  latency µs  p50 {} p90 {} p99 {} p99.9 {} max {} (mean {:.0})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
    }
    let c = &s.cpu;
    print!("  cpu         generator {:.2} s ({:.2} of {} cores)", c.generator_s, c.generator_cores_used, c.cores_available);
    if let Some(h) = c.hub_s {
        print!("; hub {h:.2} s");
    }
    if let Some(u) = c.hub_us_per_delivery {
        print!(", {u:.2} µs per delivery");
    }
    if let (Some(b), Some(o)) = (c.machine_busy_cores, c.others_cores) {
        print!("; machine {b:.2} cores busy, {o:.2} by other processes");
    }
    println!();
    if let Some(m) = &s.hub_memory {
        print!(
            "  hub memory  RSS {:.1} MB before, {:.1} MB with {} connections",
            m.rss_before_kb as f64 / 1024.0,
            m.rss_loaded_kb as f64 / 1024.0,
            s.connected
        );
        if let Some(b) = m.per_connection_bytes {
            print!(": {:.1} kB per connection", b as f64 / 1024.0);
        }
        println!();
    }
    for w in &s.warnings {
        println!("  warning: {w}");
    }
}

fn run_merge(m: MergeArgs) -> i32 {
    let mut parts = Vec::new();
    for f in &m.files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {}: {e}", f.display());
                return 2;
            }
        };
        match serde_json::from_str::<LoadSummary>(&text) {
            Ok(s) => parts.push(s),
            Err(e) => {
                eprintln!("error: {}: not a `load bsc --json` summary: {e}", f.display());
                return 2;
            }
        }
    }
    match merge_summaries(&parts) {
        Ok(s) => report(&s, m.json),
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_parses_and_rejects_bad_input() {
        assert_eq!(parse_shard("1/4"), Ok((1, 4)));
        assert!(parse_shard("4/4").unwrap_err().contains("0 <= I < N"));
        assert!(parse_shard("x/4").is_err());
        assert!(parse_shard("3").is_err());
        assert!(parse_shard("0/0").is_err());
    }

    #[test]
    fn payload_round_trips_and_short_payloads_are_rejected() {
        let mut b = vec![0u8; 32];
        write_payload(&mut b, 7, 1 << 40, 123_456_789);
        assert_eq!(read_payload(&b), Some((7, 1 << 40, 123_456_789)));
        assert_eq!(read_payload(&b[..19]), None);
    }

    #[test]
    fn vmacs_are_distinct_unicast() {
        let a = node_vmac(0);
        let b = node_vmac(65536);
        assert_ne!(a, b);
        assert!(a.is_local_unicast() && !a.is_broadcast() && !a.is_reserved());
        assert_ne!(node_uuid(1), node_uuid(2));
    }

    #[test]
    fn sequence_tracking_counts_gaps_and_duplicates() {
        let mut t = SequenceTrack::default();
        assert!(t.arrive(3));
        assert!(t.arrive(4));
        assert!(!t.arrive(4));
        assert!(t.arrive(7)); // 5 and 6 lost
        assert!(!t.arrive(2));
        assert_eq!((t.first, t.unique, t.duplicates, t.next), (Some(3), 3, 2, 8));
    }

    fn part(shard: usize, sent: Option<u64>, delivered: u64, first: u64, lat: &[u64]) -> LoadSummary {
        let mut h = new_histogram();
        for v in lat {
            h.record(*v).unwrap();
        }
        let mut per = BTreeMap::new();
        per.insert(0, SenderSummary { sent, receivers: 2, delivered, duplicates: 0, first_seen_sum: first });
        LoadSummary {
            kind: "bsc-load".into(),
            mode: "broadcast".into(),
            shards: 1,
            shard: Some((shard, 2)),
            nodes_total: 5,
            payload: 20,
            duration_s: 2.0,
            delivered,
            per_sender: per,
            latency_histogram: histogram_to_base64(&h),
            ..Default::default()
        }
    }

    #[test]
    fn merge_sums_counts_merges_histograms_and_computes_loss() {
        // Sender 0 sent 100 in shard 0; 2 receivers there got all; 2 receivers in shard 1
        // joined at sequence 10 and got 89 of the 90 after it.
        let a = part(0, Some(100), 200, 0, &[10, 20]);
        let b = part(1, None, 179, 20, &[30, 4000]);
        let m = merge_summaries(&[a, b]).unwrap();
        assert_eq!(m.shards, 2);
        assert_eq!(m.delivered, 379);
        assert_eq!(m.expected, Some(4 * 100 - 20));
        assert_eq!(m.lost, Some(1));
        assert_eq!(m.latency_us.count, 4);
        assert_eq!(m.latency_us.max, histogram_from_base64(&m.latency_histogram).unwrap().max());
        assert!(m.latency_us.max >= 4000 && m.latency_us.max < 4010);
        assert!((m.deliveries_per_s - 189.5).abs() < 1e-9);
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    }

    #[test]
    fn merge_without_the_senders_shard_cannot_compute_loss() {
        let b = part(1, None, 179, 20, &[30]);
        let m = merge_summaries(&[b]).unwrap();
        assert_eq!(m.lost, None);
        assert!(m.warnings.iter().any(|w| w.contains("only 1 of 2 shards")), "{:?}", m.warnings);
        assert!(m.warnings.iter().any(|w| w.contains("loss cannot be computed")));
    }

    #[test]
    fn one_criterion_decides_shards_merges_and_single_runs() {
        let clean = LoadSummary { connected: 3, expected: Some(10), lost: Some(0), ..Default::default() };
        assert!(!run_failed(&clean));
        assert!(run_failed(&LoadSummary { connected: 0, ..clean.clone() }), "nothing connected");
        assert!(run_failed(&LoadSummary { lost: Some(1), ..clean.clone() }));
        assert!(run_failed(&LoadSummary { duplicates: 1, ..clean.clone() }));
        assert!(run_failed(&LoadSummary { misrouted: 1, ..clean.clone() }));
        // Unknown loss: fine in one shard (merge computes it), a failure anywhere else.
        let unknown = LoadSummary { expected: None, lost: None, ..clean.clone() };
        assert!(!run_failed(&LoadSummary { shard: Some((1, 2)), ..unknown.clone() }));
        assert!(run_failed(&unknown));
        let merged = merge_summaries(&[LoadSummary { connected: 2, ..part(1, None, 179, 20, &[30]) }]).unwrap();
        assert!(merged.connected > 0 && merged.lost.is_none() && run_failed(&merged));
    }

    #[test]
    fn bad_histograms_are_errors_not_panics() {
        assert!(histogram_from_base64("!!!").is_err());
        assert!(histogram_from_base64("AAAA").is_err());
    }

    #[test]
    fn cpu_accounting_warns_when_the_generator_or_the_machine_limits_the_run() {
        let base = CpuSamples {
            measured_s: 10.0,
            cores: 2,
            generator_s: Some(5.0),
            busiest_thread_s: Some(4.0),
            hub_s: Some(5.0),
            hub_expected: true,
            machine_s: Some(12.0),
            delivered: 1_000_000,
        };
        let (c, w) = account_cpu(base);
        assert!(w.is_empty(), "{w:?}");
        assert!(!c.generator_saturated);
        assert_eq!(c.hub_us_per_delivery, Some(5.0));
        assert!((c.others_cores.unwrap() - 0.2).abs() < 1e-9);

        // Near all cores.
        let (c, w) = account_cpu(CpuSamples { generator_s: Some(18.5), machine_s: Some(19.0), ..base });
        assert!(c.generator_saturated);
        assert!(w.iter().any(|w| w.contains("generator saturated") && w.contains("1.85 of 2")), "{w:?}");
        assert!(w.iter().any(|w| w.contains("CPU-bound")), "{w:?}");

        // One thread pinned at a full core while the process as a whole is not.
        let (c, w) = account_cpu(CpuSamples { busiest_thread_s: Some(9.6), ..base });
        assert!(c.generator_saturated);
        assert!(w.iter().any(|w| w.contains("one of its threads was busy 96 %")), "{w:?}");

        // Other processes took the machine: the rates are the machine's.
        let (c, w) = account_cpu(CpuSamples { machine_s: Some(19.5), ..base });
        assert!(!c.generator_saturated);
        assert!((c.others_cores.unwrap() - 0.95).abs() < 1e-9);
        assert!(w.iter().any(|w| w.contains("other processes 0.95")), "{w:?}");

        let (_, w) = account_cpu(CpuSamples { hub_s: None, ..base });
        assert!(w.iter().any(|w| w.contains("/proc/PID/stat")), "{w:?}");
    }

    #[test]
    fn own_cpu_time_is_readable() {
        let t = process_cpu_seconds(None).expect("/proc/self/stat");
        assert!(t >= 0.0);
        assert!(process_cpu_seconds(Some(u32::MAX)).is_none());
        assert!(!thread_cpu_seconds().is_empty());
        assert!(machine_busy_seconds().is_some_and(|m| m > 0.0));
        assert!(process_rss_kb(std::process::id()).is_some_and(|kb| kb > 0));
        assert_eq!(stat_cpu_seconds("1 (a) b)"), None);
    }
}
