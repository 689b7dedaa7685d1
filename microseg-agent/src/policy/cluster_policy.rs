//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2, kubernetes-sigs/
//! network-policy-api v0.2.0) and v1 Node documents into the validated model.
//!
//! The CRD's validation is repeated here (files never pass an API server): tier,
//! priority 0-1000, exactly one subject field, at most 25 rules per direction, 1-25
//! peers and protocols per rule, exactly one field per peer and protocol, ports 1-65535
//! and ranges with start < end, rule names of at most 100 characters, no named port
//! beside a networks or nodes peer.
//!
//! A peer none of whose fields microseg reads fails closed, as the API asks: in an
//! Accept rule it matches nothing; a Deny or Pass rule holding one denies everything.
//! From files such a peer is an error (an unknown field is refused before this);
//! from the API server (a newer CRD with a field this version does not know) and for
//! `domainNames` (which microseg does not resolve) it fails closed.

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector as K8sLabelSelector, ObjectMeta,
};
use serde::Deserialize;

use super::model::{
    ClusterPolicy, ClusterRule, ClusterSubject, IpBlock, LabelSelector, Labels, NamespaceScope,
    NodeInfo, Peer, PortRule, PortSpec, Protocol, RuleAction, Tier,
};
use super::validate::{
    Checker, check_labels, check_named_port_name, check_port_number, convert_selector,
    parse_address, parse_cidr, required_name,
};

/// `apiVersion` of ClusterNetworkPolicy.
pub const CLUSTER_NETWORK_POLICY_API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";

/// The API's limits.
const MAX_RULES: usize = 25;
const MAX_PEERS: usize = 25;
const MAX_PROTOCOLS: usize = 25;
const MAX_NETWORKS: usize = 25;
const MAX_RULE_NAME: usize = 100;
pub(crate) const MAX_PRIORITY: i64 = 1000;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClusterNetworkPolicyDocument {
    #[serde(rename = "apiVersion")]
    _api_version: Option<String>,
    #[serde(rename = "kind")]
    _kind: Option<String>,
    #[serde(default)]
    metadata: ObjectMeta,
    spec: Option<SpecDocument>,
    /// Written by implementations; not read.
    #[serde(rename = "status")]
    _status: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecDocument {
    tier: Option<String>,
    priority: Option<i64>,
    subject: Option<SubjectDocument>,
    ingress: Option<Vec<IngressRuleDocument>>,
    egress: Option<Vec<EgressRuleDocument>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubjectDocument {
    namespaces: Option<K8sLabelSelector>,
    pods: Option<NamespacedPodDocument>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NamespacedPodDocument {
    namespace_selector: Option<K8sLabelSelector>,
    pod_selector: Option<K8sLabelSelector>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IngressRuleDocument {
    name: Option<String>,
    action: Option<String>,
    from: Option<Vec<PeerDocument>>,
    protocols: Option<Vec<ProtocolDocument>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EgressRuleDocument {
    name: Option<String>,
    action: Option<String>,
    to: Option<Vec<PeerDocument>>,
    protocols: Option<Vec<ProtocolDocument>>,
}

/// Both peer kinds: an ingress peer may only set `namespaces` or `pods`, which
/// [`convert_peer`] checks (so the error names the field rather than "unknown").
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PeerDocument {
    namespaces: Option<K8sLabelSelector>,
    pods: Option<NamespacedPodDocument>,
    nodes: Option<K8sLabelSelector>,
    networks: Option<Vec<String>>,
    domain_names: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProtocolDocument {
    tcp: Option<PortMatchDocument>,
    udp: Option<PortMatchDocument>,
    sctp: Option<PortMatchDocument>,
    destination_named_port: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortMatchDocument {
    destination_port: Option<PortDocument>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortDocument {
    number: Option<i64>,
    range: Option<PortRangeDocument>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortRangeDocument {
    start: Option<i64>,
    end: Option<i64>,
}

/// A peer as converted: what it selects, or why it fails closed.
enum ConvertedPeer {
    Peers(Vec<Peer>),
    FailClosed(String),
}

fn convert_peer(
    checker: &mut Checker<'_>,
    field: &str,
    peer: &PeerDocument,
    ingress: bool,
    from_api_server: bool,
) -> Option<ConvertedPeer> {
    let mut set = Vec::new();
    if peer.namespaces.is_some() {
        set.push("namespaces");
    }
    if peer.pods.is_some() {
        set.push("pods");
    }
    if peer.nodes.is_some() {
        set.push("nodes");
    }
    if peer.networks.is_some() {
        set.push("networks");
    }
    if peer.domain_names.is_some() {
        set.push("domainNames");
    }
    if ingress
        && let Some(egress_only) = set
            .iter()
            .find(|name| **name != "namespaces" && **name != "pods")
    {
        checker.error(
            &format!("{field}.{egress_only}"),
            "an ingress peer selects namespaces or pods only",
        );
        return None;
    }
    match set.len() {
        0 if from_api_server => {
            return Some(ConvertedPeer::FailClosed(format!(
                "{field} sets no field microseg knows (a newer ClusterNetworkPolicy version?)"
            )));
        }
        0 => {
            let expected = if ingress {
                "namespaces or pods"
            } else {
                "namespaces, pods, nodes or networks"
            };
            checker.error(field, format!("a peer must set exactly one of {expected}"));
            return None;
        }
        1 => {}
        _ => {
            checker.error(
                field,
                format!(
                    "a peer must set exactly one field, not {}",
                    set.join(" and ")
                ),
            );
            return None;
        }
    }
    if let Some(selector) = &peer.namespaces {
        let namespaces = convert_selector(checker, &format!("{field}.namespaces"), selector);
        return Some(ConvertedPeer::Peers(vec![Peer::Workloads {
            namespaces: NamespaceScope::Selected(namespaces),
            pods: LabelSelector::everything(),
        }]));
    }
    if let Some(pods) = &peer.pods {
        let (namespaces, pods) = convert_namespaced_pod(checker, &format!("{field}.pods"), pods)?;
        return Some(ConvertedPeer::Peers(vec![Peer::Workloads {
            namespaces: NamespaceScope::Selected(namespaces),
            pods,
        }]));
    }
    if let Some(selector) = &peer.nodes {
        let nodes = convert_selector(checker, &format!("{field}.nodes"), selector);
        return Some(ConvertedPeer::Peers(vec![Peer::Nodes(nodes)]));
    }
    if let Some(networks) = &peer.networks {
        let path = format!("{field}.networks");
        if networks.is_empty() || networks.len() > MAX_NETWORKS {
            checker.error(
                &path,
                format!(
                    "must list 1 to {MAX_NETWORKS} CIDRs, not {}",
                    networks.len()
                ),
            );
            return None;
        }
        let mut peers = Vec::new();
        for (index, text) in networks.iter().enumerate() {
            let cidr = parse_cidr(checker, &format!("{path}[{index}]"), text)?;
            peers.push(Peer::IpBlock(IpBlock {
                cidr,
                except: Vec::new(),
            }));
        }
        return Some(ConvertedPeer::Peers(peers));
    }
    Some(ConvertedPeer::FailClosed(format!(
        "{field}.domainNames: microseg does not resolve domain names"
    )))
}

/// `pods: {namespaceSelector, podSelector}`: podSelector is required; an absent
/// namespaceSelector selects every namespace.
fn convert_namespaced_pod(
    checker: &mut Checker<'_>,
    field: &str,
    pods: &NamespacedPodDocument,
) -> Option<(LabelSelector, LabelSelector)> {
    let namespaces = pods
        .namespace_selector
        .as_ref()
        .map_or_else(LabelSelector::everything, |selector| {
            convert_selector(checker, &format!("{field}.namespaceSelector"), selector)
        });
    let Some(pod_selector) = &pods.pod_selector else {
        checker.error(&format!("{field}.podSelector"), "is required");
        return None;
    };
    let pods = convert_selector(checker, &format!("{field}.podSelector"), pod_selector);
    Some((namespaces, pods))
}

fn convert_protocol(
    checker: &mut Checker<'_>,
    field: &str,
    protocol: &ProtocolDocument,
    out: &mut Vec<PortRule>,
) -> Option<()> {
    let mut set: Vec<(&str, Option<(Protocol, &PortMatchDocument)>)> = Vec::new();
    if let Some(ports) = &protocol.tcp {
        set.push(("tcp", Some((Protocol::Tcp, ports))));
    }
    if let Some(ports) = &protocol.udp {
        set.push(("udp", Some((Protocol::Udp, ports))));
    }
    if let Some(ports) = &protocol.sctp {
        set.push(("sctp", Some((Protocol::Sctp, ports))));
    }
    if protocol.destination_named_port.is_some() {
        set.push(("destinationNamedPort", None));
    }
    if set.len() != 1 {
        let found: Vec<&str> = set.iter().map(|(name, _)| *name).collect();
        checker.error(
            field,
            format!(
                "must set exactly one of tcp, udp, sctp or destinationNamedPort (found {})",
                if found.is_empty() {
                    "none".to_string()
                } else {
                    found.join(", ")
                }
            ),
        );
        return None;
    }
    match set[0] {
        (_, None) => {
            let name = protocol
                .destination_named_port
                .as_deref()
                .unwrap_or_default();
            let path = format!("{field}.destinationNamedPort");
            check_named_port_name(checker, &path, name)?;
            // The container port's own protocol decides: one rule per protocol, each
            // resolving only ports declared with that protocol.
            out.extend(Protocol::ALL.iter().map(|&protocol| PortRule {
                protocol,
                port: PortSpec::Named(name.to_string()),
            }));
        }
        (name, Some((protocol, ports))) => {
            let path = format!("{field}.{name}.destinationPort");
            let Some(port) = &ports.destination_port else {
                checker.error(&path, "is required");
                return None;
            };
            let spec = match (port.number, &port.range) {
                (Some(number), None) => {
                    let number = check_port_number(checker, &format!("{path}.number"), number)?;
                    PortSpec::Range {
                        first: number,
                        last: number,
                    }
                }
                (None, Some(range)) => {
                    let range_path = format!("{path}.range");
                    let (Some(start), Some(end)) = (range.start, range.end) else {
                        checker.error(&range_path, "needs start and end");
                        return None;
                    };
                    let first = check_port_number(checker, &format!("{range_path}.start"), start);
                    let last = check_port_number(checker, &format!("{range_path}.end"), end);
                    let (first, last) = (first?, last?);
                    if first >= last {
                        checker.error(
                            &range_path,
                            format!("start ({first}) must be less than end ({last})"),
                        );
                        return None;
                    }
                    PortSpec::Range { first, last }
                }
                _ => {
                    checker.error(&path, "must set exactly one of number or range");
                    return None;
                }
            };
            out.push(PortRule {
                protocol,
                port: spec,
            });
        }
    }
    Some(())
}

/// A rule of either direction, by reference: `peers` is `from` or `to`.
struct RuleFields<'a> {
    name: Option<&'a String>,
    action: Option<&'a String>,
    peers: Option<&'a Vec<PeerDocument>>,
    protocols: Option<&'a Vec<ProtocolDocument>>,
    ingress: bool,
}

fn convert_rule(
    checker: &mut Checker<'_>,
    field: &str,
    rule: RuleFields<'_>,
    from_api_server: bool,
) -> Option<ClusterRule> {
    let RuleFields {
        name,
        action,
        peers,
        protocols,
        ingress,
    } = rule;
    let errors_before = checker.errors.len();
    if let Some(name) = name
        && name.chars().count() > MAX_RULE_NAME
    {
        checker.error(
            &format!("{field}.name"),
            format!("is longer than {MAX_RULE_NAME} characters"),
        );
    }
    let action = match action.map(String::as_str) {
        Some("Accept") => Some(RuleAction::Accept),
        Some("Deny") => Some(RuleAction::Deny),
        Some("Pass") => Some(RuleAction::Pass),
        Some(other) => {
            checker.error(
                &format!("{field}.action"),
                format!("unknown action {other:?} (expected Accept, Deny or Pass)"),
            );
            None
        }
        None => {
            checker.error(&format!("{field}.action"), "is required");
            None
        }
    };
    let peers_field = format!("{field}.{}", if ingress { "from" } else { "to" });
    let mut converted = Vec::new();
    let mut fail_closed = None;
    let mut names_nodes_or_networks = false;
    match peers {
        Some(list) if !list.is_empty() && list.len() <= MAX_PEERS => {
            for (index, peer) in list.iter().enumerate() {
                names_nodes_or_networks |=
                    peer.nodes.is_some() || peer.networks.is_some() || peer.domain_names.is_some();
                match convert_peer(
                    checker,
                    &format!("{peers_field}[{index}]"),
                    peer,
                    ingress,
                    from_api_server,
                ) {
                    Some(ConvertedPeer::Peers(peers)) => converted.extend(peers),
                    Some(ConvertedPeer::FailClosed(reason)) => {
                        fail_closed.get_or_insert(reason);
                    }
                    None => {}
                }
            }
        }
        Some(list) => checker.error(
            &peers_field,
            format!("must list 1 to {MAX_PEERS} peers, not {}", list.len()),
        ),
        None => checker.error(&peers_field, "is required"),
    }
    let mut ports = None;
    if let Some(protocols) = protocols {
        let path = format!("{field}.protocols");
        if protocols.is_empty() || protocols.len() > MAX_PROTOCOLS {
            checker.error(
                &path,
                format!(
                    "must list 1 to {MAX_PROTOCOLS} protocols, not {}",
                    protocols.len()
                ),
            );
        } else {
            let mut rules = Vec::new();
            for (index, protocol) in protocols.iter().enumerate() {
                let protocol_path = format!("{path}[{index}]");
                if protocol.destination_named_port.is_some() && names_nodes_or_networks {
                    checker.error(
                        &format!("{protocol_path}.destinationNamedPort"),
                        "a rule with networks, nodes or domainNames peers cannot use named ports (those peers have none)",
                    );
                    continue;
                }
                convert_protocol(checker, &protocol_path, protocol, &mut rules);
            }
            rules.sort();
            rules.dedup();
            ports = Some(rules);
        }
    }
    if checker.errors.len() != errors_before {
        return None;
    }
    let action = action?;
    Some(match (fail_closed, action) {
        (None, _) => ClusterRule {
            name: name.cloned(),
            action,
            peers: Some(converted),
            ports,
            fail_closed: None,
        },
        // The unreadable peer matches nothing; the others still do.
        (Some(reason), RuleAction::Accept) => ClusterRule {
            name: name.cloned(),
            action,
            peers: Some(converted),
            ports,
            fail_closed: Some(reason),
        },
        // "Treat the rule as a 'Deny all' rule."
        (Some(reason), RuleAction::Deny | RuleAction::Pass) => ClusterRule {
            name: name.cloned(),
            action: RuleAction::Deny,
            peers: None,
            ports: None,
            fail_closed: Some(reason),
        },
    })
}

/// Validates a ClusterNetworkPolicy.
pub(crate) fn convert_cluster_network_policy(
    checker: &mut Checker<'_>,
    document: &ClusterNetworkPolicyDocument,
    from_api_server: bool,
) -> Option<ClusterPolicy> {
    let errors_before = checker.errors.len();
    let name = required_name(checker, "metadata.name", document.metadata.name.as_ref());
    if document
        .metadata
        .namespace
        .as_ref()
        .is_some_and(|namespace| !namespace.is_empty())
    {
        checker.error(
            "metadata.namespace",
            "a ClusterNetworkPolicy is cluster-scoped: it has no namespace",
        );
    }
    let Some(spec) = &document.spec else {
        checker.error("spec", "is required");
        return None;
    };
    let tier = match spec.tier.as_deref() {
        Some("Admin") => Some(Tier::Admin),
        Some("Baseline") => Some(Tier::Baseline),
        Some(other) => {
            checker.error(
                "spec.tier",
                format!("unknown tier {other:?} (expected Admin or Baseline)"),
            );
            None
        }
        None => {
            checker.error("spec.tier", "is required");
            None
        }
    };
    let priority = match spec.priority {
        Some(priority) if (0..=MAX_PRIORITY).contains(&priority) => {
            Some(u16::try_from(priority).expect("checked range"))
        }
        Some(priority) => {
            checker.error(
                "spec.priority",
                format!("{priority} is out of range 0-{MAX_PRIORITY}"),
            );
            None
        }
        None => {
            checker.error("spec.priority", "is required");
            None
        }
    };
    let subject = match &spec.subject {
        None => {
            checker.error("spec.subject", "is required");
            None
        }
        Some(SubjectDocument {
            namespaces: Some(namespaces),
            pods: None,
        }) => Some(ClusterSubject {
            namespaces: convert_selector(checker, "spec.subject.namespaces", namespaces),
            pods: LabelSelector::everything(),
        }),
        Some(SubjectDocument {
            namespaces: None,
            pods: Some(pods),
        }) => convert_namespaced_pod(checker, "spec.subject.pods", pods)
            .map(|(namespaces, pods)| ClusterSubject { namespaces, pods }),
        Some(_) => {
            checker.error("spec.subject", "must set exactly one of namespaces or pods");
            None
        }
    };
    let mut ingress = Vec::new();
    if let Some(rules) = &spec.ingress {
        if rules.len() > MAX_RULES {
            checker.error(
                "spec.ingress",
                format!("at most {MAX_RULES} rules, not {}", rules.len()),
            );
        }
        for (index, rule) in rules.iter().enumerate() {
            ingress.extend(convert_rule(
                checker,
                &format!("spec.ingress[{index}]"),
                RuleFields {
                    name: rule.name.as_ref(),
                    action: rule.action.as_ref(),
                    peers: rule.from.as_ref(),
                    protocols: rule.protocols.as_ref(),
                    ingress: true,
                },
                from_api_server,
            ));
        }
    }
    let mut egress = Vec::new();
    if let Some(rules) = &spec.egress {
        if rules.len() > MAX_RULES {
            checker.error(
                "spec.egress",
                format!("at most {MAX_RULES} rules, not {}", rules.len()),
            );
        }
        for (index, rule) in rules.iter().enumerate() {
            egress.extend(convert_rule(
                checker,
                &format!("spec.egress[{index}]"),
                RuleFields {
                    name: rule.name.as_ref(),
                    action: rule.action.as_ref(),
                    peers: rule.to.as_ref(),
                    protocols: rule.protocols.as_ref(),
                    ingress: false,
                },
                from_api_server,
            ));
        }
    }
    if checker.errors.len() != errors_before {
        return None;
    }
    Some(ClusterPolicy {
        name: name?,
        source: checker.source.clone(),
        tier: tier?,
        priority: priority?,
        subject: subject?,
        ingress,
        egress,
    })
}

/// A Node: its labels and its InternalIP and ExternalIP addresses.
pub(crate) fn convert_node(checker: &mut Checker<'_>, node: &Node) -> Option<NodeInfo> {
    let errors_before = checker.errors.len();
    let name = required_name(checker, "metadata.name", node.metadata.name.as_ref());
    let labels: Labels = node
        .metadata
        .labels
        .as_ref()
        .map(Labels::from)
        .unwrap_or_default();
    check_labels(checker, "metadata.labels", &labels);
    let mut addresses = Vec::new();
    for (index, address) in node
        .status
        .iter()
        .flat_map(|status| status.addresses.iter().flatten())
        .enumerate()
    {
        if address.type_ == "InternalIP" || address.type_ == "ExternalIP" {
            addresses.extend(parse_address(
                checker,
                &format!("status.addresses[{index}].address"),
                &address.address,
            ));
        }
    }
    addresses.sort();
    addresses.dedup();
    if checker.errors.len() != errors_before {
        return None;
    }
    let address_blocks = addresses
        .iter()
        .map(|&address| IpBlock {
            cidr: IpNet::from(address),
            except: Vec::new(),
        })
        .collect();
    Some(NodeInfo {
        name: name?,
        labels,
        addresses,
        address_blocks,
        source: checker.source.clone(),
    })
}
