//! How a run starts: the dataset prepared (once per corpus), the checkpoint to continue
//! from (or the refusal to train over an existing run), and the loop state restored from
//! it.

use tokio::runtime::Handle;

use lightrnn_kernels::{Backend, State};

use super::options::RunOptions;
use crate::checkpoint::{self, Checkpoint};
use crate::config::TrainConfig;
use crate::data::dataset::{Dataset, PrepareOptions};
use crate::report::EpochRecord;
use crate::{Error, Result};

/// Everything the loop carries between steps and saves in checkpoints.
pub(super) struct LoopState {
    pub(super) step: u64,
    pub(super) epoch: u64,
    pub(super) lr: f64,
    pub(super) best_valid_loss: Option<f64>,
    pub(super) best_params: Option<Vec<f32>>,
    /// The allocation that goes with `best_params`.
    pub(super) best_cells: Option<Vec<u32>>,
    pub(super) reallocations: u64,
    pub(super) epoch_loss_sum: f64,
    pub(super) epoch_words: u64,
    pub(super) train_seconds: f64,
    pub(super) history: Vec<EpochRecord>,
}

impl LoopState {
    pub(super) fn new(cfg: &TrainConfig) -> Self {
        Self {
            step: 0,
            epoch: 0,
            lr: cfg.lr,
            best_valid_loss: None,
            best_params: None,
            best_cells: None,
            reallocations: 0,
            epoch_loss_sum: 0.0,
            epoch_words: 0,
            train_seconds: 0.0,
            history: Vec::new(),
        }
    }
}

/// The run's dataset, prepared into `out/data` when `data` is text.
pub(super) fn dataset(cfg: &TrainConfig, opts: &RunOptions, handle: &Handle) -> Result<Dataset> {
    let prep = PrepareOptions {
        text: cfg.text_options(),
        vocab_size: cfg.vocab_size,
        shard_tokens: cfg.shard_tokens,
    };
    let ds = handle.block_on(Dataset::open_or_prepare(
        &opts.data,
        &opts.out.join("data"),
        &prep,
    ))?;
    tracing::info!(
        vocab = ds.vocab.len(),
        train = ds.train.tokens(),
        valid = ds.valid.tokens(),
        test = ds.test.tokens(),
        "dataset ready"
    );
    Ok(ds)
}

/// The checkpoint the run continues from: the one the coordinator named, the newest that
/// verifies (`--resume`), or none; a new run refuses a run directory that holds one.
pub(super) fn checkpoint_to_resume(
    opts: &RunOptions,
    handle: &Handle,
) -> Result<Option<Checkpoint>> {
    if let Some(dir) = &opts.checkpoint {
        return Ok(Some(handle.block_on(checkpoint::load(dir))?));
    }
    if opts.resume {
        let ck = handle.block_on(checkpoint::newest(&opts.out))?;
        if ck.is_none() {
            tracing::info!(out = %opts.out, "no checkpoint to resume from: starting a new run");
        }
        return Ok(ck);
    }
    if let Some((step, dir)) = handle
        .block_on(checkpoint::list(&opts.out))?
        .into_iter()
        .next()
    {
        return Err(Error::Config(format!(
            "{} already holds a run (checkpoint {dir} at step {step}): pass --resume to continue it, or choose another --out",
            opts.out
        )));
    }
    Ok(None)
}

/// Keys that fix the model, the data order or the optimizer: a resumed run must keep them.
fn check_resumable(saved: &TrainConfig, now: &TrainConfig) -> Result<()> {
    let pairs = [
        (
            "vocab_size",
            saved.vocab_size.to_string(),
            now.vocab_size.to_string(),
        ),
        ("emb", saved.emb.to_string(), now.emb.to_string()),
        ("hidden", saved.hidden.to_string(), now.hidden.to_string()),
        ("layers", saved.layers.to_string(), now.layers.to_string()),
        (
            "lowercase",
            saved.lowercase.to_string(),
            now.lowercase.to_string(),
        ),
        ("batch", saved.batch.to_string(), now.batch.to_string()),
        ("optimizer", saved.optimizer.clone(), now.optimizer.clone()),
        ("seed", saved.seed.to_string(), now.seed.to_string()),
    ];
    for (k, a, b) in pairs {
        if a != b {
            return Err(Error::Config(format!(
                "cannot resume: the run was started with {k} = {a}, this command asks for {b}"
            )));
        }
    }
    Ok(())
}

/// What a resumed run continues with besides its backend's contents.
pub(super) struct Resumed {
    pub(super) st: LoopState,
    /// Stream position where the epoch in progress continues.
    pub(super) cursor: u64,
    /// The whole batch's carried state; each rank takes its streams.
    pub(super) state: Option<State<f32>>,
}

/// Load checkpoint `ck` into `backend` (parameters, allocation, optimizer) and restore
/// the loop state from its manifest (and the best model from `out/best`).
pub(super) fn restore(
    ck: Checkpoint,
    cfg: &TrainConfig,
    ds: &Dataset,
    backend: &mut dyn Backend,
    opts: &RunOptions,
    handle: &Handle,
) -> Result<Resumed> {
    check_resumable(&ck.meta.config, cfg)?;
    if ck.meta.vocab_sha256 != ds.vocab.sha256() || ck.meta.dims != backend.dims() {
        return Err(Error::Checkpoint {
            url: ck.url.clone(),
            msg: "its vocabulary or model shape differs from this dataset's".into(),
        });
    }
    backend.set_params(&ck.params)?;
    backend.set_allocation(&ck.cells)?;
    if let Some(o) = &ck.optimizer {
        backend.set_optimizer_state(o.clone())?;
    }
    let m = &ck.meta;
    let mut st = LoopState {
        step: m.step,
        epoch: m.epoch,
        lr: m.lr,
        best_valid_loss: m.best_valid_loss,
        best_params: None,
        best_cells: None,
        reallocations: m.reallocations,
        epoch_loss_sum: m.epoch_loss_sum,
        epoch_words: m.epoch_words,
        train_seconds: m.seconds,
        history: m.history.clone(),
    };
    if st.best_valid_loss.is_some() {
        let best = handle.block_on(checkpoint::load(&opts.out.join("best")))?;
        st.best_params = Some(best.params);
        st.best_cells = Some(best.cells);
    }
    tracing::info!(checkpoint = %ck.url, step = st.step, epoch = st.epoch, "resuming");
    Ok(Resumed {
        st,
        cursor: m.cursor,
        state: ck.state,
    })
}
