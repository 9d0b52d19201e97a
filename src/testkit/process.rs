//! A cluster of real `kvstore-server` processes on loopback, each with its own data dir, whose
//! links to each other go through [`Proxy`]s. Nodes can be killed with SIGKILL (nothing
//! drained, as a crash), stopped with SIGTERM, restarted on the same data dir and port, and
//! partitioned. Everything is stopped by PID when the cluster is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::proxy::Proxy;
use crate::client::Client;
use crate::error::Error;

/// How long a node gets to start accepting connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

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
}

struct Node {
    port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// This node's outgoing links: `links[j]` reaches node j (None for itself).
    links: Vec<Option<Proxy>>,
}

/// A cluster of node processes.
pub struct ProcessCluster {
    spec: ClusterSpec,
    nodes: Vec<Node>,
}

/// A port that was free a moment ago. A process cannot be handed a bound socket, so this is
/// the usual small race; [`ProcessCluster::start`] retries a node whose port was taken.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl ProcessCluster {
    /// Starts `spec.nodes` nodes, each peered with all others through proxies.
    pub async fn start(spec: ClusterSpec) -> Result<Self, Error> {
        std::fs::create_dir_all(&spec.root)?;
        let mut nodes = Vec::new();
        for i in 0..spec.nodes {
            let data_dir = spec.root.join(format!("node{}", i + 1));
            let log = spec.root.join(format!("node{}.log", i + 1));
            nodes.push(Node {
                port: free_port()?,
                data_dir,
                log,
                child: None,
                links: Vec::new(),
            });
        }
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        for (i, node) in nodes.iter_mut().enumerate().filter(|_| spec.proxied) {
            let mut links = Vec::new();
            for (j, port) in ports.iter().enumerate() {
                links.push(if i == j {
                    None
                } else {
                    Some(Proxy::start(SocketAddr::from(([127, 0, 0, 1], *port))).await?)
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

    /// Node `i`'s client address.
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].port)
    }

    pub fn data_dir(&self, i: usize) -> &Path {
        &self.nodes[i].data_dir
    }

    /// Everything node `i` has logged (stderr), across restarts.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// A client of node `i`.
    pub fn client(&self, i: usize) -> Client {
        Client::new(&self.addr(i), Duration::from_secs(10)).expect("valid address")
    }

    fn spawn_with(&mut self, i: usize, extra: &[&str]) -> Result<(), Error> {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut cmd = Command::new(&self.spec.server);
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", node.port))
            .arg("--node-id")
            .arg(format!("node{}", i + 1))
            .arg("--data-dir")
            .arg(&node.data_dir);
        if self.spec.proxied {
            for proxy in node.links.iter().flatten() {
                cmd.arg("--peer").arg(proxy.addr().to_string());
            }
        } else {
            for (_, other) in self.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                cmd.arg("--peer").arg(format!("127.0.0.1:{}", other.port));
            }
        }
        cmd.args(&self.spec.extra_args)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn()?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> Result<(), Error> {
        self.spawn_with(i, &[])
    }

    /// Waits until node `i` accepts connections; fails if it exits first.
    pub async fn wait_ready(&mut self, i: usize) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.nodes[i].child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.nodes[i].child = None;
                return Err(Error::Testkit(format!(
                    "node{} exited ({status}):\n{}",
                    i + 1,
                    tail(&self.log(i))
                )));
            }
            if TcpStream::connect(self.addr(i)).await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(Error::Testkit(format!(
                    "node{} did not start within {START_TIMEOUT:?}",
                    i + 1
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: the process dies at once, nothing is drained or synced.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let mut child = self.nodes[i].child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().ok()
    }

    /// Starts node `i` again on its data dir and port.
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
                return Err(Error::Testkit(format!("node{} kept running", i + 1)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cuts node `i` off from every other node, both directions. Clients still reach it.
    pub fn isolate(&self, i: usize) {
        for (j, node) in self.nodes.iter().enumerate() {
            if j == i {
                node.links.iter().flatten().for_each(Proxy::cut);
            } else if let Some(link) = &node.links[i] {
                link.cut();
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        for node in &self.nodes {
            node.links.iter().flatten().for_each(Proxy::heal);
        }
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
