//! Conversion of input objects (Kubernetes NetworkPolicy, Namespace, Pod and microseg
//! Workload) into the validated model. Every check records an error with its field path
//! and carries on, so one run reports every problem of a document.

use microseg_common::interface::MAX_BOUND_ADDRESSES;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sLabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

use super::error::{PolicyError, Source};
use super::model::{
    IpBlock, LabelSelector, Labels, NAMESPACE_NAME_LABEL, NamedPort, NamespaceInfo, NamespaceScope,
    Peer, Policy, PortRule, PortSpec, Protocol, Rule, SelectorOperator, SelectorRequirement,
    Workload,
};

/// Collects errors for one document, with a path prefix (`items[3].` inside a List).
pub(crate) struct Checker<'a> {
    pub source: &'a Source,
    pub prefix: String,
    pub errors: &'a mut Vec<PolicyError>,
}

impl Checker<'_> {
    fn path(&self, field: &str) -> String {
        match (self.prefix.is_empty(), field.is_empty()) {
            (true, _) => field.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}.{field}", self.prefix),
        }
    }

    pub fn error(&mut self, field: &str, reason: impl Into<String>) {
        let path = self.path(field);
        self.errors
            .push(PolicyError::new(self.source, path, reason));
    }
}

/// Records an error unless `name` is a valid named port.
pub(crate) fn check_named_port_name(
    checker: &mut Checker<'_>,
    field: &str,
    name: &str,
) -> Option<()> {
    match named_port_problem(name) {
        Some(problem) => {
            checker.error(field, format!("invalid port name {name:?}: {problem}"));
            None
        }
        None => Some(()),
    }
}

/// Whether `name` is a valid named port (an IANA service name, as Kubernetes checks).
fn named_port_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 15 {
        return Some("must be 1 to 15 characters");
    }
    if !name
        .bytes()
        .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
    {
        return Some("must contain only lower-case letters, digits and '-'");
    }
    if !name.bytes().any(|byte| byte.is_ascii_lowercase()) {
        return Some("must contain at least one letter");
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Some("must not start or end with '-' or contain '--'");
    }
    None
}

/// Kubernetes label name part / value syntax: up to 63 characters, alphanumerics at
/// both ends, `-_.` inside.
fn label_segment_ok(text: &str, allow_empty: bool) -> bool {
    if text.is_empty() {
        return allow_empty;
    }
    let bytes = text.as_bytes();
    text.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let prefix_ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|byte| {
                        byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-'
                    })
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !prefix_ok {
            return Some(format!("invalid label key {key:?}: bad DNS prefix"));
        }
    }
    if !label_segment_ok(name, false) {
        return Some(format!("invalid label key {key:?}"));
    }
    None
}

pub(crate) fn check_labels(checker: &mut Checker<'_>, field: &str, labels: &Labels) {
    for (key, value) in labels {
        if let Some(problem) = label_key_problem(key) {
            checker.error(field, problem);
        }
        if !label_segment_ok(value, true) {
            checker.error(
                &format!("{field}.{key}"),
                format!("invalid label value {value:?}"),
            );
        }
    }
}

pub(crate) fn convert_selector(
    checker: &mut Checker<'_>,
    field: &str,
    selector: &K8sLabelSelector,
) -> LabelSelector {
    let match_labels: Labels = selector
        .match_labels
        .as_ref()
        .map(Labels::from)
        .unwrap_or_default();
    check_labels(checker, &format!("{field}.matchLabels"), &match_labels);
    let mut match_expressions = Vec::new();
    for (index, expression) in selector.match_expressions.iter().flatten().enumerate() {
        let path = format!("{field}.matchExpressions[{index}]");
        if let Some(problem) = label_key_problem(&expression.key) {
            checker.error(&format!("{path}.key"), problem);
        }
        let values = expression.values.clone().unwrap_or_default();
        let operator = match expression.operator.as_str() {
            "In" => SelectorOperator::In,
            "NotIn" => SelectorOperator::NotIn,
            "Exists" => SelectorOperator::Exists,
            "DoesNotExist" => SelectorOperator::DoesNotExist,
            other => {
                checker.error(
                    &format!("{path}.operator"),
                    format!(
                        "invalid label selector operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                    ),
                );
                continue;
            }
        };
        match operator {
            SelectorOperator::In | SelectorOperator::NotIn if values.is_empty() => {
                checker.error(
                    &format!("{path}.values"),
                    format!("operator {} needs at least one value", expression.operator),
                );
            }
            SelectorOperator::Exists | SelectorOperator::DoesNotExist if !values.is_empty() => {
                checker.error(
                    &format!("{path}.values"),
                    format!("operator {} takes no values", expression.operator),
                );
            }
            _ => {}
        }
        for (value_index, value) in values.iter().enumerate() {
            if !label_segment_ok(value, true) {
                checker.error(
                    &format!("{path}.values[{value_index}]"),
                    format!("invalid label value {value:?}"),
                );
            }
        }
        let values: BTreeSet<String> = values.into_iter().collect();
        match_expressions.push(SelectorRequirement {
            key: expression.key.clone(),
            operator,
            values: values.into_iter().collect(),
        });
    }
    match_expressions.sort();
    match_expressions.dedup();
    LabelSelector {
        match_labels,
        match_expressions,
    }
}

/// IPv4-mapped IPv6 (`::ffff:0:0/96`): the data path stores IPv4 in that form, so such
/// IPv6 ranges would alias IPv4 traffic. Rejected; write the IPv4 form.
fn is_ipv4_mapped_range(net: &IpNet) -> bool {
    let mapped: IpNet = "::ffff:0:0/96".parse().expect("constant prefix");
    mapped.contains(net)
}

pub(crate) fn parse_cidr(checker: &mut Checker<'_>, field: &str, text: &str) -> Option<IpNet> {
    match IpNet::from_str(text) {
        Ok(net) if is_ipv4_mapped_range(&net) => {
            checker.error(
                field,
                format!("{text}: IPv4-mapped IPv6 ranges are not supported; use the IPv4 form"),
            );
            None
        }
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            checker.error(field, format!("bad CIDR {text:?}"));
            None
        }
    }
}

fn convert_ip_block(checker: &mut Checker<'_>, field: &str, block: &IPBlock) -> Option<IpBlock> {
    let cidr = parse_cidr(checker, &format!("{field}.cidr"), &block.cidr);
    let mut except = Vec::new();
    let mut ok = cidr.is_some();
    for (index, text) in block.except.iter().flatten().enumerate() {
        let path = format!("{field}.except[{index}]");
        let Some(net) = parse_cidr(checker, &path, text) else {
            ok = false;
            continue;
        };
        if let Some(cidr) = cidr
            && !(cidr.contains(&net) && net.prefix_len() > cidr.prefix_len())
        {
            checker.error(
                &path,
                format!("{text} is not strictly inside cidr {}", block.cidr),
            );
            ok = false;
            continue;
        }
        except.push(net);
    }
    except.sort();
    except.dedup();
    ok.then(|| IpBlock {
        cidr: cidr.expect("checked above"),
        except,
    })
}

fn convert_peer(
    checker: &mut Checker<'_>,
    field: &str,
    policy_namespace: &str,
    peer: &NetworkPolicyPeer,
) -> Option<Peer> {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            checker.error(
                field,
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            );
            return None;
        }
        return convert_ip_block(checker, &format!("{field}.ipBlock"), block).map(Peer::IpBlock);
    }
    let pods = peer
        .pod_selector
        .as_ref()
        .map(|selector| convert_selector(checker, &format!("{field}.podSelector"), selector));
    let namespaces = peer
        .namespace_selector
        .as_ref()
        .map(|selector| convert_selector(checker, &format!("{field}.namespaceSelector"), selector));
    match (pods, namespaces) {
        (None, None) => {
            checker.error(
                field,
                "peer must set podSelector, namespaceSelector or ipBlock",
            );
            None
        }
        (pods, Some(namespaces)) => Some(Peer::Workloads {
            namespaces: NamespaceScope::Selected(namespaces),
            pods: pods.unwrap_or_default(),
        }),
        (Some(pods), None) => Some(Peer::Workloads {
            namespaces: NamespaceScope::Named(policy_namespace.to_string()),
            pods,
        }),
    }
}

pub(crate) fn check_port_number(checker: &mut Checker<'_>, field: &str, value: i64) -> Option<u16> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Some(port),
        _ => {
            checker.error(field, format!("{value} is out of range 1-65535"));
            None
        }
    }
}

fn convert_port(
    checker: &mut Checker<'_>,
    field: &str,
    port: &NetworkPolicyPort,
) -> Option<PortRule> {
    let protocol = match port.protocol.as_deref() {
        None => Some(Protocol::Tcp),
        Some(text) => match text {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            other => {
                checker.error(
                    &format!("{field}.protocol"),
                    format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)"),
                );
                None
            }
        },
    };
    let end_path = format!("{field}.endPort");
    let spec = match (&port.port, port.end_port) {
        (None, None) => Some(PortSpec::Any),
        (None, Some(_)) => {
            checker.error(&end_path, "endPort requires port");
            None
        }
        (Some(IntOrString::Int(number)), end_port) => {
            let first = check_port_number(checker, &format!("{field}.port"), i64::from(*number));
            let last = match end_port {
                None => first,
                Some(end) => {
                    let last = check_port_number(checker, &end_path, i64::from(end));
                    match (first, last) {
                        (Some(first), Some(last)) if last < first => {
                            checker.error(&end_path, format!("{last} is below port {first}"));
                            None
                        }
                        _ => last,
                    }
                }
            };
            match (first, last) {
                (Some(first), Some(last)) => Some(PortSpec::Range { first, last }),
                _ => None,
            }
        }
        (Some(IntOrString::String(name)), end_port) => {
            let mut ok = true;
            if let Some(problem) = named_port_problem(name) {
                checker.error(
                    &format!("{field}.port"),
                    format!("invalid named port {name:?}: {problem}"),
                );
                ok = false;
            }
            if end_port.is_some() {
                checker.error(
                    &end_path,
                    format!("endPort cannot be used with named port {name:?}"),
                );
                ok = false;
            }
            ok.then(|| PortSpec::Named(name.clone()))
        }
    };
    Some(PortRule {
        protocol: protocol?,
        port: spec?,
    })
}

/// Converts one rule; `peers`/`ports` are `from`/`to` and `ports` as written.
fn convert_rule(
    checker: &mut Checker<'_>,
    field: &str,
    peer_field: &str,
    policy_namespace: &str,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
) -> Rule {
    let peers = peers.filter(|peers| !peers.is_empty()).map(|peers| {
        peers
            .iter()
            .enumerate()
            .filter_map(|(index, peer)| {
                convert_peer(
                    checker,
                    &format!("{field}.{peer_field}[{index}]"),
                    policy_namespace,
                    peer,
                )
            })
            .collect::<Vec<_>>()
    });
    let ports = ports.filter(|ports| !ports.is_empty()).map(|ports| {
        ports
            .iter()
            .enumerate()
            .filter_map(|(index, port)| {
                convert_port(checker, &format!("{field}.ports[{index}]"), port)
            })
            .collect::<Vec<_>>()
    });
    Rule { peers, ports }
}

pub(crate) fn required_name(
    checker: &mut Checker<'_>,
    field: &str,
    value: Option<&String>,
) -> Option<String> {
    match value {
        Some(value) if !value.is_empty() => Some(value.clone()),
        _ => {
            checker.error(field, "is required");
            None
        }
    }
}

/// Validates a NetworkPolicy and applies Kubernetes defaulting.
pub(crate) fn convert_network_policy(
    checker: &mut Checker<'_>,
    policy: &NetworkPolicy,
) -> Option<Policy> {
    let errors_before = checker.errors.len();
    let name = required_name(checker, "metadata.name", policy.metadata.name.as_ref());
    let namespace = required_name(
        checker,
        "metadata.namespace",
        policy.metadata.namespace.as_ref(),
    );
    let spec = policy.spec.clone().unwrap_or_default();
    let policy_namespace = namespace.clone().unwrap_or_default();
    let pod_selector = spec
        .pod_selector
        .as_ref()
        .map(|selector| convert_selector(checker, "spec.podSelector", selector))
        .unwrap_or_default();

    // Defaulting as the API server does it: without policyTypes, Ingress always and
    // Egress when there are egress rules.
    let (has_ingress, has_egress) =
        match spec.policy_types.as_ref().filter(|types| !types.is_empty()) {
            None => (
                true,
                spec.egress.as_ref().is_some_and(|rules| !rules.is_empty()),
            ),
            Some(types) => {
                let mut has_ingress = false;
                let mut has_egress = false;
                for (index, policy_type) in types.iter().enumerate() {
                    match policy_type.as_str() {
                        "Ingress" => has_ingress = true,
                        "Egress" => has_egress = true,
                        other => checker.error(
                            &format!("spec.policyTypes[{index}]"),
                            format!("unknown policy type {other:?} (expected Ingress or Egress)"),
                        ),
                    }
                }
                (has_ingress, has_egress)
            }
        };

    let ingress = has_ingress.then(|| {
        spec.ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(index, rule)| {
                convert_rule(
                    checker,
                    &format!("spec.ingress[{index}]"),
                    "from",
                    &policy_namespace,
                    rule.from.as_ref(),
                    rule.ports.as_ref(),
                )
            })
            .collect()
    });
    let egress = has_egress.then(|| {
        spec.egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(index, rule)| {
                convert_rule(
                    checker,
                    &format!("spec.egress[{index}]"),
                    "to",
                    &policy_namespace,
                    rule.to.as_ref(),
                    rule.ports.as_ref(),
                )
            })
            .collect()
    });
    if checker.errors.len() != errors_before {
        return None;
    }
    Some(Policy {
        namespace: namespace?,
        name: name?,
        source: checker.source.clone(),
        pod_selector,
        ingress,
        egress,
    })
}

/// Labels of a namespace with the implied `kubernetes.io/metadata.name`.
pub(crate) fn namespace_labels(name: &str, mut labels: Labels) -> Labels {
    labels.insert(NAMESPACE_NAME_LABEL, name);
    labels
}

pub(crate) fn convert_namespace(
    checker: &mut Checker<'_>,
    namespace: &K8sNamespace,
) -> Option<NamespaceInfo> {
    let name = required_name(checker, "metadata.name", namespace.metadata.name.as_ref())?;
    let labels = namespace_labels(
        &name,
        namespace
            .metadata
            .labels
            .as_ref()
            .map(Labels::from)
            .unwrap_or_default(),
    );
    let errors_before = checker.errors.len();
    check_labels(checker, "metadata.labels", &labels);
    (checker.errors.len() == errors_before).then(|| NamespaceInfo {
        name,
        labels,
        source: Some(checker.source.clone()),
    })
}

pub(crate) fn parse_address(checker: &mut Checker<'_>, field: &str, text: &str) -> Option<IpAddr> {
    match IpAddr::from_str(text) {
        Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => {
            checker.error(
                field,
                format!("{text}: IPv4-mapped address; use the IPv4 form"),
            );
            None
        }
        Ok(address) => Some(address),
        Err(_) => {
            checker.error(field, format!("bad IP address {text:?}"));
            None
        }
    }
}

fn check_named_ports(checker: &mut Checker<'_>, ports: &[(String, NamedPort)]) {
    let mut seen = BTreeSet::new();
    for (path, port) in ports {
        if let Some(problem) = named_port_problem(&port.name) {
            checker.error(
                path,
                format!("invalid port name {:?}: {problem}", port.name),
            );
        }
        if !seen.insert(port.name.clone()) {
            checker.error(path, format!("duplicate port name {:?}", port.name));
        }
    }
}

/// A Pod: addresses from status.podIPs (or status.podIP), named ports from its
/// containers. Host-network pods and finished pods keep no addresses: NetworkPolicy does
/// not apply to the former, and the latter's addresses may already belong to others.
pub(crate) fn convert_pod(checker: &mut Checker<'_>, pod: &Pod) -> Option<Workload> {
    let errors_before = checker.errors.len();
    let name = required_name(checker, "metadata.name", pod.metadata.name.as_ref());
    let namespace = required_name(
        checker,
        "metadata.namespace",
        pod.metadata.namespace.as_ref(),
    );
    let labels: Labels = pod
        .metadata
        .labels
        .as_ref()
        .map(Labels::from)
        .unwrap_or_default();
    check_labels(checker, "metadata.labels", &labels);

    let host_network = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.host_network)
        .unwrap_or(false);
    let finished = pod
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    let mut addresses = Vec::new();
    if let Some(status) = &pod.status
        && !host_network
        && !finished
    {
        match &status.pod_ips {
            Some(ips) if !ips.is_empty() => {
                for (index, ip) in ips.iter().enumerate() {
                    if let Some(address) =
                        parse_address(checker, &format!("status.podIPs[{index}].ip"), &ip.ip)
                    {
                        addresses.push(address);
                    }
                }
            }
            _ => {
                if let Some(ip) = &status.pod_ip
                    && let Some(address) = parse_address(checker, "status.podIP", ip)
                {
                    addresses.push(address);
                }
            }
        }
    }
    addresses.sort();
    addresses.dedup();

    let mut ports = Vec::new();
    for (container_index, container) in pod
        .spec
        .iter()
        .flat_map(|spec| spec.containers.iter())
        .enumerate()
    {
        for (port_index, port) in container.ports.iter().flatten().enumerate() {
            let path = format!("spec.containers[{container_index}].ports[{port_index}]");
            let Some(port_name) = &port.name else {
                continue;
            };
            let number = check_port_number(
                checker,
                &format!("{path}.containerPort"),
                i64::from(port.container_port),
            );
            let protocol = match port.protocol.as_deref().map(Protocol::from_str) {
                None => Some(Protocol::Tcp),
                Some(Ok(protocol)) => Some(protocol),
                Some(Err(reason)) => {
                    checker.error(&format!("{path}.protocol"), reason);
                    None
                }
            };
            if let (Some(number), Some(protocol)) = (number, protocol) {
                ports.push((
                    format!("{path}.name"),
                    NamedPort {
                        name: port_name.clone(),
                        port: number,
                        protocol,
                    },
                ));
            }
        }
    }
    check_named_ports(checker, &ports);
    if checker.errors.len() != errors_before {
        return None;
    }
    Some(Workload {
        namespace: namespace?,
        name: name?,
        labels,
        addresses,
        ports: ports.into_iter().map(|(_, port)| port).collect(),
        interface: None,
        node: pod
            .spec
            .as_ref()
            .and_then(|spec| spec.node_name.clone())
            .filter(|node| !node.is_empty()),
        source: checker.source.clone(),
    })
}

/// `apiVersion: microseg.dev/v1`, `kind: Workload`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadDocument {
    #[expect(dead_code, reason = "checked by the loader before deserializing")]
    api_version: String,
    #[expect(dead_code, reason = "checked by the loader before deserializing")]
    kind: String,
    metadata: WorkloadMetadata,
    #[serde(default)]
    spec: WorkloadSpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadMetadata {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: Labels,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadSpec {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<WorkloadPort>,
    interface: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadPort {
    name: String,
    port: i64,
    protocol: Option<String>,
}

pub(crate) fn convert_workload_document(
    checker: &mut Checker<'_>,
    value: &serde_json::Value,
) -> Option<Workload> {
    let document: WorkloadDocument = match serde_path_to_error::deserialize(value) {
        Ok(document) => document,
        Err(error) => {
            let (field, reason) =
                super::load::serde_error_location(error.path(), &error.inner().to_string());
            checker.error(&field, format!("cannot read Workload: {reason}"));
            return None;
        }
    };
    let errors_before = checker.errors.len();
    let name = required_name(checker, "metadata.name", document.metadata.name.as_ref());
    let namespace = required_name(
        checker,
        "metadata.namespace",
        document.metadata.namespace.as_ref(),
    );
    check_labels(checker, "metadata.labels", &document.metadata.labels);
    let mut addresses = Vec::new();
    for (index, text) in document.spec.addresses.iter().enumerate() {
        let path = format!("spec.addresses[{index}]");
        if let Some(address) = parse_address(checker, &path, text) {
            if addresses.contains(&address) {
                checker.error(&path, format!("duplicate address {address}"));
            }
            addresses.push(address);
        }
    }
    addresses.sort();
    addresses.dedup();
    let mut ports = Vec::new();
    for (index, port) in document.spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{index}]");
        let number = check_port_number(checker, &format!("{path}.port"), port.port);
        let protocol = match port.protocol.as_deref().map(Protocol::from_str) {
            None => Some(Protocol::Tcp),
            Some(Ok(protocol)) => Some(protocol),
            Some(Err(reason)) => {
                checker.error(&format!("{path}.protocol"), reason);
                None
            }
        };
        if let (Some(number), Some(protocol)) = (number, protocol) {
            ports.push((
                format!("{path}.name"),
                NamedPort {
                    name: port.name.clone(),
                    port: number,
                    protocol,
                },
            ));
        }
    }
    check_named_ports(checker, &ports);
    if let Some(interface) = &document.spec.interface {
        if let Err(reason) = check_interface_name(interface) {
            checker.error("spec.interface", reason);
        }
        if addresses.len() > MAX_BOUND_ADDRESSES {
            checker.error(
                "spec.interface",
                format!(
                    "a workload with its own interface has at most {MAX_BOUND_ADDRESSES} addresses (this one has {}): the data path checks sources against that many",
                    addresses.len()
                ),
            );
        }
    }
    if checker.errors.len() != errors_before {
        return None;
    }
    Some(Workload {
        namespace: namespace?,
        name: name?,
        labels: document.metadata.labels,
        addresses,
        ports: ports.into_iter().map(|(_, port)| port).collect(),
        interface: document.spec.interface,
        node: None,
        source: checker.source.clone(),
    })
}

/// An interface name as the kernel accepts it: 1 to 15 bytes, no '/', ':' or
/// whitespace.
pub(crate) fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "interface name {name:?} must have 1 to 15 characters"
        ));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "interface name {name:?} may not contain '/', ':' or whitespace"
        ));
    }
    Ok(())
}
