//! Behaviour of `PartitionLog`: appends, reads, rolls, timestamps,
//! retention, group commit, waiting for data, and recovery from damaged files.

mod common;

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_holds, batch_for, config, fill, read_all, record_for, segment_files};
use sluice_broker::storage::{
    BatchBuilder, BatchHeader, FlushPolicy, LogConfig, PartitionLog, ProducerInfo, Record,
    StorageError, check_log_dir,
};

#[test]
fn appends_get_consecutive_offsets_and_read_back_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(4096, FlushPolicy::Os)).unwrap();
    let mut next = 0;
    for count in [1u64, 3, 10, 2, 7, 1, 20, 5] {
        let info = log.append(&batch_for(next, count, 100)).unwrap();
        assert_eq!(info.base_offset, next);
        assert_eq!(info.last_offset, next + count - 1);
        next += count;
    }
    assert_eq!(log.high_watermark(), next);
    assert_eq!(log.end_offset(), next);
    assert!(log.segment_count() > 1, "4 KiB segments must have rolled");
    assert_holds(&log, 0, next, 100);
    // Reading from the middle of a batch starts at that record.
    let records = log.read_records(5, 1).unwrap();
    assert_eq!(records[0].offset, 5);
    // Reading at the high watermark is empty; past it is out of range.
    assert!(log.read(next, 1024).unwrap().data.is_empty());
    let err = log.read(next + 1, 1024).unwrap_err();
    assert!(matches!(err, StorageError::OffsetOutOfRange { offset, .. } if offset == next + 1));
}

#[test]
fn reads_respect_max_bytes_but_always_return_a_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(1 << 20, FlushPolicy::Os)).unwrap();
    let first = batch_for(0, 10, 1000);
    let second = batch_for(10, 10, 1000);
    log.append(&first).unwrap();
    log.append(&second).unwrap();
    let chunk = log.read(0, 10).unwrap();
    assert_eq!(
        chunk.data.len(),
        first.len(),
        "one whole batch despite max_bytes=10"
    );
    let chunk = log.read(0, first.len() + second.len() - 1).unwrap();
    assert_eq!(chunk.data.len(), first.len(), "no partial second batch");
    let chunk = log.read(0, 1 << 20).unwrap();
    assert_eq!(chunk.data.len(), first.len() + second.len());
    assert_eq!(chunk.high_watermark, 20);
    assert_eq!(read_all(&log, 0).len(), 20);
}

#[test]
fn reopen_continues_at_the_right_offset_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(4096, FlushPolicy::EveryBatch);
    {
        let log = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
        for i in 0..40 {
            log.append(&batch_for(i * 3, 3, 50)).unwrap();
        }
        log.close().unwrap();
        assert!(matches!(
            log.append(&batch_for(120, 1, 50)),
            Err(StorageError::Closed(_))
        ));
    }
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert!(log.torn_tail().is_none());
    assert_eq!(log.high_watermark(), 120);
    assert_eq!(log.append(&batch_for(120, 2, 50)).unwrap().base_offset, 120);
    assert_holds(&log, 0, 122, 50);
}

#[test]
fn batch_larger_than_a_segment_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(4096, FlushPolicy::Os)).unwrap();
    log.append(&batch_for(0, 1, 10)).unwrap();
    let err = log.append(&batch_for(1, 1, 5000)).unwrap_err();
    assert!(matches!(err, StorageError::BatchTooLarge { .. }), "{err}");
    assert_eq!(log.end_offset(), 1);
    assert_eq!(log.append(&batch_for(1, 1, 10)).unwrap().base_offset, 1);
}

#[test]
fn offset_for_timestamp_finds_the_first_record_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(4096, FlushPolicy::Os)).unwrap();
    // Timestamps 1_700_000_000_000 + offset, across several segments.
    for i in 0..50 {
        log.append(&batch_for(i * 4, 4, 80)).unwrap();
    }
    assert!(log.segment_count() > 3);
    let base = 1_700_000_000_000i64;
    for offset in [0u64, 1, 3, 4, 57, 120, 199] {
        assert_eq!(log.offset_for_timestamp(base + offset as i64), Some(offset));
    }
    assert_eq!(log.offset_for_timestamp(0), Some(0));
    assert_eq!(log.offset_for_timestamp(base + 200), None);
}

#[test]
fn offset_for_timestamp_handles_out_of_order_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(1 << 20, FlushPolicy::Os)).unwrap();
    let ts = [50i64, 10, 40, 20, 60, 30];
    for (i, t) in ts.iter().enumerate() {
        let record = Record {
            timestamp: *t,
            ..record_for(i as u64, 10)
        };
        log.append(&BatchBuilder::encode(&[record], ProducerInfo::NONE))
            .unwrap();
    }
    // The first record (in offset order) whose timestamp is >= the target.
    assert_eq!(log.offset_for_timestamp(45), Some(0));
    assert_eq!(log.offset_for_timestamp(55), Some(4));
    assert_eq!(log.offset_for_timestamp(5), Some(0));
    assert_eq!(log.offset_for_timestamp(61), None);
}

#[test]
fn size_retention_deletes_oldest_sealed_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(4096, FlushPolicy::Os);
    let log = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
    for i in 0..100 {
        log.append(&batch_for(i * 2, 2, 100)).unwrap();
    }
    let before = log.segment_count();
    let size = log.size_bytes();
    cfg.retention_bytes = Some(size / 2);
    log.set_config(cfg).unwrap();
    let report = log.enforce_retention(i64::MAX).unwrap();
    assert!(!report.deleted_segments.is_empty());
    assert_eq!(log.segment_count(), before - report.deleted_segments.len());
    assert!(
        log.size_bytes() >= size / 2,
        "retention keeps at least the limit"
    );
    for path in &report.deleted_segments {
        assert!(!path.exists(), "{} still on disk", path.display());
    }
    let start = log.log_start_offset();
    assert_eq!(start, report.log_start_offset);
    assert!(start > 0);
    assert!(matches!(
        log.read(start - 1, 100),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    assert_holds(&log, start, 200, 100);
}

#[test]
fn time_retention_reaches_the_active_segment_of_a_quiet_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(4096, FlushPolicy::Os);
    cfg.retention_age = Some(Duration::from_secs(60));
    let log = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
    for i in 0..30 {
        log.append(&batch_for(i, 1, 200)).unwrap();
    }
    let newest = 1_700_000_000_000 + 29;
    // A minute after offset 20's timestamp: offsets 0..20 expired, but only
    // whole sealed segments go.
    let report = log
        .enforce_retention(1_700_000_000_000 + 20 + 60_000)
        .unwrap();
    let start = log.log_start_offset();
    assert!(start > 0 && start <= 20, "start {start}");
    assert!(!report.deleted_segments.is_empty());
    assert_holds(&log, start, 30, 200);
    // Long after everything: the log empties but keeps its offsets.
    log.enforce_retention(newest + 120_000).unwrap();
    assert_eq!(log.log_start_offset(), 30);
    assert_eq!(log.high_watermark(), 30);
    assert_eq!(log.append(&batch_for(30, 1, 200)).unwrap().base_offset, 30);
    drop(log);
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert_eq!(log.log_start_offset(), 30);
    assert_holds(&log, 30, 31, 200);
}

#[test]
fn a_reader_keeps_a_deleted_segment_readable() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(4096, FlushPolicy::Os);
    let log = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
    for i in 0..60 {
        log.append(&batch_for(i, 1, 200)).unwrap();
    }
    let held = log.read(0, 1 << 20).unwrap().data;
    let expected = held.to_vec();
    cfg.retention_bytes = Some(1);
    log.set_config(cfg).unwrap();
    let report = log.enforce_retention(0).unwrap();
    assert!(
        report
            .deleted_segments
            .iter()
            .any(|p| p.ends_with("00000000000000000000.log"))
    );
    assert!(log.log_start_offset() > 0);
    // The bytes stay valid and unchanged after their file is gone.
    assert_eq!(&held[..], &expected[..]);
    let records = sluice_broker::storage::decode_records(held, 0).unwrap();
    assert_eq!(records[0].record, record_for(0, 200));
}

#[test]
fn every_batch_appends_from_many_threads_share_syncs_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        PartitionLog::open(dir.path(), config(64 * 1024, FlushPolicy::EveryBatch)).unwrap(),
    );
    let threads = 8;
    let per_thread = 50;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut offsets = Vec::new();
                for i in 0..per_thread {
                    let record = Record {
                        key: Some(bytes::Bytes::from(format!("t{t}"))),
                        value: bytes::Bytes::from(format!("{t}:{i}")),
                        ..Record::default()
                    };
                    let info = log
                        .append(&BatchBuilder::encode(&[record], ProducerInfo::NONE))
                        .unwrap();
                    // Acknowledged means visible.
                    assert!(log.high_watermark() > info.base_offset);
                    offsets.push(info.base_offset);
                }
                offsets
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        let offsets = h.join().unwrap();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "a thread's appends stay in order"
        );
        all.extend(offsets);
    }
    all.sort_unstable();
    assert_eq!(all, (0..(threads * per_thread) as u64).collect::<Vec<_>>());
    let records = read_all(&log, 0);
    for t in 0..threads {
        let values: Vec<String> = records
            .iter()
            .filter(|r| r.record.key.as_deref() == Some(format!("t{t}").as_bytes()))
            .map(|r| String::from_utf8(r.record.value.to_vec()).unwrap())
            .collect();
        let expected: Vec<String> = (0..per_thread).map(|i| format!("{t}:{i}")).collect();
        assert_eq!(values, expected, "per-key order for t{t}");
    }
}

#[test]
fn interval_policy_makes_data_visible_at_once_and_the_flusher_syncs_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        PartitionLog::open(
            dir.path(),
            config(64 * 1024, FlushPolicy::Interval(Duration::from_millis(20))),
        )
        .unwrap(),
    );
    let flusher = sluice_broker::storage::IntervalFlusher::start();
    flusher.register(&log);
    log.append(&batch_for(0, 5, 10)).unwrap();
    assert_eq!(log.high_watermark(), 5, "visible before any sync");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while log.flush_due(std::time::Instant::now() + Duration::from_secs(3600)) == Some(true) {
        assert!(
            std::time::Instant::now() < deadline,
            "the flusher never synced"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test]
async fn subscribers_wake_when_data_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        PartitionLog::open(dir.path(), config(64 * 1024, FlushPolicy::EveryBatch)).unwrap(),
    );
    let mut watcher = log.subscribe();
    let writer = {
        let log = Arc::clone(&log);
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(50));
            log.append(&batch_for(0, 3, 10)).unwrap();
        })
    };
    let hw = tokio::time::timeout(Duration::from_secs(5), watcher.wait_for(|hw| *hw >= 3))
        .await
        .expect("woken within 5 s")
        .unwrap();
    assert_eq!(*hw, 3);
    writer.await.unwrap();
    assert_eq!(log.read_records(0, 1024).unwrap().len(), 3);
}

/// Captures what the storage engine logs.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn open_capturing_logs(
    dir: &std::path::Path,
    cfg: LogConfig,
) -> (Result<PartitionLog, StorageError>, String) {
    let capture = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_ansi(false)
        .finish();
    let log = tracing::subscriber::with_default(subscriber, || PartitionLog::open(dir, cfg));
    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    (log, text)
}

fn write_at(path: &std::path::Path, position: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(position)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn a_garbage_tail_is_truncated_zeroed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(64 * 1024, FlushPolicy::EveryBatch);
    let end = {
        let log = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
        for i in 0..10 {
            log.append(&batch_for(i * 2, 2, 100)).unwrap();
        }
        log.size_bytes()
    };
    let segment = &segment_files(dir.path(), "log")[0];
    // A torn write: the first 300 bytes of a real batch, then garbage.
    let next = batch_for(20, 5, 100);
    write_at(segment, end, &next.as_bytes()[..300]);
    write_at(segment, end + 1000, b"garbage that is not a batch");

    let (log, logs) = open_capturing_logs(dir.path(), cfg.clone());
    let log = log.unwrap();
    let torn = log.torn_tail().expect("the torn tail is reported");
    assert_eq!(torn.position, end);
    assert_eq!(torn.discarded_bytes, 1000 + 27);
    assert!(logs.contains("truncated torn tail"), "logs were: {logs}");
    assert!(
        logs.contains(&end.to_string()),
        "logs name the position: {logs}"
    );
    assert_eq!(log.high_watermark(), 20);
    assert_holds(&log, 0, 20, 100);
    // The torn bytes are zero on disk now, and appends continue at 20.
    let mut data = Vec::new();
    std::fs::File::open(segment)
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    assert!(data[end as usize..].iter().all(|&b| b == 0));
    assert_eq!(log.append(&batch_for(20, 1, 100)).unwrap().base_offset, 20);
    drop(log);
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert!(log.torn_tail().is_none(), "a clean reopen reports nothing");
    assert_holds(&log, 0, 21, 100);
}

#[test]
fn a_batch_with_a_bad_checksum_ends_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(64 * 1024, FlushPolicy::EveryBatch);
    let positions: Vec<u64> = {
        let log = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
        (0..6)
            .map(|i| {
                let before = log.size_bytes();
                log.append(&batch_for(i, 1, 100)).unwrap();
                before
            })
            .collect()
    };
    let segment = &segment_files(dir.path(), "log")[0];
    // Flip one byte inside the fourth batch's records.
    let mut byte = [0u8];
    let at = positions[3] + 70;
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment)
        .unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut byte).unwrap();
    write_at(segment, at, &[byte[0] ^ 0xff]);
    let damaged = std::fs::read(segment).unwrap();
    let log = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
    // Valid batches follow the bad one, so it is damage, not a torn write:
    // nothing is zeroed, and the log goes on past every offset the file
    // holds instead of giving offsets 3..6 out again.
    assert!(log.torn_tail().is_none());
    let lost = log.lost_ranges();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(
        (lost[0].position, lost[0].start_offset, lost[0].end_offset),
        (positions[3], 3, 6)
    );
    assert!(lost[0].reason.contains("checksum"), "{}", lost[0].reason);
    assert_eq!(log.high_watermark(), 6);
    assert_range(&log, 0, 3, 100);
    assert!(matches!(
        log.read(4, 1024),
        Err(StorageError::DataLoss { .. })
    ));
    assert_eq!(log.append(&batch_for(6, 1, 100)).unwrap().base_offset, 6);
    log.close().unwrap();
    drop(log);
    assert_eq!(
        std::fs::read(segment).unwrap()[..damaged.len()],
        damaged[..]
    );
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert_eq!(log.lost_ranges().len(), 1);
    assert_range(&log, 6, 7, 100);
}

#[test]
fn a_zeroed_header_is_never_taken_for_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(64 * 1024, FlushPolicy::EveryBatch);
    let second = {
        let log = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
        log.append(&batch_for(0, 1, 100)).unwrap();
        let second = log.size_bytes();
        log.append(&batch_for(1, 1, 100)).unwrap();
        log.append(&batch_for(2, 1, 100)).unwrap();
        second
    };
    let segment = &segment_files(dir.path(), "log")[0];
    // Zero the second batch's header only: what follows is still a valid
    // batch, but the log must end at the zeroes.
    write_at(segment, second, &[0u8; 56]);
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert_range(&log, 0, 1, 100);
    // The zeroed batch is never served; the valid one after it keeps its
    // offset out of reuse.
    let lost = log.lost_ranges();
    assert_eq!(
        (lost[0].position, lost[0].start_offset, lost[0].end_offset),
        (second, 1, 3)
    );
    assert_eq!(log.high_watermark(), 3);
}

#[test]
fn a_missing_or_corrupt_index_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(16 * 1024, FlushPolicy::Os);
    fill(dir.path(), &cfg, 200, 100);
    let mut indexes = segment_files(dir.path(), "idx");
    assert!(indexes.len() >= 3);
    // The active segment's index is rebuilt in memory on every open and
    // only written by its seal: compare the sealed ones.
    let active_index = indexes.pop().unwrap();
    let sizes: Vec<u64> = indexes
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .collect();
    assert!(sizes.iter().all(|&s| s > 0));
    std::fs::remove_file(&indexes[0]).unwrap();
    std::fs::write(&indexes[1], vec![0xabu8; 100]).unwrap();
    let last = indexes.last().unwrap();
    std::fs::write(last, b"short").unwrap();
    std::fs::write(&active_index, b"short").unwrap();
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert!(log.torn_tail().is_none());
    let rebuilt: Vec<u64> = indexes
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .collect();
    assert_eq!(rebuilt, sizes, "rebuilt indexes match the originals");
    assert_holds(&log, 0, 200, 100);
    assert_eq!(log.offset_for_timestamp(1_700_000_000_150), Some(150));
}

/// The base offset of a segment file, from its name.
fn base_of(path: &std::path::Path) -> u64 {
    path.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}

/// Reads every readable record from `from` to the high watermark, skipping
/// lost ranges; returns the records and the DataLoss errors met.
fn read_skipping_losses(log: &PartitionLog, from: u64) -> (Vec<u64>, Vec<StorageError>) {
    let mut offsets = Vec::new();
    let mut losses = Vec::new();
    let mut next = from;
    while next < log.high_watermark() {
        match log.read_records(next, 64 * 1024) {
            Ok(records) => {
                assert!(!records.is_empty(), "empty read at {next}");
                next = records.last().unwrap().offset + 1;
                offsets.extend(records.iter().map(|r| r.offset));
            }
            Err(StorageError::DataLoss { end, .. }) => {
                losses.push(log.read(next, 1).unwrap_err());
                next = end;
            }
            Err(e) => panic!("read at {next}: {e}"),
        }
    }
    (offsets, losses)
}

/// Asserts the log holds exactly the offset-derived records `from..to`
/// (a range that may end at a loss rather than at the high watermark).
fn assert_range(log: &PartitionLog, from: u64, to: u64, value_len: usize) {
    let mut next = from;
    while next < to {
        let records = log.read_records(next, 64 * 1024).expect("read");
        assert!(!records.is_empty(), "empty read at {next}");
        for r in records.iter().take_while(|r| r.offset < to) {
            assert_eq!(r.offset, next);
            assert_eq!(r.record, record_for(next, value_len), "record at {next}");
            next += 1;
        }
    }
}

#[test]
fn a_missing_middle_segment_is_a_lost_range_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(4096, FlushPolicy::Os);
    fill(dir.path(), &cfg, 100, 200);
    let logs = segment_files(dir.path(), "log");
    assert!(logs.len() >= 4);
    let (lost_from, next) = (base_of(&logs[1]), base_of(&logs[2]));
    std::fs::remove_file(&logs[1]).unwrap();
    let log = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
    assert_eq!(log.high_watermark(), 100, "offsets stay what they were");
    let lost = log.lost_ranges();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(
        (lost[0].start_offset, lost[0].end_offset),
        (lost_from, next)
    );
    assert_eq!(lost[0].path, logs[0], "named by the segment before the gap");
    assert!(
        lost[0].reason.contains(logs[1].to_str().unwrap()),
        "{lost:?}"
    );
    // Everything around the gap reads back exactly.
    assert_range(&log, 0, lost_from, 200);
    assert_range(&log, next, 100, 200);
    let err = log.read(lost_from + 1, 1024).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, StorageError::DataLoss { start, end, .. } if start == lost_from && end == next),
        "{message}"
    );
    assert!(
        message.contains(&format!("next readable offset is {next}")),
        "{message}"
    );
    // Appends go on at the old end; the gap survives a reopen.
    log.append(&batch_for(100, 1, 200)).unwrap();
    log.close().unwrap();
    drop(log);
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert_eq!(log.high_watermark(), 101);
    assert_eq!(log.lost_ranges().len(), 1);
}

#[test]
fn damage_inside_a_sealed_segment_loses_only_the_rest_of_that_segment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(4096, FlushPolicy::Os);
    fill(dir.path(), &cfg, 100, 200);
    let logs = segment_files(dir.path(), "log");
    assert!(logs.len() >= 4);
    let original = std::fs::read(&logs[1]).unwrap();
    // 64 bytes of garbage in the middle of the second segment.
    let middle = original.len() as u64 / 2;
    write_at(&logs[1], middle, &[0x5a; 64]);
    let (log, text) = open_capturing_logs(dir.path(), cfg);
    let log = log.unwrap();
    assert!(text.contains(logs[1].to_str().unwrap()), "{text}");
    assert_eq!(log.high_watermark(), 100);
    let lost = log.lost_ranges();
    assert_eq!(lost.len(), 1, "{lost:?}");
    let range = &lost[0];
    assert_eq!(range.path, logs[1]);
    assert!(range.position <= middle && range.position > 0, "{range:?}");
    assert!(range.start_offset > base_of(&logs[1]));
    assert_eq!(range.end_offset, base_of(&logs[2]));
    // The batches before the damage and every later segment serve.
    assert_range(&log, 0, range.start_offset, 200);
    assert_range(&log, range.end_offset, 100, 200);
    let (offsets, losses) = read_skipping_losses(&log, 0);
    assert_eq!(losses.len(), 1);
    assert_eq!(
        offsets.len() as u64,
        100 - (range.end_offset - range.start_offset)
    );
    // The file itself is left as it was: nothing after the damage is gone.
    let mut damaged = original.clone();
    damaged[middle as usize..middle as usize + 64].copy_from_slice(&[0x5a; 64]);
    assert_eq!(std::fs::read(&logs[1]).unwrap(), damaged);
}

#[test]
fn a_truncated_sealed_segment_and_a_zeroed_one_are_lost_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(4096, FlushPolicy::Os);
    fill(dir.path(), &cfg, 150, 200);
    let logs = segment_files(dir.path(), "log");
    assert!(logs.len() >= 5);
    // Cut the first segment mid-batch; zero the whole of the third.
    let len = logs[0].metadata().unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&logs[0])
        .unwrap()
        .set_len(len - 30)
        .unwrap();
    let third_len = logs[2].metadata().unwrap().len() as usize;
    std::fs::write(&logs[2], vec![0u8; third_len]).unwrap();
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    let lost = log.lost_ranges();
    assert_eq!(lost.len(), 2, "{lost:?}");
    assert_eq!(lost[0].path, logs[0]);
    assert_eq!(lost[0].end_offset, base_of(&logs[1]));
    assert_eq!(
        lost[0].start_offset,
        base_of(&logs[1]) - 1,
        "only the cut batch"
    );
    assert_eq!(lost[1].path, logs[2]);
    assert_eq!(lost[1].position, 0);
    assert_eq!(
        (lost[1].start_offset, lost[1].end_offset),
        (base_of(&logs[2]), base_of(&logs[3]))
    );
    // From the start, the first read fails only at the first loss.
    assert_range(&log, 0, lost[0].start_offset, 200);
    assert_range(&log, base_of(&logs[1]), base_of(&logs[2]), 200);
    assert_range(&log, base_of(&logs[3]), 150, 200);
}

#[test]
fn an_index_that_points_past_damage_does_not_hide_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(4096, FlushPolicy::Os);
    fill(dir.path(), &cfg, 100, 200);
    let logs = segment_files(dir.path(), "log");
    let indexes = segment_files(dir.path(), "idx");
    assert!(
        indexes[0].metadata().unwrap().len() >= 32,
        "a sealed index with entries"
    );
    // One byte inside the first batch's records: the header still parses,
    // so only a checksum over the batch finds it. The index stays intact.
    let data = std::fs::read(&logs[0]).unwrap();
    write_at(&logs[0], 60, &[data[60] ^ 0xff]);
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    let lost = log.lost_ranges();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!((lost[0].start_offset, lost[0].position), (0, 0));
    assert_eq!(lost[0].end_offset, base_of(&logs[1]));
    assert!(lost[0].reason.contains("checksum"), "{lost:?}");
    // No read returns the damaged batch or the ones after it.
    for offset in [0, 1, base_of(&logs[1]) - 1] {
        assert!(matches!(
            log.read(offset, 1 << 20),
            Err(StorageError::DataLoss { .. })
        ));
    }
    assert_range(&log, base_of(&logs[1]), 100, 200);
}

#[test]
fn check_agrees_with_open_and_repair_never_cuts_the_last_segment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(64 * 1024, FlushPolicy::EveryBatch);
    let positions: Vec<u64> = {
        let log = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
        (0..6)
            .map(|i| {
                let before = log.size_bytes();
                log.append(&batch_for(i, 1, 100)).unwrap();
                before
            })
            .collect()
    };
    let segment = segment_files(dir.path(), "log")[0].clone();
    write_at(&segment, positions[2] + 70, b"\xff\xfe");
    let before = std::fs::read(&segment).unwrap();
    let damage = |repair| {
        let findings = check_log_dir(dir.path(), repair).unwrap();
        let damage: Vec<_> = findings.into_iter().filter(|f| f.is_damage).collect();
        assert_eq!(damage.len(), 1, "{damage:?}");
        damage.into_iter().next().unwrap()
    };
    let finding = damage(false);
    assert_eq!(finding.path, segment);
    assert!(
        finding.problem.contains("offsets 2..6 are lost"),
        "{finding:?}"
    );
    assert!(damage(true).repaired.is_some());
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        before,
        "the last segment is left whole"
    );
    let aside = std::fs::read(format!("{}.damaged", segment.display())).unwrap();
    assert_eq!(aside[..], before[positions[2] as usize..]);
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    let lost = log.lost_ranges();
    assert_eq!((lost[0].start_offset, lost[0].end_offset), (2, 6));
}

#[test]
fn retention_deletes_a_damaged_segment_and_its_lost_range() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(4096, FlushPolicy::Os);
    fill(dir.path(), &cfg, 100, 200);
    let logs = segment_files(dir.path(), "log");
    write_at(&logs[0], 100, b"garbage!");
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert_eq!(log.lost_ranges().len(), 1);
    let report = log.delete_segments_before(base_of(&logs[1])).unwrap();
    assert_eq!(report.deleted_segments, vec![logs[0].clone()]);
    assert!(!logs[0].exists());
    assert!(log.lost_ranges().is_empty());
    assert_range(&log, base_of(&logs[1]), 100, 200);
}

#[test]
fn a_stray_file_is_ignored_named_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(4096, FlushPolicy::Os);
    fill(dir.path(), &cfg, 50, 200);
    let stray = dir.path().join("notes.txt");
    let odd = dir.path().join("123.log");
    std::fs::write(&stray, b"hello").unwrap();
    std::fs::write(&odd, b"not a segment").unwrap();
    std::fs::create_dir(dir.path().join("subdir")).unwrap();
    let (log, text) = open_capturing_logs(dir.path(), cfg);
    let log = log.unwrap();
    for name in ["notes.txt", "123.log", "subdir"] {
        assert!(text.contains(name), "{name} not named in: {text}");
    }
    assert!(stray.exists() && odd.exists());
    assert!(log.lost_ranges().is_empty());
    assert_range(&log, 0, 50, 200);
}
#[test]
fn a_crash_between_seal_and_new_segment_recovers() {
    // Sealing truncates the file; a crash before the next segment exists
    // leaves a truncated last segment, which must become active again.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(4096, FlushPolicy::EveryBatch);
    fill(dir.path(), &cfg, 10, 100);
    let logs = segment_files(dir.path(), "log");
    assert_eq!(logs.len(), 1);
    let data = std::fs::read(&logs[0]).unwrap();
    let mut end = 0;
    while let Ok(h) = BatchHeader::parse(&data[end..]) {
        end += h.total_len();
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&logs[0])
        .unwrap()
        .set_len(end as u64)
        .unwrap();
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert!(log.torn_tail().is_none());
    assert_eq!(log.append(&batch_for(10, 1, 100)).unwrap().base_offset, 10);
    assert_holds(&log, 0, 11, 100);
    assert_eq!(
        logs[0].metadata().unwrap().len(),
        4096,
        "grown back to full size"
    );
}

#[test]
fn a_seal_interrupted_by_a_crash_is_finished_on_open() {
    // Under lazy flush policies the old segment is sealed (synced and
    // truncated) in the background after the roll; a crash before that
    // leaves a full-size file with a zero tail in front of the new segment.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(4096, FlushPolicy::Os);
    fill(dir.path(), &cfg, 40, 200);
    let logs = segment_files(dir.path(), "log");
    assert!(logs.len() >= 3);
    let sealed_len = logs[1].metadata().unwrap().len();
    assert!(sealed_len < 4096, "sealed segments are truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&logs[1])
        .unwrap()
        .set_len(4096)
        .unwrap();
    std::fs::remove_file(logs[1].with_extension("idx")).unwrap();
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert_eq!(
        logs[1].metadata().unwrap().len(),
        sealed_len,
        "the seal was finished"
    );
    assert!(
        logs[1].with_extension("idx").exists(),
        "and its index rebuilt"
    );
    assert_holds(&log, 0, 40, 200);
}

#[test]
fn a_deferred_append_is_invisible_until_waited_for_under_every_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(64 * 1024, FlushPolicy::EveryBatch)).unwrap();
    let info = log.append_deferred(&batch_for(0, 3, 10)).unwrap();
    assert_eq!((info.base_offset, info.last_offset), (0, 2));
    assert_eq!(log.end_offset(), 3);
    assert_eq!(log.high_watermark(), 0, "not synced, so not visible");
    assert!(log.read(0, 1024).unwrap().data.is_empty());
    log.wait_appended(&info).unwrap();
    assert_eq!(log.high_watermark(), 3);
    assert_holds(&log, 0, 3, 10);

    let os_dir = tempfile::tempdir().unwrap();
    let os_log = PartitionLog::open(os_dir.path(), config(64 * 1024, FlushPolicy::Os)).unwrap();
    os_log.append_deferred(&batch_for(0, 3, 10)).unwrap();
    assert_eq!(
        os_log.high_watermark(),
        3,
        "visible at once without a sync policy"
    );
}
