//! Memory: this process's resident set (VmRSS, VmHWM from /proc/self/status) and the
//! kernel memory of the BPF maps it holds (`memlock` of every map fd in
//! /proc/self/fdinfo, each map counted once).

use std::collections::BTreeMap;

use serde::Serialize;

/// Gives freed heap back to the kernel, as the agent does after every apply
/// (`malloc_trim`), so that VmRSS is what is held, not what a compile once used
/// (VmHWM keeps that).
pub fn return_free_memory() {
    // SAFETY: malloc_trim takes no pointers; it only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// VmRSS and VmHWM of this process, in KiB.
pub fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One BPF map held by this process.
#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    pub name: String,
    pub map_id: u32,
    pub map_type: u32,
    pub max_entries: u64,
    pub memlock_bytes: u64,
}

/// Every BPF map this process holds an fd of, by map id.
pub fn bpf_maps() -> BTreeMap<u32, MapMemory> {
    let mut maps = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc/self/fdinfo") else {
        return maps;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().parse().ok())
        };
        // Only map fds have map_type and map_id.
        let (Some(map_type), Some(map_id)) = (field("map_type:"), field("map_id:")) else {
            continue;
        };
        maps.insert(
            map_id as u32,
            MapMemory {
                name: aya::maps::MapInfo::from_id(map_id as u32)
                    .ok()
                    .and_then(|info| info.name_as_str().map(str::to_owned))
                    .unwrap_or_default(),
                map_id: map_id as u32,
                map_type: map_type as u32,
                max_entries: field("max_entries:").unwrap_or(0),
                memlock_bytes: field("memlock:").unwrap_or(0),
            },
        );
    }
    maps
}

/// Total kernel memory of the maps in `after` that are not in `before`.
pub fn new_map_bytes(
    before: &BTreeMap<u32, MapMemory>,
    after: &BTreeMap<u32, MapMemory>,
) -> (u64, Vec<MapMemory>) {
    let new: Vec<MapMemory> = after
        .iter()
        .filter(|(id, _)| !before.contains_key(id))
        .map(|(_, map)| map.clone())
        .collect();
    (new.iter().map(|map| map.memlock_bytes).sum(), new)
}

/// Memory at one scale.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleMemory {
    pub family: &'static str,
    pub rules: u32,
    /// This process's VmRSS after compiling and applying the state, holding what the
    /// agent holds while enforcing it (policy set, compiler tables, state; freed heap
    /// returned as the agent returns it), and its growth since the benchmark
    /// started. The agent's raw objects are not counted.
    pub agent_rss_kib: u64,
    pub agent_rss_delta_kib: i64,
    pub agent_peak_rss_kib: u64,
    /// Kernel memory (memlock) of microseg's maps at this scale, all maps together,
    /// and the largest ones.
    pub bpf_map_bytes: u64,
    /// The policy-bearing maps only: ENDPOINTS, PEER_HOSTS, PEER_PREFIXES, POLICY.
    pub policy_map_bytes: u64,
    pub bpf_maps: Vec<MapMemory>,
}

/// Sum of the policy-bearing maps among `maps`.
pub fn policy_bytes(maps: &[MapMemory]) -> u64 {
    maps.iter()
        .filter(|map| {
            matches!(
                map.name.as_str(),
                "ENDPOINTS" | "PEER_HOSTS" | "PEER_PREFIXES" | "POLICY"
            )
        })
        .map(|map| map.memlock_bytes)
        .sum()
}
