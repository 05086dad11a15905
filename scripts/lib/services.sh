# Sourced by the scripts that start services of their own on 127.0.0.1
# (benches/compare.sh, benches/metrics-overhead.sh,
# benches/security-overhead.sh, scripts/prometheus-check.sh):
#
#   . scripts/lib/services.sh
#   services_init sluice-compare      # DATA: a fresh temp dir; stops all on exit
#   port=$(free_port)
#   some-server --port "$port" --dir "$DATA/x" & PIDS+=($!)
#   wait_for_port "$port"
#
# On exit (normal or not) every pid in PIDS is killed and waited for, and
# DATA is removed.

# Makes DATA (named after $1) and arranges for everything in PIDS to be
# stopped, and DATA removed, when the script exits.
services_init() {
  DATA=$(mktemp -d "${TMPDIR:-/tmp}/${1:-sluice}.XXXXXX")
  PIDS=()
  trap services_cleanup EXIT
}

services_cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$DATA"
}

# A TCP port free on 127.0.0.1 now (python3: nothing else needed).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits (up to 10 s) until something accepts connections on 127.0.0.1:$1.
wait_for_port() {
  for _ in $(seq 200); do
    if (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}
