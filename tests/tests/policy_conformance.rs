//! NetworkPolicy conformance: the cyclonus corpus (230 cases, 123,669 flows with the
//! truth table of cyclonus' simulator) through the reference evaluator and through the
//! map-level evaluator on the compiled state. No kernel needed: this runs everywhere.
//!
//! The corpus is in the repository (`tests/data/conformance/`, MIT, provenance
//! beside it), so every clone runs it.

use std::collections::BTreeMap;

use microseg::policy::{MapEvaluator, compile, evaluate};
use microseg_tests::corpus::{self, FLOWS};

#[derive(Default, Clone, Copy)]
struct Tally {
    flows: usize,
    reference_pass: usize,
    map_pass: usize,
}

impl Tally {
    fn add(&mut self, reference_ok: bool, map_ok: bool) {
        self.flows += 1;
        self.reference_pass += usize::from(reference_ok);
        self.map_pass += usize::from(map_ok);
    }
}

#[test]
fn cyclonus_corpus_matches_reference_and_map_evaluators() {
    let cases = corpus::read();

    let mut overall = Tally::default();
    let mut self_pairs = Tally::default();
    let mut by_tag: BTreeMap<String, Tally> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut total_flows = 0usize;

    for case in &cases {
        for (label, step, set) in case.built_steps() {
            let compiled = compile(&set);
            let maps = MapEvaluator::new(&compiled.state);

            for corpus_flow in &step.result.flows {
                total_flows += 1;
                let flow = corpus_flow.flow();
                let reference = evaluate(&set, &flow);
                let map = maps.evaluate(&flow);
                let reference_ok = reference.ingress.allowed == corpus_flow.ingress_allowed
                    && reference.egress.allowed == corpus_flow.egress_allowed
                    && reference.allowed == corpus_flow.allowed;
                let map_ok = map.ingress.allowed == corpus_flow.ingress_allowed
                    && map.egress.allowed == corpus_flow.egress_allowed
                    && map.allowed == corpus_flow.allowed;
                if corpus_flow.is_self_pair() {
                    self_pairs.add(reference_ok, map_ok);
                    continue;
                }
                overall.add(reference_ok, map_ok);
                for tag in &case.tags {
                    by_tag
                        .entry(tag.clone())
                        .or_default()
                        .add(reference_ok, map_ok);
                }
                if (!reference_ok || !map_ok) && failures.len() < 20 {
                    failures.push(format!(
                        "{}; reference ingress {} egress {} ({} | {}); map ingress {} egress {}",
                        corpus_flow.expected(case, &label),
                        reference.ingress.allowed,
                        reference.egress.allowed,
                        reference.ingress.explanation,
                        reference.egress.explanation,
                        map.ingress.allowed,
                        map.egress.allowed,
                    ));
                }
            }
        }
    }

    println!(
        "conformance: {} flows in corpus; distinct pairs {}: reference {}/{}, map-level {}/{}; self pairs (not asserted): reference {}/{}, map-level {}/{}",
        total_flows,
        overall.flows,
        overall.reference_pass,
        overall.flows,
        overall.map_pass,
        overall.flows,
        self_pairs.reference_pass,
        self_pairs.flows,
        self_pairs.map_pass,
        self_pairs.flows,
    );
    for (tag, tally) in &by_tag {
        println!(
            "  {tag:28} reference {:6}/{:6}  map-level {:6}/{:6}",
            tally.reference_pass, tally.flows, tally.map_pass, tally.flows
        );
    }
    for failure in &failures {
        println!("FAIL {failure}");
    }
    assert_eq!(total_flows, FLOWS);
    assert_eq!(
        overall.reference_pass, overall.flows,
        "reference evaluator deviations"
    );
    assert_eq!(
        overall.map_pass, overall.flows,
        "map-level evaluator deviations"
    );
}
