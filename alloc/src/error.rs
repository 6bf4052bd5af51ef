//! The errors of the allocation step and the crate's result type.

/// Errors of the allocation step (bad tables; solver limits).
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Solver(String),
}

pub type Result<T, E = AllocError> = std::result::Result<T, E>;
