//! The interfaces the agent enforces on, checked against the kernel.
//!
//! Two kinds: the configured ones (`--interface`, `interfaces:`) and, in Kubernetes
//! mode, this node's pods' host-side veths. Every check asks the kernel whether a
//! link is attached to the live interface of its name (`datapath::links`), so an
//! interface deleted and recreated while the agent was down, or while it runs, is
//! enforced again within one check; one that cannot be enforced (missing, refused)
//! is reported in `status` and metrics, and logged.
//!
//! An interface that belongs to one workload is bound to it, so that what it receives
//! must come from the workload's addresses: the workload names it (`spec.interface`),
//! or it is a veth whose peer holds the workload's address (pods always; configured
//! veths with `discoverWorkloadInterfaces`). Bindings are written before the
//! programs are attached, so a new interface never enforces unbound.
//!
//! A pod's veth is enforced from the moment it is found, not from the moment its pod
//! is known: a veth whose peer is in a pod sandbox's namespace, or holds a local
//! pod's address, and whose pod the policy set does not have (not reported yet,
//! refused, ambiguous) *awaits policy*: everything beyond its link is dropped
//! (`NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION`). Links are watched
//! (`ip monitor link`) so that a new veth is looked at within milliseconds.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use serde::Serialize;

use super::{
    Agent, AgentCore,
    config::{AgentConfig, AttachMode},
    veths::{VethScanner, Veths},
};
use crate::{
    datapath::{
        AttachPoint, ProgramRole,
        links::{self, PinnedLinkState},
        loader::{AttachOutcome, detach_interface},
        pinned_links,
    },
    policy::PolicySet,
};

/// This node's pods' addresses and `namespace/name` (Kubernetes mode); `None` until
/// the API server's view is synced (a cached view may be stale, so pod interfaces
/// are then neither attached nor detached).
pub type LocalPods = Arc<BTreeMap<IpAddr, String>>;

/// What one interface is doing, as the last check found it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    pub name: String,
    /// `configured` or `pod`.
    pub origin: &'static str,
    pub ifindex: Option<u32>,
    /// Hook (`xdp`, `tc-ingress`, `tc-egress`) -> `enforcing`, or why not.
    pub hooks: BTreeMap<&'static str, String>,
    /// The workload this interface belongs to (source validation), if any.
    pub workload: Option<String>,
    /// A pod's interface whose pod is not known yet: everything beyond its link is
    /// dropped.
    pub awaiting_policy: bool,
    /// Why the interface is held (its binding could not be written): everything
    /// beyond its link is dropped, without reading any map, until it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    /// Whether every hook enforces.
    pub enforcing: bool,
}

/// The agent's interfaces.
#[derive(Default)]
pub struct InterfaceTable {
    /// By name, after the last check.
    pub status: BTreeMap<String, InterfaceStatus>,
    /// Pod interfaces this agent enforces (attached or adopted from pins).
    pod_interfaces: BTreeSet<String>,
    /// What the last successful veth scan found; `None` until one succeeded. A
    /// failed scan never replaces it: an empty answer from a failing `ip` would
    /// otherwise detach every pod.
    veths: Option<Veths>,
    /// Veth scans that failed, and why the last one did while scans fail.
    pub scan_failures: u64,
    pub scan_error: Option<String>,
    /// Pods' veths reported by the CNI plugin, by container id: enforced from the
    /// plugin's ADD, before any scan finds them, until its DEL (or GC), or until the
    /// veth is gone.
    cni: BTreeMap<String, CniReported>,
}

/// A CNI plugin's report with the veth's ifindex at its ADD: a veth deleted and
/// another made under its name (a pod recreated, its DEL lost) is not the
/// reported one.
#[derive(Clone, Debug)]
struct CniReported {
    attachment: CniAttachment,
    ifindex: u32,
}

/// A pod's veth as the CNI plugin reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CniAttachment {
    /// The host-side end.
    pub interface: String,
    pub netns: String,
    pub addresses: Vec<IpAddr>,
    /// `namespace/name`, if the runtime said.
    pub pod: Option<String>,
}

const ENFORCING: &str = "enforcing";

impl InterfaceTable {
    /// The table at start: in Kubernetes mode, links pinned by an earlier run for
    /// interfaces that are not configured are pod interfaces, kept until the API
    /// server says otherwise; elsewhere they are leftovers of an older configuration
    /// and are detached.
    pub fn at_start(config: &AgentConfig) -> Self {
        let configured: BTreeSet<&str> =
            config.interfaces.iter().map(|i| i.name.as_str()).collect();
        let mut pod_interfaces = BTreeSet::new();
        for pinned in pinned_links(&config.pin_dir) {
            let Some((interface, _hook)) = pinned.rsplit_once('.') else {
                continue;
            };
            if configured.contains(interface) {
                continue;
            }
            if config.kubernetes.enabled {
                pod_interfaces.insert(interface.to_owned());
            } else {
                tracing::info!(
                    interface,
                    "detaching: the interface is no longer configured"
                );
                if let Err(e) = detach_interface(&config.pin_dir, interface) {
                    tracing::warn!("detaching from {interface}: {e}");
                }
            }
        }
        Self {
            pod_interfaces,
            ..Self::default()
        }
    }

    /// Takes a veth scan's outcome: a good scan becomes the view, a failed one is
    /// counted and reported and the last good view stays.
    pub fn record_scan(&mut self, scan: Result<Veths, String>) {
        match scan {
            Ok(veths) => {
                if self.scan_error.take().is_some() {
                    tracing::info!("looking for veths works again");
                }
                self.veths = Some(veths);
            }
            Err(error) => {
                self.scan_failures += 1;
                if self.scan_error.is_none() {
                    tracing::error!(
                        "looking for veths failed: {error}; keeping the last good view of the pods' interfaces until a scan succeeds"
                    );
                }
                self.scan_error = Some(error);
            }
        }
    }

    /// The veths as the last good scan found them, if one succeeded.
    pub fn veths(&self) -> Option<&Veths> {
        self.veths.as_ref()
    }

    /// Interfaces that should enforce and do not, and a failing veth scan.
    pub fn problems(&self) -> Vec<String> {
        let scan = self.scan_error.iter().map(|error| {
            format!("veth scan failing (the last good view is kept; new pods' veths are not found): {error}")
        });
        scan.chain(
            self.status
                .values()
                .filter(|status| !status.enforcing)
                .flat_map(|status| {
                    status
                        .hooks
                        .iter()
                        .filter(|(_, state)| *state != ENFORCING)
                        .map(move |(hook, state)| {
                            format!("interface {} {hook}: {state}", status.name)
                        })
                }),
        )
        .collect()
    }

    /// `interface.hook` for every hook that enforces.
    pub fn enforcing_hooks(&self) -> Vec<String> {
        self.status
            .values()
            .flat_map(|status| {
                status
                    .hooks
                    .iter()
                    .filter(|(_, state)| *state == ENFORCING)
                    .map(move |(hook, _)| format!("{}.{hook}", status.name))
            })
            .collect()
    }
}

/// Whether veths are looked for at all, and the pod sandbox namespace prefixes.
fn veth_scope(config: &AgentConfig) -> (bool, Vec<String>) {
    let needed = config.kubernetes.enabled || config.discover_workload_interfaces;
    let prefixes = if config.kubernetes.enabled {
        config.kubernetes.pod_sandbox_prefixes.clone()
    } else {
        Vec::new()
    };
    (needed, prefixes)
}

/// Looks for veths (when something needs them) without holding the agent's lock.
/// An error is returned as it is, for [`InterfaceTable::record_scan`]: it never
/// stands for "no veths".
async fn scan_veths(
    scanner: VethScanner,
    config: &AgentConfig,
) -> (VethScanner, Result<Veths, String>) {
    let (needed, prefixes) = veth_scope(config);
    if !needed {
        return (scanner, Ok(Veths::default()));
    }
    let mut scanner = scanner;
    let (scanner, found) = tokio::task::spawn_blocking(move || {
        let found = scanner.scan(&prefixes);
        (scanner, found)
    })
    .await
    .unwrap_or_else(|e| (VethScanner::default(), Err(anyhow::anyhow!("{e}"))));
    (scanner, found.map_err(|e| format!("{e:#}")))
}

/// Wakes `changed` whenever a link of the agent's network namespace is added,
/// changed or removed (`ip monitor link`), so that a new pod's veth is enforced
/// within milliseconds, not at the next periodic check. Without it (no iproute2
/// monitor), the periodic check still finds every veth. The monitor stops when the
/// returned guard is dropped.
fn watch_links(changed: Arc<tokio::sync::Notify>) -> Option<LinkWatch> {
    use tokio::io::AsyncBufReadExt;
    let child = tokio::process::Command::new("ip")
        .args(["-o", "monitor", "link"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!("watching links (ip monitor link): {e}; relying on the periodic check");
            return None;
        }
    };
    let stdout = child.stdout.take()?;
    let reader = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(_)) = lines.next_line().await {
            changed.notify_one();
        }
        // The monitor ended; dropping the child reaps it.
        drop(child);
        tracing::warn!("the link monitor (ip monitor link) ended; relying on the periodic check");
    });
    Some(LinkWatch(reader))
}

/// Stops the link monitor (and kills its `ip` process) when dropped: when the
/// interface task ends or is restarted.
struct LinkWatch(tokio::task::JoinHandle<()>);

impl Drop for LinkWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Checks every interface now, then every `every`, whenever this node's pods
/// change and whenever a link changes, until the agent stops.
pub async fn run(
    agent: Arc<Agent>,
    every: Duration,
    mut local_pods: tokio::sync::watch::Receiver<Option<LocalPods>>,
    mut scanner: VethScanner,
) {
    let links_changed = Arc::new(tokio::sync::Notify::new());
    let _link_watch = if veth_scope(&agent.core.lock().await.config).0 {
        watch_links(links_changed.clone())
    } else {
        None
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            changed = local_pods.changed() => if changed.is_err() { return },
            () = links_changed.notified() => {}
            _ = tick.tick() => {}
        }
        let pods = local_pods.borrow_and_update().clone();
        let config = agent.core.lock().await.config.clone();
        let scanned;
        (scanner, scanned) = scan_veths(scanner, &config).await;
        let mut core = agent.core.lock().await;
        core.interfaces.record_scan(scanned);
        reconcile(&mut core, pods.as_deref());
        agent.refresh_names(&core);
    }
}

/// What is known of the interfaces at start, before the first generation is
/// enforced: with it, a restarted agent binds its interfaces exactly as the pinned
/// maps do, and applies no change.
pub async fn facts_at_start(
    core: &mut AgentCore,
    scanner: VethScanner,
) -> (VethScanner, InterfaceFacts) {
    let (scanner, scanned) = scan_veths(scanner, &core.config).await;
    core.interfaces.record_scan(scanned);
    let wanted = wanted_interfaces(core, None);
    let facts = InterfaceFacts::gather(
        &wanted,
        core.interfaces.veths(),
        &core.interfaces.cni,
        core.config.discover_workload_interfaces,
    );
    (scanner, facts)
}

/// Configured interfaces, then pod interfaces: (name, attach mode, origin). Pod
/// interfaces are the veths of this node's pods and of pod sandboxes; before the API
/// server's view is synced, or before any veth scan succeeded, also those enforced
/// already (pinned by an earlier run, or found before).
fn wanted_interfaces(
    core: &AgentCore,
    pods: Option<&BTreeMap<IpAddr, String>>,
) -> Vec<(String, AttachMode, &'static str)> {
    let configured: BTreeSet<&str> = core
        .config
        .interfaces
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    let mut pod_wanted: BTreeSet<String> = match (pods, core.interfaces.veths()) {
        (Some(pods), Some(veths)) => pods
            .keys()
            .filter_map(|address| veths.by_address.get(address))
            .cloned()
            .collect(),
        _ => core.interfaces.pod_interfaces.clone(),
    };
    // Reported by the CNI plugin: enforced whatever the scans say, until its DEL.
    pod_wanted.extend(
        core.interfaces
            .cni
            .values()
            .map(|reported| reported.attachment.interface.clone()),
    );
    if let Some(veths) = core.interfaces.veths() {
        pod_wanted.extend(veths.sandboxes.iter().cloned());
        // A pod's veth whose peer could not be read this time stays enforced.
        pod_wanted.extend(
            veths
                .unreadable
                .intersection(&core.interfaces.pod_interfaces)
                .cloned(),
        );
    }
    pod_wanted.retain(|name| !configured.contains(name.as_str()));
    core.config
        .interfaces
        .iter()
        .map(|i| (i.name.clone(), i.attach, "configured"))
        .chain(
            pod_wanted
                .into_iter()
                .map(|name| (name, AttachMode::Tc, "pod")),
        )
        .collect()
}

/// How an interface may be bound to a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindRule {
    /// Only by a workload naming it (`spec.interface`).
    Named,
    /// Also by the workload whose address its veth peer holds (a configured veth
    /// with `discoverWorkloadInterfaces`).
    NamedOrPeer,
    /// A pod's veth: by the pod whose address its peer holds; until that pod is
    /// known, it awaits policy.
    Pod,
}

/// What binds interfaces to workloads, as far as it does not depend on the policy
/// set: the interfaces enforced now and what their veth peers hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceFacts {
    /// Name -> (ifindex, how it may be bound).
    pub interfaces: BTreeMap<String, (u32, BindRule)>,
    /// Veth name -> the addresses its peer holds.
    pub peers: BTreeMap<String, BTreeSet<IpAddr>>,
}

/// The interfaces' bindings under one policy set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bindings {
    /// ifindex -> `namespace/name` of the workload it belongs to.
    pub workloads: BTreeMap<u32, String>,
    /// Pod interfaces whose pod the set does not have: they drop everything beyond
    /// their link.
    pub awaiting_policy: BTreeSet<u32>,
}

impl InterfaceFacts {
    fn gather(
        wanted: &[(String, AttachMode, &'static str)],
        veths: Option<&Veths>,
        cni: &BTreeMap<String, CniReported>,
        discover_configured: bool,
    ) -> Self {
        let mut facts = Self::default();
        for (name, _, origin) in wanted {
            if let Some(ifindex) = links::ifindex(name) {
                let rule = if *origin == "pod" {
                    BindRule::Pod
                } else if discover_configured {
                    BindRule::NamedOrPeer
                } else {
                    BindRule::Named
                };
                facts.interfaces.insert(name.clone(), (ifindex, rule));
            }
        }
        let reported = cni.values().map(|r| &r.attachment).flat_map(|a| {
            a.addresses
                .iter()
                .map(move |address| (address, &a.interface))
        });
        for (address, veth) in veths
            .iter()
            .flat_map(|veths| &veths.by_address)
            .chain(reported)
        {
            if facts.interfaces.contains_key(veth) {
                facts
                    .peers
                    .entry(veth.clone())
                    .or_default()
                    .insert(*address);
            }
        }
        facts
    }

    /// Each interface's workload: the one naming it (`spec.interface`, which
    /// `claimed` tells), else the one whose addresses its veth peer holds, if
    /// exactly one. A pod interface with neither awaits policy. The enforcer's
    /// `claimed` asks its store's index: reading every workload of the set on each
    /// update cost about 5 ms at 50,000 cluster pods.
    pub fn bindings_claimed(
        &self,
        set: &PolicySet,
        claimed: &dyn Fn(&str) -> Option<String>,
    ) -> Bindings {
        let mut bindings = Bindings::default();
        for (name, (ifindex, rule)) in &self.interfaces {
            let owner = match claimed(name) {
                Some(workload) => Some(workload),
                None if *rule != BindRule::Named => self.discovered_owner(set, name),
                None => None,
            };
            match owner {
                Some(workload) => {
                    bindings.workloads.insert(*ifindex, workload);
                }
                None if *rule == BindRule::Pod => {
                    bindings.awaiting_policy.insert(*ifindex);
                }
                None => {}
            }
        }
        bindings
    }

    /// The workload whose addresses the peer of veth `interface` holds, if exactly
    /// one.
    fn discovered_owner(&self, set: &PolicySet, interface: &str) -> Option<String> {
        let owners: BTreeSet<String> = self
            .peers
            .get(interface)
            .into_iter()
            .flatten()
            .filter_map(|address| set.workload_by_address(*address))
            .map(|workload| workload.key())
            .collect();
        if owners.len() > 1 {
            tracing::warn!(
                interface,
                "the peer holds addresses of several workloads ({}); not bound",
                owners.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            return None;
        }
        owners.into_iter().next()
    }
}

/// One check: bind, attach (or adopt, or re-attach), detach pod interfaces that
/// left, and record what the kernel says.
pub fn reconcile(core: &mut AgentCore, pods: Option<&BTreeMap<IpAddr, String>>) {
    forget_gone_cni_veths(&mut core.interfaces.cni);
    let wanted = wanted_interfaces(core, pods);
    let pod_wanted: BTreeSet<String> = wanted
        .iter()
        .filter(|(_, _, origin)| *origin == "pod")
        .map(|(name, _, _)| name.clone())
        .collect();

    // Bindings first: a new interface never enforces unbound.
    let facts = InterfaceFacts::gather(
        &wanted,
        core.interfaces.veths(),
        &core.interfaces.cni,
        core.config.discover_workload_interfaces,
    );
    let was_failing = core.enforcer.binding_error.is_some();
    match core.enforcer.set_interface_facts(facts) {
        Ok(Some(report)) => {
            tracing::info!(generation = report.generation, "interface bindings changed")
        }
        Ok(None) => {}
        // Logged once per failing stretch; it is tried again at every check.
        Err(refused) if was_failing => {
            tracing::debug!("binding interfaces: {}", refused.summary)
        }
        Err(refused) => tracing::error!(
            "binding interfaces: {}; the interfaces it would bind are held (nothing beyond their link passes) and it is tried again at every check",
            refused.summary
        ),
    }
    let bound_to: Bindings = core.enforcer.bindings().clone();
    let unwritten = core.enforcer.unwritten_bindings();

    let mut status = BTreeMap::new();
    for (name, mode, origin) in &wanted {
        let ifindex = links::ifindex(name);
        let held = ifindex.filter(|index| unwritten.contains(index)).map(|_| {
            match &core.enforcer.binding_error {
                Some(error) => format!("its binding could not be written: {error}"),
                None => "its binding is not written yet".to_owned(),
            }
        });
        let role = if held.is_some() {
            ProgramRole::Hold
        } else {
            ProgramRole::Judge
        };
        let mut hooks = BTreeMap::new();
        for point in mode.points() {
            hooks.insert(point.name(), attach_one(core, name, point, ifindex, role));
        }
        let enforcing = hooks.values().all(|state| state == ENFORCING);
        let previous = core.interfaces.status.get(name);
        if !enforcing && previous.is_none_or(|p| p.enforcing || p.hooks != hooks) {
            for (hook, state) in hooks.iter().filter(|(_, s)| *s != ENFORCING) {
                tracing::error!(interface = name, hook, "not enforcing: {state}");
            }
        }
        status.insert(
            name.clone(),
            InterfaceStatus {
                name: name.clone(),
                origin,
                ifindex,
                hooks,
                workload: ifindex.and_then(|index| bound_to.workloads.get(&index).cloned()),
                awaiting_policy: ifindex
                    .is_some_and(|index| bound_to.awaiting_policy.contains(&index)),
                held,
                enforcing,
            },
        );
    }
    for (name, status) in &status {
        let was_awaiting = core
            .interfaces
            .status
            .get(name)
            .is_some_and(|previous| previous.awaiting_policy);
        if status.awaiting_policy && !was_awaiting {
            tracing::warn!(
                interface = name,
                "a pod's interface whose pod is not known yet: everything beyond its link is dropped until it is"
            );
        }
    }
    // Nothing is detached on a view that may be incomplete: before the API server's
    // view is synced, or before a veth scan has succeeded.
    if pods.is_some() && core.interfaces.veths().is_some() {
        for left in core.interfaces.pod_interfaces.difference(&pod_wanted) {
            match detach_interface(&core.config.pin_dir, left) {
                Ok(_) => tracing::info!(interface = left, "pod interface left; detached"),
                Err(e) => tracing::warn!("detaching from {left}: {e}"),
            }
        }
    }
    // Before the API server's view is synced nothing is detached; interfaces found
    // meanwhile (sandboxes) are kept with the pinned ones.
    core.interfaces.pod_interfaces = pod_wanted;
    core.interfaces.status = status;
    core.attached = core.interfaces.enforcing_hooks();
}

/// The CNI plugin's ADD: the pod's veth is enforced now (bound, or awaiting policy
/// until its pod is known, or held if its binding cannot be written). Answers once
/// every hook enforces; an error tells the runtime not to start the pod.
pub fn pod_network_added(
    core: &mut AgentCore,
    pods: Option<&BTreeMap<IpAddr, String>>,
    container_id: String,
    attachment: CniAttachment,
) -> crate::api::Response {
    use crate::api::Response;
    let Some(ifindex) = links::ifindex(&attachment.interface) else {
        return Response::error(
            format!(
                "interface {} does not exist in the agent's network namespace (is the agent on the host network?)",
                attachment.interface
            ),
            vec![],
        );
    };
    let interface = attachment.interface.clone();
    tracing::info!(
        interface,
        container = container_id,
        pod = attachment.pod.as_deref().unwrap_or("-"),
        "CNI ADD: enforcing on the pod's veth"
    );
    core.interfaces.cni.insert(
        container_id.clone(),
        CniReported {
            attachment,
            ifindex,
        },
    );
    reconcile(core, pods);
    match core.interfaces.status.get(&interface) {
        Some(status) if status.enforcing => Response::ok(serde_json::json!({
            "interface": status,
        })),
        Some(status) => {
            // The pod must not start unenforced; the runtime calls DEL next.
            core.interfaces.cni.remove(&container_id);
            Response::error(
                format!("interface {interface} does not enforce"),
                status
                    .hooks
                    .iter()
                    .filter(|(_, state)| *state != ENFORCING)
                    .map(|(hook, state)| format!("{hook}: {state}"))
                    .collect(),
            )
        }
        None => {
            core.interfaces.cni.remove(&container_id);
            Response::error(
                format!("interface {interface} was not taken up (a configured interface?)"),
                vec![],
            )
        }
    }
}

/// The CNI plugin's DEL: forget the container's veth (idempotent). Its programs go
/// with it when the veth is deleted; while it exists and its pod is on this node,
/// the scans keep it enforced.
pub fn pod_network_deleted(
    core: &mut AgentCore,
    pods: Option<&BTreeMap<IpAddr, String>>,
    container_id: &str,
) -> crate::api::Response {
    if let Some(reported) = core.interfaces.cni.remove(container_id) {
        tracing::info!(
            interface = reported.attachment.interface,
            container = container_id,
            "CNI DEL"
        );
        reconcile(core, pods);
    }
    crate::api::Response::ok(serde_json::Value::Null)
}

/// The CNI plugin's CHECK: an error unless the container's veth enforces now. The
/// last interface check's word is not enough (a link may have been detached since,
/// and the next check may be up to `interfaceScanMs` away): each hook's pinned link
/// is asked of the kernel. Nothing is repaired here; the next check does that.
pub fn pod_network_check(
    core: &AgentCore,
    container_id: &str,
    interface: &str,
) -> crate::api::Response {
    use crate::api::Response;
    let Some(status) = core.interfaces.status.get(interface) else {
        return Response::error(
            format!(
                "interface {interface} of container {container_id} is not enforced by the agent"
            ),
            vec![],
        );
    };
    let mode = core
        .config
        .interfaces
        .iter()
        .find(|configured| configured.name == interface)
        .map_or(AttachMode::Tc, |configured| configured.attach);
    let problems: Vec<String> = mode
        .points()
        .into_iter()
        .filter_map(|point| {
            let hook = point.name();
            if let Some(state) = status.hooks.get(hook).filter(|state| *state != ENFORCING) {
                return Some(format!("{hook}: {state}"));
            }
            match core.enforcer.datapath.link_state(interface, point) {
                PinnedLinkState::Live { .. } => None,
                PinnedLinkState::NotPinned => Some(format!("{hook}: no program attached")),
                PinnedLinkState::Stale(reason) => Some(format!("{hook}: {reason}")),
            }
        })
        .collect();
    if problems.is_empty() {
        Response::ok(serde_json::json!({"interface": status}))
    } else {
        Response::error(
            format!("interface {interface} of container {container_id} does not enforce"),
            problems,
        )
    }
}

/// The CNI plugin's GC (CNI 1.1): forget the veths reported for containers the
/// runtime no longer has (their DEL was lost). Answers the container ids forgotten.
pub fn pod_network_garbage_collect(
    core: &mut AgentCore,
    pods: Option<&BTreeMap<IpAddr, String>>,
    valid_container_ids: &BTreeSet<String>,
) -> crate::api::Response {
    let stale: Vec<String> = core
        .interfaces
        .cni
        .keys()
        .filter(|container| !valid_container_ids.contains(*container))
        .cloned()
        .collect();
    for container in &stale {
        if let Some(reported) = core.interfaces.cni.remove(container) {
            tracing::info!(
                interface = reported.attachment.interface,
                container,
                "CNI GC: the runtime no longer has the container; forgotten"
            );
        }
    }
    if !stale.is_empty() {
        reconcile(core, pods);
    }
    crate::api::Response::ok(serde_json::json!({ "forgotten": stale }))
}

/// Forgets the CNI plugin's reports whose veth is gone, or was deleted and made
/// again (another index): their DEL may never come (a runtime that lost it), and
/// a name that is no longer the reported veth must not keep the old addresses.
fn forget_gone_cni_veths(cni: &mut BTreeMap<String, CniReported>) {
    cni.retain(|container, reported| {
        let now = links::ifindex(&reported.attachment.interface);
        let same = now == Some(reported.ifindex);
        if !same {
            tracing::info!(
                interface = reported.attachment.interface,
                container,
                "the veth the CNI plugin reported is gone; forgotten"
            );
        }
        same
    });
}

/// Makes `point` on `name` enforce with the program of `role`; `enforcing`, or why
/// it does not.
fn attach_one(
    core: &mut AgentCore,
    name: &str,
    point: AttachPoint,
    ifindex: Option<u32>,
    role: ProgramRole,
) -> String {
    if ifindex.is_none() {
        return format!("interface {name} does not exist");
    }
    match core.enforcer.datapath.ensure_attached(name, point, role) {
        // Just checked against the kernel.
        Ok(AttachOutcome::Adopted) => return ENFORCING.to_owned(),
        Ok(AttachOutcome::Attached) => {
            tracing::info!(interface = name, hook = point.name(), "attached");
        }
        Ok(AttachOutcome::Upgraded) => {
            tracing::info!(
                interface = name,
                hook = point.name(),
                role = ?role,
                "replaced the program of the pinned link (another version, or held <-> judging)"
            );
        }
        Ok(AttachOutcome::MovedFirst(ahead)) => {
            tracing::warn!(
                interface = name,
                hook = point.name(),
                "other programs ({ahead:?}) had been attached ahead of microseg's and could have ended the chain unjudged; attached first again"
            );
        }
        Ok(AttachOutcome::Replaced(reason)) => {
            tracing::warn!(
                interface = name,
                hook = point.name(),
                "the pinned link enforced nothing ({reason}); attached anew"
            );
        }
        Err(e) => return e.to_string(),
    }
    // A new link: confirm with the kernel that it is live on this interface.
    match core.enforcer.datapath.link_state(name, point) {
        PinnedLinkState::Live { .. } | PinnedLinkState::NotPinned => ENFORCING.to_owned(),
        PinnedLinkState::Stale(reason) => reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySetBuilder;

    fn set(text: &str) -> PolicySet {
        let mut builder = PolicySetBuilder::new();
        builder.add_text(std::path::Path::new("t.yaml"), text);
        builder.finish().expect("valid")
    }

    /// The bindings with `claimed` read from the set's workloads, as the enforcer's
    /// store index answers it.
    fn bound(facts: &InterfaceFacts, set: &PolicySet) -> Bindings {
        let claimed: BTreeMap<&str, String> = set
            .workloads
            .iter()
            .filter_map(|w| Some((w.interface.as_deref()?, w.key())))
            .collect();
        facts.bindings_claimed(set, &|name| claimed.get(name).cloned())
    }

    const WORKLOADS: &str = "apiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {name: vm, namespace: n}\nspec: {addresses: [10.0.0.7], interface: tap7}\n---\napiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {name: pod, namespace: n}\nspec: {addresses: [10.0.0.8]}\n";

    #[test]
    fn an_interface_is_bound_to_the_workload_naming_it_or_owning_its_peer() {
        let set = set(WORKLOADS);
        let mut facts = InterfaceFacts::default();
        facts.interfaces.insert("tap7".into(), (7, BindRule::Named));
        facts
            .interfaces
            .insert("veth8".into(), (8, BindRule::NamedOrPeer));
        facts.interfaces.insert("eth0".into(), (2, BindRule::Named));
        facts
            .peers
            .insert("veth8".into(), ["10.0.0.8".parse().unwrap()].into());
        let bindings = bound(&facts, &set);
        assert_eq!(
            bindings.workloads,
            [(7, "n/vm".to_owned()), (8, "n/pod".to_owned())].into()
        );
        assert!(bindings.awaiting_policy.is_empty());
        // The enforcer's path: the object store's index of named interfaces gives
        // what reading every workload of the set gives.
        let objects = crate::objects::parse_objects("t.yaml", WORKLOADS).expect("objects");
        let changes: Vec<crate::objects::ObjectChange> = objects
            .into_iter()
            .map(|(key, object)| (key, Some(object)))
            .collect();
        let mut store = crate::objects::ObjectStore::default();
        store.apply(&changes, &|_, _| false).expect("valid");
        let indexed = facts.bindings_claimed(store.set(), &|name| {
            store.interface_owner(name).map(str::to_owned)
        });
        assert_eq!(indexed, bindings);
        // Discovery off for an interface: its peer's addresses do not bind it.
        facts
            .interfaces
            .insert("veth8".into(), (8, BindRule::Named));
        assert_eq!(bound(&facts, &set).workloads.len(), 1);
    }

    #[test]
    fn a_pod_interface_whose_pod_is_unknown_or_ambiguous_awaits_policy() {
        let set = set(
            "apiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {name: a, namespace: n}\nspec: {addresses: [10.0.0.1]}\n---\napiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {name: b, namespace: n}\nspec: {addresses: [10.0.0.2]}\n",
        );
        let mut facts = InterfaceFacts::default();
        for (name, ifindex) in [("known", 1), ("sandbox", 2), ("both", 3), ("config", 4)] {
            let rule = if name == "config" {
                BindRule::NamedOrPeer
            } else {
                BindRule::Pod
            };
            facts.interfaces.insert(name.into(), (ifindex, rule));
        }
        let address = |a: &str| -> IpAddr { a.parse().unwrap() };
        facts
            .peers
            .insert("known".into(), [address("10.0.0.1")].into());
        // A sandbox whose address no pod has (yet).
        facts
            .peers
            .insert("sandbox".into(), [address("10.0.0.9")].into());
        facts.peers.insert(
            "both".into(),
            [address("10.0.0.1"), address("10.0.0.2")].into(),
        );
        // A configured veth without an owner stays unbound (judged by policy alone).
        facts
            .peers
            .insert("config".into(), [address("10.0.0.9")].into());
        let bindings = bound(&facts, &set);
        assert_eq!(bindings.workloads, [(1, "n/a".to_owned())].into());
        assert_eq!(bindings.awaiting_policy, [2, 3].into());
    }
}
