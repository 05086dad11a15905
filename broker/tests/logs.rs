//! Log lines of the real broker binary: `--log-format json` writes one JSON
//! object per line, and a call's lines carry its span's request id, peer,
//! method, principal, and the trace context of a `traceparent` it sent.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sluice_proto::v1::{self, produce_service_client::ProduceServiceClient};

/// The broker, started on free ports with JSON logs; its stdout lines.
struct JsonBroker {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    url: String,
}

impl Drop for JsonBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &std::path::Path) -> JsonBroker {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-broker"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "false",
            "--log-format",
            "json",
        ])
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    // Owned at once, so that a failed start still kills and reaps it.
    let mut broker = JsonBroker {
        child,
        lines,
        url: String::new(),
    };
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = broker
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the broker starts");
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        if event["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("listening on"))
        {
            let address = event["fields"]["address"].as_str().unwrap();
            broker.url = format!("http://{address}");
            return broker;
        }
    }
}

/// The next line whose message is `message`, parsed; every line on the way
/// must be JSON too.
fn wait_for(broker: &JsonBroker, message: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = broker
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no line {message:?}"));
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        if event["fields"]["message"] == message {
            return event;
        }
    }
}

#[tokio::test]
async fn json_lines_carry_the_request_span_and_the_callers_trace() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let mut producer = ProduceServiceClient::connect(broker.url.clone())
        .await
        .unwrap();
    let mut request = tonic::Request::new(v1::InitProducerRequest {
        name: Some("billing".into()),
    });
    request.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    producer.init_producer(request).await.unwrap();
    let event = wait_for(&broker, "producer initialised");
    assert_eq!(event["level"], "INFO");
    assert!(event["timestamp"].is_string());
    let span = event["spans"]
        .as_array()
        .and_then(|spans| spans.iter().find(|s| s["name"] == "grpc"))
        .unwrap_or_else(|| panic!("no request span: {event}"));
    assert_eq!(span["path"], "/sluice.v1.ProduceService/InitProducer");
    assert!(
        span["request_id"].as_u64().is_some_and(|id| id > 0),
        "{span}"
    );
    assert!(
        span["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{span}"
    );
    // Authentication records who called (with --auth off, everyone is
    // the anonymous superuser).
    assert_eq!(span["principal"], "anonymous", "{span}");
    // The caller's trace: its trace id, and its span as the parent.
    assert_eq!(span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(span["parent_span_id"], "00f067aa0ba902b7");

    // A second call gets another request id, and no trace of its own.
    producer
        .init_producer(v1::InitProducerRequest { name: None })
        .await
        .unwrap();
    let second = wait_for(&broker, "producer initialised");
    let second_span = second["spans"]
        .as_array()
        .and_then(|spans| spans.iter().find(|s| s["name"] == "grpc"))
        .unwrap();
    assert_ne!(second_span["request_id"], span["request_id"]);
    assert!(second_span.get("trace_id").is_none(), "{second_span}");
}
