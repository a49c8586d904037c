//! Charts as SVG and, for .png, rasterised with resvg (text set in the system's sans-serif font):
//! line charts of training logs (one panel per metric against the step), and the trade-off chart of
//! evaluated runs (mean toxicity against ROUGE-L and against the PPO run's KL, a labelled point per run).

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

/// A horizontal grid line across a panel from `x0` to `x1` at height `y`, labelled at its left.
fn y_gridline(s: &mut String, y: f64, (x0, x1): (f64, f64), text: &str) -> std::fmt::Result {
    writeln!(s, r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#ddd"/>"##)?;
    writeln!(s, r#"<text x="{}" y="{:.1}" font-size="11" text-anchor="end">{text}</text>"#, x0 - 6.0, y + 4.0)
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
            y_gridline(&mut s, py(t), (x0, x1), &label(t))?;
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

/// One evaluated run of the trade-off chart.
#[derive(Clone, Debug, PartialEq)]
pub struct RunPoint {
    pub label: String,
    /// The mean toxicity (the eval's lead label) of the run's summaries.
    pub toxicity: f64,
    pub rouge_l: f64,
    /// The PPO run's KL to the SFT model, from its log; none for a model without one.
    pub kl: Option<f64>,
}

/// The PPO log's steps whose `kl` the trade-off chart averages (as tools/results_table.py does).
pub const KL_TAIL_STEPS: usize = 5;

impl RunPoint {
    /// The point of `detox eval`'s JSON output `eval` (named `source` in errors), with the KL of
    /// the training log's rows when given: the mean `kl` over its last [`KL_TAIL_STEPS`] steps.
    pub fn new(label: &str, source: &str, eval: &serde_json::Value, log: Option<&[serde_json::Value]>) -> Result<Self> {
        let number = |v: &serde_json::Value, path: &str| {
            v.pointer(path).and_then(|x| x.as_f64()).ok_or_else(|| anyhow!("{source}: no number at {path}"))
        };
        let kl = match log {
            None => None,
            Some(rows) => {
                let kls: Vec<f64> = rows
                    .iter()
                    .filter(|r| r.get("step").is_some())
                    .filter_map(|r| r.get("kl").and_then(|v| v.as_f64()))
                    .collect();
                ensure!(!kls.is_empty(), "the training log for {label} has no step with a \"kl\"");
                let tail = &kls[kls.len().saturating_sub(KL_TAIL_STEPS)..];
                Some(tail.iter().sum::<f64>() / tail.len() as f64)
            }
        };
        Ok(Self {
            label: label.to_string(),
            toxicity: number(eval, "/model_summaries/lead_mean")?,
            rouge_l: number(eval, "/rouge/rougeL")?,
            kl,
        })
    }
}

/// [lo, hi] widened by 8 % (and to a non-empty span), so that points stay off the frame.
fn padded(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    let pad = if hi - lo < 1e-12 { hi.abs().max(1.0) * 0.05 } else { (hi - lo) * 0.08 };
    (lo - pad, hi + pad)
}

const SCATTER_W: f64 = 460.0;
const SCATTER_H: f64 = 380.0;

/// One scatter panel at horizontal offset `left`: each (x, y, label) a labelled dot.
fn scatter_panel(s: &mut String, left: f64, x_name: &str, points: &[(f64, f64, &str)], ys: (f64, f64)) -> Result<()> {
    let (x0, x1) = (left + MARGIN_L, left + SCATTER_W - MARGIN_R);
    let (y0, y1) = (40.0 + SCATTER_H - MARGIN_B, 40.0 + MARGIN_T);
    let (xmin, xmax) = padded(points.iter().map(|p| p.0));
    // Room on the right for the rightmost point's label.
    let xmax = xmax + 0.15 * (xmax - xmin);
    let (ymin, ymax) = ys;
    let px = |x: f64| x0 + (x - xmin) / (xmax - xmin) * (x1 - x0);
    let py = |y: f64| y0 - (y - ymin) / (ymax - ymin) * (y0 - y1);
    writeln!(s, r#"<text x="{x0}" y="{}" font-size="13">mean toxicity against {}</text>"#, y1 - 8.0, escape(x_name))?;
    writeln!(s, r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#888"/>"##, x1 - x0, y0 - y1)?;
    for t in ticks(ymin, ymax, 5) {
        y_gridline(s, py(t), (x0, x1), &label(t))?;
    }
    for t in ticks(xmin, xmax, 5) {
        let x = px(t);
        writeln!(s, r##"<line x1="{x:.1}" y1="{y1}" x2="{x:.1}" y2="{y0}" stroke="#eee"/>"##)?;
        writeln!(s, r#"<text x="{x:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"#, y0 + 16.0, label(t))?;
    }
    writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        y0 + 32.0,
        escape(x_name)
    )?;
    for &(x, y, name) in points {
        let (cx, cy) = (px(x), py(y));
        writeln!(
            s,
            r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="4" fill="#1f6fb4"><title>{}</title></circle>"##,
            escape(name)
        )?;
        writeln!(s, r#"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#, cx + 6.0, cy - 5.0, escape(name))?;
    }
    Ok(())
}

/// The trade-off chart: mean toxicity (one scale for both panels) against ROUGE-L, and against KL
/// for the runs that have one.
pub fn tradeoff_svg(title: &str, runs: &[RunPoint]) -> Result<String> {
    ensure!(!runs.is_empty(), "no runs to plot");
    let width = 2.0 * SCATTER_W;
    let height = 40.0 + SCATTER_H;
    let ys = padded(runs.iter().map(|r| r.toxicity));
    let mut s = String::new();
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
    )?;
    writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#)?;
    writeln!(s, r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#, width / 2.0, escape(title))?;
    let by_rouge: Vec<(f64, f64, &str)> = runs.iter().map(|r| (r.rouge_l, r.toxicity, r.label.as_str())).collect();
    scatter_panel(&mut s, 0.0, "ROUGE-L", &by_rouge, ys)?;
    let by_kl: Vec<(f64, f64, &str)> =
        runs.iter().filter_map(|r| r.kl.map(|kl| (kl, r.toxicity, r.label.as_str()))).collect();
    if by_kl.is_empty() {
        writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="13" text-anchor="middle">no run has a training log: no KL</text>"#,
            1.5 * SCATTER_W,
            40.0 + SCATTER_H / 2.0
        )?;
    } else {
        scatter_panel(&mut s, SCATTER_W, &format!("KL (mean of the last {KL_TAIL_STEPS} PPO steps)"), &by_kl, ys)?;
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

    /// The trade-off chart of three small eval outputs: each run's label and its dot where its
    /// toxicity, ROUGE-L and KL put it, the KL averaged over the log's last steps.
    #[test]
    fn tradeoff_chart_places_each_run() {
        let eval =
            |tox: f64, rl: f64| serde_json::json!({"model_summaries": {"lead_mean": tox}, "rouge": {"rougeL": rl}});
        let log: Vec<serde_json::Value> = (1..=8)
            .map(|k| serde_json::json!({"step": k, "kl": k as f64}))
            .chain([serde_json::json!({"kind": "note", "kl": 100.0})])
            .collect();
        let runs = vec![
            RunPoint::new("SFT", "a.json", &eval(0.30, 0.20), None).unwrap(),
            RunPoint::new("ppo <lr 2x>", "b.json", &eval(0.10, 0.18), Some(&log)).unwrap(),
            RunPoint::new("ppo-s0", "c.json", &eval(0.05, 0.22), Some(&log[..3])).unwrap(),
        ];
        assert_eq!(runs[1].kl, Some((4.0 + 5.0 + 6.0 + 7.0 + 8.0) / 5.0));
        assert_eq!(runs[2].kl, Some(2.0));
        let svg = tradeoff_svg("trade-off", &runs).unwrap();
        assert!(svg.contains("ppo &lt;lr 2x&gt;") && svg.contains(">SFT<") && svg.contains(">ppo-s0<"), "{svg}");
        assert!(svg.contains(">ROUGE-L<") && svg.contains("KL (mean of the last 5 PPO steps)"), "{svg}");
        let dots: Vec<(f64, f64, String)> = svg
            .lines()
            .filter(|l| l.starts_with("<circle"))
            .map(|l| {
                let attr = |k: &str| -> f64 {
                    let at = l.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
                    l[at..].split('"').next().unwrap().parse().unwrap()
                };
                let name = l.split("<title>").nth(1).unwrap().split("</title>").next().unwrap().to_string();
                (attr("cx"), attr("cy"), name)
            })
            .collect();
        // Three dots against ROUGE-L, two against KL (SFT has no log).
        assert_eq!(dots.len(), 5, "{svg}");
        let (rouge, kl) = dots.split_at(3);
        let at = |ds: &[(f64, f64, String)], n: &str| ds.iter().find(|d| d.2 == n).cloned().unwrap();
        let (sft, lr2, s0) = (at(rouge, "SFT"), at(rouge, "ppo &lt;lr 2x&gt;"), at(rouge, "ppo-s0"));
        // Higher ROUGE-L lies right; higher toxicity lies up (smaller y).
        assert!(lr2.0 < sft.0 && sft.0 < s0.0, "{rouge:?}");
        assert!(sft.1 < lr2.1 && lr2.1 < s0.1, "{rouge:?}");
        let (k2, k0) = (at(kl, "ppo &lt;lr 2x&gt;"), at(kl, "ppo-s0"));
        assert!(k0.0 < k2.0 && k2.0 > SCATTER_W, "the KL panel is the right one: {kl:?}");
        assert_eq!((k2.1, k0.1), (lr2.1, s0.1), "one toxicity scale for both panels");
        let err = RunPoint::new("x", "bad.json", &serde_json::json!({"rouge": {}}), None).unwrap_err();
        assert!(err.to_string().contains("bad.json") && err.to_string().contains("lead_mean"), "{err}");
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
