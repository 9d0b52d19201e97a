//! Anti-entropy: two nodes find where their data differs and exchange only that.
//!
//! Keys are spread over [`BUCKETS`] buckets by a stable hash. A node's digest is one 64-bit
//! sum per bucket of the hashes of its entries (key, version, tombstone flag, value). Two nodes
//! with the same entries in a bucket have the same sum; a differing sum marks a bucket to
//! repair. Unchanged buckets cost 8 bytes each.
//!
//! A round, started by one node:
//! 1. It asks the peer for its digest, and computes its own: one scan of each map.
//! 2. It pulls the peer's entries in every differing bucket with one request, which the peer
//!    answers with one scan, a shard's worth at a time, and applies them as they come (newest
//!    version wins). It keeps a hash of each entry it was sent.
//! 3. It pushes, with one more scan of its own map, every entry of those buckets that the peer
//!    did not send exactly as it is here: those it lacks, or holds older.
//!
//! So a round costs each node one scan for its digest and one for the data, however many
//! buckets differ (the refill of an emptied node is a round where all of them do), and neither
//! side holds more than a shard's worth of entries at once, plus the hashes of what it pulled.
//! Every scan takes a turn with the node's other whole-map scans (see `StoreReader::scan`).
//!
//! Sums over a map that is changing underneath are fuzzy, which is fine: a bucket that looks
//! different only because of an in-flight write is repaired for nothing; one that looks equal
//! by accident of timing is caught next round. Tombstones past their grace period are left out
//! of digests and exchanges, so a node that has purged one and a node that has not yet do not
//! keep trading it. Entries with versions too far ahead of this node's clock are not taken (see
//! `Clock`).
//!
//! It runs when a peer that missed writes (down, lagging, backlog lost) is reachable again,
//! after a restart (hints held in memory are gone), and periodically.

use std::collections::HashSet;
use std::ops::ControlFlow;

use futures::StreamExt;
use kameo::actor::ActorRef;
use tokio::sync::mpsc;
use xxhash_rust::xxh3::xxh3_64;

use crate::entry::Write;
use crate::peer::{PeerClient, PeerError};
use crate::placement::PartitionSet;
use crate::store::{self, StoreActor, StoreReader};
use crate::version::Version;

/// Buckets per digest: 8 KiB of digest, about a thousand keys per bucket at a million keys.
pub const BUCKETS: u32 = 1024;
/// Entries applied at once from a pull: one append to the log, one turn of the store actor.
const APPLY_BATCH: usize = 1000;
/// Shards' worth of entries a scan may have gathered ahead of the one sending them: the memory
/// a slow peer costs a scan that streams to it.
const SHARDS_AHEAD: usize = 2;

/// The bucket of `key`.
pub fn bucket_of(key: &str, buckets: u32) -> u32 {
    (xxh3_64(key.as_bytes()) % u64::from(buckets)) as u32
}

/// The hash of one entry: key, version, tombstone flag and value. The version alone identifies
/// a write when node ids are unique; the value is included so that a misconfiguration (two
/// nodes sharing an id) shows up as a difference instead of hiding one.
pub fn entry_hash(key: &str, version: Version, value: Option<&str>) -> u64 {
    let node = version.node.as_bytes();
    let bytes = value.unwrap_or("");
    let mut buf = Vec::with_capacity(key.len() + node.len() + bytes.len() + 26);
    buf.extend_from_slice(&(key.len() as u64).to_le_bytes());
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(&version.time.to_le_bytes());
    buf.extend_from_slice(node);
    buf.push(u8::from(value.is_none()));
    buf.extend_from_slice(bytes.as_bytes());
    xxh3_64(&buf)
}

/// Adds one entry to a digest.
pub fn add_to_digest(sums: &mut [u64], key: &str, version: Version, value: Option<&str>) {
    let b = bucket_of(key, sums.len() as u32) as usize;
    sums[b] = sums[b].wrapping_add(entry_hash(key, version, value));
}

/// This node's digest over the partitions of `scope`: one wrapping sum of entry hashes per
/// bucket. One scan of the map.
pub fn digest(reader: &StoreReader, buckets: u32, scope: &PartitionSet) -> Vec<u64> {
    let mut sums = vec![0u64; buckets as usize];
    let expired_before = reader.expired_before();
    let in_scope = in_scope(scope);
    reader.for_each(|key, slot| {
        if in_scope(key) && !slot.is_expired(expired_before) {
            add_to_digest(&mut sums, key, slot.version(), slot.value_str());
        }
    });
    sums
}

/// Whether a key is in `scope`; with every partition in it, without hashing the key.
fn in_scope(scope: &PartitionSet) -> impl Fn(&str) -> bool + Send + 'static {
    let scope = (!scope.is_all()).then_some(*scope);
    move |key| scope.as_ref().is_none_or(|s| s.contains_key(key))
}

/// Which of `buckets` buckets `which` names.
fn bucket_set(buckets: u32, which: &[u32]) -> Vec<bool> {
    let mut wanted = vec![false; buckets as usize];
    for &b in which {
        if let Some(w) = wanted.get_mut(b as usize) {
            *w = true;
        }
    }
    wanted
}

/// Scans the map once, on the blocking pool in turn with the node's other whole-map scans,
/// and hands every entry that `keep` takes to the returned channel, a shard's worth at a time.
/// The scan waits while the channel is full (its reader is slow), holding no lock then.
fn stream_scan(
    reader: StoreReader,
    mut keep: impl FnMut(&str, &crate::entry::Slot) -> Option<Write> + Send + 'static,
) -> mpsc::Receiver<Vec<Write>> {
    let (tx, rx) = mpsc::channel(SHARDS_AHEAD);
    let scan = async move {
        let turn = reader.turn().await;
        let scanner = reader.clone();
        store::run_holding(turn, move || {
            let mut shard = Vec::new();
            scanner.for_each_by_shard(
                &mut shard,
                |shard, key, slot| shard.extend(keep(key, slot)),
                |shard| {
                    if shard.is_empty() {
                        return ControlFlow::Continue(());
                    }
                    // The reader went away: stop scanning.
                    match tx.blocking_send(std::mem::take(shard)) {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(_) => ControlFlow::Break(()),
                    }
                },
            );
        })
        .await;
    };
    tokio::spawn(tracing::Instrument::in_current_span(scan));
    rx
}

/// Every entry of the partitions of `scope` in buckets `which` (of `buckets`), tombstones
/// included, but for tombstones past their grace: one scan, streamed a shard's worth at a time
/// (see `stream_scan`).
pub fn stream_buckets(
    reader: StoreReader,
    buckets: u32,
    which: Vec<u32>,
    scope: &PartitionSet,
) -> mpsc::Receiver<Vec<Write>> {
    let wanted = bucket_set(buckets, &which);
    let expired_before = reader.expired_before();
    let in_scope = in_scope(scope);
    stream_scan(reader, move |key, slot| {
        let wanted = wanted[bucket_of(key, buckets) as usize] && in_scope(key);
        (wanted && !slot.is_expired(expired_before)).then(|| Write {
            key: key.to_string(),
            entry: slot.entry(),
        })
    })
}

/// What one anti-entropy round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Buckets whose digests differed.
    pub buckets: usize,
    /// Entries received that were newer than ours.
    pub pulled: usize,
    /// Entries we sent.
    pub pushed: usize,
    /// Entries the peer refused for good.
    pub rejected: usize,
    /// Buckets the peer could not send (an entry in them is over our message limit, say): left
    /// to the peer's own rounds, which push to us write by write.
    pub skipped: usize,
    /// Entries the peer holds with a version too far ahead of our clock: not taken, as no
    /// write from such a clock is (see `Clock`).
    pub ahead: usize,
}

/// Why a round stopped.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("peer: {0}")]
    Peer(#[from] PeerError),
    #[error("local store: {0}")]
    Local(#[from] crate::Error),
}

/// One push-pull round with `peer` over the partitions of `scope`, those both nodes hold (see
/// the module's doc). When they share none, a digest of nothing only checks the peer is there.
pub async fn sync<P: PeerClient>(
    peer: &P,
    store: &ActorRef<StoreActor>,
    reader: &StoreReader,
    scope: &PartitionSet,
) -> Result<SyncReport, SyncError> {
    if scope.is_empty() {
        // Nothing to compare; one cheap call still tells whether the peer is there, which
        // the node needs to know: it sends the peer the writes it coordinates for its keys.
        peer.digest(1, scope).await?;
        return Ok(SyncReport::default());
    }
    let theirs = peer.digest(BUCKETS, scope).await?;
    let mine = *scope;
    let ours = reader
        .scan(move |reader| digest(reader, BUCKETS, &mine))
        .await;
    let differing: Vec<u32> = (0..BUCKETS)
        .filter(|&b| theirs.get(b as usize) != ours.get(b as usize))
        .collect();
    let mut report = SyncReport {
        buckets: differing.len(),
        ..SyncReport::default()
    };
    if differing.is_empty() {
        return Ok(report);
    }
    // Hashes of every entry the peer sent, as it sent it: what not to send back.
    let mut sent_here = HashSet::new();
    // Buckets the peer could not send, whose entries we push whatever the peer holds.
    let mut unsent = Vec::new();
    // All differing buckets in one pull, unless the peer refuses one (an entry in it may not
    // fit a message here: a peer whose value limit is bigger than ours). Then narrow it down by
    // halves (each a scan of the peer's map, only in that case) and skip that bucket rather
    // than give up the round every time.
    let mut todo = vec![differing.clone()];
    while let Some(which) = todo.pop() {
        match pull(
            peer,
            store,
            reader,
            &which,
            scope,
            &mut sent_here,
            &mut report,
        )
        .await
        {
            Ok(()) => {}
            Err(SyncError::Peer(PeerError::Rejected(why))) if which.len() > 1 => {
                tracing::debug!(%why, buckets = which.len(), "peer could not send its buckets; halved");
                let (left, right) = which.split_at(which.len() / 2);
                todo.push(right.to_vec());
                todo.push(left.to_vec());
            }
            Err(SyncError::Peer(PeerError::Rejected(why))) => {
                report.skipped += 1;
                tracing::warn!(bucket = which[0], %why, "peer could not send a bucket; skipped");
                unsent.push(which[0]);
            }
            Err(e) => return Err(e),
        }
    }
    push(
        peer,
        reader,
        &differing,
        &unsent,
        scope,
        sent_here,
        &mut report,
    )
    .await?;
    if report.ahead > 0 {
        tracing::warn!(
            entries = report.ahead,
            "anti-entropy: the peer holds versions too far ahead of this node's clock; not taken"
        );
    }
    Ok(report)
}

/// Pulls the peer's entries in buckets `which` and applies them in batches as they come,
/// noting the hash of each in `sent_here`.
async fn pull<P: PeerClient>(
    peer: &P,
    store: &ActorRef<StoreActor>,
    reader: &StoreReader,
    which: &[u32],
    scope: &PartitionSet,
    sent_here: &mut HashSet<u64>,
    report: &mut SyncReport,
) -> Result<(), SyncError> {
    let mut pulled = peer.pull(BUCKETS, which.to_vec(), scope).await?;
    // A peer that predates partitions, or counts them otherwise, may send more than asked.
    let in_scope = in_scope(scope);
    let mut batch = Vec::new();
    loop {
        let next = pulled.next().await.transpose()?;
        if next.as_ref().is_some_and(|w| !in_scope(&w.key)) {
            continue;
        }
        let done = next.is_none();
        if let Some(w) = next {
            sent_here.insert(entry_hash(
                &w.key,
                w.entry.version,
                w.entry.value.as_deref(),
            ));
            if reader.clock().beyond_bound(w.entry.version.time).is_some() {
                report.ahead += 1;
            } else {
                batch.push(w);
            }
            if batch.len() < APPLY_BATCH {
                continue;
            }
        }
        if !batch.is_empty() {
            let applied = store
                .ask(store::Apply(std::mem::take(&mut batch)))
                .await
                .map_err(|e| match e {
                    kameo::error::SendError::HandlerError(e) => e,
                    _ => crate::Error::StoreStopped,
                })?;
            report.pulled += applied.wait().await?;
        }
        if done {
            return Ok(());
        }
    }
}

/// Sends the peer, with one scan of our map, every entry in `differing` buckets that it did
/// not send us exactly as we hold it, and every entry of the `unsent` buckets.
async fn push<P: PeerClient>(
    peer: &P,
    reader: &StoreReader,
    differing: &[u32],
    unsent: &[u32],
    scope: &PartitionSet,
    sent_here: HashSet<u64>,
    report: &mut SyncReport,
) -> Result<(), PeerError> {
    let wanted = bucket_set(BUCKETS, differing);
    let all = bucket_set(BUCKETS, unsent);
    let expired_before = reader.expired_before();
    let in_scope = in_scope(scope);
    let mut shards = stream_scan(reader.clone(), move |key, slot| {
        let bucket = bucket_of(key, BUCKETS) as usize;
        if !wanted[bucket] || !in_scope(key) || slot.is_expired(expired_before) {
            return None;
        }
        let (version, value) = (slot.version(), slot.value_str());
        (all[bucket] || !sent_here.contains(&entry_hash(key, version, value))).then(|| Write {
            key: key.to_string(),
            entry: slot.entry(),
        })
    });
    let mut writes = Vec::new();
    while let Some(shard) = shards.recv().await {
        writes.extend(shard);
        if writes.iter().map(crate::peer::write_size).sum::<usize>() >= peer.max_batch_bytes() {
            deliver_all(peer, std::mem::take(&mut writes), report).await?;
        }
    }
    deliver_all(peer, writes, report).await
}

/// Sends `writes` to `peer` in batches, counting them as pushed and the ones it refused for
/// good as rejected.
async fn deliver_all<P: PeerClient>(
    peer: &P,
    writes: Vec<Write>,
    report: &mut SyncReport,
) -> Result<(), PeerError> {
    report.pushed += writes.len();
    for batch in crate::peer::batches(writes, peer.max_batch_bytes()) {
        // One write the peer will never take (its limits are smaller than ours, say) must not
        // stop the repair of everything else: `deliver` isolates it.
        for (i, why) in crate::peer::deliver(peer, &batch).await? {
            report.rejected += 1;
            tracing::warn!(key = %batch[i].key, %why, "peer rejected a repaired entry; skipped");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kameo::actor::Spawn;

    use std::sync::atomic::Ordering;

    use super::*;
    use crate::clock::Clock;
    use crate::testing::FakePeer;

    fn write(key: &str, value: Option<&str>, time: u64) -> Write {
        crate::testing::write(key, value, time, "n")
    }

    async fn store_with(writes: &[Write]) -> (ActorRef<StoreActor>, StoreReader) {
        let actor = StoreActor::new(Arc::new(Clock::new(
            crate::version::NodeId::new("local").unwrap(),
        )));
        let reader = actor.reader();
        let store = StoreActor::spawn(actor);
        store.ask(store::Apply(writes.to_vec())).await.unwrap();
        (store, reader)
    }

    #[tokio::test]
    async fn equal_stores_have_equal_digests_whatever_the_order() {
        let ws = [
            write("a", Some("1"), 1),
            write("b", None, 2),
            write("c", Some("3"), 3),
        ];
        let (_s1, r1) = store_with(&ws).await;
        let reversed: Vec<Write> = ws.iter().rev().cloned().collect();
        let (_s2, r2) = store_with(&reversed).await;
        assert_eq!(
            digest(&r1, BUCKETS, &PartitionSet::all()),
            digest(&r2, BUCKETS, &PartitionSet::all())
        );
        let (_s3, r3) = store_with(&[write("a", Some("1"), 1), write("b", Some("2"), 2)]).await;
        let d1 = digest(&r1, BUCKETS, &PartitionSet::all());
        let d3 = digest(&r3, BUCKETS, &PartitionSet::all());
        let differing = (0..BUCKETS as usize).filter(|&b| d1[b] != d3[b]).count();
        assert!(
            (1..=2).contains(&differing),
            "only the buckets of b and c differ"
        );
    }

    #[tokio::test]
    async fn a_round_sends_only_differing_buckets_and_converges_both_sides() {
        let shared: Vec<Write> = (0..500)
            .map(|i| write(&format!("k{i}"), Some("same"), 5))
            .collect();
        let mut mine = shared.clone();
        mine.push(write("only-mine", Some("m"), 9));
        mine.push(write("k1", Some("newer-here"), 10));
        let (store, reader) = store_with(&mine).await;

        let peer = FakePeer::default();
        let mut theirs = shared.clone();
        theirs.push(write("only-theirs", Some("t"), 9));
        theirs.push(write("k2", None, 11));
        peer.set_data(&theirs);

        let report = sync(&peer, &store, &reader, &PartitionSet::all())
            .await
            .unwrap();
        assert!(report.buckets <= 4, "{report:?}");
        assert_eq!(
            peer.pulls.load(Ordering::Relaxed),
            1,
            "one request for every bucket"
        );
        assert_eq!(report.pulled, 2, "only-theirs and the k2 tombstone");
        assert_eq!(report.pushed, 2, "only-mine and the newer k1: {report:?}");
        // Both sides now hold the newest of everything.
        assert_eq!(
            digest(&reader, BUCKETS, &PartitionSet::all()),
            peer.digest_now(BUCKETS)
        );
        let get = |k: &str| store.ask(store::GetEntry { key: k.into() });
        assert_eq!(
            get("only-theirs").await.unwrap().unwrap().value.as_deref(),
            Some("t")
        );
        assert_eq!(get("k2").await.unwrap().unwrap().value, None);
        assert_eq!(peer.value("k1"), Some(Some("newer-here".into())));
        assert_eq!(peer.value("only-mine"), Some(Some("m".into())));
    }

    #[tokio::test]
    async fn a_round_settles_two_writes_under_one_version_on_both_sides() {
        // Two keys, each written twice under one version; the greater value wins everywhere.
        let (store, reader) =
            store_with(&[write("a", Some("banana"), 5), write("b", Some("apple"), 5)]).await;
        let peer = FakePeer::default();
        peer.set_data(&[write("a", Some("apple"), 5), write("b", Some("banana"), 5)]);
        let report = sync(&peer, &store, &reader, &PartitionSet::all())
            .await
            .unwrap();
        assert_eq!((report.pulled, report.pushed), (1, 1), "{report:?}");
        for key in ["a", "b"] {
            assert_eq!(peer.value(key), Some(Some("banana".into())), "{key}");
            let here = store
                .ask(store::GetEntry { key: key.into() })
                .await
                .unwrap();
            assert_eq!(here.unwrap().value.as_deref(), Some("banana"), "{key}");
        }
        assert_eq!(
            digest(&reader, BUCKETS, &PartitionSet::all()),
            peer.digest_now(BUCKETS)
        );
    }

    #[tokio::test]
    async fn a_bucket_the_peer_cannot_send_is_skipped_and_the_rest_repaired() {
        let huge_bucket = bucket_of("huge", BUCKETS);
        // Ours in the bucket that cannot come is pushed all the same.
        let beside = (0..)
            .map(|i| format!("mine-{i}"))
            .find(|k| bucket_of(k, BUCKETS) == huge_bucket)
            .unwrap();
        let (store, reader) = store_with(&[
            write("only-mine", Some("m"), 3),
            write(&beside, Some("b"), 3),
        ])
        .await;
        let peer = FakePeer::default();
        let huge = "h".repeat(1000);
        let mut theirs = vec![write("huge", Some(&huge), 4)];
        theirs.extend((0..50).map(|i| write(&format!("t{i}"), Some("t"), 4)));
        peer.set_data(&theirs);
        // Its answers may hold no value over 100 bytes: the bucket of "huge" cannot come.
        (peer.max_pull_value_bytes).store(100, std::sync::atomic::Ordering::Relaxed);
        let report = sync(&peer, &store, &reader, &PartitionSet::all())
            .await
            .unwrap();
        assert_eq!(report.skipped, 1, "{report:?}");
        assert_eq!(peer.value(&beside), Some(Some("b".into())));
        let sharing = (0..50)
            .filter(|i| bucket_of(&format!("t{i}"), BUCKETS) == huge_bucket)
            .count();
        assert_eq!(report.pulled, 50 - sharing, "{report:?}");
        assert_eq!(peer.value("only-mine"), Some(Some("m".into())));
        for i in 0..50 {
            let key = format!("t{i}");
            let here = store
                .ask(store::GetEntry { key: key.clone() })
                .await
                .unwrap();
            assert_eq!(
                here.is_some(),
                bucket_of(&key, BUCKETS) != huge_bucket,
                "{key} is repaired unless it shares the skipped bucket"
            );
        }
    }

    #[tokio::test]
    async fn an_empty_node_is_refilled_with_one_pull_and_one_scan_a_side() {
        // Every bucket differs, and the pull answers with every entry: in one request, which
        // the old round of 32 buckets at a time made 32 of.
        let theirs: Vec<Write> = (0..5000)
            .map(|i| write(&format!("k{i:05}"), Some("v"), 5))
            .collect();
        let (store, reader) = store_with(&[]).await;
        let peer = FakePeer::default();
        peer.set_data(&theirs);
        let report = sync(&peer, &store, &reader, &PartitionSet::all())
            .await
            .unwrap();
        let used: HashSet<u32> = theirs.iter().map(|w| bucket_of(&w.key, BUCKETS)).collect();
        assert!(used.len() > 1000);
        assert_eq!(report.buckets, used.len());
        assert_eq!((report.pulled, report.pushed), (5000, 0), "{report:?}");
        assert_eq!(peer.pulls.load(Ordering::Relaxed), 1);
        assert_eq!(
            digest(&reader, BUCKETS, &PartitionSet::all()),
            peer.digest_now(BUCKETS)
        );
        // The other way round: a full node pushes everything to an empty peer, in batches,
        // from one scan.
        let empty = FakePeer::default();
        let report = sync(&empty, &store, &reader, &PartitionSet::all())
            .await
            .unwrap();
        assert_eq!((report.pulled, report.pushed), (0, 5000), "{report:?}");
        assert_eq!(
            digest(&reader, BUCKETS, &PartitionSet::all()),
            empty.digest_now(BUCKETS)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_takes_its_turn_with_the_nodes_other_scans() {
        let (store, reader) = store_with(&[write("a", Some("1"), 1)]).await;
        let peer = FakePeer::default();
        // Every turn taken, as by that many Lists being copied.
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let mut held = Vec::new();
        for _ in 0..cpus {
            held.push(reader.turn().await);
        }
        let all = PartitionSet::all();
        let round = sync(&peer, &store, &reader, &all);
        let waited = tokio::time::timeout(std::time::Duration::from_millis(200), round).await;
        assert!(
            waited.is_err(),
            "the round scanned beside {cpus} other scans"
        );
        drop(held);
        let report = sync(&peer, &store, &reader, &PartitionSet::all())
            .await
            .unwrap();
        assert_eq!(report.pushed, 1);
    }

    #[tokio::test]
    async fn entries_too_far_ahead_are_not_taken_from_a_peer() {
        let (store, reader) = store_with(&[]).await;
        let peer = FakePeer::default();
        let far = crate::clock::now_minus(std::time::Duration::ZERO) + (3600 << 32);
        peer.set_data(&[write("far", Some("v"), far), write("near", Some("v"), 5)]);
        let report = sync(&peer, &store, &reader, &PartitionSet::all())
            .await
            .unwrap();
        assert_eq!((report.pulled, report.ahead), (1, 1), "{report:?}");
        let get = |k: &str| store.ask(store::GetEntry { key: k.into() });
        assert!(get("far").await.unwrap().is_none());
        assert!(get("near").await.unwrap().is_some());
    }
}
