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

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use microseg_common::identity::IDENTITY_FIRST_ALLOCATED;

use super::super::evaluate::RuleRef;
use super::super::model::{IpBlock, Labels, NamedPort};

/// When a counter passes this, the next compile numbers everything afresh (one full
/// rewrite of the maps, after about two billion changes).
const RENUMBER_AFTER: u32 = u32::MAX / 2;

/// What a workload identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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
    rules: HashMap<RuleRef, u32>,
    next_identity: u32,
    next_endpoint: u32,
    next_rule: u32,
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
        let id = allocate(&mut self.next_identity);
        self.workload_identities.insert(key.clone(), id);
        (id, key)
    }

    pub(super) fn release_workload_identity(&mut self, key: &WorkloadIdentityKey) {
        self.workload_identities.remove(key);
    }

    pub(super) fn cidr_identity(&mut self, covering: &[IpBlock]) -> u32 {
        if let Some(id) = self.cidr_identities.get(covering) {
            return *id;
        }
        let id = allocate(&mut self.next_identity);
        self.cidr_identities.insert(covering.to_vec(), id);
        id
    }

    pub(super) fn release_cidr_identity(&mut self, covering: &[IpBlock]) {
        self.cidr_identities.remove(covering);
    }

    pub(super) fn endpoint(&mut self, namespace: &str, name: &str) -> u32 {
        if let Some(id) = self
            .endpoints
            .get(namespace)
            .and_then(|names| names.get(name))
        {
            return *id;
        }
        let id = allocate(&mut self.next_endpoint);
        self.endpoints
            .entry(namespace.to_owned())
            .or_default()
            .insert(name.to_owned(), id);
        id
    }

    pub(super) fn release_endpoint(&mut self, namespace: &str, name: &str) {
        if let Some(names) = self.endpoints.get_mut(namespace) {
            names.remove(name);
            if names.is_empty() {
                self.endpoints.remove(namespace);
            }
        }
    }

    pub(super) fn rule(&mut self, rule: &RuleRef) -> u32 {
        if let Some(id) = self.rules.get(rule) {
            return *id;
        }
        let id = allocate(&mut self.next_rule);
        self.rules.insert(rule.clone(), id);
        id
    }

    pub(super) fn release_rule(&mut self, rule: &RuleRef) {
        self.rules.remove(rule);
    }
}

fn allocate(counter: &mut u32) -> u32 {
    let id = *counter;
    *counter += 1;
    id
}
