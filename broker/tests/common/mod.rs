//! Fixtures shared by the storage integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use sluice_broker::storage::{
    BatchBuilder, EncodedBatch, FlushPolicy, Header, LogConfig, PartitionLog, ProducerInfo, Record,
    StoredRecord,
};

/// A small-segment config so tests roll often.
pub fn config(segment_bytes: u64, flush: FlushPolicy) -> LogConfig {
    LogConfig {
        segment_bytes,
        segment_age: None,
        index_interval_bytes: 256,
        flush,
        retention_age: None,
        retention_bytes: None,
    }
}

/// The record with offset-derived content that tests write at `offset`, so a
/// reader can tell exactly what belongs there.
pub fn record_for(offset: u64, value_len: usize) -> Record {
    let mut value = format!("value-{offset}-").into_bytes();
    value.resize(value_len.max(value.len()), (offset % 251) as u8);
    Record {
        key: Some(Bytes::from(format!("key-{}", offset % 7))),
        value: Bytes::from(value),
        headers: vec![Header {
            key: "offset".into(),
            value: Bytes::from(offset.to_string()),
        }],
        timestamp: 1_700_000_000_000 + offset as i64,
    }
}

pub fn batch_for(first_offset: u64, count: u64, value_len: usize) -> EncodedBatch {
    let records: Vec<Record> = (first_offset..first_offset + count)
        .map(|o| record_for(o, value_len))
        .collect();
    BatchBuilder::encode(&records, ProducerInfo::NONE)
}

/// Writes offset-derived records `0..count`, one per batch, into a fresh log
/// in `dir` and closes it.
pub fn fill(dir: &Path, cfg: &LogConfig, count: u64, value_len: usize) {
    let log = PartitionLog::open(dir, cfg.clone()).unwrap();
    for offset in 0..count {
        log.append(&batch_for(offset, 1, value_len)).unwrap();
    }
    log.close().unwrap();
}

/// Reads every record from `from` to the high watermark.
pub fn read_all(log: &PartitionLog, from: u64) -> Vec<StoredRecord> {
    let mut out = Vec::new();
    let mut next = from;
    while next < log.high_watermark() {
        let records = log.read_records(next, 64 * 1024).expect("read");
        assert!(
            !records.is_empty(),
            "read at {next} below the high watermark returned nothing"
        );
        next = records.last().unwrap().offset + 1;
        out.extend(records);
    }
    out
}

/// Asserts the log holds exactly the offset-derived records `from..to`.
pub fn assert_holds(log: &PartitionLog, from: u64, to: u64, value_len: usize) {
    let records = read_all(log, from);
    assert_eq!(records.len() as u64, to - from, "record count from {from}");
    for (i, r) in records.iter().enumerate() {
        let offset = from + i as u64;
        assert_eq!(r.offset, offset);
        assert_eq!(
            r.record,
            record_for(offset, value_len),
            "record at {offset}"
        );
    }
}

pub fn segment_files(dir: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    files
}

/// A small tmpfs, unmounted when dropped.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (e.g. "1m"), or `None` (with a note) when
    /// this process may not mount.
    pub fn mount(size: &str) -> Option<SmallDisk> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("note: not root, so no tmpfs can be mounted: skipping the full-disk test");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        if !status.success() {
            eprintln!("note: mounting a tmpfs failed ({status}): skipping the full-disk test");
            return None;
        }
        Some(SmallDisk { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with a filler file until it is full.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xAAu8; 4096];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
