//! Runtime configuration of the programs, and the policy generation switch.
//!
//! Atomic policy updates: every policy-bearing key (`AddrKey`, `PrefixKeyData`,
//! `PolicyKeyData`) carries a one-bit *slot*. The live generation number `g` sits alone
//! in the one-element `GENERATION` array; packets use slot `g & 1`. The agent writes
//! generation `g + 1` into the other slot, switches by writing `g + 1` to `GENERATION`
//! (one aligned 4-byte store), waits for in-flight programs to finish, then deletes the
//! old slot's entries. A packet reads the generation once and so sees one generation
//! whole, never a mix.

/// Slot of a generation number.
pub const fn slot_of(generation: u32) -> u8 {
    (generation & 1) as u8
}

/// Settings read by the programs (one-element array `SETTINGS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Policy events (deny and audit) each CPU may emit per second; 0 = unlimited.
    pub events_per_second: u32,
    /// Burst of events above the steady rate, per CPU.
    pub events_burst: u32,
    /// `SETTINGS_FLAG_*` bits.
    pub flags: u32,
    _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 16);

/// Emit an event for every allowed packet too (debugging; off by default).
pub const SETTINGS_FLAG_TRACE_ALLOWED: u32 = 1;

impl Settings {
    pub const fn new(events_per_second: u32, events_burst: u32, flags: u32) -> Self {
        Self {
            events_per_second,
            events_burst,
            flags,
            _pad: 0,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self::new(DEFAULT_EVENTS_PER_SECOND, DEFAULT_EVENTS_BURST, 0)
    }
}

pub const DEFAULT_EVENTS_PER_SECOND: u32 = 100_000;
pub const DEFAULT_EVENTS_BURST: u32 = 10_000;

/// Per-CPU token bucket state of the event rate limiter (`EVENT_RATE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRateState {
    /// Tokens available, scaled by `TOKEN_SCALE` so refill needs no division per packet.
    pub tokens: u64,
    pub last_refill_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventRateState>() == 16);

crate::impl_pod!(Settings, EventRateState);
