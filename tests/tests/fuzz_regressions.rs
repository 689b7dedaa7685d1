//! The loader fuzz targets' inputs, replayed through the same invariants
//! (fuzz/src/lib.rs, included here): every saved crash in
//! tests/data/fuzz-regressions/<target>/, and every seed (tests/data/fuzz-seeds/ and
//! the examples' YAML files). No root needed. The packet fuzzer's saved frames
//! (tests/data/fuzz-regressions/packets/) are replayed by datapath_fuzz.

#[path = "../../fuzz/src/lib.rs"]
mod loader_invariants;

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 2] = [
    ("policy_files", loader_invariants::check_policy_files),
    ("agent_objects", loader_invariants::check_agent_objects),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.expect("entry").path()).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Runs `check` on `input`; the panic message if it fails.
fn failure(check: Check, input: &[u8]) -> Option<String> {
    catch_unwind(AssertUnwindSafe(|| check(input)))
        .err()
        .map(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic without a message".to_owned())
        })
}

#[test]
fn saved_fuzz_crashes_no_longer_fail() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, check) in TARGETS {
        for path in files_under(&root().join("tests/data/fuzz-regressions").join(target)) {
            let input = std::fs::read(&path).expect("reading a saved input");
            replayed += 1;
            if let Some(message) = failure(check, &input) {
                failures.push(format!("{}: {message}", path.display()));
            }
        }
    }
    println!("replayed {replayed} saved loader fuzz inputs");
    assert!(
        failures.is_empty(),
        "{} saved fuzz inputs still fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn fuzz_seeds_keep_the_invariants_and_the_hand_written_ones_load() {
    let root = root();
    let mut seeds: Vec<PathBuf> = files_under(&root.join("examples"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    let hand_written = files_under(&root.join("tests/data/fuzz-seeds"));
    assert!(!hand_written.is_empty(), "tests/data/fuzz-seeds/ is empty");
    seeds.extend(hand_written.iter().cloned());
    let mut failures = Vec::new();
    for path in &seeds {
        let text = std::fs::read(path).expect("reading a seed");
        let name = if path.extension().is_some_and(|e| e == "json") {
            "fuzzed.json"
        } else {
            "fuzzed.yaml"
        };
        let input = loader_invariants::make_input(name, &text);
        for (target, check) in TARGETS {
            if let Some(message) = failure(check, &input) {
                failures.push(format!("{} ({target}): {message}", path.display()));
            }
        }
    }
    // The hand-written seeds are valid, so that mutations start deep in validation.
    for path in &hand_written {
        let text = std::fs::read_to_string(path).expect("reading a seed");
        let mut builder = microseg::policy::PolicySetBuilder::new();
        builder.add_text(path, &text);
        if let Err(errors) = builder.finish() {
            failures.push(format!("{} does not load:\n{errors}", path.display()));
        }
    }
    println!("checked {} seeds", seeds.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
