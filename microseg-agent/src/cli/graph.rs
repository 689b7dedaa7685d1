//! `microseg graph`: the reachability of the running agent's policy (or of files)
//! as Graphviz DOT, SVG or a self-contained HTML page.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::review_input;
use crate::review::{
    diff::Side,
    dot,
    graph::{Graph, GroupBy},
    svg,
};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum By {
    Workload,
    Namespace,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    /// Graphviz (`dot -Tsvg`, `dot -Tpng`).
    Dot,
    /// A self-contained page: the picture (laid out by microseg) and a table.
    Html,
    /// The picture alone.
    Svg,
}

#[derive(Args)]
pub struct GraphArgs {
    /// Policy and inventory files or directories (default: the running agent's
    /// policy).
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<PathBuf>,
    /// Nodes are workloads or whole namespaces.
    #[arg(long, value_enum, default_value_t = By::Workload)]
    pub by: By,
    #[arg(short, long, value_enum, default_value_t = GraphFormat::Dot)]
    pub output: GraphFormat,
    /// Mark the denied flows of this file of JSON lines (`microseg events -o json`)
    /// instead of the agent's event history.
    #[arg(long)]
    pub flows: Option<PathBuf>,
    /// Do not mark denied flows from the agent's history.
    #[arg(long)]
    pub no_flows: bool,
}

pub fn run(socket: &std::path::Path, args: &GraphArgs) -> anyhow::Result<()> {
    let live = args.files.is_empty();
    let (objects, source) = if live {
        (
            review_input::live_objects(socket)?,
            "the running agent's policy".to_owned(),
        )
    } else {
        let names: Vec<String> = args.files.iter().map(|p| p.display().to_string()).collect();
        (review_input::file_objects(&args.files)?, names.join(", "))
    };
    let side = Side::build(objects, "the policy set")?;
    let flows =
        review_input::observed_flows(args.flows.as_deref(), socket, live && !args.no_flows)?;
    let (by, what) = match args.by {
        By::Workload => (GroupBy::Workload, "workloads"),
        By::Namespace => (GroupBy::Namespace, "namespaces"),
    };
    let graph = Graph::build(
        &side.set,
        &flows,
        by,
        &format!("microseg: reachability between {what} ({source})"),
    );
    let text = match args.output {
        GraphFormat::Dot => dot::render(&graph),
        GraphFormat::Html => svg::render_html(&graph),
        GraphFormat::Svg => svg::render_svg(&graph),
    };
    print!("{text}");
    Ok(())
}
