//! `microseg rule-hits`: connections and packets per rule and per default deny, and
//! (`--unused-since`) the rules nothing used in a window: the compliance audit's
//! "which rules can go".

use std::path::Path;

use clap::Args;
use serde_json::Value;

use super::{OutputFormat, events::time_arg, table::Table};
use crate::api::{Request, client::Client};

#[derive(Args)]
pub struct RuleHitsArgs {
    /// Only rules with no hit since this time: a duration back from now (30m, 2h,
    /// 7d) or an RFC 3339 time. Rules counted for less than the whole window are
    /// listed apart: the agent cannot vouch for them.
    #[arg(long)]
    pub unused_since: Option<String>,
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

pub fn run(socket: &Path, args: &RuleHitsArgs) -> anyhow::Result<()> {
    let since = time_arg(args.unused_since.as_deref(), "unused-since")?;
    let data = Client::connect(socket)?.call(&Request::RuleHits)?;
    let rules = data["rules"].as_array().cloned().unwrap_or_default();
    let time = |item: &Value, field: &str| {
        item[field]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
    };
    let (listed, partial): (Vec<Value>, Vec<Value>) = match since {
        None => (rules, Vec::new()),
        Some(since) => {
            let unused = rules
                .into_iter()
                .filter(|item| item["kind"] != "DefaultDeny")
                .filter(|item| time(item, "lastHit").is_none_or(|hit| hit < since));
            unused.partition(|item| time(item, "countingSince").is_some_and(|t| t <= since))
        }
    };
    if matches!(args.output, OutputFormat::Json | OutputFormat::Yaml) {
        let mut report = serde_json::json!({
            "rules": listed,
            "uncountedRules": data["uncountedRules"],
            "sampledAt": data["sampledAt"],
            "samplePeriodSeconds": data["samplePeriodSeconds"],
        });
        if let Some(since) = since {
            report["unusedSince"] = Value::from(since.to_rfc3339());
            report["countedForPartOfTheWindow"] = Value::Array(partial);
        }
        super::resources::print_structured(&report, args.output)?;
        return Ok(());
    }
    print!("{}", table(&listed));
    if let Some(since) = since {
        println!(
            "{} rule(s) with no hit since {}.",
            listed.len(),
            since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        if !partial.is_empty() {
            println!(
                "Counted for only part of the window (added later, or the agent restarted), no hit yet:"
            );
            print!("{}", table(&partial));
        }
    }
    if data["uncountedRules"].as_u64().unwrap_or(0) > 0 {
        println!(
            "{} rule(s) not counted: every counter slot is taken.",
            data["uncountedRules"]
        );
    }
    Ok(())
}

fn table(items: &[Value]) -> String {
    let mut table = Table::new(&[
        "KIND",
        "NAMESPACE",
        "POLICY",
        "DIRECTION",
        "RULE",
        "ACTION",
        "CONNECTIONS",
        "PACKETS",
        "LAST-HIT",
        "COUNTING-SINCE",
    ]);
    let text = |value: &Value| match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    for item in items {
        let default_deny = item["kind"] == "DefaultDeny";
        let (namespace, policy) = if default_deny {
            let workload = item["workload"].as_str().unwrap_or_default();
            let (ns, name) = workload.split_once('/').unwrap_or(("", workload));
            (ns.to_owned(), format!("(workload {name})"))
        } else {
            (text(&item["namespace"]), text(&item["name"]))
        };
        let action = if default_deny {
            "DefaultDeny".to_owned()
        } else {
            item["action"].as_str().unwrap_or("Allow").to_owned()
        };
        let rule = if default_deny {
            "-".to_owned()
        } else {
            match item["rule_name"].as_str() {
                Some(name) => format!("{} ({name})", item["rule"]),
                None => text(&item["rule"]),
            }
        };
        table.row(vec![
            text(&item["kind"]),
            if namespace.is_empty() {
                "-".to_owned()
            } else {
                namespace
            },
            policy,
            text(&item["direction"]),
            rule,
            action,
            if default_deny {
                "-".to_owned()
            } else {
                text(&item["connections"])
            },
            text(&item["packets"]),
            item["lastHit"].as_str().unwrap_or("never").to_owned(),
            text(&item["countingSince"]),
        ]);
    }
    table.render()
}
