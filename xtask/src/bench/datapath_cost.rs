//! Per-packet cost of the real XDP and TC ingress programs through BPF_PROG_TEST_RUN,
//! at each policy scale, IPv4 and IPv6, for three cases:
//! - `deny`: a client of the rule set to a port no rule allows: identity found, both
//!   policy lookups miss, the packet is dropped and a deny event is sent;
//! - `established`: a flow already in conntrack (allowed under the live generation);
//! - `new_allow`: a flow not yet in conntrack, allowed by its policy entry, then
//!   recorded in conntrack.
//!
//! Two figures per case (BENCH-NOTES):
//! - hot: one packet, everything it touches stays in cache. `deny` and `established`
//!   run one frame `repeat` times in one call (median of 3 calls). `new_allow` cannot
//!   be repeated (from the second run on the flow is in conntrack), so it runs
//!   `new_flows` distinct flows of one client (source ports differ) with repeat = 1
//!   each: kernel-measured mean per call minus the same harness around the trivial
//!   program;
//! - spread: `spread_samples` frames whose sources are spread over the whole rule set
//!   (clients sampled without replacement in random order; a smaller rule set is
//!   cycled through with other source ports), repeat = 1 each, kernel-measured mean
//!   minus the same harness around the trivial program. `new_allow` runs them first
//!   (each a new flow), `established` runs the same flows again in another order,
//!   `deny` the same sources to a closed port.
//!
//! Per-call figures are trimmed means (the slowest 1% of calls, interrupted by the
//! host, left out), for microseg and the harness floor alike.
//!
//! Every figure is given twice: as measured (harness included) and minus the harness
//! floor measured the same way (the trivial program with the same `repeat` for a
//! repeated packet; the trivial program per call, repeat = 1, for per-call figures).
//! The hot deny and established packets are also run the way spread is, one call
//! each (`hot_per_call`, `new_flows` calls), so hot and spread can be compared on
//! the same harness.
//!
//! Deny events: every row says how many of its packets sent an event (the data
//! path's EventsSent / EventsLostRateLimit / EventsLostRingFull counter deltas over
//! the measurement). The event path is measured on its own (`EventPathRow`): deny hot
//! and spread with the shipped settings, with events rate-limited to a minimum (1
//! event/s per CPU, burst 1: every packet still runs the rate limiter, almost none
//! writes an event), with deny events off (`SETTINGS_FLAG_NO_DENY_EVENTS`: no rate
//! limiter, no clock read), and with the rate limit off and the ring drained between
//! calls (every packet writes one). The spread figures of the four settings are
//! taken interleaved, chunk by chunk.
//!
//! Every verdict is checked: a wrong one fails the benchmark.

use std::time::Instant;

use anyhow::{Context, bail};
use aya::maps::{HashMap, MapData, RingBuf};
use microseg::datapath::{
    AttachPoint, Datapath, DatapathState, LoadOptions, ProgramVerdict, XdpAttachMode, probe::Probe,
};
use microseg_common::{
    config::{SETTINGS_FLAG_NO_DENY_EVENTS, Settings},
    conntrack::{FlowKey, FlowState},
    counters::Counter,
    maps,
};
use serde::Serialize;

use crate::{
    floor::{self, HarnessFloor, MemoryFloor},
    memory::{self, ScaleMemory},
    progress::{Progress, Rng},
    scenario::{self, ALLOWED_PORT, DENIED_PORT, Family, Scenario},
};

/// What to run.
#[derive(Clone, Debug)]
pub struct CostConfig {
    pub scales: Vec<u32>,
    /// Repeats of one frame for the hot `deny` and `established` figures.
    pub hot_repeat: u32,
    /// Distinct flows of one client for the hot `new_allow` figure.
    pub new_flows: usize,
    /// Distinct clients per spread figure (all of them when the scale is smaller).
    pub spread_samples: usize,
}

/// The two programs measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    Xdp,
    Tc,
}

impl Program {
    pub const ALL: [Program; 2] = [Program::Xdp, Program::Tc];

    pub fn name(self) -> &'static str {
        match self {
            Program::Xdp => "xdp",
            Program::Tc => "tc",
        }
    }

    fn point(self) -> AttachPoint {
        match self {
            Program::Xdp => AttachPoint::Xdp(XdpAttachMode::Default),
            Program::Tc => AttachPoint::TcIngress,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    NewAllow,
    Established,
    Deny,
}

impl Case {
    pub fn name(self) -> &'static str {
        match self {
            Case::NewAllow => "new_allow",
            Case::Established => "established",
            Case::Deny => "deny",
        }
    }
}

/// What the data path did with deny events over a measurement (counter deltas).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct EventCounts {
    /// Packets run through the program.
    pub packets: u64,
    /// Events written to the ring buffer.
    pub sent: u64,
    pub lost_rate_limit: u64,
    pub lost_ring_full: u64,
}

impl EventCounts {
    /// Share of the packets that wrote an event.
    pub fn sent_share(&self) -> f64 {
        self.sent as f64 / (self.packets as f64).max(1.0)
    }
}

/// A figure as measured (harness included) and minus the harness floor measured
/// the same way.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Figure {
    pub with_floor_ns: f64,
    pub floor_ns: f64,
    pub without_floor_ns: f64,
}

impl Figure {
    fn new(measured: f64, floor: f64) -> Self {
        Self {
            with_floor_ns: measured,
            floor_ns: floor,
            without_floor_ns: (measured - floor).max(0.0),
        }
    }
}

/// One row of the `datapath` table.
#[derive(Clone, Debug, Serialize)]
pub struct CostRow {
    pub program: &'static str,
    pub family: &'static str,
    pub case: &'static str,
    pub rules: u32,
    /// Hot figure as earlier reports gave it: `hot.with_floor_ns` for deny and
    /// established (repeat N, harness not subtracted), `hot.without_floor_ns` for
    /// new_allow (per call, harness subtracted). Prefer `hot`.
    pub ns_per_packet: f64,
    /// Spread figure, per-call harness subtracted (= `spread.without_floor_ns`).
    pub spread_ns_per_packet: f64,
    /// Hot: one packet (deny, established: one frame repeated; new_allow: distinct
    /// flows of one client, one call each), with and without the harness floor.
    pub hot: Figure,
    /// Hot taken the way spread is: the same packet(s) as `hot`, one call each
    /// (repeat = 1), with and without the per-call harness floor. For new_allow
    /// this is `hot` itself. hot_per_call vs spread differs only in the sources.
    pub hot_per_call: Figure,
    pub hot_per_call_packets: usize,
    /// Spread: sources over the whole rule set, one call each, with and without the
    /// per-call harness floor.
    pub spread: Figure,
    /// How the hot figure was taken: "repeat N" or "N flows x repeat 1".
    pub hot_method: String,
    /// Packets in the spread figure.
    pub spread_packets: usize,
    /// Events over the hot and spread measurements (shipped settings).
    pub hot_events: EventCounts,
    pub spread_events: EventCounts,
}

/// Deny under one event setting.
#[derive(Clone, Debug, Serialize)]
pub struct DenyEventVariant {
    /// "shipped", "minimal", "off" or "every_packet".
    pub variant: &'static str,
    pub events_per_second: u32,
    pub events_burst: u32,
    pub hot_method: String,
    pub hot: Figure,
    pub hot_events: EventCounts,
    pub spread: Figure,
    pub spread_events: EventCounts,
}

/// The event path of the deny case at one scale, program and family.
#[derive(Clone, Debug, Serialize)]
pub struct EventPathRow {
    pub program: &'static str,
    pub family: &'static str,
    pub rules: u32,
    pub variants: Vec<DenyEventVariant>,
    /// Cost of writing one event: every_packet minus minimal, without floor (hot,
    /// spread). The rate-limit check that every deny runs is in both and not here.
    pub event_write_hot_ns: f64,
    pub event_write_spread_ns: f64,
    /// The deny path with events on as shipped minus the deny path with events
    /// rate-limited to a minimum (hot, spread).
    pub shipped_minus_minimal_hot_ns: f64,
    pub shipped_minus_minimal_spread_ns: f64,
    /// The whole event path as shipped: shipped minus deny events off (hot, spread).
    pub shipped_minus_off_hot_ns: f64,
    pub shipped_minus_off_spread_ns: f64,
}

/// Loading and applying at one scale.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleSetup {
    pub family: &'static str,
    pub rules: u32,
    pub build_ms: f64,
    pub compile_ms: f64,
    pub load_ms: f64,
    pub apply_ms: f64,
    pub policy_entries: usize,
    pub peer_hosts: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CostResults {
    pub rows: Vec<CostRow>,
    pub event_path: Vec<EventPathRow>,
    pub setups: Vec<ScaleSetup>,
    pub memory: Vec<ScaleMemory>,
    pub memory_floor: Vec<MemoryFloorRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemoryFloorRow {
    pub entries: u32,
    pub random_key_ns: f64,
    pub random_key_and_hash_lookup_ns: f64,
}

impl From<MemoryFloor> for MemoryFloorRow {
    fn from(floor: MemoryFloor) -> Self {
        Self {
            entries: floor.entries,
            random_key_ns: floor.random_only_ns,
            random_key_and_hash_lookup_ns: floor.lookup_ns,
        }
    }
}

/// Harness floors of both program types.
#[derive(Clone, Copy, Debug)]
pub struct Floors {
    pub xdp: HarnessFloor,
    pub tc: HarnessFloor,
}

impl Floors {
    pub fn of(&self, program: Program) -> HarnessFloor {
        match program {
            Program::Xdp => self.xdp,
            Program::Tc => self.tc,
        }
    }
}

/// Pads a frame to the 60 bytes of a minimum Ethernet frame (without FCS), like the
/// frames of the traffic test.
pub fn padded(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.len() < 60 {
        frame.resize(60, 0);
    }
    frame
}

fn frame(family: Family, client: u32, src_port: u16, dst_port: u16) -> Vec<u8> {
    padded(Probe::udp(family.client(client), src_port, family.server(), dst_port).to_frame())
}

/// A loaded data path at one scale, its event ring drained as it goes.
pub struct Loaded {
    datapath: Datapath,
    events: RingBuf<MapData>,
}

impl Loaded {
    pub fn drain(&mut self) {
        while self.events.next().is_some() {}
    }

    /// One run: verdict and kernel-measured ns.
    pub fn run(&self, program: Program, frame: &[u8], repeat: u32) -> anyhow::Result<(bool, f64)> {
        let (verdict, ns) = self
            .datapath
            .test_run_repeat(program.point(), frame, repeat)?;
        match verdict {
            ProgramVerdict::Pass => Ok((true, ns)),
            ProgramVerdict::Drop => Ok((false, ns)),
            ProgramVerdict::Other(code) => {
                bail!("{} returned {code}, neither pass nor drop", program.name())
            }
        }
    }

    /// Runs each frame once; fails unless every verdict is `pass`. Trimmed mean ns
    /// per call (see `floor::trimmed_mean`).
    pub fn per_call_mean(
        &mut self,
        program: Program,
        frames: &[Vec<u8>],
        pass: bool,
        what: &str,
    ) -> anyhow::Result<f64> {
        let mut samples = Vec::with_capacity(frames.len());
        self.per_call_samples(program, frames, pass, what, &mut samples)?;
        Ok(floor::trimmed_mean(&mut samples))
    }

    /// Runs each frame once (ring drained every 1,024 calls and at the end),
    /// appending the kernel-measured ns per call to `samples`.
    fn per_call_samples(
        &mut self,
        program: Program,
        frames: &[Vec<u8>],
        pass: bool,
        what: &str,
        samples: &mut Vec<f64>,
    ) -> anyhow::Result<()> {
        for (index, frame) in frames.iter().enumerate() {
            let (passed, ns) = self.run(program, frame, 1)?;
            if passed != pass {
                bail!(
                    "{} {what}: packet {index} was {}, expected {}",
                    program.name(),
                    verdict_name(passed),
                    verdict_name(pass)
                );
            }
            samples.push(ns);
            if index % 1024 == 1023 {
                self.drain();
            }
        }
        self.drain();
        Ok(())
    }

    /// The spread figure under several event settings, interleaved so that each
    /// sees the same share of the machine's noise and of cold caches: the frames go
    /// in chunks, and every chunk runs under each setting in turn (the first
    /// setting rotating).
    /// Trimmed mean ns per call and the events, per setting; the shipped settings
    /// are restored at the end.
    fn per_call_settings(
        &mut self,
        program: Program,
        frames: &[Vec<u8>],
        settings: &[Settings],
        what: &str,
    ) -> anyhow::Result<Vec<(f64, EventCounts)>> {
        let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(frames.len()); settings.len()];
        let mut events = vec![EventCounts::default(); settings.len()];
        // Four chunks per setting: each setting comes first (on sources no setting
        // has touched yet in this pass) as often as the others.
        let chunk = frames.len().div_ceil(4 * settings.len()).max(1);
        for (round, frames) in frames.chunks(chunk).enumerate() {
            for turn in 0..settings.len() {
                let index = (round + turn) % settings.len();
                self.set_settings(&settings[index])?;
                let before = self.event_counters()?;
                self.per_call_samples(program, frames, false, what, &mut samples[index])?;
                let counts = self.events_since(before, frames.len() as u64)?;
                let total = &mut events[index];
                total.packets += counts.packets;
                total.sent += counts.sent;
                total.lost_rate_limit += counts.lost_rate_limit;
                total.lost_ring_full += counts.lost_ring_full;
            }
        }
        self.set_settings(&Settings::default())?;
        Ok(samples
            .iter_mut()
            .zip(events)
            .map(|(samples, events)| (floor::trimmed_mean(samples), events))
            .collect())
    }

    /// One frame `repeat` times, median of three calls.
    fn hot(
        &mut self,
        program: Program,
        frame: &[u8],
        repeat: u32,
        pass: bool,
        what: &str,
    ) -> anyhow::Result<f64> {
        let mut samples = Vec::new();
        for _ in 0..3 {
            self.drain();
            let (passed, ns) = self.run(program, frame, repeat)?;
            if passed != pass {
                bail!(
                    "{} {what}: verdict {}, expected {}",
                    program.name(),
                    verdict_name(passed),
                    verdict_name(pass)
                );
            }
            samples.push(ns);
        }
        self.drain();
        Ok(floor::median(&mut samples))
    }

    /// The event counters now: (sent, lost to the rate limit, lost to a full ring).
    fn event_counters(&mut self) -> anyhow::Result<[u64; 3]> {
        let counters = self.datapath.maps()?.counters()?;
        Ok([
            counters.get(Counter::EventsSent),
            counters.get(Counter::EventsLostRateLimit),
            counters.get(Counter::EventsLostRingFull),
        ])
    }

    fn events_since(&mut self, before: [u64; 3], packets: u64) -> anyhow::Result<EventCounts> {
        let after = self.event_counters()?;
        Ok(EventCounts {
            packets,
            sent: after[0].saturating_sub(before[0]),
            lost_rate_limit: after[1].saturating_sub(before[1]),
            lost_ring_full: after[2].saturating_sub(before[2]),
        })
    }

    /// `per_call_mean` with the events it caused.
    fn per_call_events(
        &mut self,
        program: Program,
        frames: &[Vec<u8>],
        pass: bool,
        what: &str,
    ) -> anyhow::Result<(f64, EventCounts)> {
        let before = self.event_counters()?;
        let ns = self.per_call_mean(program, frames, pass, what)?;
        Ok((ns, self.events_since(before, frames.len() as u64)?))
    }

    /// `hot` with the events it caused.
    fn hot_events(
        &mut self,
        program: Program,
        frame: &[u8],
        repeat: u32,
        pass: bool,
        what: &str,
    ) -> anyhow::Result<(f64, EventCounts)> {
        self.drain();
        let before = self.event_counters()?;
        let ns = self.hot(program, frame, repeat, pass, what)?;
        Ok((ns, self.events_since(before, 3 * u64::from(repeat))?))
    }

    /// One frame in `calls` calls of `repeat` runs each, the ring drained between
    /// calls (so with a ring that holds `repeat` events, none is lost to a full
    /// ring): median of the calls' means, and the events.
    fn hot_drained(
        &mut self,
        program: Program,
        frame: &[u8],
        repeat: u32,
        calls: usize,
        pass: bool,
        what: &str,
    ) -> anyhow::Result<(f64, EventCounts)> {
        self.drain();
        let before = self.event_counters()?;
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls.max(1) {
            let (passed, ns) = self.run(program, frame, repeat)?;
            if passed != pass {
                bail!(
                    "{} {what}: verdict {}, expected {}",
                    program.name(),
                    verdict_name(passed),
                    verdict_name(pass)
                );
            }
            samples.push(ns);
            self.drain();
        }
        let ns = floor::median(&mut samples);
        let packets = samples.len() as u64 * u64::from(repeat);
        Ok((ns, self.events_since(before, packets)?))
    }

    fn set_settings(&mut self, settings: &Settings) -> anyhow::Result<()> {
        self.datapath.maps()?.set_settings(settings)?;
        Ok(())
    }

    /// Replaces the applied state `current` with `new`.
    pub fn apply(&mut self, current: &DatapathState, new: &DatapathState) -> anyhow::Result<()> {
        self.datapath
            .apply(current, new)
            .context("applying a benchmark state")?;
        Ok(())
    }

    /// Empties the conntrack table, so the next program's flows are new again.
    pub fn clear_conntrack(&mut self) -> anyhow::Result<()> {
        let map = self
            .datapath
            .ebpf_mut()
            .map_mut(maps::CONNTRACK)
            .context("the CONNTRACK map")?;
        let mut conntrack: HashMap<&mut MapData, FlowKey, FlowState> =
            HashMap::try_from(map).context("CONNTRACK as a hash map")?;
        let keys: Vec<FlowKey> = conntrack.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = conntrack.remove(&key);
        }
        Ok(())
    }
}

pub fn verdict_name(pass: bool) -> &'static str {
    if pass { "pass" } else { "drop" }
}

/// Loads the programs sized for `rules` and applies `state`.
fn load(rules: u32, state: &DatapathState) -> anyhow::Result<(Loaded, f64, f64)> {
    let mut capacities = scenario::capacities(rules);
    // Room for every flow a scale creates (hot and spread, both programs): no LRU
    // eviction inside a measurement.
    capacities.conntrack = capacities.conntrack.max(1 << 19);
    load_with(capacities, state)
}

/// Loads the programs with `capacities` and applies `state`: the programs, the load
/// time and the apply time (ms).
pub fn load_with(
    capacities: microseg::datapath::Capacities,
    state: &DatapathState,
) -> anyhow::Result<(Loaded, f64, f64)> {
    let start = Instant::now();
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: None,
        capacities,
    })
    .context("loading microseg's programs")?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let events = datapath.take_events()?;
    let start = Instant::now();
    datapath
        .apply(&DatapathState::default(), state)
        .context("applying the benchmark state")?;
    let apply_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok((Loaded { datapath, events }, load_ms, apply_ms))
}

/// Compiles every scale's scenario and prints the compile time and the resident set
/// after it (`--only compile`): the compiler's cost without the kernel, to profile.
pub fn compile_only(config: &CostConfig) -> anyhow::Result<()> {
    for &rules in &config.scales {
        for family in Family::ALL {
            let scenario = Scenario::build(family, rules)?;
            memory::return_free_memory();
            let (rss, peak) = memory::rss_kib();
            println!(
                "{:>10}: build {:>8.1} ms, compile {:>8.1} ms, RSS {:>7.1} MiB (peak {:.1})",
                scenario::label(family, rules),
                scenario.build_ms,
                scenario.compile_ms,
                rss as f64 / 1024.0,
                peak as f64 / 1024.0
            );
        }
    }
    Ok(())
}

/// Measures every program and case at every scale.
pub fn run(
    config: &CostConfig,
    floors: &Floors,
    rss_start_kib: u64,
    progress: &Progress,
) -> anyhow::Result<CostResults> {
    let mut results = CostResults::default();
    let mut rng = Rng::new(0x5eed_0001);
    for &rules in &config.scales {
        for family in Family::ALL {
            let label = scenario::label(family, rules);
            progress.step(format!("datapath cost: compiling {label}"));
            let scenario = Scenario::build(family, rules)?;
            progress.step(format!("datapath cost: loading and applying {label}"));
            let maps_before = memory::bpf_maps();
            let (mut loaded, load_ms, apply_ms) = load(rules, &scenario.state)
                .with_context(|| scenario::context_for(family, rules))?;
            let counts = scenario.state.counts();
            results.setups.push(ScaleSetup {
                family: family.name(),
                rules,
                build_ms: scenario.build_ms,
                compile_ms: scenario.compile_ms,
                load_ms,
                apply_ms,
                policy_entries: counts.policy,
                peer_hosts: counts.peer_hosts,
            });
            memory::return_free_memory();
            let (rss, peak) = memory::rss_kib();
            let (bpf_map_bytes, mut bpf_maps) =
                memory::new_map_bytes(&maps_before, &memory::bpf_maps());
            bpf_maps.sort_by_key(|map| std::cmp::Reverse(map.memlock_bytes));
            results.memory.push(ScaleMemory {
                family: family.name(),
                rules,
                agent_rss_kib: rss,
                agent_rss_delta_kib: rss as i64 - rss_start_kib as i64,
                agent_peak_rss_kib: peak,
                bpf_map_bytes,
                policy_map_bytes: memory::policy_bytes(&bpf_maps),
                bpf_maps,
            });
            progress.line(format!(
                "  {label:>10}: compile {:>8.1} ms, apply {:>8.1} ms, policy maps {:>7.1} MiB, RSS {:>7.1} MiB",
                scenario.compile_ms,
                apply_ms,
                results.memory.last().map_or(0, |m| m.policy_map_bytes) as f64 / 1048576.0,
                rss as f64 / 1024.0
            ));
            drop(scenario);
            for program in Program::ALL {
                progress.step(format!(
                    "datapath cost: {} {label}",
                    program.name().to_uppercase()
                ));
                let (rows, events) = measure(
                    &mut loaded,
                    program,
                    family,
                    rules,
                    config,
                    floors.of(program),
                    &mut rng,
                )
                .with_context(|| format!("{} at {label}", program.name()))?;
                for row in &rows {
                    progress.line(format!(
                        "  {label:>10} {:>3} {:<11} hot {:>8.1} ns ({:>7.1} - floor)   spread {:>8.1} ns ({:>7.1} - floor){}",
                        row.program,
                        row.case,
                        row.hot.with_floor_ns,
                        row.hot.without_floor_ns,
                        row.spread.with_floor_ns,
                        row.spread.without_floor_ns,
                        if row.case == Case::Deny.name() {
                            format!(
                                "; events sent by {:.1}% hot, {:.1}% spread",
                                row.hot_events.sent_share() * 100.0,
                                row.spread_events.sent_share() * 100.0
                            )
                        } else {
                            String::new()
                        }
                    ));
                }
                progress.line(format!(
                    "  {label:>10} {:>3} deny events: one event written {:>6.1} ns hot, {:>6.1} ns spread; shipped - minimal {:>6.1} / {:>6.1} ns",
                    events.program,
                    events.event_write_hot_ns,
                    events.event_write_spread_ns,
                    events.shipped_minus_minimal_hot_ns,
                    events.shipped_minus_minimal_spread_ns
                ));
                results.rows.extend(rows);
                results.event_path.push(events);
            }
        }
        progress.step(format!(
            "datapath cost: memory floor at {}",
            scenario::human(u64::from(rules))
        ));
        let memory_floor = floor::memory_floor(rules, config.hot_repeat)?;
        progress.line(format!(
            "  memory floor {:>8}: random key {:>6.1} ns, + hash lookup {:>6.1} ns",
            scenario::human(u64::from(rules)),
            memory_floor.random_only_ns,
            memory_floor.lookup_ns
        ));
        results.memory_floor.push(memory_floor.into());
    }
    Ok(results)
}

fn measure(
    loaded: &mut Loaded,
    program: Program,
    family: Family,
    rules: u32,
    config: &CostConfig,
    floor: HarnessFloor,
    rng: &mut Rng,
) -> anyhow::Result<(Vec<CostRow>, EventPathRow)> {
    loaded.set_settings(&Settings::default())?;
    loaded.clear_conntrack()?;
    let per_call = |ns: f64| Figure::new(ns, floor.per_call_ns);
    let repeated = |ns: f64| Figure::new(ns, floor.hot_ns);

    // Spread: clients over the whole rule set in random order, each flow distinct.
    // A scale smaller than the sample is cycled through, with other source ports.
    let clients = rng.sample(rules, config.spread_samples);
    let rounds = config.spread_samples.div_ceil(clients.len().max(1));
    let flows: Vec<(u32, u16)> = (0..rounds)
        .flat_map(|round| {
            clients.iter().enumerate().map(move |(index, &client)| {
                (client, 1024 + ((round * 7919 + index) % 60_000) as u16)
            })
        })
        .take(config.spread_samples.max(clients.len()))
        .collect();
    let allowed: Vec<Vec<u8>> = flows
        .iter()
        .map(|&(client, port)| frame(family, client, port, ALLOWED_PORT))
        .collect();
    let (spread_new, spread_new_events) =
        loaded.per_call_events(program, &allowed, true, "spread new_allow")?;
    let mut again = allowed;
    rng.shuffle(&mut again);
    let (spread_established, spread_established_events) =
        loaded.per_call_events(program, &again, true, "spread established")?;
    drop(again);
    let denied: Vec<Vec<u8>> = flows
        .iter()
        .map(|&(client, port)| frame(family, client, port, DENIED_PORT))
        .collect();
    // Deny under the shipped event settings, events rate-limited to a minimum, deny
    // events off (the kernel-side switch), and the rate limit off (every packet
    // writes an event; the ring is drained every 1,024 calls and holds 13,107),
    // interleaved.
    let shipped = Settings::default();
    let minimal = Settings::new(1, 1, 0);
    let off = Settings::new(
        shipped.events_per_second,
        shipped.events_burst,
        SETTINGS_FLAG_NO_DENY_EVENTS,
    );
    let unlimited = Settings::new(0, shipped.events_burst, 0);
    let spreads = loaded.per_call_settings(
        program,
        &denied,
        &[shipped, minimal, off, unlimited],
        "spread deny",
    )?;
    drop(denied);
    let [
        (spread_deny, spread_deny_events),
        (minimal_spread, minimal_spread_events),
        (off_spread, off_spread_events),
        (every_spread, every_spread_events),
    ] = spreads[..]
    else {
        bail!("four spread figures expected");
    };
    let spread_packets = flows.len();

    // Hot: one client in the middle of the rule set.
    loaded.clear_conntrack()?;
    let hot_client = rules / 2;
    let flows = config.new_flows.min(60_000);
    let new_frames: Vec<Vec<u8>> = (0..flows)
        .map(|index| frame(family, hot_client, 1024 + index as u16, ALLOWED_PORT))
        .collect();
    let (hot_new, hot_new_events) =
        loaded.per_call_events(program, &new_frames, true, "hot new_allow")?;
    drop(new_frames);
    let established = frame(family, hot_client, 999, ALLOWED_PORT);
    loaded.run(program, &established, 1)?;
    let (hot_established, hot_established_events) = loaded.hot_events(
        program,
        &established,
        config.hot_repeat,
        true,
        "hot established",
    )?;
    let deny = frame(family, hot_client, 999, DENIED_PORT);
    let (hot_deny, hot_deny_events) =
        loaded.hot_events(program, &deny, config.hot_repeat, false, "hot deny")?;
    // The same packets one call each, as the spread figures are taken.
    let hot_established_per_call = loaded.per_call_mean(
        program,
        &vec![established.clone(); flows],
        true,
        "hot established, per call",
    )?;
    let hot_deny_per_call = loaded.per_call_mean(
        program,
        &vec![deny.clone(); flows],
        false,
        "hot deny, per call",
    )?;

    // The event path, hot: deny again with events rate-limited to a minimum, with
    // deny events off, then with every packet writing an event.
    let repeat = format!("repeat {}, median of 3 calls", config.hot_repeat);
    let shipped_variant = DenyEventVariant {
        variant: "shipped",
        events_per_second: shipped.events_per_second,
        events_burst: shipped.events_burst,
        hot_method: repeat.clone(),
        hot: repeated(hot_deny),
        hot_events: hot_deny_events,
        spread: per_call(spread_deny),
        spread_events: spread_deny_events,
    };
    loaded.set_settings(&minimal)?;
    let (minimal_hot, minimal_hot_events) = loaded.hot_events(
        program,
        &deny,
        config.hot_repeat,
        false,
        "hot deny, events minimal",
    )?;
    let minimal_variant = DenyEventVariant {
        variant: "minimal",
        events_per_second: minimal.events_per_second,
        events_burst: minimal.events_burst,
        hot_method: repeat.clone(),
        hot: repeated(minimal_hot),
        hot_events: minimal_hot_events,
        spread: per_call(minimal_spread),
        spread_events: minimal_spread_events,
    };
    loaded.set_settings(&off)?;
    let (off_hot, off_hot_events) = loaded.hot_events(
        program,
        &deny,
        config.hot_repeat,
        false,
        "hot deny, deny events off",
    )?;
    let off_variant = DenyEventVariant {
        variant: "off",
        events_per_second: off.events_per_second,
        events_burst: off.events_burst,
        hot_method: repeat.clone(),
        hot: repeated(off_hot),
        hot_events: off_hot_events,
        spread: per_call(off_spread),
        spread_events: off_spread_events,
    };
    // Rate limit off; the ring (1 MiB, 13,107 events of 80 bytes) is drained
    // between calls of 10,000 runs.
    loaded.set_settings(&unlimited)?;
    let every_repeat = config.hot_repeat.min(10_000);
    let every_calls = (config.hot_repeat / every_repeat).clamp(3, 200) as usize;
    let (every_hot, every_hot_events) = loaded.hot_drained(
        program,
        &deny,
        every_repeat,
        every_calls,
        false,
        "hot deny, every packet an event",
    )?;
    loaded.set_settings(&shipped)?;
    let every_variant = DenyEventVariant {
        variant: "every_packet",
        events_per_second: unlimited.events_per_second,
        events_burst: unlimited.events_burst,
        hot_method: format!(
            "repeat {every_repeat}, median of {every_calls} calls, ring drained between calls"
        ),
        hot: repeated(every_hot),
        hot_events: every_hot_events,
        spread: per_call(every_spread),
        spread_events: every_spread_events,
    };
    let events = EventPathRow {
        program: program.name(),
        family: family.name(),
        rules,
        event_write_hot_ns: every_variant.hot.without_floor_ns
            - minimal_variant.hot.without_floor_ns,
        event_write_spread_ns: every_variant.spread.without_floor_ns
            - minimal_variant.spread.without_floor_ns,
        shipped_minus_minimal_hot_ns: shipped_variant.hot.without_floor_ns
            - minimal_variant.hot.without_floor_ns,
        shipped_minus_minimal_spread_ns: shipped_variant.spread.without_floor_ns
            - minimal_variant.spread.without_floor_ns,
        shipped_minus_off_hot_ns: shipped_variant.hot.without_floor_ns
            - off_variant.hot.without_floor_ns,
        shipped_minus_off_spread_ns: shipped_variant.spread.without_floor_ns
            - off_variant.spread.without_floor_ns,
        variants: vec![shipped_variant, minimal_variant, off_variant, every_variant],
    };

    let row = |case: Case,
               (hot, hot_per_call): (Figure, Figure),
               spread: Figure,
               method: String,
               hot_events: EventCounts,
               spread_events: EventCounts| CostRow {
        program: program.name(),
        family: family.name(),
        case: case.name(),
        rules,
        ns_per_packet: if case == Case::NewAllow {
            hot.without_floor_ns
        } else {
            hot.with_floor_ns
        },
        spread_ns_per_packet: spread.without_floor_ns,
        hot,
        hot_per_call,
        hot_per_call_packets: flows,
        spread,
        hot_method: method,
        spread_packets,
        hot_events,
        spread_events,
    };
    Ok((
        vec![
            row(
                Case::NewAllow,
                (per_call(hot_new), per_call(hot_new)),
                per_call(spread_new),
                format!("{flows} flows x repeat 1 (per call)"),
                hot_new_events,
                spread_new_events,
            ),
            row(
                Case::Established,
                (
                    repeated(hot_established),
                    per_call(hot_established_per_call),
                ),
                per_call(spread_established),
                repeat.clone(),
                hot_established_events,
                spread_established_events,
            ),
            row(
                Case::Deny,
                (repeated(hot_deny), per_call(hot_deny_per_call)),
                per_call(spread_deny),
                repeat,
                hot_deny_events,
                spread_deny_events,
            ),
        ],
        events,
    ))
}
