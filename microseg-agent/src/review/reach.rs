//! What a policy set allows between its workloads and the address blocks its
//! policies name, over every protocol and port, computed exactly with the reference
//! evaluator.
//!
//! Ports are not probed one by one: every port rule of every policy (ranges, single
//! ports, named ports resolved on each workload) cuts 1-65535 into intervals inside
//! which no rule can tell two ports apart, so one evaluation per interval answers
//! for the whole interval. `microseg diff` compares two sets over the same
//! [`Universe`] (the union of both sets' nodes and cuts); `microseg graph` draws one.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use ipnet::IpNet;

use crate::policy::{
    Flow, FlowVerdict, Peer, PolicyDirection, PolicySet, PortRule, PortSpec, Protocol,
    VerdictReason, evaluate,
};

/// One end of a connection: a workload of the inventory, or an address block
/// outside it (an ipBlock a policy names, or an observed address, as a /32 or /128).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    Workload { namespace: String, name: String },
    External(IpNet),
}

impl Node {
    pub fn workload(namespace: &str, name: &str) -> Self {
        Node::Workload {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The namespace of a workload; `None` for an address block.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Node::Workload { namespace, .. } => Some(namespace),
            Node::External(_) => None,
        }
    }
}

impl fmt::Display for Node {
    /// `namespace/name`, or the block (`10.0.0.0/8`, a single address without `/32`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Workload { namespace, name } => write!(f, "{namespace}/{name}"),
            Node::External(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())
            }
            Node::External(net) => write!(f, "{net}"),
        }
    }
}

/// A protocol and an inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn is_every_port(&self) -> bool {
        self.first == 1 && self.last == u16::MAX
    }
}

impl fmt::Display for PortRange {
    /// `TCP/8080`, `TCP/8000-8099`, `TCP/*` (every port).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_every_port() {
            write!(f, "{}/*", self.protocol)
        } else if self.first == self.last {
            write!(f, "{}/{}", self.protocol, self.first)
        } else {
            write!(f, "{}/{}-{}", self.protocol, self.first, self.last)
        }
    }
}

/// Writes ranges compactly, merging ports of one protocol: `TCP/5432,6379 UDP/53`;
/// every port of all three protocols is `any`.
pub fn format_ranges(ranges: &[PortRange]) -> String {
    let every = Protocol::ALL.iter().all(|protocol| {
        ranges
            .iter()
            .any(|r| r.protocol == *protocol && r.is_every_port())
    });
    if every {
        return "any".to_owned();
    }
    let mut by_protocol: BTreeMap<Protocol, Vec<String>> = BTreeMap::new();
    for range in ranges {
        let text = if range.is_every_port() {
            "*".to_owned()
        } else if range.first == range.last {
            range.first.to_string()
        } else {
            format!("{}-{}", range.first, range.last)
        };
        by_protocol.entry(range.protocol).or_default().push(text);
    }
    by_protocol
        .iter()
        .map(|(protocol, ports)| format!("{protocol}/{}", ports.join(",")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The policies that allowed a flow (`namespace/name`, `ClusterNetworkPolicy/name`);
/// empty when neither end enforces the direction that judged it.
pub type Policies = BTreeSet<String>;

/// Port ranges allowed between two nodes, each with the policies allowing it;
/// adjacent ports with the same policies are one range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub range: PortRange,
    pub policies: Policies,
}

/// The policies of a flow's allowing verdict: every matching rule's policy in both
/// directions (ClusterNetworkPolicy Accepts included).
pub fn allowing_policies(verdict: &FlowVerdict) -> Policies {
    let mut policies = Policies::new();
    for direction in [&verdict.egress, &verdict.ingress] {
        match &direction.reason {
            VerdictReason::AllowedBy(rules) => {
                policies.extend(rules.iter().map(|rule| rule.policy_key()));
            }
            VerdictReason::DecidedBy(rule) if direction.allowed => {
                policies.insert(rule.policy_key());
            }
            _ => {}
        }
    }
    policies
}

/// The intervals of one protocol's ports (1-65535) inside which every rule of the
/// sets compared answers alike: `starts[i]..starts[i + 1]`, the last up to 65535.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Cuts {
    starts: Vec<u16>,
}

impl Cuts {
    fn new(mut starts: BTreeSet<u16>) -> Self {
        starts.insert(1);
        starts.remove(&0);
        Self {
            starts: starts.into_iter().collect(),
        }
    }

    fn range(&self, protocol: Protocol, index: usize) -> PortRange {
        let first = self.starts[index];
        let last = self.starts.get(index + 1).map_or(u16::MAX, |next| next - 1);
        PortRange {
            protocol,
            first,
            last,
        }
    }

    #[cfg(test)]
    fn index_of(&self, port: u16) -> Option<usize> {
        if port == 0 {
            return None;
        }
        Some(self.starts.partition_point(|start| *start <= port) - 1)
    }
}

/// A node with the addresses its flows use.
#[derive(Clone, Debug)]
struct NodeAddresses {
    node: Node,
    /// For an address block: one address inside it that is in no `except`, no
    /// narrower block of the universe and no workload; workloads are looked up in
    /// each set.
    representative: Option<IpAddr>,
}

/// The nodes and port intervals two (or one) policy sets are compared over.
#[derive(Clone, Debug)]
pub struct Universe {
    nodes: Vec<NodeAddresses>,
    cuts: BTreeMap<Protocol, Cuts>,
}

/// A rule's peers and ports (`None`: every peer, every port).
type RuleParts<'a> = (Option<&'a [Peer]>, Option<&'a [PortRule]>);

/// Every port rule and ipBlock of a set's policies, NetworkPolicies and
/// ClusterNetworkPolicies alike.
fn rules_of(set: &PolicySet) -> Vec<RuleParts<'_>> {
    let mut rules = Vec::new();
    for policy in &set.policies {
        for list in [&policy.ingress, &policy.egress].into_iter().flatten() {
            rules.extend(
                list.iter()
                    .map(|rule| (rule.peers.as_deref(), rule.ports.as_deref())),
            );
        }
    }
    for policy in &set.cluster_policies {
        for list in [&policy.ingress, &policy.egress] {
            rules.extend(
                list.iter()
                    .map(|rule| (rule.peers.as_deref(), rule.ports.as_deref())),
            );
        }
    }
    rules
}

impl Universe {
    /// The nodes and cuts of `sets` (their workloads, their policies' ipBlocks and
    /// ports), plus `observed` flows' ports and outside addresses.
    pub fn of(sets: &[&PolicySet], observed: &[(Option<IpAddr>, Protocol, u16)]) -> Self {
        let mut starts: BTreeMap<Protocol, BTreeSet<u16>> = Protocol::ALL
            .iter()
            .map(|protocol| (*protocol, BTreeSet::new()))
            .collect();
        let mut cut = |protocol: Protocol, first: u16, last: u16| {
            let starts = starts.get_mut(&protocol).expect("every protocol has cuts");
            starts.insert(first);
            if let Some(after) = last.checked_add(1) {
                starts.insert(after);
            }
        };
        let mut nodes: BTreeSet<Node> = BTreeSet::new();
        let mut workload_addresses: BTreeSet<IpAddr> = BTreeSet::new();
        let mut blocks: BTreeMap<IpNet, Vec<IpNet>> = BTreeMap::new();
        for set in sets {
            for workload in &set.workloads {
                if !workload.addresses.is_empty() {
                    nodes.insert(Node::workload(&workload.namespace, &workload.name));
                }
                workload_addresses.extend(workload.addresses.iter().copied());
                for port in &workload.ports {
                    cut(port.protocol, port.port, port.port);
                }
            }
            for (peers, ports) in rules_of(set) {
                for peer in peers.unwrap_or_default() {
                    if let Peer::IpBlock(block) = peer {
                        blocks
                            .entry(block.cidr)
                            .or_default()
                            .extend(block.except.iter().copied());
                    }
                }
                for rule in ports.unwrap_or_default() {
                    match &rule.port {
                        PortSpec::Any => {}
                        PortSpec::Range { first, last } => cut(rule.protocol, *first, *last),
                        PortSpec::Named(name) => {
                            for workload in &set.workloads {
                                for port in workload.resolve_named_port(name, rule.protocol) {
                                    cut(rule.protocol, port, port);
                                }
                            }
                        }
                    }
                }
            }
        }
        for (address, protocol, port) in observed {
            cut(*protocol, *port, *port);
            if let Some(address) = address
                && !workload_addresses.contains(address)
            {
                blocks.entry(IpNet::from(*address)).or_default();
            }
        }
        let mut nodes: Vec<NodeAddresses> = nodes
            .into_iter()
            .map(|node| NodeAddresses {
                node,
                representative: None,
            })
            .collect();
        for (cidr, except) in &blocks {
            let narrower: Vec<&IpNet> = blocks
                .keys()
                .filter(|other| other.prefix_len() > cidr.prefix_len() && cidr.contains(*other))
                .collect();
            let representative = representative_address(cidr, |address| {
                !workload_addresses.contains(&address)
                    && !except.iter().any(|net| net.contains(&address))
                    && !narrower.iter().any(|net| net.contains(&address))
            });
            nodes.push(NodeAddresses {
                node: Node::External(*cidr),
                representative,
            });
        }
        Self {
            nodes,
            cuts: starts
                .into_iter()
                .map(|(protocol, starts)| (protocol, Cuts::new(starts)))
                .collect(),
        }
    }

    /// Every node, sorted (workloads by namespace and name, then address blocks).
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().map(|n| &n.node)
    }

    /// Where a flow falls: its source and destination node (an address outside the
    /// inventory and every block is its own single-address node) and port interval.
    fn address_node(&self, set: &PolicySet, address: IpAddr) -> Node {
        match set.workload_by_address(address) {
            Some(workload) => Node::workload(&workload.namespace, &workload.name),
            None => Node::External(IpNet::from(address)),
        }
    }

    /// A flow's nodes as `set` names them.
    pub fn flow_nodes(&self, set: &PolicySet, src: IpAddr, dst: IpAddr) -> (Node, Node) {
        (self.address_node(set, src), self.address_node(set, dst))
    }

    /// Evaluates every ordered pair of distinct nodes (not two address blocks) over
    /// every protocol and port interval with `set`'s policies.
    pub fn reach(&self, set: &PolicySet) -> Reach {
        let mut pairs = BTreeMap::new();
        let addresses: Vec<Vec<IpAddr>> = self
            .nodes
            .iter()
            .map(|n| match &n.node {
                Node::Workload { namespace, name } => set
                    .workload(namespace, name)
                    .map(|w| w.addresses.clone())
                    .unwrap_or_default(),
                Node::External(_) => n.representative.into_iter().collect(),
            })
            .collect();
        for (i, from) in self.nodes.iter().enumerate() {
            for (j, to) in self.nodes.iter().enumerate() {
                if i == j
                    || matches!(
                        (&from.node, &to.node),
                        (Node::External(_), Node::External(_))
                    )
                {
                    continue;
                }
                // The first address of the source with a destination address of the
                // same family.
                let Some((src, dst)) = addresses[i].iter().find_map(|src| {
                    addresses[j]
                        .iter()
                        .find(|dst| dst.is_ipv4() == src.is_ipv4())
                        .map(|dst| (*src, *dst))
                }) else {
                    continue;
                };
                // Neither end judged in its direction (no policy of either kind
                // selects it): every port allowed, no policy to name, as the
                // evaluator would say interval by interval.
                let open = unjudged(set, src, PolicyDirection::Egress)
                    && unjudged(set, dst, PolicyDirection::Ingress);
                let mut cells = Vec::new();
                for (protocol, cuts) in &self.cuts {
                    for (index, port) in cuts.starts.iter().enumerate() {
                        if open {
                            cells.push(Cell {
                                protocol: *protocol,
                                index,
                                allowed: Some(Policies::new()),
                            });
                            continue;
                        }
                        let verdict = evaluate(
                            set,
                            &Flow {
                                src,
                                dst,
                                protocol: *protocol,
                                port: *port,
                            },
                        );
                        cells.push(Cell {
                            protocol: *protocol,
                            index,
                            allowed: verdict.allowed.then(|| allowing_policies(&verdict)),
                        });
                    }
                }
                if cells.iter().any(|cell| cell.allowed.is_some()) {
                    pairs.insert((from.node.clone(), to.node.clone()), cells);
                }
            }
        }
        Reach { pairs }
    }

    /// Ranges of cells, adjacent ones with the same value merged.
    fn merge<T: PartialEq + Clone>(
        &self,
        cells: impl IntoIterator<Item = (Protocol, usize, T)>,
    ) -> Vec<(PortRange, T)> {
        let mut merged: Vec<(PortRange, T)> = Vec::new();
        for (protocol, index, value) in cells {
            let range = self.cuts[&protocol].range(protocol, index);
            if let Some((last, last_value)) = merged.last_mut()
                && last.protocol == protocol
                && u32::from(last.last) + 1 == u32::from(range.first)
                && *last_value == value
            {
                last.last = range.last;
                continue;
            }
            merged.push((range, value));
        }
        merged
    }

    /// The grants of a pair, merged.
    pub fn grants(&self, reach: &Reach, from: &Node, to: &Node) -> Vec<Grant> {
        let Some(cells) = reach.pairs.get(&(from.clone(), to.clone())) else {
            return Vec::new();
        };
        self.merge(
            cells
                .iter()
                .filter_map(|c| c.allowed.clone().map(|p| (c.protocol, c.index, p))),
        )
        .into_iter()
        .map(|(range, policies)| Grant { range, policies })
        .collect()
    }

    /// What `after` allows between two nodes that `before` does not (`added`), and
    /// the reverse (`removed`), merged into ranges.
    pub fn changes(
        &self,
        before: &Reach,
        after: &Reach,
        from: &Node,
        to: &Node,
    ) -> (Vec<PortRange>, Vec<PortRange>) {
        let key = (from.clone(), to.clone());
        let allowed = |reach: &Reach, protocol: Protocol, index: usize| {
            reach.pairs.get(&key).is_some_and(|cells| {
                cells
                    .iter()
                    .any(|c| c.protocol == protocol && c.index == index && c.allowed.is_some())
            })
        };
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for (protocol, cuts) in &self.cuts {
            for index in 0..cuts.starts.len() {
                match (
                    allowed(before, *protocol, index),
                    allowed(after, *protocol, index),
                ) {
                    (false, true) => added.push((*protocol, index, ())),
                    (true, false) => removed.push((*protocol, index, ())),
                    _ => {}
                }
            }
        }
        let ranges = |cells| self.merge(cells).into_iter().map(|(r, ())| r).collect();
        (ranges(added), ranges(removed))
    }

    /// The interval index of a port, for tests.
    #[cfg(test)]
    fn interval(&self, protocol: Protocol, port: u16) -> Option<PortRange> {
        let cuts = &self.cuts[&protocol];
        cuts.index_of(port).map(|i| cuts.range(protocol, i))
    }
}

/// One evaluation: a protocol's port interval and, if allowed, by which policies.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cell {
    protocol: Protocol,
    index: usize,
    allowed: Option<Policies>,
}

/// What one set allows: for every ordered pair of nodes with something allowed,
/// every interval's verdict. Build with [`Universe::reach`].
#[derive(Clone, Debug, Default)]
pub struct Reach {
    pairs: BTreeMap<(Node, Node), Vec<Cell>>,
}

impl Reach {
    /// The pairs with something allowed, sorted.
    pub fn pairs(&self) -> impl Iterator<Item = &(Node, Node)> {
        self.pairs.keys()
    }
}

/// Whether no NetworkPolicy or ClusterNetworkPolicy judges `address` in
/// `direction` (an address outside the inventory never is).
fn unjudged(set: &PolicySet, address: IpAddr, direction: PolicyDirection) -> bool {
    set.workload_by_address(address).is_none_or(|workload| {
        set.policies_selecting(workload, direction).next().is_none()
            && set
                .cluster_policies_selecting(workload, direction)
                .next()
                .is_none()
    })
}

/// An address of `cidr` for which `usable` holds: the first of its first 4,096
/// addresses, else of its last ones.
fn representative_address(cidr: &IpNet, usable: impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
    if cidr.prefix_len() == cidr.max_prefix_len() {
        return Some(cidr.addr()).filter(|a| usable(*a));
    }
    cidr.hosts()
        .take(4096)
        .chain(std::iter::once(cidr.broadcast()))
        .find(|a| usable(*a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySetBuilder;

    pub(crate) fn set(yaml: &str) -> PolicySet {
        let mut builder = PolicySetBuilder::new();
        builder.add_text(std::path::Path::new("test.yaml"), yaml);
        builder.finish().expect("valid test set")
    }

    const INVENTORY: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: web, namespace: prod, labels: {app: web}}
spec: {addresses: [10.0.0.1]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: db, namespace: prod, labels: {app: db}}
spec: {addresses: [10.0.0.2], ports: [{name: pg, port: 5432}]}
";

    #[test]
    fn ranges_and_named_ports_cut_the_port_space_and_merge_back() {
        let set = set(&format!(
            "{INVENTORY}---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: db, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  ingress:
    - from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]
      ports: [{{port: pg}}, {{port: 8000, endPort: 8099}}, {{protocol: UDP, port: 53}}]
    - from: [{{ipBlock: {{cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}}}]
      ports: [{{port: 22}}]
"
        ));
        let universe = Universe::of(&[&set], &[]);
        assert_eq!(
            universe.interval(Protocol::Tcp, 8050),
            Some(PortRange {
                protocol: Protocol::Tcp,
                first: 8000,
                last: 8099
            })
        );
        let reach = universe.reach(&set);
        let web = Node::workload("prod", "web");
        let db = Node::workload("prod", "db");
        let grants = universe.grants(&reach, &web, &db);
        let ranges: Vec<PortRange> = grants.iter().map(|g| g.range).collect();
        assert_eq!(format_ranges(&ranges), "TCP/5432,8000-8099 UDP/53");
        assert!(
            grants
                .iter()
                .all(|g| g.policies == Policies::from(["prod/db".to_owned()]))
        );
        // db is not enforced on egress and web on nothing: db reaches web on every
        // port, with no policy to name.
        let back = universe.grants(&reach, &db, &web);
        assert_eq!(
            format_ranges(&back.iter().map(|g| g.range).collect::<Vec<_>>()),
            "any"
        );
        assert!(back.iter().all(|g| g.policies.is_empty()));
        // The ipBlock is a node; its representative is outside the except.
        let block = Node::External("192.168.0.0/16".parse().unwrap());
        assert!(universe.nodes().any(|n| *n == block));
        let ssh = universe.grants(&reach, &block, &db);
        assert_eq!(
            format_ranges(&ssh.iter().map(|g| g.range).collect::<Vec<_>>()),
            "TCP/22"
        );
    }

    #[test]
    fn changes_name_ports_added_and_removed() {
        let policy = |ports: &str| {
            set(&format!(
                "{INVENTORY}---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: db, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  ingress: [{{ports: [{ports}]}}]
"
            ))
        };
        let before = policy("{port: 5432}, {port: 9187}");
        let after = policy("{port: 5432}, {port: 6000, endPort: 6010}");
        let universe = Universe::of(&[&before, &after], &[]);
        let (web, db) = (Node::workload("prod", "web"), Node::workload("prod", "db"));
        let (added, removed) =
            universe.changes(&universe.reach(&before), &universe.reach(&after), &web, &db);
        assert_eq!(format_ranges(&added), "TCP/6000-6010");
        assert_eq!(format_ranges(&removed), "TCP/9187");
        let (added, removed) = universe.changes(
            &universe.reach(&before),
            &universe.reach(&before),
            &web,
            &db,
        );
        assert!(added.is_empty() && removed.is_empty());
    }
}
