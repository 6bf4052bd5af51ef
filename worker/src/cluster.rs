//! A rank's place in a job: its [`Collective`] (gradients, loss sums, the LSTM state of
//! checkpoints) and its [`Control`] channel to whoever owns the job (data leases, epoch
//! barriers, the central reallocation, checkpoint commits, the end of the run).
//!
//! A single-process run is a job of one rank with [`Dist::local`]: the identity collective
//! and a control that does everything in-process. A worker of a distributed job gets a
//! TCP ring and a gRPC control to the coordinator (`crate::remote`); the training loop is
//! the same code in both cases.

use std::ops::Range;
use std::sync::Arc;

use lightrnn_kernels::{LossTables, State};
use tokio::runtime::Handle;

use crate::checkpoint::{self, Meta};
use crate::collective::{Collective, Single, share};
use crate::store::Location;
use crate::train::Summary;
use crate::{Error, Result};
use lightrnn_alloc::{Reallocation, RoundOptions, SolveOptions, Solver};

/// Where a rank is and how fast it goes: what the job's metrics (`/metrics`) show.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Report {
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    /// Training loss (nats per word) of the last logging window, over all ranks.
    pub loss: f64,
    /// Words per second of this rank over the last logging window.
    pub words_per_sec: f64,
    /// Words per second of the whole job over the last logging window.
    pub global_words_per_sec: f64,
    /// Validation perplexity after the last epoch (0: none yet).
    pub valid_ppl: f64,
    pub lr: f64,
    /// The last checkpoint this rank saw committed: its step, the seconds it took
    /// (state gathering, writing, commit) and its bytes (rank 0 knows them).
    pub checkpoint_step: u64,
    pub checkpoint_seconds: f64,
    pub checkpoint_bytes: u64,
    /// Checkpoints committed in this session.
    pub checkpoints: u64,
}

impl From<&Report> for lightrnn_proto::v1::Report {
    fn from(r: &Report) -> Self {
        Self {
            step: r.step,
            epoch: r.epoch,
            loss: r.loss,
            words_per_sec: r.words_per_sec,
            global_words_per_sec: r.global_words_per_sec,
            valid_ppl: r.valid_ppl,
            lr: r.lr,
            checkpoint_step: r.checkpoint_step,
            checkpoint_seconds: r.checkpoint_seconds,
            checkpoint_bytes: r.checkpoint_bytes,
            checkpoints: r.checkpoints,
        }
    }
}

impl From<lightrnn_proto::v1::Report> for Report {
    fn from(p: lightrnn_proto::v1::Report) -> Self {
        Self {
            step: p.step,
            epoch: p.epoch,
            loss: p.loss,
            words_per_sec: p.words_per_sec,
            global_words_per_sec: p.global_words_per_sec,
            valid_ppl: p.valid_ppl,
            lr: p.lr,
            checkpoint_step: p.checkpoint_step,
            checkpoint_seconds: p.checkpoint_seconds,
            checkpoint_bytes: p.checkpoint_bytes,
            checkpoints: p.checkpoints,
        }
    }
}

/// Where a single-process run publishes its [`Report`] (for a metrics endpoint).
pub type ReportSink = Arc<std::sync::Mutex<Option<Report>>>;

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
    fn report(&mut self, _report: &Report) {}
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
    /// on `threads` threads (0 = all cores). Its [`Report`]s go to `sink` when given.
    pub fn local(solver: Solver, threads: usize, handle: Handle, sink: Option<ReportSink>) -> Self {
        Self {
            collective: Box::new(Single),
            control: Box::new(LocalControl {
                solver,
                threads,
                handle,
                sink,
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
}

impl Control for LocalControl {
    fn report(&mut self, report: &Report) {
        if let Some(s) = &self.sink
            && let Ok(mut g) = s.lock()
        {
            *g = Some(report.clone());
        }
    }
    fn lease(&mut self, _epoch: u64, streams: usize, _cursor: u64) -> Result<Range<usize>> {
        Ok(0..streams)
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
        let opts = RoundOptions {
            solver: self.solver,
            solve: SolveOptions {
                threads: self.threads,
                ..Default::default()
            },
            move_cost,
        };
        Ok(lightrnn_alloc::reallocate(&tables, current, &opts)?)
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

/// SHA-256 (hex) of parameters in PyTorch layout: equal on all ranks of a healthy job.
pub fn params_checksum(params: &[f32]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for x in params {
        h.update(x.to_le_bytes());
    }
    crate::vocab::hex(&h.finalize())
}

/// The whole batch's carried state [layers, B, hidden] from every rank's share of it
/// (each rank holds streams `share(B, world, rank)`); the same on all ranks.
pub fn gather_state(
    coll: &mut dyn Collective,
    local: Option<&State<f32>>,
    global_batch: usize,
    layers: usize,
    hidden: usize,
) -> Result<Option<State<f32>>> {
    let mine = share(global_batch, coll.world(), coll.rank());
    // Ranks without a state yet (before their first step) contribute zeros, the state a
    // fresh stream starts from.
    let mut flags = [f32::from(local.is_some())];
    coll.all_reduce_sum(&mut flags)?;
    if flags[0] == 0.0 {
        return Ok(None);
    }
    let n = layers * global_batch * hidden;
    let (mut h, mut c) = (vec![0f32; n], vec![0f32; n]);
    if let Some(st) = local {
        if st.batch != mine.len() || st.h.len() != layers * st.batch * hidden {
            return Err(Error::Data(format!(
                "rank {} holds a state of {} streams, its share is {}",
                coll.rank(),
                st.batch,
                mine.len()
            )));
        }
        for l in 0..layers {
            let dst = (l * global_batch + mine.start) * hidden;
            let src = l * st.batch * hidden;
            let len = st.batch * hidden;
            h[dst..dst + len].copy_from_slice(&st.h[src..src + len]);
            c[dst..dst + len].copy_from_slice(&st.c[src..src + len]);
        }
    }
    // Every element is non-zero on at most one rank: the sum is an exact gather.
    coll.all_reduce_sum(&mut h)?;
    coll.all_reduce_sum(&mut c)?;
    Ok(Some(State {
        batch: global_batch,
        h,
        c,
    }))
}

/// Consecutive groups of streams' states [layers, b_i, hidden] as one state of all their
/// streams, in order.
pub fn concat_states(parts: &[State<f32>], layers: usize, hidden: usize) -> State<f32> {
    let b: usize = parts.iter().map(|p| p.batch).sum();
    let (mut h, mut c) = (Vec::with_capacity(layers * b * hidden), Vec::new());
    c.reserve(layers * b * hidden);
    for l in 0..layers {
        for p in parts {
            let s = l * p.batch * hidden;
            h.extend_from_slice(&p.h[s..s + p.batch * hidden]);
            c.extend_from_slice(&p.c[s..s + p.batch * hidden]);
        }
    }
    State { batch: b, h, c }
}

/// Streams `range` of a whole batch's state [layers, B, hidden].
pub fn slice_state(
    st: &State<f32>,
    range: Range<usize>,
    layers: usize,
    hidden: usize,
) -> Result<State<f32>> {
    if range.end > st.batch || st.h.len() != layers * st.batch * hidden {
        return Err(Error::Data(format!(
            "a state of {} streams has no streams {range:?}",
            st.batch
        )));
    }
    let b = range.len();
    let (mut h, mut c) = (Vec::with_capacity(layers * b * hidden), Vec::new());
    c.reserve(layers * b * hidden);
    for l in 0..layers {
        let s = (l * st.batch + range.start) * hidden;
        h.extend_from_slice(&st.h[s..s + b * hidden]);
        c.extend_from_slice(&st.c[s..s + b * hidden]);
    }
    Ok(State { batch: b, h, c })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sliced_state_gathers_back_to_the_whole() {
        let (layers, b, hid) = (2, 5, 3);
        let whole = State {
            batch: b,
            h: (0..layers * b * hid).map(|x| x as f32).collect(),
            c: (0..layers * b * hid).map(|x| -(x as f32)).collect(),
        };
        let part = slice_state(&whole, 1..3, layers, hid).unwrap();
        assert_eq!(part.batch, 2);
        assert_eq!(part.h[..3], [3.0, 4.0, 5.0]);
        assert_eq!(part.h[6..9], [18.0, 19.0, 20.0]);
        let mut single = Single;
        let back = gather_state(&mut single, Some(&whole), b, layers, hid)
            .unwrap()
            .unwrap();
        assert_eq!(back.h, whole.h);
        assert_eq!(back.c, whole.c);
        assert!(slice_state(&whole, 4..6, layers, hid).is_err());
        let parts: Vec<State<f32>> = [0..2, 2..3, 3..5]
            .into_iter()
            .map(|r| slice_state(&whole, r, layers, hid).unwrap())
            .collect();
        let joined = concat_states(&parts, layers, hid);
        assert_eq!(
            (joined.batch, &joined.h, &joined.c),
            (b, &whole.h, &whole.c)
        );
        assert!(
            gather_state(&mut single, None, b, layers, hid)
                .unwrap()
                .is_none()
        );
    }
}
