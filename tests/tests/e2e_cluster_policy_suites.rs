//! Upstream ClusterNetworkPolicy conformance suites on real sockets: the table's eight
//! pods as network namespaces on a bridge (`Lab`), the real agent enforcing on their
//! veths, each suite's states applied with `microseg apply -f` as upstream patches
//! its objects, and every TCP and UDP probe of the chosen suites run as a real
//! connection (an echo exchange) over IPv4 and over IPv6, compared with upstream's
//! expected result. Once with TC, once with XDP + TC.
//!
//! The pods keep their names, labels and named ports; their addresses are the lab's
//! (the suites chosen select pods by labels, not by CIDR). SCTP probes, the CIDR
//! suites and the host-network suites are checked through the eBPF programs in
//! `cluster_policy_conformance.rs`.

use std::time::Instant;

use microseg_tests::cluster_conformance::{self, Table};
use microseg_tests::lab::Lab;
use microseg_tests::topology::{EchoServers, tcp_exchange, udp_exchange};
use serde_json::{Value, json};

/// Suites run on sockets: every tier, every action, priorities changed between
/// probes, named ports, and the Admin -> NetworkPolicy -> Baseline integration.
const SUITES: [&str; 7] = [
    "CNPAdminTierIntegration",
    "CNPAdminTierPriorityField",
    "CNPAdminTierGress",
    "CNPBaselineTierGress",
    "CNPAdminTierEgressNamedPort",
    "CNPBaselineTierIngressNamedPort",
    "CNPAdminTierIngressTCP",
];

/// Ports the table's pods serve over TCP and UDP.
const PORTS: [u16; 4] = [53, 80, 5353, 8080];

/// The table's (non host-network) pods as lab hosts named by their pod keys.
fn lab_for(table: &Table) -> Lab {
    let pods: Vec<String> = table
        .topology
        .pods
        .iter()
        .filter(|pod| pod["spec"]["hostNetwork"].as_bool() != Some(true))
        .map(|pod| {
            format!(
                "{}/{}",
                pod["metadata"]["namespace"].as_str().unwrap_or_default(),
                pod["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(pods.len(), 8);
    let hosts: Vec<(String, String)> = pods
        .iter()
        .enumerate()
        .map(|(index, key)| (key.clone(), format!("10.80.0.{}", 10 + index)))
        .collect();
    let refs: Vec<(&str, &str)> = hosts
        .iter()
        .map(|(name, address)| (name.as_str(), address.as_str()))
        .collect();
    Lab::new(&refs)
}

/// The table's pods with the lab's addresses (IPv4 and IPv6), as Pod documents.
fn inventory(table: &Table, lab: &Lab) -> Vec<Value> {
    table
        .topology
        .pods
        .iter()
        .filter(|pod| pod["spec"]["hostNetwork"].as_bool() != Some(true))
        .map(|pod| {
            let key = format!(
                "{}/{}",
                pod["metadata"]["namespace"].as_str().unwrap_or_default(),
                pod["metadata"]["name"].as_str().unwrap_or_default()
            );
            let host = lab.host(&key);
            let mut pod = pod.clone();
            pod["status"]["podIP"] = json!(host.address.to_string());
            pod["status"]["podIPs"] =
                json!([{"ip": host.address.to_string()}, {"ip": host.address6.to_string()}]);
            pod
        })
        .collect()
}

/// One state's documents: namespaces with the state's labels, the pods, the policies.
fn state_documents(
    state: &cluster_conformance::State,
    pods: &[Value],
) -> (String, Vec<(String, String)>) {
    let mut documents: Vec<Value> = state
        .namespaces
        .iter()
        .map(|(name, labels)| {
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": name, "labels": labels}})
        })
        .collect();
    documents.extend(pods.iter().cloned());
    documents.extend(state.policies.iter().cloned());
    let policies = state
        .policies
        .iter()
        .map(|policy| {
            (
                policy["kind"].as_str().unwrap_or_default().to_owned(),
                format!(
                    "{}/{}",
                    policy["metadata"]["namespace"].as_str().unwrap_or_default(),
                    policy["metadata"]["name"].as_str().unwrap_or_default()
                ),
            )
        })
        .collect();
    let text = documents
        .iter()
        .map(|document| serde_json::to_string(document).expect("json"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    (text, policies)
}

fn run_suites(mode: &str) {
    let started = Instant::now();
    let table = cluster_conformance::read();
    let lab = lab_for(&table);
    let _servers: Vec<EchoServers> = lab
        .hosts
        .iter()
        .map(|host| EchoServers::start(&host.ns, &PORTS))
        .collect();
    lab.wait_reachable();
    lab.start_agent_attached(&[], Some(mode));
    let pods = inventory(&table, &lab);

    let mut probes = 0;
    let mut failures = Vec::new();
    let mut previous: Option<(std::path::PathBuf, Vec<(String, String)>)> = None;
    for suite in table
        .suites
        .iter()
        .filter(|suite| SUITES.contains(&suite.name.as_str()))
    {
        for state in &suite.states {
            let (text, policies) = state_documents(state, &pods);
            // Policies of the previous state that this one does not hold go first.
            if let Some((file, previous_policies)) = &previous
                && previous_policies.iter().any(|p| !policies.contains(p))
            {
                lab.cli_ok(&["delete", "-f", &file.display().to_string()]);
            }
            let file = lab.write(&format!("{}-{}.yaml", suite.name, state.id), &text);
            lab.cli_ok(&["apply", "-f", &file.display().to_string()]);
            previous = Some((file, policies));
            for subtest in &suite.subtests {
                for assertion in subtest
                    .assertions
                    .iter()
                    .filter(|a| a.state == state.id && a.protocol != "sctp")
                {
                    let client = &lab.host(&assertion.from).ns;
                    let server = lab.host(&assertion.to);
                    for address in [server.address, server.address6] {
                        probes += 1;
                        let passed = match assertion.protocol.as_str() {
                            "tcp" => tcp_exchange(client, address, assertion.port),
                            _ => udp_exchange(client, address, assertion.port),
                        };
                        if passed != assertion.expected {
                            failures.push(format!(
                                "{} ({}): {} -> {} {address} {}/{}: expected {}, got {passed}",
                                assertion.id,
                                subtest.name,
                                assertion.from,
                                assertion.to,
                                assertion.protocol,
                                assertion.port,
                                assertion.expected
                            ));
                        }
                    }
                }
            }
        }
    }
    println!(
        "{mode}: {}/{probes} real TCP and UDP exchanges (IPv4 and IPv6) as upstream expects, {} suites, in {:.1} s",
        probes - failures.len(),
        SUITES.len(),
        started.elapsed().as_secs_f64()
    );
    for failure in &failures {
        println!("FAIL {failure}");
    }
    // 96 TCP and UDP probes of the seven suites, each over IPv4 and IPv6.
    assert_eq!(probes, 192);
    assert!(
        failures.is_empty(),
        "{} exchanges deviate; agent log:\n{}",
        failures.len(),
        lab.agent_log()
    );
}

#[test]
fn upstream_suites_on_real_sockets_with_tc() {
    if !microseg_tests::kernel_available("upstream_suites_on_real_sockets_with_tc") {
        return;
    }
    run_suites("tc");
}

#[test]
fn upstream_suites_on_real_sockets_with_xdp() {
    if !microseg_tests::kernel_available("upstream_suites_on_real_sockets_with_xdp") {
        return;
    }
    run_suites("xdp");
}
