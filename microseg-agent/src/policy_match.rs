//! What the rule deciding a verdict matched on, as Cilium's policy verdicts say it
//! (Hubble's `policy_match_type`, `hubble observe`'s `policy-verdict:L3-L4`).

use crate::policy::{PolicySet, PortRule, PortSpec, RuleRef};

/// What the deciding rule matched on, as Cilium's policy verdicts say it
/// (`PolicyMatch*` in pkg/monitor/api, numbered as there): peers (L3), ports (L4),
/// only protocols, both or neither. A default deny matched no rule (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyMatchType {
    None = 0,
    L3Only = 1,
    L3L4 = 2,
    L4Only = 3,
    All = 4,
    L3Proto = 5,
    ProtoOnly = 6,
}

impl PolicyMatchType {
    /// The name `hubble observe` prints (`policy-verdict:L3-L4`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::L3Only => "L3-Only",
            Self::L3L4 => "L3-L4",
            Self::L4Only => "L4-Only",
            Self::All => "all",
            Self::L3Proto => "L3-Proto",
            Self::ProtoOnly => "Proto-Only",
        }
    }

    pub const fn number(self) -> u32 {
        self as u32
    }

    pub fn from_number(number: u64) -> Self {
        [
            Self::L3Only,
            Self::L3L4,
            Self::L4Only,
            Self::All,
            Self::L3Proto,
            Self::ProtoOnly,
        ]
        .into_iter()
        .find(|kind| u64::from(kind.number()) == number)
        .unwrap_or(Self::None)
    }

    /// What `rule` matches on, read from its policy in `set`. A rule listing ports
    /// counts as matching ports if any entry names one (the event does not say
    /// which entry matched), as protocols if every entry leaves the port out.
    pub fn of_rule(set: &PolicySet, rule: &RuleRef) -> Self {
        let (peers, ports) = match &rule.cluster {
            None => {
                let Some(found) = set
                    .policy(&rule.policy_namespace, &rule.policy_name)
                    .and_then(|p| p.rules(rule.direction))
                    .and_then(|rules| rules.get(rule.rule_index))
                else {
                    return Self::L3L4;
                };
                (found.peers.is_some(), found.ports.as_deref())
            }
            Some(_) => {
                let Some(found) = set
                    .cluster_policies
                    .iter()
                    .find(|p| p.name == rule.policy_name)
                    .and_then(|p| p.rules(rule.direction).get(rule.rule_index))
                else {
                    return Self::L3L4;
                };
                (found.peers.is_some(), found.ports.as_deref())
            }
        };
        let names_a_port =
            |ports: &[PortRule]| ports.iter().any(|p| !matches!(p.port, PortSpec::Any));
        match (peers, ports) {
            (true, None) => Self::L3Only,
            (true, Some(ports)) if names_a_port(ports) => Self::L3L4,
            (true, Some(_)) => Self::L3Proto,
            (false, None) => Self::All,
            (false, Some(ports)) if names_a_port(ports) => Self::L4Only,
            (false, Some(_)) => Self::ProtoOnly,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyDirection, PolicySetBuilder};

    #[test]
    fn a_rules_match_type_says_whether_it_named_peers_ports_or_protocols() {
        let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  podSelector: {}
  ingress:
  - from: [{podSelector: {}}]
    ports: [{port: 80, protocol: TCP}]
  - from: [{podSelector: {}}]
  - ports: [{port: 443, protocol: TCP}]
  - {}
  - from: [{podSelector: {}}]
    ports: [{protocol: UDP}]
  - ports: [{protocol: UDP}]
"#;
        let mut builder = PolicySetBuilder::new();
        builder.add_text(std::path::Path::new("p.yaml"), yaml);
        let set = builder.finish().expect("a valid set");
        let policy = set.policy("prod", "web").expect("the policy");
        let kinds: Vec<&str> = (0..6)
            .map(|index| {
                let rule = RuleRef::network_policy(policy, PolicyDirection::Ingress, index);
                PolicyMatchType::of_rule(&set, &rule).name()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "L3-L4",
                "L3-Only",
                "L4-Only",
                "all",
                "L3-Proto",
                "Proto-Only"
            ]
        );
        for kind in [
            PolicyMatchType::None,
            PolicyMatchType::ProtoOnly,
            PolicyMatchType::All,
        ] {
            assert_eq!(PolicyMatchType::from_number(kind.number().into()), kind);
        }
    }
}
