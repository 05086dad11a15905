#!/usr/bin/env bash
# Runs every default test of the workspace. Long soak and crash loops are
# ignored tests: run them with `cargo test --workspace --release -- --ignored`.
#
# Needs only Rust and python3: the Python client test's packages are
# installed from tests/python/requirements.txt into a virtual environment
# under target/ (once; again when the requirements change).
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

cargo test --workspace --locked "$@"
