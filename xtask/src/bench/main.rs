//! `microseg-bench`: the benchmark behind `cargo xtask bench [--quick]`.
//!
//! 1. floor: a trivial program through BPF_PROG_TEST_RUN (`floor`);
//! 2. per-packet cost of the real XDP and TC programs at 100 .. 1,000,000 rules, hot
//!    and spread, with agent and BPF map memory at each scale (`datapath_cost`,
//!    `memory`), and the hot cost with ClusterNetworkPolicy tiers in use beside the
//!    cost without: three policy sets loaded side by side and measured in interleaved
//!    rounds (`tiers`; part of `datapath`, or `--only tiers`);
//! 3. control plane: apply, one-policy update, restart (`control_plane`);
//! 4. deny events under a flood (`events`);
//! 5. real traffic between two namespaces for microseg XDP and TC, iptables (a rule
//!    chain, and an ipset), nftables (a set at the input hook, and at the netdev
//!    ingress hook) and no filter, every engine 5 times interleaved, reported as
//!    medians with min and max (`traffic`, `netns`);
//!
//! then report.json, report.md and PNG plots under target/microseg-bench/ (`report`,
//! `plot`). `--quick` runs smaller scales, fewer repeats and short windows (under two
//! minutes). Timings are reported, never asserted: the run fails only if something is
//! broken (a program does not load, a verdict is wrong, a tool is missing).

mod control_plane;
mod datapath_cost;
mod events;
mod floor;
mod machine;
mod memory;
mod netns;
mod plot;
mod progress;
mod report;
mod scenario;
mod tiers;
mod traffic;

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use clap::Parser;

use crate::{
    datapath_cost::{CostConfig, Floors},
    progress::Progress,
    report::{FloorFigures, Report},
    scenario::Family,
    tiers::TiersConfig,
    traffic::TrafficConfig,
};

#[derive(Parser)]
#[command(about = "microseg's benchmark (run it with `cargo xtask bench`)")]
struct Cli {
    /// Smaller scales, fewer repeats, short traffic windows: under two minutes.
    #[arg(long)]
    quick: bool,
    /// Run only these parts (comma separated: datapath, tiers, control, events,
    /// traffic). `datapath` includes `tiers`. `compile` alone compiles the datapath
    /// scales and prints time and memory, without the kernel (for profiling).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write the report (default: target/microseg-bench of the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
}

struct Plan {
    cost: CostConfig,
    tiers: TiersConfig,
    floor_repeat: u32,
    floor_calls: usize,
    traffic: TrafficConfig,
    control_policies: u32,
    events_window: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                cost: CostConfig {
                    scales: vec![100, 10_000],
                    hot_repeat: 200_000,
                    new_flows: 5_000,
                    spread_samples: 10_000,
                },
                tiers: TiersConfig {
                    scales: vec![100, 10_000],
                    families: vec![Family::V4],
                    rounds: 3,
                    hot_repeat: 100_000,
                    new_flows: 1_000,
                    many_priorities: 100,
                },
                floor_repeat: 1_000_000,
                floor_calls: 10_000,
                traffic: TrafficConfig {
                    scales: vec![100, 10_000],
                    window: Duration::from_secs(1),
                    warmup: Duration::from_millis(300),
                    rounds: 1,
                },
                control_policies: 10_000,
                events_window: Duration::from_millis(500),
            }
        } else {
            Self {
                cost: CostConfig {
                    scales: vec![100, 10_000, 100_000, 1_000_000],
                    hot_repeat: 2_000_000,
                    new_flows: 50_000,
                    spread_samples: 200_000,
                },
                tiers: TiersConfig {
                    scales: vec![100, 10_000],
                    families: Family::ALL.to_vec(),
                    rounds: 5,
                    hot_repeat: 1_000_000,
                    new_flows: 20_000,
                    many_priorities: 100,
                },
                floor_repeat: 10_000_000,
                floor_calls: 100_000,
                traffic: TrafficConfig {
                    scales: vec![100, 10_000, 100_000],
                    window: Duration::from_secs(2),
                    warmup: Duration::from_millis(500),
                    rounds: 5,
                },
                control_policies: 10_000,
                events_window: Duration::from_secs(3),
            }
        }
    }
}

fn output_dir(cli: &Cli) -> PathBuf {
    cli.out.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map_or_else(|| PathBuf::from("target"), |root| root.join("target"))
            .join("microseg-bench")
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let wants = |part: &str| cli.only.is_empty() || cli.only.iter().any(|only| only == part);
    let plan = Plan::new(cli.quick);
    if cli.only == ["compile"] {
        return datapath_cost::compile_only(&plan.cost);
    }
    machine::check_tools()?;
    let mut machine = machine::describe();
    let (rss_start, _) = memory::rss_kib();
    let progress = Progress::new();
    progress.line(format!(
        "microseg benchmark ({}): {}, {} cores, kernel {}, load {:.2}",
        if cli.quick { "quick" } else { "full" },
        machine.cpu_model,
        machine.cores,
        machine.kernel,
        machine.load_average_start
    ));

    progress.step("floor: trivial programs");
    let floors = Floors {
        xdp: floor::harness_floor(floor::Kind::Xdp, plan.floor_repeat, plan.floor_calls, 3)?,
        tc: floor::harness_floor(floor::Kind::Tc, plan.floor_repeat, plan.floor_calls, 3)?,
    };
    progress.line(format!(
        "floor: trivial XDP {:.1} ns/run (repeat {}), {:.1} ns per call; trivial TC {:.1} / {:.1} ns",
        floors.xdp.hot_ns,
        plan.floor_repeat,
        floors.xdp.per_call_ns,
        floors.tc.hot_ns,
        floors.tc.per_call_ns
    ));

    let cost = if wants("datapath") {
        progress.line("per-packet cost (BPF_PROG_TEST_RUN):");
        datapath_cost::run(&plan.cost, &floors, rss_start, &progress)
            .context("measuring the per-packet cost")?
    } else {
        datapath_cost::CostResults::default()
    };

    let tiers = if wants("datapath") || wants("tiers") {
        progress.line(format!(
            "per-packet cost with ClusterNetworkPolicy tiers ({} interleaved rounds):",
            plan.tiers.rounds
        ));
        tiers::run(&plan.tiers, &floors, &progress)
            .context("measuring the per-packet cost with tiers")?
    } else {
        tiers::TiersResults::default()
    };

    let control_plane = if wants("control") {
        let control = control_plane::run(plan.control_policies, &progress)
            .context("measuring the control plane")?;
        progress.line(format!(
            "control plane: compile {:.0} ms, apply {:.0} ms, update enforced in {:.2} ms, restart ready in {:.0} ms",
            control.compile_10k_ms,
            control.apply_10k_ms,
            control.update_to_enforced_ms,
            control.restart_ready_ms
        ));
        Some(control)
    } else {
        None
    };

    let events = if wants("events") {
        progress.step("events: flooding denied packets");
        let events = events::run(plan.events_window).context("measuring deny events")?;
        progress.line(format!(
            "events: flood of {:.0} denied/s: {:.0} delivered/s, {} lost (shipped settings); flood of {:.0}/s: {:.0} delivered/s, {} lost (rate limit off)",
            events.default_settings.denied_per_s,
            events.delivered_per_s,
            events.lost,
            events.unlimited.denied_per_s,
            events.unlimited.delivered_per_s,
            events.unlimited.lost
        ));
        Some(events)
    } else {
        None
    };

    let traffic = if wants("traffic") {
        progress.line("real traffic over veth:");
        traffic::run(&plan.traffic, &progress).context("measuring real traffic")?
    } else {
        Vec::new()
    };
    let counter_disagreements: Vec<String> = traffic
        .iter()
        .flat_map(traffic::TrafficRow::counter_disagreements)
        .collect();
    if !traffic.is_empty() {
        let compared: usize = traffic.iter().map(|row| row.counter_windows_compared).sum();
        progress.line(format!(
            "drop counters: {compared} windows compared with processed - delivered, {} disagreeing",
            counter_disagreements.len()
        ));
        for disagreement in &counter_disagreements {
            progress.line(format!("  flagged: {disagreement}"));
        }
    }

    machine.load_average_end = machine::load_average();
    let targets = report::targets(&cost.rows, &traffic, control_plane.as_ref());
    let mut report = Report {
        mode: if cli.quick { "quick" } else { "full" },
        generated_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs()),
        duration_s: progress.elapsed().as_secs_f64(),
        machine,
        floor_ns: floors.xdp.hot_ns,
        floors: FloorFigures::new(&floors, plan.floor_repeat),
        datapath: cost.rows,
        event_path: cost.event_path,
        datapath_setup: cost.setups,
        memory_floor: cost.memory_floor,
        memory: cost.memory,
        tiers,
        packet_source: report::PACKET_SOURCE.to_owned(),
        traffic,
        control_plane,
        events,
        targets,
        issue_11: Vec::new(),
        methods: report::methods(),
        notes: notes(cli.quick),
    };
    report
        .notes
        .extend(counter_disagreements.iter().map(|disagreement| {
            format!("Drop counter disagrees with processed - delivered: {disagreement}.")
        }));
    report.issue_11 = report::issue_11(&report);
    let dir = output_dir(&cli);
    progress.step("writing the report and plots");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let plots = plot::write(&dir, &report.datapath, &report.traffic)?;
    report::write(&dir, &report, &plots)?;
    progress.finish();
    println!("\n{}", report::tables(&report));
    println!("Report: {}", dir.join("report.md").display());
    Ok(())
}

fn notes(quick: bool) -> Vec<String> {
    let mut notes = vec![
        "new_allow cannot be measured with BPF_PROG_TEST_RUN's repeat: the first run records the flow in conntrack and every later run is `established`. Its hot figure is therefore a mean over distinct flows of one client, repeat = 1 each, minus the per-call harness floor; the spread figure uses distinct clients.".to_owned(),
        "Deny events: BPF_PROG_TEST_RUN runs packets far faster than the shipped rate limit (100,000 events/s per CPU, burst 10,000), so in the hot deny figure almost every packet takes the rate-limited branch and writes no event; the share that did is in the events columns. The event path has its own table (event_path): `off` is deny events turned off in the kernel (the agent's `denyEvents: false`), so shipped - off is the whole event path's cost; `minimal` (1 event/s, burst 1) still pays the clock read, the token bucket and a counter per packet.".to_owned(),
        "Allowed traffic (pps_delivered) is mostly conntrack hits: each source sends one flow repeatedly, so after its first packet it is established.".to_owned(),
        "Denied traffic in the traffic test comes from addresses outside the inventory (identity `world`); the datapath `deny` case uses clients of the rule set to a closed port, which costs the full lookup path.".to_owned(),
        "The benchmark adds one NetworkPolicy over N workloads for the data path scales; policy map entries grow as endpoints x peer identities, so N rules here is N policy entries and N+1 exact-address identities.".to_owned(),
        "Tiers (issue 12): the three sets hold the same workloads and the same flows, so each row compares one packet under the NetworkPolicy alone and with ClusterNetworkPolicies in use. Where the verdict differs between the columns (admin_deny, admin_accept, baseline_deny), so does the work: baseline_deny without tiers is a packet no policy selects (two endpoint lookups, then pass), with tiers a denied one (identity, policy lookups, drop and the deny event's rate limiter). The many-priorities set adds policies that none of the measured packets matches; its column against the tiers column is what the number of priorities costs.".to_owned(),
    ];
    if quick {
        notes.push("Quick run: scales 100 and 10,000, fewer repeats, one traffic round of 1 s windows (full runs: 5 interleaved rounds of 2 s windows), tiers IPv4 only in 3 rounds (full runs: both families, 5 rounds); a smoke test of the harness, not figures to quote. Traffic targets are n/a with fewer than 5 rounds.".to_owned());
    }
    notes
}
