//! Support for microseg's kernel and end-to-end tests: the privilege check (a failure
//! under CI, a printed skip elsewhere), and network namespaces and veth pairs that are
//! always removed, even when a test fails.

pub mod corpus;
pub mod fake_apiserver;
pub mod harness;
pub mod lab;
pub mod netns;
pub mod policy_gen;
pub mod policy_judge;
pub mod raw;
pub mod topology;

/// Whether this process may load BPF programs and create network namespaces.
/// Under `CI=true` a missing capability fails the test; elsewhere the test prints why
/// it is skipped and returns false.
pub fn kernel_available(test: &str) -> bool {
    let reason = missing_capability();
    match reason {
        None => true,
        Some(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: {reason}; CI=true requires root, BPF and network namespaces")
        }
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason} (run as root, e.g. `sudo -E cargo xtask test`)");
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
