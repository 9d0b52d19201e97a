//! Developer commands, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//! It needs nothing but cargo, so it works the same on every machine. Each command is a thin
//! driver: the work is in `kvstore-testkit` (the cluster, the chaos run) and `kvstore-bench`.
//!
//! - `cluster`: build `kvstore-server` and run a local cluster, logs prefixed per node.
//! - `chaos`: kill, restart and partition a cluster under load, then check what survived.
//! - `bench`: kvstore against etcd and a bare gRPC echo, side by side, with ratios.

mod bench;
mod build;
mod chaos;
mod cluster;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "kvstore developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build and run a local cluster (3 nodes on 127.0.0.1:5001-5003 by default) until Ctrl-C.
    Cluster(cluster::Args),
    /// Run a 3-node cluster under load while a seeded schedule kills, restarts and partitions
    /// nodes; heal, then check that every acknowledged write survived and all nodes agree.
    Chaos(chaos::Args),
    /// Benchmark a release 3-node cluster against etcd and a bare gRPC echo server, side by
    /// side; write bench/results/DATE.md and .json. `cargo xtask bench -- --help` for its
    /// options.
    Bench(bench::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Cluster(args) => cluster::run(args),
        Command::Chaos(args) => chaos::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
