//! Connection tracking (`CONNTRACK`: LRU hash of `FlowKey` -> `FlowState`).
//!
//! A flow's two directions share one normalised key: the (address, port) pair that
//! sorts lower is side A. `FlowState::origin` records which side opened the flow, so a
//! packet from the other side is a reply. TCP flows also record what was seen of the
//! connection (`FLOW_SEEN_*`), which sets how long an idle entry lives.
//!
//! Keys as nf_conntrack's: TCP, UDP and SCTP by ports; an ICMP or ICMPv6 query
//! (echo, timestamp, information, address mask; ICMPv6 echo and node information) by
//! its identifier (in both port fields) and its request type (`icmp_query`), so that
//! only that exchange's reply matches; every other protocol by its address pair
//! alone (nf_conntrack's generic tracker). ICMP messages other than queries are not
//! tracked.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    pub port_a: u16,
    pub port_b: u16,
    pub protocol: u8,
    /// The request type of an ICMP query flow (8, 13, 15, 17; ICMPv6 128, 139), its
    /// request and its reply alike; 0 for every other flow.
    pub icmp_query: u8,
    _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    pub const fn new(
        addr_a: [u8; 16],
        port_a: u16,
        addr_b: [u8; 16],
        port_b: u16,
        protocol: u8,
        icmp_query: u8,
    ) -> Self {
        Self {
            addr_a,
            addr_b,
            port_a,
            port_b,
            protocol,
            icmp_query,
            _pad: [0; 2],
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
    /// `FLOW_SEEN_*` bits.
    pub seen: u8,
    /// Hit slot of the rule that allowed the flow (`crate::rule_hits`): its packets
    /// are counted there. For a flow two rules allowed (the destination's ingress and
    /// the source's egress), the ingress rule's.
    pub hit_slot: u16,
    /// Last time a packet refreshed the entry: CLOCK_MONOTONIC at timer-tick
    /// granularity (bpf_ktime_get_coarse_ns, up to 1/HZ behind the precise clock).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FlowState>() == 16);

pub const FLOW_ORIGIN_A: u8 = 0;
pub const FLOW_ORIGIN_B: u8 = 1;

/// A packet came back from the side that did not open the flow (TCP: the connection
/// is established).
pub const FLOW_SEEN_REPLY: u8 = 1;
/// TCP: the opening side sent a FIN.
pub const FLOW_SEEN_FIN_ORIGIN: u8 = 2;
/// TCP: the other side sent a FIN.
pub const FLOW_SEEN_FIN_REPLY: u8 = 4;
/// TCP: either side sent a RST.
pub const FLOW_SEEN_RST: u8 = 8;

/// `last_seen_ns` is rewritten at most this often, to keep the hot path read-only.
pub const FLOW_REFRESH_NS: u64 = 1_000_000_000;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// TCP flag bits as in the header's flags byte.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The stage of a connection, which sets how long its idle entry lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowStage {
    /// TCP: opened, no reply yet.
    TcpOpening,
    TcpEstablished,
    /// TCP: one side sent a FIN (the other may still send).
    TcpHalfClosed,
    /// TCP: both sides sent a FIN, or a RST was seen.
    TcpClosed,
    Udp,
    /// ICMP, SCTP and every other protocol.
    Other,
}

impl FlowStage {
    pub const fn of(protocol: u8, seen: u8) -> Self {
        if protocol == UDP {
            return Self::Udp;
        }
        if protocol != TCP {
            return Self::Other;
        }
        let both_fins = FLOW_SEEN_FIN_ORIGIN | FLOW_SEEN_FIN_REPLY;
        if seen & FLOW_SEEN_RST != 0 || seen & both_fins == both_fins {
            Self::TcpClosed
        } else if seen & both_fins != 0 {
            Self::TcpHalfClosed
        } else if seen & FLOW_SEEN_REPLY != 0 {
            Self::TcpEstablished
        } else {
            Self::TcpOpening
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::TcpOpening => "tcp-opening",
            Self::TcpEstablished => "tcp-established",
            Self::TcpHalfClosed => "tcp-half-closed",
            Self::TcpClosed => "tcp-closed",
            Self::Udp => "udp",
            Self::Other => "other",
        }
    }
}

/// What a packet adds to a flow's `seen` bits. `from_origin`: the packet comes from
/// the side that opened the flow.
pub const fn flow_seen_after(protocol: u8, seen: u8, from_origin: bool, tcp_flags: u8) -> u8 {
    let mut seen = seen;
    if !from_origin {
        seen |= FLOW_SEEN_REPLY;
    }
    if protocol == TCP {
        if tcp_flags & TCP_RST != 0 {
            seen |= FLOW_SEEN_RST;
        }
        if tcp_flags & TCP_FIN != 0 {
            seen |= if from_origin {
                FLOW_SEEN_FIN_ORIGIN
            } else {
                FLOW_SEEN_FIN_REPLY
            };
        }
    }
    seen
}

/// A TCP segment that opens a connection (SYN without ACK): it is always judged by
/// policy in its own direction, never taken as a reply, so a closed connection's
/// 5-tuple cannot be reused by the other side.
pub const fn is_tcp_open(protocol: u8, tcp_flags: u8) -> bool {
    protocol == TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

impl FlowState {
    pub const fn new(generation: u32, origin: u8, seen: u8, last_seen_ns: u64) -> Self {
        Self {
            generation,
            origin,
            seen,
            hit_slot: 0,
            last_seen_ns,
        }
    }
    /// The same state, its packets counted in `hit_slot`.
    pub const fn with_hit_slot(mut self, hit_slot: u16) -> Self {
        self.hit_slot = hit_slot;
        self
    }
}

crate::impl_pod!(FlowKey, FlowState);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_stages_follow_the_connection() {
        let opened = flow_seen_after(TCP, 0, true, TCP_SYN);
        assert_eq!(FlowStage::of(TCP, opened), FlowStage::TcpOpening);
        let established = flow_seen_after(TCP, opened, false, TCP_SYN | TCP_ACK);
        assert_eq!(FlowStage::of(TCP, established), FlowStage::TcpEstablished);
        let half = flow_seen_after(TCP, established, true, TCP_FIN | TCP_ACK);
        assert_eq!(FlowStage::of(TCP, half), FlowStage::TcpHalfClosed);
        let closed = flow_seen_after(TCP, half, false, TCP_FIN | TCP_ACK);
        assert_eq!(FlowStage::of(TCP, closed), FlowStage::TcpClosed);
        let reset = flow_seen_after(TCP, established, true, TCP_RST);
        assert_eq!(FlowStage::of(TCP, reset), FlowStage::TcpClosed);
    }

    #[test]
    fn only_a_bare_syn_opens() {
        assert!(is_tcp_open(TCP, TCP_SYN));
        assert!(!is_tcp_open(TCP, TCP_SYN | TCP_ACK));
        assert!(!is_tcp_open(TCP, TCP_ACK));
        assert!(!is_tcp_open(UDP, TCP_SYN));
    }

    #[test]
    fn other_protocols_have_one_stage() {
        assert_eq!(FlowStage::of(UDP, FLOW_SEEN_REPLY), FlowStage::Udp);
        assert_eq!(FlowStage::of(1, 0), FlowStage::Other);
        assert_eq!(FlowStage::of(132, FLOW_SEEN_RST), FlowStage::Other);
    }
}
