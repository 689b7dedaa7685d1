//! Faults around an update, with the real agent (built with the `fault-injection`
//! feature: `MICROSEG_FAULT` makes it die or fail at a chosen step, see
//! microseg-agent/src/fault.rs) and real connections:
//!
//! - the agent dies after the next generation is written and before the switch;
//!   after the switch and before the old slot is rewritten; after the switch and
//!   before the saved state is replaced: a restarted agent enforces exactly one whole
//!   generation, the last one saved, in both slots;
//! - rewriting and repairing the standby slot fail: the agent reports the live
//!   generation as enforced, says the standby slot is behind, refuses further
//!   updates until it is repaired, and a restart repairs it;
//! - the disk is full when the state is saved: the change is refused, nothing is
//!   applied, the saved state is the previous one;
//! - the saved state is corrupt at start: the agent starts, keeps what the pinned
//!   maps enforce, says so, holds directory changes until an apply saves anew;
//! - the event reader panics: it is restarted and counted, events flow again.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use microseg::datapath::{Datapath, DatapathState, LoadOptions, apply::read_slot};
use microseg_tests::{
    client_server::{CLIENT, INVENTORY, SERVER, server_address, server_policy},
    lab::Lab,
    topology::{EchoServers, tcp_exchange},
};
use serde_json::Value;

fn policy(port: u16) -> String {
    server_policy(port)
}

fn server() -> IpAddr {
    server_address()
}

/// Which of the server's ports 80 and 81 the client reaches.
fn reachable(lab: &Lab) -> (bool, bool) {
    let client = &lab.host("app/client").ns;
    (
        tcp_exchange(client, server(), 80),
        tcp_exchange(client, server(), 81),
    )
}

/// A client and a server with echo servers on 80 and 81; the agent started (with
/// `env`) and the inventory and a policy allowing port 80 applied.
fn lab_allowing_80() -> (Lab, EchoServers) {
    let lab = Lab::new(&[("app/client", CLIENT), ("app/server", SERVER)]);
    let servers = EchoServers::start(&lab.host("app/server").ns, &[80, 81]);
    lab.start_agent(&[]);
    let inventory = lab.write("inventory.yaml", INVENTORY);
    let allow_80 = lab.write("allow-80.yaml", &policy(80));
    lab.cli_ok(&[
        "apply",
        "-f",
        &inventory.display().to_string(),
        "-f",
        &allow_80.display().to_string(),
    ]);
    assert_eq!(reachable(&lab), (true, false), "policy A: port 80 only");
    (lab, servers)
}

/// Both generation slots of the pinned maps, as the kernel holds them.
fn slots(lab: &Lab) -> (u32, DatapathState, DatapathState) {
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: Some(lab.pin_dir()),
        ..LoadOptions::default()
    })
    .expect("opening the pinned maps");
    let maps = datapath.maps().expect("maps");
    let live = maps.live_generation().expect("generation");
    let live_slot = (live & 1) as u8;
    (
        live,
        read_slot(&maps, live_slot).expect("live slot"),
        read_slot(&maps, live_slot ^ 1).expect("standby slot"),
    )
}

fn status(lab: &Lab) -> Value {
    serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status json")
}

fn saved_state(lab: &Lab) -> String {
    std::fs::read_to_string(lab.dir.join("state/state.json")).expect("state.json")
}

/// The ports the saved state's objects name (`port: N`, anywhere in them).
fn saved_ports(lab: &Lab) -> Vec<u64> {
    fn collect(value: &Value, ports: &mut Vec<u64>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match value.as_u64() {
                        Some(port) if key == "port" => ports.push(port),
                        _ => collect(value, ports),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| collect(v, ports)),
            _ => {}
        }
    }
    let state: Value = serde_json::from_str(&saved_state(lab)).expect("state.json is JSON");
    let mut ports = Vec::new();
    collect(&state, &mut ports);
    ports
}

/// Applies policy B (port 81 instead of 80) to an agent that dies at `point`, then
/// checks what is enforced without an agent, and after a restart.
fn crash_during_update(point: &str, enforced_after_crash: (bool, bool)) {
    let (lab, _servers) = lab_allowing_80();
    let state_a = slots(&lab).1;
    lab.kill_agent();
    lab.start_agent_env(&[], Some("tc"), &[("MICROSEG_FAULT", point)]);
    let allow_81 = lab.write("allow-81.yaml", &policy(81));
    let answer = lab.cli(&["apply", "-f", &allow_81.display().to_string()]);
    assert!(
        !answer.status.success(),
        "{point}: the apply should have died with the agent"
    );
    assert!(
        lab.wait_agent_exit(Duration::from_secs(5)),
        "{point}: the agent did not die (is it built with the fault-injection feature?)"
    );
    assert!(
        lab.agent_log()
            .contains(&format!("fault injection: dying at {point}")),
        "{point}: the agent died elsewhere:\n{}",
        lab.agent_log()
    );
    // No agent: the kernel enforces one generation, whole.
    let (_, live, _) = slots(&lab);
    assert_eq!(
        reachable(&lab),
        enforced_after_crash,
        "{point}: enforced with no agent running"
    );
    assert!(
        saved_ports(&lab) == [80],
        "{point}: the saved state is the last complete one (policy A)"
    );
    let _ = live;
    // A new agent: the last saved state (A) in both slots, whole.
    lab.start_agent(&[]);
    let (_, live, standby) = slots(&lab);
    assert_eq!(live, standby, "{point}: the slots differ after the restart");
    assert_eq!(
        live, state_a,
        "{point}: the restarted agent enforces policy A"
    );
    assert_eq!(
        reachable(&lab),
        (true, false),
        "{point}: policy A after the restart"
    );
    assert_eq!(status(&lab)["healthy"], true);
}

#[test]
fn death_after_the_standby_slot_is_written_leaves_the_old_generation() {
    if microseg_tests::kernel_available(
        "death_after_the_standby_slot_is_written_leaves_the_old_generation",
    ) {
        crash_during_update("after-standby-write", (true, false));
    }
}

#[test]
fn death_after_the_switch_is_repaired_to_the_saved_generation() {
    if microseg_tests::kernel_available(
        "death_after_the_switch_is_repaired_to_the_saved_generation",
    ) {
        // The new generation was live when the agent died; its apply never
        // completed, so the restart returns to the saved one.
        crash_during_update("after-switch", (false, true));
    }
}

#[test]
fn death_before_the_state_is_saved_returns_to_the_saved_generation() {
    if microseg_tests::kernel_available(
        "death_before_the_state_is_saved_returns_to_the_saved_generation",
    ) {
        crash_during_update("before-state-commit", (false, true));
    }
}

#[test]
fn a_standby_slot_that_cannot_be_rewritten_is_reported_and_repaired() {
    if !microseg_tests::kernel_available(
        "a_standby_slot_that_cannot_be_rewritten_is_reported_and_repaired",
    ) {
        return;
    }
    let (lab, _servers) = lab_allowing_80();
    lab.kill_agent();
    lab.start_agent_env(
        &[],
        Some("tc"),
        &[("MICROSEG_FAULT", "standby-rewrite,standby-repair")],
    );
    let allow_81 = lab.write("allow-81.yaml", &policy(81));
    lab.cli_ok(&["apply", "-f", &allow_81.display().to_string()]);
    // The switch happened: the agent says what is live, and, once its standby
    // writer has tried to rewrite the old slot (after the apply returned), that the
    // standby lags.
    let lags = |reported: &Value| {
        reported["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("standby generation slot"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lags(&status(&lab)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (live_generation, live, standby) = slots(&lab);
    assert_ne!(
        live, standby,
        "the injected failure left the standby slot behind"
    );
    let reported = status(&lab);
    assert_eq!(reported["generation"], live_generation);
    assert_eq!(reported["healthy"], false);
    assert!(
        reported["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("standby generation slot")),
        "{reported:#}"
    );
    assert_eq!(reachable(&lab), (false, true), "policy B is live");
    // Until the standby slot is repaired, no update writes into it.
    let allow_80 = lab.dir.join("allow-80.yaml");
    let refused = lab.cli(&["apply", "-f", &allow_80.display().to_string()]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("standby"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(reachable(&lab), (false, true), "nothing changed");
    // A restart without the fault repairs it: both slots hold B.
    lab.kill_agent();
    lab.start_agent(&[]);
    let (_, live, standby) = slots(&lab);
    assert_eq!(live, standby);
    assert_eq!(status(&lab)["healthy"], true);
    assert_eq!(reachable(&lab), (false, true));
}

/// A small tmpfs mounted over `dir` for as long as it lives.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, bytes: usize) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("microseg-test")
            .arg(dir)
            .status()
            .expect("mount");
        assert!(mounted.success(), "mounting a tmpfs on {}", dir.display());
        Self {
            dir: dir.to_owned(),
        }
    }

    /// Fills what is left with a file; returns it.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = [0u8; 512];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

#[test]
fn a_full_disk_refuses_the_change_and_keeps_the_saved_state() {
    if !microseg_tests::kernel_available("a_full_disk_refuses_the_change_and_keeps_the_saved_state")
    {
        return;
    }
    let lab = Lab::new(&[("app/client", CLIENT), ("app/server", SERVER)]);
    let _servers = EchoServers::start(&lab.host("app/server").ns, &[80, 81]);
    let disk = SmallDisk::mount(&lab.dir.join("state"), 64 * 1024);
    lab.start_agent(&[]);
    let inventory = lab.write("inventory.yaml", INVENTORY);
    let allow_80 = lab.write("allow-80.yaml", &policy(80));
    lab.cli_ok(&[
        "apply",
        "-f",
        &inventory.display().to_string(),
        "-f",
        &allow_80.display().to_string(),
    ]);
    let saved = saved_state(&lab);
    let filler = disk.fill();
    let generation = status(&lab)["generation"].clone();
    let allow_81 = lab.write("allow-81.yaml", &policy(81));
    let refused = lab.cli(&["apply", "-f", &allow_81.display().to_string()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the apply should be refused");
    assert!(
        stderr.contains("cannot be saved") && stderr.contains("No space left"),
        "{stderr}"
    );
    assert_eq!(status(&lab)["generation"], generation, "nothing applied");
    assert_eq!(reachable(&lab), (true, false), "policy A still enforced");
    assert_eq!(
        saved_state(&lab),
        saved,
        "the saved state is the last complete one"
    );
    // Space again: the same change goes through.
    std::fs::remove_file(filler).unwrap();
    lab.cli_ok(&["apply", "-f", &allow_81.display().to_string()]);
    assert_eq!(reachable(&lab), (false, true));
    lab.kill_agent();
    drop(disk);
}

#[test]
fn a_corrupt_saved_state_keeps_the_pinned_enforcement_and_says_so() {
    if !microseg_tests::kernel_available(
        "a_corrupt_saved_state_keeps_the_pinned_enforcement_and_says_so",
    ) {
        return;
    }
    let (lab, _servers) = lab_allowing_80();
    lab.kill_agent();
    std::fs::write(lab.dir.join("state/state.json"), "{\"objects\": [tru").unwrap();
    // A policy in the watched directory that would open port 81: held while the
    // agent cannot know what the API applied.
    lab.write(
        "policies/allow-81.yaml",
        &format!(
            "{INVENTORY}\n---\n{}",
            policy(81).replace("server-ingress", "dir-81")
        ),
    );
    lab.start_agent(&[]);
    let reported = status(&lab);
    assert_eq!(reported["healthy"], false);
    let problems = reported["problems"].to_string();
    assert!(
        problems.contains("saved state cannot be read"),
        "{reported:#}"
    );
    assert_eq!(
        reachable(&lab),
        (true, false),
        "the pinned enforcement stays"
    );
    let kept: Vec<_> = std::fs::read_dir(lab.dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.unreadable-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the unreadable file is kept for inspection");
    // An apply saves a new state: the agent is whole again, with the directory's
    // policy too.
    let inventory = lab.dir.join("inventory.yaml");
    let allow_80 = lab.dir.join("allow-80.yaml");
    lab.cli_ok(&[
        "apply",
        "-f",
        &inventory.display().to_string(),
        "-f",
        &allow_80.display().to_string(),
    ]);
    let reported = status(&lab);
    assert_eq!(reported["healthy"], true, "{reported:#}");
    assert_eq!(
        reachable(&lab),
        (true, true),
        "API's policy and the directory's"
    );
}

#[test]
fn a_panicking_event_reader_is_restarted_and_events_flow_again() {
    if !microseg_tests::kernel_available(
        "a_panicking_event_reader_is_restarted_and_events_flow_again",
    ) {
        return;
    }
    let (lab, _servers) = lab_allowing_80();
    lab.kill_agent();
    lab.start_agent_env(&[], Some("tc"), &[("MICROSEG_FAULT", "event-reader-panic")]);
    // The first deny event makes the reader panic; later ones must still arrive.
    let client = &lab.host("app/client").ns;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(!tcp_exchange(client, server(), 81));
        let restarts = status(&lab)["taskRestarts"]["event-reader"]
            .as_u64()
            .unwrap_or(0);
        let events = lab.cli_ok(&["events", "--last", "50", "-o", "json"]);
        if restarts == 1 && events.contains("\"destination_port\":81") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no event after the reader's restart (restarts {restarts}):\n{}",
            lab.agent_log()
        );
    }
    assert!(lab.agent_log().contains("task panicked"));
    assert_eq!(
        reachable(&lab),
        (true, false),
        "enforcement never depended on it"
    );
}
