//! Policy verdict events: a fixed record per denied or audited packet into a ring
//! buffer, rate limited per CPU by a token bucket; what is not sent is counted.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use microseg_common::{
    config::{EventRateState, SETTINGS_FLAG_NO_DENY_EVENTS},
    counters::Counter,
    event::PolicyEvent,
    maps::EVENTS_BYTES,
};

use crate::{
    config, counters,
    parse::{PROTO_ICMP, PROTO_ICMPV6, PacketInfo},
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
static EVENT_RATE: PerCpuArray<EventRateState> = PerCpuArray::with_max_entries(1, 0);

/// Tokens are kept in units of 1/1e9 event, so a refill is `elapsed_ns * rate`.
const TOKEN_SCALE: u64 = 1_000_000_000;

/// What an event says beyond the packet's own fields.
pub struct EventFields {
    pub hook: u8,
    /// `EventVerdict` code.
    pub verdict: u8,
    /// `Direction` code of the deciding policy, 0 if none.
    pub direction: u8,
    /// `DropReason` code, 0 for a forwarded packet.
    pub reason: u8,
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub peer_identity: u32,
    pub rule_id: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Sends a deny event unless deny events are off. The switch is read here, before
/// the call and any clock read, so a deny with events off costs one settings load.
#[inline(always)]
pub fn send_denial(info: Option<&PacketInfo>, fields: &EventFields) {
    if config::settings().flags & SETTINGS_FLAG_NO_DENY_EVENTS != 0 {
        return;
    }
    send(info, fields);
}

/// Sends an event for `info` (None: the IP header was unreadable), written in place
/// in the ring buffer. Kept out of line: it is off the allow path and its stack
/// frame should not add to the hot path's.
#[inline(never)]
pub fn send(info: Option<&PacketInfo>, fields: &EventFields) {
    // The bucket runs on the coarse clock (one jiffy, 4 ms at HZ=250): a packet the
    // limit refuses never pays for the precise one. See `take_token` for why a tick
    // that coarse keeps the rate.
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    if !take_token(unsafe { bpf_ktime_get_coarse_ns() }) {
        counters::count(Counter::EventsLostRateLimit);
        return;
    }
    // The precise clock only for an event that is sent: events are ordered and timed
    // by it (the coarse clock would give every event of one tick the same time).
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(mut slot) = EVENTS.reserve::<PolicyEvent>(0) else {
        counters::count(Counter::EventsLostRingFull);
        return;
    };
    let event = slot.write(PolicyEvent::ZERO);
    event.timestamp_ns = now;
    event.ifindex = fields.ifindex;
    event.endpoint_id = fields.endpoint_id;
    event.peer_identity = fields.peer_identity;
    event.rule_id = fields.rule_id;
    event.direction = fields.direction;
    event.hook = fields.hook;
    event.verdict = fields.verdict;
    event.reason = fields.reason;
    if let Some(info) = info {
        event.src_addr = info.src;
        event.dst_addr = info.dst;
        event.protocol = info.protocol;
        event.family = info.family;
        event.tcp_flags = info.tcp_flags;
        if info.protocol == PROTO_ICMP || info.protocol == PROTO_ICMPV6 {
            event.src_port = info.icmp_type as u16;
            event.dst_port = info.icmp_code as u16;
        } else {
            event.src_port = fields.src_port;
            event.dst_port = fields.dst_port;
        }
    }
    slot.submit(0);
    counters::count(Counter::EventsSent);
}

/// Takes one token from this CPU's bucket at `now_ns` of the coarse clock.
///
/// That clock moves in steps of one jiffy (1-10 ms, CONFIG_HZ 1000-100), so tokens
/// arrive in lumps of `rate * tick`: the refill is the whole elapsed time times the
/// rate, so the long-run rate is exact, and within a tick the burst is what may be
/// spent. The rate holds while `rate * tick <= burst` (a lump is capped at the burst);
/// the defaults (100,000/s, burst 10,000) give 400 tokens a tick at HZ=250 and 1,000
/// at HZ=100, far below the cap. Above it the rate is at most `burst / tick`.
#[inline(always)]
fn take_token(now_ns: u64) -> bool {
    let settings = config::settings();
    if settings.events_per_second == 0 {
        return true;
    }
    let Some(state) = EVENT_RATE.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run and not
    // shared with any other running program instance.
    let state = unsafe { &mut *state };
    let rate = settings.events_per_second as u64;
    let capacity = settings.events_burst.max(1) as u64 * TOKEN_SCALE;
    let elapsed = now_ns.saturating_sub(state.last_refill_ns);
    state.last_refill_ns = now_ns;
    // A long pause refills the whole burst (and a fresh bucket starts full); the
    // comparison keeps `elapsed * rate` far below u64::MAX.
    let refill = if elapsed >= capacity / rate {
        capacity
    } else {
        elapsed * rate
    };
    state.tokens = (state.tokens + refill).min(capacity);
    if state.tokens >= TOKEN_SCALE {
        state.tokens -= TOKEN_SCALE;
        true
    } else {
        false
    }
}
