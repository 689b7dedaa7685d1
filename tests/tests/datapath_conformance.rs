//! NetworkPolicy conformance through the real eBPF programs: every step of every case of
//! the cyclonus corpus (230 cases with the truth table of cyclonus' simulator) is
//! compiled, applied to one loaded data path as a diff from the step before, and every
//! flow between distinct pods is judged by BPF_PROG_TEST_RUN on a probe packet. The
//! kernel verdict must equal the corpus' `allowed` (ingress at the destination AND
//! egress at the source: one run of a program judges both) and the reference
//! evaluator's.
//!
//! Every flow runs through all three programs (XDP, TC ingress, TC egress), each on a
//! probe of its own: a fresh source port, so conntrack never answers for policy.
//!
//! The corpus lives outside the repository (`../shared/conformance/` beside the clone).
//! Without it the test fails in CI (`CI=true`) and is skipped otherwise.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Instant;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use microseg::policy::{
    Flow, MapEvaluator, NamedPort, PolicySetBuilder, Protocol, Source, Workload, compile, evaluate,
};
use microseg_tests::policy_judge::KernelJudge;
use serde::Deserialize;

// The corpus format (see /work/shared/conformance/README.md), as the policy side's
// conformance test (microseg-agent/tests/policy_conformance.rs) reads it.

#[derive(Deserialize)]
struct Case {
    id: u32,
    description: String,
    tags: Vec<String>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pods: Vec<CorpusPod>,
    policies: Vec<NetworkPolicy>,
    result: StepResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CorpusPod {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    #[serde(rename = "IP")]
    ip: IpAddr,
    containers: Vec<CorpusContainer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CorpusContainer {
    port: u16,
    protocol: String,
    port_name: String,
}

#[derive(Deserialize)]
struct StepResult {
    flows: Vec<CorpusFlow>,
}

#[derive(Deserialize)]
struct CorpusFlow {
    from: String,
    to: String,
    from_ip: IpAddr,
    to_ip: IpAddr,
    /// Numeric even when the probed container port is named.
    port: u16,
    protocol: String,
    ingress_allowed: bool,
    egress_allowed: bool,
    allowed: bool,
}

const CASES: usize = 230;
const FLOWS: usize = 123_669;
const DISTINCT_PAIR_FLOWS: usize = 109_956;

fn corpus_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/conformance/cyclonus-corpus.json.gz")
}

/// The corpus, or `None` (after printing why) when it is absent outside CI.
fn read_corpus() -> Option<Vec<Case>> {
    let path = corpus_path();
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(error) => {
            if std::env::var("CI").is_ok_and(|value| value == "true") {
                panic!(
                    "conformance corpus {} is missing in CI: {error}",
                    path.display()
                );
            }
            eprintln!(
                "SKIPPED: conformance corpus {} not found ({error}); it lives outside the repository, see /work/shared/conformance/README.md",
                path.display()
            );
            return None;
        }
    };
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut json)
        .expect("corpus is gzip'd JSON");
    let cases: Vec<Case> = serde_json::from_str(&json).expect("corpus format");
    assert_eq!(cases.len(), CASES);
    Some(cases)
}

/// A step's namespaces, pods and policies as a policy set.
fn policy_set(label: &str, step: &Step) -> Result<microseg::policy::PolicySet, String> {
    let mut builder = PolicySetBuilder::new();
    let source = Source::memory(label);
    for (name, labels) in &step.namespaces {
        builder.add_namespace(&source, name, labels);
    }
    for pod in &step.pods {
        builder.add_workload(Workload {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            labels: pod.labels.clone(),
            addresses: vec![pod.ip],
            ports: pod
                .containers
                .iter()
                .map(|container| NamedPort {
                    name: container.port_name.clone(),
                    port: container.port,
                    protocol: container.protocol.parse().expect("corpus protocol"),
                })
                .collect(),
            source: source.clone(),
        });
    }
    for (index, policy) in step.policies.iter().enumerate() {
        builder.add_network_policy(&Source::new(label, index + 1), policy);
    }
    builder.finish().map_err(|errors| errors.to_string())
}

/// Flows, and how many of them the kernel got right (against the corpus) and how many
/// it judged as the reference evaluator did; a flow counts as right only if all three
/// programs got it right.
#[derive(Default, Clone, Copy)]
struct Tally {
    flows: usize,
    kernel_pass: usize,
    kernel_agrees_with_evaluator: usize,
    kernel_allowed: usize,
}

impl Tally {
    fn add(&mut self, kernel_ok: bool, agrees: bool, allowed: bool) {
        self.flows += 1;
        self.kernel_pass += usize::from(kernel_ok);
        self.kernel_agrees_with_evaluator += usize::from(agrees);
        self.kernel_allowed += usize::from(allowed);
    }
}

#[test]
fn cyclonus_corpus_through_the_ebpf_programs() {
    if !microseg_tests::kernel_available("cyclonus_corpus_through_the_ebpf_programs") {
        return;
    }
    let Some(cases) = read_corpus() else {
        return;
    };
    let started = Instant::now();
    let mut judge = KernelJudge::load();

    let mut overall = Tally::default();
    let mut self_pairs = Tally::default();
    let mut by_tag: BTreeMap<String, Tally> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut failure_count = 0usize;
    let mut total_flows = 0usize;
    let mut steps = 0usize;

    for case in &cases {
        for (step_index, step) in case.steps.iter().enumerate() {
            steps += 1;
            let label = format!("case {} step {}", case.id, step_index + 1);
            let set = policy_set(&label, step)
                .unwrap_or_else(|errors| panic!("{label} ({}): {errors}", case.description));
            let compiled = compile(&set);
            // A diff from the previous step's state (the previous case's last step at a
            // case boundary): the production update path, generation switch included.
            judge.apply(&compiled.state);

            for corpus_flow in &step.result.flows {
                total_flows += 1;
                let protocol: Protocol = corpus_flow.protocol.parse().expect("corpus protocol");
                let flow = Flow {
                    src: corpus_flow.from_ip,
                    dst: corpus_flow.to_ip,
                    protocol,
                    port: corpus_flow.port,
                };
                let kernel = judge.allowed_by_each_program(&flow);
                let reference = evaluate(&set, &flow);
                let kernel_ok = kernel.iter().all(|allowed| *allowed == corpus_flow.allowed);
                let agrees = kernel.iter().all(|allowed| *allowed == reference.allowed);
                let allowed = kernel[0];
                // A pod talking to itself never leaves the pod in a real data plane: its
                // corpus verdict is reported, not asserted (as on the policy side); the
                // kernel must still agree with the reference evaluator on it.
                let self_pair = corpus_flow.from == corpus_flow.to;
                if self_pair {
                    self_pairs.add(kernel_ok, agrees, allowed);
                } else {
                    overall.add(kernel_ok, agrees, allowed);
                    for tag in &case.tags {
                        by_tag
                            .entry(tag.clone())
                            .or_default()
                            .add(kernel_ok, agrees, allowed);
                    }
                }
                // Disagreeing with the evaluator always fails; missing the corpus
                // verdict fails for distinct pairs only.
                if !agrees || (!self_pair && !kernel_ok) {
                    failure_count += 1;
                    if failures.len() < 20 {
                        let map = MapEvaluator::new(&compiled.state).evaluate(&flow);
                        failures.push(format!(
                            "{label} [{}] {} -> {} {flow}: expected ingress {} egress {} allowed {}; kernel allowed (XDP, TC ingress, TC egress) {kernel:?}; reference ingress {} egress {} allowed {} ({} | {}); map-level ingress {} egress {} allowed {} (endpoints {}/{}, identities {}/{})",
                            case.description,
                            corpus_flow.from,
                            corpus_flow.to,
                            corpus_flow.ingress_allowed,
                            corpus_flow.egress_allowed,
                            corpus_flow.allowed,
                            reference.ingress.allowed,
                            reference.egress.allowed,
                            reference.allowed,
                            reference.ingress.explanation,
                            reference.egress.explanation,
                            map.ingress.allowed,
                            map.egress.allowed,
                            map.allowed,
                            map.ingress.endpoint_id,
                            map.egress.endpoint_id,
                            map.ingress.peer_identity,
                            map.egress.peer_identity,
                        ));
                    }
                }
            }
        }
    }
    let elapsed = started.elapsed();

    println!(
        "data path conformance (BPF_PROG_TEST_RUN on XDP, TC ingress, TC egress): {CASES} cases, {steps} steps applied, {total_flows} flows in corpus, {} probes in {:.1} s",
        judge.probes(),
        elapsed.as_secs_f64(),
    );
    println!(
        "  distinct pairs: kernel matches corpus {}/{}, kernel agrees with reference evaluator {}/{} (kernel allowed {}, denied {})",
        overall.kernel_pass,
        overall.flows,
        overall.kernel_agrees_with_evaluator,
        overall.flows,
        overall.kernel_allowed,
        overall.flows - overall.kernel_allowed,
    );
    println!(
        "  self pairs: kernel matches corpus {}/{} (not asserted), kernel agrees with reference evaluator {}/{}",
        self_pairs.kernel_pass,
        self_pairs.flows,
        self_pairs.kernel_agrees_with_evaluator,
        self_pairs.flows,
    );
    println!("  by tag (distinct pairs): kernel vs corpus, kernel vs evaluator");
    for (tag, tally) in &by_tag {
        println!(
            "    {tag:28} {:6}/{:6}  {:6}/{:6}",
            tally.kernel_pass, tally.flows, tally.kernel_agrees_with_evaluator, tally.flows
        );
    }
    if failure_count > 0 {
        println!(
            "{failure_count} flows deviate; the first {}:",
            failures.len()
        );
    }
    for failure in &failures {
        println!("FAIL {failure}");
    }
    assert_eq!(total_flows, FLOWS);
    assert_eq!(overall.flows, DISTINCT_PAIR_FLOWS);
    assert_eq!(
        overall.kernel_pass, overall.flows,
        "kernel verdicts deviate from the corpus"
    );
    assert_eq!(
        overall.kernel_agrees_with_evaluator, overall.flows,
        "kernel verdicts deviate from the reference evaluator"
    );
    assert_eq!(
        self_pairs.kernel_agrees_with_evaluator, self_pairs.flows,
        "kernel verdicts on self pairs deviate from the reference evaluator"
    );
}
