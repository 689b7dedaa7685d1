//! Established flows are judged again only when an update takes something away
//! that could concern them: churn on unrelated workloads leaves them current (no
//! packet of theirs goes back through policy), while a narrowing change still
//! stops them at once. Real agent, real UDP flow between network namespaces.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use microseg_tests::{lab::Lab, netns::NetNs, topology::EchoServers};
use serde_json::Value;

const CLIENT: &str = "10.80.0.11";
const SERVER: &str = "10.80.0.21";
/// The client's source port: every exchange is the same flow.
const CLIENT_PORT: u16 = 40_053;

fn inventory() -> String {
    format!(
        "apiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {{name: client, namespace: app, labels: {{role: client}}}}\nspec: {{addresses: [{CLIENT}]}}\n---\napiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {{name: server, namespace: app, labels: {{role: server}}}}\nspec: {{addresses: [{SERVER}]}}\n"
    )
}

fn policy(port: u16) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: app}}\nspec:\n  podSelector: {{matchLabels: {{role: server}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]\n    ports: [{{port: {port}, protocol: UDP}}]\n"
    )
}

/// A workload nothing selects or names, in a namespace of its own.
fn bystander(index: usize) -> String {
    format!(
        "apiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {{name: bystander-{index}, namespace: elsewhere, labels: {{app: bystander-{index}}}}}\nspec: {{addresses: [10.81.0.{}]}}\n",
        index + 10
    )
}

/// One datagram from the client's fixed port, and its echo.
fn exchange(ns: &NetNs, port: u16) -> bool {
    ns.run_in(|| {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .expect("socket");
        socket.set_reuse_address(true).expect("reuse");
        let local: SocketAddr = format!("{CLIENT}:{CLIENT_PORT}").parse().expect("address");
        socket.bind(&local.into()).expect("bind");
        let socket: UdpSocket = socket.into();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .ok();
        let server: IpAddr = SERVER.parse().expect("address");
        if socket.send_to(b"microseg", (server, port)).is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(socket.recv_from(&mut buf), Ok((8, _)))
    })
}

fn status(lab: &Lab) -> Value {
    serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status json")
}

fn rejudged(lab: &Lab) -> u64 {
    status(lab)["conntrack"]["flowsRejudged"]
        .as_u64()
        .expect("flowsRejudged in status")
}

#[test]
fn churn_on_unrelated_workloads_rejudges_no_flow_and_a_narrowing_change_still_stops_it() {
    if !microseg_tests::kernel_available("flows_kept") {
        return;
    }
    let lab = Lab::new(&[("client", CLIENT), ("server", SERVER)]);
    let _servers = EchoServers::start(&lab.host("server").ns, &[53]);
    let inventory = lab.write("inventory.yaml", &inventory());
    let allowed = lab.write("policy.yaml", &policy(53));
    lab.start_agent(&[]);
    lab.cli_ok(&["apply", "-f", &inventory.display().to_string()]);
    lab.cli_ok(&["apply", "-f", &allowed.display().to_string()]);
    let client = &lab.host("client").ns;
    assert!(exchange(client, 53), "{}", lab.agent_log());
    let before = rejudged(&lab);
    let generation = status(&lab)["generation"].clone();

    // Workloads nothing selects come and go: every update allows more or takes
    // away only what concerns their own addresses.
    for index in 0..5 {
        let file = lab.write(&format!("bystander-{index}.yaml"), &bystander(index));
        lab.cli_ok(&["apply", "-f", &file.display().to_string()]);
        assert!(exchange(client, 53), "the flow passes during churn");
        lab.cli_ok(&["delete", "-f", &file.display().to_string()]);
    }
    assert!(exchange(client, 53));
    assert_ne!(
        status(&lab)["generation"],
        generation,
        "the churn was enforced"
    );
    assert_eq!(
        rejudged(&lab),
        before,
        "no packet of the established flow was judged again\n{}",
        lab.agent_log()
    );
    // Each change compiled as the change it is: the first compile was the only
    // full one.
    let compiler = &status(&lab)["compiler"];
    assert_eq!(compiler["fullCompiles"], 1, "{compiler}");
    assert!(compiler["updates"].as_u64().unwrap() >= 12, "{compiler}");

    // The policy stops allowing the port: the established flow stops at once.
    let narrowed = lab.write("policy.yaml", &policy(54));
    lab.cli_ok(&["apply", "-f", &narrowed.display().to_string()]);
    assert!(!exchange(client, 53), "revoked at the next packet");
    assert!(rejudged(&lab) > before, "judged again, and dropped");
}

#[test]
fn a_reused_address_never_inherits_its_predecessors_flows() {
    if !microseg_tests::kernel_available("flows_reused_address") {
        return;
    }
    let lab = Lab::new(&[("client", CLIENT), ("server", SERVER)]);
    let _servers = EchoServers::start(&lab.host("server").ns, &[53]);
    // Two clients: the identity stays in use when the first goes, so its going
    // takes no entry away (no update revokes anything).
    let inventory = lab.write(
        "inventory.yaml",
        &format!(
            "{}---\napiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {{name: client-b, namespace: app, labels: {{role: client}}}}\nspec: {{addresses: [10.80.0.12]}}\n",
            inventory()
        ),
    );
    let allowed = lab.write("policy.yaml", &policy(53));
    lab.start_agent(&[]);
    lab.cli_ok(&["apply", "-f", &inventory.display().to_string()]);
    lab.cli_ok(&["apply", "-f", &allowed.display().to_string()]);
    let client = &lab.host("client").ns;
    assert!(exchange(client, 53), "{}", lab.agent_log());

    // The client goes and another workload, which the policy does not allow, gets
    // its address.
    lab.cli_ok(&["delete", "workload", "client", "-n", "app"]);
    let impostor = lab.write(
        "impostor.yaml",
        &format!(
            "apiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {{name: impostor, namespace: app, labels: {{role: intruder}}}}\nspec: {{addresses: [{CLIENT}]}}\n"
        ),
    );
    lab.cli_ok(&["apply", "-f", &impostor.display().to_string()]);
    // The janitor runs once a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status(&lab)["conntrack"]["flowsMarkedStale"].as_u64() == Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the flow was not marked\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !exchange(client, 53),
        "the impostor's packet on the old flow is judged, and dropped\n{}",
        lab.agent_log()
    );
}
