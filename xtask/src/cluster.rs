//! `cargo xtask cluster`: builds `kvstore-server`, starts N nodes on consecutive loopback ports,
//! each peered with all the others, prefixes every log line with its node, and on Ctrl-C (or
//! when any node dies) stops them all with SIGTERM, by PID, and waits for them.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The workspace root.
fn workspace() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?
        .to_path_buf())
}

/// Cargo's target directory.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(workspace()?.join("target")))
}

/// Builds `kvstore-server` and returns its path.
pub fn build_server(release: bool) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .current_dir(workspace()?)
        .args(["build", "--bin", "kvstore-server"]);
    if release {
        build.arg("--release");
    }
    if !build.status().context("running cargo build")?.success() {
        bail!("building kvstore-server failed");
    }
    Ok(target_dir()?
        .join(if release { "release" } else { "debug" })
        .join("kvstore-server"))
}

/// Prints a status line. Never panics: if our stdout is gone (the terminal closed, a pager
/// quit), the nodes must still be stopped.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), "cluster: {}", format!($($arg)*));
    }};
}

/// How long nodes get to stop after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: u16,
    /// Port of the first node; the others take the next ports.
    #[arg(long, default_value_t = 5001)]
    base_port: u16,
    /// Build and run the release binary.
    #[arg(long)]
    release: bool,
    /// Extra flags passed to every node, after `--` (e.g. `-- --write-quorum all`).
    #[arg(last = true)]
    server_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let server = build_server(args.release)?;
    let target = target_dir()?;

    let last = u32::from(args.base_port) + u32::from(args.nodes) - 1;
    if last > u32::from(u16::MAX) {
        bail!(
            "--base-port {} with {} nodes runs past port 65535",
            args.base_port,
            args.nodes
        );
    }
    let ports: Vec<u16> = (0..args.nodes).map(|i| args.base_port + i).collect();

    let (interrupt, interrupted) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = interrupt.send(());
    })
    .context("installing the Ctrl-C handler")?;

    let mut children: Vec<Child> = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut cmd = Command::new(&server);
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--node-id")
            .arg(format!("node{}", i + 1))
            .arg("--data-dir")
            .arg(target.join("cluster").join(format!("node{}", i + 1)));
        for peer in ports.iter().filter(|p| *p != port) {
            cmd.arg("--peer").arg(format!("127.0.0.1:{peer}"));
        }
        cmd.args(&args.server_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", server.display()))?;
        let prefix = format!("[node{}]", i + 1);
        forward(child.stdout.take(), prefix.clone());
        forward(child.stderr.take(), prefix);
        children.push(child);
    }
    say!(
        "{} nodes on 127.0.0.1:{}-{}; open a REPL with `cargo run --bin kvstore-cli -- {}`; Ctrl-C stops all",
        args.nodes,
        args.base_port,
        last,
        args.base_port
    );

    // Wait for Ctrl-C, or for a node to die on its own (a failed start, say a port in use,
    // must not leave the others running silently).
    let mut failed = false;
    'supervise: loop {
        match interrupted.recv_timeout(Duration::from_millis(200)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                say!("stopping");
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        for (i, child) in children.iter_mut().enumerate() {
            if let Some(status) = child.try_wait()? {
                say!("node{} exited ({status}); stopping the others", i + 1);
                // A node that exits cleanly was stopped on purpose (someone sent it SIGTERM):
                // the cluster is incomplete, so it stops, but nothing failed.
                failed = !status.success();
                break 'supervise;
            }
        }
    }
    for child in &children {
        // By PID, never by name: only the processes this command started.
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    for (i, child) in children.iter_mut().enumerate() {
        loop {
            match child.try_wait()? {
                Some(status) => {
                    failed |= !status.success() && status.code().is_some();
                    say!("node{} stopped ({status})", i + 1);
                    break;
                }
                None if Instant::now() > deadline => {
                    say!("node{} did not stop in time; killing it", i + 1);
                    child.kill()?;
                    child.wait()?;
                    failed = true;
                    break;
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    if failed {
        bail!("a node failed");
    }
    Ok(())
}

/// Copies each line of a node's output to ours, prefixed with the node's name.
fn forward(stream: Option<impl std::io::Read + Send + 'static>, prefix: String) {
    let Some(stream) = stream else { return };
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{prefix} {line}");
        }
    });
}
