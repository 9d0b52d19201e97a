//! Ring changes on a running node: adopting a ring and keeping it in the data dir, joining a
//! ring, and on the claimant (the first member of the ring, or of both rings during a change)
//! making a change: a node's join, leave or removal, in the phases of
//! `kvstore_actors::membership`. How a node keeps up with changes others make is in `follow`.
//!
//! The claimant makes one change at a time, and only while every member answers and holds
//! its ring: it tells every member each new phase before the next. A member that missed a
//! phase (it was restarting) asks its peers for their rings as it starts; after that, gossip
//! tells it when a member holds a newer ring, and it asks that member for it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvstore_actors::PeerError;
use kvstore_actors::membership::{Phase, RingState};

use crate::Node;
use crate::error::Error;
use crate::gossip::{Gossip, Liveness};
use crate::peer::{GrpcPeer, PeerSettings, RingTag, set_ring_tag};
use crate::service::Starting;
use tracing::Instrument;

mod follow;

/// How a first ring where every node holds every key is described, having no fingerprint.
pub const EVERYWHERE: &str = "every node holds every key";

/// A ring's fingerprint, as a person reads it.
pub fn describe(state: &RingState) -> String {
    state.fingerprint().unwrap_or_else(|| EVERYWHERE.into())
}

/// The file in a data dir that holds the node's ring.
pub const RING_FILE: &str = "ring";
/// The file in a data dir that holds the address a join was asked through, until the node
/// has recorded the ring it joined.
pub const JOINING_FILE: &str = "joining";

/// The file in a data dir that names the ring member whose data it holds.
pub const MEMBER_FILE: &str = "member";

/// Checks that data dir `dir` is member `me`'s, and names `me` in it. `holds_ring` says the
/// dir holds a changed ring: started under another address, such a dir would make a node
/// outside that ring, which lets go of every key the member held, and the member itself is
/// then missing from the ring. A dir that holds only a first ring may move with its node (a
/// node behind a proxy binds a new port at each start): it is named again.
pub fn claim(dir: &std::path::Path, me: &str, holds_ring: bool) -> Result<(), Error> {
    let path = dir.join(MEMBER_FILE);
    match std::fs::read_to_string(&path) {
        Ok(owner) if owner == me => return Ok(()),
        Ok(owner) if holds_ring => {
            return Err(Error::FailedPrecondition(format!(
                "{} holds the data of ring member {owner}, and this node is {me}: start it as \
                 {owner} (its --listen or --advertise address), or give this node an empty \
                 --data-dir",
                dir.display()
            )));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(at(&path)(e)),
    }
    std::fs::create_dir_all(dir).map_err(at(dir))?;
    write_whole(dir, MEMBER_FILE, me.as_bytes())
}

/// An i/o error on `path`, naming it.
fn at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    }
}

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
    /// On the claimant: the nodes that have copied what the change under way gives them.
    ready_nodes: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The ring version whose partitions this node is copying, if any.
    filling: std::sync::Mutex<Option<u64>>,
    /// How long a write may take to reach its holders: what a node gaining partitions waits
    /// before it copies them.
    deadline: Duration,
    /// The node's gossip, once it has started.
    gossip: OnceLock<Gossip>,
}

/// A change of the ring's members, as the claimant is asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Join,
    Leave,
    Remove,
    /// Not a change: a node gaining partitions has copied them.
    Ready,
}

impl Change {
    pub fn name(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Leave => "leave",
            Self::Remove => "remove",
            Self::Ready => "ready",
        }
    }
}

impl From<Change> for crate::pb::ring_change::Kind {
    fn from(change: Change) -> Self {
        match change {
            Change::Join => Self::Join,
            Change::Leave => Self::Leave,
            Change::Remove => Self::Remove,
            Change::Ready => Self::Ready,
        }
    }
}

impl From<crate::pb::ring_change::Kind> for Change {
    fn from(kind: crate::pb::ring_change::Kind) -> Self {
        use crate::pb::ring_change::Kind;
        match kind {
            Kind::Join => Self::Join,
            Kind::Leave => Self::Leave,
            Kind::Remove => Self::Remove,
            Kind::Ready => Self::Ready,
        }
    }
}

/// Which node makes `change` of `nodes`: the ring's claimant, unless that is a node being
/// removed, which is gone; then the next member that may decide and is not removed.
fn claimant_for(state: &RingState, change: Change, nodes: &[&str]) -> String {
    let mut deciders = state.deciders();
    let first = deciders.next().expect("a ring has a member");
    if change != Change::Remove {
        return first.to_owned();
    }
    (std::iter::once(first).chain(deciders))
        .find(|d| !nodes.contains(d))
        .unwrap_or(first)
        .to_owned()
}

/// `node` and `also`, the nodes a change is asked for.
fn named<'a>(node: &'a str, also: &'a [String]) -> Vec<&'a str> {
    let mut nodes: Vec<&str> = std::iter::once(node)
        .chain(also.iter().map(String::as_str))
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

/// Refuses to remove `nodes` together if they hold every copy of some partition, in a ring
/// that keeps more than one: whatever only they hold would be given up for good, where a
/// node brought back could still give it. (With one copy of each, any removal gives up the
/// removed node's partitions; that is what one copy means.)
fn check_copies_left(ring: &kvstore_actors::ring::Ring, nodes: &[&str]) -> Result<(), Error> {
    if ring.width() < 2 {
        return Ok(());
    }
    let lost: Vec<u16> = (0..kvstore_actors::ring::PARTITIONS)
        .filter(|&p| ring.holders(p).all(|h| nodes.contains(&h)))
        .collect();
    if lost.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = lost.iter().take(5).map(u16::to_string).collect();
    let more = if lost.len() > shown.len() {
        ", ..."
    } else {
        ""
    };
    Err(Error::FailedPrecondition(format!(
        "{} together hold every copy of {} partitions ({}{more}): removing them would give up \
         those keys for good; bring one of them back first, or remove fewer at once",
        nodes.join(", "),
        lost.len(),
        shown.join(", ")
    )))
}

/// Whether `node` is a member of either ring of `state`.
fn member_of(state: &RingState, node: &str) -> bool {
    in_ring(state.ring(), node) || state.previous().is_some_and(|p| in_ring(p, node))
}

/// Whether `node` is a member of `ring`.
fn in_ring(ring: &kvstore_actors::ring::Ring, node: &str) -> bool {
    ring.members().iter().any(|m| m == node)
}

/// Refuses a leave of `me` that would keep fewer nodes than `ring` keeps copies of each key,
/// unless `force`d: each partition would be held by fewer nodes than `--replicas` asks for.
/// A node that is no longer in `ring` is leaving already (asked again), and the ring's last
/// member is refused by the ring itself, in its own words.
fn check_leave(ring: &kvstore_actors::ring::Ring, me: &str, force: bool) -> Result<(), Error> {
    let members = ring.members().len();
    if force || !in_ring(ring, me) || members < 2 || members > ring.replicas() {
        return Ok(());
    }
    let stay = members - 1;
    Err(Error::FailedPrecondition(format!(
        "the ring keeps {} copies of each key, and only {stay} {nodes} would stay: each key \
         would have {stay} {copies}; join another node first, or leave --force to accept fewer \
         copies",
        ring.replicas(),
        nodes = if stay == 1 { "node" } else { "nodes" },
        copies = if stay == 1 { "copy" } else { "copies" },
    )))
}

/// What a leave of `me`, taken by the claimant as `state`, is answered with.
pub fn leave_answer(state: &RingState, me: &str) -> String {
    let partitions = state.previous().map_or(0, |p| p.partitions_of(me).len());
    // In a ring of no more nodes than copies, the others hold every partition already: they
    // take from this node only what they lack, and each partition has a copy fewer.
    if (state.previous()).is_some_and(|p| state.ring().width() < p.width()) {
        format!(
            "Leaving: the other nodes hold all {partitions} of this node's partitions already, \
             each with a copy fewer from now on; this node leaves the ring once they have taken \
             what they lack from it (see cluster)"
        )
    } else {
        format!(
            "Leaving: {partitions} partitions go to other nodes; this node leaves the ring once \
             they have copied them (see cluster)"
        )
    }
}

/// What a remove of `node` and `also`, taken by the claimant as `state`, is answered with;
/// `dead` says which members gossip sees dead.
pub fn remove_answer(
    state: &RingState,
    node: &str,
    also: &[String],
    dead: impl Fn(&str) -> bool,
) -> String {
    let nodes = named(node, also);
    let listed = nodes.join(" ");
    let version = state.ring().version();
    match state.phase() {
        // Settled at once: the change under way could not finish without these nodes, and is
        // called off. To go on, every member that is gone goes, together: those named that are
        // back in the ring, and any other gossip sees dead (the node a called-off removal was
        // taking out, say).
        Phase::Settled if nodes.iter().any(|n| in_ring(state.ring(), n)) => {
            let gone: Vec<&str> = (state.ring().members().iter())
                .map(String::as_str)
                .filter(|m| nodes.contains(m) || dead(m))
                .collect();
            let them = if gone.len() > 1 { "them" } else { "it" };
            format!(
                "Called off the change under way, which could not finish without {listed}: the \
                 ring is back as it was before it (version {version}); remove {} to take {them} \
                 out",
                gone.join(" ")
            )
        }
        // A node that was joining is out.
        Phase::Settled => format!(
            "Called off the join of {listed}: the ring is back as it was before it (version \
             {version})"
        ),
        _ => {
            let its = if nodes.len() > 1 { "their" } else { "its" };
            format!(
                "Removing {listed}: {its} partitions get new holders, copied from the other \
                 copies (see cluster)"
            )
        }
    }
}

/// What the change under way in `state` is and what it waits for, for `status` and
/// `cluster`; empty when the ring is settled. `dead` says which members are down: a member of
/// the new ring that is down holds the change, and the line says how to go on. `copied` is,
/// on the claimant, the nodes that have said they copied what the change gives them; only
/// the claimant knows.
pub fn change_summary(
    state: &RingState,
    dead: impl Fn(&str) -> bool,
    copied: Option<&[String]>,
) -> String {
    let Some(previous) = state.previous() else {
        return String::new();
    };
    let ring = state.ring();
    let joining: Vec<&str> = (ring.members().iter())
        .filter(|m| !in_ring(previous, m))
        .map(String::as_str)
        .collect();
    // The ring does not say whether a node goes by `leave` or `remove`; a node that is down
    // goes by `remove` (or will have to), one that is up leaves.
    let (removed, leaving): (Vec<&str>, Vec<&str>) = (previous.members().iter())
        .filter(|m| !in_ring(ring, m))
        .map(String::as_str)
        .partition(|m| dead(m));
    let mut what = Vec::new();
    if !joining.is_empty() {
        what.push(format!(
            "{} {}",
            and(&joining),
            verb(&joining, "joins", "join")
        ));
    }
    if !leaving.is_empty() {
        what.push(format!(
            "{} {}",
            and(&leaving),
            verb(&leaving, "leaves", "leave")
        ));
    }
    if !removed.is_empty() {
        what.push(format!(
            "{} {}",
            and(&removed),
            verb(&removed, "is removed", "are removed")
        ));
    }
    let claimant = state.claimant();
    let down: Vec<&str> = (ring.members().iter())
        .map(String::as_str)
        .filter(|m| dead(m))
        .collect();
    let mut line = format!("ring version {}: {}", ring.version(), what.join(", "));
    match state.phase() {
        Phase::Pending => {
            let gaining = state.gaining();
            let copying: Vec<&str> = (gaining.iter())
                .filter(|g| copied.is_none_or(|done| !done.contains(g)))
                .map(String::as_str)
                .collect();
            let (have, them) = (verb(&copying, "has", "have"), verb(&copying, "it", "them"));
            line.push_str(&match copied {
                Some(_) if copying.is_empty() => {
                    "; pending: every node gaining partitions has copied them, and this node, \
                     the claimant, commits it"
                        .to_owned()
                }
                Some(_) => format!(
                    "; pending until {} {have} copied what the change gives {them}; this node, \
                     the claimant, commits it then",
                    and(&copying),
                ),
                None => format!(
                    "; pending until the claimant, {claimant}, hears that {} {have} copied what \
                     the change gives {them}, and commits it",
                    and(&copying),
                ),
            });
            if !down.is_empty() {
                line.push_str(&format!(
                    "; {} {} down, and the change cannot finish without {}: if {} gone for \
                     good, remove {} to call it off",
                    and(&down),
                    verb(&down, "is", "are"),
                    verb(&down, "it", "them"),
                    verb(&down, "it is", "they are"),
                    down.join(" ")
                ));
            }
        }
        Phase::Committed => {
            line.push_str(&format!(
                "; committed, and settled by the claimant, {claimant}, once every member of \
                 the new ring has heard"
            ));
            let others: Vec<&str> = down.iter().copied().filter(|m| *m != claimant).collect();
            if down.contains(&claimant) {
                line.push_str("; the claimant is down: the next member that may decide settles it");
            }
            if !others.is_empty() {
                line.push_str(&format!(
                    "; {} {} down: a committed change cannot be called off, and settles once \
                     {} back",
                    and(&others),
                    verb(&others, "is", "are"),
                    verb(&others, "it is", "they are"),
                ));
            }
        }
        Phase::Settled => {}
    }
    line
}

/// Whether member `m` is down as this node knows: gossip sees it dead, or has no word of it
/// (a node killed before gossip heard it) and this node, among whose `peers` it is, did not
/// reach it when it last tried.
fn is_down(
    m: &str,
    liveness: &BTreeMap<String, Liveness>,
    peers: &[kvstore_actors::coordinator::PeerStatus],
) -> bool {
    match liveness.get(m) {
        Some(liveness) => *liveness == Liveness::Dead,
        None => peers.iter().any(|p| p.addr == m && p.unanswered),
    }
}

/// `nodes` as words: "a", "a and b", "a, b and c".
fn and(nodes: &[&str]) -> String {
    match nodes {
        [] => "no node".into(),
        [one] => (*one).to_owned(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// `one` for a single node, `many` for several.
fn verb<'a>(nodes: &[&str], one: &'a str, many: &'a str) -> &'a str {
    if nodes.len() == 1 { one } else { many }
}

/// The refusal of a change while another is under way.
fn changing(state: &RingState) -> Error {
    Error::Unavailable(format!(
        "the ring is changing (version {}, {}): try again once that change is done",
        state.ring().version(),
        state.phase().name()
    ))
}

impl Members {
    /// `deadline` is the node's replication deadline.
    pub fn new(
        me: String,
        tag: RingTag,
        data_dir: Option<PathBuf>,
        starting: Starting,
        deadline: Duration,
    ) -> Self {
        Self {
            me,
            tag,
            data_dir,
            starting,
            settings: OnceLock::new(),
            links: Default::default(),
            adopting: Default::default(),
            changing: Default::default(),
            ready_nodes: Default::default(),
            filling: Default::default(),
            deadline,
            gossip: OnceLock::new(),
        }
    }

    /// The node gossips with `gossip` from now on.
    pub fn gossiping(&self, gossip: Gossip) {
        let _ = self.gossip.set(gossip);
    }

    /// Stops the node's gossip, if it had begun.
    pub async fn stop_gossip(&self) {
        if let Some(gossip) = self.gossip.get() {
            gossip.shutdown().await;
        }
    }

    /// What the node's failure detector says of each node it has heard of by gossip.
    pub async fn liveness(&self) -> BTreeMap<String, Liveness> {
        match self.gossip.get() {
            Some(gossip) => gossip.liveness().await,
            None => BTreeMap::new(),
        }
    }

    /// The ring id (address) of the node named `name`: an address names itself; otherwise
    /// `name` is a `--node-id`, which gossip knows the address of.
    pub async fn resolve(&self, name: &str) -> Result<String, Error> {
        // No member's name is longer (a DNS name of 253 bytes and a port, or a node id): one
        // that is longer is a mistake, and is not echoed back whole.
        const LONGEST: usize = 253 + ":65535".len();
        if name.len() > LONGEST.max(kvstore_actors::version::MAX_NODE_ID_BYTES) {
            let start: String = name.chars().take(32).collect();
            return Err(Error::InvalidArgument(format!(
                "a node name of {} bytes ('{start}...') names no node: a node is named by its \
                 address (host:port) or its --node-id, at most {LONGEST} bytes",
                name.len()
            )));
        }
        if let Ok(addr) = crate::net::parse_addr(name) {
            return Ok(addr);
        }
        let found = match self.gossip.get() {
            Some(gossip) => gossip.named(name).await,
            None => Vec::new(),
        };
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(Error::InvalidArgument(format!(
                "no node named '{name}' is known: name it by its address (host:port), or by \
                 the --node-id it gossips"
            ))),
            several => Err(Error::InvalidArgument(format!(
                "more than one node gossips the id '{name}' ({}): name it by its address",
                several.join(", ")
            ))),
        }
    }

    /// The member of the ring, other than `node`, that gossips `id` as its `--node-id`, if any.
    pub async fn member_with_id(&self, id: &str, node: &str) -> Option<String> {
        let members = self.state().await.ok()?.members();
        let gossip = self.gossip.get()?;
        (gossip.named(id).await.into_iter()).find(|a| a != node && members.contains(a))
    }

    /// Whether gossip says `node` is live: a node that stopped is seen down only after some
    /// gossip rounds without a word from it.
    async fn seen_live(&self, node: &str) -> bool {
        self.liveness().await.get(node) == Some(&Liveness::Live)
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

    /// Moves the node to `state` if it is newer than its own, and records it; if the change
    /// gives the node partitions, starts copying them. Returns whether it moved.
    pub async fn adopt(self: &Arc<Self>, state: RingState) -> Result<bool, Error> {
        // In a task of its own, so that a caller that gives up (a push that timed out) cannot
        // leave the node moved but its ring not recorded.
        let this = self.clone();
        tokio::spawn(async move { this.adopt_now(state).await }.in_current_span())
            .await
            .map_err(|e| Error::Unavailable(format!("adopting a ring failed: {e}")))?
    }

    async fn adopt_now(self: &Arc<Self>, state: RingState) -> Result<bool, Error> {
        let _one_at_a_time = self.adopting.lock().await;
        let node = self.node().await;
        let was_member = (node.ring_state()).is_none_or(|before| member_of(&before, &self.me));
        let peers = (node.strangers(&state).into_iter())
            .map(|id| Ok((id.clone(), self.link(&id)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        let moved = node.adopt(state.clone(), peers).await?;
        if moved && was_member && !member_of(&state, &self.me) {
            tracing::info!(
                ring_version = state.ring().version(),
                "this node is no longer a member of the ring (it left, was removed, or its join \
                 was called off): it holds no key, and passes calls on to the members; to join \
                 again, start it on an empty --data-dir with --join"
            );
        }
        // Announced whatever happens next: it is what the node now serves by.
        if let (Some(gossip), Some(placement)) = (self.gossip.get(), node.placement()) {
            gossip.announce(placement.state(), placement.role()).await;
        }
        // Recorded even when the node had moved already: an earlier adopt may have failed
        // to record it.
        let now = node.ring_state().unwrap_or(state);
        if let Some(dir) = &self.data_dir
            && recorded(dir)
                .ok()
                .flatten()
                .is_none_or(|r| r.epoch() < now.epoch())
        {
            record(dir, &now)?;
        }
        if !moved {
            return Ok(false);
        }
        let state = now;
        set_ring_tag(&self.tag, node.placement().and_then(|p| p.fingerprint()));
        self.fill_if_gaining(&state);
        Ok(true)
    }

    /// Starts copying the partitions a pending change gives this node, unless it already is.
    pub fn fill_if_gaining(self: &Arc<Self>, state: &RingState) {
        if state.phase() != Phase::Pending || !state.gaining().contains(&self.me) {
            return;
        }
        let version = state.ring().version();
        let mut filling = self.filling.lock().expect("filling poisoned");
        if *filling == Some(version) {
            return;
        }
        *filling = Some(version);
        tokio::spawn(self.clone().fill(version).in_current_span());
    }

    /// The `changing:` line for `state` (see [`change_summary`]), as this node sees its
    /// members: by gossip's `liveness`, and by how this node last fared with its `peers`.
    pub fn change_line(
        &self,
        state: &RingState,
        liveness: &BTreeMap<String, Liveness>,
        peers: &[kvstore_actors::coordinator::PeerStatus],
    ) -> String {
        let copied = self.copied(state);
        change_summary(state, |m| is_down(m, liveness, peers), copied.as_deref())
    }

    /// On the claimant of `state`'s change, the nodes that have said they copied what it
    /// gives them; `None` on any other node, which does not know.
    fn copied(&self, state: &RingState) -> Option<Vec<String>> {
        (state.claimant() == self.me).then(|| {
            let ready = self.ready_nodes.lock().expect("ready poisoned");
            ready.iter().cloned().collect()
        })
    }

    /// Asks the ring's claimant for this node to leave; refused if fewer nodes would stay
    /// than the ring keeps copies of each key, unless `force`d.
    pub async fn leave(self: &Arc<Self>, force: bool) -> Result<RingState, Error> {
        let state = self.state().await?;
        if !member_of(&state, &self.me) {
            return Err(Error::FailedPrecondition(format!(
                "this node is not a member of ring version {}: it has left, was removed, or its \
                 join was called off",
                state.ring().version()
            )));
        }
        check_leave(state.ring(), &self.me, force)?;
        self.request(Change::Leave, &self.me, &[]).await
    }

    /// Asks the ring's claimant, this node or another, for `change` of `node` (and, for a
    /// remove, of `also`, taken out in the same change); returns the ring after it.
    pub async fn request(
        self: &Arc<Self>,
        change: Change,
        node: &str,
        also: &[String],
    ) -> Result<RingState, Error> {
        let state = self.state().await?;
        let nodes = named(node, also);
        if change == Change::Remove && state.deciders().all(|d| nodes.contains(&d)) {
            let deciders: Vec<&str> = state.deciders().collect();
            return Err(Error::FailedPrecondition(format!(
                "{} {} every member that may make a change: the ring cannot remove {}",
                and(&deciders),
                verb(&deciders, "is", "are"),
                verb(&deciders, "it", "them all")
            )));
        }
        let claimant = claimant_for(&state, change, &nodes);
        match self.ask(&state, &claimant, change, node, also).await {
            // A change another node asked for began meanwhile, and made another member the
            // claimant (the one asked leaves, say). Every member is told of a change before
            // the claimant takes the next request, so this node's ring now names the new one.
            Err(Error::Unavailable(why)) => {
                let now = self.state().await?;
                let next = claimant_for(&now, change, &nodes);
                if next == claimant {
                    return Err(Error::Unavailable(why));
                }
                tracing::debug!(%claimant, %next, "the ring's claimant changed: asking again");
                self.ask(&now, &next, change, node, also).await
            }
            answer => answer,
        }
    }

    /// Asks `claimant`, this node or another, for `change` of `node` and `also`, as the ring
    /// is `state` here.
    async fn ask(
        self: &Arc<Self>,
        state: &RingState,
        claimant: &str,
        change: Change,
        node: &str,
        also: &[String],
    ) -> Result<RingState, Error> {
        let nodes = named(node, also);
        if claimant == self.me {
            return self.change(change, node, also).await;
        }
        let said = |why: String| format!("the ring's claimant {claimant}: {why}");
        // Its refusal keeps its code: a script must not retry what cannot succeed.
        let link = self.link(claimant)?;
        let answer = link.change_ring(change.into(), node, also).await;
        // A claimant that answered "the ring is changing" is not gone: only one gossip does not
        // see live gets the hint that removing it calls the change off.
        let gone = answer.is_err() && !self.seen_live(claimant).await;
        let answer = answer.map_err(|e| match e {
            PeerError::Refused(why) => Error::FailedPrecondition(said(why)),
            PeerError::Rejected(why) => Error::InvalidArgument(said(why)),
            // Its own words when it answered ("the ring is changing"), the cause when it did
            // not ("connection refused"): "unreachable" would be wrong for the first. A change
            // under way waits for its claimant: if that is gone for good, so is the change.
            PeerError::Unreachable(why) if state.phase() == Phase::Pending && gone => {
                Error::Unavailable(format!(
                    "{}; a change is under way, and if {claimant} is gone for good, removing it \
                     calls that change off",
                    said(why)
                ))
            }
            PeerError::Unreachable(why) => Error::Unavailable(said(why)),
            other => Error::Unavailable(said(other.to_string())),
        })?;
        // A claimant of an older build reads a remove of several nodes as a remove of the
        // first: the answer must not say the others go too.
        let kept: Vec<&str> = (nodes.iter().copied())
            .filter(|n| answer.phase() == Phase::Pending && in_ring(answer.ring(), n))
            .collect();
        if change == Change::Remove && !kept.is_empty() {
            return Err(Error::FailedPrecondition(said(format!(
                "it removes only some of the nodes asked for ({} stay members): it may be of an \
                 older build, which removes one node at a time",
                kept.join(", ")
            ))));
        }
        Ok(answer)
    }

    /// On the claimant: begins `change` of `node` (with `also`, for a remove), or goes on with
    /// the one under way. A change begins only while every member answers with this node's
    /// ring (the nodes to remove aside, which are gone), and returns once every member but the
    /// joining one has the pending ring. [`Change::Ready`] notes that `node` has copied the
    /// partitions the change gives it; once every node gaining partitions has, the change is
    /// committed, then settled, every member told each time. Asked again after a failure, each
    /// step goes on from where it stopped.
    pub async fn change(
        self: &Arc<Self>,
        change: Change,
        node: &str,
        also: &[String],
    ) -> Result<RingState, Error> {
        let _one_change_at_a_time = self.changing.lock().await;
        let state = self.state().await?;
        let nodes = named(node, also);
        let claimant = claimant_for(&state, change, &nodes);
        if claimant != self.me {
            // Unavailable, not refused: the asker's ring is behind, and asks again.
            return Err(Error::Unavailable(format!(
                "{} is not the ring's claimant: ask {claimant}",
                self.me
            )));
        }
        if change == Change::Ready {
            return self.ready(state, node, None).await;
        }
        // A leave or remove is of members, of either ring while a change is under way.
        let outside: Vec<&str> = (nodes.iter().copied())
            .filter(|n| change != Change::Join && !member_of(&state, n))
            .collect();
        if !outside.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "{} is not a member of the ring",
                outside.join(", ")
            )));
        }
        let member = |ring: &kvstore_actors::ring::Ring| ring.members().iter().any(|m| m == node);
        match state.phase() {
            Phase::Settled => {
                let next = match change {
                    Change::Join if member(state.ring()) => {
                        return Err(Error::FailedPrecondition(format!(
                            "{node} is already a member of the ring"
                        )));
                    }
                    Change::Join if !self.answers(node).await => {
                        return Err(Error::FailedPrecondition(format!(
                            "no node answers at {node}: give the joining node an --advertise \
                             address every member can reach"
                        )));
                    }
                    Change::Join => state.ring().with_joined(node)?,
                    Change::Remove => {
                        check_copies_left(state.ring(), &nodes)?;
                        let mut next = state.ring().clone();
                        for gone in &nodes {
                            self.check_gone(gone).await?;
                            next = next.without(gone)?;
                        }
                        next.renumbered(state.ring().version() + 1)
                    }
                    _ => state.ring().without(node)?,
                };
                // The joining node is not serving its ring yet, and the removed ones are gone.
                let absent: &[&str] = if change == Change::Leave { &[] } else { &nodes };
                let checked = self.check_members(&state, absent).await;
                if let (Change::Remove, Err(Error::Unavailable(why))) = (change, &checked) {
                    return Err(Error::Unavailable(format!(
                        "{why}; members gone for good together are removed together \
                         (remove NODE NODE...)"
                    )));
                }
                checked?;
                let pending = state.begin(next)?;
                self.ready_nodes.lock().expect("ready poisoned").clear();
                self.adopt(pending.clone()).await?;
                self.tell(&pending, &pending.members(), absent).await?;
                tracing::info!(nodes = ?nodes, change = change.name(), ring_version = pending.ring().version(), "the ring changes");
                Ok(pending)
            }
            // A member of the new ring is gone for good: the joining node or an heir, which
            // will never copy its partitions, or any other, which will never hear the commit
            // (the claimant itself, say). The change is called off.
            Phase::Pending
                if change == Change::Remove && nodes.iter().any(|n| in_ring(state.ring(), n)) =>
            {
                let mut absent = Vec::new();
                for gone in &nodes {
                    self.check_gone(gone).await?;
                    absent.push(*gone);
                }
                // The nodes a remove takes out were gone when the remove began, and are left
                // out as they were then, if they still are.
                let departing: Vec<&str> = (state.previous().into_iter())
                    .flat_map(|previous| previous.members())
                    .filter(|m| !state.ring().members().contains(m))
                    .map(String::as_str)
                    .filter(|m| !absent.contains(m))
                    .collect();
                for departing in departing {
                    if self.check_gone(departing).await.is_ok() {
                        absent.push(departing);
                    }
                }
                // Every other member must still be at the pending step: past it, reads may
                // have gone to the new ring.
                self.check_members(&state, &absent).await?;
                let off = state.abort()?;
                self.adopt(off.clone()).await?;
                self.tell(&off, &state.members(), &absent).await?;
                tracing::info!(nodes = ?nodes, ring_version = off.ring().version(), "the ring change is called off: a member of the new ring is gone");
                Ok(off)
            }
            Phase::Pending => {
                let leaving = |n: &&str| {
                    !in_ring(state.ring(), n) && state.previous().is_some_and(|p| in_ring(p, n))
                };
                let this_change = match change {
                    Change::Join => member(state.ring()) && !state.previous().is_some_and(member),
                    Change::Remove => {
                        let departing = (state.previous().into_iter())
                            .flat_map(|previous| previous.members())
                            .filter(|m| !state.ring().members().contains(m))
                            .count();
                        nodes.iter().all(leaving) && departing == nodes.len()
                    }
                    _ => leaving(&node),
                };
                if !this_change {
                    return Err(changing(&state));
                }
                let absent: &[&str] = if change == Change::Leave { &[] } else { &nodes };
                self.tell(&state, &state.members(), absent).await?;
                Ok(state)
            }
            // A member of the new ring gone after the commit: the change waits for it.
            Phase::Committed
                if change == Change::Remove && nodes.iter().any(|n| in_ring(state.ring(), n)) =>
            {
                Err(Error::Unavailable(format!(
                    "the change under way (version {}) is committed, and settles once every \
                     member of the new ring has heard, {} included: a committed change cannot \
                     be called off; bring {} back",
                    state.ring().version(),
                    nodes.join(", "),
                    verb(&nodes, "it", "them")
                )))
            }
            _ => Err(changing(&state)),
        }
    }

    /// Notes that `node` has copied what the change under way gives it, and once every node
    /// gaining partitions has, commits and settles the change.
    /// `skip` is a member not told: a claimant that is gone, whose change another settles.
    async fn ready(
        self: &Arc<Self>,
        state: RingState,
        node: &str,
        skip: Option<&str>,
    ) -> Result<RingState, Error> {
        if state.phase() == Phase::Settled {
            // Done: told again, for whoever missed it.
            self.tell(&state, &state.members(), skip.as_slice()).await?;
            return Ok(state);
        }
        // Every node of either ring, the one leaving too: told it has left, it drops its keys.
        let everyone = state.members();
        if state.phase() == Phase::Committed {
            // Asked again after a member missed the commit: it hears it before anyone drops.
            self.tell(&state, &everyone, skip.as_slice()).await?;
        }
        if state.phase() == Phase::Pending {
            let gaining = state.gaining();
            if !gaining.iter().any(|g| g == node) {
                return Err(Error::FailedPrecondition(format!(
                    "{node} takes no partitions in the change under way"
                )));
            }
            let mut ready = self.ready_nodes.lock().expect("ready poisoned");
            ready.insert(node.to_owned());
            if !gaining.iter().all(|g| ready.contains(g)) {
                return Ok(state);
            }
        }
        let mut state = state;
        while state.phase() != Phase::Settled {
            if state.phase() == Phase::Committed {
                // Reads begun before the commit still go to the old holders: they have a
                // deadline to finish before those drop anything.
                tokio::time::sleep(self.deadline).await;
            }
            state = state.advance()?;
            self.adopt(state.clone()).await?;
            self.tell(&state, &everyone, skip.as_slice()).await?;
        }
        tracing::info!(
            ring_version = state.ring().version(),
            "the ring change is done"
        );
        Ok(state)
    }

    /// Refuses to remove `node` unless it is gone: it does not answer, and gossip does not
    /// say it is live.
    async fn check_gone(&self, node: &str) -> Result<(), Error> {
        if self.answers(node).await {
            return Err(Error::FailedPrecondition(format!(
                "{node} answers: ask it to leave (kvstore-cli {node} leave); remove is for a \
                 node that is gone for good"
            )));
        }
        if self.seen_live(node).await {
            return Err(Error::FailedPrecondition(format!(
                "{node} does not answer this node, but gossip says it is live: if it has just \
                 stopped, try again once it is seen down (cluster); if it runs, ask it to leave"
            )));
        }
        Ok(())
    }

    /// Whether a node answers a call at `node`, starting or not.
    async fn answers(&self, node: &str) -> bool {
        let Ok(link) = self.link(node) else {
            return false;
        };
        match link.get_ring().await {
            Ok(_) => true,
            Err(PeerError::Refused(why)) => why.contains(crate::service::replicator::STARTING),
            Err(_) => false,
        }
    }

    /// Checks that every member but `absent` answers and holds `state`: a change begun with a
    /// member down could not be told to it, nor copied from it.
    async fn check_members(&self, state: &RingState, absent: &[&str]) -> Result<(), Error> {
        let mut problems = Vec::new();
        let answers = self
            .ask_each(&state.members(), absent, |link| async move {
                link.get_ring().await
            })
            .await?;
        for (member, answer) in answers {
            match answer {
                Ok(theirs) if theirs == *state => {}
                Ok(theirs) if theirs.epoch() == state.epoch() => problems.push(format!(
                    "{member} holds another ring ({}) than the claimant's ({}): give every \
                     node the same --replicas and the same address for each node",
                    describe(&theirs),
                    describe(state),
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

    /// Calls each of `members` but this node and `skip` at once; returns each one's answer.
    async fn ask_each<T, F>(
        &self,
        members: &[String],
        skip: &[&str],
        call: impl Fn(GrpcPeer) -> F,
    ) -> Result<Vec<(String, Result<T, PeerError>)>, Error>
    where
        F: std::future::Future<Output = Result<T, PeerError>>,
    {
        let calls = (members.iter())
            .filter(|m| **m != self.me && !skip.contains(&m.as_str()))
            .map(|m| Ok((m.clone(), call(self.link(m)?))))
            .collect::<Result<Vec<_>, Error>>()?;
        let (names, calls): (Vec<String>, Vec<F>) = calls.into_iter().unzip();
        let answers = futures::future::join_all(calls).await;
        Ok(names.into_iter().zip(answers).collect())
    }

    /// Offers `state` to each of `to` but this node and `skip`; fails naming the members of
    /// its ring that did not take it. A node outside the ring (one that leaves, or is removed)
    /// is told too, but may miss it: it holds nothing from then on.
    async fn tell(&self, state: &RingState, to: &[String], skip: &[&str]) -> Result<(), Error> {
        let mut missed = Vec::new();
        let answers = self
            .ask_each(to, skip, |link| async move { link.push_ring(state).await })
            .await?;
        for (member, answer) in answers {
            let needed = state.ring().members().contains(&member);
            match answer {
                Ok(theirs) if theirs.epoch() >= state.epoch() => {}
                _ if !needed => {}
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
}

/// Asks `seed`, a member of a ring, for the ring, then its claimant to let `me` join; returns
/// the pending ring to start with. Retries for up to `patience` while the ring is changing
/// or a member is down, calling `waiting` when it first has to. With a data dir, the join is
/// recorded in it first ([`record_join`]), and the record removed if the join is refused:
/// none was begun, and none is to go on at a restart. Once the node has recorded the ring it
/// joined, [`join_recorded`] removes it.
pub async fn join(
    dir: Option<&std::path::Path>,
    seed: &str,
    me: &str,
    replicas: usize,
    settings: &PeerSettings,
    patience: Duration,
    waiting: impl Fn(),
) -> Result<RingState, Error> {
    if let Some(dir) = dir {
        record_join(dir, seed)?;
    }
    let joined = ask_to_join(seed, me, replicas, settings, patience, waiting).await;
    if let (Some(dir), Err(Error::FailedPrecondition(_))) = (dir, &joined) {
        join_recorded(dir)?;
    }
    joined
}

async fn ask_to_join(
    seed: &str,
    me: &str,
    replicas: usize,
    settings: &PeerSettings,
    patience: Duration,
    waiting: impl Fn(),
) -> Result<RingState, Error> {
    let give_up = tokio::time::Instant::now() + patience;
    let seed_link = GrpcPeer::new(seed, settings)?;
    loop {
        let attempt = async {
            let state = seed_link.get_ring().await.map_err(|e| (seed, e))?;
            if state.ring().replicas() != replicas {
                return Err((
                    seed,
                    PeerError::Refused(format!(
                        "its ring keeps {} copies of each key: start this node with \
                         --replicas {}",
                        state.ring().replicas(),
                        state.ring().replicas()
                    )),
                ));
            }
            if state.ring().members().iter().any(|m| m == me) && state.phase() == Phase::Settled {
                // A member restarts from its data dir, without --join: this is another node
                // taking a member's address, or a member that lost its data dir.
                return Err((
                    seed,
                    PeerError::Refused(format!(
                        "{me} is already a member of the ring: give this node its own \
                         --advertise address, or, to bring back that member without its data, \
                         remove it first (kvstore-cli {seed} remove {me})"
                    )),
                ));
            }
            let claimant = state.claimant().to_owned();
            let link = GrpcPeer::new(&claimant, settings).map_err(|e| {
                (
                    seed,
                    PeerError::Rejected(format!("its claimant {claimant}: {e}")),
                )
            })?;
            (link.change_ring(Change::Join.into(), me, &[]).await).map_err(|e| (seed, e))
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
                waiting();
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

/// Records in data dir `dir` that this node asks to join through `seed`, before it asks: the
/// claimant may begin the join and the node stop before it records the ring, and restarted
/// without `--join` it must go on joining, not start a ring of its own that takes writes no
/// member sees.
pub fn record_join(dir: &std::path::Path, seed: &str) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(at(dir))?;
    write_whole(dir, JOINING_FILE, seed.as_bytes())
}

/// The address a join recorded in `dir` was asked through, if the node has not yet recorded
/// the ring it joined.
pub fn unfinished_join(dir: &std::path::Path) -> Result<Option<String>, Error> {
    let path = dir.join(JOINING_FILE);
    match std::fs::read_to_string(&path) {
        Ok(seed) => Ok(Some(seed.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(at(&path)(e)),
    }
}

/// The node has recorded the ring it joined: a restart goes on from that ring.
pub fn join_recorded(dir: &std::path::Path) -> Result<(), Error> {
    match std::fs::remove_file(dir.join(JOINING_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io(e)),
        _ => Ok(()),
    }
}

/// Records `state` in data dir `dir`, replacing the file whole: a crash leaves the old ring or
/// the new, never half of one.
pub fn record(dir: &std::path::Path, state: &RingState) -> Result<(), Error> {
    write_whole(dir, RING_FILE, &state.to_bytes())
}

/// Writes `bytes` to file `name` in `dir`, replacing it whole, durably: a crash leaves the
/// old file or the new, never half of one.
fn write_whole(dir: &std::path::Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let path = dir.join(name);
    let temporary = dir.join(format!("{name}.new"));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(at(&path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvstore_actors::ring::Ring;

    #[test]
    fn a_data_dir_is_named_for_its_member_and_holds_to_it_once_it_holds_a_changed_ring() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().join("new");
        let named = || std::fs::read_to_string(dir.join(MEMBER_FILE)).unwrap();
        claim(&dir, "n1:1", true).unwrap();
        assert_eq!(named(), "n1:1");
        claim(&dir, "n1:1", true).unwrap();
        let refused = claim(&dir, "n2:1", true).unwrap_err();
        assert!(matches!(refused, Error::FailedPrecondition(_)), "{refused}");
        assert!(
            refused
                .to_string()
                .contains("ring member n1:1, and this node is n2:1"),
            "{refused}"
        );
        assert_eq!(named(), "n1:1");
        // A first ring only: the dir moves with its node.
        claim(&dir, "n2:1", false).unwrap();
        assert_eq!(named(), "n2:1");
    }

    #[test]
    fn a_removal_is_made_by_the_first_member_it_does_not_remove() {
        let nodes = ["n1:1", "n2:1", "n3:1", "n4:1"];
        let state = RingState::settled(Ring::bootstrap(nodes, 3).unwrap());
        let claimant = |change, removed: &[&str]| claimant_for(&state, change, removed);
        assert_eq!(claimant(Change::Remove, &["n2:1"]), "n1:1");
        assert_eq!(claimant(Change::Remove, &["n1:1"]), "n2:1");
        assert_eq!(claimant(Change::Remove, &["n2:1", "n1:1"]), "n3:1");
        assert_eq!(claimant(Change::Leave, &["n1:1"]), "n1:1");
        let also = ["n1:1".to_string(), "n3:1".to_string(), "n1:1".to_string()];
        assert_eq!(named("n3:1", &also), ["n1:1", "n3:1"]);
    }

    #[test]
    fn the_answers_to_a_leave_and_a_remove_say_what_the_ring_does() {
        let four = ["n1:1", "n2:1", "n3:1", "n4:1"];
        let settled = RingState::settled(Ring::bootstrap(four, 3).unwrap());
        let leaving = settled
            .begin(settled.ring().without("n4:1").unwrap())
            .unwrap();
        let held = settled.ring().partitions_of("n4:1").len();
        assert!(
            leave_answer(&leaving, "n4:1").starts_with(&format!("Leaving: {held} partitions go"))
        );
        let three = RingState::settled(Ring::bootstrap(["n1:1", "n2:1", "n3:1"], 3).unwrap());
        let fewer = three.begin(three.ring().without("n3:1").unwrap()).unwrap();
        assert!(leave_answer(&fewer, "n3:1").contains("hold all 1024 of this node's partitions"));

        let none = |_: &str| false;
        let twice = ["n4:1".to_string()];
        assert_eq!(
            remove_answer(&leaving, "n4:1", &twice, none),
            "Removing n4:1: its partitions get new holders, copied from the other copies (see \
             cluster)"
        );
        // Called off: the named member back in the ring, and the one gossip sees dead.
        let off = leaving.abort().unwrap();
        let answer = remove_answer(&off, "n2:1", &[], |m| m == "n4:1");
        assert!(
            answer.ends_with("remove n2:1 n4:1 to take them out"),
            "{answer}"
        );
        let joining = settled
            .begin(settled.ring().with_joined("n5:1").unwrap())
            .unwrap();
        let answer = remove_answer(&joining.abort().unwrap(), "n5:1", &[], none);
        assert!(
            answer.starts_with("Called off the join of n5:1"),
            "{answer}"
        );
    }

    #[test]
    fn a_change_under_way_says_what_it_waits_for_and_how_to_go_on() {
        let four = ["n1:1", "n2:1", "n3:1", "n4:1"];
        let settled = RingState::settled(Ring::bootstrap(four, 3).unwrap());
        let none = |_: &str| false;
        assert_eq!(change_summary(&settled, none, None), "");
        let joining = settled
            .begin(settled.ring().with_joined("n5:1").unwrap())
            .unwrap();
        assert_eq!(
            change_summary(&joining, none, None),
            "ring version 2: n5:1 joins; pending until the claimant, n1:1, hears that n5:1 has \
             copied what the change gives it, and commits it"
        );
        // The claimant knows who has copied.
        let removing = settled
            .begin(settled.ring().without("n4:1").unwrap())
            .unwrap();
        let gaining = removing.gaining();
        assert!(gaining.len() > 1, "{gaining:?}");
        let line = change_summary(&removing, none, Some(&gaining[1..]));
        assert!(
            line.ends_with(&format!(
                "; pending until {} has copied what the change gives it; this node, the \
                 claimant, commits it then",
                gaining[0]
            )),
            "{line}"
        );
        let line = change_summary(&removing, none, Some(&gaining));
        assert!(line.ends_with("has copied them, and this node, the claimant, commits it"));
        let line = change_summary(&joining, |m| m == "n5:1" || m == "n2:1", None);
        assert!(
            line.ends_with(
                "; n2:1 and n5:1 are down, and the change cannot finish without them: if they \
                 are gone for good, remove n2:1 n5:1 to call it off"
            ),
            "{line}"
        );
        // The node a removal takes out is down, as it should be: nothing waits for it.
        let line = change_summary(&removing, |m| m == "n4:1", None);
        assert!(
            line.starts_with("ring version 2: n4:1 is removed; pending until "),
            "{line}"
        );
        assert!(!line.contains("down"), "{line}");
        // Up, it leaves.
        let line = change_summary(&removing, none, None);
        assert!(
            line.starts_with("ring version 2: n4:1 leaves; pending until "),
            "{line}"
        );
        let committed = removing.advance().unwrap();
        let line = change_summary(&committed, |m| m == "n1:1" || m == "n3:1", None);
        assert!(
            line.ends_with(
                "committed, and settled by the claimant, n1:1, once every member of the new \
                 ring has heard; the claimant is down: the next member that may decide settles \
                 it; n3:1 is down: a committed change cannot be called off, and settles once \
                 it is back"
            ),
            "{line}"
        );
        assert_eq!(and(&["a", "b", "c"]), "a, b and c");
    }

    #[test]
    fn a_member_is_down_by_gossip_or_else_by_this_nodes_last_try() {
        use kvstore_actors::health::PeerState;
        let peer = |addr: &str, unanswered: bool| kvstore_actors::coordinator::PeerStatus {
            addr: addr.into(),
            state: PeerState::Waiting,
            unanswered,
            refusal: None,
            backlog: 0,
            needs_resync: false,
            resyncing: false,
            last_contact: None,
            confirmed_batches: 0,
            confirmed_writes: 0,
            clock_offset: None,
            in_flight: 0,
            anti_entropy: Default::default(),
        };
        let peers = [peer("a:1", true), peer("b:1", true), peer("c:1", false)];
        let liveness: BTreeMap<String, Liveness> = [
            ("a:1".into(), Liveness::Live),
            ("d:1".into(), Liveness::Dead),
        ]
        .into();
        // Gossip's verdict wins where it has one.
        assert!(!is_down("a:1", &liveness, &peers));
        assert!(is_down("d:1", &liveness, &peers));
        // Without one, this node's last try decides.
        assert!(is_down("b:1", &liveness, &peers));
        assert!(!is_down("c:1", &liveness, &peers));
        assert!(
            !is_down("e:1", &liveness, &peers),
            "neither heard nor tried"
        );
    }

    #[test]
    fn a_leave_below_the_rings_copies_is_refused_unless_forced() {
        let four = Ring::bootstrap(["n1:1", "n2:1", "n3:1", "n4:1"], 3).unwrap();
        assert!(check_leave(&four, "n4:1", false).is_ok());
        let three = four.without("n4:1").unwrap();
        let refused = check_leave(&three, "n3:1", false).unwrap_err();
        assert!(matches!(refused, Error::FailedPrecondition(_)), "{refused}");
        assert!(
            refused
                .to_string()
                .contains("keeps 3 copies of each key, and only 2 nodes")
                && refused.to_string().contains("leave --force"),
            "{refused}"
        );
        assert!(check_leave(&three, "n3:1", true).is_ok());
        // Already leaving (asked again), and not a member: the ring no longer holds it.
        assert!(check_leave(&three, "n4:1", false).is_ok());
        let two = three.without("n3:1").unwrap();
        let refused = check_leave(&two, "n2:1", false).unwrap_err().to_string();
        assert!(refused.contains("each key would have 1 copy;"), "{refused}");
        // The last member is the ring's to refuse, in its own words.
        let one = two.without("n2:1").unwrap();
        assert!(check_leave(&one, "n1:1", false).is_ok());
    }

    #[test]
    fn nodes_holding_every_copy_of_a_partition_are_not_removed_together() {
        let nodes = ["n1:1", "n2:1", "n3:1", "n4:1", "n5:1", "n6:1"];
        let ring = Ring::bootstrap(nodes, 3).unwrap();
        // Two of three copies gone leaves one of each partition.
        assert!(check_copies_left(&ring, &["n1:1", "n4:1"]).is_ok());
        let holders: Vec<&str> = ring.holders(0).collect();
        let refused = check_copies_left(&ring, &holders).unwrap_err().to_string();
        assert!(
            refused.contains("hold every copy of") && refused.contains("(0,"),
            "{refused}"
        );
        // One copy of each: that is what removing a node means.
        let single = Ring::bootstrap(nodes, 1).unwrap();
        assert!(check_copies_left(&single, &["n1:1"]).is_ok());
    }
}
