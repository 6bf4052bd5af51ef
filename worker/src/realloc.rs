//! Word reallocation between epochs, a rank's part: the loss-table pass over its streams,
//! the central step ([`lightrnn_alloc::reallocate`], run by whoever owns the job, through
//! [`crate::cluster::Control::allocate`]), and the update of the model to the new word ->
//! cell table.
//!
//! What moves with a word. The allocation objective is the training loss with the
//! hidden states held fixed, i.e. it places every word in the cell whose *output* row and
//! column vectors already predict it best; so the output layers (W_r, b_r, W_c, b_c) stay
//! with their cells. The *input* vectors of a cell were trained for its old words: with
//! `realloc_carry = "inputs"` each row's (column's) new input vector is the
//! frequency-weighted mean of the old input vectors of the words that now occupy it, so
//! every word keeps (an average of) the input it had. `"none"` keeps every vector with its
//! cell (the paper's and the PyTorch reference's procedure); `"all"` also carries the
//! output vectors with the words.

use std::sync::Arc;
use std::time::Instant;

use tokio::runtime::Handle;

use lightrnn_alloc::Report;

use lightrnn_kernels::{Backend, Batch, LossTables, ParamLayout, Stream};

use crate::batches::Batches;
use crate::cluster::Dist;
use crate::collective::share;
use crate::shards::SplitReader;
use crate::train::evaluate;
use crate::{Error, Result};

/// One forward pass (no dropout) over streams `streams` of `split` cut into `batch`
/// streams of `bptt` steps (all of them, or one rank's share), accumulating the loss
/// tables. Returns them, the summed loss and the words predicted.
pub fn loss_tables(
    backend: &mut dyn Backend,
    split: &Arc<SplitReader>,
    batch: usize,
    streams: std::ops::Range<usize>,
    bptt: usize,
    max_bytes: u64,
    handle: &Handle,
) -> Result<(LossTables, f64, u64)> {
    backend.begin_loss_tables(max_bytes)?;
    backend.reset_state(Stream::Tables);
    let b = streams.len();
    let mut batches = Batches::streams(split.clone(), handle.clone(), batch, streams, bptt, 0)?;
    let mut buf = Vec::new();
    let (mut total, mut words) = (0.0, 0u64);
    while let Some(t) = batches.next_batch(&mut buf)? {
        let bt = Batch {
            inputs: &buf[..t * b],
            targets: &buf[b..],
            steps: t,
            batch: b,
            stream: Stream::Tables,
        };
        let l = backend.accumulate_loss_tables(&bt)?;
        total += l.total();
        words += l.words;
    }
    backend.reset_state(Stream::Tables);
    Ok((backend.take_loss_tables()?, total, words))
}

/// Which vectors follow the words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carry {
    None,
    Inputs,
    All,
}

impl std::str::FromStr for Carry {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "inputs" => Ok(Self::Inputs),
            "all" => Ok(Self::All),
            o => Err(Error::Config(format!(
                "realloc_carry {o:?}: expected none, inputs or all"
            ))),
        }
    }
}

/// Move vectors of `params` (PyTorch layout) from the old to the new allocation: for each
/// row (column), the frequency-weighted mean of the old vectors of its new words.
/// Rows and columns left without words keep their vectors.
pub fn carry_vectors(
    layout: &ParamLayout,
    params: &mut [f32],
    old: &[u32],
    new: &[u32],
    counts: &[u64],
    carry: Carry,
) -> Result<()> {
    if carry == Carry::None {
        return Ok(());
    }
    let d = layout.dims;
    let cols = d.cols as u32;
    let mut names = vec![("emb_r.weight", true), ("emb_c.weight", false)];
    if carry == Carry::All {
        names.extend([
            ("out_r.weight", true),
            ("out_r.bias", true),
            ("out_c.weight", false),
            ("out_c.bias", false),
        ]);
    }
    for (name, by_row) in names {
        let spec = layout
            .spec(name)
            .ok_or_else(|| Error::Config(format!("model has no {name}")))?;
        let n = spec.shape[0];
        let width = spec.len() / n;
        let src = params[spec.range()].to_vec();
        let mut acc = vec![0f64; n * width];
        let mut weight = vec![0f64; n];
        for w in 0..d.vocab {
            let pick = |c: u32| {
                if by_row {
                    (c / cols) as usize
                } else {
                    (c % cols) as usize
                }
            };
            let (from, to) = (pick(old[w]), pick(new[w]));
            // +1: words unseen in training still pull their old vector a little.
            let f = counts[w] as f64 + 1.0;
            weight[to] += f;
            for k in 0..width {
                acc[to * width + k] += f * src[from * width + k] as f64;
            }
        }
        let dst = &mut params[spec.range()];
        for r in 0..n {
            if weight[r] > 0.0 {
                for k in 0..width {
                    dst[r * width + k] = (acc[r * width + k] / weight[r]) as f32;
                }
            }
        }
    }
    Ok(())
}

/// Options of one reallocation.
pub struct ReallocOptions {
    pub batch: usize,
    pub bptt: usize,
    pub max_table_bytes: u64,
    pub carry: Carry,
    /// Also measure the training loss after the move (one more pass).
    pub check: bool,
    /// Nats per occurrence charged for changing a word's row, and again for changing its
    /// column: only words whose predicted gain exceeds it move.
    pub move_cost: f64,
}

/// Loss tables (this rank's streams) -> allocation solved over all ranks' tables (by
/// `control`) -> vectors carried -> model updated, identically on every rank.
pub fn reallocate(
    backend: &mut dyn Backend,
    train: &Arc<SplitReader>,
    o: &ReallocOptions,
    handle: &Handle,
    dist: &mut Dist,
    round: u64,
) -> Result<Report> {
    let t0 = Instant::now();
    let streams = share(o.batch, dist.world(), dist.rank());
    let (tables, total, words) = loss_tables(
        backend,
        train,
        o.batch,
        streams,
        o.bptt,
        o.max_table_bytes,
        handle,
    )?;
    let mut sums = [total, words as f64];
    dist.collective.all_reduce_sum_f64(&mut sums)?;
    let seconds_tables = t0.elapsed().as_secs_f64();
    let old = backend.allocation()?;
    let solved = dist.control.allocate(round, tables, &old, o.move_cost)?;
    lightrnn_kernels::check_allocation(&backend.dims(), &solved.cells)?;
    if solved.counts.len() != old.len() {
        return Err(Error::Data(format!(
            "the allocation came with {} word counts for {} words",
            solved.counts.len(),
            old.len()
        )));
    }
    let mut report = solved.report;
    report.train_loss_before = sums[0] / sums[1].max(1.0);
    report.seconds_tables = seconds_tables;
    let mut params = backend.params()?;
    carry_vectors(
        backend.layout(),
        &mut params,
        &old,
        &solved.cells,
        &solved.counts,
        o.carry,
    )?;
    backend.set_params(&params)?;
    backend.set_allocation(&solved.cells)?;
    if o.check {
        let (l, _) = evaluate(
            backend,
            train,
            o.batch,
            o.bptt,
            handle,
            &mut *dist.collective,
        )?;
        report.train_loss_after = Some(l);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lightrnn_kernels::ModelDims;

    #[test]
    fn input_vectors_follow_their_words_as_weighted_means() {
        // 4 words in a 2 x 2 table, emb 1: row vectors [10, 20], column vectors [1, 2].
        let dims = ModelDims {
            vocab: 4,
            rows: 2,
            cols: 2,
            emb: 1,
            hidden: 1,
            layers: 1,
        };
        let layout = ParamLayout::new(dims);
        let mut p = vec![0f32; layout.total];
        p[layout.spec("emb_r.weight").unwrap().range()].copy_from_slice(&[10.0, 20.0]);
        p[layout.spec("emb_c.weight").unwrap().range()].copy_from_slice(&[1.0, 2.0]);
        let out_before = p[layout.spec("out_r.weight").unwrap().range()].to_vec();
        let old = [0u32, 1, 2, 3]; // w0 (0,0) w1 (0,1) w2 (1,0) w3 (1,1)
        let new = [3u32, 0, 1, 2]; // w0 -> (1,1), w1 -> (0,0), w2 -> (0,1), w3 -> (1,0)
        let counts = [3u64, 1, 0, 7];
        carry_vectors(&layout, &mut p, &old, &new, &counts, Carry::Inputs).unwrap();
        let er = &p[layout.spec("emb_r.weight").unwrap().range()];
        // Row 0 now holds w1 (old row 0, weight 2) and w2 (old row 1, weight 1).
        assert!((er[0] - (2.0 * 10.0 + 1.0 * 20.0) / 3.0).abs() < 1e-5);
        // Row 1 holds w0 (old row 0, weight 4) and w3 (old row 1, weight 8).
        assert!((er[1] - (4.0 * 10.0 + 8.0 * 20.0) / 12.0).abs() < 1e-5);
        let ec = &p[layout.spec("emb_c.weight").unwrap().range()];
        // Column 0: w1 (old col 1, 2) and w3 (old col 1, 8); column 1: w0 (old 0, 4), w2 (old 0, 1).
        assert!((ec[0] - 2.0).abs() < 1e-6 && (ec[1] - 1.0).abs() < 1e-6);
        assert_eq!(
            p[layout.spec("out_r.weight").unwrap().range()],
            out_before[..],
            "outputs stay with cells"
        );
        assert!("some".parse::<Carry>().is_err());
    }
}
