//! Policy verdict events: a fixed record per denied or audited packet into a ring
//! buffer, rate limited for the whole node by one shared budget (the ring and its
//! reader are one per node too); what is not sent is counted.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, RingBuf},
};
use microseg_common::{
    config::EventRateState,
    counters::Counter,
    event::{Hook, PolicyEvent},
    maps::EVENTS_BYTES,
};

use crate::{
    config, counters,
    parse::{PROTO_ICMP, PROTO_ICMPV6, PacketInfo},
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// One element for the node, updated by every CPU with compare-and-exchange.
#[map]
static EVENT_RATE: Array<EventRateState> = Array::with_max_entries(1, 0);

const NS_PER_SECOND: u64 = 1_000_000_000;

/// Compare-and-exchange attempts before an event is given up (counted as rate
/// limited): another CPU won each race, so the budget is being spent anyway.
const BUDGET_ATTEMPTS: usize = 4;

/// What every event about one packet carries beyond the packet's own fields.
pub struct EventSite {
    pub hook: Hook,
    pub ifindex: u32,
    /// The packet's ports (a later fragment's from its first fragment).
    pub src_port: u16,
    pub dst_port: u16,
}

/// Why an event is sent: the verdict, and what decided it.
pub struct EventCause {
    /// `EventVerdict` code.
    pub verdict: u8,
    /// `Direction` code of the deciding policy, 0 if none.
    pub direction: u8,
    /// `DropReason` code, 0 for a forwarded packet.
    pub reason: u8,
    pub endpoint_id: u32,
    pub peer_identity: u32,
    pub rule_id: u32,
}

/// Sends an event for `info` (None: the IP header was unreadable), written in place
/// in the ring buffer. Kept out of line: it is off the allow path and its stack
/// frame should not add to the hot path's.
#[inline(never)]
pub fn send(info: Option<&PacketInfo>, site: &EventSite, cause: &EventCause) {
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
    event.ifindex = site.ifindex;
    event.endpoint_id = cause.endpoint_id;
    event.peer_identity = cause.peer_identity;
    event.rule_id = cause.rule_id;
    event.direction = cause.direction;
    event.hook = site.hook as u8;
    event.verdict = cause.verdict;
    event.reason = cause.reason;
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
            event.src_port = site.src_port;
            event.dst_port = site.dst_port;
        }
    }
    slot.submit(0);
    counters::count(Counter::EventsSent);
}

/// Takes one event from the node's budget at `now_ns` of the coarse clock: the
/// generic cell rate algorithm (as a token bucket of `burst` tokens refilled at
/// `rate`, kept as one number). Each event moves the theoretical arrival time one
/// interval (`1e9 / rate` ns) on from itself or from now, whichever is later; an
/// event that would move it more than `burst` intervals past now is refused. Over
/// any window of W seconds the node sends at most `burst + rate * W` events, on one
/// CPU or many. One compare-and-exchange publishes the move; a CPU that loses the
/// race reads the new time and tries again.
///
/// The coarse clock moves in steps of one jiffy (1-10 ms): the budget then grows in
/// lumps of `rate * tick` events, so the long-run rate is exact while that lump is
/// below the burst (the defaults, 100,000/s and 10,000, give 400 a tick at HZ=250).
#[inline(always)]
fn take_token(now_ns: u64) -> bool {
    let settings = config::settings();
    let Some(rate) = core::num::NonZeroU64::new(settings.events_per_second as u64) else {
        return true;
    };
    let Some(state) = EVENT_RATE.get_ptr_mut(0) else {
        return true;
    };
    let interval = (NS_PER_SECOND / rate).max(1);
    let tolerance = settings.events_burst.max(1) as u64 * interval;
    // SAFETY: `state` points to the map's one element, valid and 8-byte aligned for
    // the program's run; `theoretical_arrival_ns` is its only field.
    let arrival = unsafe { core::ptr::addr_of_mut!((*state).theoretical_arrival_ns) };
    for _ in 0..BUDGET_ATTEMPTS {
        // SAFETY: as above; a volatile read, since other CPUs write it.
        let seen = unsafe { core::ptr::read_volatile(arrival) };
        let next = seen.max(now_ns) + interval;
        if next - now_ns > tolerance {
            return false;
        }
        // SAFETY: as above: an aligned u64 of the shared map element, which the
        // kernel lets programs update atomically (BPF_CMPXCHG, Linux 5.12+).
        let (_, exchanged) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                arrival, seen, next,
            )
        };
        if exchanged {
            return true;
        }
    }
    false
}
