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
//! entries, evaluated with both. A miss in both falls to the endpoint's default, which
//! the compiler sets to what evaluating no rule gives (`ENDPOINT_FLAG_*_DEFAULT_ALLOW`
//! where no NetworkPolicy selects).

use microseg_common::identity::IDENTITY_ANY;
use microseg_common::policy::{PolicyEntry, RULE_ID_DEFAULT_DENY};

use super::{CompiledRule, EntryTail, rule_entry_tails};
use crate::datapath::state::{DatapathState, PolicyMatch};
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

/// Inserts the resolved entries of one endpoint and direction. `cluster_rules` are in
/// evaluation order (Admin tier first); `network_rules` are the rules of the
/// NetworkPolicies selecting the endpoint (`network_policy_selects` when there is
/// at least one such policy, even without rules).
pub(super) fn insert_resolved_entries<'r>(
    state: &mut DatapathState,
    endpoint_id: u32,
    direction: PolicyDirection,
    workload: &Workload,
    cluster_rules: impl Iterator<Item = (Tier, RuleAction, &'r CompiledRule)>,
    network_rules: impl Iterator<Item = &'r CompiledRule>,
    network_policy_selects: bool,
) {
    let mut ranked: Vec<RankedEntry> = Vec::new();
    let mut push = |rule: &CompiledRule, stage: Stage, order: u32, action: RuleAction| {
        rule_entry_tails(
            rule,
            workload,
            |(identity, protocol, port_block): EntryTail| {
                ranked.push(RankedEntry {
                    identity,
                    block: (protocol, port_block),
                    stage,
                    order,
                    action,
                    rule_id: rule.rule_id,
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
    let mut matching: Vec<&RankedEntry> = Vec::new();
    for group in ranked.chunk_by(|a, b| a.identity == b.identity) {
        let identity = group[0].identity;
        let mut blocks: Vec<Block> = group.iter().map(|entry| entry.block).collect();
        if identity != IDENTITY_ANY {
            // ANY blocks nested in this identity's blocks: the identity's entry would
            // shadow them.
            blocks.extend(
                any.iter()
                    .map(|entry| entry.block)
                    .filter(|&inner| group.iter().any(|entry| contains(entry.block, inner))),
            );
        }
        blocks.sort_unstable();
        blocks.dedup();
        for block in blocks {
            matching.clear();
            matching.extend(group.iter().filter(|entry| contains(entry.block, block)));
            if identity != IDENTITY_ANY {
                matching.extend(
                    any.iter()
                        .copied()
                        .filter(|entry| contains(entry.block, block)),
                );
                matching.sort_by_key(|entry| (entry.stage, entry.order));
            }
            state.policy.insert(
                PolicyMatch {
                    endpoint_id,
                    identity,
                    direction: direction.datapath(),
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
