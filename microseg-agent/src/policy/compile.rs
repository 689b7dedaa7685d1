//! The compiler: a [`PolicySet`] becomes the content of the data path's maps
//! ([`DatapathState`]), and each later change of the set becomes the change of that
//! content, worked out from what the change touches.
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
//! The work is kept in layers, as Cilium and Calico keep theirs, and an update goes
//! through each only as far as its change reaches:
//! - `identities` (the ipcache): a changed workload re-keys its own addresses; an
//!   identity comes with its first member and goes with its last;
//! - `selectors` (the selector cache): each rule peer and the identities it selects;
//!   a new identity is matched against the selectors that could select it;
//! - rules: each rule reduced to endpoint-independent entries, again only when one
//!   of its selectors changed, and only for policies that select a local endpoint;
//! - endpoints: which policies select each local workload and its entries, again
//!   only for the endpoints a change reaches (its own change, a change of a policy
//!   selecting it or of one of those policies' rules; for endpoints a
//!   ClusterNetworkPolicy selects, a change of the set of identities);
//! - `output`: the state, and the keys the update touched, from which its diff is
//!   read.
//!
//! Ids stay with what they number from one update to the next (`numbering`), so
//! that a changed pod or policy changes only its own entries; the agent keeps them
//! across its restarts too (`saved_ids`). Selectors are matched through label
//! indexes (`label_index`), so a first compile costs about the size of
//! its output, not policies x workloads, and is the same code fed everything.

mod hit_slots;
mod identities;
mod label_index;
mod numbering;
mod output;
mod saved_ids;
mod selectors;
mod tiers;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use foldhash::{HashMap, HashMapExt};
use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;
use microseg_common::endpoint::{
    ENDPOINT_FLAG_EGRESS_DEFAULT_ALLOW, ENDPOINT_FLAG_EGRESS_ENFORCED,
    ENDPOINT_FLAG_INGRESS_DEFAULT_ALLOW, ENDPOINT_FLAG_INGRESS_ENFORCED, EndpointInfo,
};
use microseg_common::identity::{IDENTITY_ANY, IDENTITY_WORLD};
use microseg_common::policy::{Direction, PolicyEntry, RULE_ID_DEFAULT_DENY, port_range_blocks};
use microseg_common::rule_hits::HIT_SLOT_NONE;

use super::evaluate::RuleRef;
use super::model::{
    ClusterPolicy, IpBlock, LabelSelector, Labels, Peer, Policy, PolicyDirection, PolicySet,
    PortRule, PortSpec, Protocol, RuleAction, Tier, Workload,
};
use crate::datapath::state::{DatapathState, PolicyMatch, StateCounts};
pub use hit_slots::{HitSlotOwner, HitSlotTable, HitSlots};
use identities::{IdentityChanges, IdentityLayer};
pub use identities::{WorkloadKey, workload_key};
use label_index::OwnedLabelIndex;
pub use numbering::Numbering;
pub use numbering::WorkloadIdentityKey;
pub use output::CompiledChanges;
use output::Output;
pub use saved_ids::{IdsRevision, SavedIds, SavedIdsError};
use selectors::{PeerSelector, SelectorCache, SharedSelector};

/// Rule ids as stored in policy entries. Id 0 is `RULE_ID_DEFAULT_DENY`; a rule keeps
/// its id from one compile to the next while its policy exists (see [`Numbering`]).
///
/// A rule's reference is shared by the numbering, the rule's state, this table, the
/// events' name tables and the rule hit records: one copy of its names per rule,
/// not five (about 750 bytes a rule).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleTable {
    rules: BTreeMap<u32, Arc<RuleRef>>,
}

impl RuleTable {
    pub fn get(&self, rule_id: u32) -> Option<&Arc<RuleRef>> {
        self.rules.get(&rule_id)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// (rule id, rule) pairs, by id.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Arc<RuleRef>)> {
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
        /// The workloads, as `namespace/name`.
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
#[derive(Clone, Debug)]
struct CompiledRule {
    rule_id: u32,
    entries: Vec<EntryTail>,
    /// Ingress named ports (name, protocol): they resolve on the endpoint itself, for
    /// each of `peer_identities`.
    endpoint_named_ports: Vec<(String, Protocol)>,
    peer_identities: Vec<u32>,
}

/// What changed in a policy set since the compiler last saw it: the keys of the
/// objects added, changed or removed. The compiler reads each in the new set (absent:
/// removed) and knows what it made of the old one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetChanges {
    /// `(namespace, name)`.
    pub workloads: BTreeSet<WorkloadKey>,
    /// `(namespace, name)`.
    pub policies: BTreeSet<(String, String)>,
    /// By name.
    pub cluster_policies: BTreeSet<String>,
    /// Namespaces whose labels may have changed.
    pub namespaces: BTreeSet<String>,
    pub nodes: bool,
}

impl SetChanges {
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty()
            && self.policies.is_empty()
            && self.cluster_policies.is_empty()
            && self.namespaces.is_empty()
            && !self.nodes
    }

    /// Everything `set` holds (a first compile).
    pub fn everything(set: &PolicySet) -> Self {
        Self {
            workloads: set.workloads.iter().map(workload_key).collect(),
            policies: set
                .policies
                .iter()
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .collect(),
            cluster_policies: set
                .cluster_policies
                .iter()
                .map(|p| p.name.clone())
                .collect(),
            namespaces: set.namespaces.keys().cloned().collect(),
            nodes: true,
        }
    }
}

/// A policy, as the compiler keys it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum PolicyId {
    Network(String, String),
    Cluster(String),
}

/// One rule as registered.
#[derive(Clone, Debug)]
struct RuleState {
    rule_ref: Arc<RuleRef>,
    /// Shared by the policy's rules and its entry in `policies`.
    policy: Arc<PolicyId>,
    direction: PolicyDirection,
    action: RuleAction,
    /// `None`: every peer.
    peers: Option<Vec<SharedSelector>>,
    ports: Option<Vec<PortRule>>,
    /// The reduction, while it is current.
    reduced: Option<Arc<CompiledRule>>,
}

/// A rule as a policy states it, to register.
struct RuleSpec<'a> {
    rule_ref: RuleRef,
    action: RuleAction,
    peers: Option<&'a Vec<Peer>>,
    ports: Option<&'a Vec<PortRule>>,
}

/// One policy as registered.
#[derive(Clone, Debug, Default)]
struct PolicyState {
    /// Rule ids per direction (ingress, egress), in rule order.
    rules: [Vec<u32>; 2],
    /// Local endpoints it selects (in either direction).
    subjects: BTreeSet<WorkloadKey>,
    /// What it registered with the identity layer, to release.
    blocks: Vec<IpBlock>,
    named_ports: Vec<(String, Protocol)>,
    node_peers: usize,
}

/// An enforced endpoint as compiled.
#[derive(Clone, Debug, Default)]
struct EndpointState {
    id: u32,
    addresses: Vec<IpAddr>,
    /// Policies selecting it, per direction, in evaluation order.
    selected: [Vec<PolicyId>; 2],
    /// Its policy entries, per direction (its share of the state's).
    entries: [BTreeMap<PolicyMatch, PolicyEntry>; 2],
    /// A ClusterNetworkPolicy selects it in the direction: its entries depend on
    /// every identity there is (`tiers`).
    tiered: [bool; 2],
}

fn direction_index(direction: PolicyDirection) -> usize {
    usize::from(direction == PolicyDirection::Egress)
}

const DIRECTIONS: [PolicyDirection; 2] = [PolicyDirection::Ingress, PolicyDirection::Egress];

/// What the last update touched in the compiler's tables: rules (added or
/// removed), endpoints (by id, old and new), hit slots (owner changed). Readers of
/// those tables (the event names) bring just these up to date.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub rules: BTreeSet<u32>,
    pub endpoints: BTreeSet<u32>,
    pub slots: BTreeSet<u16>,
}

/// Counts of the compiler's work, for `status` and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompilerCounters {
    /// Updates compiled.
    pub updates: u64,
    /// Updates that compiled everything afresh (a first compile, ids exhausted).
    pub full_compiles: u64,
    /// Endpoint directions whose entries were worked out again, in all updates.
    pub endpoints_recompiled: u64,
    /// Rules reduced again, in all updates.
    pub rules_reduced: u64,
    /// Endpoints compiled now.
    pub endpoints: usize,
}

/// Compiles policy sets one after another, each as the change from the last: ids
/// stay with what they number, identities, selectors, rules and endpoints are kept,
/// and an update works out again only what its change touches (see the module doc).
/// The agent keeps one per node.
#[derive(Clone, Debug, Default)]
pub struct Compiler {
    numbering: Numbering,
    hit_slots: HitSlots,
    enforcing_node: Option<String>,
    identities: IdentityLayer,
    selectors: SelectorCache,
    rules: HashMap<u32, RuleState>,
    rules_by_selector: HashMap<SharedSelector, BTreeSet<u32>>,
    /// Egress rules without peers that name ports: they resolve on every identity
    /// with named ports.
    any_peer_named_rules: BTreeSet<u32>,
    policies: HashMap<Arc<PolicyId>, PolicyState>,
    rule_table: RuleTable,
    /// Local workloads (enforced here if a policy selects them), by namespace,
    /// indexed by label.
    local: BTreeMap<String, OwnedLabelIndex<u32>>,
    local_handles: HashMap<WorkloadKey, (u32, Labels)>,
    local_keys: HashMap<u32, WorkloadKey>,
    next_local: u32,
    endpoints: BTreeMap<WorkloadKey, EndpointState>,
    endpoint_table: BTreeMap<u32, CompiledEndpoint>,
    output: Output,
    /// What `compile` saw last, to find what changed (see `Compiler::compile`).
    seen: Fingerprints,
    touched: Touched,
    pub counters: CompilerCounters,
}

/// Hashes of the objects of the last set `compile` saw.
#[derive(Clone, Debug, Default)]
struct Fingerprints {
    workloads: HashMap<WorkloadKey, u64>,
    policies: HashMap<(String, String), u64>,
    cluster_policies: HashMap<String, u64>,
    namespaces: HashMap<String, u64>,
    nodes: u64,
}

fn fingerprint(value: &impl std::hash::Hash) -> u64 {
    use std::hash::BuildHasher;
    foldhash::quality::FixedState::with_seed(0).hash_one(value)
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

    pub fn numbering(&self) -> &Numbering {
        &self.numbering
    }

    /// Compiles `set`, finding what changed since the last set by comparing the
    /// objects' hashes with the last ones (a pass over the set). Callers that know
    /// what changed use [`Compiler::update`].
    pub fn compile(&mut self, set: &PolicySet) -> Compiled {
        let changes = self.changes_since_last(set);
        self.update(set, &changes);
        self.compiled()
    }

    /// What differs between `set` and the last set this compiler saw.
    fn changes_since_last(&mut self, set: &PolicySet) -> SetChanges {
        let mut changes = SetChanges::default();
        let mut workloads = HashMap::with_capacity(set.workloads.len());
        for workload in &set.workloads {
            let key = workload_key(workload);
            let hash = fingerprint(workload);
            if self.seen.workloads.remove(&key) != Some(hash) {
                changes.workloads.insert(key.clone());
            }
            workloads.insert(key, hash);
        }
        changes
            .workloads
            .extend(std::mem::replace(&mut self.seen.workloads, workloads).into_keys());
        let mut policies = HashMap::with_capacity(set.policies.len());
        for policy in &set.policies {
            let key = (policy.namespace.clone(), policy.name.clone());
            let hash = fingerprint(policy);
            if self.seen.policies.remove(&key) != Some(hash) {
                changes.policies.insert(key.clone());
            }
            policies.insert(key, hash);
        }
        changes
            .policies
            .extend(std::mem::replace(&mut self.seen.policies, policies).into_keys());
        let mut cluster = HashMap::new();
        for policy in &set.cluster_policies {
            let hash = fingerprint(policy);
            if self.seen.cluster_policies.remove(&policy.name) != Some(hash) {
                changes.cluster_policies.insert(policy.name.clone());
            }
            cluster.insert(policy.name.clone(), hash);
        }
        changes
            .cluster_policies
            .extend(std::mem::replace(&mut self.seen.cluster_policies, cluster).into_keys());
        let mut namespaces = HashMap::new();
        for (name, namespace) in &set.namespaces {
            let hash = fingerprint(&namespace.labels);
            if self.seen.namespaces.remove(name) != Some(hash) {
                changes.namespaces.insert(name.clone());
            }
            namespaces.insert(name.clone(), hash);
        }
        changes
            .namespaces
            .extend(std::mem::replace(&mut self.seen.namespaces, namespaces).into_keys());
        let nodes = fingerprint(&set.nodes);
        changes.nodes = nodes != self.seen.nodes;
        self.seen.nodes = nodes;
        changes
    }

    /// Compiles the change `changes` made to the set, `set` being the set after it.
    /// Returns what the compiled state gained, lost and changed.
    pub fn update(&mut self, set: &PolicySet, changes: &SetChanges) -> CompiledChanges {
        self.counters.updates += 1;
        self.hit_slots.begin_update();
        self.touched = Touched::default();
        let mut changes = changes.clone();
        if self.numbering.exhausted() || self.counters.updates == 1 {
            if self.numbering.exhausted() {
                // Start afresh: every id is handed out again.
                let node = self.enforcing_node.clone();
                let (counters, output) = (self.counters, std::mem::take(&mut self.output));
                *self = Self {
                    enforcing_node: node,
                    counters,
                    output,
                    ..Self::default()
                };
                self.forget_output();
            }
            self.counters.full_compiles += 1;
            changes = SetChanges::everything(set);
            self.identities.reserve(set.workloads.len());
            self.numbering
                .reserve_workload_identities(set.workloads.len());
        }
        let mut dirty: BTreeSet<WorkloadKey> = BTreeSet::new();

        // Policies: the new version is registered before the old one is released,
        // so that what both have (a rule's id, a selector, a block) stays.
        for key in &changes.policies {
            let id = PolicyId::Network(key.0.clone(), key.1.clone());
            let old = self.take_policy(&id);
            if let Some(policy) = set.policy(&key.0, &key.1) {
                self.register_network_policy(set, policy, &mut dirty);
            }
            self.release_policy(set, old, &mut dirty);
        }
        for name in &changes.cluster_policies {
            let id = PolicyId::Cluster(name.clone());
            let old = self.take_policy(&id);
            if let Some(policy) = set.cluster_policies.iter().find(|p| &p.name == name) {
                self.register_cluster_policy(set, policy, &mut dirty);
            }
            self.release_policy(set, old, &mut dirty);
        }
        if changes.nodes {
            self.identities.sync_node_blocks(set);
        }

        // Workloads: identities of their addresses, and the local ones' selection.
        let mut identity_changes = IdentityChanges::default();
        for key in &changes.workloads {
            self.identities.update_workload(
                set,
                key,
                &mut self.numbering,
                &mut self.output,
                &mut identity_changes,
            );
            self.update_local(set, key);
        }
        // Every changed workload is recompiled: merged in one pass (a full compile
        // has a million).
        dirty.append(&mut changes.workloads);
        self.identities.settle(
            set,
            &mut self.numbering,
            &mut self.output,
            &mut identity_changes,
        );

        // A relabelled namespace may change which cluster policies select its pods.
        for namespace in &changes.namespaces {
            if let Some(index) = self.local.get(namespace) {
                dirty.extend(
                    index
                        .items()
                        .filter_map(|h| self.local_keys.get(&h).cloned()),
                );
            }
        }

        // Selectors, then the rules whose peers they are.
        self.selectors.update(
            set,
            &self.identities,
            &identity_changes,
            &changes.namespaces,
            changes.nodes,
        );
        let mut stale_rules: BTreeSet<u32> = BTreeSet::new();
        for selector in self.selectors.take_changed() {
            if let Some(rules) = self.rules_by_selector.get(&selector) {
                stale_rules.extend(rules.iter().copied());
            }
        }
        if identity_changes.named_ports_changed {
            stale_rules.extend(self.any_peer_named_rules.iter().copied());
        }
        for rule_id in stale_rules {
            let Some(rule) = self.rules.get_mut(&rule_id) else {
                continue;
            };
            if rule.reduced.take().is_some()
                && let Some(policy) = self.policies.get(&rule.policy)
            {
                dirty.extend(policy.subjects.iter().cloned());
            }
        }
        // Tiered endpoints depend on every identity there is.
        if !identity_changes.added.is_empty() || !identity_changes.removed.is_empty() {
            dirty.extend(
                self.endpoints
                    .iter()
                    .filter(|(_, e)| e.tiered[0] || e.tiered[1])
                    .map(|(key, _)| key.clone()),
            );
        }

        // Every identity, for endpoints a ClusterNetworkPolicy selects: listed once,
        // and only if one is compiled.
        let mut universe: Option<Vec<u32>> = None;
        for key in &dirty {
            self.compile_endpoint(set, key, &mut universe);
        }
        if self.numbering.take_restored() {
            self.release_unused_saved_ids();
        }
        self.hit_slots.end_update();
        self.touched.slots = self.hit_slots.take_touched();
        self.counters.endpoints = self.endpoint_table.len();
        self.output.take_changes()
    }

    /// What the last update touched in the tables.
    pub fn touched(&self) -> &Touched {
        &self.touched
    }

    /// Forgets the output: the next update writes every entry anew.
    fn forget_output(&mut self) {
        let old = std::mem::take(&mut self.output.state);
        for address in old.endpoints.keys() {
            self.output.set_endpoint(*address, None);
        }
        for address in old.peer_hosts.keys() {
            self.output.set_peer_host(*address, None);
        }
        for prefix in old.peer_prefixes.keys() {
            self.output.set_peer_prefix(*prefix, None);
        }
        for key in old.policy.keys() {
            self.output.set_policy(*key, None);
        }
    }

    /// Whether `workload` is enforced here (see [`Compiler::enforcing_node`]).
    fn enforced_here(&self, workload: &Workload) -> bool {
        match (self.enforcing_node.as_deref(), workload.node.as_deref()) {
            (Some(here), Some(there)) => here == there,
            _ => true,
        }
    }

    /// Keeps the index of local workloads (with addresses, enforced here).
    fn update_local(&mut self, set: &PolicySet, key: &WorkloadKey) {
        let workload = set
            .workload(&key.0, &key.1)
            .filter(|w| !w.addresses.is_empty() && self.enforced_here(w));
        if let Some((handle, labels)) = self.local_handles.remove(key) {
            if let Some(index) = self.local.get_mut(&key.0) {
                index.remove(handle, &labels);
                if index.is_empty() {
                    self.local.remove(&key.0);
                }
            }
            self.local_keys.remove(&handle);
        }
        if let Some(workload) = workload {
            let handle = self.next_local;
            self.next_local += 1;
            // Looked up first: an entry would copy the namespace every time.
            match self.local.get_mut(&key.0) {
                Some(index) => index.add(handle, &workload.labels),
                None => self
                    .local
                    .entry(key.0.clone())
                    .or_default()
                    .add(handle, &workload.labels),
            }
            self.local_handles
                .insert(key.clone(), (handle, workload.labels.clone()));
            self.local_keys.insert(handle, key.clone());
        }
    }

    /// Local workloads `selector` matches in `namespace`.
    fn local_matching(&self, namespace: &str, selector: &LabelSelector) -> Vec<WorkloadKey> {
        let Some(index) = self.local.get(namespace) else {
            return Vec::new();
        };
        index
            .candidates(selector)
            .iter()
            .filter_map(|handle| {
                let key = self.local_keys.get(handle)?;
                let (_, labels) = self.local_handles.get(key)?;
                selector.matches(labels).then(|| key.clone())
            })
            .collect()
    }

    fn register_rule(
        &mut self,
        set: &PolicySet,
        policy: &Arc<PolicyId>,
        state: &mut PolicyState,
        rule: RuleSpec<'_>,
    ) {
        let RuleSpec {
            rule_ref,
            action,
            peers,
            ports,
        } = rule;
        let rule_ref = Arc::new(rule_ref);
        let direction = rule_ref.direction;
        let rule_id = self.numbering.rule(&rule_ref);
        self.hit_slots.rule(rule_id);
        self.touched.rules.insert(rule_id);
        self.rule_table.rules.insert(rule_id, rule_ref.clone());
        for peer in peers.into_iter().flatten() {
            match peer {
                Peer::IpBlock(block) => {
                    self.identities.use_block(set, block);
                    state.blocks.push(block.clone());
                }
                Peer::Nodes(_) => {
                    self.identities.use_node_peers(set, true);
                    state.node_peers += 1;
                }
                Peer::Workloads { .. } => {}
            }
        }
        // After the blocks are in use: a block selector selects their identities.
        let selectors: Option<Vec<SharedSelector>> = peers.map(|peers| {
            peers
                .iter()
                .map(|peer| {
                    let selector =
                        self.selectors
                            .add_use(PeerSelector::of(peer), set, &self.identities);
                    self.rules_by_selector
                        .entry(selector.clone())
                        .or_default()
                        .insert(rule_id);
                    selector
                })
                .collect()
        });
        if direction == PolicyDirection::Egress {
            for port in ports.into_iter().flatten() {
                if let PortSpec::Named(name) = &port.port {
                    self.identities.use_named_port(set, name, port.protocol);
                    state.named_ports.push((name.clone(), port.protocol));
                    if selectors.is_none() {
                        self.any_peer_named_rules.insert(rule_id);
                    }
                }
            }
        }
        state.rules[direction_index(direction)].push(rule_id);
        self.rules.insert(
            rule_id,
            RuleState {
                rule_ref,
                policy: policy.clone(),
                direction,
                action,
                peers: selectors,
                ports: ports.cloned(),
                reduced: None,
            },
        );
    }

    fn register_network_policy(
        &mut self,
        set: &PolicySet,
        policy: &Policy,
        dirty: &mut BTreeSet<WorkloadKey>,
    ) {
        let id = Arc::new(PolicyId::Network(
            policy.namespace.clone(),
            policy.name.clone(),
        ));
        let mut state = PolicyState::default();
        for direction in DIRECTIONS {
            for (index, rule) in policy
                .rules(direction)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                self.register_rule(
                    set,
                    &id,
                    &mut state,
                    RuleSpec {
                        rule_ref: RuleRef::network_policy(policy, direction, index),
                        action: RuleAction::Accept,
                        peers: rule.peers.as_ref(),
                        ports: rule.ports.as_ref(),
                    },
                );
            }
        }
        // Subjects: worked out when each endpoint is compiled.
        dirty.extend(self.local_matching(&policy.namespace, &policy.pod_selector));
        self.policies.insert(id, state);
    }

    fn register_cluster_policy(
        &mut self,
        set: &PolicySet,
        policy: &ClusterPolicy,
        dirty: &mut BTreeSet<WorkloadKey>,
    ) {
        let id = Arc::new(PolicyId::Cluster(policy.name.clone()));
        let mut state = PolicyState::default();
        for direction in DIRECTIONS {
            for (index, rule) in policy.rules(direction).iter().enumerate() {
                self.register_rule(
                    set,
                    &id,
                    &mut state,
                    RuleSpec {
                        rule_ref: RuleRef::cluster_policy(policy, direction, index),
                        action: rule.action,
                        peers: rule.peers.as_ref(),
                        ports: rule.ports.as_ref(),
                    },
                );
            }
        }
        let namespaces: Vec<String> = self
            .local
            .keys()
            .filter(|namespace| {
                policy
                    .subject
                    .namespaces
                    .matches(set.namespace_labels(namespace))
            })
            .cloned()
            .collect();
        for namespace in namespaces {
            dirty.extend(self.local_matching(&namespace, &policy.subject.pods));
        }
        self.policies.insert(id, state);
    }

    /// Takes policy `id` and its rules out (to be released once its new version, if
    /// any, is registered).
    fn take_policy(&mut self, id: &PolicyId) -> Option<(PolicyState, Vec<(u32, RuleState)>)> {
        let state = self.policies.remove(id)?;
        let rules = state
            .rules
            .iter()
            .flatten()
            .filter_map(|rule_id| Some((*rule_id, self.rules.remove(rule_id)?)))
            .collect();
        Some((state, rules))
    }

    /// Releases what an old version of a policy registered, except what the new
    /// version (already registered) uses too; its subjects are compiled again.
    fn release_policy(
        &mut self,
        set: &PolicySet,
        old: Option<(PolicyState, Vec<(u32, RuleState)>)>,
        dirty: &mut BTreeSet<WorkloadKey>,
    ) {
        let Some((state, rules)) = old else {
            return;
        };
        dirty.extend(state.subjects.iter().cloned());
        for (rule_id, rule) in rules {
            let kept = self.rules.get(&rule_id);
            for selector in rule.peers.iter().flatten() {
                self.selectors.release(selector);
                let still_used = kept
                    .and_then(|k| k.peers.as_ref())
                    .is_some_and(|peers| peers.contains(selector));
                if !still_used && let Some(rules) = self.rules_by_selector.get_mut(selector) {
                    rules.remove(&rule_id);
                    if rules.is_empty() {
                        self.rules_by_selector.remove(selector);
                    }
                }
            }
            if kept.is_none() {
                self.touched.rules.insert(rule_id);
                self.any_peer_named_rules.remove(&rule_id);
                self.numbering.release_rule(&rule.rule_ref);
                self.rule_table.rules.remove(&rule_id);
                self.hit_slots.release_rule(rule_id);
            }
        }
        for block in &state.blocks {
            self.identities.release_block(set, block);
        }
        for (name, protocol) in &state.named_ports {
            self.identities.release_named_port(set, name, *protocol);
        }
        for _ in 0..state.node_peers {
            self.identities.use_node_peers(set, false);
        }
    }

    /// Rule `rule_id` reduced to endpoint-independent entries (cached while current).
    fn reduced(&mut self, rule_id: u32) -> Option<Arc<CompiledRule>> {
        let rule = self.rules.get(&rule_id)?;
        if let Some(reduced) = &rule.reduced {
            return Some(reduced.clone());
        }
        self.counters.rules_reduced += 1;
        let identities: Vec<u32> = match &rule.peers {
            None => vec![IDENTITY_ANY],
            Some(selectors) => {
                let mut identities: Vec<u32> = selectors
                    .iter()
                    .flat_map(|selector| self.selectors.identities(selector))
                    .collect();
                identities.sort_unstable();
                identities.dedup();
                identities
            }
        };
        let mut entries: Vec<EntryTail> = Vec::new();
        let mut endpoint_named_ports = Vec::new();
        match &rule.ports {
            None => entries.extend(identities.iter().map(|&identity| (identity, None, None))),
            Some(ports) => {
                for port in ports {
                    let protocol = Some(port.protocol.number());
                    match &port.port {
                        PortSpec::Any => entries.extend(
                            identities
                                .iter()
                                .map(|&identity| (identity, protocol, None)),
                        ),
                        PortSpec::Range { first, last } => {
                            port_range_blocks(*first, *last, |start, bits| {
                                entries.extend(
                                    identities
                                        .iter()
                                        .map(|&identity| (identity, protocol, Some((start, bits)))),
                                );
                            });
                        }
                        PortSpec::Named(name) => match rule.direction {
                            PolicyDirection::Ingress => {
                                endpoint_named_ports.push((name.clone(), port.protocol));
                            }
                            PolicyDirection::Egress => {
                                // Resolved on each destination identity; a rule without
                                // peers reaches every workload identity.
                                let any = identities.binary_search(&IDENTITY_ANY).is_ok();
                                for id in &self.identities.with_named_ports {
                                    if !any && identities.binary_search(id).is_err() {
                                        continue;
                                    }
                                    let Some(identity) =
                                        self.identities.workload_identities.get(id)
                                    else {
                                        continue;
                                    };
                                    for named in &identity.key.named_ports {
                                        if named.name == *name && named.protocol == port.protocol {
                                            entries.push((*id, protocol, Some((named.port, 16))));
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
        let reduced = Arc::new(CompiledRule {
            rule_id,
            entries,
            endpoint_named_ports,
            peer_identities: identities,
        });
        if let Some(rule) = self.rules.get_mut(&rule_id) {
            rule.reduced = Some(reduced.clone());
        }
        Some(reduced)
    }

    /// Works out again which policies select workload `key` and its entries.
    fn compile_endpoint(
        &mut self,
        set: &PolicySet,
        key: &WorkloadKey,
        universe: &mut Option<Vec<u32>>,
    ) {
        let workload = set
            .workload(&key.0, &key.1)
            .filter(|w| !w.addresses.is_empty() && self.enforced_here(w));
        // Selection, per direction, in evaluation order.
        let mut selected: [Vec<PolicyId>; 2] = Default::default();
        let mut network_selects = [false; 2];
        if let Some(workload) = workload {
            for direction in DIRECTIONS {
                let d = direction_index(direction);
                for policy in set.policies_selecting(workload, direction) {
                    selected[d].push(PolicyId::Network(
                        policy.namespace.clone(),
                        policy.name.clone(),
                    ));
                }
                network_selects[d] = !selected[d].is_empty();
                for policy in set.cluster_policies_selecting(workload, direction) {
                    selected[d].push(PolicyId::Cluster(policy.name.clone()));
                }
            }
        }
        // Subjects follow.
        let old_selected: BTreeSet<PolicyId> = self
            .endpoints
            .get(key)
            .map(|e| e.selected.iter().flatten().cloned().collect())
            .unwrap_or_default();
        let new_selected: BTreeSet<PolicyId> = selected.iter().flatten().cloned().collect();
        for id in old_selected.difference(&new_selected) {
            if let Some(policy) = self.policies.get_mut(id) {
                policy.subjects.remove(key);
            }
        }
        // Every selecting policy has it (one registered anew starts without).
        for id in &new_selected {
            if let Some(policy) = self.policies.get_mut(id) {
                policy.subjects.insert(key.clone());
            }
        }
        let old = self.endpoints.remove(key).unwrap_or_default();
        let (Some(workload), false) = (workload, new_selected.is_empty()) else {
            // Not enforced here: its entries and addresses go.
            self.retire_endpoint(key, old);
            return;
        };
        self.counters.endpoints_recompiled += 2;
        let endpoint_id = self.numbering.endpoint(&key.0, &key.1);
        self.touched.endpoints.insert(endpoint_id);
        let first_slot = self.hit_slots.endpoint(endpoint_id);
        let mut flags = 0;
        let mut entries: [BTreeMap<PolicyMatch, PolicyEntry>; 2] = Default::default();
        let mut tiered = [false; 2];
        for direction in DIRECTIONS {
            let d = direction_index(direction);
            if selected[d].is_empty() {
                continue;
            }
            flags |= match direction {
                PolicyDirection::Ingress => ENDPOINT_FLAG_INGRESS_ENFORCED,
                PolicyDirection::Egress => ENDPOINT_FLAG_EGRESS_ENFORCED,
            };
            if !network_selects[d] {
                // Only cluster policies: what no tier decides is allowed.
                flags |= match direction {
                    PolicyDirection::Ingress => ENDPOINT_FLAG_INGRESS_DEFAULT_ALLOW,
                    PolicyDirection::Egress => ENDPOINT_FLAG_EGRESS_DEFAULT_ALLOW,
                };
            }
            let mut network_rules: Vec<Arc<CompiledRule>> = Vec::new();
            let mut cluster_rules: Vec<(Tier, RuleAction, Arc<CompiledRule>)> = Vec::new();
            for policy in &selected[d] {
                let rule_ids = self
                    .policies
                    .get(policy)
                    .map(|p| p.rules[d].clone())
                    .unwrap_or_default();
                for rule_id in rule_ids {
                    let Some(reduced) = self.reduced(rule_id) else {
                        continue;
                    };
                    match policy {
                        PolicyId::Network(..) => network_rules.push(reduced),
                        PolicyId::Cluster(name) => {
                            let tier = set
                                .cluster_policies
                                .iter()
                                .find(|p| &p.name == name)
                                .map_or(Tier::Admin, |p| p.tier);
                            let action = self
                                .rules
                                .get(&rule_id)
                                .map_or(RuleAction::Deny, |r| r.action);
                            cluster_rules.push((tier, action, reduced));
                        }
                    }
                }
            }
            if cluster_rules.is_empty() {
                // NetworkPolicy alone: every entry allows, so any matching entry says
                // the same, and a miss is the default deny.
                for rule in &network_rules {
                    insert_rule_entries(&mut entries[d], endpoint_id, direction, rule, workload);
                }
            } else {
                tiered[d] = true;
                let universe = universe
                    .get_or_insert_with(|| self.identities.universe.iter().copied().collect());
                tiers::insert_resolved_entries(
                    &mut entries[d],
                    &tiers::Resolution {
                        endpoint_id,
                        direction,
                        workload,
                        universe,
                        network_policy_selects: network_selects[d],
                    },
                    cluster_rules
                        .iter()
                        .map(|(tier, action, rule)| (*tier, *action, &**rule)),
                    network_rules.iter().map(|rule| &**rule),
                );
            }
            // Where each entry's hits are counted.
            for (key, entry) in entries[d].iter_mut() {
                let slot = if entry.rule_id != RULE_ID_DEFAULT_DENY {
                    self.hit_slots.slot_of_rule(entry.rule_id)
                } else if entry.is_deny() {
                    // A resolved default deny counts as the endpoint's default deny.
                    first_slot.map(|first| first + u16::from(key.direction == Direction::Egress))
                } else {
                    None
                };
                *entry = entry.with_hit_slot(slot.unwrap_or(HIT_SLOT_NONE));
            }
        }
        // The entries' changes.
        for (old_entries, new_entries) in old.entries.iter().zip(&entries) {
            for key in old_entries.keys() {
                if !new_entries.contains_key(key) {
                    self.output.set_policy(*key, None);
                }
            }
            for (key, entry) in new_entries {
                if old_entries.get(key) != Some(entry) {
                    self.output.set_policy(*key, Some(*entry));
                }
            }
        }
        let info = EndpointInfo::new(endpoint_id, flags)
            .with_default_deny_hit_slot(first_slot.unwrap_or(HIT_SLOT_NONE));
        for address in &old.addresses {
            // Another workload may have it now (its update writes it).
            if !workload.addresses.contains(address)
                && self
                    .output
                    .state
                    .endpoints
                    .get(address)
                    .map(|i| i.endpoint_id)
                    == Some(old.id)
            {
                self.output.set_endpoint(*address, None);
            }
        }
        for address in &workload.addresses {
            self.output.set_endpoint(*address, Some(info));
        }
        let ingress_enforced = flags & ENDPOINT_FLAG_INGRESS_ENFORCED != 0;
        let egress_enforced = flags & ENDPOINT_FLAG_EGRESS_ENFORCED != 0;
        self.hit_slots
            .set_default_denies(endpoint_id, ingress_enforced, egress_enforced);
        self.endpoint_table.insert(
            endpoint_id,
            CompiledEndpoint {
                workload: workload.key(),
                ingress_enforced,
                egress_enforced,
            },
        );
        self.endpoints.insert(
            key.clone(),
            EndpointState {
                id: endpoint_id,
                addresses: workload.addresses.clone(),
                selected,
                entries,
                tiered,
            },
        );
    }

    /// An endpoint no longer enforced here: its entries and addresses go, its id and
    /// slots are released.
    fn retire_endpoint(&mut self, key: &WorkloadKey, old: EndpointState) {
        if old.id == 0 {
            return;
        }
        self.touched.endpoints.insert(old.id);
        for entries in &old.entries {
            for entry in entries.keys() {
                self.output.set_policy(*entry, None);
            }
        }
        for address in &old.addresses {
            // Another workload may have it now (its update writes it).
            if self
                .output
                .state
                .endpoints
                .get(address)
                .map(|i| i.endpoint_id)
                == Some(old.id)
            {
                self.output.set_endpoint(*address, None);
            }
        }
        self.numbering.release_endpoint(&key.0, &key.1);
        self.hit_slots.release_endpoint(old.id);
        self.endpoint_table.remove(&old.id);
    }

    /// The compiled state and tables (copies).
    pub fn compiled(&self) -> Compiled {
        Compiled {
            state: self.output.state.clone(),
            rules: self.rule_table.clone(),
            identities: self.identity_table(),
            endpoints: self.endpoint_table.clone(),
            hit_slots: self.hit_slots.table(),
        }
    }

    /// The compiled state and tables, moved out of a compiler that is done.
    pub fn into_compiled(mut self) -> Compiled {
        Compiled {
            identities: self.identity_table(),
            hit_slots: self.hit_slots.table(),
            state: std::mem::take(&mut self.output.state),
            rules: std::mem::take(&mut self.rule_table),
            endpoints: std::mem::take(&mut self.endpoint_table),
        }
    }

    /// The compiled state (policy-bearing maps' content).
    pub fn state(&self) -> &DatapathState {
        &self.output.state
    }

    pub fn rule_table(&self) -> &RuleTable {
        &self.rule_table
    }

    pub fn endpoint_table(&self) -> &BTreeMap<u32, CompiledEndpoint> {
        &self.endpoint_table
    }

    /// Identity -> what it stands for.
    pub fn identity_table(&self) -> IdentityTable {
        let mut table = IdentityTable::default();
        let mut members = self.identities.members();
        for (id, identity) in &self.identities.workload_identities {
            table.identities.insert(
                *id,
                IdentityInfo::Workload {
                    key: identity.key.clone(),
                    members: members.remove(id).unwrap_or_default(),
                },
            );
        }
        for (id, cidr) in &self.identities.cidr_identities {
            table.identities.insert(
                *id,
                IdentityInfo::Cidr {
                    prefixes: cidr.prefixes.iter().copied().collect(),
                    ip_blocks: cidr.ip_blocks.clone(),
                },
            );
        }
        table
    }

    /// What hit slot `slot` counts.
    pub fn hit_slot_owner(&self, slot: u16) -> Option<HitSlotOwner> {
        self.hit_slots.owner(slot)
    }

    /// The set of identities the compiled state knows, with what each stands for:
    /// the identity table for one id.
    pub fn identity_info(&self, id: u32) -> Option<IdentityInfo> {
        if let Some(identity) = self.identities.workload_identities.get(&id) {
            return Some(IdentityInfo::Workload {
                key: identity.key.clone(),
                members: self.identities.members_of(id),
            });
        }
        self.identities
            .cidr_identities
            .get(&id)
            .map(|cidr| IdentityInfo::Cidr {
                prefixes: cidr.prefixes.iter().copied().collect(),
                ip_blocks: cidr.ip_blocks.clone(),
            })
    }

    /// The hit slot table (owners, and the slots the last update handed out).
    pub fn hit_slot_table(&self) -> HitSlotTable {
        self.hit_slots.table()
    }

    /// The hit slots the last update handed out (to be zeroed before its entries
    /// are written).
    pub fn fresh_hit_slots(&self) -> Vec<u16> {
        self.hit_slots.fresh()
    }
}

/// Compiles the policies and inventory of `set` into map content, with fresh ids.
pub fn compile(set: &PolicySet) -> Compiled {
    let mut compiler = Compiler::default();
    // A compiler's first update compiles everything, whatever it is told.
    compiler.update(set, &SetChanges::default());
    compiler.into_compiled()
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
    entries: &mut BTreeMap<PolicyMatch, PolicyEntry>,
    endpoint_id: u32,
    direction: PolicyDirection,
    rule: &CompiledRule,
    workload: &Workload,
) {
    rule_entry_tails(rule, workload, |(identity, protocol, port_block)| {
        entries
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
