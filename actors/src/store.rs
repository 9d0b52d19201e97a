//! The store actor: the one owner of a node's key-value map.
//!
//! Every change to the map goes through this actor's mailbox, so writes are applied one at a
//! time and a version decision (is this entry newer?) never races another write of the same key.
//! The map itself is a `DashMap` so that a `List`'s copy and log compaction can walk it from
//! other threads, one lock stripe at a time, while the actor goes on writing ([`ListView`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use dashmap::DashMap;
use kameo::Actor;
use kameo::actor::{ActorRef, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::message::{Context, Message};

use crate::storage::{Durable, Recovered, Storage};
use crate::version::{self, Clock, LOST_BUMPS_MARGIN, NodeId, Version};

/// The map a store keeps: key to [`Slot`]. Keys are boxed `str`s rather than `String`s, 8
/// bytes less each.
pub type Map = DashMap<Box<str>, Slot>;

/// Lock shards of a store's map. A snapshot walks the map one shard at a time under the shard's
/// read lock, and the store actor's write to that shard waits for it, which stalls every
/// write and read behind it in the mailbox. DashMap's default is 4 per CPU (8 on two cores):
/// at 1M keys a shard then takes about 55 ms to encode. In a probe writing a key every 50 us
/// while snapshots ran back to back, 8 shards left the writer blocked 2.9 s of 3 s (longest
/// stall 65 ms); 64 shards, 0.7 s (longest 9 ms). `cargo bench -p kvstore-actors -- snapshot`:
/// an insert during snapshots takes 45 us on average with 8 shards, 15 us with 64, 2.3 us with
/// 512. More than 64 cost RSS, though: 237-246 bytes per key at 1M keys with 128-512 shards
/// against 229-230 with 8-64, because the allocator keeps the freed tables of mid-sized shards.
pub const MAP_SHARDS: usize = 64;

/// An empty map with [`MAP_SHARDS`] shards.
pub fn new_map() -> Map {
    Map::with_shard_amount(MAP_SHARDS)
}

/// Set in a slot's node word for a tombstone (interned node ids stay far below it).
const TOMBSTONE: u32 = 1 << 31;
/// Bytes of a slot's blob before the value: the node word.
const SLOT_HEADER: usize = 4;

/// An [`Entry`] as the map keeps it: 24 bytes in the table plus one allocation holding the
/// writer's interned node id and the value. At a million keys the hash table has about two
/// million slots, so every byte of slot costs about two bytes per key. Against an `Entry` (32
/// bytes; 40 when node ids were `Arc<str>`), this layout took a node from 273 to 231 bytes of
/// RSS per key at 1M keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Slot {
    time: u64,
    /// The node word (little-endian [`NodeId::to_bits`], with [`TOMBSTONE`] for a deletion),
    /// then the value's bytes, always UTF-8.
    blob: Box<[u8]>,
}

impl Slot {
    /// The slot holding `entry`.
    pub fn new(entry: &Entry) -> Self {
        let value = entry.value.as_deref().unwrap_or("");
        let bits = entry.version.node.to_bits();
        // Would take 2^31 distinct node ids in one process: memory runs out long before.
        debug_assert_eq!(
            bits & TOMBSTONE,
            0,
            "node id handle collides with the tombstone bit"
        );
        let word = bits | if entry.value.is_none() { TOMBSTONE } else { 0 };
        let mut blob = Vec::with_capacity(SLOT_HEADER + value.len());
        blob.extend_from_slice(&word.to_le_bytes());
        blob.extend_from_slice(value.as_bytes());
        Self {
            time: entry.version.time,
            blob: blob.into_boxed_slice(),
        }
    }

    fn word(&self) -> u32 {
        let mut word = [0; SLOT_HEADER];
        word.copy_from_slice(&self.blob[..SLOT_HEADER]);
        u32::from_le_bytes(word)
    }

    /// The version of the write that produced this entry.
    pub fn version(&self) -> Version {
        Version {
            time: self.time,
            node: NodeId::from_bits(self.word() & !TOMBSTONE),
        }
    }

    /// Whether this is a deletion.
    pub fn is_tombstone(&self) -> bool {
        self.word() & TOMBSTONE != 0
    }

    /// The value, or `None` for a tombstone.
    pub fn value_str(&self) -> Option<&str> {
        (!self.is_tombstone()).then(|| {
            std::str::from_utf8(&self.blob[SLOT_HEADER..]).expect("slots are built from a str")
        })
    }

    /// The entry, copied out.
    pub fn entry(&self) -> Entry {
        Entry {
            value: self.value_str().map(Box::from),
            version: self.version(),
        }
    }

    /// Whether `entry` wins over this slot in last-writer-wins order ([`precedence`]). The
    /// value is looked at only on a tie of versions, which a correct cluster never makes.
    pub fn loses_to(&self, entry: &Entry) -> bool {
        match entry.version.cmp(&self.version()) {
            std::cmp::Ordering::Equal => {
                entry.precedence() > precedence(self.version(), self.value_str())
            }
            order => order.is_gt(),
        }
    }

    /// Whether this is a tombstone older than `before` (a version time): past its grace.
    pub fn is_expired(&self, before: Option<u64>) -> bool {
        self.is_tombstone() && before.is_some_and(|t| self.time < t)
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.entry().fmt(f)
    }
}

/// What the store keeps per key: the value, or `None` for a tombstone, and its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// `None` marks a deleted key. Tombstones stay so that an older Put arriving late cannot
    /// resurrect the key.
    pub value: Option<Box<str>>,
    /// The version of the write that produced this entry.
    pub version: Version,
}

impl Entry {
    /// Where this entry stands in last-writer-wins order (see [`precedence`]).
    pub fn precedence(&self) -> (Version, bool, Option<&str>) {
        precedence(self.version, self.value.as_deref())
    }
}

/// The order of last-writer-wins: the newer version wins. Two different writes under one
/// version should not exist: it takes two nodes sharing an id, a forged Replicate, or a bug.
/// If they do, a tombstone beats a value and the greater value beats the smaller (as in
/// Cassandra), so that every replica keeps the same one, whatever order they reach it in, and
/// anti-entropy, whose digests include values, converges them rather than trading them for ever.
pub fn precedence(version: Version, value: Option<&str>) -> (Version, bool, Option<&str>) {
    (version, value.is_none(), value)
}

/// One versioned write of one key: what replicates between nodes.
#[derive(Clone, Debug, PartialEq, Eq, kameo::Reply)]
pub struct Write {
    pub key: String,
    pub entry: Entry,
}

/// The store actor. Its state is the map, the node's clock and (unless in-memory) its storage.
pub struct StoreActor {
    /// Shared read-only with [`StoreReader`]s (digests, snapshots) so scans never queue behind
    /// writes in the mailbox; only this actor writes to it.
    map: Arc<Map>,
    clock: Arc<Clock>,
    storage: Option<Storage>,
    /// Entries that are in the map but whose log append failed (a full disk). The map is
    /// updated before the log answers, so a later delivery of that write, or of an older one,
    /// would otherwise be "not newer", skipped and acknowledged with nothing on disk. The log
    /// writer reports failed appends itself ([`Storage::take_unlogged`]), so a caller that
    /// stopped waiting cannot lose the report.
    unlogged: std::collections::HashMap<String, Version>,
    /// The `List`s whose copy of the map is still running: each gets the pre-image of every
    /// key written until it is done. Weak, so a copy that finished (or was dropped) stops
    /// costing anything at the next write.
    views: Vec<Weak<PreImages>>,
    /// Keys that local writes have bumped above a recovered version the clock does not cover,
    /// since the start (few: it takes a peer clock beyond the drift bound).
    bumped: std::collections::HashSet<Box<str>>,
    /// The newest version time recovered from disk at the start.
    recovered_max: u64,
}

/// What keys held when a [`ListView`] was taken, for those written since: `None` if absent.
type PreImages = Mutex<HashMap<Box<str>, Option<Slot>>>;

/// A `List`'s view of the map as of the moment the store actor took it, copied outside the
/// actor.
///
/// Copying a million keys takes about a second. Done inside the actor, as it once was, that
/// stalled every write and read of the node (and the peers replicating to it) for as long.
/// Now the actor only registers the view, and until the copy is done it saves, before it
/// writes a key for the first time since, what the key held. The copy walks the map one lock
/// stripe at a time and takes a key's saved pre-image where there is one:
/// - a key written before the copy reached it has a pre-image, saved before the write;
/// - a key written after has none yet when the copy reads it, and the write waits for the
///   copy to leave the key's stripe (the copy holds the stripe's read lock while it reads the
///   slot and looks for a pre-image), so what the copy read is what the key held.
///
/// Either way the copy is the map at the instant of registration, a consistent cut, and the
/// actor waits at most for one stripe's worth of copying (1/64 of the map), not the whole map.
#[derive(kameo::Reply)]
pub struct ListView {
    map: Arc<Map>,
    before: Arc<PreImages>,
}

impl ListView {
    /// Every live pair of the view, in key order. Blocking work (a second at 1M keys): run it
    /// off the async workers.
    pub fn collect(self) -> Vec<(String, String)> {
        self.collect_pausing(|_| ())
    }

    /// [`collect`](Self::collect), calling `after` with each key read, the key's stripe still
    /// locked (tests stop the copy there and write around it).
    fn collect_pausing(self, mut after: impl FnMut(&str)) -> Vec<(String, String)> {
        let mut pairs = Vec::with_capacity(self.map.len());
        for item in self.map.iter() {
            let before = self.before.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = match before.get(item.key()) {
                Some(saved) => saved.as_ref(),
                None => Some(item.value()),
            };
            if let Some(value) = slot.and_then(Slot::value_str) {
                pairs.push((item.key().to_string(), value.to_string()));
            }
            drop(before);
            after(item.key());
        }
        // Done reading: dropping `before` (with `self`) ends the actor's saving.
        drop(self);
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        pairs
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

/// Read access to the store's map from outside the actor. Reads may interleave with writes;
/// use it where a fuzzy view is fine (digests, repair), never for a client's consistent read.
#[derive(Clone, kameo::Reply)]
pub struct StoreReader {
    map: Arc<Map>,
    /// How long tombstones live, if they are ever purged (never in memory-only stores).
    tombstone_grace: Option<std::time::Duration>,
}

/// Whether `entry` is a tombstone older than `before` (a version time), i.e. past its grace.
fn is_expired(entry: &Entry, before: Option<u64>) -> bool {
    entry.value.is_none() && before.is_some_and(|t| entry.version.time < t)
}

impl StoreReader {
    /// Version time below which tombstones are expired, as of now.
    pub fn expired_before(&self) -> Option<u64> {
        self.tombstone_grace.map(version::now_minus)
    }

    /// Calls `f` on every entry, tombstones included.
    pub fn for_each(&self, mut f: impl FnMut(&str, &Slot)) {
        for item in self.map.iter() {
            f(item.key(), item.value());
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
            unlogged: std::collections::HashMap::new(),
            views: Vec::new(),
            bumped: std::collections::HashSet::new(),
            recovered_max: 0,
        }
    }

    /// A store on recovered storage. The clock is moved past every version this node issued
    /// before the restart, and past the others as far as it can observe ([`Clock::restore`]);
    /// keys beyond that are covered when they are written ([`StoreActor::write_local`]).
    pub fn recovered(clock: Arc<Clock>, recovered: Recovered) -> Self {
        let own = (recovered.newest_by_node.get(&clock.node())).map_or(0, |&t| t);
        clock.restore(own, recovered.max_time);
        Self {
            map: Arc::new(recovered.map),
            clock,
            storage: Some(recovered.storage),
            unlogged: std::collections::HashMap::new(),
            views: Vec::new(),
            bumped: std::collections::HashSet::new(),
            recovered_max: recovered.max_time,
        }
    }

    /// A reader over this store's map.
    pub fn reader(&self) -> StoreReader {
        StoreReader {
            map: self.map.clone(),
            tombstone_grace: self.storage.as_ref().map(Storage::tombstone_grace),
        }
    }

    /// Logs a write that changed the map.
    fn persist(&mut self, write: &Write) -> Durable {
        self.persist_all(&[write])
    }

    /// Logs `writes` as one append: one group commit for a peer's whole batch.
    fn persist_all(&mut self, writes: &[&Write]) -> Durable {
        // Whatever was unlogged for these keys is superseded by these writes, logged now.
        for write in writes {
            self.unlogged.remove(&write.key);
        }
        match &mut self.storage {
            Some(storage) => storage.append_all(writes.iter().copied(), &self.map),
            None => Durable::ready(),
        }
    }

    /// Learns from the log which appends failed since it last asked, and remembers the ones
    /// whose version the map still holds (a newer write was logged by itself).
    fn note_failed_appends(&mut self) {
        let Some(storage) = &self.storage else { return };
        for (key, version) in storage.take_unlogged() {
            if self
                .map
                .get(key.as_str())
                .is_some_and(|e| e.version() == version)
            {
                self.unlogged.insert(key, version);
            }
        }
    }

    /// Whether `entry` is a tombstone past the grace period: it must not come back once purged.
    fn expired_tombstone(&self, entry: &Entry) -> bool {
        let before = (self.storage.as_ref())
            .filter(|_| entry.value.is_none())
            .map(|s| version::now_minus(s.tombstone_grace()));
        is_expired(entry, before)
    }

    /// A view of the map as of now, registered so that writes save pre-images for it.
    fn list_view(&mut self) -> ListView {
        let before = Arc::new(Mutex::new(HashMap::new()));
        // Dropped views are also cleared here, not only on writes: a node that serves Lists
        // and takes no writes would otherwise keep a husk per List.
        self.views.retain(|view| view.strong_count() > 0);
        self.views.push(Arc::downgrade(&before));
        ListView {
            map: self.map.clone(),
            before,
        }
    }

    /// Call before writing `key`: saves what it holds for every [`ListView`] still copying
    /// that has not seen it written yet.
    fn save_pre_image(&mut self, key: &str) {
        if self.views.is_empty() {
            return;
        }
        self.views.retain(|view| view.strong_count() > 0);
        // Read before taking a view's lock: the copy takes the two the other way round.
        let current = self.map.get(key).map(|slot| slot.clone());
        for view in self.views.iter().filter_map(Weak::upgrade) {
            // Poisoned only if a copy panicked: the store must go on regardless.
            let mut before = view.lock().unwrap_or_else(PoisonError::into_inner);
            if !before.contains_key(key) {
                before.insert(key.into(), current.clone());
            }
        }
    }

    /// Stores a local write (`value = None` deletes) under a fresh version and returns it.
    fn write_local(&mut self, key: String, value: Option<String>) -> Write {
        self.save_pre_image(&key);
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
        let entry = Entry {
            value: value.map(String::into_boxed_str),
            version,
        };
        self.map.insert(key.as_str().into(), Slot::new(&entry));
        Write { key, entry }
    }

    /// Applies `write` if it wins over what the map holds ([`precedence`]). Returns whether it
    /// changed the map.
    fn apply(&mut self, write: &Write) -> bool {
        self.clock.observe(&write.entry.version);
        self.save_pre_image(&write.key);
        match self.map.entry(write.key.as_str().into()) {
            dashmap::Entry::Occupied(mut slot) => {
                if slot.get().loses_to(&write.entry) {
                    slot.insert(Slot::new(&write.entry));
                    true
                } else {
                    false
                }
            }
            dashmap::Entry::Vacant(slot) => {
                // A tombstone past its grace period is one we may already have purged: taking
                // it back would make peers trade it forever.
                if self.expired_tombstone(&write.entry) {
                    return false;
                }
                slot.insert(Slot::new(&write.entry));
                true
            }
        }
    }
}

/// A local write, applied in memory, with the promise of its durability.
#[derive(kameo::Reply)]
pub struct Persisted {
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
    pub async fn wait(self) -> Result<usize, crate::Error> {
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

/// Store `value` under `key` as a new local write. Replies with the versioned write to replicate.
#[derive(Debug)]
pub struct Put {
    pub key: String,
    pub value: String,
}

/// Delete `key` as a new local write (a tombstone). Replies with the write to replicate.
#[derive(Debug)]
pub struct Delete {
    pub key: String,
}

/// Apply writes that other nodes made (replication, handoff, repair, anti-entropy).
#[derive(Debug)]
pub struct Apply(pub Vec<Write>);

/// Read the live value of a key: `None` if absent or deleted.
#[derive(Debug)]
pub struct Get {
    pub key: String,
}

/// Read a key's entry as stored, tombstone and version included (for tests and repair).
#[derive(Debug)]
pub struct GetEntry {
    pub key: String,
}

/// Take a [`ListView`]: the map as of now, for a consistent copy of every live pair made
/// outside the actor.
#[derive(Debug)]
pub struct Snapshot;

/// Count keys and report the log's size.
#[derive(Debug)]
pub struct Stats;

impl Message<Put> for StoreActor {
    type Reply = Persisted;

    async fn handle(&mut self, msg: Put, _: &mut Context<Self, Self::Reply>) -> Persisted {
        // Taken on every write, so failures never pile up in the log writer unread (a node
        // that only takes local writes, on a log that keeps failing).
        self.note_failed_appends();
        let write = self.write_local(msg.key, Some(msg.value));
        let durable = self.persist(&write);
        Persisted { write, durable }
    }
}

impl Message<Delete> for StoreActor {
    type Reply = Persisted;

    async fn handle(&mut self, msg: Delete, _: &mut Context<Self, Self::Reply>) -> Persisted {
        self.note_failed_appends();
        let write = self.write_local(msg.key, None);
        let durable = self.persist(&write);
        Persisted { write, durable }
    }
}

impl Message<Apply> for StoreActor {
    type Reply = Applied;

    async fn handle(&mut self, msg: Apply, _: &mut Context<Self, Self::Reply>) -> Applied {
        // Read before the failures are taken: one that lands after this is not accounted for.
        let failures = self.storage.as_ref().map_or(0, Storage::failures);
        self.note_failed_appends();
        let mut changed = 0;
        let mut to_log = Vec::new();
        let mut relog = Vec::new();
        let mut held = false;
        for write in &msg.0 {
            if self.apply(write) {
                changed += 1;
                // Logged below, so whatever was unlogged for the key no longer matters.
                self.unlogged.remove(&write.key);
                to_log.push(write);
            } else if self.unlogged.remove(&write.key).is_some() {
                // What we hold for this key (this write or a newer one) is in the map but its
                // append failed. Acknowledging this write says we hold it durably: log it.
                if let Some(slot) = self.map.get(write.key.as_str()) {
                    relog.push(Write {
                        key: write.key.clone(),
                        entry: slot.entry(),
                    });
                }
            } else {
                held = true;
            }
        }
        to_log.extend(&relog);
        let durable = match &mut self.storage {
            // What we already held may itself still be on its way to the disk (a local Put
            // waiting for its group commit): the acknowledgement waits for it, since our append
            // is queued after it, and fails if any append fails meanwhile, since a failed one
            // does not fail those queued behind it. Failures before were taken above: what they
            // left unlogged is in `relog`.
            Some(storage) if held => {
                storage.append_all_after(to_log.iter().copied(), &self.map, failures)
            }
            _ => self.persist_all(&to_log),
        };
        Applied { changed, durable }
    }
}

impl Message<Get> for StoreActor {
    type Reply = Option<String>;

    async fn handle(&mut self, msg: Get, _: &mut Context<Self, Self::Reply>) -> Option<String> {
        self.map
            .get(msg.key.as_str())
            .and_then(|e| e.value_str().map(String::from))
    }
}

impl Message<GetEntry> for StoreActor {
    type Reply = Option<Entry>;

    async fn handle(&mut self, msg: GetEntry, _: &mut Context<Self, Self::Reply>) -> Option<Entry> {
        self.map.get(msg.key.as_str()).map(|e| e.entry())
    }
}

impl Message<Snapshot> for StoreActor {
    type Reply = ListView;

    async fn handle(&mut self, _: Snapshot, _: &mut Context<Self, Self::Reply>) -> ListView {
        self.list_view()
    }
}

impl Message<Stats> for StoreActor {
    type Reply = StoreStats;

    async fn handle(&mut self, _: Stats, _: &mut Context<Self, Self::Reply>) -> StoreStats {
        let tombstones = self.map.iter().filter(|e| e.is_tombstone()).count();
        StoreStats {
            keys: self.map.len() - tombstones,
            tombstones,
            log_bytes: self.storage.as_ref().map_or(0, Storage::log_bytes),
        }
    }
}

/// Helpers for this crate's tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Entry, Write};
    use crate::version::{NodeId, Version};

    /// A write of `key` (`None` deletes) at version (`time`, `node`).
    pub fn write(key: &str, value: Option<&str>, time: u64, node: &str) -> Write {
        Write {
            key: key.into(),
            entry: Entry {
                value: value.map(Into::into),
                version: Version {
                    time,
                    node: NodeId::new(node).unwrap(),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use kameo::actor::Spawn;

    use super::*;

    fn store(node: &str) -> ActorRef<StoreActor> {
        StoreActor::spawn(StoreActor::new(Arc::new(Clock::new(
            NodeId::new(node).unwrap(),
        ))))
    }

    use super::testing::write;

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

    #[test]
    fn slots_hold_entries_exactly() {
        for (value, node) in [(Some("v"), "n1"), (Some(""), "node-2"), (None, "n1")] {
            let entry = write("k", value, 7, node).entry;
            let slot = Slot::new(&entry);
            assert_eq!(slot.entry(), entry);
            assert_eq!(slot.value_str(), value);
            assert_eq!(slot.is_tombstone(), value.is_none());
            assert_eq!(slot.version().node.as_str(), node);
        }
        // The point of the layout: a slot is a u64 and a boxed slice, nothing more.
        assert_eq!(std::mem::size_of::<Slot>(), 24);
    }

    #[test]
    fn only_old_tombstones_are_expired() {
        let tombstone = Slot::new(&write("k", None, 10, "n1").entry);
        let live = Slot::new(&write("k", Some("v"), 10, "n1").entry);
        assert!(tombstone.is_expired(Some(11)));
        assert!(!tombstone.is_expired(Some(10)));
        assert!(!tombstone.is_expired(None));
        assert!(!live.is_expired(Some(11)));
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
        assert!(s.ask(Snapshot).await.unwrap().collect().is_empty());
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

    #[tokio::test]
    async fn local_write_orders_after_an_applied_future_version() {
        // A peer's version far beyond our clock's drift bound: the clock refuses to jump, but
        // a local write of that key must still win over it.
        let s = store("n1");
        let far = u64::MAX / 2;
        apply(&s, write("k", Some("peer"), far, "n2")).await;
        let w = put(&s, "k", "mine").await;
        assert!(w.entry.version.time > far);
        assert_eq!(get(&s, "k").await.as_deref(), Some("mine"));
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
        let config = crate::storage::tests::config(life.path());
        let open = |config: &crate::StorageConfig| {
            let clock = Arc::new(Clock::new(NodeId::new("n1").unwrap()));
            StoreActor::spawn(StoreActor::recovered(
                clock,
                crate::Storage::open(config).unwrap(),
            ))
        };
        let far = crate::version::latest_acceptable()
            - crate::version::ntp_duration(std::time::Duration::from_secs(23 * 3600));

        let s = open(&config);
        s.ask(Apply(vec![write("k", Some("peer"), far, "n2")]))
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        copy_dir(life.path(), before_the_put.path());
        let lost = put(&s, "k", "lost").await;
        assert_eq!(
            lost.entry.version.time,
            far + 1,
            "bumped just above the peer's"
        );
        stop(s).await;

        // Restart from the data dir as it was before the lost write.
        let s = open(&crate::storage::tests::config(before_the_put.path()));
        let next = put(&s, "k", "after the restart").await;
        assert!(
            next.entry.version > lost.entry.version,
            "{} does not order after the lost {}",
            next.entry.version,
            lost.entry.version
        );
        // The peer's version 23 hours ahead did not move the clock: other keys' writes get
        // versions near physical time, not beyond the far one.
        let other = put(&s, "other", "v").await;
        let soon = crate::version::latest_acceptable()
            - crate::version::ntp_duration(std::time::Duration::from_secs(24 * 3600 - 60));
        assert!(
            other.entry.version.time < soon,
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
            .ask(Snapshot)
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
        let first = s.ask(Snapshot).await.unwrap();

        // The store goes on while the view is not yet copied: every kind of write.
        put(&s, "a", "new").await;
        s.ask(Delete { key: "b".into() }).await.unwrap();
        assert!(apply(&s, write("c", Some("peer"), u64::MAX - 1, "n2")).await);
        put(&s, "d", "back").await;
        put(&s, "e", "added").await;
        let second = s.ask(Snapshot).await.unwrap();
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
        assert_eq!(s.ask(Snapshot).await.unwrap().collect().len(), 6);
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
        let view = store.list_view();
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
        let held = map.determine_map(at.recv().unwrap().as_str());
        let (mut behind, mut ahead) = (0, 0);
        for i in 0..KEYS {
            for key in [format!("k{i:04}"), format!("new{i:04}")] {
                let stripe = map.determine_map(key.as_str());
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
        let copied = store.list_view();
        let dropped = store.list_view();
        store.write_local("k".into(), Some("v".into()));
        assert_eq!(copied.before.lock().unwrap().len(), 1);
        assert_eq!(dropped.before.lock().unwrap().len(), 1);
        assert_eq!(copied.collect(), []);
        drop(dropped);
        store.write_local("k".into(), Some("w".into()));
        assert!(store.views.is_empty(), "the next write forgets both");
        // Without writes, the next List forgets them.
        for _ in 0..100 {
            drop(store.list_view());
        }
        assert_eq!(store.views.len(), 1, "one husk at most, the last List's");
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
        let view = s.ask(Snapshot).await.unwrap();
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
}
