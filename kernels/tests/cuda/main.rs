//! The CUDA backend on the emulated device (the `.cu` kernels built for the host, GEMMs with
//! cuBLAS's semantics), against the CPU backend, and on GPU 0 where there is one
//! ([`common::kinds`]). One test binary, one module per op family:
//!
//! - [`lstm`]: dropout masks, the input tables' gather and scatter, the LSTM cell;
//! - [`heads`]: the fused log-softmax + NLL in every mode;
//! - [`optim`]: the fixed-order reductions, the optimizers, the clipping coefficient;
//! - [`tables`]: the loss-table kernel, the table pass and evaluation;
//! - [`step`]: whole training steps, 200 steps of the `tiny` preset, the step's budgets,
//!   graphs against plain launches;
//! - [`ranks`]: the device all-reduce and reduce-scatter between ranks, NCCL;
//! - [`emulator`]: the checks the emulator adds (memory refusals, GEMM bounds, barrier
//!   deadlocks, launch limits, stream capture).
//!
//! Tests named `emulator_*` run on the emulated device only; `scripts/gpu-check.sh` skips
//! them by that name on a GPU.
#![cfg(feature = "cuda")]

mod common;
mod emulator;
mod heads;
mod lstm;
mod optim;
mod ranks;
mod step;
mod tables;
