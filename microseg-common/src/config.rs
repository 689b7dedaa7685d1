//! Runtime configuration of the programs, and the policy generation switch.
//!
//! Atomic policy updates: every policy-bearing key (`AddrKey`, `PrefixKeyData`,
//! `PolicyKeyData`) carries a one-bit *slot*. The live generation number `g` sits alone
//! in the one-element `GENERATION` array; packets use slot `g & 1`. The agent writes
//! generation `g + 1` into the other slot, switches by writing `g + 1` to `GENERATION`
//! (one aligned 4-byte store), waits for in-flight programs to finish, then deletes the
//! old slot's entries. A packet reads the generation once and so sees one generation
//! whole, never a mix.
//!
//! `GENERATION` also says, per slot, whether the slot binds any interface
//! (`GENERATION_INDEX_BOUND + slot`: `SLOT_MARK_*` bits), so that packets skip the
//! `INTERFACES` lookup where no interface is bound, and skip it on delivery (TC
//! egress) where no interface awaits its workload's policy. The agent sets a slot's mark before
//! switching to it; a live slot is never written, so its mark stays true. A map
//! pinned by an older agent has no such entries: the programs then always look up.

/// Index of the live generation number in `GENERATION`.
pub const GENERATION_INDEX_LIVE: u32 = 0;
/// Index of slot 0's "binds interfaces" mark in `GENERATION` (slot 1's follows).
pub const GENERATION_INDEX_BOUND: u32 = 1;
/// A slot's mark: it binds at least one interface.
pub const SLOT_MARK_BINDS: u32 = 1;
/// A slot's mark: at least one of its interfaces awaits its workload's policy
/// (`microseg_common::interface::BINDING_FLAG_NO_POLICY_YET`).
pub const SLOT_MARK_AWAITS_POLICY: u32 = 2;
/// Entries of `GENERATION`.
pub const GENERATION_ENTRIES: u32 = 3;

/// Entries of `REVOCATION`: one per generation slot.
///
/// Conntrack entries record the generation that allowed their flow. An update that
/// only adds what is allowed (a new pod, a new rule) cannot make an allowed flow
/// wrong, so flows allowed under earlier generations stay current; one that takes
/// something away (an entry removed, an endpoint's enforcement changed, a peer's
/// identity changed) must have every flow judged again. `REVOCATION[slot]` is the
/// oldest generation whose flows are current while `slot` is live: the agent writes
/// it into the standby slot before switching to it (the switch's own generation if
/// the update revokes, else the live slot's value), so a packet reads it with the
/// live generation, as it reads every slot's entries.
pub const REVOCATION_ENTRIES: u32 = 2;

/// Whether a flow recorded under generation `recorded` is current under `live`,
/// flows of generations before `floor` having been revoked (wrapping arithmetic:
/// generation numbers wrap).
#[inline(always)]
pub const fn flow_is_current(recorded: u32, live: u32, floor: u32) -> bool {
    live.wrapping_sub(recorded) <= live.wrapping_sub(floor)
}

/// Slot of a generation number.
pub const fn slot_of(generation: u32) -> u8 {
    (generation & 1) as u8
}

/// Settings read by the programs (one-element array `SETTINGS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Policy events (deny, audit, trace) the node may emit per second, all CPUs
    /// together; 0 = unlimited.
    pub events_per_second: u32,
    /// Events the node may emit at once above the steady rate.
    pub events_burst: u32,
    /// `SETTINGS_FLAG_*` bits.
    pub flags: u32,
    /// How long an idle connection is remembered, per stage.
    pub lifetimes: ConntrackLifetimes,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 40);

/// Emit an event for every allowed packet too (debugging; off by default).
pub const SETTINGS_FLAG_TRACE_ALLOWED: u32 = 1;
/// Send no deny events (audit and trace events are still sent). A bit that turns
/// events off, not on, so zeroed settings and a map pinned by an older agent keep
/// them on. Denied packets are still counted; nothing is counted as lost.
pub const SETTINGS_FLAG_NO_DENY_EVENTS: u32 = 2;

impl Settings {
    pub const fn new(events_per_second: u32, events_burst: u32, flags: u32) -> Self {
        Self {
            events_per_second,
            events_burst,
            flags,
            lifetimes: ConntrackLifetimes::DEFAULT,
        }
    }

    pub const fn with_lifetimes(mut self, lifetimes: ConntrackLifetimes) -> Self {
        self.lifetimes = lifetimes;
        self
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self::new(DEFAULT_EVENTS_PER_SECOND, DEFAULT_EVENTS_BURST, 0)
    }
}

/// Idle lifetimes of connection-tracking entries, in seconds, by `FlowStage`.
/// Defaults follow Cilium (established TCP 6 h, closing 10 s, SYN 60 s) and
/// nf_conntrack (half-closed 120 s, UDP 120 s once replied).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackLifetimes {
    pub tcp_opening_s: u32,
    pub tcp_established_s: u32,
    pub tcp_half_closed_s: u32,
    pub tcp_closed_s: u32,
    pub udp_s: u32,
    pub other_s: u32,
    _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ConntrackLifetimes>() == 28);

impl ConntrackLifetimes {
    pub const DEFAULT: Self = Self::new(60, 6 * 3600, 120, 10, 120, 60);

    pub const fn new(
        tcp_opening_s: u32,
        tcp_established_s: u32,
        tcp_half_closed_s: u32,
        tcp_closed_s: u32,
        udp_s: u32,
        other_s: u32,
    ) -> Self {
        Self {
            tcp_opening_s,
            tcp_established_s,
            tcp_half_closed_s,
            tcp_closed_s,
            udp_s,
            other_s,
            _pad: 0,
        }
    }

    /// Idle lifetime of a flow in `stage`, in nanoseconds.
    pub const fn of(&self, stage: crate::conntrack::FlowStage) -> u64 {
        use crate::conntrack::FlowStage;
        let seconds = match stage {
            FlowStage::TcpOpening => self.tcp_opening_s,
            FlowStage::TcpEstablished => self.tcp_established_s,
            FlowStage::TcpHalfClosed => self.tcp_half_closed_s,
            FlowStage::TcpClosed => self.tcp_closed_s,
            FlowStage::Udp => self.udp_s,
            FlowStage::Other => self.other_s,
        };
        seconds as u64 * 1_000_000_000
    }
}

impl Default for ConntrackLifetimes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

pub const DEFAULT_EVENTS_PER_SECOND: u32 = 100_000;
pub const DEFAULT_EVENTS_BURST: u32 = 10_000;

/// The node's event budget (`EVENT_RATE`, one element shared by every CPU): the
/// generic cell rate algorithm's "theoretical arrival time". Each event sent moves it
/// `1e9 / events_per_second` ns later; an event is refused while it would lie more
/// than `events_burst` such intervals ahead of now. The programs update it with one
/// compare-and-exchange, so the rate and the burst hold for the node whatever its CPU
/// count, and any one CPU may use all of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRateState {
    /// CLOCK_MONOTONIC (coarse) ns; 0 in a fresh map: the whole burst is available.
    pub theoretical_arrival_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventRateState>() == 8);

crate::impl_pod!(Settings, EventRateState);
