//! `hilbench capture`: captures from the field into fixtures.

use std::path::PathBuf;

use crate::scenario::import::{self, Confidence, ImportOptions, ImportReport};

#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    #[command(subcommand)]
    pub what: CaptureCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum CaptureCommand {
    /// Read captures (pcapng, pcap, btsnoop, hex dump, JSON Lines) into one fixture per device.
    #[command(after_help = "Reads Wireshark's Modbus RTU exported PDUs (hilbench's own captures among them), Bluetooth HCI
(Android's btsnoop_hci.log, btmon's log, pcap/pcapng HCI H4 and Linux monitor) down to ATT, and
UDP datagrams (SMP) over Ethernet, loopback, raw IP or Linux cooked captures; a hex dump of
`[time] [>|<] hex` lines or `tx=HEX rx=HEX` trace lines; JSON Lines of frame records.
Writes OUT/<file>.<device>.jsonl: a header line (device, transport, kind, confidence, evidence,
GATT handles) and one line per frame (t_ns, dir, hex, ATT opcode/handle/UUID, decoded meaning),
and per link OUT/<file>.<link>.yaml: a scenario that replays the devices to a client of their
kind with the errors and readings the capture shows (or the reason it cannot).

Exit status: 0 imported; 1 the file could not be read to its end (the frames before the
error are written, the error says which byte and record); 2 bad arguments or an unreadable file.

Examples:
  hilbench capture import fixtures/captures/jbd-session.btsnoop --out target/fixtures
  hilbench capture import fixtures/captures/eg4-bridge-trace.log --out target/fixtures --json
  hilbench capture import fixtures/captures/eg4-fault3-bridge.pcapng --out target/fixtures && hilbench run target/fixtures/eg4-fault3-bridge.bridge.yaml
  hilbench capture import fixtures/captures/jbd-session.btsnoop --kind jbd-bms --gatt 0x0012=ff01,0x0015=ff02")]
    Import(ImportArgs),
    /// Send a fixture's captured requests to a live device and show where its answers depart from the capture.
    #[command(after_help = REPLAY_HELP)]
    Replay(ReplayArgs),
}

const REPLAY_HELP: &str = "Replays the capture as the client: every captured request goes to the device in order, and
what comes back is held against what the captured device answered. The first answer that
differs is shown decoded, side by side, with the field that differs (a Modbus register by
number and name, a JBD cell, an SMP CBOR key); every further one gets a line. An exchange the
captured device left unanswered waits the whole --timeout-ms to prove the silence.
Serial fixtures go to --tty (a USB RS-485 adapter or a simulator's PTY), UDP ones to --udp.

Exit status: 0 every answer as captured; 1 some differ; 2 bad arguments, an unreadable
fixture or a target that cannot be opened.

Examples:
  hilbench capture replay fixtures/captures/imported/eg4-fault3-bridge.bridge-addr2.jsonl --tty /dev/ttyUSB0 --baud 9600
  # the simulated pack against the field capture (exit 1: it answers where the field pack was silent):
  hilbench sim eg4-lp4 --address 2 > eg4.json & sim=$!
  until [ -s eg4.json ] || ! kill -0 $sim; do sleep 0.1; done
  hilbench capture replay fixtures/captures/imported/eg4-fault3-bridge.bridge-addr2.jsonl --tty $(jq -r .endpoints.tty eg4.json) --timeout-ms 300 || [ $? = 1 ]
  kill $sim";

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// A fixture from `capture import`.
    pub fixture: PathBuf,
    /// Send to this serial port or PTY (serial fixtures).
    #[arg(long, value_name = "PATH", required_unless_present = "udp", conflicts_with = "udp")]
    pub tty: Option<PathBuf>,
    /// Line speed of --tty.
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    /// Send datagrams to this address (UDP fixtures, e.g. an SMP server's 1337).
    #[arg(long, value_name = "ADDR")]
    pub udp: Option<std::net::SocketAddr>,
    /// Longest wait for one answer, from its request.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub timeout_ms: u64,
    /// Silence that ends an answer once as much as the capture holds has come.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    pub quiet_ms: u64,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// Capture files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Folder for the fixtures (created if missing).
    #[arg(long, default_value = "fixtures-imported", value_name = "DIR")]
    pub out: PathBuf,
    /// Take every device as this kind instead of identifying it (`hilbench list` names them).
    #[arg(long, value_name = "KIND")]
    pub kind: Option<String>,
    /// BLE handle → characteristic UUID, for a log that starts after the GATT discovery:
    /// HANDLE=UUID[,HANDLE=UUID…]; a 16-bit UUID may be given short (ff01).
    #[arg(long, value_name = "MAP", value_parser = parse_gatt)]
    pub gatt: Option<GattMap>,
    /// Write scenarios that simulate the devices in the state the capture shows (SoC,
    /// cells, temperatures…) with the faults that reproduce it, instead of replaying them.
    #[arg(long)]
    pub as_state: bool,
    /// Print the reports as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `--gatt`'s pairs (one value, so clap does not take it for a list of values).
#[derive(Debug, Clone)]
pub struct GattMap(pub Vec<(u16, uuid::Uuid)>);

fn parse_gatt(s: &str) -> Result<GattMap, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (h, u) = pair.split_once('=').ok_or_else(|| format!("`{pair}` is not HANDLE=UUID"))?;
            let h = h.trim();
            let handle = match h.strip_prefix("0x").or_else(|| h.strip_prefix("0X")) {
                Some(hex) => u16::from_str_radix(hex, 16),
                None => h.parse(),
            }
            .map_err(|_| format!("`{h}` is not a handle (0x0012 or 18)"))?;
            let u = u.trim();
            let uuid = if u.len() == 4 {
                u16::from_str_radix(u, 16)
                    .map(crate::protocol::hci::uuid16)
                    .map_err(|_| format!("`{u}` is not a UUID"))?
            } else {
                uuid::Uuid::parse_str(u).map_err(|e| format!("`{u}` is not a UUID: {e}"))?
            };
            Ok((handle, uuid))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(GattMap)
}

pub fn run(a: CaptureArgs) -> i32 {
    match a.what {
        CaptureCommand::Import(a) => import_main(a),
        CaptureCommand::Replay(a) => replay_main(a),
    }
}

fn replay_main(a: ReplayArgs) -> i32 {
    use crate::client::replay_client::{self, AnswerWindow, ReplayTarget};
    use crate::scenario::against::{ReplayClientReport, ReplayScript};
    let script = match ReplayScript::load(&a.fixture) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let target = match (&a.tty, a.udp) {
        (Some(path), _) => ReplayTarget::Tty { path: path.clone(), baud: a.baud },
        (None, Some(addr)) => ReplayTarget::Udp(addr),
        (None, None) => {
            eprintln!("error: give --tty PATH or --udp ADDR");
            return 2;
        }
    };
    let window = AnswerWindow { timeout: std::time::Duration::from_millis(a.timeout_ms), quiet: std::time::Duration::from_millis(a.quiet_ms) };
    let mut report = ReplayClientReport::new(&a.fixture, target.describe(), &script);
    let bar = if !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = indicatif::ProgressBar::new(script.exchanges.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} exchanges")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let result = replay_client::run(&script, &target, window, &mut report, |n| bar.set_position(n as u64));
    bar.finish_and_clear();
    if let Err(e) = result {
        eprintln!("error: {e}");
        if report.exchanges == 0 {
            return 2;
        }
        eprintln!("(the report covers the {} exchanges before the error)", report.exchanges);
    }
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        }
    } else {
        print!("{}", report.render());
    }
    if report.differ > 0 || report.exchanges < script.exchanges.len() {
        1
    } else {
        0
    }
}

fn import_main(a: ImportArgs) -> i32 {
    if let Some(k) = &a.kind {
        if let Err(e) = import::check_kind(k) {
            eprintln!("error: {e}");
            return 2;
        }
    }
    let mut stems = std::collections::HashMap::new();
    for f in &a.files {
        let stem = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(other) = stems.insert(stem.clone(), f) {
            eprintln!(
                "error: {} and {} would both write {}/{stem}.*.jsonl; import them into separate --out folders",
                other.display(),
                f.display(),
                a.out.display()
            );
            return 2;
        }
    }
    let opts = ImportOptions { out_dir: a.out.clone(), kind: a.kind.clone(), gatt: a.gatt.clone().map(|g| g.0).unwrap_or_default(), as_state: a.as_state };
    let mut reports = Vec::new();
    let mut code = 0;
    for f in &a.files {
        match import::import_file(f, &opts) {
            Ok(r) => {
                if r.error.is_some() {
                    code = code.max(1);
                }
                reports.push(r);
            }
            Err(e) => {
                eprintln!("error: {e}");
                code = 2;
            }
        }
    }
    if a.json {
        match serde_json::to_string_pretty(&reports) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        }
    } else {
        for r in &reports {
            print!("{}", render(r));
        }
    }
    code
}

/// The human report of one import.
pub fn render(r: &ImportReport) -> String {
    let mut s = format!("{} ({}): {} frames, {} device(s)\n", r.source.display(), r.format, r.frames, r.devices.len());
    for d in &r.devices {
        let sure = match d.confidence {
            Confidence::None => "unknown",
            Confidence::Low => "low",
            Confidence::Medium => "medium",
            Confidence::High => "high",
            Confidence::Given => "given",
        };
        s.push_str(&format!(
            "  {} [{}] {} frames: {} ({sure}; {}) -> {}\n",
            d.device,
            d.transport.as_str(),
            d.frames,
            d.kind.as_deref().unwrap_or("no kind"),
            d.evidence,
            d.fixture.display()
        ));
    }
    const SHOWN: usize = 20;
    for g in r.gaps.iter().take(SHOWN) {
        s.push_str(&format!("  gap at {}: {}\n", g.at, g.what));
    }
    if r.gaps.len() > SHOWN {
        s.push_str(&format!("  … and {} more gaps (--json lists them all)\n", r.gaps.len() - SHOWN));
    }
    for sc in &r.scenarios {
        match (&sc.scenario, &sc.skipped) {
            (Some(p), _) => s.push_str(&format!("  scenario for {}: {} ({} steps; hilbench run {})\n", sc.link, p.display(), sc.steps, p.display())),
            (None, Some(why)) => s.push_str(&format!("  no scenario for {}: {why}\n", sc.link)),
            (None, None) => {}
        }
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("  error: {e}; the frames before it were written\n"));
    }
    s
}
