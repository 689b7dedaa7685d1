//! `cargo xtask bench [--quick]`: builds and runs the `microseg-bench` binary.
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
