//! The command line: `run`, `sim`, `list`.

pub mod air;
pub mod ble_place;
pub mod capture;
pub mod jbd;
pub mod load;
pub mod pki;
pub mod sim;
pub mod validate;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::kind;
use crate::scenario::{self, report, RunOptions, Scenario};

#[derive(Parser, Debug)]
#[command(
    name = "hilbench",
    version,
    about = "Hardware-in-the-loop test bench: simulated field devices, scripted faults, client actors",
    after_help = "Examples:
  hilbench run scenarios/                      run every scenario in a folder
  hilbench run scenarios/eg4-fault5-late-crc.yaml --capture captures/ --junit report.xml
  hilbench sim eg4-lp4 --tty /tmp/bms --address 1 --address 2 --set soc=55
  hilbench pki --out target/pki --nodes 3
  hilbench sim bsc-hub --listen 127.0.0.1:4443 --tls-dir target/pki
  hilbench sim jbd-bms --cells 16 --set soc=55
  hilbench validate jbd-bms --address A4:C1:38:12:34:56
  hilbench capture import fixtures/captures/jbd-session.btsnoop --out target/fixtures
  hilbench list

Logs: RUST_LOG=hilbench=debug hilbench run …"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run scenario files or folders; exits non-zero if any scenario fails.
    #[command(after_help = "Examples:
  hilbench run scenarios/
  hilbench run scenarios/eg4-healthy-multidrop.yaml scenarios/jbd-healthy-poll.yaml --seed 7 --json
  hilbench run scenarios/ --junit target/junit.xml --capture target/captures")]
    Run(RunArgs),
    /// Run a simulated device until SIGINT/SIGTERM, for poking a client by hand.
    Sim(SimArgs),
    /// Write a test CA, a BACnet/SC hub certificate and node certificates (no openssl needed).
    Pki(pki::PkiArgs),
    /// Load generators: `load bsc` (a BACnet/SC hub), `load merge` (combine shards).
    Load(load::LoadArgs),
    /// Conformance checks against a real or simulated device of a kind (`validate --help` lists them).
    Validate(ValidateArgs),
    /// Run the virtual BLE air (hilbench's own BlueZ on its own D-Bus bus) until SIGINT/SIGTERM.
    Air(air::AirArgs),
    /// Captures from the field: `capture import` turns pcapng, btsnoop, hex dumps into fixtures.
    Capture(capture::CaptureArgs),
    /// Show device kinds, profiles, client kinds and faults.
    List,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Scenario files or folders of *.yaml files.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Write a JUnit XML report here.
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Write one pcapng per link under DIR/SCENARIO/ (tshark decodes them: Modbus RTU links, BLE devices as ATT).
    #[arg(long, value_name = "DIR")]
    pub capture: Option<PathBuf>,
    /// Override every scenario's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print the results as JSON on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
}

pub fn main_with(cli: Cli) -> i32 {
    match cli.command {
        Command::Run(a) => run(a),
        Command::Sim(a) => a.run(),
        Command::Air(a) => air::run(a),
        Command::Pki(a) => pki::run(a),
        Command::Load(a) => load::run(a),
        Command::Validate(a) => a.run(),
        Command::Capture(a) => capture::run(a),
        Command::List => {
            list();
            0
        }
    }
}

fn run(a: RunArgs) -> i32 {
    let files = match scenario::collect_files(&a.paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    // Parse everything first: a broken file is reported before anything runs.
    let mut parsed = Vec::new();
    let mut bad = false;
    for f in &files {
        match Scenario::load(f) {
            Ok(s) => parsed.push((f.clone(), s)),
            Err(e) => {
                eprintln!("error: {e}");
                bad = true;
            }
        }
    }
    if bad {
        return 2;
    }
    // Stopped by SIGTERM or SIGINT, a run cleans up and reports what it did;
    // folders of runs that were killed outright go now.
    if let Err(e) = scenario::interrupt::install() {
        eprintln!("error: {e}");
        return 2;
    }
    for stale in scenario::interrupt::remove_stale_folders(&std::env::temp_dir()) {
        tracing::info!("removed {}, left by a run that was killed", stale.display());
    }
    let bar = if a.json {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(parsed.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        b
    };
    let opts = RunOptions {
        seed: a.seed,
        capture_dir: a.capture.clone(),
    };
    let mut reports = Vec::new();
    for (file, s) in parsed {
        if scenario::interrupt::signal().is_some() {
            break;
        }
        bar.set_message(s.name.clone());
        let r = scenario::run_file_blocking(s, file, opts.clone());
        bar.suspend(|| {
            if !a.json {
                println!("{}", report::summary_line(&r));
            }
        });
        bar.inc(1);
        reports.push(r);
    }
    bar.finish_and_clear();
    let failed = reports.iter().filter(|r| !r.passed).count();
    let interrupted = scenario::interrupt::signal();
    if a.json {
        println!("{}", report::to_json(&reports));
    } else {
        println!("\n{} passed, {} failed", reports.len() - failed, failed);
    }
    if let Some(sig) = interrupted {
        let not_run = files.len() - reports.len();
        eprintln!("interrupted by {}: {not_run} scenario(s) not run", scenario::interrupt::name(sig));
    }
    if let Some(j) = &a.junit {
        if let Err(e) = report::write_junit(j, &reports) {
            eprintln!("error: junit: {e}");
            return 2;
        }
    }
    match interrupted {
        // As a shell reports a process ended by that signal.
        Some(sig) => 128 + sig,
        None if failed > 0 => 1,
        None => 0,
    }
}

/// `hilbench sim KIND …`: each kind with a simulator contributes its subcommand.
pub type SimArgs = ByKind<false>;
/// `hilbench validate KIND …`: each kind with conformance checks contributes its subcommand.
pub type ValidateArgs = ByKind<true>;

/// A command whose subcommands come from the kind registry: `sim` (false)
/// or `validate` (true), the kind chosen and what clap parsed for it.
#[derive(Debug, Clone)]
pub struct ByKind<const VALIDATE: bool> {
    pub kind: String,
    pub matches: clap::ArgMatches,
}

impl<const VALIDATE: bool> ByKind<VALIDATE> {
    fn of(k: &dyn kind::Kind) -> Option<kind::KindCommand> {
        if VALIDATE {
            k.validate()
        } else {
            k.sim()
        }
    }

    pub fn run(self) -> i32 {
        match kind::commands(Self::of).find(|(name, _)| *name == self.kind) {
            Some((_, c)) => (c.run)(&self.matches),
            None => {
                eprintln!("error: no kind `{}` here", self.kind);
                2
            }
        }
    }
}

impl<const VALIDATE: bool> clap::FromArgMatches for ByKind<VALIDATE> {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let (kind, matches) = m.subcommand().ok_or_else(|| clap::Error::new(clap::error::ErrorKind::MissingSubcommand))?;
        Ok(ByKind { kind: kind.to_string(), matches: matches.clone() })
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl<const VALIDATE: bool> clap::Args for ByKind<VALIDATE> {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.subcommand_required(true).subcommands(kind::commands(Self::of).map(|(_, c)| (c.command)()))
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

fn list() {
    use crate::kind::Role;
    for (title, role) in [("Device kinds", Role::Device), ("Client kinds", Role::Client)] {
        println!("{title}:");
        for k in kind::REGISTRY.iter().filter(|k| k.role() == role) {
            println!("  {:<18} {}", k.name(), k.about());
        }
        println!();
    }
    for k in kind::REGISTRY {
        for section in k.list() {
            println!("{}:", section.title);
            for (name, about) in &section.rows {
                println!("  {name:<26} {about}");
            }
            println!();
        }
    }
    println!("What clients publish (expect_reading `field`, expect_flag `flag`, expect_errors `kind`; N is a number):");
    for k in kind::REGISTRY {
        if let Some(v) = k.vocabulary() {
            println!("  {}:", k.name());
            for (what, list) in [("fields", &v.fields), ("flags", &v.flags), ("errors", &v.errors)] {
                if !list.is_empty() {
                    println!("    {what}: {}", list.join(", "));
                }
            }
        }
    }
    println!("\nLink faults (one-shot by default; count: N, probability: P, always: true; direction: request|response; name: N):");
    for d in crate::link::LinkFault::CATALOG {
        let media: Vec<&str> = d.media.iter().map(|m| m.name()).collect();
        let on = format!("{} links", media.join(", "));
        println!("  {:<18} {} [{on}]", d.name, d.about);
    }
    println!("\nObservation kinds (scenario `expect_observation: {{kind: …, contains: …}}`):");
    println!("  {}", crate::observe::ObservationKind::NAMES.join(", "));
    println!("\nScenario steps:");
    for (name, keys) in crate::scenario::spec::COMMON_STEPS {
        println!("  {name:<20} {keys}");
    }
    for (step, k) in kind::kind_steps() {
        println!("  {:<20} {} ({}: {})", step.name, step.keys, k.name(), step.about);
    }
}
