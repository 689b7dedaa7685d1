//! Observed connections, from flow events: the JSON of `microseg events -o json`
//! (after Hubble's Flow; the agent's `--event-log` lines are the same), or
//! `hubble observe -o json` lines, whose flow sits under `flow`.
//!
//! One connection per 5-tuple, however many events it made (the egress and the
//! ingress side of one connection each report it, a retransmitted SYN again). A
//! reply is never a connection of its own: for TCP only the opener counts (SYN
//! without ACK); for UDP and SCTP the event's direction is the one the kernel judged,
//! and an event whose reverse 5-tuple was seen before is that flow's reply.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::policy::Protocol;

/// A pod as an event names it: namespace, name and its Kubernetes labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Pod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One end of a connection: an address, and the pod holding it when the agent knew
/// one (none for addresses outside the inventory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub pod: Option<Pod>,
}

impl Endpoint {
    /// `namespace/name`, or the address.
    pub fn display(&self) -> String {
        match &self.pod {
            Some(pod) => pod.key(),
            None => self.address.to_string(),
        }
    }
}

/// A connection opened from `source` to `destination`'s `port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub source: Endpoint,
    pub destination: Endpoint,
    pub protocol: Protocol,
    pub source_port: u16,
    pub port: u16,
    /// Times of its first and last event (when the events carry a time).
    pub first_seen: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    /// The verdicts its events carried (`AUDIT`, `FORWARDED`, `DROPPED`).
    pub verdicts: Vec<String>,
}

/// Events read but not counted as connections, by why.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Ignored {
    /// DROPPED events (attempts the policy refused), without `--include-denied`.
    pub denied: usize,
    /// TCP packets other than a connection's opener (replies, mid-connection).
    pub tcp_not_opener: usize,
    /// UDP or SCTP packets whose reverse 5-tuple was seen before: replies.
    pub replies: usize,
    /// ICMP and other protocols a NetworkPolicy cannot name.
    pub not_tcp_udp_sctp: usize,
    /// Events without addresses, ports or a verdict this command reads.
    pub incomplete: usize,
}

/// What a stream of events amounts to.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    pub connections: Vec<Connection>,
    pub events: usize,
    pub ignored: Ignored,
}

/// (protocol, source, source port, destination, destination port).
type FiveTuple = (Protocol, IpAddr, u16, IpAddr, u16);

/// Turns events into connections, one event at a time.
pub struct Collector {
    include_denied: bool,
    observation: Observation,
    /// 5-tuple -> index into `observation.connections`.
    seen: HashMap<FiveTuple, usize>,
}

impl Collector {
    /// `include_denied`: DROPPED events count as connections too.
    pub fn new(include_denied: bool) -> Self {
        Self {
            include_denied,
            observation: Observation::default(),
            seen: HashMap::new(),
        }
    }

    /// Adds one event. An error says why the value is not a flow event at all (the
    /// caller names the file and line); events that are flows but not connections
    /// are counted in [`Ignored`].
    pub fn add(&mut self, event: &Value) -> Result<(), String> {
        // `hubble observe -o json` wraps the flow.
        let flow = event.get("flow").filter(|f| f.is_object()).unwrap_or(event);
        if !flow.is_object() {
            return Err("not a JSON object".to_owned());
        }
        let Some(verdict) = flow.get("verdict").and_then(Value::as_str) else {
            return Err("not a flow event: no \"verdict\" field".to_owned());
        };
        self.observation.events += 1;
        let ignored = &mut self.observation.ignored;
        match verdict {
            "AUDIT" | "FORWARDED" => {}
            "DROPPED" if self.include_denied => {}
            "DROPPED" => {
                ignored.denied += 1;
                return Ok(());
            }
            _ => {
                ignored.incomplete += 1;
                return Ok(());
            }
        }
        let address = |side: &str| {
            flow["IP"][side]
                .as_str()
                .and_then(|text| text.parse::<IpAddr>().ok())
        };
        let (Some(source), Some(destination)) = (address("source"), address("destination")) else {
            ignored.incomplete += 1;
            return Ok(());
        };
        let Some((protocol, ports)) = transport(&flow["l4"]) else {
            if flow["l4"].as_object().is_some_and(|l4| !l4.is_empty()) {
                ignored.not_tcp_udp_sctp += 1;
            } else {
                ignored.incomplete += 1;
            }
            return Ok(());
        };
        let port_of = |field: &str| {
            ports[field]
                .as_u64()
                .and_then(|port| u16::try_from(port).ok())
        };
        let (Some(source_port), Some(port)) = (port_of("source_port"), port_of("destination_port"))
        else {
            ignored.incomplete += 1;
            return Ok(());
        };
        if port == 0 {
            ignored.incomplete += 1;
            return Ok(());
        }
        let tuple = (protocol, source, source_port, destination, port);
        let time = flow["time"]
            .as_str()
            .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
            .map(|time| time.with_timezone(&Utc));
        if let Some(&index) = self.seen.get(&tuple) {
            let connection = &mut self.observation.connections[index];
            if time.is_some() {
                connection.first_seen = connection.first_seen.min(time).or(time);
                connection.last_seen = connection.last_seen.max(time);
            }
            if !connection.verdicts.iter().any(|v| v == verdict) {
                connection.verdicts.push(verdict.to_owned());
            }
            return Ok(());
        }
        match protocol {
            Protocol::Tcp => {
                let flag = |name: &str| ports["flags"][name].as_bool() == Some(true);
                if !flag("SYN") || flag("ACK") {
                    ignored.tcp_not_opener += 1;
                    return Ok(());
                }
            }
            Protocol::Udp | Protocol::Sctp => {
                if self
                    .seen
                    .contains_key(&(protocol, destination, port, source, source_port))
                {
                    ignored.replies += 1;
                    return Ok(());
                }
            }
        }
        self.seen.insert(tuple, self.observation.connections.len());
        self.observation.connections.push(Connection {
            source: endpoint(&flow["source"], source),
            destination: endpoint(&flow["destination"], destination),
            protocol,
            source_port,
            port,
            first_seen: time,
            last_seen: time,
            verdicts: vec![verdict.to_owned()],
        });
        Ok(())
    }

    pub fn finish(self) -> Observation {
        self.observation
    }
}

/// The transport protocol of an event's `l4` and its ports object.
fn transport(l4: &Value) -> Option<(Protocol, &Value)> {
    [
        ("TCP", Protocol::Tcp),
        ("UDP", Protocol::Udp),
        ("SCTP", Protocol::Sctp),
    ]
    .into_iter()
    .find_map(|(key, protocol)| l4.get(key).map(|ports| (protocol, ports)))
}

/// Label keys Cilium adds to an endpoint's labels that are not the pod's own.
fn is_pod_label(key: &str) -> bool {
    !key.starts_with("io.kubernetes.pod.") && !key.starts_with("io.cilium.")
}

/// An event's `source` or `destination`: a pod when it has a namespace and a name.
fn endpoint(side: &Value, address: IpAddr) -> Endpoint {
    let text = |field: &str| side[field].as_str().filter(|text| !text.is_empty());
    let pod = match (text("namespace"), text("pod_name")) {
        (Some(namespace), Some(name)) => {
            let labels = side["labels"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(Value::as_str)
                .filter_map(|label| label.strip_prefix("k8s:"))
                .filter_map(|label| label.split_once('='))
                .filter(|(key, _)| is_pod_label(key))
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect();
            Some(Pod {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                labels,
            })
        }
        _ => None,
    };
    Endpoint { address, pod }
}
