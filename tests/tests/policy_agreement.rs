//! Property: on random small inventories, policies and flows, the map-level evaluator
//! on the compiled state agrees with the reference evaluator, direction by direction.
//! No kernel needed: this runs everywhere.
//!
//! The generator (`microseg_tests::policy_gen`) is the one of the data path's agreement
//! test (`datapath_agreement.rs`); here a flow's ends are drawn from every address,
//! whatever its family.

use std::cell::RefCell;

use microseg::policy::{MapEvaluator, VerdictReason, compile, evaluate};
use microseg_tests::policy_gen::{
    FEATURES, RuleCoverage, Scenario, scenario_strategy, workload_addresses,
};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

/// Counts of flows by what decided them, to show the generator reaches every feature.
#[derive(Debug, Default)]
struct Coverage {
    flows: usize,
    /// Enforced directions and the features of the rules that allowed them.
    rules: RuleCoverage,
}

fn check_scenario(scenario: &Scenario, coverage: &mut Coverage) -> Result<(), TestCaseError> {
    let set = scenario.build();
    let compiled = compile(&set);
    let maps = MapEvaluator::new(&compiled.state);
    let workload_addresses = workload_addresses(&set);
    for generated in &scenario.flows {
        let flow = generated.resolve_any_family(&workload_addresses);
        let reference = evaluate(&set, &flow);
        let map = maps.evaluate(&flow);
        prop_assert_eq!(
            reference.ingress.allowed,
            map.ingress.allowed,
            "ingress {}: reference says {}; map identity {} endpoint {}",
            flow,
            reference.ingress.explanation,
            map.ingress.peer_identity,
            map.ingress.endpoint_id
        );
        prop_assert_eq!(
            reference.egress.allowed,
            map.egress.allowed,
            "egress {}: reference says {}; map identity {} endpoint {}",
            flow,
            reference.egress.explanation,
            map.egress.peer_identity,
            map.egress.endpoint_id
        );
        coverage.flows += 1;
        for (verdict, map_verdict) in [
            (&reference.ingress, &map.ingress),
            (&reference.egress, &map.egress),
        ] {
            // A direction only ClusterNetworkPolicies enforce, where no rule decides,
            // is enforced in the maps and "not enforced" (allowed) by the reference.
            if !matches!(verdict.reason, VerdictReason::NotEnforced) {
                prop_assert!(map_verdict.enforced);
            }
            if let VerdictReason::DecidedBy(rule) = &verdict.reason {
                // The maps name the ClusterNetworkPolicy rule that decided.
                let found = compiled.rules.get(map_verdict.rule_id).map(|rule| &**rule);
                prop_assert_eq!(found, Some(rule), "{}: {}", flow, verdict.explanation);
            }
            if let VerdictReason::AllowedBy(rules) = &verdict.reason {
                // The rule id the maps report names a rule the reference credits.
                let rule = compiled
                    .rules
                    .get(map_verdict.rule_id)
                    .expect("rule id in table");
                prop_assert!(
                    rules.contains(rule),
                    "{}: {} not among {:?}",
                    flow,
                    rule,
                    rules
                );
            }
            coverage
                .rules
                .record(&set, &verdict.reason, &verdict.explanation);
        }
    }
    Ok(())
}

#[test]
fn map_level_evaluator_agrees_with_reference() {
    const CASES: u32 = 1024;
    let mut runner = TestRunner::new(ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let coverage = RefCell::new(Coverage::default());
    let result = runner.run(&scenario_strategy(), |scenario| {
        check_scenario(&scenario, &mut coverage.borrow_mut())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    let coverage = coverage.into_inner();
    println!("{CASES} cases: {coverage:#?}");
    // The generator must reach every feature, or agreement proves little.
    assert!(
        coverage.rules.enforced_allowed > 100 && coverage.rules.enforced_denied > 100,
        "{coverage:?}"
    );
    // ClusterNetworkPolicy: each tier's Accept and Deny decide, and Pass rules pass.
    coverage.rules.assert_cluster_policies_covered(5);
    for feature in FEATURES {
        assert!(
            coverage.rules.feature_count(feature) >= 5,
            "feature {feature:?} allowed too few flows: {coverage:#?}"
        );
    }
}
