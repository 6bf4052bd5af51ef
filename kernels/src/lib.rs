//! lightrnn-kernels: the math of LightRNN (Li et al., NeurIPS 2016).
//!
//! - [`backend`]: the one boundary the trainer talks to ([`Backend`], coarse per-layer
//!   methods, and the types that cross it), with its design note: what lives on the host
//!   and on the device, the call order of a step, who owns which buffer.
//! - [`cpu`]: the CPU backend ([`cpu::CpuBackend`] over [`cpu::Engine`], generic over
//!   f32/f64; AVX-512/AVX2 chosen at run time; GEMMs through the `gemm` crate), its
//!   internal layout.
//! - [`cuda`]: the CUDA backend (the `.cu` kernels, the device layer with its GPU and
//!   emulated implementations, the model written once over it; present in every build,
//!   "built without CUDA" without the `cuda` feature); [`select`]: which backend a
//!   `--backend` names, and opening it.
//! - [`layout`]: model dimensions, the parameter layout (PyTorch names and shapes) and
//!   word allocations; [`tables`]: the loss tables of a reallocation round.
//! - [`groups`]: gradient groups (how a batch is cut, the fixed-order pairwise sum),
//!   shared by every backend.
//! - [`rng`]: Philox counter-based random numbers; [`optim`]: SGD, Adam, Adagrad and
//!   gradient clipping.

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod groups;
pub mod layout;
pub mod optim;
mod real;
pub mod rng;
pub mod select;
pub mod tables;

pub use backend::{
    Backend, Batch, Counters, DeviceGrads, GradReduce, GradsMut, LossSums, ModelConfig,
    OptimizerState, Pass, Peers, ScatteredTables, Shard, State, StepFigures, Stream,
};
pub use cpu::CpuBackend;
pub use cuda::Precision;
pub use layout::{
    ModelDims, ParamLayout, ParamSpec, check_allocation, check_cells, random_allocation,
};
pub use optim::Optimizer;
pub use real::{Real, exp_f32};
pub use select::{BackendKind, BackendOptions, check_backend, open_backend, resolve};
pub use tables::LossTables;

/// Errors of the kernels crate: what failed, and ([`Error::retryable`]) whether the same
/// work may succeed when tried again.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Sizes that do not fit together (a caller bug or a corrupt checkpoint).
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A model or run setting that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The backend cannot run (missing device, missing library, thread start failure).
    #[error("backend unavailable: {0}")]
    Backend(String),
    /// A CUDA driver, runtime or library call failed while running.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// The device has no room for the model, its optimizer or its activations.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    /// The job's collective failed (a lost peer, a broken connection, a deadline).
    #[error("{0}")]
    Collective(String),
}

impl Error {
    /// Whether retrying (on a re-formed group, from the last checkpoint) may succeed: a
    /// lost peer or a device fault may not happen again; a shape, a setting, a missing
    /// device or a model too large for the device will.
    pub fn retryable(&self) -> bool {
        matches!(self, Error::Cuda(_) | Error::Collective(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
