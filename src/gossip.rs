//! Membership gossip: each node announces, over chitchat (scuttlebutt gossip with a
//! phi-accrual failure detector, as Quickwit runs it), the epoch of its ring and its part in
//! it, and learns from the others which nodes are live and which hold a newer ring.
//!
//! Gossip runs over UDP, by default on the port number the node serves gRPC on. It is not
//! authenticated, so it carries hints only: a node that hears of a newer ring asks a member
//! of its own ring for it over gRPC, and the failure detector's verdict only ever holds a
//! change back (a node seen live is not removed), never starts one.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState,
};
use kvstore_actors::membership::{Phase, RingState};
use tokio::sync::watch;
use tracing::Instrument;

use crate::error::Error;

/// The gossip key of a node's ring epoch: `VERSION PHASE`, as in `3 committed`.
const RING: &str = "ring";
/// The gossip key of a node's part in its ring: normal, joining, leaving or left.
const ROLE: &str = "role";
/// The gossip key of a node's `--node-id`.
const NODE_ID: &str = "node_id";

/// What one node says of itself by gossip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announced {
    /// The node's id in the ring: its advertised gRPC address.
    pub node: String,
    pub epoch: Option<(u64, Phase)>,
    pub role: String,
}

/// What the failure detector says of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Live,
    Dead,
}

impl Liveness {
    pub fn name(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Dead => "dead",
        }
    }
}

/// How a node gossips.
#[derive(Clone, Debug)]
pub struct GossipConfig {
    /// The node's id in the ring (its advertised gRPC address).
    pub me: String,
    /// Where the node receives gossip (UDP).
    pub listen: SocketAddr,
    /// Where the others send it gossip.
    pub advertise: SocketAddr,
    /// Where to first send gossip: the gossip addresses of the ring's other members.
    pub seeds: Vec<String>,
    /// How often the node gossips with another. The failure detector's periods follow it.
    pub interval: Duration,
    /// The cluster's name: chitchat drops gossip from nodes of another.
    pub cluster: String,
    /// The node's `--node-id`, announced so that a node can be named by it.
    pub node_id: String,
}

/// A node's gossip, running until shut down. If chitchat's loop dies (it panics on some
/// forged datagrams), a supervisor starts it again, under a new generation, with what the node
/// announced; meanwhile the node reports no verdicts.
pub struct Gossip {
    shared: Arc<Shared>,
    supervisor: tokio::task::JoinHandle<()>,
}

struct Shared {
    config: GossipConfig,
    /// Everything the node announces, to announce again after a restart.
    pairs: std::sync::Mutex<BTreeMap<String, String>>,
    /// The running chitchat; None while it is being started again, and once stopped.
    current: std::sync::Mutex<Option<Instance>>,
    /// Every node (by generation) the failure detector has found live at least once. Chitchat
    /// also counts as dead a node it has heard of but not yet heard from twice; that one is
    /// not known to be down, only new.
    ever_live: std::sync::Mutex<HashSet<ChitchatId>>,
    stopped: std::sync::atomic::AtomicBool,
    /// Times chitchat was started again after its loop died.
    restarts: std::sync::atomic::AtomicU64,
}

struct Instance {
    chitchat: Arc<tokio::sync::Mutex<Chitchat>>,
    handle: ChitchatHandle,
    noting: tokio::task::JoinHandle<()>,
}

/// What ends when a chitchat loop ends: Ok when it was shut down, else why it died.
type Ended = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

impl Shared {
    /// Starts a chitchat loop announcing `pairs`.
    async fn spawn(self: &Arc<Self>) -> Result<(Instance, Ended), Error> {
        let config = &self.config;
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let interval = config.interval;
        let chitchat = ChitchatConfig {
            chitchat_id: ChitchatId::new(config.me.clone(), generation, config.advertise),
            cluster_id: config.cluster.clone(),
            gossip_interval: interval,
            listen_addr: config.listen,
            seed_nodes: config.seeds.clone(),
            // Chitchat's defaults are for a 1 s interval; they scale with it.
            failure_detector_config: FailureDetectorConfig {
                max_interval: interval * 10,
                initial_interval: interval * 5,
                // A restarted node gossips under a new generation; the old one is forgotten
                // after an hour.
                dead_node_grace_period: Duration::from_secs(3600),
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let pairs: Vec<(String, String)> = (self.pairs.lock().expect("pairs poisoned").iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let handle = chitchat::spawn_chitchat(chitchat, pairs, &UdpTransport)
            .await
            .map_err(|e| {
                Error::Gossip(format!(
                    "cannot gossip on udp {}: {e:#} (choose another --gossip-port)",
                    config.listen
                ))
            })?;
        let ended = handle.termination_watcher();
        let ended: Ended = Box::pin(async move { ended.await.map_err(|e| e.to_string()) });
        let chitchat = handle.chitchat();
        let mut live = chitchat.lock().await.live_nodes_watcher();
        let noting = tokio::spawn({
            let shared = self.clone();
            async move {
                loop {
                    let ids: Vec<ChitchatId> = live.borrow_and_update().keys().cloned().collect();
                    shared
                        .ever_live
                        .lock()
                        .expect("ever_live poisoned")
                        .extend(ids);
                    if live.changed().await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok((
            Instance {
                chitchat,
                handle,
                noting,
            },
            ended,
        ))
    }

    /// The running chitchat, if any.
    fn chitchat(&self) -> Option<Arc<tokio::sync::Mutex<Chitchat>>> {
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let current = self.current.lock().expect("gossip poisoned");
        current.as_ref().map(|i| i.chitchat.clone())
    }

    /// Starts chitchat again each time its loop dies, until the node stops gossiping.
    async fn supervise(self: Arc<Self>, mut ended: Ended) {
        loop {
            let result = ended.await;
            if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            let error = result.err().unwrap_or_default();
            tracing::error!(%error, "gossip stopped; starting it again");
            if let Some(dead) = self.current.lock().expect("gossip poisoned").take() {
                dead.noting.abort();
            }
            loop {
                tokio::time::sleep(self.config.interval * 10).await;
                if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                match self.spawn().await {
                    Ok((instance, next)) => {
                        *self.current.lock().expect("gossip poisoned") = Some(instance);
                        (self.restarts).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        ended = next;
                        tracing::info!("gossip started again");
                        break;
                    }
                    Err(error) => tracing::warn!(%error, "could not start gossip again"),
                }
            }
        }
    }
}

impl Gossip {
    /// Starts gossiping, announcing `state` and `role`.
    pub async fn start(config: GossipConfig, state: &RingState, role: &str) -> Result<Self, Error> {
        let mut pairs: BTreeMap<String, String> = announce(state, role).into_iter().collect();
        pairs.insert(NODE_ID.into(), config.node_id.clone());
        let shared = Arc::new(Shared {
            config,
            pairs: std::sync::Mutex::new(pairs),
            current: std::sync::Mutex::new(None),
            ever_live: std::sync::Mutex::default(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            restarts: std::sync::atomic::AtomicU64::new(0),
        });
        let (instance, ended) = shared.spawn().await?;
        *shared.current.lock().expect("gossip poisoned") = Some(instance);
        let supervisor = tokio::spawn(shared.clone().supervise(ended).in_current_span());
        Ok(Self { shared, supervisor })
    }

    /// Announces the node's ring and its part in it.
    pub async fn announce(&self, state: &RingState, role: &str) {
        let pairs = announce(state, role);
        self.shared
            .pairs
            .lock()
            .expect("pairs poisoned")
            .extend(pairs.iter().cloned());
        if let Some(chitchat) = self.shared.chitchat() {
            let mut chitchat = chitchat.lock().await;
            for (key, value) in pairs {
                chitchat.self_node_state().set(key, value);
            }
        }
    }

    /// Each node gossip knows the liveness of, but this one: live if any of its generations
    /// is, dead if one was live and none is now. Empty while gossip is not running.
    pub async fn liveness(&self) -> BTreeMap<String, Liveness> {
        let Some(chitchat) = self.shared.chitchat() else {
            return BTreeMap::new();
        };
        let chitchat = chitchat.lock().await;
        let mut ever_live = self.shared.ever_live.lock().expect("ever_live poisoned");
        let me = chitchat.self_chitchat_id().node_id.clone();
        let mut seen = BTreeMap::new();
        let dead: HashSet<&ChitchatId> = chitchat.dead_nodes().collect();
        // Generations chitchat has forgotten (dead for its grace period) are let go too.
        ever_live.retain(|id| dead.contains(id) || chitchat.node_state(id).is_some());
        for id in dead.into_iter().filter(|id| ever_live.contains(*id)) {
            seen.insert(id.node_id.to_string(), Liveness::Dead);
        }
        for id in chitchat.live_nodes() {
            seen.insert(id.node_id.to_string(), Liveness::Live);
        }
        seen.remove(&*me);
        seen
    }

    /// The ring ids (addresses) of the nodes that announce `node_id` as their `--node-id`,
    /// live or not, as long as gossip remembers them.
    pub async fn named(&self, node_id: &str) -> Vec<String> {
        let Some(chitchat) = self.shared.chitchat() else {
            return Vec::new();
        };
        let chitchat = chitchat.lock().await;
        let mut found: Vec<String> = (chitchat.node_states().iter())
            .filter(|(_, state)| state.get(NODE_ID) == Some(node_id))
            .map(|(id, _)| id.node_id.to_string())
            .collect();
        found.dedup();
        found
    }

    /// The live nodes and what each announces, each time that changes; None while gossip is
    /// not running. A restart ends the receiver: ask again.
    pub async fn watch(&self) -> Option<watch::Receiver<BTreeMap<ChitchatId, NodeState>>> {
        let chitchat = self.shared.chitchat()?;
        let watcher = chitchat.lock().await.live_nodes_watcher();
        Some(watcher)
    }

    /// Times gossip was started again after its loop died.
    pub fn restarts(&self) -> u64 {
        self.shared
            .restarts
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the node has stopped gossiping for good.
    pub fn stopped(&self) -> bool {
        self.shared
            .stopped
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stops gossiping, and lets its port go: the others see this node go down.
    pub async fn shutdown(&self) {
        self.shared
            .stopped
            .store(true, std::sync::atomic::Ordering::Release);
        self.supervisor.abort();
        let current = self.shared.current.lock().expect("gossip poisoned").take();
        if let Some(instance) = current {
            instance.noting.abort();
            if let Err(error) = instance.handle.shutdown().await {
                tracing::debug!(%error, "gossip stopped with an error");
            }
        }
    }
}

impl Drop for Gossip {
    /// A node dropped without being stopped (a failed start) must not go on saying it is live.
    fn drop(&mut self) {
        self.shared
            .stopped
            .store(true, std::sync::atomic::Ordering::Release);
        self.supervisor.abort();
        if let Some(instance) = self.shared.current.lock().expect("gossip poisoned").take() {
            instance.noting.abort();
            instance.handle.abort();
        }
    }
}

/// What a live node announces, from the watcher's map.
pub fn announced(live: &BTreeMap<ChitchatId, NodeState>) -> Vec<Announced> {
    (live.iter())
        .map(|(id, state)| Announced {
            node: id.node_id.to_string(),
            epoch: state.get(RING).and_then(parse_epoch),
            role: state.get(ROLE).unwrap_or_default().to_owned(),
        })
        .collect()
}

fn announce(state: &RingState, role: &str) -> Vec<(String, String)> {
    let (version, phase) = state.epoch();
    vec![
        (RING.into(), format!("{version} {}", phase.name())),
        (ROLE.into(), role.into()),
    ]
}

fn parse_epoch(value: &str) -> Option<(u64, Phase)> {
    let (version, phase) = value.split_once(' ')?;
    let phase = [Phase::Pending, Phase::Committed, Phase::Settled]
        .into_iter()
        .find(|p| p.name() == phase)?;
    Some((version.parse().ok()?, phase))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvstore_actors::ring::Ring;

    /// A UDP port on loopback that was free a moment ago.
    fn free_udp() -> SocketAddr {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    }

    async fn start(me: SocketAddr, seeds: &[SocketAddr], state: &RingState) -> Gossip {
        let config = GossipConfig {
            me: me.to_string(),
            listen: me,
            advertise: me,
            seeds: seeds.iter().map(ToString::to_string).collect(),
            interval: Duration::from_millis(50),
            cluster: "test".into(),
            node_id: format!("node-{}", me.port()),
        };
        Gossip::start(config, state, "normal").await.unwrap()
    }

    async fn sees(g: &Gossip, node: SocketAddr, want: Liveness) -> bool {
        g.liveness().await.get(&node.to_string()) == Some(&want)
    }

    /// Polls `check` every 20 ms until it holds; panics after 30 s.
    async fn until<F: std::future::Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
        let started = std::time::Instant::now();
        while !check().await {
            assert!(started.elapsed() < Duration::from_secs(30), "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_see_each_other_live_hear_a_newer_ring_then_one_goes_down() {
        let (a, b) = (free_udp(), free_udp());
        let ring = Ring::bootstrap([a.to_string(), b.to_string()], 1).unwrap();
        let settled = RingState::settled(ring.clone());
        let first = start(a, &[b], &settled).await;
        let second = start(b, &[a], &settled).await;
        until("a sees b live", || sees(&first, b, Liveness::Live)).await;
        until("b sees a live", || sees(&second, a, Liveness::Live)).await;
        let b_id = format!("node-{}", b.port());
        until("a knows b by its node id", || async {
            first.named(&b_id).await == [b.to_string()]
        })
        .await;
        assert!(first.named("nobody").await.is_empty());
        assert!(
            !first.liveness().await.contains_key(&a.to_string()),
            "not itself"
        );

        let pending = settled.begin(ring.with_joined("c:1").unwrap()).unwrap();
        first.announce(&pending, "normal").await;
        let watch = second.watch().await.unwrap();
        let epoch = pending.epoch();
        until("b hears a's pending ring", || {
            let heard = announced(&watch.borrow());
            async move {
                heard.iter().any(|n| {
                    n.node == a.to_string() && n.epoch == Some(epoch) && n.role == "normal"
                })
            }
        })
        .await;

        first.shutdown().await;
        until("b sees a dead", || sees(&second, a, Liveness::Dead)).await;
        second.shutdown().await;
        assert!(
            second.liveness().await.is_empty(),
            "no verdicts once stopped"
        );
        // Its port is free again once it has stopped.
        std::net::UdpSocket::bind(a).unwrap();
    }

    /// A gossip "hello" (Syn) from a node chitchat has never heard of, under an id of `pad`
    /// bytes: a few of them make chitchat's answer overflow a datagram, and its loop panic.
    fn forged_syn(n: usize, pad: usize, cluster: &str) -> Vec<u8> {
        let id = format!("forged{n}-{}", "x".repeat(pad));
        let mut msg = b"S\xb0\x00\x00".to_vec();
        msg.extend(1u16.to_le_bytes());
        msg.extend((id.len() as u16).to_le_bytes());
        msg.extend(id.as_bytes());
        msg.extend(1u64.to_le_bytes());
        msg.extend([4, 127, 0, 0, 1]);
        msg.extend(9u16.to_le_bytes());
        for word in [3u64, 0, 3] {
            msg.extend(word.to_le_bytes());
        }
        msg.extend((cluster.len() as u16).to_le_bytes());
        msg.extend(cluster.as_bytes());
        msg
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gossip_killed_by_forged_datagrams_starts_again() {
        let (a, b) = (free_udp(), free_udp());
        let ring = Ring::bootstrap([a.to_string(), b.to_string()], 1).unwrap();
        let settled = RingState::settled(ring);
        let first = start(a, &[b], &settled).await;
        let second = start(b, &[a], &settled).await;
        until("a sees b live", || sees(&first, b, Liveness::Live)).await;
        let attacker = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for n in 0..4 {
            attacker.send_to(&forged_syn(n, 33_000, "test"), a).unwrap();
        }
        until("a's gossip is started again", || async {
            first.restarts() >= 1
        })
        .await;
        until("a sees b live again", || sees(&first, b, Liveness::Live)).await;
        until("b sees a live again", || sees(&second, a, Liveness::Live)).await;
        let b_id = format!("node-{}", b.port());
        assert_eq!(first.named(&b_id).await, [b.to_string()]);
        first.shutdown().await;
        second.shutdown().await;
    }

    #[test]
    fn an_announced_epoch_reads_back() {
        let ring = Ring::bootstrap(["a:1", "b:1"], 1).unwrap();
        let settled = RingState::settled(ring.clone());
        let pending = settled.begin(ring.with_joined("c:1").unwrap()).unwrap();
        for state in [&settled, &pending, &pending.advance().unwrap()] {
            let pairs = announce(state, "normal");
            assert_eq!(
                parse_epoch(&pairs[0].1),
                Some(state.epoch()),
                "{}",
                pairs[0].1
            );
        }
        for garbage in ["", "3", "3 done", "x settled", "-1 settled"] {
            assert_eq!(parse_epoch(garbage), None, "{garbage}");
        }
    }
}
