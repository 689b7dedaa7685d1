//! Per-CPU packet counters (`COUNTERS`, indexed by `Counter`) and drops by reason
//! (`DROPS_BY_REASON`, indexed by `DropReason` code). Userspace sums the CPUs.
//!
//! "Ingress"/"egress" in counter names is the hook's direction: XDP and TC ingress
//! count as ingress, TC egress as egress. Events carry the policy direction instead.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    AllowedIngress = 0,
    AllowedEgress = 1,
    DeniedIngress = 2,
    DeniedEgress = 3,
    AuditedIngress = 4,
    AuditedEgress = 5,
    /// An established flow's packet passed on its conntrack entry, skipping policy.
    ConntrackHit = 6,
    /// The packet could not be parsed (any `Malformed*` drop reason).
    ParseFailure = 7,
    /// Not IP, or ARP / ICMPv6 neighbour discovery: passed without policy.
    NotPolicyTraffic = 8,
    /// Neither address is an enforced endpoint in the packet's direction: passed.
    NotEnforced = 9,
    /// Events the ring buffer had no room for.
    EventsLostRingFull = 10,
    /// Events suppressed by the in-kernel rate limit.
    EventsLostRateLimit = 11,
    /// Events written to the ring buffer.
    EventsSent = 12,
    /// A packet that continues a flow (a TCP segment other than a bare SYN, an ICMP
    /// query's reply) involving an enforced endpoint found no conntrack entry at all:
    /// its flow was evicted from the full LRU map (or began before it was tracked).
    /// The packet is judged by policy in its own direction.
    ConntrackFlowLost = 13,
    /// Such a packet found its flow's entry past the flow's idle lifetime.
    ConntrackFlowExpired = 14,
    /// A packet of a flow allowed before the last revoking update was judged again
    /// by policy (see `config::REVOCATION_ENTRIES`).
    ConntrackRejudged = 15,
}

pub const COUNTER_SLOTS: u32 = 16;

impl Counter {
    pub const ALL: [Counter; 16] = [
        Self::AllowedIngress,
        Self::AllowedEgress,
        Self::DeniedIngress,
        Self::DeniedEgress,
        Self::AuditedIngress,
        Self::AuditedEgress,
        Self::ConntrackHit,
        Self::ParseFailure,
        Self::NotPolicyTraffic,
        Self::NotEnforced,
        Self::EventsLostRingFull,
        Self::EventsLostRateLimit,
        Self::EventsSent,
        Self::ConntrackFlowLost,
        Self::ConntrackFlowExpired,
        Self::ConntrackRejudged,
    ];

    pub const fn index(self) -> u32 {
        self as u32
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::AllowedIngress => "allowed_ingress",
            Self::AllowedEgress => "allowed_egress",
            Self::DeniedIngress => "denied_ingress",
            Self::DeniedEgress => "denied_egress",
            Self::AuditedIngress => "audited_ingress",
            Self::AuditedEgress => "audited_egress",
            Self::ConntrackHit => "conntrack_hit",
            Self::ParseFailure => "parse_failure",
            Self::NotPolicyTraffic => "not_policy_traffic",
            Self::NotEnforced => "not_enforced",
            Self::EventsLostRingFull => "events_lost_ring_full",
            Self::EventsLostRateLimit => "events_lost_rate_limit",
            Self::EventsSent => "events_sent",
            Self::ConntrackFlowLost => "conntrack_flows_lost",
            Self::ConntrackFlowExpired => "conntrack_flows_expired",
            Self::ConntrackRejudged => "conntrack_flows_rejudged",
        }
    }
}
