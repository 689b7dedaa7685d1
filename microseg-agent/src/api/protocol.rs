//! Requests and responses of the agent API.

use serde::{Deserialize, Serialize};

/// A file's text as the CLI read it: the agent parses and validates it itself, so
/// errors name the user's file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceText {
    pub file: String,
    pub text: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ObjectKind {
    Policies,
    Workloads,
    Namespaces,
    Identities,
    Endpoints,
    /// ClusterNetworkPolicies.
    ClusterPolicies,
    Nodes,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Add or replace the objects in these files (policies, workloads, namespaces).
    Apply {
        sources: Vec<SourceText>,
    },
    /// Remove the objects these files name.
    DeleteSources {
        sources: Vec<SourceText>,
    },
    /// Remove one object by kind, namespace and name.
    DeleteObject {
        kind: String,
        namespace: String,
        name: String,
    },
    Get {
        kind: ObjectKind,
    },
    Describe {
        kind: ObjectKind,
        namespace: String,
        name: String,
    },
    /// Stream flows from the history that `filter` accepts: the newest `last` of
    /// them, then (with `follow`) new ones as they come, filtered by the agent.
    Flows {
        last: usize,
        follow: bool,
        #[serde(default)]
        filter: crate::flow_filter::FlowFilter,
    },
    Stats,
    Status,
    /// Every object the agent enforces (files, watched directories, the Kubernetes
    /// API server), as it holds them: `{"objects": [[key, object], ...]}`, from
    /// which `microseg diff` rebuilds the live policy set exactly.
    Export,
    /// Hits of every rule and default deny (`agent::rule_hits`).
    RuleHits,
    Audit {
        namespace: String,
        name: String,
        enabled: bool,
    },
    /// A pod's network was set up (the CNI plugin's ADD, chained after the plugin
    /// that made the veth): enforce on its host-side veth now, before the runtime
    /// starts the pod's containers. Answered once every hook of the veth enforces
    /// (dropping everything beyond its link until the pod is known); an error
    /// means the pod must not start.
    PodNetworkAdded {
        /// The runtime's container (sandbox) id, `CNI_CONTAINERID`.
        container_id: String,
        /// `CNI_NETNS`: the pod's network namespace.
        netns: String,
        /// The veth's host-side end, in the agent's network namespace.
        interface: String,
        /// The pod's addresses, from the main plugin's result.
        #[serde(default)]
        addresses: Vec<std::net::IpAddr>,
        /// `namespace/name` from `CNI_ARGS` (K8S_POD_NAMESPACE, K8S_POD_NAME).
        #[serde(default)]
        pod: Option<String>,
    },
    /// The CNI plugin's DEL: the agent forgets the pod's veth (it stops enforcing
    /// on it once the veth is gone or its pod left the node). Idempotent.
    PodNetworkDeleted {
        container_id: String,
    },
    /// The CNI plugin's CHECK: whether the pod's veth (its host-side end, from the
    /// main plugin's result) enforces.
    PodNetworkCheck {
        container_id: String,
        interface: String,
    },
    /// The CNI plugin's GC (CNI 1.1): the runtime's containers that still have a
    /// network; the agent forgets the veths reported for any other.
    PodNetworkGarbageCollect {
        valid_container_ids: Vec<String>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    /// One sentence on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Further error lines (each validation error, with file, document and field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            details: Vec::new(),
            data,
        }
    }

    pub fn error(error: impl Into<String>, details: Vec<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            details,
            data: serde_json::Value::Null,
        }
    }
}
