//! Support for microseg's kernel and end-to-end tests: the privilege check (a failure
//! under CI, a recorded skip elsewhere), and network namespaces and veth pairs that
//! are always removed, even when a test fails.

pub mod bpf_stack;
pub mod client_server;
pub mod cluster;
pub mod cluster_conformance;
pub mod cluster_run;
pub mod cluster_scaling;
pub mod corpus;
pub mod fake_apiserver;
pub mod foreign_tcx;
pub mod fuzz;
pub mod harness;
pub mod lab;
pub mod netns;
pub mod policy_gen;
pub mod policy_judge;
pub mod proc_stats;
pub mod raw;
pub mod topology;

/// The file where skipped tests are recorded, one `test<TAB>reason` line each;
/// `cargo xtask test` sets it and counts those tests as skipped, not passed (libtest
/// has no runtime skip: a test that returns early reports "ok").
pub const SKIP_LOG_ENV: &str = "MICROSEG_SKIP_LOG";

/// Records that `test` is skipped and why (see [`SKIP_LOG_ENV`]).
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Ok(path) = std::env::var(SKIP_LOG_ENV) {
        use std::io::Write;
        let line = format!("{test}\t{reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(error) = written {
            panic!("{test} is skipped ({reason}) but {path} cannot record it: {error}");
        }
    }
}

/// Whether this process may load BPF programs and create network namespaces.
/// Under `CI=true` a missing capability fails the test; elsewhere the test is
/// recorded as skipped (with why) and this returns false.
pub fn kernel_available(test: &str) -> bool {
    let reason = missing_capability();
    match reason {
        None => true,
        Some(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: {reason}; CI=true requires root, BPF and network namespaces")
        }
        Some(reason) => {
            skip(
                test,
                &format!("{reason} (run as root, e.g. `sudo -E cargo xtask test`)"),
            );
            false
        }
    }
}

fn missing_capability() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".to_owned());
    }
    if !std::path::Path::new("/sys/fs/bpf").exists() {
        return Some("/sys/fs/bpf does not exist".to_owned());
    }
    if !std::path::Path::new("/proc/self/ns/net").exists() {
        return Some("network namespaces are not available".to_owned());
    }
    None
}
