//! `microseg agent`: the daemon. It loads (or adopts) the data path, enforces the
//! policies applied through its API and found in watched directories, streams events
//! to subscribers, and serves metrics.
//!
//! Restart without a window: maps and links stay pinned when the agent stops (or is
//! killed), so the kernel keeps enforcing. A new agent reuses the pinned maps, reads
//! back what they hold, keeps links already pinned for its interfaces, and applies
//! its persisted objects as a diff: entries that did not change are never touched.

pub mod config;
pub mod enforcer;
pub mod events;
pub mod interfaces;
pub mod kubernetes;
pub mod metrics;
pub mod objects;
pub mod server;
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
    enforcer::{ApplyRefused, Enforcer, EventNames},
    events::EventHub,
    interfaces::{InterfaceTable, LocalPods},
    objects::{ObjectMap, PersistedState},
    veths::VethScanner,
};
use crate::datapath::{Capacities, Datapath, LoadOptions};
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
    /// Audit switches per workload (persisted).
    pub audit: BTreeMap<String, bool>,
    /// The last error reading the watched directories, if the last read failed.
    pub dir_error: Option<Vec<String>>,
    pub started: SystemTime,
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

    /// Enforces `api` and `dirs` with `audit`; on success they become the agent's and
    /// are persisted. On failure nothing changes.
    pub fn enforce(
        &mut self,
        api: ObjectMap,
        dirs: ObjectMap,
        audit: BTreeMap<String, bool>,
    ) -> Result<crate::datapath::ApplyReport, ApplyRefused> {
        let all = self.all_objects(&api, &dirs);
        let report = self.enforcer.apply(&all, &audit)?;
        let persist = api != self.api_objects || audit != self.audit;
        self.api_objects = api;
        self.dir_objects = dirs;
        self.audit = audit;
        if persist {
            let state = PersistedState {
                objects: self
                    .api_objects
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                audit: self.audit.clone(),
            };
            if let Err(e) = state.save(&self.config.state_dir) {
                // Enforcement is in place; only the copy for the next start failed.
                tracing::error!("could not persist the applied state: {e:#}");
            }
        }
        Ok(report)
    }
}

impl Agent {
    /// Publishes the name tables of the enforced generation to the event reader.
    pub fn refresh_names(&self, core: &AgentCore) {
        if let Some(enforced) = &core.enforcer.enforced {
            *self.names.write().expect("names lock") = enforced.names.clone();
        }
    }
}

/// Runs the agent until SIGINT/SIGTERM. Enforcement stays in place afterwards unless
/// `detach_on_exit`.
pub async fn run(config: AgentConfig, detach_on_exit: bool) -> anyhow::Result<()> {
    config.validate()?;
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: Some(config.pin_dir.clone()),
        capacities: Capacities::default(),
    })
    .context("loading the data path")?;
    {
        let mut maps = datapath.maps()?;
        maps.set_settings(
            &Settings::new(config.events_per_second, config.events_burst, 0)
                .with_lifetimes(config.conntrack.lifetimes()),
        )?;
    }
    // Adopt what the pinned maps hold (empty on a first start).
    let adopted = datapath.adopt_state().context("reading the pinned maps")?;
    let ring = datapath.take_events()?;
    let persisted = PersistedState::load(&config.state_dir)?;
    let mut core = AgentCore {
        enforcer: Enforcer::new(datapath, adopted, config.audit_mode),
        api_objects: ObjectMap::new(),
        dir_objects: ObjectMap::new(),
        // Kubernetes mode: the last known cluster state, so a restart while the API
        // server is unreachable keeps enforcing it.
        kube_objects: kubernetes::restore(&config),
        audit: BTreeMap::new(),
        dir_error: None,
        started: SystemTime::now(),
        attached: Vec::new(),
        interfaces: InterfaceTable::at_start(&config),
        config: config.clone(),
    };
    // The interfaces' bindings go with the first generation, so that a restarted
    // agent enforces exactly what the pinned maps hold.
    let (scanner, veths, facts) = interfaces::facts_at_start(&core, VethScanner::default()).await;
    if let Err(refused) = core.enforcer.set_interface_facts(facts) {
        tracing::error!("binding interfaces: {}", refused.summary);
    }
    let api_objects: ObjectMap = persisted.objects.into_iter().collect();
    let dir_objects = match objects::read_paths(&config.policy_dirs) {
        Ok(objects) => objects,
        Err(errors) => {
            for error in &errors {
                tracing::error!("{error}");
            }
            core.dir_error = Some(errors);
            ObjectMap::new()
        }
    };
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
    interfaces::reconcile(&mut core, None, &veths);

    let log = match &config.event_log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening event log {}", path.display()))?,
        ),
        None => None,
    };
    let (local_pods, local_pods_changes) = tokio::sync::watch::channel(None);
    let agent = Arc::new(Agent {
        hub: Arc::new(EventHub::new(config.subscriber_buffer, log)),
        names: Arc::new(RwLock::new(Arc::new(EventNames::default()))),
        core: Mutex::new(core),
        local_pods,
    });
    agent.refresh_names(&*agent.core.lock().await);

    let reader = tokio::spawn(events::read_ring(
        ring,
        agent.hub.clone(),
        agent.names.clone(),
        config.node_name(),
    ));
    let api = tokio::spawn(server::serve(agent.clone(), config.clone()));
    let watcher = tokio::spawn(watch_directories(agent.clone()));
    let interface_checks = tokio::spawn(interfaces::run(
        agent.clone(),
        Duration::from_millis(config.interface_scan_ms),
        local_pods_changes,
        scanner,
    ));
    let kubernetes = config
        .kubernetes
        .enabled
        .then(|| tokio::spawn(kubernetes::run(agent.clone())));
    let metrics = config
        .metrics_socket_address()?
        .map(|address| tokio::spawn(metrics::serve(agent.clone(), address)));
    tracing::info!(socket = %config.socket.display(), "microseg agent ready");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        result = reader => { result??; }
        result = api => { result??; }
    }
    watcher.abort();
    interface_checks.abort();
    if let Some(kubernetes) = kubernetes {
        kubernetes.abort();
    }
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    if detach_on_exit {
        let detached = crate::datapath::detach_pinned(&config.pin_dir)?;
        tracing::info!(detached, "detached; enforcement removed");
    } else {
        tracing::info!("stopped; enforcement stays in place (pinned)");
    }
    Ok(())
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
        return;
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

/// Paths, sizes and modification times of every file under `dirs`.
fn fingerprint(dirs: &[PathBuf]) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut entries = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(path) = stack.pop() {
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        if metadata.is_dir() {
            if let Ok(read) = std::fs::read_dir(&path) {
                stack.extend(read.flatten().map(|e| e.path()));
            }
        } else {
            entries.push((path, metadata.len(), metadata.modified().ok()));
        }
    }
    entries.sort();
    entries
}
