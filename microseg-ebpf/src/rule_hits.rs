//! Rule hit counters: packets and flows per rule, and packets per default deny, in
//! the slots the agent assigned (see `microseg_common::rule_hits`).

use aya_ebpf::{macros::map, maps::PerCpuArray};
use microseg_common::rule_hits::{HIT_SLOT_NONE, RULE_HIT_SLOTS, RuleHits};

#[map]
static RULE_HITS: PerCpuArray<RuleHits> = PerCpuArray::with_max_entries(RULE_HIT_SLOTS, 0);

/// A flow the slot's rule allowed when judging it (its packet counts too).
#[inline(always)]
pub fn count_flow(slot: u16) {
    if slot == HIT_SLOT_NONE {
        return;
    }
    if let Some(hits) = RULE_HITS.get_ptr_mut(u32::from(slot)) {
        // SAFETY: this CPU's element of a per-CPU array, valid for the program's run;
        // no other program instance runs on this CPU meanwhile.
        unsafe {
            (*hits).flows += 1;
            (*hits).packets += 1;
        }
    }
}

/// A packet the slot's rule decided (an established flow's, or a denied one).
#[inline(always)]
pub fn count_packet(slot: u16) {
    if slot == HIT_SLOT_NONE {
        return;
    }
    if let Some(hits) = RULE_HITS.get_ptr_mut(u32::from(slot)) {
        // SAFETY: as in `count_flow`.
        unsafe { (*hits).packets += 1 };
    }
}
