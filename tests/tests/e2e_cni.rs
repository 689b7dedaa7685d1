//! The chained CNI plugin end to end, with the test as the container runtime: it
//! makes each pod's network namespace, runs the real reference plugins (Debian's
//! containernetworking-plugins: `bridge` with `host-local`) and then `microseg-cni`
//! as a runtime runs a configuration list (each plugin's object with the list's
//! `name` and `cniVersion`, the previous result as `prevResult`; DEL in reverse
//! order with the cached result), while the agent runs in Kubernetes mode against
//! the test's API server, in the node's network namespace.
//!
//! The pods' namespaces are not named like pod sandboxes (`mpod`, the prefix the
//! agent is given), and the agent's periodic interface check is an hour apart: a
//! veth whose pod the API server has not reported can only be enforced because
//! microseg-cni's ADD asked for it.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use microseg_tests::{
    fake_apiserver::FakeApiServer,
    lab::{Lab, POD_SANDBOX_PREFIX, microseg_binary},
    netns::NetNs,
    topology::{EchoServers, tcp_exchange},
};
use serde_json::{Value, json};

const NODE: &str = "test-node";
const NETWORK: &str = "microseg-test";
const CNI_VERSION: &str = "1.0.0";
/// Where Debian's containernetworking-plugins puts the reference plugins.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// The bridge `bridge` makes in the node's namespace (gateway of both subnets).
const BRIDGE: &str = "mcnibr0";
/// Pods' namespaces: not a pod sandbox prefix the agent knows (`mpod`).
const POD_NETNS_PREFIX: &str = "mcni";
const NO_POLICY_YET: &str = "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION";

/// `microseg-cni`, built beside `microseg`.
fn plugin_binary() -> PathBuf {
    let binary = microseg_binary().with_file_name("microseg-cni");
    assert!(
        binary.exists(),
        "{} is missing: build it first (cargo build -p microseg-cni)",
        binary.display()
    );
    binary
}

/// Whether the reference plugins are installed; under CI=true they must be
/// (`cargo xtask setup` installs them), elsewhere the test is skipped.
fn reference_plugins_available(test: &str) -> bool {
    let present = ["bridge", "host-local"].iter().all(|plugin| {
        std::path::Path::new(REFERENCE_PLUGINS)
            .join(plugin)
            .exists()
    });
    if present {
        return true;
    }
    let reason = format!(
        "the CNI reference plugins are not in {REFERENCE_PLUGINS} (Debian package containernetworking-plugins; `cargo xtask setup` installs it)"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {reason}");
    }
    microseg_tests::skip(test, &reason);
    false
}

/// A pod's sandbox as the runtime holds it: its network namespace, container id,
/// interface name and `CNI_ARGS`.
struct Sandbox {
    ns: NetNs,
    container_id: String,
    args: String,
}

impl Sandbox {
    fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.ns.name)
    }
}

/// One plugin's exit, stdout parsed when it is JSON.
#[derive(Debug)]
struct PluginRun {
    plugin: String,
    output: Output,
}

impl PluginRun {
    fn ok(&self) -> bool {
        self.output.status.success()
    }

    fn stdout_json(&self) -> Value {
        serde_json::from_slice(&self.output.stdout).unwrap_or_else(|e| {
            panic!(
                "{} printed no JSON ({e}): {:?}",
                self.plugin,
                String::from_utf8_lossy(&self.output.stdout)
            )
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} exited {}; stdout: {}; stderr: {}",
            self.plugin,
            self.output.status,
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }
}

/// The node: its namespace with the agent (a [`Lab`] without hosts), the API
/// server, and the network's configuration list.
struct Runtime {
    lab: Lab,
    api: FakeApiServer,
    plugins: Vec<Value>,
}

impl Runtime {
    /// The node with the API server holding namespace `app` and a policy letting
    /// app pods labelled role=client reach role=server pods on TCP 80; the agent
    /// runs and has enforced that.
    fn start() -> Self {
        let runtime = Self::without_agent();
        runtime.start_agent();
        runtime.wait("the first sync", |s| {
            s["policies"] == 1 && s["generation"].is_u64()
        });
        runtime
    }

    fn without_agent() -> Self {
        let lab = Lab::new(&[]);
        let api = FakeApiServer::start_in(&lab.node.name);
        api.set_crd_installed(false);
        api.apply_all(vec![
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": "app", "labels": {"kubernetes.io/metadata.name": "app"}}}),
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "server-ingress", "namespace": "app"},
                   "spec": {"podSelector": {"matchLabels": {"role": "server"}},
                            "policyTypes": ["Ingress"],
                            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                                         "ports": [{"protocol": "TCP", "port": 80}]}]}}),
        ]);
        api.write_kubeconfig(&lab.dir.join("kubeconfig"));
        let ipam_dir = lab.dir.join("ipam");
        let plugins = vec![
            json!({"type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": false,
                   "ipam": {"type": "host-local", "dataDir": ipam_dir,
                            "ranges": [[{"subnet": "10.83.0.0/24"}], [{"subnet": "fd83::/64"}]]}}),
            json!({"type": "microseg-cni", "socket": lab.socket(), "timeoutSeconds": 20}),
        ];
        Self { lab, api, plugins }
    }

    /// The agent in Kubernetes mode; its periodic interface check an hour apart.
    fn start_agent(&self) {
        let config = self
            .lab
            .write("agent.yaml", "interfaceScanMs: 3600000\n")
            .display()
            .to_string();
        let kubeconfig = self.lab.dir.join("kubeconfig").display().to_string();
        self.lab.start_agent_with(
            &[
                "--config",
                &config,
                "--kubernetes",
                "--kubeconfig",
                &kubeconfig,
                "--node-name",
                NODE,
                "--pod-sandbox-prefix",
                POD_SANDBOX_PREFIX,
            ],
            false,
        );
    }

    fn sandbox(&self, pod: &str) -> Sandbox {
        let ns = NetNs::new(POD_NETNS_PREFIX);
        Sandbox {
            container_id: format!("container-{}", ns.name),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=app;K8S_POD_NAME={pod}"),
            ns,
        }
    }

    /// Runs plugin `plugin` (the list's `index`-th) for `command` in the node's
    /// namespace, as the runtime does: the plugin's object with the list's name and
    /// version, and `prev_result` when given.
    fn invoke(
        &self,
        index: usize,
        command: &str,
        sandbox: &Sandbox,
        prev_result: Option<&Value>,
    ) -> PluginRun {
        let mut config = self.plugins[index].clone();
        config["name"] = json!(NETWORK);
        config["cniVersion"] = json!(CNI_VERSION);
        if let Some(prev) = prev_result {
            config["prevResult"] = prev.clone();
        }
        self.exec(
            config["type"].as_str().expect("type"),
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", &sandbox.container_id),
                ("CNI_NETNS", &sandbox.netns_path()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", &sandbox.args),
            ],
            &config,
        )
    }

    /// Runs plugin `plugin_type` from `CNI_PATH` in the node's namespace.
    fn exec(&self, plugin_type: &str, env: &[(&str, &str)], config: &Value) -> PluginRun {
        use std::io::Write;
        let mine = plugin_binary();
        let cni_path = format!(
            "{}:{REFERENCE_PLUGINS}",
            mine.parent().expect("target dir").display()
        );
        let executable = std::env::split_paths(&cni_path)
            .map(|dir| dir.join(plugin_type))
            .find(|path| path.exists())
            .unwrap_or_else(|| panic!("no plugin {plugin_type} in {cni_path}"));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.lab.node.name])
            .arg(&executable)
            .env("CNI_PATH", &cni_path)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", executable.display()));
        let stdin = serde_json::to_vec(config).expect("config");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&stdin)
            .expect("writing the configuration");
        PluginRun {
            plugin: plugin_type.to_owned(),
            output: child.wait_with_output().expect("plugin output"),
        }
    }

    /// ADD through the whole list: the final result, or the run that failed.
    fn add(&self, sandbox: &Sandbox) -> Result<Value, PluginRun> {
        let mut result: Option<Value> = None;
        for index in 0..self.plugins.len() {
            let run = self.invoke(index, "ADD", sandbox, result.as_ref());
            if !run.ok() {
                return Err(run);
            }
            result = Some(run.stdout_json());
        }
        Ok(result.expect("a result"))
    }

    /// DEL through the list in reverse order, each plugin given the cached result
    /// (none after a failed ADD); every plugin must succeed.
    fn del(&self, sandbox: &Sandbox, cached: Option<&Value>) {
        for index in (0..self.plugins.len()).rev() {
            let run = self.invoke(index, "DEL", sandbox, cached);
            assert!(run.ok(), "DEL: {}", run.describe());
            assert!(
                run.output.stdout.is_empty(),
                "DEL printed: {}",
                run.describe()
            );
        }
    }

    /// CHECK through the list in order with the cached result; the first failure.
    fn check(&self, sandbox: &Sandbox, cached: &Value) -> Result<(), PluginRun> {
        for index in 0..self.plugins.len() {
            let run = self.invoke(index, "CHECK", sandbox, Some(cached));
            if !run.ok() {
                return Err(run);
            }
        }
        Ok(())
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.lab.cli_ok(&["status", "-o", "json"])).expect("status json")
    }

    fn wait(&self, what: &str, done: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.status();
            if done(&status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status: {status:#}\nagent log:\n{}",
                self.lab.agent_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pod, as the API server reports it once the kubelet has its addresses.
    fn report_pod(&self, name: &str, role: &str, addresses: &[IpAddr]) {
        let ips: Vec<Value> = addresses
            .iter()
            .map(|a| json!({"ip": a.to_string()}))
            .collect();
        self.api.apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "app", "labels": {"role": role}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Running", "podIP": addresses[0].to_string(), "podIPs": ips}}));
    }

    fn events(&self) -> Vec<Value> {
        self.lab
            .cli_ok(&["events", "--last", "1000", "-o", "json"])
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

/// The pod's addresses (IPv4 first) in a bridge result: those of its sandbox
/// interface.
fn pod_addresses(result: &Value) -> Vec<IpAddr> {
    let interfaces = result["interfaces"].as_array().expect("interfaces");
    let mut addresses: Vec<IpAddr> = result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter(|ip| {
            ip["interface"]
                .as_u64()
                .and_then(|i| interfaces.get(i as usize))
                .is_some_and(|interface| interface["sandbox"].is_string())
        })
        .map(|ip| {
            let address = ip["address"].as_str().expect("address");
            address.split('/').next().unwrap().parse().expect("ip")
        })
        .collect();
    addresses.sort_by_key(|a| a.is_ipv6());
    assert!(
        addresses.len() == 2 && addresses[0].is_ipv4() && addresses[1].is_ipv6(),
        "expected one IPv4 and one IPv6 address: {result:#}"
    );
    addresses
}

/// The pod's veth as the bridge result names it: the host interface that is not
/// the bridge.
fn host_veth(result: &Value) -> String {
    result["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| !i["sandbox"].is_string() && i["name"] != BRIDGE)
        .and_then(|i| i["name"].as_str())
        .unwrap_or_else(|| panic!("no host veth in {result:#}"))
        .to_owned()
}

/// Whether `status` shows pod interface `name` enforcing on every hook, bound to
/// `workload` (or to none) and awaiting its pod's policy or not.
fn pod_interface_is(status: &Value, name: &str, workload: Option<&str>, awaiting: bool) -> bool {
    status["interfaces"].as_array().is_some_and(|interfaces| {
        interfaces.iter().any(|i| {
            i["name"] == name
                && i["origin"] == "pod"
                && i["enforcing"] == true
                && i["awaitingPolicy"] == awaiting
                && i["workload"].as_str() == workload
        })
    })
}

fn lists_interface(status: &Value, name: &str) -> bool {
    status["interfaces"]
        .as_array()
        .is_some_and(|interfaces| interfaces.iter().any(|i| i["name"] == name))
}

/// The CNI error object a failed plugin printed, checked for the spec's fields.
fn cni_error(run: &PluginRun) -> Value {
    assert!(!run.ok(), "{} succeeded", run.plugin);
    let error = run.stdout_json();
    assert_eq!(error["cniVersion"], CNI_VERSION, "{}", run.describe());
    assert!(error["code"].is_u64(), "{}", run.describe());
    assert!(error["msg"].is_string(), "{}", run.describe());
    error
}

#[test]
fn a_new_pods_first_packets_are_judged_from_its_cni_add() {
    if !microseg_tests::kernel_available("cni_first_packets")
        || !reference_plugins_available("cni_first_packets")
    {
        return;
    }
    let runtime = Runtime::start();

    // A server pod, set up through the chain like any pod, then reported.
    let server = runtime.sandbox("server");
    let server_result = runtime.add(&server).unwrap_or_else(|run| {
        panic!(
            "server ADD: {}\nagent log:\n{}",
            run.describe(),
            runtime.lab.agent_log()
        )
    });
    let server_addresses = pod_addresses(&server_result);
    let server_veth = host_veth(&server_result);
    runtime.report_pod("server", "server", &server_addresses);
    runtime.wait("the server's veth bound to its pod", |s| {
        pod_interface_is(s, &server_veth, Some("app/server"), false)
    });
    let _server_echo = EchoServers::start(&server.ns, &[80, 81]);

    // A new pod: the runtime runs the list in order, the bridge first.
    let client = runtime.sandbox("client");
    let bridge = runtime.invoke(0, "ADD", &client, None);
    assert!(bridge.ok(), "bridge ADD: {}", bridge.describe());
    let bridge_result = bridge.stdout_json();
    let client_veth = host_veth(&bridge_result);
    let client_addresses = pod_addresses(&bridge_result);
    let _client_echo = EchoServers::start(&client.ns, &[80]);
    // The link monitor saw the veth appear and left it alone: its namespace is not
    // named as a sandbox and no pod has its addresses yet.
    assert!(
        !lists_interface(&runtime.status(), &client_veth),
        "the agent enforced {client_veth} before microseg-cni's ADD: {:#}",
        runtime.status()
    );

    let started = Instant::now();
    let added = runtime.invoke(1, "ADD", &client, Some(&bridge_result));
    println!(
        "microseg-cni ADD (the agent attaching and binding the veth): {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    assert!(
        added.ok(),
        "microseg-cni ADD: {}\nagent log:\n{}",
        added.describe(),
        runtime.lab.agent_log()
    );
    // A chained plugin that changes nothing passes the result on.
    assert_eq!(added.stdout_json(), bridge_result);
    // The runtime would start the containers now: their first connections, at once.
    let first_tries: Vec<(IpAddr, bool)> = [0, 1]
        .into_iter()
        .map(|family| {
            let to = server_addresses[family];
            (to, tcp_exchange(&client.ns, to, 80))
        })
        .collect();
    let from_server: Vec<bool> = [0, 1]
        .into_iter()
        .map(|family| tcp_exchange(&server.ns, client_addresses[family], 80))
        .collect();
    let status = runtime.status();
    assert!(
        pod_interface_is(&status, &client_veth, None, true),
        "{client_veth} is not enforcing and awaiting its pod after the ADD: {status:#}"
    );
    assert!(
        runtime
            .lab
            .agent_log()
            .lines()
            .any(|line| line.contains("CNI ADD") && line.contains(client_veth.as_str())),
        "the agent's log does not show the ADD attaching {client_veth}"
    );
    for (to, connected) in &first_tries {
        assert!(
            !connected,
            "client -> {to}:80 connected before the client pod was known"
        );
    }
    assert_eq!(
        from_server,
        [false, false],
        "server -> client:80 before it was known"
    );
    // Dropped at the client's veth, as a pod whose policy is not known yet (the
    // server's veth would have dropped client -> server:80 too, as unknown).
    let events = runtime.events();
    for (family, from) in client_addresses.iter().enumerate() {
        let to = server_addresses[family];
        assert!(
            events.iter().any(|event| {
                event["drop_reason_desc"] == NO_POLICY_YET
                    && event["interface"]["name"] == client_veth.as_str()
                    && event["IP"]["source"].as_str() == Some(from.to_string().as_str())
                    // Over IPv6 the neighbour solicitation is what drops first.
                    && (to.is_ipv6()
                        || event["IP"]["destination"].as_str() == Some(to.to_string().as_str()))
            }),
            "no {NO_POLICY_YET} drop from {from}: {events:#?}"
        );
    }

    // The API server reports the pod: bound to it, judged by policy.
    runtime.report_pod("client", "client", &client_addresses);
    runtime.wait("the client's veth bound to its pod", |s| {
        pod_interface_is(s, &client_veth, Some("app/client"), false)
    });
    for to in &server_addresses {
        assert!(
            tcp_exchange(&client.ns, *to, 80),
            "client -> {to}:80 is allowed by server-ingress; status: {:#}\nagent log:\n{}",
            runtime.status(),
            runtime.lab.agent_log()
        );
        assert!(
            !tcp_exchange(&client.ns, *to, 81),
            "client -> {to}:81 is not allowed"
        );
    }
    let events = runtime.events();
    for (family, to) in server_addresses.iter().enumerate() {
        let from = client_addresses[family];
        assert!(
            events.iter().any(|event| {
                event["drop_reason_desc"] == "POLICY_DENIED"
                    && event["IP"]["source"].as_str() == Some(from.to_string().as_str())
                    && event["IP"]["destination"].as_str() == Some(to.to_string().as_str())
            }),
            "no POLICY_DENIED drop of {from} -> {to}:81"
        );
    }
    if let Err(run) = runtime.check(&client, &bridge_result) {
        panic!("CHECK of an enforced pod: {}", run.describe());
    }

    // Torn down in reverse order: microseg-cni first, the bridge (which deletes
    // the veth) last.
    runtime.del(&client, Some(&bridge_result));
    runtime.api.delete("Pod", "app", "client");
    runtime.wait("the client's veth gone from the agent's interfaces", |s| {
        !lists_interface(s, &client_veth)
    });
    // Idempotent: the veth is gone and DEL still succeeds.
    runtime.del(&client, Some(&bridge_result));
    runtime.del(&server, Some(&server_result));
}

#[test]
fn cni_add_fails_without_the_agent_and_del_succeeds_anyway() {
    if !microseg_tests::kernel_available("cni_without_agent")
        || !reference_plugins_available("cni_without_agent")
    {
        return;
    }
    let runtime = Runtime::start();
    let earlier = runtime.sandbox("earlier");
    let earlier_result = runtime.add(&earlier).unwrap_or_else(|run| {
        panic!(
            "ADD with the agent running: {}\nagent log:\n{}",
            run.describe(),
            runtime.lab.agent_log()
        )
    });
    // STATUS (CNI 1.1, microseg-cni alone: this bridge speaks 1.0): ready.
    let status_config = json!({"cniVersion": "1.1.0", "name": NETWORK, "type": "microseg-cni",
                               "socket": runtime.lab.socket()});
    let ready = runtime.exec("microseg-cni", &[("CNI_COMMAND", "STATUS")], &status_config);
    assert!(ready.ok(), "STATUS with the agent: {}", ready.describe());

    runtime.lab.kill_agent();

    // No agent: the pod must not start. The ADD fails with the spec's error object.
    let orphan = runtime.sandbox("orphan");
    let failed = runtime
        .add(&orphan)
        .expect_err("ADD succeeded without an agent");
    assert_eq!(failed.plugin, "microseg-cni", "{}", failed.describe());
    let error = cni_error(&failed);
    assert_eq!(error["code"], 11, "try again later: {error:#}");
    assert!(
        error["details"]
            .as_str()
            .is_some_and(|d| d.contains("cannot be reached")),
        "{error:#}"
    );
    let not_ready = runtime.exec("microseg-cni", &[("CNI_COMMAND", "STATUS")], &status_config);
    assert!(!not_ready.ok(), "STATUS without the agent succeeded");
    assert_eq!(
        not_ready.stdout_json()["code"],
        50,
        "{}",
        not_ready.describe()
    );

    // The runtime tears the failed sandbox down (no cached result after a failed
    // ADD), and the earlier pod's too: DEL succeeds with the agent gone, twice.
    runtime.del(&orphan, None);
    runtime.del(&earlier, Some(&earlier_result));
    runtime.del(&earlier, Some(&earlier_result));
}

#[test]
fn cni_check_fails_when_the_pods_veth_is_not_enforced() {
    if !microseg_tests::kernel_available("cni_check") || !reference_plugins_available("cni_check") {
        return;
    }
    let runtime = Runtime::start();
    let pod = runtime.sandbox("checked");
    let result = runtime.add(&pod).unwrap_or_else(|run| {
        panic!(
            "ADD: {}\nagent log:\n{}",
            run.describe(),
            runtime.lab.agent_log()
        )
    });
    let veth = host_veth(&result);
    if let Err(run) = runtime.check(&pod, &result) {
        panic!("CHECK right after ADD: {}", run.describe());
    }

    // Its programs detached behind the agent's back (no link changes, and the
    // agent's next interface check an hour away): CHECK asks the kernel and fails.
    let detached = microseg::datapath::loader::detach_interface(&runtime.lab.pin_dir(), &veth)
        .expect("detaching");
    assert_eq!(detached, 2, "tc-ingress and tc-egress");
    let failed = runtime
        .check(&pod, &result)
        .expect_err("CHECK passed with the programs detached");
    assert_eq!(failed.plugin, "microseg-cni", "{}", failed.describe());
    let error = cni_error(&failed);
    assert_eq!(error["code"], 100, "{error:#}");
    assert!(
        error["details"]
            .as_str()
            .is_some_and(|d| d.contains("tc-ingress") && d.contains("tc-egress")),
        "{error:#}"
    );
    runtime.del(&pod, Some(&result));

    // A pod whose chain had no microseg-cni when it started: the bridge alone.
    let unchained = runtime.sandbox("unchained");
    let bridge = runtime.invoke(0, "ADD", &unchained, None);
    assert!(bridge.ok(), "bridge ADD: {}", bridge.describe());
    let bridge_result = bridge.stdout_json();
    let failed = runtime
        .check(&unchained, &bridge_result)
        .expect_err("CHECK passed for a veth microseg never enforced");
    assert_eq!(failed.plugin, "microseg-cni", "{}", failed.describe());
    let error = cni_error(&failed);
    assert!(
        error["msg"]
            .as_str()
            .is_some_and(|m| m.contains(&host_veth(&bridge_result))),
        "{error:#}"
    );
    runtime.del(&unchained, Some(&bridge_result));
}

/// A DEL the agent never saw (the runtime lost it, or the agent was restarting)
/// leaves nothing behind: GC (CNI 1.1) forgets the report, and so does the veth's
/// deletion.
#[test]
fn cni_reports_whose_del_was_lost_are_forgotten_by_gc_or_with_their_veth() {
    if !microseg_tests::kernel_available("cni_lost_del")
        || !reference_plugins_available("cni_lost_del")
    {
        return;
    }
    let runtime = Runtime::start();
    let kept = runtime.sandbox("kept");
    let kept_result = runtime.add(&kept).expect("ADD kept");
    let lost = runtime.sandbox("lost");
    let lost_result = runtime.add(&lost).expect("ADD lost");
    let (kept_veth, lost_veth) = (host_veth(&kept_result), host_veth(&lost_result));
    let status = runtime.status();
    assert!(
        pod_interface_is(&status, &kept_veth, None, true),
        "{status:#}"
    );
    assert!(
        pod_interface_is(&status, &lost_veth, None, true),
        "{status:#}"
    );

    // GC (CNI 1.1) from a runtime that lost "lost"'s DEL: only "kept" is valid.
    let gc = runtime.exec(
        "microseg-cni",
        &[("CNI_COMMAND", "GC")],
        &json!({"cniVersion": "1.1.0", "name": NETWORK, "type": "microseg-cni",
                "socket": runtime.lab.socket(),
                "cni.dev/valid-attachments": [{"containerID": kept.container_id, "ifname": "eth0"}]}),
    );
    assert!(gc.ok(), "GC: {}", gc.describe());
    assert!(gc.output.stdout.is_empty(), "GC printed: {}", gc.describe());
    // Its pod unknown and its namespace no sandbox's, nothing else keeps it.
    let status = runtime.status();
    assert!(
        pod_interface_is(&status, &kept_veth, None, true),
        "{status:#}"
    );
    assert!(!lists_interface(&status, &lost_veth), "{status:#}");

    runtime.del(&lost, Some(&lost_result));

    // Only the bridge's DEL ran: the veth is gone, the agent forgets its report
    // and stays healthy (no interface it must enforce is missing).
    let bridge_del = runtime.invoke(0, "DEL", &kept, Some(&kept_result));
    assert!(bridge_del.ok(), "bridge DEL: {}", bridge_del.describe());
    runtime.wait("the deleted veth forgotten", |s| {
        !lists_interface(s, &kept_veth) && s["healthy"] == true
    });
    runtime.del(&kept, Some(&kept_result));
}

/// The plugin's requests are the agent's: each parses as `microseg::api::Request`
/// with the same fields.
#[test]
fn the_plugins_requests_parse_as_the_agents() {
    use microseg::api::Request;
    use microseg_cni::agent::AgentRequest;
    let address: IpAddr = "10.0.0.2".parse().unwrap();
    let cases = [
        (
            AgentRequest::PodNetworkAdded {
                container_id: "c1".into(),
                netns: "/var/run/netns/cni-1".into(),
                interface: "veth1".into(),
                addresses: vec![address],
                pod: Some("app/web".into()),
            },
            Request::PodNetworkAdded {
                container_id: "c1".into(),
                netns: "/var/run/netns/cni-1".into(),
                interface: "veth1".into(),
                addresses: vec![address],
                pod: Some("app/web".into()),
            },
        ),
        (
            AgentRequest::PodNetworkDeleted {
                container_id: "c1".into(),
            },
            Request::PodNetworkDeleted {
                container_id: "c1".into(),
            },
        ),
        (
            AgentRequest::PodNetworkCheck {
                container_id: "c1".into(),
                interface: "veth1".into(),
            },
            Request::PodNetworkCheck {
                container_id: "c1".into(),
                interface: "veth1".into(),
            },
        ),
        (
            AgentRequest::PodNetworkGarbageCollect {
                valid_container_ids: vec!["c1".into()],
            },
            Request::PodNetworkGarbageCollect {
                valid_container_ids: vec!["c1".into()],
            },
        ),
        (AgentRequest::Status, Request::Status),
    ];
    for (plugin, agent) in cases {
        let line = serde_json::to_string(&plugin).expect("serialise");
        let parsed: Request = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the agent cannot read {line}: {e}"));
        assert_eq!(parsed, agent, "{line}");
    }
}
