//! Peer identities: `PEER_HOSTS` (`AddrKey` -> identity, exact addresses) and
//! `PEER_PREFIXES` (LPM trie of `PrefixKeyData` -> identity, true CIDR prefixes).
//!
//! Exact addresses stay out of the trie: a hash lookup costs a fraction of a trie
//! lookup at scale. The trie is only consulted when the hash map has no entry. An
//! `except` block is a longer prefix with its own identity, so longest-prefix-match
//! gives the right answer with one lookup.

/// Wildcard identity in policy keys: the rule allows any peer.
pub const IDENTITY_ANY: u32 = 0;
/// Reserved identity of addresses that no workload or prefix covers.
pub const IDENTITY_WORLD: u32 = 2;
/// Compiler-allocated identities start here; lower values are reserved.
pub const IDENTITY_FIRST_ALLOCATED: u32 = 256;

/// Data part of an LPM key in `PEER_PREFIXES`. Prefix bits cover the slot first, then
/// the address, so a key's prefix length is `PREFIX_KEY_FIXED_BITS + address bits`
/// (IPv4 prefixes are mapped: add 96).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixKeyData {
    slot: u8,
    addr: [u8; 16],
    _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PrefixKeyData>() == 20);

/// Bits of the key before the address: the slot byte.
pub const PREFIX_KEY_FIXED_BITS: u32 = 8;
/// Prefix length of a full-address lookup key.
pub const PREFIX_KEY_FULL_BITS: u32 = PREFIX_KEY_FIXED_BITS + 128;

impl PrefixKeyData {
    pub const fn new(slot: u8, addr: [u8; 16]) -> Self {
        Self {
            slot,
            addr,
            _pad: [0; 3],
        }
    }
    pub const fn slot(&self) -> u8 {
        self.slot
    }
    pub const fn addr(&self) -> [u8; 16] {
        self.addr
    }
}

/// The value of both identity maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub identity: u32,
}
const _: () = assert!(core::mem::size_of::<PeerIdentity>() == 4);

crate::impl_pod!(PrefixKeyData, PeerIdentity);
