//! The compiler's output, kept from one update to the next: the content of the
//! policy-bearing maps, and what the update in progress changed in it. Each layer
//! writes only the keys its change touches; the diff is read off those keys, so an
//! update costs what it changed, not the size of the state.

use std::collections::{BTreeMap, BTreeSet, btree_map::Entry};

use foldhash::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use microseg_common::endpoint::EndpointInfo;
use microseg_common::policy::PolicyEntry;

use crate::datapath::state::{DatapathState, PolicyMatch};

/// The value a key held before the update first touched it.
type Before<K, V> = BTreeMap<K, Option<V>>;

/// Changes between two states, per map: `Some(value)` to write, `None` to delete.
/// (Endpoints as the compiler makes them: the data path adds the flags it derives
/// from the entries.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledChanges {
    pub endpoints: BTreeMap<IpAddr, Option<EndpointInfo>>,
    pub peer_hosts: BTreeMap<IpAddr, Option<u32>>,
    pub peer_prefixes: BTreeMap<IpNet, Option<u32>>,
    pub policy: BTreeMap<PolicyMatch, Option<PolicyEntry>>,
    /// A peer address changed identity between two identities the policy entries
    /// tell apart: the flows allowed before may be wrong now (the data path finds
    /// the other revoking changes in the entries themselves).
    pub revokes: bool,
    /// Addresses that became a peer or an endpoint, or stopped being a peer: flows
    /// recorded with them (an address reused) are to be judged again.
    pub stale_addresses: BTreeSet<IpAddr>,
}

impl CompiledChanges {
    /// Entries changed.
    pub fn len(&self) -> usize {
        self.endpoints.len() + self.peer_hosts.len() + self.peer_prefixes.len() + self.policy.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The compiled state and the update's record of what it was before.
#[derive(Clone, Debug, Default)]
pub(super) struct Output {
    pub state: DatapathState,
    /// Policy entries naming each identity: an identity no entry names is judged as
    /// any other such one (by the endpoint's `any` entries or its default).
    identity_uses: HashMap<u32, u32>,
    endpoints: Before<IpAddr, EndpointInfo>,
    peer_hosts: Before<IpAddr, u32>,
    peer_prefixes: Before<IpNet, u32>,
    policy: Before<PolicyMatch, PolicyEntry>,
}

fn set<K: Ord + Copy, V: Copy>(
    map: &mut BTreeMap<K, V>,
    before: &mut Before<K, V>,
    key: K,
    value: Option<V>,
) {
    let old = match value {
        Some(value) => map.insert(key, value),
        None => map.remove(&key),
    };
    if let Entry::Vacant(slot) = before.entry(key) {
        slot.insert(old);
    }
}

fn changes<K: Ord + Copy, V: Copy + PartialEq>(
    map: &BTreeMap<K, V>,
    before: Before<K, V>,
) -> BTreeMap<K, Option<V>> {
    before
        .into_iter()
        .filter_map(|(key, old)| {
            let new = map.get(&key).copied();
            (new != old).then_some((key, new))
        })
        .collect()
}

impl Output {
    pub fn set_endpoint(&mut self, address: IpAddr, value: Option<EndpointInfo>) {
        set(
            &mut self.state.endpoints,
            &mut self.endpoints,
            address,
            value,
        );
    }

    pub fn set_peer_host(&mut self, address: IpAddr, value: Option<u32>) {
        set(
            &mut self.state.peer_hosts,
            &mut self.peer_hosts,
            address,
            value,
        );
    }

    pub fn set_peer_prefix(&mut self, prefix: IpNet, value: Option<u32>) {
        set(
            &mut self.state.peer_prefixes,
            &mut self.peer_prefixes,
            prefix,
            value,
        );
    }

    pub fn set_policy(&mut self, key: PolicyMatch, value: Option<PolicyEntry>) {
        let had = self.state.policy.contains_key(&key);
        set(&mut self.state.policy, &mut self.policy, key, value);
        match (had, value.is_some()) {
            (false, true) => *self.identity_uses.entry(key.identity).or_default() += 1,
            (true, false) => {
                if let Some(uses) = self.identity_uses.get_mut(&key.identity) {
                    *uses -= 1;
                    if *uses == 0 {
                        self.identity_uses.remove(&key.identity);
                    }
                }
            }
            _ => {}
        }
    }

    fn used(&self, identity: u32) -> bool {
        self.identity_uses.contains_key(&identity)
    }

    /// What the update changed, keys whose value ended where it began left out; the
    /// record starts afresh.
    pub fn take_changes(&mut self) -> CompiledChanges {
        // Before the record is dropped: how peers and endpoints changed.
        let mut revokes = false;
        let mut stale_addresses = BTreeSet::new();
        for (address, old) in &self.peer_hosts {
            let new = self.state.peer_hosts.get(address).copied();
            match (old, new) {
                (Some(old), Some(new)) if *old != new => {
                    revokes |= self.used(*old) || self.used(new);
                }
                (Some(_), None) | (None, Some(_)) => {
                    stale_addresses.insert(*address);
                }
                _ => {}
            }
        }
        for (address, old) in &self.endpoints {
            if old.is_none() && self.state.endpoints.contains_key(address) {
                stale_addresses.insert(*address);
            }
        }
        CompiledChanges {
            endpoints: changes(&self.state.endpoints, std::mem::take(&mut self.endpoints)),
            peer_hosts: changes(&self.state.peer_hosts, std::mem::take(&mut self.peer_hosts)),
            peer_prefixes: changes(
                &self.state.peer_prefixes,
                std::mem::take(&mut self.peer_prefixes),
            ),
            policy: changes(&self.state.policy, std::mem::take(&mut self.policy)),
            revokes,
            stale_addresses,
        }
    }
}
