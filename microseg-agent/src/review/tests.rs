//! `microseg diff` and `microseg graph` on the seed's three-tier application.

use std::path::PathBuf;

use super::{
    diff::{Side, diff},
    dot,
    flows::{ObservedFlow, ObservedVerdict},
    graph::{Graph, GroupBy},
    reach::format_ranges,
    svg,
};
use crate::{
    objects::{ObjectMap, parse_objects, read_paths},
    policy::Protocol,
};

fn three_tier() -> ObjectMap {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier");
    read_paths(&[dir]).expect("the example reads")
}

/// `base` with the objects of `yaml` replacing or adding to it.
fn changed(base: &ObjectMap, yaml: &str) -> ObjectMap {
    let mut objects = base.clone();
    objects.extend(parse_objects("change.yaml", yaml).expect("the change parses"));
    objects
}

fn flow(src: &str, dst: &str, port: u16, verdict: ObservedVerdict) -> ObservedFlow {
    ObservedFlow {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol: Protocol::Tcp,
        port,
        verdict,
    }
}

/// Traffic of the example: the tiers talking (seen with trace-allowed), and a
/// client in another namespace denied at the frontend.
fn observed() -> Vec<ObservedFlow> {
    use ObservedVerdict::{Allowed, Denied};
    vec![
        flow("10.30.0.10", "10.10.1.11", 443, Allowed),
        flow("10.10.1.11", "10.10.2.11", 8080, Allowed),
        flow("10.10.1.12", "10.10.2.12", 8080, Allowed),
        flow("10.10.2.11", "10.10.3.10", 5432, Allowed),
        flow("10.10.2.11", "10.10.3.20", 6379, Allowed),
        flow("10.10.2.11", "10.10.3.20", 6379, Allowed),
        flow("10.10.2.12", "10.10.3.20", 6379, Allowed),
        flow("10.40.0.10", "10.10.1.11", 443, Denied),
    ]
}

/// The api policy without its egress rule to redis.
const API_WITHOUT_REDIS: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-policy, namespace: production}
spec:
  podSelector: {matchLabels: {tier: api}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{podSelector: {matchLabels: {tier: frontend}}}]
      ports: [{protocol: TCP, port: 8080}]
  egress:
    - to: [{podSelector: {matchLabels: {app: postgresql}}}]
      ports: [{protocol: TCP, port: 5432}]
";

#[test]
fn removing_a_rule_names_exactly_the_flows_it_breaks() {
    let base = Side::build(three_tier(), "base").unwrap();
    let new = Side::build(changed(&base.objects, API_WITHOUT_REDIS), "new").unwrap();
    let report = diff(&base, &new, &observed());
    let denied: Vec<(String, u64)> = report
        .newly_denied
        .iter()
        .map(|(key, count)| (key.to_string(), *count))
        .collect();
    assert_eq!(
        denied,
        [
            (
                "production/api-1 -> production/redis TCP/6379".to_owned(),
                2
            ),
            (
                "production/api-2 -> production/redis TCP/6379".to_owned(),
                1
            ),
        ]
    );
    assert!(report.newly_allowed.is_empty());
    let pairs: Vec<String> = report
        .reachability
        .iter()
        .map(|c| {
            format!(
                "{} -> {}: +{} -{}",
                c.from,
                c.to,
                format_ranges(&c.added),
                format_ranges(&c.removed)
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            "production/api-1 -> production/redis: + -TCP/6379",
            "production/api-2 -> production/redis: + -TCP/6379",
        ]
    );
    assert_eq!(
        report.policies.modified,
        ["NetworkPolicy production/api-policy"]
    );
    assert!(report.policies.added.is_empty() && report.policies.removed.is_empty());
    assert!(report.allows_differently());
    let text = report.to_text();
    assert!(
        text.contains("production/api-1 -> production/redis TCP/6379 (2 events)"),
        "{text}"
    );
    assert_eq!(report.to_json()["flows"]["newlyDenied"][0]["count"], 2);
}

#[test]
fn adding_an_allow_names_the_newly_allowed_pairs_and_flows() {
    let base = Side::build(three_tier(), "base").unwrap();
    let new = Side::build(
        changed(
            &base.objects,
            "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-from-clients, namespace: production}
spec:
  podSelector: {matchLabels: {tier: frontend}}
  ingress:
    - from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}]
      ports: [{protocol: TCP, port: 443}]
",
        ),
        "new",
    )
    .unwrap();
    let report = diff(&base, &new, &observed());
    assert!(report.newly_denied.is_empty());
    let allowed: Vec<String> = report
        .newly_allowed
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(allowed, ["other/client -> production/frontend-1 TCP/443"]);
    let pairs: Vec<String> = report
        .reachability
        .iter()
        .map(|c| format!("{} -> {}: +{}", c.from, c.to, format_ranges(&c.added)))
        .collect();
    assert_eq!(
        pairs,
        [
            "other/client -> production/frontend-1: +TCP/443",
            "other/client -> production/frontend-2: +TCP/443",
        ]
    );
    assert!(report.reachability.iter().all(|c| c.removed.is_empty()));
    assert_eq!(
        report.policies.added,
        ["NetworkPolicy production/frontend-from-clients"]
    );
}

#[test]
fn a_change_that_allows_nothing_new_reports_no_change() {
    let base = Side::build(three_tier(), "base").unwrap();
    // The same policy re-applied, and a comment-only reformatting: nothing changes.
    let same = Side::build(base.objects.clone(), "new").unwrap();
    let report = diff(&base, &same, &observed());
    assert!(!report.allows_differently(), "{}", report.to_text());
    assert_eq!(report.policies, Default::default());
}

#[test]
fn an_invalid_new_set_is_refused_naming_the_file_and_field() {
    let base = three_tier();
    let bad = changed(
        &base,
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: production}
spec:
  podSelector: {}
  ingress: [{ports: [{protocol: TCP, port: 70000}]}]
",
    );
    let error = Side::build(bad, "the new policy set (-f)")
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.starts_with("the new policy set (-f) is invalid"),
        "{error}"
    );
    assert!(error.contains("change.yaml"), "{error}");
    assert!(error.contains("port"), "{error}");
}

#[test]
fn the_graph_labels_edges_with_ports_and_policies_and_marks_denied_flows() {
    let side = Side::build(three_tier(), "set").unwrap();
    let graph = Graph::build(&side.set, &observed(), GroupBy::Workload, "three-tier");
    let edge = |from: &str, to: &str| {
        graph
            .edges
            .iter()
            .find(|e| e.from == from && e.to == to)
            .unwrap_or_else(|| panic!("no edge {from} -> {to}"))
    };
    let labels = |from: &str, to: &str| {
        edge(from, to)
            .allowed
            .iter()
            .map(|a| a.label())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        labels("ingress-nginx/controller", "production/frontend-1"),
        ["TCP/443 (production/frontend-policy)"]
    );
    assert_eq!(
        labels("production/api-1", "production/postgresql"),
        ["TCP/5432 (production/api-policy, production/database-policy)"]
    );
    assert_eq!(
        labels("other/client", "kube-system/kube-dns"),
        ["any (no policy)"]
    );
    assert!(edge("other/client", "kube-system/kube-dns").unrestricted());
    // Nothing reaches the database but the API tier.
    assert!(
        graph
            .edges
            .iter()
            .filter(|e| e.to == "production/postgresql" && !e.allowed.is_empty())
            .all(|e| e.from.starts_with("production/api-"))
    );
    // The denied observed flow is its own marking.
    let denied = edge("other/client", "production/frontend-1");
    assert!(denied.allowed.is_empty());
    assert_eq!(
        denied.denied.as_ref().map(|d| d.label()),
        Some("denied TCP/443 x1".to_owned())
    );
    // Sorted, so the output is the same every time.
    let mut sorted = graph.edges.clone();
    sorted.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
    assert_eq!(sorted, graph.edges);
    assert_eq!(
        dot::render(&graph),
        dot::render(&Graph::build(
            &side.set,
            &observed(),
            GroupBy::Workload,
            "three-tier"
        ))
    );
}

#[test]
fn by_namespace_merges_the_ports_of_member_pairs() {
    let side = Side::build(three_tier(), "set").unwrap();
    let graph = Graph::build(&side.set, &[], GroupBy::Namespace, "three-tier");
    let ids: Vec<&str> = graph.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["ingress-nginx", "kube-system", "other", "production"]);
    let inside = graph
        .edges
        .iter()
        .find(|e| e.from == "production" && e.to == "production")
        .expect("production talks to itself");
    let labels: Vec<String> = inside.allowed.iter().map(|a| a.label()).collect();
    assert_eq!(
        labels,
        [
            "TCP/5432 (production/api-policy, production/database-policy)",
            "TCP/6379 (production/api-policy, production/redis-policy)",
            "TCP/8080 (production/api-policy, production/frontend-policy)",
        ]
    );
    let from_ingress = graph
        .edges
        .iter()
        .find(|e| e.from == "ingress-nginx" && e.to == "production")
        .unwrap();
    assert_eq!(
        from_ingress.allowed[0].label(),
        "TCP/443 (production/frontend-policy)"
    );
}

#[test]
fn ip_blocks_are_nodes_of_their_own() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/host-firewall");
    let side = Side::build(read_paths(&[dir]).unwrap(), "set").unwrap();
    let graph = Graph::build(&side.set, &[], GroupBy::Workload, "hosts");
    let external: Vec<&str> = graph
        .nodes
        .iter()
        .filter(|n| n.kind == super::graph::NodeKind::External)
        .map(|n| n.id.as_str())
        .collect();
    assert!(!external.is_empty(), "{:?}", graph.nodes);
    assert!(
        graph
            .edges
            .iter()
            .any(|e| external.contains(&e.from.as_str()) && !e.unrestricted()),
        "{:?}",
        graph.edges
    );
}

#[test]
fn special_characters_are_escaped_in_dot_and_svg() {
    assert_eq!(dot::quote(r#"a"b\c"#), r#""a\"b\\c""#);
    assert_eq!(dot::quote("two\nlines"), r#""two\nlines""#);
    assert_eq!(
        svg::escape(r#"<script>&"'"#),
        "&lt;script&gt;&amp;&quot;&#39;"
    );
    let side = Side::build(three_tier(), "set").unwrap();
    let title = r#"<b>"quoted" & \back</b>"#;
    let graph = Graph::build(&side.set, &[], GroupBy::Workload, title);
    let html = svg::render_html(&graph);
    assert!(!html.contains("<b>"), "the title is escaped");
    assert!(html.contains("&lt;b&gt;&quot;quoted&quot; &amp; \\back&lt;/b&gt;"));
    assert!(!html.contains("<script") && !html.contains("http://") || html.contains("xmlns"));
    let dot = dot::render(&graph);
    assert!(
        dot.contains(r#"label="<b>\"quoted\" & \\back</b>""#),
        "{dot}"
    );
}

#[test]
fn cluster_network_policies_are_named_on_the_edges_they_accept() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster-pci-zone");
    let side = Side::build(read_paths(&[dir]).unwrap(), "set").unwrap();
    let graph = Graph::build(&side.set, &[], GroupBy::Workload, "pci");
    let edge = graph
        .edges
        .iter()
        .find(|e| e.from == "checkout/payment-frontend" && e.to == "payments/card-vault")
        .expect("the frontend reaches the vault");
    let labels: Vec<String> = edge.allowed.iter().map(|a| a.label()).collect();
    assert_eq!(
        labels,
        ["TCP/8443 (ClusterNetworkPolicy/pci-zone-isolation)"]
    );
    // The Admin tier's Deny leaves the debug shell no edge into the zone.
    assert!(
        !graph
            .edges
            .iter()
            .any(|e| e.from == "dev/debug-shell" && e.to == "payments/card-vault"),
        "{:?}",
        graph.edges
    );
}
