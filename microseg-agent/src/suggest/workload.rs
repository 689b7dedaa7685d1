//! Workloads: the pods of a namespace that share the labels identifying them, so
//! that one policy covers every replica and survives rollouts.
//!
//! The identifying label is the first of `app.kubernetes.io/name`, `app`, `k8s-app`
//! a pod has; without one, every label that is the same for all of a controller's
//! pods and revisions (`tier: api`). Labels a controller sets per pod or per
//! revision never identify a workload: a policy keyed on them breaks at the next
//! rollout. A pod with only such labels falls back to them, with a warning.

use std::collections::BTreeMap;

/// Labels identifying a workload, by preference.
pub const PREFERRED_LABELS: [&str; 3] = ["app.kubernetes.io/name", "app", "k8s-app"];

/// Labels set per pod or per revision (by Deployments, StatefulSets, DaemonSets and
/// Jobs), and version labels, which change at every rollout.
const PER_POD_LABELS: [&str; 9] = [
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "pod-template-generation",
    "job-name",
    "controller-uid",
    "apps.kubernetes.io/pod-index",
    "app.kubernetes.io/version",
    "version",
];

/// Prefixes of label keys set per pod or per run.
const PER_POD_PREFIXES: [&str; 1] = ["batch.kubernetes.io/"];

/// Whether a label key is set per pod or per revision.
pub fn is_per_pod_label(key: &str) -> bool {
    PER_POD_LABELS.contains(&key) || PER_POD_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// How a workload's selector was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SelectorChoice {
    /// One of [`PREFERRED_LABELS`].
    Preferred,
    /// Every label that is not per pod or per revision.
    Stable,
    /// Only per-pod or per-revision labels: all of them (warned about).
    PerPodFallback,
    /// No labels: no selector can single the pod out.
    Unlabelled,
}

/// The labels that select a pod's workload, and how they were chosen.
pub fn workload_selector(
    labels: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, SelectorChoice) {
    if let Some((key, value)) = PREFERRED_LABELS
        .iter()
        .find_map(|key| labels.get_key_value(*key))
    {
        return (
            BTreeMap::from([(key.clone(), value.clone())]),
            SelectorChoice::Preferred,
        );
    }
    let stable: BTreeMap<String, String> = labels
        .iter()
        .filter(|(key, _)| !is_per_pod_label(key))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    if !stable.is_empty() {
        (stable, SelectorChoice::Stable)
    } else if !labels.is_empty() {
        (labels.clone(), SelectorChoice::PerPodFallback)
    } else {
        (BTreeMap::new(), SelectorChoice::Unlabelled)
    }
}

/// A workload: a namespace and the labels selecting its pods.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId {
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
}

impl WorkloadId {
    /// `key=value,key=value`.
    pub fn selector_text(&self) -> String {
        self.selector
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A name for the workload: its selector's values.
    pub fn base_name(&self) -> String {
        self.selector
            .values()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("-")
    }
}

impl std::fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} ({})",
            self.namespace,
            self.base_name(),
            self.selector_text()
        )
    }
}

/// `text` as a DNS-1123 subdomain part: lower case alphanumerics and `-`, starting
/// and ending alphanumeric, at most `max` characters (a policy name is one).
pub fn dns_name(text: &str, max: usize) -> String {
    let mapped: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mut name = String::new();
    for c in mapped.chars() {
        // No runs of dashes.
        if !(c == '-' && name.ends_with('-')) {
            name.push(c);
        }
    }
    let name: String = name.trim_matches('-').chars().take(max).collect();
    let name = name.trim_end_matches('-').to_owned();
    if name.is_empty() {
        "workload".to_owned()
    } else {
        name
    }
}
