//! Consistent views of the map for `List`, copied outside the store actor while it goes on
//! writing.
//!
//! Copying a million keys takes about a second. Done inside the actor, that stalled every write
//! and read of the node (and the peers replicating to it) for as long. Instead the actor only
//! registers a [`ListView`], and until the copy is done it saves, before it writes a key for
//! the first time since, what the key held ([`Views::save_pre_image`]). The copy walks the map
//! one lock stripe at a time and takes a key's saved pre-image where there is one:
//! - a key written before the copy reached it has a pre-image, saved before the write;
//! - a key written after has none yet when the copy reads it, and the write waits for the
//!   copy to leave the key's stripe (the copy holds the stripe's read lock while it reads the
//!   slot and looks for a pre-image), so what the copy read is what the key held.
//!
//! Either way the copy is the map at the instant of registration, a consistent cut, and the
//! actor waits at most for one stripe's worth of copying (1/64 of the map), not the whole map.
//!
//! A List need not copy the values at all: [`ListView::sorted_keys`] copies the keys, and
//! [`ListView::read`] reads values a chunk at a time as the client takes them, by the same rule.
//! The view then lives as long as the List streams, and what it holds beyond the keys is the
//! pre-images of the keys written meanwhile that it has not read yet: once it has read up to
//! a key ([`ListView::read_through`]), writes to the keys before stop saving for it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::entry::{Map, Slot, Write};

/// What a [`ListView`] needs saved for it.
#[derive(Default)]
struct Saved {
    /// What keys held when the view was taken, for those written since: `None` if absent.
    before: BTreeMap<Box<str>, Option<Slot>>,
    /// Keys up to this one have been read for good (a List reads in key order): writes to
    /// them need save nothing more for this view, and what was saved for them is let go.
    read_through: Option<Box<str>>,
}

type PreImages = Mutex<Saved>;

/// The views whose copies are still running, as the store actor keeps them. Weak, so a copy
/// that finished (or was dropped) stops costing anything at the next write.
#[derive(Default)]
pub struct Views(Vec<Weak<PreImages>>);

impl Views {
    /// A view of `map` as of now, registered so that writes save pre-images for it.
    pub fn register(&mut self, map: &Arc<Map>) -> ListView {
        let before = Arc::new(Mutex::new(Saved::default()));
        // Dropped views are also cleared here, not only on writes: a node that serves Lists
        // and takes no writes would otherwise keep a husk per List.
        self.0.retain(|view| view.strong_count() > 0);
        self.0.push(Arc::downgrade(&before));
        ListView {
            map: map.clone(),
            before,
        }
    }

    /// Call before changing `key` in `map`: saves what it holds for every view still copying
    /// that has not seen it written yet.
    pub fn save_pre_image(&mut self, map: &Map, key: &str) {
        if self.0.is_empty() {
            return;
        }
        self.0.retain(|view| view.strong_count() > 0);
        // Read before taking a view's lock: the copy takes the two the other way round.
        let current = map.get(key).map(|slot| slot.clone());
        for view in self.0.iter().filter_map(Weak::upgrade) {
            // Poisoned only if a copy panicked: the store must go on regardless.
            let mut saved = view.lock().unwrap_or_else(PoisonError::into_inner);
            let read = (saved.read_through.as_deref()).is_some_and(|through| key <= through);
            if !read && !saved.before.contains_key(key) {
                saved.before.insert(key.into(), current.clone());
            }
        }
    }

    /// Views still registered (some may be done, until the next write clears them).
    #[cfg(test)]
    pub(crate) fn registered(&self) -> usize {
        self.0.len()
    }
}

/// A `List`'s view of the map as of the moment the store actor took it, to be copied outside
/// the actor (see the module's doc).
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
    pub(crate) fn collect_pausing(self, mut after: impl FnMut(&str)) -> Vec<(String, String)> {
        let mut pairs = Vec::with_capacity(self.map.len());
        for item in self.map.iter() {
            let before = self.before.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = match before.before.get(item.key()) {
                Some(saved) => saved.as_ref(),
                None => Some(&*item),
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

    /// Every key in the map now, sorted: with [`ListView::read`], a List that holds the keys
    /// and reads each value as its turn to be sent comes, rather than a copy of every value.
    /// Keys written since the view was taken are among them, and [`ListView::read`] skips
    /// those that did not exist then. Blocking work: run it off the async workers.
    pub fn sorted_keys(&self) -> Vec<Box<str>> {
        let mut keys: Vec<Box<str>> = self.map.iter().map(|item| item.key().into()).collect();
        // A key taken out of the map since the view was taken (a purged tombstone, an expired
        // entry) is no longer met by the walk, but its pre-image was saved before it went.
        // Read after the walk, so a key removed while it ran is caught one way or the other.
        let before = self.before.lock().unwrap_or_else(PoisonError::into_inner);
        keys.extend(before.before.keys().cloned());
        drop(before);
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The live pairs of `keys` as the view sees them: what each held when the view was taken.
    pub fn read(&self, keys: &[Box<str>]) -> Vec<(String, String)> {
        let mut pairs = Vec::with_capacity(keys.len());
        for key in keys {
            self.with_slot(key, |slot| {
                if let Some(value) = slot.and_then(Slot::value_str) {
                    pairs.push((key.to_string(), value.to_string()));
                }
            });
        }
        pairs
    }

    /// The entries of `keys` as the view sees them, tombstones included (but those expired
    /// before `expired_before`), each with its version: what a backup holds.
    pub fn read_entries(&self, keys: &[Box<str>], expired_before: Option<u64>) -> Vec<Write> {
        let mut writes = Vec::with_capacity(keys.len());
        for key in keys {
            self.with_slot(key, |slot| {
                if let Some(slot) = slot.filter(|slot| !slot.is_expired(expired_before)) {
                    writes.push(Write {
                        key: key.to_string(),
                        entry: slot.entry(),
                    });
                }
            });
        }
        writes
    }

    /// Calls `f` with what `key` held when the view was taken (None: absent).
    fn with_slot(&self, key: &str, f: impl FnOnce(Option<&Slot>)) {
        // The key's stripe is read-locked while its pre-image is looked up, as in `collect`:
        // a write to it waits, so what is read is what the key held.
        let current = self.map.get(key);
        let before = self.before.lock().unwrap_or_else(PoisonError::into_inner);
        match before.before.get(key) {
            Some(saved) => f(saved.as_ref()),
            None => f(current.as_deref()),
        }
    }

    /// Says that every key up to `key` has been read for good: writes to them stop saving
    /// pre-images for this view, and those saved are let go.
    pub fn read_through(&self, key: &str) {
        let mut saved = self.before.lock().unwrap_or_else(PoisonError::into_inner);
        let mut after = saved.before.split_off(key);
        after.remove(key);
        saved.before = after;
        saved.read_through = Some(key.into());
    }

    /// Keys saved for this view and not yet let go.
    pub fn saved(&self) -> usize {
        self.before.lock().unwrap().before.len()
    }
}
