//! Unit tests of the policy module's building blocks.

use std::net::IpAddr;
use std::path::Path;

use super::model::{
    LabelSelector, Labels, NamedPort, Protocol, SelectorOperator, SelectorRequirement, Workload,
};
use super::*;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

fn requirement(key: &str, operator: SelectorOperator, values: &[&str]) -> SelectorRequirement {
    SelectorRequirement {
        key: key.into(),
        operator,
        values: values.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn selector_operators_follow_kubernetes() {
    let pod = labels(&[("app", "web"), ("tier", "1")]);
    let bare = labels(&[]);
    let check = |requirement: SelectorRequirement, on: &Labels| requirement.matches(on);
    assert!(check(
        requirement("app", SelectorOperator::In, &["web", "api"]),
        &pod
    ));
    assert!(!check(
        requirement("app", SelectorOperator::In, &["web"]),
        &bare
    ));
    assert!(check(
        requirement("app", SelectorOperator::NotIn, &["api"]),
        &pod
    ));
    assert!(
        check(requirement("app", SelectorOperator::NotIn, &["web"]), &bare),
        "missing key satisfies NotIn"
    );
    assert!(check(
        requirement("tier", SelectorOperator::Exists, &[]),
        &pod
    ));
    assert!(check(
        requirement("tier", SelectorOperator::DoesNotExist, &[]),
        &bare
    ));
    let selector = LabelSelector {
        match_labels: labels(&[("app", "web")]),
        match_expressions: vec![requirement("tier", SelectorOperator::In, &["2"])],
    };
    assert!(!selector.matches(&pod), "matchLabels AND matchExpressions");
    assert!(LabelSelector::everything().matches(&bare));
    assert_eq!(selector.to_string(), "{app=web,tier in (2)}");
}

#[test]
fn named_ports_resolve_by_name_and_protocol() {
    let workload = Workload {
        namespace: "n".into(),
        name: "w".into(),
        labels: Labels::new(),
        addresses: vec![],
        ports: vec![
            NamedPort {
                name: "dns".into(),
                port: 53,
                protocol: Protocol::Udp,
            },
            NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            },
        ],
        interface: None,
        node: None,
        source: Source::memory("test"),
    };
    assert_eq!(
        workload
            .resolve_named_port("dns", Protocol::Udp)
            .collect::<Vec<_>>(),
        [53]
    );
    assert!(
        workload
            .resolve_named_port("dns", Protocol::Tcp)
            .next()
            .is_none()
    );
}

#[test]
fn protocols_parse_and_number() {
    assert_eq!("TCP".parse::<Protocol>(), Ok(Protocol::Tcp));
    assert_eq!("sctp".parse::<Protocol>(), Ok(Protocol::Sctp));
    assert!("ICMP".parse::<Protocol>().is_err());
    for protocol in Protocol::ALL {
        assert_eq!(Protocol::from_number(protocol.number()), Some(protocol));
    }
}

#[test]
fn endpoint_refs_parse() {
    assert_eq!(
        "prod/api".parse::<EndpointRef>(),
        Ok(EndpointRef::Workload {
            namespace: "prod".into(),
            name: "api".into()
        })
    );
    assert_eq!(
        "fd00::1".parse::<EndpointRef>(),
        Ok(EndpointRef::Address("fd00::1".parse().unwrap()))
    );
    assert!("api".parse::<EndpointRef>().is_err());
    assert!("a/b/c".parse::<EndpointRef>().is_err());
}

const SMALL: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 80}]}]
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: api, namespace: prod, labels: {app: api}}
spec: {addresses: [10.0.0.1, "fd00::1"]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: web, namespace: prod, labels: {app: web}}
spec: {addresses: [10.0.0.2]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: v6only, namespace: prod}
spec: {addresses: ["fd00::3"]}
"#;

fn small_set() -> PolicySet {
    let mut builder = PolicySetBuilder::new();
    builder.add_text(Path::new("small.yaml"), SMALL);
    builder.finish().unwrap()
}

#[test]
fn verdicts_explain_themselves() {
    let set = small_set();
    let flow = |src: &str, dst: &str, port| Flow {
        src: src.parse::<IpAddr>().unwrap(),
        dst: dst.parse::<IpAddr>().unwrap(),
        protocol: Protocol::Tcp,
        port,
    };
    let allowed = evaluate(&set, &flow("10.0.0.1", "10.0.0.2", 80));
    assert!(allowed.allowed);
    assert_eq!(
        allowed.ingress.explanation,
        "ingress allowed by prod/web ingress rule 0 (TCP/80 from prod/api (10.0.0.1))"
    );
    assert_eq!(
        allowed.egress.explanation,
        "egress not enforced: no egress policy selects prod/api"
    );
    let denied = evaluate(&set, &flow("192.0.2.1", "10.0.0.2", 80));
    assert!(!denied.allowed);
    assert_eq!(
        denied.ingress.reason,
        VerdictReason::DeniedByDefault {
            selected_by: vec!["prod/web".into()]
        }
    );
    assert_eq!(
        denied.ingress.explanation,
        "ingress denied by default: prod/web is selected by prod/web and no rule allows TCP/80 from 192.0.2.1"
    );
    let external = evaluate(&set, &flow("10.0.0.2", "192.0.2.1", 80));
    assert_eq!(
        external.ingress.explanation,
        "ingress not enforced: 192.0.2.1 is not a workload"
    );
}

#[test]
fn reachability_matrix_uses_a_common_family() {
    let set = small_set();
    let matrix = reachability_matrix(&set, 80, Protocol::Tcp);
    assert_eq!(matrix.labels, ["prod/api", "prod/v6only", "prod/web"]);
    // api -> web allowed; v6only -> web: no common family; web -> web denied.
    assert_eq!(matrix.allowed[0][2], Some(true));
    assert_eq!(matrix.allowed[1][2], None);
    assert_eq!(matrix.allowed[2][2], Some(false));
    assert_eq!(
        matrix.allowed[0][1],
        Some(true),
        "api reaches v6only over IPv6"
    );
    let text = matrix.to_string();
    assert!(text.contains("TCP/80"), "{text}");
    let compiled = compile(&set);
    let maps = MapEvaluator::new(&compiled.state);
    let from_maps =
        ReachabilityMatrix::compute(&set, Protocol::Tcp, 80, |flow| maps.evaluate(flow).allowed);
    assert_eq!(from_maps, matrix);
}

#[test]
fn expectations_parse_and_check() {
    let set = small_set();
    let expected = parse_expected(
        Path::new("expected.yaml"),
        "- {from: prod/api, to: prod/web, port: 80, verdict: allow}\n- {from: 192.0.2.1, to: prod/web, port: 80, protocol: UDP, verdict: allow}\n- {from: prod/nobody, to: prod/web, port: 80, verdict: deny}\n",
    )
    .unwrap();
    assert_eq!(expected.len(), 3);
    let failures = check_expected(&set, &expected, |flow| evaluate(&set, flow).allowed);
    let lines: Vec<String> = failures.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "#1 192.0.2.1 -> prod/web UDP/80 expected allow: got deny for 192.0.2.1 -> 10.0.0.2 UDP/80",
            "#2 prod/nobody -> prod/web TCP/80 expected deny: no workload prod/nobody",
        ]
    );
    let bad = parse_expected(
        Path::new("e.yaml"),
        "- {from: api, to: prod/web, port: 80, verdict: allow}\n",
    )
    .unwrap_err();
    assert_eq!(
        bad.to_string(),
        "e.yaml: document 1: [0].from: \"api\" is neither an IP address nor namespace/name"
    );
}

#[test]
fn map_evaluator_reports_identities_and_rules() {
    let set = small_set();
    let compiled = compile(&set);
    let maps = MapEvaluator::new(&compiled.state);
    let flow = Flow {
        src: "10.0.0.1".parse().unwrap(),
        dst: "10.0.0.2".parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 80,
    };
    let verdict = maps.evaluate(&flow);
    assert!(verdict.allowed && verdict.ingress.enforced);
    assert_eq!(
        verdict.ingress.peer_identity,
        compiled.state.peer_hosts[&flow.src]
    );
    assert_eq!(
        compiled
            .rules
            .get(verdict.ingress.rule_id)
            .unwrap()
            .policy_name,
        "web"
    );
    assert_eq!(evaluate_state(&compiled.state, &flow), verdict);
    let denied = maps.evaluate(&Flow { port: 81, ..flow });
    assert!(!denied.allowed);
    assert_eq!(
        denied.ingress.rule_id,
        microseg_common::policy::RULE_ID_DEFAULT_DENY
    );
}

/// Kubernetes mode: a node's agent holds endpoints and policy entries for its own
/// pods only; other nodes' pods stay peers (identities), and workloads that are not
/// pods are enforced wherever they are declared.
#[test]
fn a_node_compiles_endpoints_for_its_own_pods_only() {
    let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: prod, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: c, image: i}]}
status: {podIP: 10.0.1.2, podIPs: [{ip: 10.0.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: prod, labels: {app: web}}
spec: {nodeName: node-b, containers: [{name: c, image: i}]}
status: {podIP: 10.0.2.2, podIPs: [{ip: 10.0.2.2}]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: vm, namespace: prod, labels: {app: web}}
spec: {addresses: ["10.0.9.9", "10.0.9.10"]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 80}]}]
"#;
    let mut builder = PolicySetBuilder::new();
    builder.add_text(Path::new("nodes.yaml"), text);
    let set = builder.finish().unwrap();
    assert_eq!(set.workloads[1].node.as_deref(), Some("node-a"));
    let endpoints = |compiled: &Compiled| -> Vec<String> {
        compiled
            .endpoints
            .values()
            .map(|e| e.workload.clone())
            .collect()
    };
    let everywhere = compile(&set);
    assert_eq!(
        endpoints(&everywhere),
        ["prod/vm", "prod/web-a", "prod/web-b"]
    );
    let on_a = Compiler::enforcing_node("node-a").compile(&set);
    assert_eq!(endpoints(&on_a), ["prod/vm", "prod/web-a"]);
    let address = |text: &str| -> IpAddr { text.parse().unwrap() };
    // web-b is still a peer node-a's pods allow, through its identity.
    let b_identity = on_a.state.peer_hosts[&address("10.0.2.2")];
    assert_eq!(
        on_a.state.peer_hosts[&address("10.0.1.2")],
        b_identity,
        "same namespace and labels: one identity"
    );
    assert!(!on_a.state.endpoints.contains_key(&address("10.0.2.2")));
    // Policy entries for web-a and the VM alone: two endpoints' worth, not three.
    assert_eq!(
        on_a.state.policy.len() * 3,
        everywhere.state.policy.len() * 2
    );
    // The identity table names the identity's workloads in order, each once (the
    // VM has two addresses of it); so does the compiler for one identity.
    let members = |info: Option<&IdentityInfo>| match info {
        Some(IdentityInfo::Workload { members, .. }) => members.clone(),
        other => panic!("a workload identity, not {other:?}"),
    };
    assert_eq!(
        members(on_a.identities.get(b_identity)),
        ["prod/vm", "prod/web-a", "prod/web-b"]
    );
    let mut compiler = Compiler::enforcing_node("node-a");
    compiler.compile(&set);
    assert_eq!(
        members(compiler.identity_info(b_identity).as_ref()),
        members(on_a.identities.get(b_identity))
    );
}
