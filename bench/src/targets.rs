//! What the benchmark talks to: kvstore (through its public API), etcd (through its documented
//! KV API), and a bare echo server. Each client owns one connection.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kvstore::pb::kv_store_client::KvStoreClient;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::pb::echo::Payload;
use super::pb::echo::echo_client::EchoClient;
use super::pb::echo::echo_server::{Echo, EchoServer};
use super::pb::etcd::kv_client::KvClient;
use super::pb::etcd::{DeleteRangeRequest, PutRequest, RangeRequest};

/// Largest message a benchmark client accepts: a 100k-key List or Range in one response.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// One operation of a workload.
#[derive(Clone, Debug)]
pub enum Op {
    Put(String, String),
    Get(String),
    Delete(String),
    List,
    Echo(String, String),
}

/// A client of one target, on its own connection.
#[derive(Clone)]
pub enum Conn {
    Kv(KvStoreClient<Channel>),
    /// `serializable`: read from the member's local state rather than through Raft.
    Etcd(KvClient<Channel>, bool),
    Echo(EchoClient<Channel>),
}

/// A new connection (not shared with any other client) to `addr`.
pub async fn channel(addr: &str) -> anyhow::Result<Channel> {
    channel_with(addr, None).await
}

/// A new connection to `addr`, over TLS if `tls` is given.
pub async fn channel_with(addr: &str, tls: Option<ClientTlsConfig>) -> anyhow::Result<Channel> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?.tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint.connect().await?)
}

impl Conn {
    pub async fn kvstore(addr: &str) -> anyhow::Result<Self> {
        Self::kvstore_with(addr, None).await
    }

    /// A kvstore client, over TLS if `tls` is given.
    pub async fn kvstore_with(addr: &str, tls: Option<ClientTlsConfig>) -> anyhow::Result<Self> {
        Ok(Self::Kv(
            KvStoreClient::new(channel_with(addr, tls).await?)
                .max_decoding_message_size(MAX_MESSAGE),
        ))
    }

    pub async fn etcd(addr: &str, serializable: bool) -> anyhow::Result<Self> {
        Ok(Self::Etcd(
            KvClient::new(channel(addr).await?).max_decoding_message_size(MAX_MESSAGE),
            serializable,
        ))
    }

    pub async fn echo(addr: &str) -> anyhow::Result<Self> {
        Ok(Self::Echo(EchoClient::new(channel(addr).await?)))
    }

    /// Runs one operation; Ok means the target did it (a missing key on Get counts as done).
    pub async fn run(&mut self, op: Op) -> Result<(), tonic::Status> {
        match (self, op) {
            (Self::Kv(c), Op::Put(key, value)) => {
                let ack = c
                    .put(kvstore::pb::KeyValue {
                        key,
                        value,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                if !ack.ok {
                    return Err(tonic::Status::unavailable(ack.message));
                }
            }
            (Self::Kv(c), Op::Get(key)) => {
                let get = c
                    .get(kvstore::pb::Key {
                        key,
                        ..Default::default()
                    })
                    .await;
                match get {
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    Err(s) => return Err(s),
                }
            }
            (Self::Kv(c), Op::Delete(key)) => {
                c.delete(kvstore::pb::Key {
                    key,
                    ..Default::default()
                })
                .await?;
            }
            (Self::Kv(c), Op::List) => {
                let mut stream = c.list(()).await?.into_inner();
                while let Some(kv) = stream.next().await {
                    kv?;
                }
            }
            (Self::Etcd(c, _), Op::Put(key, value)) => {
                c.put(PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    lease: 0,
                })
                .await?;
            }
            (Self::Etcd(c, serializable), Op::Get(key)) => {
                c.range(RangeRequest {
                    key: key.into_bytes(),
                    serializable: *serializable,
                    ..Default::default()
                })
                .await?;
            }
            (Self::Etcd(c, _), Op::Delete(key)) => {
                c.delete_range(DeleteRangeRequest {
                    key: key.into_bytes(),
                    range_end: Vec::new(),
                })
                .await?;
            }
            (Self::Etcd(c, serializable), Op::List) => {
                // Every key of the benchmark: the prefix "key-" up to "key." ('-' + 1).
                c.range(RangeRequest {
                    key: b"key-".to_vec(),
                    range_end: b"key.".to_vec(),
                    serializable: *serializable,
                    ..Default::default()
                })
                .await?;
            }
            (Self::Echo(c), Op::Echo(key, value) | Op::Put(key, value)) => {
                c.echo(Payload {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                })
                .await?;
            }
            (_, op) => return Err(tonic::Status::unimplemented(format!("{op:?}"))),
        }
        Ok(())
    }
}

/// The echo service: returns what it gets.
pub struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<Payload>,
    ) -> Result<tonic::Response<Payload>, tonic::Status> {
        Ok(tonic::Response::new(request.into_inner()))
    }
}

/// Starts the echo server on its own runtime (two worker threads, like a node) and returns its
/// address and the runtime, which stops the server when dropped.
pub fn start_echo() -> anyhow::Result<(String, tokio::runtime::Runtime)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?.to_string();
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("in a runtime");
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService))
            .serve_with_incoming(incoming)
            .await;
    });
    Ok((addr, runtime))
}

/// A 3-member etcd cluster of Debian's `etcd-server`, fsync on (etcd's default), on loopback.
pub struct EtcdCluster {
    children: Vec<Child>,
    pub clients: Vec<String>,
}

/// Where `etcd` is, if installed.
pub fn etcd_binary() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl EtcdCluster {
    pub async fn start(binary: &Path, root: &Path) -> anyhow::Result<Self> {
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
        let peer_ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
        let initial: Vec<String> = peer_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let mut children = Vec::new();
        for i in 0..3 {
            let dir = root.join(format!("m{i}"));
            std::fs::create_dir_all(&dir)?;
            let log = std::fs::File::create(root.join(format!("m{i}.log")))?;
            let client = format!("http://127.0.0.1:{}", client_ports[i]);
            let peer = format!("http://127.0.0.1:{}", peer_ports[i]);
            let child = Command::new(binary)
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(&dir)
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "bench",
                ])
                .args(["--log-level", "error", "--logger", "zap"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting etcd")?;
            children.push(child);
        }
        let cluster = Self {
            children,
            clients: client_ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
        };
        // Ready when every member takes a write.
        let started = Instant::now();
        for addr in &cluster.clients {
            loop {
                let ok = async {
                    let mut c = Conn::etcd(addr, false).await?;
                    c.run(Op::Put("key-ready".into(), "x".into())).await?;
                    anyhow::Ok(())
                };
                if ok.await.is_ok() {
                    break;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    bail!("etcd did not become ready; see {}", root.display());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(cluster)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            // By PID: only the members this run started.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}
