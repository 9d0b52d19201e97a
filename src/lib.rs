//! kvstore: a replicated key-value store. This crate is the node (gRPC services, configuration,
//! startup and shutdown) and the client side (a small client and the REPL); the actors that
//! hold and replicate the data live in the `kvstore-actors` crate and know nothing of gRPC.
//!
//! # Layout
//! - [`pb`]: code generated from `proto/kvstore.proto` (the wire contract) and conversions
//!   between wire messages and the actors' types.
//! - [`config`]: every flag of `kvstore-server`, the node's settings and input limits.
//! - [`server`]: [`server::run`], which starts a node on a listener and stops it when told.
//! - [`service`]: the tonic handlers, thin: validate, send one message, map the reply.
//! - [`peer`]: the gRPC client a replication actor uses to reach its peer.
//! - [`error`]: this crate's error enum, mapped to `tonic::Status` in one place.
//! - [`client`] and [`shell`]: what `kvstore-cli` is made of; [`shell::Shell`] executes one
//!   REPL line and returns its output, so whole sessions are testable without a terminal.
//!
//! # A Put's path
//! `service::kv` validates the key and value, then asks the coordinator, which has the store
//! actor apply the write under a fresh version, hands the versioned write to each peer's
//! replication actor, and waits for them up to the replication deadline. Each replication actor
//! calls `Replicator.Replicate` on its peer, whose `service::replicator` applies the write if it
//! is newer than what it holds.

pub mod client;
pub mod config;
pub mod error;
pub mod net;
pub mod pb;
pub mod peer;
pub mod server;
pub mod service;
pub mod shell;
pub mod wire;

pub use config::{Limits, NodeConfig};
pub use error::Error;

/// The node's actors with its gRPC peers plugged in.
pub type Node = kvstore_actors::Coordinator<peer::GrpcPeer>;
