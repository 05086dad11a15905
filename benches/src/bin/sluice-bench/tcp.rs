//! The loopback ceiling: the same bytes as a produce run (batches of
//! records, one connection per producer) written through plain TCP
//! sockets on 127.0.0.1 to a receiver that reads and drops them. No
//! framing, no acknowledgements, no disk: what the host's loopback and
//! memory copies allow at most.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use indicatif::ProgressBar;
use sluice_benches::load::pacing::Plan;

/// Sends every batch of `plan` through loopback sockets; returns the bytes
/// received and the time from the first send to the last byte received.
pub fn run(plan: Plan, record_bytes: u64, progress: &ProgressBar) -> Result<(u64, Duration)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind a loopback socket")?;
    let addr = listener.local_addr()?;
    let producers = plan.producers.max(1);
    let receiver = std::thread::spawn(move || -> Result<u64> {
        let mut readers = Vec::new();
        for _ in 0..producers {
            let (mut socket, _) = listener.accept()?;
            readers.push(std::thread::spawn(move || -> std::io::Result<u64> {
                let mut buffer = vec![0u8; 1 << 20];
                let mut total = 0u64;
                loop {
                    match socket.read(&mut buffer)? {
                        0 => return Ok(total),
                        n => total += n as u64,
                    }
                }
            }));
        }
        let mut total = 0;
        for reader in readers {
            total += reader.join().expect("reader thread")?;
        }
        Ok(total)
    });
    let start = Instant::now();
    let mut senders = Vec::new();
    for p in 0..producers {
        let progress = progress.clone();
        senders.push(std::thread::spawn(move || -> std::io::Result<()> {
            let mut socket = TcpStream::connect(addr)?;
            socket.set_nodelay(true)?;
            let payload = vec![0xa5u8; (plan.batch * record_bytes) as usize];
            for j in plan.producer_batches(p) {
                let len = plan.batch_len(j);
                socket.write_all(&payload[..(len * record_bytes) as usize])?;
                progress.inc(len);
            }
            socket.shutdown(std::net::Shutdown::Write)
        }));
    }
    for sender in senders {
        sender.join().expect("sender thread")?;
    }
    let received = receiver.join().expect("receiver thread")?;
    let elapsed = start.elapsed();
    ensure!(
        received == plan.count * record_bytes,
        "received {received} of {} bytes",
        plan.count * record_bytes
    );
    Ok((received, elapsed))
}
