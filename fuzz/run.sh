#!/bin/sh
# Runs each fuzz target for SECONDS (default 600), one after the other, on
# one core each. Usage: fuzz/run.sh [seconds]. See docs/STORAGE.md.
set -eu
cd "$(dirname "$0")"
seconds=${1:-600}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-../target-fuzz}
for target in batch_decoder open_partition; do
    mkdir -p "corpus/$target"
    cargo +nightly fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1
done
