//! One replication actor per peer: it delivers this node's writes to that peer, in order, keeps
//! what the peer has not confirmed (hinted handoff), and keeps the peer's [`PeerHealth`].
//!
//! The actor owns the peer's connection through a [`PeerClient`]. Its mailbox is bounded: when
//! a peer is slow or stuck, writes queue up to the bound, and past it the coordinator gets
//! `MailboxFull` at once instead of waiting, marks the peer lagging, and records that it needs
//! a resync. So a bad peer costs a Put nothing beyond the replication deadline.
//!
//! The actor itself never waits on the network: every delivery runs in a task of its own, which
//! reports back with a message. Its handlers only move writes between queues, so the mailbox
//! drains as fast as writes arrive, however slow the peer.
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
use std::sync::Arc;
use std::time::Duration;

use kameo::Actor;
use kameo::actor::{ActorRef, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::message::{Context, Message};
use kameo::reply::{DelegatedReply, ReplySender};
use tokio::task::AbortHandle;
use tracing::Instrument;

use crate::antientropy;
use crate::entry::Write;
use crate::health::{PeerHealth, PeerState};
use crate::peer::{PeerClient, PeerError, RejectedWrite, batch_len, deliver, write_size};
use crate::placement::PartitionSet;
use crate::store::{StoreActor, StoreReader};

/// First wait before redelivering a backlog.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between redelivery attempts: how stale a returning peer can stay at worst.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Wait before retrying a failed anti-entropy round.
const RESYNC_RETRY: Duration = Duration::from_secs(2);
/// Most bytes a handoff backlog holds, whatever `--handoff-capacity` says: a down peer must not
/// cost a healthy node its memory when values are large.
const BACKLOG_BYTES: usize = 256 * 1024 * 1024;
/// Most bytes of writes waiting behind the batch in flight, whatever the pending capacity (a
/// count) says: a peer that hangs holds the batch for a whole call timeout, and with large
/// values a thousand pending writes would be a gigabyte per peer. Past it, writes are answered
/// "lagging", and the peer catches up by anti-entropy.
const PENDING_BYTES: usize = 64 * 1024 * 1024;

/// Where the reply to one write goes: `None` for a repair, which nobody waits for.
type Waiter = Option<ReplySender<Result<(), PeerError>>>;

fn answer(waiter: Waiter, result: Result<(), PeerError>) {
    if let Some(w) = waiter {
        w.send(result);
    }
}

/// Answers the waiters of a batch the peer took: each write's own, or the peer's rejection of
/// it (which it would give again, so the write is not retried).
fn answer_batch(peer: &str, writes: &[Write], waiters: Vec<Waiter>, rejected: Vec<RejectedWrite>) {
    let mut rejected = rejected.into_iter().peekable();
    for (i, (write, waiter)) in writes.iter().zip(waiters).enumerate() {
        match rejected.next_if(|(at, _)| *at == i) {
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
    /// The task delivering the batch in flight, if one is.
    in_flight: Option<tokio::task::JoinHandle<()>>,
    /// Writes in the batch in flight.
    sending: usize,
    /// The tasks of a redelivery and of an anti-entropy round, if they run: the actor's own
    /// work, which ends with it (see `on_stop`).
    redelivery: Option<AbortHandle>,
    resync: Option<AbortHandle>,
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
    /// A redelivery is scheduled (waiting out its backoff) or running (a batch of the backlog
    /// is in flight).
    redelivering: bool,
    /// How long the last deliveries may take when the actor stops.
    drain_limit: Duration,
    /// The partitions this node and the peer both hold: what anti-entropy compares.
    scope: PartitionSet,
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
            in_flight: None,
            sending: 0,
            redelivery: None,
            resync: None,
            pending_capacity,
            pending_bytes: 0,
            health,
            store,
            reader,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            backlog_capacity,
            backoff: BACKOFF_MIN,
            redelivering: false,
            drain_limit: Duration::from_secs(1),
            scope: PartitionSet::all(),
        }
    }

    /// Sets how long the last deliveries may take when the actor stops (default 1 s).
    pub fn with_drain_limit(mut self, limit: Duration) -> Self {
        self.drain_limit = limit;
        self
    }

    /// Sets the partitions anti-entropy compares with the peer (default: all of them).
    pub fn with_scope(mut self, scope: PartitionSet) -> Self {
        self.scope = scope;
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
                    Ok(rejected) => {
                        health.count_confirmed(writes.len() - rejected.len());
                        answer_batch(health.addr(), &writes, waiters, rejected);
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
                peer = %self.health.addr(),
                dropped = self.backlog.len(),
                "handoff backlog full; dropped it, peer marked for anti-entropy"
            );
            self.backlog.clear();
            self.backlog_bytes = 0;
            self.health.mark_needs_resync();
        }
        self.backlog_bytes += size;
        self.backlog.push_back(write);
        self.health.set_backlog(self.backlog.len());
    }

    /// Takes a write to deliver, or answers at once: behind the backlog if the peer is down,
    /// "lagging" if too much is waiting already, else pending for the next batch.
    fn take(&mut self, write: Write, waiter: Waiter, me: ActorRef<Self>) {
        if !self.backlog.is_empty() {
            // Known down: queue behind the backlog without waiting on the network.
            self.hold(write);
            answer(waiter, Err(PeerError::Backlogged(self.backlog.len())));
        } else if self.pending.len() >= self.pending_capacity
            // One write bigger than the budget still waits, alone, as it goes in a batch alone.
            || (!self.pending.is_empty()
                && self.pending_bytes + write_size(&write) > PENDING_BYTES)
        {
            self.health.mark_lagging();
            answer(waiter, Err(PeerError::Lagging));
        } else {
            self.pending_bytes += write_size(&write);
            self.pending.push((write, waiter));
            self.flush(me);
        }
        self.note_in_flight();
    }

    /// Publishes how many writes wait for a batch or are being delivered.
    fn note_in_flight(&self) {
        self.health.set_in_flight(self.pending.len() + self.sending);
    }

    /// A delivery succeeded: the peer is up, and if it missed writes, a resync starts now.
    fn reached(&mut self, me: WeakActorRef<Self>) {
        self.health.mark_up();
        if self.health.needs_resync() {
            self.start_resync(me);
        }
    }

    /// Sends the pending writes as one batch, unless a batch is already in flight.
    fn flush(&mut self, me: ActorRef<Self>) {
        if self.in_flight.is_some() || self.pending.is_empty() {
            return;
        }
        let n = batch_len(
            self.pending.iter().map(|(w, _)| w),
            self.client.max_batch_bytes(),
        );
        let (writes, waiters): (Vec<Write>, Vec<Waiter>) = self.pending.drain(..n).unzip();
        self.pending_bytes -= writes.iter().map(write_size).sum::<usize>();
        self.sending = writes.len();
        let client = self.client.clone();
        let task = tokio::spawn(
            async move {
                let result = deliver(&client, &writes).await;
                let _ = me
                    .tell(Delivered {
                        writes,
                        waiters,
                        result,
                    })
                    .await;
            }
            .in_current_span(),
        );
        self.in_flight = Some(task);
    }

    /// Retries the backlog after the current backoff, unless a retry is already coming.
    fn schedule_redelivery(&mut self, me: WeakActorRef<Self>) {
        if self.redelivering {
            return;
        }
        self.redelivering = true;
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        tokio::spawn(
            async move {
                tokio::time::sleep(wait).await;
                if let Some(me) = me.upgrade() {
                    let _ = me.tell(Redeliver).await;
                }
            }
            .in_current_span(),
        );
    }

    /// Sends the first batch of the backlog, in a task of its own like any batch: the actor
    /// goes on taking writes (into the backlog, behind it) while the peer takes its time.
    fn redeliver_next(&mut self, me: ActorRef<Self>) {
        let n = batch_len(self.backlog.iter(), self.client.max_batch_bytes());
        let batch: Vec<Write> = self.backlog.iter().take(n).cloned().collect();
        let client = self.client.clone();
        let task = tokio::spawn(
            async move {
                let result = deliver(&client, &batch).await;
                let _ = me.tell(Redelivered { batch, result }).await;
            }
            .in_current_span(),
        );
        self.redelivery = Some(task.abort_handle());
    }

    /// Starts an anti-entropy round in the background unless one is running. Runs beside the
    /// actor, so deliveries go on meanwhile.
    fn start_resync(&mut self, me: WeakActorRef<Self>) {
        if !self.health.begin_resync() {
            return;
        }
        let (client, store, reader, health, scope) = (
            self.client.clone(),
            self.store.clone(),
            self.reader.clone(),
            self.health.clone(),
            self.scope,
        );
        let task = tokio::spawn(
            async move {
                let round = antientropy::sync(&client, &store, &reader, &scope).await;
                health.count_round(round.as_ref().ok().map(|r| (r.pulled, r.pushed)));
                match round {
                    Ok(report) => {
                        // A round is an exchange like any delivery: the peer is up (and, if it
                        // was lagging and nothing was missed meanwhile, caught up).
                        health.mark_up();
                        if report.buckets > 0 {
                            tracing::info!(
                                peer = %health.addr(),
                                buckets = report.buckets,
                                pulled = report.pulled,
                                pushed = report.pushed,
                                "anti-entropy repaired differences"
                            );
                        }
                        health.end_resync();
                    }
                    Err(error) => {
                        health.mark_needs_resync();
                        // A peer that rejected something answered: it is not down.
                        if let antientropy::SyncError::Peer(e) = &error
                            && !matches!(e, PeerError::Rejected(_))
                        {
                            health.mark_down(e);
                        }
                        tracing::debug!(peer = %health.addr(), %error, "anti-entropy round failed");
                        health.end_resync();
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
                    }
                }
            }
            .in_current_span(),
        );
        self.resync = Some(task.abort_handle());
    }
}

impl<P: PeerClient> Actor for ReplicationActor<P> {
    type Args = Self;
    type Error = kameo::error::Infallible;

    fn name() -> &'static str {
        "ReplicationActor"
    }

    async fn on_start(mut args: Self, actor_ref: ActorRef<Self>) -> Result<Self, Self::Error> {
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
        // The batch in flight gets as long as the writes behind it, at the same time.
        let in_flight = self.in_flight.take();
        let limit = self.drain_limit;
        let finished = async move {
            let mut task = in_flight?;
            match tokio::time::timeout(limit, &mut task).await {
                Ok(_) => None,
                Err(_) => Some(task),
            }
        };
        let (undelivered, unfinished) = futures::join!(self.drain(), finished);
        // What the actor set going ends with it: a delivery, a redelivery or a round that
        // still waits on a peer that hangs must not hold its connection after the node stops.
        if let Some(task) = unfinished {
            task.abort();
        }
        for task in [&self.redelivery, &self.resync].into_iter().flatten() {
            task.abort();
        }
        if undelivered > 0 {
            // Not lost: the node runs an anti-entropy round with every peer when it starts
            // again, and so does the peer with us.
            tracing::warn!(
                peer = %self.health.addr(),
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
        self.take(msg.0, waiter, ctx.actor_ref().clone());
        delegated
    }
}

/// Deliver a write that nobody waits for: a quorum read's repair of a stale peer. It goes the
/// way a Put's writes go (batched, held while the peer is down, drained at shutdown); if too
/// much is waiting already, the peer is marked for anti-entropy, which repairs it anyway.
#[derive(Debug)]
pub struct Repair(pub Write);

impl<P: PeerClient> Message<Repair> for ReplicationActor<P> {
    type Reply = ();

    async fn handle(&mut self, msg: Repair, ctx: &mut Context<Self, Self::Reply>) {
        self.take(msg.0, None, ctx.actor_ref().clone());
    }
}

/// A batch's answer, sent by the task that delivered it back to the actor.
struct Delivered {
    writes: Vec<Write>,
    waiters: Vec<Waiter>,
    result: Result<Vec<RejectedWrite>, PeerError>,
}

impl<P: PeerClient> Message<Delivered> for ReplicationActor<P> {
    type Reply = ();

    async fn handle(&mut self, msg: Delivered, ctx: &mut Context<Self, Self::Reply>) {
        self.in_flight = None;
        self.sending = 0;
        match msg.result {
            Ok(rejected) => {
                // The peer answered: it is up, even if it rejected some writes. Those it would
                // reject again, so they are not retried.
                self.health
                    .count_confirmed(msg.writes.len() - rejected.len());
                answer_batch(self.health.addr(), &msg.writes, msg.waiters, rejected);
                self.reached(ctx.actor_ref().downgrade());
                self.flush(ctx.actor_ref().clone());
            }
            Err(error) => {
                tracing::debug!(peer = %self.health.addr(), %error, "replication failed; writes held for handoff");
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
        self.note_in_flight();
    }
}

/// Retry the handoff backlog (sent by the actor to itself after a backoff).
#[derive(Debug)]
pub struct Redeliver;

impl<P: PeerClient> Message<Redeliver> for ReplicationActor<P> {
    type Reply = ();

    async fn handle(&mut self, _: Redeliver, ctx: &mut Context<Self, Self::Reply>) {
        if self.backlog.is_empty() {
            self.redelivering = false;
            return;
        }
        self.redeliver_next(ctx.actor_ref().clone());
    }
}

/// The answer to a batch of the backlog, from the task that sent it.
struct Redelivered {
    /// The first writes of the backlog, as sent. Writes that arrived since are behind them.
    batch: Vec<Write>,
    result: Result<Vec<RejectedWrite>, PeerError>,
}

impl<P: PeerClient> Message<Redelivered> for ReplicationActor<P> {
    type Reply = ();

    async fn handle(&mut self, msg: Redelivered, ctx: &mut Context<Self, Self::Reply>) {
        match msg.result {
            Ok(rejected) => {
                self.health
                    .count_confirmed(msg.batch.len() - rejected.len());
                for (i, why) in rejected {
                    tracing::warn!(peer = %self.health.addr(), key = %msg.batch[i].key, %why, "peer rejected a held write; dropped");
                }
                // The batch is still at the front, unless the backlog overflowed meanwhile and
                // was given up for anti-entropy: then it is gone already.
                let sent = msg.batch.len().min(self.backlog.len());
                if self
                    .backlog
                    .iter()
                    .take(sent)
                    .eq(msg.batch.iter().take(sent))
                {
                    for w in self.backlog.drain(..sent) {
                        self.backlog_bytes -= write_size(&w);
                    }
                }
                self.health.set_backlog(self.backlog.len());
                if !self.backlog.is_empty() {
                    self.redeliver_next(ctx.actor_ref().clone());
                    return;
                }
                tracing::info!(peer = %self.health.addr(), "handoff backlog delivered");
                self.redelivering = false;
                self.backoff = BACKOFF_MIN;
                self.reached(ctx.actor_ref().downgrade());
            }
            Err(error) => {
                self.health.mark_down(&error);
                self.redelivering = false;
                self.schedule_redelivery(ctx.actor_ref().downgrade());
            }
        }
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

/// The partitions anti-entropy compares with the peer from the next round on: those both
/// nodes hold since the ring changed. A round already running finishes with the old ones.
#[derive(Debug)]
pub struct SetScope(pub PartitionSet);

impl<P: PeerClient> Message<SetScope> for ReplicationActor<P> {
    type Reply = ();

    async fn handle(&mut self, msg: SetScope, _: &mut Context<Self, Self::Reply>) {
        self.scope = msg.0;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use kameo::actor::Spawn;

    use super::*;
    use crate::clock::Clock;
    use crate::entry::Entry;
    use crate::store;
    use crate::testing::FakePeer;
    use crate::version::Version;

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
            // The first round has run (it reached the peer, or it was refused), and no other.
            if !health.resyncing() && health.state() != PeerState::Waiting {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the resync did not end: peer {:?}", health.state());
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

    /// A peer that refuses this node (another cluster token) has its writes held for when the
    /// setup is fixed.
    #[tokio::test(start_paused = true)]
    async fn the_writes_of_a_peer_that_refuses_this_node_are_held() {
        let peer = FakePeer::default();
        peer.refuse.store(true, Ordering::Relaxed);
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

    /// A redelivery to a slow peer runs beside the actor: writes that arrive meanwhile are
    /// taken at once (held behind the backlog), not queued in the mailbox behind a handler
    /// waiting on the network, which would fill it and make the peer look lagging.
    #[tokio::test(start_paused = true)]
    async fn a_slow_redelivery_does_not_stop_the_actor_taking_writes() {
        let peer = FakePeer::default();
        let store = StoreActor::new(Arc::new(Clock::new(
            crate::version::NodeId::new("local").unwrap(),
        )));
        let reader = store.reader();
        let store = StoreActor::spawn(store);
        let health = Arc::new(PeerHealth::new("peer"));
        // A small mailbox, as a node's would fill under load.
        let actor = ReplicationActor::spawn_with_mailbox(
            ReplicationActor::new(peer.clone(), health.clone(), store, reader, 1000, 1024),
            kameo::mailbox::bounded(4),
        );
        settle_resync(&health).await;
        peer.fail.store(true, Ordering::Relaxed);
        let _ = actor.ask(Replicate(write("first", 1))).await;
        assert_eq!(health.backlog(), 1);
        // The peer comes back, slowly: its redelivery takes a minute.
        peer.fail.store(false, Ordering::Relaxed);
        peer.delay_ms.store(60_000, Ordering::Relaxed);
        tokio::time::sleep(BACKOFF_MIN * 2).await;
        // Meanwhile far more writes than the mailbox holds arrive, one after another.
        for i in 0..20 {
            let sent = actor
                .ask(Replicate(write(&format!("k{i}"), i + 2)))
                .try_send();
            let answer = tokio::time::timeout(Duration::from_secs(1), sent)
                .await
                .expect("the actor is not taking writes");
            assert!(
                matches!(
                    answer,
                    Err(kameo::error::SendError::HandlerError(
                        PeerError::Backlogged(_)
                    ))
                ),
                "write {i}: {answer:?}"
            );
        }
        assert_ne!(health.state(), PeerState::Lagging);
        assert!(!health.needs_resync());
        assert_eq!(health.backlog(), 21);
        // And once the peer answers, all of it goes, in order.
        peer.delay_ms.store(0, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(health.backlog(), 0);
        let keys = peer.received_keys();
        assert_eq!(keys.first().map(String::as_str), Some("first"));
        assert_eq!(keys.len(), 21);
    }

    #[tokio::test(start_paused = true)]
    async fn a_repair_is_delivered_like_a_write_that_nobody_waits_for() {
        let peer = FakePeer::default();
        let (actor, health, _store) = actor(&peer, 100);
        settle_resync(&health).await;
        actor.tell(Repair(write("stale", 7))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(peer.received_keys(), ["stale"]);
        assert_eq!(health.confirmed(), (1, 1));
    }
}
