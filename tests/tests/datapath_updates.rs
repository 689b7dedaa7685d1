//! Policy updates: the generation switch is atomic, a full map is refused whole, and
//! pinned state survives the process that loaded it.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use microseg::datapath::{
    AttachPoint, Capacities, Datapath, DatapathError, DatapathState, LoadOptions, ProgramVerdict,
    XdpAttachMode, detach_pinned, probe::Probe,
};
use microseg_common::policy::Direction;
use microseg_tests::{
    harness::{StateBuilder, ip},
    netns::unique_name,
};

const TCP: Option<u8> = Some(6);
const XDP: AttachPoint = AttachPoint::Xdp(XdpAttachMode::Default);

/// A pin directory unique to the test, removed (links and maps) on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        Self(PathBuf::from("/sys/fs/bpf").join(unique_name("microseg-test-")))
    }
    fn options(&self) -> LoadOptions {
        LoadOptions {
            pin_dir: Some(self.0.clone()),
            capacities: Capacities::default(),
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = detach_pinned(&self.0);
    }
}

/// Under both generations the probe is allowed, each time through different map
/// entries: the client's identity is 300 in one and 301 in the other, and each
/// generation's rule names its own identity. A packet judged by a mix (one
/// generation's identity with the other's rule) is denied.
fn generation(client_identity: u32) -> DatapathState {
    StateBuilder::default()
        .endpoint("10.5.0.1", 1, true, false, false)
        .host("10.5.0.2", client_identity)
        .allow(
            1,
            client_identity,
            Direction::Ingress,
            TCP,
            Some((80, 80)),
            client_identity,
        )
        .build()
}

#[test]
fn no_packet_is_judged_by_a_mix_of_two_generations() {
    if !microseg_tests::kernel_available("no_packet_is_judged_by_a_mix_of_two_generations") {
        return;
    }
    let pins = PinDir::new();
    // Two loads over the same pinned maps: one judges packets while the other
    // switches generations.
    let judge = Datapath::load(&pins.options()).expect("load");
    let mut writer = Datapath::load(&pins.options()).expect("load again");
    let mut current = DatapathState::default();
    let first = generation(300);
    writer.apply(&current, &first).unwrap();
    current = first;

    let done = AtomicBool::new(false);
    let judged = AtomicU64::new(0);
    let denied = Arc::new(AtomicU64::new(0));
    const SWITCHES: u32 = 200;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut port = 1024u16;
            while !done.load(Ordering::Relaxed) {
                // A new source port each time: a new flow, so conntrack does not
                // skip the policy lookup.
                port = port.checked_add(1).unwrap_or(1024);
                let frame = Probe::tcp(ip("10.5.0.2"), port, ip("10.5.0.1"), 80).to_frame();
                if judge.test_run(XDP, &frame).unwrap() != ProgramVerdict::Pass {
                    denied.fetch_add(1, Ordering::Relaxed);
                }
                judged.fetch_add(1, Ordering::Relaxed);
            }
        });
        for i in 0..SWITCHES {
            let next = generation(if i % 2 == 0 { 301 } else { 300 });
            writer.apply(&current, &next).unwrap();
            current = next;
        }
        done.store(true, Ordering::Relaxed);
    });
    let judged = judged.load(Ordering::Relaxed);
    let generation_now = writer.maps().unwrap().live_generation().unwrap();
    assert_eq!(generation_now, SWITCHES + 1);
    assert!(
        judged > 100,
        "only {judged} packets were judged during the switches"
    );
    assert_eq!(
        denied.load(Ordering::Relaxed),
        0,
        "{judged} packets judged across {SWITCHES} switches; some saw a mix"
    );
    println!("{judged} packets judged across {SWITCHES} generation switches, none by a mix");
}

#[test]
fn a_full_map_is_refused_whole_and_the_old_policy_stays() {
    if !microseg_tests::kernel_available("a_full_map_is_refused_whole_and_the_old_policy_stays") {
        return;
    }
    let capacities = Capacities {
        policy: 8,
        ..Capacities::default()
    };
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: None,
        capacities,
    })
    .unwrap();
    let old = generation(300);
    datapath.apply(&DatapathState::default(), &old).unwrap();
    // Five policy entries: with the old generation beside them, 5 + 1 fit in 8, but
    // after the switch both slots hold five: 10 > 8.
    let mut too_big = StateBuilder::default()
        .endpoint("10.5.0.1", 1, true, false, false)
        .host("10.5.0.2", 300);
    for port in [22u16, 80, 443, 5432, 6379] {
        too_big = too_big.allow(
            1,
            300,
            Direction::Ingress,
            TCP,
            Some((port, port)),
            port as u32,
        );
    }
    let error = datapath.apply(&old, &too_big.build()).unwrap_err();
    match &error {
        DatapathError::MapFull {
            map,
            needed,
            capacity,
        } => {
            assert_eq!(
                *map, "POLICY_EXACT",
                "single-port rules live in the exact-port map"
            );
            assert_eq!((*needed, *capacity), (10, 8));
        }
        other => panic!("expected MapFull, got {other}"),
    }
    assert!(error.to_string().contains("POLICY_EXACT"), "{error}");
    // Nothing was written: port 80 still passes, 22 is still denied.
    let allowed = Probe::tcp(ip("10.5.0.2"), 1, ip("10.5.0.1"), 80);
    let denied = Probe::tcp(ip("10.5.0.2"), 1, ip("10.5.0.1"), 22);
    assert_eq!(
        datapath.test_run(XDP, &allowed.to_frame()).unwrap(),
        ProgramVerdict::Pass
    );
    assert_eq!(
        datapath.test_run(XDP, &denied.to_frame()).unwrap(),
        ProgramVerdict::Drop
    );
    let maps = datapath.maps().unwrap();
    assert_eq!(maps.live_generation().unwrap(), 1);
    let read_back = microseg::datapath::apply::read_slot(&maps, 1).unwrap();
    assert_eq!(read_back, old);
    let _ = maps.counters().unwrap();
}

#[test]
fn pinned_maps_keep_the_state_for_the_next_load() {
    if !microseg_tests::kernel_available("pinned_maps_keep_the_state_for_the_next_load") {
        return;
    }
    let pins = PinDir::new();
    let state = generation(300);
    {
        let mut first = Datapath::load(&pins.options()).unwrap();
        first.apply(&DatapathState::default(), &state).unwrap();
    }
    // A new load (as a restarted agent does) finds the state in the pinned maps.
    let mut second = Datapath::load(&pins.options()).unwrap();
    assert_eq!(second.adopt_state().unwrap(), state);
    let probe = Probe::tcp(ip("10.5.0.2"), 1, ip("10.5.0.1"), 22);
    assert_eq!(
        second.test_run(XDP, &probe.to_frame()).unwrap(),
        ProgramVerdict::Drop
    );
    drop(second);
    assert_eq!(detach_pinned(&pins.0).unwrap(), 0, "no links were pinned");
    assert!(!pins.0.exists(), "detach removes the pins");
}

/// A state of `count` single-port rules for endpoint 1 from identity 300, ports from
/// `first_port`.
fn rules(first_port: u16, count: u16) -> DatapathState {
    let mut builder = StateBuilder::default()
        .endpoint("10.5.0.1", 1, true, false, false)
        .host("10.5.0.2", 300);
    for port in first_port..first_port + count {
        builder = builder.allow(1, 300, Direction::Ingress, TCP, Some((port, port)), 1);
    }
    builder.build()
}

#[test]
fn an_update_replacing_every_entry_fits_in_old_plus_new() {
    if !microseg_tests::kernel_available("an_update_replacing_every_entry_fits_in_old_plus_new") {
        return;
    }
    // Room for exactly the old and the new state of 50 entries each (both slots).
    let capacities = Capacities {
        policy: 200,
        ..Capacities::default()
    };
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: None,
        capacities,
    })
    .unwrap();
    let old = rules(1000, 100);
    datapath.apply(&DatapathState::default(), &old).unwrap();
    // Every entry replaced; the new keys sort before the old ones, so a writer that
    // followed key order would insert all 100 before deleting any: 300 > 200. Writing
    // deletions first keeps the standby slot within its share.
    let new = rules(100, 100);
    datapath
        .apply(&old, &new)
        .expect("old and new together fit in both slots");
    let maps = datapath.maps().unwrap();
    let live = maps.live_generation().unwrap();
    assert_eq!(
        microseg::datapath::apply::read_slot(&maps, (live & 1) as u8).unwrap(),
        new
    );
}

#[test]
fn a_repaired_standby_slot_carries_the_prefix_rule_flag() {
    if !microseg_tests::kernel_available("a_repaired_standby_slot_carries_the_prefix_rule_flag") {
        return;
    }
    use microseg::datapath::addr::to_mapped;
    use microseg_common::{addr::AddrKey, endpoint::ENDPOINT_FLAG_PREFIX_RULES};
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: None,
        capacities: Capacities::default(),
    })
    .unwrap();
    // A port range: its entries live in the prefix trie, which the endpoint's flag
    // tells the programs to search.
    let state = StateBuilder::default()
        .endpoint("10.5.0.1", 1, true, false, false)
        .host("10.5.0.2", 300)
        .allow(1, 300, Direction::Ingress, TCP, Some((8000, 8007)), 1)
        .build();
    datapath.apply(&DatapathState::default(), &state).unwrap();
    let key = |slot: u8| AddrKey::new(slot, to_mapped(ip("10.5.0.1")));
    let (live, standby) = {
        let mut maps = datapath.maps().unwrap();
        let live = maps.live_generation().unwrap();
        let standby = ((live + 1) & 1) as u8;
        let flags = |maps: &microseg::datapath::maps::DatapathMaps<'_>, slot| {
            maps.endpoints.get(&key(slot), 0).unwrap().flags & ENDPOINT_FLAG_PREFIX_RULES
        };
        assert_ne!(flags(&maps, live as u8 & 1), 0, "applied with the flag");
        assert_ne!(flags(&maps, standby), 0, "both slots");
        // An update cut off after the switch: the standby slot lost the endpoint.
        maps.endpoints.remove(&key(standby)).unwrap();
        (live, standby)
    };
    datapath.repair_standby().unwrap();
    {
        let mut maps = datapath.maps().unwrap();
        let repaired = maps.endpoints.get(&key(standby), 0).unwrap();
        assert_ne!(
            repaired.flags & ENDPOINT_FLAG_PREFIX_RULES,
            0,
            "the repaired endpoint must send lookups to the prefix trie"
        );
        // And once that slot is live, the range still allows.
        maps.set_live_generation(live + 1).unwrap();
    }
    let probe = Probe::tcp(ip("10.5.0.2"), 40_000, ip("10.5.0.1"), 8003);
    assert_eq!(
        datapath.test_run(XDP, &probe.to_frame()).unwrap(),
        ProgramVerdict::Pass
    );
}
