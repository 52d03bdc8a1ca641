//! YAML scenarios: the users' regression suite and the way to reproduce a
//! field fault. `spec` is the file format, `runner` executes one,
//! `report` renders results (terminal, JSON, JUnit), `transcript` decodes
//! captured frames for humans and snapshots.

pub mod against;
pub mod expect;
pub mod import;
pub mod interrupt;
pub mod process;
pub mod report;
pub mod runner;
pub mod source;
pub mod spec;
pub mod transcript;

pub use runner::{run_file_blocking, RunOptions, ScenarioReport};
pub use spec::{Scenario, ScenarioError};

use std::path::{Path, PathBuf};

/// Scenario files under the given paths: files as given, folders searched
/// (non-recursively, sorted) for `*.yaml` / `*.yml`.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| is_scenario(f))
                .collect();
            v.sort();
            if v.is_empty() {
                return Err(format!("{}: no *.yaml scenario files in this folder", p.display()));
            }
            out.extend(v);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(format!("{}: no such file or folder", p.display()));
        }
    }
    Ok(out)
}

fn is_scenario(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}
