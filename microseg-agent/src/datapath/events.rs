//! Reading policy events from the ring buffer and decoding them.

use std::net::IpAddr;

use aya::maps::{MapData, RingBuf};
use microseg_common::{
    DropReason,
    event::{EventVerdict, Hook, PolicyEvent},
    maps,
    policy::Direction,
};

use super::{Datapath, DatapathError, addr::from_mapped};

/// A policy event in readable types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedEvent {
    /// Monotonic time of the event (CLOCK_MONOTONIC ns); see `monotonic_to_unix_ns`.
    pub monotonic_ns: u64,
    pub ifindex: u32,
    pub hook: Option<Hook>,
    pub verdict: Option<EventVerdict>,
    pub reason: Option<DropReason>,
    pub direction: Option<Direction>,
    /// `None` for a packet whose IP header could not be read.
    pub source: Option<IpAddr>,
    pub destination: Option<IpAddr>,
    pub protocol: u8,
    pub source_port: u16,
    pub destination_port: u16,
    pub tcp_flags: u8,
    pub endpoint_id: u32,
    pub peer_identity: u32,
    pub rule_id: u32,
}

impl DecodedEvent {
    /// Decodes one ring buffer record; `None` if it is not a whole event.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<PolicyEvent>() {
            return None;
        }
        // SAFETY: the slice holds at least size_of::<PolicyEvent>() bytes; PolicyEvent
        // is plain old data (every bit pattern valid) and read_unaligned needs no
        // alignment.
        let raw: PolicyEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let has_addresses = raw.family != 0;
        Some(Self {
            monotonic_ns: raw.timestamp_ns,
            ifindex: raw.ifindex,
            hook: Hook::from_code(raw.hook),
            verdict: EventVerdict::from_code(raw.verdict),
            reason: DropReason::from_code(raw.reason),
            direction: Direction::from_code(raw.direction),
            source: has_addresses.then(|| from_mapped(raw.src_addr)),
            destination: has_addresses.then(|| from_mapped(raw.dst_addr)),
            protocol: raw.protocol,
            source_port: raw.src_port,
            destination_port: raw.dst_port,
            tcp_flags: raw.tcp_flags,
            endpoint_id: raw.endpoint_id,
            peer_identity: raw.peer_identity,
            rule_id: raw.rule_id,
        })
    }
}

impl Datapath {
    /// Takes the event ring buffer (once): its reader belongs to one consumer.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        let map = self
            .ebpf_mut()
            .take_map(maps::EVENTS)
            .ok_or_else(|| DatapathError::MissingMap(maps::EVENTS.to_owned()))?;
        RingBuf::try_from(map).map_err(|source| DatapathError::Map {
            map: maps::EVENTS,
            source: Box::new(source),
        })
    }
}

/// Drains every event available now.
pub fn drain(ring: &mut RingBuf<MapData>) -> Vec<DecodedEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        if let Some(event) = DecodedEvent::decode(&item) {
            events.push(event);
        }
    }
    events
}

/// Converts a CLOCK_MONOTONIC timestamp (as bpf_ktime_get_ns gives) to Unix time.
pub fn monotonic_to_unix_ns(monotonic_ns: u64) -> u128 {
    let mut mono = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut mono) };
    let now_mono = mono.tv_sec as u128 * 1_000_000_000 + mono.tv_nsec as u128;
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    now_unix.saturating_sub(now_mono.saturating_sub(monotonic_ns as u128))
}
