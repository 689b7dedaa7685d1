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
//! Every verdict is checked: a wrong one fails the benchmark.

use std::time::Instant;

use anyhow::{Context, bail};
use aya::maps::{HashMap, MapData, RingBuf};
use microseg::datapath::{
    AttachPoint, Datapath, DatapathState, LoadOptions, ProgramVerdict, XdpAttachMode, probe::Probe,
};
use microseg_common::{
    conntrack::{FlowKey, FlowState},
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

/// One row of the `datapath` table.
#[derive(Clone, Debug, Serialize)]
pub struct CostRow {
    pub program: &'static str,
    pub family: &'static str,
    pub case: &'static str,
    pub rules: u32,
    /// Hot figure (see the module documentation).
    pub ns_per_packet: f64,
    /// Spread figure: sources over the whole rule set, harness subtracted.
    pub spread_ns_per_packet: f64,
    /// How the hot figure was taken: "repeat N" or "N flows x repeat 1".
    pub hot_method: String,
    /// Packets in the spread figure.
    pub spread_packets: usize,
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
    fn of(&self, program: Program) -> HarnessFloor {
        match program {
            Program::Xdp => self.xdp,
            Program::Tc => self.tc,
        }
    }
}

/// Pads a frame to the 60 bytes of a minimum Ethernet frame (without FCS), like the
/// frames of the traffic test.
fn padded(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.len() < 60 {
        frame.resize(60, 0);
    }
    frame
}

fn frame(family: Family, client: u32, src_port: u16, dst_port: u16) -> Vec<u8> {
    padded(Probe::udp(family.client(client), src_port, family.server(), dst_port).to_frame())
}

/// A loaded data path at one scale, its event ring drained as it goes.
struct Loaded {
    datapath: Datapath,
    events: RingBuf<MapData>,
}

impl Loaded {
    fn drain(&mut self) {
        while self.events.next().is_some() {}
    }

    /// One run: verdict and kernel-measured ns.
    fn run(&self, program: Program, frame: &[u8], repeat: u32) -> anyhow::Result<(bool, f64)> {
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
    fn per_call_mean(
        &mut self,
        program: Program,
        frames: &[Vec<u8>],
        pass: bool,
        what: &str,
    ) -> anyhow::Result<f64> {
        let mut samples = Vec::with_capacity(frames.len());
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
        Ok(floor::trimmed_mean(&mut samples))
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

    /// Empties the conntrack table, so the next program's flows are new again.
    fn clear_conntrack(&mut self) -> anyhow::Result<()> {
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

fn verdict_name(pass: bool) -> &'static str {
    if pass { "pass" } else { "drop" }
}

/// Loads the programs sized for `rules` and applies `state`.
fn load(rules: u32, state: &DatapathState) -> anyhow::Result<(Loaded, f64, f64)> {
    let start = Instant::now();
    let mut capacities = scenario::capacities(rules);
    // Room for every flow a scale creates (hot and spread, both programs): no LRU
    // eviction inside a measurement.
    capacities.conntrack = capacities.conntrack.max(1 << 19);
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
                let rows = measure(
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
                        "  {label:>10} {:>3} {:<11} hot {:>8.1} ns   spread {:>8.1} ns",
                        row.program, row.case, row.ns_per_packet, row.spread_ns_per_packet
                    ));
                }
                results.rows.extend(rows);
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
) -> anyhow::Result<Vec<CostRow>> {
    loaded.clear_conntrack()?;
    let net = |ns: f64| (ns - floor.per_call_ns).max(0.0);

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
    let spread_new = net(loaded.per_call_mean(program, &allowed, true, "spread new_allow")?);
    let mut again = allowed;
    rng.shuffle(&mut again);
    let spread_established =
        net(loaded.per_call_mean(program, &again, true, "spread established")?);
    drop(again);
    let denied: Vec<Vec<u8>> = flows
        .iter()
        .map(|&(client, port)| frame(family, client, port, DENIED_PORT))
        .collect();
    let spread_deny = net(loaded.per_call_mean(program, &denied, false, "spread deny")?);
    let spread_packets = flows.len();
    drop(denied);

    // Hot: one client in the middle of the rule set.
    loaded.clear_conntrack()?;
    let hot_client = rules / 2;
    let flows = config.new_flows.min(60_000);
    let new_frames: Vec<Vec<u8>> = (0..flows)
        .map(|index| frame(family, hot_client, 1024 + index as u16, ALLOWED_PORT))
        .collect();
    let hot_new = net(loaded.per_call_mean(program, &new_frames, true, "hot new_allow")?);
    drop(new_frames);
    let established = frame(family, hot_client, 999, ALLOWED_PORT);
    loaded.run(program, &established, 1)?;
    let hot_established = loaded.hot(
        program,
        &established,
        config.hot_repeat,
        true,
        "hot established",
    )?;
    let deny = frame(family, hot_client, 999, DENIED_PORT);
    let hot_deny = loaded.hot(program, &deny, config.hot_repeat, false, "hot deny")?;

    let row = |case: Case, hot: f64, spread: f64, method: String| CostRow {
        program: program.name(),
        family: family.name(),
        case: case.name(),
        rules,
        ns_per_packet: hot,
        spread_ns_per_packet: spread,
        hot_method: method,
        spread_packets,
    };
    let repeat = format!("repeat {}", config.hot_repeat);
    Ok(vec![
        row(
            Case::NewAllow,
            hot_new,
            spread_new,
            format!("{flows} flows x repeat 1, harness subtracted"),
        ),
        row(
            Case::Established,
            hot_established,
            spread_established,
            repeat.clone(),
        ),
        row(Case::Deny, hot_deny, spread_deny, repeat),
    ])
}
