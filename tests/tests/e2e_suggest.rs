//! `microseg suggest` end to end, on the seed guide's three-tier application
//! (`examples/three-tier`: ingress-nginx -> frontend:443 -> api:8080 ->
//! postgresql:5432 / redis:6379) in network namespaces with the real agent:
//!
//! 1. `production` gets a default deny (ingress and egress) and nothing else, and
//!    the agent starts with every enforced workload in audit mode;
//! 2. the guide's allowed paths run over real TCP sockets, IPv4 and IPv6 (the
//!    would-be denies pass and are reported as AUDIT events);
//! 3. `microseg suggest --namespace production` asks the agent, its YAML is applied
//!    with `microseg apply -f` and audit mode is switched off;
//! 4. every connection that ran still works (data both ways), the guide's forbidden
//!    paths are denied, and every connection between the hosts completes exactly
//!    when the reference evaluator says so under the suggested policies;
//! 5. on the probed ports, everything the suggested policies allow the guide's
//!    hand-written policies allow too: the suggestion is no wider.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use microseg::policy::{Flow, PolicySet, Protocol, evaluate, load_paths};
use microseg_tests::{
    lab::Lab,
    topology::{EchoServers, tcp_exchange},
};
use serde_json::Value;

const HOSTS: [(&str, &str); 8] = [
    ("ingress-nginx/controller", "10.80.0.10"),
    ("production/frontend-1", "10.80.0.11"),
    ("production/frontend-2", "10.80.0.12"),
    ("production/api-1", "10.80.0.21"),
    ("production/api-2", "10.80.0.22"),
    ("production/postgresql", "10.80.0.31"),
    ("production/redis", "10.80.0.32"),
    ("other/client", "10.80.0.40"),
];

/// `examples/three-tier/inventory.yaml` with the lab's addresses (both families).
const INVENTORY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: production}
---
apiVersion: v1
kind: Namespace
metadata: {name: ingress-nginx, labels: {name: ingress-nginx}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: controller, namespace: ingress-nginx, labels: {app.kubernetes.io/name: ingress-nginx}}
spec: {addresses: [10.80.0.10, "fd80::10"]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: frontend-1, namespace: production, labels: {tier: frontend, pod-template-hash: 7d9f6b}}
spec: {addresses: [10.80.0.11, "fd80::11"], ports: [{name: https, port: 443}]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: frontend-2, namespace: production, labels: {tier: frontend, pod-template-hash: 7d9f6b}}
spec: {addresses: [10.80.0.12, "fd80::12"], ports: [{name: https, port: 443}]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: api-1, namespace: production, labels: {tier: api, pod-template-hash: 5c8d4f}}
spec: {addresses: [10.80.0.21, "fd80::21"], ports: [{name: http, port: 8080}]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: api-2, namespace: production, labels: {tier: api, pod-template-hash: 5c8d4f}}
spec: {addresses: [10.80.0.22, "fd80::22"], ports: [{name: http, port: 8080}]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: postgresql, namespace: production, labels: {app: postgresql, statefulset.kubernetes.io/pod-name: postgresql-0}}
spec: {addresses: [10.80.0.31, "fd80::31"], ports: [{name: postgres, port: 5432}]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: redis, namespace: production, labels: {app: redis}}
spec: {addresses: [10.80.0.32, "fd80::32"], ports: [{name: redis, port: 6379}]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: client, namespace: other, labels: {app: client}}
spec: {addresses: [10.80.0.40, "fd80::40"]}
"#;

/// The namespace's default deny, the only policy before `suggest`.
const DEFAULT_DENY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: production}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"#;

/// The guide's allowed paths (its diagram's arrows).
const ALLOWED_PATHS: [(&str, &str, u16); 10] = [
    ("ingress-nginx/controller", "production/frontend-1", 443),
    ("ingress-nginx/controller", "production/frontend-2", 443),
    ("production/frontend-1", "production/api-1", 8080),
    ("production/frontend-1", "production/api-2", 8080),
    ("production/frontend-2", "production/api-1", 8080),
    ("production/frontend-2", "production/api-2", 8080),
    ("production/api-1", "production/postgresql", 5432),
    ("production/api-2", "production/postgresql", 5432),
    ("production/api-1", "production/redis", 6379),
    ("production/api-2", "production/redis", 6379),
];

/// Paths the guide forbids (its blocked arrows, the way back up the tiers, other
/// namespaces), each with why.
const FORBIDDEN_PATHS: [(&str, &str, u16, &str); 9] = [
    (
        "production/frontend-1",
        "production/postgresql",
        5432,
        "guide: FE1 -x DB",
    ),
    (
        "production/frontend-2",
        "production/redis",
        6379,
        "guide: FE2 -x Cache",
    ),
    (
        "production/postgresql",
        "production/frontend-1",
        443,
        "database -> frontend",
    ),
    (
        "production/postgresql",
        "production/api-1",
        8080,
        "the database opens nothing",
    ),
    (
        "production/api-1",
        "production/frontend-2",
        443,
        "no path back up the tiers",
    ),
    (
        "production/redis",
        "production/postgresql",
        5432,
        "cache -> database",
    ),
    (
        "ingress-nginx/controller",
        "production/api-1",
        8080,
        "only the frontend is exposed",
    ),
    (
        "other/client",
        "production/frontend-1",
        443,
        "only ingress-nginx reaches the frontend",
    ),
    (
        "production/frontend-1",
        "production/api-1",
        5432,
        "only the observed port",
    ),
];

const PORTS: [u16; 4] = [443, 8080, 5432, 6379];

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn status(lab: &Lab) -> Value {
    serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status json")
}

/// Waits until the agent enforces `policies` NetworkPolicies on every host's
/// interface, each bound to its workload.
fn wait_enforcing(lab: &Lab, policies: u64) {
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
        if status["policies"] == policies && status["healthy"] == true && bound {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not enforce on every interface: {status:#}\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The host's address of one family.
fn address(lab: &Lab, name: &str, v6: bool) -> IpAddr {
    let host = lab.host(name);
    if v6 { host.address6 } else { host.address }
}

/// Waits until the agent has an AUDIT event for a TCP connection to every
/// `(source, destination, port)` of `paths`, both families.
fn wait_audited(lab: &Lab, paths: &[(&str, &str, u16)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events: Vec<Value> = lab
            .cli_ok(&[
                "events",
                "--verdict",
                "audit",
                "-o",
                "json",
                "--last",
                "100000",
            ])
            .lines()
            .map(|line| serde_json::from_str(line).expect("event json"))
            .collect();
        let missing: Vec<String> = paths
            .iter()
            .flat_map(|(src, dst, port)| {
                [false, true].map(|v6| (address(lab, src, v6), address(lab, dst, v6), *port))
            })
            .filter(|(src, dst, port)| {
                !events.iter().any(|event| {
                    event["IP"]["source"] == src.to_string().as_str()
                        && event["IP"]["destination"] == dst.to_string().as_str()
                        && event["l4"]["TCP"]["destination_port"] == *port
                })
            })
            .map(|(src, dst, port)| format!("{src} -> {dst}:{port}"))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no AUDIT event for {missing:?}\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `paths` over TCP, both families; each must exchange data both ways.
fn run_paths(lab: &Lab, paths: &[(&str, &str, u16)], when: &str) {
    for (src, dst, port) in paths {
        for v6 in [false, true] {
            let to = address(lab, dst, v6);
            assert!(
                tcp_exchange(&lab.host(src).ns, to, *port),
                "{when}: {src} -> {dst} ({to}) TCP/{port} did not complete\n{}",
                lab.agent_log()
            );
        }
    }
}

/// On every ordered pair of hosts, both families, every probed port: whatever
/// `suggested` allows, `guide` allows. Returns how many flows each allows.
fn assert_no_wider(lab: &Lab, suggested: &PolicySet, guide: &PolicySet) -> (usize, usize) {
    let (mut by_suggested, mut by_guide, mut wider) = (0, 0, Vec::new());
    for src in &lab.hosts {
        for dst in lab.hosts.iter().filter(|dst| dst.name != src.name) {
            for v6 in [false, true] {
                for port in PORTS {
                    let flow = Flow {
                        src: address(lab, &src.name, v6),
                        dst: address(lab, &dst.name, v6),
                        protocol: Protocol::Tcp,
                        port,
                    };
                    let suggested_verdict = evaluate(suggested, &flow);
                    let guide_allows = evaluate(guide, &flow).allowed;
                    by_suggested += usize::from(suggested_verdict.allowed);
                    by_guide += usize::from(guide_allows);
                    if suggested_verdict.allowed && !guide_allows {
                        wider.push(format!(
                            "{} -> {} {flow}: allowed by the suggestion ({}; {}), not by the guide",
                            src.name,
                            dst.name,
                            suggested_verdict.egress.explanation,
                            suggested_verdict.ingress.explanation
                        ));
                    }
                }
            }
        }
    }
    assert!(
        wider.is_empty(),
        "the suggestion is wider than the guide:\n{}",
        wider.join("\n")
    );
    (by_suggested, by_guide)
}

/// `suggest --from-file` on the event log's lines from frontend-1, with
/// `--inventory`: the report lists the pairs allowed but not observed.
fn check_what_else_from_part_of_the_log(lab: &Lab, event_log: &Path, inventory: &Path) {
    let frontend_1 = lab.host("production/frontend-1");
    let sources = [
        frontend_1.address.to_string(),
        frontend_1.address6.to_string(),
    ];
    let log = std::fs::read_to_string(event_log).expect("the event log");
    let part: Vec<&str> = log
        .lines()
        .filter(|line| {
            let event: Value = serde_json::from_str(line).expect("event json");
            sources.iter().any(|s| event["IP"]["source"] == s.as_str())
        })
        .collect();
    let part_file = lab.write("frontend-1-events.jsonl", &part.join("\n"));
    let args = [
        "suggest",
        "-n",
        "production",
        "--from-file",
        &part_file.display().to_string(),
        "--inventory",
        &inventory.display().to_string(),
    ];
    let yaml_run = lab.cli(&args);
    println!(
        "$ microseg suggest -n production --from-file frontend-1-events.jsonl --inventory inventory.yaml\n(stderr)\n{}",
        String::from_utf8_lossy(&yaml_run.stderr)
    );
    assert!(yaml_run.status.success());
    let json: Value = serde_json::from_str(&lab.cli_ok(&[&args[..], &["-o", "json"]].concat()))
        .expect("suggest -o json");
    let report = &json["report"];
    assert_eq!(
        report["connections"], 4,
        "frontend-1 -> api-1, api-2; both families: {report:#}"
    );
    let also: Vec<(String, String, String)> = report["alsoAllowed"]
        .as_array()
        .expect("alsoAllowed")
        .iter()
        .map(|pair| {
            (
                format!(
                    "{} -> {}",
                    pair["source"].as_str().unwrap(),
                    pair["destination"].as_str().unwrap()
                ),
                format!("{}/{}", pair["protocol"].as_str().unwrap(), pair["port"]),
                pair["note"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for destination in ["production/api-1", "production/api-2"] {
        let expected = (
            format!("production/frontend-2 -> {destination}"),
            "TCP/8080".to_owned(),
            "other pods of the same workloads were observed on this port".to_owned(),
        );
        assert!(
            also.contains(&expected),
            "{expected:?} missing from {also:#?}"
        );
    }
    assert_eq!(also.len(), 2, "only frontend-2's paths: {also:#?}");
}

#[test]
fn suggested_policies_from_audited_traffic_enforce_the_three_tier_application() {
    if !microseg_tests::kernel_available(
        "suggested_policies_from_audited_traffic_enforce_the_three_tier_application",
    ) {
        return;
    }
    let lab = Lab::new(&HOSTS);
    lab.wait_reachable();
    let _servers: Vec<EchoServers> = lab
        .hosts
        .iter()
        .map(|host| EchoServers::start(&host.ns, &PORTS))
        .collect();
    let inventory = lab.write("policies/inventory.yaml", INVENTORY);
    let default_deny = lab.write("policies/default-deny.yaml", DEFAULT_DENY);

    // 1-2. Default deny in audit mode; the guide's traffic runs and is audited.
    lab.start_agent(&["--audit"]);
    wait_enforcing(&lab, 1);
    run_paths(&lab, &ALLOWED_PATHS, "audit mode");
    wait_audited(&lab, &ALLOWED_PATHS);

    // 3. Suggest, from the agent.
    let suggested = lab.cli(&["suggest", "--namespace", "production"]);
    let (yaml, report) = (
        String::from_utf8_lossy(&suggested.stdout).into_owned(),
        String::from_utf8_lossy(&suggested.stderr).into_owned(),
    );
    println!("$ microseg suggest --namespace production\n{yaml}\n(stderr)\n{report}");
    assert!(suggested.status.success(), "suggest failed: {report}");
    let json: Value =
        serde_json::from_str(&lab.cli_ok(&["suggest", "--namespace", "production", "-o", "json"]))
            .expect("suggest -o json");
    let names: Vec<&str> = json["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .map(|policy| policy["metadata"]["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(
        names,
        [
            "api-suggested",
            "frontend-suggested",
            "postgresql-suggested",
            "redis-suggested"
        ],
        "one policy per workload of production: {json:#}"
    );
    let report_json = &json["report"];
    assert_eq!(
        report_json["connections"], 20,
        "the 10 paths, IPv4 and IPv6: {report_json:#}"
    );
    assert_eq!(report_json["selfCheck"]["allowed"], 20, "{report_json:#}");
    // The frontends' policy selects on their stable label, not the revision hash.
    let frontend = &json["policies"][1];
    assert_eq!(
        frontend["spec"]["podSelector"]["matchLabels"],
        serde_json::json!({"tier": "frontend"}),
        "{frontend:#}"
    );
    let suggested_file = lab.write("suggested.yaml", &yaml);

    // The same from the agent's event log (flushed as it is written; wait for it).
    let event_log = lab.dir.join("events.jsonl");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let from_log = lab.cli(&[
            "suggest",
            "--namespace",
            "production",
            "--from-file",
            &event_log.display().to_string(),
        ]);
        if from_log.status.success() && String::from_utf8_lossy(&from_log.stdout) == yaml {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "suggest --from-file on the event log differs:\n{}{}",
            String::from_utf8_lossy(&from_log.stdout),
            String::from_utf8_lossy(&from_log.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Part of the traffic (what frontend-1 opened), over the whole inventory: the
    // report names what the policies allow beyond it, e.g. frontend-2, which shares
    // frontend-1's labels.
    check_what_else_from_part_of_the_log(&lab, &event_log, &inventory);

    // Apply, and audit off.
    lab.cli_ok(&["apply", "-f", &suggested_file.display().to_string()]);
    for host in lab
        .hosts
        .iter()
        .filter(|h| h.name.starts_with("production/"))
    {
        lab.cli_ok(&["audit", "off", &host.name]);
    }
    wait_enforcing(&lab, 5);
    let workloads: Value =
        serde_json::from_str(&lab.cli_ok(&["get", "workloads", "-o", "json"])).expect("json");
    for workload in workloads.as_array().expect("workloads") {
        assert_eq!(workload["audit"], false, "audit mode is off: {workload:#}");
    }

    // 4. Everything that ran still runs; the forbidden paths are denied.
    run_paths(&lab, &ALLOWED_PATHS, "enforced");
    for (src, dst, port, why) in FORBIDDEN_PATHS {
        for v6 in [false, true] {
            let to = address(&lab, dst, v6);
            assert!(
                !tcp_exchange(&lab.host(src).ns, to, port),
                "{src} -> {dst} ({to}) TCP/{port} completed under the suggested policies: {why}"
            );
        }
    }
    let enforced = load_paths(&[inventory.clone(), default_deny, suggested_file])
        .expect("the suggested policies load");
    let (allowed, denied) = lab.check_matrix(&enforced, &PORTS, &[], "the suggested policies");
    println!(
        "under the suggested policies: {allowed} connections allowed, {denied} denied, as the evaluator says"
    );

    // 5. No wider than the guide's hand-written policies.
    let guide = load_paths(&[inventory, examples().join("three-tier/policies.yaml")])
        .expect("the guide's policies load");
    let (by_suggested, by_guide) = assert_no_wider(&lab, &enforced, &guide);
    println!(
        "on TCP {PORTS:?}, both families: the suggestion allows {by_suggested} flows, the guide's policies {by_guide}; none beyond the guide's"
    );
}
