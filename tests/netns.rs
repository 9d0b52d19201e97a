//! Nodes on separate hosts with a real network between them: each node in a network namespace
//! of its own, listening on its own address, joined by veth pairs on a bridge
//! (`kvstore_testkit::netns`). Partitions are nftables rules and links set down; latency is
//! the test kit's proxy between the namespaces (this kernel has no netem qdisc), and loss an
//! nftables rule (`numgen random mod 100 < 1 drop`). Through all of it, writes acknowledged by
//! a quorum survive, and every node converges once the network heals.
//!
//! These need root (namespaces, links, nftables): `cargo test --test netns --
//! --include-ignored` as root, as CI runs them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore::client::Client;
use kvstore_testkit::chaos::{self, ChaosConfig};
use kvstore_testkit::netns::Topology;
use kvstore_testkit::process::{ClusterSpec, NETNS_PORT, ProcessCluster};

const SERVER: &str = env!("CARGO_BIN_EXE_kvstore-server");
/// How long a healed cluster gets to agree.
const CONVERGE: Duration = Duration::from_secs(90);

async fn cluster(dir: &Path, hosts: &Arc<Topology>, proxied: bool) -> ProcessCluster {
    ProcessCluster::start(ClusterSpec {
        server: SERVER.into(),
        nodes: hosts.len(),
        root: dir.to_path_buf(),
        extra_args: [
            "--replication-deadline",
            "1s",
            "--anti-entropy-interval",
            "1s",
            "--peer-connect-timeout",
            "500ms",
        ]
        .map(String::from)
        .to_vec(),
        proxied,
        tls: None,
        netns: Some(hosts.clone()),
    })
    .await
    .unwrap()
}

/// Waits until every node lists the same pairs, and returns them.
async fn converged(cluster: &ProcessCluster) -> BTreeMap<String, String> {
    let started = Instant::now();
    loop {
        let mut lists = Vec::new();
        for i in 0..cluster.len() {
            lists.push(cluster.client(i).list().await.ok());
        }
        if let Some(Some(first)) = lists.first()
            && lists.iter().all(|l| l.as_ref() == Some(first))
        {
            return first.iter().cloned().collect();
        }
        assert!(
            started.elapsed() < CONVERGE,
            "the nodes did not converge within {CONVERGE:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Puts `key`=`key` through `client`; whether the write quorum acknowledged it.
async fn put(client: &Client, key: &str) -> bool {
    client.put(key, key).await.is_ok_and(|ack| ack.ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth pairs and nftables"]
async fn partitions_and_a_pulled_cable_heal_with_no_acked_write_lost() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = Arc::new(Topology::create(3).unwrap());
    let cluster = cluster(dir.path(), &hosts, false).await;
    for i in 0..3 {
        // Each node on its own host's address, not loopback.
        let own = SocketAddr::new(hosts.addr(i).into(), NETNS_PORT);
        assert_eq!(cluster.addr(i), own.to_string());
    }
    let ack = cluster.client(0).put("hello", "hello").await.unwrap();
    assert_eq!(ack.message, "Stored and replicated");
    let mut acked = vec!["hello".to_string()];

    // Node 3 cut off from its peers (clients still reach it): the majority goes on taking
    // writes; node 3 keeps what it is given, without a quorum.
    cluster.isolate(2).unwrap();
    for n in 0..20 {
        let key = format!("majority{n:02}");
        assert!(put(&cluster.client(n % 2), &key).await, "{key}");
        acked.push(key);
    }
    for n in 0..5 {
        assert!(!put(&cluster.client(2), &format!("minority{n}")).await);
    }
    cluster.heal().unwrap();
    let healed = converged(&cluster).await;
    for key in &acked {
        assert_eq!(healed.get(key), Some(key), "{key} after the first heal");
    }
    assert!((0..5).all(|n| healed.contains_key(&format!("minority{n}"))));

    // Node 2's cable pulled: clients lose it too; the others go on, and it catches up.
    hosts.set_link(1, false).unwrap();
    assert!(cluster.client(1).status().await.is_err());
    for n in 0..10 {
        let key = format!("cable{n}");
        assert!(put(&cluster.client(0), &key).await, "{key}");
        acked.push(key);
    }
    hosts.set_link(1, true).unwrap();
    let healed = converged(&cluster).await;
    for key in &acked {
        assert_eq!(healed.get(key), Some(key), "{key} with the link back up");
    }

    // Every node alone: no majority anywhere, so no write is acknowledged, but each is kept,
    // and a key written on every side ends with one value everywhere.
    hosts.partition(&[&[0], &[1], &[2]]).unwrap();
    for i in 0..3 {
        let client = cluster.client(i);
        assert!(!put(&client, &format!("alone{i}")).await);
        let ack = client.put("contested", &format!("node{i}")).await.unwrap();
        assert!(!ack.ok, "{ack:?}");
    }
    hosts.heal().unwrap();
    let healed = converged(&cluster).await;
    for key in &acked {
        assert_eq!(healed.get(key), Some(key), "{key} after the second heal");
    }
    assert!((0..3).all(|i| healed.contains_key(&format!("alone{i}"))));
    assert!(healed["contested"].starts_with("node"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth pairs and nftables"]
async fn latency_and_loss_between_hosts_lose_no_acked_write() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = Arc::new(Topology::create(3).unwrap());
    let cluster = cluster(dir.path(), &hosts, true).await;
    // 20 ms +- 5 ms each way on every link between nodes (the proxies on the bridge), and
    // 1 % of every host's packets dropped (nftables).
    cluster.set_delay(Some((Duration::from_millis(20), Duration::from_millis(5))));
    hosts.set_loss(1).unwrap();
    eprintln!("delay: test kit proxy between namespaces; loss: nftables numgen rule");

    let mut acked = Vec::new();
    let mut fastest = Duration::MAX;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let client = cluster.client(w % 3);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                let mut fastest = Duration::MAX;
                for n in 0..40 {
                    let key = format!("w{w}-{n:02}");
                    let started = Instant::now();
                    if put(&client, &key).await {
                        fastest = fastest.min(started.elapsed());
                        mine.push(key);
                    }
                }
                (mine, fastest)
            })
        })
        .collect();
    for writer in writers {
        let (mine, quickest) = writer.await.unwrap();
        acked.extend(mine);
        fastest = fastest.min(quickest);
    }
    // The network is what it says: a write waits for its peers, at least one round trip
    // through the delayed links (15 ms each way at the least).
    assert!(
        fastest >= Duration::from_millis(30),
        "fastest ack {fastest:?}"
    );
    assert!(
        acked.len() >= 80,
        "only {} of 160 writes acknowledged",
        acked.len()
    );

    let converged_under_loss = converged(&cluster).await;
    for key in &acked {
        assert_eq!(converged_under_loss.get(key), Some(key), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth pairs and nftables"]
async fn a_chaos_run_between_hosts_finds_no_violation() {
    let dir = tempfile::tempdir().unwrap();
    let report = chaos::run(ChaosConfig {
        server: SERVER.into(),
        seconds: 10,
        seed: 20_261_206,
        clients: 6,
        root: dir.path().to_path_buf(),
        netns: true,
        ring: false,
    })
    .await
    .unwrap();
    println!("{report}");
    assert!(report.violations.is_empty(), "{report}");
    assert!(report.events[0].contains("network namespaces"), "{report}");
    let faults = (report.events.iter())
        .filter(|e| e.contains("kill -9") || e.contains("partition") || e.contains("link down"))
        .count();
    assert!(faults >= 2, "the schedule injected faults: {report}");
    assert!(report.acked > 0, "the workload made progress: {report}");
}

/// A ring between hosts: joins and leaves among kills, partitions (nftables) and links set
/// down, with loss on the network; nothing acknowledged is lost and every key ends on three
/// members that agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth pairs and nftables"]
async fn a_ring_chaos_run_between_hosts_finds_no_violation() {
    let dir = tempfile::tempdir().unwrap();
    let report = chaos::run(ChaosConfig {
        server: SERVER.into(),
        seconds: 15,
        seed: 20_261_207,
        clients: 4,
        root: dir.path().to_path_buf(),
        netns: true,
        ring: true,
    })
    .await
    .unwrap();
    println!("{report}");
    assert!(report.violations.is_empty(), "{report}");
    assert!(report.ring_changes() >= 1, "the ring changed: {report}");
    assert!(report.acked > 0, "the workload made progress: {report}");
}
