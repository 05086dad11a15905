//! The broker from another language: a Python grpcio client whose stubs are
//! generated from our .proto files at test time.

use std::path::Path;
use std::process::Command;

#[test]
fn a_python_grpc_client_creates_produces_fetches_and_subscribes() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .expect("python3 is needed for this test");
    assert!(
        probe.status.success(),
        "the Python gRPC packages are missing: run `python3 -m pip install grpcio grpcio-tools` \
         (.ci/run installs them)\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    let output = Command::new("python3")
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
