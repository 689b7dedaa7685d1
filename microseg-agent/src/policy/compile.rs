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
//!
//! Ids stay with what they number from one compile to the next ([`Compiler`],
//! `numbering`), so that a changed pod or policy changes only its own entries.
//! Selectors are matched through label indexes (`label_index`), so a compile costs
//! about the size of its output, not policies x workloads.

mod hit_slots;
mod label_index;
mod numbering;
mod tiers;

use std::collections::{BTreeMap, BTreeSet};

use foldhash::{HashMap, HashMapExt};
use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;
use microseg_common::endpoint::{
    ENDPOINT_FLAG_EGRESS_DEFAULT_ALLOW, ENDPOINT_FLAG_EGRESS_ENFORCED,
    ENDPOINT_FLAG_INGRESS_DEFAULT_ALLOW, ENDPOINT_FLAG_INGRESS_ENFORCED, EndpointInfo,
};
use microseg_common::identity::{IDENTITY_ANY, IDENTITY_WORLD};
use microseg_common::policy::{PolicyEntry, port_range_blocks};

use super::evaluate::RuleRef;
use super::model::{
    IpBlock, LabelSelector, Labels, NamedPort, NamespaceScope, Peer, PolicyDirection, PolicySet,
    PortRule, PortSpec, Protocol, RuleAction, Workload,
};
use crate::datapath::state::{DatapathState, PolicyMatch, StateCounts};
pub use hit_slots::{HitSlotOwner, HitSlotTable, HitSlots};
use label_index::LabelIndex;
pub use numbering::Numbering;
use numbering::NumberingPass;
pub use numbering::WorkloadIdentityKey;

/// Rule ids as stored in policy entries. Id 0 is `RULE_ID_DEFAULT_DENY`; a rule keeps
/// its id from one compile to the next while its policy exists (see [`Numbering`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleTable {
    rules: BTreeMap<u32, RuleRef>,
}

impl RuleTable {
    pub fn get(&self, rule_id: u32) -> Option<&RuleRef> {
        self.rules.get(&rule_id)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// (rule id, rule) pairs, by id.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &RuleRef)> {
        self.rules.iter().map(|(id, rule)| (*id, rule))
    }
}

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityInfo {
    /// Workload addresses sharing namespace, labels, ipBlock membership and named
    /// ports.
    Workload {
        /// What they share (the key the id is kept by from one compile to the next).
        key: Arc<WorkloadIdentityKey>,
        /// The workloads, as indexes into the compiled set's `workloads`.
        members: Vec<usize>,
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

    /// A one-line description of any identity, reserved ones included; `set` is the
    /// policy set the table was compiled from.
    pub fn describe(&self, identity: u32, set: &PolicySet) -> String {
        match (identity, self.identities.get(&identity)) {
            (IDENTITY_ANY, _) => "any".to_string(),
            (IDENTITY_WORLD, _) => "world".to_string(),
            (_, Some(IdentityInfo::Workload { members, .. })) => {
                let members: Vec<String> = members
                    .iter()
                    .filter_map(|&index| set.workloads.get(index).map(Workload::key))
                    .collect();
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
    /// Where each rule's and default deny's hits are counted.
    pub hit_slots: HitSlotTable,
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

/// What a workload identity stands for, by reference into the set: namespace, labels,
/// ipBlocks (indexes) containing the address, named ports egress rules resolve on it.
type IdentityView<'a> = (&'a str, &'a Labels, Vec<usize>, Vec<&'a NamedPort>);

/// A workload identity while compiling: what it stands for, by reference into the set.
struct WorkloadIdentity<'a> {
    id: u32,
    key: Arc<WorkloadIdentityKey>,
    namespace: &'a str,
    labels: &'a Labels,
    /// Indexes into the compile's distinct ipBlocks.
    blocks: Vec<usize>,
    named_ports: Vec<&'a NamedPort>,
    /// Indexes into `PolicySet::workloads`.
    members: Vec<usize>,
}

/// IPv4-mapped IPv6 space, where the data path keeps IPv4 addresses.
fn ipv4_mapped_range() -> IpNet {
    "::ffff:0:0/96".parse().expect("constant prefix")
}

/// Compiles policy sets one after another, keeping ids stable between them (see
/// [`Numbering`]): the agent keeps one, so that an update's diff holds only the map
/// entries the change affects.
#[derive(Clone, Debug, Default)]
pub struct Compiler {
    numbering: Numbering,
    hit_slots: HitSlots,
    enforcing_node: Option<String>,
}

impl Compiler {
    /// A compiler for the agent of Kubernetes node `node`: only workloads on that
    /// node (and workloads that are not pods) become endpoints; pods of other nodes
    /// are peers only (identities), since their own nodes' agents enforce them.
    /// A connection between two nodes is judged at both ends: the source's egress
    /// on the source's node, the destination's ingress on the destination's, and
    /// each node holds policy entries for its own pods alone.
    pub fn enforcing_node(node: impl Into<String>) -> Self {
        Self {
            enforcing_node: Some(node.into()),
            ..Self::default()
        }
    }

    pub fn compile(&mut self, set: &PolicySet) -> Compiled {
        let mut numbering = self.numbering.start();
        let mut compiled = compile_numbered(set, &mut numbering, self.enforcing_node.as_deref());
        self.numbering = numbering.finish();
        self.hit_slots.assign(&mut compiled);
        compiled
    }

    pub fn numbering(&self) -> &Numbering {
        &self.numbering
    }
}

/// Compiles the policies and inventory of `set` into map content, with fresh ids.
pub fn compile(set: &PolicySet) -> Compiled {
    Compiler::default().compile(set)
}

/// `node`: see [`Compiler::enforcing_node`] (`None`: every workload is enforced).
fn compile_numbered<'a>(
    set: &'a PolicySet,
    numbering: &mut NumberingPass,
    node: Option<&str>,
) -> Compiled {
    let mut compiled = Compiled::default();

    // Distinct ipBlocks and the named ports egress rules use.
    let mut block_set: BTreeSet<&IpBlock> = BTreeSet::new();
    let mut egress_named: BTreeSet<(&str, Protocol)> = BTreeSet::new();
    for policy in &set.policies {
        for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
            for rule in policy.rules(direction).unwrap_or_default() {
                for peer in rule.peers.iter().flatten() {
                    if let Peer::IpBlock(block) = peer {
                        block_set.insert(block);
                    }
                }
                if direction == PolicyDirection::Egress {
                    for port in rule.ports.iter().flatten() {
                        if let PortSpec::Named(name) = &port.port {
                            egress_named.insert((name.as_str(), port.protocol));
                        }
                    }
                }
            }
        }
    }
    let mut uses_node_peers = false;
    for policy in &set.cluster_policies {
        for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
            for rule in policy.rules(direction) {
                for peer in rule.peers.iter().flatten() {
                    match peer {
                        Peer::IpBlock(block) => {
                            block_set.insert(block);
                        }
                        Peer::Nodes(_) => uses_node_peers = true,
                        Peer::Workloads { .. } => {}
                    }
                }
                if direction == PolicyDirection::Egress {
                    for port in rule.ports.iter().flatten() {
                        if let PortSpec::Named(name) = &port.port {
                            egress_named.insert((name.as_str(), port.protocol));
                        }
                    }
                }
            }
        }
    }
    // Node addresses are single-address blocks, so that they get identities as
    // ipBlocks do (a node peer is the identities of its nodes' blocks).
    if uses_node_peers {
        block_set.extend(set.nodes.iter().flat_map(|node| &node.address_blocks));
    }
    let blocks: Vec<&IpBlock> = block_set.into_iter().collect();

    // Workload identities: addresses grouped by what the identity stands for.
    let mut workload_identities: Vec<WorkloadIdentity<'_>> = Vec::new();
    let mut identity_by_view: HashMap<IdentityView<'_>, usize> =
        HashMap::with_capacity(set.workloads.len());
    let mut namespace_names: HashMap<&str, Arc<str>> = HashMap::new();
    for (workload_index, workload) in set.workloads.iter().enumerate() {
        let named_ports: Vec<&NamedPort> = if egress_named.is_empty() {
            Vec::new()
        } else {
            workload
                .ports
                .iter()
                .filter(|port| egress_named.contains(&(port.name.as_str(), port.protocol)))
                .collect()
        };
        for address in &workload.addresses {
            let address_blocks: Vec<usize> = (0..blocks.len())
                .filter(|&index| blocks[index].contains(*address))
                .collect();
            let view = (
                workload.namespace.as_str(),
                &workload.labels,
                address_blocks,
                named_ports.clone(),
            );
            let index = match identity_by_view.get(&view) {
                Some(&index) => index,
                None => {
                    let (namespace, labels, address_blocks, named_ports) = view.clone();
                    let namespace_name = namespace_names
                        .entry(namespace)
                        .or_insert_with(|| Arc::from(namespace))
                        .clone();
                    let (id, key) = numbering.workload_identity(WorkloadIdentityKey {
                        namespace: namespace_name,
                        labels: labels.clone(),
                        ip_blocks: address_blocks.iter().map(|&i| blocks[i].clone()).collect(),
                        named_ports: named_ports.iter().map(|&port| port.clone()).collect(),
                    });
                    workload_identities.push(WorkloadIdentity {
                        id,
                        key,
                        namespace,
                        labels,
                        blocks: address_blocks,
                        named_ports,
                        members: Vec::new(),
                    });
                    identity_by_view.insert(view, workload_identities.len() - 1);
                    workload_identities.len() - 1
                }
            };
            let identity = &mut workload_identities[index];
            if identity.members.last() != Some(&workload_index) {
                identity.members.push(workload_index);
            }
            compiled.state.peer_hosts.insert(*address, identity.id);
        }
    }
    drop(identity_by_view);
    for identity in &mut workload_identities {
        let info = IdentityInfo::Workload {
            key: identity.key.clone(),
            members: std::mem::take(&mut identity.members),
        };
        compiled.identities.identities.insert(identity.id, info);
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
    // ipBlock index -> identities (workload and CIDR) it covers.
    let mut block_identities: Vec<Vec<u32>> = vec![Vec::new(); blocks.len()];
    for identity in &workload_identities {
        for &index in &identity.blocks {
            block_identities[index].push(identity.id);
        }
    }
    let mut cidr_identity_by_set: HashMap<Vec<usize>, u32> = HashMap::new();
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
                    let identity = numbering
                        .cidr_identity(covering.iter().map(|&i| blocks[i].clone()).collect());
                    for &index in &covering {
                        block_identities[index].push(identity);
                    }
                    compiled.identities.identities.insert(
                        identity,
                        IdentityInfo::Cidr {
                            prefixes: Vec::new(),
                            ip_blocks: covering.iter().map(|&i| blocks[i].clone()).collect(),
                        },
                    );
                    cidr_identity_by_set.insert(covering, identity);
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

    // Peer -> identities, through per-namespace label indexes of the identities.
    let block_index: HashMap<&IpBlock, usize> = blocks
        .iter()
        .enumerate()
        .map(|(index, block)| (*block, index))
        .collect();
    let mut identities_by_namespace: BTreeMap<&str, LabelIndex<'_>> = BTreeMap::new();
    for (index, identity) in workload_identities.iter().enumerate() {
        identities_by_namespace
            .entry(identity.namespace)
            .or_default()
            .add(index, identity.labels);
    }
    let named_port_identities: Vec<&WorkloadIdentity<'_>> = workload_identities
        .iter()
        .filter(|identity| !identity.named_ports.is_empty())
        .collect();
    // Namespaces a namespaceSelector matches, worked out once per distinct selector.
    let mut namespaces_selected: HashMap<&'a LabelSelector, Vec<&'a str>> = HashMap::new();
    // Identities of one namespace that `pods` selects.
    let selected_in = |index: &LabelIndex<'_>, pods: &LabelSelector, out: &mut Vec<u32>| {
        out.extend(
            index
                .candidates(pods)
                .iter()
                .map(|&i| &workload_identities[i])
                .filter(|identity| pods.matches(identity.labels))
                .map(|identity| identity.id),
        );
    };
    let mut peer_identities = |peer: &'a Peer, out: &mut Vec<u32>| match peer {
        Peer::Workloads {
            namespaces: NamespaceScope::Named(name),
            pods,
        } => {
            if let Some(index) = identities_by_namespace.get(name.as_str()) {
                selected_in(index, pods, out);
            }
        }
        Peer::Workloads {
            namespaces: NamespaceScope::Selected(selector),
            pods,
        } => {
            let namespaces = namespaces_selected.entry(selector).or_insert_with(|| {
                identities_by_namespace
                    .keys()
                    .copied()
                    .filter(|namespace| selector.matches(set.namespace_labels(namespace)))
                    .collect()
            });
            for namespace in namespaces.iter() {
                selected_in(&identities_by_namespace[namespace], pods, out);
            }
        }
        Peer::IpBlock(block) => {
            out.extend(block_identities[block_index[block]].iter().copied());
        }
        Peer::Nodes(selector) => {
            for node in set
                .nodes
                .iter()
                .filter(|node| selector.matches(&node.labels))
            {
                for block in &node.address_blocks {
                    out.extend(block_identities[block_index[block]].iter().copied());
                }
            }
        }
    };

    // A rule reduced to entries that do not depend on the endpoint it applies to.
    let mut reduce = |peers: Option<&'a Vec<Peer>>,
                      ports: Option<&'a Vec<PortRule>>,
                      direction: PolicyDirection,
                      rule_id: u32|
     -> CompiledRule {
        let identities: Vec<u32> = match peers {
            None => vec![IDENTITY_ANY],
            Some(peers) => {
                // Sorted and deduplicated once, not kept sorted per insert: a rule may
                // name a million identities.
                let mut identities = Vec::new();
                for peer in peers {
                    peer_identities(peer, &mut identities);
                }
                identities.sort_unstable();
                identities.dedup();
                identities
            }
        };
        let mut entries: Vec<EntryTail> = Vec::new();
        let mut endpoint_named_ports = Vec::new();
        match ports {
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
                                entries.extend(
                                    identities
                                        .iter()
                                        .map(|&identity| (identity, protocol, Some((start, bits)))),
                                );
                            });
                        }
                        PortSpec::Named(name) => match direction {
                            PolicyDirection::Ingress => {
                                endpoint_named_ports.push((name.clone(), port.protocol));
                            }
                            PolicyDirection::Egress => {
                                // Resolved on each destination identity; a rule without
                                // peers reaches every workload identity.
                                for identity in &named_port_identities {
                                    let peer_ok = identities.binary_search(&identity.id).is_ok()
                                        || identities.binary_search(&IDENTITY_ANY).is_ok();
                                    if !peer_ok {
                                        continue;
                                    }
                                    for named in &identity.named_ports {
                                        if named.name == *name && named.protocol == port.protocol {
                                            entries.push((
                                                identity.id,
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
        entries.sort_unstable();
        entries.dedup();
        CompiledRule {
            rule_id,
            entries,
            endpoint_named_ports,
            peer_identities: identities,
        }
    };

    // Rules, reduced once each: index 2 x policy + direction.
    let mut compiled_rules: Vec<Vec<CompiledRule>> = Vec::with_capacity(2 * set.policies.len());
    for policy in &set.policies {
        for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
            let rules = policy.rules(direction).unwrap_or_default();
            let mut reduced = Vec::with_capacity(rules.len());
            for (rule_index, rule) in rules.iter().enumerate() {
                let rule_ref = RuleRef::network_policy(policy, direction, rule_index);
                let rule_id = numbering.rule(&rule_ref);
                compiled.rules.rules.insert(rule_id, rule_ref);
                reduced.push(reduce(
                    rule.peers.as_ref(),
                    rule.ports.as_ref(),
                    direction,
                    rule_id,
                ));
            }
            compiled_rules.push(reduced);
        }
    }
    // ClusterNetworkPolicy rules likewise, with their actions; same indexing.
    let mut compiled_cluster_rules: Vec<Vec<(RuleAction, CompiledRule)>> =
        Vec::with_capacity(2 * set.cluster_policies.len());
    for policy in &set.cluster_policies {
        for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
            let rules = policy.rules(direction);
            let mut reduced = Vec::with_capacity(rules.len());
            for (rule_index, rule) in rules.iter().enumerate() {
                let rule_ref = RuleRef::cluster_policy(policy, direction, rule_index);
                let rule_id = numbering.rule(&rule_ref);
                compiled.rules.rules.insert(rule_id, rule_ref);
                reduced.push((
                    rule.action,
                    reduce(rule.peers.as_ref(), rule.ports.as_ref(), direction, rule_id),
                ));
            }
            compiled_cluster_rules.push(reduced);
        }
    }
    let rules_of = |policy_index: usize, direction: PolicyDirection| {
        &compiled_rules[2 * policy_index + usize::from(direction == PolicyDirection::Egress)]
    };

    // Which policies select which workloads, through per-namespace label indexes of
    // the workloads: (workload, direction, policy), in policy order per workload.
    let mut workloads_by_namespace: BTreeMap<&str, LabelIndex<'_>> = BTreeMap::new();
    let enforced_here = |workload: &Workload| match (node, workload.node.as_deref()) {
        (Some(here), Some(there)) => here == there,
        _ => true,
    };
    for (index, workload) in set.workloads.iter().enumerate() {
        if !workload.addresses.is_empty() && enforced_here(workload) {
            workloads_by_namespace
                .entry(workload.namespace.as_str())
                .or_default()
                .add(index, &workload.labels);
        }
    }
    // (workload, direction, which kind, policy index): NetworkPolicies, then
    // ClusterNetworkPolicies in evaluation order.
    let mut selections: Vec<(usize, PolicyDirection, SelectedBy, usize)> = Vec::new();
    for (policy_index, policy) in set.policies.iter().enumerate() {
        let Some(index) = workloads_by_namespace.get(policy.namespace.as_str()) else {
            continue;
        };
        let selected: Vec<usize> = index
            .candidates(&policy.pod_selector)
            .iter()
            .copied()
            .filter(|&w| policy.pod_selector.matches(&set.workloads[w].labels))
            .collect();
        for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
            if policy.rules(direction).is_some() {
                selections.extend(
                    selected
                        .iter()
                        .map(|&w| (w, direction, SelectedBy::NetworkPolicy, policy_index)),
                );
            }
        }
    }
    for (policy_index, policy) in set.cluster_policies.iter().enumerate() {
        let subject = &policy.subject;
        let mut selected: Vec<usize> = Vec::new();
        for (namespace, index) in &workloads_by_namespace {
            if !subject.namespaces.matches(set.namespace_labels(namespace)) {
                continue;
            }
            selected.extend(
                index
                    .candidates(&subject.pods)
                    .iter()
                    .copied()
                    .filter(|&w| subject.pods.matches(&set.workloads[w].labels)),
            );
        }
        for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
            if !policy.rules(direction).is_empty() {
                selections.extend(
                    selected
                        .iter()
                        .map(|&w| (w, direction, SelectedBy::ClusterPolicy, policy_index)),
                );
            }
        }
    }
    // Stable: policy order is kept within each workload, direction and kind.
    selections.sort_by_key(|&(workload, direction, by, _)| (workload, direction, by));

    // Every identity (built when a cluster policy first needs it).
    let mut universe: Vec<u32> = Vec::new();
    // Endpoints and their entries.
    for per_workload in selections.chunk_by(|a, b| a.0 == b.0) {
        let workload_index = per_workload[0].0;
        let workload = &set.workloads[workload_index];
        let endpoint_id = numbering.endpoint(&workload.namespace, &workload.name);
        let mut flags = 0;
        for per_direction in per_workload.chunk_by(|a, b| a.1 == b.1) {
            let direction = per_direction[0].1;
            let network_policies: Vec<usize> = per_direction
                .iter()
                .filter(|s| s.2 == SelectedBy::NetworkPolicy)
                .map(|s| s.3)
                .collect();
            let cluster_policies: Vec<usize> = per_direction
                .iter()
                .filter(|s| s.2 == SelectedBy::ClusterPolicy)
                .map(|s| s.3)
                .collect();
            flags |= match direction {
                PolicyDirection::Ingress => ENDPOINT_FLAG_INGRESS_ENFORCED,
                PolicyDirection::Egress => ENDPOINT_FLAG_EGRESS_ENFORCED,
            };
            if network_policies.is_empty() {
                // Only cluster policies: what no tier decides is allowed.
                flags |= match direction {
                    PolicyDirection::Ingress => ENDPOINT_FLAG_INGRESS_DEFAULT_ALLOW,
                    PolicyDirection::Egress => ENDPOINT_FLAG_EGRESS_DEFAULT_ALLOW,
                };
            }
            if cluster_policies.is_empty() {
                // NetworkPolicy alone: every entry allows, so any matching entry says
                // the same, and a miss is the default deny.
                for &policy_index in &network_policies {
                    for rule in rules_of(policy_index, direction) {
                        insert_rule_entries(
                            &mut compiled.state,
                            endpoint_id,
                            direction,
                            rule,
                            workload,
                        );
                    }
                }
                continue;
            }
            let cluster_rules = cluster_policies.iter().flat_map(|&policy_index| {
                let tier = set.cluster_policies[policy_index].tier;
                compiled_cluster_rules
                    [2 * policy_index + usize::from(direction == PolicyDirection::Egress)]
                .iter()
                .map(move |(action, rule)| (tier, *action, rule))
            });
            let network_rules = network_policies
                .iter()
                .flat_map(|&policy_index| rules_of(policy_index, direction));
            if universe.is_empty() {
                universe = compiled.identities.identities.keys().copied().collect();
                universe.push(IDENTITY_WORLD);
                universe.sort_unstable();
            }
            tiers::insert_resolved_entries(
                &mut compiled.state,
                &tiers::Resolution {
                    endpoint_id,
                    direction,
                    workload,
                    universe: &universe,
                    network_policy_selects: !network_policies.is_empty(),
                },
                cluster_rules,
                network_rules,
            );
        }
        let ingress_enforced = flags & ENDPOINT_FLAG_INGRESS_ENFORCED != 0;
        let egress_enforced = flags & ENDPOINT_FLAG_EGRESS_ENFORCED != 0;
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
                ingress_enforced,
                egress_enforced,
            },
        );
    }
    compiled
}

/// Which kind of policy selects a workload (NetworkPolicies sort first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SelectedBy {
    NetworkPolicy,
    ClusterPolicy,
}

/// Calls `emit` with each entry tail of `rule` for the endpoint `workload`: the rule's
/// own entries and its ingress named ports resolved on the workload.
fn rule_entry_tails(rule: &CompiledRule, workload: &Workload, mut emit: impl FnMut(EntryTail)) {
    for entry in &rule.entries {
        emit(*entry);
    }
    for (name, protocol) in &rule.endpoint_named_ports {
        for port in workload.resolve_named_port(name, *protocol) {
            for identity in &rule.peer_identities {
                emit((*identity, Some(protocol.number()), Some((port, 16))));
            }
        }
    }
}

fn insert_rule_entries(
    state: &mut DatapathState,
    endpoint_id: u32,
    direction: PolicyDirection,
    rule: &CompiledRule,
    workload: &Workload,
) {
    rule_entry_tails(rule, workload, |(identity, protocol, port_block)| {
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
    });
}
