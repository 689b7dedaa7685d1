//! Property: on random small inventories, policies and flows, the map-level evaluator
//! on the compiled state agrees with the reference evaluator, direction by direction.

use std::net::IpAddr;
use std::path::Path;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use microseg::policy::{
    Flow, MapEvaluator, NamespaceScope, Peer, PolicyDirection, PolicySet, PolicySetBuilder,
    PortSpec, Protocol, RuleRef, Source, VerdictReason, compile, evaluate,
};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::{Value, json};

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
/// Addresses outside the inventory that flows may use.
const EXTERNAL: [&str; 6] = [
    "10.0.1.200",
    "10.0.2.5",
    "10.0.1.3",
    "192.0.2.1",
    "fd00::99",
    "2001:db8::1",
];
/// ipBlocks: a cidr and the except candidates strictly inside it.
const BLOCKS: [(&str, &[&str]); 10] = [
    ("10.0.0.1/32", &[]),
    ("10.0.0.0/29", &["10.0.0.2/32", "10.0.0.4/30"]),
    (
        "10.0.0.0/16",
        &["10.0.1.0/24", "10.0.0.0/24", "10.0.1.3/32"],
    ),
    ("10.0.1.0/24", &["10.0.1.0/28", "10.0.1.128/25"]),
    ("10.0.0.0/8", &["10.0.0.0/16", "10.0.2.0/24"]),
    ("0.0.0.0/0", &["10.0.0.0/8", "192.0.2.0/24"]),
    ("10.0.2.0/25", &["10.0.2.4/30"]),
    ("10.0.1.3/32", &[]),
    ("::/0", &["fd00::/16"]),
    ("fd00::/16", &["fd00::/120", "fd00::99/128"]),
];

fn labels_strategy() -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::sample::select(vec!["web", "api", "db"])),
        prop::option::of(prop::sample::select(vec!["1", "2"])),
    )
        .prop_map(|(app, tier)| {
            let mut labels = serde_json::Map::new();
            if let Some(app) = app {
                labels.insert("app".into(), json!(app));
            }
            if let Some(tier) = tier {
                labels.insert("tier".into(), json!(tier));
            }
            Value::Object(labels)
        })
}

/// Selectors are kept simple (often empty, else one label or one expression) so that
/// they select something often enough for rules to matter.
fn selector_strategy() -> impl Strategy<Value = Value> {
    let expression = (
        prop::sample::select(vec!["app", "tier", "team", "kubernetes.io/metadata.name"]),
        prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]),
        prop::sample::subsequence(vec!["web", "api", "db", "1", "x", "a", "b"], 1..3),
    )
        .prop_map(|(key, operator, values)| {
            if operator == "Exists" || operator == "DoesNotExist" {
                json!({"matchExpressions": [{"key": key, "operator": operator}]})
            } else {
                json!({"matchExpressions": [{"key": key, "operator": operator, "values": values}]})
            }
        });
    let label = (
        prop::sample::select(vec!["app", "tier", "team"]),
        prop::sample::select(vec!["web", "api", "1", "x"]),
    )
        .prop_map(|(key, value)| json!({"matchLabels": { key: value }}));
    let both = (label.clone(), expression.clone()).prop_map(|(mut label, expression)| {
        label["matchExpressions"] = expression["matchExpressions"].clone();
        label
    });
    prop_oneof![
        3 => Just(json!({})),
        3 => label,
        2 => expression,
        1 => both,
    ]
}

fn peer_strategy() -> impl Strategy<Value = Value> {
    prop_oneof![
        selector_strategy().prop_map(|pods| json!({"podSelector": pods})),
        selector_strategy().prop_map(|namespaces| json!({"namespaceSelector": namespaces})),
        (selector_strategy(), selector_strategy()).prop_map(
            |(pods, namespaces)| json!({"podSelector": pods, "namespaceSelector": namespaces})
        ),
        (0..BLOCKS.len(), any::<u8>()).prop_map(|(index, except_mask)| {
            let (cidr, candidates) = BLOCKS[index];
            let except: Vec<&str> = candidates
                .iter()
                .enumerate()
                .filter(|(bit, _)| except_mask & (1 << bit) != 0)
                .map(|(_, except)| *except)
                .collect();
            if except.is_empty() {
                json!({"ipBlock": {"cidr": cidr}})
            } else {
                json!({"ipBlock": {"cidr": cidr, "except": except}})
            }
        }),
    ]
}

fn port_strategy() -> impl Strategy<Value = Value> {
    let port = prop_oneof![
        1 => Just(None),
        2 => prop::sample::select(vec![53, 80, 81]).prop_map(|port| Some((json!(port), None))),
        1 => Just(Some((json!(79), Some(81)))),
        1 => Just(Some((json!(80), Some(80)))),
        3 => prop::sample::select(vec!["http", "dns", "alt", "missing"])
            .prop_map(|name| Some((json!(name), None))),
    ];
    (
        prop::option::of(prop::sample::select(vec!["TCP", "UDP", "SCTP"])),
        port,
    )
        .prop_map(|(protocol, port)| {
            let mut entry = serde_json::Map::new();
            if let Some(protocol) = protocol {
                entry.insert("protocol".into(), json!(protocol));
            }
            if let Some((port, end_port)) = port {
                entry.insert("port".into(), port);
                if let Some(end_port) = end_port {
                    entry.insert("endPort".into(), json!(end_port));
                }
            }
            Value::Object(entry)
        })
}

/// `None`: field absent; `Some(vec![])`: empty list.
fn optional_list<T: Strategy<Value = Value>>(
    element: T,
    max: usize,
) -> impl Strategy<Value = Option<Vec<Value>>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Vec::new())),
        4 => prop::collection::vec(element, 1..=max).prop_map(Some),
    ]
}

fn rule_strategy(peer_field: &'static str) -> impl Strategy<Value = Value> {
    (
        optional_list(peer_strategy(), 2),
        optional_list(port_strategy(), 2),
    )
        .prop_map(move |(peers, ports)| {
            let mut rule = serde_json::Map::new();
            if let Some(peers) = peers {
                rule.insert(peer_field.into(), json!(peers));
            }
            if let Some(ports) = ports {
                rule.insert("ports".into(), json!(ports));
            }
            Value::Object(rule)
        })
}

fn policy_strategy() -> impl Strategy<Value = (usize, Value)> {
    (
        0..NAMESPACES.len(),
        selector_strategy(),
        prop::sample::select(vec![
            None,
            Some(vec!["Ingress"]),
            Some(vec!["Egress"]),
            Some(vec!["Ingress", "Egress"]),
        ]),
        optional_list(rule_strategy("from"), 3),
        optional_list(rule_strategy("to"), 3),
    )
        .prop_map(|(namespace, pod_selector, types, ingress, egress)| {
            let mut spec = serde_json::Map::new();
            spec.insert("podSelector".into(), pod_selector);
            if let Some(types) = types {
                spec.insert("policyTypes".into(), json!(types));
            }
            if let Some(ingress) = ingress {
                spec.insert("ingress".into(), json!(ingress));
            }
            if let Some(egress) = egress {
                spec.insert("egress".into(), json!(egress));
            }
            (namespace, Value::Object(spec))
        })
}

#[derive(Debug, Clone)]
struct WorkloadSpec {
    namespace: usize,
    labels: Value,
    octet: u8,
    ipv6: bool,
    http: Option<u16>,
    dns: Option<&'static str>,
    alt: Option<u16>,
}

fn workload_strategy() -> impl Strategy<Value = WorkloadSpec> {
    (
        0..NAMESPACES.len(),
        labels_strategy(),
        0u8..4,
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![80u16, 81])),
        prop::option::of(prop::sample::select(vec!["UDP", "TCP"])),
        prop::option::of(prop::sample::select(vec![80u16, 53])),
    )
        .prop_map(
            |(namespace, labels, octet, ipv6, http, dns, alt)| WorkloadSpec {
                namespace,
                labels,
                octet,
                ipv6,
                http,
                dns,
                alt,
            },
        )
}

#[derive(Debug, Clone)]
struct Scenario {
    namespace_teams: Vec<Option<&'static str>>,
    workloads: Vec<WorkloadSpec>,
    policies: Vec<(usize, Value)>,
    flows: Vec<(FlowEnd, FlowEnd, Protocol, u16)>,
}

/// A flow end: mostly a workload address, sometimes an address outside the inventory.
#[derive(Debug, Clone, Copy)]
enum FlowEnd {
    Workload(usize),
    External(usize),
}

fn flow_end_strategy() -> impl Strategy<Value = FlowEnd> {
    prop_oneof![
        4 => any::<usize>().prop_map(FlowEnd::Workload),
        1 => (0..EXTERNAL.len()).prop_map(FlowEnd::External),
    ]
}

fn scenario_strategy() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(prop::option::of(prop::sample::select(vec!["x", "y"])), 3),
        prop::collection::vec(workload_strategy(), 2..=6),
        prop::collection::vec(policy_strategy(), 0..=4),
        prop::collection::vec(
            (
                flow_end_strategy(),
                flow_end_strategy(),
                prop_oneof![
                    2 => Just(Protocol::Tcp),
                    2 => Just(Protocol::Udp),
                    1 => Just(Protocol::Sctp),
                ],
                prop_oneof![
                    4 => prop::sample::select(vec![53u16, 80, 81]),
                    1 => prop::sample::select(vec![79u16, 82]),
                ],
            ),
            1..=24,
        ),
    )
        .prop_map(|(namespace_teams, workloads, policies, flows)| Scenario {
            namespace_teams,
            workloads,
            policies,
            flows,
        })
}

fn build(scenario: &Scenario) -> PolicySet {
    let mut builder = PolicySetBuilder::new();
    let file = Path::new("generated.yaml");
    let mut document = 0;
    let mut add = |builder: &mut PolicySetBuilder, value: Value| {
        document += 1;
        builder.add_document(&Source::new(file, document), &value);
    };
    for (index, team) in scenario.namespace_teams.iter().enumerate() {
        let labels = match team {
            Some(team) => json!({"team": team}),
            None => json!({}),
        };
        add(
            &mut builder,
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": NAMESPACES[index], "labels": labels}}),
        );
    }
    for (index, workload) in scenario.workloads.iter().enumerate() {
        let host = index + 1;
        let mut addresses = vec![format!("10.0.{}.{host}", workload.octet)];
        if workload.ipv6 {
            addresses.push(format!("fd00::{}:{host}", workload.octet));
        }
        let mut ports = Vec::new();
        if let Some(port) = workload.http {
            ports.push(json!({"name": "http", "port": port}));
        }
        if let Some(protocol) = workload.dns {
            ports.push(json!({"name": "dns", "port": 53, "protocol": protocol}));
        }
        if let Some(port) = workload.alt {
            ports.push(json!({"name": "alt", "port": port, "protocol": "UDP"}));
        }
        add(
            &mut builder,
            json!({"apiVersion": "microseg.dev/v1", "kind": "Workload",
                   "metadata": {"name": format!("w{host}"),
                                "namespace": NAMESPACES[workload.namespace],
                                "labels": workload.labels},
                   "spec": {"addresses": addresses, "ports": ports}}),
        );
    }
    for (index, (namespace, spec)) in scenario.policies.iter().enumerate() {
        add(
            &mut builder,
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": format!("p{index}"), "namespace": NAMESPACES[*namespace]},
                   "spec": spec}),
        );
    }
    builder
        .finish()
        .unwrap_or_else(|errors| panic!("generated input must be valid:\n{errors}"))
}

/// Counts of flows by what decided them, to show the generator reaches every feature.
#[derive(Debug, Default)]
struct Coverage {
    flows: usize,
    enforced_allowed: usize,
    enforced_denied: usize,
    by_feature: BTreeMap<&'static str, usize>,
}

/// Features of the rules that allowed a direction.
fn rule_features(set: &PolicySet, rules: &[RuleRef], features: &mut BTreeSet<&'static str>) {
    for rule_ref in rules {
        let policy = set
            .policies
            .iter()
            .find(|policy| {
                policy.namespace == rule_ref.policy_namespace && policy.name == rule_ref.policy_name
            })
            .unwrap();
        let rule = &policy.rules(rule_ref.direction).unwrap()[rule_ref.rule_index];
        let direction = rule_ref.direction;
        match &rule.peers {
            None => {
                features.insert("no peers");
            }
            Some(peers) => {
                for peer in peers {
                    features.insert(match peer {
                        Peer::IpBlock(block) if !block.except.is_empty() => "ipBlock with except",
                        Peer::IpBlock(_) => "ipBlock",
                        Peer::Workloads {
                            namespaces: NamespaceScope::Named(_),
                            ..
                        } => "podSelector",
                        Peer::Workloads {
                            namespaces: NamespaceScope::Selected(_),
                            ..
                        } => "namespaceSelector",
                    });
                }
            }
        }
        match &rule.ports {
            None => {
                features.insert("no ports");
            }
            Some(ports) => {
                for port in ports {
                    features.insert(match (&port.port, direction) {
                        (PortSpec::Named(_), PolicyDirection::Ingress) => "named port (ingress)",
                        (PortSpec::Named(_), PolicyDirection::Egress) => "named port (egress)",
                        (PortSpec::Range { first, last }, _) if first != last => "port range",
                        (PortSpec::Range { .. }, _) => "single port",
                        (PortSpec::Any, _) => "protocol only",
                    });
                }
            }
        }
    }
}

fn check_scenario(scenario: &Scenario, coverage: &mut Coverage) -> Result<(), TestCaseError> {
    let set = build(scenario);
    let compiled = compile(&set);
    let maps = MapEvaluator::new(&compiled.state);
    let workload_addresses: Vec<IpAddr> = set
        .workloads
        .iter()
        .flat_map(|workload| workload.addresses.iter().copied())
        .collect();
    let address = |end: &FlowEnd| match end {
        FlowEnd::Workload(index) => workload_addresses[index % workload_addresses.len()],
        FlowEnd::External(index) => EXTERNAL[*index].parse().unwrap(),
    };
    for (src, dst, protocol, port) in &scenario.flows {
        let flow = Flow {
            src: address(src),
            dst: address(dst),
            protocol: *protocol,
            port: *port,
        };
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
            prop_assert_eq!(
                map_verdict.enforced,
                !matches!(verdict.reason, VerdictReason::NotEnforced)
            );
            match &verdict.reason {
                VerdictReason::NotEnforced => {}
                VerdictReason::DeniedByDefault { .. } => coverage.enforced_denied += 1,
                VerdictReason::AllowedBy(rules) => {
                    coverage.enforced_allowed += 1;
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
                    let mut features = BTreeSet::new();
                    rule_features(&set, rules, &mut features);
                    for feature in features {
                        *coverage.by_feature.entry(feature).or_default() += 1;
                    }
                }
            }
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
        coverage.enforced_allowed > 100 && coverage.enforced_denied > 100,
        "{coverage:?}"
    );
    for feature in [
        "no peers",
        "podSelector",
        "namespaceSelector",
        "ipBlock",
        "ipBlock with except",
        "no ports",
        "single port",
        "port range",
        "protocol only",
        "named port (ingress)",
        "named port (egress)",
    ] {
        assert!(
            coverage.by_feature.get(feature).copied().unwrap_or(0) >= 5,
            "feature {feature:?} allowed too few flows: {coverage:#?}"
        );
    }
}
