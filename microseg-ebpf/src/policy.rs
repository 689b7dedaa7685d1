//! Policy lookup: (endpoint, peer identity, direction, protocol, port). Rules for one
//! exact port are in a hash map (`POLICY_EXACT`); ranges, "any port" and "any
//! protocol" are shorter prefixes in an LPM trie (`POLICY`) over the key's protocol
//! and port bits. An exact entry is the longest prefix there is, so hash first, then
//! trie, answers as the trie alone would. Order: the peer's identity, then any.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
};
use microseg_common::{
    identity::IDENTITY_ANY,
    maps::POLICY_CAPACITY,
    policy::{POLICY_PREFIX_FULL, PolicyEntry, PolicyKeyData},
};

/// BPF_F_NO_PREALLOC: memory only for the rules that exist.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
static POLICY: LpmTrie<PolicyKeyData, PolicyEntry> = LpmTrie::with_max_entries(POLICY_CAPACITY, 0);

#[map]
static POLICY_EXACT: HashMap<PolicyKeyData, PolicyEntry> =
    HashMap::with_max_entries(POLICY_CAPACITY, BPF_F_NO_PREALLOC);

/// The entry for `key` (with the peer's identity), or `PolicyEntry::NONE`. The trie
/// is consulted only for endpoints that have range or wildcard rules, and the
/// any-peer key only for endpoints that have rules for any peer, so an endpoint whose
/// rules all name single ports and peers costs one hash lookup. Out of line: its keys
/// stay out of the decision's stack frame.
#[inline(never)]
pub fn lookup(
    key: &PolicyKeyData,
    has_prefix_rules: bool,
    has_any_peer_rules: bool,
) -> PolicyEntry {
    let entry = lookup_identity(key, has_prefix_rules);
    if !entry.is_none() || !has_any_peer_rules {
        return entry;
    }
    lookup_identity(&key.with_identity(IDENTITY_ANY), has_prefix_rules)
}

#[inline(always)]
fn lookup_identity(key: &PolicyKeyData, has_prefix_rules: bool) -> PolicyEntry {
    // SAFETY: the value is copied out at once.
    if let Some(entry) = unsafe { POLICY_EXACT.get(key) } {
        return *entry;
    }
    if !has_prefix_rules {
        return PolicyEntry::NONE;
    }
    match POLICY.get(&Key::new(POLICY_PREFIX_FULL, *key)) {
        Some(entry) => *entry,
        None => PolicyEntry::NONE,
    }
}
