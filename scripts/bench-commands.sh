#!/usr/bin/env bash
# Device-control benchmark: starts private PostgreSQL (fsync on), Redis and RabbitMQ on loopback and a release
# iothub in the production profile with its bundled RMQTT as the broker, then runs iothub-bench-commands:
# commands accepted+published per second (delivered to rumqttc devices), the broker's round trip, and RPC
# latency over it; then the floor: the same commands' work done the cheapest way without iothub, on the same
# services (see bench/src/bin/commands.rs). Writes bench-results/commands.md. Usage: scripts/bench-commands.sh [--commands N] ...
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/build-deps.sh
. scripts/lib/build-deps.sh
cargo build --release --locked -p iothub -p iothub-bench

PG_FAST=0 PG_PORT=${PG_PORT:-55435}
# shellcheck source=lib/postgres.sh
. scripts/lib/postgres.sh
hub_pid=""
work=$(mktemp -d /tmp/iothub-bench-commands.XXXXXX)
cleanup() {
  set +e
  [ -n "$hub_pid" ] && kill "$hub_pid" 2>/dev/null && wait "$hub_pid" 2>/dev/null
  declare -F rabbitmq_cleanup >/dev/null && rabbitmq_cleanup
  declare -F redis_cleanup >/dev/null && redis_cleanup
  pg_cleanup
  rm -rf "$work"
}
trap cleanup EXIT
REDIS_PORT=${REDIS_PORT:-56381}
# shellcheck source=lib/redis.sh
. scripts/lib/redis.sh
AMQP_PORT=${AMQP_PORT:-55674}
# shellcheck source=lib/rabbitmq.sh
. scripts/lib/rabbitmq.sh

port=${BENCH_HTTP_PORT:-18290}
mqtt=127.0.0.1:$((port + 2))
export IOTHUB_DATA_DIR="$work" IOTHUB_DATABASE__URL="$PG_URL" IOTHUB_DATABASE__MAX_CONNECTIONS=${DB_CONNECTIONS:-16}
export IOTHUB_REDIS__URL="$REDIS_URL" IOTHUB_RABBITMQ__URL="$AMQP_URL"
export IOTHUB_HTTP__LISTEN=127.0.0.1:$port IOTHUB_LOG__LEVEL=warn
export IOTHUB_BROKER__EMBEDDED__MQTTS_LISTEN= IOTHUB_BROKER__EMBEDDED__MQTT_LISTEN=$mqtt IOTHUB_BROKER__EMBEDDED__API_LISTEN=127.0.0.1:$((port + 1))
# HUB_BIN runs another build of the server (A/B comparisons in one sitting: the machine drifts).
"${HUB_BIN:-./target/release/iothub}" serve & hub_pid=$!
for _ in $(seq 150); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$hub_pid" 2>/dev/null || { echo "iothub exited during start" >&2; exit 1; }
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null

mkdir -p bench-results
{
  echo "## Commands run $(date -u +%Y-%m-%dT%H:%MZ) at $(git rev-parse --short HEAD)"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM; PostgreSQL (fsync on), Redis, RabbitMQ,"
  echo "iothub with its bundled RMQTT, and the load generator with its devices all on this machine."
  echo
  ./target/release/iothub-bench-commands --base-url "http://127.0.0.1:$port" --admin-key "$(cat "$work/admin-api-key")" \
    --mqtt "$mqtt" --database-url "$PG_URL" --amqp-url "$AMQP_URL" "$@"
} | tee bench-results/commands.md
pg_stats_dump bench-results/commands-pg-statements.txt
