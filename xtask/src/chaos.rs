//! `cargo xtask chaos [--netns] [--ring] --seconds N --seed S`: builds the server and runs
//! `kvstore_testkit::chaos` (see there for what it does and checks). Prints what it did and
//! found; exits non-zero on any violation, with the seed to replay it.

use anyhow::bail;
use kvstore_testkit::chaos::{self, ChaosConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long the faults and the workload run, in seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Seed of the fault schedule and the workload (random if not given).
    #[arg(long)]
    seed: Option<u64>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Use the release build.
    #[arg(long)]
    release: bool,
    /// Run the nodes as hosts in network namespaces, with latency and loss between them and
    /// links cut among the faults (needs root, `ip` and `nft`).
    #[arg(long)]
    netns: bool,
    /// Run a ring of 5 nodes with 3 copies of each key, with nodes joining and leaving among
    /// the kills and restarts; with --netns, partitions too.
    #[arg(long)]
    ring: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let server = crate::build::build(&["kvstore-server"], args.release)?.join("kvstore-server");
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let root = crate::build::target_dir()?
        .join("chaos")
        .join(seed.to_string());
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    println!(
        "chaos: seed {seed}, {}s, {} clients; node data and logs in {}",
        args.seconds,
        args.clients,
        root.display()
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(chaos::run(ChaosConfig {
        server,
        seconds: args.seconds,
        seed,
        clients: args.clients,
        root,
        netns: args.netns,
        ring: args.ring,
    }))?;
    println!("{report}");
    if !report.violations.is_empty() {
        bail!("{} violations (seed {seed})", report.violations.len());
    }
    Ok(())
}
