//! `sluice-broker`: parse settings, open the data directory, serve gRPC,
//! and shut down cleanly on SIGINT or SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sluice_broker::config::{Args, Config};
use sluice_broker::dlq::RetrySets;
use sluice_broker::groups::{GroupCoordinator, GroupSettings, OffsetStore};
use sluice_broker::server;
use sluice_broker::topics::TopicRegistry;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let config = Config::load(Args::parse())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice-worker")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run(config));
    // Every partition is closed by now. A blocking task still running (a
    // call abandoned at the shutdown deadline) must not hold up the exit,
    // which dropping the runtime would wait for without bound.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run(config: Config) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let defaults = config.topics.clone();
    let topics = tokio::task::spawn_blocking(move || TopicRegistry::open(data_dir, defaults))
        .await?
        .with_context(|| format!("opening data directory {}", config.data_dir.display()))?;
    let topics = Arc::new(topics);
    let offsets_dir = config.data_dir.join("internal/offsets");
    let offsets = tokio::task::spawn_blocking(move || OffsetStore::open(&offsets_dir))
        .await?
        .context("opening the committed offsets")?;
    let retries = {
        let topics = Arc::clone(&topics);
        let dir = config.data_dir.join("internal/retries");
        tokio::task::spawn_blocking(move || -> anyhow::Result<RetrySets> {
            let retries = RetrySets::open(&dir).context("opening the retry sets")?;
            // Never fails: a dead letter that cannot be written stays in
            // the retry set, undeliverable, and is logged.
            server::finish_pending_dead_letters(&topics, &retries);
            Ok(retries)
        })
        .await??
    };
    let retries = Arc::new(retries);
    let groups = Arc::new(GroupCoordinator::new(
        offsets,
        Box::new(Arc::clone(&topics)),
        GroupSettings::default(),
    ));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, data_dir = %config.data_dir.display(), "sluice-broker listening on {address}");
    server::serve(
        Arc::clone(&topics),
        Arc::clone(&groups),
        Arc::clone(&retries),
        listener,
        config.server.clone(),
        shutdown_signal(),
    )
    .await?;
    tracing::info!("flushing and closing every partition");
    tokio::task::spawn_blocking(move || {
        groups.offsets().close().context("closing the offsets")?;
        retries.close().context("closing the retry sets")?;
        topics.close().context("closing the topics")
    })
    .await??;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the broker");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
    }
}
