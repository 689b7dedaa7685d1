//! `microseg agent`: the daemon. It loads (or adopts) the data path, enforces the
//! policies applied through its API and found in watched directories, streams events
//! to subscribers, and serves metrics.
//!
//! Restart without a window: maps and links stay pinned when the agent stops (or is
//! killed), so the kernel keeps enforcing. A new agent reuses the pinned maps, reads
//! back what they hold, keeps links already pinned for its interfaces, and applies
//! its persisted objects as a diff: entries that did not change are never touched.
//! The compiler's ids are kept too (`ids_file`), so that what did not change keeps
//! its ids, and so its entries.

pub mod config;
pub mod enforcer;
pub mod events;
pub mod ids_file;
pub mod interfaces;
pub mod kernel_stats;
pub mod kubernetes;
pub mod metrics;
pub mod rule_hits;
pub mod server;
pub mod tasks;
pub mod veths;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use tokio::sync::Mutex;

use self::{
    config::AgentConfig,
    enforcer::{ApplyRefused, Enforcer},
    interfaces::{InterfaceTable, LocalPods},
    veths::VethScanner,
};
use crate::{
    datapath::{Capacities, Datapath, LoadOptions},
    event_view::EventNames,
    flow_history::{EventHub, log as event_log},
    objects::{self, ObjectKey, ObjectMap, PersistedState, StoredObject},
};
use microseg_common::config::Settings;

/// Everything the API handlers and the watcher share, behind one lock.
pub struct AgentCore {
    pub config: AgentConfig,
    pub enforcer: Enforcer,
    /// Objects applied through the API (persisted).
    pub api_objects: ObjectMap,
    /// Objects read from the watched directories.
    pub dir_objects: ObjectMap,
    /// Objects from the Kubernetes API server (Kubernetes mode; see `kubernetes`).
    pub kube_objects: ObjectMap,
    /// The writer of the cluster view's cache as `restore` left it (taken by the
    /// Kubernetes reconciler when it starts).
    pub kube_cache: Option<kubernetes::cache::CacheWriter>,
    /// The API server watches' state (Kubernetes mode), for `status`.
    pub kubernetes: Option<kubernetes::KubernetesStatus>,
    /// Audit switches per workload (persisted).
    pub audit: BTreeMap<String, bool>,
    /// The last error reading the watched directories, if the last read failed.
    pub dir_error: Option<Vec<String>>,
    pub started: SystemTime,
    /// Why the saved state could not be read or written, if it could not.
    pub state_error: Option<String>,
    /// The saved state could not be read at start: the API's objects are unknown, so
    /// watched-directory changes are held until a `microseg apply` saves a new state.
    pub saved_state_unreadable: bool,
    /// `interface.hook` of every hook the kernel says enforces.
    pub attached: Vec<String>,
    pub interfaces: InterfaceTable,
}

pub struct Agent {
    pub core: Mutex<AgentCore>,
    pub hub: Arc<EventHub>,
    pub names: Arc<RwLock<Arc<EventNames>>>,
    /// This node's pods (Kubernetes mode), for the interface checks.
    pub local_pods: tokio::sync::watch::Sender<Option<LocalPods>>,
    /// Kernel reads for metrics and `stats`, outside `core`'s lock.
    pub kernel: kernel_stats::KernelStats,
    /// Rule hit counters and when each rule was last hit.
    pub rule_hits: Arc<rule_hits::RuleHitLedger>,
    /// Restarts of supervised tasks.
    pub restarts: Arc<tasks::TaskRestarts>,
    /// Where maps and links are pinned (the event reader reopens the ring there).
    pub config_pin_dir: PathBuf,
    /// Flows the conntrack janitor marked to be judged again (`datapath::janitor`).
    pub flows_marked_stale: Arc<std::sync::atomic::AtomicU64>,
    /// The compiler's ids, kept across restarts.
    pub ids_file: Arc<ids_file::IdsFile>,
}

impl AgentCore {
    /// All objects the agent enforces: the directories', the Kubernetes API
    /// server's, then the API's (an object applied through the API replaces one of
    /// the same key from elsewhere).
    pub fn all_objects(&self, api: &ObjectMap, dirs: &ObjectMap) -> ObjectMap {
        let mut all = dirs.clone();
        all.extend(
            self.kube_objects
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        all.extend(api.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }

    /// The object the agent enforces under `key`: the API's, else the API server's,
    /// else a watched directory's.
    fn effective<'a>(
        key: &ObjectKey,
        api: &'a ObjectMap,
        kube: &'a ObjectMap,
        dirs: &'a ObjectMap,
    ) -> Option<&'a StoredObject> {
        api.get(key)
            .or_else(|| kube.get(key))
            .or_else(|| dirs.get(key))
    }

    /// The changes of the objects the agent enforces if its API objects became
    /// `api` and its directories' `dirs`. Reads the API's and the directories'
    /// objects (few), never the whole cluster's (but all of it at a first
    /// enforcement).
    fn changes_to(&self, api: &ObjectMap, dirs: &ObjectMap) -> Vec<objects::ObjectChange> {
        let mut keys: std::collections::BTreeSet<&ObjectKey> = std::collections::BTreeSet::new();
        for (old, new) in [(&self.api_objects, api), (&self.dir_objects, dirs)] {
            keys.extend(old.keys().filter(|key| old.get(*key) != new.get(*key)));
            keys.extend(new.keys().filter(|key| old.get(*key) != new.get(*key)));
        }
        let kube_now = &self.kube_objects;
        if self.enforcer.enforced.is_none() {
            // Nothing enforced yet (a start): everything the agent holds.
            keys.extend(api.keys().chain(kube_now.keys()).chain(dirs.keys()));
        }
        // Compared with what the enforcer holds, which is what was last enforced,
        // and as leniently (an object applied through the API is refused whole if
        // invalid; another is enforced as its fail-closed substitute).
        keys.into_iter()
            .filter_map(|key| {
                let new = Self::effective(key, api, kube_now, dirs);
                let lenient = !api.contains_key(key);
                let held = self.enforcer.held(key);
                let same = match (&held, new) {
                    (Some((old, was_lenient)), Some(new)) => old == new && *was_lenient == lenient,
                    (None, None) => true,
                    _ => false,
                };
                (!same).then(|| (key.clone(), new.cloned()))
            })
            .collect()
    }

    /// Enforces `changes` of the API server's objects (each object's new form, or
    /// `None` when it went); on success they are the agent's. On failure nothing
    /// changes.
    pub fn enforce_kube(
        &mut self,
        changes: &[objects::ObjectChange],
    ) -> Result<crate::datapath::ApplyReport, ApplyRefused> {
        let keys: Vec<ObjectKey> = changes.iter().map(|(key, _)| key.clone()).collect();
        // The objects as they would be, for the keys changed only.
        let mut kube = std::mem::take(&mut self.kube_objects);
        let before: Vec<(ObjectKey, Option<StoredObject>)> = changes
            .iter()
            .map(|(key, object)| {
                let old = match object {
                    Some(object) => kube.insert(key.clone(), object.clone()),
                    None => kube.remove(key),
                };
                (key.clone(), old)
            })
            .collect();
        let (api, dirs) = (
            std::mem::take(&mut self.api_objects),
            std::mem::take(&mut self.dir_objects),
        );
        self.kube_objects = kube;
        let effective = self.changes_to_kube(&api, &dirs, &keys);
        let audit = self.audit.clone();
        let from_api = |key: &ObjectKey, object: &StoredObject| {
            api.get(key)
                .is_some_and(|applied| Arc::ptr_eq(&applied.value, &object.value))
        };
        let result = self
            .enforcer
            .apply(&effective, &audit, &|key, object| !from_api(key, object));
        self.api_objects = api;
        self.dir_objects = dirs;
        if result.is_err() {
            for (key, old) in before {
                match old {
                    Some(old) => self.kube_objects.insert(key, old),
                    None => self.kube_objects.remove(&key),
                };
            }
        }
        result
    }

    /// The changes of the objects the agent enforces for the API server's objects
    /// `keys` (already in `kube_objects` as they now are).
    fn changes_to_kube(
        &self,
        api: &ObjectMap,
        dirs: &ObjectMap,
        keys: &[ObjectKey],
    ) -> Vec<objects::ObjectChange> {
        keys.iter()
            .filter_map(|key| {
                let new = Self::effective(key, api, &self.kube_objects, dirs);
                let lenient = !api.contains_key(key);
                let same = match (self.enforcer.held(key), new) {
                    (Some((old, was_lenient)), Some(new)) => old == *new && was_lenient == lenient,
                    (None, None) => true,
                    _ => false,
                };
                (!same).then(|| (key.clone(), new.cloned()))
            })
            .collect()
    }

    /// Enforces `api` and `dirs` with `audit`; on success they become the agent's and
    /// are persisted. On failure nothing changes. A change to what is persisted is
    /// written first and put in place once enforced: if it cannot be written (a full
    /// disk), nothing is enforced; if the agent dies in between, the next start
    /// enforces the last saved state, whole.
    pub fn enforce(
        &mut self,
        api: ObjectMap,
        dirs: ObjectMap,
        audit: BTreeMap<String, bool>,
    ) -> Result<crate::datapath::ApplyReport, ApplyRefused> {
        let changes = self.changes_to(&api, &dirs);
        let persist = api != self.api_objects || audit != self.audit;
        let prepared = if persist {
            let state = PersistedState {
                objects: api.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                audit: audit.clone(),
            };
            match state.prepare(&self.config.state_dir) {
                Ok(prepared) => Some(prepared),
                Err(e) => {
                    self.enforcer.applies_failed += 1;
                    return Err(ApplyRefused {
                        summary: format!(
                            "the change cannot be saved ({e:#}); nothing was applied and the previous policy stays enforced"
                        ),
                        details: Vec::new(),
                    });
                }
            }
        } else {
            None
        };
        // What was applied through the API is refused whole if invalid (its author
        // is told at once); a watched directory's or the API server's policy that
        // microseg refuses is enforced as its fail-closed substitute and reported.
        let from_api = |key: &objects::ObjectKey, object: &objects::StoredObject| {
            api.get(key)
                .is_some_and(|applied| Arc::ptr_eq(&applied.value, &object.value))
        };
        let report = self
            .enforcer
            .apply(&changes, &audit, &|key, object| !from_api(key, object))?;
        self.api_objects = api;
        self.dir_objects = dirs;
        self.audit = audit;
        if let Some(prepared) = prepared {
            crate::fault::crash_at("before-state-commit");
            match prepared.commit() {
                Ok(()) => {
                    self.state_error = None;
                    self.saved_state_unreadable = false;
                }
                Err(e) => {
                    // Enforced, but the next start would not know: say so until a
                    // later save succeeds.
                    let message = format!("the enforced state could not be saved: {e:#}");
                    tracing::error!("{message}");
                    self.state_error = Some(message);
                }
            }
        }
        Ok(report)
    }
}

impl AgentCore {
    /// Everything that keeps microseg from enforcing what it should, for `status`
    /// (first thing an operator reads) and the `microseg_healthy` metric.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self.interfaces.problems();
        if self.enforcer.enforced.is_some() {
            for refused in &self.enforcer.set().refused_policies {
                problems.push(format!(
                    "{} refused ({}); enforced as {}",
                    refused.key(),
                    refused.reasons.join("; "),
                    refused.enforced_as
                ));
            }
        }
        if let Some(error) = &self.enforcer.binding_error {
            problems.push(format!(
                "interface bindings not written (the interfaces they bind are held: nothing beyond their link passes; retried at every check): {error}"
            ));
        }
        if let Some(error) = &self.enforcer.standby_error {
            problems.push(format!("standby generation slot out of date: {error}"));
        }
        if let Some(error) = &self.state_error {
            problems.push(error.clone());
        }
        if let Some(errors) = &self.dir_error {
            problems.push(format!(
                "watched directories refused (the last good state stays enforced): {}",
                errors.first().cloned().unwrap_or_default()
            ));
        }
        problems
    }
}

impl Agent {
    /// Publishes the name tables of the enforced generation to the event reader.
    pub fn refresh_names(&self, core: &AgentCore) {
        if let Some(enforced) = &core.enforcer.enforced {
            *self
                .names
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = enforced.names.clone();
        }
    }
}

/// Runs the agent until SIGINT/SIGTERM. Enforcement stays in place afterwards unless
/// `detach_on_exit`.
pub async fn run(config: AgentConfig, detach_on_exit: bool) -> anyhow::Result<()> {
    config.validate()?;
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: Some(config.pin_dir.clone()),
        capacities: Capacities {
            conntrack: config.conntrack.capacity(),
            peer_hosts: config.peers.capacity(),
            ..Capacities::default()
        },
    })
    .context("loading the data path")?;
    for replaced in datapath.replaced_maps() {
        tracing::warn!("{replaced}");
    }
    {
        let mut maps = datapath.maps()?;
        maps.set_settings(
            &Settings::new(
                config.events_per_second,
                config.events_burst,
                if config.deny_events {
                    0
                } else {
                    microseg_common::config::SETTINGS_FLAG_NO_DENY_EVENTS
                } | if config.trace_allowed {
                    microseg_common::config::SETTINGS_FLAG_TRACE_ALLOWED
                } else {
                    0
                },
            )
            .with_lifetimes(config.conntrack.lifetimes()),
        )?;
    }
    // Adopt what the pinned maps hold (empty on a first start).
    let adopted = datapath.adopt_state().context("reading the pinned maps")?;
    // An unreadable saved state does not stop the agent: it keeps what the pinned maps
    // enforce and says so (below).
    let persisted = PersistedState::load(&config.state_dir);
    // Kubernetes mode: this node's pods are enforced here, the others by their own
    // nodes' agents. Ids as the last agent numbered, if it saved them.
    let (ids_file, compiler) = ids_file::IdsFile::load(
        &config.state_dir,
        config.kubernetes.enabled.then(|| config.node_name()),
    );
    let (kube_objects, kube_cache) = kubernetes::restore(&config);
    let mut core = AgentCore {
        enforcer: Enforcer::new(datapath, adopted, config.audit_mode, compiler),
        api_objects: ObjectMap::new(),
        dir_objects: ObjectMap::new(),
        // Kubernetes mode: the last known cluster state, so a restart while the API
        // server is unreachable keeps enforcing it.
        kube_objects,
        kube_cache,
        kubernetes: None,
        audit: BTreeMap::new(),
        dir_error: None,
        started: SystemTime::now(),
        state_error: None,
        saved_state_unreadable: false,
        attached: Vec::new(),
        interfaces: InterfaceTable::at_start(&config),
        config: config.clone(),
    };
    // The interfaces' bindings go with the first generation, so that a restarted
    // agent enforces exactly what the pinned maps hold.
    let (scanner, facts) = interfaces::facts_at_start(&mut core, VethScanner::default()).await;
    if let Err(refused) = core.enforcer.set_interface_facts(facts) {
        tracing::error!("binding interfaces: {}", refused.summary);
    }
    let dir_objects = match objects::read_paths(&config.policy_dirs) {
        Ok(objects) => Some(objects),
        Err(errors) => {
            for error in &errors {
                tracing::error!("{error}");
            }
            core.dir_error = Some(errors);
            None
        }
    };
    match (persisted, dir_objects) {
        (Ok(persisted), Some(dir_objects)) => {
            let api_objects: ObjectMap = persisted.objects.into_iter().collect();
            // What was saved needs no saving again.
            core.api_objects = api_objects.clone();
            core.audit = persisted.audit.clone();
            match core.enforce(api_objects, dir_objects, persisted.audit) {
                Ok(report) => tracing::info!(
                    generation = report.generation,
                    changes = report.changes,
                    "enforcing the restored and watched policies"
                ),
                Err(refused) => {
                    tracing::error!("{}", refused.summary);
                    for detail in &refused.details {
                        tracing::error!("  {detail}");
                    }
                }
            }
        }
        // Something the agent enforced before cannot be read: enforcing the rest
        // would silently drop it. Keep what the pinned maps hold until it is readable
        // again (a fixed directory is applied when it changes; an unreadable saved
        // state is replaced by the next `microseg apply`).
        (persisted, dir_objects) => {
            if let Err(e) = persisted {
                let kept = keep_unreadable_state(&config.state_dir);
                let message = format!(
                    "the saved state cannot be read ({e:#}){kept}; enforcing what the pinned maps hold, and holding changes of watched directories, until `microseg apply` saves a new state"
                );
                tracing::error!("{message}");
                core.state_error = Some(message);
                core.saved_state_unreadable = true;
            } else if let Ok(persisted) = persisted {
                core.api_objects = persisted.objects.into_iter().collect();
                core.audit = persisted.audit;
            }
            if let Some(dir_objects) = dir_objects {
                core.dir_objects = dir_objects;
            }
            tracing::error!(
                "not applying at start: enforcing what the pinned maps hold (generation {})",
                core.enforcer
                    .datapath
                    .maps()
                    .and_then(|m| m.live_generation())
                    .unwrap_or(0)
            );
        }
    }
    interfaces::reconcile(&mut core, None);

    let log = match &config.event_log {
        Some(path) => Some(
            event_log::EventLog::open(path, config.event_log_max_bytes, config.event_log_files)
                .with_context(|| format!("opening event log {}", path.display()))?,
        ),
        None => None,
    };
    let earlier_flows = config
        .event_log
        .as_deref()
        .map(|path| event_log::read_newest(path, config.event_log_files, config.flow_history))
        .unwrap_or_default();
    let (local_pods, _) = tokio::sync::watch::channel(None);
    let kernel = kernel_stats::KernelStats::open(&config.pin_dir)
        .context("opening the pinned maps for metrics")?;
    let rule_hits = Arc::new(
        rule_hits::RuleHitLedger::open(&config.pin_dir)
            .context("opening the pinned rule hit counters")?,
    );
    let hub = Arc::new(EventHub::new(
        config.subscriber_buffer,
        config.flow_history,
        log,
    ));
    hub.preload(earlier_flows);
    let started = core.started;
    let agent = Arc::new(Agent {
        rule_hits,
        hub,
        names: Arc::new(RwLock::new(Arc::new(EventNames::default()))),
        core: Mutex::new(core),
        local_pods,
        kernel,
        restarts: Arc::new(tasks::TaskRestarts::default()),
        config_pin_dir: config.pin_dir.clone(),
        flows_marked_stale: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        ids_file: Arc::new(ids_file),
    });
    agent.refresh_names(&*agent.core.lock().await);

    // Every task is supervised: restarted (and counted) if it fails, panics or ends.
    let restarts = agent.restarts.clone();
    let mut tasks = Vec::new();
    {
        let (agent, node) = (agent.clone(), config.node_name());
        tasks.push(tasks::supervise("event-reader", restarts.clone(), move || {
            // The ring is opened from its pin each time: a restarted reader goes on
            // from the ring's consumer position.
            let (hub, names, node) = (agent.hub.clone(), agent.names.clone(), node.clone());
            let pin_dir = agent.config_pin_dir.clone();
            async move { events::read_ring(events::open_ring(&pin_dir)?, hub, names, node).await }
        }));
    }
    {
        let agent = agent.clone();
        tasks.push(tasks::supervise(
            "conntrack-janitor",
            restarts.clone(),
            move || run_janitor(agent.clone()),
        ));
    }
    {
        let agent = agent.clone();
        let due = agent.core.lock().await.enforcer.standby_due();
        tasks.push(tasks::supervise(
            "standby-writer",
            restarts.clone(),
            move || run_standby_writer(agent.clone(), due.clone()),
        ));
    }
    {
        let agent = agent.clone();
        tasks.push(tasks::supervise(
            "ids-writer",
            restarts.clone(),
            move || ids_file::run(agent.clone()),
        ));
    }
    {
        let agent = agent.clone();
        tasks.push(tasks::supervise("rule-hits", restarts.clone(), move || {
            agent.rule_hits.clone().run(agent.names.clone())
        }));
    }
    {
        let (agent, config) = (agent.clone(), config.clone());
        tasks.push(tasks::supervise("api", restarts.clone(), move || {
            server::serve(agent.clone(), config.clone())
        }));
    }
    {
        let agent = agent.clone();
        tasks.push(tasks::supervise(
            "directory-watcher",
            restarts.clone(),
            move || {
                let agent = agent.clone();
                async move {
                    watch_directories(agent).await;
                    Ok(())
                }
            },
        ));
    }
    {
        let agent = agent.clone();
        let every = Duration::from_millis(config.interface_scan_ms);
        // The first run goes on with the scan cache built at start.
        let first_scanner = std::sync::Mutex::new(Some(scanner));
        tasks.push(tasks::supervise(
            "interfaces",
            restarts.clone(),
            move || {
                let agent = agent.clone();
                let scanner = first_scanner
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
                    .unwrap_or_default();
                async move {
                    let changes = agent.local_pods.subscribe();
                    interfaces::run(agent, every, changes, scanner).await;
                    Ok(())
                }
            },
        ));
    }
    if config.kubernetes.enabled {
        let agent = agent.clone();
        tasks.push(tasks::supervise(
            "kubernetes",
            restarts.clone(),
            move || {
                let agent = agent.clone();
                async move {
                    kubernetes::run(agent).await;
                    Ok(())
                }
            },
        ));
    }
    if let Some(address) = config.metrics_socket_address()? {
        let agent = agent.clone();
        tasks.push(tasks::supervise("metrics", restarts.clone(), move || {
            metrics::serve(agent.clone(), address)
        }));
    }
    tasks.extend(start_hubble(&agent, started, &config, &restarts)?);
    tracing::info!(socket = %config.socket.display(), "microseg agent ready");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    for task in tasks {
        task.abort();
    }
    // Both slots alike, as a restart would otherwise find and repair them.
    agent.core.lock().await.enforcer.finish_standby();
    // The ids of what is enforced now, whatever the writer saved last.
    if let Err(e) = ids_file::save(&agent).await {
        tracing::warn!("saving the compiler's ids at exit: {e:#}");
    }
    let _ = std::fs::remove_file(&config.socket);
    if let Some(path) = config.hubble.socket_path(&config.socket) {
        let _ = std::fs::remove_file(path);
    }
    if detach_on_exit {
        let detached = crate::datapath::detach_pinned(&config.pin_dir)?;
        tracing::info!(detached, "detached; enforcement removed");
    } else {
        tracing::info!("stopped; enforcement stays in place (pinned)");
    }
    Ok(())
}

/// After each switch, rewrites the old generation slot (`Enforcer::finish_standby`)
/// off the path to enforcement: the grace period is waited out without the agent's
/// lock, so the update that switched, and status and metrics, are not held by it.
async fn run_standby_writer(
    agent: Arc<Agent>,
    due: Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    loop {
        due.notified().await;
        let pending = agent.core.lock().await.enforcer.pending_grace();
        if let Some((grace, switch)) = pending {
            // On failure `finish_standby` waits itself, and reports what fails.
            if let Ok(Ok(())) = tokio::task::spawn_blocking(move || grace.wait()).await {
                agent.core.lock().await.enforcer.grace_passed(switch);
            }
        }
        agent.core.lock().await.enforcer.finish_standby();
    }
}

/// Once a second, marks the flows of the addresses the last updates queued to be
/// judged again (see `datapath::janitor`), off the agent's lock.
async fn run_janitor(agent: Arc<Agent>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let addresses = agent.core.lock().await.enforcer.take_stale_addresses();
        if addresses.is_empty() {
            continue;
        }
        let pin_dir = agent.config_pin_dir.clone();
        let marked = tokio::task::spawn_blocking(move || {
            crate::datapath::janitor::mark_flows_stale(&pin_dir, &addresses)
        })
        .await??;
        agent
            .flows_marked_stale
            .fetch_add(marked as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Starts Hubble's Observer API as supervised tasks (`hubble` on the Unix socket,
/// `hubble-tcp` on the loopback port when one is set), serving the flow history.
fn start_hubble(
    agent: &Arc<Agent>,
    started: SystemTime,
    config: &AgentConfig,
    restarts: &Arc<tasks::TaskRestarts>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let served = crate::hubble::Served {
        history: agent.hub.clone(),
        node_name: config.node_name(),
        started,
    };
    let mut handles = Vec::new();
    if let Some(path) = config.hubble.socket_path(&config.socket) {
        let (served, mode) = (served.clone(), config.socket_mode_bits()?);
        tracing::info!(socket = %path.display(), "serving Hubble's Observer API");
        handles.push(tasks::supervise("hubble", restarts.clone(), move || {
            let (served, path) = (served.clone(), path.clone());
            async move { crate::hubble::serve_unix(served, &path, mode).await }
        }));
    }
    if let Some(address) = config.hubble.listen_socket_address()? {
        tracing::info!(%address, "serving Hubble's Observer API");
        handles.push(tasks::supervise(
            "hubble-tcp",
            restarts.clone(),
            move || crate::hubble::serve_tcp(served.clone(), address),
        ));
    }
    Ok(handles)
}

/// Re-reads the watched directories when they change and applies them whole; an
/// invalid change is reported and the last good state keeps being enforced.
async fn watch_directories(agent: Arc<Agent>) {
    let (dirs, interval) = {
        let core = agent.core.lock().await;
        (
            core.config.policy_dirs.clone(),
            Duration::from_millis(core.config.watch_interval_ms.max(50)),
        )
    };
    if dirs.is_empty() {
        // Nothing to watch: the task stays idle rather than ending (a supervised
        // task that ends is restarted and logged as a failure).
        std::future::pending::<()>().await;
    }
    let mut last = fingerprint(&dirs);
    loop {
        tokio::time::sleep(interval).await;
        let now = fingerprint(&dirs);
        if now == last {
            continue;
        }
        last = now;
        let mut core = agent.core.lock().await;
        match objects::read_paths(&dirs) {
            Ok(dir_objects) if core.saved_state_unreadable => {
                // Held: see `AgentCore::saved_state_unreadable`.
                tracing::warn!(
                    "a watched directory changed; held until the saved state is replaced"
                );
                core.dir_objects = dir_objects;
                core.dir_error = None;
            }
            Ok(dir_objects) => {
                let (api, audit) = (core.api_objects.clone(), core.audit.clone());
                match core.enforce(api, dir_objects, audit) {
                    Ok(report) => {
                        core.dir_error = None;
                        tracing::info!(generation = report.generation, "applied directory change");
                    }
                    Err(refused) => {
                        tracing::error!("{}", refused.summary);
                        for detail in &refused.details {
                            tracing::error!("  {detail}");
                        }
                        let mut lines = vec![refused.summary];
                        lines.extend(refused.details);
                        core.dir_error = Some(lines);
                    }
                }
            }
            Err(errors) => {
                for error in &errors {
                    tracing::error!("{error}");
                }
                core.dir_error = Some(errors);
            }
        }
        agent.refresh_names(&core);
    }
}

/// Paths, sizes and modification times of every policy file under `dirs` (the files
/// `objects::read_paths` reads), and the walk's errors.
fn fingerprint(dirs: &[PathBuf]) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let files = match crate::policy::policy_files(dirs) {
        Ok(files) => files,
        Err(errors) => {
            return errors
                .iter()
                .map(|e| (PathBuf::from(e.to_string()), 0, None))
                .collect();
        }
    };
    let mut entries: Vec<_> = files
        .into_iter()
        .map(|path| {
            let metadata = std::fs::metadata(&path).ok();
            let len = metadata.as_ref().map_or(0, |m| m.len());
            let modified = metadata.and_then(|m| m.modified().ok());
            (path, len, modified)
        })
        .collect();
    entries.sort();
    entries
}

/// Moves an unreadable `state.json` aside (kept for inspection; the next save would
/// overwrite it) and says where.
fn keep_unreadable_state(state_dir: &std::path::Path) -> String {
    let path = state_dir.join("state.json");
    let seconds = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let kept = state_dir.join(format!("state.json.unreadable-{seconds}"));
    match std::fs::rename(&path, &kept) {
        Ok(()) => format!(" (kept as {})", kept.display()),
        Err(_) => String::new(),
    }
}
