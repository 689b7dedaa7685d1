//! The reference evaluator: NetworkPolicy semantics computed directly from the model,
//! rule by rule, with no compilation. It is the oracle the compiled maps (and the
//! kernel) are checked against, and it explains its verdicts.

use std::fmt;
use std::net::IpAddr;

use super::inventory::EndpointRef;
use super::model::{
    ClusterPolicy, Peer, Policy, PolicyDirection, PolicySet, PortRule, PortSpec, Protocol,
    RuleAction, Tier, Workload,
};

/// One packet's worth of question: may `src` send to `dst` on `protocol`/`port`?
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
}

impl Flow {
    /// A flow between endpoints named `ns/name` or by IP address.
    pub fn between(
        set: &PolicySet,
        from: &EndpointRef,
        to: &EndpointRef,
        protocol: Protocol,
        port: u16,
    ) -> Result<Flow, String> {
        let (src, dst) = set.resolve_pair(from, to)?;
        Ok(Flow {
            src,
            dst,
            protocol,
            port,
        })
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {}/{}",
            self.src, self.dst, self.protocol, self.port
        )
    }
}

/// A rule of a policy: which policy, which direction, which index in its list.
/// ClusterNetworkPolicy rules have no namespace and carry their tier, priority and
/// action.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub struct RuleRef {
    /// Empty for a ClusterNetworkPolicy.
    pub policy_namespace: String,
    pub policy_name: String,
    pub direction: PolicyDirection,
    pub rule_index: usize,
    pub cluster: Option<ClusterRuleInfo>,
}

/// What a ClusterNetworkPolicy rule is, beside where it is.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ClusterRuleInfo {
    pub tier: Tier,
    pub priority: u16,
    pub action: RuleAction,
    /// The rule's `name`.
    pub name: Option<String>,
}

impl RuleRef {
    /// A NetworkPolicy rule.
    pub fn network_policy(policy: &Policy, direction: PolicyDirection, rule_index: usize) -> Self {
        Self {
            policy_namespace: policy.namespace.clone(),
            policy_name: policy.name.clone(),
            direction,
            rule_index,
            cluster: None,
        }
    }

    /// A ClusterNetworkPolicy rule.
    pub fn cluster_policy(
        policy: &ClusterPolicy,
        direction: PolicyDirection,
        rule_index: usize,
    ) -> Self {
        let rule = &policy.rules(direction)[rule_index];
        Self {
            policy_namespace: String::new(),
            policy_name: policy.name.clone(),
            direction,
            rule_index,
            cluster: Some(ClusterRuleInfo {
                tier: policy.tier,
                priority: policy.priority,
                action: rule.action,
                name: rule.name.clone(),
            }),
        }
    }

    /// The policy as users name it: `namespace/name`, or
    /// `ClusterNetworkPolicy/name` for a cluster policy.
    pub fn policy_key(&self) -> String {
        match self.cluster {
            Some(_) => format!("ClusterNetworkPolicy/{}", self.policy_name),
            None => format!("{}/{}", self.policy_namespace, self.policy_name),
        }
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cluster {
            None => write!(
                f,
                "{}/{} {} rule {}",
                self.policy_namespace, self.policy_name, self.direction, self.rule_index
            ),
            Some(info) => {
                write!(
                    f,
                    "ClusterNetworkPolicy/{} ({} tier, priority {}) {} rule {}",
                    self.policy_name, info.tier, info.priority, self.direction, self.rule_index
                )?;
                if let Some(name) = &info.name {
                    write!(f, " {name:?}")?;
                }
                write!(f, " ({})", info.action)
            }
        }
    }
}

/// Why a direction was allowed or denied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerdictReason {
    /// The local end is not a workload, or no policy selects it for this direction.
    NotEnforced,
    /// Allowed by these rules (every rule that matches, in policy order).
    AllowedBy(Vec<RuleRef>),
    /// Selected by these policies (`namespace/name`), none of whose rules matches.
    DeniedByDefault { selected_by: Vec<String> },
    /// A ClusterNetworkPolicy rule decided: Accept (allowed) or Deny (denied).
    DecidedBy(RuleRef),
}

/// The verdict for one direction, with a one-line explanation for humans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionVerdict {
    pub allowed: bool,
    pub reason: VerdictReason,
    pub explanation: String,
}

/// Ingress at the destination, egress at the source; the flow passes if both allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowVerdict {
    pub ingress: DirectionVerdict,
    pub egress: DirectionVerdict,
    pub allowed: bool,
}

fn describe(address: IpAddr, workload: Option<&Workload>) -> String {
    match workload {
        Some(workload) => format!("{} ({address})", workload.key()),
        None => address.to_string(),
    }
}

/// Whether a rule's port list admits the flow; named ports resolve on `destination`.
pub(crate) fn ports_match(
    ports: Option<&[PortRule]>,
    protocol: Protocol,
    port: u16,
    destination: Option<&Workload>,
) -> bool {
    let Some(ports) = ports else {
        return true;
    };
    ports.iter().any(|rule| {
        rule.protocol == protocol
            && match &rule.port {
                PortSpec::Any => true,
                PortSpec::Range { first, last } => (*first..=*last).contains(&port),
                PortSpec::Named(name) => destination.is_some_and(|workload| {
                    workload
                        .resolve_named_port(name, protocol)
                        .any(|resolved| resolved == port)
                }),
            }
    })
}

/// Whether a rule (its peers, `None` for every peer, and its ports) matches the flow.
fn rule_matches(
    set: &PolicySet,
    peers: Option<&[Peer]>,
    ports: Option<&[PortRule]>,
    peer_address: IpAddr,
    peer: Option<&Workload>,
    destination: Option<&Workload>,
    flow: &Flow,
) -> bool {
    let peer_ok = match peers {
        None => true,
        Some(peers) => peers
            .iter()
            .any(|candidate| set.peer_matches(candidate, peer_address, peer)),
    };
    peer_ok && ports_match(ports, flow.protocol, flow.port, destination)
}

/// What one ClusterNetworkPolicy tier says about a direction.
enum TierOutcome {
    /// Accept or Deny by this rule.
    Decided(RuleRef, bool),
    /// A Pass rule sent the flow to the next tier.
    Passed(RuleRef),
    /// No rule of the tier matched.
    NoMatch,
}

/// One direction of a flow, seen from the workload whose policies judge it.
struct Sides<'a> {
    direction: PolicyDirection,
    local: &'a Workload,
    peer_address: IpAddr,
    peer: Option<&'a Workload>,
    /// Where named ports resolve.
    destination: Option<&'a Workload>,
    flow: &'a Flow,
}

/// The first matching rule of `tier`, in evaluation order (priority, name, rule
/// order).
fn evaluate_tier(set: &PolicySet, tier: Tier, sides: &Sides<'_>) -> TierOutcome {
    let direction = sides.direction;
    for policy in set
        .cluster_policies_selecting(sides.local, direction)
        .filter(|policy| policy.tier == tier)
    {
        for (rule_index, rule) in policy.rules(direction).iter().enumerate() {
            if rule_matches(
                set,
                rule.peers.as_deref(),
                rule.ports.as_deref(),
                sides.peer_address,
                sides.peer,
                sides.destination,
                sides.flow,
            ) {
                let rule_ref = RuleRef::cluster_policy(policy, direction, rule_index);
                return match rule.action {
                    RuleAction::Accept => TierOutcome::Decided(rule_ref, true),
                    RuleAction::Deny => TierOutcome::Decided(rule_ref, false),
                    RuleAction::Pass => TierOutcome::Passed(rule_ref),
                };
            }
        }
    }
    TierOutcome::NoMatch
}

/// The verdict of a ClusterNetworkPolicy rule that decided.
fn decided_by(
    rule: RuleRef,
    allowed: bool,
    direction: PolicyDirection,
    peer_text: &str,
    flow: &Flow,
    passed: &str,
) -> DirectionVerdict {
    let preposition = match direction {
        PolicyDirection::Ingress => "from",
        PolicyDirection::Egress => "to",
    };
    DirectionVerdict {
        allowed,
        explanation: format!(
            "{direction} {} by {rule} ({}/{} {preposition} {peer_text}){passed}",
            if allowed { "allowed" } else { "denied" },
            flow.protocol,
            flow.port
        ),
        reason: VerdictReason::DecidedBy(rule),
    }
}

/// Evaluation order: Admin tier, NetworkPolicy, Baseline tier, allow. A tier's first
/// matching rule decides (Accept, Deny) or passes to the next tier (Pass);
/// NetworkPolicy decides for every workload it selects.
fn evaluate_direction(
    set: &PolicySet,
    flow: &Flow,
    direction: PolicyDirection,
) -> DirectionVerdict {
    let source = set.workload_by_address(flow.src);
    let destination = set.workload_by_address(flow.dst);
    let (local_address, local, peer_address, peer) = match direction {
        PolicyDirection::Ingress => (flow.dst, destination, flow.src, source),
        PolicyDirection::Egress => (flow.src, source, flow.dst, destination),
    };
    let Some(local) = local else {
        return DirectionVerdict {
            allowed: true,
            reason: VerdictReason::NotEnforced,
            explanation: format!("{direction} not enforced: {local_address} is not a workload"),
        };
    };
    let peer_text = describe(peer_address, peer);
    // Pass rules met on the way, for the explanation.
    let mut passed = String::new();
    let sides = Sides {
        direction,
        local,
        peer_address,
        peer,
        destination,
        flow,
    };
    match evaluate_tier(set, Tier::Admin, &sides) {
        TierOutcome::Decided(rule, allowed) => {
            return decided_by(rule, allowed, direction, &peer_text, flow, "");
        }
        TierOutcome::Passed(rule) => passed = format!("; passed on by {rule}"),
        TierOutcome::NoMatch => {}
    }
    let selecting: Vec<&Policy> = set.policies_selecting(local, direction).collect();
    if selecting.is_empty() {
        match evaluate_tier(set, Tier::Baseline, &sides) {
            TierOutcome::Decided(rule, allowed) => {
                return decided_by(rule, allowed, direction, &peer_text, flow, &passed);
            }
            TierOutcome::Passed(rule) => {
                passed = format!("{passed}; passed on by {rule}");
            }
            TierOutcome::NoMatch => {}
        }
        let cluster_selected = set
            .cluster_policies_selecting(local, direction)
            .next()
            .is_some();
        return DirectionVerdict {
            allowed: true,
            reason: VerdictReason::NotEnforced,
            explanation: if cluster_selected {
                format!(
                    "{direction} allowed: no NetworkPolicy selects {} and no ClusterNetworkPolicy rule decides{passed}",
                    local.key()
                )
            } else {
                format!(
                    "{direction} not enforced: no {direction} policy selects {}",
                    local.key()
                )
            },
        };
    }
    let mut allowed_by = Vec::new();
    for policy in &selecting {
        for (rule_index, rule) in policy
            .rules(direction)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if rule_matches(
                set,
                rule.peers.as_deref(),
                rule.ports.as_deref(),
                peer_address,
                peer,
                destination,
                flow,
            ) {
                allowed_by.push(RuleRef::network_policy(policy, direction, rule_index));
            }
        }
    }
    let preposition = match direction {
        PolicyDirection::Ingress => "from",
        PolicyDirection::Egress => "to",
    };
    if allowed_by.is_empty() {
        let selected_by: Vec<String> = selecting.iter().map(|policy| policy.key()).collect();
        DirectionVerdict {
            allowed: false,
            explanation: format!(
                "{direction} denied by default: {} is selected by {} and no rule allows {}/{} {preposition} {peer_text}{passed}",
                local.key(),
                selected_by.join(", "),
                flow.protocol,
                flow.port
            ),
            reason: VerdictReason::DeniedByDefault { selected_by },
        }
    } else {
        let rules: Vec<String> = allowed_by.iter().map(ToString::to_string).collect();
        DirectionVerdict {
            allowed: true,
            explanation: format!(
                "{direction} allowed by {} ({}/{} {preposition} {peer_text}){passed}",
                rules.join(", "),
                flow.protocol,
                flow.port
            ),
            reason: VerdictReason::AllowedBy(allowed_by),
        }
    }
}

/// Evaluates a flow against the policies of `set`, with Kubernetes semantics.
pub fn evaluate(set: &PolicySet, flow: &Flow) -> FlowVerdict {
    let ingress = evaluate_direction(set, flow, PolicyDirection::Ingress);
    let egress = evaluate_direction(set, flow, PolicyDirection::Egress);
    FlowVerdict {
        allowed: ingress.allowed && egress.allowed,
        ingress,
        egress,
    }
}

/// Who can reach whom on one port: rows are sources, columns destinations, both in
/// `labels` order (every workload with an address, as `ns/name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReachabilityMatrix {
    pub protocol: Protocol,
    pub port: u16,
    pub labels: Vec<String>,
    /// `allowed[source][destination]`; `None` where the two share no address family.
    pub allowed: Vec<Vec<Option<bool>>>,
}

impl ReachabilityMatrix {
    /// Builds a matrix with any flow evaluator (reference, map-level, or the kernel).
    pub fn compute(
        set: &PolicySet,
        protocol: Protocol,
        port: u16,
        mut allowed: impl FnMut(&Flow) -> bool,
    ) -> Self {
        let workloads: Vec<&Workload> = set
            .workloads
            .iter()
            .filter(|workload| !workload.addresses.is_empty())
            .collect();
        let labels = workloads.iter().map(|workload| workload.key()).collect();
        let refs: Vec<EndpointRef> = workloads
            .iter()
            .map(|workload| EndpointRef::Workload {
                namespace: workload.namespace.clone(),
                name: workload.name.clone(),
            })
            .collect();
        let allowed = refs
            .iter()
            .map(|from| {
                refs.iter()
                    .map(|to| {
                        Flow::between(set, from, to, protocol, port)
                            .ok()
                            .map(|flow| allowed(&flow))
                    })
                    .collect()
            })
            .collect();
        Self {
            protocol,
            port,
            labels,
            allowed,
        }
    }
}

impl fmt::Display for ReachabilityMatrix {
    /// A table: `.` allowed, `X` denied, `-` no common address family.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}/{} (rows: from, columns: to)",
            self.protocol, self.port
        )?;
        let width = self.labels.iter().map(String::len).max().unwrap_or(0);
        for (index, label) in self.labels.iter().enumerate() {
            writeln!(f, "{:>width$}  [{index}] {label}", "")?;
        }
        write!(f, "{:width$} ", "")?;
        for index in 0..self.labels.len() {
            write!(f, "{:>4}", format!("[{index}]"))?;
        }
        writeln!(f)?;
        for (label, row) in self.labels.iter().zip(&self.allowed) {
            write!(f, "{label:width$} ")?;
            for cell in row {
                let mark = match cell {
                    Some(true) => ".",
                    Some(false) => "X",
                    None => "-",
                };
                write!(f, "{mark:>4}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// The reference evaluator's reachability matrix for one port and protocol.
pub fn reachability_matrix(set: &PolicySet, port: u16, protocol: Protocol) -> ReachabilityMatrix {
    ReachabilityMatrix::compute(set, protocol, port, |flow| evaluate(set, flow).allowed)
}
