//! The desired content of the policy-bearing maps for one generation, as the compiler
//! produces it, in readable types. `crate::datapath::apply` writes it as the next
//! generation and switches to it atomically.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use microseg_common::endpoint::EndpointInfo;
use microseg_common::interface::InterfaceBinding;
use microseg_common::policy::{Direction, PolicyEntry};

/// One policy map entry, before the generation slot is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyMatch {
    pub endpoint_id: u32,
    /// Peer identity, or `IDENTITY_ANY`.
    pub identity: u32,
    pub direction: Direction,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP), or `None` for any protocol (and
    /// then any port).
    pub protocol: Option<u8>,
    /// Destination ports: `None` for any port, or an aligned block (first port, number
    /// of fixed leading bits 0..=16) as `port_range_blocks` produces.
    pub port_block: Option<(u16, u8)>,
}

/// Everything the policy-bearing maps hold for one generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathState {
    /// Enforced local endpoint addresses.
    pub endpoints: BTreeMap<IpAddr, EndpointInfo>,
    /// Exact peer addresses (workloads) and their identities.
    pub peer_hosts: BTreeMap<IpAddr, u32>,
    /// CIDR peers (ipBlocks and their except blocks) and their identities. Prefixes of
    /// full length (/32, /128) belong in `peer_hosts`.
    pub peer_prefixes: BTreeMap<IpNet, u32>,
    pub policy: BTreeMap<PolicyMatch, PolicyEntry>,
    /// Interfaces bound to one workload, by ifindex: what they receive must come from
    /// the workload's addresses (see `microseg_common::interface`). Not compiled from
    /// policy: the agent adds what it knows of its interfaces.
    pub interfaces: BTreeMap<u32, InterfaceBinding>,
}

impl PolicyMatch {
    /// A rule for one protocol and one port: it goes in the exact-port hash map
    /// (`POLICY_EXACT`); every other rule goes in the prefix trie (`POLICY`).
    pub fn is_exact_port(&self) -> bool {
        self.protocol.is_some() && matches!(self.port_block, Some((_, 16)))
    }
}

impl DatapathState {
    /// Entry counts per map, the exact-port entries given (`counts` reads every
    /// policy key for them).
    pub fn counts_with_exact(&self, policy_exact: usize) -> StateCounts {
        StateCounts {
            endpoints: self.endpoints.len(),
            peer_hosts: self.peer_hosts.len(),
            peer_prefixes: self.peer_prefixes.len(),
            policy: self.policy.len(),
            policy_exact,
            interfaces: self.interfaces.len(),
        }
    }

    /// Entry counts per map, for capacity checks and `--stats`.
    pub fn counts(&self) -> StateCounts {
        let policy_exact = self.policy.keys().filter(|m| m.is_exact_port()).count();
        StateCounts {
            endpoints: self.endpoints.len(),
            peer_hosts: self.peer_hosts.len(),
            peer_prefixes: self.peer_prefixes.len(),
            policy: self.policy.len(),
            policy_exact,
            interfaces: self.interfaces.len(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub endpoints: usize,
    pub peer_hosts: usize,
    pub peer_prefixes: usize,
    /// All policy entries (`policy_exact` of them in the exact-port hash map, the
    /// rest in the prefix trie).
    pub policy: usize,
    pub policy_exact: usize,
    pub interfaces: usize,
}
