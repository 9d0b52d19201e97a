//! The bound on distinct node ids. Interned ids live as long as the process, so this test runs
//! alone in its own binary: it fills the table, which would break any test sharing the process.

use kvstore::pb::{KeyValue, Version};
use kvstore_actors::version::MAX_NODE_IDS;
use kvstore_actors::{NodeId, Write};
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

#[test]
fn a_replicate_past_the_node_id_bound_is_resource_exhausted() {
    let known = NodeId::new("node-0").unwrap();
    for i in 1..MAX_NODE_IDS {
        if NodeId::new(&format!("node-{i}")).is_err() {
            break;
        }
    }
    // Ids already known still resolve; a new one is refused with a status naming the bound.
    assert_eq!(NodeId::new("node-0").unwrap(), known);
    assert!(Write::try_from(replicate_from("node-0")).is_ok());
    let error = Write::try_from(replicate_from("one-too-many")).unwrap_err();
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
