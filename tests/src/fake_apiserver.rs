//! A Kubernetes API server small enough to run inside a test, speaking the real
//! list/watch protocol over HTTP/1.1 on 127.0.0.1, so the agent's kube-rs client is
//! exercised as it would be against a cluster (no mock of the client library).
//!
//! It serves Namespaces (`/api/v1/namespaces`), Pods (`/api/v1/pods`),
//! NetworkPolicies (`/apis/networking.k8s.io/v1/networkpolicies`), Nodes
//! (`/api/v1/nodes`) and ClusterNetworkPolicies
//! (`/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies`):
//! - list: `{"kind":"PodList","metadata":{"resourceVersion":..},"items":[..]}`;
//! - watch (`?watch=true&resourceVersion=N`): a chunked stream of JSON lines
//!   (`ADDED`, `MODIFIED`, `DELETED` with the object at its new resource version,
//!   `BOOKMARK` every 500 ms when `allowWatchBookmarks=true`), starting after `N`;
//! - a version older than the compacted history gets what a real API server sends:
//!   an `ERROR` event carrying a `410 Expired` Status, and the end of the stream.
//!
//! Event writes (`POST`/`PATCH` under `/apis/events.k8s.io/v1/`) are accepted and
//! kept for the test to read. The test drives it: [`FakeApiServer::apply`],
//! [`FakeApiServer::delete`], [`FakeApiServer::drop_watches`] (connections cut
//! without the final chunk), [`FakeApiServer::expire_history`] (compaction: the next
//! watch gets 410 Gone), [`FakeApiServer::stop`] / [`FakeApiServer::start_again`]
//! (the server goes away and returns on the same port with its state).
//!
//! The ClusterNetworkPolicy CRD is installed unless [`FakeApiServer::set_crd_installed`]
//! says otherwise: without it, its path gets what a real API server answers for a
//! resource it does not serve, a plain-text `404 page not found`; uninstalling it
//! deletes its objects, as deleting a CRD does.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// How often a watch sends a bookmark (real API servers: about once a minute).
const BOOKMARK_INTERVAL: Duration = Duration::from_millis(500);

/// The collections served, by URL path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Collection {
    Namespaces,
    Pods,
    NetworkPolicies,
    ClusterNetworkPolicies,
    Nodes,
}

impl Collection {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/namespaces" => Some(Self::Namespaces),
            "/api/v1/pods" => Some(Self::Pods),
            "/apis/networking.k8s.io/v1/networkpolicies" => Some(Self::NetworkPolicies),
            "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies" => {
                Some(Self::ClusterNetworkPolicies)
            }
            "/api/v1/nodes" => Some(Self::Nodes),
            _ => None,
        }
    }

    fn of_kind(kind: &str) -> Self {
        match kind {
            "Namespace" => Self::Namespaces,
            "Pod" => Self::Pods,
            "NetworkPolicy" => Self::NetworkPolicies,
            "ClusterNetworkPolicy" => Self::ClusterNetworkPolicies,
            "Node" => Self::Nodes,
            other => panic!("the fake API server does not serve {other}"),
        }
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Self::Namespaces => ("v1", "NamespaceList"),
            Self::Pods => ("v1", "PodList"),
            Self::NetworkPolicies => ("networking.k8s.io/v1", "NetworkPolicyList"),
            Self::ClusterNetworkPolicies => (
                "policy.networking.k8s.io/v1alpha2",
                "ClusterNetworkPolicyList",
            ),
            Self::Nodes => ("v1", "NodeList"),
        }
    }

    /// Cluster-scoped kinds have no namespace.
    fn cluster_scoped(self) -> bool {
        matches!(
            self,
            Self::Namespaces | Self::ClusterNetworkPolicies | Self::Nodes
        )
    }
}

type Key = (Collection, String, String);

struct Entry {
    resource_version: u64,
    collection: Collection,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Entry>,
    /// Watches from a version below this get 410 Gone.
    oldest_version: u64,
    /// Bumped to cut every open connection.
    epoch: u64,
    posted_events: Vec<Value>,
    requests: Vec<String>,
    /// The ClusterNetworkPolicy CRD is not installed.
    crd_absent: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    running: AtomicBool,
    connections: Mutex<Vec<TcpStream>>,
}

pub struct FakeApiServer {
    shared: Arc<Shared>,
    pub port: u16,
    /// The address it listens on (127.0.0.1 unless [`FakeApiServer::start_at`]).
    pub address: std::net::Ipv4Addr,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// The network namespace (`/var/run/netns/<name>`) it listens in.
    netns: Option<String>,
}

impl FakeApiServer {
    /// Listens on 127.0.0.1 with an ephemeral port, in this process's namespace.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Listens on 127.0.0.1 of the named network namespace, where the agent runs.
    pub fn start_in(netns: &str) -> Self {
        Self::start_with(Some(netns.to_owned()))
    }

    /// Listens on `address` (one of the namespace's own) in the named network
    /// namespace: agents in other namespaces reach it by routing, as nodes reach a
    /// cluster's API server.
    pub fn start_at(netns: &str, address: std::net::Ipv4Addr) -> Self {
        Self::start_on(Some(netns.to_owned()), address)
    }

    fn start_with(netns: Option<String>) -> Self {
        Self::start_on(netns, std::net::Ipv4Addr::LOCALHOST)
    }

    fn start_on(netns: Option<String>, address: std::net::Ipv4Addr) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                resource_version: 100,
                oldest_version: 0,
                ..State::default()
            }),
            changed: Condvar::new(),
            running: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        });
        let mut server = Self {
            shared,
            port: 0,
            address,
            acceptor: Mutex::new(None),
            netns,
        };
        server.port = server.listen();
        server
    }

    /// Listens on the address and port (an ephemeral one the first time); returns
    /// the port.
    fn listen(&self) -> u16 {
        let (address, port) = (self.address, self.port);
        let listener = match &self.netns {
            None => TcpListener::bind((address, port)),
            // A socket stays in the namespace it was created in: create it on a
            // thread that entered the namespace, and use it from anywhere.
            Some(name) => {
                let path = format!("/var/run/netns/{name}");
                std::thread::spawn(move || {
                    let file = std::fs::File::open(&path)?;
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    TcpListener::bind((address, port))
                })
                .join()
                .expect("binding thread")
            }
        }
        .expect("binding the API server");
        let port = listener.local_addr().expect("address").port();
        listener.set_nonblocking(true).expect("non-blocking");
        self.shared.running.store(true, Ordering::SeqCst);
        let shared = self.shared.clone();
        *self.acceptor.lock().unwrap() = Some(std::thread::spawn(move || {
            while shared.running.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        // Each watch event goes out at once, as from a real API server
                        // (Nagle would hold small chunks back for the client's ACK).
                        let _ = stream.set_nodelay(true);
                        if let Ok(clone) = stream.try_clone() {
                            shared.connections.lock().unwrap().push(clone);
                        }
                        let shared = shared.clone();
                        std::thread::spawn(move || serve_connection(&shared, stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
        port
    }

    /// The API server goes away: the listener closes and every connection is cut.
    pub fn stop(&self) {
        self.shared.running.store(false, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.lock().unwrap().take() {
            let _ = acceptor.join();
        }
        self.cut_connections();
    }

    /// Back on the same port, with the state it had (and changes made meanwhile).
    pub fn start_again(&self) {
        self.listen();
    }

    /// A kubeconfig pointing at this server (plain http, a dummy token).
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}:{}\"}}\nusers:\n- name: fake\n  user: {{token: test-token}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
            self.address, self.port
        );
        std::fs::write(path, text).expect("writing the kubeconfig");
    }

    /// Creates or replaces an object (ADDED or MODIFIED to watchers); returns when it
    /// was published.
    pub fn apply(&self, object: Value) -> Instant {
        self.apply_all(vec![object])
    }

    /// Creates or replaces several objects, each its own event, published together.
    pub fn apply_all(&self, objects: Vec<Value>) -> Instant {
        let mut state = self.shared.state.lock().unwrap();
        for mut object in objects {
            let kind = kind_of(&object);
            let key = key_of(&object);
            assert!(
                !(key.0 == Collection::ClusterNetworkPolicies && state.crd_absent),
                "a ClusterNetworkPolicy applied while its CRD is not installed"
            );
            state.resource_version += 1;
            let version = state.resource_version;
            let created = state
                .objects
                .get(&key)
                .and_then(|p| {
                    p["metadata"]["creationTimestamp"]
                        .as_str()
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| {
                    let (h, m, s) = (version / 3600 % 24, version / 60 % 60, version % 60);
                    format!("2025-01-01T{h:02}:{m:02}:{s:02}Z")
                });
            let metadata = object["metadata"].as_object_mut().expect("metadata");
            metadata.insert("resourceVersion".into(), version.to_string().into());
            metadata.insert("creationTimestamp".into(), created.into());
            let uid = format!("uid-{}-{}-{}", kind, key.1, key.2);
            metadata.entry("uid").or_insert(uid.into());
            let previous = state.objects.insert(key.clone(), object.clone());
            let event = if previous.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            state.history.push(Entry {
                resource_version: version,
                collection: key.0,
                kind: event,
                object,
            });
        }
        self.shared.changed.notify_all();
        Instant::now()
    }

    /// Deletes an object (DELETED to watchers); returns when it was published.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Instant {
        self.delete_all(&[(kind, namespace, name)])
    }

    pub fn delete_all(&self, objects: &[(&str, &str, &str)]) -> Instant {
        let mut state = self.shared.state.lock().unwrap();
        for (kind, namespace, name) in objects {
            let key = (
                Collection::of_kind(kind),
                namespace.to_string(),
                name.to_string(),
            );
            let Some(mut object) = state.objects.remove(&key) else {
                continue;
            };
            state.resource_version += 1;
            let version = state.resource_version;
            object["metadata"]["resourceVersion"] = version.to_string().into();
            state.history.push(Entry {
                resource_version: version,
                collection: key.0,
                kind: "DELETED",
                object,
            });
        }
        self.shared.changed.notify_all();
        Instant::now()
    }

    /// Installs or uninstalls the ClusterNetworkPolicy CRD. Uninstalling deletes
    /// every ClusterNetworkPolicy (DELETED to watchers) and ends the open watches, as
    /// a real API server does; from then on its path answers `404`.
    pub fn set_crd_installed(&self, installed: bool) {
        {
            let mut state = self.shared.state.lock().unwrap();
            if state.crd_absent != installed {
                return;
            }
            if !installed {
                let keys: Vec<Key> = state
                    .objects
                    .keys()
                    .filter(|key| key.0 == Collection::ClusterNetworkPolicies)
                    .cloned()
                    .collect();
                for key in keys {
                    let mut object = state.objects.remove(&key).expect("listed");
                    state.resource_version += 1;
                    let version = state.resource_version;
                    object["metadata"]["resourceVersion"] = version.to_string().into();
                    state.history.push(Entry {
                        resource_version: version,
                        collection: key.0,
                        kind: "DELETED",
                        object,
                    });
                }
            }
            state.crd_absent = !installed;
        }
        self.cut_connections();
    }

    /// Cuts every open connection mid-stream (no final chunk): the client sees a
    /// dropped watch and resumes from the last version it saw.
    pub fn drop_watches(&self) {
        self.cut_connections();
    }

    /// Compacts the history (as etcd does): every version seen so far is too old, so
    /// resumed watches get 410 Gone and must list again. Open watches are cut.
    pub fn expire_history(&self) {
        {
            let mut state = self.shared.state.lock().unwrap();
            state.oldest_version = state.resource_version + 1;
            state.history.clear();
        }
        self.cut_connections();
    }

    fn cut_connections(&self) {
        self.shared.state.lock().unwrap().epoch += 1;
        self.shared.changed.notify_all();
        for connection in self.shared.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }

    /// The newest resource version (that of the last change).
    pub fn resource_version(&self) -> u64 {
        self.shared.state.lock().unwrap().resource_version
    }

    /// Every object stored, as applied (with metadata filled in).
    pub fn objects(&self) -> Vec<Value> {
        self.shared
            .state
            .lock()
            .unwrap()
            .objects
            .values()
            .cloned()
            .collect()
    }

    /// Events (events.k8s.io/v1) the agent posted or patched.
    pub fn posted_events(&self) -> Vec<Value> {
        self.shared.state.lock().unwrap().posted_events.clone()
    }

    /// Requests seen, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn kind_of(object: &Value) -> &'static str {
    match object["kind"].as_str() {
        Some("Namespace") => "Namespace",
        Some("Pod") => "Pod",
        Some("NetworkPolicy") => "NetworkPolicy",
        Some("ClusterNetworkPolicy") => "ClusterNetworkPolicy",
        Some("Node") => "Node",
        other => panic!("the fake API server does not serve {other:?}"),
    }
}

fn key_of(object: &Value) -> Key {
    let kind = kind_of(object);
    let namespace = if Collection::of_kind(kind).cluster_scoped() {
        String::new()
    } else {
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned()
    };
    let name = object["metadata"]["name"].as_str().expect("metadata.name");
    (Collection::of_kind(kind), namespace, name.to_owned())
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%2C", ",")))
        .collect();
    Some(Request {
        method,
        path: path.to_owned(),
        query,
        body,
    })
}

fn serve_connection(shared: &Shared, stream: TcpStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader) {
        let query_text: Vec<String> = request
            .query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        shared.state.lock().unwrap().requests.push(format!(
            "{} {}?{}",
            request.method,
            request.path,
            query_text.join("&")
        ));
        let collection = Collection::from_path(&request.path);
        let unserved = collection == Some(Collection::ClusterNetworkPolicies)
            && shared.state.lock().unwrap().crd_absent;
        let outcome = match (request.method.as_str(), collection) {
            // What a real API server answers for a resource no CRD defines.
            ("GET", Some(_)) if unserved => {
                respond_raw(&mut writer, 404, "text/plain", b"404 page not found\n")
            }
            ("GET", Some(collection))
                if request
                    .query
                    .get("watch")
                    .is_some_and(|w| w == "true" || w == "1") =>
            {
                watch(shared, &mut writer, collection, &request);
                // A watch ends its connection.
                return;
            }
            ("GET", Some(collection)) => respond(&mut writer, 200, &list(shared, collection)),
            ("POST" | "PATCH", _) if request.path.starts_with("/apis/events.k8s.io/v1/") => {
                let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
                shared
                    .state
                    .lock()
                    .unwrap()
                    .posted_events
                    .push(body.clone());
                let mut event = body;
                if event["metadata"].is_object() {
                    event["metadata"]["resourceVersion"] = "1".into();
                }
                respond(
                    &mut writer,
                    if request.method == "POST" { 201 } else { 200 },
                    &event,
                )
            }
            _ => respond(
                &mut writer,
                404,
                &status_object(404, "NotFound", &format!("{} not found", request.path)),
            ),
        };
        if outcome.is_err() {
            return;
        }
    }
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn respond(writer: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).expect("json");
    respond_raw(writer, code, "application/json", &body)
}

fn respond_raw(
    writer: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        201 => "Created",
        _ => "Not Found",
    };
    let mut response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body);
    writer.write_all(&response)?;
    writer.flush()
}

fn list(shared: &Shared, collection: Collection) -> Value {
    let state = shared.state.lock().unwrap();
    let (api_version, kind) = collection.list_kind();
    // List items come without apiVersion and kind, as from a real API server.
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|(key, _)| key.0 == collection)
        .map(|(_, object)| {
            let mut item = object.clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("apiVersion");
                map.remove("kind");
            }
            item
        })
        .collect();
    json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"resourceVersion": state.resource_version.to_string()},
        "items": items,
    })
}

fn write_chunk(writer: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let mut data = serde_json::to_vec(line).expect("json");
    data.push(b'\n');
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(&data);
    chunk.extend_from_slice(b"\r\n");
    writer.write_all(&chunk)?;
    writer.flush()
}

fn watch(shared: &Shared, writer: &mut TcpStream, collection: Collection, request: &Request) {
    let from: u64 = request
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = request
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = request
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let header = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if writer.write_all(header.as_bytes()).is_err() {
        return;
    }
    let (api_version, list_kind) = collection.list_kind();
    let kind = list_kind.trim_end_matches("List");
    let started = Instant::now();
    let mut sent = from;
    let mut last_bookmark = Instant::now();
    let mut state = shared.state.lock().unwrap();
    let epoch = state.epoch;
    if from < state.oldest_version {
        let message = format!(
            "too old resource version: {from} ({})",
            state.oldest_version
        );
        drop(state);
        let _ = write_chunk(
            writer,
            &json!({"type": "ERROR", "object": status_object(410, "Expired", &message)}),
        );
        let _ = writer.write_all(b"0\r\n\r\n");
        return;
    }
    loop {
        if state.epoch != epoch || !shared.running.load(Ordering::SeqCst) {
            // Cut: no final chunk, the client sees the connection drop.
            return;
        }
        // The history is in version order: skip what was sent without a scan.
        let unsent = state
            .history
            .partition_point(|e| e.resource_version <= sent);
        let lines: Vec<Value> = state.history[unsent..]
            .iter()
            .filter(|e| e.collection == collection)
            .map(|e| json!({"type": e.kind, "object": e.object}))
            .collect();
        sent = state.resource_version;
        let bookmark = bookmarks && last_bookmark.elapsed() >= BOOKMARK_INTERVAL;
        drop(state);
        for line in &lines {
            if write_chunk(writer, line).is_err() {
                return;
            }
        }
        if bookmark {
            last_bookmark = Instant::now();
            let line = json!({"type": "BOOKMARK", "object": {
                "apiVersion": api_version, "kind": kind,
                "metadata": {"resourceVersion": sent.to_string()},
            }});
            if write_chunk(writer, &line).is_err() {
                return;
            }
        }
        if started.elapsed() >= timeout {
            let _ = writer.write_all(b"0\r\n\r\n");
            return;
        }
        state = shared.state.lock().unwrap();
        if state.resource_version == sent && state.epoch == epoch {
            state = shared
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }
}
