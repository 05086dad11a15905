//! What several of the client's test files need.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sluice_client::{ConsumedRecord, Consumer};
use tokio_stream::StreamExt;

/// Reads `count` records from the consumer, failing after 30 s of silence.
pub async fn take(consumer: &mut Consumer, count: usize) -> Vec<ConsumedRecord> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let record = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} records arrived", out.len()))
            .expect("assigned")
            .expect("no error");
        out.push(record);
    }
    out
}

/// Runs `command` with `stdin` written to its standard input, and waits for
/// it: its exit status and both outputs, whatever they are.
#[allow(dead_code)] // not every test file runs programs
pub fn run_with_stdin(mut command: Command, stdin: &str) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (./scripts/test.sh installs what tests run)"));
    // A program may exit without reading its input.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}
