//! The store actor: the one owner of a node's key-value map.
//!
//! Every change to the map goes through this actor's mailbox, so writes are applied one at a
//! time and a version decision (is this entry newer?) never races another write of the same key.
//! The map itself is a `DashMap` so that reads, a `List`'s copy ([`crate::view`]) and log
//! compaction can walk it from other threads while the actor goes on writing.
//!
//! A write is checked with the log first ([`Storage::admit`]): one the log cannot take (a full
//! disk, a log far behind the disk) is refused before it touches the map, with the log's reason.
//! A write that is taken is in the map at once, and is acknowledged once its [`Durable`] says it
//! is in the log.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kameo::Actor;
use kameo::actor::{ActorRef, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::message::{Context, Message};

use crate::clock::{self, Clock, LOST_BUMPS_MARGIN};
use crate::entry::{Entry, Map, Slot, Write, new_map};
use crate::error::Error;
use crate::storage::{Durable, Recovered, Storage, record};
use crate::view::{ListView, Views};

/// Capacity of the store actor's mailbox. Every Put, Delete and peer batch passes through it;
/// a caller finding it full waits for room, which is the backpressure a busy store gives. Each
/// message is handled in microseconds, so a short queue is enough to keep the actor busy.
pub const STORE_MAILBOX: usize = 64;

/// The store actor. Its state is the map, the node's clock and (unless in-memory) its storage.
pub struct StoreActor {
    /// Shared read-only with [`StoreReader`]s (reads, digests, snapshots) so they never queue
    /// behind writes in the mailbox; only this actor writes to it.
    map: Arc<Map>,
    clock: Arc<Clock>,
    storage: Option<Storage>,
    /// The `List`s whose copy of the map is still running.
    views: Views,
    /// Live keys and tombstones in the map, kept as it changes: counting them would walk the
    /// whole map, and stall every write meanwhile.
    counts: Counts,
    /// Keys that local writes have bumped above a recovered version the clock does not cover,
    /// since the start (few: it takes a peer clock beyond the drift bound).
    bumped: HashSet<Box<str>>,
    /// The newest version time recovered from disk at the start.
    recovered_max: u64,
    /// Turns at whole-map scans, shared with every [`StoreReader`].
    turns: Arc<tokio::sync::Semaphore>,
    /// The partitions the node keeps, when it holds only some (see [`Retain`]): writes from
    /// other nodes outside them are let go.
    keep: Option<crate::placement::PartitionSet>,
}

/// Runs `scan` on the blocking pool, holding `turn` until it is done.
pub async fn run_holding<T: Send + 'static>(
    turn: tokio::sync::OwnedSemaphorePermit,
    scan: impl FnOnce() -> T + Send + 'static,
) -> T {
    let span = tracing::Span::current();
    let scanned = tokio::task::spawn_blocking(move || {
        let _span = span.entered();
        let result = scan();
        drop(turn);
        result
    })
    .await;
    match scanned {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Never begun: the runtime is shutting down, and drops this task with it.
        Err(_) => std::future::pending().await,
    }
}

/// One turn at a whole-map scan per CPU (see `StoreReader::turns`).
fn scan_turns() -> Arc<tokio::sync::Semaphore> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    Arc::new(tokio::sync::Semaphore::new(cpus))
}

/// Live keys and tombstones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    live: usize,
    tombstones: usize,
}

impl Counts {
    fn count(&mut self, slot: &Slot, sign: isize) {
        let n = if slot.is_tombstone() {
            &mut self.tombstones
        } else {
            &mut self.live
        };
        *n = n.checked_add_signed(sign).expect("counts match the map");
    }
}

impl Actor for StoreActor {
    type Args = Self;
    type Error = kameo::error::Infallible;

    fn name() -> &'static str {
        "StoreActor"
    }

    async fn on_start(state: Self, _: ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(state)
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: ActorStopReason,
    ) -> Result<(), Self::Error> {
        // Everything acknowledged is already durable; this syncs whatever is still queued.
        if let Some(storage) = self.storage.take() {
            storage.close().await;
        }
        Ok(())
    }
}

/// Read access to the store's map from outside the actor. Reads may interleave with writes:
/// each key's read is of one write or another, never a mix.
#[derive(Clone, kameo::Reply)]
pub struct StoreReader {
    map: Arc<Map>,
    clock: Arc<Clock>,
    /// Turns at scanning the whole map, one per CPU: the copies of `List`s, and the digests,
    /// bucket pulls and pushes of anti-entropy, this node's and its peers'. More at once only
    /// share the CPUs and the caches, each holding its memory for longer (64 concurrent copies
    /// of 100k keys were 0.83x as many Lists a second as when they took turns), and callers
    /// could pile up copies of the whole map without bound.
    turns: Arc<tokio::sync::Semaphore>,
    /// How long tombstones live, if they are ever purged (never in memory-only stores).
    tombstone_grace: Option<Duration>,
}

impl StoreReader {
    /// The live value of `key`, read straight from the map. Only the store actor writes the
    /// map; a read needs no turn of the actor's, and does not wait behind its writes.
    pub fn get(&self, key: &str) -> Option<String> {
        (self.map.get(key)).and_then(|slot| slot.value_str().map(String::from))
    }

    /// The stored entry of `key`, tombstones included, read straight from the map.
    pub fn get_entry(&self, key: &str) -> Option<Entry> {
        self.map.get(key).map(|slot| slot.entry())
    }

    /// The node's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// A turn at scanning the whole map (see `turns`).
    pub async fn turn(&self) -> tokio::sync::OwnedSemaphorePermit {
        (self.turns.clone())
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Runs `scan` on the blocking pool once it is this caller's turn, holding the turn until
    /// it is done: a caller that goes away meanwhile (a List whose client left, its future
    /// dropped) does not free the turn while the scan still runs.
    pub async fn scan<T: Send + 'static>(
        &self,
        scan: impl FnOnce(&StoreReader) -> T + Send + 'static,
    ) -> T {
        let turn = self.turn().await;
        let reader = self.clone();
        run_holding(turn, move || scan(&reader)).await
    }

    /// Calls `f` with every entry, one lock shard at a time, and `after_shard` after each
    /// shard (see [`crate::entry::scan_shards`]).
    pub fn for_each_by_shard<S>(
        &self,
        state: &mut S,
        f: impl FnMut(&mut S, &str, &Slot),
        after_shard: impl FnMut(&mut S) -> std::ops::ControlFlow<()>,
    ) {
        crate::entry::scan_shards(&self.map, state, f, after_shard);
    }

    /// Version time below which tombstones are expired, as of now.
    pub fn expired_before(&self) -> Option<u64> {
        self.tombstone_grace.map(clock::now_minus)
    }

    /// The entry of `key`, tombstone included.
    pub fn entry(&self, key: &str) -> Option<Entry> {
        self.map.get(key).map(|slot| slot.entry())
    }

    /// The live value of `key`: `None` if absent or deleted.
    pub fn value(&self, key: &str) -> Option<String> {
        (self.map.get(key)).and_then(|slot| slot.value_str().map(String::from))
    }

    /// Calls `f` on every entry, tombstones included.
    pub fn for_each(&self, mut f: impl FnMut(&str, &Slot)) {
        for item in self.map.iter() {
            f(item.key(), &item);
        }
    }

    /// Number of entries, tombstones included.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl StoreActor {
    /// An empty store that keeps nothing on disk.
    pub fn new(clock: Arc<Clock>) -> Self {
        Self {
            map: Arc::new(new_map()),
            clock,
            storage: None,
            views: Views::default(),
            counts: Counts::default(),
            bumped: HashSet::new(),
            recovered_max: 0,
            turns: scan_turns(),
            keep: None,
        }
    }

    /// A store on recovered storage. The clock is moved past every version this node issued
    /// before the restart, and past the others as far as it can observe ([`Clock::restore`]);
    /// keys beyond that are covered when they are written (`StoreActor::versioned`).
    pub fn recovered(clock: Arc<Clock>, recovered: Recovered) -> Self {
        let own = (recovered.newest_by_node.get(&clock.node())).map_or(0, |&t| t);
        clock.restore(own, recovered.max_time);
        Self {
            counts: Counts {
                live: recovered.map.len() - recovered.tombstones,
                tombstones: recovered.tombstones,
            },
            map: recovered.map,
            clock,
            storage: Some(recovered.storage),
            views: Views::default(),
            bumped: HashSet::new(),
            recovered_max: recovered.max_time,
            turns: scan_turns(),
            keep: None,
        }
    }

    /// The node's clock.
    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// A reader over this store's map.
    pub fn reader(&self) -> StoreReader {
        StoreReader {
            map: self.map.clone(),
            clock: self.clock.clone(),
            turns: self.turns.clone(),
            tombstone_grace: self.storage.as_ref().map(Storage::tombstone_grace),
        }
    }

    /// Version time below which a tombstone has expired, if tombstones expire here.
    fn expired_before(&self) -> Option<u64> {
        (self.storage.as_ref()).map(|s| clock::now_minus(s.tombstone_grace()))
    }

    /// Removes the tombstones that compaction left out of its snapshot, if they are still
    /// those tombstones. Done before every change and report, so a purge never waits long.
    fn purge_expired(&mut self) {
        let Some(storage) = &self.storage else { return };
        let purges: Vec<_> = storage.take_purges().collect();
        for purge in purges {
            for key in purge.keys {
                self.views.save_pre_image(&self.map, &key);
                if let Some(slot) = self
                    .map
                    .remove_if(&key, |s| s.is_expired(Some(purge.before)))
                {
                    self.counts.count(&slot, -1);
                }
            }
        }
    }

    /// Asks the log whether it takes `bytes` more now; `Ok` when nothing is logged.
    fn admit(&self, bytes: usize) -> Result<(), Error> {
        self.storage.as_ref().map_or(Ok(()), |s| s.admit(bytes))
    }

    /// Puts `slot` in, keeping the counts and the views' pre-images.
    fn insert(&mut self, slot: Slot) {
        self.views.save_pre_image(&self.map, slot.key());
        self.counts.count(&slot, 1);
        if let Some(old) = self.map.put(slot) {
            self.counts.count(&old, -1);
        }
    }

    /// A local write of `key` (`value = None` deletes) under a fresh version, not yet stored.
    fn versioned(&mut self, key: String, value: Option<String>) -> Write {
        let mut version = self.clock.now();
        if let Some(current) = self.map.get(key.as_str()) {
            // The clock has normally moved past every version we applied. It has not if a peer's
            // version was too far ahead to observe; then order this write after it anyway, since
            // a local write the user just made must not be shadowed by one they made earlier.
            let current = current.version();
            if current >= version {
                // The first bump since the start of a key whose version may have been on disk
                // then takes a margin: bumps of it lost in a crash (sent to peers, not synced
                // here) must not be issued again, and the clock does not cover versions this
                // far ahead (see `Clock::restore`).
                let step = if current.time <= self.recovered_max
                    && self.bumped.insert(key.as_str().into())
                {
                    LOST_BUMPS_MARGIN
                } else {
                    1
                };
                version.time = current.time.saturating_add(step);
            }
        }
        Write {
            key,
            entry: Entry {
                value: value.map(String::into_boxed_str),
                version,
            },
        }
    }

    /// Stores a local write (`value = None` deletes) under a fresh version and logs it.
    fn write_local(&mut self, key: String, value: Option<String>) -> Result<LocalWrite, Error> {
        self.purge_expired();
        // Checked before the version is made: a refused write must not use up a bump.
        let node = self.clock.node().len();
        self.admit(record::write_len(
            key.len(),
            value.as_ref().map(String::len),
            node,
        ))?;
        let write = self.versioned(key, value);
        let durable = match &mut self.storage {
            Some(storage) => storage.append([&write]),
            None => Durable::ready(),
        };
        self.insert(Slot::new(&write.key, &write.entry));
        Ok(LocalWrite { write, durable })
    }

    /// Applies `write` if it wins over what the map holds ([`crate::entry::precedence`]).
    /// Returns whether it changed the map.
    fn apply(&mut self, write: &Write) -> bool {
        self.clock.observe(&write.entry.version);
        let wins = match self.map.get(write.key.as_str()) {
            Some(slot) => slot.loses_to(&write.entry),
            // A tombstone past its grace period is one we may already have purged: taking it
            // back would make peers trade it for ever.
            None => !write.entry.is_expired(self.expired_before()),
        };
        if wins {
            self.insert(Slot::new(&write.key, &write.entry));
        }
        wins
    }

    /// Applies a batch of writes other nodes made, logging the ones that changed the map as
    /// one append.
    fn apply_all(&mut self, mut writes: Vec<Write>) -> Result<Applied, Error> {
        self.purge_expired();
        if let Some(keep) = &self.keep {
            writes.retain(|w| keep.contains_key(&w.key));
        }
        // A version too far ahead of this clock would win over every write made after it: the
        // batch is refused whole, and its sender holds it until the clocks agree. The newest
        // decides, with one reading of the clock.
        let newest = writes.iter().max_by_key(|w| w.entry.version.time);
        if let Some(write) = newest
            && let Some(ahead) = self.clock.beyond_bound(write.entry.version.time)
        {
            return Err(Error::AheadOfClock {
                key: write.key.clone(),
                ahead,
                bound: self.clock.max_offset(),
            });
        }
        self.admit(writes.iter().map(record::encoded_len).sum())?;
        let mut changed = Vec::new();
        for write in &writes {
            if self.apply(write) {
                changed.push(write);
            }
        }
        let held = changed.len() < writes.len();
        let durable = match &mut self.storage {
            // The log's appends succeed only in order, so this one also vouches for what the
            // map already held for the other writes, even if that is still on its way to the
            // disk (a local Put waiting for its group commit).
            Some(storage) if !changed.is_empty() => storage.append(changed.iter().copied()),
            Some(storage) if held => storage.barrier(),
            _ => Durable::ready(),
        };
        Ok(Applied {
            changed: changed.len(),
            durable,
        })
    }
}

/// A local write, in the map and queued for the log: the write to replicate, and the promise
/// of its durability here.
#[derive(kameo::Reply)]
pub struct LocalWrite {
    pub write: Write,
    pub durable: Durable,
}

/// The result of applying writes from elsewhere.
#[derive(kameo::Reply)]
pub struct Applied {
    /// How many of the writes were newer than what we had.
    pub changed: usize,
    /// Resolves once the batch is durable here: the writes that changed the map are logged
    /// (as one append), and what the map already held for the rest is too.
    pub durable: Durable,
}

impl Applied {
    /// Waits until the batch is durable. Returns how many writes changed the map.
    pub async fn wait(self) -> Result<usize, Error> {
        self.durable.wait().await.map(|()| self.changed)
    }
}

/// Storage figures for status reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, kameo::Reply)]
pub struct StoreStats {
    /// Live keys.
    pub keys: usize,
    /// Tombstones kept.
    pub tombstones: usize,
    /// Bytes in the current log (0 when in memory).
    pub log_bytes: u64,
}

/// Store `value` under `key` as a new local write. Replies with the versioned write to
/// replicate, or the log's refusal.
#[derive(Debug)]
pub struct Put {
    pub key: String,
    pub value: String,
}

/// Delete `key` as a new local write (a tombstone). Replies as [`Put`] does.
#[derive(Debug)]
pub struct Delete {
    pub key: String,
}

/// Apply writes that other nodes made (replication, handoff, repair, anti-entropy).
#[derive(Debug)]
pub struct Apply(pub Vec<Write>);

/// Read the live value of a key through the actor: `None` if absent or deleted. Nodes read
/// the map directly ([`StoreReader::get`]); tests use this to read in turn with the writes
/// they sent.
#[cfg(test)]
#[derive(Debug)]
pub struct Get {
    pub key: String,
}

/// Read a key's entry as stored, tombstone and version included, through the actor (see
/// [`Get`]).
#[cfg(test)]
#[derive(Debug)]
pub struct GetEntry {
    pub key: String,
}

/// Take a [`ListView`]: the map as of now, for a consistent copy of every live pair made
/// outside the actor.
#[derive(Debug)]
pub struct TakeView;

/// Count keys and report the log's size.
#[derive(Debug)]
pub struct Stats;

/// Keep only these partitions: from now on, let go of the writes of other nodes outside them
/// (those of a ring change that moved them to other nodes, which a node still finishing the
/// change, or an anti-entropy round begun before it, may still send). The keys already held
/// outside them go with [`drop_outside`], which finds them off the actor.
#[derive(Debug)]
pub struct Retain(pub crate::placement::PartitionSet);

/// Drop these keys, each only if it is outside the partitions the store keeps now (they may
/// have changed since the keys were found). Replies with how many it dropped.
#[derive(Debug)]
pub struct DropOutside(pub Vec<Box<str>>);

/// Keys dropped per message: the store actor goes back to writes between batches.
const DROP_BATCH: usize = 1024;

/// Drops every key the store holds outside `keep`, the partitions it keeps since a
/// [`Retain`]: found by a scan off the actor (a turn of the reader's, as digests take), then
/// dropped by the actor a batch at a time, so writes wait for a batch, not for the whole map.
/// Nothing is logged, because nothing changed for the cluster: a restart brings the keys back
/// from the log until the next snapshot, and the node drops them again then. Returns how many
/// keys it dropped.
pub async fn drop_outside(
    store: &ActorRef<StoreActor>,
    reader: &StoreReader,
    keep: crate::placement::PartitionSet,
) -> Result<usize, Error> {
    let outside = reader
        .scan(move |reader| {
            let mut outside = Vec::new();
            reader.for_each(|key, _| {
                if !keep.contains_key(key) {
                    outside.push(Box::<str>::from(key));
                }
            });
            outside
        })
        .await;
    let mut dropped = 0;
    for batch in outside.chunks(DROP_BATCH) {
        dropped +=
            (store.ask(DropOutside(batch.to_vec())).await).map_err(|_| Error::StoreStopped)?;
    }
    Ok(dropped)
}

impl Message<Put> for StoreActor {
    type Reply = Result<LocalWrite, Error>;

    async fn handle(&mut self, msg: Put, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.write_local(msg.key, Some(msg.value))
    }
}

impl Message<Delete> for StoreActor {
    type Reply = Result<LocalWrite, Error>;

    async fn handle(&mut self, msg: Delete, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.write_local(msg.key, None)
    }
}

impl Message<Apply> for StoreActor {
    type Reply = Result<Applied, Error>;

    async fn handle(&mut self, msg: Apply, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.apply_all(msg.0)
    }
}

#[cfg(test)]
impl Message<Get> for StoreActor {
    type Reply = Option<String>;

    async fn handle(&mut self, msg: Get, _: &mut Context<Self, Self::Reply>) -> Option<String> {
        self.map
            .get(msg.key.as_str())
            .and_then(|e| e.value_str().map(String::from))
    }
}

#[cfg(test)]
impl Message<GetEntry> for StoreActor {
    type Reply = Option<Entry>;

    async fn handle(&mut self, msg: GetEntry, _: &mut Context<Self, Self::Reply>) -> Option<Entry> {
        self.map.get(msg.key.as_str()).map(|e| e.entry())
    }
}

impl Message<TakeView> for StoreActor {
    type Reply = ListView;

    async fn handle(&mut self, _: TakeView, _: &mut Context<Self, Self::Reply>) -> ListView {
        self.views.register(&self.map)
    }
}

impl Message<Retain> for StoreActor {
    type Reply = ();

    async fn handle(&mut self, msg: Retain, _: &mut Context<Self, Self::Reply>) {
        self.keep = Some(msg.0);
    }
}

impl Message<DropOutside> for StoreActor {
    type Reply = usize;

    async fn handle(&mut self, msg: DropOutside, _: &mut Context<Self, Self::Reply>) -> usize {
        let Some(keep) = self.keep else {
            return 0;
        };
        let mut dropped = 0;
        for key in msg.0.iter().filter(|key| !keep.contains_key(key)) {
            self.views.save_pre_image(&self.map, key);
            if let Some(slot) = self.map.remove(key) {
                self.counts.count(&slot, -1);
                dropped += 1;
            }
        }
        dropped
    }
}

impl Message<Stats> for StoreActor {
    type Reply = StoreStats;

    async fn handle(&mut self, _: Stats, _: &mut Context<Self, Self::Reply>) -> StoreStats {
        self.purge_expired();
        StoreStats {
            keys: self.counts.live,
            tombstones: self.counts.tombstones,
            log_bytes: self.storage.as_ref().map_or(0, Storage::log_bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use kameo::actor::Spawn;

    use super::*;
    use crate::version::NodeId;

    fn store(node: &str) -> ActorRef<StoreActor> {
        StoreActor::spawn(StoreActor::new(Arc::new(Clock::new(
            NodeId::new(node).unwrap(),
        ))))
    }

    use crate::storage::fs::crash::CrashDir;
    use crate::testing::write;

    async fn apply(s: &ActorRef<StoreActor>, w: Write) -> bool {
        s.ask(Apply(vec![w])).await.unwrap().changed == 1
    }

    async fn put(
        s: &ActorRef<StoreActor>,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Write {
        let p = s
            .ask(Put {
                key: key.into(),
                value: value.into(),
            })
            .await
            .unwrap();
        p.durable.wait().await.unwrap();
        p.write
    }

    async fn get(s: &ActorRef<StoreActor>, key: &str) -> Option<String> {
        s.ask(Get { key: key.into() }).await.unwrap()
    }

    #[tokio::test]
    async fn keys_outside_the_kept_partitions_are_dropped_off_the_actor_and_stay_out() {
        use crate::placement::PartitionSet;
        let actor = StoreActor::new(Arc::new(Clock::new(NodeId::new("n1").unwrap())));
        let reader = actor.reader();
        let s = StoreActor::spawn(actor);
        let keys: Vec<String> = (0..200).map(|k| format!("k{k}")).collect();
        for k in &keys {
            put(&s, k.as_str(), "v").await;
        }
        let mut keep = PartitionSet::none();
        for k in keys.iter().take(50) {
            keep.insert(crate::ring::partition_of(k));
        }
        let (inside, outside): (Vec<&String>, Vec<&String>) =
            keys.iter().partition(|k| keep.contains_key(k));
        assert!(inside.len() >= 50 && outside.len() > 50, "{}", inside.len());
        s.ask(Retain(keep)).await.unwrap();
        assert_eq!(reader.len(), 200, "kept from now on, dropped by the scan");
        assert_eq!(
            drop_outside(&s, &reader, keep).await.unwrap(),
            outside.len()
        );
        for k in &inside {
            assert_eq!(get(&s, k).await.as_deref(), Some("v"), "{k}");
        }
        for k in &outside {
            assert_eq!(get(&s, k).await, None, "{k}");
        }
        assert_eq!(s.ask(Stats).await.unwrap().keys, inside.len());
        // Another node's write outside them is let go; inside them, taken.
        let fresh = |inside: bool| {
            (0..)
                .map(|i| format!("new{i}"))
                .find(|k| keep.contains_key(k) == inside)
                .unwrap()
        };
        assert!(!apply(&s, write(&fresh(false), Some("w"), 15, "n2")).await);
        assert!(apply(&s, write(&fresh(true), Some("w"), 15, "n2")).await);
        // A key whose partition is kept again by the time its batch comes is not dropped.
        s.ask(Retain(PartitionSet::all())).await.unwrap();
        let again = DropOutside(vec![inside[0].as_str().into(), "absent".into()]);
        assert_eq!(s.ask(again).await.unwrap(), 0);
        assert_eq!(get(&s, inside[0]).await.as_deref(), Some("v"));
    }

    #[tokio::test]
    async fn put_then_get_and_versions_increase() {
        let s = store("n1");
        let w1 = put(&s, "k", "a").await;
        let w2 = put(&s, "k", "b").await;
        assert!(w2.entry.version > w1.entry.version);
        assert_eq!(&*w2.entry.version.node, "n1");
        assert_eq!(get(&s, "k").await.as_deref(), Some("b"));
    }

    #[tokio::test]
    async fn two_writes_under_one_version_end_the_same_on_every_replica() {
        // What two nodes sharing an id (or a forged Replicate) can make. Whichever arrives
        // first, every replica keeps the same one: the tombstone, else the greater value.
        for (a, b, winner) in [
            (Some("apple"), Some("banana"), Some("banana")),
            (Some("zebra"), None, None),
        ] {
            let first = write("k", a, 15, "n1");
            let second = write("k", b, 15, "n1");
            for order in [[&first, &second], [&second, &first]] {
                let s = store("n3");
                for w in order {
                    apply(&s, w.clone()).await;
                }
                assert_eq!(get(&s, "k").await.as_deref(), winner, "{order:?}");
                for w in order {
                    assert!(!apply(&s, w.clone()).await, "decided writes change nothing");
                }
            }
        }
    }

    #[tokio::test]
    async fn apply_keeps_the_newest_version_in_any_order() {
        let writes = [
            write("k", Some("old"), 10, "n1"),
            write("k", Some("new"), 20, "n2"),
            write("k", Some("tie-low"), 15, "a"),
            write("k", Some("tie-high"), 15, "b"),
        ];
        // Every permutation ends at the same value: apply is a max() over versions.
        let orders: [[usize; 4]; 4] = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2], [2, 3, 0, 1]];
        for order in orders {
            let s = store("n3");
            for i in order {
                apply(&s, writes[i].clone()).await;
            }
            assert_eq!(
                get(&s, "k").await.as_deref(),
                Some("new"),
                "order {order:?}"
            );
        }
    }

    #[tokio::test]
    async fn node_id_breaks_ties() {
        let s = store("n3");
        assert!(apply(&s, write("k", Some("b"), 5, "b")).await);
        assert!(!apply(&s, write("k", Some("a"), 5, "a")).await);
        assert_eq!(get(&s, "k").await.as_deref(), Some("b"));
    }

    #[tokio::test]
    async fn apply_is_idempotent() {
        let s = store("n1");
        let w = write("k", Some("v"), 7, "n2");
        assert!(apply(&s, w.clone()).await);
        assert!(!apply(&s, w.clone()).await);
        let entry = s.ask(GetEntry { key: "k".into() }).await.unwrap();
        assert_eq!(entry, Some(w.entry));
    }

    #[tokio::test]
    async fn tombstones_hide_keys_and_beat_older_puts() {
        let s = store("n1");
        apply(&s, write("k", Some("v"), 10, "n2")).await;
        assert!(apply(&s, write("k", None, 20, "n2")).await);
        assert_eq!(get(&s, "k").await, None);
        // A Put older than the delete arrives late: the key stays deleted.
        assert!(!apply(&s, write("k", Some("late"), 15, "n3")).await);
        assert_eq!(get(&s, "k").await, None);
        assert!(s.ask(TakeView).await.unwrap().collect().is_empty());
        assert_eq!(s.ask(Stats).await.unwrap().keys, 0);
        // A newer Put does bring the key back: delete is not forever, it is ordered.
        assert!(apply(&s, write("k", Some("again"), 30, "n3")).await);
        assert_eq!(get(&s, "k").await.as_deref(), Some("again"));
    }

    #[tokio::test]
    async fn local_delete_writes_a_tombstone() {
        let s = store("n1");
        put(&s, "k", "v").await;
        let w = s.ask(Delete { key: "k".into() }).await.unwrap().write;
        assert_eq!(w.entry.value, None);
        assert_eq!(get(&s, "k").await, None);
        let stored = s.ask(GetEntry { key: "k".into() }).await.unwrap().unwrap();
        assert_eq!(stored.version, w.entry.version);
    }

    /// Puts `write` in the store's map and log as if it had been taken, whatever the bound
    /// says: how a version far ahead of the clock gets into a store now (taken while a clock
    /// was wrong, and read back from disk since).
    async fn plant(actor: &mut StoreActor, write: &Write) {
        actor.insert(Slot::new(&write.key, &write.entry));
        if let Some(storage) = &mut actor.storage {
            storage.append([write]).wait().await.unwrap();
        }
    }

    /// A version time `secs` seconds ahead of the system clock.
    fn ahead(secs: u64) -> u64 {
        crate::clock::now_minus(std::time::Duration::ZERO)
            + crate::clock::ntp_duration(std::time::Duration::from_secs(secs))
    }

    #[tokio::test]
    async fn a_version_too_far_ahead_is_refused_and_changes_nothing() {
        let s = store("n1");
        put(&s, "k", "mine").await;
        let forged = write("k", Some("forged"), ahead(23 * 3600), "n2");
        let refused = s
            .ask(Apply(vec![write("other", Some("v"), 1, "n2"), forged]))
            .await;
        let Err(kameo::error::SendError::HandlerError(error)) = refused else {
            panic!("taken: {:?}", refused.ok().map(|a| a.changed));
        };
        let said = error.to_string();
        assert!(said.starts_with("k: its version is 23h ahead"), "{said}");
        assert!(
            said.contains("past the 500ms") && said.contains("forged"),
            "{said}"
        );
        // The batch was refused whole.
        assert_eq!(get(&s, "k").await.as_deref(), Some("mine"));
        assert_eq!(get(&s, "other").await, None);
        // Within the bound, a peer's version ahead of ours is taken.
        assert!(apply(&s, write("k", Some("peer"), ahead(0) + (1 << 30), "n2")).await);
    }

    #[tokio::test]
    async fn local_write_orders_after_a_future_version_it_holds() {
        // A version far beyond the clock's bound, which the clock does not follow: a local
        // write of that key must still win over it.
        let clock = Arc::new(Clock::new(NodeId::new("n1").unwrap()));
        let mut actor = StoreActor::new(clock);
        let far = ahead(3600);
        plant(&mut actor, &write("k", Some("old"), far, "n2")).await;
        let s = StoreActor::spawn(actor);
        let w = put(&s, "k", "mine").await;
        assert!(w.entry.version.time > far);
        assert_eq!(get(&s, "k").await.as_deref(), Some("mine"));
        assert!(
            put(&s, "other", "v").await.entry.version.time < far,
            "the clock stayed"
        );
    }

    /// Copies every file of `from` into `to` (a data dir as it was at that moment).
    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        for file in std::fs::read_dir(from).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
        }
    }

    async fn stop(s: ActorRef<StoreActor>) {
        s.stop_gracefully().await.unwrap();
        let _ = s.wait_for_shutdown_result().await;
    }

    #[tokio::test]
    async fn after_a_crash_a_bumped_write_does_not_reuse_the_lost_ones_version() {
        // A key holds a peer's version an hour ahead of our clock (too far to observe), so a
        // local write of it is bumped just above that version. Such a write reaches the peers
        // while our log syncs; if we crash first, it is lost here only. The write after the
        // restart must not get its version: with another value, replicas holding one would
        // never take the other.
        let life = tempfile::tempdir().unwrap();
        let before_the_put = tempfile::tempdir().unwrap();
        let recovered = |dir: &std::path::Path| {
            let clock = Arc::new(Clock::new(NodeId::new("n1").unwrap()));
            let config = crate::storage::tests::config();
            StoreActor::recovered(clock, Storage::open(dir, &config).unwrap())
        };
        let far = ahead(3600);

        let mut actor = recovered(life.path());
        plant(&mut actor, &write("k", Some("peer"), far, "n2")).await;
        let s = StoreActor::spawn(actor);
        copy_dir(life.path(), before_the_put.path());
        let lost = put(&s, "k", "lost").await;
        assert_eq!(
            lost.entry.version.time,
            far + 1,
            "bumped just above the peer's"
        );
        stop(s).await;

        // Restart from the data dir as it was before the lost write.
        let s = StoreActor::spawn(recovered(before_the_put.path()));
        let next = put(&s, "k", "after the restart").await;
        assert!(
            next.entry.version > lost.entry.version,
            "{} does not order after the lost {}",
            next.entry.version,
            lost.entry.version
        );
        // The version an hour ahead did not move the clock: other keys' writes get versions
        // near physical time, not beyond the far one.
        let other = put(&s, "other", "v").await;
        assert!(
            other.entry.version.time < ahead(60),
            "the clock jumped to the far version"
        );
        // And the key's later writes go on ordering after each other.
        let again = put(&s, "k", "again").await;
        assert!(again.entry.version > next.entry.version);
        stop(s).await;
    }

    #[tokio::test]
    async fn snapshot_is_in_key_order() {
        let s = store("n1");
        for k in ["b", "c", "a", "aa"] {
            put(&s, k, k.to_uppercase()).await;
        }
        let keys: Vec<String> = s
            .ask(TakeView)
            .await
            .unwrap()
            .collect()
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(keys, ["a", "aa", "b", "c"]);
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn a_list_view_is_the_map_as_of_when_it_was_taken() {
        let s = store("n1");
        for k in ["a", "b", "c", "d"] {
            put(&s, k, "old").await;
        }
        s.ask(Delete { key: "d".into() }).await.unwrap();
        let first = s.ask(TakeView).await.unwrap();

        // The store goes on while the view is not yet copied: every kind of write.
        put(&s, "a", "new").await;
        s.ask(Delete { key: "b".into() }).await.unwrap();
        assert!(apply(&s, write("c", Some("peer"), ahead(0) + (1 << 30), "n2")).await);
        put(&s, "d", "back").await;
        put(&s, "e", "added").await;
        let second = s.ask(TakeView).await.unwrap();
        put(&s, "a", "newer").await;
        put(&s, "f", "added later").await;

        assert_eq!(
            first.collect(),
            pairs(&[("a", "old"), ("b", "old"), ("c", "old")])
        );
        assert_eq!(
            second.collect(),
            pairs(&[("a", "new"), ("c", "peer"), ("d", "back"), ("e", "added")])
        );
        put(&s, "g", "after").await;
        assert_eq!(s.ask(TakeView).await.unwrap().collect().len(), 6);
    }

    #[tokio::test]
    async fn a_view_read_lazily_is_the_map_as_of_when_it_was_taken() {
        let s = store("n1");
        for k in ["a", "b", "c", "d"] {
            put(&s, k, "old").await;
        }
        s.ask(Delete { key: "d".into() }).await.unwrap();
        let view = s.ask(TakeView).await.unwrap();
        // Written between the view and the copy of its keys, which sees them all.
        put(&s, "a", "new").await;
        s.ask(Delete { key: "b".into() }).await.unwrap();
        put(&s, "e", "added").await;
        let keys = view.sorted_keys();
        assert_eq!(keys.len(), 5);
        // And written while the values are read, a chunk at a time.
        let mut listed = Vec::new();
        for (i, chunk) in keys.chunks(2).enumerate() {
            listed.extend(view.read(chunk));
            put(&s, "c", &format!("during {i}")).await;
            put(&s, "d", "back").await;
        }
        assert_eq!(listed, pairs(&[("a", "old"), ("b", "old"), ("c", "old")]));
        // Only the keys written since the view began were saved for it.
        assert_eq!(view.saved(), 5);
        drop(view);
        put(&s, "z", "after").await;
    }

    #[tokio::test]
    async fn a_view_reads_entries_with_versions_and_tombstones_as_of_when_it_was_taken() {
        let s = store("n1");
        put(&s, "a", "old").await;
        put(&s, "b", "old").await;
        s.ask(Delete { key: "b".into() }).await.unwrap();
        let view = s.ask(TakeView).await.unwrap();
        let before: Vec<Write> = view.read_entries(&["a".into(), "b".into()], None);
        // Written after the view: it still reads what the keys held.
        put(&s, "a", "new").await;
        put(&s, "b", "back").await;
        put(&s, "c", "added").await;
        let keys = view.sorted_keys();
        let entries = view.read_entries(&keys, None);
        assert_eq!(entries, before);
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(entries[0].entry.value.as_deref(), Some("old"));
        assert_eq!(
            entries[1].entry.value, None,
            "the tombstone, with its version"
        );
        // A tombstone past its grace is left out, as anti-entropy leaves it out.
        let all_expired = Some(u64::MAX);
        let kept = view.read_entries(&keys, all_expired);
        assert_eq!(
            kept.iter().map(|w| w.key.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
    }

    #[tokio::test]
    async fn a_view_read_through_a_key_saves_nothing_more_for_the_keys_up_to_it() {
        let s = store("n1");
        for k in ["a", "b", "c", "d"] {
            put(&s, k, "old").await;
        }
        let view = s.ask(TakeView).await.unwrap();
        put(&s, "a", "new").await;
        put(&s, "c", "new").await;
        assert_eq!(view.saved(), 2);
        // Read up to "b": what was saved for "a" goes, and writes up to "b" save nothing.
        assert_eq!(
            view.read(&["a".into(), "b".into()]),
            pairs(&[("a", "old"), ("b", "old")])
        );
        view.read_through("b");
        assert_eq!(view.saved(), 1);
        put(&s, "a", "newer").await;
        put(&s, "b", "new").await;
        assert_eq!(view.saved(), 1);
        // The keys after it are still read as they were.
        put(&s, "d", "new").await;
        assert_eq!(view.saved(), 2);
        assert_eq!(
            view.read(&["c".into(), "d".into()]),
            pairs(&[("c", "old"), ("d", "old")])
        );
    }

    #[test]
    fn a_copy_stopped_midway_while_keys_change_on_both_sides_of_it_returns_the_old_map() {
        // The copy stops in the middle of the map; the store then overwrites and adds keys in
        // the stripes it has read (their slots now differ from what it read) and in those it
        // has not (it must take their pre-images), but not in the stripe it holds locked.
        const KEYS: usize = 2000;
        let mut store = StoreActor::new(Arc::new(Clock::new(NodeId::new("n1").unwrap())));
        for i in 0..KEYS {
            store.apply(&write(&format!("k{i:04}"), Some("old"), 10, "n2"));
        }
        let map = store.map.clone();
        let view = store.views.register(&store.map);
        let (stopped_at, at) = std::sync::mpsc::channel::<String>();
        let (go, resume) = std::sync::mpsc::channel::<()>();
        let copier = std::thread::spawn(move || {
            let mut read = 0;
            view.collect_pausing(|key| {
                read += 1;
                if read == KEYS / 2 {
                    stopped_at.send(key.to_string()).unwrap();
                    resume.recv().unwrap();
                }
            })
        });
        let held = map.shard_of(at.recv().unwrap().as_str());
        let (mut behind, mut ahead) = (0, 0);
        for i in 0..KEYS {
            for key in [format!("k{i:04}"), format!("new{i:04}")] {
                let stripe = map.shard_of(key.as_str());
                if stripe == held {
                    continue;
                }
                if stripe < held {
                    behind += 1;
                } else {
                    ahead += 1;
                }
                store.apply(&write(&key, Some("new"), 20, "n2"));
            }
        }
        go.send(()).unwrap();
        let copy = copier.join().unwrap();
        assert!(
            behind > 0 && ahead > 0,
            "{behind} keys behind, {ahead} ahead"
        );
        assert_eq!(copy.len(), KEYS);
        assert!(copy.iter().all(|(k, v)| k.starts_with('k') && v == "old"));
    }

    #[test]
    fn a_view_that_is_done_costs_writes_nothing() {
        let mut store = StoreActor::new(Arc::new(Clock::new(NodeId::new("n1").unwrap())));
        let copied = store.views.register(&store.map);
        let dropped = store.views.register(&store.map);
        store.write_local("k".into(), Some("v".into())).unwrap();
        assert_eq!(copied.saved(), 1);
        assert_eq!(dropped.saved(), 1);
        assert_eq!(copied.collect(), []);
        drop(dropped);
        store.write_local("k".into(), Some("w".into())).unwrap();
        assert_eq!(store.views.registered(), 0, "the next write forgets both");
        // Without writes, the next List forgets them.
        for _ in 0..100 {
            drop(store.views.register(&store.map));
        }
        assert_eq!(
            store.views.registered(),
            1,
            "one husk at most, the last List's"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_list_copied_while_the_store_writes_is_still_a_consistent_cut() {
        // The copy runs on another thread while the actor overwrites every key and adds new
        // ones: whatever the interleaving, the copy holds exactly the map as of the view.
        const KEYS: usize = 20_000;
        let s = store("n1");
        let old: Vec<Write> = (0..KEYS)
            .map(|i| write(&format!("k{i:05}"), Some("old"), 10, "n2"))
            .collect();
        assert_eq!(s.ask(Apply(old)).await.unwrap().changed, KEYS);
        let view = s.ask(TakeView).await.unwrap();
        let copy = tokio::task::spawn_blocking(move || view.collect());
        for i in (0..KEYS).rev() {
            let overwrite = write(&format!("k{i:05}"), Some("new"), 20, "n2");
            let added = write(&format!("n{i:05}"), Some("new"), 20, "n2");
            s.tell(Apply(vec![overwrite, added])).await.unwrap();
        }
        let copy = copy.await.unwrap();
        assert_eq!(copy.len(), KEYS);
        assert!(copy.iter().all(|(k, v)| k.starts_with('k') && v == "old"));
        assert_eq!(s.ask(Stats).await.unwrap().keys, 2 * KEYS);
    }

    /// A store on a data dir that crashes and fills up on demand.
    fn on_disk(dir: &CrashDir, config: &crate::StorageConfig) -> ActorRef<StoreActor> {
        let clock = Arc::new(Clock::new(NodeId::new("n1").unwrap()));
        let recovered = Storage::open_in(Arc::new(dir.clone()), config).unwrap();
        StoreActor::spawn(StoreActor::recovered(clock, recovered))
    }

    #[tokio::test]
    async fn stats_count_keys_and_tombstones_as_they_change() {
        let s = store("n1");
        let stats = async || s.ask(Stats).await.unwrap();
        put(&s, "a", "1").await;
        put(&s, "b", "2").await;
        put(&s, "a", "3").await;
        assert_eq!((stats().await.keys, stats().await.tombstones), (2, 0));
        s.ask(Delete { key: "a".into() }).await.unwrap();
        s.ask(Delete {
            key: "never-there".into(),
        })
        .await
        .unwrap();
        assert_eq!((stats().await.keys, stats().await.tombstones), (1, 2));
        // A peer's newer put over a tombstone, and an older one that changes nothing.
        assert!(apply(&s, write("a", Some("back"), ahead(0) + (1 << 30), "n2")).await);
        assert!(!apply(&s, write("b", Some("old"), 1, "n2")).await);
        assert_eq!((stats().await.keys, stats().await.tombstones), (2, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stats_answer_without_walking_the_map() {
        // A stripe of the map locked for writing, as a long write to it would: a count that
        // walks the map waits for it; one kept as the map changes does not.
        let actor = StoreActor::new(Arc::new(Clock::new(NodeId::new("n1").unwrap())));
        let (map, reader) = (actor.map.clone(), actor.reader());
        let s = StoreActor::spawn(actor);
        put(&s, "k", "v").await;
        assert_eq!(reader.value("k").as_deref(), Some("v"));
        let locked = map.lock_shard_of("k");
        let stats = tokio::time::timeout(std::time::Duration::from_secs(5), s.ask(Stats)).await;
        drop(locked);
        assert_eq!(
            stats
                .expect("Stats waited for the locked stripe")
                .unwrap()
                .keys,
            1
        );
    }

    #[tokio::test]
    async fn a_tombstone_past_its_grace_is_not_taken_back_and_one_within_it_is() {
        let dir = CrashDir::default();
        let s = on_disk(&dir, &crate::storage::tests::config());
        let grace = crate::storage::tests::config().tombstone_grace;
        let expired = crate::clock::now_minus(grace + std::time::Duration::from_secs(60));
        let recent = crate::clock::now_minus(grace - std::time::Duration::from_secs(60));
        assert!(
            !apply(&s, write("old", None, expired, "n2")).await,
            "past the grace"
        );
        assert!(
            apply(&s, write("new", None, recent, "n2")).await,
            "within the grace"
        );
        let entry = |k: &str| s.ask(GetEntry { key: k.into() });
        assert_eq!(entry("old").await.unwrap(), None);
        assert_eq!(entry("new").await.unwrap().unwrap().value, None);
        // A store that keeps nothing on disk never purges, so it takes every tombstone.
        let memory = store("n1");
        assert!(apply(&memory, write("old", None, expired, "n2")).await);
    }

    #[tokio::test]
    async fn expired_tombstones_a_snapshot_left_out_are_purged_from_the_map() {
        let dir = CrashDir::default();
        let mut config = crate::storage::tests::config();
        config.compact_after_bytes = 1;
        config.tombstone_grace = std::time::Duration::from_secs(60);
        let s = on_disk(&dir, &config);
        // A key a peer deleted an hour ago, over a value it held: the tombstone replaces the
        // value (what a key holds is always replaced by what is newer).
        let old = crate::clock::now_minus(std::time::Duration::from_secs(3600));
        assert!(apply(&s, write("gone", Some("v"), old, "n2")).await);
        assert!(apply(&s, write("gone", None, old + 1, "n2")).await);
        let stats = async || s.ask(Stats).await.unwrap();
        // Every write starts a compaction (those two already have), whose snapshot leaves the
        // tombstone out and hands it back; the store purges it.
        let waited = std::time::Instant::now();
        loop {
            put(&s, "k", "v").await;
            if stats().await.tombstones == 0 {
                break;
            }
            assert!(
                waited.elapsed() < std::time::Duration::from_secs(10),
                "never purged"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(s.ask(GetEntry { key: "gone".into() }).await.unwrap(), None);
        assert_eq!(stats().await.keys, 1);
    }

    #[tokio::test]
    async fn a_write_the_log_cannot_take_is_refused_whole_and_writes_resume_with_room() {
        let dir = CrashDir::default();
        let s = on_disk(&dir, &crate::storage::tests::config());
        let newest = put(&s, "k", "newest").await;
        dir.set_full(true);
        // The append that meets the full disk fails; its write is in the map, and kept by the
        // log for a retry.
        let failed = s
            .ask(Put {
                key: "k".into(),
                value: "kept".into(),
            })
            .await
            .unwrap();
        assert!(failed.durable.wait().await.is_err());
        // From then on writes are refused before they touch the map, and reads go on.
        let refused = s
            .ask(Put {
                key: "other".into(),
                value: "v".into(),
            })
            .await;
        assert!(
            matches!(
                &refused,
                Err(kameo::error::SendError::HandlerError(Error::Log(_)))
            ),
            "{:?}",
            refused.err()
        );
        let older = write("k", Some("older"), newest.entry.version.time - 1, "n2");
        assert!(
            s.ask(Apply(vec![older.clone()])).await.is_err(),
            "refused while full"
        );
        assert_eq!(get(&s, "other").await, None);
        assert_eq!(get(&s, "k").await.as_deref(), Some("kept"));
        // Room again: the log's own retry writes what it kept, and writes resume.
        dir.set_full(false);
        let waited = std::time::Instant::now();
        let applied = loop {
            match s.ask(Apply(vec![older.clone()])).await {
                Ok(applied) => break applied,
                Err(_) => {
                    assert!(
                        waited.elapsed() < std::time::Duration::from_secs(10),
                        "never resumed"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        };
        assert_eq!(applied.wait().await.unwrap(), 0, "not newer than ours");
        // What was acknowledged since is on disk: after a power cut the key holds what the map
        // held, the write the log kept.
        dir.crash(crate::storage::fs::crash::Tear::Nothing);
        let recovered = Storage::open_in(Arc::new(dir.clone()), &crate::storage::tests::config());
        let recovered = recovered.unwrap();
        assert_eq!(recovered.map.get("k").unwrap().value_str(), Some("kept"));
    }
}
