//! Checkpoints: safetensors tensors + JSON metadata in object storage.
//!
//! A checkpoint is a directory (`RUN/checkpoints/step-000000001234/`) holding
//! - `model.safetensors`: every parameter under its PyTorch name and shape, and the
//!   allocation as the int64 tensors `row` and `col` [V] — the buffers of the reference
//!   `LightRNN` module, so `model.load_state_dict(safetensors.torch.load_file(...))` works;
//! - `optimizer.safetensors`: the optimizer's buffers (`exp_avg.<param>`, ...), if any;
//! - `state.safetensors`: the carried LSTM state of the training streams (`h`, `c`
//!   [layers, batch, hidden]);
//! - `vocab.txt`;
//! - `meta.json`, written last: effective config, step, epoch and data cursor, RNG seed,
//!   learning-rate state, vocabulary hash, and the size and SHA-256 of every other object.
//!
//! A directory without a `meta.json` whose objects verify is not a checkpoint; loading
//! walks back to the newest one that verifies.

mod commit;
mod format;
mod manifest;

pub use commit::{commit, dir_name, list, newest, prune, resolve};
pub use format::{SaveRequest, load, write_objects};
pub use manifest::{FORMAT, FileEntry, JobRecord, META, Meta};

use lightrnn_kernels::{OptimizerState, State};

use crate::data::vocab::Vocab;

/// The tensors of the model and its allocation.
pub const MODEL: &str = "model.safetensors";
/// The optimizer's buffers.
pub(crate) const OPTIMIZER: &str = "optimizer.safetensors";
/// The carried LSTM state of the training streams.
pub(crate) const STATE: &str = "state.safetensors";
pub(crate) const VOCAB: &str = crate::data::vocab::VOCAB_FILE;

/// A loaded checkpoint.
pub struct Checkpoint {
    pub url: String,
    pub meta: Meta,
    pub vocab: Vocab,
    /// Parameters in PyTorch layout, [`ParamLayout`] order.
    pub params: Vec<f32>,
    /// word -> cell.
    pub cells: Vec<u32>,
    pub optimizer: Option<OptimizerState>,
    pub state: Option<State<f32>>,
}
