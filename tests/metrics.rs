//! Metrics: a live node's `GET /metrics`, parsed by the Prometheus project's own OpenMetrics
//! parser (Python's prometheus-client, a strict one), moves with the traffic the node serves;
//! it is served over HTTP/1.1, HTTP/2 and TLS on the node's one port; and the Grafana dashboard
//! shipped in `deploy/grafana` uses only series a node exports.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::TestCluster;
use serde_json::Value;
use tonic::transport::{ClientTlsConfig, Endpoint};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One parsed scrape.
struct Scrape(Value);

impl Scrape {
    /// Runs the parser on `source`: a URL it fetches over HTTP/1.1, or `-` with `text`.
    async fn parse(source: &str, text: Option<String>) -> Self {
        let python = tokio::task::spawn_blocking(common::python::python)
            .await
            .unwrap();
        let mut command = tokio::process::Command::new(&python);
        command
            .arg(root().join("tests/metrics/parse.py"))
            .arg(source)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(text) = text {
            tokio::io::AsyncWriteExt::write_all(&mut stdin, text.as_bytes())
                .await
                .unwrap();
        }
        drop(stdin);
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("the parser did not finish in 60 s")
            .unwrap();
        assert!(
            output.status.success(),
            "the exposition does not parse:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self(serde_json::from_slice(&output.stdout).unwrap())
    }

    async fn of_node(addr: &str) -> Self {
        Self::parse(&format!("http://{addr}/metrics"), None).await
    }

    fn samples(&self) -> &Vec<Value> {
        self.0["samples"].as_array().unwrap()
    }

    /// The value of the sample `name` whose labels include `labels`; several match: their sum.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = (self.samples().iter())
            .filter(|s| s["name"] == name)
            .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
            .map(|s| s["value"].as_f64().unwrap())
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }

    fn names(&self) -> BTreeSet<String> {
        (self.samples().iter())
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Three nodes keeping their data in `dir`.
fn cluster(dir: &Path) -> TestCluster {
    TestCluster::start_with(3, |i| kvstore::NodeConfig {
        data_dir: Some(dir.join(format!("node{i}"))),
        ..common::patient()
    })
}

const PUT: &str = "/kvstore.v1.KVStore/Put";
const GET: &str = "/kvstore.v1.KVStore/Get";
const DELETE: &str = "/kvstore.v1.KVStore/Delete";

/// Puts, gets (some of keys that are not there) and a delete, on node 0.
async fn traffic(cluster: &TestCluster) {
    let client = cluster.client(0);
    for i in 0..20 {
        let ack = client.put(&format!("k{i}"), "v").await.unwrap();
        assert!(ack.ok && ack.failed_peers.is_empty(), "{}", ack.message);
    }
    for i in 0..5 {
        client.get(&format!("k{i}")).await.unwrap();
    }
    for _ in 0..2 {
        client.get("missing").await.unwrap_err();
    }
    client.delete("k0").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_parses_and_its_values_move_with_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster(dir.path());
    cluster.settle().await;
    let before = Scrape::of_node(cluster.addr(0)).await;
    assert_eq!(
        before.0["content_type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    traffic(&cluster).await;
    let after = Scrape::of_node(cluster.addr(0)).await;

    let moved = |name: &str, labels: &[(&str, &str)]| {
        after.get(name, labels) - before.value(name, labels).unwrap_or(0.0)
    };
    let calls = "kvstore_rpc_requests_total";
    assert_eq!(moved(calls, &[("method", PUT), ("code", "OK")]), 20.0);
    assert_eq!(moved(calls, &[("method", GET), ("code", "OK")]), 5.0);
    assert_eq!(moved(calls, &[("method", GET), ("code", "NOT_FOUND")]), 2.0);
    assert_eq!(moved(calls, &[("method", DELETE), ("code", "OK")]), 1.0);
    let put_latency = "kvstore_rpc_duration_seconds_count";
    assert_eq!(moved(put_latency, &[("method", PUT)]), 20.0);
    assert!(after.get("kvstore_rpc_duration_seconds_sum", &[("method", PUT)]) > 0.0);
    // Every Put and the Delete met the quorum.
    assert_eq!(moved("kvstore_writes_total", &[("quorum", "met")]), 21.0);
    assert_eq!(
        after.get("kvstore_writes_total", &[("quorum", "missed")]),
        0.0
    );
    assert_eq!(after.get("kvstore_keys", &[]), 19.0);
    // Three nodes, three copies: every node holds every partition.
    assert_eq!(after.get("kvstore_replicas", &[]), 3.0);
    assert_eq!(after.get("kvstore_partitions", &[]), 1024.0);
    assert_eq!(after.get("kvstore_tombstones", &[]), 1.0);

    // Both peers up, each confirmed every write, nothing outstanding.
    for peer in [cluster.addr(1), cluster.addr(2)] {
        let at = |extra: (&'static str, &'static str)| [("peer", peer), extra];
        assert_eq!(after.get("kvstore_peer_state", &at(("state", "up"))), 1.0);
        assert_eq!(after.get("kvstore_peer_state", &at(("state", "down"))), 0.0);
        let peer_only = [("peer", peer)];
        assert!(moved("kvstore_peer_replicated_writes_total", &peer_only) >= 21.0);
        assert!(moved("kvstore_peer_batches_total", &peer_only) >= 1.0);
        assert_eq!(
            after.get("kvstore_peer_handoff_backlog_writes", &peer_only),
            0.0
        );
        assert_eq!(after.get("kvstore_peer_in_flight_writes", &peer_only), 0.0);
        assert_eq!(
            after.get("kvstore_peer_replication_lag_seconds", &peer_only),
            0.0
        );
        // The rounds each node runs with its peers at start.
        assert!(after.get("kvstore_anti_entropy_rounds_total", &at(("outcome", "ok"))) >= 1.0);
    }

    // The log: every write in a group commit, each acknowledged after an fsync.
    let group_writes = moved("kvstore_log_group_commit_writes_sum", &[]);
    assert_eq!(group_writes, 21.0);
    assert!(moved("kvstore_log_fsync_duration_seconds_count", &[]) >= 1.0);
    assert!(after.get("kvstore_log_size_bytes", &[]) > before.get("kvstore_log_size_bytes", &[]));
    assert_eq!(after.get("kvstore_snapshots_total", &[]), 0.0);

    // The process.
    assert!(after.get("process_resident_memory_bytes", &[]) > 1e6);
    assert!(after.get("process_open_fds", &[]) > 0.0);
    assert!(after.get("process_cpu_seconds_total", &[]) > 0.0);
    assert_eq!(
        after.get("kvstore_info", &[("node_id", cluster.addr(0))]),
        1.0
    );

    // Every family is ours or the process's, and every series stays within bounds: a call to
    // a path the node does not serve is `other`, not a series of its own.
    for family in after.0["families"].as_array().unwrap() {
        let name = family["name"].as_str().unwrap();
        assert!(
            name.starts_with("kvstore_") || name.starts_with("process_"),
            "{name}"
        );
    }
}

/// A GET of `/metrics` over HTTP/2, through a gRPC channel (which is an HTTP/2 client).
async fn scrape_over_http2(addr: &str, tls: Option<ClientTlsConfig>) -> String {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let mut channel = endpoint.connect().await.unwrap();
    let request = http::Request::get(format!("{scheme}://{addr}/metrics"))
        .body(tonic::body::Body::empty())
        .unwrap();
    std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut channel, cx))
        .await
        .unwrap();
    let response = tower_service::Service::call(&mut channel, request)
        .await
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx))
            .await
    {
        if let Ok(data) = frame.unwrap().into_data() {
            text.extend_from_slice(&data);
        }
    }
    String::from_utf8(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_over_http2_and_over_tls_on_the_nodes_port() {
    let plain = TestCluster::start(1);
    let text = scrape_over_http2(plain.addr(0), None).await;
    let scrape = Scrape::parse("-", Some(text)).await;
    assert_eq!(scrape.get("kvstore_keys", &[]), 0.0);

    let dir = tempfile::tempdir().unwrap();
    let pki = kvstore_testkit::tls::ClusterPki::create(dir.path(), 1).unwrap();
    let tls = TestCluster::start_with(1, |i| kvstore::NodeConfig {
        tls: Some(pki.node_tls(i, kvstore::tls::ClientAuth::None).unwrap()),
        ..common::patient()
    });
    let client_tls = kvstore::tls::client_config(&pki.ca, None).unwrap();
    let client =
        kvstore::client::Client::with_tls(tls.addr(0), Duration::from_secs(10), Some(&client_tls));
    client.unwrap().put("k", "v").await.unwrap();
    let text = scrape_over_http2(tls.addr(0), Some(client_tls)).await;
    let scrape = Scrape::parse("-", Some(text)).await;
    assert_eq!(scrape.get("kvstore_keys", &[]), 1.0);
    let puts = [("method", PUT), ("code", "OK")];
    assert_eq!(scrape.get("kvstore_rpc_requests_total", &puts), 1.0);
}

/// Every metric name in `expr`, a PromQL expression: the identifiers of ours and the
/// process's. (The names are all the test needs from the expression; label names and
/// functions are other identifiers.)
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("kvstore_") || word.starts_with("process_"))
        .map(String::from)
        .collect()
}

/// Every `expr` in a Grafana dashboard, wherever it is (panels, rows, template queries).
fn expressions(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("expr" | "definition", Value::String(expr)) => found.push(expr.clone()),
                    _ => expressions(inner, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| expressions(item, found)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_uses_only_series_a_node_exports() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/kvstore.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "kvstore");
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(used.len() >= 20, "the dashboard uses only {used:?}");

    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster(dir.path());
    cluster.settle().await;
    traffic(&cluster).await;
    let exported = Scrape::of_node(cluster.addr(0)).await.names();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses series no node exports: {missing:?}"
    );
}
