//! The loss chart a run leaves beside its adapter: `loss.png` and `loss.svg`, drawn with `plotters`
//! (axes, tick values, axis labels, legend, a title naming model, method, rank and learning rate).
//!
//! Text is drawn from a font embedded in the binary (Hack, from the `epaint_default_fonts` crate),
//! registered with plotters' `ab_glyph` backend, so the PNG has readable labels on a machine with
//! no system fonts. The SVG names the same family and lets the viewer render it.
use crate::train::config::TrainConfig;
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::sync::Once;

/// Size of both charts in pixels (the SVG's viewport).
pub const SIZE: (u32, u32) = (960, 540);

/// The family every label uses; registered once from the embedded font.
const FAMILY: &str = "sans-serif";

/// Weight of the exponential moving average drawn as "smoothed train" (TensorBoard's default 0.6
/// is too jumpy for per-step losses of small batches).
const SMOOTHING: f64 = 0.9;

const TRAIN: RGBColor = RGBColor(150, 180, 225);
const SMOOTH: RGBColor = RGBColor(20, 70, 170);
const EVAL: RGBColor = RGBColor(215, 50, 40);

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = plotters::style::register_font(
            FAMILY,
            FontStyle::Normal,
            epaint_default_fonts::HACK_REGULAR,
        )
        .map_err(|_| Error::Invalid("chart: the embedded font does not parse".into()));
    });
    res
}

/// The chart's title: model, method, rank and learning rate of `cfg`.
pub fn title(cfg: &TrainConfig) -> String {
    let model = cfg
        .model
        .as_deref()
        .and_then(|p| {
            // a Hugging Face snapshot directory is named by its commit: show the repo instead
            let s = p.to_string_lossy();
            match s.find("/models--") {
                Some(i) => s[i + 9..]
                    .split('/')
                    .next()
                    .map(|r| r.replacen("--", "/", 1)),
                // a directory's own name is often generic ("model"): keep its parent's too
                None if p.is_dir() => {
                    let mut c: Vec<String> = p
                        .components()
                        .rev()
                        .take(2)
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    c.reverse();
                    Some(c.join("/"))
                }
                None => p.file_name().map(|n| n.to_string_lossy().into_owned()),
            }
        })
        .unwrap_or_else(|| "model".into());
    // QLoRA when the frozen base is quantised: at load (--quant) or as stored (GGUF, NF4)
    let stored = cfg
        .model
        .as_deref()
        .and_then(|p| crate::store::WeightStore::open(p).ok())
        .and_then(|st| {
            // the quantised type holding the most weights (embeddings may stay float)
            let mut n: Vec<(crate::quant::QType, usize)> = Vec::new();
            for t in st.tensors.iter().filter(|t| t.qtype.is_quantized()) {
                match n.iter_mut().find(|b| b.0 == t.qtype) {
                    Some(b) => b.1 += t.numel(),
                    None => n.push((t.qtype, t.numel())),
                }
            }
            n.into_iter().max_by_key(|b| b.1).map(|b| b.0)
        });
    let method = match (cfg.quant.as_str(), stored) {
        ("none", Some(q)) => format!("QLoRA ({} base)", q.name()),
        ("none", None) => "LoRA".into(),
        (q, _) => format!("QLoRA ({q} at load)"),
    };
    let objective = match cfg.objective.as_str() {
        "dpo" => format!("DPO β={}, ", cfg.beta),
        _ => String::new(),
    };
    format!(
        "{model}: {objective}{method} r={} lr={:e}",
        cfg.rank, cfg.lr
    )
}

/// Exponential moving average of `ys` with bias correction (the first points are not pulled
/// towards zero).
pub fn smooth(ys: &[(usize, f32)], weight: f64) -> Vec<(usize, f32)> {
    let mut avg = 0.0f64;
    let mut norm = 0.0f64;
    ys.iter()
        .map(|&(s, y)| {
            avg = weight * avg + (1.0 - weight) * y as f64;
            norm = weight * norm + (1.0 - weight);
            (s, (avg / norm) as f32)
        })
        .collect()
}

/// Writes `<dir>/loss.png` and `<dir>/loss.svg`: train loss per step, its moving average, and the
/// eval losses as marked points, under `title`.
pub fn write_loss_charts(
    dir: &Path,
    title: &str,
    train: &[(usize, f32)],
    eval: &[(usize, f32)],
) -> Result<()> {
    register_font()?;
    let png = dir.join("loss.png");
    let svg = dir.join("loss.svg");
    // Written to temporary names and renamed, as every other output of a run (the PNG encoder
    // picks its format from the extension, so it stays last).
    let (png_tmp, svg_tmp) = (dir.join(".loss.tmp.png"), dir.join(".loss.tmp.svg"));
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |e: String| Error::Invalid(format!("{}: drawing the loss chart: {e}", p.display()))
    };
    {
        let root = BitMapBackend::new(&png_tmp, SIZE).into_drawing_area();
        draw(&root, title, train, eval).map_err(err(&png))?;
        root.present().map_err(|e| err(&png)(e.to_string()))?;
    }
    {
        let root = SVGBackend::new(&svg_tmp, SIZE).into_drawing_area();
        draw(&root, title, train, eval).map_err(err(&svg))?;
        root.present().map_err(|e| err(&svg)(e.to_string()))?;
    }
    for (from, to) in [(&png_tmp, &png), (&svg_tmp, &svg)] {
        std::fs::rename(from, to).map_err(|e| Error::io(to, e))?;
    }
    Ok(())
}

/// Axis ranges that hold every point, with a little room above and below.
fn ranges(
    train: &[(usize, f32)],
    eval: &[(usize, f32)],
) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let all = || train.iter().chain(eval).filter(|p| p.1.is_finite());
    let x_max = all().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let lo = all().map(|p| p.1).fold(f32::INFINITY, f32::min);
    let hi = all().map(|p| p.1).fold(f32::NEG_INFINITY, f32::max);
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        (lo as f64, hi as f64)
    } else {
        (0.0, 1.0)
    };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (0.0..x_max, (lo - pad).max(0.0)..hi + pad)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    train: &[(usize, f32)],
    eval: &[(usize, f32)],
) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (xr, yr) = ranges(train, eval);
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FAMILY, 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(xr, yr)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .axis_desc_style((FAMILY, 18))
        .label_style((FAMILY, 15))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(e)?;
    let pts = |v: &[(usize, f32)]| -> Vec<(f64, f64)> {
        v.iter()
            .filter(|p| p.1.is_finite())
            .map(|&(s, y)| (s as f64, y as f64))
            .collect()
    };
    if !train.is_empty() {
        chart
            .draw_series(LineSeries::new(pts(train), TRAIN.stroke_width(1)))
            .map_err(e)?
            .label("train")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], TRAIN.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                pts(&smooth(train, SMOOTHING)),
                SMOOTH.stroke_width(2),
            ))
            .map_err(e)?
            .label("smoothed train")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], SMOOTH.stroke_width(2)));
    }
    if !eval.is_empty() {
        let ep = pts(eval);
        chart
            .draw_series(LineSeries::new(ep.clone(), EVAL.stroke_width(2)))
            .map_err(e)?
            .label("eval")
            .legend(|(x, y)| {
                EmptyElement::at((x + 12, y))
                    + PathElement::new([(-12, 0), (12, 0)], EVAL.stroke_width(2))
                    + Circle::new((0, 0), 4, EVAL.filled())
            });
        chart
            .draw_series(ep.iter().map(|&p| Circle::new(p, 4, EVAL.filled())))
            .map_err(e)?;
        // the last eval value written beside its point: the number a reader looks for
        if let Some(&(x, y)) = ep.last() {
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{y:.3}"),
                    (x, y),
                    (FAMILY, 15)
                        .into_font()
                        .color(&EVAL)
                        .pos(Pos::new(HPos::Right, VPos::Bottom)),
                )))
                .map_err(e)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_starts_at_the_first_value_and_follows_a_constant() {
        let s = smooth(&[(1, 2.0), (2, 2.0), (3, 2.0)], 0.9);
        assert!(s.iter().all(|p| (p.1 - 2.0).abs() < 1e-6));
        let s = smooth(&[(1, 4.0), (2, 0.0)], 0.5);
        assert!((s[0].1 - 4.0).abs() < 1e-6);
        // (0.5·0.5·4 + 0.5·0) / (0.5·0.5 + 0.5) = 1/0.75
        assert!((s[1].1 - 4.0 / 3.0).abs() < 1e-5);
    }

    #[test]
    fn ranges_hold_every_point() {
        let (x, y) = ranges(&[(1, 3.0), (10, 1.0)], &[(0, 3.5), (10, 1.5)]);
        assert_eq!(x, 0.0..10.0);
        assert!(y.start < 1.0 && y.end > 3.5);
        let (_, y) = ranges(&[], &[]);
        assert!(y.start < y.end);
    }
}
