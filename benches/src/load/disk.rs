//! The bytes a topic's records take on the broker's disk
//! (`sluice-bench --data-dir`): the record batches in the topic's segment
//! files, `<data-dir>/topics/<topic>/<partition>/<base offset>.log` (the
//! broker's `topic_dir` and `docs/STORAGE.md`).
//!
//! The files' lengths would overstate it: the active segment of each
//! partition is allocated up to 1 MiB ahead of its data (`docs/STORAGE.md`,
//! "Preallocation in steps"), zeroes that a produce run of a few MiB per
//! partition would count as a large share. So each `.log` file is walked
//! batch header by batch header (magic and length, 8 bytes a batch) up to
//! the first position that does not hold a whole batch, and the bytes of
//! those batches are summed: headers, and records as stored (compressed or
//! not). The sparse `.idx` files are left out.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use sluice_broker::storage::batch::{HEADER_LEN, LENGTH_PREFIX_LEN, MAGIC};

/// Bytes of a batch before its `length` field counts: magic and length.
const PREFIX: u64 = LENGTH_PREFIX_LEN as u64;
/// A batch's header after the length field (base offset to base sequence):
/// a `length` below it is not a batch.
const MIN_LENGTH: u64 = (HEADER_LEN - LENGTH_PREFIX_LEN) as u64;

/// Why the topic's files could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A directory or file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// What was read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The topic has no directory under the data dir.
    #[error("no topic directory {0} (is --data-dir the broker's?)")]
    NoTopic(PathBuf),
}

/// What a topic holds on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicUsage {
    /// Bytes of whole record batches in its `.log` files.
    pub batch_bytes: u64,
    /// Total length of those files (with the active segments' allocation
    /// ahead of the data).
    pub file_bytes: u64,
    /// `.log` files.
    pub segments: u64,
}

/// The directory of `topic`'s partitions under the broker's `data_dir`.
pub fn topic_dir(data_dir: &Path, topic: &str) -> PathBuf {
    data_dir.join("topics").join(topic)
}

/// Sums the batches of every `.log` file of every partition of `topic`.
pub fn topic_usage(data_dir: &Path, topic: &str) -> Result<TopicUsage, DiskError> {
    let dir = topic_dir(data_dir, topic);
    if !dir.is_dir() {
        return Err(DiskError::NoTopic(dir));
    }
    let mut usage = TopicUsage::default();
    for partition in read_dir(&dir)? {
        if !partition.is_dir() {
            continue;
        }
        for file in read_dir(&partition)? {
            if file.extension().is_some_and(|e| e == "log") {
                let read = |source| DiskError::Read {
                    path: file.clone(),
                    source,
                };
                let (batches, length) = segment_batch_bytes(&file).map_err(read)?;
                usage.batch_bytes += batches;
                usage.file_bytes += length;
                usage.segments += 1;
            }
        }
    }
    Ok(usage)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, DiskError> {
    let read = |source| DiskError::Read {
        path: dir.to_owned(),
        source,
    };
    std::fs::read_dir(dir)
        .map_err(read)?
        .map(|entry| entry.map(|e| e.path()).map_err(read))
        .collect()
}

/// The bytes of the whole batches at the start of a segment file, and the
/// file's length.
pub fn segment_batch_bytes(path: &Path) -> std::io::Result<(u64, u64)> {
    let mut file = File::open(path)?;
    let length = file.metadata()?.len();
    let mut position = 0u64;
    let mut prefix = [0u8; PREFIX as usize];
    while position + PREFIX <= length {
        file.seek(SeekFrom::Start(position))?;
        file.read_exact(&mut prefix)?;
        let magic = u32::from_le_bytes(prefix[..4].try_into().expect("4 bytes"));
        let batch_length = u64::from(u32::from_le_bytes(prefix[4..].try_into().expect("4 bytes")));
        if magic != MAGIC || batch_length < MIN_LENGTH || position + PREFIX + batch_length > length
        {
            break;
        }
        position += PREFIX + batch_length;
    }
    Ok((position, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake batch of `len` bytes in all: the prefix, then filler.
    fn batch(len: usize) -> Vec<u8> {
        let mut bytes = MAGIC.to_le_bytes().to_vec();
        bytes.extend_from_slice(&((len - 8) as u32).to_le_bytes());
        bytes.resize(len, 0xab);
        bytes
    }

    #[test]
    fn counts_whole_batches_and_not_the_allocated_tail() {
        let dir = tempfile::tempdir().unwrap();
        let partition = topic_dir(dir.path(), "t").join("0");
        std::fs::create_dir_all(&partition).unwrap();
        let mut sealed = batch(100);
        sealed.extend(batch(250));
        std::fs::write(partition.join("00000000000000000000.log"), &sealed).unwrap();
        let mut active = batch(300);
        active.resize(300 + 65_536, 0); // preallocated zeroes
        std::fs::write(partition.join("00000000000000000002.log"), &active).unwrap();
        std::fs::write(partition.join("00000000000000000000.idx"), [1u8; 32]).unwrap();
        let other = topic_dir(dir.path(), "t").join("1");
        std::fs::create_dir_all(&other).unwrap();
        // A torn batch at the end: its length runs past the file.
        let mut torn = batch(200);
        torn.extend_from_slice(&batch(500)[..120]);
        std::fs::write(other.join("00000000000000000000.log"), &torn).unwrap();
        let usage = topic_usage(dir.path(), "t").unwrap();
        assert_eq!(
            usage,
            TopicUsage {
                batch_bytes: 100 + 250 + 300 + 200,
                file_bytes: 350 + 300 + 65_536 + 320,
                segments: 3,
            }
        );
        assert!(matches!(
            topic_usage(dir.path(), "missing"),
            Err(DiskError::NoTopic(_))
        ));
    }

    #[test]
    fn stops_at_anything_that_is_not_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut bytes = batch(64);
        bytes.extend_from_slice(b"SLB0\x40\0\0\0");
        bytes.extend(batch(64));
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(segment_batch_bytes(&path).unwrap(), (64, 136));
        // A length shorter than a header is not a batch either.
        let mut short = MAGIC.to_le_bytes().to_vec();
        short.extend_from_slice(&4u32.to_le_bytes());
        short.resize(64, 0);
        std::fs::write(&path, &short).unwrap();
        assert_eq!(segment_batch_bytes(&path).unwrap(), (0, 64));
        std::fs::write(&path, []).unwrap();
        assert_eq!(segment_batch_bytes(&path).unwrap(), (0, 0));
    }
}
