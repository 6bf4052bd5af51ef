//! The Backend boundary: whole layers per call, and the types that cross it.
//!
//! # Design
//!
//! **What lives where.** A backend owns everything a step touches: the parameters and
//! their gradients (one flat buffer each, in the backend's internal layout), the
//! optimizer's buffers, the word -> cell table, the carried LSTM state of every
//! [`Stream`], the activations of the batch in flight, the gradient groups' partial sums
//! and the loss tables of a reallocation round. On a GPU all of that is device memory.
//! The host keeps the data pipeline, the schedule (learning rate, epochs, checkpoints)
//! and the collective. What crosses the boundary per step is small: the batch's word ids
//! going in, and [`LossSums`] and the gradient norm coming out; parameters and state
//! cross it only for checkpoints, resumption and reallocation, in PyTorch's layout
//! ([`crate::layout::ParamLayout`]), so every backend's checkpoints are the same bytes.
//!
//! **The call order of a training step.**
//!
//! 1. [`Backend::train_step`]: for each gradient group of the rank's streams
//!    ([`Shard::groups`]), input preparation, the LSTM layers forward over 2T steps, the
//!    row and column heads with their fused log-softmax + NLL and its gradient, the
//!    layers backward; the groups' gradients are summed pairwise in a fixed order into
//!    the gradient buffer (buffers kept between steps: no allocation per step). A device
//!    backend may leave this work pending until the next call that needs it.
//! 2. [`Backend::all_reduce_grads`]: the backend hands its gradient buffer, where it
//!    lies ([`GradsMut`]), to the job's collective, which sums it over the ranks in
//!    place. A device buffer is never copied to the host to be summed.
//! 3. [`Backend::clip_and_step`]: global norm, clipping coefficient and the optimizer
//!    update; it returns the step's loss sums and norm ([`StepFigures`]), read back
//!    together: the step's one host synchronisation.
//!
//! Evaluation is [`Backend::eval_batch`] (forward and loss, no dropout, no gradient). A
//! reallocation round is [`Backend::begin_loss_tables`], one
//! [`Backend::accumulate_loss_tables`] per batch of the pass (the tables accumulate inside
//! the backend), and [`Backend::take_loss_tables`] once at its end; a pass covers a range of
//! word ids, so tables larger than memory take one pass per range. In a job of several
//! ranks, [`Backend::take_loss_tables_scattered`] ends the pass instead where the tables
//! lie on a device: summed there over the ranks, and each rank takes its share of the
//! words only.
//!
//! **Who owns which buffer.** The caller owns the word ids of a [`Batch`] (borrowed for
//! the call), the [`LossSums`] and [`LossTables`] it receives, and copies of parameters,
//! allocation and state it asks for. Everything else is the backend's; [`GradsMut`]
//! lends its gradient buffer to the collective for the duration of one all-reduce.

use serde::{Deserialize, Serialize};

use crate::layout::{ModelDims, ParamLayout};
use crate::optim::Optimizer;
use crate::tables::LossTables;
use crate::{Error, Result};

/// A set of carried LSTM states: each stream set remembers where its streams are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    /// Training streams of gradient group `g` (group 0 when the rank is one group).
    Train(u32),
    /// Validation and test passes (reset before and after each).
    Eval,
    /// The loss-table pass of a reallocation round.
    Tables,
}

impl Default for Stream {
    /// The training streams of a rank that trains in one group.
    fn default() -> Self {
        Stream::Train(0)
    }
}

/// One truncated-BPTT batch. With a token stream `w` split into B streams, inputs are
/// w[i..i+T] and targets w[i+1..i+T+1] of each stream (two overlapping views of one
/// [T+1, B] buffer).
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// [steps, batch] input word ids x, time-major.
    pub inputs: &'a [u32],
    /// [steps, batch] target word ids y (the words to predict after reading x).
    pub targets: &'a [u32],
    /// T, words predicted per stream.
    pub steps: usize,
    /// B, streams.
    pub batch: usize,
    /// Whose carried state to start from and update. A training batch of several gradient
    /// groups starting at `Train(k)` carries group g's state in `Train(k + g)`.
    pub stream: Stream,
}

/// Training (dropout on, keyed by the global step) or evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Train { step: u64 },
    Eval,
}

/// Summed losses of one batch (nats).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSums {
    /// Sum over targets of -log P_r[r(y)].
    pub row: f64,
    /// Sum over targets of -log P_c[c(y)].
    pub col: f64,
    /// Number of targets (T * B).
    pub words: u64,
}

impl LossSums {
    pub fn total(&self) -> f64 {
        self.row + self.col
    }
    pub fn add(&mut self, o: &LossSums) {
        self.row += o.row;
        self.col += o.col;
        self.words += o.words;
    }
}

/// What a training step brings back to the host, in one read: the batch's summed losses
/// (this rank's streams) and the global gradient norm.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepFigures {
    pub loss: LossSums,
    pub norm: f64,
}

/// What a device has been asked to do, counted since it was opened: the figures a
/// training step is held to (host synchronisations, allocations, launches) and that
/// `lightrnn bench` prints per step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Kernel launches issued by the host (not those replayed inside a graph).
    pub launches: u64,
    /// GEMMs issued by the host.
    pub gemms: u64,
    /// Copies and memsets issued by the host, synchronous or not.
    pub copies: u64,
    /// Times the host waited for the device (a synchronisation, a synchronous copy).
    pub syncs: u64,
    /// Device allocations and frees; page-locked host allocations.
    pub allocs: u64,
    pub frees: u64,
    pub host_allocs: u64,
    /// Graphs captured, and graph launches (each replays every node of its graph).
    pub graphs_captured: u64,
    pub graph_launches: u64,
    /// GEMMs whose operands are not all 16-byte aligned with leading dimensions that are
    /// multiples of 4 (cuBLAS's fast kernels need both), issued or captured.
    pub unaligned_gemms: u64,
}

impl Counters {
    /// What happened between `before` and now (`self`).
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            launches: self.launches - before.launches,
            gemms: self.gemms - before.gemms,
            copies: self.copies - before.copies,
            syncs: self.syncs - before.syncs,
            allocs: self.allocs - before.allocs,
            frees: self.frees - before.frees,
            host_allocs: self.host_allocs - before.host_allocs,
            graphs_captured: self.graphs_captured - before.graphs_captured,
            graph_launches: self.graph_launches - before.graph_launches,
            unaligned_gemms: self.unaligned_gemms - before.unaligned_gemms,
        }
    }
}

/// Carried LSTM state of `batch` streams: h, c [layers, batch, hidden].
#[derive(Clone, Debug, PartialEq)]
pub struct State<T> {
    pub batch: usize,
    pub h: Vec<T>,
    pub c: Vec<T>,
}

impl<T> State<T> {
    /// A state a model of `dims` can carry: h and c of [layers, batch, hidden] each.
    pub fn check(&self, dims: &ModelDims) -> Result<()> {
        let n = dims.layers * self.batch * dims.hidden;
        if self.h.len() != n || self.c.len() != n {
            return Err(Error::Shape(format!(
                "state for {} streams needs {} values in h and c, got {} and {}",
                self.batch,
                n,
                self.h.len(),
                self.c.len()
            )));
        }
        Ok(())
    }
}

/// Where a rank's streams sit in the job's global batch, and how its gradient is formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// The rank's streams are `offset..offset + B` of the job's batch of `global` streams;
    /// dropout masks are keyed by the global stream index, so the ranks of a job together
    /// draw what one process with the whole batch would. `global = 0`: the rank holds the
    /// whole batch.
    pub offset: usize,
    pub global: usize,
    /// Gradient groups: the rank's B streams are cut into this many equal groups, each run
    /// forward and backward on its own, and their gradients summed pairwise
    /// ((g0 + g1) + (g2 + g3) ...), so a rank holding two groups computes exactly what two
    /// ranks holding one each get from the all-reduce.
    pub groups: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl Shard {
    /// One rank with the whole batch in one group.
    pub const WHOLE: Shard = Shard {
        offset: 0,
        global: 0,
        groups: 1,
    };
}

/// A gradient buffer lent to a collective for one in-place all-reduce.
pub enum GradsMut<'a> {
    /// Host memory (the CPU backend).
    Host(&'a mut [f32]),
    /// A CUDA backend's buffer on its device.
    Device(&'a mut dyn DeviceGrads),
}

impl GradsMut<'_> {
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        match self {
            GradsMut::Host(s) => s.len(),
            GradsMut::Device(d) => d.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A CUDA backend's gradient buffer, lent to a collective for one in-place all-reduce on
/// its device (`cuda::comm::allreduce` has the fixed-order sum and its design note).
pub trait DeviceGrads {
    /// Elements in the buffer.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The buffer through host memory, for a collective that sums host memory (the TCP
    /// ring): downloaded, handed to `reduce`, uploaded.
    fn stage(&mut self, reduce: &mut dyn FnMut(&mut [f32]) -> Result<()>) -> Result<()>;
    /// The buffer summed over the ranks of `peers` on the device, in place, in a fixed
    /// order (the gradient groups' pairwise tree continued across the ranks); every rank
    /// gets the same bits.
    fn all_reduce(&mut self, peers: &mut dyn Peers) -> Result<()>;
}

/// A transport between the ranks over device memory (NCCL between GPU processes; threads
/// of one process on the emulated device in tests): two collectives, ordered after the
/// work already issued to the device, finished when they return. A transport with a
/// deadline fails instead of waiting forever for a lost peer.
pub trait Peers: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The GPU whose memory this transport moves (`None`: the emulated device's, which is
    /// host memory); a buffer on another device is refused.
    fn ordinal(&self) -> Option<usize>;
    /// `count` f32 at `send + p * count` (device addresses) go to rank p and land at its
    /// `recv + rank * count`: afterwards rank p's `recv` holds every rank's piece p, in
    /// rank order. Ordered after the work issued to `stream` (a `CUstream`; 0 for the
    /// emulated device, whose caller waits for its work first).
    fn all_to_all(&mut self, stream: u64, send: u64, recv: u64, count: usize) -> Result<()>;
    /// Every rank's `count` f32 at `send` land at `recv + rank * count` on every rank.
    fn all_gather(&mut self, stream: u64, send: u64, recv: u64, count: usize) -> Result<()>;
}

/// What a backend needs from the job's collective: its gradient buffer summed over the
/// ranks, in place, with the same bits on every rank.
pub trait GradReduce {
    fn all_reduce_grads(&mut self, grads: GradsMut<'_>) -> Result<()>;
}

/// A loss-table pass ended with [`Backend::take_loss_tables_scattered`]. The shares are
/// rank order's consecutive runs of ceil(n / W) words of the pass's n (the last ranks
/// fewer, or none); each table entry is summed once, by its owner, in the gradient
/// all-reduce's fixed pairwise order.
#[derive(Clone, Debug, PartialEq)]
pub struct ScatteredTables {
    /// This rank's share of the pass's words with their tables summed over the ranks.
    /// Its `counts` are still this rank's own occurrences of those words.
    pub own: LossTables,
    /// This rank's own occurrences of every word of the pass, in word order: host
    /// values, which the caller sums over the ranks with its other host figures.
    pub counts: Vec<u64>,
}

/// What a backend needs to build a model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub dims: ModelDims,
    /// Inverted-dropout probability on every LSTM input and on the top output (training).
    pub dropout: f64,
    /// Seeds the initial parameters, the initial allocation and the dropout masks.
    pub seed: u64,
}

impl ModelConfig {
    /// A model every backend can build: valid dimensions, a dropout in [0, 1).
    pub fn validate(&self) -> Result<()> {
        self.dims.validate()?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config(format!(
                "dropout {} is not in [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }
}

/// Optimizer buffers in PyTorch layout, as saved in checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    pub rule: Optimizer,
    /// Updates applied so far.
    pub updates: u64,
    /// (name, values): e.g. ("exp_avg", [...]) for Adam.
    pub buffers: Vec<(String, Vec<f32>)>,
}

/// The coarse, per-layer interface every backend implements.
pub trait Backend: Send {
    /// Human-readable description (device, threads, instruction set).
    fn name(&self) -> String;
    fn layout(&self) -> &ParamLayout;
    fn dims(&self) -> ModelDims {
        self.layout().dims
    }

    /// Parameters, PyTorch layout, flat in [`ParamLayout`] order (a host copy).
    fn params(&self) -> Result<Vec<f32>>;
    fn set_params(&mut self, torch: &[f32]) -> Result<()>;
    /// Gradients of the last training step, PyTorch layout (a host copy, for tests and
    /// inspection; the training step never reads it).
    fn grads(&self) -> Result<Vec<f32>>;

    /// word -> cell (row * C + col).
    fn allocation(&self) -> Result<Vec<u32>>;
    fn set_allocation(&mut self, cells: &[u32]) -> Result<()>;

    /// The carried LSTM state of a stream set, if it has one.
    fn state(&self, stream: Stream) -> Result<Option<State<f32>>>;
    fn set_state(&mut self, stream: Stream, state: State<f32>) -> Result<()>;
    fn reset_state(&mut self, stream: Stream);
    /// Where this rank's streams sit in the job's batch and in how many gradient groups
    /// they train ([`Shard::WHOLE`] until set).
    fn set_shard(&mut self, shard: Shard) -> Result<()>;

    /// Map the batch's words to table ids and targets, load the stream's state.
    fn input_forward(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<()>;
    /// LSTM layer `layer` over the batch's 2T steps.
    fn lstm_forward(&mut self, layer: usize) -> Result<()>;
    /// Row and column heads with fused log-softmax + NLL; with `Some(scale)` also the
    /// gradients of scale * (summed NLL) down to the top LSTM output.
    fn heads(&mut self, grad_scale: Option<f32>) -> Result<LossSums>;
    /// LSTM layer `layer` backward (layer 0 also yields the input tables' gradient).
    fn lstm_backward(&mut self, layer: usize) -> Result<()>;

    /// Forward and backward of this rank's training batch in its gradient groups
    /// ([`Shard::groups`]), the groups' gradients summed in their fixed order into the
    /// gradient buffer; gradients of `grad_scale` * summed NLL. Nothing is read back: the
    /// losses come with the norm from [`Backend::clip_and_step`] (or, on their own, from
    /// [`Backend::step_loss`]).
    fn train_step(&mut self, batch: &Batch<'_>, step: u64, grad_scale: f32) -> Result<()>;
    /// The summed losses of the last [`Backend::train_step`], read now (a host
    /// synchronisation of its own: the training loop takes them from `clip_and_step`).
    fn step_loss(&mut self) -> Result<LossSums>;
    /// Sum the gradient buffer over the ranks of `coll`, in place where it lies.
    fn all_reduce_grads(&mut self, coll: &mut dyn GradReduce) -> Result<()>;
    /// Global L2 norm of the gradients, then one update with them scaled by the clipping
    /// coefficient min(1, max_norm / (norm + 1e-6)) (`max_norm <= 0`: no clipping).
    /// Returns the norm with the last training step's losses; a norm that is not finite
    /// applies no update (the caller stops).
    fn clip_and_step(&mut self, rule: &Optimizer, lr: f64, max_norm: f64) -> Result<StepFigures>;
    fn optimizer_state(&self) -> Result<Option<OptimizerState>>;
    fn set_optimizer_state(&mut self, state: OptimizerState) -> Result<()>;

    /// Start a loss-table pass: zeroed tables for the words `words` (all of them:
    /// `0..vocab`), refused beyond `max_bytes`.
    fn begin_loss_tables(&mut self, words: std::ops::Range<usize>, max_bytes: u64) -> Result<()>;
    /// One batch of the pass: an evaluation forward, then the batch's full -log-softmax
    /// rows and columns added into the tables of its target words in the pass's range.
    /// Returns the losses of all its words.
    fn accumulate_loss_tables(&mut self, batch: &Batch<'_>) -> Result<LossSums>;
    /// End the pass: the accumulated tables (read once per round).
    fn take_loss_tables(&mut self) -> Result<LossTables>;
    /// End the pass with the tables summed over the ranks of `peers` where they lie and
    /// scattered by word: this rank gets its share of the pass's words only, so no rank
    /// ever holds the summed tables of the whole pass ([`ScatteredTables`]). `Ok(None)`,
    /// with the pass untouched: this backend's tables are in host memory (the caller takes
    /// them and sums them over a host collective).
    fn take_loss_tables_scattered(
        &mut self,
        peers: &mut dyn Peers,
    ) -> Result<Option<ScatteredTables>> {
        let _ = peers;
        Ok(None)
    }

    /// What a device backend's device has been asked to do so far (launches, host
    /// waits, allocations, graph launches); `None` for the CPU.
    fn device_counters(&self) -> Option<Counters> {
        None
    }

    /// Time this backend's phases with `profiler` (the CPU backend: each layer, the heads,
    /// the gradient groups' sum, clipping and the optimizer, and its threads' spans while
    /// tracing). A backend that times nothing of its own ignores it.
    fn set_profiler(&mut self, profiler: crate::Profiler) {
        let _ = profiler;
    }

    /// Forward and backward of one batch through the per-layer calls: a training pass
    /// (dropout keyed by `step`) and the gradients of `grad_scale` * summed NLL; returns
    /// its summed losses. The gradient is left in the gradient buffer.
    fn forward_backward(
        &mut self,
        batch: &Batch<'_>,
        step: u64,
        grad_scale: f32,
    ) -> Result<LossSums> {
        self.forward(batch, Pass::Train { step })?;
        let loss = self.heads(Some(grad_scale))?;
        for l in (0..self.dims().layers).rev() {
            self.lstm_backward(l)?;
        }
        Ok(loss)
    }

    /// Forward through every layer.
    fn forward(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<()> {
        self.input_forward(batch, pass)?;
        for l in 0..self.dims().layers {
            self.lstm_forward(l)?;
        }
        Ok(())
    }

    /// Summed losses of one evaluation batch (no dropout, no gradients).
    fn eval_batch(&mut self, batch: &Batch<'_>) -> Result<LossSums> {
        self.forward(batch, Pass::Eval)?;
        self.heads(None)
    }
}
