//! Crash test: a child process appends with `every-batch` flush from several
//! threads and prints each acknowledged batch; the parent SIGKILLs it at a
//! random moment, reopens the log, and checks that every acknowledged batch
//! is there, intact and in order, that the log ends cleanly, and that appends
//! continue at the right offset. Then it does it again, on the same log.
//!
//! The child is this test binary run again with `CHILD_DIR_ENV` set, which
//! turns the `crash_child` test into the writer.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use sluice_broker::storage::{
    BatchBuilder, FlushPolicy, PartitionLog, ProducerInfo, Record, StorageError,
};

const CHILD_DIR_ENV: &str = "SLUICE_CRASH_CHILD_DIR";
const WRITER_THREADS: u64 = 3;

const FLUSH_ENV: &str = "SLUICE_CRASH_FLUSH";

/// Small segments so kills also land in the middle of rolls and of the
/// background seals that `os` flushing does.
fn crash_config(flush: FlushPolicy) -> sluice_broker::storage::LogConfig {
    common::config(256 * 1024, flush)
}

/// Content of record `i` of the batch that writer `thread` sent as its
/// `seq`-th: the parent recomputes it from the acknowledgement.
fn value(thread: u64, seq: u64, i: u64) -> Bytes {
    let mut v = format!("{thread}:{seq}:{i}:").into_bytes();
    let len = 50 + ((thread * 7919 + seq * 104_729 + i * 31) % 3000) as usize;
    v.resize(len, b'a' + (seq % 26) as u8);
    Bytes::from(v)
}

fn batch_size(thread: u64, seq: u64) -> u64 {
    1 + (thread + seq * 13) % 12
}

/// The child's writer: appends until it is killed, printing
/// `ACK <base> <count> <thread> <seq>` after each append returns.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return; // A normal test run: nothing to do.
    };
    let flush: FlushPolicy = std::env::var(FLUSH_ENV).unwrap().parse().unwrap();
    let log = Arc::new(PartitionLog::open(&dir, crash_config(flush)).expect("child opens the log"));
    let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let round: u64 = std::env::var("SLUICE_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let writers: Vec<_> = (0..WRITER_THREADS)
        .map(|thread| {
            let log = Arc::clone(&log);
            let stdout = Arc::clone(&stdout);
            std::thread::spawn(move || {
                for n in 0.. {
                    let seq = round * 1_000_000 + n;
                    let records: Vec<Record> = (0..batch_size(thread, seq))
                        .map(|i| Record {
                            key: Some(Bytes::from(format!("writer-{thread}"))),
                            value: value(thread, seq, i),
                            headers: vec![],
                            timestamp: seq as i64,
                        })
                        .collect();
                    let batch = BatchBuilder::encode(&records, ProducerInfo::NONE);
                    let info = log.append(&batch).expect("append");
                    let mut out = stdout.lock().unwrap();
                    writeln!(
                        out,
                        "ACK {} {} {thread} {seq}",
                        info.base_offset,
                        records.len()
                    )
                    .unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
}

#[derive(Debug, Clone, Copy)]
struct Ack {
    base: u64,
    count: u64,
    thread: u64,
    seq: u64,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let mut parts = line
        .strip_prefix("ACK ")?
        .split(' ')
        .map(|p| p.parse::<u64>().ok());
    Some(Ack {
        base: parts.next()??,
        count: parts.next()??,
        thread: parts.next()??,
        seq: parts.next()??,
    })
}

/// Runs one child, kills it with SIGKILL after it acknowledged `kill_after`
/// batches, and returns every acknowledgement it printed before it died.
fn run_child_and_kill(dir: &Path, flush: FlushPolicy, round: u64, kill_after: usize) -> Vec<Ack> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env("SLUICE_CRASH_ROUND", round.to_string())
        .env(FLUSH_ENV, flush.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acks = Vec::new();
    while acks.len() < kill_after {
        let line = lines
            .next()
            .expect("the child died before it was killed")
            .unwrap();
        acks.extend(parse_ack(&line));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    // Whatever it printed before it died was acknowledged too.
    for line in lines {
        acks.extend(parse_ack(&line.unwrap()));
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed, not finished");
    acks
}

/// Reopens the log and checks it against the acknowledgements; returns
/// whether recovery had to cut a torn tail.
fn check_log(dir: &Path, flush: FlushPolicy, acks: &[Ack]) -> bool {
    let log = PartitionLog::open(dir, crash_config(flush)).expect("reopen after the crash");
    let hw = log.high_watermark();
    // Every record in the log decodes (checksums hold) and offsets are dense.
    let records = common::read_all(&log, 0);
    assert_eq!(records.len() as u64, hw, "offsets 0..{hw} are all there");
    for ack in acks {
        assert!(
            ack.base + ack.count <= hw,
            "acknowledged batch {ack:?} lost; log ends at {hw}"
        );
        for i in 0..ack.count {
            let r = &records[(ack.base + i) as usize];
            assert_eq!(r.offset, ack.base + i);
            assert_eq!(
                r.record.value,
                value(ack.thread, ack.seq, i),
                "record {i} of {ack:?}"
            );
            assert_eq!(r.record.timestamp, ack.seq as i64);
        }
    }
    // Per writer, acknowledged batches are in the order they were sent.
    for thread in 0..WRITER_THREADS {
        let mut mine: Vec<&Ack> = acks.iter().filter(|a| a.thread == thread).collect();
        mine.sort_by_key(|a| a.seq);
        assert!(
            mine.windows(2).all(|w| w[0].base < w[1].base),
            "writer {thread} out of order"
        );
    }
    // Nothing past the end is readable, and appends continue right there.
    assert!(matches!(
        log.read(hw + 1, 1024),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    let probe = BatchBuilder::encode(
        &[Record {
            value: Bytes::from_static(b"probe"),
            ..Record::default()
        }],
        ProducerInfo::NONE,
    );
    let info = log.append(&probe).unwrap();
    assert_eq!(info.base_offset, hw, "appends continue at the old end");
    log.torn_tail().is_some()
}

fn crash_rounds(flush: FlushPolicy, rounds: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut all_acks: Vec<Ack> = Vec::new();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut torn_tails = 0;
    for round in 1..=rounds {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = 1 + (rng % 150) as usize;
        let acks = run_child_and_kill(dir.path(), flush, round, kill_after);
        assert!(acks.len() >= kill_after);
        all_acks.extend(acks);
        torn_tails += usize::from(check_log(dir.path(), flush, &all_acks));
    }
    eprintln!(
        "{flush}: {rounds} crash rounds, {} acknowledged batches checked, {torn_tails} torn tails cut",
        all_acks.len()
    );
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    crash_rounds(FlushPolicy::EveryBatch, 30);
}

/// With `os` flushing an acknowledged batch is only in the page cache, which
/// a killed process does not take with it: a SIGKILL (unlike a power cut)
/// must lose nothing either, including in the middle of a background seal.
#[test]
fn acknowledged_appends_survive_sigkill_with_os_flush() {
    crash_rounds(FlushPolicy::Os, 20);
}

/// The long version:
/// `cargo test --release -p sluice-broker --test storage_crash -- --ignored`
/// (`SLUICE_CRASH_ROUNDS` sets the rounds per flush policy).
#[test]
#[ignore = "soak: a thousand crash rounds"]
fn acknowledged_appends_survive_sigkill_soak() {
    let rounds = std::env::var("SLUICE_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(500);
    crash_rounds(FlushPolicy::EveryBatch, rounds);
    crash_rounds(FlushPolicy::Os, rounds);
}
