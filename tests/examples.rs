//! Every example a user can copy must work. The examples in every
//! `--help` text run here (a simulator counts as working when it prints its
//! ready line; it is then stopped), except those that need hardware or a
//! server this test does not start, which must still parse. In the README's
//! shell blocks every `hilbench` command must parse, every file of this
//! repository a command names must exist, and a shown ready line must be
//! what the command prints.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use hilbench::cli::Cli;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Longest an example may take (a simulator: to print its ready line).
const LIMIT: Duration = Duration::from_secs(60);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One example: a single command, or a recipe of several shell lines.
#[derive(Debug)]
struct Example {
    /// Where it is written (`hilbench sim jbd-bms --help`).
    source: String,
    text: String,
}

/// The `Examples:` section of every command's help, in the order written.
fn help_examples() -> Vec<Example> {
    fn walk(cmd: &mut clap::Command, path: &str, out: &mut Vec<Example>) {
        let help = cmd.render_long_help().to_string();
        let source = format!("{path} --help");
        if let Some(at) = help.find("\nExamples:\n") {
            let block: Vec<&str> = help[at + "\nExamples:\n".len()..].lines().take_while(|l| !l.trim().is_empty()).collect();
            out.extend(split_block(&block, &source));
        }
        for sub in cmd.get_subcommands_mut() {
            let name = format!("{path} {}", sub.get_name());
            walk(sub, &name, out);
        }
    }
    let mut out = Vec::new();
    let mut cmd = Cli::command();
    cmd.build();
    walk(&mut cmd, "hilbench", &mut out);
    out
}

/// A help block's lines as examples. Comment lines separate them; between
/// two comments, lines that are each one `hilbench` command are one example
/// each, and lines with any other shell in them (`&`, `$(…)`, another
/// program) are one recipe together.
fn split_block(lines: &[&str], source: &str) -> Vec<Example> {
    let mut out = Vec::new();
    for segment in lines.split(|l| l.trim().starts_with('#')) {
        let segment: Vec<&str> = segment.iter().map(|l| l.trim()).filter(|l| !l.is_empty()).collect();
        if segment.iter().all(|l| is_single_command(l)) {
            out.extend(segment.iter().map(|l| Example { source: source.to_string(), text: command_part(l).to_string() }));
        } else {
            out.push(Example { source: source.to_string(), text: segment.join("\n") });
        }
    }
    out.retain(|e| !e.text.is_empty());
    out
}

/// One `hilbench` command, perhaps writing its output to a file.
fn is_single_command(line: &str) -> bool {
    let cmd = command_part(line);
    cmd.starts_with("hilbench ") && !cmd.contains(['&', '|', ';', '<', '$', '`', '\n'])
}

/// A help line without the description or comment after it.
fn command_part(line: &str) -> &str {
    let cut = [line.find("  "), line.find(" #")].into_iter().flatten().min().unwrap_or(line.len());
    line[..cut].trim_end()
}

/// The words clap sees: before any redirection.
fn clap_part(cmd: &str) -> &str {
    cmd.split(" > ").next().unwrap_or(cmd).trim_end()
}

/// What an example needs that this test does not provide, if anything:
/// such an example must parse but does not run.
fn not_runnable_here(text: &str) -> Option<&'static str> {
    let words: Vec<String> = shlex::split(text).unwrap_or_default();
    let has = |w: &str| words.iter().any(|x| x == w);
    if has("--adapter") || words.iter().any(|w| w.starts_with("/dev/tty")) {
        return Some("real hardware");
    }
    if words.get(1).is_some_and(|w| w == "validate") && words.get(2).is_some_and(|w| w == "jbd-bms") {
        return Some("a real BMS (the simulator recipe in the same help runs)");
    }
    if words.get(1).is_some_and(|w| w == "load" || w == "validate") {
        return Some("a BACnet/SC hub listening at the URL (tests/bsc_load.rs runs both against ours)");
    }
    if words.get(1).is_some_and(|w| w == "run") && words.get(2).is_some_and(|p| repo().join(p).is_dir()) {
        return Some("nothing, but it is the whole scenario suite, which ci/test.sh runs");
    }
    None
}

/// The words of a `hilbench` command line parse as the CLI would.
fn check_parses(cmd: &str, source: &str) {
    let words = shlex::split(cmd).unwrap_or_else(|| panic!("{source}: `{cmd}` is not valid shell"));
    if let Err(e) = Cli::try_parse_from(&words) {
        panic!("{source}: `{cmd}` does not parse:\n{e}");
    }
    for w in &words {
        check_repo_path(w, source);
    }
}

/// A word naming a file of this repository (`scenarios/…`) names one that exists.
fn check_repo_path(word: &str, source: &str) {
    let w = word.trim_matches(|c: char| matches!(c, '"' | '\'' | ',' | ')' | '(' | '`'));
    let top = ["scenarios/", "tests/", "ci/", "fixtures/", "benches/", "src/", "fuzz/"];
    if top.iter().any(|t| w.starts_with(t)) && !w.contains(['*', '…']) && !w.starts_with("fuzz/corpus") {
        assert!(repo().join(w).exists(), "{source}: `{w}` does not exist in the repository");
    }
}

struct Outcome {
    /// The first line with `"ready":true`, if the example serves.
    ready: Option<String>,
    status: Option<std::process::ExitStatus>,
    output: String,
}

/// Runs an example in `dir` with the built hilbench first on PATH: until it
/// exits, or until it prints a ready line (then its process group is
/// stopped). Nothing it started outlives this.
fn run(text: &str, dir: &Path) -> Outcome {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_hilbench"));
    let path = format!("{}:{}", bin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let script = format!("set -e\n{text}\n");
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .current_dir(dir)
        .env("PATH", path)
        .env("NO_COLOR", "1")
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("bash runs");
    let group = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let out_tx = tx.clone();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).for_each(|l| drop(out_tx.send((true, l)))));
    std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).for_each(|l| drop(tx.send((false, l)))));
    let deadline = std::time::Instant::now() + LIMIT;
    let mut output = String::new();
    let mut ready = None;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break None;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok((is_stdout, line)) => {
                if is_stdout && ready.is_none() && line.contains("\"ready\":true") {
                    ready = Some(line.clone());
                }
                output.push_str(&line);
                output.push('\n');
                if ready.is_some() {
                    break None;
                }
            }
            Err(_) => continue,
        }
    };
    // Stop whatever it left running: SIGTERM first (simulators clean up;
    // give them 10 s on a loaded machine), then SIGKILL.
    let _ = killpg(group, Signal::SIGTERM);
    let stopped = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        child.try_wait().ok().flatten().is_some() && killpg(group, None).is_err()
    });
    if !stopped {
        let _ = killpg(group, Signal::SIGKILL);
    }
    let _ = child.wait();
    while let Ok((_, line)) = rx.try_recv() {
        output.push_str(&line);
        output.push('\n');
    }
    Outcome { ready, status, output }
}

fn check_runs(ex: &Example, dir: &Path) {
    let o = run(&ex.text, dir);
    let ok = o.ready.is_some() || o.status.is_some_and(|s| s.success());
    assert!(ok, "{}: example failed ({:?}):\n{}\n--- its output:\n{}", ex.source, o.status, ex.text, o.output);
}

#[test]
fn every_help_example_runs_or_parses() {
    for tool in ["jq", "busctl"] {
        assert!(
            Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().status.success(),
            "the help examples use {tool}: install it (ci/test.sh does)"
        );
    }
    let examples = help_examples();
    assert!(examples.len() >= 30, "found only {} help examples", examples.len());
    // Each help text's examples run in order in a fresh folder, as a user
    // reading it top to bottom would (`pki --out target/pki`, then a hub using it).
    let mut dirs: std::collections::HashMap<&str, tempfile::TempDir> = std::collections::HashMap::new();
    let mut ran = 0;
    for ex in &examples {
        let dir = dirs.entry(&ex.source).or_insert_with(|| {
            let d = tempfile::tempdir().unwrap();
            std::os::unix::fs::symlink(repo().join("scenarios"), d.path().join("scenarios")).unwrap();
            std::os::unix::fs::symlink(repo().join("fixtures"), d.path().join("fixtures")).unwrap();
            d
        });
        for line in ex.text.lines() {
            if let Some(at) = line.find("hilbench ") {
                let cmd = command_part(&line[at..]);
                if is_single_command(cmd) {
                    check_parses(clap_part(cmd), &ex.source);
                }
            }
        }
        match not_runnable_here(&ex.text) {
            Some(why) => {
                eprintln!("parsed, not run (needs {why}): {}", ex.text);
                assert!(is_single_command(&ex.text), "{}: a recipe must be runnable here:\n{}", ex.source, ex.text);
            }
            None => {
                eprintln!("runs: {}", ex.text.replace('\n', " ⏎ "));
                check_runs(ex, dir.path());
                ran += 1;
            }
        }
    }
    assert!(ran >= 15, "only {ran} help examples ran");
}

/// The README's shell blocks: `hilbench` commands (after `$ `, `sudo ` or
/// environment assignments), one per line or continued with `\`.
fn readme_commands() -> Vec<(usize, String, Option<String>)> {
    let text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut pending: Option<(usize, String)> = None;
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("```") {
            in_sh = !in_sh && (line.trim() == "```sh" || line.trim() == "```bash");
            continue;
        }
        if !in_sh {
            continue;
        }
        let (start, mut joined) = match pending.take() {
            Some((start, so_far)) => (start, format!("{so_far} {}", line.trim())),
            None => (i + 1, line.trim().to_string()),
        };
        if let Some(rest) = joined.strip_suffix('\\') {
            pending = Some((start, rest.trim_end().to_string()));
            continue;
        }
        let shown = joined.starts_with("$ ");
        joined = joined.trim_start_matches("$ ").trim_start_matches("sudo ").to_string();
        // Leading environment assignments (`VAR=value cmd`).
        while let Some(first) = shlex::split(&joined).and_then(|w| w.first().cloned()) {
            if !first.contains('=') || first.starts_with('-') || first.starts_with("hilbench") {
                break;
            }
            let Some(at) = joined.find(" hilbench ").or_else(|| joined.find(" target/")) else { break };
            joined = joined[at + 1..].to_string();
        }
        let cmd = joined.strip_prefix("target/debug/").unwrap_or(&joined).to_string();
        if !cmd.starts_with("hilbench ") {
            for w in cmd.split_whitespace() {
                check_repo_path(w, &format!("README.md:{start}"));
            }
            continue;
        }
        // What the README shows it printing, on the next line of the block.
        let output = shown.then(|| lines.get(i + 1).map(|l| l.to_string())).flatten();
        out.push((start, cmd, output));
    }
    out
}

/// A README command line cut to the words clap sees: no comment, no
/// redirection or pipe, and `$(…)`/`$VAR` as a value.
fn readme_words(cmd: &str) -> String {
    let mut c = cmd.to_string();
    for cut in [" #", " > ", " >", " | ", " && ", ";", " &"] {
        if let Some(at) = c.find(cut) {
            c.truncate(at);
        }
    }
    let subst = shell_values(&c);
    subst.trim().to_string()
}

/// `"$(…)"`, `$(…)`, `$!` and `$NAME` become `1`: a value, as the shell would make one.
fn shell_values(s: &str) -> String {
    let mut out = String::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let quoted = b[i] == '"' && b.get(i + 1) == Some(&'$');
        let at = if quoted { i + 1 } else { i };
        if b[at] == '$' {
            let mut j = at + 1;
            if b.get(j) == Some(&'(') {
                let mut depth = 0;
                while j < b.len() {
                    match b[j] {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                j += 1;
            } else {
                while j < b.len() && (b[j].is_alphanumeric() || b[j] == '_' || b[j] == '!') {
                    j += 1;
                }
            }
            if quoted && b.get(j) == Some(&'"') {
                j += 1;
            }
            out.push('1');
            i = j;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[test]
fn every_readme_command_parses_and_shown_output_matches() {
    let commands = readme_commands();
    assert!(commands.len() >= 20, "found only {} hilbench commands in the README", commands.len());
    let dir = tempfile::tempdir().unwrap();
    let mut compared = 0;
    for (line, cmd, shown) in &commands {
        let source = format!("README.md:{line}");
        if cmd.contains('…') {
            continue; // an elided command (`hilbench load bsc … --shard 0/4`)
        }
        let words = readme_words(cmd);
        check_parses(&words, &source);
        // A shown ready line: the command prints the same keys and values.
        if let Some(shown) = shown.as_deref().filter(|s| s.contains("\"ready\":true")) {
            let o = run(&words, dir.path());
            let got: serde_json::Value = serde_json::from_str(o.ready.as_deref().unwrap_or_else(|| panic!("{source}: no ready line:\n{}", o.output))).unwrap();
            let want: serde_json::Value = serde_json::from_str(shown).unwrap_or_else(|e| panic!("{source}: shown output is not JSON: {e}"));
            assert_eq!(got, want, "{source}: `{words}` prints something else than the README shows");
            compared += 1;
        }
    }
    assert!(compared >= 1, "no README command with a shown ready line was compared");
}

#[test]
fn readme_contributing_commands_run() {
    // The inner loop's scenario line: the one README command of its kind that runs in seconds.
    let text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let line = text.lines().find(|l| l.starts_with("target/debug/hilbench run scenarios/")).expect("the inner loop names a scenario");
    let words: Vec<String> = shlex::split(command_part(line)).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(&words[1..]).current_dir(repo()).stdout(Stdio::null()).status().unwrap();
    assert!(status.success(), "`{line}` failed");
}

/// Every kind that contributes `sim KIND` or `validate KIND` answers `--help`
/// from the real binary, with its summary and its examples.
#[test]
fn every_kind_command_has_help() {
    use hilbench::kind::REGISTRY;
    let mut seen = 0;
    for k in REGISTRY {
        for (verb, has) in [("sim", k.sim().is_some()), ("validate", k.validate().is_some())] {
            if !has {
                continue;
            }
            let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args([verb, k.name(), "--help"]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "hilbench {verb} {} --help failed: {}", k.name(), String::from_utf8_lossy(&out.stderr));
            assert!(text.contains(&format!("Usage: hilbench {verb} {}", k.name())) && text.contains("Examples:"), "{verb} {}:\n{text}", k.name());
            seen += 1;
        }
    }
    // eg4-lp4, jbd-bms, bsc-hub, smp-server, shelly and replay simulate; jbd-bms, bsc-hub, smp-server and shelly validate.
    assert_eq!(seen, 10);
}
