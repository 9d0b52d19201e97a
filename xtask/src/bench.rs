//! `cargo xtask bench [-- OPTIONS]`: builds `kvstore-server` and `kvstore-bench` in release
//! mode (the load generator must not be the bottleneck) and runs the benchmark with OPTIONS.

use anyhow::bail;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Options for the benchmark (`cargo xtask bench -- --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    options: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let bin = crate::build::build(&["kvstore-server", "kvstore-bench"], true)?;
    let status = std::process::Command::new(bin.join("kvstore-bench"))
        .args(&args.options)
        .status()?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}
