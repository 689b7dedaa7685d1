//! Enforced local endpoints (`ENDPOINTS`: `AddrKey` -> `EndpointInfo`).

/// What the data path knows of an enforced endpoint address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// Compiler-assigned endpoint number; policy keys are per endpoint.
    pub endpoint_id: u32,
    /// `ENDPOINT_FLAG_*` bits.
    pub flags: u16,
    /// First of the two hit slots (`crate::rule_hits`) that count the packets the
    /// endpoint's default deny drops: ingress in this slot, egress in the next; 0: not
    /// counted. (This field was the upper half of a 32-bit `flags`, always zero.)
    pub default_deny_hit_slot: u16,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 8);

/// A policy selects this endpoint for ingress: ingress is default deny.
pub const ENDPOINT_FLAG_INGRESS_ENFORCED: u16 = 1;
/// A policy selects this endpoint for egress: egress is default deny.
pub const ENDPOINT_FLAG_EGRESS_ENFORCED: u16 = 2;
/// Audit mode: a would-be deny passes and emits an audit event.
pub const ENDPOINT_FLAG_AUDIT: u16 = 4;
/// Some of the endpoint's rules are ranges or wildcards (in the `POLICY` trie); without
/// this flag its lookups are the exact-port hash alone: two per direction. Set by the
/// data path layer from the policy entries, not by the compiler.
pub const ENDPOINT_FLAG_PREFIX_RULES: u16 = 8;
/// Some of the endpoint's rules name any peer (`IDENTITY_ANY`); without this flag the
/// second lookup of each direction (with `IDENTITY_ANY`) is skipped. Set by the data
/// path layer from the policy entries, not by the compiler.
pub const ENDPOINT_FLAG_ANY_PEER_RULES: u16 = 16;
/// Ingress is enforced only by ClusterNetworkPolicy (no NetworkPolicy selects the
/// endpoint): where no entry matches, no tier decided, and the packet is allowed
/// rather than denied by default. Set by the compiler.
pub const ENDPOINT_FLAG_INGRESS_DEFAULT_ALLOW: u16 = 32;
/// The same for egress.
pub const ENDPOINT_FLAG_EGRESS_DEFAULT_ALLOW: u16 = 64;
/// The flags the data path layer derives from the policy entries.
pub const ENDPOINT_DERIVED_FLAGS: u16 = ENDPOINT_FLAG_PREFIX_RULES | ENDPOINT_FLAG_ANY_PEER_RULES;

impl EndpointInfo {
    pub const fn new(endpoint_id: u32, flags: u16) -> Self {
        Self {
            endpoint_id,
            flags,
            default_deny_hit_slot: 0,
        }
    }
    /// The same endpoint, its default denies counted from `first_slot` on.
    pub const fn with_default_deny_hit_slot(mut self, first_slot: u16) -> Self {
        self.default_deny_hit_slot = first_slot;
        self
    }
    /// Where a default deny in one direction (`ingress` or not) is counted.
    pub const fn default_deny_hit_slot(&self, ingress: bool) -> u16 {
        if self.default_deny_hit_slot == 0 {
            0
        } else if ingress {
            self.default_deny_hit_slot
        } else {
            self.default_deny_hit_slot + 1
        }
    }
    pub const fn ingress_enforced(&self) -> bool {
        self.flags & ENDPOINT_FLAG_INGRESS_ENFORCED != 0
    }
    pub const fn egress_enforced(&self) -> bool {
        self.flags & ENDPOINT_FLAG_EGRESS_ENFORCED != 0
    }
    /// Whether a lookup that finds no entry allows (see
    /// `ENDPOINT_FLAG_INGRESS_DEFAULT_ALLOW`); `ingress` selects the direction.
    pub const fn default_allows(&self, ingress: bool) -> bool {
        let flag = if ingress {
            ENDPOINT_FLAG_INGRESS_DEFAULT_ALLOW
        } else {
            ENDPOINT_FLAG_EGRESS_DEFAULT_ALLOW
        };
        self.flags & flag != 0
    }
    /// A policy selects this endpoint in some direction: packets to or from it are
    /// tracked, so that replies pass whichever end enforces what.
    pub const fn any_enforced(&self) -> bool {
        self.flags & (ENDPOINT_FLAG_INGRESS_ENFORCED | ENDPOINT_FLAG_EGRESS_ENFORCED) != 0
    }
    pub const fn audit(&self) -> bool {
        self.flags & ENDPOINT_FLAG_AUDIT != 0
    }
    pub const fn has_prefix_rules(&self) -> bool {
        self.flags & ENDPOINT_FLAG_PREFIX_RULES != 0
    }
    pub const fn has_any_peer_rules(&self) -> bool {
        self.flags & ENDPOINT_FLAG_ANY_PEER_RULES != 0
    }
}

crate::impl_pod!(EndpointInfo);
