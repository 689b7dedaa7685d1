//! `microseg events`: flows (denied, audited, allowed with `traceAllowed`) from the
//! agent's flow history and live stream, or from event log files, filtered as
//! `hubble observe` filters them (`flow_filter`), printed compact, as JSON lines or
//! as a table.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use serde_json::Value;

use super::{OutputFormat, table::Table};
use crate::{
    api::{Request, client::Client},
    event_view::compact_line,
    flow_filter::FlowFilter,
};

#[derive(Args)]
pub struct EventsArgs {
    /// Keep streaming new events.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The last N buffered events (default 20; 0 with --follow for only new ones).
    #[arg(long)]
    pub last: Option<usize>,
    /// Only events newer than this: a duration back from now (30s, 5m, 1h) or an
    /// RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only events older than this (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// Read flows from these JSON-lines files (the agent's --event-log and its
    /// rotated files, or saved `microseg events -o json` output) instead of the agent.
    #[arg(long)]
    pub file: Vec<PathBuf>,
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
    let filter = args.filter()?;
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
    let mut show = |event: Value| {
        match args.output {
            OutputFormat::Json => println!("{event}"),
            OutputFormat::Table | OutputFormat::Wide if !args.follow => {
                table_rows.row(table_row(&event));
            }
            _ => println!("{}", compact_line(&event)),
        }
        shown += 1;
        args.max.is_none_or(|max| shown < max)
    };
    if args.file.is_empty() {
        let mut client = Client::connect(socket)?;
        client.stream(
            &Request::Flows {
                last,
                follow: args.follow,
                filter,
            },
            &mut show,
        )?;
    } else {
        if args.follow {
            anyhow::bail!("--follow reads from the agent, not from --file");
        }
        for flow in read_flow_files(&args.file, &filter, last)? {
            if !show(flow) {
                break;
            }
        }
    }
    if matches!(args.output, OutputFormat::Table | OutputFormat::Wide) && !args.follow {
        print!("{}", table_rows.render());
    }
    Ok(())
}

/// The newest `last` flows that `filter` accepts in JSON-lines files (`microseg
/// events -o json` output, the agent's event log), oldest first. A line that is not a
/// flow is an error naming file and line.
pub fn read_flow_files(
    files: &[PathBuf],
    filter: &FlowFilter,
    last: usize,
) -> anyhow::Result<Vec<Value>> {
    let mut flows = std::collections::VecDeque::new();
    for file in files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let flow: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a JSON flow", file.display(), number + 1))?;
            if flow.get("end_of_stream").is_some() || !filter.matches(&flow) {
                continue;
            }
            if flows.len() == last {
                flows.pop_front();
            }
            if last > 0 {
                flows.push_back(flow);
            }
        }
    }
    Ok(flows.into())
}

impl EventsArgs {
    /// The filter these arguments ask for, checked.
    pub fn filter(&self) -> anyhow::Result<FlowFilter> {
        let time = |text: &Option<String>, flag: &str| time_arg(text.as_deref(), flag);
        let filter = FlowFilter {
            verdict: self
                .verdict
                .as_deref()
                .map(FlowFilter::verdict_from)
                .transpose()?
                .map(str::to_owned),
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            from_pod: self.from_pod.clone(),
            to_pod: self.to_pod.clone(),
            port: self.port,
            protocol: self.protocol.clone(),
            ip: self.ip,
            from_ip: self.from_ip,
            to_ip: self.to_ip,
            traffic_direction: self.traffic_direction.clone(),
            since: time(&self.since, "since")?,
            until: time(&self.until, "until")?,
        };
        filter.validate()?;
        Ok(filter)
    }
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

/// A time given as a duration back from now (`30s`, `5m`, `2h`, `7d`) or as an RFC
/// 3339 time; errors name the flag.
pub(super) fn time_arg(text: Option<&str>, flag: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    let Some(text) = text else { return Ok(None) };
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(Some(time.with_timezone(&Utc)));
    }
    let back = parse_duration(text).with_context(|| format!("--{flag}"))?;
    Ok(Some(
        Utc::now() - chrono::Duration::from_std(back).unwrap_or_default(),
    ))
}

pub(super) fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let (number, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
    let number: u64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("{text:?} is not a duration like 30s, 5m or 1h"))?;
    let seconds = match unit {
        "s" | "" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86_400,
        _ => anyhow::bail!("{text:?}: the unit must be s, m, h or d"),
    };
    Ok(Duration::from_secs(seconds))
}
