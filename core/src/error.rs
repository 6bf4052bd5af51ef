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

/// The most characters of a user's input an error message quotes.
pub const QUOTE_MAX: usize = 200;

/// `text` shortened for an error message: at most [`QUOTE_MAX`] characters, the rest
/// replaced by a count, so hostile input (a 100 MB value, a 40 KB line) is never echoed
/// whole.
pub fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    clip_at(text, QUOTE_MAX)
}

/// `text` cut after `max` characters, the rest replaced by a count.
pub fn clip_at(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => std::borrow::Cow::Borrowed(text),
        Some((cut, _)) => std::borrow::Cow::Owned(format!(
            "{}… ({} more bytes)",
            &text[..cut],
            text.len() - cut
        )),
    }
}

/// Every line of a message clipped by [`clip`] (parsers' messages quote the input
/// line they failed on).
pub fn clip_lines(message: &str) -> String {
    message.lines().map(clip).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_input_is_clipped_with_its_size_and_short_input_kept() {
        assert_eq!(clip("abc"), "abc");
        let long = "é".repeat(1000);
        let c = clip(&long);
        assert!(c.starts_with(&"é".repeat(QUOTE_MAX)));
        assert!(
            c.ends_with(&format!("({} more bytes)", 2 * (1000 - QUOTE_MAX))),
            "{c}"
        );
        let two = format!("{}\nshort", "x".repeat(5000));
        let c = clip_lines(&two);
        assert!(c.len() < 300 && c.ends_with("\nshort"), "{c}");
    }
}
