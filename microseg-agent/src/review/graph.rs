//! `microseg graph`: the reachability of a policy set as a graph of workloads (or
//! namespaces) and outside address blocks, edges labelled with the ports allowed and
//! the policies allowing them, plus the observed flows that were denied. Rendered as
//! Graphviz DOT (`dot.rs`) or a self-contained HTML page with an SVG laid out here
//! (`svg.rs`). Everything is sorted, so the output diffs well.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    flows::{ObservedFlow, ObservedVerdict, group},
    reach::{Node, Policies, PortRange, Universe, format_ranges},
};
use crate::policy::PolicySet;

/// What a node of the graph stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeKind {
    Workload,
    Namespace,
    /// An address block outside the inventory (ipBlock, observed address).
    External,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GraphNode {
    /// Unique: `namespace/name`, `namespace` (by namespace) or the block.
    pub id: String,
    /// What is written in the box: the workload's name, the namespace, the block.
    pub label: String,
    /// The namespace drawn around it; `None` outside the inventory.
    pub group: Option<String>,
    pub kind: NodeKind,
}

/// Ports allowed along an edge by one set of policies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedPorts {
    pub ranges: Vec<PortRange>,
    /// Empty: allowed because no policy enforces either end.
    pub policies: Policies,
}

impl AllowedPorts {
    /// `TCP/8080 (prod/api)`, or `any (no policy)`.
    pub fn label(&self) -> String {
        let ports = format_ranges(&self.ranges);
        if self.policies.is_empty() {
            format!("{ports} (no policy)")
        } else {
            let policies: Vec<&str> = self.policies.iter().map(String::as_str).collect();
            format!("{ports} ({})", policies.join(", "))
        }
    }
}

/// Denied observed flows along an edge, per protocol and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedPorts {
    /// (range of one port, events).
    pub ports: Vec<(PortRange, u64)>,
}

impl DeniedPorts {
    /// `denied TCP/5432 x3, UDP/53 x1`.
    pub fn label(&self) -> String {
        let parts: Vec<String> = self
            .ports
            .iter()
            .map(|(range, count)| format!("{range} x{count}"))
            .collect();
        format!("denied {}", parts.join(", "))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphEdge {
    pub from: String,
    pub to: String,
    /// Grouped by the policies allowing them, in port order.
    pub allowed: Vec<AllowedPorts>,
    /// Observed flows denied (or audited: would be denied) along this edge.
    pub denied: Option<DeniedPorts>,
}

impl GraphEdge {
    /// Allowed only because nothing enforces: drawn faintly.
    pub fn unrestricted(&self) -> bool {
        !self.allowed.is_empty() && self.allowed.iter().all(|a| a.policies.is_empty())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GroupBy {
    #[default]
    Workload,
    Namespace,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graph {
    pub title: String,
    /// Sorted: workloads and namespaces by name, then address blocks.
    pub nodes: Vec<GraphNode>,
    /// Sorted by (from, to).
    pub edges: Vec<GraphEdge>,
}

impl Graph {
    /// The graph of `set` (nodes and ports as [`Universe`] finds them) with the
    /// denied and audited flows of `flows` marked.
    pub fn build(set: &PolicySet, flows: &[ObservedFlow], by: GroupBy, title: &str) -> Self {
        let denied: Vec<&ObservedFlow> = flows
            .iter()
            .filter(|f| f.verdict != ObservedVerdict::Allowed)
            .filter(|f| {
                !crate::policy::evaluate(
                    set,
                    &crate::policy::Flow {
                        src: f.src,
                        dst: f.dst,
                        protocol: f.protocol,
                        port: f.port,
                    },
                )
                .allowed
            })
            .collect();
        // Observed addresses are nodes only through their denied flows: what every
        // unenforced workload may send them says nothing.
        let universe = Universe::of(&[set], &[]);
        let reach = universe.reach(set);
        let node_of = |node: &Node| -> GraphNode {
            match (node, by) {
                (Node::Workload { namespace, name }, GroupBy::Workload) => GraphNode {
                    id: node.to_string(),
                    label: name.clone(),
                    group: Some(namespace.clone()),
                    kind: NodeKind::Workload,
                },
                (Node::Workload { namespace, .. }, GroupBy::Namespace) => GraphNode {
                    id: namespace.clone(),
                    label: namespace.clone(),
                    group: None,
                    kind: NodeKind::Namespace,
                },
                (Node::External(_), _) => GraphNode {
                    id: node.to_string(),
                    label: node.to_string(),
                    group: None,
                    kind: NodeKind::External,
                },
            }
        };
        let mut nodes: BTreeSet<GraphNode> = universe.nodes().map(&node_of).collect();
        // Allowed ranges per (from, to) and policy set; in namespace view the
        // member pairs' ranges are merged.
        let mut allowed: BTreeMap<(String, String), BTreeMap<Policies, BTreeSet<PortRange>>> =
            BTreeMap::new();
        for (from, to) in reach.pairs() {
            let (a, b) = (node_of(from), node_of(to));
            let grants = universe.grants(&reach, from, to);
            // An address block is reachable from (or reaches) every workload no
            // policy restricts: only edges a policy decides are drawn to blocks.
            let external = a.kind == NodeKind::External || b.kind == NodeKind::External;
            if external && grants.iter().all(|g| g.policies.is_empty()) {
                continue;
            }
            let entry = allowed.entry((a.id, b.id)).or_default();
            for grant in grants {
                entry.entry(grant.policies).or_default().insert(grant.range);
            }
        }
        let mut denied_by_edge: BTreeMap<(String, String), BTreeMap<PortRange, u64>> =
            BTreeMap::new();
        for (key, count) in group(denied, &[set]) {
            let (a, b) = (node_of(&key.from), node_of(&key.to));
            let range = PortRange {
                protocol: key.protocol,
                first: key.port,
                last: key.port,
            };
            *denied_by_edge
                .entry((a.id.clone(), b.id.clone()))
                .or_default()
                .entry(range)
                .or_insert(0) += count;
            nodes.insert(a);
            nodes.insert(b);
        }
        let keys: BTreeSet<(String, String)> = allowed
            .keys()
            .chain(denied_by_edge.keys())
            .cloned()
            .collect();
        let edges = keys
            .into_iter()
            .map(|key| GraphEdge {
                allowed: allowed
                    .get(&key)
                    .map(|by_policies| {
                        let mut groups: Vec<AllowedPorts> = by_policies
                            .iter()
                            .map(|(policies, ranges)| AllowedPorts {
                                ranges: merge_ranges(ranges),
                                policies: policies.clone(),
                            })
                            .collect();
                        // In port order, as people read them.
                        groups.sort_by(|a, b| {
                            (&a.ranges, &a.policies).cmp(&(&b.ranges, &b.policies))
                        });
                        groups
                    })
                    .unwrap_or_default(),
                denied: denied_by_edge.get(&key).map(|ports| DeniedPorts {
                    ports: ports.iter().map(|(r, c)| (*r, *c)).collect(),
                }),
                from: key.0,
                to: key.1,
            })
            .collect();
        let mut nodes: Vec<GraphNode> = nodes.into_iter().collect();
        // Address blocks after the inventory.
        nodes.sort_by(|a, b| {
            (a.kind == NodeKind::External, &a.id).cmp(&(b.kind == NodeKind::External, &b.id))
        });
        Graph {
            title: title.to_owned(),
            nodes,
            edges,
        }
    }

    /// The namespaces drawn as groups, sorted.
    pub fn groups(&self) -> Vec<String> {
        let groups: BTreeSet<String> = self.nodes.iter().filter_map(|n| n.group.clone()).collect();
        groups.into_iter().collect()
    }
}

/// Sorted ranges with adjacent and overlapping ones of a protocol joined.
fn merge_ranges(ranges: &BTreeSet<PortRange>) -> Vec<PortRange> {
    let mut merged: Vec<PortRange> = Vec::new();
    for range in ranges {
        if let Some(last) = merged.last_mut()
            && last.protocol == range.protocol
            && u32::from(last.last) + 1 >= u32::from(range.first)
        {
            last.last = last.last.max(range.last);
            continue;
        }
        merged.push(*range);
    }
    merged
}
