//! Ring changes on a running node: taking a newer ring from a peer, keeping the ring in the
//! data dir, and on the claimant (the ring's first member) making a change: a node's join, in
//! the phases of `kvstore_actors::membership`.
//!
//! The claimant makes one change at a time, and only while every member answers and holds
//! its ring: it tells every member each new phase before the next. A member that missed a
//! phase (it was restarting) catches up by asking its peers, in turn, for their rings.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvstore_actors::PeerError;
use kvstore_actors::membership::{Phase, RingState};

use crate::Node;
use crate::error::Error;
use crate::peer::{GrpcPeer, PeerSettings, RingTag, set_ring_tag};
use crate::service::Starting;

/// The file in a data dir that holds the node's ring.
pub const RING_FILE: &str = "ring";

/// A node's part in ring changes.
pub struct Members {
    /// This node's id in the ring: its advertised address.
    me: String,
    tag: RingTag,
    data_dir: Option<PathBuf>,
    starting: Starting,
    /// How to reach other nodes, once the node has started.
    settings: OnceLock<PeerSettings>,
    /// Links for ring calls, by member.
    links: std::sync::Mutex<HashMap<String, GrpcPeer>>,
    /// Held while a ring is adopted and recorded, so that the data dir and the fingerprint
    /// end with the newest.
    adopting: tokio::sync::Mutex<()>,
    /// Held by the claimant while it makes a change.
    changing: tokio::sync::Mutex<()>,
}

impl Members {
    pub fn new(me: String, tag: RingTag, data_dir: Option<PathBuf>, starting: Starting) -> Self {
        Self {
            me,
            tag,
            data_dir,
            starting,
            settings: OnceLock::new(),
            links: Default::default(),
            adopting: Default::default(),
            changing: Default::default(),
        }
    }

    /// The node's ring fingerprint, as its links send it.
    pub fn tag(&self) -> RingTag {
        self.tag.clone()
    }

    /// This node's id in the ring.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The node has started, and reaches others with `settings`.
    pub fn started(&self, settings: PeerSettings) {
        let _ = self.settings.set(settings);
    }

    async fn node(&self) -> &Arc<Node> {
        self.starting.node().await
    }

    /// A link to member `id` for ring calls.
    pub fn link(&self, id: &str) -> Result<GrpcPeer, Error> {
        let settings = (self.settings.get())
            .ok_or_else(|| Error::Unavailable("the node is starting".into()))?;
        let mut links = self.links.lock().expect("links poisoned");
        if let Some(link) = links.get(id) {
            return Ok(link.clone());
        }
        let link = GrpcPeer::new(id, settings)?;
        links.insert(id.to_owned(), link.clone());
        Ok(link)
    }

    /// The node's ring and any change under way.
    pub async fn state(&self) -> Result<RingState, Error> {
        (self.node().await.ring_state())
            .ok_or_else(|| Error::FailedPrecondition("this node has no ring".into()))
    }

    /// Moves the node to `state` if it is newer than its own, and records it. Returns whether
    /// it moved.
    pub async fn adopt(&self, state: RingState) -> Result<bool, Error> {
        let _one_at_a_time = self.adopting.lock().await;
        let node = self.node().await;
        let peers = (node.strangers(&state).into_iter())
            .map(|id| Ok((id.clone(), self.link(&id)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        if !node.adopt(state.clone(), peers).await? {
            return Ok(false);
        }
        if let Some(dir) = &self.data_dir {
            record(dir, &state)?;
        }
        set_ring_tag(&self.tag, node.placement().and_then(|p| p.fingerprint()));
        Ok(true)
    }

    /// On the claimant: lets `joining` into the ring, or, with `ready`, completes its join. A
    /// join begins once every member answers with this node's ring, and returns once every
    /// member but the joining node has the pending ring; `ready` commits it, then settles it,
    /// telling every member each time. Asked again after a failure, each step goes on from
    /// where it stopped.
    pub async fn join(&self, joining: &str, ready: bool) -> Result<RingState, Error> {
        let _one_change_at_a_time = self.changing.lock().await;
        let state = self.state().await?;
        if state.claimant() != self.me {
            return Err(Error::FailedPrecondition(format!(
                "{} is not the ring's claimant: ask {}",
                self.me,
                state.claimant()
            )));
        }
        let is_member = state.ring().members().iter().any(|m| m == joining);
        let joined_now = is_member
            && state
                .previous()
                .is_some_and(|p| !p.members().iter().any(|m| m == joining));
        match state.phase() {
            Phase::Settled if is_member => Ok(state),
            Phase::Settled if ready => Err(Error::FailedPrecondition(format!(
                "{joining} is not joining the ring"
            ))),
            Phase::Settled => {
                self.check_members(&state).await?;
                let next = state.ring().with_joined(joining)?;
                let pending = state.begin(next)?;
                self.adopt(pending.clone()).await?;
                self.tell(&pending, Some(joining)).await?;
                tracing::info!(node = %joining, ring_version = pending.ring().version(), "a node joins the ring");
                Ok(pending)
            }
            Phase::Pending if joined_now && !ready => {
                self.tell(&state, Some(joining)).await?;
                Ok(state)
            }
            Phase::Pending | Phase::Committed if joined_now => {
                let mut state = state;
                while state.phase() != Phase::Settled {
                    state = state.advance()?;
                    self.adopt(state.clone()).await?;
                    self.tell(&state, None).await?;
                }
                tracing::info!(node = %joining, ring_version = state.ring().version(), "a node has joined the ring");
                Ok(state)
            }
            phase => Err(Error::Unavailable(format!(
                "the ring is changing (version {}, {}): try again once that change is done",
                state.ring().version(),
                phase.name()
            ))),
        }
    }

    /// Checks that every member answers and holds `state`: a change begun with a member
    /// down could not be told to it, nor copy from it.
    async fn check_members(&self, state: &RingState) -> Result<(), Error> {
        let others: Vec<String> = (state.members().into_iter())
            .filter(|m| *m != self.me)
            .collect();
        let asks = others.iter().map(|m| async move {
            let answer = self.link(m)?.get_ring().await;
            Ok::<_, Error>((m, answer))
        });
        let mut problems = Vec::new();
        for answer in futures::future::join_all(asks).await {
            let (member, answer) = answer?;
            match answer {
                Ok(theirs) if theirs == *state => {}
                Ok(theirs) if theirs.epoch() == state.epoch() => problems.push(format!(
                    "{member} holds another ring ({}) than the claimant's ({}): give every \
                     node the same --replicas and the same address for each node",
                    theirs
                        .fingerprint()
                        .unwrap_or_else(|| "every node holds every key".into()),
                    state
                        .fingerprint()
                        .unwrap_or_else(|| "every node holds every key".into()),
                )),
                Ok(theirs) => problems.push(format!(
                    "{member} holds ring version {} ({})",
                    theirs.ring().version(),
                    theirs.phase().name()
                )),
                Err(error) => problems.push(format!("{member} ({error})")),
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::Unavailable(format!(
            "the ring changes only while every member answers with the claimant's ring \
             (version {}): {}",
            state.ring().version(),
            problems.join(", ")
        )))
    }

    /// Offers `state` to every member of it but this node and `skip`; fails naming those
    /// that did not take it.
    async fn tell(&self, state: &RingState, skip: Option<&str>) -> Result<(), Error> {
        let others: Vec<String> = (state.members().into_iter())
            .filter(|m| *m != self.me && Some(m.as_str()) != skip)
            .collect();
        let pushes = others.iter().map(|m| async move {
            let answer = self.link(m)?.push_ring(state).await;
            Ok::<_, Error>((m, answer))
        });
        let mut missed = Vec::new();
        for answer in futures::future::join_all(pushes).await {
            let (member, answer) = answer?;
            match answer {
                Ok(theirs) if theirs.epoch() >= state.epoch() => {}
                Ok(theirs) => missed.push(format!(
                    "{member} (kept ring version {}, {})",
                    theirs.ring().version(),
                    theirs.phase().name()
                )),
                Err(error) => missed.push(format!("{member} ({error})")),
            }
        }
        if missed.is_empty() {
            return Ok(());
        }
        Err(Error::Unavailable(format!(
            "ring version {} ({}) did not reach {}; asking again goes on from there",
            state.ring().version(),
            state.phase().name(),
            missed.join(", ")
        )))
    }

    /// Asks each peer in turn, one every `every`, for its ring, and takes it if it is newer:
    /// how a node that missed a change (it was down) catches up. Runs until the node stops.
    pub async fn catch_up(self: Arc<Self>, every: Duration) {
        let mut turn = 0usize;
        loop {
            tokio::time::sleep(every).await;
            let Ok(state) = self.state().await else {
                return;
            };
            let others: Vec<String> = (state.members().into_iter())
                .filter(|m| *m != self.me)
                .collect();
            if others.is_empty() {
                continue;
            }
            turn = turn.wrapping_add(1);
            let member = &others[turn % others.len()];
            let Ok(link) = self.link(member) else {
                continue;
            };
            if let Ok(theirs) = link.get_ring().await
                && theirs.epoch() > state.epoch()
                && let Err(error) = self.adopt(theirs).await
            {
                tracing::warn!(peer = %member, %error, "could not take a peer's newer ring");
            }
        }
    }

    /// On a node that started joining the ring: waits until it has copied its partitions,
    /// then tells the claimant it is ready, until the join is done. Copying is a round of
    /// anti-entropy with each peer it shares partitions with, begun once every write
    /// coordinated before the join began has had its deadline to arrive.
    pub async fn finish_join(self: Arc<Self>, deadline: Duration) {
        let node = self.node().await.clone();
        tokio::time::sleep(deadline).await;
        let baseline: Vec<u64> = (node.peers().iter())
            .map(|h| h.anti_entropy().rounds)
            .collect();
        node.resync_peers();
        let mut asked = tokio::time::Instant::now();
        loop {
            let Some(placement) = node.placement() else {
                return;
            };
            let state = placement.state();
            if placement.role() != "joining" {
                return;
            }
            let copied = (node.peers().iter().enumerate())
                .filter(|(i, _)| !placement.shared_with(*i).is_empty())
                .all(|(i, h)| h.anti_entropy().rounds > baseline.get(i).copied().unwrap_or(0));
            if !copied {
                if asked.elapsed() > Duration::from_secs(1) {
                    node.resync_peers();
                    asked = tokio::time::Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            tracing::info!("copied this node's partitions; telling the claimant");
            let claimant = state.claimant().to_owned();
            match self.ready(&claimant).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%claimant, %error, "the claimant did not complete the join yet; asking again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn ready(&self, claimant: &str) -> Result<(), Error> {
        if claimant == self.me {
            // The first member of the ring it joins: its own claimant.
            self.join(&self.me, true).await?;
            return Ok(());
        }
        let settled = (self.link(claimant)?.join(&self.me, true).await)
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        self.adopt(settled).await?;
        Ok(())
    }
}

/// Asks `seed`, a member of a ring, for the ring, then its claimant to let `me` join; returns
/// the pending ring to start with. Retries for up to `patience` while the ring is changing
/// or a member is down.
pub async fn join(
    seed: &str,
    me: &str,
    settings: &PeerSettings,
    patience: Duration,
) -> Result<RingState, Error> {
    let give_up = tokio::time::Instant::now() + patience;
    let seed_link = GrpcPeer::new(seed, settings)?;
    loop {
        let attempt = async {
            let state = seed_link.get_ring().await.map_err(|e| (seed, e))?;
            if state.ring().members().iter().any(|m| m == me) && state.phase() == Phase::Settled {
                return Ok(state);
            }
            let claimant = state.claimant().to_owned();
            let link = GrpcPeer::new(&claimant, settings).map_err(|e| {
                (
                    seed,
                    PeerError::Rejected(format!("its claimant {claimant}: {e}")),
                )
            })?;
            link.join(me, false).await.map_err(|e| (seed, e))
        };
        match attempt.await {
            Ok(state) => return Ok(state),
            Err((_, PeerError::Refused(why) | PeerError::Rejected(why))) => {
                return Err(Error::FailedPrecondition(format!(
                    "joining the ring through {seed}: {why}"
                )));
            }
            Err((_, error)) if tokio::time::Instant::now() >= give_up => {
                return Err(Error::Unavailable(format!(
                    "joining the ring through {seed}: {error}"
                )));
            }
            Err((_, error)) => {
                tracing::info!(%seed, %error, "cannot join the ring yet; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The ring recorded in data dir `dir`, if it holds one (an older build recorded only a
/// fingerprint there: `Err` with its text).
pub fn recorded(dir: &std::path::Path) -> Result<Option<RingState>, String> {
    match std::fs::read(dir.join(RING_FILE)) {
        Ok(bytes) => match RingState::from_bytes(&bytes) {
            Ok(state) => Ok(Some(state)),
            Err(_) => Err(String::from_utf8_lossy(&bytes).trim().to_string()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("(unreadable: {e})")),
    }
}

/// Records `state` in data dir `dir`, replacing the file whole: a crash leaves the old ring or
/// the new, never half of one.
pub fn record(dir: &std::path::Path, state: &RingState) -> Result<(), Error> {
    let path = dir.join(RING_FILE);
    let temporary = dir.join(format!("{RING_FILE}.new"));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&state.to_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    })
}
