//! The selector cache (Cilium's): each distinct peer of the rules (pods of scoped
//! namespaces, an ipBlock, nodes) and the identities it selects, kept from one
//! update to the next. An identity that appears is matched against the selectors
//! that could select it (those of its namespace, those choosing namespaces by
//! label); one that goes leaves the selectors that had it; a namespace relabelled
//! re-reads its identities for the namespace-choosing selectors. What changed is
//! reported as the selectors whose sets changed, for the rule layer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use foldhash::HashMap;

use super::identities::{IdentityChanges, IdentityLayer};
use crate::policy::model::{IpBlock, LabelSelector, NamespaceScope, Peer, PolicySet};
use crate::sorted_set::SortedVecSet;

/// A rule peer, as the cache keys it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum PeerSelector {
    Pods {
        namespaces: NamespaceScope,
        pods: LabelSelector,
    },
    Block(IpBlock),
    Nodes(LabelSelector),
}

/// A selector as the cache holds it: one allocation per distinct selector, shared by
/// the cache's indexes, the identities holding it and the rules using it (each held
/// a copy: interning saved 0.6 KiB per policy of three rules in the cluster
/// benchmark's policies).
pub(super) type SharedSelector = Arc<PeerSelector>;

impl PeerSelector {
    pub fn of(peer: &Peer) -> Self {
        match peer {
            Peer::Workloads { namespaces, pods } => Self::Pods {
                namespaces: namespaces.clone(),
                pods: pods.clone(),
            },
            Peer::IpBlock(block) => Self::Block(block.clone()),
            Peer::Nodes(selector) => Self::Nodes(selector.clone()),
        }
    }
}

#[derive(Clone, Debug)]
struct Selected {
    identities: BTreeSet<u32>,
    /// Rule peers using the selector.
    uses: usize,
}

/// The pod selectors holding one identity: most identities are held by a few.
type HeldBy = SortedVecSet<SharedSelector>;

#[derive(Clone, Debug, Default)]
pub(super) struct SelectorCache {
    selectors: HashMap<SharedSelector, Selected>,
    /// Pod selectors scoped to one namespace, by namespace.
    by_namespace: BTreeMap<String, BTreeSet<SharedSelector>>,
    /// Pod selectors choosing namespaces by label.
    choosing_namespaces: BTreeSet<SharedSelector>,
    /// ipBlock selectors, by block.
    by_block: BTreeMap<IpBlock, SharedSelector>,
    nodes: BTreeSet<SharedSelector>,
    /// identity -> pod selectors holding it (to leave them when it goes).
    holding: HashMap<u32, HeldBy>,
    /// Selectors whose identities changed in this update.
    changed: BTreeSet<SharedSelector>,
}

impl SelectorCache {
    /// The identities `selector` selects (empty if unknown).
    pub fn identities(&self, selector: &PeerSelector) -> impl Iterator<Item = u32> + '_ {
        self.selectors
            .get(selector)
            .into_iter()
            .flat_map(|s| s.identities.iter().copied())
    }

    /// A rule peer starts using `selector`; a new one is worked out now. Returns
    /// the selector as the cache holds it, for the rule to hold.
    pub fn add_use(
        &mut self,
        selector: PeerSelector,
        set: &PolicySet,
        layer: &IdentityLayer,
    ) -> SharedSelector {
        if let Some(known) = self.selectors.get_mut(&selector) {
            known.uses += 1;
            let (shared, _) = self.selectors.get_key_value(&selector).expect("just found");
            return shared.clone();
        }
        let shared = Arc::new(selector);
        match &*shared {
            PeerSelector::Pods {
                namespaces: NamespaceScope::Named(namespace),
                ..
            } => {
                self.by_namespace
                    .entry(namespace.clone())
                    .or_default()
                    .insert(shared.clone());
            }
            PeerSelector::Pods { .. } => {
                self.choosing_namespaces.insert(shared.clone());
            }
            PeerSelector::Block(block) => {
                self.by_block.insert(block.clone(), shared.clone());
            }
            PeerSelector::Nodes(_) => {
                self.nodes.insert(shared.clone());
            }
        }
        let identities = Self::select(&shared, set, layer);
        if matches!(*shared, PeerSelector::Pods { .. }) {
            for id in &identities {
                self.holding.entry(*id).or_default().insert(shared.clone());
            }
        }
        self.selectors.insert(
            shared.clone(),
            Selected {
                identities,
                uses: 1,
            },
        );
        shared
    }

    /// A rule peer stops using `selector`.
    pub fn release(&mut self, selector: &PeerSelector) {
        let Some(known) = self.selectors.get_mut(selector) else {
            return;
        };
        known.uses -= 1;
        if known.uses > 0 {
            return;
        }
        let known = self.selectors.remove(selector).expect("present");
        for id in &known.identities {
            if let Some(held) = self.holding.get_mut(id) {
                held.remove(selector);
                if held.is_empty() {
                    self.holding.remove(id);
                }
            }
        }
        match selector {
            PeerSelector::Pods {
                namespaces: NamespaceScope::Named(namespace),
                ..
            } => {
                if let Some(selectors) = self.by_namespace.get_mut(namespace) {
                    selectors.remove(selector);
                    if selectors.is_empty() {
                        self.by_namespace.remove(namespace);
                    }
                }
            }
            PeerSelector::Pods { .. } => {
                self.choosing_namespaces.remove(selector);
            }
            PeerSelector::Block(block) => {
                self.by_block.remove(block);
            }
            PeerSelector::Nodes(_) => {
                self.nodes.remove(selector);
            }
        }
    }

    /// The identities `selector` selects, worked out from the identity layer.
    fn select(selector: &PeerSelector, set: &PolicySet, layer: &IdentityLayer) -> BTreeSet<u32> {
        let labels_of = |id: u32| layer.workload_identities.get(&id).map(|i| &i.key.labels);
        match selector {
            PeerSelector::Pods {
                namespaces: NamespaceScope::Named(namespace),
                pods,
            } => layer
                .by_namespace
                .get(namespace.as_str())
                .map(|index| index.matching(pods, labels_of).collect())
                .unwrap_or_default(),
            PeerSelector::Pods {
                namespaces: NamespaceScope::Selected(chosen),
                pods,
            } => layer
                .by_namespace
                .iter()
                .filter(|(namespace, _)| chosen.matches(set.namespace_labels(namespace)))
                .flat_map(|(_, index)| index.matching(pods, labels_of))
                .collect(),
            PeerSelector::Block(block) => layer
                .block_identities
                .get(block)
                .cloned()
                .unwrap_or_default(),
            PeerSelector::Nodes(chosen) => set
                .nodes
                .iter()
                .filter(|node| chosen.matches(&node.labels))
                .flat_map(|node| &node.address_blocks)
                .flat_map(|block| layer.block_identities.get(block).into_iter().flatten())
                .copied()
                .collect(),
        }
    }

    /// Works out again `selector`'s identities, recording a change.
    fn refresh(&mut self, selector: &SharedSelector, set: &PolicySet, layer: &IdentityLayer) {
        let identities = Self::select(selector, set, layer);
        let Some(known) = self.selectors.get_mut(&**selector) else {
            return;
        };
        if known.identities != identities {
            known.identities = identities;
            self.changed.insert(selector.clone());
        }
    }

    /// Takes the identity layer's changes, and the namespaces whose labels changed
    /// and whether the nodes did.
    pub fn update(
        &mut self,
        set: &PolicySet,
        layer: &IdentityLayer,
        changes: &IdentityChanges,
        namespaces: &BTreeSet<String>,
        nodes_changed: bool,
    ) {
        // Gone: out of every pod selector holding it.
        for id in &changes.removed {
            for selector in self.holding.remove(id).unwrap_or_default() {
                if let Some(known) = self.selectors.get_mut(&*selector) {
                    known.identities.remove(id);
                    self.changed.insert(selector);
                }
            }
        }
        // New workload identities: the pod selectors that could select them.
        for id in &changes.added {
            let Some(identity) = layer.workload_identities.get(id) else {
                continue;
            };
            let namespace: &str = &identity.key.namespace;
            let labels = &identity.key.labels;
            // Every selector that could match is read; only those that do are
            // copied (a cluster has thousands of namespace-choosing selectors).
            let matching: Vec<SharedSelector> = self
                .by_namespace
                .get(namespace)
                .into_iter()
                .flatten()
                .chain(&self.choosing_namespaces)
                .filter(|selector| {
                    let PeerSelector::Pods {
                        namespaces: scope,
                        pods,
                    } = &***selector
                    else {
                        return false;
                    };
                    let in_scope = match scope {
                        NamespaceScope::Named(named) => named == namespace,
                        NamespaceScope::Selected(chosen) => {
                            chosen.matches(set.namespace_labels(namespace))
                        }
                    };
                    in_scope && pods.matches(labels)
                })
                .cloned()
                .collect();
            for selector in matching {
                let Some(known) = self.selectors.get_mut(&*selector) else {
                    continue;
                };
                known.identities.insert(*id);
                self.holding
                    .entry(*id)
                    .or_default()
                    .insert(selector.clone());
                self.changed.insert(selector);
            }
        }
        // Relabelled namespaces: the selectors choosing namespaces read again the
        // identities of those namespaces.
        if !namespaces.is_empty() {
            let choosing: Vec<SharedSelector> = self.choosing_namespaces.iter().cloned().collect();
            for selector in choosing {
                let PeerSelector::Pods {
                    namespaces: NamespaceScope::Selected(chosen),
                    pods,
                } = &*selector
                else {
                    continue;
                };
                for namespace in namespaces {
                    let Some(index) = layer.by_namespace.get(namespace.as_str()) else {
                        continue;
                    };
                    let namespace_chosen = chosen.matches(set.namespace_labels(namespace));
                    for id in index.items() {
                        let selects = namespace_chosen
                            && layer
                                .workload_identities
                                .get(&id)
                                .is_some_and(|identity| pods.matches(&identity.key.labels));
                        let Some(known) = self.selectors.get_mut(&*selector) else {
                            continue;
                        };
                        if selects == known.identities.contains(&id) {
                            continue;
                        }
                        if selects {
                            known.identities.insert(id);
                            self.holding.entry(id).or_default().insert(selector.clone());
                        } else {
                            known.identities.remove(&id);
                            if let Some(held) = self.holding.get_mut(&id) {
                                held.remove(&*selector);
                            }
                        }
                        self.changed.insert(selector.clone());
                    }
                }
            }
        }
        // Blocks whose identities changed, and nodes.
        for block in &changes.blocks_changed {
            if let Some(selector) = self.by_block.get(block).cloned() {
                self.refresh(&selector, set, layer);
            }
        }
        if nodes_changed || !changes.blocks_changed.is_empty() {
            let nodes: Vec<SharedSelector> = self.nodes.iter().cloned().collect();
            for selector in nodes {
                self.refresh(&selector, set, layer);
            }
        }
    }

    /// The selectors whose identities changed since the last call.
    pub fn take_changed(&mut self) -> BTreeSet<SharedSelector> {
        std::mem::take(&mut self.changed)
    }
}
