//! Clients that try to make a node hold memory or connections forever, as a stranger on the
//! network would: Lists never read, request bodies that never finish, connections opened and
//! left silent. Each is bounded (by the flags `kvstore-server --help` lists under those names),
//! the node's RSS stays within a stated bound, and other clients are served meanwhile.
//!
//! The nodes are real processes, so that their RSS is theirs alone.

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kvstore::client::Client;
use kvstore::pb::kv_store_client::KvStoreClient;
use kvstore::pb::{KeyValue, Version};
use kvstore_testkit::process::{ClusterSpec, ProcessCluster};
use tonic::Code;

const SERVER: &str = env!("CARGO_BIN_EXE_kvstore-server");
const MIB: u64 = 1024 * 1024;

/// The store the List attacks run against: 120k keys with 200-byte values, about 30 MiB of
/// data (in the node, about twice that).
const KEYS: usize = 120_000;

fn value_of(i: usize) -> String {
    format!("{i:07}{}", "v".repeat(193))
}

/// Writes a backup of the test store, for nodes to start from (much faster than Puts).
fn seed_backup(path: &Path) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    // A minute back: a restored write is not from the future of any node's clock.
    let hlc = (now.as_secs() - 60) << 32;
    let mut out = kvstore::backup::Writer::create(path).unwrap();
    for i in 0..KEYS {
        out.add(&KeyValue {
            key: format!("key{i:07}"),
            value: value_of(i),
            version: Some(Version {
                hlc: hlc + i as u64,
                node_id: "seed".into(),
            }),
            deleted: false,
        })
        .unwrap();
    }
    assert_eq!(out.finish().unwrap().entries, KEYS as u64);
}

/// One node on its own, with `args` added.
async fn node(dir: &Path, args: &[&str]) -> ProcessCluster {
    ProcessCluster::start(ClusterSpec {
        server: SERVER.into(),
        nodes: 1,
        root: dir.to_path_buf(),
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        proxied: false,
        tls: None,
        netns: None,
    })
    .await
    .unwrap()
}

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a VmRSS line");
    kib * 1024
}

/// A client of the node's own service, for calls the `Client` does not make the way an
/// attacker would (a List opened and never read).
async fn raw(addr: &str) -> KvStoreClient<tonic::transport::Channel> {
    KvStoreClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// `n` Lists, each on its own connection, whose first message has arrived and which are
/// never read further: each has sent all the flow-control window lets it.
async fn unread_lists(addr: &str, n: usize) -> Vec<(RawClient, tonic::Streaming<KeyValue>)> {
    let mut unread = Vec::new();
    for _ in 0..n {
        let mut list = raw(addr).await;
        let mut stream = list.list(()).await.unwrap().into_inner();
        assert!(stream.message().await.unwrap().is_some());
        unread.push((list, stream));
    }
    unread
}

type RawClient = KvStoreClient<tonic::transport::Channel>;

/// Another client is served: a write, and a read of it.
async fn served(client: &Client, key: &str) {
    let ack = client.put(key, "served").await.unwrap();
    assert!(ack.ok, "{ack:?}");
    assert_eq!(client.get(key).await.unwrap(), "served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_unread_lists_hold_their_keys_not_copies_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("seed.backup");
    seed_backup(&backup);
    let restore = backup.to_str().unwrap();
    let mut cluster = node(&dir.path().join("n"), &["--restore", restore]).await;
    let pid = cluster.pid(0).unwrap();
    let addr = cluster.addr(0);
    let client = cluster.client(0);
    assert_eq!(client.status().await.unwrap().keys, KEYS as u64);
    let before = rss(pid);

    // Twenty Lists, each on its own connection, none ever read. Each has sent all the
    // flow-control window lets it once its first message is here.
    let mut unread = unread_lists(&addr, 20).await;
    // The Lists' tasks have filled their buffers, and hold still.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss(pid);
    eprintln!(
        "RSS {} MiB with 20 unread Lists, from {} MiB",
        during / MIB,
        before / MIB
    );
    let grown = during.saturating_sub(before);
    // A List that copied the store would hold about 30 MiB, and twenty of them 600 MiB. The
    // keys of one are about 3 MiB: twenty, with their buffers and windows, stay within 150 MiB.
    assert!(
        grown < 150 * MIB,
        "20 unread Lists grew the node by {} MiB (from {} MiB)",
        grown / MIB,
        before / MIB
    );

    // Meanwhile, others are served, and a List that reads gets the whole store in order.
    served(&client, "elsewhere").await;
    let pairs = client.list().await.unwrap();
    assert_eq!(pairs.len(), KEYS + 1);
    assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0));
    let fifth = pairs.iter().find(|(key, _)| key == "key0000005");
    assert_eq!(fifth, Some(&("key0000005".to_string(), value_of(5))));

    // A List taken before a write reads what the keys held when it began: overwrite and
    // delete keys it has not reached yet, then read it to the end.
    let (_, mut first) = unread.remove(0);
    for i in [100_000, 110_000] {
        client.put(&format!("key{i:07}"), "later").await.unwrap();
    }
    client.delete(&format!("key{:07}", 115_000)).await.unwrap();
    client.put("key9999999", "new").await.unwrap();
    let mut seen = 1;
    let mut keys = Vec::new();
    while let Some(kv) = first.message().await.unwrap() {
        if kv.key == format!("key{:07}", 110_000) || kv.key == format!("key{:07}", 115_000) {
            keys.push(kv.key.clone());
            assert_eq!(kv.value, value_of(kv.key[3..].parse().unwrap()));
        }
        assert_ne!(kv.key, "key9999999", "written after the List began");
        seen += 1;
    }
    assert_eq!(seen, KEYS);
    assert_eq!(keys.len(), 2);
    drop(unread);
    cluster.stop(0);
}

/// Reads `stream` to its end, which must be the node ending it (RESOURCE_EXHAUSTED): the
/// status's message.
async fn ended_by_the_node(mut stream: tonic::Streaming<KeyValue>, call: &str) -> String {
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the unread {call} ended as if it were complete"),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                return status.message().to_string();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_list_of_big_values_holds_a_window_of_them_not_all() {
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("big.backup");
    // 48 values of 1 MiB (the largest a node takes by default).
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut out = kvstore::backup::Writer::create(&backup).unwrap();
    for i in 0..48 {
        out.add(&KeyValue {
            key: format!("big{i:02}"),
            value: "x".repeat(MIB as usize - 64),
            version: Some(Version {
                hlc: (now.as_secs() - 60) << 32,
                node_id: "seed".into(),
            }),
            deleted: false,
        })
        .unwrap();
    }
    out.finish().unwrap();
    let restore = backup.to_str().unwrap();
    let mut cluster = node(&dir.path().join("n"), &["--restore", restore]).await;
    let pid = cluster.pid(0).unwrap();
    let addr = cluster.addr(0);
    let before = rss(pid);

    let unread = unread_lists(&addr, 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss(pid);
    eprintln!(
        "RSS {} MiB with 10 unread Lists of 1 MiB values, from {} MiB",
        during / MIB,
        before / MIB
    );
    // Each List's buffer is a window of about 1 MiB, and the value being read; one that
    // buffered its 256 next pairs would hold the whole 48 MiB store, 480 MiB for ten.
    let grown = during.saturating_sub(before);
    assert!(grown < 120 * MIB, "grew by {} MiB", grown / MIB);
    served(&cluster.client(0), "elsewhere").await;
    drop(unread);
    cluster.stop(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_past_the_memory_bound_are_refused_and_unread_lists_and_backups_are_ended() {
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("seed.backup");
    seed_backup(&backup);
    let restore = backup.to_str().unwrap();
    // Room for one List of this store (its keys take about 3 MiB, its buffers 2.25), not two.
    let mut cluster = node(
        &dir.path().join("n"),
        &[
            "--restore",
            restore,
            "--max-list-memory",
            &(8 * MIB).to_string(),
            "--list-idle-timeout",
            "3s",
        ],
    )
    .await;
    let addr = cluster.addr(0);
    let client = cluster.client(0);

    let mut holder = raw(&addr).await;
    let mut held = holder.list(()).await.unwrap().into_inner();
    assert!(held.message().await.unwrap().is_some());

    // A second List waits a moment for room, then is refused, naming the bound.
    let refused = raw(&addr).await.list(()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-list-memory"),
        "{}",
        refused.message()
    );
    served(&client, "elsewhere").await;

    // A Backup is a List of every entry, under the same bound.
    let refused = raw(&addr).await.backup(()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-list-memory"),
        "{refused:?}"
    );

    // The unread List is ended once it has waited out --list-idle-timeout, and what it held
    // is free again: a new List is served in full, while the old one is still held open.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pairs = client.list().await.unwrap();
    assert_eq!(pairs.len(), KEYS + 1);
    // Its reader, coming back, gets what was sent before, then why it ended.
    let ended = ended_by_the_node(held, "List").await;
    assert!(ended.contains("--list-idle-timeout"), "{ended}");

    // An unread Backup is ended the same way, and its room freed for one that is read.
    let mut backup = raw(&addr).await;
    let mut unread_backup = backup.backup(()).await.unwrap().into_inner();
    assert!(unread_backup.message().await.unwrap().is_some());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ended = ended_by_the_node(unread_backup, "Backup").await;
    assert!(ended.starts_with("Backup ended"), "{ended}");
    let file = dir.path().join("after.backup");
    let summary = kvstore::backup::write(&client, &file).await.unwrap();
    assert_eq!(summary.entries, KEYS as u64 + 1);
    cluster.stop(0);
}

/// A raw HTTP/2 connection, for what no gRPC library would do: bodies left unfinished.
async fn h2_connection(addr: &str) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send.ready().await.unwrap()
}

fn put_request() -> http::Request<()> {
    http::Request::post("/kvstore.v1.KVStore/Put")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// The grpc-status and grpc-message of a response, from its headers or its trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> (String, String) {
    let response = response.await.unwrap();
    let header = |headers: &http::HeaderMap, name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    if let Some(code) = header(response.headers(), "grpc-status") {
        let message = header(response.headers(), "grpc-message").unwrap_or_default();
        return (code, message);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    (
        header(&trailers, "grpc-status").expect("a grpc-status"),
        header(&trailers, "grpc-message").unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_never_finish_are_bounded_per_connection_and_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = node(
        dir.path(),
        &[
            "--max-concurrent-streams",
            "8",
            "--request-body-timeout",
            "2s",
        ],
    )
    .await;
    let pid = cluster.pid(0).unwrap();
    let addr = cluster.addr(0);
    let client = cluster.client(0);
    served(&client, "warm").await;
    let before = rss(pid);

    // Four connections, each with Puts that declare a 1 MiB message and send all of it but
    // its last byte.
    // A connection that never says anything is closed at the same timeout.
    let silent = TcpStream::connect(&addr).unwrap();
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut send = h2_connection(&addr).await;
        // Advertised in the node's settings, which arrive just after the handshake.
        let settled = Instant::now();
        while send.current_max_send_streams() != 8 && settled.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(send.current_max_send_streams(), 8);
        // As many as the node takes at once on a connection; a client that asked for more
        // would have them refused.
        for _ in 0..8 {
            send = send.ready().await.unwrap();
            let (response, mut body) = send.send_request(put_request(), false).unwrap();
            let mut frame = vec![0u8; 5 + MIB as usize - 1];
            frame[1..5].copy_from_slice(&(MIB as u32).to_be_bytes());
            body.reserve_capacity(frame.len());
            body.send_data(Bytes::from(frame), false).unwrap();
            calls.push((response, body));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = rss(pid);
    eprintln!(
        "RSS {} MiB with 32 hanging bodies, from {} MiB",
        during / MIB,
        before / MIB
    );
    // Others are served while the bodies hang.
    served(&client, "during").await;

    // Each unfinished body fails at the timeout, with a status naming the flag.
    for (response, _body) in calls {
        let answered = tokio::time::timeout(Duration::from_secs(30), grpc_status(response));
        let (code, message) = answered.await.expect("the node gives up on a hanging body");
        assert_eq!(
            code,
            (Code::DeadlineExceeded as i32).to_string(),
            "{message}"
        );
        assert!(message.contains("--request-body-timeout"), "{message}");
    }
    assert!(
        closed(&silent),
        "a silent connection outlived --request-body-timeout"
    );
    // 4 connections x 8 streams x 1 MiB, with room for the buffers on the way. Unbounded,
    // 4 x 50 such Puts grew a node by 240 MiB and held it for as long as they liked.
    let grown = during.saturating_sub(before);
    assert!(grown < 100 * MIB, "grew by {} MiB", grown / MIB);
    served(&client, "after").await;
    cluster.stop(0);
}

/// Whether the node has closed `conn` by now: a read sees the end, or a reset.
fn closed(mut conn: &TcpStream) -> bool {
    conn.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let closed = match conn.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    conn.set_nonblocking(false).unwrap();
    closed
}

/// A unary call on a raw HTTP/2 connection: `Status`, with its empty message.
async fn status_call(send: h2::client::SendRequest<Bytes>) -> (String, String) {
    let mut send = send.ready().await.unwrap();
    let request = http::Request::post("/kvstore.v1.KVStore/Status")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(&[0; 5]), true).unwrap();
    grpc_status(response).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_bounded_closed_when_idle_and_do_not_hold_a_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = node(
        dir.path(),
        &[
            "--max-connections",
            "50",
            "--idle-timeout",
            "3s",
            // Long, so that a stop held by a silent connection would show.
            "--shutdown-grace",
            "60s",
        ],
    )
    .await;
    let addr = cluster.addr(0);
    let client = cluster.client(0);

    // A live client, and sixty connections that say nothing: forty-nine of them are kept,
    // and the eleven past the bound closed.
    let live = h2_connection(&addr).await;
    let silent: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let closed_at_once = silent.iter().filter(|conn| closed(conn)).count();
    assert_eq!(closed_at_once, 11);

    // Past the idle timeout every silent connection has been closed, which frees their room;
    // the live client keeps its connection, as it answers the node's pings.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let still_open = silent.iter().filter(|conn| !closed(conn)).count();
    assert_eq!(still_open, 0);
    served(&client, "after").await;
    assert_eq!(status_call(live).await, ("0".to_string(), String::new()));

    // A silent connection does not hold the stop for the grace (60 s).
    let _held = TcpStream::connect(&addr).unwrap();
    let stopping = Instant::now();
    let status = cluster.stop(0).unwrap();
    assert!(status.success(), "{status:?}");
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(20), "the stop took {took:?}");
}
