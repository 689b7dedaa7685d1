//! `microseg events`: deny and audit events from the agent, filtered as
//! `hubble observe` filters them, printed compact, as JSON lines or as a table.

use std::{net::IpAddr, path::Path, time::Duration};

use clap::Args;
use serde_json::Value;

use super::{OutputFormat, table::Table};
use crate::{
    api::{Request, client::Client},
    event_view::compact_line,
};

#[derive(Args)]
pub struct EventsArgs {
    /// Keep streaming new events.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The last N buffered events (default 20; 0 with --follow for only new ones).
    #[arg(long)]
    pub last: Option<usize>,
    /// Only events newer than this (e.g. 30s, 5m, 1h).
    #[arg(long)]
    pub since: Option<String>,
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Compact)]
    pub output: OutputFormat,
    /// deny|dropped|audit|forwarded
    #[arg(long)]
    pub verdict: Option<String>,
    /// Either side in this namespace.
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Either side is this workload ([ns/]name).
    #[arg(long, alias = "workload")]
    pub pod: Option<String>,
    #[arg(long)]
    pub from_pod: Option<String>,
    #[arg(long)]
    pub to_pod: Option<String>,
    /// Source or destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// tcp|udp|sctp|icmp
    #[arg(long)]
    pub protocol: Option<String>,
    #[arg(long)]
    pub ip: Option<IpAddr>,
    #[arg(long)]
    pub from_ip: Option<IpAddr>,
    #[arg(long)]
    pub to_ip: Option<IpAddr>,
    /// ingress|egress
    #[arg(long)]
    pub traffic_direction: Option<String>,
    /// Stop after this many matching events.
    #[arg(long)]
    pub max: Option<usize>,
}

pub fn run(socket: &Path, args: &EventsArgs) -> anyhow::Result<()> {
    let since = match &args.since {
        Some(text) => Some(parse_duration(text)?),
        None => None,
    };
    let filter = Filter::new(args, since)?;
    let last = args.last.unwrap_or(if args.follow { 0 } else { 20 });
    let mut shown = 0usize;
    let mut table_rows = Table::new(&[
        "TIME",
        "SOURCE",
        "DESTINATION",
        "PROTOCOL",
        "DIRECTION",
        "VERDICT",
        "REASON",
    ]);
    let mut client = Client::connect(socket)?;
    client.stream(
        &Request::Events {
            last: if args.follow { last } else { last.max(1024) },
            follow: args.follow,
        },
        |event| {
            if !filter.matches(&event) {
                return true;
            }
            match args.output {
                OutputFormat::Json => println!("{event}"),
                OutputFormat::Table | OutputFormat::Wide if !args.follow => {
                    table_rows.row(table_row(&event));
                }
                _ => println!("{}", compact_line(&event)),
            }
            shown += 1;
            args.max.is_none_or(|max| shown < max)
        },
    )?;
    if matches!(args.output, OutputFormat::Table | OutputFormat::Wide) && !args.follow {
        print!("{}", table_rows.render());
    }
    Ok(())
}

fn table_row(event: &Value) -> Vec<String> {
    let line = compact_line(event);
    let (time, rest) = line.split_once(": ").unwrap_or(("", &line));
    let mut parts = rest.splitn(3, " -> ");
    let source = parts.next().unwrap_or_default().to_owned();
    let destination = parts
        .next()
        .and_then(|d| d.split(" policy-verdict").next())
        .unwrap_or_default()
        .to_owned();
    let protocol = event["l4"]
        .as_object()
        .and_then(|m| m.keys().next().cloned())
        .unwrap_or_default();
    vec![
        time.to_owned(),
        source,
        destination,
        protocol,
        event["traffic_direction"]
            .as_str()
            .unwrap_or("-")
            .to_owned(),
        event["verdict"].as_str().unwrap_or("-").to_owned(),
        event["drop_reason_desc"].as_str().unwrap_or("-").to_owned(),
    ]
}

fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let (number, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
    let number: u64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("--since {text:?} is not a duration like 30s, 5m or 1h"))?;
    let seconds = match unit {
        "s" | "" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86_400,
        _ => anyhow::bail!("--since {text:?}: unit must be s, m, h or d"),
    };
    Ok(Duration::from_secs(seconds))
}

struct Filter<'a> {
    args: &'a EventsArgs,
    verdict: Option<&'static str>,
    not_before: Option<chrono::DateTime<chrono::Utc>>,
}

impl<'a> Filter<'a> {
    fn new(args: &'a EventsArgs, since: Option<Duration>) -> anyhow::Result<Self> {
        let verdict = match args
            .verdict
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => None,
            Some("deny" | "denied" | "dropped" | "drop") => Some("DROPPED"),
            Some("audit" | "audited") => Some("AUDIT"),
            Some("forwarded" | "allow" | "allowed") => Some("FORWARDED"),
            Some(other) => anyhow::bail!("--verdict {other:?}: use deny, audit or forwarded"),
        };
        let not_before =
            since.map(|d| chrono::Utc::now() - chrono::Duration::from_std(d).unwrap_or_default());
        Ok(Self {
            args,
            verdict,
            not_before,
        })
    }

    fn matches(&self, event: &Value) -> bool {
        let a = self.args;
        if let Some(verdict) = self.verdict
            && event["verdict"].as_str() != Some(verdict)
        {
            return false;
        }
        if let Some(not_before) = self.not_before {
            let time = event["time"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            if time.is_none_or(|t| t < not_before) {
                return false;
            }
        }
        let side_is = |side: &str, wanted: &str| -> bool {
            let endpoint = &event[side];
            let name = endpoint["pod_name"].as_str().unwrap_or_default();
            let namespace = endpoint["namespace"].as_str().unwrap_or_default();
            match wanted.split_once('/') {
                Some((ns, n)) => ns == namespace && n == name,
                None => wanted == name,
            }
        };
        if let Some(ns) = &a.namespace
            && event["source"]["namespace"].as_str() != Some(ns)
            && event["destination"]["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        if let Some(pod) = &a.pod
            && !side_is("source", pod)
            && !side_is("destination", pod)
        {
            return false;
        }
        if a.from_pod.as_ref().is_some_and(|p| !side_is("source", p)) {
            return false;
        }
        if a.to_pod
            .as_ref()
            .is_some_and(|p| !side_is("destination", p))
        {
            return false;
        }
        let ip = |field: &str| {
            event["IP"][field]
                .as_str()
                .and_then(|s| s.parse::<IpAddr>().ok())
        };
        if let Some(wanted) = a.ip
            && ip("source") != Some(wanted)
            && ip("destination") != Some(wanted)
        {
            return false;
        }
        if a.from_ip.is_some_and(|w| ip("source") != Some(w))
            || a.to_ip.is_some_and(|w| ip("destination") != Some(w))
        {
            return false;
        }
        if let Some(direction) = &a.traffic_direction
            && !event["traffic_direction"]
                .as_str()
                .is_some_and(|d| d.eq_ignore_ascii_case(direction))
        {
            return false;
        }
        let l4 = event["l4"].as_object();
        if let Some(protocol) = &a.protocol {
            let wanted = protocol.to_ascii_uppercase();
            if !l4.is_some_and(|m| {
                m.keys()
                    .any(|k| k.to_ascii_uppercase().starts_with(&wanted))
            }) {
                return false;
            }
        }
        if let Some(port) = a.port {
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
