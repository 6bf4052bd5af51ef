//! lightrnn-kernels: the math of LightRNN (Li et al., NeurIPS 2016).
//!
//! - [`Backend`]: the one boundary the trainer talks to, coarse per-layer methods (input
//!   preparation, LSTM layer forward/backward, fused output heads, optimizer step).
//! - [`cpu`]: the CPU backend ([`cpu::Engine`], generic over f32/f64; AVX-512/AVX2 chosen at
//!   run time; GEMMs through the `gemm` crate).
//! - [`layout`]: model dimensions and the parameter layout (PyTorch names and shapes).
//! - [`rng`]: Philox counter-based random numbers.
//! - [`optim`]: SGD, Adam, Adagrad and gradient clipping.

pub mod backend;
pub mod cpu;
pub mod device;
pub mod layout;
pub mod optim;
mod real;
pub mod rng;
pub mod tables;

pub use backend::{Backend, BackendKind, CpuBackend, ModelConfig, open_backend};
pub use cpu::{Batch, LossSums, Pass, State, StreamId};
pub use layout::{ModelDims, ParamLayout, ParamSpec};
pub use optim::Optimizer;
pub use real::{Real, exp_f32};
pub use tables::LossTables;

/// Errors of the kernels crate.
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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
