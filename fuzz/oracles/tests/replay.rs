//! CI's share of the fuzzing: every committed input (`fuzz/corpus/<target>/*`, what
//! fuzzing kept, and `fuzz/artifacts/<target>/*`, reproducers of what it found) runs
//! through its target's oracle under stable `cargo test`, so a regression of anything a
//! fuzzing run once reached fails here. Seconds, not minutes: no fuzzing happens here.
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use flynode_fuzz_oracles::{TARGETS, oracle, seeds};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `(target, file)` for every file under `fuzz/<kind>/`, sorted; a directory without
/// an oracle of its name is an error (its inputs would never be replayed).
fn inputs(kind: &str) -> Vec<(String, PathBuf)> {
    let base = fuzz_dir().join(kind);
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(&base) else {
        return out;
    };
    for dir in dirs {
        let dir = dir.expect("a directory entry").path();
        let target = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        assert!(
            oracle(&target).is_some(),
            "{}: no fuzz target is called `{target}`",
            dir.display()
        );
        for file in std::fs::read_dir(&dir).expect("a target directory") {
            out.push((target.clone(), file.expect("a file").path()));
        }
    }
    out.sort();
    out
}

fn replay(kind: &str) -> usize {
    let all = inputs(kind);
    let mut failed = Vec::new();
    for (target, path) in &all {
        let run = oracle(target).expect("checked in `inputs`");
        let data = std::fs::read(path).expect("a readable input");
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs fail their oracle (the panics are printed above); reproduce one with \
         `cargo +nightly fuzz run <target> <file>` in fuzz/:\n{}",
        failed.len(),
        all.len(),
        failed.join("\n")
    );
    all.len()
}

#[test]
fn every_corpus_input_passes_its_oracle() {
    let n = replay("corpus");
    for (target, _) in TARGETS {
        assert!(
            fuzz_dir().join("corpus").join(target).is_dir(),
            "target {target} has no corpus"
        );
    }
    assert!(n >= 2 * TARGETS.len(), "only {n} corpus inputs");
}

#[test]
fn every_reproducer_passes_its_oracle() {
    let n = replay("artifacts");
    assert!(n >= 1, "the issue 29 reproducer is missing");
}

/// The committed seeds are what `seeds::all` makes (rerun the `fuzz-seeds` binary after
/// changing one).
#[test]
fn committed_seeds_are_current() {
    for (target, name, bytes) in seeds::all() {
        let path = fuzz_dir()
            .join("corpus")
            .join(target)
            .join(format!("seed-{name}"));
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == bytes,
            "{} differs from its seed",
            path.display()
        );
    }
    let path = fuzz_dir().join("artifacts/tun_udp_gro/issue-29-reorder-ttl");
    assert_eq!(std::fs::read(path).ok(), Some(seeds::issue_29_reorder()));
}
