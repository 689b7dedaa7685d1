//! Hubble's flow filters (`flow.FlowFilter`), applied by the server as Hubble does:
//! the fields set in one filter must all match, the entries of one field are
//! alternatives, a flow passes the whitelist if any of its filters matches (an empty
//! whitelist passes everything), and any matching blacklist filter excludes it. A
//! field microseg's flows cannot answer (DNS names, services, L7, CEL, ...) is
//! refused with a message naming it, never silently ignored.

use std::net::IpAddr;

use ipnet::IpNet;

use super::proto::flow::{
    Endpoint, Flow, FlowFilter, NetworkInterface, TcpFlags, layer4::Protocol,
};

/// One check of a filter: true if the flow matches.
type Check = Box<dyn Fn(&Flow) -> bool + Send + Sync>;

/// A whitelist and a blacklist, checked and ready to match.
pub struct FlowFilters {
    whitelist: Vec<Vec<Check>>,
    blacklist: Vec<Vec<Check>>,
}

impl FlowFilters {
    /// Compiles the request's filters; an error says which field is wrong and why.
    pub fn new(whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> Result<Self, String> {
        let compile_all = |filters: &[FlowFilter], list: &str| {
            filters
                .iter()
                .enumerate()
                .map(|(i, f)| compile(f).map_err(|e| format!("{list}[{i}]: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            whitelist: compile_all(whitelist, "whitelist")?,
            blacklist: compile_all(blacklist, "blacklist")?,
        })
    }

    pub fn admits(&self, flow: &Flow) -> bool {
        let matches = |checks: &Vec<Check>| checks.iter().all(|check| check(flow));
        (self.whitelist.is_empty() || self.whitelist.iter().any(matches))
            && !self.blacklist.iter().any(matches)
    }
}

fn compile(filter: &FlowFilter) -> Result<Vec<Check>, String> {
    refuse_unanswerable(filter)?;
    let mut checks: Vec<Check> = Vec::new();
    if !filter.source_ip.is_empty() {
        let nets = parse_ips(&filter.source_ip, "source_ip")?;
        checks.push(Box::new(move |f| ip_matches(&nets, flow_ip(f, true))));
    }
    if !filter.destination_ip.is_empty() {
        let nets = parse_ips(&filter.destination_ip, "destination_ip")?;
        checks.push(Box::new(move |f| ip_matches(&nets, flow_ip(f, false))));
    }
    if !filter.source_pod.is_empty() {
        let pods = parse_pods(&filter.source_pod, "source_pod")?;
        checks.push(Box::new(move |f| pod_matches(&pods, f.source.as_ref())));
    }
    if !filter.destination_pod.is_empty() {
        let pods = parse_pods(&filter.destination_pod, "destination_pod")?;
        checks.push(Box::new(move |f| {
            pod_matches(&pods, f.destination.as_ref())
        }));
    }
    if !filter.source_label.is_empty() {
        let selectors = parse_selectors(&filter.source_label, "source_label")?;
        checks.push(Box::new(move |f| {
            selectors_match(&selectors, f.source.as_ref())
        }));
    }
    if !filter.destination_label.is_empty() {
        let selectors = parse_selectors(&filter.destination_label, "destination_label")?;
        checks.push(Box::new(move |f| {
            selectors_match(&selectors, f.destination.as_ref())
        }));
    }
    if !filter.source_identity.is_empty() {
        let ids = filter.source_identity.clone();
        checks.push(Box::new(move |f| {
            ids.contains(&f.source.as_ref().map_or(0, |e| e.identity))
        }));
    }
    if !filter.destination_identity.is_empty() {
        let ids = filter.destination_identity.clone();
        checks.push(Box::new(move |f| {
            ids.contains(&f.destination.as_ref().map_or(0, |e| e.identity))
        }));
    }
    if !filter.verdict.is_empty() {
        let verdicts = filter.verdict.clone();
        checks.push(Box::new(move |f| verdicts.contains(&f.verdict)));
    }
    if !filter.traffic_direction.is_empty() {
        let directions = filter.traffic_direction.clone();
        checks.push(Box::new(move |f| directions.contains(&f.traffic_direction)));
    }
    if !filter.ip_version.is_empty() {
        let versions = filter.ip_version.clone();
        checks.push(Box::new(move |f| {
            versions.contains(&f.ip.as_ref().map_or(0, |ip| ip.ip_version))
        }));
    }
    if !filter.event_type.is_empty() {
        let types = filter.event_type.clone();
        checks.push(Box::new(move |f| {
            let event = f.event_type.unwrap_or_default();
            types.iter().any(|t| {
                t.r#type == event.r#type && (!t.match_sub_type || t.sub_type == event.sub_type)
            })
        }));
    }
    if !filter.protocol.is_empty() {
        let protocols = parse_protocols(&filter.protocol)?;
        checks.push(Box::new(move |f| {
            let name = protocol_name(f);
            protocols
                .iter()
                .any(|p| Some(p.as_str()) == name || (p == "icmp" && is_icmp(name)))
        }));
    }
    if !filter.source_port.is_empty() {
        let ports = parse_ports(&filter.source_port, "source_port")?;
        checks.push(Box::new(move |f| {
            ports_of(f).is_some_and(|(source, _)| ports.contains(&source))
        }));
    }
    if !filter.destination_port.is_empty() {
        let ports = parse_ports(&filter.destination_port, "destination_port")?;
        checks.push(Box::new(move |f| {
            ports_of(f).is_some_and(|(_, destination)| ports.contains(&destination))
        }));
    }
    if !filter.reply.is_empty() {
        let replies = filter.reply.clone();
        checks.push(Box::new(move |f| {
            f.is_reply.is_some_and(|reply| replies.contains(&reply))
        }));
    }
    if !filter.tcp_flags.is_empty() {
        let wanted = filter.tcp_flags.clone();
        checks.push(Box::new(move |f| {
            let Some(Protocol::Tcp(tcp)) = f.l4.as_ref().and_then(|l4| l4.protocol.as_ref()) else {
                return false;
            };
            let flags = tcp.flags.unwrap_or_default();
            wanted.iter().any(|w| flags_include(&flags, w))
        }));
    }
    if !filter.drop_reason_desc.is_empty() {
        let reasons = filter.drop_reason_desc.clone();
        checks.push(Box::new(move |f| reasons.contains(&f.drop_reason_desc)));
    }
    if !filter.interface.is_empty() {
        let interfaces = filter.interface.clone();
        checks.push(Box::new(move |f| {
            f.interface
                .as_ref()
                .is_some_and(|seen| interfaces.iter().any(|i| interface_matches(i, seen)))
        }));
    }
    if !filter.node_labels.is_empty() {
        let selectors = parse_selectors(&filter.node_labels, "node_labels")?;
        checks.push(Box::new(move |f| {
            selectors_match_labels(&selectors, &f.node_labels)
        }));
    }
    if !filter.source_cluster_name.is_empty() {
        let names = parse_cluster_names(&filter.source_cluster_name, "source_cluster_name")?;
        checks.push(Box::new(move |f| {
            cluster_matches(&names, f.source.as_ref())
        }));
    }
    if !filter.destination_cluster_name.is_empty() {
        let names =
            parse_cluster_names(&filter.destination_cluster_name, "destination_cluster_name")?;
        checks.push(Box::new(move |f| {
            cluster_matches(&names, f.destination.as_ref())
        }));
    }
    if !filter.encrypted.is_empty() {
        // microseg sees traffic before any encryption: its flows say `false`.
        let wanted = filter.encrypted.clone();
        checks.push(Box::new(move |f| {
            wanted.contains(&f.ip.as_ref().is_some_and(|ip| ip.encrypted))
        }));
    }
    if !filter.node_name.is_empty() {
        let patterns = filter
            .node_name
            .iter()
            .map(|p| NodePattern::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        checks.push(Box::new(move |f| {
            patterns.iter().any(|p| p.matches(&f.node_name))
        }));
    }
    Ok(checks)
}

/// Filter fields whose answer microseg's flows do not carry.
fn refuse_unanswerable(filter: &FlowFilter) -> Result<(), String> {
    let unanswerable = [
        ("uuid", filter.uuid.is_empty()),
        ("source_fqdn", filter.source_fqdn.is_empty()),
        ("destination_fqdn", filter.destination_fqdn.is_empty()),
        ("source_service", filter.source_service.is_empty()),
        ("destination_service", filter.destination_service.is_empty()),
        ("source_workload", filter.source_workload.is_empty()),
        (
            "destination_workload",
            filter.destination_workload.is_empty(),
        ),
        ("http_status_code", filter.http_status_code.is_empty()),
        ("http_method", filter.http_method.is_empty()),
        ("http_path", filter.http_path.is_empty()),
        ("dns_query", filter.dns_query.is_empty()),
        ("trace_id", filter.trace_id.is_empty()),
        ("http_url", filter.http_url.is_empty()),
        ("http_header", filter.http_header.is_empty()),
        // microseg translates no addresses: there is no translated source.
        ("source_ip_xlated", filter.source_ip_xlated.is_empty()),
        ("ip_trace_id", filter.ip_trace_id.is_empty()),
        (
            "experimental.cel_expression",
            filter
                .experimental
                .as_ref()
                .is_none_or(|e| e.cel_expression.is_empty()),
        ),
    ];
    let set: Vec<&str> = unanswerable
        .iter()
        .filter(|(_, empty)| !empty)
        .map(|(name, _)| *name)
        .collect();
    if set.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "microseg cannot filter on {}: its flows are L3/L4 verdicts without DNS names, services, workloads, L7 data, translated addresses, trace ids, uuids or CEL",
            set.join(", ")
        ))
    }
}

fn parse_ips(texts: &[String], field: &str) -> Result<Vec<IpNet>, String> {
    texts
        .iter()
        .map(|text| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{field}: {text:?} is not an IP address or CIDR"))
        })
        .collect()
}

fn flow_ip(flow: &Flow, source: bool) -> Option<IpAddr> {
    let ip = flow.ip.as_ref()?;
    let text = if source { &ip.source } else { &ip.destination };
    text.parse().ok()
}

fn ip_matches(nets: &[IpNet], address: Option<IpAddr>) -> bool {
    address.is_some_and(|a| nets.iter().any(|net| net.contains(&a)))
}

/// `namespace/pod-name-prefix`, `namespace/` (any pod of the namespace),
/// `/pod-name-prefix` (in any namespace), or `pod-name-prefix` in the `default`
/// namespace, as the hubble CLI means it.
struct PodFilter {
    /// `None`: any namespace.
    namespace: Option<String>,
    prefix: String,
}

fn parse_pods(texts: &[String], field: &str) -> Result<Vec<PodFilter>, String> {
    texts
        .iter()
        .map(|text| {
            let (namespace, prefix) = match text.split_once('/') {
                Some(("", prefix)) => (None, prefix),
                Some((namespace, prefix)) => (Some(namespace), prefix),
                None => (Some("default"), text.as_str()),
            };
            if text.is_empty() || (namespace.is_none() && prefix.is_empty()) {
                return Err(format!(
                    "{field}: {text:?} is not [namespace]/pod-name-prefix, namespace/ or pod-name-prefix"
                ));
            }
            Ok(PodFilter {
                namespace: namespace.map(str::to_owned),
                prefix: prefix.to_owned(),
            })
        })
        .collect()
}

fn pod_matches(pods: &[PodFilter], endpoint: Option<&Endpoint>) -> bool {
    let Some(endpoint) = endpoint else {
        return false;
    };
    pods.iter().any(|pod| {
        pod.namespace
            .as_ref()
            .map_or(!endpoint.namespace.is_empty(), |n| *n == endpoint.namespace)
            && (pod.prefix.is_empty()
                || (!endpoint.pod_name.is_empty() && endpoint.pod_name.starts_with(&pod.prefix)))
    })
}

/// Hubble's interface match: a set index and a set name must both agree; an
/// entry with neither matches any interface.
fn interface_matches(wanted: &NetworkInterface, seen: &NetworkInterface) -> bool {
    (wanted.index == 0 || wanted.index == seen.index)
        && (wanted.name.is_empty() || wanted.name == seen.name)
}

fn parse_cluster_names(texts: &[String], field: &str) -> Result<Vec<String>, String> {
    if texts.iter().any(String::is_empty) {
        return Err(format!("{field}: a cluster name must not be empty"));
    }
    Ok(texts.to_vec())
}

fn cluster_matches(names: &[String], endpoint: Option<&Endpoint>) -> bool {
    let cluster = endpoint.map_or("", |e| e.cluster_name.as_str());
    names.iter().any(|name| name == cluster)
}

/// A Kubernetes label selector over an endpoint's labels (`source:key=value`, e.g.
/// `k8s:app=web`): a key with a source (`k8s:app`) matches that source only, a key
/// without one matches any.
struct Selector(Vec<Requirement>);

enum Requirement {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

fn parse_selectors(texts: &[String], field: &str) -> Result<Vec<Selector>, String> {
    texts
        .iter()
        .map(|text| parse_selector(text).map_err(|e| format!("{field}: {text:?}: {e}")))
        .collect()
}

fn parse_selector(text: &str) -> Result<Selector, String> {
    let mut requirements = Vec::new();
    for part in split_requirements(text) {
        let part = part.trim();
        if part.is_empty() {
            return Err("empty requirement".to_owned());
        }
        let key = |k: &str| -> Result<String, String> {
            let k = k.trim();
            if k.is_empty() || k.contains(char::is_whitespace) {
                Err(format!("invalid label key {k:?}"))
            } else {
                Ok(k.to_owned())
            }
        };
        let set = |values: &str| -> Result<Vec<String>, String> {
            let inner = values
                .trim()
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(|| format!("expected (values) in {part:?}"))?;
            Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
        };
        let requirement = if let Some(rest) = part.strip_prefix('!') {
            Requirement::NotExists(key(rest)?)
        } else if let Some((k, values)) = part.split_once(" notin ") {
            Requirement::NotIn(key(k)?, set(values)?)
        } else if let Some((k, values)) = part.split_once(" in ") {
            Requirement::In(key(k)?, set(values)?)
        } else if let Some((k, value)) = part.split_once("!=") {
            Requirement::NotIn(key(k)?, vec![value.trim().to_owned()])
        } else if let Some((k, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
            Requirement::In(key(k)?, vec![value.trim().to_owned()])
        } else {
            Requirement::Exists(key(part)?)
        };
        requirements.push(requirement);
    }
    Ok(Selector(requirements))
}

/// Splits at commas outside parentheses (`app in (a,b),tier=web`).
fn split_requirements(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// The values of `key` among the labels (`[source:]key=value`; the source is
/// before the `=`, since a value may hold a colon).
fn label_values<'a>(labels: &'a [String], key: &str) -> Vec<&'a str> {
    let (want_source, want_key) = match key.split_once(':') {
        Some((source, key)) if source != "any" => (Some(source), key),
        Some((_, key)) => (None, key),
        None => (None, key),
    };
    labels
        .iter()
        .filter_map(|label| {
            let (full_key, v) = label.split_once('=').unwrap_or((label, ""));
            let (source, k) = full_key.split_once(':').unwrap_or(("", full_key));
            (k == want_key && want_source.is_none_or(|s| s == source)).then_some(v)
        })
        .collect()
}

fn selectors_match(selectors: &[Selector], endpoint: Option<&Endpoint>) -> bool {
    selectors_match_labels(selectors, endpoint.map_or(&[][..], |e| &e.labels[..]))
}

fn selectors_match_labels(selectors: &[Selector], labels: &[String]) -> bool {
    selectors.iter().any(|Selector(requirements)| {
        requirements.iter().all(|r| match r {
            Requirement::Exists(k) => !label_values(labels, k).is_empty(),
            Requirement::NotExists(k) => label_values(labels, k).is_empty(),
            Requirement::In(k, values) => label_values(labels, k)
                .iter()
                .any(|v| values.iter().any(|w| w == v)),
            Requirement::NotIn(k, values) => !label_values(labels, k)
                .iter()
                .any(|v| values.iter().any(|w| w == v)),
        })
    })
}

fn parse_protocols(texts: &[String]) -> Result<Vec<String>, String> {
    texts
        .iter()
        .map(|text| {
            let lower = text.to_ascii_lowercase();
            match lower.as_str() {
                "tcp" | "udp" | "sctp" | "icmp" | "icmpv4" | "icmpv6" => Ok(lower),
                // Hubble's L7 protocols: valid, and never an L3/L4 verdict's.
                "http" | "dns" | "kafka" => Ok(lower),
                _ => Err(format!("protocol: unknown protocol {text:?}")),
            }
        })
        .collect()
}

fn protocol_name(flow: &Flow) -> Option<&'static str> {
    Some(match flow.l4.as_ref()?.protocol.as_ref()? {
        Protocol::Tcp(_) => "tcp",
        Protocol::Udp(_) => "udp",
        Protocol::Sctp(_) => "sctp",
        Protocol::IcmPv4(_) => "icmpv4",
        Protocol::IcmPv6(_) => "icmpv6",
    })
}

fn is_icmp(name: Option<&str>) -> bool {
    matches!(name, Some("icmpv4" | "icmpv6"))
}

fn parse_ports(texts: &[String], field: &str) -> Result<Vec<u32>, String> {
    texts
        .iter()
        .map(|text| {
            text.parse::<u16>()
                .map(u32::from)
                .map_err(|_| format!("{field}: {text:?} is not a port number (0-65535)"))
        })
        .collect()
}

fn ports_of(flow: &Flow) -> Option<(u32, u32)> {
    match flow.l4.as_ref()?.protocol.as_ref()? {
        Protocol::Tcp(p) => Some((p.source_port, p.destination_port)),
        Protocol::Udp(p) => Some((p.source_port, p.destination_port)),
        Protocol::Sctp(p) => Some((p.source_port, p.destination_port)),
        Protocol::IcmPv4(_) | Protocol::IcmPv6(_) => None,
    }
}

/// Every flag set in `wanted` is set in `flags`.
fn flags_include(flags: &TcpFlags, wanted: &TcpFlags) -> bool {
    let bits = |f: &TcpFlags| [f.fin, f.syn, f.rst, f.psh, f.ack, f.urg, f.ece, f.cwr, f.ns];
    bits(wanted)
        .iter()
        .zip(bits(flags))
        .all(|(want, has)| !want || has)
}

/// Hubble's node name pattern: `[cluster/]node` with `*` wildcards. microseg's
/// cluster is `default` (`convert::CLUSTER_NAME`): another cluster matches nothing.
struct NodePattern {
    cluster_matches: bool,
    node: String,
}

impl NodePattern {
    fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("node_name: empty pattern".to_owned());
        }
        let (cluster, node) = match text.split_once('/') {
            Some((cluster, node)) => (Some(cluster), node),
            None => (None, text),
        };
        Ok(Self {
            cluster_matches: cluster.is_none_or(|c| glob_matches(c, super::convert::CLUSTER_NAME)),
            node: if node.is_empty() { "*" } else { node }.to_owned(),
        })
    }

    fn matches(&self, node_name: &str) -> bool {
        self.cluster_matches && glob_matches(&self.node, node_name)
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    let Some(mut rest) = text
        .strip_prefix(first)
        .and_then(|rest| rest.strip_suffix(last))
    else {
        return false;
    };
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hubble::{
        convert::flow_of_json,
        proto::flow::{
            DropReason, EventTypeFilter, HttpHeader, TrafficDirection, Verdict,
            flow_filter::Experimental,
        },
    };
    use serde_json::json;

    fn denied_tcp() -> Flow {
        flow_of_json(&json!({
            "time": "2026-11-25T10:00:00.5Z", "verdict": "DROPPED", "node_name": "node-1",
            "drop_reason_desc": "POLICY_DENIED", "traffic_direction": "INGRESS",
            "interface": {"index": 7, "name": "veth1"},
            "IP": {"source": "10.80.0.1", "destination": "10.80.0.2", "ipVersion": "IPv4"},
            "source": {"identity": 300, "namespace": "app", "pod_name": "client-1",
                       "labels": ["k8s:app=client", "k8s:tier=front"]},
            "destination": {"namespace": "app", "pod_name": "server", "labels": ["k8s:app=server"]},
            "l4": {"TCP": {"source_port": 40000, "destination_port": 81, "flags": {"SYN": true}}},
            "ingress_denied_by": [{"name": "server", "namespace": "app", "kind": "NetworkPolicy"}],
        }))
    }

    fn filters(white: Vec<FlowFilter>, black: Vec<FlowFilter>) -> FlowFilters {
        FlowFilters::new(&white, &black).expect("valid filters")
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fields_of_one_filter_all_match_and_entries_of_a_field_are_alternatives() {
        let flow = denied_tcp();
        let both = FlowFilter {
            verdict: vec![Verdict::Dropped as i32],
            destination_port: strings(&["80", "81"]),
            ..FlowFilter::default()
        };
        assert!(filters(vec![both.clone()], vec![]).admits(&flow));
        let wrong_port = FlowFilter {
            destination_port: strings(&["80"]),
            ..both
        };
        assert!(!filters(vec![wrong_port.clone()], vec![]).admits(&flow));
        // Whitelist filters are alternatives.
        let by_pod = FlowFilter {
            source_pod: strings(&["app/client"]),
            ..FlowFilter::default()
        };
        assert!(filters(vec![wrong_port, by_pod.clone()], vec![]).admits(&flow));
        // The blacklist excludes what the whitelist admits.
        assert!(!filters(vec![], vec![by_pod.clone()]).admits(&flow));
        assert!(!filters(vec![FlowFilter::default()], vec![by_pod]).admits(&flow));
        // No filter: everything.
        assert!(filters(vec![], vec![]).admits(&flow));
    }

    #[test]
    fn addresses_pods_labels_and_directions_match_as_hubble_means_them() {
        let flow = denied_tcp();
        let admits = |filter: FlowFilter| filters(vec![filter], vec![]).admits(&flow);
        assert!(admits(FlowFilter {
            source_ip: strings(&["10.80.0.0/24"]),
            destination_ip: strings(&["10.80.0.2"]),
            ..FlowFilter::default()
        }));
        assert!(!admits(FlowFilter {
            source_ip: strings(&["10.80.0.2"]),
            ..FlowFilter::default()
        }));
        assert!(admits(FlowFilter {
            destination_pod: strings(&["app/"]),
            ..FlowFilter::default()
        }));
        assert!(!admits(FlowFilter {
            destination_pod: strings(&["other/server"]),
            ..FlowFilter::default()
        }));
        assert!(
            !admits(FlowFilter {
                source_pod: strings(&["client"]),
                ..FlowFilter::default()
            }),
            "a pod without namespace is in `default`"
        );
        for selector in [
            "app=client",
            "k8s:app=client",
            "app in (a, client),tier",
            "app!=server",
            "!missing",
        ] {
            assert!(
                admits(FlowFilter {
                    source_label: strings(&[selector]),
                    ..FlowFilter::default()
                }),
                "{selector}"
            );
        }
        for selector in [
            "app=server",
            "reserved:app=client",
            "app notin (client)",
            "!tier",
        ] {
            assert!(
                !admits(FlowFilter {
                    source_label: strings(&[selector]),
                    ..FlowFilter::default()
                }),
                "{selector}"
            );
        }
        assert!(admits(FlowFilter {
            traffic_direction: vec![TrafficDirection::Ingress as i32],
            protocol: strings(&["TCP"]),
            event_type: vec![EventTypeFilter {
                r#type: 5,
                match_sub_type: false,
                sub_type: 0
            }],
            tcp_flags: vec![TcpFlags {
                syn: true,
                ..TcpFlags::default()
            }],
            node_name: strings(&["node-*"]),
            reply: vec![false],
            source_identity: vec![300],
            ..FlowFilter::default()
        }));
        assert!(!admits(FlowFilter {
            protocol: strings(&["icmp"]),
            ..FlowFilter::default()
        }));
        assert!(!admits(FlowFilter {
            node_name: strings(&["prod/node-1"]),
            ..FlowFilter::default()
        }));
    }

    #[test]
    fn filters_microseg_cannot_answer_and_malformed_ones_are_refused() {
        for (filter, says) in [
            (
                FlowFilter {
                    dns_query: strings(&["kube.*"]),
                    ..FlowFilter::default()
                },
                "dns_query",
            ),
            (
                FlowFilter {
                    source_service: strings(&["default/web"]),
                    ..FlowFilter::default()
                },
                "source_service",
            ),
            (
                FlowFilter {
                    destination_port: strings(&["http"]),
                    ..FlowFilter::default()
                },
                "not a port number",
            ),
            (
                FlowFilter {
                    source_ip: strings(&["10.0.0.300"]),
                    ..FlowFilter::default()
                },
                "not an IP address",
            ),
            (
                FlowFilter {
                    protocol: strings(&["gre"]),
                    ..FlowFilter::default()
                },
                "unknown protocol",
            ),
            (
                FlowFilter {
                    source_label: strings(&["app in a"]),
                    ..FlowFilter::default()
                },
                "source_label",
            ),
        ] {
            let error = FlowFilters::new(&[], &[filter]).err().expect("refused");
            assert!(error.contains(says), "{error}");
            assert!(error.starts_with("blacklist[0]"), "{error}");
        }
    }

    #[test]
    fn pods_without_a_namespace_are_in_any_namespace() {
        let flow = denied_tcp();
        let admits = |pods: &[&str]| {
            filters(
                vec![FlowFilter {
                    source_pod: strings(pods),
                    ..FlowFilter::default()
                }],
                vec![],
            )
            .admits(&flow)
        };
        assert!(admits(&["/client"]));
        assert!(admits(&["/cli"]));
        assert!(!admits(&["/server"]));
        assert!(!admits(&["client"]), "`default` namespace");
        assert!(
            FlowFilters::new(
                &[FlowFilter {
                    source_pod: strings(&["/"]),
                    ..FlowFilter::default()
                }],
                &[]
            )
            .is_err()
        );
    }

    /// Hubble v1.19's newer fields microseg answers, each allowed (whitelist) and
    /// negated (`--not`: blacklist).
    #[test]
    fn newer_filters_match_as_allowed_and_as_blacklist() {
        let mut flow = denied_tcp();
        flow.node_labels = strings(&["kubernetes.io/hostname=node-1", "zone=a:b"]);
        let matching = [
            FlowFilter {
                drop_reason_desc: vec![
                    DropReason::PolicyDenied as i32,
                    DropReason::PolicyDeny as i32,
                ],
                ..FlowFilter::default()
            },
            FlowFilter {
                interface: vec![NetworkInterface {
                    index: 0,
                    name: "veth1".into(),
                }],
                ..FlowFilter::default()
            },
            FlowFilter {
                interface: vec![NetworkInterface {
                    index: 7,
                    name: String::new(),
                }],
                ..FlowFilter::default()
            },
            // An interface with neither index nor name: any interface.
            FlowFilter {
                interface: vec![NetworkInterface::default()],
                ..FlowFilter::default()
            },
            FlowFilter {
                node_labels: strings(&["kubernetes.io/hostname=node-1,zone=a:b"]),
                ..FlowFilter::default()
            },
            FlowFilter {
                source_cluster_name: strings(&["default"]),
                destination_cluster_name: strings(&["other", "default"]),
                ..FlowFilter::default()
            },
            FlowFilter {
                encrypted: vec![false],
                ..FlowFilter::default()
            },
        ];
        let not_matching = [
            FlowFilter {
                drop_reason_desc: vec![DropReason::InvalidSourceIp as i32],
                ..FlowFilter::default()
            },
            FlowFilter {
                interface: vec![NetworkInterface {
                    index: 7,
                    name: "eth0".into(),
                }],
                ..FlowFilter::default()
            },
            FlowFilter {
                node_labels: strings(&["zone=b"]),
                ..FlowFilter::default()
            },
            FlowFilter {
                source_cluster_name: strings(&["prod"]),
                ..FlowFilter::default()
            },
            FlowFilter {
                encrypted: vec![true],
                ..FlowFilter::default()
            },
        ];
        for filter in matching {
            assert!(
                filters(vec![filter.clone()], vec![]).admits(&flow),
                "{filter:?}"
            );
            assert!(
                !filters(vec![], vec![filter.clone()]).admits(&flow),
                "--not {filter:?}"
            );
        }
        for filter in not_matching {
            assert!(
                !filters(vec![filter.clone()], vec![]).admits(&flow),
                "{filter:?}"
            );
            assert!(
                filters(vec![], vec![filter.clone()]).admits(&flow),
                "--not {filter:?}"
            );
        }
        // A flow without an interface matches no interface filter.
        flow.interface = None;
        assert!(
            !filters(
                vec![FlowFilter {
                    interface: vec![NetworkInterface::default()],
                    ..FlowFilter::default()
                }],
                vec![]
            )
            .admits(&flow)
        );
    }

    #[test]
    fn newer_filters_microseg_cannot_answer_are_refused_by_name() {
        for (filter, field) in [
            (
                FlowFilter {
                    http_url: strings(&["/api"]),
                    ..FlowFilter::default()
                },
                "http_url",
            ),
            (
                FlowFilter {
                    http_header: vec![HttpHeader {
                        key: "x".into(),
                        value: "y".into(),
                    }],
                    ..FlowFilter::default()
                },
                "http_header",
            ),
            (
                FlowFilter {
                    source_ip_xlated: strings(&["10.0.0.1"]),
                    ..FlowFilter::default()
                },
                "source_ip_xlated",
            ),
            (
                FlowFilter {
                    ip_trace_id: vec![7],
                    ..FlowFilter::default()
                },
                "ip_trace_id",
            ),
            (
                FlowFilter {
                    experimental: Some(Experimental {
                        cel_expression: strings(&["_flow.verdict == 2"]),
                    }),
                    ..FlowFilter::default()
                },
                "experimental.cel_expression",
            ),
            (
                FlowFilter {
                    destination_cluster_name: strings(&[""]),
                    ..FlowFilter::default()
                },
                "destination_cluster_name",
            ),
        ] {
            for (white, black) in [
                (vec![filter.clone()], vec![]),
                (vec![], vec![filter.clone()]),
            ] {
                let error = FlowFilters::new(&white, &black).err().expect("refused");
                assert!(error.contains(field), "{error}");
            }
        }
        // An empty experimental part asks for nothing.
        assert!(
            FlowFilters::new(
                &[FlowFilter {
                    experimental: Some(Experimental::default()),
                    ..FlowFilter::default()
                }],
                &[]
            )
            .is_ok()
        );
    }

    #[test]
    fn globs_match_like_hubbles_node_patterns() {
        assert!(glob_matches("k8s*", "k8s-node-1"));
        assert!(glob_matches("*node*", "k8s-node-1"));
        assert!(glob_matches("*", ""));
        assert!(!glob_matches("k8s*x", "k8s-node-1"));
        assert!(!glob_matches("node", "node-1"));
        assert!(NodePattern::parse("default/").unwrap().matches("any"));
    }
}
