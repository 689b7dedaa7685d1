//! Per-CPU working memory of the decision: the packet's parsed fields and what the
//! conntrack stage hands on to the policy stage. Kept in a map element rather than on
//! the stack, whose 512 bytes must hold the decision's deepest call chain (kernels
//! before 6.9 round every frame up to 32 bytes).
//!
//! One element per CPU is enough: a program runs to completion on its CPU without
//! another of these programs starting there meanwhile (XDP and TC run with bottom
//! halves disabled), and every packet overwrites what it uses before reading it.

use aya_ebpf::{macros::map, maps::PerCpuArray};

use crate::{
    parse::PacketInfo,
    verdict::{Judged, Pending},
};

pub struct DecisionScratch {
    pub info: PacketInfo,
    pub pending: Pending,
    pub judged: Judged,
}

#[map]
static DECISION_SCRATCH: PerCpuArray<DecisionScratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's element; `None` never happens for index 0 of a one-element array, and
/// the caller drops the packet if it does.
#[inline(always)]
pub fn decision() -> Option<&'static mut DecisionScratch> {
    let element = DECISION_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run and
    // used by no other program instance meanwhile (see the module's comment). Every
    // field the decision reads is written first for each packet.
    Some(unsafe { &mut *element })
}
