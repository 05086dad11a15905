//! The broker's settings: defaults, an optional TOML file, environment
//! variables and flags, in increasing order of precedence. Where each
//! setting in effect came from is kept ([`Config::settings_in_effect`]),
//! for `sluice broker status`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use serde::{Deserialize, Serialize};

use crate::auth::{AuthMode, AuthSettings, DEFAULT_BOOTSTRAP_USER};
use crate::server::ServerSettings;
use crate::server::auth::Reflection;
use crate::server::tls::TlsSettings;
use crate::storage::FlushPolicy;
use crate::topics::TopicDefaults;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
pub const DEFAULT_DATA_DIR: &str = "sluice-data";

/// Command-line flags; each also reads a `SLUICE_*` environment variable.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "sluice-broker",
    version,
    about = "Sluice: a persistent log broker",
    after_help = "To check a stopped broker's files for damage: \
                  sluice-broker check --data-dir <DIR> [--repair]"
)]
pub struct Args {
    /// TOML file with any of the settings below (flags and environment win).
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
}

/// Every setting. Unset ones come from the file, then the defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to serve gRPC on [default: 127.0.0.1:7070]; port 0 picks a free one.
    #[arg(long, env = "SLUICE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory [default: ./sluice-data].
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Partitions of a topic created without a count [default: 1].
    #[arg(long, env = "SLUICE_DEFAULT_PARTITIONS")]
    pub default_partitions: Option<u32>,
    /// Most partitions a topic may have [default: 1024].
    #[arg(long, env = "SLUICE_MAX_PARTITIONS")]
    pub max_partitions: Option<u32>,
    /// Segment file size for new topics [default: 134217728].
    #[arg(long, env = "SLUICE_SEGMENT_BYTES")]
    pub segment_bytes: Option<u64>,
    /// Flush policy for new topics: every-batch, interval(Nms) or os [default: every-batch].
    #[arg(long, env = "SLUICE_FLUSH")]
    pub flush: Option<String>,
    /// Time retention for new topics in ms, 0 = forever [default: 604800000].
    #[arg(long, env = "SLUICE_RETENTION_MS")]
    pub retention_ms: Option<u64>,
    /// Size retention per partition for new topics, 0 = none [default: 0].
    #[arg(long, env = "SLUICE_RETENTION_BYTES")]
    pub retention_bytes: Option<u64>,
    /// Largest record (its encoded key, value and headers) for new topics [default: 1048576].
    #[arg(long, env = "SLUICE_MAX_RECORD_BYTES")]
    pub max_record_bytes: Option<u32>,
    /// Largest gRPC message in either direction [default: 67108864].
    #[arg(long, env = "SLUICE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// How long shutdown waits for open calls, in ms [default: 10000].
    #[arg(long, env = "SLUICE_SHUTDOWN_TIMEOUT_MS")]
    pub shutdown_timeout_ms: Option<u64>,
    /// Forget idempotent producers idle this long, in ms [default: 604800000].
    #[arg(long, env = "SLUICE_PRODUCER_EXPIRY_MS")]
    pub producer_expiry_ms: Option<u64>,
    /// How often retention runs, in ms [default: 30000].
    #[arg(long, env = "SLUICE_MAINTENANCE_INTERVAL_MS")]
    pub maintenance_interval_ms: Option<u64>,
    /// Keep the offsets of a group this long after it became empty (or the broker started) and after its last commit, in ms [default: 604800000].
    #[arg(long, env = "SLUICE_GROUP_OFFSET_RETENTION_MS")]
    pub group_offset_retention_ms: Option<u64>,
    /// Refuse produce requests (RESOURCE_EXHAUSTED) while the data directory's file system has less free space than this, so the broker's own state and recovery keep room; 0 = no reserve [default: 67108864, at most 5% of the file system].
    #[arg(long, env = "SLUICE_MIN_FREE_BYTES")]
    pub min_free_bytes: Option<u64>,
    /// A retry handed to a consumer and neither acked nor nacked this long counts as a failed delivery, in ms [default: 30000].
    #[arg(long, env = "SLUICE_REDELIVERY_TIMEOUT_MS")]
    pub redelivery_timeout_ms: Option<u64>,

    // --- security (docs/SECURITY.md) ---------------------------------------
    /// Whether callers must authenticate (a bearer token or a client certificate): off or required [default: off].
    #[arg(long, env = "SLUICE_AUTH")]
    pub auth: Option<String>,
    /// Principals (user or certificate names) that pass every check, comma-separated.
    #[arg(long, env = "SLUICE_SUPERUSERS", value_delimiter = ',')]
    pub superusers: Option<Vec<String>>,
    /// On the first start, create a superuser whose token this file holds; a file that does not exist gets a new token (mode 0600). The token can also come from SLUICE_BOOTSTRAP_TOKEN.
    #[arg(long, env = "SLUICE_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// The bootstrap superuser's name [default: admin].
    #[arg(long, env = "SLUICE_BOOTSTRAP_USER")]
    pub bootstrap_user: Option<String>,
    /// Allow --auth off on an address beyond loopback (anyone who reaches it may do anything).
    #[arg(long, env = "SLUICE_ALLOW_UNAUTHENTICATED_REMOTE", num_args = 0..=1, default_missing_value = "true")]
    pub allow_unauthenticated_remote: Option<bool>,
    /// PEM certificate chain of the gRPC listener; with --tls-key, the listener speaks TLS only.
    #[arg(long, env = "SLUICE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SLUICE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates that client certificates are verified against (mutual TLS).
    #[arg(long, env = "SLUICE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// With --tls-client-ca: required (every client shows a certificate) or optional (a client without one must send a token) [default: required].
    #[arg(long, env = "SLUICE_TLS_CLIENT_AUTH")]
    pub tls_client_auth: Option<String>,
    /// How often the TLS files are checked for a change, in ms; SIGHUP reloads them at once [default: 2000].
    #[arg(long, env = "SLUICE_TLS_RELOAD_POLL_MS")]
    pub tls_reload_poll_ms: Option<u64>,
    /// Server reflection: public, authenticated or off [default: public].
    #[arg(long, env = "SLUICE_REFLECTION")]
    pub reflection: Option<String>,

    // Operations (docs/OPERATIONS.md).
    /// Serve Prometheus metrics over HTTP at /metrics [default: true].
    #[arg(long, env = "SLUICE_METRICS")]
    pub metrics: Option<bool>,
    /// Address of the metrics listener [default: 127.0.0.1:9644]; port 0 picks a free one.
    #[arg(long, env = "SLUICE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Metric series per partition as well as per topic; false keeps one series per topic (for brokers with very many partitions) [default: true].
    #[arg(long, env = "SLUICE_METRICS_PER_PARTITION")]
    pub metrics_per_partition: Option<bool>,
    /// Log line format: text or json (one JSON object per line) [default: text].
    #[arg(long, env = "SLUICE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Export spans over OTLP/gRPC to this collector URL, e.g. http://127.0.0.1:4317 (brokers built with the `otlp` feature) [default: none].
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    // The Kafka listener (docs/KAFKA.md).
    /// Serve Kafka's wire protocol on this address, e.g. 127.0.0.1:9092; port 0 picks a free one [default: off].
    #[arg(long, env = "SLUICE_KAFKA_LISTEN")]
    pub kafka_listen: Option<SocketAddr>,
    /// host:port Kafka clients are told to connect to (Metadata, FindCoordinator) [default: the Kafka listener's address].
    #[arg(long, env = "SLUICE_KAFKA_ADVERTISED")]
    pub kafka_advertised: Option<String>,
}

/// Who may call, over what: resolved security settings.
#[derive(Debug, Clone, Default)]
pub struct SecurityConfig {
    pub auth: AuthSettings,
    pub tls: Option<TlsSettings>,
    pub tls_poll: Duration,
    pub reflection: Reflection,
    /// `--auth off` beyond loopback was said to be intended.
    pub allow_unauthenticated_remote: bool,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where a setting in effect came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingSource {
    Flag,
    Environment,
    File,
    Default,
}

impl SettingSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SettingSource::Flag => "flag",
            SettingSource::Environment => "environment",
            SettingSource::File => "file",
            SettingSource::Default => "default",
        }
    }
}

/// One setting in effect: its TOML key, its value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingInEffect {
    pub name: String,
    pub value: String,
    pub source: SettingSource,
}

impl Args {
    /// Parses the process's arguments, noting which settings came from a
    /// flag and which from the environment.
    pub fn parse_with_sources() -> (Args, Vec<(String, SettingSource)>) {
        let matches = Args::command().get_matches();
        let args = match Args::from_arg_matches(&matches) {
            Ok(args) => args,
            Err(e) => e.exit(),
        };
        let sources = matches
            .ids()
            .filter_map(|id| {
                let source = match matches.value_source(id.as_str())? {
                    clap::parser::ValueSource::CommandLine => SettingSource::Flag,
                    clap::parser::ValueSource::EnvVariable => SettingSource::Environment,
                    _ => return None,
                };
                Some((id.as_str().to_owned(), source))
            })
            .collect();
        (args, sources)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// Settings resolved: everything the daemon needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub topics: TopicDefaults,
    pub server: ServerSettings,
    /// Free space kept back from client writes; `None` is the default
    /// (64 MiB, at most 5% of the file system).
    pub min_free_bytes: Option<u64>,
    pub security: SecurityConfig,
    /// Where `/metrics` is served; `None` when metrics are off.
    pub metrics_listen: Option<SocketAddr>,
    pub metrics: crate::metrics::MetricsSettings,
    pub log_format: LogFormat,
    /// Where spans are exported (OTLP/gRPC), if anywhere.
    pub otlp_endpoint: Option<String>,
    /// Where the Kafka listener binds; `None` when it is off.
    pub kafka_listen: Option<SocketAddr>,
    /// The `host:port` Kafka clients are sent to; `None`: the bound address.
    pub kafka_advertised: Option<(String, u16)>,
    /// The TOML file read, if any.
    pub config_file: Option<PathBuf>,
    /// Every setting in effect with its source, by name.
    settings_in_effect: Vec<SettingInEffect>,
}

impl Config {
    /// Resolves flags and environment over the file over the defaults.
    /// `sources` says which of the flags' settings came from the
    /// environment rather than the command line (see
    /// [`Args::parse_with_sources`]); a setting it does not name but the
    /// flags have counts as a flag.
    pub fn load(args: Args, sources: &[(String, SettingSource)]) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<Settings>(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => Settings::default(),
        };
        let mut config = Config::resolve(args.settings.clone(), file.clone())?;
        config.settings_in_effect = settings_in_effect(&args.settings, &file, &config, sources);
        config.config_file = args.config;
        // A secret: from the environment only, never a flag (argv is
        // visible to every user of the machine) or the file.
        config.security.auth.bootstrap_token = std::env::var("SLUICE_BOOTSTRAP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        Ok(config)
    }

    /// Every setting in effect, with where it came from.
    pub fn settings_in_effect(&self) -> &[SettingInEffect] {
        &self.settings_in_effect
    }

    /// The resolved settings written back as [`Settings`]: what a file
    /// would have to say to get this configuration.
    fn as_settings(&self) -> Settings {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Settings {
            listen: Some(self.listen),
            data_dir: Some(self.data_dir.clone()),
            default_partitions: Some(self.topics.partitions),
            max_partitions: Some(self.topics.max_partitions),
            segment_bytes: Some(self.topics.segment_bytes),
            flush: Some(self.topics.flush.to_string()),
            retention_ms: Some(self.topics.retention_ms.unwrap_or(0)),
            retention_bytes: Some(self.topics.retention_bytes.unwrap_or(0)),
            max_record_bytes: Some(self.topics.max_record_bytes),
            max_message_bytes: Some(self.server.max_message_bytes),
            shutdown_timeout_ms: Some(ms(self.server.shutdown_timeout)),
            producer_expiry_ms: Some(ms(self.topics.producer_expiry)),
            maintenance_interval_ms: Some(ms(self.server.maintenance_interval)),
            group_offset_retention_ms: Some(ms(self.server.group_offset_retention)),
            min_free_bytes: self.min_free_bytes,
            redelivery_timeout_ms: Some(ms(self.server.redelivery_timeout)),
            metrics: Some(self.metrics_listen.is_some()),
            metrics_listen: Some(self.metrics_listen.unwrap_or_else(default_metrics_listen)),
            metrics_per_partition: Some(self.metrics.per_partition),
            log_format: Some(self.log_format),
            otlp_endpoint: self.otlp_endpoint.clone(),
            kafka_listen: self.kafka_listen,
            kafka_advertised: self
                .kafka_advertised
                .as_ref()
                .map(|(host, port)| format!("{host}:{port}")),
            auth: Some(
                match self.security.auth.mode {
                    AuthMode::Off => "off",
                    AuthMode::Required => "required",
                }
                .to_owned(),
            ),
            superusers: Some(self.security.auth.superusers.clone()),
            bootstrap_token_file: self.security.auth.bootstrap_token_file.clone(),
            bootstrap_user: Some(self.security.auth.bootstrap_user.clone()),
            allow_unauthenticated_remote: Some(self.security.allow_unauthenticated_remote),
            tls_cert: self.security.tls.as_ref().map(|t| t.cert.clone()),
            tls_key: self.security.tls.as_ref().map(|t| t.key.clone()),
            tls_client_ca: self.security.tls.as_ref().and_then(|t| t.client_ca.clone()),
            tls_client_auth: self.security.tls.as_ref().map(|t| {
                if t.client_auth_optional {
                    "optional"
                } else {
                    "required"
                }
                .to_owned()
            }),
            tls_reload_poll_ms: Some(ms(self.security.tls_poll)),
            reflection: Some(self.security.reflection.as_str().to_owned()),
        }
    }

    fn resolve(flags: Settings, file: Settings) -> Result<Config, ConfigError> {
        macro_rules! pick {
            ($field:ident) => {
                flags.$field.clone().or(file.$field.clone())
            };
        }
        let topic_defaults = TopicDefaults::default();
        let server_defaults = ServerSettings::default();
        let flush = match pick!(flush) {
            Some(text) => text
                .parse::<FlushPolicy>()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
            None => topic_defaults.flush,
        };
        let zero_is_none = |v: u64| (v > 0).then_some(v);
        let mut topics = TopicDefaults {
            partitions: pick!(default_partitions).unwrap_or(topic_defaults.partitions),
            max_partitions: pick!(max_partitions).unwrap_or(topic_defaults.max_partitions),
            retention_ms: pick!(retention_ms).map_or(topic_defaults.retention_ms, zero_is_none),
            retention_bytes: pick!(retention_bytes)
                .map_or(topic_defaults.retention_bytes, zero_is_none),
            flush,
            max_record_bytes: pick!(max_record_bytes).unwrap_or(topic_defaults.max_record_bytes),
            segment_bytes: pick!(segment_bytes).unwrap_or(topic_defaults.segment_bytes),
            max_record_bytes_limit: topic_defaults.max_record_bytes_limit,
            producer_expiry: pick!(producer_expiry_ms)
                .map_or(topic_defaults.producer_expiry, Duration::from_millis),
        };
        let server = ServerSettings {
            max_message_bytes: pick!(max_message_bytes)
                .unwrap_or(server_defaults.max_message_bytes),
            shutdown_timeout: pick!(shutdown_timeout_ms)
                .map_or(server_defaults.shutdown_timeout, Duration::from_millis),
            maintenance_interval: pick!(maintenance_interval_ms)
                .map_or(server_defaults.maintenance_interval, Duration::from_millis),
            group_offset_retention: pick!(group_offset_retention_ms).map_or(
                server_defaults.group_offset_retention,
                Duration::from_millis,
            ),
            redelivery_timeout: pick!(redelivery_timeout_ms)
                .map_or(server_defaults.redelivery_timeout, Duration::from_millis),
        };
        // Every record a topic accepts must fit in a message back to a
        // consumer, with room for the rest of the message.
        topics.max_record_bytes_limit = u32::try_from(server.max_message_bytes)
            .unwrap_or(u32::MAX)
            .saturating_sub(1024);
        if topics.max_record_bytes > topics.max_record_bytes_limit {
            return Err(ConfigError::Invalid(format!(
                "max message size {} cannot carry a record of the largest size {} \
                 (it needs at least 1 KiB more)",
                server.max_message_bytes, topics.max_record_bytes
            )));
        }
        // The defaults must make a valid topic.
        topics
            .config(&Default::default())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if server.redelivery_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "redelivery timeout must be above 0".into(),
            ));
        }
        if server.maintenance_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "maintenance interval must be above 0".into(),
            ));
        }
        let listen: SocketAddr =
            pick!(listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let security = resolve_security(&flags, &file, listen)?;
        let metrics_listen = pick!(metrics_listen).unwrap_or_else(default_metrics_listen);
        let otlp_endpoint = pick!(otlp_endpoint).filter(|e| !e.is_empty());
        if otlp_endpoint.is_some() && !cfg!(feature = "otlp") {
            return Err(ConfigError::Invalid(
                "--otlp-endpoint needs a broker built with the `otlp` feature \
                 (cargo build --release -p sluice-broker --features otlp)"
                    .into(),
            ));
        }
        let kafka_listen = pick!(kafka_listen);
        // The Kafka listener cannot authenticate (no SASL yet): with
        // authentication off, its callers are superusers, so it stays on
        // loopback unless that is said to be intended, as for gRPC.
        if let Some(kafka) = kafka_listen
            && security.auth.mode == AuthMode::Off
            && !kafka.ip().is_loopback()
            && !security.allow_unauthenticated_remote
        {
            return Err(ConfigError::Invalid(format!(
                "refusing to serve Kafka on {kafka} with --auth off: anyone who can reach it \
                 could read, write and delete every topic. Listen on 127.0.0.1, use --auth \
                 required (Kafka callers are then held to the rules for \"anonymous\"; see \
                 docs/KAFKA.md), or pass --allow-unauthenticated-remote to say this is intended"
            )));
        }
        let kafka_advertised = match pick!(kafka_advertised).filter(|a| !a.is_empty()) {
            Some(address) => {
                if kafka_listen.is_none() {
                    return Err(ConfigError::Invalid(
                        "--kafka-advertised needs --kafka-listen".into(),
                    ));
                }
                Some(parse_host_port(&address)?)
            }
            None => None,
        };
        Ok(Config {
            listen,
            security,
            kafka_listen,
            kafka_advertised,
            data_dir: pick!(data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            topics,
            server,
            min_free_bytes: pick!(min_free_bytes),
            metrics_listen: pick!(metrics).unwrap_or(true).then_some(metrics_listen),
            metrics: crate::metrics::MetricsSettings {
                per_partition: pick!(metrics_per_partition).unwrap_or(true),
            },
            log_format: pick!(log_format).unwrap_or_default(),
            otlp_endpoint,
            config_file: None,
            settings_in_effect: Vec::new(),
        })
    }
}

fn resolve_security(
    flags: &Settings,
    file: &Settings,
    listen: SocketAddr,
) -> Result<SecurityConfig, ConfigError> {
    macro_rules! pick {
        ($field:ident) => {
            flags.$field.clone().or(file.$field.clone())
        };
    }
    let invalid = |e: String| ConfigError::Invalid(e);
    let mode: AuthMode = pick!(auth).map_or(Ok(AuthMode::Off), |m| m.parse().map_err(invalid))?;
    let allow_unauthenticated_remote = pick!(allow_unauthenticated_remote).unwrap_or(false);
    if mode == AuthMode::Off && !listen.ip().is_loopback() && !allow_unauthenticated_remote {
        return Err(ConfigError::Invalid(format!(
            "refusing to listen on {listen} with --auth off: anyone who can reach it could read, \
             write and delete every topic. Use --auth required (see docs/SECURITY.md), listen on \
             127.0.0.1, or pass --allow-unauthenticated-remote to say this is intended"
        )));
    }
    let tls = match (pick!(tls_cert), pick!(tls_key)) {
        (Some(cert), Some(key)) => {
            let client_auth_optional = match pick!(tls_client_auth).as_deref() {
                None | Some("required") => false,
                Some("optional") => true,
                Some(other) => {
                    return Err(invalid(format!(
                        "--tls-client-auth {other:?} is not one of: required, optional"
                    )));
                }
            };
            Some(TlsSettings {
                cert,
                key,
                client_ca: pick!(tls_client_ca),
                client_auth_optional,
            })
        }
        (None, None) if pick!(tls_client_ca).is_none() => None,
        _ => {
            return Err(invalid(
                "TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)"
                    .into(),
            ));
        }
    };
    let reflection =
        pick!(reflection).map_or(Ok(Reflection::Public), |r| r.parse().map_err(invalid))?;
    Ok(SecurityConfig {
        auth: AuthSettings {
            mode,
            superusers: pick!(superusers).unwrap_or_default(),
            bootstrap_token: None,
            bootstrap_token_file: pick!(bootstrap_token_file),
            bootstrap_user: pick!(bootstrap_user).unwrap_or_else(|| DEFAULT_BOOTSTRAP_USER.into()),
        },
        tls,
        tls_poll: Duration::from_millis(pick!(tls_reload_poll_ms).unwrap_or(2000).max(10)),
        reflection,
        allow_unauthenticated_remote,
    })
}

/// `host:port`, as Kafka clients are given a broker's address: a host name
/// or an IP (IPv6 in brackets), and a port above 0.
fn parse_host_port(address: &str) -> Result<(String, u16), ConfigError> {
    let invalid = |why: &str| {
        ConfigError::Invalid(format!(
            "Kafka advertised address {address:?} {why}; expected host:port, e.g. broker1.example.com:9092"
        ))
    };
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| invalid("has no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid("has no host"));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid("has no valid port"))?;
    Ok((host.to_owned(), port))
}

fn default_metrics_listen() -> SocketAddr {
    crate::metrics::DEFAULT_METRICS_LISTEN
        .parse()
        .expect("valid default")
}

/// Pairs each resolved setting with where it came from: a flag or the
/// environment, else the file, else the default.
fn settings_in_effect(
    flags: &Settings,
    file: &Settings,
    config: &Config,
    sources: &[(String, SettingSource)],
) -> Vec<SettingInEffect> {
    let as_map = |settings: &Settings| match serde_json::to_value(settings) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let (flags, file, effective) = (as_map(flags), as_map(file), as_map(&config.as_settings()));
    let is_set = |map: &serde_json::Map<String, serde_json::Value>, key: &str| {
        map.get(key).is_some_and(|v| !v.is_null())
    };
    effective
        .into_iter()
        .map(|(name, value)| {
            let source = if is_set(&flags, &name) {
                sources
                    .iter()
                    .find(|(id, _)| *id == name)
                    .map_or(SettingSource::Flag, |(_, source)| *source)
            } else if is_set(&file, &name) {
                SettingSource::File
            } else {
                SettingSource::Default
            };
            let value = match value {
                serde_json::Value::String(text) => text,
                serde_json::Value::Null => "(default)".to_owned(),
                other => other.to_string(),
            };
            SettingInEffect {
                name,
                value,
                source,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let file: Settings = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            flush = "os"
            retention_ms = 0
            segment_bytes = 8388608
            min_free_bytes = 1048576
            "#,
        )
        .unwrap();
        let flags = Settings {
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            ..Settings::default()
        };
        let config = Config::resolve(flags, file).unwrap();
        assert_eq!(config.listen.port(), 9100);
        assert_eq!(config.topics.flush, FlushPolicy::Os);
        assert_eq!(config.topics.retention_ms, None);
        assert_eq!(config.topics.segment_bytes, 8388608);
        assert_eq!(config.min_free_bytes, Some(1048576));
        assert_eq!(config.data_dir, PathBuf::from("sluice-data"));
    }

    #[test]
    fn every_setting_in_effect_says_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sluice.toml");
        std::fs::write(&file, "flush = \"os\"\nmetrics_per_partition = false\n").unwrap();
        let args = Args {
            config: Some(file),
            settings: Settings {
                listen: Some("127.0.0.1:9100".parse().unwrap()),
                data_dir: Some("/tmp/d".into()),
                ..Settings::default()
            },
        };
        let sources = [("data_dir".to_owned(), SettingSource::Environment)];
        let config = Config::load(args, &sources).unwrap();
        let find = |name: &str| {
            config
                .settings_in_effect()
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("{name} missing"))
                .clone()
        };
        let listen = find("listen");
        assert_eq!(
            (listen.value.as_str(), listen.source),
            ("127.0.0.1:9100", SettingSource::Flag)
        );
        assert_eq!(find("data_dir").source, SettingSource::Environment);
        let flush = find("flush");
        assert_eq!(
            (flush.value.as_str(), flush.source),
            ("os", SettingSource::File)
        );
        assert_eq!(find("metrics_per_partition").value, "false");
        let metrics = find("metrics_listen");
        assert_eq!(
            (metrics.value.as_str(), metrics.source),
            ("127.0.0.1:9644", SettingSource::Default)
        );
        assert_eq!(find("log_format").value, "text");
        assert_eq!(
            config.settings_in_effect().len(),
            34,
            "every setting is listed"
        );
        let auth = find("auth");
        assert_eq!(
            (auth.value.as_str(), auth.source),
            ("off", SettingSource::Default)
        );
        assert_eq!(find("otlp_endpoint").value, "(default)");
        assert_eq!(find("kafka_listen").value, "(default)");
        assert!(!config.metrics.per_partition);
    }

    #[test]
    fn the_kafka_advertised_address_is_host_and_port() {
        let settings = |advertised: &str| Settings {
            kafka_listen: Some("127.0.0.1:0".parse().unwrap()),
            kafka_advertised: Some(advertised.into()),
            ..Settings::default()
        };
        let config =
            Config::resolve(settings("broker1.example.com:9092"), Settings::default()).unwrap();
        assert_eq!(
            config.kafka_advertised,
            Some(("broker1.example.com".to_owned(), 9092))
        );
        let v6 = Config::resolve(settings("[::1]:9093"), Settings::default()).unwrap();
        assert_eq!(v6.kafka_advertised, Some(("::1".to_owned(), 9093)));
        for bad in ["no-port", ":9092", "host:0", "host:99999"] {
            let e = Config::resolve(settings(bad), Settings::default()).unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
        let remote = Settings {
            kafka_listen: Some("0.0.0.0:9092".parse().unwrap()),
            ..Settings::default()
        };
        let e = Config::resolve(remote, Settings::default()).unwrap_err();
        assert!(e.to_string().contains("refusing to serve Kafka"), "{e}");
        let without_listener = Settings {
            kafka_advertised: Some("h:1".into()),
            ..Settings::default()
        };
        let e = Config::resolve(without_listener, Settings::default()).unwrap_err();
        assert!(e.to_string().contains("--kafka-listen"), "{e}");
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        let bad: Result<Settings, _> = toml::from_str("colour = \"blue\"");
        assert!(bad.unwrap_err().to_string().contains("colour"));
        let flags = Settings {
            flush: Some("sometimes".into()),
            ..Settings::default()
        };
        let err = Config::resolve(flags, Settings::default()).unwrap_err();
        assert!(err.to_string().contains("flush policy"), "{err}");
        let flags = Settings {
            max_message_bytes: Some(1000),
            ..Settings::default()
        };
        assert!(Config::resolve(flags, Settings::default()).is_err());
    }

    #[test]
    fn auth_off_beyond_loopback_is_refused_unless_intended() {
        let beyond = Settings {
            listen: Some("0.0.0.0:7070".parse().unwrap()),
            ..Settings::default()
        };
        let err = Config::resolve(beyond.clone(), Settings::default()).unwrap_err();
        assert!(
            err.to_string().contains("--allow-unauthenticated-remote"),
            "{err}"
        );
        let intended = Settings {
            allow_unauthenticated_remote: Some(true),
            ..beyond.clone()
        };
        assert!(Config::resolve(intended, Settings::default()).is_ok());
        let required = Settings {
            auth: Some("required".into()),
            ..beyond
        };
        let config = Config::resolve(required, Settings::default()).unwrap();
        assert_eq!(config.security.auth.mode, AuthMode::Required);
        let half_tls = Settings {
            tls_cert: Some("cert.pem".into()),
            ..Settings::default()
        };
        assert!(Config::resolve(half_tls, Settings::default()).is_err());
    }
}
