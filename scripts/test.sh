#!/usr/bin/env bash
# Runs every default test of the workspace. Long soak and crash loops are
# ignored tests: run them with `cargo test --workspace --release -- --ignored`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
