//! The node's Prometheus metrics: the series it keeps as calls and writes happen, and the
//! exposition it renders for `GET /metrics` (OpenMetrics text, which Prometheus reads).
//!
//! Two kinds of series. Those only an event can tell (a call and its latency, an fsync, a group
//! commit) are kept as they happen, in prometheus-client's types. Those that describe a state
//! (keys, peers, backlogs) are read at each scrape from the node's status, so they cost the
//! write path nothing. Names follow Prometheus conventions: the `kvstore_` prefix, base units
//! (`_seconds`, `_bytes`), `_total` on counters; the process series are the standard
//! `process_*` ones.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use kvstore_actors::{PeerState, StorageMetrics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tonic::Code;

use crate::Node;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Methods with series of their own: the node serves about twenty (its two services, health,
/// reflection). Calls to any other path are counted as `other`, so that no caller can grow
/// the exposition by inventing paths.
const MAX_METHODS: usize = 32;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 6.5 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 17))
}

/// Every call the node answers, by method and status code, and how long each took (to its
/// last byte: a List's whole stream).
#[derive(Debug)]
pub struct RpcMetrics {
    calls: Family<CallLabels, Counter>,
    seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
    methods: RwLock<HashMap<String, Arc<MethodMetrics>>>,
    other: OnceLock<Arc<MethodMetrics>>,
}

/// One method's series, resolved once so that a call costs a lookup and two atomic updates.
#[derive(Debug)]
pub struct MethodMetrics {
    method: String,
    seconds: Histogram,
    /// Counters by status code, made on first use: a code never answered has no series.
    codes: [OnceLock<Counter>; 17],
    calls: Family<CallLabels, Counter>,
}

impl MethodMetrics {
    /// Records a call that ended with `code` after `took`.
    pub fn record(&self, code: Code, took: Duration) {
        self.seconds.observe(took.as_secs_f64());
        let index = (code as usize).min(16);
        self.codes[index]
            .get_or_init(|| {
                self.calls.get_or_create_owned(&CallLabels {
                    method: self.method.clone(),
                    code: code_name(code),
                })
            })
            .inc();
    }
}

impl Default for RpcMetrics {
    fn default() -> Self {
        let calls = Family::<CallLabels, Counter>::default();
        let seconds = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        Self {
            calls,
            seconds,
            methods: RwLock::default(),
            other: OnceLock::new(),
        }
    }
}

impl RpcMetrics {
    fn method_metrics(
        calls: &Family<CallLabels, Counter>,
        seconds: &Family<MethodLabels, Histogram, fn() -> Histogram>,
        method: &str,
    ) -> MethodMetrics {
        MethodMetrics {
            method: method.to_string(),
            seconds: seconds.get_or_create_owned(&MethodLabels {
                method: method.to_string(),
            }),
            codes: Default::default(),
            calls: calls.clone(),
        }
    }

    /// The series of the method at `path` (`/kvstore.v1.KVStore/Put`): its own for the node's
    /// services, health and reflection, `other` for anything else.
    pub fn method(&self, path: &str) -> Arc<MethodMetrics> {
        let known = self.methods.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(metrics) = known.get(path) {
            return metrics.clone();
        }
        drop(known);
        let ours = ["/kvstore.v1.", "/grpc.health.v1.", "/grpc.reflection."]
            .iter()
            .any(|prefix| path.starts_with(prefix));
        let mut methods = self.methods.write().unwrap_or_else(PoisonError::into_inner);
        if !ours || methods.len() >= MAX_METHODS {
            return self
                .other
                .get_or_init(|| Arc::new(Self::method_metrics(&self.calls, &self.seconds, "other")))
                .clone();
        }
        methods
            .entry(path.to_string())
            .or_insert_with(|| Arc::new(Self::method_metrics(&self.calls, &self.seconds, path)))
            .clone()
    }
}

/// gRPC's own name for a status code, as other implementations label their metrics with it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Everything a node measures as it goes. Shared by the call layer, the storage and the scrape.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    pub rpc: RpcMetrics,
    pub storage: StorageMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerStateLabels {
    peer: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerOutcomeLabels {
    peer: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerDirectionLabels {
    peer: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuorumLabels {
    quorum: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: &'static str,
    node_id: String,
}

/// A gauge set to `value`.
fn gauge(value: i64) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(value);
    gauge
}

fn gauge_f64(value: f64) -> Gauge<f64, std::sync::atomic::AtomicU64> {
    let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    gauge.set(value);
    gauge
}

const STATES: [(PeerState, &str); 4] = [
    (PeerState::Waiting, "waiting"),
    (PeerState::Up, "up"),
    (PeerState::Down, "down"),
    (PeerState::Lagging, "lagging"),
];

/// What a scrape reads from a started node before it renders.
pub struct NodeState {
    /// Client writes that met the write quorum, and that did not.
    pub writes: (u64, u64),
    /// `None` once the store has stopped (the node is stopping).
    pub status: Option<kvstore_actors::coordinator::NodeStatus>,
    /// Copies of each key, and the partitions this node holds.
    pub share: (usize, usize),
}

impl NodeState {
    pub async fn read(node: &Node) -> Self {
        Self {
            writes: node.write_outcomes(),
            status: node.status().await.ok(),
            share: node.share(),
        }
    }
}

/// The exposition: the series kept as things happen, the node's state as of now (once it has
/// started), and the process's.
pub fn render(metrics: &NodeMetrics, node_id: &str, state: Option<&NodeState>) -> String {
    let mut root = Registry::default();
    let registry = root.sub_registry_with_prefix("kvstore");
    let info = Family::<InfoLabels, Gauge>::default();
    info.get_or_create(&InfoLabels {
        version: env!("CARGO_PKG_VERSION"),
        node_id: node_id.to_string(),
    })
    .set(1);
    registry.register("info", "The node's version and id; always 1", info);
    registry.register(
        "rpc_requests",
        "Calls answered, by method and gRPC status code",
        metrics.rpc.calls.clone(),
    );
    registry.register_with_unit(
        "rpc_duration",
        "Time from a call's arrival to its last byte out, by method",
        Unit::Seconds,
        metrics.rpc.seconds.clone(),
    );
    registry.register_with_unit(
        "log_fsync_duration",
        "Time each fsync of the write-ahead log took",
        Unit::Seconds,
        metrics.storage.fsync_seconds.clone(),
    );
    registry.register(
        "log_group_commit_writes",
        "Writes in each group commit (sharing one log write and one fsync)",
        metrics.storage.group_commit_writes.clone(),
    );
    registry.register(
        "snapshots",
        "Snapshots written (each followed by a fresh log)",
        metrics.storage.snapshots.clone(),
    );
    registry.register(
        "snapshot_failures",
        "Snapshots that failed (the logs are kept, and a snapshot is tried again)",
        metrics.storage.snapshots_failed.clone(),
    );
    if let Some(state) = state {
        node_series(registry, state);
    }
    process_series(&mut root);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &root)
        .expect("writing to a String cannot fail");
    text
}

/// The node's state, as read from its status.
fn node_series(registry: &mut Registry, state: &NodeState) {
    let (met, missed) = state.writes;
    let writes = Family::<QuorumLabels, Counter>::default();
    writes
        .get_or_create(&QuorumLabels { quorum: "met" })
        .inc_by(met);
    writes
        .get_or_create(&QuorumLabels { quorum: "missed" })
        .inc_by(missed);
    registry.register(
        "writes",
        "Client writes (puts and deletes) taken, by whether they met the write quorum",
        writes,
    );
    let (copies, partitions) = state.share;
    registry.register("replicas", "Copies of each key", gauge(copies as i64));
    registry.register(
        "partitions",
        "Partitions of the key space (of 1,024) this node holds a copy of",
        gauge(partitions as i64),
    );
    // A node whose store has stopped (it is stopping) has only the series above.
    let Some(status) = &state.status else {
        return;
    };
    registry.register("keys", "Live keys", gauge(status.store.keys as i64));
    registry.register(
        "tombstones",
        "Deleted keys kept as tombstones until their grace ends",
        gauge(status.store.tombstones as i64),
    );
    registry.register_with_unit(
        "log_size",
        "Size of the current write-ahead log",
        Unit::Bytes,
        gauge(status.store.log_bytes as i64),
    );
    registry.register(
        "refusing_writes",
        "1 while the node refuses writes because its clock is off from its peers'",
        gauge(i64::from(status.refusing_writes.is_some())),
    );

    let state = Family::<PeerStateLabels, Gauge>::default();
    let batches = Family::<PeerLabels, Counter>::default();
    let replicated = Family::<PeerLabels, Counter>::default();
    let in_flight = Family::<PeerLabels, Gauge>::default();
    let backlog = Family::<PeerLabels, Gauge>::default();
    let lag = Family::<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let offset = Family::<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let rounds = Family::<PeerOutcomeLabels, Counter>::default();
    let repaired = Family::<PeerDirectionLabels, Counter>::default();
    for peer in &status.peers {
        let labels = PeerLabels {
            peer: peer.addr.clone(),
        };
        for (each, name) in STATES {
            let at = PeerStateLabels {
                peer: peer.addr.clone(),
                state: name,
            };
            state.get_or_create(&at).set(i64::from(peer.state == each));
        }
        batches
            .get_or_create(&labels)
            .inc_by(peer.confirmed_batches);
        replicated
            .get_or_create(&labels)
            .inc_by(peer.confirmed_writes);
        in_flight.get_or_create(&labels).set(peer.in_flight as i64);
        backlog.get_or_create(&labels).set(peer.backlog as i64);
        lag.get_or_create(&labels)
            .set(replication_lag(peer).as_secs_f64());
        if let Some(nanos) = peer.clock_offset {
            offset.get_or_create(&labels).set(nanos as f64 / 1e9);
        }
        let ae = peer.anti_entropy;
        for (outcome, n) in [("ok", ae.rounds), ("failed", ae.failed)] {
            let at = PeerOutcomeLabels {
                peer: peer.addr.clone(),
                outcome,
            };
            rounds.get_or_create(&at).inc_by(n);
        }
        for (direction, n) in [("pulled", ae.pulled), ("pushed", ae.pushed)] {
            let at = PeerDirectionLabels {
                peer: peer.addr.clone(),
                direction,
            };
            repaired.get_or_create(&at).inc_by(n);
        }
    }
    registry.register(
        "peer_state",
        "1 for the state each peer is in (waiting, up, down, lagging), 0 for the others",
        state,
    );
    registry.register(
        "peer_batches",
        "Replication batches each peer confirmed",
        batches,
    );
    registry.register(
        "peer_replicated_writes",
        "Writes each peer confirmed through replication and handoff; over peer_batches, the mean batch size",
        replicated,
    );
    registry.register(
        "peer_in_flight_writes",
        "Writes waiting for a batch to each peer or being delivered",
        in_flight,
    );
    registry.register(
        "peer_handoff_backlog_writes",
        "Writes held for each peer that could not take them (hinted handoff)",
        backlog,
    );
    registry.register_with_unit(
        "peer_replication_lag",
        "How long each peer has had writes outstanding without confirming any (0: caught up)",
        Unit::Seconds,
        lag,
    );
    registry.register_with_unit(
        "peer_clock_offset",
        "How far each peer's clock is ahead of this node's (negative: behind), as last measured",
        Unit::Seconds,
        offset,
    );
    registry.register(
        "anti_entropy_rounds",
        "Anti-entropy rounds with each peer, by outcome",
        rounds,
    );
    registry.register(
        "anti_entropy_repaired_keys",
        "Entries anti-entropy brought from each peer (pulled) and sent to it (pushed)",
        repaired,
    );
}

/// How long a peer has had writes outstanding (in flight, held, or missed) without confirming
/// anything: zero for a peer that is caught up.
fn replication_lag(peer: &kvstore_actors::coordinator::PeerStatus) -> Duration {
    let behind = peer.in_flight > 0 || peer.backlog > 0 || peer.needs_resync;
    match (behind, peer.last_contact) {
        (false, _) => Duration::ZERO,
        (true, Some(since)) => since,
        // Never reached: behind since the node started, which the process series date.
        (true, None) => process_uptime().unwrap_or_default(),
    }
}

fn process_uptime() -> Option<Duration> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    let ticks = procfs::ticks_per_second() as f64;
    let started = procfs::boot_time_secs().ok()? as f64 + stat.starttime as f64 / ticks;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    Some(Duration::from_secs_f64((now - started).max(0.0)))
}

/// The standard process series, from /proc; none where /proc cannot be read.
fn process_series(registry: &mut Registry) {
    let Ok(process) = procfs::process::Process::myself() else {
        return;
    };
    if let Ok(stat) = process.stat() {
        let ticks = procfs::ticks_per_second() as f64;
        registry.register_with_unit(
            "process_cpu",
            "User and system CPU time spent",
            Unit::Seconds,
            ConstCounter::new((stat.utime + stat.stime) as f64 / ticks),
        );
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory size",
            Unit::Bytes,
            gauge((stat.rss * procfs::page_size()) as i64),
        );
        registry.register_with_unit(
            "process_virtual_memory",
            "Virtual memory size",
            Unit::Bytes,
            gauge(stat.vsize as i64),
        );
        if let Ok(boot) = procfs::boot_time_secs() {
            registry.register_with_unit(
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Unit::Seconds,
                gauge_f64(boot as f64 + stat.starttime as f64 / ticks),
            );
        }
    }
    if let Ok(fds) = process.fd_count() {
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            gauge(fds as i64),
        );
    }
    if let Ok(limits) = process.limits()
        && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
    {
        registry.register(
            "process_max_fds",
            "Most open file descriptors allowed",
            gauge(max as i64),
        );
    }
}
