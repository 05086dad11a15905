//! `sluice-broker check`: an offline walk of a data directory that reports
//! every damaged file, and with `--repair` moves damaged ranges aside.
//!
//! It takes the data directory's lock, so it never runs beside a broker.
//! What it checks:
//! - `meta/topics.json` and its previous copy (the broker starts from the
//!   copy when the file is damaged, and refuses to start when both are);
//! - every partition log, under `topics/` and `internal/` (see
//!   [`storage::check_log_dir`]);
//! - the snapshots of internal state logs (`state.snapshot`).

use std::fs;
use std::path::Path;

use crate::storage::{self, DataDirLock, Finding, StorageError};
use crate::topics;

/// What a check found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub findings: Vec<Finding>,
    /// Partition log directories walked.
    pub logs_checked: usize,
}

impl CheckReport {
    /// Whether anything found loses data or needs an operator.
    pub fn has_damage(&self) -> bool {
        self.findings.iter().any(|f| f.is_damage)
    }
}

/// Walks `data_dir`; with `repair`, moves damaged ranges aside.
pub fn check_data_dir(data_dir: &Path, repair: bool) -> Result<CheckReport, StorageError> {
    if !data_dir.join("topics").is_dir() && !data_dir.join("meta").is_dir() {
        return Err(StorageError::InvalidConfig(format!(
            "{} is not a Sluice data directory (it has no topics/ or meta/)",
            data_dir.display()
        )));
    }
    let _lock = DataDirLock::acquire(data_dir)?;
    let mut report = CheckReport::default();
    for problem in topics::check_topics_file(data_dir) {
        report.findings.push(Finding {
            path: data_dir.join(topics::TOPICS_FILE),
            problem: format!(
                "{problem} (the broker starts from whichever of topics.json and \
                 topics.json.prev reads back, and refuses to start when neither does)"
            ),
            is_damage: true,
            repaired: None,
        });
    }
    for top in ["topics", "internal"] {
        walk(&data_dir.join(top), repair, &mut report)?;
    }
    Ok(report)
}

/// Checks every partition log and state snapshot under `dir`.
fn walk(dir: &Path, repair: bool, report: &mut CheckReport) -> Result<(), StorageError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StorageError::io("list directory", dir, e)),
    };
    let mut subdirs = Vec::new();
    let mut has_segments = false;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list directory", dir, e))?;
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            subdirs.push(path);
        } else if path.extension().is_some_and(|e| e == "log") {
            has_segments = true;
        }
    }
    if has_segments {
        report.logs_checked += 1;
        report.findings.extend(storage::check_log_dir(dir, repair)?);
    }
    if let Some((path, reason)) = storage::check_state_snapshot(dir) {
        let mut finding = Finding {
            path: path.clone(),
            problem: format!(
                "damaged state snapshot ({reason}): the broker moves it aside and rebuilds \
                 the state from its change log alone, losing what only the snapshot held"
            ),
            is_damage: true,
            repaired: None,
        };
        if repair {
            let aside = storage::aside_path(&path);
            fs::rename(&path, &aside)
                .map_err(|e| StorageError::io("move damaged snapshot aside", &path, e))?;
            finding.repaired = Some(format!("moved it to {}", aside.display()));
        }
        report.findings.push(finding);
    }
    subdirs.sort();
    for subdir in subdirs {
        walk(&subdir, repair, report)?;
    }
    Ok(())
}
