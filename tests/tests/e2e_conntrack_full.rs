//! A full connection-tracking table, end to end: the agent configured with a small
//! table (`conntrack.maxEntries`), more allowed connections than it holds, and an
//! established connection whose entry they evict. Its next segment finds no entry:
//! it is counted as a lost flow (and judged by policy again: allowed here, so the
//! connection goes on), and `status` and the metrics report the table's pressure.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use microseg_tests::{
    client_server::{CLIENT, INVENTORY, SERVER, server_address, server_policy},
    lab::Lab,
    topology::PROBE_TIMEOUT,
};
use serde_json::Value;

const CAPACITY: u64 = 1024;
const METRICS: &str = "127.0.0.1:9967";

#[test]
fn a_full_conntrack_table_reports_its_pressure_and_counts_the_flows_it_loses() {
    if !microseg_tests::kernel_available(
        "a_full_conntrack_table_reports_its_pressure_and_counts_the_flows_it_loses",
    ) {
        return;
    }
    let lab = Lab::new(&[("app/client", CLIENT), ("app/server", SERVER)]);
    // The server echoes on each connection for as long as it stays open, each on a
    // thread of its own, so that neither the flood nor a timeout closes the
    // established connection.
    let listener = lab
        .host("app/server")
        .ns
        .run_in(|| TcpListener::bind(("::", 80)).expect("bind"));
    std::thread::spawn(move || {
        for mut connection in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = connection.read(&mut buf) {
                    if n == 0 || connection.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let config = lab.write(
        "agent.yaml",
        &format!("conntrack:\n  maxEntries: {CAPACITY}\n"),
    );
    lab.start_agent(&[
        "--config",
        &config.display().to_string(),
        "--metrics-address",
        METRICS,
    ]);
    let inventory = lab.write("inventory.yaml", INVENTORY);
    let policy = lab.write("policy.yaml", &server_policy(80));
    lab.cli_ok(&[
        "apply",
        "-f",
        &inventory.display().to_string(),
        "-f",
        &policy.display().to_string(),
    ]);
    let client = &lab.host("app/client").ns;
    let status = || -> Value {
        serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status json")
    };
    assert_eq!(status()["conntrack"]["capacity"], CAPACITY);

    // An established connection, then three times the table's worth of other
    // allowed connections (each opened and closed: a tracked flow each).
    let mut established = client.run_in(|| {
        TcpStream::connect_timeout(&SocketAddr::new(server_address(), 80), PROBE_TIMEOUT)
            .expect("connect")
    });
    established
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 4];
    established.write_all(b"ping").unwrap();
    established
        .read_exact(&mut buf)
        .expect("echo before the flood");
    let opened = client.run_in(|| {
        (0..3 * CAPACITY)
            .filter(|_| {
                TcpStream::connect_timeout(&SocketAddr::new(server_address(), 80), PROBE_TIMEOUT)
                    .is_ok()
            })
            .count()
    });
    assert!(
        opened as u64 >= 2 * CAPACITY - 10,
        "{opened} connections opened"
    );

    // The established connection's entry was the least recently used: evicted. Its
    // next segment is counted as lost, judged again, and allowed.
    let lost_before = status()["conntrack"]["flowsLost"]
        .as_u64()
        .expect("flowsLost");
    established.write_all(b"pong").unwrap();
    established
        .read_exact(&mut buf)
        .expect("the connection goes on: its policy allows it");
    let lost_after = status()["conntrack"]["flowsLost"]
        .as_u64()
        .expect("flowsLost");
    assert!(
        lost_after > lost_before,
        "the evicted connection's segment is counted as a lost flow ({lost_before} -> {lost_after})"
    );

    // The table's pressure, counted every 5 s: full, as an LRU hash fills. The
    // kernel evicts before the count reaches the capacity: each CPU keeps a batch
    // of free elements of its own (88% of 1,024 on this 2-CPU machine).
    const FULL: f64 = 0.75;
    let deadline = Instant::now() + Duration::from_secs(15);
    let conntrack = loop {
        let conntrack = status()["conntrack"].clone();
        if conntrack["pressure"].as_f64().unwrap_or(0.0) >= FULL || Instant::now() > deadline {
            break conntrack;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let entries = conntrack["entries"].as_u64().expect("entries");
    assert!(
        entries as f64 >= FULL * CAPACITY as f64 && entries <= CAPACITY,
        "the table is full: {conntrack}"
    );
    let metrics = lab.metrics(METRICS);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the metrics:\n{metrics}"))
    };
    assert!(value("microseg_bpf_map_pressure{map_name=\"conntrack\"}") >= FULL);
    assert_eq!(
        value("microseg_bpf_map_capacity{map_name=\"conntrack\"}"),
        CAPACITY as f64
    );
    assert!(value("microseg_conntrack_flows_lost_total") >= lost_after as f64);
    println!(
        "conntrack full: {entries} of {CAPACITY} entries, {lost_after} lost flows after {opened} connections"
    );
}
