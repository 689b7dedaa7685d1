//! Suggested policies as Kubernetes objects (`networking.k8s.io/v1` NetworkPolicy,
//! k8s-openapi's types) and as multi-document YAML, with an annotation saying which
//! observed traffic justified each rule.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
        NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use super::generate::{Evidence, PeerRef, SuggestedPolicy, SuggestedRule};
use crate::policy::{NAMESPACE_NAME_LABEL, PolicyDirection};

/// Annotation listing, rule by rule, the observed traffic behind it.
pub const SUGGESTED_FROM_ANNOTATION: &str = "microseg.dev/suggested-from";
/// Annotation naming the observed pods the policy was suggested for.
pub const SUGGESTED_FOR_ANNOTATION: &str = "microseg.dev/suggested-for";

fn match_labels(labels: &BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels.clone()),
        match_expressions: None,
    }
}

/// A rule's peer as seen from a policy in `namespace`.
fn peer(namespace: &str, peer: &PeerRef) -> NetworkPolicyPeer {
    match peer {
        PeerRef::Workload(workload) => NetworkPolicyPeer {
            pod_selector: Some(match_labels(&workload.selector)),
            namespace_selector: (workload.namespace != namespace).then(|| {
                match_labels(&BTreeMap::from([(
                    NAMESPACE_NAME_LABEL.to_owned(),
                    workload.namespace.clone(),
                )]))
            }),
            ip_block: None,
        },
        PeerRef::Address(address) => NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: format!("{address}/{}", if address.is_ipv4() { 32 } else { 128 }),
                except: None,
            }),
            ..NetworkPolicyPeer::default()
        },
    }
}

fn rule_parts(
    namespace: &str,
    rule: &SuggestedRule,
) -> (Vec<NetworkPolicyPeer>, Vec<NetworkPolicyPort>) {
    let peers = rule.peers.iter().map(|p| peer(namespace, p)).collect();
    let ports = rule
        .ports
        .iter()
        .map(|port| NetworkPolicyPort {
            protocol: Some(port.protocol.name().to_owned()),
            port: Some(IntOrString::Int(i32::from(port.port))),
            end_port: None,
        })
        .collect();
    (peers, ports)
}

fn time_text(time: Option<chrono::DateTime<chrono::Utc>>) -> String {
    time.map_or_else(
        || "?".to_owned(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// One line of [`SUGGESTED_FROM_ANNOTATION`]:
/// `ingress[0]: 12 flows from prod/frontend (app=frontend) [frontend-1, frontend-2] to TCP/8080, T1..T2`.
pub fn evidence_line(
    direction: PolicyDirection,
    index: usize,
    rule: &SuggestedRule,
    evidence: &Evidence,
) -> String {
    let pods: Vec<&str> = evidence
        .tally
        .peer_pods
        .iter()
        .map(|pod| pod.rsplit('/').next().unwrap_or(pod))
        .collect();
    let peer = match &evidence.peer {
        PeerRef::Workload(_) => format!("{} [{}]", evidence.peer, pods.join(", ")),
        PeerRef::Address(address) => format!("{address} (no workload)"),
    };
    let ports: Vec<String> = evidence
        .observed_ports
        .iter()
        .map(ToString::to_string)
        .collect();
    let flows = match evidence.tally.connections {
        1 => "1 flow".to_owned(),
        n => format!("{n} flows"),
    };
    let dns = if rule.dns {
        " (DNS: UDP and TCP 53)"
    } else {
        ""
    };
    let span = format!(
        "{}..{}",
        time_text(evidence.tally.first_seen),
        time_text(evidence.tally.last_seen)
    );
    match direction {
        PolicyDirection::Ingress => format!(
            "ingress[{index}]{dns}: {flows} from {peer} to {}, {span}",
            ports.join(", ")
        ),
        PolicyDirection::Egress => format!(
            "egress[{index}]{dns}: {flows} to {peer} on {}, {span}",
            ports.join(", ")
        ),
    }
}

/// The annotation text: one line per peer of each rule, ingress first.
pub fn evidence_text(policy: &SuggestedPolicy) -> String {
    let mut lines = Vec::new();
    for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
        for (index, rule) in policy.rules(direction).iter().enumerate() {
            for evidence in &rule.evidence {
                lines.push(evidence_line(direction, index, rule, evidence));
            }
        }
    }
    lines.join("\n")
}

/// The Kubernetes object: both policy types, so that what was not observed in a
/// direction is denied (`ingress: []` isolates and allows nothing).
pub fn network_policy(policy: &SuggestedPolicy) -> NetworkPolicy {
    let namespace = &policy.workload.namespace;
    let mut annotations = BTreeMap::new();
    annotations.insert(
        SUGGESTED_FOR_ANNOTATION.to_owned(),
        format!(
            "pods observed: {}",
            policy.pods.iter().cloned().collect::<Vec<_>>().join(", ")
        ),
    );
    let evidence = evidence_text(policy);
    if !evidence.is_empty() {
        annotations.insert(SUGGESTED_FROM_ANNOTATION.to_owned(), evidence);
    }
    let ingress = policy
        .ingress
        .iter()
        .map(|rule| {
            let (from, ports) = rule_parts(namespace, rule);
            NetworkPolicyIngressRule {
                from: Some(from),
                ports: Some(ports),
            }
        })
        .collect();
    let egress = policy
        .egress
        .iter()
        .map(|rule| {
            let (to, ports) = rule_parts(namespace, rule);
            NetworkPolicyEgressRule {
                to: Some(to),
                ports: Some(ports),
            }
        })
        .collect();
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(policy.name.clone()),
            namespace: Some(namespace.clone()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(match_labels(&policy.workload.selector)),
            policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
            ingress: Some(ingress),
            egress: Some(egress),
        }),
    }
}

/// The policies as one multi-document YAML stream.
pub fn policies_yaml(policies: &[NetworkPolicy]) -> Result<String, serde_norway::Error> {
    let mut text = String::new();
    for policy in policies {
        text.push_str("---\n");
        text.push_str(&serde_norway::to_string(policy)?);
    }
    Ok(text)
}
