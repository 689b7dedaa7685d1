//! The agent's status where `kubectl` users look: Kubernetes Events (events.k8s.io/v1)
//! about this node's `Node` object, or about the object concerned (a policy microseg
//! refused), reported by `microseg-agent`.
//!
//! `kubectl describe node <node>` and `kubectl get events -n default
//! --field-selector reportingComponent=microseg-agent` show them. Events, rather than
//! a custom resource, need no CRD installed and are what operators already read;
//! repeated events are folded into a series by kube's recorder, so a flapping state
//! does not flood the API server. Only transitions are reported (synced, refused,
//! reconnected), never one event per pod.
//!
//! Publishing runs on its own task behind a bounded queue: a slow or unreachable API
//! server never delays enforcement, and what cannot be queued is dropped (logged).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::mpsc;

/// The controller name in `reportingController`.
pub const REPORTER: &str = "microseg-agent";

/// What the agent reports.
pub struct Status {
    pub warning: bool,
    /// The object the report is about; `None`: this node's `Node`.
    pub regarding: Option<ObjectReference>,
    /// PascalCase reason: `Synced`, `PolicyRefused`, `Reconnected`, ...
    pub reason: &'static str,
    pub note: String,
}

/// Sends status reports to the API server in the background.
#[derive(Clone)]
pub struct StatusReporter {
    queue: mpsc::Sender<Status>,
}

impl StatusReporter {
    pub fn start(client: Client, node: &str) -> Self {
        let (queue, mut reports) = mpsc::channel::<Status>(64);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: REPORTER.to_owned(),
                instance: Some(format!("{REPORTER}-{node}")),
            },
        );
        // The kubelet posts a node's events with the node name as uid; so does the
        // agent, so `kubectl describe node` finds them.
        let node_reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_owned()),
            uid: Some(node.to_owned()),
            ..ObjectReference::default()
        };
        tokio::spawn(async move {
            while let Some(status) = reports.recv().await {
                let event = Event {
                    type_: if status.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: status.reason.to_owned(),
                    // The API server refuses notes over 1 kB.
                    note: Some(truncate(status.note, 1000)),
                    action: "Enforce".to_owned(),
                    secondary: None,
                };
                let regarding = status.regarding.as_ref().unwrap_or(&node_reference);
                if let Err(e) = recorder.publish(&event, regarding).await {
                    tracing::warn!(reason = status.reason, "could not post a status event: {e}");
                }
            }
        });
        Self { queue }
    }

    pub fn report(&self, status: Status) {
        if status.warning {
            tracing::warn!(reason = status.reason, "{}", status.note);
        } else {
            tracing::info!(reason = status.reason, "{}", status.note);
        }
        if self.queue.try_send(status).is_err() {
            tracing::warn!("status events are backed up; one was dropped");
        }
    }
}

fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
