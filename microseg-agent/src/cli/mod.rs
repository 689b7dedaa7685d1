//! The `microseg` command line: the agent daemon and kubectl-like client commands.
//! Errors are one sentence on stderr and a non-zero exit code.

mod check;
mod diff;
mod events;
mod graph;
mod progress;
mod resources;
mod review_input;
mod rule_hits;
mod suggest;
mod table;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    agent::config::{AgentConfig, InterfaceConfig},
    api::{ObjectKind, Request, SourceText, client::Client},
    policy::Protocol,
};

#[derive(Parser)]
#[command(
    name = "microseg",
    version,
    about = "Workload allow-lists enforced in the Linux kernel (XDP/TC + eBPF maps)"
)]
struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, default_value = crate::api::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: enforce policies on interfaces, serve the API and metrics.
    Agent(AgentArgs),
    /// Apply policies, workloads and namespaces from files or directories.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Descend into directories (directories are always read recursively; kept
        /// for kubectl habits).
        #[arg(short = 'R', long)]
        recursive: bool,
    },
    /// Delete the objects in files (`-f`) or one object (`delete policy NAME -n NS`).
    Delete {
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// policy | workload | pod | namespace | clusternetworkpolicy (cnp) | node
        kind: Option<String>,
        name: Option<String>,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// List policies, cluster policies, workloads, namespaces, nodes, identities or
    /// endpoints.
    Get {
        kind: KindArg,
        /// Only this object.
        name: Option<String>,
        #[arg(short, long)]
        namespace: Option<String>,
        /// All namespaces (the default).
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Show one object in detail.
    Describe {
        kind: KindArg,
        /// NAME, or NAMESPACE/NAME
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Show deny and audit events (`--follow` to stream).
    Events(events::EventsArgs),
    /// Connections and packets per policy rule and default deny; `--unused-since`
    /// lists the rules nothing used (the compliance audit).
    RuleHits(rule_hits::RuleHitsArgs),
    /// Packet counters, drops by reason and map usage.
    Stats {
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// The agent's state: generation, interfaces, policies, last apply.
    Status {
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Switch audit mode of a workload: would-be denies pass and are reported.
    Audit {
        state: OnOff,
        /// NAMESPACE/NAME
        workload: String,
    },
    /// Would this traffic be allowed? Answered from policy files, before applying.
    Check(CheckArgs),
    /// What a policy change would deny or allow: observed flows, reachability,
    /// policies. Exit status 0 no change in what is allowed, 1 changes, 2 error.
    Diff(diff::DiffArgs),
    /// The reachability between workloads or namespaces as DOT, SVG or HTML.
    Graph(graph::GraphArgs),
    /// Compile policy files and print the map entry counts (`--stats`).
    Compile {
        #[arg(long = "policy", required = true)]
        policies: Vec<PathBuf>,
        #[arg(long = "inventory")]
        inventories: Vec<PathBuf>,
        /// Print entry counts per map (the default and only output).
        #[arg(long)]
        stats: bool,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// NetworkPolicies that allow the observed traffic (from the agent's recent
    /// events or event files), checked and reported on.
    Suggest(suggest::SuggestArgs),
    /// Remove microseg from every interface and delete its pinned maps.
    Detach {
        #[arg(long, default_value = microseg_common::maps::PIN_ROOT)]
        pin_dir: PathBuf,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// YAML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Interface to enforce on: NAME or NAME:MODE (xdp, xdp-driver, xdp-generic, tc).
    #[arg(long = "interface", short = 'i')]
    interfaces: Vec<String>,
    /// Directory or file of policies and inventory to watch.
    #[arg(long = "policy-dir")]
    policy_dirs: Vec<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Prometheus metrics address (ip:port); "" disables it.
    #[arg(long)]
    metrics_address: Option<String>,
    /// Start every enforced workload in audit mode.
    #[arg(long)]
    audit: bool,
    /// Also write events as JSON lines to this file (rotated by size).
    #[arg(long)]
    event_log: Option<PathBuf>,
    /// Rotate the event log when it would pass this many bytes.
    #[arg(long)]
    event_log_max_bytes: Option<u64>,
    /// Rotated event log files kept (FILE.1 ... FILE.N).
    #[arg(long)]
    event_log_files: Option<u32>,
    /// In-kernel event rate limit per CPU.
    #[arg(long)]
    events_per_second: Option<u32>,
    /// Also report allowed flows (FORWARDED), once per new flow: the flow history
    /// then holds what ran, for `suggest`, `diff` and `graph`.
    #[arg(long)]
    trace_allowed: bool,
    /// Flows kept in memory for `microseg events` and the Hubble API.
    #[arg(long)]
    flow_history: Option<usize>,
    /// Detach and delete pinned state when the agent exits (default: enforcement
    /// stays).
    #[arg(long)]
    detach_on_exit: bool,
    /// Kubernetes mode: watch Namespaces, Pods and NetworkPolicies from the API
    /// server and enforce for this node's pods.
    #[arg(long)]
    kubernetes: bool,
    /// Kubeconfig for Kubernetes mode (default: in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name (default: $NODE_NAME, then the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Kubernetes mode: pod sandbox namespaces' names start with this (repeatable;
    /// replaces `kubernetes.podSandboxPrefixes`, default `cni-`).
    #[arg(long = "pod-sandbox-prefix")]
    pod_sandbox_prefixes: Vec<String>,
    /// Unix socket of Hubble's Observer API (default: hubble.sock next to --socket);
    /// "" turns it off.
    #[arg(long)]
    hubble_socket: Option<PathBuf>,
    /// Also serve Hubble's Observer API on this loopback ip:port (e.g.
    /// 127.0.0.1:4245); "" (the default) turns it off.
    #[arg(long)]
    hubble_listen_address: Option<String>,
}

#[derive(Args)]
struct CheckArgs {
    #[arg(long = "policy", required = true)]
    policies: Vec<PathBuf>,
    #[arg(long = "inventory")]
    inventories: Vec<PathBuf>,
    /// Source: NAMESPACE/NAME of a workload, or an IP address.
    #[arg(long)]
    from: Option<String>,
    /// Destination: NAMESPACE/NAME of a workload, or an IP address.
    #[arg(long)]
    to: Option<String>,
    #[arg(long, default_value_t = 80)]
    port: u16,
    #[arg(long, default_value = "tcp", value_parser = check::parse_protocol)]
    protocol: Protocol,
    /// The reachability matrix over all workloads.
    #[arg(long)]
    matrix: bool,
    /// Answer with the real eBPF programs over the compiled maps (needs root).
    #[arg(long)]
    datapath: bool,
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KindArg {
    #[value(alias = "policy", alias = "networkpolicies", alias = "netpol")]
    Policies,
    #[value(alias = "workload", alias = "pods", alias = "pod")]
    Workloads,
    #[value(alias = "namespace", alias = "ns")]
    Namespaces,
    #[value(alias = "identity")]
    Identities,
    #[value(alias = "endpoint", alias = "ep")]
    Endpoints,
    #[value(
        name = "clusternetworkpolicies",
        alias = "clusternetworkpolicy",
        alias = "cnp"
    )]
    ClusterPolicies,
    #[value(alias = "node")]
    Nodes,
}

impl KindArg {
    fn object_kind(self) -> ObjectKind {
        match self {
            Self::Policies => ObjectKind::Policies,
            Self::Workloads => ObjectKind::Workloads,
            Self::Namespaces => ObjectKind::Namespaces,
            Self::Identities => ObjectKind::Identities,
            Self::Endpoints => ObjectKind::Endpoints,
            Self::ClusterPolicies => ObjectKind::ClusterPolicies,
            Self::Nodes => ObjectKind::Nodes,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    Table,
    Wide,
    Json,
    Yaml,
    Name,
    Compact,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// Checks a command line (program name first) as the binary would parse it, without
/// running it: the documentation's test checks every command it shows.
pub fn check_command_line<I, T>(args: I) -> Result<(), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(args).map(drop)
}

/// Entry point of the `microseg` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent(args) => {
            run_agent(args, &cli.socket)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply { files, .. } => {
            let sources = read_sources(&files)?;
            let waiting = progress::spinner(format!("applying {} files", sources.len()));
            let data = Client::connect(&cli.socket)?.call(&Request::Apply { sources });
            waiting.finish_and_clear();
            let data = data?;
            print_objects(&data);
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete {
            files,
            kind,
            name,
            namespace,
        } => {
            let request = if !files.is_empty() {
                Request::DeleteSources {
                    sources: read_sources(&files)?,
                }
            } else {
                let (Some(kind), Some(name)) = (kind, name) else {
                    anyhow::bail!("give -f FILE, or a kind and a name (delete policy NAME -n NS)");
                };
                Request::DeleteObject {
                    kind,
                    namespace,
                    name,
                }
            };
            let data = Client::connect(&cli.socket)?.call(&request)?;
            print_objects(&data);
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
        } => {
            let data = Client::connect(&cli.socket)?.call(&Request::Get {
                kind: kind.object_kind(),
            })?;
            let namespace = if all_namespaces { None } else { namespace };
            resources::print_list(
                kind.object_kind(),
                &data,
                name.as_deref(),
                namespace.as_deref(),
                output,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe {
            kind,
            name,
            namespace,
        } => {
            let (namespace, name) = match name.split_once('/') {
                Some((ns, n)) => (ns.to_owned(), n.to_owned()),
                None => (namespace, name),
            };
            let data = Client::connect(&cli.socket)?.call(&Request::Describe {
                kind: kind.object_kind(),
                namespace,
                name,
            })?;
            resources::print_describe(&data);
            Ok(ExitCode::SUCCESS)
        }
        Command::Events(args) => {
            events::run(&cli.socket, &args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::RuleHits(args) => {
            rule_hits::run(&cli.socket, &args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { output } => {
            let data = Client::connect(&cli.socket)?.call(&Request::Stats)?;
            resources::print_stats(&data, output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { output } => {
            let data = Client::connect(&cli.socket)?.call(&Request::Status)?;
            resources::print_status(&data, output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { state, workload } => {
            let (namespace, name) = workload
                .split_once('/')
                .context("give the workload as NAMESPACE/NAME")?;
            let data = Client::connect(&cli.socket)?.call(&Request::Audit {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                enabled: state == OnOff::On,
            })?;
            print_objects(&data);
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => {
            let mut paths = args.policies.clone();
            paths.extend(args.inventories.iter().cloned());
            let allowed = check::check(&check::CheckArgs {
                paths,
                from: args.from,
                to: args.to,
                port: args.port,
                protocol: args.protocol,
                matrix: args.matrix,
                datapath: args.datapath,
                json: args.output == OutputFormat::Json,
            })?;
            // Like `test`: a single check exits 0 when allowed, 2 when denied; a
            // matrix always exits 0.
            Ok(if allowed || args.matrix {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Diff(args) => Ok(diff::run(&cli.socket, &args)),
        Command::Graph(args) => {
            graph::run(&cli.socket, &args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Compile {
            policies,
            inventories,
            output,
            ..
        } => {
            let mut paths = policies;
            paths.extend(inventories);
            check::compile_stats(&paths, output == OutputFormat::Json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Suggest(args) => {
            suggest::run(&cli.socket, &args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Detach { pin_dir } => {
            let detached = crate::datapath::detach_pinned(&pin_dir)?;
            println!(
                "detached {detached} links and removed the pinned maps under {}",
                pin_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_agent(args: AgentArgs, socket: &std::path::Path) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => AgentConfig::from_file(path)?,
        None => AgentConfig::default(),
    };
    // The global --socket flag, when given, wins over the configuration file.
    if socket != std::path::Path::new(crate::api::DEFAULT_SOCKET) {
        config.socket = socket.to_owned();
    }
    for interface in &args.interfaces {
        config.interfaces.push(InterfaceConfig::parse(interface)?);
    }
    config.policy_dirs.extend(args.policy_dirs);
    if let Some(dir) = args.state_dir {
        config.state_dir = dir;
    }
    if let Some(dir) = args.pin_dir {
        config.pin_dir = dir;
    }
    if let Some(address) = args.metrics_address {
        config.metrics_address = address;
    }
    if let Some(rate) = args.events_per_second {
        config.events_per_second = rate;
    }
    if args.event_log.is_some() {
        config.event_log = args.event_log;
    }
    if let Some(bytes) = args.event_log_max_bytes {
        config.event_log_max_bytes = bytes;
    }
    if let Some(files) = args.event_log_files {
        config.event_log_files = files;
    }
    config.audit_mode |= args.audit;
    config.trace_allowed |= args.trace_allowed;
    if let Some(flows) = args.flow_history {
        config.flow_history = flows;
    }
    config.kubernetes.enabled |= args.kubernetes;
    if args.kubeconfig.is_some() {
        config.kubernetes.kubeconfig = args.kubeconfig;
    }
    if !args.pod_sandbox_prefixes.is_empty() {
        config.kubernetes.pod_sandbox_prefixes = args.pod_sandbox_prefixes;
    }
    if args.hubble_socket.is_some() {
        config.hubble.socket = args.hubble_socket;
    }
    if let Some(address) = args.hubble_listen_address {
        config.hubble.listen_address = address;
    }
    if let Some(name) = args.node_name.or_else(|| std::env::var("NODE_NAME").ok()) {
        config.node_name = Some(name);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    one_malloc_arena();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(crate::agent::run(config, args.detach_on_exit))
}

/// Makes every thread allocate from glibc's main arena. By default each thread
/// that allocates gets an arena of its own, and memory freed in one is not reused
/// by another: the agent's resident set at 50,000 cluster pods was 460 MiB with
/// them, 335 MiB with one (`cargo xtask bench --cluster`). The agent's work is
/// serialised by its own lock, so the arenas bought no parallelism.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt takes no pointers and only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Reads files and directory trees (see `policy::policy_files`) into texts for the
/// agent.
fn read_sources(paths: &[PathBuf]) -> anyhow::Result<Vec<SourceText>> {
    let files = crate::policy::policy_files(paths).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{}", lines.join("\n"))
    })?;
    let mut sources = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        sources.push(SourceText {
            file: file.display().to_string(),
            text,
        });
    }
    Ok(sources)
}

fn print_objects(data: &serde_json::Value) {
    if let Some(objects) = data["objects"].as_array() {
        for object in objects {
            println!("{}", object.as_str().unwrap_or_default());
        }
    }
    if let Some(generation) = data["generation"].as_u64() {
        println!("policy generation {generation} enforced");
    }
}
