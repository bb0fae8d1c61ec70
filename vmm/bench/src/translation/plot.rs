//! Plots of the translation benchmark (plotters): for each workload, ns per
//! access against the working set, both axes logarithmic, one line per
//! (host backing, guest leaf) pair, native as the thick reference line of
//! each backing's colour; guest leaves differ in dash pattern and marker
//! (4K solid with circles, 2M dashed with triangles, 1G dotted with
//! crosses), in the legend too. Written as SVG and PNG.
//!
//! Text in the PNG needs a font: plotters' `ab_glyph` feature renders it
//! in pure Rust from a TrueType file, which is read at run time from
//! [`FONT_PATHS`] (a static binary cannot use fontconfig). Without one, no
//! plots are written and the benchmark says so.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::{CellStatus, TranslationResults};
use memvisor::config::Backing;

/// Where a sans-serif TrueType font is looked for (Debian's fonts-dejavu-core first).
pub const FONT_PATHS: [&str; 3] =
    ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf"];

fn register_font() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONT_PATHS.iter().find_map(|p| std::fs::read(p).ok()).ok_or_else(|| format!("no font found (looked for {})", FONT_PATHS.join(", ")))?;
        // Registered once per process for its whole life.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| "the font file is not a valid TrueType font".to_string())
    })
    .clone()
}

fn colour(b: Backing) -> RGBColor {
    match b {
        Backing::Anon => RGBColor(31, 119, 180),
        Backing::Thp => RGBColor(44, 160, 44),
        Backing::Hugetlb2M => RGBColor(255, 127, 14),
        Backing::Hugetlb1G => RGBColor(148, 103, 189),
        Backing::Memfd => RGBColor(140, 86, 75),
    }
}

/// How a line is drawn: native thick and solid; guest 4K solid with
/// circles, 2M dashed with triangles, 1G dotted with crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    Native,
    Guest4K,
    Guest2M,
    Guest1G,
}

impl LineKind {
    fn of(native: bool, label: &str) -> Self {
        if native {
            Self::Native
        } else if label.ends_with("4k") {
            Self::Guest4K
        } else if label.ends_with("2m") {
            Self::Guest2M
        } else {
            Self::Guest1G
        }
    }
}

/// One line: its label, colour, whether it is native, and its points (MiB, ns).
type Series = (String, RGBColor, bool, Vec<(f64, f64)>);

fn series(r: &TranslationResults, workload: &str) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for c in r.cells.iter().filter(|c| c.workload == workload && c.status == CellStatus::Ok) {
        let Some(ns) = c.ns else { continue };
        let native = c.leaf == "native";
        let label = if native { format!("{} native", c.backing) } else { format!("{} guest {}", c.backing, c.leaf) };
        let point = (c.ws as f64 / (1u64 << 20) as f64, ns.median);
        match out.iter_mut().find(|s| s.0 == label) {
            Some(s) => s.3.push(point),
            None => out.push((label, colour(c.backing), native, vec![point])),
        }
    }
    for s in &mut out {
        s.3.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, r: &TranslationResults, workload: &str) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Display| format!("plotting {workload}: {e}");
    let lines = series(r, workload);
    let xs = lines.iter().flat_map(|s| s.3.iter().map(|p| p.0));
    let ys: Vec<f64> = lines.iter().flat_map(|s| s.3.iter().map(|p| p.1)).collect();
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (y0, y1) = ys.iter().fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
    if lines.is_empty() || !(x0 < f64::MAX && y0 < f64::MAX) {
        return Ok(());
    }
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{workload}: ns per access ({})", r.mode_description), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x0 * 0.8..x1 * 1.25).log_scale(), (y0 * 0.8..y1 * 1.25).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("working set (MiB)")
        .y_desc("ns per access (median)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (label, c, native, points) in lines {
        let kind = LineKind::of(native, &label);
        let style = if native { c.stroke_width(4) } else { c.stroke_width(1) };
        let anno = match kind {
            LineKind::Native | LineKind::Guest4K => chart.draw_series(LineSeries::new(points.clone(), style)),
            LineKind::Guest2M => chart.draw_series(DashedLineSeries::new(points.clone(), 8, 5, style)),
            LineKind::Guest1G => chart.draw_series(DashedLineSeries::new(points.clone(), 2, 4, style)),
        }
        .map_err(|e| err(&e))?
        .label(label);
        // The legend repeats each line's dash pattern and marker, so lines
        // of one backing (one colour) can be told apart there too.
        match kind {
            LineKind::Native => anno.legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style)),
            LineKind::Guest4K => anno.legend(move |(x, y)| {
                EmptyElement::at((x, y)) + PathElement::new(vec![(0, 0), (18, 0)], style) + Circle::new((9, 0), 3, c.filled())
            }),
            LineKind::Guest2M => anno.legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (4, 0)], style)
                    + PathElement::new(vec![(14, 0), (18, 0)], style)
                    + TriangleMarker::new((9, 0), 4, c.filled())
            }),
            LineKind::Guest1G => anno.legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (2, 0)], style)
                    + PathElement::new(vec![(16, 0), (18, 0)], style)
                    + Cross::new((9, 0), 4, c)
            }),
        };
        let pts = points.into_iter();
        match kind {
            LineKind::Native => Ok(()),
            LineKind::Guest4K => chart.draw_series(pts.map(|p| Circle::new(p, 3, c.filled()))).map(|_| ()),
            LineKind::Guest2M => chart.draw_series(pts.map(|p| TriangleMarker::new(p, 4, c.filled()))).map(|_| ()),
            LineKind::Guest1G => chart.draw_series(pts.map(|p| Cross::new(p, 4, c))).map(|_| ()),
        }
        .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// Writes `<workload>.svg` and `<workload>.png` for each workload into `dir`.
///
/// # Errors
/// A message when drawing or writing fails. A missing font is not an
/// error: the plots are skipped with a warning.
pub fn write_plots(r: &TranslationResults, dir: &Path) -> Result<Vec<PathBuf>, String> {
    if let Err(why) = register_font() {
        log::warn!("no plots: {why}");
        eprintln!("no plots written: {why}");
        return Ok(Vec::new());
    }
    let mut workloads: Vec<&str> = Vec::new();
    for c in &r.cells {
        if !workloads.contains(&c.workload) {
            workloads.push(c.workload);
        }
    }
    let mut written = Vec::new();
    let size = (900, 600);
    for w in workloads {
        let mut svg = String::new();
        draw(SVGBackend::with_string(&mut svg, size).into_drawing_area(), r, w)?;
        let path = dir.join(format!("{w}.svg"));
        memvisor::fsutil::write_atomic(&path, svg.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
        // PNG: drawn to a temporary name, then renamed (atomic like the rest).
        let path = dir.join(format!("{w}.png"));
        let tmp = dir.join(format!(".{w}.tmp.png"));
        draw(BitMapBackend::new(&tmp, size).into_drawing_area(), r, w)?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
