//! The CUDA backend, present in every build so that no call site needs a `cfg`.
//!
//! - `*.cu`: the kernels, one file per op family, no `#include`, embedded in the binary
//!   ([`layer::SOURCES`]) and compiled by NVRTC for the device at hand on first use.
//! - [`layer`]: the device layer ([`layer::Device`]: memory, launches by name,
//!   column-major GEMMs) with two implementations, the GPU (`gpu`, cudarc + cuBLAS) and
//!   the emulated device (`emulated`: host memory, the same `.cu` files compiled by the
//!   host C++ compiler under `emu/cuda_emu.h`), both behind the `cuda` feature.
//! - [`CudaBackend`]: the LightRNN model written once over the device layer; CI runs it on
//!   the emulated device against the CPU backend. `backend` (what it holds, opening it,
//!   its buffers' housekeeping), `boundary` (the [`crate::Backend`] calls), `host` (a
//!   batch's host side: table ids and scatter lists in the staging, a step's groups
//!   prepared, results read back), `step` (the device work of a pass, named after the
//!   calls it serves, and running a step's work as a CUDA graph), `update` (norm,
//!   clipping and optimizer on the device), `work` (a step's device work as data, what a
//!   graph is keyed by), `graphs` (the graph cache), `workspace` (device memory plans,
//!   staging, the step's device scalars), `devlayout` (parameters at 16-byte boundaries).
//! - [`comm`]: communication between the ranks on the device: the gradient buffer lent to
//!   the job's collective, the fixed-order all-reduce over a [`crate::backend::Peers`]
//!   transport (`comm::allreduce`), and NCCL between GPU processes (`comm::nccl`).
//! - [`device`]: which devices and libraries this machine has; [`nvrtc`]: compiling the
//!   sources (PTX, or CUBIN with ptxas's register and spill report).
//!
//! Without the `cuda` feature, opening the backend says "built without CUDA".

mod backend;
mod boundary;
mod buffers;
pub mod comm;
pub mod device;
mod devlayout;
#[cfg(feature = "cuda")]
pub mod emulated;
#[cfg(feature = "cuda")]
mod gpu;
mod graphs;
mod host;
pub mod layer;
#[cfg(feature = "cuda")]
pub mod nvrtc;
mod step;
mod update;
mod work;
mod workspace;

pub use backend::CudaBackend;
pub use workspace::{activation_bytes, model_bytes};

use serde::{Deserialize, Serialize};

/// The GPU device layer of CUDA device `ordinal` on its own (the kernel parity tests run
/// each kernel on it and on the emulated device).
#[cfg(feature = "cuda")]
pub fn gpu_device(ordinal: usize, precision: Precision) -> crate::Result<Box<dyn layer::Device>> {
    Ok(Box::new(gpu::Gpu::open(ordinal, precision)?))
}

/// Emulated device memory of a backend opened under `LIGHTRNN_CUDA_EMULATOR=1`.
pub const EMULATOR_BYTES: usize = 16 << 30;

/// `LIGHTRNN_CUDA_EMULATOR=1` (builds with the `cuda` feature): every CUDA device opens
/// as the emulated device, so a CUDA job's processes (coordinator, workers, their fault
/// paths) run on machines without a GPU, as the tests run them. Orders of magnitude
/// slower than a GPU: a check of the orchestration, never a way to train. Such workers
/// sum their gradients through the TCP ring (host staging), not NCCL.
pub fn emulator_requested() -> bool {
    cfg!(feature = "cuda") && std::env::var_os("LIGHTRNN_CUDA_EMULATOR").is_some_and(|v| v == "1")
}

/// Whether CUDA device 0 can run the backend here (a GPU, its driver and NVRTC; the
/// emulator does not count).
pub fn gpu_present() -> bool {
    !emulator_requested() && CudaBackend::check(0).is_ok()
}

/// The arithmetic of the GEMMs (accumulation is f32 in both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE f32 products.
    Fp32,
    /// TensorFloat-32 tensor-core products (10-bit mantissa inputs): the GPU default.
    #[default]
    Tf32,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "fp32" => Ok(Self::Fp32),
            "tf32" => Ok(Self::Tf32),
            "bf16" => Err(crate::Error::Config(
                "precision bf16 is not supported yet (use tf32 or fp32)".into(),
            )),
            other => Err(crate::Error::Config(format!(
                "unknown precision {other:?} (expected fp32 or tf32)"
            ))),
        }
    }
}

/// A new NCCL unique id for a group of GPU workers (the calling process hosts the
/// group's bootstrap root until every rank has connected; no GPU needed), or why there
/// is none here: built without CUDA, or no `libnccl.so` on the library path.
pub fn nccl_unique_id() -> crate::Result<Vec<u8>> {
    #[cfg(feature = "cuda")]
    {
        comm::nccl::unique_id().map(|id| id.to_vec())
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(crate::Error::Backend(
            "built without CUDA: no NCCL (rebuild with --features cuda)".into(),
        ))
    }
}

/// Whether this process can create NCCL ids and communicators.
pub fn nccl_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        comm::nccl::nccl_present()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}
