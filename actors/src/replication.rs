//! One replication actor per peer: it delivers this node's writes to that peer, in order, keeps
//! what the peer has not confirmed (hinted handoff), and keeps the peer's health (up, down,
//! lagging, needs resync) where the node can read it.
//!
//! The actor owns the peer's connection through a [`PeerClient`], the seam where the node
//! crate plugs in its gRPC client (and tests plug in fakes). Its mailbox is bounded: when a
//! peer is slow or stuck, writes queue up to the bound, and past it the coordinator gets
//! `MailboxFull` at once instead of waiting, marks the peer lagging, and records that it needs
//! a resync. So a bad peer costs a Put nothing beyond the replication deadline.
//!
//! # Batching
//! The actor keeps at most one batch in flight per peer. Writes that arrive meanwhile wait in
//! a pending queue, and when the batch is answered the whole queue goes out as the next batch
//! (one message to the peer, one fsync there through its group commit). Under load, batches
//! grow by themselves; alone, a write goes out at once. Replies are delegated: each waiting Put
//! is answered when its batch is.
//!
//! # Hinted handoff
//! A write the peer did not confirm goes into a bounded backlog, in order. While the backlog
//! is not empty, new writes join it without a delivery attempt (the peer is known to be down,
//! and order matters for nothing but fairness, since versions make delivery order-free), and
//! the actor retries the backlog in batches with exponential backoff. When the backlog
//! overflows it is dropped and the peer is marked for anti-entropy instead: nothing is lost,
//! it is just repaired by comparing digests rather than by replaying.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kameo::Actor;
use kameo::actor::{ActorRef, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::message::{Context, Message};
use kameo::reply::{DelegatedReply, ReplySender};

use crate::antientropy;
use crate::store::{Entry, StoreActor, StoreReader, Write};

/// First wait before redelivering a backlog.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between redelivery attempts: how stale a returning peer can stay at worst.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Wait before retrying a failed anti-entropy round.
const RESYNC_RETRY: Duration = Duration::from_secs(2);
/// Most bytes per replication batch, when the peer's message limit allows it: big enough that
/// a batch's cost per write is small, small enough that one batch does not hold a stream long.
pub const BATCH_BYTES: usize = 512 * 1024;
/// Most bytes a handoff backlog holds, whatever `--handoff-capacity` says: a down peer must not
/// cost a healthy node its memory when values are large.
const BACKLOG_BYTES: usize = 256 * 1024 * 1024;
/// Most bytes of writes waiting behind the batch in flight, whatever the pending capacity (a
/// count) says: a peer that hangs holds the batch for a whole call timeout, and with large
/// values a thousand pending writes would be a gigabyte per peer. Past it, writes are answered
/// "lagging", and the peer catches up by anti-entropy.
const PENDING_BYTES: usize = 64 * 1024 * 1024;

/// How a replication actor reaches its peer. Implementations own the connection and reconnect
/// on their own; a call that fails is reported, not retried here. Clones share the connection.
pub trait PeerClient: Clone + Send + Sync + 'static {
    /// Delivers writes. `Ok` means the peer has applied them (or already had newer versions).
    /// Borrowed, so that the caller keeps them for a redelivery without copying them first.
    fn replicate(&self, writes: &[Write]) -> impl Future<Output = Result<(), PeerError>> + Send;
    /// The peer's anti-entropy digest with `buckets` buckets.
    fn digest(&self, buckets: u32) -> impl Future<Output = Result<Vec<u64>, PeerError>> + Send;
    /// The peer's entries in buckets `which`, tombstones included.
    fn pull(
        &self,
        buckets: u32,
        which: Vec<u32>,
    ) -> impl Future<Output = Result<Vec<Write>, PeerError>> + Send;
    /// The peer's entry for `key`, tombstone included (for quorum reads).
    fn read(&self, key: String) -> impl Future<Output = Result<Option<Entry>, PeerError>> + Send;
    /// Most bytes (as [`write_size`] counts them) to send in one batch: a batch over the
    /// transport's message limit would be refused whole, and found out only by splitting it.
    fn max_batch_bytes(&self) -> usize {
        BATCH_BYTES
    }
}

/// Splits writes into batches of at most `limit` bytes (at least one write each).
pub fn batches(writes: Vec<Write>, limit: usize) -> impl Iterator<Item = Vec<Write>> {
    let mut writes = std::collections::VecDeque::from(writes);
    std::iter::from_fn(move || {
        let n = batch_len(writes.iter(), limit);
        (n > 0).then(|| writes.drain(..n).collect())
    })
}

/// How many of the leading `writes` make one batch: as many as fit in `limit` bytes, and at
/// least one (a single write bigger than that still goes, alone). Zero only when there are none.
fn batch_len<'a>(writes: impl Iterator<Item = &'a Write>, limit: usize) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for w in writes {
        bytes += write_size(w);
        if n > 0 && bytes > limit {
            break;
        }
        n += 1;
    }
    n
}

/// Bytes a write takes in a batch, rounded up: its key, value and node id, and 64 for the
/// version's time, the tombstone flag and the framing (the encoding needs about 30).
pub fn write_size(w: &Write) -> usize {
    w.key.len()
        + w.entry.value.as_ref().map_or(0, |v| v.len())
        + w.entry.version.node.as_str().len()
        + 64
}

/// A write the peer refused for good: its index in the delivered slice, and the reason.
pub type Refused = (usize, String);

/// Delivers `writes` to the peer. A peer refuses a whole batch for one write it will never
/// take (a peer with smaller limits than ours, say), so a refused batch is split in halves and
/// each delivered again, down to single writes: one such write costs only itself, never the
/// rest of its batch. Returns the writes refused for good; any other error ends the delivery,
/// whatever part of it the peer already has (applying a write twice changes nothing).
pub async fn deliver<P: PeerClient>(
    client: &P,
    writes: &[Write],
) -> Result<Vec<Refused>, PeerError> {
    // The usual case, one call and no bookkeeping: this is every replication batch's path.
    match client.replicate(writes).await {
        Err(PeerError::Rejected(why)) if writes.len() == 1 => return Ok(vec![(0, why)]),
        Err(PeerError::Rejected(_)) => {}
        other => return other.map(|()| Vec::new()),
    }
    let mut refused = Vec::new();
    // Ranges still to deliver, the next one on top, so the writes go out in order.
    let middle = writes.len() / 2;
    let mut todo = vec![middle..writes.len(), 0..middle];
    while let Some(range) = todo.pop() {
        match client.replicate(&writes[range.clone()]).await {
            Ok(()) => {}
            Err(PeerError::Rejected(why)) if range.len() == 1 => refused.push((range.start, why)),
            Err(PeerError::Rejected(_)) => {
                let middle = range.start + range.len() / 2;
                todo.push(middle..range.end);
                todo.push(range.start..middle);
            }
            Err(error) => return Err(error),
        }
    }
    Ok(refused)
}

/// Why a delivery to a peer failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// No connection could be made or it broke.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The peer did not answer within the per-call timeout.
    #[error("timed out")]
    TimedOut,
    /// The peer answered with an error about these writes (one too big for it, say).
    #[error("rejected the write: {0}")]
    Rejected(String),
    /// The peer refuses every call from this node, whatever it carries: the cluster is set up
    /// wrong (another cluster token, a node id it shares). Treated like an unreachable peer,
    /// writes held for when it is fixed, not like a refused write: splitting the batch to find
    /// the write at fault would cost a refused call per write.
    #[error("refuses this node: {0}")]
    Refused(String),
    /// The peer is down: the write waits in its handoff backlog.
    #[error("down; queued for redelivery ({0} waiting)")]
    Backlogged(usize),
    /// More writes are waiting for the peer than its replication queue holds: this one was
    /// not queued, and the peer is marked for anti-entropy.
    #[error("lagging, marked for resync")]
    Lagging,
}

/// What this node believes about a peer, as last observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Not contacted yet.
    Unknown,
    /// The last delivery succeeded.
    Up,
    /// The last delivery failed.
    Down,
    /// Its mailbox overflowed: it missed writes and needs a resync.
    Lagging,
}

impl PeerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Up,
            2 => Self::Down,
            3 => Self::Lagging,
            _ => Self::Unknown,
        }
    }
}

impl std::fmt::Display for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unknown => "unknown",
            Self::Up => "up",
            Self::Down => "down",
            Self::Lagging => "lagging",
        })
    }
}

/// A peer's health, shared between its replication actor (which sees deliveries) and the
/// coordinator (which sees a full mailbox). Atomics, because both sides only ever set flags.
#[derive(Debug)]
pub struct PeerHealth {
    addr: String,
    state: AtomicU8,
    needs_resync: AtomicBool,
    resyncing: AtomicBool,
    backlog: AtomicU64,
    /// Batches and writes the peer has confirmed, since this node started.
    batches: AtomicU64,
    writes: AtomicU64,
    /// Milliseconds after `born` of the last successful exchange, plus one (0: never).
    last_contact: AtomicU64,
    born: Instant,
}

impl PeerHealth {
    /// Health of the peer at `addr`, not contacted yet.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            state: AtomicU8::new(PeerState::Unknown as u8),
            needs_resync: AtomicBool::new(false),
            resyncing: AtomicBool::new(false),
            backlog: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            last_contact: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    /// Writes waiting in the handoff backlog.
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    /// Batches and writes the peer has confirmed through replication and handoff since this
    /// node started (repairs, by anti-entropy or quorum reads, not counted). Their ratio is the
    /// mean batch size, which says how much batching is saving under the current load.
    pub fn confirmed(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        )
    }

    fn count_confirmed(&self, writes: usize) {
        // A batch whose every write was refused confirmed nothing.
        if writes == 0 {
            return;
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes as u64, Ordering::Relaxed);
    }

    /// Whether an anti-entropy round with this peer is running.
    pub fn resyncing(&self) -> bool {
        self.resyncing.load(Ordering::Relaxed)
    }

    /// Time since the last successful exchange with the peer, if any.
    pub fn last_contact(&self) -> Option<Duration> {
        match self.last_contact.load(Ordering::Relaxed) {
            0 => None,
            at => Some(
                self.born
                    .elapsed()
                    .saturating_sub(Duration::from_millis(at - 1)),
            ),
        }
    }

    fn contact(&self) {
        let now = self.born.elapsed().as_millis() as u64 + 1;
        self.last_contact.store(now, Ordering::Relaxed);
    }

    /// Records that the peer missed writes that only anti-entropy can bring it.
    pub fn mark_needs_resync(&self) {
        self.needs_resync.store(true, Ordering::Relaxed);
    }

    /// The peer's address, as configured.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The state last observed.
    pub fn state(&self) -> PeerState {
        PeerState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Whether the peer has missed writes that only a resync can bring it.
    pub fn needs_resync(&self) -> bool {
        self.needs_resync.load(Ordering::Relaxed)
    }

    /// Records a state, logging the change (and only the change: a dead peer is one log line,
    /// not one per write).
    fn set_state(&self, new: PeerState, reason: &dyn std::fmt::Display) {
        let old = PeerState::from_u8(self.state.swap(new as u8, Ordering::Relaxed));
        if old == new {
            return;
        }
        match new {
            PeerState::Up => tracing::info!(peer = %self.addr, from = %old, "peer up"),
            PeerState::Down => {
                tracing::warn!(peer = %self.addr, from = %old, reason = %reason, "peer down")
            }
            PeerState::Lagging => tracing::warn!(
                peer = %self.addr,
                from = %old,
                reason = %reason,
                "peer lagging, marked for resync"
            ),
            PeerState::Unknown => {}
        }
    }

    pub(crate) fn mark_up(&self) {
        self.contact();
        // Lagging stays visible until something resyncs the peer: being reachable again does not
        // bring back the writes it missed.
        if self.state() != PeerState::Lagging || !self.needs_resync() {
            self.set_state(PeerState::Up, &"delivered");
        }
    }

    pub(crate) fn mark_down(&self, error: &PeerError) {
        self.set_state(PeerState::Down, error);
    }

    pub(crate) fn mark_lagging(&self) {
        self.needs_resync.store(true, Ordering::Relaxed);
        self.set_state(PeerState::Lagging, &"replication mailbox full");
    }
}

/// Where the reply to one Replicate goes (None when it was a `tell`).
type Waiter = Option<ReplySender<Result<(), PeerError>>>;

fn answer(waiter: Waiter, result: Result<(), PeerError>) {
    if let Some(w) = waiter {
        w.send(result);
    }
}

/// Answers the waiters of a batch the peer took: each write's own, or the peer's refusal of it
/// (which it would give again, so the write is not retried).
fn answer_batch(peer: &str, writes: &[Write], waiters: Vec<Waiter>, refused: Vec<Refused>) {
    let mut refused = refused.into_iter().peekable();
    for (i, (write, waiter)) in writes.iter().zip(waiters).enumerate() {
        match refused.next_if(|(at, _)| *at == i) {
            None => answer(waiter, Ok(())),
            Some((_, why)) => {
                tracing::warn!(peer, key = %write.key, %why, "peer rejected a write; not retried");
                answer(waiter, Err(PeerError::Rejected(why)));
            }
        }
    }
}

/// The replication actor for one peer.
pub struct ReplicationActor<P: PeerClient> {
    client: P,
    /// Writes waiting for the batch in flight to be answered, with their waiters.
    pending: Vec<(Write, Waiter)>,
    in_flight: bool,
    /// Most writes pending before new ones are refused as lagging.
    pending_capacity: usize,
    /// Bytes of the pending writes ([`write_size`]).
    pending_bytes: usize,
    health: Arc<PeerHealth>,
    /// The local store, for anti-entropy rounds.
    store: ActorRef<StoreActor>,
    reader: StoreReader,
    /// Writes the peer has not confirmed, oldest first, and their size.
    backlog: VecDeque<Write>,
    backlog_bytes: usize,
    backlog_capacity: usize,
    backoff: Duration,
    redelivery_scheduled: bool,
    /// How long the last deliveries may take when the actor stops.
    drain_limit: Duration,
}

impl<P: PeerClient> ReplicationActor<P> {
    pub fn new(
        client: P,
        health: Arc<PeerHealth>,
        store: ActorRef<StoreActor>,
        reader: StoreReader,
        backlog_capacity: usize,
        pending_capacity: usize,
    ) -> Self {
        Self {
            client,
            pending: Vec::new(),
            in_flight: false,
            pending_capacity,
            pending_bytes: 0,
            health,
            store,
            reader,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            backlog_capacity,
            backoff: BACKOFF_MIN,
            redelivery_scheduled: false,
            drain_limit: Duration::from_secs(1),
        }
    }

    /// Sets how long the last deliveries may take when the actor stops (default 1 s).
    pub fn with_drain_limit(mut self, limit: Duration) -> Self {
        self.drain_limit = limit;
        self
    }

    /// Delivers what is left when the actor stops: the writes waiting behind the batch in
    /// flight, and the handoff backlog if the peer is up, within `drain_limit`. The mailbox is
    /// closed by then, so the answer to the batch in flight can no longer come back as a
    /// message, and without this the writes behind it would be dropped. Returns how many
    /// writes did not go out.
    async fn drain(&mut self) -> usize {
        let mut queue: VecDeque<(Write, Waiter)> = std::mem::take(&mut self.pending).into();
        self.pending_bytes = 0;
        if self.health.state() == PeerState::Up {
            queue.extend(self.backlog.drain(..).map(|w| (w, None)));
        }
        let left_behind = self.backlog.len();
        self.backlog.clear();
        let (client, limit) = (self.client.clone(), self.client.max_batch_bytes());
        let health = self.health.clone();
        // The batch being sent when the time runs out is neither in the queue nor delivered.
        let mut sending = 0;
        let delivered = tokio::time::timeout(self.drain_limit, async {
            while !queue.is_empty() {
                let n = batch_len(queue.iter().map(|(w, _)| w), limit);
                let (writes, waiters): (Vec<Write>, Vec<Waiter>) = queue.drain(..n).unzip();
                sending = writes.len();
                match deliver(&client, &writes).await {
                    Ok(refused) => {
                        health.count_confirmed(writes.len() - refused.len());
                        answer_batch(&health.addr, &writes, waiters, refused);
                    }
                    Err(error) => {
                        health.mark_down(&error);
                        for waiter in waiters {
                            answer(waiter, Err(error.clone()));
                        }
                        return writes.len();
                    }
                }
                sending = 0;
            }
            0
        })
        .await;
        // Whatever is still queued is answered by dropping its waiter: "replication stopped".
        left_behind + queue.len() + delivered.unwrap_or(sending)
    }

    /// Keeps `write` for redelivery, or, if the backlog is full, gives the backlog up for an
    /// anti-entropy round.
    fn hold(&mut self, write: Write) {
        let size = write_size(&write);
        if self.backlog.len() >= self.backlog_capacity || self.backlog_bytes + size > BACKLOG_BYTES
        {
            tracing::warn!(
                peer = %self.health.addr,
                dropped = self.backlog.len(),
                "handoff backlog full; dropped it, peer marked for anti-entropy"
            );
            self.backlog.clear();
            self.backlog_bytes = 0;
            self.health.mark_needs_resync();
        }
        self.backlog_bytes += size;
        self.backlog.push_back(write);
        self.health
            .backlog
            .store(self.backlog.len() as u64, Ordering::Relaxed);
    }

    /// A delivery succeeded: the peer is up, and if it missed writes, a resync starts now.
    fn reached(&self, me: WeakActorRef<Self>) {
        self.health.mark_up();
        if self.health.needs_resync() {
            self.start_resync(me);
        }
    }

    /// Sends the pending writes as one batch, unless a batch is already in flight.
    fn flush(&mut self, me: ActorRef<Self>) {
        if self.in_flight || self.pending.is_empty() {
            return;
        }
        let n = batch_len(
            self.pending.iter().map(|(w, _)| w),
            self.client.max_batch_bytes(),
        );
        let (writes, waiters): (Vec<Write>, Vec<Waiter>) = self.pending.drain(..n).unzip();
        self.pending_bytes -= writes.iter().map(write_size).sum::<usize>();
        self.in_flight = true;
        let client = self.client.clone();
        tokio::spawn(async move {
            let result = deliver(&client, &writes).await;
            let _ = me
                .tell(Delivered {
                    writes,
                    waiters,
                    result,
                })
                .await;
        });
    }

    fn schedule_redelivery(&mut self, me: WeakActorRef<Self>) {
        if self.redelivery_scheduled {
            return;
        }
        self.redelivery_scheduled = true;
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if let Some(me) = me.upgrade() {
                let _ = me.tell(Redeliver).await;
            }
        });
    }

    /// Starts an anti-entropy round in the background unless one is running. Runs beside the
    /// actor, so deliveries go on meanwhile.
    fn start_resync(&self, me: WeakActorRef<Self>) {
        if self.health.resyncing.swap(true, Ordering::AcqRel) {
            return;
        }
        // Cleared now: anything missed while the round runs sets it again.
        self.health.needs_resync.store(false, Ordering::Relaxed);
        let (client, store, reader, health) = (
            self.client.clone(),
            self.store.clone(),
            self.reader.clone(),
            self.health.clone(),
        );
        tokio::spawn(async move {
            match antientropy::sync(&client, &store, &reader).await {
                Ok(report) => {
                    // A round is an exchange like any delivery: the peer is up (and, if it was
                    // lagging and nothing was missed meanwhile, caught up).
                    health.mark_up();
                    if report.buckets > 0 {
                        tracing::info!(
                            peer = %health.addr,
                            buckets = report.buckets,
                            pulled = report.pulled,
                            pushed = report.pushed,
                            "anti-entropy repaired differences"
                        );
                    }
                }
                Err(error) => {
                    health.mark_needs_resync();
                    // A peer that refused something answered: it is not down.
                    if let antientropy::SyncError::Peer(e) = &error
                        && !matches!(e, PeerError::Rejected(_))
                    {
                        health.mark_down(e);
                    }
                    tracing::debug!(peer = %health.addr, %error, "anti-entropy round failed");
                    health.resyncing.store(false, Ordering::Release);
                    // A peer that refuses this node will until someone fixes the setup: the
                    // periodic round is soon enough to notice.
                    if matches!(error, antientropy::SyncError::Peer(PeerError::Refused(_))) {
                        return;
                    }
                    // Try again soon rather than at the next period: a peer that was merely
                    // starting (a cluster coming up together) is seen up within seconds.
                    tokio::time::sleep(RESYNC_RETRY).await;
                    if let Some(me) = me.upgrade() {
                        let _ = me.tell(Resync).try_send();
                    }
                    return;
                }
            }
            health.resyncing.store(false, Ordering::Release);
        });
    }
}

impl<P: PeerClient> Actor for ReplicationActor<P> {
    type Args = Self;
    type Error = kameo::error::Infallible;

    fn name() -> &'static str {
        "ReplicationActor"
    }

    async fn on_start(args: Self, actor_ref: ActorRef<Self>) -> Result<Self, Self::Error> {
        // After a (re)start, whatever this node held for the peer before is gone, and the peer
        // may have taken writes we missed: compare right away.
        args.health.mark_needs_resync();
        args.start_resync(actor_ref.downgrade());
        Ok(args)
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: ActorStopReason,
    ) -> Result<(), Self::Error> {
        let undelivered = self.drain().await;
        if undelivered > 0 {
            // Not lost: the node runs an anti-entropy round with every peer when it starts
            // again, and so does the peer with us.
            tracing::warn!(
                peer = %self.health.addr,
                undelivered,
                "stopped with writes not delivered to the peer; anti-entropy repairs them"
            );
        }
        Ok(())
    }
}

/// Deliver one write to this actor's peer. Always sent with `ask`: the reply carries the
/// outcome back to the Put waiting on it (a failed `tell` would stop the actor).
#[derive(Debug)]
pub struct Replicate(pub Write);

impl<P: PeerClient> Message<Replicate> for ReplicationActor<P> {
    type Reply = DelegatedReply<Result<(), PeerError>>;

    async fn handle(
        &mut self,
        msg: Replicate,
        ctx: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        let (delegated, waiter) = ctx.reply_sender();
        if !self.backlog.is_empty() {
            // Known down: queue behind the backlog without waiting on the network.
            self.hold(msg.0);
            answer(waiter, Err(PeerError::Backlogged(self.backlog.len())));
        } else if self.pending.len() >= self.pending_capacity
            // One write bigger than the budget still waits, alone, as it goes in a batch alone.
            || (!self.pending.is_empty()
                && self.pending_bytes + write_size(&msg.0) > PENDING_BYTES)
        {
            self.health.mark_lagging();
            answer(waiter, Err(PeerError::Lagging));
        } else {
            self.pending_bytes += write_size(&msg.0);
            self.pending.push((msg.0, waiter));
            self.flush(ctx.actor_ref().clone());
        }
        delegated
    }
}

/// A batch's answer, sent by the task that delivered it back to the actor.
struct Delivered {
    writes: Vec<Write>,
    waiters: Vec<Waiter>,
    result: Result<Vec<Refused>, PeerError>,
}

impl<P: PeerClient> Message<Delivered> for ReplicationActor<P> {
    type Reply = ();

    async fn handle(&mut self, msg: Delivered, ctx: &mut Context<Self, Self::Reply>) {
        self.in_flight = false;
        match msg.result {
            Ok(refused) => {
                // The peer answered: it is up, even if it refused some writes. Those it would
                // refuse again, so they are not retried.
                self.health
                    .count_confirmed(msg.writes.len() - refused.len());
                answer_batch(&self.health.addr, &msg.writes, msg.waiters, refused);
                self.reached(ctx.actor_ref().downgrade());
                self.flush(ctx.actor_ref().clone());
            }
            Err(error) => {
                tracing::debug!(peer = %self.health.addr, %error, "replication failed; writes held for handoff");
                self.health.mark_down(&error);
                for (write, waiter) in msg.writes.into_iter().zip(msg.waiters) {
                    self.hold(write);
                    answer(waiter, Err(error.clone()));
                }
                // What was waiting behind the failed batch joins the backlog too, in order.
                self.pending_bytes = 0;
                for (write, waiter) in std::mem::take(&mut self.pending) {
                    self.hold(write);
                    answer(waiter, Err(PeerError::Backlogged(self.backlog.len())));
                }
                self.schedule_redelivery(ctx.actor_ref().downgrade());
            }
        }
    }
}

/// Retry the handoff backlog (sent by the actor to itself after a backoff).
#[derive(Debug)]
pub struct Redeliver;

impl<P: PeerClient> Message<Redeliver> for ReplicationActor<P> {
    type Reply = ();

    async fn handle(&mut self, _: Redeliver, ctx: &mut Context<Self, Self::Reply>) {
        self.redelivery_scheduled = false;
        while !self.backlog.is_empty() {
            let n = batch_len(self.backlog.iter(), self.client.max_batch_bytes());
            let batch = &self.backlog.make_contiguous()[..n];
            match deliver(&self.client, batch).await {
                Ok(refused) => {
                    self.health.count_confirmed(n - refused.len());
                    for (i, why) in refused {
                        tracing::warn!(peer = %self.health.addr, key = %batch[i].key, %why, "peer rejected a held write; dropped");
                    }
                }
                Err(error) => {
                    self.health.mark_down(&error);
                    self.schedule_redelivery(ctx.actor_ref().downgrade());
                    return;
                }
            }
            for w in self.backlog.drain(..n) {
                self.backlog_bytes -= write_size(&w);
            }
            self.health
                .backlog
                .store(self.backlog.len() as u64, Ordering::Relaxed);
        }
        tracing::info!(peer = %self.health.addr, "handoff backlog delivered");
        self.backoff = BACKOFF_MIN;
        self.reached(ctx.actor_ref().downgrade());
    }
}

/// Run an anti-entropy round now (periodic timer, or an operator).
#[derive(Debug)]
pub struct Resync;

impl<P: PeerClient> Message<Resync> for ReplicationActor<P> {
    type Reply = ();

    async fn handle(&mut self, _: Resync, ctx: &mut Context<Self, Self::Reply>) {
        self.start_resync(ctx.actor_ref().downgrade());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use kameo::actor::Spawn;

    use super::*;
    use crate::store;
    use crate::version::{Clock, Version};

    /// A scripted peer with a store of its own: applies what it receives (newest version wins),
    /// answers digests and pulls, and can be told to fail or to hang.
    #[derive(Clone, Default)]
    pub struct FakePeer {
        pub received: Arc<Mutex<Vec<Write>>>,
        pub data: Arc<Mutex<HashMap<String, Entry>>>,
        pub fail: Arc<AtomicBool>,
        pub hang: Arc<AtomicBool>,
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
            let mut sums = vec![0; buckets as usize];
            for (k, e) in self.data.lock().unwrap().iter() {
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

        async fn digest(&self, buckets: u32) -> Result<Vec<u64>, PeerError> {
            self.gate().await?;
            Ok(self.digest_now(buckets))
        }

        async fn pull(&self, buckets: u32, which: Vec<u32>) -> Result<Vec<Write>, PeerError> {
            self.gate().await?;
            let data = self.data.lock().unwrap();
            let pulled: Vec<Write> = data
                .iter()
                .filter(|(k, _)| which.contains(&antientropy::bucket_of(k, buckets)))
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
            Ok(pulled)
        }

        async fn read(&self, key: String) -> Result<Option<Entry>, PeerError> {
            self.gate().await?;
            Ok(self.data.lock().unwrap().get(&key).cloned())
        }
    }

    fn write(key: &str, time: u64) -> Write {
        Write {
            key: key.into(),
            entry: Entry {
                value: Some(format!("v{time}").into()),
                version: Version {
                    time,
                    node: crate::version::NodeId::new("local").unwrap(),
                },
            },
        }
    }

    fn actor(
        peer: &FakePeer,
        capacity: usize,
    ) -> (
        ActorRef<ReplicationActor<FakePeer>>,
        Arc<PeerHealth>,
        ActorRef<StoreActor>,
    ) {
        let store = StoreActor::new(Arc::new(Clock::new(
            crate::version::NodeId::new("local").unwrap(),
        )));
        let reader = store.reader();
        let store = StoreActor::spawn(store);
        let health = Arc::new(PeerHealth::new("peer"));
        let actor = ReplicationActor::spawn(ReplicationActor::new(
            peer.clone(),
            health.clone(),
            store.clone(),
            reader,
            capacity,
            1024,
        ));
        (actor, health, store)
    }

    /// Waits for the resync to end: a minute of (paused) time at most, so a resync that never
    /// ends fails the test instead of hanging it.
    async fn settle_resync(health: &PeerHealth) {
        for _ in 0..12_000 {
            if !health.resyncing() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the resync did not end: peer {:?}", health.state());
    }

    #[test]
    fn health_transitions() {
        let h = PeerHealth::new("p");
        assert_eq!(h.state(), PeerState::Unknown);
        assert_eq!(h.last_contact(), None);
        h.mark_up();
        assert_eq!(h.state(), PeerState::Up);
        assert!(h.last_contact().is_some());
        h.mark_down(&PeerError::TimedOut);
        assert_eq!(h.state(), PeerState::Down);
        h.mark_lagging();
        assert!(h.needs_resync());
        h.mark_up();
        assert_eq!(
            h.state(),
            PeerState::Lagging,
            "reachable again is not caught up"
        );
    }

    #[test]
    fn batches_split_by_size_and_keep_order() {
        let big = "x".repeat(BATCH_BYTES / 2);
        let writes: Vec<Write> = (0..5)
            .map(|i| Write {
                key: format!("k{i}"),
                entry: Entry {
                    value: Some(big.clone().into()),
                    version: Version {
                        time: i,
                        node: crate::version::NodeId::new("n").unwrap(),
                    },
                },
            })
            .collect();
        let sizes: Vec<usize> = batches(writes.clone(), BATCH_BYTES)
            .map(|b| b.len())
            .collect();
        assert_eq!(sizes, [1, 1, 1, 1, 1]);
        let small: Vec<Write> = (0..1000).map(|i| write(&format!("k{i}"), i)).collect();
        let flat: Vec<Write> = batches(small.clone(), BATCH_BYTES).flatten().collect();
        assert_eq!(flat, small);
        // A smaller limit (a peer client with a small message limit) makes smaller batches,
        // none over it.
        let limit = 10 * write_size(&small[0]);
        let split: Vec<Vec<Write>> = batches(small.clone(), limit).collect();
        assert!(split.len() >= 100, "{} batches", split.len());
        for b in &split {
            assert!(b.iter().map(write_size).sum::<usize>() <= limit);
        }
        assert_eq!(split.concat(), small);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_that_arrive_while_a_batch_is_in_flight_go_out_together() {
        let peer = FakePeer::default();
        let (actor, health, _store) = actor(&peer, 100);
        settle_resync(&health).await;
        peer.delay_ms.store(10, Ordering::Relaxed);
        let before = peer.calls.load(Ordering::Relaxed);
        let asks: Vec<_> = (0..100)
            .map(|i| {
                let actor = actor.clone();
                tokio::spawn(async move {
                    actor
                        .ask(Replicate(write(&format!("k{i:03}"), i + 1)))
                        .await
                })
            })
            .collect();
        for a in asks {
            a.await.unwrap().unwrap();
        }
        let calls = peer.calls.load(Ordering::Relaxed) - before;
        assert!(calls <= 3, "100 concurrent writes took {calls} calls");
        let (batches, writes) = health.confirmed();
        assert_eq!(writes, 100);
        assert!((1..=3).contains(&batches), "{batches} batches");
        let mut keys = peer.received_keys();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 100, "every write delivered once or more");
    }

    #[tokio::test(start_paused = true)]
    async fn writes_waiting_behind_a_slow_batch_are_bounded_by_bytes_too() {
        let peer = FakePeer::default();
        let (actor, health, _store) = actor(&peer, 100);
        settle_resync(&health).await;
        // The peer takes a minute per batch: the first is in flight, the rest wait.
        peer.delay_ms.store(60_000, Ordering::Relaxed);
        let value = "v".repeat(1024 * 1024);
        let big = |i: u64| {
            let mut w = write(&format!("big{i}"), i + 1);
            w.entry.value = Some(value.clone().into());
            w
        };
        let first = actor.clone();
        let w = big(0);
        tokio::spawn(async move { first.ask(Replicate(w)).await });
        // Asks that would wait are spawned; the first one refused ends the loop.
        let mut waiting = 0u64;
        let refused = loop {
            assert!(waiting < 1024, "never refused: the count bound alone held");
            let actor = actor.clone();
            let w = big(waiting + 1);
            let ask = tokio::spawn(async move { actor.ask(Replicate(w)).await });
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
            if ask.is_finished() {
                break ask.await.unwrap();
            }
            waiting += 1;
        };
        assert!(
            matches!(
                refused,
                Err(kameo::error::SendError::HandlerError(PeerError::Lagging))
            ),
            "{refused:?}"
        );
        // About 64 MiB of 1 MiB values, far below the 1024 writes the count allows.
        assert!((60..=64).contains(&waiting), "{waiting} writes waited");
        assert!(health.needs_resync());
    }

    #[tokio::test(start_paused = true)]
    async fn one_write_over_the_byte_budget_still_waits_alone() {
        let peer = FakePeer::default();
        let (actor, health, _store) = actor(&peer, 100);
        settle_resync(&health).await;
        peer.delay_ms.store(60_000, Ordering::Relaxed);
        let send = |key: &str, len: usize| {
            let actor = actor.clone();
            let mut w = write(key, 1);
            w.entry.value = Some("v".repeat(len).into());
            tokio::spawn(async move { actor.ask(Replicate(w)).await })
        };
        let _in_flight = send("first", 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Nothing is waiting: a write over the whole budget waits (and goes in a batch alone).
        let big = send("big", PENDING_BYTES + 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!big.is_finished(), "refused: {:?}", big.await);
        // Behind it, the budget is spent.
        let next = send("next", 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(next.is_finished());
        assert!(matches!(
            next.await.unwrap(),
            Err(kameo::error::SendError::HandlerError(PeerError::Lagging))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_down_peer_gets_its_backlog_in_order_when_it_returns() {
        let peer = FakePeer::default();
        let (actor, health, _store) = actor(&peer, 100);
        settle_resync(&health).await;
        peer.fail.store(true, Ordering::Relaxed);
        let first = actor.ask(Replicate(write("a", 1))).await;
        assert!(matches!(
            first,
            Err(kameo::error::SendError::HandlerError(
                PeerError::Unreachable(_)
            ))
        ));
        for (k, t) in [("b", 2), ("c", 3)] {
            let r = actor.ask(Replicate(write(k, t))).await;
            assert!(matches!(
                r,
                Err(kameo::error::SendError::HandlerError(
                    PeerError::Backlogged(_)
                ))
            ));
        }
        assert_eq!(health.backlog(), 3);
        assert_eq!(health.state(), PeerState::Down);

        peer.fail.store(false, Ordering::Relaxed);
        tokio::time::sleep(BACKOFF_MAX * 2).await;
        assert_eq!(peer.received_keys()[..3], ["a", "b", "c"]);
        assert_eq!(health.backlog(), 0);
        assert_eq!(health.state(), PeerState::Up);
        // And new writes go straight through again.
        actor.ask(Replicate(write("d", 4))).await.unwrap();
        assert_eq!(peer.received_keys().last().map(String::as_str), Some("d"));
        // The backlog went as one batch, then "d" as another.
        assert_eq!(health.confirmed(), (2, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_write_is_not_retried_and_does_not_block_the_next() {
        let peer = FakePeer::default();
        let (actor, health, _store) = actor(&peer, 100);
        settle_resync(&health).await;
        peer.reject.store(true, Ordering::Relaxed);
        let r = actor.ask(Replicate(write("big", 1))).await;
        assert!(matches!(
            r,
            Err(kameo::error::SendError::HandlerError(PeerError::Rejected(
                _
            )))
        ));
        assert_eq!(
            health.backlog(),
            0,
            "nothing held for a retry that would fail again"
        );
        assert_eq!(health.confirmed(), (0, 0), "a refusal confirms nothing");
        peer.reject.store(false, Ordering::Relaxed);
        actor.ask(Replicate(write("next", 2))).await.unwrap();
        assert_eq!(peer.received_keys(), ["next"]);
    }

    /// A peer that refuses this node (another cluster token) costs one call per batch, not one
    /// per write, and its writes are held for when the setup is fixed.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_refuses_this_node_is_not_asked_write_by_write() {
        let peer = FakePeer::default();
        peer.refuse.store(true, Ordering::Relaxed);
        let writes: Vec<Write> = (0..64).map(|i| write(&format!("k{i}"), i + 1)).collect();
        let calls = peer.calls.load(Ordering::Relaxed);
        let result = deliver(&peer, &writes).await;
        assert!(matches!(result, Err(PeerError::Refused(_))), "{result:?}");
        assert_eq!(peer.calls.load(Ordering::Relaxed) - calls, 1);

        let (actor, health, _store) = actor(&peer, 100);
        let r = actor.ask(Replicate(write("held", 1))).await;
        assert!(
            matches!(
                r,
                Err(kameo::error::SendError::HandlerError(PeerError::Refused(_)))
            ),
            "{r:?}"
        );
        assert_eq!(health.state(), PeerState::Down);
        assert_eq!(health.backlog(), 1, "held for redelivery");
        // Fixed: the held write goes out with the next redelivery.
        peer.refuse.store(false, Ordering::Relaxed);
        tokio::time::sleep(BACKOFF_MAX * 2).await;
        assert!(peer.received_keys().contains(&"held".to_string()));
        assert_eq!(health.backlog(), 0);
    }

    fn big(key: &str, time: u64) -> Write {
        let mut w = write(key, time);
        w.entry.value = Some("x".repeat(100).into());
        w
    }

    #[tokio::test]
    async fn a_write_the_peer_refuses_costs_only_itself_not_its_batch() {
        let peer = FakePeer::default();
        peer.max_value_bytes.store(10, Ordering::Relaxed);
        let writes = [
            write("a", 1),
            big("b", 2),
            write("c", 3),
            big("d", 4),
            write("e", 5),
        ];
        let refused = deliver(&peer, &writes).await.unwrap();
        let refused: Vec<usize> = refused.into_iter().map(|(i, _)| i).collect();
        assert_eq!(refused, [1, 3]);
        assert_eq!(peer.received_keys(), ["a", "c", "e"], "the rest, in order");
        // Any other error ends the delivery: the caller holds the batch for a retry.
        peer.fail.store(true, Ordering::Relaxed);
        assert!(matches!(
            deliver(&peer, &writes).await,
            Err(PeerError::Unreachable(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_batched_with_a_refused_one_are_delivered_and_acked() {
        let peer = FakePeer::default();
        let (actor, health, _store) = actor(&peer, 100);
        settle_resync(&health).await;
        peer.max_value_bytes.store(10, Ordering::Relaxed);
        // A slow peer, so that the writes queue up behind the first and go out together.
        peer.delay_ms.store(10, Ordering::Relaxed);
        let asks: Vec<_> = (0..20)
            .map(|i| {
                let actor = actor.clone();
                let w = if i == 7 {
                    big("k07", 8)
                } else {
                    write(&format!("k{i:02}"), i + 1)
                };
                tokio::spawn(async move { actor.ask(Replicate(w)).await })
            })
            .collect();
        for (i, a) in asks.into_iter().enumerate() {
            let r = a.await.unwrap();
            if i == 7 {
                assert!(
                    matches!(
                        r,
                        Err(kameo::error::SendError::HandlerError(PeerError::Rejected(
                            _
                        )))
                    ),
                    "{r:?}"
                );
            } else {
                r.unwrap();
            }
        }
        assert_eq!(health.confirmed().1, 19);
        assert_eq!(health.backlog(), 0);
        let mut keys = peer.received_keys();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 19);
        assert!(!keys.contains(&"k07".to_string()));
    }

    #[tokio::test(start_paused = true)]
    async fn backlog_overflow_falls_back_to_anti_entropy() {
        let peer = FakePeer::default();
        let (actor, health, store) = actor(&peer, 2);
        settle_resync(&health).await;
        peer.fail.store(true, Ordering::Relaxed);
        for t in 0..5 {
            let w = write(&format!("k{t}"), t + 1);
            // As the coordinator does: the local store has the write whatever the peer says.
            store.ask(store::Apply(vec![w.clone()])).await.unwrap();
            let _ = actor.ask(Replicate(w)).await;
        }
        assert!(
            health.needs_resync(),
            "an overflowing backlog marks the peer"
        );
        assert!(health.backlog() <= 2);
        peer.fail.store(false, Ordering::Relaxed);
        tokio::time::sleep(BACKOFF_MAX * 2).await;
        settle_resync(&health).await;
        for t in 0..5 {
            assert_eq!(
                peer.value(&format!("k{t}")),
                Some(Some(format!("v{}", t + 1))),
                "k{t}"
            );
        }
        assert!(!health.needs_resync());
    }
}
