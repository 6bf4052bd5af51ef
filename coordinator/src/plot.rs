//! `lightrnn plot`: PNG pictures of a run, drawn in pure Rust (plotters with the DejaVu
//! font embedded, so no system fonts or C libraries are needed).
//!
//! - Curves from `metrics.jsonl`: training perplexity (every logging window) and
//!   validation perplexity (every epoch) against the step, a dashed
//!   vertical line at every word reallocation, the test perplexity in the title, and
//!   words per second below.
//! - The allocation of a checkpoint: the R x C table with every cell shaded by the log
//!   count of the word it holds (empty cells white), so one sees which rows the frequent
//!   words gather in.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use lightrnn_core::auto::Verdict;
use lightrnn_core::checkpoint::Checkpoint;
use lightrnn_core::report::MetricsLine;

use crate::{Error, Result};

/// What the curves show, read from `metrics.jsonl`.
#[derive(Debug, Default)]
pub struct Curves {
    /// (step, perplexity) of each logging window.
    pub train: Vec<(f64, f64)>,
    /// (step, perplexity) after each epoch (and at a stop inside one).
    pub valid: Vec<(f64, f64)>,
    /// (step, words per second) of each logging window.
    pub speed: Vec<(f64, f64)>,
    /// Steps after which words were reallocated.
    pub reallocs: Vec<f64>,
    pub test_ppl: Option<f64>,
}

/// Parse the lines of a run's metrics (lines of kinds this version does not know are
/// skipped; a line that is not a metrics line is an error naming it).
pub fn read_curves(text: &str, origin: &str) -> Result<Curves> {
    let mut c = Curves::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: MetricsLine = serde_json::from_str(line).map_err(|e| {
            Error::Usage(format!("{origin} line {}: not a metrics line: {e}", i + 1))
        })?;
        match l {
            MetricsLine::Train(t) => {
                if t.ppl.is_finite() {
                    c.train.push((t.step as f64, t.ppl));
                }
                if t.words_per_sec.is_finite() {
                    c.speed.push((t.step as f64, t.words_per_sec));
                }
            }
            MetricsLine::Valid(v) => {
                if v.ppl.is_finite() {
                    c.valid.push((v.step as f64, v.ppl));
                }
            }
            // Moves only (the guard's way back is one): an automatic round that skipped
            // or undid its move left the words where they were.
            MetricsLine::Realloc(r) => {
                if r.auto
                    .as_ref()
                    .is_none_or(|a| matches!(a.decision, Verdict::Move | Verdict::Revert))
                {
                    c.reallocs.push(r.step as f64)
                }
            }
            MetricsLine::Test(t) => c.test_ppl = Some(t.ppl),
            MetricsLine::Profile(_) | MetricsLine::Other => {}
        }
    }
    if c.train.is_empty() && c.valid.is_empty() {
        return Err(Error::Usage(format!(
            "{origin}: no training or validation lines to plot"
        )));
    }
    Ok(c)
}

fn font() {
    // Registering twice is harmless; the font is a valid TrueType file.
    let _ =
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
}

fn draw_err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Plot(format!("{e:?}"))
}

/// Training and validation curves, reallocations, speed: a 1200 x 900 PNG at `out`.
pub fn curves_png(c: &Curves, title: &str, out: &Path) -> Result<()> {
    font();
    let root = BitMapBackend::new(out, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let (top, bottom) = root.split_vertically(600);
    let all = c.train.iter().chain(&c.valid);
    let max_step = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let lo = all
        .clone()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let hi = all.map(|p| p.1).fold(1.0, f64::max);
    // Linear: early windows can be far above the rest; cap the axis at 6x the lowest
    // point so the later curve stays readable (higher points are clipped).
    let hi = hi.min(lo * 6.0);
    let (lo, hi) = (lo * 0.9, (hi * 1.05).max(lo * 1.5));
    let caption = match c.test_ppl {
        Some(t) => format!("{title}: test perplexity {t:.1}"),
        None => title.to_string(),
    };
    // A little room right of the last point (the last validation sits on it), and no
    // more x labels than whole steps (a short run repeated them after rounding).
    let x_end = max_step * 1.03;
    let x_labels = (max_step as usize + 1).clamp(2, 10);
    let mut chart = ChartBuilder::on(&top)
        .caption(caption, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_end, lo..hi)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("perplexity")
        .y_labels(12)
        .x_labels(x_labels)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(draw_err)?;
    let green = RGBColor(0, 140, 60);
    for (k, &s) in c.reallocs.iter().enumerate() {
        // Dashed: short segments up the full height (log steps).
        let n = 40;
        let seg = chart
            .draw_series((0..n).step_by(2).map(|i| {
                let y = |j: f64| lo + (hi - lo) * j / n as f64;
                PathElement::new(
                    vec![(s, y(i as f64)), (s, y(i as f64 + 1.0))],
                    green.stroke_width(2),
                )
            }))
            .map_err(draw_err)?;
        if k == 0 {
            seg.label("word reallocation").legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], green.stroke_width(2))
            });
        }
    }
    chart
        .draw_series(LineSeries::new(c.train.iter().copied(), &BLUE))
        .map_err(draw_err)?
        .label("train (logging windows)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            c.valid.iter().copied(),
            RED.stroke_width(2),
        ))
        .map_err(draw_err)?
        .label("validation")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(c.valid.iter().map(|&p| Circle::new(p, 4, RED.filled())))
        .map_err(draw_err)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;

    let top_speed = c.speed.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut speed = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_end, 0f64..top_speed)
        .map_err(draw_err)?;
    speed
        .configure_mesh()
        .x_desc("step")
        .y_desc("words / s")
        .x_labels(x_labels)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(draw_err)?;
    speed
        .draw_series(LineSeries::new(c.speed.iter().copied(), &BLACK))
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

/// The allocation pictures' colour for t in [0, 1] (`lightrnn_core::util::viridis`).
fn shade(t: f64) -> RGBColor {
    let [r, g, b] = lightrnn_core::util::viridis(t);
    RGBColor(r, g, b)
}

/// The allocation of `ck` as a PNG at `out`: one square per cell, shaded by the log count
/// of its word, white where no word sits; row and column indices on the axes and a colour
/// bar of the counts on the right. Returns the image size.
pub fn allocation_png(ck: &Checkpoint, out: &Path) -> Result<(u32, u32)> {
    font();
    let d = ck.meta.dims;
    let cell = (720 / d.rows.max(d.cols)).clamp(1, 24) as u32;
    let (w, h) = (d.cols as u32 * cell, d.rows as u32 * cell);
    // Room for the title and the column axis above, the row axis left, the colour bar
    // and its labels right, the note on empty cells below.
    let (left, top, right, bottom) = (60u32, 80u32, 130u32, 40u32);
    let size = (w + left + right, h + top + bottom);
    let root = BitMapBackend::new(out, size).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let text = |s: String, at: (i32, i32), px: u32| {
        root.draw(&Text::new(s, at, ("sans-serif", px)))
            .map_err(draw_err)
    };
    text(
        format!(
            "{} words in a {} x {} table, step {}, {} reallocation(s)",
            d.vocab, d.rows, d.cols, ck.meta.step, ck.meta.reallocations
        ),
        (left as i32, 12),
        18,
    )?;
    let max = (0..d.vocab as u32)
        .map(|i| ck.vocab.count(i))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let shade_of = |count: f64| shade(((count + 1.0).ln() / (max + 1.0).ln()).sqrt());
    let (x0, y0) = (left as i32, top as i32);
    for (word, &c) in ck.cells.iter().enumerate() {
        let (r, col) = (c as usize / d.cols, c as usize % d.cols);
        let (x, y) = (
            x0 + (col as u32 * cell) as i32,
            y0 + (r as u32 * cell) as i32,
        );
        root.draw(&Rectangle::new(
            [(x, y), (x + cell as i32, y + cell as i32)],
            shade_of(ck.vocab.count(word as u32) as f64).filled(),
        ))
        .map_err(draw_err)?;
    }
    root.draw(&Rectangle::new(
        [(x0 - 1, y0 - 1), (x0 + w as i32, y0 + h as i32)],
        BLACK.stroke_width(1),
    ))
    .map_err(draw_err)?;
    // Axes: about 6 ticks a side, at whole indices.
    let ticks = |n: usize| -> Vec<usize> {
        let step = n.div_ceil(6).max(1);
        (0..n).step_by(step).collect()
    };
    text("column".into(), (x0 + w as i32 / 2 - 25, y0 - 44), 14)?;
    for j in ticks(d.cols) {
        let x = x0 + (j as u32 * cell + cell / 2) as i32;
        root.draw(&PathElement::new(vec![(x, y0 - 6), (x, y0 - 1)], BLACK))
            .map_err(draw_err)?;
        text(j.to_string(), (x - 4, y0 - 24), 13)?;
    }
    text("row".into(), (4, y0 - 24), 14)?;
    for i in ticks(d.rows) {
        let y = y0 + (i as u32 * cell + cell / 2) as i32;
        root.draw(&PathElement::new(vec![(x0 - 6, y), (x0 - 1, y)], BLACK))
            .map_err(draw_err)?;
        text(i.to_string(), (x0 - 40, y - 7), 13)?;
    }
    // The colour bar: counts from 1 (bottom) to the largest (top), log-shaded as the cells.
    let (bx, bw) = (x0 + w as i32 + 24, 18);
    let bar_h = h.max(60) as i32;
    for k in 0..bar_h {
        let t = 1.0 - k as f64 / (bar_h - 1).max(1) as f64;
        let count = ((max + 1.0).powf(t * t) - 1.0).max(0.0);
        root.draw(&Rectangle::new(
            [(bx, y0 + k), (bx + bw, y0 + k + 1)],
            shade_of(count).filled(),
        ))
        .map_err(draw_err)?;
    }
    root.draw(&Rectangle::new(
        [(bx, y0), (bx + bw, y0 + bar_h)],
        BLACK.stroke_width(1),
    ))
    .map_err(draw_err)?;
    text(format!("{}", max as u64), (bx + bw + 6, y0 - 6), 13)?;
    text("0".into(), (bx + bw + 6, y0 + bar_h - 8), 13)?;
    text("count (log)".into(), (bx - 14, y0 - 24), 14)?;
    text(
        format!(
            "white: an empty cell ({} of {} cells hold no word)",
            d.rows * d.cols - d.vocab,
            d.rows * d.cols
        ),
        (x0, y0 + h as i32 + 12),
        14,
    )?;
    root.present().map_err(draw_err)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_metrics_lines_and_refuses_garbage() {
        let text = r#"{"kind":"train","step":10,"ppl":300.0,"words_per_sec":1000.0}
{"kind":"train","step":20,"ppl":200.0,"words_per_sec":1100.0}
{"kind":"valid","step":20,"ppl":210.0}
{"kind":"realloc","step":20,"round":1}
{"kind":"test","step":20,"ppl":205.0}
"#;
        let c = read_curves(text, "m").unwrap();
        assert_eq!(c.train, vec![(10.0, 300.0), (20.0, 200.0)]);
        assert_eq!(c.valid, vec![(20.0, 210.0)]);
        assert_eq!(c.reallocs, vec![20.0]);
        assert_eq!(c.test_ppl, Some(205.0));
        let e = read_curves("{\"kind\":\"train\"}\nnot json\n", "m.jsonl")
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.jsonl line 2"), "{e}");
        assert!(read_curves("", "m").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        curves_png(&c, "run", &p).unwrap();
        let png = std::fs::read(&p).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 1200);
    }
}
