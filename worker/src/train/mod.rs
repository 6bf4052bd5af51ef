//! The training side of a rank, above the data pipeline and the job's distribution:
//!
//! - [`trainer`]: the [`Trainer`] (epochs, steps, validation, schedule, checkpoints, the
//!   end of the run) and [`train`], [`train_rank`], its entry points;
//! - [`options`]: where a run reads and writes; [`start`]: the dataset, the checkpoint
//!   to resume from, the restored loop state;
//! - [`eval`]: the loss of a split over the ranks, and `lightrnn eval`;
//! - [`realloc`]: a rank's part of a reallocation round;
//! - [`metrics`], [`progress`]: `metrics.jsonl`, the progress bar and logging windows;
//! - [`bench`]: `lightrnn bench`, training throughput on a synthetic corpus.

pub mod bench;
pub mod eval;
mod metrics;
mod options;
mod progress;
pub mod realloc;
mod start;
pub mod trainer;

pub use eval::{EvalReport, eval_file, evaluate};
pub use options::{BackendFactory, RunOptions};
pub use trainer::{Trainer, train, train_rank};
