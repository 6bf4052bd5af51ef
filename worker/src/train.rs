//! The training loop of one rank: epochs of truncated-BPTT batches, gradient clipping,
//! the optimizer, validation with learning-rate decay on plateaus, metrics, checkpoints,
//! and the final test evaluation with the best model.
//!
//! The loop itself is synchronous (the backend owns the cores); object-storage I/O runs on
//! the tokio runtime behind `handle`, so call [`train`] from a thread that may block
//! (`spawn_blocking` or a plain thread), never from inside an async task.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use lightrnn_kernels::{
    Backend, BackendKind, BackendOptions, Batch, ModelConfig, ModelDims, Shard, Stream,
    open_backend,
};

use crate::batches::Batches;
use crate::checkpoint::{self, EpochRecord, Meta, SaveRequest};
use crate::cluster::{Dist, Report, concat_states, gather_state, params_checksum, slice_state};
use crate::collective::{Collective, share};
use crate::config::TrainConfig;
use crate::dataset::{Dataset, PrepareOptions};
use crate::realloc::{Carry, ReallocOptions};
use crate::shards::SplitReader;
use crate::store::Location;
use crate::{Error, Result};

/// Where a run reads and writes, and how it reports.
#[derive(Clone)]
pub struct RunOptions {
    /// Text directory or prepared dataset.
    pub data: Location,
    /// Run directory: checkpoints, metrics, summary, tokenised-data cache.
    pub out: Location,
    /// Continue from the newest checkpoint in `out` (start fresh when there is none).
    pub resume: bool,
    /// Continue from exactly this checkpoint (the coordinator resolves it once for all
    /// ranks); overrides `resume`.
    pub checkpoint: Option<Location>,
    pub backend: BackendKind,
    /// Draw a progress bar (a terminal); otherwise log lines every `log_every` steps.
    pub progress: bool,
    /// Set (by a signal handler, or the coordinator) to stop at the next step with a
    /// checkpoint. The ranks of a job agree on the step through their collective.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// A single-process run publishes its progress here (a metrics endpoint reads it).
    pub report: Option<crate::cluster::ReportSink>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("data", &self.data)
            .field("out", &self.out)
            .field("resume", &self.resume)
            .field("checkpoint", &self.checkpoint)
            .field("backend", &self.backend)
            .finish()
    }
}

/// The end-of-run report (`summary.json` and the final stdout line). Figures a run did
/// not measure (a stop by signal skips evaluation) are NaN, written as `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    #[serde(deserialize_with = "nan_if_null")]
    pub train_loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub train_ppl: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub valid_loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub valid_ppl: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub test_loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub test_ppl: f64,
    /// Training words per second of this session (evaluation and checkpoints excluded).
    pub words_per_sec: f64,
    pub params: usize,
    /// Wall-clock seconds of this session.
    pub seconds: f64,
    /// Training seconds over all sessions of the run.
    pub train_seconds: f64,
    pub steps: u64,
    pub epochs_completed: u64,
    /// "epochs" or "max_steps".
    pub stopped_by: String,
    pub vocab_size: usize,
    pub backend: String,
    /// Ranks that trained (data-parallel).
    #[serde(default = "one")]
    pub world_size: usize,
    /// Seconds rank 0's training thread spent in calls to the coordinator (0 when it ran
    /// alone).
    #[serde(default)]
    pub control_seconds: f64,
    pub config: TrainConfig,
    pub history: Vec<EpochRecord>,
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn one() -> usize {
    1
}

fn ppl(loss: f64) -> f64 {
    loss.exp()
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

/// metrics.jsonl, rewritten whole (object stores have no append) at most every few seconds.
struct Metrics {
    out: Location,
    /// Only rank 0 writes.
    enabled: bool,
    lines: Vec<String>,
    dirty: bool,
    last_flush: Instant,
}

const METRICS: &str = "metrics.jsonl";

impl Metrics {
    async fn open(out: &Location, resume_step: Option<u64>, enabled: bool) -> Result<Self> {
        let mut lines = Vec::new();
        if enabled
            && let Some(step) = resume_step
            && let Ok(b) = out.get(METRICS).await
        {
            for l in String::from_utf8_lossy(&b).lines() {
                let keep = serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= step);
                if keep {
                    lines.push(l.to_string());
                }
            }
        }
        Ok(Self {
            out: out.clone(),
            enabled,
            lines,
            dirty: true,
            last_flush: Instant::now(),
        })
    }

    fn push(&mut self, v: serde_json::Value) {
        self.lines.push(v.to_string());
        self.dirty = true;
    }

    async fn flush(&mut self, force: bool) -> Result<()> {
        if self.enabled && self.dirty && (force || self.last_flush.elapsed().as_secs() >= 10) {
            let mut s = self.lines.join("\n");
            s.push('\n');
            self.out.put(METRICS, Bytes::from(s)).await?;
            self.dirty = false;
            self.last_flush = Instant::now();
        }
        Ok(())
    }
}

/// Mean loss per word over a split (fresh state, no dropout), in `eval_batch` streams
/// shared out over the ranks of `coll`; every rank gets the same result.
pub fn evaluate(
    backend: &mut dyn Backend,
    split: &Arc<SplitReader>,
    eval_batch: usize,
    bptt: usize,
    handle: &Handle,
    coll: &mut dyn Collective,
) -> Result<(f64, u64)> {
    backend.reset_state(Stream::Eval);
    let mine = share(eval_batch, coll.world(), coll.rank());
    let b = mine.len();
    let mut batches = Batches::streams(split.clone(), handle.clone(), eval_batch, mine, bptt, 0)?;
    let mut buf = Vec::new();
    let (mut total, mut words) = (0.0, 0u64);
    while let Some(t) = batches.next_batch(&mut buf)? {
        let batch = Batch {
            inputs: &buf[..t * b],
            targets: &buf[b..],
            steps: t,
            batch: b,
            stream: Stream::Eval,
        };
        let l = backend.eval_batch(&batch)?;
        total += l.total();
        words += l.words;
    }
    backend.reset_state(Stream::Eval);
    let mut sums = [total, words as f64];
    coll.all_reduce_sum_f64(&mut sums)?;
    Ok((sums[0] / sums[1].max(1.0), sums[1] as u64))
}

struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(enabled: bool, len: u64, pos: u64, epoch: u64, epochs: u64) -> Self {
        if !enabled {
            return Self { bar: None };
        }
        let bar = indicatif::ProgressBar::new(len);
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("epoch {}/{}", epoch + 1, epochs));
        bar.set_position(pos);
        Self { bar: Some(bar) }
    }
    fn update(&self, pos: u64, msg: String) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.set_message(msg);
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Everything the loop carries between steps and saves in checkpoints.
struct LoopState {
    step: u64,
    epoch: u64,
    lr: f64,
    best_valid_loss: Option<f64>,
    best_params: Option<Vec<f32>>,
    /// The allocation that goes with `best_params`.
    best_cells: Option<Vec<u32>>,
    reallocations: u64,
    epoch_loss_sum: f64,
    epoch_words: u64,
    train_seconds: f64,
    history: Vec<EpochRecord>,
}

/// Running (loss, words, seconds) of the steps since the last log line. Each rank sums
/// its own streams; [`Window::reduce`] turns them into the job's figures.
#[derive(Default)]
struct Window {
    loss: f64,
    words: u64,
    secs: f64,
}

impl Window {
    /// The job's (loss sum, words) of the window, summed over the ranks and added to the
    /// epoch's running sums in `st`; resets the window.
    fn fold_into(&mut self, st: &mut LoopState, coll: &mut dyn Collective) -> Result<(f64, u64)> {
        let mut s = [self.loss, self.words as f64];
        coll.all_reduce_sum_f64(&mut s)?;
        self.loss = 0.0;
        self.words = 0;
        let (l, w) = (s[0], s[1] as u64);
        st.epoch_loss_sum += l;
        st.epoch_words += w;
        Ok((l, w))
    }
}

/// Train a LightRNN model as `cfg` says in this process alone; blocking.
pub fn train(cfg: &TrainConfig, opts: &RunOptions, handle: &Handle) -> Result<Summary> {
    let mut dist = Dist::local(
        cfg.realloc_solver,
        cfg.threads,
        handle.clone(),
        opts.report.clone(),
    );
    train_rank(cfg, opts, handle, &mut dist)
}

/// Train as one rank of a data-parallel job (`dist`): every rank runs this with the same
/// config; rank `r` trains on its share of the global batch's streams, gradients are
/// summed through the collective, so all ranks apply identical updates. Rank 0 writes the
/// run's objects (metrics, best model, checkpoint objects, summary). Blocking.
pub fn train_rank(
    cfg: &TrainConfig,
    opts: &RunOptions,
    handle: &Handle,
    dist: &mut Dist,
) -> Result<Summary> {
    cfg.validate()?;
    let (rank, world) = (dist.rank(), dist.world());
    let leader = dist.is_leader();
    if !cfg.batch.is_multiple_of(world) || cfg.eval_batch < world {
        return Err(Error::Config(format!(
            "batch {} must split evenly over {world} ranks, and eval_batch {} must give each at least one stream",
            cfg.batch, cfg.eval_batch
        )));
    }
    // Gradient groups in the job and on this rank.
    let groups = cfg.groups_for(world)?;
    let gpr = groups / world;
    let started = Instant::now();
    // A backend this build or machine cannot run fails before any data is read.
    lightrnn_kernels::check_backend(opts.backend)?;
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
    let vocab = ds.vocab.clone();
    tracing::info!(
        vocab = vocab.len(),
        train = ds.train.tokens(),
        valid = ds.valid.tokens(),
        test = ds.test.tokens(),
        "dataset ready"
    );
    let resume = if let Some(dir) = &opts.checkpoint {
        Some(handle.block_on(checkpoint::load(dir))?)
    } else if opts.resume {
        handle.block_on(checkpoint::newest(&opts.out))?
    } else {
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
        None
    };
    let dims = ModelDims::square(vocab.len(), cfg.emb, cfg.hidden, cfg.layers)?;
    let mcfg = ModelConfig {
        dims,
        dropout: cfg.dropout,
        seed: cfg.seed,
    };
    let mut backend = open_backend(&BackendOptions::new(opts.backend, cfg.threads), &mcfg)?;
    let rule = cfg.optimizer_rule()?;
    let n_params = backend.layout().total;
    let mut st = LoopState {
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
    };
    let mut cursor = 0u64;
    // The whole batch's carried state of a resumed run; each rank takes its streams.
    let mut resume_state = None;
    if let Some(ck) = &resume {
        check_resumable(&ck.meta.config, cfg)?;
        if ck.meta.vocab_sha256 != vocab.sha256() || ck.meta.dims != dims {
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
        resume_state = ck.state.clone();
        let m = &ck.meta;
        st = LoopState {
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
        cursor = m.cursor;
        tracing::info!(checkpoint = %ck.url, step = st.step, epoch = st.epoch, "resuming");
    } else if opts.resume {
        tracing::info!(out = %opts.out, "no checkpoint to resume from: starting a new run");
    }
    drop(resume);
    if leader {
        handle.block_on(opts.out.put("config.toml", Bytes::from(cfg.to_toml())))?;
    }
    let mut metrics = handle.block_on(Metrics::open(
        &opts.out,
        (st.step > 0).then_some(st.step),
        leader,
    ))?;
    tracing::info!(backend = %backend.name(), params = n_params, dims = ?dims, rank, world, "model ready");

    // The global batch; this rank's streams come from the epoch's lease.
    let b = cfg.batch;
    let mut buf = Vec::new();
    let mut stopped_by = "epochs";
    let mut session_words = 0u64;
    let mut session_train_secs = 0.0f64;
    let mut report = Report::default();
    let mut win = Window::default();
    let save = |backend: &dyn Backend,
                st: &LoopState,
                cursor: u64,
                dir: &Location,
                state: Option<&lightrnn_kernels::State<f32>>,
                with_train_state: bool|
     -> Result<Meta> {
        let meta = Meta {
            format: checkpoint::FORMAT.into(),
            version: 1,
            step: st.step,
            epoch: st.epoch,
            cursor,
            config: cfg.clone(),
            dims,
            vocab_size: vocab.len(),
            vocab_sha256: vocab.sha256(),
            rng_seed: cfg.seed,
            optimizer: if with_train_state { Some(rule) } else { None },
            optimizer_updates: if with_train_state { st.step } else { 0 },
            lr: st.lr,
            best_valid_loss: st.best_valid_loss,
            epoch_loss_sum: st.epoch_loss_sum,
            epoch_words: st.epoch_words,
            seconds: st.train_seconds,
            history: st.history.clone(),
            reallocations: st.reallocations,
            files: vec![],
        };
        let params = backend.params()?;
        let cells = backend.allocation()?;
        let opt = if with_train_state {
            backend.optimizer_state()?
        } else {
            None
        };
        let req = SaveRequest {
            meta,
            vocab: &vocab,
            layout: backend.layout(),
            params: &params,
            cells: &cells,
            optimizer: opt.as_ref(),
            state,
        };
        handle.block_on(checkpoint::write_objects(dir, req))
    };
    // Every rank calls this at the same step: the state is gathered from all ranks, rank 0
    // writes the objects, the job's owner commits the manifest once all ranks are there.
    let checkpoint_now = |backend: &dyn Backend,
                          st: &LoopState,
                          cursor: u64,
                          dist: &mut Dist,
                          report: &mut Report|
     -> Result<()> {
        let t = Instant::now();
        let dir = opts
            .out
            .join("checkpoints")
            .join(&checkpoint::dir_name(st.step));
        let parts: Option<Vec<_>> = (0..gpr)
            .map(|g| backend.state(Stream::Train(g as u32)))
            .collect::<lightrnn_kernels::Result<Vec<_>>>()?
            .into_iter()
            .collect();
        let local = parts.map(|p| concat_states(&p, dims.layers, dims.hidden));
        let state = gather_state(
            &mut *dist.collective,
            local.as_ref(),
            b,
            dims.layers,
            dims.hidden,
        )?;
        let meta = if leader {
            Some(save(backend, st, cursor, &dir, state.as_ref(), true)?)
        } else {
            None
        };
        let sum = params_checksum(&backend.params()?);
        dist.control.commit(st.step, &dir, meta.as_ref(), &sum)?;
        report.step = st.step;
        report.checkpoint_step = st.step;
        report.checkpoint_seconds = t.elapsed().as_secs_f64();
        report.checkpoint_bytes = meta
            .as_ref()
            .map_or(0, |m| m.files.iter().map(|f| f.bytes).sum());
        report.checkpoints += 1;
        dist.control.report(report);
        if leader {
            handle.block_on(checkpoint::prune(
                &opts.out,
                cfg.keep_checkpoints,
                cfg.keep_every,
            ))?;
            tracing::info!(step = st.step, dir = %dir, seconds = t.elapsed().as_secs_f64(), "checkpoint written");
        }
        Ok(())
    };

    'epochs: loop {
        if cfg.epochs > 0 && st.epoch >= cfg.epochs {
            break;
        }
        let leased = dist.control.lease(st.epoch, b, cursor)?;
        // Checkpoint states and loss tables assume this split.
        if leased != share(b, world, rank) {
            return Err(Error::Config(format!(
                "leased streams {leased:?} are not rank {rank}'s share {:?} of the batch of {b}",
                share(b, world, rank)
            )));
        }
        let mine = leased;
        let mut batches = Batches::streams(
            ds.train.clone(),
            handle.clone(),
            b,
            mine.clone(),
            cfg.bptt,
            cursor,
        )?;
        let gsize = mine.len() / gpr;
        backend.set_shard(Shard {
            offset: mine.start,
            global: b,
            groups: gpr,
        })?;
        if cursor == 0 {
            for g in 0..gpr {
                backend.reset_state(Stream::Train(g as u32));
            }
        }
        // A checkpoint taken at an epoch's end (cursor 0) holds the state the streams
        // ended with; the next epoch starts from zeros, as an uninterrupted run does.
        if let Some(whole) = resume_state.take()
            && cursor > 0
        {
            for g in 0..gpr {
                let first = mine.start + g * gsize;
                backend.set_state(
                    Stream::Train(g as u32),
                    slice_state(&whole, first..first + gsize, dims.layers, dims.hidden)?,
                )?;
            }
        }
        if let Some(lr) = cfg.scheduled_lr(st.epoch) {
            st.lr = lr;
        }
        let per_pass = batches.steps_per_pass();
        let bar = Progress::new(
            opts.progress && leader,
            per_pass,
            cursor.div_ceil(cfg.bptt as u64),
            st.epoch,
            cfg.epochs,
        );
        let mut pass_step = cursor.div_ceil(cfg.bptt as u64);
        let epoch_cursor0 = cursor;
        let epoch_t0 = Instant::now();
        let mut epoch_train_secs = 0.0;
        loop {
            let t0 = Instant::now();
            let Some(t) = batches.next_batch(&mut buf)? else {
                break;
            };
            // Gradients of the mean over the whole batch's words: each group scales its
            // sum by the global count, so the all-reduced sum is the global mean.
            let words = (t * b) as u64;
            let bl = mine.len();
            let batch = Batch {
                inputs: &buf[..t * bl],
                targets: &buf[bl..],
                steps: t,
                batch: bl,
                stream: Stream::Train(0),
            };
            let loss = backend.train_step(&batch, st.step, 1.0 / words as f32)?;
            if world > 1 {
                backend.all_reduce_grads(&mut *dist.collective)?;
            }
            let norm = backend.clip_and_step(&rule, st.lr, cfg.clip)?;
            // The norm is the same on every rank (NaN wherever any rank's loss is not
            // finite): all ranks decide alike and stop together, with no update applied.
            if !norm.is_finite() {
                return Err(Error::Diverged(format!(
                    "training loss is {} (gradient norm {norm}) at step {} (lr {}): lower lr or clip",
                    loss.total(),
                    st.step + 1,
                    st.lr
                )));
            }
            st.step += 1;
            pass_step += 1;
            let dt = t0.elapsed().as_secs_f64();
            st.train_seconds += dt;
            epoch_train_secs += dt;
            session_train_secs += dt;
            session_words += words;
            win.loss += loss.total();
            win.words += loss.words;
            win.secs += dt;
            dist.control
                .progress(st.step, st.epoch, batches.position())?;
            if st.step.is_multiple_of(cfg.log_every) {
                let mine = win.words;
                let (wl, ww) = win.fold_into(&mut st, &mut *dist.collective)?;
                let l = wl / ww.max(1) as f64;
                let wps = ww as f64 / win.secs.max(1e-9);
                report.step = st.step;
                report.epoch = st.epoch;
                report.loss = l;
                report.words_per_sec = mine as f64 / win.secs.max(1e-9);
                report.global_words_per_sec = wps;
                report.lr = st.lr;
                dist.control.report(&report);
                win.secs = 0.0;
                metrics.push(serde_json::json!({
                    "kind": "train", "step": st.step, "epoch": st.epoch + 1, "loss": l, "ppl": ppl(l),
                    "words_per_sec": wps, "lr": st.lr, "grad_norm": norm, "seconds": st.train_seconds,
                }));
                if opts.progress && leader {
                    bar.update(
                        pass_step,
                        format!("loss {l:.3} ppl {:.1} {:.0} w/s lr {}", ppl(l), wps, st.lr),
                    );
                } else if leader {
                    tracing::info!(
                        step = st.step,
                        epoch = st.epoch + 1,
                        progress = format!("{pass_step}/{per_pass}"),
                        loss = format!("{l:.4}"),
                        ppl = format!("{:.2}", ppl(l)),
                        words_per_sec = format!("{wps:.0}"),
                        lr = st.lr,
                        "train"
                    );
                }
                handle.block_on(metrics.flush(false))?;
            } else if opts.progress && pass_step.is_multiple_of(10) {
                bar.update(pass_step, String::new());
            }
            let at_limit = cfg.max_steps > 0 && st.step >= cfg.max_steps;
            // The epoch's last batch gets its checkpoint at the epoch's end, at this step.
            if cfg.checkpoint_every > 0
                && st.step.is_multiple_of(cfg.checkpoint_every)
                && !at_limit
                && !batches.exhausted()
            {
                win.fold_into(&mut st, &mut *dist.collective)?;
                checkpoint_now(&*backend, &st, batches.position(), dist, &mut report)?;
            }
            if at_limit {
                stopped_by = "max_steps";
                cursor = batches.position();
                bar.finish();
                break 'epochs;
            }
            // A stop request (SIGTERM, or the coordinator's) on any rank stops all of
            // them after this same step.
            if let Some(flag) = &opts.stop {
                let mut want = [f32::from(flag.load(std::sync::atomic::Ordering::Relaxed))];
                if world > 1 {
                    dist.collective.all_reduce_sum(&mut want)?;
                }
                if want[0] > 0.0 {
                    if leader {
                        tracing::warn!(step = st.step, "stop requested: checkpointing here");
                    }
                    stopped_by = "signal";
                    cursor = batches.position();
                    bar.finish();
                    break 'epochs;
                }
            }
        }
        bar.finish();
        win.fold_into(&mut st, &mut *dist.collective)?;
        // Every rank has consumed its lease: (positions moved) x (its streams).
        let consumed = (batches.position() - epoch_cursor0) * mine.len() as u64;
        dist.control.epoch_done(st.epoch, consumed)?;
        // End of epoch: validation, learning-rate schedule, best model, checkpoint.
        let (vl, _) = evaluate(
            &mut *backend,
            &ds.valid,
            cfg.eval_batch,
            cfg.bptt,
            handle,
            &mut *dist.collective,
        )?;
        let train_loss = st.epoch_loss_sum / st.epoch_words.max(1) as f64;
        let rec = EpochRecord {
            epoch: st.epoch + 1,
            step: st.step,
            lr: st.lr,
            train_loss,
            valid_loss: vl,
            valid_ppl: ppl(vl),
            seconds: epoch_t0.elapsed().as_secs_f64(),
        };
        if leader {
            tracing::info!(
                epoch = rec.epoch,
                train_ppl = format!("{:.2}", ppl(train_loss)),
                valid_ppl = format!("{:.2}", rec.valid_ppl),
                lr = st.lr,
                words_per_sec =
                    format!("{:.0}", st.epoch_words as f64 / epoch_train_secs.max(1e-9)),
                "epoch done"
            );
        }
        metrics.push(serde_json::json!({
            "kind": "valid", "step": st.step, "epoch": rec.epoch, "loss": vl, "ppl": rec.valid_ppl,
            "train_loss": train_loss, "lr": st.lr, "seconds": st.train_seconds,
        }));
        report.valid_ppl = rec.valid_ppl;
        report.epoch = rec.epoch;
        dist.control.report(&report);
        st.history.push(rec);
        if st.best_valid_loss.is_none_or(|b| vl < b) {
            st.best_valid_loss = Some(vl);
            st.best_params = Some(backend.params()?);
            st.best_cells = Some(backend.allocation()?);
            if leader {
                let dir = opts.out.join("best");
                let meta = save(&*backend, &st, 0, &dir, None, false)?;
                handle.block_on(checkpoint::commit(&dir, &meta, false))?;
            }
        } else if cfg.lr_schedule.is_empty() {
            st.lr /= cfg.lr_decay;
        }
        if cfg.realloc_after(st.epoch + 1, st.reallocations) {
            let ro = ReallocOptions {
                batch: b,
                bptt: cfg.bptt,
                max_table_bytes: (cfg.realloc_max_table_gib * (1u64 << 30) as f64) as u64,
                carry: cfg.realloc_carry.parse::<Carry>()?,
                check: cfg.realloc_check,
                move_cost: cfg.realloc_move_cost,
            };
            let rep = crate::realloc::reallocate(
                &mut *backend,
                &ds.train,
                &ro,
                handle,
                dist,
                st.reallocations + 1,
            )?;
            st.reallocations += 1;
            if leader {
                tracing::info!(
                    epoch = st.epoch + 1,
                    solver = %rep.solver,
                    objective_before = format!("{:.4}", rep.objective_before),
                    objective_after = format!("{:.4}", rep.objective_after),
                    lower_bound = format!("{:.4}", rep.lower_bound),
                    words_moved = rep.words_moved,
                    train_loss_after = ?rep.train_loss_after,
                    seconds = format!("{:.1}", rep.seconds_tables + rep.seconds_solve),
                    "reallocated"
                );
            }
            let mut line = serde_json::to_value(&rep).map_err(|e| Error::Data(e.to_string()))?;
            if let Some(o) = line.as_object_mut() {
                o.insert("kind".into(), "realloc".into());
                o.insert("step".into(), st.step.into());
                o.insert("epoch".into(), (st.epoch + 1).into());
                o.insert("round".into(), st.reallocations.into());
            }
            metrics.push(line);
        }
        st.epoch += 1;
        st.epoch_loss_sum = 0.0;
        st.epoch_words = 0;
        cursor = 0;
        checkpoint_now(&*backend, &st, 0, dist, &mut report)?;
        handle.block_on(metrics.flush(true))?;
        if cfg.max_steps > 0 && st.step >= cfg.max_steps {
            stopped_by = "max_steps";
            break;
        }
    }

    // Stopped inside an epoch: keep a checkpoint to continue from, and validate where we
    // are for the report. That validation does not enter the run's state (best model, lr
    // schedule), so stopping and resuming trains exactly as an uninterrupted run.
    win.fold_into(&mut st, &mut *dist.collective)?;
    let epochs_completed = st.history.len() as u64;
    let signalled = stopped_by == "signal";
    let partial = (stopped_by == "max_steps" || signalled) && st.epoch_words > 0;
    let train_loss = if st.epoch_words > 0 {
        st.epoch_loss_sum / st.epoch_words as f64
    } else {
        st.history.last().map_or(f64::NAN, |r| r.train_loss)
    };
    let mut valid_loss = st.best_valid_loss.unwrap_or(f64::INFINITY);
    let mut test_params = st.best_params.take().zip(st.best_cells.take());
    // A stop right after a periodic checkpoint finds this very step committed already.
    let committed_here = report.checkpoints > 0 && report.checkpoint_step == st.step;
    if signalled {
        // Preemption: the checkpoint is what matters inside the grace period; the
        // evaluations are left to the resumed run.
        if partial && !committed_here {
            checkpoint_now(&*backend, &st, cursor, dist, &mut report)?;
        }
        handle.block_on(metrics.flush(true))?;
    } else if partial {
        if !committed_here {
            checkpoint_now(&*backend, &st, cursor, dist, &mut report)?;
        }
        let (vl, _) = evaluate(
            &mut *backend,
            &ds.valid,
            cfg.eval_batch,
            cfg.bptt,
            handle,
            &mut *dist.collective,
        )?;
        metrics.push(serde_json::json!({
            "kind": "valid", "step": st.step, "epoch": st.epoch + 1, "loss": vl, "ppl": ppl(vl),
            "train_loss": train_loss, "lr": st.lr, "seconds": st.train_seconds, "partial_epoch": true,
        }));
        if vl < valid_loss {
            valid_loss = vl;
            test_params = None; // the current parameters
        }
    }
    let test_loss = if signalled {
        f64::NAN
    } else {
        if let Some((p, cells)) = &test_params {
            backend.set_params(p)?;
            backend.set_allocation(cells)?;
        }
        let (test_loss, _) = evaluate(
            &mut *backend,
            &ds.test,
            cfg.eval_batch,
            cfg.bptt,
            handle,
            &mut *dist.collective,
        )?;
        metrics.push(serde_json::json!({
            "kind": "test", "step": st.step, "epoch": st.epoch, "loss": test_loss, "ppl": ppl(test_loss),
            "seconds": st.train_seconds,
        }));
        handle.block_on(metrics.flush(true))?;
        test_loss
    };
    let summary = Summary {
        train_loss,
        train_ppl: ppl(train_loss),
        valid_loss,
        valid_ppl: ppl(valid_loss),
        test_loss,
        test_ppl: ppl(test_loss),
        words_per_sec: session_words as f64 / session_train_secs.max(1e-9),
        params: n_params,
        seconds: started.elapsed().as_secs_f64(),
        train_seconds: st.train_seconds,
        steps: st.step,
        epochs_completed,
        stopped_by: stopped_by.into(),
        vocab_size: vocab.len(),
        backend: backend.name(),
        world_size: world,
        control_seconds: dist.control.rpc_seconds(),
        config: cfg.clone(),
        history: st.history.clone(),
    };
    if leader {
        let json = serde_json::to_vec_pretty(&summary).map_err(|e| Error::Data(e.to_string()))?;
        handle.block_on(opts.out.put("summary.json", Bytes::from(json)))?;
    }
    // The model each rank ends with (the test evaluation may have loaded the best one).
    let final_sum = params_checksum(&backend.params()?);
    dist.control
        .finish(leader.then_some(&summary), &final_sum)?;
    Ok(summary)
}
