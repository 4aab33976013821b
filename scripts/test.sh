#!/usr/bin/env bash
# Set up and pass every check: ruff, mypy --strict, and pytest against real servers.
# Uses DOTMAC_TEST_REDIS_URL when set (its database is flushed!); otherwise installs redis-server
# (apt, as root) when missing and runs a throwaway one on a free loopback port, stopped on exit.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh dev

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing: install it (apt-get install redis-server) or run as root" >&2
    exit 2
  fi
fi

if [ -z "${DOTMAC_TEST_REDIS_URL:-}" ]; then
  port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  redis_dir=$(mktemp -d)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$redis_dir" \
    --daemonize no --loglevel warning >"$redis_dir/log" 2>&1 &
  redis_pid=$!
  trap 'kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; rm -rf "$redis_dir"' EXIT
  for _ in $(seq 1 100); do
    if redis-cli -p "$port" ping >/dev/null 2>&1; then break; fi
    sleep 0.1
  done
  redis-cli -p "$port" ping >/dev/null || { cat "$redis_dir/log" >&2; exit 1; }
  export DOTMAC_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
fi

.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/ruff format --check src tests benchmarks scripts
.venv/bin/mypy src tests/typing
.venv/bin/python -m pytest "$@"
