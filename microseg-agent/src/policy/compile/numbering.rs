//! Ids that stay with what they number from one compile to the next, so that a change
//! rewrites only the map entries it affects (as Cilium keeps an identity per label set).
//!
//! - a workload identity per (namespace, pod labels, ipBlocks containing the address,
//!   named ports egress rules resolve on it);
//! - a CIDR identity per set of ipBlocks covering a prefix;
//! - an endpoint id per workload (`namespace/name`);
//! - a rule id per policy rule (namespace, name, direction, index).
//!
//! Ids are handed out in increasing order and not reused while the counters last, so
//! an event or a conntrack entry from an older generation never names a different
//! thing with the same id. The compiler releases an id when what it numbers goes.
//!
//! The agent keeps them across a restart too ([`SavedNumbering`], in `saved_ids`):
//! a compiler started from saved ids finds each thing's id by the same key, hands
//! out new ids after the saved counters, and releases, after its first update, the
//! ids saved for things that are gone.

use std::collections::BTreeSet;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt, HashSet};
use serde::{Deserialize, Serialize};

use microseg_common::identity::IDENTITY_FIRST_ALLOCATED;

use super::super::evaluate::RuleRef;
use super::super::model::{IpBlock, Labels, NamedPort};

/// When a counter passes this, the next compile numbers everything afresh (one full
/// rewrite of the maps, after about two billion changes).
const RENUMBER_AFTER: u32 = u32::MAX / 2;

/// What a workload identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentityKey {
    /// Shared by the identities of one namespace.
    pub namespace: Arc<str>,
    pub labels: Labels,
    pub ip_blocks: Vec<IpBlock>,
    pub named_ports: Vec<NamedPort>,
}

/// The ids in use, and the counters for new ones.
#[derive(Clone, Debug)]
pub struct Numbering {
    workload_identities: HashMap<Arc<WorkloadIdentityKey>, u32>,
    cidr_identities: HashMap<Vec<IpBlock>, u32>,
    /// namespace -> name -> endpoint id.
    endpoints: HashMap<String, HashMap<String, u32>>,
    rules: HashMap<Arc<RuleRef>, u32>,
    next_identity: u32,
    next_endpoint: u32,
    next_rule: u32,
    /// Counts changes (an id handed out or released), to tell whether the saved ids
    /// are out of date.
    revision: u64,
    /// Started from saved ids and not yet through an update: ids saved for what is
    /// gone are still held (see `release_unused`).
    restored: bool,
}

impl Default for Numbering {
    fn default() -> Self {
        Self {
            workload_identities: HashMap::new(),
            cidr_identities: HashMap::new(),
            endpoints: HashMap::new(),
            rules: HashMap::new(),
            next_identity: IDENTITY_FIRST_ALLOCATED,
            next_endpoint: 1,
            // Rule id 0 is `RULE_ID_DEFAULT_DENY`.
            next_rule: 1,
            revision: 0,
            restored: false,
        }
    }
}

impl Numbering {
    /// Whether a counter ran past `RENUMBER_AFTER`: the compiler then starts afresh
    /// (one full rewrite of the maps, after about two billion changes).
    pub(super) fn exhausted(&self) -> bool {
        self.next_identity > RENUMBER_AFTER
            || self.next_endpoint > RENUMBER_AFTER
            || self.next_rule > RENUMBER_AFTER
    }

    /// Ids in use (workload identities, CIDR identities, endpoints, rules).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.workload_identities.len(),
            self.cidr_identities.len(),
            self.endpoints.values().map(HashMap::len).sum(),
            self.rules.len(),
        )
    }

    /// Room for `workloads` more workload identities: a full compile sizes the map
    /// once instead of growing it (each growth hashes every key again).
    pub(super) fn reserve_workload_identities(&mut self, workloads: usize) {
        self.workload_identities.reserve(workloads);
    }

    /// The identity of `key`, and the key as shared with the identity table: the
    /// one it has, or a new one.
    pub(super) fn workload_identity(
        &mut self,
        key: WorkloadIdentityKey,
    ) -> (u32, Arc<WorkloadIdentityKey>) {
        if let Some((key, id)) = self.workload_identities.get_key_value(&key) {
            return (*id, key.clone());
        }
        let key = Arc::new(key);
        self.revision += 1;
        let id = allocate(&mut self.next_identity);
        self.workload_identities.insert(key.clone(), id);
        (id, key)
    }

    pub(super) fn release_workload_identity(&mut self, key: &WorkloadIdentityKey) {
        if self.workload_identities.remove(key).is_some() {
            self.revision += 1;
        }
    }

    pub(super) fn cidr_identity(&mut self, covering: &[IpBlock]) -> u32 {
        if let Some(id) = self.cidr_identities.get(covering) {
            return *id;
        }
        self.revision += 1;
        let id = allocate(&mut self.next_identity);
        self.cidr_identities.insert(covering.to_vec(), id);
        id
    }

    pub(super) fn release_cidr_identity(&mut self, covering: &[IpBlock]) {
        if self.cidr_identities.remove(covering).is_some() {
            self.revision += 1;
        }
    }

    pub(super) fn endpoint(&mut self, namespace: &str, name: &str) -> u32 {
        if let Some(id) = self
            .endpoints
            .get(namespace)
            .and_then(|names| names.get(name))
        {
            return *id;
        }
        self.revision += 1;
        let id = allocate(&mut self.next_endpoint);
        self.endpoints
            .entry(namespace.to_owned())
            .or_default()
            .insert(name.to_owned(), id);
        id
    }

    pub(super) fn release_endpoint(&mut self, namespace: &str, name: &str) {
        if let Some(names) = self.endpoints.get_mut(namespace) {
            if names.remove(name).is_some() {
                self.revision += 1;
            }
            if names.is_empty() {
                self.endpoints.remove(namespace);
            }
        }
    }

    pub(super) fn rule(&mut self, rule: &Arc<RuleRef>) -> u32 {
        if let Some((held, id)) = self.rules.get_key_value(&**rule) {
            let id = *id;
            // Hold the caller's copy, shared with the rule's state, rather than
            // one of our own (from saved ids, or a policy registered again).
            if !Arc::ptr_eq(held, rule) {
                self.rules.remove(&**rule);
                self.rules.insert(rule.clone(), id);
            }
            return id;
        }
        self.revision += 1;
        let id = allocate(&mut self.next_rule);
        self.rules.insert(rule.clone(), id);
        id
    }

    pub(super) fn release_rule(&mut self, rule: &RuleRef) {
        if self.rules.remove(rule).is_some() {
            self.revision += 1;
        }
    }

    /// Changes so far (grows with each id handed out or released).
    pub(super) fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether this numbering was started from saved ids and has not been through
    /// an update yet; `false` from the next call on.
    pub(super) fn take_restored(&mut self) -> bool {
        std::mem::take(&mut self.restored)
    }

    /// Releases the ids of what is no longer in use, of each kind (identities,
    /// endpoints, rules): after a compiler started from saved ids is through its
    /// first update, what the saved ids name and that update did not use is gone.
    pub(super) fn release_unused(
        &mut self,
        identity_in_use: impl Fn(u32) -> bool,
        endpoint_in_use: impl Fn(u32) -> bool,
        rule_in_use: impl Fn(u32) -> bool,
    ) {
        let before = self.counts();
        self.workload_identities
            .retain(|_, id| identity_in_use(*id));
        self.cidr_identities.retain(|_, id| identity_in_use(*id));
        for names in self.endpoints.values_mut() {
            names.retain(|_, id| endpoint_in_use(*id));
        }
        self.endpoints.retain(|_, names| !names.is_empty());
        self.rules.retain(|_, id| rule_in_use(*id));
        if self.counts() != before {
            self.revision += 1;
        }
    }

    /// The ids and counters, to save (a copy, in no order: see
    /// [`SavedNumbering::sort`]).
    pub(super) fn saved(&self) -> SavedNumbering {
        SavedNumbering {
            workload_identities: self
                .workload_identities
                .iter()
                .map(|(key, id)| SavedWorkloadIdentity {
                    id: *id,
                    key: key.clone(),
                })
                .collect(),
            cidr_identities: self
                .cidr_identities
                .iter()
                .map(|(ip_blocks, id)| SavedCidrIdentity {
                    id: *id,
                    ip_blocks: ip_blocks.clone(),
                })
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .flat_map(|(namespace, names)| {
                    names.iter().map(|(name, id)| SavedEndpoint {
                        id: *id,
                        namespace: namespace.clone(),
                        name: name.clone(),
                    })
                })
                .collect(),
            rules: self
                .rules
                .iter()
                .map(|(rule, id)| SavedRule {
                    id: *id,
                    rule: RuleRef::clone(rule),
                })
                .collect(),
            next_identity: self.next_identity,
            next_endpoint: self.next_endpoint,
            next_rule: self.next_rule,
        }
    }

    /// The numbering `saved` describes, to be pruned after its first update (see
    /// [`Numbering::release_unused`]); an error if it is inconsistent (an id given
    /// twice, or not below its counter; a key numbered twice).
    pub(super) fn restore(saved: SavedNumbering) -> Result<Self, String> {
        let (next_identity, next_endpoint, next_rule) =
            (saved.next_identity, saved.next_endpoint, saved.next_rule);
        // Below these are the reserved identities, no endpoint, the default deny.
        if next_identity < IDENTITY_FIRST_ALLOCATED || next_endpoint < 1 || next_rule < 1 {
            return Err("an id counter is below its first id".to_owned());
        }
        let mut numbering = Self {
            next_identity,
            next_endpoint,
            next_rule,
            restored: true,
            ..Self::default()
        };
        let mut identities: HashSet<u32> = HashSet::default();
        let mut identity = |id: u32| {
            (IDENTITY_FIRST_ALLOCATED..next_identity).contains(&id) && identities.insert(id)
        };
        // One namespace name shared by its identities, as the identity layer shares
        // it.
        let mut namespaces: BTreeSet<Arc<str>> = BTreeSet::new();
        for SavedWorkloadIdentity { id, key } in saved.workload_identities {
            let mut key = Arc::unwrap_or_clone(key);
            match namespaces.get(&key.namespace) {
                Some(shared) => key.namespace = shared.clone(),
                None => {
                    namespaces.insert(key.namespace.clone());
                }
            }
            if !identity(id)
                || numbering
                    .workload_identities
                    .insert(Arc::new(key), id)
                    .is_some()
            {
                return Err(format!(
                    "workload identity {id} is saved twice or out of range"
                ));
            }
        }
        for SavedCidrIdentity { id, ip_blocks } in saved.cidr_identities {
            if !identity(id) || numbering.cidr_identities.insert(ip_blocks, id).is_some() {
                return Err(format!("CIDR identity {id} is saved twice or out of range"));
            }
        }
        let mut endpoints: HashSet<u32> = HashSet::default();
        for SavedEndpoint {
            id,
            namespace,
            name,
        } in saved.endpoints
        {
            let fresh = (1..next_endpoint).contains(&id) && endpoints.insert(id);
            if !fresh
                || numbering
                    .endpoints
                    .entry(namespace)
                    .or_default()
                    .insert(name, id)
                    .is_some()
            {
                return Err(format!("endpoint {id} is saved twice or out of range"));
            }
        }
        let mut rules: HashSet<u32> = HashSet::default();
        for SavedRule { id, rule } in saved.rules {
            let fresh = (1..next_rule).contains(&id) && rules.insert(id);
            if !fresh || numbering.rules.insert(Arc::new(rule), id).is_some() {
                return Err(format!("rule {id} is saved twice or out of range"));
            }
        }
        Ok(numbering)
    }
}

/// [`Numbering`] as saved: each id with what it numbers, and the counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedNumbering {
    workload_identities: Vec<SavedWorkloadIdentity>,
    cidr_identities: Vec<SavedCidrIdentity>,
    endpoints: Vec<SavedEndpoint>,
    rules: Vec<SavedRule>,
    next_identity: u32,
    next_endpoint: u32,
    next_rule: u32,
}

impl SavedNumbering {
    /// Puts each list in id order, so that the same ids save as the same text
    /// (done outside the agent's lock, not by [`Numbering::saved`]).
    pub(super) fn sort(&mut self) {
        self.workload_identities.sort_unstable_by_key(|i| i.id);
        self.cidr_identities.sort_unstable_by_key(|i| i.id);
        self.endpoints.sort_unstable_by_key(|e| e.id);
        self.rules.sort_unstable_by_key(|r| r.id);
    }

    /// Ids saved (workload identities, CIDR identities, endpoints, rules).
    pub(super) fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.workload_identities.len(),
            self.cidr_identities.len(),
            self.endpoints.len(),
            self.rules.len(),
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedWorkloadIdentity {
    id: u32,
    key: Arc<WorkloadIdentityKey>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedCidrIdentity {
    id: u32,
    ip_blocks: Vec<IpBlock>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedEndpoint {
    id: u32,
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedRule {
    id: u32,
    rule: RuleRef,
}

fn allocate(counter: &mut u32) -> u32 {
    let id = *counter;
    *counter += 1;
    id
}
