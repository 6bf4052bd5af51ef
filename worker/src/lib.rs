//! lightrnn-worker: one rank of a LightRNN training job.
//!
//! - [`store`]: object-storage locations (local directories, `file://`, `memory://`);
//! - [`text`], [`vocab`], [`shards`], [`dataset`]: text -> vocabulary -> verified u32
//!   shards, and [`batches`], the streaming truncated-BPTT batcher;
//! - [`config`]: the training configuration and presets;
//! - [`train`]: the training loop; [`checkpoint`]: safetensors checkpoints;
//! - [`eval`] and [`bench`]: evaluation of a checkpoint and the throughput benchmark;
//! - [`corpus`]: parallel vocabulary counting and sharding of many inputs;
//! - [`collective`]: the `Collective` trait and a TCP ring all-reduce between processes.

pub mod batches;
pub mod bench;
pub mod checkpoint;
pub mod cluster;
pub mod collective;
pub mod config;
pub mod corpus;
pub mod dataset;
mod error;
pub mod eval;
pub mod npy;
pub mod realloc;
pub mod remote;
pub mod sample;
pub mod shards;
pub mod store;
pub mod text;
pub mod train;
pub mod vocab;
pub mod zipf;

pub use error::{Error, Result};
