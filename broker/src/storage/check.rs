//! The offline check of a partition log directory: what the broker would
//! make of each file, without opening the log (nothing is created,
//! preallocated, zeroed or rewritten unless repair is asked for).
//!
//! It judges files with the same functions as the open path
//! ([`super::segment::scan_sealed`], the walk of the active segment,
//! [`super::log::classify_entry`]), so a check and an open never disagree
//! about what is damaged. Repair only ever moves damaged bytes aside into
//! `*.damaged` files and removes indexes (which the broker rebuilds); it
//! never changes a byte of a valid batch.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{Result, StorageError};
use super::files::sync_dir;
use super::log::{DAMAGED_SUFFIX, DirEntryKind, classify_entry};
use super::segment::{self, scan_sealed};

/// One thing the check found in a partition directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: PathBuf,
    /// What is wrong and what the broker does about it.
    pub problem: String,
    /// Whether it loses data or needs an operator (a stray file does not).
    pub is_damage: bool,
    /// What `--repair` did, if anything.
    pub repaired: Option<String>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.problem)?;
        if let Some(repaired) = &self.repaired {
            write!(f, " [repaired: {repaired}]")?;
        }
        Ok(())
    }
}

/// Checks the partition log in `dir`: every segment verified batch by
/// batch, its index against the batches, the chain of offsets, and files
/// that do not belong. With `repair`, damaged bytes of sealed segments and
/// the unreadable tail of the last one are moved to `<segment>.damaged`,
/// the sealed segment is cut to its valid batches, and damaged indexes are
/// removed.
pub fn check_log_dir(dir: &Path, repair: bool) -> Result<Vec<Finding>> {
    let mut findings = Vec::new();
    let mut logs = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| StorageError::io("list log directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list log directory", dir, e))?;
        let path = entry.path();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        match classify_entry(&entry.file_name().to_string_lossy(), is_file) {
            DirEntryKind::Log(base) => logs.push(base),
            DirEntryKind::Index(_) | DirEntryKind::Temporary | DirEntryKind::MovedAside => {}
            DirEntryKind::Stray => findings.push(Finding {
                path,
                problem: "stray file: not a segment or an index; the broker ignores it".into(),
                is_damage: false,
                repaired: None,
            }),
        }
    }
    logs.sort_unstable();
    let mut expected: Option<u64> = None;
    for (i, &base) in logs.iter().enumerate() {
        let path = segment::log_path(dir, base);
        let last = i + 1 == logs.len();
        if let Some(expected) = expected {
            if expected < base {
                findings.push(Finding {
                    path: path.clone(),
                    problem: format!(
                        "offsets {expected}..{base} before this segment are in no file \
                         (a damaged or missing segment): reads there get DATA_LOSS"
                    ),
                    is_damage: true,
                    repaired: None,
                });
            } else if expected > base {
                findings.push(Finding {
                    path: path.clone(),
                    problem: format!(
                        "starts at offset {base}, inside the segment before it (which ends \
                         at {expected}): the broker refuses to open this partition"
                    ),
                    is_damage: true,
                    repaired: None,
                });
            }
        }
        let data = fs::read(&path).map_err(|e| StorageError::io("read segment", &path, e))?;
        // An interval of 0 indexes every batch: the full list of batch starts.
        let scan = scan_sealed(&data, base, 0);
        expected = Some(scan.walk.next_offset);
        check_index(dir, base, &scan.index, repair, &mut findings)?;
        let Some(damage) = scan.damage else { continue };
        if last && let Some(resume) = segment::offsets_past_damage(dir, base)? {
            // Valid batches follow the damage: the broker keeps the file
            // as it is and appends past them. Cutting it would hand their
            // offsets out again, so repair only copies the damage aside.
            let mut finding = Finding {
                path: path.clone(),
                problem: format!(
                    "damaged at byte {} of the last segment ({}), with valid batches after \
                     it: offsets {}..{resume} are lost; the broker serves the batches before \
                     it and appends from offset {resume} on",
                    damage.position, damage.reason, scan.walk.next_offset
                ),
                is_damage: true,
                repaired: None,
            };
            if repair {
                let aside = aside_path(&path);
                write_aside(&aside, &data[damage.position as usize..])?;
                finding.repaired = Some(format!(
                    "copied bytes {}.. to {} (the segment is left whole)",
                    damage.position,
                    aside.display()
                ));
            }
            findings.push(finding);
            continue;
        }
        if last {
            // The active segment: a torn tail is cut off on open. Only
            // non-zero bytes after the last batch are worth reporting.
            let Some(last_nonzero) = data[damage.position as usize..]
                .iter()
                .rposition(|&b| b != 0)
            else {
                continue;
            };
            let tail_end = damage.position + last_nonzero as u64 + 1;
            let mut finding = Finding {
                path: path.clone(),
                problem: format!(
                    "unreadable bytes {}..{tail_end} after the last whole batch ({}): the \
                     broker zeroes them on open as a torn write; offsets from {} on were \
                     never readable",
                    damage.position, damage.reason, scan.walk.next_offset
                ),
                is_damage: true,
                repaired: None,
            };
            if repair {
                let aside = aside_path(&path);
                write_aside(&aside, &data[damage.position as usize..tail_end as usize])?;
                finding.repaired = Some(format!("copied them to {}", aside.display()));
            }
            findings.push(finding);
            continue;
        }
        let next_base = logs.get(i + 1).copied().unwrap_or(scan.walk.next_offset);
        let mut finding = Finding {
            path: path.clone(),
            problem: format!(
                "damaged at byte {} of {} ({}): offsets {}..{next_base} are lost; the \
                 broker serves the batches before it and answers DATA_LOSS inside",
                damage.position,
                data.len(),
                damage.reason,
                scan.walk.next_offset
            ),
            is_damage: true,
            repaired: None,
        };
        if repair {
            finding.repaired = Some(repair_sealed(dir, base, &path, &data, damage.position)?);
        }
        findings.push(finding);
    }
    Ok(findings)
}

/// Flags an index that does not match the batches (every stored entry must
/// name a batch start with its offset); with `repair`, removes it.
fn check_index(
    dir: &Path,
    base: u64,
    batches: &[segment::IndexEntry],
    repair: bool,
    findings: &mut Vec<Finding>,
) -> Result<()> {
    let path = segment::index_path(dir, base);
    if !path.exists() {
        return Ok(());
    }
    let len = fs::metadata(&path)
        .map_err(|e| StorageError::io("stat index", &path, e))?
        .len();
    let stored = segment::read_index_file(&path)?;
    let matches = |e: &segment::IndexEntry| {
        batches
            .binary_search_by_key(&e.position, |b| b.position)
            .is_ok_and(|i| batches[i].relative_offset == e.relative_offset)
    };
    let whole = len % segment::INDEX_ENTRY_LEN as u64 == 0;
    if whole && stored.iter().all(matches) {
        return Ok(());
    }
    let mut finding = Finding {
        path: path.clone(),
        problem: "the index does not match the segment's batches: the broker rebuilds it \
                  on open and never trusts it"
            .into(),
        is_damage: false,
        repaired: None,
    };
    if repair {
        fs::remove_file(&path).map_err(|e| StorageError::io("remove damaged index", &path, e))?;
        finding.repaired = Some("removed it (rebuilt on the next open)".into());
    }
    findings.push(finding);
    Ok(())
}

/// Moves the bytes of a sealed segment from `position` on to
/// `<segment>.damaged`, then cuts the segment to its valid batches (or
/// moves it aside whole when none is valid) and removes its index.
fn repair_sealed(dir: &Path, base: u64, path: &Path, data: &[u8], position: u64) -> Result<String> {
    let aside = aside_path(path);
    let index = segment::index_path(dir, base);
    let done = if position == 0 {
        fs::rename(path, &aside).map_err(|e| StorageError::io("move segment aside", path, e))?;
        format!("moved the whole file to {}", aside.display())
    } else {
        // The copy is durable before the segment loses the bytes.
        write_aside(&aside, &data[position as usize..])?;
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| StorageError::io("open segment", path, e))?;
        file.set_len(position)
            .and_then(|()| file.sync_all())
            .map_err(|e| StorageError::io("cut damaged segment", path, e))?;
        format!(
            "moved bytes {position}..{} to {} and cut the segment to its valid batches",
            data.len(),
            aside.display()
        )
    };
    match fs::remove_file(&index) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StorageError::io("remove index", &index, e)),
    }
    sync_dir(dir)?;
    Ok(done)
}

/// `<path>.damaged`.
pub fn aside_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(DAMAGED_SUFFIX);
    PathBuf::from(name)
}

/// Writes `bytes` to a new `*.damaged` file, synced; never overwrites one.
fn write_aside(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| StorageError::io("create damaged-range file", path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| StorageError::io("write damaged-range file", path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}
