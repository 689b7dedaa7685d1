//! `cargo xtask bench --cluster`: the cluster simulation at its default size (three
//! nodes with real agents and pods, 5,000 pods and 500 NetworkPolicies as API
//! objects, 50 changes/s, faults during churn), then one node's cost at growing
//! cluster sizes and the per-node model fitted to it. Writes report.json and
//! report.md to `--out` (default target/microseg-bench/cluster). Timings are
//! reported, never asserted; the run fails only when enforcement or convergence is
//! wrong.

use std::path::PathBuf;

use clap::Parser;
use microseg_tests::{
    cluster::ClusterPlan,
    cluster_run,
    cluster_scaling::{self, Model, ScaleFigures},
};
use serde_json::json;

#[derive(Parser)]
#[command(about = "microseg's cluster simulation and per-node scaling benchmark")]
struct Cli {
    /// The small size `cargo xtask test` runs (500 pods, 20 changes/s), and
    /// smaller scaling points.
    #[arg(long)]
    small: bool,
    /// Skip the per-node scaling points.
    #[arg(long)]
    no_scaling: bool,
    /// Where to write report.json and report.md.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only measure one node's agent at this size: `PODS,POLICIES,LOCAL_PODS` (to
    /// see what an agent costs at a given cluster's size, or to profile it).
    #[arg(long, value_delimiter = ',')]
    node_only: Vec<usize>,
    /// Pod changes per measured point.
    #[arg(long, default_value_t = 15)]
    changes: usize,
}

/// The per-node figures the README extrapolates to: 5,000 nodes x 100 pods.
const TARGET_PODS: f64 = 500_000.0;
const TARGET_LOCAL_PODS: f64 = 100.0;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        microseg_tests::kernel_available("microseg-cluster"),
        "the cluster benchmark needs root, BPF and network namespaces"
    );
    let out = cli.out.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/microseg-bench/cluster")
    });
    std::fs::create_dir_all(&out)?;
    let plan = if cli.small {
        ClusterPlan::small()
    } else {
        ClusterPlan::full()
    };
    let started = std::time::Instant::now();
    let say = |step: &str| {
        eprintln!("[{:>6.1} s] {step}", started.elapsed().as_secs_f64());
    };
    anyhow::ensure!(
        matches!(cli.node_only.len(), 0 | 3),
        "--node-only takes PODS,POLICIES,LOCAL_PODS"
    );
    if let [pods, policies, local_pods] = cli.node_only[..] {
        let point = cluster_scaling::ScalePoint {
            pods,
            policies,
            local_pods,
        };
        say(&format!("one node's agent: {point:?}"));
        let figures = cluster_scaling::measure(point, cli.changes);
        println!("{}", scaling_markdown(std::slice::from_ref(&figures)));
        return Ok(());
    }
    let report = cluster_run::run(&plan, &say);
    let mut markdown = format!("## Cluster simulation\n\n{}\n", report.markdown());
    let mut scaling = Vec::new();
    if !cli.no_scaling {
        let points = if cli.small {
            cluster_scaling::quick_points()
        } else {
            cluster_scaling::default_points()
        };
        for point in points {
            say(&format!(
                "one node's agent: {} pods, {} policies, {} on its node",
                point.pods, point.policies, point.local_pods
            ));
            scaling.push(cluster_scaling::measure(point, cli.changes));
        }
        markdown.push_str(&scaling_markdown(&scaling));
    }
    let models = (!scaling.is_empty()).then(|| {
        json!({
            "rss_mib": cluster_scaling::fit(&scaling, |f| f.rss_mib),
            "apply_ms": cluster_scaling::fit(&scaling, |f| f.apply_ms),
            "cpu_ms_per_change": cluster_scaling::fit(&scaling, |f| f.cpu_ms_per_change),
        })
    });
    let json = json!({
        "seconds": started.elapsed().as_secs_f64(),
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "cluster": report,
        "scaling": scaling,
        "models": models,
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out.join("report.md"), &markdown)?;
    println!("{markdown}");
    eprintln!(
        "wrote {} and report.md ({:.0} s)",
        out.join("report.json").display(),
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        report.failures.is_empty(),
        "the cluster run found {} failures",
        report.failures.len()
    );
    Ok(())
}

fn scaling_markdown(figures: &[ScaleFigures]) -> String {
    let mut out = String::from(
        "\n## One node's agent as the cluster grows\n\n| cluster pods | policies | pods on the node | sync | RSS | pod change -> enforced | apply | CPU per change |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for f in figures {
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} ms | {:.1} MiB | {:.1} ms | {:.1} ms | {:.1} ms |\n",
            f.point.pods,
            f.point.policies,
            f.point.local_pods,
            f.sync_ms,
            f.rss_mib,
            f.change_ms,
            f.apply_ms,
            f.cpu_ms_per_change
        ));
    }
    if figures.len() < 4 {
        return out;
    }
    let rss = cluster_scaling::fit(figures, |f| f.rss_mib);
    let apply = cluster_scaling::fit(figures, |f| f.apply_ms);
    let cpu = cluster_scaling::fit(figures, |f| f.cpu_ms_per_change);
    let describe = |name: &str, unit: &str, model: &Model| {
        format!(
            "- {name} = {:.1} {unit} + {:.4} {unit} x cluster pods + {:.4} {unit} x policies + {:.3} {unit} x pods on the node\n",
            model.base, model.per_pod, model.per_policy, model.per_local_pod
        )
    };
    out.push_str("\nLeast-squares fit over the points:\n\n");
    out.push_str(&describe("RSS", "MiB", &rss));
    out.push_str(&describe("apply time per change", "ms", &apply));
    out.push_str(&describe("CPU per change", "ms", &cpu));
    out.push_str("\nExtrapolated to 5,000 nodes x 100 pods (500,000 pods; 100 on the node):\n\n| policies | RSS | apply per change | CPU per change |\n|---:|---:|---:|---:|\n");
    for policies in [5_000.0, 50_000.0] {
        out.push_str(&format!(
            "| {policies:.0} | {:.0} MiB | {:.0} ms | {:.0} ms |\n",
            rss.predict(TARGET_PODS, policies, TARGET_LOCAL_PODS),
            apply.predict(TARGET_PODS, policies, TARGET_LOCAL_PODS),
            cpu.predict(TARGET_PODS, policies, TARGET_LOCAL_PODS),
        ));
    }
    out
}
