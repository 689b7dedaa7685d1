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
//! thing with the same id. Each compile keeps only the ids still in use.

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

/// The ids of one compile, and the counters for new ones.
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
    /// Starts a compile: ids found in `self` are kept (their keys move to the next
    /// numbering, not copied), new ones are allocated after every id `self` ever gave
    /// out.
    pub(super) fn start(&mut self) -> NumberingPass {
        let exhausted = self.next_identity > RENUMBER_AFTER
            || self.next_endpoint > RENUMBER_AFTER
            || self.next_rule > RENUMBER_AFTER;
        let previous = std::mem::take(self);
        let previous = if exhausted {
            Numbering::default()
        } else {
            previous
        };
        NumberingPass {
            next: Numbering {
                workload_identities: HashMap::with_capacity(previous.workload_identities.len()),
                rules: HashMap::with_capacity(previous.rules.len()),
                next_identity: previous.next_identity,
                next_endpoint: previous.next_endpoint,
                next_rule: previous.next_rule,
                ..Numbering::default()
            },
            previous,
        }
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
}

/// One compile's numbering: ids looked up in the previous compile's, recorded in the
/// next one.
pub(super) struct NumberingPass {
    previous: Numbering,
    next: Numbering,
}

fn allocate(counter: &mut u32) -> u32 {
    let id = *counter;
    *counter += 1;
    id
}

impl NumberingPass {
    /// The identity of `key`, and the key as shared with the identity table.
    pub fn workload_identity(
        &mut self,
        key: WorkloadIdentityKey,
    ) -> (u32, Arc<WorkloadIdentityKey>) {
        let (key, id) = match self.previous.workload_identities.remove_entry(&key) {
            Some(found) => found,
            None => (Arc::new(key), allocate(&mut self.next.next_identity)),
        };
        self.next.workload_identities.insert(key.clone(), id);
        (id, key)
    }

    pub fn cidr_identity(&mut self, covering: Vec<IpBlock>) -> u32 {
        let id = match self.previous.cidr_identities.remove(&covering) {
            Some(id) => id,
            None => allocate(&mut self.next.next_identity),
        };
        self.next.cidr_identities.insert(covering, id);
        id
    }

    pub fn endpoint(&mut self, namespace: &str, name: &str) -> u32 {
        let previous = self
            .previous
            .endpoints
            .get_mut(namespace)
            .and_then(|names| names.remove(name));
        let id = match previous {
            Some(id) => id,
            None => allocate(&mut self.next.next_endpoint),
        };
        match self.next.endpoints.get_mut(namespace) {
            Some(names) => {
                names.insert(name.to_owned(), id);
            }
            None => {
                let mut names = HashMap::new();
                names.insert(name.to_owned(), id);
                self.next.endpoints.insert(namespace.to_owned(), names);
            }
        }
        id
    }

    pub fn rule(&mut self, rule: &RuleRef) -> u32 {
        let (key, id) = match self.previous.rules.remove_entry(rule) {
            Some(found) => found,
            None => (rule.clone(), allocate(&mut self.next.next_rule)),
        };
        self.next.rules.insert(key, id);
        id
    }

    /// The numbering to start the next compile from.
    pub fn finish(self) -> Numbering {
        self.next
    }
}
