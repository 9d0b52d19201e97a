//! Building the project's binaries, and finding where cargo puts them.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// The workspace root.
pub fn workspace() -> anyhow::Result<PathBuf> {
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

/// Builds the binaries `bins` (debug or release) and returns the directory they are in.
pub fn build(bins: &[&str], release: bool) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(&cargo);
    // --workspace: the binaries live in several of the workspace's packages (kvstore-bench in
    // its own), and without it cargo looks in the default package only.
    build
        .current_dir(workspace()?)
        .args(["build", "--workspace"]);
    for bin in bins {
        build.args(["--bin", bin]);
    }
    if release {
        build.arg("--release");
    }
    if !build.status().context("running cargo build")?.success() {
        bail!("building {} failed", bins.join(", "));
    }
    Ok(target_dir()?.join(if release { "release" } else { "debug" }))
}
