//! Word reallocation between epochs, a rank's part: the loss-table pass over its streams
//! (the tables accumulate in the backend), the central step ([`lightrnn_alloc::reallocate`],
//! run by whoever owns the job, through [`crate::dist::control::Control::allocate`]), and
//! the update of the model to the new word -> cell table ([`lightrnn_alloc::carry`]).
use std::sync::Arc;
use std::time::Instant;

use tokio::runtime::Handle;

use lightrnn_alloc::{Carry, Reallocation, Report, SparsePart, SparseTables, carry_vectors};
use lightrnn_kernels::{Backend, LossTables, Stream};

use super::eval::{evaluate, pass};
use crate::data::shards::SplitReader;
use crate::dist::collective::{Collective, share};
use crate::dist::control::Dist;
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
    let vocab = backend.dims().vocab;
    range_tables(
        backend,
        split,
        batch,
        streams,
        bptt,
        0..vocab,
        max_bytes,
        handle,
    )
}

/// [`loss_tables`] of the word ids `words` only.
#[allow(clippy::too_many_arguments)]
fn range_tables(
    backend: &mut dyn Backend,
    split: &Arc<SplitReader>,
    batch: usize,
    streams: std::ops::Range<usize>,
    bptt: usize,
    words: std::ops::Range<usize>,
    max_bytes: u64,
    handle: &Handle,
) -> Result<(LossTables, f64, u64)> {
    backend.begin_loss_tables(words, max_bytes)?;
    let (total, predicted) = pass(
        backend,
        split,
        batch,
        streams,
        bptt,
        Stream::Tables,
        handle,
        |be, b| be.accumulate_loss_tables(b),
    )?;
    Ok((backend.take_loss_tables()?, total, predicted))
}

/// Sparse loss tables (each word's `k` cheapest rows and columns and its exact sums,
/// [`SparseTables`]) in bounded memory: one pass over the streams per range of word ids,
/// each range's dense tables at most `max_bytes`, cut as they are taken. Exact (the same
/// values as the dense tables' cut); the price is one forward pass per range,
/// ceil(V (R + C) 4 / max_bytes) of them. Returns the tables, every word's occurrences,
/// the summed loss and the words predicted (of one pass) and the number of passes.
#[allow(clippy::too_many_arguments)]
pub fn sparse_loss_tables(
    backend: &mut dyn Backend,
    split: &Arc<SplitReader>,
    batch: usize,
    streams: std::ops::Range<usize>,
    bptt: usize,
    k: usize,
    max_bytes: u64,
    handle: &Handle,
) -> Result<SparseBuild> {
    let d = backend.dims();
    let (per_pass, passes) = passes(&d, max_bytes)?;
    let mut out = SparseBuild {
        tables: SparseTables::empty(d.vocab, d.rows, d.cols, k),
        counts: Vec::with_capacity(d.vocab),
        loss: 0.0,
        words: 0,
        passes,
    };
    for p in 0..passes {
        let t0 = Instant::now();
        let range = p * per_pass..((p + 1) * per_pass).min(d.vocab);
        let (t, total, words) = range_tables(
            backend,
            split,
            batch,
            streams.clone(),
            bptt,
            range.clone(),
            max_bytes,
            handle,
        )?;
        out.tables.push_range(&t)?;
        out.counts.extend_from_slice(&t.counts);
        (out.loss, out.words) = (total, words);
        tracing::info!(
            pass = p + 1,
            passes,
            words = ?range,
            seconds = t0.elapsed().as_secs_f64(),
            "sparse loss tables: a range of words done"
        );
    }
    Ok(out)
}

/// Words per pass of a range-by-range build whose dense tables take at most
/// `max_bytes`, and the passes over the vocabulary.
fn passes(d: &lightrnn_kernels::ModelDims, max_bytes: u64) -> Result<(usize, usize)> {
    let per_pass = (max_bytes / LossTables::bytes_per_word(d)).min(d.vocab as u64) as usize;
    if per_pass == 0 {
        return Err(Error::Config(format!(
            "one word's loss tables take {} bytes, more than the {max_bytes} allowed \
             (realloc_max_table_gib)",
            LossTables::bytes_per_word(d)
        )));
    }
    Ok((per_pass, d.vocab.div_ceil(per_pass)))
}

/// What [`sparse_loss_tables`] builds.
pub struct SparseBuild {
    pub tables: SparseTables,
    /// [V] occurrences of each word as a target.
    pub counts: Vec<u64>,
    /// Summed loss and words predicted, of one pass.
    pub loss: f64,
    pub words: u64,
    pub passes: usize,
}

/// Memory this machine can still give (Linux: MemAvailable), in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuse work that needs `need` bytes where this machine has less available.
pub fn check_fits(what: &str, need: u64) -> Result<()> {
    fits(what, need, available_memory())
}

/// [`check_fits`] against `available` bytes (None: unknown, allowed).
fn fits(what: &str, need: u64, available: Option<u64>) -> Result<()> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match available {
        Some(avail) if need > avail => Err(Error::Config(format!(
            "{what} needs about {:.2} GiB of memory and {:.2} GiB are available; the \
             epoch's checkpoint is committed: resume (--resume) where more memory is free, \
             or train without reallocation (realloc_every = 0)",
            gib(need),
            gib(avail)
        ))),
        _ => Ok(()),
    }
}

/// Options of one reallocation.
pub struct ReallocOptions {
    pub batch: usize,
    pub bptt: usize,
    /// The most a round's dense tables take (of sparse tables: one range's).
    pub max_table_bytes: u64,
    /// Candidates per word of sparse tables (0: dense tables).
    pub sparse_k: usize,
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
    let old = backend.allocation()?;
    let streams = share(o.batch, dist.world(), dist.rank());
    let (solved, sums, seconds_tables) = if o.sparse_k > 0 {
        sparse_round(backend, train, o, handle, dist, round, streams, &old)?
    } else {
        // A round that cannot fit is refused before the tables pass, with the figures
        // (the epoch's checkpoint is committed already).
        let d = backend.dims();
        let need = if dist.control.solves_locally() {
            lightrnn_alloc::round_memory_bound(d.vocab, d.rows, d.cols, o.move_cost)
        } else {
            lightrnn_alloc::tables_bytes(d.vocab, d.rows, d.cols)
        };
        check_fits(&format!("reallocation round {round}"), need)?;
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
        let solved = dist.control.allocate(round, tables, &old, o.move_cost)?;
        (solved, sums, seconds_tables)
    };
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

/// A round on sparse tables: one pass per range of words (each range's dense tables at
/// most `o.max_table_bytes`); the ranks' tables of a range are reduce-scattered, so that
/// each rank holds the sums of its share of the range, cuts them
/// ([`SparsePart::cut`]) and hands the part to `control`. No process holds more than
/// one range's dense tables; the solve sees only the parts. Returns the allocation, the
/// loss sum and words of the pass (over all ranks), and the seconds of the passes.
#[allow(clippy::too_many_arguments)]
fn sparse_round(
    backend: &mut dyn Backend,
    train: &Arc<SplitReader>,
    o: &ReallocOptions,
    handle: &Handle,
    dist: &mut Dist,
    round: u64,
    streams: std::ops::Range<usize>,
    old: &[u32],
) -> Result<(Reallocation, [f64; 2], f64)> {
    let t0 = Instant::now();
    let d = backend.dims();
    let (per_pass, passes) = passes(&d, o.max_table_bytes)?;
    let sparse = lightrnn_alloc::sparse_bytes(d.vocab, d.rows, d.cols, o.sparse_k);
    let tables = lightrnn_alloc::tables_bytes(per_pass, d.rows, d.cols);
    // One range's tables, and where the solve is here, the round's sparse tables and the solve.
    let need = tables
        + if dist.control.solves_locally() {
            lightrnn_alloc::sparse_round_memory_bound(d.vocab, d.rows, d.cols, o.sparse_k)
        } else {
            sparse / dist.world() as u64
        };
    check_fits(&format!("reallocation round {round} (sparse tables)"), need)?;
    let mut sums = [0.0; 2];
    for p in 0..passes {
        let tp = Instant::now();
        let range = p * per_pass..((p + 1) * per_pass).min(d.vocab);
        let (mut t, total, words) = range_tables(
            backend,
            train,
            o.batch,
            streams.clone(),
            o.bptt,
            range.clone(),
            o.max_table_bytes,
            handle,
        )?;
        sums = [total, words as f64];
        if dist.world() > 1 {
            t = reduce_scatter(&mut *dist.collective, t)?;
        }
        if !t.words.is_empty() {
            let part = SparsePart::cut(t, old, o.move_cost, o.sparse_k)?;
            dist.control.push_sparse(round, part)?;
        }
        if dist.is_leader() {
            tracing::info!(
                round,
                pass = p + 1,
                passes,
                words = ?range,
                seconds = tp.elapsed().as_secs_f64(),
                "sparse loss tables: a range of words done"
            );
        }
    }
    dist.collective.all_reduce_sum_f64(&mut sums)?;
    let seconds_tables = t0.elapsed().as_secs_f64();
    let solved = dist.control.allocate_sparse(round, old, o.move_cost)?;
    Ok((solved, sums, seconds_tables))
}

/// Every rank's tables of one range summed, scattered: the tables of the rank's share of
/// the range's words (whole words; the counts exact, in f64).
fn reduce_scatter(coll: &mut dyn Collective, mut t: LossTables) -> Result<LossTables> {
    let own = coll.reduce_scatter_sum(&mut t.lr, t.rows)?;
    if coll.reduce_scatter_sum(&mut t.lc, t.cols)? != own {
        return Err(Error::Io(
            "the reduce-scatters of the row and the column tables gave different ranges".into(),
        ));
    }
    let mut counts: Vec<f64> = t.counts.iter().map(|&c| c as f64).collect();
    coll.all_reduce_sum_f64(&mut counts)?;
    let (rr, cc, a) = (t.rows, t.cols, t.words.start);
    let keep = |v: &mut Vec<f32>, unit: usize| {
        v.truncate(own.end * unit);
        v.drain(..own.start * unit);
    };
    keep(&mut t.lr, rr);
    keep(&mut t.lc, cc);
    t.counts = counts[own.clone()].iter().map(|&c| c as u64).collect();
    t.words = a + own.start..a + own.end;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_that_cannot_fit_is_refused_with_both_figures() {
        let gib = 1u64 << 30;
        let e = fits("reallocation round 2", 5 * gib, Some(3 * gib))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("reallocation round 2") && e.contains("5.00 GiB") && e.contains("3.00 GiB"),
            "{e}"
        );
        assert!(e.contains("--resume"), "{e}");
        fits("r", 2 * gib, Some(3 * gib)).unwrap();
        fits("r", u64::MAX, None).unwrap();
        // This machine reports what it has.
        assert!(available_memory().is_some_and(|b| b > 0));
    }
}
