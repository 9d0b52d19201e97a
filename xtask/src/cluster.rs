//! `cargo xtask cluster`: builds `kvstore-server` and runs N nodes on consecutive loopback
//! ports, each peered with all the others, under `kvstore_testkit::supervise`: every log line
//! prefixed with its node, a node that dies reported while the others go on, `restart N` typed
//! here to start it again, and Ctrl-C (or `stop`) to stop them all. With `--tls`, over mutual
//! TLS with a throwaway CA. The nodes share the machine's cores (`--worker-threads`). With
//! `--nodes 6 --replicas 3`, a ring: each key on three of the six.

use std::io::BufRead;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context, bail};
use kvstore_testkit::supervise::{self, Plan, Supervisor};
use kvstore_testkit::tls::ClusterPki;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: u16,
    /// Copies of each key (the nodes' --replicas). With fewer than --nodes, the keys are
    /// spread over the nodes. Without it, the nodes' own default (3 copies).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    replicas: Option<u16>,
    /// Port of the first node; the others take the next ports.
    #[arg(long, default_value_t = 5001)]
    base_port: u16,
    /// Build and run the release binary.
    #[arg(long)]
    release: bool,
    /// Serve TLS: a throwaway CA and a certificate per node (and one for a client) are made
    /// under target/cluster/tls, and the nodes talk mutual TLS to each other.
    #[arg(long)]
    tls: bool,
    /// Extra flags passed to every node, after `--` (e.g. `-- --write-quorum all`).
    #[arg(last = true)]
    server_args: Vec<String>,
}

/// What reaches the main loop: a line typed into the terminal, or Ctrl-C.
enum Input {
    Line(String),
    Interrupt,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let last = u32::from(args.base_port) + u32::from(args.nodes) - 1;
    if last > u32::from(u16::MAX) {
        bail!(
            "--base-port {} with {} nodes runs past port 65535",
            args.base_port,
            args.nodes
        );
    }
    let mut server_args = args.server_args;
    if let Some(replicas) = args.replicas {
        server_args.extend(["--replicas".to_string(), replicas.to_string()]);
    }
    let server = crate::build::build(&["kvstore-server"], args.release)?.join("kvstore-server");
    // Each shape of cluster keeps its data apart: a node refuses to start on data placed by
    // another ring, and the 3-node default keeps the place it always had.
    let mut data_root = crate::build::target_dir()?.join("cluster");
    if args.nodes != 3 || args.replicas.is_some() {
        let copies = args
            .replicas
            .map_or("default".to_string(), |r| r.to_string());
        data_root = data_root.join(format!("{}-nodes-{copies}-copies", args.nodes));
    }
    let tls = args
        .tls
        .then(|| ClusterPki::create(&data_root.join("tls"), usize::from(args.nodes)))
        .transpose()
        .context("making the cluster's TLS certificates")?;
    let plan = Plan {
        server,
        ports: (0..args.nodes).map(|i| args.base_port + i).collect(),
        data_root,
        extra_args: kvstore_testkit::sharing_cores(usize::from(args.nodes), server_args),
        tls,
    };
    let repl = plan.repl_args().join(" ");

    let (input, inputs) = mpsc::channel();
    let interrupt = input.clone();
    ctrlc::set_handler(move || {
        let _ = interrupt.send(Input::Interrupt);
    })
    .context("installing the Ctrl-C handler")?;
    // Lines typed into the terminal. At the end of input (no terminal) the cluster runs on,
    // until Ctrl-C or SIGTERM.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if input.send(Input::Line(line)).is_err() {
                break;
            }
        }
    });

    let nodes = plan.ports.len();
    let mut cluster = Supervisor::start(plan, Arc::new(Mutex::new(std::io::stdout())))?;
    cluster.say(&format!(
        "{nodes} nodes on 127.0.0.1:{}-{last}{}; open a REPL with `cargo run --bin kvstore-cli -- {repl}`; {}",
        args.base_port,
        if args.tls { " over TLS" } else { "" },
        supervise::HELP
    ));
    let clean = loop {
        match inputs.recv_timeout(Duration::from_millis(200)) {
            Ok(Input::Interrupt) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                break cluster.stop_all();
            }
            Ok(Input::Line(line)) => match supervise::parse_request(&line, nodes) {
                Ok(Some(supervise::Request::Stop)) => break cluster.stop_all(),
                Ok(Some(request)) => {
                    cluster.handle(request)?;
                }
                Ok(None) => {}
                Err(problem) => cluster.say(&problem),
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        cluster.poll();
    };
    if !clean {
        bail!("a node did not stop cleanly");
    }
    Ok(())
}
