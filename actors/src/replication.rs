//! One replication actor per peer: it delivers this node's writes to that peer, in order, and
//! keeps the peer's health (up, down, lagging, needs resync) where the node can read it.
//!
//! The actor owns the peer's connection through a [`PeerClient`], the seam where the node
//! crate plugs in its gRPC client (and tests plug in fakes). Its mailbox is bounded: when a
//! peer is slow or stuck, writes queue up to the bound, and past it the coordinator gets
//! `MailboxFull` at once instead of waiting, marks the peer lagging, and records that it needs
//! a resync. So a bad peer costs a Put nothing beyond the replication deadline.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use kameo::Actor;
use kameo::message::{Context, Message};

use crate::store::Write;

/// How a replication actor reaches its peer. Implementations own the connection and reconnect
/// on their own; a call that fails is reported, not retried here.
pub trait PeerClient: Send + Sync + 'static {
    /// Delivers one write. `Ok` means the peer has applied it or already had a newer version.
    fn replicate(&self, write: Write) -> impl Future<Output = Result<(), PeerError>> + Send;
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
    /// The peer answered with an error.
    #[error("rejected the write: {0}")]
    Rejected(String),
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
}

impl PeerHealth {
    /// Health of the peer at `addr`, not contacted yet.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            state: AtomicU8::new(PeerState::Unknown as u8),
            needs_resync: AtomicBool::new(false),
        }
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
        // Lagging stays visible until something resyncs the peer: being reachable again does not
        // bring back the writes it missed.
        if self.state() != PeerState::Lagging {
            self.set_state(PeerState::Up, &"delivered");
        }
    }

    pub(crate) fn mark_down(&self, error: &PeerError) {
        self.needs_resync.store(true, Ordering::Relaxed);
        self.set_state(PeerState::Down, error);
    }

    pub(crate) fn mark_lagging(&self) {
        self.needs_resync.store(true, Ordering::Relaxed);
        self.set_state(PeerState::Lagging, &"replication mailbox full");
    }
}

/// The replication actor for one peer.
pub struct ReplicationActor<P: PeerClient> {
    client: P,
    health: Arc<PeerHealth>,
}

impl<P: PeerClient> ReplicationActor<P> {
    pub fn new(client: P, health: Arc<PeerHealth>) -> Self {
        Self { client, health }
    }
}

impl<P: PeerClient> Actor for ReplicationActor<P> {
    type Args = Self;
    type Error = kameo::error::Infallible;

    fn name() -> &'static str {
        "ReplicationActor"
    }

    async fn on_start(args: Self, _: kameo::actor::ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(args)
    }
}

/// Deliver one write to this actor's peer. Always sent with `ask`: the reply carries the
/// outcome back to the Put waiting on it (a failed `tell` would stop the actor).
#[derive(Debug)]
pub struct Replicate(pub Write);

impl<P: PeerClient> Message<Replicate> for ReplicationActor<P> {
    type Reply = Result<(), PeerError>;

    async fn handle(&mut self, msg: Replicate, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let key_len = msg.0.key.len();
        match self.client.replicate(msg.0).await {
            Ok(()) => {
                self.health.mark_up();
                Ok(())
            }
            Err(error) => {
                tracing::debug!(peer = %self.health.addr, key_len, %error, "replication failed");
                self.health.mark_down(&error);
                Err(error)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// A scripted peer: records what it receives, and can be told to fail or to hang.
    #[derive(Clone, Default)]
    pub struct FakePeer {
        pub received: Arc<Mutex<Vec<Write>>>,
        pub fail: Arc<AtomicBool>,
        pub hang: Arc<AtomicBool>,
    }

    impl PeerClient for FakePeer {
        async fn replicate(&self, write: Write) -> Result<(), PeerError> {
            if self.hang.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            if self.fail.load(Ordering::Relaxed) {
                return Err(PeerError::Unreachable("connection refused".into()));
            }
            self.received.lock().unwrap().push(write);
            Ok(())
        }
    }

    #[test]
    fn health_transitions() {
        let h = PeerHealth::new("p");
        assert_eq!(h.state(), PeerState::Unknown);
        h.mark_up();
        assert_eq!(h.state(), PeerState::Up);
        assert!(!h.needs_resync());
        h.mark_down(&PeerError::TimedOut);
        assert_eq!(h.state(), PeerState::Down);
        assert!(h.needs_resync(), "a failed delivery is a missed write");
        h.mark_lagging();
        h.mark_up();
        assert_eq!(
            h.state(),
            PeerState::Lagging,
            "reachable again is not caught up"
        );
    }
}
