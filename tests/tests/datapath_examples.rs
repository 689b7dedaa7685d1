//! Every example under `examples/` through the real eBPF programs: its policies and
//! inventory are loaded and compiled, the state is applied to one loaded data path (a
//! diff from the previous example's state), and every flow of its `expected.yaml` is
//! judged by BPF_PROG_TEST_RUN on XDP, TC ingress and TC egress. Each program must meet
//! every expectation and agree with the reference evaluator.
//!
//! An end outside the inventory (a bare IP address) needs nothing special: the probe
//! simply carries that address, and the maps give it its CIDR identity or `world`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use microseg::policy::{
    ExpectedFlow, check_expected, compile, evaluate, load_expected, load_paths,
};
use microseg_tests::policy_judge::{KernelJudge, PROGRAMS};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every example directory (one with an `expected.yaml`), sorted by name.
fn example_directories() -> Vec<PathBuf> {
    let mut directories: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("examples directory")
        .map(|entry| entry.expect("examples directory entry").path())
        .filter(|path| path.join("expected.yaml").is_file())
        .collect();
    directories.sort();
    directories
}

/// Checks one example on the data path; returns what went wrong.
fn check_example(judge: &mut KernelJudge, directory: &Path) -> Vec<String> {
    let name = directory.file_name().unwrap().to_string_lossy().to_string();
    let set = load_paths(&[
        directory.join("policies.yaml"),
        directory.join("inventory.yaml"),
    ])
    .unwrap_or_else(|errors| panic!("{name}: {errors}"));
    let expected: Vec<ExpectedFlow> = load_expected(&directory.join("expected.yaml"))
        .unwrap_or_else(|errors| panic!("{name}: {errors}"));
    assert!(!expected.is_empty(), "{name}: no expectations");
    let compiled = compile(&set);
    judge.apply(&compiled.state);

    let mut problems = Vec::new();
    for point in PROGRAMS {
        let failures = check_expected(&set, &expected, |flow| judge.allowed(point, flow));
        println!(
            "{name:32} {:10} {}/{} expectations met",
            point.name(),
            expected.len() - failures.len(),
            expected.len()
        );
        for failure in failures {
            let detail = failure
                .expected
                .flow(&set)
                .map(|flow| {
                    let verdict = evaluate(&set, &flow);
                    format!(
                        " [reference: {} | {}]",
                        verdict.ingress.explanation, verdict.egress.explanation
                    )
                })
                .unwrap_or_default();
            problems.push(format!("{name}: {}: {failure}{detail}", point.name()));
        }
    }
    // The kernel and the reference evaluator must agree too (the expectations could in
    // principle be met by both while a flow's verdict differs from the evaluator's).
    for expectation in &expected {
        let Ok(flow) = expectation.flow(&set) else {
            continue; // already reported by check_expected
        };
        let reference = evaluate(&set, &flow).allowed;
        let kernel = judge.allowed_by_each_program(&flow);
        if kernel.iter().any(|allowed| *allowed != reference) {
            problems.push(format!(
                "{name}: #{} {flow}: kernel (XDP, TC ingress, TC egress) {kernel:?}, reference evaluator {reference}",
                expectation.index
            ));
        }
    }
    problems
}

#[test]
fn examples_meet_their_expectations_through_the_ebpf_programs() {
    if !microseg_tests::kernel_available(
        "examples_meet_their_expectations_through_the_ebpf_programs",
    ) {
        return;
    }
    let started = Instant::now();
    let directories = example_directories();
    assert!(
        directories.len() >= 8,
        "expected at least the 8 examples of the guide in {}, found {directories:?}",
        examples_dir().display()
    );
    // One loaded data path for all examples: each state replaces the previous one by
    // diff, as a policy update does.
    let mut judge = KernelJudge::load();
    let mut problems = Vec::new();
    for directory in &directories {
        problems.extend(check_example(&mut judge, directory));
    }
    println!(
        "{} examples, {} probes in {:.2} s",
        directories.len(),
        judge.probes(),
        started.elapsed().as_secs_f64()
    );
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}
