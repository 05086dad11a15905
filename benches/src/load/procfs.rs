//! Figures of the server's process from `/proc`:
//!
//! - its anonymous resident memory (`RssAnon` in `/proc/<pid>/status`):
//!   the heap and other private memory, leaving out the page cache the
//!   broker's memory-mapped segments share with the kernel, which the
//!   kernel takes back under pressure;
//! - the CPU time it has used (`utime` + `stime` in `/proc/<pid>/stat`,
//!   every thread of the process, in clock ticks), to charge each measured
//!   phase of a run with the server's CPU seconds.

/// Why a figure could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The file could not be read (no such process, not Linux).
    #[error("cannot read /proc/{pid}/{file}: {source}")]
    Read {
        /// The process asked about.
        pid: u32,
        /// `status` or `stat`.
        file: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file has no RssAnon line.
    #[error("/proc/{0}/status has no RssAnon line")]
    Missing(u32),
    /// The stat line has no readable utime and stime.
    #[error("/proc/{0}/stat has no readable utime and stime fields")]
    Malformed(u32),
}

fn read(pid: u32, file: &'static str) -> Result<String, ProcError> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|source| ProcError::Read {
        pid,
        file,
        source,
    })
}

/// `RssAnon` of process `pid`, in KiB.
pub fn rss_anon_kib(pid: u32) -> Result<u64, ProcError> {
    parse_rss_anon(&read(pid, "status")?).ok_or(ProcError::Missing(pid))
}

/// The `RssAnon:` figure (KiB) of a `/proc/<pid>/status` text.
pub fn parse_rss_anon(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// The user + system CPU time process `pid` has used so far (all its
/// threads; not its children), in clock ticks (see
/// [`clock_ticks_per_second`]; [`ticks_to_seconds`]).
pub fn cpu_ticks(pid: u32) -> Result<u64, ProcError> {
    parse_cpu_ticks(&read(pid, "stat")?).ok_or(ProcError::Malformed(pid))
}

/// `ticks` clock ticks in seconds.
pub fn ticks_to_seconds(ticks: u64) -> f64 {
    ticks as f64 / clock_ticks_per_second() as f64
}

/// `utime + stime` (fields 14 and 15, clock ticks) of a `/proc/<pid>/stat`
/// line. The second field, the command name in parentheses, may itself
/// hold spaces and parentheses, so the fields are counted from after the
/// *last* `)`: the first one there is field 3, the state.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    let mut fields = after_comm.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat`'s times
/// (`sysconf(_SC_CLK_TCK)`, through rustix as the broker's own process
/// metrics read it).
pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
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

    /// A stat line with `comm` as given and utime 1234, stime 567.
    fn stat_line(comm: &str) -> String {
        format!(
            "4242 ({comm}) S 1 4242 4242 0 -1 4194560 9138 0 12 0 1234 567 0 0 20 0 9 0 \
             180 1234567890 4321 18446744073709551615 1 1 0 0 0 0 0 4096 17642 0 0 0 17 1 \
             0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
    }

    #[test]
    fn cpu_ticks_are_utime_plus_stime() {
        assert_eq!(parse_cpu_ticks(&stat_line("sluice-broker")), Some(1801));
    }

    #[test]
    fn cpu_ticks_survive_spaces_and_parentheses_in_the_command_name() {
        for comm in [
            "tokio-runtime-w",
            "a b c",
            "x) 1 2 3 (y",
            "((",
            ")",
            ") R 9 9 9",
        ] {
            assert_eq!(parse_cpu_ticks(&stat_line(comm)), Some(1801), "{comm:?}");
        }
    }

    #[test]
    fn malformed_stat_lines_give_nothing() {
        assert_eq!(parse_cpu_ticks(""), None);
        assert_eq!(
            parse_cpu_ticks("4242 (no closing parenthesis S 1 2 3"),
            None
        );
        assert_eq!(
            parse_cpu_ticks("4242 (short) S 1 4242 4242 0 -1 0 0 0 0 0 7"),
            None
        );
        assert_eq!(
            parse_cpu_ticks("4242 (x) S 1 4242 4242 0 -1 0 0 0 0 0 seven 8 0"),
            None
        );
    }

    #[test]
    fn the_clock_tick_is_known() {
        assert!(clock_ticks_per_second() > 0);
        assert_eq!(ticks_to_seconds(clock_ticks_per_second() * 3), 3.0);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let seconds = ticks_to_seconds(cpu_ticks(std::process::id()).unwrap());
        assert!(seconds > 0.0, "{seconds}");
        assert!(matches!(
            cpu_ticks(u32::MAX),
            Err(ProcError::Read { file: "stat", .. })
        ));
    }
}
