//! The identity layer (Cilium's ipcache and identity allocator): every workload
//! address gets the identity of what policies can tell about it (namespace, labels,
//! the ipBlocks containing it, the named ports egress rules resolve on it), and every
//! distinct ipBlock prefix the identity of the set of ipBlocks covering it.
//!
//! Kept from one update to the next. A workload that changes re-keys its own
//! addresses; an identity appears when its first member does and goes with its
//! last; the ipBlocks and named ports that identities depend on are counted by the
//! rules that use them, and a change of those sets re-keys only the workloads it
//! concerns (addresses inside the block, workloads with the port). What changed is
//! reported as identities added and removed, for the selector layer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};
use ipnet::IpNet;
use microseg_common::identity::IDENTITY_WORLD;

use super::label_index::OwnedLabelIndex;
use super::numbering::{Numbering, WorkloadIdentityKey};
use super::output::Output;
use crate::policy::model::{IpBlock, NamedPort, PolicySet, Protocol, Workload};

/// A workload by `(namespace, name)`, shared: the compiler's maps and sets keyed by
/// workload hold one copy of the names, not one each (`key.0`, `key.1` read them).
pub type WorkloadKey = Arc<(String, String)>;

/// The key of workload `namespace/name`.
pub fn workload_key(workload: &Workload) -> WorkloadKey {
    Arc::new((workload.namespace.clone(), workload.name.clone()))
}

/// IPv4-mapped IPv6 space, where the data path keeps IPv4 addresses.
fn ipv4_mapped_range() -> IpNet {
    "::ffff:0:0/96".parse().expect("constant prefix")
}

/// The ipBlocks rules use, indexed by the length of their cidr: the blocks whose
/// cidr contains an address or a prefix are found with one lookup per length
/// present, not by reading every block.
#[derive(Clone, Debug, Default)]
struct BlockIndex {
    /// (IPv6, prefix length) -> cidr -> blocks with that cidr.
    by_length: BTreeMap<(bool, u8), HashMap<IpNet, Vec<IpBlock>>>,
}

impl BlockIndex {
    fn insert(&mut self, block: &IpBlock) {
        let cidr = block.cidr;
        self.by_length
            .entry((cidr.addr().is_ipv6(), cidr.prefix_len()))
            .or_default()
            .entry(cidr)
            .or_default()
            .push(block.clone());
    }

    fn remove(&mut self, block: &IpBlock) {
        let cidr = block.cidr;
        let length = (cidr.addr().is_ipv6(), cidr.prefix_len());
        if let Some(by_cidr) = self.by_length.get_mut(&length) {
            if let Some(blocks) = by_cidr.get_mut(&cidr) {
                blocks.retain(|b| b != block);
                if blocks.is_empty() {
                    by_cidr.remove(&cidr);
                }
            }
            if by_cidr.is_empty() {
                self.by_length.remove(&length);
            }
        }
    }

    /// Blocks whose cidr contains `prefix` (of its own family), in block order.
    fn covering(&self, prefix: &IpNet) -> Vec<&IpBlock> {
        let v6 = prefix.addr().is_ipv6();
        let mut found: Vec<&IpBlock> = Vec::new();
        for ((family_v6, length), by_cidr) in &self.by_length {
            if *family_v6 != v6 || *length > prefix.prefix_len() {
                continue;
            }
            let Ok(wider) = IpNet::new(prefix.addr(), *length) else {
                continue;
            };
            if let Some(blocks) = by_cidr.get(&wider.trunc()) {
                found.extend(blocks);
            }
        }
        found.sort_unstable();
        found
    }
}

/// A workload identity and how many workload addresses have it: it goes with the
/// last. Its members are not listed here (a map per identity cost more than the
/// identity itself); [`IdentityLayer::members`] finds them when asked.
#[derive(Clone, Debug)]
pub(super) struct WorkloadIdentity {
    pub key: Arc<WorkloadIdentityKey>,
    pub addresses: u32,
}

/// A CIDR identity: the ipBlocks covering it and its prefixes.
#[derive(Clone, Debug)]
pub(super) struct CidrIdentity {
    pub ip_blocks: Vec<IpBlock>,
    pub prefixes: BTreeSet<IpNet>,
}

/// What an update did to the set of identities.
#[derive(Clone, Debug, Default)]
pub(super) struct IdentityChanges {
    pub added: BTreeSet<u32>,
    pub removed: BTreeSet<u32>,
    /// Identities whose ipBlock membership is new (a CIDR identity's covering set
    /// is its key; a workload identity's blocks are part of its key): the ipBlock
    /// selectors of `blocks_changed` must be read again.
    pub blocks_changed: BTreeSet<IpBlock>,
    /// A workload identity with named ports came or went.
    pub named_ports_changed: bool,
}

#[derive(Clone, Debug)]
pub(super) struct IdentityLayer {
    /// ipBlocks the rules use, with how many rule peers use each; node address
    /// blocks while any rule has a `nodes` peer.
    blocks: BTreeMap<IpBlock, usize>,
    /// The same blocks, by cidr length.
    block_index: BlockIndex,
    /// Egress named ports rules use: (name, protocol) -> uses.
    egress_named: BTreeMap<(String, Protocol), usize>,
    /// Rule peers of kind `nodes`: while there is one, node addresses are blocks.
    node_peer_uses: usize,
    /// Node address blocks counted in `blocks` (while `node_peer_uses > 0`).
    node_blocks: BTreeSet<IpBlock>,
    /// Each workload's addresses and their identities.
    addresses: HashMap<WorkloadKey, Vec<(IpAddr, u32)>>,
    pub workload_identities: HashMap<u32, WorkloadIdentity>,
    /// Workload identities of each namespace, indexed by label.
    pub by_namespace: BTreeMap<Arc<str>, OwnedLabelIndex<u32>>,
    /// Workload identities with named ports (egress rules resolve them).
    pub with_named_ports: BTreeSet<u32>,
    /// CIDR prefixes and their identities (`IDENTITY_WORLD` where no block covers).
    prefixes: BTreeMap<IpNet, u32>,
    pub cidr_identities: HashMap<u32, CidrIdentity>,
    /// ipBlock -> the identities (workload and CIDR) inside it.
    pub block_identities: HashMap<IpBlock, BTreeSet<u32>>,
    /// Every identity (workload, CIDR) and world.
    pub universe: BTreeSet<u32>,
    /// The update re-keys these workloads (blocks or named ports changed).
    rekey: BTreeSet<WorkloadKey>,
    /// The ipBlock set changed: CIDR identities are worked out again.
    prefixes_stale: bool,
}

impl Default for IdentityLayer {
    fn default() -> Self {
        Self {
            blocks: BTreeMap::new(),
            block_index: BlockIndex::default(),
            egress_named: BTreeMap::new(),
            node_peer_uses: 0,
            node_blocks: BTreeSet::new(),
            addresses: HashMap::new(),
            workload_identities: HashMap::new(),
            by_namespace: BTreeMap::new(),
            with_named_ports: BTreeSet::new(),
            prefixes: BTreeMap::new(),
            cidr_identities: HashMap::new(),
            block_identities: HashMap::new(),
            universe: [IDENTITY_WORLD].into(),
            rekey: BTreeSet::new(),
            prefixes_stale: false,
        }
    }
}

impl IdentityLayer {
    /// A rule peer starts using `block`.
    pub fn use_block(&mut self, set: &PolicySet, block: &IpBlock) {
        let uses = self.blocks.entry(block.clone()).or_default();
        *uses += 1;
        if *uses == 1 {
            self.block_index.insert(block);
            self.block_set_changed(set, block);
        }
    }

    /// A rule peer stops using `block`.
    pub fn release_block(&mut self, set: &PolicySet, block: &IpBlock) {
        let Some(uses) = self.blocks.get_mut(block) else {
            return;
        };
        *uses -= 1;
        if *uses == 0 {
            self.blocks.remove(block);
            self.block_index.remove(block);
            self.block_set_changed(set, block);
        }
    }

    /// The workloads with addresses inside `block` must be re-keyed, and the CIDR
    /// identities worked out again.
    fn block_set_changed(&mut self, set: &PolicySet, block: &IpBlock) {
        self.prefixes_stale = true;
        // Workloads that changed in this update are re-keyed anyway.
        for (_, index) in set
            .address_index
            .range(block.cidr.network()..=block.cidr.broadcast())
        {
            let workload = &set.workloads[*index];
            self.rekey.insert(workload_key(workload));
        }
    }

    /// An egress rule starts using named port `name`/`protocol`.
    pub fn use_named_port(&mut self, set: &PolicySet, name: &str, protocol: Protocol) {
        let uses = self
            .egress_named
            .entry((name.to_owned(), protocol))
            .or_default();
        *uses += 1;
        if *uses == 1 {
            self.named_port_set_changed(set, name, protocol);
        }
    }

    pub fn release_named_port(&mut self, set: &PolicySet, name: &str, protocol: Protocol) {
        let key = (name.to_owned(), protocol);
        let Some(uses) = self.egress_named.get_mut(&key) else {
            return;
        };
        *uses -= 1;
        if *uses == 0 {
            self.egress_named.remove(&key);
            self.named_port_set_changed(set, name, protocol);
        }
    }

    /// Rare (a named port no egress rule used before, or the last use of one): the
    /// workloads with that port are found by reading them all. Workloads that
    /// changed in this update are re-keyed anyway.
    fn named_port_set_changed(&mut self, set: &PolicySet, name: &str, protocol: Protocol) {
        for workload in &set.workloads {
            if workload
                .ports
                .iter()
                .any(|port| port.name == name && port.protocol == protocol)
            {
                self.rekey.insert(workload_key(workload));
            }
        }
    }

    /// A rule starts (`true`) or stops using a `nodes` peer: while one does, node
    /// addresses are blocks.
    pub fn use_node_peers(&mut self, set: &PolicySet, using: bool) {
        if using {
            self.node_peer_uses += 1;
        } else {
            self.node_peer_uses = self.node_peer_uses.saturating_sub(1);
        }
        self.sync_node_blocks(set);
    }

    /// Counts the nodes' address blocks in `blocks` while node peers are used (the
    /// nodes changed, or node peers came or went).
    pub fn sync_node_blocks(&mut self, set: &PolicySet) {
        let wanted: BTreeSet<IpBlock> = if self.node_peer_uses > 0 {
            set.nodes
                .iter()
                .flat_map(|node| node.address_blocks.iter().cloned())
                .collect()
        } else {
            BTreeSet::new()
        };
        let old = std::mem::take(&mut self.node_blocks);
        for block in old.difference(&wanted) {
            self.release_block(set, block);
        }
        for block in wanted.difference(&old) {
            self.use_block(set, block);
        }
        self.node_blocks = wanted;
    }

    /// The identity key of `address` of `workload`.
    fn key_of(
        &self,
        workload: &Workload,
        address: IpAddr,
        namespace: Arc<str>,
    ) -> WorkloadIdentityKey {
        let ip_blocks: Vec<IpBlock> = self
            .block_index
            .covering(&IpNet::from(address))
            .into_iter()
            .filter(|block| block.contains(address))
            .cloned()
            .collect();
        let named_ports: Vec<NamedPort> = if self.egress_named.is_empty() {
            Vec::new()
        } else {
            workload
                .ports
                .iter()
                .filter(|port| {
                    self.egress_named
                        .contains_key(&(port.name.clone(), port.protocol))
                })
                .cloned()
                .collect()
        };
        WorkloadIdentityKey {
            namespace,
            labels: workload.labels.clone(),
            ip_blocks,
            named_ports,
        }
    }

    /// Room for `workloads` more workloads and identities (a full compile).
    pub fn reserve(&mut self, workloads: usize) {
        self.addresses.reserve(workloads);
        self.workload_identities.reserve(workloads);
    }

    /// A namespace name shared with the identities of that namespace.
    fn namespace_name(&self, namespace: &str) -> Arc<str> {
        self.by_namespace
            .get_key_value(namespace)
            .map_or_else(|| Arc::from(namespace), |(name, _)| name.clone())
    }

    /// Sets the identities of `key`'s addresses from the workload as `set` has it
    /// (absent: it is gone), writing peer hosts.
    pub fn update_workload(
        &mut self,
        set: &PolicySet,
        key: &WorkloadKey,
        numbering: &mut Numbering,
        output: &mut Output,
        changes: &mut IdentityChanges,
    ) {
        let workload = set.workload(&key.0, &key.1);
        let new: Vec<(IpAddr, u32)> = match workload {
            Some(workload) => {
                let namespace = self.namespace_name(&workload.namespace);
                let mut ids = Vec::with_capacity(workload.addresses.len());
                for address in &workload.addresses {
                    let identity_key = self.key_of(workload, *address, namespace.clone());
                    let (id, shared) = numbering.workload_identity(identity_key);
                    self.add_member(id, shared, changes);
                    ids.push((*address, id));
                }
                ids
            }
            None => Vec::new(),
        };
        let old = match new.is_empty() {
            true => self.addresses.remove(key).unwrap_or_default(),
            false => self
                .addresses
                .insert(key.clone(), new.clone())
                .unwrap_or_default(),
        };
        for (_, id) in &old {
            self.remove_member(*id, numbering, changes);
        }
        for (address, _) in &old {
            // Another workload has it now: that one's update writes it.
            if !new.iter().any(|(a, _)| a == address) && set.workload_by_address(*address).is_none()
            {
                // A CIDR /32 (or /128) identity of this address shows again.
                let prefix = self.prefixes.get(&IpNet::from(*address)).copied();
                output.set_peer_host(*address, prefix);
            }
        }
        for (address, id) in &new {
            output.set_peer_host(*address, Some(*id));
        }
    }

    /// The workloads (`namespace/name`, in order) of each workload identity, found
    /// from the workloads' addresses: for tables and descriptions, not for updates.
    pub fn members(&self) -> HashMap<u32, Vec<String>> {
        let mut members: HashMap<u32, Vec<String>> = HashMap::new();
        for (key, addresses) in &self.addresses {
            let (namespace, name) = &**key;
            let mut ids: Vec<u32> = addresses.iter().map(|(_, id)| *id).collect();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                members
                    .entry(id)
                    .or_default()
                    .push(format!("{namespace}/{name}"));
            }
        }
        for names in members.values_mut() {
            names.sort_unstable();
        }
        members
    }

    /// The workloads of workload identity `id`, as [`IdentityLayer::members`].
    pub fn members_of(&self, id: u32) -> Vec<String> {
        let mut names: Vec<String> = self
            .addresses
            .iter()
            .filter(|(_, addresses)| addresses.iter().any(|(_, of)| *of == id))
            .map(|(key, _)| format!("{}/{}", key.0, key.1))
            .collect();
        names.sort_unstable();
        names
    }

    fn add_member(
        &mut self,
        id: u32,
        key: Arc<WorkloadIdentityKey>,
        changes: &mut IdentityChanges,
    ) {
        let identity = self.workload_identities.entry(id).or_insert_with(|| {
            changes.added.insert(id);
            changes.removed.remove(&id);
            WorkloadIdentity {
                key: key.clone(),
                addresses: 0,
            }
        });
        identity.addresses += 1;
        if identity.addresses == 1 {
            self.universe.insert(id);
            self.by_namespace
                .entry(key.namespace.clone())
                .or_default()
                .add(id, &key.labels);
            if !key.named_ports.is_empty() {
                self.with_named_ports.insert(id);
                changes.named_ports_changed = true;
            }
            for block in &key.ip_blocks {
                self.block_identities
                    .entry(block.clone())
                    .or_default()
                    .insert(id);
                changes.blocks_changed.insert(block.clone());
            }
        }
    }

    fn remove_member(&mut self, id: u32, numbering: &mut Numbering, changes: &mut IdentityChanges) {
        let Some(identity) = self.workload_identities.get_mut(&id) else {
            return;
        };
        identity.addresses = identity.addresses.saturating_sub(1);
        if identity.addresses > 0 {
            return;
        }
        let identity = self.workload_identities.remove(&id).expect("present");
        let key = identity.key;
        numbering.release_workload_identity(&key);
        self.universe.remove(&id);
        if let Some(index) = self.by_namespace.get_mut(&key.namespace) {
            index.remove(id, &key.labels);
            if index.is_empty() {
                self.by_namespace.remove(&key.namespace);
            }
        }
        if self.with_named_ports.remove(&id) {
            changes.named_ports_changed = true;
        }
        for block in &key.ip_blocks {
            if let Some(ids) = self.block_identities.get_mut(block) {
                ids.remove(&id);
            }
            changes.blocks_changed.insert(block.clone());
        }
        if !changes.added.remove(&id) {
            changes.removed.insert(id);
        }
    }

    /// Re-keys the workloads a change of blocks or named ports concerns, then works
    /// out the CIDR identities again if the ipBlock set changed.
    pub fn settle(
        &mut self,
        set: &PolicySet,
        numbering: &mut Numbering,
        output: &mut Output,
        changes: &mut IdentityChanges,
    ) {
        for key in std::mem::take(&mut self.rekey) {
            self.update_workload(set, &key, numbering, output, changes);
        }
        if std::mem::take(&mut self.prefixes_stale) {
            self.update_prefixes(set, numbering, output, changes);
        }
    }

    /// The CIDR identities: each distinct prefix (a block or an except) gets the
    /// identity of the set of blocks covering all of it, world if none.
    fn update_prefixes(
        &mut self,
        set: &PolicySet,
        numbering: &mut Numbering,
        output: &mut Output,
        changes: &mut IdentityChanges,
    ) {
        let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
        for block in self.blocks.keys() {
            prefixes.insert(block.cidr);
            prefixes.extend(block.except.iter().copied());
        }
        // The data path keeps IPv4 as IPv4-mapped IPv6, so an IPv6 prefix covering
        // that range (::/0 ...) would catch IPv4 traffic. An IPv4 /0 always wins.
        let mapped = ipv4_mapped_range();
        if prefixes.iter().any(|prefix| prefix.contains(&mapped)) {
            prefixes.insert("0.0.0.0/0".parse().expect("constant prefix"));
        }
        let mut next: BTreeMap<IpNet, u32> = BTreeMap::new();
        let mut next_cidr: HashMap<u32, CidrIdentity> = HashMap::new();
        for prefix in &prefixes {
            let covering: Vec<IpBlock> = self
                .block_index
                .covering(prefix)
                .into_iter()
                .filter(|block| !block.except.iter().any(|except| except.contains(prefix)))
                .cloned()
                .collect();
            let identity = if covering.is_empty() {
                IDENTITY_WORLD
            } else {
                let id = numbering.cidr_identity(&covering);
                next_cidr
                    .entry(id)
                    .or_insert_with(|| CidrIdentity {
                        ip_blocks: covering,
                        prefixes: BTreeSet::new(),
                    })
                    .prefixes
                    .insert(*prefix);
                id
            };
            next.insert(*prefix, identity);
        }
        // Identities that went or came, and their blocks' memberships.
        let old_cidr = std::mem::take(&mut self.cidr_identities);
        for (id, old) in &old_cidr {
            if next_cidr.contains_key(id) {
                continue;
            }
            numbering.release_cidr_identity(&old.ip_blocks);
            self.universe.remove(id);
            for block in &old.ip_blocks {
                if let Some(ids) = self.block_identities.get_mut(block) {
                    ids.remove(id);
                }
                changes.blocks_changed.insert(block.clone());
            }
            if !changes.added.remove(id) {
                changes.removed.insert(*id);
            }
        }
        for (id, new) in &next_cidr {
            if old_cidr.contains_key(id) {
                continue;
            }
            self.universe.insert(*id);
            for block in &new.ip_blocks {
                self.block_identities
                    .entry(block.clone())
                    .or_default()
                    .insert(*id);
                changes.blocks_changed.insert(block.clone());
            }
            changes.removed.remove(id);
            changes.added.insert(*id);
        }
        self.block_identities.retain(|_, ids| !ids.is_empty());
        self.cidr_identities = next_cidr;
        // The maps: prefixes gone, changed, new.
        let old = std::mem::replace(&mut self.prefixes, next);
        for (prefix, _) in old.iter().filter(|(p, _)| !self.prefixes.contains_key(p)) {
            self.write_prefix(set, *prefix, None, output);
        }
        let current: Vec<(IpNet, u32)> = self.prefixes.iter().map(|(p, id)| (*p, *id)).collect();
        for (prefix, id) in current {
            if old.get(&prefix) != Some(&id) {
                self.write_prefix(set, prefix, Some(id), output);
            }
        }
    }

    /// A prefix of full length is a host: in `peer_hosts` unless a workload has
    /// that address (its own identity accounts for its blocks).
    fn write_prefix(&self, set: &PolicySet, prefix: IpNet, id: Option<u32>, output: &mut Output) {
        if prefix.prefix_len() == prefix.max_prefix_len() {
            if set.workload_by_address(prefix.addr()).is_none() {
                output.set_peer_host(prefix.addr(), id);
            }
        } else {
            output.set_peer_prefix(prefix, id);
        }
    }
}
