//! Pinned maps reused by a new load are checked for type, key and value sizes and
//! capacity. A cache whose definition changed (CONNTRACK after a change of
//! `conntrack.maxEntries`, EVENT_RATE pinned by an older version) is replaced by a
//! fresh map, and the programs on pinned links are replaced so they use it; any
//! other difference is refused with an error naming the map, both definitions and
//! `microseg detach`.

use std::path::{Path, PathBuf};

use aya::maps::MapData;
use microseg::datapath::{Capacities, Datapath, DatapathError, LoadOptions, detach_pinned};
use microseg_common::{maps, policy::Direction};
use microseg_tests::{harness::StateBuilder, netns::unique_name};

/// A pin directory unique to the test, removed (links and maps) on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        Self(PathBuf::from("/sys/fs/bpf").join(unique_name("microseg-test-")))
    }
    fn options(&self, capacities: Capacities) -> LoadOptions {
        LoadOptions {
            pin_dir: Some(self.0.clone()),
            capacities,
        }
    }
    fn map(&self, name: &str) -> PathBuf {
        self.0.join("maps").join(name)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = detach_pinned(&self.0);
    }
}

fn capacity_of(path: &Path) -> u32 {
    MapData::from_pin(path)
        .expect("pinned map")
        .info()
        .expect("map info")
        .max_entries()
}

#[test]
fn a_pinned_conntrack_of_another_capacity_is_replaced_and_the_policy_kept() {
    if !microseg_tests::kernel_available(
        "a_pinned_conntrack_of_another_capacity_is_replaced_and_the_policy_kept",
    ) {
        return;
    }
    let pins = PinDir::new();
    let small = Capacities {
        conntrack: 4096,
        ..Capacities::default()
    };
    let state = StateBuilder::default()
        .endpoint("10.6.0.1", 1, true, false, false)
        .host("10.6.0.2", 300)
        .allow(1, 300, Direction::Ingress, Some(6), Some((80, 80)), 1)
        .build();
    {
        let mut datapath = Datapath::load(&pins.options(small)).expect("load");
        assert!(datapath.replaced_maps().is_empty(), "nothing pinned before");
        datapath.apply(&Default::default(), &state).expect("apply");
    }
    assert_eq!(capacity_of(&pins.map(maps::CONNTRACK)), 4096);

    // The same capacity again: everything is reused.
    let datapath = Datapath::load(&pins.options(small)).expect("load again");
    assert!(datapath.replaced_maps().is_empty());
    drop(datapath);

    // A larger table: the pinned conntrack is replaced, the policy maps reused.
    let large = Capacities {
        conntrack: 8192,
        ..Capacities::default()
    };
    let mut datapath = Datapath::load(&pins.options(large)).expect("load with a larger table");
    let replaced = datapath.replaced_maps().join("\n");
    assert!(
        replaced.contains(maps::CONNTRACK)
            && replaced.contains("capacity 4096 pinned, 8192 wanted"),
        "{replaced}"
    );
    assert_eq!(capacity_of(&pins.map(maps::CONNTRACK)), 8192);
    let adopted = datapath.adopt_state().expect("the pinned policy");
    assert_eq!(adopted, state, "the policy maps were kept");
}

#[test]
fn a_pinned_map_of_another_type_or_capacity_is_refused_unless_it_is_a_cache() {
    if !microseg_tests::kernel_available(
        "a_pinned_map_of_another_type_or_capacity_is_refused_unless_it_is_a_cache",
    ) {
        return;
    }
    let pins = PinDir::new();
    drop(Datapath::load(&pins.options(Capacities::default())).expect("load"));

    // The event budget pinned as another type (as an older version's per-CPU bucket
    // was): a cache, replaced.
    std::fs::remove_file(pins.map(maps::EVENT_RATE)).unwrap();
    std::fs::rename(pins.map(maps::COUNTERS), pins.map(maps::EVENT_RATE)).expect("renaming a pin");
    let datapath = Datapath::load(&pins.options(Capacities::default()))
        .expect("a cache of another type is replaced");
    let replaced = datapath.replaced_maps().join("\n");
    assert!(
        replaced.contains(maps::EVENT_RATE)
            && replaced.contains("type percpu_array pinned, array wanted"),
        "{replaced}"
    );
    drop(datapath);

    // Policy state pinned with another capacity: refused, naming both.
    let other_capacity = Capacities {
        peer_hosts: 1024,
        ..Capacities::default()
    };
    let refused = Datapath::load(&pins.options(other_capacity))
        .err()
        .expect("a policy map of another capacity is refused");
    let message = refused.to_string();
    assert!(
        matches!(refused, DatapathError::IncompatiblePin { map, .. } if map == maps::PEER_HOSTS),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "capacity {} pinned, 1024 wanted",
            maps::PEER_HOSTS_CAPACITY
        )) && message.contains("microseg detach"),
        "{message}"
    );

    // Policy state pinned as another type: refused, naming both types.
    std::fs::remove_file(pins.map(maps::PEER_HOSTS)).unwrap();
    std::fs::rename(pins.map(maps::DROPS_BY_REASON), pins.map(maps::PEER_HOSTS))
        .expect("renaming a pin");
    let refused = Datapath::load(&pins.options(Capacities::default()))
        .err()
        .expect("a policy map of another type is refused");
    let message = refused.to_string();
    assert!(
        message.contains(maps::PEER_HOSTS)
            && message.contains("type percpu_array pinned, hash wanted")
            && message.contains("microseg detach"),
        "{message}"
    );
}
