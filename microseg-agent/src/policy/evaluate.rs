//! The reference evaluator: NetworkPolicy semantics computed directly from the model,
//! rule by rule, with no compilation. It is the oracle the compiled maps (and the
//! kernel) are checked against, and it explains its verdicts.

use std::fmt;
use std::net::IpAddr;

use super::inventory::EndpointRef;
use super::model::{
    Peer, Policy, PolicyDirection, PolicySet, PortRule, PortSpec, Protocol, Rule, Workload,
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
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub policy_namespace: String,
    pub policy_name: String,
    pub direction: PolicyDirection,
    pub rule_index: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {} rule {}",
            self.policy_namespace, self.policy_name, self.direction, self.rule_index
        )
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

fn rule_matches(
    set: &PolicySet,
    rule: &Rule,
    peer_address: IpAddr,
    peer: Option<&Workload>,
    destination: Option<&Workload>,
    flow: &Flow,
) -> bool {
    let peer_ok = match &rule.peers {
        None => true,
        Some(peers) => peers
            .iter()
            .any(|candidate: &Peer| set.peer_matches(candidate, peer_address, peer)),
    };
    peer_ok && ports_match(rule.ports.as_deref(), flow.protocol, flow.port, destination)
}

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
    let selecting: Vec<&Policy> = set.policies_selecting(local, direction).collect();
    if selecting.is_empty() {
        return DirectionVerdict {
            allowed: true,
            reason: VerdictReason::NotEnforced,
            explanation: format!(
                "{direction} not enforced: no {direction} policy selects {}",
                local.key()
            ),
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
            if rule_matches(set, rule, peer_address, peer, destination, flow) {
                allowed_by.push(RuleRef {
                    policy_namespace: policy.namespace.clone(),
                    policy_name: policy.name.clone(),
                    direction,
                    rule_index,
                });
            }
        }
    }
    let peer_text = describe(peer_address, peer);
    let preposition = match direction {
        PolicyDirection::Ingress => "from",
        PolicyDirection::Egress => "to",
    };
    if allowed_by.is_empty() {
        let selected_by: Vec<String> = selecting.iter().map(|policy| policy.key()).collect();
        DirectionVerdict {
            allowed: false,
            explanation: format!(
                "{direction} denied by default: {} is selected by {} and no rule allows {}/{} {preposition} {peer_text}",
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
                "{direction} allowed by {} ({}/{} {preposition} {peer_text})",
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
