//! The one place where the messages of the wire (`lightrnn_proto::v1`) convert to and
//! from this crate's domain types, and the one codec of the arrays that travel in chunks
//! (loss tables, allocations). The worker's control channel and the coordinator's service
//! both go through it; a message that does not convert is refused with what is wrong.

use lightrnn_alloc::{Report, SparsePart};
use lightrnn_kernels::{LossTables, ModelDims, Optimizer};
use lightrnn_proto::CHUNK_BYTES;
use lightrnn_proto::v1::{self, TableKind};

use crate::auto::AutoState;
use crate::checkpoint::{FileEntry, Meta};
use crate::config::TrainConfig;
use crate::report::{EpochRecord, RankReport, StoppedBy, Summary};
use crate::{Error, Result};

fn bad(what: &str, why: impl std::fmt::Display) -> Error {
    Error::Control(format!("a {what} that does not convert: {why}"))
}

fn size(what: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| bad(what, format!("{v} does not fit this machine")))
}

impl From<&RankReport> for v1::Report {
    fn from(r: &RankReport) -> Self {
        Self {
            step: r.step,
            epoch: r.epoch,
            loss: r.loss,
            words_per_sec: r.words_per_sec,
            global_words_per_sec: r.global_words_per_sec,
            valid_ppl: r.valid_ppl,
            lr: r.lr,
            checkpoint_step: r.checkpoint_step,
            checkpoint_seconds: r.checkpoint_seconds,
            checkpoint_bytes: r.checkpoint_bytes,
            checkpoints: r.checkpoints,
        }
    }
}

impl From<v1::Report> for RankReport {
    fn from(p: v1::Report) -> Self {
        Self {
            step: p.step,
            epoch: p.epoch,
            loss: p.loss,
            words_per_sec: p.words_per_sec,
            global_words_per_sec: p.global_words_per_sec,
            valid_ppl: p.valid_ppl,
            lr: p.lr,
            checkpoint_step: p.checkpoint_step,
            checkpoint_seconds: p.checkpoint_seconds,
            checkpoint_bytes: p.checkpoint_bytes,
            checkpoints: p.checkpoints,
        }
    }
}

/// A model's sizes as the wire carries them.
pub fn dims_to_wire(d: &ModelDims) -> v1::ModelDims {
    {
        v1::ModelDims {
            vocab: d.vocab as u64,
            rows: d.rows as u64,
            cols: d.cols as u64,
            emb: d.emb as u64,
            hidden: d.hidden as u64,
            layers: d.layers as u64,
        }
    }
}

/// A model's sizes from the wire (checked).
pub fn dims_from_wire(d: v1::ModelDims) -> Result<ModelDims> {
    {
        let dims = ModelDims {
            vocab: size("model shape", d.vocab)?,
            rows: size("model shape", d.rows)?,
            cols: size("model shape", d.cols)?,
            emb: size("model shape", d.emb)?,
            hidden: size("model shape", d.hidden)?,
            layers: size("model shape", d.layers)?,
        };
        dims.validate().map_err(|e| bad("model shape", e))?;
        Ok(dims)
    }
}

/// An update rule as the wire carries it.
pub fn optimizer_to_wire(o: &Optimizer) -> v1::Optimizer {
    {
        use v1::optimizer::Rule;
        let rule = match *o {
            Optimizer::Sgd => Rule::Sgd(v1::Sgd {}),
            Optimizer::Adam { beta1, beta2, eps } => Rule::Adam(v1::Adam { beta1, beta2, eps }),
            Optimizer::Adagrad {
                eps,
                initial_accumulator,
            } => Rule::Adagrad(v1::Adagrad {
                eps,
                initial_accumulator,
            }),
        };
        v1::Optimizer { rule: Some(rule) }
    }
}

/// An update rule from the wire.
pub fn optimizer_from_wire(o: v1::Optimizer) -> Result<Optimizer> {
    {
        use v1::optimizer::Rule;
        match o.rule {
            Some(Rule::Sgd(_)) => Ok(Optimizer::Sgd),
            Some(Rule::Adam(a)) => Ok(Optimizer::Adam {
                beta1: a.beta1,
                beta2: a.beta2,
                eps: a.eps,
            }),
            Some(Rule::Adagrad(a)) => Ok(Optimizer::Adagrad {
                eps: a.eps,
                initial_accumulator: a.initial_accumulator,
            }),
            None => Err(bad("optimizer", "no rule")),
        }
    }
}

impl From<&EpochRecord> for v1::EpochRecord {
    fn from(r: &EpochRecord) -> Self {
        Self {
            epoch: r.epoch,
            step: r.step,
            lr: r.lr,
            train_loss: r.train_loss,
            valid_loss: r.valid_loss,
            valid_ppl: r.valid_ppl,
            seconds: r.seconds,
        }
    }
}

impl From<v1::EpochRecord> for EpochRecord {
    fn from(r: v1::EpochRecord) -> Self {
        Self {
            epoch: r.epoch,
            step: r.step,
            lr: r.lr,
            train_loss: r.train_loss,
            valid_loss: r.valid_loss,
            valid_ppl: r.valid_ppl,
            seconds: r.seconds,
        }
    }
}

fn config(what: &str, toml: &str) -> Result<TrainConfig> {
    TrainConfig::from_toml(toml, what).map_err(|e| bad(what, e))
}

/// The automatic reallocation's state as the wire carries it: JSON, empty for none.
fn auto_to_wire(a: &Option<AutoState>) -> String {
    a.as_ref()
        .map(|a| serde_json::to_string(a).unwrap_or_default())
        .unwrap_or_default()
}

fn auto_from_wire(what: &str, json: &str) -> Result<Option<AutoState>> {
    if json.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(json)
        .map(Some)
        .map_err(|e| bad(what, format!("its automatic reallocation state: {e}")))
}

impl From<&Meta> for v1::Manifest {
    fn from(m: &Meta) -> Self {
        Self {
            format: m.format.clone(),
            version: m.version,
            step: m.step,
            epoch: m.epoch,
            cursor: m.cursor,
            config_toml: m.config.to_toml(),
            dims: Some(dims_to_wire(&m.dims)),
            vocab_size: m.vocab_size as u64,
            vocab_sha256: m.vocab_sha256.clone(),
            rng_seed: m.rng_seed,
            optimizer: m.optimizer.as_ref().map(optimizer_to_wire),
            optimizer_updates: m.optimizer_updates,
            lr: m.lr,
            best_valid_loss: m.best_valid_loss,
            epoch_loss_sum: m.epoch_loss_sum,
            epoch_words: m.epoch_words,
            seconds: m.seconds,
            history: m.history.iter().map(Into::into).collect(),
            reallocations: m.reallocations,
            realloc_pending: m.realloc_pending,
            auto_realloc_json: auto_to_wire(&m.auto_realloc),
            files: m
                .files
                .iter()
                .map(|f| v1::FileEntry {
                    name: f.name.clone(),
                    bytes: f.bytes,
                    sha256: f.sha256.clone(),
                })
                .collect(),
        }
    }
}

impl TryFrom<v1::Manifest> for Meta {
    type Error = Error;
    fn try_from(m: v1::Manifest) -> Result<Self> {
        Ok(Self {
            format: m.format,
            version: m.version,
            step: m.step,
            epoch: m.epoch,
            cursor: m.cursor,
            config: config("manifest's config", &m.config_toml)?,
            dims: dims_from_wire(m.dims.ok_or_else(|| bad("manifest", "no model shape"))?)?,
            vocab_size: size("manifest", m.vocab_size)?,
            vocab_sha256: m.vocab_sha256,
            rng_seed: m.rng_seed,
            optimizer: m.optimizer.map(optimizer_from_wire).transpose()?,
            optimizer_updates: m.optimizer_updates,
            lr: m.lr,
            best_valid_loss: m.best_valid_loss,
            epoch_loss_sum: m.epoch_loss_sum,
            epoch_words: m.epoch_words,
            seconds: m.seconds,
            history: m.history.into_iter().map(Into::into).collect(),
            reallocations: m.reallocations,
            realloc_pending: m.realloc_pending,
            auto_realloc: auto_from_wire("manifest", &m.auto_realloc_json)?,
            files: m
                .files
                .into_iter()
                .map(|f| FileEntry {
                    name: f.name,
                    bytes: f.bytes,
                    sha256: f.sha256,
                })
                .collect(),
        })
    }
}

impl From<StoppedBy> for v1::StoppedBy {
    fn from(s: StoppedBy) -> Self {
        match s {
            StoppedBy::Epochs => Self::Epochs,
            StoppedBy::MaxSteps => Self::MaxSteps,
            StoppedBy::Signal => Self::Signal,
        }
    }
}

impl From<&Summary> for v1::Summary {
    fn from(s: &Summary) -> Self {
        Self {
            train_loss: s.train_loss,
            train_ppl: s.train_ppl,
            valid_loss: s.valid_loss,
            valid_ppl: s.valid_ppl,
            test_loss: s.test_loss,
            test_ppl: s.test_ppl,
            words_per_sec: s.words_per_sec,
            params: s.params as u64,
            seconds: s.seconds,
            train_seconds: s.train_seconds,
            steps: s.steps,
            epochs_completed: s.epochs_completed,
            stopped_by: v1::StoppedBy::from(s.stopped_by) as i32,
            vocab_size: s.vocab_size as u64,
            backend: s.backend.clone(),
            world_size: s.world_size as u64,
            control_seconds: s.control_seconds,
            config_toml: s.config.to_toml(),
            history: s.history.iter().map(Into::into).collect(),
            auto_realloc_json: auto_to_wire(&s.auto_realloc),
        }
    }
}

impl TryFrom<v1::Summary> for Summary {
    type Error = Error;
    fn try_from(s: v1::Summary) -> Result<Self> {
        let stopped_by = match v1::StoppedBy::try_from(s.stopped_by) {
            Ok(v1::StoppedBy::Epochs) => StoppedBy::Epochs,
            Ok(v1::StoppedBy::MaxSteps) => StoppedBy::MaxSteps,
            Ok(v1::StoppedBy::Signal) => StoppedBy::Signal,
            _ => {
                return Err(bad(
                    "summary",
                    "it says neither how nor why the run stopped",
                ));
            }
        };
        Ok(Self {
            train_loss: s.train_loss,
            train_ppl: s.train_ppl,
            valid_loss: s.valid_loss,
            valid_ppl: s.valid_ppl,
            test_loss: s.test_loss,
            test_ppl: s.test_ppl,
            words_per_sec: s.words_per_sec,
            params: size("summary", s.params)?,
            seconds: s.seconds,
            train_seconds: s.train_seconds,
            steps: s.steps,
            epochs_completed: s.epochs_completed,
            stopped_by,
            vocab_size: size("summary", s.vocab_size)?,
            backend: s.backend,
            world_size: size("summary", s.world_size)?,
            control_seconds: s.control_seconds,
            config: config("summary's config", &s.config_toml)?,
            history: s.history.into_iter().map(Into::into).collect(),
            auto_realloc: auto_from_wire("summary", &s.auto_realloc_json)?,
        })
    }
}

/// A reallocation round's report as the wire carries it.
pub fn report_to_wire(r: &Report) -> v1::ReallocReport {
    {
        v1::ReallocReport {
            solver: r.solver.clone(),
            train_loss_before: r.train_loss_before,
            objective_before: r.objective_before,
            objective_after: r.objective_after,
            lower_bound: r.lower_bound,
            words_moved: r.words_moved as u64,
            train_loss_after: r.train_loss_after,
            seconds_tables: r.seconds_tables,
            seconds_solve: r.seconds_solve,
            kept_current: r.kept_current,
            stats_json: r.stats.to_string(),
        }
    }
}

/// A reallocation round's report from the wire.
pub fn report_from_wire(r: v1::ReallocReport) -> Result<Report> {
    {
        Ok(Report {
            solver: r.solver,
            train_loss_before: r.train_loss_before,
            objective_before: r.objective_before,
            objective_after: r.objective_after,
            lower_bound: r.lower_bound,
            words_moved: size("reallocation report", r.words_moved)?,
            train_loss_after: r.train_loss_after,
            seconds_tables: r.seconds_tables,
            seconds_solve: r.seconds_solve,
            kept_current: r.kept_current,
            stats: serde_json::from_str(&r.stats_json)
                .map_err(|e| bad("reallocation report", e))?,
        })
    }
}

/// An element of the arrays that travel in chunks, little-endian.
pub trait Elem: Copy + Default {
    const BYTES: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

/// `Elem` for a primitive with `to_le_bytes` / `from_le_bytes` of `N` bytes.
macro_rules! le_elem {
    ($($t:ty: $n:literal),*) => {$(
        impl Elem for $t {
            const BYTES: usize = $n;
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                let mut a = [0u8; $n];
                a.copy_from_slice(&b[..$n]);
                <$t>::from_le_bytes(a)
            }
        }
    )*};
}

le_elem!(f32: 4, u32: 4, u64: 8, f64: 8);

/// The element ranges that cut `len` elements of `T` into chunks of at most
/// [`CHUNK_BYTES`] (at least one element each).
pub fn pieces<T: Elem>(len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per = (CHUNK_BYTES / T::BYTES).max(1);
    (0..len.div_ceil(per)).map(move |k| k * per..((k + 1) * per).min(len))
}

/// Little-endian bytes of `values`.
pub fn encode<T: Elem>(values: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * T::BYTES);
    for &v in values {
        v.put(&mut out);
    }
    out
}

/// Decode the chunk `data` at element `offset` into `dst`; the elements it held. A
/// partial element or a range outside `dst` is an error.
pub fn decode_into<T: Elem>(dst: &mut [T], offset: u64, data: &[u8]) -> Result<usize> {
    each_into(dst, offset, data, |d, x| *d = x)
}

/// Add the elements of `data` to `dst` from `offset`; how many there were.
pub fn add_into<T: Elem + std::ops::AddAssign>(
    dst: &mut [T],
    offset: u64,
    data: &[u8],
) -> Result<usize> {
    each_into(dst, offset, data, |d, x| *d += x)
}

/// `f(dst[offset + k], element k of data)` for every element of `data`, after checking
/// that they fit.
fn each_into<T: Elem>(
    dst: &mut [T],
    offset: u64,
    data: &[u8],
    f: impl Fn(&mut T, T),
) -> Result<usize> {
    if !data.len().is_multiple_of(T::BYTES) {
        return Err(bad("chunk", "it ends inside an element"));
    }
    let n = data.len() / T::BYTES;
    let len = dst.len();
    let out_of_range = || bad("chunk", format!("elements {offset}+{n} of {len}"));
    let start = usize::try_from(offset).map_err(|_| out_of_range())?;
    let end = start.checked_add(n).ok_or_else(out_of_range)?;
    let dst = dst.get_mut(start..end).ok_or_else(out_of_range)?;
    for (d, b) in dst.iter_mut().zip(data.chunks_exact(T::BYTES)) {
        f(d, T::get(b));
    }
    Ok(n)
}

/// The chunks of one rank's loss tables (rows, columns, counts) and of `cells` (rank 0's
/// current allocation; empty from the others), each a copy of `head` with its part. The
/// iterator owns the tables and encodes one chunk at a time, so a push streams tables of
/// any size without a second copy.
pub fn table_chunks(
    tables: LossTables,
    cells: Vec<u32>,
    head: v1::TableChunk,
) -> impl Iterator<Item = v1::TableChunk> + Send + 'static {
    let mut parts: Vec<(TableKind, std::ops::Range<usize>)> = Vec::new();
    parts.extend(pieces::<f32>(tables.lr.len()).map(|r| (TableKind::Rows, r)));
    parts.extend(pieces::<f32>(tables.lc.len()).map(|r| (TableKind::Cols, r)));
    parts.extend(pieces::<u64>(tables.counts.len()).map(|r| (TableKind::Counts, r)));
    parts.extend(pieces::<u32>(cells.len()).map(|r| (TableKind::Cells, r)));
    parts.into_iter().map(move |(kind, r)| {
        let data = match kind {
            TableKind::Rows => encode(&tables.lr[r.clone()]),
            TableKind::Cols => encode(&tables.lc[r.clone()]),
            TableKind::Counts => encode(&tables.counts[r.clone()]),
            _ => encode(&cells[r.clone()]),
        };
        v1::TableChunk {
            kind: kind as i32,
            offset: r.start as u64,
            data,
            ..head.clone()
        }
    })
}

/// The chunks of one push of sparse tables: `part`'s arrays (none in a last push
/// without a part) and `cells` (rank 0's current allocation in its last push; empty
/// otherwise), each a copy of `head` with the part's figures and its piece. One chunk
/// at least: a push without a part or cells is its head alone.
pub fn sparse_chunks(
    part: Option<SparsePart>,
    cells: Vec<u32>,
    mut head: v1::SparseChunk,
) -> impl Iterator<Item = v1::SparseChunk> + Send + 'static {
    use v1::SparseKind as K;
    let mut parts: Vec<(K, std::ops::Range<usize>)> = Vec::new();
    if let Some(p) = &part {
        let t = &p.tables;
        head.start = p.start as u64;
        head.words = t.vocab as u64;
        head.k_rows = t.k_rows as u64;
        head.k_cols = t.k_cols as u64;
        head.before = p.figures.before;
        head.before_discounted = p.figures.before_discounted;
        head.lower_bound = p.figures.lower_bound;
        parts.extend(pieces::<u32>(t.row_idx.len()).map(|r| (K::RowIdx, r)));
        parts.extend(pieces::<f32>(t.row_loss.len()).map(|r| (K::RowLoss, r)));
        parts.extend(pieces::<u32>(t.col_idx.len()).map(|r| (K::ColIdx, r)));
        parts.extend(pieces::<f32>(t.col_loss.len()).map(|r| (K::ColLoss, r)));
        parts.extend(pieces::<f64>(t.row_sum.len()).map(|r| (K::RowSum, r)));
        parts.extend(pieces::<f64>(t.col_sum.len()).map(|r| (K::ColSum, r)));
        parts.extend(pieces::<u64>(p.counts.len()).map(|r| (K::Counts, r)));
    }
    parts.extend(pieces::<u32>(cells.len()).map(|r| (K::Cells, r)));
    if parts.is_empty() {
        // The head alone, as a chunk of no elements.
        parts.push((K::Counts, 0..0));
    }
    parts.into_iter().map(move |(kind, r)| {
        let data = match (&part, kind) {
            (_, K::Cells) => encode(&cells[r.clone()]),
            (None, _) => Vec::new(),
            (Some(p), k) => match k {
                K::RowIdx => encode(&p.tables.row_idx[r.clone()]),
                K::RowLoss => encode(&p.tables.row_loss[r.clone()]),
                K::ColIdx => encode(&p.tables.col_idx[r.clone()]),
                K::ColLoss => encode(&p.tables.col_loss[r.clone()]),
                K::RowSum => encode(&p.tables.row_sum[r.clone()]),
                K::ColSum => encode(&p.tables.col_sum[r.clone()]),
                _ => encode(&p.counts[r.clone()]),
            },
        };
        v1::SparseChunk {
            kind: kind as i32,
            offset: r.start as u64,
            data,
            ..head.clone()
        }
    })
}

/// The chunks of a solved allocation: the cells and the word counts; the first carries
/// the round's report.
pub fn allocation_chunks(
    cells: &[u32],
    counts: &[u64],
    report: &Report,
) -> Vec<v1::AllocationChunk> {
    let v = cells.len() as u64;
    let mut chunks: Vec<v1::AllocationChunk> = pieces::<u32>(cells.len())
        .map(|r| (TableKind::Cells, encode(&cells[r.clone()]), r.start))
        .chain(
            pieces::<u64>(counts.len())
                .map(|r| (TableKind::Counts, encode(&counts[r.clone()]), r.start)),
        )
        .map(|(kind, data, offset)| v1::AllocationChunk {
            report: None,
            vocab: v,
            kind: kind as i32,
            offset: offset as u64,
            data,
        })
        .collect();
    if let Some(first) = chunks.first_mut() {
        first.report = Some(report_to_wire(report));
    }
    chunks
}

/// A solved allocation put back together from its chunks: every cell and count exactly
/// once, and the report.
pub struct AllocationAssembly {
    pub cells: Vec<u32>,
    pub counts: Vec<u64>,
    report: Option<Report>,
    got: [usize; 2],
}

impl AllocationAssembly {
    pub fn new(vocab: usize) -> Self {
        Self {
            cells: vec![0; vocab],
            counts: vec![0; vocab],
            report: None,
            got: [0; 2],
        }
    }

    pub fn add(&mut self, ch: v1::AllocationChunk) -> Result<()> {
        if let Some(r) = ch.report {
            self.report = Some(report_from_wire(r)?);
        }
        match TableKind::try_from(ch.kind) {
            Ok(TableKind::Cells) => {
                self.got[0] += decode_into(&mut self.cells, ch.offset, &ch.data)?
            }
            Ok(TableKind::Counts) => {
                self.got[1] += decode_into(&mut self.counts, ch.offset, &ch.data)?
            }
            _ => return Err(bad("allocation chunk", format!("kind {}", ch.kind))),
        }
        Ok(())
    }

    /// The cells, counts and report; an error unless every element came exactly once.
    pub fn finish(self) -> Result<(Vec<u32>, Vec<u64>, Report)> {
        let v = self.cells.len();
        if self.got != [v, v] {
            return Err(Error::Control(format!(
                "the allocation arrived incomplete ({} cells, {} counts of {v})",
                self.got[0], self.got[1]
            )));
        }
        let report = self
            .report
            .ok_or_else(|| Error::Control("the allocation arrived without its report".into()))?;
        Ok((self.cells, self.counts, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_types_round_trip_through_the_wire() {
        let cfg = TrainConfig::preset("ptb-small").unwrap();
        let rec = EpochRecord {
            epoch: 1,
            step: 10,
            lr: 20.0,
            train_loss: 5.5,
            valid_loss: 5.25,
            valid_ppl: 5.25f64.exp(),
            seconds: 1.5,
        };
        let meta = Meta {
            format: crate::checkpoint::FORMAT.into(),
            version: 1,
            step: 10,
            epoch: 1,
            cursor: 35,
            config: cfg.clone(),
            dims: ModelDims::square(10_000, 200, 200, 2).unwrap(),
            vocab_size: 10_000,
            vocab_sha256: "ab".repeat(32),
            rng_seed: 1111,
            optimizer: Some(Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            }),
            optimizer_updates: 10,
            lr: 20.0,
            best_valid_loss: Some(5.25),
            epoch_loss_sum: 1234.5,
            epoch_words: 7000,
            seconds: 3.25,
            history: vec![rec.clone()],
            reallocations: 1,
            realloc_pending: true,
            auto_realloc: Some(crate::auto::AutoState {
                disruption: Some(3.4),
                recovery: None,
                realized: Some(0.01),
                watch: Some(crate::auto::Watch {
                    epoch: 1,
                    valid_loss: 5.25,
                    lr: 20.0,
                    gain: 1.68,
                    expected_recovery: Some(1.0),
                }),
                decisions: vec![crate::auto::Decision {
                    epoch: 1,
                    decision: crate::auto::Verdict::Move,
                    why: "gain".into(),
                    epochs_left: 5.0,
                    recovery_epochs: 1.0,
                    payoff_epochs: 3.0,
                    move_cost: 0.0,
                    realized: 1.0,
                    predicted_gain: 1.68,
                    disruption: 3.35,
                    moved_share: 0.99,
                    words_moved: 9961,
                }],
            }),
            files: vec![FileEntry {
                name: "model.safetensors".into(),
                bytes: 42,
                sha256: "cd".repeat(32),
            }],
        };
        let back: Meta = v1::Manifest::from(&meta).try_into().unwrap();
        assert_eq!(back, meta);
        let model_only = Meta {
            optimizer: None,
            best_valid_loss: None,
            ..meta
        };
        let back: Meta = v1::Manifest::from(&model_only).try_into().unwrap();
        assert_eq!(back, model_only);
        let s = Summary {
            train_loss: 5.0,
            train_ppl: 5f64.exp(),
            valid_loss: 5.1,
            valid_ppl: 5.1f64.exp(),
            test_loss: f64::NAN,
            test_ppl: f64::NAN,
            words_per_sec: 1e4,
            params: 723_400,
            seconds: 9.5,
            train_seconds: 8.5,
            steps: 10,
            epochs_completed: 1,
            stopped_by: StoppedBy::Signal,
            vocab_size: 10_000,
            backend: "cpu".into(),
            world_size: 2,
            control_seconds: 0.5,
            config: cfg,
            history: vec![rec],
            auto_realloc: None,
        };
        let back: Summary = v1::Summary::from(&s).try_into().unwrap();
        assert!(back.test_loss.is_nan() && back.test_ppl.is_nan());
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&s).unwrap()
        );
        let unsaid = v1::Summary {
            stopped_by: 0,
            ..v1::Summary::from(&s)
        };
        assert!(Summary::try_from(unsaid).is_err());
        let bad_config = v1::Manifest {
            config_toml: "hidden = 0".into(),
            ..v1::Manifest::from(&model_only)
        };
        assert!(
            Meta::try_from(bad_config)
                .unwrap_err()
                .to_string()
                .contains("hidden")
        );
    }

    #[test]
    fn chunks_carry_every_element_once_and_refuse_what_does_not_fit() {
        let v = 5;
        let tables = LossTables {
            vocab: v,
            rows: 3,
            cols: 2,
            words: 0..v,
            lr: (0..15).map(|x| x as f32 * 0.5).collect(),
            lc: (0..10).map(|x| -(x as f32)).collect(),
            counts: (0..5).map(|x| x * 1_000_000_007).collect(),
        };
        let head = v1::TableChunk {
            round: 2,
            ..Default::default()
        };
        let chunks: Vec<_> = table_chunks(tables.clone(), vec![4, 3, 2, 1, 0], head).collect();
        assert!(chunks.iter().all(|c| c.round == 2));
        let mut lr = vec![0f32; 15];
        let mut counts = vec![0u64; 5];
        for c in &chunks {
            match TableKind::try_from(c.kind).unwrap() {
                TableKind::Rows => assert_eq!(decode_into(&mut lr, c.offset, &c.data).unwrap(), 15),
                TableKind::Counts => {
                    decode_into(&mut counts, c.offset, &c.data).unwrap();
                }
                _ => {}
            }
        }
        assert_eq!((lr, counts), (tables.lr, tables.counts));
        let mut small = vec![0u32; 2];
        assert!(decode_into(&mut small, 1, &[0u8; 8]).is_err());
        assert!(decode_into(&mut small, 0, &[0u8; 5]).is_err());
        assert!(decode_into(&mut small, u64::MAX, &[0u8; 4]).is_err());
        // A big array is cut at CHUNK_BYTES.
        let n = CHUNK_BYTES / 4 * 2 + 3;
        let ranges: Vec<_> = pieces::<f32>(n).collect();
        assert_eq!(ranges.len(), 3);
        assert_eq!(ranges.last().unwrap().end, n);
        let report = Report {
            solver: "greedy".into(),
            train_loss_before: 5.0,
            objective_before: 5.0,
            objective_after: 4.5,
            lower_bound: 4.0,
            words_moved: 3,
            train_loss_after: None,
            seconds_tables: 0.0,
            seconds_solve: 0.1,
            kept_current: false,
            stats: serde_json::json!({"cost": 4.5}),
        };
        let mut a = AllocationAssembly::new(v);
        for ch in allocation_chunks(&[1, 0, 2, 4, 3], &[7; 5], &report) {
            a.add(ch).unwrap();
        }
        let (cells, counts, back) = a.finish().unwrap();
        assert_eq!(
            (cells, counts, back),
            (vec![1, 0, 2, 4, 3], vec![7; 5], report.clone())
        );
        let mut partial = AllocationAssembly::new(v);
        partial
            .add(allocation_chunks(&[1, 0, 2, 4, 3], &[7; 5], &report).remove(0))
            .unwrap();
        assert!(partial.finish().is_err());
    }
}
