//! How a rank takes part in a job, below the training loop:
//!
//! - [`collective`]: the [`collective::Collective`] trait and the one-rank identity;
//!   [`ring`]: the TCP ring of CPU workers, [`secure`] its handshake and framing,
//!   [`admit`] who gets in while it forms; `nccl`
//!   (with the `cuda` feature): NCCL for GPU workers' gradients, the ring beside it;
//!   [`watch`]: waits on a peer in short slices, with the stall warnings, the deadline's
//!   error and the figures of the ring's connections (and of the control calls);
//! - [`state`]: the carried LSTM state of checkpoints gathered across ranks, and the
//!   parameter checksum;
//! - [`control`]: the [`control::Control`] channel to the job's owner and [`control::Dist`],
//!   a rank's collective and control together (in-process for a single-process run);
//! - [`remote`]: the control channel over gRPC to a coordinator, with its heartbeats
//!   (its messages convert in `lightrnn_core::wire`).

pub mod admit;
pub mod collective;
pub mod control;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod remote;
pub mod ring;
pub mod secure;
pub mod state;
pub mod watch;
