//! `kvstore-server`: runs one kvstore node until SIGTERM or Ctrl-C.

use std::io::IsTerminal;

use clap::Parser;
use kvstore::config::{LogFormat, ServerArgs};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// See Cargo.toml for why.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = ServerArgs::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        runtime.worker_threads(n);
    }
    runtime.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    // chitchat warns once per datagram it cannot read: anyone who can send UDP to the gossip
    // port could fill the disk with it. Its errors still show.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,chitchat=error"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }

    let (listen, config) = args.into_config()?;
    // Handlers are installed before the node says it started: a SIGTERM that arrives right
    // after must stop it gracefully, not kill it with the default disposition.
    let shutdown = shutdown_signal()?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    kvstore::server::run(listener, config, shutdown).await?;
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now; the future completes on the first of them.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!(signal = "Ctrl-C", "shutdown requested");
    })
}
