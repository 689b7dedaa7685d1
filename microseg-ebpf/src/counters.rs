//! Per-CPU counters: packets by verdict and hook direction, and drops by reason.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use microseg_common::{
    DropReason,
    counters::{COUNTER_SLOTS, Counter},
    drop_reason::DROP_REASON_SLOTS,
};

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static DROPS_BY_REASON: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASON_SLOTS, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    bump(&COUNTERS, counter.index());
}

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    bump(&DROPS_BY_REASON, reason.code() as u32);
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array element, valid for
        // the program's run; no other program instance runs on this CPU meanwhile.
        unsafe { *slot += 1 };
    }
}
