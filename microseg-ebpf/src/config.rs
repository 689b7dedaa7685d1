//! The live policy generation and the programs' settings.

use aya_ebpf::{macros::map, maps::Array};
use microseg_common::config::{
    GENERATION_ENTRIES, GENERATION_INDEX_BOUND, GENERATION_INDEX_LIVE, REVOCATION_ENTRIES,
    SLOT_MARK_AWAITS_POLICY, Settings,
};

/// The live policy generation, and per slot whether it binds interfaces (see
/// `microseg_common::config`).
#[map]
static GENERATION: Array<u32> = Array::with_max_entries(GENERATION_ENTRIES, 0);

/// Per slot, the oldest generation whose conntrack entries are current (see
/// `microseg_common::config::REVOCATION_ENTRIES`).
#[map]
static REVOCATION: Array<u32> = Array::with_max_entries(REVOCATION_ENTRIES, 0);

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Reads the live generation once; a packet uses this value for every lookup.
#[inline(always)]
pub fn live_generation() -> u32 {
    match GENERATION.get_ptr(GENERATION_INDEX_LIVE) {
        // SAFETY: the pointer comes from a successful lookup in an array map, so it
        // points to a valid, aligned u32 for the duration of the program. The volatile
        // read keeps the compiler from reading it twice.
        Some(ptr) => unsafe { core::ptr::read_volatile(ptr) },
        None => 0,
    }
}

/// The oldest generation whose flows are current while `slot` is live (0 if unset:
/// every flow of a generation up to the live one).
#[inline(always)]
pub fn revocation_floor(slot: u8) -> u32 {
    match REVOCATION.get(slot as u32) {
        Some(floor) => *floor,
        None => 0,
    }
}

/// Whether `slot` binds any interface (true if unknown: a map pinned by an older
/// agent has no marks).
#[inline(always)]
pub fn slot_binds_interfaces(slot: u8) -> bool {
    match GENERATION.get(GENERATION_INDEX_BOUND + slot as u32) {
        Some(mark) => *mark != 0,
        None => true,
    }
}

/// Whether an interface of `slot` awaits its workload's policy (false if unknown: an
/// older agent bound none that way).
#[inline(always)]
pub fn slot_awaits_policy(slot: u8) -> bool {
    match GENERATION.get(GENERATION_INDEX_BOUND + slot as u32) {
        Some(mark) => *mark & SLOT_MARK_AWAITS_POLICY != 0,
        None => false,
    }
}

/// Settings when the map has none (never after the agent's load).
static NO_SETTINGS: Settings = Settings::new(0, 0, 0);

/// The settings, by reference into the map: a copy would cost the decision's stack
/// frame 40 of the BPF stack's 512 bytes.
#[inline(always)]
pub fn settings() -> &'static Settings {
    match SETTINGS.get(0) {
        Some(settings) => settings,
        None => &NO_SETTINGS,
    }
}
