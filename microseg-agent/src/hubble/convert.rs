//! An event's JSON (`event_view::event_json`, named after Hubble's Flow JSON) as
//! Hubble's `flow.Flow` message, with the numbers Hubble's printer and UI expect:
//! policy verdicts (allowed, audited, denied by policy) as policy-verdict events,
//! every other drop as a drop event whose sub-type is the reason, as Cilium sends
//! them; Hubble's verdict, drop reason and policy match numbers.

use serde_json::Value;

use super::icmp_names;

use super::proto::flow::{
    CiliumEventType, DropReason, Endpoint, Flow, FlowType, IcmPv4, IcmPv6, Ip, IpVersion, Layer4,
    NetworkInterface, Policy, Sctp, Tcp, TcpFlags, TrafficDirection, Udp, Verdict,
    layer4::Protocol,
};

/// Cilium's monitor message types (`MessageType*` in pkg/monitor/api): a drop
/// (`hubble observe` prints its reason) and a policy verdict (printed as
/// `policy-verdict:...`).
pub const MESSAGE_TYPE_DROP: i32 = 1;
pub const MESSAGE_TYPE_POLICY_VERDICT: i32 = 5;

/// The cluster microseg's workloads are in, for Hubble's cluster names: Cilium's
/// default cluster name, since microseg knows no other.
pub const CLUSTER_NAME: &str = "default";

/// The Flow of one event line; `None` for a line that is not an event object.
pub fn flow_of_line(line: &str) -> Option<Flow> {
    let value: Value = serde_json::from_str(line).ok()?;
    value.is_object().then(|| flow_of_json(&value))
}

/// The Flow of one event (see the module comment).
#[expect(
    deprecated,
    reason = "Hubble's printer still reads the deprecated drop_reason and Summary fields"
)]
pub fn flow_of_json(event: &Value) -> Flow {
    let verdict = verdict_of(event["verdict"].as_str().unwrap_or(""));
    let drop_reason = event["drop_reason_desc"]
        .as_str()
        .map_or(DropReason::Unknown, drop_reason_of);
    let direction = event["traffic_direction"]
        .as_str()
        .and_then(TrafficDirection::from_str_name)
        .unwrap_or(TrafficDirection::Unknown);
    let l4 = layer4_of(&event["l4"]);
    // Denied by policy, or not denied at all: a policy verdict. Anything else the
    // program dropped before policy could judge it.
    let policy_verdict = verdict != Verdict::Dropped
        || matches!(
            drop_reason,
            DropReason::PolicyDenied | DropReason::PolicyDeny
        );
    let mut flow = Flow {
        time: event["time"].as_str().and_then(timestamp_of),
        verdict: verdict as i32,
        drop_reason: drop_reason as u32,
        drop_reason_desc: drop_reason as i32,
        ip: ip_of(&event["IP"]),
        summary: summary_of(l4.as_ref()),
        l4,
        source: Some(endpoint_of(&event["source"])),
        destination: Some(endpoint_of(&event["destination"])),
        r#type: FlowType::L3L4 as i32,
        node_name: event["node_name"].as_str().unwrap_or("").to_owned(),
        node_labels: strings(&event["node_labels"]),
        event_type: Some(if policy_verdict {
            CiliumEventType {
                r#type: MESSAGE_TYPE_POLICY_VERDICT,
                sub_type: 0,
            }
        } else {
            CiliumEventType {
                r#type: MESSAGE_TYPE_DROP,
                sub_type: drop_reason as i32,
            }
        }),
        traffic_direction: direction as i32,
        policy_match_type: if policy_verdict {
            event["policy_match_type"]
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(0)
        } else {
            0
        },
        // A policy verdict is taken on a connection's first packet, never on a reply
        // (replies pass by connection tracking); a packet dropped before that may
        // be either.
        is_reply: policy_verdict.then_some(false),
        interface: event["interface"]
            .as_object()
            .map(|interface| NetworkInterface {
                index: interface
                    .get("index")
                    .and_then(Value::as_u64)
                    .and_then(|i| u32::try_from(i).ok())
                    .unwrap_or(0),
                name: interface
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            }),
        ..Flow::default()
    };
    flow.ingress_denied_by = policies_of(&event["ingress_denied_by"]);
    flow.egress_denied_by = policies_of(&event["egress_denied_by"]);
    flow.ingress_allowed_by = policies_of(&event["ingress_allowed_by"]);
    flow.egress_allowed_by = policies_of(&event["egress_allowed_by"]);
    flow
}

fn verdict_of(name: &str) -> Verdict {
    match name {
        "DROPPED" => Verdict::Dropped,
        "AUDIT" => Verdict::Audit,
        "FORWARDED" => Verdict::Forwarded,
        _ => Verdict::Unknown,
    }
}

/// Hubble's drop reason for microseg's (`microseg_common::drop_reason`): the same
/// name where Hubble has it, else the closest of Hubble's.
pub fn drop_reason_of(name: &str) -> DropReason {
    match name {
        // A truncated transport header.
        "INVALID_L4_HEADER" => DropReason::CtTruncatedOrInvalidHeader,
        "FRAGMENT_WITHOUT_HEAD" => DropReason::FirstLogicalDatagramFragmentNotFound,
        "IPV6_EXTENSION_HEADERS_TOO_LONG" => DropReason::InvalidIpv6ExtensionHeader,
        "FORBIDDEN_ICMPV6" => DropReason::ForbiddenIcmpv6Message,
        // The program could not judge the packet at all (its working memory could
        // not be had): as a packet no policy decision could be made for.
        "SCRATCH_UNAVAILABLE" => DropReason::NoConfigurationAvailableToPerformPolicyDecision,
        // POLICY_DENIED, POLICY_DENY, INVALID_PACKET_DROPPED, INVALID_SOURCE_IP and
        // UNSUPPORTED_L3_PROTOCOL are Hubble's own names.
        other => DropReason::from_str_name(other).unwrap_or(DropReason::Unknown),
    }
}

fn timestamp_of(text: &str) -> Option<prost_types::Timestamp> {
    let time = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    Some(prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).ok()?,
    })
}

fn ip_of(ip: &Value) -> Option<Ip> {
    let source = ip["source"].as_str()?;
    let destination = ip["destination"].as_str()?;
    let version = match ip["ipVersion"].as_str() {
        Some("IPv6") => IpVersion::IPv6,
        Some("IPv4") => IpVersion::IPv4,
        _ if source.contains(':') => IpVersion::IPv6,
        _ => IpVersion::IPv4,
    };
    Some(Ip {
        source: source.to_owned(),
        destination: destination.to_owned(),
        ip_version: version as i32,
        encrypted: false,
    })
}

fn port(value: &Value, field: &str) -> u32 {
    value[field]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0)
}

fn layer4_of(l4: &Value) -> Option<Layer4> {
    let protocol = if let Some(tcp) = l4.get("TCP") {
        let flag = |name: &str| tcp["flags"][name].as_bool().unwrap_or(false);
        Protocol::Tcp(Tcp {
            source_port: port(tcp, "source_port"),
            destination_port: port(tcp, "destination_port"),
            flags: Some(TcpFlags {
                fin: flag("FIN"),
                syn: flag("SYN"),
                rst: flag("RST"),
                psh: flag("PSH"),
                ack: flag("ACK"),
                urg: flag("URG"),
                ece: flag("ECE"),
                cwr: flag("CWR"),
                ns: flag("NS"),
            }),
        })
    } else if let Some(udp) = l4.get("UDP") {
        Protocol::Udp(Udp {
            source_port: port(udp, "source_port"),
            destination_port: port(udp, "destination_port"),
        })
    } else if let Some(sctp) = l4.get("SCTP") {
        Protocol::Sctp(Sctp {
            source_port: port(sctp, "source_port"),
            destination_port: port(sctp, "destination_port"),
        })
    } else if let Some(icmp) = l4.get("ICMPv4") {
        Protocol::IcmPv4(IcmPv4 {
            r#type: port(icmp, "type"),
            code: port(icmp, "code"),
        })
    } else if let Some(icmp) = l4.get("ICMPv6") {
        Protocol::IcmPv6(IcmPv6 {
            r#type: port(icmp, "type"),
            code: port(icmp, "code"),
        })
    } else {
        return None;
    };
    Some(Layer4 {
        protocol: Some(protocol),
    })
}

/// The summary Cilium's parser gives an L3/L4 flow (`TCP Flags: SYN`, `UDP`, ...).
fn summary_of(l4: Option<&Layer4>) -> String {
    match l4.and_then(|l4| l4.protocol.as_ref()) {
        Some(Protocol::Tcp(tcp)) => {
            let flags = tcp.flags.unwrap_or_default();
            let names: Vec<&str> = [
                (flags.syn, "SYN"),
                (flags.fin, "FIN"),
                (flags.rst, "RST"),
                (flags.psh, "PSH"),
                (flags.ack, "ACK"),
                (flags.urg, "URG"),
                (flags.ece, "ECE"),
                (flags.cwr, "CWR"),
                (flags.ns, "NS"),
            ]
            .into_iter()
            .filter_map(|(set, name)| set.then_some(name))
            .collect();
            format!("TCP Flags: {}", names.join(", "))
        }
        Some(Protocol::Udp(_)) => "UDP".to_owned(),
        Some(Protocol::Sctp(_)) => "SCTP".to_owned(),
        Some(Protocol::IcmPv4(icmp)) => {
            format!("ICMPv4 {}", icmp_names::v4(icmp.r#type, icmp.code))
        }
        Some(Protocol::IcmPv6(icmp)) => {
            format!("ICMPv6 {}", icmp_names::v6(icmp.r#type, icmp.code))
        }
        None => String::new(),
    }
}

fn strings(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn endpoint_of(endpoint: &Value) -> Endpoint {
    let text = |field: &str| endpoint[field].as_str().unwrap_or("").to_owned();
    let namespace = text("namespace");
    Endpoint {
        // A workload is in the cluster; an address outside it is in none.
        cluster_name: if namespace.is_empty() {
            String::new()
        } else {
            CLUSTER_NAME.to_owned()
        },
        identity: endpoint["identity"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(0),
        namespace,
        pod_name: text("pod_name"),
        labels: strings(&endpoint["labels"]),
        ..Endpoint::default()
    }
}

/// Hubble's Policy for each `{name, namespace, kind, ...}`; what a
/// ClusterNetworkPolicy rule adds (tier, priority, rule, action) goes in labels.
fn policies_of(list: &Value) -> Vec<Policy> {
    let Some(list) = list.as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|policy| {
            let labels = ["tier", "priority", "rule", "rule_name", "action"]
                .into_iter()
                .filter_map(|key| {
                    let value = &policy[key];
                    let text = match value {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => return None,
                    };
                    Some(format!("microseg:{key}={text}"))
                })
                .collect();
            Policy {
                name: policy["name"].as_str().unwrap_or("").to_owned(),
                namespace: policy["namespace"].as_str().unwrap_or("").to_owned(),
                kind: policy["kind"].as_str().unwrap_or("").to_owned(),
                labels,
                revision: 0,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    #[expect(deprecated, reason = "the deprecated fields are checked too")]
    fn a_denied_event_becomes_a_policy_verdict_flow_with_hubbles_numbers() {
        let flow = flow_of_line(
            &json!({
                "time": "2026-11-25T10:00:00.123456789Z", "verdict": "DROPPED",
                "node_name": "node-1", "interface": {"index": 7, "name": "veth1"},
                "hook": "tc-ingress", "drop_reason_desc": "POLICY_DENIED",
                "traffic_direction": "INGRESS",
                "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
                "source": {"identity": 1234, "namespace": "default", "pod_name": "a",
                           "labels": ["k8s:app=a"]},
                "destination": {"namespace": "default", "pod_name": "b", "labels": ["k8s:app=b"]},
                "l4": {"TCP": {"source_port": 43210, "destination_port": 80,
                               "flags": {"SYN": true}}},
                "ingress_denied_by": [{"name": "b", "namespace": "default", "kind": "NetworkPolicy"}],
            })
            .to_string(),
        )
        .expect("a flow");
        assert_eq!(
            flow.time,
            Some(prost_types::Timestamp {
                seconds: 1_795_600_800,
                nanos: 123_456_789
            })
        );
        assert_eq!(flow.verdict, Verdict::Dropped as i32);
        assert_eq!(flow.drop_reason_desc, 133);
        assert_eq!(flow.drop_reason, 133);
        assert_eq!(flow.r#type, FlowType::L3L4 as i32);
        assert_eq!(
            flow.event_type,
            Some(CiliumEventType {
                r#type: 5,
                sub_type: 0
            })
        );
        assert_eq!(flow.policy_match_type, 0, "none: a default deny");
        assert_eq!(flow.traffic_direction, TrafficDirection::Ingress as i32);
        assert_eq!(flow.is_reply, Some(false));
        assert_eq!(flow.node_name, "node-1");
        assert_eq!(flow.summary, "TCP Flags: SYN");
        let ip = flow.ip.expect("IP");
        assert_eq!(
            (ip.source.as_str(), ip.destination.as_str()),
            ("10.0.0.1", "10.0.0.2")
        );
        assert_eq!(ip.ip_version, IpVersion::IPv4 as i32);
        let source = flow.source.expect("source");
        assert_eq!(
            (
                source.identity,
                source.namespace.as_str(),
                source.pod_name.as_str()
            ),
            (1234, "default", "a")
        );
        assert_eq!(source.labels, ["k8s:app=a"]);
        let Some(Protocol::Tcp(tcp)) = flow.l4.and_then(|l4| l4.protocol) else {
            panic!("TCP");
        };
        assert_eq!((tcp.source_port, tcp.destination_port), (43210, 80));
        assert!(tcp.flags.is_some_and(|f| f.syn && !f.ack));
        assert_eq!(flow.ingress_denied_by.len(), 1);
        assert_eq!(flow.ingress_denied_by[0].name, "b");
        assert_eq!(flow.ingress_denied_by[0].kind, "NetworkPolicy");
        assert_eq!(
            flow.interface,
            Some(NetworkInterface {
                index: 7,
                name: "veth1".into()
            })
        );
    }

    #[test]
    #[expect(
        deprecated,
        reason = "Summary is deprecated and still what the printer reads"
    )]
    fn a_cluster_policy_rule_keeps_its_tier_and_action_as_labels() {
        let flow = flow_of_json(&json!({
            "time": "2026-11-25T10:00:00Z", "verdict": "DROPPED",
            "drop_reason_desc": "POLICY_DENY", "traffic_direction": "EGRESS", "rule_id": 9,
            "policy_match_type": 2,
            "IP": {"source": "fd80::1", "destination": "fd80::2"},
            "l4": {"UDP": {"source_port": 5353, "destination_port": 53}},
            "egress_denied_by": [{"name": "pci", "namespace": "", "kind": "ClusterNetworkPolicy",
                                  "tier": "Admin", "priority": 10, "rule": 1, "action": "Deny"}],
        }));
        assert_eq!(flow.drop_reason_desc, DropReason::PolicyDeny as i32);
        assert_eq!(flow.drop_reason_desc, 181);
        assert_eq!(flow.policy_match_type, 2, "L3-L4");
        assert_eq!(flow.ip.expect("IP").ip_version, IpVersion::IPv6 as i32);
        assert_eq!(flow.summary, "UDP");
        let policy = &flow.egress_denied_by[0];
        assert_eq!(policy.kind, "ClusterNetworkPolicy");
        assert_eq!(
            policy.labels,
            [
                "microseg:tier=Admin",
                "microseg:priority=10",
                "microseg:rule=1",
                "microseg:action=Deny"
            ]
        );
    }

    /// What Cilium sends for a packet dropped before policy: a drop event (type 1)
    /// whose sub-type is the reason, not a policy verdict.
    #[test]
    fn a_drop_that_is_not_a_policy_denial_becomes_a_drop_event() {
        for (reason, number) in [
            ("INVALID_SOURCE_IP", 132),
            ("INVALID_PACKET_DROPPED", 134),
            ("FRAGMENT_WITHOUT_HEAD", 175),
            ("UNSUPPORTED_L3_PROTOCOL", 139),
            ("FORBIDDEN_ICMPV6", 176),
        ] {
            let flow = flow_of_json(&json!({
                "time": "2026-11-25T10:00:00Z", "verdict": "DROPPED",
                "drop_reason_desc": reason,
                "IP": {"source": "10.0.0.9", "destination": "10.0.0.2"},
                "source": {"namespace": "app", "pod_name": "client"},
            }));
            assert_eq!(
                flow.event_type,
                Some(CiliumEventType {
                    r#type: MESSAGE_TYPE_DROP,
                    sub_type: number
                }),
                "{reason}"
            );
            assert_eq!(flow.drop_reason_desc, number);
            assert_eq!(flow.verdict, Verdict::Dropped as i32);
            assert_eq!(flow.is_reply, None, "unknown for a packet policy never saw");
            assert_eq!(flow.policy_match_type, 0);
        }
        // Policy denials and audits stay policy verdicts.
        for (verdict, reason) in [
            ("DROPPED", "POLICY_DENIED"),
            ("DROPPED", "POLICY_DENY"),
            ("AUDIT", "POLICY_DENIED"),
        ] {
            let flow = flow_of_json(&json!({"verdict": verdict, "drop_reason_desc": reason}));
            assert_eq!(
                flow.event_type.expect("event type").r#type,
                MESSAGE_TYPE_POLICY_VERDICT
            );
        }
    }

    #[test]
    #[expect(
        deprecated,
        reason = "Summary is deprecated and still what the printer reads"
    )]
    fn icmp_summaries_name_type_and_code_as_cilium_does() {
        let summary = |l4: Value| flow_of_json(&json!({"l4": l4})).summary;
        assert_eq!(
            summary(json!({"ICMPv4": {"type": 8, "code": 0}})),
            "ICMPv4 EchoRequest"
        );
        assert_eq!(
            summary(json!({"ICMPv6": {"type": 1, "code": 4}})),
            "ICMPv6 DestinationUnreachable(PortUnreachable)"
        );
    }

    #[test]
    fn workloads_are_in_the_default_cluster_and_node_labels_carry_over() {
        let flow = flow_of_json(&json!({
            "node_labels": ["kubernetes.io/hostname=n1"],
            "source": {"namespace": "app", "pod_name": "a"},
            "destination": {"labels": ["reserved:world"]},
        }));
        assert_eq!(flow.node_labels, ["kubernetes.io/hostname=n1"]);
        assert_eq!(flow.source.expect("source").cluster_name, CLUSTER_NAME);
        assert_eq!(flow.destination.expect("destination").cluster_name, "");
    }

    #[test]
    fn verdicts_and_drop_reasons_map_to_hubbles_numbers() {
        assert_eq!(verdict_of("FORWARDED") as i32, 1);
        assert_eq!(verdict_of("DROPPED") as i32, 2);
        assert_eq!(verdict_of("AUDIT") as i32, 4);
        // Every microseg drop reason has a Hubble number.
        for reason in microseg_common::drop_reason::DropReason::ALL {
            assert_ne!(
                drop_reason_of(reason.name()),
                DropReason::Unknown,
                "{}",
                reason.name()
            );
        }
        assert_eq!(drop_reason_of("INVALID_SOURCE_IP") as i32, 132);
        assert_eq!(drop_reason_of("INVALID_L4_HEADER") as i32, 135);
        assert_eq!(drop_reason_of("FORBIDDEN_ICMPV6") as i32, 176);
        assert_eq!(
            drop_reason_of("NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION") as i32,
            165
        );
        assert!(flow_of_line("not json").is_none());
    }
}
