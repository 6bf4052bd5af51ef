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
//! The loop is here; the parts it calls on are beside it: `run.rs` (what they all
//! share), `checkpointing.rs`, `policy.rs` (the reallocation rounds and the automatic
//! rule), `finish.rs` (the end of the run, the summary).
//!
//! The loop itself is synchronous (the backend owns the cores); object-storage I/O runs
//! on the tokio runtime behind `handle`, so call [`train`] from a thread that may block
//! (`spawn_blocking` or a plain thread), never from inside an async task.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use tokio::runtime::Handle;

use lightrnn_kernels::{
    BackendOptions, Batch, ModelConfig, ModelDims, Phase, Shard, State, StepFigures, Stream,
    open_backend,
};

use super::checkpointing::{Checkpointing, save_best};
use super::finish::{self, Session};
use super::metrics::MetricsFile;
use super::options::RunOptions;
use super::policy::Policy;
use super::profiling::Profiling;
use super::progress::{Progress, Window};
use super::run::{Model, Run, Split};
use super::start::{self, LoopState};
use crate::dist::control::Dist;
use crate::dist::state::slice_state;
use lightrnn_core::config::TrainConfig;
use lightrnn_core::data::batches::Batches;
use lightrnn_core::report::{
    EpochRecord, MetricsLine, RankReport, StoppedBy, Summary, TrainLine, ValidLine, ppl,
};
use lightrnn_core::util::share;
use lightrnn_core::{Error, Result};
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

/// Where the epoch in progress stands.
struct Position {
    /// Stream position where the epoch in progress continues.
    cursor: u64,
    /// A resumed run's whole-batch carried state, until its epoch restarts the streams.
    resume_state: Option<State<f32>>,
}

/// One rank's training run; see the module docs for the order of its calls.
pub struct Trainer<'a> {
    run: Run<'a>,
    pos: Position,
    ckpt: Checkpointing,
    policy: Policy,
    /// The logging window's figures.
    win: Window,
    /// The batch buffer, [T + 1, B_rank] (reused).
    buf: Vec<u32>,
    session: Session,
    /// The phases' seconds and the trace of `profile_steps`.
    profiling: Profiling,
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
        let profiling = Profiling::new(cfg, dist.rank())?;
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
        backend.set_profiler(profiling.prof.clone());
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
            cfg.tensorboard,
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
        let model = Model {
            rule: cfg.optimizer_rule()?,
            backend,
            dims,
            gpr,
        };
        Ok(Self {
            run: Run {
                cfg,
                opts,
                handle,
                dist,
                ds,
                model,
                st,
                schedule: cfg.schedule(),
                eval: cfg.eval(),
                metrics,
                report: RankReport::default(),
                prof: profiling.prof.clone(),
            },
            pos: Position {
                cursor,
                resume_state,
            },
            ckpt: Checkpointing::new(cfg.checkpoints(), committed),
            policy: Policy::new(cfg.realloc()),
            win: Window::default(),
            buf: Vec::new(),
            session: Session::new(started),
            profiling,
        })
    }

    /// Train until the budget is spent or a stop is requested; the run's summary.
    pub fn run(mut self) -> Result<Summary> {
        if let Some(done) = self.finished() {
            // A finished run resumed again: its stored summary, or its last evaluations.
            return match finish::report_finished(&mut self.run)? {
                Some(summary) => Ok(summary),
                None => self.finish(done),
            };
        }
        let run = &mut self.run;
        if run.dist.is_leader() {
            let toml = run.cfg.to_toml();
            if let Some(b) = run.metrics.board() {
                // Indented four spaces: a code block in TensorBoard's markdown.
                let code: String = toml.lines().map(|l| format!("    {l}\n")).collect();
                b.text(run.st.step, "config", &code);
            }
            run.handle
                .block_on(run.opts.out.put("config.toml", Bytes::from(toml)))?;
        }
        if run.st.realloc_pending {
            // Resumed from the checkpoint of an epoch whose round had not completed:
            // the round's line of an earlier attempt gives way to this one's.
            tracing::info!(
                step = run.st.step,
                "running the reallocation round the checkpoint left pending"
            );
            run.metrics.drop_realloc_at(run.st.step);
            self.policy.round(run)?;
            run.flush_metrics(true)?;
        }
        let stopped = loop {
            if self.run.schedule.epochs_spent(self.run.st.epoch) {
                break StoppedBy::Epochs;
            }
            match self.run_epoch()? {
                EpochEnd::Stopped(why) => break why,
                EpochEnd::Done {
                    started,
                    train_seconds,
                } => self.end_epoch(started, train_seconds)?,
            }
            if self.run.schedule.steps_spent(self.run.st.step) {
                break StoppedBy::MaxSteps;
            }
        };
        self.finish(stopped)
    }

    /// Whether the resumed run had spent its budget already.
    fn finished(&self) -> Option<StoppedBy> {
        let (schedule, st) = (&self.run.schedule, &self.run.st);
        if st.step == 0 {
            return None;
        }
        if schedule.steps_spent(st.step) {
            return Some(StoppedBy::MaxSteps);
        }
        schedule.epochs_spent(st.epoch).then_some(StoppedBy::Epochs)
    }

    /// The steps of the current epoch from its cursor.
    fn run_epoch(&mut self) -> Result<EpochEnd> {
        let (b, bptt) = (self.run.cfg.batch, self.run.cfg.bptt);
        let (rank, world) = (self.run.dist.rank(), self.run.dist.world());
        let leased = self
            .run
            .dist
            .control
            .lease(self.run.st.epoch, b, self.pos.cursor)?;
        // Checkpoint states and loss tables assume this split.
        if leased != share(b, world, rank) {
            return Err(Error::Config(format!(
                "leased streams {leased:?} are not rank {rank}'s share {:?} of the batch of {b}",
                share(b, world, rank)
            )));
        }
        let mine = leased;
        let mut batches = Batches::streams(
            self.run.ds.train.clone(),
            self.run.handle.clone(),
            b,
            mine.clone(),
            bptt,
            self.pos.cursor,
        )?;
        self.start_streams(&mine)?;
        if let Some(lr) = self.run.schedule.scheduled_lr(self.run.st.epoch) {
            self.run.st.lr = lr;
        }
        let per_pass = batches.steps_per_pass();
        let mut pass_step = self.pos.cursor.div_ceil(bptt as u64);
        // The bar ends where this epoch's training will: at the pass's end, or earlier
        // where max_steps ends the run.
        let schedule = &self.run.schedule;
        let bar_len = if schedule.max_steps > 0 {
            per_pass.min(pass_step + schedule.max_steps.saturating_sub(self.run.st.step))
        } else {
            per_pass
        };
        let bar = Progress::new(
            self.run.opts.progress && self.run.dist.is_leader(),
            bar_len,
            pass_step,
            self.run.st.epoch,
            schedule.epochs,
        );
        let cursor0 = self.pos.cursor;
        let (started, mut train_seconds) = (Instant::now(), 0.0);
        while let Some((dt, norm)) = self.step(&mut batches, mine.len())? {
            pass_step += 1;
            train_seconds += dt;
            let step = self.run.st.step;
            if step.is_multiple_of(self.run.cfg.log_every) {
                let prof = self.profiling.prof.clone();
                let _s = prof.span(Phase::Log);
                self.log_window(norm, &bar, pass_step, per_pass)?;
            } else if self.run.opts.progress && pass_step.is_multiple_of(10) {
                bar.update(pass_step, String::new());
            }
            let at_limit = self.run.schedule.steps_spent(step);
            // The epoch's last batch gets its checkpoint at the epoch's end, at this step.
            if self.ckpt.due(step) && !at_limit && !batches.exhausted() {
                self.fold_window()?;
                self.ckpt.checkpoint(&mut self.run, batches.position())?;
            }
            let stop = if at_limit {
                Some(StoppedBy::MaxSteps)
            } else {
                self.stop_requested()?.then_some(StoppedBy::Signal)
            };
            if let Some(why) = stop {
                self.pos.cursor = batches.position();
                bar.finish();
                return Ok(EpochEnd::Stopped(why));
            }
        }
        bar.finish();
        self.fold_window()?;
        // Every rank has consumed its lease: (positions moved) x (its streams).
        let consumed = (batches.position() - cursor0) * mine.len() as u64;
        self.run
            .dist
            .control
            .epoch_done(self.run.st.epoch, consumed)?;
        Ok(EpochEnd::Done {
            started,
            train_seconds,
        })
    }

    /// The carried states at the start of an epoch's steps: zeros for a new epoch, the
    /// checkpoint's streams for one resumed inside.
    fn start_streams(&mut self, mine: &std::ops::Range<usize>) -> Result<()> {
        let (gpr, d) = (self.run.model.gpr, self.run.model.dims);
        let gsize = mine.len() / gpr;
        let backend = &mut self.run.model.backend;
        backend.set_shard(Shard {
            offset: mine.start,
            global: self.run.cfg.batch,
            groups: gpr,
        })?;
        if self.pos.cursor == 0 {
            for g in 0..gpr {
                backend.reset_state(Stream::Train(g as u32));
            }
        }
        // A checkpoint taken at an epoch's end (cursor 0) holds the state the streams
        // ended with; the next epoch starts from zeros, as an uninterrupted run does.
        if let Some(whole) = self.pos.resume_state.take()
            && self.pos.cursor > 0
        {
            for g in 0..gpr {
                let first = mine.start + g * gsize;
                let part = slice_state(&whole, first..first + gsize, d.layers, d.hidden)?;
                backend.set_state(Stream::Train(g as u32), part)?;
            }
        }
        Ok(())
    }

    /// One optimizer step on the next batch: its training seconds and gradient norm, or
    /// None at the end of the epoch's data.
    fn step(&mut self, batches: &mut Batches, bl: usize) -> Result<Option<(f64, f64)>> {
        let run = &mut self.run;
        // At the epoch's end no step follows: the end's work stays in a trace that ends.
        if !batches.exhausted() {
            self.profiling
                .before_step(run.st.step + 1, &run.opts.out, run.handle);
        }
        let prof = self.profiling.prof.clone();
        let step_span = prof.span(Phase::Step);
        let t0 = Instant::now();
        let next = {
            let _s = prof.span(Phase::Data);
            batches.next_batch(&mut self.buf)?
        };
        let Some(t) = next else {
            // The epoch's data ran out: no step.
            step_span.cancel();
            return Ok(None);
        };
        // Gradients of the mean over the whole batch's words: each group scales its sum
        // by the global count, so the all-reduced sum is the global mean.
        let run = &mut self.run;
        let (st, backend) = (&mut run.st, &mut run.model.backend);
        let words = (t * run.cfg.batch) as u64;
        let batch = Batch {
            inputs: &self.buf[..t * bl],
            targets: &self.buf[bl..],
            steps: t,
            batch: bl,
            stream: Stream::Train(0),
        };
        {
            let _s = prof.span(Phase::ForwardBackward);
            backend.train_step(&batch, st.step, 1.0 / words as f32)?;
        }
        if run.dist.world() > 1 {
            let _s = prof.span(Phase::AllReduce);
            backend.all_reduce_grads(&mut *run.dist.collective)?;
            // From the ring's first exchange: a device backend first issues its step and
            // stages the gradients to the host (in `all_reduce` only).
            if let Some((start, first)) = run.dist.collective.take_wait() {
                prof.record(Phase::AllReduceWait, start, first);
                prof.record(Phase::AllReduceTransfer, first, Instant::now());
            }
        }
        // The step's one read-back: its losses and the gradient norm together.
        let StepFigures { loss, norm } = {
            let _s = prof.span(Phase::Update);
            backend.clip_and_step(&run.model.rule, st.lr, run.cfg.clip)?
        };
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
        let dt = t0.elapsed().as_secs_f64();
        st.train_seconds += dt;
        self.session.train_seconds += dt;
        self.session.words += words;
        self.win.loss += loss.total();
        self.win.words += loss.words;
        self.win.secs += dt;
        {
            let _s = prof.span(Phase::Control);
            run.dist
                .control
                .progress(st.step, st.epoch, batches.position())?;
        }
        drop(step_span);
        Ok(Some((dt, norm)))
    }

    /// The job's figures of the window, added to the epoch's running sums.
    fn fold_window(&mut self) -> Result<(f64, u64)> {
        let (l, w) = self.win.reduce(&mut *self.run.dist.collective)?;
        self.run.st.epoch_loss_sum += l;
        self.run.st.epoch_words += w;
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
        let world = self.run.dist.world();
        let mut ranks = Vec::new();
        if world > 1 {
            ranks = vec![0.0; world];
            ranks[self.run.dist.rank()] = mine as f64 / secs;
            self.run.dist.collective.all_reduce_sum_f64(&mut ranks)?;
        }
        let profile = self
            .profiling
            .window_line(self.run.st.step, self.run.st.epoch + 1);
        let r = &mut self.run.report;
        r.phases = profile
            .as_ref()
            .map_or_else(Default::default, |p| p.seconds_per_step.clone());
        r.step = self.run.st.step;
        r.epoch = self.run.st.epoch;
        r.loss = l;
        r.words_per_sec = mine as f64 / secs;
        r.global_words_per_sec = wps;
        r.lr = self.run.st.lr;
        self.run.publish();
        self.win.secs = 0.0;
        self.run.metrics.push(&MetricsLine::Train(TrainLine {
            step: self.run.st.step,
            epoch: self.run.st.epoch + 1,
            loss: l,
            ppl: ppl(l),
            words_per_sec: wps,
            lr: self.run.st.lr,
            grad_norm: norm,
            seconds: self.run.st.train_seconds,
            rank_words_per_sec: ranks,
        }))?;
        if let Some(p) = profile {
            self.run.metrics.push(&MetricsLine::Profile(p))?;
        }
        let leader = self.run.dist.is_leader();
        if self.run.opts.progress && leader {
            bar.update(
                pass_step,
                format!(
                    "loss {l:.3} ppl {:.1} {:.0} w/s lr {}",
                    ppl(l),
                    wps,
                    self.run.st.lr
                ),
            );
        } else if leader {
            tracing::info!(
                step = self.run.st.step,
                epoch = self.run.st.epoch + 1,
                progress = format!("{pass_step}/{per_pass}"),
                loss = format!("{l:.4}"),
                ppl = format!("{:.2}", ppl(l)),
                words_per_sec = format!("{wps:.0}"),
                lr = self.run.st.lr,
                "train"
            );
        }
        self.run.flush_metrics(false)
    }

    /// Whether a stop was requested (SIGTERM, or the coordinator's) on any rank: all of
    /// them then stop after this same step.
    fn stop_requested(&mut self) -> Result<bool> {
        let Some(flag) = &self.run.opts.stop else {
            return Ok(false);
        };
        let mut want = [f32::from(flag.load(Ordering::Relaxed))];
        if self.run.dist.world() > 1 {
            self.run.dist.collective.all_reduce_sum(&mut want)?;
        }
        if want[0] > 0.0 && self.run.dist.is_leader() {
            tracing::warn!(
                step = self.run.st.step,
                "stop requested: checkpointing here"
            );
        }
        Ok(want[0] > 0.0)
    }

    /// The end of an epoch: validation, the learning-rate schedule, the best model, a
    /// reallocation round when one is due, the epoch's checkpoint.
    fn end_epoch(&mut self, started: Instant, train_seconds: f64) -> Result<()> {
        let vl = self.run.evaluate(Split::Valid)?;
        let run = &mut self.run;
        let st = &mut run.st;
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
        if run.dist.is_leader() {
            tracing::info!(
                epoch = rec.epoch,
                train_ppl = format!("{:.2}", ppl(train_loss)),
                valid_ppl = format!("{:.2}", rec.valid_ppl),
                lr = st.lr,
                words_per_sec = format!("{:.0}", st.epoch_words as f64 / train_seconds.max(1e-9)),
                "epoch done"
            );
        }
        run.metrics.push(&MetricsLine::Valid(ValidLine {
            step: st.step,
            epoch: rec.epoch,
            loss: vl,
            ppl: rec.valid_ppl,
            train_loss,
            lr: st.lr,
            seconds: st.train_seconds,
            partial_epoch: false,
        }))?;
        run.report.valid_ppl = rec.valid_ppl;
        run.report.epoch = rec.epoch;
        run.publish();
        run.st.history.push(rec);
        if run.st.best_valid_loss.is_none_or(|b| vl < b) {
            save_best(run, vl)?;
        } else if run.schedule.lr_schedule.is_empty() {
            run.st.lr /= run.schedule.lr_decay;
        }
        run.st.epoch += 1;
        // Whether a round follows, and under the automatic rule, the guard on a move.
        self.policy.after_epoch(run, vl)?;
        run.st.epoch_loss_sum = 0.0;
        run.st.epoch_words = 0;
        self.pos.cursor = 0;
        // The epoch is committed before its reallocation round: a round that fails (out
        // of memory, a solver error, a lost rank) leaves a checkpoint that --resume
        // continues, running the round first.
        self.ckpt.checkpoint(run, 0)?;
        run.flush_metrics(true)?;
        if run.st.realloc_pending {
            self.policy.round(run)?;
            run.flush_metrics(true)?;
        }
        Ok(())
    }

    /// The end of the run, after its last window is folded in ([`finish::finish`]).
    fn finish(mut self, stopped: StoppedBy) -> Result<Summary> {
        self.fold_window()?;
        let summary = finish::finish(
            &mut self.run,
            &mut self.ckpt,
            &self.session,
            self.pos.cursor,
            stopped,
        )?;
        let run = &self.run;
        self.profiling.finish(&run.opts.out, run.handle);
        Ok(summary)
    }
}
