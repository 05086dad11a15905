//! Property: damage random bytes of random files of a data directory, then
//! open it. Opening never panics, and no read ever returns a batch that
//! fails its checksum: damage shows only as lost ranges (DATA_LOSS) or as
//! an error naming a file.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::batch_for;
use proptest::prelude::*;
use sluice_broker::storage::{BatchIter, StorageError};
use sluice_broker::topics::{TopicConfigPatch, TopicDefaults, TopicRegistry};

fn defaults() -> TopicDefaults {
    TopicDefaults {
        segment_bytes: 8192,
        max_record_bytes: 1024,
        ..TopicDefaults::default()
    }
}

/// A data directory with two topics over several small segments, built
/// once; each case damages a copy.
fn template() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
        for (name, partitions) in [("a", 1), ("b", 2)] {
            let patch = TopicConfigPatch {
                partitions: Some(partitions),
                flush: Some("os".into()),
                ..Default::default()
            };
            registry.create(name, &patch).unwrap();
            let topic = registry.get(name).unwrap();
            for partition in topic.partitions() {
                for offset in (0..60).step_by(3) {
                    partition.log().append(&batch_for(offset, 3, 150)).unwrap();
                }
            }
        }
        registry.close().unwrap();
        dir
    })
    .path()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_under(&path, out);
        } else if !path.ends_with("LOCK") {
            out.push(path);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// One change to one file: overwrite bytes, or cut the file short.
#[derive(Debug, Clone)]
enum Damage {
    Overwrite {
        file: usize,
        at: usize,
        bytes: Vec<u8>,
    },
    Truncate {
        file: usize,
        at: usize,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => (any::<usize>(), any::<usize>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(file, at, bytes)| Damage::Overwrite { file, at, bytes }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(file, at)| Damage::Truncate { file, at }),
    ]
}

fn apply(files: &[PathBuf], damage: &Damage) {
    let (file, at) = match damage {
        Damage::Overwrite { file, at, .. } | Damage::Truncate { file, at } => (*file, *at),
    };
    let path = &files[file % files.len()];
    let mut data = std::fs::read(path).unwrap();
    if data.is_empty() {
        return;
    }
    let at = at % data.len();
    match damage {
        Damage::Overwrite { bytes, .. } => {
            let end = (at + bytes.len()).min(data.len());
            data[at..end].copy_from_slice(&bytes[..end - at]);
        }
        Damage::Truncate { .. } => data.truncate(at),
    }
    std::fs::write(path, &data).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn damaged_files_never_panic_or_serve_a_bad_batch(damages in prop::collection::vec(damage(), 1..4)) {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template(), dir.path());
        let mut files = Vec::new();
        files_under(dir.path(), &mut files);
        for d in &damages {
            apply(&files, d);
        }
        let registry = match TopicRegistry::open(dir.path(), defaults()) {
            Ok(registry) => registry,
            Err(error) => {
                // Refusing is allowed only with a message naming a file.
                prop_assert!(error.to_string().contains(dir.path().to_str().unwrap()), "{error}");
                return Ok(());
            }
        };
        for topic in registry.list() {
            for partition in topic.partitions() {
                let log = partition.log();
                let mut next = log.log_start_offset();
                while next < log.high_watermark() {
                    match log.read(next, 4096) {
                        Ok(chunk) => {
                            let mut after = next;
                            for batch in BatchIter::new(chunk.data) {
                                let batch = batch.map_err(|e| TestCaseError::fail(format!(
                                    "{}/{}: a read at {next} returned a bad batch: {e}",
                                    topic.name(), partition.index)))?;
                                prop_assert!(batch.to_records().is_ok());
                                after = batch.header().next_offset();
                            }
                            prop_assert!(after > next, "no progress at {next}");
                            next = after;
                        }
                        Err(StorageError::DataLoss { end, .. }) => {
                            prop_assert!(end > next);
                            next = end;
                        }
                        Err(e) => prop_assert!(false, "read at {next}: {e}"),
                    }
                }
            }
        }
        registry.close().unwrap();
    }
}
