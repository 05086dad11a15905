#!/usr/bin/env bash
# Produce throughput with TLS and token authentication against without, in
# one run (issue 14): three brokers on 127.0.0.1, plaintext with --auth off,
# plaintext with --auth required, and --auth required with TLS (a
# certificate made now with openssl, in a temp dir), and the same
# sluice-bench produce load against each in turn, alternating, --reps
# times. Prints the median MB/s of each and the overheads.
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

. scripts/lib/services.sh
services_init sluice-security-bench

# A CA, and a broker certificate it signs (webpki refuses a CA certificate
# as the server's own).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -keyout "$DATA/ca.key" -out "$DATA/ca.pem" -subj "/CN=sluice bench CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$DATA/key.pem" -out "$DATA/broker.csr" -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$DATA/ext"
openssl x509 -req -in "$DATA/broker.csr" -CA "$DATA/ca.pem" -CAkey "$DATA/ca.key" -CAcreateserial \
  -days 1 -extfile "$DATA/ext" -out "$DATA/cert.pem" 2>/dev/null
TOKEN="bench-$(openssl rand -hex 24)"

# Starts broker $1 on a free port, with the rest as its arguments. Not in
# a subshell, so its pid reaches PIDS and it is stopped on exit.
start() {
  local name=$1 port; shift
  port=$(free_port)
  mkdir -p "$DATA/$name"
  SLUICE_BOOTSTRAP_TOKEN="$TOKEN" "$BROKER" --listen "127.0.0.1:$port" --data-dir "$DATA/$name/data" \
    --flush "$FLUSH" --metrics-listen 127.0.0.1:0 "$@" >"$DATA/$name/log" 2>&1 &
  PIDS+=($!)
  echo $! >"$DATA/$name/pid"
  wait_for_port "$port" || { cat "$DATA/$name/log" >&2; exit 1; }
  echo "$port" >"$DATA/$name/port"
}
start plain
start auth --auth required
start secure --auth required --tls-cert "$DATA/cert.pem" --tls-key "$DATA/key.pem"
PLAIN=127.0.0.1:$(cat "$DATA/plain/port")
AUTH=127.0.0.1:$(cat "$DATA/auth/port")
SECURE=127.0.0.1:$(cat "$DATA/secure/port")
echo "== plaintext, auth off: $PLAIN; plaintext, auth required: $AUTH; TLS, auth required: $SECURE; flush=$FLUSH"

RESULTS="$DATA/results.jsonl"
CPU="$DATA/cpu.tsv"
COMMON=(--record-bytes 1024 --batch 1000 --producers 4 --partitions 8 --mib "$MIB" --flush "$FLUSH" --quiet --json "$RESULTS")
TICKS=$(getconf CLK_TCK)
# User + system CPU seconds a process has used so far.
cpu_of() { awk -v t="$TICKS" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }
# One produce run against broker $1 labelled $2 (with the rest as
# environment): its broker's and its own CPU seconds go to $CPU.
run() {
  local name=$1 label=$2 url=$3; shift 3
  local pid before after client
  pid=$(cat "$DATA/$name/pid")
  before=$(cpu_of "$pid")
  client=$( { TIMEFORMAT='%U %S'; time env "$@" "$BENCH" produce --url "$url" --label "$label" "${COMMON[@]}" >/dev/null 2>&1; } 2>&1 )
  after=$(cpu_of "$pid")
  echo -e "$label\t$before\t$after\t$client" >>"$CPU"
}
for rep in $(seq 1 "$REPS"); do
  echo "== rep $rep of $REPS"
  run plain plain "http://$PLAIN"
  run auth auth "http://$AUTH" SLUICE_TOKEN="$TOKEN"
  run secure tls+auth "https://localhost:${SECURE##*:}" SLUICE_TOKEN="$TOKEN" SLUICE_TLS_CA="$DATA/ca.pem"
done

python3 - "$RESULTS" "$CPU" "$MIB" <<'PY'
import json, statistics, sys
results, cpu_file, mib = sys.argv[1], sys.argv[2], float(sys.argv[3])
rates, broker_cpu, client_cpu = {}, {}, {}
for line in open(results):
    r = json.loads(line)
    rates.setdefault(r["label"], []).append(r["mb_per_sec"])
gb = mib * 1024 * 1024 / 1e9
for line in open(cpu_file):
    label, before, after, user, system = line.split()
    broker_cpu.setdefault(label, []).append((float(after) - float(before)) / gb)
    client_cpu.setdefault(label, []).append((float(user) + float(system)) / gb)
print("| broker | MB/s per run | median MB/s | broker CPU s/GB (median) | client CPU s/GB (median) |")
print("| --- | --- | --- | --- | --- |")
for label, values in rates.items():
    print(f"| {label} | {', '.join(f'{v:.0f}' for v in values)} | {statistics.median(values):.0f} "
          f"| {statistics.median(broker_cpu[label]):.2f} | {statistics.median(client_cpu[label]):.2f} |")
med = {label: statistics.median(v) for label, v in rates.items()}
cpu = {label: statistics.median(v) for label, v in broker_cpu.items()}
for label in ("auth", "tls+auth"):
    print(f"\n{label}: throughput {100 * (1 - med[label] / med['plain']):+.1f}% below plain, "
          f"broker CPU per GB {100 * (cpu[label] / cpu['plain'] - 1):+.1f}% (target: below 10% overhead)")
PY
