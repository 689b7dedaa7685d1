//! Rule hit counters (`RULE_HITS`: per-CPU array of `RuleHits`, indexed by hit slot).
//!
//! Rule ids grow without bound (they are never reused, see the agent's numbering), so
//! they cannot index an array. The agent gives each rule, and each endpoint's default
//! deny (a pair of slots: ingress, egress), a small slot number instead and stores it
//! in the policy entries (`PolicyEntry::hit_slot`) and endpoints
//! (`EndpointInfo::default_deny_hit_slot`); conntrack keeps the slot of the rule that
//! allowed a flow (`FlowState::hit_slot`), so an established flow's packets are
//! counted on its rule at the cost of one per-CPU array access. Slot 0 is "not
//! counted" (no rule, or more rules than slots).

/// What one slot counts, summed over CPUs by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleHits {
    /// Packets the rule decided: for an allow rule, every packet of the flows it
    /// allowed (their replies included); for a deny (and a default deny), every packet
    /// it denied.
    pub packets: u64,
    /// Flows the rule allowed when they were judged (a new connection, or an
    /// established one judged again after a policy change). 0 for denies.
    pub flows: u64,
}
const _: () = assert!(core::mem::size_of::<RuleHits>() == 16);

/// Slots in `RULE_HITS`, slot 0 included. 16 bytes per slot and CPU: 256 KiB per CPU.
pub const RULE_HIT_SLOTS: u32 = 16_384;

/// The slot of no rule: never counted.
pub const HIT_SLOT_NONE: u16 = 0;

crate::impl_pod!(RuleHits);
