//! The workloads of a policy set, kept so that one can be added, replaced or removed
//! without touching the others: each lives in a slot whose number does not change
//! while it exists (the address index refers to slots), and a key index gives them
//! in `(namespace, name)` order. A cluster holds tens of thousands; a change to one
//! costs a lookup, not a shift of all of them. A workload is shared with the
//! document it came from ([`super::PolicyStore`]): held once, not twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::model::Workload;

#[derive(Clone, Default, PartialEq, Eq)]
pub struct Workloads {
    slots: Vec<Option<Arc<Workload>>>,
    free: Vec<usize>,
    /// namespace -> name -> slot: two levels, so that a lookup borrows the names
    /// instead of copying them into a tuple.
    by_key: BTreeMap<String, BTreeMap<String, usize>>,
    len: usize,
}

impl Workloads {
    /// Workloads in `(namespace, name)` order.
    pub fn iter(&self) -> impl Iterator<Item = &Workload> {
        self.slots_in_order().map(|slot| {
            self.slots[*slot]
                .as_deref()
                .expect("indexed slots are filled")
        })
    }

    /// The workloads themselves, shared, in `(namespace, name)` order.
    pub fn iter_shared(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.slots_in_order().map(|slot| {
            self.slots[*slot]
                .as_ref()
                .expect("indexed slots are filled")
        })
    }

    /// The workload `namespace/name`, shared.
    pub fn shared(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.slots.get(self.find(namespace, name)?)?.as_ref()
    }

    /// (slot, workload) in `(namespace, name)` order.
    pub fn iter_slots(&self) -> impl Iterator<Item = (usize, &Workload)> {
        self.slots_in_order().map(|slot| {
            (
                *slot,
                self.slots[*slot]
                    .as_deref()
                    .expect("indexed slots are filled"),
            )
        })
    }

    /// Filled slots in `(namespace, name)` order.
    fn slots_in_order(&self) -> impl Iterator<Item = &usize> {
        self.by_key.values().flat_map(BTreeMap::values)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The workload in `slot`.
    pub fn get(&self, slot: usize) -> Option<&Workload> {
        self.slots.get(slot)?.as_deref()
    }

    /// The slot of workload `namespace/name`.
    pub fn find(&self, namespace: &str, name: &str) -> Option<usize> {
        self.by_key.get(namespace)?.get(name).copied()
    }

    /// Puts `workload` in, replacing the one of the same key (which keeps its slot).
    /// Returns its slot and the replaced workload.
    pub fn insert(&mut self, workload: impl Into<Arc<Workload>>) -> (usize, Option<Arc<Workload>>) {
        let workload = workload.into();
        if let Some(slot) = self.find(&workload.namespace, &workload.name) {
            let old = self.slots[slot].replace(workload);
            return (slot, old);
        }
        let name = workload.name.clone();
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(workload);
                slot
            }
            None => {
                self.slots.push(Some(workload));
                self.slots.len() - 1
            }
        };
        // The namespace is copied only for a namespace's first workload.
        let namespace = &self.slots[slot].as_ref().expect("just filled").namespace;
        match self.by_key.get_mut(namespace) {
            Some(names) => {
                names.insert(name, slot);
            }
            None => {
                self.by_key
                    .insert(namespace.clone(), BTreeMap::from([(name, slot)]));
            }
        }
        self.len += 1;
        (slot, None)
    }

    /// Takes workload `namespace/name` out; its slot may be reused.
    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<(usize, Arc<Workload>)> {
        let names = self.by_key.get_mut(namespace)?;
        let slot = names.remove(name)?;
        if names.is_empty() {
            self.by_key.remove(namespace);
        }
        self.len -= 1;
        let workload = self.slots[slot].take()?;
        self.free.push(slot);
        Some((slot, workload))
    }
}

impl FromIterator<Workload> for Workloads {
    fn from_iter<I: IntoIterator<Item = Workload>>(iter: I) -> Self {
        let mut workloads = Self::default();
        for workload in iter {
            workloads.insert(workload);
        }
        workloads
    }
}

impl std::ops::Index<usize> for Workloads {
    type Output = Workload;

    fn index(&self, slot: usize) -> &Workload {
        self.get(slot).expect("a filled slot")
    }
}

impl<'a> IntoIterator for &'a Workloads {
    type Item = &'a Workload;
    type IntoIter = Box<dyn Iterator<Item = &'a Workload> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl std::fmt::Debug for Workloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}
