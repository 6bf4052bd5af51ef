//! How a run starts: the dataset prepared (once per corpus), the checkpoint to continue
//! from (or the refusal to train over an existing run), and the loop state restored from
//! it.

use tokio::runtime::Handle;

use lightrnn_kernels::{Backend, State};

use super::options::RunOptions;
use lightrnn_core::auto::AutoState;
use lightrnn_core::checkpoint::{self, Checkpoint};
use lightrnn_core::config::TrainConfig;
use lightrnn_core::data::dataset::{Dataset, PrepareOptions};
use lightrnn_core::report::EpochRecord;
use lightrnn_core::{Error, Result};

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
    /// The finished epoch's reallocation round is still to run.
    pub(super) realloc_pending: bool,
    /// The automatic reallocation's state (`realloc_every = "auto"` only).
    pub(super) auto: Option<AutoState>,
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
            realloc_pending: false,
            auto: cfg.realloc_every.is_auto().then(AutoState::default),
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

/// Every number of the manifest a resumed run continues from, checked against the
/// checkpoint's own name, the run's settings and the data: a manifest that lies is an
/// error naming its field, never a run that continues from nonsense.
fn check_meta(ck: &Checkpoint, cfg: &TrainConfig, ds: &Dataset) -> Result<()> {
    let m = &ck.meta;
    let bad = |field: &str, msg: String| {
        Err(Error::Checkpoint {
            url: ck.url.clone(),
            msg: format!("meta.json: {field} {msg}"),
        })
    };
    let name = ck
        .url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("");
    if let Some(n) = name
        .strip_prefix("step-")
        .and_then(|s| s.parse::<u64>().ok())
        && n != m.step
    {
        return bad("step", format!("= {} in a checkpoint named {name}", m.step));
    }
    if m.vocab_size != ds.vocab.len() {
        return bad(
            "vocab_size",
            format!(
                "= {} but the data's vocabulary has {} words",
                m.vocab_size,
                ds.vocab.len()
            ),
        );
    }
    if cfg.epochs > 0 && m.epoch > cfg.epochs {
        return bad(
            "epoch",
            format!("= {} is past the run's {} epochs", m.epoch, cfg.epochs),
        );
    }
    if m.history.len() as u64 > m.epoch + 1 {
        return bad(
            "history",
            format!(
                "has {} epochs, more than epoch {} allows",
                m.history.len(),
                m.epoch
            ),
        );
    }
    // Every step advances each stream by at least one word (bptt >= 1), and a pass
    // over the data ends at the stream's last input.
    let per_stream = ds.train.tokens() / cfg.batch.max(1) as u64;
    let last = per_stream.saturating_sub(1);
    if m.cursor > last {
        return bad(
            "cursor",
            format!(
                "= {} is beyond the {last} inputs of each of the {} training streams",
                m.cursor, cfg.batch
            ),
        );
    }
    let most = m.epoch.saturating_add(1).saturating_mul(last.max(1));
    if m.step > most {
        return bad(
            "step",
            format!(
                "= {} is more than epoch {} at cursor {} can have taken over this data ({last} inputs per stream)",
                m.step, m.epoch, m.cursor
            ),
        );
    }
    if m.optimizer_updates > m.step {
        return bad(
            "optimizer_updates",
            format!("= {} is more than step {}", m.optimizer_updates, m.step),
        );
    }
    let words = m
        .step
        .saturating_mul(cfg.batch as u64)
        .saturating_mul(last.max(1));
    if m.epoch_words > words {
        return bad(
            "epoch_words",
            format!(
                "= {} is more than {} steps can predict",
                m.epoch_words, m.step
            ),
        );
    }
    for (field, x) in [
        ("lr", m.lr),
        ("epoch_loss_sum", m.epoch_loss_sum),
        ("seconds", m.seconds),
        ("best_valid_loss", m.best_valid_loss.unwrap_or(0.0)),
    ] {
        if !x.is_finite() || x < 0.0 {
            return bad(field, format!("= {x} is not a finite number >= 0"));
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
    check_meta(&ck, cfg, ds)?;
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
        realloc_pending: m.realloc_pending,
        auto: cfg
            .realloc_every
            .is_auto()
            .then(|| m.auto_realloc.clone().unwrap_or_default()),
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
