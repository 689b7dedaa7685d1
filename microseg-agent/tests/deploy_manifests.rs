//! The deployment files cannot rot: every Kubernetes manifest parses with the
//! Kubernetes types and survives a round trip unchanged (so no field is misspelt or
//! misplaced), and every agent configuration parses as microseg's own.

use std::path::{Path, PathBuf};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use microseg::agent::{config::AgentConfig, kubernetes::watch};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Parses `value` as `T` and checks that serializing it back loses nothing.
fn round_trip<T: DeserializeOwned + Serialize>(file: &Path, value: &serde_json::Value) -> T {
    let typed: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{}: {} does not parse: {e}", file.display(), value["kind"]));
    let back = serde_json::to_value(&typed).expect("serialize");
    assert_eq!(
        &back,
        value,
        "{}: {} changes in a round trip (an unknown or misplaced field?)",
        file.display(),
        value["metadata"]["name"]
    );
    typed
}

#[test]
fn kubernetes_manifests_parse_with_the_kubernetes_types() {
    let mut kinds = Vec::new();
    let mut daemonset = None;
    let mut configmap = None;
    let mut role = None;
    let dir = deploy_dir().join("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for document in serde_norway::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(document).expect("YAML");
            let kind = value["kind"].as_str().expect("kind").to_owned();
            match kind.as_str() {
                "DaemonSet" => daemonset = Some(round_trip::<DaemonSet>(&file, &value)),
                "ConfigMap" => configmap = Some(round_trip::<ConfigMap>(&file, &value)),
                "ServiceAccount" => drop(round_trip::<ServiceAccount>(&file, &value)),
                "ClusterRole" => role = Some(round_trip::<ClusterRole>(&file, &value)),
                "ClusterRoleBinding" => drop(round_trip::<ClusterRoleBinding>(&file, &value)),
                other => panic!("{}: unexpected kind {other}", file.display()),
            }
            kinds.push(kind);
        }
    }
    for wanted in [
        "DaemonSet",
        "ConfigMap",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
    ] {
        assert!(
            kinds.iter().any(|k| k == wanted),
            "no {wanted} in deploy/kubernetes"
        );
    }

    // The DaemonSet is what a node agent needs.
    let daemonset = daemonset.unwrap();
    let pod = daemonset.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("microseg-agent"));
    let container = &pod.containers[0];
    assert_eq!(
        container.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
    let command = container.command.clone().unwrap();
    assert!(command.iter().any(|c| c == "agent"), "{command:?}");
    let mounts = container.volume_mounts.clone().unwrap();
    assert!(
        mounts.iter().any(|m| m.mount_path == "/sys/fs/bpf"),
        "bpffs must be mounted"
    );
    let config_path = command
        .iter()
        .skip_while(|c| *c != "--config")
        .nth(1)
        .expect("--config");
    assert!(
        mounts.iter().any(|m| m.mount_path == *config_path),
        "the config file is mounted"
    );

    // The agent may list and watch every kind it watches.
    let rules = role.unwrap().rules.unwrap();
    for (group, resource) in [
        ("", "namespaces"),
        ("", "pods"),
        ("", "nodes"),
        ("networking.k8s.io", "networkpolicies"),
        (watch::CNP_GROUP, watch::CNP_PLURAL),
    ] {
        for verb in ["get", "list", "watch"] {
            assert!(
                rules.iter().any(|rule| {
                    rule.api_groups.iter().flatten().any(|g| g == group)
                        && rule.resources.iter().flatten().any(|r| r == resource)
                        && rule.verbs.iter().any(|v| v == verb)
                }),
                "rbac.yaml: no {verb} on {resource} ({group:?})"
            );
        }
    }

    // The ConfigMap's agent configuration is valid.
    let data = configmap.unwrap().data.unwrap();
    let config: AgentConfig = serde_norway::from_str(&data["agent.yaml"]).expect("agent.yaml");
    config.validate().unwrap();

    // The chained CNI plugin goes where runtimes look for plugins and network
    // configurations, and reaches the agent: the plugin runs on the host, so the
    // socket it is given must be the agent's, at the same path on the host.
    let volumes = pod.volumes.clone().unwrap();
    let host_path = |container: &k8s_openapi::api::core::v1::Container, path: &str| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|mount| {
                let rest = Path::new(path).strip_prefix(&mount.mount_path).ok()?;
                let volume = volumes.iter().find(|v| v.name == mount.name)?;
                Some(Path::new(&volume.host_path.as_ref()?.path).join(rest))
            })
            .next()
    };
    let installer = pod
        .containers
        .iter()
        .find(|c| c.name == "cni-install")
        .expect("a cni-install container");
    let args = installer.command.clone().unwrap();
    assert_eq!(args[..2], ["/usr/local/bin/microseg-cni", "install"]);
    let value_of = |flag: &str| {
        args.iter()
            .skip_while(|a| *a != flag)
            .nth(1)
            .unwrap_or_else(|| panic!("cni-install: no {flag}"))
            .clone()
    };
    assert_eq!(
        host_path(installer, &value_of("--bin-dir")),
        Some(PathBuf::from("/opt/cni/bin"))
    );
    assert_eq!(
        host_path(installer, &value_of("--conf-dir")),
        Some(PathBuf::from("/etc/cni/net.d"))
    );
    let socket = PathBuf::from(value_of("--socket"));
    assert_eq!(socket, config.socket, "the plugin's socket is the agent's");
    assert_eq!(
        host_path(container, &socket.display().to_string()),
        Some(socket),
        "the agent's socket is on the host at the same path"
    );
}

/// The ClusterNetworkPolicy CRD shipped (upstream's, with its licence) defines the
/// resource the agent watches.
#[test]
fn the_cluster_network_policy_crd_is_what_the_agent_watches() {
    let dir = deploy_dir().join("crds");
    let file = dir.join("policy.networking.k8s.io_clusternetworkpolicies.yaml");
    let text = std::fs::read_to_string(&file).expect("the CRD");
    let crd: CustomResourceDefinition = serde_norway::from_str(&text).expect("a CRD");
    let resource = watch::cluster_network_policy_resource();
    assert_eq!(crd.spec.group, resource.group);
    assert_eq!(crd.spec.names.plural, resource.plural);
    assert_eq!(crd.spec.names.kind, resource.kind);
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some(format!("{}.{}", resource.plural, resource.group).as_str())
    );
    assert!(
        crd.spec
            .versions
            .iter()
            .any(|v| v.name == resource.version && v.served),
        "{} is not served",
        resource.version
    );
    assert_eq!(
        resource.api_version,
        microseg::policy::CLUSTER_NETWORK_POLICY_API_VERSION
    );
    let licence = std::fs::read_to_string(dir.join("LICENSE")).expect("deploy/crds/LICENSE");
    assert!(licence.contains("Apache License"));
    let notice = std::fs::read_to_string(dir.join("README.md")).expect("deploy/crds/README.md");
    assert!(notice.contains("kubernetes-sigs/network-policy-api") && notice.contains("0eec1b0"));
}

#[test]
fn the_host_service_files_are_consistent() {
    let dir = deploy_dir().join("systemd");
    let config = AgentConfig::from_file(&dir.join("agent.yaml")).expect("systemd agent.yaml");
    assert!(!config.interfaces.is_empty());
    let unit = std::fs::read_to_string(dir.join("microseg-agent.service")).unwrap();
    let exec = unit
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart");
    assert!(
        exec.contains("microseg agent --config /etc/microseg/agent.yaml"),
        "{exec}"
    );
    assert!(unit.contains("[Install]") && unit.contains("WantedBy=multi-user.target"));
}
