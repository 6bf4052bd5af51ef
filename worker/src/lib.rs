//! lightrnn-worker: one rank of a LightRNN training job. Its modules, each using only
//! those listed before it:
//!
//! - [`auto`]: the rule of automatic reallocation (`realloc_every = "auto"`) and its state;
//! - [`data`]: object storage, text, vocabulary, shards, datasets, batches;
//! - [`config`]: the training configuration and presets;
//! - [`report`]: what a run reports (metrics lines, the summary, a rank's figures);
//! - [`checkpoint`]: the checkpoint format, its manifest and commit;
//! - [`dist`]: collectives, the control channel to the job's owner, heartbeats, the wire;
//! - [`train`]: the trainer, evaluation, the rank's part of reallocation, the benchmark;
//! - [`sample`]: text generation from a checkpoint;
//! - [`rank`]: a worker process of a distributed job (join, ring, heartbeat, train).

pub mod auto;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dist;
mod error;
pub mod rank;
pub mod report;
pub mod sample;
pub mod train;

pub use error::{Error, Result, clip, clip_at, clip_lines};
