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
        NodeId::from_disk(&format!("on-disk-{i}"));
    }
    // Fill the table up to one free id (the node's own id takes one).
    let mut taken = 0;
    while taken < MAX_NODE_IDS - 2 {
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
    assert_eq!(
        taken,
        MAX_NODE_IDS - 1,
        "the node's own id takes one, the refused writes none"
    );
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
    assert_eq!(
        NodeId::from_disk("read-from-a-log").as_str(),
        "read-from-a-log"
    );
}
