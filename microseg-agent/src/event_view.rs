//! Policy events as users see them: JSON after Hubble's Flow (field names users'
//! `jq` filters already know) and the compact line `hubble observe` prints.

use std::{net::IpAddr, sync::Arc};

use serde_json::{Value, json};

use crate::policy_match::PolicyMatchType;
use crate::{
    datapath::{
        events::{DecodedEvent, monotonic_to_unix_ns},
        state::DatapathState,
    },
    policy::{
        Compiled, Compiler, HitSlotOwner, Labels, PolicyDirection, PolicySet, RuleRef, SetChanges,
        Workload,
    },
};
use microseg_common::{
    drop_reason::DropReason, event::EventVerdict, identity::IDENTITY_WORLD, policy::Direction,
};

/// Lookup tables that turn the numbers in events into names. Persistent maps: the
/// event reader holds a snapshot (a clone costs a reference count) while each
/// policy update changes the agent's copy key by key ([`EventNames::update`]).
/// The workloads' names are the exception ([`WorkloadNames`]).
#[derive(Clone, Default)]
pub struct EventNames {
    /// Workload address -> (namespace, name, labels).
    pub workloads: WorkloadNames,
    /// Endpoint id -> `namespace/name`.
    pub endpoints: imbl::OrdMap<u32, String>,
    /// Rule id -> the rule (NetworkPolicy or ClusterNetworkPolicy).
    pub rules: imbl::OrdMap<u32, Arc<RuleRef>>,
    /// Rule id -> what the rule matches on (Hubble's `policy_match_type`).
    pub rule_matches: imbl::OrdMap<u32, PolicyMatchType>,
    /// (endpoint id, direction) -> policies selecting it, for default denies.
    pub selecting: imbl::OrdMap<(u32, PolicyDirection), Vec<(String, String)>>,
    /// Hit slot -> what it counts (see `agent::rule_hits`).
    pub hit_slots: imbl::OrdMap<u16, HitSlotOwner>,
    /// Local endpoint address -> its workload's identity: events carry only the
    /// peer's, and Hubble shows both ends'. Local endpoints only (a node's pods),
    /// so the table stays small in a large cluster.
    pub local_identities: imbl::OrdMap<IpAddr, u32>,
    /// Node name -> its labels (`key=value`, sorted), for Hubble's `node_labels`.
    pub node_labels: Arc<std::collections::BTreeMap<String, Vec<String>>>,
}

/// Workload address -> its name, for every workload of the cluster. One table
/// shared by every snapshot of [`EventNames`] and updated in place: a persistent
/// map costs about 500 bytes per entry in a cluster of tens of thousands of pods,
/// and a snapshot reading a newer workload's name for an address is harmless.
#[derive(Clone, Default)]
pub struct WorkloadNames(Arc<std::sync::RwLock<WorkloadNameTable>>);

#[derive(Default)]
struct WorkloadNameTable {
    /// The set's own workloads (shared: nothing is copied per pod).
    by_address: foldhash::HashMap<IpAddr, Arc<Workload>>,
    /// The workloads named, found by their (namespace, name): the addresses to
    /// forget are the named workload's own. No key is held beside it (there
    /// was one per pod: a copy of its names and of its addresses).
    named: hashbrown::HashTable<Arc<Workload>>,
    hasher: foldhash::fast::RandomState,
}

impl WorkloadNameTable {
    fn hash(&self, namespace: &str, name: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one((namespace, name))
    }
}

impl WorkloadNames {
    /// The workload holding `address`, if one does.
    pub fn get(&self, address: &IpAddr) -> Option<Arc<Workload>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_address
            .get(address)
            .cloned()
    }

    /// Names workload `namespace/name` as `workload` says, or forgets it.
    fn set(&self, namespace: &str, name: &str, workload: Option<&Arc<Workload>>) {
        let mut table = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let table = &mut *table;
        let hash = table.hash(namespace, name);
        let named = table
            .named
            .find_entry(hash, |w| w.namespace == namespace && w.name == name)
            .ok()
            .map(|entry| entry.remove().0);
        for address in named.iter().flat_map(|old| &old.addresses) {
            // Only where it still names the old workload (another may hold the
            // address now).
            if table
                .by_address
                .get(address)
                .is_some_and(|holder| holder.namespace == namespace && holder.name == name)
            {
                table.by_address.remove(address);
            }
        }
        let Some(workload) = workload else {
            return;
        };
        for address in &workload.addresses {
            table.by_address.insert(*address, workload.clone());
        }
        let hasher = &table.hasher;
        table.named.insert_unique(hash, workload.clone(), |w| {
            use std::hash::BuildHasher;
            hasher.hash_one((w.namespace.as_str(), w.name.as_str()))
        });
    }
}

/// The labels of a workload as Hubble writes them (`k8s:key=value`), sorted:
/// written out when an event is, not held per pod.
pub fn hubble_labels(labels: &Labels) -> Vec<String> {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("k8s:{k}={v}")).collect();
    labels.sort();
    labels
}

impl EventNames {
    /// The tables for a policy set and its compiled form.
    pub fn of(set: &PolicySet, compiled: &Compiled) -> Self {
        let mut names = EventNames::default();
        for workload in set.workloads.iter_shared() {
            names.name_workload(&workload.namespace, &workload.name, Some(workload));
        }
        for id in compiled.endpoints.keys() {
            names.name_endpoint(
                set,
                *id,
                compiled.endpoints.get(id).map(|e| e.workload.as_str()),
            );
        }
        for (id, rule) in compiled.rules.iter() {
            names
                .rule_matches
                .insert(id, PolicyMatchType::of_rule(set, rule));
            names.rules.insert(id, rule.clone());
        }
        names.hit_slots = compiled
            .hit_slots
            .owners
            .iter()
            .map(|(slot, owner)| (*slot, *owner))
            .collect();
        for address in compiled.state.endpoints.keys() {
            names.name_local_identity(*address, &compiled.state);
        }
        names.name_nodes(set);
        names
    }

    /// Brings the tables up to date with one update of the compiler: the workloads
    /// that changed, what the compiler says it touched, and the addresses whose
    /// endpoint or identity the update changed (`identity_changes`).
    pub fn update(
        &mut self,
        set: &PolicySet,
        changes: &SetChanges,
        compiler: &Compiler,
        identity_changes: &[IpAddr],
    ) {
        for address in identity_changes {
            self.name_local_identity(*address, compiler.state());
        }
        if changes.nodes {
            self.name_nodes(set);
        }
        for key in &changes.workloads {
            let (namespace, name) = &**key;
            self.name_workload(namespace, name, set.workloads.shared(namespace, name));
        }
        let touched = compiler.touched();
        for id in &touched.rules {
            match compiler.rule_table().get(*id) {
                Some(rule) => {
                    self.rule_matches
                        .insert(*id, PolicyMatchType::of_rule(set, rule));
                    self.rules.insert(*id, rule.clone())
                }
                None => {
                    self.rule_matches.remove(id);
                    self.rules.remove(id)
                }
            };
        }
        for id in &touched.endpoints {
            let workload = compiler
                .endpoint_table()
                .get(id)
                .map(|e| e.workload.as_str());
            self.name_endpoint(set, *id, workload);
        }
        for slot in &touched.slots {
            match compiler.hit_slot_owner(*slot) {
                Some(owner) => self.hit_slots.insert(*slot, owner),
                None => self.hit_slots.remove(slot),
            };
        }
    }

    /// Names the identity of `address` if it is a local endpoint's, else forgets it.
    fn name_local_identity(&mut self, address: IpAddr, state: &DatapathState) {
        let identity = state
            .endpoints
            .contains_key(&address)
            .then(|| state.peer_hosts.get(&address).copied())
            .flatten();
        match identity {
            Some(identity) => self.local_identities.insert(address, identity),
            None => self.local_identities.remove(&address),
        };
    }

    fn name_nodes(&mut self, set: &PolicySet) {
        self.node_labels = Arc::new(
            set.nodes
                .iter()
                .map(|node| {
                    let mut labels: Vec<String> = node
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    labels.sort();
                    (node.name.clone(), labels)
                })
                .collect(),
        );
    }

    fn name_workload(&mut self, namespace: &str, name: &str, workload: Option<&Arc<Workload>>) {
        self.workloads.set(namespace, name, workload);
    }

    /// Names endpoint `id` (the workload `namespace/name`, or gone).
    fn name_endpoint(&mut self, set: &PolicySet, id: u32, workload: Option<&str>) {
        let workload = workload.and_then(|key| Some((key, set.workload_by_key(key)?)));
        let Some((key, workload)) = workload else {
            self.endpoints.remove(&id);
            for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
                self.selecting.remove(&(id, direction));
            }
            return;
        };
        self.endpoints.insert(id, key.to_owned());
        for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
            let policies: Vec<(String, String)> = set
                .policies_selecting(workload, direction)
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .collect();
            self.selecting.insert((id, direction), policies);
        }
    }
}

/// Builds the JSON object of one event.
pub fn event_json(
    event: &DecodedEvent,
    names: &EventNames,
    node_name: &str,
    interface_name: Option<&str>,
) -> Value {
    let unix_ns = monotonic_to_unix_ns(event.monotonic_ns);
    let time = chrono::DateTime::from_timestamp_nanos(unix_ns as i64)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let mut flow = json!({
        "time": time,
        "verdict": event.verdict.map_or("UNKNOWN", EventVerdict::name),
        "node_name": node_name,
        "interface": {"index": event.ifindex, "name": interface_name.unwrap_or("")},
        "hook": event.hook.map_or("", |h| h.name()),
    });
    if let Some(reason) = event.reason {
        flow["drop_reason_desc"] = json!(reason.name());
    }
    if let Some(labels) = names.node_labels.get(node_name).filter(|l| !l.is_empty()) {
        flow["node_labels"] = json!(labels);
    }
    if let Some(direction) = event.direction {
        flow["traffic_direction"] = json!(direction.name());
    }
    if let (Some(src), Some(dst)) = (event.source, event.destination) {
        flow["IP"] = json!({
            "source": src.to_string(),
            "destination": dst.to_string(),
            "ipVersion": if src.is_ipv4() { "IPv4" } else { "IPv6" },
        });
        let (src_identity, dst_identity) = match event.direction {
            Some(Direction::Ingress) => (event.peer_identity, 0),
            Some(Direction::Egress) => (0, event.peer_identity),
            None => (0, 0),
        };
        flow["source"] = endpoint_json(names, src, src_identity);
        flow["destination"] = endpoint_json(names, dst, dst_identity);
    }
    flow["l4"] = l4_json(event);
    if let Some(direction) = event.direction {
        let by = denied_by(event, names, direction);
        let field = match (event.verdict, direction) {
            (Some(EventVerdict::Forwarded), Direction::Ingress) => "ingress_allowed_by",
            (Some(EventVerdict::Forwarded), Direction::Egress) => "egress_allowed_by",
            (_, Direction::Ingress) => "ingress_denied_by",
            (_, Direction::Egress) => "egress_denied_by",
        };
        flow[field] = by;
    }
    if event.rule_id != 0 {
        flow["rule_id"] = json!(event.rule_id);
        // A rule the tables do not know (yet): it named a peer and a port.
        let kind = names
            .rule_matches
            .get(&event.rule_id)
            .copied()
            .unwrap_or(PolicyMatchType::L3L4);
        flow["policy_match_type"] = json!(kind.number());
    }
    flow
}

fn endpoint_json(names: &EventNames, address: std::net::IpAddr, identity: u32) -> Value {
    let mut endpoint = json!({});
    // The event carries the peer's identity; a local endpoint's is in the tables.
    let identity = match identity {
        0 => names.local_identities.get(&address).copied().unwrap_or(0),
        known => known,
    };
    if identity != 0 {
        endpoint["identity"] = json!(identity);
    }
    match names.workloads.get(&address) {
        Some(workload) => {
            endpoint["namespace"] = json!(workload.namespace);
            endpoint["pod_name"] = json!(workload.name);
            endpoint["labels"] = json!(hubble_labels(&workload.labels));
        }
        None if identity == IDENTITY_WORLD || identity == 0 => {
            endpoint["labels"] = json!(["reserved:world"]);
        }
        None => {}
    }
    endpoint
}

fn l4_json(event: &DecodedEvent) -> Value {
    match event.protocol {
        6 => {
            let mut flags = serde_json::Map::new();
            for (bit, name) in [
                (0x01, "FIN"),
                (0x02, "SYN"),
                (0x04, "RST"),
                (0x08, "PSH"),
                (0x10, "ACK"),
                (0x20, "URG"),
                (0x40, "ECE"),
                (0x80, "CWR"),
            ] {
                if event.tcp_flags & bit != 0 {
                    flags.insert(name.to_owned(), json!(true));
                }
            }
            json!({"TCP": {"source_port": event.source_port, "destination_port": event.destination_port, "flags": flags}})
        }
        17 => {
            json!({"UDP": {"source_port": event.source_port, "destination_port": event.destination_port}})
        }
        132 => {
            json!({"SCTP": {"source_port": event.source_port, "destination_port": event.destination_port}})
        }
        1 => json!({"ICMPv4": {"type": event.source_port, "code": event.destination_port}}),
        58 => json!({"ICMPv6": {"type": event.source_port, "code": event.destination_port}}),
        other => json!({"protocol": other}),
    }
}

/// The policies behind a verdict: the deciding rule's policy, or for a default deny
/// every policy that selected the endpoint in that direction.
fn denied_by(event: &DecodedEvent, names: &EventNames, direction: Direction) -> Value {
    let policy = |namespace: &str, name: &str| json!({"name": name, "namespace": namespace, "kind": "NetworkPolicy"});
    if let Some(rule) = names.rules.get(&event.rule_id) {
        return json!([rule_policy_json(rule)]);
    }
    let direction = match direction {
        Direction::Ingress => PolicyDirection::Ingress,
        Direction::Egress => PolicyDirection::Egress,
    };
    let selecting = names
        .selecting
        .get(&(event.endpoint_id, direction))
        .map(|list| list.iter().map(|(ns, n)| policy(ns, n)).collect::<Vec<_>>())
        .unwrap_or_default();
    Value::Array(selecting)
}

/// The policy of a rule, as Hubble's `Policy` (name, namespace, kind), plus for a
/// ClusterNetworkPolicy what decided: tier, priority, rule index and name, action.
pub fn rule_policy_json(rule: &RuleRef) -> Value {
    match &rule.cluster {
        None => json!({
            "name": rule.policy_name,
            "namespace": rule.policy_namespace,
            "kind": "NetworkPolicy",
        }),
        Some(info) => {
            let mut policy = json!({
                "name": rule.policy_name,
                "namespace": "",
                "kind": "ClusterNetworkPolicy",
                "tier": info.tier.name(),
                "priority": info.priority,
                "rule": rule.rule_index,
                "action": info.action.name(),
            });
            if let Some(name) = &info.name {
                policy["rule_name"] = json!(name);
            }
            policy
        }
    }
}

/// The compact line, as `hubble observe` prints it:
/// `Nov 25 10:00:00.123: default/a:43210 (ID:1234) -> default/b:80 (ID:5678) policy-verdict:none INGRESS DENIED (TCP Flags: SYN)`.
pub fn compact_line(flow: &Value) -> String {
    let time = flow["time"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%b %e %H:%M:%S%.3f")
                .to_string()
        })
        .unwrap_or_default();
    let (sport, dport, l4_text) = l4_summary(&flow["l4"]);
    let side = |endpoint: &Value, ip: &Value, port: Option<u64>| {
        let name = match (
            endpoint["namespace"].as_str(),
            endpoint["pod_name"].as_str(),
        ) {
            (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
            _ => ip.as_str().unwrap_or("?").to_owned(),
        };
        let with_port = match port {
            Some(port) => format!("{name}:{port}"),
            None => name,
        };
        match endpoint["identity"].as_u64() {
            Some(id) if id == u64::from(IDENTITY_WORLD) => format!("{with_port} (world)"),
            Some(id) => format!("{with_port} (ID:{id})"),
            None if endpoint["pod_name"].is_null() => format!("{with_port} (world)"),
            None => with_port,
        }
    };
    let verdict = match flow["verdict"].as_str() {
        Some("DROPPED") => "DENIED",
        Some("AUDIT") => "AUDITED",
        Some("FORWARDED") => "ALLOWED",
        _ => "UNKNOWN",
    };
    let source = side(&flow["source"], &flow["IP"]["source"], sport);
    let destination = side(&flow["destination"], &flow["IP"]["destination"], dport);
    // A packet dropped before policy could judge it is a drop event, printed as
    // hubble prints one: the reason, then DROPPED.
    let dropped_before_policy = flow["drop_reason_desc"]
        .as_str()
        .and_then(DropReason::from_name)
        .filter(|reason| flow["verdict"] == "DROPPED" && !reason.by_policy());
    if let Some(reason) = dropped_before_policy {
        return format!(
            "{time}: {source} -> {destination} {} DROPPED{l4_text}",
            reason.hubble_text()
        );
    }
    let match_kind = PolicyMatchType::from_number(flow["policy_match_type"].as_u64().unwrap_or(0));
    format!(
        "{time}: {source} -> {destination} policy-verdict:{} {} {verdict}{}",
        match_kind.name(),
        flow["traffic_direction"].as_str().unwrap_or("-"),
        l4_text,
    )
}

fn l4_summary(l4: &Value) -> (Option<u64>, Option<u64>, String) {
    if let Some(tcp) = l4.get("TCP") {
        let flags: Vec<&str> = tcp["flags"]
            .as_object()
            .map(|f| f.keys().map(String::as_str).collect())
            .unwrap_or_default();
        return (
            tcp["source_port"].as_u64(),
            tcp["destination_port"].as_u64(),
            format!(" (TCP Flags: {})", flags.join(", ")),
        );
    }
    for (key, label) in [("UDP", " UDP"), ("SCTP", " SCTP")] {
        if let Some(ports) = l4.get(key) {
            return (
                ports["source_port"].as_u64(),
                ports["destination_port"].as_u64(),
                format!(" ({})", label.trim()),
            );
        }
    }
    for key in ["ICMPv4", "ICMPv6"] {
        if let Some(icmp) = l4.get(key) {
            return (
                None,
                None,
                format!(" ({key} type {} code {})", icmp["type"], icmp["code"]),
            );
        }
    }
    (None, None, String::new())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{compact_line, rule_policy_json};
    use crate::policy::{ClusterRuleInfo, PolicyDirection, RuleAction, RuleRef, Tier};

    #[test]
    fn workload_names_follow_workloads_and_their_addresses() {
        use std::{net::IpAddr, sync::Arc};

        use super::WorkloadNames;
        use crate::policy::{Source, Workload};

        let workload = |name: &str, addresses: &[&str]| {
            Arc::new(Workload {
                namespace: "prod".into(),
                name: name.into(),
                labels: Default::default(),
                addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
                ports: Vec::new(),
                interface: None,
                node: None,
                source: Source::new("t.yaml", 1),
            })
        };
        let address = |a: &str| -> IpAddr { a.parse().unwrap() };
        let name_at =
            |names: &WorkloadNames, a: &str| names.get(&address(a)).map(|w| w.name.clone());
        let names = WorkloadNames::default();
        names.set("prod", "a", Some(&workload("a", &["10.0.0.1", "fd00::1"])));
        names.set("prod", "b", Some(&workload("b", &["10.0.0.2"])));
        assert_eq!(name_at(&names, "fd00::1").as_deref(), Some("a"));
        // `a` moves to another address: its old ones are forgotten.
        names.set("prod", "a", Some(&workload("a", &["10.0.0.3"])));
        assert_eq!(name_at(&names, "10.0.0.1"), None);
        assert_eq!(name_at(&names, "10.0.0.3").as_deref(), Some("a"));
        // `b` takes over `a`'s address, then `a` goes: `b` keeps it.
        names.set("prod", "b", Some(&workload("b", &["10.0.0.2", "10.0.0.3"])));
        names.set("prod", "a", None);
        assert_eq!(name_at(&names, "10.0.0.3").as_deref(), Some("b"));
        names.set("prod", "b", None);
        assert_eq!(name_at(&names, "10.0.0.2"), None);
        assert_eq!(name_at(&names, "10.0.0.3"), None);
    }

    #[test]
    fn a_cluster_policy_rule_is_named_with_its_tier_priority_and_action() {
        let rule = RuleRef {
            policy_namespace: String::new(),
            policy_name: "pci-isolation".into(),
            direction: PolicyDirection::Ingress,
            rule_index: 1,
            cluster: Some(ClusterRuleInfo {
                tier: Tier::Admin,
                priority: 10,
                action: RuleAction::Deny,
                name: Some("no-dev".into()),
            }),
        };
        assert_eq!(
            rule_policy_json(&rule),
            json!({"name": "pci-isolation", "namespace": "", "kind": "ClusterNetworkPolicy",
                   "tier": "Admin", "priority": 10, "rule": 1, "rule_name": "no-dev",
                   "action": "Deny"})
        );
        let network_policy = RuleRef {
            policy_namespace: "prod".into(),
            cluster: None,
            ..rule
        };
        assert_eq!(
            rule_policy_json(&network_policy),
            json!({"name": "pci-isolation", "namespace": "prod", "kind": "NetworkPolicy"})
        );
    }

    #[test]
    fn both_ends_have_identities_the_local_one_from_the_tables() {
        use crate::datapath::{events::DecodedEvent, state::DatapathState};
        use microseg_common::{
            DropReason, endpoint::EndpointInfo, event::EventVerdict, policy::Direction,
        };
        let (client, server) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut state = DatapathState::default();
        state.endpoints.insert(server, EndpointInfo::new(1, 0));
        state.peer_hosts.insert(server, 301);
        state.peer_hosts.insert(client, 300);
        let mut names = super::EventNames::default();
        for address in [client, server] {
            names.name_local_identity(address, &state);
        }
        // Only local endpoints are kept.
        assert_eq!(names.local_identities.len(), 1);
        let event = DecodedEvent {
            monotonic_ns: 0,
            ifindex: 7,
            hook: None,
            verdict: Some(EventVerdict::Dropped),
            reason: Some(DropReason::PolicyDenied),
            direction: Some(Direction::Ingress),
            source: Some(client),
            destination: Some(server),
            protocol: 6,
            source_port: 40000,
            destination_port: 81,
            tcp_flags: 0x02,
            endpoint_id: 1,
            peer_identity: 300,
            rule_id: 0,
        };
        let flow = super::event_json(&event, &names, "n", Some("veth1"));
        assert_eq!(flow["source"]["identity"], 300, "the event's peer");
        assert_eq!(flow["destination"]["identity"], 301, "the local endpoint");
        // Gone from the state: forgotten.
        state.endpoints.remove(&server);
        names.name_local_identity(server, &state);
        assert!(names.local_identities.is_empty());
    }

    #[test]
    fn compact_line_reads_like_hubble_observe() {
        let flow = json!({
            "time": "2026-11-25T10:00:00.123456789Z",
            "verdict": "DROPPED",
            "traffic_direction": "INGRESS",
            "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
            "source": {"identity": 1234, "namespace": "default", "pod_name": "a"},
            "destination": {"namespace": "default", "pod_name": "b"},
            "l4": {"TCP": {"source_port": 43210, "destination_port": 80, "flags": {"SYN": true}}},
        });
        let line = compact_line(&flow);
        let (_, rest) = line.split_once(": ").unwrap();
        assert_eq!(
            rest,
            "default/a:43210 (ID:1234) -> default/b:80 policy-verdict:none INGRESS DENIED (TCP Flags: SYN)"
        );
        // Dropped before policy: a drop event, with its reason as hubble prints it.
        let mut forged = flow.clone();
        forged["drop_reason_desc"] = json!("INVALID_SOURCE_IP");
        let line = compact_line(&forged);
        let (_, rest) = line.split_once(": ").unwrap();
        assert_eq!(
            rest,
            "default/a:43210 (ID:1234) -> default/b:80 Invalid source ip DROPPED (TCP Flags: SYN)"
        );
        forged["drop_reason_desc"] = json!("POLICY_DENY");
        assert!(compact_line(&forged).contains("policy-verdict:none INGRESS DENIED"));
        let world = json!({
            "time": "2026-11-25T10:00:00Z", "verdict": "DROPPED", "traffic_direction": "INGRESS",
            "IP": {"source": "192.0.2.9", "destination": "10.0.0.2"},
            "source": {"identity": 2, "labels": ["reserved:world"]},
            "destination": {"namespace": "default", "pod_name": "b"},
            "l4": {"UDP": {"source_port": 5353, "destination_port": 53}},
        });
        assert!(compact_line(&world).contains("192.0.2.9:5353 (world) -> default/b:53"));
        let allowed = json!({
            "time": "2026-11-25T10:00:00Z", "verdict": "FORWARDED", "traffic_direction": "EGRESS",
            "rule_id": 4, "policy_match_type": 3,
            "IP": {"source": "10.0.0.1", "destination": "10.0.0.2"},
            "source": {"identity": 300, "namespace": "default", "pod_name": "a"},
            "destination": {"identity": 301, "namespace": "default", "pod_name": "b"},
            "l4": {"TCP": {"source_port": 43210, "destination_port": 443, "flags": {"SYN": true}}},
        });
        assert!(compact_line(&allowed).contains("policy-verdict:L4-Only EGRESS ALLOWED"));
    }
}
