//! Compiler specifics: identity sharing, except blocks by longest prefix, exact ipBlocks
//! in peer_hosts, the IPv4-mapped guard, entry growth, rule and identity tables, ids
//! kept from one compile to the next.

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use microseg::datapath::DatapathState;
use microseg::policy::{
    Compiler, Flow, IdentityInfo, MapEvaluator, PolicyDirection, PolicySet, PolicySetBuilder,
    Protocol, compile, evaluate,
};
use microseg_common::identity::{IDENTITY_ANY, IDENTITY_FIRST_ALLOCATED, IDENTITY_WORLD};

fn load(text: &str) -> PolicySet {
    let mut builder = PolicySetBuilder::new();
    builder.add_text(Path::new("test.yaml"), text);
    builder.finish().unwrap_or_else(|errors| panic!("{errors}"))
}

fn workload(namespace: &str, name: &str, labels: &str, addresses: &str) -> String {
    format!(
        "---\napiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {{name: {name}, namespace: {namespace}, labels: {labels}}}\nspec: {{addresses: {addresses}, ports: [{{name: http, port: 8080}}]}}\n"
    )
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn net(text: &str) -> IpNet {
    text.parse().unwrap()
}

fn tcp(src: &str, dst: &str, port: u16) -> Flow {
    Flow {
        src: ip(src),
        dst: ip(dst),
        protocol: Protocol::Tcp,
        port,
    }
}

/// Reference and map-level verdicts, asserted equal.
fn allowed(set: &PolicySet, flow: Flow) -> bool {
    let compiled = compile(set);
    let reference = evaluate(set, &flow).allowed;
    let map = MapEvaluator::new(&compiled.state).evaluate(&flow).allowed;
    assert_eq!(reference, map, "{flow}");
    reference
}

const ALLOW_WEB_FROM_API: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: api}}}]
      ports: [{port: 8080}, {port: http}, {port: 9000, endPort: 9010}]
"#;

#[test]
fn workloads_with_equal_labels_share_an_identity_and_entries_scale_with_identities() {
    let mut text = ALLOW_WEB_FROM_API.to_string();
    for index in 0..50 {
        text += &workload(
            "prod",
            &format!("api-{index}"),
            "{app: api}",
            &format!("[10.1.0.{index}]"),
        );
    }
    for index in 0..5 {
        text += &workload(
            "prod",
            &format!("web-{index}"),
            "{app: web}",
            &format!("[10.2.0.{index}, 'fd00::2:{index}']"),
        );
    }
    let set = load(&text);
    let compiled = compile(&set);
    let stats = compiled.stats();
    assert_eq!(
        stats.workload_identities, 2,
        "one for api pods, one for web pods"
    );
    assert_eq!(stats.enforced_workloads, 5);
    assert_eq!(
        stats.maps.endpoints, 10,
        "every address of every enforced workload"
    );
    // Per endpoint: one peer identity x (8080, named http -> 8080 deduplicated,
    // 9000-9010 -> 9000/13 and 9008/15 and 9010/16) = 4 entries; never x 50 addresses.
    assert_eq!(stats.maps.policy, 5 * 4);
    assert!(
        compiled
            .state
            .endpoints
            .values()
            .all(|info| info.ingress_enforced() && !info.egress_enforced())
    );
    let endpoint_ids: Vec<u32> = compiled.endpoints.keys().copied().collect();
    assert_eq!(endpoint_ids, vec![1, 2, 3, 4, 5]);
    assert!(allowed(&set, tcp("10.1.0.7", "10.2.0.3", 9005)));
    assert!(!allowed(&set, tcp("10.1.0.7", "10.2.0.3", 9011)));
    assert!(!allowed(&set, tcp("10.2.0.1", "10.2.0.3", 8080)));
}

#[test]
fn rule_table_names_policy_direction_and_index() {
    let text = ALLOW_WEB_FROM_API.to_string()
        + &workload("prod", "api", "{app: api}", "[10.1.0.1]")
        + &workload("prod", "web", "{app: web}", "[10.2.0.1]");
    let set = load(&text);
    let compiled = compile(&set);
    let map = MapEvaluator::new(&compiled.state).evaluate(&tcp("10.1.0.1", "10.2.0.1", 8080));
    assert!(map.allowed && map.ingress.enforced && !map.egress.enforced);
    let rule = compiled.rules.get(map.ingress.rule_id).unwrap();
    assert_eq!(rule.to_string(), "prod/web ingress rule 0");
    assert_eq!(rule.direction, PolicyDirection::Ingress);
    assert!(compiled.rules.get(0).is_none(), "0 is the default deny");
    assert!(
        compiled
            .identities
            .describe(map.ingress.peer_identity)
            .contains("prod/api")
    );
}

#[test]
fn except_blocks_win_by_longest_prefix() {
    let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: out, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.168.0.0/16]}}]
    - to: [{ipBlock: {cidr: 10.1.0.0/16, except: [10.1.2.0/24]}}]
      ports: [{port: 5432}]
"#
    .to_string()
        + &workload("prod", "app", "{app: x}", "[10.9.0.1]")
        + &workload("prod", "db", "{app: db}", "[10.1.0.5]");
    let set = load(&text);
    let compiled = compile(&set);
    let prefixes = &compiled.state.peer_prefixes;
    assert_eq!(
        prefixes[&net("10.0.0.0/8")],
        IDENTITY_WORLD,
        "excluded, in no other block"
    );
    assert_eq!(prefixes[&net("192.168.0.0/16")], IDENTITY_WORLD);
    assert!(prefixes[&net("0.0.0.0/0")] >= IDENTITY_FIRST_ALLOCATED);
    assert!(prefixes[&net("10.1.0.0/16")] >= IDENTITY_FIRST_ALLOCATED);
    assert_eq!(prefixes[&net("10.1.2.0/24")], IDENTITY_WORLD);
    assert!(allowed(&set, tcp("10.9.0.1", "203.0.113.1", 443)));
    assert!(!allowed(&set, tcp("10.9.0.1", "10.200.0.1", 443)));
    assert!(!allowed(&set, tcp("10.9.0.1", "192.168.1.1", 443)));
    assert!(allowed(&set, tcp("10.9.0.1", "10.1.7.7", 5432)));
    assert!(!allowed(&set, tcp("10.9.0.1", "10.1.7.7", 443)));
    assert!(!allowed(&set, tcp("10.9.0.1", "10.1.2.7", 5432)));
    // A workload inside an ipBlock is matched through its own identity.
    assert!(allowed(&set, tcp("10.9.0.1", "10.1.0.5", 5432)));
    let db_identity = compiled.state.peer_hosts[&ip("10.1.0.5")];
    match compiled.identities.get(db_identity).unwrap() {
        IdentityInfo::Workload { key, .. } => assert_eq!(key.ip_blocks.len(), 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn exact_ip_blocks_go_to_peer_hosts_unless_a_workload_owns_the_address() {
    let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns, namespace: hosts}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 10.0.0.2/32}}, {ipBlock: {cidr: 10.0.0.3/32}}]
      ports: [{protocol: UDP, port: 53}]
"#
    .to_string()
        + &workload("hosts", "db1", "{host: db1}", "[10.0.20.5]")
        + &workload("hosts", "dns", "{host: dns}", "[10.0.0.2]");
    let set = load(&text);
    let compiled = compile(&set);
    assert!(compiled.state.peer_prefixes.is_empty());
    let dns_identity = compiled.state.peer_hosts[&ip("10.0.0.2")];
    assert!(matches!(
        compiled.identities.get(dns_identity),
        Some(IdentityInfo::Workload { .. })
    ));
    let other = compiled.state.peer_hosts[&ip("10.0.0.3")];
    assert!(matches!(
        compiled.identities.get(other),
        Some(IdentityInfo::Cidr { .. })
    ));
    let udp = |dst: &str| Flow {
        src: ip("10.0.20.5"),
        dst: ip(dst),
        protocol: Protocol::Udp,
        port: 53,
    };
    assert!(allowed(&set, udp("10.0.0.2")));
    assert!(allowed(&set, udp("10.0.0.3")));
    assert!(!allowed(&set, udp("10.0.0.4")));
}

#[test]
fn ipv6_default_route_block_does_not_catch_ipv4_traffic() {
    // The maps key IPv4 as ::ffff:a.b.c.d, inside ::/0: an IPv4 /0 must shadow it.
    let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: v6-out, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: "::/0"}}]
"#
    .to_string()
        + &workload("prod", "app", "{app: x}", "[10.9.0.1, 'fd00::1']");
    let set = load(&text);
    let compiled = compile(&set);
    assert_eq!(
        compiled.state.peer_prefixes[&net("0.0.0.0/0")],
        IDENTITY_WORLD
    );
    assert!(allowed(&set, tcp("fd00::1", "2001:db8::1", 443)));
    assert!(!allowed(&set, tcp("10.9.0.1", "192.0.2.1", 443)));
    let mut without_guard = compiled.state.clone();
    without_guard.peer_prefixes.remove(&net("0.0.0.0/0"));
    assert!(
        MapEvaluator::new(&without_guard)
            .evaluate(&tcp("10.9.0.1", "192.0.2.1", 443))
            .allowed,
        "the map-level evaluator models the aliasing the guard prevents"
    );
}

#[test]
fn rules_without_peers_use_identity_any_and_without_ports_any_protocol() {
    let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: open, namespace: prod}
spec:
  podSelector: {}
  ingress: [{}]
"#
    .to_string()
        + &workload("prod", "app", "{app: x}", "[10.9.0.1]");
    let set = load(&text);
    let compiled = compile(&set);
    let entries: Vec<_> = compiled.state.policy.keys().collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].identity, IDENTITY_ANY);
    assert_eq!(entries[0].protocol, None);
    assert_eq!(entries[0].port_block, None);
    assert!(allowed(
        &set,
        Flow {
            src: ip("192.0.2.1"),
            dst: ip("10.9.0.1"),
            protocol: Protocol::Sctp,
            port: 9
        }
    ));
}

#[test]
fn egress_named_ports_resolve_per_destination_identity() {
    let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: out, namespace: prod}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
    - ports: [{port: web}]
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: client, namespace: prod, labels: {app: client}}
spec: {addresses: [10.0.0.1]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: s1, namespace: prod, labels: {app: server}}
spec: {addresses: [10.0.0.2], ports: [{name: web, port: 8080}]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: s2, namespace: prod, labels: {app: server}}
spec: {addresses: [10.0.0.3], ports: [{name: web, port: 9090}]}
"#;
    let set = load(text);
    let compiled = compile(&set);
    // Same labels, different named ports: distinct identities.
    assert_ne!(
        compiled.state.peer_hosts[&ip("10.0.0.2")],
        compiled.state.peer_hosts[&ip("10.0.0.3")]
    );
    assert!(allowed(&set, tcp("10.0.0.1", "10.0.0.2", 8080)));
    assert!(!allowed(&set, tcp("10.0.0.1", "10.0.0.2", 9090)));
    assert!(allowed(&set, tcp("10.0.0.1", "10.0.0.3", 9090)));
    assert!(
        !allowed(&set, tcp("10.0.0.1", "192.0.2.1", 8080)),
        "bare IPs have no named ports"
    );
}

#[test]
fn compiling_twice_gives_the_same_state() {
    let text = ALLOW_WEB_FROM_API.to_string()
        + &workload("prod", "api", "{app: api}", "[10.1.0.1]")
        + &workload("prod", "web", "{app: web}", "[10.2.0.1]");
    let set = load(&text);
    assert_eq!(compile(&set), compile(&set));
}

/// Entries of `after` that differ from `before` (added, changed or removed), per map.
fn changed_entries(before: &DatapathState, after: &DatapathState) -> (usize, usize, usize) {
    fn count<K: Ord, V: PartialEq>(
        a: &std::collections::BTreeMap<K, V>,
        b: &std::collections::BTreeMap<K, V>,
    ) -> usize {
        let changed_or_removed = a.iter().filter(|(k, v)| b.get(k) != Some(v)).count();
        let added = b.keys().filter(|k| !a.contains_key(k)).count();
        changed_or_removed + added
    }
    (
        count(&before.endpoints, &after.endpoints),
        count(&before.peer_hosts, &after.peer_hosts),
        count(&before.policy, &after.policy),
    )
}

/// 50 namespaces of 20 workloads; policy `p<i>` lets `w<i>` receive from the next
/// workload of its namespace on TCP 8080 (and, with `extra`, UDP 9000 for `w0`).
fn scale_text(skip: Option<usize>, relabel: Option<usize>, extra: bool) -> String {
    let mut text = String::new();
    for index in 0..1000 {
        let namespace = format!("ns{}", index / 20);
        let partner = (index / 20) * 20 + (index % 20 + 1) % 20;
        let ports = if extra && index == 0 {
            "[{port: 8080}, {port: 9000, protocol: UDP}]"
        } else {
            "[{port: 8080}]"
        };
        text += &format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{index}, namespace: {namespace}}}\nspec:\n  podSelector: {{matchLabels: {{app: w{index}}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: w{partner}}}}}}}], ports: {ports}}}]\n"
        );
        if skip == Some(index) {
            continue;
        }
        let app = if relabel == Some(index) {
            format!("w{index}-new")
        } else {
            format!("w{index}")
        };
        text += &workload(
            &namespace,
            &format!("w{index}"),
            &format!("{{app: {app}}}"),
            &format!("[10.{}.{}.1]", index / 250, index % 250),
        );
    }
    text
}

#[test]
fn ids_are_kept_so_that_one_change_rewrites_only_its_own_entries() {
    let mut compiler = Compiler::default();
    let base = compiler.compile(&load(&scale_text(Some(500), None, false)));
    assert_eq!(
        base.state.policy.len(),
        999 - 1,
        "w499 has no peer without w500"
    );

    // A pod added: its address, its endpoint, its own rule, and the rule of the
    // policy that now finds it as a peer.
    let added = compiler.compile(&load(&scale_text(None, None, false)));
    assert_eq!(changed_entries(&base.state, &added.state), (1, 1, 2));

    // A policy changed: one entry more.
    let changed = compiler.compile(&load(&scale_text(None, None, true)));
    assert_eq!(changed_entries(&added.state, &changed.state), (0, 0, 1));

    // Labels changed: the workload gets a new identity (its address is rewritten),
    // it is no longer selected by its policy nor a peer of its neighbour's.
    let relabelled = compiler.compile(&load(&scale_text(None, Some(700), true)));
    assert_eq!(
        changed_entries(&changed.state, &relabelled.state),
        (1, 1, 2)
    );

    // A pod removed: what it added goes.
    let removed = compiler.compile(&load(&scale_text(Some(500), None, true)));
    let back = compiler.compile(&load(&scale_text(Some(500), None, true)));
    assert_eq!(changed_entries(&removed.state, &back.state), (0, 0, 0));

    // Every state still answers like the reference evaluator; ids differ from a
    // fresh compile's but the verdicts do not.
    let set = load(&scale_text(Some(500), None, true));
    for flow in [
        tcp("10.0.1.1", "10.0.0.1", 8080),
        tcp("10.2.2.1", "10.2.1.1", 8080),
    ] {
        let reference = evaluate(&set, &flow).allowed;
        assert_eq!(
            MapEvaluator::new(&back.state).evaluate(&flow).allowed,
            reference,
            "{flow}"
        );
    }
    let udp = Flow {
        src: ip("10.0.1.1"),
        dst: ip("10.0.0.1"),
        protocol: Protocol::Udp,
        port: 9000,
    };
    assert!(MapEvaluator::new(&back.state).evaluate(&udp).allowed);
}

#[test]
fn ids_are_not_reused_for_something_else() {
    let mut compiler = Compiler::default();
    let with = compiler.compile(&load(&scale_text(None, None, false)));
    let id_of_w500 = with.state.peer_hosts[&ip("10.2.0.1")];
    let without = compiler.compile(&load(&scale_text(Some(500), None, false)));
    assert!(!without.identities.identities.contains_key(&id_of_w500));
    // w500 back with other labels: a new identity, never the old number.
    let relabelled = compiler.compile(&load(&scale_text(None, Some(500), false)));
    assert!(relabelled.state.peer_hosts[&ip("10.2.0.1")] > id_of_w500);
}

/// A cluster-wide Baseline deny "from every namespace" over 200 workloads with 200
/// distinct label sets: each endpoint gets an ANY entry and entries for the few
/// identities the rule does not name (world, the Admin rules' peers), not one per
/// identity. Admin rules and the NetworkPolicy tier still decide around it.
#[test]
fn a_rule_naming_every_namespace_costs_its_blocks_not_identities() {
    let mut text = String::new();
    for index in 0..200 {
        text.push_str(&workload(
            ["a", "b", "c", "d"][index % 4],
            &format!("w{index}"),
            &format!("{{app: w{index}}}"),
            &format!("[10.1.0.{}]", index + 1),
        ));
    }
    let cluster_policy = |name: &str, spec: &str| {
        format!(
            "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec: {spec}\n"
        )
    };
    text.push_str(&cluster_policy(
        "baseline-deny",
        "{tier: Baseline, priority: 0, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}]}]}",
    ));
    text.push_str(&cluster_policy(
        "admin",
        "{tier: Admin, priority: 1, subject: {namespaces: {}}, ingress: [{action: Accept, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: w7}}}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}, {action: Pass, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: w3}}}}]}]}",
    ));
    text.push_str(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: open, namespace: b}\nspec: {podSelector: {matchLabels: {app: w1}}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: w3}}}]}]}\n",
    );
    let set = load(&text);
    let compiled = compile(&set);
    let entries = compiled.state.policy.len();
    println!("{entries} policy entries for 200 endpoints and 200 identities");
    // One entry per identity would be 200 x 200.
    assert!(entries <= 200 * 4, "{entries} entries");
    let maps = MapEvaluator::new(&compiled.state);
    // (flow, allowed, why)
    let flows = [
        (tcp("10.1.0.3", "10.1.0.5", 80), false, "baseline deny"),
        (tcp("10.1.0.8", "10.1.0.5", 80), true, "w7: admin accept"),
        (
            tcp("10.1.0.8", "10.1.0.5", 81),
            false,
            "w7, other port: baseline",
        ),
        (
            tcp("10.1.0.4", "10.1.0.5", 80),
            false,
            "w3 passed, no NP: baseline",
        ),
        (
            tcp("10.1.0.4", "10.1.0.2", 80),
            true,
            "w3 passed to w1's NP",
        ),
        (
            tcp("10.1.0.3", "10.1.0.2", 80),
            false,
            "w1 is selected: default deny",
        ),
        (
            tcp("198.51.100.1", "10.1.0.5", 80),
            true,
            "world: not a namespace",
        ),
    ];
    for (flow, expected, why) in flows {
        let reference = evaluate(&set, &flow);
        assert_eq!(
            reference.allowed, expected,
            "{why}: {flow}: {}",
            reference.ingress.explanation
        );
        assert_eq!(maps.evaluate(&flow).allowed, expected, "{why}: {flow}");
    }
}
