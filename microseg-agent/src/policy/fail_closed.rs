//! Policies microseg refuses still isolate what they select.
//!
//! The API server validates a NetworkPolicy or ClusterNetworkPolicy against its own
//! schema, which is not microseg's: an IPv4-mapped IPv6 ipBlock, a priority out of
//! range, a field this version does not know. Leaving such a policy out would open
//! every pod it selects. Where a refusal cannot be sent back to whoever wrote the
//! policy (objects from the API server, files in a watched directory), the loader
//! enforces a substitute built from what can still be read, and reports it:
//!
//! - a NetworkPolicy isolates its pods (its `podSelector`, or every pod of its
//!   namespace if that cannot be read) in the directions it names, allowing
//!   nothing: a deny-all NetworkPolicy. Other NetworkPolicies still allow what they
//!   allow, so the union is never wider than the policy as written;
//! - a ClusterNetworkPolicy keeps its tier (Admin if unreadable) and priority (0,
//!   the first, if out of range) and applies to its subjects (every pod if they
//!   cannot be read). In each direction it has rules: its rules as written, when
//!   they can all be read and all Deny; otherwise one rule denying every peer, every
//!   port. A Deny is never wider than intended; an Accept or Pass microseg cannot
//!   read is never guessed at.
//!
//! A document whose kind, name or namespace cannot be read gets no substitute (it
//! cannot be keyed), and stays an error.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};

use super::{
    PolicySetBuilder,
    error::{PolicyError, Source},
    model::{ClusterPolicy, ClusterRule, ClusterSubject, LabelSelector, Policy, RuleAction, Tier},
};

/// Kinds that get a substitute when refused.
pub const NETWORK_POLICY: &str = "NetworkPolicy";
pub const CLUSTER_NETWORK_POLICY: &str = "ClusterNetworkPolicy";

/// The name of the rule a refused ClusterNetworkPolicy's unreadable direction gets.
const DENY_ALL_RULE: &str = "microseg-refused-deny-all";

/// A policy microseg refused, and what it enforces in its place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RefusedPolicy {
    pub kind: &'static str,
    /// Empty for a ClusterNetworkPolicy.
    pub namespace: String,
    pub name: String,
    /// Where it came from (file and document, or `api-server:...`).
    pub source: String,
    /// Why it was refused: every error, with its field.
    pub reasons: Vec<String>,
    /// What is enforced instead, in words.
    pub enforced_as: String,
}

impl RefusedPolicy {
    /// `Kind namespace/name` or `Kind name`.
    pub fn key(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// What a refused policy is enforced as.
#[derive(Clone, Debug)]
pub(crate) enum Substitute {
    Policy(Policy),
    ClusterPolicy(ClusterPolicy),
}

/// The substitute for the refused document `value` of `kind` (see the module), and
/// its report; `None` for other kinds and for documents that cannot be keyed.
pub(crate) fn substitute(
    source: &Source,
    kind: &str,
    value: &Value,
    errors: &[PolicyError],
) -> Option<(Substitute, RefusedPolicy)> {
    let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let name = value.pointer("/metadata/name")?.as_str()?;
    if name.is_empty() {
        return None;
    }
    match kind {
        NETWORK_POLICY => {
            let namespace = match value.pointer("/metadata/namespace") {
                None => "default",
                Some(namespace) => namespace.as_str().filter(|n| !n.is_empty())?,
            };
            let policy = network_policy_substitute(source, namespace, name, value);
            let selector = if policy.pod_selector.is_everything() {
                "every pod of its namespace".to_owned()
            } else {
                format!("its pods ({})", policy.pod_selector)
            };
            let directions = [
                ("ingress", policy.ingress.is_some()),
                ("egress", policy.egress.is_some()),
            ]
            .iter()
            .filter(|(_, named)| *named)
            .map(|(direction, _)| *direction)
            .collect::<Vec<_>>()
            .join(" and ");
            let report = RefusedPolicy {
                kind: NETWORK_POLICY,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                source: source.to_string(),
                reasons,
                enforced_as: format!(
                    "deny-all NetworkPolicy: {selector} isolated for {directions}, nothing allowed"
                ),
            };
            Some((Substitute::Policy(policy), report))
        }
        CLUSTER_NETWORK_POLICY => {
            let (policy, described) = cluster_policy_substitute(source, name, value);
            let report = RefusedPolicy {
                kind: CLUSTER_NETWORK_POLICY,
                namespace: String::new(),
                name: name.to_owned(),
                source: source.to_string(),
                reasons,
                enforced_as: described,
            };
            Some((Substitute::ClusterPolicy(policy), report))
        }
        _ => None,
    }
}

/// The directions a NetworkPolicy names, read as the API server defaults them;
/// both when its `policyTypes` cannot be read.
fn network_policy_directions(spec: Option<&Value>) -> (bool, bool) {
    let Some(spec) = spec.and_then(Value::as_object) else {
        return (true, true);
    };
    match spec.get("policyTypes") {
        None | Some(Value::Null) => {}
        Some(Value::Array(types)) if types.is_empty() => {}
        Some(Value::Array(types)) => {
            let named = |wanted: &str| types.iter().any(|t| t.as_str() == Some(wanted));
            let all_known = types
                .iter()
                .all(|t| matches!(t.as_str(), Some("Ingress" | "Egress")));
            return if all_known {
                (named("Ingress"), named("Egress"))
            } else {
                (true, true)
            };
        }
        Some(_) => return (true, true),
    }
    let has_egress = match spec.get("egress") {
        None | Some(Value::Null) => false,
        Some(Value::Array(rules)) => !rules.is_empty(),
        Some(_) => true,
    };
    (true, has_egress)
}

fn network_policy_substitute(
    source: &Source,
    namespace: &str,
    name: &str,
    value: &Value,
) -> Policy {
    let spec = value.get("spec");
    let (ingress, egress) = network_policy_directions(spec);
    // The selector alone, read by the loader as any policy's; unreadable: everything.
    let selector = spec.and_then(|spec| spec.get("podSelector")).cloned();
    let trial = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": NETWORK_POLICY,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"podSelector": selector.unwrap_or_else(|| json!({})), "policyTypes": ["Ingress"]},
    });
    let pod_selector = convert_alone(source, &trial)
        .and_then(|converted| converted.policies.into_iter().next())
        .map_or_else(LabelSelector::everything, |policy| {
            Arc::unwrap_or_clone(policy).pod_selector
        });
    Policy {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source: source.clone(),
        pod_selector,
        ingress: ingress.then(Vec::new),
        egress: egress.then(Vec::new),
    }
}

fn cluster_policy_substitute(
    source: &Source,
    name: &str,
    value: &Value,
) -> (ClusterPolicy, String) {
    let spec = value.get("spec").and_then(Value::as_object);
    let tier = match spec.and_then(|s| s.get("tier")).and_then(Value::as_str) {
        Some("Baseline") => Tier::Baseline,
        _ => Tier::Admin,
    };
    let priority = spec
        .and_then(|s| s.get("priority"))
        .and_then(Value::as_i64)
        .filter(|priority| (0..=super::cluster_policy::MAX_PRIORITY).contains(priority))
        .and_then(|priority| u16::try_from(priority).ok())
        .unwrap_or(0);
    let field = |key: &str| spec.and_then(|s| s.get(key)).cloned();
    // A trial policy: the subject given, the rules given, the rest readable.
    let trial = |subject: Option<Value>, ingress: Option<Value>, egress: Option<Value>| {
        let mut spec = json!({
            "tier": tier.name(),
            "priority": priority,
            "subject": subject.unwrap_or_else(|| json!({"namespaces": {}})),
        });
        if let Some(rules) = ingress {
            spec["ingress"] = rules;
        }
        if let Some(rules) = egress {
            spec["egress"] = rules;
        }
        json!({
            "apiVersion": super::CLUSTER_NETWORK_POLICY_API_VERSION,
            "kind": CLUSTER_NETWORK_POLICY,
            "metadata": {"name": name},
            "spec": spec,
        })
    };
    let subject = convert_alone(source, &trial(field("subject"), None, None))
        .and_then(|converted| converted.cluster_policies.into_iter().next())
        .map_or_else(
            || ClusterSubject {
                namespaces: LabelSelector::everything(),
                pods: LabelSelector::everything(),
            },
            |policy| Arc::unwrap_or_clone(policy).subject,
        );
    // The directions it names: those with rules, both if its spec is unreadable.
    let named = |key: &str| {
        spec.is_none()
            || match field(key) {
                None | Some(Value::Null) => false,
                Some(Value::Array(rules)) => !rules.is_empty(),
                Some(_) => true,
            }
    };
    let mut described = Vec::new();
    let mut direction_rules = |key: &str| -> Vec<ClusterRule> {
        if !named(key) {
            return Vec::new();
        }
        let (ingress, egress) = if key == "ingress" {
            (field(key), None)
        } else {
            (None, field(key))
        };
        let as_written = convert_alone(source, &trial(None, ingress, egress))
            .and_then(|converted| converted.cluster_policies.into_iter().next())
            .map(|policy| {
                let policy = Arc::unwrap_or_clone(policy);
                if key == "ingress" {
                    policy.ingress
                } else {
                    policy.egress
                }
            })
            .filter(|rules| {
                !rules.is_empty() && rules.iter().all(|rule| rule.action == RuleAction::Deny)
            });
        match as_written {
            Some(rules) => {
                described.push(format!("its Deny rules as written ({key})"));
                rules
            }
            None => {
                described.push(format!("every peer and port denied ({key})"));
                vec![ClusterRule {
                    name: Some(DENY_ALL_RULE.to_owned()),
                    action: RuleAction::Deny,
                    peers: None,
                    ports: None,
                    fail_closed: Some(
                        "the policy was refused: it denies everything in this direction".to_owned(),
                    ),
                }]
            }
        }
    };
    let ingress = direction_rules("ingress");
    let egress = direction_rules("egress");
    let policy = ClusterPolicy {
        name: name.to_owned(),
        source: source.clone(),
        tier,
        priority,
        subject,
        ingress,
        egress,
    };
    let what = if described.is_empty() {
        "nothing (it has no rules)".to_owned()
    } else {
        described.join("; ")
    };
    (
        policy,
        format!(
            "{} tier, priority {priority}, for its subjects: {what}",
            tier.name()
        ),
    )
}

/// What the loader makes of `value` alone, if it accepts it.
fn convert_alone(source: &Source, value: &Value) -> Option<super::ConvertedDocument> {
    let converted = PolicySetBuilder::convert_document(source, value, true);
    converted.errors.is_empty().then_some(converted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySet;

    /// The set built from `documents` (JSON values) with substitution on.
    fn build(documents: &[Value]) -> PolicySet {
        let mut builder = PolicySetBuilder::new().fail_closed(true);
        for (index, document) in documents.iter().enumerate() {
            builder.add_api_server_document(&Source::new("api-server:test", index + 1), document);
        }
        builder.finish().expect("substituted, not refused")
    }

    fn network_policy(spec: Value) -> Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "p", "namespace": "prod"}, "spec": spec})
    }

    fn cluster_policy(spec: Value) -> Value {
        json!({"apiVersion": crate::policy::CLUSTER_NETWORK_POLICY_API_VERSION,
               "kind": "ClusterNetworkPolicy", "metadata": {"name": "c"}, "spec": spec})
    }

    #[test]
    fn a_refused_network_policy_isolates_its_pods_in_the_directions_it_names() {
        let set = build(&[network_policy(json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "::ffff:10.0.0.0/104"}}]}],
        }))]);
        let policy = &set.policies[0];
        assert_eq!(policy.pod_selector.to_string(), "{app=db}");
        assert_eq!(policy.ingress.as_deref(), Some(&[][..]));
        assert_eq!(policy.egress, None);
        let refused = &set.refused_policies[0];
        assert_eq!(refused.key(), "NetworkPolicy prod/p");
        assert!(refused.reasons[0].contains("ipBlock"), "{refused:?}");
        assert!(refused.enforced_as.contains("deny-all"), "{refused:?}");

        // Egress named by its rules; an unreadable selector selects every pod of
        // the namespace; an unknown spec field counts.
        let set = build(&[network_policy(json!({
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "Near"}]},
            "egress": [{"ports": [{"port": 53}]}],
            "futureField": true,
        }))]);
        let policy = &set.policies[0];
        assert!(policy.pod_selector.is_everything());
        assert_eq!(policy.ingress.as_deref(), Some(&[][..]));
        assert_eq!(policy.egress.as_deref(), Some(&[][..]));
        assert!(
            set.refused_policies[0]
                .reasons
                .iter()
                .any(|r| r.contains("futureField"))
        );

        // Only what policyTypes names.
        let set = build(&[network_policy(json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "not-an-address"}}]}],
        }))]);
        assert_eq!(set.policies[0].ingress, None);
        assert_eq!(set.policies[0].egress.as_deref(), Some(&[][..]));
    }

    #[test]
    fn without_substitution_a_refused_policy_is_an_error() {
        let mut builder = PolicySetBuilder::new();
        builder.add_api_server_document(
            &Source::new("api-server:test", 1),
            &network_policy(json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "::ffff:10.0.0.0/104"}}]}]})),
        );
        assert!(builder.finish().is_err());
    }

    #[test]
    fn a_refused_cluster_policy_keeps_readable_denies_and_denies_the_rest() {
        let deny = json!({"name": "no-db", "action": "Deny",
                          "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}]});
        let set = build(&[cluster_policy(json!({
            "tier": "Admin", "priority": 5000,
            "subject": {"namespaces": {"matchLabels": {"env": "prod"}}},
            "ingress": [deny],
            "egress": [{"action": "Accept", "to": [{"networks": ["::ffff:10.0.0.0/104"]}]}],
        }))]);
        let policy = &set.cluster_policies[0];
        assert_eq!((policy.tier, policy.priority), (Tier::Admin, 0));
        assert_eq!(policy.subject.namespaces.to_string(), "{env=prod}");
        assert_eq!(policy.ingress.len(), 1);
        assert_eq!(policy.ingress[0].name.as_deref(), Some("no-db"));
        assert!(policy.ingress[0].peers.is_some());
        assert_eq!(policy.egress.len(), 1);
        assert_eq!(policy.egress[0].action, RuleAction::Deny);
        assert_eq!(policy.egress[0].peers, None);
        assert_eq!(policy.egress[0].ports, None);
        let refused = &set.refused_policies[0];
        assert!(
            refused
                .enforced_as
                .contains("Deny rules as written (ingress)")
        );
        assert!(
            refused
                .enforced_as
                .contains("every peer and port denied (egress)")
        );

        // An unreadable subject selects every pod; an unknown tier is Admin.
        let set = build(&[cluster_policy(json!({
            "tier": "Platform", "priority": 10,
            "subject": {"namespaces": {}, "pods": {}},
            "ingress": [deny],
        }))]);
        let policy = &set.cluster_policies[0];
        assert_eq!((policy.tier, policy.priority), (Tier::Admin, 10));
        assert!(policy.subject.namespaces.is_everything() && policy.subject.pods.is_everything());
        assert!(policy.egress.is_empty());
    }
}
