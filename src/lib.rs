//! kvstore: a replicated key-value store. This crate is the node (gRPC services, configuration,
//! startup and shutdown) and the client side (a small client and the REPL); the actors that
//! hold and replicate the data live in the `kvstore-actors` crate and know nothing of gRPC.
//!
//! # Layout
//! The node:
//! - [`server`]: [`server::run`], which starts a node on a listener and stops it when told.
//! - [`listener`]: the connections it accepts, bounded in number and idle time.
//! - [`service`]: the tonic handlers, thin: validate, send one message, map the reply; and
//!   the layer that words tonic's refusals of undecodable requests.
//! - [`peer`]: the gRPC link a replication actor uses to reach its peer.
//! - [`config`]: every flag of `kvstore-server`, the node's settings and input limits.
//! - [`wire`]: wire messages into the actors' types, checked.
//! - [`membership`]: ring changes (join, leave, remove) and catching up with a newer ring;
//!   [`gossip`]: which nodes are live and which ring each holds, over chitchat.
//! - [`metrics`]: the Prometheus series and the exposition served at `GET /metrics`.
//!
//! The client: [`client`] and [`shell`], what `kvstore-cli` is made of, and [`backup`], the
//! backup file it writes and `kvstore-server --restore` reads; [`shell::Shell`]
//! executes one REPL line and returns its output, so whole sessions are testable without a
//! terminal.
//!
//! Shared by both: [`pb`] (the code generated from `proto/kvstore.proto`, the wire contract),
//! [`net`] (addresses, channels, the words for a failed call), [`tls`] (the PEM files of the
//! `--tls-*` flags and the rustls settings made from them) and [`error`] (this crate's
//! error enum, mapped to `tonic::Status` in one place).
//!
//! # A Put's path
//! 1. `service::kv` checks the key and value against the limits, and asks the coordinator.
//! 2. The coordinator (`kvstore_actors::coordinator`) checks this node's clock agrees with its
//!    peers', and asks the store actor, which checks the log can take the write, puts it in
//!    the map under a fresh version, and queues it for the log.
//! 3. The coordinator hands the versioned write to every peer's replication actor, and waits
//!    for them and for the log, up to the replication deadline.
//! 4. Each replication actor sends its peer the writes that arrived since its last batch, over
//!    one long-lived `Replicator.ReplicateStream` (`peer`); the peer's `service::replicator`
//!    applies each write that is newer than what it holds, logs the batch, and answers.
//! 5. The Ack says whether the write quorum was met, and names every peer that missed it.

pub mod backup;
pub mod client;
pub mod config;
pub mod error;
pub mod gossip;
pub mod listener;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod pb;
pub mod peer;
pub mod server;
pub mod service;
pub mod shell;
pub mod tls;
pub mod wire;

pub use config::{Limits, NodeConfig};
pub use error::Error;

/// The node's actors with its gRPC peers plugged in.
pub type Node = kvstore_actors::Coordinator<peer::GrpcPeer>;
