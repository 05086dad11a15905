//! Real Kafka clients against the real broker's Kafka listener
//! (`--kafka-listen`): kafka-python and confluent-kafka (librdkafka) from
//! the Python scripts in tests/kafka/, Debian's `kcat`, and hand-made
//! frames over a raw TCP socket. A Kafka topic is a Sluice topic and a
//! Kafka group's offsets are Sluice's, so what the Kafka clients do is
//! checked over gRPC (the Rust client) and with the `sluice` CLI as well.
//!
//! Run them with `./scripts/test.sh` (it installs the pinned Python
//! packages into a venv and `kcat` if missing), or, once that venv is made,
//! alone: `SLUICE_PYTHON=target/python-venv/bin/python3 cargo test -p
//! sluice-client --test kafka_clients` (`-- --include-ignored` adds the
//! long variant: an idempotent producer through twenty broker kills).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::{Value, json};
use sluice_client::{
    Admin, ClientConfig, ConsumedRecord, Consumer, GroupConfig, GroupConsumer, Header, Producer,
    ProducerConfig, Record, StartFrom,
};
use sluice_testkit::{Broker, broker_binary};

mod common;
use common::{run_with_stdin, take};

// ---------------------------------------------------------------------------
// Running the broker, the Python scripts, kcat and the CLI

/// The Python to run: `SLUICE_PYTHON` (scripts/test.sh points it at a
/// virtual environment with the pinned packages), else `python3`.
fn python() -> String {
    std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Fails with what to do when the Kafka client packages are missing.
fn require_kafka_clients() {
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        let probe = Command::new(python())
            .args([
                "-c",
                "import kafka, confluent_kafka, snappy, lz4, zstandard",
            ])
            .output()
            .expect("python3 is needed for this test");
        assert!(
            probe.status.success(),
            "the Python Kafka clients are missing: run the tests with ./scripts/test.sh, which \
             installs tests/python/requirements.txt into a virtual environment (or point \
             SLUICE_PYTHON at one)\n{}",
            String::from_utf8_lossy(&probe.stderr)
        );
    });
}

/// A broker with its Kafka listener on a free port.
fn start_broker(dir: &Path) -> Broker {
    let broker = Broker::start(&broker_binary(), dir, &["--kafka-listen", "127.0.0.1:0"]);
    assert!(
        broker.kafka_addr.is_some(),
        "the broker logged no `kafka listener at ADDR` line before `listening on`"
    );
    broker
}

/// A broker with a Kafka listener and `topic` made over gRPC; the broker
/// and its Kafka bootstrap address.
async fn broker_with_topic(dir: &Path, topic: &str, partitions: u32) -> (Broker, String) {
    let broker = start_broker(dir);
    let bs = bootstrap(&broker);
    Admin::new(&ClientConfig::new(broker.url()))
        .unwrap()
        .create_topic(topic, partitions)
        .await
        .unwrap();
    (broker, bs)
}

fn bootstrap(broker: &Broker) -> String {
    broker.kafka_addr.unwrap().to_string()
}

fn script_command(script: &str, args: &[&str]) -> Command {
    require_kafka_clients();
    let mut command = Command::new(python());
    command
        .arg(root().join("tests/kafka").join(script))
        .args(args)
        .env("PYTHONPATH", root().join("tests/kafka"))
        .env("PYTHONUNBUFFERED", "1");
    command
}

/// Runs one of tests/kafka's scripts to the end; its stdout as JSON.
fn run_script(script: &str, args: &[&str], stdin: &str) -> Value {
    let output = run_with_stdin(script_command(script, args), stdin);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{script} {args:?}: {e}: {stdout}"))
}

fn kafka_python(args: &[&str]) -> Value {
    run_script("kafka_python_client.py", args, "")
}

/// A script left running (a group member, a producer), its stdout read as
/// JSON lines as they come.
struct Running {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    events: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    fn spawn(name: &str, script: &str, args: &[&str]) -> Running {
        let mut child = script_command(script, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 is needed for this test");
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let stderr: Arc<Mutex<String>> = Arc::default();
        let (stdout_pipe, stderr_pipe) =
            (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let (out, label) = (Arc::clone(&events), name.to_owned());
        let stdout_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout_pipe).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str(&line) {
                    Ok(value) => out.lock().unwrap().push(value),
                    Err(_) => eprintln!("{label}: {line}"),
                }
            }
        });
        let err = Arc::clone(&stderr);
        let stderr_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr_pipe).read_to_string(&mut text);
            err.lock().unwrap().push_str(&text);
        });
        Running {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            events,
            stderr,
            readers: vec![stdout_reader, stderr_reader],
        }
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    fn of(&self, event: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == event)
            .collect()
    }

    /// Waits until `ready` holds for the events so far; fails after
    /// `within`, or as soon as the script exits.
    fn wait_for(&mut self, what: &str, within: Duration, ready: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if ready(&self.events()) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                // The last lines may still be on their way.
                std::thread::sleep(Duration::from_millis(200));
                if ready(&self.events()) {
                    return;
                }
                panic!(
                    "{}: exited ({status}) before {what}:\n{}",
                    self.name,
                    self.report()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: not {what} within {within:?}:\n{}",
                self.name,
                self.report()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn report(&self) -> String {
        let events: Vec<String> = self.events().iter().map(Value::to_string).collect();
        format!(
            "events:\n{}\nstderr:\n{}",
            events.join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    /// SIGKILL, then every line it wrote before.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
    }

    /// Closes its stdin (the group member's cue to close) and waits for a
    /// clean exit.
    fn finish(&mut self, within: Duration) {
        drop(self.stdin.take());
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: still running {within:?} after it was told to stop:\n{}",
                self.name,
                self.report()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        assert!(
            status.success(),
            "{}: {status}\n{}",
            self.name,
            self.report()
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `sluice` CLI against the broker's gRPC address; its stdout.
fn sluice(broker: &Broker, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--broker")
        .arg(broker.url())
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "sluice {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// One partition's row of `sluice group describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LagRow {
    committed: Option<u64>,
    end: u64,
    lag: Option<u64>,
}

/// `sluice group describe GROUP`: the group's total lag and, per partition
/// of `topic`, its committed offset, end and lag.
fn describe_group(
    broker: &Broker,
    group: &str,
    topic: &str,
) -> (u64, BTreeMap<u32, LagRow>, String) {
    let out = sluice(broker, &["group", "describe", group]);
    let first = out.lines().next().unwrap_or_default();
    let lag = first
        .split(", lag ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total lag in:\n{out}"));
    let number = |field: &str| (field != "-").then(|| field.parse::<u64>().unwrap());
    let rows = out
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.trim().split('\t').collect();
            (fields.len() == 7 && fields[0] == topic).then(|| {
                (
                    fields[1].parse().unwrap(),
                    LagRow {
                        committed: number(fields[2]),
                        end: fields[3].parse().unwrap(),
                        lag: number(fields[4]),
                    },
                )
            })
        })
        .collect();
    (lag, rows, out)
}

/// kcat: `SLUICE_KCAT` (scripts/test.sh installs Debian's and points it
/// there), else `kcat` on the PATH.
fn kcat(args: &[&str], stdin: &str) -> String {
    let output = try_kcat(args, stdin);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kcat {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// kcat's exit status and output, whatever they are.
fn try_kcat(args: &[&str], stdin: &str) -> std::process::Output {
    let binary = std::env::var("SLUICE_KCAT").unwrap_or_else(|_| "kcat".into());
    let mut command = Command::new(binary);
    command.args(args);
    run_with_stdin(command, stdin)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Reads `count` records of `partitions` over gRPC from the earliest.
async fn read_grpc(
    broker: &Broker,
    topic: &str,
    partitions: &[u32],
    count: usize,
) -> Vec<ConsumedRecord> {
    let mut consumer = Consumer::new(&ClientConfig::new(broker.url())).unwrap();
    consumer
        .assign(topic, partitions, StartFrom::Earliest)
        .await
        .unwrap();
    take(&mut consumer, count).await
}

/// Records in each partition of `topic` (its end offsets, all from 0).
async fn end_offsets(broker: &Broker, topic: &str) -> Vec<u64> {
    end_offsets_as(&ClientConfig::new(broker.url()), topic).await
}

async fn end_offsets_as(config: &ClientConfig, topic: &str) -> Vec<u64> {
    let admin = Admin::new(config).unwrap();
    let info = admin.describe_topic(topic).await.unwrap();
    info.partitions.iter().map(|p| p.latest_offset).collect()
}

// ---------------------------------------------------------------------------
// Records as the scripts exchange them (tests/kafka/kafka_records.py)

fn b64(bytes: Option<&[u8]>) -> Value {
    bytes.map_or(Value::Null, |b| B64.encode(b).into())
}

fn record_json(
    partition: u32,
    offset: Option<u64>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(&str, Option<&[u8]>)],
    timestamp_ms: i64,
) -> Value {
    let mut record = json!({
        "partition": partition,
        "key": b64(key),
        "value": b64(value),
        "headers": headers.iter().map(|(k, v)| json!([k, b64(*v)])).collect::<Vec<_>>(),
        "timestamp_ms": timestamp_ms,
    });
    if let Some(offset) = offset {
        record["offset"] = offset.into();
    }
    record
}

fn json_lines(records: &[Value]) -> String {
    records.iter().map(|r| format!("{r}\n")).collect()
}

fn with_offset(record: &Value, offset: u64) -> Value {
    let mut record = record.clone();
    record["offset"] = offset.into();
    record
}

/// Records that exercise the Kafka record encoding: keys null, empty,
/// text and binary; values compressible JSON, binary (every byte value)
/// and empty; several headers, one with a binary and one with an empty
/// value; timestamps out of order. `null_values` adds Kafka null values;
/// `repeated_headers` gives some records two headers of one name (Kafka
/// keeps both, in order).
fn kafka_records(count: usize, null_values: bool, repeated_headers: bool) -> Vec<Value> {
    let base = 1_700_000_000_000i64;
    (0..count)
        .map(|i| {
            let key: Option<Vec<u8>> = match i % 4 {
                0 => None,
                1 => Some(Vec::new()),
                2 => Some(format!("key-{}", i % 7).into_bytes()),
                _ => Some(vec![0x00, 0xff, i as u8, 0x80]),
            };
            let value: Option<Vec<u8>> = match i % 6 {
                0 => Some((0..=255u8).cycle().skip(i).take(300).collect()),
                1 if null_values => None,
                1 => Some(Vec::new()),
                _ => Some(
                    format!(
                        "{{\"order\":{i},\"customer\":\"c-{}\",\"items\":[\"tea\",\"cups\",\"saucers\"],\"note\":\"leave it at the door, leave it at the door\"}}",
                        i % 13
                    )
                    .into_bytes(),
                ),
            };
            let bin = [0x00u8, 0xff, 0x80, i as u8];
            let mut headers: Vec<(&str, Option<&[u8]>)> = match i % 3 {
                0 => vec![],
                1 => vec![("source", Some(b"kafka".as_slice()))],
                _ => vec![
                    ("source", Some(b"kafka".as_slice())),
                    ("bin", Some(bin.as_slice())),
                    ("empty", Some(b"".as_slice())),
                ],
            };
            if repeated_headers && i % 3 == 2 {
                headers.push(("source", Some(b"again".as_slice())));
            }
            let timestamp = base + (i as i64 % 5) * 997 - 1_500;
            record_json(0, None, key.as_deref(), value.as_deref(), &headers, timestamp)
        })
        .collect()
}

/// Fails at the first record that differs, showing both (key, value and
/// header values in base64).
fn assert_same_records(got: &[Value], expected: &[Value], what: &str) {
    for (i, (got, expected)) in got.iter().zip(expected).enumerate() {
        assert!(
            got == expected,
            "{what}: record {i} differs\n     got: {got}\nexpected: {expected}"
        );
    }
    assert_eq!(got.len(), expected.len(), "{what}: records read");
}

/// A record read over gRPC as the scripts print it.
fn grpc_record_json(r: &ConsumedRecord) -> Value {
    json!({
        "partition": r.partition,
        "offset": r.offset,
        "key": b64(r.key.as_deref()),
        "value": b64(Some(r.value.as_ref())),
        "headers": r.headers.iter().map(|h| json!([h.key, b64(Some(h.value.as_ref()))])).collect::<Vec<_>>(),
        "timestamp_ms": r.timestamp_ms,
    })
}

// ---------------------------------------------------------------------------
// a. kafka-python producer and group consumer; the group's lag in the CLI

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_python_produces_and_a_group_consumes_with_lag_in_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let bs = bootstrap(&broker);

    // CreateTopics over Kafka; the topic is a Sluice topic.
    let created = kafka_python(&["create-topic", &bs, "orders", "3"]);
    assert_eq!(created["created"], "orders", "{created}");
    assert_eq!(end_offsets(&broker, "orders").await, vec![0, 0, 0]);

    let sent = kafka_python(&["produce-json", &bs, "orders", "60", "12", "0"]);
    let sent = sent["sent"].as_array().unwrap().clone();
    assert_eq!(sent.len(), 60);
    // Offsets per partition: 0, 1, 2, ... in the order sent.
    let mut per_partition: BTreeMap<u64, u64> = BTreeMap::new();
    for s in &sent {
        let next = per_partition
            .entry(s["partition"].as_u64().unwrap())
            .or_default();
        assert_eq!(s["offset"].as_u64().unwrap(), *next, "{s}");
        *next += 1;
    }
    // The Kafka producer partitions by murmur2 of the key, as the broker
    // does for gRPC producers.
    for s in &sent {
        let key = s["key"].as_str().unwrap();
        assert_eq!(
            s["partition"].as_u64().unwrap(),
            u64::from(sluice_client::partition_for_key(key.as_bytes(), 3)),
            "{s}"
        );
    }

    let read = kafka_python(&["consume-group", &bs, "orders", "billing", "60"]);
    let read = read["records"].as_array().unwrap();
    assert_eq!(read.len(), 60, "every record once: {read:?}");
    let at: HashMap<(u64, u64), &Value> = read
        .iter()
        .map(|r| {
            (
                (
                    r["partition"].as_u64().unwrap(),
                    r["offset"].as_u64().unwrap(),
                ),
                r,
            )
        })
        .collect();
    for s in &sent {
        let position = (
            s["partition"].as_u64().unwrap(),
            s["offset"].as_u64().unwrap(),
        );
        let got = at
            .get(&position)
            .unwrap_or_else(|| panic!("{s} was not read"));
        assert_eq!(got["key"], s["key"], "{s}");
        assert_eq!(
            got["value"],
            json!({"key": s["key"], "seq": s["seq"]}),
            "{s}"
        );
    }
    // Per key, in the order sent.
    let mut last_seq: HashMap<&str, i64> = HashMap::new();
    for r in read {
        let key = r["key"].as_str().unwrap();
        let seq = r["value"]["seq"].as_i64().unwrap();
        let last = last_seq.insert(key, seq).unwrap_or(-1);
        assert!(seq > last, "{key}: {seq} read after {last}");
    }

    // The group's commits are Sluice's: committed = end, lag 0.
    let (lag, rows, out) = describe_group(&broker, "billing", "orders");
    assert_eq!(rows.len(), 3, "{out}");
    assert_eq!(lag, 0, "{out}");
    for (partition, row) in &rows {
        let end = per_partition
            .get(&u64::from(*partition))
            .copied()
            .unwrap_or(0);
        assert_eq!(row.end, end, "partition {partition}:\n{out}");
        if end > 0 {
            assert_eq!(row.committed, Some(end), "partition {partition}:\n{out}");
            assert_eq!(row.lag, Some(0), "partition {partition}:\n{out}");
        }
    }

    // Five more: lag 5, where they went.
    let more = kafka_python(&["produce-json", &bs, "orders", "5", "12", "60"]);
    let mut added: BTreeMap<u32, u64> = BTreeMap::new();
    for s in more["sent"].as_array().unwrap() {
        *added
            .entry(s["partition"].as_u64().unwrap() as u32)
            .or_default() += 1;
    }
    let (lag, rows_after, out) = describe_group(&broker, "billing", "orders");
    assert_eq!(lag, 5, "{out}");
    for (partition, row) in &rows_after {
        let before = &rows[partition];
        let new = added.get(partition).copied().unwrap_or(0);
        assert_eq!(
            row.committed, before.committed,
            "partition {partition}:\n{out}"
        );
        assert_eq!(row.end, before.end + new, "partition {partition}:\n{out}");
        if row.committed.is_some() {
            assert_eq!(row.lag, Some(new), "partition {partition}:\n{out}");
        }
    }
}

/// kafka-python's KafkaAdminClient: CreateTopics, Metadata (v8, which
/// asks for authorized operations) and DeleteTopics, seen over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_python_admin_creates_lists_and_deletes_topics() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let bs = bootstrap(&broker);
    let admin = Admin::new(&ClientConfig::new(broker.url())).unwrap();
    admin.create_topic("made-over-grpc", 2).await.unwrap();
    kafka_python(&["create-topic", &bs, "made-over-kafka", "3"]);
    assert_eq!(end_offsets(&broker, "made-over-kafka").await, vec![0, 0, 0]);
    let listed = kafka_python(&["list-topics", &bs]);
    assert_eq!(
        listed["topics"],
        json!({"made-over-grpc": 2, "made-over-kafka": 3}),
        "{listed}"
    );
    kafka_python(&["delete-topic", &bs, "made-over-grpc"]);
    let names: Vec<String> = admin
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["made-over-kafka"]);
}

// ---------------------------------------------------------------------------
// b. Group rebalance between kafka-python members; one killed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_python_members_split_partitions_and_a_survivor_takes_over_a_killed_member() {
    const PARTITIONS: u32 = 4;
    const PER_PARTITION: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let bs = bootstrap(&broker);
    let config = ClientConfig::new(broker.url());
    Admin::new(&config)
        .unwrap()
        .create_topic("events", PARTITIONS)
        .await
        .unwrap();
    let producer = Producer::new(&config, ProducerConfig::default()).unwrap();
    let mut deliveries = Vec::new();
    for i in 0..PER_PARTITION {
        for p in 0..PARTITIONS {
            let record = Record::new(format!("r-{p}-{i}")).with_partition(p);
            deliveries.push(producer.enqueue("events", record).await.unwrap());
        }
    }
    producer.flush().await.unwrap();
    for delivery in deliveries {
        delivery.await.unwrap();
    }
    producer.close().await.unwrap();

    // Each "processes" a record in 30 ms; A commits after every record,
    // B after every 5, so B dies with records processed but not committed.
    let member = |name: &str, commit_every: &str| {
        Running::spawn(
            &format!("member {name}"),
            "kafka_python_client.py",
            &[
                "group-member",
                &bs,
                "events",
                "workers",
                name,
                "30",
                commit_every,
            ],
        )
    };
    let partitions = |e: &Value| -> BTreeSet<u64> {
        e["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap())
            .collect()
    };
    let latest_assignment = |events: &[Value]| -> Option<BTreeSet<u64>> {
        events
            .iter()
            .rev()
            .find(|e| e["event"] == "assigned")
            .map(partitions)
    };
    let all: BTreeSet<u64> = (0..u64::from(PARTITIONS)).collect();

    let mut a = member("a", "1");
    a.wait_for(
        "assigned every partition, 10 processed",
        Duration::from_secs(30),
        |events| {
            latest_assignment(events).as_ref() == Some(&all)
                && events.iter().filter(|e| e["event"] == "committed").count() >= 10
        },
    );

    // B joins: the partitions are split between the two.
    let mut b = member("b", "5");
    let deadline = Instant::now() + Duration::from_secs(40);
    let (a_share, b_share) = loop {
        let (a_now, b_now) = (
            latest_assignment(&a.events()),
            latest_assignment(&b.events()),
        );
        if let (Some(a_now), Some(b_now)) = (&a_now, &b_now)
            && !a_now.is_empty()
            && !b_now.is_empty()
            && a_now.is_disjoint(b_now)
            && a_now.union(b_now).copied().collect::<BTreeSet<_>>() == all
        {
            break (a_now.clone(), b_now.clone());
        }
        assert!(
            Instant::now() < deadline,
            "no split assignment within 40 s (a: {a_now:?}, b: {b_now:?})\nA {}\nB {}",
            a.report(),
            b.report()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("split: a {a_share:?}, b {b_share:?}");
    b.wait_for(
        "a commit, then 2 records processed",
        Duration::from_secs(20),
        |events| {
            events
                .iter()
                .rposition(|e| e["event"] == "committed")
                .is_some_and(|last| {
                    events[last..]
                        .iter()
                        .filter(|e| e["event"] == "processed")
                        .count()
                        >= 2
                })
        },
    );

    // SIGKILL B: no LeaveGroup, no last commit. A gets everything once B's
    // session times out, and resumes B's partitions at B's commits.
    b.kill();
    let total = u64::from(PARTITIONS) * PER_PARTITION;
    let processed = |member: &Running| -> Vec<(u64, u64)> {
        member
            .of("processed")
            .iter()
            .map(|e| {
                (
                    e["partition"].as_u64().unwrap(),
                    e["offset"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let b_processed = processed(&b);
    let b_set: BTreeSet<(u64, u64)> = b_processed.iter().copied().collect();
    a.wait_for(
        "assigned every partition after B died, and every record processed",
        Duration::from_secs(90),
        |events| {
            let mut seen = b_set.clone();
            seen.extend(
                events
                    .iter()
                    .filter(|e| e["event"] == "processed")
                    .map(|e| {
                        (
                            e["partition"].as_u64().unwrap(),
                            e["offset"].as_u64().unwrap(),
                        )
                    }),
            );
            latest_assignment(events).as_ref() == Some(&all) && seen.len() as u64 == total
        },
    );
    a.finish(Duration::from_secs(20));
    let a_events = a.events();
    let b_events = b.events();

    // No gap: every record processed by someone.
    let mut times: BTreeMap<(u64, u64), u32> = BTreeMap::new();
    for position in processed(&a).into_iter().chain(b_processed.iter().copied()) {
        *times.entry(position).or_default() += 1;
    }
    for p in 0..u64::from(PARTITIONS) {
        for o in 0..PER_PARTITION {
            assert!(
                times.contains_key(&(p, o)),
                "record {p}/{o} was processed by nobody\nA {}\nB {}",
                a.report(),
                b.report()
            );
        }
    }
    // The values are the records'.
    for e in a_events
        .iter()
        .chain(&b_events)
        .filter(|e| e["event"] == "processed")
    {
        let (p, o) = (
            e["partition"].as_u64().unwrap(),
            e["offset"].as_u64().unwrap(),
        );
        assert_eq!(e["value"], format!("r-{p}-{o}"), "{e}");
    }

    // Where B stood on each partition it had: its last commit, and the
    // first offset it processed there.
    let mut b_last_commit: BTreeMap<u64, u64> = BTreeMap::new();
    let mut b_first: BTreeMap<u64, u64> = BTreeMap::new();
    let mut b_last_processed: BTreeMap<u64, u64> = BTreeMap::new();
    for e in &b_events {
        let p = e["partition"].as_u64();
        let o = e["offset"].as_u64();
        match e["event"].as_str() {
            Some("committed") => {
                b_last_commit.insert(p.unwrap(), o.unwrap());
            }
            Some("processed") => {
                b_first.entry(p.unwrap()).or_insert(o.unwrap());
                b_last_processed.insert(p.unwrap(), o.unwrap());
            }
            _ => {}
        }
    }
    let failed_commits: BTreeSet<(u64, u64)> = a_events
        .iter()
        .chain(&b_events)
        .filter(|e| e["event"] == "commit_failed")
        .map(|e| {
            (
                e["partition"].as_u64().unwrap(),
                e["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    if !failed_commits.is_empty() {
        eprintln!("commits refused (during a rebalance): {failed_commits:?}");
    }

    // At least once, exactly: every record has one committed processing
    // (its member committed past it later), and no other processing but
    // ones never committed (B's after its last commit, or ones whose
    // commit the client saw refused).
    let mut committed_processings: BTreeMap<(u64, u64), u32> = BTreeMap::new();
    for events in [&a_events, &b_events] {
        for (i, e) in events.iter().enumerate() {
            if e["event"] != "processed" {
                continue;
            }
            let (p, o) = (
                e["partition"].as_u64().unwrap(),
                e["offset"].as_u64().unwrap(),
            );
            let committed = events[i..].iter().any(|c| {
                c["event"] == "committed"
                    && c["partition"] == p
                    && c["offset"].as_u64().unwrap() > o
            });
            if committed {
                *committed_processings.entry((p, o)).or_default() += 1;
            }
        }
    }
    for p in 0..u64::from(PARTITIONS) {
        for o in 0..PER_PARTITION {
            assert_eq!(
                committed_processings.get(&(p, o)).copied().unwrap_or(0),
                1,
                "record {p}/{o}: processings followed by a commit of it\nA {}\nB {}",
                a.report(),
                b.report()
            );
        }
    }

    let repeats: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "processed: A {}, B {} (B's last commits {b_last_commit:?}); processed twice: {repeats:?}",
        processed(&a).len(),
        b_processed.len()
    );

    // A record processed twice is one B processed after its last commit
    // (at least once), or one whose commit the client saw refused.
    for (&(p, o), &n) in &times {
        if n < 2 {
            continue;
        }
        let floor = b_last_commit.get(&p).or(b_first.get(&p)).copied();
        assert!(
            floor.is_some_and(|floor| o >= floor) || failed_commits.contains(&(p, o)),
            "record {p}/{o} processed {n} times, below B's last commit {floor:?} on partition {p}\nA {}\nB {}",
            a.report(),
            b.report()
        );
    }

    // A took B's partitions over from B's commits: its first record of each
    // after its last assignment is at or after B's last commit, and no
    // later than the record after B's last processed one.
    let last_assigned = a_events
        .iter()
        .rposition(|e| e["event"] == "assigned")
        .unwrap();
    for (&p, &commit) in &b_last_commit {
        let first = a_events[last_assigned..]
            .iter()
            .find(|e| e["event"] == "processed" && e["partition"] == p)
            .map(|e| e["offset"].as_u64().unwrap());
        if let Some(first) = first {
            let last = b_last_processed[&p];
            assert!(
                (commit..=last + 1).contains(&first),
                "partition {p}: A resumed at {first}; B had committed {commit}, processed up to {last}\nA {}",
                a.report()
            );
        } else {
            // Nothing left for A: B had processed and committed it all.
            assert_eq!(commit, PER_PARTITION, "partition {p}: A read nothing of it");
        }
    }

    // The group's offsets in Sluice: A committed everything.
    let (lag, rows, out) = describe_group(&broker, "workers", "events");
    assert_eq!(lag, 0, "{out}");
    for p in 0..PARTITIONS {
        assert_eq!(rows[&p].committed, Some(PER_PARTITION), "{out}");
    }
}

// ---------------------------------------------------------------------------
// c. An idempotent confluent-kafka producer through broker kills and lost
// answers

/// The idempotent producer's run: every record acknowledged once, none
/// failed, and the topic holds each exactly once, where its
/// acknowledgement said (read over gRPC).
async fn assert_idempotent_run(producer: &mut Running, broker: &Broker, topic: &str, count: u64) {
    producer.wait_for("done", Duration::from_secs(150), |events| {
        events.iter().any(|e| e["event"] == "done")
    });
    producer.finish(Duration::from_secs(10));
    let events = producer.events();
    let fatal: Vec<&Value> = events.iter().filter(|e| e["event"] == "fatal").collect();
    let failed: Vec<&Value> = events.iter().filter(|e| e["event"] == "failed").collect();
    let errors = events.iter().filter(|e| e["event"] == "error").count();
    eprintln!(
        "{}: {errors} client error(s) reported on the way",
        producer.name
    );
    assert!(
        fatal.is_empty(),
        "fatal producer errors: {fatal:?}\n{}",
        producer.report()
    );
    assert!(
        failed.is_empty(),
        "undelivered records: {failed:?}\n{}",
        producer.report()
    );
    let done = events.iter().find(|e| e["event"] == "done").unwrap();
    assert_eq!(done["unflushed"], 0, "{done}");
    let mut acked: HashMap<String, (u32, u64)> = HashMap::new();
    for e in events.iter().filter(|e| e["event"] == "acked") {
        let position = (
            e["partition"].as_u64().unwrap() as u32,
            e["offset"].as_u64().unwrap(),
        );
        let value = e["value"].as_str().unwrap().to_owned();
        assert!(
            acked.insert(value, position).is_none(),
            "acknowledged twice: {e}"
        );
    }
    assert_eq!(acked.len() as u64, count, "acknowledged");

    let ends = end_offsets(broker, topic).await;
    let stored: u64 = ends.iter().sum();
    let partitions: Vec<u32> = (0..ends.len() as u32).collect();
    let records = read_grpc(broker, topic, &partitions, stored as usize).await;
    let mut found: HashMap<String, Vec<(u32, u64)>> = HashMap::new();
    for r in &records {
        found
            .entry(String::from_utf8(r.value.to_vec()).unwrap())
            .or_default()
            .push((r.partition, r.offset));
    }
    let repeated: Vec<_> = found.iter().filter(|(_, at)| at.len() > 1).collect();
    assert!(repeated.is_empty(), "written more than once: {repeated:?}");
    for (value, position) in &acked {
        assert_eq!(
            found.get(value),
            Some(&vec![*position]),
            "{value}: acknowledged at {position:?}"
        );
    }
    assert_eq!(
        stored, count,
        "the topic holds exactly the records sent (ends {ends:?})"
    );
}

/// `count` records at `per_second` from an idempotent confluent-kafka
/// producer while the broker is SIGKILLed once the producer has
/// `kill_at[i]` acknowledgements; each time a broker on the same data and
/// Kafka port comes back after half a second.
async fn idempotent_producer_through_kills(count: u64, per_second: u32, kill_at: &[usize]) {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(dir.path());
    let bs = bootstrap(&broker);
    Admin::new(&ClientConfig::new(broker.url()))
        .unwrap()
        .create_topic("payments", 2)
        .await
        .unwrap();

    let mut producer = Running::spawn(
        "idempotent producer",
        "confluent_client.py",
        &[
            "produce-idempotent",
            &bs,
            "payments",
            &count.to_string(),
            &per_second.to_string(),
        ],
    );
    for &acked in kill_at {
        producer.wait_for(
            &format!("{acked} acknowledged"),
            Duration::from_secs(60),
            |events| events.iter().filter(|e| e["event"] == "acked").count() >= acked,
        );
        broker.kill();
        let so_far = producer.of("acked").len();
        assert!(
            so_far < count as usize,
            "the producer finished before the broker was killed"
        );
        std::thread::sleep(Duration::from_millis(500));
        broker = broker.start_again_on_same_kafka_port();
        assert_eq!(bootstrap(&broker), bs);
    }
    assert_idempotent_run(&mut producer, &broker, "payments", count).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_confluent_producer_loses_and_repeats_nothing_through_broker_kills() {
    idempotent_producer_through_kills(300, 100, &[50, 120, 190]).await;
}

/// The long variant: 20 kills in 6000 records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: about half a minute"]
async fn an_idempotent_confluent_producer_through_twenty_broker_kills() {
    let kill_at: Vec<usize> = (1..=20).map(|i| i * 280).collect();
    idempotent_producer_through_kills(6000, 300, &kill_at).await;
}

/// Answers lost on the way back (a proxy, advertised as the broker's
/// address, cuts connections partway through the broker's bytes): the
/// producer resends batches the broker already wrote, and idempotence
/// writes each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_confluent_producer_writes_once_when_answers_are_lost() {
    const COUNT: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let kafka_port = sluice_testkit::free_port();
    let kafka: SocketAddr = format!("127.0.0.1:{kafka_port}").parse().unwrap();
    let proxy = sluice_testkit::ChaosProxy::start(kafka, 50, 1200, 30);
    let proxy_addr = proxy.addr.to_string();
    let broker = Broker::start(
        &broker_binary(),
        dir.path(),
        &[
            "--kafka-listen",
            &kafka.to_string(),
            "--kafka-advertised",
            &proxy_addr,
        ],
    );
    assert_eq!(broker.kafka_addr, Some(kafka));
    Admin::new(&ClientConfig::new(broker.url()))
        .unwrap()
        .create_topic("transfers", 2)
        .await
        .unwrap();
    let mut producer = Running::spawn(
        "idempotent producer behind a cutting proxy",
        "confluent_client.py",
        &[
            "produce-idempotent",
            &proxy_addr,
            "transfers",
            &COUNT.to_string(),
            "200",
        ],
    );
    assert_idempotent_run(&mut producer, &broker, "transfers", COUNT).await;
    assert!(proxy.cuts() >= 5, "only {} connections cut", proxy.cuts());
}

// ---------------------------------------------------------------------------
// d. kcat

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_lists_produces_with_headers_and_consumes_from_an_offset_and_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, bs) = broker_with_topic(dir.path(), "kc", 2).await;

    let metadata = kcat(&["-b", &bs, "-L"], "");
    assert!(
        metadata.contains(&format!("broker 0 at {bs}")),
        "{metadata}"
    );
    assert!(
        metadata.contains("topic \"kc\" with 2 partitions:"),
        "{metadata}"
    );
    for p in 0..2 {
        assert!(
            metadata.contains(&format!("partition {p}, leader 0, replicas: 0, isrs: 0")),
            "{metadata}"
        );
    }

    let produce = |lines: &str| {
        kcat(
            &[
                "-P",
                "-b",
                &bs,
                "-t",
                "kc",
                "-p",
                "0",
                "-K:",
                "-H",
                "k=v",
                "-H",
                "source=kcat",
            ],
            lines,
        )
    };
    produce("alpha:one\nbeta:two\ngamma:three\n");
    std::thread::sleep(Duration::from_millis(50));
    let between = now_ms();
    std::thread::sleep(Duration::from_millis(50));
    produce("delta:four\nepsilon:five\n");

    let from_offset = kcat(
        &[
            "-C",
            "-b",
            &bs,
            "-t",
            "kc",
            "-p",
            "0",
            "-o",
            "1",
            "-e",
            "-q",
            "-f",
            "%o %k %s %h\n",
        ],
        "",
    );
    assert_eq!(
        from_offset.lines().collect::<Vec<_>>(),
        [
            "1 beta two k=v,source=kcat",
            "2 gamma three k=v,source=kcat",
            "3 delta four k=v,source=kcat",
            "4 epsilon five k=v,source=kcat",
        ],
        "{from_offset}"
    );
    let from_time = kcat(
        &[
            "-C",
            "-b",
            &bs,
            "-t",
            "kc",
            "-p",
            "0",
            "-o",
            &format!("s@{between}"),
            "-e",
            "-q",
            "-f",
            "%o %k %s\n",
        ],
        "",
    );
    assert_eq!(
        from_time.lines().collect::<Vec<_>>(),
        ["3 delta four", "4 epsilon five"],
        "{from_time}"
    );

    // The same records over gRPC.
    let records = read_grpc(&broker, "kc", &[0], 5).await;
    let got: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned(),
                String::from_utf8_lossy(&r.value).into_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("alpha", "one"),
            ("beta", "two"),
            ("gamma", "three"),
            ("delta", "four"),
            ("epsilon", "five")
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    for r in &records {
        assert_eq!(
            r.headers,
            [
                Header {
                    key: "k".into(),
                    value: Bytes::from_static(b"v")
                },
                Header {
                    key: "source".into(),
                    value: Bytes::from_static(b"kcat")
                },
            ]
        );
        assert_eq!(
            r.timestamp_ms < between,
            r.offset < 3,
            "offset {} at {}",
            r.offset,
            r.timestamp_ms
        );
    }
    assert_eq!(end_offsets(&broker, "kc").await, vec![5, 0]);
}

// ---------------------------------------------------------------------------
// e. Every codec: confluent-kafka compresses, kafka-python decompresses

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_produced_by_confluent_kafka_reads_back_in_kafka_python_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let bs = bootstrap(&broker);
    let admin = Admin::new(&ClientConfig::new(broker.url())).unwrap();
    // Repeated header names are the cross-protocol tests' business.
    let records = kafka_records(60, false, false);
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("codec-{codec}");
        admin.create_topic(&topic, 1).await.unwrap();
        let sent = run_script(
            "confluent_client.py",
            &["produce", &bs, &topic, codec],
            &json_lines(&records),
        );
        let sent = sent["sent"].as_array().unwrap();
        for (i, s) in sent.iter().enumerate() {
            assert_eq!(s["partition"], 0, "{codec}: {s}");
            assert_eq!(s["offset"], i, "{codec}: {s}");
            assert_eq!(
                s["timestamp_ms"], records[i]["timestamp_ms"],
                "{codec}: {s}"
            );
        }
        let expected: Vec<Value> = records
            .iter()
            .enumerate()
            .map(|(i, r)| with_offset(r, i as u64))
            .collect();

        let read = kafka_python(&[
            "read-raw",
            &bs,
            &topic,
            "0",
            "0",
            &records.len().to_string(),
        ]);
        assert_same_records(
            read["records"].as_array().unwrap(),
            &expected,
            &format!("{codec}: kafka-python"),
        );
        // From inside a (compressed) batch.
        let read = kafka_python(&["read-raw", &bs, &topic, "0", "37", "23"]);
        assert_same_records(
            read["records"].as_array().unwrap(),
            &expected[37..],
            &format!("{codec}: kafka-python from offset 37"),
        );

        let over_grpc: Vec<Value> = read_grpc(&broker, &topic, &[0], records.len())
            .await
            .iter()
            .map(grpc_record_json)
            .collect();
        assert_same_records(&over_grpc, &expected, &format!("{codec}: gRPC"));
    }
}

// ---------------------------------------------------------------------------
// f. Kafka to gRPC and gRPC to Kafka, byte for byte: keys null, empty and
// binary, binary values, headers (one name twice), timestamps

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_produced_over_kafka_read_over_grpc_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let bs = bootstrap(&broker);
    let admin = Admin::new(&ClientConfig::new(broker.url())).unwrap();

    // A Kafka null value reads as an empty value.
    admin.create_topic("from-kafka", 1).await.unwrap();
    let records = kafka_records(48, true, true);
    let sent = run_script(
        "kafka_python_client.py",
        &["produce-raw", &bs, "from-kafka"],
        &json_lines(&records),
    );
    for (i, s) in sent["sent"].as_array().unwrap().iter().enumerate() {
        assert_eq!(s, &json!({"partition": 0, "offset": i}));
    }
    let read: Vec<Value> = read_grpc(&broker, "from-kafka", &[0], records.len())
        .await
        .iter()
        .map(grpc_record_json)
        .collect();
    let expected: Vec<Value> = records
        .iter()
        .enumerate()
        .map(|(i, sent)| {
            let mut expected = with_offset(sent, i as u64);
            if expected["value"].is_null() {
                expected["value"] = "".into();
            }
            expected
        })
        .collect();
    assert_same_records(&read, &expected, "over gRPC");
    assert_eq!(
        end_offsets(&broker, "from-kafka").await,
        vec![records.len() as u64]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_produced_over_grpc_read_by_kafka_python_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let bs = bootstrap(&broker);
    let config = ClientConfig::new(broker.url());
    Admin::new(&config)
        .unwrap()
        .create_topic("from-grpc", 1)
        .await
        .unwrap();
    let producer = Producer::new(&config, ProducerConfig::default()).unwrap();
    let mut expected = Vec::new();
    for (i, r) in kafka_records(48, false, true).iter().enumerate() {
        let bytes = |v: &Value| v.as_str().map(|s| Bytes::from(B64.decode(s).unwrap()));
        let value = bytes(&r["value"]).unwrap();
        if value.is_empty() {
            // Sluice has no null value; what an empty one is over Kafka
            // (empty or null) is not this test's business.
            continue;
        }
        let mut record = Record::new(value)
            .with_partition(0)
            .with_timestamp(r["timestamp_ms"].as_i64().unwrap());
        if let Some(key) = bytes(&r["key"]) {
            record = record.with_key(key);
        }
        for h in r["headers"].as_array().unwrap() {
            record = record.with_header(h[0].as_str().unwrap(), bytes(&h[1]).unwrap());
        }
        let position = producer.send("from-grpc", record).await.unwrap();
        assert_eq!(position.offset, expected.len() as u64, "record {i}");
        expected.push(with_offset(r, position.offset));
    }
    producer.close().await.unwrap();
    let read = kafka_python(&[
        "read-raw",
        &bs,
        "from-grpc",
        "0",
        "0",
        &expected.len().to_string(),
    ]);
    assert_same_records(
        read["records"].as_array().unwrap(),
        &expected,
        "kafka-python",
    );
}

// ---------------------------------------------------------------------------
// g. Malformed frames

/// An ApiVersions v0 request, encoded by hand.
fn api_versions_request(correlation_id: i32) -> Vec<u8> {
    let client_id = b"sluice-raw-test";
    let mut body = Vec::new();
    body.extend(18i16.to_be_bytes()); // ApiVersions
    body.extend(0i16.to_be_bytes()); // v0
    body.extend(correlation_id.to_be_bytes());
    body.extend((client_id.len() as i16).to_be_bytes());
    body.extend(client_id);
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend(body);
    frame
}

/// Sends an ApiVersions v0 request on `stream` and reads its answer: the
/// API keys the broker supports, with their version ranges.
fn api_versions(stream: &mut TcpStream, correlation_id: i32) -> BTreeMap<i16, (i16, i16)> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(&api_versions_request(correlation_id))
        .unwrap();
    let mut size = [0u8; 4];
    stream
        .read_exact(&mut size)
        .expect("an ApiVersions response");
    let size = i32::from_be_bytes(size);
    assert!((10..1 << 20).contains(&size), "response size {size}");
    let mut body = vec![0u8; size as usize];
    stream.read_exact(&mut body).unwrap();
    let i16_at = |at: usize| i16::from_be_bytes([body[at], body[at + 1]]);
    let i32_at = |at: usize| i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
    assert_eq!(i32_at(0), correlation_id, "correlation id");
    assert_eq!(i16_at(4), 0, "error code");
    let count = i32_at(6);
    assert!((0..1000).contains(&count), "{count} API keys");
    (0..count as usize)
        .map(|i| {
            let at = 10 + i * 6;
            (i16_at(at), (i16_at(at + 2), i16_at(at + 4)))
        })
        .collect()
}

/// Fails unless the broker closes `stream` within `within` (read gives 0
/// or an error; bytes it sends first, an error response say, are read).
fn assert_closed_by_broker(what: &str, stream: &mut TcpStream, within: Duration) {
    let deadline = Instant::now() + within;
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut received = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => received += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return, // reset
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the broker kept the connection open {within:?} (it sent {received} bytes)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_their_connection_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let kafka: SocketAddr = broker.kafka_addr.unwrap();

    // A well-behaved connection, open through it all.
    let mut good = TcpStream::connect(kafka).unwrap();
    let apis = api_versions(&mut good, 1);
    // Every API the listener promises, by key.
    for (key, name) in [
        (0, "Produce"),
        (1, "Fetch"),
        (2, "ListOffsets"),
        (3, "Metadata"),
        (8, "OffsetCommit"),
        (9, "OffsetFetch"),
        (10, "FindCoordinator"),
        (11, "JoinGroup"),
        (12, "Heartbeat"),
        (13, "LeaveGroup"),
        (14, "SyncGroup"),
        (15, "DescribeGroups"),
        (16, "ListGroups"),
        (18, "ApiVersions"),
        (19, "CreateTopics"),
        (20, "DeleteTopics"),
        (22, "InitProducerId"),
        (32, "DescribeConfigs"),
        (60, "DescribeCluster"),
    ] {
        let (min, max) = apis
            .get(&key)
            .unwrap_or_else(|| panic!("ApiVersions lacks {name} ({key}): {apis:?}"));
        assert!(min <= max, "{name}: {min}..{max}");
    }

    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let frame = |body: &[u8]| {
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend(body);
        frame
    };
    // A request header of key, version, correlation id and client id.
    let header = |key: i16, version: i16| {
        let mut h = Vec::new();
        h.extend(key.to_be_bytes());
        h.extend(version.to_be_bytes());
        h.extend(77i32.to_be_bytes());
        h.extend(4i16.to_be_bytes());
        h.extend(b"evil");
        h
    };

    // (what, bytes to send, then half-close our side?)
    let mut cases: Vec<(&str, Vec<u8>, bool)> = Vec::new();
    cases.push(("random bytes", random(1024), true));
    let mut unknown = header(0x4242, 0);
    unknown.extend(random(50));
    cases.push(("a frame of an unknown API key", frame(&unknown), false));
    let mut produce = header(0, 9);
    produce.push(0); // no tagged fields in the (flexible) header
    produce.extend([0xff; 40]);
    cases.push((
        "a Produce v9 request with an undecodable body",
        frame(&produce),
        false,
    ));
    let mut truncated = 100i32.to_be_bytes().to_vec();
    truncated.extend(&api_versions_request(5)[4..]);
    cases.push(("a truncated frame, then the socket closed", truncated, true));
    let mut oversized = 0x7fff_ffffi32.to_be_bytes().to_vec();
    oversized.extend(random(64));
    cases.push(("a size prefix of 0x7fffffff", oversized, false));
    let mut negative = (-1i32).to_be_bytes().to_vec();
    negative.extend(random(16));
    cases.push(("a negative size prefix", negative, false));

    let mut bad: Vec<(&str, TcpStream)> = Vec::new();
    for (what, bytes, half_close) in &cases {
        let mut stream = TcpStream::connect(kafka).unwrap();
        // The broker may hang up before everything is written.
        let _ = stream.write_all(bytes);
        if *half_close {
            let _ = stream.shutdown(Shutdown::Write);
        }
        bad.push((*what, stream));
    }
    for (what, stream) in &mut bad {
        assert_closed_by_broker(what, stream, Duration::from_secs(5));
    }

    // The good connection and a new one still work; so does gRPC.
    assert_eq!(api_versions(&mut good, 2), apis);
    let mut fresh = TcpStream::connect(kafka).unwrap();
    assert_eq!(api_versions(&mut fresh, 3), apis);
    let admin = Admin::new(&ClientConfig::new(broker.url())).unwrap();
    admin.create_topic("still-here", 1).await.unwrap();
    let created = kafka_python(&[
        "produce-json",
        &kafka.to_string(),
        "still-here",
        "3",
        "1",
        "0",
    ]);
    assert_eq!(created["sent"].as_array().unwrap().len(), 3);
    assert_eq!(end_offsets(&broker, "still-here").await, vec![3]);
}

/// A group id speaks one protocol at a time: while a gRPC member is live a
/// Kafka consumer's join is refused (INCONSISTENT_GROUP_PROTOCOL, which
/// kafka-python raises), and while a Kafka member is live a gRPC member's
/// join is refused (FAILED_PRECONDITION naming the Kafka consumers). Once
/// the other protocol's members are gone, the group id is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_id_is_used_by_one_protocol_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let bs = bootstrap(&broker);
    let config = ClientConfig::new(broker.url());
    Admin::new(&config)
        .unwrap()
        .create_topic("shared-topic", 2)
        .await
        .unwrap();

    // A gRPC member, live (it holds its partitions once it has joined).
    let mut grpc_member =
        GroupConsumer::new(&config, GroupConfig::new("shared", ["shared-topic"])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while grpc_member.assignment().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the gRPC member never got partitions"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), grpc_member.next()).await;
    }
    let refused = kafka_python(&["join-refused", &bs, "shared-topic", "shared", "10"]);
    assert_eq!(
        refused["error"], "InconsistentGroupProtocolError",
        "a Kafka join while a gRPC member is live: {refused}"
    );
    grpc_member.close().await.unwrap();

    // The id is free: a Kafka member joins and stays.
    let mut kafka_member = Running::spawn(
        "kafka member",
        "kafka_python_client.py",
        &[
            "group-member",
            &bs,
            "shared-topic",
            "shared",
            "k1",
            "0",
            "1",
        ],
    );
    kafka_member.wait_for("assigned", Duration::from_secs(30), |events| {
        events.iter().any(|e| e["event"] == "assigned")
    });
    let mut late =
        GroupConsumer::new(&config, GroupConfig::new("shared", ["shared-topic"])).unwrap();
    let error = tokio::time::timeout(Duration::from_secs(15), late.next())
        .await
        .expect("the refusal reaches the gRPC member")
        .expect_err("a gRPC join while a Kafka member is live is refused");
    let message = error.to_string();
    assert!(
        message.contains("Kafka consumer"),
        "the refusal names the other protocol: {message}"
    );
    let described = sluice(&broker, &["group", "describe", "shared"]);
    assert!(
        described.contains("1 member(s)"),
        "the Kafka member shows in `sluice group describe`:\n{described}"
    );
    kafka_member.finish(Duration::from_secs(20));
}

/// With authentication required, the Kafka listener (which cannot
/// authenticate anyone yet) serves the anonymous principal held to the
/// rules, never a superuser: without a rule kcat sees no topic and cannot
/// write; a rule for `anonymous` lets it write that topic and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_required_kafka_callers_get_only_what_rules_grant_anonymous() {
    use sluice_client::security::{
        Operation, PatternType, Permission, ResourceType, SecurityAdmin, acl_rule,
    };
    const TOKEN: &str = "bootstrap-token-for-kafka-tests-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_env(
        &broker_binary(),
        dir.path(),
        &["--auth", "required", "--kafka-listen", "127.0.0.1:0"],
        &[("SLUICE_BOOTSTRAP_TOKEN", TOKEN)],
    );
    let bs = bootstrap(&broker);
    let root = ClientConfig::new(broker.url()).with_token(TOKEN);
    let admin = Admin::new(&root).unwrap();
    admin.create_topic("open", 1).await.unwrap();
    admin.create_topic("closed", 1).await.unwrap();

    let listed = kcat(&["-b", &bs, "-L"], "");
    assert!(
        !listed.contains("\"open\"") && !listed.contains("\"closed\""),
        "no topic is visible without a rule:\n{listed}"
    );
    let produce = |topic: &str| {
        try_kcat(
            &[
                "-b",
                &bs,
                "-P",
                "-t",
                topic,
                "-X",
                "message.timeout.ms=5000",
            ],
            "denied\n",
        )
    };
    let denied = produce("open");
    let said = String::from_utf8_lossy(&denied.stderr).to_lowercase();
    assert!(
        !denied.status.success() || said.contains("authoriz"),
        "a write without a rule fails:\n{said}"
    );
    assert_eq!(
        end_offsets_as(&root, "open").await,
        vec![0],
        "nothing was written"
    );

    let security = SecurityAdmin::new(&root).unwrap();
    for operation in [Operation::Write, Operation::Describe] {
        security
            .add_acl(acl_rule(
                "anonymous",
                ResourceType::Topic,
                "open",
                PatternType::Literal,
                operation,
                Permission::Allow,
            ))
            .await
            .unwrap();
    }
    let allowed = produce("open");
    assert!(
        allowed.status.success(),
        "a write the rule allows succeeds:\n{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert_eq!(end_offsets_as(&root, "open").await, vec![1]);
    let still_denied = produce("closed");
    assert!(
        !still_denied.status.success()
            || String::from_utf8_lossy(&still_denied.stderr)
                .to_lowercase()
                .contains("authoriz"),
        "the rule covers one topic only"
    );
    assert_eq!(end_offsets_as(&root, "closed").await, vec![0]);
}

/// Answers a raw frame on `stream`: the response body after the
/// correlation id (which must be `correlation_id`).
fn raw_exchange(stream: &mut TcpStream, body: &[u8], correlation_id: i32) -> Vec<u8> {
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend(body);
    stream.write_all(&frame).unwrap();
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).expect("an answer");
    let mut answer = vec![0u8; i32::from_be_bytes(size) as usize];
    stream.read_exact(&mut answer).unwrap();
    assert_eq!(
        i32::from_be_bytes(answer[..4].try_into().unwrap()),
        correlation_id
    );
    answer[4..].to_vec()
}

/// The errors a client understands, on a connection that stays open: an
/// ApiVersions in a version not served is answered in version 0 with
/// UNSUPPORTED_VERSION (35) and the versions served (KIP-511); a JoinGroup
/// in a version not served gets UNSUPPORTED_VERSION; a Heartbeat whose body
/// does not decode gets INVALID_REQUEST (42). Nothing is closed: the same
/// connection then gets a normal ApiVersions answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_versions_and_malformed_bodies_get_kafka_error_codes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path());
    let mut stream = TcpStream::connect(broker.kafka_addr.unwrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let header = |key: i16, version: i16, correlation_id: i32, flexible: bool| {
        let mut h = Vec::new();
        h.extend(key.to_be_bytes());
        h.extend(version.to_be_bytes());
        h.extend(correlation_id.to_be_bytes());
        h.extend(4i16.to_be_bytes());
        h.extend(b"test");
        if flexible {
            h.push(0); // no tagged fields
        }
        h
    };

    // ApiVersions v9: answered in v0, error 35, with the list.
    let answer = raw_exchange(&mut stream, &header(18, 9, 11, true), 11);
    assert_eq!(i16::from_be_bytes([answer[0], answer[1]]), 35);
    let count = i32::from_be_bytes(answer[2..6].try_into().unwrap());
    assert_eq!(count, 19, "every API served is listed");

    // JoinGroup v8 (flexible; 0-7 are served): error 35 in a v8 answer,
    // after its header's tagged fields and the throttle time.
    let answer = raw_exchange(&mut stream, &header(11, 8, 12, true), 12);
    assert_eq!(answer[0], 0, "no tagged fields in the response header");
    assert_eq!(i16::from_be_bytes([answer[5], answer[6]]), 35);

    // Heartbeat v0 whose group id claims more bytes than follow: 42.
    let mut heartbeat = header(12, 0, 13, false);
    heartbeat.extend(200i16.to_be_bytes());
    heartbeat.extend(b"short");
    let answer = raw_exchange(&mut stream, &heartbeat, 13);
    assert_eq!(i16::from_be_bytes([answer[0], answer[1]]), 42);

    // The connection is still good.
    let apis = api_versions(&mut stream, 14);
    assert_eq!(apis.len(), 19);
}

/// A produce with acks 0 gets no answer. When it is refused, the broker
/// closes the connection, as Kafka's do, since the client reads nothing
/// else; when it is written, the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acks_0_produce_is_written_or_closes_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, bs) = broker_with_topic(dir.path(), "fire-and-forget", 1).await;
    kcat(
        &[
            "-b",
            &bs,
            "-P",
            "-t",
            "fire-and-forget",
            "-X",
            "request.required.acks=0",
        ],
        "one\ntwo\nthree\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while end_offsets(&broker, "fire-and-forget").await != vec![3] {
        assert!(Instant::now() < deadline, "acks 0 records were not written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Produce v3, acks 0, to a topic that does not exist (records null).
    let mut body = Vec::new();
    body.extend(0i16.to_be_bytes()); // Produce
    body.extend(3i16.to_be_bytes());
    body.extend(21i32.to_be_bytes());
    body.extend((-1i16).to_be_bytes()); // no client id
    body.extend((-1i16).to_be_bytes()); // no transactional id
    body.extend(0i16.to_be_bytes()); // acks 0
    body.extend(1000i32.to_be_bytes());
    body.extend(1i32.to_be_bytes()); // one topic
    body.extend(4i16.to_be_bytes());
    body.extend(b"nope");
    body.extend(1i32.to_be_bytes()); // one partition
    body.extend(0i32.to_be_bytes());
    body.extend((-1i32).to_be_bytes()); // null records
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend(body);
    let mut stream = TcpStream::connect(broker.kafka_addr.unwrap()).unwrap();
    stream.write_all(&frame).unwrap();
    assert_closed_by_broker(
        "a refused acks 0 produce",
        &mut stream,
        Duration::from_secs(5),
    );
}
