//! Hit slots: the small numbers under which the kernel counts each rule's hits and
//! each endpoint's default denies (`RULE_HITS`, see `microseg_common::rule_hits`).
//!
//! Rule ids are never reused, so they cannot index an array; slots are, and must be
//! reused with care. A slot keeps its rule (or endpoint) from one compile to the next,
//! so counts accumulate across updates. A slot whose rule is gone is reused only two
//! compiles later: by then no live entry and no current conntrack entry names it,
//! even if the update that removed the rule failed. A slot handed out anew is listed
//! in `HitSlotTable::fresh`, for the agent to zero before the entries naming it are
//! written. Past `RULE_HIT_SLOTS`, rules are not counted (slot 0) and the table says
//! how many.
//!
//! The assignment is kept across an agent restart too ([`SavedHitSlots`]), since
//! entries name their slots: the same slots make the same entries. Counts still
//! start with the agent: a compiler started from saved slots lists every slot it
//! holds as fresh in its first update.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use foldhash::{HashMap, HashMapExt, HashSet};
use microseg_common::{policy::Direction, rule_hits::RULE_HIT_SLOTS};
use serde::{Deserialize, Serialize};

/// Updates a released slot waits before it is handed out again.
const QUARANTINE_COMPILES: usize = 2;

/// What a slot counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HitSlotOwner {
    /// A rule, by rule id (see `Compiled::rules`).
    Rule(u32),
    /// The default deny of an endpoint (by endpoint id) in one direction.
    DefaultDeny {
        endpoint_id: u32,
        direction: Direction,
    },
}

/// The slots of one compile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HitSlotTable {
    pub owners: BTreeMap<u16, HitSlotOwner>,
    /// Slots handed out by this compile: zero them before writing the entries.
    pub fresh: Vec<u16>,
    /// Rules and default denies left uncounted because every slot is taken.
    pub uncounted: usize,
}

/// Slot assignment kept from one update to the next (part of the `Compiler`).
#[derive(Clone, Debug)]
pub struct HitSlots {
    rules: HashMap<u32, u16>,
    /// Endpoint id -> first slot of its (ingress, egress) pair.
    default_denies: HashMap<u32, u16>,
    owners: BTreeMap<u16, HitSlotOwner>,
    free: Vec<u16>,
    free_pairs: Vec<u16>,
    /// Singles and pairs released by this update.
    released: (Vec<u16>, Vec<u16>),
    /// Singles and pairs released by the last updates, oldest first.
    quarantine: VecDeque<(Vec<u16>, Vec<u16>)>,
    /// The lowest slot never handed out.
    next: u32,
    /// Slots handed out by the last update.
    fresh: Vec<u16>,
    /// Rules and endpoints left uncounted because every slot was taken.
    uncounted_rules: BTreeSet<u32>,
    uncounted_endpoints: BTreeSet<u32>,
    /// Slots whose owner changed since the last `take_touched`.
    touched: BTreeSet<u16>,
    /// Counts changes of the assignment (a slot handed out or released, a slot
    /// out of quarantine), to tell whether the saved slots are out of date.
    revision: u64,
}

impl Default for HitSlots {
    fn default() -> Self {
        Self {
            rules: HashMap::new(),
            default_denies: HashMap::new(),
            owners: BTreeMap::new(),
            free: Vec::new(),
            free_pairs: Vec::new(),
            released: (Vec::new(), Vec::new()),
            quarantine: VecDeque::new(),
            // Slot 0 is `HIT_SLOT_NONE`.
            next: 1,
            fresh: Vec::new(),
            uncounted_rules: BTreeSet::new(),
            uncounted_endpoints: BTreeSet::new(),
            touched: BTreeSet::new(),
            revision: 0,
        }
    }
}

impl HitSlots {
    /// Starts an update: the slots it hands out are its fresh ones.
    pub fn begin_update(&mut self) {
        self.fresh.clear();
    }

    /// Ends an update: what it released goes into quarantine, and what was released
    /// `QUARANTINE_COMPILES` updates ago may be handed out again.
    pub fn end_update(&mut self) {
        let released = std::mem::take(&mut self.released);
        let mut changed = !released.0.is_empty() || !released.1.is_empty();
        self.quarantine.push_back(released);
        if self.quarantine.len() > QUARANTINE_COMPILES {
            let (singles, pairs) = self.quarantine.pop_front().unwrap_or_default();
            changed |= !singles.is_empty() || !pairs.is_empty();
            self.free.extend(singles);
            self.free_pairs.extend(pairs);
        }
        // Empty releases moving through the quarantine are not a change worth
        // saving: slots saved one update early are only freed one update later.
        if changed {
            self.revision += 1;
        }
    }

    /// Gives rule `rule_id` a slot, if it has none and one is left.
    pub fn rule(&mut self, rule_id: u32) {
        if self.rules.contains_key(&rule_id) || self.uncounted_rules.contains(&rule_id) {
            return;
        }
        self.revision += 1;
        match self.take_single() {
            Some(slot) => {
                self.rules.insert(rule_id, slot);
                self.owners.insert(slot, HitSlotOwner::Rule(rule_id));
                self.touched.insert(slot);
                self.fresh.push(slot);
            }
            None => {
                self.uncounted_rules.insert(rule_id);
            }
        }
    }

    pub fn release_rule(&mut self, rule_id: u32) {
        if self.uncounted_rules.remove(&rule_id) {
            self.revision += 1;
        }
        if let Some(slot) = self.rules.remove(&rule_id) {
            self.revision += 1;
            self.owners.remove(&slot);
            self.touched.insert(slot);
            self.released.0.push(slot);
        }
    }

    pub fn slot_of_rule(&self, rule_id: u32) -> Option<u16> {
        self.rules.get(&rule_id).copied()
    }

    /// The first slot of endpoint `endpoint_id`'s default-deny pair, given now if it
    /// has none and one is left.
    pub fn endpoint(&mut self, endpoint_id: u32) -> Option<u16> {
        if let Some(first) = self.default_denies.get(&endpoint_id) {
            return Some(*first);
        }
        if self.uncounted_endpoints.contains(&endpoint_id) {
            return None;
        }
        self.revision += 1;
        match self.take_pair() {
            Some(first) => {
                self.default_denies.insert(endpoint_id, first);
                self.fresh.extend([first, first + 1]);
                Some(first)
            }
            None => {
                self.uncounted_endpoints.insert(endpoint_id);
                None
            }
        }
    }

    /// Records which of the endpoint's directions have a default deny (an enforced
    /// one).
    pub fn set_default_denies(&mut self, endpoint_id: u32, ingress: bool, egress: bool) {
        let Some(first) = self.default_denies.get(&endpoint_id).copied() else {
            return;
        };
        for (offset, direction, enforced) in [
            (0, Direction::Ingress, ingress),
            (1, Direction::Egress, egress),
        ] {
            let owner = enforced.then_some(HitSlotOwner::DefaultDeny {
                endpoint_id,
                direction,
            });
            let slot = first + offset;
            if self.owners.get(&slot) != owner.as_ref() {
                self.touched.insert(slot);
                match owner {
                    Some(owner) => self.owners.insert(slot, owner),
                    None => self.owners.remove(&slot),
                };
            }
        }
    }

    pub fn release_endpoint(&mut self, endpoint_id: u32) {
        if self.uncounted_endpoints.remove(&endpoint_id) {
            self.revision += 1;
        }
        if let Some(first) = self.default_denies.remove(&endpoint_id) {
            self.revision += 1;
            self.owners.remove(&first);
            self.owners.remove(&(first + 1));
            self.touched.extend([first, first + 1]);
            self.released.1.push(first);
        }
    }

    /// The slots the last update handed out.
    pub fn fresh(&self) -> Vec<u16> {
        self.fresh.clone()
    }

    pub fn owner(&self, slot: u16) -> Option<HitSlotOwner> {
        self.owners.get(&slot).copied()
    }

    /// Slots whose owner changed since the last call.
    pub fn take_touched(&mut self) -> BTreeSet<u16> {
        std::mem::take(&mut self.touched)
    }

    /// The slots as they stand, and those the last update handed out.
    pub fn table(&self) -> HitSlotTable {
        let mut fresh = self.fresh.clone();
        fresh.sort_unstable();
        HitSlotTable {
            owners: self.owners.clone(),
            fresh,
            uncounted: self.uncounted_rules.len() + 2 * self.uncounted_endpoints.len(),
        }
    }

    /// Changes so far (grows with each change of the assignment).
    pub(super) fn revision(&self) -> u64 {
        self.revision
    }

    /// Releases the slots of rules and endpoints no longer in use (after the first
    /// update of a compiler started from saved slots). They go through quarantine
    /// as any release: the maps still hold entries naming them until this update is
    /// written.
    pub(super) fn release_unused(
        &mut self,
        rule_in_use: impl Fn(u32) -> bool,
        endpoint_in_use: impl Fn(u32) -> bool,
    ) {
        let rules: Vec<u32> = self
            .rules
            .keys()
            .chain(&self.uncounted_rules)
            .filter(|rule_id| !rule_in_use(**rule_id))
            .copied()
            .collect();
        for rule_id in rules {
            self.release_rule(rule_id);
        }
        let endpoints: Vec<u32> = self
            .default_denies
            .keys()
            .chain(&self.uncounted_endpoints)
            .filter(|endpoint_id| !endpoint_in_use(**endpoint_id))
            .copied()
            .collect();
        for endpoint_id in endpoints {
            self.release_endpoint(endpoint_id);
        }
    }

    /// Lists every slot held as handed out by this update (to be zeroed) and as
    /// touched (to be named): what the first update of a fresh compiler does, for
    /// one started from saved slots, whose counts start with it too.
    pub(super) fn all_fresh(&mut self) {
        self.fresh = self
            .rules
            .values()
            .copied()
            .chain(
                self.default_denies
                    .values()
                    .flat_map(|first| [*first, first + 1]),
            )
            .collect();
        self.fresh.sort_unstable();
        self.touched.extend(self.fresh.iter().copied());
    }

    /// The assignment, to save (a copy, in no order: see [`SavedHitSlots::sort`]).
    pub(super) fn saved(&self) -> SavedHitSlots {
        let mut quarantine: Vec<(Vec<u16>, Vec<u16>)> = self.quarantine.iter().cloned().collect();
        // Between updates nothing is in `released`; were it, it is the newest release.
        if !self.released.0.is_empty() || !self.released.1.is_empty() {
            quarantine.push(self.released.clone());
        }
        SavedHitSlots {
            rules: self
                .rules
                .iter()
                .map(|(rule, slot)| (*rule, *slot))
                .collect(),
            default_denies: self
                .default_denies
                .iter()
                .map(|(endpoint, first)| (*endpoint, *first))
                .collect(),
            free: self.free.clone(),
            free_pairs: self.free_pairs.clone(),
            quarantine,
            next: self.next,
            uncounted_rules: self.uncounted_rules.iter().copied().collect(),
            uncounted_endpoints: self.uncounted_endpoints.iter().copied().collect(),
        }
    }

    /// The assignment `saved` describes; an error if it is inconsistent (a slot
    /// held twice, or out of range; a rule or endpoint with two slots).
    pub(super) fn restore(saved: SavedHitSlots) -> Result<Self, String> {
        if !(1..=RULE_HIT_SLOTS).contains(&saved.next) {
            return Err(format!("hit slot counter {} out of range", saved.next));
        }
        let next = saved.next;
        let mut held: HashSet<u16> = HashSet::default();
        let mut hold = |slot: u16| -> Result<(), String> {
            if slot == 0 || u32::from(slot) >= next || !held.insert(slot) {
                return Err(format!("hit slot {slot} is saved twice or out of range"));
            }
            Ok(())
        };
        let mut slots = Self {
            next,
            ..Self::default()
        };
        for (rule_id, slot) in saved.rules {
            hold(slot)?;
            if slots.rules.insert(rule_id, slot).is_some() {
                return Err(format!("rule {rule_id} has two hit slots"));
            }
            slots.owners.insert(slot, HitSlotOwner::Rule(rule_id));
        }
        for (endpoint_id, first) in saved.default_denies {
            hold(first)?;
            hold(first.wrapping_add(1))?;
            if slots.default_denies.insert(endpoint_id, first).is_some() {
                return Err(format!("endpoint {endpoint_id} has two hit slot pairs"));
            }
        }
        let singles = saved
            .free
            .iter()
            .chain(saved.quarantine.iter().flat_map(|(singles, _)| singles));
        for slot in singles {
            hold(*slot)?;
        }
        let pairs = saved
            .free_pairs
            .iter()
            .chain(saved.quarantine.iter().flat_map(|(_, pairs)| pairs));
        for first in pairs {
            hold(*first)?;
            hold(first.wrapping_add(1))?;
        }
        slots.free = saved.free;
        slots.free_pairs = saved.free_pairs;
        slots.quarantine = saved.quarantine.into();
        slots.uncounted_rules = saved.uncounted_rules.into_iter().collect();
        slots.uncounted_endpoints = saved.uncounted_endpoints.into_iter().collect();
        if slots
            .uncounted_rules
            .iter()
            .any(|r| slots.rules.contains_key(r))
            || slots
                .uncounted_endpoints
                .iter()
                .any(|e| slots.default_denies.contains_key(e))
        {
            return Err("a rule or endpoint is saved both counted and uncounted".to_owned());
        }
        Ok(slots)
    }

    fn take_single(&mut self) -> Option<u16> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        if let Some(first) = self.free_pairs.pop() {
            self.free.push(first + 1);
            return Some(first);
        }
        self.take_new(1)
    }

    fn take_pair(&mut self) -> Option<u16> {
        self.free_pairs.pop().or_else(|| self.take_new(2))
    }

    fn take_new(&mut self, count: u32) -> Option<u16> {
        if self.next + count > RULE_HIT_SLOTS {
            return None;
        }
        let first = self.next as u16;
        self.next += count;
        Some(first)
    }
}

/// [`HitSlots`] as saved: which rule and endpoint has which slots, and which slots
/// are free, in quarantine (oldest first) or never handed out. Default-deny owners
/// are not saved: the first update sets them from what it enforces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedHitSlots {
    /// (rule id, slot).
    rules: Vec<(u32, u16)>,
    /// (endpoint id, first slot of its pair).
    default_denies: Vec<(u32, u16)>,
    /// In the order they are handed out from (last first).
    free: Vec<u16>,
    free_pairs: Vec<u16>,
    /// (singles, pairs) released by each of the last updates, oldest first.
    quarantine: Vec<(Vec<u16>, Vec<u16>)>,
    next: u32,
    uncounted_rules: Vec<u32>,
    uncounted_endpoints: Vec<u32>,
}

impl SavedHitSlots {
    /// Puts the maps in id order, so that the same assignment saves as the same
    /// text (the free lists keep their order: it is the order of reuse).
    pub(super) fn sort(&mut self) {
        self.rules.sort_unstable();
        self.default_denies.sort_unstable();
    }

    /// Slots held (by rules and default-deny pairs).
    pub(super) fn held(&self) -> usize {
        self.rules.len() + 2 * self.default_denies.len()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::policy::{Compiler, PolicySet, PolicySetBuilder};

    const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - ports: [{port: 80}]
  - ports: [{port: 443}]
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: web-1, namespace: prod, labels: {app: web}}
spec: {addresses: [10.0.0.1]}
"#;

    fn load(text: &str) -> PolicySet {
        let mut builder = PolicySetBuilder::new();
        builder.add_text(Path::new("test.yaml"), text);
        builder.finish().expect("valid test policy")
    }

    #[test]
    fn every_rule_and_default_deny_gets_a_slot_that_stays() {
        let set = load(POLICY);
        let mut compiler = Compiler::default();
        let first = compiler.compile(&set);
        // Two rules, one endpoint's pair (its ingress enforced: one default deny).
        assert_eq!(first.hit_slots.owners.len(), 3);
        assert_eq!(first.hit_slots.fresh, [1, 2, 3, 4]);
        assert!(first.state.policy.values().all(|e| e.hit_slot != 0));
        assert!(
            first
                .state
                .endpoints
                .values()
                .all(|e| e.default_deny_hit_slot != 0)
        );
        let second = compiler.compile(&set);
        assert_eq!(second.hit_slots.owners, first.hit_slots.owners);
        assert!(second.hit_slots.fresh.is_empty(), "kept, not zeroed again");
        assert_eq!(second.state, first.state);
    }

    #[test]
    fn a_released_slot_waits_two_compiles_before_reuse() {
        let with_rule = load(POLICY);
        let without = load(&POLICY.replace("  - ports: [{port: 443}]\n", ""));
        let mut compiler = Compiler::default();
        let first = compiler.compile(&with_rule);
        let second = compiler.compile(&without);
        let released: Vec<u16> = first
            .hit_slots
            .owners
            .keys()
            .filter(|slot| !second.hit_slots.owners.contains_key(slot))
            .copied()
            .collect();
        assert_eq!(released.len(), 1);
        // The rule comes back at once: a new slot, the released one waits.
        let third = compiler.compile(&with_rule);
        assert_eq!(third.hit_slots.fresh.len(), 1);
        assert!(!third.hit_slots.fresh.contains(&released[0]));
        // Removed and added again later: the released slot is reused, zeroed first.
        compiler.compile(&without);
        compiler.compile(&without);
        let later = compiler.compile(&with_rule);
        assert_eq!(later.hit_slots.fresh.len(), 1);
        assert_eq!(later.hit_slots.owners.len(), 3);
    }
}
