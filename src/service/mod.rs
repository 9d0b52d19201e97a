//! The node's gRPC services. Each handler validates its input, sends one message to the
//! node's actors, and maps the reply to a response; the logic lives in the actors.

pub mod body_timeout;
pub mod kv;
pub mod list;
pub mod observe;
pub mod replicator;
pub mod request_errors;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

use crate::Node;

/// The node's actors, once they have started. A node listens, and answers its health checks
/// (NOT_SERVING), while it replays its log; a call that comes meanwhile waits for the start, as
/// it would on a node that had not yet listened, for as long as its own deadline lets it.
#[derive(Clone, Default)]
pub struct Starting(Arc<StartingInner>);

#[derive(Default)]
struct StartingInner {
    node: OnceLock<Arc<Node>>,
    started: Notify,
    /// Opened once the node has asked its peers for their rings, and taken the newest.
    caught_up: Latch,
    /// The member a starting node asks to join through, while it waits to be let in.
    joining: OnceLock<String>,
}

impl Starting {
    /// The node has started.
    pub fn started(&self, node: Arc<Node>) {
        let _ = self.0.node.set(node);
        self.0.started.notify_waiters();
    }

    /// The node, if it has started.
    pub fn get(&self) -> Option<&Arc<Node>> {
        self.0.node.get()
    }

    /// The node starts by joining a ring through `seed`, and waits for its turn (another
    /// change is under way, or a member does not answer): until it is let in, a client's call
    /// is answered at once (see `serving`).
    pub fn joining(&self, seed: &str) {
        let _ = self.0.joining.set(seed.to_owned());
    }

    /// The node, once it has started; a node waiting to join answers `UNAVAILABLE` at once,
    /// where a client would otherwise wait out its deadline with no word of why.
    pub async fn serving(&self) -> Result<&Arc<Node>, crate::Error> {
        if let Some(node) = self.get() {
            return Ok(node);
        }
        if let Some(seed) = self.0.joining.get() {
            return Err(crate::Error::Unavailable(format!(
                "this node is joining the ring through {seed}, and serves once the ring's \
                 claimant has let it in (another change may be under way)"
            )));
        }
        Ok(self.node().await)
    }

    /// The node has asked its peers for their rings, and taken the newest if it was behind.
    pub fn caught_up(&self) {
        self.0.caught_up.open();
    }

    /// The node, once it has started and has its peers' newest ring: what a client's write
    /// waits for. A node restarted after it missed ring changes would otherwise place a write
    /// by the ring it had, on holders that may have given the key up (or on itself, removed
    /// meanwhile), where no member looks for it. The wait is bounded: the node asks its peers
    /// within a replication deadline.
    pub async fn current(&self) -> Result<&Arc<Node>, crate::Error> {
        let node = self.serving().await?;
        self.0.caught_up.wait().await;
        Ok(node)
    }

    /// The node, once it has started.
    pub async fn node(&self) -> &Arc<Node> {
        loop {
            if let Some(node) = self.0.node.get() {
                return node;
            }
            let started = self.0.started.notified();
            // Set between the look above and the registration: no notification is coming.
            if let Some(node) = self.0.node.get() {
                return node;
            }
            started.await;
        }
    }
}

/// A gate that opens once and stays open; tasks wait at it until it does.
#[derive(Default)]
struct Latch {
    open: AtomicBool,
    opened: Notify,
}

impl Latch {
    fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.opened.notify_waiters();
    }

    async fn wait(&self) {
        while !self.open.load(Ordering::Acquire) {
            // Made before the second look: a future of `notified` hears every later
            // `notify_waiters`, polled or not, so an open between the two looks is not missed.
            let opened = self.opened.notified();
            if self.open.load(Ordering::Acquire) {
                break;
            }
            opened.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_wait_at_the_latch_ends_when_it_opens_and_not_before() {
        let latch = Arc::new(Latch::default());
        assert!(latch.wait().now_or_never().is_none(), "closed at first");
        let waiting = tokio::spawn({
            let latch = latch.clone();
            async move { latch.wait().await }
        });
        // On this one-thread runtime the waiter runs, and parks, while the test yields.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a waiter passes a closed latch");
        latch.open();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("a waiter is woken when the latch opens")
            .unwrap();
        assert!(latch.wait().now_or_never().is_some(), "open for good");
    }
}
