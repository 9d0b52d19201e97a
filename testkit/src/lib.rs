//! Tools for testing kvstore the way it fails in production, and for running it locally.
//!
//! # Layout
//! - [`process`]: a [`ProcessCluster`] of real `kvstore-server` processes that can be killed
//!   with SIGKILL, stopped, restarted on their data, and partitioned.
//! - [`proxy`]: a TCP [`Proxy`] between nodes that can cut and heal a link.
//! - [`chaos`]: the seeded chaos run behind `cargo xtask chaos`, built from both.
//! - [`supervise`]: the local cluster behind `cargo xtask cluster`: nodes whose log lines are
//!   prefixed with their name, reported when they exit, restarted on request.
//! - [`tls`]: a throwaway CA and the certificates it signs, for TLS clusters.
//! - [`Error`]: this crate's one error enum.
//!
//! Everything binds loopback addresses only, and stops the processes it started by PID.

pub mod chaos;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod supervise;
pub mod tls;

pub use process::ProcessCluster;
pub use proxy::Proxy;

/// What can go wrong while driving a test cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node did not start, stopped when it should not, or said something unexpected.
    #[error("{0}")]
    Node(String),
    /// A call to a node failed.
    #[error("{0}")]
    Call(#[from] tonic::Status),
    /// A client could not be made.
    #[error(transparent)]
    Client(#[from] kvstore::Error),
    /// A connection to a node could not be made.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A test certificate could not be made.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}
