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
use microseg_tests::policy_judge::{KernelJudge, PROGRAMS};
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
            coverage
                .rules
                .record(&set, &verdict.reason, &verdict.explanation);
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
    // ClusterNetworkPolicy: each tier's Accept and Deny decide, and Pass rules pass.
    coverage.rules.assert_cluster_policies_covered(5);
    for feature in FEATURES {
        assert!(
            coverage.rules.feature_count(feature) >= 5,
            "feature {feature:?} allowed too few flows: {coverage:#?}"
        );
    }
}

/// What the connection-level property exercised.
#[derive(Debug, Default)]
struct ConnectionCoverage {
    connections: usize,
    allowed: usize,
    denied: usize,
    /// Allowed connections whose reply no policy would allow on its own: only
    /// connection tracking lets it pass.
    replies_by_tracking_only: usize,
    /// Denied connections whose reply-shaped packet the policy allows by itself.
    denied_with_reply_allowed: usize,
}

fn check_connections(
    scenario: &Scenario,
    judge: &mut KernelJudge,
    coverage: &mut ConnectionCoverage,
) -> Result<(), TestCaseError> {
    let set = scenario.build();
    let compiled = compile(&set);
    judge.apply(&compiled.state);
    let workload_addresses = workload_addresses(&set);
    for (index, generated) in scenario.flows.iter().enumerate() {
        let flow = generated.resolve_in_family(&workload_addresses);
        // Every pair of hooks, in turn: a connection's packets are judged wherever
        // they pass (XDP on the way in, TC egress on the way out).
        let forward = PROGRAMS[index % 3];
        let reply = PROGRAMS[(index / 3) % 3];
        let model = evaluate(&set, &flow).allowed;
        let ([opened, answered, continued], source_port) = judge.connection(forward, reply, &flow);
        let reversed = microseg::policy::Flow {
            src: flow.dst,
            dst: flow.src,
            protocol: flow.protocol,
            port: source_port,
        };
        let reply_alone = evaluate(&set, &reversed).allowed;
        let context = || {
            format!(
                "{flow} (source port {source_port}, forward on {}, reply on {}): model {model}, reply alone {reply_alone}; kernel opened {opened}, answered {answered}, continued {continued}",
                forward.name(),
                reply.name()
            )
        };
        if opened != model {
            return Err(TestCaseError::fail(format!(
                "opening packet: {}",
                context()
            )));
        }
        // The reply follows the connection: it passes if the connection was allowed,
        // and otherwise only if policy allows it as a flow of its own.
        if answered != (model || reply_alone) {
            return Err(TestCaseError::fail(format!("reply: {}", context())));
        }
        if continued != (model || (answered && reply_alone)) {
            return Err(TestCaseError::fail(format!("later packet: {}", context())));
        }
        coverage.connections += 1;
        match model {
            true => {
                coverage.allowed += 1;
                if !reply_alone {
                    coverage.replies_by_tracking_only += 1;
                }
            }
            false => {
                coverage.denied += 1;
                if reply_alone {
                    coverage.denied_with_reply_allowed += 1;
                }
            }
        }
    }
    Ok(())
}

/// Property: on random inventories and policies, a connection's opening packet passes
/// the real programs exactly when the reference evaluator allows the connection, its
/// reply passes whenever the connection was allowed (whichever end enforces which
/// direction, on every pair of hooks), and otherwise only when the policy allows the
/// reply's own direction. This is the test that catches replies judged as new flows.
#[test]
fn connections_and_their_replies_follow_the_reference_verdict() {
    if !microseg_tests::kernel_available(
        "connections_and_their_replies_follow_the_reference_verdict",
    ) {
        return;
    }
    let started = Instant::now();
    let judge = RefCell::new(KernelJudge::load());
    let coverage = RefCell::new(ConnectionCoverage::default());
    let cases = case_count() / 2;
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&scenario_strategy(), |scenario| {
        check_connections(
            &scenario,
            &mut judge.borrow_mut(),
            &mut coverage.borrow_mut(),
        )
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    let coverage = coverage.into_inner();
    println!(
        "{cases} cases passed in {:.1} s: {coverage:#?}",
        started.elapsed().as_secs_f64()
    );
    for (what, count) in [
        ("allowed", coverage.allowed),
        ("denied", coverage.denied),
        (
            "replies passed by tracking only",
            coverage.replies_by_tracking_only,
        ),
    ] {
        assert!(count >= 100, "too few connections: {what}: {coverage:#?}");
    }
}
