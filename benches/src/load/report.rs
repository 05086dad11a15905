//! What a run reports: throughput, latency percentiles from an HDR
//! histogram, the server's anonymous memory and the CPU time it spent on
//! the measured phase, as one JSON object per run.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// A latency histogram in nanoseconds, 3 significant digits, up to an hour.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// Records `latency` into `histogram`, saturating at its highest value.
pub fn record_latency(histogram: &mut Histogram<u64>, latency: Duration) {
    let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    histogram.saturating_record(nanos.max(1));
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Samples recorded.
    pub samples: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest sample.
    pub max_us: f64,
}

impl Latency {
    /// The percentiles of `histogram` (nanoseconds); `None` when empty.
    pub fn of(histogram: &Histogram<u64>) -> Option<Latency> {
        if histogram.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        Some(Latency {
            samples: histogram.len(),
            p50_us: us(histogram.value_at_quantile(0.50)),
            p90_us: us(histogram.value_at_quantile(0.90)),
            p99_us: us(histogram.value_at_quantile(0.99)),
            p999_us: us(histogram.value_at_quantile(0.999)),
            max_us: us(histogram.max()),
        })
    }
}

/// One run of one workload against one system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// What this run stands for in a comparison (`produce-durable`, ...).
    pub label: String,
    /// `sluice`, `nats`, `redis`, `tcp` or `disk`.
    pub system: String,
    /// `produce`, `consume` or `end-to-end`.
    pub mode: String,
    /// What an acknowledgement promises, in the system's own terms.
    pub durability: String,
    /// Bytes per record value.
    pub record_bytes: u64,
    /// Records per batch.
    pub batch: u64,
    /// Concurrent producers.
    pub producers: u64,
    /// Concurrent consumers.
    pub consumers: u64,
    /// Partitions (streams, subjects) of the topic.
    pub partitions: u32,
    /// Target rate in records/s (open loop); `None`: as fast as possible.
    pub target_rate: Option<f64>,
    /// Records moved.
    pub records: u64,
    /// Wall time of the measured phase.
    pub seconds: f64,
    /// Records per second.
    pub records_per_sec: f64,
    /// Record bytes per second, in MB (10^6 bytes).
    pub mb_per_sec: f64,
    /// `ack` (produce: from due time to acknowledgement, per batch) or
    /// `end-to-end` (from due time to receipt, per record).
    pub latency_kind: Option<String>,
    /// Latency percentiles.
    pub latency: Option<Latency>,
    /// The server's RssAnon at the end of the run, in KiB.
    pub server_rss_anon_kib: Option<u64>,
    /// The server's CPU time (user + system, all threads) during the
    /// measured phase, in seconds; given a `--server-pid` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_s: Option<f64>,
    /// `server_cpu_s` per 10^9 bytes of record values moved in the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_s_per_gb: Option<f64>,
    /// Produce runs given the broker's `--data-dir`: bytes of the topic's
    /// record batches in its segment files after the run, per record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes_per_record: Option<f64>,
    /// What the record values held (`fill`, `random` or `json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// Sluice: the producer's batch compression (`none`, `lz4`, `zstd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// The latency distribution as (nines, ms) points, for plots (see
    /// [`crate::load::plot::percentile_curve`]); end-to-end runs only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_curve: Vec<(f64, f64)>,
}

impl RunResult {
    /// Fills in the rates from `records`, `record_bytes` and `elapsed`.
    pub fn set_rates(&mut self, records: u64, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        self.records = records;
        self.seconds = seconds;
        self.records_per_sec = records as f64 / seconds;
        self.mb_per_sec = (records * self.record_bytes) as f64 / seconds / 1e6;
    }

    /// Charges the phase with `cpu_seconds` of the server's CPU time and
    /// its cost per GB (10^9 bytes) of record values; after
    /// [`RunResult::set_rates`], which sets the records moved. `None` (not
    /// measured) leaves both figures unset.
    pub fn set_server_cpu(&mut self, cpu_seconds: Option<f64>) {
        let Some(cpu_seconds) = cpu_seconds else {
            return;
        };
        let bytes = self.records * self.record_bytes;
        self.server_cpu_s = Some(cpu_seconds);
        self.server_cpu_s_per_gb = (bytes > 0).then(|| cpu_seconds / (bytes as f64 / 1e9));
    }
}

/// The median of `values` (the mean of the middle two for an even count);
/// `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = latency_histogram();
        for us in 1..=1000u64 {
            record_latency(&mut h, Duration::from_micros(us));
        }
        let l = Latency::of(&h).unwrap();
        assert_eq!(l.samples, 1000);
        // Three significant digits: within 0.1%.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(close(l.p50_us, 500.0), "{l:?}");
        assert!(close(l.p90_us, 900.0), "{l:?}");
        assert!(close(l.p99_us, 990.0), "{l:?}");
        assert!(close(l.p999_us, 999.0), "{l:?}");
        assert!(close(l.max_us, 1000.0), "{l:?}");
        assert_eq!(Latency::of(&latency_histogram()), None);
    }

    #[test]
    fn rates_and_json_round_trip() {
        let mut run = RunResult {
            label: "produce-durable".into(),
            system: "sluice".into(),
            mode: "produce".into(),
            durability: "every-batch".into(),
            record_bytes: 1024,
            batch: 1000,
            producers: 4,
            consumers: 0,
            partitions: 8,
            target_rate: None,
            records: 0,
            seconds: 0.0,
            records_per_sec: 0.0,
            mb_per_sec: 0.0,
            latency_kind: None,
            latency: None,
            server_rss_anon_kib: Some(12_345),
            server_cpu_s: None,
            server_cpu_s_per_gb: None,
            disk_bytes_per_record: None,
            payload: None,
            compression: None,
            latency_curve: vec![],
        };
        run.set_rates(1_000_000, Duration::from_secs(4));
        assert_eq!(run.records_per_sec, 250_000.0);
        assert_eq!(run.mb_per_sec, 256.0);
        let json = serde_json::to_string(&run).unwrap();
        assert!(json.contains("\"records_per_sec\":250000.0"), "{json}");
        assert!(
            !json.contains("server_cpu"),
            "no pid, no CPU fields: {json}"
        );
        assert!(!json.contains("disk_bytes"), "no data dir, no disk: {json}");
        assert_eq!(serde_json::from_str::<RunResult>(&json).unwrap(), run);

        // 1,000,000 records of 1024 bytes: 1.024 GB.
        run.set_server_cpu(Some(2.048));
        assert_eq!(run.server_cpu_s, Some(2.048));
        assert_eq!(run.server_cpu_s_per_gb, Some(2.0));
        let json = serde_json::to_string(&run).unwrap();
        assert!(json.contains("\"server_cpu_s_per_gb\":2.0"), "{json}");
        assert_eq!(serde_json::from_str::<RunResult>(&json).unwrap(), run);

        run.disk_bytes_per_record = Some(312.5);
        run.payload = Some("json".into());
        run.compression = Some("zstd".into());
        let json = serde_json::to_string(&run).unwrap();
        assert!(
            json.contains(r#""disk_bytes_per_record":312.5,"payload":"json","compression":"zstd""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<RunResult>(&json).unwrap(), run);
    }

    #[test]
    fn results_written_before_the_cpu_fields_still_read() {
        let old = r#"{"label":"ceiling-disk","system":"disk","mode":"produce","durability":"fdatasync","record_bytes":1024,"batch":1,"producers":1,"consumers":0,"partitions":1,"records":10,"seconds":1.0,"records_per_sec":10.0,"mb_per_sec":0.01}"#;
        let run: RunResult = serde_json::from_str(old).unwrap();
        assert_eq!((run.server_cpu_s, run.server_cpu_s_per_gb), (None, None));
        assert_eq!(run.disk_bytes_per_record, None);
    }

    #[test]
    fn no_bytes_no_cost_per_gb() {
        let mut run: RunResult = serde_json::from_str(
            r#"{"label":"x","system":"sluice","mode":"consume","durability":"d","record_bytes":1024,"batch":1,"producers":1,"consumers":1,"partitions":1,"records":0,"seconds":1.0,"records_per_sec":0.0,"mb_per_sec":0.0}"#,
        )
        .unwrap();
        run.set_server_cpu(Some(0.5));
        assert_eq!(run.server_cpu_s, Some(0.5));
        assert_eq!(run.server_cpu_s_per_gb, None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
    }
}
