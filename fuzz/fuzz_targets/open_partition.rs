//! Opening a partition directory built from arbitrary bytes: the offline
//! check must not panic or change a file, the open must never panic, and
//! every batch a read returns afterwards must pass its checksum. Damage may
//! only show as lost ranges (DATA_LOSS) or errors.
//!
//! Input: repeated `[kind u8][base u8][len u16 LE][len bytes]`, each a file
//! of the directory: kind % 3 is 0 for `<base>.log`, 1 for `<base>.idx`,
//! 2 for a stray file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sluice_broker::storage::{
    BatchBuilder, BatchHeader, BatchIter, FlushPolicy, LogConfig, PartitionLog, ProducerInfo,
    Record, StorageError, check_log_dir,
};

/// Every file of `dir` with its bytes, in name order.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read");
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

fn write_files(dir: &Path, mut data: &[u8]) {
    let mut stray = 0;
    while data.len() >= 4 {
        let (kind, base) = (data[0] % 3, u64::from(data[1]));
        let len = usize::from(u16::from_le_bytes([data[2], data[3]])).min(data.len() - 4);
        let (content, rest) = data[4..].split_at(len);
        data = rest;
        let name = match kind {
            0 => format!("{base:020}.log"),
            1 => format!("{base:020}.idx"),
            _ => {
                stray += 1;
                format!("stray-{stray}")
            }
        };
        std::fs::write(dir.join(name), content).expect("write fuzz file");
    }
}

fuzz_target!(|data: &[u8]| {
    let root = Path::new("/dev/shm");
    let dir = if root.is_dir() {
        tempfile::tempdir_in(root)
    } else {
        tempfile::tempdir()
    }
    .expect("temporary directory");
    write_files(dir.path(), data);
    let before = snapshot(dir.path());
    let _ = check_log_dir(dir.path(), false);
    assert!(
        snapshot(dir.path()) == before,
        "a check without repair changed a file"
    );
    let config = LogConfig {
        segment_bytes: 4096,
        segment_age: None,
        index_interval_bytes: 64,
        flush: FlushPolicy::Os,
        retention_age: None,
        retention_bytes: None,
    };
    let Ok(log) = PartitionLog::open(dir.path(), config) else {
        return;
    };
    let mut next = log.log_start_offset();
    while next < log.high_watermark() {
        match log.read(next, 4096) {
            Ok(chunk) => {
                let mut last = None;
                for batch in BatchIter::new(chunk.data) {
                    let batch = batch.expect("a read returned a batch that fails its checksum");
                    assert!(BatchHeader::parse_checked(batch.as_bytes()).is_ok());
                    last = Some(batch.header().next_offset());
                }
                let Some(after) = last else {
                    panic!("empty read at {next} below the high watermark");
                };
                assert!(after > next, "a read at {next} did not move forward");
                next = after;
            }
            Err(StorageError::DataLoss { end, .. }) => {
                assert!(end > next, "a lost range must end after the offset read");
                next = end;
            }
            Err(e) => panic!("read at {next}: {e}"),
        }
    }
    let record = Record {
        value: bytes::Bytes::from_static(b"after"),
        ..Record::default()
    };
    let _ = log.append(&BatchBuilder::encode(&[record], ProducerInfo::NONE));
    let _ = log.close();
});
