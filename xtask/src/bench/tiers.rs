//! Per-packet cost with ClusterNetworkPolicy tiers in use, beside the cost without
//! (issue 12). The compiler resolves tiers, priorities and actions into the same maps,
//! so a packet still does one policy lookup chain; this measures whether it costs
//! the same.
//!
//! Issue 13 adds a fourth set, `network_policy_only_uncounted`: the NetworkPolicy
//! alone with every rule hit slot 0, so each packet skips the hit counters; beside
//! `network_policy_only` it is what counting rule hits costs.
//!
//! Three policy sets over the same workloads, compiled by microseg's own compiler:
//! - `network_policy_only`: the datapath scenario's NetworkPolicy (the server, in
//!   namespace `bench`, accepts UDP 5001 from the `role=client` pods of `bench`);
//! - `tiers`: the same NetworkPolicy plus ClusterNetworkPolicies whose subject is every
//!   `role=server` pod: Admin priority 10 denies ingress from the quarantined
//!   namespaces (three), Admin 20 accepts monitoring (namespace `monitoring`, UDP
//!   9100), Admin 900 passes namespace `bench` on to the NetworkPolicy tier, and a
//!   Baseline default deny (ingress from every namespace);
//! - `tiers_many_priorities`: `tiers` plus `many` more Admin policies at priorities
//!   100.. (between the Accept and the Pass), one per tenant namespace, cycling
//!   Deny / Accept UDP 7000+i / Pass: an evaluation in order would walk them all
//!   before the Pass that decides the clients' packets.
//!
//! The workloads (all sets): the server (`bench/server`), N clients (`bench/c<i>`, one
//! identity each, as in the datapath scenario), a second server no NetworkPolicy
//! selects (`bench-b/server-b`), one pod in each quarantined namespace, one
//! monitoring pod, and one pod per tenant namespace.
//!
//! The flows, each checked with `microseg::policy::evaluate` (its reason must be the
//! tier's) and by the kernel's verdict at every run:
//! - `established`: client N/2 to the server, UDP 5001, already in conntrack;
//! - `new_allow`: client N/2's new flows to UDP 5001: the NetworkPolicy allows (with
//!   tiers: after the Admin Pass);
//! - `deny`: client N/2 to UDP 5002: the NetworkPolicy's default deny (with tiers: after
//!   the Admin Pass);
//! - `admin_deny`: a quarantined pod to the server, UDP 5001 (Admin Deny; without
//!   tiers the NetworkPolicy's default deny);
//! - `admin_accept`: new flows from the monitoring pod to UDP 9100 (Admin Accept;
//!   without tiers denied by the NetworkPolicy);
//! - `baseline_deny`: client N/2 to `server-b`, UDP 5001 (Admin Pass, no NetworkPolicy,
//!   Baseline Deny; without tiers nothing selects server-b and the packet is not
//!   enforced).
//!
//! Method as in `datapath_cost`: repeated packets (established, the denies) run one
//! frame `hot_repeat` times in one BPF_PROG_TEST_RUN call (floor: the trivial program
//! with the same repeat); new flows (new_allow, admin_accept) run `new_flows` distinct
//! flows of one source, repeat = 1 each, trimmed mean (floor: the trivial program per
//! call). The three sets are loaded side by side (one data path each) and measured in
//! `rounds` interleaved rounds, each round starting one set further on; each figure is
//! the median over the rounds with [min..max], and the ratios are of the medians.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{Context, bail, ensure};
use microseg::{
    datapath::{DatapathState, probe::Probe},
    policy::{
        Flow, FlowVerdict, Labels, PolicySet, PolicySetBuilder, Protocol, RuleAction, Source, Tier,
        VerdictReason, Workload, compile, evaluate,
    },
};
use serde::Serialize;

use crate::{
    datapath_cost::{self, Floors, Loaded, Program},
    floor::{self, HarnessFloor},
    progress::Progress,
    scenario::{self, ALLOWED_PORT, DENIED_PORT, Family, NAMESPACE},
};

/// What to run.
#[derive(Clone, Debug)]
pub struct TiersConfig {
    pub scales: Vec<u32>,
    pub families: Vec<Family>,
    /// Interleaved rounds over the three policy sets.
    pub rounds: usize,
    /// Repeats of one frame for the repeated flows.
    pub hot_repeat: u32,
    /// Distinct flows of one source for the new-flow figures.
    pub new_flows: usize,
    /// Admin policies of the many-priorities set (beside the tiers set's own).
    pub many_priorities: u32,
}

const MONITORING_PORT: u16 = 9100;
const TENANT_PORTS: u16 = 7000;
const QUARANTINED: u32 = 3;
const QUARANTINE_LABEL: &str = "bench.microseg.io/quarantine";
const API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";

/// The policy sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    NetworkPolicyOnly,
    Tiers,
    ManyPriorities,
    /// `NetworkPolicyOnly` with every rule hit slot 0: the same entries, no rule hit
    /// counted (issue 13's cost of counting, side by side).
    Uncounted,
}

impl Variant {
    pub const ALL: [Variant; 4] = [
        Variant::NetworkPolicyOnly,
        Variant::Tiers,
        Variant::ManyPriorities,
        Variant::Uncounted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::NetworkPolicyOnly => "network_policy_only",
            Variant::Tiers => "tiers",
            Variant::ManyPriorities => "tiers_many_priorities",
            Variant::Uncounted => "network_policy_only_uncounted",
        }
    }

    fn has_tiers(self) -> bool {
        matches!(self, Variant::Tiers | Variant::ManyPriorities)
    }
}

/// The measured flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlowKind {
    Established,
    NewAllow,
    Deny,
    AdminDeny,
    AdminAccept,
    BaselineDeny,
}

impl FlowKind {
    const ALL: [FlowKind; 6] = [
        FlowKind::Established,
        FlowKind::NewAllow,
        FlowKind::Deny,
        FlowKind::AdminDeny,
        FlowKind::AdminAccept,
        FlowKind::BaselineDeny,
    ];

    fn name(self) -> &'static str {
        match self {
            FlowKind::Established => "established",
            FlowKind::NewAllow => "new_allow",
            FlowKind::Deny => "deny",
            FlowKind::AdminDeny => "admin_deny",
            FlowKind::AdminAccept => "admin_accept",
            FlowKind::BaselineDeny => "baseline_deny",
        }
    }

    /// New flows are measured one call per flow; the others repeat one frame.
    fn new_flows(self) -> bool {
        matches!(self, FlowKind::NewAllow | FlowKind::AdminAccept)
    }

    /// (source, destination, destination port).
    fn endpoints(self, family: Family, rules: u32) -> (IpAddr, IpAddr, u16) {
        let client = family.client(rules / 2);
        match self {
            FlowKind::Established | FlowKind::NewAllow => (client, family.server(), ALLOWED_PORT),
            FlowKind::Deny => (client, family.server(), DENIED_PORT),
            FlowKind::AdminDeny => (extra(family, 1, 1), family.server(), ALLOWED_PORT),
            FlowKind::AdminAccept => (extra(family, 2, 1), family.server(), MONITORING_PORT),
            FlowKind::BaselineDeny => (client, server_b(family), ALLOWED_PORT),
        }
    }

    /// What the reference evaluator must say, ingress at the destination.
    fn expected(self, variant: Variant) -> Expect {
        let tiers = variant.has_tiers();
        match (self, tiers) {
            (FlowKind::Established | FlowKind::NewAllow, _) => {
                Expect::NetworkPolicyAllow { passed: tiers }
            }
            (FlowKind::Deny, _) => Expect::NetworkPolicyDeny { passed: tiers },
            (FlowKind::AdminDeny | FlowKind::AdminAccept, false) => {
                Expect::NetworkPolicyDeny { passed: false }
            }
            (FlowKind::AdminDeny, true) => Expect::Decided(Tier::Admin, RuleAction::Deny, false),
            (FlowKind::AdminAccept, true) => {
                Expect::Decided(Tier::Admin, RuleAction::Accept, false)
            }
            (FlowKind::BaselineDeny, false) => Expect::NotEnforced,
            (FlowKind::BaselineDeny, true) => {
                Expect::Decided(Tier::Baseline, RuleAction::Deny, true)
            }
        }
    }
}

/// A verdict and the tier that gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Allowed by a NetworkPolicy rule (`passed`: after an Admin Pass).
    NetworkPolicyAllow { passed: bool },
    /// Denied by default by the NetworkPolicy selecting the destination.
    NetworkPolicyDeny { passed: bool },
    /// Decided by a ClusterNetworkPolicy rule of this tier and action.
    Decided(Tier, RuleAction, bool),
    /// No policy selects the destination.
    NotEnforced,
}

impl Expect {
    fn allowed(self) -> bool {
        match self {
            Expect::NetworkPolicyAllow { .. } | Expect::NotEnforced => true,
            Expect::NetworkPolicyDeny { .. } => false,
            Expect::Decided(_, action, _) => action == RuleAction::Accept,
        }
    }

    fn passed(self) -> bool {
        match self {
            Expect::NetworkPolicyAllow { passed }
            | Expect::NetworkPolicyDeny { passed }
            | Expect::Decided(_, _, passed) => passed,
            Expect::NotEnforced => false,
        }
    }

    fn describe(self) -> String {
        let pass = if self.passed() {
            "Admin Pass, then "
        } else {
            ""
        };
        match self {
            Expect::NetworkPolicyAllow { .. } => format!("allow ({pass}NetworkPolicy)"),
            Expect::NetworkPolicyDeny { .. } => {
                format!("deny ({pass}NetworkPolicy default deny)")
            }
            Expect::Decided(tier, action, _) => format!(
                "{} ({pass}{tier} {action})",
                if action == RuleAction::Accept {
                    "allow"
                } else {
                    "deny"
                }
            ),
            Expect::NotEnforced => "allow (not enforced)".to_owned(),
        }
    }

    /// Whether `verdict` is this one; the reason otherwise.
    fn check(self, verdict: &FlowVerdict) -> Result<(), String> {
        let ingress = &verdict.ingress;
        let reason_ok = match (self, &ingress.reason) {
            (Expect::NetworkPolicyAllow { .. }, VerdictReason::AllowedBy(rules)) => {
                rules.iter().all(|rule| rule.cluster.is_none())
            }
            (Expect::NetworkPolicyDeny { .. }, VerdictReason::DeniedByDefault { .. }) => true,
            (Expect::Decided(tier, action, _), VerdictReason::DecidedBy(rule)) => rule
                .cluster
                .as_ref()
                .is_some_and(|info| info.tier == tier && info.action == action),
            (Expect::NotEnforced, VerdictReason::NotEnforced) => true,
            _ => false,
        };
        let passed = ingress.explanation.contains("passed on by");
        if reason_ok
            && passed == self.passed()
            && verdict.allowed == self.allowed()
            && matches!(verdict.egress.reason, VerdictReason::NotEnforced)
        {
            Ok(())
        } else {
            Err(format!(
                "expected {}, the evaluator says: {}; {}",
                self.describe(),
                ingress.explanation,
                verdict.egress.explanation
            ))
        }
    }
}

/// Median, min and max over the rounds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RoundStats {
    pub median_ns: f64,
    pub min_ns: f64,
    pub max_ns: f64,
}

impl RoundStats {
    fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        Self {
            median_ns: floor::median(&mut sorted),
            min_ns: values.iter().copied().fold(f64::INFINITY, f64::min),
            max_ns: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// One policy set's figure for a flow.
#[derive(Clone, Debug, Serialize)]
pub struct TierFigure {
    pub variant: &'static str,
    /// The verdict and the tier that gives it (checked with the reference evaluator
    /// and at every run by the kernel's verdict).
    pub verdict: String,
    pub as_measured: RoundStats,
    pub without_floor: RoundStats,
    /// Every round, as measured.
    pub rounds_ns: Vec<f64>,
}

/// One flow at one scale, program and family, under the three policy sets.
#[derive(Clone, Debug, Serialize)]
pub struct TierRow {
    pub program: &'static str,
    pub family: &'static str,
    pub rules: u32,
    pub flow: &'static str,
    /// "repeat N" or "N flows x repeat 1 (per call)".
    pub method: String,
    /// The harness floor subtracted (the trivial program with the same repeat, or per
    /// call).
    pub floor_ns: f64,
    pub figures: Vec<TierFigure>,
    /// Medians without the floor: tiers / NetworkPolicy only, many priorities /
    /// NetworkPolicy only, many priorities / tiers (None where the denominator is 0).
    pub tiers_ratio: Option<f64>,
    pub many_ratio: Option<f64>,
    pub many_vs_tiers_ratio: Option<f64>,
    /// The same ratios of the medians as measured (floor included).
    pub tiers_ratio_as_measured: Option<f64>,
    pub many_ratio_as_measured: Option<f64>,
    /// NetworkPolicy only / the same uncounted: what counting rule hits costs.
    pub counting_ratio: Option<f64>,
    pub counting_ratio_as_measured: Option<f64>,
}

impl TierRow {
    pub fn figure(&self, variant: Variant) -> Option<&TierFigure> {
        self.figures
            .iter()
            .find(|figure| figure.variant == variant.name())
    }
}

/// A compiled policy set of the tiers measurement.
#[derive(Clone, Debug, Serialize)]
pub struct TierSetup {
    pub family: &'static str,
    pub rules: u32,
    pub variant: &'static str,
    pub network_policies: usize,
    pub cluster_network_policies: usize,
    pub compile_ms: f64,
    pub endpoints: usize,
    pub peer_hosts: usize,
    pub policy_entries: usize,
    pub policy_exact: usize,
    pub apply_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TiersResults {
    pub rows: Vec<TierRow>,
    pub setups: Vec<TierSetup>,
    pub rounds: usize,
    pub many_priorities: u32,
}

/// An address outside the client and stranger ranges: 10.0.`group`.`index`, or
/// fd00::`group`:`index`.
fn extra(family: Family, group: u8, index: u8) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(10, 0, group, index)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            u16::from(group),
            u16::from(index),
        )),
    }
}

fn server_b(family: Family) -> IpAddr {
    extra(family, 0, 2)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().copied().collect()
}

fn workload(namespace: &str, name: String, labels: Labels, address: IpAddr) -> Workload {
    Workload {
        namespace: namespace.to_owned(),
        ..scenario::workload(name, labels, address)
    }
}

fn cluster_policy(
    name: &str,
    tier: &str,
    priority: u32,
    ingress: &[serde_json::Value],
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "ClusterNetworkPolicy",
        "metadata": { "name": name },
        "spec": {
            "tier": tier,
            "priority": priority,
            "subject": {
                "pods": {
                    "namespaceSelector": {},
                    "podSelector": { "matchLabels": { "role": "server" } }
                }
            },
            "ingress": ingress
        }
    })
}

fn from_namespace(name: &str) -> serde_json::Value {
    serde_json::json!([{ "namespaces": { "matchLabels": { "kubernetes.io/metadata.name": name } } }])
}

fn udp(port: u16) -> serde_json::Value {
    serde_json::json!([{ "udp": { "destinationPort": { "number": port } } }])
}

/// The ClusterNetworkPolicies of a set.
fn cluster_policies(variant: Variant, many: u32) -> Vec<serde_json::Value> {
    if !variant.has_tiers() {
        return Vec::new();
    }
    let mut documents = vec![
        cluster_policy(
            "deny-quarantined",
            "Admin",
            10,
            &[serde_json::json!({
                "name": "deny-from-quarantined",
                "action": "Deny",
                "from": [{ "namespaces": { "matchLabels": { QUARANTINE_LABEL: "true" } } }]
            })],
        ),
        cluster_policy(
            "accept-monitoring",
            "Admin",
            20,
            &[serde_json::json!({
                "name": "accept-scrapes",
                "action": "Accept",
                "from": from_namespace("monitoring"),
                "protocols": udp(MONITORING_PORT)
            })],
        ),
        cluster_policy(
            "pass-bench",
            "Admin",
            900,
            &[serde_json::json!({
                "name": "bench-decides",
                "action": "Pass",
                "from": from_namespace(NAMESPACE)
            })],
        ),
        cluster_policy(
            "default-deny",
            "Baseline",
            10,
            &[serde_json::json!({
                "name": "deny-all-ingress",
                "action": "Deny",
                "from": [{ "namespaces": {} }]
            })],
        ),
    ];
    if variant == Variant::ManyPriorities {
        for tenant in 0..many {
            let namespace = format!("tenant-{tenant}");
            let rule = match tenant % 3 {
                0 => serde_json::json!({
                    "name": "deny-tenant",
                    "action": "Deny",
                    "from": from_namespace(&namespace)
                }),
                1 => serde_json::json!({
                    "name": "accept-tenant-port",
                    "action": "Accept",
                    "from": from_namespace(&namespace),
                    "protocols": udp(TENANT_PORTS + tenant as u16)
                }),
                _ => serde_json::json!({
                    "name": "pass-tenant",
                    "action": "Pass",
                    "from": from_namespace(&namespace)
                }),
            };
            documents.push(cluster_policy(
                &format!("tenant-{tenant}"),
                "Admin",
                100 + tenant,
                &[rule],
            ));
        }
    }
    documents
}

/// A compiled set.
struct Built {
    set: PolicySet,
    state: DatapathState,
    setup: TierSetup,
}

fn build(family: Family, rules: u32, variant: Variant, many: u32) -> anyhow::Result<Built> {
    let source = Source::memory("microseg-bench");
    let mut builder = PolicySetBuilder::new();
    builder.add_workload(workload(
        NAMESPACE,
        "server".to_owned(),
        labels(&[("role", "server")]),
        family.server(),
    ));
    for index in 0..rules {
        let app = format!("c{index}");
        builder.add_workload(workload(
            NAMESPACE,
            format!("c{index}"),
            labels(&[("role", "client"), ("app", app.as_str())]),
            family.client(index),
        ));
    }
    builder.add_workload(workload(
        "bench-b",
        "server-b".to_owned(),
        labels(&[("role", "server")]),
        server_b(family),
    ));
    let quarantine: BTreeMap<String, String> =
        BTreeMap::from([(QUARANTINE_LABEL.to_owned(), "true".to_owned())]);
    for index in 0..QUARANTINED {
        let namespace = format!("quarantine-{index}");
        builder.add_namespace(&source, &namespace, &quarantine);
        let app = format!("q{index}");
        builder.add_workload(workload(
            &namespace,
            app.clone(),
            labels(&[("role", "client"), ("app", app.as_str())]),
            extra(family, 1, index as u8 + 1),
        ));
    }
    builder.add_workload(workload(
        "monitoring",
        "prometheus".to_owned(),
        labels(&[("role", "monitoring")]),
        extra(family, 2, 1),
    ));
    ensure!(many < 250, "at most 249 tenants (one address block)");
    for tenant in 0..many {
        let app = format!("t{tenant}");
        builder.add_workload(workload(
            &format!("tenant-{tenant}"),
            app.clone(),
            labels(&[("role", "client"), ("app", app.as_str())]),
            extra(family, 3, tenant as u8 + 1),
        ));
    }
    builder.add_document(&source, &scenario::server_policy());
    let documents = cluster_policies(variant, many);
    for document in &documents {
        builder.add_document(&source, document);
    }
    let set = builder
        .finish()
        .map_err(|errors| anyhow::anyhow!("the tiers benchmark's policy is invalid: {errors:?}"))?;
    ensure!(
        set.cluster_policies.len() == documents.len() && set.policies.len() == 1,
        "{} ClusterNetworkPolicies and {} NetworkPolicies loaded; expected {} and 1",
        set.cluster_policies.len(),
        set.policies.len(),
        documents.len()
    );
    let start = Instant::now();
    let mut compiled = compile(&set);
    let compile_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut state = std::mem::take(&mut compiled.state);
    if variant == Variant::Uncounted {
        for entry in state.policy.values_mut() {
            *entry = entry.with_hit_slot(0);
        }
        for endpoint in state.endpoints.values_mut() {
            *endpoint = endpoint.with_default_deny_hit_slot(0);
        }
    }
    let counts = state.counts();
    Ok(Built {
        setup: TierSetup {
            family: family.name(),
            rules,
            variant: variant.name(),
            network_policies: set.policies.len(),
            cluster_network_policies: set.cluster_policies.len(),
            compile_ms,
            endpoints: counts.endpoints,
            peer_hosts: counts.peer_hosts,
            policy_entries: counts.policy,
            policy_exact: counts.policy_exact,
            apply_ms: 0.0,
        },
        set,
        state,
    })
}

/// Checks every flow's verdict under `set` against the tier that should give it.
fn check_verdicts(
    set: &PolicySet,
    variant: Variant,
    family: Family,
    rules: u32,
) -> anyhow::Result<()> {
    for kind in FlowKind::ALL {
        let (src, dst, port) = kind.endpoints(family, rules);
        let flow = Flow {
            src,
            dst,
            protocol: Protocol::Udp,
            port,
        };
        kind.expected(variant)
            .check(&evaluate(set, &flow))
            .map_err(|error| {
                anyhow::anyhow!(
                    "{} under {} ({}): {error}",
                    kind.name(),
                    variant.name(),
                    scenario::label(family, rules)
                )
            })?;
    }
    Ok(())
}

fn frame(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> Vec<u8> {
    datapath_cost::padded(Probe::udp(src, src_port, dst, dst_port).to_frame())
}

/// One round of every flow on one loaded set: ns per packet as measured, in
/// `FlowKind::ALL` order.
fn measure_round(
    loaded: &mut Loaded,
    program: Program,
    variant: Variant,
    family: Family,
    rules: u32,
    config: &TiersConfig,
) -> anyhow::Result<Vec<f64>> {
    loaded.clear_conntrack()?;
    loaded.drain();
    let mut figures = Vec::with_capacity(FlowKind::ALL.len());
    for kind in FlowKind::ALL {
        let (src, dst, port) = kind.endpoints(family, rules);
        let pass = kind.expected(variant).allowed();
        let what = format!("tiers {} {}", variant.name(), kind.name());
        if kind.new_flows() {
            let frames: Vec<Vec<u8>> = (0..config.new_flows.min(60_000))
                .map(|index| frame(src, 1024 + index as u16, dst, port))
                .collect();
            figures.push(loaded.per_call_mean(program, &frames, pass, &what)?);
            continue;
        }
        let packet = frame(src, 999, dst, port);
        if kind == FlowKind::Established {
            let (passed, _) = loaded.run(program, &packet, 1)?;
            ensure!(
                passed,
                "{} {what}: the first packet was dropped",
                program.name()
            );
        }
        let (passed, ns) = loaded.run(program, &packet, config.hot_repeat)?;
        loaded.drain();
        if passed != pass {
            bail!(
                "{} {what}: verdict {}, expected {}",
                program.name(),
                datapath_cost::verdict_name(passed),
                datapath_cost::verdict_name(pass)
            );
        }
        figures.push(ns);
    }
    Ok(figures)
}

fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    if denominator > 0.0 {
        Some(numerator / denominator)
    } else {
        None
    }
}

/// Measures every flow at every scale and family under the three sets.
pub fn run(
    config: &TiersConfig,
    floors: &Floors,
    progress: &Progress,
) -> anyhow::Result<TiersResults> {
    let mut results = TiersResults {
        rounds: config.rounds,
        many_priorities: config.many_priorities,
        ..TiersResults::default()
    };
    // Every set first: the maps are sized for the largest, and loaded once per set.
    let mut built = Vec::new();
    for &rules in &config.scales {
        for &family in &config.families {
            progress.step(format!(
                "tiers: compiling {}",
                scenario::label(family, rules)
            ));
            let mut sets = Vec::new();
            for variant in Variant::ALL {
                let set = build(family, rules, variant, config.many_priorities)
                    .with_context(|| format!("{} at {}", variant.name(), rules))?;
                check_verdicts(&set.set, variant, family, rules)?;
                sets.push(set);
            }
            built.push((rules, family, sets));
        }
    }
    let largest = built
        .iter()
        .flat_map(|(_, _, sets)| sets)
        .map(|set| set.setup.policy_entries.max(set.setup.peer_hosts))
        .max()
        .unwrap_or(0);
    let capacities = scenario::capacities(u32::try_from(largest).unwrap_or(u32::MAX));
    progress.step("tiers: loading three data paths");
    let mut loaded = Vec::new();
    for _ in Variant::ALL {
        let (datapath, _, _) = datapath_cost::load_with(capacities, &DatapathState::default())
            .context("loading the programs for the tiers measurement")?;
        loaded.push(datapath);
    }
    let mut applied: Vec<DatapathState> = vec![DatapathState::default(); Variant::ALL.len()];
    for (rules, family, sets) in built {
        let label = scenario::label(family, rules);
        progress.step(format!("tiers: applying {label}"));
        for ((set, datapath), current) in sets.into_iter().zip(&mut loaded).zip(&mut applied) {
            let start = Instant::now();
            datapath.apply(current, &set.state)?;
            let mut setup = set.setup;
            setup.apply_ms = start.elapsed().as_secs_f64() * 1e3;
            progress.line(format!(
                "  {label:>10} {:<22}: {} CNPs, compile {:>6.1} ms, {} endpoints, {} peer hosts, {} policy entries ({} exact)",
                setup.variant,
                setup.cluster_network_policies,
                setup.compile_ms,
                setup.endpoints,
                setup.peer_hosts,
                setup.policy_entries,
                setup.policy_exact
            ));
            results.setups.push(setup);
            *current = set.state;
        }
        for program in Program::ALL {
            progress.step(format!(
                "tiers: {} {label}, {} rounds",
                program.name().to_uppercase(),
                config.rounds
            ));
            // samples[variant][flow][round]
            let mut samples = vec![
                vec![Vec::with_capacity(config.rounds); FlowKind::ALL.len()];
                Variant::ALL.len()
            ];
            for round in 0..config.rounds {
                for turn in 0..Variant::ALL.len() {
                    let index = (round + turn) % Variant::ALL.len();
                    let variant = Variant::ALL[index];
                    let figures =
                        measure_round(&mut loaded[index], program, variant, family, rules, config)
                            .with_context(|| format!("{} at {label}", program.name()))?;
                    for (flow, ns) in figures.into_iter().enumerate() {
                        samples[index][flow].push(ns);
                    }
                }
            }
            let floor = floors.of(program);
            for (flow_index, kind) in FlowKind::ALL.into_iter().enumerate() {
                let row = row(
                    program, family, rules, kind, config, floor, &samples, flow_index,
                );
                progress.line(format!(
                    "  {label:>10} {:>3} {:<13} NP only {:>6.1} ns, tiers {:>6.1} ns ({}), {} priorities {:>6.1} ns ({}), uncounted {:>6.1} ns (counting {}) - floor",
                    row.program,
                    row.flow,
                    row.figures[0].without_floor.median_ns,
                    row.figures[1].without_floor.median_ns,
                    ratio_text(row.tiers_ratio),
                    config.many_priorities,
                    row.figures[2].without_floor.median_ns,
                    ratio_text(row.many_ratio),
                    row.figures[3].without_floor.median_ns,
                    ratio_text(row.counting_ratio)
                ));
                results.rows.push(row);
            }
        }
    }
    Ok(results)
}

pub fn ratio_text(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.2}x"))
}

#[expect(
    clippy::too_many_arguments,
    reason = "one row's coordinates, each a plain value"
)]
fn row(
    program: Program,
    family: Family,
    rules: u32,
    kind: FlowKind,
    config: &TiersConfig,
    floor: HarnessFloor,
    samples: &[Vec<Vec<f64>>],
    flow_index: usize,
) -> TierRow {
    let (floor_ns, method) = if kind.new_flows() {
        (
            floor.per_call_ns,
            format!(
                "{} flows x repeat 1 (per call)",
                config.new_flows.min(60_000)
            ),
        )
    } else {
        (floor.hot_ns, format!("repeat {}", config.hot_repeat))
    };
    let figures: Vec<TierFigure> = Variant::ALL
        .into_iter()
        .enumerate()
        .map(|(index, variant)| {
            let rounds = samples[index][flow_index].clone();
            let without: Vec<f64> = rounds.iter().map(|ns| (ns - floor_ns).max(0.0)).collect();
            TierFigure {
                variant: variant.name(),
                verdict: kind.expected(variant).describe(),
                as_measured: RoundStats::of(&rounds),
                without_floor: RoundStats::of(&without),
                rounds_ns: rounds,
            }
        })
        .collect();
    let median = |index: usize| figures[index].without_floor.median_ns;
    let measured = |index: usize| figures[index].as_measured.median_ns;
    TierRow {
        program: program.name(),
        family: family.name(),
        rules,
        flow: kind.name(),
        method,
        floor_ns,
        tiers_ratio: ratio(median(1), median(0)),
        many_ratio: ratio(median(2), median(0)),
        many_vs_tiers_ratio: ratio(median(2), median(1)),
        tiers_ratio_as_measured: ratio(measured(1), measured(0)),
        many_ratio_as_measured: ratio(measured(2), measured(0)),
        counting_ratio: ratio(median(0), median(3)),
        counting_ratio_as_measured: ratio(measured(0), measured(3)),
        figures,
    }
}
