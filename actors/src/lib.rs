//! The actors inside one kvstore node, and the plain types they exchange. Nothing here knows
//! about gRPC: the node crate plugs its network client in through [`PeerClient`].
//!
//! # Layout
//! - [`version`]: [`Version`]s of writes and the [`NodeId`]s inside them.
//! - [`clock`]: the [`Clock`], a hybrid logical clock that issues versions.
//! - [`entry`]: what a node keeps per key ([`Entry`], [`Slot`](entry::Slot)), what travels
//!   between nodes ([`Write`]), and last-writer-wins.
//! - [`store`]: the [`StoreActor`], sole owner of the node's map; applies local writes and
//!   replicated ones, and logs each before it is acknowledged.
//! - [`view`]: consistent copies of the map for `List`, made beside the store actor.
//! - [`storage`]: the write-ahead log and snapshots in a node's data dir, and recovery.
//! - [`peer`]: the seam to the network ([`PeerClient`]), and delivery in batches.
//! - [`health`]: what a node believes about each peer ([`PeerHealth`]).
//! - [`replication`]: one [`ReplicationActor`] per peer, with a bounded mailbox, that delivers
//!   writes to that peer, in batches, and holds what it has not confirmed.
//! - [`antientropy`]: digests of hashed key ranges, and the push-pull round that repairs
//!   whatever differs between two nodes.
//! - [`coordinator`]: the [`Coordinator`], the write path: store locally, fan out to every
//!   replication actor, wait up to the replication deadline, judge the write quorum; and
//!   quorum reads with read repair.
//! - [`ring`]: which nodes hold which keys: partitions, their preference lists, and how joins
//!   and leaves move them.
//! - [`merge`]: a List over a ring, merged from the sorted streams of the nodes read from.
//! - [`placement`]: the ring as one node sees it: which of its peers hold a key, and which
//!   partitions it shares with each.
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
//! everywhere, where the original Go system's blind overwrite left them different forever.
//!
//! The hybrid clock keeps versions close to wall-clock time (so "newest wins" means what a
//! user expects) while never going backwards and always moving past every version the node
//! has seen, so a write made after observing another always orders after it.
//!
//! What versions do not give on their own is delivery: a node that missed a write (it was
//! down, its mailbox was full, it crashed and lost its memory) stays behind until something
//! resends it. Three mechanisms do, each covering what the one before cannot:
//!
//! 1. **The log** ([`storage`]): a write is in the node's log before the node acknowledges it,
//!    so a crash loses nothing acknowledged, and the clock restarts past every version logged.
//! 2. **Hinted handoff** ([`replication`]): a write a peer did not confirm stays in that peer's
//!    replication actor, in order, and is redelivered with backoff when the peer returns.
//!    Cheap and fast, but bounded and in memory: an overflow or a restart loses it.
//! 3. **Anti-entropy** ([`antientropy`]): two nodes compare digests of hashed key ranges and
//!    exchange only the ranges that differ. It repairs anything, whatever was lost and why,
//!    at the cost of scanning the map; it runs when a peer marked for resync returns, after a
//!    restart, and periodically.
//!
//! Deletes ride the same paths as tombstones, ordered like any write, so a delete can only be
//! undone by a newer write, never by a stale replica, a replayed hint or a restart. Tombstones
//! are purged after a grace period (`--tombstone-grace`); a replica that was away longer than
//! that and still holds the deleted key could bring it back, which is the grace period's risk,
//! as with Cassandra's `gc_grace_seconds`. Expired tombstones are also refused on apply and
//! left out of digests, so nodes do not trade them back and forth while purging.

pub mod antientropy;
pub mod clock;
pub mod coordinator;
pub mod entry;
pub mod error;
pub mod health;
pub mod membership;
pub mod merge;
pub mod peer;
pub mod placement;
pub mod replication;
pub mod ring;
pub mod storage;
pub mod store;
pub mod version;
pub mod view;

#[cfg(test)]
mod testing;

pub use clock::Clock;
pub use coordinator::{
    AckAfter, Coordinator, CoordinatorConfig, NodeStatus, PeerFailure, PeerStatus, ReadError,
    WriteOutcome, WriteQuorum,
};
pub use entry::{Entry, Write};
pub use error::{Error, LogError, LogFailure};
pub use health::{PeerHealth, PeerState};
pub use peer::{PeerClient, PeerError};
pub use replication::ReplicationActor;
pub use storage::record::MAX_WRITE_BYTES;
pub use storage::{Storage, StorageConfig, StorageMetrics, SyncMode};
pub use store::{StoreActor, StoreReader, StoreStats};
pub use version::{NodeId, Version};

/// Spawns `actor` with a bounded mailbox of `capacity`, its task inside the current span, so
/// that its log lines carry the fields of the node that spawned it (kameo's own spawn starts
/// the task outside any span).
pub(crate) fn spawn_in_span<A: kameo::Actor<Args = A>>(
    actor: A,
    capacity: usize,
) -> kameo::actor::ActorRef<A> {
    use kameo::actor::Spawn;
    use tracing::Instrument;
    let prepared = A::prepare_with_mailbox(kameo::mailbox::bounded(capacity));
    let actor_ref = prepared.actor_ref().clone();
    tokio::spawn(prepared.run(actor).in_current_span());
    actor_ref
}
