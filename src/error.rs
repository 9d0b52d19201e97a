//! The node crate's error enum, and the one place where errors become gRPC statuses.

use kvstore_actors::LogFailure;
use tonic::{Code, Status};

/// Everything that can go wrong in a node or its client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or over a limit. The message names the problem.
    #[error("{0}")]
    InvalidArgument(String),
    /// A bound on what this node keeps was reached (distinct node ids).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The key is absent (or deleted).
    #[error("key not found: {0}")]
    NotFound(String),
    /// Not enough nodes answered (a quorum read).
    #[error("{0}")]
    Unavailable(String),
    /// The cluster is set up wrong in a way no retry fixes (a node is its own peer).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A Replicator call without the cluster's token.
    #[error("{0}")]
    Unauthenticated(String),
    /// A configured address is not usable.
    #[error("invalid address '{addr}': {reason}")]
    InvalidAddress { addr: String, reason: String },
    /// A TLS file named by a flag cannot be used.
    #[error("{flag} {}: {reason}", path.display())]
    Tls {
        flag: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
    /// The node's actors failed (in practice: they are shutting down).
    #[error(transparent)]
    Actors(#[from] kvstore_actors::Error),
    /// Binding or serving on the socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The node cannot gossip (its UDP port is taken).
    #[error("{0}")]
    Gossip(String),
    /// The gRPC server failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A call this node or client made failed with this status (a backup's stream, say).
    #[error("{}", .0.message())]
    Call(tonic::Status),
}

impl From<kvstore_actors::ReadError> for Error {
    fn from(error: kvstore_actors::ReadError) -> Self {
        match error {
            kvstore_actors::ReadError::Local(e) => Error::Actors(e),
            no_quorum => Error::Unavailable(no_quorum.to_string()),
        }
    }
}

impl From<kvstore_actors::merge::ListError> for Error {
    fn from(error: kvstore_actors::merge::ListError) -> Self {
        match error {
            kvstore_actors::merge::ListError::Local(e) => Error::Actors(e),
            unreachable => Error::Unavailable(unreachable.to_string()),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match &error {
            // Passed on as it came.
            Error::Call(status) => return status.clone(),
            Error::InvalidArgument(_) | Error::InvalidAddress { .. } | Error::Tls { .. } => {
                Code::InvalidArgument
            }
            Error::NotFound(_) => Code::NotFound,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Actors(kvstore_actors::Error::StoreStopped) => Code::Unavailable,
            // A write from a clock too far ahead: the sender holds it and tries again, which
            // succeeds once the clocks agree.
            Error::Actors(kvstore_actors::Error::AheadOfClock { .. }) => Code::FailedPrecondition,
            // This node's own clock is off: another node can take the write.
            Error::Actors(kvstore_actors::Error::ClockOff { .. }) => Code::Unavailable,
            // A write this node could not log: a full disk, or a log far behind its disk, is
            // exhaustion; anything else means "try another node" until this one is repaired.
            Error::Actors(kvstore_actors::Error::Log(log))
                if matches!(log.kind, LogFailure::DiskFull | LogFailure::Backlogged) =>
            {
                Code::ResourceExhausted
            }
            Error::Actors(kvstore_actors::Error::Log(_)) => Code::Unavailable,
            // A ring change refused: asked of a ring that cannot take it.
            Error::Actors(kvstore_actors::Error::Ring(_)) => Code::FailedPrecondition,
            Error::Actors(_) => Code::Internal,
            Error::Io(_) | Error::Transport(_) | Error::Gossip(_) => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}
