//! Ids kept across an agent restart: everything that decides the compiler's ids
//! (`numbering`) and hit slots (`hit_slots`), saved by the agent and given to the
//! compiler of its next start.
//!
//! A compiler started from saved ids and fed the same policy set compiles the same
//! map content as the one that saved them, so a restarted agent's first apply (a
//! diff with what the pinned maps hold) writes nothing, or only what changed while
//! it was down. Ids saved for what no longer exists are released after that first
//! update, so they do not stay held forever. Ids are only a numbering: saved ids
//! that are out of date (a crash before the last save) make a larger first diff,
//! never a wrong verdict.

use serde::{Deserialize, Serialize};

use super::Compiler;
use super::hit_slots::{HitSlots, SavedHitSlots};
use super::numbering::{Numbering, SavedNumbering};

/// The compiler's ids and hit slots as saved ([`Compiler::saved_ids`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedIds {
    numbering: SavedNumbering,
    hit_slots: SavedHitSlots,
}

/// The saved form, with its format version.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedIdsFile {
    version: u32,
    numbering: SavedNumbering,
    hit_slots: SavedHitSlots,
}

/// Only the version, read first: a file of another version may not parse as this
/// one.
#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

/// Why saved ids cannot be used: the compiler then starts afresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SavedIdsError {
    /// Not JSON of this format, or inconsistent (an id given twice, ...).
    Unreadable(String),
    /// Written by a version of microseg that saves ids in another format.
    OtherVersion(u32),
}

impl std::fmt::Display for SavedIdsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreadable(reason) => write!(f, "unreadable: {reason}"),
            Self::OtherVersion(version) => write!(
                f,
                "format version {version}, this agent reads version {}",
                SavedIds::FORMAT_VERSION
            ),
        }
    }
}

impl std::error::Error for SavedIdsError {}

impl SavedIds {
    /// The version of the saved form; a file of another version is not read.
    pub const FORMAT_VERSION: u32 = 1;

    /// The saved form (JSON, each list in id order: the same ids are the same text).
    pub fn to_json(mut self) -> Vec<u8> {
        self.numbering.sort();
        self.hit_slots.sort();
        let file = SavedIdsFile {
            version: Self::FORMAT_VERSION,
            numbering: self.numbering,
            hit_slots: self.hit_slots,
        };
        serde_json::to_vec(&file).expect("saved ids serialise (no map keys but strings)")
    }

    /// Reads the saved form, checking its version and its consistency.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SavedIdsError> {
        let unreadable = |e: String| SavedIdsError::Unreadable(e);
        let VersionOnly { version } =
            serde_json::from_slice(bytes).map_err(|e| unreadable(e.to_string()))?;
        if version != Self::FORMAT_VERSION {
            return Err(SavedIdsError::OtherVersion(version));
        }
        let file: SavedIdsFile =
            serde_json::from_slice(bytes).map_err(|e| unreadable(e.to_string()))?;
        let saved = Self {
            numbering: file.numbering,
            hit_slots: file.hit_slots,
        };
        // Checked now, so that a compiler is always started from consistent ids.
        Numbering::restore(saved.numbering.clone()).map_err(unreadable)?;
        HitSlots::restore(saved.hit_slots.clone()).map_err(unreadable)?;
        Ok(saved)
    }

    /// Ids saved (workload identities, CIDR identities, endpoints, rules) and hit
    /// slots held, for the log.
    pub fn counts(&self) -> (usize, usize, usize, usize, usize) {
        let (workload, cidr, endpoints, rules) = self.numbering.counts();
        (workload, cidr, endpoints, rules, self.hit_slots.held())
    }
}

/// Where the ids stand, to tell whether the saved ones are out of date: grows
/// with every change of ids or hit slots. Compare two of the same compiler only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdsRevision {
    /// Numbering afresh resets the changes below, not this.
    full_compiles: u64,
    changes: u64,
}

impl Compiler {
    /// A compiler (for Kubernetes node `node`, if any: see
    /// [`Compiler::enforcing_node`]) that numbers what `saved` numbers as it did,
    /// and hands out new ids after them. Its first update releases the ids saved
    /// for what that update's policy set no longer has.
    pub fn with_saved_ids(node: Option<String>, saved: SavedIds) -> Self {
        // Consistent (checked by `SavedIds::from_json`, or made by `saved_ids`);
        // were they not, numbering afresh is safe, keeping half of them is not.
        match (
            Numbering::restore(saved.numbering),
            HitSlots::restore(saved.hit_slots),
        ) {
            (Ok(numbering), Ok(hit_slots)) => Self {
                numbering,
                hit_slots,
                enforcing_node: node,
                ..Self::default()
            },
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("saved ids not used ({e}); numbering afresh");
                Self {
                    enforcing_node: node,
                    ..Self::default()
                }
            }
        }
    }

    /// The ids and hit slots, to save (a copy; see [`SavedIds::to_json`]).
    pub fn saved_ids(&self) -> SavedIds {
        SavedIds {
            numbering: self.numbering.saved(),
            hit_slots: self.hit_slots.saved(),
        }
    }

    /// Where the ids stand (see [`IdsRevision`]).
    pub fn ids_revision(&self) -> IdsRevision {
        IdsRevision {
            full_compiles: self.counters.full_compiles,
            changes: self.numbering.revision() + self.hit_slots.revision(),
        }
    }

    /// At the end of the first update of a compiler started from saved ids:
    /// releases the ids and slots saved for what that update did not number (gone
    /// while no agent ran), and lists every slot as fresh (its counts start now).
    pub(super) fn release_unused_saved_ids(&mut self) {
        let identities = &self.identities;
        self.numbering.release_unused(
            |id| {
                identities.workload_identities.contains_key(&id)
                    || identities.cidr_identities.contains_key(&id)
            },
            |id| self.endpoint_table.contains_key(&id),
            |id| self.rules.contains_key(&id),
        );
        self.hit_slots.release_unused(
            |id| self.rules.contains_key(&id),
            |id| self.endpoint_table.contains_key(&id),
        );
        self.hit_slots.all_fresh();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::{SavedIds, SavedIdsError};
    use crate::datapath::DatapathState;
    use crate::policy::{Compiled, Compiler, PolicySet, PolicySetBuilder};

    /// Cluster and namespace policies over six namespaces (ipBlocks, named ports,
    /// tiers): the example's.
    const EXAMPLE: [&str; 2] = [
        include_str!("../../../../examples/cluster-pci-zone/inventory.yaml"),
        include_str!("../../../../examples/cluster-pci-zone/policies.yaml"),
    ];

    /// A policy, a workload and peers that come and go before the set is saved: ids
    /// then differ from a fresh compile's (numbered first, they leave gaps).
    const EARLY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: aaa-early, namespace: checkout}
spec:
  podSelector: {matchLabels: {app: payment-frontend}}
  ingress:
  - from: [{ipBlock: {cidr: 192.0.2.0/24}}, {podSelector: {matchLabels: {app: temp}}}]
    ports: [{port: 8080}]
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: aaa-temp, namespace: checkout, labels: {app: temp}}
spec: {addresses: [10.99.0.1]}
"#;

    /// The cart's egress: an ipBlock with an except, and a named port.
    fn cart_egress(port: u16, dns: bool) -> String {
        let dns = if dns {
            "  - ports: [{port: 53, protocol: UDP}]\n"
        } else {
            ""
        };
        format!(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: cart-egress, namespace: checkout}}
spec:
  podSelector: {{matchLabels: {{app: cart}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: 198.51.100.0/24, except: [198.51.100.128/25]}}}}]
    ports: [{{port: {port}}}]
  - to: [{{namespaceSelector: {{matchLabels: {{compliance: pci}}}}}}]
    ports: [{{port: https}}]
{dns}"#
        )
    }

    fn load(extra: &[&str]) -> PolicySet {
        let mut builder = PolicySetBuilder::new();
        for (index, text) in EXAMPLE.iter().chain(extra).enumerate() {
            builder.add_text(Path::new(&format!("{index}.yaml")), text);
        }
        builder.finish().unwrap_or_else(|errors| panic!("{errors}"))
    }

    /// Through a history (`EARLY` added, then gone), to `cart_egress(443, false)`.
    fn compiler_with_history() -> (Compiler, PolicySet) {
        let mut compiler = Compiler::default();
        let cart = cart_egress(443, false);
        compiler.compile(&load(&[EARLY, &cart]));
        let set = load(&[&cart]);
        compiler.compile(&set);
        (compiler, set)
    }

    fn restored(compiler: &Compiler) -> Compiler {
        let json = compiler.saved_ids().to_json();
        let saved = SavedIds::from_json(&json).expect("saved ids read back");
        Compiler::with_saved_ids(None, saved)
    }

    /// Everything but the fresh slots (a restored compiler's first update lists
    /// every slot as fresh: counts start with the agent).
    fn assert_same_compiled(restored: &Compiled, saver: &Compiled) {
        assert_eq!(restored.state, saver.state);
        assert_eq!(restored.rules, saver.rules);
        assert_eq!(restored.identities, saver.identities);
        assert_eq!(restored.endpoints, saver.endpoints);
        assert_eq!(restored.hit_slots.owners, saver.hit_slots.owners);
        assert_eq!(restored.hit_slots.uncounted, saver.hit_slots.uncounted);
    }

    /// Policy entries added, removed or changed from `before` to `after`, with the
    /// rule ids they name (before and after).
    fn changed_policy_rules(before: &DatapathState, after: &DatapathState) -> BTreeSet<u32> {
        let mut rules = BTreeSet::new();
        for (key, entry) in &before.policy {
            if after.policy.get(key) != Some(entry) {
                rules.insert(entry.rule_id);
                rules.extend(after.policy.get(key).map(|e| e.rule_id));
            }
        }
        for (key, entry) in &after.policy {
            if !before.policy.contains_key(key) {
                rules.insert(entry.rule_id);
            }
        }
        rules
    }

    #[test]
    fn a_compiler_started_from_saved_ids_compiles_what_the_saver_compiled() {
        let (mut saver, set) = compiler_with_history();
        let saved_state = saver.compiled();
        // Numbered afresh, the same set has other ids: every entry naming them
        // would be written again.
        let fresh = Compiler::default().compile(&set);
        assert_ne!(fresh.state.policy, saved_state.state.policy);
        assert_ne!(fresh.rules, saved_state.rules);
        assert_ne!(fresh.state.peer_prefixes, saved_state.state.peer_prefixes);

        let mut restored = restored(&saver);
        let compiled = restored.compile(&set);
        assert_same_compiled(&compiled, &saved_state);
        // Every slot it holds is zeroed before its entries are written.
        let held: BTreeSet<u16> = compiled
            .hit_slots
            .owners
            .keys()
            .copied()
            .chain(
                compiled
                    .state
                    .endpoints
                    .values()
                    .flat_map(|e| [e.default_deny_hit_slot, e.default_deny_hit_slot + 1]),
            )
            .collect();
        assert_eq!(compiled.hit_slots.fresh, Vec::from_iter(held));
        // The same state inside too: ids, counters, slots, free lists and
        // quarantine, once the saver has been through an update as well.
        saver.compile(&set);
        assert_eq!(
            String::from_utf8(restored.saved_ids().to_json()).unwrap(),
            String::from_utf8(saver.saved_ids().to_json()).unwrap()
        );
    }

    #[test]
    fn after_a_restart_a_changed_policy_changes_only_its_own_entries() {
        let (mut saver, _) = compiler_with_history();
        let before = saver.compiled();
        let mut restored = restored(&saver);
        let changed_text = cart_egress(444, true);
        let changed = load(&[&changed_text]);
        let after_restart = restored.compile(&changed);
        // As if the saver had gone on running.
        assert_same_compiled(&after_restart, &saver.compile(&changed));
        assert_eq!(
            String::from_utf8(restored.saved_ids().to_json()).unwrap(),
            String::from_utf8(saver.saved_ids().to_json()).unwrap()
        );
        // The entries that differ from what the maps held are the policy's own.
        assert_eq!(after_restart.state.endpoints, before.state.endpoints);
        assert_eq!(after_restart.state.peer_hosts, before.state.peer_hosts);
        assert_eq!(
            after_restart.state.peer_prefixes,
            before.state.peer_prefixes
        );
        let rules = changed_policy_rules(&before.state, &after_restart.state);
        assert!(!rules.is_empty());
        for rule_id in rules {
            let rule = after_restart
                .rules
                .get(rule_id)
                .or_else(|| before.rules.get(rule_id))
                .unwrap_or_else(|| panic!("rule {rule_id} named"));
            assert_eq!(
                (rule.policy_namespace.as_str(), rule.policy_name.as_str()),
                ("checkout", "cart-egress")
            );
        }
    }

    #[test]
    fn ids_saved_for_what_is_gone_are_released_and_not_reused() {
        let (saver, _) = compiler_with_history();
        let saved = saver.compiled();
        let cart_rules: Vec<u32> = saved
            .rules
            .iter()
            .filter(|(_, rule)| rule.policy_name == "cart-egress")
            .map(|(id, _)| id)
            .collect();
        assert_eq!(cart_rules.len(), 2);
        let cart_slots: Vec<u16> = saved
            .hit_slots
            .owners
            .iter()
            .filter(|(_, owner)| {
                cart_rules
                    .iter()
                    .any(|id| **owner == super::super::HitSlotOwner::Rule(*id))
            })
            .map(|(slot, _)| *slot)
            .collect();
        assert_eq!(cart_slots.len(), 2);
        let cidr_identities = saved.stats().cidr_identities;

        // Started without the cart's policy: its ids and slots go.
        let mut restored = restored(&saver);
        let without = load(&[]);
        let compiled = restored.compile(&without);
        let (_, cidr, _, rules) = restored.numbering().counts();
        assert_eq!(rules, saved.rules.len() - 2);
        assert!(cidr < cidr_identities, "the cart's ipBlock identities go");
        assert_eq!(compiled.rules.len(), rules);
        assert!(
            cart_slots
                .iter()
                .all(|s| !compiled.hit_slots.owners.contains_key(s))
        );
        // Its slots wait in quarantine, and its rule ids are never handed out
        // again: back, the policy gets new ones.
        let back = restored.compile(&load(&[&cart_egress(443, false)]));
        let new_rules: Vec<u32> = back
            .rules
            .iter()
            .filter(|(_, rule)| rule.policy_name == "cart-egress")
            .map(|(id, _)| id)
            .collect();
        assert!(
            new_rules
                .iter()
                .all(|id| *id > *cart_rules.iter().max().unwrap())
        );
        assert!(back.hit_slots.fresh.iter().all(|s| !cart_slots.contains(s)));
        // A saved file of the compiler that never saw them does not name them.
        let json = String::from_utf8(restored.saved_ids().to_json()).unwrap();
        assert!(!json.contains("aaa-early"));
    }

    #[test]
    fn unreadable_or_other_version_ids_are_refused() {
        let (saver, _) = compiler_with_history();
        let json = String::from_utf8(saver.saved_ids().to_json()).unwrap();
        assert!(matches!(
            SavedIds::from_json(b"{not json"),
            Err(SavedIdsError::Unreadable(_))
        ));
        let other = json.replacen("\"version\":1", "\"version\":99", 1);
        assert_eq!(
            SavedIds::from_json(other.as_bytes()),
            Err(SavedIdsError::OtherVersion(99))
        );
        // An id given to two things: not consistent, not used.
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let rules = value["numbering"]["rules"].as_array_mut().unwrap();
        let first = rules[0]["id"].clone();
        rules[1]["id"] = first;
        let twice = serde_json::to_vec(&value).unwrap();
        assert!(matches!(
            SavedIds::from_json(&twice),
            Err(SavedIdsError::Unreadable(reason)) if reason.contains("twice")
        ));
        // A slot held twice.
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let slots = value["hitSlots"]["rules"].as_array_mut().unwrap();
        let first = slots[0][1].clone();
        slots[1][1] = first;
        assert!(SavedIds::from_json(&serde_json::to_vec(&value).unwrap()).is_err());
        // A counter that would hand out reserved identities.
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["numbering"]["workloadIdentities"] = serde_json::json!([]);
        value["numbering"]["cidrIdentities"] = serde_json::json!([]);
        assert!(SavedIds::from_json(&serde_json::to_vec(&value).unwrap()).is_ok());
        value["numbering"]["nextIdentity"] = 1.into();
        assert!(SavedIds::from_json(&serde_json::to_vec(&value).unwrap()).is_err());
        assert!(SavedIds::from_json(json.as_bytes()).is_ok());
    }
}
