//! The agent against what a production host throws at it, with the real agent:
//!
//! - a flood of denied packets with an event log: the log is rotated by size into a
//!   bounded number of files;
//! - API requests longer than the limit, and malformed ones: answered with an error,
//!   the agent unharmed;
//! - the API socket: created with its mode, no staging left behind;
//! - policy directories as Kubernetes mounts a ConfigMap (`..data`, timestamped
//!   directories, links), with a link loop and hidden files, and an example directory
//!   with its `expected.yaml`: read once each, the same way `check` reads them.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    time::{Duration, Instant},
};

use microseg_tests::{
    client_server::{CLIENT, INVENTORY, SERVER, server_policy},
    lab::Lab,
    topology::{EchoServers, tcp_exchange},
};
use serde_json::Value;

/// The client and server with a policy opening TCP 80, in one file.
fn inventory_and_policy() -> String {
    format!("{INVENTORY}---{}", server_policy(80))
}

fn status(lab: &Lab) -> Value {
    serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status json")
}

fn two_hosts() -> Lab {
    Lab::new(&[("app/client", CLIENT), ("app/server", SERVER)])
}

#[test]
fn the_event_log_is_rotated_by_size_under_a_flood() {
    if !microseg_tests::kernel_available("the_event_log_is_rotated_by_size_under_a_flood") {
        return;
    }
    let lab = two_hosts();
    let _servers = EchoServers::start(&lab.host("app/server").ns, &[80, 81]);
    lab.write("policies/app.yaml", &inventory_and_policy());
    // The lab's agent logs to events.jsonl; limit it to 8 KiB and 2 rotated files.
    lab.start_agent(&["--event-log-max-bytes", "8192", "--event-log-files", "2"]);
    let log = lab.dir.join("events.jsonl");
    // Denied connection attempts: each SYN (and its retransmissions) an event.
    let client = &lab.host("app/client").ns;
    let server = SERVER.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| assert!(!tcp_exchange(client, server, 81)));
            }
        });
        let stats: Value =
            serde_json::from_str(&lab.cli_ok(&["stats", "-o", "json"])).expect("json");
        if stats["event_log"]["rotations"].as_u64().unwrap_or(0) >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log never rotated 4 times: {stats}"
        );
    }
    let mut files: Vec<String> = std::fs::read_dir(&lab.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("events.jsonl"))
        .collect();
    files.sort();
    assert_eq!(files, ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]);
    for name in &files {
        let path = lab.dir.join(name);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= 8192, "{name}: {size} bytes");
        // Whole JSON lines only.
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{name}: {e}: {line}"));
        }
    }
    assert!(std::fs::metadata(&log).is_ok());
}

/// Sends raw bytes to the agent's socket and reads one response line.
fn raw_request(lab: &Lab, bytes: &[u8]) -> (UnixStream, Value) {
    let mut stream = UnixStream::connect(lab.socket()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).expect("write");
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).expect("a response line");
    (
        stream,
        serde_json::from_str(&line).expect("a JSON response"),
    )
}

#[test]
fn oversized_and_malformed_requests_get_errors_and_leave_the_agent_whole() {
    if !microseg_tests::kernel_available(
        "oversized_and_malformed_requests_get_errors_and_leave_the_agent_whole",
    ) {
        return;
    }
    let lab = two_hosts();
    let config = lab.write("agent.yaml", "apiMaxRequestBytes: 65536\n");
    lab.start_agent(&["--config", &config.display().to_string()]);
    // Socket: the configured mode from the first moment, nothing left from staging.
    let mode = std::fs::metadata(lab.socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(&lab.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".microseg-socket")
        })
        .collect();
    assert!(leftovers.is_empty(), "staging left behind");

    // Malformed: an error, and the connection stays usable.
    let (mut stream, answer) = raw_request(&lab, b"{not json\n");
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("malformed request")
    );
    stream.write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    let answer: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        answer["ok"], true,
        "the same connection still serves: {answer}"
    );
    let (_, answer) = raw_request(&lab, b"\xff\xfe\n");
    assert!(
        answer["error"].as_str().unwrap().contains("not UTF-8"),
        "{answer}"
    );

    // Oversized: an error naming the limit, then the connection closes.
    let mut huge = vec![b'x'; 200_000];
    huge.push(b'\n');
    let (_, answer) = raw_request(&lab, &huge);
    assert_eq!(answer["ok"], false);
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("longer than 65536 bytes"), "{error}");

    // A request without an end of line, held open: other clients are served.
    let mut slow = UnixStream::connect(lab.socket()).unwrap();
    slow.write_all(b"{\"op\":").unwrap();
    for _ in 0..3 {
        assert!(status(&lab)["generation"].is_number());
    }
    drop(slow);
    assert!(!lab.agent_log().contains("panicked"), "{}", lab.agent_log());
}

#[test]
fn configmap_mounts_and_example_directories_are_read_as_check_reads_them() {
    if !microseg_tests::kernel_available(
        "configmap_mounts_and_example_directories_are_read_as_check_reads_them",
    ) {
        return;
    }
    let lab = two_hosts();
    let _servers = EchoServers::start(&lab.host("app/server").ns, &[80, 81]);
    // The kubelet's layout of a ConfigMap volume, plus a link loop and hidden files.
    let mount = lab.dir.join("configmap");
    let data = mount.join("..2026_11_29_10_00_00.123");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("app.yaml"), inventory_and_policy()).unwrap();
    std::os::unix::fs::symlink("..2026_11_29_10_00_00.123", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/app.yaml", mount.join("app.yaml")).unwrap();
    std::fs::create_dir(mount.join("nested")).unwrap();
    std::os::unix::fs::symlink("..", mount.join("nested/loop")).unwrap();
    std::fs::write(mount.join(".app.yaml.swp"), "not yaml at all: [").unwrap();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier");
    lab.start_agent(&[
        "--policy-dir",
        &mount.display().to_string(),
        "--policy-dir",
        &examples.display().to_string(),
    ]);
    let reported = status(&lab);
    assert!(reported["directoryError"].is_null(), "{reported:#}");
    // Each file once: no duplicate-name errors from `..data` or the loop.
    let check = std::process::Command::new(microseg_tests::lab::microseg_binary())
        .args(["compile", "--stats", "-o", "json", "--policy"])
        .arg(&mount)
        .arg("--policy")
        .arg(&examples)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "check reads what the agent reads: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let policies_by_check = String::from_utf8_lossy(&check.stdout).to_string();
    let policies = reported["policies"].as_u64().unwrap();
    assert!(policies > 1, "{reported:#}");
    assert!(
        policies_by_check.contains(&format!("\"policies\":{policies}"))
            || policies_by_check.contains(&format!("\"policies\": {policies}")),
        "agent {policies} policies; compile says {policies_by_check}"
    );
    assert!(tcp_exchange(
        &lab.host("app/client").ns,
        SERVER.parse().unwrap(),
        80
    ));
    assert!(!tcp_exchange(
        &lab.host("app/client").ns,
        SERVER.parse().unwrap(),
        81
    ));
    // The ConfigMap is updated the kubelet's way: a new timestamped directory and
    // `..data` switched to it. The change is applied.
    let newer = mount.join("..2026_11_29_10_05_00.456");
    std::fs::create_dir(&newer).unwrap();
    std::fs::write(
        newer.join("app.yaml"),
        inventory_and_policy().replace("port: 80", "port: 81"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_11_29_10_05_00.456", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tcp_exchange(&lab.host("app/client").ns, SERVER.parse().unwrap(), 81) {
        assert!(
            Instant::now() < deadline,
            "the ConfigMap update was not applied"
        );
    }
    assert!(status(&lab)["directoryError"].is_null());
}
