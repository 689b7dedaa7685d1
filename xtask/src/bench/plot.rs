//! PNG plots with plotters' bitmap backend. Text is drawn with ab_glyph from a font
//! embedded at build time (Ubuntu Light, shipped by the `epaint_default_fonts` crate),
//! so no system font library is needed.

use std::path::Path;

use anyhow::Context;
use plotters::{
    prelude::*,
    style::{FontStyle, register_font},
};

use crate::{datapath_cost::CostRow, scenario::human, traffic::TrafficRow};

/// One line of a chart.
struct Series {
    label: String,
    color: usize,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

fn register() -> anyhow::Result<()> {
    register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::UBUNTU_LIGHT,
    )
    .map_err(|_| anyhow::anyhow!("the embedded font could not be read"))
}

/// A log-log chart of `series` against rule count.
fn chart(
    path: &Path,
    title: &str,
    y_label: &str,
    legend: SeriesLabelPosition,
    series: &[Series],
) -> anyhow::Result<()> {
    let points = series.iter().flat_map(|series| series.points.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        if y > 0.0 {
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
    }
    if x_min > x_max || y_min > y_max {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (1200, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x_min / 1.5..x_max * 1.5).log_scale(),
            (y_min / 1.6..y_max * 1.6).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("rules (workload addresses and policy entries)")
        .y_desc(y_label)
        .x_label_formatter(&|x| human(x.round() as u64))
        .y_label_formatter(&|y| {
            if *y >= 1e6 {
                format!("{:.1}M", y / 1e6)
            } else if *y >= 1e3 {
                format!("{:.0}k", y / 1e3)
            } else {
                format!("{y:.0}")
            }
        })
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;
    for line in series {
        let color = Palette99::pick(line.color).to_rgba();
        let style = if line.dashed {
            color.stroke_width(1)
        } else {
            color.stroke_width(3)
        };
        chart
            .draw_series(LineSeries::new(line.points.iter().copied(), style))?
            .label(line.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        chart.draw_series(
            line.points
                .iter()
                .map(|&point| Circle::new(point, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes every plot into `dir`; returns the file names.
pub fn write(
    dir: &Path,
    datapath: &[CostRow],
    traffic: &[TrafficRow],
) -> anyhow::Result<Vec<String>> {
    register()?;
    let mut written = Vec::new();
    for program in ["xdp", "tc"] {
        let mut series = Vec::new();
        for (case_index, case) in ["new_allow", "established", "deny"].into_iter().enumerate() {
            for (family_index, family) in ["ipv4", "ipv6"].into_iter().enumerate() {
                let rows: Vec<&CostRow> = datapath
                    .iter()
                    .filter(|row| {
                        row.program == program && row.case == case && row.family == family
                    })
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let color = case_index * 2 + family_index;
                series.push(Series {
                    label: format!("{family} {case}, spread"),
                    color,
                    dashed: false,
                    points: rows
                        .iter()
                        .map(|row| (f64::from(row.rules), row.spread.without_floor_ns.max(0.1)))
                        .collect(),
                });
                series.push(Series {
                    label: format!("{family} {case}, hot"),
                    color,
                    dashed: true,
                    points: rows
                        .iter()
                        .map(|row| (f64::from(row.rules), row.hot.without_floor_ns.max(0.1)))
                        .collect(),
                });
            }
        }
        if series.is_empty() {
            continue;
        }
        let name = format!("datapath_{program}.png");
        chart(
            &dir.join(&name),
            &format!(
                "microseg {} program: ns per packet minus the harness floor (BPF_PROG_TEST_RUN; thick = spread, thin = hot)",
                program.to_uppercase()
            ),
            "ns per packet",
            SeriesLabelPosition::UpperLeft,
            &series,
        )
        .with_context(|| format!("drawing {name}"))?;
        written.push(name);
    }
    if !traffic.is_empty() {
        let engines = crate::traffic::Engine::ALL.map(crate::traffic::Engine::name);
        let per_engine = |value: &dyn Fn(&TrafficRow) -> f64, dashed: bool, suffix: &str| {
            engines
                .iter()
                .enumerate()
                .map(|(index, engine)| Series {
                    label: format!("{engine}{suffix}"),
                    color: index,
                    dashed,
                    points: traffic
                        .iter()
                        .filter(|row| row.engine == *engine)
                        .map(|row| (f64::from(row.rules), value(row).max(1.0)))
                        .collect(),
                })
                .filter(|series| !series.points.is_empty())
                .collect::<Vec<_>>()
        };
        let mut pps = per_engine(&|row| row.pps_dropped, false, ", dropped (denied sources)");
        pps.retain(|series| series.label != "none, dropped (denied sources)");
        pps.extend(per_engine(
            &|row| row.pps_delivered,
            true,
            ", delivered (allowed sources)",
        ));
        chart(
            &dir.join("traffic_pps.png"),
            "Packets per second over veth by engine, medians (thick = dropped, thin = delivered)",
            "packets/s",
            SeriesLabelPosition::LowerLeft,
            &pps,
        )
        .context("drawing traffic_pps.png")?;
        written.push("traffic_pps.png".to_owned());
        let cost = per_engine(&|row| row.denied_ns_per_packet.median, false, "");
        chart(
            &dir.join("traffic_ns_per_packet.png"),
            "Whole receive path per packet over veth, denied sources (1e9 / processed pps, median)",
            "ns per packet",
            SeriesLabelPosition::UpperLeft,
            &cost,
        )
        .context("drawing traffic_ns_per_packet.png")?;
        written.push("traffic_ns_per_packet.png".to_owned());
    }
    Ok(written)
}
