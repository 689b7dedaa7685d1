//! Connection tracking: flows allowed under the live policy generation pass without a
//! policy lookup, and so do their replies.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::LruHashMap};
use microseg_common::{
    conntrack::{
        FLOW_ORIGIN_A, FLOW_ORIGIN_B, FLOW_REFRESH_NS, FLOW_TIMEOUT_OTHER_NS, FLOW_TIMEOUT_TCP_NS,
        FlowKey, FlowState,
    },
    maps::CONNTRACK_CAPACITY,
};

use crate::parse::{PROTO_TCP, PacketInfo};

#[map]
static CONNTRACK: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(CONNTRACK_CAPACITY, 0);

/// A packet's flow: its normalised key and which side sent this packet.
pub struct Flow {
    pub key: FlowKey,
    pub sender: u8,
}

/// What conntrack knows of a packet's flow.
pub enum Tracked {
    /// No live entry: judge by policy in the packet's own direction.
    New,
    /// Allowed under the live generation: pass.
    Current,
    /// Allowed under an older generation: judge again, in the direction of the
    /// flow's first packet (`is_reply` = this packet goes the other way).
    Stale { is_reply: bool },
}

#[inline(always)]
pub fn flow_of(info: &PacketInfo, src_port: u16, dst_port: u16) -> Flow {
    flow_between(&info.src, src_port, &info.dst, dst_port, info.protocol)
}

/// The flow of a packet from `src:src_port` to `dst:dst_port`.
#[inline(always)]
pub fn flow_between(
    src: &[u8; 16],
    src_port: u16,
    dst: &[u8; 16],
    dst_port: u16,
    protocol: u8,
) -> Flow {
    if side_of(src, src_port, dst, dst_port) == FLOW_ORIGIN_A {
        Flow {
            key: FlowKey::new(*src, src_port, *dst, dst_port, protocol),
            sender: FLOW_ORIGIN_A,
        }
    } else {
        Flow {
            key: FlowKey::new(*dst, dst_port, *src, src_port, protocol),
            sender: FLOW_ORIGIN_B,
        }
    }
}

/// Which side of its flow a packet from `src:src_port` to `dst:dst_port` comes from.
#[inline(always)]
pub fn side_of(src: &[u8; 16], src_port: u16, dst: &[u8; 16], dst_port: u16) -> u8 {
    if sorts_before(src, src_port, dst, dst_port) {
        FLOW_ORIGIN_A
    } else {
        FLOW_ORIGIN_B
    }
}

/// Whether the flow with this (normalised) key is tracked as allowed under the live
/// generation.
#[inline(always)]
pub fn key_is_current(key: &FlowKey, generation: u32) -> bool {
    // SAFETY: the value is copied out at once.
    match unsafe { CONNTRACK.get(key) } {
        Some(state) => state.generation == generation,
        None => false,
    }
}

#[inline(always)]
pub fn lookup(flow: &Flow, generation: u32, now_ns: u64) -> Tracked {
    let Some(state) = CONNTRACK.get_ptr_mut(&flow.key) else {
        return Tracked::New;
    };
    // SAFETY: the pointer comes from a successful LRU lookup and stays valid while the
    // program runs (RCU); fields are plain integers, racing updates only lose a refresh.
    let state = unsafe { &mut *state };
    let timeout = if flow.key.protocol == PROTO_TCP {
        FLOW_TIMEOUT_TCP_NS
    } else {
        FLOW_TIMEOUT_OTHER_NS
    };
    let idle = now_ns.saturating_sub(state.last_seen_ns);
    if idle > timeout {
        return Tracked::New;
    }
    if state.generation != generation {
        return Tracked::Stale {
            is_reply: state.origin != flow.sender,
        };
    }
    if idle > FLOW_REFRESH_NS {
        state.last_seen_ns = now_ns;
    }
    Tracked::Current
}

/// Records that the flow is allowed under `generation`. A re-judged flow keeps its
/// origin; a new one starts with this packet's sender.
#[inline(always)]
pub fn record_allowed(flow: &Flow, tracked: &Tracked, generation: u32, now_ns: u64) {
    let origin = match tracked {
        Tracked::Stale { is_reply: true } => flow.sender ^ 1,
        _ => flow.sender,
    };
    // A full LRU map evicts the least recently used flow; that flow is judged by
    // policy again on its next packet, which is safe.
    let _ = CONNTRACK.insert(&flow.key, &FlowState::new(generation, origin, now_ns), 0);
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Lexicographic (address, port) order that picks side A of a flow.
#[inline(always)]
fn sorts_before(a: &[u8; 16], a_port: u16, b: &[u8; 16], b_port: u16) -> bool {
    let (a_hi, a_lo) = halves(a);
    let (b_hi, b_lo) = halves(b);
    if a_hi != b_hi {
        return a_hi < b_hi;
    }
    if a_lo != b_lo {
        return a_lo < b_lo;
    }
    a_port <= b_port
}

#[inline(always)]
fn halves(addr: &[u8; 16]) -> (u64, u64) {
    let hi = [
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ];
    let lo = [
        addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
    ];
    (u64::from_be_bytes(hi), u64::from_be_bytes(lo))
}
