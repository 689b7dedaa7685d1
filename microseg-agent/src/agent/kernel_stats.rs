//! What metrics and `microseg stats` read from the kernel, without the agent's lock:
//! handles of their own on the pinned counter maps, map capacities read once, and the
//! number of tracked flows and fragments counted every 5 s by a thread of their own
//! with batched lookups (BPF_MAP_LOOKUP_BATCH, 8,192 entries a syscall: a full table
//! of a million flows in about 120 calls), so no scrape ever waits for a count.
//! Policy-bearing maps are not walked: both generation slots hold the enforced
//! state, whose size the agent knows.

use std::{
    path::Path,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use microseg_common::{
    conntrack::{FlowKey, FlowState},
    fragment::{FragmentKey, FragmentPorts},
    maps,
};

use crate::datapath::{
    StateCounts,
    maps::{CounterSnapshot, MapUsage, count_entries, read_counters},
};

/// How often tracked flows are counted.
const COUNT_EVERY: Duration = Duration::from_secs(5);

pub struct KernelStats {
    counters: Mutex<(PerCpuArray<MapData, u64>, PerCpuArray<MapData, u64>)>,
    generation: Mutex<Array<MapData, u32>>,
    /// (map, capacity), in the order of `DatapathMaps::capacities`.
    capacities: Vec<(&'static str, usize)>,
    /// Entries of CONNTRACK and FRAGMENTS at the last count.
    pub tracked_flows: Arc<AtomicU64>,
    pub tracked_fragments: Arc<AtomicU64>,
    /// Seconds since the Unix epoch of the last count (0: none yet).
    pub counted_at: Arc<AtomicU64>,
}

fn open(pin_dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_dir.join("maps").join(name);
    MapData::from_pin(&path).map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))
}

impl KernelStats {
    /// Opens the pinned maps under `pin_dir` and starts counting tracked flows.
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let counters = PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::COUNTERS)?))?;
        let drops = PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::DROPS_BY_REASON)?))?;
        let generation = Array::try_from(Map::Array(open(pin_dir, maps::GENERATION)?))?;
        let mut capacities = Vec::new();
        for name in [
            maps::ENDPOINTS,
            maps::PEER_HOSTS,
            maps::PEER_PREFIXES,
            maps::POLICY,
            maps::POLICY_EXACT,
            maps::CONNTRACK,
            maps::FRAGMENTS,
            maps::INTERFACES,
        ] {
            let info = open(pin_dir, name)?.info()?;
            capacities.push((name, info.max_entries() as usize));
        }
        let stats = Self {
            counters: Mutex::new((counters, drops)),
            generation: Mutex::new(generation),
            capacities,
            tracked_flows: Arc::new(AtomicU64::new(0)),
            tracked_fragments: Arc::new(AtomicU64::new(0)),
            counted_at: Arc::new(AtomicU64::new(0)),
        };
        let conntrack = open(pin_dir, maps::CONNTRACK)?;
        let fragments = open(pin_dir, maps::FRAGMENTS)?;
        let (flows, pieces, counted_at) = (
            stats.tracked_flows.clone(),
            stats.tracked_fragments.clone(),
            stats.counted_at.clone(),
        );
        std::thread::Builder::new()
            .name("microseg-flow-count".into())
            .spawn(move || {
                let mut reported = false;
                loop {
                    let counts = (
                        count_entries::<FlowKey, FlowState>(maps::CONNTRACK, &conntrack),
                        count_entries::<FragmentKey, FragmentPorts>(maps::FRAGMENTS, &fragments),
                    );
                    match counts {
                        (Ok(tracked), Ok(pieces_now)) => {
                            flows.store(tracked, Ordering::Relaxed);
                            pieces.store(pieces_now, Ordering::Relaxed);
                            let now = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs());
                            counted_at.store(now, Ordering::Relaxed);
                        }
                        (Err(e), _) | (_, Err(e)) if !reported => {
                            tracing::warn!("tracked flows cannot be counted: {e}");
                            reported = true;
                        }
                        _ => {}
                    }
                    std::thread::sleep(COUNT_EVERY);
                }
            })?;
        Ok(stats)
    }

    pub fn counters(&self) -> Option<CounterSnapshot> {
        let handles = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        read_counters(&handles.0, &handles.1).ok()
    }

    pub fn live_generation(&self) -> u32 {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&0, 0)
            .unwrap_or(0)
    }

    /// The conntrack table at the last count: entries and capacity.
    pub fn conntrack_usage(&self) -> MapUsage {
        let capacity = self
            .capacities
            .iter()
            .find(|(map, _)| *map == maps::CONNTRACK)
            .map_or(0, |(_, capacity)| *capacity);
        MapUsage {
            map: maps::CONNTRACK,
            entries: self.tracked_flows.load(Ordering::Relaxed) as usize,
            capacity,
        }
    }

    /// Entries and capacity of every map that grows: policy-bearing maps from the
    /// enforced state's `counts` (both slots), tracking maps from the last count.
    pub fn usage(&self, counts: &StateCounts) -> Vec<MapUsage> {
        let entries = [
            2 * counts.endpoints,
            2 * counts.peer_hosts,
            2 * counts.peer_prefixes,
            2 * (counts.policy - counts.policy_exact),
            2 * counts.policy_exact,
            self.tracked_flows.load(Ordering::Relaxed) as usize,
            self.tracked_fragments.load(Ordering::Relaxed) as usize,
            2 * counts.interfaces,
        ];
        self.capacities
            .iter()
            .zip(entries)
            .map(|(&(map, capacity), entries)| MapUsage {
                map,
                entries,
                capacity,
            })
            .collect()
    }
}
