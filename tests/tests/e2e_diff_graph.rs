//! `microseg diff` and `microseg graph` against a live agent: traffic of the demo's
//! three tiers observed in audit mode (every flow reported), the tiers' policies
//! applied, then a change that removes the database's ingress rule is diffed
//! against the live policy and names exactly the flows it would break; the graph of
//! the live policy marks the flow the policy denies. And the exit statuses without
//! an agent: a no-op 0, a change 1, an invalid file 2.

use std::path::PathBuf;

use microseg_tests::{
    lab::{Lab, microseg_binary},
    topology::{EchoServers, tcp_exchange},
};
use serde_json::Value;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Default deny on ingress for production: with the agent in audit mode every
/// connection to a production workload passes and is reported.
const DEFAULT_DENY: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: production}
spec: {podSelector: {}, policyTypes: [Ingress]}
";

/// The database accepts nothing: the change under review.
const DATABASE_CLOSED: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: database-policy, namespace: production}
spec:
  podSelector: {matchLabels: {app: postgresql}}
  policyTypes: [Ingress, Egress]
  ingress: []
  egress: []
";

/// The API without its egress rule to redis, which no observed traffic used.
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

fn code(output: &std::process::Output) -> i32 {
    output.status.code().expect("exited")
}

#[test]
fn diff_against_the_live_agent_names_the_flows_a_change_breaks() {
    if !microseg_tests::kernel_available(
        "diff_against_the_live_agent_names_the_flows_a_change_breaks",
    ) {
        return;
    }
    let hosts = [
        ("ingress-nginx/load-balancer", "10.80.0.10"),
        ("production/frontend-1", "10.80.0.11"),
        ("production/api-1", "10.80.0.21"),
        ("production/postgresql", "10.80.0.31"),
    ];
    let lab = Lab::new(&hosts);
    let _servers: Vec<EchoServers> = lab
        .hosts
        .iter()
        .map(|h| EchoServers::start(&h.ns, &[443, 8080, 5432]))
        .collect();
    lab.start_agent(&["--audit"]);
    let example = examples().join("demo-three-tier");
    let inventory = example.join("inventory.yaml").display().to_string();
    let deny = lab.write("default-deny.yaml", DEFAULT_DENY);
    lab.cli_ok(&["apply", "-f", &inventory, "-f", &deny.display().to_string()]);

    // The application's traffic, and one connection the tiers' policies forbid;
    // audit mode lets all of it through and reports each.
    let host = |name: &str| lab.host(name);
    let connections = [
        ("ingress-nginx/load-balancer", "production/frontend-1", 443),
        ("production/frontend-1", "production/api-1", 8080),
        ("production/api-1", "production/postgresql", 5432),
        ("production/api-1", "production/postgresql", 5432),
        ("production/frontend-1", "production/postgresql", 5432),
    ];
    for (from, to, port) in connections {
        assert!(
            tcp_exchange(&host(from).ns, host(to).address, port),
            "{from} -> {to}:{port} passes in audit mode"
        );
    }
    // Every connection is in the agent's history before the diff reads it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let events = lab.cli_ok(&[
            "events",
            "--verdict",
            "audit",
            "-o",
            "json",
            "--last",
            "1000",
        ]);
        if events.lines().count() >= connections.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "audit events missing: {events}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // The tiers' policies, written for that traffic, are applied.
    lab.cli_ok(&[
        "apply",
        "-f",
        &example.join("policies.yaml").display().to_string(),
    ]);

    // The change closes the database: the API's connections (two, one event each)
    // are what it breaks, nothing else.
    let change = lab.write("change/database.yaml", DATABASE_CLOSED);
    let change = change.display().to_string();
    let output = lab.cli(&["diff", "-f", &change, "-o", "json"]);
    assert_eq!(
        code(&output),
        1,
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("json report");
    // Audit mode reports packets, so the API's two connections are at least two
    // events.
    let denied: Vec<(String, String, u64)> = report["flows"]["newlyDenied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert!(f["count"].as_u64().unwrap() >= 2, "{f}");
            (
                f["from"].as_str().unwrap().to_owned(),
                f["to"].as_str().unwrap().to_owned(),
                f["port"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        denied,
        [(
            "production/api-1".to_owned(),
            "production/postgresql".to_owned(),
            5432,
        )],
        "{report:#}"
    );
    assert_eq!(report["flows"]["newlyAllowed"], serde_json::json!([]));
    let pairs: Vec<String> = report["reachability"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{} -> {}", c["from"], c["to"]))
        .collect();
    assert_eq!(
        pairs,
        [
            r#""production/api-1" -> "production/postgresql""#,
            r#""production/api-2" -> "production/postgresql""#,
        ]
    );
    assert_eq!(
        report["policies"]["modified"],
        serde_json::json!(["NetworkPolicy production/database-policy"])
    );
    // The text report says the same for people; --fail-on newly-denied fails too.
    let text = lab.cli(&["diff", "-f", &change, "--fail-on", "newly-denied"]);
    assert_eq!(code(&text), 1);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("production/api-1 -> production/postgresql TCP/5432 ("),
        "{text}"
    );

    // Narrowing a path nothing used: a change (1), but no observed flow breaks, so
    // --fail-on newly-denied passes (0).
    let narrow = lab.write("change/api.yaml", API_WITHOUT_REDIS);
    let narrow = narrow.display().to_string();
    assert_eq!(code(&lab.cli(&["diff", "-f", &narrow])), 1);
    let output = lab.cli(&["diff", "-f", &narrow, "--fail-on", "newly-denied"]);
    assert_eq!(
        code(&output),
        0,
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    // Re-applying what is live changes nothing: 0. Nothing was applied by diff.
    let policies = example.join("policies.yaml").display().to_string();
    assert_eq!(code(&lab.cli(&["diff", "-f", &policies])), 0);
    assert!(tcp_exchange(
        &host("production/api-1").ns,
        host("production/postgresql").address,
        5432
    ));

    // The live graph: the tiers' edges with their policies, and the connection the
    // policies deny (audited, so it passed) marked.
    let dot = lab.cli_ok(&["graph", "-o", "dot"]);
    assert!(
        dot.contains(r#""production/api-1" -> "production/postgresql" [label="TCP/5432 (production/api-policy, production/database-policy)""#),
        "{dot}"
    );
    assert!(
        dot.contains(
            r#""production/frontend-1" -> "production/postgresql" [label="denied TCP/5432 x"#
        ),
        "{dot}"
    );
    let without_flows = lab.cli_ok(&["graph", "-o", "dot", "--no-flows"]);
    assert!(!without_flows.contains("denied"), "{without_flows}");
}

#[test]
fn diff_exit_status_without_an_agent() {
    let dir = std::env::temp_dir().join(format!("microseg-diff-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let three_tier = examples().join("three-tier").display().to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(microseg_binary())
            .arg("--socket")
            .arg(dir.join("no-agent.sock"))
            .arg("diff")
            .args(args)
            .output()
            .expect("microseg runs")
    };
    // The same set: 0.
    let same = run(&["--base", &three_tier, "-f", &three_tier]);
    assert_eq!(code(&same), 0, "{}", String::from_utf8_lossy(&same.stderr));
    // A rule removed: 1.
    let change = dir.join("api.yaml");
    std::fs::write(&change, API_WITHOUT_REDIS.replace("10.80", "10.10")).unwrap();
    let change = change.display().to_string();
    let changed = run(&["--base", &three_tier, "-f", &change]);
    assert_eq!(code(&changed), 1);
    assert!(
        String::from_utf8_lossy(&changed.stdout)
            .contains("production/api-1 -> production/redis: - TCP/6379")
    );
    // An invalid file: 2, naming the file and the field.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: production}\nspec: {podSelector: {}, ingress: [{ports: [{port: 70000}]}]}\n",
    )
    .unwrap();
    let invalid = run(&["--base", &three_tier, "-f", &bad.display().to_string()]);
    let stderr = String::from_utf8_lossy(&invalid.stderr);
    assert_eq!(code(&invalid), 2, "{stderr}");
    assert!(
        stderr.contains("the new policy set (-f) is invalid") && stderr.contains("bad.yaml"),
        "{stderr}"
    );
    // No agent to compare with: 2, saying so.
    let no_agent = run(&["-f", &three_tier]);
    assert_eq!(code(&no_agent), 2);
    assert!(String::from_utf8_lossy(&no_agent.stderr).contains("cannot reach the microseg agent"));
    std::fs::remove_dir_all(&dir).unwrap();
}
