//! Map names (as the programs declare them and as they are pinned) and their default
//! capacities. The agent may raise a capacity at load time.

pub const ENDPOINTS: &str = "ENDPOINTS";
pub const PEER_HOSTS: &str = "PEER_HOSTS";
pub const PEER_PREFIXES: &str = "PEER_PREFIXES";
pub const POLICY: &str = "POLICY";
pub const POLICY_EXACT: &str = "POLICY_EXACT";
pub const CONNTRACK: &str = "CONNTRACK";
pub const FRAGMENTS: &str = "FRAGMENTS";
pub const INTERFACES: &str = "INTERFACES";
pub const EVENTS: &str = "EVENTS";
pub const EVENT_RATE: &str = "EVENT_RATE";
pub const COUNTERS: &str = "COUNTERS";
pub const DROPS_BY_REASON: &str = "DROPS_BY_REASON";
pub const GENERATION: &str = "GENERATION";
pub const REVOCATION: &str = "REVOCATION";
pub const SETTINGS: &str = "SETTINGS";
pub const RULE_HITS: &str = "RULE_HITS";

/// Every map, in the order the agent pins and reports them.
pub const ALL: [&str; 16] = [
    ENDPOINTS,
    PEER_HOSTS,
    PEER_PREFIXES,
    POLICY,
    POLICY_EXACT,
    CONNTRACK,
    FRAGMENTS,
    INTERFACES,
    EVENTS,
    EVENT_RATE,
    COUNTERS,
    DROPS_BY_REASON,
    GENERATION,
    REVOCATION,
    SETTINGS,
    RULE_HITS,
];

/// Default capacities. Policy-bearing maps hold two generations during an update, so
/// their usable capacity for one generation is half of this.
pub const ENDPOINTS_CAPACITY: u32 = 65_536;
pub const PEER_HOSTS_CAPACITY: u32 = 262_144;
pub const PEER_PREFIXES_CAPACITY: u32 = 65_536;
pub const POLICY_CAPACITY: u32 = 1_048_576;
pub const CONNTRACK_CAPACITY: u32 = 131_072;
pub const FRAGMENTS_CAPACITY: u32 = 8_192;
/// Bound interfaces (both generation slots): 8,192 workload interfaces per node.
pub const INTERFACES_CAPACITY: u32 = 16_384;
/// Ring buffer size in bytes (power of two, multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;

/// Program names as declared in the eBPF object.
pub const PROG_XDP: &str = "microseg_xdp";
pub const PROG_TC_INGRESS: &str = "microseg_tc_ingress";
pub const PROG_TC_EGRESS: &str = "microseg_tc_egress";
/// The TC programs for devices without a link-layer header (tun, WireGuard, ipip):
/// packets start at the IP header.
pub const PROG_TC_INGRESS_L3: &str = "microseg_tc_ingress_l3";
pub const PROG_TC_EGRESS_L3: &str = "microseg_tc_egress_l3";
/// The held programs: for an Ethernet interface whose binding could not be written,
/// they drop everything beyond its link without reading any map.
pub const PROG_XDP_HOLD: &str = "microseg_xdp_hold";
pub const PROG_TC_HOLD_INGRESS: &str = "microseg_tc_hold_ingress";
pub const PROG_TC_HOLD_EGRESS: &str = "microseg_tc_hold_egress";

/// Where maps and links are pinned.
pub const PIN_ROOT: &str = "/sys/fs/bpf/microseg";
