//! Namespaces, Pods and NetworkPolicies from the API server, kept current by kube-rs
//! watchers, and the cluster view they build.
//!
//! Each kind has its own `watcher` (list, then watch from the list's resource
//! version; a dropped watch resumes from the last version seen, bookmarks included;
//! an expired version, `410 Gone`, makes it list again). Its events go to one channel
//! so the reconciler can take everything that arrived together and enforce it as one
//! generation.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, utils::Backoff, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;

use crate::agent::objects::{API_SERVER_SOURCE, ObjectKey, ObjectMap, StoredObject};

/// The kinds the agent watches, as the policy loader names them.
pub const KINDS: [&str; 3] = ["Namespace", "Pod", "NetworkPolicy"];

/// One watcher event, reduced to what the cluster view needs.
pub enum Change {
    /// A re-list starts: objects of `kind` arrive again, then `Listed`.
    Relisting(&'static str),
    /// An object seen during a re-list.
    Listed(ObjectKey, serde_json::Value),
    /// The re-list of `kind` is complete: objects not seen in it are gone.
    ListDone(&'static str),
    /// An object added or modified.
    Applied(ObjectKey, serde_json::Value),
    Deleted(ObjectKey),
    /// The watch failed (disconnected, unreachable, expired version); it is retried.
    Failed(&'static str, String),
}

/// Starts one watcher task per kind, all sending to `changes`.
pub fn start(client: &Client, changes: mpsc::UnboundedSender<Change>) {
    spawn_watcher(Api::<Namespace>::all(client.clone()), changes.clone());
    spawn_watcher(Api::<Pod>::all(client.clone()), changes.clone());
    spawn_watcher(Api::<NetworkPolicy>::all(client.clone()), changes);
}

fn spawn_watcher<K>(api: Api<K>, changes: mpsc::UnboundedSender<Change>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    K: Send + Sync + 'static,
{
    let kind: &'static str = match K::kind(&()).as_ref() {
        "Namespace" => KINDS[0],
        "Pod" => KINDS[1],
        _ => KINDS[2],
    };
    tokio::spawn(async move {
        // `Any` lets the API server answer the list from its watch cache (what
        // client-go's informers do); bookmarks are on by default.
        let config = watcher::Config::default().any_semantic();
        let mut stream = watcher(api, config).backoff(QuickBackoff::new()).boxed();
        while let Some(event) = stream.next().await {
            let change = match event {
                Ok(watcher::Event::Init) => Change::Relisting(kind),
                Ok(watcher::Event::InitApply(object)) => {
                    let (key, value) = keyed(kind, &object);
                    Change::Listed(key, value)
                }
                Ok(watcher::Event::InitDone) => Change::ListDone(kind),
                Ok(watcher::Event::Apply(object)) => {
                    let (key, value) = keyed(kind, &object);
                    Change::Applied(key, value)
                }
                Ok(watcher::Event::Delete(object)) => Change::Deleted(key_of(kind, &object)),
                Err(error) => Change::Failed(kind, error.to_string()),
            };
            if changes.send(change).is_err() {
                return;
            }
        }
    });
}

fn key_of<K: Resource>(kind: &str, object: &K) -> ObjectKey {
    ObjectKey {
        kind: kind.to_owned(),
        namespace: object.namespace().unwrap_or_default(),
        name: object.name_any(),
    }
}

/// The object as the policy loader reads it: with `apiVersion` and `kind` (list
/// items come without them) and without `managedFields` (large, never read). Pods
/// keep only what the agent reads ([`slim_pod`]).
fn keyed<K: Resource<DynamicType = ()> + Serialize>(
    kind: &str,
    object: &K,
) -> (ObjectKey, serde_json::Value) {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), K::api_version(&()).into());
        map.insert("kind".into(), kind.into());
        if let Some(metadata) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            metadata.remove("managedFields");
        }
    }
    if kind == "Pod" {
        slim_pod(&mut value);
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
    use serde_json::{Map, Value};
    fn keep(from: &Value, fields: &[&str]) -> Value {
        let mut kept = Map::new();
        for field in fields {
            if let Some(value) = from.get(field) {
                kept.insert((*field).to_owned(), value.clone());
            }
        }
        Value::Object(kept)
    }
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

/// The cluster as the watchers report it.
#[derive(Default)]
pub struct ClusterView {
    objects: ObjectMap,
    /// Kinds whose list completed at least once: enforcing before all three have
    /// would enforce half a cluster (policies without the pods they allow, say).
    listed: BTreeSet<&'static str>,
    /// Objects seen so far in a re-list in progress, per kind.
    relisting: HashMap<&'static str, ObjectMap>,
    /// Since when the watches fail, if they do.
    pub failing_since: Option<Instant>,
    pub last_failure: Option<String>,
}

impl ClusterView {
    /// Starts from the cached objects of an earlier run (enforced until the lists
    /// arrive).
    pub fn new(cached: ObjectMap) -> Self {
        Self {
            objects: cached,
            ..Self::default()
        }
    }

    /// Applies one change; returns whether the enforced objects may differ.
    pub fn apply(&mut self, change: Change) -> bool {
        // `Relisting` comes before the list request: no sign the server answers.
        if !matches!(change, Change::Failed(..) | Change::Relisting(_)) {
            self.failing_since = None;
        }
        match change {
            Change::Relisting(kind) => {
                self.relisting.insert(kind, ObjectMap::new());
                false
            }
            Change::Listed(key, value) => {
                if let Some(buffer) = self.relisting.get_mut(key.kind.as_str()) {
                    // An unchanged object keeps its stored value (and so its
                    // conversion: `ConversionCache`).
                    let object = match self.objects.get(&key) {
                        Some(known) if *known.value == value => known.clone(),
                        _ => stored(&key, value),
                    };
                    buffer.insert(key, object);
                }
                false
            }
            Change::ListDone(kind) => {
                let fresh = self.relisting.remove(kind).unwrap_or_default();
                self.objects.retain(|key, _| key.kind != kind);
                self.objects.extend(fresh);
                self.listed.insert(kind);
                true
            }
            Change::Applied(key, value) => {
                // A pod's status updates (conditions, container states) arrive as
                // modifications; slimmed, most leave the stored pod as it was.
                if self
                    .objects
                    .get(&key)
                    .is_some_and(|known| *known.value == value)
                {
                    return false;
                }
                let object = stored(&key, value);
                self.objects.insert(key, object);
                true
            }
            Change::Deleted(key) => self.objects.remove(&key).is_some(),
            Change::Failed(kind, error) => {
                self.failing_since.get_or_insert_with(Instant::now);
                self.last_failure = Some(format!("{kind}: {error}"));
                false
            }
        }
    }

    /// Whether every kind has been listed since the agent started.
    pub fn synced(&self) -> bool {
        KINDS.iter().all(|kind| self.listed.contains(kind))
    }

    pub fn objects(&self) -> &ObjectMap {
        &self.objects
    }

    /// The objects to enforce. Pod addresses are made unique first: the API server
    /// may briefly show a deleted pod's address on a new pod too, and the loader
    /// refuses a set with one address on two workloads; the newer pod keeps it.
    pub fn enforceable(&self) -> ObjectMap {
        let mut objects = self.objects.clone();
        let mut owners: BTreeMap<IpAddr, (String, ObjectKey)> = BTreeMap::new();
        let mut losers = Vec::new();
        for (key, object) in objects.iter().filter(|(k, _)| k.kind == "Pod") {
            let created = object.value["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            for address in pod_addresses(&object.value) {
                match owners.get(&address) {
                    // The pod seen first is at least as new: this one gives way.
                    Some((other, _)) if *other >= created => losers.push(key.clone()),
                    Some((_, older)) => {
                        losers.push(older.clone());
                        owners.insert(address, (created.clone(), key.clone()));
                    }
                    None => {
                        owners.insert(address, (created.clone(), key.clone()));
                    }
                }
            }
        }
        for key in losers {
            if let Some(object) = objects.get_mut(&key)
                && let Some(status) = std::sync::Arc::make_mut(&mut object.value)
                    .get_mut("status")
                    .and_then(|s| s.as_object_mut())
            {
                tracing::warn!("{key}: its address is also a newer pod's; not enforced for now");
                status.remove("podIP");
                status.remove("podIPs");
            }
        }
        objects
    }
}

fn stored(key: &ObjectKey, value: serde_json::Value) -> StoredObject {
    StoredObject {
        file: source_name(key),
        document: 1,
        value: std::sync::Arc::new(value),
    }
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
    use super::{Change, ClusterView, slim_pod};
    use crate::agent::objects::ObjectKey;
    use crate::policy::{PolicySetBuilder, Source};

    fn pod_key(name: &str) -> ObjectKey {
        ObjectKey {
            kind: "Pod".to_owned(),
            namespace: "prod".to_owned(),
            name: name.to_owned(),
        }
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
        assert!(view.apply(Change::Applied(pod_key("new"), newer)));
        assert!(view.apply(Change::Applied(pod_key("old"), older)));
        let enforceable = view.enforceable();
        let ip = |name: &str| enforceable[&pod_key(name)].value["status"]["podIP"].clone();
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
        assert!(!view.apply(Change::Applied(pod_key("new"), noisy)));
        let moved = pod_at("new", "2026-11-02T00:00:00Z", "10.1.0.10", "Running");
        assert!(view.apply(Change::Applied(pod_key("new"), moved)));
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
}
