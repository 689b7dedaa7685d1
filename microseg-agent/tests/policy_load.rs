//! Loading and validation: accepted document shapes, Kubernetes defaulting, and error
//! reports that name file, document, field path and reason, all of them at once.

use std::path::{Path, PathBuf};

use microseg::policy::{
    LoadErrors, NamespaceScope, Peer, PolicySet, PolicySetBuilder, PortSpec, Protocol, load_paths,
};

fn load(file: &str, text: &str) -> Result<PolicySet, LoadErrors> {
    let mut builder = PolicySetBuilder::new();
    builder.add_text(Path::new(file), text);
    builder.finish()
}

fn errors(file: &str, text: &str) -> Vec<String> {
    match load(file, text) {
        Ok(_) => panic!("expected errors"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: production}\n";

#[test]
fn error_lines_name_file_document_path_and_reason() {
    let text = format!(
        "{NAMESPACE}---\n{}",
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api, namespace: production}
spec:
  podSelector: {matchExpressions: [{key: app, operator: Equals, values: [x]}]}
  ingress:
    - from:
        - ipBlock: {cidr: 10.0.0.0/24, except: [10.1.0.0/28, not-a-cidr]}
        - ipBlock: {cidr: 10.0.0.0/33}
        - {}
        - ipBlock: {cidr: 10.0.0.0/8}
          podSelector: {}
      ports:
        - {port: 80, endPort: 79}
        - {port: 0}
        - {port: 70000}
        - {protocol: ICMP, port: 80}
        - {port: http, endPort: 90}
        - {endPort: 90}
        - {port: Not_Valid}
  egress:
    - to: [{namespaceSelector: {matchExpressions: [{key: team, operator: In}]}}]
  policyTypes: [Ingress, Egress, Sideways]
"#
    );
    let errors = errors("policies/api.yaml", &text);
    let expected = [
        "policies/api.yaml: document 2: spec.podSelector.matchExpressions[0].operator: invalid label selector operator \"Equals\" (expected In, NotIn, Exists or DoesNotExist)",
        "policies/api.yaml: document 2: spec.policyTypes[2]: unknown policy type \"Sideways\" (expected Ingress or Egress)",
        "policies/api.yaml: document 2: spec.ingress[0].from[0].ipBlock.except[0]: 10.1.0.0/28 is not strictly inside cidr 10.0.0.0/24",
        "policies/api.yaml: document 2: spec.ingress[0].from[0].ipBlock.except[1]: bad CIDR \"not-a-cidr\"",
        "policies/api.yaml: document 2: spec.ingress[0].from[1].ipBlock.cidr: bad CIDR \"10.0.0.0/33\"",
        "policies/api.yaml: document 2: spec.ingress[0].from[2]: peer must set podSelector, namespaceSelector or ipBlock",
        "policies/api.yaml: document 2: spec.ingress[0].from[3]: ipBlock cannot be combined with podSelector or namespaceSelector",
        "policies/api.yaml: document 2: spec.ingress[0].ports[0].endPort: 79 is below port 80",
        "policies/api.yaml: document 2: spec.ingress[0].ports[1].port: 0 is out of range 1-65535",
        "policies/api.yaml: document 2: spec.ingress[0].ports[2].port: 70000 is out of range 1-65535",
        "policies/api.yaml: document 2: spec.ingress[0].ports[3].protocol: unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)",
        "policies/api.yaml: document 2: spec.ingress[0].ports[4].endPort: endPort cannot be used with named port \"http\"",
        "policies/api.yaml: document 2: spec.ingress[0].ports[5].endPort: endPort requires port",
        "policies/api.yaml: document 2: spec.ingress[0].ports[6].port: invalid named port \"Not_Valid\": must contain only lower-case letters, digits and '-'",
        "policies/api.yaml: document 2: spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values: operator In needs at least one value",
    ];
    for line in expected {
        assert!(
            errors.iter().any(|error| error == line),
            "missing {line:?} in\n{}",
            errors.join("\n")
        );
    }
    assert_eq!(errors.len(), expected.len(), "{}", errors.join("\n"));
}

#[test]
fn inventory_errors_are_collected_across_documents() {
    let text = r#"
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: db, namespace: prod}
spec: {addresses: [10.0.0.5, 10.0.0.300], ports: [{name: pg, port: 5432, protocol: TCPX}]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: db2, namespace: prod}
spec: {addresses: [10.0.0.6]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: db2, namespace: prod}
spec: {addresses: [10.0.0.7]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: db3, namespace: prod}
spec: {addresses: [10.0.0.6]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: nameless}
spec: {addresses: [10.0.0.8]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: typo, namespace: prod}
spec: {adresses: [10.0.0.9]}
"#;
    let errors = errors("inventory.yaml", text);
    let expected = [
        "inventory.yaml: document 1: spec.addresses[1]: bad IP address \"10.0.0.300\"",
        "inventory.yaml: document 1: spec.ports[0].protocol: unknown protocol \"TCPX\" (expected TCP, UDP or SCTP)",
        "inventory.yaml: document 3: metadata.name: duplicate workload name prod/db2 (first defined at inventory.yaml: document 2)",
        "inventory.yaml: document 4: duplicate workload address 10.0.0.6: prod/db3 has it and so does prod/db2 (inventory.yaml: document 2)",
        "inventory.yaml: document 5: metadata.namespace: is required",
        "inventory.yaml: document 6: unknown kind \"ConfigMap\" of apiVersion \"v1\" (expected networking.k8s.io/v1 NetworkPolicy, policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy, v1 Namespace, v1 Pod, v1 Node, microseg.dev/v1 Workload, or a List of them)",
    ];
    for line in expected {
        assert!(
            errors.iter().any(|error| error == line),
            "missing {line:?} in\n{}",
            errors.join("\n")
        );
    }
    assert!(
        errors.iter().any(|error| error.starts_with(
            "inventory.yaml: document 7: spec.adresses: cannot read Workload: unknown field `adresses`"
        )),
        "{}",
        errors.join("\n")
    );
    assert_eq!(errors.len(), expected.len() + 1, "{}", errors.join("\n"));
}

#[test]
fn policy_types_default_as_the_api_server_does() {
    let policy = |spec: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: n}}\nspec: {spec}\n"
        )
    };
    let loaded = |spec: &str| load("p.yaml", &policy(spec)).unwrap().policies.remove(0);
    let p = loaded("{podSelector: {}}");
    assert_eq!(
        p.ingress,
        Some(vec![]),
        "no policyTypes: Ingress, nothing allowed"
    );
    assert_eq!(p.egress, None);
    let p = loaded("{podSelector: {}, egress: [{}]}");
    assert!(p.ingress == Some(vec![]) && p.egress.as_ref().is_some_and(|rules| rules.len() == 1));
    // The API server adds Egress only for a non-empty egress list.
    let p = loaded("{podSelector: {}, egress: []}");
    assert_eq!(p.egress, None);
    let p = loaded("{podSelector: {}, policyTypes: [Egress], ingress: [{}]}");
    assert_eq!(
        p.ingress, None,
        "ingress rules without the Ingress type are ignored"
    );
    assert_eq!(p.egress, Some(vec![]));
    let p = loaded("{podSelector: {}, ingress: [{from: [], ports: []}]}");
    let rule = &p.ingress.as_ref().unwrap()[0];
    assert!(
        rule.peers.is_none() && rule.ports.is_none(),
        "empty from/ports = everything"
    );
    // Missing podSelector (optional since 1.31) selects every pod.
    let p = loaded("{}");
    assert!(p.pod_selector.is_everything());
}

#[test]
fn peers_and_ports_normalise() {
    let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  ingress:
    - from:
        - podSelector: {matchLabels: {app: a}}
        - namespaceSelector: {matchLabels: {team: x}}
        - namespaceSelector: {}
          podSelector: {matchLabels: {app: b}}
        - ipBlock: {cidr: 10.0.0.9/24, except: ["10.0.0.128/25"]}
      ports:
        - port: 53
          protocol: UDP
        - {port: 8000, endPort: 8080}
        - {protocol: SCTP}
        - {port: metrics}
"#;
    let set = load("p.yaml", text).unwrap();
    let rule = &set.policies[0].ingress.as_ref().unwrap()[0];
    let peers = rule.peers.as_ref().unwrap();
    assert!(
        matches!(&peers[0], Peer::Workloads { namespaces: NamespaceScope::Named(ns), .. } if ns == "prod")
    );
    assert!(
        matches!(&peers[1], Peer::Workloads { namespaces: NamespaceScope::Selected(_), pods } if pods.is_everything())
    );
    assert!(
        matches!(&peers[2], Peer::Workloads { namespaces: NamespaceScope::Selected(ns), .. } if ns.is_everything())
    );
    match &peers[3] {
        Peer::IpBlock(block) => assert_eq!(block.to_string(), "10.0.0.0/24 except 10.0.0.128/25"),
        other => panic!("{other:?}"),
    }
    let ports = rule.ports.as_ref().unwrap();
    assert_eq!(
        (ports[0].protocol, &ports[0].port),
        (
            Protocol::Udp,
            &PortSpec::Range {
                first: 53,
                last: 53
            }
        )
    );
    assert_eq!(
        (ports[1].protocol, &ports[1].port),
        (
            Protocol::Tcp,
            &PortSpec::Range {
                first: 8000,
                last: 8080
            }
        )
    );
    assert_eq!(
        (ports[2].protocol, &ports[2].port),
        (Protocol::Sctp, &PortSpec::Any)
    );
    assert_eq!(ports[3].port, PortSpec::Named("metrics".into()));
}

#[test]
fn kubectl_lists_of_pods_namespaces_and_policies_load() {
    let text = r#"
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: v1
  kind: Namespace
  metadata:
    name: shop
    labels: {team: retail}
- apiVersion: v1
  kind: Pod
  metadata:
    name: cart-7d4b9c
    namespace: shop
    labels: {app: cart}
    creationTimestamp: "2024-01-01T00:00:00Z"
  spec:
    containers:
    - name: cart
      image: cart:1
      ports:
      - {containerPort: 8080, name: http, protocol: TCP}
      - {containerPort: 9090}
    - name: sidecar
      image: envoy
      ports:
      - {containerPort: 15090, name: envoy-prom}
  status:
    phase: Running
    podIP: 10.244.1.5
    podIPs: [{ip: 10.244.1.5}, {ip: "fd00:244::5"}]
- apiVersion: v1
  kind: Pod
  metadata: {name: kube-proxy-x, namespace: kube-system}
  spec:
    hostNetwork: true
    containers: [{name: kube-proxy, image: kp}]
  status: {phase: Running, podIP: 192.168.0.10}
- apiVersion: v1
  kind: Pod
  metadata: {name: kube-proxy-y, namespace: kube-system}
  spec:
    hostNetwork: true
    containers: [{name: kube-proxy, image: kp}]
  status: {phase: Running, podIP: 192.168.0.10}
- apiVersion: v1
  kind: Pod
  metadata: {name: legacy, namespace: other}
  spec: {containers: [{name: c, image: i}]}
  status: {phase: Running, podIP: 10.244.2.9}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicyList
items:
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: deny, namespace: shop}
  spec: {podSelector: {}}
"#;
    let set = load("cluster.yaml", text).unwrap();
    let cart = set.workload("shop", "cart-7d4b9c").unwrap();
    assert_eq!(cart.addresses.len(), 2);
    let names: Vec<&str> = cart.ports.iter().map(|port| port.name.as_str()).collect();
    assert_eq!(
        names,
        ["http", "envoy-prom"],
        "unnamed ports are not named ports"
    );
    assert!(
        set.workload("kube-system", "kube-proxy-x")
            .unwrap()
            .addresses
            .is_empty(),
        "host network"
    );
    assert_eq!(set.namespace_labels("shop").get("team").unwrap(), "retail");
    assert_eq!(
        set.namespace_labels("shop")
            .get("kubernetes.io/metadata.name")
            .unwrap(),
        "shop"
    );
    assert_eq!(
        set.namespace_labels("other").len(),
        1,
        "implicit namespace: name label only"
    );
    assert_eq!(set.policies.len(), 1);

    let errors = errors(
        "bad.yaml",
        "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: p}}\n",
    );
    assert_eq!(
        errors,
        ["bad.yaml: document 1: items[0].metadata.namespace: is required"]
    );
}

#[test]
fn directories_load_recursively_in_sorted_order_yaml_and_json() {
    let root = std::env::temp_dir().join(format!("microseg-policy-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("b/nested")).unwrap();
    std::fs::write(
        root.join("a.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: one}\n---\n",
    )
    .unwrap();
    std::fs::write(
        root.join("b/nested/w.json"),
        r#"{"apiVersion": "microseg.dev/v1", "kind": "Workload", "metadata": {"name": "w", "namespace": "one"}, "spec": {"addresses": ["10.0.0.1"]}}
{"apiVersion": "microseg.dev/v1", "kind": "Workload", "metadata": {"name": "v", "namespace": "one"}, "spec": {"addresses": ["10.0.0.1"]}}"#,
    )
    .unwrap();
    std::fs::write(root.join("b/ignored.txt"), "not policy").unwrap();
    std::fs::write(root.join("c.yml"), "apiVersion: v1\nkind: Secret\n").unwrap();
    let errors =
        load_paths(&[root.clone(), PathBuf::from("/nonexistent/microseg.yaml")]).unwrap_err();
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let json = root.join("b/nested/w.json");
    let yml = root.join("c.yml");
    assert_eq!(lines.len(), 3, "{}", lines.join("\n"));
    assert!(
        lines
            .iter()
            .any(|line| line.starts_with("/nonexistent/microseg.yaml: cannot be read"))
    );
    assert!(lines.iter().any(|line| line.starts_with(&format!(
        "{}: document 2: duplicate workload address 10.0.0.1",
        json.display()
    ))));
    assert!(lines.iter().any(|line| line.starts_with(&format!(
        "{}: document 1: unknown kind \"Secret\"",
        yml.display()
    ))));
    std::fs::remove_file(&yml).unwrap();
    std::fs::write(&json, r#"{"apiVersion": "microseg.dev/v1", "kind": "Workload", "metadata": {"name": "w", "namespace": "one"}, "spec": {"addresses": ["10.0.0.1"]}}"#).unwrap();
    let set = load_paths(std::slice::from_ref(&root)).unwrap();
    assert_eq!(set.workloads.len(), 1);
    assert!(set.namespaces["one"].source.is_some());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn yaml_syntax_errors_are_reported_with_their_document() {
    let errors = errors(
        "broken.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [unclosed\n",
    );
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with("broken.yaml: document 2: bad YAML:"),
        "{}",
        errors[0]
    );
}

#[test]
fn misspelt_fields_of_a_policy_are_errors_not_silently_dropped() {
    // `exept` would drop the exception and allow the whole /8.
    let errors = errors(
        "p.yaml",
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: n, labells: {a: b}}
spec:
  podSelector: {}
  ingress:
    - from: [{ipBlock: {cidr: 10.0.0.0/8, exept: [10.1.0.0/16]}}]
"#,
    );
    assert_eq!(
        errors,
        [
            "p.yaml: document 1: metadata.labells: unknown field of a NetworkPolicy (misspelt?)",
            "p.yaml: document 1: spec.ingress[0].from[0].ipBlock.exept: unknown field of a NetworkPolicy (misspelt?)",
        ]
    );
}

#[test]
fn type_errors_name_the_field() {
    let errors = errors(
        "pods.yaml",
        r#"apiVersion: v1
kind: Pod
metadata: {name: web, namespace: n}
spec:
  containers: [{name: c, ports: [{name: http, containerPort: "8080"}]}]
"#,
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with(
            "pods.yaml: document 1: spec.containers[0].ports[0].containerPort: cannot read Pod: invalid type"
        ),
        "{errors:?}"
    );
}

#[test]
fn inventory_from_a_newer_cluster_loads_but_metadata_must_be_known() {
    // A spec or status field this version does not know (exported from a newer
    // cluster) is harmless: microseg reads labels, addresses and ports.
    let newer = r#"apiVersion: v1
kind: Pod
metadata: {name: web, namespace: n, labels: {app: web}}
spec: {containers: [{name: c}], someFutureField: true}
status: {podIP: 10.0.0.5, anotherFutureField: {x: 1}}
"#;
    assert!(load("pods.yaml", newer).is_ok());
    let misspelt = newer.replace("labels:", "lables:");
    assert_eq!(
        errors("pods.yaml", &misspelt),
        ["pods.yaml: document 1: metadata.lables: unknown field of a Pod (misspelt?)"]
    );
    // The API server validated its objects, but a policy field this version does not
    // know may narrow what the policy allows: the policy is refused (and, where its
    // author cannot be told at once, enforced as its fail-closed substitute).
    let value: serde_json::Value = serde_norway::from_str(
        r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy,
            metadata: {name: p, namespace: n, futureMetadata: 1}, spec: {podSelector: {}, futureField: 1},
            status: {futureStatus: 1}}"#,
    )
    .unwrap();
    let source = microseg::policy::Source::new("api-server:x", 1);
    let mut builder = PolicySetBuilder::new();
    builder.add_api_server_document(&source, &value);
    let errors = builder.finish().expect_err("a spec field it does not know");
    assert_eq!(errors.errors.len(), 1, "{errors:?}");
    assert!(errors.errors[0].to_string().contains("spec.futureField"));
    let mut builder = PolicySetBuilder::new().fail_closed(true);
    builder.add_api_server_document(&source, &value);
    let set = builder.finish().expect("substituted");
    assert_eq!(set.refused_policies.len(), 1);
    assert_eq!(set.policies[0].ingress.as_deref(), Some(&[][..]));
}

#[test]
fn a_workloads_interface_is_checked_and_owned_once() {
    let workload = |name: &str, interface: &str, addresses: &str| {
        format!(
            "apiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {{name: {name}, namespace: vms}}\nspec: {{addresses: [{addresses}], interface: \"{interface}\"}}\n"
        )
    };
    let ok = load("vms.yaml", &workload("vm-7", "tap7", "10.20.0.7")).unwrap();
    assert_eq!(ok.workloads[0].interface.as_deref(), Some("tap7"));
    let two = format!(
        "{}---\n{}",
        workload("vm-7", "tap7", "10.20.0.7"),
        workload("vm-8", "tap7", "10.20.0.8")
    );
    let found = errors("vms.yaml", &two);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("vms.yaml: document 2: spec.interface: interface tap7 is already the interface of vms/vm-7"),
        "{found:?}"
    );
    let found = errors(
        "vms.yaml",
        &workload("vm-9", "a-name-far-too-long", "10.20.0.9"),
    );
    assert!(
        found[0].contains("spec.interface: interface name"),
        "{found:?}"
    );
    let many: Vec<String> = (1..=9).map(|i| format!("10.20.1.{i}")).collect();
    let found = errors("vms.yaml", &workload("vm-10", "tap10", &many.join(", ")));
    assert!(found[0].contains("at most 8 addresses"), "{found:?}");
}

/// A ClusterNetworkPolicy around `spec` (YAML flow style).
fn cluster_policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

#[test]
fn cluster_network_policy_limits_are_errors_with_their_field() {
    let peers = (0..26)
        .map(|i| format!("{{networks: [10.{i}.0.0/16]}}"))
        .collect::<Vec<_>>()
        .join(", ");
    let rules = (0..26)
        .map(|_| "{action: Deny, to: [{networks: [10.0.0.0/8]}]}".to_owned())
        .collect::<Vec<_>>()
        .join(", ");
    let long_name = "x".repeat(101);
    let documents = [
        cluster_policy("a", "{tier: Middle, priority: 1001, subject: {namespaces: {}}}"),
        cluster_policy("b", "{tier: Admin, subject: {namespaces: {}, pods: {podSelector: {}}}}"),
        cluster_policy(
            "c",
            &format!("{{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}, egress: [{{action: Deny, to: [{peers}]}}]}}"),
        ),
        cluster_policy(
            "d",
            &format!("{{tier: Baseline, priority: 1, subject: {{namespaces: {{}}}}, egress: [{rules}]}}"),
        ),
        cluster_policy(
            "e",
            &format!(
                "{{tier: Admin, priority: 1, subject: {{pods: {{namespaceSelector: {{}}}}}}, ingress: [{{name: {long_name}, action: Allow, from: []}}, {{action: Accept, from: [{{networks: [10.0.0.0/8]}}]}}]}}"
            ),
        ),
        cluster_policy(
            "f",
            "{tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{action: Accept, to: [{networks: [10.0.0.0/8]}], protocols: [{destinationNamedPort: web}]}, {action: Deny, to: [{namespaces: {}, nodes: {}}]}, {action: Pass, to: [{}], protocols: [{tcp: {destinationPort: {range: {start: 90, end: 80}}}}, {udp: {destinationPort: {number: 0}}}, {tcp: {}}, {tcp: {destinationPort: {number: 1}}, udp: {destinationPort: {number: 1}}}]}]}",
        ),
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: g, namespace: default}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{action: Deny, to: [{networks: [10.0.0.0/8]}], port: 80}]}\n".to_owned(),
        cluster_policy("h", "{tier: Admin, priority: 1, subject: {namespaces: {}}}"),
        cluster_policy("h", "{tier: Admin, priority: 2, subject: {namespaces: {}}}"),
    ];
    let errors = errors("cnp.yaml", &documents.join("---\n"));
    let expected = [
        "cnp.yaml: document 1: spec.tier: unknown tier \"Middle\" (expected Admin or Baseline)",
        "cnp.yaml: document 1: spec.priority: 1001 is out of range 0-1000",
        "cnp.yaml: document 2: spec.priority: is required",
        "cnp.yaml: document 2: spec.subject: must set exactly one of namespaces or pods",
        "cnp.yaml: document 3: spec.egress[0].to: must list 1 to 25 peers, not 26",
        "cnp.yaml: document 4: spec.egress: at most 25 rules, not 26",
        "cnp.yaml: document 5: spec.subject.pods.podSelector: is required",
        "cnp.yaml: document 5: spec.ingress[0].name: is longer than 100 characters",
        "cnp.yaml: document 5: spec.ingress[0].action: unknown action \"Allow\" (expected Accept, Deny or Pass)",
        "cnp.yaml: document 5: spec.ingress[0].from: must list 1 to 25 peers, not 0",
        "cnp.yaml: document 5: spec.ingress[1].from[0].networks: an ingress peer selects namespaces or pods only",
        "cnp.yaml: document 6: spec.egress[0].protocols[0].destinationNamedPort: a rule with networks, nodes or domainNames peers cannot use named ports (those peers have none)",
        "cnp.yaml: document 6: spec.egress[1].to[0]: a peer must set exactly one field, not namespaces and nodes",
        "cnp.yaml: document 6: spec.egress[2].to[0]: a peer must set exactly one of namespaces, pods, nodes or networks",
        "cnp.yaml: document 6: spec.egress[2].protocols[0].tcp.destinationPort.range: start (90) must be less than end (80)",
        "cnp.yaml: document 6: spec.egress[2].protocols[1].udp.destinationPort.number: 0 is out of range 1-65535",
        "cnp.yaml: document 6: spec.egress[2].protocols[2].tcp.destinationPort: is required",
        "cnp.yaml: document 6: spec.egress[2].protocols[3]: must set exactly one of tcp, udp, sctp or destinationNamedPort (found tcp, udp)",
        "cnp.yaml: document 7: spec.egress[0].port: unknown field of a ClusterNetworkPolicy (misspelt?)",
        "cnp.yaml: document 9: metadata.name: duplicate ClusterNetworkPolicy h (first defined at cnp.yaml: document 8)",
    ];
    for line in expected {
        assert!(
            errors.iter().any(|error| error == line),
            "missing {line:?} in\n{}",
            errors.join("\n")
        );
    }
    // A cluster-scoped policy has no namespace.
    let namespaced = cluster_policy(
        "ns",
        "{tier: Admin, priority: 1, subject: {namespaces: {}}}",
    )
    .replace(
        "metadata: {name: ns}",
        "metadata: {name: ns, namespace: default}",
    );
    assert_eq!(
        self::errors("ns.yaml", &namespaced),
        [
            "ns.yaml: document 1: metadata.namespace: a ClusterNetworkPolicy is cluster-scoped: it has no namespace"
        ]
    );
}

#[test]
fn cluster_network_policy_peers_fail_closed() {
    use microseg::policy::{RuleAction, Tier};
    let text = cluster_policy(
        "fc",
        "{tier: Admin, priority: 3, subject: {namespaces: {}}, egress: [{action: Accept, to: [{domainNames: [example.com]}, {networks: [10.0.0.0/8]}]}, {action: Pass, to: [{domainNames: [example.com]}], protocols: [{tcp: {destinationPort: {number: 80}}}]}]}",
    );
    let set = load("fc.yaml", &text).expect("loads");
    let policy = &set.cluster_policies[0];
    assert_eq!((policy.tier, policy.priority), (Tier::Admin, 3));
    // Accept: the unreadable peer matches nothing, the others still match.
    let accept = &policy.egress[0];
    assert_eq!(accept.action, RuleAction::Accept);
    assert_eq!(accept.peers.as_ref().map(Vec::len), Some(1));
    assert!(accept.fail_closed.is_some());
    // Pass (or Deny): the whole rule denies everything.
    let pass = &policy.egress[1];
    assert_eq!(pass.action, RuleAction::Deny);
    assert_eq!((pass.peers.clone(), pass.ports.clone()), (None, None));
    assert!(pass.fail_closed.as_deref().unwrap().contains("domainNames"));

    // From the API server a peer with only fields this version does not know fails
    // closed rather than failing the whole set.
    let value = serde_json::json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "newer"},
        "spec": {"tier": "Baseline", "priority": 0, "subject": {"namespaces": {}},
                 "ingress": [{"action": "Pass", "from": [{"futurePeer": {}}]}]}
    });
    let mut builder = PolicySetBuilder::new();
    builder.add_api_server_document(&microseg::policy::Source::memory("api"), &value);
    let set = builder.finish().expect("an API server object loads");
    let rule = &set.cluster_policies[0].ingress[0];
    assert_eq!(
        (rule.action, rule.peers.is_none()),
        (RuleAction::Deny, true)
    );
    // The same object in a file is refused, naming the field.
    let mut builder = PolicySetBuilder::new();
    builder.add_document(&microseg::policy::Source::memory("file"), &value);
    let errors = builder.finish().expect_err("refused");
    assert!(
        errors
            .to_string()
            .contains("spec.ingress[0].from[0].futurePeer"),
        "{errors}"
    );
}

#[test]
fn cluster_policies_sort_into_evaluation_order_and_nodes_load() {
    let text = [
        cluster_policy("b-baseline", "{tier: Baseline, priority: 0, subject: {namespaces: {}}}"),
        cluster_policy("z-admin", "{tier: Admin, priority: 5, subject: {namespaces: {}}}"),
        cluster_policy("a-admin", "{tier: Admin, priority: 5, subject: {namespaces: {}}}"),
        cluster_policy("first", "{tier: Admin, priority: 0, subject: {namespaces: {}}}"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {zone: a}}\nstatus: {addresses: [{type: InternalIP, address: 172.18.0.2}, {type: Hostname, address: n1}, {type: ExternalIP, address: \"2001:db8::2\"}]}\n".to_owned(),
    ]
    .join("---\n");
    let set = load("order.yaml", &text).expect("loads");
    let names: Vec<&str> = set
        .cluster_policies
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["first", "a-admin", "z-admin", "b-baseline"]);
    assert_eq!(set.nodes.len(), 1);
    assert_eq!(
        set.nodes[0].addresses,
        [
            "172.18.0.2".parse::<std::net::IpAddr>().unwrap(),
            "2001:db8::2".parse().unwrap()
        ]
    );
}
