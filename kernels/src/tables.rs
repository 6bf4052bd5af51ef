//! Loss tables for word reallocation: L_r[w, i] = sum over the occurrences of word w of
//! -log P_r[i], L_c[w, j] likewise for columns (paper section 3.3). They cost
//! V x (R + C) x 4 bytes (8 GB at V = 1M); see docs/allocation.md for larger vocabularies.

use crate::layout::ModelDims;
use crate::{Error, Result};

/// Row and column loss tables and the occurrence count of every word.
#[derive(Clone, Debug, PartialEq)]
pub struct LossTables {
    pub vocab: usize,
    pub rows: usize,
    pub cols: usize,
    /// [V, R] row-major.
    pub lr: Vec<f32>,
    /// [V, C] row-major.
    pub lc: Vec<f32>,
    /// Occurrences of each word as a target.
    pub counts: Vec<u64>,
}

impl LossTables {
    /// Zeroed tables for a model; refuses sizes beyond `max_bytes`.
    pub fn new(dims: &ModelDims, max_bytes: u64) -> Result<Self> {
        let bytes = dims.vocab as u64 * (dims.rows + dims.cols) as u64 * 4;
        if bytes > max_bytes {
            return Err(Error::Config(format!(
                "loss tables for V = {} need {:.1} GiB, more than the {:.1} GiB allowed (realloc_max_table_gib)",
                dims.vocab,
                bytes as f64 / (1u64 << 30) as f64,
                max_bytes as f64 / (1u64 << 30) as f64
            )));
        }
        Ok(Self {
            vocab: dims.vocab,
            rows: dims.rows,
            cols: dims.cols,
            lr: vec![0.0; dims.vocab * dims.rows],
            lc: vec![0.0; dims.vocab * dims.cols],
            counts: vec![0; dims.vocab],
        })
    }

    /// Add another rank's tables (same shape).
    pub fn add(&mut self, o: &LossTables) -> Result<()> {
        if (o.vocab, o.rows, o.cols) != (self.vocab, self.rows, self.cols) {
            return Err(Error::Shape("loss tables of different shapes".into()));
        }
        for (a, b) in self.lr.iter_mut().zip(&o.lr) {
            *a += b;
        }
        for (a, b) in self.lc.iter_mut().zip(&o.lc) {
            *a += b;
        }
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        Ok(())
    }
}
