//! `microseg suggest`: NetworkPolicies that allow exactly the observed connections.
//!
//! - [`observed`]: flow events (`microseg events -o json`, the event log, Hubble's
//!   JSON) to connections, replies left out;
//! - [`workload`]: which labels identify a pod's workload;
//! - [`generate`]: one policy per workload, rules merged by ports and peers, DNS;
//! - [`render`]: Kubernetes objects and YAML, with the evidence in annotations;
//! - [`verify`]: the suggestion loaded with the project's loader and judged by the
//!   reference evaluator: every observed connection must be allowed, and what else
//!   is allowed is reported.

pub mod generate;
pub mod observed;
pub mod render;
pub mod verify;
pub mod workload;

#[cfg(test)]
mod tests;

use std::fmt::Write as _;

use anyhow::bail;
use serde::Serialize;

pub use generate::{PortKey, Suggestion, suggest_policies};
pub use observed::{Collector, Connection, Ignored, Observation};
pub use render::NetworkPolicy;
pub use verify::{AlsoAllowed, Inventory, InventoryPod, SelfCheck};

/// What `suggest` says beside the policies.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Flow events read.
    pub events: usize,
    /// Distinct connections (5-tuples) those events amount to.
    pub connections: usize,
    pub ignored: Ignored,
    pub warnings: Vec<String>,
    #[serde(rename = "selfCheck")]
    pub self_check: SelfCheck,
    /// Workloads the "what else" matrix ran over.
    #[serde(rename = "inventoryWorkloads")]
    pub inventory_workloads: usize,
    /// The ports it ran on.
    pub ports: Vec<String>,
    /// Allowed pairs that were not observed.
    #[serde(rename = "alsoAllowed")]
    pub also_allowed: Vec<AlsoAllowed>,
}

/// Suggested policies and the report.
pub struct SuggestOutput {
    pub policies: Vec<NetworkPolicy>,
    pub yaml: String,
    pub report: Report,
}

/// Suggests policies for the observed connections (of workloads in `namespace`, if
/// given), checks them, and reports what else they allow over `inventory` (the
/// agent's, when it was asked; else the observed pods).
pub fn suggest(
    observation: &Observation,
    namespace: Option<&str>,
    inventory: Option<&Inventory>,
) -> anyhow::Result<SuggestOutput> {
    let connections = &observation.connections;
    if connections.is_empty() {
        bail!(
            "no connections to suggest policies for: {} events read, {}",
            observation.events,
            ignored_text(&observation.ignored)
        );
    }
    let suggestion = suggest_policies(connections, namespace);
    if suggestion.policies.is_empty() {
        bail!(
            "none of the {} observed connections involves a workload{} that a policy can select",
            connections.len(),
            namespace.map_or(String::new(), |ns| format!(" of namespace {ns}"))
        );
    }
    let policies: Vec<NetworkPolicy> = suggestion
        .policies
        .iter()
        .map(render::network_policy)
        .collect();
    let yaml = render::policies_yaml(&policies)?;

    // Every observed connection must be allowed, judged with exactly the pods the
    // events named.
    let observed_inventory = Inventory::from_connections(connections);
    let set = verify::policy_set(&observed_inventory, &yaml).map_err(|errors| {
        anyhow::anyhow!(
            "the suggested policies do not load (a bug in microseg suggest):\n  {errors}"
        )
    })?;
    let self_check = verify::self_check(&set, connections);
    if !self_check.denied.is_empty() {
        bail!(
            "the suggested policies deny {} observed connections (a bug in microseg suggest):\n  {}",
            self_check.denied.len(),
            self_check.denied.join("\n  ")
        );
    }

    // What else: over the fullest inventory known.
    let report_set = match inventory {
        Some(known) => {
            let mut merged = known.clone();
            merged.add_missing(&observed_inventory);
            verify::policy_set(&merged, &yaml).map_err(|errors| {
                anyhow::anyhow!(
                    "the suggested policies do not load beside the agent's inventory:\n  {errors}"
                )
            })?
        }
        None => set,
    };
    let also_allowed = verify::also_allowed(&report_set, &suggestion, connections);
    let ports: std::collections::BTreeSet<PortKey> = suggestion
        .policies
        .iter()
        .flat_map(|p| p.ingress.iter().chain(&p.egress))
        .flat_map(|rule| rule.ports.iter().copied())
        .collect();
    Ok(SuggestOutput {
        policies,
        yaml,
        report: Report {
            events: observation.events,
            connections: connections.len(),
            ignored: observation.ignored.clone(),
            warnings: suggestion.warnings,
            self_check,
            inventory_workloads: report_set.workloads.len(),
            ports: ports.iter().map(ToString::to_string).collect(),
            also_allowed,
        },
    })
}

fn ignored_text(ignored: &Ignored) -> String {
    let mut parts = Vec::new();
    for (count, what) in [
        (ignored.denied, "denied (count them with --include-denied)"),
        (
            ignored.tcp_not_opener,
            "TCP packets other than a connection's opener",
        ),
        (ignored.replies, "UDP/SCTP replies"),
        (ignored.not_tcp_udp_sctp, "not TCP, UDP or SCTP"),
        (
            ignored.incomplete,
            "without addresses, ports or a verdict read here",
        ),
    ] {
        if count > 0 {
            parts.push(format!("{count} {what}"));
        }
    }
    if parts.is_empty() {
        "none ignored".to_owned()
    } else {
        format!("ignored: {}", parts.join(", "))
    }
}

impl Report {
    /// The report as lines for stderr.
    pub fn text(&self, policies: usize) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "suggested {policies} NetworkPolicies from {} connections ({} events; {})",
            self.connections,
            self.events,
            ignored_text(&self.ignored)
        );
        for warning in &self.warnings {
            let _ = writeln!(text, "warning: {warning}");
        }
        let _ = writeln!(
            text,
            "self-check: the reference evaluator allows all {} observed connections under the suggested policies{}",
            self.self_check.allowed,
            if self.self_check.unchecked.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} not checked: an address of theirs now belongs to another pod)",
                    self.self_check.unchecked.len()
                )
            }
        );
        if self.also_allowed.is_empty() {
            let _ = writeln!(
                text,
                "what else they allow: nothing, over {} workloads on {}",
                self.inventory_workloads,
                self.ports.join(", ")
            );
        } else {
            let _ = writeln!(
                text,
                "what else they allow, over {} workloads on {}: {} pairs not observed:",
                self.inventory_workloads,
                self.ports.join(", "),
                self.also_allowed.len()
            );
            for pair in &self.also_allowed {
                let _ = writeln!(
                    text,
                    "  {} -> {} {}/{}: {} (by {})",
                    pair.source,
                    pair.destination,
                    pair.protocol,
                    pair.port,
                    pair.note,
                    pair.allowed_by.join(", ")
                );
            }
        }
        text
    }
}
