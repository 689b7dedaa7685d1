//! Tiers, priorities and actions resolved at compile time, so that the data path keeps
//! its one lookup per direction (no walking of rules in the kernel).
//!
//! For an endpoint and direction that a ClusterNetworkPolicy selects, every rule that
//! applies (Admin tier, NetworkPolicy, Baseline tier) contributes entries (peer
//! identity or ANY, protocol, port block), each with its place in evaluation order and
//! its action. The data path answers a packet with the longest matching block of the
//! peer's identity, else of ANY, else the endpoint's default. Blocks are aligned
//! prefixes of (protocol, port), so any two are nested or disjoint; the blocks that
//! contain a port are one chain, and every port whose longest block is B is matched by
//! the same rules: those with a block containing B. So each block gets one entry
//! holding the verdict of evaluating, in order, exactly those rules:
//! - Admin: the first match decides (Accept allows, Deny denies); Pass skips the rest
//!   of the tier;
//! - NetworkPolicy, where one selects the endpoint: any match allows, else deny;
//! - Baseline (only where no NetworkPolicy selects): as Admin;
//! - otherwise allowed, with rule id 0.
//!
//! An identity's entries shadow ANY's (the identity is looked up first), so an ANY
//! block nested inside one of the identity's blocks is copied into the identity's
//! entries, evaluated with both. A rule naming most identities ("every namespace",
//! the usual baseline deny) becomes ANY entries that exclude the rest, and each
//! excluded identity (world, CIDRs, the few workloads not named) gets entries of its
//! own evaluated without that rule: the rule costs its blocks, not identities x
//! blocks. A miss in both falls to the endpoint's default, which
//! the compiler sets to what evaluating no rule gives (`ENDPOINT_FLAG_*_DEFAULT_ALLOW`
//! where no NetworkPolicy selects).

use microseg_common::identity::IDENTITY_ANY;
use microseg_common::policy::{PolicyEntry, RULE_ID_DEFAULT_DENY};

use std::collections::BTreeMap;

use super::{CompiledRule, EntryTail, rule_entry_tails};
use crate::datapath::state::PolicyMatch;
use crate::policy::model::{PolicyDirection, RuleAction, Tier, Workload};

/// Where a rule stands in evaluation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Admin,
    NetworkPolicy,
    Baseline,
}

/// (protocol, port block) as in [`PolicyMatch`].
type Block = (Option<u8>, Option<(u16, u8)>);

/// One rule's entry for this endpoint and direction.
#[derive(Clone, Copy, Debug)]
struct RankedEntry {
    identity: u32,
    block: Block,
    stage: Stage,
    /// Position of the rule in evaluation order within its stage.
    order: u32,
    action: RuleAction,
    rule_id: u32,
    /// For an ANY entry: 1 + index of the identities it does not cover (0: none).
    exclusion: u32,
}

/// Whether every (protocol, port) of `inner` is in `outer`.
fn contains(outer: Block, inner: Block) -> bool {
    match (outer.0, inner.0) {
        (None, _) => return true,
        (Some(_), None) => return false,
        (Some(a), Some(b)) if a != b => return false,
        _ => {}
    }
    match (outer.1, inner.1) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some((outer_start, outer_bits)), Some((inner_start, inner_bits))) => {
            let mask = if outer_bits == 0 {
                0
            } else {
                u16::MAX << (16 - outer_bits)
            };
            outer_bits <= inner_bits && inner_start & mask == outer_start
        }
    }
}

/// Evaluates the matching rules, in evaluation order.
fn resolve(matching: &[&RankedEntry], network_policy_selects: bool) -> PolicyEntry {
    let mut admin_passed = false;
    let mut baseline_passed = false;
    for entry in matching {
        match entry.stage {
            Stage::Admin if !admin_passed => match entry.action {
                RuleAction::Accept => return PolicyEntry::allow(entry.rule_id),
                RuleAction::Deny => return PolicyEntry::deny(entry.rule_id),
                RuleAction::Pass => admin_passed = true,
            },
            Stage::Admin => {}
            Stage::NetworkPolicy => return PolicyEntry::allow(entry.rule_id),
            Stage::Baseline if !baseline_passed && !network_policy_selects => match entry.action {
                RuleAction::Accept => return PolicyEntry::allow(entry.rule_id),
                RuleAction::Deny => return PolicyEntry::deny(entry.rule_id),
                RuleAction::Pass => baseline_passed = true,
            },
            Stage::Baseline => {}
        }
    }
    if network_policy_selects {
        PolicyEntry::deny(RULE_ID_DEFAULT_DENY)
    } else {
        PolicyEntry::allow(RULE_ID_DEFAULT_DENY)
    }
}

/// One endpoint and direction to resolve.
pub(super) struct Resolution<'a> {
    pub endpoint_id: u32,
    pub direction: PolicyDirection,
    pub workload: &'a Workload,
    /// Every identity of the compile (workload, CIDR and world), sorted.
    pub universe: &'a [u32],
    /// At least one NetworkPolicy selects the endpoint in this direction (even one
    /// without rules).
    pub network_policy_selects: bool,
}

/// The rule's entries for the endpoint, as (identity, block) pairs; a rule naming
/// most of the universe with the same blocks for each identity ("every namespace")
/// becomes ANY entries that exclude the identities it does not name, so that it
/// costs its blocks, not identities x blocks.
fn rule_entries(
    rule: &CompiledRule,
    workload: &Workload,
    universe: &[u32],
    exclusions: &mut Vec<Vec<u32>>,
    mut emit: impl FnMut(u32, Block, u32),
) {
    let mut entries: Vec<EntryTail> = Vec::new();
    rule_entry_tails(rule, workload, |entry| entries.push(entry));
    entries.sort_unstable();
    entries.dedup();
    let identities = &rule.peer_identities;
    let named_in_universe = identities
        .iter()
        .filter(|id| universe.binary_search(id).is_ok())
        .count();
    if identities.len() >= 4
        && named_in_universe == identities.len()
        && 2 * identities.len() > universe.len()
    {
        // Uniform: each named identity has the same blocks (egress named ports resolve
        // per destination and are not).
        let first: Vec<Block> = entries
            .iter()
            .filter(|entry| entry.0 == identities[0])
            .map(|entry| (entry.1, entry.2))
            .collect();
        let uniform = entries.len() == first.len() * identities.len()
            && entries.chunk_by(|a, b| a.0 == b.0).all(|chunk| {
                chunk.len() == first.len()
                    && chunk
                        .iter()
                        .zip(&first)
                        .all(|(entry, block)| (entry.1, entry.2) == *block)
            });
        if uniform && !first.is_empty() {
            let excluded: Vec<u32> = universe
                .iter()
                .copied()
                .filter(|id| identities.binary_search(id).is_err())
                .collect();
            exclusions.push(excluded);
            let exclusion = u32::try_from(exclusions.len()).expect("few rules");
            for block in first {
                emit(IDENTITY_ANY, block, exclusion);
            }
            return;
        }
    }
    for (identity, protocol, port_block) in entries {
        emit(identity, (protocol, port_block), 0);
    }
}

/// Inserts the resolved entries of one endpoint and direction. `cluster_rules` are in
/// evaluation order (Admin tier first); `network_rules` are the rules of the
/// NetworkPolicies selecting the endpoint.
pub(super) fn insert_resolved_entries<'r>(
    entries: &mut BTreeMap<PolicyMatch, PolicyEntry>,
    resolution: &Resolution<'_>,
    cluster_rules: impl Iterator<Item = (Tier, RuleAction, &'r CompiledRule)>,
    network_rules: impl Iterator<Item = &'r CompiledRule>,
) {
    let network_policy_selects = resolution.network_policy_selects;
    // Exclusion lists of ANY entries; an entry's `exclusion` is an index + 1 (0: none).
    let mut exclusions: Vec<Vec<u32>> = Vec::new();
    let mut ranked: Vec<RankedEntry> = Vec::new();
    let mut push = |rule: &CompiledRule, stage: Stage, order: u32, action: RuleAction| {
        rule_entries(
            rule,
            resolution.workload,
            resolution.universe,
            &mut exclusions,
            |identity, block, exclusion| {
                ranked.push(RankedEntry {
                    identity,
                    block,
                    stage,
                    order,
                    action,
                    rule_id: rule.rule_id,
                    exclusion,
                });
            },
        );
    };
    let mut order = 0u32;
    let mut baseline = Vec::new();
    for (tier, action, rule) in cluster_rules {
        match tier {
            Tier::Admin => push(rule, Stage::Admin, order, action),
            Tier::Baseline => baseline.push((action, rule)),
        }
        order += 1;
    }
    for rule in network_rules {
        push(rule, Stage::NetworkPolicy, order, RuleAction::Accept);
        order += 1;
    }
    // Baseline rules never decide for an endpoint a NetworkPolicy selects.
    if !network_policy_selects {
        for (action, rule) in baseline {
            push(rule, Stage::Baseline, order, action);
            order += 1;
        }
    }
    ranked.sort_by_key(|entry| (entry.identity, entry.stage, entry.order));

    let any: Vec<&RankedEntry> = ranked
        .iter()
        .filter(|entry| entry.identity == IDENTITY_ANY)
        .collect();
    let excludes = |entry: &RankedEntry, identity: u32| {
        entry.exclusion != 0
            && exclusions[entry.exclusion as usize - 1]
                .binary_search(&identity)
                .is_ok()
    };
    // Identities an ANY entry excludes need entries of their own wherever ANY has
    // one, or their lookups would fall through to it.
    let mut excluded: Vec<u32> = exclusions.iter().flatten().copied().collect();
    excluded.sort_unstable();
    excluded.dedup();
    let mut identities: Vec<u32> = ranked.iter().map(|entry| entry.identity).collect();
    identities.extend(&excluded);
    identities.sort_unstable();
    identities.dedup();

    let mut matching: Vec<&RankedEntry> = Vec::new();
    for identity in identities {
        let own: &[RankedEntry] = {
            let start = ranked.partition_point(|entry| entry.identity < identity);
            let end = ranked.partition_point(|entry| entry.identity <= identity);
            &ranked[start..end]
        };
        let mut blocks: Vec<Block> = own.iter().map(|entry| entry.block).collect();
        if identity != IDENTITY_ANY {
            let excluded_somewhere = excluded.binary_search(&identity).is_ok();
            // ANY blocks this identity's entries would shadow (all of them where an ANY
            // entry excludes it).
            blocks.extend(any.iter().map(|entry| entry.block).filter(|&inner| {
                excluded_somewhere || own.iter().any(|entry| contains(entry.block, inner))
            }));
        }
        blocks.sort_unstable();
        blocks.dedup();
        for block in blocks {
            matching.clear();
            matching.extend(own.iter().filter(|entry| contains(entry.block, block)));
            if identity != IDENTITY_ANY {
                matching.extend(
                    any.iter()
                        .copied()
                        .filter(|entry| contains(entry.block, block) && !excludes(entry, identity)),
                );
                matching.sort_by_key(|entry| (entry.stage, entry.order));
            }
            entries.insert(
                PolicyMatch {
                    endpoint_id: resolution.endpoint_id,
                    identity,
                    direction: resolution.direction.datapath(),
                    protocol: block.0,
                    port_block: block.1,
                },
                resolve(&matching, network_policy_selects),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment_follows_protocol_then_port_prefix() {
        let any: Block = (None, None);
        let tcp: Block = (Some(6), None);
        let tcp_80: Block = (Some(6), Some((80, 16)));
        let tcp_80_95: Block = (Some(6), Some((80, 12)));
        let udp_80: Block = (Some(17), Some((80, 16)));
        assert!(contains(any, tcp_80));
        assert!(contains(tcp, tcp_80));
        assert!(contains(tcp_80_95, tcp_80));
        assert!(contains(tcp_80, tcp_80));
        assert!(!contains(tcp_80, tcp_80_95));
        assert!(!contains(tcp, udp_80));
        assert!(!contains(tcp_80, any));
        assert!(!contains((Some(6), Some((96, 12))), tcp_80));
    }
}
