//! The comparison table of `benches/compare.sh`: the runs of one
//! invocation grouped by workload label, the median of each system's
//! repetitions, the ratios Sluice/peer, the servers' CPU seconds per GB
//! and the bytes on disk per record (a row under each workload that has
//! them), the two ceilings (loopback TCP and the disk's synced sequential
//! write) and the targets, met or not.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::plot;
use super::report::{RunResult, median};

/// The peers, in column order, with their display names.
pub const PEERS: [(&str, &str); 2] = [("nats", "NATS JetStream"), ("redis", "Redis Streams")];
/// Label of the `flush = os` produce run, compared with the loopback ceiling.
pub const PRODUCE_OS: &str = "produce-os";
/// Label of the `flush = every-batch` produce run, compared with the disk
/// and with the `flush = os` run.
pub const PRODUCE_DURABLE: &str = "produce-durable";
/// Label of the catch-up consume run, compared with the loopback ceiling.
pub const CONSUME: &str = "consume";
/// Label of the loopback TCP ceiling run.
pub const CEILING_LOOPBACK: &str = "ceiling-loopback";
/// Label of the disk ceiling (dd with fdatasync).
pub const CEILING_DISK: &str = "ceiling-disk";
/// Label of the page-cache ceiling (dd into a new file, no sync): how fast
/// new data enters the page cache, which bounds `flush = os`.
pub const CEILING_PAGE_CACHE: &str = "ceiling-page-cache";
/// The broker's memory budget, in KiB.
pub const RSS_BUDGET_KIB: u64 = 256 * 1024;

/// The median of one system's repetitions of one workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    /// What an acknowledgement promised.
    pub durability: String,
    /// Repetitions.
    pub runs: usize,
    /// Median records/s.
    pub records_per_sec: f64,
    /// Median MB/s.
    pub mb_per_sec: f64,
    /// Median p99 latency in µs, when measured.
    pub p99_us: Option<f64>,
    /// Median p50 latency in µs, when measured.
    pub p50_us: Option<f64>,
    /// Median p99.9 latency in µs, when measured.
    pub p999_us: Option<f64>,
    /// Median max latency in µs, when measured.
    pub max_us: Option<f64>,
    /// Largest server RssAnon seen, KiB.
    pub max_rss_anon_kib: Option<u64>,
    /// Median server CPU seconds per 10^9 bytes of record values, over
    /// the repetitions that measured it.
    pub server_cpu_s_per_gb: Option<f64>,
    /// Bytes per record value.
    pub record_bytes: u64,
    /// Median bytes on disk per record, over the repetitions that
    /// measured it.
    pub disk_bytes_per_record: Option<f64>,
}

/// One workload: a cell per system.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The workload's label.
    pub label: String,
    /// `produce`, `consume` or `end-to-end`.
    pub mode: String,
    /// By system name.
    pub cells: BTreeMap<String, Cell>,
}

impl Row {
    /// The figure compared: p99 latency for end-to-end runs, else records/s.
    pub fn metric(&self, system: &str) -> Option<f64> {
        let cell = self.cells.get(system)?;
        if self.latency_row() {
            cell.p99_us
        } else {
            Some(cell.records_per_sec)
        }
    }

    /// Whether smaller is better (latency).
    pub fn latency_row(&self) -> bool {
        self.mode == "end-to-end"
    }

    /// Sluice's figure over `peer`'s.
    pub fn ratio(&self, peer: &str) -> Option<f64> {
        let (s, p) = (self.metric("sluice")?, self.metric(peer)?);
        (p > 0.0).then(|| s / p)
    }

    /// A system's server CPU seconds per GB.
    pub fn cpu_per_gb(&self, system: &str) -> Option<f64> {
        self.cells.get(system)?.server_cpu_s_per_gb
    }

    /// Sluice's CPU seconds per GB over `peer`'s (lower is better).
    pub fn cpu_ratio(&self, peer: &str) -> Option<f64> {
        let (s, p) = (self.cpu_per_gb("sluice")?, self.cpu_per_gb(peer)?);
        (p > 0.0).then(|| s / p)
    }

    /// Whether any system of the row has a CPU figure.
    pub fn has_cpu(&self) -> bool {
        self.cells.values().any(|c| c.server_cpu_s_per_gb.is_some())
    }

    /// Whether any system of the row has a disk figure.
    pub fn has_disk(&self) -> bool {
        self.cells
            .values()
            .any(|c| c.disk_bytes_per_record.is_some())
    }
}

/// A target of the issue and whether this run met it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// What was asked.
    pub what: String,
    /// What was measured.
    pub measured: String,
    /// Met or not.
    pub met: bool,
}

/// Everything the table shows, for the JSON summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// One per workload, in the order first run.
    pub rows: Vec<Row>,
    /// Loopback TCP MB/s (median).
    pub loopback_mb_per_sec: Option<f64>,
    /// Disk sequential write with fdatasync, MB/s (median).
    pub disk_mb_per_sec: Option<f64>,
    /// Sequential write of new data into the page cache, MB/s (median).
    pub page_cache_mb_per_sec: Option<f64>,
    /// The targets.
    pub targets: Vec<Target>,
}

/// Groups `runs` by label and system and takes medians.
pub fn summarize(runs: &[RunResult]) -> Summary {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<&RunResult>> = BTreeMap::new();
    for run in runs {
        if !order.contains(&run.label) {
            order.push(run.label.clone());
        }
        groups
            .entry((run.label.clone(), run.system.clone()))
            .or_default()
            .push(run);
    }
    let ceiling = |label: &str| {
        let values: Vec<f64> = runs
            .iter()
            .filter(|r| r.label == label)
            .map(|r| r.mb_per_sec)
            .collect();
        median(&values)
    };
    let loopback = ceiling(CEILING_LOOPBACK);
    let disk = ceiling(CEILING_DISK);
    let page_cache = ceiling(CEILING_PAGE_CACHE);
    let rows: Vec<Row> = order
        .iter()
        .filter(|l| ![CEILING_LOOPBACK, CEILING_DISK, CEILING_PAGE_CACHE].contains(&l.as_str()))
        .map(|label| {
            let cells: BTreeMap<String, Cell> = groups
                .iter()
                .filter(|((l, _), _)| l == label)
                .map(|((_, system), runs)| (system.clone(), cell(runs)))
                .collect();
            let mode = groups
                .iter()
                .find(|((l, _), _)| l == label)
                .map(|(_, runs)| runs[0].mode.clone())
                .unwrap_or_default();
            Row {
                label: label.clone(),
                mode,
                cells,
            }
        })
        .collect();
    let targets = targets(&rows, loopback, disk);
    Summary {
        rows,
        loopback_mb_per_sec: loopback,
        disk_mb_per_sec: disk,
        page_cache_mb_per_sec: page_cache,
        targets,
    }
}

fn cell(runs: &[&RunResult]) -> Cell {
    let of = |f: &dyn Fn(&RunResult) -> Option<f64>| {
        let values: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
        median(&values)
    };
    Cell {
        durability: runs[0].durability.clone(),
        runs: runs.len(),
        records_per_sec: of(&|r| Some(r.records_per_sec)).unwrap_or(0.0),
        mb_per_sec: of(&|r| Some(r.mb_per_sec)).unwrap_or(0.0),
        p50_us: of(&|r| r.latency.map(|l| l.p50_us)),
        p99_us: of(&|r| r.latency.map(|l| l.p99_us)),
        p999_us: of(&|r| r.latency.map(|l| l.p999_us)),
        max_us: of(&|r| r.latency.map(|l| l.max_us)),
        max_rss_anon_kib: runs.iter().filter_map(|r| r.server_rss_anon_kib).max(),
        server_cpu_s_per_gb: of(&|r| r.server_cpu_s_per_gb),
        record_bytes: runs[0].record_bytes,
        disk_bytes_per_record: of(&|r| r.disk_bytes_per_record),
    }
}

fn targets(rows: &[Row], loopback: Option<f64>, disk: Option<f64>) -> Vec<Target> {
    let mut out = Vec::new();
    for row in rows {
        let peers: Vec<(&str, f64)> = PEERS
            .iter()
            .filter_map(|(p, _)| row.metric(p).map(|m| (*p, m)))
            .collect();
        let Some(sluice) = row.metric("sluice") else {
            continue;
        };
        if peers.is_empty() {
            continue;
        }
        if row.latency_row() {
            let worst_margin = peers.iter().map(|(_, m)| sluice / m).fold(0.0, f64::max);
            out.push(Target {
                what: format!("{}: Sluice p99 below every peer's", row.label),
                measured: format!("Sluice p99 / best peer p99 = {worst_margin:.2}x"),
                met: peers.iter().all(|(_, m)| sluice < *m),
            });
        } else {
            let best = peers.iter().map(|(_, m)| *m).fold(0.0, f64::max);
            let ratio = sluice / best;
            out.push(Target {
                what: format!("{}: Sluice records/s >= 1.5x the better peer", row.label),
                measured: format!("{ratio:.2}x"),
                met: ratio >= 1.5,
            });
        }
    }
    let sluice_mb = |label: &str| {
        rows.iter()
            .find(|r| r.label == label)
            .and_then(|r| r.cells.get("sluice"))
            .map(|c| c.mb_per_sec)
    };
    // Sluice's MB/s in one workload as at least a fraction of a ceiling
    // or of another workload.
    let mut at_least =
        |what: &str, fraction: f64, of: &str, part: Option<f64>, whole: Option<f64>| {
            if let (Some(s), Some(w)) = (part, whole) {
                out.push(Target {
                    what: format!("{what}: >= {fraction} of {of}"),
                    measured: format!("{:.2} ({s:.0} of {w:.0} MB/s)", s / w),
                    met: s >= fraction * w,
                });
            }
        };
    at_least(
        "produce, flush = os",
        0.5,
        "the loopback ceiling",
        sluice_mb(PRODUCE_OS),
        loopback,
    );
    at_least(
        "produce, flush = every-batch",
        0.8,
        "the disk ceiling",
        sluice_mb(PRODUCE_DURABLE),
        disk,
    );
    at_least(
        "produce, flush = every-batch",
        0.9,
        "flush = os",
        sluice_mb(PRODUCE_DURABLE),
        sluice_mb(PRODUCE_OS),
    );
    at_least(
        "catch-up consume",
        0.8,
        "the loopback ceiling",
        sluice_mb(CONSUME),
        loopback,
    );
    let rss = rows
        .iter()
        .filter_map(|r| r.cells.get("sluice"))
        .filter_map(|c| c.max_rss_anon_kib)
        .max();
    if let Some(rss) = rss {
        out.push(Target {
            what: "broker RssAnon < 256 MiB in every run".into(),
            measured: format!("largest {:.1} MiB", rss as f64 / 1024.0),
            met: rss < RSS_BUDGET_KIB,
        });
    }
    out
}

fn figure(row: &Row, cell: &Cell) -> String {
    if row.latency_row() {
        match (cell.p50_us, cell.p99_us, cell.max_us) {
            (Some(p50), Some(p99), Some(max)) => {
                format!("p99 **{}** (p50 {}, max {})", ms(p99), ms(p50), ms(max))
            }
            _ => "n/a".into(),
        }
    } else {
        format!(
            "**{}** rec/s ({:.0} MB/s)",
            thousands(cell.records_per_sec),
            cell.mb_per_sec
        )
    }
}

fn ms(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn thousands(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// One SVG per end-to-end workload: each system's latency distribution,
/// from its repetition whose p99 is the median one. Returns (label, SVG).
pub fn latency_plots(runs: &[RunResult]) -> Vec<(String, String)> {
    let mut labels: Vec<&str> = Vec::new();
    for run in runs.iter().filter(|r| !r.latency_curve.is_empty()) {
        if !labels.contains(&run.label.as_str()) {
            labels.push(&run.label);
        }
    }
    labels
        .into_iter()
        .map(|label| {
            let mut series = Vec::new();
            let systems = ["sluice", PEERS[0].0, PEERS[1].0];
            for system in systems {
                let mut of_system: Vec<&RunResult> = runs
                    .iter()
                    .filter(|r| r.label == label && r.system == system)
                    .filter(|r| !r.latency_curve.is_empty())
                    .collect();
                of_system.sort_by(|a, b| p99(a).total_cmp(&p99(b)));
                if let Some(middle) = of_system.get(of_system.len() / 2) {
                    let name = format!("{system} [{}]: p99 {}", middle.durability, ms(p99(middle)));
                    series.push((name, middle.latency_curve.clone()));
                }
            }
            let rate = runs
                .iter()
                .find(|r| r.label == label)
                .and_then(|r| r.target_rate.map(|rate| rate * r.record_bytes as f64 / 1e6))
                .map_or(String::new(), |mb| format!(" at {mb:.0} MB/s"));
            let title = format!("{label}: end-to-end latency{rate} (median repetition)");
            (label.to_owned(), plot::latency_svg(&title, &series))
        })
        .collect()
}

fn p99(run: &RunResult) -> f64 {
    run.latency.map_or(f64::NAN, |l| l.p99_us)
}

/// The summary as Markdown: the comparison, the ceilings, the targets.
pub fn markdown(summary: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| workload | Sluice | {} | {} | Sluice/{} | Sluice/{} |",
        PEERS[0].1, PEERS[1].1, PEERS[0].1, PEERS[1].1
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
    for row in &summary.rows {
        let show = |system: &str| match row.cells.get(system) {
            Some(cell) => format!(
                "{} [{}; n={}]",
                figure(row, cell),
                cell.durability,
                cell.runs
            ),
            None => "—".into(),
        };
        let ratio = |peer: &str| match row.ratio(peer) {
            Some(r) => format!("{r:.2}x"),
            None => "—".into(),
        };
        let what = if row.latency_row() {
            format!("{} (p99, lower is better)", row.label)
        } else {
            format!("{} ({})", row.label, row.mode)
        };
        let _ = writeln!(
            out,
            "| {what} | {} | {} | {} | {} | {} |",
            show("sluice"),
            show(PEERS[0].0),
            show(PEERS[1].0),
            ratio(PEERS[0].0),
            ratio(PEERS[1].0)
        );
        if row.has_cpu() {
            let cpu = |system: &str| {
                row.cpu_per_gb(system)
                    .map_or("—".into(), |v| format!("{v:.2} s/GB"))
            };
            let cpu_ratio = |peer: &str| {
                row.cpu_ratio(peer)
                    .map_or("—".into(), |r| format!("{r:.2}x"))
            };
            let _ = writeln!(
                out,
                "| {}: broker CPU s/GB (lower is better) | {} | {} | {} | {} | {} |",
                row.label,
                cpu("sluice"),
                cpu(PEERS[0].0),
                cpu(PEERS[1].0),
                cpu_ratio(PEERS[0].0),
                cpu_ratio(PEERS[1].0)
            );
        }
        if row.has_disk() {
            let disk = |system: &str| match row.cells.get(system) {
                Some(Cell {
                    disk_bytes_per_record: Some(bytes),
                    record_bytes,
                    ..
                }) => format!(
                    "{bytes:.0} B ({:.2} of the {record_bytes} B value)",
                    bytes / (*record_bytes).max(1) as f64
                ),
                _ => "—".into(),
            };
            let _ = writeln!(
                out,
                "| {}: disk bytes/record | {} | {} | {} | — | — |",
                row.label,
                disk("sluice"),
                disk(PEERS[0].0),
                disk(PEERS[1].0)
            );
        }
    }
    let _ = writeln!(out);
    let mb = |v: Option<f64>| v.map_or("not measured".into(), |v| format!("{v:.0} MB/s"));
    let _ = writeln!(
        out,
        "Ceilings: loopback TCP {}, disk sequential write with fdatasync {}, new data into the page cache (no sync) {}.",
        mb(summary.loopback_mb_per_sec),
        mb(summary.disk_mb_per_sec),
        mb(summary.page_cache_mb_per_sec)
    );
    let rss: Vec<String> = summary
        .rows
        .iter()
        .flat_map(|r| r.cells.iter())
        .fold(BTreeMap::<&str, u64>::new(), |mut m, (system, cell)| {
            if let Some(kib) = cell.max_rss_anon_kib {
                let e = m.entry(system.as_str()).or_default();
                *e = (*e).max(kib);
            }
            m
        })
        .into_iter()
        .map(|(system, kib)| format!("{system} {:.1} MiB", kib as f64 / 1024.0))
        .collect();
    if !rss.is_empty() {
        let _ = writeln!(out, "Largest server RssAnon: {}.", rss.join(", "));
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "| target | measured | met |");
    let _ = writeln!(out, "| --- | --- | --- |");
    for t in &summary.targets {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            t.what,
            t.measured,
            if t.met { "yes" } else { "**no**" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::report::Latency;

    fn run(label: &str, system: &str, mode: &str, rps: f64, p99: Option<f64>) -> RunResult {
        RunResult {
            label: label.into(),
            system: system.into(),
            mode: mode.into(),
            durability: "d".into(),
            record_bytes: 1000,
            batch: 1,
            producers: 1,
            consumers: 1,
            partitions: 1,
            target_rate: None,
            records: 0,
            seconds: 1.0,
            records_per_sec: rps,
            mb_per_sec: rps * 1000.0 / 1e6,
            latency_kind: None,
            latency: p99.map(|p99| Latency {
                samples: 1,
                p50_us: p99 / 2.0,
                p90_us: p99,
                p99_us: p99,
                p999_us: p99,
                max_us: p99,
            }),
            server_rss_anon_kib: Some(1024),
            server_cpu_s: None,
            server_cpu_s_per_gb: None,
            disk_bytes_per_record: None,
            payload: None,
            compression: None,
            latency_curve: p99.map_or(vec![], |p99| vec![(0.0, p99 / 2e3), (2.0, p99 / 1e3)]),
        }
    }

    #[test]
    fn medians_and_ratios_per_workload() {
        let runs = vec![
            run("produce-durable", "sluice", "produce", 300_000.0, None),
            run("produce-durable", "sluice", "produce", 100_000.0, None),
            run("produce-durable", "sluice", "produce", 200_000.0, None),
            run("produce-durable", "redis", "produce", 100_000.0, None),
            run("produce-durable", "nats", "produce", 50_000.0, None),
            run("e2e", "sluice", "end-to-end", 20_000.0, Some(2_000.0)),
            run("e2e", "redis", "end-to-end", 20_000.0, Some(1_000.0)),
            run("e2e", "nats", "end-to-end", 20_000.0, Some(4_000.0)),
        ];
        let summary = summarize(&runs);
        assert_eq!(summary.rows.len(), 2);
        let produce = &summary.rows[0];
        assert_eq!(produce.cells["sluice"].runs, 3);
        assert_eq!(produce.metric("sluice"), Some(200_000.0));
        assert_eq!(produce.ratio("redis"), Some(2.0));
        assert_eq!(produce.ratio("nats"), Some(4.0));
        let e2e = &summary.rows[1];
        assert_eq!(e2e.ratio("redis"), Some(2.0));
        assert_eq!(e2e.ratio("nats"), Some(0.5));
        // 2x the better peer: met; p99 above Redis's: missed.
        assert!(summary.targets[0].met, "{:?}", summary.targets);
        assert!(!summary.targets[1].met, "{:?}", summary.targets);
        let table = markdown(&summary);
        assert!(table.contains("| 4.00x | 2.00x |"), "{table}");
        assert!(table.contains("p99 **2.00 ms**"), "{table}");
    }

    #[test]
    fn cpu_per_gb_rows_follow_the_workloads_that_measured_it() {
        let with_cpu = |mut r: RunResult, per_gb: f64| {
            r.server_cpu_s = Some(per_gb);
            r.server_cpu_s_per_gb = Some(per_gb);
            r
        };
        let runs = vec![
            with_cpu(
                run("produce-interval", "sluice", "produce", 300.0, None),
                3.0,
            ),
            with_cpu(
                run("produce-interval", "sluice", "produce", 100.0, None),
                1.0,
            ),
            with_cpu(
                run("produce-interval", "sluice", "produce", 200.0, None),
                2.0,
            ),
            with_cpu(
                run("produce-interval", "redis", "produce", 100.0, None),
                4.0,
            ),
            run("produce-interval", "nats", "produce", 100.0, None),
            run("produce-os", "sluice", "produce", 100.0, None),
        ];
        let summary = summarize(&runs);
        let row = &summary.rows[0];
        assert_eq!(row.cpu_per_gb("sluice"), Some(2.0), "the median");
        assert_eq!(row.cpu_per_gb("nats"), None);
        assert_eq!(row.cpu_ratio("redis"), Some(0.5));
        assert_eq!(row.cpu_ratio("nats"), None);
        assert!(!summary.rows[1].has_cpu());
        let table = markdown(&summary);
        assert!(
            table.contains(
                "| produce-interval: broker CPU s/GB (lower is better) | 2.00 s/GB | — | 4.00 s/GB | — | 0.50x |"
            ),
            "{table}"
        );
        assert!(!table.contains("produce-os: broker CPU"), "{table}");
        assert!(!table.contains("disk bytes/record"), "{table}");
        // The throughput rows are as before.
        assert!(
            table.contains("| produce-interval (produce) | **200** rec/s (0 MB/s) [d; n=3] |"),
            "{table}"
        );
    }

    #[test]
    fn disk_bytes_per_record_rows_for_the_runs_that_measured_them() {
        let with_disk = |mut r: RunResult, bytes: f64| {
            r.disk_bytes_per_record = Some(bytes);
            r
        };
        let runs = vec![
            with_disk(
                run("produce-json-zstd", "sluice", "produce", 1.0, None),
                300.0,
            ),
            with_disk(
                run("produce-json-zstd", "sluice", "produce", 1.0, None),
                250.0,
            ),
            run("produce-json-zstd", "sluice", "produce", 1.0, None),
            run("produce-os", "sluice", "produce", 1.0, None),
        ];
        let summary = summarize(&runs);
        assert_eq!(
            summary.rows[0].cells["sluice"].disk_bytes_per_record,
            Some(275.0)
        );
        let table = markdown(&summary);
        assert!(
            table.contains(
                "| produce-json-zstd: disk bytes/record | 275 B (0.28 of the 1000 B value) | — | — | — | — |"
            ),
            "{table}"
        );
        assert!(!table.contains("produce-os: disk"), "{table}");
    }

    #[test]
    fn one_plot_per_end_to_end_workload_from_the_median_repetition() {
        let runs = vec![
            run("e2e", "sluice", "end-to-end", 1.0, Some(3_000.0)),
            run("e2e", "sluice", "end-to-end", 1.0, Some(9_000.0)),
            run("e2e", "sluice", "end-to-end", 1.0, Some(4_000.0)),
            run("e2e", "redis", "end-to-end", 1.0, Some(5_000.0)),
            run("produce", "sluice", "produce", 1.0, None),
        ];
        let plots = latency_plots(&runs);
        assert_eq!(plots.len(), 1);
        let (label, svg) = &plots[0];
        assert_eq!(label, "e2e");
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert!(svg.contains("sluice [d]: p99 4.00 ms"), "{svg}");
        assert!(svg.contains("redis [d]: p99 5.00 ms"), "{svg}");
    }

    #[test]
    fn ceilings_give_fractions_and_memory_is_checked() {
        let mut runs = vec![
            run(PRODUCE_OS, "sluice", "produce", 500_000.0, None),
            run(PRODUCE_DURABLE, "sluice", "produce", 300_000.0, None),
            run(CONSUME, "sluice", "consume", 1_800_000.0, None),
            run(CEILING_LOOPBACK, "tcp", "produce", 2_000_000.0, None),
            run(CEILING_DISK, "disk", "produce", 400_000.0, None),
            run(CEILING_PAGE_CACHE, "disk", "produce", 600_000.0, None),
        ];
        runs[1].server_rss_anon_kib = Some(300 * 1024);
        let summary = summarize(&runs);
        assert_eq!(summary.rows.len(), 3, "ceilings are not workloads");
        assert_eq!(summary.loopback_mb_per_sec, Some(2000.0));
        assert_eq!(summary.page_cache_mb_per_sec, Some(600.0));
        let t = &summary.targets;
        assert_eq!(t.len(), 5, "{t:?}");
        assert!(!t[0].met && t[0].measured.starts_with("0.25"), "{t:?}");
        assert!(!t[1].met && t[1].measured.starts_with("0.75"), "{t:?}");
        assert!(!t[2].met && t[2].measured.starts_with("0.60"), "{t:?}");
        assert!(t[3].met && t[3].measured.starts_with("0.90"), "{t:?}");
        assert!(!t[4].met, "300 MiB is over budget: {t:?}");
    }
}
