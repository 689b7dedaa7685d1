//! Observed flows: the events of the agent's history (`microseg events -o json`, the
//! JSON of `event_view`) or of a file of such lines (Hubble's `{"flow": {...}}`
//! wrapping too), reduced to what policy judges: addresses, protocol, port.

use std::{collections::BTreeMap, io::BufRead, net::IpAddr, path::Path};

use anyhow::Context;
use serde_json::Value;

use super::reach::Node;
use crate::policy::{PolicySet, Protocol};

/// What the data path did with an observed flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObservedVerdict {
    /// `DROPPED`
    Denied,
    /// `AUDIT`: would have been denied; passed in audit mode.
    Audited,
    /// `FORWARDED` (trace-allowed).
    Allowed,
}

/// One observed packet's flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObservedFlow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
    pub verdict: ObservedVerdict,
}

/// Reads one event; `None` for what policy does not judge by port (ICMP, other
/// protocols) and for stream markers.
pub fn parse_event(value: &Value) -> Option<ObservedFlow> {
    // `hubble observe -o json` wraps each flow.
    let flow = value.get("flow").unwrap_or(value);
    let verdict = match flow.get("verdict")?.as_str()? {
        "DROPPED" => ObservedVerdict::Denied,
        "AUDIT" => ObservedVerdict::Audited,
        "FORWARDED" => ObservedVerdict::Allowed,
        _ => return None,
    };
    let ip = flow.get("IP")?;
    let src: IpAddr = ip.get("source")?.as_str()?.parse().ok()?;
    let dst: IpAddr = ip.get("destination")?.as_str()?.parse().ok()?;
    let l4 = flow.get("l4")?;
    let (protocol, ports) = [
        ("TCP", Protocol::Tcp),
        ("UDP", Protocol::Udp),
        ("SCTP", Protocol::Sctp),
    ]
    .into_iter()
    .find_map(|(key, protocol)| l4.get(key).map(|ports| (protocol, ports)))?;
    let port = u16::try_from(ports.get("destination_port")?.as_u64()?).ok()?;
    Some(ObservedFlow {
        src,
        dst,
        protocol,
        port,
        verdict,
    })
}

/// Reads a file of JSON lines (blank lines skipped); a line that is not JSON is an
/// error naming the file and line. Events policy does not judge by port are left
/// out.
pub fn read_flows_file(path: &Path) -> anyhow::Result<Vec<ObservedFlow>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read the flows file {}", path.display()))?;
    let mut flows = Vec::new();
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: not a JSON event (expected `microseg events -o json` lines)",
                path.display(),
                number + 1
            )
        })?;
        flows.extend(parse_event(&value));
    }
    Ok(flows)
}

/// Observed flows with the same ends (as a set names them), protocol and port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub from: Node,
    pub to: Node,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {} {}/{}",
            self.from, self.to, self.protocol, self.port
        )
    }
}

/// Counts flows by [`FlowKey`], ends named by the first of `sets` that knows the
/// address (a workload), else by the address.
pub fn group<'a>(
    flows: impl IntoIterator<Item = &'a ObservedFlow>,
    sets: &[&PolicySet],
) -> BTreeMap<FlowKey, u64> {
    let name = |address: IpAddr| {
        sets.iter()
            .find_map(|set| set.workload_by_address(address))
            .map_or_else(
                || Node::External(address.into()),
                |w| Node::workload(&w.namespace, &w.name),
            )
    };
    let mut groups = BTreeMap::new();
    for flow in flows {
        *groups
            .entry(FlowKey {
                from: name(flow.src),
                to: name(flow.dst),
                protocol: flow.protocol,
                port: flow.port,
            })
            .or_insert(0) += 1;
    }
    groups
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn events_are_read_as_microseg_and_hubble_write_them() {
        let event = json!({
            "verdict": "DROPPED",
            "IP": {"source": "10.0.0.1", "destination": "10.0.0.2"},
            "l4": {"TCP": {"source_port": 40000, "destination_port": 5432, "flags": {"SYN": true}}},
        });
        let flow = parse_event(&event).unwrap();
        assert_eq!(
            (flow.protocol, flow.port, flow.verdict),
            (Protocol::Tcp, 5432, ObservedVerdict::Denied)
        );
        assert_eq!(parse_event(&json!({"flow": event})), Some(flow));
        let icmp = json!({"verdict": "DROPPED", "IP": {"source": "10.0.0.1", "destination": "10.0.0.2"},
                          "l4": {"ICMPv4": {"type": 8, "code": 0}}});
        assert_eq!(parse_event(&icmp), None);
        assert_eq!(parse_event(&json!({"end_of_stream": true})), None);
    }

    #[test]
    fn a_bad_line_names_the_file_and_line() {
        let path = std::env::temp_dir().join(format!("microseg-flows-{}.json", std::process::id()));
        std::fs::write(&path, "{\"verdict\":\"AUDIT\"}\n\nnot json\n").unwrap();
        let error = format!("{:#}", read_flows_file(&path).unwrap_err());
        std::fs::remove_file(&path).unwrap();
        assert!(error.contains("line 3: not a JSON event"), "{error}");
    }
}
