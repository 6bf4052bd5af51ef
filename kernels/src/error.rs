//! [`Error`], the errors of the kernels crate (what failed, and whether the same work
//! may succeed when tried again), and its [`Result`].

/// Errors of the kernels crate: what failed, and ([`Error::retryable`]) whether the same
/// work may succeed when tried again.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Sizes that do not fit together (a caller bug or a corrupt checkpoint).
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A model or run setting that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The backend cannot run (missing device, missing library, thread start failure).
    #[error("backend unavailable: {0}")]
    Backend(String),
    /// A CUDA driver, runtime or library call failed while running.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// The device has no room for the model, its optimizer or its activations.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    /// The job's collective failed (a lost peer, a broken connection, a deadline).
    #[error("{0}")]
    Collective(String),
}

impl Error {
    /// Whether retrying (on a re-formed group, from the last checkpoint) may succeed: a
    /// lost peer or a device fault may not happen again; a shape, a setting, a missing
    /// device or a model too large for the device will.
    pub fn retryable(&self) -> bool {
        matches!(self, Error::Cuda(_) | Error::Collective(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
