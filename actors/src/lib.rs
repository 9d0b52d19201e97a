//! The actors inside one kvstore node, and the plain types they exchange. Nothing here knows
//! about gRPC: the node crate plugs its network client in through [`PeerClient`].
//!
//! # Layout
//! - [`version`]: [`Version`] (hybrid logical clock time + node id) and the [`Clock`] that makes them.
//! - [`store`]: the [`StoreActor`], sole owner of the node's map; applies local writes and
//!   replicated ones with last-writer-wins on the version, and logs each before it is acked.
//! - [`storage`]: the write-ahead log and snapshots in a node's data dir, and recovery.
//! - [`replication`]: one [`ReplicationActor`] per peer, with a bounded mailbox, that delivers
//!   writes to that peer and tracks whether it is up, down or lagging.
//! - [`coordinator`]: the [`Coordinator`], the write path: store locally, fan out to every
//!   replication actor, wait up to the replication deadline, judge the write quorum.
//! - [`error`]: this crate's one error enum.
//!
//! # How replicas converge
//! Every write, a Put or a Delete, gets a [`Version`] from the node that accepted it: the
//! node's hybrid logical clock reading, with the node id as tie-break. Versions are totally
//! ordered and unique per write. Each node keeps, per key, the entry with the greatest version
//! it has seen; a Delete is an entry too (a tombstone), so "deleted" is ordered against "put"
//! like any two values. Applying an entry is therefore a max() over versions: idempotent
//! (applying twice changes nothing), commutative (order of arrival does not matter) and
//! associative. Two nodes that have received the same set of writes, in any order, hold the
//! same map. That is what makes concurrent Puts of one key through different nodes end equal
//! everywhere, where the seed's blind overwrite left them different forever.
//!
//! The hybrid clock keeps versions close to wall-clock time (so "newest wins" means what a
//! user expects) while never going backwards and always moving past every version the node
//! has seen, so a write made after observing another always orders after it.
//!
//! What this does not give on its own: a node that missed a write (peer down, mailbox full)
//! stays behind until something resends it. The replication actor records that the peer
//! needs a resync; hinted handoff and anti-entropy act on it.

pub mod coordinator;
pub mod error;
pub mod replication;
pub mod storage;
pub mod store;
pub mod version;

pub use coordinator::{Coordinator, CoordinatorConfig, PeerFailure, WriteOutcome, WriteQuorum};
pub use error::Error;
pub use replication::{PeerClient, PeerError, PeerHealth, PeerState, ReplicationActor};
pub use storage::{Storage, StorageConfig, SyncMode};
pub use store::{Entry, StoreActor, StoreReader, StoreStats, Write};
pub use version::{Clock, NodeId, Version};
