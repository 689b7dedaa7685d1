//! Namespaces, Pods, NetworkPolicies, ClusterNetworkPolicies and Nodes from the API
//! server, kept current by kube-rs watchers, and the cluster view they build.
//!
//! Each kind has its own `watcher` (list, then watch from the list's resource
//! version; a dropped watch resumes from the last version seen, bookmarks included;
//! an expired version, `410 Gone`, makes it list again). Its events go to one channel
//! so the reconciler can take everything that arrived together and enforce it as one
//! generation.
//!
//! ClusterNetworkPolicy is a custom resource (policy.networking.k8s.io/v1alpha2) that
//! a cluster may not have installed. A `404` on its list means the CRD is absent: no
//! cluster policies exist, which the view records (it is synced without them); the
//! watcher is rebuilt every [`CRD_RETRY`] so a CRD installed later is picked up.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt, utils::Backoff, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;

use crate::objects::{API_SERVER_SOURCE, ObjectKey, ObjectMap, StoredObject};
use crate::sorted_set::SortedVecSet;

/// The kinds the agent watches, as the policy loader names them.
pub const KINDS: [&str; 5] = [
    "Namespace",
    "Pod",
    "NetworkPolicy",
    CLUSTER_NETWORK_POLICY,
    "Node",
];

pub const CLUSTER_NETWORK_POLICY: &str = "ClusterNetworkPolicy";

/// ClusterNetworkPolicy's resource (kubernetes-sigs/network-policy-api, v1alpha2):
/// cluster-scoped, `/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies`.
pub const CNP_GROUP: &str = "policy.networking.k8s.io";
pub const CNP_VERSION: &str = "v1alpha2";
pub const CNP_PLURAL: &str = "clusternetworkpolicies";

/// How often the list of a kind whose CRD is absent is tried again.
pub const CRD_RETRY: Duration = Duration::from_secs(10);

/// One watcher event, reduced to what the cluster view needs.
pub enum Change {
    /// A re-list starts: objects of `kind` arrive again, then `Listed`.
    Relisting(&'static str),
    /// An object seen during a re-list. Objects travel as their compact text: a
    /// list of the whole cluster arrives faster than the view takes it in, and as
    /// `serde_json::Value`s the waiting pods took about 5 KiB each (the agent's
    /// peak memory, and the fragmented heap it leaves behind).
    Listed(ObjectKey, StoredObject),
    /// The re-list of `kind` is complete: objects not seen in it are gone.
    ListDone(&'static str),
    /// An object added or modified.
    Applied(ObjectKey, StoredObject),
    Deleted(ObjectKey),
    /// The watch failed (disconnected, unreachable, expired version); it is retried.
    Failed(&'static str, String),
    /// The API server does not serve the kind (`404`: its CRD is not installed): none
    /// of its objects exist. Tried again after [`CRD_RETRY`].
    Absent(&'static str),
    /// The resource version of the object in the change sent just before (an
    /// object's version is read before slimming drops it). The reconciler reports
    /// the newest one it has enforced, so that one can tell when a change made in
    /// the API server is enforced on this node.
    ResourceVersion(u64),
}

impl Change {
    /// `Listed`, from the object as the watcher reads it.
    pub fn listed(key: ObjectKey, value: serde_json::Value) -> Self {
        let object = stored(&key, value);
        Self::Listed(key, object)
    }

    /// `Applied`, from the object as the watcher reads it.
    pub fn applied(key: ObjectKey, value: serde_json::Value) -> Self {
        let object = stored(&key, value);
        Self::Applied(key, object)
    }
}

/// Starts one watcher task per kind, all sending to `changes`.
pub fn start(client: &Client, changes: mpsc::UnboundedSender<Change>) {
    let sender = || changes.clone();
    spawn_watcher(
        Api::<Namespace>::all(client.clone()),
        KINDS[0],
        "v1",
        false,
        sender(),
    );
    spawn_watcher(
        Api::<Pod>::all(client.clone()),
        KINDS[1],
        "v1",
        false,
        sender(),
    );
    spawn_watcher(
        Api::<NetworkPolicy>::all(client.clone()),
        KINDS[2],
        "networking.k8s.io/v1",
        false,
        sender(),
    );
    spawn_watcher(
        Api::<DynamicObject>::all_with(client.clone(), &cluster_network_policy_resource()),
        CLUSTER_NETWORK_POLICY,
        crate::policy::CLUSTER_NETWORK_POLICY_API_VERSION,
        true,
        sender(),
    );
    spawn_watcher(
        Api::<Node>::all(client.clone()),
        KINDS[4],
        "v1",
        false,
        sender(),
    );
}

pub fn cluster_network_policy_resource() -> ApiResource {
    ApiResource {
        group: CNP_GROUP.to_owned(),
        version: CNP_VERSION.to_owned(),
        api_version: format!("{CNP_GROUP}/{CNP_VERSION}"),
        kind: CLUSTER_NETWORK_POLICY.to_owned(),
        plural: CNP_PLURAL.to_owned(),
    }
}

/// Watches `kind` (`apiVersion` `api_version`). For an `optional` kind (a CRD), a
/// `404` is [`Change::Absent`] and the watcher is rebuilt after [`CRD_RETRY`].
fn spawn_watcher<K>(
    api: Api<K>,
    kind: &'static str,
    api_version: &'static str,
    optional: bool,
    changes: mpsc::UnboundedSender<Change>,
) where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    K: Send + Sync + 'static,
{
    tokio::spawn(async move {
        loop {
            // `Any` lets the API server answer the list from its watch cache (what
            // client-go's informers do); bookmarks are on by default.
            let config = watcher::Config::default().any_semantic();
            let mut stream = watcher(api.clone(), config)
                .backoff(QuickBackoff::new())
                .boxed();
            let mut absent = false;
            while let Some(event) = stream.next().await {
                let version = match &event {
                    Ok(
                        watcher::Event::InitApply(object)
                        | watcher::Event::Apply(object)
                        | watcher::Event::Delete(object),
                    ) => object
                        .resource_version()
                        .and_then(|version| version.parse::<u64>().ok()),
                    _ => None,
                };
                let change = match event {
                    Ok(watcher::Event::Init) => Change::Relisting(kind),
                    Ok(watcher::Event::InitApply(object)) => {
                        let (key, value) = keyed(kind, api_version, &object);
                        Change::listed(key, value)
                    }
                    Ok(watcher::Event::InitDone) => Change::ListDone(kind),
                    Ok(watcher::Event::Apply(object)) => {
                        let (key, value) = keyed(kind, api_version, &object);
                        Change::applied(key, value)
                    }
                    Ok(watcher::Event::Delete(object)) => Change::Deleted(key_of(kind, &object)),
                    Err(error) if optional && not_found(&error) => {
                        absent = true;
                        Change::Absent(kind)
                    }
                    Err(error) => Change::Failed(kind, error.to_string()),
                };
                if changes.send(change).is_err() {
                    return;
                }
                if let Some(version) = version
                    && changes.send(Change::ResourceVersion(version)).is_err()
                {
                    return;
                }
                if absent {
                    break;
                }
            }
            if !absent {
                return;
            }
            drop(stream);
            tokio::time::sleep(CRD_RETRY).await;
        }
    });
}

/// Whether the API server answered `404 Not Found`: it does not serve the resource
/// (a real API server answers a path of an uninstalled CRD with a plain-text 404,
/// which kube turns into a `Status` with that code).
fn not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 404,
        watcher::Error::WatchError(status) => status.code == 404,
        _ => false,
    }
}

fn key_of<K: Resource>(kind: &str, object: &K) -> ObjectKey {
    ObjectKey::new(
        kind.to_owned(),
        object.namespace().unwrap_or_default(),
        object.name_any(),
    )
}

/// The object as the policy loader reads it: with `apiVersion` and `kind` (list
/// items come without them) and without `managedFields` (large, never read). Pods
/// and Nodes keep only what the agent reads ([`slim_pod`], [`slim_node`]).
fn keyed<K: Resource + Serialize>(
    kind: &str,
    api_version: &str,
    object: &K,
) -> (ObjectKey, serde_json::Value) {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), api_version.into());
        map.insert("kind".into(), kind.into());
        if let Some(metadata) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            metadata.remove("managedFields");
        }
    }
    match kind {
        "Pod" => slim_pod(&mut value),
        "Node" => slim_node(&mut value),
        _ => {}
    }
    (key_of(kind, object), value)
}

/// Of a Pod, only what the agent reads: its name, namespace, labels and creation
/// time (the newer of two pods claiming one address keeps it), the named ports of
/// its containers, `hostNetwork`, `nodeName`, its phase and addresses. A
/// pod as the API server sends it is mostly container specs and status conditions
/// (kilobytes each); the agent holds every pod of the cluster, so it keeps these
/// few fields only. A status-only update then compares equal to the stored pod.
pub fn slim_pod(value: &mut serde_json::Value) {
    use serde_json::Value;
    let mut slim = keep(value, &["apiVersion", "kind"]);
    slim["metadata"] = keep(
        &value["metadata"],
        &["name", "namespace", "labels", "creationTimestamp"],
    );
    if value.get("spec").is_some() {
        let mut spec = keep(&value["spec"], &["hostNetwork", "nodeName"]);
        let containers: Vec<Value> = value["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|container| keep(container, &["name", "ports"]))
            .collect();
        spec["containers"] = Value::Array(containers);
        slim["spec"] = spec;
    }
    if value.get("status").is_some() {
        slim["status"] = keep(&value["status"], &["phase", "podIP", "podIPs"]);
    }
    *value = slim;
}

/// The object with only `fields` of `from`.
fn keep(from: &serde_json::Value, fields: &[&str]) -> serde_json::Value {
    let mut kept = serde_json::Map::new();
    for field in fields {
        if let Some(value) = from.get(field) {
            kept.insert((*field).to_owned(), value.clone());
        }
    }
    serde_json::Value::Object(kept)
}

/// Of a Node, only what the agent reads: its name, labels (ClusterNetworkPolicy
/// `nodes` peers select them) and its `InternalIP` and `ExternalIP` addresses. A
/// node's status changes often (conditions, heartbeats, images) and is large; none
/// of that, nor `resourceVersion` (the watcher tracks it), is kept, so such an
/// update compares equal to the stored node and recompiles nothing.
pub fn slim_node(value: &mut serde_json::Value) {
    use serde_json::Value;
    let mut slim = keep(value, &["apiVersion", "kind"]);
    slim["metadata"] = keep(&value["metadata"], &["name", "labels"]);
    if value.get("status").is_some() {
        let addresses: Vec<Value> = value["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|address| matches!(address["type"].as_str(), Some("InternalIP" | "ExternalIP")))
            .map(|address| keep(address, &["type", "address"]))
            .collect();
        slim["status"] = serde_json::json!({ "addresses": addresses });
    }
    *value = slim;
}

/// Retries a failed watch after 200 ms, doubling up to 5 s: the agent should catch up
/// soon after the API server returns, yet not hammer one that is down. (kube's
/// default starts at 800 ms and grows to 30 s, tuned for controllers.)
struct QuickBackoff {
    next: Duration,
}

impl QuickBackoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for QuickBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(delay)
    }
}

impl Backoff for QuickBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// The cluster as the watchers report it, and which of its objects changed since
/// they were last enforced: each watch event touches its own object (and, for a pod
/// taking or giving up a contested address, the pods contesting it), so that an
/// update costs what changed, however large the cluster.
#[derive(Default)]
pub struct ClusterView {
    objects: ObjectMap,
    /// Kinds whose list completed at least once: enforcing before all three have
    /// would enforce half a cluster (policies without the pods they allow, say).
    listed: BTreeSet<&'static str>,
    /// Objects seen so far in a re-list in progress, per kind.
    relisting: HashMap<&'static str, ObjectMap>,
    /// Kinds the API server does not serve (their CRD is not installed).
    absent: BTreeSet<&'static str>,
    /// Since when the watches fail, if they do.
    pub failing_since: Option<Instant>,
    pub last_failure: Option<String>,
    /// The newest resource version seen on an object (0: none yet).
    pub newest_version: u64,
    /// What each pod in `objects` says about its addresses and node, read once
    /// when the pod changes.
    pods: BTreeMap<ObjectKey, PodFacts>,
    /// Pods by node.
    node_pods: BTreeMap<Arc<str>, BTreeSet<ObjectKey>>,
    /// Address -> the pods claiming it, the one keeping it first (the newest; of
    /// pods created at the same time, the first by key).
    claims: foldhash::HashMap<IpAddr, Claims>,
    /// Pods that lose an address to a newer pod: their addresses are not enforced.
    losers: BTreeSet<ObjectKey>,
    /// Objects whose enforceable form may have changed since `take_changes`.
    dirty: BTreeSet<ObjectKey>,
}

/// One pod's claim on an address: newest first (its creation time reversed), then
/// by key.
type Claim = (std::cmp::Reverse<Created>, ObjectKey);

/// A pod's creation time, in seconds since the epoch (`creationTimestamp` has
/// seconds): an integer, where the text took an allocation per pod and per claim.
/// A pod without one (or with one that does not parse) counts as the oldest.
type Created = i64;

/// The claims on one address, in order: almost always one.
type Claims = SortedVecSet<Claim>;

/// What [`ClusterView::enforceable`] and the local pod lookup read of a pod.
struct PodFacts {
    created: Created,
    addresses: Vec<IpAddr>,
    /// Shared with the node's entry in `node_pods` (one name per node, not per pod).
    node: Option<Arc<str>>,
}

impl PodFacts {
    fn of(pod: &serde_json::Value) -> Self {
        Self {
            created: pod["metadata"]["creationTimestamp"]
                .as_str()
                .and_then(|time| chrono::DateTime::parse_from_rfc3339(time).ok())
                .map_or(Created::MIN, |time| time.timestamp()),
            addresses: pod_addresses(pod),
            node: pod["spec"]["nodeName"].as_str().map(Arc::from),
        }
    }
}

impl ClusterView {
    /// Starts from the cached objects of an earlier run (enforced until the lists
    /// arrive): they are what is enforced, so none is dirty.
    pub fn new(cached: ObjectMap) -> Self {
        let mut view = Self::default();
        for (key, object) in cached {
            view.set_object(key, Some(object));
        }
        view.dirty.clear();
        view
    }

    /// Puts `object` under `key` (`None`: removes it), keeping the pod indexes and
    /// marking what changed.
    fn set_object(&mut self, key: ObjectKey, object: Option<StoredObject>) {
        if key.kind == "Pod" {
            self.forget_pod(&key);
            if let Some(object) = &object {
                let facts = PodFacts::of(&object.value.parse());
                self.remember_pod(&key, facts);
            }
        }
        match object {
            Some(object) => self.objects.insert(key.clone(), object),
            None => self.objects.remove(&key),
        };
        self.dirty.insert(key);
    }

    fn forget_pod(&mut self, key: &ObjectKey) {
        let Some(facts) = self.pods.remove(key) else {
            return;
        };
        if let Some(node) = &facts.node
            && let Some(pods) = self.node_pods.get_mut(node)
        {
            pods.remove(key);
            if pods.is_empty() {
                self.node_pods.remove(node);
            }
        }
        let claim = (std::cmp::Reverse(facts.created), key.clone());
        for address in &facts.addresses {
            if let Some(claims) = self.claims.get_mut(address) {
                claims.remove(&claim);
                if claims.is_empty() {
                    self.claims.remove(address);
                }
            }
            self.settle_address(*address);
        }
        self.losers.remove(key);
    }

    fn remember_pod(&mut self, key: &ObjectKey, mut facts: PodFacts) {
        if let Some(node) = &mut facts.node {
            if let Some((shared, _)) = self.node_pods.get_key_value(node) {
                *node = shared.clone();
            }
            self.node_pods
                .entry(node.clone())
                .or_default()
                .insert(key.clone());
        }
        let claim = (std::cmp::Reverse(facts.created), key.clone());
        let addresses = facts.addresses.clone();
        self.pods.insert(key.clone(), facts);
        for address in addresses {
            self.claims
                .entry(address)
                .or_default()
                .insert(claim.clone());
            self.settle_address(address);
        }
    }

    /// Works out again which pods lose a contested `address` (all its claimants but
    /// the first); a pod whose standing changed is dirty.
    fn settle_address(&mut self, address: IpAddr) {
        let claimants: Vec<ObjectKey> = self
            .claims
            .get(&address)
            .map(|claims| claims.iter().map(|(_, key)| key.clone()).collect())
            .unwrap_or_default();
        for key in claimants {
            let loses = self.pod_loses(&key);
            let lost = self.losers.contains(&key);
            if loses != lost {
                if loses {
                    tracing::warn!(
                        "{key}: its address is also a newer pod's; not enforced for now"
                    );
                    self.losers.insert(key.clone());
                } else {
                    self.losers.remove(&key);
                }
                self.dirty.insert(key);
            }
        }
    }

    /// Whether pod `key` is not the first claimant of one of its addresses.
    fn pod_loses(&self, key: &ObjectKey) -> bool {
        let Some(facts) = self.pods.get(key) else {
            return false;
        };
        facts.addresses.iter().any(|address| {
            self.claims
                .get(address)
                .and_then(|claims| claims.iter().next())
                .is_some_and(|(_, first)| first != key)
        })
    }

    /// Applies one change; returns whether the enforced objects may differ.
    pub fn apply(&mut self, change: Change) -> bool {
        // `Relisting` comes before the list request: no sign the server answers.
        if !matches!(
            change,
            Change::Failed(..) | Change::Relisting(_) | Change::ResourceVersion(_)
        ) {
            self.failing_since = None;
        }
        match change {
            Change::Relisting(kind) => {
                self.relisting.insert(kind, ObjectMap::new());
                false
            }
            Change::Listed(key, object) => {
                if let Some(buffer) = self.relisting.get_mut(key.kind.as_str()) {
                    // An unchanged object keeps its stored value (and so its
                    // conversion).
                    let object = match self.objects.get(&key) {
                        Some(known) if known.value == object.value => known.clone(),
                        _ => object,
                    };
                    buffer.insert(key, object);
                }
                false
            }
            Change::ListDone(kind) => {
                let fresh = self.relisting.remove(kind).unwrap_or_default();
                let gone: Vec<ObjectKey> = self
                    .objects
                    .keys()
                    .filter(|key| key.kind == kind && !fresh.contains_key(*key))
                    .cloned()
                    .collect();
                for key in gone {
                    self.set_object(key, None);
                }
                for (key, object) in fresh {
                    if self.objects.get(&key) != Some(&object) {
                        self.set_object(key, Some(object));
                    }
                }
                self.listed.insert(kind);
                self.absent.remove(kind);
                // Always counts: the sync may be waiting on this list.
                true
            }
            Change::Applied(key, object) => {
                // A pod's status updates (conditions, container states) arrive as
                // modifications; slimmed, most leave the stored pod as it was.
                if self
                    .objects
                    .get(&key)
                    .is_some_and(|known| known.value == object.value)
                {
                    return false;
                }
                self.set_object(key, Some(object));
                true
            }
            Change::Deleted(key) => {
                if !self.objects.contains_key(&key) {
                    return false;
                }
                self.set_object(key, None);
                true
            }
            Change::Failed(kind, error) => {
                self.failing_since.get_or_insert_with(Instant::now);
                self.last_failure = Some(format!("{kind}: {error}"));
                false
            }
            Change::Absent(kind) => {
                // Deleting a CRD deletes its objects: none are left to enforce, and
                // the kind counts as listed (empty) for the sync.
                self.relisting.remove(kind);
                self.absent.insert(kind);
                self.listed.insert(kind);
                let gone: Vec<ObjectKey> = self
                    .objects
                    .keys()
                    .filter(|key| key.kind == kind)
                    .cloned()
                    .collect();
                let changed = !gone.is_empty();
                for key in gone {
                    self.set_object(key, None);
                }
                changed
            }
            Change::ResourceVersion(version) => {
                self.newest_version = self.newest_version.max(version);
                false
            }
        }
    }

    /// Kinds whose CRD the API server does not serve, as last seen.
    pub fn absent(&self) -> &BTreeSet<&'static str> {
        &self.absent
    }

    /// The pods on `node` (`spec.nodeName`).
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a ObjectKey> + 'a {
        self.node_pods.get(node).into_iter().flatten()
    }

    /// The addresses of the pods on `node` that keep them, with their
    /// `namespace/name`.
    pub fn local_pod_addresses(&self, node: &str) -> BTreeMap<IpAddr, String> {
        let mut addresses = BTreeMap::new();
        for key in self.pods_on(node) {
            if self.losers.contains(key) {
                continue;
            }
            let Some(facts) = self.pods.get(key) else {
                continue;
            };
            for address in &facts.addresses {
                addresses.insert(*address, format!("{}/{}", key.namespace, key.name));
            }
        }
        addresses
    }

    /// Whether a re-list is in progress (its objects are not in the view yet).
    pub fn relisting(&self) -> bool {
        !self.relisting.is_empty()
    }

    /// Whether every kind has been listed since the agent started.
    pub fn synced(&self) -> bool {
        KINDS.iter().all(|kind| self.listed.contains(kind))
    }

    pub fn objects(&self) -> &ObjectMap {
        &self.objects
    }

    /// Objects of `kind` in the view.
    pub fn count(&self, kind: &str) -> usize {
        match kind {
            "Pod" => self.pods.len(),
            _ => self.objects.keys().filter(|key| key.kind == kind).count(),
        }
    }

    /// The object to enforce under `key`. Pod addresses are made unique first: the
    /// API server may briefly show a deleted pod's address on a new pod too, and the
    /// loader refuses a set with one address on two workloads; the newer pod keeps
    /// it.
    pub fn enforceable_object(&self, key: &ObjectKey) -> Option<StoredObject> {
        let object = self.objects.get(key)?;
        if !self.losers.contains(key) {
            return Some(object.clone());
        }
        let mut pod = object.value.parse();
        if let Some(status) = pod.get_mut("status").and_then(|s| s.as_object_mut()) {
            status.remove("podIP");
            status.remove("podIPs");
        }
        Some(stored(key, pod))
    }

    /// Every object to enforce (see [`ClusterView::enforceable_object`]).
    pub fn enforceable(&self) -> ObjectMap {
        self.objects
            .keys()
            .filter_map(|key| Some((key.clone(), self.enforceable_object(key)?)))
            .collect()
    }

    /// The objects whose enforceable form may have changed since the last call,
    /// with that form (`None`: gone).
    pub fn take_changes(&mut self) -> Vec<crate::objects::ObjectChange> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|key| {
                let object = self.enforceable_object(&key);
                (key, object)
            })
            .collect()
    }

    /// Marks `keys` changed again (their enforcement failed; it is tried again).
    pub fn mark_changed(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        self.dirty.extend(keys);
    }
}

fn stored(key: &ObjectKey, value: serde_json::Value) -> StoredObject {
    StoredObject::new(source_name(key), 1, &value)
}

/// How errors name an object from the API server: `api-server:Pod/ns/name`.
pub fn source_name(key: &ObjectKey) -> String {
    if key.namespace.is_empty() {
        format!("{API_SERVER_SOURCE}{}/{}", key.kind, key.name)
    } else {
        format!(
            "{API_SERVER_SOURCE}{}/{}/{}",
            key.kind, key.namespace, key.name
        )
    }
}

/// A pod's addresses (`status.podIPs`, else `status.podIP`), unless it cannot own
/// them: host network, or finished.
pub fn pod_addresses(pod: &serde_json::Value) -> Vec<IpAddr> {
    if pod["spec"]["hostNetwork"].as_bool() == Some(true)
        || matches!(
            pod["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        )
    {
        return Vec::new();
    }
    let status = &pod["status"];
    let mut addresses: Vec<IpAddr> = status["podIPs"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["ip"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if addresses.is_empty()
        && let Some(ip) = status["podIP"].as_str().and_then(|ip| ip.parse().ok())
    {
        addresses.push(ip);
    }
    addresses
}

#[cfg(test)]
mod tests {
    use super::{CLUSTER_NETWORK_POLICY, Change, ClusterView, KINDS, slim_node, slim_pod};
    use crate::objects::ObjectKey;
    use crate::policy::{PolicySetBuilder, Source};

    fn pod_key(name: &str) -> ObjectKey {
        ObjectKey::new("Pod".to_owned(), "prod".to_owned(), name.to_owned())
    }

    fn pod_at(name: &str, created: &str, ip: &str, phase: &str) -> serde_json::Value {
        let mut pod = full_pod();
        pod["metadata"]["name"] = name.into();
        pod["metadata"]["creationTimestamp"] = created.into();
        pod["status"]["podIP"] = ip.into();
        pod["status"]["podIPs"] = serde_json::json!([{ "ip": ip }]);
        pod["status"]["phase"] = phase.into();
        slim_pod(&mut pod);
        pod
    }

    #[test]
    fn the_newer_pod_keeps_a_contested_address_and_status_noise_changes_nothing() {
        let mut view = ClusterView::default();
        let older = pod_at("old", "2026-11-01T00:00:00Z", "10.1.0.9", "Running");
        let newer = pod_at("new", "2026-11-02T00:00:00Z", "10.1.0.9", "Running");
        assert!(view.apply(Change::applied(pod_key("new"), newer)));
        assert!(view.apply(Change::applied(pod_key("old"), older)));
        let enforceable = view.enforceable();
        let ip = |name: &str| enforceable[&pod_key(name)].value.parse()["status"]["podIP"].clone();
        assert_eq!(ip("new"), "10.1.0.9");
        assert!(ip("old").is_null(), "the older pod gives the address up");

        // A status update that slimming reduces to the same pod is no change.
        let mut noisy = full_pod();
        noisy["metadata"]["name"] = "new".into();
        noisy["metadata"]["creationTimestamp"] = "2026-11-02T00:00:00Z".into();
        noisy["status"]["podIP"] = "10.1.0.9".into();
        noisy["status"]["podIPs"] = serde_json::json!([{ "ip": "10.1.0.9" }]);
        noisy["status"]["conditions"] = serde_json::json!([{ "type": "Ready", "status": "False" }]);
        slim_pod(&mut noisy);
        assert!(!view.apply(Change::applied(pod_key("new"), noisy)));
        let moved = pod_at("new", "2026-11-02T00:00:00Z", "10.1.0.10", "Running");
        assert!(view.apply(Change::applied(pod_key("new"), moved)));
    }

    /// The view hands out each change once, with what it touched: a pod that loses
    /// (or gets back) a contested address is changed too, others are not.
    #[test]
    fn changes_name_what_they_touched_and_contested_addresses_follow() {
        let mut view = ClusterView::default();
        let older = pod_at("old", "2026-11-01T00:00:00Z", "10.1.0.9", "Running");
        let other = pod_at("other", "2026-11-01T00:00:00Z", "10.1.0.7", "Running");
        view.apply(Change::applied(pod_key("old"), older));
        view.apply(Change::applied(pod_key("other"), other));
        let keys = |changes: Vec<crate::objects::ObjectChange>| -> Vec<String> {
            changes.into_iter().map(|(k, _)| k.name.clone()).collect()
        };
        assert_eq!(keys(view.take_changes()), ["old", "other"]);
        assert!(view.take_changes().is_empty());
        // A newer pod takes the address: the older one changes too (unaddressed).
        let newer = pod_at("new", "2026-11-02T00:00:00Z", "10.1.0.9", "Running");
        view.apply(Change::applied(pod_key("new"), newer));
        let changes = view.take_changes();
        assert_eq!(keys(changes.clone()), ["new", "old"]);
        let old = changes.iter().find(|(k, _)| k.name == "old").unwrap();
        assert!(old.1.as_ref().unwrap().value.parse()["status"]["podIP"].is_null());
        assert_eq!(view.local_pod_addresses("node-a").len(), 2, "new and other");
        // The newer pod goes: the older one gets its address back.
        view.apply(Change::Deleted(pod_key("new")));
        let changes = view.take_changes();
        assert_eq!(keys(changes.clone()), ["new", "old"]);
        let old = changes.iter().find(|(k, _)| k.name == "old").unwrap();
        assert_eq!(
            old.1.as_ref().unwrap().value.parse()["status"]["podIP"],
            "10.1.0.9"
        );
        assert!(changes.iter().any(|(k, v)| k.name == "new" && v.is_none()));
    }

    /// A pod as the API server sends it (abridged, but with the fields that make
    /// real pods large).
    fn full_pod() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-7d4b9c", "namespace": "prod", "uid": "0b1c",
                "creationTimestamp": "2026-11-01T00:00:00Z",
                "resourceVersion": "123", "labels": {"app": "web", "pod-template-hash": "7d4b9c"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-01T00:00:00Z"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c", "uid": "9f"}]
            },
            "spec": {
                "nodeName": "node-a",
                "containers": [{
                    "name": "web", "image": "nginx:1.27",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "env": [{"name": "A", "value": "1"}],
                    "resources": {"limits": {"cpu": "1"}},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]
                }],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}]
            },
            "status": {
                "phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}],
                "hostIP": "192.168.1.10",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0, "image": "nginx:1.27", "imageID": "x", "state": {"running": {}}, "lastState": {}}]
            }
        })
    }

    fn workloads(pod: &serde_json::Value) -> String {
        let mut builder = PolicySetBuilder::new();
        builder.add_api_server_document(&Source::memory("api"), pod);
        let set = builder.finish().expect("a valid pod");
        format!("{:?}", set.workloads)
    }

    #[test]
    fn a_slim_pod_is_read_as_the_full_one_and_is_much_smaller() {
        let full = full_pod();
        let mut slim = full.clone();
        slim_pod(&mut slim);
        assert_eq!(workloads(&slim), workloads(&full));
        assert_eq!(slim["spec"]["nodeName"], "node-a");
        // `enforceable` gives a contested address to the newer pod.
        assert_eq!(
            slim["metadata"]["creationTimestamp"],
            "2026-11-01T00:00:00Z"
        );
        let size = |value: &serde_json::Value| serde_json::to_vec(value).unwrap().len();
        assert!(
            size(&slim) * 2 < size(&full),
            "{} bytes of {}",
            size(&slim),
            size(&full)
        );
        // Slimming twice changes nothing: what the reconciler compares is stable.
        let mut again = slim.clone();
        slim_pod(&mut again);
        assert_eq!(again, slim);
    }

    /// A Node as the API server sends it (abridged).
    fn full_node() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": "node-a", "uid": "7a", "resourceVersion": "900",
                "creationTimestamp": "2026-11-01T00:00:00Z",
                "labels": {"kubernetes.io/hostname": "node-a", "zone": "a"},
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"}
            },
            "spec": {"podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24"]},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "192.168.1.10"},
                    {"type": "InternalIP", "address": "fd00:1::10"},
                    {"type": "ExternalIP", "address": "203.0.113.10"},
                    {"type": "Hostname", "address": "node-a"}
                ],
                "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-30T00:00:00Z"}],
                "nodeInfo": {"kubeletVersion": "v1.34.0", "machineID": "m"},
                "images": [{"names": ["nginx:1.27"], "sizeBytes": 70000000}],
                "capacity": {"cpu": "4"}
            }
        })
    }

    fn nodes(node: &serde_json::Value) -> String {
        let mut builder = PolicySetBuilder::new();
        builder.add_api_server_document(&Source::memory("api"), node);
        let set = builder.finish().expect("a valid node");
        set.nodes
            .iter()
            .map(|n| format!("{} {:?} {:?}", n.name, n.labels, n.addresses))
            .collect()
    }

    #[test]
    fn a_slim_node_is_read_as_the_full_one_and_heartbeats_change_nothing() {
        let full = full_node();
        let mut slim = full.clone();
        slim_node(&mut slim);
        assert_eq!(nodes(&slim), nodes(&full));
        assert!(nodes(&slim).contains("203.0.113.10"), "{}", nodes(&slim));
        assert!(slim["metadata"].get("resourceVersion").is_none());
        assert_eq!(slim["status"]["addresses"].as_array().unwrap().len(), 3);
        let mut again = slim.clone();
        slim_node(&mut again);
        assert_eq!(again, slim);

        let key = ObjectKey::new("Node".to_owned(), String::new(), "node-a".to_owned());
        let mut view = ClusterView::default();
        assert!(view.apply(Change::applied(key.clone(), slim.clone())));
        // A heartbeat: new resource version and condition times, same node.
        let mut beat = full.clone();
        beat["metadata"]["resourceVersion"] = "901".into();
        beat["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-11-30T00:01:00Z".into();
        slim_node(&mut beat);
        assert!(!view.apply(Change::applied(key.clone(), beat)));
        // A label change is one.
        let mut relabelled = full;
        relabelled["metadata"]["labels"]["zone"] = "b".into();
        slim_node(&mut relabelled);
        assert!(view.apply(Change::applied(key, relabelled)));
    }

    #[test]
    fn an_absent_crd_counts_as_listed_and_empty_until_it_is_listed_again() {
        let cnp_key = ObjectKey::new(
            CLUSTER_NETWORK_POLICY.to_owned(),
            String::new(),
            "deny-all".to_owned(),
        );
        let cnp = serde_json::json!({"apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": CLUSTER_NETWORK_POLICY, "metadata": {"name": "deny-all"}});
        // A cluster policy from the cache of an earlier run.
        let mut cached = crate::objects::ObjectMap::new();
        cached.insert(cnp_key.clone(), super::stored(&cnp_key, cnp.clone()));
        let mut view = ClusterView::new(cached);
        for kind in KINDS.iter().filter(|k| **k != CLUSTER_NETWORK_POLICY) {
            view.apply(Change::Relisting(kind));
            view.apply(Change::ListDone(kind));
        }
        assert!(!view.synced(), "the cluster policies are not listed yet");
        view.apply(Change::Failed(
            CLUSTER_NETWORK_POLICY,
            "connection refused".into(),
        ));
        assert!(view.failing_since.is_some());
        view.apply(Change::Relisting(CLUSTER_NETWORK_POLICY));
        // The CRD was deleted meanwhile: so were its objects.
        assert!(view.apply(Change::Absent(CLUSTER_NETWORK_POLICY)));
        assert!(view.synced());
        assert!(view.failing_since.is_none(), "the API server answered");
        assert!(view.absent().contains(CLUSTER_NETWORK_POLICY));
        assert!(view.objects().is_empty());
        // Retried while still absent: nothing changes.
        view.apply(Change::Relisting(CLUSTER_NETWORK_POLICY));
        assert!(!view.apply(Change::Absent(CLUSTER_NETWORK_POLICY)));
        // Installed: listed again.
        view.apply(Change::Relisting(CLUSTER_NETWORK_POLICY));
        view.apply(Change::listed(cnp_key.clone(), cnp));
        assert!(view.apply(Change::ListDone(CLUSTER_NETWORK_POLICY)));
        assert!(view.absent().is_empty());
        assert!(view.objects().contains_key(&cnp_key));
    }

    /// The versions the reconciler reports as enforced: the newest seen, and none
    /// while a re-list is in progress (its objects are not in the view yet). A
    /// pod's facts follow it: moved to another node, it is no longer this node's.
    #[test]
    fn the_newest_version_and_the_pods_on_a_node_follow_the_changes() {
        let mut view = ClusterView::default();
        let pod = pod_at("web", "2026-11-01T00:00:00Z", "10.1.0.9", "Running");
        assert!(view.apply(Change::applied(pod_key("web"), pod.clone())));
        assert!(!view.apply(Change::ResourceVersion(42)));
        assert!(!view.apply(Change::ResourceVersion(7)));
        assert_eq!(view.newest_version, 42);
        let node = pod["spec"]["nodeName"].as_str().unwrap().to_owned();
        assert_eq!(view.pods_on(&node).count(), 1);
        let mut moved = pod.clone();
        moved["spec"]["nodeName"] = "elsewhere".into();
        assert!(view.apply(Change::applied(pod_key("web"), moved)));
        assert_eq!(view.pods_on(&node).count(), 0);
        assert_eq!(view.pods_on("elsewhere").count(), 1);

        assert!(!view.apply(Change::Relisting("Pod")));
        assert!(view.relisting());
        assert!(!view.apply(Change::listed(pod_key("web"), pod)));
        assert_eq!(
            view.pods_on("elsewhere").count(),
            1,
            "not until the list is done"
        );
        assert!(view.apply(Change::ListDone("Pod")));
        assert!(!view.relisting());
        assert_eq!(view.pods_on(&node).count(), 1);
        assert!(view.apply(Change::Deleted(pod_key("web"))));
        assert_eq!(view.pods_on(&node).count(), 0);
    }
}
