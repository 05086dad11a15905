//! `sluice-bench`: a load generator for Sluice and, for comparison, NATS
//! JetStream and Redis Streams (with the `peers` feature), plus the
//! loopback TCP ceiling.
//!
//! - `produce`: producers send batches to the topic's partitions, as fast
//!   as acknowledgements come back or at a fixed rate; reports records/s,
//!   MB/s and acknowledgement latency per batch.
//! - `consume`: writes a backlog (reported as a produce run), then reads it
//!   all back from the start with N consumers (catch-up read).
//! - `end-to-end`: consumers read while producers send at a fixed rate;
//!   each record carries its due send time (nanoseconds since the run's
//!   epoch, in its first 8 bytes) and latency is measured at receipt from
//!   that due time, so a stall cannot hide by delaying sends (the load is
//!   open-loop).
//! - `table`: the comparison table of results written with `--json`.
//!
//! What the values hold is `--payload` (`fill`, the default: one repeated
//! byte; `random`; `json`: compressible order events, see
//! [`sluice_benches::load::payload`]); Sluice's producers compress their
//! batches with `--compression` (`none`, `lz4`, `zstd`). Given the
//! broker's `--data-dir`, produce results (and a consume run's backlog)
//! carry `disk_bytes_per_record`: the bytes of the topic's batches in its
//! segment files after the produce, per record.
//!
//! Each run prints one JSON object per result on stdout (and appends it to
//! `--json FILE`), a progress bar on a terminal, and can draw its latency
//! distribution as SVG (`--plot`). Given the server's pid
//! (`--server-pid`), each result also carries the server's RssAnon at the
//! end and the CPU seconds it used during that result's measured phase
//! (`server_cpu_s`, and `server_cpu_s_per_gb` per 10^9 bytes of record
//! values): the timed produce, the timed read of a consume run (not its
//! backlog, which is charged to the backlog's own produce result) or the
//! whole timed end-to-end run. See `docs/BENCHMARKS.md` and
//! `benches/compare.sh`.

#[cfg(feature = "peers")]
mod peers;
mod systems;
mod tcp;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use sluice_benches::load::pacing::{Plan, Schedule};
use sluice_benches::load::payload::{self, Payload};
use sluice_benches::load::report::{Latency, RunResult, latency_histogram, record_latency};
use sluice_benches::load::{disk, plot, procfs, table};
use sluice_client::Compression;
use tokio::task::JoinSet;

use crate::systems::{Api, Reader, Sender, System};

#[derive(Parser)]
#[command(
    name = "sluice-bench",
    version,
    about = "Load generator for Sluice, NATS JetStream and Redis Streams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send records as fast as acknowledged (or at --rate); ack latency.
    Produce(RunArgs),
    /// Write a backlog, then read it all back from the start.
    Consume(RunArgs),
    /// Produce at a fixed rate and consume at once; latency send to receipt.
    EndToEnd(RunArgs),
    /// Print the comparison table of results written with --json.
    Table(TableArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Produce,
    Consume,
    EndToEnd,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Produce => "produce",
            Mode::Consume => "consume",
            Mode::EndToEnd => "end-to-end",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// sluice, nats, redis (with the `peers` feature) or tcp (loopback ceiling).
    #[arg(long, default_value = "sluice")]
    system: String,
    /// Where the system listens [default: http://127.0.0.1:7070,
    /// nats://127.0.0.1:4222, redis://127.0.0.1:6379].
    #[arg(long)]
    url: Option<String>,
    /// Bytes per record value (at least 8: the first 8 hold the send time).
    #[arg(long, default_value_t = 1024)]
    record_bytes: u64,
    /// Records per batch (one request, pipeline or publish burst).
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// Concurrent producers, each with its own connection.
    #[arg(long, default_value_t = 4)]
    producers: u64,
    /// Concurrent consumers; partitions are dealt out among them.
    #[arg(long, default_value_t = 4)]
    consumers: u32,
    /// Partitions of the topic (Redis: streams; NATS: subjects).
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// Unacknowledged batches per producer at most.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Total target rate in records/s (open loop); unset: as fast as acknowledged.
    #[arg(long)]
    rate: Option<f64>,
    /// Total target rate in MB/s (10^6 bytes of record values) instead of --rate.
    #[arg(long, conflicts_with = "rate")]
    mb_per_sec: Option<f64>,
    /// Records to send [default: 100000, or --mib, or --duration x rate].
    #[arg(long)]
    count: Option<u64>,
    /// Send this many MiB of record values instead of --count.
    #[arg(long, conflicts_with = "count")]
    mib: Option<u64>,
    /// Run this many seconds (needs a rate) instead of --count.
    #[arg(long, conflicts_with_all = ["count", "mib"])]
    duration: Option<f64>,
    /// Durability, in the system's terms: Sluice's flush policy
    /// (every-batch, interval(1000ms), os); Redis's appendfsync (always,
    /// everysec, no); NATS: file [default: every-batch, everysec, file].
    #[arg(long)]
    flush: Option<String>,
    /// Sluice: send with Producer::send_batch (batch) or enqueue per record.
    #[arg(long, value_enum, default_value = "batch")]
    api: Api,
    /// Sluice, --api record: the producer's linger in ms.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Sluice: the producers' batch compression (ProducerConfig::compression).
    #[arg(long, default_value = "none")]
    compression: Compression,
    /// What the record values hold: fill (8 zero bytes, then 0x5a: every
    /// record the same), random (incompressible) or json (order events,
    /// compressible, different in every record).
    #[arg(long, value_enum, default_value_t = Payload::Fill)]
    payload: Payload,
    /// Sluice: the broker's data directory; produce runs then report the
    /// bytes of the topic's batches on disk per record.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Topic (stream) name [default: a fresh bench-PID-MS name].
    #[arg(long)]
    topic: Option<String>,
    /// Keep the topic and its data after the run.
    #[arg(long)]
    keep_topic: bool,
    /// The server's pid: report its RssAnon at the end and the CPU seconds
    /// (user + system, from /proc/PID/stat) it used in each measured phase.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Label of the result in the comparison table [default: the mode].
    #[arg(long)]
    label: Option<String>,
    /// consume: label of the backlog's produce result [default: LABEL-backlog].
    #[arg(long)]
    backlog_label: Option<String>,
    /// Append each result as one JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the latency distribution to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Sluice: bearer token sent with every call.
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Sluice: PEM CA to verify the broker's certificate with (turns TLS on).
    #[arg(long, env = "SLUICE_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct TableArgs {
    /// JSON-lines files of results (from --json).
    #[arg(required = true)]
    results: Vec<PathBuf>,
    /// Also write the summary (medians, ratios, targets) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw each end-to-end workload's latency distributions, one line per
    /// system, to DIR/LABEL.svg.
    #[arg(long)]
    plots: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let (mode, args) = match cli.command {
        Command::Table(args) => return print_table(&args),
        Command::Produce(args) => (Mode::Produce, args),
        Command::Consume(args) => (Mode::Consume, args),
        Command::EndToEnd(args) => (Mode::EndToEnd, args),
    };
    ensure!(args.record_bytes >= 8, "--record-bytes must be at least 8");
    ensure!(
        args.batch > 0 && args.producers > 0 && args.partitions > 0,
        "batch, producers and partitions must be positive"
    );
    ensure!(
        args.system == "sluice" || args.compression == Compression::None,
        "--compression is Sluice's producer setting (--system sluice)"
    );
    ensure!(
        args.data_dir.is_none() || (args.system == "sluice" && mode != Mode::EndToEnd),
        "--data-dir: Sluice's produce runs (produce, and the backlog of consume) only"
    );
    let results = if args.system == "tcp" {
        ensure!(
            mode == Mode::Produce,
            "--system tcp is the loopback ceiling: produce only"
        );
        ensure!(
            args.payload == Payload::Fill,
            "--system tcp sends bytes, not records: no --payload"
        );
        vec![run_tcp(&args)?]
    } else {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(run(mode, &args))?
    };
    for (result, histogram) in &results {
        report(&args, result)?;
        if let (Some(path), Some(histogram)) = (&args.plot, histogram)
            && !histogram.is_empty()
        {
            let name = format!(
                "{} {} [{}], p99 {:.2} ms",
                result.system,
                result.mode,
                result.durability,
                histogram.value_at_quantile(0.99) as f64 / 1e6
            );
            let title = format!(
                "{} latency, {} B records, {} rec/s",
                result.latency_kind.as_deref().unwrap_or("ack"),
                result.record_bytes,
                result
                    .target_rate
                    .map_or("max".to_owned(), |r| format!("{r:.0}"))
            );
            let svg = plot::latency_svg(&title, &[(name, plot::percentile_curve(histogram))]);
            std::fs::write(path, svg).with_context(|| format!("write {}", path.display()))?;
        }
    }
    Ok(())
}

impl RunArgs {
    fn url(&self) -> String {
        self.url.clone().unwrap_or_else(|| {
            match self.system.as_str() {
                "nats" => "nats://127.0.0.1:4222",
                "redis" => "redis://127.0.0.1:6379",
                _ => "http://127.0.0.1:7070",
            }
            .to_owned()
        })
    }

    fn flush(&self) -> String {
        self.flush.clone().unwrap_or_else(|| {
            match self.system.as_str() {
                "nats" => "file",
                "redis" => "everysec",
                "tcp" => "none",
                _ => "every-batch",
            }
            .to_owned()
        })
    }

    /// What an acknowledgement promises, for the report.
    fn durability(&self) -> String {
        let flush = self.flush();
        match self.system.as_str() {
            "sluice" => format!("flush={flush}"),
            "redis" => format!("appendfsync {flush}"),
            "nats" => "file storage, periodic sync".to_owned(),
            _ => "none (memory)".to_owned(),
        }
    }

    fn rate(&self) -> Option<f64> {
        self.rate.or(self
            .mb_per_sec
            .map(|mb| mb * 1e6 / self.record_bytes as f64))
    }

    fn count(&self) -> Result<u64> {
        Ok(match (self.count, self.mib, self.duration) {
            (Some(count), _, _) => count,
            (_, Some(mib), _) => mib * 1024 * 1024 / self.record_bytes,
            (_, _, Some(seconds)) => {
                let rate = self
                    .rate()
                    .ok_or_else(|| anyhow!("--duration needs --rate or --mb-per-sec"))?;
                (rate * seconds).round() as u64
            }
            _ => 100_000,
        })
    }

    fn plan(&self) -> Result<Plan> {
        Ok(Plan {
            count: self.count()?,
            batch: self.batch,
            producers: self.producers,
            partitions: self.partitions,
        })
    }

    fn result(&self, mode: Mode, label: Option<String>) -> RunResult {
        RunResult {
            label: label
                .or(self.label.clone())
                .unwrap_or(mode.name().to_owned()),
            system: self.system.clone(),
            mode: mode.name().to_owned(),
            durability: self.durability(),
            record_bytes: self.record_bytes,
            batch: self.batch,
            producers: self.producers,
            consumers: if mode == Mode::Produce {
                0
            } else {
                u64::from(self.consumers)
            },
            partitions: self.partitions,
            target_rate: self.rate(),
            records: 0,
            seconds: 0.0,
            records_per_sec: 0.0,
            mb_per_sec: 0.0,
            latency_kind: None,
            latency: None,
            server_rss_anon_kib: None,
            server_cpu_s: None,
            server_cpu_s_per_gb: None,
            disk_bytes_per_record: None,
            payload: Some(self.payload.name().to_owned()),
            compression: (self.system == "sluice").then(|| self.compression.name().to_owned()),
            latency_curve: Vec::new(),
        }
    }

    /// The server's CPU time so far in clock ticks, when its pid is given
    /// and readable.
    fn server_cpu(&self) -> Option<u64> {
        let pid = self.server_pid?;
        match procfs::cpu_ticks(pid) {
            Ok(ticks) => Some(ticks),
            Err(error) => {
                eprintln!("warning: {error}");
                None
            }
        }
    }

    /// The server's CPU seconds since `before` (an earlier
    /// [`RunArgs::server_cpu`]; clock ticks of 10 ms, so a phase's figure
    /// is good to about 0.01 s), when both readings were made.
    fn server_cpu_since(&self, before: Option<u64>) -> Option<f64> {
        Some(procfs::ticks_to_seconds(
            self.server_cpu()?.saturating_sub(before?),
        ))
    }

    /// The result of a timed produce (a produce run, or a consume run's
    /// backlog, labelled `label`): rates, the server's CPU, the bytes on
    /// disk per record and the acknowledgement latencies.
    fn produce_result(
        &self,
        label: Option<String>,
        produced: &Produced,
        topic: &str,
        records: u64,
    ) -> Result<RunResult> {
        let mut result = self.result(Mode::Produce, label);
        result.set_rates(records, produced.elapsed);
        result.set_server_cpu(produced.server_cpu);
        result.disk_bytes_per_record = disk_bytes_per_record(self, topic, records)?;
        result.latency_kind = Some("ack".into());
        result.latency = Latency::of(&produced.acks);
        Ok(result)
    }

    fn progress(&self, total: u64, what: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        ProgressBar::new(total)
            .with_style(
                ProgressStyle::with_template(
                    "{msg:>12} {bar:40} {pos}/{len} records ({per_sec}, eta {eta})",
                )
                .expect("valid template"),
            )
            .with_message(format!("{} {what}", self.system))
    }
}

type Outcome = (RunResult, Option<Histogram<u64>>);

fn run_tcp(args: &RunArgs) -> Result<Outcome> {
    let plan = args.plan()?;
    let progress = args.progress(plan.count, "produce");
    let (bytes, elapsed) = tcp::run(plan, args.record_bytes, &progress)?;
    progress.finish_and_clear();
    let mut result = args.result(Mode::Produce, None);
    result.payload = None;
    result.set_rates(bytes / args.record_bytes, elapsed);
    Ok((result, None))
}

async fn run(mode: Mode, args: &RunArgs) -> Result<Vec<Outcome>> {
    let system = System::connect(
        &args.system,
        &args.url(),
        args.api,
        Duration::from_millis(args.linger_ms),
        args.compression,
        systems::Credentials {
            token: args.token.clone(),
            tls_ca: args.tls_ca.clone(),
        },
    )
    .await?;
    let plan = args.plan()?;
    let topic = args.topic.clone().unwrap_or_else(|| {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        format!("bench-{}-{ms}", std::process::id())
    });
    system
        .create_topic(&topic, args.partitions, &args.flush())
        .await?;
    let outcome = run_on_topic(mode, args, &system, &topic, plan).await;
    let rss = args
        .server_pid
        .and_then(|pid| match procfs::rss_anon_kib(pid) {
            Ok(kib) => Some(kib),
            Err(error) => {
                eprintln!("warning: {error}");
                None
            }
        });
    if !args.keep_topic {
        system.delete_topic(&topic, args.partitions).await?;
    }
    let mut outcome = outcome?;
    for (result, _) in &mut outcome {
        result.server_rss_anon_kib = rss;
    }
    Ok(outcome)
}

async fn run_on_topic(
    mode: Mode,
    args: &RunArgs,
    system: &System,
    topic: &str,
    plan: Plan,
) -> Result<Vec<Outcome>> {
    let epoch = Instant::now();
    match mode {
        Mode::Produce => {
            let progress = args.progress(plan.count, "produce");
            let produced = produce(args, system, topic, plan, epoch, &progress).await?;
            progress.finish_and_clear();
            let result = args.produce_result(None, &produced, topic, plan.count)?;
            Ok(vec![(result, Some(produced.acks))])
        }
        Mode::Consume => {
            let progress = args.progress(plan.count, "backlog");
            let produced = produce(args, system, topic, plan, epoch, &progress).await?;
            progress.finish_and_clear();
            let label = args.backlog_label.clone().unwrap_or_else(|| {
                format!("{}-backlog", args.label.as_deref().unwrap_or("consume"))
            });
            let mut backlog = args.produce_result(Some(label), &produced, topic, plan.count)?;
            backlog.consumers = 0;
            let progress = args.progress(plan.count, "consume");
            let readers = readers(args, system, topic, plan).await?;
            // Only the read is charged: the backlog's CPU is its own result's.
            let cpu_before = args.server_cpu();
            let start = Instant::now();
            let (_, last) = consume(readers, false, epoch, &progress).await?;
            let server_cpu = args.server_cpu_since(cpu_before);
            progress.finish_and_clear();
            let mut result = args.result(mode, None);
            result.set_rates(plan.count, last.duration_since(start));
            result.set_server_cpu(server_cpu);
            Ok(vec![(backlog, Some(produced.acks)), (result, None)])
        }
        Mode::EndToEnd => {
            ensure!(
                args.rate().is_some(),
                "end-to-end needs a fixed load: --rate or --mb-per-sec"
            );
            let progress = args.progress(plan.count, "end-to-end");
            let readers = readers(args, system, topic, plan).await?;
            // The whole timed run is charged: the producers' connections
            // and the readers' subscriptions are made before it starts.
            let cpu_before = args.server_cpu();
            let consumers = tokio::spawn({
                let progress = progress.clone();
                async move { consume(readers, true, epoch, &progress).await }
            });
            let start = Instant::now();
            let hidden = ProgressBar::hidden();
            let produced = produce(args, system, topic, plan, epoch, &hidden).await;
            let (latencies, last) = consumers.await??;
            produced?;
            let server_cpu = args.server_cpu_since(cpu_before);
            progress.finish_and_clear();
            let mut result = args.result(mode, None);
            result.set_rates(plan.count, last.duration_since(start));
            result.set_server_cpu(server_cpu);
            result.latency_kind = Some("end-to-end".into());
            result.latency = Latency::of(&latencies);
            result.latency_curve = plot::percentile_curve(&latencies);
            Ok(vec![(result, Some(latencies))])
        }
    }
}

/// Given `--data-dir`: the bytes of `topic`'s batches in its segment
/// files, per record of the `records` produced.
fn disk_bytes_per_record(args: &RunArgs, topic: &str, records: u64) -> Result<Option<f64>> {
    let Some(data_dir) = &args.data_dir else {
        return Ok(None);
    };
    let usage = disk::topic_usage(data_dir, topic)?;
    Ok((records > 0).then(|| usage.batch_bytes as f64 / records as f64))
}

fn nanos_since(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// What every producer of a run shares.
#[derive(Clone, Copy)]
struct Load {
    plan: Plan,
    schedule: Schedule,
    in_flight: usize,
    record_bytes: u64,
    payload: Payload,
    epoch: Instant,
    /// Each batch carries its own due time (end-to-end: a copy of the
    /// pre-built values with the time in their first 8 bytes); otherwise
    /// every batch reuses the producer's pre-built values, so the load
    /// generator, which shares the machine with the server, spends no
    /// time filling buffers.
    stamped: bool,
}

/// What [`produce`] measured.
struct Produced {
    /// From the first due send to the last acknowledgement.
    elapsed: Duration,
    /// The acknowledgement latencies.
    acks: Histogram<u64>,
    /// The server's CPU seconds over the same span, given its pid.
    server_cpu: Option<f64>,
}

/// Runs every producer of `plan`: the producers' connections are made
/// first, then the timed sends.
async fn produce(
    args: &RunArgs,
    system: &System,
    topic: &str,
    plan: Plan,
    epoch: Instant,
    progress: &ProgressBar,
) -> Result<Produced> {
    let stamped = args.rate().is_some();
    let mut senders = Vec::new();
    for _ in 0..plan.producers {
        senders.push(system.sender().await?);
    }
    let cpu_before = args.server_cpu();
    let start = Instant::now();
    let load = Load {
        plan,
        schedule: Schedule::new(start, args.rate(), plan.batch),
        in_flight: args.in_flight.max(1),
        record_bytes: args.record_bytes,
        payload: args.payload,
        epoch,
        stamped,
    };
    let mut tasks = JoinSet::new();
    for (p, sender) in senders.into_iter().enumerate() {
        tasks.spawn(producer(
            sender,
            topic.to_owned(),
            load,
            p as u64,
            progress.clone(),
        ));
    }
    let mut acks = latency_histogram();
    while let Some(result) = tasks.join_next().await {
        acks.add(result??)?;
    }
    let elapsed = start.elapsed();
    Ok(Produced {
        elapsed,
        acks,
        server_cpu: args.server_cpu_since(cpu_before),
    })
}

async fn producer(
    sender: Sender,
    topic: String,
    load: Load,
    p: u64,
    progress: ProgressBar,
) -> Result<Histogram<u64>> {
    let Load {
        plan,
        schedule,
        in_flight,
        record_bytes,
        payload,
        epoch,
        stamped,
    } = load;
    // Built before the first send is due: payload generation is not timed.
    let template = payload.values(plan.batch, record_bytes, p);
    let mut acks = latency_histogram();
    let mut pending: JoinSet<Result<Duration>> = JoinSet::new();
    for j in plan.producer_batches(p) {
        while pending.len() >= in_flight {
            let latency = pending.join_next().await.expect("not empty")??;
            record_latency(&mut acks, latency);
        }
        let due = match schedule.due(j) {
            Some(due) => {
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => Instant::now(),
        };
        let len = plan.batch_len(j);
        let values = if stamped {
            payload::stamp(&template[..len as usize], nanos_since(epoch, due))
        } else {
            template[..len as usize].to_vec()
        };
        let (sender, topic, progress) = (sender.clone(), topic.clone(), progress.clone());
        let partition = plan.partition_of(j);
        pending.spawn(async move {
            sender
                .send(&topic, partition, values)
                .await
                .with_context(|| format!("send a batch to {topic}/{partition}"))?;
            progress.inc(len);
            Ok(due.elapsed())
        });
    }
    while let Some(latency) = pending.join_next().await {
        record_latency(&mut acks, latency??);
    }
    sender.close().await?;
    Ok(acks)
}

/// One reader per consumer with what it must read.
async fn readers(
    args: &RunArgs,
    system: &System,
    topic: &str,
    plan: Plan,
) -> Result<Vec<(Reader, u64)>> {
    let mut readers = Vec::new();
    for c in 0..args.consumers.clamp(1, plan.partitions) {
        let partitions = plan.consumer_partitions(c, args.consumers.clamp(1, plan.partitions));
        let expected = partitions
            .iter()
            .map(|p| plan.records_in_partition(*p))
            .sum();
        readers.push((system.reader(topic, &partitions).await?, expected));
    }
    Ok(readers)
}

/// Reads everything; returns the end-to-end latencies (when `stamped`) and
/// when the last record arrived.
async fn consume(
    readers: Vec<(Reader, u64)>,
    stamped: bool,
    epoch: Instant,
    progress: &ProgressBar,
) -> Result<(Histogram<u64>, Instant)> {
    let mut tasks = JoinSet::new();
    for (reader, expected) in readers {
        tasks.spawn(consumer(reader, expected, stamped, epoch, progress.clone()));
    }
    let mut latencies = latency_histogram();
    let mut last = Instant::now();
    while let Some(result) = tasks.join_next().await {
        let (histogram, done) = result??;
        latencies.add(histogram)?;
        last = last.max(done);
    }
    Ok((latencies, last))
}

/// Gives up when nothing arrives for this long.
const IDLE: Duration = Duration::from_secs(30);

async fn consumer(
    mut reader: Reader,
    expected: u64,
    stamped: bool,
    epoch: Instant,
    progress: ProgressBar,
) -> Result<(Histogram<u64>, Instant)> {
    let mut latencies = latency_histogram();
    let mut got = 0u64;
    let mut unreported = 0u64;
    while got < expected {
        let value = tokio::time::timeout(IDLE, reader.next())
            .await
            .map_err(|_| anyhow!("nothing arrived for {IDLE:?} after {got} of {expected}"))??;
        if stamped {
            let stamp: [u8; 8] = value
                .get(..8)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| anyhow!("a record of {} bytes has no stamp", value.len()))?;
            let sent = u64::from_le_bytes(stamp);
            let now = nanos_since(epoch, Instant::now());
            record_latency(
                &mut latencies,
                Duration::from_nanos(now.saturating_sub(sent)),
            );
        }
        got += 1;
        unreported += 1;
        if unreported == 1000 {
            progress.inc(unreported);
            unreported = 0;
        }
    }
    progress.inc(unreported);
    Ok((latencies, Instant::now()))
}

fn report(args: &RunArgs, result: &RunResult) -> Result<()> {
    let latency = result.latency.map_or(String::new(), |l| {
        format!(
            ", {} latency p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2}",
            result.latency_kind.as_deref().unwrap_or(""),
            l.p50_us / 1e3,
            l.p90_us / 1e3,
            l.p99_us / 1e3,
            l.p999_us / 1e3,
            l.max_us / 1e3
        )
    });
    let rss = result.server_rss_anon_kib.map_or(String::new(), |k| {
        format!(", server RssAnon {:.1} MiB", k as f64 / 1024.0)
    });
    let cpu = match (result.server_cpu_s, result.server_cpu_s_per_gb) {
        (Some(s), Some(per_gb)) => format!(", server CPU {s:.2} s ({per_gb:.2} s/GB)"),
        (Some(s), None) => format!(", server CPU {s:.2} s"),
        _ => String::new(),
    };
    eprintln!(
        "{} {} [{}] {}: {} records in {:.2} s: {:.0} records/s, {:.1} MB/s{latency}{rss}{cpu}",
        result.system,
        result.mode,
        result.durability,
        result.label,
        result.records,
        result.seconds,
        result.records_per_sec,
        result.mb_per_sec
    );
    let line = serde_json::to_string(result)?;
    println!("{line}");
    if let Some(path) = &args.json {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        writeln!(file, "{line}")?;
    }
    Ok(())
}

fn print_table(args: &TableArgs) -> Result<()> {
    let mut runs = Vec::new();
    for path in &args.results {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            runs.push(
                serde_json::from_str::<RunResult>(line)
                    .with_context(|| format!("{}:{}", path.display(), n + 1))?,
            );
        }
    }
    if runs.is_empty() {
        bail!("no results in {:?}", args.results);
    }
    let summary = table::summarize(&runs);
    print!("{}", table::markdown(&summary));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(dir) = &args.plots {
        for (label, svg) in table::latency_plots(&runs) {
            let path = dir.join(format!("{label}.svg"));
            std::fs::write(&path, svg).with_context(|| format!("write {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_fill_values_carry_the_stamp_and_the_size() {
        let values = payload::stamp(&Payload::Fill.values(3, 64, 0), 0x0102_0304_0506_0708);
        assert_eq!(values.len(), 3);
        for v in &values {
            assert_eq!(v.len(), 64);
            assert_eq!(
                u64::from_le_bytes(v[..8].try_into().unwrap()),
                0x0102_0304_0506_0708
            );
            assert!(v[8..].iter().all(|b| *b == 0x5a));
        }
    }

    #[test]
    fn compression_payload_and_data_dir_flags() {
        let cli = |extra: &[&str]| -> Result<RunArgs, clap::Error> {
            let mut argv = vec!["sluice-bench", "produce"];
            argv.extend(extra);
            match Cli::try_parse_from(argv)?.command {
                Command::Produce(args) => Ok(args),
                _ => unreachable!(),
            }
        };
        let default = cli(&[]).unwrap();
        assert_eq!(default.compression, Compression::None);
        assert_eq!(default.payload, Payload::Fill);
        assert_eq!(default.data_dir, None);
        let args = cli(&[
            "--compression",
            "zstd",
            "--payload",
            "json",
            "--data-dir",
            "/tmp/d",
        ])
        .unwrap();
        assert_eq!(args.compression, Compression::Zstd);
        assert_eq!(args.payload, Payload::Json);
        let result = args.result(Mode::Produce, None);
        assert_eq!(result.compression.as_deref(), Some("zstd"));
        assert_eq!(result.payload.as_deref(), Some("json"));
        assert!(cli(&["--compression", "gzip"]).is_err());
        assert!(cli(&["--payload", "zeros"]).is_err());
        let redis = cli(&["--system", "redis"]).unwrap();
        assert_eq!(redis.result(Mode::Produce, None).compression, None);
    }

    #[test]
    fn sizes_resolve_from_count_mib_or_duration() {
        let cli = |extra: &[&str]| {
            let mut argv = vec!["sluice-bench", "end-to-end"];
            argv.extend(extra);
            match Cli::parse_from(argv).command {
                Command::EndToEnd(args) => args,
                _ => unreachable!(),
            }
        };
        assert_eq!(cli(&["--mib", "1024"]).count().unwrap(), 1 << 20);
        let paced = cli(&["--mb-per-sec", "20", "--duration", "10"]);
        assert_eq!(paced.rate(), Some(20e6 / 1024.0));
        assert_eq!(paced.count().unwrap(), 195_313);
        assert!(cli(&["--duration", "1"]).count().is_err());
        assert_eq!(cli(&[]).durability(), "flush=every-batch");
        assert_eq!(
            cli(&["--system", "redis", "--flush", "always"]).durability(),
            "appendfsync always"
        );
    }
}
