//! A process's anonymous resident memory (`RssAnon` in
//! `/proc/<pid>/status`): the heap and other private memory, leaving out
//! the page cache the broker's memory-mapped segments share with the
//! kernel, which the kernel takes back under pressure.

/// Why the figure could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The status file could not be read (no such process, not Linux).
    #[error("cannot read /proc/{pid}/status: {source}")]
    Read {
        /// The process asked about.
        pid: u32,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file has no RssAnon line.
    #[error("/proc/{0}/status has no RssAnon line")]
    Missing(u32),
}

/// `RssAnon` of process `pid`, in KiB.
pub fn rss_anon_kib(pid: u32) -> Result<u64, ProcError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|source| ProcError::Read { pid, source })?;
    parse_rss_anon(&status).ok_or(ProcError::Missing(pid))
}

/// The `RssAnon:` figure (KiB) of a `/proc/<pid>/status` text.
pub fn parse_rss_anon(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_rss_anon_line() {
        let status = "Name:\tsluice-broker\nVmRSS:\t  912340 kB\nRssAnon:\t   48212 kB\nRssFile:\t  864128 kB\n";
        assert_eq!(parse_rss_anon(status), Some(48_212));
        assert_eq!(parse_rss_anon("VmRSS: 1 kB\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let kib = rss_anon_kib(std::process::id()).unwrap();
        assert!(kib > 0);
        assert!(matches!(
            rss_anon_kib(u32::MAX),
            Err(ProcError::Read { .. })
        ));
    }
}
