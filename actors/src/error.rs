//! The actors crate's one error type.

/// What can go wrong inside a node's actors. The node crate maps each case to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store actor is not running (the node is shutting down).
    #[error("the store is shutting down")]
    StoreStopped,
}
