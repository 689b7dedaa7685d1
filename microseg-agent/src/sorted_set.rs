//! A set kept as a sorted vector, for the many sets of the control plane that almost
//! always hold one or two items (the claims on an address, the selectors holding an
//! identity): it takes its items' own size, where a `BTreeSet` allocates a node for
//! eleven (about 1 KiB per set, a gigabyte at a million). Inserting and removing
//! shift the vector: fine for small sets, not for large ones.

use std::borrow::Borrow;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortedVecSet<T>(Vec<T>);

impl<T> Default for SortedVecSet<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Ord> SortedVecSet<T> {
    /// Adds `item` unless an equal one is in; true if it was added.
    pub fn insert(&mut self, item: T) -> bool {
        match self.0.binary_search(&item) {
            Ok(_) => false,
            Err(at) => {
                // Exact: a push would make room for four.
                self.0.reserve_exact(1);
                self.0.insert(at, item);
                true
            }
        }
    }

    /// Removes the item equal to `item`; true if there was one.
    pub fn remove<Q>(&mut self, item: &Q) -> bool
    where
        T: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match self.0.binary_search_by(|held| held.borrow().cmp(item)) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The items, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<T> IntoIterator for SortedVecSet<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_stay_sorted_and_unique() {
        let mut set = SortedVecSet::default();
        assert!(set.insert(3));
        assert!(set.insert(1));
        assert!(!set.insert(3), "an equal item is not added twice");
        assert!(set.insert(2));
        assert_eq!(set.iter().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(set.remove(&2));
        assert!(!set.remove(&2));
        assert_eq!(set.len(), 2);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn shared_items_are_removed_by_their_value() {
        let mut set: SortedVecSet<std::sync::Arc<String>> = SortedVecSet::default();
        set.insert("b".to_owned().into());
        set.insert("a".to_owned().into());
        assert!(set.remove(&"b".to_owned()));
        assert!(!set.is_empty());
    }
}
