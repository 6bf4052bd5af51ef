//! The training configuration: TOML presets, files, and `key=value` overrides. Unknown
//! keys are errors (a typo must not silently train something else). The effective
//! configuration is written into every checkpoint and `summary.json`.

use serde::{Deserialize, Serialize};

use lightrnn_alloc::{Carry, Solver};
use lightrnn_kernels::Optimizer;

use crate::{Error, Result, clip, clip_lines};

/// Built-in presets: (name, TOML text).
pub const PRESETS: &[(&str, &str)] = &[
    ("ptb-small", include_str!("../presets/ptb-small.toml")),
    (
        "ptb-small-realloc",
        include_str!("../presets/ptb-small-realloc.toml"),
    ),
    ("ptb-medium", include_str!("../presets/ptb-medium.toml")),
    (
        "billion-word-512",
        include_str!("../presets/billion-word-512.toml"),
    ),
    (
        "billion-word-1024",
        include_str!("../presets/billion-word-1024.toml"),
    ),
    ("tiny", include_str!("../presets/tiny.toml")),
];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    // Model.
    /// Words in the vocabulary (0 = every training type).
    pub vocab_size: usize,
    pub emb: usize,
    pub hidden: usize,
    pub layers: usize,
    pub dropout: f64,
    // Data.
    pub lowercase: bool,
    pub max_line_bytes: usize,
    /// Lines that are not UTF-8, hold control bytes (NUL...) or exceed max_line_bytes:
    /// "error" stops with the object and line named, "skip" leaves them out and counts
    /// them.
    pub bad_lines: String,
    pub shard_tokens: u64,
    // Optimisation.
    pub epochs: u64,
    /// Stop after this many updates in total (0 = no limit).
    pub max_steps: u64,
    /// Streams per batch (the global batch).
    pub batch: usize,
    /// Words per stream per batch (truncated BPTT length).
    pub bptt: usize,
    /// Streams for validation and test.
    pub eval_batch: usize,
    /// "sgd", "adam" or "adagrad".
    pub optimizer: String,
    pub lr: f64,
    /// Divide lr by this when validation perplexity does not improve (1 = never).
    pub lr_decay: f64,
    /// Learning rate of each epoch (the last one repeats); when set, replaces `lr` and
    /// the plateau rule, so runs compared with each other share one schedule.
    pub lr_schedule: Vec<f64>,
    /// Global gradient-norm clipping (0 = off).
    pub clip: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub adagrad_eps: f64,
    pub adagrad_initial_accumulator: f64,
    pub seed: u64,
    /// CPU threads (0 = all cores).
    pub threads: usize,
    /// CUDA backend: capture each training step as a CUDA graph and replay it (one launch
    /// a step); false: plain kernel launches. A capture the device refuses falls back to
    /// plain launches by itself.
    pub cuda_graphs: bool,
    /// Gradient groups: the global batch's streams are cut into this many equal groups,
    /// each run forward/backward on its own, their gradients summed in a fixed pairwise
    /// order. With G a power of two and W workers dividing it (W = 1 or 2), the results
    /// are bit-identical whatever W is. 0: one group per worker (the fastest).
    pub grad_groups: usize,
    // Bookkeeping.
    /// Steps between metrics lines (and log lines when not on a terminal).
    pub log_every: u64,
    /// Steps between checkpoints (0 = only at the end of each epoch and of the run).
    pub checkpoint_every: u64,
    /// Checkpoints kept (the newest ones).
    pub keep_checkpoints: usize,
    /// Also keep every checkpoint whose step is a multiple of this (0: none).
    pub keep_every: u64,
    /// TensorBoard event files in the run directory's `tb/` (written by rank 0).
    pub tensorboard: bool,
    /// Time each phase of the steps: a metrics `profile` line per logging window, the
    /// ranks' phases in Prometheus (false: no clock is read for them).
    pub profile: bool,
    /// "A:B": a Chrome trace-event file of steps A to B (1-based, with the work that
    /// follows B until the next step) per rank in `profile/` ("": none).
    pub profile_steps: String,
    // Word reallocation.
    /// Reallocate after every this many epochs (0 = never), or "auto" (the default): the
    /// trainer decides after each epoch whether a round pays and which words move
    /// ([`ReallocEvery`]).
    pub realloc_every: ReallocEvery,
    /// First epoch after which to reallocate (0 = realloc_every).
    pub realloc_start: u64,
    /// Most reallocations in a run (0 = no limit).
    pub realloc_rounds: u64,
    /// "scalable", "exact" or "greedy".
    pub realloc_solver: Solver,
    /// Vectors that follow their words: "inputs", "none" or "all" (see docs/allocation.md).
    pub realloc_carry: Carry,
    /// Measure the training loss right after each move (one more pass over the data).
    pub realloc_check: bool,
    /// Nats per occurrence charged for moving a word to another row, and again to another
    /// column (0 = free moves).
    pub realloc_move_cost: f64,
    /// Refuse dense loss tables larger than this (GiB); sparse tables are built in
    /// passes over ranges of words whose dense tables take at most this.
    pub realloc_max_table_gib: f64,
    /// Candidate rows and columns per word of sparse loss tables (docs/allocation.md,
    /// "Sparse tables"). 0: dense tables where they fit in realloc_max_table_gib, beyond
    /// that sparse ones with as many candidates as fit in it ([`AUTO_SPARSE_K`]).
    pub realloc_sparse: usize,
}

/// When reallocation rounds run: after every `n` epochs (`realloc_every = n`, 0 = never),
/// or `"auto"`. Written as the number or the word, as it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReallocEvery {
    Epochs(u64),
    Auto,
}

impl ReallocEvery {
    pub fn is_auto(self) -> bool {
        self == Self::Auto
    }
}

impl Serialize for ReallocEvery {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Epochs(n) => s.serialize_u64(*n),
            Self::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for ReallocEvery {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ReallocEvery;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number of epochs (0: never) or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> std::result::Result<Self::Value, E> {
                Ok(ReallocEvery::Epochs(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> std::result::Result<Self::Value, E> {
                u64::try_from(n)
                    .map(ReallocEvery::Epochs)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
            }
            fn visit_str<E: serde::de::Error>(
                self,
                t: &str,
            ) -> std::result::Result<Self::Value, E> {
                match t {
                    "auto" => Ok(ReallocEvery::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(t), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The candidates per word a round picks for itself where the dense tables do not fit
/// (`realloc_sparse = 0`): as many as the round's memory bound allows within
/// `realloc_max_table_gib`, between these two. At V = 1M (docs/benchmarks.md, section
/// 13) 16 give +6.0 % over the dense tables' solution, 64 +1.9 %, 144 +0.37 %.
pub const AUTO_SPARSE_K: std::ops::RangeInclusive<usize> = 16..=144;

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            vocab_size: 0,
            emb: 200,
            hidden: 200,
            layers: 2,
            dropout: 0.0,
            lowercase: false,
            max_line_bytes: 1 << 20,
            bad_lines: "error".into(),
            shard_tokens: crate::data::shards::SHARD_TOKENS,
            epochs: 1,
            max_steps: 0,
            batch: 20,
            bptt: 35,
            eval_batch: 10,
            optimizer: "sgd".into(),
            lr: 20.0,
            lr_decay: 4.0,
            clip: 0.25,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            adagrad_eps: 1e-10,
            adagrad_initial_accumulator: 0.0,
            seed: 1111,
            threads: 0,
            cuda_graphs: true,
            grad_groups: 0,
            log_every: 100,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            keep_every: 0,
            tensorboard: true,
            profile: true,
            profile_steps: String::new(),
            lr_schedule: Vec::new(),
            realloc_every: ReallocEvery::Auto,
            realloc_start: 0,
            realloc_rounds: 0,
            realloc_solver: Solver::Scalable,
            realloc_carry: Carry::Inputs,
            realloc_check: false,
            realloc_move_cost: 0.0,
            realloc_max_table_gib: 16.0,
            realloc_sparse: 0,
        }
    }
}

/// The steps `A:B` of a `profile_steps` value ("" = none): 1 <= A <= B.
pub fn profile_steps(s: &str) -> Result<Option<(u64, u64)>> {
    if s.is_empty() {
        return Ok(None);
    }
    let parsed = s
        .split_once(':')
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)));
    match parsed {
        Some((a, b)) if a >= 1 && a <= b => Ok(Some((a, b))),
        _ => Err(Error::Config(format!(
            "profile_steps {s:?}: want A:B, the first and last step to trace (1 <= A <= B)"
        ))),
    }
}

/// The largest configuration file read.
pub const CONFIG_MAX_BYTES: usize = 1 << 20;

/// `value` as the kind of TOML value `old` is (an integer where a float is wanted is
/// that float), or what the key wants, in words.
fn same_kind(key: &str, old: &toml::Value, value: toml::Value) -> Result<toml::Value, String> {
    use toml::Value as V;
    if key == "realloc_every" {
        return match value {
            V::Integer(n) if n >= 0 => Ok(V::Integer(n)),
            V::String(t) if t == "auto" => Ok(V::String(t)),
            _ => Err("a whole number of epochs (0: never) or auto".into()),
        };
    }
    match (old, value) {
        (V::Integer(_), V::Integer(n)) if n >= 0 => Ok(V::Integer(n)),
        (V::Integer(_), _) => Err("a whole number".into()),
        (V::Float(_), V::Float(x)) => Ok(V::Float(x)),
        (V::Float(_), V::Integer(n)) => Ok(V::Float(n as f64)),
        (V::Float(_), _) => Err("a number".into()),
        (V::Boolean(_), V::Boolean(b)) => Ok(V::Boolean(b)),
        (V::Boolean(_), _) => Err("true or false".into()),
        (V::String(_), V::String(t)) => Ok(V::String(t)),
        // A setting that is a word (solver, optimizer, ...) given as a number, say.
        (V::String(_), other) => Ok(V::String(other.to_string())),
        (V::Array(_), V::Array(a)) => Ok(V::Array(a)),
        (V::Array(_), _) => Err(format!("a list in TOML syntax, e.g. {key}=[1.0, 0.5]")),
        (_, other) => Ok(other),
    }
}

/// The key closest to `typo` by edit distance, when it is close (at most 2 edits, or a
/// third of the word).
fn nearest<'a>(typo: &str, keys: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let dist = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, &cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    };
    if typo.len() > 64 {
        return None;
    }
    keys.map(|k| (dist(typo, k), k))
        .min()
        .filter(|&(d, _)| d <= 2.max(typo.chars().count() / 3))
        .map(|(_, k)| k)
}

impl TrainConfig {
    /// A preset by name.
    pub fn preset(name: &str) -> Result<Self> {
        let (_, text) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            let names: Vec<_> = PRESETS.iter().map(|(n, _)| *n).collect();
            Error::Config(format!(
                "unknown preset {name:?} (available: {})",
                names.join(", ")
            ))
        })?;
        Self::from_toml(text, &format!("preset {name}"))
    }

    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        if text.len() > CONFIG_MAX_BYTES {
            return Err(Error::Config(format!(
                "{origin} is {} bytes; a configuration is at most {} KiB",
                text.len(),
                CONFIG_MAX_BYTES >> 10
            )));
        }
        let c: Self = toml::from_str(text)
            .map_err(|e| Error::Config(clip_lines(&format!("{origin}: {e}"))))?;
        c.validate()?;
        Ok(c)
    }

    /// Apply `key=value` overrides (values in TOML syntax; bare words are strings).
    pub fn with_overrides(&self, sets: &[String]) -> Result<Self> {
        if sets.is_empty() {
            return Ok(self.clone());
        }
        let mut table = toml::Table::try_from(self).map_err(|e| Error::Config(e.to_string()))?;
        for s in sets {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("--set {:?}: expected key=value", clip(s))))?;
            let (k, v) = (k.trim(), v.trim());
            let Some(old) = table.get(k) else {
                let hint = nearest(k, table.keys().map(String::as_str))
                    .map(|n| format!(" (did you mean {n}?)"))
                    .unwrap_or_default();
                return Err(Error::Config(format!(
                    "--set: unknown key {:?}{hint}; `lightrnn config --list` shows them all",
                    clip(k)
                )));
            };
            let value = match toml::from_str::<toml::Table>(&format!("v = {v}")) {
                Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(v.to_string())),
                Err(_) => toml::Value::String(v.to_string()),
            };
            let value = same_kind(k, old, value).map_err(|want| {
                Error::Config(format!("--set {k}={}: {k} must be {want}", clip(v)))
            })?;
            table.insert(k.to_string(), value);
        }
        let c: Self = table
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(clip_lines(&format!("--set: {e}"))))?;
        c.validate()?;
        Ok(c)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// The steps `A:B` of `profile_steps` to trace (None: "").
    pub fn profile_range(&self) -> Result<Option<(u64, u64)>> {
        profile_steps(&self.profile_steps)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.emb == 0 || self.hidden == 0 || self.layers == 0 || self.layers > 32 {
            return bad(format!(
                "emb {}, hidden {}, layers {}: need positive sizes and at most 32 layers",
                self.emb, self.hidden, self.layers
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} is not in [0, 1)", self.dropout));
        }
        if self.batch == 0 || self.bptt == 0 || self.eval_batch == 0 {
            return bad("batch, bptt and eval_batch must be positive".into());
        }
        if self.epochs == 0 && self.max_steps == 0 {
            return bad("epochs = 0 and max_steps = 0: nothing to train".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) || self.lr_decay < 1.0 || self.clip < 0.0 {
            return bad(format!(
                "lr {} must be positive, lr_decay {} >= 1, clip {} >= 0",
                self.lr, self.lr_decay, self.clip
            ));
        }
        if self.max_line_bytes == 0
            || self.shard_tokens == 0
            || self.log_every == 0
            || self.keep_checkpoints == 0
        {
            return bad(
                "max_line_bytes, shard_tokens, log_every and keep_checkpoints must be positive"
                    .into(),
            );
        }
        self.optimizer_rule()?;
        self.profile_range()?;
        self.bad_lines.parse::<crate::data::text::BadLines>()?;
        if self
            .lr_schedule
            .iter()
            .any(|&x| !(x > 0.0 && x.is_finite()))
        {
            return bad(format!(
                "lr_schedule {:?}: every learning rate must be positive",
                self.lr_schedule
            ));
        }
        if !(self.realloc_move_cost >= 0.0 && self.realloc_move_cost.is_finite()) {
            return bad(format!(
                "realloc_move_cost {} must be >= 0",
                self.realloc_move_cost
            ));
        }
        if self.realloc_max_table_gib.is_nan() || self.realloc_max_table_gib <= 0.0 {
            return bad("realloc_max_table_gib must be positive".into());
        }
        if self.grad_groups > 0 && !self.batch.is_multiple_of(self.grad_groups) {
            return bad(format!(
                "batch {} must be a multiple of grad_groups {}",
                self.batch, self.grad_groups
            ));
        }
        Ok(())
    }

    /// Whether the batches split over `world` ranks: the batch evenly, every rank at
    /// least one evaluation stream, and the gradient groups (see [`Self::groups_for`]).
    pub fn check_world(&self, world: usize) -> Result<()> {
        if world == 0 || !self.batch.is_multiple_of(world) || self.eval_batch < world {
            return Err(Error::Config(format!(
                "batch {} must split evenly over {world} ranks, and eval_batch {} must give each at least one stream",
                self.batch, self.eval_batch
            )));
        }
        self.groups_for(world).map(|_| ())
    }

    /// Gradient groups of a job of `world` ranks (see `grad_groups`).
    pub fn groups_for(&self, world: usize) -> Result<usize> {
        let g = if self.grad_groups == 0 {
            world
        } else {
            self.grad_groups
        };
        if world == 0 || !g.is_multiple_of(world) || !self.batch.is_multiple_of(g) {
            return Err(Error::Config(format!(
                "{world} workers need grad_groups (now {}) to be a multiple of {world}, and batch {} to be a multiple of the groups",
                self.grad_groups, self.batch
            )));
        }
        Ok(g)
    }

    /// Learning rate at the start of epoch `epoch` (0-based), if a schedule is set.
    pub fn scheduled_lr(&self, epoch: u64) -> Option<f64> {
        scheduled(&self.lr_schedule, epoch)
    }

    /// Bytes of dense loss tables a round may hold (one range's, of sparse tables).
    pub fn realloc_max_table_bytes(&self) -> u64 {
        (self.realloc_max_table_gib * (1u64 << 30) as f64) as u64
    }

    /// Candidates per word of a round's sparse loss tables for a V x (R + C) model
    /// (0: the round builds dense tables).
    pub fn realloc_sparse_k(&self, vocab: usize, rows: usize, cols: usize) -> usize {
        self.realloc().sparse_k(vocab, rows, cols)
    }

    /// Whether to reallocate after epoch `epoch` (1-based) with `done` reallocations so far
    /// (with `realloc_every = "auto"`: whether a round is considered at all; the rule in
    /// `crate::auto` decides whether it runs and moves).
    pub fn realloc_after(&self, epoch: u64, done: u64) -> bool {
        self.realloc().after(epoch, done)
    }

    /// How long the run trains and at which learning rates.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            epochs: self.epochs,
            max_steps: self.max_steps,
            lr_decay: self.lr_decay,
            lr_schedule: self.lr_schedule.clone(),
        }
    }

    /// How validation and test passes read a split.
    pub fn eval(&self) -> EvalSettings {
        EvalSettings {
            batch: self.eval_batch,
            bptt: self.bptt,
        }
    }

    /// When checkpoints are written and which are kept.
    pub fn checkpoints(&self) -> CheckpointSettings {
        CheckpointSettings {
            every: self.checkpoint_every,
            keep: self.keep_checkpoints,
            keep_every: self.keep_every,
        }
    }

    /// When reallocation rounds run and how.
    pub fn realloc(&self) -> ReallocSettings {
        ReallocSettings {
            every: self.realloc_every,
            start: self.realloc_start,
            rounds: self.realloc_rounds,
            epochs: self.epochs,
            carry: self.realloc_carry,
            check: self.realloc_check,
            move_cost: self.realloc_move_cost,
            max_table_bytes: self.realloc_max_table_bytes(),
            sparse: self.realloc_sparse,
        }
    }

    pub fn optimizer_rule(&self) -> Result<Optimizer> {
        match self.optimizer.as_str() {
            "sgd" => Ok(Optimizer::Sgd),
            "adam" => Ok(Optimizer::Adam {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_eps,
            }),
            "adagrad" => Ok(Optimizer::Adagrad {
                eps: self.adagrad_eps,
                initial_accumulator: self.adagrad_initial_accumulator,
            }),
            other => Err(Error::Config(format!(
                "optimizer {other:?}: expected sgd, adam or adagrad"
            ))),
        }
    }

    pub fn text_options(&self) -> crate::data::text::TextOptions {
        crate::data::text::TextOptions {
            lowercase: self.lowercase,
            max_line_bytes: self.max_line_bytes,
            bad_lines: self.bad_lines.parse().unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// Learning rate at the start of epoch `epoch` (0-based) of `schedule`, if one is set.
fn scheduled(schedule: &[f64], epoch: u64) -> Option<f64> {
    let last = schedule.len().checked_sub(1)?;
    Some(schedule[(epoch as usize).min(last)])
}

/// The run's budget and learning-rate schedule ([`TrainConfig::schedule`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Epochs to train (0 = no limit).
    pub epochs: u64,
    /// Updates to make in total (0 = no limit).
    pub max_steps: u64,
    pub lr_decay: f64,
    pub lr_schedule: Vec<f64>,
}

impl Schedule {
    /// Learning rate at the start of epoch `epoch` (0-based), if a schedule is set.
    pub fn scheduled_lr(&self, epoch: u64) -> Option<f64> {
        scheduled(&self.lr_schedule, epoch)
    }

    /// Whether `epoch` epochs done spend the epoch budget.
    pub fn epochs_spent(&self, epoch: u64) -> bool {
        self.epochs > 0 && epoch >= self.epochs
    }

    /// Whether `step` updates made spend the step budget.
    pub fn steps_spent(&self, step: u64) -> bool {
        self.max_steps > 0 && step >= self.max_steps
    }
}

/// How validation and test passes read a split ([`TrainConfig::eval`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalSettings {
    /// Streams of the split (over all ranks).
    pub batch: usize,
    pub bptt: usize,
}

/// When checkpoints are written and which are kept ([`TrainConfig::checkpoints`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CheckpointSettings {
    /// Steps between checkpoints (0 = only at the end of each epoch and of the run).
    pub every: u64,
    /// Checkpoints kept (the newest ones).
    pub keep: usize,
    /// Also keep every checkpoint whose step is a multiple of this (0: none).
    pub keep_every: u64,
}

impl CheckpointSettings {
    /// Whether a periodic checkpoint falls at step `step`.
    pub fn due(&self, step: u64) -> bool {
        self.every > 0 && step.is_multiple_of(self.every)
    }
}

/// When reallocation rounds run and how ([`TrainConfig::realloc`]; the fields are the
/// config's `realloc_*` keys, and the run's `epochs`).
#[derive(Clone, Debug, PartialEq)]
pub struct ReallocSettings {
    pub every: ReallocEvery,
    pub start: u64,
    pub rounds: u64,
    /// The run's epochs (0 = no limit): no round after the last.
    pub epochs: u64,
    pub carry: Carry,
    pub check: bool,
    pub move_cost: f64,
    /// Bytes of dense loss tables a round may hold (one range's, of sparse tables).
    pub max_table_bytes: u64,
    /// `realloc_sparse`: candidates per word of sparse tables (0: chosen by size).
    pub sparse: usize,
}

impl ReallocSettings {
    /// Whether the rounds are the automatic ones (`realloc_every = "auto"`).
    pub fn is_auto(&self) -> bool {
        self.every.is_auto()
    }

    /// Candidates per word of a round's sparse loss tables for a V x (R + C) model
    /// (0: the round builds dense tables).
    pub fn sparse_k(&self, vocab: usize, rows: usize, cols: usize) -> usize {
        if self.sparse > 0 {
            self.sparse
        } else if lightrnn_alloc::tables_bytes(vocab, rows, cols) > self.max_table_bytes {
            AUTO_SPARSE_K
                .rev()
                .find(|&k| {
                    lightrnn_alloc::sparse_round_memory_bound(vocab, rows, cols, k)
                        <= self.max_table_bytes
                })
                .unwrap_or(*AUTO_SPARSE_K.start())
        } else {
            0
        }
    }

    /// Whether to reallocate after epoch `epoch` (1-based) with `done` reallocations so far
    /// (with `realloc_every = "auto"`: whether a round is considered at all; the rule in
    /// `crate::auto` decides whether it runs and moves).
    pub fn after(&self, epoch: u64, done: u64) -> bool {
        let every = match self.every {
            ReallocEvery::Epochs(0) => return false,
            ReallocEvery::Epochs(n) => n,
            ReallocEvery::Auto => 1,
        };
        if self.rounds > 0 && done >= self.rounds {
            return false;
        }
        if self.epochs > 0 && epoch >= self.epochs {
            return false; // nothing left to train with the new allocation
        }
        let start = if self.start > 0 { self.start } else { every };
        epoch >= start && (epoch - start).is_multiple_of(every)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_takes_dense_tables_where_they_fit_else_as_many_candidates_as_fit() {
        use lightrnn_alloc::sparse_round_memory_bound as bound;
        let mut c = TrainConfig::preset("tiny").unwrap();
        assert_eq!(c.realloc_max_table_gib, 16.0);
        // V = 1M: 8 GB of dense tables fit in 16 GiB.
        assert_eq!(c.realloc_sparse_k(1_000_000, 1000, 1000), 0);
        // V = 2M: dense 22.6 GB; sparse tables of the most candidates fit.
        assert_eq!(c.realloc_sparse_k(2_000_000, 1415, 1415), 144);
        // V = 10M: the largest k whose round fits.
        let k = c.realloc_sparse_k(10_000_000, 3163, 3163);
        let budget = c.realloc_max_table_bytes();
        assert!(k > 16 && k < 144, "{k}");
        assert!(bound(10_000_000, 3163, 3163, k) <= budget);
        assert!(bound(10_000_000, 3163, 3163, k + 1) > budget);
        // Too little for any: the fewest, and the round's own check refuses it if the
        // memory is not there.
        c.realloc_max_table_gib = 1.0;
        assert_eq!(c.realloc_sparse_k(10_000_000, 3163, 3163), 16);
        // Set by hand: taken as set.
        c.realloc_sparse = 7;
        assert_eq!(c.realloc_sparse_k(10_000_000, 3163, 3163), 7);
        assert_eq!(c.realloc_sparse_k(100, 10, 10), 7);
    }

    #[test]
    fn presets_parse_and_overrides_apply() {
        for (name, _) in PRESETS {
            let c = TrainConfig::preset(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            // Every preset round-trips through its TOML (as stored in checkpoints).
            assert_eq!(TrainConfig::from_toml(&c.to_toml(), name).unwrap(), c);
        }
        let c = TrainConfig::preset("billion-word-1024").unwrap();
        assert_eq!(
            (c.emb, c.hidden, c.batch, c.bad_lines.as_str()),
            (1024, 1024, 128, "skip")
        );
        let c = TrainConfig::preset("ptb-small").unwrap();
        assert_eq!(
            (c.emb, c.hidden, c.layers, c.batch, c.epochs),
            (200, 200, 2, 20, 6)
        );
        let c = c
            .with_overrides(&[
                "max_steps=200".into(),
                "optimizer=adam".into(),
                "dropout = 0.5".into(),
            ])
            .unwrap();
        assert_eq!(c.max_steps, 200);
        assert_eq!(c.optimizer, "adam");
        assert_eq!(c.dropout, 0.5);
        assert!(matches!(
            c.optimizer_rule().unwrap(),
            Optimizer::Adam { .. }
        ));
        for (name, _) in PRESETS {
            TrainConfig::preset(name).unwrap();
        }
        let s = TrainConfig::default()
            .with_overrides(&[
                "lr_schedule=[20, 20, 5]".into(),
                "epochs=6".into(),
                "realloc_every=2".into(),
                "realloc_start=1".into(),
                "realloc_rounds=2".into(),
            ])
            .unwrap();
        assert_eq!(
            (s.scheduled_lr(0), s.scheduled_lr(2), s.scheduled_lr(9)),
            (Some(20.0), Some(5.0), Some(5.0))
        );
        let when: Vec<u64> = (1..=6)
            .filter(|&e| {
                s.realloc_after(e, (1..e).filter(|&x| s.realloc_after(x, 0)).count() as u64)
            })
            .collect();
        assert_eq!(when, vec![1, 3]);
        // "auto" is the default, of a file that does not set it and of the presets that
        // do not fix a schedule; those that do keep theirs.
        assert_eq!(TrainConfig::default().realloc_every, ReallocEvery::Auto);
        assert_eq!(
            TrainConfig::from_toml("epochs = 2", "t")
                .unwrap()
                .realloc_every,
            ReallocEvery::Auto
        );
        for (name, every) in [
            ("tiny", ReallocEvery::Auto),
            ("ptb-small", ReallocEvery::Auto),
            ("ptb-small-realloc", ReallocEvery::Epochs(1)),
            ("billion-word-512", ReallocEvery::Epochs(1)),
        ] {
            assert_eq!(
                TrainConfig::preset(name).unwrap().realloc_every,
                every,
                "{name}"
            );
        }
        // "auto": a round is considered after every epoch but the last; the word and the
        // number both go through --set, the file and back.
        let a = s.with_overrides(&["realloc_every=auto".into()]).unwrap();
        assert_eq!(a.realloc_every, ReallocEvery::Auto);
        assert!(a.to_toml().contains("realloc_every = \"auto\""));
        assert_eq!(
            TrainConfig::from_toml(&a.to_toml(), "t")
                .unwrap()
                .realloc_every,
            ReallocEvery::Auto
        );
        let a = a
            .with_overrides(&["realloc_start=0".into(), "realloc_rounds=0".into()])
            .unwrap();
        assert_eq!(
            (1..=6)
                .filter(|&e| a.realloc_after(e, 0))
                .collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        let back = a.with_overrides(&["realloc_every=2".into()]).unwrap();
        assert_eq!(back.realloc_every, ReallocEvery::Epochs(2));
        assert!(back.to_toml().contains("realloc_every = 2"));
        for bad in [
            "realloc_every=sometimes",
            "realloc_every=-1",
            "realloc_every=1.5",
        ] {
            let e = a.with_overrides(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("auto"), "{bad}: {e}");
        }
        assert!(TrainConfig::from_toml("realloc_every = \"often\"", "t").is_err());
        assert!(
            TrainConfig::default()
                .with_overrides(&["realloc_carry=some".into()])
                .is_err()
        );
        let e = TrainConfig::default()
            .with_overrides(&["realloc_solver=hungarian".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("realloc_solver") && e.contains("scalable"),
            "{e}"
        );
        let exact = TrainConfig::default()
            .with_overrides(&["realloc_solver=exact".into()])
            .unwrap();
        assert_eq!(exact.realloc_solver, Solver::Exact);
        assert!(exact.to_toml().contains("realloc_solver = \"exact\""));
    }

    #[test]
    fn bad_keys_and_values_are_refused() {
        let c = TrainConfig::default();
        assert!(
            c.with_overrides(&["hiden=3".into()])
                .unwrap_err()
                .to_string()
                .contains("unknown key")
        );
        assert!(c.with_overrides(&["dropout=1.5".into()]).is_err());
        assert!(c.with_overrides(&["batch=-1".into()]).is_err());
        assert!(c.with_overrides(&["optimizer=lbfgs".into()]).is_err());
        assert!(c.with_overrides(&["nokey".into()]).is_err());
        assert!(TrainConfig::from_toml("emb = 3\nbogus = 1\n", "x").is_err());
        assert!(
            TrainConfig::preset("nope")
                .unwrap_err()
                .to_string()
                .contains("ptb-small")
        );
        let round = TrainConfig::from_toml(&c.to_toml(), "round trip").unwrap();
        assert_eq!(round, c);
    }
}
