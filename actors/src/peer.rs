//! The seam between a node's actors and its network: how a replication actor, anti-entropy
//! and quorum reads reach a peer ([`PeerClient`], which the node crate implements over gRPC and
//! tests with fakes), what can go wrong there ([`PeerError`]), and how writes go out in batches
//! that fit the peer's limits ([`deliver`]).

use std::future::Future;

use crate::entry::{Entry, Write};
use crate::placement::PartitionSet;

/// Most bytes per replication batch, when the peer's message limit allows it: big enough that
/// a batch's cost per write is small, small enough that one batch does not hold a stream long.
pub const BATCH_BYTES: usize = 512 * 1024;

/// How a replication actor reaches its peer. Implementations own the connection and reconnect
/// on their own; a call that fails is reported, not retried here. Clones share the connection.
pub trait PeerClient: Clone + Send + Sync + 'static {
    /// Delivers writes. `Ok` means the peer has applied them (or already had newer versions).
    /// Borrowed, so that the caller keeps them for a redelivery without copying them first.
    fn replicate(&self, writes: &[Write]) -> impl Future<Output = Result<(), PeerError>> + Send;
    /// The peer's anti-entropy digest with `buckets` buckets, over the partitions of `scope`.
    fn digest(
        &self,
        buckets: u32,
        scope: &PartitionSet,
    ) -> impl Future<Output = Result<Vec<u64>, PeerError>> + Send;
    /// The peer's entries of the partitions of `scope` in buckets `which`, tombstones
    /// included, as it sends them.
    fn pull(
        &self,
        buckets: u32,
        which: Vec<u32>,
        scope: &PartitionSet,
    ) -> impl Future<Output = Result<Pulled, PeerError>> + Send;
    /// The peer's live pairs of the partitions of `scope`, in key order, as of when the call
    /// began (its share of a List over a ring).
    fn scan(
        &self,
        scope: &PartitionSet,
    ) -> impl Future<Output = Result<crate::merge::Pairs, PeerError>> + Send;
    /// The peer's entry for `key`, tombstone included (for quorum reads).
    fn read(&self, key: String) -> impl Future<Output = Result<Option<Entry>, PeerError>> + Send;
    /// Most bytes (as [`write_size`] counts them) to send in one batch: a batch over the
    /// transport's message limit would be refused whole, and found out only by splitting it.
    fn max_batch_bytes(&self) -> usize {
        BATCH_BYTES
    }
    /// How far the peer's clock is ahead of this node's (negative: behind), in nanoseconds, as
    /// last measured on an exchange with it; `None` before the first.
    fn clock_offset(&self) -> Option<i64> {
        None
    }
}

/// A peer's entries as they arrive; an error ends them.
pub type Pulled = futures::stream::BoxStream<'static, Result<Write, PeerError>>;

/// Splits writes into batches of at most `limit` bytes (at least one write each).
pub fn batches(writes: Vec<Write>, limit: usize) -> impl Iterator<Item = Vec<Write>> {
    let mut writes = std::collections::VecDeque::from(writes);
    std::iter::from_fn(move || {
        let n = batch_len(writes.iter(), limit);
        (n > 0).then(|| writes.drain(..n).collect())
    })
}

/// How many of the leading `writes` make one batch: as many as fit in `limit` bytes, and at
/// least one (a single write bigger than that still goes, alone). Zero only when there are none.
pub fn batch_len<'a>(writes: impl Iterator<Item = &'a Write>, limit: usize) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for w in writes {
        bytes += write_size(w);
        if n > 0 && bytes > limit {
            break;
        }
        n += 1;
    }
    n
}

/// Bytes a write takes in a batch, rounded up: its key, value and node id, and 64 for the
/// version's time, the tombstone flag and the framing (the encoding needs about 30).
pub fn write_size(w: &Write) -> usize {
    w.key.len()
        + w.entry.value.as_ref().map_or(0, |v| v.len())
        + w.entry.version.node.as_str().len()
        + 64
}

/// A write the peer rejected for good (see [`PeerError::Rejected`]): its index in the delivered
/// slice, and the reason.
pub type RejectedWrite = (usize, String);

/// Delivers `writes` to the peer. A peer refuses a whole batch for one write it will never
/// take (a peer with smaller limits than ours, say), so a rejected batch is split in halves and
/// each delivered again, down to single writes: one such write costs only itself, never the
/// rest of its batch. Returns the writes rejected for good; any other error ends the delivery,
/// whatever part of it the peer already has (applying a write twice changes nothing).
pub async fn deliver<P: PeerClient>(
    client: &P,
    writes: &[Write],
) -> Result<Vec<RejectedWrite>, PeerError> {
    // The usual case, one call and no bookkeeping: this is every replication batch's path.
    match client.replicate(writes).await {
        Err(PeerError::Rejected(why)) if writes.len() == 1 => return Ok(vec![(0, why)]),
        Err(PeerError::Rejected(_)) => {}
        other => return other.map(|()| Vec::new()),
    }
    let mut refused = Vec::new();
    // Ranges still to deliver, the next one on top, so the writes go out in order.
    let middle = writes.len() / 2;
    let mut todo = vec![middle..writes.len(), 0..middle];
    while let Some(range) = todo.pop() {
        match client.replicate(&writes[range.clone()]).await {
            Ok(()) => {}
            Err(PeerError::Rejected(why)) if range.len() == 1 => refused.push((range.start, why)),
            Err(PeerError::Rejected(_)) => {
                let middle = range.start + range.len() / 2;
                todo.push(middle..range.end);
                todo.push(range.start..middle);
            }
            Err(error) => return Err(error),
        }
    }
    Ok(refused)
}

/// Why a delivery to a peer failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// No connection could be made or it broke.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The peer did not answer within the per-call timeout.
    #[error("timed out")]
    TimedOut,
    /// The peer answered with an error about these writes (one too big for it, say).
    #[error("rejected the write: {0}")]
    Rejected(String),
    /// The peer refuses every call from this node, whatever it carries: the cluster is set up
    /// wrong (another cluster token, a node id it shares). Treated like an unreachable peer,
    /// writes held for when it is fixed, not like a refused write: splitting the batch to find
    /// the write at fault would cost a refused call per write.
    #[error("refuses this node: {0}")]
    Refused(String),
    /// The peer is down: the write waits in its handoff backlog.
    #[error("down; queued for redelivery ({0} waiting)")]
    Backlogged(usize),
    /// More writes are waiting for the peer than its replication queue holds: this one was
    /// not queued, and the peer is marked for anti-entropy.
    #[error("lagging, marked for resync")]
    Lagging,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakePeer, write};
    use std::sync::atomic::Ordering;

    fn sized(key: &str, time: u64, len: usize) -> Write {
        let mut w = write(key, Some("v"), time, "local");
        w.entry.value = Some("x".repeat(len).into());
        w
    }

    #[test]
    fn batches_split_by_size_and_keep_order() {
        let writes: Vec<Write> = (0..5)
            .map(|i| sized(&format!("k{i}"), i, BATCH_BYTES / 2))
            .collect();
        let sizes: Vec<usize> = batches(writes.clone(), BATCH_BYTES)
            .map(|b| b.len())
            .collect();
        assert_eq!(sizes, [1, 1, 1, 1, 1]);
        let small: Vec<Write> = (0..1000)
            .map(|i| write(&format!("k{i}"), Some("v"), i, "n"))
            .collect();
        let flat: Vec<Write> = batches(small.clone(), BATCH_BYTES).flatten().collect();
        assert_eq!(flat, small);
        // A smaller limit (a peer client with a small message limit) makes smaller batches,
        // none over it.
        let limit = 10 * write_size(&small[0]);
        let split: Vec<Vec<Write>> = batches(small.clone(), limit).collect();
        assert!(split.len() >= 100, "{} batches", split.len());
        for b in &split {
            assert!(b.iter().map(write_size).sum::<usize>() <= limit);
        }
        assert_eq!(split.concat(), small);
    }

    #[tokio::test]
    async fn a_write_the_peer_rejects_costs_only_itself_not_its_batch() {
        let peer = FakePeer::default();
        peer.max_value_bytes.store(10, Ordering::Relaxed);
        let writes = [
            sized("a", 1, 1),
            sized("b", 2, 100),
            sized("c", 3, 1),
            sized("d", 4, 100),
            sized("e", 5, 1),
        ];
        let rejected = deliver(&peer, &writes).await.unwrap();
        let rejected: Vec<usize> = rejected.into_iter().map(|(i, _)| i).collect();
        assert_eq!(rejected, [1, 3]);
        assert_eq!(peer.received_keys(), ["a", "c", "e"], "the rest, in order");
        // Any other error ends the delivery: the caller holds the batch for a retry.
        peer.fail.store(true, Ordering::Relaxed);
        assert!(matches!(
            deliver(&peer, &writes).await,
            Err(PeerError::Unreachable(_))
        ));
    }

    /// A peer that refuses this node (another cluster token) costs one call per batch, not one
    /// per write.
    #[tokio::test]
    async fn a_peer_that_refuses_this_node_is_not_asked_write_by_write() {
        let peer = FakePeer::default();
        peer.refuse.store(true, Ordering::Relaxed);
        let writes: Vec<Write> = (0..64)
            .map(|i| write(&format!("k{i}"), Some("v"), i + 1, "n"))
            .collect();
        let result = deliver(&peer, &writes).await;
        assert!(matches!(result, Err(PeerError::Refused(_))), "{result:?}");
        assert_eq!(peer.calls.load(Ordering::Relaxed), 1);
    }
}
