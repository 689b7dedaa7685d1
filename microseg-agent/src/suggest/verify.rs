//! Checking a suggestion with the project's own loader and reference evaluator: the
//! suggested YAML, loaded beside an inventory of the observed workloads, must allow
//! every observed connection (else `suggest` has a bug); and over the known
//! workloads, on the ports the policies name, what else do they allow?

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::Path,
};

use serde::Serialize;

use super::{
    generate::{PeerRef, PortKey, Suggestion, workload_of},
    observed::{Connection, Endpoint, Pod},
};
use crate::policy::{
    EndpointRef, Flow, PolicyDirection, PolicySet, PolicySetBuilder, Source, VerdictReason,
    Workload, evaluate,
};

/// A pod of the inventory a suggestion is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventoryPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<IpAddr>,
}

impl InventoryPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Namespaces (with their labels) and pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub pods: Vec<InventoryPod>,
}

impl Inventory {
    /// The pods the connections name, with every address they were seen with. An
    /// address seen for two pods (a pod's address reused) stays with the pod seen
    /// last.
    pub fn from_connections(connections: &[Connection]) -> Self {
        let mut pods: BTreeMap<String, InventoryPod> = BTreeMap::new();
        let mut owner: BTreeMap<IpAddr, String> = BTreeMap::new();
        for endpoint in connections.iter().flat_map(|c| [&c.source, &c.destination]) {
            let Some(pod) = &endpoint.pod else { continue };
            let entry = pods.entry(pod.key()).or_insert_with(|| InventoryPod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                labels: BTreeMap::new(),
                addresses: Vec::new(),
            });
            entry.labels = pod.labels.clone();
            owner.insert(endpoint.address, pod.key());
        }
        for (address, key) in owner {
            if let Some(pod) = pods.get_mut(&key) {
                pod.addresses.push(address);
            }
        }
        let mut inventory = Inventory::default();
        for pod in pods.into_values() {
            inventory
                .namespaces
                .entry(pod.namespace.clone())
                .or_default();
            inventory.pods.push(pod);
        }
        inventory
    }

    /// Adds the pods of `other` this inventory lacks (by name), with the addresses no
    /// pod here holds, and its namespaces.
    pub fn add_missing(&mut self, other: &Inventory) {
        let names: BTreeSet<String> = self.pods.iter().map(InventoryPod::key).collect();
        let mut taken: BTreeSet<IpAddr> = self
            .pods
            .iter()
            .flat_map(|pod| pod.addresses.iter().copied())
            .collect();
        for pod in &other.pods {
            if names.contains(&pod.key()) {
                continue;
            }
            let mut pod = pod.clone();
            pod.addresses.retain(|address| taken.insert(*address));
            self.namespaces.entry(pod.namespace.clone()).or_default();
            self.pods.push(pod);
        }
        for (name, labels) in &other.namespaces {
            self.namespaces
                .entry(name.clone())
                .or_insert_with(|| labels.clone());
        }
    }
}

/// The inventory and the suggested YAML, through the loader (as `microseg apply`
/// and `check` read files).
pub fn policy_set(inventory: &Inventory, yaml: &str) -> Result<PolicySet, String> {
    let source = Source::memory("observed inventory");
    let mut builder = PolicySetBuilder::new();
    for (name, labels) in &inventory.namespaces {
        builder.add_namespace(&source, name, labels);
    }
    for pod in &inventory.pods {
        builder.add_workload(Workload {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            labels: (&pod.labels).into(),
            addresses: pod.addresses.clone(),
            ports: Vec::new(),
            interface: None,
            node: None,
            source: source.clone(),
        });
    }
    builder.add_text(Path::new("suggested.yaml"), yaml);
    builder.finish().map_err(|errors| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n  ")
    })
}

/// The outcome of evaluating every observed connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SelfCheck {
    /// Connections the evaluator allowed.
    pub allowed: usize,
    /// Connections it denied, with its explanation (a bug in `suggest`).
    pub denied: Vec<String>,
    /// Connections not checked: an address of theirs belongs to another pod now.
    pub unchecked: Vec<String>,
}

/// Whether `set` resolves `address` to the endpoint the event named.
fn resolves_to(set: &PolicySet, endpoint: &Endpoint) -> bool {
    let found = set.workload_by_address(endpoint.address).map(Workload::key);
    found == endpoint.pod.as_ref().map(Pod::key)
}

fn connection_text(connection: &Connection) -> String {
    format!(
        "{} ({}) -> {} ({}) {}/{}",
        connection.source.display(),
        connection.source.address,
        connection.destination.display(),
        connection.destination.address,
        connection.protocol,
        connection.port
    )
}

/// Evaluates every connection under `set` (the suggestion and the observed
/// inventory).
pub fn self_check(set: &PolicySet, connections: &[Connection]) -> SelfCheck {
    let mut check = SelfCheck::default();
    for connection in connections {
        if !resolves_to(set, &connection.source) || !resolves_to(set, &connection.destination) {
            check.unchecked.push(connection_text(connection));
            continue;
        }
        let verdict = evaluate(
            set,
            &Flow {
                src: connection.source.address,
                dst: connection.destination.address,
                protocol: connection.protocol,
                port: connection.port,
            },
        );
        if verdict.allowed {
            check.allowed += 1;
        } else {
            check.denied.push(format!(
                "{}: {}; {}",
                connection_text(connection),
                verdict.egress.explanation,
                verdict.ingress.explanation
            ));
        }
    }
    check
}

/// A pair of workloads the suggestion allows on a port though no connection between
/// them was observed there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AlsoAllowed {
    pub source: String,
    pub destination: String,
    pub protocol: String,
    pub port: u16,
    /// The suggested rules that allow it.
    #[serde(rename = "allowedBy")]
    pub allowed_by: Vec<String>,
    /// Why: other pods of the same workloads were observed, or a selector matches
    /// pods nothing was observed from.
    pub note: String,
}

/// `(source, destination, port)` with each end as the workload (or address) a policy
/// names it by.
type PeerPair = (PeerRef, PeerRef, PortKey);

fn peer_ref(endpoint: &Endpoint) -> PeerRef {
    match endpoint.pod.as_ref().and_then(workload_of) {
        Some(workload) => PeerRef::Workload(workload),
        None => PeerRef::Address(endpoint.address),
    }
}

fn workload_peer(workload: &Workload) -> PeerRef {
    let pod = Pod {
        namespace: workload.namespace.clone(),
        name: workload.name.clone(),
        labels: workload
            .labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    };
    match workload_of(&pod) {
        Some(id) => PeerRef::Workload(id),
        None => PeerRef::Address(
            workload
                .addresses
                .first()
                .copied()
                .unwrap_or(IpAddr::from([0, 0, 0, 0])),
        ),
    }
}

/// What a verdict between two workloads depends on, beside the policies: namespace
/// and labels (selectors), address families (which addresses a flow uses), and, for
/// a workload holding an address a suggested ipBlock names, the workload itself.
/// Pairs of the same classes get the same verdict, so it is computed once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct VerdictClass {
    namespace: String,
    labels: crate::policy::Labels,
    families: (bool, bool),
    named_by_address: Option<String>,
}

fn verdict_class(workload: &Workload, suggestion: &Suggestion) -> VerdictClass {
    let named_by_address = suggestion
        .policies
        .iter()
        .flat_map(|policy| policy.ingress.iter().chain(&policy.egress))
        .flat_map(|rule| &rule.peers)
        .any(|peer| matches!(peer, PeerRef::Address(address) if workload.addresses.contains(address)));
    VerdictClass {
        namespace: workload.namespace.clone(),
        labels: workload.labels.clone(),
        families: (
            workload.addresses.iter().any(IpAddr::is_ipv4),
            workload.addresses.iter().any(IpAddr::is_ipv6),
        ),
        named_by_address: named_by_address.then(|| workload.key()),
    }
}

/// The rules allowing `source` to reach `destination` on `port`, or `None` when
/// denied (or the two share no address family).
fn rules_allowing(
    set: &PolicySet,
    source: &Workload,
    destination: &Workload,
    port: PortKey,
) -> Option<Vec<String>> {
    let endpoint = |w: &Workload| EndpointRef::Workload {
        namespace: w.namespace.clone(),
        name: w.name.clone(),
    };
    let flow = Flow::between(
        set,
        &endpoint(source),
        &endpoint(destination),
        port.protocol,
        port.port,
    )
    .ok()?;
    let verdict = evaluate(set, &flow);
    verdict.allowed.then(|| {
        [&verdict.egress, &verdict.ingress]
            .into_iter()
            .filter_map(|direction| match &direction.reason {
                VerdictReason::AllowedBy(rules) => Some(rules),
                _ => None,
            })
            .flatten()
            .map(ToString::to_string)
            .collect()
    })
}

/// Over every pair of `set`'s workloads one of which a suggested policy selects, on
/// every port a suggested rule names: the allowed pairs no connection was observed
/// for.
pub fn also_allowed(
    set: &PolicySet,
    suggestion: &Suggestion,
    connections: &[Connection],
) -> Vec<AlsoAllowed> {
    let ports: BTreeSet<PortKey> = suggestion
        .policies
        .iter()
        .flat_map(|policy| policy.ingress.iter().chain(&policy.egress))
        .flat_map(|rule| rule.ports.iter().copied())
        .collect();
    let port_of = |c: &Connection| PortKey {
        protocol: c.protocol,
        port: c.port,
    };
    let observed: BTreeSet<(String, String, PortKey)> = connections
        .iter()
        .map(|c| (c.source.display(), c.destination.display(), port_of(c)))
        .collect();
    let observed_workloads: BTreeSet<PeerPair> = connections
        .iter()
        .map(|c| (peer_ref(&c.source), peer_ref(&c.destination), port_of(c)))
        .collect();
    let selected = |workload: &Workload, direction| {
        set.policies_selecting(workload, direction).next().is_some()
    };
    // (workload, its key, selected for egress, for ingress, its class)
    let workloads: Vec<(&Workload, String, bool, bool, VerdictClass)> = set
        .workloads
        .iter()
        .filter(|w| !w.addresses.is_empty())
        .map(|w| {
            (
                w,
                w.key(),
                selected(w, PolicyDirection::Egress),
                selected(w, PolicyDirection::Ingress),
                verdict_class(w, suggestion),
            )
        })
        .collect();
    // (source class, destination class, port) -> the rules allowing it, if allowed.
    let mut verdicts: HashMap<(&VerdictClass, &VerdictClass, PortKey), Option<Vec<String>>> =
        HashMap::new();
    let mut found = Vec::new();
    for (source, source_key, source_selected, _, source_class) in &workloads {
        for (destination, destination_key, _, destination_selected, destination_class) in &workloads
        {
            if source_key == destination_key || !(*source_selected || *destination_selected) {
                continue;
            }
            for port in &ports {
                if observed.contains(&(source_key.clone(), destination_key.clone(), *port)) {
                    continue;
                }
                let allowed_by = verdicts
                    .entry((source_class, destination_class, *port))
                    .or_insert_with(|| rules_allowing(set, source, destination, *port));
                let Some(allowed_by) = allowed_by.clone() else {
                    continue;
                };
                let pair = (workload_peer(source), workload_peer(destination), *port);
                let note = if observed_workloads.contains(&pair) {
                    "other pods of the same workloads were observed on this port".to_owned()
                } else {
                    "nothing between these workloads was observed on this port: a selector matches more than the observed pods, or one end is not enforced".to_owned()
                };
                found.push(AlsoAllowed {
                    source: source_key.clone(),
                    destination: destination_key.clone(),
                    protocol: port.protocol.name().to_owned(),
                    port: port.port,
                    allowed_by,
                    note,
                });
            }
        }
    }
    found
}
