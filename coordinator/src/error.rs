//! Errors of the coordinator crate: the libraries' errors as they are, and what the
//! program itself can get wrong (a command line that cannot work, a local file, TLS, a
//! picture, a job that ended with a cause).

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] lightrnn_core::Error),
    #[error(transparent)]
    Kernel(#[from] lightrnn_kernels::Error),
    #[error(transparent)]
    Alloc(#[from] lightrnn_alloc::AllocError),
    /// Arguments that cannot work together, or a value out of range.
    #[error("{0}")]
    Usage(String),
    /// A local file or socket (what was being done, and the system's error).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Certificates, keys, or the TLS configuration.
    #[error("TLS: {0}")]
    Tls(String),
    #[error("drawing the picture: {0}")]
    Plot(String),
    /// The job ended with this cause.
    #[error("coordinator: {0}")]
    Job(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A usage error, as `bail!` would say it.
pub(crate) fn usage<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Usage(msg.into()))
}

/// Attach what was being done to an I/O error.
pub(crate) trait IoContext<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what(),
            source,
        })
    }
}
