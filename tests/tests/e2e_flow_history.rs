//! The flow history and rule hit counters end to end: hosts in network namespaces,
//! the real agent with `--trace-allowed`, real TCP and UDP sockets over IPv4 and IPv6,
//! TC and XDP + TC attachment.
//!
//! - Every allowed connection is one FORWARDED flow naming the rule that allowed it
//!   (`ingress_allowed_by`), every refused one a DROPPED flow; replies are not flows.
//! - The agent filters the history (`microseg events` filters, applied server-side),
//!   and `--file` reads the event log offline with the same filters.
//! - Each rule's connections equal the flows it allowed; its packets count the
//!   connections' data and replies; the default deny counts the refused packets.
//! - `rule-hits --unused-since T` names exactly the rule nothing used after T.
//! - After `kill -9` and a restart the history is read back from the event log and
//!   the counters start again from zero.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use microseg_tests::{
    lab::Lab,
    topology::{EchoServers, tcp_exchange, udp_exchange},
};
use serde_json::Value;

const HOSTS: [(&str, &str); 3] = [
    ("prod/web", "10.83.0.11"),
    ("prod/db", "10.83.0.21"),
    ("prod/other", "10.83.0.31"),
];

const POLICY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: web, namespace: prod, labels: {app: web}}
spec: {addresses: [10.83.0.11, "fd80::11"]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: db, namespace: prod, labels: {app: db}}
spec: {addresses: [10.83.0.21, "fd80::21"]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: other, namespace: prod, labels: {app: other}}
spec: {addresses: [10.83.0.31, "fd80::31"]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-ingress, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{protocol: TCP, port: 5432}]
    - from: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{protocol: UDP, port: 5433}]
    - from: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{protocol: TCP, port: 6000}]
"#;

/// Exchanges per (protocol, family): each is one connection.
const ROUNDS: usize = 3;

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON flow"))
        .collect()
}

fn rule_hits(lab: &Lab) -> Vec<Value> {
    let report: Value =
        serde_json::from_str(&lab.cli_ok(&["rule-hits", "-o", "json"])).expect("rule-hits json");
    report["rules"].as_array().cloned().expect("rules")
}

fn rule(hits: &[Value], index: u64) -> Value {
    hits.iter()
        .find(|r| r["kind"] == "NetworkPolicy" && r["name"] == "db-ingress" && r["rule"] == index)
        .cloned()
        .unwrap_or_else(|| panic!("no record of db-ingress rule {index}: {hits:#?}"))
}

fn default_deny(hits: &[Value], workload: &str) -> Value {
    hits.iter()
        .find(|r| {
            r["kind"] == "DefaultDeny" && r["workload"] == workload && r["direction"] == "ingress"
        })
        .cloned()
        .unwrap_or_else(|| panic!("no default deny record of {workload}: {hits:#?}"))
}

/// Waits until the agent enforces on every host's interface.
fn wait_enforcing(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status: Value =
            serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status");
        let interfaces = status["interfaces"].as_array().cloned().unwrap_or_default();
        let bound = lab.hosts.iter().all(|host| {
            interfaces
                .iter()
                .any(|i| i["name"] == host.node_if.as_str() && i["enforcing"] == true)
        });
        if status["policies"] == 1 && status["healthy"] == true && bound {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not enforce: {status:#}\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Flows as the agent serves them for these `events` arguments.
fn flows(lab: &Lab, filter: &[&str]) -> Vec<Value> {
    let mut args = vec!["events", "-o", "json", "--last", "10000"];
    args.extend_from_slice(filter);
    json_lines(&lab.cli_ok(&args))
}

/// Waits until the flows for `filter` number at least `count` (events arrive
/// asynchronously from the ring buffer).
fn wait_flows(lab: &Lab, filter: &[&str], count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = flows(lab, filter);
        if found.len() >= count || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn history_and_hits(mode: &str) {
    let lab = Lab::new(&HOSTS);
    lab.wait_reachable();
    let servers: Vec<EchoServers> = lab
        .hosts
        .iter()
        .map(|host| EchoServers::start(&host.ns, &[5432, 5433, 6000]))
        .collect();
    lab.write("policies/policy.yaml", POLICY);
    lab.start_agent_attached(&["--trace-allowed"], Some(mode));
    wait_enforcing(&lab);
    // Rules counted since the agent's start; nothing ran yet.
    std::thread::sleep(Duration::from_millis(1100));
    let before_traffic = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    std::thread::sleep(Duration::from_millis(1100));

    let web = lab.host("prod/web");
    let db = lab.host("prod/db");
    let other = lab.host("prod/other");
    let families: [IpAddr; 2] = [db.address, db.address6];
    for &address in &families {
        for _ in 0..ROUNDS {
            assert!(tcp_exchange(&web.ns, address, 5432), "web -> db TCP 5432");
            assert!(udp_exchange(&web.ns, address, 5433), "web -> db UDP 5433");
        }
        assert!(
            !tcp_exchange(&other.ns, address, 5432),
            "other -> db denied"
        );
    }
    let connections = 2 * ROUNDS * families.len();

    // The history: one FORWARDED flow per connection, each naming its rule.
    let allowed = wait_flows(
        &lab,
        &["--verdict", "forwarded", "--to-pod", "prod/db"],
        connections,
    );
    assert_eq!(
        allowed.len(),
        connections,
        "one allowed flow per connection, replies are not flows: {allowed:#?}"
    );
    for flow in &allowed {
        assert_eq!(flow["traffic_direction"], "INGRESS", "{flow:#}");
        assert_eq!(flow["source"]["pod_name"], "web", "{flow:#}");
        assert_eq!(
            flow["ingress_allowed_by"][0]["name"], "db-ingress",
            "{flow:#}"
        );
    }
    // Server-side filters: protocol and port, and direction of the pod.
    let udp = flows(
        &lab,
        &[
            "--verdict",
            "allowed",
            "--protocol",
            "udp",
            "--port",
            "5433",
        ],
    );
    assert_eq!(udp.len(), ROUNDS * families.len(), "{udp:#?}");
    assert!(
        flows(&lab, &["--from-pod", "prod/db"]).is_empty(),
        "db opened nothing"
    );
    let denied = wait_flows(&lab, &["--verdict", "deny", "--from-pod", "prod/other"], 2);
    assert!(
        denied.len() >= 2,
        "the refused connections are flows: {denied:#?}"
    );
    assert!(denied.iter().all(|f| f["verdict"] == "DROPPED"));
    let bad = lab.cli(&["events", "--verdict", "maybe"]);
    assert!(!bad.status.success(), "a bad filter is refused");

    // Rule hits: connections equal the flows each rule allowed; packets include data
    // and replies; the unused rule has none; the default deny counted the refusals.
    let hits = rule_hits(&lab);
    let tcp_rule = rule(&hits, 0);
    let udp_rule = rule(&hits, 1);
    let unused = rule(&hits, 2);
    assert_eq!(
        tcp_rule["connections"],
        (ROUNDS * families.len()) as u64,
        "{tcp_rule:#}"
    );
    assert_eq!(
        udp_rule["connections"],
        (ROUNDS * families.len()) as u64,
        "{udp_rule:#}"
    );
    // A TCP exchange is at least SYN, SYN-ACK, ACK, data, echo: 5 packets.
    assert!(
        tcp_rule["packets"].as_u64().unwrap() >= 5 * (ROUNDS * families.len()) as u64,
        "{tcp_rule:#}"
    );
    // A UDP exchange is the request and its reply.
    assert!(
        udp_rule["packets"].as_u64().unwrap() >= 2 * (ROUNDS * families.len()) as u64,
        "{udp_rule:#}"
    );
    assert_eq!(unused["connections"], 0, "{unused:#}");
    assert_eq!(unused["packets"], 0, "{unused:#}");
    assert!(unused["lastHit"].is_null());
    assert!(tcp_rule["lastHit"].is_string());
    let deny = default_deny(&hits, "prod/db");
    assert!(
        deny["packets"].as_u64().unwrap() >= denied.len() as u64,
        "{deny:#} after {} denied flows",
        denied.len()
    );

    // The compliance audit: only the unused rule had no hit since before the traffic.
    let audit: Value = serde_json::from_str(&lab.cli_ok(&[
        "rule-hits",
        "--unused-since",
        &before_traffic,
        "-o",
        "json",
    ]))
    .expect("audit json");
    let unused_rules: Vec<(String, u64)> = audit["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_owned(),
                r["rule"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(unused_rules, [("db-ingress".to_owned(), 2)], "{audit:#}");
    assert_eq!(audit["countedForPartOfTheWindow"], serde_json::json!([]));
    let table = lab.cli_ok(&["rule-hits", "--unused-since", &before_traffic]);
    assert!(table.contains("1 rule(s) with no hit since"), "{table}");
    println!(
        "[{mode}] microseg rule-hits:\n{}\n[{mode}] microseg rule-hits --unused-since {before_traffic}:\n{table}",
        lab.cli_ok(&["rule-hits"])
    );
    // The policy's total in `get policies -o wide`.
    let wide = lab.cli_ok(&["get", "policies", "-o", "wide"]);
    assert!(wide.contains("CONNECTIONS"), "{wide}");
    let listed: Value =
        serde_json::from_str(&lab.cli_ok(&["get", "policies", "-o", "json"])).expect("json");
    assert_eq!(
        listed[0]["connections"],
        (2 * ROUNDS * families.len()) as u64
    );

    // Offline, from the event log, with the same filters.
    let log = lab.dir.join("events.jsonl");
    let offline = json_lines(&lab.cli_ok(&[
        "events",
        "--file",
        &log.display().to_string(),
        "-o",
        "json",
        "--last",
        "10000",
        "--verdict",
        "forwarded",
        "--to-pod",
        "prod/db",
    ]));
    assert_eq!(
        offline.len(),
        connections,
        "the event log holds the same flows"
    );

    // kill -9 and a restart: the history comes back from the event log; the counters
    // start again.
    lab.kill_agent();
    lab.start_agent_attached(&["--trace-allowed"], Some(mode));
    wait_enforcing(&lab);
    let again = flows(&lab, &["--verdict", "forwarded", "--to-pod", "prod/db"]);
    assert_eq!(
        again.len(),
        connections,
        "history read back after a restart"
    );
    assert!(tcp_exchange(&web.ns, db.address, 5432));
    let after = wait_flows(
        &lab,
        &["--verdict", "forwarded", "--to-pod", "prod/db"],
        connections + 1,
    );
    assert_eq!(after.len(), connections + 1);
    let hits = rule_hits(&lab);
    assert_eq!(
        rule(&hits, 0)["connections"],
        1,
        "counted anew since the restart"
    );
    drop(servers);
}

#[test]
fn flows_and_rule_hits_with_tc() {
    history_and_hits("tc");
}

#[test]
fn flows_and_rule_hits_with_xdp() {
    history_and_hits("xdp");
}
