//! Reallocation rounds: every rank pushes its partial loss tables; once all are in they
//! are summed in rank order (the sum does not depend on arrival order) and the central
//! step ([`lightrnn_alloc::reallocate`]) solves them off the async threads; the ranks
//! fetch the allocation.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::Status;

use lightrnn_alloc::{Reallocation, RoundOptions, SolveOptions};
use lightrnn_kernels::{LossTables, ModelDims};
use lightrnn_proto::v1::{AllocationChunk, AllocationRequest, TableChunk, TableKind};
use lightrnn_worker::dist::wire;
use lightrnn_worker::{Error, Result};

use super::Job;

/// One rank's push put back together, checked as it arrives: one push of one rank, tables
/// of this job's size and within its memory limit, every element exactly once.
struct TableAssembly {
    head: TableChunk,
    tables: LossTables,
    cells: Vec<u32>,
    /// Elements received per kind (rows, columns, counts).
    got: [usize; 3],
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

impl TableAssembly {
    /// From the push's first chunk, after the checks that come before any allocation.
    fn start(job: &Job, ch: &TableChunk) -> Result<Self, Status> {
        {
            let st = job.lock();
            job.check(&st, ch.generation, ch.rank)?;
            if st.rounds.get(&ch.round).is_some_and(|r| {
                r.solving || r.parts.get(ch.rank as usize).is_some_and(|p| p.is_some())
            }) {
                return Err(Status::already_exists(format!(
                    "rank {} pushed round {} already",
                    ch.rank, ch.round
                )));
            }
        }
        if ch.vocab != job.spec.vocab as u64 {
            return Err(invalid(format!(
                "tables of {} words for a vocabulary of {}",
                ch.vocab, job.spec.vocab
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
            return Err(Status::resource_exhausted(format!(
                "loss tables of {:.1} GiB exceed realloc_max_table_gib",
                bytes / (1u64 << 30) as f64
            )));
        }
        Ok(Self {
            head: TableChunk {
                data: Vec::new(),
                ..ch.clone()
            },
            tables: LossTables {
                vocab: v,
                rows: rr,
                cols: cc,
                lr: vec![0.0; v * rr],
                lc: vec![0.0; v * cc],
                counts: vec![0; v],
            },
            cells: Vec::new(),
            got: [0; 3],
        })
    }

    fn add(&mut self, ch: &TableChunk) -> Result<(), Status> {
        let h = &self.head;
        if (ch.generation, ch.rank, ch.round) != (h.generation, h.rank, h.round) {
            return Err(invalid("chunks of several pushes in one"));
        }
        let t = &mut self.tables;
        let n = match TableKind::try_from(ch.kind) {
            Ok(TableKind::Rows) => wire::decode_into(&mut t.lr, ch.offset, &ch.data),
            Ok(TableKind::Cols) => wire::decode_into(&mut t.lc, ch.offset, &ch.data),
            Ok(TableKind::Counts) => wire::decode_into(&mut t.counts, ch.offset, &ch.data),
            Ok(TableKind::Cells) => {
                // The cells come in order, once.
                if ch.offset != self.cells.len() as u64 {
                    return Err(invalid(format!(
                        "cells chunk at {} out of order",
                        ch.offset
                    )));
                }
                let mut part = vec![0u32; ch.data.len() / 4];
                let n = wire::decode_into(&mut part, 0, &ch.data).map_err(invalid)?;
                if self.cells.len() + n > t.vocab {
                    return Err(invalid("more cells than words"));
                }
                self.cells.extend(part);
                return Ok(());
            }
            _ => return Err(invalid("table chunk of no kind")),
        }
        .map_err(invalid)?;
        self.got[(ch.kind - 1) as usize] += n;
        Ok(())
    }

    /// The push's tables and cells; chunks may overlap or miss parts, so the element
    /// counts must match exactly.
    fn finish(self) -> Result<(TableChunk, LossTables, Vec<u32>), Status> {
        let t = &self.tables;
        if self.got != [t.lr.len(), t.lc.len(), t.counts.len()] {
            return Err(invalid(format!(
                "an incomplete push: {} of {} row, {} of {} column, {} of {} count elements",
                self.got[0],
                t.lr.len(),
                self.got[1],
                t.lc.len(),
                self.got[2],
                t.counts.len()
            )));
        }
        Ok((self.head, self.tables, self.cells))
    }
}

impl Job {
    /// A rank's partial tables for a round (and, from rank 0, the current allocation and
    /// the move cost); the last rank's push starts the solve.
    pub async fn push_loss_tables<S>(self: &Arc<Self>, mut s: S) -> Result<(), Status>
    where
        S: Stream<Item = Result<TableChunk, Status>> + Unpin,
    {
        self.count_rpc();
        let mut push: Option<TableAssembly> = None;
        while let Some(ch) = s.next().await {
            let ch = ch?;
            match &mut push {
                Some(p) => p.add(&ch)?,
                None => {
                    let mut p = TableAssembly::start(self, &ch)?;
                    p.add(&ch)?;
                    push = Some(p);
                }
            }
        }
        let (h, t, cells) = push.ok_or_else(|| invalid("an empty push"))?.finish()?;
        let all_in = {
            let mut st = self.lock();
            self.check(&st, h.generation, h.rank)?;
            let w = st.world;
            let round = st.rounds.entry(h.round).or_default();
            if round.parts.is_empty() {
                round.parts = (0..w).map(|_| None).collect();
            }
            if round.solving || round.parts[h.rank as usize].is_some() {
                return Err(Status::already_exists(format!(
                    "rank {} pushed round {} already",
                    h.rank, h.round
                )));
            }
            if h.rank == 0 {
                if cells.len() != t.vocab {
                    return Err(invalid(format!(
                        "rank 0 sent {} of {} cells",
                        cells.len(),
                        t.vocab
                    )));
                }
                round.cells = Some(cells);
                round.move_cost = h.move_cost;
            }
            round.parts[h.rank as usize] = Some(t);
            let all = round.parts.iter().all(|p| p.is_some());
            if all {
                round.solving = true;
            }
            all
        };
        if all_in {
            self.start_solve(h.round);
        }
        Ok(())
    }

    /// The allocation of `round`, once solved, in chunks.
    pub async fn fetch_allocation(
        &self,
        r: AllocationRequest,
    ) -> Result<Vec<AllocationChunk>, Status> {
        self.count_rpc();
        {
            let st = self.lock();
            self.check(&st, r.generation, r.rank)?;
        }
        let round = r.round;
        let solved = self
            .wait_for(r.generation, |st| {
                st.rounds.get(&round).and_then(|x| x.result.clone()).map(Ok)
            })
            .await?;
        Ok(wire::allocation_chunks(
            &solved.cells,
            &solved.counts,
            &solved.report,
        ))
    }

    /// Sum the ranks' tables in rank order and solve, off the async threads.
    fn start_solve(self: &Arc<Self>, round: u64) {
        let job = self.clone();
        tokio::spawn(async move {
            let (generation, parts, cells, move_cost) = {
                let mut st = job.lock();
                let generation = st.generation;
                let Some(r) = st.rounds.get_mut(&round) else {
                    return;
                };
                (
                    generation,
                    std::mem::take(&mut r.parts),
                    r.cells.take(),
                    r.move_cost,
                )
            };
            let opts = RoundOptions {
                solver: job.spec.cfg.realloc_solver,
                solve: SolveOptions {
                    threads: job.spec.cfg.threads,
                    ..Default::default()
                },
                move_cost,
            };
            let solved = tokio::task::spawn_blocking(move || -> Result<Reallocation> {
                let mut it = parts.into_iter().flatten();
                let mut sum = it
                    .next()
                    .ok_or_else(|| Error::Control("no loss tables arrived".into()))?;
                for p in it {
                    sum.add(&p)?;
                }
                let cells =
                    cells.ok_or_else(|| Error::Control("rank 0 sent no allocation".into()))?;
                Ok(lightrnn_alloc::reallocate(&sum, &cells, &opts)?)
            })
            .await;
            match solved {
                Ok(Ok(s)) => job.solved(generation, round, s),
                Ok(Err(e)) => job.fault(format!("reallocation round {round}: {e}")),
                Err(e) => job.fault(format!("reallocation round {round}: solver task: {e}")),
            }
        });
    }

    /// A round's allocation is ready for the ranks (dropped if its generation ended).
    fn solved(&self, generation: u64, round: u64, s: Reallocation) {
        tracing::info!(
            round,
            solver = %s.report.solver,
            objective_before = s.report.objective_before,
            objective_after = s.report.objective_after,
            words_moved = s.report.words_moved,
            seconds = s.report.seconds_solve,
            "allocation solved"
        );
        self.stats_mut().reallocations += 1;
        let mut st = self.lock();
        if st.generation == generation
            && let Some(r) = st.rounds.get_mut(&round)
        {
            r.result = Some(Arc::new(s));
        }
        drop(st);
        self.bump();
    }
}
