//! Random small inventories, NetworkPolicies and flows for the property tests that
//! hold an evaluator to the reference evaluator (`tests/policy_agreement.rs`: the
//! map-level evaluator; `tests/datapath_agreement.rs`: the eBPF programs), and the
//! tally of rule features that shows the generator reaches every part of the API.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use microseg::policy::{
    Flow, NamespaceScope, Peer, PolicyDirection, PolicySet, PolicySetBuilder, PortSpec, Protocol,
    RuleRef, Source, VerdictReason,
};
use proptest::prelude::*;
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

/// CIDRs for ClusterNetworkPolicy `networks` peers.
const NETWORKS: [&str; 6] = [
    "10.0.0.0/16",
    "10.0.1.0/24",
    "10.0.0.1/32",
    "0.0.0.0/0",
    "fd00::/16",
    "::/0",
];

/// A ClusterNetworkPolicy peer: namespaces, pods, networks or (egress) nodes.
fn cluster_peer_strategy(egress: bool) -> impl Strategy<Value = Value> {
    let workloads = prop_oneof![
        selector_strategy().prop_map(|namespaces| json!({"namespaces": namespaces})),
        (selector_strategy(), selector_strategy()).prop_map(|(namespaces, pods)| {
            json!({"pods": {"namespaceSelector": namespaces, "podSelector": pods}})
        }),
    ];
    let outside = prop_oneof![
        prop::sample::subsequence(NETWORKS.to_vec(), 1..3)
            .prop_map(|networks| json!({"networks": networks})),
        prop::sample::select(vec![json!({}), json!({"matchLabels": {"role": "gateway"}})])
            .prop_map(|nodes| json!({"nodes": nodes})),
    ];
    if egress {
        prop_oneof![3 => workloads, 2 => outside].boxed()
    } else {
        workloads.boxed()
    }
}

/// A ClusterNetworkPolicy `protocols` entry.
fn cluster_protocol_strategy(named_ports: bool) -> impl Strategy<Value = Value> {
    let numbered = (
        prop::sample::select(vec!["tcp", "udp", "sctp"]),
        prop_oneof![
            3 => prop::sample::select(vec![53, 80, 81]).prop_map(|port| json!({"number": port})),
            1 => Just(json!({"range": {"start": 79, "end": 81}})),
            1 => Just(json!({"range": {"start": 80, "end": 81}})),
        ],
    )
        .prop_map(|(protocol, port)| json!({ protocol: {"destinationPort": port} }));
    if named_ports {
        prop_oneof![
            3 => numbered,
            1 => prop::sample::select(vec!["http", "dns", "alt", "missing"])
                .prop_map(|name| json!({"destinationNamedPort": name})),
        ]
        .boxed()
    } else {
        numbered.boxed()
    }
}

fn cluster_rule_strategy(egress: bool) -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["Accept", "Deny", "Pass"]),
        prop::collection::vec(cluster_peer_strategy(egress), 1..=2),
        prop::option::weighted(
            0.6,
            prop::collection::vec(cluster_protocol_strategy(true), 1..=2),
        ),
    )
        .prop_map(move |(action, peers, protocols)| {
            let mut rule = serde_json::Map::new();
            rule.insert("action".into(), json!(action));
            // Named ports cannot sit beside networks or nodes peers.
            let outside = peers
                .iter()
                .any(|peer| peer.get("networks").is_some() || peer.get("nodes").is_some());
            rule.insert((if egress { "to" } else { "from" }).into(), json!(peers));
            if let Some(protocols) = protocols {
                let protocols: Vec<Value> = protocols
                    .into_iter()
                    .filter(|protocol| !outside || protocol.get("destinationNamedPort").is_none())
                    .collect();
                if !protocols.is_empty() {
                    rule.insert("protocols".into(), json!(protocols));
                }
            }
            Value::Object(rule)
        })
}

/// A ClusterNetworkPolicy spec: tier, priority (few values, so ties happen), subject
/// and up to 3 rules per direction.
fn cluster_policy_strategy() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["Admin", "Baseline"]),
        prop::sample::select(vec![0, 5, 10]),
        prop_oneof![
            selector_strategy().prop_map(|namespaces| json!({"namespaces": namespaces})),
            (selector_strategy(), selector_strategy()).prop_map(|(namespaces, pods)| {
                json!({"pods": {"namespaceSelector": namespaces, "podSelector": pods}})
            }),
        ],
        prop::collection::vec(cluster_rule_strategy(false), 0..=3),
        prop::collection::vec(cluster_rule_strategy(true), 0..=3),
    )
        .prop_map(|(tier, priority, subject, ingress, egress)| {
            let mut spec = serde_json::Map::new();
            spec.insert("tier".into(), json!(tier));
            spec.insert("priority".into(), json!(priority));
            spec.insert("subject".into(), subject);
            if !ingress.is_empty() {
                spec.insert("ingress".into(), json!(ingress));
            }
            if !egress.is_empty() {
                spec.insert("egress".into(), json!(egress));
            }
            Value::Object(spec)
        })
}

#[derive(Debug, Clone)]
pub struct WorkloadSpec {
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

/// One generated case: namespaces, workloads and policies (see [`Scenario::build`]) and
/// up to 24 flows to judge under them.
#[derive(Debug, Clone)]
pub struct Scenario {
    namespace_teams: Vec<Option<&'static str>>,
    /// `None`: a workload removed (by a [`Mutation`]); the others keep their names.
    workloads: Vec<Option<WorkloadSpec>>,
    policies: Vec<Option<(usize, Value)>>,
    /// ClusterNetworkPolicy specs (none in a third of the cases, so that
    /// NetworkPolicy alone stays well covered).
    cluster_policies: Vec<Option<Value>>,
    pub flows: Vec<GeneratedFlow>,
}

/// A flow to judge, its ends still to be resolved to addresses: by
/// [`GeneratedFlow::resolve_in_family`] (both ends of the family `ipv6` names, as a
/// packet needs) or by [`GeneratedFlow::resolve_any_family`] (`ipv6` ignored: the
/// evaluators must also agree on flows that mix families).
#[derive(Debug, Clone, Copy)]
pub struct GeneratedFlow {
    pub src: FlowEnd,
    pub dst: FlowEnd,
    pub protocol: Protocol,
    pub port: u16,
    pub ipv6: bool,
}

/// A flow end: mostly a workload address, sometimes an address outside the inventory
/// (indices are taken modulo the candidates).
#[derive(Debug, Clone, Copy)]
pub enum FlowEnd {
    Workload(usize),
    External(usize),
}

fn flow_end_strategy() -> impl Strategy<Value = FlowEnd> {
    prop_oneof![
        4 => any::<usize>().prop_map(FlowEnd::Workload),
        1 => any::<usize>().prop_map(FlowEnd::External),
    ]
}

/// Scenarios of 3 namespaces, 2 to 6 workloads, up to 4 policies and 1 to 24 flows.
pub fn scenario_strategy() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(prop::option::of(prop::sample::select(vec!["x", "y"])), 3),
        prop::collection::vec(workload_strategy(), 2..=6),
        prop::collection::vec(policy_strategy(), 0..=4),
        prop_oneof![
            1 => Just(Vec::new()),
            2 => prop::collection::vec(cluster_policy_strategy(), 1..=3),
        ],
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
                prop_oneof![2 => Just(false), 1 => Just(true)],
            )
                .prop_map(|(src, dst, protocol, port, ipv6)| GeneratedFlow {
                    src,
                    dst,
                    protocol,
                    port,
                    ipv6,
                }),
            1..=24,
        ),
    )
        .prop_map(
            |(namespace_teams, workloads, policies, cluster_policies, flows)| Scenario {
                namespace_teams,
                workloads: workloads.into_iter().map(Some).collect(),
                policies: policies.into_iter().map(Some).collect(),
                cluster_policies: cluster_policies.into_iter().map(Some).collect(),
                flows,
            },
        )
}

impl Scenario {
    /// The scenario's namespaces, workloads and policies as a policy set (panics if the
    /// generator produced something invalid).
    pub fn build(&self) -> PolicySet {
        let mut builder = PolicySetBuilder::new();
        for (key, value) in self.documents() {
            builder.add_document(&document_source(&key), &value);
        }
        builder
            .finish()
            .unwrap_or_else(|errors| panic!("generated input must be valid:\n{errors}"))
    }

    /// Each document of the scenario, by a key that stays while it exists (its kind
    /// and name).
    pub fn documents(&self) -> Vec<(String, Value)> {
        let mut documents = Vec::new();
        for (index, team) in self.namespace_teams.iter().enumerate() {
            let labels = match team {
                Some(team) => json!({"team": team}),
                None => json!({}),
            };
            documents.push((
                format!("Namespace {}", NAMESPACES[index]),
                json!({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": NAMESPACES[index], "labels": labels}}),
            ));
        }
        for (index, workload) in self.workloads.iter().enumerate() {
            let Some(workload) = workload else {
                continue;
            };
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
            documents.push((
                format!("Workload w{host}"),
                json!({"apiVersion": "microseg.dev/v1", "kind": "Workload",
                       "metadata": {"name": format!("w{host}"),
                                    "namespace": NAMESPACES[workload.namespace],
                                    "labels": workload.labels},
                       "spec": {"addresses": addresses, "ports": ports}}),
            ));
        }
        for (index, policy) in self.policies.iter().enumerate() {
            let Some((namespace, spec)) = policy else {
                continue;
            };
            documents.push((
                format!("NetworkPolicy p{index}"),
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "metadata": {"name": format!("p{index}"), "namespace": NAMESPACES[*namespace]},
                       "spec": spec}),
            ));
        }
        for (index, spec) in self.cluster_policies.iter().enumerate() {
            let Some(spec) = spec else {
                continue;
            };
            documents.push((
                format!("ClusterNetworkPolicy c{index}"),
                json!({"apiVersion": "policy.networking.k8s.io/v1alpha2",
                       "kind": "ClusterNetworkPolicy",
                       "metadata": {"name": format!("c{index}")},
                       "spec": spec}),
            ));
        }
        // Two Nodes for `nodes` peers: one at an external address, one at a workload's
        // (a host workload on its own node).
        for (name, address, labels) in [
            ("n1", "10.0.1.200", json!({"role": "gateway"})),
            ("n2", "10.0.0.1", json!({})),
        ] {
            documents.push((
                format!("Node {name}"),
                json!({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": name, "labels": labels},
                       "status": {"addresses": [{"type": "InternalIP", "address": address}]}}),
            ));
        }
        documents
    }
}

/// Where a generated document is said to come from: a file per document, so that a
/// document's source does not change when others come or go.
pub fn document_source(key: &str) -> Source {
    Source::new(Path::new("generated").join(key.replace(' ', "-")), 1)
}

/// One change to a [`Scenario`]: a workload, namespace's team label, NetworkPolicy
/// or ClusterNetworkPolicy set (added or replaced) or removed, by slot.
#[derive(Debug, Clone)]
pub enum Mutation {
    Workload(usize, Option<WorkloadSpec>),
    NamespaceTeam(usize, Option<&'static str>),
    Policy(usize, Option<(usize, Value)>),
    ClusterPolicy(usize, Option<Value>),
}

/// What a [`Mutation`] changed, as the keys the compiler is told
/// (`microseg::policy::SetChanges`).
#[derive(Debug, Clone, Default)]
pub struct Changed {
    pub workloads: Vec<(String, String)>,
    pub policies: Vec<(String, String)>,
    pub cluster_policies: Vec<String>,
    pub namespaces: Vec<String>,
}

/// Mutations over a scenario's slots (a few past its end, to add).
pub fn mutation_strategy() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (0..8usize, prop::option::weighted(0.7, workload_strategy()))
            .prop_map(|(slot, spec)| Mutation::Workload(slot, spec)),
        1 => (0..NAMESPACES.len(), prop::option::of(prop::sample::select(vec!["x", "y"])))
            .prop_map(|(slot, team)| Mutation::NamespaceTeam(slot, team)),
        2 => (0..6usize, prop::option::weighted(0.7, policy_strategy()))
            .prop_map(|(slot, policy)| Mutation::Policy(slot, policy)),
        2 => (0..4usize, prop::option::weighted(0.7, cluster_policy_strategy()))
            .prop_map(|(slot, policy)| Mutation::ClusterPolicy(slot, policy)),
    ]
}

fn put<T>(slots: &mut Vec<Option<T>>, slot: usize, value: Option<T>) -> Option<T> {
    if slots.len() <= slot {
        slots.resize_with(slot + 1, || None);
    }
    std::mem::replace(&mut slots[slot], value)
}

impl Scenario {
    /// Applies `mutation`; returns the keys it changed.
    pub fn apply(&mut self, mutation: &Mutation) -> Changed {
        let mut changed = Changed::default();
        match mutation {
            Mutation::Workload(slot, spec) => {
                let name = format!("w{}", slot + 1);
                let old = put(&mut self.workloads, *slot, spec.clone());
                for namespace in old.iter().chain(spec).map(|w| NAMESPACES[w.namespace]) {
                    changed.workloads.push((namespace.to_owned(), name.clone()));
                }
            }
            Mutation::NamespaceTeam(slot, team) => {
                self.namespace_teams[*slot] = *team;
                changed.namespaces.push(NAMESPACES[*slot].to_owned());
            }
            Mutation::Policy(slot, policy) => {
                let name = format!("p{slot}");
                let old = put(&mut self.policies, *slot, policy.clone());
                for (namespace, _) in old.iter().chain(policy) {
                    changed
                        .policies
                        .push((NAMESPACES[*namespace].to_owned(), name.clone()));
                }
            }
            Mutation::ClusterPolicy(slot, policy) => {
                put(&mut self.cluster_policies, *slot, policy.clone());
                changed.cluster_policies.push(format!("c{slot}"));
            }
        }
        changed
    }
}

/// Every address of every workload of `set`, in inventory order.
pub fn workload_addresses(set: &PolicySet) -> Vec<IpAddr> {
    set.workloads
        .iter()
        .flat_map(|workload| workload.addresses.iter().copied())
        .collect()
}

fn external_addresses() -> impl Iterator<Item = IpAddr> {
    EXTERNAL
        .iter()
        .map(|text| text.parse().expect("external address"))
}

impl GeneratedFlow {
    /// The flow with its ends taken from all of `workload_addresses` and all external
    /// addresses, whatever their family.
    pub fn resolve_any_family(&self, workload_addresses: &[IpAddr]) -> Flow {
        let external: Vec<IpAddr> = external_addresses().collect();
        let address = |end: FlowEnd| match end {
            FlowEnd::Workload(index) => workload_addresses[index % workload_addresses.len()],
            FlowEnd::External(index) => external[index % external.len()],
        };
        self.with_ends(address)
    }

    /// The flow's ends as addresses of its family: workload addresses of that family
    /// (or, when no workload has one, addresses outside the inventory) and external
    /// addresses.
    pub fn resolve_in_family(&self, workload_addresses: &[IpAddr]) -> Flow {
        let of_family = |address: &IpAddr| address.is_ipv6() == self.ipv6;
        let workloads: Vec<IpAddr> = workload_addresses
            .iter()
            .copied()
            .filter(of_family)
            .collect();
        let external: Vec<IpAddr> = external_addresses().filter(of_family).collect();
        let address = |end: FlowEnd| match end {
            FlowEnd::Workload(index) if !workloads.is_empty() => workloads[index % workloads.len()],
            FlowEnd::Workload(index) | FlowEnd::External(index) => external[index % external.len()],
        };
        self.with_ends(address)
    }

    fn with_ends(&self, address: impl Fn(FlowEnd) -> IpAddr) -> Flow {
        Flow {
            src: address(self.src),
            dst: address(self.dst),
            protocol: self.protocol,
            port: self.port,
        }
    }
}

/// The rule features [`RuleCoverage`] counts; each must allow a few flows, or agreement
/// proves little.
pub const FEATURES: [&str; 11] = [
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
];

/// Directions (ingress, egress) the reference evaluator found enforced and allowed /
/// denied, and the features of the rules that allowed them.
#[derive(Debug, Default)]
pub struct RuleCoverage {
    pub enforced_allowed: usize,
    pub enforced_denied: usize,
    /// Features of the rules that allowed an enforced direction.
    pub by_feature: BTreeMap<&'static str, usize>,
    /// Directions a ClusterNetworkPolicy rule decided, by "tier action".
    pub cluster_decided: BTreeMap<String, usize>,
    /// Directions a Pass rule sent on to the next tier.
    pub passed: usize,
}

impl RuleCoverage {
    /// Counts one direction's verdict by the reference evaluator under `set`.
    pub fn record(&mut self, set: &PolicySet, reason: &VerdictReason, explanation: &str) {
        self.passed += usize::from(explanation.contains("passed on by"));
        match reason {
            VerdictReason::NotEnforced => {}
            VerdictReason::DeniedByDefault { .. } => self.enforced_denied += 1,
            VerdictReason::DecidedBy(rule) => {
                if let Some(info) = &rule.cluster {
                    *self
                        .cluster_decided
                        .entry(format!("{} {}", info.tier, info.action))
                        .or_default() += 1;
                }
            }
            VerdictReason::AllowedBy(rules) => {
                self.enforced_allowed += 1;
                let mut features = BTreeSet::new();
                rule_features(set, rules, &mut features);
                for feature in features {
                    *self.by_feature.entry(feature).or_default() += 1;
                }
            }
        }
    }

    /// How many directions ClusterNetworkPolicy rules of `tier` with `action` decided.
    pub fn cluster_count(&self, tier: &str, action: &str) -> usize {
        self.cluster_decided
            .get(&format!("{tier} {action}"))
            .copied()
            .unwrap_or(0)
    }

    /// Panics unless each tier's Accept and Deny decided, and Pass rules passed, at
    /// least `least` directions: agreement on ClusterNetworkPolicy proves little
    /// otherwise.
    pub fn assert_cluster_policies_covered(&self, least: usize) {
        for tier in ["Admin", "Baseline"] {
            for action in ["Accept", "Deny"] {
                assert!(
                    self.cluster_count(tier, action) >= least,
                    "{tier} {action} decided too few directions: {self:#?}"
                );
            }
        }
        assert!(self.passed >= least, "too few passes: {self:#?}");
    }

    /// How many allowed directions a rule with `feature` allowed.
    pub fn feature_count(&self, feature: &str) -> usize {
        self.by_feature.get(feature).copied().unwrap_or(0)
    }
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
                        Peer::Nodes(_) => "nodes",
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
