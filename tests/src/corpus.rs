//! The NetworkPolicy conformance corpus: the cyclonus cases (230, 123,669 flows with
//! the truth table of cyclonus' simulator) in the format described in
//! `tests/data/conformance/README.md`, and each step's namespaces, pods and policies
//! as a policy set. The corpus is in the repository, so every clone runs it.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use microseg::policy::{Flow, NamedPort, PolicySet, PolicySetBuilder, Protocol, Source, Workload};
use serde::Deserialize;

/// Cases in the corpus.
pub const CASES: usize = 230;
/// Flows in all steps of all cases.
pub const FLOWS: usize = 123_669;
/// Of those, flows between distinct pods (the rest are a pod talking to itself).
pub const DISTINCT_PAIR_FLOWS: usize = 109_956;

#[derive(Deserialize)]
pub struct Case {
    pub id: u32,
    pub description: String,
    pub tags: Vec<String>,
    pub steps: Vec<Step>,
}

#[derive(Deserialize)]
pub struct Step {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pods: Vec<CorpusPod>,
    policies: Vec<NetworkPolicy>,
    pub result: StepResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CorpusPod {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    #[serde(rename = "IP")]
    ip: IpAddr,
    containers: Vec<CorpusContainer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CorpusContainer {
    port: u16,
    protocol: String,
    port_name: String,
}

#[derive(Deserialize)]
pub struct StepResult {
    pub flows: Vec<CorpusFlow>,
}

#[derive(Deserialize)]
pub struct CorpusFlow {
    /// The source pod (`namespace/name`).
    pub from: String,
    /// The destination pod.
    pub to: String,
    pub from_ip: IpAddr,
    pub to_ip: IpAddr,
    /// Numeric even when the probed container port is named.
    pub port: u16,
    pub protocol: String,
    pub ingress_allowed: bool,
    pub egress_allowed: bool,
    pub allowed: bool,
}

impl CorpusFlow {
    /// The flow to judge.
    pub fn flow(&self) -> Flow {
        let protocol: Protocol = self.protocol.parse().expect("corpus protocol");
        Flow {
            src: self.from_ip,
            dst: self.to_ip,
            protocol,
            port: self.port,
        }
    }

    /// `LABEL [DESCRIPTION] FROM -> TO FLOW: expected ingress I egress E allowed A`: the
    /// start of a line that reports a deviation on this flow of `case`'s step `label`.
    pub fn expected(&self, case: &Case, label: &str) -> String {
        format!(
            "{label} [{}] {} -> {} {}: expected ingress {} egress {} allowed {}",
            case.description,
            self.from,
            self.to,
            self.flow(),
            self.ingress_allowed,
            self.egress_allowed,
            self.allowed,
        )
    }

    /// A pod talking to itself: such a flow never leaves the pod in a real data plane,
    /// so its corpus verdict is reported, not asserted.
    pub fn is_self_pair(&self) -> bool {
        self.from == self.to
    }
}

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/conformance/cyclonus-corpus.json.gz")
}

/// The corpus (all [`CASES`] of it). It is part of the repository: a missing corpus
/// is a broken checkout, and fails the test.
pub fn read() -> Vec<Case> {
    let path = path();
    let file = std::fs::File::open(&path).unwrap_or_else(|error| {
        panic!(
            "conformance corpus {} cannot be read: {error}",
            path.display()
        )
    });
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut json)
        .expect("corpus is gzip'd JSON");
    let cases: Vec<Case> = serde_json::from_str(&json).expect("corpus format");
    assert_eq!(cases.len(), CASES);
    cases
}

impl Case {
    /// Each step in order with its label (`case ID step N`) and its policy set; panics
    /// if a step's objects do not form a valid set.
    pub fn built_steps(&self) -> impl Iterator<Item = (String, &Step, PolicySet)> {
        self.steps.iter().enumerate().map(|(index, step)| {
            let label = format!("case {} step {}", self.id, index + 1);
            let set = step
                .policy_set(&label)
                .unwrap_or_else(|errors| panic!("{label} ({}): {errors}", self.description));
            (label, step, set)
        })
    }
}

impl Step {
    /// The step's namespaces, pods and policies as a policy set.
    pub fn policy_set(&self, label: &str) -> Result<PolicySet, String> {
        let mut builder = PolicySetBuilder::new();
        let source = Source::memory(label);
        for (name, labels) in &self.namespaces {
            builder.add_namespace(&source, name, labels);
        }
        for pod in &self.pods {
            builder.add_workload(Workload {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                labels: (&pod.labels).into(),
                addresses: vec![pod.ip],
                ports: pod
                    .containers
                    .iter()
                    .map(|container| NamedPort {
                        name: container.port_name.clone(),
                        port: container.port,
                        protocol: container.protocol.parse().expect("corpus protocol"),
                    })
                    .collect(),
                interface: None,
                node: None,
                source: source.clone(),
            });
        }
        for (index, policy) in self.policies.iter().enumerate() {
            builder.add_network_policy(&Source::new(label, index + 1), policy);
        }
        builder.finish().map_err(|errors| errors.to_string())
    }
}
