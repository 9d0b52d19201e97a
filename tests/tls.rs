//! TLS: clients with the cluster's CA are served and writes replicate over mutual TLS, and
//! only those with its certificate change the ring; a plaintext client, a client that trusts another CA, and a Replicator caller without the
//! cluster's certificate get nothing and change nothing; `--tls-client-auth require` asks
//! every client for a certificate; the REPL talks TLS; a file that cannot be used stops the
//! node at start, naming its flag and path.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use common::{TestCluster, cli};
use kvstore::client::Client;
use kvstore::config::ServerArgs;
use kvstore::pb::replicator_client::ReplicatorClient;
use kvstore::pb::{DigestRequest, KeyValue, Version, WriteBatch};
use kvstore::tls::ClientAuth;
use kvstore_testkit::tls::{ClusterPki, TestCa};
use tonic::Code;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

const SERVER: &str = env!("CARGO_BIN_EXE_kvstore-server");
const TIMEOUT: Duration = Duration::from_secs(10);

/// A call the TLS layer refused, as the client library words it: a failed handshake or a
/// connection closed on a plaintext preface, never an answer from a handler.
fn refused_by_tls<T: std::fmt::Debug>(call: Result<T, tonic::Status>) {
    let status = call.unwrap_err();
    let transport = [
        Code::Unavailable,
        Code::Unknown,
        Code::Internal,
        Code::Cancelled,
    ];
    assert!(transport.contains(&status.code()), "{status:?}");
    assert!(
        status.metadata().is_empty(),
        "a handler answered: {status:?}"
    );
}

fn tls_cluster(pki: &ClusterPki, client_auth: ClientAuth) -> TestCluster {
    TestCluster::start_with(3, |i| kvstore::NodeConfig {
        tls: Some(pki.node_tls(i, client_auth).unwrap()),
        ..common::patient()
    })
}

fn client(cluster: &TestCluster, i: usize, tls: Option<&ClientTlsConfig>) -> Client {
    Client::with_tls(cluster.addr(i), TIMEOUT, tls).unwrap()
}

/// A client that trusts `ca`, with `identity` (certificate, key) if given.
fn trusting(ca: &Path, identity: Option<(&Path, &Path)>) -> ClientTlsConfig {
    kvstore::tls::client_config(ca, identity).unwrap()
}

/// A write as a peer sends it, versioned now.
fn peer_write(key: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: "forged".into(),
        version: Some(Version {
            hlc: kvstore_actors::clock::now_minus(Duration::ZERO),
            node_id: "intruder".into(),
        }),
        deleted: false,
    }
}

async fn replicator(addr: &str, tls: ClientTlsConfig) -> Result<ReplicatorClient<Channel>, String> {
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    Ok(ReplicatorClient::new(channel))
}

/// `key` is on no node.
async fn absent_everywhere(cluster: &TestCluster, pki: &ClusterPki, key: &str) {
    let tls = pki.client_config().unwrap();
    for i in 0..3 {
        let got = client(cluster, i, Some(&tls)).get(key).await;
        assert_eq!(
            got.unwrap_err().code(),
            Code::NotFound,
            "node {i} has {key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_ca_is_served_and_writes_replicate_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ClusterPki::create(dir.path(), 3).unwrap();
    let cluster = tls_cluster(&pki, ClientAuth::None);

    // The CA alone is enough for a client; the peers replicate with their own certificates.
    let tls = trusting(&pki.ca, None);
    let ack = client(&cluster, 0, Some(&tls))
        .put("name", "Adnan")
        .await
        .unwrap();
    assert!(ack.ok && ack.failed_peers.is_empty(), "{}", ack.message);
    for i in 0..3 {
        let value = client(&cluster, i, Some(&tls)).get("name").await.unwrap();
        assert_eq!(value, "Adnan", "node {i}");
    }

    // In the clear, or trusting another CA: no call gets through.
    let plain = client(&cluster, 0, None).put("name", "plaintext").await;
    refused_by_tls(plain);
    let elsewhere = TestCa::new("another CA").unwrap();
    let other_ca = elsewhere.write(&dir.path().join("other-ca.pem")).unwrap();
    let wrong_ca = trusting(&other_ca, None);
    let mistrusting = client(&cluster, 0, Some(&wrong_ca)).put("name", "x").await;
    refused_by_tls(mistrusting);
    assert_eq!(
        client(&cluster, 0, Some(&tls)).get("name").await.unwrap(),
        "Adnan"
    );

    // A ring change needs a certificate from the CA, as a node's call to another does.
    let leave = client(&cluster, 2, Some(&tls)).leave().await.unwrap_err();
    assert_eq!(leave.code(), Code::Unauthenticated, "{leave:?}");
    assert!(leave.message().contains("certificate"), "{leave:?}");
    let remove = client(&cluster, 0, Some(&tls)).remove("127.0.0.1:1").await;
    assert_eq!(remove.unwrap_err().code(), Code::Unauthenticated);
    let with_certificate = pki.client_config().unwrap();
    let remove = client(&cluster, 0, Some(&with_certificate))
        .remove("127.0.0.1:1")
        .await
        .unwrap_err();
    assert_eq!(remove.code(), Code::FailedPrecondition, "{remove:?}");
    assert!(remove.message().contains("not a member"), "{remove:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replicator_takes_only_callers_with_a_certificate_from_the_clusters_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ClusterPki::create(dir.path(), 3).unwrap();
    let cluster = tls_cluster(&pki, ClientAuth::None);
    let addr = cluster.addr(0);

    // Without a certificate: TLS is set up, and every Replicator call is refused.
    let mut bare = replicator(addr, trusting(&pki.ca, None)).await.unwrap();
    let err = bare.replicate(peer_write("forged")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("--tls-ca"), "{}", err.message());
    let err = bare
        .digest(DigestRequest {
            buckets: 16,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let batch = WriteBatch {
        writes: vec![peer_write("forged")],
    };
    let stream = bare.replicate_stream(futures::stream::iter([batch])).await;
    assert_eq!(stream.unwrap_err().code(), Code::Unauthenticated);

    // With a certificate from another CA: the handshake itself fails.
    let elsewhere = TestCa::new("another CA").unwrap();
    let foreign = elsewhere.issue("impostor", dir.path()).unwrap();
    let impostor = trusting(&pki.ca, Some((&foreign.cert, &foreign.key)));
    match replicator(addr, impostor).await {
        Err(_) => {}
        Ok(mut client) => refused_by_tls(client.replicate(peer_write("forged")).await),
    }
    absent_everywhere(&cluster, &pki, "forged").await;

    // A certificate from the cluster's CA is let in: the refusals above were the certificate's.
    let member = pki.client_config().unwrap();
    let mut member = replicator(addr, member).await.unwrap();
    let ack = member.replicate(peer_write("let-in")).await.unwrap();
    assert!(ack.into_inner().ok);
    let tls = pki.client_config().unwrap();
    assert_eq!(
        client(&cluster, 0, Some(&tls)).get("let-in").await.unwrap(),
        "forged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_require_asks_every_client_for_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ClusterPki::create(dir.path(), 3).unwrap();
    let cluster = tls_cluster(&pki, ClientAuth::Require);

    let bare = trusting(&pki.ca, None);
    let refused = client(&cluster, 0, Some(&bare)).put("k", "v").await;
    refused_by_tls(refused);

    let with_cert = pki.client_config().unwrap();
    let ack = client(&cluster, 0, Some(&with_cert))
        .put("k", "v")
        .await
        .unwrap();
    assert!(ack.ok && ack.failed_peers.is_empty(), "{}", ack.message);
    assert_eq!(
        client(&cluster, 2, Some(&with_cert))
            .get("k")
            .await
            .unwrap(),
        "v"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repl_talks_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ClusterPki::create(dir.path(), 3).unwrap();
    let cluster = tls_cluster(&pki, ClientAuth::Require);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ca, cert, key) = (s(&pki.ca), s(&pki.client.cert), s(&pki.client.key));
    let addr = cluster.addr(0).to_string();
    // The CLI blocks: run it off the runtime that serves the nodes.
    let run = |args: Vec<&str>, stdin: &'static str| {
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli(&args, stdin)
        })
    };

    let tls_args = vec![
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        &addr,
    ];
    let (ok, out, err) = run(tls_args, "put name Adnan\nget name\n").await.unwrap();
    assert!(ok, "{err}");
    assert_eq!(out, "Stored and replicated\nname = Adnan\n");

    // Without its certificate, the node (which requires one) does not answer it.
    let (ok, out, err) = run(vec!["--tls-ca", &ca, &addr], "get name\n")
        .await
        .unwrap();
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("cannot reach node"), "{err}");

    // In the clear to a node serving TLS, the REPL says what it sees and what to do.
    let (ok, _, err) = run(vec![&addr], "get name\n").await.unwrap();
    assert!(!ok && err.contains("give its CA with --tls-ca"), "{err}");

    // And with TLS to a node in the clear.
    let plain = TestCluster::start(1);
    let plain_addr = plain.addr(0).to_string();
    let (ok, _, err) = run(vec!["--tls-ca", &ca, &plain_addr], "get name\n")
        .await
        .unwrap();
    assert!(!ok && err.contains("does not seem to serve TLS"), "{err}");

    // A key without its certificate is refused before anything is sent.
    let (ok, _, err) = run(
        vec!["--tls-ca", &ca, "--tls-key", &key, &addr],
        "get name\n",
    )
    .await
    .unwrap();
    assert!(!ok && err.contains("--tls-cert"), "{err}");
}

fn parse(args: &[&str]) -> Result<kvstore::NodeConfig, String> {
    let argv = ["kvstore-server", "--listen", "127.0.0.1:0"]
        .iter()
        .chain(args);
    let parsed = ServerArgs::try_parse_from(argv).map_err(|e| e.to_string())?;
    parsed
        .into_config()
        .map(|(_, c)| c)
        .map_err(|e| e.to_string())
}

#[test]
fn a_file_that_cannot_be_used_is_named_with_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ClusterPki::create(dir.path(), 2).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ca, cert, key) = (s(&pki.ca), s(&pki.nodes[0].cert), s(&pki.nodes[0].key));
    let other_key = s(&pki.nodes[1].key);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let garbage = s(&garbage);
    let missing = s(&dir.path().join("missing.pem"));

    let good = parse(&["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca]).unwrap();
    assert!(good.tls.unwrap().checks_peers());

    let cases: [(&[&str], &str, &str); 6] = [
        (
            &["--tls-cert", &missing, "--tls-key", &key],
            "--tls-cert",
            &missing,
        ),
        (
            &["--tls-cert", &garbage, "--tls-key", &key],
            "--tls-cert",
            &garbage,
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &garbage],
            "--tls-key",
            &garbage,
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &other_key],
            "--tls-key",
            &other_key,
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &garbage],
            "--tls-ca",
            &garbage,
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &missing],
            "--tls-ca",
            &missing,
        ),
    ];
    for (args, flag, path) in cases {
        let err = parse(args).unwrap_err();
        assert!(err.contains(flag) && err.contains(path), "{args:?}: {err}");
    }
    let err = parse(&["--tls-cert", &cert, "--tls-key", &other_key]).unwrap_err();
    assert!(err.contains("is not the key of the certificate"), "{err}");
    // Halves of a pair, a client-auth rule without a CA, peers without a CA to check them by.
    let err = parse(&["--tls-cert", &cert]).unwrap_err();
    assert!(err.contains("--tls-key"), "{err}");
    let err = parse(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-auth",
        "require",
    ])
    .unwrap_err();
    assert!(err.contains("--tls-ca"), "{err}");
    let err = parse(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--peer",
        "127.0.0.1:9",
    ])
    .unwrap_err();
    assert!(err.contains("needs --tls-ca"), "{err}");
}

#[test]
fn the_server_stops_at_start_on_a_missing_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ClusterPki::create(dir.path(), 1).unwrap();
    let missing = dir.path().join("node1-renamed.pem");
    let out = Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--tls-cert")
        .arg(&missing)
        .arg("--tls-key")
        .arg(&pki.nodes[0].key)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--tls-cert") && stderr.contains(missing.to_str().unwrap()),
        "{stderr}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "it made its data dir before refusing"
    );
}
