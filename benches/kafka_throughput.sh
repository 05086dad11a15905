#!/usr/bin/env bash
# Produce throughput through the Kafka listener against the gRPC API, in
# one run against one release broker: the same 1 KiB records (values as
# sluice-bench --payload fill) produced by confluent-kafka (librdkafka:
# acks=all, linger.ms=5, batch.size 1 MiB, idempotent;
# benches/kafka_throughput.py) and by the Rust client (sluice-bench produce
# --api record: Producer::enqueue per record, linger 5 ms, batches of up to
# 1 MiB, idempotent), each to a fresh topic of 8 partitions with the
# broker's default flush (every-batch). Prints MB/s and records/s of each,
# and the CPU seconds the broker (and the Python client) used meanwhile: a
# single Python thread calling produce() per record can be the limit.
# Not part of CI.
#
#   benches/kafka_throughput.sh                  # 500000 records each
#   benches/kafka_throughput.sh --count 100000 --partitions 4
#
# Needs the Python test venv (target/python-venv, made by ./scripts/test.sh)
# or SLUICE_PYTHON pointing at a Python with confluent-kafka.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=500000
PARTITIONS=8
RECORD_BYTES=1024
while [ $# -gt 0 ]; do
  case "$1" in
    --count) COUNT="$2"; shift ;;
    --partitions) PARTITIONS="$2"; shift ;;
    --record-bytes) RECORD_BYTES="$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

PYTHON="${SLUICE_PYTHON:-$PWD/target/python-venv/bin/python3}"
if ! "$PYTHON" -c 'import confluent_kafka' 2>/dev/null; then
  echo "no confluent-kafka in $PYTHON: run ./scripts/test.sh once (it makes target/python-venv)," >&2
  echo "or set SLUICE_PYTHON to a Python that has tests/python/requirements.txt installed" >&2
  exit 1
fi

cargo build --release --locked -q -p sluice-broker -p sluice-benches --bin sluice-broker --bin sluice-bench
BROKER=target/release/sluice-broker
BENCH=target/release/sluice-bench

. scripts/lib/services.sh
services_init sluice-kafka-bench

GRPC_PORT=$(free_port)
KAFKA_PORT=$(free_port)
METRICS_PORT=$(free_port)
RUST_LOG=warn "$BROKER" --data-dir "$DATA/broker" --listen "127.0.0.1:$GRPC_PORT" \
  --kafka-listen "127.0.0.1:$KAFKA_PORT" --metrics-listen "127.0.0.1:$METRICS_PORT" \
  >"$DATA/broker.log" 2>&1 &
BROKER_PID=$!; PIDS+=("$BROKER_PID")
wait_for_port "$GRPC_PORT"
wait_for_port "$KAFKA_PORT"

RESULTS="$DATA/results.jsonl"
sync
"$PYTHON" benches/kafka_throughput.py "127.0.0.1:$KAFKA_PORT" kafka-bench "$PARTITIONS" "$COUNT" "$RECORD_BYTES" \
  "$BROKER_PID" >>"$RESULTS"
sync
sleep 1
"$BENCH" produce --url "http://127.0.0.1:$GRPC_PORT" --api record --linger-ms 5 \
  --producers 1 --batch 1000 --in-flight 4 --partitions "$PARTITIONS" \
  --record-bytes "$RECORD_BYTES" --count "$COUNT" --topic grpc-bench \
  --server-pid "$BROKER_PID" --label "Rust client (gRPC)" --quiet --json "$RESULTS" >/dev/null 2>&1

python3 - "$RESULTS" <<'PY'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'producer':<34} {'records':>9} {'MB/s':>8} {'records/s':>10} {'broker CPU s':>13} {'client CPU s':>13}")
for run in runs:
    client = run.get("client_cpu_s")
    client = "-" if client is None else f"{client:.2f}"
    print(f"{run['label']:<34} {run['records']:>9} {run['mb_per_sec']:>8.1f} {run['records_per_sec']:>10.0f}"
          f" {run.get('server_cpu_s') or 0:>13.2f} {client:>13}")
PY
