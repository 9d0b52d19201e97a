//! What a node keeps per key, and the order in which writes of one key win: the types the store,
//! the log and replication all share.
//!
//! - [`Write`]: one versioned write of one key, as it travels between nodes and into the log.
//! - [`Entry`]: a value (or a tombstone) and its version.
//! - [`Slot`]: an entry as the map keeps it, packed into 16 bytes and one allocation.
//! - [`precedence`]: last-writer-wins, with a rule for the tie that should never happen.
//! - [`expired`]: when a tombstone is past its grace period.

use dashmap::DashMap;

use crate::version::{NodeId, Version};

/// The map a store keeps: key to [`Slot`]. Keys are boxed `str`s rather than `String`s, 8
/// bytes less each. Hashed with aHash under a per-process random seed: clients choose the keys.
pub type Map = DashMap<Box<str>, Slot, ahash::RandomState>;

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
    Map::with_hasher_and_shard_amount(ahash::RandomState::new(), MAP_SHARDS)
}

/// Calls `f` with every entry of `map`, one lock shard at a time, and `after_shard` after each
/// shard, its lock released; both get `state`. What a scan gathered from a shard can go to
/// someone slow (a peer, over the network) without holding up the writers to that shard, and
/// the scan holds no more than a shard's worth at once. `after_shard` returning `Break` ends
/// the scan. Like any walk of a map that changes underneath, it sees each key once, as of when
/// it reached the key's shard.
pub fn scan_shards<S>(
    map: &Map,
    state: &mut S,
    mut f: impl FnMut(&mut S, &str, &Slot),
    mut after_shard: impl FnMut(&mut S) -> std::ops::ControlFlow<()>,
) {
    for shard in map.shards() {
        {
            let table = shard.read();
            // SAFETY: `table` holds the shard's read lock for as long as the iteration runs,
            // so the table it walks is neither changed nor freed meanwhile, and every bucket it
            // yields is full and valid until the lock is released.
            unsafe {
                for bucket in table.iter() {
                    let (key, slot) = bucket.as_ref();
                    f(state, key, slot.get());
                }
            }
        }
        if after_shard(state).is_break() {
            return;
        }
    }
}

/// One versioned write of one key: what replicates between nodes.
#[derive(Clone, Debug, PartialEq, Eq, kameo::Reply)]
pub struct Write {
    pub key: String,
    pub entry: Entry,
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

    /// Whether this is a tombstone past its grace period ([`expired`]).
    pub fn is_expired(&self, before: Option<u64>) -> bool {
        expired(self.value.is_none(), self.version.time, before)
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

/// Whether an entry is a tombstone whose version time is below `before`: past its grace
/// period, so it may be purged, and must not be taken back from a peer that has not purged it
/// yet (the two would trade it for ever). `None` means tombstones never expire (a store that
/// keeps nothing on disk never compacts).
pub fn expired(tombstone: bool, time: u64, before: Option<u64>) -> bool {
    tombstone && before.is_some_and(|t| time < t)
}

/// Set in a slot's node word for a tombstone (interned node ids stay far below it).
const TOMBSTONE: u32 = 1 << 31;
/// Where the version time sits in a slot's blob: after the node word.
const TIME_AT: usize = 4;
/// Bytes of a slot's blob before the value: the node word and the version time.
const SLOT_HEADER: usize = TIME_AT + 8;

/// An [`Entry`] as the map keeps it: 16 bytes in the table (one boxed slice) plus one
/// allocation holding the version and the value. At a million keys the hash table has about
/// two million slots, so every byte of slot costs about two bytes per key, while a header in the
/// allocation costs one byte, or nothing when it fits the allocator's rounding. Against an
/// `Entry` (32 bytes; 40 when node ids were `Arc<str>`) this layout took a node from 273 to
/// 231 bytes of RSS per key at 1M keys, with the time in the table (24 bytes); see
/// bench/README.md for what moving it into the allocation bought.
#[derive(Clone, PartialEq, Eq)]
pub struct Slot {
    /// The node word (little-endian [`NodeId::to_bits`], with [`TOMBSTONE`] for a deletion),
    /// the version time (little-endian), then the value's bytes, always UTF-8.
    blob: Box<[u8]>,
}

impl Slot {
    /// The slot holding `entry`.
    pub fn new(entry: &Entry) -> Self {
        Self::of(entry.version, entry.value.as_deref())
    }

    /// The slot holding `value` (`None` for a tombstone) under `version`.
    pub fn of(version: Version, value: Option<&str>) -> Self {
        let tombstone = value.is_none();
        let value = value.unwrap_or("");
        let bits = version.node.to_bits();
        // Would take 2^31 distinct node ids in one process: memory runs out long before.
        debug_assert_eq!(
            bits & TOMBSTONE,
            0,
            "node id handle collides with the tombstone bit"
        );
        let word = bits | if tombstone { TOMBSTONE } else { 0 };
        let mut blob = Vec::with_capacity(SLOT_HEADER + value.len());
        blob.extend_from_slice(&word.to_le_bytes());
        blob.extend_from_slice(&version.time.to_le_bytes());
        blob.extend_from_slice(value.as_bytes());
        Self {
            blob: blob.into_boxed_slice(),
        }
    }

    fn word(&self) -> u32 {
        let mut word = [0; TIME_AT];
        word.copy_from_slice(&self.blob[..TIME_AT]);
        u32::from_le_bytes(word)
    }

    fn time(&self) -> u64 {
        let mut time = [0; SLOT_HEADER - TIME_AT];
        time.copy_from_slice(&self.blob[TIME_AT..SLOT_HEADER]);
        u64::from_le_bytes(time)
    }

    /// The version of the write that produced this entry.
    pub fn version(&self) -> Version {
        Version {
            time: self.time(),
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
        self.loses_to_parts(entry.version, entry.value.as_deref())
    }

    /// [`Self::loses_to`] for a write given as its parts.
    pub fn loses_to_parts(&self, version: Version, value: Option<&str>) -> bool {
        match version.cmp(&self.version()) {
            std::cmp::Ordering::Equal => {
                precedence(version, value) > precedence(self.version(), self.value_str())
            }
            order => order.is_gt(),
        }
    }

    /// Whether this is a tombstone past its grace period ([`expired`]).
    pub fn is_expired(&self, before: Option<u64>) -> bool {
        expired(self.is_tombstone(), self.time(), before)
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.entry().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::write;

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
        // The point of the layout: a slot is a boxed slice, nothing more.
        assert_eq!(std::mem::size_of::<Slot>(), 16);
    }

    #[test]
    fn a_shard_scan_sees_every_entry_once_and_can_stop() {
        let map = new_map();
        for i in 0..1000 {
            let w = write(&format!("k{i}"), Some("v"), i, "n1");
            map.insert(w.key.into(), Slot::new(&w.entry));
        }
        let mut shards = 0;
        let mut seen = Vec::new();
        scan_shards(
            &map,
            &mut seen,
            |seen, key, slot| seen.push((key.to_string(), slot.version().time)),
            |_| {
                shards += 1;
                std::ops::ControlFlow::Continue(())
            },
        );
        assert_eq!(shards, MAP_SHARDS);
        seen.sort();
        let mut all: Vec<(String, u64)> = (0..1000).map(|i| (format!("k{i}"), i)).collect();
        all.sort();
        assert_eq!(seen, all);
        // Stopped after the first shard: a shard's worth, no more.
        let mut first = 0;
        scan_shards(
            &map,
            &mut first,
            |first, _, _| *first += 1,
            |_| std::ops::ControlFlow::Break(()),
        );
        assert!(first > 0 && first < 1000, "{first}");
    }

    #[test]
    fn only_tombstones_older_than_the_grace_are_expired() {
        for (value, expires) in [(None, true), (Some("v"), false)] {
            let entry = write("k", value, 10, "n1").entry;
            let slot = Slot::new(&entry);
            for (before, past) in [(Some(11), expires), (Some(10), false), (None, false)] {
                assert_eq!(
                    entry.is_expired(before),
                    past,
                    "{value:?} before {before:?}"
                );
                assert_eq!(slot.is_expired(before), past, "{value:?} before {before:?}");
            }
        }
    }

    #[test]
    fn the_newer_version_wins_and_a_tie_goes_to_the_tombstone_then_the_greater_value() {
        let slot = |value, time| Slot::new(&write("k", value, time, "n1").entry);
        let entry = |value, time| write("k", value, time, "n1").entry;
        assert!(slot(Some("b"), 1).loses_to(&entry(Some("a"), 2)));
        assert!(!slot(Some("a"), 2).loses_to(&entry(Some("b"), 1)));
        assert!(slot(Some("z"), 5).loses_to(&entry(None, 5)));
        assert!(!slot(None, 5).loses_to(&entry(Some("z"), 5)));
        assert!(slot(Some("a"), 5).loses_to(&entry(Some("b"), 5)));
        assert!(!slot(Some("b"), 5).loses_to(&entry(Some("a"), 5)));
        assert!(
            !slot(Some("a"), 5).loses_to(&entry(Some("a"), 5)),
            "equal is not newer"
        );
    }
}
