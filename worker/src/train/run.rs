//! What every part of the trainer works on: a [`Run`] (the config, options, runtime and
//! job it was given, the dataset, the [`Model`], the loop state, the run's schedule, the
//! metrics file and the rank's report), and the evaluation of a split over the ranks.

use tokio::runtime::Handle;

use lightrnn_kernels::{Backend, ModelDims, Optimizer, Phase, Profiler};

use super::eval::evaluate_with;
use super::metrics::MetricsFile;
use super::options::RunOptions;
use super::progress::Progress;
use super::start::LoopState;
use super::sweep::Sweep;
use crate::dist::control::Dist;
use lightrnn_core::Result;
use lightrnn_core::config::{EvalSettings, Schedule, TrainConfig};
use lightrnn_core::data::dataset::Dataset;
use lightrnn_core::report::RankReport;

/// The model a rank trains and how it is updated.
pub(super) struct Model {
    pub(super) backend: Box<dyn Backend>,
    pub(super) dims: ModelDims,
    pub(super) rule: Optimizer,
    /// Gradient groups on this rank.
    pub(super) gpr: usize,
}

/// One rank's run in progress: what the loop, checkpointing, the reallocation policy and
/// the end of the run share.
pub(super) struct Run<'a> {
    /// The whole config: recorded in checkpoints, the summary and `config.toml`.
    pub(super) cfg: &'a TrainConfig,
    pub(super) opts: &'a RunOptions,
    pub(super) handle: &'a Handle,
    pub(super) dist: &'a mut Dist,
    pub(super) ds: Dataset,
    pub(super) model: Model,
    pub(super) st: LoopState,
    /// The budget and the learning-rate schedule.
    pub(super) schedule: Schedule,
    /// How validation and test read their split.
    pub(super) eval: EvalSettings,
    pub(super) metrics: MetricsFile,
    pub(super) report: RankReport,
    /// Times the phases (see `profiling`).
    pub(super) prof: Profiler,
}

/// An evaluation split.
#[derive(Clone, Copy)]
pub(super) enum Split {
    Valid,
    Test,
}

impl Run<'_> {
    /// Mean loss per word of a split (every rank gets the same).
    pub(super) fn evaluate(&mut self, split: Split) -> Result<f64> {
        let prof = self.prof.clone();
        let _s = prof.span(Phase::Eval);
        let (reader, name) = match split {
            Split::Valid => (&self.ds.valid, "validation"),
            Split::Test => (&self.ds.test, "test"),
        };
        let leader = self.dist.is_leader();
        if leader {
            tracing::info!(split = name, words = reader.tokens(), "evaluating");
        }
        let (b, bptt) = (self.eval.batch, self.eval.bptt as u64);
        let steps = (reader.tokens() / b.max(1) as u64)
            .saturating_sub(1)
            .div_ceil(bptt);
        let bar = Progress::titled(self.opts.progress && leader, steps, name);
        let sweep = Sweep::new(reader, b, self.eval.bptt, self.handle)
            .share(self.dist.world(), self.dist.rank());
        let (loss, _) = evaluate_with(
            &mut *self.model.backend,
            &sweep,
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

    /// The rank's report, with its waits on its peers so far, to the job's owner (for the
    /// heartbeats and the job's metrics).
    pub(super) fn publish(&mut self) {
        self.report.waits = self.dist.collective.waits();
        self.dist.control.report(&self.report);
    }

    /// Write `metrics.jsonl` if lines were added: now with `force`, else when it is due.
    pub(super) fn flush_metrics(&mut self, force: bool) -> Result<()> {
        self.handle.block_on(self.metrics.flush(force))
    }
}
