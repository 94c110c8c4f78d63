//! PNG charts of a compare run (plotters, bitmap backend): fanout latency
//! percentiles against the publish rate, and server RSS against open streams.
//! Text is drawn with DejaVu Sans read from the system at run time; without
//! it the charts are skipped, never the report.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::Results;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const SIZE: (u32, u32) = (960, 600);

/// Registers the font once per process.
fn font() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let font = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e}"))?;
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(font.into_boxed_slice()),
        )
        .map_err(|_| format!("{FONT}: not a usable font"))
    })
    .clone()
}

/// Renders every chart the results have data for into `dir`; returns the
/// files. The default section's charts are `fanout-latency-<N>.png` and
/// `idle-rss.png`; another section's carry its name in front.
pub fn render(r: &Results, dir: &Path) -> Result<Vec<PathBuf>, String> {
    font()?;
    let prefix = if r.section == crate::report::DEFAULT_SECTION {
        String::new()
    } else {
        let safe: String = r
            .section
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        format!("{safe}-")
    };
    let mut out = Vec::new();
    let mut sizes: Vec<u64> = r.fanout.iter().map(|f| f.streams).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for n in sizes {
        let path = dir.join(format!("{prefix}fanout-latency-{n}.png"));
        latency(r, n, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        out.push(path);
    }
    // One server at one size is a single point: no chart for that.
    if r.idle.len() > 1 {
        let path = dir.join(format!("{prefix}idle-rss.png"));
        rss(r, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        out.push(path);
    }
    Ok(out)
}

fn color(target: &str, instances: usize) -> RGBColor {
    match (target, instances) {
        ("gateway", 0 | 1) => RGBColor(31, 119, 180),
        ("gateway", _) => RGBColor(148, 103, 189),
        ("nestjs", _) => RGBColor(214, 39, 40),
        ("nchan", _) => RGBColor(44, 160, 44),
        _ => RGBColor(90, 90, 90),
    }
}

fn latency(r: &Results, streams: u64, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let runs: Vec<_> = r.fanout.iter().filter(|f| f.streams == streams).collect();
    let steps = runs.iter().flat_map(|f| f.steps.iter());
    let (mut lo, mut hi, mut top) = (f64::MAX, 1.0f64, 1.0f64);
    for s in steps {
        lo = lo.min(s.rate as f64);
        hi = hi.max(s.rate as f64);
        top = top.max(s.max_ms);
    }
    if lo == f64::MAX {
        return Ok(());
    }
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("fanout, {streams} streams: latency publish → parsed at the client"),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (lo * 0.8..hi * 1.25).log_scale(),
            (0.01f64..top * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("published events/s")
        .y_desc("latency (ms)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    for f in &runs {
        let c = color(&f.target, f.instances);
        let name = crate::scenario::label(&f.target, f.instances);
        type Pick = fn(&crate::scenario::fanout::Step) -> f64;
        let series: [(&str, Pick, u32); 3] = [
            ("p50", |s| s.p50_ms, 1),
            ("p99", |s| s.p99_ms, 2),
            ("max", |s| s.max_ms, 1),
        ];
        for (kind, pick, width) in series {
            let points: Vec<(f64, f64)> = f
                .steps
                .iter()
                .map(|s| (s.rate as f64, pick(s).max(0.01)))
                .collect();
            let style = if kind == "max" {
                c.mix(0.45).stroke_width(width)
            } else {
                c.stroke_width(width)
            };
            chart
                .draw_series(LineSeries::new(points.clone(), style))?
                .label(format!("{name} {kind}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn rss(r: &Results, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let max_n = r.idle.iter().map(|i| i.streams).max().unwrap_or(1) as f64;
    let max_mib = r
        .idle
        .iter()
        .map(|i| i.rss_after_kib as f64 / 1024.0)
        .fold(1.0, f64::max);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("idle: server RSS against open streams", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..max_n * 1.05, 0f64..max_mib * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("open streams")
        .y_desc("server RSS (MiB)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    let mut servers: Vec<(String, usize)> = r
        .idle
        .iter()
        .map(|i| (i.target.clone(), i.instances))
        .collect();
    servers.sort();
    servers.dedup();
    for (target, instances) in servers {
        let mine =
            |i: &&crate::scenario::idle::IdleResult| i.target == target && i.instances == instances;
        let mut points: Vec<(f64, f64)> = r
            .idle
            .iter()
            .filter(mine)
            .map(|i| (i.open.opened as f64, i.rss_after_kib as f64 / 1024.0))
            .collect();
        if points.is_empty() {
            continue;
        }
        // Each run also starts from its empty server.
        if let Some(first) = r.idle.iter().find(mine) {
            points.insert(0, (0.0, first.rss_before_kib as f64 / 1024.0));
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = color(&target, instances);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(crate::scenario::label(&target, instances))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
