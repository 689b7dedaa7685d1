//! `microseg diff`: what a policy change does. Three answers: the observed flows it
//! would newly deny or newly allow, the pairs of the reachability matrix whose
//! allowed ports change, and the policies added, removed or modified.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{
    flows::{FlowKey, ObservedFlow, group},
    reach::{PortRange, Universe, format_ranges},
};
use crate::{
    objects::{ObjectMap, build_policy_set},
    policy::{PolicySet, evaluate},
};

/// A policy set and the objects it was built from (for the object-level changes).
pub struct Side {
    pub objects: ObjectMap,
    pub set: PolicySet,
}

impl Side {
    /// Builds and validates the set; `what` names it in the error ("the new policy
    /// set").
    pub fn build(objects: ObjectMap, what: &str) -> anyhow::Result<Self> {
        let set = build_policy_set(objects.iter()).map_err(|errors| {
            let lines: Vec<String> = errors.errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!(
                "{what} is invalid ({} error{}):\n  {}",
                lines.len(),
                if lines.len() == 1 { "" } else { "s" },
                lines.join("\n  ")
            )
        })?;
        Ok(Self { objects, set })
    }
}

/// A reachability pair whose allowed ports change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairChange {
    pub from: String,
    pub to: String,
    pub added: Vec<PortRange>,
    pub removed: Vec<PortRange>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub modified: Vec<String>,
}

/// Everything `microseg diff` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiffReport {
    /// Observed flows the base allows and the new set denies, with counts.
    pub newly_denied: BTreeMap<FlowKey, u64>,
    /// Observed flows the base denies and the new set allows.
    pub newly_allowed: BTreeMap<FlowKey, u64>,
    /// Observed flows read (those policy judges by port).
    pub flows_considered: usize,
    pub reachability: Vec<PairChange>,
    pub policies: PolicyChanges,
}

impl DiffReport {
    /// Whether what is allowed changes (reachability or an observed flow's verdict).
    pub fn allows_differently(&self) -> bool {
        !self.reachability.is_empty()
            || !self.newly_denied.is_empty()
            || !self.newly_allowed.is_empty()
    }
}

/// Kinds whose objects are policies (the rest is inventory).
const POLICY_KINDS: [&str; 2] = ["NetworkPolicy", "ClusterNetworkPolicy"];

fn policy_changes(base: &ObjectMap, new: &ObjectMap) -> PolicyChanges {
    let mut changes = PolicyChanges::default();
    let policies = |map: &ObjectMap| -> BTreeMap<String, Value> {
        map.iter()
            .filter(|(key, _)| POLICY_KINDS.contains(&key.kind.as_str()))
            .map(|(key, object)| {
                (
                    key.to_string(),
                    object
                        .value
                        .parse()
                        .get("spec")
                        .cloned()
                        .unwrap_or(Value::Null),
                )
            })
            .collect()
    };
    let (before, after) = (policies(base), policies(new));
    for (key, spec) in &after {
        match before.get(key) {
            None => changes.added.push(key.clone()),
            Some(old) if old != spec => changes.modified.push(key.clone()),
            Some(_) => {}
        }
    }
    changes.removed = before
        .keys()
        .filter(|key| !after.contains_key(*key))
        .cloned()
        .collect();
    changes
}

/// Compares `base` and `new` over the union of their nodes and ports, and judges
/// every observed flow with both.
pub fn diff(base: &Side, new: &Side, flows: &[ObservedFlow]) -> DiffReport {
    let observed: Vec<_> = flows
        .iter()
        .flat_map(|f| {
            [
                (Some(f.src), f.protocol, f.port),
                (Some(f.dst), f.protocol, f.port),
            ]
        })
        .collect();
    let universe = Universe::of(&[&base.set, &new.set], &observed);
    let (before, after) = (universe.reach(&base.set), universe.reach(&new.set));
    let mut pairs: Vec<_> = before.pairs().chain(after.pairs()).cloned().collect();
    pairs.sort();
    pairs.dedup();
    let reachability = pairs
        .into_iter()
        .filter_map(|(from, to)| {
            let (added, removed) = universe.changes(&before, &after, &from, &to);
            (!added.is_empty() || !removed.is_empty()).then(|| PairChange {
                from: from.to_string(),
                to: to.to_string(),
                added,
                removed,
            })
        })
        .collect();
    let mut denied = Vec::new();
    let mut allowed = Vec::new();
    for flow in flows {
        let question = crate::policy::Flow {
            src: flow.src,
            dst: flow.dst,
            protocol: flow.protocol,
            port: flow.port,
        };
        match (
            evaluate(&base.set, &question).allowed,
            evaluate(&new.set, &question).allowed,
        ) {
            (true, false) => denied.push(flow),
            (false, true) => allowed.push(flow),
            _ => {}
        }
    }
    let sets = [&new.set, &base.set];
    DiffReport {
        newly_denied: group(denied, &sets),
        newly_allowed: group(allowed, &sets),
        flows_considered: flows.len(),
        reachability,
        policies: policy_changes(&base.objects, &new.objects),
    }
}

fn flows_json(groups: &BTreeMap<FlowKey, u64>) -> Value {
    Value::Array(
        groups
            .iter()
            .map(|(key, count)| {
                json!({
                    "from": key.from.to_string(),
                    "to": key.to.to_string(),
                    "protocol": key.protocol.name(),
                    "port": key.port,
                    "count": count,
                })
            })
            .collect(),
    )
}

fn ranges_json(ranges: &[PortRange]) -> Value {
    Value::Array(
        ranges
            .iter()
            .map(|r| json!({"protocol": r.protocol.name(), "from": r.first, "to": r.last}))
            .collect(),
    )
}

impl DiffReport {
    /// The report for tools (`-o json`).
    pub fn to_json(&self) -> Value {
        json!({
            "changed": self.allows_differently(),
            "flows": {
                "considered": self.flows_considered,
                "newlyDenied": flows_json(&self.newly_denied),
                "newlyAllowed": flows_json(&self.newly_allowed),
            },
            "reachability": self.reachability.iter().map(|c| json!({
                "from": c.from,
                "to": c.to,
                "added": ranges_json(&c.added),
                "removed": ranges_json(&c.removed),
            })).collect::<Vec<_>>(),
            "policies": {
                "added": self.policies.added,
                "removed": self.policies.removed,
                "modified": self.policies.modified,
            },
        })
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut section = |title: String, lines: Vec<String>| {
            out.push_str(&title);
            out.push('\n');
            for line in lines {
                out.push_str("  ");
                out.push_str(&line);
                out.push('\n');
            }
        };
        let flow_lines = |groups: &BTreeMap<FlowKey, u64>| {
            groups
                .iter()
                .map(|(key, count)| {
                    format!(
                        "{key} ({count} event{})",
                        if *count == 1 { "" } else { "s" }
                    )
                })
                .collect::<Vec<_>>()
        };
        let observed = if self.flows_considered == 0 {
            "no observed flows: the agent's history is empty, or give --flows FILE".to_owned()
        } else {
            format!("of {} observed flows", self.flows_considered)
        };
        section(
            format!(
                "Observed flows newly denied: {} ({observed})",
                self.newly_denied.len()
            ),
            flow_lines(&self.newly_denied),
        );
        section(
            format!("Observed flows newly allowed: {}", self.newly_allowed.len()),
            flow_lines(&self.newly_allowed),
        );
        section(
            format!("Reachability changes: {}", self.reachability.len()),
            self.reachability
                .iter()
                .map(|c| {
                    let mut parts = Vec::new();
                    if !c.added.is_empty() {
                        parts.push(format!("+ {}", format_ranges(&c.added)));
                    }
                    if !c.removed.is_empty() {
                        parts.push(format!("- {}", format_ranges(&c.removed)));
                    }
                    format!("{} -> {}: {}", c.from, c.to, parts.join("  "))
                })
                .collect(),
        );
        let policies = &self.policies;
        let mut lines: Vec<String> = policies.added.iter().map(|p| format!("+ {p}")).collect();
        lines.extend(policies.removed.iter().map(|p| format!("- {p}")));
        lines.extend(policies.modified.iter().map(|p| format!("~ {p}")));
        section(
            format!(
                "Policies: {} added, {} removed, {} modified",
                policies.added.len(),
                policies.removed.len(),
                policies.modified.len()
            ),
            lines,
        );
        out
    }
}
