//! `realloc_every = "auto"`: after each epoch the trainer decides whether a reallocation
//! round pays for itself and which words move, from what it measures
//! (docs/allocation.md, "Automatic reallocation").
//!
//! **The model of a move.** Moving words lowers the loss the model can reach by the
//! predicted gain g (the tables' objective before minus after, nats per word), and
//! disrupts it at once by D nats per word: the training loss measured right after the
//! move minus the objective the tables predicted for it (the input vectors and hidden
//! states that no longer fit the words). Training works the disruption off in T epochs,
//! the recovery, measured after each move as the epochs until the validation loss is back
//! below where it was before the move, and taken as T (lr_then / lr_next) at another
//! learning rate (1 epoch before any move). Of the predicted gain, a share r shows in
//! the validation loss: measured at each recovery as the fall of the validation loss
//! from before the move, over the gain the move predicted (1 before any move: the
//! prediction is taken at its word). The gain shows once training settles: of the epochs
//! left, it counts the S after the recovery that the learning-rate schedule trains at a
//! lower rate than the move's (none without a schedule: the plateau rule's drops cannot
//! be foreseen). A move pays when the realised gain over those epochs beats the
//! disruption decaying over the recovery: r g S > D T / 2.
//!
//! **A round**, considered after every epoch but the last:
//! 1. is skipped before its tables pass while the last move has not recovered, where no
//!    gain can pay (S = 0), and where the last move realised none of its gain (r <= 0);
//! 2. charges every word a move cost of c = d T / (4 r S) nats per occurrence for
//!    changing its row, and again for its column, d being the disruption per changed
//!    occurrence the last move measured (free moves before the first): the same test,
//!    word by word, so that later rounds move only the words whose own gain pays;
//! 3. moves, measures D (one more pass over the training data), and keeps the move only
//!    if r g S > D T / 2; otherwise the model and the allocation go back as they were.
//!
//! **The guard.** A kept move is watched until its validation loss is back below its
//! level before the move. If it is not back after [`GUARD_FACTOR`] times the recovery the
//! rule expected when it moved (at least one epoch), the move is judged worse than
//! keeping the allocation would have been (that would not have lost the level at all),
//! and it is undone: every rank puts back the best model so far (parameters and
//! allocation), which no epoch since the move has beaten, so it is the model of the
//! epoch before the move or an earlier, better one (held in memory and in `out/best`,
//! as for the test score). The rule learns from it: the move's realised share is
//! measured as the validation loss's fall over its predicted gain, a rise, so r < 0
//! and no later round runs.
//!
//! On PTB the first move predicts 1.68 nats and shows 0.017 of them in the validation
//! loss one epoch later (r = 0.010), so later rounds price their words out, and the run
//! is the best fixed schedule's (once, after the first epoch; docs/allocation.md).
//!
//! Every rank takes the same decisions: they are functions of figures every rank holds
//! alike (the round's report, the losses summed over the ranks, the epoch's validation
//! loss), and the state ([`AutoState`]) travels in the checkpoints.

use lightrnn_alloc::nan_if_null;
use serde::{Deserialize, Serialize};

/// Recovery, in epochs, assumed before any move has been measured.
pub const PRIOR_RECOVERY_EPOCHS: f64 = 1.0;

/// A kept move that has not recovered after this many times its expected recovery is
/// undone (the guard).
pub const GUARD_FACTOR: f64 = 2.0;

/// What the rule has learnt, saved in every checkpoint of an auto run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoState {
    /// Disruption per changed occurrence of the last kept move (nats: a word that changed
    /// its row and its column counts whole, one that changed either half).
    pub disruption: Option<f64>,
    /// The last measured recovery.
    pub recovery: Option<Recovery>,
    /// The share of its predicted gain the last recovered move showed in the validation
    /// loss.
    pub realized: Option<f64>,
    /// The last kept move, until validation is back below its level before the move.
    pub watch: Option<Watch>,
    /// Every decision, in order.
    pub decisions: Vec<Decision>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    pub epochs: f64,
    /// The learning rate it was measured at.
    pub lr: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Watch {
    /// The epoch after which the words moved.
    pub epoch: u64,
    /// That epoch's validation loss, before the move.
    pub valid_loss: f64,
    /// The learning rate of the epoch after the move.
    pub lr: f64,
    /// The gain it predicted (nats per word).
    pub gain: f64,
    /// The recovery the rule expected when it moved (epochs; absent in checkpoints
    /// from before the guard: the prior).
    #[serde(default)]
    pub expected_recovery: Option<f64>,
}

impl Watch {
    /// The epoch after which the guard undoes the move if it has not recovered:
    /// [`GUARD_FACTOR`] times the expected recovery after the move, at least one epoch.
    pub fn deadline(&self) -> u64 {
        let t = self.expected_recovery.unwrap_or(PRIOR_RECOVERY_EPOCHS);
        let allowed = (GUARD_FACTOR * t).ceil();
        let allowed = if allowed.is_finite() && allowed >= 1.0 {
            allowed.min(u32::MAX as f64) as u64
        } else {
            1
        };
        self.epoch.saturating_add(allowed)
    }
}

/// What the rule decided after an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// No round: nothing could pay (or the last move is still recovering).
    Skip,
    /// The round's move was kept.
    Move,
    /// The round found no word whose gain pays for its move: nothing moved.
    Keep,
    /// The round's move was measured not to pay and was undone.
    Undo,
    /// The guard: a kept move whose validation loss did not recover in time was undone
    /// by going back to the best model.
    Revert,
}

/// One decision, with its figures (nats per word of the training data; NaN where not
/// measured), as the `realloc` line of metrics.jsonl and the summary show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub epoch: u64,
    pub decision: Verdict,
    pub why: String,
    /// Epochs of budget left after this one.
    #[serde(deserialize_with = "nan_if_null")]
    pub epochs_left: f64,
    /// The recovery a move now is expected to take.
    #[serde(deserialize_with = "nan_if_null")]
    pub recovery_epochs: f64,
    /// The epochs after it at a lower learning rate, where the gain shows.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub payoff_epochs: f64,
    /// The move cost charged per changed row or column of an occurrence.
    #[serde(deserialize_with = "nan_if_null")]
    pub move_cost: f64,
    /// The share of a predicted gain the rule expects to show.
    #[serde(deserialize_with = "nan_if_null")]
    pub realized: f64,
    /// g, D, and the share of the occurrences' rows and columns that changed.
    #[serde(deserialize_with = "nan_if_null")]
    pub predicted_gain: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub disruption: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub moved_share: f64,
    pub words_moved: usize,
}

/// Where the run stands when a round is considered.
#[derive(Clone, Debug)]
pub struct Budget {
    /// The epoch just finished (1-based).
    pub epoch: u64,
    /// Epochs of training left after it.
    pub epochs_left: f64,
    /// The learning rate of the next epoch.
    pub lr_next: f64,
    /// The scheduled learning rate of each epoch left, the next first (`lr_schedule`);
    /// empty where the rate is not scheduled (the plateau rule decides it as it goes).
    pub lr_ahead: Vec<f64>,
}

impl Budget {
    /// The epochs left after a recovery of `t` epochs that train at a lower learning rate
    /// than the next epoch's: where a move's gain shows.
    pub fn settled_epochs(&self, t: f64) -> f64 {
        let from = t.max(0.0).ceil() as usize;
        self.lr_ahead
            .iter()
            .skip(from)
            .filter(|&&lr| lr < self.lr_next)
            .count() as f64
    }
}

/// Before the tables pass: run the round with this move cost, or skip it (why).
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    Run {
        move_cost: f64,
        recovery_epochs: f64,
        payoff_epochs: f64,
        realized: f64,
    },
    Skip(String),
}

impl AutoState {
    /// After epoch `epoch`'s validation (`valid_loss`): a watched move that is back below
    /// its level has recovered.
    pub fn observe(&mut self, epoch: u64, valid_loss: f64) {
        if let Some(w) = self.watch
            && valid_loss <= w.valid_loss
        {
            self.recovery = Some(Recovery {
                epochs: epoch.saturating_sub(w.epoch) as f64,
                lr: w.lr,
            });
            if w.gain > 0.0 {
                self.realized = Some((w.valid_loss - valid_loss) / w.gain);
            }
            self.watch = None;
        }
    }

    /// After [`observe`](Self::observe) at the end of epoch `epoch`: the watched move,
    /// if it has not recovered by its [`Watch::deadline`].
    pub fn overdue(&self, epoch: u64) -> Option<Watch> {
        self.watch.filter(|w| epoch >= w.deadline())
    }

    /// The guard undid the watched move at the end of epoch `epoch` (validation loss
    /// `valid_loss`): stop watching it, and take the share of its gain it realised,
    /// negative, as what moves realise (no later round runs). Returns that share.
    pub fn reverted(&mut self, valid_loss: f64) -> f64 {
        let Some(w) = self.watch.take() else {
            return self.realized.unwrap_or(1.0);
        };
        let r = if w.gain > 0.0 {
            ((w.valid_loss - valid_loss) / w.gain).min(0.0)
        } else {
            0.0
        };
        self.realized = Some(r);
        r
    }

    /// The epochs a move made now should take to recover.
    pub fn recovery_epochs(&self, lr_next: f64) -> f64 {
        match self.recovery {
            Some(r) if lr_next > 0.0 => r.epochs * r.lr / lr_next,
            _ => PRIOR_RECOVERY_EPOCHS,
        }
    }

    /// Whether a round is worth its tables pass now, and the move cost it charges.
    pub fn plan(&self, b: &Budget) -> Plan {
        if let Some(w) = self.watch {
            return Plan::Skip(format!(
                "the move after epoch {} has not recovered yet (validation loss above its {:.4} before the move)",
                w.epoch, w.valid_loss
            ));
        }
        let t = self.recovery_epochs(b.lr_next);
        if b.epochs_left <= t {
            return Plan::Skip(format!(
                "{:.2} epochs left, and a move takes {t:.2} to recover",
                b.epochs_left
            ));
        }
        let settled = b.settled_epochs(t);
        if settled <= 0.0 {
            return Plan::Skip(if b.lr_ahead.is_empty() {
                "no learning-rate schedule: no epoch ahead is known to train at a lower rate, where a move's gain shows".to_string()
            } else {
                format!(
                    "no epoch after a {t:.2}-epoch recovery trains at a lower rate than {}, where a move's gain shows",
                    b.lr_next
                )
            });
        }
        let r = self.realized.unwrap_or(1.0);
        if r <= 0.0 || r.is_nan() {
            return Plan::Skip(format!(
                "the last move showed none of its predicted gain (share {r:.4})"
            ));
        }
        let move_cost = self.disruption.map_or(0.0, |d| d * t / (4.0 * r * settled));
        Plan::Run {
            move_cost,
            recovery_epochs: t,
            payoff_epochs: settled,
            realized: r,
        }
    }

    /// After the tentative move: keep it? `gain` and `disruption` per word of the
    /// training data, `realized` the share of the gain expected to show.
    pub fn keeps(
        recovery_epochs: f64,
        payoff_epochs: f64,
        realized: f64,
        gain: f64,
        disruption: f64,
    ) -> bool {
        let t = recovery_epochs;
        gain.is_finite()
            && disruption.is_finite()
            && gain > 0.0
            && realized * gain * payoff_epochs > disruption.max(0.0) * t / 2.0
    }

    /// Record a kept move of predicted gain `gain`: watch its recovery and keep its
    /// disruption per changed occurrence.
    pub fn moved(
        &mut self,
        b: &Budget,
        valid_loss: f64,
        gain: f64,
        disruption: f64,
        moved_share: f64,
    ) {
        let expected_recovery = Some(self.recovery_epochs(b.lr_next));
        if moved_share > 0.0 {
            self.disruption = Some(disruption.max(0.0) / moved_share);
        }
        self.watch = Some(Watch {
            epoch: b.epoch,
            valid_loss,
            lr: b.lr_next,
            gain,
            expected_recovery,
        });
    }
}

/// The share of the occurrences' rows and columns that a new allocation changes: the sum
/// over the words of count x (row changed + column changed) / 2, over all occurrences.
pub fn moved_share(old: &[u32], new: &[u32], counts: &[u64], cols: usize) -> f64 {
    let (mut changed, mut total) = (0f64, 0f64);
    for ((&a, &b), &n) in old.iter().zip(new).zip(counts) {
        let (a, b, cols) = (a as usize, b as usize, cols.max(1));
        let k = usize::from(a / cols != b / cols) + usize::from(a % cols != b % cols);
        changed += n as f64 * k as f64 / 2.0;
        total += n as f64;
    }
    if total > 0.0 { changed / total } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After epoch `epoch` of PTB's schedule [20, 20, 20, 5, 5, 5] (or none).
    fn budget(epoch: u64, scheduled: bool) -> Budget {
        let lrs = [20.0, 20.0, 20.0, 5.0, 5.0, 5.0];
        Budget {
            epoch,
            epochs_left: 6.0 - epoch as f64,
            lr_next: lrs[epoch as usize],
            lr_ahead: if scheduled {
                lrs[epoch as usize..].to_vec()
            } else {
                Vec::new()
            },
        }
    }

    /// The first round moves freely and takes its predicted gain at its word; what the
    /// move then shows (its disruption, its recovery, the share of its gain the
    /// validation loss shows) prices the later rounds; the gain counts only at the
    /// schedule's lower rates.
    #[test]
    fn the_rule_learns_the_price_the_recovery_and_the_payoff_of_a_move() {
        let mut s = AutoState::default();
        let b1 = budget(1, true);
        let run = |s: &AutoState, b: &Budget| match s.plan(b) {
            Plan::Run {
                move_cost,
                recovery_epochs,
                payoff_epochs,
                realized,
            } => (move_cost, recovery_epochs, payoff_epochs, realized),
            Plan::Skip(why) => panic!("skipped: {why}"),
        };
        // Recovery in epoch 2, the gain in epochs 4-6 at lr 5.
        assert_eq!(run(&s, &b1), (0.0, 1.0, 3.0, 1.0));
        // PTB's first move: g = 1.68 nats, D = 3.35, the rows and columns of 56 % of
        // the occurrences changed.
        assert!(AutoState::keeps(1.0, 3.0, 1.0, 1.68, 3.35));
        s.moved(&b1, 5.8345, 1.68, 3.35, 0.56);
        let d = 3.35 / 0.56;
        assert_eq!(s.disruption, Some(d));
        // Validation not back yet: no round.
        s.observe(2, 5.9);
        assert!(matches!(s.plan(&budget(2, true)), Plan::Skip(_)));
        // Back after 2 epochs at lr 20, 0.168 nats below: a tenth of the gain showed.
        s.observe(3, 5.6665);
        assert_eq!(
            s.recovery,
            Some(Recovery {
                epochs: 2.0,
                lr: 20.0
            })
        );
        let r = s.realized.unwrap();
        assert!((r - 0.1).abs() < 1e-9, "{r}");
        // Had epoch 2 ended so: recovery in epochs 3-4, the gain in 5-6.
        let (move_cost, t, settled, realized) = run(&s, &budget(2, true));
        assert_eq!((t, settled, realized), (2.0, 2.0, r));
        assert!((move_cost - d * 2.0 / (4.0 * r * 2.0)).abs() < 1e-9);
        // After epoch 3 the rate drops to 5: recovery takes four times as long.
        assert!(matches!(s.plan(&budget(3, true)), Plan::Skip(_)));
        assert_eq!(s.recovery_epochs(5.0), 8.0);
        // Without a schedule no lower rate is known ahead: no round.
        let Plan::Skip(why) = AutoState::default().plan(&budget(1, false)) else {
            panic!("a round without a schedule")
        };
        assert!(why.contains("schedule"), "{why}");
        // A gain that would pay at its word does not at a tenth of it.
        assert!(AutoState::keeps(2.0, 3.0, 1.0, 0.6, 1.2));
        assert!(!AutoState::keeps(2.0, 3.0, 0.1, 0.6, 1.2));
        assert!(!AutoState::keeps(1.0, 3.0, 1.0, f64::NAN, 1.0));
        assert!(!AutoState::keeps(1.0, 3.0, 1.0, -0.1, 0.0));
        // A move that recovered without showing any gain stops the rounds.
        let mut z = AutoState::default();
        z.moved(&b1, 5.8, 1.0, 3.0, 0.5);
        z.observe(2, 5.8);
        assert_eq!(z.realized, Some(0.0));
        assert!(matches!(z.plan(&budget(2, true)), Plan::Skip(_)));
    }

    /// A kept move not back at its level by twice its expected recovery is overdue; a
    /// revert measures its (negative) realised share, and no round runs after it.
    #[test]
    fn the_guard_undoes_a_move_that_has_not_recovered_in_twice_its_expected_time() {
        let mut s = AutoState::default();
        let b1 = budget(1, true);
        s.moved(&b1, 5.80, 1.0, 3.0, 0.5);
        let w = s.watch.unwrap();
        assert_eq!((w.expected_recovery, w.deadline()), (Some(1.0), 3));
        s.observe(2, 5.95);
        assert_eq!(s.overdue(2), None, "one epoch of the two allowed");
        s.observe(3, 5.85);
        assert_eq!(s.overdue(3), Some(w));
        let r = s.reverted(5.85);
        assert!((r - (5.80 - 5.85) / 1.0).abs() < 1e-12, "{r}");
        assert_eq!((s.watch, s.realized), (None, Some(r)));
        // (Budget 2's schedule would pay for a move; the revert's share forbids it.)
        let Plan::Skip(why) = s.plan(&budget(2, true)) else {
            panic!("a round after a revert")
        };
        assert!(why.contains("none of its predicted gain"), "{why}");
        // A move that recovers in time is never overdue.
        let mut k = AutoState::default();
        k.moved(&b1, 5.80, 1.0, 3.0, 0.5);
        k.observe(2, 5.70);
        assert_eq!(k.overdue(2), None);
        assert_eq!(k.overdue(9), None);
        // The allowance scales with the expected recovery (a slower, later rate), and a
        // watch from a checkpoint before the guard takes the prior.
        let slow = Watch {
            expected_recovery: Some(2.5),
            ..w
        };
        assert_eq!(slow.deadline(), 1 + 5);
        let old: Watch =
            serde_json::from_str(r#"{"epoch": 4, "valid_loss": 5.0, "lr": 5.0, "gain": 0.5}"#)
                .unwrap();
        assert_eq!(old.deadline(), 6);
        let tiny = Watch {
            expected_recovery: Some(0.1),
            ..w
        };
        assert_eq!(tiny.deadline(), 2, "at least one epoch");
    }

    /// Figures a skip does not measure are NaN, which JSON writes as null: the state
    /// reads back from a checkpoint all the same.
    #[test]
    fn a_state_with_unmeasured_figures_reads_back_from_json() {
        let mut s = AutoState::default();
        s.decisions.push(Decision {
            epoch: 3,
            decision: Verdict::Skip,
            why: "2.00 epochs left".into(),
            epochs_left: f64::INFINITY,
            recovery_epochs: 8.0,
            payoff_epochs: f64::NAN,
            move_cost: f64::NAN,
            realized: 1.0,
            predicted_gain: f64::NAN,
            disruption: f64::NAN,
            moved_share: 0.0,
            words_moved: 0,
        });
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"move_cost\":null"), "{json}");
        let back: AutoState = serde_json::from_str(&json).unwrap();
        let d = &back.decisions[0];
        assert!(d.move_cost.is_nan() && d.predicted_gain.is_nan() && d.epochs_left.is_nan());
        assert_eq!((d.decision, d.recovery_epochs), (Verdict::Skip, 8.0));
    }

    #[test]
    fn the_moved_share_counts_rows_and_columns_by_occurrence() {
        // 3 x 3 cells: word 0 keeps its cell, 1 changes its column, 2 both.
        let old = [0u32, 1, 2];
        let new = [0u32, 2, 4];
        let counts = [10u64, 4, 6];
        let s = moved_share(&old, &new, &counts, 3);
        assert!((s - (4.0 * 0.5 + 6.0) / 20.0).abs() < 1e-12);
        assert_eq!(moved_share(&old, &old, &counts, 3), 0.0);
        assert_eq!(moved_share(&old, &new, &[0, 0, 0], 3), 0.0);
    }
}
