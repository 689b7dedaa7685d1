//! Policy lookup: (endpoint, peer identity, direction, protocol, port) in an LPM trie
//! whose prefix covers protocol and port bits, so "any protocol", "any port" and port
//! ranges are shorter prefixes. Two lookups at most: the peer's identity, then any.

use aya_ebpf::{
    macros::map,
    maps::{LpmTrie, lpm_trie::Key},
};
use microseg_common::{
    identity::IDENTITY_ANY,
    maps::POLICY_CAPACITY,
    policy::{Direction, POLICY_PREFIX_FULL, PolicyEntry, PolicyKeyData},
};

#[map]
static POLICY: LpmTrie<PolicyKeyData, PolicyEntry> = LpmTrie::with_max_entries(POLICY_CAPACITY, 0);

#[inline(always)]
pub fn lookup(
    slot: u8,
    endpoint_id: u32,
    peer_identity: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
) -> Option<PolicyEntry> {
    let key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKeyData::new(slot, endpoint_id, peer_identity, direction, protocol, port),
    );
    if let Some(entry) = POLICY.get(&key) {
        return Some(*entry);
    }
    let any_peer = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKeyData::new(slot, endpoint_id, IDENTITY_ANY, direction, protocol, port),
    );
    POLICY.get(&any_peer).copied()
}
