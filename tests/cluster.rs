//! Multi-node tests: real clusters on loopback, driven through the gRPC API, and a node's
//! peer client against scripted peers.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestCluster;
use futures::StreamExt;
use kvstore::config::{Limits, NodeConfig};
use kvstore::pb::replicator_client::ReplicatorClient;
use kvstore::pb::replicator_server::{Replicator, ReplicatorServer};
use kvstore::pb::{
    Ack, Consistency, DigestReply, DigestRequest, Key, KeyValue, PullRequest, Version, WriteBatch,
};
use kvstore::peer::GrpcPeer;
use kvstore_actors::{PeerClient, WriteQuorum};
use tokio::io::AsyncWriteExt;
use tonic::{Code, Request, Response, Status};

/// Upper bound for "this call did not hang": far above any deadline the tests configure.
const NO_HANG: Duration = Duration::from_secs(20);

/// A write as a peer sends it: with a version, made by node "other".
fn versioned(key: &str, value: &str, hlc: u64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
        version: Some(Version {
            hlc,
            node_id: "other".into(),
        }),
        deleted: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_checklist_put_on_one_node_get_and_list_everywhere() {
    let cluster = TestCluster::start(3);
    let ack = cluster.client(0).put("name", "Adnan").await.unwrap();
    assert!(ack.ok);
    assert_eq!(ack.message, "Stored and replicated");
    assert!(ack.failed_peers.is_empty());
    for i in 0..3 {
        assert_eq!(
            cluster.client(i).get("name").await.unwrap(),
            "Adnan",
            "node {i}"
        );
        assert_eq!(
            cluster.client(i).list().await.unwrap(),
            [("name".to_string(), "Adnan".to_string())],
            "node {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_through_each_node_reaches_every_node() {
    let cluster = TestCluster::start(3);
    for i in 0..3 {
        let ack = cluster
            .client(i)
            .put(&format!("from-{i}"), &format!("v{i}"))
            .await
            .unwrap();
        assert_eq!(ack.message, "Stored and replicated");
    }
    let expected: Vec<(String, String)> = (0..3)
        .map(|i| (format!("from-{i}"), format!("v{i}")))
        .collect();
    for i in 0..3 {
        assert_eq!(
            cluster.client(i).list().await.unwrap(),
            expected,
            "node {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_clients_leave_every_node_with_the_same_6400_pairs() {
    let cluster = TestCluster::start(3);
    let mut tasks = Vec::new();
    for c in 0..32 {
        let client = cluster.client(c % 3);
        tasks.push(tokio::spawn(async move {
            for p in 0..200 {
                let ack = client
                    .put(&format!("c{c:02}-k{p:03}"), &format!("value {c} {p}"))
                    .await
                    .unwrap();
                assert!(ack.ok && ack.failed_peers.is_empty(), "{}", ack.message);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let first = cluster.client(0).list().await.unwrap();
    assert_eq!(first.len(), 6400);
    assert!(
        first.windows(2).all(|w| w[0].0 < w[1].0),
        "List is in key order"
    );
    assert_eq!(first[0], ("c00-k000".to_string(), "value 0 0".to_string()));
    for i in 1..3 {
        assert!(
            cluster.client(i).list().await.unwrap() == first,
            "node {i} differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conflicting_puts_through_different_nodes_converge() {
    let cluster = TestCluster::start(3);
    let keys = 20;
    let mut tasks = Vec::new();
    for node in 0..3 {
        for writer in 0..3 {
            let client = cluster.client(node);
            tasks.push(tokio::spawn(async move {
                for round in 0..30 {
                    for k in 0..keys {
                        let value = format!("node{node}-writer{writer}-round{round}");
                        client.put(&format!("key{k}"), &value).await.unwrap();
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let lists: Vec<BTreeMap<String, String>> = futures_lists(&cluster).await;
    assert_eq!(lists[0].len(), keys);
    assert_eq!(lists[0], lists[1]);
    assert_eq!(lists[0], lists[2]);
    // Every surviving value was really written by someone (no corruption, no mixing).
    for value in lists[0].values() {
        assert!(
            value.starts_with("node") && value.contains("-round"),
            "{value}"
        );
    }
}

async fn futures_lists(cluster: &TestCluster) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    for i in 0..cluster.nodes.len() {
        out.push(
            cluster
                .client(i)
                .list()
                .await
                .unwrap()
                .into_iter()
                .collect(),
        );
    }
    out
}

fn with_deadline(deadline: Duration, quorum: WriteQuorum) -> impl Fn(usize) -> NodeConfig {
    move |_| NodeConfig {
        replication_deadline: deadline,
        write_quorum: quorum,
        ..NodeConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_peer_is_named_and_the_quorum_decides_ok() {
    let mut cluster =
        TestCluster::start_with(3, with_deadline(common::PATIENT, WriteQuorum::Majority));
    cluster.client(0).put("before", "1").await.unwrap();
    cluster.nodes[2].kill().await;
    let dead = cluster.addr(2).to_string();

    let ack = tokio::time::timeout(NO_HANG, cluster.client(0).put("k", "v"))
        .await
        .expect("Put hung with a dead peer")
        .unwrap();
    assert!(ack.ok, "2 of 3 meets majority: {}", ack.message);
    assert_eq!(ack.failed_peers, std::slice::from_ref(&dead));
    assert!(
        ack.message.contains(&dead) && ack.message.contains("unreachable"),
        "{}",
        ack.message
    );
    assert!(ack.message.contains("2 of 3"), "{}", ack.message);
    assert_eq!(cluster.client(1).get("k").await.unwrap(), "v");

    // With both peers gone the majority is lost: ok is false, both are named, the write is kept.
    cluster.nodes[1].kill().await;
    let ack = tokio::time::timeout(NO_HANG, cluster.client(0).put("k2", "v2"))
        .await
        .expect("Put hung with two dead peers")
        .unwrap();
    assert!(!ack.ok, "{}", ack.message);
    assert_eq!(ack.failed_peers.len(), 2);
    assert!(ack.message.contains("NOT met"), "{}", ack.message);
    assert_eq!(cluster.client(0).get("k2").await.unwrap(), "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_quorum_all_fails_with_one_peer_down_and_one_succeeds_alone() {
    let mut cluster = TestCluster::start_with(3, |i| NodeConfig {
        replication_deadline: common::PATIENT,
        write_quorum: if i == 0 {
            WriteQuorum::All
        } else {
            WriteQuorum::One
        },
        ..NodeConfig::default()
    });
    cluster.nodes[2].kill().await;
    let ack = cluster.client(0).put("k", "v").await.unwrap();
    assert!(!ack.ok, "all requires node 3: {}", ack.message);
    cluster.nodes[0].kill().await;
    let ack = cluster.client(1).put("k", "w").await.unwrap();
    assert!(ack.ok, "one is this node alone: {}", ack.message);
    assert_eq!(ack.failed_peers.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_peer_times_out_at_the_replication_deadline() {
    // A "peer" that accepts connections and never says a word.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap().to_string();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket);
        }
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = NodeConfig {
        peers: vec![hung_addr.clone()],
        replication_deadline: Duration::from_millis(300),
        ..NodeConfig::default()
    };
    let node = tokio::spawn(kvstore::server::run(
        tokio::net::TcpListener::from_std(listener).unwrap(),
        config,
        async {
            let _ = stopped.await;
        },
    ));
    let client = kvstore::client::Client::new(&addr, Duration::from_secs(10)).unwrap();
    let ack = tokio::time::timeout(NO_HANG, client.put("k", "v"))
        .await
        .expect("Put hung")
        .unwrap();
    assert_eq!(ack.failed_peers, std::slice::from_ref(&hung_addr));
    // Two nodes: the majority is both, so a silent peer means not ok.
    assert!(!ack.ok, "{}", ack.message);
    assert!(
        // The coordinator's deadline and the peer call's own timeout are equal; either may
        // fire first.
        ack.message.contains(&format!("{hung_addr} (timed out")),
        "{}",
        ack.message
    );
    stop.send(()).unwrap();
    node.await.unwrap().unwrap();
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_replicates_and_hides_the_key_everywhere() {
    let cluster = TestCluster::start(3);
    cluster.client(0).put("gone", "soon").await.unwrap();
    cluster.client(0).put("kept", "yes").await.unwrap();
    let ack = cluster.client(1).delete("gone").await.unwrap();
    assert!(ack.ok);
    assert_eq!(ack.message, "Deleted and replicated");
    for i in 0..3 {
        let err = cluster.client(i).get("gone").await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("gone"));
        assert_eq!(
            cluster.client(i).list().await.unwrap(),
            [("kept".to_string(), "yes".to_string())]
        );
    }
    // Putting it again brings it back: delete is ordered like any write, not permanent.
    cluster.client(2).put("gone", "back").await.unwrap();
    assert_eq!(cluster.client(0).get("gone").await.unwrap(), "back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_streams_in_key_order_and_a_slow_reader_does_not_block_writers() {
    let cluster = TestCluster::start(1);
    let client = cluster.client(0);
    for i in (0..3000).rev() {
        client.put(&format!("k{i:05}"), "x").await.unwrap();
    }
    // Open a List and read one pair, then stall: the node must keep taking writes. A 1 KiB
    // HTTP/2 stream window makes the stall real: the node can send only that much ahead, so its
    // List is held up on the stalled reader (the default window would take the whole list).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addr(0)))
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    let mut raw = kvstore::pb::kv_store_client::KvStoreClient::new(channel);
    let mut stream = raw.list(()).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.key, "k00000");
    for i in 0..100 {
        tokio::time::timeout(NO_HANG, client.put(&format!("new{i}"), "y"))
            .await
            .expect("writer blocked by a slow List reader")
            .unwrap();
    }
    // The stalled stream is a snapshot: it sees none of the writes made after it started.
    let mut keys = vec![first.key];
    while let Some(kv) = stream.message().await.unwrap() {
        keys.push(kv.key);
    }
    assert_eq!(keys.len(), 3000);
    assert!(keys.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(client.list().await.unwrap().len(), 3100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_invalid_argument_and_stores_nothing() {
    let cluster = TestCluster::start(3);
    let client = cluster.client(0);
    let limits = Limits::default();

    let err = client.put("", "v").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("empty"), "{}", err.message());
    assert_eq!(
        client.get("").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        client.delete("").await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let long_key = "k".repeat(limits.max_key_bytes + 1);
    let err = client.put(&long_key, "v").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains(&limits.max_key_bytes.to_string()),
        "{}",
        err.message()
    );
    assert!(
        client
            .put(&"k".repeat(limits.max_key_bytes), "v")
            .await
            .unwrap()
            .ok
    );

    let big_value = "v".repeat(limits.max_value_bytes + 1);
    let err = client.put("big", &big_value).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains(&limits.max_value_bytes.to_string()),
        "{}",
        err.message()
    );
    assert!(
        client
            .put("max", &"v".repeat(limits.max_value_bytes))
            .await
            .unwrap()
            .ok
    );

    // Far over every limit: the transport refuses it before buffering, with the code gRPC
    // gives a message over the receive limit, naming the limit.
    let huge = "v".repeat(limits.max_message_bytes() * 2);
    let err = client.put("huge", &huge).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("limit of {} bytes", limits.max_message_bytes())),
        "{}",
        err.message()
    );
    assert!(client.get("huge").await.is_err(), "nothing was stored");

    let err = client.get("missing").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("missing"));

    // Fields that only a replicated write carries are refused on a Put, not ignored.
    let mut raw =
        kvstore::pb::kv_store_client::KvStoreClient::connect(format!("http://{}", cluster.addr(0)))
            .await
            .unwrap();
    let deleted = kvstore::pb::KeyValue {
        key: "deleted".into(),
        value: "v".into(),
        deleted: true,
        ..Default::default()
    };
    let err = raw.put(deleted).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("use Delete"), "{}", err.message());
    let versioned = kvstore::pb::KeyValue {
        key: "versioned".into(),
        value: "v".into(),
        version: Some(kvstore::pb::Version {
            hlc: 1,
            node_id: "elsewhere".into(),
        }),
        ..Default::default()
    };
    let err = raw.put(versioned).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("version"), "{}", err.message());

    // Nothing of the refused writes was stored, anywhere.
    for i in 0..3 {
        let keys: Vec<String> = cluster
            .client(i)
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(
            keys,
            [
                long_key[..limits.max_key_bytes].to_string(),
                "max".to_string()
            ]
        );
    }
}

/// Sends its bytes as they are, as a client with its own idea of a message would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use prost::bytes::Buf;
        let mut bytes = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

/// A unary call to `path` on the node at `addr` whose request message is `bytes`.
async fn raw_call(addr: &str, path: &'static str, bytes: Vec<u8>) -> Result<Vec<u8>, Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let response = grpc.unary(Request::new(bytes), path, RawCodec).await?;
    Ok(response.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_do_not_decode_are_invalid_argument_and_store_nothing() {
    let cluster = TestCluster::start(1);
    let addr = cluster.addr(0);
    for (bytes, what, says) in [
        // Field 1 (the key), two bytes long, which are not UTF-8.
        (
            vec![0x0a, 0x02, 0xff, 0xfe],
            "invalid UTF-8 in a string",
            "UTF-8",
        ),
        // Field 1, five bytes long, of which one came.
        (
            vec![0x0a, 0x05, b'k'],
            "a truncated message",
            "buffer underflow",
        ),
        // Field 1 with wire type 7, which does not exist.
        (vec![0x0f, 0x01], "a bad wire type", "wire type"),
    ] {
        for path in [
            "/kvstore.v1.KVStore/Put",
            "/kvstore.v1.Replicator/Replicate",
        ] {
            let status = raw_call(addr, path, bytes.clone()).await.unwrap_err();
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{what} to {path}: {status:?}"
            );
            assert!(
                status.message().contains(path) && status.message().contains(says),
                "{what} to {path}: {}",
                status.message()
            );
        }
    }
    // A well-formed message through the same path still works.
    let fine = prost::Message::encode_to_vec(&kvstore::pb::KeyValue {
        key: "k".into(),
        value: "v".into(),
        ..Default::default()
    });
    raw_call(addr, "/kvstore.v1.KVStore/Put", fine)
        .await
        .unwrap();
    let keys: Vec<String> = (cluster.client(0).list().await.unwrap().into_iter())
        .map(|p| p.0)
        .collect();
    assert_eq!(keys, ["k"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versionless_replicate_is_refused_not_applied() {
    let cluster = TestCluster::start(1);
    let mut replicator = cluster.replicator(0).await;
    let err = replicator
        .replicate(KeyValue {
            key: "k".into(),
            value: "blind".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("version"), "{}", err.message());
    assert_eq!(
        cluster.client(0).get("k").await.unwrap_err().code(),
        Code::NotFound
    );

    // A versioned one is applied, and an older one after it is not.
    let versioned = |value: &str, hlc: u64| versioned("k", value, hlc);
    replicator.replicate(versioned("new", 200)).await.unwrap();
    replicator.replicate(versioned("old", 100)).await.unwrap();
    assert_eq!(cluster.client(0).get("k").await.unwrap(), "new");

    // Versions no honest node makes are refused: one from the far future would pin the key
    // (tests/clock_skew.rs says more); an oversized node id would not fit the log.
    let err = replicator
        .replicate(versioned("pinned", u64::MAX))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("ahead"), "{}", err.message());
    let mut long_id = versioned("long", 300);
    long_id.version.as_mut().unwrap().node_id = "n".repeat(70_000);
    let err = replicator.replicate(long_id).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("node_id"), "{}", err.message());
    assert_eq!(cluster.client(0).get("k").await.unwrap(), "new");
}

/// A `ReplicateStream` call: where its batches go in, and where their acks come out.
async fn open_stream(
    replicator: &mut ReplicatorClient<tonic::transport::Channel>,
) -> (tokio::sync::mpsc::Sender<WriteBatch>, tonic::Streaming<Ack>) {
    let (batches, rx) = tokio::sync::mpsc::channel(4);
    let acks = replicator
        .replicate_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (batches, acks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_stream_acks_each_batch_and_ends_on_a_refusal_and_at_shutdown() {
    // A grace period far above NO_HANG: a stop that waited for the open stream would show.
    let mut cluster = TestCluster::start_with(1, |_| NodeConfig {
        shutdown_grace: Duration::from_secs(600),
        ..NodeConfig::default()
    });
    let mut replicator = cluster.replicator(0).await;
    let write = |value: &str, hlc: u64| versioned("k", value, hlc);
    let batch = |writes: Vec<KeyValue>| WriteBatch { writes };

    // Each batch gets its own ack, in order; an older version is acked but not applied.
    let (batches, mut acks) = open_stream(&mut replicator).await;
    batches.send(batch(vec![write("new", 200)])).await.unwrap();
    batches.send(batch(vec![write("old", 100)])).await.unwrap();
    let first = acks.message().await.unwrap().unwrap();
    let second = acks.message().await.unwrap().unwrap();
    assert!(first.ok && second.ok);
    assert_eq!(first.message, "applied 1 of 1");
    assert_eq!(second.message, "applied 0 of 1");
    assert_eq!(cluster.client(0).get("k").await.unwrap(), "new");

    // A batch with one bad write is refused whole, and the refusal ends the stream.
    let mut versionless = write("blind", 300);
    versionless.version = None;
    batches
        .send(batch(vec![write("newer", 300), versionless]))
        .await
        .unwrap();
    let err = acks.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("version"), "{}", err.message());
    assert!(matches!(acks.message().await, Ok(None) | Err(_)));
    assert_eq!(cluster.client(0).get("k").await.unwrap(), "new");

    // A stream left open does not hold up a graceful stop: the node ends it.
    let (batches, mut acks) = open_stream(&mut replicator).await;
    batches.send(batch(vec![write("last", 400)])).await.unwrap();
    assert!(acks.message().await.unwrap().unwrap().ok);
    tokio::time::timeout(NO_HANG, cluster.nodes[0].stop())
        .await
        .expect("the stop waited for the open stream")
        .unwrap();
    assert!(matches!(acks.message().await, Ok(None) | Err(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_abandoned_streams_and_vanishing_clients_do_not_hurt_the_node() {
    let cluster = TestCluster::start(3);
    let client = cluster.client(0);
    for i in 0..2000 {
        client
            .put(&format!("k{i}"), &"x".repeat(100))
            .await
            .unwrap();
    }

    // Garbage bytes on the port.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0xff; 4096][..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nxx",
    ] {
        let mut socket = tokio::net::TcpStream::connect(cluster.addr(0))
            .await
            .unwrap();
        let _ = socket.write_all(junk).await;
        drop(socket);
    }
    // Streams abandoned after one message.
    for _ in 0..20 {
        let mut raw = kvstore::pb::kv_store_client::KvStoreClient::connect(format!(
            "http://{}",
            cluster.addr(0)
        ))
        .await
        .unwrap();
        let mut stream = raw.list(()).await.unwrap().into_inner();
        stream.message().await.unwrap().unwrap();
        drop(stream);
    }
    // Clients that give up mid-call.
    for i in 0..20 {
        let c = cluster.client(0);
        let _ = tokio::time::timeout(Duration::from_micros(50), async move {
            c.put(&format!("vanish{i}"), "v").await
        })
        .await;
    }

    // Everyone else is still served, and the data is intact on every node.
    assert!(client.put("after", "ok").await.unwrap().ok);
    for i in 0..3 {
        assert_eq!(cluster.client(i).get("after").await.unwrap(), "ok");
        let n = cluster
            .client(i)
            .list()
            .await
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.starts_with("vanish"))
            .count();
        assert_eq!(n, 2001, "node {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_finishes_and_returns_ok() {
    let mut cluster = TestCluster::start(3);
    cluster.client(0).put("k", "v").await.unwrap();
    for node in &mut cluster.nodes {
        node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_read_returns_the_newest_version_and_repairs_stale_replicas() {
    let cluster = TestCluster::start(3);
    cluster.client(0).put("k", "old").await.unwrap();
    cluster.settle().await;
    // Node 3 alone gets a newer version, as if the write's replication had not happened yet.
    let mut replicator = cluster.replicator(2).await;
    // A quarter of a second ahead of now (within the bound on clocks): newer than anything the
    // cluster wrote.
    let newer = kvstore_actors::clock::now_minus(Duration::ZERO) + (1 << 30);
    replicator
        .replicate(KeyValue {
            key: "k".into(),
            value: "new".into(),
            version: Some(Version {
                hlc: newer,
                node_id: "elsewhere".into(),
            }),
            deleted: false,
        })
        .await
        .unwrap();
    assert_eq!(
        cluster.client(0).get("k").await.unwrap(),
        "old",
        "a local read is local"
    );

    let quorum = cluster
        .client(0)
        .get_with("k", Consistency::Quorum)
        .await
        .unwrap();
    assert_eq!(quorum.value, "new");
    assert_eq!(quorum.version.unwrap().hlc, newer);
    // Node 1 was repaired on the spot; node 2 in the background.
    assert_eq!(cluster.client(0).get("k").await.unwrap(), "new");
    let started = std::time::Instant::now();
    while cluster.client(1).get("k").await.unwrap() != "new" {
        assert!(started.elapsed() < NO_HANG, "node 2 was not repaired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_read_without_a_majority_is_unavailable() {
    let mut cluster =
        TestCluster::start_with(3, with_deadline(common::PATIENT, WriteQuorum::Majority));
    cluster.client(0).put("k", "v").await.unwrap();
    cluster.nodes[1].kill().await;
    assert_eq!(
        cluster
            .client(0)
            .get_with("k", Consistency::Quorum)
            .await
            .unwrap()
            .value,
        "v"
    );
    cluster.nodes[2].kill().await;
    let err = cluster
        .client(0)
        .get_with("k", Consistency::Quorum)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("1 of 3 nodes answered, 2 required"),
        "{}",
        err.message()
    );
    // And which did not, and why.
    for dead in [cluster.addr(1), cluster.addr(2)] {
        assert!(
            err.message().contains(&format!("{dead} (unreachable")),
            "{}",
            err.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_keys_and_each_peers_state_and_backlog() {
    let mut cluster =
        TestCluster::start_with(3, with_deadline(common::PATIENT, WriteQuorum::Majority));
    cluster.client(0).put("a", "1").await.unwrap();
    cluster.client(0).put("b", "2").await.unwrap();
    cluster.client(0).delete("b").await.unwrap();
    cluster.nodes[2].kill().await;
    for i in 0..3 {
        cluster
            .client(0)
            .put(&format!("while-down-{i}"), "v")
            .await
            .unwrap();
    }
    let status = cluster.client(0).status().await.unwrap();
    assert_eq!(status.keys, 4);
    assert_eq!(status.tombstones, 1);
    assert_eq!(status.node_id, cluster.addr(0));
    let peers: BTreeMap<&str, &kvstore::pb::PeerStatus> = status
        .peers
        .iter()
        .map(|p| (p.address.as_str(), p))
        .collect();
    let up = peers[cluster.addr(1)];
    assert_eq!((up.state.as_str(), up.backlog), ("up", 0));
    assert!(up.last_contact_ms.is_some());
    // Six writes, one after another, each confirmed by the live peer; batches can only join
    // writes that wait together, so there are at most as many batches as writes.
    assert_eq!(up.replicated_writes, 6, "{up:?}");
    assert!((1..=6).contains(&up.replicated_batches), "{up:?}");
    let down = peers[cluster.addr(2)];
    assert_eq!((down.state.as_str(), down.backlog), ("down", 3), "{down:?}");
    // Only the three writes made before it died were confirmed.
    assert_eq!(down.replicated_writes, 3, "{down:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_starts_later_is_seen_up_without_any_write() {
    // Node A starts first, its peer's port still closed (and held, so no one else takes it).
    let (late_socket, late) = common::closed_port();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let a_addr = listener.local_addr().unwrap().to_string();
    let config = NodeConfig {
        peers: vec![late.clone()],
        ..NodeConfig::default()
    };
    let a = tokio::spawn(kvstore::server::run(
        tokio::net::TcpListener::from_std(listener).unwrap(),
        config,
        std::future::pending(),
    ));
    let a_client = kvstore::client::Client::new(&a_addr, Duration::from_secs(5)).unwrap();
    // The first round fails: the peer is not there yet, which is not a failure of the peer
    // (it has never been reached), so A says it is waiting for it, not that it is down.
    let started = std::time::Instant::now();
    loop {
        let peer = a_client.status().await.unwrap().peers.remove(0);
        if peer.resync_pending && !peer.resync_in_progress {
            assert_eq!(peer.state, "waiting", "{peer:?}");
            break;
        }
        assert!(started.elapsed() < NO_HANG, "no first round: {peer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Then the peer comes up. No write is made: the retried anti-entropy round finds it, long
    // before the 30 s period would.
    let b_listener = late_socket.listen(1024).unwrap();
    let b = tokio::spawn(kvstore::server::run(
        b_listener,
        NodeConfig {
            peers: vec![a_addr.clone()],
            ..NodeConfig::default()
        },
        std::future::pending(),
    ));
    let started = std::time::Instant::now();
    loop {
        let status = a_client.status().await.unwrap();
        if status.peers[0].state == "up" {
            assert!(!status.peers[0].resync_pending);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            status.peers[0]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.abort();
    b.abort();
}

/// A stand-in for a peer, scripted per test: what its bucket pulls answer, and how it takes
/// replication (what each batch arrived by is recorded).
#[derive(Clone, Default)]
struct ScriptedPeer {
    pull: Vec<KeyValue>,
    /// `Some(n)`: each stream answers `n` batches and then ends, as a peer that restarts does.
    batches_per_stream: Option<usize>,
    received: Arc<Mutex<Vec<&'static str>>>,
    streams: Arc<AtomicUsize>,
}

impl ScriptedPeer {
    /// Serves it on `addr` (a free loopback port if `None`), in a runtime of its own so that
    /// stopping it takes every connection down at once, as a crash would.
    fn serve(self, addr: Option<&str>) -> (String, ScriptedServer) {
        let listener = std::net::TcpListener::bind(addr.unwrap_or("127.0.0.1:0")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let runtime = common::own_runtime();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(ReplicatorServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (addr, ScriptedServer(runtime))
    }

    fn received(&self) -> Vec<&'static str> {
        self.received.lock().unwrap().clone()
    }
}

/// A running scripted peer.
struct ScriptedServer(tokio::runtime::Runtime);

impl ScriptedServer {
    /// Drops every task and socket of the peer, its listener included, and waits until they
    /// are gone.
    async fn stop(self) {
        tokio::task::spawn_blocking(move || self.0.shutdown_timeout(NO_HANG))
            .await
            .unwrap();
    }
}

fn applied() -> Ack {
    Ack {
        ok: true,
        ..Ack::default()
    }
}

#[tonic::async_trait]
impl Replicator for ScriptedPeer {
    async fn replicate(&self, _: Request<KeyValue>) -> Result<Response<Ack>, Status> {
        Err(Status::unimplemented("scripted peer"))
    }

    async fn replicate_batch(&self, _: Request<WriteBatch>) -> Result<Response<Ack>, Status> {
        self.received.lock().unwrap().push("call");
        Ok(Response::new(applied()))
    }

    type ReplicateStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<Ack, Status>> + Send>>;

    async fn replicate_stream(
        &self,
        request: Request<tonic::Streaming<WriteBatch>>,
    ) -> Result<Response<Self::ReplicateStreamStream>, Status> {
        let Some(n) = self.batches_per_stream else {
            return Err(Status::unimplemented("scripted peer"));
        };
        self.streams.fetch_add(1, AtomicOrdering::Relaxed);
        let received = self.received.clone();
        let acks = request.into_inner().take(n).map(move |batch| {
            batch?;
            received.lock().unwrap().push("stream");
            Ok(applied())
        });
        Ok(Response::new(Box::pin(acks)))
    }

    async fn digest(&self, _: Request<DigestRequest>) -> Result<Response<DigestReply>, Status> {
        Err(Status::unimplemented("scripted peer"))
    }

    type PullStream = tokio_stream::Iter<std::vec::IntoIter<Result<KeyValue, Status>>>;

    async fn pull(&self, _: Request<PullRequest>) -> Result<Response<Self::PullStream>, Status> {
        let entries: Vec<_> = self.pull.iter().cloned().map(Ok).collect();
        Ok(Response::new(tokio_stream::iter(entries)))
    }

    type ScanStream = tokio_stream::Empty<Result<KeyValue, Status>>;

    async fn scan(
        &self,
        _: Request<kvstore::pb::ScanRequest>,
    ) -> Result<Response<Self::ScanStream>, Status> {
        Err(Status::unimplemented("scripted peer"))
    }

    async fn get_ring(
        &self,
        _: Request<kvstore::pb::GetRingRequest>,
    ) -> Result<Response<kvstore::pb::RingState>, Status> {
        Err(Status::unimplemented("scripted peer"))
    }

    async fn push_ring(
        &self,
        _: Request<kvstore::pb::RingState>,
    ) -> Result<Response<kvstore::pb::RingState>, Status> {
        Err(Status::unimplemented("scripted peer"))
    }

    async fn change_ring(
        &self,
        _: Request<kvstore::pb::RingChange>,
    ) -> Result<Response<kvstore::pb::RingState>, Status> {
        Err(Status::unimplemented("scripted peer"))
    }

    async fn read(&self, _: Request<Key>) -> Result<Response<KeyValue>, Status> {
        Err(Status::unimplemented("scripted peer"))
    }
}

fn peer_write(key: &str, value: &str, deleted: bool) -> KeyValue {
    KeyValue {
        deleted,
        ..versioned(key, value, 100)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_pull_skips_an_entry_it_cannot_take_and_keeps_the_rest() {
    // The middle one is a tombstone with a value, which no node may take.
    let scripted = ScriptedPeer {
        pull: vec![
            peer_write("a", "1", false),
            peer_write("b", "ghost", true),
            peer_write("c", "", true),
        ],
        ..ScriptedPeer::default()
    };
    let (addr, server) = scripted.serve(None);
    let peer = GrpcPeer::new(&addr, &tester()).unwrap();
    let pulled = async {
        let stream = peer
            .pull(16, vec![0], &kvstore_actors::placement::PartitionSet::all())
            .await?;
        futures::TryStreamExt::try_collect::<Vec<_>>(stream).await
    };
    let pulled = tokio::time::timeout(NO_HANG, pulled)
        .await
        .expect("the pull hung")
        .expect("one bad entry failed the whole pull");
    let got: Vec<(&str, Option<&str>)> = pulled
        .iter()
        .map(|w| (w.key.as_str(), w.entry.value.as_deref()))
        .collect();
    assert_eq!(got, [("a", Some("1")), ("c", None)]);
    server.stop().await;
}

/// Peer-link settings of a node called "tester".
fn tester() -> kvstore::peer::PeerSettings {
    kvstore::peer::PeerSettings {
        node_id: "tester".into(),
        token: None,
        ring: Default::default(),
        cluster: kvstore::config::DEFAULT_CLUSTER_NAME.into(),
        connect_timeout: NO_HANG,
        call_timeout: NO_HANG,
        max_message_bytes: 4 << 20,
        clock: std::sync::Arc::new(kvstore_actors::Clock::new(
            kvstore_actors::NodeId::new("tester").unwrap(),
        )),
        tls: None,
    }
}

/// Writes as a replication actor hands them to its peer client.
fn writes(key: &str) -> Vec<kvstore_actors::Write> {
    vec![kvstore::wire::checked(peer_write(key, "v", false)).unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_stream_the_peer_ended_is_replaced_without_failing_a_batch() {
    // Every stream ends after one batch, as when the peer restarts between two batches: the
    // next batch finds the old stream dead and must go out on a new one, not fail.
    let scripted = ScriptedPeer {
        batches_per_stream: Some(1),
        ..ScriptedPeer::default()
    };
    let (addr, server) = scripted.clone().serve(None);
    let peer = GrpcPeer::new(&addr, &tester()).unwrap();
    for key in ["a", "b", "c"] {
        peer.replicate(&writes(key)).await.unwrap();
    }
    assert_eq!(scripted.received(), ["stream", "stream", "stream"]);
    assert_eq!(scripted.streams.load(AtomicOrdering::Relaxed), 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reached_as_its_own_peer_is_refused_not_counted() {
    // `localhost:PORT` passes the start-up check against `127.0.0.1:PORT`, and reaches this
    // very node: its "confirmation" would make one copy look like two.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let alias = format!("localhost:{}", addr.port());
    let config = NodeConfig {
        peers: vec![alias.clone()],
        ..common::patient()
    };
    let node = tokio::spawn(kvstore::server::run(
        tokio::net::TcpListener::from_std(listener).unwrap(),
        config,
        std::future::pending(),
    ));
    let client = kvstore::client::Client::new(&addr.to_string(), NO_HANG).unwrap();
    let ack = client.put("k", "v").await.unwrap();
    // Majority of two nodes is both; only one machine holds the write.
    assert!(!ack.ok, "{}", ack.message);
    assert_eq!(ack.failed_peers, [alias]);
    assert!(
        ack.message.contains("this node's own"),
        "the refusal says why: {}",
        ack.message
    );
    node.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sharing_an_id_do_not_count_each_other() {
    let cluster = TestCluster::start_with(3, |i| NodeConfig {
        node_id: Some(if i < 2 { "twin" } else { "other" }.into()),
        ..common::patient()
    });
    let ack = cluster.client(0).put("k", "v").await.unwrap();
    // Node 3 confirms; node 2, with node 1's id, refuses.
    assert!(ack.ok, "2 of 3 still meets majority: {}", ack.message);
    assert_eq!(ack.failed_peers, [cluster.addr(1).to_string()]);
    assert!(ack.message.contains("share the id"), "{}", ack.message);
    // A distinct id is served as before.
    let ack = cluster.client(2).put("k2", "v").await.unwrap();
    assert!(ack.ok && ack.failed_peers.is_empty(), "{}", ack.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_token_only_the_clusters_nodes_may_replicate() {
    use kvstore::config::ClusterToken;
    // Nodes 1 and 2 share the token; node 3 was given another.
    let cluster = TestCluster::start_with(3, |i| NodeConfig {
        cluster_token: Some(ClusterToken::new(if i < 2 { "s3cret" } else { "other" })),
        ..common::patient()
    });
    // Client calls need no token; node 3 refuses the replication, and is named.
    let ack = cluster.client(0).put("k", "v").await.unwrap();
    assert!(ack.ok, "2 of 3 meets majority: {}", ack.message);
    assert_eq!(ack.failed_peers, [cluster.addr(2).to_string()]);
    assert!(ack.message.contains("cluster's token"), "{}", ack.message);
    assert_eq!(cluster.client(1).get("k").await.unwrap(), "v");
    assert_eq!(
        cluster.client(2).get("k").await.unwrap_err().code(),
        Code::NotFound
    );
    // A caller without the token can neither write in nor read out.
    let mut raw = cluster.replicator(0).await;
    let now = kvstore_actors::clock::now_minus(Duration::ZERO);
    let err = raw
        .replicate(versioned("forged", "x", now))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = raw
        .digest(DigestRequest {
            buckets: 16,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = raw
        .pull(PullRequest {
            buckets: 16,
            which: vec![0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let batch = WriteBatch {
        writes: vec![versioned("forged", "x", now)],
    };
    let err = raw
        .replicate_stream(futures::stream::iter([batch]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(
        cluster.client(0).get("forged").await.unwrap_err().code(),
        Code::NotFound
    );
}
