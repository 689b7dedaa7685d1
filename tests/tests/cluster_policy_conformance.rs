//! ClusterNetworkPolicy conformance: every probe of the upstream suites
//! (kubernetes-sigs/network-policy-api, `tests/data/network-policy-api/`), state by
//! state, through the reference evaluator, the compiled maps, and the real eBPF
//! programs (XDP, TC ingress, TC egress; BPF_PROG_TEST_RUN on a probe packet, each
//! state applied as a diff from the one before, as the agent applies an update).
//!
//! The 9 probes of host-network servers are judged too: their server is a Node's
//! address, which `nodes` peers select once the inventory holds the Nodes.

use microseg::policy::{MapEvaluator, compile, evaluate};
use microseg_tests::cluster_conformance::{self, HOST_NETWORK_PROBES, PROBES};
use microseg_tests::policy_judge::KernelJudge;

/// Counts of one engine: probes right, of probes judged.
#[derive(Default)]
struct Tally {
    right: usize,
    judged: usize,
    host_network_right: usize,
}

fn check(engine: &str, tally: &Tally, failures: &[String]) {
    println!(
        "{engine}: {}/{} probes as upstream expects ({}/{HOST_NETWORK_PROBES} of them to host-network servers)",
        tally.right, tally.judged, tally.host_network_right
    );
    for failure in failures.iter().take(30) {
        println!("FAIL {engine}: {failure}");
    }
    assert_eq!(tally.judged, PROBES);
    assert_eq!(tally.right, tally.judged, "{engine} deviates from upstream");
}

#[test]
fn upstream_suites_through_the_evaluator_and_the_compiled_maps() {
    let table = cluster_conformance::read();
    let mut evaluator = Tally::default();
    let mut maps = Tally::default();
    let mut evaluator_failures = Vec::new();
    let mut map_failures = Vec::new();
    for suite in &table.suites {
        for (index, state) in suite.states.iter().enumerate() {
            assert_eq!(state.id, index);
            let set = table.state_set(suite, state);
            let compiled = compile(&set);
            let map = MapEvaluator::new(&compiled.state);
            for subtest in &suite.subtests {
                for assertion in subtest.assertions.iter().filter(|a| a.state == state.id) {
                    let flow = table.flow(assertion);
                    let reference = evaluate(&set, &flow);
                    let by_maps = map.evaluate(&flow);
                    for (tally, failures, allowed) in [
                        (&mut evaluator, &mut evaluator_failures, reference.allowed),
                        (&mut maps, &mut map_failures, by_maps.allowed),
                    ] {
                        tally.judged += 1;
                        if allowed == assertion.expected {
                            tally.right += 1;
                            tally.host_network_right +=
                                usize::from(assertion.involves_host_network());
                        } else {
                            failures.push(format!(
                                "{} ({}, {}): {} expected {}, got {allowed}; evaluator: egress: {} | ingress: {}",
                                assertion.id,
                                subtest.name,
                                assertion.source,
                                flow,
                                assertion.expected,
                                reference.egress.explanation,
                                reference.ingress.explanation,
                            ));
                        }
                    }
                }
            }
        }
    }
    check("reference evaluator", &evaluator, &evaluator_failures);
    check("compiled maps", &maps, &map_failures);
}

#[test]
fn upstream_suites_through_the_ebpf_programs() {
    if !microseg_tests::kernel_available("upstream_suites_through_the_ebpf_programs") {
        return;
    }
    let table = cluster_conformance::read();
    // Host-network servers listen on 34345-34352: probe source ports stay above.
    let mut judge = KernelJudge::load_with_source_ports_from(40_000);
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    for suite in &table.suites {
        for state in &suite.states {
            let set = table.state_set(suite, state);
            let compiled = compile(&set);
            judge.apply(&compiled.state);
            for subtest in &suite.subtests {
                for assertion in subtest.assertions.iter().filter(|a| a.state == state.id) {
                    let flow = table.flow(assertion);
                    let kernel = judge.allowed_by_each_program(&flow);
                    tally.judged += 1;
                    if kernel.iter().all(|allowed| *allowed == assertion.expected) {
                        tally.right += 1;
                        tally.host_network_right += usize::from(assertion.involves_host_network());
                    } else {
                        let reference = evaluate(&set, &flow);
                        failures.push(format!(
                            "{} ({}): {flow} expected {}, kernel (XDP, TC ingress, TC egress) {kernel:?}, evaluator {}",
                            assertion.id, subtest.name, assertion.expected, reference.allowed
                        ));
                    }
                }
            }
        }
    }
    check("eBPF programs", &tally, &failures);
}
