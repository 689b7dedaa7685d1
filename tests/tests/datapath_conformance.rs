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
//! The corpus is in the repository (`tests/data/conformance/`, MIT, provenance
//! beside it), so every clone runs it.

use std::collections::BTreeMap;
use std::time::Instant;

use microseg::policy::{MapEvaluator, compile, evaluate};
use microseg_tests::corpus::{self, CASES, DISTINCT_PAIR_FLOWS, FLOWS};
use microseg_tests::policy_judge::KernelJudge;

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
    let cases = corpus::read();
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
        for (label, step, set) in case.built_steps() {
            steps += 1;
            let compiled = compile(&set);
            // A diff from the previous step's state (the previous case's last step at a
            // case boundary): the production update path, generation switch included.
            judge.apply(&compiled.state);

            for corpus_flow in &step.result.flows {
                total_flows += 1;
                let flow = corpus_flow.flow();
                let kernel = judge.allowed_by_each_program(&flow);
                let reference = evaluate(&set, &flow);
                let kernel_ok = kernel.iter().all(|allowed| *allowed == corpus_flow.allowed);
                let agrees = kernel.iter().all(|allowed| *allowed == reference.allowed);
                let allowed = kernel[0];
                // A pod talking to itself never leaves the pod in a real data plane: its
                // corpus verdict is reported, not asserted (as on the policy side); the
                // kernel must still agree with the reference evaluator on it.
                let self_pair = corpus_flow.is_self_pair();
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
                            "{}; kernel allowed (XDP, TC ingress, TC egress) {kernel:?}; reference ingress {} egress {} allowed {} ({} | {}); map-level ingress {} egress {} allowed {} (endpoints {}/{}, identities {}/{})",
                            corpus_flow.expected(case, &label),
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
