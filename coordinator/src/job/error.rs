//! Why the job refuses a call: each kind of refusal with the sentence that says it. The
//! service turns them into the wire's status codes in one place
//! ([`crate::service`]); workers act on those codes (a stale generation rejoins, a group
//! without room is asked again).

/// A refused call of the job's protocol.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A call of a generation that is not the current one, or a wait whose generation
    /// ended: the worker is fenced and joins again.
    #[error("{0}")]
    Stale(String),
    /// A call out of its turn: an epoch never leased or reported twice, a checkpoint
    /// committed already.
    #[error("{0}")]
    OutOfTurn(String),
    /// A rank that has not joined this generation.
    #[error("{0}")]
    NotMember(String),
    /// The job has ended (the cause), or the call ended it.
    #[error("{0}")]
    Ended(String),
    /// A request that cannot be right (version, rank, shape, chunks, checksum).
    #[error("{0}")]
    BadRequest(String),
    /// Something is already there: a rank taken, a push made.
    #[error("{0}")]
    Duplicate(String),
    /// No room: the group is complete (or grows at its next checkpoint), the tables do
    /// not fit.
    #[error("{0}")]
    NoRoom(String),
    /// The coordinator's own state is inconsistent.
    #[error("{0}")]
    Internal(String),
    /// The coordinator is shutting down.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// The call's stream broke off (the transport's error as it came, and its message).
    #[error("{message}")]
    Received {
        message: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type JobResult<T> = std::result::Result<T, JobError>;

/// A request that cannot be right, with what is wrong.
pub(super) fn invalid(e: impl std::fmt::Display) -> JobError {
    JobError::BadRequest(e.to_string())
}
