//! Items of one namespace (workloads, identities) indexed by label, so that a selector
//! with `matchLabels` is matched against the items carrying one of its labels only,
//! not against the whole namespace: compiling N policies over N workloads then costs
//! about N, not N x namespace size. Kept from one update to the next: an item comes
//! and goes with its labels.

use std::collections::BTreeSet;

use foldhash::HashMap;

use super::super::model::{LabelSelector, Labels};

#[derive(Clone, Debug)]
pub(crate) struct OwnedLabelIndex<T: Ord + Copy> {
    all: BTreeSet<T>,
    /// Always empty: what `candidates` answers when no item has a required label.
    none: BTreeSet<T>,
    /// key -> value -> items.
    by_label: HashMap<Box<str>, HashMap<Box<str>, BTreeSet<T>>>,
}

impl<T: Ord + Copy> Default for OwnedLabelIndex<T> {
    fn default() -> Self {
        Self {
            all: BTreeSet::new(),
            none: BTreeSet::new(),
            by_label: HashMap::default(),
        }
    }
}

impl<T: Ord + Copy> OwnedLabelIndex<T> {
    pub fn add(&mut self, item: T, labels: &Labels) {
        self.all.insert(item);
        for (key, value) in labels.iter() {
            // Looked up before inserting: an entry would copy the strings every time.
            let values = match self.by_label.get_mut(key) {
                Some(values) => values,
                None => self.by_label.entry(key.into()).or_default(),
            };
            match values.get_mut(value) {
                Some(items) => {
                    items.insert(item);
                }
                None => {
                    values.insert(value.into(), BTreeSet::from([item]));
                }
            }
        }
    }

    pub fn remove(&mut self, item: T, labels: &Labels) {
        self.all.remove(&item);
        for (key, value) in labels.iter() {
            let Some(values) = self.by_label.get_mut(key) else {
                continue;
            };
            if let Some(items) = values.get_mut(value) {
                items.remove(&item);
                if items.is_empty() {
                    values.remove(value);
                }
            }
            if values.is_empty() {
                self.by_label.remove(key);
            }
        }
    }

    /// Every item, in order.
    pub fn items(&self) -> impl Iterator<Item = T> + '_ {
        self.all.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Every item that may match `selector`, in order: the items carrying its rarest
    /// `matchLabels` pair, or all of them. The caller still matches each.
    pub fn candidates(&self, selector: &LabelSelector) -> &BTreeSet<T> {
        let mut best: Option<&BTreeSet<T>> = None;
        for (key, value) in selector.match_labels.iter() {
            match self.by_label.get(key).and_then(|values| values.get(value)) {
                Some(items) => {
                    if best.is_none_or(|b| items.len() < b.len()) {
                        best = Some(items);
                    }
                }
                // No item has this pair: none matches.
                None => return &self.none,
            }
        }
        best.unwrap_or(&self.all)
    }

    /// The items `selector` matches, given each item's labels.
    pub fn matching<'s>(
        &'s self,
        selector: &'s LabelSelector,
        labels_of: impl Fn(T) -> Option<&'s Labels> + 's,
    ) -> impl Iterator<Item = T> + 's {
        self.candidates(selector)
            .iter()
            .copied()
            .filter(move |item| labels_of(*item).is_some_and(|labels| selector.matches(labels)))
    }
}
