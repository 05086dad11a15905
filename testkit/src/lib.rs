//! Runs the real `sluice-broker` binary for integration tests, on a free
//! port with its data in a directory the test owns.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sluice_proto::v1::admin_service_client::AdminServiceClient;
use sluice_proto::v1::consume_service_client::ConsumeServiceClient;
use sluice_proto::v1::produce_service_client::ProduceServiceClient;
use tonic::transport::Channel;

pub mod pki;

/// A broker process on a free port, with its data in `data_dir`.
pub struct Broker {
    child: Child,
    pub addr: SocketAddr,
    /// Where it serves `/metrics`, unless metrics are off.
    pub metrics_addr: Option<SocketAddr>,
    /// Where its Kafka listener is, if it was started with one
    /// (`--kafka-listen`, `SLUICE_KAFKA_LISTEN`).
    pub kafka_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Broker {
    /// Starts `binary` and waits until it listens.
    pub fn start(binary: &Path, data_dir: &Path, args: &[&str]) -> Broker {
        Broker::start_with_env(binary, data_dir, args, &[])
    }

    /// Starts `binary` with extra environment variables (`SLUICE_*`
    /// settings, say) and waits until it listens.
    pub fn start_with_env(
        binary: &Path,
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Broker {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut command = Command::new(binary);
        command.envs(env.iter().map(|(k, v)| (k, v)));
        if !args.iter().any(|a| a == "--listen") {
            command.arg("--listen").arg("127.0.0.1:0");
        }
        // Brokers of parallel tests must not fight over the default port.
        if !args.iter().any(|a| a == "--metrics-listen")
            && !env.iter().any(|(k, _)| k == "SLUICE_METRICS_LISTEN")
        {
            command.arg("--metrics-listen").arg("127.0.0.1:0");
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sluice-broker");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep draining the log so the broker never blocks on a full pipe.
        // An address at the start of `text` (text or JSON log lines).
        fn address_at(text: &str) -> Option<SocketAddr> {
            let end = text
                .find(|c: char| !(c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']')))
                .unwrap_or(text.len());
            text[..end].parse().ok()
        }
        std::thread::spawn(move || {
            let mut sent = false;
            let mut metrics_addr = None;
            let mut kafka_addr = None;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if metrics_addr.is_none()
                    && let Some(rest) = line.split("metrics at http://").nth(1)
                {
                    metrics_addr = address_at(rest);
                }
                // Logged before the gRPC address.
                if kafka_addr.is_none()
                    && let Some(rest) = line.split("kafka listener at ").nth(1)
                {
                    kafka_addr = address_at(rest);
                }
                if !sent && let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = address_at(rest).expect("the broker logs its address");
                    let _ = tx.send((addr, metrics_addr, kafka_addr));
                    sent = true;
                }
                if std::env::var_os("SLUICE_TEST_BROKER_LOG").is_some() {
                    eprintln!("broker: {line}");
                }
            }
        });
        let (addr, metrics_addr, kafka_addr) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the broker did not start listening within 30 s");
        Broker {
            child,
            addr,
            metrics_addr,
            kafka_addr,
            binary: binary.to_owned(),
            data_dir: data_dir.to_owned(),
            args,
            env,
        }
    }

    /// The broker's `/metrics` exposition, fetched over plain HTTP/1.1.
    pub fn scrape_metrics(&self) -> String {
        use std::io::{Read, Write};
        let addr = self.metrics_addr.expect("the broker serves metrics");
        let mut stream = std::net::TcpStream::connect(addr).expect("connect to /metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .expect("send the scrape");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read the scrape");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "scrape failed: {head}");
        body.to_owned()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connect to the broker")
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await)
    }

    pub async fn producer(&self) -> ProduceServiceClient<Channel> {
        ProduceServiceClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    pub async fn consumer(&self) -> ConsumeServiceClient<Channel> {
        ConsumeServiceClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    /// SIGTERM, then wait for the exit (at most `within`).
    pub fn stop(&mut self, within: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// A new broker process on the same data directory and arguments.
    pub fn restart(mut self) -> Broker {
        let status = self.stop(Duration::from_secs(15));
        assert!(status.success(), "clean shutdown: {status}");
        self.start_again()
    }

    /// Stops this broker (SIGTERM) and starts a new one on the same data
    /// directory and the same address, so clients can reconnect to it.
    pub fn restart_on(mut self, addr: SocketAddr) -> Broker {
        let status = self.stop(Duration::from_secs(15));
        assert!(status.success(), "clean shutdown: {status}");
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let addr = addr.to_string();
        args.extend(["--listen", &addr]);
        Broker::start_with_env(&self.binary, &self.data_dir, &args, &self.env_refs())
    }

    /// A new broker process on the same data directory and arguments, after
    /// this one exited or was killed.
    pub fn start_again(&self) -> Broker {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Broker::start_with_env(&self.binary, &self.data_dir, &args, &self.env_refs())
    }

    /// A new broker process on the same data directory and arguments, after
    /// this one exited or was killed, with its Kafka listener on the port
    /// this one had (`--kafka-listen 127.0.0.1:0` picked it), so Kafka
    /// clients reconnect to it. The gRPC port is a new one unless the
    /// arguments named it.
    pub fn start_again_on_same_kafka_port(&self) -> Broker {
        let kafka = self
            .kafka_addr
            .expect("the broker has a Kafka listener")
            .to_string();
        let mut args: Vec<&str> = Vec::with_capacity(self.args.len() + 2);
        let mut rest = self.args.iter().map(String::as_str);
        while let Some(arg) = rest.next() {
            if arg == "--kafka-listen" {
                rest.next();
            } else if !arg.starts_with("--kafka-listen=") {
                args.push(arg);
            }
        }
        args.extend(["--kafka-listen", &kafka]);
        Broker::start_with_env(&self.binary, &self.data_dir, &args, &self.env_refs())
    }

    fn env_refs(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free on 127.0.0.1 at the moment of asking (another process
/// may take it before it is used: prefer port 0 where the broker reports
/// what it bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// The broker's own test crates pass `env!("CARGO_BIN_EXE_sluice-broker")`;
/// `SLUICE_BROKER_BINARY` overrides it, as it does [`broker_binary`] (to run
/// a test against another build, an older one to see a defect, say).
pub fn broker_binary_or(built: &str) -> PathBuf {
    std::env::var_os("SLUICE_BROKER_BINARY").map_or_else(|| PathBuf::from(built), PathBuf::from)
}

/// The `sluice-broker` binary of this build, for test crates other than the
/// broker's own (which use `env!("CARGO_BIN_EXE_sluice-broker")`): built
/// with the same profile next to the running test binary, or the one
/// `SLUICE_BROKER_BINARY` names (a target directory shared by several
/// checkouts may hold another checkout's build).
pub fn broker_binary() -> PathBuf {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(binary) = std::env::var_os("SLUICE_BROKER_BINARY") {
                return PathBuf::from(binary);
            }
            let exe = std::env::current_exe().expect("test binary path");
            // target/<profile>/deps/<test> -> target/<profile>
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target/<profile>");
            let binary = profile_dir.join("sluice-broker");
            if !binary.exists() {
                let release = profile_dir.ends_with("release");
                let mut build = Command::new(env!("CARGO"));
                build.args(["build", "-p", "sluice-broker", "--bin", "sluice-broker"]);
                if release {
                    build.arg("--release");
                }
                let status = build.status().expect("run cargo build");
                assert!(status.success(), "building sluice-broker failed");
            }
            binary
        })
        .clone()
}

/// A TCP proxy in front of the broker that cuts every connection after a
/// pseudo-random number of bytes from the broker (between `min_cut` and
/// `max_cut`): responses the broker sent are lost, so clients retry
/// requests the broker already carried out. Stops cutting after `cuts`
/// cuts, so a test can finish.
pub struct ChaosProxy {
    pub addr: SocketAddr,
    cuts_made: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ChaosProxy {
    pub fn start(target: SocketAddr, min_cut: usize, max_cut: usize, cuts: usize) -> ChaosProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cuts_made = Arc::new(AtomicUsize::new(0));
        let made = Arc::clone(&cuts_made);
        std::thread::spawn(move || {
            let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let budget = if made.load(Ordering::Relaxed) < cuts {
                    min_cut + (seed as usize) % (max_cut - min_cut + 1)
                } else {
                    usize::MAX
                };
                let made = Arc::clone(&made);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                // Client to broker: copied as is.
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &c2, &mut &s2);
                    let _ = s2.shutdown(std::net::Shutdown::Both);
                });
                // Broker to client: cut after `budget` bytes.
                std::thread::spawn(move || {
                    let mut left = budget;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match std::io::Read::read(&mut &server, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let n = n.min(left);
                        if std::io::Write::write_all(&mut &client, &buf[..n]).is_err() {
                            break;
                        }
                        left -= n;
                        if left == 0 {
                            made.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        ChaosProxy { addr, cuts_made }
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts_made.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// What a [`FaultProxy`] does to the traffic it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Copies both ways.
    None,
    /// Copies requests to the broker, reads its replies and drops them: the
    /// broker carries requests out, the client hears nothing (a silent
    /// broker, or acknowledgements lost).
    SwallowReplies,
    /// Cuts every open connection and closes new ones at once: the broker
    /// is unreachable.
    Refuse,
}

/// A TCP proxy in front of the broker whose [`Fault`] a test switches at
/// any time, for faults that must hold for a while (replies lost, broker
/// unreachable) rather than strike at random like [`ChaosProxy`]'s cuts.
pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: std::sync::Arc<std::sync::atomic::AtomicU8>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl FaultProxy {
    pub fn start(target: SocketAddr) -> FaultProxy {
        use std::sync::atomic::{AtomicU8, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(AtomicU8::new(Fault::None as u8));
        let open: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (accept_fault, accept_open) = (Arc::clone(&fault), Arc::clone(&open));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                if accept_fault.load(Ordering::Acquire) == Fault::Refuse as u8 {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                {
                    let mut open = accept_open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &c2, &mut &s2);
                    let _ = s2.shutdown(std::net::Shutdown::Both);
                });
                let fault = Arc::clone(&accept_fault);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match std::io::Read::read(&mut &server, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if fault.load(Ordering::Acquire) == Fault::SwallowReplies as u8 {
                            continue;
                        }
                        if std::io::Write::write_all(&mut &client, &buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        FaultProxy { addr, fault, open }
    }

    /// Switches to `fault`; [`Fault::Refuse`] also cuts open connections.
    pub fn set(&self, fault: Fault) {
        self.fault
            .store(fault as u8, std::sync::atomic::Ordering::Release);
        if fault == Fault::Refuse {
            for stream in self.open.lock().unwrap().drain(..) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
