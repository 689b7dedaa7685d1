//! The incremental compiler against a fresh compile: random sequences of changes
//! (workloads added, removed, relabelled and moved; namespaces relabelled;
//! NetworkPolicies and ClusterNetworkPolicies added, changed and removed), each
//! compiled as the change it is, and after every step the compiled state compared
//! with a fresh compile of the same set. Ids differ between the two (they are kept
//! across updates), so both are compared canonicalised: every id replaced by what
//! it stands for. No kernel needed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use microseg::datapath::DatapathState;
use microseg::policy::{
    Compiled, Compiler, HitSlotOwner, IdentityInfo, PolicySet, PolicySetBuilder, PolicyStore,
    SetChanges, compile,
};
use microseg_common::identity::{IDENTITY_ANY, IDENTITY_WORLD};
use microseg_tests::policy_gen::{
    Changed, Scenario, document_source, mutation_strategy, scenario_strategy,
};
use proptest::{prelude::*, test_runner::TestRunner};

/// What an id stands for, in words.
fn identity_name(compiled: &Compiled, id: u32) -> String {
    match (id, compiled.identities.get(id)) {
        (IDENTITY_ANY, _) => "any".into(),
        (IDENTITY_WORLD, _) => "world".into(),
        (_, Some(IdentityInfo::Workload { key, .. })) => format!(
            "workloads({}, {:?}, {:?}, {:?})",
            key.namespace,
            key.labels.iter().collect::<Vec<_>>(),
            key.ip_blocks,
            key.named_ports
        ),
        (_, Some(IdentityInfo::Cidr { ip_blocks, .. })) => format!("cidr({ip_blocks:?})"),
        (_, None) => format!("unknown identity {id}"),
    }
}

fn rule_name(compiled: &Compiled, id: u32) -> String {
    match compiled.rules.get(id) {
        Some(rule) => format!("{rule:?}"),
        None if id == 0 => "default".into(),
        None => format!("unknown rule {id}"),
    }
}

fn endpoint_name(compiled: &Compiled, id: u32) -> String {
    compiled
        .endpoints
        .get(&id)
        .map_or_else(|| format!("unknown endpoint {id}"), |e| e.workload.clone())
}

fn slot_name(compiled: &Compiled, slot: u16) -> String {
    match compiled.hit_slots.owners.get(&slot) {
        // Slot 0, or the default deny of a direction not enforced.
        _ if slot == 0 => "uncounted".into(),
        Some(HitSlotOwner::Rule(id)) => format!("rule {}", rule_name(compiled, *id)),
        Some(HitSlotOwner::DefaultDeny {
            endpoint_id,
            direction,
        }) => format!(
            "default deny {} {direction:?}",
            endpoint_name(compiled, *endpoint_id)
        ),
        None => "unowned slot".into(),
    }
}

/// The compiled state with every id replaced by what it stands for.
fn canonical(compiled: &Compiled) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let DatapathState {
        endpoints,
        peer_hosts,
        peer_prefixes,
        policy,
        interfaces: _,
    } = &compiled.state;
    for (address, info) in endpoints {
        out.insert(
            format!("endpoint {address}"),
            format!(
                "{} flags {:#x} default denies [{}, {}]",
                endpoint_name(compiled, info.endpoint_id),
                info.flags,
                slot_name(compiled, info.default_deny_hit_slot(true)),
                slot_name(compiled, info.default_deny_hit_slot(false))
            ),
        );
    }
    for (address, id) in peer_hosts {
        out.insert(format!("host {address}"), identity_name(compiled, *id));
    }
    for (prefix, id) in peer_prefixes {
        out.insert(format!("prefix {prefix}"), identity_name(compiled, *id));
    }
    for (key, entry) in policy {
        out.insert(
            format!(
                "policy {} {} {:?} {:?} {:?}",
                endpoint_name(compiled, key.endpoint_id),
                identity_name(compiled, key.identity),
                key.direction,
                key.protocol,
                key.port_block
            ),
            format!(
                "{} {} counted as {}",
                if entry.is_deny() { "deny" } else { "allow" },
                rule_name(compiled, entry.rule_id),
                slot_name(compiled, entry.hit_slot)
            ),
        );
    }
    out
}

fn set_changes(changed: &Changed) -> SetChanges {
    SetChanges {
        workloads: changed.workloads.iter().cloned().map(Arc::new).collect(),
        policies: changed.policies.iter().cloned().collect(),
        cluster_policies: changed.cluster_policies.iter().cloned().collect(),
        namespaces: changed.namespaces.iter().cloned().collect::<BTreeSet<_>>(),
        nodes: false,
    }
}

fn assert_same(step: &str, compiler: &Compiler, set: &PolicySet) -> Result<(), TestCaseError> {
    let incremental = canonical(&compiler.compiled());
    let fresh = canonical(&compile(set));
    if incremental != fresh {
        let only_incremental: Vec<_> = incremental
            .iter()
            .filter(|(k, v)| fresh.get(*k) != Some(v))
            .collect();
        let only_fresh: Vec<_> = fresh
            .iter()
            .filter(|(k, v)| incremental.get(*k) != Some(v))
            .collect();
        return Err(TestCaseError::fail(format!(
            "{step}: the incremental state differs from a fresh compile\nincremental only: {only_incremental:#?}\nfresh only: {only_fresh:#?}"
        )));
    }
    Ok(())
}

/// A set as text, its address index by workload rather than by slot.
fn set_view(set: &PolicySet) -> String {
    let addresses: BTreeMap<String, String> = set
        .workloads
        .iter()
        .flat_map(|w| w.addresses.iter().map(move |a| (a.to_string(), w.key())))
        .collect();
    let indexed: BTreeMap<String, String> = addresses
        .keys()
        .filter_map(|a| {
            let workload = set.workload_by_address(a.parse().ok()?)?;
            Some((a.clone(), workload.key()))
        })
        .collect();
    format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{indexed:?} (of {addresses:?})",
        set.namespaces,
        set.workloads,
        set.policies,
        set.cluster_policies,
        set.nodes,
        set.refused_policies
    )
}

/// Feeds the store the documents of `scenario` that differ from `before`; checks
/// that its set is the one a builder makes of all of them, and returns what changed.
fn feed(
    store: &mut PolicyStore<String>,
    before: &BTreeMap<String, serde_json::Value>,
    scenario: &Scenario,
) -> Result<(SetChanges, BTreeMap<String, serde_json::Value>), TestCaseError> {
    let after: BTreeMap<String, serde_json::Value> = scenario.documents().into_iter().collect();
    let mut changes = Vec::new();
    for key in before.keys().chain(after.keys()).collect::<BTreeSet<_>>() {
        let (old, new) = (before.get(key), after.get(key));
        if old == new {
            continue;
        }
        let converted = new
            .map(|value| PolicySetBuilder::convert_document(&document_source(key), value, false));
        changes.push((key.clone(), converted));
    }
    let touched = store
        .apply(changes)
        .map_err(|errors| TestCaseError::fail(format!("the store refused: {errors}")))?;
    let built = scenario.build();
    prop_assert_eq!(set_view(store.set()), set_view(&built));
    Ok((touched, after))
}

#[test]
fn the_store_and_the_compiler_follow_changes_as_a_fresh_build_and_compile_would() {
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        cases: 200,
        failure_persistence: None,
        ..Default::default()
    });
    let steps = prop::collection::vec(mutation_strategy(), 1..=12);
    let result = runner.run(&(scenario_strategy(), steps), |(scenario, mutations)| {
        let mut scenario = scenario;
        let mut store = PolicyStore::<String>::default();
        let mut compiler = Compiler::default();
        let (touched, mut documents) = feed(&mut store, &BTreeMap::new(), &scenario)?;
        compiler.update(store.set(), &touched);
        assert_same("first compile", &compiler, store.set())?;
        for (index, mutation) in mutations.iter().enumerate() {
            scenario.apply(mutation);
            let touched;
            (touched, documents) = feed(&mut store, &documents, &scenario)?;
            compiler.update(store.set(), &touched);
            assert_same(
                &format!("after step {index}: {mutation:?}"),
                &compiler,
                store.set(),
            )?;
        }
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}

#[test]
fn every_update_leaves_the_state_a_fresh_compile_gives() {
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        cases: 300,
        failure_persistence: None,
        ..Default::default()
    });
    let steps = prop::collection::vec(mutation_strategy(), 1..=12);
    let updates = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&(scenario_strategy(), steps), |(scenario, mutations)| {
        let mut scenario = scenario;
        let mut compiler = Compiler::default();
        let set = scenario.build();
        compiler.update(&set, &SetChanges::everything(&set));
        assert_same("first compile", &compiler, &set)?;
        for (index, mutation) in mutations.iter().enumerate() {
            let changed = scenario.apply(mutation);
            let set = scenario.build();
            compiler.update(&set, &set_changes(&changed));
            updates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert_same(
                &format!("after step {index}: {mutation:?}"),
                &compiler,
                &set,
            )?;
        }
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    println!(
        "incremental compiler: {} updates, each equal to a fresh compile",
        updates.into_inner()
    );
}
