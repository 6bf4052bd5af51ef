//! Reallocation rounds on sparse tables. Each rank pushes its parts (its share of one
//! range of words at a time, summed over the ranks and cut: [`lightrnn_alloc::SparsePart`])
//! and last a push that says it is done (rank 0's with the current allocation). The
//! parts are put together in word order as they arrive, whatever the ranks' order, and
//! once every rank is done the round is solved ([`lightrnn_alloc::reallocate_sparse`])
//! off the async threads; the ranks fetch the allocation as for dense tables (the round's
//! one pipeline, [`super::pipeline`]). The coordinator holds O(V k): the parts, never a
//! dense table. A push is accepted whole or not at all (its part joins the round once
//! every element has arrived), so a push that breaks off leaves the round as it was; a
//! rank that fails goes through the job's one fault path, and the next generation runs
//! the round again from the checkpoint taken before it.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{Stream, StreamExt};

use lightrnn_alloc::{Figures, Reallocation, RoundOptions, SparsePart, SparseRound, SparseTables};
use lightrnn_core::protocol::{SparseArray, SparseChunk, SparseHead};
use lightrnn_core::wire;
use lightrnn_core::{Error, Result};
use lightrnn_kernels::ModelDims;

use super::error::invalid;
use super::pipeline::RoundInput;
use super::state::SparseAcc;
use super::{Job, JobError, JobResult};

impl RoundInput for SparseAcc {
    fn move_cost(&self) -> f64 {
        self.round.as_ref().map_or(0.0, |r| r.move_cost)
    }

    /// Every word's part must be in, and rank 0's allocation.
    fn solve(self, opts: &RoundOptions) -> Result<Reallocation> {
        let r = self
            .round
            .ok_or_else(|| Error::Control("the ranks sent no sparse tables".into()))?;
        let (filled, v) = (r.filled(), r.tables.vocab);
        if filled != v || !self.ahead.is_empty() {
            return Err(Error::Control(format!(
                "the ranks' parts cover words 0..{filled} of {v} and {} more parts",
                self.ahead.len()
            )));
        }
        let cells = self
            .cells
            .ok_or_else(|| Error::Control("rank 0 sent no allocation".into()))?;
        Ok(lightrnn_alloc::reallocate_sparse(&r, &cells, opts)?)
    }
}

impl SparseAcc {
    /// Take a complete part: in word order, each word once.
    fn add(&mut self, p: SparsePart) -> JobResult<()> {
        let round = self.round.get_or_insert_with(|| SparseRound::of(&p));
        let next = round.filled();
        let overlaps = p.start < next
            || self
                .ahead
                .range(..p.start + p.tables.vocab)
                .next_back()
                .is_some_and(|(&s, q)| s + q.tables.vocab > p.start);
        if overlaps {
            return Err(invalid(format!(
                "a part of words {}..{} overlaps words pushed already",
                p.start,
                p.start + p.tables.vocab
            )));
        }
        if p.start != next {
            self.ahead.insert(p.start, p);
            return Ok(());
        }
        round.push(&p).map_err(invalid)?;
        while let Some(q) = self.ahead.remove(&round.filled()) {
            round.push(&q).map_err(invalid)?;
        }
        Ok(())
    }
}

/// One push put back together: its head (checked against the job), its part's arrays
/// and rank 0's cells, each element exactly once.
struct SparseAssembly {
    head: SparseHead,
    part: Option<SparseTables>,
    counts: Vec<u64>,
    cells: Vec<u32>,
    /// Elements received per kind (index: the kind's number - 1).
    got: [usize; 8],
    bytes: u64,
}

/// Elements of each kind a push must carry.
fn lens(h: &SparseHead) -> [usize; 8] {
    let (n, kr, kc) = (h.words as usize, h.k_rows as usize, h.k_cols as usize);
    let cells = if h.last && h.rank == 0 {
        h.vocab as usize
    } else {
        0
    };
    [n * kr, n * kr, n * kc, n * kc, n, n, n, cells]
}

impl SparseAssembly {
    fn start(job: &Job, ch: &SparseHead) -> JobResult<Self> {
        {
            let st = job.lock();
            job.check(&st, ch.generation, ch.rank)?;
        }
        let c = &job.spec.cfg;
        let v = job.vocab();
        let d = ModelDims::square(v, c.emb, c.hidden, c.layers).map_err(invalid)?;
        if ch.vocab != v as u64 {
            return Err(invalid(format!(
                "sparse tables of {} words for this job's {v}",
                ch.vocab
            )));
        }
        // A last push without a part has no tables to check.
        if ch.words > 0 && (ch.rows, ch.cols) != (d.rows as u64, d.cols as u64) {
            return Err(invalid(format!(
                "sparse tables of {} x ({} + {}) for this job's {v} words in {} x {}",
                ch.vocab, ch.rows, ch.cols, d.rows, d.cols
            )));
        }
        if ch.words > 0
            && (!(1..=ch.rows).contains(&ch.k_rows) || !(1..=ch.cols).contains(&ch.k_cols))
        {
            return Err(invalid(format!(
                "{} candidate rows and {} candidate columns in a {} x {} table",
                ch.k_rows, ch.k_cols, ch.rows, ch.cols
            )));
        }
        if ch.start.checked_add(ch.words).is_none_or(|e| e > ch.vocab) {
            return Err(invalid(format!(
                "a part of words {}+{} of {}",
                ch.start, ch.words, ch.vocab
            )));
        }
        if !(ch.move_cost >= 0.0 && ch.move_cost.is_finite()) {
            return Err(invalid(format!("move cost {}", ch.move_cost)));
        }
        let (n, rr, cc) = (ch.words as usize, ch.rows as usize, ch.cols as usize);
        let (kr, kc) = (ch.k_rows as usize, ch.k_cols as usize);
        let part = (n > 0).then(|| SparseTables {
            vocab: n,
            rows: rr,
            cols: cc,
            k_rows: kr,
            k_cols: kc,
            row_idx: vec![0; n * kr],
            row_loss: vec![0.0; n * kr],
            col_idx: vec![0; n * kc],
            col_loss: vec![0.0; n * kc],
            row_sum: vec![0.0; n],
            col_sum: vec![0.0; n],
        });
        Ok(Self {
            head: ch.clone(),
            part,
            counts: vec![0; n],
            cells: vec![0; lens(ch)[7]],
            got: [0; 8],
            bytes: 0,
        })
    }

    fn add(&mut self, ch: &SparseChunk) -> JobResult<()> {
        if ch.head != self.head {
            return Err(invalid("chunks of several pushes in one"));
        }
        let kind = ch.kind.ok_or_else(|| invalid("sparse chunk of no kind"))?;
        let k = kind.index();
        // Each kind's chunks in order: with the lengths, every element exactly once.
        if ch.offset != self.got[k] as u64 {
            return Err(invalid(format!(
                "{kind:?} chunk at {} out of order (expected {})",
                ch.offset, self.got[k]
            )));
        }
        let (o, b) = (ch.offset, &ch.data[..]);
        let missing = || invalid(format!("{kind:?} in a push without a part"));
        let n = match kind {
            SparseArray::Counts => wire::decode_into(&mut self.counts, o, b),
            SparseArray::Cells => wire::decode_into(&mut self.cells, o, b),
            _ => {
                let t = self.part.as_mut().ok_or_else(missing)?;
                match kind {
                    SparseArray::RowIdx => wire::decode_into(&mut t.row_idx, o, b),
                    SparseArray::RowLoss => wire::decode_into(&mut t.row_loss, o, b),
                    SparseArray::ColIdx => wire::decode_into(&mut t.col_idx, o, b),
                    SparseArray::ColLoss => wire::decode_into(&mut t.col_loss, o, b),
                    SparseArray::RowSum => wire::decode_into(&mut t.row_sum, o, b),
                    _ => wire::decode_into(&mut t.col_sum, o, b),
                }
            }
        }
        .map_err(invalid)?;
        self.got[k] += n;
        self.bytes += b.len() as u64;
        Ok(())
    }

    /// The head, the part (None: a last push without one) and the cells; every element
    /// must have arrived.
    fn finish(self) -> JobResult<(SparseHead, Option<SparsePart>, Vec<u32>, u64)> {
        let want = lens(&self.head);
        if self.got != want {
            return Err(invalid(format!(
                "an incomplete push: {:?} of {want:?} elements (row indices, row losses, \
                 column indices, column losses, row sums, column sums, counts, cells)",
                self.got
            )));
        }
        let h = self.head;
        let part = self.part.map(|tables| SparsePart {
            vocab: h.vocab as usize,
            start: h.start as usize,
            move_cost: h.move_cost,
            tables,
            counts: self.counts,
            figures: Figures {
                before: h.before,
                before_discounted: h.before_discounted,
                lower_bound: h.lower_bound,
            },
        });
        Ok((h, part, self.cells, self.bytes))
    }
}

impl Job {
    /// One push of a rank's sparse tables for a round; the last rank's last push starts
    /// the solve.
    pub async fn push_sparse_tables<S>(self: &Arc<Self>, mut s: S) -> JobResult<()>
    where
        S: Stream<Item = JobResult<SparseChunk>> + Unpin,
    {
        self.count_rpc();
        let mut push: Option<SparseAssembly> = None;
        while let Some(ch) = s.next().await {
            let ch = ch?;
            match &mut push {
                Some(p) => p.add(&ch)?,
                None => {
                    let mut p = SparseAssembly::start(self, &ch.head)?;
                    p.add(&ch)?;
                    push = Some(p);
                }
            }
        }
        let (h, part, cells, bytes) = push.ok_or_else(|| invalid("an empty push"))?.finish()?;
        self.stats_mut().realloc_bytes_in += bytes;
        let (v, rr, cc) = (h.vocab as usize, h.rows as usize, h.cols as usize);
        let k = h.k_rows.max(h.k_cols) as usize;
        let first = part.is_some() && {
            let st = self.lock();
            st.rounds
                .get(&h.round)
                .and_then(|r| r.sparse.as_ref())
                .is_none_or(|a| a.round.is_none())
        };
        if first {
            // The round's memory here, checked at its first push: its parts and the solve.
            let need = lightrnn_alloc::sparse_round_memory_bound(v, rr, cc, k);
            self.check_round_memory(
                &format!(
                    "coordinator: reallocation round {} (sparse tables)",
                    h.round
                ),
                need,
            )?;
        }
        let rank = h.rank as usize;
        self.arrive(
            (h.generation, h.rank, h.round),
            |round, w| {
                if round.solving || !round.parts.is_empty() {
                    return Err(JobError::Duplicate(format!(
                        "round {} is solving or has dense tables",
                        h.round
                    )));
                }
                let acc = round.sparse.get_or_insert_with(|| SparseAcc {
                    round: None,
                    ahead: BTreeMap::new(),
                    done: vec![false; w],
                    cells: None,
                });
                if acc.done[rank] {
                    return Err(JobError::Duplicate(format!(
                        "rank {} pushed its last part of round {} already",
                        h.rank, h.round
                    )));
                }
                if let Some(p) = part {
                    acc.add(p)?;
                }
                if h.last {
                    acc.done[rank] = true;
                    if rank == 0 {
                        acc.cells = Some(cells);
                    }
                }
                Ok(acc.done.iter().all(|&d| d))
            },
            |r| r.sparse.take(),
        )
    }
}
