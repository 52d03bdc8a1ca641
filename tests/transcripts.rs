//! Decoded transcripts of scenario traffic, as insta snapshots: a change in
//! what goes over the wire shows up as a reviewed diff.
//!
//! Only the opening frames are kept (later ones depend on timing), and the
//! values printed are those the scenario pins (cells, SoC, current), never
//! the free-running uptime counter.

use std::path::Path;

use hilbench::scenario::{run_file_blocking, transcript, Scenario};

fn opening(file: &str, frames: usize) -> String {
    opening_from(file, |_| true, frames)
}

/// `frames` frames starting at the request that precedes the first frame
/// `start` accepts (so a run's first, racy poll does not matter).
fn opening_from(file: &str, start: impl Fn(&str) -> bool, frames: usize) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios").join(file);
    let s = Scenario::load(&path).unwrap();
    let r = run_file_blocking(s, path, Default::default());
    assert!(r.passed, "{}", hilbench::scenario::report::summary_line(&r));
    let all: Vec<String> = transcript::render(&r.frames).lines().map(String::from).collect();
    let hit = all.iter().position(|l| start(l)).expect("marker frame not found");
    let first = all[..=hit].iter().rposition(|l| l.starts_with("master     ->")).unwrap_or(hit);
    let text = all[first..(first + frames).min(all.len())].join("\n");
    // Undecodable frames carry CRCs over the uptime register: keep the
    // reason's kind, drop the numbers.
    text.lines()
        .map(|l| match l.find("undecodable (") {
            Some(i) => format!("{}undecodable ({}", &l[..i], l[i + 13..].split([':', '(']).next().unwrap_or("")),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn healthy_multidrop_poll() {
    insta::assert_snapshot!(opening("eg4-healthy-multidrop.yaml", 18));
}

#[test]
fn adapter_echo() {
    insta::assert_snapshot!(opening_from("eg4-fault6-adapter-echo.yaml", |l| l.contains("echo of request"), 7));
}

#[test]
fn legacy_status_poll() {
    insta::assert_snapshot!(opening("eg4-fault7-legacy-cell-msb.yaml", 6));
}

#[test]
fn address1_zeros_quirk() {
    insta::assert_snapshot!(opening("eg4-fault3-address1-zeros.yaml", 6));
}
