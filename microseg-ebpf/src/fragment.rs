//! Ports of fragmented datagrams: a first fragment's ports, remembered for the later
//! fragments, which carry no transport header.

use aya_ebpf::{macros::map, maps::LruHashMap};
use microseg_common::{
    fragment::{FragmentKey, FragmentPorts},
    maps::FRAGMENTS_CAPACITY,
};

use crate::parse::PacketInfo;

#[map]
static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> =
    LruHashMap::with_max_entries(FRAGMENTS_CAPACITY, 0);

/// Out of line: its key would otherwise take stack in the decision's frame.
#[inline(never)]
pub fn remember(info: &PacketInfo, id: u32) {
    let key = FragmentKey::new(info.src, info.dst, id, info.protocol);
    let ports = FragmentPorts {
        src_port: info.src_port,
        dst_port: info.dst_port,
    };
    // A full LRU map evicts its oldest entry; insertion only fails on kernel memory
    // pressure, and then the later fragments are dropped as headless: safe.
    let _ = FRAGMENTS.insert(&key, &ports, 0);
}

#[inline(always)]
pub fn ports_of(info: &PacketInfo, id: u32) -> Option<FragmentPorts> {
    let key = FragmentKey::new(info.src, info.dst, id, info.protocol);
    // SAFETY: the value is copied out at once.
    unsafe { FRAGMENTS.get(&key) }.copied()
}
