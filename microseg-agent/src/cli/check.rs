//! `microseg check` and `microseg compile`: what a policy set allows, answered by the
//! reference evaluator or (`--datapath`) by the real eBPF programs over the compiled
//! maps, before anything reaches production.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::table::Table;
use crate::{
    datapath::{
        AttachPoint, Datapath, DatapathState, LoadOptions, ProgramVerdict, XdpAttachMode,
        probe::Probe,
    },
    policy::{
        EndpointRef, Flow, PolicySet, Protocol, VerdictReason, compile, evaluate, load_paths,
    },
};
use microseg_common::endpoint::{ENDPOINT_FLAG_EGRESS_ENFORCED, ENDPOINT_FLAG_INGRESS_ENFORCED};

pub struct CheckArgs {
    pub paths: Vec<PathBuf>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    pub matrix: bool,
    pub datapath: bool,
    pub json: bool,
}

pub fn load_set(paths: &[PathBuf]) -> anyhow::Result<PolicySet> {
    if paths.is_empty() {
        bail!("give the policies and inventory with --policy and --inventory");
    }
    load_paths(paths).map_err(|errors| {
        let lines: Vec<String> = errors.errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!(
            "the policy set is invalid ({} errors):\n  {}",
            lines.len(),
            lines.join("\n  ")
        )
    })
}

pub fn compile_stats(paths: &[PathBuf], json_output: bool) -> anyhow::Result<()> {
    let set = load_set(paths)?;
    let compiled = compile(&set);
    let stats = compiled.stats();
    if json_output {
        println!(
            "{}",
            json!({
                "workloads": set.workloads.len(),
                "policies": set.policies.len(),
                "enforcedWorkloads": stats.enforced_workloads,
                "rules": stats.rules,
                "identities": {"workload": stats.workload_identities, "cidr": stats.cidr_identities},
                "maps": {
                    "endpoints": stats.maps.endpoints,
                    "peer_hosts": stats.maps.peer_hosts,
                    "peer_prefixes": stats.maps.peer_prefixes,
                    "policy": stats.maps.policy - stats.maps.policy_exact,
                    "policy_exact": stats.maps.policy_exact,
                },
            })
        );
        return Ok(());
    }
    let mut table = Table::new(&["MAP", "ENTRIES"]);
    for (map, entries) in [
        ("ENDPOINTS", stats.maps.endpoints),
        ("PEER_HOSTS", stats.maps.peer_hosts),
        ("PEER_PREFIXES", stats.maps.peer_prefixes),
        ("POLICY", stats.maps.policy - stats.maps.policy_exact),
        ("POLICY_EXACT", stats.maps.policy_exact),
    ] {
        table.row(vec![map.to_owned(), entries.to_string()]);
    }
    println!(
        "{} workloads ({} enforced), {} policies, {} rules, {} workload identities, {} CIDR identities\n",
        set.workloads.len(),
        stats.enforced_workloads,
        set.policies.len(),
        stats.rules,
        stats.workload_identities,
        stats.cidr_identities
    );
    print!("{}", table.render());
    Ok(())
}

/// Answers flows with the real programs: the compiled state in freshly loaded,
/// private maps, one probe packet per question through BPF_PROG_TEST_RUN.
struct KernelJudge {
    datapath: Datapath,
    current: DatapathState,
    next_port: u16,
}

impl KernelJudge {
    fn new(state: &DatapathState) -> anyhow::Result<Self> {
        let mut datapath = Datapath::load(&LoadOptions::default())
            .context("--datapath loads the eBPF programs: run as root")?;
        datapath.apply(&DatapathState::default(), state)?;
        Ok(Self {
            datapath,
            current: state.clone(),
            next_port: 10_000,
        })
    }

    fn switch_to(&mut self, state: &DatapathState) -> anyhow::Result<()> {
        self.datapath.apply(&self.current, state)?;
        self.current = state.clone();
        Ok(())
    }

    /// The kernel's verdict on the flow's first packet. Each probe uses a new source
    /// port, so no conntrack entry answers for the policy.
    fn allowed(&mut self, flow: &Flow) -> anyhow::Result<bool> {
        self.next_port = self.next_port.checked_add(1).unwrap_or(10_000);
        let probe = match flow.protocol {
            Protocol::Tcp => Probe::tcp(flow.src, self.next_port, flow.dst, flow.port),
            Protocol::Udp => Probe::udp(flow.src, self.next_port, flow.dst, flow.port),
            Protocol::Sctp => Probe::sctp(flow.src, self.next_port, flow.dst, flow.port),
        };
        let verdict = self
            .datapath
            .test_run(AttachPoint::Xdp(XdpAttachMode::Default), &probe.to_frame())?;
        match verdict {
            ProgramVerdict::Pass => Ok(true),
            ProgramVerdict::Drop => Ok(false),
            ProgramVerdict::Other(code) => bail!("the program returned {code}"),
        }
    }
}

/// The state with only one direction enforced, to ask the kernel about each
/// direction separately.
fn only_direction(state: &DatapathState, keep: u16) -> DatapathState {
    let mut state = state.clone();
    for info in state.endpoints.values_mut() {
        info.flags &= !(ENDPOINT_FLAG_INGRESS_ENFORCED | ENDPOINT_FLAG_EGRESS_ENFORCED) | keep;
    }
    state
}

fn direction_json(verdict: &crate::policy::DirectionVerdict) -> Value {
    let (enforced, rules, selected_by) = match &verdict.reason {
        VerdictReason::NotEnforced => (false, Vec::new(), Vec::new()),
        VerdictReason::AllowedBy(rules) => (
            true,
            rules.iter().map(ToString::to_string).collect(),
            Vec::new(),
        ),
        VerdictReason::DeniedByDefault { selected_by } => (true, Vec::new(), selected_by.clone()),
        VerdictReason::DecidedBy(_) => (true, Vec::new(), Vec::new()),
    };
    let mut direction = json!({
        "verdict": if verdict.allowed { "allow" } else { "deny" },
        "enforced": enforced,
        "allowedBy": rules,
        "selectedBy": selected_by,
        "explanation": verdict.explanation,
    });
    if let VerdictReason::DecidedBy(rule) = &verdict.reason
        && let Some(info) = &rule.cluster
    {
        direction["decidedBy"] = json!({
            "kind": "ClusterNetworkPolicy",
            "policy": rule.policy_name,
            "tier": info.tier.name(),
            "priority": info.priority,
            "rule": rule.rule_index,
            "ruleName": info.name,
            "action": info.action.name(),
        });
    }
    direction
}

fn resolve(set: &PolicySet, text: &str) -> anyhow::Result<EndpointRef> {
    text.parse::<EndpointRef>()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .and_then(|r| {
            if let EndpointRef::Workload { namespace, name } = &r
                && set.workload(namespace, name).is_none()
            {
                bail!("workload {namespace}/{name} is not in the inventory");
            }
            Ok(r)
        })
}

pub fn check(args: &CheckArgs) -> anyhow::Result<bool> {
    let set = load_set(&args.paths)?;
    let compiled = compile(&set);
    if args.matrix {
        return matrix(&set, &compiled.state, args);
    }
    let (Some(from), Some(to)) = (&args.from, &args.to) else {
        bail!("give --from and --to (namespace/name or an IP address), or --matrix");
    };
    let src = resolve(&set, from)?;
    let dst = resolve(&set, to)?;
    let flow = Flow::between(&set, &src, &dst, args.protocol, args.port)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let reference = evaluate(&set, &flow);
    let (allowed, ingress, egress, engine) = if args.datapath {
        let mut kernel = KernelJudge::new(&compiled.state)?;
        let allowed = kernel.allowed(&flow)?;
        kernel.switch_to(&only_direction(
            &compiled.state,
            ENDPOINT_FLAG_INGRESS_ENFORCED,
        ))?;
        let ingress = kernel.allowed(&flow)?;
        kernel.switch_to(&only_direction(
            &compiled.state,
            ENDPOINT_FLAG_EGRESS_ENFORCED,
        ))?;
        let egress = kernel.allowed(&flow)?;
        if (allowed, ingress, egress)
            != (
                reference.allowed,
                reference.ingress.allowed,
                reference.egress.allowed,
            )
        {
            eprintln!(
                "warning: the data path and the reference evaluator disagree on {flow}: kernel {allowed}/{ingress}/{egress}, evaluator {}/{}/{}",
                reference.allowed, reference.ingress.allowed, reference.egress.allowed
            );
        }
        (allowed, ingress, egress, "datapath")
    } else {
        (
            reference.allowed,
            reference.ingress.allowed,
            reference.egress.allowed,
            "evaluator",
        )
    };
    let word = |a: bool| if a { "allow" } else { "deny" };
    if args.json {
        let mut ingress_json = direction_json(&reference.ingress);
        ingress_json["verdict"] = json!(word(ingress));
        let mut egress_json = direction_json(&reference.egress);
        egress_json["verdict"] = json!(word(egress));
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "from": from, "to": to,
                "port": args.port, "protocol": args.protocol.to_string(),
                "verdict": word(allowed),
                "engine": engine,
                "ingress": ingress_json,
                "egress": egress_json,
            }))?
        );
    } else {
        println!(
            "{from} -> {to} {}/{}: {} ({engine})",
            args.protocol,
            args.port,
            word(allowed).to_uppercase()
        );
        print_direction("egress at the source", egress, &reference.egress);
        print_direction("ingress at the destination", ingress, &reference.ingress);
    }
    Ok(allowed)
}

fn print_direction(label: &str, allowed: bool, verdict: &crate::policy::DirectionVerdict) {
    let word = if allowed { "allow" } else { "deny" };
    println!("  {label}: {word}: {}", verdict.explanation);
}

fn matrix(set: &PolicySet, state: &DatapathState, args: &CheckArgs) -> anyhow::Result<bool> {
    let mut kernel = if args.datapath {
        Some(KernelJudge::new(state)?)
    } else {
        None
    };
    let names: Vec<String> = set.workloads.iter().map(|w| w.key()).collect();
    let mut entries = Vec::new();
    let mut error = None;
    let pairs = (names.len() * names.len().saturating_sub(1)) as u64;
    let progress = super::progress::bar(pairs, "checking");
    for (i, from) in set.workloads.iter().enumerate() {
        for (j, to) in set.workloads.iter().enumerate() {
            if i == j {
                continue;
            }
            progress.inc(1);
            let (Some(src), Some(dst)) = (
                first_address(from),
                matching_address(to, first_address(from)),
            ) else {
                continue;
            };
            let flow = Flow {
                src,
                dst,
                protocol: args.protocol,
                port: args.port,
            };
            let allowed = match kernel.as_mut() {
                Some(kernel) => match kernel.allowed(&flow) {
                    Ok(a) => a,
                    Err(e) => {
                        error = Some(e);
                        false
                    }
                },
                None => evaluate(set, &flow).allowed,
            };
            entries.push((i, j, allowed));
        }
    }
    progress.finish_and_clear();
    if let Some(e) = error {
        return Err(e);
    }
    if args.json {
        let list: Vec<Value> = entries
            .iter()
            .map(|(i, j, allowed)| {
                json!({
                    "from": names[*i], "to": names[*j],
                    "port": args.port, "protocol": args.protocol.to_string(),
                    "verdict": if *allowed { "allow" } else { "deny" },
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "engine": if args.datapath { "datapath" } else { "evaluator" },
                "port": args.port, "protocol": args.protocol.to_string(),
                "matrix": list,
            }))?
        );
        return Ok(true);
    }
    let mut headers = vec![format!("FROM \\ TO ({}/{})", args.protocol, args.port)];
    headers.extend(names.iter().cloned());
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut table = Table::new(&header_refs);
    for (i, name) in names.iter().enumerate() {
        let mut row = vec![name.clone()];
        for j in 0..names.len() {
            let cell = if i == j {
                "-".to_owned()
            } else {
                match entries.iter().find(|(a, b, _)| *a == i && *b == j) {
                    Some((_, _, true)) => "allow".to_owned(),
                    Some((_, _, false)) => "deny".to_owned(),
                    None => "n/a".to_owned(),
                }
            };
            row.push(cell);
        }
        table.row(row);
    }
    print!("{}", table.render());
    Ok(true)
}

fn first_address(workload: &crate::policy::Workload) -> Option<IpAddr> {
    workload.addresses.first().copied()
}

/// An address of `workload` in the same family as `like`.
fn matching_address(workload: &crate::policy::Workload, like: Option<IpAddr>) -> Option<IpAddr> {
    let like = like?;
    workload
        .addresses
        .iter()
        .copied()
        .find(|a| a.is_ipv4() == like.is_ipv4())
}

/// Parses `tcp|udp|sctp`.
pub fn parse_protocol(text: &str) -> Result<Protocol, String> {
    text.parse()
}
