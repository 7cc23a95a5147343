#!/usr/bin/env bash
# Broker-events benchmark: starts private PostgreSQL (fsync on), Redis and RabbitMQ on loopback, a release
# iothub in the production profile (PostgreSQL + Redis + RabbitMQ; the bundled RMQTT is only there to satisfy
# the broker API, the load comes in as EMQX 5 webhooks), then runs iothub-bench-events: webhook → dedup →
# PostgreSQL → RabbitMQ-confirmed throughput next to a floor measured in the same run, and presence events.
# Writes bench-results/events.md. Usage: scripts/bench-events.sh [--events N] [--concurrency C] ...
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/build-deps.sh
. scripts/lib/build-deps.sh
cargo build --release --locked -p iothub -p iothub-bench

PG_FAST=0 PG_PORT=${PG_PORT:-55434}
# shellcheck source=lib/postgres.sh
. scripts/lib/postgres.sh
hub_pid=""
work=$(mktemp -d /tmp/iothub-bench-events.XXXXXX)
cleanup() {
  set +e
  [ -n "$hub_pid" ] && kill "$hub_pid" 2>/dev/null && wait "$hub_pid" 2>/dev/null
  declare -F rabbitmq_cleanup >/dev/null && rabbitmq_cleanup
  declare -F redis_cleanup >/dev/null && redis_cleanup
  pg_cleanup
  rm -rf "$work"
}
trap cleanup EXIT
REDIS_PORT=${REDIS_PORT:-56380}
# shellcheck source=lib/redis.sh
. scripts/lib/redis.sh
AMQP_PORT=${AMQP_PORT:-55673}
# shellcheck source=lib/rabbitmq.sh
. scripts/lib/rabbitmq.sh

port=${BENCH_HTTP_PORT:-18190}
export IOTHUB_DATA_DIR="$work" IOTHUB_DATABASE__URL="$PG_URL" IOTHUB_DATABASE__MAX_CONNECTIONS=${DB_CONNECTIONS:-16}
export IOTHUB_REDIS__URL="$REDIS_URL" IOTHUB_RABBITMQ__URL="$AMQP_URL"
export IOTHUB_HTTP__LISTEN=127.0.0.1:$port IOTHUB_BROKER__HOOK_TOKEN=bench-hook-token-0123456789abcdef IOTHUB_LOG__LEVEL=warn
export IOTHUB_BROKER__EMBEDDED__MQTTS_LISTEN= IOTHUB_BROKER__EMBEDDED__MQTT_LISTEN=127.0.0.1:0 IOTHUB_BROKER__EMBEDDED__API_LISTEN=127.0.0.1:$((port + 1))
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
  echo "## Events run $(date -u +%Y-%m-%dT%H:%MZ) at $(git rev-parse --short HEAD)"
  echo
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/{print $2}') GiB RAM;"
  echo "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') (fsync on), Redis $(redis-server --version | awk '{print $3}' | cut -d= -f2),"
  echo "RabbitMQ $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null), iothub and the load generator all on this machine."
  echo "CPU columns: share of one core used by each process group during the run (200% = both cores)."
  echo
  ./target/release/iothub-bench-events --base-url "http://127.0.0.1:$port" --admin-key "$(cat "$work/admin-api-key")" \
    --hook-token bench-hook-token-0123456789abcdef --database-url "$PG_URL" --amqp-url "$AMQP_URL" --iothub-pid "$hub_pid" "$@"
} | tee bench-results/events.md
pg_stats_dump bench-results/events-pg-statements.txt
