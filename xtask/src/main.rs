//! `cargo xtask setup|test|demo`: the project's driver. `test` and `demo` run `setup`
//! first, so on a fresh machine the README's two commands are all a newcomer types.

mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "microseg's set-up, test and demo driver")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what a fresh machine lacks (idempotent): rust-src for nightly,
    /// bpf-linker 0.10.0, Debian packages; mount bpffs.
    Setup,
    /// Run every test: unit, kernel (BPF_PROG_TEST_RUN) and end-to-end (netns).
    Test,
    /// The main job: enforce a default-deny policy between network namespaces and
    /// show what passes, what is blocked, and the deny events.
    Demo,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test => {
            setup::run()?;
            test::run()
        }
        Command::Demo => {
            setup::run()?;
            // The demo drives the `microseg` binary (agent and CLI): build it first.
            let built = std::process::Command::new("cargo")
                .args(["build", "--quiet", "--package", "microseg-agent", "--bins"])
                .status()?;
            anyhow::ensure!(built.success(), "building microseg failed ({built})");
            let status = std::process::Command::new("cargo")
                .args(["run", "--quiet", "--package", "microseg-tests", "--bin", "microseg-demo"])
                .status()?;
            anyhow::ensure!(status.success(), "the demo failed ({status})");
            Ok(())
        }
    }
}
