//! Line charts of training logs: one panel per metric against the step, drawn as SVG and, for .png,
//! rasterised with resvg (text set in the system's sans-serif font).

use anyhow::{Context, Result, anyhow, bail, ensure};
use std::fmt::Write;
use std::path::Path;

/// One metric's points.
#[derive(Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const PANEL_W: f64 = 640.0;
const PANEL_H: f64 = 220.0;
const MARGIN_L: f64 = 70.0;
const MARGIN_R: f64 = 20.0;
const MARGIN_T: f64 = 30.0;
const MARGIN_B: f64 = 40.0;

/// Round tick positions covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::EPSILON);
    let raw = span / target as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step =
        [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= target as f64 + 1.0).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e4 || v.abs() < 1e-3 {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The SVG of one panel per series, stacked.
pub fn svg(title: &str, series: &[Series]) -> Result<String> {
    ensure!(!series.is_empty(), "nothing to plot");
    let height = 40.0 + PANEL_H * series.len() as f64;
    let mut s = String::new();
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{PANEL_W}" height="{height}" viewBox="0 0 {PANEL_W} {height}" font-family="sans-serif">"#
    )?;
    writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#)?;
    writeln!(s, r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#, PANEL_W / 2.0, escape(title))?;
    for (k, ser) in series.iter().enumerate() {
        ensure!(!ser.points.is_empty(), "the log has no values of \"{}\"", ser.name);
        let top = 40.0 + PANEL_H * k as f64;
        let (x0, x1) = (MARGIN_L, PANEL_W - MARGIN_R);
        let (y0, y1) = (top + PANEL_H - MARGIN_B, top + MARGIN_T);
        let xs = ser.points.iter().map(|p| p.0);
        let ys = ser.points.iter().map(|p| p.1);
        let (xmin, xmax) = (xs.clone().fold(f64::INFINITY, f64::min), xs.fold(f64::NEG_INFINITY, f64::max));
        let (mut ymin, mut ymax) = (ys.clone().fold(f64::INFINITY, f64::min), ys.fold(f64::NEG_INFINITY, f64::max));
        if ymax - ymin < 1e-12 {
            let pad = ymax.abs().max(1.0) * 0.05;
            ymin -= pad;
            ymax += pad;
        }
        let xspan = (xmax - xmin).max(1.0);
        let px = |x: f64| x0 + (x - xmin) / xspan * (x1 - x0);
        let py = |y: f64| y0 - (y - ymin) / (ymax - ymin) * (y0 - y1);
        writeln!(s, r#"<text x="{x0}" y="{}" font-size="13">{}</text>"#, y1 - 8.0, escape(&ser.name))?;
        writeln!(
            s,
            r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#888"/>"##,
            x1 - x0,
            y0 - y1
        )?;
        for t in ticks(ymin, ymax, 4) {
            let y = py(t);
            writeln!(s, r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#ddd"/>"##)?;
            writeln!(
                s,
                r#"<text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"#,
                x0 - 6.0,
                y + 4.0,
                label(t)
            )?;
        }
        for t in ticks(xmin, xmin + xspan, 8) {
            writeln!(
                s,
                r#"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
                px(t),
                y0 + 16.0,
                label(t)
            )?;
        }
        writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">step</text>"#,
            (x0 + x1) / 2.0,
            y0 + 32.0
        )?;
        let pts: Vec<String> = ser.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        writeln!(s, r##"<polyline points="{}" fill="none" stroke="#1f6fb4" stroke-width="1.8"/>"##, pts.join(" "))?;
        // Few points (an evaluation per epoch) read better marked.
        if ser.points.len() <= 30 {
            for &(x, y) in &ser.points {
                writeln!(s, r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#1f6fb4"/>"##, px(x), py(y))?;
            }
        }
    }
    s.push_str("</svg>\n");
    Ok(s)
}

/// `key`'s values against `step` from a JSON Lines log; rows without the key are skipped (a log
/// mixes step and evaluation rows).
pub fn series_from_log(rows: &[serde_json::Value], key: &str) -> Result<Series> {
    let mut points = Vec::new();
    for r in rows {
        if let (Some(step), Some(v)) = (r.get("step").and_then(|v| v.as_f64()), r.get(key).and_then(|v| v.as_f64())) {
            points.push((step, v));
        }
    }
    if points.is_empty() {
        bail!("no row of the log has both \"step\" and a number under \"{key}\"");
    }
    Ok(Series { name: key.to_string(), points })
}

/// Writes the chart as .svg, or as .png rendered from the SVG.
pub fn write(path: &Path, svg_text: &str) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("svg") => crate::fsutil::write_atomic(path, svg_text.as_bytes()),
        Some("png") => {
            let mut opt = resvg::usvg::Options::default();
            let db = opt.fontdb_mut();
            db.load_system_fonts();
            // fontdb maps sans-serif to Arial, which few Linux machines have: take a common
            // sans face that is installed, or any face at all.
            let families: Vec<String> =
                db.faces().flat_map(|f| f.families.iter().map(|(name, _)| name.clone())).collect();
            let preferred = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial", "Helvetica"];
            match preferred.iter().find(|p| families.iter().any(|f| f == *p)).map(|p| p.to_string()) {
                Some(f) => db.set_sans_serif_family(f),
                None => match families.first() {
                    Some(f) => db.set_sans_serif_family(f.clone()),
                    None => eprintln!("warning: no system font found; {} has no text (.svg keeps it)", path.display()),
                },
            }
            let tree = resvg::usvg::Tree::from_str(svg_text, &opt).context("parsing the chart's SVG")?;
            let size = tree.size().to_int_size();
            let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
                .ok_or_else(|| anyhow!("a chart of {}×{} pixels", size.width(), size.height()))?;
            resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
            let png = pixmap.encode_png().map_err(|e| anyhow!("encoding {}: {e}", path.display()))?;
            crate::fsutil::write_atomic(path, &png)
        }
        _ => bail!("{}: the chart's file name must end in .svg or .png", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        assert_eq!(ticks(0.0, 50.0, 8), vec![0.0, 10.0, 20.0, 30.0, 40.0, 50.0]);
        let t = ticks(0.0012, 0.0097, 4);
        assert!(t.iter().all(|v| (0.0012..=0.0097).contains(v)), "{t:?}");
        assert!(t.len() >= 2 && t.len() <= 5, "{t:?}");
    }

    #[test]
    fn series_skip_rows_without_the_key() {
        let rows: Vec<serde_json::Value> = vec![
            serde_json::json!({"step": 1, "kl": 0.5}),
            serde_json::json!({"step": 2, "eval_loss": 3.0}),
            serde_json::json!({"step": 3, "kl": 0.7}),
        ];
        assert_eq!(series_from_log(&rows, "kl").unwrap().points, vec![(1.0, 0.5), (3.0, 0.7)]);
        assert!(series_from_log(&rows, "nope").unwrap_err().to_string().contains("nope"));
    }
}
