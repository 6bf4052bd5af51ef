//! lightrnn-worker: one rank of a LightRNN training job, over what every side shares
//! (`lightrnn_core`: configuration, data, checkpoints, reports, the wire). Its modules,
//! each using only those listed before it:
//!
//! - [`dist`]: collectives, the control channel to the job's owner, heartbeats;
//! - [`train`]: the trainer, evaluation, the rank's part of reallocation, the benchmark;
//! - [`sample`]: text generation from a checkpoint;
//! - [`prepare`]: a worker's tasks in preparing its job's dataset from text;
//! - [`rank`]: a worker process of a distributed job (join, ring, heartbeat, train).

pub mod dist;
pub mod prepare;
pub mod rank;
pub mod sample;
pub mod train;
