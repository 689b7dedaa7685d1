//! Inventory queries on a [`PolicySet`]: finding workloads by name or address, and
//! matching policies and peers against them. Shared by the evaluator and the compiler
//! so both read selectors the same way.

use std::net::IpAddr;
use std::str::FromStr;

use super::model::{
    ClusterPolicy, LabelSelector, Labels, NamespaceScope, Peer, Policy, PolicyDirection, PolicySet,
    Workload,
};

/// A flow endpoint as a user names it: `namespace/name` or a bare IP address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EndpointRef {
    Workload { namespace: String, name: String },
    Address(IpAddr),
}

impl FromStr for EndpointRef {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(address) = IpAddr::from_str(text) {
            return Ok(EndpointRef::Address(address));
        }
        match text.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(EndpointRef::Workload {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!(
                "{text:?} is neither an IP address nor namespace/name"
            )),
        }
    }
}

impl std::fmt::Display for EndpointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointRef::Workload { namespace, name } => write!(f, "{namespace}/{name}"),
            EndpointRef::Address(address) => write!(f, "{address}"),
        }
    }
}

impl PolicySet {
    /// Labels of a namespace (empty if unknown).
    pub fn namespace_labels(&self, namespace: &str) -> &Labels {
        static EMPTY: Labels = Labels::new();
        self.namespaces
            .get(namespace)
            .map_or(&EMPTY, |namespace| &namespace.labels)
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .find(namespace, name)
            .and_then(|slot| self.workloads.get(slot))
    }

    /// The workload `namespace/name`.
    pub fn workload_by_key(&self, key: &str) -> Option<&Workload> {
        let (namespace, name) = key.split_once('/')?;
        self.workload(namespace, name)
    }

    /// The NetworkPolicy `namespace/name`.
    pub fn policy(&self, namespace: &str, name: &str) -> Option<&Policy> {
        self.policies
            .binary_search_by(|policy| {
                (policy.namespace.as_str(), policy.name.as_str()).cmp(&(namespace, name))
            })
            .ok()
            .map(|index| &*self.policies[index])
    }

    /// Slot in `workloads` of the workload owning `address`.
    pub fn workload_index_by_address(&self, address: IpAddr) -> Option<usize> {
        self.address_index.get(&address).copied()
    }

    pub fn workload_by_address(&self, address: IpAddr) -> Option<&Workload> {
        self.workload_index_by_address(address)
            .map(|index| &self.workloads[index])
    }

    /// Whether `policy` selects `workload` for `direction` (same namespace, podSelector
    /// matches, and the policy has that policy type).
    pub fn policy_selects(
        &self,
        policy: &Policy,
        workload: &Workload,
        direction: PolicyDirection,
    ) -> bool {
        policy.rules(direction).is_some()
            && policy.namespace == workload.namespace
            && policy.pod_selector.matches(&workload.labels)
    }

    /// Whether a ClusterNetworkPolicy's subject is `workload` and the policy has rules
    /// for `direction` (a policy without rules for a direction does not affect it).
    pub fn cluster_policy_selects(
        &self,
        policy: &ClusterPolicy,
        workload: &Workload,
        direction: PolicyDirection,
    ) -> bool {
        !policy.rules(direction).is_empty()
            && policy
                .subject
                .namespaces
                .matches(self.namespace_labels(&workload.namespace))
            && policy.subject.pods.matches(&workload.labels)
    }

    /// ClusterNetworkPolicies selecting `workload` for `direction`, in evaluation
    /// order (tier, priority, name).
    pub fn cluster_policies_selecting<'a>(
        &'a self,
        workload: &'a Workload,
        direction: PolicyDirection,
    ) -> impl Iterator<Item = &'a ClusterPolicy> + 'a {
        self.cluster_policies
            .iter()
            .map(|policy| &**policy)
            .filter(move |policy| self.cluster_policy_selects(policy, workload, direction))
    }

    /// Whether `address` is an address of a Node whose labels `selector` matches.
    pub fn node_matches(&self, selector: &LabelSelector, address: IpAddr) -> bool {
        self.nodes
            .iter()
            .any(|node| node.addresses.contains(&address) && selector.matches(&node.labels))
    }

    /// Policies selecting `workload` for `direction`, in set order.
    pub fn policies_selecting<'a>(
        &'a self,
        workload: &'a Workload,
        direction: PolicyDirection,
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        let range = self.policy_range(&workload.namespace);
        self.policies[range]
            .iter()
            .map(|policy| &**policy)
            .filter(move |policy| self.policy_selects(policy, workload, direction))
    }

    /// Indexes into `policies` of the policies of `namespace`: policies are sorted
    /// by namespace, so they are one run, found by binary search (a policy only ever
    /// selects workloads of its own namespace).
    pub fn policy_range(&self, namespace: &str) -> std::ops::Range<usize> {
        let start = self
            .policies
            .partition_point(|policy| policy.namespace.as_str() < namespace);
        let end = self
            .policies
            .partition_point(|policy| policy.namespace.as_str() <= namespace);
        start..end
    }

    /// Whether a workload peer (pod and namespace selectors) matches `workload`.
    pub fn workload_peer_matches(
        &self,
        namespaces: &NamespaceScope,
        pods: &super::model::LabelSelector,
        workload: &Workload,
    ) -> bool {
        let namespace_ok = match namespaces {
            NamespaceScope::Named(name) => *name == workload.namespace,
            NamespaceScope::Selected(selector) => {
                selector.matches(self.namespace_labels(&workload.namespace))
            }
        };
        namespace_ok && pods.matches(&workload.labels)
    }

    /// Whether `peer` matches the remote end at `address` (owned by `workload`, if
    /// any). ipBlocks match workload addresses too, as the upstream e2e tests expect.
    pub fn peer_matches(&self, peer: &Peer, address: IpAddr, workload: Option<&Workload>) -> bool {
        match peer {
            Peer::IpBlock(block) => block.contains(address),
            Peer::Nodes(selector) => self.node_matches(selector, address),
            Peer::Workloads { namespaces, pods } => workload
                .is_some_and(|workload| self.workload_peer_matches(namespaces, pods, workload)),
        }
    }

    /// Addresses to use for a flow between two named endpoints: the same family on both
    /// sides, IPv4 preferred.
    pub fn resolve_pair(
        &self,
        from: &EndpointRef,
        to: &EndpointRef,
    ) -> Result<(IpAddr, IpAddr), String> {
        let candidates = |endpoint: &EndpointRef| -> Result<Vec<IpAddr>, String> {
            match endpoint {
                EndpointRef::Address(address) => Ok(vec![*address]),
                EndpointRef::Workload { namespace, name } => {
                    let workload = self
                        .workload(namespace, name)
                        .ok_or_else(|| format!("no workload {namespace}/{name}"))?;
                    if workload.addresses.is_empty() {
                        return Err(format!("workload {namespace}/{name} has no address"));
                    }
                    Ok(workload.addresses.clone())
                }
            }
        };
        let sources = candidates(from)?;
        let destinations = candidates(to)?;
        for want_v4 in [true, false] {
            let source = sources.iter().find(|address| address.is_ipv4() == want_v4);
            let destination = destinations
                .iter()
                .find(|address| address.is_ipv4() == want_v4);
            if let (Some(source), Some(destination)) = (source, destination) {
                return Ok((*source, *destination));
            }
        }
        Err(format!("{from} and {to} have no address family in common"))
    }
}
