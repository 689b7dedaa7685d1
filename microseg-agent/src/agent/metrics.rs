//! Prometheus metrics, after Cilium's names under `microseg_`, plus what microseg
//! knows beyond them: lost events, the policy generation, apply latency.

use std::{fmt::Write, net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use microseg_common::{DropReason, counters::Counter};

use super::{Agent, enforcer::APPLY_BUCKETS};

pub async fn serve(agent: Arc<Agent>, address: SocketAddr) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let agent = agent.clone();
            async move {
                let body = render(&agent).await;
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(%address, "serving metrics at /metrics");
    axum::serve(listener, app).await?;
    Ok(())
}

/// What the metrics page needs of the agent's state, copied under its lock; every
/// kernel read happens after the lock is released (`kernel_stats`), so a scrape never
/// stalls the agent's other work.
struct Snapshot {
    counts: crate::datapath::StateCounts,
    policies: usize,
    applies_ok: u64,
    applies_failed: u64,
    entries_written: u64,
    compiler: crate::policy::CompilerCounters,
    apply_latency: super::enforcer::LatencyHistogram,
    interfaces: Vec<super::interfaces::InterfaceStatus>,
    veth_scan_failures: u64,
    /// Refused policies enforced as their fail-closed substitutes, by kind.
    refused_policies: std::collections::BTreeMap<&'static str, usize>,
    healthy: bool,
}

impl Snapshot {
    fn of(core: &super::AgentCore) -> Self {
        Self {
            counts: core.enforcer.current_state().counts(),
            policies: core.enforcer.set().policies.len(),
            applies_ok: core.enforcer.applies_ok,
            applies_failed: core.enforcer.applies_failed,
            entries_written: core.enforcer.entries_written,
            compiler: core.enforcer.compiler_counters(),
            apply_latency: core.enforcer.apply_latency.clone(),
            interfaces: core.interfaces.status.values().cloned().collect(),
            veth_scan_failures: core.interfaces.scan_failures,
            refused_policies: core.enforcer.set().refused_policies.iter().fold(
                Default::default(),
                |mut counts, refused| {
                    *counts.entry(refused.kind).or_default() += 1;
                    counts
                },
            ),
            healthy: core.problems().is_empty(),
        }
    }
}

/// The metrics page.
pub async fn render(agent: &Agent) -> String {
    let snapshot = Snapshot::of(&*agent.core.lock().await);
    let mut out = String::new();
    let counters = agent.kernel.counters();
    let usage = agent.kernel.usage(&snapshot.counts);
    let generation = agent.kernel.live_generation();
    if let Some(c) = &counters {
        family(
            &mut out,
            "microseg_forward_count_total",
            "counter",
            "Packets allowed, by hook direction.",
        );
        for (direction, counter) in [
            ("ingress", Counter::AllowedIngress),
            ("egress", Counter::AllowedEgress),
        ] {
            let _ = writeln!(
                out,
                "microseg_forward_count_total{{direction=\"{direction}\"}} {}",
                c.get(counter)
            );
        }
        family(
            &mut out,
            "microseg_policy_verdicts_total",
            "counter",
            "Packets judged by policy, by hook direction and action.",
        );
        for (direction, action, counter) in [
            ("ingress", "allowed", Counter::AllowedIngress),
            ("egress", "allowed", Counter::AllowedEgress),
            ("ingress", "denied", Counter::DeniedIngress),
            ("egress", "denied", Counter::DeniedEgress),
            ("ingress", "audit", Counter::AuditedIngress),
            ("egress", "audit", Counter::AuditedEgress),
        ] {
            let _ = writeln!(
                out,
                "microseg_policy_verdicts_total{{direction=\"{direction}\",action=\"{action}\"}} {}",
                c.get(counter)
            );
        }
        family(
            &mut out,
            "microseg_drop_count_total",
            "counter",
            "Packets dropped, by reason.",
        );
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "microseg_drop_count_total{{reason=\"{}\"}} {}",
                reason.name(),
                c.drops(reason)
            );
        }
        family(
            &mut out,
            "microseg_conntrack_hits_total",
            "counter",
            "Packets passed on a conntrack entry of the live generation.",
        );
        let _ = writeln!(
            out,
            "microseg_conntrack_hits_total {}",
            c.get(Counter::ConntrackHit)
        );
        family(
            &mut out,
            "microseg_conntrack_flows_lost_total",
            "counter",
            "Packets continuing a flow (a TCP segment other than a bare SYN, an ICMP query reply) that found no conntrack entry: the flow was evicted from the full table (or began before it was tracked). Judged by policy again.",
        );
        let _ = writeln!(
            out,
            "microseg_conntrack_flows_lost_total {}",
            c.get(Counter::ConntrackFlowLost)
        );
        family(
            &mut out,
            "microseg_conntrack_flows_expired_total",
            "counter",
            "Packets continuing a flow whose conntrack entry had outlived its idle lifetime. Judged by policy again.",
        );
        let _ = writeln!(
            out,
            "microseg_conntrack_flows_expired_total {}",
            c.get(Counter::ConntrackFlowExpired)
        );
        family(
            &mut out,
            "microseg_conntrack_flows_rejudged_total",
            "counter",
            "Packets of flows allowed before an update that took something away (an allowing entry, an endpoint's settings, a peer's identity the entries tell apart), judged by policy again. Updates that only allow more leave flows current.",
        );
        let _ = writeln!(
            out,
            "microseg_conntrack_flows_rejudged_total {}",
            c.get(Counter::ConntrackRejudged)
        );
        family(
            &mut out,
            "microseg_conntrack_flows_marked_stale_total",
            "counter",
            "Flows of addresses that became or stopped being a peer or an endpoint, marked to be judged again (an address reused never inherits its predecessor's flows).",
        );
        let _ = writeln!(
            out,
            "microseg_conntrack_flows_marked_stale_total {}",
            agent
                .flows_marked_stale
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        family(
            &mut out,
            "microseg_parse_failures_total",
            "counter",
            "Packets that could not be parsed.",
        );
        let _ = writeln!(
            out,
            "microseg_parse_failures_total {}",
            c.get(Counter::ParseFailure)
        );
        family(
            &mut out,
            "microseg_events_lost_total",
            "counter",
            "Policy events not delivered, by cause.",
        );
        let _ = writeln!(
            out,
            "microseg_events_lost_total{{cause=\"rate_limit\"}} {}",
            c.get(Counter::EventsLostRateLimit)
        );
        let _ = writeln!(
            out,
            "microseg_events_lost_total{{cause=\"ring_full\"}} {}",
            c.get(Counter::EventsLostRingFull)
        );
        let _ = writeln!(
            out,
            "microseg_events_lost_total{{cause=\"slow_subscriber\"}} {}",
            agent.hub.subscriber_lost.load(Ordering::Relaxed)
        );
        family(
            &mut out,
            "microseg_events_sent_total",
            "counter",
            "Policy events written to the ring buffer by the kernel.",
        );
        let _ = writeln!(
            out,
            "microseg_events_sent_total {}",
            c.get(Counter::EventsSent)
        );
    }
    family(
        &mut out,
        "microseg_interface_enforcing",
        "gauge",
        "1 if the program enforces on the interface's hook as the kernel reports it, 0 if it should and does not.",
    );
    for status in &snapshot.interfaces {
        for (hook, state) in &status.hooks {
            let _ = writeln!(
                out,
                "microseg_interface_enforcing{{interface=\"{}\",hook=\"{hook}\",origin=\"{}\"}} {}",
                status.name,
                status.origin,
                u8::from(state == "enforcing")
            );
        }
    }
    family(
        &mut out,
        "microseg_interfaces_awaiting_policy",
        "gauge",
        "Pods' interfaces whose pod is not known yet (Kubernetes mode): everything beyond their link is dropped until it is.",
    );
    let _ = writeln!(
        out,
        "microseg_interfaces_awaiting_policy {}",
        snapshot
            .interfaces
            .iter()
            .filter(|status| status.awaiting_policy)
            .count()
    );
    family(
        &mut out,
        "microseg_interfaces_held",
        "gauge",
        "Interfaces whose binding could not be written: they run the held program, which drops everything beyond their link, until it is.",
    );
    let _ = writeln!(
        out,
        "microseg_interfaces_held {}",
        snapshot
            .interfaces
            .iter()
            .filter(|status| status.held.is_some())
            .count()
    );
    family(
        &mut out,
        "microseg_policies_refused",
        "gauge",
        "Policies microseg refused (the API server or a watched directory holds them as written) and enforces as their fail-closed substitutes, by kind.",
    );
    for kind in ["NetworkPolicy", "ClusterNetworkPolicy"] {
        let _ = writeln!(
            out,
            "microseg_policies_refused{{kind=\"{kind}\"}} {}",
            snapshot.refused_policies.get(kind).copied().unwrap_or(0)
        );
    }
    family(
        &mut out,
        "microseg_veth_scan_failures_total",
        "counter",
        "Scans for pods' veths that failed; the last good view of the interfaces was kept each time.",
    );
    let _ = writeln!(
        out,
        "microseg_veth_scan_failures_total {}",
        snapshot.veth_scan_failures
    );
    family(
        &mut out,
        "microseg_task_restarts_total",
        "counter",
        "Agent tasks restarted after they failed, panicked or ended.",
    );
    for (task, count) in agent.restarts.snapshot() {
        let _ = writeln!(
            out,
            "microseg_task_restarts_total{{task=\"{task}\"}} {count}"
        );
    }
    family(
        &mut out,
        "microseg_healthy",
        "gauge",
        "1 if every interface enforces, the standby generation slot is in step, and the saved state and watched directories are readable; 0 otherwise (`microseg status` says why).",
    );
    let _ = writeln!(out, "microseg_healthy {}", u8::from(snapshot.healthy));
    family(
        &mut out,
        "microseg_events_received_total",
        "counter",
        "Policy events read from the ring buffer by the agent.",
    );
    let _ = writeln!(
        out,
        "microseg_events_received_total {}",
        agent.hub.received.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "microseg_bpf_map_entries",
        "gauge",
        "Entries in a map, both generation slots.",
    );
    for u in &usage {
        let _ = writeln!(
            out,
            "microseg_bpf_map_entries{{map_name=\"{}\"}} {}",
            u.label(),
            u.entries
        );
    }
    family(
        &mut out,
        "microseg_bpf_map_capacity",
        "gauge",
        "Capacity of a map.",
    );
    for u in &usage {
        let _ = writeln!(
            out,
            "microseg_bpf_map_capacity{{map_name=\"{}\"}} {}",
            u.label(),
            u.capacity
        );
    }
    family(
        &mut out,
        "microseg_bpf_map_pressure",
        "gauge",
        "Map usage against capacity (1 = full); conntrack's counted every 5 s.",
    );
    for u in &usage {
        let _ = writeln!(
            out,
            "microseg_bpf_map_pressure{{map_name=\"{}\"}} {}",
            u.label(),
            u.pressure()
        );
    }
    family(
        &mut out,
        "microseg_policy_generation",
        "gauge",
        "Live policy generation in the data path.",
    );
    let _ = writeln!(out, "microseg_policy_generation {generation}");
    let policies = snapshot.policies;
    family(
        &mut out,
        "microseg_policy",
        "gauge",
        "NetworkPolicies enforced.",
    );
    let _ = writeln!(out, "microseg_policy {policies}");
    family(
        &mut out,
        "microseg_policy_change_total",
        "counter",
        "Policy applies, by outcome.",
    );
    let _ = writeln!(
        out,
        "microseg_policy_change_total{{outcome=\"success\"}} {}",
        snapshot.applies_ok
    );
    let _ = writeln!(
        out,
        "microseg_policy_change_total{{outcome=\"failure\"}} {}",
        snapshot.applies_failed
    );
    family(
        &mut out,
        "microseg_map_entries_written_total",
        "counter",
        "BPF map entries written by policy applies (per generation slot): what changes cost the kernel.",
    );
    let _ = writeln!(
        out,
        "microseg_map_entries_written_total {}",
        snapshot.entries_written
    );
    for (name, help, value) in [
        (
            "microseg_compiler_updates_total",
            "Policy compiler updates: each change compiled as the change it is.",
            snapshot.compiler.updates,
        ),
        (
            "microseg_compiler_full_compiles_total",
            "Compiler updates that compiled everything afresh (the first, or ids exhausted): the fallbacks whose cost follows the cluster, not the change.",
            snapshot.compiler.full_compiles,
        ),
        (
            "microseg_compiler_endpoints_recompiled_total",
            "Endpoint directions whose entries compiler updates worked out again.",
            snapshot.compiler.endpoints_recompiled,
        ),
        (
            "microseg_compiler_rules_reduced_total",
            "Policy rules compiler updates reduced to entries again.",
            snapshot.compiler.rules_reduced,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        &mut out,
        "microseg_policy_apply_duration_seconds",
        "histogram",
        "Time from a validated policy set to its generation being live.",
    );
    let histogram = &snapshot.apply_latency;
    for (bound, count) in APPLY_BUCKETS.iter().zip(histogram.buckets) {
        let _ = writeln!(
            out,
            "microseg_policy_apply_duration_seconds_bucket{{le=\"{bound}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "microseg_policy_apply_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        histogram.count
    );
    let _ = writeln!(
        out,
        "microseg_policy_apply_duration_seconds_sum {}",
        histogram.sum_seconds
    );
    let _ = writeln!(
        out,
        "microseg_policy_apply_duration_seconds_count {}",
        histogram.count
    );
    family(
        &mut out,
        "microseg_event_subscribers",
        "gauge",
        "Connected event subscribers.",
    );
    let _ = writeln!(
        out,
        "microseg_event_subscribers {}",
        agent.hub.subscriber_count()
    );
    let names = agent
        .names
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let ledger = agent.rule_hits.clone();
    if let Ok(records) = tokio::task::spawn_blocking(move || ledger.records(&names)).await {
        rule_hit_families(&mut out, &records);
    }
    out
}

/// Per rule: connections and packets; per workload's default deny: packets denied.
fn rule_hit_families(out: &mut String, records: &[super::rule_hits::HitRecord]) {
    use super::rule_hits::CountedThing;
    family(
        out,
        "microseg_rule_connections_total",
        "counter",
        "Connections (flows judged) each policy rule allowed.",
    );
    for record in records {
        if let CountedThing::Rule(rule) = &record.counted {
            let _ = writeln!(
                out,
                "microseg_rule_connections_total{{{}}} {}",
                rule_labels(rule),
                record.hits.flows
            );
        }
    }
    family(
        out,
        "microseg_rule_packets_total",
        "counter",
        "Packets each policy rule decided: of the flows it allowed, or that it denied.",
    );
    for record in records {
        if let CountedThing::Rule(rule) = &record.counted {
            let _ = writeln!(
                out,
                "microseg_rule_packets_total{{{}}} {}",
                rule_labels(rule),
                record.hits.packets
            );
        }
    }
    family(
        out,
        "microseg_default_deny_packets_total",
        "counter",
        "Packets denied by a workload's default deny (no rule allowed them).",
    );
    for record in records {
        if let CountedThing::DefaultDeny {
            workload,
            direction,
        } = &record.counted
        {
            let (namespace, name) = workload.split_once('/').unwrap_or(("", workload));
            let _ = writeln!(
                out,
                "microseg_default_deny_packets_total{{namespace=\"{}\",workload=\"{}\",direction=\"{}\"}} {}",
                label_value(namespace),
                label_value(name),
                if *direction == microseg_common::policy::Direction::Ingress {
                    "ingress"
                } else {
                    "egress"
                },
                record.hits.packets
            );
        }
    }
}

fn rule_labels(rule: &crate::policy::RuleRef) -> String {
    let kind = if rule.cluster.is_some() {
        "ClusterNetworkPolicy"
    } else {
        "NetworkPolicy"
    };
    format!(
        "kind=\"{kind}\",namespace=\"{}\",policy=\"{}\",direction=\"{}\",rule=\"{}\"",
        label_value(&rule.policy_namespace),
        label_value(&rule.policy_name),
        rule.direction.name(),
        rule.rule_index
    )
}

/// A label value as the exposition format escapes it.
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use microseg_common::{policy::Direction, rule_hits::RuleHits};

    use super::rule_hit_families;
    use crate::{
        agent::rule_hits::{CountedThing, HitRecord},
        policy::{PolicyDirection, RuleRef},
    };

    #[test]
    fn rule_hits_are_counters_labelled_by_policy_and_rule() {
        let record = |counted, packets, flows| HitRecord {
            counted,
            hits: RuleHits { packets, flows },
            last_hit: None,
            since: SystemTime::now(),
        };
        let rule = RuleRef {
            policy_namespace: "prod".into(),
            policy_name: "db \"ingress\"".into(),
            direction: PolicyDirection::Ingress,
            rule_index: 2,
            cluster: None,
        };
        let mut out = String::new();
        rule_hit_families(
            &mut out,
            &[
                record(CountedThing::Rule(rule.into()), 40, 6),
                record(
                    CountedThing::DefaultDeny {
                        workload: "prod/db".into(),
                        direction: Direction::Ingress,
                    },
                    3,
                    0,
                ),
            ],
        );
        let labels = r#"kind="NetworkPolicy",namespace="prod",policy="db \"ingress\"",direction="ingress",rule="2""#;
        assert!(
            out.contains(&format!("microseg_rule_connections_total{{{labels}}} 6\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("microseg_rule_packets_total{{{labels}}} 40\n")),
            "{out}"
        );
        assert!(out.contains(
            "microseg_default_deny_packets_total{namespace=\"prod\",workload=\"db\",direction=\"ingress\"} 3\n"
        ), "{out}");
        assert!(out.contains("# TYPE microseg_rule_packets_total counter"));
    }
}
