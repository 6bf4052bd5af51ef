//! Text generation from a trained model, word by word, from the factored distribution
//! P(w) = P_r(r(w)) * P_c(c(w) | r(w)): the row is chosen first, then the column given
//! the row's input vector (one LSTM step per row candidate that needs its column
//! distribution).
//!
//! Sampling is exact over the words of the table: a word is drawn with probability
//! proportional to P_r(r) P_c(c | r) over occupied cells only. Rows whose cells are all
//! occupied need no column pass to weigh them (their columns sum to 1); the at most
//! R*C - V empty cells make a few rows need one. With a temperature T both factors are
//! tempered (softmax of logits / T). With top-k the k most probable words are found by a
//! branch and bound over rows in order of P_r (a row whose P_r is below the k-th best word
//! so far cannot hold a better one), then one is drawn in proportion to its probability.
//!
//! The LSTM runs on the CPU one step at a time (batch 1) with the kernels' single-stream
//! inference ([`lightrnn_kernels::cpu::infer`]): the same cell, layout and products the
//! backend evaluates with, so a word's probability here is the one `eval` measures.

use lightrnn_kernels::ModelDims;
use lightrnn_kernels::cpu::infer::{Head, Input, StepState, Stepper};
use lightrnn_kernels::rng::{Philox, PhiloxStream, Purpose};

use lightrnn_core::checkpoint::Checkpoint;
use lightrnn_core::data::text::EOS;
use lightrnn_core::{Error, Result};

/// How words are drawn.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub temperature: f64,
    /// Draw among the k most probable words only (0: all words).
    pub top_k: usize,
    pub seed: u64,
}

/// A model ready to generate, with its LSTM state.
pub struct Sampler<'a> {
    ck: &'a Checkpoint,
    dims: ModelDims,
    stepper: Stepper,
    /// Word of each cell (row * cols + col), if any.
    word_of_cell: Vec<Option<u32>>,
    /// Whether every cell of a row holds a word.
    row_full: Vec<bool>,
    row_any: Vec<bool>,
    state: StepState,
    rng: PhiloxStream,
    opts: SampleOptions,
}

/// log softmax of `z / t`, in f64.
fn log_softmax(z: &[f32], t: f64) -> Vec<f64> {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64 / t;
    let s: f64 = z.iter().map(|&x| (x as f64 / t - m).exp()).sum();
    let l = m + s.ln();
    z.iter().map(|&x| x as f64 / t - l).collect()
}

fn log_sum_exp(v: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = v.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + v.map(|x| (x - m).exp()).sum::<f64>().ln()
}

impl<'a> Sampler<'a> {
    pub fn new(ck: &'a Checkpoint, opts: SampleOptions) -> Result<Self> {
        if !(opts.temperature > 0.0 && opts.temperature.is_finite()) {
            return Err(Error::Config(format!(
                "temperature {} must be positive",
                opts.temperature
            )));
        }
        let dims = ck.meta.dims;
        let stepper = Stepper::new(dims, &ck.params).map_err(|e| Error::Checkpoint {
            url: ck.url.clone(),
            msg: e.to_string(),
        })?;
        let mut word_of_cell = vec![None; dims.rows * dims.cols];
        for (w, &cell) in ck.cells.iter().enumerate() {
            let slot = word_of_cell
                .get_mut(cell as usize)
                .ok_or_else(|| Error::Checkpoint {
                    url: ck.url.clone(),
                    msg: format!("word {w} sits in cell {cell}, outside the table"),
                })?;
            *slot = Some(w as u32);
        }
        let row_full = (0..dims.rows)
            .map(|r| {
                word_of_cell[r * dims.cols..(r + 1) * dims.cols]
                    .iter()
                    .all(Option::is_some)
            })
            .collect();
        let row_any = (0..dims.rows)
            .map(|r| {
                word_of_cell[r * dims.cols..(r + 1) * dims.cols]
                    .iter()
                    .any(Option::is_some)
            })
            .collect();
        let mut s = Self {
            ck,
            dims,
            state: stepper.zero_state(),
            stepper,
            word_of_cell,
            row_full,
            row_any,
            rng: Philox::new(opts.seed, Purpose::Other).stream(0),
            opts,
        };
        // Text starts after a line: the column input of the last <eos>.
        let eos = ck.vocab.eos();
        let (_, c) = s.cell_of(eos);
        s.state = s.stepper.step(&s.state, Input::Col(c));
        Ok(s)
    }

    fn cell_of(&self, w: u32) -> (usize, usize) {
        let cell = self.ck.cells[w as usize] as usize;
        (cell / self.dims.cols, cell % self.dims.cols)
    }

    /// Log-probabilities (tempered) of a head at state `st`.
    fn head(&self, st: &StepState, head: Head) -> Vec<f64> {
        log_softmax(&self.stepper.logits(st, head), self.opts.temperature)
    }

    /// Read word `w` (its row step, then its column step).
    pub fn feed(&mut self, w: u32) {
        let (r, c) = self.cell_of(w);
        let s = self.stepper.step(&self.state, Input::Row(r));
        self.state = self.stepper.step(&s, Input::Col(c));
    }

    /// Column log-probabilities of row `r` (and the state after its row step).
    fn columns(&self, r: usize) -> (StepState, Vec<f64>) {
        let s = self.stepper.step(&self.state, Input::Row(r));
        let lp = self.head(&s, Head::Cols);
        (s, lp)
    }

    fn occupied(&self, r: usize, c: usize) -> bool {
        self.word_of_cell[r * self.dims.cols + c].is_some()
    }

    /// Draw an index in proportion to exp(weights).
    fn draw(&mut self, logw: &[f64]) -> usize {
        let top = logw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = logw.iter().map(|&x| (x - top).exp()).collect();
        let total: f64 = p.iter().sum();
        let mut u = self.rng.next_f64() * total;
        for (i, &x) in p.iter().enumerate() {
            if u < x {
                return i;
            }
            u -= x;
        }
        p.iter().rposition(|&x| x > 0.0).unwrap_or(0)
    }

    /// The next word's (log P(w), word) candidates: every word, or the top k.
    fn candidates(&self) -> Vec<(f64, usize, usize)> {
        let lp_r = self.head(&self.state, Head::Rows);
        let k = self.opts.top_k;
        if k == 0 {
            // Rows weighed by P_r(r) * (mass of their occupied columns).
            return (0..self.dims.rows)
                .filter(|&r| self.row_any[r])
                .map(|r| {
                    let mass = if self.row_full[r] {
                        0.0
                    } else {
                        let (_, lp_c) = self.columns(r);
                        log_sum_exp(
                            (0..self.dims.cols)
                                .filter(|&c| self.occupied(r, c))
                                .map(|c| lp_c[c]),
                        )
                    };
                    (lp_r[r] + mass, r, usize::MAX)
                })
                .collect();
        }
        let mut rows: Vec<usize> = (0..self.dims.rows).filter(|&r| self.row_any[r]).collect();
        rows.sort_by(|&a, &b| lp_r[b].total_cmp(&lp_r[a]));
        let mut best: Vec<(f64, usize, usize)> = Vec::with_capacity(k + self.dims.cols);
        for r in rows {
            if best.len() >= k && lp_r[r] <= best[k - 1].0 {
                break; // no word of this row (or a later one) beats the k-th best
            }
            let (_, lp_c) = self.columns(r);
            for c in (0..self.dims.cols).filter(|&c| self.occupied(r, c)) {
                best.push((lp_r[r] + lp_c[c], r, c));
            }
            best.sort_by(|a, b| b.0.total_cmp(&a.0));
            best.truncate(k);
        }
        best
    }

    /// Draw the next word and read it.
    pub fn next_word(&mut self) -> u32 {
        let w = self.draw_word();
        self.feed(w);
        w
    }

    /// Draw the next word without reading it (the state stays).
    pub fn draw_word(&mut self) -> u32 {
        let cands = self.candidates();
        let logw: Vec<f64> = cands.iter().map(|x| x.0).collect();
        let (_, r, c) = cands[self.draw(&logw)];
        let c = if c == usize::MAX {
            let (_, lp_c) = self.columns(r);
            let cols: Vec<usize> = (0..self.dims.cols)
                .filter(|&c| self.occupied(r, c))
                .collect();
            let lw: Vec<f64> = cols.iter().map(|&c| lp_c[c]).collect();
            cols[self.draw(&lw)]
        } else {
            c
        };
        self.word_of_cell[r * self.dims.cols + c].expect("an occupied cell")
    }

    /// log P(w) for every word of the vocabulary at the current state (tempered), for
    /// tests and scoring: sums to 1 over the vocabulary.
    pub fn word_log_probs(&self) -> Vec<f64> {
        let lp_r = self.head(&self.state, Head::Rows);
        let mut out = vec![f64::NEG_INFINITY; self.dims.vocab];
        for r in (0..self.dims.rows).filter(|&r| self.row_any[r]) {
            let (_, lp_c) = self.columns(r);
            let cells = &self.word_of_cell[r * self.dims.cols..(r + 1) * self.dims.cols];
            for (cell, lc) in cells.iter().zip(&lp_c) {
                if let Some(w) = cell {
                    out[*w as usize] = lp_r[r] + lc;
                }
            }
        }
        let z = log_sum_exp(out.iter().cloned().filter(|x| x.is_finite()));
        out.iter().map(|x| x - z).collect()
    }
}

/// Generate `words` words after `prompt` (whitespace-separated; words outside the
/// vocabulary read as `<unk>`). `<eos>` comes out as a line break.
pub fn sample(ck: &Checkpoint, prompt: &str, words: usize, opts: SampleOptions) -> Result<String> {
    let mut out = String::new();
    sample_into(ck, prompt, words, opts, &mut |piece| {
        out.push_str(piece);
        true
    })?;
    Ok(out)
}

/// [`sample`] as it goes: `emit` receives each piece of the text (a word with the space
/// before it, or a line break) as soon as it is drawn, and ends the generation by
/// returning false (its reader went away). Memory stays constant in `words`. Returns
/// the words drawn.
pub fn sample_into(
    ck: &Checkpoint,
    prompt: &str,
    words: usize,
    opts: SampleOptions,
    emit: &mut dyn FnMut(&str) -> bool,
) -> Result<usize> {
    let mut s = Sampler::new(ck, opts)?;
    let text = if ck.meta.config.lowercase {
        prompt.to_lowercase()
    } else {
        prompt.to_string()
    };
    for w in text.split_whitespace() {
        s.feed(ck.vocab.id(w));
    }
    let mut line_start = true;
    let mut piece = String::new();
    for n in 0..words {
        let w = s.next_word();
        let word = ck.vocab.word(w);
        piece.clear();
        if word == EOS {
            piece.push('\n');
            line_start = true;
        } else {
            if !line_start {
                piece.push(' ');
            }
            piece.push_str(word);
            line_start = false;
        }
        if !emit(&piece) {
            return Ok(n + 1);
        }
    }
    Ok(words)
}
