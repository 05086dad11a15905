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
//! Each run prints one JSON object per result on stdout (and appends it to
//! `--json FILE`), a progress bar on a terminal, and can draw its latency
//! distribution as SVG (`--plot`). See `docs/BENCHMARKS.md` and
//! `benches/compare.sh`.

#[cfg(feature = "peers")]
mod peers;
mod systems;
mod tcp;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use bytes::{BufMut as _, Bytes, BytesMut};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use sluice_benches::load::pacing::{Plan, Schedule};
use sluice_benches::load::report::{Latency, RunResult, latency_histogram, record_latency};
use sluice_benches::load::{plot, procfs, table};
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
    /// Topic (stream) name [default: a fresh bench-PID-MS name].
    #[arg(long)]
    topic: Option<String>,
    /// Keep the topic and its data after the run.
    #[arg(long)]
    keep_topic: bool,
    /// Report this process's RssAnon at the end (the server's pid).
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
    let results = if args.system == "tcp" {
        ensure!(
            mode == Mode::Produce,
            "--system tcp is the loopback ceiling: produce only"
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
            latency_curve: Vec::new(),
        }
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
    result.set_rates(bytes / args.record_bytes, elapsed);
    Ok((result, None))
}

async fn run(mode: Mode, args: &RunArgs) -> Result<Vec<Outcome>> {
    let system = System::connect(
        &args.system,
        &args.url(),
        args.api,
        Duration::from_millis(args.linger_ms),
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
            let (elapsed, acks) = produce(args, system, topic, plan, epoch, &progress).await?;
            progress.finish_and_clear();
            let mut result = args.result(mode, None);
            result.set_rates(plan.count, elapsed);
            result.latency_kind = Some("ack".into());
            result.latency = Latency::of(&acks);
            Ok(vec![(result, Some(acks))])
        }
        Mode::Consume => {
            let progress = args.progress(plan.count, "backlog");
            let (elapsed, acks) = produce(args, system, topic, plan, epoch, &progress).await?;
            progress.finish_and_clear();
            let label = args.backlog_label.clone().unwrap_or_else(|| {
                format!("{}-backlog", args.label.as_deref().unwrap_or("consume"))
            });
            let mut backlog = args.result(Mode::Produce, Some(label));
            backlog.consumers = 0;
            backlog.set_rates(plan.count, elapsed);
            backlog.latency_kind = Some("ack".into());
            backlog.latency = Latency::of(&acks);
            let progress = args.progress(plan.count, "consume");
            let readers = readers(args, system, topic, plan).await?;
            let start = Instant::now();
            let (_, last) = consume(readers, false, epoch, &progress).await?;
            progress.finish_and_clear();
            let mut result = args.result(mode, None);
            result.set_rates(plan.count, last.duration_since(start));
            Ok(vec![(backlog, Some(acks)), (result, None)])
        }
        Mode::EndToEnd => {
            ensure!(
                args.rate().is_some(),
                "end-to-end needs a fixed load: --rate or --mb-per-sec"
            );
            let progress = args.progress(plan.count, "end-to-end");
            let readers = readers(args, system, topic, plan).await?;
            let consumers = tokio::spawn({
                let progress = progress.clone();
                async move { consume(readers, true, epoch, &progress).await }
            });
            let start = Instant::now();
            let hidden = ProgressBar::hidden();
            let produced = produce(args, system, topic, plan, epoch, &hidden).await;
            let (latencies, last) = consumers.await??;
            produced?;
            progress.finish_and_clear();
            let mut result = args.result(mode, None);
            result.set_rates(plan.count, last.duration_since(start));
            result.latency_kind = Some("end-to-end".into());
            result.latency = Latency::of(&latencies);
            result.latency_curve = plot::percentile_curve(&latencies);
            Ok(vec![(result, Some(latencies))])
        }
    }
}

/// A batch of `n` values of `record_bytes`, each starting with `stamp`
/// (little-endian nanoseconds since the run's epoch), in one allocation.
fn batch_values(n: u64, record_bytes: u64, stamp: u64) -> Vec<Bytes> {
    let size = record_bytes as usize;
    let mut buffer = BytesMut::with_capacity(n as usize * size);
    for _ in 0..n {
        buffer.put_u64_le(stamp);
        buffer.put_bytes(0x5a, size - 8);
    }
    let all = buffer.freeze();
    (0..n as usize)
        .map(|i| all.slice(i * size..(i + 1) * size))
        .collect()
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
    epoch: Instant,
    /// Each batch carries its own due time (end-to-end); otherwise every
    /// batch reuses one pre-built payload, so the load generator, which
    /// shares the machine with the server, spends no time filling buffers.
    stamped: bool,
}

/// Runs every producer of `plan`; returns the time from the first due
/// send to the last acknowledgement and the acknowledgement latencies.
async fn produce(
    args: &RunArgs,
    system: &System,
    topic: &str,
    plan: Plan,
    epoch: Instant,
    progress: &ProgressBar,
) -> Result<(Duration, Histogram<u64>)> {
    let stamped = args.rate().is_some();
    let mut senders = Vec::new();
    for _ in 0..plan.producers {
        senders.push(system.sender().await?);
    }
    let start = Instant::now();
    let load = Load {
        plan,
        schedule: Schedule::new(start, args.rate(), plan.batch),
        in_flight: args.in_flight.max(1),
        record_bytes: args.record_bytes,
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
    Ok((start.elapsed(), acks))
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
        epoch,
        stamped,
    } = load;
    let template = (!stamped).then(|| batch_values(plan.batch, record_bytes, 0));
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
        let values = match &template {
            Some(template) => template[..len as usize].to_vec(),
            None => batch_values(len, record_bytes, nanos_since(epoch, due)),
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
    eprintln!(
        "{} {} [{}] {}: {} records in {:.2} s: {:.0} records/s, {:.1} MB/s{latency}{rss}",
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
    fn batch_values_carry_the_stamp_and_the_size() {
        let values = batch_values(3, 64, 0x0102_0304_0506_0708);
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
