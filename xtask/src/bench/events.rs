//! Deny events under a flood: one thread runs denied packets through the TC ingress
//! program (BPF_PROG_TEST_RUN, batches of 1000 repeats; the same decision path as
//! XDP) as fast as it can, while another waits on the ring buffer's fd (poll, as the
//! agent's epoll does) and decodes every event. `delivered_per_s` is what the reader
//! decoded per second of flood; `lost` is the data path's own count of events not
//! delivered (rate limited plus ring full) over the same window.
//!
//! Measured twice: with the shipped settings (a per-CPU token bucket of 100,000
//! events/s, burst 10,000: the headline figures) and with the rate limit off, which
//! shows what the ring buffer and one reader can carry.

use std::{
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use aya::maps::{MapData, RingBuf};
use microseg::datapath::{
    AttachPoint, Datapath, DatapathState, LoadOptions, PolicyMatch, ProgramVerdict,
    events::DecodedEvent, probe::Probe,
};
use microseg_common::{
    config::Settings,
    counters::Counter,
    endpoint::{ENDPOINT_FLAG_INGRESS_ENFORCED, EndpointInfo},
    policy::{Direction, PolicyEntry},
};
use serde::Serialize;

use crate::scenario::{ALLOWED_PORT, DENIED_PORT, Family};

#[derive(Clone, Debug, Serialize)]
pub struct EventFlood {
    pub events_per_second_setting: u32,
    pub window_s: f64,
    pub denied_packets: u64,
    pub denied_per_s: f64,
    pub delivered: u64,
    pub delivered_per_s: f64,
    pub lost: u64,
    pub lost_rate_limit: u64,
    pub lost_ring_full: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Events {
    pub delivered_per_s: f64,
    pub lost: u64,
    /// The shipped settings (headline figures above).
    pub default_settings: EventFlood,
    /// Rate limit off.
    pub unlimited: EventFlood,
}

/// A server endpoint enforcing ingress with one allowed client: packets from anyone
/// else are denied.
fn state() -> DatapathState {
    let family = Family::V4;
    let mut state = DatapathState::default();
    state.endpoints.insert(
        family.server(),
        EndpointInfo::new(1, ENDPOINT_FLAG_INGRESS_ENFORCED),
    );
    state.peer_hosts.insert(family.client(0), 256);
    state.policy.insert(
        PolicyMatch {
            endpoint_id: 1,
            identity: 256,
            direction: Direction::Ingress,
            protocol: Some(17),
            port_block: Some((ALLOWED_PORT, 16)),
        },
        PolicyEntry::allow(1),
    );
    state
}

fn flood(settings: Settings, window: Duration) -> anyhow::Result<EventFlood> {
    let mut datapath = Datapath::load(&LoadOptions::default())?;
    datapath.maps()?.set_settings(&settings)?;
    datapath.apply(&DatapathState::default(), &state())?;
    let mut ring = datapath.take_events()?;
    // TC: BPF_PROG_TEST_RUN of an XDP program with repeat > 1 re-registers it with
    // the XDP dispatcher on every call (~20 ms here), which would throttle the flood.
    let point = AttachPoint::TcIngress;
    let family = Family::V4;
    let frame = Probe::udp(family.stranger(7), 40_000, family.server(), DENIED_PORT).to_frame();
    let verdict = datapath.test_run(point, &frame)?;
    ensure!(
        verdict == ProgramVerdict::Drop,
        "the flood packet was not denied ({verdict:?})"
    );
    while ring.next().is_some() {}
    // A fresh token bucket for the window.
    std::thread::sleep(Duration::from_millis(200));
    let before = datapath.maps()?.counters()?;

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut delivered = 0u64;
            let mut malformed = 0u64;
            loop {
                let mut got = false;
                while let Some(item) = ring.next() {
                    got = true;
                    match DecodedEvent::decode(&item) {
                        Some(_) => delivered += 1,
                        None => malformed += 1,
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if !got {
                    wait_readable(&ring);
                }
            }
            (delivered, malformed)
        })
    };

    let start = Instant::now();
    let mut denied = 0u64;
    while start.elapsed() < window {
        let (verdict, _) = datapath.test_run_repeat(point, &frame, 1000)?;
        ensure!(verdict == ProgramVerdict::Drop, "flood packet passed");
        denied += 1000;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = datapath.maps()?.counters()?;
    // Give the reader what is still in the ring, then stop it.
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let (delivered, malformed) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the event reader panicked"))?;
    ensure!(malformed == 0, "{malformed} events could not be decoded");

    let delta = |counter: Counter| after.get(counter) - before.get(counter);
    let lost_rate_limit = delta(Counter::EventsLostRateLimit);
    let lost_ring_full = delta(Counter::EventsLostRingFull);
    Ok(EventFlood {
        events_per_second_setting: settings.events_per_second,
        window_s: elapsed,
        denied_packets: denied,
        denied_per_s: denied as f64 / elapsed,
        delivered,
        delivered_per_s: delivered as f64 / elapsed,
        lost: lost_rate_limit + lost_ring_full,
        lost_rate_limit,
        lost_ring_full,
    })
}

/// Sleeps until the ring has data (or 10 ms pass), as the agent's epoll does.
fn wait_readable(ring: &RingBuf<MapData>) {
    let mut poll = libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for an fd the ring keeps open during the call.
    unsafe { libc::poll(&mut poll, 1, 10) };
}

pub fn run(window: Duration) -> anyhow::Result<Events> {
    let default_settings =
        flood(Settings::default(), window).context("events, shipped settings")?;
    let unlimited = flood(
        Settings::new(0, Settings::default().events_burst, 0),
        window,
    )
    .context("events, rate limit off")?;
    Ok(Events {
        delivered_per_s: default_settings.delivered_per_s,
        lost: default_settings.lost,
        default_settings,
        unlimited,
    })
}
