//! Reallocation rounds: every rank pushes its partial loss tables; once all are in they
//! are summed in rank order (the sum does not depend on arrival order) and the central
//! step ([`lightrnn_alloc::reallocate`]) solves them off the async threads; the ranks
//! fetch the allocation. The round's bookkeeping (memory, arrivals, the solve, its
//! allocation) is the one pipeline of [`super::pipeline`].

use std::sync::Arc;

use futures::{Stream, StreamExt};

use lightrnn_alloc::{Reallocation, RoundOptions};
use lightrnn_core::protocol::{TableArray, TableChunk, TableHead};
use lightrnn_core::wire;
use lightrnn_core::{Error, Result};
use lightrnn_kernels::{LossTables, ModelDims};

use super::error::invalid;
use super::pipeline::RoundInput;
use super::{Job, JobError, JobResult};

/// Where a push's elements go: into the round's sum as they arrive, or into the push's
/// own tables, summed with the others' in rank order once all are in. Adding straight
/// into the sum is exact and independent of arrival order for up to two ranks (0 + a = a,
/// a + b = b + a), so a job of one or two ranks holds one table, not one per rank; with
/// more ranks the rank-order sum keeps a run's numbers independent of arrival order.
enum Sink {
    Sum,
    Own(LossTables),
}

/// One rank's push put back together, checked as it arrives: one push of one rank, tables
/// of this job's size and within its memory limit, every element exactly once (each
/// kind's chunks in order).
struct TableAssembly {
    head: TableHead,
    sink: Sink,
    /// Elements per kind (rows, columns, counts).
    lens: [usize; 3],
    cells: Vec<u32>,
    /// Elements received per kind (rows, columns, counts).
    got: [usize; 3],
}

/// Zeroed tables of the job's shape (the pages are touched as they are written).
fn zero_tables(v: usize, rr: usize, cc: usize) -> LossTables {
    LossTables {
        vocab: v,
        rows: rr,
        cols: cc,
        words: 0..v,
        lr: vec![0.0; v * rr],
        lc: vec![0.0; v * cc],
        counts: vec![0; v],
    }
}

impl TableAssembly {
    /// From the push's first chunk, after the checks that come before any allocation.
    fn start(job: &Job, ch: &TableHead) -> JobResult<Self> {
        let world =
            {
                let st = job.lock();
                job.check(&st, ch.generation, ch.rank)?;
                if st.rounds.get(&ch.round).is_some_and(|r| {
                    r.solving || r.arrived.get(ch.rank as usize).is_some_and(|&a| a)
                }) {
                    return Err(JobError::Duplicate(format!(
                        "rank {} pushed round {} already",
                        ch.rank, ch.round
                    )));
                }
                st.world
            };
        if ch.vocab != job.vocab() as u64 {
            return Err(invalid(format!(
                "tables of {} words for a vocabulary of {}",
                ch.vocab,
                job.vocab()
            )));
        }
        let (v, rr, cc) = (ch.vocab as usize, ch.rows as usize, ch.cols as usize);
        let c = &job.spec.cfg;
        let d = ModelDims::square(v, c.emb, c.hidden, c.layers).map_err(invalid)?;
        if (d.rows, d.cols) != (rr, cc) {
            return Err(invalid(format!(
                "tables of {v} x ({rr} + {cc}) do not fit this job's {} x {} table",
                d.rows, d.cols
            )));
        }
        let bytes = (v * (rr + cc) * 4) as f64;
        if bytes > c.realloc_max_table_gib * (1u64 << 30) as f64 {
            return Err(JobError::NoRoom(format!(
                "loss tables of {:.1} GiB exceed realloc_max_table_gib",
                bytes / (1u64 << 30) as f64
            )));
        }
        // The round's memory here, checked when its first push arrives: the sum (or
        // every rank's tables), a discounted copy with a move cost, the solve.
        if !job.lock().rounds.contains_key(&ch.round) {
            let tables = lightrnn_alloc::tables_bytes(v, rr, cc);
            let held = if world <= 2 { 1 } else { world as u64 + 1 };
            let need = held * tables + lightrnn_alloc::round_memory_bound(v, rr, cc, ch.move_cost)
                - tables;
            job.check_round_memory(
                &format!("coordinator: reallocation round {}", ch.round),
                need,
            )?;
        }
        let sink = if world <= 2 {
            let mut st = job.lock();
            let round = st.rounds.entry(ch.round).or_default();
            if round.sum.is_none() {
                round.sum = Some(zero_tables(v, rr, cc));
            }
            Sink::Sum
        } else {
            Sink::Own(zero_tables(v, rr, cc))
        };
        Ok(Self {
            head: ch.clone(),
            sink,
            lens: [v * rr, v * cc, v],
            cells: Vec::new(),
            got: [0; 3],
        })
    }

    fn add(&mut self, job: &Job, ch: &TableChunk) -> JobResult<()> {
        let h = &self.head;
        let c = &ch.head;
        if (c.generation, c.rank, c.round) != (h.generation, h.rank, h.round) {
            return Err(invalid("chunks of several pushes in one"));
        }
        let kind = ch.kind.ok_or_else(|| invalid("table chunk of no kind"))?;
        if kind == TableArray::Cells {
            // The cells come in order, once.
            if ch.offset != self.cells.len() as u64 {
                return Err(invalid(format!(
                    "cells chunk at {} out of order",
                    ch.offset
                )));
            }
            let mut part = vec![0u32; ch.data.len() / 4];
            let n = wire::decode_into(&mut part, 0, &ch.data).map_err(invalid)?;
            if self.cells.len() + n > self.lens[2] {
                return Err(invalid("more cells than words"));
            }
            self.cells.extend(part);
            return Ok(());
        }
        let k = match kind {
            TableArray::Rows => 0,
            TableArray::Cols => 1,
            TableArray::Counts | TableArray::Cells => 2,
        };
        // Each kind's chunks in order: with the counts, every element exactly once.
        if ch.offset != self.got[k] as u64 {
            return Err(invalid(format!(
                "{kind:?} chunk at {} out of order (expected {})",
                ch.offset, self.got[k]
            )));
        }
        let into = |t: &mut LossTables| match k {
            0 => wire::add_into(&mut t.lr, ch.offset, &ch.data),
            1 => wire::add_into(&mut t.lc, ch.offset, &ch.data),
            _ => wire::add_into(&mut t.counts, ch.offset, &ch.data),
        };
        let n = match &mut self.sink {
            Sink::Own(t) => into(t),
            Sink::Sum => {
                let mut st = job.lock();
                job.check(&st, h.generation, h.rank)?;
                let t = st
                    .rounds
                    .get_mut(&h.round)
                    .and_then(|r| r.sum.as_mut())
                    .ok_or_else(|| JobError::Ended(format!("round {} ended", h.round)))?;
                into(t)
            }
        }
        .map_err(invalid)?;
        self.got[k] += n;
        Ok(())
    }

    /// The push's tables (None: they went into the round's sum) and cells; every
    /// element must have arrived.
    fn finish(self) -> JobResult<(TableHead, Option<LossTables>, Vec<u32>)> {
        if self.got != self.lens {
            return Err(invalid(format!(
                "an incomplete push: {} of {} row, {} of {} column, {} of {} count elements",
                self.got[0], self.lens[0], self.got[1], self.lens[1], self.got[2], self.lens[2]
            )));
        }
        let tables = match self.sink {
            Sink::Own(t) => Some(t),
            Sink::Sum => None,
        };
        Ok((self.head, tables, self.cells))
    }

    /// Whether some of the push's elements are in the round's sum already.
    fn in_sum(&self) -> bool {
        matches!(self.sink, Sink::Sum) && self.got.iter().any(|&n| n > 0)
    }
}

/// A dense round's input: the sum of the tables added as they arrived (one or two ranks)
/// or each rank's tables, rank 0's allocation and the move cost.
struct DenseInput {
    sum: Option<LossTables>,
    parts: Vec<Option<LossTables>>,
    cells: Option<Vec<u32>>,
    move_cost: f64,
}

impl RoundInput for DenseInput {
    fn move_cost(&self) -> f64 {
        self.move_cost
    }

    /// One or two ranks: their tables went into `sum` as they arrived; more: summed here
    /// in rank order.
    fn solve(self, opts: &RoundOptions) -> Result<Reallocation> {
        let mut it = self.sum.into_iter().chain(self.parts.into_iter().flatten());
        let mut sum = it
            .next()
            .ok_or_else(|| Error::Control("no loss tables arrived".into()))?;
        for p in it {
            sum.add(&p)?;
        }
        let cells = self
            .cells
            .ok_or_else(|| Error::Control("rank 0 sent no allocation".into()))?;
        Ok(lightrnn_alloc::reallocate(&sum, &cells, opts)?)
    }
}

impl Job {
    /// A rank's partial tables for a round (and, from rank 0, the current allocation and
    /// the move cost); the last rank's push starts the solve.
    pub async fn push_loss_tables<S>(self: &Arc<Self>, mut s: S) -> JobResult<()>
    where
        S: Stream<Item = JobResult<TableChunk>> + Unpin,
    {
        self.count_rpc();
        let mut push: Option<TableAssembly> = None;
        let received = self.receive_push(&mut s, &mut push).await;
        let (h, t, cells) = match received.and_then(|()| {
            push.take()
                .ok_or_else(|| invalid("an empty push"))?
                .finish()
        }) {
            Ok(x) => x,
            Err(e) => {
                // Half a push in the round's sum spoils it: the group re-forms from the
                // checkpoint taken before the round, which runs it again.
                if let Some(p) = push.as_ref().filter(|p| p.in_sum()) {
                    self.lose_worker(
                        p.head.generation,
                        "table_push",
                        format!(
                            "rank {}'s loss tables for round {} broke off: {}",
                            p.head.rank, p.head.round, e
                        ),
                    );
                }
                return Err(e);
            }
        };
        let (rank, vocab, move_cost) = (h.rank as usize, h.vocab as usize, h.move_cost);
        self.arrive(
            (h.generation, h.rank, h.round),
            |round, w| {
                if round.parts.is_empty() {
                    round.parts = (0..w).map(|_| None).collect();
                    round.arrived = vec![false; w];
                }
                if round.solving || round.arrived[rank] {
                    return Err(JobError::Duplicate(format!(
                        "rank {} pushed round {} already",
                        h.rank, h.round
                    )));
                }
                if rank == 0 {
                    if cells.len() != vocab {
                        return Err(invalid(format!(
                            "rank 0 sent {} of {} cells",
                            cells.len(),
                            h.vocab
                        )));
                    }
                    round.cells = Some(cells);
                    round.move_cost = move_cost;
                }
                round.arrived[rank] = true;
                round.parts[rank] = t;
                Ok(round.arrived.iter().all(|&a| a))
            },
            |r| {
                Some(DenseInput {
                    sum: r.sum.take(),
                    parts: std::mem::take(&mut r.parts),
                    cells: r.cells.take(),
                    move_cost: r.move_cost,
                })
            },
        )
    }

    /// The chunks of one push, each checked and added as it arrives.
    async fn receive_push<S>(&self, s: &mut S, push: &mut Option<TableAssembly>) -> JobResult<()>
    where
        S: Stream<Item = JobResult<TableChunk>> + Unpin,
    {
        while let Some(ch) = s.next().await {
            let ch = ch?;
            self.stats_mut().realloc_bytes_in += ch.data.len() as u64;
            match push {
                Some(p) => p.add(self, &ch)?,
                None => {
                    let mut p = TableAssembly::start(self, &ch.head)?;
                    let added = p.add(self, &ch);
                    *push = Some(p);
                    added?;
                }
            }
        }
        Ok(())
    }
}
