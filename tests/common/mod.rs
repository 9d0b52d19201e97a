//! Test clusters: real nodes on free loopback ports, each in its own tokio runtime so a test can
//! stop one gracefully or kill it outright (dropping its runtime drops every task and socket at
//! once, as a crash would).

#![allow(dead_code)]

pub mod python;

use std::time::Duration;

use kvstore::client::Client;
use kvstore::config::NodeConfig;
use tokio::sync::oneshot;

/// How long a test's writes wait for their peers, unless the test is about that wait: far
/// beyond what a busy machine needs, and free where a peer is dead, since a dead peer refuses
/// the connection at once. A short deadline would make "every peer confirmed" depend on the
/// machine's load.
pub const PATIENT: Duration = Duration::from_secs(10);

/// How often the nodes of a test that waits for a stopped node to be seen down gossip: it
/// is after about eight intervals of silence, and a busy machine must not make a live node
/// that silent.
pub const GOSSIP: Duration = Duration::from_millis(400);

/// Runs `kvstore-cli args...` with `stdin` piped in; returns (success, stdout, stderr).
pub fn cli(args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvstore-cli"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // A CLI that refuses its arguments exits without reading its input: what it printed says
    // why, so a closed pipe is not the test's failure.
    match input.write_all(stdin.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other.unwrap(),
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Default settings, with a [`PATIENT`] replication deadline.
pub fn patient() -> NodeConfig {
    NodeConfig {
        replication_deadline: PATIENT,
        ..NodeConfig::default()
    }
}

/// A loopback port that refuses connections: bound, so no one else can take it, but not
/// listening until `listen` is called on the socket (to bring a "dead" peer to life).
pub fn closed_port() -> (tokio::net::TcpSocket, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap().to_string();
    (socket, addr)
}

/// A loopback listener on a port the OS chose, whose number is free for UDP too: a node
/// gossips on its gRPC port's number, and refuses to start if that is taken.
pub fn bind_free() -> std::net::TcpListener {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        if std::net::UdpSocket::bind(listener.local_addr().unwrap()).is_ok() {
            return listener;
        }
    }
}

/// One node of a test cluster.
pub struct TestNode {
    pub addr: String,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<Result<(), String>>>,
}

/// A runtime for one server of a test: dropping it drops every task and socket of that server
/// at once.
pub fn own_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

impl TestNode {
    fn start(listener: std::net::TcpListener, config: NodeConfig) -> Self {
        let addr = listener.local_addr().unwrap().to_string();
        let runtime = own_runtime();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let result = kvstore::server::run(listener, config, async {
                let _ = stop_rx.await;
            })
            .await;
            let _ = done_tx.send(result.map_err(|e| e.to_string()));
        });
        Self {
            addr,
            runtime: Some(runtime),
            stop: Some(stop_tx),
            done: Some(done_rx),
        }
    }

    /// Graceful stop: returns what `server::run` returned.
    pub async fn stop(&mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let done = self.done.take().expect("node already stopped");
        let result = done.await.expect("node task vanished");
        self.kill().await;
        result
    }

    /// Crash: every task and socket of the node goes at once, nothing is drained.
    pub async fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(5)))
                .await
                .unwrap();
        }
    }

    pub fn is_running(&self) -> bool {
        self.runtime.is_some()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A cluster of nodes that all peer with each other.
pub struct TestCluster {
    pub nodes: Vec<TestNode>,
}

impl TestCluster {
    /// `n` nodes with default settings, but [`PATIENT`].
    pub fn start(n: usize) -> Self {
        Self::start_with(n, |_| patient())
    }

    /// `n` nodes; `config(i)` gives node i's settings (peers are filled in here).
    /// Nodes are numbered in the order of their addresses, which is the order of the members
    /// of a ring: which node holds which keys is then the same in every run.
    pub fn start_with(n: usize, config: impl Fn(usize) -> NodeConfig) -> Self {
        let mut listeners: Vec<std::net::TcpListener> = (0..n)
            .map(|_| {
                let l = bind_free();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        listeners.sort_by_key(|l| l.local_addr().unwrap().to_string());
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let nodes = listeners
            .into_iter()
            .enumerate()
            .map(|(i, listener)| {
                let mut cfg = config(i);
                cfg.peers = addrs
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, a)| a.clone())
                    .collect();
                TestNode::start(listener, cfg)
            })
            .collect();
        Self { nodes }
    }

    /// Starts one more node with `config`, joining the cluster through node `via`; returns
    /// its index. Its address is chosen to sort after every other node's, as far as the
    /// system's free ports allow, so that it is the ring's last member and which partitions
    /// it takes is the same in every run.
    pub fn join(&mut self, mut config: NodeConfig, via: usize) -> usize {
        config.peers.clear();
        config.join = Some(self.addr(via).to_string());
        self.add(config)
    }

    /// Starts one more node with `config` as it is (no peers filled in); returns its index.
    /// Its address sorts after every other node's, as far as the free ports allow.
    pub fn add(&mut self, config: NodeConfig) -> usize {
        let last = self.nodes.iter().map(|n| n.addr.clone()).max();
        let bind = bind_free;
        let after = |l: &std::net::TcpListener| Some(l.local_addr().unwrap().to_string()) > last;
        let listener = (0..1000).map(|_| bind()).find(after).unwrap_or_else(bind);
        listener.set_nonblocking(true).unwrap();
        self.nodes.push(TestNode::start(listener, config));
        self.nodes.len() - 1
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.nodes[i].addr
    }

    /// A client of node `i`.
    pub fn client(&self, i: usize) -> Client {
        Client::new(&self.nodes[i].addr, Duration::from_secs(10)).unwrap()
    }

    /// A client of node `i`'s Replicator service, for tests that speak as a peer.
    pub async fn replicator(
        &self,
        i: usize,
    ) -> kvstore::pb::replicator_client::ReplicatorClient<tonic::transport::Channel> {
        let addr = format!("http://{}", self.nodes[i].addr);
        kvstore::pb::replicator_client::ReplicatorClient::connect(addr)
            .await
            .unwrap()
    }

    /// Waits until every node sees every peer up with no anti-entropy round running or pending.
    /// A cluster runs a round with each peer at start (and after its first delivery if that
    /// round failed); a test that plants a difference behind replication's back waits for
    /// those first, or a round still running could repair the difference before it is read.
    pub async fn settle(&self) {
        let started = std::time::Instant::now();
        loop {
            let mut settled = true;
            for i in 0..self.nodes.len() {
                let status = self.client(i).status().await.unwrap();
                settled &= status
                    .peers
                    .iter()
                    .all(|p| p.state == "up" && !p.resync_pending && !p.resync_in_progress);
            }
            if settled {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "anti-entropy did not settle"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Replaces every node address in `text` with `[nodeN]` (1-based), for snapshots.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (i, node) in self.nodes.iter().enumerate() {
            text = text.replace(&node.addr, &format!("[node{}]", i + 1));
        }
        text
    }
}

/// A buffer that output can be written to from several threads, and read back: what a
/// subscriber or a supervisor printed.
#[derive(Clone, Default)]
pub struct Printed(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Printed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Printed {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
