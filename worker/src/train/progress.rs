//! How a training session shows where it is: the progress bar on a terminal, and the
//! running figures of the steps since the last log line.

use crate::dist::collective::Collective;
use lightrnn_core::Result;

/// A progress bar over an epoch's steps (nothing when not on a terminal).
pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub(super) fn new(enabled: bool, len: u64, pos: u64, epoch: u64, epochs: u64) -> Self {
        if !enabled {
            return Self { bar: None };
        }
        let bar = indicatif::ProgressBar::new(len);
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("epoch {}/{}", epoch + 1, epochs));
        bar.set_position(pos);
        Self { bar: Some(bar) }
    }
    /// A bar over `len` steps of work named `title` (an evaluation).
    pub(super) fn titled(enabled: bool, len: u64, title: &str) -> Self {
        let p = Self::new(enabled, len, 0, 0, 0);
        if let Some(b) = &p.bar {
            b.set_prefix(title.to_string());
        }
        p
    }
    pub(super) fn update(&self, pos: u64, msg: String) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.set_message(msg);
        }
    }
    pub(super) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Running (loss, words, seconds) of the steps since the last log line. Each rank sums
/// its own streams; [`Window::reduce`] turns them into the job's figures.
#[derive(Default)]
pub(super) struct Window {
    pub(super) loss: f64,
    pub(super) words: u64,
    pub(super) secs: f64,
}

impl Window {
    /// The job's (loss sum, words) of the window, summed over the ranks; resets the
    /// window's loss and words (its seconds are reset by whoever reports them).
    pub(super) fn reduce(&mut self, coll: &mut dyn Collective) -> Result<(f64, u64)> {
        let mut s = [self.loss, self.words as f64];
        coll.all_reduce_sum_f64(&mut s)?;
        self.loss = 0.0;
        self.words = 0;
        Ok((s[0], s[1] as u64))
    }
}
