//! Policy and inventory objects as the agent holds them: parsed from files (the
//! CLI's `apply -f` or a watched directory), keyed by kind, namespace and name, and
//! persisted atomically so a restart finds them.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::policy::{
    ConvertedDocument, LoadErrors, PolicySet, PolicySetBuilder, PolicyStore, SetChanges, Source,
    documents, policy_files,
};

/// Identity of an object: applying an object with the same key replaces it.
///
/// Shared: the agent indexes every object of the cluster in several places (the
/// watches' view, what is enforced, the converted store), so a copy is a reference
/// count rather than three strings (about 170 bytes per copy per pod).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ObjectKey(Arc<KeyFields>);

/// What an [`ObjectKey`] is made of; ordered by kind, then namespace, then name.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyFields {
    pub kind: String,
    /// Empty for cluster-scoped kinds ([`cluster_scoped`]).
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(
        kind: impl Into<String>,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        Self(Arc::new(KeyFields {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }))
    }
}

impl std::ops::Deref for ObjectKey {
    type Target = KeyFields;

    fn deref(&self) -> &KeyFields {
        &self.0
    }
}

impl std::fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectKey")
            .field("kind", &self.kind)
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish()
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One object and where it came from (for error messages). The value is shared: a
/// changed object gets a new one, so an unchanged one is recognised by its
/// allocation ([`ConversionCache`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredObject {
    /// Shared: the agent keeps every object of the cluster in the watches' view,
    /// in what is enforced and in the converted store; a copy of the name is a
    /// reference count.
    pub file: Arc<str>,
    pub document: usize,
    pub value: Arc<ObjectJson>,
}

impl StoredObject {
    pub fn new(file: impl Into<Arc<str>>, document: usize, value: &serde_json::Value) -> Self {
        Self {
            file: file.into(),
            document,
            value: Arc::new(ObjectJson::new(value)),
        }
    }
}

/// An object's JSON, kept as its compact text. In Kubernetes mode the agent holds
/// every pod of the cluster: as a `serde_json::Value` a slim pod takes about 5.7 KiB
/// of heap (a B-tree node per map), as text about 0.4 KiB. It is parsed where it is
/// read: when it changed (its conversion), for `get` and reviews. The text is
/// serde_json's, keys in order, so equal objects have equal text.
#[derive(Clone, Debug)]
pub struct ObjectJson(Box<serde_json::value::RawValue>);

impl ObjectJson {
    pub fn new(value: &serde_json::Value) -> Self {
        // A Value's maps have string keys: writing it cannot fail.
        Self(serde_json::value::to_raw_value(value).unwrap_or_else(|_| Self::null()))
    }

    fn null() -> Box<serde_json::value::RawValue> {
        serde_json::value::RawValue::from_string("null".to_owned()).unwrap_or_default()
    }

    /// The object as a JSON value.
    pub fn parse(&self) -> serde_json::Value {
        // Written from a Value: it parses.
        serde_json::from_str(self.0.get()).unwrap_or_default()
    }
}

impl PartialEq for ObjectJson {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Serialize for ObjectJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ObjectJson {
    /// Through a value, so that the text is serde_json's compact form whatever the
    /// input's layout.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(deserializer).map(|value| Self::new(&value))
    }
}

pub type ObjectMap = BTreeMap<ObjectKey, StoredObject>;

/// Splits a file's text (see `policy::documents`; `List` kinds expanded) into keyed
/// objects. Errors name the file and document.
pub fn parse_objects(file: &str, text: &str) -> Result<ObjectMap, Vec<String>> {
    let mut objects = ObjectMap::new();
    let mut errors = Vec::new();
    let shared_file: Arc<str> = Arc::from(file);
    let (found, error) = documents(Path::new(file), text);
    for (source, value) in found {
        let number = source.document;
        let items = match value.get("kind").and_then(|k| k.as_str()) {
            Some(kind) if kind == "List" || kind.ends_with("List") => value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default(),
            _ => vec![value],
        };
        for item in items {
            match key_of(&item) {
                Ok(key) => {
                    objects.insert(key, StoredObject::new(shared_file.clone(), number, &item));
                }
                Err(reason) => errors.push(format!("{source}: {reason}")),
            }
        }
    }
    errors.extend(error.map(|e| e.to_string()));
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

/// Kinds without a namespace: their key's namespace is empty, whatever the document
/// says (as the API server keys them).
pub fn cluster_scoped(kind: &str) -> bool {
    matches!(kind, "Namespace" | "ClusterNetworkPolicy" | "Node")
}

fn key_of(value: &serde_json::Value) -> Result<ObjectKey, String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or("kind: missing")?;
    let metadata = value.get("metadata").ok_or("metadata: missing")?;
    let name = metadata
        .get("name")
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .ok_or("metadata.name: missing")?;
    let namespace = if cluster_scoped(kind) {
        String::new()
    } else {
        metadata
            .get("namespace")
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_owned()
    };
    Ok(ObjectKey::new(kind, namespace, name))
}

/// Reads every policy and inventory file under `paths` (see `policy::policy_files`).
pub fn read_paths(paths: &[PathBuf]) -> Result<ObjectMap, Vec<String>> {
    let files = policy_files(paths)
        .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let mut objects = ObjectMap::new();
    let mut errors = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                errors.push(format!("{}: {e}", file.display()));
                continue;
            }
        };
        match parse_objects(&file.display().to_string(), &text) {
            Ok(found) => objects.extend(found),
            Err(mut found) => errors.append(&mut found),
        }
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

/// How objects from the Kubernetes API server name their source (`api-server:Kind/...`).
pub const API_SERVER_SOURCE: &str = "api-server:";

/// Builds and validates a policy set from objects: every error, or the whole set.
/// A policy from the Kubernetes API server that the loader refuses is enforced as
/// its fail-closed substitute, as the agent does ([`from_api_server`]).
pub fn build_policy_set<'a>(
    objects: impl IntoIterator<Item = (&'a ObjectKey, &'a StoredObject)>,
) -> Result<PolicySet, LoadErrors> {
    build_policy_set_cached(objects, &mut ConversionCache::default(), &|_, object| {
        from_api_server(object)
    })
}

/// Whether the object came from the Kubernetes API server.
pub fn from_api_server(object: &StoredObject) -> bool {
    object.file.starts_with(API_SERVER_SOURCE)
}

/// Each object's conversion ([`PolicySetBuilder::convert_document`]) from the last
/// build: an object still holding the same value (the same `Arc`, from the same
/// file and document) is not read and validated again, so a change costs what
/// changed plus the cross-document checks, not every object of the cluster.
#[derive(Default)]
pub struct ConversionCache {
    /// foldhash: the whole cluster's keys are hashed on every build.
    entries: foldhash::HashMap<ObjectKey, CachedConversion>,
}

struct CachedConversion {
    /// Held, so that the allocation cannot be reused for another value.
    value: Arc<ObjectJson>,
    file: Arc<str>,
    document: usize,
    fail_closed: bool,
    converted: ConvertedDocument,
}

/// As [`build_policy_set`], converting only objects that changed since the last
/// build with `cache` (which then holds this build's conversions). A policy that
/// `fail_closed` picks and the loader refuses is enforced as its fail-closed
/// substitute and reported in the set (`PolicySet::refused_policies`) rather than
/// failing it: objects whose author cannot be told at once (the API server's, a
/// watched directory's).
pub fn build_policy_set_cached<'a>(
    objects: impl IntoIterator<Item = (&'a ObjectKey, &'a StoredObject)>,
    cache: &mut ConversionCache,
    fail_closed: &dyn Fn(&ObjectKey, &StoredObject) -> bool,
) -> Result<PolicySet, LoadErrors> {
    let mut previous = std::mem::take(&mut cache.entries);
    let mut builder = PolicySetBuilder::new();
    for (key, object) in objects {
        // The key is moved from the last build's entry (no copy per object).
        let (key, cached) = match previous.remove_entry(key) {
            Some((key, cached)) => (key, Some(cached)),
            None => (key.clone(), None),
        };
        let lenient = fail_closed(&key, object);
        let cached = cached.filter(|cached| {
            Arc::ptr_eq(&cached.value, &object.value)
                && cached.file == object.file
                && cached.document == object.document
                && cached.fail_closed == lenient
        });
        let cached = cached.unwrap_or_else(|| CachedConversion {
            value: object.value.clone(),
            file: object.file.clone(),
            document: object.document,
            fail_closed: lenient,
            converted: PolicySetBuilder::convert_document_with(
                &Source::new(&*object.file, object.document),
                &object.value.parse(),
                from_api_server(object),
                lenient,
            ),
        });
        builder.add_converted(&cached.converted);
        cache.entries.insert(key, cached);
    }
    builder.finish()
}

/// The objects the agent enforces, kept converted in a [`PolicyStore`]: a change
/// converts the objects it names (an object still holding the same value is not
/// read again) and updates the policy set in place.
#[derive(Default)]
pub struct ObjectStore {
    store: PolicyStore<ObjectKey>,
    /// The value each object was converted from, and with what leniency.
    sources: foldhash::HashMap<ObjectKey, (Arc<ObjectJson>, Arc<str>, usize, bool)>,
}

/// One object changed: its new value, or `None` when it went.
pub type ObjectChange = (ObjectKey, Option<StoredObject>);

impl ObjectStore {
    pub fn set(&self) -> &PolicySet {
        self.store.set()
    }

    /// The workload naming `interface` as its own (see [`PolicyStore::interface_owner`]).
    pub fn interface_owner(&self, interface: &str) -> Option<&str> {
        self.store.interface_owner(interface)
    }

    /// The object held under `key`, as it was given.
    pub fn object(&self, key: &ObjectKey) -> Option<StoredObject> {
        self.sources
            .get(key)
            .map(|(value, file, document, _)| StoredObject {
                file: file.clone(),
                document: *document,
                value: value.clone(),
            })
    }

    /// The object held under `key` and whether it was converted leniently.
    pub fn object_and_leniency(&self, key: &ObjectKey) -> Option<(StoredObject, bool)> {
        let lenient = self.sources.get(key)?.3;
        Some((self.object(key)?, lenient))
    }

    /// The changes that would take the objects `changes` names back to what is held
    /// now (to undo `changes` once applied).
    pub fn undo_of(&self, changes: &[ObjectChange]) -> Vec<ObjectChange> {
        changes
            .iter()
            .map(|(key, _)| (key.clone(), self.object(key)))
            .collect()
    }

    /// Applies `changes` whole or not at all (see [`PolicyStore::apply`]); a policy
    /// `fail_closed` picks is enforced as its fail-closed substitute if refused.
    /// Returns what changed in the set.
    pub fn apply(
        &mut self,
        changes: &[ObjectChange],
        fail_closed: &dyn Fn(&ObjectKey, &StoredObject) -> bool,
    ) -> Result<SetChanges, LoadErrors> {
        let mut converted = Vec::with_capacity(changes.len());
        let mut sources = Vec::with_capacity(changes.len());
        for (key, object) in changes {
            let Some(object) = object else {
                converted.push((key.clone(), None));
                sources.push((key.clone(), None));
                continue;
            };
            let lenient = fail_closed(key, object);
            let unchanged = self
                .sources
                .get(key)
                .is_some_and(|(value, file, document, was)| {
                    Arc::ptr_eq(value, &object.value)
                        && *file == object.file
                        && *document == object.document
                        && *was == lenient
                });
            let document = match (unchanged, self.store.document(key)) {
                (true, Some(document)) => document.clone(),
                _ => PolicySetBuilder::convert_document_with(
                    &Source::new(&*object.file, object.document),
                    &object.value.parse(),
                    from_api_server(object),
                    lenient,
                ),
            };
            converted.push((key.clone(), Some(document)));
            sources.push((
                key.clone(),
                Some((
                    object.value.clone(),
                    object.file.clone(),
                    object.document,
                    lenient,
                )),
            ));
        }
        let touched = self.store.apply(converted)?;
        for (key, source) in sources {
            match source {
                Some(source) => self.sources.insert(key, source),
                None => self.sources.remove(&key),
            };
        }
        Ok(touched)
    }
}

/// What the agent persists: the objects applied through the API, and audit switches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PersistedState {
    pub objects: Vec<(ObjectKey, StoredObject)>,
    /// Workloads (`namespace/name`) with audit mode switched on or off.
    pub audit: BTreeMap<String, bool>,
}

impl PersistedState {
    const FILE: &str = "state.json";

    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join(Self::FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not valid agent state", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the state atomically: see [`PersistedState::prepare`].
    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        self.prepare(state_dir)?.commit()
    }

    /// Writes the state beside the saved one (a temporary file, fsync'd), not yet in
    /// its place: [`PreparedState::commit`] renames it over the saved file, dropping
    /// it removes it. A crash leaves the old file or the new one, never half of one;
    /// and a change whose state cannot be written (a full disk) is known before it is
    /// enforced.
    pub fn prepare(&self, state_dir: &Path) -> anyhow::Result<PreparedState> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let path = state_dir.join(Self::FILE);
        let temporary = state_dir.join(format!(".{}.tmp", Self::FILE));
        let prepared = PreparedState {
            temporary,
            path,
            dir: state_dir.to_owned(),
            committed: false,
        };
        let bytes = serde_json::to_vec_pretty(self)?;
        let mut file = std::fs::File::create(&prepared.temporary)
            .with_context(|| format!("writing {}", prepared.temporary.display()))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", prepared.temporary.display()))?;
        Ok(prepared)
    }
}

/// A state file written and synced beside the saved one (see
/// [`PersistedState::prepare`]).
pub struct PreparedState {
    temporary: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    committed: bool,
}

impl PreparedState {
    /// Puts the new state in place of the saved one (rename, then fsync of the
    /// directory).
    pub fn commit(mut self) -> anyhow::Result<()> {
        std::fs::rename(&self.temporary, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))?;
        self.committed = true;
        std::fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("syncing {}", self.dir.display()))?;
        Ok(())
    }
}

impl Drop for PreparedState {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_objects_json_is_compact_text_equal_for_equal_objects_whatever_the_layout() {
        let value = serde_json::json!({
            "kind": "Pod",
            "metadata": {"name": "a", "labels": {"b": "2", "a": "1"}},
        });
        let json = ObjectJson::new(&value);
        assert_eq!(json.parse(), value);
        assert_eq!(json, ObjectJson::new(&value));
        assert_ne!(json, ObjectJson::new(&serde_json::json!({"kind": "Pod"})));
        // Read back from a pretty-printed file (the saved state): the same text.
        let object = StoredObject::new("f", 1, &value);
        let pretty = serde_json::to_string_pretty(&object).unwrap();
        let read: StoredObject = serde_json::from_str(&pretty).unwrap();
        assert_eq!(read, object);
        // As a value (the agent's export) it is the object, not its text.
        let exported = serde_json::to_value(&object).unwrap();
        assert_eq!(exported["value"], value);
        let imported: StoredObject = serde_json::from_value(exported).unwrap();
        assert_eq!(imported, object);
    }

    #[test]
    fn objects_are_keyed_and_lists_expanded() {
        let text = r#"
apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Namespace, metadata: {name: prod}}
  - {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: prod}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p}
spec: {podSelector: {}}
"#;
        let objects = parse_objects("x.yaml", text).unwrap();
        let keys: Vec<String> = objects.keys().map(ToString::to_string).collect();
        assert_eq!(
            keys,
            ["Namespace prod", "NetworkPolicy default/p", "Pod prod/a"]
        );
        assert_eq!(objects.values().map(|o| o.document).max(), Some(2));

        // Cluster-scoped kinds are keyed as the API server keys them (no namespace),
        // so one applied from a file replaces the API server's of the same name.
        let text = "kind: ClusterNetworkPolicy\nmetadata: {name: c}\n---\nkind: Node\nmetadata: {name: n, namespace: x}\n";
        let keys: Vec<String> = parse_objects("y.yaml", text)
            .unwrap()
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(keys, ["ClusterNetworkPolicy c", "Node n"]);
    }

    #[test]
    fn errors_name_the_file_and_document() {
        let errors =
            parse_objects("x.yaml", "kind: Pod\nmetadata: {}\n---\n[unclosed\n").unwrap_err();
        assert_eq!(errors[0], "x.yaml: document 1: metadata.name: missing");
        assert!(
            errors[1].starts_with("x.yaml: document 2: bad YAML"),
            "{errors:?}"
        );
    }

    #[test]
    fn state_is_saved_atomically_and_restored() {
        let dir = std::env::temp_dir().join(format!("microseg-state-test-{}", std::process::id()));
        let objects = parse_objects("x.yaml", "kind: Namespace\nmetadata: {name: a}\n").unwrap();
        let state = PersistedState {
            objects: objects.into_iter().collect(),
            audit: [("a/b".to_owned(), true)].into(),
        };
        state.save(&dir).unwrap();
        assert_eq!(PersistedState::load(&dir).unwrap(), state);
        assert!(!dir.join(".state.json.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            PersistedState::load(&dir).unwrap(),
            PersistedState::default()
        );
    }

    #[test]
    fn a_cached_build_converts_only_changed_objects_and_equals_a_fresh_one() {
        let text = |port: u16, bad: bool| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: prod, labels: {{app: web}}}}\nstatus: {{phase: Running, podIP: 10.1.0.1}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web, namespace: prod}}\nspec: {{podSelector: {{}}, ingress: [{{ports: [{{port: {port}}}]}}]{}}}\n",
                if bad { ", bogus: 1" } else { "" }
            )
        };
        let mut cache = ConversionCache::default();
        let mut objects = parse_objects("a.yaml", &text(80, false)).unwrap();
        let first = build_policy_set_cached(objects.iter(), &mut cache, &|_, _| false).unwrap();
        assert_eq!(cache.entries.len(), 2);
        // Unchanged: the same set, from the cache.
        let again = build_policy_set_cached(objects.iter(), &mut cache, &|_, _| false).unwrap();
        assert_eq!(format!("{again:?}"), format!("{first:?}"));
        // One object replaced: its new content is read, the other is reused.
        let changed = parse_objects("a.yaml", &text(8080, false)).unwrap();
        let pod_value = objects
            .values()
            .find(|o| o.value.parse()["kind"] == "Pod")
            .unwrap()
            .value
            .clone();
        for (key, object) in changed {
            if key.kind == "NetworkPolicy" {
                objects.insert(key, object);
            }
        }
        let updated = build_policy_set_cached(objects.iter(), &mut cache, &|_, _| false).unwrap();
        assert_eq!(
            format!("{updated:?}"),
            format!("{:?}", build_policy_set(objects.iter()).unwrap())
        );
        assert!(format!("{updated:?}").contains("8080"));
        assert!(std::sync::Arc::ptr_eq(
            &cache
                .entries
                .values()
                .find(|c| c.value.parse()["kind"] == "Pod")
                .unwrap()
                .value,
            &pod_value
        ));
        // An invalid object is refused from the cache as from a fresh read.
        let invalid = parse_objects("a.yaml", &text(80, true)).unwrap();
        assert!(build_policy_set_cached(invalid.iter(), &mut cache, &|_, _| false).is_err());
        assert!(build_policy_set_cached(invalid.iter(), &mut cache, &|_, _| false).is_err());
        // Objects gone are forgotten.
        let only_pod: ObjectMap = objects
            .into_iter()
            .filter(|(k, _)| k.kind == "Pod")
            .collect();
        build_policy_set_cached(only_pod.iter(), &mut cache, &|_, _| false).unwrap();
        assert_eq!(cache.entries.len(), 1);
    }
}
