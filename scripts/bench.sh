#!/usr/bin/env bash
# Benchmarks: starts a private PostgreSQL (durable settings: fsync on) and iothub (release build, production
# store), registers the fleet, measures broker authn/authz decisions and memory, and writes the results with
# machine facts to bench-results/latest.md. Usage: scripts/bench.sh [--devices N] [--seconds S] ...
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/build-deps.sh
. scripts/lib/build-deps.sh
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release --locked -p iothub -p iothub-bench

PG_FAST=0 PG_PORT=${PG_PORT:-55433}
# shellcheck source=lib/postgres.sh
. scripts/lib/postgres.sh
work=$(mktemp -d /tmp/iothub-bench.XXXXXX)
hub_pid=""
cleanup() {
  set +e
  [ -n "$hub_pid" ] && kill "$hub_pid" 2>/dev/null && wait "$hub_pid" 2>/dev/null
  pg_cleanup
  rm -rf "$work"
}
trap cleanup EXIT

export IOTHUB_DATA_DIR="$work" IOTHUB_DATABASE__URL="$PG_URL" IOTHUB_DATABASE__MAX_CONNECTIONS=${DB_CONNECTIONS:-16}
port=${BENCH_HTTP_PORT:-18180}
export IOTHUB_HTTP__LISTEN=127.0.0.1:$port IOTHUB_BROKER__HOOK_TOKEN=bench-hook-token-0123456789abcdef IOTHUB_LOG__LEVEL=warn
export IOTHUB_BROKER__EMBEDDED__MQTTS_LISTEN= IOTHUB_BROKER__EMBEDDED__MQTT_LISTEN=127.0.0.1:0 IOTHUB_BROKER__EMBEDDED__API_LISTEN=127.0.0.1:$((port + 1))
./target/release/iothub serve & hub_pid=$!
for _ in $(seq 150); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$hub_pid" 2>/dev/null || { echo "iothub exited during start" >&2; exit 1; }
  sleep 0.2
done

mkdir -p bench-results
rm -f bench-results/wrk-*.txt
{
  echo "## Run $(date -u +%Y-%m-%dT%H:%MZ) at $(git rev-parse --short HEAD)"
  echo
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/{print $2}') GiB RAM;"
  echo "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') (fsync on), iothub, load generator all on this machine."
  echo
  ./target/release/iothub-bench --admin-key "$(cat "$work/admin-api-key")" --hook-token bench-hook-token-0123456789abcdef \
    --base-url "http://127.0.0.1:$port" --pid "$hub_pid" --export "$work/working-set.txt" "$@"
  # EMQX's hook pools pipeline requests (enable_pipelining); wrk replays that shape on 8 connections.
  if command -v wrk >/dev/null; then
    for mode in authz authn; do
      out=$(DEVICES="$work/working-set.txt" MODE=$mode DEPTH=16 TOKEN=bench-hook-token-0123456789abcdef \
        wrk -t2 -c8 -d"${WRK_SECONDS:-15}s" --latency -s bench/wrk/pipelined.lua "http://127.0.0.1:$port")
      echo "$out" > "bench-results/wrk-$mode.txt"
      rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
      p50=$(echo "$out" | awk '$1=="50%"{print $2}'); p90=$(echo "$out" | awk '$1=="90%"{print $2}')
      p99=$(echo "$out" | awk '$1=="99%"{print $2}')
      echo "| $mode, pipelined x16 on 8 connections (EMQX pool shape), working set | $(echo "$out" | awk '/^ANSWERED/{print $2" answered, "$4" not allow"}') | $rps decisions/s | batch of 16: p50 $p50 / p90 $p90 / p99 $p99 (wrk) |"
    done
  fi
} | tee bench-results/latest.md
