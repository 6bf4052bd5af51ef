//! Evaluation: the mean loss per word of a split (validation and test in training, the
//! loss after a reallocation) over the ranks of a job, and `lightrnn eval`, the
//! perplexity of a checkpoint on a text file.

use serde::Serialize;
use tokio::runtime::Handle;

use lightrnn_kernels::{Backend, BackendKind, BackendOptions, ModelConfig, Stream, open_backend};

use super::sweep::Sweep;
use crate::dist::collective::{Collective, Single};
use lightrnn_core::checkpoint::Checkpoint;
use lightrnn_core::data::shards::SplitReader;
use lightrnn_core::data::store::split_object;
use lightrnn_core::data::text::LineReader;
use lightrnn_core::{Error, Result};

/// Mean loss per word over a split (fresh state, no dropout), each rank of `coll` reading
/// its share of the streams (`sweep.streams`); every rank gets the same result.
pub fn evaluate(
    backend: &mut dyn Backend,
    sweep: &Sweep<'_>,
    coll: &mut dyn Collective,
) -> Result<(f64, u64)> {
    evaluate_with(backend, sweep, coll, &mut |_| {})
}

/// [`evaluate`], calling `done(k)` after the k-th batch (a progress bar).
pub fn evaluate_with(
    backend: &mut dyn Backend,
    sweep: &Sweep<'_>,
    coll: &mut dyn Collective,
    done: &mut dyn FnMut(u64),
) -> Result<(f64, u64)> {
    let mut k = 0u64;
    let (total, words) = sweep.pass(backend, Stream::Eval, |be, b| {
        let l = be.eval_batch(b);
        k += 1;
        done(k);
        l
    })?;
    let mut sums = [total, words as f64];
    coll.all_reduce_sum_f64(&mut sums)?;
    Ok((sums[0] / sums[1].max(1.0), sums[1] as u64))
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub ppl: f64,
    pub loss: f64,
    pub words: u64,
    /// Share of the text's words outside the vocabulary (read as `<unk>`).
    pub unknown_share: f64,
}

/// Tokenise `file` with the checkpoint's vocabulary and evaluate it with `batch` streams.
pub fn eval_file(
    ck: &Checkpoint,
    file: &str,
    batch: Option<usize>,
    threads: usize,
    backend: BackendKind,
    handle: &Handle,
) -> Result<EvalReport> {
    let cfg = &ck.meta.config;
    let (loc, name) = split_object(file)?;
    let (ids, unknown, words_in) = handle.block_on(async {
        let mut r = LineReader::open(&loc, &name, &cfg.text_options()).await?;
        let mut ids = Vec::new();
        let (mut unknown, mut words) = (0u64, 0u64);
        let mut line = String::new();
        while r.next_source().await? {
            while r.next_line(&mut line).await? {
                for w in line.split_whitespace() {
                    let id = ck.vocab.id(w);
                    unknown += u64::from(id == ck.vocab.unk());
                    words += 1;
                    ids.push(id);
                }
                ids.push(ck.vocab.eos());
            }
        }
        Ok::<_, Error>((ids, unknown, words))
    })?;
    let b = batch.unwrap_or(cfg.eval_batch);
    if (ids.len() / b.max(1)) < 2 {
        return Err(Error::Data(format!(
            "{file} has {} tokens (with line ends): too few for {b} streams of at least 2; \
             pass --batch 1 (or a batch of at most {})",
            ids.len(),
            (ids.len() / 2).max(1)
        )));
    }
    let split = SplitReader::in_memory(&name, ids, &ck.vocab)?;
    let mcfg = ModelConfig {
        dims: ck.meta.dims,
        dropout: 0.0,
        seed: ck.meta.rng_seed,
    };
    let mut be = open_backend(&BackendOptions::new(backend, threads), &mcfg)?;
    be.set_params(&ck.params)?;
    be.set_allocation(&ck.cells)?;
    let sweep = Sweep::new(&split, b, cfg.bptt, handle);
    let (loss, words) = evaluate(&mut *be, &sweep, &mut Single)?;
    Ok(EvalReport {
        ppl: loss.exp(),
        loss,
        words,
        unknown_share: unknown as f64 / words_in.max(1) as f64,
    })
}
