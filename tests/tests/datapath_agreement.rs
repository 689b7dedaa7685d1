//! Property: on random small inventories, policies and flows, the real eBPF programs
//! (BPF_PROG_TEST_RUN on XDP, TC ingress and TC egress) judge every flow as the
//! reference evaluator does, in IPv4 and IPv6.
//!
//! The generator (`microseg_tests::policy_gen`) is the one of the policy-level
//! agreement test (`policy_agreement.rs`), with each flow's ends resolved to addresses
//! of one family. Every case is compiled and applied to ONE loaded data path as a diff
//! from the previous case's state, so thousands of generation switches between
//! unrelated states are exercised too; every probe has a fresh source port, so
//! conntrack never answers for policy.

use std::cell::RefCell;
use std::time::Instant;

use microseg::policy::{MapEvaluator, compile, evaluate};
use microseg_tests::policy_gen::{
    FEATURES, RuleCoverage, Scenario, scenario_strategy, workload_addresses,
};
use microseg_tests::policy_judge::KernelJudge;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

/// Generated cases (each: one policy set applied, up to 24 flows on three programs);
/// about 9 s in a debug build. `PROPTEST_CASES` overrides it for longer hunts.
const CASES: u32 = 2048;

fn case_count() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(CASES)
}

/// What the generated flows exercised, to show that agreement covers every feature and
/// both verdicts in both address families.
#[derive(Debug, Default)]
struct Coverage {
    cases: usize,
    flows: usize,
    ipv4_allowed: usize,
    ipv4_denied: usize,
    ipv6_allowed: usize,
    ipv6_denied: usize,
    /// Flows with an end outside the inventory.
    external_ends: usize,
    /// Enforced directions and the features of the rules that allowed them.
    rules: RuleCoverage,
}

fn check_scenario(
    scenario: &Scenario,
    judge: &mut KernelJudge,
    coverage: &mut Coverage,
) -> Result<(), TestCaseError> {
    let set = scenario.build();
    let compiled = compile(&set);
    judge.apply(&compiled.state);
    let workload_addresses = workload_addresses(&set);
    coverage.cases += 1;
    for generated in &scenario.flows {
        let flow = generated.resolve_in_family(&workload_addresses);
        let reference = evaluate(&set, &flow);
        let kernel = judge.allowed_by_each_program(&flow);
        if kernel.iter().any(|allowed| *allowed != reference.allowed) {
            let map = MapEvaluator::new(&compiled.state).evaluate(&flow);
            return Err(TestCaseError::fail(format!(
                "{flow}: kernel (XDP, TC ingress, TC egress) {kernel:?}, reference {} (ingress {}: {} | egress {}: {}), map-level {} (ingress {} endpoint {} identity {}; egress {} endpoint {} identity {})",
                reference.allowed,
                reference.ingress.allowed,
                reference.ingress.explanation,
                reference.egress.allowed,
                reference.egress.explanation,
                map.allowed,
                map.ingress.allowed,
                map.ingress.endpoint_id,
                map.ingress.peer_identity,
                map.egress.allowed,
                map.egress.endpoint_id,
                map.egress.peer_identity,
            )));
        }
        coverage.flows += 1;
        match (flow.src.is_ipv6(), reference.allowed) {
            (false, true) => coverage.ipv4_allowed += 1,
            (false, false) => coverage.ipv4_denied += 1,
            (true, true) => coverage.ipv6_allowed += 1,
            (true, false) => coverage.ipv6_denied += 1,
        }
        if set.workload_by_address(flow.src).is_none()
            || set.workload_by_address(flow.dst).is_none()
        {
            coverage.external_ends += 1;
        }
        for verdict in [&reference.ingress, &reference.egress] {
            coverage.rules.record(&set, &verdict.reason);
        }
    }
    Ok(())
}

#[test]
fn ebpf_programs_agree_with_reference_evaluator() {
    if !microseg_tests::kernel_available("ebpf_programs_agree_with_reference_evaluator") {
        return;
    }
    let started = Instant::now();
    let judge = RefCell::new(KernelJudge::load());
    let coverage = RefCell::new(Coverage::default());
    let cases = case_count();
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&scenario_strategy(), |scenario| {
        check_scenario(
            &scenario,
            &mut judge.borrow_mut(),
            &mut coverage.borrow_mut(),
        )
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    let judge = judge.into_inner();
    let coverage = coverage.into_inner();
    println!(
        "{cases} cases passed ({} states applied, {} probes) in {:.1} s: {coverage:#?}",
        judge.applies(),
        judge.probes(),
        started.elapsed().as_secs_f64()
    );
    // The generator must reach both verdicts in both families and every rule feature,
    // or agreement proves little.
    for (what, count) in [
        ("IPv4 allowed", coverage.ipv4_allowed),
        ("IPv4 denied", coverage.ipv4_denied),
        ("IPv6 allowed", coverage.ipv6_allowed),
        ("IPv6 denied", coverage.ipv6_denied),
        ("external ends", coverage.external_ends),
        ("enforced and allowed", coverage.rules.enforced_allowed),
        ("enforced and denied", coverage.rules.enforced_denied),
    ] {
        assert!(count >= 100, "too few flows: {what}: {coverage:#?}");
    }
    for feature in FEATURES {
        assert!(
            coverage.rules.feature_count(feature) >= 5,
            "feature {feature:?} allowed too few flows: {coverage:#?}"
        );
    }
}
