//! `sluice`: the command line for a Sluice broker.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sluice_client::security::{self, SecurityAdmin};
use sluice_client::{
    Admin, ClientConfig, Compression, ConsumedRecord, Consumer, GroupConfig, GroupConsumer,
    OffsetReset, Producer, ProducerConfig, Record, RedriveOptions, RedriveTarget, ResetTo,
    StartFrom, TlsConfig, TopicSettings,
};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_stream::StreamExt;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Command line for the Sluice log broker"
)]
struct Cli {
    /// The broker's URL.
    #[arg(
        long,
        env = "SLUICE_BROKER",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    broker: String,
    /// Bearer token sent with every call.
    #[arg(long, env = "SLUICE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// PEM CA certificates to verify the broker with; turns TLS on (https://).
    #[arg(long, env = "SLUICE_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for mutual TLS (with --tls-key).
    #[arg(long, env = "SLUICE_TLS_CERT", global = true, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SLUICE_TLS_KEY", global = true, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// The name the broker's certificate carries, if not the URL's host.
    #[arg(long, env = "SLUICE_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let mut config = ClientConfig::new(self.broker.clone());
        if self.tls_ca.is_some() || self.tls_cert.is_some() || self.broker.starts_with("https://") {
            let mut tls = TlsConfig {
                domain: self.tls_domain.clone(),
                ..TlsConfig::default()
            };
            if let Some(ca) = &self.tls_ca {
                tls = tls.with_ca_file(ca)?;
            }
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                tls = tls.with_identity_files(cert, key)?;
            }
            config = config.with_tls(tls);
        }
        if let Some(token) = &self.token {
            config = config.with_token(token.trim());
        }
        Ok(config)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create, list, describe, change and delete topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Produce records from lines of standard input or a file.
    Produce(ProduceArgs),
    /// Print records of a topic.
    Consume(ConsumeArgs),
    /// Print the offsets of a topic's partitions.
    Offsets(OffsetsArgs),
    /// List and describe consumer groups (with lag); reset their offsets.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Dead-letter queues: send dead letters back once the cause is fixed.
    /// (A DLQ is a topic: read it with `sluice consume <dlq> --format json`.)
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Create, list and delete users (docs/SECURITY.md).
    #[command(subcommand)]
    User(UserCommand),
    /// Issue and revoke users' bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Add, list and remove access rules.
    #[command(subcommand)]
    Acl(AclCommand),
    /// Print the principal the broker sees for this client.
    Whoami,
    /// The broker itself: its status.
    #[command(subcommand)]
    Broker(BrokerCommand),
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user.
    Create {
        name: String,
        /// A superuser passes every check.
        #[arg(long)]
        superuser: bool,
    },
    /// List users and their tokens (never the secrets).
    List,
    /// Delete a user and revoke its tokens.
    Delete { name: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a token; it is printed once and never shown again.
    Create {
        user: String,
        /// Lifetime: a number with ms, s, m, h or d (30d, 12h); none: until revoked.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// A note for operators.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Revoke a token by its id (or the whole token).
    Revoke { id: String },
}

#[derive(Args)]
struct AclRuleArgs {
    /// The principal (user or certificate name), or * for everyone.
    #[arg(long)]
    principal: String,
    /// The rule is about this topic (or prefix, with --prefix; * for all).
    #[arg(long, group = "resource")]
    topic: Option<String>,
    /// The rule is about this group (or prefix, with --prefix; * for all).
    #[arg(long, group = "resource")]
    group: Option<String>,
    /// The rule is about the cluster (creating topics, users and rules).
    #[arg(long, group = "resource")]
    cluster: bool,
    /// The name is a prefix.
    #[arg(long)]
    prefix: bool,
    /// read, write, create, delete, alter, describe or all.
    #[arg(long)]
    operation: String,
    /// A deny rule (deny beats allow); the default is allow.
    #[arg(long)]
    deny: bool,
}

impl AclRuleArgs {
    fn rule(&self) -> anyhow::Result<security::AclRule> {
        use security::{Operation, PatternType, Permission, ResourceType};
        let (kind, name) = match (&self.topic, &self.group, self.cluster) {
            (Some(t), None, false) => (ResourceType::Topic, t.as_str()),
            (None, Some(g), false) => (ResourceType::Group, g.as_str()),
            (None, None, true) => (ResourceType::Cluster, "*"),
            _ => bail!("name exactly one of --topic, --group or --cluster"),
        };
        let operation = match self.operation.as_str() {
            "read" => Operation::Read,
            "write" => Operation::Write,
            "create" => Operation::Create,
            "delete" => Operation::Delete,
            "alter" => Operation::Alter,
            "describe" => Operation::Describe,
            "all" => Operation::All,
            other => bail!(
                "operation {other:?} is not one of: read, write, create, delete, alter, describe, all"
            ),
        };
        Ok(security::acl_rule(
            &self.principal,
            kind,
            name,
            if self.prefix {
                PatternType::Prefixed
            } else {
                PatternType::Literal
            },
            operation,
            if self.deny {
                Permission::Deny
            } else {
                Permission::Allow
            },
        ))
    }
}

#[derive(Subcommand)]
enum AclCommand {
    /// Add a rule.
    Add(AclRuleArgs),
    /// List rules, all or one principal's.
    List {
        #[arg(long)]
        principal: Option<String>,
    },
    /// Remove a rule (every field must match).
    Remove(AclRuleArgs),
}

#[derive(Subcommand)]
enum BrokerCommand {
    /// Version and git commit, uptime, data directory and disk space, and
    /// every setting in effect with where it came from (flag, environment,
    /// file or default).
    Status,
}

/// `sluice broker status`.
async fn broker_status(config: &ClientConfig) -> anyhow::Result<()> {
    let status = Admin::new(config)?.broker_status().await?;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let uptime = status.uptime.as_secs();
    println!(
        "version     {} (commit {})",
        status.version, status.git_commit
    );
    println!(
        "uptime      {}d {:02}h {:02}m {:02}s",
        uptime / 86400,
        uptime / 3600 % 24,
        uptime / 60 % 60,
        uptime % 60
    );
    println!("data dir    {}", status.data_dir);
    println!(
        "disk        {:.1} MiB used by the data dir; {:.1} MiB free of {:.1} MiB",
        mib(status.data_dir_bytes),
        mib(status.disk_free_bytes),
        mib(status.disk_total_bytes)
    );
    if let Some(file) = &status.config_file {
        println!("config file {file}");
    }
    println!("settings:");
    let width = status
        .settings
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0);
    for setting in &status.settings {
        println!(
            "  {:width$}  {:<24}  ({})",
            setting.name, setting.value, setting.source
        );
    }
    Ok(())
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Change a topic's retry and dead-letter settings for one group
    /// (options not given keep the topic's; none at all clears the group's
    /// changes).
    Settings {
        group: String,
        #[arg(long)]
        topic: String,
        #[command(flatten)]
        settings: DeadLetterArgs,
    },
    /// Redrive dead letters: by default back to the group that failed them
    /// (only it sees them again).
    Redrive {
        /// The DLQ topic (`<topic>.<group>.dlq` by default).
        dlq_topic: String,
        #[arg(long, default_value_t = 0)]
        partition: u32,
        /// First DLQ offset (default: where the last redrive stopped).
        #[arg(long)]
        from: Option<u64>,
        /// One past the last DLQ offset (default: the end).
        #[arg(long)]
        to: Option<u64>,
        /// Append them to their source topic instead: every group sees them again.
        #[arg(long, conflicts_with = "to_topic")]
        to_source: bool,
        /// Append them to this topic instead.
        #[arg(long)]
        to_topic: Option<String>,
        /// Records per second at most.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Only list what would be redriven.
        #[arg(long)]
        dry_run: bool,
        /// Allow offsets an earlier redrive covered.
        #[arg(long)]
        allow_repeat: bool,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Every group, with members and lag.
    List,
    /// A group's members and, per partition, committed offset and lag.
    Describe { group: String },
    /// Move a group's committed offsets (the group must have no live
    /// members). Shows what would change; applies it only with --execute.
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        /// One partition; all of the topic's if not given.
        #[arg(long)]
        partition: Option<u32>,
        /// earliest, latest, offset:N or time:MS (ms since the epoch).
        #[arg(long, value_parser = parse_reset)]
        to: ResetTo,
        /// Apply the change (without it, nothing is written).
        #[arg(long)]
        execute: bool,
    },
}

#[derive(Subcommand)]
enum TopicCommand {
    Create {
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    List,
    Describe {
        name: String,
    },
    Alter {
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    Delete {
        name: String,
    },
}

#[derive(Args)]
struct SettingsArgs {
    #[arg(long)]
    partitions: Option<u32>,
    /// Time retention in ms (0: forever).
    #[arg(long)]
    retention_ms: Option<u64>,
    /// Size retention per partition (0: none).
    #[arg(long)]
    retention_bytes: Option<u64>,
    /// every-batch, interval(Nms) or os.
    #[arg(long)]
    flush: Option<String>,
    #[arg(long)]
    max_record_bytes: Option<u32>,
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// Codec of the stored batches: producer (keep each batch's own) or
    /// none, lz4, zstd (the broker recompresses batches to it).
    #[arg(long, value_parser = ["producer", "none", "lz4", "zstd"])]
    compression: Option<String>,
    #[command(flatten)]
    dead_letters: DeadLetterArgs,
}

#[derive(Args)]
struct DeadLetterArgs {
    /// Deliveries a nacked record gets before it is dead-lettered.
    #[arg(long)]
    max_deliveries: Option<u32>,
    /// Wait before the first redelivery, in ms.
    #[arg(long)]
    retry_backoff_ms: Option<u64>,
    /// Growth of the wait per redelivery.
    #[arg(long)]
    retry_backoff_multiplier: Option<f64>,
    /// Longest wait between redeliveries, in ms.
    #[arg(long)]
    retry_backoff_max_ms: Option<u64>,
    /// DLQ topic name template, with {topic} and {group}.
    #[arg(long)]
    dlq_topic: Option<String>,
}

impl DeadLetterArgs {
    fn settings(self) -> TopicSettings {
        TopicSettings {
            max_deliveries: self.max_deliveries,
            retry_backoff_ms: self.retry_backoff_ms,
            retry_backoff_multiplier: self.retry_backoff_multiplier,
            retry_backoff_max_ms: self.retry_backoff_max_ms,
            dlq_topic: self.dlq_topic,
            ..TopicSettings::default()
        }
    }
}

impl SettingsArgs {
    fn settings(self) -> TopicSettings {
        TopicSettings {
            partitions: self.partitions,
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            flush: self.flush,
            max_record_bytes: self.max_record_bytes,
            segment_bytes: self.segment_bytes,
            compression: self.compression,
            ..self.dead_letters.settings()
        }
    }
}

#[derive(Args)]
struct ProduceArgs {
    topic: String,
    /// Read lines from this file instead of standard input.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// The key of every record.
    #[arg(long, conflicts_with = "key_separator")]
    key: Option<String>,
    /// Split each line at the first SEP into key and value.
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// A header for every record, as name=value; repeatable.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// Send every record to this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Compress each batch the producer sends: none, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: Compression,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// `partition/offset key value`.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Args)]
struct ConsumeArgs {
    topic: String,
    /// Partitions to read (repeatable); all if none.
    #[arg(long = "partition")]
    partitions: Vec<u32>,
    /// earliest, latest, offset:N or time:MS (ms since the epoch).
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    from: StartFrom,
    /// Keep waiting for new records instead of stopping at the end.
    #[arg(long)]
    follow: bool,
    /// Stop after this many records.
    #[arg(long)]
    max: Option<u64>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Read as a member of this consumer group: the broker assigns the
    /// partitions, reading starts at the group's committed offsets (--from
    /// applies where there is none: earliest or latest), and progress is
    /// committed. Implies --follow.
    #[arg(long, conflicts_with = "partitions")]
    group: Option<String>,
    /// Skip past records the broker lost to a damaged file (with a warning)
    /// instead of stopping with a data-loss error.
    #[arg(long)]
    skip_data_loss: bool,
}

#[derive(Args)]
struct OffsetsArgs {
    topic: String,
    /// earliest, latest or time:MS (ms since the epoch).
    #[arg(long, default_value = "latest", value_parser = parse_start)]
    at: StartFrom,
}

fn parse_start(text: &str) -> Result<StartFrom, String> {
    match text {
        "earliest" => Ok(StartFrom::Earliest),
        "latest" => Ok(StartFrom::Latest),
        _ => {
            if let Some(n) = text.strip_prefix("offset:") {
                return n
                    .parse()
                    .map(StartFrom::Offset)
                    .map_err(|e| format!("{text}: {e}"));
            }
            if let Some(ms) = text.strip_prefix("time:") {
                return ms
                    .parse()
                    .map(StartFrom::Timestamp)
                    .map_err(|e| format!("{text}: {e}"));
            }
            Err(format!(
                "{text:?}: expected earliest, latest, offset:<n> or time:<ms>"
            ))
        }
    }
}

fn parse_reset(text: &str) -> Result<ResetTo, String> {
    Ok(match parse_start(text)? {
        StartFrom::Earliest => ResetTo::Earliest,
        StartFrom::Latest => ResetTo::Latest,
        StartFrom::Offset(n) => ResetTo::Offset(n),
        StartFrom::Timestamp(ms) => ResetTo::Timestamp(ms),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // Warnings of the client library (records skipped past a data loss,
    // say) go to stderr; RUST_LOG changes the level.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let config = cli.client_config()?;
    match cli.command {
        Command::User(command) => user(&config, command).await,
        Command::Token(command) => token(&config, command).await,
        Command::Acl(command) => acl(&config, command).await,
        Command::Whoami => {
            let me = SecurityAdmin::new(&config)?.who_am_i().await?;
            println!(
                "{}\tsuperuser={}\tauthenticated_by={}",
                me.principal, me.superuser, me.authenticated_by
            );
            Ok(())
        }
        Command::Topic(command) => topic(&config, command).await,
        Command::Produce(args) => produce(&config, args).await,
        Command::Consume(args) => match args.group.clone() {
            Some(group) => consume_in_group(&config, group, args).await,
            None => consume(&config, args).await,
        },
        Command::Group(command) => group(&config, command).await,
        Command::Dlq(command) => dlq(&config, command).await,
        Command::Broker(BrokerCommand::Status) => broker_status(&config).await,
        Command::Offsets(args) => {
            let admin = Admin::new(&config)?;
            for (partition, offset) in admin.offsets(&args.topic, &[], args.at).await? {
                println!("{partition}\t{offset}");
            }
            Ok(())
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a number followed by ms, s, m, h or d"))?;
    let ms = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("unit {unit:?} is not one of ms, s, m, h, d")),
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

fn format_ms(ms: Option<i64>) -> String {
    ms.map_or_else(|| "never".to_owned(), |ms| ms.to_string())
}

async fn user(config: &ClientConfig, command: UserCommand) -> anyhow::Result<()> {
    let admin = SecurityAdmin::new(config)?;
    match command {
        UserCommand::Create { name, superuser } => {
            let user = admin.create_user(&name, superuser).await?;
            println!("created user {} (superuser={})", user.name, user.superuser);
        }
        UserCommand::List => {
            for user in admin.list_users().await? {
                println!(
                    "{}\tsuperuser={}\ttokens={}",
                    user.name,
                    user.superuser,
                    user.tokens.len()
                );
                for t in user.tokens {
                    println!(
                        "  token {}\tcreated_ms={}\texpires_ms={}\t{}",
                        t.id,
                        t.created_ms,
                        format_ms(t.expires_ms),
                        t.description
                    );
                }
            }
        }
        UserCommand::Delete { name } => {
            let revoked = admin.delete_user(&name).await?;
            println!("deleted user {name} ({revoked} token(s) revoked)");
        }
    }
    Ok(())
}

async fn token(config: &ClientConfig, command: TokenCommand) -> anyhow::Result<()> {
    let admin = SecurityAdmin::new(config)?;
    match command {
        TokenCommand::Create {
            user,
            ttl,
            description,
        } => {
            let issued = admin.create_token(&user, ttl, &description).await?;
            eprintln!(
                "token {} for {} (expires_ms={}); it is shown only now:",
                issued.info.id,
                issued.info.user,
                format_ms(issued.info.expires_ms)
            );
            println!("{}", issued.token);
        }
        TokenCommand::Revoke { id } => {
            admin.revoke_token(&id).await?;
            println!("revoked token {id}");
        }
    }
    Ok(())
}

fn print_rule(rule: &security::AclRule) {
    let name = |v: &str| {
        v.trim_start_matches("RESOURCE_TYPE_")
            .trim_start_matches("PATTERN_TYPE_")
            .trim_start_matches("OPERATION_")
            .trim_start_matches("PERMISSION_")
            .to_lowercase()
    };
    let field = |n: i32, f: fn(i32) -> Option<&'static str>| name(f(n).unwrap_or("?"));
    println!(
        "{}\t{}\t{}\t{}\t{}\t{}",
        rule.principal,
        field(rule.resource_type, |n| security::ResourceType::try_from(n)
            .ok()
            .map(|v| v.as_str_name())),
        rule.resource_name,
        field(rule.pattern_type, |n| security::PatternType::try_from(n)
            .ok()
            .map(|v| v.as_str_name())),
        field(rule.operation, |n| security::Operation::try_from(n)
            .ok()
            .map(|v| v.as_str_name())),
        field(rule.permission, |n| security::Permission::try_from(n)
            .ok()
            .map(|v| v.as_str_name())),
    );
}

async fn acl(config: &ClientConfig, command: AclCommand) -> anyhow::Result<()> {
    let admin = SecurityAdmin::new(config)?;
    match command {
        AclCommand::Add(args) => {
            let rule = args.rule()?;
            let added = admin.add_acl(rule.clone()).await?;
            print_rule(&rule);
            println!("{}", if added { "added" } else { "already there" });
        }
        AclCommand::List { principal } => {
            println!("principal\tresource\tname\tpattern\toperation\tpermission");
            for rule in admin.list_acls(principal.as_deref()).await? {
                print_rule(&rule);
            }
        }
        AclCommand::Remove(args) => {
            let removed = admin.remove_acl(args.rule()?).await?;
            println!("{}", if removed { "removed" } else { "no such rule" });
        }
    }
    Ok(())
}

fn print_settings(s: &TopicSettings) {
    let or = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    println!(
        "  partitions={} retention_ms={} retention_bytes={} flush={} max_record_bytes={} segment_bytes={} compression={}",
        s.partitions.map_or("-".into(), |v| v.to_string()),
        or(s.retention_ms),
        or(s.retention_bytes),
        s.flush.as_deref().unwrap_or("-"),
        s.max_record_bytes.map_or("-".into(), |v| v.to_string()),
        or(s.segment_bytes),
        s.compression.as_deref().unwrap_or("-"),
    );
}

async fn topic(config: &ClientConfig, command: TopicCommand) -> anyhow::Result<()> {
    let admin = Admin::new(config)?;
    match command {
        TopicCommand::Create { name, settings } => {
            let created = admin.create_topic_with(&name, settings.settings()).await?;
            println!("created {name}");
            print_settings(&created);
        }
        TopicCommand::List => {
            for topic in admin.list_topics().await? {
                println!("{}", topic.name);
            }
        }
        TopicCommand::Describe { name } => {
            let info = admin.describe_topic(&name).await?;
            println!("{}", info.name);
            print_settings(&info.settings);
            println!("  partition\tearliest\tlatest\tbytes\tsegments");
            for p in &info.partitions {
                println!(
                    "  {}\t{}\t{}\t{}\t{}{}",
                    p.partition,
                    p.earliest_offset,
                    p.latest_offset,
                    p.size_bytes,
                    p.segments,
                    if p.lost_ranges.is_empty() {
                        ""
                    } else {
                        "\tDAMAGED"
                    }
                );
            }
            for p in &info.partitions {
                for r in &p.lost_ranges {
                    println!(
                        "  partition {} lost offsets {}..{} (next readable {}): {} at byte {}: {}",
                        p.partition,
                        r.start_offset,
                        r.next_offset,
                        r.next_offset,
                        r.file,
                        r.position,
                        r.reason
                    );
                }
            }
        }
        TopicCommand::Alter { name, settings } => {
            let altered = admin.alter_topic(&name, settings.settings()).await?;
            println!("altered {name}");
            print_settings(&altered);
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            println!("deleted {name}");
        }
    }
    Ok(())
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

async fn group(config: &ClientConfig, command: GroupCommand) -> anyhow::Result<()> {
    let admin = Admin::new(config)?;
    match command {
        GroupCommand::List => {
            println!("group\tmembers\tlag\tmax_time_lag_ms");
            for g in admin.list_groups().await? {
                println!(
                    "{}\t{}\t{}\t{}",
                    g.group_id, g.members, g.lag, g.max_time_lag_ms
                );
            }
        }
        GroupCommand::Describe { group } => {
            let info = admin.describe_group(&group).await?;
            println!(
                "{}: {} member(s), lag {}, max time lag {} ms",
                info.group_id,
                info.members.len(),
                info.lag,
                info.max_time_lag_ms
            );
            for d in &info.dead_letters {
                println!(
                    "  {}: {} retry(ies) pending, {} dead letter(s) in {}",
                    d.topic, d.retry_set_size, d.dlq_depth, d.dlq_topic
                );
                if d.undeliverable > 0 {
                    println!(
                        "    {} undeliverable dead letter(s): {}",
                        d.undeliverable,
                        d.undeliverable_reason.as_deref().unwrap_or("")
                    );
                }
            }
            for m in &info.members {
                let assigned: Vec<String> =
                    m.assigned.iter().map(|(t, p)| format!("{t}/{p}")).collect();
                println!(
                    "  member {} instance={} epoch={} heartbeat {} ms ago: {}",
                    m.member_id,
                    m.instance_id.as_deref().unwrap_or("-"),
                    m.member_epoch,
                    m.since_heartbeat_ms,
                    assigned.join(" ")
                );
            }
            println!("  topic\tpartition\tcommitted\tend\tlag\ttime_lag_ms\towner");
            for p in &info.partitions {
                println!(
                    "  {}\t{}\t{}\t{}\t{}\t{}\t{}",
                    p.topic,
                    p.partition,
                    or_dash(p.committed_offset),
                    p.end_offset,
                    or_dash(p.lag),
                    or_dash(p.time_lag_ms),
                    p.owner.as_deref().unwrap_or("-")
                );
            }
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            partition,
            to,
            execute,
        } => {
            let changes = admin
                .reset_offsets(&group, &topic, partition, to, !execute)
                .await?;
            println!("topic\tpartition\tprevious\tnew");
            for c in &changes {
                println!(
                    "{}\t{}\t{}\t{}",
                    c.topic,
                    c.partition,
                    or_dash(c.previous),
                    c.offset
                );
            }
            if execute {
                println!("reset {} partition(s) of group {group}", changes.len());
            } else {
                println!("dry run: nothing changed; add --execute to apply");
            }
        }
    }
    Ok(())
}

async fn dlq(config: &ClientConfig, command: DlqCommand) -> anyhow::Result<()> {
    let admin = Admin::new(config)?;
    match command {
        DlqCommand::Settings {
            group,
            topic,
            settings,
        } => {
            let effective = admin
                .set_group_dead_letter_settings(&group, &topic, settings.settings())
                .await?;
            println!(
                "{group} on {topic}: max_deliveries={} retry_backoff_ms={} multiplier={} \
                 retry_backoff_max_ms={} dlq_topic={}",
                or_dash(effective.max_deliveries),
                or_dash(effective.retry_backoff_ms),
                or_dash(effective.retry_backoff_multiplier),
                or_dash(effective.retry_backoff_max_ms),
                effective.dlq_topic.as_deref().unwrap_or("-")
            );
        }
        DlqCommand::Redrive {
            dlq_topic,
            partition,
            from,
            to,
            to_source,
            to_topic,
            rate,
            dry_run,
            allow_repeat,
        } => {
            let target = match (to_source, to_topic) {
                (true, _) => RedriveTarget::SourceTopic,
                (false, Some(topic)) => RedriveTarget::Topic(topic),
                (false, None) => RedriveTarget::Group,
            };
            let report = admin
                .redrive(
                    &dlq_topic,
                    partition,
                    RedriveOptions {
                        from_offset: from,
                        to_offset: to,
                        target,
                        max_records_per_second: rate,
                        dry_run,
                        allow_repeat,
                    },
                )
                .await?;
            for (topic, partition, offset) in &report.records {
                println!("{topic}/{partition}/{offset}");
            }
            println!(
                "{} {} dead letter(s) from {dlq_topic}/{partition} offsets {}..{}",
                if dry_run { "would redrive" } else { "redrove" },
                report.records.len(),
                report.from_offset,
                report.to_offset
            );
        }
    }
    Ok(())
}

/// Reads as a group member until --max records or Ctrl-C, then commits
/// and leaves.
async fn consume_in_group(
    config: &ClientConfig,
    group: String,
    args: ConsumeArgs,
) -> anyhow::Result<()> {
    let mut settings = GroupConfig::new(group, [args.topic.clone()]);
    settings.auto_offset_reset = match args.from {
        StartFrom::Earliest => OffsetReset::Earliest,
        StartFrom::Latest => OffsetReset::Latest,
        _ => bail!("with --group, --from is earliest or latest (where the group has no offset)"),
    };
    settings.skip_data_loss = args.skip_data_loss;
    let mut consumer = GroupConsumer::new(config, settings)?;
    let bar = progress(args.max, "records read");
    let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
    let mut count = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while args.max.is_none_or(|max| count < max) {
        let record = tokio::select! {
            record = consumer.next() => match record {
                Ok(record) => record,
                Err(error) => {
                    out.flush().await?;
                    return Err(error.into());
                }
            },
            _ = &mut interrupted => break,
        };
        out.write_all(format_record(&record, args.format).as_bytes())
            .await?;
        out.write_all(b"\n").await?;
        out.flush().await?;
        count += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Everything printed counts as processed.
    consumer.commit().await?;
    consumer.close().await?;
    Ok(())
}

fn format_record(record: &ConsumedRecord, format: Format) -> String {
    match format {
        Format::Json => json_line(record),
        Format::Text => format!(
            "{}/{}\t{}\t{}",
            record.partition,
            record.offset,
            record.key.as_deref().map(text).unwrap_or_default(),
            text(&record.value)
        ),
    }
}

/// A progress display on standard error, only when it is a terminal.
fn progress(len: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::new(len).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} ({per_sec}, eta {eta})")
                .expect("valid template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {pos} {msg} ({per_sec})")
                .expect("valid template"),
        ),
    };
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn produce(config: &ClientConfig, args: ProduceArgs) -> anyhow::Result<()> {
    let mut headers = Vec::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once('=')
            .with_context(|| format!("header {header:?} is not name=value"))?;
        headers.push((name.to_owned(), value.to_owned()));
    }
    let input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match &args.file {
        Some(path) => Box::new(
            tokio::fs::File::open(path)
                .await
                .with_context(|| format!("opening {}", path.display()))?,
        ),
        None => Box::new(tokio::io::stdin()),
    };
    let producer = Producer::new(
        config,
        ProducerConfig {
            compression: args.compression,
            ..ProducerConfig::default()
        },
    )?;
    let bar = progress(None, "records sent");
    let mut lines = BufReader::new(input).lines();
    let mut deliveries = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let (key, value) = match (&args.key, &args.key_separator) {
            (Some(key), _) => (Some(key.clone()), line),
            (None, Some(separator)) => match line.split_once(separator.as_str()) {
                Some((key, value)) => (Some(key.to_owned()), value.to_owned()),
                None => (None, line),
            },
            (None, None) => (None, line),
        };
        let mut record = Record::new(value);
        if let Some(key) = key {
            record = record.with_key(key);
        }
        for (name, value) in &headers {
            record = record.with_header(name.clone(), value.clone());
        }
        if let Some(partition) = args.partition {
            record = record.with_partition(partition);
        }
        deliveries.push(producer.enqueue(&args.topic, record).await?);
        bar.inc(1);
    }
    producer.flush().await?;
    let mut failed = 0;
    for delivery in deliveries.iter_mut() {
        if let Err(error) = delivery.await {
            failed += 1;
            if failed <= 5 {
                eprintln!("not delivered: {error}");
            }
        }
    }
    producer.close().await?;
    bar.finish_and_clear();
    let sent = deliveries.len() - failed;
    eprintln!("{sent} record(s) produced to {}", args.topic);
    if failed > 0 {
        bail!("{failed} record(s) were not delivered");
    }
    Ok(())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json_line(record: &ConsumedRecord) -> String {
    let mut object = serde_json::Map::new();
    object.insert("topic".into(), record.topic.clone().into());
    object.insert("partition".into(), record.partition.into());
    object.insert("offset".into(), record.offset.into());
    object.insert("timestamp_ms".into(), record.timestamp_ms.into());
    let mut put_bytes = |name: &str, bytes: Option<&[u8]>| match bytes.map(std::str::from_utf8) {
        None => {
            object.insert(name.into(), serde_json::Value::Null);
        }
        Some(Ok(s)) => {
            object.insert(name.into(), s.into());
        }
        Some(Err(_)) => {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(bytes.unwrap_or_default());
            object.insert(format!("{name}_base64"), encoded.into());
        }
    };
    put_bytes("key", record.key.as_deref());
    put_bytes("value", Some(&record.value));
    let headers: serde_json::Map<String, serde_json::Value> = record
        .headers
        .iter()
        .map(|h| (h.key.clone(), text(&h.value).into()))
        .collect();
    object.insert("headers".into(), headers.into());
    serde_json::Value::Object(object).to_string()
}

async fn consume(config: &ClientConfig, args: ConsumeArgs) -> anyhow::Result<()> {
    let admin = Admin::new(config)?;
    // Without --follow, stop at the end the partitions had when we started.
    let mut remaining: std::collections::HashMap<u32, u64> = if args.follow {
        Default::default()
    } else {
        admin
            .offsets(&args.topic, &args.partitions, StartFrom::Latest)
            .await?
            .into_iter()
            .collect()
    };
    let mut consumer = Consumer::new(config)?;
    consumer.set_skip_data_loss(args.skip_data_loss);
    consumer
        .assign(&args.topic, &args.partitions, args.from)
        .await?;
    if !args.follow {
        for (partition, end) in remaining.clone() {
            if consumer
                .position(&args.topic, partition)
                .is_some_and(|p| p >= end)
            {
                remaining.remove(&partition);
            }
        }
    }
    let total: Option<u64> = if args.follow { args.max } else { None };
    let bar = progress(total, "records read");
    let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
    let mut count = 0u64;
    while args.follow || !remaining.is_empty() {
        if args.max.is_some_and(|max| count >= max) {
            break;
        }
        let Some(record) = consumer.next().await else {
            break;
        };
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                // What was read before the error is still printed.
                out.flush().await?;
                return Err(error.into());
            }
        };
        let line = format_record(&record, args.format);
        out.write_all(line.as_bytes()).await?;
        out.write_all(b"\n").await?;
        if args.follow {
            out.flush().await?;
        }
        count += 1;
        bar.inc(1);
        if remaining
            .get(&record.partition)
            .is_some_and(|end| record.offset + 1 >= *end)
        {
            remaining.remove(&record.partition);
        }
    }
    out.flush().await?;
    bar.finish_and_clear();
    Ok(())
}
