//! Communication between the ranks of a job, on the device: not device code, but what the
//! CUDA backend lends its buffers to.
//!
//! - [`allreduce`]: the gradient buffer lent to the job's collective ([`allreduce::Lent`],
//!   the boundary's `DeviceGrads`), the fixed-order all-reduce and the loss tables'
//!   reduce-scatter over a [`crate::backend::Peers`] transport, and
//!   [`allreduce::ThreadPeers`] (ranks as threads of one process, for the tests).
//! - [`nccl`] (the `cuda` feature): NCCL between GPU processes, the transport the GPU
//!   workers use, with deadlines and cancellation.

pub mod allreduce;
#[cfg(feature = "cuda")]
pub mod nccl;
