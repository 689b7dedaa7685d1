//! Output of `get`, `describe`, `stats` and `status`: aligned tables, or the agent's
//! JSON as JSON or YAML.

use serde_json::Value;

use super::{OutputFormat, table::Table};
use crate::api::ObjectKind;

fn text(value: &Value) -> String {
    match value {
        Value::Null => "<none>".to_owned(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(items) if items.is_empty() => "<none>".to_owned(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        Value::Object(map) if map.is_empty() => "<none>".to_owned(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect::<Vec<_>>()
            .join(","),
    }
}

pub fn print_structured(value: &Value, output: OutputFormat) -> anyhow::Result<bool> {
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(value)?),
        OutputFormat::Yaml => print!("{}", serde_norway::to_string(value)?),
        _ => return Ok(false),
    }
    Ok(true)
}

pub fn print_list(
    kind: ObjectKind,
    data: &Value,
    name: Option<&str>,
    namespace: Option<&str>,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let items: Vec<&Value> = data
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|item| {
                    namespace.is_none_or(|ns| item["namespace"].as_str().is_none_or(|n| n == ns))
                        && name.is_none_or(|wanted| {
                            item["name"].as_str() == Some(wanted)
                                || item["workload"].as_str() == Some(wanted)
                                || item["identity"].as_u64().map(|i| i.to_string()).as_deref()
                                    == Some(wanted)
                        })
                })
                .collect()
        })
        .unwrap_or_default();
    if name.is_some() && items.is_empty() {
        anyhow::bail!("{} not found", name.unwrap_or_default());
    }
    let list = Value::Array(items.iter().map(|v| (*v).clone()).collect());
    if print_structured(&list, output)? {
        return Ok(());
    }
    let wide = output == OutputFormat::Wide;
    let (headers, columns): (Vec<&str>, Vec<&str>) = match (kind, wide) {
        (ObjectKind::Policies, false) => (
            vec!["NAMESPACE", "NAME", "POD-SELECTOR", "POLICY-TYPES"],
            vec!["namespace", "name", "podSelector", "policyTypes"],
        ),
        (ObjectKind::Policies, true) => (
            vec![
                "NAMESPACE",
                "NAME",
                "POD-SELECTOR",
                "POLICY-TYPES",
                "INGRESS-RULES",
                "EGRESS-RULES",
                "CONNECTIONS",
                "PACKETS",
                "LAST-HIT",
                "SOURCE",
            ],
            vec![
                "namespace",
                "name",
                "podSelector",
                "policyTypes",
                "ingressRules",
                "egressRules",
                "connections",
                "packets",
                "lastHit",
                "source",
            ],
        ),
        (ObjectKind::Workloads, false) => (
            vec![
                "NAMESPACE",
                "NAME",
                "ADDRESSES",
                "IDENTITY",
                "INGRESS",
                "EGRESS",
            ],
            vec![
                "namespace",
                "name",
                "addresses",
                "identity",
                "ingressEnforced",
                "egressEnforced",
            ],
        ),
        (ObjectKind::Workloads, true) => (
            vec![
                "NAMESPACE",
                "NAME",
                "ADDRESSES",
                "IDENTITY",
                "ENDPOINT",
                "INGRESS",
                "EGRESS",
                "AUDIT",
                "LABELS",
            ],
            vec![
                "namespace",
                "name",
                "addresses",
                "identity",
                "endpoint",
                "ingressEnforced",
                "egressEnforced",
                "audit",
                "labels",
            ],
        ),
        (ObjectKind::ClusterPolicies, false) => (
            vec![
                "NAME",
                "TIER",
                "PRIORITY",
                "SUBJECT",
                "INGRESS-RULES",
                "EGRESS-RULES",
            ],
            vec![
                "name",
                "tier",
                "priority",
                "subject",
                "ingressRules",
                "egressRules",
            ],
        ),
        (ObjectKind::ClusterPolicies, true) => (
            vec![
                "NAME",
                "TIER",
                "PRIORITY",
                "SUBJECT",
                "INGRESS-RULES",
                "EGRESS-RULES",
                "SELECTED",
                "SOURCE",
            ],
            vec![
                "name",
                "tier",
                "priority",
                "subject",
                "ingressRules",
                "egressRules",
                "selectedWorkloads",
                "source",
            ],
        ),
        (ObjectKind::Nodes, _) => (
            vec!["NAME", "ADDRESSES", "LABELS"],
            vec!["name", "addresses", "labels"],
        ),
        (ObjectKind::Namespaces, _) => (vec!["NAME", "LABELS"], vec!["name", "labels"]),
        (ObjectKind::Identities, _) => (
            vec!["IDENTITY", "DESCRIPTION"],
            vec!["identity", "description"],
        ),
        (ObjectKind::Endpoints, false) => (
            vec![
                "ENDPOINT",
                "WORKLOAD",
                "ADDRESSES",
                "INGRESS",
                "EGRESS",
                "AUDIT",
            ],
            vec![
                "endpoint",
                "workload",
                "addresses",
                "ingressEnforced",
                "egressEnforced",
                "audit",
            ],
        ),
        (ObjectKind::Endpoints, true) => (
            vec![
                "ENDPOINT",
                "WORKLOAD",
                "ADDRESSES",
                "INGRESS",
                "EGRESS",
                "AUDIT",
                "INGRESS-POLICIES",
                "EGRESS-POLICIES",
            ],
            vec![
                "endpoint",
                "workload",
                "addresses",
                "ingressEnforced",
                "egressEnforced",
                "audit",
                "ingressPolicies",
                "egressPolicies",
            ],
        ),
    };
    if output == OutputFormat::Name {
        for item in &items {
            let name = item["name"]
                .as_str()
                .or_else(|| item["workload"].as_str())
                .unwrap_or_default();
            match item["namespace"].as_str() {
                Some(ns) => println!("{ns}/{name}"),
                None => println!("{name}"),
            }
        }
        return Ok(());
    }
    if items.is_empty() {
        eprintln!("No resources found.");
        return Ok(());
    }
    let mut table = Table::new(&headers);
    for item in items {
        table.row(columns.iter().map(|c| text(&item[*c])).collect());
    }
    print!("{}", table.render());
    Ok(())
}

pub fn print_describe(data: &Value) {
    if let Some(map) = data.as_object() {
        let width = map.keys().map(String::len).max().unwrap_or(0) + 1;
        for (key, value) in map {
            match value {
                Value::Array(items) if !items.is_empty() => {
                    println!("{:<width$}", format!("{key}:"));
                    for item in items {
                        println!("  {}", text(item));
                    }
                }
                _ => println!("{:<width$} {}", format!("{key}:"), text(value)),
            }
        }
    }
}

pub fn print_stats(data: &Value, output: OutputFormat) -> anyhow::Result<()> {
    if print_structured(data, output)? {
        return Ok(());
    }
    let mut counters = Table::new(&["COUNTER", "VALUE"]);
    if let Some(map) = data["counters"].as_object() {
        for (name, value) in map {
            counters.row(vec![name.clone(), text(value)]);
        }
    }
    print!("{}", counters.render());
    println!();
    let mut drops = Table::new(&["DROP REASON", "PACKETS"]);
    if let Some(map) = data["drops_by_reason"].as_object() {
        for (name, value) in map {
            drops.row(vec![name.clone(), text(value)]);
        }
    }
    print!("{}", drops.render());
    println!();
    let mut maps = Table::new(&["MAP", "ENTRIES", "CAPACITY", "PRESSURE"]);
    if let Some(list) = data["maps"].as_array() {
        for map in list {
            let entries = map["entries"].as_f64().unwrap_or(0.0);
            let capacity = map["capacity"].as_f64().unwrap_or(1.0).max(1.0);
            maps.row(vec![
                text(&map["map"]),
                text(&map["entries"]),
                text(&map["capacity"]),
                format!("{:.1}%", 100.0 * entries / capacity),
            ]);
        }
    }
    print!("{}", maps.render());
    Ok(())
}

pub fn print_status(data: &Value, output: OutputFormat) -> anyhow::Result<()> {
    if print_structured(data, output)? {
        return Ok(());
    }
    let problems = data["problems"].as_array().cloned().unwrap_or_default();
    if problems.is_empty() {
        println!("Health: OK");
    } else {
        println!(
            "Health: DEGRADED ({} problem{})",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        for problem in &problems {
            println!("  {}", text(problem));
        }
    }
    println!();
    let mut interfaces = Table::new(&[
        "INTERFACE",
        "ORIGIN",
        "IFINDEX",
        "HOOKS",
        "WORKLOAD",
        "STATE",
    ]);
    for interface in data["interfaces"].as_array().into_iter().flatten() {
        let hooks: Vec<String> = interface["hooks"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(hook, _)| hook.clone())
            .collect();
        let state = if interface["enforcing"].as_bool() != Some(true) {
            "NOT ENFORCING".to_owned()
        } else if interface["awaitingPolicy"].as_bool() == Some(true) {
            // A pod's veth whose pod the API server has not reported yet.
            "awaiting pod: drops".to_owned()
        } else {
            "enforcing".to_owned()
        };
        interfaces.row(vec![
            text(&interface["name"]),
            text(&interface["origin"]),
            text(&interface["ifindex"]),
            hooks.join(","),
            text(&interface["workload"]),
            state,
        ]);
    }
    print!("{}", interfaces.render());
    println!();
    let mut rest = data.clone();
    if let Some(map) = rest.as_object_mut() {
        for key in ["healthy", "problems", "interfaces", "attached"] {
            map.remove(key);
        }
    }
    print_describe(&rest);
    Ok(())
}
