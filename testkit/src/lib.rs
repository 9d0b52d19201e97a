//! Tools for testing kvstore the way it fails in production, and for running it locally.
//!
//! # Layout
//! - [`process`]: a [`ProcessCluster`] of real `kvstore-server` processes that can be killed
//!   with SIGKILL, stopped, restarted on their data, and partitioned.
//! - [`proxy`]: a TCP [`Proxy`] between nodes that can cut, heal and delay a link.
//! - [`netns`]: hosts in network namespaces with a bridge between them, for faults of the
//!   network itself (root only).
//! - [`chaos`]: the seeded chaos run behind `cargo xtask chaos`, built from these.
//! - [`supervise`]: the local cluster behind `cargo xtask cluster`: nodes whose log lines are
//!   prefixed with their name, reported when they exit, restarted on request.
//! - [`tls`]: a throwaway CA and the certificates it signs, for TLS clusters.
//! - [`Error`]: this crate's one error enum.
//!
//! Everything binds loopback addresses (or a topology's own), and stops the processes it
//! started by PID.

pub mod chaos;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod supervise;
pub mod tls;

pub use process::ProcessCluster;
pub use proxy::Proxy;

/// `args` for `nodes` nodes that share this machine: each gets `--worker-threads` of
/// max(1, cores / nodes), unless `args` set it already. A node on a machine of its own keeps
/// its default, one worker per core; nodes sharing one would each start as many, and the
/// machine's cores would be oversubscribed several times over.
pub fn sharing_cores(nodes: usize, mut args: Vec<String>) -> Vec<String> {
    if !args.iter().any(|a| a.starts_with("--worker-threads")) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        args.push("--worker-threads".into());
        args.push((cores / nodes.max(1)).max(1).to_string());
    }
    args
}

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
