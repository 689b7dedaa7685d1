//! Atomic policy updates by generation switch.
//!
//! Both generation slots hold the same state between updates. To apply a new state:
//! 1. diff the new state against the current one;
//! 2. check that every map has room for the old and the new entries side by side;
//! 3. write the diff into the standby slot (on any failure, undo it: the standby slot
//!    is restored and the live one was never touched);
//! 4. switch: write the next generation number (one 4-byte store);
//! 5. wait out packets still judged under the old generation (a real grace period,
//!    see `grace`), then write the same diff into the old slot, which becomes the
//!    standby.
//!
//! A packet reads the generation once, so it is judged by one generation whole. The
//! cost of an update is proportional to what changed, not to the policy's size.
//! Once the switch is done the new generation is live whatever follows: if step 5
//! fails, the report says so and the standby slot is repaired from the live one
//! (`resync_standby`) before the next update writes into it.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{IterableMap, lpm_trie::Key};
use ipnet::IpNet;
use microseg_common::{
    AddrKey,
    config::{SLOT_MARK_AWAITS_POLICY, SLOT_MARK_BINDS, slot_of},
    endpoint::{
        ENDPOINT_DERIVED_FLAGS, ENDPOINT_FLAG_ANY_PEER_RULES, ENDPOINT_FLAG_PREFIX_RULES,
        EndpointInfo,
    },
    identity::IDENTITY_ANY,
    identity::PeerIdentity,
    interface::{InterfaceBinding, InterfaceKey},
    maps,
    policy::{
        POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL, POLICY_PREFIX_FULL, PolicyEntry,
        PolicyKeyData,
    },
};

use super::{
    DatapathError, DatapathState, PolicyMatch,
    addr::{from_mapped, from_mapped_prefix, to_mapped},
    grace::GracePeriod,
    maps::{DatapathMaps, capacity_of, prefix_key},
};

/// Changes between two states, per map: `Some(value)` to write, `None` to delete.
#[derive(Debug, Default)]
pub struct StateDiff {
    pub endpoints: BTreeMap<IpAddr, Option<EndpointInfo>>,
    pub peer_hosts: BTreeMap<IpAddr, Option<u32>>,
    pub peer_prefixes: BTreeMap<IpNet, Option<u32>>,
    pub policy: BTreeMap<PolicyMatch, Option<PolicyEntry>>,
    pub interfaces: BTreeMap<u32, Option<InterfaceBinding>>,
}

impl StateDiff {
    /// What to write to a slot holding `old` to make it hold `new`, endpoints with
    /// the flags the maps carry (`endpoints_with_derived_flags`).
    pub fn for_maps(old: &DatapathState, new: &DatapathState) -> Self {
        Self {
            endpoints: diff_maps(
                &endpoints_with_derived_flags(old),
                &endpoints_with_derived_flags(new),
            ),
            peer_hosts: diff_maps(&old.peer_hosts, &new.peer_hosts),
            peer_prefixes: diff_maps(&old.peer_prefixes, &new.peer_prefixes),
            policy: diff_maps(&old.policy, &new.policy),
            interfaces: diff_maps(&old.interfaces, &new.interfaces),
        }
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
            + self.peer_hosts.len()
            + self.peer_prefixes.len()
            + self.policy.len()
            + self.interfaces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Both maps walked side by side in key order: linear, no lookups.
fn diff_maps<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> BTreeMap<K, Option<V>> {
    use std::cmp::Ordering;
    let mut diff = Vec::new();
    let mut old_entries = old.iter().peekable();
    let mut new_entries = new.iter().peekable();
    loop {
        match (old_entries.peek(), new_entries.peek()) {
            (None, None) => break,
            (Some((key, _)), None) => {
                diff.push((**key, None));
                old_entries.next();
            }
            (None, Some((key, value))) => {
                diff.push((**key, Some(**value)));
                new_entries.next();
            }
            (Some((old_key, old_value)), Some((new_key, new_value))) => {
                match old_key.cmp(new_key) {
                    Ordering::Less => {
                        diff.push((**old_key, None));
                        old_entries.next();
                    }
                    Ordering::Greater => {
                        diff.push((**new_key, Some(**new_value)));
                        new_entries.next();
                    }
                    Ordering::Equal => {
                        if old_value != new_value {
                            diff.push((**new_key, Some(**new_value)));
                        }
                        old_entries.next();
                        new_entries.next();
                    }
                }
            }
        }
    }
    // Sorted and distinct already: built in one pass.
    diff.into_iter().collect()
}

/// What an apply did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyReport {
    /// The live generation: the new one, once switched.
    pub generation: u32,
    /// Map entries changed (per slot).
    pub changes: usize,
    /// Why the standby slot could not be brought to the new state after the switch,
    /// if it could not; it is repaired before the next update.
    pub standby_error: Option<String>,
}

/// Applies `new` over `current` (what both slots hold now) as the next generation.
pub fn apply_state(
    maps: &mut DatapathMaps<'_>,
    grace: &GracePeriod,
    current: &DatapathState,
    new: &DatapathState,
) -> Result<ApplyReport, DatapathError> {
    validate_state(new)?;
    let diff = StateDiff::for_maps(current, new);
    let live = maps.live_generation()?;
    if diff.is_empty() {
        return Ok(ApplyReport {
            generation: live,
            changes: 0,
            standby_error: None,
        });
    }
    check_capacity(maps, current, new)?;
    let next = live.wrapping_add(1);
    let standby = slot_of(next);
    if let Err(error) = write_diff(maps, standby, &diff) {
        // Undo: make the standby slot hold `current` again.
        let undo = StateDiff::for_maps(new, current);
        if let Err(undo_error) = write_diff(maps, standby, &undo) {
            tracing::error!(%undo_error, "could not restore the standby generation slot");
        }
        return Err(error);
    }
    crate::fault::crash_at("after-standby-write");
    // Only the live slot's interface mark is read: each slot's is set here, before
    // the slot goes live.
    maps.set_slot_mark(standby, slot_mark(&new.interfaces))?;
    maps.set_live_generation(next)?;
    crate::fault::crash_at("after-switch");
    // From here on the new generation is live: failures only leave the standby slot
    // behind, and the report says so.
    let standby_error = match grace.wait() {
        Ok(()) if crate::fault::fails_at("standby-rewrite") => {
            Some("rewriting the standby generation slot: injected failure".to_owned())
        }
        // The old slot is now standby: bring it to the new state too.
        Ok(()) => write_diff(maps, slot_of(live), &diff)
            .err()
            .map(|e| format!("rewriting the standby generation slot: {e}")),
        // Without a grace period the old slot may still be read: leave it alone.
        Err(e) => Some(format!(
            "waiting for programs still running on the old generation: {e}"
        )),
    };
    Ok(ApplyReport {
        generation: next,
        changes: diff.len(),
        standby_error,
    })
}

/// Endpoints as the maps hold them: those with range or wildcard rules (entries in
/// the prefix trie) carry `ENDPOINT_FLAG_PREFIX_RULES`, the others skip the trie;
/// those with rules for any peer carry `ENDPOINT_FLAG_ANY_PEER_RULES`, the others
/// skip the any-peer lookup. Idempotent; `read_slot` strips the flags again.
fn endpoints_with_derived_flags(state: &DatapathState) -> BTreeMap<IpAddr, EndpointInfo> {
    // One pass over the rules for both flags.
    let mut with_prefix_rules = std::collections::BTreeSet::new();
    let mut with_any_peer_rules = std::collections::BTreeSet::new();
    for rule in state.policy.keys() {
        if !rule.is_exact_port() {
            with_prefix_rules.insert(rule.endpoint_id);
        }
        if rule.identity == IDENTITY_ANY {
            with_any_peer_rules.insert(rule.endpoint_id);
        }
    }
    state
        .endpoints
        .iter()
        .map(|(address, info)| {
            let mut info = *info;
            info.flags &= !ENDPOINT_DERIVED_FLAGS;
            if with_prefix_rules.contains(&info.endpoint_id) {
                info.flags |= ENDPOINT_FLAG_PREFIX_RULES;
            }
            if with_any_peer_rules.contains(&info.endpoint_id) {
                info.flags |= ENDPOINT_FLAG_ANY_PEER_RULES;
            }
            (*address, info)
        })
        .collect()
}

/// Rejects states the maps cannot represent: full-length prefixes belong in
/// `peer_hosts`, and port blocks must be aligned.
fn validate_state(state: &DatapathState) -> Result<(), DatapathError> {
    for prefix in state.peer_prefixes.keys() {
        if *prefix != prefix.trunc() {
            return Err(DatapathError::InvalidState(format!(
                "prefix {prefix} has host bits set"
            )));
        }
    }
    for rule in state.policy.keys() {
        if let Some((first, bits)) = rule.port_block {
            if rule.protocol.is_none() || bits > 16 {
                return Err(DatapathError::InvalidState(format!(
                    "port block {first}/{bits} needs a protocol and at most 16 bits"
                )));
            }
            let host_mask = if bits == 16 { 0 } else { u16::MAX >> bits };
            if first & host_mask != 0 {
                return Err(DatapathError::InvalidState(format!(
                    "port block {first}/{bits} is not aligned"
                )));
            }
        }
    }
    Ok(())
}

/// Checks that each map can hold both states at once (the old in the live slot while
/// the new is written) and the new state twice (both slots after the update).
fn check_capacity(
    maps: &DatapathMaps<'_>,
    current: &DatapathState,
    new: &DatapathState,
) -> Result<(), DatapathError> {
    let old = current.counts();
    let counts = new.counts();
    let checks = [
        (
            maps::ENDPOINTS,
            old.endpoints,
            counts.endpoints,
            maps.endpoints.map(),
        ),
        (
            maps::PEER_HOSTS,
            old.peer_hosts,
            counts.peer_hosts,
            maps.peer_hosts.map(),
        ),
        (
            maps::PEER_PREFIXES,
            old.peer_prefixes,
            counts.peer_prefixes,
            maps.peer_prefixes.map(),
        ),
        (
            maps::POLICY,
            old.policy - old.policy_exact,
            counts.policy - counts.policy_exact,
            maps.policy.map(),
        ),
        (
            maps::POLICY_EXACT,
            old.policy_exact,
            counts.policy_exact,
            maps.policy_exact.map(),
        ),
        (
            maps::INTERFACES,
            old.interfaces,
            counts.interfaces,
            maps.interfaces.map(),
        ),
    ];
    for (map, old_entries, new_entries, data) in checks {
        let capacity = capacity_of(map, data)?;
        let needed = (old_entries + new_entries).max(2 * new_entries);
        if needed > capacity {
            return Err(DatapathError::MapFull {
                map,
                needed,
                capacity,
            });
        }
    }
    Ok(())
}

pub(super) fn policy_key(slot: u8, rule: &PolicyMatch) -> Key<PolicyKeyData> {
    let protocol = rule.protocol.unwrap_or(0);
    let (port, prefix) = match (rule.protocol, rule.port_block) {
        (None, _) => (0, POLICY_PREFIX_ANY_PROTOCOL),
        (Some(_), None) => (0, POLICY_PREFIX_ANY_PORT),
        (Some(_), Some((first, bits))) => (first, POLICY_PREFIX_ANY_PORT + bits as u32),
    };
    debug_assert!(prefix <= POLICY_PREFIX_FULL);
    Key::new(
        prefix,
        PolicyKeyData::new(
            slot,
            rule.endpoint_id,
            rule.identity,
            rule.direction,
            protocol,
            port,
        ),
    )
}

/// Writes `diff` into `slot`: every deletion first, then every insertion, so that a
/// map never holds more than the old and the new state of the slot together (what
/// `check_capacity` allows for), whatever the order of keys.
/// A slot's mark (`microseg_common::config`): whether it binds interfaces, and
/// whether one of them awaits its workload's policy.
fn slot_mark(interfaces: &BTreeMap<u32, InterfaceBinding>) -> u32 {
    let mut mark = 0;
    if !interfaces.is_empty() {
        mark |= SLOT_MARK_BINDS;
    }
    if interfaces.values().any(InterfaceBinding::awaits_policy) {
        mark |= SLOT_MARK_AWAITS_POLICY;
    }
    mark
}

fn write_diff(
    maps: &mut DatapathMaps<'_>,
    slot: u8,
    diff: &StateDiff,
) -> Result<(), DatapathError> {
    write_pass(maps, slot, diff, Pass::Deletions)?;
    write_pass(maps, slot, diff, Pass::Insertions)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Deletions,
    Insertions,
}

impl Pass {
    /// Whether this pass writes a diff entry (`Some` inserts, `None` deletes).
    fn takes<T>(self, value: &Option<T>) -> bool {
        (self == Pass::Insertions) == value.is_some()
    }
}

fn write_pass(
    maps: &mut DatapathMaps<'_>,
    slot: u8,
    diff: &StateDiff,
    pass: Pass,
) -> Result<(), DatapathError> {
    let err = |map: &'static str| {
        move |source: aya::maps::MapError| DatapathError::Map {
            map,
            source: Box::new(source),
        }
    };
    // Deletions of absent keys are not errors: an undo may delete what was never
    // written.
    let absent_ok = |result: Result<(), aya::maps::MapError>| match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    };
    for (addr, value) in diff.endpoints.iter().filter(|(_, v)| pass.takes(v)) {
        let key = AddrKey::new(slot, to_mapped(*addr));
        match value {
            Some(info) => maps.endpoints.insert(key, info, 0),
            None => absent_ok(maps.endpoints.remove(&key)),
        }
        .map_err(err(maps::ENDPOINTS))?;
    }
    for (addr, value) in diff.peer_hosts.iter().filter(|(_, v)| pass.takes(v)) {
        let key = AddrKey::new(slot, to_mapped(*addr));
        match value {
            Some(identity) => maps.peer_hosts.insert(
                key,
                PeerIdentity {
                    identity: *identity,
                },
                0,
            ),
            None => absent_ok(maps.peer_hosts.remove(&key)),
        }
        .map_err(err(maps::PEER_HOSTS))?;
    }
    for (prefix, value) in diff.peer_prefixes.iter().filter(|(_, v)| pass.takes(v)) {
        let key = prefix_key(slot, prefix);
        match value {
            Some(identity) => maps.peer_prefixes.insert(
                &key,
                PeerIdentity {
                    identity: *identity,
                },
                0,
            ),
            None => absent_ok(maps.peer_prefixes.remove(&key)),
        }
        .map_err(err(maps::PEER_PREFIXES))?;
    }
    for (ifindex, value) in diff.interfaces.iter().filter(|(_, v)| pass.takes(v)) {
        let key = InterfaceKey::new(slot, *ifindex);
        match value {
            Some(binding) => maps.interfaces.insert(key, binding, 0),
            None => absent_ok(maps.interfaces.remove(&key)),
        }
        .map_err(err(maps::INTERFACES))?;
    }
    for (rule, value) in diff.policy.iter().filter(|(_, v)| pass.takes(v)) {
        let key = policy_key(slot, rule);
        if rule.is_exact_port() {
            match value {
                Some(entry) => maps.policy_exact.insert(key.data(), entry, 0),
                None => absent_ok(maps.policy_exact.remove(&key.data())),
            }
            .map_err(err(maps::POLICY_EXACT))?;
        } else {
            match value {
                Some(entry) => maps.policy.insert(&key, entry, 0),
                None => absent_ok(maps.policy.remove(&key)),
            }
            .map_err(err(maps::POLICY))?;
        }
    }
    Ok(())
}

/// Reads the state of one generation slot back from the maps (for an agent adopting
/// pinned maps after a restart, and for tests).
pub fn read_slot(maps: &DatapathMaps<'_>, slot: u8) -> Result<DatapathState, DatapathError> {
    let err = |map: &'static str| {
        move |source: aya::maps::MapError| DatapathError::Map {
            map,
            source: Box::new(source),
        }
    };
    let mut state = DatapathState::default();
    for item in maps.endpoints.iter() {
        let (key, info) = item.map_err(err(maps::ENDPOINTS))?;
        if key.slot() == slot {
            let mut info = info;
            info.flags &= !ENDPOINT_DERIVED_FLAGS;
            state.endpoints.insert(from_mapped(key.addr()), info);
        }
    }
    for item in maps.peer_hosts.iter() {
        let (key, identity) = item.map_err(err(maps::PEER_HOSTS))?;
        if key.slot() == slot {
            state
                .peer_hosts
                .insert(from_mapped(key.addr()), identity.identity);
        }
    }
    for item in maps.peer_prefixes.iter() {
        let (key, identity) = item.map_err(err(maps::PEER_PREFIXES))?;
        let data = key.data();
        if data.slot() != slot {
            continue;
        }
        let bits = key.prefix_len() - microseg_common::identity::PREFIX_KEY_FIXED_BITS;
        if let Some(prefix) = from_mapped_prefix(data.addr(), bits) {
            state.peer_prefixes.insert(prefix, identity.identity);
        }
    }
    for item in maps.interfaces.iter() {
        let (key, binding) = item.map_err(err(maps::INTERFACES))?;
        if key.slot() == slot {
            state.interfaces.insert(key.ifindex(), binding);
        }
    }
    let exact = maps.policy_exact.iter().map(|item| {
        item.map(|(data, entry)| (Key::new(POLICY_PREFIX_FULL, data), entry))
            .map_err(err(maps::POLICY_EXACT))
    });
    let prefixes = maps
        .policy
        .iter()
        .map(|item| item.map_err(err(maps::POLICY)));
    for item in prefixes.chain(exact) {
        let (key, entry) = item?;
        let data = key.data();
        if data.slot() != slot {
            continue;
        }
        let Some(direction) = microseg_common::policy::Direction::from_code(data.direction())
        else {
            continue;
        };
        let prefix = key.prefix_len();
        let (protocol, port_block) = if prefix <= POLICY_PREFIX_ANY_PROTOCOL {
            (None, None)
        } else if prefix == POLICY_PREFIX_ANY_PORT {
            (Some(data.protocol()), None)
        } else {
            (
                Some(data.protocol()),
                Some((data.port(), (prefix - POLICY_PREFIX_ANY_PORT) as u8)),
            )
        };
        state.policy.insert(
            PolicyMatch {
                endpoint_id: data.endpoint_id(),
                identity: data.identity(),
                direction,
                protocol,
                port_block,
            },
            entry,
        );
    }
    Ok(state)
}

/// Reads the live generation's state and makes the standby slot equal to it (repairs
/// an update that was cut off between the switch and the rewrite of the old slot).
pub fn resync_standby(maps: &mut DatapathMaps<'_>) -> Result<DatapathState, DatapathError> {
    let live = maps.live_generation()?;
    let live_state = read_slot(maps, slot_of(live))?;
    let standby = slot_of(live.wrapping_add(1));
    let standby_state = read_slot(maps, standby)?;
    // Compared and written as the maps hold them, derived flags included (read_slot
    // strips them: written without, an endpoint would skip its prefix rules).
    let repair = StateDiff::for_maps(&standby_state, &live_state);
    write_diff(maps, standby, &repair)?;
    Ok(live_state)
}
