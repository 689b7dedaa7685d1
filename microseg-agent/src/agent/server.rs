//! The API server: a Unix socket (mode from the configuration, 0600 by default),
//! one JSON request per line.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use super::{Agent, AgentCore, config::AgentConfig};
use crate::{
    api::{ObjectKind, Request, Response, SourceText},
    objects::{ObjectKey, ObjectMap, parse_objects},
    policy::{NamespaceScope, Peer, PolicyDirection, PolicySet, Tier},
};
use microseg_common::counters::Counter;

pub async fn serve(agent: Arc<Agent>, config: AgentConfig) -> anyhow::Result<()> {
    let listener = crate::socket::bind_private(&config.socket, config.socket_mode_bits()?)?;
    let limit = config.api_max_request_bytes;
    loop {
        let (stream, _) = listener.accept().await?;
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_connection(agent, stream, limit).await {
                tracing::debug!("API connection ended: {e:#}");
            }
        });
    }
}

/// Reads one request line of at most `limit` bytes: `Ok(None)` at the end of the
/// stream, an error for a longer line (the connection cannot be resynchronised).
async fn read_request_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> anyhow::Result<Option<Result<String, String>>> {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::new();
    let read = reader
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > limit {
        anyhow::bail!("request longer than {limit} bytes");
    }
    Ok(Some(
        String::from_utf8(line).map_err(|_| "request is not UTF-8".to_owned()),
    ))
}

async fn handle_connection(
    agent: Arc<Agent>,
    stream: UnixStream,
    limit: usize,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let line = match read_request_line(&mut reader, limit).await {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(reason))) => {
                send(
                    &mut write,
                    &Response::error(format!("malformed request: {reason}"), vec![]),
                )
                .await?;
                continue;
            }
            Ok(None) => return Ok(()),
            Err(e) => {
                // Oversized: answer, then close (the rest of the line is unread).
                send(
                    &mut write,
                    &Response::error(
                        format!("{e:#}; raise apiMaxRequestBytes to send more at once"),
                        vec![],
                    ),
                )
                .await?;
                return Ok(());
            }
        };
        let request: Request = match serde_json::from_str(&line) {
            Ok(request) => request,
            Err(e) => {
                send(
                    &mut write,
                    &Response::error(format!("malformed request: {e}"), vec![]),
                )
                .await?;
                continue;
            }
        };
        if let Request::Flows {
            last,
            follow,
            filter,
        } = request
        {
            if let Err(e) = filter.validate() {
                send(&mut write, &Response::error(format!("{e:#}"), vec![])).await?;
                continue;
            }
            return stream_flows(&agent, &mut write, last, follow, &filter).await;
        }
        let response = handle(&agent, request).await;
        send(&mut write, &response).await?;
    }
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(response)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    Ok(())
}

/// The newest `last` flows of the history that `filter` accepts, then with `follow`
/// the new ones it accepts. The subscription starts before the history is read, so
/// no flow falls between them; one published in between is in both, and is sent once
/// (the history and the subscription share the line).
async fn stream_flows(
    agent: &Agent,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    last: usize,
    follow: bool,
    filter: &crate::flow_filter::FlowFilter,
) -> anyhow::Result<()> {
    let mut subscription = follow.then(|| agent.hub.subscribe(0));
    let history = agent.hub.history_matching(filter, last);
    for line in &history {
        write.write_all(line.as_bytes()).await?;
        write.write_all(b"\n").await?;
    }
    // By address: a line in both is one allocation.
    let sent: std::collections::HashSet<usize> =
        history.iter().map(|line| line.as_ptr() as usize).collect();
    if let Some(subscription) = &mut subscription {
        while let Some(line) = subscription.live.recv().await {
            let wanted = !sent.contains(&(line.as_ptr() as usize))
                && (filter.is_empty()
                    || serde_json::from_str::<Value>(&line)
                        .is_ok_and(|flow| filter.matches(&flow)));
            if wanted {
                write.write_all(line.as_bytes()).await?;
                write.write_all(b"\n").await?;
            }
        }
    }
    write.write_all(b"{\"end_of_stream\":true}\n").await?;
    Ok(())
}

async fn handle(agent: &Agent, request: Request) -> Response {
    let mut core = agent.core.lock().await;
    let response = match request {
        Request::Apply { sources } => apply(&mut core, sources),
        Request::DeleteSources { sources } => delete_sources(&mut core, sources),
        Request::DeleteObject {
            kind,
            namespace,
            name,
        } => delete_object(&mut core, &kind, &namespace, &name),
        Request::Get { kind } => {
            let mut listing = get(&core, kind);
            if kind == ObjectKind::Policies || kind == ObjectKind::ClusterPolicies {
                add_policy_hits(&mut listing, &rule_hit_records(&core, agent));
            }
            Response::ok(listing)
        }
        Request::Describe {
            kind,
            namespace,
            name,
        } => {
            let mut response = describe(&core, kind, &namespace, &name);
            if response.ok && (kind == ObjectKind::Policies || kind == ObjectKind::ClusterPolicies)
            {
                add_rule_hits(&mut response.data, &rule_hit_records(&core, agent));
            }
            response
        }
        Request::RuleHits => match &core.enforcer.enforced {
            Some(enforced) => Response::ok(agent.rule_hits.report(&enforced.names)),
            None => Response::error("nothing is enforced yet", vec![]),
        },
        Request::Stats => stats(&core, agent),
        Request::Export => export(&core),
        Request::Status => status(&mut core, agent),
        Request::Audit {
            namespace,
            name,
            enabled,
        } => audit(&mut core, &namespace, &name, enabled),
        Request::Flows { .. } => Response::error("events are streamed", vec![]),
        Request::PodNetworkAdded {
            container_id,
            netns,
            interface,
            addresses,
            pod,
        } => {
            let pods = agent.local_pods.borrow().clone();
            let attachment = super::interfaces::CniAttachment {
                interface,
                netns,
                addresses,
                pod,
            };
            super::interfaces::pod_network_added(
                &mut core,
                pods.as_deref(),
                container_id,
                attachment,
            )
        }
        Request::PodNetworkDeleted { container_id } => {
            let pods = agent.local_pods.borrow().clone();
            super::interfaces::pod_network_deleted(&mut core, pods.as_deref(), &container_id)
        }
        Request::PodNetworkCheck {
            container_id,
            interface,
        } => super::interfaces::pod_network_check(&core, &container_id, &interface),
        Request::PodNetworkGarbageCollect {
            valid_container_ids,
        } => {
            let pods = agent.local_pods.borrow().clone();
            super::interfaces::pod_network_garbage_collect(
                &mut core,
                pods.as_deref(),
                &valid_container_ids.into_iter().collect(),
            )
        }
    };
    agent.refresh_names(&core);
    response
}

/// The enforced objects with their keys (see `Request::Export`).
fn export(core: &AgentCore) -> Response {
    let objects: Vec<_> = core
        .all_objects(&core.api_objects, &core.dir_objects)
        .into_iter()
        .collect();
    Response::ok(json!({ "objects": objects }))
}

fn parse_sources(sources: &[SourceText]) -> Result<ObjectMap, Response> {
    let mut objects = ObjectMap::new();
    let mut errors = Vec::new();
    for source in sources {
        match parse_objects(&source.file, &source.text) {
            Ok(found) => objects.extend(found),
            Err(mut found) => errors.append(&mut found),
        }
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(Response::error(
            "the files could not be read as YAML or JSON objects; nothing was applied",
            errors,
        ))
    }
}

fn enforce(core: &mut AgentCore, api: ObjectMap, summary: Vec<String>) -> Response {
    let dirs = core.dir_objects.clone();
    let audit = core.audit.clone();
    match core.enforce(api, dirs, audit) {
        Ok(report) => Response::ok(json!({
            "generation": report.generation,
            "changes": report.changes,
            "objects": summary,
        })),
        Err(refused) => Response::error(refused.summary, refused.details),
    }
}

fn apply(core: &mut AgentCore, sources: Vec<SourceText>) -> Response {
    let incoming = match parse_sources(&sources) {
        Ok(objects) => objects,
        Err(response) => return response,
    };
    if incoming.is_empty() {
        return Response::error("the files hold no objects", vec![]);
    }
    let mut api = core.api_objects.clone();
    let mut summary = Vec::new();
    for (key, object) in incoming {
        let verb = match api.get(&key) {
            Some(existing) if existing.value == object.value => "unchanged",
            Some(_) => "configured",
            None => "created",
        };
        summary.push(format!("{key} {verb}"));
        api.insert(key, object);
    }
    enforce(core, api, summary)
}

fn delete_sources(core: &mut AgentCore, sources: Vec<SourceText>) -> Response {
    let named = match parse_sources(&sources) {
        Ok(objects) => objects,
        Err(response) => return response,
    };
    let mut api = core.api_objects.clone();
    let mut summary = Vec::new();
    let mut missing = Vec::new();
    for key in named.keys() {
        if api.remove(key).is_some() {
            summary.push(format!("{key} deleted"));
        } else {
            missing.push(format!("{key} not found"));
        }
    }
    if summary.is_empty() {
        return Response::error("none of the objects in the files were applied", missing);
    }
    summary.extend(missing);
    enforce(core, api, summary)
}

/// Kubernetes-style kind names users type.
fn canonical_kind(kind: &str) -> Option<&'static str> {
    Some(match kind.to_ascii_lowercase().as_str() {
        "policy" | "policies" | "networkpolicy" | "networkpolicies" | "netpol" => "NetworkPolicy",
        "workload" | "workloads" => "Workload",
        "pod" | "pods" => "Pod",
        "namespace" | "namespaces" | "ns" => "Namespace",
        "clusternetworkpolicy" | "clusternetworkpolicies" | "cnp" => "ClusterNetworkPolicy",
        "node" | "nodes" | "no" => "Node",
        _ => return None,
    })
}

fn delete_object(core: &mut AgentCore, kind: &str, namespace: &str, name: &str) -> Response {
    let Some(kind) = canonical_kind(kind) else {
        return Response::error(format!("unknown kind {kind:?}"), vec![]);
    };
    let key = ObjectKey::new(
        kind.to_owned(),
        if crate::objects::cluster_scoped(kind) {
            String::new()
        } else {
            namespace.to_owned()
        },
        name.to_owned(),
    );
    let mut api = core.api_objects.clone();
    if api.remove(&key).is_none() {
        let hint = if core.dir_objects.contains_key(&key) {
            " (it comes from a watched directory: remove it there)"
        } else {
            ""
        };
        return Response::error(format!("{key} not found{hint}"), vec![]);
    }
    enforce(core, api, vec![format!("{key} deleted")])
}

fn audit(core: &mut AgentCore, namespace: &str, name: &str, enabled: bool) -> Response {
    let workload = format!("{namespace}/{name}");
    let known = core.enforcer.set().workload_by_key(&workload).is_some();
    if !known {
        return Response::error(format!("workload {workload} not found"), vec![]);
    }
    let mut audit = core.audit.clone();
    audit.insert(workload.clone(), enabled);
    let (api, dirs) = (core.api_objects.clone(), core.dir_objects.clone());
    match core.enforce(api, dirs, audit) {
        Ok(report) => Response::ok(json!({
            "generation": report.generation,
            "objects": [format!("workload {workload} audit mode {}", if enabled { "on" } else { "off" })],
        })),
        Err(refused) => Response::error(refused.summary, refused.details),
    }
}

fn rule_hit_records(core: &AgentCore, agent: &Agent) -> Vec<super::rule_hits::HitRecord> {
    core.enforcer
        .enforced
        .as_ref()
        .map(|enforced| agent.rule_hits.records(&enforced.names))
        .unwrap_or_default()
}

/// The rule's records of one policy (a NetworkPolicy has a namespace, a cluster one
/// none).
fn records_of<'r>(
    records: &'r [super::rule_hits::HitRecord],
    namespace: &'r str,
    name: &'r str,
) -> impl Iterator<Item = &'r super::rule_hits::HitRecord> {
    records.iter().filter(move |record| {
        matches!(&record.counted, super::rule_hits::CountedThing::Rule(rule)
            if rule.policy_name == name && rule.policy_namespace == namespace)
    })
}

/// Each listed policy's connections and packets, summed over its rules, and its last
/// hit (`get policies -o wide`).
fn add_policy_hits(listing: &mut Value, records: &[super::rule_hits::HitRecord]) {
    for item in listing.as_array_mut().into_iter().flatten() {
        let namespace = item["namespace"].as_str().unwrap_or_default().to_owned();
        let name = item["name"].as_str().unwrap_or_default().to_owned();
        let (mut connections, mut packets, mut last_hit) = (0u64, 0u64, None);
        for record in records_of(records, &namespace, &name) {
            connections += record.hits.flows;
            packets += record.hits.packets;
            last_hit = last_hit.max(record.last_hit);
        }
        item["connections"] = json!(connections);
        item["packets"] = json!(packets);
        item["lastHit"] = last_hit.map_or(json!("never"), |t| {
            json!(
                chrono::DateTime::<chrono::Utc>::from(t)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )
        });
    }
}

/// Each rule's hits (`describe policy`).
fn add_rule_hits(detail: &mut Value, records: &[super::rule_hits::HitRecord]) {
    let namespace = detail["namespace"].as_str().unwrap_or_default().to_owned();
    let name = detail["name"].as_str().unwrap_or_default().to_owned();
    let hits: Vec<String> = records_of(records, &namespace, &name)
        .map(|record| {
            let super::rule_hits::CountedThing::Rule(rule) = &record.counted else {
                return String::new();
            };
            format!(
                "{}[{}]: {} connections, {} packets, last hit {}",
                rule.direction.name(),
                rule.rule_index,
                record.hits.flows,
                record.hits.packets,
                record.last_hit.map_or("never".to_owned(), |t| {
                    chrono::DateTime::<chrono::Utc>::from(t)
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                })
            )
        })
        .collect();
    detail["ruleHits"] = json!(hits);
}

fn set_of(core: &AgentCore) -> Option<&PolicySet> {
    core.enforcer.enforced.as_ref().map(|_| core.enforcer.set())
}

fn get(core: &AgentCore, kind: ObjectKind) -> Value {
    if core.enforcer.enforced.is_none() {
        return json!([]);
    }
    let set = core.enforcer.set();
    let compiled = &core.enforcer.compiled();
    let state = core.enforcer.current_state();
    match kind {
        ObjectKind::Policies => Value::Array(
            set.policies
                .iter()
                .map(|p| {
                    let mut types = Vec::new();
                    if p.ingress.is_some() {
                        types.push("Ingress");
                    }
                    if p.egress.is_some() {
                        types.push("Egress");
                    }
                    json!({
                        "namespace": p.namespace,
                        "name": p.name,
                        "podSelector": p.pod_selector.to_string(),
                        "policyTypes": types,
                        "ingressRules": p.ingress.as_ref().map_or(0, Vec::len),
                        "egressRules": p.egress.as_ref().map_or(0, Vec::len),
                        "source": p.source.to_string(),
                    })
                })
                .collect(),
        ),
        ObjectKind::Workloads => Value::Array(
            set.workloads
                .iter()
                .map(|w| {
                    let endpoint = compiled.endpoints.iter().find(|(_, e)| e.workload == w.key());
                    let identity = w.addresses.first().and_then(|a| state.peer_hosts.get(a));
                    let audit = core.audit.get(&w.key()).copied().unwrap_or(core.enforcer.default_audit);
                    json!({
                        "namespace": w.namespace,
                        "name": w.name,
                        "addresses": w.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "labels": w.labels,
                        "identity": identity,
                        "endpoint": endpoint.map(|(id, _)| *id),
                        "ingressEnforced": endpoint.is_some_and(|(_, e)| e.ingress_enforced),
                        "egressEnforced": endpoint.is_some_and(|(_, e)| e.egress_enforced),
                        "audit": endpoint.is_some() && audit,
                    })
                })
                .collect(),
        ),
        ObjectKind::ClusterPolicies => Value::Array(
            set.cluster_policies
                .iter()
                .map(|p| {
                    let subject = if p.subject.pods.is_everything() {
                        format!("namespaces {}", p.subject.namespaces)
                    } else {
                        format!("pods {} in namespaces {}", p.subject.pods, p.subject.namespaces)
                    };
                    let selected = cluster_policy_subjects(set, p);
                    json!({
                        "kind": "ClusterNetworkPolicy",
                        "name": p.name,
                        "tier": p.tier.name(),
                        "priority": p.priority,
                        "subject": subject,
                        "ingressRules": p.ingress.len(),
                        "egressRules": p.egress.len(),
                        "selectedWorkloads": selected.len(),
                        "source": p.source.to_string(),
                    })
                })
                .collect(),
        ),
        ObjectKind::Nodes => Value::Array(
            set.nodes
                .iter()
                .map(|n| {
                    json!({
                        "name": n.name,
                        "addresses": n.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "labels": n.labels,
                    })
                })
                .collect(),
        ),
        ObjectKind::Namespaces => Value::Array(
            set.namespaces
                .values()
                .map(|n| json!({"name": n.name, "labels": n.labels}))
                .collect(),
        ),
        ObjectKind::Identities => Value::Array(
            compiled
                .identities
                .identities
                .keys()
                .map(|id| json!({"identity": id, "description": compiled.identities.describe(*id)}))
                .collect(),
        ),
        ObjectKind::Endpoints => Value::Array(
            compiled
                .endpoints
                .iter()
                .map(|(id, e)| {
                    let workload = set.workload_by_key(&e.workload);
                    // In evaluation order: Admin tier, NetworkPolicies, Baseline tier.
                    let selecting = |direction| -> Vec<String> {
                        let Some(w) = workload else {
                            return Vec::new();
                        };
                        let cluster = |tier| {
                            set.cluster_policies_selecting(w, direction)
                                .filter(move |p| p.tier == tier)
                                .map(|p| format!("ClusterNetworkPolicy/{} ({} {})", p.name, p.tier, p.priority))
                        };
                        cluster(Tier::Admin)
                            .chain(
                                set.policies_selecting(w, direction)
                                    .map(|p| format!("{}/{}", p.namespace, p.name)),
                            )
                            .chain(cluster(Tier::Baseline))
                            .collect()
                    };
                    let audit = core.audit.get(&e.workload).copied().unwrap_or(core.enforcer.default_audit);
                    json!({
                        "endpoint": id,
                        "workload": e.workload,
                        "addresses": workload.map(|w| w.addresses.iter().map(ToString::to_string).collect::<Vec<_>>()),
                        "ingressEnforced": e.ingress_enforced,
                        "egressEnforced": e.egress_enforced,
                        "audit": audit,
                        "ingressPolicies": selecting(PolicyDirection::Ingress),
                        "egressPolicies": selecting(PolicyDirection::Egress),
                    })
                })
                .collect(),
        ),
    }
}

fn describe(core: &AgentCore, kind: ObjectKind, namespace: &str, name: &str) -> Response {
    let Some(set) = set_of(core) else {
        return Response::error("nothing is enforced yet", vec![]);
    };
    let listing = get(core, kind);
    let found = listing.as_array().and_then(|items| {
        items.iter().find(|item| {
            let item_name = item["name"].as_str().or_else(|| item["workload"].as_str());
            match kind {
                ObjectKind::Endpoints => item_name == Some(&format!("{namespace}/{name}")),
                ObjectKind::Namespaces | ObjectKind::ClusterPolicies | ObjectKind::Nodes => {
                    item_name == Some(name)
                }
                ObjectKind::Identities => {
                    item["identity"].as_u64().map(|i| i.to_string()) == Some(name.to_owned())
                }
                _ => item_name == Some(name) && item["namespace"].as_str() == Some(namespace),
            }
        })
    });
    let Some(found) = found else {
        return Response::error(format!("{name} not found in namespace {namespace}"), vec![]);
    };
    let mut detail = found.clone();
    if kind == ObjectKind::Policies
        && let Some(policy) = set
            .policies
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    {
        let rules = |rules: Option<&[crate::policy::Rule]>| -> Vec<String> {
            rules
                .unwrap_or_default()
                .iter()
                .map(|r| format!("{r:?}"))
                .collect()
        };
        detail["ingress"] = json!(rules(policy.rules(PolicyDirection::Ingress)));
        detail["egress"] = json!(rules(policy.rules(PolicyDirection::Egress)));
        let selected: Vec<String> = set
            .workloads
            .iter()
            .filter(|w| {
                set.policies_selecting(w, PolicyDirection::Ingress)
                    .chain(set.policies_selecting(w, PolicyDirection::Egress))
                    .any(|p| p.namespace == namespace && p.name == name)
            })
            .map(|w| w.key())
            .collect();
        detail["selectedWorkloads"] = json!(selected);
    }
    if kind == ObjectKind::ClusterPolicies
        && let Some(policy) = set.cluster_policies.iter().find(|p| p.name == name)
    {
        for direction in [PolicyDirection::Ingress, PolicyDirection::Egress] {
            let rules: Vec<String> = policy
                .rules(direction)
                .iter()
                .enumerate()
                .map(|(index, rule)| cluster_rule_text(index, rule))
                .collect();
            detail[direction.name()] = json!(rules);
        }
        detail["selectedWorkloads"] = json!(cluster_policy_subjects(set, policy));
    }
    Response::ok(detail)
}

/// The workloads a ClusterNetworkPolicy applies to (in either direction), as
/// `namespace/name`.
fn cluster_policy_subjects(set: &PolicySet, policy: &crate::policy::ClusterPolicy) -> Vec<String> {
    set.workloads
        .iter()
        .filter(|w| {
            [PolicyDirection::Ingress, PolicyDirection::Egress]
                .into_iter()
                .any(|d| set.cluster_policy_selects(policy, w, d))
        })
        .map(|w| w.key())
        .collect()
}

/// One ClusterNetworkPolicy rule as `describe` shows it:
/// `0 "name": Deny from namespaces {..}; ports TCP/80` .
fn cluster_rule_text(index: usize, rule: &crate::policy::ClusterRule) -> String {
    let mut text = format!("{index}");
    if let Some(name) = &rule.name {
        text.push_str(&format!(" {name:?}"));
    }
    let peers = match &rule.peers {
        None => "every peer".to_owned(),
        Some(peers) if peers.is_empty() => "no peer".to_owned(),
        Some(peers) => peers
            .iter()
            .map(|peer| match peer {
                Peer::Workloads { namespaces, pods } => {
                    let namespaces = match namespaces {
                        NamespaceScope::Named(name) => name.clone(),
                        NamespaceScope::Selected(selector) => selector.to_string(),
                    };
                    if pods.is_everything() {
                        format!("namespaces {namespaces}")
                    } else {
                        format!("pods {pods} in namespaces {namespaces}")
                    }
                }
                Peer::IpBlock(block) => format!("network {block}"),
                Peer::Nodes(selector) => format!("nodes {selector}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
    };
    let ports = match &rule.ports {
        None => "any port".to_owned(),
        Some(ports) => ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    };
    text.push_str(&format!(": {} {peers}; {ports}", rule.action));
    if let Some(reason) = &rule.fail_closed {
        text.push_str(&format!(" (fail closed: {reason})"));
    }
    text
}

fn counters_json(core: &AgentCore, agent: &Agent) -> Value {
    let Some(counters) = agent.kernel.counters() else {
        return Value::Null;
    };
    let mut by_name = serde_json::Map::new();
    for counter in Counter::ALL {
        by_name.insert(counter.name().to_owned(), json!(counters.get(counter)));
    }
    let mut drops = serde_json::Map::new();
    for reason in microseg_common::DropReason::ALL {
        drops.insert(reason.name().to_owned(), json!(counters.drops(reason)));
    }
    let usage: Vec<Value> = agent
        .kernel
        .usage(&core.enforcer.current_state().counts())
        .iter()
        .map(|u| json!({"map": u.map, "entries": u.entries, "capacity": u.capacity}))
        .collect();
    let (rotations, unwritten) = agent.hub.log_stats();
    json!({
        "counters": by_name,
        "drops_by_reason": drops,
        "maps": usage,
        "event_log": {"rotations": rotations, "lines_not_written": unwritten},
    })
}

/// The conntrack table for `status`: its pressure (entries over capacity, counted
/// every 5 s) and the flows it lost (evicted while live) or let expire.
fn conntrack_json(agent: &Agent) -> Value {
    use std::sync::atomic::Ordering;
    let usage = agent.kernel.conntrack_usage();
    let counters = agent.kernel.counters();
    let counted_at = agent.kernel.counted_at.load(Ordering::Relaxed);
    json!({
        "entries": usage.entries,
        "capacity": usage.capacity,
        "pressure": (usage.pressure() * 1000.0).round() / 1000.0,
        "countedAt": (counted_at > 0).then(|| {
            chrono::DateTime::from_timestamp(counted_at as i64, 0).map(|t| t.to_rfc3339())
        }).flatten(),
        "flowsLost": counters.as_ref().map(|c| c.get(Counter::ConntrackFlowLost)),
        "flowsExpired": counters.as_ref().map(|c| c.get(Counter::ConntrackFlowExpired)),
        // Packets of flows allowed before an update that took something away,
        // judged again; and flows of reused addresses marked to be.
        "flowsRejudged": counters.as_ref().map(|c| c.get(Counter::ConntrackRejudged)),
        "flowsMarkedStale": agent.flows_marked_stale.load(Ordering::Relaxed),
    })
}

fn stats(core: &AgentCore, agent: &Agent) -> Response {
    Response::ok(counters_json(core, agent))
}

fn status(core: &mut AgentCore, agent: &Agent) -> Response {
    let generation = agent.kernel.live_generation();
    let set = core.enforcer.set();
    let (policies, cluster_policies, nodes, workloads, enforced) = (
        set.policies.len(),
        set.cluster_policies.len(),
        set.nodes.len(),
        set.workloads.len(),
        core.enforcer.compiler_counters().endpoints,
    );
    let uptime = core.started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    let problems = core.problems();
    let interfaces: Vec<&super::interfaces::InterfaceStatus> =
        core.interfaces.status.values().collect();
    let mut status = json!({
        "healthy": problems.is_empty(),
        "problems": problems,
        "generation": generation,
        "policies": policies,
        "clusterPolicies": cluster_policies,
        "nodes": nodes,
        "workloads": workloads,
        "enforcedWorkloads": enforced,
        "apiObjects": core.api_objects.len(),
        "directoryObjects": core.dir_objects.len(),
        "watchedPaths": core.config.policy_dirs,
        "directoryError": core.dir_error,
        "attached": core.attached,
        "interfaces": interfaces,
        "refusedPolicies": core.enforcer.set().refused_policies,
        "vethScan": {
            "failures": core.interfaces.scan_failures,
            "failing": core.interfaces.scan_error,
        },
        "pinDir": core.config.pin_dir,
        "uptimeSeconds": uptime,
        "lastApplyMs": core.enforcer.last_apply.map(|d| d.as_secs_f64() * 1000.0),
        "appliesOk": core.enforcer.applies_ok,
        "appliesFailed": core.enforcer.applies_failed,
        "lastApplyMapEntries": core.enforcer.last_apply_entries,
        "mapEntriesWritten": core.enforcer.entries_written,
        // What compiling the changes cost: full compiles are the fallbacks whose
        // cost follows the cluster rather than the change.
        "compiler": core.enforcer.compiler_counters(),
        // The old generation slot's rewrite after the last switch is still to come
        // (done off the path to enforcement, in the background).
        "standbyPending": core.enforcer.standby_pending(),
        "eventSubscribers": agent.hub.subscriber_count(),
        "taskRestarts": agent.restarts.snapshot(),
        "eventsReceived": agent.hub.received.load(std::sync::atomic::Ordering::Relaxed),
        "eventsLostBySubscribers": agent.hub.subscriber_lost.load(std::sync::atomic::Ordering::Relaxed),
        "flowHistory": {
            "flows": agent.hub.history_len(),
            "capacity": agent.hub.history_capacity,
            "traceAllowed": core.config.trace_allowed,
        },
    });
    status["conntrack"] = conntrack_json(agent);
    status["savedIds"] = json!(agent.ids_file.status(core));
    if let Some(kubernetes) = &core.kubernetes {
        status["kubernetes"] = json!(kubernetes);
    }
    Response::ok(status)
}
