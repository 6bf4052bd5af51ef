//! The training loop of one rank: epochs of truncated-BPTT batches, gradient clipping,
//! the optimizer, validation with learning-rate decay on plateaus, metrics, checkpoints,
//! reallocation rounds, and the final test evaluation with the best model.
//!
//! A [`Trainer`] runs [`Trainer::run_epoch`] (the steps of one epoch from its cursor),
//! [`Trainer::end_epoch`] (validation, schedule, best model, reallocation, checkpoint)
//! until the run's budget is spent or a stop is requested, then [`Trainer::finish`]
//! (the stop's checkpoint, the last evaluations, the summary). Every rank of a job runs
//! the same calls in the same order: the collective's calls line up.
//!
//! The loop itself is synchronous (the backend owns the cores); object-storage I/O runs
//! on the tokio runtime behind `handle`, so call [`train`] from a thread that may block
//! (`spawn_blocking` or a plain thread), never from inside an async task.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use tokio::runtime::Handle;

use lightrnn_kernels::{
    Backend, BackendOptions, Batch, ModelConfig, ModelDims, Optimizer, Shard, State, StepFigures,
    Stream, open_backend,
};

use super::eval::evaluate_with;
use super::metrics::MetricsFile;
use super::options::RunOptions;
use super::progress::{Progress, Window};
use super::realloc::{ReallocOptions, reallocate};
use super::start::{self, LoopState};
use crate::auto::{AutoState, Budget, Decision, GUARD_FACTOR, Plan, Verdict, Watch};
use crate::checkpoint::{self, Meta, SaveRequest};
use crate::config::TrainConfig;
use crate::data::batches::Batches;
use crate::data::dataset::Dataset;
use crate::data::store::Location;
use crate::dist::collective::share;
use crate::dist::control::Dist;
use crate::dist::state::{concat_states, gather_state, params_checksum, slice_state};
use crate::report::{
    EpochRecord, MetricsLine, RankReport, ReallocLine, StoppedBy, Summary, TestLine, TrainLine,
    ValidLine, ppl,
};
use crate::{Error, Result};

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
/// run's objects (metrics, summary, best model, checkpoint objects); the job's owner
/// commits each checkpoint. A run that is already finished (resumed after its last step
/// or epoch) trains nothing and reports the summary it ended with.
pub fn train_rank(
    cfg: &TrainConfig,
    opts: &RunOptions,
    handle: &Handle,
    dist: &mut Dist,
) -> Result<Summary> {
    Trainer::new(cfg, opts, handle, dist)?.run()
}

/// This session's figures (a resumed run starts a new session).
struct Session {
    started: Instant,
    words: u64,
    train_seconds: f64,
}

/// One rank's training run; see the module docs for the order of its calls.
pub struct Trainer<'a> {
    cfg: &'a TrainConfig,
    opts: &'a RunOptions,
    handle: &'a Handle,
    dist: &'a mut Dist,
    ds: Dataset,
    dims: ModelDims,
    backend: Box<dyn Backend>,
    rule: Optimizer,
    /// Gradient groups on this rank.
    gpr: usize,
    st: LoopState,
    /// Stream position where the epoch in progress continues.
    cursor: u64,
    /// A resumed run's whole-batch carried state, until its epoch restarts the streams.
    resume_state: Option<State<f32>>,
    /// Step of the last checkpoint known committed (this session's, or the one resumed).
    committed: Option<u64>,
    metrics: MetricsFile,
    report: RankReport,
    win: Window,
    /// The batch buffer, [T + 1, B_rank] (reused).
    buf: Vec<u32>,
    session: Session,
}

/// How an epoch's steps ended.
enum EpochEnd {
    /// Its data ran out: the epoch-end work follows.
    Done {
        started: Instant,
        /// Seconds of its training steps (this session's).
        train_seconds: f64,
    },
    /// The run stops inside it.
    Stopped(StoppedBy),
}

impl<'a> Trainer<'a> {
    /// Check the job's shape, prepare the data, open the backend and restore the run's
    /// checkpoint when it continues one.
    pub fn new(
        cfg: &'a TrainConfig,
        opts: &'a RunOptions,
        handle: &'a Handle,
        dist: &'a mut Dist,
    ) -> Result<Self> {
        cfg.validate()?;
        let world = dist.world();
        cfg.check_world(world)?;
        let gpr = cfg.groups_for(world)? / world;
        let started = Instant::now();
        // A backend this build or machine cannot run fails before any data is read.
        if opts.open.is_none() {
            lightrnn_kernels::check_backend(opts.backend)?;
        }
        let ds = start::dataset(cfg, opts, handle)?;
        let resume = start::checkpoint_to_resume(opts, handle)?;
        let dims = ModelDims::square(ds.vocab.len(), cfg.emb, cfg.hidden, cfg.layers)?;
        let mcfg = ModelConfig {
            dims,
            dropout: cfg.dropout,
            seed: cfg.seed,
        };
        let mut backend = match opts.open {
            Some(open) => open(&mcfg)?,
            None => open_backend(
                &BackendOptions::new(opts.backend, cfg.threads).with_graphs(cfg.cuda_graphs),
                &mcfg,
            )?,
        };
        let (st, cursor, resume_state, committed) = match resume {
            Some(ck) => {
                let step = ck.meta.step;
                let r = start::restore(ck, cfg, &ds, &mut *backend, opts, handle)?;
                (r.st, r.cursor, r.state, Some(step))
            }
            None => (LoopState::new(cfg), 0, None, None),
        };
        let leader = dist.is_leader();
        let metrics = handle.block_on(MetricsFile::open(
            &opts.out,
            (st.step > 0).then_some(st.step),
            leader,
        ))?;
        tracing::info!(
            backend = %backend.name(),
            params = backend.layout().total,
            vocab = dims.vocab,
            table = format!("{} x {}", dims.rows, dims.cols),
            emb = dims.emb,
            hidden = dims.hidden,
            layers = dims.layers,
            rank = dist.rank(),
            world,
            "model ready"
        );
        Ok(Self {
            cfg,
            opts,
            handle,
            rule: cfg.optimizer_rule()?,
            ds,
            dims,
            backend,
            gpr,
            st,
            cursor,
            resume_state,
            committed,
            metrics,
            report: RankReport::default(),
            win: Window::default(),
            buf: Vec::new(),
            session: Session {
                started,
                words: 0,
                train_seconds: 0.0,
            },
            dist,
        })
    }

    /// Train until the budget is spent or a stop is requested; the run's summary.
    pub fn run(mut self) -> Result<Summary> {
        if let Some(done) = self.finished() {
            return self.report_finished(done);
        }
        if self.dist.is_leader() {
            self.handle.block_on(
                self.opts
                    .out
                    .put("config.toml", Bytes::from(self.cfg.to_toml())),
            )?;
        }
        if self.st.realloc_pending {
            // Resumed from the checkpoint of an epoch whose round had not completed:
            // the round's line of an earlier attempt gives way to this one's.
            tracing::info!(
                step = self.st.step,
                "running the reallocation round the checkpoint left pending"
            );
            self.metrics.drop_realloc_at(self.st.step);
            self.reallocation_round()?;
            self.handle.block_on(self.metrics.flush(true))?;
        }
        let stopped = loop {
            if self.cfg.epochs > 0 && self.st.epoch >= self.cfg.epochs {
                break StoppedBy::Epochs;
            }
            match self.run_epoch()? {
                EpochEnd::Stopped(why) => break why,
                EpochEnd::Done {
                    started,
                    train_seconds,
                } => self.end_epoch(started, train_seconds)?,
            }
            if self.cfg.max_steps > 0 && self.st.step >= self.cfg.max_steps {
                break StoppedBy::MaxSteps;
            }
        };
        self.finish(stopped)
    }

    /// Whether the resumed run had spent its budget already.
    fn finished(&self) -> Option<StoppedBy> {
        if self.st.step == 0 {
            return None;
        }
        if self.cfg.max_steps > 0 && self.st.step >= self.cfg.max_steps {
            return Some(StoppedBy::MaxSteps);
        }
        (self.cfg.epochs > 0 && self.st.epoch >= self.cfg.epochs).then_some(StoppedBy::Epochs)
    }

    /// A finished run resumed again: its summary as it ended (summary.json), or, when it
    /// stopped before writing one, its last evaluations now; nothing is trained. Every
    /// rank takes the same path: the stored summary only when all ranks read it.
    fn report_finished(self, done: StoppedBy) -> Result<Summary> {
        let stored = match self.handle.block_on(self.opts.out.get("summary.json")) {
            Ok(b) => serde_json::from_slice::<Summary>(&b)
                .ok()
                .filter(|s| s.steps == self.st.step),
            Err(Error::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let mut have = [f32::from(stored.is_some())];
        if self.dist.world() > 1 {
            self.dist.collective.all_reduce_sum(&mut have)?;
        }
        let summary = match stored {
            Some(s) if have[0] as usize == self.dist.world() => s,
            _ => {
                tracing::info!(step = self.st.step, "the run is finished: evaluating it");
                return self.finish(done);
            }
        };
        if self.dist.is_leader() {
            tracing::info!(step = summary.steps, stopped_by = summary.stopped_by.name(), out = %self.opts.out, "the run is finished: nothing to train");
        }
        // The checksum of the model in the checkpoint (every rank loaded the same).
        let sum = params_checksum(&self.backend.params()?);
        let leader = self.dist.is_leader();
        self.dist.control.finish(leader.then_some(&summary), &sum)?;
        Ok(summary)
    }

    /// The steps of the current epoch from its cursor.
    fn run_epoch(&mut self) -> Result<EpochEnd> {
        let (b, bptt) = (self.cfg.batch, self.cfg.bptt);
        let (rank, world) = (self.dist.rank(), self.dist.world());
        let leased = self.dist.control.lease(self.st.epoch, b, self.cursor)?;
        // Checkpoint states and loss tables assume this split.
        if leased != share(b, world, rank) {
            return Err(Error::Config(format!(
                "leased streams {leased:?} are not rank {rank}'s share {:?} of the batch of {b}",
                share(b, world, rank)
            )));
        }
        let mine = leased;
        let mut batches = Batches::streams(
            self.ds.train.clone(),
            self.handle.clone(),
            b,
            mine.clone(),
            bptt,
            self.cursor,
        )?;
        self.start_streams(&mine)?;
        if let Some(lr) = self.cfg.scheduled_lr(self.st.epoch) {
            self.st.lr = lr;
        }
        let per_pass = batches.steps_per_pass();
        let mut pass_step = self.cursor.div_ceil(bptt as u64);
        // The bar ends where this epoch's training will: at the pass's end, or earlier
        // where max_steps ends the run.
        let bar_len = if self.cfg.max_steps > 0 {
            per_pass.min(pass_step + self.cfg.max_steps.saturating_sub(self.st.step))
        } else {
            per_pass
        };
        let bar = Progress::new(
            self.opts.progress && self.dist.is_leader(),
            bar_len,
            pass_step,
            self.st.epoch,
            self.cfg.epochs,
        );
        let cursor0 = self.cursor;
        let (started, mut train_seconds) = (Instant::now(), 0.0);
        while let Some((dt, norm)) = self.step(&mut batches, mine.len())? {
            pass_step += 1;
            train_seconds += dt;
            if self.st.step.is_multiple_of(self.cfg.log_every) {
                self.log_window(norm, &bar, pass_step, per_pass)?;
            } else if self.opts.progress && pass_step.is_multiple_of(10) {
                bar.update(pass_step, String::new());
            }
            let at_limit = self.cfg.max_steps > 0 && self.st.step >= self.cfg.max_steps;
            // The epoch's last batch gets its checkpoint at the epoch's end, at this step.
            if self.cfg.checkpoint_every > 0
                && self.st.step.is_multiple_of(self.cfg.checkpoint_every)
                && !at_limit
                && !batches.exhausted()
            {
                self.fold_window()?;
                self.checkpoint(batches.position())?;
            }
            let stop = if at_limit {
                Some(StoppedBy::MaxSteps)
            } else {
                self.stop_requested()?.then_some(StoppedBy::Signal)
            };
            if let Some(why) = stop {
                self.cursor = batches.position();
                bar.finish();
                return Ok(EpochEnd::Stopped(why));
            }
        }
        bar.finish();
        self.fold_window()?;
        // Every rank has consumed its lease: (positions moved) x (its streams).
        let consumed = (batches.position() - cursor0) * mine.len() as u64;
        self.dist.control.epoch_done(self.st.epoch, consumed)?;
        Ok(EpochEnd::Done {
            started,
            train_seconds,
        })
    }

    /// The carried states at the start of an epoch's steps: zeros for a new epoch, the
    /// checkpoint's streams for one resumed inside.
    fn start_streams(&mut self, mine: &std::ops::Range<usize>) -> Result<()> {
        let (gpr, d) = (self.gpr, self.dims);
        let gsize = mine.len() / gpr;
        self.backend.set_shard(Shard {
            offset: mine.start,
            global: self.cfg.batch,
            groups: gpr,
        })?;
        if self.cursor == 0 {
            for g in 0..gpr {
                self.backend.reset_state(Stream::Train(g as u32));
            }
        }
        // A checkpoint taken at an epoch's end (cursor 0) holds the state the streams
        // ended with; the next epoch starts from zeros, as an uninterrupted run does.
        if let Some(whole) = self.resume_state.take()
            && self.cursor > 0
        {
            for g in 0..gpr {
                let first = mine.start + g * gsize;
                let part = slice_state(&whole, first..first + gsize, d.layers, d.hidden)?;
                self.backend.set_state(Stream::Train(g as u32), part)?;
            }
        }
        Ok(())
    }

    /// One optimizer step on the next batch: its training seconds and gradient norm, or
    /// None at the end of the epoch's data.
    fn step(&mut self, batches: &mut Batches, bl: usize) -> Result<Option<(f64, f64)>> {
        let t0 = Instant::now();
        let Some(t) = batches.next_batch(&mut self.buf)? else {
            return Ok(None);
        };
        // Gradients of the mean over the whole batch's words: each group scales its sum
        // by the global count, so the all-reduced sum is the global mean.
        let words = (t * self.cfg.batch) as u64;
        let batch = Batch {
            inputs: &self.buf[..t * bl],
            targets: &self.buf[bl..],
            steps: t,
            batch: bl,
            stream: Stream::Train(0),
        };
        self.backend
            .train_step(&batch, self.st.step, 1.0 / words as f32)?;
        if self.dist.world() > 1 {
            self.backend.all_reduce_grads(&mut *self.dist.collective)?;
        }
        // The step's one read-back: its losses and the gradient norm together.
        let StepFigures { loss, norm } =
            self.backend
                .clip_and_step(&self.rule, self.st.lr, self.cfg.clip)?;
        // The norm is the same on every rank (NaN wherever any rank's loss is not
        // finite): all ranks decide alike and stop together, with no update applied.
        if !norm.is_finite() {
            return Err(Error::Diverged(format!(
                "training loss is {} (gradient norm {norm}) at step {} (lr {}): lower lr or clip",
                loss.total(),
                self.st.step + 1,
                self.st.lr
            )));
        }
        self.st.step += 1;
        let dt = t0.elapsed().as_secs_f64();
        self.st.train_seconds += dt;
        self.session.train_seconds += dt;
        self.session.words += words;
        self.win.loss += loss.total();
        self.win.words += loss.words;
        self.win.secs += dt;
        self.dist
            .control
            .progress(self.st.step, self.st.epoch, batches.position())?;
        Ok(Some((dt, norm)))
    }

    /// The job's figures of the window, added to the epoch's running sums.
    fn fold_window(&mut self) -> Result<(f64, u64)> {
        let (l, w) = self.win.reduce(&mut *self.dist.collective)?;
        self.st.epoch_loss_sum += l;
        self.st.epoch_words += w;
        Ok((l, w))
    }

    /// A logging point: the window's figures to the metrics, the job's owner and the
    /// terminal or the log.
    fn log_window(
        &mut self,
        norm: f64,
        bar: &Progress,
        pass_step: u64,
        per_pass: u64,
    ) -> Result<()> {
        let mine = self.win.words;
        let (wl, ww) = self.fold_window()?;
        let l = wl / ww.max(1) as f64;
        let secs = self.win.secs.max(1e-9);
        let wps = ww as f64 / secs;
        let r = &mut self.report;
        r.step = self.st.step;
        r.epoch = self.st.epoch;
        r.loss = l;
        r.words_per_sec = mine as f64 / secs;
        r.global_words_per_sec = wps;
        r.lr = self.st.lr;
        self.dist.control.report(&self.report);
        self.win.secs = 0.0;
        self.metrics.push(&MetricsLine::Train(TrainLine {
            step: self.st.step,
            epoch: self.st.epoch + 1,
            loss: l,
            ppl: ppl(l),
            words_per_sec: wps,
            lr: self.st.lr,
            grad_norm: norm,
            seconds: self.st.train_seconds,
        }))?;
        let leader = self.dist.is_leader();
        if self.opts.progress && leader {
            bar.update(
                pass_step,
                format!(
                    "loss {l:.3} ppl {:.1} {:.0} w/s lr {}",
                    ppl(l),
                    wps,
                    self.st.lr
                ),
            );
        } else if leader {
            tracing::info!(
                step = self.st.step,
                epoch = self.st.epoch + 1,
                progress = format!("{pass_step}/{per_pass}"),
                loss = format!("{l:.4}"),
                ppl = format!("{:.2}", ppl(l)),
                words_per_sec = format!("{wps:.0}"),
                lr = self.st.lr,
                "train"
            );
        }
        self.handle.block_on(self.metrics.flush(false))
    }

    /// Whether a stop was requested (SIGTERM, or the coordinator's) on any rank: all of
    /// them then stop after this same step.
    fn stop_requested(&mut self) -> Result<bool> {
        let Some(flag) = &self.opts.stop else {
            return Ok(false);
        };
        let mut want = [f32::from(flag.load(Ordering::Relaxed))];
        if self.dist.world() > 1 {
            self.dist.collective.all_reduce_sum(&mut want)?;
        }
        if want[0] > 0.0 && self.dist.is_leader() {
            tracing::warn!(step = self.st.step, "stop requested: checkpointing here");
        }
        Ok(want[0] > 0.0)
    }

    /// The end of an epoch: validation, the learning-rate schedule, the best model, a
    /// reallocation round when one is due, the epoch's checkpoint.
    fn end_epoch(&mut self, started: Instant, train_seconds: f64) -> Result<()> {
        let vl = self.evaluate_split(Split::Valid)?;
        let st = &mut self.st;
        let train_loss = st.epoch_loss_sum / st.epoch_words.max(1) as f64;
        let rec = EpochRecord {
            epoch: st.epoch + 1,
            step: st.step,
            lr: st.lr,
            train_loss,
            valid_loss: vl,
            valid_ppl: ppl(vl),
            seconds: started.elapsed().as_secs_f64(),
        };
        if self.dist.is_leader() {
            tracing::info!(
                epoch = rec.epoch,
                train_ppl = format!("{:.2}", ppl(train_loss)),
                valid_ppl = format!("{:.2}", rec.valid_ppl),
                lr = st.lr,
                words_per_sec = format!("{:.0}", st.epoch_words as f64 / train_seconds.max(1e-9)),
                "epoch done"
            );
        }
        self.metrics.push(&MetricsLine::Valid(ValidLine {
            step: st.step,
            epoch: rec.epoch,
            loss: vl,
            ppl: rec.valid_ppl,
            train_loss,
            lr: st.lr,
            seconds: st.train_seconds,
            partial_epoch: false,
        }))?;
        self.report.valid_ppl = rec.valid_ppl;
        self.report.epoch = rec.epoch;
        self.dist.control.report(&self.report);
        self.st.history.push(rec);
        if self.st.best_valid_loss.is_none_or(|b| vl < b) {
            self.save_best(vl)?;
        } else if self.cfg.lr_schedule.is_empty() {
            self.st.lr /= self.cfg.lr_decay;
        }
        self.st.realloc_pending = self
            .cfg
            .realloc_after(self.st.epoch + 1, self.st.reallocations);
        self.st.epoch += 1;
        if let Some(auto) = &mut self.st.auto {
            auto.observe(self.st.epoch, vl);
            if let Some(w) = auto.overdue(self.st.epoch) {
                self.revert_move(w, vl)?;
            }
        }
        if self.st.realloc_pending
            && let Some(auto) = &self.st.auto
            && let Plan::Skip(why) = auto.plan(&self.budget())
        {
            self.st.realloc_pending = false;
            self.record_skip(why)?;
        }
        self.st.epoch_loss_sum = 0.0;
        self.st.epoch_words = 0;
        self.cursor = 0;
        // The epoch is committed before its reallocation round: a round that fails (out
        // of memory, a solver error, a lost rank) leaves a checkpoint that --resume
        // continues, running the round first.
        self.checkpoint(0)?;
        self.handle.block_on(self.metrics.flush(true))?;
        if self.st.realloc_pending {
            self.reallocation_round()?;
            self.handle.block_on(self.metrics.flush(true))?;
        }
        Ok(())
    }

    /// The model after this epoch is the best so far: keep it (and, on the leader, in
    /// `out/best`, which the test score uses).
    fn save_best(&mut self, valid_loss: f64) -> Result<()> {
        self.st.best_valid_loss = Some(valid_loss);
        self.st.best_params = Some(self.backend.params()?);
        self.st.best_cells = Some(self.backend.allocation()?);
        if self.dist.is_leader() {
            let dir = self.opts.out.join("best");
            let meta = self.save(0, &dir, None, false)?;
            self.handle
                .block_on(checkpoint::commit(&dir, &meta, false))?;
        }
        Ok(())
    }

    /// Where the run stands for the automatic reallocation, after `st.epoch` epochs:
    /// the epochs its budget has left (the smaller of what `epochs` and `max_steps`
    /// leave, steps counted in this run's epochs) and the next epoch's learning rate.
    fn budget(&self) -> Budget {
        let (cfg, st) = (self.cfg, &self.st);
        let mut left = f64::INFINITY;
        if cfg.epochs > 0 {
            left = cfg.epochs.saturating_sub(st.epoch) as f64;
        }
        if cfg.max_steps > 0 && st.epoch > 0 {
            let per_epoch = st.step as f64 / st.epoch as f64;
            left = left.min(cfg.max_steps.saturating_sub(st.step) as f64 / per_epoch.max(1.0));
        }
        let ahead = if cfg.lr_schedule.is_empty() || !left.is_finite() {
            Vec::new()
        } else {
            (st.epoch..st.epoch + left.ceil() as u64)
                .filter_map(|e| cfg.scheduled_lr(e))
                .collect()
        };
        Budget {
            epoch: st.epoch,
            epochs_left: left,
            lr_next: cfg.scheduled_lr(st.epoch).unwrap_or(st.lr),
            lr_ahead: ahead,
        }
    }

    /// The guard ([`super::auto`]): the kept move watched in `w` has not brought the
    /// validation loss back to its level by its deadline (`valid_loss` after this
    /// epoch), so every rank goes back to the best model so far (parameters and
    /// allocation: no epoch since the move has beaten the level before it, so this is
    /// the model before the move or an earlier, better one). Logged, and a `realloc`
    /// line with the words that went back.
    fn revert_move(&mut self, w: Watch, valid_loss: f64) -> Result<()> {
        let (Some(params), Some(cells)) = (&self.st.best_params, &self.st.best_cells) else {
            return Err(Error::Checkpoint {
                url: self.opts.out.join("best").to_string(),
                msg: "automatic reallocation: a move to undo, and no best model to go back to"
                    .into(),
            });
        };
        let now = self.backend.allocation()?;
        let words_moved = now.iter().zip(cells).filter(|(a, b)| a != b).count();
        self.backend.set_params(params)?;
        self.backend.set_allocation(cells)?;
        let b = self.budget();
        let best = self.st.best_valid_loss.unwrap_or(f64::NAN);
        let back_to = self
            .st
            .history
            .iter()
            .find(|r| Some(r.valid_loss) == self.st.best_valid_loss)
            .map_or(0, |r| r.epoch);
        let Some(auto) = &mut self.st.auto else {
            return Ok(());
        };
        let expected = w
            .expected_recovery
            .unwrap_or(crate::auto::PRIOR_RECOVERY_EPOCHS);
        let realized = auto.reverted(valid_loss);
        let d = Decision {
            epoch: b.epoch,
            decision: Verdict::Revert,
            why: format!(
                "validation loss {valid_loss:.4} after epoch {}, {} epochs after the move after epoch {}, still above its {:.4} before the move (expected recovery {expected:.2} epochs, {GUARD_FACTOR} x allowed): back to the best model, epoch {back_to}'s (validation loss {best:.4})",
                b.epoch,
                b.epoch.saturating_sub(w.epoch),
                w.epoch,
                w.valid_loss,
            ),
            epochs_left: b.epochs_left,
            recovery_epochs: expected,
            payoff_epochs: f64::NAN,
            move_cost: f64::NAN,
            realized,
            predicted_gain: w.gain,
            disruption: f64::NAN,
            moved_share: f64::NAN,
            words_moved,
        };
        auto.decisions.push(d.clone());
        if self.dist.is_leader() {
            tracing::warn!(epoch = b.epoch, words_moved, why = %d.why, "automatic reallocation: move undone");
        }
        let report = lightrnn_alloc::Report {
            words_moved,
            ..lightrnn_alloc::Report::unmeasured()
        };
        self.metrics.push(&MetricsLine::Realloc(ReallocLine {
            step: self.st.step,
            epoch: self.st.epoch,
            round: self.st.reallocations,
            report,
            auto: Some(Box::new(d)),
        }))
    }

    /// An automatic round skipped before its tables pass: logged, and a `realloc` line
    /// that says why.
    fn record_skip(&mut self, why: String) -> Result<()> {
        let b = self.budget();
        let Some(auto) = &mut self.st.auto else {
            return Ok(());
        };
        let d = Decision {
            epoch: b.epoch,
            decision: Verdict::Skip,
            why,
            epochs_left: b.epochs_left,
            recovery_epochs: auto.recovery_epochs(b.lr_next),
            payoff_epochs: f64::NAN,
            move_cost: f64::NAN,
            realized: auto.realized.unwrap_or(1.0),
            predicted_gain: f64::NAN,
            disruption: f64::NAN,
            moved_share: 0.0,
            words_moved: 0,
        };
        auto.decisions.push(d.clone());
        if self.dist.is_leader() {
            tracing::info!(epoch = b.epoch, why = %d.why, "automatic reallocation: no round");
        }
        self.metrics.push(&MetricsLine::Realloc(ReallocLine {
            step: self.st.step,
            epoch: self.st.epoch,
            round: self.st.reallocations,
            report: lightrnn_alloc::Report::unmeasured(),
            auto: Some(Box::new(d)),
        }))
    }

    /// The reallocation round after the epoch just finished (`st.epoch` epochs done),
    /// recorded in the metrics. With `realloc_every = "auto"` the rule prices the moves,
    /// measures the moved model and keeps the move only where it pays ([`super::auto`]).
    fn reallocation_round(&mut self) -> Result<()> {
        let cfg = self.cfg;
        let budget = self.budget();
        let plan = self.st.auto.as_ref().map(|a| a.plan(&budget));
        let (move_cost, recovery, payoff, realized) = match &plan {
            None => (cfg.realloc_move_cost, f64::NAN, f64::NAN, f64::NAN),
            Some(Plan::Run {
                move_cost,
                recovery_epochs,
                payoff_epochs,
                realized,
            }) => (*move_cost, *recovery_epochs, *payoff_epochs, *realized),
            // End-of-epoch planning left only rounds that run, and a resumed round plans
            // from the same checkpointed state; a skip here is still recorded, not run.
            Some(Plan::Skip(why)) => {
                let why = why.clone();
                self.st.realloc_pending = false;
                return self.record_skip(why);
            }
        };
        let auto = plan.is_some();
        let ro = ReallocOptions {
            batch: cfg.batch,
            bptt: cfg.bptt,
            max_table_bytes: cfg.realloc_max_table_bytes(),
            sparse_k: {
                let d = self.backend.dims();
                cfg.realloc_sparse_k(d.vocab, d.rows, d.cols)
            },
            carry: cfg.realloc_carry,
            check: cfg.realloc_check || auto,
            move_cost,
            undoable: auto,
        };
        let moved = reallocate(
            &mut *self.backend,
            &self.ds.train,
            &ro,
            self.handle,
            self.dist,
            self.st.reallocations + 1,
        )?;
        self.st.reallocations += 1;
        self.st.realloc_pending = false;
        let rep = moved.report;
        let decision = match &mut self.st.auto {
            None => None,
            Some(state) => {
                let gain = rep.objective_before - rep.objective_after;
                let disruption = rep.train_loss_after.unwrap_or(f64::NAN) - rep.objective_after;
                let keep = rep.words_moved > 0
                    && AutoState::keeps(recovery, payoff, realized, gain, disruption);
                let why = if rep.words_moved == 0 {
                    "the solver found nothing that pays for its move".to_string()
                } else {
                    format!(
                        "{realized:.4} of gain {gain:.4} x {payoff:.2} epochs at a lower rate after recovery {} disruption {disruption:.4} x {recovery:.2} epochs of recovery / 2",
                        if keep { ">" } else { "<=" }
                    )
                };
                if keep {
                    let valid = self.st.history.last().map_or(f64::NAN, |r| r.valid_loss);
                    state.moved(&budget, valid, gain, disruption, moved.moved_share);
                } else if let Some(undo) = moved.undo {
                    undo.apply(&mut *self.backend)?;
                }
                let d = Decision {
                    epoch: budget.epoch,
                    decision: match (keep, rep.words_moved) {
                        (true, _) => Verdict::Move,
                        (false, 0) => Verdict::Keep,
                        (false, _) => Verdict::Undo,
                    },
                    why,
                    epochs_left: budget.epochs_left,
                    recovery_epochs: recovery,
                    payoff_epochs: payoff,
                    move_cost,
                    realized,
                    predicted_gain: gain,
                    disruption,
                    moved_share: moved.moved_share,
                    words_moved: rep.words_moved,
                };
                state.decisions.push(d.clone());
                Some(d)
            }
        };
        if self.dist.is_leader() {
            tracing::info!(
                epoch = self.st.epoch,
                solver = %rep.solver,
                objective_before = format!("{:.4}", rep.objective_before),
                objective_after = format!("{:.4}", rep.objective_after),
                lower_bound = format!("{:.4}", rep.lower_bound),
                words_moved = rep.words_moved,
                train_loss_after = ?rep.train_loss_after,
                seconds = format!("{:.1}", rep.seconds_tables + rep.seconds_solve),
                "reallocated"
            );
            if let Some(d) = &decision {
                tracing::info!(
                    epoch = d.epoch,
                    decision = ?d.decision,
                    why = %d.why,
                    move_cost = d.move_cost,
                    "automatic reallocation"
                );
            }
        }
        self.metrics.push(&MetricsLine::Realloc(ReallocLine {
            step: self.st.step,
            epoch: self.st.epoch,
            round: self.st.reallocations,
            report: rep,
            auto: decision.map(Box::new),
        }))
    }

    /// Mean loss per word of a split (every rank gets the same).
    fn evaluate_split(&mut self, split: Split) -> Result<f64> {
        let (reader, name) = match split {
            Split::Valid => (&self.ds.valid, "validation"),
            Split::Test => (&self.ds.test, "test"),
        };
        let leader = self.dist.is_leader();
        if leader {
            tracing::info!(split = name, words = reader.tokens(), "evaluating");
        }
        let (b, bptt) = (self.cfg.eval_batch, self.cfg.bptt as u64);
        let steps = (reader.tokens() / b.max(1) as u64)
            .saturating_sub(1)
            .div_ceil(bptt);
        let bar = Progress::titled(self.opts.progress && leader, steps, name);
        let (loss, _) = evaluate_with(
            &mut *self.backend,
            reader,
            b,
            self.cfg.bptt,
            self.handle,
            &mut *self.dist.collective,
            &mut |k| {
                if k.is_multiple_of(10) {
                    bar.update(k, String::new());
                }
            },
        )?;
        bar.finish();
        Ok(loss)
    }

    /// Write a checkpoint's objects into `dir` and return its manifest (not committed).
    fn save(
        &self,
        cursor: u64,
        dir: &Location,
        state: Option<&State<f32>>,
        with_train_state: bool,
    ) -> Result<Meta> {
        let (cfg, st, vocab) = (self.cfg, &self.st, &self.ds.vocab);
        let meta = Meta {
            format: checkpoint::FORMAT.into(),
            version: 1,
            step: st.step,
            epoch: st.epoch,
            cursor,
            config: cfg.clone(),
            dims: self.dims,
            vocab_size: vocab.len(),
            vocab_sha256: vocab.sha256(),
            rng_seed: cfg.seed,
            optimizer: with_train_state.then_some(self.rule),
            optimizer_updates: if with_train_state { st.step } else { 0 },
            lr: st.lr,
            best_valid_loss: st.best_valid_loss,
            epoch_loss_sum: st.epoch_loss_sum,
            epoch_words: st.epoch_words,
            seconds: st.train_seconds,
            history: st.history.clone(),
            reallocations: st.reallocations,
            realloc_pending: with_train_state && st.realloc_pending,
            auto_realloc: st.auto.clone(),
            files: vec![],
        };
        let params = self.backend.params()?;
        let cells = self.backend.allocation()?;
        let opt = if with_train_state {
            self.backend.optimizer_state()?
        } else {
            None
        };
        let req = SaveRequest {
            meta,
            vocab,
            layout: self.backend.layout(),
            params: &params,
            cells: &cells,
            optimizer: opt.as_ref(),
            state,
        };
        self.handle.block_on(checkpoint::write_objects(dir, req))
    }

    /// A checkpoint at this step, every rank at the same step: the carried state is
    /// gathered from all ranks, rank 0 writes the objects, the job's owner commits the
    /// manifest once all ranks are there.
    fn checkpoint(&mut self, cursor: u64) -> Result<()> {
        let t = Instant::now();
        let (d, leader) = (self.dims, self.dist.is_leader());
        let dir = self
            .opts
            .out
            .join("checkpoints")
            .join(&checkpoint::dir_name(self.st.step));
        let parts: Option<Vec<_>> = (0..self.gpr)
            .map(|g| self.backend.state(Stream::Train(g as u32)))
            .collect::<lightrnn_kernels::Result<Vec<_>>>()?
            .into_iter()
            .collect();
        let local = parts.map(|p| concat_states(&p, d.layers, d.hidden));
        let state = gather_state(
            &mut *self.dist.collective,
            local.as_ref(),
            self.cfg.batch,
            d.layers,
            d.hidden,
        )?;
        let meta = if leader {
            Some(self.save(cursor, &dir, state.as_ref(), true)?)
        } else {
            None
        };
        let sum = params_checksum(&self.backend.params()?);
        self.dist
            .control
            .commit(self.st.step, &dir, meta.as_ref(), &sum)?;
        self.committed = Some(self.st.step);
        let r = &mut self.report;
        r.step = self.st.step;
        r.checkpoint_step = self.st.step;
        r.checkpoint_seconds = t.elapsed().as_secs_f64();
        r.checkpoint_bytes = meta
            .as_ref()
            .map_or(0, |m| m.files.iter().map(|f| f.bytes).sum());
        r.checkpoints += 1;
        self.dist.control.report(&self.report);
        if leader {
            self.handle.block_on(checkpoint::prune(
                &self.opts.out,
                self.cfg.keep_checkpoints,
                self.cfg.keep_every,
            ))?;
            tracing::info!(step = self.st.step, dir = %dir, seconds = t.elapsed().as_secs_f64(), "checkpoint written");
        }
        Ok(())
    }

    /// The end of the run: a stop inside an epoch keeps a checkpoint to continue from and
    /// validates where it is for the report (that validation does not enter the run's
    /// state: best model, lr schedule, so stopping and resuming trains exactly as an
    /// uninterrupted run); the test score of the best model; the summary.
    fn finish(mut self, stopped: StoppedBy) -> Result<Summary> {
        self.fold_window()?;
        let signalled = stopped == StoppedBy::Signal;
        let partial = stopped != StoppedBy::Epochs && self.st.epoch_words > 0;
        let train_loss = if self.st.epoch_words > 0 {
            self.st.epoch_loss_sum / self.st.epoch_words as f64
        } else {
            self.st.history.last().map_or(f64::NAN, |r| r.train_loss)
        };
        let mut valid_loss = self.st.best_valid_loss.unwrap_or(f64::INFINITY);
        let mut test_params = self.st.best_params.take().zip(self.st.best_cells.take());
        // A stop right after a periodic checkpoint finds this very step committed already.
        let committed_here = self.committed == Some(self.st.step);
        if partial && !committed_here {
            self.checkpoint(self.cursor)?;
        }
        if signalled {
            // Preemption: the checkpoint is what matters inside the grace period; the
            // evaluations are left to the resumed run.
            self.handle.block_on(self.metrics.flush(true))?;
        } else if partial {
            let vl = self.evaluate_split(Split::Valid)?;
            if self.st.best_valid_loss.is_none_or(|b| vl < b) {
                // The best model so far: in out/best like an epoch's (eval and sample
                // read it), also for a run that max_steps ends inside its first epoch.
                self.save_best(vl)?;
            }
            self.metrics.push(&MetricsLine::Valid(ValidLine {
                step: self.st.step,
                epoch: self.st.epoch + 1,
                loss: vl,
                ppl: ppl(vl),
                train_loss,
                lr: self.st.lr,
                seconds: self.st.train_seconds,
                partial_epoch: true,
            }))?;
            if vl < valid_loss {
                valid_loss = vl;
                test_params = None; // the current parameters
            }
        }
        let test_loss = if signalled {
            f64::NAN
        } else {
            if let Some((p, cells)) = &test_params {
                self.backend.set_params(p)?;
                self.backend.set_allocation(cells)?;
            }
            let tl = self.evaluate_split(Split::Test)?;
            self.metrics.push(&MetricsLine::Test(TestLine {
                step: self.st.step,
                epoch: self.st.epoch,
                loss: tl,
                ppl: ppl(tl),
                seconds: self.st.train_seconds,
            }))?;
            self.handle.block_on(self.metrics.flush(true))?;
            tl
        };
        let summary = self.summary(stopped, train_loss, valid_loss, test_loss);
        let leader = self.dist.is_leader();
        if leader {
            let json =
                serde_json::to_vec_pretty(&summary).map_err(|e| Error::Data(e.to_string()))?;
            self.handle
                .block_on(self.opts.out.put("summary.json", Bytes::from(json)))?;
        }
        // The model each rank ends with (the test evaluation may have loaded the best one).
        let sum = params_checksum(&self.backend.params()?);
        self.dist.control.finish(leader.then_some(&summary), &sum)?;
        Ok(summary)
    }

    fn summary(
        &self,
        stopped: StoppedBy,
        train_loss: f64,
        valid_loss: f64,
        test_loss: f64,
    ) -> Summary {
        Summary {
            train_loss,
            train_ppl: ppl(train_loss),
            valid_loss,
            valid_ppl: ppl(valid_loss),
            test_loss,
            test_ppl: ppl(test_loss),
            words_per_sec: self.session.words as f64 / self.session.train_seconds.max(1e-9),
            params: self.backend.layout().total,
            seconds: self.session.started.elapsed().as_secs_f64(),
            train_seconds: self.st.train_seconds,
            steps: self.st.step,
            epochs_completed: self.st.history.len() as u64,
            stopped_by: stopped,
            vocab_size: self.ds.vocab.len(),
            backend: self.backend.name(),
            world_size: self.dist.world(),
            control_seconds: self.dist.control.rpc_seconds(),
            config: self.cfg.clone(),
            history: self.st.history.clone(),
            auto_realloc: self.st.auto.clone(),
        }
    }
}

/// An evaluation split.
#[derive(Clone, Copy)]
enum Split {
    Valid,
    Test,
}
