//! The enforced state: objects in, validated and compiled policy out, written to the
//! data path as one atomic generation. Anything invalid is refused whole and the
//! previous policy stays enforced.

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
use crate::objects::{
    ConversionCache, ObjectKey, ObjectMap, StoredObject, build_policy_set_cached,
};
use crate::{
    datapath::{ApplyReport, Datapath, DatapathState, addr::to_mapped},
    event_view::EventNames,
    policy::{Compiled, Compiler, PolicySet, RefusedPolicy},
};

/// Why an apply was refused. Nothing was changed.
#[derive(Debug)]
pub struct ApplyRefused {
    pub summary: String,
    pub details: Vec<String>,
}

/// What the data path enforces now, and how to name what it reports.
pub struct Enforced {
    pub set: PolicySet,
    /// The compiler's tables; its `state` is moved out to the enforcer's current
    /// state ([`Enforcer::current_state`]), which also carries audit flags and
    /// interface bindings.
    pub compiled: Compiled,
    pub generation: u32,
    pub names: Arc<EventNames>,
}

pub struct Enforcer {
    pub datapath: Datapath,
    /// What both generation slots of the maps hold.
    current: DatapathState,
    /// Keeps identity, endpoint and rule ids from one compile to the next, so that
    /// an update writes only the entries its change affects.
    compiler: Compiler,
    /// Each object's conversion from the last build: only changed objects are read
    /// again.
    conversions: ConversionCache,
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
            compiler,
            conversions: ConversionCache::default(),
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
        }
    }

    /// Validates, compiles and enforces `objects` (with per-workload audit switches),
    /// or refuses them whole. Policies `fail_closed` picks are enforced as their
    /// fail-closed substitutes if the loader refuses them (see
    /// `objects::build_policy_set_cached`).
    pub fn apply(
        &mut self,
        objects: &ObjectMap,
        audit: &BTreeMap<String, bool>,
        fail_closed: &dyn Fn(&ObjectKey, &StoredObject) -> bool,
    ) -> Result<ApplyReport, ApplyRefused> {
        let started = Instant::now();
        let result = self.try_apply(objects.iter(), audit, fail_closed);
        match &result {
            Ok(report) => {
                return_free_memory();
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

    fn try_apply<'a>(
        &mut self,
        objects: impl IntoIterator<Item = (&'a ObjectKey, &'a StoredObject)>,
        audit: &BTreeMap<String, bool>,
        fail_closed: &dyn Fn(&ObjectKey, &StoredObject) -> bool,
    ) -> Result<ApplyReport, ApplyRefused> {
        let set = build_policy_set_cached(objects, &mut self.conversions, fail_closed).map_err(|errors| ApplyRefused {
            summary: format!(
                "the policy set is invalid ({} error{}); nothing was applied and the previous policy stays enforced",
                errors.errors.len(),
                if errors.errors.len() == 1 { "" } else { "s" }
            ),
            details: errors.errors.iter().map(ToString::to_string).collect(),
        })?;
        let mut compiled = self.compiler.compile(&set);
        // Slots handed out anew start from zero, whatever they counted before; zeroed
        // even if the update then fails, since the next compile keeps them.
        if let Err(e) = self.datapath.reset_rule_hits(&compiled.hit_slots.fresh) {
            tracing::warn!("zeroing rule hit counters: {e}");
        }
        // The state moves to the data path side (`current`): one copy, not two.
        let mut state = std::mem::take(&mut compiled.state);
        self.add_audit_flags(&compiled, &mut state, audit);
        let bindings = self.interface_facts.bindings(&set);
        state.interfaces = interface_bindings(&set, &bindings);
        let report = self.switch_to(state)?;
        self.bindings = bindings;
        self.binding_error = None;
        log_refusals(
            self.enforced
                .as_ref()
                .map_or(&[][..], |e| &e.set.refused_policies),
            &set.refused_policies,
        );
        let names = Arc::new(EventNames::of(&set, &compiled));
        self.enforced = Some(Enforced {
            set,
            compiled,
            generation: report.generation,
            names,
        });
        Ok(report)
    }

    /// Writes `state` as the next generation; once switched, it is what the agent
    /// believes enforced, even if the standby slot could not follow.
    fn switch_to(&mut self, state: DatapathState) -> Result<ApplyReport, ApplyRefused> {
        let report = self
            .datapath
            .apply(&self.current, &state)
            .map_err(|e| ApplyRefused {
                summary: format!("the data path refused the update: {e}"),
                details: Vec::new(),
            })?;
        self.current = state;
        if let Some(error) = &report.standby_error {
            tracing::error!(
                "{error}; the new generation is live, the standby slot is repaired before the next update"
            );
            // Try at once; if it fails again, the next update retries first.
            if self.datapath.repair_standby().is_ok() {
                self.standby_error = None;
            } else {
                self.standby_error = Some(error.clone());
            }
        } else {
            self.standby_error = None;
        }
        Ok(report)
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
        let Some(enforced) = &self.enforced else {
            // Nothing enforced yet: the bindings go with the first generation.
            return Ok(None);
        };
        let bindings = self.interface_facts.bindings(&enforced.set);
        if bindings == self.bindings {
            self.binding_error = None;
            return Ok(None);
        }
        let mut state = self.current.clone();
        state.interfaces = interface_bindings(&enforced.set, &bindings);
        let switched = if crate::fault::fails_at("binding-write") {
            Err(ApplyRefused {
                summary: "the data path refused the update: injected fault (binding-write)"
                    .to_owned(),
                details: Vec::new(),
            })
        } else {
            self.switch_to(state)
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
        let empty = PolicySet::default();
        let set = self
            .enforced
            .as_ref()
            .map_or(&empty, |enforced| &enforced.set);
        let wanted = self.interface_facts.bindings(set);
        wanted
            .workloads
            .keys()
            .chain(&wanted.awaiting_policy)
            .filter(|ifindex| !self.current.interfaces.contains_key(ifindex))
            .copied()
            .collect()
    }

    fn add_audit_flags(
        &self,
        compiled: &Compiled,
        state: &mut DatapathState,
        audit: &BTreeMap<String, bool>,
    ) {
        for info in state.endpoints.values_mut() {
            let workload = compiled
                .endpoints
                .get(&info.endpoint_id)
                .map(|e| e.workload.as_str())
                .unwrap_or_default();
            if audit.get(workload).copied().unwrap_or(self.default_audit) {
                info.flags |= ENDPOINT_FLAG_AUDIT;
            }
        }
    }

    pub fn current_state(&self) -> &DatapathState {
        &self.current
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
    objects: &'a ObjectMap,
    kind: &'a str,
) -> impl Iterator<Item = (&'a ObjectKey, &'a StoredObject)> {
    objects.iter().filter(move |(key, _)| key.kind == kind)
}
