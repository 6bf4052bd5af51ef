//! Word reallocation between epochs, a rank's part: the loss-table pass over its streams
//! (the tables accumulate in the backend), the central step ([`lightrnn_alloc::reallocate`],
//! run by whoever owns the job, through [`crate::dist::control::Control::allocate`]), and
//! the update of the model to the new word -> cell table ([`lightrnn_alloc::carry`]).
use std::time::Instant;

use lightrnn_alloc::{Carry, Reallocation, Report, SparsePart, SparseTables, carry_vectors};
use lightrnn_kernels::{Backend, LossTables, Phase, Stream};

use super::eval::evaluate;
use super::sweep::Sweep;
use crate::dist::collective::Collective;
use crate::dist::control::Dist;
use lightrnn_core::util::check_fits;
use lightrnn_core::{Error, Result};

/// One forward pass (no dropout) over the streams of `sweep` (all of them, or one
/// rank's share), accumulating the loss tables. Returns them, the summed loss and the
/// words predicted.
pub fn loss_tables(
    backend: &mut dyn Backend,
    sweep: &Sweep<'_>,
    max_bytes: u64,
) -> Result<(LossTables, f64, u64)> {
    let vocab = backend.dims().vocab;
    range_tables(backend, sweep, 0..vocab, max_bytes)
}

/// [`loss_tables`] of the word ids `words` only.
fn range_tables(
    backend: &mut dyn Backend,
    sweep: &Sweep<'_>,
    words: std::ops::Range<usize>,
    max_bytes: u64,
) -> Result<(LossTables, f64, u64)> {
    let (total, predicted) = range_pass(backend, sweep, words, max_bytes)?;
    Ok((backend.take_loss_tables()?, total, predicted))
}

/// The loss-table pass of [`range_tables`], the tables left in the backend.
fn range_pass(
    backend: &mut dyn Backend,
    sweep: &Sweep<'_>,
    words: std::ops::Range<usize>,
    max_bytes: u64,
) -> Result<(f64, u64)> {
    backend.begin_loss_tables(words, max_bytes)?;
    sweep.pass(backend, Stream::Tables, |be, b| {
        be.accumulate_loss_tables(b)
    })
}

/// Sparse loss tables (each word's `k` cheapest rows and columns and its exact sums,
/// [`SparseTables`]) in bounded memory: one pass over the streams of `sweep` per range of
/// word ids, each range's dense tables at most `max_bytes`, cut as they are taken. Exact
/// (the same values as the dense tables' cut); the price is one forward pass per range,
/// ceil(V (R + C) 4 / max_bytes) of them. Returns the tables, every word's occurrences,
/// the summed loss and the words predicted (of one pass) and the number of passes.
pub fn sparse_loss_tables(
    backend: &mut dyn Backend,
    sweep: &Sweep<'_>,
    k: usize,
    max_bytes: u64,
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
        let (t, total, words) = range_tables(backend, sweep, range.clone(), max_bytes)?;
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

/// Options of one reallocation (the split, its streams and their cut are the round's
/// [`Sweep`]).
pub struct ReallocOptions {
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
    /// Keep what [`Moved::undo`] needs to put the model back as it was.
    pub undoable: bool,
    /// Times the loss-table passes (and the check's evaluation).
    pub profiler: lightrnn_kernels::Profiler,
}

/// What a round did: its report, the share of the occurrences' rows and columns it
/// changed ([`lightrnn_core::auto::moved_share`]), and, where asked for, the way back.
pub struct Moved {
    pub report: Report,
    pub moved_share: f64,
    pub undo: Option<Undo>,
}

/// The parameters and the allocation from before a move.
pub struct Undo {
    params: Vec<f32>,
    cells: Vec<u32>,
}

impl Undo {
    /// Put the model back as it was before the move (on every rank alike).
    pub fn apply(self, backend: &mut dyn Backend) -> Result<()> {
        backend.set_params(&self.params)?;
        backend.set_allocation(&self.cells)?;
        Ok(())
    }
}

/// Loss tables (this rank's streams of the training split, `sweep`) -> allocation solved
/// over all ranks' tables (by `control`) -> vectors carried -> model updated, identically
/// on every rank.
pub fn reallocate(
    backend: &mut dyn Backend,
    sweep: &Sweep<'_>,
    o: &ReallocOptions,
    dist: &mut Dist,
    round: u64,
) -> Result<Moved> {
    let t0 = Instant::now();
    let old = backend.allocation()?;
    let (solved, sums, seconds_tables) = if o.sparse_k > 0 {
        sparse_round(backend, sweep, o, dist, round, &old)?
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
        let pass = o.profiler.span(Phase::LossTables);
        let (tables, total, words) = loss_tables(backend, sweep, o.max_table_bytes)?;
        drop(pass);
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
    let moved_share =
        lightrnn_core::auto::moved_share(&old, &solved.cells, &solved.counts, backend.dims().cols);
    let undo = o.undoable.then(|| Undo {
        params: params.clone(),
        cells: old.clone(),
    });
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
    // An undoable round that moved nothing has nothing to measure.
    if o.check && !(o.undoable && report.words_moved == 0) {
        let _s = o.profiler.span(Phase::Eval);
        let (l, _) = evaluate(backend, sweep, &mut *dist.collective)?;
        report.train_loss_after = Some(l);
    }
    Ok(Moved {
        report,
        moved_share,
        undo,
    })
}

/// A round on sparse tables: one pass per range of words (each range's dense tables at
/// most `o.max_table_bytes`); the ranks' tables of a range are reduce-scattered, so that
/// each rank holds the sums of its share of the range, cuts them
/// ([`SparsePart::cut`]) and hands the part to `control`. No process holds more than
/// one range's dense tables; the solve sees only the parts. Returns the allocation, the
/// loss sum and words of the pass (over all ranks), and the seconds of the passes.
fn sparse_round(
    backend: &mut dyn Backend,
    sweep: &Sweep<'_>,
    o: &ReallocOptions,
    dist: &mut Dist,
    round: u64,
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
        let (total, words) = {
            let _s = o.profiler.span(Phase::LossTables);
            range_pass(backend, sweep, range.clone(), o.max_table_bytes)?
        };
        sums = [total, words as f64];
        // At a world of one too: NCCL at world size 1 is how a one-GPU machine checks the
        // device path (scripts/gpu-check.sh); the ring's is the identity there.
        let t = reduce_scatter(&mut *dist.collective, backend, &range)?;
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
/// the range's words (whole words; the counts exact, in f64). Summed on the devices where
/// the tables lie on one and the group has a device transport (NCCL), each rank taking
/// its share only; else taken to the host and reduce-scattered over the ring.
fn reduce_scatter(
    coll: &mut dyn Collective,
    backend: &mut dyn Backend,
    words: &std::ops::Range<usize>,
) -> Result<LossTables> {
    if let Some(peers) = coll.device_peers()
        && let Some(s) = backend.take_loss_tables_scattered(peers)?
    {
        let mut own = s.own;
        let counts = summed_counts(coll, &s.counts)?;
        let at = own.words.start - words.start;
        own.counts = counts[at..at + own.words.len()].to_vec();
        return Ok(own);
    }
    let mut t = backend.take_loss_tables()?;
    let own = coll.reduce_scatter_sum(&mut t.lr, t.rows)?;
    if coll.reduce_scatter_sum(&mut t.lc, t.cols)? != own {
        return Err(Error::Io(
            "the reduce-scatters of the row and the column tables gave different ranges".into(),
        ));
    }
    let counts = summed_counts(coll, &t.counts)?;
    let (rr, cc, a) = (t.rows, t.cols, t.words.start);
    let keep = |v: &mut Vec<f32>, unit: usize| {
        v.truncate(own.end * unit);
        v.drain(..own.start * unit);
    };
    keep(&mut t.lr, rr);
    keep(&mut t.lc, cc);
    t.counts = counts[own.clone()].to_vec();
    t.words = a + own.start..a + own.end;
    Ok(t)
}

/// Occurrence counts summed over the ranks (exactly: f64 holds them).
fn summed_counts(coll: &mut dyn Collective, counts: &[u64]) -> Result<Vec<u64>> {
    let mut c: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    coll.all_reduce_sum_f64(&mut c)?;
    Ok(c.into_iter().map(|c| c as u64).collect())
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    /// A range's tables reduce-scattered on the devices (three CUDA ranks on the emulated
    /// device, their device transport beside a TCP ring) hold what the ring's host
    /// reduce-scatter of the same tables holds: every word once, its sums and its counts.
    #[test]
    fn a_range_reduce_scattered_on_the_devices_holds_the_rings_sums() {
        use lightrnn_kernels::cuda::CudaBackend;
        use lightrnn_kernels::cuda::comm::allreduce::ThreadPeers;
        use lightrnn_kernels::{Batch, GradReduce, GradsMut, ModelConfig, ModelDims, Peers};

        use crate::dist::ring::{TcpRing, rings};

        /// The ring for host values and the threads' device transport.
        struct Both(TcpRing, ThreadPeers);
        impl GradReduce for Both {
            fn all_reduce_grads(&mut self, g: GradsMut<'_>) -> lightrnn_kernels::Result<()> {
                self.0.all_reduce_grads(g)
            }
        }
        impl Collective for Both {
            fn rank(&self) -> usize {
                self.0.rank()
            }
            fn world(&self) -> usize {
                self.0.world()
            }
            fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
                self.0.all_reduce_sum(buf)
            }
            fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
                self.0.broadcast(buf, root)
            }
            fn device_peers(&mut self) -> Option<&mut dyn Peers> {
                Some(&mut self.1)
            }
        }

        let dims = ModelDims::square(90, 5, 6, 1).unwrap();
        let cfg = ModelConfig {
            dims,
            dropout: 0.0,
            seed: 4,
        };
        let (world, words, t, b) = (3usize, 10..80, 4usize, 3usize);
        let timeout = std::time::Duration::from_secs(30);
        let peers = ThreadPeers::group(world, timeout);
        let rs: Vec<TcpRing> = rings(world, timeout)
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        let got: Vec<(LossTables, LossTables)> = std::thread::scope(|s| {
            let hs: Vec<_> = rs
                .into_iter()
                .zip(peers)
                .enumerate()
                .map(|(r, (ring, p))| {
                    let words = words.clone();
                    s.spawn(move || {
                        let mut be = CudaBackend::emulated(&cfg, 1 << 30).unwrap();
                        // Every rank its own tokens, skewed toward low ids.
                        let toks: Vec<u32> = (0..(t + 1) * b)
                            .map(|i| ((i * 7 + r * 13) % 23 + (i % 4) * 17) as u32)
                            .collect();
                        let pass = |be: &mut CudaBackend| {
                            be.begin_loss_tables(words.clone(), 1 << 30).unwrap();
                            be.reset_state(Stream::Tables);
                            be.accumulate_loss_tables(&Batch {
                                inputs: &toks[..t * b],
                                targets: &toks[b..],
                                steps: t,
                                batch: b,
                                stream: Stream::Tables,
                            })
                            .unwrap();
                        };
                        let mut both = Both(ring, p);
                        pass(&mut be);
                        let dev = reduce_scatter(&mut both, &mut be, &words).unwrap();
                        pass(&mut be);
                        let host = reduce_scatter(&mut both.0, &mut be, &words).unwrap();
                        (dev, host)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Word w's (row sums, column sums, count) from a set of shares, each word once.
        let by_word = |parts: Vec<&LossTables>| {
            let mut out = std::collections::BTreeMap::new();
            for p in parts {
                for (i, w) in p.words.clone().enumerate() {
                    let row = p.lr[i * p.rows..(i + 1) * p.rows].to_vec();
                    let col = p.lc[i * p.cols..(i + 1) * p.cols].to_vec();
                    assert!(
                        out.insert(w, (row, col, p.counts[i])).is_none(),
                        "word {w} twice"
                    );
                }
            }
            assert_eq!(
                out.keys().copied().collect::<Vec<_>>(),
                words.clone().collect::<Vec<_>>()
            );
            out
        };
        let dev = by_word(got.iter().map(|g| &g.0).collect());
        let host = by_word(got.iter().map(|g| &g.1).collect());
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
        };
        for (w, (d, h)) in dev.values().zip(host.values()).enumerate() {
            assert!(
                close(&d.0, &h.0) && close(&d.1, &h.1),
                "word {w}: sums differ"
            );
            assert_eq!(d.2, h.2, "word {w}: counts differ");
        }
        assert!(
            dev.values().map(|v| v.2).sum::<u64>() > 0,
            "the range holds seen words"
        );
    }
}
