//! The end of a run: [`finish`] (the stop's checkpoint, the last validation, the test
//! score of the best model, the summary in `summary.json` and to the job's owner), and
//! [`report_finished`], a finished run resumed again; the [`Session`]'s figures the
//! summary reports.

use std::time::Instant;

use bytes::Bytes;

use super::checkpointing::{Checkpointing, save_best};
use super::run::{Run, Split};
use crate::dist::state::params_checksum;
use lightrnn_core::report::{MetricsLine, StoppedBy, Summary, TestLine, ValidLine, ppl};
use lightrnn_core::{Error, Result};

/// This session's figures (a resumed run starts a new session).
pub(super) struct Session {
    pub(super) started: Instant,
    pub(super) words: u64,
    pub(super) train_seconds: f64,
}

impl Session {
    pub(super) fn new(started: Instant) -> Self {
        Self {
            started,
            words: 0,
            train_seconds: 0.0,
        }
    }
}

/// A finished run resumed again: its summary as it ended (summary.json), reported again;
/// or, when it stopped before writing one, None after a log line: its last evaluations
/// are to be made now ([`finish`]). Nothing is trained. Every rank takes the same path:
/// the stored summary only when all ranks read it.
pub(super) fn report_finished(run: &mut Run<'_>) -> Result<Option<Summary>> {
    let stored = match run.handle.block_on(run.opts.out.get("summary.json")) {
        Ok(b) => serde_json::from_slice::<Summary>(&b)
            .ok()
            .filter(|s| s.steps == run.st.step),
        Err(Error::NotFound(_)) => None,
        Err(e) => return Err(e),
    };
    let mut have = [f32::from(stored.is_some())];
    if run.dist.world() > 1 {
        run.dist.collective.all_reduce_sum(&mut have)?;
    }
    let summary = match stored {
        Some(s) if have[0] as usize == run.dist.world() => s,
        _ => {
            tracing::info!(step = run.st.step, "the run is finished: evaluating it");
            return Ok(None);
        }
    };
    if run.dist.is_leader() {
        tracing::info!(step = summary.steps, stopped_by = summary.stopped_by.name(), out = %run.opts.out, "the run is finished: nothing to train");
    }
    // The checksum of the model in the checkpoint (every rank loaded the same).
    let sum = params_checksum(&run.model.backend.params()?);
    let leader = run.dist.is_leader();
    run.dist.control.finish(leader.then_some(&summary), &sum)?;
    Ok(Some(summary))
}

/// The end of the run, its last window folded in: a stop inside an epoch keeps a
/// checkpoint to continue from (at `cursor`) and validates where it is for the report
/// (that validation does not enter the run's state: best model, lr schedule, so stopping
/// and resuming trains exactly as an uninterrupted run); the test score of the best
/// model; the summary.
pub(super) fn finish(
    run: &mut Run<'_>,
    ckpt: &mut Checkpointing,
    session: &Session,
    cursor: u64,
    stopped: StoppedBy,
) -> Result<Summary> {
    let signalled = stopped == StoppedBy::Signal;
    let partial = stopped != StoppedBy::Epochs && run.st.epoch_words > 0;
    let train_loss = if run.st.epoch_words > 0 {
        run.st.epoch_loss_sum / run.st.epoch_words as f64
    } else {
        run.st.history.last().map_or(f64::NAN, |r| r.train_loss)
    };
    let mut valid_loss = run.st.best_valid_loss.unwrap_or(f64::INFINITY);
    let mut test_params = run.st.best_params.take().zip(run.st.best_cells.take());
    // A stop right after a periodic checkpoint finds this very step committed already.
    if partial && !ckpt.committed_at(run.st.step) {
        ckpt.checkpoint(run, cursor)?;
    }
    if signalled {
        // Preemption: the checkpoint is what matters inside the grace period; the
        // evaluations are left to the resumed run.
        run.flush_metrics(true)?;
    } else if partial {
        let vl = run.evaluate(Split::Valid)?;
        if run.st.best_valid_loss.is_none_or(|b| vl < b) {
            // The best model so far: in out/best like an epoch's (eval and sample
            // read it), also for a run that max_steps ends inside its first epoch.
            save_best(run, vl)?;
        }
        run.metrics.push(&MetricsLine::Valid(ValidLine {
            step: run.st.step,
            epoch: run.st.epoch + 1,
            loss: vl,
            ppl: ppl(vl),
            train_loss,
            lr: run.st.lr,
            seconds: run.st.train_seconds,
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
            run.model.backend.set_params(p)?;
            run.model.backend.set_allocation(cells)?;
        }
        let tl = run.evaluate(Split::Test)?;
        run.metrics.push(&MetricsLine::Test(TestLine {
            step: run.st.step,
            epoch: run.st.epoch,
            loss: tl,
            ppl: ppl(tl),
            seconds: run.st.train_seconds,
        }))?;
        run.flush_metrics(true)?;
        tl
    };
    let mut summary = summary(run, session, stopped, train_loss, valid_loss, test_loss);
    // The model each rank ends with (the test evaluation may have loaded the best one).
    let sum = params_checksum(&run.model.backend.params()?);
    summary.params_sha256 = sum.clone();
    let leader = run.dist.is_leader();
    if leader {
        let json = serde_json::to_vec_pretty(&summary).map_err(|e| Error::Data(e.to_string()))?;
        run.handle
            .block_on(run.opts.out.put("summary.json", Bytes::from(json)))?;
    }
    run.dist.control.finish(leader.then_some(&summary), &sum)?;
    Ok(summary)
}

/// The run's summary, with its final losses per word.
fn summary(
    run: &Run<'_>,
    session: &Session,
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
        words_per_sec: session.words as f64 / session.train_seconds.max(1e-9),
        params: run.model.backend.layout().total,
        seconds: session.started.elapsed().as_secs_f64(),
        train_seconds: run.st.train_seconds,
        steps: run.st.step,
        epochs_completed: run.st.history.len() as u64,
        stopped_by: stopped,
        vocab_size: run.ds.vocab.len(),
        backend: run.model.backend.name(),
        world_size: run.dist.world(),
        control_seconds: run.dist.control.rpc_seconds(),
        config: run.cfg.clone(),
        history: run.st.history.clone(),
        auto_realloc: run.st.auto.clone(),
        params_sha256: String::new(),
    }
}
