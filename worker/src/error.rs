//! Errors of the worker crate. Each says what it was doing and where (object URL, line),
//! and whether retrying can help.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// Object storage failed while touching `url`.
    #[error("{action} {url}: {source}")]
    Store {
        action: &'static str,
        url: String,
        #[source]
        source: object_store::Error,
    },
    /// An object that must exist does not.
    #[error("{0}: not found")]
    NotFound(String),
    /// Bad input data: a text file, a vocabulary or shards that cannot be used as they are.
    #[error("{0}")]
    Data(String),
    /// A setting that cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// A checkpoint that cannot be used.
    #[error("checkpoint {url}: {msg}")]
    Checkpoint { url: String, msg: String },
    #[error(transparent)]
    Kernel(lightrnn_kernels::Error),
    /// Loss tables the solvers cannot use, or a solver that failed.
    #[error(transparent)]
    Alloc(#[from] lightrnn_alloc::AllocError),
    /// The training loop stopped because its loss is no longer finite.
    #[error("{0}")]
    Diverged(String),
    #[error("background task failed: {0}")]
    Task(String),
    /// A peer or a connection between ranks failed (collectives).
    #[error("{0}")]
    Io(String),
    /// The coordinator refused a request, could not be reached, or ended the job.
    #[error("coordinator: {0}")]
    Control(String),
}

impl From<lightrnn_kernels::Error> for Error {
    /// A collective's failure inside a backend call is the collective's error it was.
    fn from(e: lightrnn_kernels::Error) -> Self {
        match e {
            lightrnn_kernels::Error::Collective(msg) => Error::Io(msg),
            e => Error::Kernel(e),
        }
    }
}

impl Error {
    /// Whether the same operation may succeed if tried again (transient storage errors).
    pub fn retryable(&self) -> bool {
        match self {
            Error::Store { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
            ),
            // A lost peer or coordinator: a re-formed group may go on.
            Error::Task(_) | Error::Io(_) | Error::Control(_) => true,
            Error::Kernel(e) => e.retryable(),
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
