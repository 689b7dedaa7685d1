//! The validated policy model: NetworkPolicies normalised so that every Kubernetes
//! defaulting rule (policyTypes, empty versus absent lists, peer scoping) is already
//! applied, plus the inventory (namespaces and workloads) that selectors match against.
//! The evaluator and the compiler both work on this model only, so they cannot disagree
//! on how a YAML field is read.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

use super::error::Source;

/// Label the API server sets on every namespace; microseg implies it too.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub use super::labels::Labels;

/// Transport protocols a NetworkPolicy port may name.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// IP protocol number, as the data path sees it.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Kubernetes spelling.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Protocol {
    type Err = String;

    /// Accepts the Kubernetes spelling and, for hand-written files, lower case.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "TCP" | "tcp" => Ok(Protocol::Tcp),
            "UDP" | "udp" => Ok(Protocol::Udp),
            "SCTP" | "sctp" => Ok(Protocol::Sctp),
            other => Err(format!(
                "unknown protocol {other:?} (expected TCP, UDP or SCTP)"
            )),
        }
    }
}

/// Operator of a label selector requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    pub values: Vec<String>,
}

impl SelectorRequirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        let listed = |value: &str| self.values.iter().any(|listed| listed == value);
        match self.operator {
            SelectorOperator::In => value.is_some_and(listed),
            // As in Kubernetes: a missing key satisfies NotIn.
            SelectorOperator::NotIn => value.is_none_or(|value| !listed(value)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<SelectorRequirement>,
}

impl LabelSelector {
    /// The selector that matches every label set (`{}`).
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn is_everything(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
            && self
                .match_expressions
                .iter()
                .all(|requirement| requirement.matches(labels))
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_everything() {
            return f.write_str("{}");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        for requirement in &self.match_expressions {
            parts.push(match requirement.operator {
                SelectorOperator::In => {
                    format!("{} in ({})", requirement.key, requirement.values.join(","))
                }
                SelectorOperator::NotIn => {
                    format!(
                        "{} notin ({})",
                        requirement.key,
                        requirement.values.join(",")
                    )
                }
                SelectorOperator::Exists => requirement.key.clone(),
                SelectorOperator::DoesNotExist => format!("!{}", requirement.key),
            });
        }
        write!(f, "{{{}}}", parts.join(","))
    }
}

/// An `ipBlock`: the CIDR minus its except blocks. Prefixes are stored truncated
/// (host bits cleared).
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct IpBlock {
    pub cidr: IpNet,
    /// Sorted and deduplicated; each is strictly inside `cidr`.
    pub except: Vec<IpNet>,
}

impl IpBlock {
    pub fn contains(&self, address: IpAddr) -> bool {
        self.cidr.contains(&address) && !self.except.iter().any(|net| net.contains(&address))
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cidr)?;
        if !self.except.is_empty() {
            let excepts: Vec<String> = self.except.iter().map(ToString::to_string).collect();
            write!(f, " except {}", excepts.join(","))?;
        }
        Ok(())
    }
}

/// Which namespaces a workload peer draws pods from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceScope {
    /// Only `podSelector` was given: the policy's own namespace.
    Named(String),
    /// `namespaceSelector` was given (alone or with a `podSelector`).
    Selected(LabelSelector),
}

/// One element of `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// Pods in the scoped namespaces whose labels match `pods` (the empty selector when
    /// only a `namespaceSelector` was given).
    Workloads {
        namespaces: NamespaceScope,
        pods: LabelSelector,
    },
    IpBlock(IpBlock),
    /// The addresses of the Nodes whose labels match (ClusterNetworkPolicy egress
    /// `nodes`).
    Nodes(LabelSelector),
}

/// Which destination ports a policy port entry allows.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSpec {
    /// `port` absent: every port of the protocol.
    Any,
    /// `port` (and `endPort`): an inclusive range, a single port when both are equal.
    Range { first: u16, last: u16 },
    /// A named container port, resolved on the destination workload.
    Named(String),
}

/// One `ports` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRule {
    pub protocol: Protocol,
    pub port: PortSpec,
}

impl fmt::Display for PortRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            PortSpec::Any => write!(f, "{}/*", self.protocol),
            PortSpec::Range { first, last } if first == last => {
                write!(f, "{}/{first}", self.protocol)
            }
            PortSpec::Range { first, last } => write!(f, "{}/{first}-{last}", self.protocol),
            PortSpec::Named(name) => write!(f, "{}/{name}", self.protocol),
        }
    }
}

/// One ingress or egress rule. `peers: None` (absent or empty `from`/`to`) allows every
/// peer, including addresses outside the inventory; `ports: None` allows every port of
/// every protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortRule>>,
}

/// Traffic direction seen from the workload a policy selects.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum PolicyDirection {
    Ingress,
    Egress,
}

impl PolicyDirection {
    pub const fn name(self) -> &'static str {
        match self {
            PolicyDirection::Ingress => "ingress",
            PolicyDirection::Egress => "egress",
        }
    }

    pub const fn datapath(self) -> microseg_common::policy::Direction {
        match self {
            PolicyDirection::Ingress => microseg_common::policy::Direction::Ingress,
            PolicyDirection::Egress => microseg_common::policy::Direction::Egress,
        }
    }
}

impl fmt::Display for PolicyDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A validated NetworkPolicy. `ingress: None` means the policy does not have the
/// Ingress type (it does not isolate ingress); `Some(vec![])` means it isolates and
/// allows nothing. Likewise for egress, after policyTypes defaulting.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub source: Source,
    pub pod_selector: LabelSelector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    pub fn rules(&self, direction: PolicyDirection) -> Option<&[Rule]> {
        match direction {
            PolicyDirection::Ingress => self.ingress.as_deref(),
            PolicyDirection::Egress => self.egress.as_deref(),
        }
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A namespace and its labels (including the implied `kubernetes.io/metadata.name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: Labels,
    /// `None` for namespaces implied by a workload.
    pub source: Option<Source>,
}

/// A named container port of a workload.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// A pod, VM or host: something with labels and addresses that policies select.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
    /// The workload's own interface on this host (a VM's tap, a container's
    /// host-side veth): everything it receives was sent by the workload, so its
    /// source addresses are checked. Pods' veths are found without it.
    pub interface: Option<String>,
    /// The Kubernetes node a pod runs on (`spec.nodeName`); `None` for workloads
    /// that are not pods. In Kubernetes mode an agent enforces only its own node's
    /// pods: the others are peers, enforced by their nodes' agents
    /// ([`crate::policy::Compiler::enforcing_node`]).
    pub node: Option<String>,
    pub source: Source,
}

impl Workload {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Ports a named policy port resolves to on this workload.
    pub fn resolve_named_port<'a>(
        &'a self,
        name: &'a str,
        protocol: Protocol,
    ) -> impl Iterator<Item = u16> + 'a {
        self.ports
            .iter()
            .filter(move |port| port.name == name && port.protocol == protocol)
            .map(|port| port.port)
    }
}

/// ClusterNetworkPolicy tier: Admin before NetworkPolicy, Baseline after it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Tier {
    Admin,
    Baseline,
}

impl Tier {
    pub const fn name(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a ClusterNetworkPolicy rule does with the traffic it matches.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum RuleAction {
    /// Allowed for this direction; no later rule of any tier is consulted.
    Accept,
    /// Dropped; no later rule of any tier is consulted.
    Deny,
    /// The rest of this tier is skipped: the next tier decides.
    Pass,
}

impl RuleAction {
    pub const fn name(self) -> &'static str {
        match self {
            RuleAction::Accept => "Accept",
            RuleAction::Deny => "Deny",
            RuleAction::Pass => "Pass",
        }
    }
}

impl fmt::Display for RuleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A ClusterNetworkPolicy subject: the workloads of the namespaces `namespaces`
/// matches whose labels `pods` matches (`subject.namespaces` is `pods` = everything).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterSubject {
    pub namespaces: LabelSelector,
    pub pods: LabelSelector,
}

/// One ClusterNetworkPolicy rule. `peers: None` matches every peer: only a Deny or
/// Pass rule with a peer microseg cannot read becomes that ("fail closed": the API
/// says such a rule denies all), and its action is then Deny. `ports: None` matches
/// every protocol and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterRule {
    /// The rule's `name`, if it has one.
    pub name: Option<String>,
    pub action: RuleAction,
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortRule>>,
    /// Why a peer of this rule failed closed (it matches nothing in an Accept rule,
    /// everything in a Deny or Pass rule).
    pub fail_closed: Option<String>,
}

/// A validated ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterPolicy {
    pub name: String,
    pub source: Source,
    pub tier: Tier,
    /// 0-1000, lower first.
    pub priority: u16,
    pub subject: ClusterSubject,
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
}

impl ClusterPolicy {
    pub fn rules(&self, direction: PolicyDirection) -> &[ClusterRule] {
        match direction {
            PolicyDirection::Ingress => &self.ingress,
            PolicyDirection::Egress => &self.egress,
        }
    }

    /// The order of evaluation: tier, then priority, then (for equal priorities, which
    /// the API leaves to the implementation) name.
    pub fn precedence(&self) -> (Tier, u16, &str) {
        (self.tier, self.priority, &self.name)
    }
}

/// A Kubernetes Node: labels and addresses, which ClusterNetworkPolicy `nodes` peers
/// select. Never a subject.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Labels,
    /// `status.addresses` of type InternalIP and ExternalIP.
    pub addresses: Vec<IpAddr>,
    /// The same addresses as single-address blocks: the compiler gives a Node's
    /// addresses identities as it does ipBlocks.
    pub address_blocks: Vec<IpBlock>,
    pub source: Source,
}

/// Policies plus inventory, validated and indexed. Build one with
/// [`super::load_paths`] or [`super::PolicySetBuilder`].
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    /// By name.
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    /// In slots that do not change while the workload exists, iterated in
    /// (namespace, name) order.
    pub workloads: super::workloads::Workloads,
    /// Sorted by (namespace, name). Shared with the documents they came from
    /// ([`super::PolicyStore`]): held once, and an insertion shifts pointers.
    pub policies: Vec<Arc<Policy>>,
    /// ClusterNetworkPolicies in evaluation order ([`ClusterPolicy::precedence`]).
    pub cluster_policies: Vec<Arc<ClusterPolicy>>,
    /// Sorted by name.
    pub nodes: Vec<NodeInfo>,
    /// Policies the loader refused and enforces as their fail-closed substitutes
    /// (which are in `policies` and `cluster_policies`), by key.
    pub refused_policies: Vec<super::fail_closed::RefusedPolicy>,
    /// Address -> slot in `workloads`.
    pub(crate) address_index: BTreeMap<IpAddr, usize>,
}
