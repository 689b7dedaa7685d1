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
    veths::VethScanner,
};
use crate::{
    datapath::{
        AttachPoint,
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
            status: BTreeMap::new(),
            pod_interfaces,
        }
    }

    /// Interfaces that should enforce and do not.
    pub fn problems(&self) -> Vec<String> {
        self.status
            .values()
            .filter(|status| !status.enforcing)
            .flat_map(|status| {
                status
                    .hooks
                    .iter()
                    .filter(|(_, state)| *state != ENFORCING)
                    .map(move |(hook, state)| format!("{} {hook}: {state}", status.name))
            })
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

/// Looks for veths (when something needs them) without holding the agent's lock.
async fn scan_veths(scanner: VethScanner, needed: bool) -> (VethScanner, BTreeMap<IpAddr, String>) {
    if !needed {
        return (scanner, BTreeMap::new());
    }
    let mut scanner = scanner;
    let (scanner, found) = tokio::task::spawn_blocking(move || {
        let found = scanner.scan();
        (scanner, found)
    })
    .await
    .unwrap_or_else(|e| (VethScanner::default(), Err(anyhow::anyhow!("{e}"))));
    match found {
        Ok(found) => (scanner, found),
        Err(e) => {
            tracing::warn!("looking for veths: {e:#}");
            (scanner, BTreeMap::new())
        }
    }
}

/// Checks every interface now, then every `every` and whenever this node's pods
/// change, until the agent stops.
pub async fn run(
    agent: Arc<Agent>,
    every: Duration,
    mut local_pods: tokio::sync::watch::Receiver<Option<LocalPods>>,
    mut scanner: VethScanner,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            changed = local_pods.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        let pods = local_pods.borrow_and_update().clone();
        let needed = pods.is_some() || agent.core.lock().await.config.discover_workload_interfaces;
        let veths;
        (scanner, veths) = scan_veths(scanner, needed).await;
        let mut core = agent.core.lock().await;
        reconcile(&mut core, pods.as_deref(), &veths);
        agent.refresh_names(&core);
    }
}

/// What is known of the interfaces at start, before the first generation is
/// enforced: with it, a restarted agent binds its interfaces exactly as the pinned
/// maps do, and applies no change.
pub async fn facts_at_start(
    core: &AgentCore,
    scanner: VethScanner,
) -> (VethScanner, BTreeMap<IpAddr, String>, InterfaceFacts) {
    let needed = core.config.discover_workload_interfaces || core.config.kubernetes.enabled;
    let (scanner, veths) = scan_veths(scanner, needed).await;
    let wanted = wanted_interfaces(core, None, &veths);
    let facts = InterfaceFacts::gather(&wanted, &veths, core.config.discover_workload_interfaces);
    (scanner, veths, facts)
}

/// Configured interfaces, then pod interfaces: (name, attach mode, origin).
fn wanted_interfaces(
    core: &AgentCore,
    pods: Option<&BTreeMap<IpAddr, String>>,
    veths: &BTreeMap<IpAddr, String>,
) -> Vec<(String, AttachMode, &'static str)> {
    let configured: BTreeSet<&str> = core
        .config
        .interfaces
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    let pod_wanted: BTreeSet<String> = match pods {
        Some(pods) => pods
            .keys()
            .filter_map(|address| veths.get(address))
            .filter(|name| !configured.contains(name.as_str()))
            .cloned()
            .collect(),
        None => core.interfaces.pod_interfaces.clone(),
    };
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

/// What binds interfaces to workloads, as far as it does not depend on the policy
/// set: the interfaces enforced now and what their veth peers hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceFacts {
    /// Name -> (ifindex, whether a veth peer's addresses may bind it).
    pub interfaces: BTreeMap<String, (u32, bool)>,
    /// Veth name -> the addresses its peer holds.
    pub peers: BTreeMap<String, BTreeSet<IpAddr>>,
}

impl InterfaceFacts {
    fn gather(
        wanted: &[(String, AttachMode, &'static str)],
        veths: &BTreeMap<IpAddr, String>,
        discover_configured: bool,
    ) -> Self {
        let mut facts = Self::default();
        for (name, _, origin) in wanted {
            if let Some(ifindex) = links::ifindex(name) {
                let discover = *origin == "pod" || discover_configured;
                facts.interfaces.insert(name.clone(), (ifindex, discover));
            }
        }
        for (address, veth) in veths {
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

    /// ifindex -> `namespace/name`: the workload naming the interface
    /// (`spec.interface`), else the one whose addresses its veth peer holds, if
    /// exactly one.
    pub fn bindings(&self, set: &PolicySet) -> BTreeMap<u32, String> {
        let claimed: BTreeMap<&str, String> = set
            .workloads
            .iter()
            .filter_map(|w| Some((w.interface.as_deref()?, w.key())))
            .collect();
        let mut bindings = BTreeMap::new();
        for (name, (ifindex, discover)) in &self.interfaces {
            let owner = match claimed.get(name.as_str()) {
                Some(workload) => Some(workload.clone()),
                None if *discover => self.discovered_owner(set, name),
                None => None,
            };
            if let Some(workload) = owner {
                bindings.insert(*ifindex, workload);
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
pub fn reconcile(
    core: &mut AgentCore,
    pods: Option<&BTreeMap<IpAddr, String>>,
    veths: &BTreeMap<IpAddr, String>,
) {
    let wanted = wanted_interfaces(core, pods, veths);
    let pod_wanted: BTreeSet<String> = wanted
        .iter()
        .filter(|(_, _, origin)| *origin == "pod")
        .map(|(name, _, _)| name.clone())
        .collect();

    // Bindings first: a new interface never enforces unbound.
    let facts = InterfaceFacts::gather(&wanted, veths, core.config.discover_workload_interfaces);
    match core.enforcer.set_interface_facts(facts) {
        Ok(Some(report)) => {
            tracing::info!(generation = report.generation, "interface bindings changed")
        }
        Ok(None) => {}
        Err(refused) => tracing::error!("binding interfaces: {}", refused.summary),
    }
    let bound_to: BTreeMap<u32, String> = core.enforcer.bindings().clone();

    let mut status = BTreeMap::new();
    for (name, mode, origin) in &wanted {
        let ifindex = links::ifindex(name);
        let mut hooks = BTreeMap::new();
        for point in mode.points() {
            hooks.insert(point.name(), attach_one(core, name, point, ifindex));
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
                workload: ifindex.and_then(|index| bound_to.get(&index).cloned()),
                enforcing,
            },
        );
    }
    if pods.is_some() {
        for left in core.interfaces.pod_interfaces.difference(&pod_wanted) {
            match detach_interface(&core.config.pin_dir, left) {
                Ok(_) => tracing::info!(interface = left, "pod interface left; detached"),
                Err(e) => tracing::warn!("detaching from {left}: {e}"),
            }
        }
        core.interfaces.pod_interfaces = pod_wanted;
    }
    core.interfaces.status = status;
    core.attached = core.interfaces.enforcing_hooks();
}

/// Makes `point` on `name` enforce; `enforcing`, or why it does not.
fn attach_one(
    core: &mut AgentCore,
    name: &str,
    point: AttachPoint,
    ifindex: Option<u32>,
) -> String {
    if ifindex.is_none() {
        return format!("interface {name} does not exist");
    }
    match core.enforcer.datapath.ensure_attached(name, point) {
        // Just checked against the kernel.
        Ok(AttachOutcome::Adopted) => return ENFORCING.to_owned(),
        Ok(AttachOutcome::Attached) => {
            tracing::info!(interface = name, hook = point.name(), "attached");
        }
        Ok(AttachOutcome::Upgraded) => {
            tracing::info!(
                interface = name,
                hook = point.name(),
                "replaced the program of the pinned link with this version's"
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

    #[test]
    fn an_interface_is_bound_to_the_workload_naming_it_or_owning_its_peer() {
        let set = set(
            "apiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {name: vm, namespace: n}\nspec: {addresses: [10.0.0.7], interface: tap7}\n---\napiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {name: pod, namespace: n}\nspec: {addresses: [10.0.0.8]}\n",
        );
        let mut facts = InterfaceFacts::default();
        facts.interfaces.insert("tap7".into(), (7, false));
        facts.interfaces.insert("veth8".into(), (8, true));
        facts.interfaces.insert("eth0".into(), (2, false));
        facts
            .peers
            .insert("veth8".into(), ["10.0.0.8".parse().unwrap()].into());
        let bindings = facts.bindings(&set);
        assert_eq!(
            bindings,
            [(7, "n/vm".to_owned()), (8, "n/pod".to_owned())].into()
        );
        // Discovery off for an interface: its peer's addresses do not bind it.
        facts.interfaces.insert("veth8".into(), (8, false));
        assert_eq!(facts.bindings(&set).len(), 1);
    }
}
