//! Compiles `sluice/v1/*.proto` with protox (no system protoc) and writes
//! the descriptor set that the broker serves for reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "sluice/v1/records.proto",
    "sluice/v1/admin.proto",
    "sluice/v1/produce.proto",
    "sluice/v1/consume.proto",
    "sluice/v1/groups.proto",
    "sluice/v1/dlq.proto",
    "sluice/v1/auth.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // compile_fds does not write the set it is given: write it for
    // reflection ourselves.
    std::fs::write(
        out_dir.join("sluice_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
