//! The training side of a rank, above the data pipeline and the job's distribution:
//!
//! - [`trainer`]: the [`Trainer`]'s loop (epochs, steps, logging windows, the end of an
//!   epoch) and [`train`], [`train_rank`], its entry points; the parts it calls on:
//!   - `run`: what they all share (config, job, dataset, model, loop state, metrics) and
//!     the evaluation of a split;
//!   - `checkpointing`: checkpoints and the best model;
//!   - `policy`: the reallocation rounds of a run and the automatic rule's decisions;
//!   - `finish`: the end of the run, the summary;
//! - [`options`]: where a run reads and writes; `start`: the dataset, the checkpoint to
//!   resume from, the restored loop state;
//! - [`sweep`]: a pass over a split (its reader, streams, cut, runtime);
//! - [`eval`]: the loss of a split over the ranks, and `lightrnn eval`;
//! - [`realloc`]: a rank's part of a reallocation round, and the loss-table passes;
//! - `metrics`, `progress`: `metrics.jsonl`, the progress bar and logging windows;
//!   `board`: TensorBoard's event files, from the same lines; `profiling`: the phases
//!   of each window and the trace of `--profile-steps`;
//! - [`bench`]: `lightrnn bench`, training throughput on a synthetic corpus.

pub mod bench;
mod board;
mod checkpointing;
pub mod eval;
mod finish;
mod metrics;
mod options;
mod policy;
mod profiling;
mod progress;
pub mod realloc;
mod run;
mod start;
pub mod sweep;
pub mod trainer;

pub use eval::{EvalReport, eval_file, evaluate};
pub use options::{BackendFactory, RunOptions};
pub use sweep::Sweep;
pub use trainer::{Trainer, train, train_rank};
