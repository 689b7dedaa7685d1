//! Typed handles on the data path's maps. Writers check capacity before writing, so a
//! full map is an error naming the map, never a silent partial write.

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
};
use microseg_common::{
    AddrKey,
    config::{GENERATION_INDEX_BOUND, Settings},
    conntrack::{FlowKey, FlowState},
    counters::{COUNTER_SLOTS, Counter},
    drop_reason::{DROP_REASON_SLOTS, DropReason},
    endpoint::EndpointInfo,
    fragment::{FragmentKey, FragmentPorts},
    identity::{PeerIdentity, PrefixKeyData},
    interface::{InterfaceBinding, InterfaceKey},
    maps,
    policy::{PolicyEntry, PolicyKeyData},
    rule_hits::RuleHits,
};

use super::DatapathError;

/// Handles on every map of a loaded `Datapath`.
pub struct DatapathMaps<'a> {
    pub endpoints: HashMap<&'a mut MapData, AddrKey, EndpointInfo>,
    pub peer_hosts: HashMap<&'a mut MapData, AddrKey, PeerIdentity>,
    pub peer_prefixes: LpmTrie<&'a mut MapData, PrefixKeyData, PeerIdentity>,
    pub policy: LpmTrie<&'a mut MapData, PolicyKeyData, PolicyEntry>,
    pub policy_exact: HashMap<&'a mut MapData, PolicyKeyData, PolicyEntry>,
    pub generation: Array<&'a mut MapData, u32>,
    pub revocation: Array<&'a mut MapData, u32>,
    pub settings: Array<&'a mut MapData, Settings>,
    pub counters: PerCpuArray<&'a mut MapData, u64>,
    pub drops_by_reason: PerCpuArray<&'a mut MapData, u64>,
    pub conntrack: HashMap<&'a mut MapData, FlowKey, FlowState>,
    pub fragments: HashMap<&'a mut MapData, FragmentKey, FragmentPorts>,
    pub interfaces: HashMap<&'a mut MapData, InterfaceKey, InterfaceBinding>,
    pub rule_hits: PerCpuArray<&'a mut MapData, RuleHits>,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map {
        map,
        source: Box::new(source),
    }
}

impl<'a> DatapathMaps<'a> {
    pub(super) fn new(ebpf: &'a mut Ebpf) -> Result<Self, DatapathError> {
        let [
            endpoints,
            peer_hosts,
            peer_prefixes,
            policy,
            policy_exact,
            generation,
            revocation,
            settings,
            counters,
            drops_by_reason,
            conntrack,
            fragments,
            interfaces,
            rule_hits,
        ] = ebpf.maps_disjoint_mut([
            maps::ENDPOINTS,
            maps::PEER_HOSTS,
            maps::PEER_PREFIXES,
            maps::POLICY,
            maps::POLICY_EXACT,
            maps::GENERATION,
            maps::REVOCATION,
            maps::SETTINGS,
            maps::COUNTERS,
            maps::DROPS_BY_REASON,
            maps::CONNTRACK,
            maps::FRAGMENTS,
            maps::INTERFACES,
            maps::RULE_HITS,
        ]);
        let missing = |name: &str| DatapathError::MissingMap(name.to_owned());
        Ok(Self {
            endpoints: HashMap::try_from(endpoints.ok_or_else(|| missing(maps::ENDPOINTS))?)
                .map_err(map_err(maps::ENDPOINTS))?,
            peer_hosts: HashMap::try_from(peer_hosts.ok_or_else(|| missing(maps::PEER_HOSTS))?)
                .map_err(map_err(maps::PEER_HOSTS))?,
            peer_prefixes: LpmTrie::try_from(
                peer_prefixes.ok_or_else(|| missing(maps::PEER_PREFIXES))?,
            )
            .map_err(map_err(maps::PEER_PREFIXES))?,
            policy: LpmTrie::try_from(policy.ok_or_else(|| missing(maps::POLICY))?)
                .map_err(map_err(maps::POLICY))?,
            policy_exact: HashMap::try_from(
                policy_exact.ok_or_else(|| missing(maps::POLICY_EXACT))?,
            )
            .map_err(map_err(maps::POLICY_EXACT))?,
            generation: Array::try_from(generation.ok_or_else(|| missing(maps::GENERATION))?)
                .map_err(map_err(maps::GENERATION))?,
            revocation: Array::try_from(revocation.ok_or_else(|| missing(maps::REVOCATION))?)
                .map_err(map_err(maps::REVOCATION))?,
            settings: Array::try_from(settings.ok_or_else(|| missing(maps::SETTINGS))?)
                .map_err(map_err(maps::SETTINGS))?,
            counters: PerCpuArray::try_from(counters.ok_or_else(|| missing(maps::COUNTERS))?)
                .map_err(map_err(maps::COUNTERS))?,
            drops_by_reason: PerCpuArray::try_from(
                drops_by_reason.ok_or_else(|| missing(maps::DROPS_BY_REASON))?,
            )
            .map_err(map_err(maps::DROPS_BY_REASON))?,
            conntrack: HashMap::try_from(conntrack.ok_or_else(|| missing(maps::CONNTRACK))?)
                .map_err(map_err(maps::CONNTRACK))?,
            fragments: HashMap::try_from(fragments.ok_or_else(|| missing(maps::FRAGMENTS))?)
                .map_err(map_err(maps::FRAGMENTS))?,
            interfaces: HashMap::try_from(interfaces.ok_or_else(|| missing(maps::INTERFACES))?)
                .map_err(map_err(maps::INTERFACES))?,
            rule_hits: PerCpuArray::try_from(rule_hits.ok_or_else(|| missing(maps::RULE_HITS))?)
                .map_err(map_err(maps::RULE_HITS))?,
        })
    }

    pub fn live_generation(&self) -> Result<u32, DatapathError> {
        self.generation
            .get(&0, 0)
            .map_err(map_err(maps::GENERATION))
    }

    /// Switches the data path to `generation`: one 4-byte write.
    pub fn set_live_generation(&mut self, generation: u32) -> Result<(), DatapathError> {
        self.generation
            .set(0, generation, 0)
            .map_err(map_err(maps::GENERATION))
    }

    /// Sets generation slot `slot`'s mark (`SLOT_MARK_*` bits, see
    /// `microseg_common::config`); a no-op on a map pinned by an older agent, which
    /// has no marks (the programs then always look bindings up).
    pub fn set_slot_mark(&mut self, slot: u8, mark: u32) -> Result<(), DatapathError> {
        match self
            .generation
            .set(GENERATION_INDEX_BOUND + u32::from(slot), mark, 0)
        {
            Err(aya::maps::MapError::OutOfBounds { .. }) => Ok(()),
            other => other.map_err(map_err(maps::GENERATION)),
        }
    }

    /// The oldest generation whose flows are current while `slot` is live (see
    /// `microseg_common::config::REVOCATION_ENTRIES`).
    pub fn revocation_floor(&self, slot: u8) -> Result<u32, DatapathError> {
        self.revocation
            .get(&u32::from(slot), 0)
            .map_err(map_err(maps::REVOCATION))
    }

    pub fn set_revocation_floor(&mut self, slot: u8, floor: u32) -> Result<(), DatapathError> {
        self.revocation
            .set(u32::from(slot), floor, 0)
            .map_err(map_err(maps::REVOCATION))
    }

    pub fn settings(&self) -> Result<Settings, DatapathError> {
        self.settings.get(&0, 0).map_err(map_err(maps::SETTINGS))
    }

    pub fn set_settings(&mut self, settings: &Settings) -> Result<(), DatapathError> {
        self.settings
            .set(0, settings, 0)
            .map_err(map_err(maps::SETTINGS))
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<CounterSnapshot, DatapathError> {
        read_counters(&self.counters, &self.drops_by_reason)
    }

    /// Entries per map (both generation slots) and each map's capacity, counted by
    /// walking the maps: exact, but it costs a syscall per entry.
    pub fn usage(&self) -> Result<Vec<MapUsage>, DatapathError> {
        let entries = [
            self.endpoints.keys().count(),
            self.peer_hosts.keys().count(),
            self.peer_prefixes.keys().count(),
            self.policy.keys().count(),
            self.policy_exact.keys().count(),
            self.conntrack.keys().count(),
            self.fragments.keys().count(),
            self.interfaces.keys().count(),
        ];
        Ok(self
            .capacities()?
            .into_iter()
            .zip(entries)
            .map(|((map, capacity), entries)| MapUsage {
                map,
                entries,
                capacity,
            })
            .collect())
    }

    /// Capacity of each map that grows with policy or traffic, in `usage` order.
    pub fn capacities(&self) -> Result<Vec<(&'static str, usize)>, DatapathError> {
        Ok(vec![
            (
                maps::ENDPOINTS,
                capacity_of(maps::ENDPOINTS, self.endpoints.map())?,
            ),
            (
                maps::PEER_HOSTS,
                capacity_of(maps::PEER_HOSTS, self.peer_hosts.map())?,
            ),
            (
                maps::PEER_PREFIXES,
                capacity_of(maps::PEER_PREFIXES, self.peer_prefixes.map())?,
            ),
            (maps::POLICY, capacity_of(maps::POLICY, self.policy.map())?),
            (
                maps::POLICY_EXACT,
                capacity_of(maps::POLICY_EXACT, self.policy_exact.map())?,
            ),
            (
                maps::CONNTRACK,
                capacity_of(maps::CONNTRACK, self.conntrack.map())?,
            ),
            (
                maps::FRAGMENTS,
                capacity_of(maps::FRAGMENTS, self.fragments.map())?,
            ),
            (
                maps::INTERFACES,
                capacity_of(maps::INTERFACES, self.interfaces.map())?,
            ),
        ])
    }
}

/// The per-CPU counters of `counters` and `drops_by_reason` maps, summed.
pub fn read_counters<T: std::borrow::Borrow<MapData>>(
    counters: &PerCpuArray<T, u64>,
    drops_by_reason: &PerCpuArray<T, u64>,
) -> Result<CounterSnapshot, DatapathError> {
    let mut snapshot = CounterSnapshot::default();
    for index in 0..COUNTER_SLOTS {
        let values = counters.get(&index, 0).map_err(map_err(maps::COUNTERS))?;
        snapshot.by_slot[index as usize] = values.iter().sum();
    }
    for code in 0..DROP_REASON_SLOTS {
        let values = drops_by_reason
            .get(&code, 0)
            .map_err(map_err(maps::DROPS_BY_REASON))?;
        snapshot.drops_by_reason[code as usize] = values.iter().sum();
    }
    Ok(snapshot)
}

/// Used and total entries of a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: usize,
}

impl MapUsage {
    /// Entries over capacity, as Cilium's `bpf_map_pressure` (1 = full).
    pub fn pressure(&self) -> f64 {
        self.entries as f64 / self.capacity.max(1) as f64
    }

    /// The map's name as metrics label it (`map_name="conntrack"`).
    pub fn label(&self) -> String {
        self.map.to_ascii_lowercase()
    }
}

/// Entries of the hash map (LRU included) `data`, counted with batched lookups
/// (BPF_MAP_LOOKUP_BATCH: one syscall per 8,192 entries, where a walk of its keys
/// costs two per entry).
pub fn count_entries<K, V>(map: &'static str, data: &MapData) -> Result<u64, DatapathError> {
    use std::os::fd::AsFd;
    super::bpf_sys::count_entries(
        data.fd().as_fd(),
        std::mem::size_of::<K>(),
        std::mem::size_of::<V>(),
    )
    .map_err(|source| DatapathError::Kernel {
        what: format!("counting the entries of {map}"),
        source,
    })
}

pub(super) fn capacity_of(map: &'static str, data: &MapData) -> Result<usize, DatapathError> {
    Ok(data.info().map_err(map_err(map))?.max_entries() as usize)
}

/// The data path's counters at one moment, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSnapshot {
    by_slot: [u64; COUNTER_SLOTS as usize],
    drops_by_reason: [u64; DROP_REASON_SLOTS as usize],
}

impl Default for CounterSnapshot {
    fn default() -> Self {
        Self {
            by_slot: [0; COUNTER_SLOTS as usize],
            drops_by_reason: [0; DROP_REASON_SLOTS as usize],
        }
    }
}

impl CounterSnapshot {
    pub fn get(&self, counter: Counter) -> u64 {
        self.by_slot[counter.index() as usize]
    }
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops_by_reason[reason.code() as usize]
    }
    /// Events not delivered: ring buffer full plus rate limited.
    pub fn events_lost(&self) -> u64 {
        self.get(Counter::EventsLostRingFull) + self.get(Counter::EventsLostRateLimit)
    }
}

/// An LPM key for `PEER_PREFIXES` from an address prefix in mapped form.
pub fn prefix_key(slot: u8, prefix: &ipnet::IpNet) -> Key<PrefixKeyData> {
    let (addr, bits) = super::addr::mapped_prefix(prefix);
    Key::new(
        microseg_common::identity::PREFIX_KEY_FIXED_BITS + bits,
        PrefixKeyData::new(slot, addr),
    )
}
