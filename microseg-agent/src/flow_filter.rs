//! Which flows (policy verdict events, as `event_view` writes them) a query wants:
//! the filters of `microseg events`, after `hubble observe`'s. One definition serves
//! the agent (it filters its flow history and live stream server-side), the CLI
//! (event log files read offline) and `suggest`/`diff`/`graph`.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every field set must match (AND); unset fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct FlowFilter {
    /// `DROPPED`, `AUDIT` or `FORWARDED` (see [`FlowFilter::verdict_from`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// Either side in this namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Either side is this workload (`ns/name` or `name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_pod: Option<String>,
    /// Source or destination port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `tcp`, `udp`, `sctp`, `icmp` (prefix of the l4 key, any case).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_ip: Option<IpAddr>,
    /// `ingress` or `egress`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_direction: Option<String>,
    /// Flows at or after this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Flows before this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

impl FlowFilter {
    /// The verdict as events spell it, from what users type (`deny`, `audit`,
    /// `allowed`, ...).
    pub fn verdict_from(text: &str) -> anyhow::Result<&'static str> {
        Ok(match text.to_ascii_lowercase().as_str() {
            "deny" | "denied" | "dropped" | "drop" => "DROPPED",
            "audit" | "audited" => "AUDIT",
            "forwarded" | "allow" | "allowed" => "FORWARDED",
            other => anyhow::bail!("verdict {other:?}: use deny, audit or forwarded"),
        })
    }

    /// Whether the filter can be applied: a clear error for a bad verdict or
    /// direction, before any flow is read.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(verdict) = &self.verdict {
            Self::verdict_from(verdict)?;
        }
        if let Some(direction) = &self.traffic_direction
            && !["ingress", "egress"].contains(&direction.to_ascii_lowercase().as_str())
        {
            anyhow::bail!("traffic direction {direction:?}: use ingress or egress");
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn matches(&self, flow: &Value) -> bool {
        if let Some(verdict) = &self.verdict
            && Self::verdict_from(verdict).ok() != flow["verdict"].as_str()
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(time) = flow["time"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            else {
                return false;
            };
            if self.since.is_some_and(|since| time < since)
                || self.until.is_some_and(|until| time >= until)
            {
                return false;
            }
        }
        let side_is = |side: &str, wanted: &str| -> bool {
            let endpoint = &flow[side];
            let name = endpoint["pod_name"].as_str().unwrap_or_default();
            let namespace = endpoint["namespace"].as_str().unwrap_or_default();
            match wanted.split_once('/') {
                Some((ns, n)) => ns == namespace && n == name,
                None => wanted == name,
            }
        };
        if let Some(ns) = &self.namespace
            && flow["source"]["namespace"].as_str() != Some(ns)
            && flow["destination"]["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        if let Some(pod) = &self.pod
            && !side_is("source", pod)
            && !side_is("destination", pod)
        {
            return false;
        }
        if self
            .from_pod
            .as_ref()
            .is_some_and(|p| !side_is("source", p))
            || self
                .to_pod
                .as_ref()
                .is_some_and(|p| !side_is("destination", p))
        {
            return false;
        }
        let ip = |field: &str| {
            flow["IP"][field]
                .as_str()
                .and_then(|s| s.parse::<IpAddr>().ok())
        };
        if let Some(wanted) = self.ip
            && ip("source") != Some(wanted)
            && ip("destination") != Some(wanted)
        {
            return false;
        }
        if self.from_ip.is_some_and(|w| ip("source") != Some(w))
            || self.to_ip.is_some_and(|w| ip("destination") != Some(w))
        {
            return false;
        }
        if let Some(direction) = &self.traffic_direction
            && !flow["traffic_direction"]
                .as_str()
                .is_some_and(|d| d.eq_ignore_ascii_case(direction))
        {
            return false;
        }
        let l4 = flow["l4"].as_object();
        if let Some(protocol) = &self.protocol {
            let wanted = protocol.to_ascii_uppercase();
            if !l4.is_some_and(|m| {
                m.keys()
                    .any(|k| k.to_ascii_uppercase().starts_with(&wanted))
            }) {
                return false;
            }
        }
        if let Some(port) = self.port {
            let matches = l4.is_some_and(|m| {
                m.values().any(|ports| {
                    ports["source_port"].as_u64() == Some(u64::from(port))
                        || ports["destination_port"].as_u64() == Some(u64::from(port))
                })
            });
            if !matches {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::FlowFilter;

    fn flow() -> serde_json::Value {
        json!({
            "time": "2026-11-30T10:00:00Z",
            "verdict": "DROPPED",
            "traffic_direction": "INGRESS",
            "IP": {"source": "10.0.0.1", "destination": "10.0.0.2"},
            "source": {"namespace": "prod", "pod_name": "web-1"},
            "destination": {"namespace": "prod", "pod_name": "db-1"},
            "l4": {"TCP": {"source_port": 43210, "destination_port": 5432}},
        })
    }

    #[test]
    fn every_set_field_must_match() {
        let flow = flow();
        assert!(FlowFilter::default().matches(&flow));
        let filter = |f: FlowFilter| f.matches(&flow);
        assert!(filter(FlowFilter {
            verdict: Some("deny".into()),
            to_pod: Some("prod/db-1".into()),
            port: Some(5432),
            protocol: Some("tcp".into()),
            traffic_direction: Some("ingress".into()),
            ..FlowFilter::default()
        }));
        assert!(!filter(FlowFilter {
            verdict: Some("audit".into()),
            ..FlowFilter::default()
        }));
        assert!(!filter(FlowFilter {
            from_pod: Some("db-1".into()),
            ..FlowFilter::default()
        }));
        assert!(!filter(FlowFilter {
            namespace: Some("dev".into()),
            ..FlowFilter::default()
        }));
        assert!(filter(FlowFilter {
            ip: Some("10.0.0.2".parse().unwrap()),
            ..FlowFilter::default()
        }));
    }

    #[test]
    fn time_window_is_half_open() {
        let flow = flow();
        let at = "2026-11-30T10:00:00Z".parse().unwrap();
        assert!(
            FlowFilter {
                since: Some(at),
                ..FlowFilter::default()
            }
            .matches(&flow)
        );
        assert!(
            !FlowFilter {
                until: Some(at),
                ..FlowFilter::default()
            }
            .matches(&flow)
        );
    }

    #[test]
    fn a_bad_verdict_or_direction_is_refused() {
        assert!(
            FlowFilter {
                verdict: Some("maybe".into()),
                ..FlowFilter::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            FlowFilter {
                traffic_direction: Some("sideways".into()),
                ..FlowFilter::default()
            }
            .validate()
            .is_err()
        );
    }
}
