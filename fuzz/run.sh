#!/bin/sh
# Runs each fuzz target for SECONDS (default 600), one after the other, on
# one core each. Usage: fuzz/run.sh [seconds]. See docs/STORAGE.md.
#
# Needs a nightly toolchain and cargo-fuzz: installs them if missing
# (`rustup toolchain install nightly`, `cargo install cargo-fuzz --locked`).
set -eu
cd "$(dirname "$0")"
seconds=${1:-600}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-../target-fuzz}
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "== installing the nightly toolchain (cargo-fuzz needs it)"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
for target in batch_decoder open_partition kafka_frame; do
    mkdir -p "corpus/$target"
    cargo +nightly fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1
done
