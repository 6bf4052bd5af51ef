//! `metrics.jsonl`: one [`MetricsLine`] per line, rewritten whole (object stores have no
//! append) at most every few seconds, before every checkpoint is committed, at epoch
//! ends and at the end of the run. Only the leader writes. A resumed run keeps the lines
//! up to its checkpoint's step (all of them are in the file: it was written before the
//! checkpoint existed) and logs the later ones again: every step's line is there once.
//! TensorBoard's event files (`board`) follow the same lines and the same writes.

use std::time::Instant;

use bytes::Bytes;

use super::board::Board;
use lightrnn_core::data::store::Location;
use lightrnn_core::report::MetricsLine;
use lightrnn_core::{Error, Result};

const METRICS: &str = "metrics.jsonl";

pub(super) struct MetricsFile {
    out: Location,
    enabled: bool,
    lines: Vec<String>,
    dirty: bool,
    /// Whether the file was written in this session.
    written: bool,
    last_flush: Instant,
    /// TensorBoard's events of the same lines (`tensorboard = true`).
    board: Option<Board>,
}

impl MetricsFile {
    pub(super) async fn open(
        out: &Location,
        resume_step: Option<u64>,
        enabled: bool,
        tensorboard: bool,
    ) -> Result<Self> {
        let mut lines = Vec::new();
        if enabled
            && let Some(step) = resume_step
            && let Ok(b) = out.get(METRICS).await
        {
            for l in String::from_utf8_lossy(&b).lines() {
                let keep = serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= step);
                if keep {
                    lines.push(l.to_string());
                }
            }
        }
        Ok(Self {
            out: out.clone(),
            enabled,
            lines,
            dirty: true,
            written: false,
            last_flush: Instant::now(),
            board: (enabled && tensorboard).then(|| Board::new(out, resume_step)),
        })
    }

    /// Remove the reallocation lines of `step` (a round run again after a resume).
    pub(super) fn drop_realloc_at(&mut self, step: u64) {
        self.lines.retain(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .map(|v| !(v["kind"] == "realloc" && v["step"].as_u64() == Some(step)))
                .unwrap_or(true)
        });
        if let Some(b) = &mut self.board {
            b.drop_realloc_at(step);
        }
        self.dirty = true;
    }

    /// TensorBoard's events, where they are written.
    pub(super) fn board(&mut self) -> Option<&mut Board> {
        self.board.as_mut()
    }

    /// Add a line; its keys are written in sorted order.
    pub(super) fn push(&mut self, line: &MetricsLine) -> Result<()> {
        let v = serde_json::to_value(line).map_err(|e| Error::Data(e.to_string()))?;
        if let Some(b) = &mut self.board {
            b.line(line);
        }
        self.lines.push(v.to_string());
        self.dirty = true;
        Ok(())
    }

    /// Write the file if lines were added: now with `force` or when nothing was written
    /// yet (the file appears with the first log line), else at most every 10 s.
    pub(super) async fn flush(&mut self, force: bool) -> Result<()> {
        let due = force || !self.written || self.last_flush.elapsed().as_secs() >= 10;
        if !(self.enabled && due) {
            return Ok(());
        }
        if self.dirty && !self.lines.is_empty() {
            let mut s = self.lines.join("\n");
            s.push('\n');
            self.out.put(METRICS, Bytes::from(s)).await?;
            self.dirty = false;
            self.written = true;
            self.last_flush = Instant::now();
        }
        if let Some(b) = &mut self.board
            && let Err(e) = b.flush().await
        {
            // A dashboard's file: the run goes on, and the next write tries again.
            tracing::warn!(error = %e, "TensorBoard's event file could not be written");
        }
        Ok(())
    }
}
