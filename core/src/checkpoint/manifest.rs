//! The manifest of a checkpoint (`meta.json`): everything besides tensors that a run
//! needs to continue exactly, and the size and SHA-256 of every other object. Written
//! last: a directory without one is not a checkpoint.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use lightrnn_kernels::{ModelDims, Optimizer};

use crate::config::TrainConfig;
use crate::report::EpochRecord;

pub const FORMAT: &str = "lightrnn.checkpoint";
pub const META: &str = "meta.json";

/// One object of a checkpoint as its manifest lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Everything besides tensors that a run needs to continue exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format: String,
    pub version: u32,
    /// Updates applied so far.
    pub step: u64,
    /// Epoch in progress (0-based).
    pub epoch: u64,
    /// Position inside every training stream where the epoch continues.
    pub cursor: u64,
    pub config: TrainConfig,
    pub dims: ModelDims,
    pub vocab_size: usize,
    pub vocab_sha256: String,
    /// Dropout masks are Philox draws keyed by (seed, step, site): the seed and the
    /// step are the whole RNG state.
    pub rng_seed: u64,
    pub optimizer: Option<Optimizer>,
    pub optimizer_updates: u64,
    pub lr: f64,
    pub best_valid_loss: Option<f64>,
    /// Running training loss of the epoch in progress.
    pub epoch_loss_sum: f64,
    pub epoch_words: u64,
    /// Training seconds so far (all sessions).
    pub seconds: f64,
    pub history: Vec<EpochRecord>,
    /// Word reallocations so far.
    #[serde(default)]
    pub reallocations: u64,
    /// The epoch ended with a reallocation round still to run (the checkpoint is taken
    /// before the round, so a round that fails loses nothing): a resumed run runs it
    /// before its first step.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub realloc_pending: bool,
    /// What `realloc_every = "auto"` has measured and decided so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_realloc: Option<crate::auto::AutoState>,
    /// The distributed job's record at this checkpoint (written by the coordinator that
    /// committed it): a coordinator restarted from it continues the run's generations
    /// and counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRecord>,
    pub files: Vec<FileEntry>,
}

/// A distributed run's identity and counters as of one committed checkpoint: what a
/// restarted coordinator continues from (the counters of the trajectory that survives:
/// epochs after the checkpoint are trained and counted again).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub run_id: String,
    /// The generation that reached the checkpoint.
    pub generation: u64,
    /// Coordinator processes that have served the run so far.
    pub coordinator_starts: u64,
    /// Tokens of each completed epoch.
    pub epoch_tokens: BTreeMap<u64, u64>,
    /// Checkpoints committed, this one included.
    pub checkpoints_committed: u64,
    /// Generations started after lost workers, by cause.
    pub restarts: BTreeMap<String, u64>,
    pub reallocations: u64,
    pub grows: u64,
    pub realloc_bytes_in: u64,
    /// Workers in each generation's group.
    pub worlds: BTreeMap<u64, usize>,
}
