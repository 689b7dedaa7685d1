//! Peer identity of an address: exact host addresses first (hash), then CIDR prefixes
//! (LPM trie: an `except` block is a longer prefix with its own identity), else world.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
};
use microseg_common::{
    AddrKey,
    identity::{IDENTITY_WORLD, PREFIX_KEY_FULL_BITS, PeerIdentity, PrefixKeyData},
    maps::{PEER_HOSTS_CAPACITY, PEER_PREFIXES_CAPACITY},
};

const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
static PEER_HOSTS: HashMap<AddrKey, PeerIdentity> =
    HashMap::with_max_entries(PEER_HOSTS_CAPACITY, BPF_F_NO_PREALLOC);

#[map]
static PEER_PREFIXES: LpmTrie<PrefixKeyData, PeerIdentity> =
    LpmTrie::with_max_entries(PEER_PREFIXES_CAPACITY, 0);

/// The peer identity of `addr`. Out of line: its two keys (24 bytes each) stay out of
/// the caller's stack frame.
#[inline(never)]
pub fn resolve(slot: u8, addr: &[u8; 16]) -> u32 {
    // SAFETY: the value is copied out at once (see endpoint::lookup).
    if let Some(host) = unsafe { PEER_HOSTS.get(&AddrKey::new(slot, *addr)) } {
        return host.identity;
    }
    let key = Key::new(PREFIX_KEY_FULL_BITS, PrefixKeyData::new(slot, *addr));
    match PEER_PREFIXES.get(&key) {
        Some(prefix) => prefix.identity,
        None => IDENTITY_WORLD,
    }
}
