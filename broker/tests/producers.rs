//! Idempotent appends: retries are caught, also after a reopen, a SIGKILL,
//! and retention, and racing copies of a batch are written once.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use sluice_broker::producers::{IdempotentLog, ProducerAppendError, SequenceError};
use sluice_broker::storage::{
    BatchBuilder, EncodedBatch, FlushPolicy, LogConfig, PartitionLog, ProducerInfo, Record,
};

const CHILD_DIR_ENV: &str = "SLUICE_PRODUCER_CHILD_DIR";
const PRODUCER_ID: u64 = 7;

fn batch(producer_id: u64, epoch: u16, base_sequence: i32, count: i32) -> EncodedBatch {
    let records: Vec<Record> = (0..count)
        .map(|i| Record {
            key: Some(Bytes::from(format!("p{producer_id}"))),
            value: Bytes::from(format!("{producer_id}:{epoch}:{}", base_sequence + i)),
            headers: vec![],
            timestamp: 1_700_000_000_000,
        })
        .collect();
    BatchBuilder::encode(
        &records,
        ProducerInfo {
            producer_id,
            epoch,
            base_sequence,
        },
    )
}

fn open(dir: &Path, cfg: &LogConfig) -> IdempotentLog {
    let log = Arc::new(PartitionLog::open(dir.join("log"), cfg.clone()).unwrap());
    IdempotentLog::open(log, dir.join("producers")).unwrap()
}

/// How many records of the log carry `value`.
fn copies(log: &PartitionLog, value: &str) -> usize {
    common::read_all(log, log.log_start_offset())
        .iter()
        .filter(|r| r.record.value == value.as_bytes())
        .count()
}

#[test]
fn a_retry_after_reopen_gets_the_original_offsets_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::config(64 * 1024, FlushPolicy::EveryBatch);
    let first = {
        let log = open(dir.path(), &cfg);
        let first = log.append(&batch(PRODUCER_ID, 0, 0, 3), 0).unwrap();
        assert!(!first.duplicate);
        log.append(&batch(PRODUCER_ID, 0, 3, 2), 0).unwrap();
        first
    }; // no snapshot: the state comes back from the log alone
    let log = open(dir.path(), &cfg);
    let end = log.log().end_offset();
    let retry = log.append(&batch(PRODUCER_ID, 0, 0, 3), 0).unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.info, first.info);
    assert_eq!(log.log().end_offset(), end, "nothing written");
    assert_eq!(copies(log.log(), "7:0:1"), 1);
    // The next sequence goes on; a gap does not.
    assert!(
        !log.append(&batch(PRODUCER_ID, 0, 5, 1), 0)
            .unwrap()
            .duplicate
    );
    let gap = log.append(&batch(PRODUCER_ID, 0, 9, 1), 0).unwrap_err();
    assert!(
        matches!(
            gap,
            ProducerAppendError::Sequence(SequenceError::OutOfOrder {
                expected: 6,
                got: 9,
                ..
            })
        ),
        "{gap}"
    );
    assert_eq!(log.log().end_offset(), end + 1);
}

#[test]
fn an_older_epoch_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), &common::config(64 * 1024, FlushPolicy::Os));
    log.append(&batch(PRODUCER_ID, 0, 0, 1), 0).unwrap();
    log.append(&batch(PRODUCER_ID, 1, 0, 1), 0).unwrap();
    let err = log.append(&batch(PRODUCER_ID, 0, 1, 1), 0).unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
    assert_eq!(log.log().end_offset(), 2);
}

#[test]
fn snapshots_carry_the_state_past_retention() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(4096, FlushPolicy::Os);
    {
        let log = open(dir.path(), &cfg);
        log.append(&batch(PRODUCER_ID, 0, 0, 1), 0).unwrap();
        // Another producer fills segments after it.
        for seq in 0..200 {
            log.append(&batch(99, 0, seq, 1), 0).unwrap();
        }
        log.snapshot().unwrap();
        cfg.retention_bytes = Some(1);
        log.log().set_config(cfg.clone()).unwrap();
        log.log().enforce_retention(0).unwrap();
        assert!(
            log.log().log_start_offset() > 0,
            "the first batch is gone from the log"
        );
    }
    let log = open(dir.path(), &cfg);
    let retry = log.append(&batch(PRODUCER_ID, 0, 0, 1), 0).unwrap();
    assert!(retry.duplicate, "remembered through the snapshot");
    assert_eq!(retry.info.base_offset, 0);
}

#[test]
fn a_snapshot_ahead_of_the_log_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::config(64 * 1024, FlushPolicy::Os);
    {
        let log = open(dir.path(), &cfg);
        log.append(&batch(PRODUCER_ID, 0, 0, 1), 0).unwrap();
        log.append(&batch(PRODUCER_ID, 0, 1, 1), 0).unwrap();
        log.snapshot().unwrap();
    }
    // Pretend a crash cut the log's last batch after the snapshot was taken:
    // rename the snapshot so it claims a later offset than the log holds.
    let snapshots = dir.path().join("producers");
    let only = std::fs::read_dir(&snapshots)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::rename(&only, snapshots.join(format!("{:020}.snapshot", 50))).unwrap();
    let log = open(dir.path(), &cfg);
    // Rebuilt from the log alone: both batches are known.
    assert!(
        log.append(&batch(PRODUCER_ID, 0, 1, 1), 0)
            .unwrap()
            .duplicate
    );
    assert!(
        !log.append(&batch(PRODUCER_ID, 0, 2, 1), 0)
            .unwrap()
            .duplicate
    );
}

#[test]
fn racing_copies_of_one_batch_are_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(
        dir.path(),
        &common::config(64 * 1024, FlushPolicy::EveryBatch),
    ));
    let copy = batch(PRODUCER_ID, 0, 0, 4);
    let results: Vec<_> = (0..6)
        .map(|_| {
            let log = Arc::clone(&log);
            let copy = copy.clone();
            std::thread::spawn(move || log.append(&copy, 0).unwrap())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| !r.duplicate).count(), 1);
    assert!(results.iter().all(|r| r.info == results[0].info));
    assert_eq!(log.log().end_offset(), 4);
    assert_eq!(copies(log.log(), "7:0:2"), 1);
}

/// The child: idempotent appends with `every-batch` until killed, printing
/// `ACK <base_offset> <sequence>` for each one acknowledged.
#[test]
fn producer_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let log = open(
        Path::new(&dir),
        &common::config(64 * 1024, FlushPolicy::EveryBatch),
    );
    let mut out = std::io::stdout();
    for seq in 0.. {
        let appended = log.append(&batch(PRODUCER_ID, 0, seq * 2, 2), 0).unwrap();
        assert!(!appended.duplicate);
        writeln!(out, "ACK {} {}", appended.info.base_offset, seq * 2).unwrap();
        out.flush().unwrap();
        if seq % 50 == 49 {
            log.snapshot().unwrap();
        }
    }
}

#[test]
fn a_retry_after_sigkill_and_restart_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "producer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut acks: Vec<(u64, i32)> = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while acks.len() < 137 {
        let line = lines.next().expect("child alive").unwrap();
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (offset, seq) = rest.split_once(' ').unwrap();
            acks.push((offset.parse().unwrap(), seq.parse().unwrap()));
        }
    }
    child.kill().unwrap();
    for line in lines {
        if let Some(rest) = line.unwrap().strip_prefix("ACK ") {
            let (offset, seq) = rest.split_once(' ').unwrap();
            acks.push((offset.parse().unwrap(), seq.parse().unwrap()));
        }
    }
    child.wait().unwrap();

    let log = open(
        dir.path(),
        &common::config(64 * 1024, FlushPolicy::EveryBatch),
    );
    let end = log.log().end_offset();
    // The producer did not see the responses of its in-flight window (five
    // batches at most, here the last four acknowledged and the one after) and
    // resends it. The acknowledged ones are duplicates with their original
    // offsets.
    for &(offset, seq) in acks.iter().rev().take(4).rev() {
        let retry = log.append(&batch(PRODUCER_ID, 0, seq, 2), 0).unwrap();
        assert!(retry.duplicate, "sequence {seq} written twice");
        assert_eq!(retry.info.base_offset, offset);
    }
    assert_eq!(log.log().end_offset(), end);
    // The one after the last acknowledged batch may or may not have reached
    // the log before the kill; resent, it ends up there exactly once.
    let next_seq = acks.last().unwrap().1 + 2;
    log.append(&batch(PRODUCER_ID, 0, next_seq, 2), 0).unwrap();
    assert_eq!(copies(log.log(), &format!("7:0:{next_seq}")), 1);
}

#[test]
fn an_unchanged_partition_writes_no_new_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), &common::config(64 * 1024, FlushPolicy::Os));
    let snapshots = || {
        let mut names: Vec<_> = std::fs::read_dir(dir.path().join("producers"))
            .unwrap()
            .map(|e| {
                (
                    e.as_ref().unwrap().file_name(),
                    e.unwrap().metadata().unwrap().modified().unwrap(),
                )
            })
            .collect();
        names.sort();
        names
    };
    log.append(&batch(PRODUCER_ID, 0, 0, 1), 0).unwrap();
    log.snapshot().unwrap();
    let first = snapshots();
    assert_eq!(first.len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    log.snapshot().unwrap();
    assert_eq!(snapshots(), first, "nothing changed, nothing written");
    log.append(&batch(PRODUCER_ID, 0, 1, 1), 0).unwrap();
    log.snapshot().unwrap();
    assert_eq!(snapshots().len(), 2, "the log moved: a new snapshot");
    // Expiry changes the state without moving the log: written again.
    assert_eq!(
        log.expire_producers(i64::MAX, std::time::Duration::from_secs(1)),
        1
    );
    let before = snapshots();
    std::thread::sleep(std::time::Duration::from_millis(20));
    log.snapshot().unwrap();
    assert_ne!(snapshots(), before, "rewritten after expiry");
}

/// Issue 13, item 4: a producer rebuilt from the log's tail takes its idle
/// clock from the broker's restart, not from its records' (client-set, here
/// years old) timestamps, so the first expiry after a restart keeps it.
#[test]
fn a_producer_rebuilt_from_the_log_is_not_expired_by_its_old_record_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::config(64 * 1024, FlushPolicy::EveryBatch);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let first = {
        let log = open(dir.path(), &cfg);
        log.append(&batch(PRODUCER_ID, 0, 0, 2), now_ms()).unwrap()
    }; // no snapshot: rebuilt from the log alone
    let log = open(dir.path(), &cfg);
    let hour = std::time::Duration::from_secs(3600);
    assert_eq!(log.expire_producers(now_ms(), hour), 0, "expired at once");
    let retry = log.append(&batch(PRODUCER_ID, 0, 0, 2), now_ms()).unwrap();
    assert!(retry.duplicate, "written twice");
    assert_eq!(retry.info, first.info);
    // It still expires once idle for the expiry period after the restart.
    assert_eq!(log.expire_producers(now_ms() + 2 * 3_600_000, hour), 1);
}
