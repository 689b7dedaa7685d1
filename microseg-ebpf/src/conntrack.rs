//! Connection tracking: flows allowed under the live policy generation pass without a
//! policy lookup, and so do their replies. TCP connections are followed through
//! opening, established, half-closed and closed, each stage with its own idle
//! lifetime (`Settings::lifetimes`); a bare SYN always opens a new connection.
//! ICMP queries are tracked per (request type, identifier); other ICMP messages are
//! not tracked (see `microseg_common::conntrack`).

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, macros::map, maps::LruHashMap};
use microseg_common::{
    config::ConntrackLifetimes,
    conntrack::{
        FLOW_ORIGIN_A, FLOW_ORIGIN_B, FLOW_REFRESH_NS, FlowKey, FlowStage, FlowState,
        flow_seen_after,
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
#[derive(Clone, Copy)]
pub enum Tracked {
    /// No live entry (or the packet opens a new connection): judge by policy in the
    /// packet's own direction.
    New,
    /// The packet continues a flow (a TCP segment other than a bare SYN, an ICMP
    /// query's reply) and no entry has it at all: the flow was evicted from the full
    /// LRU map, or began before it was tracked. Judged as `New`, and counted.
    Lost,
    /// The packet continues a flow whose entry outlived its idle lifetime. Judged as
    /// `New`, and counted apart from `Lost`.
    Expired,
    /// Allowed under the live generation: pass, counted in the allowing rule's
    /// hit slot.
    Current { hit_slot: u16 },
    /// Allowed under an older generation: judge again, in the direction of the
    /// flow's first packet (`is_reply` = this packet goes the other way). `seen` is
    /// what the entry knew of the connection.
    Stale { is_reply: bool, seen: u8 },
}

/// Writes the packet's flow into `flow`. Out of line: ordering and copying two
/// 16-byte addresses takes many registers, whose spills would otherwise grow the
/// decision's stack frame.
#[inline(never)]
pub fn flow_of(info: &PacketInfo, src_port: u16, dst_port: u16, flow: &mut Flow) {
    *flow = flow_between(
        &info.src,
        src_port,
        &info.dst,
        dst_port,
        info.protocol,
        info.icmp_query,
    );
}

/// The flow of a packet from `src:src_port` to `dst:dst_port`.
#[inline(always)]
pub fn flow_between(
    src: &[u8; 16],
    src_port: u16,
    dst: &[u8; 16],
    dst_port: u16,
    protocol: u8,
    icmp_query: u8,
) -> Flow {
    if side_of(src, src_port, dst, dst_port) == FLOW_ORIGIN_A {
        Flow {
            key: FlowKey::new(*src, src_port, *dst, dst_port, protocol, icmp_query),
            sender: FLOW_ORIGIN_A,
        }
    } else {
        Flow {
            key: FlowKey::new(*dst, dst_port, *src, src_port, protocol, icmp_query),
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

/// Which recorded flows are current: those allowed under a generation from `floor`
/// (the last update that revoked anything) to `live` (see
/// `microseg_common::config::REVOCATION_ENTRIES`).
#[derive(Clone, Copy)]
pub struct Currency {
    pub live: u32,
    pub floor: u32,
}

impl Currency {
    #[inline(always)]
    pub fn admits(&self, recorded: u32) -> bool {
        microseg_common::config::flow_is_current(recorded, self.live, self.floor)
    }
}

/// Whether the flow with this (normalised) key is tracked as allowed and current.
#[inline(always)]
pub fn key_is_current(key: &FlowKey, currency: Currency) -> bool {
    // SAFETY: the value is copied out at once.
    match unsafe { CONNTRACK.get(key) } {
        Some(state) => currency.admits(state.generation),
        None => false,
    }
}

/// Looks the packet's flow up; a flow allowed and current (`currency`) has this
/// packet's TCP flags (and direction) recorded. `opens` = the packet starts a new
/// connection (a bare TCP SYN, an ICMP query request): it is never a reply.
#[inline(always)]
pub fn lookup(
    flow: &Flow,
    info: &PacketInfo,
    opens: bool,
    currency: Currency,
    lifetimes: &ConntrackLifetimes,
    now_ns: u64,
) -> Tracked {
    if opens {
        return Tracked::New;
    }
    let continues = info.protocol == PROTO_TCP || info.is_icmp_query_reply();
    let Some(state) = CONNTRACK.get_ptr_mut(&flow.key) else {
        return if continues {
            Tracked::Lost
        } else {
            Tracked::New
        };
    };
    // SAFETY: the pointer comes from a successful LRU lookup and stays valid while the
    // program runs (RCU); fields are plain integers, racing updates only lose a refresh.
    let state = unsafe { &mut *state };
    let stage = FlowStage::of(flow.key.protocol, state.seen);
    let idle = now_ns.saturating_sub(state.last_seen_ns);
    if idle > lifetimes.of(stage) {
        return if continues {
            Tracked::Expired
        } else {
            Tracked::New
        };
    }
    let is_reply = state.origin != flow.sender;
    if !currency.admits(state.generation) {
        return Tracked::Stale {
            is_reply,
            seen: state.seen,
        };
    }
    let seen = flow_seen_after(flow.key.protocol, state.seen, !is_reply, info.tcp_flags);
    if seen != state.seen {
        state.seen = seen;
        state.last_seen_ns = now_ns;
    } else if idle > FLOW_REFRESH_NS && stage != FlowStage::TcpClosed {
        // A closed connection is not kept alive by stray segments.
        state.last_seen_ns = now_ns;
    }
    Tracked::Current {
        hit_slot: state.hit_slot,
    }
}

/// Whether this opening packet (a bare SYN, an ICMP query request) was already allowed under
/// `generation` and is still unanswered: the same packet seen again at a second hook
/// of this node (or its retransmission). It is judged again all the same; only its
/// event and its count as a new flow are not repeated.
#[inline(always)]
pub fn opening_already_allowed(
    flow: &Flow,
    generation: u32,
    lifetimes: &ConntrackLifetimes,
    now_ns: u64,
) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(state) = (unsafe { CONNTRACK.get(&flow.key) }) else {
        return false;
    };
    let stage = FlowStage::of(flow.key.protocol, state.seen);
    state.generation == generation
        && state.origin == flow.sender
        && state.seen & microseg_common::conntrack::FLOW_SEEN_REPLY == 0
        && now_ns.saturating_sub(state.last_seen_ns) <= lifetimes.of(stage)
}

/// Records that the flow is allowed under `generation`, its packets counted in
/// `hit_slot`. A re-judged flow keeps its origin and what was seen of it; a new one
/// starts with this packet's sender.
#[inline(always)]
pub fn record_allowed(
    flow: &Flow,
    info: &PacketInfo,
    tracked: &Tracked,
    generation: u32,
    hit_slot: u16,
    now_ns: u64,
) {
    let (origin, seen) = match tracked {
        Tracked::Stale { is_reply, seen } => {
            let origin = if *is_reply {
                flow.sender ^ 1
            } else {
                flow.sender
            };
            (origin, *seen)
        }
        // A TCP segment other than a bare SYN joins a connection already under way
        // (its entry expired or was evicted): take it as established.
        _ if info.protocol == PROTO_TCP && !opens_tcp(info) => {
            (flow.sender, microseg_common::conntrack::FLOW_SEEN_REPLY)
        }
        _ => (flow.sender, 0),
    };
    let from_origin = origin == flow.sender;
    let seen = flow_seen_after(flow.key.protocol, seen, from_origin, info.tcp_flags);
    // A full LRU map evicts the least recently used flow; that flow is judged by
    // policy again on its next packet, which is safe.
    let _ = CONNTRACK.insert(
        &flow.key,
        &FlowState::new(generation, origin, seen, now_ns).with_hit_slot(hit_slot),
        0,
    );
}

/// A bare TCP SYN.
#[inline(always)]
pub fn opens_tcp(info: &PacketInfo) -> bool {
    microseg_common::conntrack::is_tcp_open(info.protocol, info.tcp_flags)
}

/// Conntrack's clock: CLOCK_MONOTONIC as of the last timer tick (1/HZ: 4 ms at the
/// HZ=250 of the machines measured), which costs a few ns where bpf_ktime_get_ns
/// costs ~20 ns (measured through the benchmark's harness). Lifetimes are whole
/// seconds and refreshes once a second, so a tick's lag is within their precision:
/// an entry may live up to one tick longer than its lifetime.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
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
