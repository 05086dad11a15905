//! One format across languages: what the Rust client sends as encoded
//! (and compressed) batches reads back in Python, over the protobuf records
//! path and with the standalone batch reader written from docs/FORMAT.md
//! (`tests/python/sluice_batches.py`); and records a Python client sends as
//! protobuf `Record`s read back through the Rust client's batch path.
//!
//! Every comparison is byte for byte: key (null and empty kept apart),
//! value, headers in order, timestamp and offset.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::{Value, json};
use sluice_client::{
    Admin, ClientConfig, Compression, ConsumedRecord, Consumer, Producer, ProducerConfig, Record,
    StartFrom,
};
use sluice_format::{BatchBuilder, Header, ProducerInfo};
use sluice_testkit::{Broker, broker_binary};

mod common;
use common::{run_with_stdin, take};

/// The Python to run: `SLUICE_PYTHON` (scripts/test.sh points it at a
/// virtual environment with the pinned packages), else `python3`.
fn python() -> String {
    std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs one of tests/python's scripts; its standard output as JSON.
fn run_python(script: &str, args: &[String], stdin: &str) -> Value {
    let (ok, stdout, stderr) = try_python(script, args, stdin);
    assert!(ok, "{script} {args:?} failed:\n{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{script}: {e}: {stdout}"))
}

fn try_python(script: &str, args: &[String], stdin: &str) -> (bool, String, String) {
    let mut command = Command::new(python());
    command
        .arg(root().join("tests/python").join(script))
        .args(args)
        .env("PYTHONPATH", root().join("tests/python"));
    let output = run_with_stdin(command, stdin);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Records that exercise every corner of the record encoding: keys null,
/// empty and present, several headers with empty and binary values,
/// timestamps before and after the first, and compressible JSON values
/// with some binary ones.
fn varied_records(count: usize) -> Vec<Record> {
    (0..count)
        .map(|i| {
            let value = if i % 7 == 3 {
                Bytes::from((0..=255u8).cycle().skip(i).take(300).collect::<Vec<u8>>())
            } else {
                Bytes::from(format!(
                    "{{\"order\":{i},\"customer\":\"c-{}\",\"items\":[\"tea\",\"cups\"],\"note\":\"leave it at the door\"}}",
                    i % 13
                ))
            };
            let mut record = Record::new(value).with_timestamp(1_700_000_000_000 + (i as i64 % 5) * 997 - 1_500);
            match i % 3 {
                0 => record = record.with_key(format!("key-{}", i % 11)),
                1 => record = record.with_key(Bytes::new()),
                _ => {}
            }
            if i % 2 == 0 {
                record = record
                    .with_header("source", "rust")
                    .with_header("empty", Bytes::new())
                    .with_header("bin", Bytes::from_static(b"\x00\xff\x80"));
            }
            record.with_partition(0)
        })
        .collect()
}

/// A record as the Python scripts print it.
fn record_json(
    offset: u64,
    key: Option<&[u8]>,
    value: &[u8],
    headers: &[Header],
    timestamp_ms: i64,
) -> Value {
    json!({
        "offset": offset,
        "key": key.map(|k| B64.encode(k)),
        "value": B64.encode(value),
        "headers": headers.iter().map(|h| json!({"key": h.key, "value": B64.encode(&h.value)})).collect::<Vec<_>>(),
        "timestamp_ms": timestamp_ms,
    })
}

async fn read_all(config: &ClientConfig, topic: &str, count: usize) -> Vec<ConsumedRecord> {
    let mut consumer = Consumer::new(config).unwrap();
    consumer
        .assign(topic, &[0], StartFrom::Earliest)
        .await
        .unwrap();
    take(&mut consumer, count).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_the_rust_client_sends_read_back_in_python_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    let records = varied_records(300);
    for codec in Compression::ALL {
        let topic = format!("from-rust-{codec}");
        admin.create_topic(&topic, 1).await.unwrap();
        let producer = Producer::new(
            &config,
            ProducerConfig {
                compression: codec,
                ..ProducerConfig::default()
            },
        )
        .unwrap();
        // The idempotent batching path, flushed every 100 records: three
        // batches at the least.
        let mut expected = Vec::new();
        for chunk in records.chunks(100) {
            let mut deliveries = Vec::new();
            for record in chunk {
                deliveries.push(producer.enqueue(&topic, record.clone()).await.unwrap());
            }
            producer.flush().await.unwrap();
            for (record, delivery) in chunk.iter().zip(deliveries) {
                let position = delivery.await.unwrap();
                assert_eq!(position.partition, 0);
                expected.push(record_json(
                    position.offset,
                    record.key.as_deref(),
                    &record.value,
                    &record.headers,
                    record.timestamp_ms,
                ));
            }
        }
        producer.close().await.unwrap();

        let address = broker.addr.to_string();
        let proto = root().join("proto").display().to_string();
        let args = |mode: Option<&str>, offset: u64| {
            let mut args: Vec<String> = mode.map(str::to_owned).into_iter().collect();
            args.extend([
                address.clone(),
                proto.clone(),
                topic.clone(),
                "0".into(),
                offset.to_string(),
            ]);
            args
        };
        let via_records = run_python("sluice_interop.py", &args(Some("fetch"), 0), "");
        assert_eq!(
            via_records["records"].as_array().unwrap(),
            &expected,
            "{codec}: records path"
        );

        let via_batches = run_python("sluice_batches.py", &args(None, 0), "");
        assert_eq!(
            via_batches["records"].as_array().unwrap(),
            &expected,
            "{codec}: batch reader"
        );
        let batches = via_batches["batches"].as_array().unwrap();
        assert!(batches.len() >= 3, "{codec}: {} batches", batches.len());
        // The producer compresses what gets smaller; these JSON values do.
        assert!(
            batches.iter().all(|b| b["compression"] == codec.name()),
            "{codec}: the stored batches' codecs: {batches:?}"
        );

        // From an offset inside a batch: its earlier records are skipped.
        let via_batches = run_python("sluice_batches.py", &args(None, 150), "");
        assert_eq!(
            via_batches["records"].as_array().unwrap(),
            &expected[150..],
            "{codec}: batch reader from 150"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_python_client_sends_read_back_through_rust_batches() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    let records = varied_records(250);
    for topic in ["from-python", "from-python-zstd"] {
        if topic.ends_with("zstd") {
            // A topic that recompresses: the broker encodes the Python
            // records into zstd batches, which Rust decodes.
            let settings = sluice_client::TopicSettings {
                partitions: Some(1),
                compression: Some("zstd".into()),
                ..Default::default()
            };
            admin.create_topic_with(topic, settings).await.unwrap();
        } else {
            admin.create_topic(topic, 1).await.unwrap();
        }
        let lines: String = records
            .iter()
            .map(|r| {
                let mut line =
                    record_json(0, r.key.as_deref(), &r.value, &r.headers, r.timestamp_ms);
                line.as_object_mut().unwrap().remove("offset");
                format!("{line}\n")
            })
            .collect();
        let args: Vec<String> = vec![
            "produce".into(),
            broker.addr.to_string(),
            root().join("proto").display().to_string(),
            topic.into(),
            "0".into(),
        ];
        let produced = run_python("sluice_interop.py", &args, &lines);
        assert_eq!(produced, json!({"base_offset": 0, "count": records.len()}));

        let read = read_all(&config, topic, records.len()).await;
        for (i, (sent, got)) in records.iter().zip(&read).enumerate() {
            assert_eq!(got.offset, i as u64, "{topic}");
            assert_eq!(got.key, sent.key, "{topic} offset {i}");
            assert_eq!(got.value, sent.value, "{topic} offset {i}");
            assert_eq!(got.headers, sent.headers, "{topic} offset {i}");
            assert_eq!(got.timestamp_ms, sent.timestamp_ms, "{topic} offset {i}");
        }
    }
}

/// The Python batch reader against the codec alone, no broker: every
/// codec, and a damaged batch refused by its checksum.
#[test]
fn the_python_batch_reader_decodes_what_the_format_encodes() {
    let records: Vec<sluice_format::Record> = varied_records(40)
        .into_iter()
        .map(|r| sluice_format::Record {
            key: r.key,
            value: r.value,
            headers: r.headers,
            timestamp: r.timestamp_ms,
        })
        .collect();
    let producer = ProducerInfo {
        producer_id: 7,
        epoch: 2,
        base_sequence: 40,
    };
    for codec in Compression::ALL {
        let batch = BatchBuilder::encode_compressed(&records, producer, codec);
        let stored = sluice_format::batch::stamped_copy(&batch, 1_000);
        let hex: String = stored.iter().map(|b| format!("{b:02x}")).collect();
        let decoded = run_python("sluice_batches.py", &["decode".into(), "1010".into()], &hex);
        let header = &decoded["batches"][0];
        assert_eq!(header["base_offset"], 1_000, "{codec}");
        assert_eq!(header["record_count"], 40, "{codec}");
        assert_eq!(header["compression"], codec.name(), "{codec}");
        assert_eq!(header["producer_id"], 7, "{codec}");
        assert_eq!(header["producer_epoch"], 2, "{codec}");
        assert_eq!(header["base_sequence"], 40, "{codec}");
        assert_eq!(
            header["max_timestamp"],
            records.iter().map(|r| r.timestamp).max().unwrap(),
            "{codec}"
        );
        let expected: Vec<Value> = records
            .iter()
            .enumerate()
            .skip(10)
            .map(|(i, r)| {
                record_json(
                    1_000 + i as u64,
                    r.key.as_deref(),
                    &r.value,
                    &r.headers,
                    r.timestamp,
                )
            })
            .collect();
        assert_eq!(decoded["records"].as_array().unwrap(), &expected, "{codec}");

        // One flipped bit in the records section: the checksum says so.
        let mut damaged = stored.to_vec();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x01;
        let hex: String = damaged.iter().map(|b| format!("{b:02x}")).collect();
        let (ok, _, stderr) = try_python("sluice_batches.py", &["decode".into(), "0".into()], &hex);
        assert!(!ok, "{codec}: a damaged batch was decoded");
        assert!(stderr.contains("checksum"), "{codec}: {stderr}");
    }
}
