//! The data directory lock: one process per data directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

use super::error::{Result, StorageError};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// An exclusive `flock` on `<data-dir>/LOCK`, held for as long as this value
/// lives. The file records the holder's pid for the error a second process
/// gets. The kernel drops the lock when the process dies, so a crash never
/// leaves a stale lock behind.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Creates `dir` if needed and locks it, or fails with
    /// [`StorageError::Locked`] naming the process that holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::io("create data directory", dir, e))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StorageError::io("open lock file", &path, e))?;
        if let Err(errno) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if errno == rustix::io::Errno::WOULDBLOCK {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                };
                return Err(StorageError::Locked {
                    path: dir.to_owned(),
                    holder,
                });
            }
            return Err(StorageError::io("lock data directory", &path, errno.into()));
        }
        let record_pid = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            writeln!(file, "{}", std::process::id())
        };
        // The pid only helps a second process name the holder; the flock is
        // the lock. A full disk must not keep the broker from starting.
        match record_pid(&mut file).map_err(|e| StorageError::io("write lock file", &path, e)) {
            Ok(()) => {}
            Err(e) if e.is_out_of_space() => {
                tracing::warn!(error = %e, "cannot record the pid in the lock file");
            }
            Err(e) => return Err(e),
        }
        Ok(DataDirLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_holder_named() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, StorageError::Locked { .. }), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(first);
        DataDirLock::acquire(dir.path()).expect("free again once the holder is gone");
    }
}
