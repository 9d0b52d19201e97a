//! The bound on distinct node ids. Interned ids live as long as the process, so this test runs
//! alone in its own binary: it fills the table, which would break any test sharing the process.

mod common;

use common::TestCluster;
use kvstore::config::Limits;
use kvstore::pb::{KeyValue, Version};
use kvstore_actors::NodeId;
use kvstore_actors::version::MAX_NODE_IDS;
use tonic::Code;

fn replicate_from(node_id: &str) -> KeyValue {
    KeyValue {
        key: "k".into(),
        value: "v".into(),
        version: Some(Version {
            hlc: 1,
            node_id: node_id.into(),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicate_past_the_node_id_bound_is_resource_exhausted() {
    // A node of our own takes one id: its own.
    let cluster = TestCluster::start(1);
    let mut replicator = cluster.replicator(0).await;
    // Writes refused for their size are refused before their node id is looked at, so they
    // use up none of the bound (counted below).
    let limits = Limits::default();
    let mut big_key = replicate_from("sent-an-oversized-key");
    big_key.key = "k".repeat(limits.max_key_bytes + 1);
    let mut big_value = replicate_from("sent-an-oversized-value");
    big_value.value = "v".repeat(limits.max_value_bytes + 1);
    for kv in [big_key, big_value.clone()] {
        let status = replicator.replicate(kv).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    // Nor does a good write in a batch refused for another write.
    let batch = kvstore::pb::WriteBatch {
        writes: vec![replicate_from("sent-in-a-refused-batch"), big_value],
    };
    let status = replicator.replicate_batch(batch).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Ids loaded from disk do not use up what the network may add.
    for i in 0..100 {
        NodeId::known(&format!("on-disk-{i}"));
    }
    // Fill the table up to one free id (the node's own id does not count: it is known).
    let mut taken = 0;
    while taken < MAX_NODE_IDS - 1 {
        NodeId::new(&format!("node-{taken}")).expect("room for it");
        taken += 1;
    }
    // A batch with two new ids does not fit: it is refused whole, and takes neither.
    let two_new = kvstore::pb::WriteBatch {
        writes: vec![replicate_from("new-a"), replicate_from("new-b")],
    };
    let status = replicator.replicate_batch(two_new).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    while NodeId::new(&format!("node-{taken}")).is_ok() {
        taken += 1;
        assert!(taken <= MAX_NODE_IDS, "the bound did not hold");
    }
    assert_eq!(taken, MAX_NODE_IDS, "the refused writes took none");
    let known = NodeId::new("node-0").unwrap();
    // Ids already known still resolve; a new one is refused with a status naming the bound.
    assert_eq!(NodeId::new("node-0").unwrap(), known);
    assert!(kvstore::wire::checked(replicate_from("node-0")).is_ok());
    let error = kvstore::wire::checked(replicate_from("one-too-many")).unwrap_err();
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("too many distinct node ids"),
        "{status:?}"
    );
    // What a node reads back from its own disk is never refused: a restart must load it all.
    assert_eq!(NodeId::known("read-from-a-log").as_str(), "read-from-a-log");
}

/// The attack, on real processes (each with a table of its own): a stranger fills node 1's
/// allowance of new node ids from one script, before node 1 has heard from node 2. Node 2 then
/// writes through itself. Node 1 learns node 2's id from node 2's own answers, which the
/// allowance does not limit, so the stranger locks no node of the cluster out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_who_fills_the_node_id_table_locks_no_peer_out() {
    use kvstore::pb::WriteBatch;
    use kvstore_testkit::ProcessCluster;
    use kvstore_testkit::process::ClusterSpec;

    let dir = tempfile::tempdir().unwrap();
    let mut c = ProcessCluster::start(ClusterSpec {
        server: env!("CARGO_BIN_EXE_kvstore-server").into(),
        nodes: 2,
        root: dir.path().to_path_buf(),
        extra_args: ["--replication-deadline", "10s"].map(String::from).to_vec(),
        proxied: true,
        tls: None,
        netns: None,
    })
    .await
    .unwrap();
    // Node 1 starts afresh while node 2 is down: it has never heard node 2's id.
    c.kill(1);
    c.restart(0).await.unwrap();
    let mut replicator =
        kvstore::pb::replicator_client::ReplicatorClient::connect(format!("http://{}", c.addr(0)))
            .await
            .unwrap();
    let mut sent = 0;
    let refused = loop {
        let writes = (sent..sent + 4096)
            .map(|i| KeyValue {
                key: format!("junk{i}"),
                value: "v".into(),
                version: Some(Version {
                    hlc: 1,
                    node_id: format!("stranger-{i}"),
                }),
                ..Default::default()
            })
            .collect();
        match replicator.replicate_batch(WriteBatch { writes }).await {
            Ok(_) => sent += 4096,
            Err(status) => break status,
        }
        assert!(sent <= MAX_NODE_IDS + 4096, "the bound did not hold");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // Node 2 comes back and takes writes: node 1 gets them (the first, once it has learnt
    // node 2's id: until then node 2 holds it, and tries again).
    c.restart(1).await.unwrap();
    c.client(1).put("k", "v").await.unwrap();
    let started = std::time::Instant::now();
    while c.client(0).get("k").await.is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "node 1 never took node 2's write"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Once node 2 has delivered what it held, its writes go straight through again.
    loop {
        let ack = c.client(1).put("k2", "v").await.unwrap();
        if ack.message == "Stored and replicated" {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{}",
            ack.message
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
