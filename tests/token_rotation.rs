//! Replacing the cluster token one node at a time, as an operator would, on real node processes
//! serving mutual TLS: every write acknowledged meanwhile is kept on every node, no node stops
//! taking the others' replication at any step, and at the end the old token opens nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kvstore::client::Client;
use kvstore::pb::DigestRequest;
use kvstore::pb::replicator_client::ReplicatorClient;
use kvstore_testkit::ProcessCluster;
use kvstore_testkit::process::ClusterSpec;
use kvstore_testkit::tls::ClusterPki;
use tonic::Code;
use tonic::transport::Endpoint;

/// Bound on anything that should take a moment: a restarted node's links coming back, the
/// cluster converging.
const PATIENCE: Duration = Duration::from_secs(60);

/// Writes acknowledged after each restart before the next.
const WRITES_PER_STEP: usize = 10;

/// Writes keys round-robin to the nodes until told to stop, counting in `count` those
/// acknowledged; returns them.
async fn write_until(
    clients: Vec<Client>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> BTreeSet<String> {
    let mut acked = BTreeSet::new();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("k{n:05}");
        if let Ok(ack) = clients[n % clients.len()].put(&key, "v").await
            && ack.ok
        {
            acked.insert(key);
            count.fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    acked
}

/// Waits until a write on each node reaches both others: every node's token is taken by every
/// other node.
async fn all_links_open(cluster: &ProcessCluster, step: &str) {
    let started = Instant::now();
    for i in 0..cluster.len() {
        loop {
            let ack = cluster.client(i).put(&format!("probe-{i}"), step).await;
            match ack {
                Ok(ack) if ack.failed_peers.is_empty() => break,
                other => assert!(
                    started.elapsed() < PATIENCE,
                    "{step}: node{} cannot replicate to all its peers: {other:?}",
                    i + 1
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A Digest call to node `i`'s Replicator, as a cluster member (its certificate) with `token`.
async fn digest_with(cluster: &ProcessCluster, pki: &ClusterPki, i: usize, token: &str) -> Code {
    let channel = Endpoint::from_shared(format!("https://{}", cluster.addr(i)))
        .unwrap()
        .tls_config(pki.client_config().unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = tonic::metadata::BinaryMetadataValue::from_bytes(token.as_bytes());
    let mut client =
        ReplicatorClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert_bin(kvstore::peer::TOKEN_HEADER, token.clone());
            Ok(req)
        });
    match client
        .digest(DigestRequest {
            buckets: 16,
            ..Default::default()
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_token_one_node_at_a_time_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ClusterPki::create(&dir.path().join("tls"), 3).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "old-secret\n").unwrap();
    let mut cluster = ProcessCluster::start(ClusterSpec {
        server: env!("CARGO_BIN_EXE_kvstore-server").into(),
        nodes: 3,
        root: dir.path().to_path_buf(),
        extra_args: vec![
            "--cluster-token-file".into(),
            token.display().to_string(),
            "--replication-deadline".into(),
            "10s".into(),
            "--anti-entropy-interval".into(),
            "1s".into(),
        ],
        proxied: true,
        tls: Some(pki.clone()),
        netns: None,
    })
    .await
    .unwrap();
    all_links_open(&cluster, "start").await;

    let stop = Arc::new(AtomicBool::new(false));
    let clients = (0..3).map(|i| cluster.client(i)).collect();
    let count = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_until(clients, stop.clone(), count.clone()));
    // Between two restarts, some writes are acknowledged: the rotation happens under load,
    // however fast the nodes restart.
    let some_writes = |step: &'static str| {
        let (count, from) = (count.clone(), count.load(Ordering::Relaxed));
        async move {
            let started = Instant::now();
            while count.load(Ordering::Relaxed) < from + WRITES_PER_STEP {
                assert!(
                    started.elapsed() < PATIENCE,
                    "{step}: no writes acknowledged"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    // Each node reads the file when it starts: add the new token, send it, drop the old one,
    // a step at a time, each step taken by every node before the next.
    for (step, tokens) in [
        ("add the new token", "old-secret\nnew-secret\n"),
        ("send the new token", "new-secret\nold-secret\n"),
        ("drop the old token", "new-secret\n"),
    ] {
        std::fs::write(&token, tokens).unwrap();
        for i in 0..3 {
            let status = cluster.stop(i);
            assert!(
                status.is_some_and(|s| s.success()),
                "{step}: node{} {status:?}",
                i + 1
            );
            cluster.restart(i).await.unwrap();
            all_links_open(&cluster, step).await;
            some_writes(step).await;
        }
    }

    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(
        acked.len() >= 9 * WRITES_PER_STEP,
        "only {} writes acknowledged",
        acked.len()
    );

    // Every acknowledged write is on every node.
    let started = Instant::now();
    for i in 0..3 {
        loop {
            let held: BTreeSet<String> = (cluster.client(i).list().await.unwrap().into_iter())
                .map(|(key, _)| key)
                .collect();
            let missing: Vec<_> = acked.difference(&held).collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "node{} lacks {} acknowledged writes, e.g. {:?}",
                i + 1,
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // The rotation happened: the old token opens no node's Replicator, the new one does.
    for i in 0..3 {
        assert_eq!(
            digest_with(&cluster, &pki, i, "old-secret").await,
            Code::Unauthenticated
        );
        assert_eq!(digest_with(&cluster, &pki, i, "new-secret").await, Code::Ok);
    }
}
