//! Configuration of a node: the `kvstore-server` command line, the settings it turns into, and
//! the input limits every handler enforces.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kvstore_actors::{AckAfter, SyncMode, WriteQuorum};
use subtle::ConstantTimeEq;

use crate::error::Error;
use crate::tls::{ClientAuth, NodeTls};

/// Default largest key, in bytes.
pub const DEFAULT_MAX_KEY_BYTES: usize = 4 * 1024;
/// Default largest value, in bytes.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Room in a gRPC message beyond the key and value: field tags, version, framing.
const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;
/// Default copies of each key.
pub const DEFAULT_REPLICAS: usize = 3;
/// Most copies of each key `--replicas` takes: far past any useful count, and a bound on what
/// one write costs.
const MAX_REPLICAS: usize = 64;
/// Default time a write waits for its peers before answering.
pub const DEFAULT_REPLICATION_DEADLINE: Duration = Duration::from_secs(1);
/// Default time to establish a connection to a peer.
pub const DEFAULT_PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default capacity of each peer's replication mailbox. Big enough to absorb bursts from many
/// concurrent clients; small enough that a stuck peer is noticed (as lagging) within seconds.
pub const DEFAULT_PEER_MAILBOX: usize = 1024;
/// Default time in-flight calls get to finish after a shutdown signal.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Default log size that triggers a snapshot and a fresh log.
pub const DEFAULT_COMPACT_AFTER_BYTES: u64 = 64 * 1024 * 1024;
/// Default time tombstones are kept before they may be purged (Cassandra's gc_grace is 10 days).
pub const DEFAULT_TOMBSTONE_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default number of writes held per peer for redelivery (hinted handoff).
pub const DEFAULT_HANDOFF_CAPACITY: usize = 100_000;
/// Default time between periodic anti-entropy rounds with each peer.
pub const DEFAULT_ANTI_ENTROPY_INTERVAL: Duration = Duration::from_secs(30);
/// Default time between gossip rounds: a stopped node is seen down after about eight.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_secs(1);
/// Bounds of `--gossip-interval`: below, gossip would cost more than it tells; above, a node
/// that stopped would be seen down only after minutes.
const MIN_GOSSIP_INTERVAL: Duration = Duration::from_millis(50);
const MAX_GOSSIP_INTERVAL: Duration = Duration::from_secs(60);
/// Default `--cluster-name`.
pub const DEFAULT_CLUSTER_NAME: &str = "kvstore";
/// Default fsync interval for `--sync interval`.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Default bound on how far two nodes' clocks may differ (CockroachDB's default).
pub const DEFAULT_MAX_CLOCK_OFFSET: Duration = kvstore_actors::clock::DEFAULT_MAX_OFFSET;
/// Largest bound `--max-clock-offset` takes: past a day, a clock that is wrong stops being a
/// clock that disagrees and becomes one that pins keys.
const MAX_MAX_CLOCK_OFFSET: Duration = Duration::from_secs(24 * 3600);

/// Default memory all Lists in progress may hold together.
pub const DEFAULT_MAX_LIST_MEMORY: usize = 256 * 1024 * 1024;
/// Default time a List waits for a client that takes nothing before it ends.
pub const DEFAULT_LIST_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default calls at once on one connection (HTTP/2's MAX_CONCURRENT_STREAMS, advertised).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Default time a request's body has to arrive, and a new connection its first byte.
pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default connections a node keeps open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default time a connection whose client sends nothing stays open. A live client answers the
/// node's HTTP/2 pings (every 30 s, or half this timeout if shorter), so only a silent or vanished
/// one reaches it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Most a key and a value may hold together, whatever the flags say: what one write in the log
/// may hold ([`kvstore_actors::MAX_WRITE_BYTES`]). The gRPC message limit (key and value plus
/// `MESSAGE_OVERHEAD_BYTES`) then stays within 64 MiB, which `kvstore-cli` accepts.
pub const MAX_KEY_AND_VALUE_BYTES: usize = kvstore_actors::MAX_WRITE_BYTES;
const _: () = assert!(MAX_KEY_AND_VALUE_BYTES + MESSAGE_OVERHEAD_BYTES <= 64 * 1024 * 1024);
/// Longest duration any flag takes. Far beyond any sensible setting, and far enough from the
/// clock's limits that adding one to an instant can never overflow.
/// Ten years as humantime counts them (365.25 days each), so `10y` itself is accepted.
const MAX_FLAG_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// Limits on what a client may store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl Limits {
    /// A key must be non-empty and within the key limit.
    pub fn check_key(&self, key: &str) -> Result<(), Error> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("key must not be empty".into()));
        }
        if key.len() > self.max_key_bytes {
            return Err(Error::InvalidArgument(format!(
                "key is {} bytes, over the limit of {} bytes (--max-key-bytes)",
                key.len(),
                self.max_key_bytes
            )));
        }
        Ok(())
    }

    /// A value must be within the value limit (empty values are allowed).
    pub fn check_value(&self, value: &str) -> Result<(), Error> {
        if value.len() > self.max_value_bytes {
            return Err(Error::InvalidArgument(format!(
                "value is {} bytes, over the limit of {} bytes (--max-value-bytes)",
                value.len(),
                self.max_value_bytes
            )));
        }
        Ok(())
    }

    /// The gRPC message size limit, set deliberately from the key and value limits: big enough
    /// that a too-large key or value reaches our checks and gets a message naming the limit,
    /// small enough that a huge message is refused by the transport before it is buffered.
    pub fn max_message_bytes(&self) -> usize {
        self.max_key_bytes + self.max_value_bytes + MESSAGE_OVERHEAD_BYTES
    }
}

/// What one client may make the node hold, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientBounds {
    /// Bytes all Lists in progress may hold together.
    pub max_list_memory: usize,
    /// A List whose client takes nothing for this long is ended.
    pub list_idle_timeout: Duration,
    /// Calls at once on one connection.
    pub max_concurrent_streams: u32,
    /// Time a request's body has to arrive, and a new connection its first byte.
    pub request_body_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// A connection whose client sends nothing for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ClientBounds {
    fn default() -> Self {
        Self {
            max_list_memory: DEFAULT_MAX_LIST_MEMORY,
            list_idle_timeout: DEFAULT_LIST_IDLE_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            request_body_timeout: DEFAULT_REQUEST_BODY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Settings of one node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id in versions; `None` means its listen address.
    pub node_id: Option<String>,
    /// Peers, as `host:port`.
    pub peers: Vec<String>,
    /// Copies of each key. With at least as many as nodes, every node holds every key.
    pub replicas: usize,
    /// The address the other nodes know this node by, as they list it among their peers;
    /// `None` means its listen address. Names the node in the ring.
    pub advertise: Option<String>,
    /// A member of a running ring (`host:port`) to join through, taking a share of its keys.
    pub join: Option<String>,
    pub write_quorum: WriteQuorum,
    pub ack_after: AckAfter,
    pub replication_deadline: Duration,
    pub peer_connect_timeout: Duration,
    pub peer_mailbox: usize,
    pub shutdown_grace: Duration,
    pub limits: Limits,
    /// Where the node keeps its data; `None` keeps everything in memory (tests only: the server
    /// binary always has one).
    pub data_dir: Option<PathBuf>,
    pub sync: SyncMode,
    pub compact_after_bytes: u64,
    pub repair_truncate: bool,
    pub tombstone_grace: Duration,
    pub handoff_capacity: usize,
    pub anti_entropy_interval: Duration,
    /// The UDP port the node gossips on; `None`: the port it serves gRPC on.
    pub gossip_port: Option<u16>,
    /// How often the node gossips with another (failure detection follows it).
    pub gossip_interval: Duration,
    /// The cluster's name in gossip.
    pub cluster_name: String,
    /// The secret every node of the cluster shares, if set: sent on every Replicator call to
    /// a peer and required of every Replicator call received.
    pub cluster_token: Option<ClusterToken>,
    /// How far two nodes' clocks may differ: a version from elsewhere further ahead of this
    /// node's clock is refused, and a node this far off from most of its peers takes no
    /// writes.
    pub max_clock_offset: Duration,
    /// Nanoseconds added to this node's reading of the machine's clock. Always 0 but in tests,
    /// which run a node whose clock is wrong; there is no flag for it.
    pub clock_skew_nanos: i64,
    /// TLS, if the node serves it: its certificate and key, and the cluster's CA.
    pub tls: Option<NodeTls>,
    /// A backup to seed the node from before it serves (its data dir must be empty).
    pub restore: Option<PathBuf>,
    /// What one client may make the node hold.
    pub bounds: ClientBounds,
}

/// A cluster's shared secrets: the first is sent, any of them is accepted, so a new token can
/// be added to every node, then put first, then the old one removed, one node at a time. Its
/// `Debug` does not show them, so they never reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken(Vec<Vec<u8>>);

impl ClusterToken {
    /// One token.
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self(vec![secret.into()])
    }

    /// Several tokens, the first of them sent; `None` if there are none or one is empty.
    pub fn several<T: Into<Vec<u8>>>(secrets: impl IntoIterator<Item = T>) -> Option<Self> {
        let secrets: Vec<Vec<u8>> = secrets.into_iter().map(Into::into).collect();
        (!secrets.is_empty() && secrets.iter().all(|s| !s.is_empty())).then_some(Self(secrets))
    }

    /// The token sent on calls to peers.
    pub fn sent(&self) -> &[u8] {
        &self.0[0]
    }

    /// Every token a call may carry.
    pub fn accepted(&self) -> impl Iterator<Item = &[u8]> {
        self.0.iter().map(Vec::as_slice)
    }

    /// Whether a call's metadata carries one of the tokens. Every token is compared, each in
    /// constant time: how long a refusal takes says nothing about how close a guess was, nor
    /// which token it was near.
    pub fn admits(&self, metadata: &tonic::metadata::MetadataMap) -> bool {
        let sent = metadata.get_bin(crate::peer::TOKEN_HEADER);
        let sent = sent.and_then(|v| v.to_bytes().ok());
        sent.is_some_and(|sent| {
            self.accepted()
                .fold(false, |any, secret| any | same_secret(&sent, secret))
        })
    }

    /// The tokens of a file, one per line; trailing whitespace and blank lines are ignored.
    pub fn read(path: &std::path::Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::InvalidArgument(format!("--cluster-token-file {}: {e}", path.display()))
        })?;
        let tokens = (bytes.split(|b| *b == b'\n'))
            .map(<[u8]>::trim_ascii_end)
            .filter(|line| !line.is_empty());
        Self::several(tokens).ok_or_else(|| {
            Error::InvalidArgument(format!("--cluster-token-file {} is empty", path.display()))
        })
    }
}

/// Whether `sent` is `secret`, in time that depends only on the secret's length: a wrong
/// guess learns neither how much of it matched nor, from an early exit on a length mismatch
/// (as `ct_eq` on slices does), how long the secret is.
fn same_secret(sent: &[u8], secret: &[u8]) -> bool {
    let mut same = sent.len().ct_eq(&secret.len());
    for (i, byte) in secret.iter().enumerate() {
        same &= sent.get(i).unwrap_or(&0).ct_eq(byte);
    }
    same.into()
}

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lengths: Vec<usize> = self.0.iter().map(Vec::len).collect();
        write!(f, "ClusterToken(bytes: {lengths:?})")
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            peers: Vec::new(),
            replicas: DEFAULT_REPLICAS,
            advertise: None,
            join: None,
            write_quorum: WriteQuorum::default(),
            ack_after: AckAfter::default(),
            replication_deadline: DEFAULT_REPLICATION_DEADLINE,
            peer_connect_timeout: DEFAULT_PEER_CONNECT_TIMEOUT,
            peer_mailbox: DEFAULT_PEER_MAILBOX,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            limits: Limits::default(),
            data_dir: None,
            sync: SyncMode::Always,
            compact_after_bytes: DEFAULT_COMPACT_AFTER_BYTES,
            repair_truncate: false,
            tombstone_grace: DEFAULT_TOMBSTONE_GRACE,
            handoff_capacity: DEFAULT_HANDOFF_CAPACITY,
            anti_entropy_interval: DEFAULT_ANTI_ENTROPY_INTERVAL,
            gossip_port: None,
            gossip_interval: DEFAULT_GOSSIP_INTERVAL,
            cluster_name: DEFAULT_CLUSTER_NAME.into(),
            cluster_token: None,
            max_clock_offset: DEFAULT_MAX_CLOCK_OFFSET,
            clock_skew_nanos: 0,
            tls: None,
            restore: None,
            bounds: ClientBounds::default(),
        }
    }
}

/// `--log-format`: how log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// A line of text for a person, as `tracing` formats it.
    #[default]
    Text,
    /// One JSON object a line, for a log collector.
    Json,
}

/// `--sync`: when the log reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SyncArg {
    /// fsync before every ack; concurrent writes share one fsync.
    Always,
    /// Ack once written to the OS, fsync every --sync-interval.
    Interval,
    /// Never fsync; the OS writes back when it likes.
    Never,
}

/// Runs one kvstore node.
///
/// As the original Go system took them: `kvstore-server 5001 5002,5003` listens on 127.0.0.1:5001 with peers on
/// 127.0.0.1:5002 and 127.0.0.1:5003. On real machines: `kvstore-server --listen 0.0.0.0:5001
/// --peer db2:5001 --peer db3:5001`. A node starts even while its peers are down.
#[derive(Debug, Parser)]
#[command(name = "kvstore-server", version, about, long_about)]
pub struct ServerArgs {
    /// Port to listen on, on 127.0.0.1 (the original Go system's form; or use --listen).
    #[arg(value_name = "PORT", conflicts_with = "listen")]
    pub port: Option<u16>,

    /// Comma-separated peers, each a port on 127.0.0.1 or a host:port (the original form).
    #[arg(value_name = "PEERS", value_delimiter = ',')]
    pub peer_list: Vec<String>,

    /// Address to listen on, host:port.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// A peer's address, host:port. Repeat for each peer.
    #[arg(long = "peer", value_name = "ADDR")]
    pub peers: Vec<String>,

    /// This node's id, the tie-break between writes with equal clock time. Must be unique in
    /// the cluster. Defaults to the listen address.
    #[arg(long)]
    pub node_id: Option<String>,

    /// Copies of each key (1 to 64). With at least as many as there are nodes, every node
    /// holds every key; with fewer, the keys are spread over the nodes, N copies each, and
    /// the write quorum and quorum reads count over a key's N copies. Give every node the
    /// same value.
    #[arg(long, default_value_t = DEFAULT_REPLICAS, value_parser = parse_replicas)]
    pub replicas: usize,

    /// The address the other nodes list this node by among their peers (host:port), which
    /// names it in the ring. Defaults to the listen address; needed when that is 0.0.0.0 and
    /// --replicas is below the node count.
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,

    /// Join a running cluster through ADDR, any of its nodes (host:port): the node takes its
    /// share of the keys from their holders while the cluster serves, and from then on is a
    /// member like the others (a restart needs no --join). The cluster must hold its members
    /// and copies in a ring: give its nodes' --replicas. Instead of --peer.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["peers", "peer_list"])]
    pub join: Option<String>,

    /// How many nodes, counting this one, must hold a write for its Ack to say ok: all,
    /// majority or one.
    #[arg(long, default_value_t = WriteQuorum::default(), value_parser = str::parse::<WriteQuorum>)]
    pub write_quorum: WriteQuorum,

    /// When a Put or Delete answers: `all` once every peer has confirmed it, failed, or run
    /// out --replication-deadline (the Ack then tells of each: "Stored and replicated"), or
    /// `quorum` as soon as the write quorum holds it durably ("Stored on 2 of 3 nodes; 1
    /// pending"). The other peers still get it, but the Ack no longer tells whether the
    /// slowest one has.
    #[arg(long, default_value_t = AckAfter::default(), value_parser = str::parse::<AckAfter>)]
    pub ack_after: AckAfter,

    /// How long a write waits for its peers before answering (e.g. 500ms, 2s). A peer that has
    /// not confirmed by then is named in the Ack as timed out.
    #[arg(long, default_value_t = DEFAULT_REPLICATION_DEADLINE.into(), value_parser = flag_at_least_1ms)]
    pub replication_deadline: humantime::Duration,

    /// How long to try connecting to a peer before calling it unreachable.
    #[arg(long, default_value_t = DEFAULT_PEER_CONNECT_TIMEOUT.into(), value_parser = flag_at_least_1ms)]
    pub peer_connect_timeout: humantime::Duration,

    /// Writes queued per peer before that peer is reported lagging and marked for resync
    /// (1 to 1,000,000).
    #[arg(long, default_value_t = DEFAULT_PEER_MAILBOX, value_parser = parse_count)]
    pub peer_mailbox: usize,

    /// Largest key accepted, in bytes (at least 1).
    #[arg(long, default_value_t = DEFAULT_MAX_KEY_BYTES, value_parser = parse_nonzero)]
    pub max_key_bytes: usize,

    /// Largest value accepted, in bytes. The gRPC message limit is set from this and
    /// --max-key-bytes, which together may not pass 64 MiB - 64 KiB.
    #[arg(long, default_value_t = DEFAULT_MAX_VALUE_BYTES)]
    pub max_value_bytes: usize,

    /// How long in-flight calls get to finish after SIGTERM or Ctrl-C (0 abandons them).
    #[arg(long, default_value_t = DEFAULT_SHUTDOWN_GRACE.into(), value_parser = flag_any)]
    pub shutdown_grace: humantime::Duration,

    /// Directory for this node's log and snapshots. Defaults to kvstore-data/NODE_ID in the
    /// current directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// When a write reaches the disk. `always` (fsync before the ack) loses nothing acknowledged
    /// even if the machine crashes; `interval` can lose up to --sync-interval of acknowledged
    /// writes on a machine crash; `never` leaves it to the OS. A process crash loses nothing
    /// acknowledged in any mode.
    #[arg(long, value_enum, default_value_t = SyncArg::Always)]
    pub sync: SyncArg,

    /// How often `--sync interval` fsyncs.
    #[arg(long, default_value_t = DEFAULT_SYNC_INTERVAL.into(), value_parser = flag_at_least_1ms)]
    pub sync_interval: humantime::Duration,

    /// Log size, in bytes, at which the node writes a snapshot and starts a new log (at least
    /// 64 KiB: each snapshot writes the whole map).
    #[arg(long, default_value_t = DEFAULT_COMPACT_AFTER_BYTES, value_parser = parse_compact_after)]
    pub compact_after_bytes: u64,

    /// Recovery for a damaged data dir: cut a damaged log or snapshot at the damage instead of
    /// refusing to start. What followed the damage is lost locally and fetched back from peers.
    #[arg(long)]
    pub repair_truncate: bool,

    /// How long deletes are remembered (as tombstones) before they may be purged. A node that
    /// was down longer than this and still holds a deleted key can bring it back; keep it
    /// longer than any outage you would repair rather than rebuild (e.g. 7d, 36h).
    #[arg(long, default_value_t = DEFAULT_TOMBSTONE_GRACE.into(), value_parser = flag_at_least_1s)]
    pub tombstone_grace: humantime::Duration,

    /// Writes kept per unreachable peer for redelivery when it returns (hinted handoff; 1 to
    /// 1,000,000). Past this the backlog is dropped and the peer is repaired by anti-entropy
    /// instead.
    #[arg(long, default_value_t = DEFAULT_HANDOFF_CAPACITY, value_parser = parse_count)]
    pub handoff_capacity: usize,

    /// How log lines are written: `text` for a person, `json` (one object a line) for a log
    /// collector. `RUST_LOG` sets what is logged (default `info,chitchat=error`: the gossip
    /// library's warnings, one per unreadable datagram, are left out).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Threads serving requests (the async runtime's workers). Defaults to one per CPU.
    #[arg(long, value_parser = parse_count)]
    pub worker_threads: Option<usize>,

    /// Time between anti-entropy rounds with each peer (digest comparison and repair). Rounds
    /// also run at start and when a peer that missed writes comes back.
    #[arg(long, default_value_t = DEFAULT_ANTI_ENTROPY_INTERVAL.into(), value_parser = flag_at_least_1s)]
    pub anti_entropy_interval: humantime::Duration,

    /// The UDP port this node gossips on (membership, and which nodes are live), on the
    /// address it listens on and advertises. Defaults to its gRPC port: the same number, over
    /// UDP. Open it between the nodes as the gRPC port is. The node first looks for each
    /// member at the member's gRPC port and at this port, so give the nodes that set it the
    /// same port.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub gossip_port: Option<u16>,

    /// The cluster's name: a node takes gossip, and calls from other nodes, only from nodes
    /// of the same name. Give clusters whose nodes can reach each other different names.
    #[arg(long, default_value = DEFAULT_CLUSTER_NAME, value_parser = parse_cluster_name)]
    pub cluster_name: String,

    /// How often the node gossips with another. A node that stops is seen down after about
    /// ten of these.
    #[arg(long, default_value_t = DEFAULT_GOSSIP_INTERVAL.into(), value_parser = flag_gossip_interval)]
    pub gossip_interval: humantime::Duration,

    /// How far two nodes' clocks may differ (1ms to 1 day). A write from another node whose
    /// version is further ahead of this node's clock is refused (the sender holds it and tries
    /// again), and a node whose clock is this far off from most of its peers' takes no writes
    /// (UNAVAILABLE) until the clocks agree. Run NTP (chrony, systemd-timesyncd) on every
    /// machine.
    #[arg(long, default_value_t = DEFAULT_MAX_CLOCK_OFFSET.into(), value_parser = flag_clock_offset)]
    pub max_clock_offset: humantime::Duration,

    /// A file holding the secret every node of the cluster shares, one token per line
    /// (trailing whitespace and blank lines are ignored). With it, a node sends the first
    /// token on every call to its peers' Replicator service and refuses Replicator calls that
    /// carry none of the file's tokens (UNAUTHENTICATED), so no one else who can reach the
    /// port can replicate writes into the node or read its data through anti-entropy. Several
    /// lines let a token be replaced one node at a time. Client calls (Put, Get, List, Delete,
    /// Status) are not affected. A file rather than the secret itself, which `ps` would show.
    #[arg(long, value_name = "PATH")]
    pub cluster_token_file: Option<PathBuf>,

    /// The node's certificate (PEM, the chain from the node's own certificate up): with
    /// --tls-key, both services are served over TLS on the node's one port.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// The cluster's CA (PEM). With it, the node calls its peers over TLS, checks their
    /// certificates against it and presents its own, and its Replicator takes calls only from
    /// callers whose certificate chains to it (others get UNAUTHENTICATED).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,

    /// Memory all Lists in progress may hold together, in bytes. A List holds its keys (it
    /// reads values as the client takes them); one that would pass the bound waits a second
    /// for others to finish, then is refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = DEFAULT_MAX_LIST_MEMORY, value_parser = parse_nonzero)]
    pub max_list_memory: usize,

    /// A List whose client takes nothing for this long is ended (RESOURCE_EXHAUSTED, saying
    /// so), and what it held is let go.
    #[arg(long, default_value_t = DEFAULT_LIST_IDLE_TIMEOUT.into(), value_parser = flag_at_least_1ms)]
    pub list_idle_timeout: humantime::Duration,

    /// Calls at once on one connection, advertised to clients (HTTP/2 MAX_CONCURRENT_STREAMS).
    #[arg(long, default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Time a request's body has to arrive (all of it, for a reflection session too; only the
    /// peers' replication streams may pause). A body still arriving after it fails, and so
    /// does its call. Also how long a new connection may stay silent before its first byte.
    #[arg(long, default_value_t = DEFAULT_REQUEST_BODY_TIMEOUT.into(), value_parser = flag_at_least_1ms)]
    pub request_body_timeout: humantime::Duration,

    /// Connections open at once; one more is closed as it arrives.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = parse_count)]
    pub max_connections: usize,

    /// A connection whose client sends nothing for this long is closed. Live clients answer
    /// the node's HTTP/2 pings (every 30 s, or twice per timeout if it is shorter), so only
    /// silent or vanished ones are.
    #[arg(long, default_value_t = DEFAULT_IDLE_TIMEOUT.into(), value_parser = flag_at_least_1ms)]
    pub idle_timeout: humantime::Duration,

    /// Seed this new node from a backup (`kvstore-cli ADDR backup FILE`) before it serves: the
    /// file is checked whole first (a damaged or cut-short one is refused, naming the byte), and
    /// --data-dir must be empty. Versions are kept, so the data merges with the cluster's by
    /// the usual rule; the node's peers get it through anti-entropy.
    #[arg(long, value_name = "FILE")]
    pub restore: Option<PathBuf>,

    /// Which clients must present a certificate from --tls-ca: `none` (only the cluster's
    /// nodes, calling the Replicator) or `require` (every client).
    #[arg(long, value_enum, default_value_t = ClientAuth::None, requires = "tls_ca")]
    pub tls_client_auth: ClientAuth,
}

impl ServerArgs {
    /// The listen address and node settings these arguments describe.
    pub fn into_config(self) -> Result<(SocketAddr, NodeConfig), Error> {
        let listen = match (self.listen, self.port) {
            (Some(addr), _) => addr,
            (None, Some(port)) => SocketAddr::from(([127, 0, 0, 1], port)),
            (None, None) => {
                return Err(Error::InvalidArgument(
                    "give a port to listen on (kvstore-server 5001 5002,5003) or --listen ADDR"
                        .into(),
                ));
            }
        };
        let mut peers = Vec::new();
        for peer in self.peer_list.iter().chain(&self.peers) {
            let peer = crate::net::parse_addr(peer)?;
            if peer == listen.to_string() {
                return Err(Error::InvalidAddress {
                    addr: peer,
                    reason: "a node cannot be its own peer".into(),
                });
            }
            // Refused rather than dropped: a peer list with a typo in it (5002,5002 for
            // 5002,5003) would otherwise make a smaller cluster than the operator meant.
            if peers.contains(&peer) {
                return Err(Error::InvalidAddress {
                    addr: peer,
                    reason: "given twice as a peer".into(),
                });
            }
            peers.push(peer);
        }
        let key_and_value = self.max_key_bytes.checked_add(self.max_value_bytes);
        if key_and_value.is_none_or(|n| n > MAX_KEY_AND_VALUE_BYTES) {
            return Err(Error::InvalidArgument(format!(
                "--max-key-bytes ({}) and --max-value-bytes ({}) may hold at most {} bytes \
                 together: a log record holds one write",
                self.max_key_bytes, self.max_value_bytes, MAX_KEY_AND_VALUE_BYTES
            )));
        }
        if let Some(id) = &self.node_id
            && (id.is_empty() || id.len() > kvstore_actors::version::MAX_NODE_ID_BYTES)
        {
            return Err(Error::InvalidArgument(format!(
                "--node-id must be 1 to {} bytes",
                kvstore_actors::version::MAX_NODE_ID_BYTES
            )));
        }
        // Node ids break ties between versions: two nodes with one id could keep different
        // values of a key forever. An unspecified address is the same on every machine.
        if self.node_id.is_none() && listen.ip().is_unspecified() {
            return Err(Error::InvalidArgument(format!(
                "listening on {listen}, which every node could share: give --node-id (unique in the cluster)"
            )));
        }
        let advertise = self
            .advertise
            .as_deref()
            .map(crate::net::parse_addr)
            .transpose()?;
        // The ring names nodes by the addresses their peers list them by: one listening on
        // every interface has no such name of its own.
        let join = self
            .join
            .as_deref()
            .map(crate::net::parse_addr)
            .transpose()?;
        if (self.replicas <= peers.len() || join.is_some())
            && advertise.is_none()
            && listen.ip().is_unspecified()
        {
            return Err(Error::InvalidArgument(format!(
                "listening on {listen} with --replicas {} of {} nodes: give --advertise, the \
                 address the other nodes list this one by",
                self.replicas,
                peers.len() + 1
            )));
        }
        if let Some(addr) = &advertise
            && peers.contains(addr)
        {
            return Err(Error::InvalidAddress {
                addr: addr.clone(),
                reason: "this node's own --advertise address is also given as a peer".into(),
            });
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(NodeTls::load(
                cert,
                key,
                self.tls_ca.as_deref(),
                self.tls_client_auth,
            )?),
            _ => None,
        };
        // A node serving TLS takes only TLS, its peers too: it could not call them without
        // a CA to check their certificates against.
        if tls.as_ref().is_some_and(|tls| !tls.checks_peers()) && !peers.is_empty() {
            return Err(Error::InvalidArgument(
                "--tls-cert with peers needs --tls-ca, the cluster's CA: the node calls its \
                 peers over TLS and checks their certificates against it"
                    .into(),
            ));
        }
        let config = NodeConfig {
            node_id: self.node_id.clone(),
            peers,
            replicas: self.replicas,
            advertise,
            join,
            write_quorum: self.write_quorum,
            ack_after: self.ack_after,
            replication_deadline: self.replication_deadline.into(),
            peer_connect_timeout: self.peer_connect_timeout.into(),
            peer_mailbox: self.peer_mailbox,
            shutdown_grace: self.shutdown_grace.into(),
            limits: Limits {
                max_key_bytes: self.max_key_bytes,
                max_value_bytes: self.max_value_bytes,
            },
            data_dir: Some(self.data_dir.unwrap_or_else(|| {
                let id = self.node_id.clone().unwrap_or_else(|| listen.to_string());
                default_data_dir(&id)
            })),
            sync: match self.sync {
                SyncArg::Always => SyncMode::Always,
                SyncArg::Interval => SyncMode::Interval(self.sync_interval.into()),
                SyncArg::Never => SyncMode::Never,
            },
            compact_after_bytes: self.compact_after_bytes,
            repair_truncate: self.repair_truncate,
            tombstone_grace: self.tombstone_grace.into(),
            handoff_capacity: self.handoff_capacity,
            anti_entropy_interval: self.anti_entropy_interval.into(),
            gossip_port: self.gossip_port,
            gossip_interval: self.gossip_interval.into(),
            cluster_name: self.cluster_name,
            cluster_token: self
                .cluster_token_file
                .as_deref()
                .map(ClusterToken::read)
                .transpose()?,
            max_clock_offset: self.max_clock_offset.into(),
            clock_skew_nanos: 0,
            tls,
            restore: self.restore.clone(),
            bounds: ClientBounds {
                max_list_memory: self.max_list_memory,
                list_idle_timeout: self.list_idle_timeout.into(),
                max_concurrent_streams: self.max_concurrent_streams,
                request_body_timeout: self.request_body_timeout.into(),
                max_connections: self.max_connections,
                idle_timeout: self.idle_timeout.into(),
            },
        };
        Ok((listen, config))
    }
}

/// `kvstore-data/NODE_ID`, with characters that are awkward in file names replaced.
pub fn default_data_dir(node_id: &str) -> PathBuf {
    let safe: String = node_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from("kvstore-data").join(safe)
}

fn parse_nonzero(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A count of queued writes or threads: 1 to a million. Each is preallocated or spawned, so
/// an absurd one fails at start (or panics deep in tokio) rather than being a setting.
fn parse_count(s: &str) -> Result<usize, String> {
    match parse_nonzero(s)? {
        n if n > 1_000_000 => Err("must be at most 1000000".into()),
        n => Ok(n),
    }
}

fn parse_replicas(s: &str) -> Result<usize, String> {
    match parse_nonzero(s)? {
        n if n > MAX_REPLICAS => Err(format!("must be at most {MAX_REPLICAS}")),
        n => Ok(n),
    }
}

fn parse_compact_after(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n < 64 * 1024 => Err("must be at least 65536 (64 KiB)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A duration from `min` to ten years (e.g. 500ms, 2s, 7d).
pub fn duration_from(s: &str, min: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < min {
        return Err(format!(
            "must be at least {}",
            humantime::format_duration(min)
        ));
    }
    if d > MAX_FLAG_DURATION {
        return Err(format!(
            "must be at most {}",
            humantime::format_duration(MAX_FLAG_DURATION)
        ));
    }
    Ok(d)
}

/// For waits and intervals that 0 would break: a deadline nothing meets, an interval that
/// spins.
pub fn at_least_1ms(s: &str) -> Result<Duration, String> {
    duration_from(s, Duration::from_millis(1))
}

// The server's duration flags, as clap takes them: `humantime::Duration` shows its default in
// `--help` the way it is typed (`1s`, `7days`), from the same constant `NodeConfig` uses.
fn flag_any(s: &str) -> Result<humantime::Duration, String> {
    duration_from(s, Duration::ZERO).map(Into::into)
}

fn flag_at_least_1ms(s: &str) -> Result<humantime::Duration, String> {
    at_least_1ms(s).map(Into::into)
}

fn flag_gossip_interval(s: &str) -> Result<humantime::Duration, String> {
    let d = at_least_1ms(s)?;
    if !(MIN_GOSSIP_INTERVAL..=MAX_GOSSIP_INTERVAL).contains(&d) {
        return Err(format!(
            "must be from {} to {}",
            humantime::format_duration(MIN_GOSSIP_INTERVAL),
            humantime::format_duration(MAX_GOSSIP_INTERVAL)
        ));
    }
    Ok(d.into())
}

fn parse_cluster_name(s: &str) -> Result<String, String> {
    let fits = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    match s.len() {
        1..=64 if s.chars().all(fits) => Ok(s.to_owned()),
        _ => Err("must be 1 to 64 letters, digits, '-', '_' or '.'".into()),
    }
}

fn flag_clock_offset(s: &str) -> Result<humantime::Duration, String> {
    let d = at_least_1ms(s)?;
    if d > MAX_MAX_CLOCK_OFFSET {
        return Err(format!(
            "must be at most {}",
            humantime::format_duration(MAX_MAX_CLOCK_OFFSET)
        ));
    }
    Ok(d.into())
}

fn flag_at_least_1s(s: &str) -> Result<humantime::Duration, String> {
    duration_from(s, Duration::from_secs(1)).map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(SocketAddr, NodeConfig), Error> {
        let mut argv = vec!["kvstore-server"];
        argv.extend_from_slice(args);
        ServerArgs::try_parse_from(argv).unwrap().into_config()
    }

    #[test]
    fn seed_style_arguments() {
        let (listen, config) = parse(&["5001", "5002,5003"]).unwrap();
        assert_eq!(listen.to_string(), "127.0.0.1:5001");
        assert_eq!(config.peers, ["127.0.0.1:5002", "127.0.0.1:5003"]);
        assert_eq!(config.write_quorum, WriteQuorum::Majority);
        assert_eq!(config.sync, SyncMode::Always);
        assert_eq!(
            config.data_dir,
            Some(PathBuf::from("kvstore-data/127.0.0.1_5001"))
        );
    }

    /// The flags' defaults and `NodeConfig::default()` come from the same constants: a node
    /// started with no flags is configured as a node made in code.
    #[test]
    fn flag_defaults_are_the_config_defaults() {
        let (_, from_flags) = parse(&["5001"]).unwrap();
        let defaults = NodeConfig::default();
        let comparable = |c: &NodeConfig| {
            format!(
                "{:?}",
                NodeConfig {
                    peers: Vec::new(),
                    data_dir: None,
                    ..c.clone()
                }
            )
        };
        assert_eq!(comparable(&from_flags), comparable(&defaults));
        // And --sync interval's default interval is the constant's.
        let (_, interval) = parse(&["5001", "--sync", "interval"]).unwrap();
        assert_eq!(interval.sync, SyncMode::Interval(DEFAULT_SYNC_INTERVAL));
    }

    #[test]
    fn gossip_flags_are_bounded() {
        let (_, config) = parse(&[
            "5001",
            "--gossip-port",
            "7946",
            "--gossip-interval",
            "250ms",
            "--cluster-name",
            "prod-eu.1",
        ])
        .unwrap();
        assert_eq!(config.gossip_port, Some(7946));
        assert_eq!(config.gossip_interval, Duration::from_millis(250));
        assert_eq!(config.cluster_name, "prod-eu.1");
        let refused = |args: &[&str]| {
            let mut argv = vec!["kvstore-server", "5001"];
            argv.extend_from_slice(args);
            ServerArgs::try_parse_from(argv).unwrap_err().to_string()
        };
        assert!(refused(&["--gossip-port", "0"]).contains("--gossip-port"));
        for interval in ["10ms", "2min"] {
            let err = refused(&["--gossip-interval", interval]);
            assert!(err.contains("must be from 50ms to 1m"), "{interval}: {err}");
        }
        for name in ["", "a b", "x/y", &"n".repeat(65)] {
            let err = refused(&["--cluster-name", name]);
            assert!(err.contains("letters, digits"), "{name:?}: {err}");
        }
        assert!(parse(&["5001", "--cluster-name", &"n".repeat(64)]).is_ok());
    }

    #[test]
    fn full_form_arguments() {
        let (listen, config) = parse(&[
            "--listen",
            "0.0.0.0:7000",
            "--node-id",
            "db1",
            "--peer",
            "db2:7000",
            "--peer",
            "10.1.2.3:7000",
            "--write-quorum",
            "all",
            "--replication-deadline",
            "250ms",
            "--max-value-bytes",
            "100",
        ])
        .unwrap();
        assert_eq!(listen.to_string(), "0.0.0.0:7000");
        assert_eq!(config.peers, ["db2:7000", "10.1.2.3:7000"]);
        assert_eq!(config.write_quorum, WriteQuorum::All);
        assert_eq!(config.replication_deadline, Duration::from_millis(250));
        assert_eq!(config.limits.max_value_bytes, 100);
    }

    #[test]
    fn a_ring_node_listening_everywhere_needs_its_address_and_copies_are_bounded() {
        let ring = [
            "--listen",
            "0.0.0.0:7000",
            "--node-id",
            "db1",
            "--peer",
            "db2:7000",
        ];
        let err = parse(&[&ring[..], &["--replicas", "1"]].concat()).unwrap_err();
        assert!(err.to_string().contains("--advertise"), "{err}");
        // Every node holding everything needs no name in a ring.
        assert!(parse(&ring).is_ok());
        let (_, config) =
            parse(&[&ring[..], &["--replicas", "1", "--advertise", "db1:7000"]].concat()).unwrap();
        assert_eq!(
            (config.replicas, config.advertise.as_deref()),
            (1, Some("db1:7000"))
        );
        let err = parse(&[&ring[..], &["--advertise", "db2:7000"]].concat()).unwrap_err();
        assert!(err.to_string().contains("also given as a peer"), "{err}");
        for bad in ["0", "65", "three"] {
            let args = ["kvstore-server", "5001", "--replicas", bad];
            assert!(ServerArgs::try_parse_from(args).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(parse(&[]).unwrap_err().to_string().contains("--listen"));
        let err = parse(&["--listen", "0.0.0.0:7000"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--node-id"), "{err}");
        let err = parse(&["5001", "db2"]).unwrap_err().to_string();
        assert!(err.contains("'db2'") && err.contains("host:port"), "{err}");
        let err = parse(&["5001", "5001"]).unwrap_err().to_string();
        assert!(err.contains("own peer"), "{err}");
        assert!(
            ServerArgs::try_parse_from(["kvstore-server", "5001", "--write-quorum", "most"])
                .is_err()
        );
    }

    #[test]
    fn a_cluster_token_is_read_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let path = file.to_str().unwrap();
        let (_, config) = parse(&["5001", "--cluster-token-file", path]).unwrap();
        assert_eq!(config.cluster_token, Some(ClusterToken::new("s3cret")));
        assert_eq!(
            format!("{:?}", config.cluster_token),
            "Some(ClusterToken(bytes: [6]))",
            "the secret stays out of logs"
        );
        // Several tokens, for a rotation: the first is sent, each is accepted.
        std::fs::write(&file, "new-one\r\n\nold\n  \n").unwrap();
        let (_, config) = parse(&["5001", "--cluster-token-file", path]).unwrap();
        let token = config.cluster_token.unwrap();
        assert_eq!(token.sent(), b"new-one");
        assert_eq!(
            token.accepted().collect::<Vec<_>>(),
            [&b"new-one"[..], b"old"]
        );
        std::fs::write(&file, " \n").unwrap();
        let err = parse(&["5001", "--cluster-token-file", path]).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        let missing = dir.path().join("missing");
        let err = parse(&["5001", "--cluster-token-file", missing.to_str().unwrap()]).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("--cluster-token-file") && err.contains("No such file"),
            "{err}"
        );
        let (_, config) = parse(&["5001"]).unwrap();
        assert_eq!(config.cluster_token, None);
    }

    #[test]
    fn duplicate_peers_are_refused() {
        let err = parse(&["5001", "5002,5002"]).unwrap_err().to_string();
        assert!(
            err.contains("127.0.0.1:5002") && err.contains("twice"),
            "{err}"
        );
        let err = parse(&["5001", "5002", "--peer", "127.0.0.1:5002"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn limits_a_log_record_cannot_hold_are_refused() {
        let max = MAX_KEY_AND_VALUE_BYTES.to_string();
        let at_max = (MAX_KEY_AND_VALUE_BYTES - DEFAULT_MAX_KEY_BYTES).to_string();
        let (_, config) = parse(&["5001", "--max-value-bytes", &at_max]).unwrap();
        assert_eq!(config.limits.max_message_bytes(), 64 * 1024 * 1024);
        for args in [
            &["5001", "--max-value-bytes", &max][..],
            &["5001", "--max-key-bytes", &max, "--max-value-bytes", "1"],
            // Their sum overflows: refused, not wrapped round to a tiny message limit.
            &[
                "5001",
                "--max-key-bytes",
                "2",
                "--max-value-bytes",
                &usize::MAX.to_string(),
            ],
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(
                err.contains("at most") && err.contains(&max),
                "{args:?}: {err}"
            );
        }
    }

    #[test]
    fn zero_or_absurd_settings_are_refused_by_name() {
        for (flag, value, problem) in [
            ("--replication-deadline", "0s", "at least 1ms"),
            ("--peer-connect-timeout", "0ms", "at least 1ms"),
            ("--sync-interval", "0s", "at least 1ms"),
            ("--anti-entropy-interval", "0s", "at least 1s"),
            ("--tombstone-grace", "0s", "at least 1s"),
            ("--replication-deadline", "300000000000y", "at most"),
            ("--shutdown-grace", "11years", "at most"),
            ("--max-key-bytes", "0", "at least 1"),
            ("--peer-mailbox", "0", "at least 1"),
            ("--peer-mailbox", "1000001", "at most 1000000"),
            ("--handoff-capacity", "99999999999", "at most 1000000"),
            ("--compact-after-bytes", "0", "at least 65536"),
            ("--max-clock-offset", "0s", "at least 1ms"),
            ("--max-clock-offset", "2days", "at most 1day"),
        ] {
            let err = ServerArgs::try_parse_from(["kvstore-server", "5001", flag, value])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(flag) && err.contains(problem),
                "{flag} {value}: {err}"
            );
        }
        // The bounds themselves are settings.
        let args = ["kvstore-server", "5001", "--shutdown-grace", "0s"];
        assert!(ServerArgs::try_parse_from(args).is_ok());
        let args = ["kvstore-server", "5001", "--tombstone-grace", "10y"];
        assert!(ServerArgs::try_parse_from(args).is_ok());
    }

    #[test]
    fn limits() {
        let limits = Limits {
            max_key_bytes: 4,
            max_value_bytes: 8,
        };
        assert!(limits.check_key("abcd").is_ok());
        assert!(limits.check_value("").is_ok());
        let empty = limits.check_key("").unwrap_err().to_string();
        assert_eq!(empty, "key must not be empty");
        let long = limits.check_key("abcde").unwrap_err().to_string();
        assert!(
            long.contains("5 bytes") && long.contains("limit of 4 bytes"),
            "{long}"
        );
        let big = limits.check_value("123456789").unwrap_err().to_string();
        assert!(big.contains("limit of 8 bytes"), "{big}");
    }

    #[test]
    fn only_the_same_secret_matches() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        for other in [
            &b""[..],
            b"s3cre",
            b"s3cret!",
            b"s3creT",
            b"S3cret",
            b"\0\0\0\0\0\0",
        ] {
            assert!(!same_secret(other, b"s3cret"), "{other:?}");
        }
    }
}
