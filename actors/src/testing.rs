//! Helpers for this crate's tests: writes made to order, and a scripted peer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::antientropy;
use crate::entry::{Entry, Write};
use crate::peer::{PeerClient, PeerError, Pulled};
use crate::placement::PartitionSet;
use crate::version::{NodeId, Version};
use futures::StreamExt;

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

/// A scripted peer with a store of its own: applies what it receives (newest version wins),
/// answers digests and pulls, and can be told to fail or to hang.
#[derive(Clone, Default)]
pub struct FakePeer {
    pub received: Arc<Mutex<Vec<Write>>>,
    pub data: Arc<Mutex<HashMap<String, Entry>>>,
    pub fail: Arc<AtomicBool>,
    pub hang: Arc<AtomicBool>,
    /// Hang on writes only (reads, digests and pulls answer).
    pub hang_writes: Arc<AtomicBool>,
    /// Answer writes with a refusal (as a peer with smaller limits would).
    pub reject: Arc<AtomicBool>,
    /// Refuse every call, as a peer with another cluster token does.
    pub refuse: Arc<AtomicBool>,
    /// If not 0, refuse every batch holding a value longer than this, as a peer with a
    /// smaller value limit does (it refuses the whole batch).
    pub max_value_bytes: Arc<AtomicU64>,
    /// If not 0, refuse to send a pull holding a value longer than this, as a peer does
    /// whose response would be over our message limit.
    pub max_pull_value_bytes: Arc<AtomicU64>,
    /// Replicate calls made, and how long each takes.
    pub calls: Arc<AtomicU64>,
    /// Pull calls made.
    pub pulls: Arc<AtomicU64>,
    pub delay_ms: Arc<AtomicU64>,
}

impl FakePeer {
    async fn gate(&self) -> Result<(), PeerError> {
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.hang.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if self.fail.load(Ordering::Relaxed) {
            return Err(PeerError::Unreachable("connection refused".into()));
        }
        if self.refuse.load(Ordering::Relaxed) {
            return Err(PeerError::Refused("Unauthenticated: wrong token".into()));
        }
        Ok(())
    }

    fn apply(&self, w: &Write) {
        let mut data = self.data.lock().unwrap();
        if data
            .get(&w.key)
            .is_none_or(|e| w.entry.precedence() > e.precedence())
        {
            data.insert(w.key.clone(), w.entry.clone());
        }
    }

    pub fn set_data(&self, writes: &[Write]) {
        for w in writes {
            self.apply(w);
        }
    }

    pub fn digest_now(&self, buckets: u32) -> Vec<u64> {
        self.digest_of(buckets, &PartitionSet::all())
    }

    /// The digest over the partitions of `scope`.
    pub fn digest_of(&self, buckets: u32, scope: &PartitionSet) -> Vec<u64> {
        let mut sums = vec![0; buckets as usize];
        let data = self.data.lock().unwrap();
        for (k, e) in data.iter().filter(|(k, _)| scope.contains_key(k)) {
            antientropy::add_to_digest(&mut sums, k, e.version, e.value.as_deref());
        }
        sums
    }

    pub fn value(&self, key: &str) -> Option<Option<String>> {
        self.data
            .lock()
            .unwrap()
            .get(key)
            .map(|e| e.value.as_deref().map(String::from))
    }

    pub fn received_keys(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|w| w.key.clone())
            .collect()
    }
}

impl PeerClient for FakePeer {
    async fn replicate(&self, writes: &[Write]) -> Result<(), PeerError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.gate().await?;
        if self.hang_writes.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let max = self.max_value_bytes.load(Ordering::Relaxed);
        let too_big = |w: &Write| w.entry.value.as_ref().is_some_and(|v| v.len() as u64 > max);
        if self.reject.load(Ordering::Relaxed) || (max > 0 && writes.iter().any(too_big)) {
            return Err(PeerError::Rejected("value too large".into()));
        }
        for w in writes {
            self.apply(w);
        }
        self.received.lock().unwrap().extend_from_slice(writes);
        Ok(())
    }

    async fn digest(&self, buckets: u32, scope: &PartitionSet) -> Result<Vec<u64>, PeerError> {
        self.gate().await?;
        Ok(self.digest_of(buckets, scope))
    }

    async fn pull(
        &self,
        buckets: u32,
        which: Vec<u32>,
        scope: &PartitionSet,
    ) -> Result<Pulled, PeerError> {
        self.pulls.fetch_add(1, Ordering::Relaxed);
        self.gate().await?;
        let data = self.data.lock().unwrap();
        let pulled: Vec<Write> = data
            .iter()
            .filter(|(k, _)| which.contains(&antientropy::bucket_of(k, buckets)))
            .filter(|(k, _)| scope.contains_key(k))
            .map(|(k, e)| Write {
                key: k.clone(),
                entry: e.clone(),
            })
            .collect();
        let max = self.max_pull_value_bytes.load(Ordering::Relaxed);
        let too_big = |w: &Write| w.entry.value.as_ref().is_some_and(|v| v.len() as u64 > max);
        if max > 0 && pulled.iter().any(too_big) {
            return Err(PeerError::Rejected(
                "OutOfRange: decoded message length too large".into(),
            ));
        }
        Ok(futures::stream::iter(pulled.into_iter().map(Ok)).boxed())
    }

    async fn scan(&self, scope: &PartitionSet) -> Result<crate::merge::Pairs, PeerError> {
        self.gate().await?;
        let mut pairs: Vec<(String, String)> = (self.data.lock().unwrap().iter())
            .filter(|(k, _)| scope.contains_key(k))
            .filter_map(|(k, e)| Some((k.clone(), e.value.as_deref()?.to_string())))
            .collect();
        pairs.sort();
        Ok(futures::stream::iter(pairs.into_iter().map(Ok)).boxed())
    }

    async fn read(&self, key: String) -> Result<Option<Entry>, PeerError> {
        self.gate().await?;
        Ok(self.data.lock().unwrap().get(&key).cloned())
    }
}
