//! Loss tables for word reallocation: L_r[w, i] = sum over the occurrences of word w of
//! -log P_r[i], L_c[w, j] likewise for columns (paper section 3.3). They cost
//! V x (R + C) x 4 bytes (8 GB at V = 1M); a pass can cover a range of word ids only, so
//! larger vocabularies take one pass per range (docs/allocation.md, "Sparse tables").

use std::ops::Range;

use crate::layout::ModelDims;
use crate::{Error, Result};

/// Row and column loss tables and the occurrence count of the words `words` (all the
/// vocabulary, 0..vocab, unless a pass covers a range of word ids).
#[derive(Clone, Debug, PartialEq)]
pub struct LossTables {
    /// The model's vocabulary.
    pub vocab: usize,
    pub rows: usize,
    pub cols: usize,
    /// The word ids the tables hold, in order: entry `w - words.start` is word w.
    pub words: Range<usize>,
    /// [words.len(), R] row-major.
    pub lr: Vec<f32>,
    /// [words.len(), C] row-major.
    pub lc: Vec<f32>,
    /// Occurrences of each word as a target.
    pub counts: Vec<u64>,
}

impl LossTables {
    /// Zeroed tables for the whole vocabulary of a model; refuses sizes beyond `max_bytes`.
    pub fn new(dims: &ModelDims, max_bytes: u64) -> Result<Self> {
        Self::range(dims, 0..dims.vocab, max_bytes)
    }

    /// Zeroed tables for the words `words` of a model; refuses sizes beyond `max_bytes`.
    pub fn range(dims: &ModelDims, words: Range<usize>, max_bytes: u64) -> Result<Self> {
        Self::check_range(dims, &words, max_bytes)?;
        let n = words.len();
        Ok(Self {
            vocab: dims.vocab,
            rows: dims.rows,
            cols: dims.cols,
            words,
            lr: vec![0.0; n * dims.rows],
            lc: vec![0.0; n * dims.cols],
            counts: vec![0; n],
        })
    }

    /// The bytes of the tables of `words` (a non-empty range of the vocabulary), refused
    /// beyond `max_bytes`.
    pub fn check_range(dims: &ModelDims, words: &Range<usize>, max_bytes: u64) -> Result<u64> {
        if words.start >= words.end || words.end > dims.vocab {
            return Err(Error::Config(format!(
                "loss tables for words {}..{} of a vocabulary of {}",
                words.start, words.end, dims.vocab
            )));
        }
        let n = words.len();
        let bytes = Self::bytes_per_word(dims) * n as u64;
        if bytes > max_bytes {
            return Err(Error::Config(format!(
                "loss tables for {n} words need {:.1} GiB, more than the {:.1} GiB allowed \
                 (realloc_max_table_gib)",
                bytes as f64 / (1u64 << 30) as f64,
                max_bytes as f64 / (1u64 << 30) as f64
            )));
        }
        Ok(bytes)
    }

    /// Bytes of one word's tables (f32 entries; the count is not counted).
    pub fn bytes_per_word(dims: &ModelDims) -> u64 {
        (dims.rows + dims.cols) as u64 * 4
    }

    /// Word `w`'s entry in these tables, if it is in their range.
    pub fn index(&self, w: usize) -> Option<usize> {
        self.words.contains(&w).then(|| w - self.words.start)
    }

    /// Add another rank's tables (same shape).
    pub fn add(&mut self, o: &LossTables) -> Result<()> {
        if (o.vocab, o.rows, o.cols, &o.words) != (self.vocab, self.rows, self.cols, &self.words) {
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
