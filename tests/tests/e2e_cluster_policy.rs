//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) end to end: hosts in
//! network namespaces on a bridge, the real agent reading the policies from its
//! watched directory and enforcing on the hosts' node-side veths (TC only, or XDP and
//! TC), real TCP and UDP sockets over IPv4 and IPv6.
//!
//! - An Admin-tier Deny beats a NetworkPolicy that allows the flow; an Admin Pass
//!   leaves the flow to the NetworkPolicies, which allow or deny it.
//! - A Baseline-tier Deny applies where no NetworkPolicy selects the workload, and a
//!   NetworkPolicy selecting it overrides the baseline.
//! - An Admin Accept covers the replies (TCP data both ways, a UDP request and its
//!   reply) though the subject's egress to the client is denied by an Admin Deny.
//! - Every connection between the hosts (three TCP and two UDP ports, both families)
//!   completes exactly when both the table below and the reference evaluator say so.
//! - After SIGKILL the pinned programs keep enforcing; after a restart every
//!   connection is judged as before.
//! - A deny event names the ClusterNetworkPolicy that decided.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use microseg::policy::{Flow, PolicySet, Protocol, evaluate, load_paths};
use microseg_tests::{
    lab::Lab,
    topology::{EchoServers, PROBE_TIMEOUT, tcp_exchange, udp_exchange},
};
use serde_json::{Value, json};

const HOSTS: [(&str, &str); 5] = [
    ("dev/shell", "10.80.0.11"),
    ("ops/tool", "10.80.0.12"),
    ("secure/vault", "10.80.0.21"),
    ("open/plain", "10.80.0.31"),
    ("open/served", "10.80.0.32"),
];

const INVENTORY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: dev}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops}
---
apiVersion: v1
kind: Namespace
metadata: {name: secure}
---
apiVersion: v1
kind: Namespace
metadata: {name: open}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: shell, namespace: dev, labels: {app: shell}}
spec: {addresses: [10.80.0.11, "fd80::11"]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: tool, namespace: ops, labels: {app: tool}}
spec: {addresses: [10.80.0.12, "fd80::12"]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: vault, namespace: secure, labels: {app: vault}}
spec: {addresses: [10.80.0.21, "fd80::21"]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: plain, namespace: open, labels: {app: plain}}
spec: {addresses: [10.80.0.31, "fd80::31"]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: served, namespace: open, labels: {app: served}}
spec: {addresses: [10.80.0.32, "fd80::32"]}
"#;

/// The Admin tier around `secure`, the Baseline tier on `open`, and the namespaces'
/// NetworkPolicies.
const POLICIES: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: secure-zone}
spec:
  tier: Admin
  priority: 10
  subject:
    namespaces: {matchLabels: {kubernetes.io/metadata.name: secure}}
  ingress:
    - name: accept-dev-service
      action: Accept
      from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: dev}}}]
      protocols:
        - tcp: {destinationPort: {number: 8080}}
        - tcp: {destinationPort: {number: 9000}}
        - udp: {destinationPort: {number: 53}}
    - name: pass-ops
      action: Pass
      from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: ops}}}]
    - name: deny-dev
      action: Deny
      from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: dev}}}]
  egress:
    - name: deny-to-dev
      action: Deny
      to: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: dev}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: open-default-deny}
spec:
  tier: Baseline
  priority: 10
  subject:
    namespaces: {matchLabels: {kubernetes.io/metadata.name: open}}
  ingress:
    - name: deny-all-ingress
      action: Deny
      from: [{namespaces: {}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: vault-ingress, namespace: secure}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}
      ports: [{protocol: TCP, port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: served-ingress, namespace: open}
spec:
  podSelector: {matchLabels: {app: served}}
  policyTypes: [Ingress]
  ingress:
    - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}}]
      ports: [{protocol: TCP, port: 80}]
"#;

/// NetworkPolicies in [`POLICIES`] (what `status` counts as `policies`).
const NETWORK_POLICIES: u64 = 2;

const TCP_PORTS: [u16; 3] = [80, 81, 8080];

/// The vault's port for the connections held across the restart (Admin Accept from
/// dev, as 8080; the number in [`POLICIES`]), served by [`hold_connections`].
const HELD_PORT: u16 = 9000;
const UDP_PORTS: [u16; 2] = [53, 54];

/// What the API's semantics say, written out by hand (source, destination,
/// protocol, port, allowed, why); both families. The reference evaluator must agree,
/// and so must the real connections.
#[rustfmt::skip]
const SEMANTICS: &[(&str, &str, Protocol, u16, bool, &str)] = &[
    ("dev/shell", "secure/vault", Protocol::Tcp, 80, false,
        "Admin Deny beats the NetworkPolicy's allow"),
    ("dev/shell", "secure/vault", Protocol::Tcp, 8080, true,
        "Admin Accept; the reply passes the subject's Admin egress Deny"),
    ("dev/shell", "secure/vault", Protocol::Udp, 53, true,
        "Admin Accept; the UDP reply too"),
    ("dev/shell", "secure/vault", Protocol::Udp, 54, false,
        "Admin Deny"),
    ("ops/tool", "secure/vault", Protocol::Tcp, 80, true,
        "Admin Pass, the NetworkPolicy allows"),
    ("ops/tool", "secure/vault", Protocol::Tcp, 81, false,
        "Admin Pass, the NetworkPolicy isolates"),
    ("ops/tool", "secure/vault", Protocol::Udp, 53, false,
        "Admin Pass, the NetworkPolicy isolates"),
    ("secure/vault", "dev/shell", Protocol::Tcp, 8080, false,
        "Admin egress Deny"),
    ("secure/vault", "ops/tool", Protocol::Tcp, 80, true,
        "no rule and no NetworkPolicy on either side"),
    ("dev/shell", "open/plain", Protocol::Tcp, 80, false,
        "Baseline Deny, no NetworkPolicy selects plain"),
    ("ops/tool", "open/plain", Protocol::Udp, 53, false,
        "Baseline Deny"),
    ("secure/vault", "open/plain", Protocol::Tcp, 8080, false,
        "Baseline Deny"),
    ("dev/shell", "open/served", Protocol::Tcp, 80, true,
        "the NetworkPolicy overrides the Baseline"),
    ("dev/shell", "open/served", Protocol::Tcp, 81, false,
        "only what the NetworkPolicy allows"),
    ("ops/tool", "open/served", Protocol::Tcp, 80, false,
        "only what the NetworkPolicy allows"),
    ("open/plain", "dev/shell", Protocol::Tcp, 80, true,
        "the Baseline covers ingress only"),
    ("open/plain", "open/served", Protocol::Udp, 53, false,
        "the NetworkPolicy isolates served"),
    ("dev/shell", "secure/vault", Protocol::Tcp, HELD_PORT, true,
        "Admin Accept (the connections held across the restart)"),
];

/// The lab, with echo servers on every probed port of every host, the inventory and
/// policies in the agent's watched directory; no agent yet.
fn lab() -> (Lab, Vec<EchoServers>, PolicySet) {
    let lab = Lab::new(&HOSTS);
    lab.wait_reachable();
    let ports: Vec<u16> = TCP_PORTS.iter().chain(&UDP_PORTS).copied().collect();
    let servers = lab
        .hosts
        .iter()
        .map(|host| EchoServers::start(&host.ns, &ports))
        .collect();
    let inventory = lab.write("policies/inventory.yaml", INVENTORY);
    let policies = lab.write("policies/policies.yaml", POLICIES);
    let set = load_paths(&[inventory, policies]).expect("the test's policies are valid");
    assert_eq!(set.cluster_policies.len(), 2);
    (lab, servers, set)
}

fn status(lab: &Lab) -> Value {
    serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status json")
}

/// Waits until the agent enforces the policies on every host's interface, each bound
/// to its workload.
fn wait_enforcing(lab: &Lab) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = status(lab);
        let interfaces = status["interfaces"].as_array().cloned().unwrap_or_default();
        let bound = lab.hosts.iter().all(|host| {
            interfaces.iter().any(|i| {
                i["name"] == host.node_if.as_str()
                    && i["enforcing"] == true
                    && i["workload"] == host.name.as_str()
            })
        });
        if status["policies"] == NETWORK_POLICIES && status["healthy"] == true && bound {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not enforce on every interface: {status:#}\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The addresses of `name` (IPv4, IPv6).
fn addresses(lab: &Lab, name: &str) -> [(IpAddr, &'static str); 2] {
    let host = lab.host(name);
    [(host.address, "IPv4"), (host.address6, "IPv6")]
}

/// The hand-written table holds in the reference evaluator (both families): the
/// matrix below checks the kernel against the evaluator, so this is what makes the
/// matrix prove the semantics.
fn assert_evaluator_meets_the_semantics(lab: &Lab, set: &PolicySet) {
    let mut wrong = Vec::new();
    for (src, dst, protocol, port, allowed, why) in SEMANTICS {
        for family in 0..2 {
            let flow = Flow {
                src: addresses(lab, src)[family].0,
                dst: addresses(lab, dst)[family].0,
                protocol: *protocol,
                port: *port,
            };
            let verdict = evaluate(set, &flow);
            if verdict.allowed != *allowed {
                wrong.push(format!(
                    "{src} -> {dst} {flow}: expected allowed={allowed} ({why}), evaluator says {} [{} | {}]",
                    verdict.allowed, verdict.ingress.explanation, verdict.egress.explanation
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

/// Every pair of hosts on every port, compared with the reference evaluator (see
/// [`Lab::check_matrix`]).
fn check_matrix(lab: &Lab, set: &PolicySet, when: &str) -> (usize, usize) {
    lab.check_matrix(set, &TCP_PORTS, &UDP_PORTS, when)
}

/// A few flows of the table, probed directly (no agent running, or just restarted).
fn check_some_flows(lab: &Lab, when: &str) {
    for (src, dst, protocol, port, allowed, why) in SEMANTICS.iter().step_by(3) {
        for (dst_address, family) in addresses(lab, dst) {
            let ns = &lab.host(src).ns;
            let completed = match protocol {
                Protocol::Tcp => tcp_exchange(ns, dst_address, *port),
                _ => udp_exchange(ns, dst_address, *port),
            };
            assert_eq!(
                completed, *allowed,
                "{when}: {src} -> {dst} {protocol:?} {port} ({family}): {why}"
            );
        }
    }
}

/// The agent's deny events (JSON), newest last.
fn deny_events(lab: &Lab) -> Vec<Value> {
    lab.cli_ok(&[
        "events",
        "--verdict",
        "deny",
        "-o",
        "json",
        "--last",
        "2000",
    ])
    .lines()
    .map(|line| serde_json::from_str(line).expect("event json"))
    .collect()
}

/// The newest deny event of a TCP flow from `src` to `dst:port`, waiting for it.
fn deny_event(lab: &Lab, src: IpAddr, dst: IpAddr, port: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = deny_events(lab).into_iter().rev().find(|event| {
            event["IP"]["source"] == src.to_string().as_str()
                && event["IP"]["destination"] == dst.to_string().as_str()
                && event["l4"]["TCP"]["destination_port"] == port
        });
        if let Some(event) = found {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no deny event for {src} -> {dst}:{port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The names of the policies an event says denied it on ingress.
fn denied_by(event: &Value) -> Vec<String> {
    event["ingress_denied_by"]
        .as_array()
        .unwrap_or_else(|| panic!("no ingress_denied_by in {event:#}"))
        .iter()
        .filter_map(|policy| policy["name"].as_str().map(str::to_owned))
        .collect()
}

/// Deny events name the ClusterNetworkPolicy (Admin and Baseline) that decided, or
/// the NetworkPolicy after a Pass.
fn check_deny_events(lab: &Lab) {
    let shell = lab.host("dev/shell");
    let tool = lab.host("ops/tool");
    let vault = lab.host("secure/vault").address;
    let plain = lab.host("open/plain").address;
    assert!(!tcp_exchange(&shell.ns, vault, 80));
    assert!(!tcp_exchange(&shell.ns, plain, 80));
    assert!(!tcp_exchange(&tool.ns, vault, 81));

    let admin = deny_event(lab, shell.address, vault, 80);
    println!("an Admin-tier deny event: {admin}");
    // An explicit Deny rule (Hubble: POLICY_DENY), not a default deny (POLICY_DENIED).
    assert_eq!(admin["drop_reason_desc"], "POLICY_DENY", "{admin:#}");
    assert_eq!(admin["traffic_direction"], "INGRESS", "{admin:#}");
    assert_eq!(admin["source"]["namespace"], "dev", "{admin:#}");
    assert_eq!(admin["destination"]["pod_name"], "vault", "{admin:#}");
    assert_eq!(denied_by(&admin), ["secure-zone"], "{admin:#}");
    assert!(admin["rule_id"].as_u64().is_some(), "{admin:#}");
    // The deciding rule, as `check` names it: kind, tier, priority, rule, action.
    let policy = &admin["ingress_denied_by"][0];
    assert_eq!(policy["kind"], "ClusterNetworkPolicy", "{admin:#}");
    assert_eq!(policy["tier"], "Admin", "{admin:#}");
    assert_eq!(policy["priority"], 10, "{admin:#}");
    assert_eq!(policy["rule"], 2, "{admin:#}");
    assert_eq!(policy["rule_name"], "deny-dev", "{admin:#}");
    assert_eq!(policy["action"], "Deny", "{admin:#}");

    let baseline = deny_event(lab, shell.address, plain, 80);
    println!("a Baseline-tier deny event: {baseline}");
    assert_eq!(baseline["drop_reason_desc"], "POLICY_DENY", "{baseline:#}");
    assert_eq!(denied_by(&baseline), ["open-default-deny"], "{baseline:#}");
    assert!(baseline["rule_id"].as_u64().is_some(), "{baseline:#}");
    let policy = &baseline["ingress_denied_by"][0];
    assert_eq!(
        (&policy["kind"], &policy["tier"], &policy["rule_name"]),
        (
            &json!("ClusterNetworkPolicy"),
            &json!("Baseline"),
            &json!("deny-all-ingress")
        ),
        "{baseline:#}"
    );

    // Passed on by the Admin tier, denied by the NetworkPolicy's isolation.
    let passed = deny_event(lab, tool.address, vault, 81);
    println!("a deny event after an Admin Pass: {passed}");
    assert_eq!(passed["drop_reason_desc"], "POLICY_DENIED", "{passed:#}");
    assert_eq!(denied_by(&passed), ["vault-ingress"], "{passed:#}");
    assert_eq!(
        passed["ingress_denied_by"][0]["kind"], "NetworkPolicy",
        "{passed:#}"
    );
}

/// Connections from dev/shell to the vault's [`HELD_PORT`] (Admin Accept), IPv4
/// and IPv6, each exchanging a message every 200 ms until `stop`: (exchanges,
/// failures).
fn hold_connections(lab: &Lab, stop: &AtomicBool) -> (u32, Vec<String>) {
    let vault = lab.host("secure/vault");
    let listener = vault
        .ns
        .run_in(|| std::net::TcpListener::bind(("::", HELD_PORT)).expect("binding the held port"));
    // One echo thread per connection, until the client closes it.
    std::thread::spawn(move || {
        for _ in 0..2 {
            let Ok((mut connection, _)) = listener.accept() else {
                return;
            };
            std::thread::spawn(move || {
                let mut buffer = [0u8; 64];
                while let Ok(n) = connection.read(&mut buffer) {
                    if n == 0 || connection.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut streams: Vec<TcpStream> = [vault.address, vault.address6]
        .into_iter()
        .map(|address| {
            lab.host("dev/shell").ns.run_in(|| {
                TcpStream::connect_timeout(&SocketAddr::new(address, HELD_PORT), PROBE_TIMEOUT)
                    .expect("connecting to the vault's held port")
            })
        })
        .collect();
    let (mut exchanges, mut failures) = (0, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        for stream in &mut streams {
            stream.set_read_timeout(Some(Duration::from_secs(1))).ok();
            let mut echo = [0u8; 8];
            let outcome = stream
                .write_all(b"held-con")
                .and_then(|()| stream.read_exact(&mut echo));
            match outcome {
                Ok(()) if &echo == b"held-con" => exchanges += 1,
                other => failures.push(format!("{:?}: {other:?}", stream.peer_addr())),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    (exchanges, failures)
}

fn cluster_policies_are_enforced_across_a_restart(mode: &str) {
    let started = Instant::now();
    let (lab, _servers, set) = lab();
    assert_evaluator_meets_the_semantics(&lab, &set);
    lab.start_agent_attached(&[], Some(mode));
    let first = wait_enforcing(&lab);
    assert_eq!(
        first["directoryObjects"], 13,
        "4 namespaces, 5 workloads, 2 ClusterNetworkPolicies, 2 NetworkPolicies: {first:#}"
    );
    assert_eq!(
        (&first["clusterPolicies"], &first["policies"]),
        (&json!(2), &json!(2)),
        "{first:#}"
    );
    let (allowed, denied) = check_matrix(&lab, &set, &format!("{mode}: first start"));
    println!("{mode}: {allowed} allowed and {denied} denied connections as the API says");
    check_deny_events(&lab);

    // SIGKILL: the pinned programs and maps keep enforcing with no agent, and
    // connections an Admin Accept let in keep flowing through the kill and restart.
    let stop = AtomicBool::new(false);
    let (exchanges, failures) = std::thread::scope(|scope| {
        let held = scope.spawn(|| hold_connections(&lab, &stop));
        std::thread::sleep(Duration::from_millis(300));
        lab.kill_agent();
        check_some_flows(&lab, &format!("{mode}: no agent after kill -9"));
        lab.start_agent_attached(&[], Some(mode));
        wait_enforcing(&lab);
        stop.store(true, Ordering::Relaxed);
        held.join().expect("held connections")
    });
    assert!(
        failures.is_empty() && exchanges > 4,
        "{mode}: established connections across kill -9 and restart: {exchanges} exchanges, failures {failures:?}"
    );
    check_matrix(&lab, &set, &format!("{mode}: after kill -9 and restart"));
    println!(
        "{mode}: the same after kill -9 and a restart; {exchanges} exchanges on the held connections; {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn tc_cluster_network_policies_hold_across_a_restart() {
    if microseg_tests::kernel_available("tc_cluster_network_policies_hold_across_a_restart") {
        cluster_policies_are_enforced_across_a_restart("tc");
    }
}

#[test]
fn xdp_cluster_network_policies_hold_across_a_restart() {
    if microseg_tests::kernel_available("xdp_cluster_network_policies_hold_across_a_restart") {
        cluster_policies_are_enforced_across_a_restart("xdp");
    }
}
