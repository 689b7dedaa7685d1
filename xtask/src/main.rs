//! `cargo xtask setup|test|demo|bench|fuzz`: the project's driver. `test` and `demo` run
//! `setup` first, so on a fresh machine the README's two commands are all a newcomer
//! types.

mod bench_driver;
mod fuzz;
mod setup;
mod test;

use clap::{Parser, Subcommand};

use crate::setup::Needs;

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
    /// Benchmark: per-packet cost (BPF_PROG_TEST_RUN), real traffic against
    /// iptables and nftables, control plane, events, memory. Writes
    /// target/microseg-bench/report.{json,md} and plots.
    Bench {
        /// Smaller scales and short windows (under two minutes): a smoke run.
        #[arg(long)]
        quick: bool,
        /// The cluster simulation instead: three nodes with their own agents and
        /// real pods, 5,000 pods and 500 policies as API objects, churn and
        /// faults, then one node's cost as the cluster grows (with --quick: the
        /// small size the tests run). Writes target/microseg-bench/cluster/.
        #[arg(long)]
        cluster: bool,
    },
    /// Fuzzing: the policy and inventory loaders (libFuzzer, nightly) and the packet
    /// parser through the real programs (BPF_PROG_TEST_RUN), N seconds per target.
    /// Crashes go to target/fuzz/artifacts/<target>/ (see fuzz/README.md).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target: policy_files, agent_objects or packets.
        #[arg(long)]
        target: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(Needs::Everything),
        Command::Bench { quick, cluster } => {
            setup::run(Needs::Everything)?;
            if cluster {
                bench_driver::run_cluster(quick)
            } else {
                bench_driver::run(quick)
            }
        }
        Command::Fuzz { seconds, target } => {
            setup::run(Needs::Everything)?;
            fuzz::run(seconds, target.as_deref())
        }
        Command::Test => {
            setup::run(Needs::Everything)?;
            test::run()
        }
        Command::Demo => {
            setup::run(Needs::Demo)?;
            // The demo drives the `microseg` binary (agent and CLI): build it first.
            let built = std::process::Command::new("cargo")
                .args(["build", "--quiet", "--package", "microseg-agent", "--bins"])
                .status()?;
            anyhow::ensure!(built.success(), "building microseg failed ({built})");
            let status = std::process::Command::new("cargo")
                .args([
                    "run",
                    "--quiet",
                    "--package",
                    "microseg-tests",
                    "--bin",
                    "microseg-demo",
                ])
                .status()?;
            anyhow::ensure!(status.success(), "the demo failed ({status})");
            Ok(())
        }
    }
}
