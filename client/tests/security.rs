//! TLS, tokens and ACLs against the real broker binary, with certificates
//! made at test time (testkit::pki).

use std::time::{Duration, Instant};

use sluice_client::security::{
    self, AclRule, Operation, PatternType, Permission, ResourceType, SecurityAdmin,
};
use sluice_client::{
    Admin, ClientConfig, Error, GroupConfig, GroupConsumer, Producer, ProducerConfig, Record,
    TlsConfig,
};
use sluice_proto::v1::consume_service_client::ConsumeServiceClient;
use sluice_proto::v1::{self as pb, SubscribeRequest};
use sluice_testkit::pki::TestCa;
use sluice_testkit::{Broker, broker_binary};
use tonic::Code;

const BOOTSTRAP: &str = "bootstrap-token-for-tests-0123456789";

fn start_secure(dir: &std::path::Path, args: &[&str]) -> Broker {
    let mut all = vec!["--auth", "required"];
    all.extend_from_slice(args);
    Broker::start_with_env(
        &broker_binary(),
        dir,
        &all,
        &[("SLUICE_BOOTSTRAP_TOKEN", BOOTSTRAP)],
    )
}

/// A broker with authentication required, the bootstrap superuser's
/// client, and `topics` made (one partition each).
struct Secured {
    broker: Broker,
    url: String,
    root_config: ClientConfig,
    root: SecurityAdmin,
}

async fn secured(dir: &std::path::Path, topics: &[&str]) -> Secured {
    let broker = start_secure(dir, &[]);
    let url = broker.url();
    let root_config = with_token(&url, BOOTSTRAP);
    let root = SecurityAdmin::new(&root_config).unwrap();
    let admin = Admin::new(&root_config).unwrap();
    for topic in topics {
        admin.create_topic(topic, 1).await.unwrap();
    }
    Secured {
        broker,
        url,
        root_config,
        root,
    }
}

fn with_token(url: &str, token: &str) -> ClientConfig {
    ClientConfig::new(url).with_token(token)
}

fn rule(
    principal: &str,
    kind: ResourceType,
    name: &str,
    pattern: PatternType,
    op: Operation,
    permission: Permission,
) -> AclRule {
    security::acl_rule(principal, kind, name, pattern, op, permission)
}

fn allow_topic(principal: &str, name: &str, op: Operation) -> AclRule {
    rule(
        principal,
        ResourceType::Topic,
        name,
        PatternType::Literal,
        op,
        Permission::Allow,
    )
}

/// Appends one record to `topic` as the superuser.
async fn produce_one(root_config: &ClientConfig, topic: &str, value: &'static str) {
    Producer::new(root_config, ProducerConfig::default())
        .unwrap()
        .send(topic, Record::new(value))
        .await
        .unwrap();
}

/// A new user allowed to read `topic`; returns its token.
async fn reader_of(admin: &SecurityAdmin, name: &str, topic: &str) -> String {
    let token = user(admin, name).await;
    admin
        .add_acl(allow_topic(name, topic, Operation::Read))
        .await
        .unwrap();
    token
}

/// A new user with a token; returns the token.
async fn user(admin: &SecurityAdmin, name: &str) -> String {
    admin.create_user(name, false).await.unwrap();
    admin.create_token(name, None, "test").await.unwrap().token
}

fn code(result: Result<impl std::fmt::Debug, Error>) -> Code {
    match result {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e.code().unwrap_or_else(|| panic!("no code in {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bad_revoked_and_expired_tokens_are_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_secure(dir.path(), &[]);
    let url = broker.url();
    let root = SecurityAdmin::new(&with_token(&url, BOOTSTRAP)).unwrap();
    let me = root.who_am_i().await.unwrap();
    assert_eq!((me.principal.as_str(), me.superuser), ("admin", true));
    Admin::new(&with_token(&url, BOOTSTRAP))
        .unwrap()
        .create_topic("orders", 1)
        .await
        .unwrap();

    let anonymous = Admin::new(&ClientConfig::new(&url)).unwrap();
    let err = anonymous.list_topics().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    assert!(err.to_string().contains("no credentials"), "{err}");
    let bad = Admin::new(&with_token(&url, "sluice_0000_not-a-token")).unwrap();
    assert_eq!(code(bad.list_topics().await), Code::Unauthenticated);

    let token = user(&root, "alice").await;
    root.add_acl(allow_topic("alice", "orders", Operation::Describe))
        .await
        .unwrap();
    let alice = Admin::new(&with_token(&url, &token)).unwrap();
    assert_eq!(alice.list_topics().await.unwrap().len(), 1);
    // Revoked: the very next call is refused.
    let id = token.split('_').nth(1).unwrap().to_owned();
    root.revoke_token(&id).await.unwrap();
    let err = alice.list_topics().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");

    let short = root
        .create_token("alice", Some(Duration::from_millis(300)), "short")
        .await
        .unwrap();
    let shortlived = Admin::new(&with_token(&url, &short.token)).unwrap();
    assert_eq!(shortlived.list_topics().await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let err = shortlived.list_topics().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated));
    assert!(err.to_string().contains("expired"), "{err}");

    // Tokens are kept as hashes only, and survive a restart.
    let stored = std::fs::read_to_string(dir.path().join("internal/auth/users.json")).unwrap();
    assert!(!stored.contains(BOOTSTRAP) && !stored.contains(&short.token));
    let broker = broker.restart();
    let root = SecurityAdmin::new(&with_token(&broker.url(), BOOTSTRAP)).unwrap();
    assert_eq!(root.who_am_i().await.unwrap().principal, "admin");
    let revoked = Admin::new(&with_token(&broker.url(), &token)).unwrap();
    assert_eq!(code(revoked.list_topics().await), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_principal_reads_but_cannot_produce() {
    let dir = tempfile::tempdir().unwrap();
    let Secured {
        broker: _broker,
        url,
        root_config,
        root,
    } = secured(dir.path(), &["orders"]).await;
    produce_one(&root_config, "orders", "first").await;
    let token = reader_of(&root, "reader", "orders").await;
    let reader = with_token(&url, &token);
    let records = Admin::new(&reader)
        .unwrap()
        .offsets("orders", &[], sluice_client::StartFrom::Latest)
        .await
        .unwrap();
    assert_eq!(records, vec![(0, 1)]);

    let plain = Producer::new(
        &reader,
        ProducerConfig {
            idempotence: false,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let err = plain.send("orders", Record::new("nope")).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(
        err.to_string()
            .contains("principal \"reader\" may not write topic \"orders\""),
        "{err}"
    );
    // The idempotent producer is refused its producer id: it may write
    // nothing.
    let idempotent = Producer::new(&reader, ProducerConfig::default()).unwrap();
    let err = idempotent
        .send("orders", Record::new("nope"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    // Nothing was written.
    let end = Admin::new(&root_config)
        .unwrap()
        .offsets("orders", &[], sluice_client::StartFrom::Latest)
        .await
        .unwrap();
    assert_eq!(end, vec![(0, 1)]);
    // Nor may it delete the topic or manage users.
    assert_eq!(
        code(Admin::new(&reader).unwrap().delete_topic("orders").await),
        Code::PermissionDenied
    );
    let err = SecurityAdmin::new(&reader)
        .unwrap()
        .create_user("mallory", true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(
        err.to_string().contains("may not alter the cluster"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_grants_exactly_its_prefix_and_deny_beats_allow() {
    let dir = tempfile::tempdir().unwrap();
    let Secured {
        broker, url, root, ..
    } = secured(
        dir.path(),
        &[
            "orders.eu",
            "orders.us",
            "orders",
            "ordersx",
            "payments",
            "orders.secret",
        ],
    )
    .await;
    let token = user(&root, "team").await;
    root.add_acl(rule(
        "team",
        ResourceType::Topic,
        "orders.",
        PatternType::Prefixed,
        Operation::Write,
        Permission::Allow,
    ))
    .await
    .unwrap();
    root.add_acl(rule(
        "*",
        ResourceType::Topic,
        "orders.secret",
        PatternType::Literal,
        Operation::All,
        Permission::Deny,
    ))
    .await
    .unwrap();
    let team = with_token(&url, &token);
    let producer = Producer::new(&team, ProducerConfig::default()).unwrap();
    for topic in ["orders.eu", "orders.us"] {
        producer.send(topic, Record::new("ok")).await.unwrap();
    }
    for topic in ["orders", "ordersx", "payments", "orders.secret"] {
        let err = producer.send(topic, Record::new("no")).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::PermissionDenied), "{topic}: {err}");
    }
    // Listing shows only what the principal may describe: no other name.
    let mut visible: Vec<String> = Admin::new(&team)
        .unwrap()
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    visible.sort();
    assert_eq!(visible, ["orders.eu", "orders.us"]);
    // Deny beats allow, even the allow of everything.
    root.add_acl(rule(
        "team",
        ResourceType::Topic,
        "*",
        PatternType::Literal,
        Operation::All,
        Permission::Allow,
    ))
    .await
    .unwrap();
    producer
        .send("payments", Record::new("now ok"))
        .await
        .unwrap();
    let err = producer
        .send("orders.secret", Record::new("no"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    // Rules survive a restart.
    let broker = broker.restart();
    let rules = SecurityAdmin::new(&with_token(&broker.url(), BOOTSTRAP))
        .unwrap()
        .list_acls(Some("team"))
        .await
        .unwrap();
    assert_eq!(rules.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_needs_read_on_the_group_and_on_its_topics() {
    let dir = tempfile::tempdir().unwrap();
    let Secured {
        broker: _broker,
        url,
        root_config,
        root,
    } = secured(dir.path(), &["orders"]).await;
    produce_one(&root_config, "orders", "r0").await;
    let token = reader_of(&root, "worker", "orders").await;
    let worker = with_token(&url, &token);
    let mut consumer =
        GroupConsumer::new(&worker, GroupConfig::new("billing", ["orders"])).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("an answer")
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("group \"billing\""), "{err}");
    root.add_acl(rule(
        "worker",
        ResourceType::Group,
        "billing",
        PatternType::Literal,
        Operation::Read,
        Permission::Allow,
    ))
    .await
    .unwrap();
    let mut consumer =
        GroupConsumer::new(&worker, GroupConfig::new("billing", ["orders"])).unwrap();
    let record = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a record")
        .unwrap();
    assert_eq!(&record.value[..], b"r0");
    consumer.commit_record(&record).await.unwrap();
    consumer.close().await.unwrap();
    // The group is visible to it; another group is not.
    let groups = Admin::new(&worker).unwrap().list_groups().await.unwrap();
    assert_eq!(groups.len(), 1);
    let mut other = GroupConsumer::new(&worker, GroupConfig::new("audit", ["orders"])).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), other.next())
        .await
        .expect("an answer")
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
}

/// A raw subscription with a token, to watch it end.
async fn subscribe(url: &str, token: &str, topic: &str) -> tonic::Streaming<pb::SubscribeResponse> {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(SubscribeRequest {
        topic: topic.to_owned(),
        start: Some(pb::subscribe_request::Start::Offset(0)),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    ConsumeServiceClient::new(channel)
        .subscribe(request)
        .await
        .unwrap()
        .into_inner()
}

/// Waits for the stream to end with an error; returns it and how long it
/// took.
async fn end_of(stream: &mut tonic::Streaming<pb::SubscribeResponse>) -> (tonic::Status, Duration) {
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Err(_) => panic!("the subscription did not end within 10 s"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the subscription ended without a status"),
            Ok(Err(status)) => return (status, started.elapsed()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_ends_when_its_rule_or_token_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let Secured {
        broker: _broker,
        url,
        root_config,
        root,
    } = secured(dir.path(), &["orders"]).await;
    let producer = Producer::new(&root_config, ProducerConfig::default()).unwrap();
    producer.send("orders", Record::new("r0")).await.unwrap();
    let token = user(&root, "reader").await;
    let read = allow_topic("reader", "orders", Operation::Read);
    root.add_acl(read.clone()).await.unwrap();

    let mut stream = subscribe(&url, &token, "orders").await;
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(&first.records[0].value[..], b"r0");
    root.remove_acl(read.clone()).await.unwrap();
    let (status, took) = end_of(&mut stream).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(took < Duration::from_secs(2), "ended after {took:?}");

    // A revoked token ends a subscription too.
    root.add_acl(read).await.unwrap();
    let mut stream = subscribe(&url, &token, "orders").await;
    stream.message().await.unwrap().unwrap();
    let id = token.split('_').nth(1).unwrap().to_owned();
    root.revoke_token(&id).await.unwrap();
    let (status, took) = end_of(&mut stream).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(took < Duration::from_secs(2), "ended after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_names_the_principal_and_plaintext_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca = TestCa::new(pki.path(), "main");
    let server = ca.server("broker");
    let billing = ca.client("svc-billing");
    let (cert, key, client_ca) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
        ca.cert.display().to_string(),
    );
    let broker = start_secure(
        dir.path(),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &client_ca,
            "--tls-client-auth",
            "optional",
        ],
    );
    let url = format!("https://{}", broker.addr);
    let trust = TlsConfig::default().with_ca_file(&ca.cert).unwrap();
    let root_config = ClientConfig::new(&url)
        .with_tls(trust.clone())
        .with_token(BOOTSTRAP);
    let root = SecurityAdmin::new(&root_config).unwrap();
    assert_eq!(root.who_am_i().await.unwrap().authenticated_by, "token");
    Admin::new(&root_config)
        .unwrap()
        .create_topic("invoices", 1)
        .await
        .unwrap();
    root.add_acl(allow_topic("svc-billing", "invoices", Operation::Write))
        .await
        .unwrap();

    let mtls = ClientConfig::new(&url).with_tls(
        trust
            .clone()
            .with_identity_files(&billing.cert, &billing.key)
            .unwrap(),
    );
    let me = SecurityAdmin::new(&mtls).unwrap().who_am_i().await.unwrap();
    assert_eq!(
        (me.principal.as_str(), me.authenticated_by.as_str()),
        ("svc-billing", "tls")
    );
    Producer::new(&mtls, ProducerConfig::default())
        .unwrap()
        .send("invoices", Record::new("paid"))
        .await
        .unwrap();
    let err = Admin::new(&mtls)
        .unwrap()
        .delete_topic("invoices")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));

    // TLS without a certificate or a token: no credentials.
    let err = Admin::new(&ClientConfig::new(&url).with_tls(trust.clone()))
        .unwrap()
        .list_topics()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");

    // A certificate from another CA is refused at the handshake.
    let stranger_ca = TestCa::new(pki.path(), "stranger");
    let stranger = stranger_ca.client("svc-billing");
    let forged = ClientConfig::new(&url).with_tls(
        trust
            .with_identity_files(&stranger.cert, &stranger.key)
            .unwrap(),
    );
    let err = SecurityAdmin::new(&forged)
        .unwrap()
        .who_am_i()
        .await
        .unwrap_err();
    assert!(
        err.code() != Some(Code::Ok) && err.to_string() != "",
        "{err}"
    );
    assert!(!matches!(err, Error::Rejected(ref s) if s.code() == Code::Ok));

    // Plaintext against the TLS port: told to use TLS.
    let plaintext =
        Admin::new(&ClientConfig::new(format!("http://{}", broker.addr)).with_token(BOOTSTRAP))
            .unwrap();
    let err = plaintext.list_topics().await.unwrap_err();
    assert!(err.to_string().contains("requires TLS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_and_signalled_serves_new_connections_and_keeps_open_ones() {
    rotate_certificate(Rotation::Sighup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_file_replaced_is_picked_up_without_a_signal() {
    rotate_certificate(Rotation::FileChange).await;
}

enum Rotation {
    /// A long poll, so only SIGHUP can explain a quick reload.
    Sighup,
    /// A short poll and no signal.
    FileChange,
}

async fn rotate_certificate(how: Rotation) {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new(pki.path(), "old");
    let new_ca = TestCa::new(pki.path(), "new");
    let old = old_ca.server("broker");
    let new = new_ca.server("broker");
    let live_cert = pki.path().join("live.pem");
    let live_key = pki.path().join("live.key");
    std::fs::copy(&old.cert, &live_cert).unwrap();
    std::fs::copy(&old.key, &live_key).unwrap();
    let (cert, key) = (
        live_cert.display().to_string(),
        live_key.display().to_string(),
    );
    let poll_ms = match how {
        Rotation::Sighup => "600000",
        Rotation::FileChange => "200",
    };
    let broker = start_secure(
        dir.path(),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-reload-poll-ms",
            poll_ms,
        ],
    );
    let url = format!("https://{}", broker.addr);
    let old_trust = ClientConfig::new(&url)
        .with_tls(TlsConfig::default().with_ca_file(&old_ca.cert).unwrap())
        .with_token(BOOTSTRAP);
    let new_trust = ClientConfig::new(&url)
        .with_tls(TlsConfig::default().with_ca_file(&new_ca.cert).unwrap())
        .with_token(BOOTSTRAP);
    let before = Admin::new(&old_trust).unwrap();
    before.create_topic("orders", 1).await.unwrap();
    assert!(Admin::new(&new_trust).unwrap().list_topics().await.is_err());

    std::fs::copy(&new.cert, &live_cert).unwrap();
    std::fs::copy(&new.key, &live_key).unwrap();
    if let Rotation::Sighup = how {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &broker.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if Admin::new(&new_trust).unwrap().list_topics().await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection made before the reload still works.
    assert_eq!(before.list_topics().await.unwrap().len(), 1);
    // New connections trusting only the old CA are refused.
    assert!(Admin::new(&old_trust).unwrap().list_topics().await.is_err());
}

#[test]
fn the_broker_refuses_to_listen_beyond_loopback_with_auth_off_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(broker_binary())
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 with --auth off")
            && stderr.contains("--allow-unauthenticated-remote"),
        "{stderr}"
    );
    // Told, it starts (and listens on every address).
    let broker = Broker::start(
        &broker_binary(),
        dir.path(),
        &["--listen", "0.0.0.0:0", "--allow-unauthenticated-remote"],
    );
    assert!(broker.addr.ip().is_unspecified());
}
