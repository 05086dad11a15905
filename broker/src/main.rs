//! `sluice-broker`: parse settings, open the data directory, serve gRPC,
//! and shut down cleanly on SIGINT or SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sluice_broker::auth::{AuthMode, Authorizer};
use sluice_broker::config::{Args, Config, LogFormat};
use sluice_broker::dlq::RetrySets;
use sluice_broker::groups::{GroupCoordinator, GroupSettings, OffsetStore};
use sluice_broker::kafka::{self, KafkaSettings};
use sluice_broker::metrics::{Metrics, serve_metrics};
use sluice_broker::server;
use sluice_broker::server::tls::ReloadingTls;
use sluice_broker::topics::TopicRegistry;
use tracing_subscriber::{EnvFilter, Layer};

/// Logs to stdout through `tracing`, filtered by `RUST_LOG` (default
/// `info`): text for people, or one JSON object per line (with the fields
/// of every enclosing span: request id, peer, principal, topic) for a log
/// pipeline.
///
/// With the `otlp` feature and an endpoint, spans are exported too; the
/// provider handed in comes back, to be shut down before exit (it sends
/// what is left).
fn init_logging(format: LogFormat, otlp: Option<OtlpProvider>) -> Option<OtlpProvider> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let fmt = match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt).with(filter);
    #[cfg(feature = "otlp")]
    let registry = registry.with(otlp.as_ref().map(sluice_broker::otlp::layer));
    registry.init();
    otlp
}

#[cfg(feature = "otlp")]
type OtlpProvider = opentelemetry_sdk::trace::SdkTracerProvider;
#[cfg(not(feature = "otlp"))]
type OtlpProvider = std::convert::Infallible;

fn main() -> anyhow::Result<()> {
    if std::env::args_os().nth(1).is_some_and(|a| a == "check") {
        init_logging(LogFormat::Text, None);
        return check(CheckArgs::parse_from(std::env::args_os().skip(1)));
    }
    let (args, sources) = Args::parse_with_sources();
    let config = Config::load(args, &sources)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice-worker")
        .build()
        .context("starting the async runtime")?;
    #[cfg(feature = "otlp")]
    let otlp = match &config.otlp_endpoint {
        Some(endpoint) => Some(sluice_broker::otlp::provider(
            endpoint,
            runtime.handle().clone(),
        )?),
        None => None,
    };
    #[cfg(not(feature = "otlp"))]
    let otlp = None;
    let otlp = init_logging(config.log_format, otlp);
    if let Some(endpoint) = &config.otlp_endpoint {
        tracing::info!(%endpoint, "exporting spans over OTLP");
    }
    // Every partition keeps a descriptor open.
    let open_files = sluice_broker::storage::raise_open_file_limit();
    tracing::info!(open_files, "open-file limit");
    let result = runtime.block_on(run(config));
    // Off the runtime's threads: the exporter blocks on the runtime.
    #[cfg(feature = "otlp")]
    if let Some(provider) = otlp
        && let Err(e) = provider.shutdown()
    {
        tracing::warn!(error = %e, "sending the last spans failed");
    }
    #[cfg(not(feature = "otlp"))]
    let _: Option<OtlpProvider> = otlp;
    // Every partition is closed by now. A blocking task still running (a
    // call abandoned at the shutdown deadline) must not hold up the exit,
    // which dropping the runtime would wait for without bound.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// `sluice-broker check`: an offline walk of a data directory.
#[derive(Debug, Parser)]
#[command(
    name = "sluice-broker check",
    about = "Check every file of a stopped broker's data directory for damage; \
             exits 1 when damage is found"
)]
struct CheckArgs {
    /// The data directory (the broker must be stopped).
    #[arg(long, env = "SLUICE_DATA_DIR")]
    data_dir: std::path::PathBuf,
    /// Move damaged ranges aside into `*.damaged` files and remove damaged
    /// indexes; valid data is never changed.
    #[arg(long)]
    repair: bool,
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let report = sluice_broker::check::check_data_dir(&args.data_dir, args.repair)
        .with_context(|| format!("checking data directory {}", args.data_dir.display()))?;
    for finding in &report.findings {
        let kind = if finding.is_damage { "DAMAGE" } else { "note" };
        println!("{kind}: {finding}");
    }
    let damaged = report.findings.iter().filter(|f| f.is_damage).count();
    println!(
        "checked {} partition logs in {}: {damaged} damaged file(s)",
        report.logs_checked,
        args.data_dir.display()
    );
    if report.has_damage() {
        std::process::exit(1);
    }
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let defaults = config.topics.clone();
    let topics = tokio::task::spawn_blocking(move || TopicRegistry::open(data_dir, defaults))
        .await?
        .with_context(|| format!("opening data directory {}", config.data_dir.display()))?;
    let min_free_bytes = topics
        .set_min_free_bytes(config.min_free_bytes)
        .context("reading the data directory's free space")?;
    tracing::info!(min_free_bytes, "free-space reserve for client writes");
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
            // Retries of topics deleted (or deleted and created again) while
            // a crash kept them from going with the topic. They are never
            // served (each access checks the incarnation), so a failure
            // here (a full disk, say) is logged, not fatal.
            if let Err(e) = retries.reconcile(&|name| topics.get(name).ok().map(|t| t.id())) {
                tracing::warn!(error = %e, "dropping the retries of deleted topics failed; retrying at the next start");
            }
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
    {
        // Offsets of topics deleted (or deleted and created again) while a
        // crash kept them from going with the topic; before any commit.
        // Offsets of another incarnation are never answered, so a failure
        // here (a full disk, say) is logged, not fatal: maintenance tries
        // again, and the broker must start on a full disk.
        let groups = Arc::clone(&groups);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        if let Err(e) =
            tokio::task::spawn_blocking(move || groups.discard_stale_offsets(now_ms)).await?
        {
            tracing::warn!(error = %e, "dropping the offsets of deleted topics failed; maintenance tries again");
        }
    }
    let security = open_security(&config)?;
    let metrics = match config.metrics_listen {
        Some(address) => {
            let metrics = Arc::new(Metrics::new(config.metrics));
            metrics.watch_state(
                Arc::clone(&topics),
                Arc::clone(&groups),
                Arc::clone(&retries),
            );
            metrics.observe_storage();
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listening for metrics on {address}"))?;
            let address = listener.local_addr()?;
            tracing::info!(%address, per_partition = config.metrics.per_partition, "metrics at http://{address}/metrics");
            tokio::spawn(serve_metrics(
                Arc::clone(&metrics),
                listener,
                std::future::pending(),
            ));
            Some(metrics)
        }
        None => None,
    };
    let state = server::BrokerState {
        topics: Arc::clone(&topics),
        groups: Arc::clone(&groups),
        retries: Arc::clone(&retries),
    };
    // Bound (and logged) before the gRPC listener, whose line says the
    // broker is up.
    let (stop_kafka, kafka_stopping) = tokio::sync::watch::channel(false);
    let kafka = match config.kafka_listen {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listening for Kafka clients on {address}"))?;
            let bound = listener.local_addr()?;
            let settings = KafkaSettings::new(bound, config.kafka_advertised.clone());
            let (host, port) = settings.advertised.clone();
            tracing::info!(address = %bound, advertised = %format!("{host}:{port}"), "kafka listener at {bound}");
            if security.auth.mode() == AuthMode::Required {
                tracing::warn!(
                    "the Kafka listener has no authentication (no SASL): its clients are the \
                     anonymous principal, allowed only what access rules grant it"
                );
            }
            Some(tokio::spawn(kafka::serve(
                state.clone(),
                Arc::clone(&security.auth),
                metrics.clone(),
                listener,
                settings,
                kafka_stopping,
            )))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        data_dir = %config.data_dir.display(),
        tls = security.tls.is_some(),
        auth = ?security.auth.mode(),
        "sluice-broker listening on {address}"
    );
    if security.tls.is_none()
        && security.auth.mode() == AuthMode::Required
        && !address.ip().is_loopback()
    {
        tracing::warn!(
            "authentication is required but TLS is off: tokens cross the network in the clear"
        );
    }
    let served = server::serve(
        state,
        listener,
        server::Observability {
            metrics,
            status: server::BrokerInfo::new(&config),
        },
        config.server.clone(),
        security,
        shutdown_signal(),
    )
    .await;
    let _ = stop_kafka.send(true);
    if let Some(kafka) = kafka {
        // Connections finish their current request; bounded like gRPC's.
        let _ = tokio::time::timeout(config.server.shutdown_timeout, kafka).await;
    }
    served?;
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

/// Opens the users and rules, and loads the TLS files.
fn open_security(config: &Config) -> anyhow::Result<server::Security> {
    let auth_dir = config.data_dir.join("internal/auth");
    let auth = Authorizer::open(&auth_dir, &config.security.auth)
        .with_context(|| format!("opening users and access rules in {}", auth_dir.display()))?;
    let tls = match &config.security.tls {
        Some(settings) => Some(Arc::new(
            ReloadingTls::load(settings.clone()).context("loading the TLS certificate")?,
        )),
        None => None,
    };
    Ok(server::Security {
        auth: Arc::new(auth),
        tls,
        tls_poll: config.security.tls_poll,
        reflection: config.security.reflection,
    })
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
