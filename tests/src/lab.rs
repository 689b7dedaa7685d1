//! A small network of hosts for the demo and the agent's end-to-end tests: each host
//! in its own network namespace, all joined by a bridge in a "node" namespace, like
//! pods on a Kubernetes node. The agent runs in the node namespace and attaches TC to
//! each host's node-side veth, as it would to a pod's host-side veth.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{NetNs, run, unique_name};

pub struct LabHost {
    pub name: String,
    pub address: IpAddr,
    /// `fd80::` and the last byte of `address`.
    pub address6: IpAddr,
    pub ns: NetNs,
    /// The veth end in the host's namespace.
    pub host_if: String,
    /// The veth end in the node namespace, where the agent attaches.
    pub node_if: String,
}

/// The IPv6 address of a lab host: `fd80::` and the last byte of its IPv4 address.
pub fn lab_address6(address: IpAddr) -> IpAddr {
    address6_in("fd80::", address)
}

/// `prefix` (`fd80::`, ending in `::`) and the last byte of the IPv4 `address`.
pub fn address6_in(prefix: &str, address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => format!("{prefix}{}", v4.octets()[3])
            .parse()
            .expect("address"),
        IpAddr::V6(v6) => IpAddr::V6(v6),
    }
}

/// The names of the network namespaces of a lab's pods (hosts named
/// `namespace/name`) start with this; Kubernetes-mode agents are told so.
pub const POD_SANDBOX_PREFIX: &str = "mpod";

pub struct Lab {
    pub node: NetNs,
    pub hosts: Vec<LabHost>,
    pub dir: PathBuf,
    /// The /64 of the hosts' IPv6 addresses (`fd80::`).
    prefix6: String,
    agent: std::sync::Mutex<Option<Child>>,
}

/// The `microseg` binary next to the running executable (target/<profile>/).
pub fn microseg_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let binary = dir.join("microseg");
    assert!(
        binary.exists(),
        "{} is missing: build it first (cargo build -p microseg-agent)",
        binary.display()
    );
    binary
}

impl Lab {
    /// Hosts given as (name, IPv4 address in 10.80.0.0/24); each also gets
    /// `fd80::<last byte>/64`.
    pub fn new(hosts: &[(&str, &str)]) -> Self {
        Self::with_prefix6(hosts, "fd80::")
    }

    /// Like [`Lab::new`], the hosts' IPv6 addresses in `prefix6` (`fd90:1::`, a
    /// /64): labs that are nodes of one simulated cluster each have their own.
    pub fn with_prefix6(hosts: &[(&str, &str)], prefix6: &str) -> Self {
        let node = NetNs::new("mnode");
        node.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        node.exec(&["ip", "link", "set", "br0", "up"]);
        let mut lab_hosts = Vec::new();
        for (name, address) in hosts {
            let address: IpAddr = address.parse().expect("address");
            let host = LabHost {
                name: name.to_string(),
                address,
                address6: address6_in(prefix6, address),
                // Pods (`namespace/name`) get sandbox-like namespace names, as
                // containerd's `cni-`: a Kubernetes-mode agent enforces their veths
                // from the moment it finds them.
                ns: NetNs::new(if name.contains('/') {
                    POD_SANDBOX_PREFIX
                } else {
                    "mh"
                }),
                host_if: unique_name("eh"),
                node_if: unique_name("en"),
            };
            link_host(&node, &host);
            lab_hosts.push(host);
        }
        let dir = std::env::temp_dir().join(unique_name("microseg-lab-"));
        std::fs::create_dir_all(dir.join("policies")).expect("lab dir");
        Self {
            node,
            hosts: lab_hosts,
            dir,
            prefix6: prefix6.to_owned(),
            agent: std::sync::Mutex::new(None),
        }
    }

    /// A pod's sandbox made while the lab runs (a pod scheduled to this node): a
    /// network namespace named like the lab's other pods', its veth on the node's
    /// bridge, its addresses given as the others'. The caller keeps it; its
    /// namespace and veth go when it is dropped.
    pub fn new_pod_host(&self, name: &str, address: &str) -> LabHost {
        let address: IpAddr = address.parse().expect("address");
        let host = LabHost {
            name: name.to_owned(),
            address,
            address6: address6_in(&self.prefix6, address),
            ns: NetNs::new(POD_SANDBOX_PREFIX),
            host_if: unique_name("eh"),
            node_if: unique_name("en"),
        };
        link_host(&self.node, &host);
        host
    }

    /// Deletes every host's veth pair and creates it again under the same names and
    /// addresses (a pod restarted, a StatefulSet pod back on its node): the new
    /// interfaces have new indexes and no programs.
    pub fn recreate_links(&self) {
        for host in &self.hosts {
            self.node.exec(&["ip", "link", "delete", &host.node_if]);
            link_host(&self.node, host);
        }
    }

    /// Waits until every host answers pings from the first one, over IPv4 and IPv6
    /// (IPv6 on a new link is usable only after the kernel's link watch has run).
    pub fn wait_reachable(&self) {
        let first = &self.hosts[0];
        for host in &self.hosts[1..] {
            for address in [host.address, host.address6] {
                let ready = (0..40).any(|_| {
                    first
                        .ns
                        .try_exec(&["ping", "-c1", "-W1", &address.to_string()])
                        .status
                        .success()
                });
                assert!(ready, "{address} never answered a ping from {}", first.name);
            }
        }
    }

    /// Waits until both ends of every host's veth are up and the node-side end
    /// forwards on the bridge: reachability without sending a packet, for when an
    /// agent is running and would judge a ping by policy.
    pub fn wait_links_up(&self) {
        let read = |ns: &NetNs, path: String| {
            let output = ns.try_exec(&["cat", &path]);
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        };
        let deadline = Instant::now() + Duration::from_secs(40);
        for host in &self.hosts {
            loop {
                let host_up = read(
                    &host.ns,
                    format!("/sys/class/net/{}/operstate", host.host_if),
                ) == "up";
                let node_up = read(
                    &self.node,
                    format!("/sys/class/net/{}/operstate", host.node_if),
                ) == "up";
                // 3: BR_STATE_FORWARDING.
                let forwarding = read(
                    &self.node,
                    format!("/sys/class/net/{}/brport/state", host.node_if),
                ) == "3";
                if host_up && node_up && forwarding {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}'s link never came up (host end up: {host_up}, node end up: {node_up}, forwarding: {forwarding})",
                    host.name
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Probes every ordered pair of hosts on `tcp_ports` and `udp_ports`, IPv4 and
    /// IPv6, in parallel: each connection (an echo exchange, see
    /// [`crate::topology::EchoServers`]) must complete exactly when the reference
    /// evaluator allows it under `set`. Returns (allowed, denied); panics listing every
    /// disagreement, with the agent's log.
    pub fn check_matrix(
        &self,
        set: &microseg::policy::PolicySet,
        tcp_ports: &[u16],
        udp_ports: &[u16],
        when: &str,
    ) -> (usize, usize) {
        use microseg::policy::{Flow, Protocol, evaluate};
        let mut flows = Vec::new();
        for src in &self.hosts {
            for dst in self.hosts.iter().filter(|dst| dst.name != src.name) {
                for (src_address, dst_address) in
                    [(src.address, dst.address), (src.address6, dst.address6)]
                {
                    let ports = tcp_ports
                        .iter()
                        .map(|port| (Protocol::Tcp, *port))
                        .chain(udp_ports.iter().map(|port| (Protocol::Udp, *port)));
                    for (protocol, port) in ports {
                        let flow = Flow {
                            src: src_address,
                            dst: dst_address,
                            protocol,
                            port,
                        };
                        flows.push((src, flow));
                    }
                }
            }
        }
        let results: Vec<(Flow, bool, bool)> = std::thread::scope(|scope| {
            let handles: Vec<_> = flows
                .iter()
                .map(|(src, flow)| {
                    scope.spawn(move || {
                        let expected = evaluate(set, flow).allowed;
                        let completed = match flow.protocol {
                            Protocol::Tcp => {
                                crate::topology::tcp_exchange(&src.ns, flow.dst, flow.port)
                            }
                            _ => crate::topology::udp_exchange(&src.ns, flow.dst, flow.port),
                        };
                        (*flow, expected, completed)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("probe"))
                .collect()
        });
        let wrong: Vec<String> = results
            .iter()
            .filter(|(_, expected, completed)| expected != completed)
            .map(|(flow, expected, completed)| {
                format!("{flow}: the reference evaluator says allowed={expected}, the connection completed: {completed}")
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{when}: {} of {} connections wrong:\n{}\nagent log:\n{}",
            wrong.len(),
            results.len(),
            wrong.join("\n"),
            self.agent_log()
        );
        let allowed = results.iter().filter(|(_, expected, _)| *expected).count();
        (allowed, results.len() - allowed)
    }

    /// The MAC address of a host's own interface.
    pub fn mac_of(&self, name: &str) -> [u8; 6] {
        let host = self.host(name);
        let output = host
            .ns
            .exec(&["cat", &format!("/sys/class/net/{}/address", host.host_if)]);
        let text = String::from_utf8_lossy(&output.stdout);
        let bytes: Vec<u8> = text
            .trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("mac"))
            .collect();
        bytes.try_into().expect("six bytes")
    }

    pub fn host(&self, name: &str) -> &LabHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("microseg.sock")
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf").join(self.dir.file_name().expect("lab dir name"))
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.join("policies")
    }

    /// Starts `microseg agent` in the node namespace, enforcing on every host's
    /// node-side veth (TC), with its state, pins and socket private to this lab.
    pub fn start_agent(&self, extra: &[&str]) {
        self.start_agent_with(extra, true);
    }

    /// Like [`Lab::start_agent`]; with `attach_hosts` false no `--interface` is
    /// given and the agent finds the veths itself (Kubernetes mode).
    pub fn start_agent_with(&self, extra: &[&str], attach_hosts: bool) {
        self.start_agent_attached(extra, attach_hosts.then_some("tc"));
    }

    /// Starts the agent in Kubernetes mode as node `node`, its API server given by
    /// `kubeconfig`: it finds its pods' veths itself.
    pub fn start_kubernetes_agent(&self, kubeconfig: &Path, node: &str) {
        self.start_kubernetes_agent_with(kubeconfig, node, &[]);
    }

    /// [`Lab::start_kubernetes_agent`] with more flags (`--config FILE`, ...).
    pub fn start_kubernetes_agent_with(&self, kubeconfig: &Path, node: &str, extra: &[&str]) {
        let kubeconfig = kubeconfig.display().to_string();
        let mut args = vec![
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            node,
            "--pod-sandbox-prefix",
            POD_SANDBOX_PREFIX,
        ];
        args.extend_from_slice(extra);
        self.start_agent_with(&args, false);
    }

    /// Starts the agent with every host's node-side veth attached in `mode`
    /// (`tc`, `xdp`, ...), or none.
    pub fn start_agent_attached(&self, extra: &[&str], mode: Option<&str>) {
        self.start_agent_env(extra, mode, &[]);
    }

    /// Like [`Lab::start_agent_attached`], with environment variables for the agent
    /// (e.g. `MICROSEG_FAULT`); waits until it answers.
    pub fn start_agent_env(&self, extra: &[&str], mode: Option<&str>, env: &[(&str, &str)]) {
        // nsenter switches only the network namespace (`ip netns exec` would also
        // mount a fresh /sys, hiding bpffs) and execs the agent in place.
        let mut args: Vec<String> = vec![
            format!("--net=/var/run/netns/{}", self.node.name),
            microseg_binary().display().to_string(),
            "agent".into(),
            "--socket".into(),
            self.socket().display().to_string(),
            "--state-dir".into(),
            self.dir.join("state").display().to_string(),
            "--pin-dir".into(),
            self.pin_dir().display().to_string(),
            "--policy-dir".into(),
            self.policy_dir().display().to_string(),
            "--event-log".into(),
            self.dir.join("events.jsonl").display().to_string(),
        ];
        // No metrics endpoint unless the test asks for one.
        if !extra.contains(&"--metrics-address") {
            args.push("--metrics-address".into());
            args.push(String::new());
        }
        for host in self.hosts.iter().filter(|_| mode.is_some()) {
            args.push("--interface".into());
            args.push(format!("{}:{}", host.node_if, mode.unwrap_or("tc")));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent log");
        let child = Command::new("nsenter")
            .args(&args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the agent");
        *self.agent.lock().expect("agent lock") = Some(child);
        self.wait_ready();
    }

    /// The agent's metrics page, from `address` (ip:port) in the node's namespace,
    /// where the agent runs.
    pub fn metrics(&self, address: &str) -> String {
        use std::io::{Read, Write};
        let address = address.to_owned();
        self.node.run_in(move || {
            let mut stream = std::net::TcpStream::connect(&address)
                .unwrap_or_else(|e| panic!("connecting to the metrics endpoint {address}: {e}"));
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: microseg\r\n\r\n")
                .expect("metrics request");
            let mut response = String::new();
            stream
                .read_to_string(&mut response)
                .expect("metrics response");
            response
        })
    }

    /// Waits until the agent answers `status`.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.cli(&["status", "-o", "json"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the agent did not become ready; its log:\n{}",
            self.agent_log()
        );
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Waits until the agent process has ended by itself (an injected crash); true if
    /// it did within `limit`.
    pub fn wait_agent_exit(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let mut agent = self.agent.lock().expect("agent lock");
            match agent.as_mut().map(|child| child.try_wait()) {
                None => return true,
                Some(Ok(Some(_))) => {
                    *agent = None;
                    return true;
                }
                _ => {}
            }
            drop(agent);
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The agent's process id, while it runs (nsenter execs it in place).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent
            .lock()
            .expect("agent lock")
            .as_ref()
            .map(Child::id)
    }

    /// Kills the agent with SIGKILL (no cleanup runs).
    pub fn kill_agent(&self) {
        if let Some(mut child) = self.agent.lock().expect("agent lock").take() {
            // nsenter execs the agent, so the child pid is the agent's.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop_agent(&self) {
        if let Some(mut child) = self.agent.lock().expect("agent lock").take() {
            // SAFETY: kill(2) with a pid we own and a valid signal number.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Runs the CLI against this lab's agent.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(microseg_binary())
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("running microseg")
    }

    /// Runs the CLI and returns stdout; panics with stderr if it fails.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "microseg {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Inventory of the lab's hosts as microseg Workload documents (namespace and
    /// labels given per host).
    pub fn write(&self, relative: &str, text: &str) -> PathBuf {
        let path = self.dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("dir");
        }
        std::fs::write(&path, text).expect("write");
        path
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_agent();
        let _ = microseg::datapath::detach_pinned(&self.pin_dir());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates the host's veth pair: its end in its namespace with its addresses, the
/// other end in the node namespace on the bridge.
fn link_host(node: &NetNs, host: &LabHost) {
    run(
        "ip",
        &[
            "link",
            "add",
            &host.host_if,
            "netns",
            &host.ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &host.node_if,
            "netns",
            &node.name,
        ],
    );
    host.ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{}/24", host.address),
        "dev",
        &host.host_if,
    ]);
    host.ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{}/64", host.address6),
        "dev",
        &host.host_if,
        "nodad",
    ]);
    host.ns.exec(&["ip", "link", "set", &host.host_if, "up"]);
    node.exec(&["ip", "link", "set", &host.node_if, "master", "br0"]);
    node.exec(&["ip", "link", "set", &host.node_if, "up"]);
}
