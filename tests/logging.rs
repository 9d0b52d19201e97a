//! What nodes log, read as an operator reads it: every line of a node names the node (nodes
//! sharing a process, as here, or a log, can be told apart), and a line logged while serving a
//! call names the call's method. This binary installs the process's one log subscriber, so it
//! runs alone.

mod common;

use std::time::Duration;

use common::{Printed, TestCluster};

/// Where the subscriber writes: a buffer the test reads.
#[derive(Clone, Default)]
struct Captured(Printed);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Printed;
    fn make_writer(&'a self) -> Printed {
        self.0.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_a_node_logs_names_the_node_and_the_call() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter("kvstore=debug,kvstore_actors=debug")
        .with_ansi(false)
        .with_writer(captured.clone())
        .init();

    let mut cluster = TestCluster::start_with(3, |i| kvstore::NodeConfig {
        node_id: Some(["alpha", "beta", "gamma"][i].into()),
        ..common::patient()
    });
    cluster.settle().await;
    assert!(cluster.client(0).put("k", "v").await.unwrap().ok);
    // A dead peer makes the write path warn, inside the call; the other nodes notice too.
    cluster.nodes[2].kill().await;
    let ack = cluster.client(0).put("k2", "v").await.unwrap();
    assert!(ack.ok && !ack.failed_peers.is_empty(), "{}", ack.message);
    cluster.nodes[0].stop().await.unwrap();
    cluster.nodes[1].stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let text = captured.0.text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 10, "{text}");
    for line in &lines {
        assert!(
            ["node{id=alpha}", "node{id=beta}", "node{id=gamma}"]
                .iter()
                .any(|node| line.contains(node)),
            "a line that names no node: {line}"
        );
    }
    for node in ["alpha", "beta", "gamma"] {
        let started = format!("node{{id={node}}}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&started) && l.contains("node started")),
            "{node} never said it started"
        );
    }
    let in_call = lines
        .iter()
        .find(|l| l.contains("write not replicated to every peer"));
    let in_call = in_call.expect("the write path's warning");
    assert!(
        in_call.contains("node{id=alpha}:rpc{method=/kvstore.v1.KVStore/Put}"),
        "{in_call}"
    );
    // Its actors' tasks carry its name too: the replication actor's peer-down warning.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("node{id=alpha}") && l.contains("peer down")),
        "{text}"
    );
}
