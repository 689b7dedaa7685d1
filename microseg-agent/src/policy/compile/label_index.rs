//! Items of one namespace (workloads, identities) indexed by label, so that a selector
//! with `matchLabels` is matched against the items carrying one of its labels only,
//! not against the whole namespace: compiling N policies over N workloads then costs
//! about N, not N x namespace size.

use foldhash::HashMap;

use super::super::model::{LabelSelector, Labels};

#[derive(Default)]
pub(super) struct LabelIndex<'a> {
    all: Vec<usize>,
    /// key -> value -> items.
    by_label: HashMap<&'a str, HashMap<&'a str, Vec<usize>>>,
}

impl<'a> LabelIndex<'a> {
    pub fn add(&mut self, item: usize, labels: &'a Labels) {
        self.all.push(item);
        for (key, value) in labels {
            self.by_label
                .entry(key)
                .or_default()
                .entry(value)
                .or_default()
                .push(item);
        }
    }

    /// Every item that may match `selector`, in the order added: the items carrying
    /// its rarest `matchLabels` pair, or all of them. The caller still matches each.
    pub fn candidates(&self, selector: &LabelSelector) -> &[usize] {
        selector
            .match_labels
            .iter()
            .map(|(key, value)| {
                self.by_label
                    .get(key)
                    .and_then(|values| values.get(value))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|items| items.len())
            .unwrap_or(&self.all)
    }
}
