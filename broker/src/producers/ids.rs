//! Producer ids and epochs, broker-wide.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use super::{ProducerStateError, SequenceError};
use crate::storage::{batch::NO_PRODUCER_EPOCH, write_atomically};

const MAGIC: &[u8; 4] = b"SLPI";
/// Version 2 adds the retired ids; version 1 files (without them) still
/// read.
const VERSION: u16 = 2;
const MAX_NAME_LEN: usize = 1024;

/// What `InitProducer` returns: the id to put in every batch, and the epoch
/// that fences older instances of the same named producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerIdentity {
    pub producer_id: u64,
    pub epoch: u16,
}

#[derive(Clone)]
struct IdState {
    next_id: u64,
    named: BTreeMap<String, ProducerIdentity>,
    /// Ids a name left behind when its epochs ran out: every epoch of them
    /// is fenced.
    retired: BTreeSet<u64>,
}

impl IdState {
    /// The newest epoch of every named producer id; a retired id maps to
    /// [`NO_PRODUCER_EPOCH`], above every epoch a batch can carry.
    fn fences(&self) -> HashMap<u64, u16> {
        self.named
            .values()
            .map(|identity| (identity.producer_id, identity.epoch))
            .chain(self.retired.iter().map(|&id| (id, NO_PRODUCER_EPOCH)))
            .collect()
    }
}

/// Allocates producer ids and epochs and remembers named producers across
/// restarts. Every allocation is written (atomically) before it is returned,
/// so an id is never handed out twice.
///
/// It also fences: once `init` has returned a new epoch for a name, every
/// batch carrying an older epoch of that producer id is refused, on every
/// partition (see [`ProducerIds::fence`]), and after a restart too (the
/// epoch is in the file before `init` returns).
pub struct ProducerIds {
    path: PathBuf,
    state: Mutex<IdState>,
    /// Producer id -> newest epoch, of named producers (and retired ids).
    /// Appends hold a read guard from the check until their batch is
    /// written; `init` takes the write lock to publish a new epoch, so no
    /// batch of an older epoch is written once `init` has returned.
    fences: RwLock<HashMap<u64, u16>>,
}

/// Held while a batch that passed [`ProducerIds::fence`] is written: no new
/// epoch of any producer is published until it is dropped.
pub struct FenceGuard<'a> {
    _fences: RwLockReadGuard<'a, HashMap<u64, u16>>,
}

impl ProducerIds {
    /// Opens the registry file at `path`, or starts an empty one.
    pub fn open(path: impl Into<PathBuf>) -> Result<ProducerIds, ProducerStateError> {
        let path = path.into();
        let state = match std::fs::read(&path) {
            Ok(bytes) => decode(&path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => IdState {
                next_id: 0,
                named: BTreeMap::new(),
                retired: BTreeSet::new(),
            },
            Err(e) => {
                return Err(crate::storage::StorageError::Io {
                    op: "read producer ids",
                    path,
                    source: e,
                }
                .into());
            }
        };
        Ok(ProducerIds {
            path,
            fences: RwLock::new(state.fences()),
            state: Mutex::new(state),
        })
    }

    /// Checks that `epoch` is not older than the newest epoch handed out for
    /// `producer_id`. Hold the guard until the batch is written: it keeps a
    /// concurrent `init` from publishing a newer epoch in between. Ids this
    /// registry never named (anonymous producers) pass.
    pub fn fence(&self, producer_id: u64, epoch: u16) -> Result<FenceGuard<'_>, SequenceError> {
        let fences = self.fences.read();
        match fences.get(&producer_id) {
            Some(&current) if epoch < current => Err(SequenceError::Fenced {
                producer_id,
                epoch,
                current,
            }),
            _ => Ok(FenceGuard { _fences: fences }),
        }
    }

    /// A fresh id for an anonymous producer; for a named one, its id with
    /// the next epoch (a new id once the epoch space is used up).
    pub fn init(&self, name: Option<&str>) -> Result<ProducerIdentity, ProducerStateError> {
        if let Some(name) = name
            && name.len() > MAX_NAME_LEN
        {
            return Err(ProducerStateError::NameTooLong(name.to_owned()));
        }
        let mut state = self.state.lock();
        let mut next = state.clone();
        let identity = match name.and_then(|n| next.named.get(n).copied()) {
            Some(current) if current.epoch + 1 < NO_PRODUCER_EPOCH => ProducerIdentity {
                producer_id: current.producer_id,
                epoch: current.epoch + 1,
            },
            previous => {
                if let Some(previous) = previous {
                    // Its epochs ran out: the old id is fenced for good.
                    next.retired.insert(previous.producer_id);
                }
                let id = next.next_id;
                next.next_id += 1;
                ProducerIdentity {
                    producer_id: id,
                    epoch: 0,
                }
            }
        };
        if let Some(name) = name {
            next.named.insert(name.to_owned(), identity);
        }
        write_atomically(&self.path, &encode(&next))?;
        // Durable first, then published: a restart fences at least as much
        // as this process did.
        *self.fences.write() = next.fences();
        *state = next;
        Ok(identity)
    }
}

fn encode(state: &IdState) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&state.next_id.to_le_bytes());
    out.extend_from_slice(&(state.named.len() as u32).to_le_bytes());
    for (name, identity) in &state.named {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&identity.producer_id.to_le_bytes());
        out.extend_from_slice(&identity.epoch.to_le_bytes());
    }
    out.extend_from_slice(&(state.retired.len() as u32).to_le_bytes());
    for id in &state.retired {
        out.extend_from_slice(&id.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode(path: &Path, bytes: &[u8]) -> Result<IdState, ProducerStateError> {
    let corrupt = |reason: &str| ProducerStateError::Corrupt {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if bytes.len() < 4 + 2 + 8 + 4 + 4 {
        return Err(corrupt("too short"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let mut r = crate::storage::ByteReader::new(body);
    if r.take(4).ok_or_else(|| corrupt("truncated"))? != MAGIC {
        return Err(corrupt("bad magic"));
    }
    let version = r.u16().ok_or_else(|| corrupt("truncated"))?;
    if !(1..=VERSION).contains(&version) {
        return Err(corrupt("unknown version"));
    }
    let next_id = r.u64().ok_or_else(|| corrupt("truncated"))?;
    let count = r.u32().ok_or_else(|| corrupt("truncated"))?;
    let mut named = BTreeMap::new();
    for _ in 0..count {
        let len = r.u16().ok_or_else(|| corrupt("truncated"))?;
        let name = r.take(len as usize).ok_or_else(|| corrupt("truncated"))?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| corrupt("name is not UTF-8"))?;
        let producer_id = r.u64().ok_or_else(|| corrupt("truncated"))?;
        let epoch = r.u16().ok_or_else(|| corrupt("truncated"))?;
        named.insert(name, ProducerIdentity { producer_id, epoch });
    }
    let mut retired = BTreeSet::new();
    if version >= 2 {
        for _ in 0..r.u32().ok_or_else(|| corrupt("truncated"))? {
            retired.insert(r.u64().ok_or_else(|| corrupt("truncated"))?);
        }
    }
    if !r.is_empty() {
        return Err(corrupt("bytes after the last entry"));
    }
    Ok(IdState {
        next_id,
        named,
        retired,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_producers_get_their_id_back_with_the_next_epoch_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("producer-ids");
        let ids = ProducerIds::open(&path).unwrap();
        let a0 = ids.init(Some("orders")).unwrap();
        let anon = ids.init(None).unwrap();
        let b0 = ids.init(Some("billing")).unwrap();
        let a1 = ids.init(Some("orders")).unwrap();
        assert_eq!(a0.epoch, 0);
        assert_eq!(
            a1,
            ProducerIdentity {
                producer_id: a0.producer_id,
                epoch: 1
            }
        );
        let all = [a0.producer_id, anon.producer_id, b0.producer_id];
        assert!(all.iter().collect::<std::collections::HashSet<_>>().len() == 3);
        drop(ids);
        let ids = ProducerIds::open(&path).unwrap();
        assert_eq!(ids.init(Some("orders")).unwrap().epoch, 2);
        let fresh = ids.init(None).unwrap();
        assert!(!all.contains(&fresh.producer_id), "ids are never reused");
    }

    #[test]
    fn an_exhausted_epoch_space_moves_to_a_new_id() {
        let dir = tempfile::tempdir().unwrap();
        let ids = ProducerIds::open(dir.path().join("ids")).unwrap();
        let first = ids.init(Some("p")).unwrap();
        ids.state.lock().named.insert(
            "p".into(),
            ProducerIdentity {
                producer_id: first.producer_id,
                epoch: NO_PRODUCER_EPOCH - 1,
            },
        );
        let next = ids.init(Some("p")).unwrap();
        assert_ne!(next.producer_id, first.producer_id);
        assert_eq!(next.epoch, 0);
        // The old id is fenced whatever its epoch, also after a reopen.
        assert!(ids.fence(first.producer_id, NO_PRODUCER_EPOCH - 1).is_err());
        drop(ids);
        let ids = ProducerIds::open(dir.path().join("ids")).unwrap();
        assert!(ids.fence(first.producer_id, NO_PRODUCER_EPOCH - 1).is_err());
        assert!(ids.fence(next.producer_id, 0).is_ok());
    }

    #[test]
    fn a_new_epoch_fences_the_older_ones_at_once_and_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids");
        let ids = ProducerIds::open(&path).unwrap();
        let old = ids.init(Some("p")).unwrap();
        let anonymous = ids.init(None).unwrap();
        assert!(ids.fence(old.producer_id, old.epoch).is_ok());
        let new = ids.init(Some("p")).unwrap();
        let Err(SequenceError::Fenced { current, .. }) = ids.fence(old.producer_id, old.epoch)
        else {
            panic!("the old epoch passed");
        };
        assert_eq!(current, new.epoch);
        assert!(ids.fence(new.producer_id, new.epoch).is_ok());
        assert!(ids.fence(anonymous.producer_id, 0).is_ok());
        assert!(ids.fence(1234, 0).is_ok(), "ids never named are not fenced");
        drop(ids);
        let ids = ProducerIds::open(&path).unwrap();
        assert!(ids.fence(old.producer_id, old.epoch).is_err());
        assert!(ids.fence(new.producer_id, new.epoch).is_ok());
    }

    #[test]
    fn a_version_1_file_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids");
        let mut body = Vec::new();
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&5u64.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(b"p");
        body.extend_from_slice(&3u64.to_le_bytes());
        body.extend_from_slice(&2u16.to_le_bytes());
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, body).unwrap();
        let ids = ProducerIds::open(&path).unwrap();
        assert!(ids.fence(3, 1).is_err());
        assert_eq!(
            ids.init(Some("p")).unwrap(),
            ProducerIdentity {
                producer_id: 3,
                epoch: 3
            }
        );
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids");
        ProducerIds::open(&path).unwrap().init(Some("x")).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = ProducerIds::open(&path).err().expect("refused");
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
