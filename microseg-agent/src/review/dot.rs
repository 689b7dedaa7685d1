//! Graphviz DOT for a [`Graph`]: namespaces as clusters, address blocks as
//! ellipses, allowed edges solid (grey and dotted where no policy enforces), denied
//! observed flows red and dashed.

use std::fmt::Write;

use super::graph::{Graph, NodeKind};

/// A DOT double-quoted string: `"` and `\` escaped (a backslash would start a DOT
/// escape such as `\N`), line breaks as `\n`.
pub fn quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => {}
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// Colours shared with the SVG rendering.
pub const ALLOWED_COLOR: &str = "#1f5fa8";
pub const UNRESTRICTED_COLOR: &str = "#9e9e9e";
pub const DENIED_COLOR: &str = "#c62828";

pub fn render(graph: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph microseg {{");
    let _ = writeln!(
        out,
        "  graph [rankdir=LR, fontname=\"Helvetica\", fontsize=12, label={}, labelloc=t];",
        quote(&graph.title)
    );
    let _ = writeln!(
        out,
        "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#eef3fb\", fontname=\"Helvetica\", fontsize=11];"
    );
    let _ = writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=9];");
    for group in graph.groups() {
        let _ = writeln!(out, "  subgraph {} {{", quote(&format!("cluster_{group}")));
        let _ = writeln!(
            out,
            "    label={}; style=\"rounded\"; color=\"#7f8c9d\";",
            quote(&format!("namespace {group}"))
        );
        for node in graph
            .nodes
            .iter()
            .filter(|n| n.group.as_deref() == Some(&group))
        {
            let _ = writeln!(
                out,
                "    {} [label={}];",
                quote(&node.id),
                quote(&node.label)
            );
        }
        let _ = writeln!(out, "  }}");
    }
    for node in graph.nodes.iter().filter(|n| n.group.is_none()) {
        let attributes = match node.kind {
            NodeKind::External => ", shape=ellipse, fillcolor=\"#fdf3e1\"",
            _ => "",
        };
        let _ = writeln!(
            out,
            "  {} [label={}{attributes}];",
            quote(&node.id),
            quote(&node.label)
        );
    }
    for edge in &graph.edges {
        if !edge.allowed.is_empty() {
            let label: Vec<String> = edge.allowed.iter().map(|a| a.label()).collect();
            let style = if edge.unrestricted() {
                format!(
                    "color=\"{UNRESTRICTED_COLOR}\", fontcolor=\"{UNRESTRICTED_COLOR}\", style=dotted"
                )
            } else {
                format!("color=\"{ALLOWED_COLOR}\"")
            };
            let _ = writeln!(
                out,
                "  {} -> {} [label={}, {style}];",
                quote(&edge.from),
                quote(&edge.to),
                quote(&label.join("\n"))
            );
        }
        if let Some(denied) = &edge.denied {
            let _ = writeln!(
                out,
                "  {} -> {} [label={}, color=\"{DENIED_COLOR}\", fontcolor=\"{DENIED_COLOR}\", style=dashed];",
                quote(&edge.from),
                quote(&edge.to),
                quote(&denied.label())
            );
        }
    }
    let _ = writeln!(out, "}}");
    out
}
