#!/usr/bin/env bash
# Runs every default test of the workspace. Long soak and crash loops are
# ignored tests: run them with `cargo test --workspace --release -- --ignored`.
#
# Needs only Rust and python3: the Python client test's packages (gRPC,
# and the Kafka clients kafka-python and confluent-kafka) are installed
# from tests/python/requirements.txt into a virtual environment under
# target/ (once; again when the requirements change), and Debian's `kcat`
# (for client/tests/kafka_clients.rs) with apt-get if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/python-venv
requirements=tests/python/requirements.txt
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
  echo "== Python test packages into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi
export SLUICE_PYTHON="$PWD/$venv/bin/python3"

if ! command -v kcat >/dev/null; then
  echo "== installing kcat (Debian package)"
  if ! command -v apt-get >/dev/null; then
    echo "kcat is missing and there is no apt-get to install it with: install kcat" \
      "(client/tests/kafka_clients.rs runs it) and run this again" >&2
    exit 1
  fi
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends kcat >/dev/null
fi
SLUICE_KCAT="$(command -v kcat)"
export SLUICE_KCAT

cargo test --workspace --locked "$@"
