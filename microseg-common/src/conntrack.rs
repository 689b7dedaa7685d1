//! Connection tracking (`CONNTRACK`: LRU hash of `FlowKey` -> `FlowState`).
//!
//! A flow's two directions share one normalised key: the (address, port) pair that
//! sorts lower is side A. `FlowState::origin` records which side opened the flow, so a
//! packet from the other side is a reply.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    pub port_a: u16,
    pub port_b: u16,
    pub protocol: u8,
    _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    pub const fn new(
        addr_a: [u8; 16],
        port_a: u16,
        addr_b: [u8; 16],
        port_b: u16,
        protocol: u8,
    ) -> Self {
        Self {
            addr_a,
            addr_b,
            port_a,
            port_b,
            protocol,
            _pad: [0; 3],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowState {
    /// Policy generation that last allowed this flow. While it is the live generation,
    /// the flow's packets skip the policy lookup; once it is not, the flow is judged
    /// again, so revoking a policy also stops established flows.
    pub generation: u32,
    /// `FLOW_ORIGIN_A` or `FLOW_ORIGIN_B`: the side that sent the first packet.
    pub origin: u8,
    _pad: [u8; 3],
    /// Last time a packet refreshed the entry (bpf_ktime_get_ns).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FlowState>() == 16);

pub const FLOW_ORIGIN_A: u8 = 0;
pub const FLOW_ORIGIN_B: u8 = 1;

/// Idle time after which a TCP flow is forgotten and must be allowed anew.
pub const FLOW_TIMEOUT_TCP_NS: u64 = 2 * 3600 * 1_000_000_000;
/// Idle time after which a UDP, SCTP, ICMP or other flow is forgotten.
pub const FLOW_TIMEOUT_OTHER_NS: u64 = 120 * 1_000_000_000;
/// `last_seen_ns` is rewritten at most this often, to keep the hot path read-only.
pub const FLOW_REFRESH_NS: u64 = 1_000_000_000;

impl FlowState {
    pub const fn new(generation: u32, origin: u8, last_seen_ns: u64) -> Self {
        Self {
            generation,
            origin,
            _pad: [0; 3],
            last_seen_ns,
        }
    }
}

crate::impl_pod!(FlowKey, FlowState);
