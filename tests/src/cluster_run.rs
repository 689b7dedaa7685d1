//! The cluster scenario ([`run`]) on a [`SimCluster`]: sync, cross-node enforcement
//! checked against the reference evaluator (and who reported each drop), churn
//! with convergence measured on every node, faults during churn, and each agent's
//! memory and CPU. `e2e_cluster_scale` runs it small and asserts; `cargo xtask
//! bench --cluster` runs it at the default size and reports.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use microseg::policy::{Flow, PolicySet, PolicySetBuilder, Protocol, evaluate};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    cluster::{
        ClusterPlan, REAL_PODS, RealPod, SERVICE_PORTS, SimCluster, SimNode, initial_objects,
        node_name, pod, virtual_pod,
    },
    proc_stats,
    topology::tcp_exchange,
};

/// What a run measured and found wrong.
#[derive(Debug, Default, Serialize)]
pub struct ClusterReport {
    pub plan: String,
    pub cluster_pods: usize,
    pub cluster_policies: usize,
    pub nodes: usize,
    /// From the agents' start to every node enforcing the API server's state.
    pub initial_sync_ms: f64,
    /// Cross-node probes (real pods, both families) that agreed with the reference
    /// evaluator, allowed and denied.
    pub probes_allowed: usize,
    pub probes_denied: usize,
    /// Denied probes whose drop was reported by the node that should drop it (the
    /// source's for an egress deny, the destination's for an ingress deny) and by
    /// no other.
    pub drops_reported_by_the_dropping_node: usize,
    /// Convergence (API change -> enforced on every node) per phase.
    pub phases: Vec<PhaseFigures>,
    /// A real pod's label changed: enforced on every node, and connections follow.
    pub label_change_ms: f64,
    pub agents: Vec<AgentFigures>,
    /// Everything that went wrong (empty: the run passed).
    pub failures: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct PhaseFigures {
    pub phase: String,
    pub changes: usize,
    pub duration_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
    /// For a fault: from its end (the agent restarted, the API server back, the
    /// watch cut, the history compacted) to every node enforcing what the API
    /// server held at that moment.
    pub recovery_ms: Option<f64>,
    /// Probes of connections whose verdict never changes, made during the phase,
    /// and how many came out wrong.
    pub probes: usize,
    pub wrong_probes: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct AgentFigures {
    pub node: String,
    pub rss_after_sync_mib: f64,
    pub peak_rss_mib: f64,
    /// CPU used during the steady churn, as a share of one core.
    pub churn_cpu_cores: f64,
    /// Generations applied and map entries written during the steady churn, per
    /// API change.
    pub applies_per_change: f64,
    pub map_entries_per_change: f64,
    /// Workloads this node enforces (its own pods selected by a policy).
    pub enforced_workloads: u64,
}

/// One API change: its resource version, when it was published, and its phase.
struct Change {
    version: u64,
    sent: Instant,
    phase: usize,
}

/// Each node's enforced resource version over time (when a poll saw it rise).
type VersionLog = Arc<Mutex<Vec<(Instant, u64)>>>;

/// Flows whose verdict no churn changes, probed throughout: (from, to, port,
/// allowed).
const INVARIANT_FLOWS: [(&str, &str, u16, bool); 5] = [
    ("shop/frontend-1", "shop/api-1", 8080, true),
    ("shop/frontend-2", "shop/api-2", 8080, true),
    ("shop/api-2", "shop/db-1", 5432, true),
    ("other/intruder", "shop/api-1", 8080, false),
    ("shop/frontend-1", "shop/db-1", 5432, false),
];

/// Runs the whole scenario; `say` reports progress.
pub fn run(plan: &ClusterPlan, say: &dyn Fn(&str)) -> ClusterReport {
    let objects = initial_objects(plan);
    let mut report = ClusterReport {
        plan: format!("{plan:?}"),
        cluster_pods: objects.iter().filter(|o| o["kind"] == "Pod").count(),
        cluster_policies: objects
            .iter()
            .filter(|o| o["kind"] == "NetworkPolicy")
            .count(),
        nodes: crate::cluster::REAL_NODES,
        ..ClusterReport::default()
    };
    say(&format!(
        "building {} nodes; the API server holds {} pods and {} NetworkPolicies",
        report.nodes, report.cluster_pods, report.cluster_policies
    ));
    let cluster = SimCluster::build(objects);
    let started = Instant::now();
    for node in &cluster.nodes {
        node.start_agent();
    }
    cluster.wait_converged(Duration::from_secs(120));
    // The programs go on a pod's veth once the agent has found it, just after the
    // pod's policy is in the maps: until then the pod is not enforced on its node.
    cluster.wait_attached(Duration::from_secs(30));
    report.initial_sync_ms = ms(started.elapsed());
    let rss_after_sync: Vec<f64> = cluster
        .nodes
        .iter()
        .map(|node| process_sample(node).map_or(0.0, |s| s.rss_mib))
        .collect();
    say(&format!(
        "synced in {:.0} ms; checking cross-node enforcement",
        report.initial_sync_ms
    ));

    check_enforcement(&cluster, &mut report, "after the initial sync");

    // Churn with pollers, a prober and resource sampling.
    let stop = Arc::new(AtomicBool::new(false));
    let logs: Vec<VersionLog> = cluster
        .nodes
        .iter()
        .map(|_| VersionLog::default())
        .collect();
    let phase = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let probes: Arc<Mutex<Vec<(usize, bool)>>> = Arc::default();
    let mut phase_names = vec!["steady churn".to_owned()];
    // Per fault phase: when the fault ended, and the API server's version then.
    let mut fault_ends: BTreeMap<usize, Change> = BTreeMap::new();
    let mut changes: Vec<Change> = Vec::new();
    let mut churn = Churn::new(plan);
    let before: Vec<Value> = cluster
        .nodes
        .iter()
        .map(|n| n.status().unwrap_or_default())
        .collect();
    std::thread::scope(|scope| {
        for (node, log) in cluster.nodes.iter().zip(&logs) {
            let stop = stop.clone();
            scope.spawn(move || poll_versions(node, log, &stop));
        }
        {
            let (stop, phase, probes) = (stop.clone(), phase.clone(), probes.clone());
            let cluster = &cluster;
            scope.spawn(move || probe_invariants(cluster, &stop, &phase, &probes));
        }
        say(&format!(
            "steady churn: {} changes/s for {:?}",
            plan.churn_rate, plan.steady_churn
        ));
        let usage_before: Vec<Option<ProcessSample>> =
            cluster.nodes.iter().map(process_sample).collect();
        let steady_started = Instant::now();
        churn.run_for(&cluster, plan.steady_churn, 0, &mut changes);
        let steady_elapsed = steady_started.elapsed();
        let steady_usage: Vec<Option<ProcessSample>> = cluster
            .nodes
            .iter()
            .zip(usage_before)
            .map(|(node, before)| {
                let after = process_sample(node)?;
                let before = before?;
                Some(ProcessSample {
                    rss_mib: after.rss_mib,
                    cpu_seconds: (after.cpu_seconds - before.cpu_seconds)
                        / steady_elapsed.as_secs_f64(),
                })
            })
            .collect();
        let steady_changes = changes.len();
        // Wait for the steady changes before counting what they wrote.
        cluster.wait_converged(Duration::from_secs(60));
        for (index, node) in cluster.nodes.iter().enumerate() {
            let after = node.status().unwrap_or_default();
            let delta = |field: &str| {
                after[field].as_u64().unwrap_or(0) as f64
                    - before[index][field].as_u64().unwrap_or(0) as f64
            };
            report.agents.push(AgentFigures {
                node: node.name.clone(),
                rss_after_sync_mib: rss_after_sync[index],
                churn_cpu_cores: steady_usage[index].as_ref().map_or(0.0, |u| u.cpu_seconds),
                applies_per_change: delta("appliesOk") / steady_changes as f64,
                map_entries_per_change: delta("mapEntriesWritten") / steady_changes as f64,
                ..AgentFigures::default()
            });
        }

        // Faults, with churn going on around each.
        let mut next_phase = |name: &str| {
            phase_names.push(name.to_owned());
            let index = phase_names.len() - 1;
            phase.store(index, Ordering::SeqCst);
            say(name);
            index
        };
        let window = plan.fault_window;

        let index = next_phase("agent on node-2 killed (SIGKILL) and restarted during churn");
        churn.run_for(&cluster, window / 2, index, &mut changes);
        let node2 = cluster.node(2);
        node2.lab.kill_agent();
        churn.run_for(&cluster, plan.agent_down, index, &mut changes);
        node2.start_agent();
        fault_ends.insert(index, fault_end(&cluster, index));
        cluster.wait_attached(Duration::from_secs(30));
        churn.run_for(&cluster, window / 2, index, &mut changes);

        let index = next_phase("watches broken mid-stream during churn");
        churn.run_for(&cluster, window / 2, index, &mut changes);
        cluster.api.drop_watches();
        fault_ends.insert(index, fault_end(&cluster, index));
        churn.run_for(&cluster, window / 2, index, &mut changes);

        let index = next_phase("410 Gone: history compacted during churn");
        churn.run_for(&cluster, window / 2, index, &mut changes);
        cluster.api.expire_history();
        fault_ends.insert(index, fault_end(&cluster, index));
        churn.run_for(&cluster, window / 2, index, &mut changes);

        let index = next_phase("API server gone during churn");
        churn.run_for(&cluster, window / 2, index, &mut changes);
        cluster.api.stop();
        // Changes go on meanwhile (written through another replica, say).
        churn.run_for(&cluster, plan.api_outage, index, &mut changes);
        cluster.api.start_again();
        fault_ends.insert(index, fault_end(&cluster, index));
        churn.run_for(&cluster, window / 2, index, &mut changes);

        cluster.wait_converged(Duration::from_secs(120));
        // The pollers see what `wait_converged` saw before they stop (a node that
        // caught up in one step at the very end would otherwise look unconverged).
        let last = cluster.api.resource_version();
        let deadline = Instant::now() + Duration::from_secs(5);
        while logs.iter().any(|log| {
            log.lock()
                .unwrap()
                .last()
                .is_none_or(|(_, version)| *version < last)
        }) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::SeqCst);
    });

    for (index, name) in phase_names.iter().enumerate() {
        let mut figures = phase_figures(index, name, &changes, &logs, &probes);
        figures.recovery_ms = fault_ends
            .get(&index)
            .and_then(|end| converged_at(end, &logs))
            .map(ms);
        report.phases.push(figures);
    }
    for figures in &report.phases {
        if figures.wrong_probes > 0 {
            report.failures.push(format!(
                "{}: {} of {} probes of unchanging connections came out wrong",
                figures.phase, figures.wrong_probes, figures.probes
            ));
        }
    }
    let unconverged = changes
        .iter()
        .filter(|change| converged_at(change, &logs).is_none())
        .count();
    if unconverged > 0 {
        report.failures.push(format!(
            "{unconverged} changes never seen enforced on every node"
        ));
    }

    say("a real pod's label changes: shop/frontend-2 leaves the frontend tier");
    let relabelled = relabel_real(&cluster, "shop/frontend-2", "quarantine");
    cluster.wait_converged(Duration::from_secs(30));
    report.label_change_ms = ms(relabelled.elapsed());
    check_enforcement(&cluster, &mut report, "after the label change");
    relabel_real(&cluster, "shop/frontend-2", "frontend");
    cluster.wait_converged(Duration::from_secs(30));
    check_enforcement(&cluster, &mut report, "after the label came back");

    for (figures, node) in report.agents.iter_mut().zip(&cluster.nodes) {
        let status = node.status().unwrap_or_default();
        let peak = node.lab.agent_pid().map_or(0.0, proc_stats::peak_rss_mib);
        figures.peak_rss_mib = peak.max(figures.rss_after_sync_mib);
        figures.enforced_workloads = status["enforcedWorkloads"].as_u64().unwrap_or(0);
    }
    report
}

/// Probes every ordered pair of real pods on [`SERVICE_PORTS`], IPv4 and IPv6,
/// against the reference evaluator over the whole cluster; then checks that every
/// denied connection was reported by the node that dropped it, and only by it.
fn check_enforcement(cluster: &SimCluster, report: &mut ClusterReport, when: &str) {
    let failures_before = report.failures.len();
    check_connections(cluster, report, when);
    if report.failures.len() > failures_before {
        // What each node had attached and bound, to tell why.
        for node in &cluster.nodes {
            let status = node.status().unwrap_or_default();
            report.failures.push(format!(
                "{when}: {} status: attached {}, interfaces {}, problems {}\n{}",
                node.name,
                status["attached"],
                status["interfaces"],
                status["problems"],
                node.lab.agent_log()
            ));
        }
    }
}

fn check_connections(cluster: &SimCluster, report: &mut ClusterReport, when: &str) {
    let started = chrono::Utc::now();
    let set = &cluster_set(cluster);
    let mut flows = Vec::new();
    for src in &REAL_PODS {
        for dst in REAL_PODS.iter().filter(|dst| dst.key() != src.key()) {
            for (from, to) in [
                (src.address(), dst.address()),
                (src.address6(), dst.address6()),
            ] {
                for port in SERVICE_PORTS {
                    let flow = Flow {
                        src: from,
                        dst: to,
                        protocol: Protocol::Tcp,
                        port,
                    };
                    flows.push((src, dst, flow));
                }
            }
        }
    }
    let results: Vec<(&RealPod, &RealPod, Flow, bool, bool, bool)> = std::thread::scope(|scope| {
        let handles: Vec<_> = flows
            .iter()
            .map(|(src, dst, flow)| {
                scope.spawn(move || {
                    let verdict = evaluate(set, flow);
                    let completed = tcp_exchange(cluster.pod_ns(&src.key()), flow.dst, flow.port);
                    (
                        *src,
                        *dst,
                        *flow,
                        verdict.allowed,
                        verdict.egress.allowed,
                        completed,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe"))
            .collect()
    });
    for (_, _, flow, expected, _, completed) in &results {
        if expected != completed {
            report.failures.push(format!(
                "{when}: {flow}: the reference evaluator says allowed={expected}, the connection completed: {completed}"
            ));
        }
    }
    let allowed = results.iter().filter(|r| r.3).count();
    report.probes_allowed += allowed;
    report.probes_denied += results.len() - allowed;

    // Who reported each drop (of this check's connections).
    let drops: Vec<Vec<Value>> = cluster
        .nodes
        .iter()
        .map(|node| dropped_flows(node, started))
        .collect();
    for (src, dst, flow, expected, egress_allowed, _) in &results {
        if *expected {
            continue;
        }
        let dropping = if *egress_allowed { dst.node } else { src.node };
        for node in &cluster.nodes {
            let reported = drops[node.index - 1].iter().any(|event| {
                event["IP"]["source"] == flow.src.to_string()
                    && event["IP"]["destination"] == flow.dst.to_string()
                    && event["l4"]["TCP"]["destination_port"] == flow.port
            });
            if reported != (node.index == dropping) {
                report.failures.push(format!(
                    "{when}: {flow} ({} -> {}): dropped by {} but {} {} it",
                    src.key(),
                    dst.key(),
                    node_name(dropping),
                    node.name,
                    if reported {
                        "reported"
                    } else {
                        "did not report"
                    }
                ));
            } else if reported {
                report.drops_reported_by_the_dropping_node += 1;
            }
        }
    }
}

/// The flows a node's agent dropped since `since`, from its flow history.
fn dropped_flows(node: &SimNode, since: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let mut flows = Vec::new();
    let Ok(mut client) = microseg::api::client::Client::connect(&node.lab.socket()) else {
        return flows;
    };
    let request = microseg::api::Request::Flows {
        last: 1_000_000,
        follow: false,
        filter: microseg::flow_filter::FlowFilter {
            verdict: Some("DROPPED".to_owned()),
            since: Some(since),
            ..microseg::flow_filter::FlowFilter::default()
        },
    };
    let _ = client.stream(&request, |flow| {
        if flow["verdict"] == "DROPPED" {
            flows.push(flow);
        }
        true
    });
    flows
}

/// The reference evaluator's view: every object the API server holds.
fn cluster_set(cluster: &SimCluster) -> PolicySet {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": cluster.api.objects()});
    let mut builder = PolicySetBuilder::new();
    builder.add_text(Path::new("cluster.json"), &list.to_string());
    builder.finish().expect("the cluster's objects load")
}

fn relabel_real(cluster: &SimCluster, key: &str, tier: &str) -> Instant {
    let real = RealPod::find(key);
    cluster.api.apply(pod(
        real.namespace,
        real.name,
        json!({"tier": tier}),
        &node_name(real.node),
        &[real.address(), real.address6()],
    ))
}

/// Pod churn at a steady rate: a new pod, a deleted pod and a relabelled pod in
/// turn, on virtual nodes.
struct Churn {
    plan: ClusterPlan,
    /// Pods present, oldest first (by index).
    present: std::collections::VecDeque<usize>,
    next_index: usize,
    step: usize,
}

impl Churn {
    fn new(plan: &ClusterPlan) -> Self {
        Self {
            plan: plan.clone(),
            present: (0..plan.virtual_pods).collect(),
            next_index: plan.virtual_pods,
            step: 0,
        }
    }

    fn run_for(
        &mut self,
        cluster: &SimCluster,
        duration: Duration,
        phase: usize,
        changes: &mut Vec<Change>,
    ) {
        let interval = Duration::from_secs_f64(1.0 / f64::from(self.plan.churn_rate.max(1)));
        let started = Instant::now();
        let mut due = started;
        while started.elapsed() < duration {
            let now = Instant::now();
            if now < due {
                std::thread::sleep(due - now);
            }
            due += interval;
            let sent = self.one_change(cluster);
            changes.push(Change {
                version: cluster.api.resource_version(),
                sent,
                phase,
            });
        }
    }

    fn one_change(&mut self, cluster: &SimCluster) -> Instant {
        self.step += 1;
        match self.step % 3 {
            0 => {
                let index = self.next_index;
                self.next_index += 1;
                self.present.push_back(index);
                cluster
                    .api
                    .apply(virtual_pod(&self.plan, index, index % 10))
            }
            1 => match self.present.pop_front() {
                Some(index) => {
                    let namespace = virtual_pod(&self.plan, index, 0)["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    cluster
                        .api
                        .delete("Pod", &namespace, &format!("pod-{index}"))
                }
                None => Instant::now(),
            },
            _ => {
                let position = self.step * 7919 % self.present.len().max(1);
                let index = self.present.get(position).copied().unwrap_or(0);
                cluster
                    .api
                    .apply(virtual_pod(&self.plan, index, (index + self.step) % 10))
            }
        }
    }
}

/// The end of a fault, as a change: now, and the API server's version now.
fn fault_end(cluster: &SimCluster, phase: usize) -> Change {
    Change {
        version: cluster.api.resource_version(),
        sent: Instant::now(),
        phase,
    }
}

/// Polls a node's enforced resource version until `stop`, logging each rise.
fn poll_versions(node: &SimNode, log: &VersionLog, stop: &AtomicBool) {
    let mut client = None;
    let mut last = 0;
    while !stop.load(Ordering::SeqCst) {
        if client.is_none() {
            client = microseg::api::client::Client::connect(&node.lab.socket()).ok();
        }
        let version = client
            .as_mut()
            .and_then(|c| c.call(&microseg::api::Request::Status).ok())
            .and_then(|status| {
                status
                    .pointer("/kubernetes/resourceVersion")?
                    .as_str()?
                    .parse::<u64>()
                    .ok()
            });
        match version {
            Some(version) if version > last => {
                last = version;
                log.lock().unwrap().push((Instant::now(), version));
            }
            Some(_) => {}
            // The agent is down (killed): connect again later.
            None => client = None,
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Probes [`INVARIANT_FLOWS`] until `stop`, recording (phase, right) per probe.
fn probe_invariants(
    cluster: &SimCluster,
    stop: &AtomicBool,
    phase: &std::sync::atomic::AtomicUsize,
    probes: &Mutex<Vec<(usize, bool)>>,
) {
    let mut family = 0usize;
    while !stop.load(Ordering::SeqCst) {
        family += 1;
        for (from, to, port, allowed) in INVARIANT_FLOWS {
            let target = RealPod::find(to);
            let address: IpAddr = if family.is_multiple_of(2) {
                target.address()
            } else {
                target.address6()
            };
            let completed = tcp_exchange(cluster.pod_ns(from), address, port);
            probes
                .lock()
                .unwrap()
                .push((phase.load(Ordering::SeqCst), completed == allowed));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// When `change` was enforced on every node (the latest of the nodes' first polls
/// showing its version), if it was.
fn converged_at(change: &Change, logs: &[VersionLog]) -> Option<Duration> {
    let mut latest = Duration::ZERO;
    for log in logs {
        let log = log.lock().unwrap();
        let (at, _) = log.iter().find(|(_, version)| *version >= change.version)?;
        latest = latest.max(at.saturating_duration_since(change.sent));
    }
    Some(latest)
}

fn phase_figures(
    index: usize,
    name: &str,
    changes: &[Change],
    logs: &[VersionLog],
    probes: &Mutex<Vec<(usize, bool)>>,
) -> PhaseFigures {
    let in_phase: Vec<&Change> = changes.iter().filter(|c| c.phase == index).collect();
    let mut times: Vec<f64> = in_phase
        .iter()
        .filter_map(|change| converged_at(change, logs))
        .map(ms)
        .collect();
    times.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        if times.is_empty() {
            0.0
        } else {
            times[((times.len() - 1) as f64 * q).round() as usize]
        }
    };
    let duration = match (in_phase.first(), in_phase.last()) {
        (Some(first), Some(last)) => last.sent.duration_since(first.sent).as_secs_f64(),
        _ => 0.0,
    };
    let probes = probes.lock().unwrap();
    let phase_probes: Vec<bool> = probes
        .iter()
        .filter(|(phase, _)| *phase == index)
        .map(|(_, right)| *right)
        .collect();
    PhaseFigures {
        phase: name.to_owned(),
        changes: in_phase.len(),
        duration_s: duration,
        p50_ms: quantile(0.5),
        p95_ms: quantile(0.95),
        max_ms: quantile(1.0),
        recovery_ms: None,
        probes: phase_probes.len(),
        wrong_probes: phase_probes.iter().filter(|right| !**right).count(),
    }
}

struct ProcessSample {
    rss_mib: f64,
    /// utime + stime.
    cpu_seconds: f64,
}

/// The agent's resident memory and CPU time so far.
fn process_sample(node: &SimNode) -> Option<ProcessSample> {
    let pid = node.lab.agent_pid()?;
    Some(ProcessSample {
        rss_mib: proc_stats::rss_mib(pid),
        cpu_seconds: proc_stats::cpu_seconds(pid),
    })
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

impl ClusterReport {
    /// The report as Markdown tables.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Cluster: {} real nodes (one agent each), {} pods and {} NetworkPolicies in the API server.\n\n",
            self.nodes, self.cluster_pods, self.cluster_policies
        ));
        out.push_str(&format!(
            "- initial sync (agents started -> every node enforcing): {:.0} ms\n- cross-node probes agreeing with the reference evaluator: {} allowed, {} denied; drops reported by the dropping node (and only by it): {}\n- a real pod's label change enforced on every node: {:.0} ms\n\n",
            self.initial_sync_ms,
            self.probes_allowed,
            self.probes_denied,
            self.drops_reported_by_the_dropping_node,
            self.label_change_ms
        ));
        out.push_str("| phase | changes | seconds | convergence p50 | p95 | max | caught up after the fault | probes (wrong) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for phase in &self.phases {
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} ({}) |\n",
                phase.phase,
                phase.changes,
                phase.duration_s,
                phase.p50_ms,
                phase.p95_ms,
                phase.max_ms,
                phase
                    .recovery_ms
                    .map_or("-".to_owned(), |ms| format!("{ms:.0} ms")),
                phase.probes,
                phase.wrong_probes
            ));
        }
        out.push_str("\n| agent | RSS after sync | peak RSS | CPU during steady churn | applies per change | map entries written per change |\n|---|---:|---:|---:|---:|---:|\n");
        for agent in &self.agents {
            out.push_str(&format!(
                "| {} | {:.1} MiB | {:.1} MiB | {:.2} cores | {:.2} | {:.2} |\n",
                agent.node,
                agent.rss_after_sync_mib,
                agent.peak_rss_mib,
                agent.churn_cpu_cores,
                agent.applies_per_change,
                agent.map_entries_per_change
            ));
        }
        if !self.failures.is_empty() {
            out.push_str("\nFailures:\n");
            for failure in &self.failures {
                out.push_str(&format!("- {failure}\n"));
            }
        }
        out
    }
}

/// Per-phase figures by name, for assertions.
pub fn phases_by_name(report: &ClusterReport) -> BTreeMap<&str, &PhaseFigures> {
    report
        .phases
        .iter()
        .map(|phase| (phase.phase.as_str(), phase))
        .collect()
}
