//! lightrnn-kernels: the math of LightRNN (Li et al., NeurIPS 2016).
//!
//! - [`backend`]: the one boundary the trainer talks to ([`Backend`], coarse per-layer
//!   methods, and the types that cross it), with its design note: what lives on the host
//!   and on the device, the call order of a step, who owns which buffer.
//! - [`cpu`]: the CPU backend ([`cpu::CpuBackend`] over [`cpu::Engine`], generic over
//!   f32/f64; AVX-512/AVX2 chosen at run time; GEMMs through the `gemm` crate), its
//!   internal layout.
//! - [`cuda`]: the CUDA backend (the `.cu` kernels, the device layer with its GPU and
//!   emulated implementations, the model written once over it, the communication between
//!   ranks on the device in `cuda::comm`; present in every build,
//!   "built without CUDA" without the `cuda` feature); [`select`]: which backend a
//!   `--backend` names, and opening it.
//! - [`layout`]: model dimensions, the parameter layout (PyTorch names and shapes), the
//!   initial parameters and word allocations, the parity-major storage rows, shared by
//!   every backend; [`tables`]: the loss tables of a reallocation round.
//! - [`groups`]: gradient groups (how a batch is cut and its groups run in order, the
//!   fixed-order pairwise sum), shared by every backend.
//! - [`rng`]: Philox counter-based random numbers; [`optim`]: SGD, Adam, Adagrad and
//!   gradient clipping; [`profile`]: where a step's time goes (phases, spans, traces);
//!   [`Error`]: what fails, and whether retrying may help.

pub mod backend;
pub mod cpu;
pub mod cuda;
mod error;
pub mod groups;
pub mod layout;
pub mod optim;
pub mod profile;
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
pub use error::{Error, Result};
pub use layout::{
    ModelDims, ParamLayout, ParamSpec, check_allocation, check_cells, random_allocation,
};
pub use optim::Optimizer;
pub use profile::{Phase, Profiler};
pub use real::{Real, exp_f32};
pub use select::{BackendKind, BackendOptions, check_backend, open_backend, resolve};
pub use tables::LossTables;
