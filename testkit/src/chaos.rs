//! The chaos run behind `cargo xtask chaos`: a 3-node cluster of real processes under a
//! concurrent Put/Delete/Get workload while a seeded schedule kills (SIGKILL), restarts and
//! partitions nodes; then everything is healed and checked. With `netns`, the nodes are hosts
//! with a network between them (see [`crate::netns`]), with latency and loss on it, and links
//! set down join the faults. With `ring`, 5 nodes hold 3 copies of each key, and nodes join
//! and leave the ring among the kills and restarts (and the partitions, between hosts).
//!
//! The checks, after healing and waiting for the cluster to settle:
//! - every node holds exactly the same entries (versions and tombstones included) for every
//!   key the workload touched (on a ring: the ring has settled, each key is on 3 members that
//!   hold the same entry, and a node that left holds nothing);
//! - every write acknowledged with `ok` (a write quorum) is there, or a newer version of its
//!   key is; in particular a key whose newest acknowledged write was a Delete is still
//!   deleted unless a newer Put followed.
//!
//! The schedule is a function of the seed; the interleaving with the workload is not (threads
//! and the network decide it), so a seed replays the same faults at the same moments, which is
//! what makes a failure worth rerunning.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use kvstore::pb::Key;
use kvstore::pb::replicator_client::ReplicatorClient;

use crate::Error;
use crate::netns::Topology;
use crate::process::{ClusterSpec, ProcessCluster};

/// Keys the workload draws from: few enough that writes collide often.
const KEY_SPACE: u32 = 200;
/// How long the healed cluster gets to converge before it counts as a violation.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    /// The `kvstore-server` binary.
    pub server: PathBuf,
    pub seconds: u64,
    pub seed: u64,
    /// Concurrent clients.
    pub clients: usize,
    /// Where node data and logs go (kept after the run for inspection).
    pub root: PathBuf,
    /// Run the nodes as hosts in network namespaces (needs root), with [`NETNS_DELAY`] on
    /// every link between them, [`NETNS_LOSS_PERCENT`] of every host's packets dropped, and
    /// links set down among the faults.
    pub netns: bool,
    /// Run a ring instead: [`RING_NODES`] nodes holding [`RING_REPLICAS`] copies of each key,
    /// linked directly (a ring names its members by the addresses they listen on), with nodes
    /// joining and leaving among the kills and restarts (and, between hosts, partitions cut
    /// by nftables rather than by proxies).
    pub ring: bool,
}

/// Nodes a `ring` run starts with.
pub const RING_NODES: usize = 5;
/// Copies of each key in a `ring` run.
pub const RING_REPLICAS: usize = 3;
/// Members a `ring` run keeps at least: a leave below it is not asked for.
const RING_LEAST: usize = 4;
/// Nodes that may join in a `ring` run.
const RING_MAX_JOINS: usize = 6;

/// Latency on each link between hosts in a `netns` run, each way: a base and a jitter.
pub const NETNS_DELAY: (Duration, Duration) = (Duration::from_millis(20), Duration::from_millis(5));
/// Share of packets each host drops in a `netns` run.
pub const NETNS_LOSS_PERCENT: u32 = 1;

/// What a run did and found.
#[derive(Debug, Default)]
pub struct ChaosReport {
    pub seed: u64,
    pub events: Vec<String>,
    pub ops: u64,
    pub errors: u64,
    /// Writes acknowledged with a met write quorum.
    pub acked: u64,
    pub keys_checked: usize,
    pub settle_time: Duration,
    pub violations: Vec<String>,
}

impl ChaosReport {
    /// The joins and leaves a ring run made.
    pub fn ring_changes(&self) -> usize {
        (self.events.iter())
            .filter(|e| e.contains(" joins ") || e.ends_with(" leaves"))
            .count()
    }
}

impl std::fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "chaos seed {}", self.seed)?;
        for e in &self.events {
            writeln!(f, "  {e}")?;
        }
        writeln!(
            f,
            "workload: {} ops, {} failed calls, {} writes acknowledged by a quorum",
            self.ops, self.errors, self.acked
        )?;
        writeln!(
            f,
            "check: {} keys on every node, settled in {:.1}s",
            self.keys_checked,
            self.settle_time.as_secs_f64()
        )?;
        if self.violations.is_empty() {
            write!(f, "no violations")
        } else {
            writeln!(f, "{} VIOLATIONS:", self.violations.len())?;
            for v in &self.violations {
                writeln!(f, "  {v}")?;
            }
            write!(f, "replay with --seed {}", self.seed)
        }
    }
}

/// One acknowledged write.
#[derive(Clone, Debug)]
struct Acked {
    version: (u64, String),
    value: Option<String>,
}

/// A key's entry as a node holds it: (version, value or None for a tombstone), or absent.
type Held = Option<((u64, String), Option<String>)>;

/// Runs the chaos schedule and checks the result.
pub async fn run(config: ChaosConfig) -> Result<ChaosReport, Error> {
    std::fs::create_dir_all(&config.root)?;
    // A ring run's hosts: one for each node that may join, too.
    let hosts = match config.ring {
        true => RING_NODES + RING_MAX_JOINS,
        false => 3,
    };
    let topology = match config.netns {
        true => Some(Arc::new(Topology::create(hosts)?)),
        false => None,
    };
    let mut extra_args: Vec<String> = [
        "--replication-deadline",
        "500ms",
        "--anti-entropy-interval",
        "1s",
        "--peer-connect-timeout",
        "300ms",
    ]
    .map(String::from)
    .to_vec();
    if config.ring {
        let replicas = RING_REPLICAS.to_string();
        extra_args
            .extend(["--replicas", &replicas, "--gossip-interval", "300ms"].map(String::from));
    }
    let mut cluster = ProcessCluster::start(ClusterSpec {
        server: config.server.clone(),
        nodes: if config.ring { RING_NODES } else { 3 },
        root: config.root.clone(),
        extra_args,
        proxied: !config.ring,
        tls: None,
        netns: topology.clone(),
    })
    .await?;
    let mut report = ChaosReport {
        seed: config.seed,
        ..ChaosReport::default()
    };
    if let Some(hosts) = &topology {
        hosts.set_loss(NETNS_LOSS_PERCENT)?;
        // The delay is the proxies': a ring run's nodes are linked directly, without it.
        let delay = match config.ring {
            true => "links not delayed (direct)".to_string(),
            false => {
                cluster.set_delay(Some(NETNS_DELAY));
                format!(
                    "links delayed {:?} +- {:?} each way (proxy)",
                    NETNS_DELAY.0, NETNS_DELAY.1
                )
            }
        };
        report.events.push(format!(
            "start: hosts in network namespaces, {delay}, {NETNS_LOSS_PERCENT}% of packets \
             dropped (nftables)"
        ));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<BTreeMap<String, Vec<Acked>>>> = Arc::default();
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let addrs: Vec<String> = (0..cluster.len()).map(|i| cluster.addr(i)).collect();
    let mut workers = Vec::new();
    for c in 0..config.clients {
        let mut rng = StdRng::seed_from_u64(config.seed ^ (0x9E37_79B9 * (c as u64 + 1)));
        let clients: Vec<kvstore::client::Client> = addrs
            .iter()
            .map(|a| {
                kvstore::client::Client::new(a, Duration::from_secs(5)).expect("valid address")
            })
            .collect();
        let (stop, acked, ops, errors) = (stop.clone(), acked.clone(), ops.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let client = &clients[rng.random_range(0..clients.len())];
                let key = format!("key{:03}", rng.random_range(0..KEY_SPACE));
                let roll = rng.random_range(0..10);
                seq += 1;
                ops.fetch_add(1, Ordering::Relaxed);
                let result = match roll {
                    0..=5 => {
                        let value = format!("c{c}-{seq}");
                        client.put(&key, &value).await.map(|ack| (ack, Some(value)))
                    }
                    6..=7 => client.delete(&key).await.map(|ack| (ack, None)),
                    _ => {
                        if client
                            .get(&key)
                            .await
                            .is_err_and(|s| s.code() != tonic::Code::NotFound)
                        {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                };
                match result {
                    Ok((ack, value)) if ack.ok => {
                        let v = ack.version.expect("acks carry versions");
                        acked.lock().unwrap().entry(key).or_default().push(Acked {
                            version: (v.hlc, v.node_id),
                            value,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        // A node is down: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }

    // The fault schedule: one fault at a time (a node down or cut off), so a majority can
    // always form and acknowledged writes keep happening.
    let mut rng = StdRng::seed_from_u64(config.seed);
    let started = Instant::now();
    let end = started + Duration::from_secs(config.seconds);
    let mut down: Option<usize> = None;
    let mut isolated: Option<usize> = None;
    // A ring run's members, and the nodes that have left it.
    let mut members: Vec<usize> = (0..cluster.len()).collect();
    let mut left: Vec<usize> = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.random_range(600..1500))).await;
        let t = started.elapsed().as_secs_f64();
        let node = rng.random_range(0..cluster.len());
        let event = match (down, isolated) {
            (Some(n), _) => {
                cluster.restart(n).await?;
                down = None;
                format!("t={t:5.1}s restart node{}", n + 1)
            }
            (None, None) if config.ring => {
                let member = members[rng.random_range(0..members.len())];
                match rng.random_range(0..4) {
                    0 if cluster.len() < RING_NODES + RING_MAX_JOINS => {
                        // Waits while another change is under way: a join retries until it
                        // is let in.
                        let joined = cluster.join(member).await?;
                        members.push(joined);
                        format!(
                            "t={t:5.1}s node{} joins through node{}",
                            joined + 1,
                            member + 1
                        )
                    }
                    1 if members.len() > RING_LEAST => match cluster.client(member).leave().await {
                        Ok(_) => {
                            members.retain(|m| *m != member);
                            left.push(member);
                            format!("t={t:5.1}s node{} leaves", member + 1)
                        }
                        // Another change is under way, or a member does not answer yet.
                        Err(refused) => format!(
                            "t={t:5.1}s node{} may not leave yet: {}",
                            member + 1,
                            refused.message()
                        ),
                    },
                    // Between hosts, nftables cuts a member off from every other node.
                    2 if topology.is_some() => {
                        cluster.isolate(member)?;
                        isolated = Some(member);
                        format!("t={t:5.1}s partition node{} from its peers", member + 1)
                    }
                    _ => {
                        cluster.kill(member);
                        down = Some(member);
                        format!("t={t:5.1}s kill -9 node{}", member + 1)
                    }
                }
            }
            (None, Some(n)) => {
                cluster.heal()?;
                isolated = None;
                format!("t={t:5.1}s heal node{}", n + 1)
            }
            (None, None) => match (rng.random_range(0..3), &topology) {
                (0, _) => {
                    cluster.kill(node);
                    down = Some(node);
                    format!("t={t:5.1}s kill -9 node{}", node + 1)
                }
                // A pulled cable: clients lose the node too.
                (1, Some(hosts)) => {
                    hosts.set_link(node, false)?;
                    isolated = Some(node);
                    format!("t={t:5.1}s link down on node{}", node + 1)
                }
                _ => {
                    cluster.isolate(node)?;
                    isolated = Some(node);
                    format!("t={t:5.1}s partition node{} from its peers", node + 1)
                }
            },
        };
        report.events.push(event);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    cluster.heal()?;
    if let Some(n) = down {
        cluster.restart(n).await?;
        report.events.push(format!("end: restart node{}", n + 1));
    }
    report.events.push("end: heal all links".into());
    report.ops = ops.load(Ordering::Relaxed);
    report.errors = errors.load(Ordering::Relaxed);
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    report.acked = acked.values().map(|v| v.len() as u64).sum();

    // Settle: wait until every node holds the same entry for every key (on a ring: each
    // key's holders do, and the ring has settled).
    let keys: Vec<String> = (0..KEY_SPACE).map(|k| format!("key{k:03}")).collect();
    let settling = Instant::now();
    let held = loop {
        let held = read_all(&cluster, &keys).await?;
        if config.ring {
            let ring = ring_settled(&cluster, &members, &left).await;
            let copies = copies_agree(&held, &members, &left, keys.len());
            match (ring, copies) {
                (Ok(()), Ok(together)) => break together,
                (ring, copies) if settling.elapsed() > SETTLE_TIMEOUT => {
                    report.violations.extend(ring.err());
                    match copies {
                        Ok(together) => break together,
                        Err(problems) => {
                            report.violations.extend(problems);
                            break Vec::new();
                        }
                    }
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        if held.windows(2).all(|w| w[0] == w[1]) {
            break held;
        }
        if settling.elapsed() > SETTLE_TIMEOUT {
            for (k, key) in keys.iter().enumerate() {
                let seen: Vec<&Held> = held.iter().map(|node| &node[k]).collect();
                if seen.windows(2).any(|w| w[0] != w[1]) {
                    report.violations.push(format!(
                        "{key}: nodes differ after {SETTLE_TIMEOUT:?}: {seen:?}"
                    ));
                }
            }
            break held;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    report.settle_time = settling.elapsed();
    report.keys_checked = keys.len();

    // Every quorum-acknowledged write survives, or something newer replaced it.
    for (k, key) in keys.iter().enumerate() {
        let Some(writes) = acked.get(key) else {
            continue;
        };
        let newest = writes
            .iter()
            .max_by(|a, b| a.version.cmp(&b.version))
            .expect("non-empty");
        for (n, node) in held.iter().enumerate() {
            let problem = match &node[k] {
                None => Some("absent".to_string()),
                Some((version, _)) if *version < newest.version => {
                    Some(format!("holds older version {version:?}"))
                }
                Some((version, value)) if *version == newest.version && *value != newest.value => {
                    Some(format!("holds {value:?} under the acknowledged version"))
                }
                Some(_) => None,
            };
            if let Some(problem) = problem {
                let what = match &newest.value {
                    Some(v) => format!("put {v:?}"),
                    None => "delete".into(),
                };
                let who = match config.ring {
                    true => "its holders".to_string(),
                    false => format!("node{}", n + 1),
                };
                report.violations.push(format!(
                    "{key}: {who} {problem}; acknowledged {what} at {:?}",
                    newest.version
                ));
                if config.ring {
                    break;
                }
            }
        }
    }
    for i in 0..cluster.len() {
        cluster.stop(i);
    }
    Ok(report)
}

/// Whether every member of a ring run holds the same ring, settled, as a normal member, and
/// every node that left says so.
async fn ring_settled(
    cluster: &ProcessCluster,
    members: &[usize],
    left: &[usize],
) -> Result<(), String> {
    let mut seen = Vec::new();
    for &i in members.iter().chain(left) {
        let status = cluster
            .client(i)
            .status()
            .await
            .map_err(|s| format!("node{}: {}", i + 1, s.message()))?;
        let want = if left.contains(&i) { "left" } else { "normal" };
        seen.push((
            i + 1,
            status.ring_version,
            status.ring_phase,
            status.ring_state,
            want,
        ));
    }
    let version = seen.first().map(|s| s.1);
    if seen.iter().all(|(_, v, phase, state, want)| {
        Some(*v) == version && phase == "settled" && state == want
    }) {
        return Ok(());
    }
    Err(format!(
        "the ring did not settle (node, version, phase, state, expected state): {seen:?}"
    ))
}

/// On a ring: for each key, the members that hold it agree, and there are [`RING_REPLICAS`]
/// of them unless none holds it; a node that left holds nothing. Returns, for each key, the
/// entry its holders agree on, once for each holder (as a full-copy run's check reads it).
fn copies_agree(
    held: &[Vec<Held>],
    members: &[usize],
    left: &[usize],
    keys: usize,
) -> Result<Vec<Vec<Held>>, Vec<String>> {
    let mut problems = Vec::new();
    let agreed: Vec<Held> = (0..keys)
        .map(|k| {
            let holding: Vec<(usize, &Held)> = (members.iter())
                .map(|&i| (i, &held[i][k]))
                .filter(|(_, h)| h.is_some())
                .collect();
            for &i in left.iter().filter(|&&i| held[i][k].is_some()) {
                problems.push(format!(
                    "key{k:03}: node{}, which left, still holds it",
                    i + 1
                ));
            }
            let first = holding.first().and_then(|(_, h)| (*h).clone());
            let agree = holding.iter().all(|(_, h)| **h == first);
            if !holding.is_empty() && (holding.len() != RING_REPLICAS || !agree) {
                let seen: Vec<(usize, &Held)> = holding.iter().map(|(i, h)| (i + 1, *h)).collect();
                problems.push(format!(
                    "key{k:03}: held by {} nodes: {seen:?}",
                    holding.len()
                ));
            }
            first
        })
        .collect();
    match problems.is_empty() {
        true => Ok(vec![agreed; RING_REPLICAS]),
        false => Err(problems),
    }
}

/// Every node's entry for every key, read through the internal `Read` call (which shows
/// tombstones and versions).
async fn read_all(cluster: &ProcessCluster, keys: &[String]) -> Result<Vec<Vec<Held>>, Error> {
    let mut all = Vec::new();
    for i in 0..cluster.len() {
        let mut client = ReplicatorClient::connect(format!("http://{}", cluster.addr(i))).await?;
        let mut node = Vec::new();
        for key in keys {
            let kv = client
                .read(Key {
                    key: key.clone(),
                    ..Key::default()
                })
                .await
                .map_err(|s| Error::Node(format!("reading {key} from node{}: {s}", i + 1)))?
                .into_inner();
            node.push(kvstore::wire::kv_to_entry(kv)?.map(|e| {
                (
                    (e.version.time, e.version.node.to_string()),
                    e.value.map(String::from),
                )
            }));
        }
        all.push(node);
    }
    Ok(all)
}
