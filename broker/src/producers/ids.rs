//! Producer ids and epochs, broker-wide.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::ProducerStateError;
use crate::storage::{batch::NO_PRODUCER_EPOCH, write_atomically};

const MAGIC: &[u8; 4] = b"SLPI";
const VERSION: u16 = 1;
const MAX_NAME_LEN: usize = 1024;

/// What `InitProducer` returns: the id to put in every batch, and the epoch
/// that fences older instances of the same named producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerIdentity {
    pub producer_id: u64,
    pub epoch: u16,
}

struct IdState {
    next_id: u64,
    named: BTreeMap<String, ProducerIdentity>,
}

/// Allocates producer ids and epochs and remembers named producers across
/// restarts. Every allocation is written (atomically) before it is returned,
/// so an id is never handed out twice.
pub struct ProducerIds {
    path: PathBuf,
    state: Mutex<IdState>,
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
            state: Mutex::new(state),
        })
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
        let mut next = IdState {
            next_id: state.next_id,
            named: state.named.clone(),
        };
        let identity = match name.and_then(|n| next.named.get(n).copied()) {
            Some(current) if current.epoch + 1 < NO_PRODUCER_EPOCH => ProducerIdentity {
                producer_id: current.producer_id,
                epoch: current.epoch + 1,
            },
            _ => {
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
    if r.u16().ok_or_else(|| corrupt("truncated"))? != VERSION {
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
    Ok(IdState { next_id, named })
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
