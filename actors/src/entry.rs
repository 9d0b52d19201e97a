//! What a node keeps per key, and the order in which writes of one key win: the types the store,
//! the log and replication all share.
//!
//! - [`Write`]: one versioned write of one key, as it travels between nodes and into the log.
//! - [`Entry`]: a value (or a tombstone) and its version.
//! - [`Slot`]: a key and its entry as the map keeps them: one pointer to one allocation.
//! - [`Map`]: the map of slots a store keeps.
//! - [`precedence`]: last-writer-wins, with a rule for the tie that should never happen.
//! - [`expired`]: when a tombstone is past its grace period.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::ptr::NonNull;

use dashmap::DashMap;
use dashmap::mapref::{entry::Entry as MapEntry, multiple::RefMulti, one::Ref};

use crate::version::{NodeId, Version};

/// The map a store keeps: every key with its entry, as a [`Slot`] each. Hashed with aHash under
/// a per-process random seed: clients choose the keys.
///
/// Only the store actor changes it (recovery aside, before the actor exists); readers go
/// straight to it. A slot holds its key, so the table holds one pointer per key and nothing
/// else (see [`Slot`]).
pub struct Map(DashMap<Slot, (), ahash::RandomState>);

/// A slot of the map, read-locked in its shard while held.
pub struct Held<G>(G);

impl Deref for Held<Ref<'_, Slot, ()>> {
    type Target = Slot;

    fn deref(&self) -> &Slot {
        self.0.key()
    }
}

impl Deref for Held<RefMulti<'_, Slot, ()>> {
    type Target = Slot;

    fn deref(&self) -> &Slot {
        self.0.key()
    }
}

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
    map_with_capacity(0)
}

/// An empty map with room for about `entries` without growing. Growing rehashes every key,
/// and a slot's key is behind its pointer: a read from memory per key moved.
pub fn map_with_capacity(entries: usize) -> Map {
    Map(DashMap::with_capacity_and_hasher_and_shard_amount(
        entries,
        ahash::RandomState::new(),
        MAP_SHARDS,
    ))
}

/// What [`Map::put_if`] did.
#[derive(Debug)]
pub enum Put {
    /// The key was absent.
    Added,
    /// The key's slot was replaced; here is the one it held.
    Replaced(Slot),
    /// The key's slot was kept; the new one was let go.
    Kept,
}

impl Map {
    /// The slot of `key`, its shard read-locked while held.
    pub fn get(&self, key: &str) -> Option<Held<Ref<'_, Slot, ()>>> {
        self.0.get(key).map(Held)
    }

    /// Puts `slot` in, in place of the one its key held (returned).
    pub fn put(&self, slot: Slot) -> Option<Slot> {
        match self.put_if(slot, |_| true) {
            Put::Replaced(old) => Some(old),
            Put::Added | Put::Kept => None,
        }
    }

    /// Puts `slot` in if its key is absent, or if `replace` says so of the slot it holds, with
    /// one lookup.
    pub fn put_if(&self, slot: Slot, replace: impl FnOnce(&Slot) -> bool) -> Put {
        match self.0.entry(slot) {
            // The map's own insert would keep the old key, and with it the old entry: the
            // whole slot is the key here, so it is replaced whole.
            MapEntry::Occupied(held) if replace(held.key()) => {
                Put::Replaced(held.replace_entry(()).0)
            }
            MapEntry::Occupied(_) => Put::Kept,
            MapEntry::Vacant(vacant) => {
                vacant.insert(());
                Put::Added
            }
        }
    }

    /// Takes `key` out; returns its slot.
    pub fn remove(&self, key: &str) -> Option<Slot> {
        self.0.remove(key).map(|(slot, ())| slot)
    }

    /// Takes `key` out if `remove` says so of its slot; returns the slot.
    pub fn remove_if(&self, key: &str, remove: impl FnOnce(&Slot) -> bool) -> Option<Slot> {
        self.0
            .remove_if(key, |slot, ()| remove(slot))
            .map(|(slot, ())| slot)
    }

    /// Every slot, each read-locked in its shard while held.
    pub fn iter(&self) -> impl Iterator<Item = Held<RefMulti<'_, Slot, ()>>> {
        self.0.iter().map(Held)
    }

    /// Slots, tombstones included.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Gives back the room held beyond what the slots need.
    pub fn shrink_to_fit(&self) {
        self.0.shrink_to_fit();
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The lock shard `key` falls in.
    #[cfg(test)]
    pub(crate) fn shard_of(&self, key: &str) -> usize {
        self.0.determine_map(key)
    }

    /// Write-locks the shard of `key` for as long as the guard is held, as a write to it would.
    #[cfg(test)]
    pub(crate) fn lock_shard_of(&self, key: &str) -> impl Sized + '_ {
        self.0.get_mut(key).expect("a key in the map")
    }
}

/// Calls `f` with every slot of `map`, one lock shard at a time, and `after_shard` after each
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
    for shard in map.0.shards() {
        {
            let table = shard.read();
            // SAFETY: `table` holds the shard's read lock for as long as the iteration runs,
            // so the table it walks is neither changed nor freed meanwhile, and every bucket it
            // yields is full and valid until the lock is released.
            unsafe {
                for bucket in table.iter() {
                    let (slot, _) = bucket.as_ref();
                    f(state, slot.key(), slot);
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
/// Where the version time sits in a slot's bytes: after the node word.
const TIME_AT: usize = 4;
/// Where the key's length sits, then the value's (u32 each).
const KEY_LEN_AT: usize = TIME_AT + 8;
const VALUE_LEN_AT: usize = KEY_LEN_AT + 4;
/// Bytes of a slot before the key: the node word, the version time and the two lengths.
const SLOT_HEADER: usize = VALUE_LEN_AT + 4;

/// A key and its [`Entry`] as the map keeps them: 8 bytes in the table (one pointer) and one
/// allocation holding the version, the key and the value. At a million keys the hash table has
/// about two million buckets, so every byte of bucket costs about two bytes per key, while a
/// byte in the allocation costs one, or nothing when it fits the allocator's rounding. The
/// table once held a boxed key and a boxed slice (32 bytes), and the key was an allocation of
/// its own; bench/README.md has what each layout cost.
///
/// The map hashes and compares a slot by its key alone, so that it can be looked up by a
/// `&str`: two slots are equal when their keys are, whatever their entries.
pub struct Slot(NonNull<u8>);

// SAFETY: a slot owns its allocation, as a `Box<[u8]>` would, and never changes it after it is
// made: sharing or sending it is sharing or sending immutable bytes.
unsafe impl Send for Slot {}
unsafe impl Sync for Slot {}

impl Slot {
    /// The slot holding `entry` under `key`.
    pub fn new(key: &str, entry: &Entry) -> Self {
        Self::of(key, entry.version, entry.value.as_deref())
    }

    /// The slot holding `value` (`None` for a tombstone) under `key` and `version`.
    pub fn of(key: &str, version: Version, value: Option<&str>) -> Self {
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
        // Keys and values arrive in messages, which are far below 4 GiB.
        let length = |s: &str| u32::try_from(s.len()).expect("keys and values fit a u32 length");
        let mut bytes = Vec::with_capacity(SLOT_HEADER + key.len() + value.len());
        bytes.extend_from_slice(&word.to_le_bytes());
        bytes.extend_from_slice(&version.time.to_le_bytes());
        bytes.extend_from_slice(&length(key).to_le_bytes());
        bytes.extend_from_slice(&length(value).to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(value.as_bytes());
        let bytes: *mut [u8] = Box::into_raw(bytes.into_boxed_slice());
        Self(NonNull::new(bytes.cast()).expect("a box is never null"))
    }

    fn header(&self) -> &[u8; SLOT_HEADER] {
        // SAFETY: every slot's allocation starts with a whole header, and lives as long as
        // `self`; bytes have no alignment.
        unsafe { &*self.0.as_ptr().cast::<[u8; SLOT_HEADER]>() }
    }

    fn u32_at(&self, at: usize) -> u32 {
        let mut word = [0; 4];
        word.copy_from_slice(&self.header()[at..at + 4]);
        u32::from_le_bytes(word)
    }

    fn key_len(&self) -> usize {
        self.u32_at(KEY_LEN_AT) as usize
    }

    fn value_len(&self) -> usize {
        self.u32_at(VALUE_LEN_AT) as usize
    }

    /// The whole allocation.
    fn bytes(&self) -> &[u8] {
        let len = SLOT_HEADER + self.key_len() + self.value_len();
        // SAFETY: the allocation is exactly the header and the two lengths it gives (see
        // `of`), and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), len) }
    }

    fn word(&self) -> u32 {
        self.u32_at(0)
    }

    fn time(&self) -> u64 {
        let mut time = [0; 8];
        time.copy_from_slice(&self.header()[TIME_AT..KEY_LEN_AT]);
        u64::from_le_bytes(time)
    }

    /// The key.
    pub fn key(&self) -> &str {
        let key = &self.bytes()[SLOT_HEADER..SLOT_HEADER + self.key_len()];
        // SAFETY: these bytes were copied from a `str` (see `of`) and never change.
        unsafe { std::str::from_utf8_unchecked(key) }
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
            let value = &self.bytes()[SLOT_HEADER + self.key_len()..];
            // SAFETY: these bytes were copied from a `str` (see `of`) and never change.
            unsafe { std::str::from_utf8_unchecked(value) }
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

impl Drop for Slot {
    fn drop(&mut self) {
        let bytes = std::ptr::slice_from_raw_parts_mut(self.0.as_ptr(), self.bytes().len());
        // SAFETY: the pointer and length are those of the box made in `of`, dropped once.
        drop(unsafe { Box::from_raw(bytes) });
    }
}

impl Clone for Slot {
    fn clone(&self) -> Self {
        let bytes: *mut [u8] = Box::into_raw(Box::<[u8]>::from(self.bytes()));
        Self(NonNull::new(bytes.cast()).expect("a box is never null"))
    }
}

/// By key: see [`Slot`].
impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Slot {}

/// By key, as the `str` it borrows as hashes.
impl Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl Borrow<str> for Slot {
    fn borrow(&self) -> &str {
        self.key()
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Slot")
            .field(&self.key())
            .field(&self.entry())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::write;

    #[test]
    fn slots_hold_keys_and_entries_exactly() {
        let long = "x".repeat(70_000);
        for (key, value, node) in [
            ("k", Some("v"), "n1"),
            ("", Some(""), "node-2"),
            ("gone", None, "n1"),
            ("ключ", Some("значение"), "n3"),
            (long.as_str(), Some(long.as_str()), "n1"),
        ] {
            let entry = write(key, value, 7, node).entry;
            let slot = Slot::new(key, &entry);
            assert_eq!(slot.key(), key);
            assert_eq!(slot.entry(), entry);
            assert_eq!(slot.value_str(), value);
            assert_eq!(slot.is_tombstone(), value.is_none());
            assert_eq!(slot.version().node.as_str(), node);
            let copy = slot.clone();
            drop(slot);
            assert_eq!(
                (copy.key(), copy.entry()),
                (key, entry),
                "a clone stands alone"
            );
        }
        // The point of the layout: the table holds a pointer, nothing more.
        assert_eq!(std::mem::size_of::<Slot>(), 8);
    }

    #[test]
    fn the_map_finds_a_slot_by_its_key_and_replaces_it_whole() {
        let map = new_map();
        let slot = |key: &str, value, time| Slot::new(key, &write(key, value, time, "n1").entry);
        assert!(map.is_empty());
        assert!(map.put(slot("a", Some("1"), 1)).is_none());
        assert!(!map.is_empty());
        assert!(map.put(slot("b", Some("2"), 1)).is_none());
        let old = map.put(slot("a", Some("one"), 2)).expect("a was there");
        assert_eq!((old.key(), old.value_str()), ("a", Some("1")));
        // The slot in the map is the new one, key and entry, not the old key with a new value.
        let held = map.get("a").unwrap();
        assert_eq!((held.value_str(), held.version().time), (Some("one"), 2));
        drop(held);
        assert_eq!(map.len(), 2);
        // put_if looks at what the key holds before replacing it.
        let newer = |held: &Slot| held.version().time < 3;
        assert!(matches!(
            map.put_if(slot("a", Some("x"), 3), newer),
            Put::Replaced(_)
        ));
        assert!(matches!(
            map.put_if(slot("a", Some("y"), 3), newer),
            Put::Kept
        ));
        assert!(matches!(map.put_if(slot("c", None, 1), newer), Put::Added));
        assert_eq!(map.get("a").unwrap().value_str(), Some("x"));
        assert!(map.get("c").unwrap().is_tombstone());
        assert!(map.get("z").is_none());
        // remove_if looks at the slot too.
        assert!(map.remove_if("b", |s| s.is_tombstone()).is_none());
        assert_eq!(map.remove_if("c", |s| s.is_tombstone()).unwrap().key(), "c");
        assert_eq!(map.remove("b").unwrap().value_str(), Some("2"));
        assert!(map.remove("b").is_none());
        let keys: Vec<String> = map.iter().map(|s| s.key().to_owned()).collect();
        assert_eq!(keys, ["a"]);
    }

    #[test]
    fn a_shard_scan_sees_every_entry_once_and_can_stop() {
        let map = new_map();
        for i in 0..1000 {
            let w = write(&format!("k{i}"), Some("v"), i, "n1");
            map.put(Slot::new(&w.key, &w.entry));
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
            let slot = Slot::new("k", &entry);
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
        let slot = |value, time| Slot::new("k", &write("k", value, time, "n1").entry);
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
