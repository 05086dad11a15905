#!/usr/bin/env bash
# What recording metrics costs end to end: sluice-bench produce against two
# release brokers started alike but for `--metrics false` on one, in one
# run, alternating (on, off, on, off, ...), while the metrics broker is
# scraped every second (per-partition series on). Prints each run and the
# medians; the target is an overhead under 3% (docs/OPERATIONS.md).
#
#   benches/metrics-overhead.sh            # 7 repetitions of 1 GiB each (~3 min)
#   benches/metrics-overhead.sh --reps 3 --mib 64
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=7
MIB=1024
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS="$2"; shift ;;
    --mib) MIB="$2"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

cargo build --release --locked -q -p sluice-broker -p sluice-benches --bin sluice-broker --bin sluice-bench
BROKER=target/release/sluice-broker
BENCH=target/release/sluice-bench

. scripts/lib/services.sh
services_init sluice-metrics-bench

ON_PORT=$(free_port)
OFF_PORT=$(free_port)
METRICS_PORT=$(free_port)
RUST_LOG=warn "$BROKER" --data-dir "$DATA/on" --listen "127.0.0.1:$ON_PORT" \
  --metrics-listen "127.0.0.1:$METRICS_PORT" >"$DATA/on.log" 2>&1 &
ON_PID=$!; PIDS+=("$ON_PID")
RUST_LOG=warn "$BROKER" --data-dir "$DATA/off" --listen "127.0.0.1:$OFF_PORT" \
  --metrics false >"$DATA/off.log" 2>&1 &
OFF_PID=$!; PIDS+=("$OFF_PID")
wait_for_port "$ON_PORT"
wait_for_port "$OFF_PORT"
wait_for_port "$METRICS_PORT"

# A scraper far keener than Prometheus's default 15 s.
python3 - "http://127.0.0.1:$METRICS_PORT/metrics" <<'PY' &
import sys, time, urllib.request
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=5).read()
    except Exception:
        pass
    time.sleep(1)
PY
PIDS+=("$!")

RESULTS="$DATA/results.jsonl"
for rep in $(seq "$REPS"); do
  for side in on off; do
    if [ "$side" = on ]; then port=$ON_PORT; pid=$ON_PID; else port=$OFF_PORT; pid=$OFF_PID; fi
    sync
    sleep 1
    "$BENCH" produce --url "http://127.0.0.1:$port" --server-pid "$pid" \
      --record-bytes 1024 --producers 4 --partitions 8 --batch 1000 --flush os \
      --mib "$MIB" --topic "overhead-$rep" --label "metrics-$side" --json "$RESULTS" >/dev/null
  done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
by = {}
for run in runs:
    by.setdefault(run["label"], []).append(run["records_per_sec"])
for label, rates in sorted(by.items()):
    print(f"{label}: " + ", ".join(f"{r/1000:.0f}k" for r in rates) + f" rec/s; median {statistics.median(rates)/1000:.0f}k")
on, off = statistics.median(by["metrics-on"]), statistics.median(by["metrics-off"])
print(f"overhead of metrics (median off / median on - 1): {(off / on - 1) * 100:+.1f}%")
PY
