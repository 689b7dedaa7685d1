//! A simulated cluster with real agents: one network namespace per node, each with
//! its own agent (Kubernetes mode, own pin directory, state and socket) and its real
//! pods (network namespaces on the node's bridge), the nodes routed to each other
//! through a fabric namespace where the test API server listens. Thousands more pods
//! and hundreds of policies exist only as API objects on virtual nodes: every agent
//! holds them as peers, as a node of a large cluster does.
//!
//! ```text
//!   pods (netns)    pods (netns)    pods (netns)
//!       |  br0          |  br0          |  br0        <- agent per node: TC on pod veths
//!    node-1          node-2          node-3         (10.91.k.0/24, fd91:k::/64)
//!       \______________ | ______________/
//!                  fabric bridge                    (10.90.0.0/24, fd90::/64)
//!                  API server 10.90.0.254
//! ```
//!
//! [`ClusterPlan`] sets the size; [`SimCluster::start`] builds it and
//! `crate::cluster_run` drives the scenario (enforcement, churn, faults) for the
//! test (`e2e_cluster_scale`) and the benchmark (`cargo xtask bench --cluster`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    fake_apiserver::FakeApiServer,
    lab::Lab,
    netns::{NetNs, run, unique_name},
    topology::EchoServers,
};

/// The fabric's address for the API server.
pub const API_SERVER: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 254);
/// Ports the real pods serve (TCP and UDP).
pub const SERVICE_PORTS: [u16; 2] = [8080, 5432];

/// How big a cluster, and how hard to churn it.
#[derive(Clone, Debug)]
pub struct ClusterPlan {
    /// Pods and NetworkPolicies that exist only as API objects.
    pub virtual_pods: usize,
    pub virtual_policies: usize,
    /// Virtual nodes the virtual pods are spread over.
    pub virtual_nodes: usize,
    /// API changes per second during churn, and how long the fault-free churn lasts.
    pub churn_rate: u32,
    pub steady_churn: Duration,
    /// Churn around each fault (before it and after it).
    pub fault_window: Duration,
    /// How long the agent on node-2 stays dead, and the API server away.
    pub agent_down: Duration,
    pub api_outage: Duration,
}

impl ClusterPlan {
    /// The issue's default: 5,000 pods and 500 policies beyond the real ones, 50
    /// changes per second for a minute, the API server away for 30 s.
    pub fn full() -> Self {
        Self {
            virtual_pods: 5_000,
            virtual_policies: 500,
            virtual_nodes: 50,
            churn_rate: 50,
            steady_churn: Duration::from_secs(60),
            fault_window: Duration::from_secs(8),
            agent_down: Duration::from_secs(5),
            api_outage: Duration::from_secs(30),
        }
    }

    /// The version `cargo xtask test` runs (debug build, under a minute).
    pub fn small() -> Self {
        Self {
            virtual_pods: 500,
            virtual_policies: 50,
            virtual_nodes: 5,
            churn_rate: 20,
            steady_churn: Duration::from_secs(8),
            fault_window: Duration::from_secs(3),
            agent_down: Duration::from_secs(2),
            api_outage: Duration::from_secs(4),
        }
    }
}

/// A real pod: the node it runs on (1-based), namespace, name, labels and the last
/// byte of its addresses (10.91.<node>.<byte>, fd91:<node>::<byte>).
pub struct RealPod {
    pub node: usize,
    pub namespace: &'static str,
    pub name: &'static str,
    pub label: (&'static str, &'static str),
    pub byte: u8,
}

/// The guide's three tiers spread over three nodes, and a pod of another namespace
/// that no policy allows.
pub const REAL_PODS: [RealPod; 6] = [
    RealPod {
        node: 1,
        namespace: "shop",
        name: "frontend-1",
        label: ("tier", "frontend"),
        byte: 11,
    },
    RealPod {
        node: 1,
        namespace: "other",
        name: "intruder",
        label: ("app", "intruder"),
        byte: 12,
    },
    RealPod {
        node: 2,
        namespace: "shop",
        name: "api-1",
        label: ("tier", "api"),
        byte: 11,
    },
    RealPod {
        node: 2,
        namespace: "shop",
        name: "frontend-2",
        label: ("tier", "frontend"),
        byte: 12,
    },
    RealPod {
        node: 3,
        namespace: "shop",
        name: "db-1",
        label: ("tier", "db"),
        byte: 11,
    },
    RealPod {
        node: 3,
        namespace: "shop",
        name: "api-2",
        label: ("tier", "api"),
        byte: 12,
    },
];

pub const REAL_NODES: usize = 3;

impl RealPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn address(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 91, self.node as u8, self.byte))
    }

    pub fn address6(&self) -> IpAddr {
        format!("fd91:{}::{}", self.node, self.byte)
            .parse()
            .expect("address")
    }

    pub fn find(key: &str) -> &'static RealPod {
        REAL_PODS
            .iter()
            .find(|pod| pod.key() == key)
            .unwrap_or_else(|| panic!("no real pod {key}"))
    }
}

pub fn node_name(index: usize) -> String {
    format!("node-{index}")
}

pub fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

/// A running pod on `node` with `labels` and `ips` (`status.podIPs`).
pub fn pod(namespace: &str, name: &str, labels: Value, node: &str, ips: &[IpAddr]) -> Value {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
           "status": {"phase": "Running", "podIP": ips[0].to_string(), "podIPs": pod_ips}})
}

fn node_object(name: &str, address: IpAddr) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
           "status": {"addresses": [{"type": "InternalIP", "address": address.to_string()},
                                    {"type": "Hostname", "address": name}],
                      "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn network_policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec})
}

fn tier(name: &str) -> Value {
    json!({"podSelector": {"matchLabels": {"tier": name}}})
}

/// The real pods' policies: default deny both ways in `shop`, then frontend -> api
/// on 8080 and api -> db on 5432, allowed at both ends (the guide's three tiers).
pub fn real_policies() -> Vec<Value> {
    vec![
        network_policy(
            "shop",
            "default-deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
        network_policy(
            "shop",
            "frontend",
            json!({"podSelector": {"matchLabels": {"tier": "frontend"}},
                   "policyTypes": ["Egress"],
                   "egress": [{"to": [tier("api")], "ports": [{"protocol": "TCP", "port": 8080}]}]}),
        ),
        network_policy(
            "shop",
            "api",
            json!({"podSelector": {"matchLabels": {"tier": "api"}},
                   "policyTypes": ["Ingress", "Egress"],
                   "ingress": [{"from": [tier("frontend")], "ports": [{"protocol": "TCP", "port": 8080}]}],
                   "egress": [{"to": [tier("db")], "ports": [{"protocol": "TCP", "port": 5432}]}]}),
        ),
        network_policy(
            "shop",
            "db",
            json!({"podSelector": {"matchLabels": {"tier": "db"}},
                   "policyTypes": ["Ingress"],
                   "ingress": [{"from": [tier("api")], "ports": [{"protocol": "TCP", "port": 5432}]}]}),
        ),
    ]
}

/// Namespaces of the virtual pods: 100 pods each.
pub fn virtual_namespaces(plan: &ClusterPlan) -> usize {
    plan.virtual_pods.div_ceil(100).max(1)
}

/// Apps per virtual namespace (10 pods each).
const APPS: usize = 10;

/// The `index`th virtual pod: namespace `vns-<n>`, app `app-<m>`, on a virtual node,
/// addresses from 10.100.0.0/14 and fd64::/64 by `index`.
pub fn virtual_pod(plan: &ClusterPlan, index: usize, app: usize) -> Value {
    let node = format!("virtual-node-{}", index % plan.virtual_nodes.max(1));
    virtual_pod_on(plan, index, app, &node)
}

/// [`virtual_pod`] on the named node.
pub fn virtual_pod_on(plan: &ClusterPlan, index: usize, app: usize, node: &str) -> Value {
    let namespace = format!("vns-{}", index / 100 % virtual_namespaces(plan));
    let v4 = IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 100, 0, 0)) + index as u32 + 1,
    ));
    let low = index as u64 + 1;
    let v6 = IpAddr::V6(Ipv6Addr::from((0xfd64u128 << 112) | u128::from(low)));
    pod(
        &namespace,
        &format!("pod-{index}"),
        json!({"app": format!("app-{app}"), "team": format!("team-{}", app % 3)}),
        node,
        &[v4, v6],
    )
}

/// The `index`th virtual policy: in `vns-<index / 10>`, selecting `app-<index % 10>`,
/// allowing ingress from the next app of the namespace and from the same app of the
/// next namespace, each on its own port, and (every other policy) egress to the
/// namespace's DNS-like app on UDP 53.
pub fn virtual_policy(plan: &ClusterPlan, index: usize) -> Value {
    let namespaces = virtual_namespaces(plan);
    let namespace = index / APPS % namespaces;
    let app = index % APPS;
    let mut spec = json!({
        "podSelector": {"matchLabels": {"app": format!("app-{app}")}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (app + 1) % APPS)}}}],
             "ports": [{"protocol": "TCP", "port": 8000 + app}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": format!("vns-{}", (namespace + 1) % namespaces)}},
                       "podSelector": {"matchLabels": {"app": format!("app-{app}")}}}],
             "ports": [{"protocol": "TCP", "port": 9000}]},
        ],
    });
    if index.is_multiple_of(2) {
        spec["policyTypes"] = json!(["Ingress", "Egress"]);
        spec["egress"] = json!([
            {"to": [{"podSelector": {"matchLabels": {"app": "app-0"}}}],
             "ports": [{"protocol": "UDP", "port": 53}]},
            {"to": [{"podSelector": {"matchLabels": {"team": format!("team-{}", app % 3)}}}]},
        ]);
    }
    network_policy(
        &format!("vns-{namespace}"),
        &format!("policy-{}", index / APPS / namespaces * APPS + app),
        spec,
    )
}

/// Every object of the cluster at the start.
pub fn initial_objects(plan: &ClusterPlan) -> Vec<Value> {
    let mut objects = vec![namespace("shop"), namespace("other")];
    objects.extend((0..virtual_namespaces(plan)).map(|n| namespace(&format!("vns-{n}"))));
    for index in 1..=REAL_NODES {
        objects.push(node_object(
            &node_name(index),
            IpAddr::V4(Ipv4Addr::new(10, 90, 0, index as u8)),
        ));
    }
    for index in 0..plan.virtual_nodes {
        objects.push(node_object(
            &format!("virtual-node-{index}"),
            IpAddr::V4(Ipv4Addr::new(
                10,
                92,
                (index / 250) as u8,
                (index % 250 + 1) as u8,
            )),
        ));
    }
    for real in &REAL_PODS {
        objects.push(pod(
            real.namespace,
            real.name,
            json!({real.label.0: real.label.1}),
            &node_name(real.node),
            &[real.address(), real.address6()],
        ));
    }
    objects.extend(real_policies());
    objects.extend((0..plan.virtual_pods).map(|i| virtual_pod(plan, i, i / 10 % APPS)));
    objects.extend((0..plan.virtual_policies).map(|i| virtual_policy(plan, i)));
    objects
}

/// One simulated node: a [`Lab`] whose hosts are the node's real pods, routed to the
/// other nodes through its uplink.
pub struct SimNode {
    /// 1-based.
    pub index: usize,
    pub name: String,
    pub lab: Lab,
    pub kubeconfig: PathBuf,
}

impl SimNode {
    /// Starts (or restarts) the node's agent in Kubernetes mode.
    pub fn start_agent(&self) {
        self.lab
            .start_kubernetes_agent(&self.kubeconfig, &self.name);
    }

    /// The agent's status (through its API socket).
    pub fn status(&self) -> anyhow::Result<Value> {
        microseg::api::client::Client::connect(&self.lab.socket())?
            .call(&microseg::api::Request::Status)
    }
}

pub struct SimCluster {
    pub api: FakeApiServer,
    pub nodes: Vec<SimNode>,
    _servers: Vec<EchoServers>,
    /// Last: the fabric goes after the nodes' links.
    _fabric: NetNs,
}

impl SimCluster {
    /// Builds the fabric, the nodes and their real pods (with echo servers on
    /// [`SERVICE_PORTS`]), and the API server holding `objects`; agents are not
    /// started.
    pub fn build(objects: Vec<Value>) -> Self {
        let fabric = NetNs::new("mfab");
        fabric.exec(&["ip", "link", "add", "fbr0", "type", "bridge"]);
        fabric.exec(&["ip", "link", "set", "fbr0", "up"]);
        fabric.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{API_SERVER}/24"),
            "dev",
            "fbr0",
        ]);
        let mut nodes = Vec::new();
        let mut servers = Vec::new();
        for index in 1..=REAL_NODES {
            let hosts: Vec<(String, String)> = REAL_PODS
                .iter()
                .filter(|pod| pod.node == index)
                .map(|pod| (pod.key(), pod.address().to_string()))
                .collect();
            let hosts: Vec<(&str, &str)> = hosts
                .iter()
                .map(|(name, address)| (name.as_str(), address.as_str()))
                .collect();
            let lab = Lab::with_prefix6(&hosts, &format!("fd91:{index}::"));
            route_node(&fabric, &lab, index);
            for host in &lab.hosts {
                servers.push(EchoServers::start(&host.ns, &SERVICE_PORTS));
            }
            let kubeconfig = lab.dir.join("kubeconfig");
            nodes.push(SimNode {
                index,
                name: node_name(index),
                lab,
                kubeconfig,
            });
        }
        let api = FakeApiServer::start_at(&fabric.name, API_SERVER);
        api.apply_all(objects);
        for node in &nodes {
            api.write_kubeconfig(&node.kubeconfig);
        }
        Self {
            api,
            nodes,
            _servers: servers,
            _fabric: fabric,
        }
    }

    pub fn node(&self, index: usize) -> &SimNode {
        &self.nodes[index - 1]
    }

    /// The network namespace of a real pod (`namespace/name`).
    pub fn pod_ns(&self, key: &str) -> &NetNs {
        let pod = RealPod::find(key);
        &self.node(pod.node).lab.host(key).ns
    }

    /// Waits until every agent enforces the API server's state as of now; returns
    /// how long that took. Panics with the agents' logs after `limit`.
    pub fn wait_converged(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        let version = self.api.resource_version();
        loop {
            let behind: Vec<String> = self
                .nodes
                .iter()
                .filter(|node| enforced_version(node) < Some(version))
                .map(|node| node.name.clone())
                .collect();
            if behind.is_empty() {
                return started.elapsed();
            }
            if started.elapsed() > limit {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|node| {
                        format!(
                            "--- {} (status {:?}):\n{}",
                            node.name,
                            node.status().ok(),
                            tail(&node.lab.agent_log(), 40)
                        )
                    })
                    .collect();
                panic!(
                    "{} did not enforce resource version {version} within {limit:?}\n{}",
                    behind.join(", "),
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl SimCluster {
    /// Waits until every node's agent has its programs on each of its real pods'
    /// veths, bound to the pod (a restarted agent adopts its pinned links).
    pub fn wait_attached(&self, limit: Duration) {
        let started = Instant::now();
        for node in &self.nodes {
            loop {
                let status = node.status().unwrap_or_default();
                let enforcing = |pod: &RealPod| {
                    status["interfaces"].as_array().is_some_and(|interfaces| {
                        interfaces.iter().any(|interface| {
                            interface["workload"] == pod.key().as_str()
                                && interface["enforcing"] == true
                        })
                    })
                };
                if REAL_PODS
                    .iter()
                    .filter(|pod| pod.node == node.index)
                    .all(enforcing)
                {
                    break;
                }
                assert!(
                    started.elapsed() < limit,
                    "{}'s pods were not attached within {limit:?}; status: {status:#}\n{}",
                    node.name,
                    tail(&node.lab.agent_log(), 40)
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The newest API resource version a node's agent enforces, if it answers.
pub fn enforced_version(node: &SimNode) -> Option<u64> {
    node.status()
        .ok()?
        .pointer("/kubernetes/resourceVersion")?
        .as_str()?
        .parse()
        .ok()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Gives node `index` its gateway addresses on the pods' bridge, its uplink to the
/// fabric, and routes to the other nodes' pod subnets; the pods route through it.
fn route_node(fabric: &NetNs, lab: &Lab, index: usize) {
    let node = &lab.node;
    for sysctl in [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ] {
        node.exec(&["sysctl", "-qw", sysctl]);
    }
    node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("10.91.{index}.1/24"),
        "dev",
        "br0",
    ]);
    node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("fd91:{index}::1/64"),
        "dev",
        "br0",
        "nodad",
    ]);
    let (uplink, fabric_side) = (unique_name("up"), unique_name("fb"));
    run(
        "ip",
        &[
            "link",
            "add",
            &uplink,
            "netns",
            &node.name,
            "type",
            "veth",
            "peer",
            "name",
            &fabric_side,
            "netns",
            &fabric.name,
        ],
    );
    fabric.exec(&["ip", "link", "set", &fabric_side, "master", "fbr0"]);
    fabric.exec(&["ip", "link", "set", &fabric_side, "up"]);
    node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("10.90.0.{index}/24"),
        "dev",
        &uplink,
    ]);
    node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("fd90::{index}/64"),
        "dev",
        &uplink,
        "nodad",
    ]);
    node.exec(&["ip", "link", "set", &uplink, "up"]);
    for other in (1..=REAL_NODES).filter(|&other| other != index) {
        node.exec(&[
            "ip",
            "route",
            "add",
            &format!("10.91.{other}.0/24"),
            "via",
            &format!("10.90.0.{other}"),
        ]);
        node.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("fd91:{other}::/64"),
            "via",
            &format!("fd90::{other}"),
        ]);
    }
    for host in &lab.hosts {
        host.ns.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("10.91.{index}.1"),
        ]);
        host.ns.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd91:{index}::1"),
        ]);
    }
}
