//! The enforced state: object changes in, validated and compiled policy out, written
//! to the data path as one atomic generation. Anything invalid is refused whole and
//! the previous policy stays enforced.
//!
//! A change costs what it touches: the object store converts the changed objects
//! and updates the policy set in place (`objects::ObjectStore`), the compiler works
//! out the entries the change reaches (`policy::compile`), and the data path writes
//! those (`Datapath::apply_changes`). The event names follow the same way.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use microseg_common::{
    endpoint::ENDPOINT_FLAG_AUDIT,
    interface::{InterfaceBinding, MAX_BOUND_ADDRESSES},
};

use super::interfaces::{Bindings, InterfaceFacts};
use crate::objects::{ObjectChange, ObjectKey, ObjectStore, StoredObject};
use crate::{
    datapath::{ApplyReport, Datapath, DatapathState, StateDiff, addr::to_mapped},
    event_view::EventNames,
    policy::{Compiled, Compiler, CompilerCounters, PolicySet, RefusedPolicy},
};

/// Why an apply was refused. Nothing was changed.
#[derive(Debug)]
pub struct ApplyRefused {
    pub summary: String,
    pub details: Vec<String>,
}

/// What the data path enforces now, and how to name what it reports.
pub struct Enforced {
    pub generation: u32,
    pub names: Arc<EventNames>,
}

pub struct Enforcer {
    pub datapath: Datapath,
    /// What both generation slots of the maps hold.
    current: DatapathState,
    /// The maps may hold something other than `current` says plus the compiler's
    /// changes (at start: what was pinned; after an update the data path refused):
    /// the next update compares the whole desired state with `current`.
    diverged: bool,
    /// The objects enforced, converted, and the policy set they make.
    store: ObjectStore,
    /// Keeps ids, identities, selectors and endpoints from one update to the next.
    compiler: Compiler,
    /// The event names, kept up to date with each update (published as snapshots).
    names: EventNames,
    /// Audit switches as enforced (workload -> on).
    audit: BTreeMap<String, bool>,
    /// What the agent knows of its interfaces (`agent::interfaces`), from which
    /// every generation's bindings are derived with its policy set.
    interface_facts: InterfaceFacts,
    /// Interfaces bound to a workload in the live generation (ifindex ->
    /// `namespace/name`).
    bindings: Bindings,
    /// Why the bindings the interface facts call for are not in force, while they
    /// are not: the switch that carried them failed. It is tried again at every
    /// interface check, and meanwhile the interfaces they would bind are held
    /// ([`Enforcer::unwritten_bindings`]).
    pub binding_error: Option<String>,
    /// Why the standby generation slot lags the live one, if it does (it is
    /// repaired before the next update).
    pub standby_error: Option<String>,
    pub enforced: Option<Enforced>,
    pub default_audit: bool,
    pub last_apply: Option<Duration>,
    pub applies_ok: u64,
    pub applies_failed: u64,
    pub apply_latency: LatencyHistogram,
    /// Map entries written by all applies (per generation slot), and by the last.
    pub entries_written: u64,
    pub last_apply_entries: usize,
    /// Addresses whose flows are to be judged again (see
    /// `policy::CompiledChanges::stale_addresses`), for the conntrack janitor.
    stale_addresses: std::collections::BTreeSet<std::net::IpAddr>,
    /// Told after each switch whose old slot is still to be rewritten (see
    /// [`Enforcer::finish_standby`]).
    standby_due: std::sync::Arc<tokio::sync::Notify>,
}

/// Bucket bounds of the apply latency histogram, in seconds.
pub const APPLY_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// A Prometheus histogram: cumulative counts per bucket, count and sum.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram {
    pub buckets: [u64; APPLY_BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

impl LatencyHistogram {
    pub fn observe(&mut self, seconds: f64) {
        for (bucket, bound) in self.buckets.iter_mut().zip(APPLY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }
}

impl Enforcer {
    /// Takes over a loaded data path whose maps hold `current` (adopted from pins),
    /// compiling with `compiler` (a node's, in Kubernetes mode).
    pub fn new(
        datapath: Datapath,
        current: DatapathState,
        default_audit: bool,
        compiler: Compiler,
    ) -> Self {
        Self {
            datapath,
            current,
            diverged: true,
            store: ObjectStore::default(),
            compiler,
            names: EventNames::default(),
            audit: BTreeMap::new(),
            interface_facts: InterfaceFacts::default(),
            bindings: Bindings::default(),
            binding_error: None,
            standby_error: None,
            enforced: None,
            default_audit,
            last_apply: None,
            applies_ok: 0,
            applies_failed: 0,
            apply_latency: LatencyHistogram::default(),
            entries_written: 0,
            last_apply_entries: 0,
            stale_addresses: std::collections::BTreeSet::new(),
            standby_due: std::sync::Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Notified after each switch whose old slot is still to be rewritten.
    pub fn standby_due(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.standby_due.clone()
    }

    /// The addresses whose recorded flows are to be judged again, since the last
    /// call.
    pub fn take_stale_addresses(&mut self) -> std::collections::BTreeSet<std::net::IpAddr> {
        std::mem::take(&mut self.stale_addresses)
    }

    /// The enforced policy set.
    pub fn set(&self) -> &PolicySet {
        self.store.set()
    }

    /// The object enforced under `key`, and whether it was read leniently (a
    /// refused policy enforced as its fail-closed substitute).
    pub fn held(&self, key: &ObjectKey) -> Option<(StoredObject, bool)> {
        self.store.object_and_leniency(key)
    }

    /// The compiled state and tables (a copy, for `get` and `describe`).
    pub fn compiled(&self) -> Compiled {
        self.compiler.compiled()
    }

    pub fn compiler_counters(&self) -> CompilerCounters {
        self.compiler.counters
    }

    /// Validates, compiles and enforces `changes` (objects added, replaced or
    /// removed) with per-workload audit switches, or refuses them whole. Policies
    /// `fail_closed` picks are enforced as their fail-closed substitutes if the
    /// loader refuses them (see `objects::ObjectStore::apply`).
    pub fn apply(
        &mut self,
        changes: &[ObjectChange],
        audit: &BTreeMap<String, bool>,
        fail_closed: &dyn Fn(&ObjectKey, &StoredObject) -> bool,
    ) -> Result<ApplyReport, ApplyRefused> {
        let started = Instant::now();
        let full_compiles = self.compiler.counters.full_compiles;
        let result = self.try_apply(changes, audit, fail_closed);
        match &result {
            Ok(report) => {
                // Only after work that freed much: trimming walks the whole heap,
                // which at 50,000 cluster pods costs more than a pod's change.
                if changes.len() >= TRIM_AFTER_CHANGES
                    || self.compiler.counters.full_compiles != full_compiles
                {
                    return_free_memory();
                }
                self.applies_ok += 1;
                self.entries_written += report.changes as u64;
                self.last_apply_entries = report.changes;
                let elapsed = started.elapsed();
                self.last_apply = Some(elapsed);
                self.apply_latency.observe(elapsed.as_secs_f64());
            }
            Err(_) => self.applies_failed += 1,
        }
        result
    }

    fn try_apply(
        &mut self,
        changes: &[ObjectChange],
        audit: &BTreeMap<String, bool>,
        fail_closed: &dyn Fn(&ObjectKey, &StoredObject) -> bool,
    ) -> Result<ApplyReport, ApplyRefused> {
        let undo = self.store.undo_of(changes);
        let refused_before = self.set().refused_policies.clone();
        let set_changes = self.store.apply(changes, fail_closed).map_err(|errors| ApplyRefused {
            summary: format!(
                "the policy set is invalid ({} error{}); nothing was applied and the previous policy stays enforced",
                errors.errors.len(),
                if errors.errors.len() == 1 { "" } else { "s" }
            ),
            details: errors.errors.iter().map(ToString::to_string).collect(),
        })?;
        let compiled = self.compiler.update(self.store.set(), &set_changes);
        // Slots handed out anew start from zero, whatever they counted before; zeroed
        // even if the update then fails, since the compiler keeps them.
        let fresh = self.compiler.fresh_hit_slots();
        if let Err(e) = self.datapath.reset_rule_hits(&fresh) {
            tracing::warn!("zeroing rule hit counters: {e}");
        }
        let bindings = self.current_bindings();
        let (revokes, stale_addresses) = (compiled.revokes, compiled.stale_addresses);
        let changed_identities = identity_changes(&compiled.endpoints, &compiled.peer_hosts);
        let mut diff = StateDiff {
            endpoints: compiled.endpoints,
            peer_hosts: compiled.peer_hosts,
            peer_prefixes: compiled.peer_prefixes,
            policy: compiled.policy,
            interfaces: BTreeMap::new(),
        };
        self.add_audit(&mut diff, audit);
        self.add_bindings(&mut diff, &bindings);
        match self.switch(diff, revokes) {
            Ok(report) => {
                self.stale_addresses.extend(stale_addresses);
                self.audit = audit.clone();
                self.bindings = bindings;
                self.binding_error = None;
                log_refusals(&refused_before, &self.store.set().refused_policies);
                self.names.update(
                    self.store.set(),
                    &set_changes,
                    &self.compiler,
                    &changed_identities,
                );
                self.publish(report.generation);
                Ok(report)
            }
            Err(refused) => {
                // Back to what the maps hold: the objects as they were, compiled
                // again; the maps are compared whole at the next update.
                if self.store.apply(&undo, fail_closed).is_ok() {
                    let back = self.store.set();
                    let touched = self.compiler.update(back, &set_changes);
                    let undone = identity_changes(&touched.endpoints, &touched.peer_hosts);
                    self.names
                        .update(back, &set_changes, &self.compiler, &undone);
                }
                self.diverged = true;
                Err(refused)
            }
        }
    }

    /// Writes `diff` as the next generation: the changes, or (when the maps may
    /// hold something else) the whole desired state compared with what they hold.
    /// Once switched, it is what the agent believes enforced, even if the standby
    /// slot could not follow.
    fn switch(&mut self, diff: StateDiff, revokes: bool) -> Result<ApplyReport, ApplyRefused> {
        // Compared whole, the maps may lose anything: every flow is judged again.
        let (diff, revokes) = if self.diverged {
            (self.whole_diff(&diff), true)
        } else {
            (diff, revokes)
        };
        let report = self
            .datapath
            .apply_changes(&mut self.current, &diff, revokes)
            .map_err(|e| ApplyRefused {
                summary: format!("the data path refused the update: {e}"),
                details: Vec::new(),
            })?;
        self.diverged = false;
        // The update brought the standby slot up before writing into it.
        self.standby_error = None;
        if self.datapath.standby_pending() {
            self.standby_due.notify_one();
        }
        Ok(report)
    }

    /// Rewrites the old generation slot after the last switch (see
    /// `Datapath::finish_standby`), off the path to enforcement: the standby
    /// writer task calls it once a grace period has passed, and the next update
    /// does it first if the writer has not. A failure is reported (`status`, the
    /// log) and the slot repaired from the live one, now or before the next update.
    pub fn finish_standby(&mut self) {
        let Err(error) = self.datapath.finish_standby() else {
            return;
        };
        tracing::error!(
            "{error}; the new generation is live, the standby slot is repaired before the next update"
        );
        // Try at once; if it fails again, the next update retries first.
        self.standby_error = match self.datapath.repair_standby() {
            Ok(()) => None,
            Err(_) => Some(error.to_string()),
        };
    }

    /// The grace period the old slot's rewrite waits for, if one is pending (see
    /// `Datapath::pending_grace`).
    pub fn pending_grace(
        &self,
    ) -> Option<(std::sync::Arc<crate::datapath::grace::GracePeriod>, u64)> {
        self.datapath.pending_grace()
    }

    pub fn grace_passed(&mut self, switch: u64) {
        self.datapath.grace_passed(switch);
    }

    pub fn standby_pending(&self) -> bool {
        self.datapath.standby_pending()
    }

    /// Every difference between what the maps hold (`current`) and the whole
    /// desired state (the compiler's, with audit flags and bindings: `diff`'s
    /// endpoints and interfaces as the last word where it has them).
    fn whole_diff(&self, diff: &StateDiff) -> StateDiff {
        let desired = self.compiler.state();
        let mut endpoints: BTreeMap<_, _> = desired
            .endpoints
            .iter()
            .map(|(address, info)| (*address, Some(self.with_audit(*info, &self.audit))))
            .collect();
        endpoints.extend(diff.endpoints.iter().map(|(a, v)| (*a, *v)));
        let mut interfaces: BTreeMap<_, _> = self
            .current
            .interfaces
            .iter()
            .map(|(ifindex, binding)| (*ifindex, Some(*binding)))
            .collect();
        interfaces.extend(diff.interfaces.iter().map(|(i, v)| (*i, *v)));
        let want = DatapathState {
            endpoints: endpoints
                .into_iter()
                .filter_map(|(a, v)| Some((a, v?)))
                .collect(),
            peer_hosts: desired.peer_hosts.clone(),
            peer_prefixes: desired.peer_prefixes.clone(),
            policy: desired.policy.clone(),
            interfaces: interfaces
                .into_iter()
                .filter_map(|(i, v)| Some((i, v?)))
                .collect(),
        };
        StateDiff::between(&self.current, &want)
    }

    /// `info` with its workload's audit flag.
    fn with_audit(
        &self,
        mut info: microseg_common::endpoint::EndpointInfo,
        audit: &BTreeMap<String, bool>,
    ) -> microseg_common::endpoint::EndpointInfo {
        let workload = self
            .compiler
            .endpoint_table()
            .get(&info.endpoint_id)
            .map(|e| e.workload.as_str())
            .unwrap_or_default();
        if audit.get(workload).copied().unwrap_or(self.default_audit) {
            info.flags |= ENDPOINT_FLAG_AUDIT;
        } else {
            info.flags &= !ENDPOINT_FLAG_AUDIT;
        }
        info
    }

    /// Adds audit flags to the endpoints `diff` writes, and writes again the
    /// endpoints of workloads whose switch changed.
    fn add_audit(&self, diff: &mut StateDiff, audit: &BTreeMap<String, bool>) {
        for info in diff.endpoints.values_mut().flatten() {
            *info = self.with_audit(*info, audit);
        }
        let switched: Vec<&String> = audit
            .keys()
            .chain(self.audit.keys())
            .filter(|workload| audit.get(*workload) != self.audit.get(*workload))
            .collect();
        for key in switched {
            let Some(workload) = self.store.set().workload_by_key(key) else {
                continue;
            };
            for address in &workload.addresses {
                if diff.endpoints.contains_key(address) {
                    continue;
                }
                if let Some(info) = self.compiler.state().endpoints.get(address) {
                    diff.endpoints
                        .insert(*address, Some(self.with_audit(*info, audit)));
                }
            }
        }
    }

    /// Adds to `diff` the interface bindings that differ from those in force.
    fn add_bindings(&self, diff: &mut StateDiff, bindings: &Bindings) {
        let wanted = interface_bindings(self.store.set(), bindings);
        for (ifindex, binding) in &wanted {
            if self.current.interfaces.get(ifindex) != Some(binding) {
                diff.interfaces.insert(*ifindex, Some(*binding));
            }
        }
        for ifindex in self.current.interfaces.keys() {
            if !wanted.contains_key(ifindex) {
                diff.interfaces.insert(*ifindex, None);
            }
        }
    }

    /// The bindings the interface facts give under the enforced set.
    fn current_bindings(&self) -> Bindings {
        let store = &self.store;
        self.interface_facts.bindings_claimed(store.set(), &|name| {
            store.interface_owner(name).map(str::to_owned)
        })
    }

    /// Publishes the event names of the live generation.
    fn publish(&mut self, generation: u32) {
        self.enforced = Some(Enforced {
            generation,
            names: Arc::new(self.names.clone()),
        });
    }

    /// The interface bindings in force.
    pub fn bindings(&self) -> &Bindings {
        &self.bindings
    }

    /// Takes what the agent now knows of its interfaces; if that changes which
    /// interface is bound to which workload, the new bindings are enforced as the
    /// next generation, with the policy unchanged. Bindings that could not be
    /// written are tried again at every call until they are, even when the facts
    /// did not change.
    pub fn set_interface_facts(
        &mut self,
        facts: InterfaceFacts,
    ) -> Result<Option<ApplyReport>, ApplyRefused> {
        if facts == self.interface_facts && self.binding_error.is_none() {
            return Ok(None);
        }
        self.interface_facts = facts;
        if self.enforced.is_none() {
            // Nothing enforced yet: the bindings go with the first generation.
            return Ok(None);
        }
        let bindings = self.current_bindings();
        if bindings == self.bindings {
            self.binding_error = None;
            return Ok(None);
        }
        let mut diff = StateDiff::default();
        self.add_bindings(&mut diff, &bindings);
        let switched = if crate::fault::fails_at("binding-write") {
            Err(ApplyRefused {
                summary: "the data path refused the update: injected fault (binding-write)"
                    .to_owned(),
                details: Vec::new(),
            })
        } else {
            self.switch(diff, false)
        };
        let report = match switched {
            Ok(report) => report,
            Err(refused) => {
                self.binding_error = Some(refused.summary.clone());
                return Err(refused);
            }
        };
        self.bindings = bindings;
        self.binding_error = None;
        if let Some(enforced) = &mut self.enforced {
            enforced.generation = report.generation;
        }
        Ok(Some(report))
    }

    /// Interfaces (ifindex) that the facts say should be bound, to a workload or
    /// awaiting policy, and that the maps hold no binding for: their binding could
    /// not be written yet (or nothing is enforced yet). They must not run the
    /// decision unbound, which would judge a pod's traffic without source
    /// validation, or not at all while its pod is unknown: they are held
    /// (`ProgramRole::Hold`) until their binding is in the maps.
    pub fn unwritten_bindings(&self) -> std::collections::BTreeSet<u32> {
        let wanted = self.current_bindings();
        wanted
            .workloads
            .keys()
            .chain(&wanted.awaiting_policy)
            .filter(|ifindex| !self.current.interfaces.contains_key(ifindex))
            .copied()
            .collect()
    }

    pub fn current_state(&self) -> &DatapathState {
        &self.current
    }

    /// The compiler's ids and hit slots, to keep across a restart
    /// (`agent::ids_file`).
    pub fn saved_ids(&self) -> crate::policy::SavedIds {
        self.compiler.saved_ids()
    }

    /// Where the compiler's ids stand (changes when they do).
    pub fn ids_revision(&self) -> crate::policy::IdsRevision {
        self.compiler.ids_revision()
    }
}

/// Logs policies newly refused (enforced as their fail-closed substitutes) and
/// those enforced as written again.
fn log_refusals(before: &[RefusedPolicy], now: &[RefusedPolicy]) {
    for refused in now.iter().filter(|r| !before.contains(r)) {
        tracing::error!(
            policy = refused.key(),
            "refused ({}); enforced instead as {}",
            refused.reasons.join("; "),
            refused.enforced_as
        );
    }
    for accepted in before
        .iter()
        .filter(|b| !now.iter().any(|n| n.key() == b.key()))
    {
        tracing::info!(
            policy = accepted.key(),
            "no longer refused: enforced as written, or gone"
        );
    }
}

/// A batch of at least this many changes (a sync, a re-list) frees enough to be
/// worth giving back to the kernel.
const TRIM_AFTER_CHANGES: usize = 256;

/// Gives the memory the compile freed back to the kernel. glibc keeps freed heap
/// for reuse; a compile's temporary structures would otherwise stay in the agent's
/// resident set at their peak size until the next compile.
fn return_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The data path's bindings: each bound interface with its workload's addresses,
/// and each interface awaiting policy. A workload no longer in the inventory leaves
/// its interface unbound; one with more addresses than a binding holds keeps the
/// first ones (its other addresses are then refused as sources: the safe side).
fn interface_bindings(set: &PolicySet, bindings: &Bindings) -> BTreeMap<u32, InterfaceBinding> {
    let mut out: BTreeMap<u32, InterfaceBinding> = bindings
        .awaiting_policy
        .iter()
        .map(|ifindex| (*ifindex, InterfaceBinding::awaiting_policy()))
        .collect();
    for (ifindex, key) in &bindings.workloads {
        let Some((namespace, name)) = key.split_once('/') else {
            continue;
        };
        let Some(workload) = set.workload(namespace, name) else {
            continue;
        };
        let addresses: Vec<[u8; 16]> = workload
            .addresses
            .iter()
            .take(MAX_BOUND_ADDRESSES)
            .map(|address| to_mapped(*address))
            .collect();
        if let Some(binding) = InterfaceBinding::new(&addresses) {
            out.insert(*ifindex, binding);
        }
    }
    out
}

/// The objects of a kind, for `get`.
pub fn objects_of_kind<'a>(
    objects: &'a crate::objects::ObjectMap,
    kind: &'a str,
) -> impl Iterator<Item = (&'a ObjectKey, &'a StoredObject)> {
    objects.iter().filter(move |(key, _)| key.kind == kind)
}

/// The addresses whose endpoint or identity an update changed: where the event
/// names' local identities may have changed.
fn identity_changes<E, I>(
    endpoints: &BTreeMap<std::net::IpAddr, Option<E>>,
    peer_hosts: &BTreeMap<std::net::IpAddr, Option<I>>,
) -> Vec<std::net::IpAddr> {
    let mut addresses: Vec<std::net::IpAddr> =
        endpoints.keys().chain(peer_hosts.keys()).copied().collect();
    addresses.sort_unstable();
    addresses.dedup();
    addresses
}
