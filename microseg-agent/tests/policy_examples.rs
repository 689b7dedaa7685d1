//! Every example under `examples/` loads, compiles, and meets its `expected.yaml` with
//! both the reference evaluator and the map-level evaluator on the compiled state.

use std::path::{Path, PathBuf};

use microseg::policy::{
    MapEvaluator, check_expected, compile, evaluate, load_expected, load_paths,
};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

const EXAMPLES: &[&str] = &[
    "default-deny",
    "dns-allow",
    "three-tier",
    "demo-three-tier",
    "cross-namespace-monitoring",
    "environment-isolation",
    "pci-zone",
    "service-identity-ipblock-except",
    "host-firewall",
    "cluster-pci-zone",
    "cluster-baseline-default-deny",
    "host-firewall-deny-list",
];

fn check_example(directory: &Path) -> Vec<String> {
    let name = directory.file_name().unwrap().to_string_lossy().to_string();
    let set = load_paths(&[
        directory.join("policies.yaml"),
        directory.join("inventory.yaml"),
    ])
    .unwrap_or_else(|errors| panic!("{name}: {errors}"));
    let expected = load_expected(&directory.join("expected.yaml"))
        .unwrap_or_else(|errors| panic!("{name}: {errors}"));
    assert!(expected.len() >= 8, "{name}: too few expectations");
    assert!(
        expected.iter().any(|flow| flow.verdict.allowed())
            && expected.iter().any(|flow| !flow.verdict.allowed()),
        "{name}: expectations should cover allowed and denied paths"
    );
    let compiled = compile(&set);
    let maps = MapEvaluator::new(&compiled.state);
    println!(
        "{name}: {} expectations; {}",
        expected.len(),
        compiled.stats()
    );
    let mut problems = Vec::new();
    for failure in check_expected(&set, &expected, |flow| {
        let verdict = evaluate(&set, flow);
        verdict.allowed
    }) {
        let detail = failure
            .expected
            .flow(&set)
            .map(|flow| {
                let verdict = evaluate(&set, &flow);
                format!(
                    " [{} | {}]",
                    verdict.ingress.explanation, verdict.egress.explanation
                )
            })
            .unwrap_or_default();
        problems.push(format!("{name}: reference: {failure}{detail}"));
    }
    for failure in check_expected(&set, &expected, |flow| maps.evaluate(flow).allowed) {
        problems.push(format!("{name}: map-level: {failure}"));
    }
    problems
}

#[test]
fn examples_meet_their_expectations() {
    let mut problems = Vec::new();
    for example in EXAMPLES {
        problems.extend(check_example(&examples_dir().join(example)));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn every_example_directory_is_checked() {
    let mut found: Vec<String> = std::fs::read_dir(examples_dir())
        .unwrap()
        .filter_map(|entry| {
            let entry = entry.unwrap();
            entry
                .path()
                .join("expected.yaml")
                .exists()
                .then(|| entry.file_name().to_string_lossy().to_string())
        })
        .collect();
    found.sort();
    let mut listed: Vec<String> = EXAMPLES.iter().map(ToString::to_string).collect();
    listed.sort();
    assert_eq!(found, listed);
}

#[test]
fn example_directories_load_as_a_whole() {
    // A directory walk skips expected.yaml, so `microseg check examples/x` works.
    for example in EXAMPLES {
        let set = load_paths(&[examples_dir().join(example)])
            .unwrap_or_else(|errors| panic!("{example}: {errors}"));
        assert!(!set.policies.is_empty() && !set.workloads.is_empty());
    }
}
