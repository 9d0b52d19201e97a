//! Clusters with fewer copies of each key than nodes (`--replicas`): six nodes, three copies,
//! in one process, driven through the gRPC API as a client would.

mod common;

use std::time::Duration;

use common::TestCluster;
use kvstore::config::NodeConfig;
use kvstore::pb::Consistency;
use tonic::Code;

/// Six nodes holding three copies of each key.
fn six_by_three() -> TestCluster {
    TestCluster::start_with(6, |_| NodeConfig {
        replicas: 3,
        ..common::patient()
    })
}

/// Live keys each node holds, by Status.
async fn held(cluster: &TestCluster) -> Vec<u64> {
    let mut keys = Vec::new();
    for i in 0..cluster.nodes.len() {
        keys.push(cluster.client(i).status().await.unwrap().keys);
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_nodes_hold_three_copies_of_each_key_and_any_node_serves_any_key() {
    let cluster = six_by_three();
    let status = cluster.client(0).status().await.unwrap();
    assert_eq!(status.replicas, 3, "{status:?}");
    // Half of the 1,024 partitions, give or take the copies.
    assert!((509..=515).contains(&status.partitions), "{status:?}");
    const KEYS: usize = 300;
    for k in 0..KEYS {
        // Each write through another node, holder or not.
        let ack = cluster
            .client(k % 6)
            .put(&format!("key{k}"), &format!("v{k}"))
            .await
            .unwrap();
        assert!(ack.ok, "{ack:?}");
        assert_eq!(ack.message, "Stored and replicated", "key{k}");
    }
    // Every write was acknowledged by all three copies: each key is on exactly three nodes,
    // and each node holds about half of them.
    let keys = held(&cluster).await;
    assert_eq!(keys.iter().sum::<u64>(), 3 * KEYS as u64, "{keys:?}");
    assert!(
        keys.iter().all(|&n| n > 0 && n < KEYS as u64),
        "every node holds a share, none all: {keys:?}"
    );
    // Any node answers for any key, at either consistency.
    for k in (0..KEYS).step_by(7) {
        for i in 0..6 {
            let key = format!("key{k}");
            assert_eq!(cluster.client(i).get(&key).await.unwrap(), format!("v{k}"));
            let quorum = cluster.client(i).get_with(&key, Consistency::Quorum).await;
            assert_eq!(quorum.unwrap().value, format!("v{k}"), "{key} on node {i}");
        }
    }
    // A List through any node has every key once, in order, though none holds them all.
    let mut expected: Vec<(String, String)> = (0..KEYS)
        .map(|k| (format!("key{k}"), format!("v{k}")))
        .collect();
    expected.sort();
    for i in 0..6 {
        assert_eq!(
            cluster.client(i).list().await.unwrap(),
            expected,
            "node {i}"
        );
    }
    // A delete through any node reaches the key's copies.
    let ack = cluster.client(5).delete("key0").await.unwrap();
    assert_eq!(ack.message, "Deleted and replicated");
    for i in 0..6 {
        let err = cluster.client(i).get("key0").await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "node {i}");
    }
    let keys = held(&cluster).await;
    assert_eq!(keys.iter().sum::<u64>(), 3 * (KEYS as u64 - 1), "{keys:?}");
}

/// One node of six killed: every key still has two copies up, so majority writes and quorum
/// reads go on, through every node that is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_node_down_quorum_writes_and_reads_go_on() {
    let mut cluster = TestCluster::start_with(6, |_| NodeConfig {
        replicas: 3,
        replication_deadline: Duration::from_secs(2),
        ..NodeConfig::default()
    });
    cluster.nodes[2].kill().await;
    const KEYS: usize = 120;
    let mut missed = 0;
    for k in 0..KEYS {
        let via = [0, 1, 3, 4, 5][k % 5];
        let ack = cluster
            .client(via)
            .put(&format!("key{k}"), "v")
            .await
            .unwrap();
        assert!(ack.ok, "key{k}: {ack:?}");
        if !ack.failed_peers.is_empty() {
            assert_eq!(ack.failed_peers, [cluster.addr(2)], "key{k}");
            assert!(ack.message.starts_with("Stored on 2 of 3 nodes"), "{ack:?}");
            missed += 1;
        }
    }
    // The dead node holds half the keys: it missed about that many.
    assert!(missed > KEYS / 4 && missed < KEYS * 3 / 4, "{missed}");
    for k in 0..KEYS {
        let key = format!("key{k}");
        let via = [0, 1, 3, 4, 5][(k + 1) % 5];
        let read = cluster
            .client(via)
            .get_with(&key, Consistency::Quorum)
            .await;
        assert_eq!(read.unwrap().value, "v", "{key}");
        assert_eq!(cluster.client(via).get(&key).await.unwrap(), "v", "{key}");
    }
    // A List reads each partition of the dead node from another of its holders.
    for via in [0, 1, 3, 4, 5] {
        let listed = cluster.client(via).list().await.unwrap();
        assert_eq!(listed.len(), KEYS, "through node {via}");
        assert!(listed.windows(2).all(|w| w[0].0 < w[1].0));
    }
}

/// With every holder of some partitions down, a List through a node that holds none of them
/// fails as unavailable, naming what it could not reach, rather than leaving keys out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_with_every_copy_of_a_partition_down_says_so() {
    let mut cluster = TestCluster::start_with(4, |_| NodeConfig {
        replicas: 1,
        replication_deadline: Duration::from_secs(2),
        ..NodeConfig::default()
    });
    for k in 0..40 {
        cluster
            .client(0)
            .put(&format!("key{k}"), "v")
            .await
            .unwrap();
    }
    assert_eq!(cluster.client(0).list().await.unwrap().len(), 40);
    cluster.nodes[3].kill().await;
    let err = cluster.client(0).list().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("256 partitions"),
        "{}",
        err.message()
    );
    assert!(err.message().contains(cluster.addr(3)), "{}", err.message());
}

/// The partition sets a Digest, Pull or Scan carries are checked: one of the wrong size is
/// refused, naming the size it must have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_partition_set_is_refused() {
    use kvstore::pb::{DigestRequest, PullRequest, ScanRequest};
    let cluster = TestCluster::start(1);
    let mut peer = cluster.replicator(0).await;
    let bad = vec![0xff; 100];
    let err = peer
        .digest(DigestRequest {
            buckets: 16,
            partitions: bad.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("128 bytes"), "{}", err.message());
    let err = peer
        .pull(PullRequest {
            buckets: 16,
            which: vec![0],
            partitions: bad.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = peer
        .scan(ScanRequest { partitions: bad })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Only a remove takes several nodes, each named by its address.
    use kvstore::pb::{RingChange, ring_change::Kind};
    let change = |kind: Kind, also: &[&str]| RingChange {
        kind: kind.into(),
        node: cluster.addr(0).to_string(),
        also: also.iter().map(|a| a.to_string()).collect(),
    };
    let err = (peer
        .change_ring(change(Kind::Leave, &["127.0.0.1:1"]))
        .await)
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("only a remove"), "{}", err.message());
    let err = (peer.change_ring(change(Kind::Remove, &["no port"])).await).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("by its address"),
        "{}",
        err.message()
    );
}

/// Six node processes with three copies of each key: once settled every key is on exactly
/// three of them; with one killed, majority writes go on; restarted, it gets what it missed
/// and every key is on three nodes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_processes_keep_three_copies_through_a_kill_and_a_restart() {
    use kvstore_testkit::ProcessCluster;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ring_processes(6, dir.path(), &["--replication-deadline", "10s"]).await;
    let held = |cluster: &ProcessCluster| {
        let clients: Vec<_> = (0..6).map(|i| cluster.client(i)).collect();
        async move {
            let mut keys = Vec::new();
            for client in clients {
                keys.push(client.status().await.map(|s| s.keys).unwrap_or(0));
            }
            keys
        }
    };
    for k in 0..60 {
        let ack = cluster
            .client(k % 6)
            .put(&format!("a{k}"), "v")
            .await
            .unwrap();
        assert_eq!(ack.message, "Stored and replicated", "a{k}");
    }
    assert_eq!(held(&cluster).await.iter().sum::<u64>(), 180);
    cluster.kill(3);
    for k in 0..60 {
        let via = [0, 1, 2, 4, 5][k % 5];
        let ack = cluster
            .client(via)
            .put(&format!("b{k}"), "v")
            .await
            .unwrap();
        assert!(ack.ok, "b{k}: {ack:?}");
    }
    let listed = cluster.client(0).list().await.unwrap();
    assert_eq!(listed.len(), 120);
    cluster.restart(3).await.unwrap();
    // What node 4 missed comes back (handoff from the nodes that took the writes, or
    // anti-entropy with the holders of its partitions): three copies of every key.
    let started = std::time::Instant::now();
    loop {
        let keys = held(&cluster).await;
        if keys.iter().sum::<u64>() == 360 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "copies never settled at three: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..6 {
        assert_eq!(cluster.client(i).list().await.unwrap(), listed, "node {i}");
    }
}

/// A node given another --replicas computes another ring: its peers refuse its calls and it
/// refuses theirs, each saying why, rather than placing keys where the others do not look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_ring_is_refused_and_told_why() {
    let cluster = TestCluster::start_with(4, |i| NodeConfig {
        replicas: if i == 3 { 2 } else { 3 },
        ..common::patient()
    });
    let mut refused = None;
    for k in 0..20 {
        let ack = cluster
            .client(0)
            .put(&format!("key{k}"), "v")
            .await
            .unwrap();
        if ack.failed_peers.iter().any(|p| p == cluster.addr(3)) {
            refused = Some(ack.message);
            break;
        }
    }
    let message = refused.expect("node 4 holds most keys, and refuses them all");
    assert!(message.contains("is not this node's"), "{message}");
    assert!(message.contains("--replicas"), "{message}");
}

/// A node restarted into another ring on a data dir that holds data refuses to start, naming
/// both rings: its keys would be looked for where they are not. Into every node holding every
/// key it starts, as it does on an empty data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_placed_by_another_ring_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Three peers that never answer: the node is on its own, whatever its ring.
    let (held, peers): (Vec<_>, Vec<String>) = (0..3).map(|_| common::closed_port()).unzip();
    let config = |replicas: usize, data_dir: &std::path::Path| NodeConfig {
        replicas,
        peers: peers.clone(),
        data_dir: Some(data_dir.to_path_buf()),
        replication_deadline: Duration::from_millis(200),
        ..NodeConfig::default()
    };
    let run = |config: NodeConfig| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let node = tokio::spawn(kvstore::server::run(listener, config, async {
            let _ = stopped.await;
        }));
        (addr, stop, node)
    };
    // Every node holding every key (4 copies of 4 nodes): a write is kept here.
    let (addr, stop, node) = run(config(4, dir.path())).await;
    let client = kvstore::client::Client::new(&addr, Duration::from_secs(10)).unwrap();
    let mut put = client.put("k", "v").await;
    for _ in 0..100 {
        if put.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        put = client.put("k", "v").await;
    }
    assert_eq!(
        put.unwrap().message.split(',').next(),
        Some("Stored on 1 of 4 nodes")
    );
    stop.send(()).unwrap();
    node.await.unwrap().unwrap();
    // The data dir names the ring its data was placed by.
    let recorded = kvstore::membership::recorded(dir.path()).unwrap().unwrap();
    assert_eq!(recorded.ring().members().len(), 4);
    assert_eq!(recorded.ring().replicas(), 4);
    // The same data dir in a ring of one copy each: refused.
    let (_, _stop, node) = run(config(1, dir.path())).await;
    let refused = tokio::time::timeout(Duration::from_secs(20), node)
        .await
        .expect("refused at once")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("another ring (every node holds every key)"),
        "{refused}"
    );
    assert!(refused.contains("1x4-"), "{refused}");
    // Back to every node holding every key, at once: the refused node let go of its data
    // dir, and this one starts and has its key.
    let (addr, stop, node) = run(config(4, dir.path())).await;
    let client = kvstore::client::Client::new(&addr, Duration::from_secs(10)).unwrap();
    let mut got = client.get("k").await;
    for _ in 0..100 {
        if got.is_ok() {
            break;
        }
        assert!(!node.is_finished(), "did not start: {:?}", node.await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = client.get("k").await;
    }
    assert_eq!(got.unwrap(), "v");
    stop.send(()).unwrap();
    node.await.unwrap().unwrap();
    // An empty data dir starts in any ring.
    let empty = tempfile::tempdir().unwrap();
    let (_, stop, node) = run(config(1, empty.path())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!node.is_finished(), "a new node of a ring starts");
    stop.send(()).unwrap();
    node.await.unwrap().unwrap();
    drop(held);
}

/// Waits until every node of `cluster` in `live` reports ring version `version`, settled, in
/// state `normal`, and `left`, if given, says `left`; panics after a minute.
async fn change_settles(cluster: &TestCluster, live: &[usize], version: u64, left: Option<usize>) {
    let started = std::time::Instant::now();
    loop {
        let mut seen = Vec::new();
        for &i in live.iter().chain(left.as_ref()) {
            let status = cluster.client(i).status().await.unwrap();
            let want = if Some(i) == left { "left" } else { "normal" };
            let phase = status.ring_phase;
            seen.push((i, status.ring_version, status.ring_state, want, phase));
        }
        if (seen.iter())
            .all(|(_, v, s, want, phase)| *v == version && s == want && phase == "settled")
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the ring did not settle at version {version}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `nodes` node processes holding three copies of each key, with `extra` flags. Direct: each
/// node names the others by the addresses they listen on, which is what the ring is built
/// from.
async fn ring_processes(
    nodes: usize,
    dir: &std::path::Path,
    extra: &[&str],
) -> kvstore_testkit::ProcessCluster {
    let mut extra_args = vec!["--replicas".to_string(), "3".to_string()];
    extra_args.extend(extra.iter().map(|a| a.to_string()));
    kvstore_testkit::ProcessCluster::start(kvstore_testkit::process::ClusterSpec {
        server: env!("CARGO_BIN_EXE_kvstore-server").into(),
        nodes,
        root: dir.to_path_buf(),
        extra_args,
        proxied: false,
        tls: None,
        netns: None,
    })
    .await
    .unwrap()
}

/// Waits until `check` says done, asking every 200 ms; panics with what it saw last after a
/// minute.
async fn eventually<F, T>(what: &str, check: impl Fn() -> F)
where
    F: std::future::Future<Output = (bool, T)>,
    T: std::fmt::Debug,
{
    let started = std::time::Instant::now();
    loop {
        let (done, seen) = check().await;
        if done {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: not after a minute: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until node `via`'s gossip says `liveness` of node `of`; panics after a minute.
async fn gossip_says(cluster: &TestCluster, via: usize, of: usize, liveness: &str) {
    let what = format!("node {via}'s gossip says node {of} is {liveness}");
    eventually(&what, || async {
        let status = cluster.client(via).status().await.unwrap();
        let peer = (status.peers.into_iter()).find(|p| p.address == cluster.addr(of));
        (peer.as_ref().is_some_and(|p| p.gossip == liveness), peer)
    })
    .await;
}

/// Until the nodes of `live` hold three copies of each of `keys` keys between them; returns
/// what each holds.
async fn three_copies_on(cluster: &TestCluster, live: &[usize], keys: usize) -> Vec<u64> {
    let started = std::time::Instant::now();
    loop {
        let mut held = Vec::new();
        for &i in live {
            held.push(cluster.client(i).status().await.unwrap().keys);
        }
        if held.iter().sum::<u64>() == 3 * keys as u64 {
            return held;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not three copies of {keys} keys: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ring_config() -> NodeConfig {
    NodeConfig {
        replicas: 3,
        replication_deadline: Duration::from_secs(2),
        anti_entropy_interval: Duration::from_secs(1),
        gossip_interval: common::GOSSIP,
        ..NodeConfig::default()
    }
}

/// Clients writing keys `during{k}` through nodes in turn, at most 5,000 writes, until
/// stopped.
struct WriteLoad {
    stop: tokio::sync::watch::Sender<bool>,
    writer: tokio::task::JoinHandle<Vec<(String, String)>>,
}

impl WriteLoad {
    fn start(clients: Vec<kvstore::client::Client>) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let writer = tokio::spawn(async move {
            let mut acked = Vec::new();
            for k in 0..5_000 {
                if *stopped.borrow_and_update() {
                    break;
                }
                let key = format!("during{k}");
                if let Ok(ack) = clients[k % clients.len()].put(&key, &format!("v{k}")).await
                    && ack.ok
                {
                    acked.push((key, format!("v{k}")));
                }
            }
            acked
        });
        Self { stop, writer }
    }

    /// The writes acknowledged with `ok`.
    async fn stop(self) -> Vec<(String, String)> {
        let _ = self.stop.send(true);
        let acked = self.writer.await.unwrap();
        assert!(acked.len() > 20, "the writes went on: {}", acked.len());
        acked
    }
}

/// Writes `before0` .. `before{n-1}` through the nodes of `via` in turn.
async fn write_before(cluster: &TestCluster, via: &[usize], n: usize) {
    for k in 0..n {
        let node = via[k % via.len()];
        let ack = cluster.client(node).put(&format!("before{k}"), "v").await;
        assert!(ack.unwrap().ok, "before{k}");
    }
}

/// Every key written, those from before and the acknowledged ones, in key order; checks
/// that every third reads back at QUORUM through the nodes of `via` in turn.
async fn read_back(
    cluster: &TestCluster,
    via: &[usize],
    before: usize,
    acked: Vec<(String, String)>,
) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = (0..before)
        .map(|k| (format!("before{k}"), "v".to_string()))
        .chain(acked)
        .collect();
    all.sort();
    for (n, (key, value)) in all.iter().enumerate().step_by(3) {
        let node = via[n % via.len()];
        let read = cluster
            .client(node)
            .get_with(key, Consistency::Quorum)
            .await;
        assert_eq!(&read.unwrap().value, value, "{key} through node {node}");
    }
    all
}

/// A seventh node joins a six-node ring while clients write: no acknowledged write is lost,
/// the new node takes its share of the keys, and once the join has settled every key is on
/// exactly three nodes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_under_load_takes_its_share_and_loses_no_write() {
    let mut cluster = TestCluster::start_with(6, |_| ring_config());
    let six: Vec<usize> = (0..6).collect();
    write_before(&cluster, &six, 300).await;
    let load = WriteLoad::start(six.iter().map(|&i| cluster.client(i)).collect());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = cluster.join(ring_config(), 2);
    let seven: Vec<usize> = (0..7).collect();
    change_settles(&cluster, &seven, 2, None).await;
    let acked = load.stop().await;
    // Every acknowledged write reads back through every node, the new one too.
    let all = read_back(&cluster, &seven, 300, acked).await;
    // The nodes that gave partitions to the new one drop them.
    let keys = three_copies_on(&cluster, &seven, all.len()).await;
    // Its share: 3/7 of the keys, within what hashing leaves to chance.
    let share = keys[new] as f64 / all.len() as f64;
    assert!((0.3..0.56).contains(&share), "{keys:?}");
    let status = cluster.client(new).status().await.unwrap();
    assert!((435..=443).contains(&status.partitions), "{status:?}");
    // A List through the new node has every key once.
    assert_eq!(cluster.client(new).list().await.unwrap(), all);
}

/// A node of seven leaves while clients write through the others: its keys go to the six
/// that stay, no acknowledged write is lost, and it ends holding nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaves_under_load_and_hands_its_keys_over() {
    let cluster = TestCluster::start_with(7, |_| ring_config());
    const LEAVER: usize = 3;
    let stay: Vec<usize> = (0..7).filter(|&i| i != LEAVER).collect();
    write_before(&cluster, &(0..7).collect::<Vec<_>>(), 300).await;
    let load = WriteLoad::start(stay.iter().map(|&i| cluster.client(i)).collect());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ack = cluster.client(LEAVER).leave().await.unwrap();
    assert!(ack.message.starts_with("Leaving: "), "{ack:?}");
    change_settles(&cluster, &stay, 2, Some(LEAVER)).await;
    let acked = load.stop().await;
    let all = read_back(&cluster, &stay, 300, acked).await;
    three_copies_on(&cluster, &stay, all.len()).await;
    // The node that left holds nothing, and no longer counts among the others' peers.
    let left = cluster.client(LEAVER).status().await.unwrap();
    assert_eq!((left.keys, left.partitions), (0, 0), "{left:?}");
    let peers = cluster.client(0).status().await.unwrap().peers;
    assert!(
        peers.iter().all(|p| p.address != cluster.addr(LEAVER)),
        "{peers:?}"
    );
    assert_eq!(cluster.client(stay[2]).list().await.unwrap(), all);
    // It still answers clients, from the ring's holders.
    let (key, value) = &all[0];
    assert_eq!(&cluster.client(LEAVER).get(key).await.unwrap(), value);
}

/// The claimant and another node are asked to leave at once. One leave begins; the other is
/// refused in the words of the changing ring's claimant, whom the asked node finds again if the
/// one it first asked is no longer the claimant (it is leaving). The first leave then settles,
/// and the second, asked again, does too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_leaves_asked_at_once_begin_one_at_a_time() {
    let cluster = TestCluster::start_with(6, |_| ring_config());
    write_before(&cluster, &(0..6).collect::<Vec<_>>(), 50).await;
    let claimant = ring_of(&cluster, 0).await.claimant().to_owned();
    let first = (0..6).find(|&i| cluster.addr(i) == claimant).unwrap();
    let second = (0..6).find(|&i| i != first).unwrap();
    let (one, other) = (cluster.client(first), cluster.client(second));
    let (a, b) = tokio::join!(one.leave(), other.leave());
    let (began, refused) = match (a, b) {
        (Ok(_), Err(refused)) => (first, refused),
        (Err(refused), Ok(_)) => (second, refused),
        other => panic!("exactly one leave begins: {other:?}"),
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("the ring is changing (version 2")
            && !refused.message().contains("not the ring's claimant"),
        "{refused:?}"
    );
    let stay: Vec<usize> = (0..6).filter(|&i| i != began).collect();
    change_settles(&cluster, &stay, 2, Some(began)).await;
    let last = if began == first { second } else { first };
    cluster.client(last).leave().await.unwrap();
    let stay: Vec<usize> = stay.into_iter().filter(|&i| i != last).collect();
    change_settles(&cluster, &stay, 3, Some(last)).await;
    three_copies_on(&cluster, &stay, 50).await;
    read_back(&cluster, &stay, 50, Vec::new()).await;
}

/// A node of seven dies; it is removed, and its partitions get new holders from the copies
/// left, so every key is on three nodes again. A node that answers is not removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_removed_and_its_copies_made_again() {
    let mut cluster = TestCluster::start_with(7, |_| ring_config());
    const KEYS: usize = 300;
    for k in 0..KEYS {
        let ack = cluster.client(k % 7).put(&format!("key{k}"), "v").await;
        assert!(ack.unwrap().ok, "key{k}");
    }
    // Asked through a node that is not the claimant: the claimant's refusal keeps its code,
    // which its words are not made to repeat.
    let claimant = ring_of(&cluster, 0).await.claimant().to_owned();
    let refused = cluster.client(3).remove(cluster.addr(5)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().starts_with(&format!(
            "the ring's claimant {claimant}: {} ",
            cluster.addr(5)
        )),
        "{refused:?}"
    );
    assert!(refused.message().contains("leave"), "{refused:?}");
    // The ring's first member dies: another node makes the change, once gossip sees it down.
    const DEAD: usize = 0;
    let live: Vec<usize> = (1..7).collect();
    for &i in &live {
        gossip_says(&cluster, i, DEAD, "live").await;
    }
    cluster.nodes[DEAD].kill().await;
    // Just killed, it has not been silent long enough for gossip to see it down: not removed
    // yet, and told why.
    let early = cluster
        .client(4)
        .remove(cluster.addr(DEAD))
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");
    assert!(
        early.message().contains("gossip says it is live"),
        "{early:?}"
    );
    // Each node's failure detector decides for itself; the claimant's is the one asked.
    for &i in &live {
        gossip_says(&cluster, i, DEAD, "dead").await;
    }
    let ack = cluster.client(4).remove(cluster.addr(DEAD)).await.unwrap();
    assert!(ack.message.starts_with("Removing "), "{ack:?}");
    change_settles(&cluster, &live, 2, None).await;
    three_copies_on(&cluster, &live, KEYS).await;
    for k in (0..KEYS).step_by(5) {
        let via = live[k % live.len()];
        let read = cluster.client(via).get(&format!("key{k}")).await;
        assert_eq!(read.unwrap(), "v", "key{k} through node {via}");
    }
    let refused = cluster
        .client(1)
        .remove(cluster.addr(DEAD))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
}

/// A node that would join under a member's address, under one where no node answers, or with
/// a member's `--node-id`, is refused before the ring changes: the first would count itself as
/// that member's copy, the second would leave the ring waiting for a node it cannot reach, and
/// the third would be refused by that member on every call, so its join would never finish.
/// The refused node's data dir keeps no record of the join it asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_under_a_members_address_or_an_unreachable_one_is_refused() {
    let cluster = TestCluster::start_with(3, |_| ring_config());
    // The claimant knows the members' ids by gossip.
    all_heard_live(&cluster, &[0, 1, 2]).await;
    let (_held, nowhere) = common::closed_port();
    let own = None;
    let members_id = Some(cluster.addr(1).to_string());
    for (advertise, node_id, refusal) in [
        (
            Some(cluster.addr(1).to_string()),
            own.clone(),
            "already a member",
        ),
        (Some(nowhere), own, "no node answers at"),
        (None, members_id, "already that of member"),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            join: Some(cluster.addr(0).to_string()),
            advertise,
            node_id,
            data_dir: Some(dir.path().to_path_buf()),
            ..ring_config()
        };
        let started = kvstore::server::run(listener, config, std::future::pending());
        let error = tokio::time::timeout(Duration::from_secs(30), started)
            .await
            .expect("refused at once")
            .unwrap_err();
        assert!(error.to_string().contains(refusal), "{error}");
        // No join was begun: a restart without --join must not go on with one.
        assert_eq!(
            kvstore::membership::unfinished_join(dir.path()).unwrap(),
            None,
            "{refusal}"
        );
    }
    let status = cluster.client(2).status().await.unwrap();
    assert_eq!(
        (status.ring_version, status.peers.len()),
        (1, 2),
        "{status:?}"
    );
}

/// A change one member heard of, and the others did not, reaches them by gossip; and a join
/// whose node never comes is called off by removing that node, back to the ring before it,
/// with every write of the meantime kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_spreads_by_gossip_and_a_join_whose_node_is_gone_is_called_off() {
    use kvstore_actors::membership::RingState;
    // No member asks another for its ring in the test's time (each does once per anti-entropy
    // period): only gossip can bring the others the change.
    let cluster = TestCluster::start_with(4, |_| NodeConfig {
        anti_entropy_interval: Duration::from_secs(600),
        ..ring_config()
    });
    const KEYS: usize = 200;
    write_before(&cluster, &[0, 1, 2, 3], KEYS).await;
    let all: Vec<usize> = (0..4).collect();
    let held_before = three_copies_on(&cluster, &all, KEYS).await;
    let first = cluster.replicator(0).await;
    let settled = ring_of(&cluster, 0).await;
    // A joining node whose address nothing answers at: it never copies its partitions.
    let (_held_port, gone) = common::closed_port();
    let pending = (settled.begin(settled.ring().with_joined(&gone).unwrap())).unwrap();
    // Told to the claimant only, as if it had been cut off from the others as it told them.
    let told = first
        .clone()
        .push_ring(kvstore::pb::RingState {
            state: pending.to_bytes(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(RingState::from_bytes(&told.state).unwrap(), pending);
    let started = std::time::Instant::now();
    loop {
        let mut seen = Vec::new();
        for i in 1..4 {
            let status = cluster.client(i).status().await.unwrap();
            seen.push((status.ring_version, status.ring_phase));
        }
        if seen.iter().all(|(v, p)| *v == 2 && p == "pending") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "gossip did not bring the others the pending ring: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Writes go on meanwhile, to the old holders and the gone one's place.
    let mut during = Vec::new();
    for k in 0..50 {
        let key = format!("pending{k}");
        let ack = cluster.client(k % 4).put(&key, "p").await.unwrap();
        assert!(ack.ok, "{key}: {ack:?}");
        during.push((key, "p".to_string()));
    }
    // Another change meanwhile is refused for now, in the claimant's own words: it answered,
    // and is not said to be gone.
    let claimant = pending.claimant().to_owned();
    let asker = (0..4).find(|&i| cluster.addr(i) != claimant).unwrap();
    let busy = cluster.client(asker).leave().await.unwrap_err();
    assert_eq!(busy.code(), Code::Unavailable, "{busy:?}");
    assert!(
        busy.message().starts_with(&format!(
            "the ring's claimant {claimant}: the ring is changing"
        )) && !busy.message().contains("calls that change off"),
        "{busy:?}"
    );
    // Gossip never heard the joining node, and no member reaches it: status says it is down,
    // and how to go on.
    let started = std::time::Instant::now();
    loop {
        let change = cluster.client(asker).status().await.unwrap().ring_change;
        if change.ends_with(&format!("remove {gone} to call it off")) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{change}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Asked of any node: the claimant calls the join off.
    let ack = cluster.client(3).remove(&gone).await.unwrap();
    assert!(ack.ok, "{ack:?}");
    assert!(ack.message.starts_with("Called off the join of"), "{ack:?}");
    change_settles(&cluster, &all, 3, None).await;
    assert_eq!(
        ring_of(&cluster, 2).await.ring(),
        &settled.ring().renumbered(3),
        "back to the ring before"
    );
    let held = three_copies_on(&cluster, &all, KEYS + during.len()).await;
    assert!(
        held.iter().zip(&held_before).all(|(now, then)| now > then),
        "every node keeps its share, and the writes of the meantime: {held_before:?} then {held:?}"
    );
    read_back(&cluster, &all, KEYS, during).await;
    // The node is no member now: removing it again is refused.
    let refused = cluster.client(1).remove(&gone).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
}

/// The ring as node `via` holds it.
async fn ring_of(cluster: &TestCluster, via: usize) -> kvstore_actors::membership::RingState {
    let bytes = (cluster.replicator(via).await)
        .get_ring(kvstore::pb::GetRingRequest {})
        .await
        .unwrap()
        .into_inner();
    kvstore_actors::membership::RingState::from_bytes(&bytes.state).unwrap()
}

/// Waits until each of `nodes` has heard every other live by gossip: gossip calls dead only a
/// node it has heard, so a test that kills one waits for this first.
async fn all_heard_live(cluster: &TestCluster, nodes: &[usize]) {
    for &i in nodes {
        for &of in nodes.iter().filter(|&&of| of != i) {
            gossip_says(cluster, i, of, "live").await;
        }
    }
}

/// A node, other than the claimant, that gains partitions in the pending change `pending`.
fn heir_of(cluster: &TestCluster, pending: &kvstore_actors::membership::RingState) -> usize {
    (pending.gaining().iter())
        .find(|g| **g != pending.claimant())
        .and_then(|g| (0..cluster.nodes.len()).find(|&i| cluster.addr(i) == g))
        .expect("a change has heirs besides the claimant")
}

/// A member taking partitions of a node that leaves dies before it has copied them: removing
/// it calls the leave off, and the ring is back as it was, with every write of the meantime.
/// It is then removed, the other node leaves after all, and every key is on three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_whose_heir_died_is_called_off_and_made_once_the_heir_is_removed() {
    // Each gaining node waits a replication deadline before it copies: the heir dies first.
    let mut cluster = TestCluster::start_with(6, |_| NodeConfig {
        replication_deadline: Duration::from_secs(3),
        ..ring_config()
    });
    const KEYS: usize = 200;
    const LEAVER: usize = 2;
    let all: Vec<usize> = (0..6).collect();
    write_before(&cluster, &all, KEYS).await;
    // Seen live first: gossip calls dead only a node it has heard.
    all_heard_live(&cluster, &all).await;
    let settled = ring_of(&cluster, 0).await;
    let ack = cluster.client(LEAVER).leave().await.unwrap();
    assert!(ack.message.starts_with("Leaving: "), "{ack:?}");
    let pending = ring_of(&cluster, LEAVER).await;
    let heir = heir_of(&cluster, &pending);
    cluster.nodes[heir].kill().await;
    let live: Vec<usize> = all.iter().copied().filter(|&i| i != heir).collect();
    // Writes go on meanwhile, to the old holders and the new ones that are up.
    let mut during = Vec::new();
    for k in 0..40 {
        let key = format!("during{k}");
        let ack = cluster.client(live[k % live.len()]).put(&key, "d").await;
        assert!(ack.as_ref().unwrap().ok, "{key}: {ack:?}");
        during.push((key, "d".to_string()));
    }
    for &i in &live {
        gossip_says(&cluster, i, heir, "dead").await;
    }
    // The claimant counts which nodes have copied (none has: each copies from every member it
    // shares partitions with, the dead heir among them); another node cannot know, and says
    // the claimant counts.
    let claimant = (0..6).find(|&i| cluster.addr(i) == pending.claimant());
    let claimant = claimant.unwrap();
    let change = cluster.client(claimant).status().await.unwrap().ring_change;
    let waits = format!(
        "have copied what the change gives them; this node, the claimant, commits it then; {} \
         is down",
        cluster.addr(heir)
    );
    assert!(change.contains(&waits), "{change}");
    let other = *live.iter().find(|&&i| i != claimant).unwrap();
    let change = cluster.client(other).status().await.unwrap().ring_change;
    assert!(
        change.contains("; pending until the claimant, "),
        "{change}"
    );
    let ack = cluster
        .client(live[3])
        .remove(cluster.addr(heir))
        .await
        .unwrap();
    assert!(
        ack.message.starts_with("Called off the change under way"),
        "{ack:?}"
    );
    change_settles(&cluster, &live, 3, None).await;
    assert_eq!(
        ring_of(&cluster, live[1]).await.ring(),
        &settled.ring().renumbered(3),
        "back to the ring before the leave"
    );
    // Now the heir goes, then the leaver after all.
    let ack = cluster
        .client(LEAVER)
        .remove(cluster.addr(heir))
        .await
        .unwrap();
    assert!(ack.message.starts_with("Removing "), "{ack:?}");
    change_settles(&cluster, &live, 4, None).await;
    let ack = cluster.client(LEAVER).leave().await.unwrap();
    assert!(ack.message.starts_with("Leaving: "), "{ack:?}");
    let stay: Vec<usize> = live.iter().copied().filter(|&i| i != LEAVER).collect();
    change_settles(&cluster, &stay, 5, Some(LEAVER)).await;
    three_copies_on(&cluster, &stay, KEYS + during.len()).await;
    read_back(&cluster, &stay, KEYS, during).await;
}

/// A member that gains nothing in a join (only the joining node does) dies while the join is
/// pending: the join cannot commit without telling it. Removing it calls the join off, the
/// joining node ends holding nothing, and the dead member can then be removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_whose_bystander_died_is_called_off_by_removing_it() {
    // The joining node waits a replication deadline before it copies: the member dies first.
    let config = || NodeConfig {
        replication_deadline: Duration::from_secs(6),
        ..ring_config()
    };
    let mut cluster = TestCluster::start_with(5, |_| config());
    const KEYS: usize = 150;
    let five: Vec<usize> = (0..5).collect();
    write_before(&cluster, &five, KEYS).await;
    all_heard_live(&cluster, &five).await;
    let settled = ring_of(&cluster, 0).await;
    let joiner = cluster.join(config(), 1);
    eventually("the join is pending on every member", || async {
        let mut phases = Vec::new();
        for &i in &five {
            let status = cluster.client(i).status().await.unwrap();
            phases.push((status.ring_version, status.ring_phase));
        }
        (
            phases.iter().all(|(v, p)| *v == 2 && p == "pending"),
            phases,
        )
    })
    .await;
    let pending = ring_of(&cluster, 0).await;
    assert_eq!(pending.gaining(), [cluster.addr(joiner).to_owned()]);
    let bystander = (1..5)
        .find(|&i| cluster.addr(i) != pending.claimant())
        .unwrap();
    cluster.nodes[bystander].kill().await;
    let live: Vec<usize> = five.iter().copied().filter(|&i| i != bystander).collect();
    for &i in &live {
        gossip_says(&cluster, i, bystander, "dead").await;
    }
    assert_eq!(ring_of(&cluster, live[0]).await.phase().name(), "pending");
    let ack = cluster
        .client(live[2])
        .remove(cluster.addr(bystander))
        .await
        .unwrap();
    assert!(
        ack.message.starts_with("Called off the change under way"),
        "{ack:?}"
    );
    change_settles(&cluster, &live, 3, Some(joiner)).await;
    assert_eq!(
        ring_of(&cluster, live[1]).await.ring(),
        &settled.ring().renumbered(3),
        "back to the ring before the join"
    );
    assert_eq!(cluster.client(joiner).status().await.unwrap().keys, 0);
    let ack = cluster
        .client(live[0])
        .remove(cluster.addr(bystander))
        .await
        .unwrap();
    assert!(ack.message.starts_with("Removing "), "{ack:?}");
    change_settles(&cluster, &live, 4, None).await;
    three_copies_on(&cluster, &live, KEYS).await;
    read_back(&cluster, &live, KEYS, Vec::new()).await;
}

/// Two members gone at once: a node being removed, and a member taking its partitions that
/// dies before it copies them. Removing the second calls the first removal off; neither can
/// then be removed alone, since a change needs every other member to answer, and both are
/// removed together in one change, after which every key is on three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_gone_at_once_are_removed_together() {
    // Each gaining node waits a replication deadline before it copies: the heir dies first.
    let mut cluster = TestCluster::start_with(6, |_| NodeConfig {
        replication_deadline: Duration::from_secs(6),
        ..ring_config()
    });
    const KEYS: usize = 200;
    let all: Vec<usize> = (0..6).collect();
    write_before(&cluster, &all, KEYS).await;
    all_heard_live(&cluster, &all).await;
    let settled = ring_of(&cluster, 0).await;
    let first = (0..6)
        .rev()
        .find(|&i| cluster.addr(i) != settled.claimant())
        .unwrap();
    cluster.nodes[first].kill().await;
    let five: Vec<usize> = all.iter().copied().filter(|&i| i != first).collect();
    for &i in &five {
        gossip_says(&cluster, i, first, "dead").await;
    }
    let ack = cluster.client(five[0]).remove(cluster.addr(first)).await;
    assert!(
        ack.as_ref().unwrap().message.starts_with("Removing "),
        "{ack:?}"
    );
    let pending = ring_of(&cluster, five[0]).await;
    let heir = heir_of(&cluster, &pending);
    cluster.nodes[heir].kill().await;
    let live: Vec<usize> = five.iter().copied().filter(|&i| i != heir).collect();
    for &i in &live {
        gossip_says(&cluster, i, heir, "dead").await;
    }
    assert_eq!(ring_of(&cluster, live[0]).await.phase().name(), "pending");
    let ack = cluster.client(live[1]).remove(cluster.addr(heir)).await;
    let message = &ack.as_ref().unwrap().message;
    assert!(
        message.starts_with("Called off the change under way"),
        "{ack:?}"
    );
    // The answer names both members to remove now.
    let next = format!("remove {} {}", cluster.addr(first), cluster.addr(heir));
    let next_other = format!("remove {} {}", cluster.addr(heir), cluster.addr(first));
    assert!(
        message.contains(&next) || message.contains(&next_other),
        "{ack:?}"
    );
    change_settles(&cluster, &live, 3, None).await;
    assert_eq!(
        ring_of(&cluster, live[2]).await.ring(),
        &settled.ring().renumbered(3),
        "back to the ring before the removal"
    );
    // Alone, neither can go: the other does not answer.
    let refused = cluster.client(live[0]).remove(cluster.addr(first)).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains(cluster.addr(heir))
            && refused.message().contains("removed together"),
        "{refused:?}"
    );
    // Named twice, a node is one node.
    let both = [cluster.addr(heir), cluster.addr(heir), cluster.addr(first)];
    let ack = cluster
        .client(live[3])
        .remove_all(cluster.addr(first), &both)
        .await
        .unwrap();
    assert!(
        ack.message.starts_with("Removing ")
            && ack.message.matches(cluster.addr(first)).count() == 1
            && ack.message.matches(cluster.addr(heir)).count() == 1,
        "{ack:?}"
    );
    change_settles(&cluster, &live, 4, None).await;
    let ring = ring_of(&cluster, live[0]).await;
    let mut members: Vec<&str> = live.iter().map(|&i| cluster.addr(i)).collect();
    members.sort_unstable();
    assert_eq!(ring.ring().members(), members);
    three_copies_on(&cluster, &live, KEYS).await;
    read_back(&cluster, &live, KEYS, Vec::new()).await;
}

/// The claimant dies while a leave is pending, before it could commit: only it collects the
/// gaining nodes' READY, so the leave could never finish. Removing it, asked of the node that
/// leaves, goes to the next member that may decide and calls the leave off; it is then removed,
/// the leave is asked again, and every key is on three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_change_whose_claimant_died_is_called_off_by_removing_it() {
    let mut cluster = TestCluster::start_with(5, |_| ring_config());
    const KEYS: usize = 150;
    const CLAIMANT: usize = 0;
    const LEAVER: usize = 4;
    let all: Vec<usize> = (0..5).collect();
    write_before(&cluster, &all, KEYS).await;
    let settled = ring_of(&cluster, 1).await;
    assert_eq!(settled.claimant(), cluster.addr(CLAIMANT));
    // Seen live first: gossip calls dead only a node it has heard.
    for i in 1..5 {
        gossip_says(&cluster, i, CLAIMANT, "live").await;
    }
    cluster.client(LEAVER).leave().await.unwrap();
    // Each gaining node waits a replication deadline before it copies: none has said READY.
    cluster.nodes[CLAIMANT].kill().await;
    let live: Vec<usize> = (1..5).collect();
    for &i in &live {
        gossip_says(&cluster, i, CLAIMANT, "dead").await;
    }
    assert_eq!(ring_of(&cluster, 2).await.phase().name(), "pending");
    // Status says what the change waits for, and how to go on.
    let change = cluster.client(2).status().await.unwrap().ring_change;
    let claimant = cluster.addr(CLAIMANT);
    assert!(
        change.starts_with(&format!(
            "ring version 2: {} leaves; pending until ",
            cluster.addr(LEAVER)
        )) && change.contains(&format!(
            "; {claimant} is down, and the change cannot finish without it"
        )) && change.ends_with(&format!("remove {claimant} to call it off")),
        "{change}"
    );
    // Any other change goes to the dead claimant, and the answer says what to do.
    let stuck = cluster.client(2).leave().await.unwrap_err();
    assert_eq!(stuck.code(), Code::Unavailable, "{stuck:?}");
    assert!(
        stuck
            .message()
            .contains("removing it calls that change off"),
        "{stuck:?}"
    );
    let ack = (cluster.client(LEAVER).remove(cluster.addr(CLAIMANT)).await).unwrap();
    assert!(
        ack.message.starts_with("Called off the change under way"),
        "{ack:?}"
    );
    change_settles(&cluster, &live, 3, None).await;
    assert_eq!(
        ring_of(&cluster, 3).await.ring(),
        &settled.ring().renumbered(3)
    );
    assert_eq!(cluster.client(3).status().await.unwrap().ring_change, "");
    let ack = (cluster.client(2).remove(cluster.addr(CLAIMANT)).await).unwrap();
    assert!(ack.message.starts_with("Removing "), "{ack:?}");
    change_settles(&cluster, &live, 4, None).await;
    cluster.client(LEAVER).leave().await.unwrap();
    let stay = [1, 2, 3];
    change_settles(&cluster, &stay, 5, Some(LEAVER)).await;
    three_copies_on(&cluster, &stay, KEYS).await;
    read_back(&cluster, &stay, KEYS, Vec::new()).await;
}

/// As processes, over real UDP gossip: a fifth node joins four and takes its share; then the
/// claimant is killed, seen down by the others' gossip, and removed by its node id, and every
/// key is on three nodes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_join_a_node_and_remove_a_killed_one() {
    use kvstore_testkit::ProcessCluster;
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--replication-deadline",
        "2s",
        "--anti-entropy-interval",
        "1s",
        "--gossip-interval",
        "400ms",
    ];
    let mut cluster = ring_processes(4, dir.path(), &args).await;
    const KEYS: usize = 120;
    for k in 0..KEYS {
        let ack = cluster.client(k % 4).put(&format!("k{k}"), "v").await;
        assert!(ack.unwrap().ok, "k{k}");
    }
    let status = |cluster: &ProcessCluster, nodes: Vec<usize>| {
        let clients: Vec<_> = nodes.iter().map(|&i| cluster.client(i)).collect();
        async move {
            let mut all = Vec::new();
            for client in clients {
                all.push(client.status().await.ok());
            }
            all
        }
    };
    // Until every node of `nodes` is at `version`, settled, and they hold 3 copies of `keys`.
    let settles = |cluster: &ProcessCluster, nodes: Vec<usize>, version: u64, keys: usize| {
        let ask = status(cluster, nodes);
        async move {
            let seen = ask.await;
            let done = seen.iter().all(|s| {
                s.as_ref()
                    .is_some_and(|s| s.ring_version == version && s.ring_phase == "settled")
            }) && seen.iter().flatten().map(|s| s.keys).sum::<u64>() == 3 * keys as u64;
            (done, seen)
        }
    };
    let new = cluster.join(2).await.unwrap();
    let all: Vec<usize> = (0..5).collect();
    eventually("the join settles", || {
        settles(&cluster, all.clone(), 2, KEYS)
    })
    .await;
    let joined = cluster.client(new).status().await.unwrap();
    assert!(joined.keys > 0 && joined.partitions > 0, "{joined:?}");
    for k in (0..KEYS).step_by(7) {
        let read = cluster.client(new).get(&format!("k{k}")).await;
        assert_eq!(read.unwrap(), "v", "k{k} through the new node");
    }
    // The claimant (the first member in address order) dies; the others see it down by
    // gossip.
    let claimant = (0..5).min_by_key(|&i| cluster.addr(i)).unwrap();
    cluster.kill(claimant);
    let live: Vec<usize> = (0..5).filter(|&i| i != claimant).collect();
    let dead = cluster.addr(claimant);
    eventually("gossip sees the killed node down", || {
        let (ask, live, dead) = (status(&cluster, live.clone()), live.len(), dead.clone());
        async move {
            let verdicts: Vec<String> = (ask.await.iter().flatten())
                .flat_map(|s| s.peers.iter().filter(|p| p.address == dead))
                .map(|p| p.gossip.clone())
                .collect();
            let done = verdicts.len() == live && verdicts.iter().all(|v| v == "dead");
            (done, verdicts)
        }
    })
    .await;
    // Named by its --node-id, which gossip knows the address of.
    let ack = (cluster
        .client(live[2])
        .remove(&format!("node{}", claimant + 1))
        .await)
        .unwrap();
    assert!(ack.ok && ack.message.contains(&dead), "{ack:?}");
    let unknown = cluster.client(live[2]).remove("node99").await.unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument, "{unknown:?}");
    assert!(
        unknown.message().contains("no node named 'node99'"),
        "{unknown:?}"
    );
    // A name no node could have is refused, and not echoed whole.
    let long = format!("{}:5001", "h".repeat(300));
    let refused = cluster.client(live[2]).remove(&long).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("a node name of 305 bytes ('hhhh")
            && refused.message().len() < 300,
        "{refused:?}"
    );
    eventually("the removal settles", || {
        settles(&cluster, live.clone(), 3, KEYS)
    })
    .await;
    let listed = cluster.client(live[0]).list().await.unwrap();
    assert_eq!(listed.len(), KEYS);
    // One more change puts the removed node two ring versions behind, where the members
    // refuse its calls. Restarted on its data dir, it still gets the newest ring, finds it has
    // been removed, and sends a write to the key's holders rather than to the ones it had.
    let leaver = live[3];
    let ack = cluster.client(leaver).leave().await.unwrap();
    assert!(ack.ok, "{ack:?}");
    let stay = live[..3].to_vec();
    eventually("the leave settles", || {
        settles(&cluster, stay.clone(), 4, KEYS)
    })
    .await;
    cluster.restart(claimant).await.unwrap();
    let ack = cluster.client(claimant).put("after", "v").await.unwrap();
    assert_eq!(ack.message, "Stored and replicated", "{ack:?}");
    let back = cluster.client(claimant).status().await.unwrap();
    assert_eq!(
        (back.ring_version, back.ring_state.as_str(), back.keys),
        (4, "left", 0),
        "{back:?}"
    );
    for &i in &stay {
        let read = cluster
            .client(i)
            .get_with("after", Consistency::Quorum)
            .await;
        assert_eq!(read.unwrap().value, "v", "through node {i}");
    }
}

/// A leave whose claimant dies for good between the commit and the settling is settled by the
/// next member, once its gossip sees the claimant dead; the claimant can then be removed, and
/// every key is on three nodes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_claimant_died_after_the_commit_is_settled_by_the_next_member() {
    let mut cluster = TestCluster::start_with(5, |_| ring_config());
    const KEYS: usize = 150;
    let all: Vec<usize> = (0..5).collect();
    write_before(&cluster, &all, KEYS).await;
    three_copies_on(&cluster, &all, KEYS).await;
    // Node 4 leaves; node 0, the claimant (the first member), dies once it has committed and
    // told another member. (Had it told none, the others would still be pending: see
    // a_leave_whose_heir_died_is_called_off_and_made_once_the_heir_is_removed.)
    cluster.client(4).leave().await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let status = cluster.client(1).status().await.unwrap();
        if status.ring_phase == "committed" {
            break;
        }
        assert_eq!(
            status.ring_phase, "pending",
            "the claimant waits a deadline to settle"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never committed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.nodes[0].kill().await;
    let staying = [1, 2, 3];
    change_settles(&cluster, &staying, 2, Some(4)).await;
    let ack = cluster.client(2).remove(cluster.addr(0)).await.unwrap();
    assert!(ack.ok, "{ack:?}");
    change_settles(&cluster, &staying, 3, None).await;
    three_copies_on(&cluster, &staying, KEYS).await;
    read_back(&cluster, &staying, KEYS, Vec::new()).await;
}

/// A ring of no more nodes than copies loses a copy of each key when a node leaves (asked for
/// with force: refused without it), and no node takes a partition it did not hold: the nodes that stay copy from the leaving one, and the
/// change settles. The same for a removal down to one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_and_a_removal_from_a_ring_of_no_more_nodes_than_copies_settle() {
    let mut cluster = TestCluster::start_with(3, |_| ring_config());
    const KEYS: usize = 100;
    write_before(&cluster, &[0, 1, 2], KEYS).await;
    // Two nodes would stay for three copies: refused, unless asked for.
    let refused = cluster.client(2).leave().await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("only 2 nodes would stay")
            && refused.message().contains("leave --force"),
        "{refused:?}"
    );
    assert_eq!(cluster.client(0).status().await.unwrap().ring_version, 1);
    let ack = cluster.client(2).leave_with(true).await.unwrap();
    assert!(
        ack.message
            .contains("hold all 1024 of this node's partitions already"),
        "{ack:?}"
    );
    change_settles(&cluster, &[0, 1], 2, Some(2)).await;
    for i in [0, 1] {
        assert_eq!(cluster.client(i).status().await.unwrap().keys, KEYS as u64);
    }
    read_back(&cluster, &[0, 1], KEYS, Vec::new()).await;
    gossip_says(&cluster, 0, 1, "live").await;
    cluster.nodes[1].kill().await;
    gossip_says(&cluster, 0, 1, "dead").await;
    cluster.client(0).remove(cluster.addr(1)).await.unwrap();
    change_settles(&cluster, &[0], 3, None).await;
    assert_eq!(cluster.client(0).status().await.unwrap().keys, KEYS as u64);
    read_back(&cluster, &[0], KEYS, Vec::new()).await;
    // The last member cannot be removed, and the node that left cannot leave again.
    let refused = cluster.client(0).remove(cluster.addr(0)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().ends_with(&format!(
            "{} is every member that may make a change: the ring cannot remove it",
            cluster.addr(0)
        )),
        "{refused:?}"
    );
    let refused = cluster.client(2).leave().await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("this node is not a member of ring version 3"),
        "{refused:?}"
    );
}

/// With a cluster token, a ring change needs it: a client without it, or with another, can
/// make no node leave nor take one out, and the ring stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_token_only_a_caller_holding_it_changes_the_ring() {
    use kvstore::config::ClusterToken;
    let token = ClusterToken::several(["new", "old"]).unwrap();
    let cluster = TestCluster::start_with(3, |_| NodeConfig {
        cluster_token: Some(token.clone()),
        ..ring_config()
    });
    write_before(&cluster, &[0, 1, 2], 10).await;
    let wrong = ClusterToken::new("guess");
    for sent in [None, Some(&wrong)] {
        let client = cluster.client(2).with_token(sent);
        let refused = client.leave().await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert!(
            refused.message().contains("leave changes the ring")
                && refused.message().contains("--cluster-token-file"),
            "{refused:?}"
        );
        let refused = client.remove(cluster.addr(1)).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert!(refused.message().contains("remove changes"), "{refused:?}");
    }
    for i in 0..3 {
        let status = cluster.client(i).status().await.unwrap();
        assert_eq!(
            (status.ring_version, status.ring_state.as_str()),
            (1, "normal")
        );
    }
    // Any of the tokens the nodes accept will do, not only the one they send.
    let old = ClusterToken::new("old");
    let ack = cluster
        .client(2)
        .with_token(Some(&old))
        .leave_with(true)
        .await
        .unwrap();
    assert!(ack.ok, "{ack:?}");
    change_settles(&cluster, &[0, 1], 2, Some(2)).await;
    read_back(&cluster, &[0, 1], 10, Vec::new()).await;
}

/// A node waiting to join while another change is under way answers a client at once, saying
/// it is joining, rather than leave it to wait out its deadline; once let in, it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waiting_to_join_says_so_to_clients() {
    let mut cluster = TestCluster::start_with(4, |_| ring_config());
    let old: Vec<usize> = (0..4).collect();
    write_before(&cluster, &old, 20).await;
    // A change that stays pending: a join of an address nothing answers at.
    let settled = ring_of(&cluster, 0).await;
    let (_held_port, phantom) = common::closed_port();
    let pending = (settled.begin(settled.ring().with_joined(&phantom).unwrap())).unwrap();
    for i in 0..4 {
        let state = kvstore::pb::RingState {
            state: pending.to_bytes(),
        };
        cluster.replicator(i).await.push_ring(state).await.unwrap();
    }
    let new = cluster.join(ring_config(), 1);
    let quick =
        kvstore::client::Client::new(cluster.addr(new), Duration::from_millis(500)).unwrap();
    let started = std::time::Instant::now();
    let said = loop {
        match quick.get("before0").await {
            Err(e) if e.code() == Code::Unavailable => break e,
            other => assert!(started.elapsed() < Duration::from_secs(30), "{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        said.message().starts_with(&format!(
            "this node is joining the ring through {}",
            cluster.addr(1)
        )),
        "{said:?}"
    );
    let put = quick.put("during", "v").await.unwrap_err();
    assert_eq!(put.code(), Code::Unavailable, "{put:?}");
    // The phantom's join is called off; the waiting node is let in, and serves.
    cluster.client(0).remove(&phantom).await.unwrap();
    while let Err(e) = quick.status().await {
        assert!(started.elapsed() < Duration::from_secs(60), "{e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all: Vec<usize> = (0..5).collect();
    change_settles(&cluster, &all, 4, None).await;
    assert_eq!(cluster.client(new).get("before0").await.unwrap(), "v");
}

/// A member of the new ring down once a change is committed holds the change: every member
/// must hear the commit before reads and writes leave the old ring, so the change cannot be
/// called off, and a removal of that member says so, through the claimant or another member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_down_member_of_a_committed_change_is_refused_and_says_why() {
    let cluster = TestCluster::start_with(4, |_| ring_config());
    let settled = ring_of(&cluster, 0).await;
    let (_held_port, phantom) = common::closed_port();
    let pending = (settled.begin(settled.ring().with_joined(&phantom).unwrap())).unwrap();
    let committed = pending.advance().unwrap();
    for i in 0..4 {
        let state = kvstore::pb::RingState {
            state: committed.to_bytes(),
        };
        cluster.replicator(i).await.push_ring(state).await.unwrap();
    }
    let claimant = (0..4)
        .find(|&i| cluster.addr(i) == committed.claimant())
        .expect("the claimant is a member");
    let other = (claimant + 1) % 4;
    for via in [claimant, other] {
        let refused = cluster.client(via).remove(&phantom).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(
            refused.message().contains(&format!(
                "the change under way (version 2) is committed, and settles once every member \
                 of the new ring has heard, {phantom} included: a committed change cannot be \
                 called off; bring it back"
            )),
            "{refused:?}"
        );
        // The claimant's words, passed on without its code named again.
        assert!(!refused.message().contains("Unavailable"), "{refused:?}");
    }
    for i in 0..4 {
        let status = cluster.client(i).status().await.unwrap();
        assert_eq!(
            (status.ring_version, status.ring_phase.as_str()),
            (2, "committed"),
            "{status:?}"
        );
    }
}

/// A node that stopped while it asked to join, before it recorded the ring it joined (the
/// claimant may have begun the join), goes on joining when started again without --join,
/// rather than start a ring of its own whose writes no member sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_while_it_asked_to_join_goes_on_joining_without_join() {
    let mut cluster = TestCluster::start_with(4, |_| ring_config());
    const KEYS: usize = 100;
    let old: Vec<usize> = (0..4).collect();
    write_before(&cluster, &old, KEYS).await;
    let dir = tempfile::tempdir().unwrap();
    kvstore::membership::record_join(dir.path(), cluster.addr(0)).unwrap();
    let new = cluster.add(NodeConfig {
        data_dir: Some(dir.path().to_path_buf()),
        ..ring_config()
    });
    let all: Vec<usize> = (0..5).collect();
    change_settles(&cluster, &all, 2, None).await;
    three_copies_on(&cluster, &all, KEYS).await;
    assert!(cluster.client(new).status().await.unwrap().keys > 0);
    assert!(
        !dir.path().join(kvstore::membership::JOINING_FILE).exists(),
        "the ring it joined is recorded, and a restart goes on from it"
    );
}

/// Starts a node of `config` on a free port, which must refuse to start at once: its address,
/// and why.
async fn refused_start(config: NodeConfig) -> (std::net::SocketAddr, kvstore::Error) {
    let listener = common::bind_free();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let ran = kvstore::server::run(listener, config, std::future::pending());
    let refused = tokio::time::timeout(Duration::from_secs(20), ran)
        .await
        .expect("refused at once")
        .unwrap_err();
    (addr, refused)
}

/// A node on a --gossip-port of its own, among nodes gossiping on their gRPC ports (the
/// default), is seen live by them, and sees them: each side looks for the other at both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_a_gossip_port_of_its_own_is_seen_live_by_nodes_on_the_default() {
    let own = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = own.local_addr().unwrap().port();
    drop(own);
    let cluster = TestCluster::start_with(3, |i| NodeConfig {
        gossip_port: (i == 2).then_some(port),
        ..ring_config()
    });
    for (via, of) in [(0, 2), (1, 2), (2, 0), (2, 1)] {
        gossip_says(&cluster, via, of, "live").await;
    }
}

/// A member's data dir started under another address is refused: the node would be outside
/// the ring the dir holds, let go of every key the member held, and leave the member missing
/// from the ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_data_dir_started_under_another_address_is_refused() {
    use kvstore_actors::membership::RingState;
    use kvstore_actors::ring::Ring;
    let dir = tempfile::tempdir().unwrap();
    let first = RingState::settled(Ring::bootstrap(["a:1", "b:1", "c:1", "d:1"], 3).unwrap());
    let without = first.begin(first.ring().without("d:1").unwrap()).unwrap();
    let changed = without.advance().unwrap().advance().unwrap();
    kvstore::membership::record(dir.path(), &changed).unwrap();
    kvstore::membership::claim(dir.path(), "c:1", true).unwrap();
    let (me, refused) = refused_start(NodeConfig {
        data_dir: Some(dir.path().to_path_buf()),
        ..ring_config()
    })
    .await;
    assert!(
        refused.to_string().contains(&format!(
            "holds the data of ring member c:1, and this node is {me}: start it as c:1"
        )),
        "{refused}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join(kvstore::membership::MEMBER_FILE)).unwrap(),
        "c:1",
        "the dir is still the member's"
    );
}

/// A node given --join on the data dir of a node that has left is refused, rather than started
/// as the node that left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_again_on_the_data_dir_of_a_node_that_left_is_refused() {
    use kvstore_actors::membership::RingState;
    use kvstore_actors::ring::Ring;
    let dir = tempfile::tempdir().unwrap();
    let first = RingState::settled(Ring::bootstrap(["a:1", "b:1", "c:1"], 3).unwrap());
    let without = first.begin(first.ring().without("c:1").unwrap()).unwrap();
    let left = without.advance().unwrap().advance().unwrap();
    kvstore::membership::record(dir.path(), &left).unwrap();
    let (_, refused) = refused_start(NodeConfig {
        join: Some("a:1".into()),
        data_dir: Some(dir.path().to_path_buf()),
        ..ring_config()
    })
    .await;
    assert!(
        refused.to_string().contains("which this node has left"),
        "{refused}"
    );
}

/// A node started with a peer of another cluster does not take that cluster's ring, nor its
/// keys, when the clusters' names differ: each refuses the other's calls. With the same name
/// (the control), the stray node takes the other cluster's newer ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_name_does_not_take_this_clusters_ring() {
    let named = |name: &str| NodeConfig {
        cluster_name: name.into(),
        ..ring_config()
    };
    let mut cluster = TestCluster::start_with(3, |_| named("a"));
    write_before(&cluster, &[0, 1, 2], 30).await;
    cluster.join(named("a"), 0);
    change_settles(&cluster, &[0, 1, 2, 3], 2, None).await;
    let stray = |name: &str| {
        let listener = common::bind_free();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let config = NodeConfig {
            peers: vec![cluster.addr(0).to_string(), cluster.addr(1).to_string()],
            ..named(name)
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let node = tokio::spawn(kvstore::server::run(listener, config, async {
            let _ = stopped.await;
        }));
        (
            kvstore::client::Client::new(&addr, Duration::from_secs(10)).unwrap(),
            stop,
            node,
        )
    };
    let (same, _stop_same, _same) = stray("a");
    let (other, _stop_other, _other) = stray("b");
    eventually("the stray of the same name takes the newer ring", || {
        let same = same.clone();
        async move {
            let status = same.status().await;
            (
                status.as_ref().is_ok_and(|s| s.ring_version == 2),
                status.map(|s| s.ring_version),
            )
        }
    })
    .await;
    // Each asks a member for its ring at least once per anti-entropy period (1 s here).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = other.status().await.unwrap();
    assert_eq!((status.ring_version, status.keys), (1, 0), "{status:?}");
    // Its status says why its peers are down: they refuse it, and how.
    let refusing = (status.peers.iter())
        .find(|p| p.address == cluster.addr(0))
        .expect("the member it was given");
    assert!(refusing.refuses.contains("cluster 'b'"), "{refusing:?}");
}
