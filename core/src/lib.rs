//! lightrnn-core: what every side of a LightRNN job shares, the coordinator, the ranks
//! and the command line alike. Its modules, each using only those listed before it:
//!
//! - [`util`]: a rank's share of n items, this machine's memory;
//! - [`auto`]: the rule of automatic reallocation (`realloc_every = "auto"`) and its state;
//! - [`data`]: object storage, text, vocabulary, shards, datasets, batches;
//! - [`config`]: the training configuration and presets;
//! - [`report`]: what a run reports (metrics lines, the summary, a rank's figures);
//! - [`tensorboard`]: TensorBoard's event files (the messages and their records);
//! - [`checkpoint`]: the checkpoint format, its manifest and commit;
//! - [`protocol`]: the control protocol's calls and answers as domain types;
//! - [`wire`]: the one place where the wire's messages convert to and from these types.

pub mod auto;
pub mod checkpoint;
pub mod config;
pub mod data;
mod error;
pub mod protocol;
pub mod report;
pub mod tensorboard;
pub mod util;
pub mod wire;

pub use error::{Error, Result, clip, clip_at, clip_lines};
