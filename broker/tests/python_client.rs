//! The broker from another language: a Python grpcio client whose stubs are
//! generated from our .proto files at test time.

use std::path::Path;
use std::process::Command;

/// The Python to run: `SLUICE_PYTHON` (scripts/test.sh points it at a
/// virtual environment with the pinned packages), else `python3`.
fn python() -> String {
    std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn a_python_grpc_client_creates_produces_fetches_and_subscribes() {
    let probe = Command::new(python())
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .expect("python3 is needed for this test");
    assert!(
        probe.status.success(),
        "the Python gRPC packages are missing: run the tests with ./scripts/test.sh, which \
         installs tests/python/requirements.txt into a virtual environment\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    let output = Command::new(python())
        .arg(root.join("tests/python/sluice_smoke.py"))
        .arg(broker.addr.to_string())
        .arg(root.join("proto"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("python client: ok"), "{stdout}");
}

fn start_broker(dir: &std::path::Path, args: &[&str]) -> sluice_testkit::Broker {
    sluice_testkit::Broker::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_sluice-broker")),
        dir,
        args,
    )
}

/// The Python client over TLS with a bearer token, against a broker with
/// a certificate made at test time.
#[test]
fn a_python_grpc_client_connects_with_tls_and_a_token() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca = sluice_testkit::pki::TestCa::new(pki.path(), "py");
    let server = ca.server("broker");
    let token = "python-test-bootstrap-token-0123456789";
    let (cert, key) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
    );
    let broker = sluice_testkit::Broker::start_with_env(
        Path::new(env!("CARGO_BIN_EXE_sluice-broker")),
        dir.path(),
        &["--auth", "required", "--tls-cert", &cert, "--tls-key", &key],
        &[("SLUICE_BOOTSTRAP_TOKEN", token)],
    );
    let output = Command::new(python())
        .arg(root.join("tests/python/sluice_tls.py"))
        .arg(format!("localhost:{}", broker.addr.port()))
        .arg(root.join("proto"))
        .arg(&ca.cert)
        .arg(token)
        .env("PYTHONPATH", root.join("tests/python"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python TLS client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("python tls client: ok"), "{stdout}");
}
