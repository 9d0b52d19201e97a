//! `kvstore-bench` (run it as `cargo xtask bench`): kvstore against etcd and against the
//! wire's limit, side by side in one run, on this machine.
//!
//! A closed-loop load generator of our own (the project's gRPC client, HDR histograms) drives a
//! freshly started 3-node kvstore cluster (release build, default durable settings: fsync
//! before ack), a 3-member etcd cluster (Debian's `etcd-server`, fsync on), and a bare tonic
//! echo server with the same payload. Workloads: put, get, mixed (90 % get), delete, list; at 1,
//! 16 and 64 clients, each on its own connection, spread over the nodes; 16-byte keys, 100-byte
//! values, 10k keys preloaded (100k for list). Each cell runs for a fixed time. Results go to
//! `bench/results/` as markdown and JSON, with ratios ours/etcd and ours/echo per cell: the
//! machine is shared and noisy, so only ratios measured in the same run mean anything.
//!
//! `--memory`, `--restart` and `--catchup` measure RSS per key at 1M keys, start-to-serving
//! time with 1M keys, and the time a node that missed 100k writes takes to converge.
//!
//! The load generator must not be the bottleneck, so `cargo xtask bench` builds this and the
//! server in release mode and runs this from there. `bench/README.md` says how to read the
//! results, and what each experiment bought.
//!
//! # Layout
//! - `load`: the closed-loop load generator and its figures.
//! - `targets`: what it drives (kvstore, etcd, the echo server) and how to start them.
//! - `report`: the markdown and JSON reports.

mod load;
mod report;
mod targets;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use kvstore_testkit::ProcessCluster;
use kvstore_testkit::process::ClusterSpec;
use kvstore_testkit::tls::ClusterPki;
use serde::Serialize;
use tonic::transport::ClientTlsConfig;

use load::{Figures, Workload};
use targets::{Conn, EtcdCluster};

/// Generated clients for etcd's KV API and the echo service.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod etcd {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod echo {
        tonic::include_proto!("echo");
    }
}

/// Benchmark a release 3-node cluster against etcd and a bare gRPC echo server, side by side;
/// write bench/results/DATE.md and .json.
#[derive(Debug, Clone, Parser)]
#[command(name = "cargo xtask bench")]
pub struct Args {
    /// Seconds per cell.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Client counts to run each workload at.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Workloads to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "put,get,mixed,delete,list"
    )]
    workloads: Vec<String>,
    /// Keys preloaded before reads and written by the workloads.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Keys a list streams.
    #[arg(long, default_value_t = 100_000)]
    list_keys: u64,
    /// Skip etcd even if it is installed.
    #[arg(long)]
    no_etcd: bool,
    /// Measure RSS per key of a node holding 1M keys.
    #[arg(long)]
    memory: bool,
    /// Measure start-to-serving time of a node holding 1M keys.
    #[arg(long)]
    restart: bool,
    /// Measure how long a node that missed 100k writes takes to converge.
    #[arg(long)]
    catchup: bool,
    /// Keys for --memory and --restart.
    #[arg(long, default_value_t = 1_000_000)]
    big_keys: u64,
    /// Writes a node misses for --catchup.
    #[arg(long, default_value_t = 100_000)]
    missed_writes: u64,
    /// Nodes in each kvstore cluster (with --node-args "--replicas 3", a ring).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Extra flags for every kvstore node, e.g. "--worker-threads 1".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    node_args: String,
    /// A/B mode: also start a second kvstore cluster from this server binary (say, a copy of
    /// the release build before a change) and run every kvstore cell on both, alternating.
    #[arg(long)]
    b_server: Option<PathBuf>,
    /// A/B mode: node flags for the second cluster (its binary is --b-server, or the same).
    #[arg(long, allow_hyphen_values = true)]
    b_node_args: Option<String>,
    /// A/B mode: cluster B serves mutual TLS (a throwaway CA and certificates, made under the
    /// results' scratch dir), and its clients talk TLS: B/A is what TLS costs.
    #[arg(long)]
    b_tls: bool,
    /// How many times each cell runs on each target, the targets taking turns; the report
    /// gives the median of each figure.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Where results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// One measured cell.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    /// What the target ran; for the echo server (whose only call is an echo), the workload
    /// whose cells it took turns with.
    pub workload: Workload,
    /// kvstore, etcd, etcd-serializable or echo.
    pub target: String,
    pub concurrency: usize,
    #[serde(flatten)]
    pub figures: Figures,
    /// kvstore cells that write: writes per replication batch during the cell, over every
    /// node and peer (from Status), which says how much batching saved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes_per_batch: Option<f64>,
    /// kvstore cells that write: copies the nodes sent each other per client write during
    /// the cell (writes their peers confirmed, from Status, over the cell's writes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_copies_per_write: Option<f64>,
}

/// The live keys each node of one kvstore cluster held.
#[derive(Clone, Debug, Serialize)]
pub struct KeysHeld {
    pub target: String,
    /// Distinct keys the cluster held (what was loaded).
    pub distinct: u64,
    /// Each node's own count, from its Status.
    pub keys: Vec<u64>,
}

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub date: String,
    pub cores: usize,
    pub cpu: String,
    pub seconds_per_cell: f64,
    /// Runs of each cell per target; figures in the report are medians over them.
    pub rounds: usize,
    pub keys: u64,
    pub list_keys: u64,
    pub etcd_version: Option<String>,
    pub cells: Vec<Cell>,
    pub notes: Vec<String>,
    pub memory_bytes_per_key: Option<f64>,
    pub restart_seconds: Option<f64>,
    pub catchup_seconds: Option<f64>,
    /// Live keys each kvstore node held after the last workload that left keys, by target.
    pub keys_per_node: Vec<KeysHeld>,
    /// A/B runs: the flags of cluster B's nodes (`--b-node-args`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b_node_args: Option<String>,
}

/// Cargo's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Built beside this binary: `cargo xtask bench` builds both in release mode.
    let server = std::env::current_exe()?.with_file_name("kvstore-server");
    anyhow::ensure!(
        server.exists(),
        "{} is missing: run the benchmark as `cargo xtask bench`, which builds it",
        server.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let results = runtime.block_on(measure(&args, Some(server)))?;
    let (md, json) = report::write(&results, &args.out)?;
    println!("{}", report::markdown(&results));
    println!("bench: wrote {} and {}", md.display(), json.display());
    Ok(())
}

/// A kvstore cluster for the benchmark: real processes, or (for the smoke test, which has no
/// binary to start) nodes in this process.
enum Kvstore {
    Processes(ProcessCluster),
    InProcess {
        runtimes: Vec<tokio::runtime::Runtime>,
        addrs: Vec<String>,
        /// Holds the nodes' data dirs until the cluster is dropped.
        _dir: tempfile::TempDir,
    },
}

impl Kvstore {
    async fn start(
        server: Option<PathBuf>,
        root: PathBuf,
        nodes: usize,
        extra_args: Vec<String>,
        tls: Option<&ClusterPki>,
    ) -> anyhow::Result<Self> {
        if let Some(server) = server {
            return Ok(Self::Processes(
                ProcessCluster::start(ClusterSpec {
                    server,
                    nodes,
                    root,
                    extra_args: kvstore_testkit::sharing_cores(nodes, extra_args),
                    proxied: false,
                    tls: tls.cloned(),
                    netns: None,
                })
                .await?,
            ));
        }
        let dir = tempfile::tempdir()?;
        let listeners: Vec<std::net::TcpListener> = (0..nodes)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.to_string()))
            .collect::<Result<_, _>>()?;
        let mut runtimes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            listener.set_nonblocking(true)?;
            let config = kvstore::NodeConfig {
                peers: addrs.iter().filter(|a| **a != addrs[i]).cloned().collect(),
                data_dir: Some(dir.path().join(format!("node{i}"))),
                tls: tls
                    .map(|pki| pki.node_tls(i, kvstore::tls::ClientAuth::None))
                    .transpose()?,
                ..kvstore::NodeConfig::default()
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.spawn(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("in a runtime");
                let _ = kvstore::server::run(listener, config, std::future::pending()).await;
            });
            runtimes.push(rt);
        }
        Ok(Self::InProcess {
            runtimes,
            addrs,
            _dir: dir,
        })
    }

    /// Its addresses; the cluster itself goes into `keep`, which holds it until the run ends.
    fn addrs_into(self, keep: &mut Vec<Kvstore>) -> Vec<String> {
        let addrs = self.addrs();
        keep.push(self);
        addrs
    }

    fn addrs(&self) -> Vec<String> {
        match self {
            Self::Processes(c) => (0..c.len()).map(|i| c.addr(i)).collect(),
            Self::InProcess { addrs, .. } => addrs.clone(),
        }
    }
}

impl Drop for Kvstore {
    fn drop(&mut self) {
        if let Self::InProcess { runtimes, .. } = self {
            for rt in runtimes.drain(..) {
                rt.shutdown_background();
            }
        }
    }
}

/// `n` connections spread over `addrs`.
async fn connect(
    addrs: &[String],
    n: usize,
    f: impl AsyncFn(&str) -> anyhow::Result<Conn>,
) -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::new();
    for i in 0..n {
        conns.push(f(&addrs[i % addrs.len()]).await?);
    }
    Ok(conns)
}

struct Progress {
    done: usize,
    total: usize,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        eprint!("\r\x1b[2K[{}/{}] {what}", self.done, self.total);
    }
}

/// Runs every cell. `server` is the kvstore-server binary, or None for in-process nodes.
pub async fn measure(args: &Args, server: Option<PathBuf>) -> anyhow::Result<Results> {
    let workloads: Vec<Workload> = args
        .workloads
        .iter()
        .filter(|w| w.as_str() != "none")
        .map(|w| match w.as_str() {
            "put" => Ok(Workload::Put),
            "get" => Ok(Workload::Get),
            "mixed" => Ok(Workload::Mixed),
            "delete" => Ok(Workload::Delete),
            "list" => Ok(Workload::List),
            other => anyhow::bail!("unknown workload {other}"),
        })
        .collect::<Result<_, _>>()?;
    let duration = Duration::from_secs_f64(args.seconds);
    let etcd = if args.no_etcd {
        None
    } else {
        targets::etcd_binary()
    };
    let mut results = Results {
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu: cpu_model(),
        seconds_per_cell: args.seconds,
        rounds: args.rounds.max(1),
        keys: args.keys,
        list_keys: args.list_keys,
        ..Results::default()
    };
    if etcd.is_none() && !args.no_etcd {
        let note = "etcd not installed: install it with `apt-get install etcd-server` to compare";
        eprintln!("bench: {note}");
        results.notes.push(note.into());
    }
    if let Some(etcd) = &etcd {
        let out = std::process::Command::new(etcd).arg("--version").output()?;
        results.etcd_version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map(String::from);
    }
    let cs = &args.concurrency;
    // The smoke tests (no server binary) get a directory of their own: the real run's is
    // emptied first, and a test must not do that to a run in progress, nor two tests to each
    // other.
    let scratch;
    let root = if server.is_some() {
        let root = target_dir().join("bench");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        root
    } else {
        scratch = tempfile::tempdir()?;
        scratch.path().to_path_buf()
    };

    // Every target starts first and stays up; then each cell runs on every target in turn, round
    // after round, so that the machine's drift (10-30 % here) hits all of them alike.
    let (echo_addr, echo_runtime) = targets::start_echo()?;
    let split = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    let mut kvstores = Vec::new();
    let mut etcd_cluster = None;
    let mut list = Vec::new();
    if !workloads.is_empty() {
        let a = Kvstore::start(
            server.clone(),
            root.join("kvstore"),
            args.nodes,
            split(&args.node_args),
            None,
        );
        list.push(Target::kvstore(
            "kvstore",
            a.await?.addrs_into(&mut kvstores),
            None,
        ));
        if args.b_server.is_some() || args.b_node_args.is_some() || args.b_tls {
            let b_args = split(args.b_node_args.as_deref().unwrap_or(&args.node_args));
            let b_server = args.b_server.clone().or(server.clone());
            let pki = match args.b_tls {
                true => Some(ClusterPki::create(&root.join("kvstore-b-tls"), args.nodes)?),
                false => None,
            };
            let b = Kvstore::start(
                b_server,
                root.join("kvstore-b"),
                args.nodes,
                b_args,
                pki.as_ref(),
            );
            let client_tls = pki.as_ref().map(|pki| pki.client_config()).transpose()?;
            let b = b.await?.addrs_into(&mut kvstores);
            list.push(Target::kvstore("kvstore-b", b, client_tls));
            results.b_node_args = args.b_node_args.clone();
            results.notes.push(format!(
                "A/B run: A = kvstore {:?}, B = {} {:?}{}",
                args.node_args,
                args.b_server
                    .as_ref()
                    .map_or("the same binary".into(), |p| p.display().to_string()),
                args.b_node_args.as_deref().unwrap_or(&args.node_args),
                if args.b_tls {
                    ", serving mutual TLS to its peers and TLS to its clients"
                } else {
                    ""
                },
            ));
        }
        if let Some(binary) = &etcd {
            let cluster = EtcdCluster::start(binary, &root.join("etcd")).await?;
            for serializable in [false, true] {
                list.push(Target::etcd(cluster.clients.clone(), serializable));
            }
            etcd_cluster = Some(cluster);
        }
    }
    let rounds = args.rounds.max(1);
    let per_round: usize = workloads
        .iter()
        .map(|&w| list.iter().filter(|t| t.runs(w)).count())
        .sum::<usize>()
        + workloads.iter().filter(|&&w| w != Workload::List).count();
    let mut progress = Progress {
        done: 0,
        total: per_round * cs.len() * rounds,
    };
    let mut loaded: std::collections::HashMap<&str, u64> = Default::default();
    for &workload in &workloads {
        let keys = if workload == Workload::List {
            args.list_keys
        } else {
            args.keys
        };
        for t in &list {
            let have = loaded.entry(t.cluster).or_default();
            if *have < keys {
                eprint!("\r\x1b[2K{}: preloading {keys} keys", t.name);
                load::preload(t.connect(64).await?, *have, keys).await?;
                *have = keys;
            }
        }
        for &c in cs {
            for round in 1..=rounds {
                let label = |name: &str| match rounds {
                    1 => format!("{name} {workload:?} c={c}"),
                    _ => format!("{name} {workload:?} c={c}, round {round}/{rounds}"),
                };
                // The wire's limit, measured in turn with this workload's cells, so that its
                // ratios compare figures from the same minutes.
                if workload != Workload::List {
                    progress.step(&label("echo"));
                    let conns = connect(std::slice::from_ref(&echo_addr), c, Conn::echo).await?;
                    let figures = load::run(conns, Workload::Echo, args.keys, duration).await;
                    results.cells.push(Cell {
                        workload,
                        target: "echo".into(),
                        concurrency: c,
                        figures,
                        writes_per_batch: None,
                        peer_copies_per_write: None,
                    });
                }
                for t in list.iter().filter(|t| t.runs(workload)) {
                    if workload == Workload::Delete {
                        // Every delete cell deletes keys that exist, as the first one did.
                        eprint!("\r\x1b[2K{}: reloading {keys} keys", t.name);
                        load::preload(t.connect(64).await?, 0, keys).await?;
                    }
                    progress.step(&label(t.name));
                    let batching = t.etcd_serializable.is_none() && workload.writes();
                    let before = match batching {
                        true => Some(replicated(&t.addrs, t.tls.as_ref()).await?),
                        false => None,
                    };
                    let figures = load::run(t.connect(c).await?, workload, keys, duration).await;
                    let (writes_per_batch, peer_copies_per_write) = match before {
                        Some((writes, batches)) => {
                            let (w, b) = replicated(&t.addrs, t.tls.as_ref()).await?;
                            // Saturating: a node that restarted mid-cell starts counting anew.
                            // No batch at all: a build without the counters (an older B).
                            let (w, b) = (w.saturating_sub(writes), b.saturating_sub(batches));
                            (
                                (b > 0).then(|| w as f64 / b as f64),
                                (b > 0 && figures.ops > 0).then(|| w as f64 / figures.ops as f64),
                            )
                        }
                        None => (None, None),
                    };
                    results.cells.push(Cell {
                        workload,
                        target: t.name.into(),
                        concurrency: c,
                        figures,
                        writes_per_batch,
                        peer_copies_per_write,
                    });
                }
            }
        }
        if workload == Workload::Delete {
            loaded.clear(); // the keys are gone: reload before reading again
        } else {
            for t in list.iter().filter(|t| t.etcd_serializable.is_none()) {
                let mut held = KeysHeld {
                    target: t.name.into(),
                    distinct: keys,
                    keys: Vec::new(),
                };
                for addr in &t.addrs {
                    let client = kvstore::client::Client::with_tls(
                        addr,
                        Duration::from_secs(10),
                        t.tls.as_ref(),
                    )?;
                    held.keys.push(client.status().await?.keys);
                }
                results.keys_per_node.retain(|k| k.target != held.target);
                results.keys_per_node.push(held);
            }
        }
    }
    echo_runtime.shutdown_background();
    drop(etcd_cluster);
    drop(kvstores);
    eprintln!();
    if args.memory || args.restart {
        big_node(args, server.clone(), &root, &mut results).await?;
    }
    if args.catchup {
        results.catchup_seconds = Some(catchup(args, server.clone(), &root).await?);
    }
    Ok(results)
}

/// Writes and batches the kvstore nodes at `addrs` have had confirmed by their peers, summed
/// over every node and peer.
async fn replicated(addrs: &[String], tls: Option<&ClientTlsConfig>) -> anyhow::Result<(u64, u64)> {
    let mut total = (0, 0);
    for addr in addrs {
        let status = kvstore::client::Client::with_tls(addr, Duration::from_secs(10), tls)?
            .status()
            .await?;
        for peer in status.peers {
            total.0 += peer.replicated_writes;
            total.1 += peer.replicated_batches;
        }
    }
    Ok(total)
}

/// One thing the load generator drives.
struct Target {
    /// Its name in the results: kvstore, kvstore-b, etcd or etcd-serializable.
    name: &'static str,
    /// The cluster whose keys it reads (etcd and etcd-serializable are one cluster).
    cluster: &'static str,
    addrs: Vec<String>,
    /// For etcd: read from the member's local state rather than through Raft.
    etcd_serializable: Option<bool>,
    /// A kvstore cluster serving TLS: how its clients talk to it.
    tls: Option<ClientTlsConfig>,
}

impl Target {
    fn kvstore(name: &'static str, addrs: Vec<String>, tls: Option<ClientTlsConfig>) -> Self {
        Self {
            name,
            cluster: name,
            addrs,
            etcd_serializable: None,
            tls,
        }
    }

    fn etcd(addrs: Vec<String>, serializable: bool) -> Self {
        Self {
            name: if serializable {
                "etcd-serializable"
            } else {
                "etcd"
            },
            cluster: "etcd",
            addrs,
            etcd_serializable: Some(serializable),
            tls: None,
        }
    }

    /// Whether it runs `workload`: serializable etcd is only a way of reading.
    fn runs(&self, workload: Workload) -> bool {
        self.etcd_serializable != Some(true) || matches!(workload, Workload::Get | Workload::Mixed)
    }

    /// `n` connections of its own.
    async fn connect(&self, n: usize) -> anyhow::Result<Vec<Conn>> {
        match self.etcd_serializable {
            None => {
                let tls = self.tls.clone();
                let conn = async |a: &str| Conn::kvstore_with(a, tls.clone()).await;
                connect(&self.addrs, n, conn).await
            }
            Some(ser) => connect(&self.addrs, n, async |a: &str| Conn::etcd(a, ser).await).await,
        }
    }
}

/// RSS of a process, from /proc.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// --memory and --restart: one node, `big_keys` keys.
async fn big_node(
    args: &Args,
    server: Option<PathBuf>,
    root: &std::path::Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    let server = server.context("--memory and --restart need the release binary")?;
    let mut cluster = ProcessCluster::start(ClusterSpec {
        server,
        nodes: 1,
        root: root.join("big"),
        extra_args: Vec::new(),
        proxied: false,
        tls: None,
        netns: None,
    })
    .await?;
    let addrs = vec![cluster.addr(0)];
    let pid = cluster.pid(0).context("node running")?;
    let empty = rss_bytes(pid)?;
    eprintln!("bench: loading {} keys into one node", args.big_keys);
    load::preload(connect(&addrs, 64, Conn::kvstore).await?, 0, args.big_keys).await?;
    let full = rss_bytes(pid)?;
    let per_key = (full.saturating_sub(empty)) as f64 / args.big_keys as f64;
    results.memory_bytes_per_key = Some(per_key);
    eprintln!("bench: RSS {empty} -> {full} bytes: {per_key:.0} bytes per key");
    if args.restart {
        cluster.stop(0);
        let started = Instant::now();
        cluster.restart(0).await?;
        // Serving means answering a read of the data, not just accepting a connection.
        let mut conn = Conn::kvstore(&addrs[0]).await?;
        conn.run(targets::Op::Get(load::key(args.big_keys - 1)))
            .await?;
        let took = started.elapsed().as_secs_f64();
        results.restart_seconds = Some(took);
        eprintln!(
            "bench: restart with {} keys: serving after {took:.2}s",
            args.big_keys
        );
    }
    Ok(())
}

/// --catchup: a node misses `missed_writes` writes, comes back; time until it has them all.
async fn catchup(
    args: &Args,
    server: Option<PathBuf>,
    root: &std::path::Path,
) -> anyhow::Result<f64> {
    let server = server.context("--catchup needs the release binary")?;
    let mut cluster = ProcessCluster::start(ClusterSpec {
        server,
        nodes: 3,
        root: root.join("catchup"),
        extra_args: kvstore_testkit::sharing_cores(3, Vec::new()),
        proxied: false,
        tls: None,
        netns: None,
    })
    .await?;
    cluster.kill(2);
    let live = vec![cluster.addr(0), cluster.addr(1)];
    eprintln!(
        "bench: writing {} keys while node3 is down",
        args.missed_writes
    );
    load::preload(
        connect(&live, 64, Conn::kvstore).await?,
        0,
        args.missed_writes,
    )
    .await?;
    let started = Instant::now();
    cluster.restart(2).await?;
    let client = cluster.client(2);
    loop {
        let status = client.status().await?;
        if status.keys >= args.missed_writes {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "node3 did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed().as_secs_f64();
    eprintln!(
        "bench: node3 caught up on {} writes in {took:.2}s",
        args.missed_writes
    );
    Ok(took)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Smoke-mode settings (short cells, a tiny key space, no etcd) plus `extra` flags.
    fn smoke_args(extra: &[&str]) -> Args {
        let base = ["bench", "--seconds", "0.2", "--keys", "50", "--no-etcd"];
        Args::parse_from(base.iter().chain(extra))
    }

    /// The harness in smoke mode: a tiny key space and short cells, against a real (in-process,
    /// durable) kvstore cluster and the echo server. Asserts only that it runs and reports every
    /// cell; speed is for the real run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smoke_run_reports_every_cell() {
        let results = measure(&smoke_args(&["--list-keys", "200"]), None)
            .await
            .unwrap();
        let cell = |w: Workload, t: &str, c: usize| {
            results
                .cells
                .iter()
                .find(|x| x.workload == w && x.target == t && x.concurrency == c)
                .unwrap_or_else(|| panic!("missing cell {w:?} {t} c={c}"))
        };
        for c in [1, 16, 64] {
            for w in [Workload::Put, Workload::Get] {
                assert!(cell(w, "echo", c).figures.ops > 0);
            }
            for w in [
                Workload::Put,
                Workload::Get,
                Workload::Mixed,
                Workload::Delete,
                Workload::List,
            ] {
                let f = &cell(w, "kvstore", c).figures;
                assert!(f.ops > 0, "{w:?} c={c}: {f:?}");
                assert_eq!(f.errors, 0, "{w:?} c={c}: {f:?}");
            }
            // A batch holds at least one write; reads have nothing to batch.
            let per = cell(Workload::Put, "kvstore", c).writes_per_batch;
            assert!(per.is_some_and(|p| p >= 1.0), "put c={c}: {per:?}");
            assert_eq!(cell(Workload::Get, "kvstore", c).writes_per_batch, None);
        }
        let md = report::markdown(&results);
        assert!(md.contains("| put |") && md.contains("ours/echo"), "{md}");
        assert!(md.contains("## Replication batching"), "{md}");
    }

    /// A/B mode runs every cell on both clusters, `rounds` times each, and reports B/A.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ab_smoke_run_alternates_both_clusters() {
        let args = smoke_args(&[
            "--workloads",
            "put,get",
            "--concurrency",
            "4",
            "--rounds",
            "2",
            "--b-node-args",
            "",
        ]);
        let results = measure(&args, None).await.unwrap();
        for w in [Workload::Put, Workload::Get] {
            for target in ["kvstore", "kvstore-b"] {
                let runs: Vec<_> = (results.cells.iter())
                    .filter(|x| x.workload == w && x.target == target)
                    .collect();
                assert_eq!(runs.len(), 2, "{w:?} on {target}");
                assert!(
                    runs.iter()
                        .all(|r| r.figures.ops > 0 && r.figures.errors == 0)
                );
            }
        }
        let md = report::markdown(&results);
        assert!(md.contains("## A/B") && md.contains("| put | 4 |"), "{md}");
    }
}
