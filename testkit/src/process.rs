//! A cluster of real `kvstore-server` processes on loopback, each with its own data dir, whose
//! links to each other go through [`Proxy`]s. Nodes can be killed with SIGKILL (nothing
//! drained, as a crash), stopped with SIGTERM, restarted on the same data dir, and
//! partitioned. Everything is stopped by PID when the cluster is dropped.
//!
//! In a proxied cluster every node binds port 0 itself and says where in its start line, so no
//! port is ever picked, released and hoped to stay free; clients reach each node through a
//! front proxy whose address stays the same across restarts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore::client::Client;

use crate::Error;
use crate::netns::Topology;
use crate::proxy::Proxy;
use crate::tls::ClusterPki;

/// How long a node gets to start accepting connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node gets to exit after SIGTERM before it is killed: its shutdown grace (10 s
/// by default) plus the drain, with room to spare.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Where a proxy sends connections before its node has started: nothing listens on port 0, so
/// they are dropped, as a down node's would be.
const NOWHERE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Settings for every node of a [`ProcessCluster`].
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// The `kvstore-server` binary.
    pub server: PathBuf,
    pub nodes: usize,
    /// Where data dirs and logs go.
    pub root: PathBuf,
    /// Flags added to every node's command line.
    pub extra_args: Vec<String>,
    /// Link nodes through [`Proxy`]s (so they can be partitioned) rather than directly (as a
    /// benchmark wants, with nothing in between).
    pub proxied: bool,
    /// Serve TLS with these certificates, node i with its own and every node with the CA;
    /// [`ProcessCluster::client`] then talks TLS with the client certificate.
    pub tls: Option<ClusterPki>,
    /// Run node i on host i of this topology, listening on the host's own address (port
    /// [`NETNS_PORT`]). Proxied, the links between nodes go through proxies on the bridge
    /// (which can delay and cut them); direct, nodes call each other's addresses, and
    /// [`ProcessCluster::isolate`] cuts them with nftables.
    pub netns: Option<Arc<Topology>>,
}

/// The port every node listens on in its own network namespace.
pub const NETNS_PORT: u16 = 5001;

struct Node {
    /// Where the node listens: picked here for a direct cluster (whose nodes must know each
    /// other's addresses before they start), learnt from its start line for a proxied one.
    listen: Option<SocketAddr>,
    /// Proxied clusters: the clients' way in, at an address that survives restarts.
    front: Option<Proxy>,
    data_dir: PathBuf,
    log: PathBuf,
    /// How long the log was when the current process started: its start line comes after.
    log_start: u64,
    child: Option<Child>,
    /// This node's outgoing links: `links[j]` reaches node j (None for itself).
    links: Vec<Option<Proxy>>,
    /// The member a node added by [`ProcessCluster::join`] joins through, given instead of
    /// peers at its first start.
    join: Option<String>,
}

/// A cluster of node processes.
pub struct ProcessCluster {
    spec: ClusterSpec,
    nodes: Vec<Node>,
}

/// A port that was free a moment ago, for a direct cluster (the benchmark's), whose nodes must
/// know each other's addresses before any of them starts. Someone else may take it meanwhile:
/// the node then fails to bind and [`ProcessCluster::wait_ready`] says so. Proxied clusters
/// (the tests') never do this.
fn free_addr() -> std::io::Result<SocketAddr> {
    // Free for UDP too: a node gossips on its port's number.
    loop {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        if std::net::UdpSocket::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
}

/// The address in a "node started" line (`listen=ADDR`). Only whole lines count: a line
/// caught half-written could end in a port cut short.
fn started_at(log: &str) -> Option<SocketAddr> {
    log.split_inclusive('\n')
        .filter(|line| line.ends_with('\n') && line.contains("node started"))
        .find_map(|line| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix("listen="))
                .and_then(|addr| addr.parse().ok())
        })
}

impl ProcessCluster {
    /// Starts `spec.nodes` nodes, each peered with all others through proxies.
    pub async fn start(spec: ClusterSpec) -> Result<Self, Error> {
        std::fs::create_dir_all(&spec.root)?;
        let mut nodes = Vec::new();
        for i in 0..spec.nodes {
            let data_dir = spec.root.join(format!("node{}", i + 1));
            let log = spec.root.join(format!("node{}.log", i + 1));
            let (listen, front) = match (&spec.netns, spec.proxied) {
                (Some(hosts), _) => (
                    Some(SocketAddr::new(hosts.addr(i).into(), NETNS_PORT)),
                    None,
                ),
                (None, true) => (None, Some(Proxy::start(NOWHERE).await?)),
                (None, false) => (Some(free_addr()?), None),
            };
            nodes.push(Node {
                listen,
                front,
                data_dir,
                log,
                log_start: 0,
                child: None,
                links: Vec::new(),
                join: None,
            });
        }
        let count = nodes.len();
        let listens: Vec<Option<SocketAddr>> = nodes.iter().map(|n| n.listen).collect();
        for (i, node) in nodes.iter_mut().enumerate().filter(|_| spec.proxied) {
            let mut links = Vec::new();
            for (j, listen) in listens.iter().enumerate().take(count) {
                links.push(match (&spec.netns, listen) {
                    _ if i == j => None,
                    // Between namespaces: on the bridge, to the host's fixed address.
                    (Some(hosts), Some(listen)) => {
                        Some(Proxy::start_on(hosts.host_addr().into(), *listen).await?)
                    }
                    _ => Some(Proxy::start(NOWHERE).await?),
                });
            }
            node.links = links;
        }
        let mut cluster = Self { spec, nodes };
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i)?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s process id, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Node `i`'s client address. The same across restarts in a proxied cluster.
    pub fn addr(&self, i: usize) -> String {
        let node = &self.nodes[i];
        match (&node.front, node.listen) {
            (Some(front), _) => front.addr().to_string(),
            (None, Some(listen)) => listen.to_string(),
            (None, None) => unreachable!("a direct cluster's nodes have addresses from the start"),
        }
    }

    pub fn data_dir(&self, i: usize) -> &Path {
        &self.nodes[i].data_dir
    }

    /// Everything node `i` has logged (stderr), across restarts.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// A client of node `i`, over TLS if the cluster serves it.
    pub fn client(&self, i: usize) -> Client {
        let tls = (self.spec.tls.as_ref()).map(|pki| {
            pki.client_config()
                .expect("the cluster's own certificates load")
        });
        Client::with_tls(&self.addr(i), Duration::from_secs(10), tls.as_ref())
            .expect("valid address")
    }

    fn spawn_with(&mut self, i: usize, extra: &[&str]) -> Result<(), Error> {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let log_start = log.metadata()?.len();
        // A proxied node binds port 0: the proxies follow it wherever it lands.
        let listen = match (self.spec.proxied && self.spec.netns.is_none(), node.listen) {
            (false, Some(addr)) => addr.to_string(),
            _ => "127.0.0.1:0".to_string(),
        };
        let mut cmd = match &self.spec.netns {
            Some(hosts) => hosts.command(i, &self.spec.server),
            None => Command::new(&self.spec.server),
        };
        cmd.arg("--listen")
            .arg(listen)
            .arg("--node-id")
            .arg(format!("node{}", i + 1))
            .arg("--data-dir")
            .arg(&node.data_dir);
        if let Some(member) = &node.join {
            cmd.arg("--join").arg(member);
        } else if self.spec.proxied {
            for proxy in node.links.iter().flatten() {
                cmd.arg("--peer").arg(proxy.addr().to_string());
            }
        } else {
            for (_, other) in self.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                let other = other
                    .listen
                    .expect("a direct cluster's nodes have addresses");
                cmd.arg("--peer").arg(other.to_string());
            }
        }
        if let Some(pki) = &self.spec.tls {
            cmd.args(pki.node_args(i));
        }
        cmd.args(&self.spec.extra_args)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn()?;
        self.nodes[i].child = Some(child);
        self.nodes[i].log_start = log_start;
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> Result<(), Error> {
        self.spawn_with(i, &[])
    }

    /// Waits until node `i` has started (its own start line, in its own log: whatever else
    /// may listen on a port cannot pass for it), and points the proxies at it; fails if it
    /// exits first.
    pub async fn wait_ready(&mut self, i: usize) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.nodes[i].child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.nodes[i].child = None;
                return Err(Error::Node(format!(
                    "node{} exited ({status}):\n{}",
                    i + 1,
                    tail(&self.log(i))
                )));
            }
            if let Some(listen) = self.start_line(i)? {
                return self.started(i, listen);
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(Error::Node(format!(
                    "node{} did not start within {START_TIMEOUT:?}",
                    i + 1
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where node `i`'s current process says it listens, once it has said so.
    fn start_line(&self, i: usize) -> Result<Option<SocketAddr>, Error> {
        use std::io::{Read, Seek, SeekFrom};
        let node = &self.nodes[i];
        let mut log = std::fs::File::open(&node.log)?;
        log.seek(SeekFrom::Start(node.log_start))?;
        let mut text = Vec::new();
        log.read_to_end(&mut text)?;
        Ok(started_at(&String::from_utf8_lossy(&text)))
    }

    /// Node `i` listens at `listen`: checks a direct node got the address it was given, and
    /// sends a proxied node's front and every link to it there.
    fn started(&mut self, i: usize, listen: SocketAddr) -> Result<(), Error> {
        let node = &mut self.nodes[i];
        if let Some(front) = &node.front {
            front.set_target(listen);
            node.listen = Some(listen);
            for other in &self.nodes {
                if let Some(Some(link)) = other.links.get(i) {
                    link.set_target(listen);
                }
            }
            return Ok(());
        }
        match node.listen {
            Some(expected) if expected == listen => Ok(()),
            expected => Err(Error::Node(format!(
                "node{} listens on {listen}, not {expected:?}",
                i + 1
            ))),
        }
    }

    /// Starts one more node, joining the ring through node `via` (`--join`), and waits until
    /// it has started; returns its index. Direct clusters only: the ring names its members
    /// by the addresses they listen on. Between hosts, it runs on the next host, which the
    /// topology must have. Restarted, it starts from the ring its data dir holds.
    pub async fn join(&mut self, via: usize) -> Result<usize, Error> {
        if self.spec.proxied {
            return Err(Error::Node(
                "only a direct cluster takes a joining node".into(),
            ));
        }
        let i = self.nodes.len();
        let listen = match &self.spec.netns {
            Some(hosts) if i < hosts.len() => SocketAddr::new(hosts.addr(i).into(), NETNS_PORT),
            Some(hosts) => {
                return Err(Error::Node(format!(
                    "the topology has {} hosts, every one taken",
                    hosts.len()
                )));
            }
            None => free_addr()?,
        };
        self.nodes.push(Node {
            listen: Some(listen),
            front: None,
            data_dir: self.spec.root.join(format!("node{}", i + 1)),
            log: self.spec.root.join(format!("node{}.log", i + 1)),
            log_start: 0,
            child: None,
            links: Vec::new(),
            join: Some(self.addr(via)),
        });
        self.spawn(i)?;
        self.wait_ready(i).await?;
        self.nodes[i].join = None;
        Ok(i)
    }

    /// SIGKILL: the process dies at once, nothing is drained or synced.
    pub fn kill(&mut self, i: usize) {
        // Unrouted first: once the process is gone, its port is anyone's.
        self.unroute(i);
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Node `i` is down: its proxies stop sending connections to the port it had, which
    /// anyone may take now.
    fn unroute(&self, i: usize) {
        if let Some(front) = &self.nodes[i].front {
            front.set_target(NOWHERE);
            for other in &self.nodes {
                if let Some(Some(link)) = other.links.get(i) {
                    link.set_target(NOWHERE);
                }
            }
        }
    }

    /// SIGTERM, then waits for the exit status. A node that has not exited after
    /// `STOP_TIMEOUT` is killed, and its status (killed by a signal) says so.
    pub fn stop(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let mut child = self.nodes[i].child.take()?;
        // A stopping node takes no new connections anyway, and its port must not be reached
        // once it has exited.
        self.unroute(i);
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut status = None;
        while status.is_none() && Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(exited)) => status = Some(exited),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        if status.is_none() {
            let _ = child.kill();
            status = child.wait().ok();
        }
        status
    }

    /// Starts node `i` again on its data dir (a direct cluster's node on its port too).
    pub async fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.restart_with(i, &[]).await
    }

    /// Starts node `i` again with extra flags (e.g. `--repair-truncate`).
    pub async fn restart_with(&mut self, i: usize, extra: &[&str]) -> Result<(), Error> {
        self.kill(i);
        self.spawn_with(i, extra)?;
        self.wait_ready(i).await
    }

    /// Starts node `i` and waits for it to exit by itself (a refused start).
    pub fn run_to_exit(
        &mut self,
        i: usize,
        extra: &[&str],
    ) -> Result<std::process::ExitStatus, Error> {
        self.kill(i);
        self.spawn_with(i, extra)?;
        let mut child = self.nodes[i].child.take().expect("just spawned");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Node(format!("node{} kept running", i + 1)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cuts node `i` off from every other node, both directions. Clients still reach it.
    /// Proxied, the proxies cut the links; direct in network namespaces, nftables drops
    /// what passes between the hosts.
    pub fn isolate(&self, i: usize) -> Result<(), Error> {
        if let (Some(hosts), false) = (&self.spec.netns, self.spec.proxied) {
            let others: Vec<usize> = (0..self.nodes.len()).filter(|&j| j != i).collect();
            return hosts.partition(&[&[i], &others]);
        }
        for (j, node) in self.nodes.iter().enumerate() {
            if j == i {
                node.links.iter().flatten().for_each(Proxy::cut);
            } else if let Some(link) = &node.links[i] {
                link.cut();
            }
        }
        Ok(())
    }

    /// Restores every link (and, in network namespaces, removes every partition).
    pub fn heal(&self) -> Result<(), Error> {
        for node in &self.nodes {
            node.links.iter().flatten().for_each(Proxy::heal);
        }
        match &self.spec.netns {
            Some(hosts) => hosts.heal(),
            None => Ok(()),
        }
    }

    /// Delays every link between nodes by `base` +- `jitter` each way, from their next
    /// connections on (a proxied cluster's; None ends it).
    pub fn set_delay(&self, delay: Option<(Duration, Duration)>) {
        for node in &self.nodes {
            for link in node.links.iter().flatten() {
                link.set_delay(delay);
            }
        }
    }

    /// The topology the nodes run on, if any.
    pub fn topology(&self) -> Option<&Arc<Topology>> {
        self.spec.netns.as_ref()
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
