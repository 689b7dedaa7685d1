//! Label sets (key -> value) of workloads, namespaces and `matchLabels`.
//!
//! Kept as one shared, sorted slice of boxed strings: most label sets hold one to
//! five pairs, and the agent holds one per workload of the cluster and one per
//! identity. A `BTreeMap<String, String>` allocates a node for eleven pairs whatever
//! the count (about 550 bytes before the strings); this holds two pairs in 80 bytes
//! plus the strings, and a clone (an identity's copy of its workloads' labels) is a
//! reference count. Lookups are binary searches, as fast as the tree's at these
//! sizes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer, ser::SerializeMap};

/// One (key, value) pair.
type Pair = (Box<str>, Box<str>);

/// A label set: keys are unique, pairs sorted by key.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels {
    /// `None` when empty (so that `new` is const).
    pairs: Option<Arc<[Pair]>>,
}

impl Labels {
    /// The empty label set.
    pub const fn new() -> Self {
        Self { pairs: None }
    }

    fn pairs(&self) -> &[Pair] {
        self.pairs.as_deref().unwrap_or_default()
    }

    fn from_sorted(pairs: Vec<Pair>) -> Self {
        Self {
            pairs: (!pairs.is_empty()).then(|| Arc::from(pairs)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        let pairs = self.pairs();
        pairs
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|index| &*pairs[index].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`, replacing any value it had (a copy of the pairs: label
    /// sets are built once and then read).
    pub fn insert(&mut self, key: impl Into<Box<str>>, value: impl Into<Box<str>>) {
        let mut pairs = self.pairs().to_vec();
        insert_sorted(&mut pairs, key.into(), value.into());
        *self = Self::from_sorted(pairs);
    }

    /// (key, value) pairs in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.pairs().iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.pairs().iter().map(|(k, _)| &**k)
    }

    pub fn len(&self) -> usize {
        self.pairs().len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_none()
    }
}

fn insert_sorted(pairs: &mut Vec<Pair>, key: Box<str>, value: Box<str>) {
    match pairs.binary_search_by(|(k, _)| k.cmp(&key)) {
        Ok(index) => pairs[index].1 = value,
        Err(index) => pairs.insert(index, (key, value)),
    }
}

impl<K: Into<Box<str>>, V: Into<Box<str>>> FromIterator<(K, V)> for Labels {
    /// Later pairs win over earlier ones with the same key, as in a map.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let mut sorted = Vec::new();
        for (key, value) in pairs {
            insert_sorted(&mut sorted, key.into(), value.into());
        }
        Self::from_sorted(sorted)
    }
}

impl<K: Into<Box<str>>, V: Into<Box<str>>, const N: usize> From<[(K, V); N]> for Labels {
    fn from(pairs: [(K, V); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        // Already sorted and unique.
        Self::from_sorted(
            map.into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
                .collect(),
        )
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    fn from(map: &BTreeMap<String, String>) -> Self {
        map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a str, &'a str);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, Pair>, fn(&'a Pair) -> (&'a str, &'a str)>;

    fn into_iter(self) -> Self::IntoIter {
        self.pairs().iter().map(|(k, v)| (&**k, &**v))
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (key, value) in self.iter() {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer).map(Labels::from)
    }
}

#[cfg(test)]
mod tests {
    use super::Labels;

    #[test]
    fn labels_behave_as_a_sorted_map() {
        let mut labels: Labels = [("b", "2"), ("a", "1"), ("b", "3")].into();
        assert_eq!(labels.len(), 2);
        assert_eq!(labels.get("b"), Some("3"), "the later pair wins");
        assert_eq!(labels.get("c"), None);
        labels.insert("c", "4");
        assert_eq!(labels.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(
            serde_json::to_string(&labels).unwrap(),
            r#"{"a":"1","b":"3","c":"4"}"#
        );
        let back: Labels = serde_json::from_str(r#"{"c":"4","a":"1","b":"3"}"#).unwrap();
        assert_eq!(back, labels);
        assert!(Labels::new().is_empty());
    }
}
