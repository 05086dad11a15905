//! The `sluice` command line against the real broker.

use std::io::Write;
use std::process::{Command, Stdio};

use sluice_testkit::{Broker, broker_binary};

fn sluice(broker: &Broker, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--broker")
        .arg(broker.url())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn produce_lines_from_stdin_and_consume_them_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let (ok, out, err) = sluice(
        &broker,
        &["topic", "create", "clicks", "--partitions", "2"],
        None,
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("created clicks") && out.contains("partitions=2"),
        "{out}"
    );

    let lines: String = (0..50)
        .map(|i| format!("user-{}|click {i}\n", i % 3))
        .collect();
    let (ok, _, err) = sluice(
        &broker,
        &[
            "produce",
            "clicks",
            "--key-separator",
            "|",
            "--header",
            "source=cli",
        ],
        Some(&lines),
    );
    assert!(ok, "{err}");
    assert!(err.contains("50 record(s) produced"), "{err}");

    let (ok, out, err) = sluice(&broker, &["consume", "clicks", "--format", "json"], None);
    assert!(ok, "{err}");
    let records: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 50);
    for user in 0..3 {
        let key = format!("user-{user}");
        let values: Vec<&str> = records
            .iter()
            .filter(|r| r["key"] == key.as_str())
            .map(|r| r["value"].as_str().unwrap())
            .collect();
        let expected: Vec<String> = (0..50)
            .filter(|i| i % 3 == user)
            .map(|i| format!("click {i}"))
            .collect();
        assert_eq!(values, expected, "{key} in order");
    }
    assert!(
        records
            .iter()
            .all(|r| r["headers"]["source"] == "cli" && r["topic"] == "clicks")
    );

    // Reading from an offset, with a limit, as text.
    let (ok, out, _) = sluice(
        &broker,
        &[
            "consume",
            "clicks",
            "--partition",
            "0",
            "--from",
            "offset:1",
            "--max",
            "2",
        ],
        None,
    );
    assert!(ok);
    let first = out.lines().next().unwrap();
    assert!(first.starts_with("0/1\t"), "{out}");
    assert_eq!(out.lines().count(), 2);

    let (ok, out, _) = sluice(&broker, &["topic", "describe", "clicks"], None);
    assert!(ok);
    assert!(out.contains("partition\tearliest\tlatest"), "{out}");
    let (ok, out, _) = sluice(&broker, &["offsets", "clicks"], None);
    assert!(ok);
    let total: u64 = out
        .lines()
        .map(|l| l.split('\t').nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 50);
    let (ok, out, _) = sluice(&broker, &["topic", "list"], None);
    assert!(ok && out.trim() == "clicks", "{out}");
}

#[test]
fn errors_are_reported_with_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let (ok, _, err) = sluice(&broker, &["topic", "describe", "missing"], None);
    assert!(!ok);
    assert!(
        err.contains("not found") && err.contains("missing"),
        "{err}"
    );
    let (ok, _, err) = sluice(&broker, &["consume", "x", "--from", "sometime"], None);
    assert!(!ok);
    assert!(err.contains("expected earliest"), "{err}");
    let (ok, _, err) = sluice(&broker, &["topic", "create", "bad name"], None);
    assert!(!ok);
    assert!(err.contains("invalid topic name"), "{err}");
}

#[test]
fn topic_compression_is_set_shown_and_altered_and_produce_compresses() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let settings_line = |out: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with("partitions="))
            .unwrap_or_else(|| panic!("no settings line in {out}"))
            .to_owned()
    };

    // The broker's default keeps each producer's codec.
    let (ok, out, err) = sluice(
        &broker,
        &["topic", "create", "as-sent", "--partitions", "1"],
        None,
    );
    assert!(ok, "{err}");
    assert!(
        settings_line(&out).ends_with(" compression=producer"),
        "{out}"
    );

    let (ok, out, err) = sluice(
        &broker,
        &[
            "topic",
            "create",
            "forced",
            "--partitions",
            "1",
            "--compression",
            "zstd",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(settings_line(&out).ends_with(" compression=zstd"), "{out}");
    let (ok, out, err) = sluice(&broker, &["topic", "describe", "forced"], None);
    assert!(ok, "{err}");
    assert!(settings_line(&out).ends_with(" compression=zstd"), "{out}");

    let (ok, out, err) = sluice(
        &broker,
        &["topic", "alter", "forced", "--compression", "lz4"],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.contains("altered forced"), "{out}");
    assert!(settings_line(&out).ends_with(" compression=lz4"), "{out}");
    let (ok, out, _) = sluice(&broker, &["topic", "describe", "forced"], None);
    assert!(ok);
    assert!(settings_line(&out).ends_with(" compression=lz4"), "{out}");
    // Altering something else keeps the codec.
    let (ok, out, err) = sluice(
        &broker,
        &["topic", "alter", "forced", "--retention-ms", "60000"],
        None,
    );
    assert!(ok, "{err}");
    assert!(settings_line(&out).ends_with(" compression=lz4"), "{out}");

    let (ok, _, err) = sluice(
        &broker,
        &["topic", "create", "bad", "--compression", "gzip"],
        None,
    );
    assert!(!ok);
    assert!(err.contains("gzip") && err.contains("zstd"), "{err}");

    // Records a producer compressed read back as they were sent, from a
    // topic that keeps the producer's codec and one that recompresses.
    let lines: String = (0..40)
        .map(|i| format!("{{\"order\":{i},\"note\":\"leave it at the door\"}}\n"))
        .collect();
    for (topic, codec) in [("as-sent", "zstd"), ("forced", "lz4"), ("as-sent", "none")] {
        let (ok, _, err) = sluice(
            &broker,
            &["produce", topic, "--compression", codec],
            Some(&lines),
        );
        assert!(ok, "{topic} {codec}: {err}");
        assert!(err.contains("40 record(s) produced"), "{err}");
    }
    let (ok, _, err) = sluice(
        &broker,
        &["produce", "as-sent", "--compression", "gzip"],
        Some(&lines),
    );
    assert!(!ok);
    assert!(err.contains("expected none, lz4 or zstd"), "{err}");
    for (topic, copies) in [("as-sent", 2), ("forced", 1)] {
        let (ok, out, err) = sluice(&broker, &["consume", topic, "--format", "json"], None);
        assert!(ok, "{err}");
        let values: Vec<String> = out
            .lines()
            .map(|l| {
                let record: serde_json::Value = serde_json::from_str(l).unwrap();
                record["value"].as_str().unwrap().to_owned()
            })
            .collect();
        let expected: Vec<String> = (0..copies)
            .flat_map(|_| lines.lines().map(str::to_owned))
            .collect();
        assert_eq!(values, expected, "{topic}");
    }
}

#[test]
fn groups_consume_list_describe_and_reset_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let (ok, _, err) = sluice(
        &broker,
        &["topic", "create", "jobs", "--partitions", "2"],
        None,
    );
    assert!(ok, "{err}");
    let lines: String = (0..40).map(|i| format!("k{}|job {i}\n", i % 4)).collect();
    let (ok, _, err) = sluice(
        &broker,
        &["produce", "jobs", "--key-separator", "|"],
        Some(&lines),
    );
    assert!(ok, "{err}");

    // Read 25 as a group member; they are committed when it stops.
    let (ok, out, err) = sluice(
        &broker,
        &["consume", "jobs", "--group", "workers", "--max", "25"],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 25, "{out}");

    let (ok, out, err) = sluice(&broker, &["group", "list"], None);
    assert!(ok, "{err}");
    assert!(out.contains("workers\t0\t15\t"), "{out}");

    let (ok, out, err) = sluice(&broker, &["group", "describe", "workers"], None);
    assert!(ok, "{err}");
    assert!(out.contains("workers: 0 member(s), lag 15"), "{out}");
    assert_eq!(
        out.matches("  jobs\t").count(),
        2,
        "one row a partition: {out}"
    );

    // A dry run by default: shows the plan, changes nothing.
    let (ok, out, err) = sluice(
        &broker,
        &[
            "group",
            "reset-offsets",
            "workers",
            "--topic",
            "jobs",
            "--to",
            "earliest",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.contains("dry run: nothing changed"), "{out}");
    let (_, out, _) = sluice(&broker, &["group", "list"], None);
    assert!(out.contains("workers\t0\t15\t"), "{out}");

    let (ok, out, err) = sluice(
        &broker,
        &[
            "group",
            "reset-offsets",
            "workers",
            "--topic",
            "jobs",
            "--to",
            "earliest",
            "--execute",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.contains("reset 2 partition(s)"), "{out}");
    let (_, out, _) = sluice(&broker, &["group", "list"], None);
    assert!(out.contains("workers\t0\t40\t"), "{out}");

    let (ok, _, err) = sluice(&broker, &["group", "describe", "nobody"], None);
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_settings_and_redrive_from_the_command_line() {
    use sluice_client::{ClientConfig, GroupConfig, GroupConsumer};
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let (ok, _, err) = sluice(&broker, &["topic", "create", "jobs"], None);
    assert!(ok, "{err}");
    let (ok, out, err) = sluice(
        &broker,
        &[
            "dlq",
            "settings",
            "crew",
            "--topic",
            "jobs",
            "--max-deliveries",
            "1",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("max_deliveries=1 retry_backoff_ms=1000"),
        "{out}"
    );
    let (ok, _, err) = sluice(&broker, &["produce", "jobs"], Some("good\nbad\n"));
    assert!(ok, "{err}");

    let config = ClientConfig::new(broker.url());
    let mut consumer = GroupConsumer::new(&config, GroupConfig::new("crew", ["jobs"])).unwrap();
    for _ in 0..2 {
        let record = consumer.next().await.unwrap();
        if &record.value[..] == b"bad" {
            assert!(consumer.nack(&record, "broken", "test").await.unwrap());
        }
    }
    consumer.close().await.unwrap();

    let (ok, out, err) = sluice(
        &broker,
        &["dlq", "redrive", "jobs.crew.dlq", "--dry-run"],
        None,
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("jobs/0/1\nwould redrive 1 dead letter(s)"),
        "{out}"
    );
    let (ok, out, err) = sluice(&broker, &["dlq", "redrive", "jobs.crew.dlq"], None);
    assert!(ok, "{err}");
    assert!(out.contains("redrove 1 dead letter(s)"), "{out}");
    let (ok, out, _) = sluice(&broker, &["group", "describe", "crew"], None);
    assert!(ok);
    assert!(
        out.contains("jobs: 1 retry(ies) pending, 1 dead letter(s) in jobs.crew.dlq"),
        "{out}"
    );
    // Not twice by accident.
    let (ok, _, err) = sluice(
        &broker,
        &["dlq", "redrive", "jobs.crew.dlq", "--from", "0"],
        None,
    );
    assert!(!ok);
    assert!(err.contains("already redriven"), "{err}");
}

/// Users, tokens and rules from the command line, against a broker with
/// authentication required.
#[test]
fn users_tokens_and_acls_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = "cli-bootstrap-token-0123456789abcdef";
    let broker = Broker::start_with_env(
        &broker_binary(),
        dir.path(),
        &["--auth", "required"],
        &[("SLUICE_BOOTSTRAP_TOKEN", bootstrap)],
    );
    let root = |args: &[&str]| {
        let mut all = vec!["--token", bootstrap];
        all.extend_from_slice(args);
        sluice(&broker, &all, None)
    };
    let (ok, out, err) = root(&["whoami"]);
    assert!(
        ok && out.starts_with("admin\tsuperuser=true\tauthenticated_by=token"),
        "{out}{err}"
    );
    let (ok, _, err) = sluice(&broker, &["topic", "list"], None);
    assert!(!ok && err.contains("no credentials"), "{err}");

    assert!(root(&["topic", "create", "orders"]).0);
    assert!(root(&["user", "create", "bob"]).0);
    let (ok, token, err) = root(&["token", "create", "bob", "--ttl", "1h"]);
    assert!(ok, "{err}");
    assert!(err.contains("shown only now"), "{err}");
    let token = token.trim().to_owned();
    assert!(token.starts_with("sluice_"), "{token}");
    let (ok, out, err) = root(&[
        "acl",
        "add",
        "--principal",
        "bob",
        "--topic",
        "orders",
        "--operation",
        "write",
    ]);
    assert!(ok && out.contains("added"), "{out}{err}");
    let (ok, out, _) = root(&["acl", "list", "--principal", "bob"]);
    assert!(
        ok && out.contains("bob\ttopic\torders\tliteral\twrite\tallow"),
        "{out}"
    );

    let bob = |args: &[&str], stdin: Option<&str>| {
        let mut all = vec!["--token", token.as_str()];
        all.extend_from_slice(args);
        sluice(&broker, &all, stdin)
    };
    let (ok, out, _) = bob(&["whoami"], None);
    assert!(ok && out.starts_with("bob\tsuperuser=false"), "{out}");
    let (ok, _, err) = bob(&["produce", "orders"], Some("one\ntwo\n"));
    assert!(ok, "{err}");
    let (ok, _, err) = bob(&["consume", "orders"], None);
    assert!(
        !ok && err.contains("may not read topic \"orders\""),
        "{err}"
    );
    let (ok, out, _) = root(&["user", "list"]);
    assert!(
        ok && out.contains("bob\tsuperuser=false\ttokens=1"),
        "{out}"
    );
    let id = token.split('_').nth(1).unwrap();
    assert!(root(&["token", "revoke", id]).0);
    let (ok, _, err) = bob(&["whoami"], None);
    assert!(!ok && err.contains("unknown or revoked token"), "{err}");
}

#[test]
fn broker_status_shows_version_uptime_disk_and_where_each_setting_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, "retention_ms = 60000\n").unwrap();
    let data = dir.path().join("data");
    let broker = Broker::start_with_env(
        &broker_binary(),
        &data,
        &[
            "--config",
            config.to_str().unwrap(),
            "--segment-bytes",
            "8388608",
        ],
        &[("SLUICE_DEFAULT_PARTITIONS", "3")],
    );
    let (ok, out, err) = sluice(&broker, &["broker", "status"], None);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("version     {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    assert!(out.contains("(commit "), "{out}");
    assert!(out.contains("uptime      0d 00h 00m"), "{out}");
    assert!(
        out.contains(&format!("data dir    {}", data.display())),
        "{out}"
    );
    assert!(out.contains("MiB free of"), "{out}");
    let setting = |name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no setting {name}:\n{out}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
    };
    assert_eq!(setting("segment_bytes"), ["8388608", "(flag)"]);
    assert_eq!(setting("default_partitions"), ["3", "(environment)"]);
    assert_eq!(setting("retention_ms"), ["60000", "(file)"]);
    assert_eq!(setting("max_partitions"), ["1024", "(default)"]);
    assert_eq!(setting("log_format"), ["text", "(default)"]);
}
