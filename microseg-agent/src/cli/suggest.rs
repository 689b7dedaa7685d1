//! `microseg suggest`: NetworkPolicies for the observed traffic, from the agent's
//! recent events or from event files, printed as YAML (or JSON with the report); the
//! report (self-check, what else the policies allow) goes to stderr.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use crate::{
    api::{ObjectKind, Request, client::Client},
    flow_filter::FlowFilter,
    suggest::{Collector, Inventory, InventoryPod, Observation, suggest},
};

/// Events asked of the agent when `--last` is not given: everything it keeps.
const ALL_EVENTS: usize = 100_000_000;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SuggestFormat {
    Yaml,
    Json,
}

#[derive(Args)]
pub struct SuggestArgs {
    /// Read flows from these files instead of the agent: JSON lines as
    /// `microseg events -o json`, the agent's --event-log and `hubble observe -o json`
    /// write them.
    #[arg(long = "from-file", num_args = 1..)]
    pub from_files: Vec<PathBuf>,
    /// Only suggest policies for the workloads of this namespace.
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Count denied flows (DROPPED) as connections to allow too: by default only
    /// audited and allowed ones count, denied ones being what the policy refused.
    #[arg(long)]
    pub include_denied: bool,
    /// Report what else the policies allow over the workloads and namespaces in
    /// these files or directories (as `check --inventory` reads them; `kubectl get
    /// pods,namespaces -A -o yaml` output too). Default: the agent's inventory, or
    /// with --from-file the pods the flows name.
    #[arg(long = "inventory")]
    pub inventories: Vec<PathBuf>,
    /// Read only the agent's last N events (default: all it keeps).
    #[arg(long, conflicts_with = "from_files")]
    pub last: Option<usize>,
    /// Only flows observed since this time: a duration back from now (30m, 7d) or
    /// an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only flows observed before this time (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    #[arg(short, long, value_enum, default_value_t = SuggestFormat::Yaml)]
    pub output: SuggestFormat,
}

pub fn run(socket: &Path, args: &SuggestArgs) -> anyhow::Result<()> {
    let mut collector = Collector::new(args.include_denied);
    let window = FlowFilter {
        since: super::events::time_arg(args.since.as_deref(), "since")?,
        until: super::events::time_arg(args.until.as_deref(), "until")?,
        ..FlowFilter::default()
    };
    let mut inventory = if args.from_files.is_empty() {
        read_agent_events(
            socket,
            args.last.unwrap_or(ALL_EVENTS),
            &window,
            &mut collector,
        )?;
        Some(agent_inventory(socket)?)
    } else {
        for file in &args.from_files {
            read_event_file(file, &window, &mut collector)?;
        }
        None
    };
    if !args.inventories.is_empty() {
        inventory = Some(file_inventory(&args.inventories)?);
    }
    let observation: Observation = collector.finish();
    let output = suggest(&observation, args.namespace.as_deref(), inventory.as_ref())?;
    match args.output {
        SuggestFormat::Yaml => {
            eprint!("{}", output.report.text(output.policies.len()));
            print!("{}", output.yaml);
        }
        SuggestFormat::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "policies": output.policies,
                    "report": output.report,
                }))?
            );
        }
    }
    Ok(())
}

/// Streams the flows of the agent's history within `window` into `collector`.
fn read_agent_events(
    socket: &Path,
    last: usize,
    window: &FlowFilter,
    collector: &mut Collector,
) -> anyhow::Result<()> {
    let request = Request::Flows {
        last,
        follow: false,
        filter: window.clone(),
    };
    let mut client = Client::connect(socket)?;
    let mut failure = None;
    client.stream(&request, |event| match collector.add(&event) {
        Ok(()) => true,
        Err(reason) => {
            failure = Some(format!(
                "the agent sent an event this version cannot read: {reason}: {event}"
            ));
            false
        }
    })?;
    match failure {
        Some(failure) => anyhow::bail!(failure),
        None => Ok(()),
    }
}

/// Reads a file of JSON lines into `collector`; an error names the file and line.
fn read_event_file(
    file: &Path,
    window: &FlowFilter,
    collector: &mut Collector,
) -> anyhow::Result<()> {
    let reader = BufReader::new(
        std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?,
    );
    for (index, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", file.display(), index + 1))?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: line {}: not a JSON flow event (expected the JSON lines of `microseg events -o json`)",
                file.display(),
                index + 1
            )
        })?;
        // The end marker of a saved `events` stream.
        if value.get("end_of_stream").is_some() {
            continue;
        }
        // `hubble observe -o json` wraps each flow.
        if !window.matches(value.get("flow").unwrap_or(&value)) {
            continue;
        }
        collector.add(&value).map_err(|reason| {
            anyhow::anyhow!("{}: line {}: {reason}", file.display(), index + 1)
        })?;
    }
    Ok(())
}

/// The workloads and namespaces in inventory files (their policies, if any, are not
/// used: the report is about the suggested ones).
fn file_inventory(paths: &[PathBuf]) -> anyhow::Result<Inventory> {
    let set = super::check::load_set(paths)?;
    let mut inventory = Inventory::default();
    for namespace in set.namespaces.values() {
        inventory.namespaces.insert(
            namespace.name.clone(),
            namespace
                .labels
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        );
    }
    for workload in &set.workloads {
        inventory.pods.push(InventoryPod {
            namespace: workload.namespace.clone(),
            name: workload.name.clone(),
            labels: workload
                .labels
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            addresses: workload.addresses.clone(),
        });
    }
    Ok(inventory)
}

/// The agent's workloads and namespaces (`get workloads`, `get namespaces`).
fn agent_inventory(socket: &Path) -> anyhow::Result<Inventory> {
    let mut client = Client::connect(socket)?;
    let workloads = client.call(&Request::Get {
        kind: ObjectKind::Workloads,
    })?;
    let namespaces = client.call(&Request::Get {
        kind: ObjectKind::Namespaces,
    })?;
    let labels = |value: &Value| -> BTreeMap<String, String> {
        value
            .as_object()
            .map(|map| {
                map.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut inventory = Inventory::default();
    for namespace in namespaces.as_array().map(Vec::as_slice).unwrap_or_default() {
        if let Some(name) = namespace["name"].as_str() {
            inventory
                .namespaces
                .insert(name.to_owned(), labels(&namespace["labels"]));
        }
    }
    for workload in workloads.as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(namespace), Some(name)) =
            (workload["namespace"].as_str(), workload["name"].as_str())
        else {
            continue;
        };
        inventory.pods.push(InventoryPod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            labels: labels(&workload["labels"]),
            addresses: workload["addresses"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(|a| a.as_str()?.parse::<IpAddr>().ok())
                .collect(),
        });
    }
    Ok(inventory)
}

#[cfg(test)]
mod tests {
    use super::read_event_file;
    use crate::flow_filter::FlowFilter;
    use crate::suggest::Collector;

    /// A file in a fresh temporary directory, removed with it.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("microseg-suggest-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    const EVENT: &str = r#"{"time":"2026-11-30T06:00:00Z","verdict":"AUDIT","IP":{"source":"10.0.0.1","destination":"10.0.0.2"},"source":{"namespace":"a","pod_name":"x","labels":["k8s:app=x"]},"destination":{"namespace":"a","pod_name":"y","labels":["k8s:app=y"]},"l4":{"TCP":{"source_port":40000,"destination_port":80,"flags":{"SYN":true}}}}"#;

    #[test]
    fn event_files_are_json_lines_and_errors_name_the_file_and_line() {
        let good = TempFile::new(
            "good.jsonl",
            &format!("{EVENT}\n\n{{\"end_of_stream\":true}}\n"),
        );
        let mut collector = Collector::new(false);
        read_event_file(&good.0, &FlowFilter::default(), &mut collector).expect("reads");
        assert_eq!(collector.finish().connections.len(), 1);

        let bad = TempFile::new("bad.jsonl", &format!("{EVENT}\nnot json\n"));
        let error = read_event_file(&bad.0, &FlowFilter::default(), &mut Collector::new(false))
            .unwrap_err();
        let text = format!("{error:#}");
        assert!(
            text.contains("bad.jsonl: line 2: not a JSON flow event"),
            "{text}"
        );

        let other = TempFile::new("pods.jsonl", "{\"kind\":\"Pod\"}\n");
        let error = read_event_file(&other.0, &FlowFilter::default(), &mut Collector::new(false))
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("pods.jsonl: line 1: not a flow event: no \"verdict\" field"),
            "{error}"
        );

        let missing = good.0.with_file_name("missing.jsonl");
        let error = read_event_file(&missing, &FlowFilter::default(), &mut Collector::new(false))
            .unwrap_err();
        assert!(error.to_string().contains("cannot read"), "{error}");
    }
}
