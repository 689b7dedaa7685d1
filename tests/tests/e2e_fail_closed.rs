//! The agent fails closed too: a step of its own that fails (a veth scan, a binding
//! write), a policy it cannot enforce as written, or another program on its hook
//! never leaves a pod's traffic unjudged. Real agent, real programs, real
//! connections between network namespaces; Kubernetes mode against the test API
//! server where the agent's pods come from it.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use microseg_tests::{
    fake_apiserver::FakeApiServer,
    foreign_tcx::ForeignTcx,
    lab::{Lab, LabHost},
    topology::{EchoServers, tcp_exchange},
};
use serde_json::{Value, json};

const NODE: &str = "test-node";
const CLIENT: &str = "10.80.0.11";
const SERVER: &str = "10.80.0.21";
/// A pod no policy selects: what it receives is judged by nothing but the sender's
/// side.
const OPEN: &str = "10.80.0.31";

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

fn pod(name: &str, role: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "app", "labels": {"role": role},
                        "uid": format!("uid-{name}")},
           "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

/// app/server accepts TCP 80 from role=client.
fn server_policy() -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "server-ingress", "namespace": "app", "uid": "uid-server-ingress"},
           "spec": {"podSelector": {"matchLabels": {"role": "server"}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                                 "ports": [{"protocol": "TCP", "port": 80}]}]}})
}

struct KubeLab {
    lab: Lab,
    api: FakeApiServer,
    _servers: Vec<EchoServers>,
}

/// Three pods on this node (client, server, open), the server's policy allowing TCP
/// 80 from the client, and the agent in Kubernetes mode with `env`.
fn kube_lab(env: &[(&str, &str)]) -> KubeLab {
    let lab = Lab::new(&[
        ("app/client", CLIENT),
        ("app/server", SERVER),
        ("app/open", OPEN),
    ]);
    let servers = vec![
        EchoServers::start(&lab.host("app/server").ns, &[80, 81]),
        EchoServers::start(&lab.host("app/open").ns, &[80]),
    ];
    let api = FakeApiServer::start_in(&lab.node.name);
    api.apply_all(vec![
        namespace("app"),
        pod("client", "client", CLIENT),
        pod("server", "server", SERVER),
        pod("open", "open", OPEN),
        server_policy(),
    ]);
    let kubeconfig = lab.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    start_kubernetes_agent(&lab, &kubeconfig, env);
    let kube = KubeLab {
        lab,
        api,
        _servers: servers,
    };
    let pods: Vec<String> = kube.lab.hosts.iter().map(|h| h.node_if.clone()).collect();
    kube.wait("every pod's veth bound and enforcing", |s| {
        s["healthy"] == true
            && pods.iter().all(|name| {
                interface(s, name)
                    .is_some_and(|i| i["enforcing"] == true && i["workload"].is_string())
            })
    });
    kube
}

fn start_kubernetes_agent(lab: &Lab, kubeconfig: &Path, env: &[(&str, &str)]) {
    lab.start_agent_env(
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--node-name",
            NODE,
            "--pod-sandbox-prefix",
            microseg_tests::lab::POD_SANDBOX_PREFIX,
        ],
        None,
        env,
    );
}

/// The status entry of interface `name`.
fn interface<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["interfaces"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
}

impl KubeLab {
    fn status(&self) -> Value {
        serde_json::from_str(&self.lab.cli_ok(&["status", "-o", "json"])).expect("status json")
    }

    fn wait(&self, what: &str, done: impl Fn(&Value) -> bool) {
        let started = Instant::now();
        loop {
            let status = self.status();
            if done(&status) {
                return;
            }
            if started.elapsed() > Duration::from_secs(20) {
                panic!(
                    "timed out waiting for {what}; status: {status:#}\nagent log:\n{}",
                    self.lab.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts that `from` -> `to`:`port` connects or not.
    fn assert_reaches(&self, from: &LabHost, to: &str, port: u16, allowed: bool) {
        assert_eq!(
            tcp_exchange(&from.ns, to.parse().expect("address"), port),
            allowed,
            "{} -> {to}:{port} should be {}\nstatus: {:#}\nagent log:\n{}",
            from.name,
            if allowed { "allowed" } else { "blocked" },
            self.status(),
            self.lab.agent_log()
        );
    }
}

/// A directory with an `ip` that fails `ip -j link show type veth` while `flag`
/// exists and runs the real one otherwise: a veth scan that fails as it would
/// when iproute2 or the kernel misbehaves.
fn failing_ip(dir: &Path, flag: &Path) -> String {
    let real = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("iproute2's ip");
    let bin = dir.join("fake-bin");
    std::fs::create_dir_all(&bin).expect("fake bin dir");
    let script = format!(
        "#!/bin/sh\nif [ -e {flag} ]; then\n  case \"$*\" in\n    *\"link show type veth\"*) echo 'injected failure' >&2; exit 1 ;;\n  esac\nfi\nexec {real} \"$@\"\n",
        flag = flag.display()
    );
    let path = bin.join("ip");
    std::fs::write(&path, script).expect("fake ip");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn a_failed_veth_scan_keeps_every_pod_enforced() {
    if !microseg_tests::kernel_available("failed_veth_scan") {
        return;
    }
    let scratch = std::env::temp_dir().join(microseg_tests::netns::unique_name("fake-ip-"));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let flag = scratch.join("fail");
    let path = failing_ip(&scratch, &flag);
    let kube = kube_lab(&[("PATH", path.as_str())]);
    let client = kube.lab.host("app/client");
    kube.assert_reaches(client, SERVER, 80, true);
    kube.assert_reaches(client, SERVER, 81, false);

    // Every scan fails from now on: the pods' veths stay attached and bound.
    std::fs::write(&flag, "").expect("flag");
    kube.wait("a failed scan, counted and reported", |s| {
        s["vethScan"]["failures"].as_u64().is_some_and(|n| n >= 2)
            && s["vethScan"]["failing"].is_string()
            && s["healthy"] == false
    });
    let status = kube.status();
    for host in &kube.lab.hosts {
        let entry = interface(&status, &host.node_if).expect("still an interface");
        assert_eq!(
            entry["enforcing"],
            true,
            "{host:?}: {entry:#}",
            host = host.name
        );
        assert_eq!(entry["workload"], host.name.as_str());
    }
    kube.assert_reaches(client, SERVER, 80, true);
    kube.assert_reaches(client, SERVER, 81, false);
    // A pod change while scans fail is still enforced for the pods known.
    let before = kube.status()["generation"].clone();
    kube.api.apply(pod("client", "intruder", CLIENT));
    kube.wait("the relabelled client", |s| s["generation"] != before);
    kube.assert_reaches(client, SERVER, 80, false);

    // Scans work again: reported as such.
    std::fs::remove_file(&flag).expect("flag");
    kube.wait("the scan failure cleared", |s| {
        s["vethScan"]["failing"].is_null() && s["healthy"] == true
    });
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn a_binding_that_cannot_be_written_holds_the_interface_until_it_is_written() {
    if !microseg_tests::kernel_available("binding_write_fails") {
        return;
    }
    let scratch = std::env::temp_dir().join(microseg_tests::netns::unique_name("fault-"));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let flag = scratch.join("binding-write");
    let fault = format!("binding-write@{}", flag.display());
    let kube = kube_lab(&[("MICROSEG_FAULT", fault.as_str())]);

    // From now on binding writes fail. A new pod's sandbox appears; its pod is not
    // known yet.
    std::fs::write(&flag, "").expect("flag");
    let newcomer = kube.lab.new_pod_host("app/newcomer", "10.80.0.41");
    kube.wait("the newcomer's veth held", |s| {
        interface(s, &newcomer.node_if)
            .is_some_and(|i| i["held"].is_string() && i["enforcing"] == true)
            && s["problems"].as_array().is_some_and(|p| {
                p.iter().any(|p| {
                    p.as_str()
                        .is_some_and(|p| p.contains("bindings not written"))
                })
            })
    });
    // Held: it reaches nothing beyond its link, even a pod no policy selects, and
    // nothing reaches it.
    kube.assert_reaches(&newcomer, OPEN, 80, false);

    // The write works again: retried without any other change, the veth is bound
    // (awaiting policy: its pod is still unknown) and judged by the full programs.
    std::fs::remove_file(&flag).expect("flag");
    kube.wait("the newcomer's binding written", |s| {
        interface(s, &newcomer.node_if)
            .is_some_and(|i| i["held"].is_null() && i["awaitingPolicy"] == true)
            && s["healthy"] == true
    });
    kube.assert_reaches(&newcomer, OPEN, 80, false);
    // Its pod is reported: bound to it, and what policy allows passes.
    kube.api.apply(pod("newcomer", "client", "10.80.0.41"));
    kube.wait("the newcomer bound to its pod", |s| {
        interface(s, &newcomer.node_if).is_some_and(|i| i["workload"] == "app/newcomer")
    });
    kube.assert_reaches(&newcomer, OPEN, 80, true);
    kube.assert_reaches(&newcomer, SERVER, 80, true);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// A NetworkPolicy the API server accepts and microseg cannot enforce as written
/// (an IPv4-mapped IPv6 ipBlock), selecting the open pod.
fn unreadable_policy() -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "open-ingress", "namespace": "app", "uid": "uid-open-ingress"},
           "spec": {"podSelector": {"matchLabels": {"role": "open"}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"ipBlock": {"cidr": "::ffff:10.80.0.0/120"}}],
                                 "ports": [{"protocol": "TCP", "port": 80}]}]}})
}

#[test]
fn a_policy_microseg_refuses_still_isolates_what_it_selects() {
    if !microseg_tests::kernel_available("refused_policy_isolates") {
        return;
    }
    let kube = kube_lab(&[]);
    let client = kube.lab.host("app/client");
    kube.assert_reaches(client, OPEN, 80, true);

    // A NetworkPolicy microseg cannot read selects the open pod: it is isolated
    // for ingress (deny-all), reported on the object, in status and the log.
    kube.api.apply(unreadable_policy());
    kube.wait("the refused policy reported", |s| {
        s["refusedPolicies"].as_array().is_some_and(|r| {
            r.iter()
                .any(|r| r["kind"] == "NetworkPolicy" && r["name"] == "open-ingress")
        }) && s["healthy"] == false
    });
    kube.assert_reaches(client, OPEN, 80, false);
    // The rest is enforced as before.
    kube.assert_reaches(client, SERVER, 80, true);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let refused =
            kube.api.posted_events().into_iter().find(|e| {
                e["reason"] == "PolicyRefused" && e["regarding"]["name"] == "open-ingress"
            });
        if let Some(event) = refused {
            assert_eq!(event["regarding"]["kind"], "NetworkPolicy");
            assert_eq!(event["regarding"]["namespace"], "app");
            assert_eq!(event["type"], "Warning");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no PolicyRefused event on the policy: {:#?}",
            kube.api.posted_events()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(kube.lab.agent_log().contains("open-ingress"));

    // An Admin ClusterNetworkPolicy with a priority out of range whose rule denies
    // the client -> server:80 that the NetworkPolicy allows: its Deny is enforced.
    kube.api.apply(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "deny-client", "uid": "uid-deny-client"},
        "spec": {"tier": "Admin", "priority": 5000,
                 "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "server"}}}},
                 "ingress": [{"name": "no-clients", "action": "Deny",
                              "from": [{"pods": {"namespaceSelector": {},
                                                 "podSelector": {"matchLabels": {"role": "client"}}}}],
                              "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}}));
    kube.wait("the refused cluster policy reported", |s| {
        s["refusedPolicies"].as_array().is_some_and(|r| {
            r.iter()
                .any(|r| r["kind"] == "ClusterNetworkPolicy" && r["name"] == "deny-client")
        })
    });
    kube.assert_reaches(client, SERVER, 80, false);

    // Fixed in the API server: enforced as written again, and reported so.
    kube.api.delete("ClusterNetworkPolicy", "", "deny-client");
    let mut fixed = unreadable_policy();
    fixed["spec"]["ingress"][0]["from"][0]["ipBlock"]["cidr"] = json!("10.80.0.0/24");
    kube.api.apply(fixed);
    kube.wait("no refusal left", |s| {
        s["refusedPolicies"].as_array().is_some_and(Vec::is_empty) && s["healthy"] == true
    });
    kube.assert_reaches(client, OPEN, 80, true);
    kube.assert_reaches(client, SERVER, 80, true);
}

#[test]
fn a_refused_policy_file_in_a_watched_directory_isolates_what_it_selects() {
    if !microseg_tests::kernel_available("refused_policy_file") {
        return;
    }
    let lab = Lab::new(&[("client", CLIENT), ("server", SERVER)]);
    let _servers = EchoServers::start(&lab.host("server").ns, &[80]);
    lab.write(
        "policies/inventory.yaml",
        &format!(
            "apiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {{name: client, namespace: app, labels: {{role: client}}}}\nspec: {{addresses: [{CLIENT}]}}\n---\napiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {{name: server, namespace: app, labels: {{role: server}}}}\nspec: {{addresses: [{SERVER}]}}\n"
        ),
    );
    lab.start_agent(&[]);
    let client = lab.host("client");
    assert!(tcp_exchange(&client.ns, SERVER.parse().unwrap(), 80));

    // A policy file with a field this version does not know (misspelt): the
    // server is isolated for ingress rather than left open.
    lab.write(
        "policies/server.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server, namespace: app}\nspec:\n  podSelector: {matchLabels: {role: server}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {role: client}}}]\n    ports: [{port: 80, protocl: TCP}]\n",
    );
    let started = Instant::now();
    loop {
        let status: Value =
            serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status");
        if status["refusedPolicies"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["name"] == "server"))
        {
            assert!(
                status["refusedPolicies"][0]["reasons"][0]
                    .as_str()
                    .is_some_and(|r| r.contains("protocl")),
                "{status:#}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the refused file was not reported: {status:#}\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !tcp_exchange(&client.ns, SERVER.parse().unwrap(), 80),
        "the refused policy must isolate the server\n{}",
        lab.agent_log()
    );
    // `microseg apply` of the same file is refused whole, with the error.
    let applied = lab.cli(&[
        "apply",
        "-f",
        &lab.policy_dir().join("server.yaml").display().to_string(),
    ]);
    assert!(!applied.status.success());
    assert!(String::from_utf8_lossy(&applied.stderr).contains("protocl"));
}

#[test]
fn a_program_put_before_microseg_on_its_hook_cannot_let_packets_bypass_it() {
    if !microseg_tests::kernel_available("tcx_order") {
        return;
    }
    let lab = Lab::new(&[("client", CLIENT), ("server", SERVER)]);
    let _servers = EchoServers::start(&lab.host("server").ns, &[80, 81]);
    lab.write(
        "policies/policy.yaml",
        &format!(
            "apiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {{name: client, namespace: app, labels: {{role: client}}}}\nspec: {{addresses: [{CLIENT}]}}\n---\napiVersion: microseg.dev/v1\nkind: Workload\nmetadata: {{name: server, namespace: app, labels: {{role: server}}}}\nspec: {{addresses: [{SERVER}]}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: app}}\nspec:\n  podSelector: {{matchLabels: {{role: server}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]\n    ports: [{{port: 80}}]\n"
        ),
    );
    let server = lab.host("server");
    let client = lab.host("client");
    // Before the agent starts: a pass-everything program on the hooks that carry
    // client -> server (the client's veth receives, the server's delivers).
    let early = [
        ForeignTcx::attach_first(&lab.node, &client.node_if, true),
        ForeignTcx::attach_first(&lab.node, &server.node_if, false),
    ];
    lab.start_agent(&[]);
    let connects = |port| tcp_exchange(&client.ns, SERVER.parse().unwrap(), port);
    assert!(
        !connects(81),
        "denied while another program is on the hook\n{}",
        lab.agent_log()
    );
    assert!(connects(80));
    // Allowed packets go on to the programs after microseg's.
    let seen = early[1].packets();
    assert!(seen > 0, "the program after microseg saw nothing");

    // Attached ahead of microseg while the agent runs: the next check puts microseg
    // first again.
    let late = [
        ForeignTcx::attach_first(&lab.node, &client.node_if, true),
        ForeignTcx::attach_first(&lab.node, &server.node_if, false),
    ];
    let started = Instant::now();
    while !lab.agent_log().contains("attached first again") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "microseg was not put first again\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !connects(81),
        "denied again once microseg is first\n{}",
        lab.agent_log()
    );
    let before = late[1].packets();
    assert!(connects(80));
    assert!(
        late[1].packets() > before,
        "allowed packets reach the later program"
    );
    let status: Value =
        serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status");
    assert_eq!(status["healthy"], true, "{status:#}");
}

#[test]
fn an_agent_without_a_policy_directory_has_no_watcher_failing_in_a_loop() {
    if !microseg_tests::kernel_available("no_policy_dir") {
        return;
    }
    let lab = Lab::new(&[("client", CLIENT)]);
    // As `Lab::start_agent`, without `--policy-dir`.
    let log = std::fs::File::create(lab.dir.join("agent.log")).expect("log");
    let mut agent = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", lab.node.name))
        .arg(microseg_tests::lab::microseg_binary())
        .args(["agent", "--metrics-address", ""])
        .arg("--socket")
        .arg(lab.socket())
        .arg("--state-dir")
        .arg(lab.dir.join("state"))
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .stderr(log)
        .spawn()
        .expect("agent");
    lab.wait_ready();
    // A task that ended would be restarted after 100, 200, 400 ms...
    std::thread::sleep(Duration::from_millis(1500));
    let status: Value =
        serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status");
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        status["taskRestarts"].get("directory-watcher").is_none(),
        "{status:#}"
    );
    assert!(!lab.agent_log().contains("ERROR"), "{}", lab.agent_log());
}
