//! The graph as SVG, laid out here (no Graphviz at run time), and as a
//! self-contained HTML page around it (no scripts, fonts or network).
//!
//! Layout: each namespace is a horizontal band (address blocks outside the
//! inventory get the last band); inside the bands, columns are layers of the
//! policy-allowed edges (a node is one column right of every node that reaches it,
//! cycles broken in sorted order), so traffic reads left to right, e.g. ingress,
//! frontend, API, data. Edges are gentle curves (a pair's two directions bend
//! apart); labels sit on a white box at the curve's middle.

use std::{collections::BTreeMap, fmt::Write};

use super::{
    dot::{ALLOWED_COLOR, DENIED_COLOR, UNRESTRICTED_COLOR},
    graph::{Graph, GraphEdge, GraphNode, NodeKind},
    reach::format_ranges,
};

/// Escapes text for XML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            // Not allowed in XML 1.0.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => escaped.push(c),
        }
    }
    escaped
}

const NODE_WIDTH: f64 = 170.0;
const NODE_HEIGHT: f64 = 34.0;
const COLUMN: f64 = 340.0;
const ROW: f64 = 70.0;
const BAND_TOP: f64 = 58.0;
const BAND_GAP: f64 = 24.0;
const MARGIN: f64 = 24.0;
/// Room between a band's frame and its nodes.
const BAND_PAD: f64 = 20.0;
const LEGEND_HEIGHT: f64 = 56.0;
/// Average width of a 10 px sans-serif character, for label boxes.
const CHAR_WIDTH: f64 = 5.6;
const MAX_LABEL: usize = 26;

/// Where each node goes.
struct Layout {
    /// Node index -> (centre x, centre y).
    centres: Vec<(f64, f64)>,
    bands: Vec<Band>,
    width: f64,
    height: f64,
}

/// A namespace's frame (or the frame of the blocks outside the inventory).
struct Band {
    /// `None` for an unframed band (namespaces as nodes).
    title: Option<String>,
    x: f64,
    y: f64,
    width: f64,
    height: f64,
}

/// Longest-path layers over the edges that policy allows (edges allowed only
/// because nothing enforces do not order anything), cycles broken by a depth-first
/// walk in node order.
fn layers(graph: &Graph) -> Vec<usize> {
    let index: BTreeMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let mut successors = vec![Vec::new(); graph.nodes.len()];
    // Denied flows order only the addresses they reach, which no policy edge
    // places.
    let external: Vec<bool> = graph
        .nodes
        .iter()
        .map(|n| n.kind == NodeKind::External)
        .collect();
    for edge in graph.edges.iter().filter(|e| {
        e.from != e.to
            && ((!e.allowed.is_empty() && !e.unrestricted())
                || (e.denied.is_some() && index.get(e.to.as_str()).is_some_and(|i| external[*i])))
    }) {
        if let (Some(a), Some(b)) = (index.get(edge.from.as_str()), index.get(edge.to.as_str())) {
            successors[*a].push(*b);
        }
    }
    // Depth-first: 0 unvisited, 1 on the stack, 2 done; edges to a node on the
    // stack close a cycle and are dropped.
    let mut state = vec![0u8; graph.nodes.len()];
    let mut order = Vec::new();
    let mut kept = vec![Vec::new(); graph.nodes.len()];
    for root in 0..graph.nodes.len() {
        if state[root] != 0 {
            continue;
        }
        let mut stack = vec![(root, 0usize)];
        state[root] = 1;
        while let Some((node, next)) = stack.last_mut() {
            let node = *node;
            if let Some(&successor) = successors[node].get(*next) {
                *next += 1;
                match state[successor] {
                    0 => {
                        kept[node].push(successor);
                        state[successor] = 1;
                        stack.push((successor, 0));
                    }
                    2 => kept[node].push(successor),
                    _ => {}
                }
            } else {
                state[node] = 2;
                order.push(node);
                stack.pop();
            }
        }
    }
    // `order` is a post-order: reversed, every edge goes forward.
    let mut layer = vec![0usize; graph.nodes.len()];
    for &node in order.iter().rev() {
        for &successor in &kept[node] {
            layer[successor] = layer[successor].max(layer[node] + 1);
        }
    }
    layer
}

fn layout(graph: &Graph) -> Layout {
    let layer = layers(graph);
    let columns = layer.iter().max().map_or(1, |m| m + 1);
    // Bands: namespaces in order, then unframed namespace nodes, then blocks.
    let band_of = |node: &GraphNode| -> (u8, Option<String>) {
        match (&node.group, node.kind) {
            (Some(group), _) => (0, Some(format!("namespace {group}"))),
            (None, NodeKind::External) => (2, Some("outside the inventory".to_owned())),
            (None, _) => (1, None),
        }
    };
    let mut bands: BTreeMap<(u8, Option<String>), Vec<usize>> = BTreeMap::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        bands.entry(band_of(node)).or_default().push(i);
    }
    // Each band spans the columns of its nodes; bands whose spans do not overlap
    // share a shelf (a row of bands), the first one that has room, in band order.
    struct Placed {
        title: Option<String>,
        members: Vec<usize>,
        span: (usize, usize),
        rows: usize,
        shelf: usize,
    }
    let mut shelves: Vec<Vec<(usize, usize)>> = Vec::new();
    let mut placed = Vec::new();
    for ((_, title), members) in bands {
        let span = members.iter().fold((usize::MAX, 0), |(lo, hi), &i| {
            (lo.min(layer[i]), hi.max(layer[i]))
        });
        let mut per_column: BTreeMap<usize, usize> = BTreeMap::new();
        for &i in &members {
            *per_column.entry(layer[i]).or_insert(0) += 1;
        }
        let rows = per_column.values().max().copied().unwrap_or(1);
        let shelf = shelves
            .iter()
            .position(|spans| spans.iter().all(|(lo, hi)| span.1 < *lo || span.0 > *hi))
            .unwrap_or_else(|| {
                shelves.push(Vec::new());
                shelves.len() - 1
            });
        shelves[shelf].push(span);
        placed.push(Placed {
            title,
            members,
            span,
            rows,
            shelf,
        });
    }
    let mut shelf_tops = Vec::new();
    let mut top = MARGIN + LEGEND_HEIGHT;
    for shelf in 0..shelves.len() {
        shelf_tops.push(top);
        let rows = placed
            .iter()
            .filter(|p| p.shelf == shelf)
            .map(|p| p.rows)
            .max()
            .unwrap_or(1);
        top += BAND_TOP + rows as f64 * ROW + BAND_GAP;
    }
    let column_x = |column: usize| MARGIN + BAND_PAD + column as f64 * COLUMN;
    let mut centres = vec![(0.0, 0.0); graph.nodes.len()];
    let mut band_boxes = Vec::new();
    for band in placed {
        let band_top = shelf_tops[band.shelf];
        let mut per_column: BTreeMap<usize, usize> = BTreeMap::new();
        for &i in &band.members {
            let row = per_column.entry(layer[i]).or_insert(0);
            centres[i] = (
                column_x(layer[i]) + NODE_WIDTH / 2.0,
                band_top + BAND_TOP + NODE_HEIGHT / 2.0 + *row as f64 * ROW,
            );
            *row += 1;
        }
        band_boxes.push(Band {
            title: band.title,
            x: column_x(band.span.0) - BAND_PAD,
            y: band_top,
            width: (band.span.1 - band.span.0) as f64 * COLUMN + NODE_WIDTH + 2.0 * BAND_PAD,
            height: BAND_TOP + band.rows as f64 * ROW,
        });
    }
    let loop_room = if graph.edges.iter().any(|e| e.from == e.to) {
        180.0
    } else {
        0.0
    };
    Layout {
        centres,
        bands: band_boxes,
        // Room for the title and legend, and for labels right of the last column
        // and below the last row.
        width: (column_x(columns - 1) + NODE_WIDTH + BAND_PAD + MARGIN + loop_room)
            .max(2.0 * MARGIN + graph.title.chars().count() as f64 * 9.5)
            .max(820.0),
        height: top + MARGIN + 40.0,
    }
}

/// Where the segment from a box's centre towards `towards` leaves the box.
fn box_exit(centre: (f64, f64), towards: (f64, f64)) -> (f64, f64) {
    let (dx, dy) = (towards.0 - centre.0, towards.1 - centre.1);
    let tx = if dx.abs() > f64::EPSILON {
        (NODE_WIDTH / 2.0) / dx.abs()
    } else {
        f64::INFINITY
    };
    let ty = if dy.abs() > f64::EPSILON {
        (NODE_HEIGHT / 2.0) / dy.abs()
    } else {
        f64::INFINITY
    };
    let t = tx.min(ty).min(1.0);
    (centre.0 + dx * t, centre.1 + dy * t)
}

fn shorten(label: &str) -> String {
    if label.chars().count() <= MAX_LABEL {
        label.to_owned()
    } else {
        let kept: String = label.chars().take(MAX_LABEL - 1).collect();
        format!("{kept}\u{2026}")
    }
}

/// The width of a label's box.
fn label_width(lines: &[String]) -> f64 {
    lines.iter().map(|l| l.chars().count()).max().unwrap_or(0) as f64 * CHAR_WIDTH + 8.0
}

/// A label of one or more lines on a white box centred at (x, y).
fn label(out: &mut String, x: f64, y: f64, lines: &[String], color: &str) {
    let width = label_width(lines);
    let height = lines.len() as f64 * 12.0 + 4.0;
    let _ = writeln!(
        out,
        r##"<rect x="{:.1}" y="{:.1}" width="{width:.1}" height="{height:.1}" rx="3" fill="#ffffff" fill-opacity="0.9"/>"##,
        x - width / 2.0,
        y - height / 2.0
    );
    for (i, line) in lines.iter().enumerate() {
        let _ = writeln!(
            out,
            r##"<text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="{color}">{}</text>"##,
            y - height / 2.0 + 12.0 + i as f64 * 12.0,
            escape(line)
        );
    }
}

/// One edge: a curve bent by `bend` pixels to its right, or a loop above the node.
fn edge_path(
    out: &mut String,
    from: (f64, f64),
    to: (f64, f64),
    bend: f64,
    style: &str,
    lines: Option<&[String]>,
    color: &str,
) {
    if from == to {
        // A namespace's traffic within itself: a loop on the box's right side with
        // its label beside it (allowed), or below the box (denied).
        let (x, y) = from;
        let (right, bottom) = (x + NODE_WIDTH / 2.0, y + NODE_HEIGHT / 2.0);
        let (path, at) = if bend < 40.0 {
            let width = lines.map_or(0.0, label_width);
            (
                format!(
                    "M {:.1} {:.1} C {:.1} {:.1} {:.1} {:.1} {right:.1} {:.1}",
                    right,
                    y - 8.0,
                    right + 40.0,
                    y - 30.0,
                    right + 40.0,
                    y + 30.0,
                    y + 8.0
                ),
                (right + 48.0 + width / 2.0, y),
            )
        } else {
            let height = lines.map_or(0.0, |l| l.len() as f64 * 12.0);
            (
                format!(
                    "M {:.1} {bottom:.1} C {:.1} {:.1} {:.1} {:.1} {:.1} {bottom:.1}",
                    x - 20.0,
                    x - 45.0,
                    bottom + 40.0,
                    x + 45.0,
                    bottom + 40.0,
                    x + 20.0
                ),
                (x, bottom + 40.0 + height / 2.0),
            )
        };
        let _ = writeln!(out, r##"<path d="{path}" fill="none" {style}/>"##);
        if let Some(lines) = lines {
            label(out, at.0, at.1, lines, color);
        }
        return;
    }
    let (dx, dy) = (to.0 - from.0, to.1 - from.1);
    let length = (dx * dx + dy * dy).sqrt().max(1.0);
    let middle = ((from.0 + to.0) / 2.0, (from.1 + to.1) / 2.0);
    // An edge within a column would cross the boxes between its ends: bend it
    // round them.
    let bend = if dx.abs() < NODE_WIDTH {
        bend + 0.22 * dy.abs()
    } else {
        bend
    };
    let control = (middle.0 - dy / length * bend, middle.1 + dx / length * bend);
    let start = box_exit(from, control);
    let end = box_exit(to, control);
    let _ = writeln!(
        out,
        r##"<path d="M {:.1} {:.1} Q {:.1} {:.1} {:.1} {:.1}" fill="none" {style}/>"##,
        start.0, start.1, control.0, control.1, end.0, end.1
    );
    // Nearer the target than the source: the label says what reaches it.
    let t = 0.62;
    let at =
        |a: f64, c: f64, b: f64| (1.0 - t) * (1.0 - t) * a + 2.0 * (1.0 - t) * t * c + t * t * b;
    if let Some(lines) = lines {
        label(
            out,
            at(start.0, control.0, end.0),
            at(start.1, control.1, end.1),
            lines,
            color,
        );
    }
}

/// The label lines of an edge's allowed ports in the picture: per group, the
/// ports, then one policy a line.
fn allowed_lines(edge: &GraphEdge) -> Vec<String> {
    let mut lines = Vec::new();
    for allowed in &edge.allowed {
        lines.push(format_ranges(&allowed.ranges));
        if allowed.policies.is_empty() {
            lines.push("(no policy)".to_owned());
        }
        lines.extend(allowed.policies.iter().cloned());
    }
    lines
}

/// The graph as a standalone SVG document.
pub fn render_svg(graph: &Graph) -> String {
    let layout = layout(graph);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="Helvetica, Arial, sans-serif">"##,
        w = layout.width,
        h = layout.height
    );
    let _ = writeln!(out, "<title>{}</title>", escape(&graph.title));
    let _ = writeln!(out, "<defs>");
    for (id, color) in [
        ("allowed", ALLOWED_COLOR),
        ("unrestricted", UNRESTRICTED_COLOR),
        ("denied", DENIED_COLOR),
    ] {
        let _ = writeln!(
            out,
            r##"<marker id="arrow-{id}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="{color}"/></marker>"##
        );
    }
    let _ = writeln!(out, "</defs>");
    let _ = writeln!(
        out,
        r##"<rect x="0" y="0" width="{:.0}" height="{:.0}" fill="#ffffff"/>"##,
        layout.width, layout.height
    );
    let _ = writeln!(
        out,
        r##"<text x="{MARGIN}" y="{:.0}" font-size="16" font-weight="bold" fill="#222222">{}</text>"##,
        MARGIN + 8.0,
        escape(&graph.title)
    );
    // Legend.
    let legend_y = MARGIN + 36.0;
    for (i, (text, color, dash)) in [
        ("allowed by policy (ports, policies)", ALLOWED_COLOR, ""),
        (
            "allowed, no policy enforces",
            UNRESTRICTED_COLOR,
            r##" stroke-dasharray="2 3""##,
        ),
        (
            "observed and denied (events)",
            DENIED_COLOR,
            r##" stroke-dasharray="6 4""##,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let x = MARGIN + i as f64 * 260.0;
        let _ = writeln!(
            out,
            r##"<line x1="{x:.0}" y1="{legend_y:.0}" x2="{:.0}" y2="{legend_y:.0}" stroke="{color}" stroke-width="2"{dash}/>"##,
            x + 36.0
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.0}" y="{:.0}" font-size="11" fill="#333333">{}</text>"##,
            x + 44.0,
            legend_y + 4.0,
            escape(text)
        );
    }
    for band in &layout.bands {
        if let Some(title) = &band.title {
            let _ = writeln!(
                out,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" rx="10" fill="#f7f9fc" stroke="#7f8c9d"/>"##,
                band.x, band.y, band.width, band.height
            );
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="12" font-weight="bold" fill="#55606e">{}</text>"##,
                band.x + 12.0,
                band.y + 18.0,
                escape(title)
            );
        }
    }
    let index: BTreeMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let mut labelled = std::collections::BTreeSet::new();
    for edge in &graph.edges {
        let (Some(&a), Some(&b)) = (index.get(edge.from.as_str()), index.get(edge.to.as_str()))
        else {
            continue;
        };
        let (from, to) = (layout.centres[a], layout.centres[b]);
        let _ = writeln!(
            out,
            "<g><title>{}</title>",
            escape(&format!("{} -> {}", edge.from, edge.to))
        );
        if !edge.allowed.is_empty() {
            let (id, color, dash) = if edge.unrestricted() {
                (
                    "unrestricted",
                    UNRESTRICTED_COLOR,
                    r##" stroke-dasharray="2 3""##,
                )
            } else {
                ("allowed", ALLOWED_COLOR, "")
            };
            let style = format!(
                r##"stroke="{color}" stroke-width="1.6"{dash} marker-end="url(#arrow-{id})""##
            );
            // One label per target and text: parallel edges (every frontend to
            // every API server) would stack the same words.
            let lines = allowed_lines(edge);
            let first = labelled.insert((edge.to.clone(), lines.clone()));
            edge_path(
                &mut out,
                from,
                to,
                24.0,
                &style,
                first.then_some(&lines[..]),
                color,
            );
        }
        if let Some(denied) = &edge.denied {
            let style = format!(
                r##"stroke="{DENIED_COLOR}" stroke-width="1.8" stroke-dasharray="6 4" marker-end="url(#arrow-denied)""##
            );
            edge_path(
                &mut out,
                from,
                to,
                64.0,
                &style,
                Some(&[denied.label()]),
                DENIED_COLOR,
            );
        }
        let _ = writeln!(out, "</g>");
    }
    for (node, (x, y)) in graph.nodes.iter().zip(&layout.centres) {
        let (fill, stroke, rx) = match node.kind {
            NodeKind::External => ("#fdf3e1", "#b7842b", 17.0),
            _ => ("#eef3fb", "#1f5fa8", 6.0),
        };
        let _ = writeln!(
            out,
            r##"<g><title>{}</title><rect x="{:.1}" y="{:.1}" width="{NODE_WIDTH}" height="{NODE_HEIGHT}" rx="{rx}" fill="{fill}" stroke="{stroke}" stroke-width="1.4"/><text x="{x:.1}" y="{:.1}" font-size="12" text-anchor="middle" fill="#1b1b1b">{}</text></g>"##,
            escape(&node.id),
            x - NODE_WIDTH / 2.0,
            y - NODE_HEIGHT / 2.0,
            y + 4.0,
            escape(&shorten(&node.label))
        );
    }
    let _ = writeln!(out, "</svg>");
    out
}

/// A page holding the SVG and the edges as a table (searchable, copyable), with no
/// scripts, external fonts or links: it opens the same offline.
pub fn render_html(graph: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "<!DOCTYPE html>");
    let _ = writeln!(
        out,
        r##"<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/><title>{}</title>"##,
        escape(&graph.title)
    );
    let _ = writeln!(
        out,
        "<style>body{{font-family:Helvetica,Arial,sans-serif;margin:16px;color:#222}}table{{border-collapse:collapse;font-size:13px;margin-top:12px}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}}th{{background:#f0f3f7}}.denied{{color:{DENIED_COLOR}}}</style></head><body>"
    );
    out.push_str(&render_svg(graph));
    let _ = writeln!(
        out,
        "<table><tr><th>from</th><th>to</th><th>allowed (policies)</th><th>observed and denied</th></tr>"
    );
    for edge in &graph.edges {
        let _ = writeln!(
            out,
            r##"<tr><td>{}</td><td>{}</td><td>{}</td><td class="denied">{}</td></tr>"##,
            escape(&edge.from),
            escape(&edge.to),
            edge.allowed
                .iter()
                .map(|a| escape(&a.label()))
                .collect::<Vec<_>>()
                .join("<br/>"),
            edge.denied
                .as_ref()
                .map(|d| escape(&d.label()))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(out, "</table></body></html>");
    out
}
