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
//! - `update_to_enforced_ms`: policy `p0` gains UDP 9000. A second instance of the
//!   programs, sharing the pinned maps, runs the probe `w1 -> w0 UDP 9000` through
//!   BPF_PROG_TEST_RUN in a tight loop on the other core; the figure is the time from
//!   the start of `apply` (recompiled state, a one-entry diff) to the first `pass`.
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
    datapath::{
        AttachPoint, Capacities, Datapath, DatapathState, LoadOptions, ProgramVerdict,
        detach_pinned, probe::Probe,
    },
    policy::{PolicySetBuilder, Source, compile},
};
use serde::Serialize;

use crate::{progress::Progress, scenario};

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
    /// Recompiling the whole set after one policy changed.
    pub update_compile_ms: f64,
    /// The `apply` call of the one-policy diff, start to return (it includes a 2 ms
    /// settle wait after the switch before the old slot is rewritten).
    pub update_apply_ms: f64,
    pub update_to_enforced_ms: f64,
    /// Probe runs the other core made while waiting for the new verdict.
    pub update_polls: u64,
    pub restart_ready_ms: f64,
    pub restart_load_ms: f64,
    pub restart_adopt_ms: f64,
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

/// Compiles `count` policies over `count` workloads; `changed` gives `p0` the extra
/// UDP port. Returns the state and the compile time.
fn compile_set(count: u32, changed: bool) -> anyhow::Result<(DatapathState, f64)> {
    let mut builder = PolicySetBuilder::new();
    let source = Source::memory("microseg-bench");
    for index in 0..count {
        let mut workload = scenario::workload(
            format!("w{index}"),
            [("app".to_owned(), format!("w{index}"))].into(),
            address(index),
        );
        workload.namespace = namespace_of(index);
        builder.add_workload(workload);
        builder.add_document(&source, &policy_document(index, changed && index == 0));
    }
    let set = builder
        .finish()
        .map_err(|errors| anyhow::anyhow!("the control-plane policy set is invalid: {errors:?}"))?;
    let start = Instant::now();
    let compiled = compile(&set);
    Ok((compiled.state, start.elapsed().as_secs_f64() * 1e3))
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
    let (state, compile_ms) = compile_set(count, false)?;
    let counts = state.counts();
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
    let start = Instant::now();
    datapath.apply(&DatapathState::default(), &state)?;
    let apply_ms = start.elapsed().as_secs_f64() * 1e3;

    // w1 may reach w0 on TCP 8080 (p0's rule), not the other way; UDP 9000 not yet.
    let allowed = Probe::tcp(address(1), 40_000, address(0), TCP_PORT);
    let denied = Probe::tcp(address(0), 40_000, address(1), TCP_PORT);
    let changed = Probe::udp(address(1), 40_001, address(0), NEW_UDP_PORT);
    expect(&datapath, &allowed, ProgramVerdict::Pass)?;
    expect(&datapath, &denied, ProgramVerdict::Drop)?;
    expect(&datapath, &changed, ProgramVerdict::Drop)?;

    progress.step("control plane: one changed policy");
    let (new_state, update_compile_ms) = compile_set(count, true)?;
    ensure!(
        new_state.policy.len() == state.policy.len() + 1,
        "the changed policy should add exactly one entry"
    );
    let (update_apply_ms, update_to_enforced_ms, update_polls) =
        update_latency(&pin.0, &mut datapath, &state, &new_state, &changed)?;

    progress.step("control plane: restart with pinned state");
    drop(datapath);
    let start = Instant::now();
    let mut restarted = load_pinned(&pin.0)?;
    let restart_load_ms = start.elapsed().as_secs_f64() * 1e3;
    let adopted = restarted.adopt_state()?;
    let restart_adopt_ms = start.elapsed().as_secs_f64() * 1e3 - restart_load_ms;
    expect(&restarted, &allowed, ProgramVerdict::Pass)?;
    expect(&restarted, &denied, ProgramVerdict::Drop)?;
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
        update_compile_ms,
        update_apply_ms,
        update_to_enforced_ms,
        update_polls,
        restart_ready_ms,
        restart_load_ms,
        restart_adopt_ms,
    })
}

/// Applies `new` over `current` while another thread, with its own instance of the
/// programs on the same pinned maps, polls `probe` until it passes. Returns (apply
/// ms, ms from the start of apply to the first pass, polls).
fn update_latency(
    pin_dir: &Path,
    datapath: &mut Datapath,
    current: &DatapathState,
    new: &DatapathState,
    probe: &Probe,
) -> anyhow::Result<(f64, f64, u64)> {
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
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut polls = 0u64;
                loop {
                    polls += 1;
                    if observer.test_run(AttachPoint::TcIngress, &frame)? == ProgramVerdict::Pass {
                        return Ok((Instant::now(), polls));
                    }
                    if Instant::now() > deadline {
                        bail!("the changed policy was not enforced within 5 s");
                    }
                }
            })();
            let _ = sender.send(result);
        })
    };
    ready.wait();
    // Let the poller reach its loop before the clock starts.
    std::thread::sleep(Duration::from_millis(20));
    let start = Instant::now();
    let applied = datapath.apply(current, new);
    let apply_ms = start.elapsed().as_secs_f64() * 1e3;
    let polled = receiver
        .recv_timeout(Duration::from_secs(10))
        .context("the poller thread did not answer")?;
    let _ = poller.join();
    applied?;
    let (enforced_at, polls) = polled?;
    let enforced_ms = enforced_at.saturating_duration_since(start).as_secs_f64() * 1e3;
    Ok((apply_ms, enforced_ms, polls))
}
