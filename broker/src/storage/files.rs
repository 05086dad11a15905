//! Small file-system primitives with the durability the engine relies on.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use super::error::{Result, StorageError};

/// Makes a new or removed directory entry durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io("sync directory", dir, e))
}

/// Replaces `path` with `bytes` so that a crash leaves either the old file
/// or the new one, never a mix: write a temporary file, fsync it, rename it
/// over `path`, fsync the directory. Leftover `*.tmp` files are removed when
/// a log directory is opened.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let write = || -> io::Result<()> {
        let mut file = File::create(tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(tmp, path)
    };
    if let Err(e) = write() {
        // A half-written temporary file must not hold on to the space a
        // full disk is short of.
        let _ = fs::remove_file(tmp);
        return Err(StorageError::io("write", path, e));
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => Ok(()),
    }
}

/// The default free-space reserve: 64 MiB, or 5% of a smaller file system.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;

/// Space the file system holding `dir` has free for this process, and its
/// total size, in bytes.
pub fn free_space(dir: &Path) -> Result<(u64, u64)> {
    let stat = rustix::fs::statvfs(dir).map_err(|e| StorageError::io("statvfs", dir, e.into()))?;
    Ok((
        stat.f_bavail.saturating_mul(stat.f_frsize),
        stat.f_blocks.saturating_mul(stat.f_frsize),
    ))
}

/// Free space kept back from client writes on the file system of a
/// directory, so that the broker's own state (offsets, metadata, indexes,
/// snapshots) and recovery always have room.
#[derive(Debug)]
pub struct SpaceReserve {
    dir: std::path::PathBuf,
    bytes: u64,
}

impl SpaceReserve {
    /// A reserve of `bytes`, or with `None` the default: 64 MiB, but at most
    /// 5% of the file system (a small disk would otherwise refuse every
    /// write). `Some(0)` turns the check off.
    pub fn new(dir: &Path, bytes: Option<u64>) -> Result<SpaceReserve> {
        let bytes = match bytes {
            Some(bytes) => bytes,
            None => DEFAULT_MIN_FREE_BYTES.min(free_space(dir)?.1 / 20),
        };
        Ok(SpaceReserve {
            dir: dir.to_owned(),
            bytes,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Fails with [`StorageError::BelowFreeSpaceReserve`] when free space
    /// is below the reserve. One `statvfs`: cheap next to a write.
    pub fn check(&self) -> Result<()> {
        if self.bytes == 0 {
            return Ok(());
        }
        let (available, _) = free_space(&self.dir)?;
        if available < self.bytes {
            return Err(StorageError::BelowFreeSpaceReserve {
                path: self.dir.clone(),
                available,
                reserve: self.bytes,
            });
        }
        Ok(())
    }
}

/// Bounds-checked little-endian reads for small state files: every read
/// is `None` past the end instead of a panic.
pub struct ByteReader<'a> {
    buf: &'a [u8],
}

impl<'a> ByteReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        ByteReader { buf }
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}
