//! Unit tests of `suggest`: events in, policies (and the report) out.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{
    Collector, Inventory, InventoryPod, Observation,
    generate::{PeerRef, PortKey, suggest_policies},
    render, suggest, verify,
    workload::{SelectorChoice, dns_name, workload_selector},
};
use crate::policy::Protocol;

/// A pod end of an event: (namespace, name, labels, address).
type Pod<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

fn side(pod: Pod<'_>) -> Value {
    let (namespace, name, labels, _) = pod;
    if name.is_empty() {
        return json!({"labels": ["reserved:world"]});
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("k8s:{k}={v}")).collect();
    json!({"namespace": namespace, "pod_name": name, "labels": labels})
}

fn external(address: &str) -> Pod<'_> {
    ("", "", &[], address)
}

/// A flow event as `microseg events -o json` prints it.
fn event(verdict: &str, from: Pod<'_>, to: Pod<'_>, l4: Value, second: u32) -> Value {
    json!({
        "time": format!("2026-11-30T06:00:{second:02}.000000000Z"),
        "verdict": verdict,
        "traffic_direction": "INGRESS",
        "IP": {"source": from.3, "destination": to.3},
        "source": side(from),
        "destination": side(to),
        "l4": l4,
    })
}

fn tcp(source_port: u16, port: u16, flags: &[&str]) -> Value {
    let flags: serde_json::Map<String, Value> = flags
        .iter()
        .map(|f| ((*f).to_owned(), json!(true)))
        .collect();
    json!({"TCP": {"source_port": source_port, "destination_port": port, "flags": flags}})
}

fn udp(source_port: u16, port: u16) -> Value {
    json!({"UDP": {"source_port": source_port, "destination_port": port}})
}

/// An audited TCP connection opener.
fn syn(from: Pod<'_>, to: Pod<'_>, source_port: u16, port: u16) -> Value {
    event("AUDIT", from, to, tcp(source_port, port, &["SYN"]), 1)
}

fn observe(events: &[Value], include_denied: bool) -> Observation {
    let mut collector = Collector::new(include_denied);
    for event in events {
        collector.add(event).expect("a flow event");
    }
    collector.finish()
}

const FE: &[(&str, &str)] = &[("app", "frontend"), ("pod-template-hash", "5d4f8")];
const API: &[(&str, &str)] = &[("app.kubernetes.io/name", "api"), ("app", "backend")];
const DB: &[(&str, &str)] = &[("tier", "db"), ("controller-revision-hash", "db-7c9")];
const DNS: &[(&str, &str)] = &[("k8s-app", "kube-dns")];

fn frontend(n: u8) -> Pod<'static> {
    let (name, address) = match n {
        1 => ("frontend-1", "10.0.1.1"),
        _ => ("frontend-2", "10.0.1.2"),
    };
    ("prod", name, FE, address)
}
fn api(n: u8) -> Pod<'static> {
    let (name, address) = match n {
        1 => ("api-1", "10.0.2.1"),
        _ => ("api-2", "10.0.2.2"),
    };
    ("prod", name, API, address)
}
const DATABASE: Pod<'static> = ("prod", "db-0", DB, "10.0.3.1");
const KUBE_DNS: Pod<'static> = ("kube-system", "coredns-1", DNS, "10.96.0.10");
const INGRESS: Pod<'static> = (
    "ingress",
    "controller",
    &[("app.kubernetes.io/name", "ingress-nginx")],
    "10.0.9.9",
);

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn the_workload_label_is_the_most_stable_one() {
    let choose = |pairs: &[(&str, &str)]| workload_selector(&labels(pairs));
    assert_eq!(
        choose(&[
            ("app", "a"),
            ("app.kubernetes.io/name", "n"),
            ("k8s-app", "k")
        ]),
        (
            labels(&[("app.kubernetes.io/name", "n")]),
            SelectorChoice::Preferred
        )
    );
    assert_eq!(
        choose(&[("k8s-app", "k"), ("app", "a"), ("tier", "t")]),
        (labels(&[("app", "a")]), SelectorChoice::Preferred)
    );
    assert_eq!(
        choose(&[("k8s-app", "k"), ("pod-template-hash", "h")]),
        (labels(&[("k8s-app", "k")]), SelectorChoice::Preferred)
    );
    // No preferred label: every stable one, never the per-pod or per-revision ones.
    assert_eq!(
        choose(&[
            ("tier", "api"),
            ("env", "prod"),
            ("pod-template-hash", "h"),
            ("controller-revision-hash", "r"),
            ("statefulset.kubernetes.io/pod-name", "db-0"),
            ("pod-template-generation", "3"),
            ("job-name", "j"),
            ("controller-uid", "u"),
            ("batch.kubernetes.io/job-name", "j"),
            ("apps.kubernetes.io/pod-index", "0"),
        ]),
        (
            labels(&[("env", "prod"), ("tier", "api")]),
            SelectorChoice::Stable
        )
    );
    // Only per-pod labels: those, and the caller warns.
    assert_eq!(
        choose(&[("pod-template-hash", "h")]),
        (
            labels(&[("pod-template-hash", "h")]),
            SelectorChoice::PerPodFallback
        )
    );
    assert_eq!(choose(&[]).1, SelectorChoice::Unlabelled);
    assert_eq!(dns_name("My_App.v2", 63), "my-app-v2");
    assert_eq!(dns_name("--", 63), "workload");
}

#[test]
fn one_policy_per_workload_both_directions_with_merged_ports_and_peers() {
    let observation = observe(
        &[
            syn(frontend(1), api(1), 40001, 8080),
            syn(frontend(2), api(2), 40002, 8080),
            syn(frontend(1), api(1), 40003, 8443),
            syn(frontend(2), api(1), 40004, 8443),
            syn(api(1), DATABASE, 40005, 5432),
            syn(INGRESS, frontend(1), 40006, 443),
            syn(
                ("prod", "batch-1", &[("app", "batch")], "10.0.4.1"),
                api(2),
                40007,
                8080,
            ),
            syn(
                ("prod", "batch-1", &[("app", "batch")], "10.0.4.1"),
                api(2),
                40008,
                8443,
            ),
        ],
        false,
    );
    assert_eq!(observation.connections.len(), 8);
    let suggestion = suggest_policies(&observation.connections, Some("prod"));
    let names: Vec<&str> = suggestion
        .policies
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    // The ingress controller is in another namespace: no policy for it.
    assert_eq!(
        names,
        [
            "api-suggested",
            "batch-suggested",
            "db-suggested",
            "frontend-suggested"
        ]
    );
    let api_policy = &suggestion.policies[0];
    assert_eq!(
        api_policy.workload.selector,
        labels(&[("app.kubernetes.io/name", "api")])
    );
    assert_eq!(
        api_policy.pods.iter().collect::<Vec<_>>(),
        ["api-1", "api-2"]
    );
    // frontend and batch both used 8080 and 8443: one rule, two peers, two ports.
    assert_eq!(api_policy.ingress.len(), 1, "{:#?}", api_policy.ingress);
    let rule = &api_policy.ingress[0];
    let tcp = |port| PortKey {
        protocol: Protocol::Tcp,
        port,
    };
    assert_eq!(rule.ports, [tcp(8080), tcp(8443)]);
    let peers: Vec<String> = rule.peers.iter().map(ToString::to_string).collect();
    assert_eq!(
        peers,
        ["prod/batch (app=batch)", "prod/frontend (app=frontend)"]
    );
    assert_eq!(rule.evidence[1].tally.connections, 4);
    // The API's egress to the database (stable labels, not the revision hash).
    assert_eq!(api_policy.egress.len(), 1);
    assert_eq!(
        api_policy.egress[0].peers[0].to_string(),
        "prod/db (tier=db)"
    );
    // Peers on different ports get different rules; a workload with no egress seen
    // gets `egress: []`.
    let frontend_policy = &suggestion.policies[3];
    assert_eq!(frontend_policy.ingress.len(), 1);
    assert_eq!(frontend_policy.egress.len(), 1);
    let db_policy = &suggestion.policies[2];
    assert!(db_policy.egress.is_empty());
    let object = serde_json::to_value(render::network_policy(db_policy)).unwrap();
    assert_eq!(object["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(object["spec"]["egress"], json!([]));
    assert_eq!(
        object["spec"]["podSelector"],
        json!({"matchLabels": {"tier": "db"}})
    );

    // Without --namespace the ingress controller gets a policy too.
    let all = suggest_policies(&observation.connections, None);
    assert_eq!(all.policies.len(), 5);
}

#[test]
fn peers_in_other_namespaces_get_a_namespace_selector_and_external_ones_an_ip_block() {
    let observation = observe(
        &[
            syn(INGRESS, frontend(1), 40001, 443),
            syn(frontend(1), api(1), 40002, 8080),
            syn(api(1), external("192.0.2.7"), 40003, 443),
            syn(api(1), external("2001:db8::7"), 40004, 443),
            syn(external("198.51.100.1"), INGRESS, 40005, 443),
        ],
        false,
    );
    let suggestion = suggest_policies(&observation.connections, None);
    let policy = |name: &str| {
        let found = suggestion
            .policies
            .iter()
            .find(|p| p.name == name)
            .expect(name);
        serde_json::to_value(render::network_policy(found)).unwrap()
    };
    let frontend = policy("frontend-suggested");
    assert_eq!(
        frontend["spec"]["ingress"][0]["from"],
        json!([{
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}},
        }])
    );
    // A peer in the policy's own namespace: a podSelector alone.
    assert_eq!(
        frontend["spec"]["egress"][0]["to"],
        json!([{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "api"}}}])
    );
    assert_eq!(
        frontend["spec"]["egress"][0]["ports"],
        json!([{"protocol": "TCP", "port": 8080}])
    );
    let api = policy("api-suggested");
    assert_eq!(
        api["spec"]["egress"][0]["to"],
        json!([{"ipBlock": {"cidr": "192.0.2.7/32"}}, {"ipBlock": {"cidr": "2001:db8::7/128"}}])
    );
    let ingress = policy("ingress-nginx-suggested");
    assert_eq!(
        ingress["spec"]["ingress"][0]["from"],
        json!([{"ipBlock": {"cidr": "198.51.100.1/32"}}])
    );
    // The evidence, rule by rule.
    let evidence = ingress["metadata"]["annotations"][render::SUGGESTED_FROM_ANNOTATION]
        .as_str()
        .unwrap();
    assert_eq!(
        evidence,
        "ingress[0]: 1 flow from 198.51.100.1 (no workload) to TCP/443, 2026-11-30T06:00:01Z..2026-11-30T06:00:01Z\n\
         egress[0]: 1 flow to prod/frontend (app=frontend) [frontend-1] on TCP/443, 2026-11-30T06:00:01Z..2026-11-30T06:00:01Z"
    );
}

#[test]
fn dns_seen_gives_an_egress_rule_on_udp_and_tcp_53_to_the_cluster_dns() {
    let observation = observe(
        &[
            event("AUDIT", api(1), KUBE_DNS, udp(50001, 53), 1),
            // The answer, judged too (no connection tracked yet): a reply.
            event("AUDIT", KUBE_DNS, api(1), udp(53, 50001), 1),
            event("AUDIT", api(2), KUBE_DNS, udp(50002, 53), 2),
            syn(api(1), DATABASE, 40001, 5432),
        ],
        false,
    );
    assert_eq!(observation.connections.len(), 3);
    assert_eq!(observation.ignored.replies, 1);
    let suggestion = suggest_policies(&observation.connections, Some("prod"));
    let api_policy = suggestion
        .policies
        .iter()
        .find(|p| p.name == "api-suggested")
        .unwrap();
    assert_eq!(api_policy.egress.len(), 2);
    let dns = &api_policy.egress[0];
    assert!(dns.dns);
    assert_eq!(
        dns.peers,
        [PeerRef::Workload(super::workload::WorkloadId {
            namespace: "kube-system".into(),
            selector: labels(&[("k8s-app", "kube-dns")]),
        })]
    );
    let object = serde_json::to_value(render::network_policy(api_policy)).unwrap();
    assert_eq!(
        object["spec"]["egress"][0],
        json!({
            "to": [{
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        })
    );
    let evidence = object["metadata"]["annotations"][render::SUGGESTED_FROM_ANNOTATION]
        .as_str()
        .unwrap();
    assert!(
        evidence.starts_with(
            "egress[0] (DNS: UDP and TCP 53): 2 flows to kube-system/kube-dns (k8s-app=kube-dns) [coredns-1] on UDP/53"
        ),
        "{evidence}"
    );
    // kube-system was not asked for.
    assert!(
        suggestion
            .policies
            .iter()
            .all(|p| p.workload.namespace == "prod")
    );
}

#[test]
fn replies_and_repeated_events_are_not_connections_of_their_own() {
    let observation = observe(
        &[
            // Both sides of one connection report its SYN, and it is retransmitted.
            syn(frontend(1), api(1), 40001, 8080),
            event("AUDIT", frontend(1), api(1), tcp(40001, 8080, &["SYN"]), 5),
            // The SYN-ACK and later packets, as if judged with no tracked connection.
            event(
                "AUDIT",
                api(1),
                frontend(1),
                tcp(8080, 40001, &["SYN", "ACK"]),
                1,
            ),
            event(
                "AUDIT",
                api(1),
                frontend(1),
                tcp(8080, 40001, &["ACK", "PSH"]),
                1,
            ),
            // A later packet of the connection: the same connection.
            event("AUDIT", frontend(1), api(1), tcp(40001, 8080, &["ACK"]), 1),
            // UDP: the request, then its answer.
            event("AUDIT", frontend(1), api(1), udp(50000, 9000), 1),
            event("AUDIT", api(1), frontend(1), udp(9000, 50000), 2),
            // ICMP: no NetworkPolicy port.
            event(
                "AUDIT",
                frontend(1),
                api(1),
                json!({"ICMPv4": {"type": 8, "code": 0}}),
                1,
            ),
            // Denied: left out by default.
            event(
                "DROPPED",
                frontend(1),
                DATABASE,
                tcp(40002, 5432, &["SYN"]),
                1,
            ),
        ],
        false,
    );
    assert_eq!(observation.events, 9);
    assert_eq!(
        observation.connections.len(),
        2,
        "{:#?}",
        observation.connections
    );
    let opened = &observation.connections[0];
    assert_eq!(
        (opened.source.display().as_str(), opened.port),
        ("prod/frontend-1", 8080)
    );
    assert_eq!(
        opened.last_seen.unwrap().to_rfc3339(),
        "2026-11-30T06:00:05+00:00",
        "the retransmission is the same connection"
    );
    let ignored = &observation.ignored;
    assert_eq!(
        (
            ignored.tcp_not_opener,
            ignored.replies,
            ignored.not_tcp_udp_sctp,
            ignored.denied
        ),
        (2, 1, 1, 1)
    );
    // The API's policy allows nothing towards the frontend: no reply became a rule.
    let suggestion = suggest_policies(&observation.connections, None);
    let api_policy = suggestion
        .policies
        .iter()
        .find(|p| p.name == "api-suggested")
        .unwrap();
    assert!(api_policy.egress.is_empty(), "{:#?}", api_policy.egress);
    assert!(!suggestion.policies.iter().any(|p| p.name == "db-suggested"));

    // With --include-denied the refused attempt is a connection too.
    let denied = observe(
        &[event(
            "DROPPED",
            frontend(1),
            DATABASE,
            tcp(40002, 5432, &["SYN"]),
            1,
        )],
        true,
    );
    assert_eq!(denied.connections.len(), 1);
    // Hubble's JSON wraps the flow.
    let hubble = observe(&[json!({"flow": syn(frontend(1), api(1), 1, 80)})], false);
    assert_eq!(hubble.connections.len(), 1);
    // Not an event at all: an error for the caller to name the line.
    assert!(Collector::new(false).add(&json!({"kind": "Pod"})).is_err());
}

#[test]
fn pods_without_stable_labels_are_warned_about() {
    let observation = observe(
        &[
            syn(
                (
                    "prod",
                    "web-5d4f8-x",
                    &[("pod-template-hash", "5d4f8")],
                    "10.0.5.1",
                ),
                api(1),
                1,
                80,
            ),
            syn(("prod", "bare", &[], "10.0.5.2"), api(1), 2, 80),
        ],
        false,
    );
    let suggestion = suggest_policies(&observation.connections, None);
    assert_eq!(suggestion.warnings.len(), 2, "{:#?}", suggestion.warnings);
    assert!(suggestion.warnings[0].contains("prod/bare has no labels"));
    assert!(suggestion.warnings[1].contains("only per-pod or per-revision labels"));
    let names: Vec<&str> = suggestion
        .policies
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["api-suggested", "web-5d4f8-x-suggested"]);
    // The unlabelled pod is named by address.
    assert!(
        suggestion.policies[0].ingress[0]
            .peers
            .contains(&PeerRef::Address("10.0.5.2".parse().unwrap()))
    );
}

#[test]
fn the_suggestion_allows_every_observed_connection_and_reports_what_else() {
    let observation = observe(
        &[
            syn(INGRESS, frontend(1), 40001, 443),
            syn(frontend(1), api(1), 40002, 8080),
            syn(frontend(2), api(2), 40003, 8080),
            syn(api(1), DATABASE, 40004, 5432),
            event("AUDIT", api(1), KUBE_DNS, udp(50001, 53), 1),
        ],
        false,
    );
    // The agent's inventory knows a pod nothing was seen from.
    let inventory = Inventory {
        namespaces: BTreeMap::new(),
        pods: vec![InventoryPod {
            namespace: "prod".into(),
            name: "frontend-3".into(),
            labels: labels(FE),
            addresses: vec!["10.0.1.3".parse().unwrap()],
        }],
    };
    let output = suggest(&observation, Some("prod"), Some(&inventory)).expect("suggest");
    let report = &output.report;
    assert_eq!(report.self_check.allowed, 5);
    assert!(report.self_check.denied.is_empty());
    assert_eq!(report.inventory_workloads, 8);
    let also: Vec<String> = report
        .also_allowed
        .iter()
        .map(|a| {
            format!(
                "{} -> {} {}/{}",
                a.source, a.destination, a.protocol, a.port
            )
        })
        .collect();
    // The frontends share a label, so do the APIs: every frontend reaches every API.
    for pair in [
        "prod/frontend-1 -> prod/api-2 TCP/8080",
        "prod/frontend-2 -> prod/api-1 TCP/8080",
        "prod/frontend-3 -> prod/api-1 TCP/8080",
        "ingress/controller -> prod/frontend-2 TCP/443",
        "prod/api-2 -> prod/db-0 TCP/5432",
        "prod/api-1 -> kube-system/coredns-1 TCP/53",
    ] {
        assert!(
            also.contains(&pair.to_owned()),
            "{pair} missing from {also:#?}"
        );
    }
    assert!(
        !also.iter().any(|p| p.contains("-> prod/db-0 TCP/8080")),
        "{also:#?}"
    );
    assert!(
        !also
            .iter()
            .any(|p| p.starts_with("prod/frontend-1 -> prod/db-0")),
        "{also:#?}"
    );
    let text = report.text(output.policies.len());
    assert!(
        text.contains("self-check: the reference evaluator allows all 5"),
        "{text}"
    );
    // The YAML loads as it is printed.
    assert!(
        output
            .yaml
            .starts_with("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"),
        "{}",
        output.yaml
    );
}

#[test]
fn the_self_check_finds_an_observed_connection_a_policy_set_denies() {
    let observation = observe(&[syn(frontend(1), api(1), 40001, 8080)], false);
    let inventory = Inventory::from_connections(&observation.connections);
    let narrow = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-suggested, namespace: prod}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: api}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: frontend}}}]
      ports: [{protocol: TCP, port: 8443}]
"#;
    let set = verify::policy_set(&inventory, narrow).expect("loads");
    let check = verify::self_check(&set, &observation.connections);
    assert_eq!(check.allowed, 0);
    assert_eq!(check.denied.len(), 1);
    assert!(
        check.denied[0].starts_with("prod/frontend-1 (10.0.1.1) -> prod/api-1 (10.0.2.1) TCP/8080"),
        "{check:?}"
    );
    // A file that is not valid policy is an error naming the file and field.
    let broken = verify::policy_set(
        &inventory,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: prod}\nspec: {policyTypes: [Sideways]}\n",
    );
    assert!(broken.unwrap_err().contains("suggested.yaml"));
}

#[test]
fn nothing_observed_is_an_error() {
    let observation = observe(
        &[event(
            "DROPPED",
            frontend(1),
            api(1),
            tcp(1, 80, &["SYN"]),
            1,
        )],
        false,
    );
    let error = suggest(&observation, None, None)
        .err()
        .expect("an error")
        .to_string();
    assert!(
        error.contains("1 denied (count them with --include-denied)"),
        "{error}"
    );
}

#[test]
fn what_else_is_allowed_matches_evaluating_every_pair() {
    // Observed: a few connections, one from a pod without labels (named by address).
    let observation = observe(
        &[
            syn(frontend(1), api(1), 1, 8080),
            syn(api(2), DATABASE, 2, 5432),
            syn(("prod", "bare", &[], "10.0.5.2"), api(1), 3, 8080),
            syn(INGRESS, frontend(2), 4, 443),
            event("AUDIT", api(1), KUBE_DNS, udp(5, 53), 1),
        ],
        false,
    );
    let output_yaml = suggest(&observation, None, None).expect("suggest").yaml;
    let suggestion = suggest_policies(&observation.connections, None);
    // An inventory of many pods sharing label sets, some IPv4 only, some IPv6 only.
    let mut inventory = Inventory::from_connections(&observation.connections);
    let label_sets: [&[(&str, &str)]; 4] = [FE, API, DB, &[("app", "other")]];
    for index in 0..24u8 {
        let labels_of = label_sets[usize::from(index) % 4];
        let addresses = match index % 3 {
            0 => vec![format!("10.1.0.{index}"), format!("fd01::{index}")],
            1 => vec![format!("10.1.0.{index}")],
            _ => vec![format!("fd01::{index}")],
        };
        inventory.pods.push(InventoryPod {
            namespace: if index < 16 { "prod" } else { "ingress" }.into(),
            name: format!("pod-{index}"),
            labels: labels(labels_of),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        });
    }
    inventory
        .namespaces
        .insert("ingress".into(), BTreeMap::new());
    let set = verify::policy_set(&inventory, &output_yaml).expect("loads");
    let reported: std::collections::BTreeSet<(String, String, String, u16)> =
        verify::also_allowed(&set, &suggestion, &observation.connections)
            .into_iter()
            .map(|a| (a.source, a.destination, a.protocol, a.port))
            .collect();
    // The same, one evaluation per pair.
    let observed: std::collections::BTreeSet<(String, String, String, u16)> = observation
        .connections
        .iter()
        .map(|c| {
            let protocol = c.protocol.name().to_owned();
            (
                c.source.display(),
                c.destination.display(),
                protocol,
                c.port,
            )
        })
        .collect();
    let mut expected = std::collections::BTreeSet::new();
    for source in set.workloads.iter() {
        for destination in set.workloads.iter().filter(|d| d.key() != source.key()) {
            for (protocol, port) in [
                (Protocol::Tcp, 443),
                (Protocol::Tcp, 8080),
                (Protocol::Tcp, 5432),
                (Protocol::Tcp, 53),
                (Protocol::Udp, 53),
            ] {
                let key = (
                    source.key(),
                    destination.key(),
                    protocol.name().to_owned(),
                    port,
                );
                let Ok(flow) = crate::policy::Flow::between(
                    &set,
                    &crate::policy::EndpointRef::Workload {
                        namespace: source.namespace.clone(),
                        name: source.name.clone(),
                    },
                    &crate::policy::EndpointRef::Workload {
                        namespace: destination.namespace.clone(),
                        name: destination.name.clone(),
                    },
                    protocol,
                    port,
                ) else {
                    continue;
                };
                let verdict = crate::policy::evaluate(&set, &flow);
                let enforced = [&verdict.ingress, &verdict.egress]
                    .iter()
                    .any(|d| matches!(d.reason, crate::policy::VerdictReason::AllowedBy(_)));
                if verdict.allowed && enforced && !observed.contains(&key) {
                    expected.insert(key);
                }
            }
        }
    }
    assert!(
        expected.len() > 50,
        "a matrix worth checking: {}",
        expected.len()
    );
    assert_eq!(reported, expected);
}
