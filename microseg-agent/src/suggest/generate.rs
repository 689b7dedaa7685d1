//! From observed connections to one NetworkPolicy per workload: for each workload
//! seen as a pod, its ingress from the peers that connected to it and its egress to
//! the peers it connected to, on exactly the ports observed.
//!
//! Peers are workloads (by their identifying labels, in their namespace) or, outside
//! the inventory, single addresses. Rules are merged: peers observed on the same
//! ports share one rule, and one peer's ports are one rule. DNS (port 53, UDP or TCP)
//! gets its own rule on both UDP and TCP 53, since resolvers fall back to TCP for
//! large answers.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use chrono::{DateTime, Utc};

use super::{
    observed::{Connection, Endpoint, Pod},
    workload::{SelectorChoice, WorkloadId, dns_name, workload_selector},
};
use crate::policy::{PolicyDirection, Protocol};

/// A protocol and a destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub protocol: Protocol,
    pub port: u16,
}

impl PortKey {
    pub fn is_dns(self) -> bool {
        self.port == 53 && matches!(self.protocol, Protocol::Udp | Protocol::Tcp)
    }
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol, self.port)
    }
}

/// The ports of a DNS rule.
pub const DNS_PORTS: [PortKey; 2] = [
    PortKey {
        protocol: Protocol::Udp,
        port: 53,
    },
    PortKey {
        protocol: Protocol::Tcp,
        port: 53,
    },
];

/// The other end of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerRef {
    Workload(WorkloadId),
    /// An address outside the inventory (or of a pod without labels).
    Address(IpAddr),
}

impl fmt::Display for PeerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerRef::Workload(workload) => write!(f, "{workload}"),
            PeerRef::Address(address) => write!(f, "{address}"),
        }
    }
}

/// What was observed between a workload and one peer on one port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub connections: usize,
    /// The peer's pods (or address) that took part.
    pub peer_pods: BTreeSet<String>,
    pub first_seen: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
}

impl Tally {
    fn add(&mut self, connection: &Connection, peer: &Endpoint) {
        self.connections += 1;
        self.peer_pods.insert(peer.display());
        if let Some(first) = connection.first_seen {
            self.first_seen = Some(self.first_seen.map_or(first, |known| known.min(first)));
        }
        if let Some(last) = connection.last_seen {
            self.last_seen = Some(self.last_seen.map_or(last, |known| known.max(last)));
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.connections += other.connections;
        self.peer_pods.extend(other.peer_pods.iter().cloned());
        self.first_seen = match (self.first_seen, other.first_seen) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_seen = self.last_seen.max(other.last_seen);
    }
}

/// Why one peer is in a rule: what was observed with it on the rule's ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    pub peer: PeerRef,
    /// The ports it was observed on (a DNS rule allows both DNS ports whichever was
    /// seen).
    pub observed_ports: Vec<PortKey>,
    pub tally: Tally,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuggestedRule {
    pub peers: Vec<PeerRef>,
    pub ports: Vec<PortKey>,
    /// The DNS rule ([`DNS_PORTS`]).
    pub dns: bool,
    pub evidence: Vec<Evidence>,
}

/// One workload's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuggestedPolicy {
    /// `<workload>-suggested`, unique in the namespace.
    pub name: String,
    pub workload: WorkloadId,
    /// The workload's pods that were observed.
    pub pods: BTreeSet<String>,
    pub ingress: Vec<SuggestedRule>,
    pub egress: Vec<SuggestedRule>,
}

impl SuggestedPolicy {
    pub fn rules(&self, direction: PolicyDirection) -> &[SuggestedRule] {
        match direction {
            PolicyDirection::Ingress => &self.ingress,
            PolicyDirection::Egress => &self.egress,
        }
    }
}

/// The policies, and what the user should know about how they were chosen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suggestion {
    pub policies: Vec<SuggestedPolicy>,
    pub warnings: Vec<String>,
}

/// Peer -> port -> tally, for one workload and direction.
type PeerTallies = BTreeMap<PeerRef, BTreeMap<PortKey, Tally>>;

/// The workload of a pod, when a selector can single it out.
pub fn workload_of(pod: &Pod) -> Option<WorkloadId> {
    let (selector, choice) = workload_selector(&pod.labels);
    (choice != SelectorChoice::Unlabelled).then(|| WorkloadId {
        namespace: pod.namespace.clone(),
        selector,
    })
}

/// How a policy names an endpoint as its peer.
fn peer_of(endpoint: &Endpoint) -> PeerRef {
    match endpoint.pod.as_ref().and_then(workload_of) {
        Some(workload) => PeerRef::Workload(workload),
        None => PeerRef::Address(endpoint.address),
    }
}

/// Suggests one policy per workload seen as a pod in `connections` (only workloads
/// of `namespace`, if given).
pub fn suggest_policies(connections: &[Connection], namespace: Option<&str>) -> Suggestion {
    let mut warnings = BTreeSet::new();
    // Subjects: workload -> (observed pods, per direction peer tallies).
    let mut subjects: BTreeMap<WorkloadId, (BTreeSet<String>, PeerTallies, PeerTallies)> =
        BTreeMap::new();
    for connection in connections {
        for pod in [&connection.source.pod, &connection.destination.pod]
            .into_iter()
            .flatten()
        {
            let (_, choice) = workload_selector(&pod.labels);
            match choice {
                SelectorChoice::PerPodFallback => {
                    warnings.insert(format!(
                        "{} has only per-pod or per-revision labels ({}): its workload is selected by them, which a rollout changes; give it a stable label such as app.kubernetes.io/name",
                        pod.key(),
                        labels_text(&pod.labels)
                    ));
                }
                SelectorChoice::Unlabelled => {
                    warnings.insert(format!(
                        "{} has no labels: no policy can select it alone, so none is suggested for it, and its peers name it by address",
                        pod.key()
                    ));
                }
                SelectorChoice::Preferred | SelectorChoice::Stable => {}
            }
        }
        let port = PortKey {
            protocol: connection.protocol,
            port: connection.port,
        };
        let sides = [
            (
                &connection.source,
                &connection.destination,
                PolicyDirection::Egress,
            ),
            (
                &connection.destination,
                &connection.source,
                PolicyDirection::Ingress,
            ),
        ];
        for (local, peer, direction) in sides {
            let Some(pod) = &local.pod else { continue };
            if namespace.is_some_and(|namespace| pod.namespace != namespace) {
                continue;
            }
            let Some(workload) = workload_of(pod) else {
                continue;
            };
            let entry = subjects.entry(workload).or_default();
            entry.0.insert(pod.name.clone());
            let tallies = match direction {
                PolicyDirection::Ingress => &mut entry.1,
                PolicyDirection::Egress => &mut entry.2,
            };
            tallies
                .entry(peer_of(peer))
                .or_default()
                .entry(port)
                .or_default()
                .add(connection, peer);
        }
    }
    let mut names: BTreeSet<(String, String)> = BTreeSet::new();
    let mut policies: Vec<SuggestedPolicy> = subjects
        .into_iter()
        .map(|(workload, (pods, ingress, egress))| {
            let base = match workload_selector(&workload.selector).1 {
                // Per-pod label values make poor names: the first pod's name.
                SelectorChoice::PerPodFallback => pods.iter().next().cloned().unwrap_or_default(),
                _ => workload.base_name(),
            };
            let base = dns_name(&base, 200);
            let mut name = format!("{base}-suggested");
            let mut counter = 2;
            while !names.insert((workload.namespace.clone(), name.clone())) {
                name = format!("{base}-suggested-{counter}");
                counter += 1;
            }
            SuggestedPolicy {
                name,
                pods,
                ingress: rules(&ingress),
                egress: rules(&egress),
                workload,
            }
        })
        .collect();
    policies
        .sort_by(|a, b| (&a.workload.namespace, &a.name).cmp(&(&b.workload.namespace, &b.name)));
    Suggestion {
        policies,
        warnings: warnings.into_iter().collect(),
    }
}

/// `key=value,...`.
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One direction's rules: the DNS rule first (if DNS was seen), then one rule per
/// distinct set of ports, with every peer observed on exactly those ports.
fn rules(tallies: &PeerTallies) -> Vec<SuggestedRule> {
    let mut dns: Vec<Evidence> = Vec::new();
    let mut by_ports: BTreeMap<Vec<PortKey>, Vec<Evidence>> = BTreeMap::new();
    for (peer, ports) in tallies {
        let evidence = |selected: Vec<(&PortKey, &Tally)>| {
            let mut tally = Tally::default();
            for (_, each) in &selected {
                tally.merge(each);
            }
            Evidence {
                peer: peer.clone(),
                observed_ports: selected.iter().map(|(port, _)| **port).collect(),
                tally,
            }
        };
        let (dns_ports, other_ports): (Vec<_>, Vec<_>) =
            ports.iter().partition(|(port, _)| port.is_dns());
        if !dns_ports.is_empty() {
            dns.push(evidence(dns_ports));
        }
        if !other_ports.is_empty() {
            let key: Vec<PortKey> = other_ports.iter().map(|(port, _)| **port).collect();
            by_ports.entry(key).or_default().push(evidence(other_ports));
        }
    }
    let mut rules = Vec::new();
    if !dns.is_empty() {
        rules.push(SuggestedRule {
            peers: dns.iter().map(|e| e.peer.clone()).collect(),
            ports: DNS_PORTS.to_vec(),
            dns: true,
            evidence: dns,
        });
    }
    for (ports, evidence) in by_ports {
        rules.push(SuggestedRule {
            peers: evidence.iter().map(|e| e.peer.clone()).collect(),
            ports,
            dns: false,
            evidence,
        });
    }
    rules
}
