//! The upstream ClusterNetworkPolicy conformance suites as data
//! (`tests/data/network-policy-api/conformance-table.json`, Apache-2.0, see the README
//! beside it): the topology (five namespaces, eight pods, two host-network pods and
//! their two Nodes), each suite's policy states in order, and every probe with its
//! expected result. Each state becomes a [`PolicySet`] through the same loader as
//! files and the API server, so the table checks the loader too.

use std::net::IpAddr;
use std::path::PathBuf;

use microseg::policy::{Flow, PolicySet, PolicySetBuilder, Protocol, Source};
use serde::Deserialize;
use serde_json::{Value, json};

/// Probes in the table.
pub const PROBES: usize = 301;
/// Of those, probes whose server is a host-network pod (judged by `nodes` peers).
pub const HOST_NETWORK_PROBES: usize = 9;

#[derive(Deserialize)]
pub struct Table {
    pub topology: Topology,
    pub suites: Vec<Suite>,
}

#[derive(Deserialize)]
pub struct Topology {
    pub namespaces: Vec<Value>,
    pub pods: Vec<Value>,
    pub nodes: Vec<Value>,
}

#[derive(Deserialize)]
pub struct Suite {
    pub name: String,
    pub states: Vec<State>,
    pub subtests: Vec<Subtest>,
}

#[derive(Deserialize)]
pub struct State {
    pub id: usize,
    pub cause: String,
    /// namespace -> labels (labels may change between states).
    pub namespaces: serde_json::Map<String, Value>,
    pub policies: Vec<Value>,
}

#[derive(Deserialize)]
pub struct Subtest {
    pub name: String,
    pub assertions: Vec<Assertion>,
}

#[derive(Deserialize)]
pub struct Assertion {
    pub id: String,
    pub state: usize,
    pub from: String,
    pub to: String,
    pub to_ip: IpAddr,
    pub protocol: String,
    pub port: u16,
    pub expected: bool,
    pub source: String,
    /// Present on the probes of host-network servers; microseg judges them (it reads
    /// Nodes), so the reason is only reported.
    pub skip: Option<String>,
}

impl Assertion {
    pub fn protocol(&self) -> Protocol {
        self.protocol
            .parse()
            .expect("table protocols are tcp, udp, sctp")
    }

    pub fn involves_host_network(&self) -> bool {
        self.skip.is_some()
    }
}

/// The table from the repository.
pub fn read() -> Table {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/network-policy-api/conformance-table.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("parsing {}: {error}", path.display()))
}

impl Table {
    /// The policy set of one state of a suite: topology, the state's namespace labels,
    /// its policies (ClusterNetworkPolicies and NetworkPolicies) and the Nodes.
    pub fn state_set(&self, suite: &Suite, state: &State) -> PolicySet {
        let mut builder = PolicySetBuilder::new();
        let source =
            |what: &str| Source::memory(&format!("{}/state {}: {what}", suite.name, state.id));
        for (name, labels) in &state.namespaces {
            builder.add_document(
                &source("namespace"),
                &json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": name, "labels": labels}}),
            );
        }
        for pod in &self.topology.pods {
            builder.add_document(&source("pod"), pod);
        }
        for node in &self.topology.nodes {
            builder.add_document(&source("node"), node);
        }
        for policy in &state.policies {
            builder.add_document(&source("policy"), policy);
        }
        builder.finish().unwrap_or_else(|errors| {
            panic!(
                "{} state {} ({}) does not load: {errors}",
                suite.name, state.id, state.cause
            )
        })
    }

    /// The address of a pod of the topology (`namespace/name`).
    pub fn pod_address(&self, key: &str) -> IpAddr {
        self.topology
            .pods
            .iter()
            .find(|pod| {
                format!(
                    "{}/{}",
                    pod["metadata"]["namespace"].as_str().unwrap_or_default(),
                    pod["metadata"]["name"].as_str().unwrap_or_default()
                ) == key
            })
            .and_then(|pod| pod["status"]["podIP"].as_str())
            .unwrap_or_else(|| panic!("no pod {key} with an address in the topology"))
            .parse()
            .expect("pod addresses parse")
    }

    /// The flow a probe sends.
    pub fn flow(&self, assertion: &Assertion) -> Flow {
        Flow {
            src: self.pod_address(&assertion.from),
            dst: assertion.to_ip,
            protocol: assertion.protocol(),
            port: assertion.port,
        }
    }
}
