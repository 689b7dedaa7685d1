//! The map-level evaluator: answers a flow from a [`DatapathState`] alone, with the
//! data path's lookup algorithm (exact addresses, then longest prefix; policy keys by
//! longest prefix over protocol and port). Agreement with the reference evaluator shows
//! the compiler right; agreement with the kernel shows the programs right.
//!
//! Addresses are compared as the maps store them: IPv4 as IPv4-mapped IPv6, so a
//! compiled state that lets IPv6 prefixes catch IPv4 traffic is caught here too.

use std::collections::HashMap;
use std::net::IpAddr;

use microseg_common::endpoint::EndpointInfo;
use microseg_common::identity::{IDENTITY_ANY, IDENTITY_WORLD};
use microseg_common::policy::{Direction, PolicyEntry, RULE_ID_DEFAULT_DENY};

use super::evaluate::Flow;
use crate::datapath::state::{DatapathState, PolicyMatch};

/// The map key form of an address: 128 bits, IPv4 mapped.
fn mapped_bits(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => (0xffff_u128 << 32) | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn mask(prefix_len: u8) -> u128 {
    if prefix_len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix_len))
    }
}

/// One direction's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDirectionVerdict {
    /// The local address is an endpoint enforced in this direction.
    pub enforced: bool,
    /// The local endpoint id (0 when the address is not an endpoint).
    pub endpoint_id: u32,
    /// The peer's identity as the lookup found it.
    pub peer_identity: u32,
    pub allowed: bool,
    /// Rule id of the matching entry; `RULE_ID_DEFAULT_DENY` when denied or unenforced.
    pub rule_id: u32,
}

/// Both directions; the packet passes if both allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapVerdict {
    pub ingress: MapDirectionVerdict,
    pub egress: MapDirectionVerdict,
    pub allowed: bool,
}

/// Lookup structures over one state, built once and reused for many flows.
#[derive(Debug)]
pub struct MapEvaluator<'a> {
    state: &'a DatapathState,
    endpoints: HashMap<u128, EndpointInfo>,
    peer_hosts: HashMap<u128, u32>,
    /// (mapped prefix length, masked bits) -> identity.
    peer_prefixes: HashMap<(u8, u128), u32>,
    /// Distinct mapped prefix lengths, longest first.
    prefix_lengths: Vec<u8>,
}

impl<'a> MapEvaluator<'a> {
    pub fn new(state: &'a DatapathState) -> Self {
        let endpoints = state
            .endpoints
            .iter()
            .map(|(address, info)| (mapped_bits(*address), *info))
            .collect();
        let peer_hosts = state
            .peer_hosts
            .iter()
            .map(|(address, identity)| (mapped_bits(*address), *identity))
            .collect();
        let mut peer_prefixes = HashMap::new();
        let mut prefix_lengths = Vec::new();
        for (prefix, identity) in &state.peer_prefixes {
            let length = match prefix.addr() {
                IpAddr::V4(_) => prefix.prefix_len() + 96,
                IpAddr::V6(_) => prefix.prefix_len(),
            };
            peer_prefixes.insert(
                (length, mapped_bits(prefix.addr()) & mask(length)),
                *identity,
            );
            prefix_lengths.push(length);
        }
        prefix_lengths.sort_unstable_by(|left, right| right.cmp(left));
        prefix_lengths.dedup();
        Self {
            state,
            endpoints,
            peer_hosts,
            peer_prefixes,
            prefix_lengths,
        }
    }

    /// `PEER_HOSTS`, then the longest prefix in `PEER_PREFIXES`, else world.
    pub fn peer_identity(&self, address: IpAddr) -> u32 {
        let bits = mapped_bits(address);
        if let Some(identity) = self.peer_hosts.get(&bits) {
            return *identity;
        }
        self.prefix_lengths
            .iter()
            .find_map(|&length| self.peer_prefixes.get(&(length, bits & mask(length))))
            .copied()
            .unwrap_or(IDENTITY_WORLD)
    }

    /// Longest-prefix match of the policy trie for one identity.
    fn policy_lookup(
        &self,
        endpoint_id: u32,
        identity: u32,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> Option<PolicyEntry> {
        let key = |protocol: Option<u8>, port_block: Option<(u16, u8)>| PolicyMatch {
            endpoint_id,
            identity,
            direction,
            protocol,
            port_block,
        };
        for bits in (0..=16u8).rev() {
            let block_mask = if bits == 0 {
                0
            } else {
                u16::MAX << (16 - bits)
            };
            if let Some(entry) = self
                .state
                .policy
                .get(&key(Some(protocol), Some((port & block_mask, bits))))
            {
                return Some(*entry);
            }
        }
        self.state
            .policy
            .get(&key(Some(protocol), None))
            .or_else(|| self.state.policy.get(&key(None, None)))
            .copied()
    }

    fn direction_verdict(
        &self,
        local: IpAddr,
        peer: IpAddr,
        direction: Direction,
        flow: &Flow,
    ) -> MapDirectionVerdict {
        let endpoint = self.endpoints.get(&mapped_bits(local));
        let peer_identity = self.peer_identity(peer);
        let enforced = endpoint.is_some_and(|info| match direction {
            Direction::Ingress => info.ingress_enforced(),
            Direction::Egress => info.egress_enforced(),
        });
        let endpoint_id = endpoint.map_or(0, |info| info.endpoint_id);
        if !enforced {
            return MapDirectionVerdict {
                enforced,
                endpoint_id,
                peer_identity,
                allowed: true,
                rule_id: RULE_ID_DEFAULT_DENY,
            };
        }
        let protocol = flow.protocol.number();
        let entry = self
            .policy_lookup(endpoint_id, peer_identity, direction, protocol, flow.port)
            .or_else(|| {
                self.policy_lookup(endpoint_id, IDENTITY_ANY, direction, protocol, flow.port)
            });
        // No entry: the endpoint's default (deny, unless only ClusterNetworkPolicies
        // select it in this direction).
        let default_allows =
            endpoint.is_some_and(|info| info.default_allows(direction == Direction::Ingress));
        let allowed = entry.map_or(default_allows, |entry| !entry.is_deny());
        MapDirectionVerdict {
            enforced,
            endpoint_id,
            peer_identity,
            allowed,
            rule_id: entry.map_or(RULE_ID_DEFAULT_DENY, |entry| entry.rule_id),
        }
    }

    pub fn evaluate(&self, flow: &Flow) -> MapVerdict {
        let ingress = self.direction_verdict(flow.dst, flow.src, Direction::Ingress, flow);
        let egress = self.direction_verdict(flow.src, flow.dst, Direction::Egress, flow);
        MapVerdict {
            allowed: ingress.allowed && egress.allowed,
            ingress,
            egress,
        }
    }
}

/// One-off map-level evaluation (builds the lookup structures each call; use
/// [`MapEvaluator`] for many flows).
pub fn evaluate_state(state: &DatapathState, flow: &Flow) -> MapVerdict {
    MapEvaluator::new(state).evaluate(flow)
}
