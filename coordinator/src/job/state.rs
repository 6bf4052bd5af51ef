//! The state of one generation of a job, behind the job's lock: the members and their
//! liveness, the epoch barriers' data accounting, the reallocation rounds, the
//! checkpoint commits, and how the generation ends. Times are tokio's, so the fault paths
//! run under paused time in tests.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::time::Instant;

use lightrnn_alloc::{Reallocation, SparsePart, SparseRound};
use lightrnn_core::report::RankReport;
use lightrnn_kernels::LossTables;

/// A worker of the generation.
pub(super) struct Member {
    pub(super) addr: String,
    pub(super) last_seen: Instant,
    pub(super) step: u64,
    /// When its last heartbeat arrived (None: none since it joined).
    pub(super) heard: Option<Instant>,
    /// The worker's process id (with the host: which process died).
    pub(super) pid: u32,
    /// Its latest figures (from heartbeats).
    pub(super) report: Option<RankReport>,
}

/// One epoch's barrier and data accounting.
#[derive(Default)]
pub(super) struct EpochAcc {
    /// (streams, cursor) every rank must agree on.
    pub(super) geometry: Option<(u64, u64)>,
    pub(super) leased: Vec<bool>,
    pub(super) done: Vec<bool>,
    pub(super) tokens: u64,
    pub(super) expected: u64,
    pub(super) checked: bool,
}

/// One reallocation round: each rank's partial tables until all are in, then the solve.
#[derive(Default)]
pub(super) struct Round {
    /// The sum of the tables pushed so far, where they are added as they arrive (a job
    /// of one or two ranks).
    pub(super) sum: Option<LossTables>,
    /// Which ranks' pushes are complete.
    pub(super) arrived: Vec<bool>,
    /// Each rank's tables, where they are summed in rank order once all are in.
    pub(super) parts: Vec<Option<LossTables>>,
    pub(super) cells: Option<Vec<u32>>,
    pub(super) move_cost: f64,
    pub(super) solving: bool,
    pub(super) result: Option<Arc<Reallocation>>,
    /// The round's sparse tables as their parts arrive (a round on sparse tables).
    pub(super) sparse: Option<SparseAcc>,
}

/// A round's sparse tables on the coordinator, as the parts arrive.
pub(super) struct SparseAcc {
    /// The parts in word order so far (from the first part on).
    pub(super) round: Option<SparseRound>,
    /// Parts that arrived ahead of the next word, by their first word.
    pub(super) ahead: BTreeMap<usize, SparsePart>,
    /// Which ranks have pushed their last part.
    pub(super) done: Vec<bool>,
    /// Rank 0's current allocation.
    pub(super) cells: Option<Vec<u32>>,
}

/// One checkpoint's commit: which ranks reached the step, with which parameters.
#[derive(Default)]
pub(super) struct CommitSt {
    pub(super) arrived: Vec<bool>,
    /// Each rank's parameter checksum at the step.
    pub(super) sums: Vec<String>,
    pub(super) dir: String,
    pub(super) meta: Option<lightrnn_core::checkpoint::Meta>,
    pub(super) committing: bool,
    pub(super) done: bool,
}

pub(super) struct State {
    pub(super) generation: u64,
    /// Before the group forms, one slot per possible rank (`world_size`); after, exactly
    /// the formed group's ranks.
    pub(super) members: Vec<Option<Member>>,
    pub(super) formed: bool,
    /// Ranks of the formed group (`world_size` until it forms).
    pub(super) world: usize,
    /// When the last worker joined this generation (an elastic group forms after a
    /// quiet `form_wait`).
    pub(super) last_join: Instant,
    /// When a worker last asked to join the formed group (an elastic group below its
    /// maximum then grows at its next checkpoint).
    pub(super) knocked: Option<Instant>,
    pub(super) epochs: BTreeMap<u64, EpochAcc>,
    pub(super) rounds: BTreeMap<u64, Round>,
    pub(super) commits: BTreeMap<u64, CommitSt>,
    pub(super) finished: Vec<bool>,
    /// Each rank's final parameter checksum.
    pub(super) final_sums: Vec<String>,
    pub(super) summary: Option<lightrnn_core::report::Summary>,
    pub(super) failed: Option<String>,
    /// When the current generation began (the join deadline counts from here).
    pub(super) generation_started: Instant,
    /// Why the last generation ended.
    pub(super) last_cause: String,
    /// The checkpoint a new generation resumes from (the last one committed).
    pub(super) resume_from: Option<String>,
    /// The NCCL unique id of this generation's communicator, once formed (empty: none).
    pub(super) nccl_id: Vec<u8>,
    /// The secret of this generation's ring, drawn when it forms.
    pub(super) ring_key: Vec<u8>,
    /// The generation's number is in `RUN/run.json` (joins are answered only then: a
    /// restarted coordinator must never hand the same number out again).
    pub(super) recorded: bool,
}

impl State {
    pub(super) fn new(world: usize, generation: u64, resume_from: Option<String>) -> Self {
        Self {
            generation,
            members: (0..world).map(|_| None).collect(),
            formed: false,
            world,
            last_join: Instant::now(),
            knocked: None,
            epochs: BTreeMap::new(),
            rounds: BTreeMap::new(),
            commits: BTreeMap::new(),
            finished: vec![false; world],
            final_sums: vec![String::new(); world],
            summary: None,
            failed: None,
            generation_started: Instant::now(),
            last_cause: String::new(),
            resume_from,
            nccl_id: Vec::new(),
            ring_key: Vec::new(),
            recorded: true,
        }
    }

    /// Fail the job while holding the state lock, so that no waiter sees the state that
    /// revealed the fault before the fault itself (wake the waiters after releasing it).
    /// The first cause wins.
    pub(super) fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::error!(generation = self.generation, cause = %why, "job failed");
            self.failed = Some(why);
        }
    }
}

/// Counters of the control plane (reported at the end of the job).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct JobStats {
    pub rpcs: u64,
    pub epochs_accounted: u64,
    pub tokens_accounted: u64,
    pub reallocations: u64,
    pub checkpoints_committed: u64,
    /// Checksum of the parameters every rank ended with (verified equal).
    pub params_sha256: String,
    /// New generations started, by cause (heartbeat, worker_failed, process_exit).
    pub restarts: BTreeMap<String, u64>,
    pub generation: u64,
    /// Tokens of each completed epoch (of the surviving trajectory).
    pub epoch_tokens: BTreeMap<u64, u64>,
    /// Workers in each generation's group.
    pub worlds: BTreeMap<u64, usize>,
    /// Generations started to take in workers that asked to join (elastic growth).
    pub grows: u64,
    /// Bytes of loss tables the ranks pushed (dense and sparse, every round).
    pub realloc_bytes_in: u64,
    /// Coordinator processes that served the run before this one (killed, preempted,
    /// restarted with `--resume`).
    pub coordinator_restarts: u64,
    /// The run's id (`RUN/run.json`), the same across coordinator restarts.
    pub run_id: String,
    /// How long the workers took to prepare the dataset from text (this coordinator's).
    pub prepare_seconds: Option<f64>,
}
