//! The policy verdict event (`EVENTS` ring buffer): one fixed record per denied or
//! audited packet, rate limited in the kernel.

/// Where in the stack the packet was judged.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Xdp = 1,
    TcIngress = 2,
    TcEgress = 3,
}

impl Hook {
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Xdp),
            2 => Some(Self::TcIngress),
            3 => Some(Self::TcEgress),
            _ => None,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::TcIngress => "tc-ingress",
            Self::TcEgress => "tc-egress",
        }
    }
}

/// Verdict recorded in an event.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventVerdict {
    /// Dropped (Hubble: `DROPPED`).
    Dropped = 1,
    /// Would have been dropped; passed because the endpoint is in audit mode
    /// (Hubble: `AUDIT`).
    Audit = 2,
    /// Passed (only with `SETTINGS_FLAG_TRACE_ALLOWED`; Hubble: `FORWARDED`).
    Forwarded = 3,
}

impl EventVerdict {
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Dropped),
            2 => Some(Self::Audit),
            3 => Some(Self::Forwarded),
            _ => None,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Self::Dropped => "DROPPED",
            Self::Audit => "AUDIT",
            Self::Forwarded => "FORWARDED",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyEvent {
    /// bpf_ktime_get_ns(): monotonic; userspace converts to wall-clock time.
    pub timestamp_ns: u64,
    /// Interface the packet was seen on.
    pub ifindex: u32,
    /// Endpoint whose policy decided (0 if none, e.g. a malformed packet).
    pub endpoint_id: u32,
    /// Identity of the peer as the data path resolved it.
    pub peer_identity: u32,
    /// Rule that decided; `RULE_ID_DEFAULT_DENY` for the default deny.
    pub rule_id: u32,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Ports, or for ICMP the type (src_port) and code (dst_port).
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
    /// Policy direction that decided (`Direction` code), 0 if none.
    pub direction: u8,
    /// `Hook` code.
    pub hook: u8,
    /// `EventVerdict` code.
    pub verdict: u8,
    /// `DropReason` code (also set for audit events: the reason it would have dropped).
    pub reason: u8,
    /// TCP flags byte (FIN=1, SYN=2, RST=4, PSH=8, ACK=16, URG=32, ECE=64, CWR=128).
    pub tcp_flags: u8,
    _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<PolicyEvent>() == 72);

impl PolicyEvent {
    pub const ZERO: Self = Self {
        timestamp_ns: 0,
        ifindex: 0,
        endpoint_id: 0,
        peer_identity: 0,
        rule_id: 0,
        src_addr: [0; 16],
        dst_addr: [0; 16],
        src_port: 0,
        dst_port: 0,
        protocol: 0,
        family: 0,
        direction: 0,
        hook: 0,
        verdict: 0,
        reason: 0,
        tcp_flags: 0,
        _pad: [0; 5],
    };
}

crate::impl_pod!(PolicyEvent);
