#!/usr/bin/env bash
# Produce throughput with TLS and token authentication against without, in
# one run (issue 14): two brokers on 127.0.0.1, one plaintext with
# --auth off, one with --auth required and TLS (a certificate made now with
# openssl, in a temp dir), and the same sluice-bench produce load against
# each in turn, alternating, --reps times. Prints the median MB/s of each
# and the overhead.
#
#   benches/security-overhead.sh               # 3 reps of 256 MiB, batches of 1000
#   benches/security-overhead.sh --reps 5 --mib 512
#   benches/security-overhead.sh --flush every-batch
#
# Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=3
MIB=256
FLUSH=os
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS="$2"; shift ;;
    --mib) MIB="$2"; shift ;;
    --flush) FLUSH="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if ! command -v openssl >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl >/dev/null
fi

echo "== building (release)"
cargo build --release --locked -p sluice-broker -p sluice-benches --bin sluice-broker --bin sluice-bench
BROKER=target/release/sluice-broker
BENCH=target/release/sluice-bench

TMP=$(mktemp -d "${TMPDIR:-/tmp}/sluice-security-bench.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -keyout "$TMP/key.pem" -out "$TMP/cert.pem" -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
TOKEN="bench-$(openssl rand -hex 24)"

# Starts a broker; prints its address once it listens.
start() {
  local name=$1; shift
  mkdir -p "$TMP/$name"
  SLUICE_BOOTSTRAP_TOKEN="$TOKEN" "$BROKER" --listen 127.0.0.1:0 --data-dir "$TMP/$name/data" \
    --flush "$FLUSH" "$@" >"$TMP/$name/log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 300); do
    if addr=$(grep -o 'listening on [0-9.:]*' "$TMP/$name/log" | head -1 | cut -d' ' -f3) && [ -n "$addr" ]; then
      echo "$addr"; return
    fi
    sleep 0.1
  done
  echo "broker $name did not start:" >&2; cat "$TMP/$name/log" >&2; exit 1
}
PLAIN=$(start plain "${BROKER_ARGS[@]+"${BROKER_ARGS[@]}"}")
SECURE=$(start secure --auth required --tls-cert "$TMP/cert.pem" --tls-key "$TMP/key.pem")
echo "== plaintext, auth off: $PLAIN; TLS, auth required: $SECURE; flush=$FLUSH"

RESULTS="$TMP/results.jsonl"
COMMON=(--record-bytes 1024 --batch 1000 --producers 4 --partitions 8 --mib "$MIB" --flush "$FLUSH" --quiet --json "$RESULTS")
for rep in $(seq 1 "$REPS"); do
  echo "== rep $rep of $REPS"
  "$BENCH" produce --url "http://$PLAIN" --label plain "${COMMON[@]}" >/dev/null
  SLUICE_TOKEN="$TOKEN" SLUICE_TLS_CA="$TMP/cert.pem" \
    "$BENCH" produce --url "https://localhost:${SECURE##*:}" --label tls+auth "${COMMON[@]}" >/dev/null
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault(r["label"], []).append(r["mb_per_sec"])
plain, secure = statistics.median(runs["plain"]), statistics.median(runs["tls+auth"])
print("| broker | runs (MB/s) | median MB/s |")
print("| --- | --- | --- |")
for label, values in runs.items():
    print(f"| {label} | {', '.join(f'{v:.0f}' for v in values)} | {statistics.median(values):.0f} |")
print(f"\nTLS + auth overhead: {100 * (1 - secure / plain):.1f}% (target: below 10%)")
PY
