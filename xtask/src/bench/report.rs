//! report.json (every figure, machine readable) and report.md (the same as tables,
//! with the method and the targets), both under target/microseg-bench/.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    control_plane::ControlPlane,
    datapath_cost::{CostRow, EventCounts, EventPathRow, Floors},
    events::Events,
    machine::Machine,
    scenario::human,
    tiers::{TiersResults, Variant, ratio_text},
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
    /// The deny case's event path: shipped settings, events minimal, deny events off,
    /// every packet.
    pub event_path: Vec<EventPathRow>,
    pub datapath_setup: Vec<crate::datapath_cost::ScaleSetup>,
    pub memory_floor: Vec<crate::datapath_cost::MemoryFloorRow>,
    pub memory: Vec<crate::memory::ScaleMemory>,
    /// The hot per-packet cost with ClusterNetworkPolicy tiers beside the cost without
    /// (issue 12).
    pub tiers: TiersResults,
    pub packet_source: String,
    pub traffic: Vec<TrafficRow>,
    pub control_plane: Option<ControlPlane>,
    pub events: Option<Events>,
    pub targets: Vec<Target>,
    /// Issue 11's table: each measure, this run's value, the target against this
    /// run's floors, and whether it is met.
    pub issue_11: Vec<IssueRow>,
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
            "one packet: `hot` = deny and established repeat one frame in one BPF_PROG_TEST_RUN call (median of 3), whose harness floor is the trivial program with the same repeat (floors.xdp_hot_ns / tc_hot_ns); new_allow runs distinct flows of one client (source ports differ) with repeat = 1 each, because a repeated flow hits conntrack from its second run, and its floor is the per-call one (floors.*_per_call_ns). Every figure is reported with the floor (as measured) and without it (`hot.with_floor_ns`, `hot.without_floor_ns`); `ns_per_packet` keeps the earlier reports' mix (with the floor for deny and established, without it for new_allow). `hot_per_call` runs the same deny and established frame new_flows times with repeat = 1, the way spread is taken (trimmed mean, with and without the per-call floor), so that hot and spread compare on the same harness",
        ),
        (
            "spread",
            "clients sampled without replacement over the whole rule set in random order (a rule set smaller than the sample is cycled through with other source ports, so every flow is distinct), one BPF_PROG_TEST_RUN call with repeat = 1 each, trimmed mean (slowest 1% left out) of the kernel-measured durations, reported as measured (`spread.with_floor_ns`) and minus the per-call harness floor of the same program type (`spread.without_floor_ns` = `spread_ns_per_packet`); new_allow first (each flow new), established the same flows again reshuffled, deny the same sources to a closed port",
        ),
        (
            "event_path",
            "the deny case's events, from the data path's counters (EventsSent, EventsLostRateLimit, EventsLostRingFull deltas over each measurement; every datapath row carries them as hot_events and spread_events). The deny case is measured under four settings on the same loaded programs: shipped (100,000 events/s per CPU, burst 10,000: a repeated hot packet soon exhausts the bucket, so most of its packets take the rate-limited branch), minimal (1 event/s, burst 1: every packet still reads the coarse clock, the per-CPU bucket and bumps the lost counter, almost none writes an event), off (deny events turned off in the kernel, SETTINGS_FLAG_NO_DENY_EVENTS, the agent's denyEvents: false: no clock read, no bucket, no event, drops still counted), and every_packet (rate limit off, ring drained between calls of at most 10,000 runs, so every packet writes an event). The four spread figures run interleaved (the sources in 16 chunks, each chunk under each setting in turn, the first setting rotating) and the shipped one is the deny row's spread figure; the hot ones run one after the other (shipped, minimal, off, every_packet). event_write_*_ns = every_packet - minimal: the cost of writing one event; shipped_minus_minimal_*_ns: what the shipped settings cost above the minimum; shipped_minus_off_*_ns: what the event path costs a denied packet as shipped",
        ),
        (
            "tiers",
            "issue 12: three policy sets over the same workloads (the datapath scenario's server and N clients in namespace bench, a second server no NetworkPolicy selects, three quarantined namespaces, a monitoring pod, 100 tenant namespaces), compiled by microseg's compiler, loaded side by side (one data path each) and measured in interleaved rounds (each round starting one set further on): network_policy_only = the datapath scenario's NetworkPolicy; tiers = the same plus ClusterNetworkPolicies on every role=server pod: Admin 10 Deny from the quarantined namespaces, Admin 20 Accept monitoring on UDP 9100, Admin 900 Pass from namespace bench, Baseline Deny from every namespace; tiers_many_priorities = tiers plus 100 Admin policies at priorities 100-199 (Deny / Accept UDP 7000+i / Pass from one tenant namespace each), walked before the Pass in evaluation order. Flows: established and new_allow (client N/2 to UDP 5001: Admin Pass, then the NetworkPolicy allows), deny (client N/2 to UDP 5002: Admin Pass, then the NetworkPolicy's default deny), admin_deny (a quarantined pod), admin_accept (new flows from monitoring to UDP 9100), baseline_deny (client N/2 to the server no NetworkPolicy selects: Admin Pass, then Baseline Deny; without tiers nothing enforces it). Every flow's verdict and deciding tier are checked with microseg::policy::evaluate under each set, and the kernel's verdict at every run. Repeated flows run one frame `repeat` times in one call (floor: the trivial program with that repeat); new flows run distinct flows of one source, repeat 1 each, trimmed mean (floor: the trivial program per call). Each figure is the median over the rounds with [min..max]; ratios are of the medians, without the floor (as measured in brackets)",
        ),
        (
            "memory_floor",
            "one lookup of bpf_get_prandom_u32() % N in a BPF hash map of N u32 keys (raw program, repeat runs), and the random draw alone",
        ),
        (
            "traffic",
            "processed = sender veth tx_packets; delivered = receiver UDP InDatagrams+NoPorts+InErrors (/proc/net/snmp of its namespace); dropped = processed - delivered. In every window (allowed and denied sources) the engine's own drop counter (named under `engines`) is compared with processed - delivered, in packets, over the window's whole traffic run: read before trafgen starts and after it has stopped and the receiver's counters have settled, so both sides stand still at both reads (reading iptables' or nft's counter runs a program for tens of ms, more with many rules, while thousands of packets pass). The two should be equal: a window whose counts differ by more than 0.1% of its processed packets (at least 16 packets) has counter_check.agrees = false, is printed, counted in the row's counter_windows_disagreeing and listed in the notes; the run goes on, as it does for a timing. Each window also records processed_packets, delivered_packets, dropped_packets and the engine's count over the measured window alone (engine_dropped_packets, engine_dropped_pps; read just before each end's snapshot, so skewed by the read). `none` has no filter and no drop counter: nothing is compared, and its processed - delivered must stay under 5% (the verdict check). Interface counters from /proc/net/dev of each namespace (the figures /sys/class/net/IF/statistics shows). pps_delivered comes from the allowed-source window, pps_dropped from the denied-source window. Each engine runs `rounds` times per scale, interleaved (round-robin over the engines, each round starting one engine further on; installed, measured, removed each time); pps_delivered and pps_dropped are the medians over the rounds (mean of the middle two for an even count), with _min and _max beside them and every round under `runs`. Every ratio in this report uses the medians",
        ),
        (
            "engines",
            "microseg-xdp: XDP in driver (native) mode on the receiver veth; microseg-tc: TC ingress (TCX); iptables: iptables-restore in the receiver namespace, one `-s <client>/32 -j ACCEPT` per client then `-j DROP` (Debian's iptables, nf_tables backend); iptables-ipset: one ipset `hash:ip` holding the clients (ipset restore), then `-m set --match-set msbench-allowed src -j ACCEPT` and `-j DROP`; nftables: table ip, a set of allowed sources, an input-hook chain with `policy drop` and a counter; nftables-netdev: table netdev, the same set, a chain at the ingress hook of the receiver veth (priority -500, the earliest nftables can drop: before IP receive and conntrack) accepting the set's sources and counting and dropping the other IPv4 packets; none: no filter. Drop counters compared (traffic): microseg, the per-CPU counters DeniedIngress + DeniedEgress (every drop, whatever its reason, counts there); iptables and iptables-ipset, the packet count of the `-j DROP` rule (`iptables -w -nvxL INPUT N`, refused unless that rule is the DROP; the ipset itself keeps no counter, the rule after it does); nftables and nftables-netdev, the named counter `dropped` (`nft list counter`), the last rule before the policy drop (ip) or on the drop rule (netdev); none: no counter, nothing dropped by design",
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
                "medians: microseg-xdp {:.0} pps, iptables {:.0} pps ({:.1}x), nftables {:.0} pps ({:.2}x)",
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
                    "{:.2} ms from the start of the compile to the first packet judged by it",
                    control.update_to_enforced_ms
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

/// One line of issue 11's table.
#[derive(Clone, Debug, Serialize)]
pub struct IssueRow {
    pub measure: &'static str,
    /// The figure compared with the target (None: not measured in this run).
    pub value: Option<f64>,
    pub unit: &'static str,
    /// The measured figure and what it is made of.
    pub measured: String,
    /// The target as issue 11 words it, and the same against this run's floors.
    pub target: String,
    pub target_value: Option<f64>,
    pub met: Option<bool>,
}

/// Rounds the traffic target asks for.
const MIN_ROUNDS: usize = 5;

fn not_measured(measure: &'static str, unit: &'static str, target: &str, why: &str) -> IssueRow {
    IssueRow {
        measure,
        value: None,
        unit,
        measured: format!("not measured in this run ({why})"),
        target: target.to_owned(),
        target_value: None,
        met: None,
    }
}

/// One random hash lookup at `entries`: the memory floor minus the random draw.
fn lookup_ns(report: &Report, entries: u32) -> Option<f64> {
    report
        .memory_floor
        .iter()
        .find(|row| row.entries == entries)
        .map(|row| (row.random_key_and_hash_lookup_ns - row.random_key_ns).max(0.0))
}

/// Issue 11's table from this run's figures.
pub fn issue_11(report: &Report) -> Vec<IssueRow> {
    let mut rows = Vec::new();
    let floor = report.floors.xdp_hot_ns;
    // A hot lookup: the memory floor at its smallest map (it stays in cache).
    let hot_lookup = report
        .memory_floor
        .iter()
        .min_by_key(|row| row.entries)
        .map(|row| {
            (
                row.entries,
                (row.random_key_and_hash_lookup_ns - row.random_key_ns).max(0.0),
            )
        });
    for (measure, case, lookups) in [
        ("established, hot, XDP IPv4", "established", 2.0),
        ("deny, hot, XDP IPv4", "deny", 5.0),
        ("new_allow, hot, XDP IPv4", "new_allow", 6.0),
    ] {
        let wording = format!("<= floor + {lookups:.0} lookups");
        // The program's own cost on the hot floor: for a repeated packet this is the
        // figure as measured; for new_allow (per call) the per-call harness is
        // replaced by the hot one, so all three stand on the same floor. The worst
        // scale counts.
        let scales: Vec<&CostRow> = report
            .datapath
            .iter()
            .filter(|row| row.program == "xdp" && row.family == "ipv4" && row.case == case)
            .collect();
        let worst = scales
            .iter()
            .copied()
            .max_by(|a, b| a.hot.without_floor_ns.total_cmp(&b.hot.without_floor_ns));
        let (Some(row), Some((lookup_entries, lookup))) = (worst, hot_lookup) else {
            rows.push(not_measured(
                measure,
                "ns",
                &wording,
                "datapath part skipped",
            ));
            continue;
        };
        let value = row.hot.without_floor_ns + floor;
        let all: Vec<String> = scales
            .iter()
            .map(|row| {
                format!(
                    "{} {:.0}",
                    human(u64::from(row.rules)),
                    row.hot.without_floor_ns + floor
                )
            })
            .collect();
        let target = floor + lookups * lookup;
        rows.push(IssueRow {
            measure,
            value: Some(value),
            unit: "ns",
            measured: format!(
                "{value:.0} ns at {} rules, the worst scale (by scale: {}) = floor {floor:.0} + {:.0} ns of its own ({}; as measured {:.0} ns over a {:.0} ns harness floor)",
                human(u64::from(row.rules)),
                all.join(", "),
                row.hot.without_floor_ns,
                row.hot_method,
                row.hot.with_floor_ns,
                row.hot.floor_ns
            ),
            target: format!(
                "{wording}: {floor:.0} + {lookups:.0} x {lookup:.0} = {target:.0} ns (floor: trivial XDP program, repeat {}; lookup: one hot hash lookup, the memory floor at {} entries minus its random draw)",
                report.floors.repeat,
                human(u64::from(lookup_entries))
            ),
            target_value: Some(target),
            met: Some(value <= target),
        });
    }

    let measure = "deny, spread over 1M rules vs one cold lookup at 1M";
    let wording = "<= 3x one cold lookup at 1M";
    match (
        find(&report.datapath, "xdp", "ipv4", "deny", 1_000_000),
        lookup_ns(report, 1_000_000),
    ) {
        (Some(row), Some(cold)) => rows.push(IssueRow {
            measure,
            value: Some(row.spread.without_floor_ns),
            unit: "ns",
            measured: format!(
                "{:.0} ns (XDP IPv4, {} packets, per-call floor {:.0} ns subtracted; {:.0} ns as measured); one cold lookup at 1M {cold:.0} ns ({:.1}x)",
                row.spread.without_floor_ns,
                row.spread_packets,
                row.spread.floor_ns,
                row.spread.with_floor_ns,
                row.spread.without_floor_ns / cold.max(1e-9)
            ),
            target: format!(
                "{wording}: 3 x {cold:.0} = {:.0} ns (cold lookup: the memory floor at 1M entries minus its random draw)",
                3.0 * cold
            ),
            target_value: Some(3.0 * cold),
            met: Some(row.spread.without_floor_ns <= 3.0 * cold),
        }),
        _ => rows.push(not_measured(
            measure,
            "ns",
            wording,
            "1,000,000 rules are run in full mode only",
        )),
    }

    let at_10k = |engine: &str| traffic_row(&report.traffic, engine, 10_000);
    let rounds_note = |rounds: usize| {
        if rounds >= MIN_ROUNDS {
            format!("medians of {rounds} interleaved rounds")
        } else {
            format!("{rounds} round(s) only: the target needs medians of >= {MIN_ROUNDS}")
        }
    };
    let measure = "XDP drop pps at 10k rules vs nftables set";
    let wording = "ratio >= 1.0x, medians of >= 5 interleaved runs";
    match (at_10k("microseg-xdp"), at_10k("nftables")) {
        (Some(xdp), Some(nft)) => {
            let ratio = xdp.pps_dropped / nft.pps_dropped.max(1e-9);
            let rounds = xdp.rounds.min(nft.rounds);
            let others: Vec<String> = ["nftables-netdev", "iptables-ipset", "iptables"]
                .into_iter()
                .filter_map(|engine| {
                    at_10k(engine).map(|row| {
                        format!(
                            "{engine} {:.0} pps ({:.2}x)",
                            row.pps_dropped,
                            xdp.pps_dropped / row.pps_dropped.max(1e-9)
                        )
                    })
                })
                .collect();
            rows.push(IssueRow {
                measure,
                value: Some(ratio),
                unit: "x",
                measured: format!(
                    "{ratio:.2}x: microseg-xdp {:.0} pps [{:.0}..{:.0}] vs nftables {:.0} pps [{:.0}..{:.0}] ({}); beside them {}",
                    xdp.pps_dropped,
                    xdp.pps_dropped_min,
                    xdp.pps_dropped_max,
                    nft.pps_dropped,
                    nft.pps_dropped_min,
                    nft.pps_dropped_max,
                    rounds_note(rounds),
                    others.join(", ")
                ),
                target: wording.to_owned(),
                target_value: Some(1.0),
                met: (rounds >= MIN_ROUNDS).then_some(ratio >= 1.0),
            });
        }
        _ => rows.push(not_measured(measure, "x", wording, "traffic part skipped")),
    }
    for (measure, engine) in [
        (
            "allowed traffic delivered at 10k rules, XDP, vs nftables / vs no filter",
            "microseg-xdp",
        ),
        (
            "allowed traffic delivered at 10k rules, TC, vs nftables / vs no filter",
            "microseg-tc",
        ),
    ] {
        let wording = ">= 1.0x nftables; >= 0.95x no filter";
        let (Some(ours), Some(nft), Some(none)) =
            (at_10k(engine), at_10k("nftables"), at_10k("none"))
        else {
            rows.push(not_measured(measure, "x", wording, "traffic part skipped"));
            continue;
        };
        let vs_nft = ours.pps_delivered / nft.pps_delivered.max(1e-9);
        let vs_none = ours.pps_delivered / none.pps_delivered.max(1e-9);
        let rounds = ours.rounds.min(nft.rounds).min(none.rounds);
        rows.push(IssueRow {
            measure,
            value: Some(vs_nft),
            unit: "x",
            measured: format!(
                "{vs_nft:.2}x / {vs_none:.2}x ({engine} {:.0} vs nftables {:.0} vs none {:.0} pps; {})",
                ours.pps_delivered,
                nft.pps_delivered,
                none.pps_delivered,
                rounds_note(rounds)
            ),
            target: wording.to_owned(),
            target_value: Some(1.0),
            met: (rounds >= MIN_ROUNDS).then_some(vs_nft >= 1.0 && vs_none >= 0.95),
        });
    }

    let control = report.control_plane.as_ref();
    let measure = "full compile, 10k policies over 10k workloads";
    let wording = "<= 300 ms";
    match control {
        Some(control) => rows.push(IssueRow {
            measure,
            value: Some(control.compile_10k_ms),
            unit: "ms",
            measured: format!(
                "{:.0} ms ({} policies over {} workloads)",
                control.compile_10k_ms, control.policies, control.workloads
            ),
            target: wording.to_owned(),
            target_value: Some(300.0),
            met: Some(control.compile_10k_ms <= 300.0),
        }),
        None => rows.push(not_measured(measure, "ms", wording, "control part skipped")),
    }
    let measure = "one pod added or one policy changed at that scale, compile + apply";
    let wording = "<= 20 ms, writing only the entries that changed";
    match control.filter(|control| !control.changes.is_empty()) {
        Some(control) => {
            // The slowest change type decides; each writes only its own entries
            // (the control plane asserts the policy change writes exactly one).
            let slowest = control
                .changes
                .iter()
                .max_by(|a, b| (a.compile_ms + a.apply_ms).total_cmp(&(b.compile_ms + b.apply_ms)))
                .expect("changes measured");
            let value = slowest.compile_ms + slowest.apply_ms;
            let each: Vec<String> = control
                .changes
                .iter()
                .map(|change| {
                    format!(
                        "{} {:.1} + {:.1} ms, {} entries",
                        change.change, change.compile_ms, change.apply_ms, change.entries_written
                    )
                })
                .collect();
            rows.push(IssueRow {
                measure,
                value: Some(value),
                unit: "ms",
                measured: format!("{value:.1} ms at most ({})", each.join("; ")),
                target: wording.to_owned(),
                target_value: Some(20.0),
                met: Some(value <= 20.0),
            });
        }
        None => rows.push(not_measured(measure, "ms", wording, "control part skipped")),
    }
    let measure = "compile at 1M rules";
    let wording = "<= 3 s";
    match report
        .datapath_setup
        .iter()
        .find(|setup| setup.family == "ipv4" && setup.rules == 1_000_000)
    {
        Some(setup) => rows.push(IssueRow {
            measure,
            value: Some(setup.compile_ms),
            unit: "ms",
            measured: format!(
                "{:.0} ms (IPv4: {} workloads, one policy; {} policy entries)",
                setup.compile_ms,
                human(u64::from(setup.rules)),
                setup.policy_entries
            ),
            target: format!("{wording} (3000 ms)"),
            target_value: Some(3000.0),
            met: Some(setup.compile_ms <= 3000.0),
        }),
        None => rows.push(not_measured(
            measure,
            "ms",
            wording,
            "1,000,000 rules are run in full mode only",
        )),
    }
    for (measure, rules, limit_mib) in [
        ("agent RSS at 100k rules", 100_000, 64.0),
        ("agent RSS at 1M rules", 1_000_000, 512.0),
    ] {
        let wording = format!("<= {limit_mib:.0} MB (taken as MiB)");
        match report
            .memory
            .iter()
            .find(|row| row.family == "ipv4" && row.rules == rules)
        {
            Some(row) => {
                let mib = row.agent_rss_kib as f64 / 1024.0;
                rows.push(IssueRow {
                    measure,
                    value: Some(mib),
                    unit: "MiB",
                    measured: format!(
                        "{mib:.0} MiB (VmRSS of the benchmark process after compiling and applying IPv4 at {}: it carries the allocator's peaks of earlier scales; peak {:.0} MiB)",
                        human(u64::from(rules)),
                        row.agent_peak_rss_kib as f64 / 1024.0
                    ),
                    target: wording,
                    target_value: Some(limit_mib),
                    met: Some(mib <= limit_mib),
                });
            }
            None => rows.push(not_measured(
                measure,
                "MiB",
                &wording,
                "this scale is run in full mode only",
            )),
        }
    }
    rows
}

fn met(value: Option<bool>) -> &'static str {
    match value {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "n/a",
    }
}

fn events_cell(events: &EventCounts) -> String {
    if events.sent == 0 && events.lost_rate_limit == 0 && events.lost_ring_full == 0 {
        return "0".to_owned();
    }
    format!(
        "{:.1}% ({} of {})",
        events.sent_share() * 100.0,
        events.sent,
        events.packets
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1048576.0)
}

/// "Per-packet cost with ClusterNetworkPolicy tiers" and the sets' sizes.
fn tiers_table(md: &mut String, tiers: &TiersResults) {
    let _ = writeln!(
        md,
        "### Per-packet cost with ClusterNetworkPolicy tiers\n\nns per packet minus the harness floor (floor column: the trivial program with the same repeat, or per call for new flows); median over {} interleaved rounds, [min..max]. NP only: the NetworkPolicy alone; tiers: plus an Admin tier (Deny, Accept, Pass at priorities 10, 20, 900) and a Baseline default deny; {} priorities: plus {} Admin policies at priorities 100-{}. Ratios of the medians without the floor (as measured, floor included, in brackets). Each verdict was checked with the reference evaluator and by the kernel at every run.\n",
        tiers.rounds,
        tiers.many_priorities,
        tiers.many_priorities,
        99 + tiers.many_priorities
    );
    let _ = writeln!(
        md,
        "| program | family | rules | flow | verdict, NP only | verdict, with tiers | floor | NP only | tiers | tiers / NP only | {} priorities | {} priorities / NP only |\n|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
        tiers.many_priorities, tiers.many_priorities
    );
    for row in &tiers.rows {
        let cell = |variant: Variant| {
            row.figure(variant).map_or_else(
                || "-".to_owned(),
                |figure| {
                    format!(
                        "{:.1} [{:.1}..{:.1}]",
                        figure.without_floor.median_ns,
                        figure.without_floor.min_ns,
                        figure.without_floor.max_ns
                    )
                },
            )
        };
        let verdict = |variant: Variant| {
            row.figure(variant)
                .map_or_else(|| "-".to_owned(), |figure| figure.verdict.clone())
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} ({}) | {} | {} ({}) |",
            row.program,
            row.family,
            human(u64::from(row.rules)),
            row.flow,
            verdict(Variant::NetworkPolicyOnly),
            verdict(Variant::Tiers),
            row.floor_ns,
            cell(Variant::NetworkPolicyOnly),
            cell(Variant::Tiers),
            ratio_text(row.tiers_ratio),
            ratio_text(row.tiers_ratio_as_measured),
            cell(Variant::ManyPriorities),
            ratio_text(row.many_ratio),
            ratio_text(row.many_ratio_as_measured)
        );
    }
    md.push_str("\n#### Rule hit counters: cost per packet\n\nThe NetworkPolicy set as shipped (every rule and default deny counted in `RULE_HITS`) beside the same set with every hit slot 0 (nothing counted), ns per packet minus the floor, measured in the same interleaved rounds.\n\n| program | family | rules | flow | counted | uncounted | counted / uncounted |\n|---|---|---:|---|---:|---:|---:|\n");
    for row in tiers
        .rows
        .iter()
        .filter(|row| ["established", "new_allow", "deny"].contains(&row.flow))
    {
        let median = |variant: Variant| {
            row.figure(variant).map_or_else(
                || "-".to_owned(),
                |f| format!("{:.1}", f.without_floor.median_ns),
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} ({}) |",
            row.program,
            row.family,
            human(u64::from(row.rules)),
            row.flow,
            median(Variant::NetworkPolicyOnly),
            median(Variant::Uncounted),
            ratio_text(row.counting_ratio),
            ratio_text(row.counting_ratio_as_measured)
        );
    }
    md.push_str("\nThe compiled sets:\n\n| family | rules | set | NetworkPolicies | ClusterNetworkPolicies | endpoints | peer hosts | policy entries (exact) | compile ms | apply ms |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for setup in &tiers.setups {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {:.1} | {:.1} |",
            setup.family,
            human(u64::from(setup.rules)),
            setup.variant,
            setup.network_policies,
            setup.cluster_network_policies,
            setup.endpoints,
            setup.peer_hosts,
            setup.policy_entries,
            setup.policy_exact,
            setup.compile_ms,
            setup.apply_ms
        );
    }
    md.push('\n');
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
    if !report.issue_11.is_empty() {
        md.push_str("### Issue 11: measures and targets (this run)\n\n| measure | measured | target (against this run's floors) | met |\n|---|---|---|---|\n");
        for row in &report.issue_11 {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                row.measure,
                row.measured,
                row.target,
                met(row.met)
            );
        }
        md.push('\n');
    }
    if !report.datapath.is_empty() {
        md.push_str("### Per-packet cost (BPF_PROG_TEST_RUN), ns per packet\n\n");
        let _ = writeln!(
            md,
            "Each figure as measured (harness floor included) and minus the floor measured the same way. hot: deny and established repeat one frame in one call (floor: the trivial program with the same repeat, XDP {:.1} / TC {:.1} ns); new_allow runs distinct flows of one client, one call each. hot per call: the same packet(s), one call each, as spread is taken: hot per call and spread differ only in the sources. Every per-call figure's floor is the trivial program per call (XDP {:.1} / TC {:.1} ns). Events: share of the packets of the hot (repeat) and spread figures that wrote a deny event (shipped settings).\n",
            report.floors.xdp_hot_ns,
            report.floors.tc_hot_ns,
            report.floors.xdp_per_call_ns,
            report.floors.tc_per_call_ns
        );
        md.push_str(
            "| program | family | case | rules | hot, as measured | hot - floor | hot per call, as measured | hot per call - floor | spread, as measured | spread - floor | events sent, hot | events sent, spread |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for row in &report.datapath {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
                row.program,
                row.family,
                row.case,
                human(u64::from(row.rules)),
                row.hot.with_floor_ns,
                row.hot.without_floor_ns,
                row.hot_per_call.with_floor_ns,
                row.hot_per_call.without_floor_ns,
                row.spread.with_floor_ns,
                row.spread.without_floor_ns,
                events_cell(&row.hot_events),
                events_cell(&row.spread_events)
            );
        }
        md.push('\n');
    }
    if !report.event_path.is_empty() {
        md.push_str("### Deny event path, ns per packet without the floor\n\nshipped: 100,000 events/s per CPU, burst 10,000; minimal: 1 event/s, burst 1 (the rate-limit check still runs for every packet); off: deny events off in the kernel (`denyEvents: false`: no clock read, no rate limiter, drops still counted); every packet: rate limit off, ring drained between calls. In brackets: the share of the packets that wrote an event (counts in report.json, event_path). One event written = every packet - minimal; the event path as shipped = shipped - off.\n\n| program | family | rules | hot: shipped | minimal | off | every packet | spread: shipped | minimal | off | every packet | one event written, hot / spread | shipped - minimal, hot / spread | shipped - off, hot / spread |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for row in &report.event_path {
            let variant = |name: &str| row.variants.iter().find(|variant| variant.variant == name);
            let cell = |name: &str, hot: bool| {
                variant(name).map_or_else(
                    || "-".to_owned(),
                    |variant| {
                        let (figure, events) = if hot {
                            (variant.hot, &variant.hot_events)
                        } else {
                            (variant.spread, &variant.spread_events)
                        };
                        format!(
                            "{:.1} ({:.1}% sent)",
                            figure.without_floor_ns,
                            events.sent_share() * 100.0
                        )
                    },
                )
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} |",
                row.program,
                row.family,
                human(u64::from(row.rules)),
                cell("shipped", true),
                cell("minimal", true),
                cell("off", true),
                cell("every_packet", true),
                cell("shipped", false),
                cell("minimal", false),
                cell("off", false),
                cell("every_packet", false),
                row.event_write_hot_ns,
                row.event_write_spread_ns,
                row.shipped_minus_minimal_hot_ns,
                row.shipped_minus_minimal_spread_ns,
                row.shipped_minus_off_hot_ns,
                row.shipped_minus_off_spread_ns
            );
        }
        md.push('\n');
    }
    if !report.tiers.rows.is_empty() {
        tiers_table(&mut md, &report.tiers);
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
        let rounds = report
            .traffic
            .iter()
            .map(|row| row.rounds)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            md,
            "### Real traffic over veth (packets/s)\n\nMedian over {rounds} interleaved round(s) per engine and scale, [min..max] beside it; the other columns are medians too.\n\n| engine | rules | delivered (allowed sources) | dropped (denied sources) | processed, allowed run | processed, denied run | engine's drop counter | ns/packet, denied run | rule set-up ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for row in &report.traffic {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} [{:.0}..{:.0}] | {:.0} [{:.0}..{:.0}] | {:.0} | {:.0} | {} | {:.0} | {:.0} |",
                row.engine,
                human(u64::from(row.rules)),
                row.pps_delivered,
                row.pps_delivered_min,
                row.pps_delivered_max,
                row.pps_dropped,
                row.pps_dropped_min,
                row.pps_dropped_max,
                row.processed_allowed_pps.median,
                row.processed_denied_pps.median,
                row.engine_dropped_pps
                    .map_or_else(|| "-".to_owned(), |pps| format!("{:.0}", pps.median)),
                row.denied_ns_per_packet.median,
                row.setup_ms
            );
        }
        md.push('\n');
        md.push_str(&counter_table(&report.traffic));
    }
    if let Some(control) = &report.control_plane {
        let _ = writeln!(
            md,
            "### Control plane ({} policies over {} workloads)\n\n| figure | ms |\n|---|---:|\n| compile | {:.1} |\n| apply_10k_ms | {:.1} |\n| update: recompile | {:.1} |\n| update: apply call (to the switch) | {:.2} |\n| update_to_enforced_ms | {:.2} |\n| restart: load | {:.1} |\n| restart: adopt_state | {:.1} |\n| restart_ready_ms | {:.1} |\n",
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
        if !control.changes.is_empty() {
            md.push_str("One change of each type, through the agent's path (ids kept by one `Compiler`); times from the start of the compile, and from the start of the rebuild of the set from its objects:\n\n| change | rebuild ms | compile ms | apply ms (to the switch) | standby rewrite ms (after) | entries written | first packet judged ms | from rebuild ms |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
            for change in &control.changes {
                let _ = writeln!(
                    md,
                    "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} |",
                    change.change,
                    change.build_ms,
                    change.compile_ms,
                    change.apply_ms,
                    change.standby_ms,
                    change.entries_written,
                    change.to_enforced_ms,
                    change.from_rebuild_ms
                );
            }
            md.push('\n');
        }
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
        "# microseg benchmark ({} run)\n\nMachine: {} ({} cores), kernel {}, {:.1} GiB; load average {:.2} at the start, {:.2} at the end (other work on the machine shows in the figures). Userspace build: {}. Took {:.0} s.\n\nTools: {}; {}; {}; {}.\n\nPacket source: {}.\n\n",
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
        machine.ipset,
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

/// Each engine's own drop counter beside processed - delivered, per engine and scale.
fn counter_table(traffic: &[TrafficRow]) -> String {
    let mut md = String::from(
        "#### Drop counters: each engine's own against processed - delivered\n\nEvery window (allowed and denied sources, every round). Over each window's whole traffic run, from before the sender starts to after it has stopped and the receiver settled, so both counters stand still when read. A window is flagged when the two differ by more than 0.1% of its processed packets (at least 16). Packets over each window's whole run; medians over the rounds.\n\n| engine | rules | windows compared | flagged | denied: processed - delivered | denied: engine's counter | largest difference (packets, % of processed) |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in traffic {
        let checks: Vec<&crate::traffic::CounterCheck> = row
            .runs
            .iter()
            .filter_map(|run| run.denied.counter_check.as_ref())
            .collect();
        if checks.is_empty() {
            let _ = writeln!(
                md,
                "| {} | {} | 0 | - | - | no counter | - |",
                row.engine,
                human(u64::from(row.rules))
            );
            continue;
        }
        let median = |values: Vec<f64>| crate::traffic::Spread::of(values).median;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {}{} | {:.0} | {:.0} | {} ({:.3}%) |",
            row.engine,
            human(u64::from(row.rules)),
            row.counter_windows_compared,
            row.counter_windows_disagreeing,
            if row.counter_windows_disagreeing > 0 {
                " **disagree**"
            } else {
                ""
            },
            median(
                checks
                    .iter()
                    .map(|check| check.kernel_dropped_packets as f64)
                    .collect()
            ),
            median(
                checks
                    .iter()
                    .map(|check| check.engine_dropped_packets as f64)
                    .collect()
            ),
            row.counter_largest_difference_packets,
            row.counter_largest_difference_ratio * 100.0
        );
    }
    md.push('\n');
    md
}
