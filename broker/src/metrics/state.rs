//! Scrape-time collectors: they read the broker's state when Prometheus
//! asks and keep nothing between scrapes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::dlq::RetrySets;
use crate::groups::GroupCoordinator;
use crate::storage::TrafficCounts;
use crate::topics::TopicRegistry;

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: `rows` of labels and value.
fn family<'r>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    rows: impl Iterator<Item = (&'r Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in rows {
        let mut series = metric.encode_family(labels)?;
        // Whole numbers (offsets, counts) are written as integers.
        let whole = (value.fract() == 0.0 && value.abs() < 9.0e15).then_some(value as i64);
        match (metric_type, whole) {
            (MetricType::Counter, Some(n)) => {
                series.encode_counter::<NoLabelSet, _, u64>(&n.unsigned_abs(), None)?
            }
            (MetricType::Counter, None) => {
                series.encode_counter::<NoLabelSet, _, f64>(&value, None)?
            }
            (_, Some(n)) => series.encode_gauge(&n)?,
            (_, None) => series.encode_gauge(&value)?,
        }
    }
    Ok(())
}

/// One partition's (or, summed, one topic's) state.
#[derive(Debug, Default, Clone, Copy)]
struct LogRow {
    traffic: TrafficCounts,
    log_start_offset: u64,
    log_end_offset: u64,
    size_bytes: u64,
    segments: u64,
    damaged_ranges: u64,
    lost_records: u64,
    producers: u64,
}

impl LogRow {
    fn add(&mut self, other: &LogRow) {
        self.traffic.records_in += other.traffic.records_in;
        self.traffic.bytes_in += other.traffic.bytes_in;
        self.traffic.records_out += other.traffic.records_out;
        self.traffic.bytes_out += other.traffic.bytes_out;
        self.log_start_offset += other.log_start_offset;
        self.log_end_offset += other.log_end_offset;
        self.size_bytes += other.size_bytes;
        self.segments += other.segments;
        self.damaged_ranges += other.damaged_ranges;
        self.lost_records += other.lost_records;
        self.producers += other.producers;
    }
}

/// A log metric: name, help (completed with its scope), type, and how to
/// read it off a row.
type LogMetric = (&'static str, &'static str, MetricType, fn(&LogRow) -> u64);

const LOG_METRICS: [LogMetric; 11] = {
    use MetricType::{Counter, Gauge};
    [
        (
            "sluice_topic_records_in",
            "Records appended",
            Counter,
            |r| r.traffic.records_in,
        ),
        (
            "sluice_topic_bytes_in",
            "Encoded batch bytes appended",
            Counter,
            |r| r.traffic.bytes_in,
        ),
        (
            "sluice_topic_records_out",
            "Records sent to consumers",
            Counter,
            |r| r.traffic.records_out,
        ),
        (
            "sluice_topic_bytes_out",
            "Wire bytes of records sent to consumers",
            Counter,
            |r| r.traffic.bytes_out,
        ),
        (
            "sluice_topic_log_start_offset",
            "First offset kept",
            Gauge,
            |r| r.log_start_offset,
        ),
        (
            "sluice_topic_log_end_offset",
            "Offset after the last readable record (high watermark)",
            Gauge,
            |r| r.log_end_offset,
        ),
        (
            "sluice_topic_size_bytes",
            "Bytes of segment files written",
            Gauge,
            |r| r.size_bytes,
        ),
        ("sluice_topic_segments", "Segment files", Gauge, |r| {
            r.segments
        }),
        (
            "sluice_topic_damaged_ranges",
            "Ranges of offsets lost to damage found when the log was opened",
            Gauge,
            |r| r.damaged_ranges,
        ),
        (
            "sluice_topic_lost_records",
            "Offsets in damaged ranges",
            Gauge,
            |r| r.lost_records,
        ),
        (
            "sluice_idempotent_producers",
            "Idempotent producers remembered (not yet expired)",
            Gauge,
            |r| r.producers,
        ),
    ]
};

/// Group lag of one partition (or, aggregated, one topic).
#[derive(Debug, Default, Clone, Copy)]
struct LagRow {
    records: u64,
    seconds: f64,
}

/// What `StateCollector::group_rows` reads: per group (members, epoch),
/// per group and topic (pending retries), and lag rows.
struct GroupRows {
    groups: Vec<(Labels, u64, u64)>,
    pending: Vec<(Labels, u64)>,
    lag: Vec<(Labels, LagRow)>,
}

/// Topics, groups and retry sets, read at scrape time.
pub(super) struct StateCollector {
    pub(super) topics: Arc<TopicRegistry>,
    pub(super) groups: Arc<GroupCoordinator>,
    pub(super) retries: Arc<RetrySets>,
    pub(super) per_partition: bool,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector")
            .field("data_dir", &self.topics.data_dir())
            .field("per_partition", &self.per_partition)
            .finish_non_exhaustive()
    }
}

impl StateCollector {
    fn log_rows(&self) -> Vec<(Labels, LogRow)> {
        let mut rows = Vec::new();
        for topic in self.topics.list() {
            let mut sum = LogRow::default();
            for partition in topic.partitions() {
                let log = partition.log();
                let lost = log.lost_ranges();
                let row = LogRow {
                    traffic: log.traffic().counts(),
                    log_start_offset: log.log_start_offset(),
                    log_end_offset: log.high_watermark(),
                    size_bytes: log.size_bytes(),
                    segments: log.segment_count() as u64,
                    damaged_ranges: lost.len() as u64,
                    lost_records: lost.iter().map(|r| r.end_offset - r.start_offset).sum(),
                    producers: partition.appender().producer_count() as u64,
                };
                if self.per_partition {
                    rows.push((
                        vec![
                            ("topic", topic.name().to_owned()),
                            ("partition", partition.index.to_string()),
                        ],
                        row,
                    ));
                } else {
                    sum.add(&row);
                }
            }
            if !self.per_partition {
                rows.push((vec![("topic", topic.name().to_owned())], sum));
            }
        }
        rows
    }

    /// Members and epoch per group, pending retries, and committed lag.
    fn group_rows(&self) -> GroupRows {
        let now = Instant::now();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut groups = Vec::new();
        let mut pending = Vec::new();
        let mut lag = Vec::new();
        for group_id in self.groups.list() {
            for topic in self.retries.topics(&group_id) {
                let n = self.retries.len_for_topic(&group_id, &topic) as u64;
                pending.push((vec![("group", group_id.clone()), ("topic", topic)], n));
            }
            let Ok(description) = self.groups.describe(&group_id, now) else {
                continue;
            };
            groups.push((
                vec![("group", group_id.clone())],
                description.members.len() as u64,
                description.group_epoch,
            ));
            let mut by_topic: BTreeMap<&str, LagRow> = BTreeMap::new();
            for (tp, committed) in &description.offsets {
                let Some(partition_lag) =
                    self.topics
                        .partition_lag(tp, Some(committed.offset), now_ms)
                else {
                    continue;
                };
                let row = LagRow {
                    records: partition_lag.lag.unwrap_or(0),
                    seconds: partition_lag.time_lag_ms.unwrap_or(0) as f64 / 1000.0,
                };
                if self.per_partition {
                    lag.push((
                        vec![
                            ("group", group_id.clone()),
                            ("topic", tp.topic.clone()),
                            ("partition", tp.partition.to_string()),
                        ],
                        row,
                    ));
                } else {
                    let sum = by_topic.entry(&tp.topic).or_default();
                    sum.records += row.records;
                    sum.seconds = sum.seconds.max(row.seconds);
                }
            }
            for (topic, row) in by_topic {
                lag.push((
                    vec![("group", group_id.clone()), ("topic", topic.to_owned())],
                    row,
                ));
            }
        }
        GroupRows {
            groups,
            pending,
            lag,
        }
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let rows = self.log_rows();
        let scope = if self.per_partition {
            "partition"
        } else {
            "topic (summed over its partitions)"
        };
        for (name, help, metric_type, value) in LOG_METRICS {
            family(
                &mut encoder,
                name,
                &format!("{help}, per {scope}"),
                metric_type,
                rows.iter().map(|(labels, row)| (labels, value(row) as f64)),
            )?;
        }
        let topics: Vec<(Labels, f64)> = self
            .topics
            .list()
            .iter()
            .map(|t| {
                (
                    vec![("topic", t.name().to_owned())],
                    f64::from(t.partition_count()),
                )
            })
            .collect();
        family(
            &mut encoder,
            "sluice_topic_partitions",
            "Partitions of the topic",
            Gauge,
            topics.iter().map(|(l, n)| (l, *n)),
        )?;
        let GroupRows {
            groups,
            pending,
            lag,
        } = self.group_rows();
        family(
            &mut encoder,
            "sluice_group_members",
            "Members of the group",
            Gauge,
            groups.iter().map(|(l, members, _)| (l, *members as f64)),
        )?;
        family(
            &mut encoder,
            "sluice_group_rebalances",
            "Rebalances of the group (its epoch) since it last had no members or the broker started",
            Counter,
            groups.iter().map(|(l, _, epoch)| (l, *epoch as f64)),
        )?;
        let lag_scope = if self.per_partition {
            "per group, topic and partition"
        } else {
            "per group and topic (records summed, seconds the largest)"
        };
        family(
            &mut encoder,
            "sluice_group_lag_records",
            &format!("Records from the committed offset to the end, {lag_scope}"),
            Gauge,
            lag.iter().map(|(l, row)| (l, row.records as f64)),
        )?;
        family(
            &mut encoder,
            "sluice_group_lag_seconds",
            &format!("Age of the oldest record not yet committed (0 when caught up), {lag_scope}"),
            Gauge,
            lag.iter().map(|(l, row)| (l, row.seconds)),
        )?;
        family(
            &mut encoder,
            "sluice_dlq_retries_pending",
            "Nacked records waiting in a group's retry set, per group and source topic",
            Gauge,
            pending.iter().map(|(l, n)| (l, *n as f64)),
        )?;
        Ok(())
    }
}

/// The process: memory, descriptors, start time and uptime (from /proc).
#[derive(Debug)]
pub(super) struct ProcessCollector {
    start_time_seconds: f64,
}

impl ProcessCollector {
    pub(super) fn new() -> ProcessCollector {
        let now = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        ProcessCollector {
            start_time_seconds: process_start_time().unwrap_or_else(now),
        }
    }
}

/// When this process started, in seconds since the Unix epoch: the boot
/// time (`btime` of /proc/stat) plus the process's start in clock ticks
/// after boot (field 22 of /proc/self/stat).
pub fn process_start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let boot: f64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may hold spaces and ')'; the
    // first of them is field 3 (state), so field 22 is the 20th.
    let after_name = &own[own.rfind(')')? + 1..];
    let ticks: f64 = after_name.split_whitespace().nth(19)?.parse().ok()?;
    let per_second = rustix::param::clock_ticks_per_second() as f64;
    Some(boot + ticks / per_second)
}

/// Resident memory from `/proc/self/status` (`VmRSS`, in kB).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(bytes) = resident_bytes() {
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                bytes as f64,
            )?;
        }
        if let Some(fds) = open_fds() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                fds as f64,
            )?;
        }
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            self.start_time_seconds,
        )?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        gauge(
            &mut encoder,
            "sluice_uptime_seconds",
            "Seconds since the broker process started",
            (now - self.start_time_seconds).max(0.0),
        )?;
        let info = vec![
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("commit", crate::GIT_COMMIT.to_owned()),
        ];
        family(
            &mut encoder,
            "sluice_build_info",
            "The broker's version and git commit (value 1)",
            MetricType::Gauge,
            std::iter::once((&info, 1.0)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_start_time_is_read_from_proc() {
        let start = process_start_time().expect("a start time from /proc");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // This test process started a moment ago, not now and not at boot.
        assert!(start <= now + 1.0, "{start} after {now}");
        assert!(now - start < 3600.0, "{start} is long before {now}");
    }
}
