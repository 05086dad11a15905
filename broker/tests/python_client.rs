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
