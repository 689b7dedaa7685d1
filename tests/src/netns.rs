//! Network namespaces and veth pairs created by a test and removed on drop.

use std::{
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

/// Runs a command, failing with its stderr if it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A name unique to this process and call, short enough for an interface name
/// (15 bytes at most).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}{n}", std::process::id() % 100_000)
}

/// A network namespace, deleted (with its interfaces) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        // No duplicate address detection: addresses (link-local ones included) are
        // usable at once, so IPv6 neighbour discovery does not stall the first probe.
        for conf in ["all", "default"] {
            ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{conf}.accept_dad=0"),
            ]);
        }
        ns
    }

    /// Runs a command inside the namespace; panics if it fails.
    pub fn exec(&self, command: &[&str]) -> Output {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(command);
        run("ip", &args)
    }

    /// Runs a command inside the namespace and returns its output, success or not.
    pub fn try_exec(&self, command: &[&str]) -> Output {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(command);
        Command::new("ip")
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("ip {args:?}: {e}"))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// A veth pair joining two namespaces, with one address each.
pub struct VethLink {
    /// Interface name inside namespace `a` and `b`.
    pub a_if: String,
    pub b_if: String,
}

impl VethLink {
    /// Creates `a_if` in `a` and `b_if` in `b`, assigns the CIDR addresses
    /// (e.g. "10.99.0.1/24", "fd00:99::1/64"), and brings both up.
    pub fn new(a: &NetNs, a_addrs: &[&str], b: &NetNs, b_addrs: &[&str]) -> Self {
        let a_if = unique_name("ma");
        let b_if = unique_name("mb");
        run(
            "ip",
            &[
                "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if,
                "netns", &b.name,
            ],
        );
        for (ns, ifname, addrs) in [(a, &a_if, a_addrs), (b, &b_if, b_addrs)] {
            for addr in addrs {
                let mut cmd = vec!["ip", "addr", "add", addr, "dev", ifname.as_str()];
                if addr.contains(':') {
                    cmd.push("nodad");
                }
                ns.exec(&cmd);
            }
            ns.exec(&["ip", "link", "set", ifname, "up"]);
        }
        Self { a_if, b_if }
    }
}

impl NetNs {
    /// Runs `f` on a thread that has entered this namespace: sockets it opens, and
    /// interfaces it names, are this namespace's.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = std::fs::File::open(&path)
                        .unwrap_or_else(|e| panic!("opening {path}: {e}"));
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("entering {path}: {e}"));
                    f()
                })
                .join()
                .expect("thread in namespace panicked")
        })
    }
}
