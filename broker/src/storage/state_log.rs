//! A durable state machine: an internal log of change records, replayed
//! over the newest snapshot.
//!
//! For broker state that changes record by record and must survive a crash
//! exactly (committed offsets, retry sets): every change is a batch appended
//! with `every-batch` flush, so it is on disk when [`StateLog::append`]
//! returns, and applied to the in-memory state in log order. Once the log
//! has a few segments the state is snapshotted (atomically) and the segments
//! the snapshot covers are deleted, so the log stays small and opening stays
//! fast.

use std::fs;
use std::path::PathBuf;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use super::batch::{BatchBuilder, ProducerInfo, Record};
use super::config::{FlushPolicy, LogConfig};
use super::error::{Result, StorageError};
use super::files::{ByteReader, write_atomically};
use super::log::PartitionLog;

const SNAPSHOT_FILE: &str = "state.snapshot";
const SNAPSHOT_MAGIC: &[u8; 4] = b"SLSS";
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Snapshot and compact once the log has this many segments.
const COMPACT_AT_SEGMENTS: usize = 4;

/// State rebuilt from change records.
pub trait StateMachine: Default + Send + Sync {
    /// Applies one change record. Records it does not understand are
    /// skipped (with a warning), never a panic.
    fn apply(&mut self, record: &Record);
    fn encode_snapshot(&self) -> Vec<u8>;
    fn decode_snapshot(bytes: &[u8]) -> std::result::Result<Self, &'static str>;
}

/// A [`StateMachine`] kept durable in its own directory.
pub struct StateLog<S: StateMachine> {
    log: PartitionLog,
    dir: PathBuf,
    state: RwLock<S>,
    /// Serialises writers so the state applies changes in log order.
    writer: Mutex<()>,
}

impl<S: StateMachine> StateLog<S> {
    /// Opens (or creates) the state in `dir`: the snapshot, then every
    /// change after it.
    pub fn open(dir: impl Into<PathBuf>) -> Result<StateLog<S>> {
        let dir = dir.into();
        let log = PartitionLog::open(
            dir.join("log"),
            LogConfig {
                segment_bytes: SEGMENT_BYTES,
                segment_age: None,
                flush: FlushPolicy::EveryBatch,
                retention_age: None,
                retention_bytes: None,
                ..LogConfig::default()
            },
        )?;
        let mut state = S::default();
        let mut from = log.log_start_offset();
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        match fs::read(&snapshot_path) {
            Ok(bytes) => match decode_snapshot::<S>(&bytes) {
                Ok((at, snapshot)) => {
                    state = snapshot;
                    from = from.max(at);
                }
                Err(reason) => {
                    // The changes it covered are gone with the segments it
                    // replaced; what the log still holds is replayed. Kept
                    // aside for an operator rather than overwritten.
                    let aside = super::check::aside_path(&snapshot_path);
                    tracing::error!(snapshot = %snapshot_path.display(), reason, moved_to = %aside.display(),
                        "damaged state snapshot: starting from the change log alone");
                    fs::rename(&snapshot_path, &aside).map_err(|e| {
                        StorageError::io("move damaged snapshot aside", &snapshot_path, e)
                    })?;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("read state snapshot", &snapshot_path, e)),
        }
        while from < log.high_watermark() {
            let records = match log.read_records(from, 4 * 1024 * 1024) {
                Ok(records) => records,
                Err(StorageError::DataLoss { end, .. }) => {
                    // Named when the log opened; the changes after it apply.
                    tracing::error!(dir = %dir.display(), from, next = end,
                        "state changes lost to damage are skipped");
                    from = end;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some(last) = records.last() else { break };
            from = last.offset + 1;
            for stored in &records {
                state.apply(&stored.record);
            }
        }
        Ok(StateLog {
            log,
            dir,
            state: RwLock::new(state),
            writer: Mutex::new(()),
        })
    }

    /// Reads the current state.
    pub fn state(&self) -> RwLockReadGuard<'_, S> {
        self.state.read()
    }

    /// Appends `records` as one batch, durable when this returns, then
    /// applies them.
    pub fn append(&self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let _order = self.writer.lock();
        self.log
            .append(&BatchBuilder::encode(records, ProducerInfo::NONE))?;
        {
            let mut state = self.state.write();
            for record in records {
                state.apply(record);
            }
        }
        if self.log.segment_count() >= COMPACT_AT_SEGMENTS
            && let Err(e) = self.compact_locked()
        {
            // The change itself is durable; compaction retries next time.
            tracing::warn!(dir = %self.dir.display(), error = %e, "state log compaction failed");
        }
        Ok(())
    }

    /// Writes a snapshot and deletes the log segments it covers.
    pub fn compact(&self) -> Result<()> {
        let _order = self.writer.lock();
        self.compact_locked()
    }

    fn compact_locked(&self) -> Result<()> {
        let at = self.log.end_offset();
        let payload = self.state.read().encode_snapshot();
        write_atomically(
            &self.dir.join(SNAPSHOT_FILE),
            &encode_snapshot(at, &payload),
        )?;
        self.log.roll()?;
        self.log.delete_segments_before(at)?;
        Ok(())
    }

    /// Files of the change log, for tests and operators.
    pub fn log_segment_count(&self) -> usize {
        self.log.segment_count()
    }

    pub fn close(&self) -> Result<()> {
        self.log.close()
    }
}

fn encode_snapshot(at: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 24);
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&at.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode_snapshot<S: StateMachine>(bytes: &[u8]) -> std::result::Result<(u64, S), &'static str> {
    let (at, payload) = snapshot_frame(bytes)?;
    Ok((at, S::decode_snapshot(payload)?))
}

/// The offset a snapshot covers and its payload, once its framing and
/// checksum hold.
fn snapshot_frame(bytes: &[u8]) -> std::result::Result<(u64, &[u8]), &'static str> {
    if bytes.len() < 4 + 8 + 8 + 4 {
        return Err("too short");
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err("checksum mismatch");
    }
    let mut r = ByteReader::new(body);
    if r.take(4) != Some(SNAPSHOT_MAGIC.as_slice()) {
        return Err("bad magic");
    }
    let at = r.u64().ok_or("truncated")?;
    let len = r.u64().ok_or("truncated")?;
    let payload = r
        .take(usize::try_from(len).map_err(|_| "bad length")?)
        .ok_or("truncated")?;
    if !r.is_empty() {
        return Err("bytes after the payload");
    }
    Ok((at, payload))
}

/// For the offline check: what is wrong with the snapshot of the state log
/// in `dir`, if it has one and it is damaged (framing and checksum only).
pub fn check_state_snapshot(dir: &std::path::Path) -> Option<(PathBuf, &'static str)> {
    let path = dir.join(SNAPSHOT_FILE);
    let bytes = fs::read(&path).ok()?;
    snapshot_frame(&bytes).err().map(|reason| (path, reason))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// Every value appended, in order.
    #[derive(Default)]
    struct Values(Vec<Bytes>);

    impl StateMachine for Values {
        fn apply(&mut self, record: &Record) {
            self.0.push(record.value.clone());
        }
        fn encode_snapshot(&self) -> Vec<u8> {
            let mut out = Vec::new();
            for value in &self.0 {
                out.push(value.len() as u8);
                out.extend_from_slice(value);
            }
            out
        }
        fn decode_snapshot(mut bytes: &[u8]) -> std::result::Result<Self, &'static str> {
            let mut values = Vec::new();
            while let Some((&len, rest)) = bytes.split_first() {
                let (value, rest) = rest.split_at_checked(len as usize).ok_or("truncated")?;
                values.push(Bytes::copy_from_slice(value));
                bytes = rest;
            }
            Ok(Values(values))
        }
    }

    fn value(i: u32) -> Record {
        Record {
            value: Bytes::from(format!("v{i}")),
            ..Record::default()
        }
    }

    fn values(state: &StateLog<Values>) -> Vec<String> {
        state
            .state()
            .0
            .iter()
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn a_damaged_snapshot_is_moved_aside_and_the_log_replayed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let state = StateLog::<Values>::open(dir.path()).unwrap();
            state.append(&[value(0), value(1)]).unwrap();
            state.compact().unwrap();
            state.append(&[value(2)]).unwrap();
            state.close().unwrap();
        }
        let snapshot = dir.path().join(SNAPSHOT_FILE);
        let mut bytes = fs::read(&snapshot).unwrap();
        bytes[6] ^= 0xff;
        fs::write(&snapshot, &bytes).unwrap();
        assert!(check_state_snapshot(dir.path()).is_some());
        let state = StateLog::<Values>::open(dir.path()).unwrap();
        // What only the snapshot held is gone; what the log holds is back.
        assert_eq!(values(&state), ["v2"]);
        assert!(!snapshot.exists());
        assert!(dir.path().join("state.snapshot.damaged").exists());
        state.append(&[value(3)]).unwrap();
        assert_eq!(values(&state), ["v2", "v3"]);
    }

    #[test]
    fn a_torn_tail_of_the_change_log_is_cut_and_the_rest_applies() {
        let dir = tempfile::tempdir().unwrap();
        {
            let state = StateLog::<Values>::open(dir.path()).unwrap();
            for i in 0..5 {
                state.append(&[value(i)]).unwrap();
            }
            state.close().unwrap();
        }
        let segment = dir.path().join("log/00000000000000000000.log");
        let data = fs::read(&segment).unwrap();
        let mut end = 0;
        while let Ok(h) = super::super::BatchHeader::parse(&data[end..]) {
            end += h.total_len();
        }
        // Damage the last change record.
        let mut file = fs::OpenOptions::new().write(true).open(&segment).unwrap();
        std::io::Write::write_all(
            &mut std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(end as u64 - 3))
                .map(|_| &mut file)
                .unwrap(),
            b"XYZ",
        )
        .unwrap();
        drop(file);
        let state = StateLog::<Values>::open(dir.path()).unwrap();
        assert_eq!(values(&state), ["v0", "v1", "v2", "v3"]);
        state.append(&[value(9)]).unwrap();
        assert_eq!(values(&state), ["v0", "v1", "v2", "v3", "v9"]);
    }
}
