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

/// A broker process on a free port, with its data in `data_dir`.
pub struct Broker {
    child: Child,
    pub addr: SocketAddr,
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
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(rest) = line.split("listening on ").nth(1) {
                    let addr: SocketAddr = rest.split_whitespace().next().unwrap().parse().unwrap();
                    let _ = tx.send(addr);
                    sent = true;
                }
                if std::env::var_os("SLUICE_TEST_BROKER_LOG").is_some() {
                    eprintln!("broker: {line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the broker did not start listening within 30 s");
        Broker {
            child,
            addr,
            binary: binary.to_owned(),
            data_dir: data_dir.to_owned(),
            args,
            env,
        }
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

/// The `sluice-broker` binary of this build, for test crates other than the
/// broker's own (which use `env!("CARGO_BIN_EXE_sluice-broker")`): built
/// with the same profile next to the running test binary.
pub fn broker_binary() -> PathBuf {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| {
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
