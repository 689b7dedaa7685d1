//! End to end with the real agent process and the real CLI: hosts in network
//! namespaces on a bridge, the agent enforcing on their node-side veths.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use microseg_tests::{
    client_server::{CLIENT, INVENTORY, SERVER, server_policy},
    lab::Lab,
    topology::{EchoServers, PROBE_TIMEOUT, tcp_exchange},
};
use serde_json::Value;

fn examples() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Two hosts (app/client, app/server) with echo servers, the agent running, the
/// inventory and a policy allowing TCP 80 applied.
fn client_server_lab(extra_agent_args: &[&str]) -> (Lab, Vec<EchoServers>) {
    let lab = Lab::new(&[("app/client", CLIENT), ("app/server", SERVER)]);
    let servers = vec![EchoServers::start(
        &lab.host("app/server").ns,
        &[80, 81, 9999],
    )];
    lab.start_agent(extra_agent_args);
    let inventory = lab.write("inventory.yaml", INVENTORY);
    let policy = lab.write("policy.yaml", &server_policy(80));
    lab.cli_ok(&[
        "apply",
        "-f",
        &inventory.display().to_string(),
        "-f",
        &policy.display().to_string(),
    ]);
    (lab, servers)
}

fn server_addr() -> std::net::IpAddr {
    microseg_tests::client_server::server_address()
}

fn status(lab: &Lab) -> Value {
    serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status json")
}

#[test]
fn the_demo_topology_is_enforced_and_events_carry_names() {
    if !microseg_tests::kernel_available("the_demo_topology_is_enforced_and_events_carry_names") {
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
    lab.start_agent(&[]);
    let example = examples().join("demo-three-tier");
    lab.cli_ok(&[
        "apply",
        "-f",
        &example.join("inventory.yaml").display().to_string(),
    ]);
    lab.cli_ok(&[
        "apply",
        "-f",
        &example.join("policies.yaml").display().to_string(),
    ]);
    let host = |name: &str| lab.host(name);
    assert!(tcp_exchange(
        &host("ingress-nginx/load-balancer").ns,
        host("production/frontend-1").address,
        443
    ));
    assert!(tcp_exchange(
        &host("production/frontend-1").ns,
        host("production/api-1").address,
        8080
    ));
    assert!(tcp_exchange(
        &host("production/api-1").ns,
        host("production/postgresql").address,
        5432
    ));
    assert!(!tcp_exchange(
        &host("production/frontend-1").ns,
        host("production/postgresql").address,
        5432
    ));
    assert!(!tcp_exchange(
        &host("ingress-nginx/load-balancer").ns,
        host("production/api-1").address,
        8080
    ));

    std::thread::sleep(Duration::from_millis(200));
    let events = lab.cli_ok(&["events", "--verdict", "deny", "-o", "json", "--last", "100"]);
    let events: Vec<Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).expect("event json"))
        .collect();
    let blocked = events
        .iter()
        .find(|e| {
            e["source"]["pod_name"] == "frontend-1" && e["destination"]["pod_name"] == "postgresql"
        })
        .unwrap_or_else(|| panic!("no event for frontend-1 -> postgresql in {events:#?}"));
    assert_eq!(blocked["verdict"], "DROPPED");
    assert_eq!(blocked["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(blocked["traffic_direction"], "INGRESS");
    assert_eq!(blocked["source"]["namespace"], "production");
    assert_eq!(blocked["IP"]["source"], "10.80.0.11");
    assert_eq!(blocked["IP"]["ipVersion"], "IPv4");
    assert_eq!(blocked["l4"]["TCP"]["destination_port"], 5432);
    assert_eq!(blocked["l4"]["TCP"]["flags"]["SYN"], true);
    assert!(
        blocked["source"]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "k8s:tier=frontend")
    );
    let denied_by: Vec<&str> = blocked["ingress_denied_by"]
        .as_array()
        .expect("ingress_denied_by")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(denied_by.contains(&"database-policy"), "{denied_by:?}");
    // The compact line names both sides.
    let compact = lab.cli_ok(&[
        "events",
        "--verdict",
        "deny",
        "--from-pod",
        "production/frontend-1",
        "--last",
        "100",
    ]);
    assert!(
        compact.contains("production/frontend-1:")
            && compact.contains("-> production/postgresql:5432")
            && compact.contains("INGRESS DENIED"),
        "{compact}"
    );
    // Allowed paths produced no deny event.
    assert!(
        !events
            .iter()
            .any(|e| e["l4"]["TCP"]["destination_port"] == 443)
    );
}

#[test]
fn a_policy_change_applies_to_new_and_established_flows() {
    if !microseg_tests::kernel_available("a_policy_change_applies_to_new_and_established_flows") {
        return;
    }
    let (lab, _servers) = client_server_lab(&[]);
    let client = &lab.host("app/client").ns;
    assert!(tcp_exchange(client, server_addr(), 80));
    assert!(!tcp_exchange(client, server_addr(), 81));
    // An established connection on port 80.
    let mut established = client.run_in(|| {
        TcpStream::connect_timeout(&SocketAddr::new(server_addr(), 80), PROBE_TIMEOUT)
            .expect("connect")
    });
    established.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
    let mut buf = [0u8; 4];
    established.write_all(b"ping").unwrap();
    established
        .read_exact(&mut buf)
        .expect("echo before the change");

    // Move the allowed port from 80 to 81.
    let policy = lab.write("policy.yaml", &server_policy(81));
    let started = Instant::now();
    lab.cli_ok(&["apply", "-f", &policy.display().to_string()]);
    let apply_to_enforced = started.elapsed();
    // Enforced when `apply` returns: the generation switch is done by then.
    established.write_all(b"pong").unwrap();
    assert!(
        established.read_exact(&mut buf).is_err(),
        "the established flow must stop once its policy is revoked"
    );
    assert!(
        !tcp_exchange(client, server_addr(), 80),
        "new flows on 80 are denied"
    );
    assert!(
        tcp_exchange(client, server_addr(), 81),
        "new flows on 81 are allowed"
    );
    println!(
        "apply-to-enforced (CLI apply round trip, generation live on return): {apply_to_enforced:?}"
    );
}

#[test]
fn an_invalid_apply_is_refused_and_the_old_policy_stays() {
    if !microseg_tests::kernel_available("an_invalid_apply_is_refused_and_the_old_policy_stays") {
        return;
    }
    let (lab, _servers) = client_server_lab(&[]);
    let before = status(&lab);
    let bad = lab.write(
        "bad.yaml",
        &(server_policy(80)
            .replace("server-ingress", "broken")
            .replace("ports: [{protocol: TCP, port: 80}]", "ports: [{protocol: TCP, port: 80, endPort: 79}]")
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad-cidr, namespace: app}\nspec:\n  podSelector: {}\n  ingress:\n    - from: [{ipBlock: {cidr: 10.0.0.0/33}}]\n"),
    );
    let output = lab.cli(&["apply", "-f", &bad.display().to_string()]);
    assert!(!output.status.success(), "an invalid apply must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nothing was applied"), "{stderr}");
    assert!(
        stderr.contains("bad.yaml: document 1") && stderr.contains("endPort"),
        "{stderr}"
    );
    assert!(
        stderr.contains("document 2") && stderr.contains("ipBlock.cidr"),
        "{stderr}"
    );
    let after = status(&lab);
    assert_eq!(
        before["generation"], after["generation"],
        "no new generation"
    );
    assert!(tcp_exchange(&lab.host("app/client").ns, server_addr(), 80));
    assert!(!tcp_exchange(&lab.host("app/client").ns, server_addr(), 81));
    let policies = lab.cli_ok(&["get", "policies", "-o", "name"]);
    assert_eq!(policies.trim(), "app/server-ingress");
    // A watched directory with a broken file: reported, last good state enforced.
    lab.write("policies/broken.yaml", "kind: NetworkPolicy\nmetadata: {name: x, namespace: app}\nspec: {podSelector: {}, ingress: [{ports: [{port: 70000}]}]}\n");
    std::thread::sleep(Duration::from_millis(1500));
    let watched = status(&lab);
    assert!(
        !watched["directoryError"].is_null(),
        "the broken file is reported: {watched}"
    );
    assert_eq!(before["generation"], watched["generation"]);
    assert!(tcp_exchange(&lab.host("app/client").ns, server_addr(), 80));
}

#[test]
fn kill_9_keeps_enforcement_and_a_restart_restores_the_state() {
    if !microseg_tests::kernel_available(
        "kill_9_keeps_enforcement_and_a_restart_restores_the_state",
    ) {
        return;
    }
    let (lab, _servers) = client_server_lab(&[]);
    let generation = status(&lab)["generation"].clone();
    lab.kill_agent();
    // No agent: the pinned programs and maps keep enforcing.
    let client = &lab.host("app/client").ns;
    assert!(tcp_exchange(client, server_addr(), 80));
    assert!(!tcp_exchange(client, server_addr(), 81));
    // Probe the denied port continuously while the agent restarts: never allowed.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let leaked = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if tcp_exchange(client, server_addr(), 81) {
                    leaked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        lab.start_agent(&[]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(
        leaked.into_inner(),
        0,
        "a denied flow passed during the restart"
    );
    let restarted = status(&lab);
    assert_eq!(
        restarted["generation"], generation,
        "the restart changed no map entry"
    );
    assert_eq!(restarted["policies"], 1, "the applied policy was restored");
    assert!(lab.cli_ok(&["get", "workloads"]).contains("server"));
    assert!(tcp_exchange(client, server_addr(), 80));
    assert!(!tcp_exchange(client, server_addr(), 81));
}

/// NetworkPolicy `app/a-early`: the server also accepts TCP on `port` from the
/// client. Named to be numbered before `app/server-ingress` by a first compile.
fn early_policy(port: u16) -> String {
    server_policy(port).replace("name: server-ingress", "name: a-early")
}

/// Polls `status` until `done` says so (the agent works in the background); panics
/// with the last status after a generous bound.
fn wait_for_status(lab: &Lab, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = status(lab);
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached; status {status:#}\nagent log:\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_restarted_agent_keeps_its_ids_and_writes_only_what_changed() {
    if !microseg_tests::kernel_available(
        "a_restarted_agent_keeps_its_ids_and_writes_only_what_changed",
    ) {
        return;
    }
    let lab = Lab::new(&[("app/client", CLIENT), ("app/server", SERVER)]);
    let _servers = EchoServers::start(&lab.host("app/server").ns, &[80, 81, 9999]);
    let client = &lab.host("app/client").ns;
    let policies = lab.policy_dir();
    std::fs::write(policies.join("inventory.yaml"), INVENTORY).unwrap();
    std::fs::write(policies.join("server-ingress.yaml"), server_policy(80)).unwrap();
    lab.start_agent(&[]);
    // A history: `a-early` comes after `server-ingress`, so its ids follow; a
    // first compile of the same set numbers it first. Ids not kept, a restart
    // would rewrite the entries naming them.
    std::fs::write(policies.join("a-early.yaml"), early_policy(9999)).unwrap();
    wait_for_status(&lab, "a-early enforced", |s| s["policies"] == 2);
    assert!(tcp_exchange(client, server_addr(), 9999));

    // kill -9 once the ids are saved: the restart writes no entry.
    let saved = wait_for_status(&lab, "ids saved", |s| s["savedIds"]["current"] == true);
    let generation = saved["generation"].clone();
    lab.kill_agent();
    lab.start_agent(&[]);
    let restarted = status(&lab);
    assert_eq!(
        restarted["savedIds"]["atStart"], "restored",
        "{restarted:#}"
    );
    assert_eq!(restarted["appliesOk"], 1, "{restarted:#}");
    assert_eq!(
        restarted["lastApplyMapEntries"], 0,
        "nothing changed: nothing written; {restarted:#}"
    );
    assert_eq!(restarted["generation"], generation, "no switch");
    assert!(tcp_exchange(client, server_addr(), 80));
    assert!(tcp_exchange(client, server_addr(), 9999));
    assert!(!tcp_exchange(client, server_addr(), 81));

    // Stopped (SIGTERM saves the ids), one policy changed while no agent runs:
    // the restart writes that policy's entries only, its one entry removed
    // (port 9999) and one added (port 81).
    lab.stop_agent();
    std::fs::write(policies.join("a-early.yaml"), early_policy(81)).unwrap();
    lab.start_agent(&[]);
    let changed = status(&lab);
    assert_eq!(changed["savedIds"]["atStart"], "restored", "{changed:#}");
    assert_eq!(changed["appliesOk"], 1, "{changed:#}");
    assert_eq!(
        changed["lastApplyMapEntries"], 2,
        "only a-early's entry, removed and added; {changed:#}"
    );
    assert!(tcp_exchange(client, server_addr(), 80));
    assert!(tcp_exchange(client, server_addr(), 81));
    assert!(!tcp_exchange(client, server_addr(), 9999));

    // The same restart with ids of another format version: not used, and said
    // so. Numbered afresh (as before ids were kept), the entries whose ids change
    // are written again.
    lab.stop_agent();
    let ids_path = lab.dir.join("state").join("ids.json");
    let saved: Value = serde_json::from_slice(&std::fs::read(&ids_path).expect("ids.json saved"))
        .expect("ids.json is JSON");
    assert_eq!(saved["version"], 1);
    std::fs::write(&ids_path, r#"{"version": 99}"#).unwrap();
    lab.start_agent(&[]);
    let afresh = status(&lab);
    let at_start = afresh["savedIds"]["atStart"].as_str().unwrap_or_default();
    assert!(at_start.contains("format version 99"), "{afresh:#}");
    assert_ne!(
        afresh["lastApplyMapEntries"], 0,
        "without saved ids the restart rewrites renumbered entries; {afresh:#}"
    );
    assert!(
        lab.agent_log().contains("format version 99"),
        "the log says why the ids were not used"
    );
    assert!(tcp_exchange(client, server_addr(), 80));
    assert!(tcp_exchange(client, server_addr(), 81));
    assert!(!tcp_exchange(client, server_addr(), 9999));
    // The new numbering is saved in this version's format.
    wait_for_status(&lab, "ids saved again", |s| {
        s["savedIds"]["current"] == true
    });
    let saved: Value = serde_json::from_slice(&std::fs::read(&ids_path).unwrap()).unwrap();
    assert_eq!(saved["version"], 1);
}

#[test]
fn a_flood_of_denied_packets_leaves_the_agent_responsive_and_counts_lost_events() {
    if !microseg_tests::kernel_available(
        "a_flood_of_denied_packets_leaves_the_agent_responsive_and_counts_lost_events",
    ) {
        return;
    }
    // A low in-kernel event rate, so the flood overflows it.
    let (lab, _servers) = client_server_lab(&["--events-per-second", "200"]);
    let socket = lab.socket();
    let binary = microseg_tests::lab::microseg_binary();
    // A subscriber counting events while the flood runs.
    let mut subscriber = std::process::Command::new(&binary)
        .args([
            "--socket",
            &socket.display().to_string(),
            "events",
            "--follow",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("subscriber");
    let subscriber_out = subscriber.stdout.take().unwrap();
    let counter = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(subscriber_out).lines().count()
    });
    std::thread::sleep(Duration::from_millis(300));
    let client = &lab.host("app/client").ns;
    let (sent, flood_time, status_during) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            client.run_in(|| {
                let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
                let started = Instant::now();
                let mut sent = 0u64;
                // Bounded in count and time.
                while sent < 200_000 && started.elapsed() < Duration::from_secs(3) {
                    if socket.send_to(b"flood", (server_addr(), 9999)).is_ok() {
                        sent += 1;
                    }
                }
                (sent, started.elapsed())
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let status_ok = lab.cli(&["status", "-o", "json"]).status.success();
        let status_time = started.elapsed();
        let (sent, time) = flood.join().unwrap();
        (sent, time, (status_ok, status_time))
    });
    assert!(status_during.0, "the agent answered during the flood");
    assert!(
        status_during.1 < Duration::from_secs(5),
        "status took {:?} during the flood",
        status_during.1
    );
    std::thread::sleep(Duration::from_millis(500));
    let stats: Value = serde_json::from_str(&lab.cli_ok(&["stats", "-o", "json"])).unwrap();
    let lost = stats["counters"]["events_lost_rate_limit"]
        .as_u64()
        .unwrap();
    let sent_events = stats["counters"]["events_sent"].as_u64().unwrap();
    let denied = stats["counters"]["denied_ingress"].as_u64().unwrap()
        + stats["counters"]["denied_egress"].as_u64().unwrap();
    // Each datagram is judged at two hooks (the client's veth, then the server's).
    assert!(
        denied >= sent,
        "every flood packet was denied: {denied} < {sent}"
    );
    assert!(lost > 0, "the in-kernel rate limit counted lost events");
    assert_eq!(
        lost + sent_events + stats["counters"]["events_lost_ring_full"].as_u64().unwrap(),
        denied
    );
    // The agent still enforces and answers.
    assert!(tcp_exchange(client, server_addr(), 80));
    drop(lab);
    let received = counter.join().unwrap();
    let _ = subscriber.wait();
    assert!(received > 0, "the subscriber received events");
    println!(
        "flood: {sent} packets in {flood_time:?}; {denied} denials; {sent_events} events sent, {lost} lost to the rate limit; subscriber received {received}"
    );
}

#[test]
fn audit_mode_and_delete_work_through_the_cli() {
    if !microseg_tests::kernel_available("audit_mode_and_delete_work_through_the_cli") {
        return;
    }
    let (lab, _servers) = client_server_lab(&[]);
    let client = &lab.host("app/client").ns;
    assert!(!tcp_exchange(client, server_addr(), 81));
    // Audit mode: the would-be deny passes and is reported as AUDIT.
    lab.cli_ok(&["audit", "on", "app/server"]);
    assert!(
        tcp_exchange(client, server_addr(), 81),
        "audit mode lets the flow pass"
    );
    std::thread::sleep(Duration::from_millis(200));
    let audited = lab.cli_ok(&[
        "events",
        "--verdict",
        "audit",
        "-o",
        "json",
        "--last",
        "100",
    ]);
    let event: Value =
        serde_json::from_str(audited.lines().last().expect("an audit event")).unwrap();
    assert_eq!(event["verdict"], "AUDIT");
    assert_eq!(event["destination"]["pod_name"], "server");
    assert_eq!(event["l4"]["TCP"]["destination_port"], 81);
    let workloads: Value =
        serde_json::from_str(&lab.cli_ok(&["get", "workloads", "-o", "json"])).unwrap();
    let server = workloads
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "server")
        .unwrap();
    assert_eq!(server["audit"], true);
    // Audit off: enforced again. The audited flow's conntrack entry belongs to the
    // old generation, so it is judged again too.
    lab.cli_ok(&["audit", "off", "app/server"]);
    assert!(!tcp_exchange(client, server_addr(), 81));
    // Unknown workloads are refused with one sentence.
    let unknown = lab.cli(&["audit", "on", "app/nobody"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("workload app/nobody not found"));
    // Deleting the only policy opens the server again.
    let deleted = lab.cli_ok(&["delete", "policy", "server-ingress", "-n", "app"]);
    assert!(
        deleted.contains("NetworkPolicy app/server-ingress deleted"),
        "{deleted}"
    );
    assert!(tcp_exchange(client, server_addr(), 81));
    assert!(
        lab.cli_ok(&["get", "policies", "-o", "name"])
            .trim()
            .is_empty()
    );
    let missing = lab.cli(&["delete", "policy", "server-ingress", "-n", "app"]);
    assert!(!missing.status.success(), "deleting twice fails");
}

#[test]
fn a_subscriber_receives_the_events_the_agent_reads_or_they_are_counted_lost() {
    if !microseg_tests::kernel_available(
        "a_subscriber_receives_the_events_the_agent_reads_or_they_are_counted_lost",
    ) {
        return;
    }
    // No in-kernel limit: every denied packet makes an event, as fast as it comes.
    let (lab, _servers) = client_server_lab(&["--events-per-second", "0"]);
    let binary = microseg_tests::lab::microseg_binary();
    let mut subscriber = std::process::Command::new(&binary)
        .args([
            "--socket",
            &lab.socket().display().to_string(),
            "events",
            "--follow",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("subscriber");
    let subscriber_out = subscriber.stdout.take().unwrap();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let received_count = received.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(subscriber_out).lines() {
            if line.is_ok_and(|l| !l.contains("end_of_stream")) {
                received_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    // Wait until the subscription is registered.
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(&lab)["eventSubscribers"] != 1 {
        assert!(Instant::now() < deadline, "the subscriber never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = status(&lab)["eventsReceived"].as_u64().unwrap();
    // A steady stream of denied datagrams, paced to about 20,000 per second for 2 s.
    let (sent, elapsed) = lab.host("app/client").ns.run_in(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < Duration::from_secs(2) {
            let due = (started.elapsed().as_secs_f64() * 20_000.0) as u64;
            while sent < due {
                if socket.send_to(b"x", (server_addr(), 9999)).is_ok() {
                    sent += 1;
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        (sent, started.elapsed())
    });
    // Let the agent and the subscriber drain, then account for every event.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (read_by_agent, lost_by_subscriber, ring_full) = loop {
        let now = status(&lab);
        let stats: Value = serde_json::from_str(&lab.cli_ok(&["stats", "-o", "json"])).unwrap();
        let read = now["eventsReceived"].as_u64().unwrap();
        let lost = now["eventsLostBySubscribers"].as_u64().unwrap();
        let ring_full = stats["counters"]["events_lost_ring_full"].as_u64().unwrap();
        let delivered = received.load(std::sync::atomic::Ordering::Relaxed);
        if delivered + lost == read && read + ring_full >= sent {
            break (read - before, lost, ring_full);
        }
        assert!(
            Instant::now() < deadline,
            "events unaccounted for: sent {sent}, read {read}, ring full {ring_full}, delivered {delivered}, lost {lost}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let delivered = received.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "events: {sent} denied packets in {elapsed:?} ({:.0}/s); agent read {read_by_agent}, {ring_full} lost to a full ring; subscriber received {delivered}, lost {lost_by_subscriber}",
        sent as f64 / elapsed.as_secs_f64(),
    );
    drop(lab);
    let _ = subscriber.wait();
}
