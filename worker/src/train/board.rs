//! TensorBoard event files in the run directory's `tb/` (`tensorboard = true`, the
//! default), written by the leader beside `metrics.jsonl` and from the same lines, so the
//! two always hold the same values: the scalars of every train, valid, test, realloc and
//! profile line with the step as x, the config and each reallocation decision as text,
//! the allocation after each round as an image.
//!
//! Each session (a run, or a resume of it) writes one event file of its own, rewritten
//! whole when `metrics.jsonl` is (object stores have no append), after a `SessionLog`
//! START at the step it continues from. A resumed run first rewrites the files of earlier
//! sessions without the events past its checkpoint's step (they are logged again), so
//! TensorBoard never shows a step twice; a TensorBoard reading the directory live drops
//! them too, at the START. A value the resumed run writes again at its checkpoint's step
//! (the validation of an epoch a stopped run ended at) replaces the earlier one. A run
//! started afresh in a directory removes the event files of the run it replaces, as it
//! replaces its `metrics.jsonl`.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use lightrnn_core::data::store::Location;
use lightrnn_core::report::{MetricsLine, ProfileLine, ReallocLine};
use lightrnn_core::tensorboard::{Event, What, file_name, read_records, write_record};
use lightrnn_core::{Error, Result};

const DIR: &str = "tb";

/// What a session removes from the files of earlier ones.
struct Prune {
    /// Events past this step go (a resumed run); None: all of them (a run started afresh
    /// in the directory, whose metrics.jsonl it replaces).
    after: Option<u64>,
    /// The realloc events of this step go too (a round run again).
    realloc_at: Option<u64>,
}

pub(super) struct Board {
    dir: Location,
    name: String,
    records: Vec<u8>,
    prune: Option<Prune>,
    dirty: bool,
    /// (tag, step) of every value this session wrote.
    written: std::collections::HashSet<(String, i64)>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Board {
    /// A session's event file in `out/tb/`; `resume_step`: the step a resumed run
    /// continues from.
    pub(super) fn new(out: &Location, resume_step: Option<u64>) -> Self {
        let t = now();
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or_else(|| "lightrnn".into());
        // Sessions sort by their start, to the microsecond.
        let name = file_name(t as u64, &host, &format!("{:016}", (t * 1e6) as u64));
        let mut records = Vec::new();
        write_record(&mut records, &Event::file_version(t));
        if let Some(step) = resume_step {
            // TensorBoard drops what it read of this step and later: the steps after the
            // checkpoint, logged again.
            write_record(
                &mut records,
                &Event::session_start(t, step + 1, &format!("resumed at step {step}")),
            );
        }
        Self {
            dir: out.join(DIR),
            name,
            records,
            prune: Some(Prune {
                after: resume_step,
                realloc_at: None,
            }),
            dirty: true,
            written: Default::default(),
        }
    }

    fn push(&mut self, e: Event) {
        if self.prune.is_some() {
            for t in e.tags() {
                self.written.insert((t.to_string(), e.step));
            }
        }
        write_record(&mut self.records, &e);
        self.dirty = true;
    }

    fn scalar(&mut self, step: u64, tag: &str, v: f64) {
        if v.is_finite() {
            self.push(Event::scalar(now(), step, tag, v));
        }
    }

    /// Markdown text at `step`.
    pub(super) fn text(&mut self, step: u64, tag: &str, markdown: &str) {
        self.push(Event::text(now(), step, tag, markdown));
    }

    /// A PNG image at `step`.
    pub(super) fn image(&mut self, step: u64, tag: &str, png: Vec<u8>, w: u32, h: u32) {
        self.push(Event::image(now(), step, tag, png, w, h));
    }

    /// A round of `step` runs again: its events of earlier sessions go.
    pub(super) fn drop_realloc_at(&mut self, step: u64) {
        if let Some(p) = &mut self.prune {
            p.realloc_at = Some(step);
        }
    }

    /// The events of one metrics line.
    pub(super) fn line(&mut self, line: &MetricsLine) {
        match line {
            MetricsLine::Train(l) => {
                let s = l.step;
                self.scalar(s, "train/loss", l.loss);
                self.scalar(s, "train/ppl", l.ppl);
                self.scalar(s, "train/lr", l.lr);
                self.scalar(s, "train/words_per_sec", l.words_per_sec);
                self.scalar(s, "train/grad_norm", l.grad_norm);
                for (r, &w) in l.rank_words_per_sec.iter().enumerate() {
                    self.scalar(s, &format!("train/words_per_sec/rank{r}"), w);
                }
            }
            MetricsLine::Valid(l) => {
                self.scalar(l.step, "valid/loss", l.loss);
                self.scalar(l.step, "valid/ppl", l.ppl);
                self.scalar(l.step, "train/epoch_loss", l.train_loss);
            }
            MetricsLine::Test(l) => {
                self.scalar(l.step, "test/loss", l.loss);
                self.scalar(l.step, "test/ppl", l.ppl);
            }
            MetricsLine::Realloc(l) => self.realloc(l),
            MetricsLine::Profile(l) => self.profile(l),
            MetricsLine::Other => {}
        }
    }

    fn realloc(&mut self, l: &ReallocLine) {
        let (s, r) = (l.step, &l.report);
        self.scalar(s, "realloc/objective_before", r.objective_before);
        self.scalar(s, "realloc/objective_after", r.objective_after);
        self.scalar(s, "realloc/lower_bound", r.lower_bound);
        if r.objective_before.is_finite() {
            self.scalar(s, "realloc/words_moved", r.words_moved as f64);
        }
        self.scalar(s, "realloc/train_loss_before", r.train_loss_before);
        if let Some(a) = r.train_loss_after {
            self.scalar(s, "realloc/train_loss_after", a);
        }
        self.scalar(s, "realloc/seconds", r.seconds_tables + r.seconds_solve);
        let mut md = format!("**Round {}** after epoch {}, step {s}", l.round, l.epoch);
        if r.objective_before.is_finite() {
            md += &format!(
                ": solver {}, objective {:.4} -> {:.4} (bound {:.4}), {} words moved{}",
                r.solver,
                r.objective_before,
                r.objective_after,
                r.lower_bound,
                r.words_moved,
                if r.kept_current {
                    ", the current allocation kept"
                } else {
                    ""
                }
            );
        }
        if let Some(d) = &l.auto {
            self.scalar(s, "realloc/predicted_gain", d.predicted_gain);
            self.scalar(s, "realloc/realized_gain", d.realized);
            md += &format!(
                "\n\nAutomatic rule: **{:?}**, {} (predicted gain {:.4}, realised share {:.3}, \
                 disruption {:.4}, {:.1} epochs left)",
                d.decision, d.why, d.predicted_gain, d.realized, d.disruption, d.epochs_left
            );
        }
        self.text(s, "realloc/decision", &md);
    }

    fn profile(&mut self, l: &ProfileLine) {
        for (phase, &secs) in &l.seconds_per_step {
            self.scalar(l.step, &format!("time/{phase}"), secs);
        }
        if let Some(c) = l.seconds_per_step.get("checkpoint") {
            self.scalar(l.step, "checkpoint/seconds", c * l.steps as f64);
        }
    }

    /// Write the session's file (after pruning earlier sessions' on a resume's first).
    pub(super) async fn flush(&mut self) -> Result<()> {
        if let Some(p) = &self.prune {
            self.prune_earlier(p).await?;
            self.prune = None;
            self.written = Default::default();
        }
        if self.dirty {
            let data = Bytes::from(self.records.clone());
            self.dir.put(&self.name, data).await?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Rewrite earlier sessions' files without what this one logs again.
    async fn prune_earlier(&self, p: &Prune) -> Result<()> {
        let (objects, _) = match self.dir.list().await {
            Ok(l) => l,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        for (name, _) in objects {
            if !name.contains("tfevents") || name == self.name {
                continue;
            }
            let bytes = self.dir.get(&name).await?;
            let (records, damage) = read_records(&format!("{DIR}/{name}"), &bytes);
            if let Some(e) = damage {
                // Rewritten below without what follows the damage.
                tracing::warn!(error = %e, "a TensorBoard event file is cut at its damage");
            }
            // What this session wrote again before its first write replaces the earlier
            // value (the validation of an epoch that ended where a stopped run resumed).
            let keep = |e: &Event| {
                let step = e.step.max(0) as u64;
                let realloc = e.tags().any(|t| t.starts_with("realloc/"));
                let again = e
                    .tags()
                    .any(|t| self.written.contains(&(t.to_string(), e.step)));
                p.after.is_some_and(|a| step <= a)
                    && !(realloc && p.realloc_at == Some(step))
                    && !again
            };
            let kept: Vec<u8> = records
                .iter()
                .filter(|(e, _)| keep(e))
                .flat_map(|(_, b)| b.iter().copied())
                .collect();
            let substantive = records
                .iter()
                .any(|(e, _)| keep(e) && !matches!(e.what, Some(What::FileVersion(_))));
            if !substantive {
                self.dir.delete(&name).await?;
            } else if kept.len() < bytes.len() {
                self.dir.put(&name, Bytes::from(kept)).await?;
            }
        }
        Ok(())
    }
}

/// The allocation as a picture: one square per cell of the R x C table (at most 512
/// pixels a side; cells are averaged where the table is larger), shaded dark blue to
/// yellow by the log count of its word, white where no word sits. A PNG and its size.
pub(super) fn allocation_png(
    cells: &[u32],
    count: impl Fn(usize) -> u64,
    rows: usize,
    cols: usize,
) -> Result<(Vec<u8>, u32, u32)> {
    const SIDE: usize = 512;
    let mut grid = vec![f64::NAN; rows * cols];
    let max = (0..cells.len()).map(&count).max().unwrap_or(1).max(1) as f64;
    for (w, &c) in cells.iter().enumerate() {
        grid[c as usize] = ((count(w) as f64 + 1.0).ln() / (max + 1.0).ln()).sqrt();
    }
    let px = (SIDE / rows.max(cols)).clamp(1, 16);
    // Table cells per pixel where the table is larger than the picture.
    let per = rows.max(cols).div_ceil(SIDE).max(1);
    let (w, h) = (
        (cols.div_ceil(per) * px) as u32,
        (rows.div_ceil(per) * px) as u32,
    );
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    for y in 0..h as usize {
        for x in 0..w as usize {
            let (r0, c0) = (y / px * per, x / px * per);
            let (mut sum, mut n) = (0.0, 0usize);
            for r in r0..(r0 + per).min(rows) {
                for c in c0..(c0 + per).min(cols) {
                    let v = grid[r * cols + c];
                    if v.is_finite() {
                        sum += v;
                        n += 1;
                    }
                }
            }
            let colour = if n == 0 {
                [255, 255, 255]
            } else {
                lightrnn_core::util::viridis(sum / n as f64)
            };
            let at = (y * w as usize + x) * 3;
            rgb[at..at + 3].copy_from_slice(&colour);
        }
    }
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let err = |e: png::EncodingError| Error::Data(format!("allocation image: {e}"));
        enc.write_header()
            .map_err(err)?
            .write_image_data(&rgb)
            .map_err(err)?;
    }
    Ok((png, w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_pictures_are_pngs_of_the_table() {
        // 4 words in a 2 x 3 table: two empty cells stay white.
        let (png, w, h) = allocation_png(&[0, 1, 2, 4], |w| [100, 10, 1, 0][w], 2, 3).unwrap();
        assert_eq!((w, h), (3 * 16, 2 * 16));
        let mut dec = png::Decoder::new(std::io::Cursor::new(png))
            .read_info()
            .unwrap();
        let mut buf = vec![0; dec.output_buffer_size()];
        dec.next_frame(&mut buf).unwrap();
        let at = |x: usize, y: usize| &buf[(y * w as usize + x) * 3..][..3];
        assert_eq!(at(0, 0), [253, 231, 37], "the most frequent word is yellow");
        assert_eq!(
            at(16 * 2 + 3, 16 + 3),
            [255, 255, 255],
            "cell (1, 2) is empty"
        );
        // A 1000 x 1000 table is averaged into at most 512 pixels a side.
        let cells: Vec<u32> = (0..1_000_000).collect();
        let (_, w, h) = allocation_png(&cells, |w| w as u64 % 7, 1000, 1000).unwrap();
        assert!(w <= 512 && h <= 512 && w >= 400, "{w} x {h}");
    }
}
