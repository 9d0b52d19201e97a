//! Anti-entropy: two nodes find where their data differs and exchange only that.
//!
//! Keys are spread over [`BUCKETS`] buckets by a stable hash. A node's digest is one 64-bit
//! sum per bucket of the hashes of its entries (key, version, tombstone flag). Two nodes with
//! the same entries in a bucket have the same sum; a differing sum marks a bucket to repair.
//! For each differing bucket the initiator pulls the peer's entries and applies them (newest
//! version wins), then pushes its own; after one round both hold the newest version of every
//! key in those buckets. Unchanged buckets cost 8 bytes each.
//!
//! Sums over a map that is changing underneath are fuzzy, which is fine: a bucket that looks
//! different only because of an in-flight write is repaired for nothing; one that looks equal
//! by accident of timing is caught next round. Tombstones past their grace period are left out
//! of digests, so a node that has purged one and a node that has not yet do not keep trading it.
//!
//! It runs when a peer that missed writes (down, lagging, backlog lost) is reachable again,
//! after a restart (hints held in memory are gone), and periodically.

use kameo::actor::ActorRef;
use xxhash_rust::xxh3::xxh3_64;

use crate::entry::{Entry, Write};
use crate::peer::{PeerClient, PeerError};
use crate::store::{self, StoreActor, StoreReader};
use crate::version::Version;

/// Buckets per digest: 8 KiB of digest, about a thousand keys per bucket at a million keys.
pub const BUCKETS: u32 = 1024;
/// Buckets pulled per request, bounding one response.
const PULL_CHUNK: usize = 32;

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

/// This node's digest: one wrapping sum of entry hashes per bucket.
pub fn digest(reader: &StoreReader, buckets: u32) -> Vec<u64> {
    let mut sums = vec![0u64; buckets as usize];
    let expired_before = reader.expired_before();
    reader.for_each(|key, slot| {
        if !slot.is_expired(expired_before) {
            add_to_digest(&mut sums, key, slot.version(), slot.value_str());
        }
    });
    sums
}

/// Every entry in `which` buckets, tombstones included.
pub fn entries_in(reader: &StoreReader, buckets: u32, which: &[u32]) -> Vec<Write> {
    let mut wanted = vec![false; buckets as usize];
    for &b in which {
        if let Some(w) = wanted.get_mut(b as usize) {
            *w = true;
        }
    }
    let mut out = Vec::new();
    let expired_before = reader.expired_before();
    reader.for_each(|key, slot| {
        if wanted[bucket_of(key, buckets) as usize] && !slot.is_expired(expired_before) {
            out.push(Write {
                key: key.to_string(),
                entry: slot.entry(),
            });
        }
    });
    out
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

/// One push-pull round with `peer`.
pub async fn sync<P: PeerClient>(
    peer: &P,
    store: &ActorRef<StoreActor>,
    reader: &StoreReader,
) -> Result<SyncReport, SyncError> {
    let theirs = peer.digest(BUCKETS).await?;
    let ours = {
        let reader = reader.clone();
        tokio::task::spawn_blocking(move || digest(&reader, BUCKETS))
            .await
            .expect("digest panicked")
    };
    let differing: Vec<u32> = (0..BUCKETS)
        .filter(|&b| theirs.get(b as usize) != ours.get(b as usize))
        .collect();
    let mut report = SyncReport {
        buckets: differing.len(),
        ..SyncReport::default()
    };
    // Chunks of buckets, and halves of a chunk the peer refused to send.
    let mut chunks: std::collections::VecDeque<Vec<u32>> =
        differing.chunks(PULL_CHUNK).map(<[u32]>::to_vec).collect();
    while let Some(chunk) = chunks.pop_front() {
        let pulled = match peer.pull(BUCKETS, chunk.clone()).await {
            Ok(pulled) => Some(pulled),
            // Refused, not unreachable: one bucket's entries may not fit a message here (a
            // peer whose value limit is bigger than ours). Narrow it down to the bucket by
            // halves (each pull is a scan of the peer's map), and skip pulling that one rather
            // than give up the whole round every time.
            Err(PeerError::Rejected(why)) if chunk.len() > 1 => {
                let (left, right) = chunk.split_at(chunk.len() / 2);
                chunks.push_front(right.to_vec());
                chunks.push_front(left.to_vec());
                tracing::debug!(%why, buckets = chunk.len(), "peer could not send a chunk; halved");
                continue;
            }
            Err(PeerError::Rejected(why)) => {
                report.skipped += 1;
                tracing::warn!(bucket = chunk[0], %why, "peer could not send a bucket; skipped");
                None
            }
            Err(e) => return Err(e.into()),
        };
        // What the peer holds in these buckets: we push only what would win over it. Of a
        // bucket it could not send, we push all we hold; it keeps only what wins.
        let theirs: Option<std::collections::HashMap<String, Entry>> =
            pulled.as_ref().map(|pulled| {
                (pulled.iter())
                    .map(|w| (w.key.clone(), w.entry.clone()))
                    .collect()
            });
        let pulled = pulled.map(|mut pulled| {
            let before = pulled.len();
            pulled.retain(|w| reader.clock().beyond_bound(w.entry.version.time).is_none());
            report.ahead += before - pulled.len();
            pulled
        });
        if let Some(pulled) = pulled.filter(|pulled| !pulled.is_empty()) {
            let applied = store.ask(store::Apply(pulled)).await.map_err(|e| match e {
                kameo::error::SendError::HandlerError(e) => e,
                _ => crate::Error::StoreStopped,
            })?;
            report.pulled += applied.wait().await?;
        }
        let mine = {
            let reader = reader.clone();
            let chunk = chunk.to_vec();
            tokio::task::spawn_blocking(move || entries_in(&reader, BUCKETS, &chunk))
                .await
                .expect("bucket scan panicked")
        };
        let newer: Vec<Write> = mine
            .into_iter()
            .filter(|w| {
                theirs.as_ref().is_none_or(|theirs| {
                    (theirs.get(&w.key)).is_none_or(|e| e.precedence() < w.entry.precedence())
                })
            })
            .collect();
        report.pushed += push(peer, newer, &mut report.rejected).await?;
    }
    if report.ahead > 0 {
        tracing::warn!(
            entries = report.ahead,
            "anti-entropy: the peer holds versions too far ahead of this node's clock; not taken"
        );
    }
    Ok(report)
}

/// Sends `writes` to `peer` in batches; returns how many were sent, counting the ones it
/// refused for good in `rejected`.
async fn push<P: PeerClient>(
    peer: &P,
    writes: Vec<Write>,
    rejected: &mut usize,
) -> Result<usize, PeerError> {
    let sent = writes.len();
    for batch in crate::peer::batches(writes, peer.max_batch_bytes()) {
        // One write the peer will never take (its limits are smaller than ours, say) must not
        // stop the repair of everything else: `deliver` isolates it.
        for (i, why) in crate::peer::deliver(peer, &batch).await? {
            *rejected += 1;
            tracing::warn!(key = %batch[i].key, %why, "peer rejected a repaired entry; skipped");
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kameo::actor::Spawn;

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
        assert_eq!(digest(&r1, BUCKETS), digest(&r2, BUCKETS));
        let (_s3, r3) = store_with(&[write("a", Some("1"), 1), write("b", Some("2"), 2)]).await;
        let d1 = digest(&r1, BUCKETS);
        let d3 = digest(&r3, BUCKETS);
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

        let report = sync(&peer, &store, &reader).await.unwrap();
        assert!(report.buckets <= 4, "{report:?}");
        assert_eq!(report.pulled, 2, "only-theirs and the k2 tombstone");
        assert_eq!(report.pushed, 2, "only-mine and the newer k1: {report:?}");
        // Both sides now hold the newest of everything.
        assert_eq!(digest(&reader, BUCKETS), peer.digest_now(BUCKETS));
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
        let report = sync(&peer, &store, &reader).await.unwrap();
        assert_eq!((report.pulled, report.pushed), (1, 1), "{report:?}");
        for key in ["a", "b"] {
            assert_eq!(peer.value(key), Some(Some("banana".into())), "{key}");
            let here = store
                .ask(store::GetEntry { key: key.into() })
                .await
                .unwrap();
            assert_eq!(here.unwrap().value.as_deref(), Some("banana"), "{key}");
        }
        assert_eq!(digest(&reader, BUCKETS), peer.digest_now(BUCKETS));
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
        let report = sync(&peer, &store, &reader).await.unwrap();
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
}
