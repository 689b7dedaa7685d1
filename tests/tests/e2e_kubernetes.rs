//! Kubernetes mode end to end: the real agent (`--kubernetes`, a kubeconfig pointing
//! at an API server run by the test that speaks the real list/watch protocol), pods
//! as network namespaces on a bridge in the node namespace, real connections.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use microseg_tests::{
    fake_apiserver::FakeApiServer,
    lab::{Lab, lab_address6},
    topology::{EchoServers, tcp_exchange},
};
use serde_json::{Value, json};

const NODE: &str = "test-node";
const CLIENT: &str = "10.80.0.11";
const SERVER: &str = "10.80.0.21";
/// Another node's address (a network namespace that is no pod), for `nodes` peers.
const PEER_NODE: &str = "10.80.0.31";

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

fn pod(namespace: &str, name: &str, labels: Value, node: &str, ip: &str) -> Value {
    dual_stack_pod(namespace, name, labels, node, &[ip])
}

/// A pod with several addresses (`status.podIPs`, the first also `podIP`).
fn dual_stack_pod(namespace: &str, name: &str, labels: Value, node: &str, ips: &[&str]) -> Value {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
           "status": {"phase": "Running", "podIP": ips[0], "podIPs": pod_ips}})
}

/// The IPv6 address the lab gives the host with IPv4 address `v4`.
fn v6(v4: &str) -> String {
    lab_address6(v4.parse().expect("address")).to_string()
}

/// A Node (as `kubectl get node -o json` shows one, abridged).
fn node(name: &str, labels: Value, addresses: &[&str]) -> Value {
    let mut listed: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .collect();
    listed.push(json!({"type": "Hostname", "address": name}));
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": labels},
           "status": {"addresses": listed,
                      "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// An Admin-tier ClusterNetworkPolicy denying `ingress` or `egress` rules (the
/// `spec` fields given as they are).
fn admin_deny(name: &str, priority: u32, subject: Value, rules: Value) -> Value {
    let mut spec = json!({"tier": "Admin", "priority": priority, "subject": subject});
    for (direction, list) in rules.as_object().expect("rules by direction") {
        spec[direction] = list.clone();
    }
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": name}, "spec": spec})
}

/// app pods labelled `role`.
fn app_pods(role: &str) -> Value {
    json!({"pods": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "app"}},
                    "podSelector": {"matchLabels": {"role": role}}}})
}

/// app/server accepts TCP on `port` from app pods labelled role=client.
fn server_policy(port: u16) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "server-ingress", "namespace": "app"},
           "spec": {"podSelector": {"matchLabels": {"role": "server"}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                                 "ports": [{"protocol": "TCP", "port": port}]}]}})
}

struct KubeLab {
    lab: Lab,
    api: FakeApiServer,
    _servers: Vec<EchoServers>,
}

/// How a lab is set up.
#[derive(Clone, Copy)]
struct Setup {
    /// The ClusterNetworkPolicy CRD is installed in the API server.
    crd: bool,
    /// The pods have an IPv6 address too, and a third network namespace
    /// (`PEER_NODE`, no pod) stands for another node.
    dual_stack: bool,
}

/// Two pods (app/client, app/server) on this node, backed by network namespaces,
/// the server's policy allowing TCP 80, and the agent in Kubernetes mode.
fn kube_lab() -> KubeLab {
    kube_lab_with(Setup {
        crd: true,
        dual_stack: false,
    })
}

fn kube_lab_with(setup: Setup) -> KubeLab {
    let mut hosts = vec![("app/client", CLIENT), ("app/server", SERVER)];
    if setup.dual_stack {
        hosts.push(("peer-node", PEER_NODE));
    }
    let lab = Lab::new(&hosts);
    let mut servers = vec![EchoServers::start(
        &lab.host("app/server").ns,
        &[80, 81, 9999],
    )];
    if setup.dual_stack {
        servers.push(EchoServers::start(&lab.host("peer-node").ns, &[80]));
    }
    // On the node namespace's loopback, where the agent runs.
    let api = FakeApiServer::start_in(&lab.node.name);
    api.set_crd_installed(setup.crd);
    let ips = |v4: &'static str| -> Vec<String> {
        if setup.dual_stack {
            vec![v4.to_owned(), v6(v4)]
        } else {
            vec![v4.to_owned()]
        }
    };
    let (client_ips, server_ips) = (ips(CLIENT), ips(SERVER));
    fn refs(ips: &[String]) -> Vec<&str> {
        ips.iter().map(String::as_str).collect()
    }
    api.apply_all(vec![
        namespace("app"),
        dual_stack_pod(
            "app",
            "client",
            json!({"role": "client"}),
            NODE,
            &refs(&client_ips),
        ),
        dual_stack_pod(
            "app",
            "server",
            json!({"role": "server"}),
            NODE,
            &refs(&server_ips),
        ),
        // A pod of another node: a peer, never attached here.
        pod(
            "app",
            "elsewhere",
            json!({"role": "client"}),
            "other-node",
            "10.80.9.9",
        ),
        server_policy(80),
    ]);
    let kubeconfig = lab.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    lab.start_kubernetes_agent(&kubeconfig, NODE);
    let kube = KubeLab {
        lab,
        api,
        _servers: servers,
    };
    // Synced, and TC on both pods' host-side veths (found by the agent).
    let pods: Vec<&microseg_tests::lab::LabHost> = kube
        .lab
        .hosts
        .iter()
        .filter(|h| h.name.starts_with("app/"))
        .collect();
    let wanted: Vec<String> = pods
        .iter()
        .flat_map(|h| {
            [
                format!("{}.tc-ingress", h.node_if),
                format!("{}.tc-egress", h.node_if),
            ]
        })
        .collect();
    kube.wait(
        "the initial sync and attachment",
        Duration::from_secs(15),
        |s| {
            s["workloads"] == 3
                && s["policies"] == 1
                && wanted.iter().all(|w| {
                    s["attached"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == w.as_str()))
                })
        },
    );
    // Each pod's veth is bound to its pod (source validation) and healthy.
    kube.wait(
        "the pods' veths bound to their pods",
        Duration::from_secs(15),
        |s| {
            s["healthy"] == true
                && pods.iter().all(|h| {
                    s["interfaces"].as_array().is_some_and(|interfaces| {
                        interfaces.iter().any(|i| {
                            i["name"] == h.node_if.as_str()
                                && i["origin"] == "pod"
                                && i["workload"] == h.name.as_str()
                                && i["enforcing"] == true
                        })
                    })
                })
        },
    );
    kube
}

impl KubeLab {
    fn status(&self) -> Value {
        serde_json::from_str(&self.lab.cli_ok(&["status", "-o", "json"])).expect("status json")
    }

    /// Polls `microseg status` until `done`; returns how long it took.
    fn wait(&self, what: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Duration {
        let started = Instant::now();
        loop {
            let status = self.status();
            if done(&status) {
                return started.elapsed();
            }
            if started.elapsed() > limit {
                panic!(
                    "timed out waiting for {what}; status: {status:#}\nagent log:\n{}",
                    self.lab.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn generation(&self) -> u64 {
        self.status()["generation"].as_u64().expect("generation")
    }

    /// Waits for a new generation after `before`; returns the time since `since`.
    fn wait_generation_after(&self, before: u64, since: Instant, what: &str) -> Duration {
        self.wait(what, Duration::from_secs(15), |s| {
            s["generation"].as_u64().is_some_and(|g| g != before)
        });
        since.elapsed()
    }

    fn connects(&self, port: u16) -> bool {
        tcp_exchange(
            &self.lab.host("app/client").ns,
            SERVER.parse().unwrap(),
            port,
        )
    }

    /// Whether client -> `address`:`port` connects.
    fn connects_to(&self, address: &str, port: u16) -> bool {
        let address: IpAddr = address.parse().expect("address");
        tcp_exchange(&self.lab.host("app/client").ns, address, port)
    }

    /// Asserts client -> `address`:`port` is allowed or blocked.
    fn assert_reaches(&self, address: &str, port: u16, allowed: bool) {
        assert_eq!(
            self.connects_to(address, port),
            allowed,
            "client -> {address}:{port} should be {}\nstatus: {:#}\nagent log:\n{}",
            if allowed { "allowed" } else { "blocked" },
            self.status(),
            self.lab.agent_log()
        );
    }

    /// Waits until an event with `reason` was posted.
    fn wait_event(&self, reason: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.event_reasons().iter().any(|r| r == reason) {
            assert!(
                Instant::now() < deadline,
                "no {reason} event posted: {:?}",
                self.event_reasons()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until client -> server:`port` has the expected outcome (a policy change
    /// seen in the maps may still be followed by a conntrack re-judgement).
    fn assert_port(&self, port: u16, allowed: bool) {
        assert_eq!(
            self.connects(port),
            allowed,
            "client -> server:{port} should be {}\nagent log:\n{}",
            if allowed { "allowed" } else { "blocked" },
            self.lab.agent_log()
        );
    }

    fn event_reasons(&self) -> Vec<String> {
        self.api
            .posted_events()
            .iter()
            .filter_map(|e| e["reason"].as_str().map(str::to_owned))
            .collect()
    }
}

#[test]
fn a_network_policy_from_the_api_server_is_enforced_and_its_change_applies() {
    if !microseg_tests::kernel_available("kubernetes_policy_enforced") {
        return;
    }
    let kube = kube_lab();
    kube.assert_port(80, true);
    kube.assert_port(81, false);

    // MODIFIED: the policy now allows 81 instead of 80.
    let before = kube.generation();
    let sent = kube.api.apply(server_policy(81));
    let latency = kube.wait_generation_after(before, sent, "the modified policy");
    println!(
        "watch event -> enforced (MODIFIED NetworkPolicy): {:.1} ms",
        latency.as_secs_f64() * 1000.0
    );
    kube.assert_port(81, true);
    kube.assert_port(80, false);

    // The agent's status is a Kubernetes Event on this node.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !kube.event_reasons().iter().any(|r| r == "Synced") {
        assert!(
            Instant::now() < deadline,
            "no Synced event posted: {:?}",
            kube.api.posted_events()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let synced = kube
        .api
        .posted_events()
        .into_iter()
        .find(|e| e["reason"] == "Synced")
        .unwrap();
    assert_eq!(synced["regarding"]["kind"], "Node");
    assert_eq!(synced["regarding"]["name"], NODE);
    assert_eq!(synced["reportingController"], "microseg-agent");
    println!("status event: {}", synced["note"]);
}

#[test]
fn a_dropped_watch_and_an_expired_resource_version_are_survived() {
    if !microseg_tests::kernel_available("kubernetes_watch_survives") {
        return;
    }
    let kube = kube_lab();
    kube.assert_port(80, true);

    // The connection drops; a change made right then still arrives (the watch
    // resumes from the last resource version it saw).
    let before = kube.generation();
    kube.api.drop_watches();
    kube.api.apply(server_policy(81));
    kube.wait_generation_after(before, Instant::now(), "the change after a dropped watch");
    kube.assert_port(81, true);
    kube.assert_port(80, false);

    // History compacted: resuming gets 410 Gone, so the agent lists again; the
    // policy deleted meanwhile must go (the list no longer has it).
    let lists_before = list_requests(&kube.api);
    let before = kube.generation();
    kube.api.expire_history();
    kube.api.delete("NetworkPolicy", "app", "server-ingress");
    kube.wait_generation_after(before, Instant::now(), "the re-list after 410 Gone");
    kube.wait(
        "the deletion seen by the re-list",
        Duration::from_secs(10),
        |s| s["policies"] == 0,
    );
    assert!(
        list_requests(&kube.api) > lists_before,
        "no re-list after 410 Gone: {:#?}",
        kube.api.requests()
    );
    kube.assert_port(9999, true);

    // And watching goes on after the re-list.
    let before = kube.generation();
    kube.api.apply(server_policy(80));
    kube.wait_generation_after(before, Instant::now(), "a change after the re-list");
    kube.assert_port(80, true);
    kube.assert_port(81, false);
}

fn list_requests(api: &FakeApiServer) -> usize {
    api.requests()
        .iter()
        .filter(|r| {
            r.starts_with("GET /apis/networking.k8s.io/v1/networkpolicies")
                && !r.contains("watch=true")
        })
        .count()
}

#[test]
fn enforcement_continues_while_the_api_server_is_away() {
    if !microseg_tests::kernel_available("kubernetes_api_server_away") {
        return;
    }
    let kube = kube_lab();
    kube.assert_port(80, true);
    kube.assert_port(81, false);

    kube.api.stop();
    // The last known state stays enforced, and the agent keeps answering.
    let away = Instant::now();
    while away.elapsed() < Duration::from_millis(2500) {
        kube.assert_port(80, true);
        kube.assert_port(81, false);
        assert_eq!(kube.status()["policies"], 1);
    }
    // A change made while the agent could not see it applies once it is back.
    kube.api.apply(server_policy(81));
    let before = kube.generation();
    let back = Instant::now();
    kube.api.start_again();
    let caught_up = kube.wait_generation_after(before, back, "catching up after the outage");
    println!(
        "API server back -> change enforced: {:.0} ms",
        caught_up.as_secs_f64() * 1000.0
    );
    kube.assert_port(81, true);
    kube.assert_port(80, false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !kube.event_reasons().iter().any(|r| r == "Reconnected") {
        assert!(
            Instant::now() < deadline,
            "no Reconnected event: {:?}",
            kube.event_reasons()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Restarted while the API server is away: the cached view is enforced, the
    // change above included. It was journaled after the first sync's snapshot, so
    // an agent reading the snapshot alone would allow 80 and deny 81 again.
    let journal = kube.lab.dir.join("state").join("kubernetes.journal");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(&journal).map_or(0, |m| m.len()) == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing journaled in {journal:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    kube.api.stop();
    kube.lab.kill_agent();
    kube.lab
        .start_kubernetes_agent(&kube.lab.dir.join("kubeconfig"), NODE);
    kube.wait(
        "the restarted agent enforcing its cache",
        Duration::from_secs(15),
        |s| s["policies"] == 1 && s["generation"].as_u64().unwrap_or(0) > 0,
    );
    kube.assert_port(81, true);
    kube.assert_port(80, false);
}

#[test]
fn pod_churn_reaches_the_maps_quickly() {
    if !microseg_tests::kernel_available("kubernetes_pod_churn") {
        return;
    }
    const PODS: usize = 300;
    const SINGLES: usize = 40;
    let kube = kube_lab();
    // Churn pods are selected by a policy, so each one is an enforced endpoint with
    // its own policy entries, not just an identity.
    kube.api.apply_all(vec![
        namespace("churn"),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "churn-ingress", "namespace": "churn"},
               "spec": {"podSelector": {"matchLabels": {"app": "churn"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "app"}},
                                               "podSelector": {"matchLabels": {"role": "client"}}}],
                                     "ports": [{"protocol": "TCP", "port": 8080}]}]}}),
    ]);
    kube.wait("the churn policy", Duration::from_secs(10), |s| {
        s["policies"] == 2
    });
    let base = kube.status()["enforcedWorkloads"].as_u64().unwrap();
    let churn_pod = |i: usize| {
        pod(
            "churn",
            &format!("pod-{i}"),
            json!({"app": "churn"}),
            NODE,
            &format!("10.81.{}.{}", i / 250, i % 250 + 1),
        )
    };

    // A burst: hundreds of pods reported at once.
    let sent = kube.api.apply_all((0..PODS).map(churn_pod).collect());
    kube.wait("the burst of pods", Duration::from_secs(20), |s| {
        s["enforcedWorkloads"].as_u64() == Some(base + PODS as u64)
    });
    let burst_add = sent.elapsed();

    // One pod at a time, with hundreds present: each addition and removal alone.
    let mut singles = Vec::new();
    for i in 0..SINGLES {
        let expected = base + PODS as u64 + 1;
        let sent = kube.api.apply(churn_pod(PODS + i));
        kube.wait("a pod added", Duration::from_secs(10), |s| {
            s["enforcedWorkloads"].as_u64() == Some(expected)
        });
        singles.push(sent.elapsed());
        let sent = kube.api.delete("Pod", "churn", &format!("pod-{i}"));
        kube.wait("a pod deleted", Duration::from_secs(10), |s| {
            s["enforcedWorkloads"].as_u64() == Some(expected - 1)
        });
        singles.push(sent.elapsed());
    }

    // The rest leave in a burst.
    let remaining: Vec<(String, String)> = (SINGLES..PODS + SINGLES)
        .map(|i| ("churn".to_owned(), format!("pod-{i}")))
        .collect();
    let refs: Vec<(&str, &str, &str)> = remaining
        .iter()
        .map(|(ns, name)| ("Pod", ns.as_str(), name.as_str()))
        .collect();
    let sent = kube.api.delete_all(&refs);
    kube.wait("the burst of deletions", Duration::from_secs(20), |s| {
        s["enforcedWorkloads"].as_u64() == Some(base)
    });
    let burst_delete = sent.elapsed();

    // The real pods were enforced throughout.
    kube.assert_port(80, true);
    kube.assert_port(81, false);

    singles.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| ms(singles[((singles.len() as f64 - 1.0) * q).round() as usize]);
    let last_apply = kube.status()["lastApplyMs"].as_f64().unwrap_or_default();
    // What one poll costs (a CLI process and an API round trip): the resolution.
    let polls = Instant::now();
    for _ in 0..20 {
        kube.status();
    }
    let poll_ms = ms(polls.elapsed()) / 20.0;
    println!(
        "pod churn, watch event -> enforced (status polled every ~2 ms plus a CLI round trip):\n  \
         {PODS} pods added in one burst: {:.0} ms; removed in one burst: {:.0} ms\n  \
         single pod add/delete with {PODS} present ({} events): p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms\n  \
         last apply (validate+compile+diff+switch) inside the agent: {last_apply:.1} ms; one status poll: {poll_ms:.1} ms",
        ms(burst_add),
        ms(burst_delete),
        singles.len(),
        p(0.5),
        p(0.95),
        p(1.0),
    );
}

/// Admin-tier Deny from the API server beats a NetworkPolicy allowing the same
/// traffic, for a pod peer and for a `nodes` peer (a Node's InternalIPs), IPv4 and
/// IPv6; deleting the ClusterNetworkPolicies restores the connections.
#[test]
fn an_admin_cluster_network_policy_deny_wins_over_network_policies_until_deleted() {
    if !microseg_tests::kernel_available("kubernetes_cluster_network_policy") {
        return;
    }
    let kube = kube_lab_with(Setup {
        crd: true,
        dual_stack: true,
    });
    let (server6, peer6) = (v6(SERVER), v6(PEER_NODE));
    let server_addresses = [SERVER, server6.as_str()];
    let peer_addresses = [PEER_NODE, peer6.as_str()];
    // The client's egress allowed to the whole lab by a NetworkPolicy, and the other
    // node as a Node object.
    kube.api.apply_all(vec![
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "client-egress", "namespace": "app"},
               "spec": {"podSelector": {"matchLabels": {"role": "client"}},
                        "policyTypes": ["Egress"],
                        "egress": [{"to": [{"ipBlock": {"cidr": "10.80.0.0/24"}},
                                           {"ipBlock": {"cidr": "fd80::/64"}}]}]}}),
        node(
            "peer-node",
            json!({"kubernetes.io/hostname": "peer-node", "role": "peer"}),
            &peer_addresses,
        ),
    ]);
    kube.wait(
        "the egress policy and the Node",
        Duration::from_secs(10),
        |s| s["policies"] == 2 && s["nodes"] == 1 && s["kubernetes"]["synced"] == true,
    );
    for address in server_addresses {
        kube.assert_reaches(address, 80, true);
        kube.assert_reaches(address, 81, false);
    }
    for address in peer_addresses {
        kube.assert_reaches(address, 80, true);
    }

    let before = kube.generation();
    let sent = kube.api.apply_all(vec![
        admin_deny(
            "deny-client-to-server",
            10,
            app_pods("server"),
            json!({"ingress": [{"name": "no-client-80", "action": "Deny",
                                "from": [app_pods("client")],
                                "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}),
        ),
        admin_deny(
            "deny-client-to-peer-nodes",
            20,
            app_pods("client"),
            json!({"egress": [{"name": "no-peer-nodes", "action": "Deny",
                               "to": [{"nodes": {"matchLabels": {"role": "peer"}}}]}]}),
        ),
    ]);
    let latency = kube.wait_generation_after(before, sent, "the cluster network policies");
    println!(
        "watch event -> enforced (ADDED ClusterNetworkPolicy): {:.1} ms",
        latency.as_secs_f64() * 1000.0
    );
    kube.wait(
        "both cluster network policies enforced",
        Duration::from_secs(10),
        |s| s["clusterPolicies"] == 2,
    );
    for address in server_addresses {
        kube.assert_reaches(address, 80, false);
        kube.assert_reaches(address, 81, false);
    }
    for address in peer_addresses {
        kube.assert_reaches(address, 80, false);
    }

    // Another NetworkPolicy allowing the client everything on the server does not
    // open what the Admin tier denies.
    let before = kube.generation();
    kube.api.apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "server-allow-all", "namespace": "app"},
        "spec": {"podSelector": {"matchLabels": {"role": "server"}},
                 "ingress": [{"from": [{"podSelector": {}}]}]}}),
    );
    kube.wait_generation_after(before, Instant::now(), "the allow-all NetworkPolicy");
    for address in server_addresses {
        kube.assert_reaches(address, 80, false);
        kube.assert_reaches(address, 81, true);
    }

    // Deleted: the NetworkPolicies decide again.
    let before = kube.generation();
    kube.api
        .delete("ClusterNetworkPolicy", "", "deny-client-to-server");
    kube.wait_generation_after(before, Instant::now(), "the deleted server deny");
    for address in server_addresses {
        kube.assert_reaches(address, 80, true);
    }
    for address in peer_addresses {
        kube.assert_reaches(address, 80, false);
    }
    let before = kube.generation();
    kube.api
        .delete("ClusterNetworkPolicy", "", "deny-client-to-peer-nodes");
    kube.wait_generation_after(before, Instant::now(), "the deleted node deny");
    kube.wait("no cluster policies", Duration::from_secs(10), |s| {
        s["clusterPolicies"] == 0
    });
    for address in peer_addresses {
        kube.assert_reaches(address, 80, true);
    }
    assert!(kube.status()["kubernetes"]["crdsAbsent"] == json!([]));
}

/// Without the ClusterNetworkPolicy CRD (the API server answers 404) the agent syncs
/// and enforces NetworkPolicies, says so once (event, log, status), and picks the
/// CRD up when it is installed; uninstalling it removes the cluster policies.
#[test]
fn without_the_cluster_network_policy_crd_network_policies_are_enforced() {
    if !microseg_tests::kernel_available("kubernetes_no_cnp_crd") {
        return;
    }
    let kube = kube_lab_with(Setup {
        crd: false,
        dual_stack: false,
    });
    kube.assert_port(80, true);
    kube.assert_port(81, false);
    let status = kube.status();
    assert_eq!(status["healthy"], true, "{status:#}");
    assert_eq!(status["kubernetes"]["synced"], true, "{status:#}");
    assert_eq!(
        status["kubernetes"]["crdsAbsent"],
        json!(["ClusterNetworkPolicy"]),
        "{status:#}"
    );
    assert!(
        status["kubernetes"]["notes"][0]
            .as_str()
            .is_some_and(|n| n.contains("not installed")),
        "{status:#}"
    );
    kube.wait_event("CRDNotInstalled");
    assert!(
        kube.api
            .requests()
            .iter()
            .any(|r| r
                .starts_with("GET /apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies")),
        "{:#?}",
        kube.api.requests()
    );

    // NetworkPolicy changes still apply.
    let before = kube.generation();
    kube.api.apply(server_policy(81));
    kube.wait_generation_after(before, Instant::now(), "the modified policy");
    kube.assert_port(81, true);
    kube.assert_port(80, false);

    // Installed later: found at the next retry, and its policies enforced.
    kube.api.set_crd_installed(true);
    kube.api.apply(admin_deny(
        "deny-client",
        1,
        app_pods("server"),
        json!({"ingress": [{"action": "Deny", "from": [app_pods("client")]}]}),
    ));
    let installed = Instant::now();
    kube.wait("the CRD picked up", Duration::from_secs(25), |s| {
        s["clusterPolicies"] == 1 && s["kubernetes"]["crdsAbsent"] == json!([])
    });
    println!(
        "CRD installed -> its policy enforced: {:.1} s",
        installed.elapsed().as_secs_f64()
    );
    kube.assert_port(81, false);
    kube.wait_event("CRDInstalled");
    // Reported once, though the list was retried meanwhile.
    let absent_events = kube
        .event_reasons()
        .iter()
        .filter(|r| *r == "CRDNotInstalled")
        .count();
    assert_eq!(absent_events, 1, "{:?}", kube.event_reasons());
    let retries = kube
        .api
        .requests()
        .iter()
        .filter(|r| {
            r.starts_with("GET /apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies")
                && !r.contains("watch=true")
        })
        .count();
    assert!(retries >= 2, "the list was not retried");
    assert_eq!(
        kube.lab.agent_log().matches("is not installed").count(),
        1,
        "{}",
        kube.lab.agent_log()
    );

    // Uninstalled: its objects are gone with it, and the NetworkPolicies decide.
    kube.api.set_crd_installed(false);
    kube.wait("the CRD gone", Duration::from_secs(10), |s| {
        s["clusterPolicies"] == 0
            && s["kubernetes"]["crdsAbsent"] == json!(["ClusterNetworkPolicy"])
    });
    kube.assert_port(81, true);
    assert_eq!(kube.status()["healthy"], true);
}

/// Whether `status` shows veth `name` as a pod interface on every hook, bound to
/// `workload` (or to none) and awaiting its pod's policy or not.
fn pod_interface_is(status: &Value, name: &str, workload: Option<&str>, awaiting: bool) -> bool {
    status["interfaces"].as_array().is_some_and(|interfaces| {
        interfaces.iter().any(|i| {
            i["name"] == name
                && i["origin"] == "pod"
                && i["enforcing"] == true
                && i["awaitingPolicy"] == awaiting
                && i["workload"].as_str() == workload
        })
    })
}

/// Drops by reason, from `microseg stats`.
fn drops_of(kube: &KubeLab, reason: &str) -> u64 {
    let stats: Value =
        serde_json::from_str(&kube.lab.cli_ok(&["stats", "-o", "json"])).expect("stats json");
    stats["drops_by_reason"][reason].as_u64().unwrap_or(0)
}

const NO_POLICY_YET: &str = "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION";

#[test]
fn a_new_pods_veth_drops_until_its_pod_is_known_across_a_restart() {
    if !microseg_tests::kernel_available("kubernetes_pod_awaiting_policy") {
        return;
    }
    const NEWCOMER: &str = "10.80.0.41";
    let kube = kube_lab_with(Setup {
        crd: true,
        dual_stack: true,
    });
    let client = kube.lab.host("app/client");
    // The client has no ingress policy: without microseg's rule for unknown pods,
    // the newcomer would reach it, and it the newcomer.
    let _client_servers = EchoServers::start(&client.ns, &[80]);
    let drops_before = drops_of(&kube, NO_POLICY_YET);

    // A pod's sandbox appears on the node before the API server reports the pod.
    let created = Instant::now();
    let newcomer = kube.lab.new_pod_host("app/newcomer", NEWCOMER);
    let _newcomer_servers = EchoServers::start(&newcomer.ns, &[80]);
    kube.wait(
        "the sandbox's veth enforced, awaiting its pod",
        Duration::from_secs(10),
        |s| pod_interface_is(s, &newcomer.node_if, None, true),
    );
    println!(
        "sandbox veth created -> enforcing (awaiting its pod): {:.0} ms",
        created.elapsed().as_secs_f64() * 1000.0
    );
    let both_ways = |allowed: bool, when: &str| {
        for (to_client, to_newcomer) in [
            (client.address, newcomer.address),
            (client.address6, newcomer.address6),
        ] {
            assert_eq!(
                tcp_exchange(&client.ns, to_newcomer, 80),
                allowed,
                "client -> newcomer {to_newcomer}:80 {when}; status: {:#}\nagent log:\n{}",
                kube.status(),
                kube.lab.agent_log()
            );
            assert_eq!(
                tcp_exchange(&newcomer.ns, to_client, 80),
                allowed,
                "newcomer -> client {to_client}:80 {when}; status: {:#}\nagent log:\n{}",
                kube.status(),
                kube.lab.agent_log()
            );
        }
    };
    both_ways(false, "before its pod is known");
    // Dropped at the newcomer's veth in both directions, counted and reported.
    let dropped = drops_of(&kube, NO_POLICY_YET) - drops_before;
    assert!(dropped >= 4, "{dropped} drops counted as {NO_POLICY_YET}");
    let events = kube.lab.cli_ok(&["events", "--last", "500", "-o", "json"]);
    for (from, to) in [
        (client.address, newcomer.address),
        (newcomer.address, client.address),
        (client.address6, newcomer.address6),
        (newcomer.address6, client.address6),
    ] {
        assert!(
            events.lines().any(|line| {
                let event: Value = serde_json::from_str(line).unwrap_or_default();
                event["drop_reason_desc"] == NO_POLICY_YET
                    && event["IP"]["source"].as_str() == Some(from.to_string().as_str())
                    // Over IPv6 the neighbour solicitation (from the global
                    // address) is what drops first.
                    && (to.is_ipv6()
                        || event["IP"]["destination"].as_str()
                            == Some(to.to_string().as_str()))
            }),
            "no {NO_POLICY_YET} event for {from} -> {to}:\n{events}"
        );
    }
    let human = kube.lab.cli_ok(&["status"]);
    assert!(
        human.contains("awaiting pod: drops"),
        "status does not show the veth awaiting its pod:\n{human}"
    );

    // The agent killed and started again: the pinned programs and bindings keep
    // dropping meanwhile, and the restarted agent binds the veth the same way.
    kube.lab.kill_agent();
    both_ways(false, "while the agent is down");
    kube.lab
        .start_kubernetes_agent(&kube.lab.dir.join("kubeconfig"), NODE);
    kube.wait("the restarted agent's sync", Duration::from_secs(15), |s| {
        s["workloads"] == 3 && pod_interface_is(s, &newcomer.node_if, None, true)
    });
    both_ways(false, "after a restart");

    // The API server reports the pod: bound to it, judged by policy.
    let reported = Instant::now();
    kube.api.apply(dual_stack_pod(
        "app",
        "newcomer",
        json!({"role": "client"}),
        NODE,
        &[NEWCOMER, &v6(NEWCOMER)],
    ));
    kube.wait("the veth bound to its pod", Duration::from_secs(10), |s| {
        pod_interface_is(s, &newcomer.node_if, Some("app/newcomer"), false)
    });
    println!(
        "pod reported -> its veth bound: {:.0} ms",
        reported.elapsed().as_secs_f64() * 1000.0
    );
    both_ways(true, "once its pod is known");
    // The server's policy admits role=client: the newcomer is one now.
    assert!(tcp_exchange(&newcomer.ns, SERVER.parse().unwrap(), 80));
    assert!(!tcp_exchange(&newcomer.ns, SERVER.parse().unwrap(), 81));

    // Deleted from the API server while its sandbox is still there (a pod being
    // torn down): it awaits a pod again.
    kube.api.delete("Pod", "app", "newcomer");
    kube.wait(
        "the veth awaiting a pod again",
        Duration::from_secs(10),
        |s| pod_interface_is(s, &newcomer.node_if, None, true),
    );
    both_ways(false, "after its pod was deleted");
}
