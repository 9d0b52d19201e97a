//! What the log measures as it goes, for the node's metrics: how long each fsync took, how many
//! writes each group commit carried, and how many snapshots were written. Only the storage
//! sees these happen, and no status can tell them after the fact. Kept in prometheus-client's
//! types, which the node registers as they are; clones share their values.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// The log's measurements. Clones share them.
#[derive(Clone, Debug)]
pub struct StorageMetrics {
    /// Seconds each fsync of the log took.
    pub fsync_seconds: Histogram,
    /// Writes in each group commit (appends that shared one write and one fsync).
    pub group_commit_writes: Histogram,
    /// Snapshots written.
    pub snapshots: Counter,
    /// Snapshots that failed.
    pub snapshots_failed: Counter,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        Self {
            // 50 µs to about 1.6 s: a page-cache fsync to a disk in trouble.
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            // 1 to 4096 writes.
            group_commit_writes: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            snapshots: Counter::default(),
            snapshots_failed: Counter::default(),
        }
    }
}
