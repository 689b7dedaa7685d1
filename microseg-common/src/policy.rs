//! Policy entries (`POLICY`: LPM trie of `PolicyKeyData` -> `PolicyEntry`).
//!
//! As in Cilium's policy map, the key ends in protocol and destination port, and the
//! prefix length says how much of that tail must match:
//! - `POLICY_PREFIX_ANY_PROTOCOL`: any protocol, any port;
//! - `POLICY_PREFIX_ANY_PORT`: this protocol, any port;
//! - `POLICY_PREFIX_ANY_PORT + n`: this protocol, ports sharing the first n bits.
//!
//! A port range becomes a few power-of-two blocks ([`port_range_blocks`]). Rules for
//! one exact port (most rules) live in `POLICY_EXACT`, a hash map keyed by the full
//! key: they are the trie's longest prefixes anyway, so looking there first gives the
//! same answer as the trie alone, at hash cost. Per enforced direction: the peer's
//! identity (exact, then trie), then `IDENTITY_ANY` (exact, then trie).

/// Direction of a policy: ingress (the endpoint receives) or egress (it sends).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress = 1,
    Egress = 2,
}

impl Direction {
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Ingress),
            2 => Some(Self::Egress),
            _ => None,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ingress => "INGRESS",
            Self::Egress => "EGRESS",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyKeyData {
    endpoint_id: [u8; 4],
    identity: [u8; 4],
    slot: u8,
    direction: u8,
    protocol: u8,
    port: [u8; 2],
    _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PolicyKeyData>() == 16);

/// Bits always matched: endpoint, identity, slot, direction.
pub const POLICY_PREFIX_ANY_PROTOCOL: u32 = 80;
/// Bits matched by a rule for one protocol and any port.
pub const POLICY_PREFIX_ANY_PORT: u32 = 88;
/// Bits matched by a rule for one protocol and one port (and by every lookup key).
pub const POLICY_PREFIX_FULL: u32 = 104;

impl PolicyKeyData {
    pub const fn new(
        slot: u8,
        endpoint_id: u32,
        identity: u32,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> Self {
        Self {
            endpoint_id: endpoint_id.to_be_bytes(),
            identity: identity.to_be_bytes(),
            slot,
            direction: direction as u8,
            protocol,
            port: port.to_be_bytes(),
            _pad: [0; 3],
        }
    }
    pub const fn endpoint_id(&self) -> u32 {
        u32::from_be_bytes(self.endpoint_id)
    }
    pub const fn identity(&self) -> u32 {
        u32::from_be_bytes(self.identity)
    }
    pub const fn slot(&self) -> u8 {
        self.slot
    }
    pub const fn direction(&self) -> u8 {
        self.direction
    }
    pub const fn protocol(&self) -> u8 {
        self.protocol
    }
    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
    /// The same key for another peer identity.
    pub const fn with_identity(mut self, identity: u32) -> Self {
        self.identity = identity.to_be_bytes();
        self
    }
}

/// What a matching policy entry says.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyEntry {
    /// Agent-assigned rule number: names the policy and rule in events.
    pub rule_id: u32,
    /// `POLICY_ACTION_*`.
    pub action: u8,
    _pad: u8,
    /// Where the rule's hits are counted (`crate::rule_hits`); 0: not counted.
    pub hit_slot: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyEntry>() == 8);

/// No entry matched (a plain value rather than an `Option`, for the BPF verifier).
pub const POLICY_ACTION_NONE: u8 = 0;
pub const POLICY_ACTION_ALLOW: u8 = 1;
pub const POLICY_ACTION_DENY: u8 = 2;

impl PolicyEntry {
    pub const NONE: Self = Self {
        rule_id: 0,
        action: POLICY_ACTION_NONE,
        _pad: 0,
        hit_slot: 0,
    };
    pub const fn is_none(&self) -> bool {
        self.action == POLICY_ACTION_NONE
    }
    pub const fn allow(rule_id: u32) -> Self {
        Self {
            rule_id,
            action: POLICY_ACTION_ALLOW,
            _pad: 0,
            hit_slot: 0,
        }
    }
    pub const fn deny(rule_id: u32) -> Self {
        Self {
            rule_id,
            action: POLICY_ACTION_DENY,
            _pad: 0,
            hit_slot: 0,
        }
    }
    /// The same entry, counted in `hit_slot`.
    pub const fn with_hit_slot(mut self, hit_slot: u16) -> Self {
        self.hit_slot = hit_slot;
        self
    }
    pub const fn is_deny(&self) -> bool {
        self.action == POLICY_ACTION_DENY
    }
}

/// Rule id of "no rule": the default deny of an endpoint a NetworkPolicy selects, or,
/// in an allow entry, a flow no ClusterNetworkPolicy tier decided and no
/// NetworkPolicy isolates.
pub const RULE_ID_DEFAULT_DENY: u32 = 0;

/// Splits the inclusive port range `first..=last` into aligned power-of-two blocks,
/// each given as (first port of the block, number of fixed leading port bits).
/// Calls `emit` once per block, fewest blocks possible (at most 30 for 16-bit ports).
pub fn port_range_blocks(first: u16, last: u16, mut emit: impl FnMut(u16, u8)) {
    if first > last {
        return;
    }
    let mut start = first as u32;
    let end = last as u32;
    while start <= end {
        // Largest aligned block starting at `start` that does not pass `end`.
        let mut size_log2 = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1u32 << size_log2) - 1 > end {
            size_log2 -= 1;
        }
        emit(start as u16, (16 - size_log2) as u8);
        start += 1u32 << size_log2;
    }
}

crate::impl_pod!(PolicyKeyData, PolicyEntry);

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::port_range_blocks;

    fn blocks(first: u16, last: u16) -> Vec<(u16, u8)> {
        let mut blocks = Vec::new();
        port_range_blocks(first, last, |port, bits| blocks.push((port, bits)));
        blocks
    }

    #[test]
    fn known_ranges() {
        assert_eq!(blocks(80, 80), [(80, 16)]);
        assert_eq!(blocks(0, 65535), [(0, 0)]);
        assert_eq!(blocks(8000, 8007), [(8000, 13)]);
        assert_eq!(blocks(1, 2), [(1, 16), (2, 16)]);
        assert!(blocks(10, 9).is_empty());
    }

    proptest! {
        /// The blocks are aligned, disjoint, in order, cover exactly first..=last,
        /// and number at most 30 (the worst case for 16-bit ports).
        #[test]
        fn blocks_cover_exactly_the_range(a in any::<u16>(), b in any::<u16>()) {
            let (first, last) = (a.min(b), a.max(b));
            let found = blocks(first, last);
            prop_assert!(found.len() <= 30);
            let mut next = first as u32;
            for (port, bits) in found {
                let size = 1u32 << (16 - bits as u32);
                prop_assert_eq!(port as u32, next, "contiguous");
                prop_assert_eq!(port as u32 % size, 0, "aligned");
                next = port as u32 + size;
            }
            prop_assert_eq!(next, last as u32 + 1, "ends at last");
        }
    }
}
