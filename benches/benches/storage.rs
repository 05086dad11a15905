//! Hot-path benches of the storage engine: batch encode, decode, CRC,
//! the check a produced batch gets (`validate`), append (1 KiB records in
//! batches of 1, 10, 100 and 1000) and reads; and the codecs (`compression`:
//! lz4 and zstd over a batch of 1000 JSON order events, as
//! `sluice-bench --payload json` sends them).
//!
//! `cargo bench -p sluice-benches --bench storage` runs them all; add a
//! filter such as `-- append/os` for one group. Appends run against a real
//! log in a temporary directory under `target/` (so on the project's disk,
//! not a tmpfs), with retention keeping it at a few hundred MiB so that
//! dirty pages of deleted segments are dropped instead of written back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_benches::load::payload::Payload;
use sluice_benches::{RECORD_BYTES, records};
use sluice_broker::storage::{
    BatchBuilder, Compression, EncodedBatch, FlushPolicy, LogConfig, PartitionLog, ProducerInfo,
    Record, decode_records,
};

const BATCH_SIZES: [usize; 4] = [1, 10, 100, 1000];
/// Retention keeps the bench log around this size.
const KEEP_BYTES: u64 = 512 * 1024 * 1024;

fn bench_dir() -> tempfile::TempDir {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

fn log_config(flush: FlushPolicy) -> LogConfig {
    LogConfig {
        flush,
        retention_age: None,
        retention_bytes: Some(KEEP_BYTES),
        ..LogConfig::default()
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for &n in &BATCH_SIZES {
        let input = records(n);
        let bytes = (n * RECORD_BYTES) as u64;
        group.throughput(Throughput::Bytes(bytes));
        group.bench_with_input(BenchmarkId::new("encode", n), &input, |b, input| {
            b.iter(|| BatchBuilder::encode(input, ProducerInfo::NONE))
        });
        let encoded = bytes::Bytes::copy_from_slice(
            BatchBuilder::encode(&input, ProducerInfo::NONE).as_bytes(),
        );
        group.bench_with_input(BenchmarkId::new("decode", n), &encoded, |b, encoded| {
            b.iter(|| decode_records(encoded.clone(), 0).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("crc32", n), &encoded, |b, encoded| {
            b.iter(|| crc32fast::hash(&encoded[20..]))
        });
        // What the broker does with a batch a producer sent: header,
        // checksum and a walk of every record, nothing materialized.
        group.bench_with_input(BenchmarkId::new("validate", n), &encoded, |b, encoded| {
            b.iter(|| validate(encoded))
        });
    }
    group.finish();
}

/// The checks of the broker's produce path that belong to the format: one
/// batch exactly, its checksum, and every record well formed (decompressed
/// first when the batch is compressed).
fn validate(bytes: &bytes::Bytes) -> EncodedBatch {
    let batch = EncodedBatch::from_bytes(bytes.clone()).unwrap();
    batch
        .as_record_batch()
        .walk(|_| Ok::<_, sluice_broker::storage::BatchError>(()))
        .unwrap();
    batch
}

/// lz4 and zstd over one batch of 1000 JSON order events of 1 KiB: the
/// producer's compression, and the decompression a records-format reader
/// (or a topic that recompresses) costs the broker.
fn compression(c: &mut Criterion) {
    let mut group = c.benchmark_group("compression");
    let values = Payload::Json.values(1000, RECORD_BYTES as u64, 1);
    let input: Vec<Record> = values
        .into_iter()
        .map(|value| Record {
            value,
            timestamp: 1_700_000_000_000,
            ..Record::default()
        })
        .collect();
    let plain = BatchBuilder::encode(&input, ProducerInfo::NONE);
    group.throughput(Throughput::Bytes(plain.as_bytes().len() as u64));
    for codec in [Compression::Lz4, Compression::Zstd] {
        group.bench_function(BenchmarkId::new("compress", codec), |b| {
            b.iter(|| BatchBuilder::encode_compressed(&input, ProducerInfo::NONE, codec))
        });
        let packed = bytes::Bytes::copy_from_slice(
            BatchBuilder::encode_compressed(&input, ProducerInfo::NONE, codec).as_bytes(),
        );
        group.bench_with_input(BenchmarkId::new("validate", codec), &packed, |b, packed| {
            b.iter(|| validate(packed))
        });
        group.bench_with_input(BenchmarkId::new("decode", codec), &packed, |b, packed| {
            b.iter(|| decode_records(packed.clone(), 0).unwrap())
        });
    }
    group.finish();
}

/// Appends `batch` `iters` times and returns the time taken, while another
/// thread enforces retention every 20 ms, as the broker's retention task
/// does (deleting a segment's file drops its dirty pages, which costs the
/// thread that does it; in the broker that is not an appender).
fn timed_appends(log: &PartitionLog, batch: &EncodedBatch, iters: u64) -> Duration {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Acquire) {
                log.enforce_retention(0).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let start = Instant::now();
        for _ in 0..iters {
            log.append(batch).unwrap();
        }
        let elapsed = start.elapsed();
        done.store(true, Ordering::Release);
        elapsed
    })
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    for &n in &BATCH_SIZES {
        let dir = bench_dir();
        let log = PartitionLog::open(dir.path(), log_config(FlushPolicy::Os)).unwrap();
        let batch = BatchBuilder::encode(&records(n), ProducerInfo::NONE);
        group.throughput(Throughput::Bytes((n * RECORD_BYTES) as u64));
        group.bench_function(BenchmarkId::new("os", n), |b| {
            b.iter_custom(|iters| timed_appends(&log, &batch, iters))
        });
    }
    group.finish();

    // Durable appends: one thread alone pays a sync per batch; several
    // threads share syncs (group commit).
    let mut group = c.benchmark_group("append-every-batch");
    group.sample_size(10);
    let batch = BatchBuilder::encode(&records(100), ProducerInfo::NONE);
    for threads in [1u64, 4] {
        let dir = bench_dir();
        let log =
            Arc::new(PartitionLog::open(dir.path(), log_config(FlushPolicy::EveryBatch)).unwrap());
        group.throughput(Throughput::Bytes((100 * RECORD_BYTES) as u64));
        group.bench_function(BenchmarkId::new("threads", threads), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                let workers: Vec<_> = (0..threads)
                    .map(|t| {
                        let log = Arc::clone(&log);
                        let batch = batch.clone();
                        let mine = iters / threads + u64::from(t < iters % threads);
                        std::thread::spawn(move || {
                            for _ in 0..mine {
                                log.append(&batch).unwrap();
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    w.join().unwrap();
                }
                log.enforce_retention(0).unwrap();
                start.elapsed()
            })
        });
    }
    group.finish();
}

fn read(c: &mut Criterion) {
    let dir = bench_dir();
    let log = PartitionLog::open(
        dir.path(),
        LogConfig {
            retention_bytes: None,
            ..log_config(FlushPolicy::Os)
        },
    )
    .unwrap();
    let batch = BatchBuilder::encode(&records(100), ProducerInfo::NONE);
    let batches = 2000u64; // 200,000 records, ~200 MiB over two segments
    for _ in 0..batches {
        log.append(&batch).unwrap();
    }
    let end = log.high_watermark();
    let mut group = c.benchmark_group("read");
    let max_bytes = 1024 * 1024;
    group.throughput(Throughput::Bytes(max_bytes as u64));
    // Offsets spread over the whole log, in a fixed pseudo-random order.
    let mut next = 0u64;
    let mut offset = move || {
        next = (next + 7_919 * 13) % end;
        next
    };
    group.bench_function("by-offset-1MiB", |b| {
        b.iter(|| log.read(offset(), max_bytes).unwrap())
    });
    group.bench_function("by-offset-1MiB-decoded", |b| {
        b.iter(|| {
            let from = offset();
            decode_records(log.read(from, max_bytes).unwrap().data, from).unwrap()
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = codec, compression, append, read
}
criterion_main!(benches);
