#!/usr/bin/env bash
# Sluice against NATS JetStream and Redis Streams, on this machine (issue 8).
#
#   benches/compare.sh            # the full comparison, 3 repetitions (~10 min)
#   benches/compare.sh --reps 5   # more repetitions (medians are reported)
#   benches/compare.sh --smoke    # tiny counts, one repetition (CI)
#
# Installs nats-server and redis-server from Debian if missing, builds the
# broker and sluice-bench (release, with the peers' clients), starts Sluice,
# NATS (JetStream, file storage) and Redis (AOF) on 127.0.0.1 with their
# data in one temp dir, runs every workload against each in turn, then
# prints one table (medians, ratios Sluice/peer, the loopback and disk
# ceilings, the targets) and writes the results as JSON under --out
# (default target/compare), with one latency plot per end-to-end workload
# (e2e-*.svg). Everything it started is stopped on exit.
#
# Workloads (1 KiB records, batches of 1000, 4 producers, 8 partitions,
# 4 consumers):
#   produce-durable   256 MiB; Sluice flush=every-batch, Redis appendfsync always
#   produce-interval  the 1 GiB backlog of the consume run; Sluice
#                     flush=interval(1000ms), Redis everysec, NATS file storage
#   consume           catch-up read of that 1 GiB backlog
#   produce-os        1 GiB, Sluice flush=os (against the loopback ceiling)
#   e2e-durable       20 MB/s open loop for 10 s, batches of 100, latency
#   e2e-interval      the same at the interval/everysec/file settings
#   ceiling-loopback  the produce-os bytes through plain loopback TCP
#   ceiling-disk      dd 1 GiB with conv=fdatasync into the data dir
#   ceiling-page-cache  dd 1 GiB into a new file in the data dir, no sync:
#                     the page cache's own write speed, flush = os's bound
# Compression (Sluice only): 256 MiB of JSON order events (--payload json),
# flush=os, each on a fresh topic, with the producers' batches compressed
# by each codec; reports throughput, broker CPU s/GB and the bytes of the
# topic's batches on disk per record (--data-dir):
#   produce-json-none, produce-json-lz4, produce-json-zstd
# Every run given a server pid also reports that server's CPU seconds per
# GB of record values in its measured phase (a row under each workload).
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=3
SMOKE=0
OUT=target/compare
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1; REPS=1 ;;
    --reps) REPS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$SMOKE" = 1 ]; then
  BACKLOG_MIB=4; DURABLE_MIB=2; OS_MIB=4; E2E_MBPS=1; E2E_SECONDS=1; DD_MIB=16; JSON_MIB=2
else
  BACKLOG_MIB=1024; DURABLE_MIB=256; OS_MIB=1024; E2E_MBPS=20; E2E_SECONDS=10; DD_MIB=1024; JSON_MIB=256
fi
CODECS=(none lz4 zstd)
COMMON=(--record-bytes 1024 --producers 4 --partitions 8 --consumers 4)
BULK=(--batch 1000)
E2E=(--mb-per-sec "$E2E_MBPS" --duration "$E2E_SECONDS" --batch 100 --in-flight 64)

# --- peers -----------------------------------------------------------------
missing=()
command -v nats-server >/dev/null || missing+=(nats-server)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (Debian packages)"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "== $(nats-server --version), $(redis-server --version | cut -d' ' -f1-3)"

echo "== building (release)"
cargo build --release --locked -p sluice-broker -p sluice-benches --features sluice-benches/peers \
  --bin sluice-broker --bin sluice-bench
BROKER=target/release/sluice-broker
BENCH=target/release/sluice-bench

# --- servers ---------------------------------------------------------------
. scripts/lib/services.sh
services_init sluice-compare

SLUICE_PORT=$(free_port)
NATS_PORT=$(free_port)
REDIS_PORT=$(free_port)
mkdir -p "$DATA/sluice" "$DATA/nats" "$DATA/redis" "$OUT"

RUST_LOG=warn "$BROKER" --data-dir "$DATA/sluice" --listen "127.0.0.1:$SLUICE_PORT" \
  --metrics-listen "127.0.0.1:$(free_port)" >"$DATA/sluice.log" 2>&1 &
SLUICE_PID=$!; PIDS+=("$SLUICE_PID")
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$DATA/nats" >"$DATA/nats.log" 2>&1 &
NATS_PID=$!; PIDS+=("$NATS_PID")
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$DATA/redis" \
  --appendonly yes --appendfsync everysec --save '' >"$DATA/redis.log" 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID")
wait_for_port "$SLUICE_PORT"
wait_for_port "$NATS_PORT"
wait_for_port "$REDIS_PORT"

RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
rm -f "$OUT"/e2e-*.svg

# Before each workload: write back what the last one left dirty in the page
# cache, so no run pays for another's writes (fair to every system).
settle() {
  sync
  sleep 1
}

bench() { # bench MODE SYSTEM URL PID ARGS...
  local mode=$1 system=$2 url=$3 pid=$4
  shift 4
  settle
  "$BENCH" "$mode" --system "$system" --url "$url" --server-pid "$pid" \
    "${COMMON[@]}" --json "$RESULTS" "$@" >/dev/null
}

run_sluice() {
  local s=(sluice "http://127.0.0.1:$SLUICE_PORT" "$SLUICE_PID")
  bench produce "${s[@]}" "${BULK[@]}" --label produce-durable --flush every-batch --mib "$DURABLE_MIB"
  bench consume "${s[@]}" "${BULK[@]}" --label consume --backlog-label produce-interval \
    --flush 'interval(1000ms)' --mib "$BACKLOG_MIB"
  bench produce "${s[@]}" "${BULK[@]}" --label produce-os --flush os --mib "$OS_MIB"
  bench end-to-end "${s[@]}" --label e2e-durable --flush every-batch "${E2E[@]}"
  bench end-to-end "${s[@]}" --label e2e-interval --flush 'interval(1000ms)' "${E2E[@]}"
}

run_compression() {
  local s=(sluice "http://127.0.0.1:$SLUICE_PORT" "$SLUICE_PID")
  local codec
  for codec in "${CODECS[@]}"; do
    bench produce "${s[@]}" "${BULK[@]}" --label "produce-json-$codec" --flush os \
      --payload json --compression "$codec" --mib "$JSON_MIB" --data-dir "$DATA/sluice"
  done
}

run_redis() {
  local r=(redis "redis://127.0.0.1:$REDIS_PORT" "$REDIS_PID")
  bench produce "${r[@]}" "${BULK[@]}" --label produce-durable --flush always --mib "$DURABLE_MIB"
  bench consume "${r[@]}" "${BULK[@]}" --label consume --backlog-label produce-interval \
    --flush everysec --mib "$BACKLOG_MIB"
  bench end-to-end "${r[@]}" --label e2e-durable --flush always "${E2E[@]}"
  bench end-to-end "${r[@]}" --label e2e-interval --flush everysec "${E2E[@]}"
}

run_nats() {
  # NATS 2.9 (Debian) has no per-write sync: no durable row.
  local n=(nats "nats://127.0.0.1:$NATS_PORT" "$NATS_PID")
  bench consume "${n[@]}" "${BULK[@]}" --label consume --backlog-label produce-interval \
    --flush file --mib "$BACKLOG_MIB"
  bench end-to-end "${n[@]}" --label e2e-interval --flush file "${E2E[@]}"
}

# dd_ceiling LABEL DURABILITY [DD ARGS...]: $DD_MIB MiB of zeroes into a new
# file in the data dir's filesystem, recorded as a "disk" result.
dd_ceiling() {
  local label=$1 durability=$2 line bytes seconds
  shift 2
  settle
  line=$(dd if=/dev/zero of="$DATA/dd.bin" bs=1M count="$DD_MIB" "$@" 2>&1 | tail -1)
  rm -f "$DATA/dd.bin"
  bytes=$(echo "$line" | awk '{print $1}')
  seconds=$(echo "$line" | awk '{for (i = 2; i <= NF; i++) if ($i == "s,") print $(i-1)}')
  echo "$label: $line" >&2
  awk -v b="$bytes" -v s="$seconds" -v l="$label" -v d="$durability" 'BEGIN {
    printf "{\"label\":\"%s\",\"system\":\"disk\",\"mode\":\"produce\",\"durability\":\"%s\",\"record_bytes\":1024,\"batch\":1,\"producers\":1,\"consumers\":0,\"partitions\":1,\"records\":%d,\"seconds\":%f,\"records_per_sec\":%f,\"mb_per_sec\":%f}\n",
      l, d, b / 1024, s, b / 1024 / s, b / s / 1e6 }' >>"$RESULTS"
}

run_ceilings() {
  settle
  "$BENCH" produce --system tcp "${COMMON[@]}" "${BULK[@]}" --mib "$OS_MIB" --label ceiling-loopback \
    --json "$RESULTS" >/dev/null
  dd_ceiling ceiling-disk fdatasync conv=fdatasync
  # What flush = os can reach at best: new data into the page cache.
  dd_ceiling ceiling-page-cache none
}

START=$(date +%s)
for rep in $(seq "$REPS"); do
  for system in ceilings sluice compression redis nats; do
    echo "== repetition $rep/$REPS: $system"
    "run_$system"
  done
done
echo "== done in $(($(date +%s) - START)) s; results in $RESULTS"
echo

"$BENCH" table "$RESULTS" --json "$OUT/summary.json" --plots "$OUT" | tee "$OUT/table.md"

if [ "$SMOKE" = 1 ]; then
  # Every workload against every system produced a result.
  expected=$((3 + 6 + ${#CODECS[@]} + 5 + 3))
  got=$(wc -l <"$RESULTS")
  [ "$got" -eq "$expected" ] || { echo "smoke: $got results, expected $expected" >&2; exit 1; }
  echo "smoke: $got results"
fi
