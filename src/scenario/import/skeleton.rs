//! The scenario `capture import` writes next to a capture's fixtures: per link, the
//! captured devices replayed on a bus, and a client of the captured kind that sends what
//! the captured client sent, with the steps the capture proves (the errors and readings
//! it must meet). `hilbench run` passes it as written; the user swaps in the production
//! client, or a fault, from there. The kind supplies the client and steps
//! ([`crate::kind::Kind::capture_client`]); this module never names a kind.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{read_fixture_head, slug, DeviceReport};
use crate::kind::{self, Role};
use crate::link::recognise::{CaptureTransport, CapturedDevice};

/// Frames of each fixture a kind reads to derive the steps.
pub const SKELETON_FRAMES: usize = 4096;

/// One link's scenario, or why it has none.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScenarioReport {
    pub link: String,
    pub kind: Option<String>,
    /// The scenario written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<PathBuf>,
    /// Why no scenario was written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    pub devices: usize,
    pub steps: usize,
}

/// Writes `OUT/<stem>.<link>.yaml` for every link whose devices a scenario can replay.
/// What every scenario of one import shares.
struct Import<'a> {
    stem: &'a str,
    source: &'a Path,
    out_dir: &'a Path,
    as_state: bool,
}

pub(super) fn write_all(stem: &str, source: &Path, out_dir: &Path, devices: &[DeviceReport], as_state: bool) -> Vec<ScenarioReport> {
    let import = Import { stem, source, out_dir, as_state };
    let mut links: BTreeMap<(&str, Option<&str>), Vec<&DeviceReport>> = BTreeMap::new();
    for d in devices {
        links.entry((d.link.as_str(), d.kind.as_deref())).or_default().push(d);
    }
    let mut taken = std::collections::HashSet::new();
    links
        .into_iter()
        .map(|((link, kind), devs)| {
            let mut r = ScenarioReport { link: link.to_string(), kind: kind.map(str::to_string), scenario: None, skipped: None, devices: devs.len(), steps: 0 };
            match write_one(&import, link, kind, &devs, &mut taken) {
                Ok((path, steps)) => {
                    r.scenario = Some(path);
                    r.steps = steps;
                }
                Err(why) => r.skipped = Some(why),
            }
            r
        })
        .collect()
}

fn write_one(im: &Import<'_>, link: &str, kind: Option<&str>, devs: &[&DeviceReport], taken: &mut std::collections::HashSet<String>) -> Result<(PathBuf, usize), String> {
    let Import { stem, out_dir, as_state, .. } = *im;
    let kind = kind.and_then(|k| kind::find(Role::Device, k)).ok_or("no device kind recognised its frames")?;
    // Serial devices share a bus; BLE ones are each on the air, UDP and HTTP/WebSocket
    // ones each on a socket.
    let port = match devs[0].transport {
        CaptureTransport::Serial => Some("client"),
        CaptureTransport::BleAtt | CaptureTransport::Udp | CaptureTransport::Http | CaptureTransport::WebSocket => None,
    };
    let mut captured = Vec::new();
    for d in devs {
        let (_, frames) = read_fixture_head(&d.fixture, SKELETON_FRAMES)?;
        let mut out = Vec::with_capacity(frames.len());
        for (i, f) in frames.into_iter().enumerate() {
            out.push((f.dir, crate::scenario::spec::parse_hex(&f.hex).map_err(|e| format!("{}: frame {}: {e}", d.fixture.display(), i + 1))?));
        }
        captured.push(CapturedDevice { name: slug(&d.device), unit: d.unit.clone(), transport: d.transport, frames: out });
    }
    // Replayed devices, or (--as-state) the kind's simulated ones in the captured state.
    let (client, entries) = if as_state {
        let m = kind.capture_model(port, &captured)?;
        (m.client, m.devices)
    } else {
        let bus = port.map(|_| "field");
        let entries = devs.iter().zip(&captured).map(|(d, c)| crate::kind::replay::scenario_entry(&c.name, bus, &d.fixture)).collect();
        (kind.capture_client(port, &captured)?, entries)
    };
    if client.steps.is_empty() {
        return Err("the capture shows nothing a step could check".into());
    }
    let base = format!("{stem}.{}", slug(link));
    let name = (1..).map(|i| if i == 1 { base.clone() } else { format!("{base}-{i}") }).find(|n| taken.insert(n.clone())).unwrap_or(base);
    let path = out_dir.join(format!("{name}.yaml"));
    let text = render(im, link, kind.name(), port, &captured, &entries, &client);
    let mut f = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, client.steps.len()))
}

/// A YAML string scalar (JSON's quoting is valid YAML).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn render(im: &Import<'_>, link: &str, kind: &str, port: Option<&str>, captured: &[CapturedDevice], entries: &[String], client: &crate::link::recognise::CaptureClient) -> String {
    let (source, as_state) = (im.source, im.as_state);
    let mut s = String::new();
    let first = captured.first().map_or("DEVICE", |c| c.name.as_str());
    let (where_, arg) = match (port, captured.first().map(|c| c.transport)) {
        (Some(p), _) => ("on a bus", format!("{{{{port.{p}}}}}")),
        (None, Some(CaptureTransport::Udp)) => ("on a UDP socket", format!("{{{{udp.{first}}}}}")),
        (None, Some(CaptureTransport::Http | CaptureTransport::WebSocket)) => ("on a TCP port (HTTP and WebSocket)", format!("{{{{http.{first}}}}}")),
        (None, _) => ("on the virtual air", format!("{{{{ble.{first}}}}}")),
    };
    let what = if as_state {
        format!("simulated {where_} in the state the capture shows (--as-state),\n# with the faults that give the client what the capture does")
    } else {
        format!("replayed {where_},\n# answering as they did in the field")
    };
    s.push_str(&format!(
        "# Written by `hilbench capture import` from {}: the captured devices {what}, and a client that sends what the captured client sent.\n\
         # Your production client meets the field devices when it runs as a process:\n\
         # processes:\n\
         #   - {{ name: app, command: /path/to/your/client, args: [\"{arg}\"] }}\n",
        source.display()
    ));
    let how = if as_state { "simulated in the state of" } else { "replayed from" };
    s.push_str(&format!("name: {}\n", quoted(&format!("{} {link} {how} its capture", source.file_name().map_or_else(String::new, |f| f.to_string_lossy().into_owned())))));
    s.push_str("description: >\n");
    s.push_str(&format!("  {kind} devices captured on {link} in {}.\n", source.display()));
    for n in &client.notes {
        s.push_str(&format!("  {n}.\n"));
    }
    if let Some(port) = port {
        s.push_str(&format!("buses:\n  - {{ name: field, ports: [{port}] }}\n"));
    }
    s.push_str("devices:\n");
    for e in entries {
        s.push_str(&format!("  - {e}\n"));
    }
    s.push_str(&format!("clients:\n  - {}\n", client.client));
    s.push_str("steps:\n");
    for step in &client.steps {
        s.push_str(&format!("  - {step}\n"));
    }
    s
}
