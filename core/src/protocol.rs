//! The control protocol in domain terms: what a worker asks of the coordinator (join,
//! heartbeat, lease, the epoch barrier, pushes of loss tables, the allocation, commit,
//! finish, fail) and what it is told, typed (the run's config, durations, ranges). The
//! wire's messages convert to and from these in [`crate::wire`] only; the coordinator's
//! job speaks these.
//!
//! The pushes of loss tables arrive in chunks whose arrays stay encoded (little-endian,
//! decoded by [`crate::wire`]'s chunk codec where they are added up), so that a push of
//! any size is never copied twice.

use std::ops::Range;
use std::time::Duration;

use crate::Result;
use crate::checkpoint::Meta;
use crate::config::TrainConfig;
use crate::report::{RankReport, Summary};

/// A worker asks to join the forming generation.
#[derive(Clone, Debug)]
pub struct Join {
    /// The rank it asks for (its RANK), or any.
    pub rank: Option<usize>,
    /// Its collective address (host and port: unique among live workers).
    pub collective_addr: String,
    pub host: String,
    pub pid: u32,
    /// Its program's version (must be the coordinator's).
    pub version: String,
}

/// Everything a worker needs to train in its generation (its Debug leaves the secrets
/// out).
#[derive(Clone)]
pub struct Joined {
    pub generation: u64,
    pub rank: usize,
    pub world_size: usize,
    /// Every rank's collective address, in rank order.
    pub peers: Vec<String>,
    /// The run's configuration.
    pub config: TrainConfig,
    /// The prepared dataset and the run's directory (URLs).
    pub data: String,
    pub out: String,
    /// The checkpoint to resume from (none: the start).
    pub checkpoint: Option<String>,
    /// A re-formed group continues the run in place.
    pub restart: bool,
    pub backend: String,
    pub heartbeat: Duration,
    pub collective_timeout: Duration,
    pub run_id: String,
    /// The generation's NCCL unique id (empty: none).
    pub nccl_id: Vec<u8>,
    /// The generation's ring secret (32 random bytes).
    pub ring_key: Vec<u8>,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("generation", &self.generation)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("peers", &self.peers)
            .field("data", &self.data)
            .field("out", &self.out)
            .field("checkpoint", &self.checkpoint)
            .field("restart", &self.restart)
            .field("backend", &self.backend)
            .field("run_id", &self.run_id)
            .field("nccl_id", &format_args!("({} bytes)", self.nccl_id.len()))
            .field("ring_key", &format_args!("({} bytes)", self.ring_key.len()))
            .finish_non_exhaustive()
    }
}

/// A rank is alive at `step`, with its latest figures.
#[derive(Clone, Debug, Default)]
pub struct Heartbeat {
    pub generation: u64,
    pub rank: u32,
    pub step: u64,
    pub epoch: u64,
    pub cursor: u64,
    pub report: Option<RankReport>,
}

/// The answer to a heartbeat: why the job ended, if it did; whether to stop.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeartbeatAnswer {
    pub abort: Option<String>,
    pub stop: bool,
}

/// A rank asks for its streams of an epoch of `streams` streams from `cursor`.
#[derive(Clone, Debug, Default)]
pub struct Lease {
    pub generation: u64,
    pub rank: u32,
    pub epoch: u64,
    pub streams: u64,
    pub cursor: u64,
}

/// A rank's streams of an epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct Leased {
    pub epoch: u64,
    pub streams: Range<usize>,
}

/// A rank finished its lease of an epoch having consumed `tokens`.
#[derive(Clone, Debug, Default)]
pub struct EpochDone {
    pub generation: u64,
    pub rank: u32,
    pub epoch: u64,
    pub tokens: u64,
}

/// What every chunk of one push of dense loss tables repeats.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TableHead {
    pub generation: u64,
    pub rank: u32,
    pub round: u64,
    pub vocab: u64,
    pub rows: u64,
    pub cols: u64,
    pub move_cost: f64,
}

/// The arrays of a push of dense loss tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableArray {
    Rows,
    Cols,
    Counts,
    Cells,
}

/// A piece of one array of a push of dense loss tables (`kind` none: a kind the wire
/// does not know).
#[derive(Clone, Debug)]
pub struct TableChunk {
    pub head: TableHead,
    pub kind: Option<TableArray>,
    /// The first element's index in its array.
    pub offset: u64,
    /// The elements, encoded.
    pub data: Vec<u8>,
}

/// What every chunk of one push of sparse tables repeats: the push's round, shape, and
/// part (its words and figures; none in a last push without a part).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseHead {
    pub generation: u64,
    pub rank: u32,
    pub round: u64,
    pub vocab: u64,
    pub rows: u64,
    pub cols: u64,
    pub k_rows: u64,
    pub k_cols: u64,
    pub move_cost: f64,
    pub start: u64,
    pub words: u64,
    pub before: f64,
    pub before_discounted: f64,
    pub lower_bound: f64,
    /// The rank's last push of the round.
    pub last: bool,
}

/// The arrays of a push of sparse tables, in the order of [`SparseArray::index`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparseArray {
    RowIdx,
    RowLoss,
    ColIdx,
    ColLoss,
    RowSum,
    ColSum,
    Counts,
    Cells,
}

impl SparseArray {
    /// The array's place among a push's eight.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A piece of one array of a push of sparse tables (`kind` none: a kind the wire does
/// not know).
#[derive(Clone, Debug)]
pub struct SparseChunk {
    pub head: SparseHead,
    pub kind: Option<SparseArray>,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// A rank asks for the allocation of a round.
#[derive(Clone, Debug, Default)]
pub struct FetchAllocation {
    pub generation: u64,
    pub rank: u32,
    pub round: u64,
}

/// A rank reached the checkpoint of `step` in `dir`.
#[derive(Debug)]
pub struct Commit {
    pub generation: u64,
    pub rank: u32,
    pub step: u64,
    pub dir: String,
    /// Rank 0's manifest, or why it did not convert (the others' are not read).
    pub manifest: Option<Result<Meta>>,
    pub params_sha256: String,
}

/// A rank is done.
#[derive(Debug)]
pub struct Finish {
    pub generation: u64,
    pub rank: u32,
    /// Rank 0's summary, or why it did not convert (the others' are not read).
    pub summary: Option<Result<Summary>>,
    pub params_sha256: String,
}

/// A rank cannot go on.
#[derive(Clone, Debug, Default)]
pub struct Fail {
    pub generation: u64,
    pub rank: u32,
    pub error: String,
    /// Whether retrying in a new generation may help.
    pub retryable: bool,
}

/// A worker's part in preparing the dataset ([`crate::data::cluster`]): what it reports
/// on its task, asking for the next.
#[derive(Clone, Debug)]
pub struct PrepareAsk {
    /// Who asks (host:pid).
    pub worker: String,
    pub version: String,
    /// The task reported on, and how it went (none: the worker asks for one).
    pub report: Option<(u64, TaskReport)>,
}

/// How a preparation task went.
#[derive(Clone, Debug)]
pub enum TaskReport {
    /// Still at it.
    Working,
    Done(crate::data::cluster::Done),
    Failed {
        error: String,
        retryable: bool,
    },
}

/// What a worker preparing the dataset is told.
#[derive(Clone, Debug)]
pub enum PrepareAnswer {
    /// Do this task, saying every `heartbeat` that it is still at it.
    Task {
        id: u64,
        task: Box<crate::data::cluster::Task>,
        heartbeat: Duration,
    },
    /// Nothing to do now: ask again after this long.
    Wait(Duration),
    /// The dataset is prepared: join the job.
    Ready,
    /// Stop the task reported on: another worker has it, or it is no longer wanted.
    Abandon,
}
