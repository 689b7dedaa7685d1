//! Control plane: how long it takes to compile and apply 10,000 NetworkPolicies over
//! 10,000 workloads, to enforce one changed policy, and to be ready after a restart.
//!
//! The policy set: workloads `w<i>` (label `app=w<i>`) in 100 namespaces of 100;
//! policy `p<i>` selects `w<i>` and allows ingress on TCP 8080 from the next workload
//! of its namespace. Each workload is thus an enforced endpoint with one rule.
//!
//! - `apply_10k_ms`: `Datapath::apply` of the compiled state onto empty maps (both
//!   generation slots written, then the switch); the compile time is reported beside
//!   it (`compile_10k_ms`).
//! - `changes`: one change of each type, in turn, through the agent's own path: the
//!   changed objects (Pod and NetworkPolicy objects as the agent holds them) put in
//!   the object store, which updates the policy set in place (`build_ms`), the
//!   compiler's update from that change (`compile_ms`: ids, identities, selectors
//!   and endpoints kept from every earlier state), the data path's writing of the
//!   changed entries up to the switch (`apply_ms`, `entries_written` per generation
//!   slot), and, off the path to enforcement, the grace period and the old slot's
//!   rewrite the agent's standby writer does next (`standby_ms`). A second
//!   instance of the programs, sharing the pinned maps, runs a probe whose verdict
//!   the change flips through BPF_PROG_TEST_RUN in a tight loop on the other core;
//!   `to_enforced_ms` is the compile time plus the time from the start of the
//!   apply to the first packet judged by the new state (the compile runs before
//!   the poller starts, which would otherwise take the other vCPU from it);
//!   `from_rebuild_ms` adds the store's update. The changes: policy `p0`
//!   gains UDP 9000 (probe `w1 -> w0 UDP 9000` passes); pod `extra` with `w1`'s labels
//!   added (`extra -> w0 TCP 8080` passes); pod `w1` relabelled (`w1 -> w0 TCP 8080`
//!   drops); pod `extra` removed (`extra -> w0 TCP 8080` drops).
//! - `update_*`: the policy change above, as earlier reports named it.
//! - `restart_ready_ms`: with the state in pinned maps and no process holding them, a
//!   fresh `Datapath::load` of the pin directory, `adopt_state()`, and test runs that
//!   give the right verdicts (one allowed probe, one denied probe).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{Arc, Barrier, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use microseg::{
    datapath::StateDiff,
    datapath::{
        AttachPoint, Capacities, Datapath, DatapathState, LoadOptions, ProgramVerdict,
        detach_pinned, probe::Probe,
    },
    objects::{ObjectChange, ObjectKey, ObjectMap, ObjectStore, StoredObject},
    policy::Compiler,
};
use serde::Serialize;

use crate::{memory, progress::Progress};

const FIRST_ADDRESS: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const PER_NAMESPACE: u32 = 100;
const TCP_PORT: u16 = 8080;
const NEW_UDP_PORT: u16 = 9000;

#[derive(Clone, Debug, Serialize)]
pub struct ControlPlane {
    pub policies: u32,
    pub workloads: u32,
    pub compile_10k_ms: f64,
    pub apply_10k_ms: f64,
    pub policy_entries: usize,
    pub endpoints: usize,
    /// Compiling the set after one policy changed (ids kept from the first compile).
    pub update_compile_ms: f64,
    /// The `apply_changes` call of the one-policy diff, start to the switch (the
    /// grace period and the old slot's rewrite come after, in `standby_ms`).
    pub update_apply_ms: f64,
    pub update_to_enforced_ms: f64,
    /// Probe runs the other core made while waiting for the new verdict.
    pub update_polls: u64,
    /// One change of each type, in the order made.
    pub changes: Vec<ChangeFigures>,
    pub restart_ready_ms: f64,
    pub restart_load_ms: f64,
    pub restart_adopt_ms: f64,
}

/// What one change cost, from the rebuilt set to the first packet judged by it.
#[derive(Clone, Debug, Serialize)]
pub struct ChangeFigures {
    pub change: &'static str,
    pub build_ms: f64,
    pub compile_ms: f64,
    pub apply_ms: f64,
    /// After the switch, off the path to enforcement: the grace period and the old
    /// slot's rewrite (`Datapath::finish_standby`).
    pub standby_ms: f64,
    /// Map entries written per generation slot (added, changed or deleted).
    pub entries_written: usize,
    /// From the start of the compile to the first packet judged by the new state.
    pub to_enforced_ms: f64,
    /// The same, from the start of the rebuild of the policy set.
    pub from_rebuild_ms: f64,
    pub polls: u64,
}

/// The variations of the policy set that the changes step through.
#[derive(Clone, Copy, Default)]
struct Variation {
    /// `p0` also allows UDP 9000.
    extra_udp: bool,
    /// Pod `extra` (labels of `w1`) exists.
    extra_pod: bool,
    /// `w1` carries `app=w1-relabelled`.
    w1_relabelled: bool,
}

/// The address of pod `extra`, outside the `w<i>` range.
fn extra_address() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 95, 255, 1))
}

fn address(index: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(FIRST_ADDRESS + index))
}

fn namespace_of(index: u32) -> String {
    format!("ns-{:03}", index / PER_NAMESPACE)
}

/// The peer `w<i>` accepts: the next workload of its namespace.
fn partner(index: u32) -> u32 {
    (index / PER_NAMESPACE) * PER_NAMESPACE + (index % PER_NAMESPACE + 1) % PER_NAMESPACE
}

fn policy_document(index: u32, extra_udp: bool) -> serde_json::Value {
    let mut ports = vec![serde_json::json!({ "protocol": "TCP", "port": TCP_PORT })];
    if extra_udp {
        ports.push(serde_json::json!({ "protocol": "UDP", "port": NEW_UDP_PORT }));
    }
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": format!("p{index}"), "namespace": namespace_of(index) },
        "spec": {
            "podSelector": { "matchLabels": { "app": format!("w{index}") } },
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{ "podSelector": { "matchLabels": { "app": format!("w{}", partner(index)) } } }],
                "ports": ports
            }]
        }
    })
}

fn pod_document(name: &str, namespace: &str, app: &str, address: IpAddr) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "labels": { "app": app } },
        "status": { "phase": "Running", "podIP": address.to_string() }
    })
}

/// The objects of `count` policies over `count` pods, varied by `variation`, as the
/// agent holds them: an object equal to one in `previous` is that object (the
/// agent's watch keeps an unchanged object's value, and so its conversion).
fn objects_for(
    count: u32,
    variation: Variation,
    previous: &ObjectMap,
) -> anyhow::Result<ObjectMap> {
    let mut documents = Vec::new();
    for index in 0..count {
        let app = if index == 1 && variation.w1_relabelled {
            "w1-relabelled".to_owned()
        } else {
            format!("w{index}")
        };
        documents.push(pod_document(
            &format!("w{index}"),
            &namespace_of(index),
            &app,
            address(index),
        ));
        documents.push(policy_document(index, variation.extra_udp && index == 0));
    }
    if variation.extra_pod {
        documents.push(pod_document(
            "extra",
            &namespace_of(0),
            "w1",
            extra_address(),
        ));
    }
    let mut objects = ObjectMap::new();
    for value in documents {
        let key = ObjectKey::new(
            value["kind"].as_str().unwrap_or_default().to_owned(),
            value["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        let object = StoredObject::new("microseg-bench.yaml".to_owned(), 1, &value);
        let object = match previous.get(&key) {
            Some(known) if known.value == object.value => known.clone(),
            _ => object,
        };
        ensure!(objects.insert(key, object).is_none(), "duplicate object");
    }
    Ok(objects)
}

/// The objects that differ between `old` and `new`, as the changes the agent's
/// watches hand its enforcer.
fn object_changes(old: &ObjectMap, new: &ObjectMap) -> Vec<ObjectChange> {
    let mut changes: Vec<ObjectChange> = new
        .iter()
        .filter(|(key, object)| old.get(*key) != Some(*object))
        .map(|(key, object)| (key.clone(), Some(object.clone())))
        .collect();
    changes.extend(
        old.keys()
            .filter(|key| !new.contains_key(*key))
            .map(|key| (key.clone(), None)),
    );
    changes
}

/// The agent's path from object changes to what the maps must change: the store
/// updated in place (`build_ms`), the compiler's update (`compile_ms`).
fn compile_changes(
    store: &mut ObjectStore,
    compiler: &mut Compiler,
    changes: &[ObjectChange],
) -> anyhow::Result<(StateDiff, f64, f64)> {
    let start = Instant::now();
    let set_changes = store
        .apply(changes, &|_, _| false)
        .map_err(|errors| anyhow::anyhow!("the control-plane policy set is invalid: {errors:?}"))?;
    let build_ms = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let compiled = compiler.update(store.set(), &set_changes);
    let compile_ms = start.elapsed().as_secs_f64() * 1e3;
    let diff = StateDiff {
        endpoints: compiled.endpoints,
        peer_hosts: compiled.peer_hosts,
        peer_prefixes: compiled.peer_prefixes,
        policy: compiled.policy,
        interfaces: Default::default(),
    };
    Ok((diff, build_ms, compile_ms))
}

/// Removes the pinned maps when the measurement ends, however it ends.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = detach_pinned(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_pinned(dir: &Path) -> anyhow::Result<Datapath> {
    Datapath::load(&LoadOptions {
        pin_dir: Some(dir.to_owned()),
        capacities: Capacities::default(),
    })
    .context("loading microseg's programs with the benchmark's pin directory")
}

fn verdict(datapath: &Datapath, probe: &Probe) -> anyhow::Result<ProgramVerdict> {
    Ok(datapath.test_run(AttachPoint::TcIngress, &probe.to_frame())?)
}

fn expect(datapath: &Datapath, probe: &Probe, want: ProgramVerdict) -> anyhow::Result<()> {
    let got = verdict(datapath, probe)?;
    ensure!(
        got == want,
        "probe {probe:?}: verdict {got:?}, expected {want:?}"
    );
    Ok(())
}

pub fn run(count: u32, progress: &Progress) -> anyhow::Result<ControlPlane> {
    ensure!(
        count >= PER_NAMESPACE && count.is_multiple_of(PER_NAMESPACE),
        "whole namespaces of {PER_NAMESPACE}"
    );
    progress.step(format!("control plane: compiling {count} policies"));
    let mut compiler = Compiler::default();
    let mut store = ObjectStore::default();
    let mut objects = objects_for(count, Variation::default(), &ObjectMap::new())?;
    let (diff, build_ms, compile_ms) = compile_changes(
        &mut store,
        &mut compiler,
        &object_changes(&ObjectMap::new(), &objects),
    )?;
    let compile_ms = build_ms + compile_ms;
    let counts = compiler.state().counts();
    ensure!(
        counts.endpoints == count as usize && counts.policy == count as usize,
        "compiled {counts:?} from {count} policies, expected {count} endpoints and entries"
    );

    let pin = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/microseg-bench-{}",
        std::process::id()
    )));
    let _ = detach_pinned(&pin.0);
    let mut datapath = load_pinned(&pin.0)?;
    progress.step(format!("control plane: applying {count} policies"));
    let mut current = DatapathState::default();
    let start = Instant::now();
    datapath.apply_changes(&mut current, &diff, true)?;
    datapath.finish_standby()?;
    let apply_ms = start.elapsed().as_secs_f64() * 1e3;
    drop(diff);

    // w1 may reach w0 on TCP 8080 (p0's rule), not the other way; UDP 9000 not yet.
    let allowed = Probe::tcp(address(1), 40_000, address(0), TCP_PORT);
    let denied = Probe::tcp(address(0), 40_000, address(1), TCP_PORT);
    let udp = Probe::udp(address(1), 40_001, address(0), NEW_UDP_PORT);
    let from_extra = Probe::tcp(extra_address(), 40_002, address(0), TCP_PORT);
    expect(&datapath, &allowed, ProgramVerdict::Pass)?;
    expect(&datapath, &denied, ProgramVerdict::Drop)?;
    expect(&datapath, &udp, ProgramVerdict::Drop)?;
    expect(&datapath, &from_extra, ProgramVerdict::Drop)?;

    let steps = [
        (
            "policy changed",
            Variation {
                extra_udp: true,
                ..Variation::default()
            },
            &udp,
            ProgramVerdict::Pass,
        ),
        (
            "pod added",
            Variation {
                extra_udp: true,
                extra_pod: true,
                ..Variation::default()
            },
            &from_extra,
            ProgramVerdict::Pass,
        ),
        (
            "labels changed",
            Variation {
                extra_udp: true,
                extra_pod: true,
                w1_relabelled: true,
            },
            &allowed,
            ProgramVerdict::Drop,
        ),
        (
            "pod removed",
            Variation {
                extra_udp: true,
                extra_pod: false,
                w1_relabelled: true,
            },
            &from_extra,
            ProgramVerdict::Drop,
        ),
    ];
    let mut changes = Vec::new();
    for (change, variation, probe, wanted) in steps {
        progress.step(format!("control plane: {change}"));
        let next = objects_for(count, variation, &objects)?;
        let object_changes = object_changes(&objects, &next);
        objects = next;
        // The harness rebuilt all 20,000 objects above (an agent's watch hands it the
        // changed one) and freed the old ones: glibc holds those small chunks in its
        // fast bins and merges them all at the next large allocation: 7-21 ms that
        // fell inside the compile (timed down to one B-tree insert that allocated a
        // node). Settled here, so the compile pays for its own work only.
        memory::return_free_memory();
        let (diff, build_ms, compile_ms) =
            compile_changes(&mut store, &mut compiler, &object_changes)?;
        let measured = update_latency(
            &pin.0,
            &mut datapath,
            &mut current,
            &diff,
            compile_ms,
            probe,
            wanted,
        )
        .with_context(|| format!("enforcing the change \"{change}\""))?;
        progress.line(format!(
            "  {change:<15} rebuild {build_ms:>7.1} ms, compile {:>6.1} ms, apply {:>6.1} ms (then standby {:>5.1} ms), {:>3} entries, judged {:>6.1} ms after the compile started",
            measured.compile_ms, measured.apply_ms, measured.standby_ms, measured.entries_written, measured.to_enforced_ms
        ));
        changes.push(ChangeFigures {
            change,
            build_ms,
            compile_ms: measured.compile_ms,
            apply_ms: measured.apply_ms,
            standby_ms: measured.standby_ms,
            entries_written: measured.entries_written,
            to_enforced_ms: measured.to_enforced_ms,
            from_rebuild_ms: build_ms + measured.to_enforced_ms,
            polls: measured.polls,
        });
    }
    let policy_change = &changes[0];
    ensure!(
        policy_change.entries_written == 1,
        "the changed policy should write exactly one entry, not {}",
        policy_change.entries_written
    );
    let new_state = current;
    ensure!(
        compiler.counters.full_compiles == 1,
        "every change after the first should be incremental, {} full compiles",
        compiler.counters.full_compiles
    );

    progress.step("control plane: restart with pinned state");
    drop(datapath);
    let start = Instant::now();
    let mut restarted = load_pinned(&pin.0)?;
    let restart_load_ms = start.elapsed().as_secs_f64() * 1e3;
    let adopted = restarted.adopt_state()?;
    let restart_adopt_ms = start.elapsed().as_secs_f64() * 1e3 - restart_load_ms;
    // w1 was relabelled by the changes: w3 -> w2 is the unchanged pair.
    let unchanged_allowed = Probe::tcp(address(3), 40_003, address(2), TCP_PORT);
    let unchanged_denied = Probe::tcp(address(2), 40_003, address(3), TCP_PORT);
    expect(&restarted, &unchanged_allowed, ProgramVerdict::Pass)?;
    expect(&restarted, &unchanged_denied, ProgramVerdict::Drop)?;
    let restart_ready_ms = start.elapsed().as_secs_f64() * 1e3;
    ensure!(
        adopted == new_state,
        "the adopted state differs from the applied one"
    );
    drop(restarted);
    drop(pin);

    Ok(ControlPlane {
        policies: count,
        workloads: count,
        compile_10k_ms: compile_ms,
        apply_10k_ms: apply_ms,
        policy_entries: counts.policy,
        endpoints: counts.endpoints,
        update_compile_ms: changes[0].compile_ms,
        update_apply_ms: changes[0].apply_ms,
        update_to_enforced_ms: changes[0].to_enforced_ms,
        update_polls: changes[0].polls,
        changes,
        restart_ready_ms,
        restart_load_ms,
        restart_adopt_ms,
    })
}

/// What `update_latency` measured.
struct Update {
    compile_ms: f64,
    apply_ms: f64,
    standby_ms: f64,
    entries_written: usize,
    to_enforced_ms: f64,
    polls: u64,
}

/// Applies `diff` (compiled in `compile_ms`) over `current` while another thread,
/// with its own instance of the programs on the same pinned maps, polls `probe`
/// until its verdict is `wanted`. The compile ran before the poller starts (the
/// poller keeps the other vCPU busy, which the agent's compile never has beside
/// it); the time to the first judged packet is the compile plus the time from the
/// start of the apply.
fn update_latency(
    pin_dir: &Path,
    datapath: &mut Datapath,
    current: &mut DatapathState,
    diff: &StateDiff,
    compile_ms: f64,
    probe: &Probe,
    wanted: ProgramVerdict,
) -> anyhow::Result<Update> {
    let ready = Arc::new(Barrier::new(2));
    let (sender, receiver) = mpsc::channel::<anyhow::Result<(Instant, u64)>>();
    let frame = probe.to_frame();
    let poller = {
        let ready = ready.clone();
        let pin_dir = pin_dir.to_owned();
        std::thread::spawn(move || {
            let result = (|| -> anyhow::Result<(Instant, u64)> {
                let observer = load_pinned(&pin_dir);
                ready.wait();
                let observer = observer?;
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut polls = 0u64;
                loop {
                    polls += 1;
                    // TCP probes are bare SYNs, judged by policy every time; the UDP
                    // probe only goes from drop to pass, so no flow of it is tracked.
                    if observer.test_run(AttachPoint::TcIngress, &frame)? == wanted {
                        return Ok((Instant::now(), polls));
                    }
                    if Instant::now() > deadline {
                        bail!("the change was not enforced within 10 s");
                    }
                }
            })();
            let _ = sender.send(result);
        })
    };
    ready.wait();
    // Let the poller reach its loop before the clock starts.
    std::thread::sleep(Duration::from_millis(20));
    let applying = Instant::now();
    let applied = datapath.apply_changes(current, diff, false);
    let apply_ms = applying.elapsed().as_secs_f64() * 1e3;
    let polled = receiver
        .recv_timeout(Duration::from_secs(15))
        .context("the poller thread did not answer")?;
    let _ = poller.join();
    let report = applied?;
    let (enforced_at, polls) = polled?;
    let finishing = Instant::now();
    datapath.finish_standby()?;
    let standby_ms = finishing.elapsed().as_secs_f64() * 1e3;
    Ok(Update {
        compile_ms,
        apply_ms,
        standby_ms,
        entries_written: report.changes,
        to_enforced_ms: compile_ms
            + enforced_at
                .saturating_duration_since(applying)
                .as_secs_f64()
                * 1e3,
        polls,
    })
}
