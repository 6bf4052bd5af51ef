//! What one job is: its config, data, run directory, group size and timeouts, and its
//! security settings. Settled once, before any worker joins; a dataset still to be
//! tokenised from text is left to the workers as a plan.

use std::sync::Arc;
use std::time::Duration;

use lightrnn_core::checkpoint::{self, JobRecord};
use lightrnn_core::config::TrainConfig;
use lightrnn_core::data::cluster::Plan;
use lightrnn_core::data::dataset::{Dataset, Opened, PrepareOptions};
use lightrnn_core::data::store::Location;
use lightrnn_core::{Error, Result};

use super::record::RunRecord;

/// Who tokenises a job's text `--data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrepareBy {
    /// The workers where the text is in object storage; the coordinator where it is on
    /// a local path (which the workers' hosts may not have).
    Auto,
    /// The workers, as tasks, before the group forms (a local path must then be on a
    /// filesystem every worker's host shares).
    Workers,
    /// The coordinator, while the workers wait.
    Coordinator,
}

/// Where each generation's NCCL unique id comes from (a new one per generation: the old
/// group's communicators can never be joined again).
pub type NcclIds = Arc<dyn Fn() -> std::result::Result<Vec<u8>, String> + Send + Sync>;

/// Everything the coordinator hands out and enforces for one job.
#[derive(Clone)]
pub struct JobSpec {
    pub cfg: TrainConfig,
    /// The prepared dataset.
    pub data: Location,
    pub out: Location,
    /// The checkpoint the job resumes from.
    pub checkpoint: Option<Location>,
    pub backend: String,
    /// Workers in the job: the most (an elastic job forms with fewer, see `min_world`).
    pub world_size: usize,
    /// The fewest workers a generation forms with (= `world_size` unless elastic).
    pub min_world: usize,
    /// An elastic generation with at least `min_world` workers forms once no worker has
    /// joined for this long.
    pub form_wait: Duration,
    pub heartbeat: Duration,
    /// A rank silent for this long is lost (5 heartbeats unless set).
    pub heartbeat_timeout: Duration,
    /// Deadline of every collective read and write on the workers.
    pub collective_timeout: Duration,
    /// How long the group may take to form.
    pub join_timeout: Duration,
    /// Tokens of the training split (data accounting).
    pub train_tokens: u64,
    pub run_id: String,
    /// This coordinator's first generation: 1 for a new run, numbered on from every
    /// earlier coordinator's for a resumed one ([`super::record`]).
    pub first_generation: u64,
    /// Coordinator processes that have served the run, this one included.
    pub coordinator_starts: u64,
    /// The counters of the checkpoint resumed from, where a coordinator committed it.
    pub restored: Option<JobRecord>,
    /// `RUN/run.json` as this coordinator wrote it at its start: each new generation is
    /// recorded there before its workers learn its number (None: a job with no run
    /// record, as the unit tests' are).
    pub run_record: Option<RunRecord>,
    /// New generations after lost workers before the job gives up.
    pub max_restarts: u64,
    /// Words in the dataset's vocabulary (the loss tables' V).
    pub vocab: usize,
    /// Calls must present this bearer token (`None`: no authentication, loopback only).
    pub token: Option<String>,
    /// Serve over TLS with this configuration (identity and, for mutual TLS, client
    /// verification; see [`crate::tls`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The dataset to prepare from text through the workers before the group forms
    /// (`data` is where it goes; `train_tokens` and `vocab` are known once it is ready).
    pub pending: Option<Arc<Plan>>,
    /// NCCL ids for the GPU workers of a CUDA job (`None`: the workers sum through the
    /// TCP ring only).
    pub nccl_ids: Option<NcclIds>,
}

impl JobSpec {
    /// A job over the prepared dataset `data` (train split of `train_tokens` tokens, `vocab`
    /// words) with the default timeouts, no authentication, no TLS.
    pub fn new(
        cfg: TrainConfig,
        data: Location,
        out: Location,
        (min_world, world_size): (usize, usize),
        train_tokens: u64,
        vocab: usize,
    ) -> Self {
        let heartbeat = Duration::from_secs(2);
        let run_id = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        Self {
            cfg,
            data,
            out,
            checkpoint: None,
            backend: "auto".into(),
            world_size,
            min_world,
            form_wait: Duration::from_secs(10),
            heartbeat,
            heartbeat_timeout: heartbeat * 5,
            collective_timeout: Duration::from_secs(120),
            join_timeout: Duration::from_secs(600),
            train_tokens,
            run_id,
            first_generation: 1,
            coordinator_starts: 1,
            restored: None,
            run_record: None,
            max_restarts: 3,
            vocab,
            token: None,
            tls: None,
            pending: None,
            nccl_ids: None,
        }
    }

    /// Prepare the dataset (once, for all workers) and find the checkpoint to resume from;
    /// refuses to start a new run over an existing one.
    pub async fn prepare(
        cfg: TrainConfig,
        (data, by): (&Location, PrepareBy),
        out: &Location,
        resume: bool,
        (min_world, world_size): (usize, usize),
    ) -> Result<Self> {
        cfg.validate()?;
        if min_world == 0 || min_world > world_size {
            return Err(Error::Config(format!(
                "world size {min_world}:{world_size}: expected 1 <= MIN <= MAX"
            )));
        }
        for w in min_world..=world_size {
            cfg.check_world(w)?;
        }
        let prep = PrepareOptions {
            text: cfg.text_options(),
            vocab_size: cfg.vocab_size,
            shard_tokens: cfg.shard_tokens,
        };
        let cache = out.join("data");
        // Text is tokenised by the workers once they come ([`super::prepare`]).
        let workers = match by {
            PrepareBy::Workers => true,
            PrepareBy::Coordinator => false,
            PrepareBy::Auto => data.local_path().is_none(),
        };
        let opened = match Dataset::open_or_plan(data, &cache, &prep).await? {
            Opened::Text(splits) if !workers => {
                tracing::info!(data = %data, "the coordinator tokenises the text (a local path: --prepare-by workers where every worker's host shares it)");
                Opened::Ready(Dataset::prepare(&splits, &cache, &prep).await?)
            }
            opened => opened,
        };
        let (loc, train_tokens, vocab, pending) = match opened {
            Opened::Ready(ds) => (ds.loc.clone(), ds.train.tokens(), ds.vocab.len(), None),
            Opened::Text(splits) => {
                let plan = Plan {
                    dataset: cache.clone(),
                    opts: prep,
                    splits,
                    parts: world_size,
                };
                (cache, 0, 0, Some(Arc::new(plan)))
            }
        };
        let newest = checkpoint::list(out).await?.into_iter().next();
        let checkpoint = match (resume, newest) {
            (false, Some((step, dir))) => {
                return Err(Error::Config(format!(
                    "{out} already holds a run (checkpoint {dir} at step {step}): pass --resume to continue it, or choose another --out"
                )));
            }
            (false, None) => None,
            (true, _) => match checkpoint::newest(out).await? {
                Some(ck) => Some(ck),
                None => {
                    tracing::info!(out = %out, "no checkpoint to resume from: the run starts over");
                    None
                }
            },
        };
        let restored = checkpoint.as_ref().and_then(|c| c.meta.job.clone());
        let record = RunRecord::start(out, resume, restored.as_ref()).await?;
        if record.coordinator_starts > 1 {
            tracing::warn!(
                run = %record.run_id,
                coordinator_starts = record.coordinator_starts,
                first_generation = record.generation,
                counters_from = checkpoint.as_ref().map_or("nothing (no checkpoint)", |c| c.url.as_str()),
                "a coordinator of this run ran before: continuing its generations and counters"
            );
        }
        let mut spec = Self::new(
            cfg,
            loc,
            out.clone(),
            (min_world, world_size),
            train_tokens,
            vocab,
        );
        spec.pending = pending;
        spec.checkpoint = checkpoint.map(|c| Location::parse(&c.url)).transpose()?;
        spec.run_id = record.run_id.clone();
        spec.first_generation = record.generation;
        spec.coordinator_starts = record.coordinator_starts;
        spec.restored = restored;
        spec.run_record = Some(record);
        Ok(spec)
    }
}

/// The NCCL ids of a job on `backend`: a CUDA (or `auto`) job gets them where this
/// process loads NCCL. A CUDA job without them is refused by its GPU workers with the
/// reason; the warning here says it first.
pub fn nccl_ids(backend: lightrnn_kernels::BackendKind) -> Option<NcclIds> {
    use lightrnn_kernels::BackendKind;
    if matches!(backend, BackendKind::Cpu) {
        return None;
    }
    if !lightrnn_kernels::cuda::nccl_available() {
        if matches!(backend, BackendKind::Cuda { .. }) {
            tracing::warn!(
                "no NCCL at the coordinator (built without CUDA, or no libnccl.so on its library path): GPU workers cannot form a communicator"
            );
        }
        return None;
    }
    Some(Arc::new(|| {
        lightrnn_kernels::cuda::nccl_unique_id().map_err(|e| e.to_string())
    }))
}
