//! Replays the fuzz regression corpus (fixtures/fuzz/) through every cargo-fuzz harness
//! (`hilbench::fuzzing`, the same functions the fuzz targets call) on the stable
//! toolchain, so CI keeps it green without nightly cargo-fuzz. Every corpus file goes
//! through every harness: each harness's invariants hold for any input, not only for its
//! own corpus.

use std::path::{Path, PathBuf};

use hilbench::fuzzing::TARGETS;

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fuzz")
}

/// The files of one target's corpus folder, sorted.
fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = corpus_root().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| f.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Folder names under `dir` (file stems with `ext` when given), sorted.
fn names_in(dir: &Path, ext: Option<&str>) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| ext.is_none_or(|x| p.extension().is_some_and(|e| e == x)))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Each harness has a cargo-fuzz target and a corpus folder, and nothing else does.
#[test]
fn every_fuzz_target_has_a_harness_and_a_corpus() {
    let mut harnesses: Vec<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    harnesses.sort();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(names_in(&root.join("fuzz/fuzz_targets"), Some("rs")), harnesses, "fuzz/fuzz_targets/");
    assert_eq!(names_in(&corpus_root(), None), harnesses, "fixtures/fuzz/");
}

#[test]
fn every_corpus_input_passes_every_harness() {
    let all: Vec<(PathBuf, Vec<u8>)> = TARGETS
        .iter()
        .flat_map(|(target, _)| corpus_files(target))
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect();
    assert!(all.len() >= 30, "corpus has only {} inputs", all.len());

    let mut failures = Vec::new();
    for (target, harness) in TARGETS {
        let own_dir = corpus_root().join(target);
        let mut own_reaching = 0;
        for (path, data) in &all {
            match std::panic::catch_unwind(|| harness(data)) {
                Ok(reached) => own_reaching += usize::from(reached && path.starts_with(&own_dir)),
                Err(_) => failures.push(format!("{target} panicked on {}", path.display())),
            }
        }
        // A corpus whose inputs all stop at decoding would leave the harness's checks untried.
        if own_reaching == 0 {
            failures.push(format!("no input in fixtures/fuzz/{target}/ gets past decoding"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
