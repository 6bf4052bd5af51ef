//! What a run reports, as types every side shares: the lines of `metrics.jsonl`
//! ([`MetricsLine`], written by the trainer, read by `lightrnn plot`), the end-of-run
//! [`Summary`] (`summary.json`, the last stdout line, the coordinator's outcome), the
//! [`EpochRecord`]s of its history (also in every checkpoint), and a rank's
//! [`RankReport`] (heartbeats, `/metrics`).

use serde::{Deserialize, Serialize};

use lightrnn_alloc::nan_if_null;

use crate::config::TrainConfig;

/// Validation result of one epoch (kept for the summary).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub step: u64,
    pub lr: f64,
    pub train_loss: f64,
    pub valid_loss: f64,
    pub valid_ppl: f64,
    pub seconds: f64,
}

/// Why a run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoppedBy {
    /// Every epoch of the config ran.
    Epochs,
    /// The step budget (`max_steps`) was reached.
    MaxSteps,
    /// A stop was requested (SIGTERM, SIGINT, SIGUSR1, or the coordinator's).
    Signal,
}

impl StoppedBy {
    /// The name `summary.json` uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Epochs => "epochs",
            Self::MaxSteps => "max_steps",
            Self::Signal => "signal",
        }
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
    pub stopped_by: StoppedBy,
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
    /// With `realloc_every = "auto"`: what the rule measured and every decision it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_realloc: Option<crate::auto::AutoState>,
    /// SHA-256 of the final parameters (`lightrnn inspect` and every rank compute the
    /// same): two runs ended with the same model when these agree.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub params_sha256: String,
}

impl Summary {
    /// The one JSON line a training command prints: the summary's main figures and the
    /// run directory `out`. `seconds` and `words_per_sec` are this session's;
    /// `train_seconds`, `steps` and the losses the whole run's, across resumes.
    pub fn line(&self, out: &str) -> serde_json::Value {
        serde_json::json!({
            "train_loss": self.train_loss, "train_ppl": self.train_ppl,
            "valid_ppl": self.valid_ppl, "test_ppl": self.test_ppl,
            "words_per_sec": self.words_per_sec, "params": self.params,
            "seconds": self.seconds, "train_seconds": self.train_seconds, "steps": self.steps,
            "epochs_completed": self.epochs_completed, "stopped_by": self.stopped_by,
            "params_sha256": self.params_sha256, "out": out,
        })
    }
}

fn one() -> usize {
    1
}

/// One line of `metrics.jsonl`, tagged by `kind`. Lines of kinds this version does not
/// know read as [`MetricsLine::Other`]; a field a line lacks (one written by another
/// tool) reads as not measured: NaN, or 0 for counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricsLine {
    /// A logging window of training steps.
    Train(TrainLine),
    /// Validation after an epoch (or at a stop inside one).
    Valid(ValidLine),
    /// The test evaluation at the end of the run.
    Test(TestLine),
    /// A word reallocation.
    Realloc(ReallocLine),
    /// Where the logging window's time went, phase by phase.
    Profile(ProfileLine),
    #[serde(other)]
    Other,
}

impl MetricsLine {
    /// The step the line was written at (None for unknown kinds).
    pub fn step(&self) -> Option<u64> {
        match self {
            Self::Train(l) => Some(l.step),
            Self::Valid(l) => Some(l.step),
            Self::Test(l) => Some(l.step),
            Self::Realloc(l) => Some(l.step),
            Self::Profile(l) => Some(l.step),
            Self::Other => None,
        }
    }
}

/// Loss per word `loss` as a perplexity.
pub fn ppl(loss: f64) -> f64 {
    loss.exp()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainLine {
    pub step: u64,
    /// 1-based epoch in progress.
    pub epoch: u64,
    /// Mean training loss per word of the window, over all ranks.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub ppl: f64,
    /// Words per second of the whole job over the window.
    #[serde(deserialize_with = "nan_if_null")]
    pub words_per_sec: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// Gradient norm of the window's last step (before clipping).
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Training seconds of the run so far.
    #[serde(deserialize_with = "nan_if_null")]
    pub seconds: f64,
    /// Words per second of each rank over the window (jobs of more than one rank).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_words_per_sec: Vec<f64>,
}

/// The phases of the logging window that ends at `step` (the leader's): seconds per
/// training step of each phase that ran in it, the phases of a step nesting as
/// `lightrnn_kernels::profile` says, and the work between steps (checkpoints,
/// evaluation, reallocation rounds) spread over the window's steps.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProfileLine {
    pub step: u64,
    pub epoch: u64,
    /// Training steps in the window.
    pub steps: u64,
    /// Phase name -> seconds per step.
    pub seconds_per_step: std::collections::BTreeMap<String, f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ValidLine {
    pub step: u64,
    pub epoch: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub ppl: f64,
    /// Mean training loss per word of the epoch.
    #[serde(deserialize_with = "nan_if_null")]
    pub train_loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub seconds: f64,
    /// Measured at a stop inside an epoch (not an epoch's end).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial_epoch: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TestLine {
    pub step: u64,
    pub epoch: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub ppl: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReallocLine {
    pub step: u64,
    /// The epoch after which the words moved (1-based).
    pub epoch: u64,
    /// Reallocation round (1, 2, ...).
    pub round: u64,
    #[serde(flatten)]
    pub report: lightrnn_alloc::Report,
    /// With `realloc_every = "auto"`: what the rule decided, and from which figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<Box<crate::auto::Decision>>,
}

impl Default for TrainLine {
    fn default() -> Self {
        Self {
            step: 0,
            epoch: 0,
            loss: f64::NAN,
            ppl: f64::NAN,
            words_per_sec: f64::NAN,
            lr: f64::NAN,
            grad_norm: f64::NAN,
            seconds: f64::NAN,
            rank_words_per_sec: Vec::new(),
        }
    }
}

impl Default for ValidLine {
    fn default() -> Self {
        Self {
            step: 0,
            epoch: 0,
            loss: f64::NAN,
            ppl: f64::NAN,
            train_loss: f64::NAN,
            lr: f64::NAN,
            seconds: f64::NAN,
            partial_epoch: false,
        }
    }
}

impl Default for TestLine {
    fn default() -> Self {
        Self {
            step: 0,
            epoch: 0,
            loss: f64::NAN,
            ppl: f64::NAN,
            seconds: f64::NAN,
        }
    }
}

impl Default for ReallocLine {
    fn default() -> Self {
        Self {
            step: 0,
            epoch: 0,
            round: 0,
            report: lightrnn_alloc::Report::unmeasured(),
            auto: None,
        }
    }
}

/// Where a rank is and how fast it goes: what the job's metrics (`/metrics`) show.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RankReport {
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    /// Training loss (nats per word) of the last logging window, over all ranks.
    pub loss: f64,
    /// Words per second of this rank over the last logging window.
    pub words_per_sec: f64,
    /// Words per second of the whole job over the last logging window.
    pub global_words_per_sec: f64,
    /// Validation perplexity after the last epoch (0: none yet).
    pub valid_ppl: f64,
    pub lr: f64,
    /// The last checkpoint this rank saw committed: its step, the seconds it took
    /// (state gathering, writing, commit) and its bytes (rank 0 knows them).
    pub checkpoint_step: u64,
    pub checkpoint_seconds: f64,
    pub checkpoint_bytes: u64,
    /// Checkpoints committed in this session.
    pub checkpoints: u64,
    /// The rank's waits on its ring neighbours in collectives, per neighbour and
    /// direction, since its ring formed (empty for a job of one rank).
    pub waits: Vec<LinkWaits>,
    /// Seconds per step of each phase over the last logging window (its `profile` line).
    pub phases: std::collections::BTreeMap<String, f64>,
}

/// Upper bounds (seconds) of the buckets of [`LinkWaits::buckets`]; a last bucket holds
/// the longer waits.
pub const WAIT_BUCKETS: [f64; 6] = [0.001, 0.01, 0.1, 1.0, 10.0, 60.0];

/// Which way a rank's bytes go on one of its ring connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkDirection {
    /// Receiving from the left neighbour: waiting for its bytes.
    #[default]
    Receive,
    /// Sending to the right neighbour: waiting for room in the connection (its reads).
    Send,
}

impl LinkDirection {
    /// The name the metrics' `direction` label uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Receive => "receive",
            Self::Send => "send",
        }
    }
}

/// How long a rank waited on one neighbour in one direction of its collectives: one
/// wait is one message of a collective's step (a chunk, a broadcast), from its first
/// byte asked to its last byte moved.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LinkWaits {
    pub peer: usize,
    pub direction: LinkDirection,
    /// Seconds of all the waits.
    pub seconds: f64,
    pub count: u64,
    /// Waits that passed their stall threshold (each logged a warning while it lasted).
    pub stalls: u64,
    /// Waits per bucket of [`WAIT_BUCKETS`] (at most its bound, above the one before),
    /// the last one above every bound; not cumulative.
    pub buckets: [u64; WAIT_BUCKETS.len() + 1],
}

impl LinkWaits {
    /// Count one wait of `seconds`.
    pub fn observe(&mut self, seconds: f64) {
        let b = WAIT_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(WAIT_BUCKETS.len());
        self.buckets[b] += 1;
        self.count += 1;
        self.seconds += seconds;
    }
}

/// Where a single-process run publishes its [`RankReport`] (for a metrics endpoint).
pub type ReportSink = std::sync::Arc<std::sync::Mutex<Option<RankReport>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_falls_in_the_first_bucket_that_holds_it() {
        let mut w = LinkWaits::default();
        for s in [0.0005, 0.001, 0.05, 3.0, 61.0] {
            w.observe(s);
        }
        assert_eq!(w.buckets, [2, 0, 1, 0, 1, 0, 1]);
        assert_eq!(w.count, 5);
        assert!((w.seconds - 64.0515).abs() < 1e-9, "{}", w.seconds);
    }

    #[test]
    fn metrics_lines_round_trip_and_unknown_kinds_are_kept_apart() {
        let lines = [
            MetricsLine::Train(TrainLine {
                step: 10,
                epoch: 1,
                loss: 5.0,
                ppl: ppl(5.0),
                words_per_sec: 1e4,
                lr: 20.0,
                grad_norm: 0.5,
                seconds: 1.5,
                rank_words_per_sec: vec![5e3, 5e3],
            }),
            MetricsLine::Profile(ProfileLine {
                step: 10,
                epoch: 1,
                steps: 10,
                seconds_per_step: [("data".to_string(), 0.25)].into_iter().collect(),
            }),
            MetricsLine::Valid(ValidLine {
                step: 10,
                epoch: 1,
                loss: 5.1,
                ppl: ppl(5.1),
                train_loss: 5.0,
                lr: 20.0,
                seconds: 1.5,
                partial_epoch: true,
            }),
        ];
        for l in &lines {
            let text = serde_json::to_value(l).unwrap().to_string();
            let back: MetricsLine = serde_json::from_str(&text).unwrap();
            assert_eq!(&back, l);
        }
        // The tag comes with the other keys, sorted, as metrics.jsonl has always had it.
        let text = serde_json::to_value(&lines[0]).unwrap().to_string();
        assert!(
            text.starts_with(r#"{"epoch":1,"grad_norm":0.5,"kind":"train""#),
            "{text}"
        );
        let other: MetricsLine = serde_json::from_str(r#"{"kind":"future","step":3}"#).unwrap();
        assert_eq!((other.clone(), other.step()), (MetricsLine::Other, None));
        // A partial line (another tool's) reads with the rest unmeasured.
        let MetricsLine::Train(t) = serde_json::from_str(r#"{"kind":"train","step":3}"#).unwrap()
        else {
            panic!("a train line");
        };
        assert!(t.step == 3 && t.ppl.is_nan());
        let MetricsLine::Realloc(r) =
            serde_json::from_str(r#"{"kind":"realloc","step":20,"round":1}"#).unwrap()
        else {
            panic!("a realloc line");
        };
        assert!(r.round == 1 && r.report.objective_after.is_nan());
        // What is not measured is written as null (NaN) and reads back as NaN: a round
        // the automatic rule skipped, a window whose gradient norm overflowed.
        let skipped = MetricsLine::Realloc(ReallocLine {
            step: 68,
            epoch: 1,
            ..ReallocLine::default()
        });
        let text = serde_json::to_value(&skipped).unwrap().to_string();
        assert!(text.contains(r#""objective_before":null"#), "{text}");
        let MetricsLine::Realloc(r) = serde_json::from_str(&text).unwrap() else {
            panic!("a realloc line");
        };
        assert!(r.step == 68 && r.report.objective_before.is_nan());
        assert!(r.report.seconds_solve.is_nan() && r.report.lower_bound.is_nan());
        let text = r#"{"kind":"train","step":4,"loss":3.0,"grad_norm":null,"ppl":null}"#;
        let MetricsLine::Train(t) = serde_json::from_str(text).unwrap() else {
            panic!("a train line");
        };
        assert!(t.loss == 3.0 && t.grad_norm.is_nan() && t.ppl.is_nan());
        assert!(serde_json::from_str::<MetricsLine>(r#"{"kind":"train","step":"x"}"#).is_err());
    }
}
