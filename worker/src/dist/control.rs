//! A rank's place in a job: its [`Collective`] (gradients, loss sums, the LSTM state of
//! checkpoints) and its [`Control`] channel to whoever owns the job (data leases, epoch
//! barriers, the central reallocation, checkpoint commits, the end of the run).
//!
//! A single-process run is a job of one rank with [`Dist::local`]: the identity collective
//! and a control that does everything in-process. A worker of a distributed job gets a
//! TCP ring and a gRPC control to the coordinator ([`super::remote`]); the training loop
//! is the same code in both cases.

use std::ops::Range;

use tokio::runtime::Handle;

use lightrnn_alloc::{Reallocation, RoundOptions, SolveOptions, Solver, SparsePart, SparseRound};
use lightrnn_kernels::LossTables;

use super::collective::{Collective, Single};
use lightrnn_core::checkpoint::{self, Meta};
use lightrnn_core::data::store::Location;
use lightrnn_core::report::{RankReport, ReportSink, Summary};
use lightrnn_core::{Error, Result};

/// What a rank asks of the job's owner. Calls are blocking (the training thread).
pub trait Control: Send {
    /// The streams of the `streams`-stream global batch this rank trains on in `epoch`,
    /// starting at stream position `cursor`.
    fn lease(&mut self, epoch: u64, streams: usize, cursor: u64) -> Result<Range<usize>>;
    /// Wait until every rank has finished `epoch`'s data; `tokens` is what this rank
    /// consumed of its lease (the job's data accounting).
    fn epoch_done(&mut self, epoch: u64, tokens: u64) -> Result<()>;
    /// Hand over this rank's partial loss tables; returns the allocation solved from the
    /// sum of every rank's tables (the same on all ranks).
    fn allocate(
        &mut self,
        round: u64,
        tables: LossTables,
        current: &[u32],
        move_cost: f64,
    ) -> Result<Reallocation>;
    /// Hand over one part of a round's sparse tables: this rank's share of one range of
    /// words, summed over the ranks (the ranks' parts cover every word once).
    fn push_sparse(&mut self, round: u64, part: SparsePart) -> Result<()>;
    /// This rank's parts of the round are all in; returns the allocation solved from
    /// every rank's parts (the same on all ranks).
    fn allocate_sparse(
        &mut self,
        round: u64,
        current: &[u32],
        move_cost: f64,
    ) -> Result<Reallocation>;
    /// Whether [`Control::allocate`] solves in this process (a single-rank run), so
    /// that a round's memory includes the solve's.
    fn solves_locally(&self) -> bool {
        false
    }
    /// Make the checkpoint in `dir` exist once every rank reached `step`; rank 0 wrote
    /// its objects and passes the manifest, the others pass `None`. `params_sha256`
    /// ([`params_checksum`]) lets the owner check that all ranks hold the same model.
    fn commit(
        &mut self,
        step: u64,
        dir: &Location,
        meta: Option<&Meta>,
        params_sha256: &str,
    ) -> Result<()>;
    /// Where the rank is (read by the heartbeat; called every step, so cheap). Fails when
    /// the job has been ended under this rank.
    fn progress(&self, _step: u64, _epoch: u64, _cursor: u64) -> Result<()> {
        Ok(())
    }
    /// The rank's figures for the job's metrics (at logging points, epoch ends and
    /// checkpoints; cheap).
    fn report(&mut self, _report: &RankReport) {}
    /// The run is over; rank 0 passes the summary; every rank its final parameters'
    /// checksum.
    fn finish(&mut self, summary: Option<&Summary>, params_sha256: &str) -> Result<()>;
    /// Seconds the training thread has spent in calls to the job's owner.
    fn rpc_seconds(&self) -> f64 {
        0.0
    }
}

/// The collective and the control of one rank.
pub struct Dist {
    pub collective: Box<dyn Collective>,
    pub control: Box<dyn Control>,
}

impl Dist {
    /// A job of one rank in this process; reallocations are solved here with `solver`
    /// on `threads` threads (0 = all cores). Its [`RankReport`]s go to `sink` when given.
    pub fn local(solver: Solver, threads: usize, handle: Handle, sink: Option<ReportSink>) -> Self {
        Self {
            collective: Box::new(Single),
            control: Box::new(LocalControl {
                solver,
                threads,
                handle,
                sink,
                sparse: None,
            }),
        }
    }
    pub fn rank(&self) -> usize {
        self.collective.rank()
    }
    pub fn world(&self) -> usize {
        self.collective.world()
    }
    /// Rank 0 writes the run's shared objects (metrics, summary, best model, checkpoints).
    pub fn is_leader(&self) -> bool {
        self.rank() == 0
    }
}

/// The control of a single-process run.
pub struct LocalControl {
    solver: Solver,
    threads: usize,
    handle: Handle,
    sink: Option<ReportSink>,
    /// The sparse round being put together: its number and parts so far.
    sparse: Option<(u64, SparseRound)>,
}

impl LocalControl {
    fn round_options(&self, move_cost: f64) -> RoundOptions {
        RoundOptions {
            solver: self.solver,
            solve: SolveOptions {
                threads: self.threads,
                ..Default::default()
            },
            move_cost,
        }
    }
}

impl Control for LocalControl {
    fn report(&mut self, report: &RankReport) {
        if let Some(s) = &self.sink
            && let Ok(mut g) = s.lock()
        {
            *g = Some(report.clone());
        }
    }
    fn lease(&mut self, _epoch: u64, streams: usize, _cursor: u64) -> Result<Range<usize>> {
        Ok(0..streams)
    }
    fn solves_locally(&self) -> bool {
        true
    }
    fn epoch_done(&mut self, _epoch: u64, _tokens: u64) -> Result<()> {
        Ok(())
    }
    fn allocate(
        &mut self,
        _round: u64,
        tables: LossTables,
        current: &[u32],
        move_cost: f64,
    ) -> Result<Reallocation> {
        let opts = self.round_options(move_cost);
        Ok(lightrnn_alloc::reallocate(&tables, current, &opts)?)
    }
    fn push_sparse(&mut self, round: u64, part: SparsePart) -> Result<()> {
        let r = match &mut self.sparse {
            Some((n, r)) if *n == round => r,
            slot => &mut slot.insert((round, SparseRound::of(&part))).1,
        };
        Ok(r.push(&part)?)
    }
    fn allocate_sparse(
        &mut self,
        round: u64,
        current: &[u32],
        move_cost: f64,
    ) -> Result<Reallocation> {
        let (n, r) = self
            .sparse
            .take()
            .ok_or_else(|| Error::Config(format!("sparse round {round}: no tables")))?;
        if n != round {
            return Err(Error::Config(format!(
                "sparse round {round}: the tables are of round {n}"
            )));
        }
        let opts = self.round_options(move_cost);
        Ok(lightrnn_alloc::reallocate_sparse(&r, current, &opts)?)
    }
    fn commit(
        &mut self,
        _step: u64,
        dir: &Location,
        meta: Option<&Meta>,
        _params_sha256: &str,
    ) -> Result<()> {
        let meta =
            meta.ok_or_else(|| Error::Config("a single-rank commit needs the manifest".into()))?;
        self.handle.block_on(checkpoint::commit(dir, meta, true))
    }
    fn finish(&mut self, _summary: Option<&Summary>, _params_sha256: &str) -> Result<()> {
        Ok(())
    }
}
