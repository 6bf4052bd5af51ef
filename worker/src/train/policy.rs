//! The reallocation policy of a run: after each epoch, whether a round is due
//! ([`ReallocSettings::after`]); with `realloc_every = "auto"`, the rule of
//! [`lightrnn_core::auto`] applied (the budget it plans with, the guard that undoes a kept
//! move that has not recovered, a round skipped before its tables pass, a move kept or
//! undone after it); the round itself, a rank's part in [`super::realloc`]; every
//! decision logged and recorded in the metrics.

use super::board::allocation_png;
use super::realloc::{ReallocOptions, reallocate};
use super::run::Run;
use super::start::LoopState;
use super::sweep::Sweep;
use lightrnn_core::auto::{
    AutoState, Budget, Decision, GUARD_FACTOR, PRIOR_RECOVERY_EPOCHS, Plan, Verdict, Watch,
};
use lightrnn_core::config::{ReallocSettings, Schedule};
use lightrnn_core::report::{MetricsLine, ReallocLine};
use lightrnn_core::{Error, Result};
use lightrnn_kernels::Phase;

/// When a run reallocates, and how.
pub(super) struct Policy {
    settings: ReallocSettings,
}

impl Policy {
    pub(super) fn new(settings: ReallocSettings) -> Self {
        Self { settings }
    }

    /// After epoch `run.st.epoch` (1-based, just counted) and its validation loss
    /// `valid_loss`: whether its round is due; under the automatic rule, the guard on the
    /// move it watches, and a due round that its plan skips (recorded).
    pub(super) fn after_epoch(&self, run: &mut Run<'_>, valid_loss: f64) -> Result<()> {
        run.st.realloc_pending = self.settings.after(run.st.epoch, run.st.reallocations);
        if let Some(auto) = &mut run.st.auto {
            auto.observe(run.st.epoch, valid_loss);
            if let Some(w) = auto.overdue(run.st.epoch) {
                revert_move(run, w, valid_loss)?;
            }
        }
        if run.st.realloc_pending
            && let Some(auto) = &run.st.auto
            && let Plan::Skip(why) = auto.plan(&budget(&run.schedule, &run.st))
        {
            run.st.realloc_pending = false;
            record_skip(run, why)?;
        }
        Ok(())
    }

    /// The reallocation round after the epoch just finished (`st.epoch` epochs done),
    /// recorded in the metrics. With `realloc_every = "auto"` the rule prices the moves,
    /// measures the moved model and keeps the move only where it pays
    /// ([`lightrnn_core::auto`]).
    pub(super) fn round(&self, run: &mut Run<'_>) -> Result<()> {
        let prof = run.prof.clone();
        let _s = prof.span(Phase::Realloc);
        let budget = budget(&run.schedule, &run.st);
        let plan = run.st.auto.as_ref().map(|a| a.plan(&budget));
        let (move_cost, recovery, payoff, realized) = match &plan {
            None => (self.settings.move_cost, f64::NAN, f64::NAN, f64::NAN),
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
                run.st.realloc_pending = false;
                return record_skip(run, why);
            }
        };
        let auto = plan.is_some();
        let ro = ReallocOptions {
            max_table_bytes: self.settings.max_table_bytes,
            sparse_k: {
                let d = run.model.backend.dims();
                self.settings.sparse_k(d.vocab, d.rows, d.cols)
            },
            carry: self.settings.carry,
            check: self.settings.check || auto,
            move_cost,
            undoable: auto,
            profiler: run.prof.clone(),
        };
        let sweep = Sweep::new(&run.ds.train, run.cfg.batch, run.cfg.bptt, run.handle)
            .share(run.dist.world(), run.dist.rank());
        let moved = reallocate(
            &mut *run.model.backend,
            &sweep,
            &ro,
            &mut *run.dist,
            run.st.reallocations + 1,
        )?;
        run.st.reallocations += 1;
        run.st.realloc_pending = false;
        let rep = moved.report;
        let decision = match &mut run.st.auto {
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
                    let valid = run.st.history.last().map_or(f64::NAN, |r| r.valid_loss);
                    state.moved(&budget, valid, gain, disruption, moved.moved_share);
                } else if let Some(undo) = moved.undo {
                    undo.apply(&mut *run.model.backend)?;
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
        if run.dist.is_leader() {
            tracing::info!(
                epoch = run.st.epoch,
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
        run.metrics.push(&MetricsLine::Realloc(ReallocLine {
            step: run.st.step,
            epoch: run.st.epoch,
            round: run.st.reallocations,
            report: rep,
            auto: decision.map(Box::new),
        }))?;
        allocation_image(run)
    }
}

/// The allocation after a round, as an image in TensorBoard (where it is written).
fn allocation_image(run: &mut Run<'_>) -> Result<()> {
    if run.metrics.board().is_none() {
        return Ok(());
    }
    let cells = run.model.backend.allocation()?;
    let d = run.model.dims;
    let vocab = run.ds.vocab.clone();
    let (png, w, h) = allocation_png(&cells, |w| vocab.count(w as u32), d.rows, d.cols)?;
    if let Some(b) = run.metrics.board() {
        b.image(run.st.step, "realloc/allocation", png, w, h);
    }
    Ok(())
}

/// Where the run stands for the automatic reallocation, after `st.epoch` epochs: the
/// epochs its budget has left (the smaller of what `epochs` and `max_steps` leave, steps
/// counted in this run's epochs) and the next epoch's learning rate.
fn budget(schedule: &Schedule, st: &LoopState) -> Budget {
    let mut left = f64::INFINITY;
    if schedule.epochs > 0 {
        left = schedule.epochs.saturating_sub(st.epoch) as f64;
    }
    if schedule.max_steps > 0 && st.epoch > 0 {
        let per_epoch = st.step as f64 / st.epoch as f64;
        left = left.min(schedule.max_steps.saturating_sub(st.step) as f64 / per_epoch.max(1.0));
    }
    let ahead = if schedule.lr_schedule.is_empty() || !left.is_finite() {
        Vec::new()
    } else {
        (st.epoch..st.epoch + left.ceil() as u64)
            .filter_map(|e| schedule.scheduled_lr(e))
            .collect()
    };
    Budget {
        epoch: st.epoch,
        epochs_left: left,
        lr_next: schedule.scheduled_lr(st.epoch).unwrap_or(st.lr),
        lr_ahead: ahead,
    }
}

/// The guard ([`lightrnn_core::auto`]): the kept move watched in `w` has not brought the
/// validation loss back to its level by its deadline (`valid_loss` after this epoch), so
/// every rank goes back to the best model so far (parameters and allocation: no epoch
/// since the move has beaten the level before it, so this is the model before the move
/// or an earlier, better one). Logged, and a `realloc` line with the words that went back.
fn revert_move(run: &mut Run<'_>, w: Watch, valid_loss: f64) -> Result<()> {
    let (Some(params), Some(cells)) = (&run.st.best_params, &run.st.best_cells) else {
        return Err(Error::Checkpoint {
            url: run.opts.out.join("best").to_string(),
            msg: "automatic reallocation: a move to undo, and no best model to go back to".into(),
        });
    };
    let backend = &mut run.model.backend;
    let now = backend.allocation()?;
    let words_moved = now.iter().zip(cells).filter(|(a, b)| a != b).count();
    backend.set_params(params)?;
    backend.set_allocation(cells)?;
    let b = budget(&run.schedule, &run.st);
    let best = run.st.best_valid_loss.unwrap_or(f64::NAN);
    let back_to = run
        .st
        .history
        .iter()
        .find(|r| Some(r.valid_loss) == run.st.best_valid_loss)
        .map_or(0, |r| r.epoch);
    let Some(auto) = &mut run.st.auto else {
        return Ok(());
    };
    let expected = w.expected_recovery.unwrap_or(PRIOR_RECOVERY_EPOCHS);
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
    if run.dist.is_leader() {
        tracing::warn!(epoch = b.epoch, words_moved, why = %d.why, "automatic reallocation: move undone");
    }
    let report = lightrnn_alloc::Report {
        words_moved,
        ..lightrnn_alloc::Report::unmeasured()
    };
    run.metrics.push(&MetricsLine::Realloc(ReallocLine {
        step: run.st.step,
        epoch: run.st.epoch,
        round: run.st.reallocations,
        report,
        auto: Some(Box::new(d)),
    }))
}

/// An automatic round skipped before its tables pass: logged, and a `realloc` line that
/// says why.
fn record_skip(run: &mut Run<'_>, why: String) -> Result<()> {
    let b = budget(&run.schedule, &run.st);
    let Some(auto) = &mut run.st.auto else {
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
    if run.dist.is_leader() {
        tracing::info!(epoch = b.epoch, why = %d.why, "automatic reallocation: no round");
    }
    run.metrics.push(&MetricsLine::Realloc(ReallocLine {
        step: run.st.step,
        epoch: run.st.epoch,
        round: run.st.reallocations,
        report: lightrnn_alloc::Report::unmeasured(),
        auto: Some(Box::new(d)),
    }))
}
