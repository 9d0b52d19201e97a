//! The coordinator: a node's write path and the one handle the gRPC layer talks to.
//!
//! A Put or Delete is stored by the store actor, which gives it a version; then the coordinator
//! hands the versioned write to every peer's replication actor at once and waits for their
//! answers, but never past the replication deadline. A peer whose mailbox is full is not waited
//! for at all. The outcome names every peer the write did not reach and says whether the write
//! quorum (counting this node) was met.
//!
//! The local write is kept whatever the peers say: it has a version, so when it does reach
//! them later it converges like any other write. A write below quorum is reported as such
//! (`ok = false`) rather than rolled back, because a rollback would itself be a write racing
//! the first one.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::join_all;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use kameo::actor::ActorRef;
use kameo::error::SendError;
use tracing::Instrument;

use crate::antientropy;
use crate::entry::{Entry, Write};
use crate::error::Error;
use crate::health::{PeerHealth, PeerState};
use crate::membership::RingState;
use crate::merge::{ListError, Source};
use crate::peer::{PeerClient, PeerError};
use crate::placement::{Holders, PartitionSet, Placement};
use crate::replication::{Repair, Replicate, ReplicationActor, Resync, SetScope};
use crate::store::{self, StoreActor, StoreReader, StoreStats};

/// Time beyond the replication deadline a write may wait for the local log before it is
/// answered as not durable: fsync normally takes milliseconds, so this only trips on a disk
/// that has stalled.
const LOCAL_SYNC_GRACE: Duration = Duration::from_secs(5);

/// How many nodes, counting the local one, must hold a write before its Ack says `ok`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteQuorum {
    /// Every node.
    All,
    /// More than half of the nodes.
    #[default]
    Majority,
    /// The local node alone.
    One,
}

impl WriteQuorum {
    /// Acks needed out of `nodes` nodes.
    pub fn required(self, nodes: usize) -> usize {
        match self {
            Self::All => nodes,
            Self::Majority => nodes / 2 + 1,
            Self::One => 1,
        }
    }
}

impl fmt::Display for WriteQuorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::All => "all",
            Self::Majority => "majority",
            Self::One => "one",
        })
    }
}

impl FromStr for WriteQuorum {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Self::All),
            "majority" => Ok(Self::Majority),
            "one" => Ok(Self::One),
            other => Err(format!(
                "unknown write quorum '{other}' (expected all, majority or one)"
            )),
        }
    }
}

/// When a write answers: after every peer's attempt, or once the write quorum has it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AckAfter {
    /// After every peer has confirmed the write, failed, or run out the deadline: the Ack
    /// tells of each peer (the original Go system's behaviour).
    #[default]
    All,
    /// As soon as the write quorum holds the write durably. The other peers still get it,
    /// through the same replication actors; the Ack says how many were pending.
    Quorum,
}

impl fmt::Display for AckAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::All => "all",
            Self::Quorum => "quorum",
        })
    }
}

impl FromStr for AckAfter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Self::All),
            "quorum" => Ok(Self::Quorum),
            other => Err(format!(
                "unknown ack-after '{other}' (expected all or quorum)"
            )),
        }
    }
}

/// Why a write did not reach a peer before the deadline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerFailure {
    /// The delivery was attempted and failed.
    Failed(PeerError),
    /// No answer before the replication deadline. The delivery may still happen later.
    TimedOut(Duration),
    /// The peer's replication mailbox was full: the write was not queued for it.
    Lagging,
    /// The peer's replication actor has stopped (the node is shutting down).
    Stopped,
}

impl fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed(e) => write!(f, "{e}"),
            Self::TimedOut(d) => write!(f, "timed out after {}ms", d.as_millis()),
            Self::Lagging => f.write_str("lagging, marked for resync"),
            Self::Stopped => f.write_str("replication stopped"),
        }
    }
}

/// The result of a replicated write, as the client will be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Nodes in the cluster, this one included.
    pub nodes: usize,
    /// Nodes known to hold the write, this one included.
    pub acks: usize,
    /// The quorum rule in force.
    pub quorum: WriteQuorum,
    /// Peers the write did not reach, with why, in configuration order.
    pub failures: Vec<(String, PeerFailure)>,
    /// Peers still being sent the write when it answered (`--ack-after quorum`).
    pub pending: usize,
    /// While the ring changes, each ring's acks and copies of the key: the write must reach
    /// the quorum of each. Empty when one ring places the key.
    pub rings: Vec<(usize, usize)>,
    /// The version the write was stored under.
    pub version: crate::version::Version,
}

impl WriteOutcome {
    /// Acks the quorum requires.
    pub fn required(&self) -> usize {
        self.quorum.required(self.nodes)
    }

    /// Whether the write reached the write quorum: of each ring, while the ring changes.
    pub fn ok(&self) -> bool {
        if self.rings.is_empty() {
            return self.acks >= self.required();
        }
        (self.rings.iter()).all(|&(acks, nodes)| acks >= self.quorum.required(nodes))
    }

    /// The Ack message. `verb` is what happened locally ("Stored", "Deleted"). With every peer
    /// confirmed it is the original Go system's "Stored and replicated".
    pub fn message(&self, verb: &str) -> String {
        if self.failures.is_empty() {
            return match self.pending {
                0 => format!("{verb} and replicated"),
                pending => format!(
                    "{verb} on {} of {} nodes; {pending} pending",
                    self.acks, self.nodes
                ),
            };
        }
        let failed: Vec<String> = self
            .failures
            .iter()
            .map(|(peer, why)| format!("{peer} ({why})"))
            .collect();
        let pending = match self.pending {
            0 => String::new(),
            pending => format!("; {pending} pending"),
        };
        let required = match self.rings.as_slice() {
            [] => format!("({} required)", self.required()),
            rings => {
                let each: Vec<String> = (rings.iter())
                    .map(|&(acks, nodes)| {
                        let required = self.quorum.required(nodes);
                        format!("{acks} of {nodes}, {required} required")
                    })
                    .collect();
                format!("of each ring while the ring changes ({})", each.join("; "))
            }
        };
        format!(
            "{verb} on {} of {} nodes, write quorum {} {required} {}; not replicated to {}{pending}",
            self.acks,
            self.nodes,
            self.quorum,
            if self.ok() { "met" } else { "NOT met" },
            failed.join(", ")
        )
    }
}

/// Settings of the write path.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub quorum: WriteQuorum,
    /// When a write answers.
    pub ack_after: AckAfter,
    /// How long a write (or a quorum read) waits for its peers before answering.
    pub replication_deadline: Duration,
    /// Capacity of each peer's replication mailbox.
    pub peer_mailbox: usize,
    /// Writes held per peer for redelivery before falling back to anti-entropy.
    pub handoff_capacity: usize,
    /// Time between periodic anti-entropy rounds with each peer.
    pub anti_entropy_interval: Duration,
    /// Which nodes hold which keys; `None` is every node holding every key, as is a
    /// placement with as many copies as nodes.
    pub placement: Option<Placement>,
}

/// One peer as the coordinator sees it.
struct Peer<P: PeerClient> {
    actor: ActorRef<ReplicationActor<P>>,
    health: Arc<PeerHealth>,
    /// For reads and read repair, which do not queue behind replication.
    client: P,
}

/// The node's peers and where keys live: replaced whole when the ring changes, read by
/// every request.
struct Topology<P: PeerClient> {
    peers: Vec<Arc<Peer<P>>>,
    /// Every peer's index: the holders of every key when there is no placement.
    all_peers: Vec<u16>,
    placement: Option<Arc<Placement>>,
}

impl<P: PeerClient> Topology<P> {
    /// Who holds `key` to read it: this node or not, and which peers.
    fn holders(&self, key: &str) -> Holders<'_> {
        match &self.placement {
            Some(placement) => placement.holders(key),
            None => Holders {
                local: true,
                peers: &self.all_peers,
                rings: &[],
            },
        }
    }

    /// Who takes the writes of `key` (its holders, and during a ring change, its next ones).
    fn write_holders(&self, key: &str) -> Holders<'_> {
        match &self.placement {
            Some(placement) => placement.write_holders(key),
            None => Holders {
                local: true,
                peers: &self.all_peers,
                rings: &[],
            },
        }
    }

    fn peer(&self, i: u16) -> &Peer<P> {
        &self.peers[usize::from(i)]
    }
}

/// Handle to a node's actors. Cheap to share behind an `Arc`.
pub struct Coordinator<P: PeerClient> {
    store: ActorRef<StoreActor>,
    reader: StoreReader,
    topology: Arc<arc_swap::ArcSwap<Topology<P>>>,
    /// Held while the ring changes, so that two changes are adopted one after the other.
    adopting: std::sync::Mutex<()>,
    config: CoordinatorConfig,
    ticker: tokio::task::JoinHandle<()>,
    clock: Arc<crate::clock::Clock>,
    /// Whether the node refused writes at the last check of its clock (see `clock_check`).
    refusing_writes: std::sync::atomic::AtomicBool,
    /// Writes this node took from clients that met the write quorum, and that did not.
    quorum_met: AtomicU64,
    quorum_missed: AtomicU64,
}

/// What the store's refusal of a write, or its absence, means to a caller.
fn store_error<M>(error: SendError<M, Error>) -> Error {
    match error {
        SendError::HandlerError(error) => error,
        _ => Error::StoreStopped,
    }
}

/// Why a quorum read could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "quorum read: {answered} of {nodes} nodes answered, {required} required; no answer from {}",
        missing.join(", ")
    )]
    NoQuorum {
        answered: usize,
        nodes: usize,
        required: usize,
        /// Each peer that did not answer, with why: "addr (reason)".
        missing: Vec<String>,
    },
    #[error(
        "this node holds no copy of the key, and none of its {} holders answered: {}",
        missing.len(),
        missing.join(", ")
    )]
    NoCopy {
        /// Each holder, with why it did not answer: "addr (reason)".
        missing: Vec<String>,
    },
    #[error(transparent)]
    Local(#[from] Error),
}

/// A node's state as reported by `Status`.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    pub store: StoreStats,
    pub peers: Vec<PeerStatus>,
    /// How far two clocks may differ.
    pub max_clock_offset: Duration,
    /// Why the node takes no writes now, if it does not: its clock is off from most of its
    /// peers'.
    pub refusing_writes: Option<String>,
}

/// A List in progress: a view of the map as of when it began, and its keys in order.
pub struct Listing {
    view: crate::view::ListView,
    keys: Vec<Box<str>>,
    next: usize,
    /// Tombstones older than this are left out of entries, as anti-entropy leaves them out.
    expired_before: Option<u64>,
}

impl Listing {
    /// The next pairs, from up to `keys` keys, and no more once they hold `bytes` (fewer
    /// pairs where keys were absent or deleted when the List began); empty when it is done.
    pub fn next_chunk(&mut self, keys: usize, bytes: usize) -> Vec<(String, String)> {
        self.next_by(
            keys,
            bytes,
            |view, key| view.read(key),
            |(k, v)| k.len() + v.len(),
        )
    }

    /// The next entries, tombstones included (see [`ListView::read_entries`]), as
    /// [`Listing::next_chunk`] reads pairs: what a backup holds.
    ///
    /// [`ListView::read_entries`]: crate::view::ListView::read_entries
    pub fn next_entries(&mut self, keys: usize, bytes: usize) -> Vec<Write> {
        let expired_before = self.expired_before;
        self.next_by(
            keys,
            bytes,
            |view, key| view.read_entries(key, expired_before),
            |w| w.key.len() + w.entry.value.as_deref().map_or(0, str::len),
        )
    }

    /// What `read` gives for the next keys, up to `keys` of them and no more once `size`
    /// of what was read passes `bytes`; then tells the view how far the List has read.
    fn next_by<T>(
        &mut self,
        keys: usize,
        bytes: usize,
        read: impl Fn(&crate::view::ListView, &[Box<str>]) -> Vec<T>,
        size: impl Fn(&T) -> usize,
    ) -> Vec<T> {
        let mut items = Vec::new();
        let mut held = 0;
        while self.next < self.keys.len() && items.len() < keys && held < bytes {
            let key = &self.keys[self.next..=self.next];
            self.next += 1;
            for item in read(&self.view, key) {
                held += size(&item);
                items.push(item);
            }
        }
        if let Some(last) = self.next.checked_sub(1).and_then(|i| self.keys.get(i)) {
            self.view.read_through(last);
        }
        items
    }

    /// Pre-images the List holds for keys written since it began, not yet read.
    pub fn saved(&self) -> usize {
        self.view.saved()
    }

    /// Bytes the keys hold, about.
    pub fn key_bytes(&self) -> usize {
        (self.keys.iter())
            .map(|k| k.len() + std::mem::size_of::<Box<str>>())
            .sum()
    }
}

/// A List over a ring in progress (see [`Coordinator::list_ring`]).
pub struct RingListing {
    /// Bytes this node's own keys take, which it holds for the List.
    pub key_bytes: usize,
    /// Peers the List reads from, each a stream.
    pub remote: usize,
    /// The pairs, in key order, a chunk at a time.
    pub chunks: futures::stream::BoxStream<'static, Result<Vec<(String, String)>, ListError>>,
}

/// A listing's pairs as a stream, a pair at a time (read from the view a chunk at a time).
fn local_pairs(listing: Listing) -> crate::merge::Pairs {
    futures::stream::unfold(listing, |mut listing| async move {
        let chunk = listing.next_chunk(256, 256 * 1024);
        (!chunk.is_empty()).then(|| (futures::stream::iter(chunk.into_iter().map(Ok)), listing))
    })
    .flatten()
    .boxed()
}

/// One peer in a [`NodeStatus`].
#[derive(Clone, Debug)]
pub struct PeerStatus {
    pub addr: String,
    pub state: PeerState,
    /// Whether the peer failed the last exchange (see [`crate::health::PeerHealth::unanswered`]).
    pub unanswered: bool,
    /// Why the peer refuses this node, if it did when last asked
    /// (see [`crate::health::PeerHealth::refusal`]).
    pub refusal: Option<String>,
    pub backlog: u64,
    pub needs_resync: bool,
    pub resyncing: bool,
    pub last_contact: Option<Duration>,
    /// Batches and writes the peer has confirmed since this node started.
    pub confirmed_batches: u64,
    pub confirmed_writes: u64,
    /// How far the peer's clock is ahead of this node's (negative: behind), in nanoseconds,
    /// as last measured.
    pub clock_offset: Option<i64>,
    /// Writes waiting for a batch to the peer or being delivered.
    pub in_flight: u64,
    /// Anti-entropy rounds with the peer, and what they repaired.
    pub anti_entropy: crate::health::AntiEntropyCounts,
}

impl<P: PeerClient> Coordinator<P> {
    /// Spawns `store` and one replication actor per `(address, client)` peer.
    pub fn start(store: StoreActor, peers: Vec<(String, P)>, config: CoordinatorConfig) -> Self {
        let reader = store.reader();
        let clock = store.clock().clone();
        let store = crate::spawn_in_span(store, store::STORE_MAILBOX);
        if let Some(placement) = &config.placement {
            assert_eq!(
                placement.peers(),
                peers.len(),
                "the placement was made for another set of peers"
            );
        }
        let placement = config.placement.clone().map(Arc::new);
        if let Some(placement) = placement.as_ref().filter(|p| !p.is_everywhere()) {
            // Keys of partitions this node gave up before a restart, brought back by its log:
            // let go of from the first message on, and dropped meanwhile.
            let keep = *placement.write_local();
            let _ = store.tell(store::Retain(keep)).try_send();
            let (store, reader) = (store.clone(), reader.clone());
            tokio::spawn(
                async move {
                    if let Ok(gone) = store::drop_outside(&store, &reader, keep).await
                        && gone > 0
                    {
                        tracing::info!(
                            keys = gone,
                            "dropped the keys of partitions this node gave up"
                        );
                    }
                }
                .in_current_span(),
            );
        }
        let peers: Vec<Arc<Peer<P>>> = peers
            .into_iter()
            .enumerate()
            .map(|(i, (addr, client))| {
                // Anti-entropy with a peer compares only the partitions both nodes hold.
                let scope = (placement.as_ref()).map_or(PartitionSet::all(), |p| p.shared_with(i));
                Arc::new(Self::spawn_peer(
                    addr, client, scope, &store, &reader, &config,
                ))
            })
            .collect();
        let topology = Arc::new(arc_swap::ArcSwap::from_pointee(Topology {
            all_peers: (0..peers.len() as u16).collect(),
            peers,
            placement,
        }));
        let ticker = {
            let topology = Arc::downgrade(&topology);
            let every = config.anti_entropy_interval;
            tokio::spawn(
                async move {
                    let mut tick =
                        tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                    loop {
                        tick.tick().await;
                        let Some(topology) = topology.upgrade() else {
                            return;
                        };
                        for peer in &topology.load().peers {
                            // A full mailbox already means a busy peer; the next tick will do.
                            let _ = peer.actor.tell(Resync).try_send();
                        }
                    }
                }
                .in_current_span(),
            )
        };
        Self {
            store,
            reader,
            topology,
            adopting: std::sync::Mutex::new(()),
            config,
            ticker,
            clock,
            refusing_writes: std::sync::atomic::AtomicBool::new(false),
            quorum_met: AtomicU64::new(0),
            quorum_missed: AtomicU64::new(0),
        }
    }

    /// Starts the replication actor of one peer, whose anti-entropy compares `scope`.
    fn spawn_peer(
        addr: String,
        client: P,
        scope: PartitionSet,
        store: &ActorRef<StoreActor>,
        reader: &StoreReader,
        config: &CoordinatorConfig,
    ) -> Peer<P> {
        let health = Arc::new(PeerHealth::new(addr));
        let actor = crate::spawn_in_span(
            ReplicationActor::new(
                client.clone(),
                health.clone(),
                store.clone(),
                reader.clone(),
                config.handoff_capacity,
                config.peer_mailbox,
            )
            .with_drain_limit(config.replication_deadline)
            .with_scope(scope),
            config.peer_mailbox,
        );
        Peer {
            actor,
            health,
            client,
        }
    }

    /// The ring this node is in, and any change of it under way; `None` for a node given no
    /// placement.
    pub fn ring_state(&self) -> Option<RingState> {
        (self.topology.load().placement.as_ref()).map(|p| p.state().clone())
    }

    /// The ids of the members of the ring (either ring, during a change) that are not yet
    /// this node's peers: those [`Coordinator::adopt`] needs a client for.
    pub fn strangers(&self, state: &RingState) -> Vec<String> {
        let topology = self.topology.load();
        let me = (topology.placement.as_ref()).map(|p| p.me().to_owned());
        let known: Vec<&str> = topology.peers.iter().map(|p| p.health.addr()).collect();
        (state.members().into_iter())
            .filter(|m| Some(m) != me.as_ref() && !known.contains(&m.as_str()))
            .collect()
    }

    /// Moves the node to `state` if it is newer than the node's own (see
    /// [`RingState::epoch`]), with a client for each of its [`Coordinator::strangers`]: starts
    /// their replication, points each peer's anti-entropy at the partitions both now hold, and
    /// once a change has settled drops the keys of the partitions this node gave up. Returns
    /// whether it moved.
    pub async fn adopt(
        &self,
        state: RingState,
        new_peers: Vec<(String, P)>,
    ) -> Result<bool, Error> {
        let keep = {
            let _one_at_a_time = self.adopting.lock().expect("adopting poisoned");
            let old = self.topology.load_full();
            let Some(placement) = &old.placement else {
                return Err(Error::Ring("this node was started without a ring".into()));
            };
            if state.epoch() <= placement.state().epoch() {
                return Ok(false);
            }
            // Peers that are members of either ring stay, in their order; the others (a node
            // that has left) are stopped; new members come last.
            let members = state.members();
            let (kept, gone): (Vec<_>, Vec<_>) = (old.peers.iter().enumerate())
                .partition(|(i, _)| members.contains(&placement.peer_ids()[*i]));
            let mut ids: Vec<String> = (kept.iter())
                .map(|(i, _)| placement.peer_ids()[*i].clone())
                .collect();
            ids.extend(new_peers.iter().map(|(id, _)| id.clone()));
            let next = Arc::new(Placement::of(state, placement.me(), &ids)?);
            let mut peers = Vec::with_capacity(ids.len());
            for (j, (i, peer)) in kept.into_iter().enumerate() {
                let scope = next.shared_with(j);
                if scope != placement.shared_with(i) {
                    // Into the mailbox behind what is queued, ahead of the round started
                    // below; a full one waits its turn in a task, since a scope must not be
                    // lost. A round with the old scope is harmless: the store keeps only the
                    // partitions it takes.
                    if let Err(SendError::MailboxFull(message)) =
                        peer.actor.tell(SetScope(scope)).try_send()
                    {
                        let actor = peer.actor.clone();
                        tokio::spawn(async move { actor.tell(message).await });
                    }
                }
                peers.push(peer.clone());
            }
            for (_, peer) in gone {
                tracing::info!(peer = %peer.health.addr(), "no longer a member; replication to it stops");
                let actor = peer.actor.clone();
                tokio::spawn(async move {
                    let _ = actor.stop_gracefully().await;
                });
            }
            for (id, client) in new_peers {
                let scope = next.shared_with(peers.len());
                peers.push(Arc::new(Self::spawn_peer(
                    id,
                    client,
                    scope,
                    &self.store,
                    &self.reader,
                    &self.config,
                )));
            }
            // What the node keeps from now on: during a change, both rings' partitions. The
            // store is told only when that changes: it scans the whole map.
            let keep = (!next.is_everywhere()
                && (placement.is_everywhere() || next.write_local() != placement.write_local()))
            .then(|| *next.write_local());
            tracing::info!(
                ring_version = next.state().ring().version(),
                phase = next.state().phase().name(),
                members = next.state().members().len(),
                partitions = next.local().len(),
                "ring changed"
            );
            self.topology.store(Arc::new(Topology {
                all_peers: (0..peers.len() as u16).collect(),
                peers,
                placement: Some(next),
            }));
            keep
        };
        if let Some(keep) = keep {
            (self.store.ask(store::Retain(keep)).await).map_err(|_| Error::StoreStopped)?;
            let gone = store::drop_outside(&self.store, &self.reader, keep).await?;
            if gone > 0 {
                tracing::info!(
                    keys = gone,
                    "dropped the keys of partitions moved to other nodes"
                );
            }
        }
        // A new holder starts filling its partitions now, not at the next period.
        self.resync_peers();
        Ok(true)
    }

    /// This node's anti-entropy digest, for a peer. Scans the map off the async threads, in
    /// turn with other whole-map scans (see `StoreReader::scan`).
    pub async fn digest(&self, buckets: u32, scope: PartitionSet) -> Vec<u64> {
        if scope.is_empty() {
            // A peer checking that this node is there: nothing to scan for.
            return vec![0; buckets as usize];
        }
        self.reader
            .scan(move |reader| antientropy::digest(reader, buckets, &scope))
            .await
    }

    /// Every entry of the partitions of `scope` in buckets `which` (of `buckets`), for a peer,
    /// tombstones included: one scan of the map, in turn with the others, handed over a shard's
    /// worth at a time as the peer reads them, so what is held at once is a shard's worth,
    /// however many buckets differ.
    pub fn entries_in(
        &self,
        buckets: u32,
        which: Vec<u32>,
        scope: &PartitionSet,
    ) -> tokio::sync::mpsc::Receiver<Vec<Write>> {
        antientropy::stream_buckets(self.reader.clone(), buckets, which, scope)
    }

    /// The node's clock.
    pub fn clock(&self) -> &crate::clock::Clock {
        &self.clock
    }

    /// Starts an anti-entropy round with every peer now, rather than at the next period: after
    /// the node was seeded behind replication's back (a restore), say.
    pub fn resync_peers(&self) {
        for peer in &self.topology.load().peers {
            // A full mailbox means a busy peer; the periodic round will come.
            let _ = peer.actor.tell(Resync).try_send();
        }
    }

    /// Writes taken from clients since the node started that met the write quorum, and that
    /// did not (kept here, and delivered to the peers later).
    pub fn write_outcomes(&self) -> (u64, u64) {
        (
            self.quorum_met.load(Ordering::Relaxed),
            self.quorum_missed.load(Ordering::Relaxed),
        )
    }

    /// The node's state: its store and every peer's health.
    pub async fn status(&self) -> Result<NodeStatus, Error> {
        let store = self
            .store
            .ask(store::Stats)
            .await
            .map_err(|_| Error::StoreStopped)?;
        let refusing_writes = self.clock_check().err().map(|e| e.to_string());
        let peers = (self.topology.load().peers.iter())
            .map(|p| {
                let (confirmed_batches, confirmed_writes) = p.health.confirmed();
                PeerStatus {
                    clock_offset: p.client.clock_offset(),
                    addr: p.health.addr().to_string(),
                    state: p.health.state(),
                    unanswered: p.health.unanswered(),
                    refusal: p.health.refusal(),
                    backlog: p.health.backlog(),
                    needs_resync: p.health.needs_resync(),
                    resyncing: p.health.resyncing(),
                    last_contact: p.health.last_contact(),
                    confirmed_batches,
                    confirmed_writes,
                    in_flight: p.health.in_flight(),
                    anti_entropy: p.health.anti_entropy(),
                }
            })
            .collect();
        Ok(NodeStatus {
            store,
            peers,
            max_clock_offset: self.clock.max_offset(),
            refusing_writes,
        })
    }

    /// Whether this node may issue versions: not if its clock is more than the bound off from
    /// most of its peers' (see `Clock`), as last measured. Each peer's clock found beyond the
    /// bound, or back within it, is logged once; so is this node's own refusal, and its end.
    fn clock_check(&self) -> Result<(), Error> {
        let bound = self.clock.max_offset();
        let topology = self.topology.load();
        let peer_count = topology.peers.len();
        let mut off: Vec<i64> = (topology.peers.iter())
            .filter_map(|p| {
                let offset = p.client.clock_offset()?;
                p.health.note_clock(offset, bound).then_some(offset)
            })
            .collect();
        let refusing = off.len() * 2 > peer_count;
        // A load first: this runs on every write, and nearly always nothing changes.
        let was = &self.refusing_writes;
        if was.load(std::sync::atomic::Ordering::Relaxed) != refusing
            && was.swap(refusing, std::sync::atomic::Ordering::Relaxed) != refusing
        {
            if refusing {
                tracing::warn!(
                    peers_off = off.len(),
                    peers = peer_count,
                    "this node's clock is off from most of its peers': refusing writes"
                );
            } else {
                tracing::info!("this node's clock agrees with its peers' again: taking writes");
            }
        }
        if !refusing {
            return Ok(());
        }
        off.sort_unstable();
        // The peers' clocks minus ours: this node is behind where they are ahead.
        let median = off[off.len() / 2];
        Err(Error::ClockOff {
            offset: Duration::from_nanos(median.unsigned_abs()),
            ahead: median < 0,
            off: off.len(),
            peers: peer_count,
            bound,
        })
    }

    /// The copies each key has, and the partitions (of [`crate::ring::PARTITIONS`]) this node
    /// holds a copy of.
    pub fn share(&self) -> (usize, usize) {
        let topology = self.topology.load();
        match &topology.placement {
            // During a change, those it takes or still keeps: a joining node's fill as well.
            Some(p) => (p.ring().width(), p.write_local().len()),
            None => (
                topology.peers.len() + 1,
                usize::from(crate::ring::PARTITIONS),
            ),
        }
    }

    /// The placement of keys, if the node was given one (see [`Placement::is_everywhere`]).
    pub fn placement(&self) -> Option<Arc<Placement>> {
        self.topology.load().placement.clone()
    }

    /// The entry of `key`, tombstones included, from one copy: this node's if it holds the
    /// key, or else the first of the key's holders that answers, the peers seen up first.
    pub async fn read(&self, key: String) -> Result<Option<Entry>, ReadError> {
        if self.topology.load().holders(&key).local {
            return Ok(self.reader.get_entry(&key));
        }
        let topology = self.topology.load_full();
        let holders = topology.holders(&key);
        let mut order: Vec<&Peer<P>> = holders.peers.iter().map(|&i| topology.peer(i)).collect();
        order.sort_by_key(|p| p.health.state() != PeerState::Up);
        // Each holder gets its share of the deadline: one that hangs must not leave the
        // others no time to answer.
        let each = self.config.replication_deadline / order.len().max(1) as u32;
        let mut missing = Vec::new();
        for peer in order {
            match tokio::time::timeout(each, peer.client.read(key.clone())).await {
                Ok(Ok(entry)) => {
                    // A write made here after this read then orders after what it read, as
                    // it would on a holder.
                    if let Some(entry) = &entry {
                        self.clock.observe(&entry.version);
                    }
                    return Ok(entry);
                }
                Ok(Err(error)) => missing.push(format!("{} ({error})", peer.health.addr())),
                Err(_) => missing.push(format!(
                    "{} (timed out after {}ms)",
                    peer.health.addr(),
                    each.as_millis()
                )),
            }
        }
        Err(ReadError::NoCopy { missing })
    }

    /// Reads `key` from a majority of its holders (this node among them, if it is one) and
    /// returns the newest entry seen, tombstones included. Holders seen holding an older
    /// entry, this node too, are repaired in the background.
    pub async fn get_quorum(&self, key: String) -> Result<Option<Entry>, ReadError> {
        let deadline = tokio::time::Instant::now() + self.config.replication_deadline;
        let topology = self.topology.load_full();
        let holders = topology.holders(&key);
        let local = match holders.local {
            true => Some(self.get_entry(key.clone()).await?),
            false => None,
        };
        let peers: Vec<&Peer<P>> = holders.peers.iter().map(|&i| topology.peer(i)).collect();
        let reads = peers.iter().map(|p| {
            let key = key.clone();
            async move { tokio::time::timeout_at(deadline, p.client.read(key)).await }
        });
        // Each peer's entry, or why it did not answer: a client told only how many answered
        // could not fix anything.
        let answers: Vec<Result<Option<Entry>, String>> = (join_all(reads).await.into_iter())
            .map(|r| match r {
                Ok(read) => read.map_err(|error| error.to_string()),
                Err(_) => Err("timed out".to_string()),
            })
            .collect();
        let nodes = holders.nodes();
        let required = WriteQuorum::Majority.required(nodes);
        let answered = usize::from(local.is_some()) + answers.iter().filter(|a| a.is_ok()).count();
        if answered < required {
            let missing = (peers.iter().zip(&answers))
                .filter_map(|(peer, answer)| {
                    let why = answer.as_ref().err()?;
                    Some(format!("{} ({why})", peer.health.addr()))
                })
                .collect();
            return Err(ReadError::NoQuorum {
                answered,
                nodes,
                required,
                missing,
            });
        }
        // A version too far ahead of this clock (written while a clock was wrong) is not taken
        // here, nor spread by repair: it would win over every write made after it.
        let newest = answers
            .iter()
            .flatten()
            .chain(local.iter())
            .flatten()
            .filter(|e| self.clock.beyond_bound(e.version.time).is_none())
            .max_by(|a, b| a.precedence().cmp(&b.precedence()))
            .cloned();
        if let Some(newest) = &newest {
            self.clock.observe(&newest.version);
            let repair = Write {
                key,
                entry: newest.clone(),
            };
            let stale = |seen: &Option<Entry>| {
                seen.as_ref()
                    .is_none_or(|e| e.precedence() < newest.precedence())
            };
            if local.as_ref().is_some_and(stale) {
                let _ = self.apply(vec![repair.clone()]).await;
            }
            for (peer, answer) in peers.iter().zip(&answers) {
                if let Ok(seen) = answer
                    && stale(seen)
                {
                    // Through the peer's replication actor, like any write: batched, held while
                    // the peer is down, and drained (or not) at shutdown with the rest. With
                    // its mailbox full, the peer is busy and anti-entropy will come by anyway.
                    if peer.actor.tell(Repair(repair.clone())).try_send().is_err() {
                        peer.health.mark_needs_resync();
                    }
                }
            }
        }
        Ok(newest)
    }

    /// Health of every peer, in configuration order.
    pub fn peers(&self) -> Vec<Arc<PeerHealth>> {
        (self.topology.load().peers.iter())
            .map(|p| p.health.clone())
            .collect()
    }

    /// Stores `value` under `key` on its holders.
    pub async fn put(&self, key: String, value: String) -> Result<WriteOutcome, Error> {
        self.write(key, Some(value)).await
    }

    /// Deletes `key` (stores a tombstone) on its holders.
    pub async fn delete(&self, key: String) -> Result<WriteOutcome, Error> {
        self.write(key, None).await
    }

    /// A client's write (`None` deletes), coordinated here whether or not this node holds the
    /// key. A holder stores it first, which gives it its version; a node that is not one gives
    /// it a version from its clock and sends it to the holders only.
    async fn write(&self, key: String, value: Option<String>) -> Result<WriteOutcome, Error> {
        self.clock_check()?;
        let topology = self.topology.load_full();
        let holders = topology.write_holders(&key);
        if !holders.local {
            let write = Write {
                key,
                entry: Entry {
                    value: value.map(String::into_boxed_str),
                    version: self.clock.now(),
                },
            };
            return Ok(self.replicate(write, &topology, holders).await);
        }
        let local = match value {
            Some(value) => self
                .store
                .ask(store::Put { key, value })
                .await
                .map_err(store_error),
            None => self
                .store
                .ask(store::Delete { key })
                .await
                .map_err(store_error),
        }?;
        self.finish_write(local, &topology, holders).await
    }

    /// Waits for the local log and the peers together: the peers do not wait for our fsync.
    /// A write this node could not make durable is an error, whatever the peers said: the
    /// client is told so, though the write may still take effect through the peers that have
    /// it. It is in this node's memory and theirs, and the log keeps it to write it first
    /// when it can (see `storage::writer`).
    async fn finish_write(
        &self,
        local: store::LocalWrite,
        topology: &Topology<P>,
        holders: Holders<'_>,
    ) -> Result<WriteOutcome, Error> {
        let durable = async {
            // Bounded, so a stalled disk cannot hang a Put.
            let limit = self.config.replication_deadline + LOCAL_SYNC_GRACE;
            match tokio::time::timeout(limit, local.durable.wait()).await {
                Ok(result) => result,
                Err(_) => Err(Error::Log(crate::error::LogError {
                    kind: crate::error::LogFailure::Stalled,
                    context: "waiting for the log".into(),
                    message: format!("not synced after {}ms (disk stalled?)", limit.as_millis()),
                })),
            }
        };
        let (durable, outcome) =
            futures::join!(durable, self.replicate(local.write, topology, holders));
        durable?;
        Ok(outcome)
    }

    /// Applies writes other nodes made, durably. Returns how many were newer than ours.
    ///
    /// In a ring, writes of partitions this node does not take are let go (see
    /// [`store::Retain`]): a node still finishing a ring change sends them to every holder
    /// the change had, and this node stopped being one. The nodes that hold the partition
    /// now are sent the write as well.
    pub async fn apply(&self, writes: Vec<Write>) -> Result<usize, Error> {
        let applied = self
            .store
            .ask(store::Apply(writes))
            .await
            .map_err(store_error)?;
        applied.wait().await
    }

    /// The live value of `key`, from this node alone.
    pub async fn get(&self, key: String) -> Result<Option<String>, Error> {
        Ok(self.reader.get(&key))
    }

    /// The stored entry of `key`, tombstones included.
    pub async fn get_entry(&self, key: String) -> Result<Option<Entry>, Error> {
        Ok(self.reader.get_entry(&key))
    }

    /// Every live pair, in key order, as of one instant, read lazily: the keys are copied
    /// now, and [`Listing::next_chunk`] reads values as they are wanted. What it holds is the
    /// keys, and the pre-images of keys written while it lives (see [`crate::view`]).
    pub async fn listing(&self) -> Result<Listing, Error> {
        self.listing_of(PartitionSet::all()).await
    }

    /// A [`Coordinator::listing`] of the keys of the partitions of `scope` only.
    pub async fn listing_of(&self, scope: PartitionSet) -> Result<Listing, Error> {
        let turn = self.reader.turn().await;
        let view = self
            .store
            .ask(store::TakeView)
            .await
            .map_err(|_| Error::StoreStopped)?;
        let expired_before = self.reader.expired_before();
        Ok(store::run_holding(turn, move || {
            let mut keys = view.sorted_keys();
            if !scope.is_all() {
                keys.retain(|k| scope.contains_key(k));
            }
            Listing {
                view,
                keys,
                next: 0,
                expired_before,
            }
        })
        .await)
    }

    /// Every live pair of the cluster, in key order, when this node holds only some
    /// partitions: its own, and each other partition's from one of its holders, merged (see
    /// [`crate::merge`]). Chunks hold up to `keys` pairs and stop once they hold `bytes`.
    pub async fn list_ring(&self, keys: usize, bytes: usize) -> Result<RingListing, ListError> {
        let topology = self.topology.load_full();
        let local_scope = match &topology.placement {
            Some(placement) => *placement.local(),
            None => PartitionSet::all(),
        };
        let listing = self.listing_of(local_scope).await?;
        let key_bytes = listing.key_bytes();
        let mut sources = vec![Source {
            name: "this node".into(),
            pairs: local_pairs(listing),
        }];
        let mut todo = PartitionSet::all().minus(&local_scope);
        let mut failed = vec![false; topology.peers.len()];
        let mut missing = Vec::new();
        let mut orphans = PartitionSet::none();
        while !todo.is_empty() {
            let placement = (topology.placement.as_ref()).expect("only a ring leaves any");
            // Each partition from its first holder not yet failed, those seen up first.
            let mut groups: std::collections::BTreeMap<u16, PartitionSet> = Default::default();
            for p in todo.iter() {
                let pick = (placement.peers_of(p).iter())
                    .filter(|&&i| !failed[usize::from(i)])
                    .min_by_key(|&&i| topology.peer(i).health.state() != PeerState::Up);
                match pick {
                    Some(&i) => groups.entry(i).or_insert_with(PartitionSet::none).insert(p),
                    None => orphans.insert(p),
                }
            }
            todo = PartitionSet::none();
            let topology = &topology;
            let scans = groups.iter().map(|(&i, scope)| async move {
                let peer = topology.peer(i);
                let deadline = self.config.replication_deadline;
                match tokio::time::timeout(deadline, peer.client.scan(scope)).await {
                    Ok(result) => result,
                    Err(_) => Err(PeerError::Unreachable(format!(
                        "no answer in {}ms",
                        deadline.as_millis()
                    ))),
                }
            });
            let started = join_all(scans).await;
            for ((&i, scope), result) in groups.iter().zip(started) {
                let peer = topology.peer(i);
                match result {
                    Ok(pairs) => sources.push(Source {
                        name: peer.health.addr().to_string(),
                        pairs,
                    }),
                    Err(error) => {
                        missing.push(format!("{} ({error})", peer.health.addr()));
                        failed[usize::from(i)] = true;
                        todo = todo.or(scope);
                    }
                }
            }
        }
        // Every holder of each partition was tried before giving up, so the error counts all
        // the partitions the List cannot read.
        if !orphans.is_empty() {
            return Err(ListError::NoHolder {
                partitions: orphans.len(),
                missing,
            });
        }
        Ok(RingListing {
            key_bytes,
            remote: sources.len() - 1,
            chunks: crate::merge::merge(sources, keys, bytes),
        })
    }

    /// Hands `write` to the replication actors of the key's holders and waits, up to the
    /// deadline, for them. This node counts as one copy if it holds the key (it has stored the
    /// write by then).
    async fn replicate(
        &self,
        write: Write,
        topology: &Topology<P>,
        holders: Holders<'_>,
    ) -> WriteOutcome {
        let write = &write;
        let wait = self.config.replication_deadline;
        let deadline = tokio::time::Instant::now() + wait;
        let targets = || holders.peers.iter().map(|&i| topology.peer(i));
        let deliveries = targets().map(|peer| {
            let write = write.clone();
            async move {
                // `try_send` enqueues without waiting for mailbox space (a full mailbox is an
                // answer, at once), then awaits the reply; the deadline bounds only that wait.
                // (kameo's `try_enqueue` would fit better but panics on a full mailbox in 0.22.)
                let delivery = peer.actor.ask(Replicate(write)).try_send();
                match tokio::time::timeout_at(deadline, delivery).await {
                    Ok(Ok(())) => None,
                    Ok(Err(SendError::MailboxFull(_))) => {
                        peer.health.mark_lagging();
                        Some(PeerFailure::Lagging)
                    }
                    Ok(Err(SendError::HandlerError(PeerError::Lagging))) => {
                        Some(PeerFailure::Lagging)
                    }
                    Ok(Err(SendError::HandlerError(error))) => Some(PeerFailure::Failed(error)),
                    Ok(Err(_)) => Some(PeerFailure::Stopped),
                    Err(_) => Some(PeerFailure::TimedOut(wait)),
                }
            }
        });
        let nodes = holders.nodes();
        let quorum = self.config.quorum;
        let ring_acks = |results: &[Option<Option<PeerFailure>>]| {
            holders.ring_acks(|i| matches!(results[i], Some(None)))
        };
        // Every delivery is queued on its peer's actor at the first poll; with
        // `--ack-after quorum` the answer goes as soon as the quorum holds the write (of each
        // ring, while the ring changes), and the deliveries still out go on in the actors,
        // their replies unread.
        let enough =
            |acks: usize, results: &[Option<Option<PeerFailure>>]| match self.config.ack_after {
                AckAfter::All => acks >= nodes,
                AckAfter::Quorum if holders.rings.is_empty() => acks >= quorum.required(nodes),
                AckAfter::Quorum => {
                    (ring_acks(results).iter()).all(|&(acks, nodes)| acks >= quorum.required(nodes))
                }
            };
        let mut deliveries: FuturesUnordered<_> = deliveries
            .enumerate()
            .map(|(i, d)| async move { (i, d.await) })
            .collect();
        let mut results: Vec<Option<Option<PeerFailure>>> = vec![None; holders.peers.len()];
        let mut acks = usize::from(holders.local);
        while !enough(acks, &results) {
            let Some((i, result)) = deliveries.next().await else {
                break;
            };
            acks += usize::from(result.is_none());
            results[i] = Some(result);
        }
        // Those already done count, though the answer did not wait for them.
        while let Some(Some((i, result))) = deliveries.next().now_or_never() {
            acks += usize::from(result.is_none());
            results[i] = Some(result);
        }
        drop(deliveries);
        let pending = results.iter().filter(|r| r.is_none()).count();
        let rings = ring_acks(&results);
        let failures: Vec<(String, PeerFailure)> = (targets().zip(results))
            .filter_map(|(peer, result)| {
                let failure = result.flatten()?;
                Some((peer.health.addr().to_string(), failure))
            })
            .collect();
        let outcome = WriteOutcome {
            nodes,
            acks,
            quorum,
            failures,
            pending,
            rings,
            version: write.entry.version,
        };
        let counter = if outcome.ok() {
            &self.quorum_met
        } else {
            &self.quorum_missed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !outcome.failures.is_empty() {
            tracing::warn!(
                acks = outcome.acks,
                nodes,
                quorum_met = outcome.ok(),
                failed = ?outcome.failures.iter().map(|(p, f)| format!("{p}: {f}")).collect::<Vec<_>>(),
                "write not replicated to every peer"
            );
        }
        outcome
    }

    /// Drains every actor: replication actors first, so writes already queued still go out,
    /// then the store.
    pub async fn shutdown(&self) {
        self.ticker.abort();
        // `wait_for_shutdown_result`, not `wait_for_shutdown`: in kameo 0.22 the latter returns
        // once the mailbox is closed, before `on_stop` has run, and the store's `on_stop` is
        // what syncs and closes the log. The hooks cannot fail (`Infallible`).
        //
        // Bounded: a handler still running (a redelivery of a long backlog to a slow peer) could
        // otherwise hold the node's stop for minutes. Past the bound the actor is killed, which
        // ends that handler; its `on_stop` still runs, and bounds itself.
        // The stop signal itself waits for room in a full mailbox, so it is under the bound too.
        // All peers at once, so the bound is the node's, not each peer's: two hung peers
        // must not take twice as long.
        let limit = 2 * self.config.replication_deadline;
        let topology = self.topology.load_full();
        join_all(topology.peers.iter().map(|peer| async move {
            let stopped = async {
                let _ = peer.actor.stop_gracefully().await;
                peer.actor.wait_for_shutdown_result().await
            };
            if tokio::time::timeout(limit, stopped).await.is_err() {
                tracing::warn!(peer = %peer.health.addr(), "replication did not stop in time; cut short");
                peer.actor.kill();
                let _ = peer.actor.wait_for_shutdown_result().await;
            }
        }))
        .await;
        let _ = self.store.stop_gracefully().await;
        let _ = self.store.wait_for_shutdown_result().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::testing::FakePeer;

    fn coordinator(
        peers: &[FakePeer],
        quorum: WriteQuorum,
        deadline: Duration,
        mailbox: usize,
    ) -> Coordinator<FakePeer> {
        let peers = peers
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("peer{}", i + 1), p.clone()))
            .collect();
        Coordinator::start(
            StoreActor::new(Arc::new(crate::clock::Clock::new(
                crate::version::NodeId::new("local").unwrap(),
            ))),
            peers,
            CoordinatorConfig {
                ack_after: AckAfter::All,
                quorum,
                replication_deadline: deadline,
                peer_mailbox: mailbox,
                handoff_capacity: 1000,
                anti_entropy_interval: Duration::from_secs(3600),
                placement: None,
            },
        )
    }

    #[tokio::test]
    async fn with_ack_after_quorum_a_write_answers_once_the_quorum_has_it_and_the_rest_follow() {
        let (fast, slow) = (FakePeer::default(), FakePeer::default());
        let node = Coordinator::start(
            StoreActor::new(Arc::new(crate::clock::Clock::new(
                crate::version::NodeId::new("local").unwrap(),
            ))),
            vec![
                ("peer1".into(), fast.clone()),
                ("peer2".into(), slow.clone()),
            ],
            CoordinatorConfig {
                ack_after: AckAfter::Quorum,
                quorum: WriteQuorum::Majority,
                replication_deadline: Duration::from_secs(10),
                peer_mailbox: 64,
                handoff_capacity: 100,
                anti_entropy_interval: Duration::from_secs(3600),
                placement: None,
            },
        );
        // Let the startup anti-entropy round finish before the peer turns slow.
        tokio::time::sleep(Duration::from_millis(50)).await;
        slow.delay_ms.store(1500, Ordering::Relaxed);
        let out = node.put("k".into(), "v".into()).await.unwrap();
        assert!(out.ok() && out.failures.is_empty(), "{out:?}");
        assert_eq!((out.acks, out.pending), (2, 1));
        assert_eq!(out.message("Stored"), "Stored on 2 of 3 nodes; 1 pending");
        assert_eq!(fast.received_keys(), ["k"]);
        assert!(
            slow.received_keys().is_empty(),
            "answered before the slow peer had it"
        );
        // The slow peer still gets it, through its replication actor.
        let waited = tokio::time::Instant::now();
        while slow.received_keys().is_empty() {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "the slow peer never got it"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A graceful stop returns only once the store has closed its log: the data dir is free
    /// for the next node, and holds what was written.
    #[tokio::test]
    async fn shutdown_returns_once_the_log_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::storage::tests::config();
        let clock = Arc::new(crate::clock::Clock::new(
            crate::version::NodeId::new("local").unwrap(),
        ));
        let store =
            StoreActor::recovered(clock, crate::Storage::open(dir.path(), &config).unwrap());
        let node = Coordinator::<FakePeer>::start(
            store,
            Vec::new(),
            CoordinatorConfig {
                ack_after: AckAfter::All,
                quorum: WriteQuorum::Majority,
                replication_deadline: Duration::from_secs(1),
                peer_mailbox: 16,
                handoff_capacity: 16,
                anti_entropy_interval: Duration::from_secs(3600),
                placement: None,
            },
        );
        node.put("k".into(), "v".into()).await.unwrap();
        node.shutdown().await;
        let recovered =
            crate::Storage::open(dir.path(), &config).expect("the log was closed and unlocked");
        assert_eq!(recovered.map.get("k").unwrap().value_str(), Some("v"));
    }

    #[tokio::test]
    async fn a_graceful_shutdown_delivers_the_writes_queued_behind_a_batch_in_flight() {
        let peer = FakePeer::default();
        let node = Arc::new(coordinator(
            std::slice::from_ref(&peer),
            WriteQuorum::One,
            Duration::from_secs(5),
            1024,
        ));
        // Let the startup anti-entropy round finish before the peer turns slow.
        tokio::time::sleep(Duration::from_millis(50)).await;
        peer.delay_ms.store(300, Ordering::Relaxed);
        let calls = peer.calls.load(Ordering::Relaxed);
        // The first write's batch is in flight for 300 ms; the others queue behind it.
        let puts: Vec<_> = (0..10)
            .map(|i| {
                let node = node.clone();
                tokio::spawn(async move { node.put(format!("k{i}"), "v".into()).await })
            })
            .collect();
        // Every put has been through the store before the stop (a put the stop beat would be
        // refused, rightly, and prove nothing); a wall-clock sleep would not say so on a busy
        // machine. From the store each goes straight on to its replication actor.
        let waited = std::time::Instant::now();
        for i in 0..10 {
            while node.get(format!("k{i}")).await.unwrap().is_none() {
                assert!(
                    waited.elapsed() < Duration::from_secs(10),
                    "k{i} never stored"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        node.shutdown().await;
        let mut stored = Vec::new();
        for (i, put) in puts.into_iter().enumerate() {
            if put.await.unwrap().is_ok() {
                stored.push(format!("k{i}"));
            }
        }
        assert_eq!(stored.len(), 10, "{stored:?}");
        // More than the one batch went out: the writes that waited behind it.
        assert!(peer.calls.load(Ordering::Relaxed) - calls >= 2);
        // Every write stored here reaches the peer: those behind the batch in flight from the
        // stopping actor, that batch on its own (waited for, bounded).
        let waited = std::time::Instant::now();
        loop {
            let received: std::collections::HashSet<String> =
                (peer.received.lock().unwrap().iter())
                    .map(|w| w.key.clone())
                    .collect();
            let missing: Vec<&String> = stored.iter().filter(|k| !received.contains(*k)).collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(5),
                "stored here, never sent: {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// In paused time: the sleeps below order the steps (the redelivery is hanging before the
    /// stop) whatever the machine's load, and the hour-long hang costs nothing.
    #[tokio::test(start_paused = true)]
    async fn shutdown_does_not_wait_for_a_peer_that_hangs() {
        let peer = FakePeer::default();
        let node = coordinator(
            std::slice::from_ref(&peer),
            WriteQuorum::One,
            Duration::from_millis(200),
            4,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The write's delivery fails, so it is held for redelivery; by the time that runs
        // (after a 100 ms backoff), every call to the peer hangs for an hour, inside the
        // actor's handler.
        peer.fail.store(true, Ordering::Relaxed);
        let out = node.put("k".into(), "v".into()).await.unwrap();
        assert_eq!(out.acks, 1, "{out:?}");
        peer.hang.store(true, Ordering::Relaxed);
        peer.fail.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Writes meanwhile fill the actor's mailbox (4 messages), behind the hung handler.
        for i in 0..8 {
            let out = node.put(format!("k{i}"), "v".into()).await.unwrap();
            assert_eq!(out.acks, 1, "{out:?}");
        }
        // Liveness, not speed: without the bound this waits for the hour.
        tokio::time::timeout(Duration::from_secs(30), node.shutdown())
            .await
            .expect("shutdown waited for the hanging peer");
    }

    /// Two hung peers stop together: the node's stop takes one peer's bound, not two. In
    /// paused time, so the figure is the code's, not the machine's.
    #[tokio::test(start_paused = true)]
    async fn hung_peers_are_stopped_together() {
        let deadline = Duration::from_millis(200);
        let peers = [FakePeer::default(), FakePeer::default()];
        let node = Arc::new(coordinator(&peers, WriteQuorum::One, deadline, 16));
        settled(&node).await;
        for peer in &peers {
            peer.hang.store(true, Ordering::Relaxed);
        }
        // Each peer's first batch hangs; the writes after it wait behind it, to be drained at
        // the stop, which then hangs too, up to its bound.
        for i in 0..4 {
            let node = node.clone();
            tokio::spawn(async move { node.put(format!("k{i}"), "v".into()).await });
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let started = tokio::time::Instant::now();
        node.shutdown().await;
        let took = started.elapsed();
        // One peer takes its bound, the deadline (its drain); one after the other, two peers
        // would take twice that.
        assert!(took < 2 * deadline, "stopping two hung peers took {took:?}");
        assert!(took >= deadline, "the peers did hang: {took:?}");
    }

    /// Waits until every peer has been reached and no round runs.
    async fn settled(node: &Coordinator<FakePeer>) {
        for _ in 0..12_000 {
            if node
                .peers()
                .iter()
                .all(|h| h.state() == PeerState::Up && !h.resyncing())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the peers never settled");
    }

    /// A quorum read repairs a stale peer through its replication actor, which the node's stop
    /// stops: nothing of the repair outlives the node, even when the peer hangs on it. (A task
    /// of its own would hold the peer's connection for as long as the peer hung.)
    #[tokio::test(start_paused = true)]
    async fn a_read_repair_does_not_outlive_the_node() {
        let peers = [FakePeer::default(), FakePeer::default()];
        let node = coordinator(&peers, WriteQuorum::One, Duration::from_millis(200), 16);
        settled(&node).await;
        // Peer 1 holds a newer version of "k" than this node and peer 2, which hangs on writes.
        let newer = crate::testing::write(
            "k",
            Some("new"),
            crate::clock::now_minus(Duration::ZERO),
            "n9",
        );
        peers[0].set_data(std::slice::from_ref(&newer));
        peers[1].hang_writes.store(true, Ordering::Relaxed);
        let read = node.get_quorum("k".into()).await.unwrap();
        assert_eq!(read.unwrap().value.as_deref(), Some("new"));
        // This node was repaired on the spot; peer 2's repair is on its way, and hangs.
        assert_eq!(node.get("k".into()).await.unwrap().as_deref(), Some("new"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            peers[1].calls.load(Ordering::Relaxed) > 0,
            "the repair went out"
        );
        // Held by: this test, the coordinator's handle, the replication actor and whatever
        // delivers the repair.
        assert!(Arc::strong_count(&peers[1].calls) > 2);
        node.shutdown().await;
        // Once stopped, only this test and the (stopped) coordinator's handle hold it.
        assert_eq!(Arc::strong_count(&peers[1].calls), 2);
    }

    #[tokio::test]
    async fn peers_scans_take_turns_with_lists() {
        let c = coordinator(&[], WriteQuorum::One, Duration::from_secs(1), 8);
        c.put("k".into(), "v".into()).await.unwrap();
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        // Every turn taken, as by that many Lists being copied.
        let mut held = Vec::new();
        for _ in 0..cpus {
            held.push(c.reader.turn().await);
        }
        let waited = tokio::time::timeout(
            Duration::from_millis(100),
            c.digest(16, PartitionSet::all()),
        )
        .await;
        assert!(waited.is_err(), "a digest ran beside {cpus} copies");
        let mut pull = c.entries_in(1, vec![0], &PartitionSet::all());
        let waited = tokio::time::timeout(Duration::from_millis(100), pull.recv()).await;
        assert!(waited.is_err(), "a pull ran beside {cpus} copies");
        drop(held);
        assert_eq!(pull.recv().await.map(|shard| shard.len()), Some(1));
        assert_eq!(pull.recv().await, None, "one entry, in one shard");
        assert_eq!(c.digest(16, PartitionSet::all()).await.len(), 16);
    }

    #[test]
    fn quorum_sizes() {
        assert_eq!(WriteQuorum::Majority.required(3), 2);
        assert_eq!(WriteQuorum::Majority.required(4), 3);
        assert_eq!(WriteQuorum::Majority.required(1), 1);
        assert_eq!(WriteQuorum::All.required(3), 3);
        assert_eq!(WriteQuorum::One.required(3), 1);
        assert_eq!("all".parse::<WriteQuorum>(), Ok(WriteQuorum::All));
        assert!("most".parse::<WriteQuorum>().unwrap_err().contains("most"));
    }

    #[tokio::test]
    async fn all_peers_confirm() {
        let peers = [FakePeer::default(), FakePeer::default()];
        let c = coordinator(&peers, WriteQuorum::All, Duration::from_secs(5), 8);
        let out = c.put("k".into(), "v".into()).await.unwrap();
        assert!(out.ok());
        assert_eq!(out.message("Stored"), "Stored and replicated");
        for p in &peers {
            // Deduplicated: the startup anti-entropy round may race the write and send it again.
            let mut got = p.received.lock().unwrap().clone();
            got.dedup();
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(got[0].key, "k");
            assert_eq!(got[0].entry.value.as_deref(), Some("v"));
        }
        assert!(c.peers().iter().all(|h| h.state() == PeerState::Up));
    }

    #[tokio::test]
    async fn dead_peer_is_named_and_quorum_judged() {
        let peers = [FakePeer::default(), FakePeer::default()];
        peers[1].fail.store(true, Ordering::Relaxed);
        let c = coordinator(&peers, WriteQuorum::Majority, Duration::from_secs(5), 8);
        let out = c.put("k".into(), "v".into()).await.unwrap();
        assert!(out.ok(), "2 of 3 meets majority");
        assert_eq!(out.acks, 2);
        let msg = out.message("Stored");
        assert!(
            msg.contains("peer2 (unreachable: connection refused)"),
            "{msg}"
        );
        assert!(msg.contains("met"), "{msg}");
        assert!(!msg.contains("peer1"), "{msg}");
        // Never reached: waited for, not down.
        let health: Vec<_> = c
            .peers()
            .iter()
            .map(|h| (h.state(), h.needs_resync()))
            .collect();
        assert_eq!(health, [(PeerState::Up, false), (PeerState::Waiting, true)]);

        let c = coordinator(&peers, WriteQuorum::All, Duration::from_secs(5), 8);
        let out = c.put("k".into(), "v".into()).await.unwrap();
        assert!(!out.ok(), "2 of 3 is not all");
        assert!(out.message("Stored").contains("NOT met"));
        // The write is kept locally even below quorum.
        assert_eq!(c.get("k".into()).await.unwrap().as_deref(), Some("v"));
    }

    #[tokio::test(start_paused = true)]
    async fn hung_peer_times_out_at_the_deadline() {
        let peers = [FakePeer::default(), FakePeer::default()];
        peers[0].hang.store(true, Ordering::Relaxed);
        let deadline = Duration::from_millis(300);
        let c = coordinator(&peers, WriteQuorum::Majority, deadline, 8);
        let started = tokio::time::Instant::now();
        let out = c.put("k".into(), "v".into()).await.unwrap();
        assert_eq!(
            started.elapsed(),
            deadline,
            "answers exactly at the deadline"
        );
        assert_eq!(
            out.failures,
            [("peer1".to_string(), PeerFailure::TimedOut(deadline))]
        );
        assert!(out.ok());
    }

    #[tokio::test(start_paused = true)]
    async fn full_mailbox_reports_lagging_without_waiting() {
        let peers = [FakePeer::default(), FakePeer::default()];
        peers[0].hang.store(true, Ordering::Relaxed);
        let deadline = Duration::from_millis(300);
        let c = Arc::new(coordinator(&peers, WriteQuorum::Majority, deadline, 1));
        // The hung peer's actor takes the first write and blocks; the second fills its mailbox.
        let mut background = Vec::new();
        for i in 0..2 {
            let c = c.clone();
            background.push(tokio::spawn(async move {
                c.put(format!("k{i}"), "v".into()).await.unwrap()
            }));
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        let out = c.put("k-late".into(), "v".into()).await.unwrap();
        // The only wait left is the healthy peer's delivery, which takes no virtual time.
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "a full mailbox must not slow the Put"
        );
        assert_eq!(out.failures, [("peer1".to_string(), PeerFailure::Lagging)]);
        let health = c.peers().into_iter().next().unwrap();
        assert_eq!(health.state(), PeerState::Lagging);
        assert!(health.needs_resync());
        for b in background {
            b.await.unwrap();
        }
    }

    #[tokio::test]
    async fn delete_replicates_a_tombstone() {
        let peers = [FakePeer::default()];
        let c = coordinator(&peers, WriteQuorum::All, Duration::from_secs(5), 8);
        c.put("k".into(), "v".into()).await.unwrap();
        let out = c.delete("k".into()).await.unwrap();
        assert_eq!(out.message("Deleted"), "Deleted and replicated");
        assert_eq!(c.get("k".into()).await.unwrap(), None);
        // What the peer holds, not what it was sent: the startup anti-entropy round may race
        // the writes and send them a second time, which is harmless.
        assert_eq!(
            peers[0].value("k"),
            Some(None),
            "the peer holds the tombstone"
        );
        let mut got = peers[0].received.lock().unwrap().clone();
        got.sort_by_key(|w| w.entry.version);
        got.dedup();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].entry.value.as_deref(), Some("v"));
        assert_eq!(got[1].entry.value, None);
    }
}

/// A node of six with three copies of each key, against scripted peers.
#[cfg(test)]
mod placed {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::testing::FakePeer;

    /// This node ("local") and five peers, with `replicas` copies of each key.
    fn ring_node(replicas: usize) -> (Coordinator<FakePeer>, Vec<FakePeer>, Placement) {
        let peers: Vec<FakePeer> = (0..5).map(|_| FakePeer::default()).collect();
        let placement = placement_of_six(replicas);
        let node = ring_node_with(&peers, &placement);
        (node, peers, placement)
    }

    /// The ring of "local" and "peer1" to "peer5".
    fn placement_of_six(replicas: usize) -> Placement {
        let names: Vec<String> = (1..=5).map(|i| format!("peer{i}")).collect();
        Placement::bootstrap("local", &names, replicas).unwrap()
    }

    /// This node ("local") with `peers` as "peer1" to "peer5", placed by `placement`.
    fn ring_node_with(peers: &[FakePeer], placement: &Placement) -> Coordinator<FakePeer> {
        ring_node_acking(peers, placement, AckAfter::All)
    }

    /// As [`ring_node_with`], answering writes as `ack_after` says.
    fn ring_node_acking(
        peers: &[FakePeer],
        placement: &Placement,
        ack_after: AckAfter,
    ) -> Coordinator<FakePeer> {
        let names = (1..=peers.len()).map(|i| format!("peer{i}"));
        Coordinator::start(
            StoreActor::new(Arc::new(crate::clock::Clock::new(
                crate::version::NodeId::new("local").unwrap(),
            ))),
            names.zip(peers.iter().cloned()).collect(),
            CoordinatorConfig {
                ack_after,
                quorum: WriteQuorum::Majority,
                replication_deadline: Duration::from_secs(5),
                peer_mailbox: 64,
                handoff_capacity: 100,
                anti_entropy_interval: Duration::from_secs(3600),
                placement: Some(placement.clone()),
            },
        )
    }

    /// The first key of the form `key{i}` for which this node's holding is `local`.
    fn key_where(placement: &Placement, local: bool) -> String {
        (0..)
            .map(|i| format!("key{i}"))
            .find(|k| placement.holders(k).local == local)
            .unwrap()
    }

    #[tokio::test]
    async fn a_write_goes_to_the_keys_holders_only() {
        let (node, peers, placement) = ring_node(3);
        for local in [true, false] {
            let key = key_where(&placement, local);
            let out = node.put(key.clone(), "v".into()).await.unwrap();
            assert_eq!((out.nodes, out.acks), (3, 3), "{out:?}");
            assert_eq!(out.message("Stored"), "Stored and replicated");
            let holders = placement.holders(&key);
            for (i, peer) in peers.iter().enumerate() {
                let holds = holders.peers.contains(&(i as u16));
                assert_eq!(peer.value(&key).is_some(), holds, "{key} on peer{}", i + 1);
            }
            // Stored here only where this node is a holder.
            assert_eq!(node.get(key.clone()).await.unwrap().is_some(), local);
            // A read through any node finds it.
            let read = node.read(key.clone()).await.unwrap().unwrap();
            assert_eq!(read.value.as_deref(), Some("v"));
            assert_eq!(read.version, out.version);
        }
    }

    #[tokio::test]
    async fn a_write_through_a_node_that_holds_no_copy_counts_its_quorum_over_the_holders() {
        let (node, peers, placement) = ring_node(3);
        let key = key_where(&placement, false);
        let holders = placement.holders(&key).peers.to_vec();
        peers[usize::from(holders[0])]
            .fail
            .store(true, Ordering::Relaxed);
        let out = node.put(key.clone(), "v".into()).await.unwrap();
        assert_eq!((out.nodes, out.acks, out.ok()), (3, 2, true), "{out:?}");
        let failed = format!("peer{}", holders[0] + 1);
        assert_eq!(out.failures.len(), 1);
        assert_eq!(out.failures[0].0, failed);
        // A LOCAL read goes to a holder that answers; a quorum read needs two of the three.
        let read = node.read(key.clone()).await.unwrap().unwrap();
        assert_eq!(read.value.as_deref(), Some("v"));
        let read = node.get_quorum(key.clone()).await.unwrap().unwrap();
        assert_eq!(read.value.as_deref(), Some("v"));
        peers[usize::from(holders[1])]
            .fail
            .store(true, Ordering::Relaxed);
        let out = node.delete(key.clone()).await.unwrap();
        assert_eq!((out.acks, out.ok()), (1, false), "{out:?}");
        match node.get_quorum(key.clone()).await {
            Err(ReadError::NoQuorum {
                answered: 1,
                nodes: 3,
                required: 2,
                missing,
            }) => assert_eq!(missing.len(), 2, "{missing:?}"),
            other => panic!("{other:?}"),
        }
        // One holder is enough for a LOCAL read, and it has the tombstone.
        assert_eq!(node.read(key.clone()).await.unwrap().unwrap().value, None);
        peers[usize::from(holders[2])]
            .fail
            .store(true, Ordering::Relaxed);
        match node.read(key).await {
            Err(ReadError::NoCopy { missing }) => {
                assert_eq!(missing.len(), 3);
                assert!(missing[0].contains("connection refused"), "{missing:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// While a dead node is removed, a write of one of its keys needs the quorum of the old
    /// ring and of the new one, not three of the four writers: the node still copying the key
    /// may be down too, as long as each ring keeps its quorum.
    #[tokio::test]
    async fn while_the_ring_changes_a_write_needs_the_quorum_of_each_ring() {
        use crate::membership::RingState;
        let placement = placement_of_six(3);
        let names: Vec<String> = (1..=5).map(|i| format!("peer{i}")).collect();
        let old = placement.ring().clone();
        // A key held here, whose partition gains a holder when another of its holders goes.
        let (key, gone, next) = (0..)
            .map(|i| format!("key{i}"))
            .find_map(|key| {
                let p = crate::ring::partition_of(&key);
                let held: Vec<&str> = old.holders(p).collect();
                let gone = *held.iter().find(|h| **h != "local")?;
                let next = old.without(gone).unwrap();
                (held.contains(&"local") && next.holders(p).any(|h| h == "local"))
                    .then(|| (key.clone(), gone.to_owned(), next))
            })
            .unwrap();
        let p = crate::ring::partition_of(&key);
        let gainer = next.holders(p).find(|h| !old.holders(p).any(|o| o == *h));
        let gainer = gainer.unwrap().to_owned();
        let kept = (old.holders(p)).find(|h| *h != "local" && *h != gone);
        let kept = kept.unwrap().to_owned();
        let state = RingState::settled(old.clone()).begin(next).unwrap();
        let changing = Placement::of(state, "local", &names).unwrap();
        let peers: Vec<FakePeer> = (0..5).map(|_| FakePeer::default()).collect();
        let node = ring_node_with(&peers, &changing);
        let peer = |name: &str| &peers[names.iter().position(|n| n == name).unwrap()];
        assert_eq!(changing.write_holders(&key).nodes(), 4);
        // The removed node and the one taking its copy are both down.
        for down in [&gone, &gainer] {
            peer(down).fail.store(true, Ordering::Relaxed);
        }
        let out = node.put(key.clone(), "v".into()).await.unwrap();
        assert_eq!((out.nodes, out.acks), (4, 2), "{out:?}");
        assert_eq!(out.rings, [(2, 3), (2, 3)], "{out:?}");
        assert!(out.ok(), "two of three in each ring: {out:?}");
        // A third one down leaves each ring one copy short.
        peer(&kept).fail.store(true, Ordering::Relaxed);
        let out = node.put(key.clone(), "w".into()).await.unwrap();
        assert!(!out.ok(), "{out:?}");
        let message = out.message("Stored");
        assert!(
            message.starts_with(
                "Stored on 1 of 4 nodes, write quorum majority of each ring while the ring \
                 changes (1 of 3, 2 required; 1 of 3, 2 required) NOT met; not replicated to"
            ),
            "{message}"
        );
        // Answering at the quorum, a write waits for the quorum of each ring, and no more.
        let peers: Vec<FakePeer> = (0..5).map(|_| FakePeer::default()).collect();
        let node = ring_node_acking(&peers, &changing, AckAfter::Quorum);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let peer = |name: &str| &peers[names.iter().position(|n| n == name).unwrap()];
        for slow in [&gone, &gainer] {
            peer(slow).delay_ms.store(2000, Ordering::Relaxed);
        }
        let out = node.put(key.clone(), "x".into()).await.unwrap();
        assert!(out.ok(), "{out:?}");
        assert_eq!(
            (out.acks, out.pending, out.rings.as_slice()),
            (2, 2, &[(2, 3), (2, 3)][..])
        );
        assert_eq!(peer(&kept).received_keys(), [key.as_str()]);
        assert!(peer(&gainer).received_keys().is_empty(), "answered before");
        // Once settled, one ring: the quorum over its holders, as ever.
        let settled = Placement::new(old, "local", &names).unwrap();
        assert!(settled.write_holders(&key).rings.is_empty());
    }

    async fn listed(
        node: &Coordinator<FakePeer>,
    ) -> Result<(usize, Vec<(String, String)>), ListError> {
        let list = node.list_ring(7, usize::MAX).await?;
        let chunks: Vec<_> = list.chunks.collect().await;
        let mut pairs = Vec::new();
        for chunk in chunks {
            pairs.extend(chunk?);
        }
        Ok((list.remote, pairs))
    }

    /// A node holding no copy versions a write from its own clock, so it cannot order it after
    /// the key's current version; but a write after a read through it orders after what was
    /// read, even from a holder whose clock runs ahead.
    #[tokio::test]
    async fn a_write_through_a_node_holding_no_copy_orders_after_what_it_read() {
        let (node, peers, placement) = ring_node(3);
        let key = key_where(&placement, false);
        let ahead = crate::clock::now_minus(Duration::ZERO)
            + crate::clock::ntp_duration(Duration::from_millis(300));
        let newer = crate::testing::write(&key, Some("from a fast clock"), ahead, "peer9");
        for &i in placement.holders(&key).peers {
            peers[usize::from(i)].set_data(std::slice::from_ref(&newer));
        }
        let read = node.read(key.clone()).await.unwrap().unwrap();
        assert_eq!(read.version.time, ahead);
        let out = node.put(key.clone(), "after".into()).await.unwrap();
        assert!(out.version.time > ahead, "{:?} <= {ahead}", out.version);
        let read = node.read(key).await.unwrap().unwrap();
        assert_eq!(read.value.as_deref(), Some("after"));
    }

    /// A peer that shares no partition with this node is still watched: its anti-entropy
    /// round is a call that fails when the peer is down, so it is not reported up.
    #[tokio::test]
    async fn a_peer_sharing_no_partition_is_seen_down_when_it_is() {
        let (node, peers, placement) = ring_node(3);
        let apart = (0..5)
            .find(|&i| placement.shared_with(i).is_empty())
            .expect("one peer shares nothing");
        let up =
            |node: &Coordinator<FakePeer>| node.peers().into_iter().nth(apart).unwrap().state();
        let waited = std::time::Instant::now();
        while up(&node) != PeerState::Up {
            assert!(waited.elapsed() < Duration::from_secs(10), "never seen up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        peers[apart].fail.store(true, Ordering::Relaxed);
        node.resync_peers();
        let waited = std::time::Instant::now();
        while up(&node) == PeerState::Up {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "a dead peer stays up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(up(&node), PeerState::Down);
    }

    /// A List through a node of a ring has every key once, in order, each partition read
    /// from one holder; a holder that does not answer is replaced by another, and only a
    /// partition none of whose holders answers fails the List, naming them.
    #[tokio::test]
    async fn a_list_merges_every_partition_once_from_the_holders_that_answer() {
        let (node, peers, placement) = ring_node(3);
        let mut expected = Vec::new();
        for k in 0..300 {
            let key = format!("key{k:03}");
            node.put(key.clone(), format!("v{k}")).await.unwrap();
            expected.push((key, format!("v{k}")));
        }
        let (remote, pairs) = listed(&node).await.unwrap();
        assert_eq!(pairs, expected);
        // This node holds half: the rest comes from peers, two of them here (one group).
        assert!(remote >= 1, "{remote}");
        // A peer the List reads from fails: its partitions are read from their other holders.
        let first = (0..crate::ring::PARTITIONS)
            .find(|&p| !placement.local().contains(p))
            .map(|p| placement.peers_of(p)[0])
            .unwrap();
        peers[usize::from(first)]
            .fail
            .store(true, Ordering::Relaxed);
        assert_eq!(listed(&node).await.unwrap().1, expected);
        for peer in &peers {
            peer.fail.store(true, Ordering::Relaxed);
        }
        match listed(&node).await {
            Err(ListError::NoHolder {
                partitions,
                missing,
            }) => {
                assert_eq!(partitions, 1024 - placement.local().len());
                assert!(
                    missing.iter().all(|m| m.contains("connection refused")),
                    "{missing:?}"
                );
            }
            other => panic!("{:?}", other.map(|(r, _)| r)),
        }
    }

    /// Anti-entropy with a peer trades only the partitions both hold: a peer holding keys
    /// of every partition gives this node only those this node holds, and a peer that shares
    /// no partition with it is neither asked nor sent anything.
    #[tokio::test]
    async fn anti_entropy_trades_only_the_partitions_both_nodes_hold() {
        let placement = placement_of_six(3);
        let (sharing, apart) = {
            let mut by_share = (0..5).map(|i| (placement.shared_with(i).len(), i));
            let sharing = by_share.clone().find(|(n, _)| *n > 0).unwrap().1;
            (sharing, by_share.find(|(n, _)| *n == 0).unwrap().1)
        };
        let writes: Vec<Write> = (0..500)
            .map(|i| crate::testing::write(&format!("k{i}"), Some("v"), 1 << 40, "peer9"))
            .collect();
        let peers: Vec<FakePeer> = (0..5).map(|_| FakePeer::default()).collect();
        for (i, p) in peers.iter().enumerate() {
            if i == sharing || i == apart {
                p.set_data(&writes);
            } else {
                p.fail.store(true, Ordering::Relaxed);
            }
        }
        let node = ring_node_with(&peers, &placement);
        // What this node and the sharing peer both hold: all this node gets, as the others
        // that would send it the rest are down.
        let shared = placement.shared_with(sharing);
        let expected = writes
            .iter()
            .filter(|w| shared.contains_key(&w.key))
            .count();
        assert!(expected > 0 && expected < writes.len());
        let waited = std::time::Instant::now();
        while node.status().await.unwrap().store.keys < expected
            || node.peers().into_iter().nth(sharing).unwrap().resyncing()
        {
            assert!(waited.elapsed() < Duration::from_secs(10), "never repaired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(node.status().await.unwrap().store.keys, expected);
        for w in &writes {
            let here = node.get(w.key.clone()).await.unwrap().is_some();
            assert_eq!(here, shared.contains_key(&w.key), "{}", w.key);
        }
        // A write here, then a round with each: it goes to the sharing peer, not the other.
        let mine = (0..)
            .map(|i| format!("mine{i}"))
            .find(|k| shared.contains_key(k))
            .unwrap();
        let newer = crate::testing::write(&mine, Some("x"), 2 << 40, "local");
        node.apply(vec![newer]).await.unwrap();
        node.resync_peers();
        let waited = std::time::Instant::now();
        while peers[sharing].value(&mine).is_none() {
            assert!(waited.elapsed() < Duration::from_secs(10), "never pushed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        while node.peers().into_iter().nth(apart).unwrap().resyncing() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(peers[apart].pulls.load(Ordering::Relaxed), 0);
        assert!(peers[apart].received_keys().is_empty());
    }
}
