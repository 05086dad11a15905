//! Storage faults at the edges: what an idle partition costs on disk, a
//! roll that fails on a full disk, a kill between a seal's truncation and
//! its sync, and readers at segment boundaries under `every-batch`.
//!
//! The full-disk tests mount a small tmpfs and so need root; without it
//! they print a note and pass. The kill test runs this binary again as a
//! child (`SEAL_CHILD_DIR_ENV`) with a debug-build failpoint that aborts
//! the process between the truncation and the sync.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_broker::storage::{
    BatchBuilder, DEFAULT_SEGMENT_BYTES, FlushPolicy, LogConfig, PartitionLog, ProducerInfo,
    Record, StorageError,
};

/// Bytes of real blocks a file holds.
fn disk_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn dir_disk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| disk_bytes(&e.unwrap().path()))
        .sum()
}

#[test]
fn an_idle_partition_costs_at_most_one_preallocation_step() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(DEFAULT_SEGMENT_BYTES, FlushPolicy::EveryBatch);
    let log = PartitionLog::open(dir.path(), config.clone()).unwrap();
    assert_eq!(
        dir_disk_bytes(dir.path()),
        0,
        "an empty log allocates nothing"
    );
    log.append(&common::batch_for(0, 1, 1000)).unwrap();
    let used = dir_disk_bytes(dir.path());
    assert!(
        used > 0 && used <= 1024 * 1024 + 64 * 1024,
        "one small record took {used} bytes of disk"
    );
    // Appends grow the file step by step, and everything reads back, also
    // across a reopen.
    for offset in 1..3000 {
        log.append(&common::batch_for(offset, 1, 1000)).unwrap();
    }
    let used = dir_disk_bytes(dir.path());
    let data = log.size_bytes();
    assert!(
        used >= data && used <= data + 1024 * 1024 + 64 * 1024,
        "{data} bytes of data took {used} bytes of disk"
    );
    common::assert_holds(&log, 0, 3000, 1000);
    log.close().unwrap();
    drop(log);
    let log = PartitionLog::open(dir.path(), config).unwrap();
    assert!(log.torn_tail().is_none());
    common::assert_holds(&log, 0, 3000, 1000);
    log.append(&common::batch_for(3000, 1, 1000)).unwrap();
    common::assert_holds(&log, 0, 3001, 1000);
}

fn big_batch(first: u64, bytes: usize) -> sluice_broker::storage::EncodedBatch {
    common::batch_for(first, 1, bytes)
}

/// Defect 5 of issue 12: the roll's new segment could not be preallocated,
/// its empty file stayed behind, appends that still fit went on into the
/// old segment past the stray file's base offset, and the next open failed
/// with an offset gap.
#[test]
fn a_roll_that_fails_on_a_full_disk_leaves_a_log_that_opens() {
    let Some(disk) = common::SmallDisk::mount("2m") else {
        return;
    };
    let dir = disk.path().join("log");
    let config = common::config(256 * 1024, FlushPolicy::EveryBatch);
    let log = PartitionLog::open(&dir, config.clone()).unwrap();
    // Nearly fill the first segment, then the disk.
    let mut next = 0;
    while log.size_bytes() < 200 * 1024 {
        log.append(&big_batch(next, 10_000)).unwrap();
        next += 1;
    }
    let filler = disk.fill();
    // A batch that does not fit rolls the log; the disk is full.
    let mut refused = 0;
    for _ in 0..4 {
        match log.append(&big_batch(next, 60_000)) {
            Ok(_) => next += 1,
            Err(e) => {
                assert!(
                    matches!(e, StorageError::DiskFull { .. }),
                    "a full disk is DiskFull, got {e}"
                );
                assert!(
                    e.to_string().to_lowercase().contains("no space left"),
                    "{e}"
                );
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "the disk never filled up");
    // Small batches that would still fit in the old segment.
    for _ in 0..3 {
        match log.append(&big_batch(next, 100)) {
            Ok(_) => next += 1,
            Err(e) => assert!(matches!(e, StorageError::DiskFull { .. }), "{e}"),
        }
    }
    log.close().unwrap();
    drop(log);
    // Restart on the still-full disk: it opens, with every record.
    let log = PartitionLog::open(&dir, config).expect("the log opens on a full disk");
    assert_eq!(log.high_watermark(), next);
    assert_eq!(common::read_all(&log, 0).len() as u64, next);
    // Space comes back: appends resume without a reopen.
    std::fs::remove_file(filler).unwrap();
    for _ in 0..30 {
        log.append(&big_batch(next, 10_000)).unwrap();
        next += 1;
    }
    assert_eq!(common::read_all(&log, 0).len() as u64, next);
    assert!(log.segment_count() >= 2);
}

/// An append that cannot get its space fails cleanly and leaves nothing
/// behind: the log neither fails nor half-writes, and the next append
/// after space is freed lands right after the last acknowledged one.
#[test]
fn a_full_disk_refuses_appends_until_space_is_freed() {
    let Some(disk) = common::SmallDisk::mount("3m") else {
        return;
    };
    let dir = disk.path().join("log");
    let config = common::config(DEFAULT_SEGMENT_BYTES, FlushPolicy::EveryBatch);
    let log = PartitionLog::open(&dir, config.clone()).unwrap();
    let filler = disk.fill();
    let mut next = 0;
    let full = loop {
        match log.append(&common::batch_for(next, 1, 1000)) {
            Ok(_) => next += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(full, StorageError::DiskFull { .. }), "{full}");
    assert!(full.is_out_of_space());
    // Still refused (not a sticky failure, not a half-written batch).
    assert!(matches!(
        log.append(&common::batch_for(next, 1, 1000)),
        Err(StorageError::DiskFull { .. })
    ));
    common::assert_holds(&log, 0, next, 1000);
    std::fs::remove_file(filler).unwrap();
    log.append(&common::batch_for(next, 1, 1000)).unwrap();
    common::assert_holds(&log, 0, next + 1, 1000);
}

const SEAL_CHILD_DIR_ENV: &str = "SLUICE_SEAL_CHILD_DIR";

/// The child of the seal test: writes batches without waiting for their
/// sync until a batch rolls the log, and the seal of the old segment hits
/// the failpoint after its truncation.
#[test]
fn seal_child() {
    let Ok(dir) = std::env::var(SEAL_CHILD_DIR_ENV) else {
        return; // A normal test run: nothing to do.
    };
    let log = PartitionLog::open(&dir, seal_config()).unwrap();
    for offset in 0.. {
        // Deferred: written but neither synced nor acknowledged, as under
        // concurrent appenders waiting for their group commit.
        log.append_deferred(&common::batch_for(offset, 1, 2000))
            .unwrap();
    }
}

fn seal_config() -> LogConfig {
    common::config(64 * 1024, FlushPolicy::EveryBatch)
}

/// `cachestat(2)`: pages of `path` in the page cache that are dirty or
/// under writeback, or `None` when the kernel lacks it (before 6.5).
fn unsynced_pages(path: &Path) -> Option<u64> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = std::fs::File::open(path).unwrap();
    let range = Range { off: 0, len: 0 };
    let mut stat = Stat::default();
    // SAFETY: the kernel reads `range` and writes `stat`, both live,
    // correctly laid-out structs for the call's duration.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    (rc == 0).then_some(stat.nr_dirty + stat.nr_writeback)
}

/// Defect 6 of issue 12: a kill between a seal's truncation and its sync
/// left a file whose length equals its data end, which open trusts as
/// sealed without syncing, so batches that were never synced (nor
/// acknowledged) were served below the high watermark while their pages
/// were still dirty. The seal now syncs before it truncates.
#[test]
fn a_kill_between_a_seals_truncate_and_its_sync_serves_no_unsynced_records() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "seal_child", "--nocapture", "--test-threads=1"])
        .env(SEAL_CHILD_DIR_ENV, dir.path())
        .env("SLUICE_FAILPOINT", "seal-after-truncate")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child must die at the failpoint");
    let logs = common::segment_files(dir.path(), "log");
    assert_eq!(logs.len(), 2, "the roll created the next segment: {logs:?}");
    let log = PartitionLog::open(dir.path(), seal_config()).unwrap();
    // The sealed segment is trusted whole: every batch in it is served...
    let served = common::read_all(&log, 0);
    assert!(!served.is_empty());
    for (offset, r) in served.iter().enumerate() {
        assert_eq!(r.record, common::record_for(offset as u64, 2000));
    }
    // ...so every byte of it must be on disk, not only in the page cache.
    match unsynced_pages(&logs[0]) {
        Some(unsynced) => assert_eq!(
            unsynced,
            0,
            "{} has unsynced pages but its records are served",
            logs[0].display()
        ),
        None => eprintln!("note: no cachestat(2) on this kernel; durability not checked"),
    }
}

/// Defect 7 of issue 12: `read` checked `from` against one high-watermark
/// snapshot but returned batches up to the segment's visible end, which a
/// seal publishes before the roll moves the high watermark. A reader sent
/// to the next offset then got OffsetOutOfRange: subscriptions died at
/// segment boundaries.
#[test]
fn readers_at_segment_boundaries_never_get_out_of_range() {
    const PRODUCERS: u64 = 4;
    const BATCHES: u64 = 600;
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        PartitionLog::open(
            dir.path(),
            common::config(8 * 1024, FlushPolicy::EveryBatch),
        )
        .unwrap(),
    );
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let log = Arc::clone(&log);
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut next = 0u64;
                let mut last_seq = [None::<u64>; PRODUCERS as usize];
                let deadline = Instant::now() + Duration::from_secs(300);
                while next < PRODUCERS * BATCHES * 2 {
                    assert!(Instant::now() < deadline, "reader stuck at {next}");
                    let records = match log.read_records(next, 4096) {
                        Ok(records) => records,
                        Err(e) => panic!("read at {next}: {e}"),
                    };
                    if records.is_empty() {
                        if done.load(Ordering::Acquire) && next >= log.high_watermark() {
                            break;
                        }
                        std::thread::yield_now();
                        continue;
                    }
                    for r in records {
                        assert_eq!(r.offset, next, "records in order, none skipped");
                        let text = String::from_utf8(r.record.value.to_vec()).unwrap();
                        let (producer, seq) = text.split_once(':').unwrap();
                        let (producer, seq): (usize, u64) =
                            (producer.parse().unwrap(), seq.parse().unwrap());
                        if let Some(last) = last_seq[producer] {
                            assert!(seq > last, "producer {producer} out of order");
                        }
                        last_seq[producer] = Some(seq);
                        next += 1;
                    }
                }
                next
            })
        })
        .collect();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for seq in 0..BATCHES {
                    let records: Vec<Record> = (0..2)
                        .map(|i| Record {
                            key: None,
                            value: Bytes::from(format!("{p}:{}", seq * 2 + i)),
                            headers: vec![],
                            timestamp: 0,
                        })
                        .collect();
                    log.append(&BatchBuilder::encode(&records, ProducerInfo::NONE))
                        .unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    done.store(true, Ordering::Release);
    for r in readers {
        assert_eq!(r.join().unwrap(), PRODUCERS * BATCHES * 2);
    }
    assert!(
        log.segment_count() > 20,
        "the test must cross many segments"
    );
}
