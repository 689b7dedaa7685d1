//! `cargo xtask bench [--quick] [--cluster]`: builds and runs the `microseg-bench`
//! binary, or with `--cluster` the tests crate's `microseg-cluster` (the cluster
//! simulation drives real agents, so it needs the `microseg` binary beside it).
//!
//! The benchmark links the agent library, whose build script compiles the eBPF
//! programs with tools `setup` installs; so it is a separate binary of this package
//! behind the `bench` feature, and this driver (which must build on a fresh machine)
//! only starts it. The full run is built optimised; `--quick` (a smoke run that
//! `cargo xtask test` can afford) reuses the dev build the tests already made.

use std::process::Command;

use anyhow::ensure;

pub fn run(quick: bool) -> anyhow::Result<()> {
    let mut cargo = Command::new("cargo");
    cargo.args(["run", "--quiet"]);
    if !quick {
        cargo.arg("--release");
    }
    cargo.args([
        "--package",
        "xtask",
        "--features",
        "bench",
        "--bin",
        "microseg-bench",
        "--",
    ]);
    if quick {
        cargo.arg("--quick");
    }
    let status = cargo.status()?;
    ensure!(status.success(), "the benchmark failed ({status})");
    Ok(())
}

/// `cargo xtask bench --cluster [--quick]`: the cluster simulation, optimised, with
/// the optimised agent binary it starts (one per simulated node).
pub fn run_cluster(quick: bool) -> anyhow::Result<()> {
    let built = Command::new("cargo")
        .args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "microseg-agent",
            "--bin",
            "microseg",
        ])
        .status()?;
    ensure!(built.success(), "building microseg failed ({built})");
    let mut cargo = Command::new("cargo");
    cargo.args([
        "run",
        "--quiet",
        "--release",
        "--package",
        "microseg-tests",
        "--bin",
        "microseg-cluster",
        "--",
    ]);
    if quick {
        cargo.arg("--small");
    }
    let status = cargo.status()?;
    ensure!(status.success(), "the cluster benchmark failed ({status})");
    Ok(())
}
