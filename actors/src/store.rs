//! The store actor: the one owner of a node's key-value map.
//!
//! Every change to the map goes through this actor's mailbox, so writes are applied one at a
//! time and a version decision (is this entry newer?) never races another write of the same key.
//! The map itself is a `DashMap` so that taking a snapshot for `List` is a cheap, lock-striped
//! walk rather than a copy under one big lock.

use std::sync::Arc;

use dashmap::DashMap;
use kameo::Actor;
use kameo::message::{Context, Message};

use crate::version::{Clock, Version};

/// What the store keeps per key: the value, or `None` for a tombstone, and its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// `None` marks a deleted key. Tombstones stay so that an older Put arriving late cannot
    /// resurrect the key.
    pub value: Option<String>,
    /// The version of the write that produced this entry.
    pub version: Version,
}

/// One versioned write of one key: what replicates between nodes.
#[derive(Clone, Debug, PartialEq, Eq, kameo::Reply)]
pub struct Write {
    pub key: String,
    pub entry: Entry,
}

/// The store actor. Its state is the map and the node's clock.
#[derive(Actor)]
pub struct StoreActor {
    map: DashMap<String, Entry>,
    clock: Arc<Clock>,
}

impl StoreActor {
    /// An empty store whose local writes are versioned by `clock`.
    pub fn new(clock: Arc<Clock>) -> Self {
        Self {
            map: DashMap::new(),
            clock,
        }
    }

    /// Stores a local write (`value = None` deletes) under a fresh version and returns it.
    fn write_local(&mut self, key: String, value: Option<String>) -> Write {
        let mut version = self.clock.now();
        if let Some(current) = self.map.get(&key) {
            // The clock has normally moved past every version we applied. It has not if a peer's
            // version was too far ahead to observe; then order this write after it anyway, since
            // a local write the user just made must not be shadowed by one they made earlier.
            if current.version >= version {
                version.time = current.version.time + 1;
            }
        }
        let entry = Entry { value, version };
        self.map.insert(key.clone(), entry.clone());
        Write { key, entry }
    }

    /// Applies `write` if it is newer than what the map holds. Returns whether it changed the map.
    fn apply(&mut self, write: Write) -> bool {
        self.clock.observe(&write.entry.version);
        match self.map.entry(write.key) {
            dashmap::Entry::Occupied(mut slot) => {
                if write.entry.version > slot.get().version {
                    slot.insert(write.entry);
                    true
                } else {
                    false
                }
            }
            dashmap::Entry::Vacant(slot) => {
                slot.insert(write.entry);
                true
            }
        }
    }
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

/// Apply a write that another node made. Replies true if it was newer than what we had.
#[derive(Debug)]
pub struct Apply(pub Write);

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

/// Take a consistent snapshot of every live pair, in key order.
#[derive(Debug)]
pub struct Snapshot;

/// Count live keys.
#[derive(Debug)]
pub struct Len;

impl Message<Put> for StoreActor {
    type Reply = Write;

    async fn handle(&mut self, msg: Put, _: &mut Context<Self, Self::Reply>) -> Write {
        self.write_local(msg.key, Some(msg.value))
    }
}

impl Message<Delete> for StoreActor {
    type Reply = Write;

    async fn handle(&mut self, msg: Delete, _: &mut Context<Self, Self::Reply>) -> Write {
        self.write_local(msg.key, None)
    }
}

impl Message<Apply> for StoreActor {
    type Reply = bool;

    async fn handle(&mut self, msg: Apply, _: &mut Context<Self, Self::Reply>) -> bool {
        self.apply(msg.0)
    }
}

impl Message<Get> for StoreActor {
    type Reply = Option<String>;

    async fn handle(&mut self, msg: Get, _: &mut Context<Self, Self::Reply>) -> Option<String> {
        self.map.get(&msg.key).and_then(|e| e.value.clone())
    }
}

impl Message<GetEntry> for StoreActor {
    type Reply = Option<Entry>;

    async fn handle(&mut self, msg: GetEntry, _: &mut Context<Self, Self::Reply>) -> Option<Entry> {
        self.map.get(&msg.key).map(|e| e.clone())
    }
}

impl Message<Snapshot> for StoreActor {
    type Reply = Vec<(String, String)>;

    async fn handle(&mut self, _: Snapshot, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        // The actor handles one message at a time, so no write lands while we walk the map:
        // the copy is a consistent cut. Writers wait only for the walk, never for the client
        // that then reads the copy at its own pace.
        let mut pairs: Vec<(String, String)> = self
            .map
            .iter()
            .filter_map(|e| e.value.clone().map(|v| (e.key().clone(), v)))
            .collect();
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        pairs
    }
}

impl Message<Len> for StoreActor {
    type Reply = usize;

    async fn handle(&mut self, _: Len, _: &mut Context<Self, Self::Reply>) -> usize {
        self.map.iter().filter(|e| e.value.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use kameo::actor::{ActorRef, Spawn};

    use super::*;

    fn store(node: &str) -> ActorRef<StoreActor> {
        StoreActor::spawn(StoreActor::new(Arc::new(Clock::new(node.into()))))
    }

    fn write(key: &str, value: Option<&str>, time: u64, node: &str) -> Write {
        Write {
            key: key.into(),
            entry: Entry {
                value: value.map(Into::into),
                version: Version {
                    time,
                    node: node.into(),
                },
            },
        }
    }

    async fn get(s: &ActorRef<StoreActor>, key: &str) -> Option<String> {
        s.ask(Get { key: key.into() }).await.unwrap()
    }

    #[tokio::test]
    async fn put_then_get_and_versions_increase() {
        let s = store("n1");
        let w1 = s
            .ask(Put {
                key: "k".into(),
                value: "a".into(),
            })
            .await
            .unwrap();
        let w2 = s
            .ask(Put {
                key: "k".into(),
                value: "b".into(),
            })
            .await
            .unwrap();
        assert!(w2.entry.version > w1.entry.version);
        assert_eq!(&*w2.entry.version.node, "n1");
        assert_eq!(get(&s, "k").await.as_deref(), Some("b"));
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
                s.ask(Apply(writes[i].clone())).await.unwrap();
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
        assert!(s.ask(Apply(write("k", Some("b"), 5, "b"))).await.unwrap());
        assert!(!s.ask(Apply(write("k", Some("a"), 5, "a"))).await.unwrap());
        assert_eq!(get(&s, "k").await.as_deref(), Some("b"));
    }

    #[tokio::test]
    async fn apply_is_idempotent() {
        let s = store("n1");
        let w = write("k", Some("v"), 7, "n2");
        assert!(s.ask(Apply(w.clone())).await.unwrap());
        assert!(!s.ask(Apply(w.clone())).await.unwrap());
        let entry = s.ask(GetEntry { key: "k".into() }).await.unwrap();
        assert_eq!(entry, Some(w.entry));
    }

    #[tokio::test]
    async fn tombstones_hide_keys_and_beat_older_puts() {
        let s = store("n1");
        s.ask(Apply(write("k", Some("v"), 10, "n2"))).await.unwrap();
        assert!(s.ask(Apply(write("k", None, 20, "n2"))).await.unwrap());
        assert_eq!(get(&s, "k").await, None);
        // A Put older than the delete arrives late: the key stays deleted.
        assert!(
            !s.ask(Apply(write("k", Some("late"), 15, "n3")))
                .await
                .unwrap()
        );
        assert_eq!(get(&s, "k").await, None);
        assert!(s.ask(Snapshot).await.unwrap().is_empty());
        assert_eq!(s.ask(Len).await.unwrap(), 0);
        // A newer Put does bring the key back: delete is not forever, it is ordered.
        assert!(
            s.ask(Apply(write("k", Some("again"), 30, "n3")))
                .await
                .unwrap()
        );
        assert_eq!(get(&s, "k").await.as_deref(), Some("again"));
    }

    #[tokio::test]
    async fn local_delete_writes_a_tombstone() {
        let s = store("n1");
        s.ask(Put {
            key: "k".into(),
            value: "v".into(),
        })
        .await
        .unwrap();
        let w = s.ask(Delete { key: "k".into() }).await.unwrap();
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
        s.ask(Apply(write("k", Some("peer"), far, "n2")))
            .await
            .unwrap();
        let w = s
            .ask(Put {
                key: "k".into(),
                value: "mine".into(),
            })
            .await
            .unwrap();
        assert!(w.entry.version.time > far);
        assert_eq!(get(&s, "k").await.as_deref(), Some("mine"));
    }

    #[tokio::test]
    async fn snapshot_is_in_key_order() {
        let s = store("n1");
        for k in ["b", "c", "a", "aa"] {
            s.ask(Put {
                key: k.into(),
                value: k.to_uppercase(),
            })
            .await
            .unwrap();
        }
        let keys: Vec<String> = s
            .ask(Snapshot)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(keys, ["a", "aa", "b", "c"]);
    }
}
