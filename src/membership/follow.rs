//! How a node keeps up with ring changes it did not make: taking a newer ring from a member
//! as it starts and whenever gossip (or a periodic poll) says one holds it, settling a
//! committed change its claimant cannot, and copying the partitions a change gives it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kvstore_actors::membership::{Phase, RingState};
use tracing::Instrument;

use super::{Change, Members};
use crate::error::Error;
use crate::gossip::Liveness;

impl Members {
    /// Asks every peer for its ring at once and takes the newest, if it is newer than this
    /// node's: what a node does as it starts, so that one that missed a change while it was
    /// down does not serve in the old ring for a period. Peers that do not answer in `wait`
    /// are passed over.
    pub async fn catch_up_once(self: &Arc<Self>, wait: Duration) {
        let Ok(state) = self.state().await else {
            return;
        };
        let asks = (state.members().into_iter())
            .filter(|m| *m != self.me)
            .filter_map(|m| self.link(&m).ok())
            .map(|link| async move { tokio::time::timeout(wait, link.get_ring()).await });
        let newest = (futures::future::join_all(asks).await.into_iter())
            .filter_map(|answer| answer.ok()?.ok())
            .max_by_key(|theirs| theirs.epoch());
        if let Some(theirs) = newest.filter(|t| t.epoch() > state.epoch()) {
            let version = theirs.ring().version();
            match self.adopt(theirs).await {
                Ok(_) => tracing::info!(ring_version = version, "took the newer ring of a peer"),
                Err(error) => tracing::warn!(%error, "could not take a peer's newer ring"),
            }
        }
    }

    /// Takes a newer ring as soon as gossip says members of this node's ring hold one, from
    /// the first of them, newest first, that answers with it: how a node that missed a change
    /// (it was down, or cut off from the claimant) catches up. Gossip is a hint only: every
    /// `poll` the node also asks one member in turn, so that a node whose gossip does not get
    /// through (UDP blocked) catches up too, later. Looks again every `every` while a newer
    /// ring is announced and not taken. Runs until the node stops.
    pub async fn follow(self: Arc<Self>, every: Duration, poll: Duration) {
        let gossip = self.gossip.get();
        let mut live = None;
        let mut unheard = Unheard::default();
        let mut turn = 0usize;
        let mut polled = tokio::time::Instant::now();
        loop {
            // Watched again after gossip restarts.
            if let (None, Some(gossip)) = (&live, gossip) {
                live = gossip.watch().await;
            }
            let announced = (live.as_mut())
                .map(|l| crate::gossip::announced(&l.borrow_and_update()))
                .unwrap_or_default();
            let Ok(state) = self.state().await else {
                return;
            };
            let others: Vec<String> = (state.members().into_iter())
                .filter(|m| *m != self.me)
                .collect();
            let mut newer: Vec<_> = (announced.into_iter())
                .filter(|a| others.contains(&a.node))
                .filter(|a| a.epoch.is_some_and(|e| e > state.epoch()))
                .collect();
            newer.sort_by_key(|a| std::cmp::Reverse(a.epoch));
            let mut asks: Vec<(String, &str)> =
                (newer.into_iter()).map(|a| (a.node, "gossip")).collect();
            if polled.elapsed() >= poll && !others.is_empty() {
                turn = turn.wrapping_add(1);
                asks.push((others[turn % others.len()].clone(), "poll"));
                polled = tokio::time::Instant::now();
            }
            for (member, why) in asks {
                match self.take_newer(&member, &state).await {
                    Ok(Some(version)) => {
                        tracing::info!(peer = %member, ring_version = version, heard_by = why, "took a member's newer ring");
                        break;
                    }
                    Ok(None) if why == "gossip" => {
                        tracing::debug!(peer = %member, "a member announced a newer ring by gossip, and answered with no newer one");
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::debug!(peer = %member, %error, heard_by = why, "could not take a member's ring")
                    }
                }
            }
            if let Some(gossip) = gossip {
                let answering: Vec<String> = (self.node().await.peers().iter())
                    .filter(|h| h.state() == kvstore_actors::health::PeerState::Up)
                    .map(|h| h.addr().to_owned())
                    .collect();
                unheard.warn(&answering, &gossip.liveness().await);
            }
            // A committed change whose claimant restarted, or is gone, is settled now.
            let decides = state.deciders().take(2).any(|d| d == self.me);
            if state.phase() == Phase::Committed && decides {
                tokio::spawn(self.clone().resume().in_current_span());
            }
            let changed = async {
                match live.as_mut() {
                    Some(watched) => watched.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                going = changed => if !going {
                    // Gossip restarted (or stopped for good, as the node stops).
                    live = None;
                    if gossip.is_some_and(|g| g.stopped()) {
                        return;
                    }
                    tokio::time::sleep(every).await;
                },
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Asks `member` for its ring and takes it if it is newer than `state`; returns its
    /// version if it did.
    async fn take_newer(
        self: &Arc<Self>,
        member: &str,
        state: &RingState,
    ) -> Result<Option<u64>, Error> {
        let theirs =
            (self.link(member)?.get_ring().await).map_err(|e| Error::Unavailable(e.to_string()))?;
        if theirs.epoch() <= state.epoch() {
            return Ok(None);
        }
        let version = theirs.ring().version();
        self.adopt(theirs).await?;
        Ok(Some(version))
    }

    /// Settles a committed change that no one else will: on its claimant, restarted between
    /// the commit and the settling (every gaining node stops asking once it hears of the
    /// commit); or on the next member that may decide, once gossip sees the claimant dead and
    /// it does not answer. That member tells every other member the commit again before it
    /// settles, so none still reads from the old holders when they drop their keys; the
    /// claimant itself had committed first, and takes the settled ring as it comes back.
    /// Passes if another change step is under way here.
    async fn resume(self: Arc<Self>) {
        let Ok(_one_change_at_a_time) = self.changing.try_lock() else {
            return;
        };
        let Ok(state) = self.state().await else {
            return;
        };
        if state.phase() != Phase::Committed {
            return;
        }
        let (claimant, next) = {
            let mut deciders = state.deciders();
            let claimant = deciders.next().expect("a ring has a member").to_owned();
            (claimant, deciders.next().map(str::to_owned))
        };
        let skip = if claimant == self.me {
            None
        } else if next.as_deref() == Some(self.me.as_str())
            && self.liveness().await.get(&claimant) == Some(&Liveness::Dead)
            && !self.answers(&claimant).await
        {
            Some(claimant)
        } else {
            return;
        };
        let version = state.ring().version();
        match self.ready(state, &self.me.clone(), skip.as_deref()).await {
            Ok(_) => {
                tracing::info!(ring_version = version, gone_claimant = ?skip, "settled a committed change its claimant had not")
            }
            Err(error) => {
                tracing::warn!(ring_version = version, %error, "could not settle the committed change yet")
            }
        }
    }

    /// Copies the partitions the pending change to ring `version` gives this node, then
    /// tells the claimant, until the change is committed. Copying is a round of anti-entropy
    /// with each peer it shares partitions with, begun once every write coordinated before the
    /// change began has had its deadline to reach its holders. A peer that is no member of the
    /// new ring is left out if it is not up: a node being removed is gone, and every write a
    /// majority acknowledged is on another old holder too.
    pub(super) async fn fill(self: Arc<Self>, version: u64) {
        let node = self.node().await.clone();
        tokio::time::sleep(self.deadline).await;
        // A round already running may have begun before the change: only one begun after
        // this point counts, so the baseline is the count once the running one has ended.
        // Whether one runs is read first: a round counts itself done before it says it has
        // stopped, so a round that ends between the two reads is counted, not missed.
        let baseline: HashMap<String, u64> = (node.peers().iter())
            .map(|h| {
                let running = u64::from(h.resyncing());
                let ending = h.anti_entropy().rounds + running;
                (h.addr().to_owned(), ending)
            })
            .collect();
        node.resync_peers();
        let mut asked = tokio::time::Instant::now();
        loop {
            let Some(placement) = node.placement() else {
                return;
            };
            let state = placement.state().clone();
            if state.ring().version() != version || state.phase() != Phase::Pending {
                return;
            }
            let copied = (node.peers().iter().enumerate())
                .filter(|(i, _)| !placement.shared_with(*i).is_empty())
                .filter(|(_, h)| {
                    state.ring().members().iter().any(|m| m == h.addr())
                        || h.state() == kvstore_actors::health::PeerState::Up
                })
                .all(|(_, h)| {
                    let completed = h.anti_entropy().rounds;
                    completed > baseline.get(h.addr()).copied().unwrap_or(0)
                });
            if !copied {
                if asked.elapsed() > Duration::from_secs(1) {
                    node.resync_peers();
                    asked = tokio::time::Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            match self.request(Change::Ready, &self.me.clone(), &[]).await {
                Ok(next) => {
                    if let Err(error) = self.adopt(next).await {
                        tracing::warn!(%error, "could not take the ring the claimant answered with");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "the claimant did not take this node's copy yet; asking again");
                }
            }
            // Until the others gaining partitions have copied theirs too.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Peers that answer this node's calls but that gossip has never heard of: their gossip
/// does not get through (another `--gossip-port`, or UDP blocked), which the node says once
/// for each, after a while.
#[derive(Default)]
struct Unheard {
    /// Since when each such peer has been seen answering and unheard.
    since: HashMap<String, tokio::time::Instant>,
    told: std::collections::HashSet<String>,
}

/// How long a peer may answer unheard by gossip before the node says so.
const UNHEARD_FOR: Duration = Duration::from_secs(60);

impl Unheard {
    /// Says which of the peers that answer (`answering`) gossip has not heard of for
    /// [`UNHEARD_FOR`] by `now`, each once.
    fn warn(&mut self, answering: &[String], liveness: &BTreeMap<String, Liveness>) {
        for peer in self.newly_unheard(answering, liveness, tokio::time::Instant::now()) {
            tracing::warn!(
                %peer,
                "this peer answers, but its gossip never reaches this node: give every node the \
                 same --gossip-port, and let UDP through between the nodes"
            );
        }
    }

    fn newly_unheard(
        &mut self,
        answering: &[String],
        liveness: &BTreeMap<String, Liveness>,
        now: tokio::time::Instant,
    ) -> Vec<String> {
        let unheard: Vec<&String> = (answering.iter())
            .filter(|peer| !liveness.contains_key(*peer))
            .collect();
        self.since.retain(|peer, _| unheard.contains(&peer));
        let mut newly = Vec::new();
        for peer in unheard {
            let since = *self.since.entry(peer.clone()).or_insert(now);
            if now.duration_since(since) >= UNHEARD_FOR && self.told.insert(peer.clone()) {
                newly.push(peer.clone());
            }
        }
        newly
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_answers_unheard_by_gossip_is_told_of_once_after_a_while() {
        let mut unheard = Unheard::default();
        let start = tokio::time::Instant::now();
        let answering = ["a:1".to_string(), "b:1".to_string()];
        let heard: BTreeMap<String, Liveness> = [("a:1".to_string(), Liveness::Live)].into();
        assert!(unheard.newly_unheard(&answering, &heard, start).is_empty());
        let later = start + UNHEARD_FOR;
        assert_eq!(unheard.newly_unheard(&answering, &heard, later), ["b:1"]);
        assert!(
            unheard
                .newly_unheard(&answering, &heard, later + UNHEARD_FOR)
                .is_empty(),
            "once"
        );
        // A peer heard of in between starts its wait again.
        let mut again = Unheard::default();
        assert!(again.newly_unheard(&answering, &heard, start).is_empty());
        let both: BTreeMap<String, Liveness> = [("a:1", Liveness::Live), ("b:1", Liveness::Dead)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
        assert!(
            again
                .newly_unheard(&answering, &both, start + UNHEARD_FOR / 2)
                .is_empty()
        );
        assert!(again.newly_unheard(&answering, &heard, later).is_empty());
        assert_eq!(
            again.newly_unheard(&answering, &heard, later + UNHEARD_FOR),
            ["b:1"]
        );
    }
}
