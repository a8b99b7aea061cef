//! PNG plots of the benchmark results (plotters, bitmap backend). The font
//! is DejaVu Sans embedded from the `dejavu` crate, so nothing depends on
//! system fonts or fontconfig.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use super::{BenchError, Spread};

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // An embedded, known-good TTF: failure here would be a build defect.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// One line of a plot: a name and `(x, spread of y)` points.
pub struct Line {
    /// Legend label.
    pub name: String,
    /// `(x, y)` with y's spread drawn as an error bar.
    pub points: Vec<(f64, Spread)>,
}

/// Axes of a plot.
pub struct Axes<'a> {
    /// Plot title.
    pub title: &'a str,
    /// X axis label.
    pub x: &'a str,
    /// Y axis label.
    pub y: &'a str,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// x is a size in bytes: ticks as B, KiB, MiB.
    pub x_bytes: bool,
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(0, 0, 0),
];

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(format!("plot: {e}"))
}

/// Draw `lines` (median as line and dots, min–max as a bar) into `path`.
pub fn draw(path: &Path, axes: &Axes, lines: &[Line]) -> Result<(), BenchError> {
    register_font();
    let pts = || lines.iter().flat_map(|l| l.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, s) in pts() {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(s.min.min(s.median));
        y1 = y1.max(s.max.max(s.median));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (1.0, 2.0, 1.0, 2.0);
    }
    let positive = |v: f64| if v > 0.0 { v } else { 1e-3 };
    if axes.log_x {
        (x0, x1) = (positive(x0) / 1.5, positive(x1) * 1.5);
    } else {
        let pad = ((x1 - x0) * 0.05).max(0.5);
        (x0, x1) = (x0 - pad, x1 + pad);
    }
    if axes.log_y {
        (y0, y1) = (positive(y0) / 1.5, positive(y1.max(y0)) * 1.5);
    } else {
        (y0, y1) = (0.0, (y1 * 1.15).max(1e-9));
    }
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(axes.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70);
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(axes.x)
                .y_desc(axes.y)
                .label_style(("sans-serif", 13))
                .x_label_formatter(&|v: &f64| {
                    if axes.x_bytes {
                        bytes_tick(*v)
                    } else {
                        tick(*v)
                    }
                })
                .y_label_formatter(&|v: &f64| tick(*v))
                .draw()
                .map_err(err)?;
            for (i, line) in lines.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let xy: Vec<(f64, f64)> = line.points.iter().map(|(x, s)| (*x, s.median)).collect();
                chart
                    .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
                    .map_err(err)?
                    .label(line.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(xy.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(err)?;
                chart
                    .draw_series(line.points.iter().map(|(x, s)| {
                        PathElement::new(vec![(*x, s.min), (*x, s.max)], color.stroke_width(1))
                    }))
                    .map_err(err)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(err)?;
        }};
    }
    match (axes.log_x, axes.log_y) {
        (true, true) => body!(builder
            .build_cartesian_2d((x0..x1).log_scale().base(2.0), (y0..y1).log_scale())
            .map_err(err)?),
        (true, false) => body!(builder
            .build_cartesian_2d((x0..x1).log_scale().base(2.0), y0..y1)
            .map_err(err)?),
        (false, true) => body!(builder
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(err)?),
        (false, false) => body!(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(err)?),
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Axis tick text: 8, 64, 512, 4k, 1M; 0.5, 12.5.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{}G", trim(v / 1e9))
    } else if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Byte-size tick text: 64 B, 1 KiB, 1 MiB.
fn bytes_tick(v: f64) -> String {
    if v >= (1 << 20) as f64 {
        format!("{} MiB", trim(v / (1 << 20) as f64))
    } else if v >= 1024.0 {
        format!("{} KiB", trim(v / 1024.0))
    } else {
        format!("{} B", trim(v))
    }
}
