//! The compiler: a [`PolicySet`] becomes the content of the data path's maps
//! ([`DatapathState`]).
//!
//! Peers are reduced to identities so that policy entries grow with
//! endpoints x distinct (peer identity, port) pairs, not with rules x addresses:
//! - every workload address gets the identity of its (namespace, namespace labels, pod
//!   labels, set of ipBlocks containing the address, named ports egress rules use);
//!   workloads that agree on all of these share one identity;
//! - every distinct ipBlock prefix (cidr or except) gets the identity of the set of
//!   ipBlocks covering it, so that one longest-prefix match yields the right set.
//!
//! Each enforced workload gets an endpoint id; each rule selecting it becomes entries
//! (endpoint, peer identity or ANY, direction, protocol, port block) -> allow(rule id).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;
use microseg_common::endpoint::{
    ENDPOINT_FLAG_EGRESS_ENFORCED, ENDPOINT_FLAG_INGRESS_ENFORCED, EndpointInfo,
};
use microseg_common::identity::{IDENTITY_ANY, IDENTITY_FIRST_ALLOCATED, IDENTITY_WORLD};
use microseg_common::policy::{PolicyEntry, port_range_blocks};

use super::evaluate::RuleRef;
use super::model::{
    IpBlock, Labels, NamedPort, NamespaceScope, Peer, PolicyDirection, PolicySet, PortSpec,
    Protocol, Workload,
};
use crate::datapath::state::{DatapathState, PolicyMatch, StateCounts};

/// Rule ids as stored in policy entries. Id 0 is `RULE_ID_DEFAULT_DENY`; rules are
/// numbered from 1 in policy order, so ids are stable while the policies are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleTable {
    rules: Vec<RuleRef>,
}

impl RuleTable {
    pub fn get(&self, rule_id: u32) -> Option<&RuleRef> {
        let index = usize::try_from(rule_id).ok()?.checked_sub(1)?;
        self.rules.get(index)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// (rule id, rule) pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &RuleRef)> {
        self.rules
            .iter()
            .enumerate()
            .map(|(index, rule)| (rule_id_of(index), rule))
    }

    fn push(&mut self, rule: RuleRef) -> u32 {
        self.rules.push(rule);
        rule_id_of(self.rules.len() - 1)
    }
}

fn rule_id_of(index: usize) -> u32 {
    u32::try_from(index + 1).expect("fewer than 2^32 rules")
}

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityInfo {
    /// Workload addresses sharing labels, namespace and ipBlock membership.
    Workload {
        namespace: String,
        namespace_labels: Labels,
        labels: Labels,
        /// ipBlocks containing these addresses.
        ip_blocks: Vec<IpBlock>,
        /// Named ports that egress rules resolve on these workloads.
        named_ports: Vec<NamedPort>,
        /// `ns/name` of the workloads.
        members: Vec<String>,
    },
    /// Addresses outside the inventory covered by the same set of ipBlocks.
    Cidr {
        /// The prefixes (in `peer_prefixes`, or `peer_hosts` when full length).
        prefixes: Vec<IpNet>,
        ip_blocks: Vec<IpBlock>,
    },
}

/// Identity -> description, for `check`, events and debugging.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityTable {
    pub identities: BTreeMap<u32, IdentityInfo>,
}

impl IdentityTable {
    pub fn get(&self, identity: u32) -> Option<&IdentityInfo> {
        self.identities.get(&identity)
    }

    /// A one-line description of any identity, reserved ones included.
    pub fn describe(&self, identity: u32) -> String {
        match (identity, self.identities.get(&identity)) {
            (IDENTITY_ANY, _) => "any".to_string(),
            (IDENTITY_WORLD, _) => "world".to_string(),
            (_, Some(IdentityInfo::Workload { members, .. })) => {
                format!("identity {identity} (workloads {})", members.join(", "))
            }
            (
                _,
                Some(IdentityInfo::Cidr {
                    prefixes,
                    ip_blocks,
                }),
            ) => {
                let prefixes: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
                let blocks: Vec<String> = ip_blocks.iter().map(ToString::to_string).collect();
                format!(
                    "identity {identity} (prefixes {} in ipBlocks [{}])",
                    prefixes.join(", "),
                    blocks.join("; ")
                )
            }
            (_, None) => format!("unknown identity {identity}"),
        }
    }
}

/// An enforced workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledEndpoint {
    /// Index into `PolicySet::workloads`.
    pub workload_index: usize,
    /// `ns/name`.
    pub workload: String,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
}

/// The compiler's output: map content plus the tables that name what ids mean.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub state: DatapathState,
    pub rules: RuleTable,
    pub identities: IdentityTable,
    /// Endpoint id -> workload.
    pub endpoints: BTreeMap<u32, CompiledEndpoint>,
}

/// Sizes of the compiled state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileStats {
    pub maps: StateCounts,
    pub workload_identities: usize,
    pub cidr_identities: usize,
    pub rules: usize,
    pub enforced_workloads: usize,
}

impl fmt::Display for CompileStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "endpoints {} ({} workloads), peer_hosts {}, peer_prefixes {}, policy {}, identities {} workload + {} cidr, rules {}",
            self.maps.endpoints,
            self.enforced_workloads,
            self.maps.peer_hosts,
            self.maps.peer_prefixes,
            self.maps.policy,
            self.workload_identities,
            self.cidr_identities,
            self.rules
        )
    }
}

impl Compiled {
    pub fn stats(&self) -> CompileStats {
        let workload_identities = self
            .identities
            .identities
            .values()
            .filter(|info| matches!(info, IdentityInfo::Workload { .. }))
            .count();
        CompileStats {
            maps: self.state.counts(),
            workload_identities,
            cidr_identities: self.identities.identities.len() - workload_identities,
            rules: self.rules.len(),
            enforced_workloads: self.endpoints.len(),
        }
    }
}

/// Identity key of a workload address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct WorkloadIdentityKey {
    namespace: String,
    namespace_labels: Labels,
    labels: Labels,
    blocks: Vec<usize>,
    named_ports: Vec<NamedPort>,
}

/// Policy entry tail: (peer identity, protocol, port block).
type EntryTail = (u32, Option<u8>, Option<(u16, u8)>);

/// A rule reduced to what does not depend on the endpoint it applies to.
struct CompiledRule {
    rule_id: u32,
    entries: Vec<EntryTail>,
    /// Ingress named ports (name, protocol): they resolve on the endpoint itself, for
    /// each of `peer_identities`.
    endpoint_named_ports: Vec<(String, Protocol)>,
    peer_identities: Vec<u32>,
}

struct IdentityAllocator {
    next: u32,
}

impl IdentityAllocator {
    fn allocate(&mut self) -> u32 {
        let identity = self.next;
        self.next += 1;
        identity
    }
}

/// IPv4-mapped IPv6 space, where the data path keeps IPv4 addresses.
fn ipv4_mapped_range() -> IpNet {
    "::ffff:0:0/96".parse().expect("constant prefix")
}

/// Compiles the policies and inventory of `set` into map content.
pub fn compile(set: &PolicySet) -> Compiled {
    let mut compiled = Compiled::default();
    let mut allocator = IdentityAllocator {
        next: IDENTITY_FIRST_ALLOCATED,
    };

    // Distinct ipBlocks and the named ports egress rules use.
    let mut block_set: BTreeSet<IpBlock> = BTreeSet::new();
    let mut egress_named: BTreeSet<(String, Protocol)> = BTreeSet::new();
    for policy in &set.policies {
        for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
            for rule in policy.rules(direction).unwrap_or_default() {
                for peer in rule.peers.iter().flatten() {
                    if let Peer::IpBlock(block) = peer {
                        block_set.insert(block.clone());
                    }
                }
                if direction == PolicyDirection::Egress {
                    for port in rule.ports.iter().flatten() {
                        if let PortSpec::Named(name) = &port.port {
                            egress_named.insert((name.clone(), port.protocol));
                        }
                    }
                }
            }
        }
    }
    let blocks: Vec<IpBlock> = block_set.into_iter().collect();

    // Workload identities.
    let mut workload_identity_by_key: BTreeMap<WorkloadIdentityKey, u32> = BTreeMap::new();
    // identity -> key, for peer matching below.
    let mut workload_identities: Vec<(u32, WorkloadIdentityKey)> = Vec::new();
    for workload in &set.workloads {
        let named_ports: Vec<NamedPort> = workload
            .ports
            .iter()
            .filter(|port| egress_named.contains(&(port.name.clone(), port.protocol)))
            .cloned()
            .collect();
        for address in &workload.addresses {
            let key = WorkloadIdentityKey {
                namespace: workload.namespace.clone(),
                namespace_labels: set.namespace_labels(&workload.namespace).clone(),
                labels: workload.labels.clone(),
                blocks: (0..blocks.len())
                    .filter(|&index| blocks[index].contains(*address))
                    .collect(),
                named_ports: named_ports.clone(),
            };
            let identity = match workload_identity_by_key.get(&key) {
                Some(identity) => *identity,
                None => {
                    let identity = allocator.allocate();
                    workload_identity_by_key.insert(key.clone(), identity);
                    workload_identities.push((identity, key.clone()));
                    compiled.identities.identities.insert(
                        identity,
                        IdentityInfo::Workload {
                            namespace: key.namespace.clone(),
                            namespace_labels: key.namespace_labels.clone(),
                            labels: key.labels.clone(),
                            ip_blocks: key
                                .blocks
                                .iter()
                                .map(|&index| blocks[index].clone())
                                .collect(),
                            named_ports: key.named_ports.clone(),
                            members: Vec::new(),
                        },
                    );
                    identity
                }
            };
            if let Some(IdentityInfo::Workload { members, .. }) =
                compiled.identities.identities.get_mut(&identity)
                && members.last() != Some(&workload.key())
            {
                members.push(workload.key());
            }
            compiled.state.peer_hosts.insert(*address, identity);
        }
    }

    // CIDR identities: each distinct prefix gets the set of ipBlocks covering all of it.
    let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
    for block in &blocks {
        prefixes.insert(block.cidr);
        prefixes.extend(block.except.iter().copied());
    }
    // The data path keeps IPv4 as IPv4-mapped IPv6, so an IPv6 prefix covering that
    // range (::/0 ...) would catch IPv4 traffic. An IPv4 /0 always wins over it.
    let mapped = ipv4_mapped_range();
    if prefixes.iter().any(|prefix| prefix.contains(&mapped)) {
        prefixes.insert("0.0.0.0/0".parse().expect("constant prefix"));
    }
    let mut cidr_identity_by_set: BTreeMap<Vec<usize>, u32> = BTreeMap::new();
    let mut cidr_identities: Vec<(u32, Vec<usize>)> = Vec::new();
    for prefix in &prefixes {
        let covering: Vec<usize> = (0..blocks.len())
            .filter(|&index| {
                let block = &blocks[index];
                block.cidr.contains(prefix)
                    && !block.except.iter().any(|except| except.contains(prefix))
            })
            .collect();
        let identity = if covering.is_empty() {
            IDENTITY_WORLD
        } else {
            match cidr_identity_by_set.get(&covering) {
                Some(identity) => *identity,
                None => {
                    let identity = allocator.allocate();
                    cidr_identity_by_set.insert(covering.clone(), identity);
                    cidr_identities.push((identity, covering.clone()));
                    compiled.identities.identities.insert(
                        identity,
                        IdentityInfo::Cidr {
                            prefixes: Vec::new(),
                            ip_blocks: covering
                                .iter()
                                .map(|&index| blocks[index].clone())
                                .collect(),
                        },
                    );
                    identity
                }
            }
        };
        if let Some(IdentityInfo::Cidr { prefixes, .. }) =
            compiled.identities.identities.get_mut(&identity)
        {
            prefixes.push(*prefix);
        }
        if prefix.prefix_len() == prefix.max_prefix_len() {
            // A workload's own identity already accounts for its ipBlocks.
            if set.workload_by_address(prefix.addr()).is_none() {
                compiled.state.peer_hosts.insert(prefix.addr(), identity);
            }
        } else {
            compiled.state.peer_prefixes.insert(*prefix, identity);
        }
    }

    // Peer -> identities.
    let block_index: BTreeMap<&IpBlock, usize> = blocks
        .iter()
        .enumerate()
        .map(|(index, block)| (block, index))
        .collect();
    // Workload identities by namespace, so that a peer in one namespace (the usual
    // podSelector) is matched against that namespace's identities only.
    let mut identities_by_namespace: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, (_, key)) in workload_identities.iter().enumerate() {
        identities_by_namespace
            .entry(key.namespace.as_str())
            .or_default()
            .push(index);
    }
    let peer_identities = |peer: &Peer| -> Vec<u32> {
        match peer {
            Peer::Workloads {
                namespaces: NamespaceScope::Named(name),
                pods,
            } => identities_by_namespace
                .get(name.as_str())
                .into_iter()
                .flatten()
                .map(|&index| &workload_identities[index])
                .filter(|(_, key)| pods.matches(&key.labels))
                .map(|(identity, _)| *identity)
                .collect(),
            Peer::Workloads {
                namespaces: NamespaceScope::Selected(selector),
                pods,
            } => identities_by_namespace
                .values()
                .filter(|indexes| {
                    let (_, first) = &workload_identities[indexes[0]];
                    selector.matches(&first.namespace_labels)
                })
                .flatten()
                .map(|&index| &workload_identities[index])
                .filter(|(_, key)| pods.matches(&key.labels))
                .map(|(identity, _)| *identity)
                .collect(),
            Peer::IpBlock(block) => {
                let index = block_index[block];
                workload_identities
                    .iter()
                    .filter(|(_, key)| key.blocks.contains(&index))
                    .map(|(identity, _)| *identity)
                    .chain(
                        cidr_identities
                            .iter()
                            .filter(|(_, covering)| covering.contains(&index))
                            .map(|(identity, _)| *identity),
                    )
                    .collect()
            }
        }
    };

    // Rules, reduced once each.
    let mut compiled_rules: BTreeMap<(usize, PolicyDirection), Vec<CompiledRule>> = BTreeMap::new();
    for (policy_index, policy) in set.policies.iter().enumerate() {
        for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
            let Some(rules) = policy.rules(direction) else {
                continue;
            };
            let mut reduced = Vec::with_capacity(rules.len());
            for (rule_index, rule) in rules.iter().enumerate() {
                let rule_id = compiled.rules.push(RuleRef {
                    policy_namespace: policy.namespace.clone(),
                    policy_name: policy.name.clone(),
                    direction,
                    rule_index,
                });
                let identities: Vec<u32> = match &rule.peers {
                    None => vec![IDENTITY_ANY],
                    Some(peers) => {
                        let set: BTreeSet<u32> = peers.iter().flat_map(&peer_identities).collect();
                        set.into_iter().collect()
                    }
                };
                let mut entries: BTreeSet<EntryTail> = BTreeSet::new();
                let mut endpoint_named_ports = Vec::new();
                match &rule.ports {
                    None => {
                        entries.extend(identities.iter().map(|&identity| (identity, None, None)));
                    }
                    Some(ports) => {
                        for port in ports {
                            let protocol = Some(port.protocol.number());
                            match &port.port {
                                PortSpec::Any => {
                                    entries.extend(
                                        identities
                                            .iter()
                                            .map(|&identity| (identity, protocol, None)),
                                    );
                                }
                                PortSpec::Range { first, last } => {
                                    port_range_blocks(*first, *last, |start, bits| {
                                        entries.extend(identities.iter().map(|&identity| {
                                            (identity, protocol, Some((start, bits)))
                                        }));
                                    });
                                }
                                PortSpec::Named(name) => match direction {
                                    PolicyDirection::Ingress => {
                                        endpoint_named_ports.push((name.clone(), port.protocol));
                                    }
                                    PolicyDirection::Egress => {
                                        // Resolved on each destination identity; a rule
                                        // without peers reaches every workload identity.
                                        for (identity, key) in &workload_identities {
                                            let peer_ok = identities.contains(identity)
                                                || identities.contains(&IDENTITY_ANY);
                                            if !peer_ok {
                                                continue;
                                            }
                                            for named in &key.named_ports {
                                                if named.name == *name
                                                    && named.protocol == port.protocol
                                                {
                                                    entries.insert((
                                                        *identity,
                                                        protocol,
                                                        Some((named.port, 16)),
                                                    ));
                                                }
                                            }
                                        }
                                    }
                                },
                            }
                        }
                    }
                }
                reduced.push(CompiledRule {
                    rule_id,
                    entries: entries.into_iter().collect(),
                    endpoint_named_ports,
                    peer_identities: identities,
                });
            }
            compiled_rules.insert((policy_index, direction), reduced);
        }
    }

    // Endpoints and their entries.
    let mut next_endpoint_id = 1u32;
    for (workload_index, workload) in set.workloads.iter().enumerate() {
        if workload.addresses.is_empty() {
            continue;
        }
        let in_namespace = set.policy_range(&workload.namespace);
        let selecting = |direction| -> Vec<usize> {
            in_namespace
                .clone()
                .filter(|&index| set.policy_selects(&set.policies[index], workload, direction))
                .collect()
        };
        let ingress = selecting(PolicyDirection::Ingress);
        let egress = selecting(PolicyDirection::Egress);
        if ingress.is_empty() && egress.is_empty() {
            continue;
        }
        let endpoint_id = next_endpoint_id;
        next_endpoint_id += 1;
        let mut flags = 0;
        if !ingress.is_empty() {
            flags |= ENDPOINT_FLAG_INGRESS_ENFORCED;
        }
        if !egress.is_empty() {
            flags |= ENDPOINT_FLAG_EGRESS_ENFORCED;
        }
        for address in &workload.addresses {
            compiled
                .state
                .endpoints
                .insert(*address, EndpointInfo::new(endpoint_id, flags));
        }
        compiled.endpoints.insert(
            endpoint_id,
            CompiledEndpoint {
                workload_index,
                workload: workload.key(),
                ingress_enforced: !ingress.is_empty(),
                egress_enforced: !egress.is_empty(),
            },
        );
        for (direction, policies) in [
            (PolicyDirection::Ingress, ingress),
            (PolicyDirection::Egress, egress),
        ] {
            for policy_index in policies {
                for rule in &compiled_rules[&(policy_index, direction)] {
                    insert_rule_entries(
                        &mut compiled.state,
                        endpoint_id,
                        direction,
                        rule,
                        workload,
                    );
                }
            }
        }
    }
    compiled
}

fn insert_rule_entries(
    state: &mut DatapathState,
    endpoint_id: u32,
    direction: PolicyDirection,
    rule: &CompiledRule,
    workload: &Workload,
) {
    let mut insert = |(identity, protocol, port_block): EntryTail| {
        state
            .policy
            .entry(PolicyMatch {
                endpoint_id,
                identity,
                direction: direction.datapath(),
                protocol,
                port_block,
            })
            .or_insert(PolicyEntry::allow(rule.rule_id));
    };
    for entry in &rule.entries {
        insert(*entry);
    }
    for (name, protocol) in &rule.endpoint_named_ports {
        for port in workload.resolve_named_port(name, *protocol) {
            for identity in &rule.peer_identities {
                insert((*identity, Some(protocol.number()), Some((port, 16))));
            }
        }
    }
}
