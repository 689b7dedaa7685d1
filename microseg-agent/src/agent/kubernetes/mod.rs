//! Kubernetes mode (`microseg agent --kubernetes`): the API server is the source of
//! Namespaces, Pods, NetworkPolicies, ClusterNetworkPolicies
//! (policy.networking.k8s.io/v1alpha2) and Nodes (the `nodes` peers of cluster
//! policies), and the agent enforces for its node's pods.
//!
//! - `watch`: one kube-rs watcher per kind (list, watch, resume, re-list after
//!   `410 Gone`) feeding a cluster view, which keeps which objects changed (and
//!   which pods lose a contested address) and this node's pods.
//! - this module: the reconciler. It takes every change that arrived together and
//!   enforces the objects they changed as one generation (a pod's addresses,
//!   identity and policy entries appear in, and leave, the maps in one atomic
//!   switch), then attaches to or detaches from pods' veths. Its cost follows the
//!   change, not the cluster.
//! - `status`: Kubernetes Events on this node's `Node` object, and on policies
//!   microseg refuses.
//!
//! The ClusterNetworkPolicy CRD is optional: without it (the API server answers its
//! list with `404`) there are no cluster policies, the rest is enforced, and the
//! agent says so once (an event, the log, `microseg status`) and checks again every
//! `watch::CRD_RETRY`.
//!
//! Every pod of the cluster is in the inventory (other nodes' pods are the peers that
//! policies allow), but only this node's pods' veths carry the programs. The last
//! cluster view is cached in the state directory (`cache`: a snapshot and a journal of
//! changes, `kubernetes.json` and `kubernetes.journal`): when the API
//! server is unreachable the agent keeps enforcing what it last knew, across a
//! restart too, and catches up when the watches come back.

pub mod cache;
pub mod status;
pub mod watch;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{Client, config::KubeConfigOptions};
use serde::Serialize;
use tokio::sync::mpsc;

use self::{
    cache::CacheWriter,
    status::{Status, StatusReporter},
    watch::ClusterView,
};
use super::{
    Agent, AgentCore,
    config::{AgentConfig, KubernetesConfig},
    enforcer::ApplyRefused,
    interfaces::LocalPods,
};
use crate::{
    datapath::ApplyReport,
    objects::{ObjectChange, ObjectKey, ObjectMap},
    policy::RefusedPolicy,
};

/// An outage shorter than this (a dropped watch, an expired version) is routine and
/// only logged; a longer one is reported as an event once the API server is back.
const OUTAGE_WORTH_REPORTING: Duration = Duration::from_secs(2);

/// Kubernetes mode's part of `microseg status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesStatus {
    pub node: String,
    /// Every watched kind has been listed since the agent started (until then the
    /// cached cluster view is enforced).
    pub synced: bool,
    /// Why the watches fail, while they do (the last known state stays enforced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch_failing: Option<String>,
    /// Watched kinds the API server does not serve: their CRD is not installed, so
    /// none of their objects exist.
    pub crds_absent: Vec<String>,
    /// What that means, in words.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The newest resource version (of an object added, modified, deleted or
    /// listed) that the enforced state reflects: a change made in the API server is
    /// enforced on this node once this is at least its version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// What a missing CRD means, for the log, the event and `microseg status`.
fn absent_note(kind: &str) -> String {
    if kind == watch::CLUSTER_NETWORK_POLICY {
        format!(
            "the ClusterNetworkPolicy CRD ({}.{} {}) is not installed: no cluster network policies are enforced (NetworkPolicies are); checking again every {} s (the CRD is in deploy/crds/)",
            watch::CNP_PLURAL,
            watch::CNP_GROUP,
            watch::CNP_VERSION,
            watch::CRD_RETRY.as_secs()
        )
    } else {
        format!("the API server does not serve {kind}: none are enforced")
    }
}

/// The cluster view cached by an earlier run, enforced until the watches have
/// listed everything again (empty outside Kubernetes mode), and the writer that goes
/// on from it.
pub fn restore(config: &AgentConfig) -> (ObjectMap, Option<CacheWriter>) {
    if !config.kubernetes.enabled {
        return (ObjectMap::new(), None);
    }
    let restored = cache::read(&config.state_dir);
    if !restored.objects.is_empty() {
        tracing::info!(
            objects = restored.objects.len(),
            "enforcing the cached cluster state until the API server answers"
        );
    }
    let writer = CacheWriter::new(&config.state_dir, &restored);
    (restored.objects, Some(writer))
}

/// Watches the API server and enforces what it reports, until the agent stops.
pub async fn run(agent: Arc<Agent>) {
    let config = agent.core.lock().await.config.clone();
    let node = config.node_name();
    let client = loop {
        match client(&config.kubernetes).await {
            Ok(client) => break client,
            Err(e) => {
                tracing::error!("Kubernetes client configuration: {e:#}");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    tracing::info!(
        node,
        "Kubernetes mode: watching namespaces, pods, network policies, cluster network policies and nodes"
    );
    let status = StatusReporter::start(client.clone(), &node);
    let (changes, mut incoming) = mpsc::unbounded_channel();
    watch::start(&client, changes);
    let (cached, writer) = {
        let mut core = agent.core.lock().await;
        (core.kube_objects.clone(), core.kube_cache.take())
    };
    // The writer `restore` made is taken by the first run; a run restarted by the
    // task supervisor finds none and starts one from the cache on disk.
    let writer = writer
        .unwrap_or_else(|| CacheWriter::new(&config.state_dir, &cache::read(&config.state_dir)));
    let cache = cache::start_writer(agent.clone(), writer);
    let mut reconciler = Reconciler {
        view: ClusterView::new(cached),
        local: agent.local_pods.clone(),
        agent,
        node,
        status,
        cache,
        enforced_once: false,
        refused: None,
        substituted: BTreeMap::new(),
        outage: None,
        absent: BTreeSet::new(),
        published: None,
        enforced_version: None,
        last_enforce_ok: false,
    };
    reconciler.publish_status().await;
    while let Some(change) = incoming.recv().await {
        let received = Instant::now();
        let mut changed = reconciler.view.apply(change);
        // Everything that arrived together becomes one generation.
        while let Ok(change) = incoming.try_recv() {
            changed |= reconciler.view.apply(change);
        }
        reconciler.track_outage();
        reconciler.track_absent_crds();
        reconciler.publish_status().await;
        if reconciler.view.synced() && (changed || !reconciler.enforced_once) {
            reconciler.last_enforce_ok = reconciler.enforce(received).await;
        }
        // Versions that changed nothing (a status update) are enforced too, once
        // everything before them is.
        if reconciler.last_enforce_ok && !reconciler.view.relisting() {
            reconciler.enforced_version = Some(reconciler.view.newest_version);
            reconciler.publish_status().await;
        }
    }
}

/// A client from `--kubeconfig`, else the in-cluster service account, else
/// `$KUBECONFIG` or `~/.kube/config`.
async fn client(settings: &KubernetesConfig) -> anyhow::Result<Client> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster configuration and no kubeconfig")?,
    };
    Client::try_from(config).context("creating the Kubernetes client")
}

struct Reconciler {
    agent: Arc<Agent>,
    view: ClusterView,
    node: String,
    status: StatusReporter,
    /// Counts enforcements, for the cache writer.
    /// The enforced changes, to the cache writer.
    cache: mpsc::UnboundedSender<Vec<ObjectChange>>,
    enforced_once: bool,
    /// The objects left out of the last apply because the loader refused them.
    refused: Option<Vec<ObjectKey>>,
    /// Policies refused and enforced as their fail-closed substitutes, as last
    /// reported on their objects.
    substituted: BTreeMap<String, RefusedPolicy>,
    /// Since when the watches have been failing (as last seen).
    outage: Option<Instant>,
    /// This node's pods as last enforced, for the interface task.
    local: tokio::sync::watch::Sender<Option<LocalPods>>,
    /// Kinds whose CRD is absent, as last reported.
    absent: BTreeSet<&'static str>,
    /// The status last given to `microseg status`.
    published: Option<KubernetesStatus>,
    /// The newest resource version the enforced state reflects.
    enforced_version: Option<u64>,
    /// Whether the last enforcement succeeded (the view is what the maps hold).
    last_enforce_ok: bool,
}

impl Reconciler {
    fn track_outage(&mut self) {
        match (self.view.failing_since, self.outage) {
            (Some(since), None) => {
                self.outage = Some(since);
                tracing::warn!(
                    "API server watch failing ({}); enforcing the last known state",
                    self.view.last_failure.as_deref().unwrap_or("unknown error")
                );
            }
            (None, Some(since)) => {
                self.outage = None;
                let lasted = since.elapsed();
                if lasted >= OUTAGE_WORTH_REPORTING {
                    self.status.report(Status {
                        warning: false,
                        regarding: None,
                        reason: "Reconnected",
                        note: format!(
                            "the API server was unreachable for {:.1} s; the last known state stayed enforced and the agent has caught up",
                            lasted.as_secs_f64()
                        ),
                    });
                } else {
                    tracing::info!("API server watch resumed");
                }
            }
            _ => {}
        }
    }

    /// Reports a CRD gone or installed, once per change.
    fn track_absent_crds(&mut self) {
        let now = self.view.absent().clone();
        for kind in now.difference(&self.absent) {
            self.status.report(Status {
                warning: false,
                regarding: None,
                reason: "CRDNotInstalled",
                note: absent_note(kind),
            });
        }
        for kind in self.absent.difference(&now) {
            self.status.report(Status {
                warning: false,
                regarding: None,
                reason: "CRDInstalled",
                note: format!(
                    "the {kind} CRD is installed: {kind} objects are watched and enforced"
                ),
            });
        }
        self.absent = now;
    }

    /// Puts the watches' state where `microseg status` reads it, when it changed.
    async fn publish_status(&mut self) {
        let status = KubernetesStatus {
            node: self.node.clone(),
            synced: self.view.synced(),
            watch_failing: self.view.failing_since.and(self.view.last_failure.clone()),
            crds_absent: self.absent.iter().map(|kind| (*kind).to_owned()).collect(),
            notes: self.absent.iter().map(|kind| absent_note(kind)).collect(),
            resource_version: self
                .enforced_version
                .filter(|version| *version > 0)
                .map(|version| version.to_string()),
        };
        if self.published.as_ref() != Some(&status) {
            self.agent.core.lock().await.kubernetes = Some(status.clone());
            self.published = Some(status);
        }
    }

    /// Enforces the cluster view as one generation; false if it was refused (the
    /// previous state stays enforced).
    async fn enforce(&mut self, received: Instant) -> bool {
        let changes = self.view.take_changes();
        let keys: Vec<ObjectKey> = changes.iter().map(|(key, _)| key.clone()).collect();
        let mut core = self.agent.core.lock().await;
        let result = enforce_changes(&mut core, changes);
        // What the cache must write: the changed keys as they are now.
        let cached: Vec<ObjectChange> = match result {
            Ok(_) => keys
                .iter()
                .map(|key| (key.clone(), core.kube_objects.get(key).cloned()))
                .collect(),
            Err(_) => Vec::new(),
        };
        self.agent.refresh_names(&core);
        let refused_policies = core.enforcer.set().refused_policies.clone();
        drop(core);
        match result {
            Ok((report, left_out)) => {
                tracing::debug!(
                    generation = report.generation,
                    changes = report.changes,
                    latency_ms = received.elapsed().as_secs_f64() * 1000.0,
                    "applied API server changes"
                );
                let local = Arc::new(self.view.local_pod_addresses(&self.node));
                // Pods, not addresses (a dual-stack pod has two).
                let local_count = local.values().collect::<BTreeSet<_>>().len();
                self.local.send_if_modified(|current| {
                    let modified = current.as_ref() != Some(&local);
                    *current = Some(local);
                    modified
                });
                if !self.enforced_once {
                    self.enforced_once = true;
                    let count = |kind: &str| self.view.count(kind);
                    self.status.report(Status {
                        warning: false,
                        regarding: None,
                        reason: "Synced",
                        note: format!(
                            "enforcing {} NetworkPolicies and {} ClusterNetworkPolicies for {} pods on this node ({} in the cluster, {} nodes), policy generation {}",
                            count("NetworkPolicy"),
                            count(watch::CLUSTER_NETWORK_POLICY),
                            local_count,
                            count("Pod"),
                            count("Node"),
                            report.generation
                        ),
                    });
                }
                self.report_left_out(left_out);
                self.report_substituted(refused_policies);
                // The writer stops only with the runtime.
                let _ = self.cache.send(cached);
                true
            }
            Err(refused) => {
                // Tried again with the next change (or the next watch event).
                self.view.mark_changed(keys);
                self.status.report(Status {
                    warning: true,
                    regarding: None,
                    reason: "PolicyRefused",
                    note: format!("{}: {}", refused.summary, refused.details.join("; ")),
                });
                false
            }
        }
    }

    /// Reports, on each policy's own object, that microseg refused it and what it
    /// enforces instead (a Warning), and once it is enforced as written again or
    /// gone (Normal); only transitions.
    fn report_substituted(&mut self, refused: Vec<RefusedPolicy>) {
        let now: BTreeMap<String, RefusedPolicy> = refused
            .into_iter()
            .filter(|r| r.source.starts_with(crate::objects::API_SERVER_SOURCE))
            .map(|r| (r.key(), r))
            .collect();
        for (key, refused) in &now {
            if self.substituted.get(key) == Some(refused) {
                continue;
            }
            self.status.report(Status {
                warning: true,
                regarding: Some(self.reference_to(refused)),
                reason: "PolicyRefused",
                note: format!(
                    "microseg cannot enforce this policy as written ({}); it enforces instead: {}",
                    refused.reasons.join("; "),
                    refused.enforced_as
                ),
            });
        }
        for (key, refused) in &self.substituted {
            if !now.contains_key(key) {
                self.status.report(Status {
                    warning: false,
                    regarding: Some(self.reference_to(refused)),
                    reason: "PolicyAccepted",
                    note: "microseg enforces this policy as written again (or it was deleted)"
                        .to_owned(),
                });
            }
        }
        self.substituted = now;
    }

    /// An object reference to a refused policy, with its uid if the view has it.
    fn reference_to(&self, refused: &RefusedPolicy) -> ObjectReference {
        let api_version = if refused.kind == watch::CLUSTER_NETWORK_POLICY {
            format!("{}/{}", watch::CNP_GROUP, watch::CNP_VERSION)
        } else {
            "networking.k8s.io/v1".to_owned()
        };
        let key = ObjectKey::new(
            refused.kind.to_owned(),
            refused.namespace.clone(),
            refused.name.clone(),
        );
        let uid = self.view.objects().get(&key).and_then(|object| {
            object.value.parse()["metadata"]["uid"]
                .as_str()
                .map(str::to_owned)
        });
        ObjectReference {
            api_version: Some(api_version),
            kind: Some(refused.kind.to_owned()),
            namespace: (!refused.namespace.is_empty()).then(|| refused.namespace.clone()),
            name: Some(refused.name.clone()),
            uid,
            ..ObjectReference::default()
        }
    }

    fn report_left_out(&mut self, left_out: Vec<ObjectKey>) {
        if left_out.is_empty() {
            if self.refused.take().is_some() {
                self.status.report(Status {
                    warning: false,
                    regarding: None,
                    reason: "PolicyAccepted",
                    note: "every object from the API server is enforced again".into(),
                });
            }
            return;
        }
        if self.refused.as_ref() != Some(&left_out) {
            let names: Vec<String> = left_out.iter().map(ToString::to_string).collect();
            self.status.report(Status {
                warning: true,
                regarding: None,
                reason: "ObjectsSkipped",
                note: format!(
                    "not enforced (invalid for microseg; the rest is): {}",
                    names.join(", ")
                ),
            });
            self.refused = Some(left_out);
        }
    }
}

/// Enforces `changes` of the API server's objects. Objects the loader refuses
/// (named in its errors) are left out (enforced as absent) and the rest is
/// enforced: one bad object must not freeze the whole cluster's policy. Returns the
/// objects left out. If even the rest is refused, the previous state stays
/// enforced.
fn enforce_changes(
    core: &mut AgentCore,
    mut changes: Vec<crate::objects::ObjectChange>,
) -> Result<(ApplyReport, Vec<ObjectKey>), ApplyRefused> {
    let refused = match core.enforce_kube(&changes) {
        Ok(report) => return Ok((report, Vec::new())),
        Err(refused) => refused,
    };
    let mut named = Vec::new();
    for (key, object) in &mut changes {
        let is_named = object.as_ref().is_some_and(|object| {
            let source = format!("{}: document {}", object.file, object.document);
            refused.details.iter().any(|d| d.starts_with(&source))
        });
        if is_named {
            named.push(key.clone());
            *object = None;
        }
    }
    if named.is_empty() {
        return Err(refused);
    }
    core.enforce_kube(&changes).map(|report| (report, named))
}
