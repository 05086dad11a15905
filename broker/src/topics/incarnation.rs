//! Topic incarnations, and binding state kept by topic name to one of them.
//!
//! Group offsets and retry sets are kept by topic name, in their own state
//! logs, and deleting a topic cannot delete them in the same atomic step.
//! So each store records which incarnation ([`TopicId`]) of a topic its
//! state belongs to ([`TopicBindings`]), never answers state of an
//! incarnation other than the live one, and drops it when it binds the
//! topic to the live incarnation ([`TopicBindings::bind`], or at startup
//! through [`reconcile`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::storage::ByteReader;

/// A topic's incarnation: random 128 bits, given when the topic is created.
/// Written as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicId(pub u128);

impl TopicId {
    /// A new id. 128 bits from two hashers seeded by the OS's randomness
    /// (std's `RandomState`), over the clock and the process id: unique for
    /// any practical number of topics without a random-number dependency.
    pub fn random() -> TopicId {
        use std::hash::{BuildHasher, Hasher};
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let half = || {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(nanos);
            hasher.write_u32(std::process::id());
            hasher.finish()
        };
        TopicId((u128::from(half()) << 64) | u128::from(half()))
    }

    /// The id of a topic created before ids existed: derived from its name
    /// (FNV-1a, 128 bits), so it is the same at every start without
    /// writing anything (a full disk must not keep the broker from opening).
    /// A topic created later gets a random id, never this one.
    pub fn from_before_ids(name: &str) -> TopicId {
        const OFFSET_BASIS: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
        const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
        let hash = b"sluice-topic-before-ids:"
            .iter()
            .chain(name.as_bytes())
            .fold(OFFSET_BASIS, |hash, byte| {
                (hash ^ u128::from(*byte)).wrapping_mul(PRIME)
            });
        TopicId(hash)
    }

    pub fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    pub fn read(r: &mut ByteReader<'_>) -> Option<TopicId> {
        Some(TopicId(u128::from_le_bytes(r.take(16)?.try_into().ok()?)))
    }
}

impl std::fmt::Display for TopicId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Serialize for TopicId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for TopicId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match u128::from_str_radix(&text, 16) {
            Ok(id) if text.len() == 32 => Ok(TopicId(id)),
            _ => Err(serde::de::Error::custom(format!(
                "topic id {text:?} is not 32 hex digits"
            ))),
        }
    }
}

/// The live incarnation of each topic, as the caller knows it: `None` for
/// a topic that does not exist.
pub type LiveTopics<'a> = &'a dyn Fn(&str) -> Option<TopicId>;

/// Which incarnation of each topic a store's state belongs to. A topic with
/// state and no binding has state from before incarnations existed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicBindings(BTreeMap<String, TopicId>);

impl TopicBindings {
    pub fn is_bound(&self, topic: &str, id: TopicId) -> bool {
        self.0.get(topic) == Some(&id)
    }

    /// Binds `topic` to `id`. True when the store must drop its state of
    /// the topic first: it belonged to another incarnation. State from
    /// before incarnations (no binding) is adopted.
    #[must_use]
    pub fn bind(&mut self, topic: &str, id: TopicId) -> bool {
        match self.0.insert(topic.to_owned(), id) {
            Some(previous) => previous != id,
            None => false,
        }
    }

    pub fn remove(&mut self, topic: &str) {
        self.0.remove(topic);
    }

    /// Whether deleting the state of `topic` that was bound to `deleted`
    /// (`None`: unbound) still applies: not once the topic has been bound to
    /// another incarnation (a topic of that name created, and its state
    /// written, between the decision to delete and the delete record).
    pub fn delete_applies(&self, topic: &str, deleted: Option<TopicId>) -> bool {
        match self.0.get(topic) {
            None => true,
            Some(bound) => Some(*bound) == deleted,
        }
    }

    pub fn topics(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// Appends the bindings to a snapshot: a count, then per topic its
    /// name (u16 length) and id.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        for (topic, id) in &self.0 {
            out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
            out.extend_from_slice(topic.as_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
    }

    /// Reads what [`TopicBindings::encode`] wrote; none when `r` is already
    /// empty (a snapshot from before incarnations ends there).
    pub fn decode(r: &mut ByteReader<'_>) -> Result<TopicBindings, &'static str> {
        let mut bindings = TopicBindings::default();
        if r.is_empty() {
            return Ok(bindings);
        }
        let truncated = "truncated topic bindings";
        for _ in 0..r.u32().ok_or(truncated)? {
            let len = r.u16().ok_or(truncated)?;
            let topic = String::from_utf8(r.take(usize::from(len)).ok_or(truncated)?.to_vec())
                .map_err(|_| "topic name is not UTF-8")?;
            let id = TopicId::read(r).ok_or(truncated)?;
            bindings.0.insert(topic, id);
        }
        Ok(bindings)
    }
}

/// Writes which incarnation a delete record deletes the state of (see
/// [`TopicBindings::delete_applies`]).
pub fn put_deleted_incarnation(out: &mut Vec<u8>, deleted: Option<TopicId>) {
    match deleted {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
}

/// Reads what [`put_deleted_incarnation`] wrote: `Ok(None)` for a delete
/// record without it (written before incarnations: it deletes whatever
/// state there is).
pub fn read_deleted_incarnation(
    r: &mut ByteReader<'_>,
) -> Result<Option<Option<TopicId>>, &'static str> {
    if r.is_empty() {
        return Ok(None);
    }
    match r.take(1) {
        Some([0]) => Ok(Some(None)),
        Some([1]) => TopicId::read(r)
            .map(|id| Some(Some(id)))
            .ok_or("truncated topic id"),
        _ => Err("unknown delete condition"),
    }
}

/// What a store must do about one topic to match the live topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconcile {
    /// Bind it to the live incarnation; `drops` when that drops state of
    /// another incarnation.
    Bind {
        topic: String,
        id: TopicId,
        drops: bool,
    },
    /// The topic does not exist: drop its state (bound to `bound`) and
    /// binding.
    Delete {
        topic: String,
        bound: Option<TopicId>,
    },
}

/// The changes that make state kept for `topics` (with `bindings`) match
/// the live topics: state of deleted topics and of other incarnations goes,
/// state from before incarnations is bound to the live topic.
pub fn reconcile(
    topics: &BTreeSet<String>,
    bindings: &TopicBindings,
    live: LiveTopics<'_>,
) -> Vec<Reconcile> {
    topics
        .iter()
        .chain(bindings.topics())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter_map(|topic| match (live(topic), bindings.0.get(topic)) {
            (Some(id), Some(bound)) if id == *bound => None,
            (Some(id), bound) => Some(Reconcile::Bind {
                topic: topic.clone(),
                id,
                drops: bound.is_some(),
            }),
            (None, bound) => Some(Reconcile::Delete {
                topic: topic.clone(),
                bound: bound.copied(),
            }),
        })
        .collect()
}

/// The state-log records that carry out a [`reconcile`] plan, built by
/// `bind` and `delete` (each store has its own record layout), and the
/// topics whose state they drop.
pub fn reconcile_records<R>(
    plan: Vec<Reconcile>,
    bind: impl Fn(&str, TopicId) -> R,
    delete: impl Fn(&str, Option<TopicId>) -> R,
) -> (Vec<R>, Vec<String>) {
    let mut records = Vec::with_capacity(plan.len());
    let mut dropped = Vec::new();
    for change in plan {
        match change {
            Reconcile::Bind { topic, id, drops } => {
                records.push(bind(&topic, id));
                if drops {
                    dropped.push(topic);
                }
            }
            Reconcile::Delete { topic, bound } => {
                records.push(delete(&topic, bound));
                dropped.push(topic);
            }
        }
    }
    (records, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_adopts_old_state_and_drops_another_incarnations() {
        let mut b = TopicBindings::default();
        assert!(!b.bind("t", TopicId(1)), "no binding yet: adopted");
        assert!(!b.bind("t", TopicId(1)));
        assert!(b.bind("t", TopicId(2)), "another incarnation: dropped");
        assert!(b.is_bound("t", TopicId(2)));
        let mut bytes = Vec::new();
        b.encode(&mut bytes);
        let back = TopicBindings::decode(&mut ByteReader::new(&bytes)).unwrap();
        assert_eq!(back, b);
        assert_eq!(
            TopicBindings::decode(&mut ByteReader::new(&[])).unwrap(),
            TopicBindings::default()
        );
        let topics: BTreeSet<String> = ["t", "legacy", "gone"].map(String::from).into();
        let plan = reconcile(&topics, &b, &|topic| match topic {
            "gone" => None,
            _ => Some(TopicId(3)),
        });
        assert_eq!(
            plan,
            [
                Reconcile::Delete {
                    topic: "gone".into(),
                    bound: None
                },
                Reconcile::Bind {
                    topic: "legacy".into(),
                    id: TopicId(3),
                    drops: false
                },
                Reconcile::Bind {
                    topic: "t".into(),
                    id: TopicId(3),
                    drops: true
                },
            ]
        );
    }

    #[test]
    fn a_delete_does_not_apply_to_a_newer_incarnation() {
        let mut b = TopicBindings::default();
        assert!(b.delete_applies("t", Some(TopicId(1))), "nothing bound");
        let _ = b.bind("t", TopicId(1));
        assert!(b.delete_applies("t", Some(TopicId(1))));
        assert!(!b.delete_applies("t", None));
        let _ = b.bind("t", TopicId(2));
        assert!(!b.delete_applies("t", Some(TopicId(1))));
        for deleted in [None, Some(TopicId(5))] {
            let mut bytes = Vec::new();
            put_deleted_incarnation(&mut bytes, deleted);
            let read = read_deleted_incarnation(&mut ByteReader::new(&bytes));
            assert_eq!(read, Ok(Some(deleted)));
        }
        assert_eq!(
            read_deleted_incarnation(&mut ByteReader::new(&[])),
            Ok(None)
        );
    }

    #[test]
    fn ids_are_new_each_time_and_round_trip_as_hex() {
        let (a, b) = (TopicId::random(), TopicId::random());
        assert_ne!(a, b);
        // Stable across builds: the value is part of the data format.
        assert_eq!(
            TopicId::from_before_ids("orders").to_string(),
            "9b6d78ead6460c6cb0c4c3e4065a545c"
        );
        assert_ne!(
            TopicId::from_before_ids("orders"),
            TopicId::from_before_ids("order")
        );
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json.len(), 34, "{json}");
        assert_eq!(serde_json::from_str::<TopicId>(&json).unwrap(), a);
        assert!(serde_json::from_str::<TopicId>("\"xyz\"").is_err());
    }
}
