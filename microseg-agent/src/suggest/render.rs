//! Suggested policies as Kubernetes objects (`networking.k8s.io/v1` NetworkPolicy)
//! and as multi-document YAML, with an annotation saying which observed traffic
//! justified each rule. The fields are in the order people write and review them
//! (name, selector, types, ingress, egress), not alphabetical as k8s-openapi's
//! types would serialize them; the self-check reads the YAML back with the loader.

use std::collections::BTreeMap;

use serde::Serialize;

use super::generate::{Evidence, PeerRef, SuggestedPolicy, SuggestedRule};
use crate::policy::{NAMESPACE_NAME_LABEL, PolicyDirection};

/// Annotation listing, rule by rule, the observed traffic behind it.
pub const SUGGESTED_FROM_ANNOTATION: &str = "microseg.dev/suggested-from";
/// Annotation naming the observed pods the policy was suggested for.
pub const SUGGESTED_FOR_ANNOTATION: &str = "microseg.dev/suggested-for";

/// Peer pods named in an evidence line before "and N more".
const PODS_NAMED: usize = 5;

/// A NetworkPolicy document.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Clone, Debug, Serialize)]
pub struct Metadata {
    pub name: String,
    pub namespace: String,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub pod_selector: Selector,
    pub policy_types: Vec<&'static str>,
    pub ingress: Vec<IngressRule>,
    pub egress: Vec<EgressRule>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct IngressRule {
    pub from: Vec<Peer>,
    pub ports: Vec<Port>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EgressRule {
    pub to: Vec<Peer>,
    pub ports: Vec<Port>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<Selector>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<Selector>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Clone, Debug, Serialize)]
pub struct IpBlock {
    pub cidr: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Port {
    pub protocol: &'static str,
    pub port: u16,
}

fn match_labels(labels: &BTreeMap<String, String>) -> Selector {
    Selector {
        match_labels: labels.clone(),
    }
}

/// A rule's peer as seen from a policy in `namespace`.
fn peer(namespace: &str, peer: &PeerRef) -> Peer {
    match peer {
        PeerRef::Workload(workload) => Peer {
            namespace_selector: (workload.namespace != namespace).then(|| {
                match_labels(&BTreeMap::from([(
                    NAMESPACE_NAME_LABEL.to_owned(),
                    workload.namespace.clone(),
                )]))
            }),
            pod_selector: Some(match_labels(&workload.selector)),
            ip_block: None,
        },
        PeerRef::Address(address) => Peer {
            namespace_selector: None,
            pod_selector: None,
            ip_block: Some(IpBlock {
                cidr: format!("{address}/{}", if address.is_ipv4() { 32 } else { 128 }),
            }),
        },
    }
}

fn rule_parts(namespace: &str, rule: &SuggestedRule) -> (Vec<Peer>, Vec<Port>) {
    let peers = rule.peers.iter().map(|p| peer(namespace, p)).collect();
    let ports = rule
        .ports
        .iter()
        .map(|port| Port {
            protocol: port.protocol.name(),
            port: port.port,
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
    let pods = match pods.len() {
        n if n > PODS_NAMED => format!(
            "{} and {} more",
            pods[..PODS_NAMED].join(", "),
            n - PODS_NAMED
        ),
        _ => pods.join(", "),
    };
    let peer = match &evidence.peer {
        PeerRef::Workload(_) => format!("{} [{pods}]", evidence.peer),
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
            IngressRule { from, ports }
        })
        .collect();
    let egress = policy
        .egress
        .iter()
        .map(|rule| {
            let (to, ports) = rule_parts(namespace, rule);
            EgressRule { to, ports }
        })
        .collect();
    NetworkPolicy {
        api_version: "networking.k8s.io/v1",
        kind: "NetworkPolicy",
        metadata: Metadata {
            name: policy.name.clone(),
            namespace: namespace.clone(),
            annotations,
        },
        spec: Spec {
            pod_selector: match_labels(&policy.workload.selector),
            policy_types: vec!["Ingress", "Egress"],
            ingress,
            egress,
        },
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
