//! A policy set kept up to date one document at a time: what each document
//! contributed is remembered, a changed document's old contribution is taken out
//! and its new one put in, and the checks that span documents (a workload name, an
//! address, an interface claimed twice) are made against indexes rather than by
//! reading every document again. The result is what [`PolicySetBuilder::finish`]
//! would make of the same documents, and the keys it touched, for the compiler
//! ([`SetChanges`]).
//!
//! A batch of changes is applied whole or not at all: on any error every document
//! is put back as it was.
//!
//! [`PolicySetBuilder::finish`]: super::PolicySetBuilder::finish

use std::collections::BTreeMap;
use std::hash::Hash;
use std::net::IpAddr;

use foldhash::{HashMap, HashMapExt};

use super::compile::{SetChanges, workload_key};
use super::error::{LoadErrors, PolicyError};
use super::load::ConvertedDocument;
use super::model::{Labels, NamespaceInfo, PolicySet};
use super::validate::namespace_labels;

/// A policy set and the documents it was made of.
#[derive(Clone, Debug)]
pub struct PolicyStore<K: Ord + Hash + Clone> {
    set: PolicySet,
    documents: HashMap<K, ConvertedDocument>,
    /// Namespaces described by a document.
    explicit_namespaces: HashMap<String, NamespaceInfo>,
    /// Workloads per namespace (a namespace nobody described exists while it has
    /// workloads).
    namespace_workloads: HashMap<String, usize>,
    /// Interface -> the workload naming it (`namespace/name`).
    interfaces: HashMap<String, String>,
}

impl<K: Ord + Hash + Clone> Default for PolicyStore<K> {
    fn default() -> Self {
        Self {
            set: PolicySet::default(),
            documents: HashMap::new(),
            explicit_namespaces: HashMap::new(),
            namespace_workloads: HashMap::new(),
            interfaces: HashMap::new(),
        }
    }
}

impl<K: Ord + Hash + Clone> PolicyStore<K> {
    pub fn set(&self) -> &PolicySet {
        &self.set
    }

    /// The workload (`namespace/name`) naming `interface` as its own, if one does:
    /// an index, where the set would be read whole.
    pub fn interface_owner(&self, interface: &str) -> Option<&str> {
        self.interfaces.get(interface).map(String::as_str)
    }

    /// How many documents it holds.
    pub fn len(&self) -> usize {
        self.documents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.documents.is_empty()
    }

    /// The conversion held for document `key`.
    pub fn document(&self, key: &K) -> Option<&ConvertedDocument> {
        self.documents.get(key)
    }

    /// Replaces documents (`None`: removes), all or none: returns what changed in the
    /// set, or every error (and the set stays as it was).
    pub fn apply(
        &mut self,
        changes: Vec<(K, Option<ConvertedDocument>)>,
    ) -> Result<SetChanges, LoadErrors> {
        let mut touched = SetChanges::default();
        let mut errors: Vec<PolicyError> = Vec::new();
        // Old versions out first, so that a document may take over what another
        // gives up in the same batch.
        let mut taken: Vec<(K, Option<ConvertedDocument>)> = Vec::with_capacity(changes.len());
        for (key, _) in &changes {
            let old = self.documents.remove(key);
            if let Some(old) = &old {
                self.remove_items(old, &mut touched);
            }
            taken.push((key.clone(), old));
        }
        let mut added: Vec<K> = Vec::new();
        for (key, new) in changes {
            let Some(new) = new else { continue };
            if !new.errors.is_empty() {
                errors.extend(new.errors.iter().cloned());
                continue;
            }
            match self.check_items(&new) {
                Ok(()) => {
                    self.add_items(&new, &mut touched);
                    self.documents.insert(key.clone(), new);
                    added.push(key);
                }
                Err(mut found) => errors.append(&mut found),
            }
        }
        if errors.is_empty() {
            return Ok(touched);
        }
        // Undo: the new versions out, the old ones back.
        let mut discard = SetChanges::default();
        for key in added {
            if let Some(new) = self.documents.remove(&key) {
                self.remove_items(&new, &mut discard);
            }
        }
        for (key, old) in taken {
            if let Some(old) = old {
                self.add_items(&old, &mut discard);
                self.documents.insert(key, old);
            }
        }
        errors.sort_by(|left, right| left.source.cmp(&right.source));
        Err(LoadErrors::from(errors))
    }

    /// Errors that adding `doc` to the set as it stands would make.
    fn check_items(&self, doc: &ConvertedDocument) -> Result<(), Vec<PolicyError>> {
        let mut errors = Vec::new();
        let set = &self.set;
        let mut addresses: BTreeMap<IpAddr, String> = BTreeMap::new();
        for workload in &doc.workloads {
            if let Some(first) = set.workload(&workload.namespace, &workload.name) {
                errors.push(PolicyError::new(
                    &workload.source,
                    "metadata.name",
                    format!(
                        "duplicate workload name {} (first defined at {})",
                        workload.key(),
                        first.source
                    ),
                ));
                continue;
            }
            for address in &workload.addresses {
                let owner = set
                    .workload_by_address(*address)
                    .map(|w| (w.key(), w.source.to_string()))
                    .or_else(|| {
                        addresses
                            .get(address)
                            .map(|key| (key.clone(), workload.source.to_string()))
                    });
                if let Some((owner, source)) = owner {
                    errors.push(PolicyError::new(
                        &workload.source,
                        "",
                        format!(
                            "duplicate workload address {address}: {} has it and so does {owner} ({source})",
                            workload.key()
                        ),
                    ));
                }
                addresses.insert(*address, workload.key());
            }
            if let Some(interface) = &workload.interface
                && let Some(owner) = self.interfaces.get(interface)
            {
                let source = set
                    .workload_by_key(owner)
                    .map(|w| w.source.to_string())
                    .unwrap_or_default();
                errors.push(PolicyError::new(
                    &workload.source,
                    "spec.interface",
                    format!(
                        "interface {interface} is already the interface of {owner} ({source}): an interface belongs to one workload"
                    ),
                ));
            }
        }
        for namespace in &doc.namespaces {
            if let Some(first) = self.explicit_namespaces.get(&namespace.name) {
                errors.push(PolicyError::new(
                    &namespace.source.clone().unwrap_or_default(),
                    "metadata.name",
                    format!(
                        "duplicate namespace {} (first defined at {})",
                        namespace.name,
                        first.source.clone().unwrap_or_default()
                    ),
                ));
            }
        }
        for policy in &doc.policies {
            if let Some(first) = set.policy(&policy.namespace, &policy.name) {
                errors.push(PolicyError::new(
                    &policy.source,
                    "metadata.name",
                    format!(
                        "duplicate NetworkPolicy {} (first defined at {})",
                        policy.key(),
                        first.source
                    ),
                ));
            }
        }
        for policy in &doc.cluster_policies {
            if let Some(first) = set.cluster_policies.iter().find(|p| p.name == policy.name) {
                errors.push(PolicyError::new(
                    &policy.source,
                    "metadata.name",
                    format!(
                        "duplicate ClusterNetworkPolicy {} (first defined at {})",
                        policy.name, first.source
                    ),
                ));
            }
        }
        for node in &doc.nodes {
            if let Some(first) = set.nodes.iter().find(|n| n.name == node.name) {
                errors.push(PolicyError::new(
                    &node.source,
                    "metadata.name",
                    format!(
                        "duplicate Node {} (first defined at {})",
                        node.name, first.source
                    ),
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn add_items(&mut self, doc: &ConvertedDocument, touched: &mut SetChanges) {
        for namespace in &doc.namespaces {
            self.explicit_namespaces
                .insert(namespace.name.clone(), namespace.clone());
            self.refresh_namespace(&namespace.name, touched);
        }
        for workload in &doc.workloads {
            if let Some(interface) = &workload.interface {
                self.interfaces.insert(interface.clone(), workload.key());
            }
            *self
                .namespace_workloads
                .entry(workload.namespace.clone())
                .or_default() += 1;
            let (slot, _) = self.set.workloads.insert(workload.clone());
            for address in &workload.addresses {
                self.set.address_index.insert(*address, slot);
            }
            touched.workloads.insert(workload_key(workload));
            self.refresh_namespace(&workload.namespace, touched);
        }
        for policy in &doc.policies {
            let at = self
                .set
                .policies
                .partition_point(|p| (&p.namespace, &p.name) < (&policy.namespace, &policy.name));
            self.set.policies.insert(at, policy.clone());
            touched
                .policies
                .insert((policy.namespace.clone(), policy.name.clone()));
        }
        for policy in &doc.cluster_policies {
            let at = self
                .set
                .cluster_policies
                .partition_point(|p| p.precedence() < policy.precedence());
            self.set.cluster_policies.insert(at, policy.clone());
            touched.cluster_policies.insert(policy.name.clone());
        }
        for node in &doc.nodes {
            let at = self.set.nodes.partition_point(|n| n.name < node.name);
            self.set.nodes.insert(at, node.clone());
            touched.nodes = true;
        }
        for refused in &doc.refused {
            let at = self
                .set
                .refused_policies
                .partition_point(|r| r.key() < refused.key());
            self.set.refused_policies.insert(at, refused.clone());
        }
    }

    fn remove_items(&mut self, doc: &ConvertedDocument, touched: &mut SetChanges) {
        for namespace in &doc.namespaces {
            self.explicit_namespaces.remove(&namespace.name);
            self.refresh_namespace(&namespace.name, touched);
        }
        for workload in &doc.workloads {
            if self
                .set
                .workloads
                .remove(&workload.namespace, &workload.name)
                .is_none()
            {
                continue;
            }
            for address in &workload.addresses {
                self.set.address_index.remove(address);
            }
            if let Some(interface) = &workload.interface {
                self.interfaces.remove(interface);
            }
            if let Some(count) = self.namespace_workloads.get_mut(&workload.namespace) {
                *count -= 1;
                if *count == 0 {
                    self.namespace_workloads.remove(&workload.namespace);
                }
            }
            touched.workloads.insert(workload_key(workload));
            self.refresh_namespace(&workload.namespace, touched);
        }
        for policy in &doc.policies {
            self.set
                .policies
                .retain(|p| (&p.namespace, &p.name) != (&policy.namespace, &policy.name));
            touched
                .policies
                .insert((policy.namespace.clone(), policy.name.clone()));
        }
        for policy in &doc.cluster_policies {
            self.set.cluster_policies.retain(|p| p.name != policy.name);
            touched.cluster_policies.insert(policy.name.clone());
        }
        for node in &doc.nodes {
            self.set.nodes.retain(|n| n.name != node.name);
            touched.nodes = true;
        }
        for refused in &doc.refused {
            let key = refused.key();
            self.set.refused_policies.retain(|r| r.key() != key);
        }
    }

    /// Namespace `name` as the set should have it: described by a document, else
    /// implied by its workloads (the name label only), else absent.
    fn refresh_namespace(&mut self, name: &str, touched: &mut SetChanges) {
        let wanted = match self.explicit_namespaces.get(name) {
            Some(namespace) => Some(namespace.clone()),
            None if self.namespace_workloads.contains_key(name) => Some(NamespaceInfo {
                name: name.to_owned(),
                labels: namespace_labels(name, Labels::new()),
                source: None,
            }),
            None => None,
        };
        let current = self.set.namespaces.get(name);
        if current.map(|n| &n.labels) != wanted.as_ref().map(|n| &n.labels) {
            touched.namespaces.insert(name.to_owned());
        }
        match wanted {
            Some(namespace) => {
                self.set.namespaces.insert(name.to_owned(), namespace);
            }
            None => {
                self.set.namespaces.remove(name);
            }
        }
    }
}
