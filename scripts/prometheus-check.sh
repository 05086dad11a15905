#!/usr/bin/env bash
# A real Prometheus scrapes the broker's /metrics (docs/OPERATIONS.md).
#
#   scripts/prometheus-check.sh
#
# Installs Debian's `prometheus` package if prometheus or promtool is
# missing (without letting the package start a system Prometheus), builds
# the broker and the `sluice` CLI (debug, as the tests do), starts the
# broker and a Prometheus on free ports of 127.0.0.1 with their data in one
# temp dir, produces and consumes for a few seconds (a group commits, so it
# has lag), then asks Prometheus's HTTP API for a rate of records in and
# for a group's lag and fails unless both answer with samples. It also runs
# `promtool check metrics` on the exposition. Everything it started is
# stopped on exit. Takes about half a minute once built.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "== installing prometheus (Debian package)"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  # The package's maintainer scripts start the service through
  # invoke-rc.d; a policy-rc.d that answers 101 forbids that. Ours goes
  # again after the install (one already there is left alone).
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    own_policy=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if [ "$own_policy" = 1 ]; then $SUDO rm -f "$policy"; fi
  # Under systemd the unit may have been enabled and started anyway.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl stop prometheus || true
  fi
fi
echo "== $(prometheus --version 2>&1 | head -1)"

echo "== building the broker and the CLI"
cargo build --locked -q -p sluice-broker -p sluice-client --bin sluice-broker --bin sluice
BROKER=target/debug/sluice-broker
SLUICE=target/debug/sluice

. scripts/lib/services.sh
services_init sluice-prometheus-check

# GET a URL; prints the body (python3: no curl needed).
get() {
  python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' "$1"
}

wait_for() {
  for _ in $(seq 300); do
    if get "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "nothing answers at $1" >&2
  return 1
}

GRPC_PORT=$(free_port)
METRICS_PORT=$(free_port)
PROM_PORT=$(free_port)
export SLUICE_BROKER="http://127.0.0.1:$GRPC_PORT"

"$BROKER" --data-dir "$DATA/sluice" --listen "127.0.0.1:$GRPC_PORT" \
  --metrics-listen "127.0.0.1:$METRICS_PORT" >"$DATA/broker.log" 2>&1 &
PIDS+=("$!")
wait_for "http://127.0.0.1:$METRICS_PORT/metrics"

cat >"$DATA/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: sluice
    static_configs:
      - targets: ["127.0.0.1:$METRICS_PORT"]
YAML
prometheus --config.file="$DATA/prometheus.yml" --storage.tsdb.path="$DATA/prometheus" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$DATA/prometheus.log" 2>&1 &
PIDS+=("$!")
wait_for "http://127.0.0.1:$PROM_PORT/-/ready"

echo "== load: produce for 8 s, a group reads 5 records and commits"
"$SLUICE" topic create orders --partitions 2 >/dev/null
for round in $(seq 16); do
  seq 1 200 | sed "s/^/order-$round-/" | "$SLUICE" produce orders >/dev/null 2>&1
  if [ "$round" = 2 ]; then
    "$SLUICE" consume orders --group billing --max 5 >/dev/null
  fi
  sleep 0.5
done

echo "== promtool check metrics"
get "http://127.0.0.1:$METRICS_PORT/metrics" >"$DATA/exposition.txt"
promtool check metrics <"$DATA/exposition.txt"

# Prints the result vector of an instant query; fails if it is empty.
query() {
  python3 - "http://127.0.0.1:$PROM_PORT/api/v1/query" "$1" <<'PY'
import json, sys, urllib.parse, urllib.request
url, expr = sys.argv[1], sys.argv[2]
body = json.load(urllib.request.urlopen(url + "?" + urllib.parse.urlencode({"query": expr}), timeout=10))
result = body["data"]["result"] if body.get("status") == "success" else []
for sample in result:
    print(f"  {expr}  {sample['metric']}  =>  {sample['value'][1]}")
if not result:
    sys.exit(f"Prometheus answered no samples for {expr}: {body}")
if not any(float(s["value"][1]) > 0 for s in result):
    sys.exit(f"every sample of {expr} is 0: {result}")
PY
}

echo "== Prometheus queries"
# Scrapes every second: wait for the last load to be scraped.
sleep 2
query 'sum by (topic) (rate(sluice_topic_records_in_total{topic="orders"}[10s]))'
query 'sum by (group, topic) (sluice_group_lag_records{group="billing"})'
query 'histogram_quantile(0.99, sum by (le) (rate(sluice_storage_fsync_duration_seconds_bucket[10s])))'
echo "== ok: Prometheus scraped the broker"
