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
//!
//! A change is enforced at the switch. [`apply_changes`] stops there and hands
//! step 5 back as a [`StandbyRewrite`]: the grace period (a `synchronize_rcu`,
//! milliseconds) and the old slot's rewrite are off the path to enforcement, done
//! by the caller later (`Datapath::finish_standby`), at the latest before the next
//! update writes into that slot.

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
    DatapathError, DatapathState, PolicyMatch, StateCounts,
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

    /// Every difference between two states, as changes (endpoints as given, no
    /// derived flags): what makes `old` into `new`.
    pub fn between(old: &DatapathState, new: &DatapathState) -> Self {
        Self {
            endpoints: diff_maps(&old.endpoints, &new.endpoints),
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
    // A whole new state may take anything away: every flow is judged again.
    maps.set_revocation_floor(standby, next)?;
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

/// Applies `changes` (what the compiler says changed, endpoints without the flags
/// the data path derives) over `current` (what both slots hold; updated in place
/// once the switch is done) as the next generation. The steps of [`apply_state`] up
/// to the switch, at the cost of the change: only the changed entries are
/// validated and written, the derived flags are worked out for the endpoints whose
/// entries changed, and capacity is checked from counts. The old slot's rewrite is
/// returned, to be written after a grace period; `None` when nothing changed.
pub fn apply_changes(
    maps: &mut DatapathMaps<'_>,
    current: &mut DatapathState,
    exact_entries: &mut usize,
    changes: &StateDiff,
    revokes: bool,
) -> Result<(ApplyReport, Option<StandbyRewrite>), DatapathError> {
    validate_changes(changes)?;
    let diff = maps_diff(current, changes);
    let live = maps.live_generation()?;
    if diff.is_empty() {
        apply_to(current, changes);
        let report = ApplyReport {
            generation: live,
            changes: 0,
            standby_error: None,
        };
        return Ok((report, None));
    }
    let old_counts = current.counts_with_exact(*exact_entries);
    let new_counts = counts_after(current, old_counts, changes);
    check_capacity_counts(maps, old_counts, new_counts)?;
    let next = live.wrapping_add(1);
    let standby = slot_of(next);
    if let Err(error) = write_diff(maps, standby, &diff) {
        // Undo: make the standby slot hold `current` again.
        let undo = inverse(current, &diff);
        if let Err(undo_error) = write_diff(maps, standby, &undo) {
            tracing::error!(%undo_error, "could not restore the standby generation slot");
        }
        return Err(error);
    }
    crate::fault::crash_at("after-standby-write");
    // Flows allowed so far stay current unless the change takes something away.
    let floor = if revokes || takes_away(current, changes) {
        next
    } else {
        maps.revocation_floor(slot_of(live))?
    };
    apply_to(current, changes);
    *exact_entries = new_counts.policy_exact;
    maps.set_slot_mark(standby, slot_mark(&current.interfaces))?;
    maps.set_revocation_floor(standby, floor)?;
    maps.set_live_generation(next)?;
    crate::fault::crash_at("after-switch");
    let report = ApplyReport {
        generation: next,
        changes: diff.len(),
        standby_error: None,
    };
    let rewrite = StandbyRewrite {
        slot: slot_of(live),
        diff,
    };
    Ok((report, Some(rewrite)))
}

/// Step 5 of an update [`apply_changes`] switched: the same diff, for the old slot,
/// to write once no program still runs on it.
#[derive(Debug)]
pub struct StandbyRewrite {
    slot: u8,
    diff: StateDiff,
}

impl StandbyRewrite {
    /// Writes the diff into the old slot. The caller has waited out a grace period
    /// begun after the switch.
    pub fn write(&self, maps: &mut DatapathMaps<'_>) -> Result<(), DatapathError> {
        if crate::fault::fails_at("standby-rewrite") {
            return Err(DatapathError::InvalidState(
                "rewriting the standby generation slot: injected failure".into(),
            ));
        }
        write_diff(maps, self.slot, &self.diff)
    }
}

/// Whether `changes` may make a flow allowed under `current` wrong: an allowing
/// entry removed or turned to deny, a deny entry added where there was none, an
/// enforced endpoint's settings changed, a CIDR prefix changed. (Peers changing
/// identity are the compiler's to judge: it knows which identities the entries
/// tell apart.) Additions that allow more never revoke.
fn takes_away(current: &DatapathState, changes: &StateDiff) -> bool {
    let policy = changes.policy.iter().any(|(key, new)| {
        let old = current.policy.get(key);
        let old_allows = old.is_some_and(|entry| !entry.is_deny());
        let new_allows = new.is_some_and(|entry| !entry.is_deny());
        (old_allows && !new_allows)
            || (new.is_some_and(|e| e.is_deny()) && !old.is_some_and(|e| e.is_deny()))
    });
    let endpoints = changes.endpoints.iter().any(|(address, new)| {
        matches!((current.endpoints.get(address), new), (Some(old), Some(new)) if old != new)
    });
    let prefixes = changes
        .peer_prefixes
        .iter()
        .any(|(prefix, new)| current.peer_prefixes.get(prefix) != new.as_ref());
    policy || endpoints || prefixes
}

/// The changed entries are ones the maps can represent (see `validate_state`).
fn validate_changes(changes: &StateDiff) -> Result<(), DatapathError> {
    let state = DatapathState {
        peer_prefixes: changes
            .peer_prefixes
            .iter()
            .filter_map(|(prefix, id)| Some((*prefix, (*id)?)))
            .collect(),
        policy: changes
            .policy
            .iter()
            .filter_map(|(key, entry)| Some((*key, (*entry)?)))
            .collect(),
        ..DatapathState::default()
    };
    validate_state(&state)
}

/// The derived flags of endpoint `endpoint_id` in `policy`.
fn derived_flags(policy: &BTreeMap<PolicyMatch, PolicyEntry>, endpoint_id: u32) -> u16 {
    let mut flags = 0;
    for rule in endpoint_entries(policy, endpoint_id) {
        if !rule.is_exact_port() {
            flags |= ENDPOINT_FLAG_PREFIX_RULES;
        }
        if rule.identity == IDENTITY_ANY {
            flags |= ENDPOINT_FLAG_ANY_PEER_RULES;
        }
        if flags == ENDPOINT_FLAG_PREFIX_RULES | ENDPOINT_FLAG_ANY_PEER_RULES {
            break;
        }
    }
    flags
}

/// The policy keys of one endpoint (keys sort by endpoint first).
fn endpoint_entries(
    policy: &BTreeMap<PolicyMatch, PolicyEntry>,
    endpoint_id: u32,
) -> impl Iterator<Item = &PolicyMatch> {
    let first = PolicyMatch {
        endpoint_id,
        identity: 0,
        direction: microseg_common::policy::Direction::Ingress,
        protocol: None,
        port_block: None,
    };
    policy
        .range(first..)
        .map(|(key, _)| key)
        .take_while(move |key| key.endpoint_id == endpoint_id)
}

fn with_flags(info: EndpointInfo, derived: u16) -> EndpointInfo {
    let mut info = info;
    info.flags = (info.flags & !ENDPOINT_DERIVED_FLAGS) | derived;
    info
}

/// What to write to a slot holding `current` to make it hold `current` changed by
/// `changes`, endpoints with their derived flags.
fn maps_diff(current: &DatapathState, changes: &StateDiff) -> StateDiff {
    // The policy entries after the change, for the endpoints whose entries changed.
    let touched: std::collections::BTreeSet<u32> =
        changes.policy.keys().map(|key| key.endpoint_id).collect();
    let mut after_flags: BTreeMap<u32, (u16, u16)> = BTreeMap::new();
    for endpoint_id in &touched {
        let before = derived_flags(&current.policy, *endpoint_id);
        let mut entries: BTreeMap<PolicyMatch, PolicyEntry> =
            endpoint_entries(&current.policy, *endpoint_id)
                .map(|key| (*key, current.policy[key]))
                .collect();
        for (key, entry) in changes.policy.range(
            PolicyMatch {
                endpoint_id: *endpoint_id,
                identity: 0,
                direction: microseg_common::policy::Direction::Ingress,
                protocol: None,
                port_block: None,
            }..,
        ) {
            if key.endpoint_id != *endpoint_id {
                break;
            }
            match entry {
                Some(entry) => entries.insert(*key, *entry),
                None => entries.remove(key),
            };
        }
        after_flags.insert(
            *endpoint_id,
            (before, derived_flags(&entries, *endpoint_id)),
        );
    }
    let mut endpoints: BTreeMap<IpAddr, Option<EndpointInfo>> = BTreeMap::new();
    // Endpoints the change writes.
    for (address, info) in &changes.endpoints {
        let old = current
            .endpoints
            .get(address)
            .map(|info| with_flags(*info, derived_flags(&current.policy, info.endpoint_id)));
        let new = info.map(|info| {
            let derived = after_flags
                .get(&info.endpoint_id)
                .map_or_else(|| derived_flags(&current.policy, info.endpoint_id), |f| f.1);
            with_flags(info, derived)
        });
        if old != new {
            endpoints.insert(*address, new);
        }
    }
    // Endpoints whose derived flags changed with their entries.
    let flipped: std::collections::BTreeSet<u32> = after_flags
        .iter()
        .filter(|(_, (before, after))| before != after)
        .map(|(id, _)| *id)
        .collect();
    if !flipped.is_empty() {
        for (address, info) in &current.endpoints {
            if !flipped.contains(&info.endpoint_id) || changes.endpoints.contains_key(address) {
                continue;
            }
            endpoints.insert(
                *address,
                Some(with_flags(*info, after_flags[&info.endpoint_id].1)),
            );
        }
    }
    StateDiff {
        endpoints,
        peer_hosts: changes
            .peer_hosts
            .iter()
            .filter(|(address, id)| current.peer_hosts.get(address) != id.as_ref())
            .map(|(address, id)| (*address, *id))
            .collect(),
        peer_prefixes: changes
            .peer_prefixes
            .iter()
            .filter(|(prefix, id)| current.peer_prefixes.get(prefix) != id.as_ref())
            .map(|(prefix, id)| (*prefix, *id))
            .collect(),
        policy: changes
            .policy
            .iter()
            .filter(|(key, entry)| current.policy.get(key) != entry.as_ref())
            .map(|(key, entry)| (*key, *entry))
            .collect(),
        interfaces: changes
            .interfaces
            .iter()
            .filter(|(ifindex, binding)| current.interfaces.get(ifindex) != binding.as_ref())
            .map(|(ifindex, binding)| (*ifindex, *binding))
            .collect(),
    }
}

/// The diff that undoes `diff` over `current` (as the maps held it before).
fn inverse(current: &DatapathState, diff: &StateDiff) -> StateDiff {
    StateDiff {
        endpoints: diff
            .endpoints
            .keys()
            .map(|address| {
                let old = current.endpoints.get(address).map(|info| {
                    with_flags(*info, derived_flags(&current.policy, info.endpoint_id))
                });
                (*address, old)
            })
            .collect(),
        peer_hosts: diff
            .peer_hosts
            .keys()
            .map(|a| (*a, current.peer_hosts.get(a).copied()))
            .collect(),
        peer_prefixes: diff
            .peer_prefixes
            .keys()
            .map(|p| (*p, current.peer_prefixes.get(p).copied()))
            .collect(),
        policy: diff
            .policy
            .keys()
            .map(|k| (*k, current.policy.get(k).copied()))
            .collect(),
        interfaces: diff
            .interfaces
            .keys()
            .map(|i| (*i, current.interfaces.get(i).copied()))
            .collect(),
    }
}

fn apply_map<K: Ord + Copy, V: Copy>(map: &mut BTreeMap<K, V>, changes: &BTreeMap<K, Option<V>>) {
    for (key, value) in changes {
        match value {
            Some(value) => map.insert(*key, *value),
            None => map.remove(key),
        };
    }
}

/// `current` changed by `changes`.
fn apply_to(current: &mut DatapathState, changes: &StateDiff) {
    apply_map(&mut current.endpoints, &changes.endpoints);
    apply_map(&mut current.peer_hosts, &changes.peer_hosts);
    apply_map(&mut current.peer_prefixes, &changes.peer_prefixes);
    apply_map(&mut current.policy, &changes.policy);
    apply_map(&mut current.interfaces, &changes.interfaces);
}

/// Entry counts (`counts`, of `current`) after `changes`.
fn counts_after(current: &DatapathState, counts: StateCounts, changes: &StateDiff) -> StateCounts {
    fn delta<K: Ord, V>(map: &BTreeMap<K, V>, changes: &BTreeMap<K, Option<V>>) -> isize {
        changes
            .iter()
            .map(
                |(key, value)| match (map.contains_key(key), value.is_some()) {
                    (false, true) => 1,
                    (true, false) => -1,
                    _ => 0,
                },
            )
            .sum()
    }
    let mut counts = counts;
    let apply = |count: &mut usize, d: isize| *count = (*count as isize + d).max(0) as usize;
    apply(
        &mut counts.endpoints,
        delta(&current.endpoints, &changes.endpoints),
    );
    apply(
        &mut counts.peer_hosts,
        delta(&current.peer_hosts, &changes.peer_hosts),
    );
    apply(
        &mut counts.peer_prefixes,
        delta(&current.peer_prefixes, &changes.peer_prefixes),
    );
    apply(
        &mut counts.interfaces,
        delta(&current.interfaces, &changes.interfaces),
    );
    let policy_delta = delta(&current.policy, &changes.policy);
    apply(&mut counts.policy, policy_delta);
    let exact_delta: isize = changes
        .policy
        .iter()
        .filter(|(key, _)| key.is_exact_port())
        .map(
            |(key, value)| match (current.policy.contains_key(key), value.is_some()) {
                (false, true) => 1,
                (true, false) => -1,
                _ => 0,
            },
        )
        .sum();
    apply(&mut counts.policy_exact, exact_delta);
    counts
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
    check_capacity_counts(maps, current.counts(), new.counts())
}

/// As [`check_capacity`], from the two states' entry counts.
fn check_capacity_counts(
    maps: &DatapathMaps<'_>,
    old: StateCounts,
    counts: StateCounts,
) -> Result<(), DatapathError> {
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
