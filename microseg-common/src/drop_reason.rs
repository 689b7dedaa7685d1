//! Why a packet was dropped. The codes are stable: they appear in events, metrics and
//! stored logs, so a code is never renumbered or reused; new reasons get new codes.

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The endpoint is selected by a policy in this direction and no rule allows the
    /// packet (Hubble: `POLICY_DENIED`).
    PolicyDenied = 1,
    /// An explicit deny rule matched (Hubble: `POLICY_DENY`).
    PolicyDeny = 2,
    /// The IP header is truncated or invalid, so the packet's endpoints are unknown.
    MalformedIp = 3,
    /// The transport header of a packet to or from an enforced endpoint is truncated.
    MalformedL4 = 4,
    /// A non-first fragment whose first fragment was not seen, so its ports are unknown.
    FragmentWithoutHead = 5,
    /// An IPv6 packet with more extension headers than the parser walks.
    Ipv6HeaderChainTooLong = 6,
    /// A packet from a workload's own interface whose source address is not one of
    /// the workload's (a forged source; Hubble: `INVALID_SOURCE_IP`).
    InvalidSourceIp = 7,
    /// An ICMPv6 router advertisement or redirect sent by a workload: only routers
    /// may send them (the CVE-2020-10749 class).
    ForbiddenIcmpv6 = 8,
    /// The network layer could not be found: more VLAN tags than the parser walks,
    /// or a link-layer header that does not match the device's protocol.
    UnsupportedL3Protocol = 9,
    /// To or from a pod's interface whose pod the agent does not know yet, so no
    /// policy can judge it (a sandbox's veth before the API server reports its pod;
    /// Hubble: `NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION`).
    NoPolicyYet = 10,
    /// The program's per-CPU working memory (a map element) could not be had, so the
    /// packet could not be judged. Never expected: counted and dropped all the same.
    ScratchUnavailable = 11,
}

impl DropReason {
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::PolicyDenied,
            2 => Self::PolicyDeny,
            3 => Self::MalformedIp,
            4 => Self::MalformedL4,
            5 => Self::FragmentWithoutHead,
            6 => Self::Ipv6HeaderChainTooLong,
            7 => Self::InvalidSourceIp,
            8 => Self::ForbiddenIcmpv6,
            9 => Self::UnsupportedL3Protocol,
            10 => Self::NoPolicyYet,
            11 => Self::ScratchUnavailable,
            _ => return None,
        })
    }

    /// Name as Hubble users know it (`drop_reason_desc`), and as metrics label it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PolicyDenied => "POLICY_DENIED",
            Self::PolicyDeny => "POLICY_DENY",
            Self::MalformedIp => "INVALID_PACKET_DROPPED",
            Self::MalformedL4 => "INVALID_L4_HEADER",
            Self::FragmentWithoutHead => "FRAGMENT_WITHOUT_HEAD",
            Self::Ipv6HeaderChainTooLong => "IPV6_EXTENSION_HEADERS_TOO_LONG",
            Self::InvalidSourceIp => "INVALID_SOURCE_IP",
            Self::ForbiddenIcmpv6 => "FORBIDDEN_ICMPV6",
            Self::UnsupportedL3Protocol => "UNSUPPORTED_L3_PROTOCOL",
            Self::NoPolicyYet => "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
            Self::ScratchUnavailable => "SCRATCH_UNAVAILABLE",
        }
    }

    /// What the hubble CLI prints for the Cilium reason this one is sent as
    /// (Cilium's `pkg/monitor/api/drop.go`), so that `microseg events` reads like
    /// `hubble observe`.
    pub const fn hubble_text(self) -> &'static str {
        match self {
            Self::PolicyDenied => "Policy denied",
            Self::PolicyDeny => "Policy denied by denylist",
            Self::MalformedIp => "Invalid packet",
            Self::MalformedL4 => "CT: Truncated or invalid header",
            Self::FragmentWithoutHead => "First logical datagram fragment not found",
            Self::Ipv6HeaderChainTooLong => "Invalid IPv6 extension header",
            Self::InvalidSourceIp => "Invalid source ip",
            Self::ForbiddenIcmpv6 => "Forbidden ICMPv6 message",
            Self::UnsupportedL3Protocol => "Unsupported L3 protocol",
            Self::NoPolicyYet | Self::ScratchUnavailable => {
                "No configuration available to perform policy decision"
            }
        }
    }

    /// Whether policy decided the drop (a policy verdict), rather than the packet
    /// being dropped before policy could judge it (a drop event).
    pub const fn by_policy(self) -> bool {
        matches!(self, Self::PolicyDenied | Self::PolicyDeny)
    }

    /// The reason named `name` (see [`DropReason::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.name() == name)
    }

    pub const ALL: [DropReason; 11] = [
        Self::PolicyDenied,
        Self::PolicyDeny,
        Self::MalformedIp,
        Self::MalformedL4,
        Self::FragmentWithoutHead,
        Self::Ipv6HeaderChainTooLong,
        Self::InvalidSourceIp,
        Self::ForbiddenIcmpv6,
        Self::UnsupportedL3Protocol,
        Self::NoPolicyYet,
        Self::ScratchUnavailable,
    ];
}

/// Size of the per-reason drop counter array; codes index it directly.
pub const DROP_REASON_SLOTS: u32 = 32;
