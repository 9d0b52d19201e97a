//! Clocks that disagree. A version far ahead of every clock would win over every write made
//! after it; a node refuses versions more than `--max-clock-offset` ahead of its own clock, and
//! a node whose clock is that far off from most of its peers takes no writes at all. Nodes
//! here run in one process, one of them with a clock injected to be wrong.

mod common;

use std::time::{Duration, Instant};

use common::TestCluster;
use kvstore::pb::{Consistency, KeyValue, Version, WriteBatch};
use tonic::Code;

const HOUR: i64 = 3600 * 1_000_000_000;

/// Generous: a cluster on a busy machine.
const WAIT: Duration = Duration::from_secs(30);

/// A version time `secs` seconds from now.
fn from_now(secs: i64) -> u64 {
    let now = kvstore_actors::clock::now_minus(Duration::ZERO);
    now.wrapping_add_signed(secs << 32)
}

fn forged(key: &str, value: &str, hlc: u64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
        version: Some(Version {
            hlc,
            node_id: "forger".into(),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_future_version_is_refused_and_overwrites_nothing() {
    let cluster = TestCluster::start(3);
    cluster.settle().await;
    assert!(cluster.client(0).put("k", "before").await.unwrap().ok);
    // Straight to node 1's Replicator, 23 hours ahead: what once won over every later write.
    let mut replicator = cluster.replicator(0).await;
    let status = replicator
        .replicate(forged("k", "forged", from_now(23 * 3600)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let said = status.message();
    assert!(
        said.starts_with("k: its version is 23h ahead") && said.contains("--max-clock-offset"),
        "{said}"
    );
    // In a batch, one such write refuses the batch: nothing of it is taken.
    let batch = WriteBatch {
        writes: vec![
            forged("other", "v", from_now(0)),
            forged("k", "forged", from_now(3600)),
        ],
    };
    let status = replicator.replicate_batch(batch).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    // A client's later Put through another node wins everywhere, as it should.
    assert!(cluster.client(1).put("k", "after").await.unwrap().ok);
    let started = Instant::now();
    loop {
        let mut values = Vec::new();
        for i in 0..3 {
            values.push(cluster.client(i).get("k").await.unwrap());
        }
        if values.iter().all(|v| v == "after") {
            break;
        }
        assert!(started.elapsed() < WAIT, "{values:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let read = cluster.client(0).get_with("k", Consistency::Quorum).await;
    assert_eq!(read.unwrap().value, "after");
    assert!(
        cluster.client(0).get("other").await.is_err(),
        "nothing of the batch"
    );
    // A peer's clock a little ahead, within the bound, is a clock like any other.
    replicator
        .replicate(forged("near", "v", from_now(0) + (1 << 30)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_a_day_fast_takes_no_writes_and_its_peers_name_it() {
    let cluster = TestCluster::start_with(3, |i| kvstore::NodeConfig {
        clock_skew_nanos: if i == 2 { 25 * HOUR } else { 0 },
        ..common::patient()
    });
    // Node 3 learns its peers' clocks on its first exchanges with them, and stops writing.
    let started = Instant::now();
    let refusal = loop {
        let status = cluster.client(2).status().await.unwrap();
        if !status.refusing_writes.is_empty() {
            break status.refusing_writes;
        }
        assert!(started.elapsed() < WAIT, "node 3 never found its clock off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        refusal.contains("1day 1h") && refusal.contains("ahead of 2 of its 2 peers"),
        "{refusal}"
    );
    let status = cluster
        .client(2)
        .put("k", "from the fast node")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("--max-clock-offset"),
        "{status:?}"
    );
    let status = cluster.client(2).delete("k").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // The other nodes go on, and the fast node takes their writes (behind its clock).
    let ack = cluster.client(0).put("k", "v").await.unwrap();
    assert_eq!(ack.message, "Stored and replicated");
    assert_eq!(cluster.client(2).get("k").await.unwrap(), "v");
    assert!(
        cluster
            .client(0)
            .status()
            .await
            .unwrap()
            .refusing_writes
            .is_empty()
    );
    // Each of them names the fast peer's offset in its status, once it has measured it.
    let started = Instant::now();
    loop {
        let status = cluster.client(0).status().await.unwrap();
        let fast = status
            .peers
            .iter()
            .find(|p| p.address == cluster.addr(2))
            .unwrap();
        if let Some(ms) = fast.clock_offset_ms {
            let hours = ms as f64 / 3_600_000.0;
            assert!((24.9..25.1).contains(&hours), "{fast:?}");
            break;
        }
        assert!(started.elapsed() < WAIT, "{fast:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing the fast node holds is ahead of anyone: it never wrote.
    for i in 0..3 {
        let pairs = cluster.client(i).list().await.unwrap();
        assert_eq!(
            pairs,
            [("k".to_string(), "v".to_string())],
            "node {}",
            i + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_slow_refuses_its_peers_writes_until_they_are_due() {
    // Ten minutes slow: every peer's version is ten minutes ahead of its clock.
    let cluster = TestCluster::start_with(3, |i| kvstore::NodeConfig {
        clock_skew_nanos: if i == 2 { -HOUR / 6 } else { 0 },
        ..common::patient()
    });
    let started = Instant::now();
    while cluster
        .client(2)
        .status()
        .await
        .unwrap()
        .refusing_writes
        .is_empty()
    {
        assert!(started.elapsed() < WAIT, "node 3 never found its clock off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A write through a good node meets the quorum; the slow node refuses it, and is named.
    let ack = cluster.client(0).put("k", "v").await.unwrap();
    assert!(ack.ok, "{}", ack.message);
    assert_eq!(ack.failed_peers, [cluster.addr(2)]);
    assert!(
        ack.message.contains("ahead of this node's clock"),
        "{}",
        ack.message
    );
    assert!(cluster.client(2).get("k").await.is_err());
    assert!(cluster.client(1).get("k").await.is_ok());
}
