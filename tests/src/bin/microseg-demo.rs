//! `cargo xtask demo`: the seed guide's three-tier application, enforced by the
//! microseg agent. Eight hosts (a load balancer, two frontends, two APIs, PostgreSQL,
//! Redis, Prometheus) run in network namespaces on one bridge; the agent enforces on
//! their node-side veths; the guide's policies go in with `microseg apply`; every
//! path is probed with a real TCP connection and printed next to what the policy
//! expects; then the live deny events; then everything is removed.

use std::path::PathBuf;

use microseg::policy::{EndpointRef, ExpectedVerdict, load_expected, load_paths};
use microseg_tests::{
    lab::Lab,
    topology::{EchoServers, tcp_exchange},
};

const HOSTS: [(&str, &str, &str); 8] = [
    ("ingress-nginx", "load-balancer", "10.80.0.10"),
    ("production", "frontend-1", "10.80.0.11"),
    ("production", "frontend-2", "10.80.0.12"),
    ("production", "api-1", "10.80.0.21"),
    ("production", "api-2", "10.80.0.22"),
    ("production", "postgresql", "10.80.0.31"),
    ("production", "redis", "10.80.0.32"),
    ("monitoring", "prometheus", "10.80.0.41"),
];
const PORTS: [u16; 5] = [443, 8080, 9090, 5432, 6379];

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        microseg_tests::kernel_available("microseg-demo"),
        "the demo needs root (BPF and network namespaces)"
    );
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-three-tier");
    let set = load_paths(&[
        example.join("policies.yaml"),
        example.join("inventory.yaml"),
    ])
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let expected =
        load_expected(&example.join("expected.yaml")).map_err(|e| anyhow::anyhow!("{e}"))?;

    step("1/5", "eight hosts in network namespaces on one bridge");
    let names: Vec<(String, &str)> = HOSTS
        .iter()
        .map(|(ns, n, a)| (format!("{ns}/{n}"), *a))
        .collect();
    let name_refs: Vec<(&str, &str)> = names.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let lab = Lab::new(&name_refs);
    let _servers: Vec<EchoServers> = lab
        .hosts
        .iter()
        .map(|h| EchoServers::start(&h.ns, &PORTS))
        .collect();
    for host in &lab.hosts {
        println!("  {:<28} {}", host.name, host.address);
    }

    step("2/5", "start the agent (TC on each host's node-side veth)");
    lab.start_agent(&[]);
    print!("{}", indent(&lab.cli_ok(&["status"])));

    step(
        "3/5",
        "microseg apply -f examples/demo-three-tier/ (the guide's policies)",
    );
    let applied = lab.cli_ok(&[
        "apply",
        "-f",
        &example.join("inventory.yaml").display().to_string(),
        "-f",
        &example.join("policies.yaml").display().to_string(),
    ]);
    print!("{}", indent(&applied));
    print!(
        "{}",
        indent(&lab.cli_ok(&["get", "endpoints", "-o", "wide"]))
    );

    step("4/5", "probe every path with a real TCP connection");
    println!(
        "  {:<28} {:<28} {:>5}  {:<8} {:<8}",
        "FROM", "TO", "PORT", "EXPECTED", "OBSERVED"
    );
    let mut mismatches = 0;
    for flow in &expected {
        let (
            EndpointRef::Workload {
                namespace: fns,
                name: fname,
            },
            EndpointRef::Workload {
                namespace: tns,
                name: tname,
            },
        ) = (&flow.from, &flow.to)
        else {
            continue;
        };
        let from = lab.host(&format!("{fns}/{fname}"));
        let to = lab.host(&format!("{tns}/{tname}"));
        let observed = tcp_exchange(&from.ns, to.address, flow.port);
        let expected_allow = flow.verdict == ExpectedVerdict::Allow;
        let word = |allowed: bool| if allowed { "allow" } else { "deny" };
        let mark = if observed == expected_allow {
            "ok"
        } else {
            "MISMATCH"
        };
        mismatches += usize::from(observed != expected_allow);
        println!(
            "  {:<28} {:<28} {:>5}  {:<8} {:<8} {mark}",
            from.name,
            to.name,
            flow.port,
            word(expected_allow),
            word(observed)
        );
    }
    let _ = set;

    step(
        "5/5",
        "deny events, as the agent streams them (microseg events --verdict deny)",
    );
    // Events reach the agent asynchronously; give the last ones a moment.
    std::thread::sleep(std::time::Duration::from_millis(300));
    print!(
        "{}",
        indent(&lab.cli_ok(&["events", "--verdict", "deny", "--last", "50"]))
    );
    println!();
    print!("{}", indent(&lab.cli_ok(&["stats"])));
    lab.stop_agent();
    drop(lab);
    println!();
    anyhow::ensure!(
        mismatches == 0,
        "{mismatches} paths did not match the policy"
    );
    println!(
        "All {} paths matched the policy. Agent stopped, namespaces and pinned state removed.",
        expected.len()
    );
    Ok(())
}

fn step(number: &str, text: &str) {
    println!("\n== {number} {text}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
