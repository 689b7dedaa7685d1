//! The conntrack janitor: flows recorded with an address whose meaning changed (a
//! peer that came or went, an address that became an endpoint) are marked to be
//! judged again, so that an address reused by another workload never inherits its
//! predecessor's flows. Updates that only add what is allowed leave every other
//! flow current (see `microseg_common::config::REVOCATION_ENTRIES`); this keeps
//! that exact for the flows of the addresses concerned.
//!
//! It reads the pinned table in batches (`bpf_sys::for_each_entry`) and rewrites
//! only the entries of those addresses, off the agent's lock, at most once a
//! second for all the addresses queued meanwhile.

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use aya::maps::{HashMap, Map, MapData};
use microseg_common::{
    config::slot_of,
    conntrack::{FlowKey, FlowState},
    maps,
};

use super::{DatapathError, addr::to_mapped, bpf_sys};

fn open(pin_dir: &Path, name: &str) -> Result<MapData, DatapathError> {
    let path = pin_dir.join("maps").join(name);
    MapData::from_pin(&path).map_err(|e| DatapathError::Pin {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Marks the flows recorded with any of `addresses` (as either end) to be judged
/// again at their next packet: their generation is set before the live slot's
/// revocation floor. Returns how many were marked.
pub fn mark_flows_stale(
    pin_dir: &Path,
    addresses: &BTreeSet<IpAddr>,
) -> Result<usize, DatapathError> {
    if addresses.is_empty() {
        return Ok(0);
    }
    let wanted: BTreeSet<[u8; 16]> = addresses.iter().map(|a| to_mapped(*a)).collect();
    let generation =
        aya::maps::Array::<MapData, u32>::try_from(Map::Array(open(pin_dir, maps::GENERATION)?))
            .map_err(|e| DatapathError::Map {
                map: maps::GENERATION,
                source: Box::new(e),
            })?;
    let revocation =
        aya::maps::Array::<MapData, u32>::try_from(Map::Array(open(pin_dir, maps::REVOCATION)?))
            .map_err(|e| DatapathError::Map {
                map: maps::REVOCATION,
                source: Box::new(e),
            })?;
    let live = generation.get(&0, 0).map_err(|e| DatapathError::Map {
        map: maps::GENERATION,
        source: Box::new(e),
    })?;
    let floor = revocation
        .get(&u32::from(slot_of(live)), 0)
        .map_err(|e| DatapathError::Map {
            map: maps::REVOCATION,
            source: Box::new(e),
        })?;
    let data = open(pin_dir, maps::CONNTRACK)?;
    let mut found: Vec<(FlowKey, FlowState)> = Vec::new();
    {
        use std::os::fd::AsFd;
        bpf_sys::for_each_entry(
            data.fd().as_fd(),
            std::mem::size_of::<FlowKey>(),
            std::mem::size_of::<FlowState>(),
            |key, value| {
                // SAFETY: the kernel wrote a whole key and value of these plain-old-data
                // types (their sizes are the map's: checked at load); read unaligned
                // from the byte buffers.
                let key: FlowKey = unsafe { std::ptr::read_unaligned(key.as_ptr().cast()) };
                if wanted.contains(&key.addr_a) || wanted.contains(&key.addr_b) {
                    // SAFETY: as above, for the value.
                    let state: FlowState =
                        unsafe { std::ptr::read_unaligned(value.as_ptr().cast()) };
                    found.push((key, state));
                }
            },
        )
        .map_err(|source| DatapathError::Kernel {
            what: "reading the conntrack table".into(),
            source,
        })?;
    }
    let mut table = HashMap::<MapData, FlowKey, FlowState>::try_from(Map::LruHashMap(data))
        .map_err(|e| DatapathError::Map {
            map: maps::CONNTRACK,
            source: Box::new(e),
        })?;
    let stale = floor.wrapping_sub(1);
    let mut marked = 0;
    for (key, mut state) in found {
        state.generation = stale;
        // BPF_EXIST: a flow gone meanwhile is not brought back.
        if table.insert(key, state, 2).is_ok() {
            marked += 1;
        }
    }
    Ok(marked)
}
