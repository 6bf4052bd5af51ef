//! The Backend boundary: whole layers per call, parameters and gradients exchanged in
//! PyTorch's layout. The trainer drives a `Box<dyn Backend>` and never sees the device.
//!
//! A training step is `input_forward` -> `lstm_forward(0..L)` -> `heads(Some(scale))` ->
//! `lstm_backward(L-1..=0)` -> (all-reduce) -> `grad_norm` -> `optimizer_step`; the
//! provided methods [`Backend::train_step`] and [`Backend::eval_batch`] spell it out.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::cpu::{Batch, Engine, LossSums, Pass, State, StreamId};
use crate::layout::{ModelDims, ParamLayout};
use crate::optim::Optimizer;
use crate::tables::LossTables;
use crate::{Error, Result};

/// What a backend needs to build a model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub dims: ModelDims,
    /// Inverted-dropout probability on every LSTM input and on the top output (training).
    pub dropout: f64,
    /// Seeds the initial parameters, the initial allocation and the dropout masks.
    pub seed: u64,
    /// CPU threads (0 = all cores).
    pub threads: usize,
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

/// Which backend to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The best available backend (the CPU in this build).
    Auto,
    Cpu,
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Err(Error::Backend(
                "this build of lightrnn has no CUDA backend; use --backend cpu or auto".into(),
            )),
            other => Err(Error::Config(format!(
                "unknown backend {other:?} (expected auto or cpu)"
            ))),
        }
    }
}

/// Build the backend `kind` for `cfg`.
pub fn open_backend(kind: BackendKind, cfg: &ModelConfig) -> Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Auto | BackendKind::Cpu => Ok(Box::new(CpuBackend::new(cfg)?)),
    }
}

/// The coarse, per-layer interface every backend implements.
pub trait Backend: Send {
    /// Human-readable description (device, threads, instruction set).
    fn name(&self) -> String;
    fn layout(&self) -> &ParamLayout;
    fn dims(&self) -> ModelDims {
        self.layout().dims
    }

    /// Parameters, PyTorch layout, flat in [`ParamLayout`] order.
    fn params(&self) -> Result<Vec<f32>>;
    fn set_params(&mut self, torch: &[f32]) -> Result<()>;
    /// Gradients of the last backward pass, PyTorch layout.
    fn grads(&self) -> Result<Vec<f32>>;
    /// The flat gradient buffer in the backend's own layout, for an all-reduce between
    /// identical backends (all ranks use the same layout).
    fn grads_flat_mut(&mut self) -> Result<&mut [f32]>;

    /// word -> cell (row * C + col).
    fn allocation(&self) -> Result<Vec<u32>>;
    fn set_allocation(&mut self, cells: &[u32]) -> Result<()>;

    /// The carried LSTM state of a stream set, if it has one.
    fn state(&self, stream: StreamId) -> Result<Option<State<f32>>>;
    fn set_state(&mut self, stream: StreamId, state: State<f32>) -> Result<()>;
    fn reset_state(&mut self, stream: StreamId);
    /// This rank's batches are streams `offset..offset + B` of a `global`-stream batch:
    /// dropout masks follow the global stream index, so the ranks of a data-parallel job
    /// together draw what one process with the whole batch would. `None`: whole batches.
    fn set_shard(&mut self, shard: Option<(usize, usize)>) -> Result<()>;

    /// Map the batch's words to table ids and targets, load the stream's state.
    fn input_forward(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<()>;
    /// LSTM layer `layer` over the batch's 2T steps.
    fn lstm_forward(&mut self, layer: usize) -> Result<()>;
    /// Row and column heads with fused log-softmax + NLL; with `Some(scale)` also the
    /// gradients of scale * (summed NLL) down to the top LSTM output.
    fn heads(&mut self, grad_scale: Option<f32>) -> Result<LossSums>;
    /// LSTM layer `layer` backward (layer 0 also yields the input tables' gradient).
    fn lstm_backward(&mut self, layer: usize) -> Result<()>;
    /// After an evaluation forward: add the batch's full -log-softmax rows and columns
    /// into the loss tables of its target words; returns the batch's losses.
    fn loss_tables(&mut self, tables: &mut LossTables) -> Result<LossSums>;

    /// Global L2 norm of the gradients.
    fn grad_norm(&mut self) -> Result<f64>;
    /// One update with gradients multiplied by `gscale` (clipping).
    fn optimizer_step(&mut self, rule: &Optimizer, lr: f64, gscale: f64) -> Result<()>;
    fn optimizer_state(&self) -> Result<Option<OptimizerState>>;
    fn set_optimizer_state(&mut self, state: OptimizerState) -> Result<()>;

    /// Forward through every layer.
    fn forward(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<()> {
        self.input_forward(batch, pass)?;
        for l in 0..self.dims().layers {
            self.lstm_forward(l)?;
        }
        Ok(())
    }

    /// Forward and backward of one training batch; gradients of `grad_scale` * summed NLL.
    fn train_step(&mut self, batch: &Batch<'_>, step: u64, grad_scale: f32) -> Result<LossSums> {
        self.forward(batch, Pass::Train { step })?;
        let loss = self.heads(Some(grad_scale))?;
        for l in (0..self.dims().layers).rev() {
            self.lstm_backward(l)?;
        }
        Ok(loss)
    }

    /// One batch of a loss-table pass: evaluation forward, then [`Backend::loss_tables`].
    fn accumulate_batch(&mut self, batch: &Batch<'_>, tables: &mut LossTables) -> Result<LossSums> {
        self.forward(batch, Pass::Eval)?;
        self.loss_tables(tables)
    }

    /// Summed losses of one evaluation batch (no dropout, no gradients).
    fn eval_batch(&mut self, batch: &Batch<'_>) -> Result<LossSums> {
        self.forward(batch, Pass::Eval)?;
        self.heads(None)
    }
}

/// The CPU backend: [`Engine<f32>`].
pub struct CpuBackend {
    engine: Engine<f32>,
}

impl CpuBackend {
    pub fn new(cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            engine: Engine::new(cfg.dims, cfg.dropout, cfg.seed, cfg.threads)?,
        })
    }

    pub fn engine(&self) -> &Engine<f32> {
        &self.engine
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        let isa = if cfg!(target_arch = "x86_64") {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    "avx512"
                } else if std::arch::is_x86_feature_detected!("avx2") {
                    "avx2"
                } else {
                    "baseline"
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            "baseline"
        } else {
            "baseline"
        };
        format!("cpu ({} threads, {isa}, f32)", self.engine.threads())
    }
    fn layout(&self) -> &ParamLayout {
        self.engine.layout()
    }
    fn params(&self) -> Result<Vec<f32>> {
        Ok(self.engine.params_torch())
    }
    fn set_params(&mut self, torch: &[f32]) -> Result<()> {
        self.engine.set_params_torch(torch)
    }
    fn grads(&self) -> Result<Vec<f32>> {
        Ok(self.engine.grads_torch())
    }
    fn grads_flat_mut(&mut self) -> Result<&mut [f32]> {
        Ok(self.engine.grads_mut())
    }
    fn allocation(&self) -> Result<Vec<u32>> {
        Ok(self.engine.allocation().to_vec())
    }
    fn set_allocation(&mut self, cells: &[u32]) -> Result<()> {
        self.engine.set_allocation(cells)
    }
    fn state(&self, stream: StreamId) -> Result<Option<State<f32>>> {
        Ok(self.engine.state(stream).cloned())
    }
    fn set_state(&mut self, stream: StreamId, state: State<f32>) -> Result<()> {
        self.engine.set_state(stream, state)
    }
    fn reset_state(&mut self, stream: StreamId) {
        self.engine.reset_state(stream)
    }
    fn set_shard(&mut self, shard: Option<(usize, usize)>) -> Result<()> {
        self.engine.set_shard(shard)
    }
    fn input_forward(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<()> {
        self.engine.input_forward(batch, pass)
    }
    fn lstm_forward(&mut self, layer: usize) -> Result<()> {
        self.engine.lstm_forward(layer)
    }
    fn heads(&mut self, grad_scale: Option<f32>) -> Result<LossSums> {
        self.engine.heads(grad_scale)
    }
    fn lstm_backward(&mut self, layer: usize) -> Result<()> {
        self.engine.lstm_backward(layer)
    }
    fn loss_tables(&mut self, tables: &mut LossTables) -> Result<LossSums> {
        self.engine.accumulate_loss_tables(tables)
    }
    fn grad_norm(&mut self) -> Result<f64> {
        Ok(self.engine.grad_norm())
    }
    fn optimizer_step(&mut self, rule: &Optimizer, lr: f64, gscale: f64) -> Result<()> {
        self.engine.optimizer_step(rule, lr, gscale)
    }
    fn optimizer_state(&self) -> Result<Option<OptimizerState>> {
        Ok(self
            .engine
            .optimizer_state()
            .map(|(rule, updates, bufs)| OptimizerState {
                rule,
                updates,
                buffers: bufs.into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
            }))
    }
    fn set_optimizer_state(&mut self, state: OptimizerState) -> Result<()> {
        let names = state.rule.state_names();
        let mut bufs = Vec::with_capacity(names.len());
        for name in names {
            let b = state
                .buffers
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| Error::Shape(format!("optimizer state lacks buffer {name:?}")))?;
            bufs.push(b.1.clone());
        }
        self.engine
            .set_optimizer_state(state.rule, state.updates, bufs)
    }
}
