//! report.json (every figure, machine readable) and report.md (the same as tables,
//! with the method and the targets), both under target/microseg-bench/.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    control_plane::ControlPlane,
    datapath_cost::{CostRow, Floors},
    events::Events,
    machine::Machine,
    scenario::human,
    traffic::TrafficRow,
};

#[derive(Clone, Debug, Serialize)]
pub struct FloorFigures {
    pub xdp_hot_ns: f64,
    pub xdp_per_call_ns: f64,
    pub tc_hot_ns: f64,
    pub tc_per_call_ns: f64,
    pub repeat: u32,
}

impl FloorFigures {
    pub fn new(floors: &Floors, repeat: u32) -> Self {
        Self {
            xdp_hot_ns: floors.xdp.hot_ns,
            xdp_per_call_ns: floors.xdp.per_call_ns,
            tc_hot_ns: floors.tc.hot_ns,
            tc_per_call_ns: floors.tc.per_call_ns,
            repeat,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    /// None: not measured in this run (e.g. `--quick` skips 1M rules).
    pub met: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub generated_unix_s: u64,
    pub duration_s: f64,
    pub machine: Machine,
    /// The trivial XDP program (`r0 = XDP_PASS; exit`), hot, ns per run.
    pub floor_ns: f64,
    pub floors: FloorFigures,
    pub datapath: Vec<CostRow>,
    pub datapath_setup: Vec<crate::datapath_cost::ScaleSetup>,
    pub memory_floor: Vec<crate::datapath_cost::MemoryFloorRow>,
    pub memory: Vec<crate::memory::ScaleMemory>,
    pub packet_source: String,
    pub traffic: Vec<TrafficRow>,
    pub control_plane: Option<ControlPlane>,
    pub events: Option<Events>,
    pub targets: Vec<Target>,
    pub methods: BTreeMap<&'static str, &'static str>,
    pub notes: Vec<String>,
}

pub const PACKET_SOURCE: &str = "trafgen (netsniff-ng) in the sender namespace, pinned with `taskset -c 0 trafgen --cpus 1 --no-sock-mem --notouch-irq -S 256KiB` (a 256 KiB TX ring: with the default 512 KiB ring, frames held in the receiving veth's XDP ring exhaust the socket's send buffer and trafgen stops with EAGAIN), 60-byte IPv4 UDP frames to the receiver veth's MAC and UDP port 5001, source address drawn per packet with drnd() over the rule set's clients (allowed) or as many addresses outside it (denied)";

pub fn methods() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        (
            "floor",
            "a trivial program (r0 = XDP_PASS or TC_ACT_UNSPEC; exit) assembled from raw instructions and loaded with bpf(BPF_PROG_LOAD), run with BPF_PROG_TEST_RUN: hot = one call with `repeat` runs; per call = trimmed mean (slowest 1% left out) of the kernel-measured duration of calls with repeat = 1 (the harness the per-call figures subtract)",
        ),
        (
            "policy",
            "microseg::policy::compile of N client workloads (one address and unique labels each, so one identity each) and one NetworkPolicy letting them reach the server on UDP 5001: N peer_hosts entries and N policy entries (endpoint, identity, ingress, UDP, 5001)",
        ),
        (
            "cases",
            "deny = a client to a port no rule allows (identity found, both policy lookups miss, drop and deny event); established = a flow already in conntrack; new_allow = a flow not yet in conntrack, allowed by its entry and recorded",
        ),
        (
            "hot",
            "one packet: deny and established repeat one frame in one BPF_PROG_TEST_RUN call (median of 3); new_allow runs distinct flows of one client (source ports differ) with repeat = 1 each, minus the per-call harness floor, because a repeated flow hits conntrack from its second run",
        ),
        (
            "spread",
            "clients sampled without replacement over the whole rule set in random order (a rule set smaller than the sample is cycled through with other source ports, so every flow is distinct), one BPF_PROG_TEST_RUN call with repeat = 1 each, trimmed mean (slowest 1% left out) of the kernel-measured durations minus the per-call harness floor of the same program type; new_allow first (each flow new), established the same flows again reshuffled, deny the same sources to a closed port",
        ),
        (
            "memory_floor",
            "one lookup of bpf_get_prandom_u32() % N in a BPF hash map of N u32 keys (raw program, repeat runs), and the random draw alone",
        ),
        (
            "traffic",
            "processed = sender veth tx_packets; delivered = receiver UDP InDatagrams+NoPorts+InErrors (/proc/net/snmp of its namespace); dropped = processed - delivered, confirmed by the engine's counter (microseg denied counters, iptables DROP rule, nft counter); interface counters from /proc/net/dev of each namespace (the figures /sys/class/net/IF/statistics shows). pps_delivered comes from the allowed-source window, pps_dropped from the denied-source window",
        ),
        (
            "engines",
            "microseg-xdp: XDP in driver (native) mode on the receiver veth; microseg-tc: TC ingress (TCX); iptables: iptables-restore in the receiver namespace, one `-s <client>/32 -j ACCEPT` per client then `-j DROP` (Debian's iptables, nf_tables backend); nftables: one table, a set of allowed sources, `policy drop` with a counter; none: no filter",
        ),
        (
            "control_plane",
            "10,000 NetworkPolicies over 10,000 workloads (100 namespaces of 100), compiled and applied to empty maps; update = one policy gains a UDP port, recompiled, applied while a second instance of the programs on the same pinned maps polls the new flow on the other core; restart = fresh load of the pinned maps, adopt_state(), right verdicts",
        ),
        (
            "events",
            "one thread floods a denied packet through the TC ingress program (BPF_PROG_TEST_RUN, 1000 repeats per call; an XDP test run with repeat > 1 re-registers the program with the XDP dispatcher on every call, ~20 ms here, which would throttle the flood), another waits on the ring buffer fd with poll() as the agent's epoll does, then drains and decodes every event; lost = events_lost_rate_limit + events_lost_ring_full counter deltas over the window",
        ),
        (
            "memory",
            "agent RSS = VmRSS of this process after compiling and applying a scale (delta from the start of the run; the allocator keeps freed memory, so it also carries earlier scales' peaks); BPF map memory = memlock of every map microseg created, from /proc/self/fdinfo; policy maps = ENDPOINTS + PEER_HOSTS + PEER_PREFIXES + POLICY (both generation slots), sized to hold 2 x N + 64 entries; CONNTRACK is sized by the benchmark to 524,288 flows so no measurement evicts",
        ),
    ])
}

fn find<'a>(
    rows: &'a [CostRow],
    program: &str,
    family: &str,
    case: &str,
    rules: u32,
) -> Option<&'a CostRow> {
    rows.iter().find(|row| {
        row.program == program && row.family == family && row.case == case && row.rules == rules
    })
}

fn traffic_row<'a>(rows: &'a [TrafficRow], engine: &str, rules: u32) -> Option<&'a TrafficRow> {
    rows.iter()
        .find(|row| row.engine == engine && row.rules == rules)
}

pub fn targets(
    datapath: &[CostRow],
    traffic: &[TrafficRow],
    control: Option<&ControlPlane>,
) -> Vec<Target> {
    let mut targets = Vec::new();
    for program in ["xdp", "tc"] {
        for family in ["ipv4", "ipv6"] {
            let small = find(datapath, program, family, "deny", 100);
            let large = find(datapath, program, family, "deny", 1_000_000);
            let (measured, met) = match (small, large) {
                (Some(small), Some(large)) => {
                    let hot = large.ns_per_packet / small.ns_per_packet.max(1e-9);
                    let spread = large.spread_ns_per_packet / small.spread_ns_per_packet.max(1e-9);
                    (
                        format!(
                            "hot {:.1} -> {:.1} ns ({hot:.2}x); spread {:.1} -> {:.1} ns ({spread:.2}x)",
                            small.ns_per_packet,
                            large.ns_per_packet,
                            small.spread_ns_per_packet,
                            large.spread_ns_per_packet
                        ),
                        Some(hot <= 1.5 && spread <= 1.5),
                    )
                }
                _ => ("1,000,000 rules not measured in this run".to_owned(), None),
            };
            targets.push(Target {
                target: format!(
                    "{program} {family}: deny at 1,000,000 rules <= 1.5x deny at 100 rules (hot and spread)"
                ),
                measured,
                met,
            });
        }
    }
    let xdp = traffic_row(traffic, "microseg-xdp", 10_000);
    let iptables = traffic_row(traffic, "iptables", 10_000);
    let nft = traffic_row(traffic, "nftables", 10_000);
    let (measured, met) = match (xdp, iptables, nft) {
        (Some(xdp), Some(iptables), Some(nft)) => (
            format!(
                "microseg-xdp {:.0} pps, iptables {:.0} pps ({:.1}x), nftables {:.0} pps ({:.2}x)",
                xdp.pps_dropped,
                iptables.pps_dropped,
                xdp.pps_dropped / iptables.pps_dropped.max(1e-9),
                nft.pps_dropped,
                xdp.pps_dropped / nft.pps_dropped.max(1e-9),
            ),
            Some(
                xdp.pps_dropped >= 10.0 * iptables.pps_dropped
                    && xdp.pps_dropped >= nft.pps_dropped,
            ),
        ),
        _ => ("10,000-rule traffic not measured".to_owned(), None),
    };
    targets.push(Target {
        target: "at 10,000 rules microseg XDP drops >= 10x the pps of iptables and no fewer than nftables with a set".to_owned(),
        measured,
        met,
    });
    match control {
        Some(control) => {
            targets.push(Target {
                target: "apply of 10,000 policies < 2 s".to_owned(),
                measured: format!(
                    "apply {:.0} ms (compile {:.0} ms before it; together {:.0} ms)",
                    control.apply_10k_ms,
                    control.compile_10k_ms,
                    control.apply_10k_ms + control.compile_10k_ms
                ),
                met: Some(control.apply_10k_ms < 2000.0),
            });
            targets.push(Target {
                target: "one changed policy enforced within 50 ms".to_owned(),
                measured: format!(
                    "{:.2} ms from the start of apply to the first packet judged by it (recompiling the whole set before it: {:.0} ms)",
                    control.update_to_enforced_ms, control.update_compile_ms
                ),
                met: Some(control.update_to_enforced_ms < 50.0),
            });
        }
        None => targets.push(Target {
            target: "control-plane targets".to_owned(),
            measured: "not measured in this run".to_owned(),
            met: None,
        }),
    }
    targets
}

fn met(value: Option<bool>) -> &'static str {
    match value {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "n/a",
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1048576.0)
}

/// The report's tables as Markdown (also printed on stdout at the end of a run).
pub fn tables(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Floor: trivial XDP program {:.1} ns/run hot (repeat {}), {:.1} ns per call with repeat 1; trivial TC program {:.1} / {:.1} ns.\n",
        report.floors.xdp_hot_ns,
        report.floors.repeat,
        report.floors.xdp_per_call_ns,
        report.floors.tc_hot_ns,
        report.floors.tc_per_call_ns
    );
    if !report.datapath.is_empty() {
        md.push_str("### Per-packet cost (BPF_PROG_TEST_RUN), ns per packet\n\n");
        md.push_str(
            "| program | family | case | rules | hot | spread |\n|---|---|---|---:|---:|---:|\n",
        );
        for row in &report.datapath {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.1} | {:.1} |",
                row.program,
                row.family,
                row.case,
                human(u64::from(row.rules)),
                row.ns_per_packet,
                row.spread_ns_per_packet
            );
        }
        md.push('\n');
    }
    if !report.memory_floor.is_empty() {
        md.push_str("### Memory floor (one random hash lookup), ns per run\n\n| entries | random key only | + one hash lookup |\n|---:|---:|---:|\n");
        for row in &report.memory_floor {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.1} |",
                human(u64::from(row.entries)),
                row.random_key_ns,
                row.random_key_and_hash_lookup_ns
            );
        }
        md.push('\n');
    }
    if !report.traffic.is_empty() {
        md.push_str("### Real traffic over veth (packets/s)\n\n| engine | rules | delivered (allowed sources) | dropped (denied sources) | processed, allowed run | processed, denied run | engine's drop counter | ns/packet, denied run | rule set-up ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for row in &report.traffic {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} |",
                row.engine,
                human(u64::from(row.rules)),
                row.pps_delivered,
                row.pps_dropped,
                row.allowed.processed_pps,
                row.denied.processed_pps,
                row.denied
                    .engine_dropped_pps
                    .map_or_else(|| "-".to_owned(), |pps| format!("{pps:.0}")),
                row.denied.ns_per_packet,
                row.setup_ms
            );
        }
        md.push('\n');
    }
    if let Some(control) = &report.control_plane {
        let _ = writeln!(
            md,
            "### Control plane ({} policies over {} workloads)\n\n| figure | ms |\n|---|---:|\n| compile | {:.1} |\n| apply_10k_ms | {:.1} |\n| update: recompile | {:.1} |\n| update: apply call | {:.2} |\n| update_to_enforced_ms | {:.2} |\n| restart: load | {:.1} |\n| restart: adopt_state | {:.1} |\n| restart_ready_ms | {:.1} |\n",
            control.policies,
            control.workloads,
            control.compile_10k_ms,
            control.apply_10k_ms,
            control.update_compile_ms,
            control.update_apply_ms,
            control.update_to_enforced_ms,
            control.restart_load_ms,
            control.restart_adopt_ms,
            control.restart_ready_ms
        );
    }
    if let Some(events) = &report.events {
        md.push_str("### Deny events under a flood\n\n| settings | denied packets/s | events delivered/s | lost (rate limit) | lost (ring full) |\n|---|---:|---:|---:|---:|\n");
        for (name, flood) in [
            (
                "shipped (100k/s per CPU, burst 10k)",
                &events.default_settings,
            ),
            ("rate limit off", &events.unlimited),
        ] {
            let _ = writeln!(
                md,
                "| {name} | {:.0} | {:.0} | {} | {} |",
                flood.denied_per_s,
                flood.delivered_per_s,
                flood.lost_rate_limit,
                flood.lost_ring_full
            );
        }
        md.push('\n');
    }
    if !report.memory.is_empty() {
        md.push_str("### Memory\n\n| family | rules | compile ms | apply ms | agent RSS MiB | RSS growth MiB | policy maps MiB | all BPF maps MiB | largest maps (MiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for row in &report.memory {
            let setup = report
                .datapath_setup
                .iter()
                .find(|setup| setup.family == row.family && setup.rules == row.rules);
            let largest: Vec<String> = row
                .bpf_maps
                .iter()
                .take(4)
                .map(|map| format!("{} {}", map.name, mib(map.memlock_bytes)))
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {} | {} |",
                row.family,
                human(u64::from(row.rules)),
                setup.map_or(0.0, |setup| setup.compile_ms),
                setup.map_or(0.0, |setup| setup.apply_ms),
                row.agent_rss_kib as f64 / 1024.0,
                row.agent_rss_delta_kib as f64 / 1024.0,
                mib(row.policy_map_bytes),
                mib(row.bpf_map_bytes),
                largest.join(", ")
            );
        }
        md.push('\n');
    }
    md.push_str("### Targets (reported, not asserted)\n\n| target | measured | |\n|---|---|---|\n");
    for target in &report.targets {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            target.target,
            target.measured,
            met(target.met)
        );
    }
    md
}

pub fn markdown(report: &Report, plots: &[String]) -> String {
    let machine = &report.machine;
    let mut md = format!(
        "# microseg benchmark ({} run)\n\nMachine: {} ({} cores), kernel {}, {:.1} GiB; load average {:.2} at the start, {:.2} at the end (other work on the machine shows in the figures). Userspace build: {}. Took {:.0} s.\n\nTools: {}; {}; {}.\n\nPacket source: {}.\n\n",
        report.mode,
        machine.cpu_model,
        machine.cores,
        machine.kernel,
        machine.memory_total_kib as f64 / 1048576.0,
        machine.load_average_start,
        machine.load_average_end,
        machine.build_profile,
        report.duration_s,
        machine.trafgen,
        machine.iptables,
        machine.nft,
        report.packet_source
    );
    md.push_str(&tables(report));
    md.push_str("\n## Method\n\n");
    for (name, method) in &report.methods {
        let _ = writeln!(md, "- **{name}**: {method}.");
    }
    if !report.notes.is_empty() {
        md.push_str("\n## Notes\n\n");
        for note in &report.notes {
            let _ = writeln!(md, "- {note}");
        }
    }
    if !plots.is_empty() {
        md.push_str("\n## Plots\n\n");
        for plot in plots {
            let _ = writeln!(md, "![{plot}]({plot})");
        }
    }
    md
}

pub fn write(dir: &Path, report: &Report, plots: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(report)? + "\n",
    )?;
    std::fs::write(dir.join("report.md"), markdown(report, plots))?;
    Ok(())
}
