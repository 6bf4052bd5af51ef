//! What a run is given besides its config: where it reads and writes, on which backend,
//! how it shows progress, and how it is told to stop.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use lightrnn_kernels::BackendKind;

use lightrnn_core::data::store::Location;
use lightrnn_core::report::ReportSink;

/// Where a run reads and writes, and how it reports.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Text directory or prepared dataset.
    pub data: Location,
    /// Run directory: checkpoints, metrics, summary, tokenised-data cache.
    pub out: Location,
    /// Continue from the newest checkpoint in `out` (start fresh when there is none).
    pub resume: bool,
    /// Continue from exactly this checkpoint (the coordinator resolves it once for all
    /// ranks); overrides `resume`.
    pub checkpoint: Option<Location>,
    pub backend: BackendKind,
    /// Draw a progress bar (a terminal); otherwise log lines every `log_every` steps.
    pub progress: bool,
    /// Set (by a signal handler, or the coordinator) to stop at the next step with a
    /// checkpoint. The ranks of a job agree on the step through their collective.
    pub stop: Option<Arc<AtomicBool>>,
    /// A single-process run publishes its progress here (a metrics endpoint reads it).
    pub report: Option<ReportSink>,
    /// Open the model with this instead of `backend`: a library user's own backend, or the
    /// tests' CUDA backend on the emulated device.
    pub open: Option<BackendFactory>,
}

/// Builds a backend for a model.
pub type BackendFactory = fn(
    &lightrnn_kernels::ModelConfig,
) -> lightrnn_kernels::Result<Box<dyn lightrnn_kernels::Backend>>;
